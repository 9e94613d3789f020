"""Benchmark: one click, our ROI path vs whole-volume preprocessing (upstream's way).

Both paths use the same tiny random-weight network and the same CT-like volume,
so the difference is preprocessing/postprocessing. Each measurement runs in a
fresh subprocess; peak memory is the process's high-water mark (VmHWM) reset
after the image is loaded, so it counts only the segmentation. Optionally times
one ResEnc-L forward pass (the released architecture) on this CPU and runs
``lesionlocator segment`` with a random ResEnc-L checkpoint, checking the output
geometry.

Usage: python Testing/benchmarks/bench_segment.py [--sizes 300 1000] [--resencl] [--out DIR]
Prints a table and writes ``results/bench_segment.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))


def make_volume(path: Path, n_slices: int) -> None:
    """512 x 512 x n CT-like volume (0.78 x 0.78 x 1.0 mm), written uncompressed for fast loading."""
    from LesionLocatorLib.image import Image, write_image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512].astype(np.float32)
    body = ((yy - 256) / 210) ** 2 + ((xx - 256) / 235) ** 2 <= 1
    lungs = (((yy - 240) / 110) ** 2 + ((np.abs(xx - 256) - 105) / 70) ** 2) <= 1
    base = np.where(body, 40, -1000).astype(np.int16)
    base[lungs & body] = -850
    arr = np.empty((n_slices, 512, 512), np.int16)
    for z in range(n_slices):
        arr[z] = base + rng.integers(-15, 16, size=(512, 512), dtype=np.int16)
    c = (n_slices // 2, 300, 200)
    zz, y2, x2 = np.ogrid[-12:13, -20:21, -20:21]
    ball = (zz / 12.0) ** 2 + (y2 / 20.0) ** 2 + (x2 / 20.0) ** 2 <= 1
    arr[c[0] - 12:c[0] + 13, c[1] - 20:c[1] + 21, c[2] - 20:c[2] + 21][ball] = 120
    write_image(Image(arr, (0.78, 0.78, 1.0), (-200.0, -200.0, -500.0)), path, compress=False)


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: str, model_root: str, mode: str) -> None:
    """Run one click in this process and print a JSON line."""
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    from LesionLocatorLib.image import read_image
    from LesionLocatorLib.model import load_model
    from LesionLocatorLib.predict import segment
    from LesionLocatorLib.prompts import VoxelPrompt
    from whole_volume_reference import segment_whole_volume

    model = load_model(model_root, "point", device="cpu")
    image = read_image(path)
    prompt = VoxelPrompt(1, "point", [image.shape[0] // 2, 300, 200])
    _reset_peak()
    start_rss = _peak_mb()
    t0 = time.perf_counter()
    if mode == "roi":
        mask = segment(image, [prompt], model, check_intensities=False).masks[1]
    else:
        mask, _ = segment_whole_volume(image, prompt, model)
    seconds = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "seconds": seconds, "peak_mb": _peak_mb() - start_rss,
                      "mask_voxels": int(mask.sum())}))


def run_child(path, model_root, mode) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(path), str(model_root), mode],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def resencl_forward_seconds(workdir: Path) -> float:
    import torch
    from build_test_models import build_resencl_checkpoint
    from LesionLocatorLib.model import load_model
    root = build_resencl_checkpoint(workdir)
    model = load_model(root, "point", device="cpu")
    n_params = sum(p.numel() for p in model.network.parameters())
    x = torch.randn(1, 2, 160, 224, 224)
    t0 = time.perf_counter()
    model.forward(x)
    return time.perf_counter() - t0, n_params, root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", type=int, default=[300, 1000], help="numbers of 512x512 slices")
    ap.add_argument("--resencl", action="store_true", help="also time the ResEnc-L forward and CLI run")
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()
    from build_test_models import build_tiny_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiny = build_tiny_checkpoint(tmp / "tiny")
        for n in a.sizes:
            path = tmp / f"ct_{n}.nii"
            make_volume(path, n)
            roi, whole = run_child(path, tiny, "roi"), run_child(path, tiny, "whole")
            rows.append({"volume": f"512x512x{n}", "roi_s": roi["seconds"], "whole_s": whole["seconds"],
                         "roi_peak_mb": roi["peak_mb"], "whole_peak_mb": whole["peak_mb"],
                         "speedup": whole["seconds"] / roi["seconds"],
                         "memory_ratio": whole["peak_mb"] / max(roi["peak_mb"], 1.0),
                         "same_mask_voxels": roi["mask_voxels"] == whole["mask_voxels"]})
        extra = {}
        if a.resencl:
            seconds, n_params, root = resencl_forward_seconds(tmp / "resencl")
            extra = {"resencl_forward_s": seconds, "resencl_parameters": n_params}
            path = tmp / f"ct_{a.sizes[0]}.nii"
            t0 = time.perf_counter()
            (tmp / "p.json").write_text(json.dumps({"1": {"point": [a.sizes[0] // 2, 300, 200]}}))
            subprocess.run([sys.executable, "-m", "LesionLocatorLib.cli", "segment", "-i", str(path),
                            "-p", str(tmp / "p.json"), "-t", "point", "-o", str(tmp / "out"), "-m", str(root),
                            "--device", "cpu", "--disable_progress_bar"], check=True)
            from LesionLocatorLib.image import read_image
            src, out = read_image(path), read_image(tmp / "out" / f"ct_{a.sizes[0]}_lesions.nii")
            extra["resencl_cli_s"] = time.perf_counter() - t0
            extra["resencl_cli_geometry_identical"] = bool(src.same_geometry(out, tol=1e-6))

    print(f"\nOne click, tiny network, {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"{'volume':<14}{'ROI s':>8}{'whole s':>9}{'speed-up':>10}{'ROI MB':>9}{'whole MB':>10}{'mem ratio':>11}"
          f"{'same mask':>11}")
    for r in rows:
        print(f"{r['volume']:<14}{r['roi_s']:>8.2f}{r['whole_s']:>9.2f}{r['speedup']:>9.1f}x{r['roi_peak_mb']:>9.0f}"
              f"{r['whole_peak_mb']:>10.0f}{r['memory_ratio']:>10.1f}x{str(r['same_mask_voxels']):>11}")
    for k, v in extra.items():
        print(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    result = {"rows": rows, **extra, "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
    (Path(a.out) / "bench_segment.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
    else:
        main()
