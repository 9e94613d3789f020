"""How well the synthetic evaluation lesions can be told apart from their surroundings by grey value.

For every lesion (baseline and follow-ups) of the evaluation cases of ``evaluate_demo_model.py`` (same CT,
seeds and settings), a *threshold oracle* that knows the lesion to within 2 voxels: on the image
smoothed with a Gaussian of 0.7 voxels, the voxels within 2 voxels of the lesion (other lesions
excluded) above, or below, one grey value; the best Dice with the lesion over 50 grey values
(percentiles of that neighbourhood) and both directions. A lesion whose boundary shows as a
step in grey value scores near 1; partial volume on a coarse grid, noise, texture and faint
contrast lower it. It is not a bound for a network (a network may fill in the core of a
rim-enhancing lesion, which no single threshold does), but it tells where the synthetic
lesions themselves are ambiguous. Also per lesion: contrast (median HU of the eroded lesion
minus the median of a shell 1-3 voxels outside it) and the noise (1.4826 x MAD of that shell).

With ``--pred FOLDER`` (e.g. ``WORKDIR/segmentation/point_centre/pred`` written by
``evaluate_demo_model.py`` with the same case options) the model's Dice per lesion is put beside
the oracle's.

Prints a table per lesion appearance and location (baseline lesions), one per timepoint (the
follow-ups' lesions too) and writes ``results/lesion_visibility_NAME.json``.

Usage: python Testing/benchmarks/lesion_visibility.py WORKDIR [--pred FOLDER] [--name NAME]
       [evaluate_demo_model.py's case options]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))

from LesionLocatorLib.metrics import dice  # noqa: E402  (after the path set-up)
from LesionLocatorLib.training.lesions import robust_sigma  # noqa: E402

NEAR_VOXELS = 2        # the oracle knows the lesion to within this many voxels
SMOOTH_VOXELS = 0.7    # Gaussian sigma of the smoothing before thresholding
THRESHOLDS = 50        # grey values tried (percentiles of the neighbourhood)


def threshold_oracle_dice(image: np.ndarray, lesion: np.ndarray, others: np.ndarray) -> float:
    """Best Dice of ``lesion`` (bool, z y x) with the voxels within ``NEAR_VOXELS`` of it (not in
    ``others``) above or below one grey value of the smoothed ``image``."""
    box = tuple(slice(max(s.start - NEAR_VOXELS - 2, 0), s.stop + NEAR_VOXELS + 2)
                for s in ndimage.find_objects(lesion.view(np.uint8))[0])
    target, grey = lesion[box], ndimage.gaussian_filter(image[box].astype(np.float32), SMOOTH_VOXELS)
    near = ndimage.binary_dilation(target, iterations=NEAR_VOXELS) & ~others[box]
    best = 0.0
    for t in np.percentile(grey[near], np.linspace(1, 99, THRESHOLDS)):
        for chosen in (near & (grey > t), near & (grey < t)):
            best = max(best, dice(chosen, target))
    return float(best)


def contrast_and_noise(image: np.ndarray, lesion: np.ndarray, others: np.ndarray) -> tuple:
    """(median HU inside the eroded lesion minus that of a shell 1-3 voxels outside it, the shell's
    robust standard deviation 1.4826 x MAD in HU)."""
    core = ndimage.binary_erosion(lesion)
    core = core if core.any() else lesion
    shell = ndimage.binary_dilation(lesion, iterations=3) & ~ndimage.binary_dilation(lesion) & ~others
    values = image[shell].astype(np.float32)
    return float(np.median(image[core]) - np.median(values)), robust_sigma(values)


def main() -> None:
    from evaluate_demo_model import case_arguments, evaluation_case, evaluation_cts
    from LesionLocatorLib.image import read_image
    from LesionLocatorLib.metrics import format_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work")
    ap.add_argument("--pred", default=None, help="folder of predicted baseline label images caseN.nii.gz")
    ap.add_argument("--name", default="abdomen_3mm")
    case_arguments(ap)
    a = ap.parse_args()
    cts = evaluation_cts(Path(a.work), a.ct)
    rows = []
    for c in range(a.cases):
        case = evaluation_case(cts, c, a)
        pred = read_image(Path(a.pred) / f"case{c}.nii.gz").array if a.pred else None
        for t, (scan, label_image) in enumerate(zip(case.images, case.labels)):
            image, labels = scan.array, label_image.array
            for les in case.lesions:
                lesion = labels == les.id
                if not lesion.any():
                    continue
                others = (labels > 0) & ~lesion
                contrast, noise = contrast_and_noise(image, lesion, others)
                row = {"case": c, "timepoint": t, "lesion_id": les.id, "appearance": les.appearance,
                       "location": les.location, "diameter_mm": les.diameter_mm, "voxels": int(lesion.sum()),
                       "oracle_dice": threshold_oracle_dice(image, lesion, others),
                       "contrast_hu": contrast, "noise_hu": noise}
                if pred is not None and t == 0:
                    row["model_dice"] = dice(pred == les.id, lesion)
                rows.append(row)
    baseline = [r for r in rows if r["timepoint"] == 0]
    groups = defaultdict(list)
    for r in baseline:
        groups[(r["appearance"], r["location"])].append(r)
    groups[("all", "all")] = baseline
    table = []
    for (appearance, location), part in sorted(groups.items(), key=lambda kv: (kv[0] == ("all", "all"), kv[0])):
        line = {"appearance": appearance, "location": location, "lesions": len(part),
                "oracle_dice": float(np.mean([r["oracle_dice"] for r in part])),
                "contrast_hu": float(np.median([r["contrast_hu"] for r in part])),
                "noise_hu": float(np.median([r["noise_hu"] for r in part])),
                "diameter_mm": float(np.median([r["diameter_mm"] for r in part]))}
        if a.pred:
            line["model_dice"] = float(np.mean([r["model_dice"] for r in part]))
        table.append(line)
    print(f"Threshold oracle on the baseline lesions of {a.cases} evaluation cases ({', '.join(a.ct)}); "
          "contrast, noise and diameter: medians")
    print(format_table(table))
    # the same per timepoint: the follow-ups' lesions (grown or shrunk, resampled, transformed)
    per_timepoint = []
    for t in sorted({r["timepoint"] for r in rows}):
        part = [r for r in rows if r["timepoint"] == t]
        per_timepoint.append({"timepoint": t, "lesions": len(part),
                              "oracle_dice": float(np.mean([r["oracle_dice"] for r in part])),
                              "contrast_hu": float(np.median([abs(r["contrast_hu"]) for r in part])),
                              "noise_hu": float(np.median([r["noise_hu"] for r in part])),
                              "voxels": float(np.median([r["voxels"] for r in part]))})
    print("\nPer timepoint (every lesion present in the truth); |contrast|, noise and voxels: medians")
    print(format_table(per_timepoint))
    (HERE / "results").mkdir(exist_ok=True)
    path = HERE / "results" / f"lesion_visibility_{a.name}.json"
    path.write_text(json.dumps({"ct": a.ct, "cases": a.cases, "pred": a.pred, "groups": table,
                                "timepoints": per_timepoint, "lesions": rows},
                               indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
