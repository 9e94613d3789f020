"""Benchmark: what tracking adds to the scene's memory, in full CT copies and in process memory.

A baseline and ``--followups`` follow-up CTs (default 3, each 300 x 512 x 512 int16, 150 MB) are
loaded into a real MRML scene (slicer-core, ``Testing/slicer_harness.py``); two lesions are clicked
on the baseline and tracked with the module's Logic (the tiny random-weight model in this process,
registration 'none': the point is the scene's memory, not the network). Counted after tracking, at
every timepoint of the sequence browser: the voxel buffers of scan size in the scene (volumes,
sequence items, the browser's proxy; shared buffers count once) minus the scans themselves = full CT
copies, and the process's resident memory before and after.

Prints a table and writes ``results/bench_track_memory.json``. Target: 0 copies.

Usage: python Testing/benchmarks/bench_track_memory.py [--shape 300 512 512] [--followups 3]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bench_slicer_click import ct_volume, lesion_voxels  # noqa: E402


def rss_mb() -> float:
    """Resident memory of this process now (MB), from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=3, type=int, default=[300, 512, 512], help="each CT (k, j, i) voxels")
    ap.add_argument("--followups", type=int, default=3)
    ap.add_argument("-o", default=str(HERE / "results" / "bench_track_memory.json"))
    args = ap.parse_args()
    import build_test_models
    import slicer_harness

    shape = tuple(args.shape)
    harness = slicer_harness.SlicerHarness().activate()
    slicer_harness.import_module_file()
    from LesionLocatorSlicer.logic import LesionLocatorLogic

    ijk_to_ras = np.diag([-0.8, -0.8, 1.0, 1.0])
    volumes = [harness.add_volume(ct_volume(shape, seed=t), ijk_to_ras, f"CT t{t}") for t in range(args.followups + 1)]
    points = harness.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
    for kji in lesion_voxels(shape)[:2]:
        points.AddControlPoint(*(ijk_to_ras @ [kji[2], kji[1], kji[0], 1.0])[:3])
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        model = str(build_test_models.build_tiny_checkpoint(Path(tmp)))
        logic = LesionLocatorLogic()
        logic.segment(volumes[0], points, modelPath=model, device="cpu")
        scan_voxels = int(np.prod(shape))
        before_buffers = [a for a, n in harness.voxel_buffers().items() if n == scan_voxels]
        before_rss = rss_mb()
        t0 = time.perf_counter()
        outputs = logic.track(volumes[0], volumes[1:], modelPath=model, device="cpu", registration="none",
                              order="given")
        seconds = time.perf_counter() - t0
        copies = []
        for t in range(len(volumes)):
            outputs.browserNode.SetSelectedItemNumber(t)
            copies.append(len([a for a, n in harness.voxel_buffers().items() if n == scan_voxels]) - len(volumes))
        after_rss = rss_mb()
        logic.cleanup()
    harness.deactivate()
    result = {"shape_kji": list(shape), "scans": len(volumes), "scan_mb": scan_voxels * 2 / 2**20,
              "scan_buffers_before": len(before_buffers), "full_ct_copies_per_timepoint": copies,
              "rss_before_track_mb": before_rss, "rss_after_track_mb": after_rss, "track_seconds": seconds,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    print(f"{'scans':>5} {'scan MB':>8} {'CT copies per timepoint':>24} {'RSS before MB':>14} {'RSS after MB':>13} "
          f"{'track s':>8}")
    print(f"{len(volumes):5d} {result['scan_mb']:8.0f} {str(copies):>24} {before_rss:14.0f} {after_rss:13.0f} "
          f"{seconds:8.1f}")
    Path(args.o).parent.mkdir(parents=True, exist_ok=True)
    Path(args.o).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.o}", file=sys.stderr)
    return 0 if not any(copies) else 1


if __name__ == "__main__":
    sys.exit(main())
