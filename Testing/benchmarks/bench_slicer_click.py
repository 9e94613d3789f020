"""Benchmark: the Slicer module's overhead per click (request -> mask in the scene, minus the network).

Runs the module's Logic on a real MRML scene (slicer-core, ``Testing/slicer_harness.py``) with
a CT-like volume (default 512 x 512 x 200, int16) and clicks one point at a time, as the
Widget does on each placed point (``logic.segment(volume, (points, index))``). Each click is
split into:

* ``total``: the Logic call, from the request to the mask in the scene;
* ``convert``: volume -> library Image (voxel copy, geometry, RAS -> LPS) and prompts;
* ``runner``: the runner call as the Logic sees it; ``library``: the library's own time in the
  runner (model cache lookup, ROI preprocessing, network, pasting back); ``network``: the
  network forward passes only;
* ``transport`` = runner - library (the worker process: NRRD file out, JSON, masks back);
* ``write`` = total - convert - runner (labelmap from the mask, segment into the scene);
* ``preprocess`` / ``postprocess``: the library's ROI preprocessing (crop, resample to the
  model spacing, normalise, prompt encoding) and pasting the result back (inside ``library``);
* ``overhead`` = total - network: what the module path adds to the network (target <= 0.3 s);
* ``module`` = convert + transport + write: the part the Slicer module itself adds (the rest of
  the overhead is the library's ROI pre/postprocessing, the same from the command line).

Runners: in-process and the persistent worker process. Models: the tiny random-weight model
(built here) and, when present, the demo model (``Resources/Models/LesionLocatorDemo`` or ``-m``).
The first click of each runner/model pair loads the model (and starts the worker) and is not
counted. Prints a table (medians over the clicks) and writes ``results/bench_slicer_click.json``.

Usage: python Testing/benchmarks/bench_slicer_click.py [--shape 200 512 512] [--clicks 5] [-m MODEL]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(REPO))

STAGES = ["total", "convert", "runner", "library", "preprocess", "network", "postprocess", "transport", "write",
          "overhead", "module"]


def ct_volume(shape, seed: int = 0) -> np.ndarray:
    """A CT-like (k, j, i) int16 volume: body, lungs, noise, five 10-15 mm lesions."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx].astype(np.float32)
    body = ((yy - ny / 2) / (0.41 * ny)) ** 2 + ((xx - nx / 2) / (0.46 * nx)) ** 2 <= 1
    lungs = ((yy - 0.47 * ny) / (0.21 * ny)) ** 2 + ((np.abs(xx - nx / 2) - 0.2 * nx) / (0.14 * nx)) ** 2 <= 1
    base = np.where(body, 40, -1000).astype(np.int16)
    base[lungs & body] = -850
    array = np.empty(shape, np.int16)
    for z in range(nz):
        array[z] = base + rng.integers(-15, 16, size=(ny, nx), dtype=np.int16)
    return array


def lesion_voxels(shape) -> list:
    nz, ny, nx = shape
    return [(nz // 2, int(ny * fy), int(nx * fx)) for fy, fx in
            [(0.55, 0.40), (0.60, 0.62), (0.35, 0.50), (0.70, 0.45), (0.45, 0.70), (0.50, 0.30)]]


class Timed:
    """Wraps a callable and adds its wall time to ``seconds``."""

    def __init__(self, function):
        self.function, self.seconds = function, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.function(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def bench(LL, harness, volume, model: str, runner: str, clicks: int) -> list:
    import slicer

    logic = LL.LesionLocatorLogic()
    if runner == "worker":
        logic.useWorkerProcess()
    ijk = slicer.util.arrayFromVTKMatrix(_ijk_to_ras(volume))
    points = harness.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"clicks {runner}")
    for kji in lesion_voxels(slicer.util.arrayFromVolume(volume).shape)[:clicks + 1]:
        points.AddControlPointWorld(list((ijk @ [kji[2], kji[1], kji[0], 1.0])[:3]))
    from LesionLocatorSlicer import scene

    real = scene.volumeToImage, scene.promptsFromNodes
    convert, prompts = Timed(scene.volumeToImage), Timed(scene.promptsFromNodes)
    scene.volumeToImage, scene.promptsFromNodes = convert, prompts
    rows = []
    try:
        for index in range(clicks + 1):
            run = Timed(logic.runner.run)
            logic.runner.run = run
            convert.seconds = prompts.seconds = 0.0
            t0 = time.perf_counter()
            logic.segment(volume, (points, index), modelPath=model, device="cpu")
            total = time.perf_counter() - t0
            del logic.runner.run
            response = logic.lastResponse
            network = response.timings.get("network", float("nan"))
            row = {"total": total, "convert": convert.seconds + prompts.seconds, "runner": run.seconds,
                   "library": response.seconds, "network": network}
            row["transport"] = row["runner"] - row["library"]
            row["write"] = total - row["convert"] - row["runner"]
            row["preprocess"] = response.timings.get("preprocessing", float("nan"))
            row["postprocess"] = response.timings.get("postprocessing", float("nan"))
            row["overhead"] = total - network
            row["module"] = row["convert"] + row["transport"] + row["write"]
            row["mask_voxels"] = int(response.masks[index + 1].sum()) if index + 1 in response.masks else None
            if index:  # the first click loads the model (and starts the worker)
                rows.append(row)
            else:
                first = row
    finally:
        scene.volumeToImage, scene.promptsFromNodes = real
        logic.cleanup()
    return rows, first


def _ijk_to_ras(volume):
    import vtk

    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=3, type=int, default=[200, 512, 512], help="volume size (k, j, i)")
    ap.add_argument("--spacing", nargs=3, type=float, default=[0.78, 0.78, 1.0], help="mm (i, j, k)")
    ap.add_argument("--clicks", type=int, default=5, help="timed clicks per runner and model (after a warm-up)")
    ap.add_argument("-m", default=None, help="a trained model root (default: the demo model when present)")
    ap.add_argument("--runners", nargs="+", default=["in-process", "worker"], choices=["in-process", "worker"])
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    import slicer_harness
    from build_test_models import build_tiny_checkpoint

    harness = slicer_harness.SlicerHarness().activate()
    LL = slicer_harness.import_module_file()
    shape = tuple(a.shape)
    ijk_to_ras = np.diag(list(a.spacing) + [1.0]) @ np.eye(4)
    ijk_to_ras[:3, 3] = [-0.5 * a.spacing[0] * shape[2], -0.5 * a.spacing[1] * shape[1], -100.0]
    volume = harness.add_volume(ct_volume(shape), ijk_to_ras, "CT")
    results = {"shape_kji": list(shape), "spacing_ijk_mm": a.spacing, "clicks": a.clicks, "rows": [],
               "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny": str(build_tiny_checkpoint(Path(tmp)))}
        from LesionLocatorSlicer.models import defaultModelPath
        demo = a.m or defaultModelPath()
        if demo:
            models["demo"] = demo
        for name, path in models.items():
            for runner in a.runners:
                rows, first = bench(LL, harness, volume, path, runner, a.clicks)
                median = {k: float(np.median([r[k] for r in rows])) for k in STAGES}
                results["rows"].append({"model": name, "model_path": path, "runner": runner, "median_s": median,
                                        "clicks_s": rows, "first_click_s": first})
    harness.deactivate()

    header = ["model", "runner"] + STAGES
    print(f"volume {shape[2]}x{shape[1]}x{shape[0]} int16, median of {a.clicks} clicks, seconds "
          f"(overhead = total - network; target <= 0.3 s)")
    print(" | ".join(f"{h:>11}" for h in header))
    for row in results["rows"]:
        print(" | ".join([f"{row['model']:>11}", f"{row['runner']:>11}"]
                         + [f"{row['median_s'][k]:11.3f}" for k in STAGES]))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_slicer_click.json").write_text(json.dumps(results, indent=2))
    print(f"written {out / 'bench_slicer_click.json'}")


if __name__ == "__main__":
    main()
