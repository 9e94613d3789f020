"""The GPU benchmark script runs end to end (``--device cpu --tiny``), so it is ready for a GPU machine: every row of
the issue's table, the two reference rows, the stage timings and the accuracy rows land in its JSON."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "benchmarks" / "bench_gpu.py"


def test_bench_gpu_runs_its_whole_table_on_the_cpu_with_the_tiny_network(tmp_path):
    out = tmp_path / "bench_gpu.json"
    p = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "work"), "--device", "cpu", "--tiny",
                        "--repeats", "1", "--registration", "none", "-o", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["rows"]) == ["click 1 fold, no TTA", "  same, cudnn.benchmark off (ref.)",
                                    "click 5 folds x 8 flips", "  same, 1 flip per call (ref.)",
                                    "batch of 10 lesions", "track 10 x 3 (with registration)"]
    for name, row in result["rows"].items():
        assert 0 < row["min_s"] <= row["median_s"] < 300, name
    assert set(result["rows"]["click 1 fold, no TTA"]["stages_s"]) == {"preprocessing", "network", "postprocessing"}
    # on the CPU, the "GPU" fp32 model is the CPU model: identical logits and masks
    assert result["accuracy"] == {"max_abs_logit_diff_fp32_vs_cpu": 0.0, "dice_fp16_vs_fp32": 1.0}
    assert "click 5 folds x 8 flips" in p.stdout and "fp32 logits on cpu vs CPU: max |diff| 0.0e+00" in p.stdout


def test_bench_gpu_says_how_to_check_it_without_a_gpu(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    p = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--device", "cuda"], capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 2
    assert "no CUDA GPU here: run with --device cpu --tiny to check the script" in p.stderr


def test_bench_gpu_keeps_the_other_rows_when_one_fails(tmp_path):
    """On a lent GPU machine every minute counts: a row that fails is reported and the others still run and land in
    the JSON (written after every row); the exit status says something failed."""
    out = tmp_path / "bench_gpu.json"
    p = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "work"), "--device", "cpu", "--tiny",
                        "--repeats", "1", "--registration", "nonsense", "-o", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows["track 10 x 3 (with registration)"] == {
        "error": "ValueError: unknown registration backend 'nonsense'; choose one of simpleitk, none, greedy, "
                 "unigradicon"}
    assert all(r["median_s"] > 0 for name, r in rows.items() if not name.startswith("track"))
    assert "track 10 x 3 (with registration)     failed: ValueError" in p.stdout
