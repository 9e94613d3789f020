"""Benchmark: the default ``simpleitk`` registration on 512 x 512 x 300 CT pairs with a known motion,
the previous pipeline (OLD) against today's :func:`LesionLocatorLib.register.register_simpleitk` (NEW).

Each pair (``--pairs``, default 3, seeds 0, 1, ...): a synthetic body CT
(``phantoms.synthetic_body_ct``, 0.8 x 0.8 x 1.5 mm) with 6 spherical lesions (6 to 15 mm radius,
soft-tissue and lung-like) is the moving scan (timepoint t-1); the fixed scan (t) is that scan
resampled through a known motion, an affine (rotations up to 4 degrees, scales 0.97 to 1.03,
translations up to 10 mm, all drawn per seed) after a smooth displacement field of 3 to 6 mm,
plus fresh noise. The true lesion masks at t are the moving label image resampled through the
same motion (nearest neighbour).

OLD is the pipeline before 2026-12-05, the library's own with ``block_average=False,
demons_iterations=50`` (full-resolution Gaussian smoothing, affine on 25 % of the voxels, 50
demons iterations of at most 0.5 voxel). Every registration runs in its own
process (``--one``, the pair read from a .npy cache), OLD and NEW alternately (OLD first on even
pairs, NEW first on odd ones). Reported per method: seconds (median and min over pairs), the
process's CPU seconds, its peak resident memory and how much the registration added to it,
and for every lesion the Dice of the moving mask warped by the transform
(:meth:`Transform.warp_mask`) against the true mask, and the centre error (mm) of the moving
lesion's centre mapped by :meth:`Transform.map_points` against the true centre; and over the
whole body, the mean (and 95th percentile) distance between the fixed -> moving mapping and the
known motion at 3000 random body points.

Prints a table and writes ``results/bench_registration.json``.

Usage: python Testing/benchmarks/bench_registration.py [--pairs 3] [--cache DIR]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))

from phantoms import synthetic_body_ct  # noqa: E402

SPACING = (0.8, 0.8, 1.5)  # x, y, z mm
LESIONS = {1: ((150, 230, 200), 15.0, 60), 2: ((120, 300, 310), 10.0, 60), 3: ((180, 260, 330), 12.0, 30),
           4: ((100, 220, 280), 6.0, 80), 5: ((200, 290, 190), 8.0, 100), 6: ((90, 250, 150), 9.0, -500)}
"""id: ((z, y, x) voxel centre, radius mm, HU)."""
ARRAYS = ("moving", "moving_labels", "fixed", "fixed_labels")


# ---------------------------------------------------------------------------- the known-motion pair
def known_motion(moving, seed: int) -> sitk.Transform:
    """The fixed -> moving motion of pair ``seed``: x -> A(x + d(x)) (LPS mm), A an affine about the
    scan's centre, d a smooth displacement field of a few mm on a 6 mm grid."""
    rng = np.random.default_rng(100 + seed)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tuple(moving.index_to_world(np.array(moving.shape) / 2)))
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*np.deg2rad(rng.uniform(-4, 4, 3)))
    matrix = np.asarray(rotation.GetMatrix()).reshape(3, 3) @ np.diag(rng.uniform(0.97, 1.03, 3))
    affine.SetMatrix(tuple(matrix.ravel()))
    affine.SetTranslation(tuple(rng.uniform(-10, 10, 3)))
    shape = (78, 70, 70)  # z, y, x nodes of 6 mm, beyond the scan's 450 x 410 x 410 mm box
    zz, yy, xx = np.meshgrid(*[np.arange(n) * 6.0 for n in shape], indexing="ij")
    phase, amplitude = rng.uniform(0, 2 * np.pi, 3), rng.uniform(3, 6, 3)
    d = np.zeros(shape + (3,))
    d[..., 2] = amplitude[0] * np.sin(np.pi * yy / 420 + phase[0]) * np.sin(np.pi * xx / 420) * np.sin(np.pi * zz / 468)
    d[..., 1] = amplitude[1] * np.sin(2 * np.pi * zz / 468 + phase[1]) * np.cos(np.pi * xx / 420)
    d[..., 0] = amplitude[2] * np.sin(2 * np.pi * yy / 420 + phase[2]) * np.sin(np.pi * zz / 468)
    field = sitk.GetImageFromArray(d, isVector=True)
    field.SetSpacing((6.0, 6.0, 6.0))
    field.SetOrigin(tuple(np.asarray(moving.origin) - 12.0))
    return sitk.CompositeTransform([affine, sitk.DisplacementFieldTransform(field)])


def build_pair(seed: int) -> dict:
    """{name: (z, y, x) array} of ARRAYS: the moving scan (int16) and its lesion labels (uint8), the
    fixed scan = the moving one through :func:`known_motion` plus noise, and the true fixed labels."""
    from LesionLocatorLib.image import Image
    rng = np.random.default_rng(100 + seed)
    moving = synthetic_body_ct(seed=seed, spacing=SPACING)
    labels = np.zeros(moving.shape, np.uint8)
    z, y, x = np.ogrid[:moving.shape[0], :moving.shape[1], :moving.shape[2]]
    for pid, (c, r, hu) in LESIONS.items():
        ball = ((z - c[0]) * SPACING[2]) ** 2 + ((y - c[1]) * SPACING[1]) ** 2 + ((x - c[2]) * SPACING[0]) ** 2 <= r * r
        labels[ball] = pid
        moving[ball] = np.int16(hu) + rng.normal(0, 10, int(ball.sum())).astype(np.int16)
    image = Image(moving, SPACING)
    grid = image.to_sitk()
    motion = known_motion(image, seed)
    fixed = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(grid, sitk.sitkFloat32), grid, motion, sitk.sitkLinear,
                                                 -1024.0))
    body = fixed > -950
    fixed[body] += rng.normal(0, 8, int(body.sum())).astype(np.float32)
    fixed_labels = sitk.GetArrayFromImage(sitk.Resample(image.with_array(labels).to_sitk(), grid, motion,
                                                        sitk.sitkNearestNeighbor, 0))
    return {"moving": moving, "moving_labels": labels, "fixed": np.rint(fixed).astype(np.int16),
            "fixed_labels": fixed_labels}


# ------------------------------------------------------------------------------- one registration
def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process (MB), from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_one(method: str, folder: Path, seed: int) -> dict:
    """Register the cached pair ``seed`` in ``folder`` with ``method`` ('old' or 'new') in this
    process and measure it: seconds, CPU seconds, memory, per-lesion Dice and centre error, and
    the error (mm) of the fixed -> moving mapping against the known motion at 3000 random body
    points of the fixed scan (HU > -950, lungs included)."""
    from LesionLocatorLib.evaluate import dice
    from LesionLocatorLib.image import Image
    from LesionLocatorLib.register import register_simpleitk
    arrays = {k: np.load(folder / f"{k}.npy") for k in ARRAYS}
    moving, fixed = Image(arrays["moving"], SPACING), Image(arrays["fixed"], SPACING)
    rss_before = _rss_mb("VmRSS")
    cpu0, t0 = os.times(), time.perf_counter()
    options = {"block_average": False, "demons_iterations": 50} if method == "old" else {}  # OLD: as it was
    transform = register_simpleitk(fixed, moving, **options)
    seconds, cpu1 = time.perf_counter() - t0, os.times()
    peak = _rss_mb("VmHWM")
    if not np.isfinite(peak):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    body = np.argwhere(arrays["fixed"][::4, ::4, ::4] > -950) * 4
    points = fixed.index_to_world(body[np.random.default_rng(5).choice(len(body), 3000, replace=False)])
    motion = known_motion(moving, seed)
    truth = np.array([motion.TransformPoint(tuple(p)) for p in points])
    body_error = np.linalg.norm(transform.fixed_to_moving(points) - truth, axis=1)
    lesions = {}
    for pid in LESIONS:
        mask = arrays["moving_labels"] == pid
        truth = arrays["fixed_labels"] == pid
        warped = transform.warp_mask(moving.with_array(mask), fixed).array
        centre = transform.map_points([moving.index_to_world(np.argwhere(mask).mean(0))])[0]
        lesions[pid] = {"dice": float(dice(warped, truth)),
                        "centre_error_mm": float(np.linalg.norm(centre - fixed.index_to_world(
                            np.argwhere(truth).mean(0))))}
    return {"method": method, "seconds": seconds, "cpu_seconds": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
            "peak_rss_mb": peak, "added_rss_mb": peak - rss_before, "result": transform.info.get("result"),
            "body_error_mm_mean": float(body_error.mean()), "body_error_mm_p95": float(np.percentile(body_error, 95)),
            "ncc_affine": transform.info.get("ncc_affine"), "ncc_deformable": transform.info.get("ncc_deformable"),
            "lesions": lesions}


def _accuracy_of_no_registration(folder: Path) -> dict:
    """Per-lesion Dice and centre error with the scans' world alignment only (the 'none' backend)."""
    from LesionLocatorLib.evaluate import dice
    from LesionLocatorLib.image import Image
    moving_labels, fixed_labels = (np.load(folder / f"{k}.npy") for k in ("moving_labels", "fixed_labels"))
    grid = Image(moving_labels, SPACING)
    out = {}
    for pid in LESIONS:
        mask, truth = moving_labels == pid, fixed_labels == pid
        err = grid.index_to_world(np.argwhere(mask).mean(0)) - grid.index_to_world(np.argwhere(truth).mean(0))
        out[pid] = {"dice": float(dice(mask, truth)), "centre_error_mm": float(np.linalg.norm(err))}
    return out


# ----------------------------------------------------------------------------------------- main
def _summary(runs: list) -> dict:
    dices = [lesion["dice"] for r in runs for lesion in r["lesions"].values()]
    errors = [lesion["centre_error_mm"] for r in runs for lesion in r["lesions"].values()]
    pick = {k: [r[k] for r in runs] for k in ("seconds", "cpu_seconds", "peak_rss_mb", "added_rss_mb")}
    return {"seconds_median": float(np.median(pick["seconds"])), "seconds_min": float(np.min(pick["seconds"])),
            "cpu_seconds_median": float(np.median(pick["cpu_seconds"])),
            "peak_rss_mb_max": float(np.max(pick["peak_rss_mb"])),
            "added_rss_mb_max": float(np.max(pick["added_rss_mb"])),
            "dice_mean": float(np.mean(dices)), "dice_min": float(np.min(dices)),
            "centre_error_mm_mean": float(np.mean(errors)), "centre_error_mm_max": float(np.max(errors)),
            "body_error_mm_mean": float(np.mean([r["body_error_mm_mean"] for r in runs])),
            "body_error_mm_p95_max": float(np.max([r["body_error_mm_p95"] for r in runs])),
            "lesions": len(dices), "results": sorted({r["result"] for r in runs})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3,
                    help="known-motion pairs (seeds 0..N-1); OLD and NEW run once on each")
    ap.add_argument("--cache", default=None, help="folder for the pairs' .npy files, kept (default: a temporary one)")
    ap.add_argument("--out", default=str(HERE / "results" / "bench_registration.json"))
    ap.add_argument("--one", nargs=3, metavar=("METHOD", "FOLDER", "SEED"), help=argparse.SUPPRESS)  # a child
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one[0], Path(a.one[1]), int(a.one[2]))))
        return
    root = Path(a.cache) if a.cache else Path(tempfile.mkdtemp(prefix="bench_registration_"))
    runs, baseline = {"old": [], "new": []}, []
    try:
        for seed in range(a.pairs):
            folder = root / f"pair{seed}"
            if not all((folder / f"{k}.npy").exists() for k in ARRAYS):
                t0 = time.perf_counter()
                folder.mkdir(parents=True, exist_ok=True)
                for k, v in build_pair(seed).items():
                    np.save(folder / f"{k}.npy", v)
                print(f"pair {seed}: built in {time.perf_counter() - t0:.1f} s", flush=True)
            baseline.append(_accuracy_of_no_registration(folder))
            for method in (("old", "new") if seed % 2 == 0 else ("new", "old")):
                out = subprocess.run([sys.executable, __file__, "--one", method, str(folder), str(seed)], check=True,
                                     capture_output=True, text=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                r["pair"] = seed
                runs[method].append(r)
                lesions = r["lesions"].values()
                print(f"pair {seed} {method}: {r['seconds']:6.2f} s ({r['cpu_seconds']:.2f} CPU s), Dice "
                      + " ".join(f"{v['dice']:.3f}" for v in lesions) + ", centre error "
                      + " ".join(f"{v['centre_error_mm']:.2f}" for v in lesions)
                      + f" mm, body error {r['body_error_mm_mean']:.2f} mm, {r['result']}", flush=True)
    finally:
        if not a.cache:
            shutil.rmtree(root, ignore_errors=True)
    summary = {m: _summary(r) for m, r in runs.items()}
    none_d = [v["dice"] for b in baseline for v in b.values()]
    none_e = [v["centre_error_mm"] for b in baseline for v in b.values()]
    print(f"\nsimpleitk registration, {a.pairs} pairs of 512 x 512 x 300 (0.8 x 0.8 x 1.5 mm), {len(LESIONS)} lesions "
          f"each, {os.cpu_count()} cores; no registration: Dice mean {np.mean(none_d):.3f}, centre error mean "
          f"{np.mean(none_e):.1f} mm")
    head = (f"{'method':<7}{'s median':>9}{'s min':>7}{'CPU s':>7}{'peak MB':>9}{'added MB':>9}{'Dice mean':>10}"
            f"{'Dice min':>9}{'err mean':>9}{'err max':>8}{'body err':>9}{'body p95':>9}")
    print(head)
    for m, s in summary.items():
        print(f"{m.upper():<7}{s['seconds_median']:>9.2f}{s['seconds_min']:>7.2f}{s['cpu_seconds_median']:>7.2f}"
              f"{s['peak_rss_mb_max']:>9.0f}{s['added_rss_mb_max']:>9.0f}{s['dice_mean']:>10.3f}{s['dice_min']:>9.3f}"
              f"{s['centre_error_mm_mean']:>9.2f}{s['centre_error_mm_max']:>8.2f}{s['body_error_mm_mean']:>9.2f}"
              f"{s['body_error_mm_p95_max']:>9.2f}")
    ratio = [o["seconds"] / n["seconds"] for o, n in zip(runs["old"], runs["new"])]
    print(f"speed-up OLD / NEW per pair: {' '.join(f'{v:.1f}' for v in ratio)} (median {np.median(ratio):.1f}); "
          f"errors in mm (err: lesion centres; body err: mean over 3000 body points per pair, p95: the "
          f"worst pair's 95th percentile); peak MB: the registering process's peak resident memory (pair loaded), "
          f"added MB: its growth during the registration")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cores": os.cpu_count(),
              "sitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), "pairs": a.pairs,
              "shape_zyx": [300, 512, 512], "spacing_xyz_mm": list(SPACING),
              "summary": summary, "speedup_per_pair": ratio,
              "no_registration": {"dice_mean": float(np.mean(none_d)), "centre_error_mm_mean": float(np.mean(none_e))},
              "runs": runs}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
