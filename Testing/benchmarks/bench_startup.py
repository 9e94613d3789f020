"""Benchmark: how long the command line takes to report a mistake (time to the first validation error).

Runs ``lesionlocator`` as a user would (a new process each time) with three mistakes: a missing input
image, a prompt file whose kind does not match ``-t`` (after the image header and the prompt file
were read) and a model folder whose plans.json names code (after everything else was checked).
Each command runs ``--runs`` times; prints the median and maximum wall time and whether torch was
imported, and writes ``results/bench_startup.json``. Target: at most 1 s.

Usage: python Testing/benchmarks/bench_startup.py [--runs 5]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(REPO))


def _inputs(tmp: Path) -> dict:
    from build_test_models import build_tiny_checkpoint
    from phantoms import ct_phantom

    from LesionLocatorLib.image import write_image

    img, _ = ct_phantom(shape_zyx=(60, 256, 256), lesions=[((30, 128, 100), 8.0, 120)])
    write_image(img, tmp / "ct.nii.gz")
    (tmp / "ct.json").write_text(json.dumps({"1": {"point": [30, 128, 100]}}))
    model = build_tiny_checkpoint(tmp / "model")
    evil = shutil.copytree(model, tmp / "evil" / "LesionLocatorCheckpoint")
    plans = json.loads((evil / "LesionLocatorSeg/point_optimized/plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "torch.hub.load"
    (evil / "LesionLocatorSeg/point_optimized/plans.json").write_text(json.dumps(plans))
    base = ["segment", "-i", str(tmp / "ct.nii.gz"), "-p", str(tmp / "ct.json"), "-o", str(tmp / "out"),
            "--device", "cpu"]
    return {"missing input image": ["segment", "-i", str(tmp / "none.nii.gz"), "-p", str(tmp / "ct.json"),
                                    "-t", "point", "-o", str(tmp / "out")],
            "prompt kind vs -t": base + ["-t", "box", "-m", str(model)],
            "plans.json names code": base + ["-t", "point", "-m", str(evil)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("-o", default=str(HERE / "results" / "bench_startup.json"))
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        for name, argv in _inputs(Path(tmp)).items():
            seconds, torch_imported = [], False
            for _ in range(args.runs):
                t0 = time.perf_counter()
                done = subprocess.run([sys.executable, "-X", "importtime", "-m", "LesionLocatorLib.cli", *argv],
                                      cwd=REPO, capture_output=True, text=True)
                seconds.append(time.perf_counter() - t0)
                torch_imported |= any(line.rstrip().endswith("| torch") for line in done.stderr.splitlines())
                assert done.returncode == 2, done.stderr[-500:]
            message = [ln for ln in done.stderr.splitlines() if ": error: " in ln][-1]
            results[name] = {"median_s": sorted(seconds)[len(seconds) // 2], "max_s": max(seconds),
                             "torch_imported": torch_imported, "message": message}
    print(f"{'mistake':<24} {'median s':>9} {'max s':>7}  torch imported")
    for name, r in results.items():
        print(f"{name:<24} {r['median_s']:9.3f} {r['max_s']:7.3f}  {r['torch_imported']}")
    Path(args.o).parent.mkdir(parents=True, exist_ok=True)
    Path(args.o).write_text(json.dumps({"runs": args.runs, "results": results}, indent=1))
    print(f"wrote {args.o}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
