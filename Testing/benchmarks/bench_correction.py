"""Benchmark: one correction (:func:`LesionLocatorLib.correct.retrack`) against a full re-track,
on a 512x512x300 study with 3 follow-ups, the demo model, on the CPU, in one run.

The study: a synthetic body CT (``phantoms.synthetic_body_ct``, 0.8 x 0.8 x 1.5 mm) with 5
spherical lesions (12 to 30 mm, +50 HU) as the baseline; each follow-up redraws the noise, grows
every lesion's diameter by 8 % and moves the whole scan by (3, -2, 1.5) mm (its origin), so each
pair needs a registration. Both runs use the same loaded models (loaded before timing):

1. **full re-track**: :func:`LesionLocatorLib.track.track` from the baseline's label image
   (3 simpleitk registrations + the network for all lesions at every follow-up) -- what fixing
   one lesion costs when the study is tracked again;
2. **one correction**: ``retrack`` of that result with one click at lesion 1's true centre on
   the first follow-up (the point model there, then lesion 1 re-propagated through follow-ups 2
   and 3 with the earlier registrations).

3. **resumed**: the same correction on the run saved to disk and loaded back
   (:mod:`LesionLocatorLib.trackstate`, what ``track --resume-from`` does); the saving is timed too.

Registrations are counted (the library's ``register`` wrapped). Prints a table (seconds per
stage) and writes ``results/bench_correction.json``.

Usage: python Testing/benchmarks/bench_correction.py [--runs 1]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))

from phantoms import synthetic_body_ct  # noqa: E402

SPACING = (0.8, 0.8, 1.5)  # x, y, z mm
SHIFT_MM = np.array([3.0, -2.0, 1.5])  # per follow-up, LPS x, y, z
LESIONS = {1: ((150, 230, 200), 15.0), 2: ((120, 300, 310), 10.0), 3: ((180, 260, 330), 12.0),
           4: ((100, 220, 280), 6.0), 5: ((200, 290, 190), 8.0)}  # id: ((z, y, x) voxel centre, radius mm)


def study(followups: int = 3):
    """(images, label Images): baseline and follow-ups, and their true lesion labels."""
    from LesionLocatorLib.image import Image

    images, labels = [], []
    for t in range(followups + 1):
        array = synthetic_body_ct(seed=t, spacing=SPACING)
        label = np.zeros(array.shape, np.uint8)
        for pid, (centre, radius) in LESIONS.items():
            r = radius * 1.08 ** t
            lo = [max(int(c - r / s) - 1, 0) for c, s in zip(centre, SPACING[::-1])]
            hi = [int(c + r / s) + 2 for c, s in zip(centre, SPACING[::-1])]
            z, y, x = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            ball = ((z - centre[0]) * SPACING[2]) ** 2 + ((y - centre[1]) * SPACING[1]) ** 2 + \
                ((x - centre[2]) * SPACING[0]) ** 2 <= r ** 2
            label[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][ball] = pid
        array[label > 0] += 50
        origin = tuple(np.array([-204.4, -204.4, -224.25]) + t * SHIFT_MM)
        images.append(Image(array, SPACING, origin, np.eye(3)))
        labels.append(images[-1].with_array(label))
    return images, labels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1, help="repetitions of both (median)")
    ap.add_argument("-o", default=str(HERE / "results" / "bench_correction.json"))
    args = ap.parse_args()

    from LesionLocatorLib import register as register_module
    from LesionLocatorLib.correct import Correction, retrack
    from LesionLocatorLib.evaluate import dice
    from LesionLocatorLib.model import load_model
    from LesionLocatorLib.prompts import Point
    from LesionLocatorLib.track import track
    from LesionLocatorLib.trackstate import load_track_state, save_track_state
    from LesionLocatorLib.zoo import demo_model_dir

    t0 = time.perf_counter()
    images, labels = study()
    print(f"study made in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    models = {kind: load_model(demo_model_dir(), kind, device="cpu") for kind in ("prev_mask", "point")}
    calls = []
    original = register_module.register

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)

    register_module.register = counted
    centre = tuple(images[1].index_to_world(np.argwhere(labels[1].array == 1).mean(axis=0)))
    full, fix, saved, resumed = [], [], [], []
    folder = Path(tempfile.mkdtemp(prefix="bench-correction-"))
    for _ in range(args.runs):
        calls.clear()
        start = time.perf_counter()
        first = track(images, labels[0], models["prev_mask"])
        full.append({"seconds": time.perf_counter() - start, "registrations": len(calls), **first.timings})
        calls.clear()
        start = time.perf_counter()
        fixed = retrack(images, first, [Correction(1, 1, Point(1, centre))], models["prev_mask"], models["point"])
        fix.append({"seconds": time.perf_counter() - start, "registrations": len(calls), **fixed.timings})
        start = time.perf_counter()
        save_track_state(folder, first, images, [f"t{t}" for t in range(4)], "simpleitk")
        saved.append({"seconds": time.perf_counter() - start,
                      "megabytes": sum(f.stat().st_size for f in folder.iterdir()) / 2 ** 20})
        calls.clear()
        start = time.perf_counter()
        loaded = load_track_state(folder, images)[0]
        loading = time.perf_counter() - start
        again = retrack(images, loaded, [Correction(1, 1, Point(1, centre))], models["prev_mask"], models["point"])
        resumed.append({"seconds": time.perf_counter() - start, "loading": loading, "registrations": len(calls),
                        **again.timings})
        assert all(np.array_equal(again.masks[t][1], fixed.masks[t][1]) for t in range(4))
    register_module.register = original
    shutil.rmtree(folder, ignore_errors=True)
    quality = {f"t{t}": dice(fixed.masks[t][1], labels[t].array == 1) for t in range(1, 4)}

    def median(rows, key):
        return float(np.median([r.get(key, 0.0) for r in rows]))

    stages = ["registration", "warping", "preprocessing", "network", "postprocessing"]
    print(f"one correction vs full re-track: 512x512x300, 5 lesions, 3 follow-ups, demo model, {os.cpu_count()} cpus, "
          f"median of {args.runs}")
    print(f"{'run':<28} {'total s':>8} {'registrations':>13} " + " ".join(f"{s[:12]:>12}" for s in stages))
    for name, rows in (("full re-track (track)", full), ("one correction (retrack)", fix),
                       ("resumed from disk + correction", resumed)):
        print(f"{name:<28} {median(rows, 'seconds'):8.1f} {int(median(rows, 'registrations')):13d} "
              + " ".join(f"{median(rows, s):12.1f}" for s in stages))
    ratio = median(full, "seconds") / median(fix, "seconds")
    print(f"the correction takes 1/{ratio:.0f} of the re-track; lesion 1 Dice after it: "
          + ", ".join(f"{k} {v:.3f}" for k, v in quality.items()))
    print(f"saving the run (OUT/tracking, what --resume-from reads): {median(saved, 'seconds'):.1f} s, "
          f"{median(saved, 'megabytes'):.0f} MB; loading it back: {median(resumed, 'loading'):.1f} s (fingerprints "
          f"of the 4 scans checked)")
    Path(args.o).parent.mkdir(parents=True, exist_ok=True)
    Path(args.o).write_text(json.dumps({
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpus": os.cpu_count(),
        "runs": args.runs, "full_retrack": full, "one_correction": fix, "saved_state": saved,
        "resumed_correction": resumed, "speedup": ratio,
        "lesion1_dice_after_correction": quality}, indent=1))
    print(f"wrote {args.o}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
