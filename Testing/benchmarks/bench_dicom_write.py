"""Benchmark: time to write one timepoint's DICOM SEG + SR (``write_dicom_results``) for a
512x512x300 CT series with 10 lesions, against writing the same masks as the NIfTI outputs.

The series (int16, 0.8 x 0.8 x 1.5 mm, axial) is written with ``Testing/dicom_fixtures.py`` and its
headers read with ``read_series_header``; the lesions are lobulated spheres of 5 to 60 mm diameter
at fixed random places (seed 0), apart from each other. Timed, each ``--runs`` times (median and
maximum wall time, in one process, so the first run also pays for importing highdicom):
``write_dicom_results`` for the one timepoint (SEG + SR, measurements precomputed); the same with
lesion 2 grown into lesion 1 (overlapping lesions: highdicom gets a bool stack per segment instead
of a label array, the slower path); and the NIfTI outputs ``<case>_lesion_N.nii.gz`` (10 files) +
``<case>_lesions.nii.gz`` with ``write_image``. Prints a table and writes
``results/bench_dicom_write.json``. Target: SEG + SR at most 5 s on 2 cores.

Usage: python Testing/benchmarks/bench_dicom_write.py [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(REPO))

SHAPE = (300, 512, 512)
SPACING = (0.8, 0.8, 1.5)  # x, y, z mm
DIAMETERS_MM = np.linspace(5.0, 60.0, 10)


def lesion_masks(shape=SHAPE, spacing=SPACING, diameters=DIAMETERS_MM, seed: int = 0) -> dict:
    """{lesion id: bool (z, y, x)}: lobulated spheres of the given diameters (mm), apart from each other."""
    rng = np.random.default_rng(seed)
    sz, sy, sx = spacing[2], spacing[1], spacing[0]
    masks, centres = {}, []
    for pid, d in enumerate(diameters, start=1):
        r = d / 2
        while True:
            c = np.array([rng.uniform(r + 5, shape[0] * sz - r - 5), rng.uniform(100 + r, shape[1] * sy - 100 - r),
                          rng.uniform(100 + r, shape[2] * sx - 100 - r)])
            if all(np.linalg.norm(c - o) > r + ro + 5 for o, ro in centres):
                break
        centres.append((c, r))
        lo = np.maximum(((c - r - 2) / (sz, sy, sx)).astype(int), 0)
        hi = np.minimum(((c + r + 2) / (sz, sy, sx)).astype(int) + 1, shape)
        z, y, x = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        dz, dy, dx = z * sz - c[0], y * sy - c[1], x * sx - c[2]
        dist = np.sqrt(dz ** 2 + dy ** 2 + dx ** 2)
        lobes = 1 + 0.12 * np.sin(3 * np.arctan2(dy, dx)) * np.cos(2 * np.arctan2(dz, np.hypot(dx, dy)))
        mask = np.zeros(shape, dtype=bool)
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = dist <= r * lobes
        masks[pid] = mask
    return masks


def _timed(fn, runs: int) -> list:
    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("-o", default=str(HERE / "results" / "bench_dicom_write.json"))
    args = ap.parse_args()
    from dicom_fixtures import write_ct_series

    from LesionLocatorLib.dicomresults import write_dicom_results
    from LesionLocatorLib.dicomseries import read_series_header
    from LesionLocatorLib.image import Image, write_image
    from LesionLocatorLib.measure import lesion_measurements

    rng = np.random.default_rng(1)
    ct = Image(rng.integers(-1000, 1000, SHAPE, dtype=np.int16), SPACING, (-204.8, -204.8, -300.0),
               np.eye(3))
    masks = lesion_masks()
    with tempfile.TemporaryDirectory(prefix="bench_dicom_write_") as tmp:
        tmp = Path(tmp)
        write_ct_series(ct, tmp / "ct")
        series = read_series_header(tmp / "ct")
        status = {pid: ["tracked"] for pid in masks}
        rows = lesion_measurements([ct], [masks], status, names=["case"])
        overlapping = dict(masks)
        overlapping[2] = masks[2] | masks[1]
        overlapping_rows = lesion_measurements([ct], [overlapping], status, names=["case"])
        labels = np.zeros(SHAPE, dtype=np.uint16)
        for pid, mask in masks.items():
            labels[mask] = pid

        def dicom():
            write_dicom_results(tmp / "dicom", [series], ["case"], [masks], rows)

        def dicom_overlapping():
            write_dicom_results(tmp / "overlap", [series], ["case"], [overlapping], overlapping_rows)

        def nifti():
            for pid, mask in masks.items():
                write_image(ct.with_array(mask.astype(np.uint8)), tmp / "nifti" / f"case_lesion_{pid}.nii.gz")
            write_image(ct.with_array(labels), tmp / "nifti" / "case_lesions.nii.gz")

        results = {}
        for name, fn, folder in (("DICOM SEG + SR", dicom, "dicom"),
                                 ("DICOM, overlapping", dicom_overlapping, "overlap"),
                                 ("NIfTI lesion files", nifti, "nifti")):
            seconds = _timed(fn, args.runs)
            size = sum(f.stat().st_size for f in (tmp / folder).iterdir())
            results[name] = {"median_s": sorted(seconds)[len(seconds) // 2], "max_s": max(seconds),
                             "bytes": size}
    voxels = {pid: int(m.sum()) for pid, m in masks.items()}
    print(f"512x512x300 series, 10 lesions ({', '.join(f'{d:.0f}' for d in DIAMETERS_MM)} mm), "
          f"{os.cpu_count()} CPU(s)")
    print(f"{'output':<20} {'median s':>9} {'max s':>7} {'MiB':>7}")
    for name, r in results.items():
        print(f"{name:<20} {r['median_s']:9.3f} {r['max_s']:7.3f} {r['bytes'] / 2 ** 20:7.1f}")
    Path(args.o).parent.mkdir(parents=True, exist_ok=True)
    Path(args.o).write_text(json.dumps({"runs": args.runs, "cpus": os.cpu_count(),
                                        "lesion_voxels": voxels, "results": results}, indent=1))
    print(f"wrote {args.o}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
