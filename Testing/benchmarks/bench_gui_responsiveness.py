"""Benchmark: does Slicer stay responsive while a slow model runs? The longest gap between timer ticks.

A click is segmented on a CT-like volume (default 300 x 512 x 512, int16) in a real MRML scene
(slicer-core, ``Testing/slicer_harness.py``) with a slow model: the released architecture
(ResEnc-L, patch 160 x 224 x 224, random weights, about 30-45 s per forward pass on 2 CPU cores).
Two ways are compared in the same run:

* ``widget``: what the module's panel does now: the click becomes a job (``InteractiveSegmentation``),
  the network runs in the persistent worker process, a background thread waits for it, and the main
  loop (the GUI) calls ``poll()`` every ``--tick-ms`` (the panel's QTimer: 50 ms). The gap between
  consecutive ticks is how long the GUI could not process events.
* ``blocking``: what the panel did before: ``logic.segment`` in Slicer's own thread, the GUI only
  processing events at each progress call (once per network batch).

Prints a table (ticks, longest gap, 99th percentile, the click's wall time) and writes
``results/bench_gui_responsiveness.json``. Target: the longest gap of ``widget`` <= 100 ms.

Usage: python Testing/benchmarks/bench_gui_responsiveness.py [--shape 300 512 512] [--tick-ms 50] [--tiny]
(``--tiny``: the tiny test model instead of ResEnc-L, for a quick check of the harness).
"""
from __future__ import annotations

import argparse
import json
import platform
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


def _scene(shape):
    import slicer_harness

    harness = slicer_harness.SlicerHarness().activate()
    slicer_harness.import_module_file()
    ijk_to_ras = np.diag([-0.8, -0.8, 1.0, 1.0])
    volume = harness.add_volume(ct_volume(shape), ijk_to_ras, "CT")
    points = harness.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
    for kji in lesion_voxels(shape)[:2]:
        local = ijk_to_ras @ [kji[2], kji[1], kji[0], 1.0]
        points.AddControlPoint(*local[:3])
    return harness, volume, points


def _gaps(ticks) -> dict:
    gaps = np.diff(np.asarray(ticks)) * 1000.0 if len(ticks) > 1 else np.zeros(1)
    return {"ticks": len(ticks), "longest_gap_ms": float(gaps.max()), "p99_gap_ms": float(np.percentile(gaps, 99)),
            "median_gap_ms": float(np.median(gaps))}


def run_widget(volume, points, model, tick_s) -> dict:
    """The panel's path: a job per click, the worker process, poll() from a timer loop."""
    from LesionLocatorSlicer.interaction import InteractiveSegmentation
    from LesionLocatorSlicer.logic import LesionLocatorLogic

    logic = LesionLocatorLogic()
    logic.useWorkerProcess()
    options = {"modelPath": str(model), "device": "cpu", "folds": "0"}
    done, failed = [], []
    session = InteractiveSegmentation(logic, volume=lambda: volume, options=lambda: options, done=done.append,
                                      failed=failed.append)
    try:
        out = {}
        for label, index in (("first click (worker start, model load)", 0), ("next click (model loaded)", 1)):
            session.submit(session.promptJob(points, points.GetNthControlPointID(index)))
            ticks, start = [time.perf_counter()], time.perf_counter()
            while session.poll():
                time.sleep(max(0.0, tick_s - (time.perf_counter() - ticks[-1])))
                ticks.append(time.perf_counter())
            if failed:
                raise failed[0]
            out[label] = {"seconds": time.perf_counter() - start, **_gaps(ticks),
                          "network_s": logic.lastResponse.timings.get("network", float("nan"))}
        return out
    finally:
        session.close()
        logic.cleanup()


def run_blocking(volume, points, model) -> dict:
    """The old path: segment() in the GUI thread; the GUI only runs at each progress call."""
    from LesionLocatorSlicer.logic import LesionLocatorLogic

    logic = LesionLocatorLogic()
    out = {}
    for label, index in (("first click (model load)", 0), ("next click (model loaded)", 1)):
        ticks, start = [time.perf_counter()], time.perf_counter()
        logic.segment(volume, (points, index), modelPath=str(model), device="cpu", folds="0",
                      progress=lambda f, m: ticks.append(time.perf_counter()))
        ticks.append(time.perf_counter())
        out[label] = {"seconds": time.perf_counter() - start, **_gaps(ticks),
                      "network_s": logic.lastResponse.timings.get("network", float("nan"))}
    logic.cleanup()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=3, type=int, default=[300, 512, 512], help="volume (k, j, i) voxels")
    ap.add_argument("--tick-ms", type=float, default=50.0, help="the GUI timer's interval (the panel uses 50 ms)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test model instead of ResEnc-L (quick check)")
    ap.add_argument("-o", default=str(HERE / "results" / "bench_gui_responsiveness.json"))
    args = ap.parse_args()
    import build_test_models

    with tempfile.TemporaryDirectory(prefix="bench_gui_") as tmp:
        t0 = time.perf_counter()
        model = (build_test_models.build_tiny_checkpoint(Path(tmp)) if args.tiny
                 else build_test_models.build_resencl_checkpoint(Path(tmp)))
        print(f"model: {'tiny' if args.tiny else 'ResEnc-L (random weights)'} written in "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
        harness, volume, points = _scene(tuple(args.shape))
        try:
            results = {"widget": run_widget(volume, points, model, args.tick_ms / 1000.0),
                       "blocking": run_blocking(volume, points, model)}
        finally:
            harness.deactivate()
    print(f"{'path':<9} {'click':<40} {'s':>6} {'network s':>9} {'ticks':>6} {'longest gap ms':>14} "
          f"{'p99 ms':>7} {'median ms':>9}")
    for path, clicks in results.items():
        for click, r in clicks.items():
            print(f"{path:<9} {click:<40} {r['seconds']:6.1f} {r['network_s']:9.1f} {r['ticks']:6d} "
                  f"{r['longest_gap_ms']:14.0f} {r['p99_gap_ms']:7.0f} {r['median_gap_ms']:9.0f}")
    Path(args.o).parent.mkdir(parents=True, exist_ok=True)
    Path(args.o).write_text(json.dumps({"shape_kji": args.shape, "tick_ms": args.tick_ms,
                                        "model": "tiny" if args.tiny else "ResEnc-L random weights",
                                        "machine": platform.platform(), "cpus": __import__("os").cpu_count(),
                                        "results": results}, indent=1))
    print(f"wrote {args.o}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
