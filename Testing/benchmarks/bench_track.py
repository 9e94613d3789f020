"""Benchmark: tracking N lesions through F follow-ups, time per stage.

Makes one synthetic case from a registry CT (default 10 lesions, 3 follow-ups),
then runs ``lesionlocator track`` (baseline masks as prompts, the demo model,
simpleitk registration) and reports the stages the tracker times
(registration, warping, preprocessing, network, postprocessing) plus writing.
Reference in the same run: upstream's loop, lesion by lesion (every lesion
registers every pair again and runs the network alone), timed the same way.
Prints a table and writes ``results/bench_track.json``.

Usage: python Testing/benchmarks/bench_track.py WORKDIR [-m MODEL] [--lesions 10] [--followups 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("-m", default=str(HERE.parents[1] / "Resources" / "Models" / "LesionLocatorDemo"))
    ap.add_argument("--ct", default="abdomen_3mm")
    ap.add_argument("--lesions", type=int, default=10)
    ap.add_argument("--followups", type=int, default=3)
    ap.add_argument("--registration", default="simpleitk")
    ap.add_argument("--no-reference", action="store_true", help="skip the lesion-by-lesion reference run")
    a = ap.parse_args()
    from build_demo_model import read_ct
    from registry_ct import fetch_registry_cts
    from LesionLocatorLib.image import write_image
    from LesionLocatorLib.metrics import lesion_measurements, write_table
    from LesionLocatorLib.model import load_model
    from LesionLocatorLib.report import growth_plot
    from LesionLocatorLib.prompts import MaskPrompt
    from LesionLocatorLib.training.synth import make_case
    from LesionLocatorLib.track import track

    work = Path(a.work)
    ct = read_ct(Path(fetch_registry_cts(work / "ct_cache", [a.ct])[a.ct]))
    case = make_case(ct, n_lesions=a.lesions, n_followups=a.followups, seed=7, diameter_range_mm=(8.0, 40.0))
    model = load_model(a.m, "prev_mask", device="cpu")
    t0 = time.perf_counter()
    result = track(case.images, case.labels[0], model, registration=a.registration)
    total_track = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = work / "bench_track_out"
    names = [f"t{t}" for t in range(len(case.images))]
    for t, name in enumerate(names[1:], start=1):
        for pid, mask in result.masks[t].items():
            write_image(case.images[t].with_array(mask.astype("uint8")), out / f"{name}_lesion_{pid}.nii.gz")
        write_image(result.labels[t], out / f"{name}_lesions.nii.gz")
    rows = lesion_measurements(case.images, result.masks, result.status, names)
    write_table(rows, out / "lesions")
    growth_plot(rows, out / "growth.png")
    stages = dict(result.timings, writing=time.perf_counter() - t1)
    total = total_track + stages["writing"]
    print(f"\n{a.lesions} lesions x {a.followups} follow-ups, CT {ct.shape} (z, y, x) at {ct.spacing_zyx} mm, "
          f"{os.cpu_count()} cores, registration {a.registration}")
    print(f"{'stage':<18}{'seconds':>9}{'share':>8}")
    for k, v in stages.items():
        print(f"{k:<18}{v:>9.1f}{100 * v / total:>7.0f}%")
    print(f"{'total':<18}{total:>9.1f}")
    reference = None
    if not a.no_reference:
        base = case.labels[0]
        ids = sorted(int(i) for i in set(base.array.ravel()) if i > 0)
        reference = {k: 0.0 for k in result.timings}
        t0 = time.perf_counter()
        for pid in ids:  # upstream's loop: each lesion alone, its own registrations
            alone = track(case.images, [MaskPrompt(pid, base.with_array(base.array == pid))], model,
                          registration=a.registration)
            for k, v in alone.timings.items():
                reference[k] = reference.get(k, 0.0) + v
        reference["total"] = time.perf_counter() - t0
        print(f"\nreference, lesion by lesion (upstream's loop): {reference['total']:.1f} s "
              f"(registration {reference['registration']:.1f} s, network {reference['network']:.1f} s); "
              f"batched tracker {reference['total'] / total_track:.1f}x faster")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "bench_track.json").write_text(json.dumps(
        {"lesions": a.lesions, "followups": a.followups, "ct_shape": list(ct.shape), "stages_s": stages,
         "total_s": total, "reference_lesion_by_lesion_s": reference, "cpu_count": os.cpu_count(),
         "model": a.m}, indent=1))


if __name__ == "__main__":
    main()
