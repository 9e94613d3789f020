"""Benchmark (issue #29): one click with the official-size network on a 512x512x300 CT, CPU, 1 fold, no TTA,
end to end, PyTorch vs the OpenVINO backend (``load_model(..., backend="openvino")``).

The network is the released ResEnc-L architecture with random weights (``build_resencl_checkpoint``); the CT is
``bench_segment.make_volume`` (512 x 512 x 300, 0.78 x 0.78 x 1 mm) and the click is at its centre. Each run is a
fresh subprocess that loads the model, reads the CT and segments one point prompt (timed separately; "click" =
load + read + segment, what a first click costs; "segment" = the network part of it). Variants, alternated
round by round (A B C, C B A, ...) so that other load on a shared machine hits them alike:

  torch          PyTorch fp32 (today's path)
  openvino-cold  --backend openvino with an empty converted-model cache: includes the one-time conversion
  openvino       --backend openvino with the cache filled (what every later session costs)
  openvino-bf16  opt-in reduced precision (cache filled)
  upstream       with ``--upstream-python``: upstream LesionLocator's own command (``LesionLocator_segment -t point
                 -f 0 --disable_tta -device cpu -npp 1 -nps 1``, installed in that separate environment as
                 ``Testing/make_upstream_fixtures.py`` describes; never part of this repository) on the same CT
                 (as .nii.gz) and click, the same checkpoint folder

"process s" is the whole process, Python start-up and imports included (the only time upstream's command has);
"click s" is measured inside our processes (load + read + segment, what a first click costs); "next click s" is a
second ``segment`` call in the same process (what every later click costs in Slicer, whose worker keeps the model).
Peak memory is the largest process's (``os.wait4``). Accuracy against the torch run of the same round: Dice of the
masks and max |probability difference| (upstream: Dice only).
Prints a table, writes JSON (default ``results/bench_click_backend.json``, not tracked in git).

Usage: python Testing/benchmarks/bench_click_backend.py WORKDIR [--rounds 2] [--variants torch openvino ...]
       [--upstream-python /path/to/upstream_venv/bin/python]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))

VARIANTS = ("torch", "openvino-cold", "openvino", "openvino-bf16")
UPSTREAM_CLI = "from lesionlocator.inference.lesionlocator_segment import predict_seg_from_prompt as m; m()"


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _click(image):
    """The benchmark's click: one point prompt at the CT's centre (voxel z, y, x)."""
    from LesionLocatorLib.prompts import VoxelPrompt
    return VoxelPrompt(1, "point", [image.shape[0] // 2, image.shape[1] // 2, image.shape[2] // 2])


def child(work: str, variant: str) -> None:
    """One click in this process; prints a JSON line and saves the mask and probabilities."""
    t0 = time.perf_counter()
    from LesionLocatorLib.image import read_image
    from LesionLocatorLib.model import load_model
    from LesionLocatorLib.predict import segment

    work = Path(work)
    backend = "torch" if variant == "torch" else variant.replace("-cold", "")
    cache = work / ("cache-cold" if variant == "openvino-cold" else "cache")
    if variant == "openvino-cold":
        shutil.rmtree(cache, ignore_errors=True)
    model = load_model(work / "resencl", "point", folds=[0], device="cpu", tta=False, backend=backend,
                       cache_dir=cache)
    t_load = time.perf_counter() - t0
    image = read_image(work / "ct.nrrd")
    t_read = time.perf_counter() - t0 - t_load
    prompt = _click(image)
    t1 = time.perf_counter()
    result = segment(image, [prompt], model, check_intensities=False)
    t_segment = time.perf_counter() - t1
    t2 = time.perf_counter()
    segment(image, [prompt], model, check_intensities=False)  # the next click (Slicer's worker keeps the model)
    t_next = time.perf_counter() - t2
    np.savez_compressed(work / f"out_{variant}.npz", mask=result.masks[1],
                        probabilities=result.probabilities[1].astype(np.float32))
    print(json.dumps({"variant": variant, "load_s": t_load, "read_s": t_read, "segment_s": t_segment,
                      "click_s": t_load + t_read + t_segment, "next_click_s": t_next, "peak_mb": _peak_mb(),
                      "conversions": getattr(model.runtime, "conversions", 0)}))


def _compare(work: Path, variant: str) -> dict:
    """Dice of the variant's mask against the torch run's, and (ours only) the max probability difference."""
    from LesionLocatorLib.evaluate import dice
    ref = np.load(work / "out_torch.npz")
    if variant == "upstream":
        from LesionLocatorLib.image import read_image
        return {"dice_vs_torch": dice(read_image(work / "upstream_out" / "ct_lesion_1.nii.gz").array, ref["mask"])}
    got = np.load(work / f"out_{variant}.npz")
    return {"dice_vs_torch": dice(got["mask"], ref["mask"]),
            "max_prob_diff": float(np.abs(ref["probabilities"] - got["probabilities"]).max())}


def _prepare_upstream(work: Path) -> None:
    """The CT as .nii.gz and the click as upstream prompt JSON (voxel z, y, x), named alike, once."""
    from LesionLocatorLib.image import read_image, write_image
    from LesionLocatorLib.prompts import write_upstream_json
    image_dir, prompt_dir = work / "upstream_in", work / "upstream_prompts"
    if not (image_dir / "ct.nii.gz").is_file():
        image_dir.mkdir(exist_ok=True)
        prompt_dir.mkdir(exist_ok=True)
        image = read_image(work / "ct.nrrd")
        write_image(image, image_dir / "ct.nii.gz")
        write_upstream_json([_click(image)], prompt_dir / "ct.json")


def _run_process(argv: list) -> tuple:
    """(returncode, stdout, stderr, wall seconds, peak MiB of the largest process) of one command."""
    import tempfile
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here for its rusage: tell Popen so
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(errors="replace"), \
            err.read().decode(errors="replace"), wall, usage.ru_maxrss / 1024


def _run_variant(work: Path, variant: str, upstream_python: str | None) -> dict:
    if variant == "upstream":
        shutil.rmtree(work / "upstream_out", ignore_errors=True)
        (work / "upstream_out").mkdir()
        model_root = work / "resencl" / "LesionLocatorCheckpoint"
        argv = [upstream_python, "-c", UPSTREAM_CLI, "-i", str(work / "upstream_in"), "-o", str(work / "upstream_out"),
                "-p", str(work / "upstream_prompts"), "-t", "point", "-m", str(model_root),
                "-f", "0", "--disable_tta", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"]
    else:
        argv = [sys.executable, __file__, str(work), "--child", str(work), variant]
    code, out, err, wall, peak = _run_process(argv)
    if code != 0:
        print(err[-3000:], file=sys.stderr)
        raise SystemExit(f"{variant} failed")
    if variant == "upstream":
        row = {"variant": variant, "click_s": wall, "load_s": float("nan"), "segment_s": float("nan"),
               "next_click_s": float("nan")}
    else:
        row = json.loads(out.strip().splitlines()[-1])
    row.update(process_s=wall, process_peak_mb=peak)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + ("upstream",))
    ap.add_argument("--upstream-python", help="upstream LesionLocator's environment's python: adds the upstream row")
    ap.add_argument("-o", default=str(HERE / "results" / "bench_click_backend.json"))
    ap.add_argument("--child", nargs=2, metavar=("WORK", "VARIANT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return 0
    from bench_segment import make_volume
    from build_test_models import build_resencl_checkpoint

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "resencl").is_dir():
        build_resencl_checkpoint(work / "resencl")
    if not (work / "ct.nrrd").is_file():
        make_volume(work / "ct.nrrd", 300)
    variants = ["torch"] + [v for v in a.variants if v != "torch"]
    if a.upstream_python:
        variants += [] if "upstream" in variants else ["upstream"]
        _prepare_upstream(work)
    elif "upstream" in variants:
        raise SystemExit("the upstream variant needs --upstream-python")
    runs = {v: [] for v in variants}
    for v in ("openvino", "openvino-bf16"):  # fill their cache once, untimed
        if v in variants:
            subprocess.run([sys.executable, __file__, str(work), "--child", str(work), v], capture_output=True,
                           check=True)
    for r in range(a.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        if "torch" in order and order[0] != "torch":
            order = ["torch"] + [v for v in order if v != "torch"]  # the round's reference first
        for v in order:
            row = _run_variant(work, v, a.upstream_python)
            if v != "torch":
                row.update(_compare(work, v))
            runs[v].append(row)
            print(f"[round {r + 1}] {v}: process {row['process_s']:.1f} s, click {row['click_s']:.1f} s "
                  f"(segment {row['segment_s']:.1f} s)", file=sys.stderr)
    table = []
    for v in variants:
        rows = runs[v]
        med = lambda k: statistics.median(x[k] for x in rows)  # noqa: E731
        table.append({"variant": v, "process_s": med("process_s"), "click_s": med("click_s"), "load_s": med("load_s"),
                      "segment_s": med("segment_s"), "next_click_s": med("next_click_s"),
                      "peak_mb": med("process_peak_mb"),
                      "dice_vs_torch": min((x.get("dice_vs_torch", 1.0) for x in rows)),
                      "max_prob_diff": max((x.get("max_prob_diff", 0.0) for x in rows)) if v != "upstream" else None})
    base = table[0]["process_s"]
    print(f"\nOne click, ResEnc-L (random weights, 160x224x224 patch), 512x512x300 CT, 1 fold, no TTA, "
          f"{os.cpu_count()} cpus, median of {a.rounds} round(s)")
    nxt = table[0]["next_click_s"]
    print(f"{'variant':15s} {'process s':>9s} {'click s':>8s} {'load s':>7s} {'segment s':>9s} {'speed-up':>8s} "
          f"{'next click s':>12s} {'speed-up':>8s} {'peak MiB':>9s} {'Dice':>7s} {'max|dp|':>8s}")
    for t in table:
        dp = "-" if t["max_prob_diff"] is None else f"{t['max_prob_diff']:.1e}"
        print(f"{t['variant']:15s} {t['process_s']:9.1f} {t['click_s']:8.1f} {t['load_s']:7.1f} {t['segment_s']:9.1f} "
              f"{base / t['process_s']:7.2f}x {t['next_click_s']:12.1f} {nxt / t['next_click_s']:7.2f}x "
              f"{t['peak_mb']:9.0f} {t['dice_vs_torch']:7.4f} {dp:>8s}")
    print("speed-up: torch's process s / this one's (whole processes, start-up included); next click: a second "
          "segment call in the same process (the model loaded, as in Slicer's worker)")
    Path(a.o).parent.mkdir(parents=True, exist_ok=True)
    Path(a.o).write_text(json.dumps({"rows": table, "runs": runs, "rounds": a.rounds, "cpus": os.cpu_count(),
                                     "date": time.strftime("%Y-%m-%d %H:%M")}, indent=1))
    print(f"wrote {a.o}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
