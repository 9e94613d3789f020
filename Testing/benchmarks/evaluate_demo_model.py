"""Evaluate a model on synthetic cases from a CT that was not used for training.

Segmentation (baseline): point prompts at the lesion centre, at a random voxel
inside the lesion (off-centre), and box prompts; tracking: baseline masks
tracked through the follow-ups with the track model and a registration backend.
Writes the prediction/ground-truth instance label images per prompt type
(``WORKDIR/segmentation/<prompt>/{pred,gt}``) and of the follow-ups
(``WORKDIR/tracking/{pred,gt}``), runs ``lesionlocator evaluate`` on each (its tables are the
numbers of the model card) and writes ``results/evaluate_<name>.json``. Each follow-up is also
segmented with its true lesion masks as prompts: the Dice it reaches beside the tracked Dice (same
lesions) separates the network's share of the tracking error from the propagation's (registration,
errors carried over from earlier timepoints). ``-m`` may also be a
training checkpoint (``checkpoint_latest.pth``) to evaluate a run in progress.

Usage: python Testing/benchmarks/evaluate_demo_model.py WORKDIR [-m MODEL|CHECKPOINT] [--cases 4] [--lesions 6]
       [--followups 3] [--min-diameter 10] [--registration simpleitk] [--tta] [--name NAME]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))


def model_root(model: str, work: Path) -> str:
    """``model`` itself, or for a training checkpoint (``.pth``) the model root it is written to
    (``work/model``), so that a run in progress can be evaluated."""
    if not model.endswith(".pth"):
        return model
    from LesionLocatorLib.model import load_checkpoint
    from LesionLocatorLib.training.train import export_model
    ckpt = load_checkpoint(model)
    root = export_model(ckpt["network_weights"], ckpt["init_args"]["plans"], ckpt["logging"],
                        int(ckpt["current_epoch"]), work / "model")
    print(f"{root}: checkpoint of epoch {ckpt['current_epoch']}")
    return str(root)


def evaluation_cts(work: Path, names: list) -> list:
    """(CT image, mask of its real lesions or None) per registry CT name, fetched into
    ``work/ct_cache``; a CT with a real lesion (``registry_ct.REAL_LESION_CTS``) gets no synthetic
    lesion next to it."""
    from build_demo_model import read_ct
    from registry_ct import REAL_LESION_CTS, fetch_registry_cts, label_path
    from LesionLocatorLib.image import read_image
    paths = fetch_registry_cts(work / "ct_cache", names)
    return [(read_ct(Path(paths[n])),
             read_image(label_path(work / "ct_cache", n)).array > 0 if n in REAL_LESION_CTS else None)
            for n in names]


def evaluation_case(cts: list, index: int, a):
    """The ``index``-th synthetic evaluation case (seed ``a.seed + index``), made in the CT
    ``index % len(cts)`` of :func:`evaluation_cts` with the settings of the parsed arguments ``a``
    (lesions, follow-ups, diameters, vanishing)."""
    from LesionLocatorLib.training.synth import make_case
    ct, avoid = cts[index % len(cts)]
    return make_case(ct, n_lesions=a.lesions, n_followups=a.followups, seed=a.seed + index,
                     diameter_range_mm=(a.min_diameter, 40.0), p_vanish=a.p_vanish,
                     p_new=0.0, avoid=avoid)   # tracking follows the baseline lesions: no new ones in the truth


def case_arguments(ap: argparse.ArgumentParser) -> None:
    """The options that choose the evaluation cases (shared with ``lesion_visibility.py``)."""
    ap.add_argument("--ct", nargs="+", default=["abdomen_3mm"],
                    help="registry CT names (not used for training); case i is made in CT i modulo their number")
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--lesions", type=int, default=6)
    ap.add_argument("--followups", type=int, default=3)
    ap.add_argument("--min-diameter", type=float, default=10.0, help="smallest lesion diameter (mm)")
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--p-vanish", type=float, default=0.2,
                    help="probability that a lesion vanishes during the follow-ups (the evaluation needs >= 1)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("-m", default=str(HERE.parents[1] / "Resources" / "Models" / "LesionLocatorDemo"),
                    help="model root, or a training checkpoint (checkpoint_latest.pth of a run in progress), "
                         "which is first written as a model root to WORKDIR/model")
    case_arguments(ap)
    ap.add_argument("--registration", default="simpleitk")
    ap.add_argument("--registration-options", type=json.loads, default=None, metavar="JSON",
                    help='options of the registration backend, e.g. \'{"block_average": false, "demons_iterations": '
                         '50}\' (simpleitk as before 2026-12-05)')
    ap.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (8 flips)")
    ap.add_argument("--min-volume-ml", type=float, default=0.0, help="track's min_volume_ml (follow-up specks)")
    ap.add_argument("--min-prompt-fraction", type=float, default=0.0,
                    help="track's min_prompt_fraction (follow-up remnants inside a vanished lesion's outline)")
    ap.add_argument("--name", default=None, help="results/evaluate_NAME.json (default: the model folder's name)")
    a = ap.parse_args()

    from LesionLocatorLib.image import write_image
    from LesionLocatorLib.metrics import aggregate, dice, evaluate_case, format_table
    from LesionLocatorLib.model import load_model
    from LesionLocatorLib.predict import segment
    from LesionLocatorLib.prompts import MaskPrompt, VoxelPrompt, prompts_from_labels
    from LesionLocatorLib.track import track

    work = Path(a.work)
    a.m = model_root(a.m, work)
    cts = evaluation_cts(work, a.ct)
    seg = {k: load_model(a.m, k, device="cpu", tta=a.tta) for k in ("point", "box")}
    trk = load_model(a.m, "prev_mask", device="cpu", tta=a.tta)
    folders = {name: work / "segmentation" / slug for name, slug in
               (("point (centre)", "point_centre"), ("point (off-centre)", "point_offcentre"), ("box", "box"))}
    rng = np.random.default_rng(a.seed)
    seg_rows, track_rows, statuses, true_prompt_rows = [], [], [], []
    timings = {}
    for c in range(a.cases):
        case = evaluation_case(cts, c, a)
        base, lab = case.images[0], case.labels[0].array
        ids = [int(i) for i in np.unique(lab) if i > 0]
        centre = prompts_from_labels(lab, "point")
        boxes = prompts_from_labels(lab, "box")
        offc = [VoxelPrompt(i, "point", list(np.argwhere(lab == i)[rng.integers((lab == i).sum())].astype(float)))
                for i in ids]
        for name, prompts, model in (("point (centre)", centre, seg["point"]),
                                     ("point (off-centre)", offc, seg["point"]),
                                     ("box", boxes, seg["box"])):
            res = segment(base, prompts, model)
            folder = folders[name]
            write_image(res.labels, folder / "pred" / f"case{c}.nii.gz")
            write_image(case.labels[0], folder / "gt" / f"case{c}.nii.gz")
            for i in ids:
                seg_rows.append({"case": c, "prompt": name, "lesion_id": i, "dice": dice(res.masks[i], lab == i),
                                 "diameter_mm": next(l_.diameter_mm for l_ in case.lesions if l_.id == i)})
        t0 = time.perf_counter()
        result = track(case.images, [MaskPrompt(i, base.with_array(lab == i)) for i in ids], trk,
                       registration=a.registration, registration_options=a.registration_options,
                       min_volume_ml=a.min_volume_ml,
                       min_prompt_fraction=a.min_prompt_fraction)
        timings[f"case {c}"] = {"total_s": time.perf_counter() - t0, **result.timings}
        out = work / "tracking"
        for t in range(1, len(case.images)):
            write_image(result.labels[t], out / "pred" / f"case{c}_t{t}.nii.gz")
            write_image(case.labels[t], out / "gt" / f"case{c}_t{t}.nii.gz")
            track_rows += evaluate_case(result.labels[t], case.labels[t], lesion_ids=ids, case=f"case{c}_t{t}",
                                        patient=f"case{c}")
            # the same follow-up segmented with its true masks as prompts: what tracking would reach
            # without propagation (registration, earlier errors), i.e. the segmentation network's share
            truth = case.labels[t].array
            present = [i for i in ids if (truth == i).any()]
            if present:
                exact = segment(case.images[t], [MaskPrompt(i, case.images[t].with_array(truth == i)) for i in present],
                                trk)
                for i in present:
                    true_prompt_rows.append({"case": c, "timepoint": t, "lesion_id": i,
                                             "true_prompt_dice": dice(exact.masks[i], truth == i),
                                             "tracked_dice": dice(result.masks[t].get(i, np.zeros(truth.shape, bool)),
                                                                  truth == i)})
        for les in case.lesions:
            if les.id in result.status:
                statuses.append({"case": c, "lesion_id": les.id, "truth": les.status,
                                 "tracked": result.status[les.id]})

    from LesionLocatorLib.cli import main as cli_main
    for name, folder in {**folders, "tracking": work / "tracking"}.items():
        print(f"\n$ lesionlocator evaluate --pred {folder / 'pred'} --gt {folder / 'gt'}    # {name}")
        cli_main(["evaluate", "--pred", str(folder / "pred"), "--gt", str(folder / "gt")])

    summary = {}
    for name in ("point (centre)", "point (off-centre)", "box"):
        d = [r["dice"] for r in seg_rows if r["prompt"] == name]
        summary[name] = {"mean_dice": float(np.mean(d)), "median_dice": float(np.median(d)), "lesions": len(d)}
        for lo, hi in ((0, 20), (20, 1e9)):   # by diameter: small lesions are harder on a 2 mm grid
            part = [r["dice"] for r in seg_rows if r["prompt"] == name and lo <= r["diameter_mm"] < hi]
            summary[name][f"dice_{lo}_{hi if hi < 1e9 else 'up'}mm"] = float(np.mean(part)) if part else None
    print("Baseline segmentation (lesions >= %.0f mm)" % a.min_diameter)
    print(format_table([{"prompt": k, **v} for k, v in summary.items()]))
    agg = aggregate(track_rows)
    print("\nTracking (%s registration)" % a.registration)
    print(format_table([agg]))
    true_prompt = {k: float(np.mean([r[k] for r in true_prompt_rows])) if true_prompt_rows else None
                   for k in ("tracked_dice", "true_prompt_dice")}
    if true_prompt_rows:
        print(f"\nFollow-up lesions present in the truth ({len(true_prompt_rows)}): mean Dice tracked "
              f"{true_prompt['tracked_dice']:.3f}, with the true mask as prompt {true_prompt['true_prompt_dice']:.3f} "
              f"(the network's share of the tracking error)")
    vanish = [s for s in statuses if "vanished" in s["truth"]]
    print("\nLesions that vanish in the ground truth: truth vs tracker status")
    for s in vanish:
        print(f"  case {s['case']} lesion {s['lesion_id']}: {s['truth']} / {s['tracked']}")
    doc = {"model": a.m, "tta": a.tta, "registration_options": a.registration_options,
           "min_volume_ml": a.min_volume_ml, "min_prompt_fraction": a.min_prompt_fraction,
           "ct": a.ct, "cases": a.cases,
           "lesions_per_case": a.lesions, "followups": a.followups,
           "min_diameter_mm": a.min_diameter, "segmentation": summary, "tracking": agg,
           "follow_up_true_prompt": true_prompt,
           "follow_up_lesions": true_prompt_rows, "vanishing": vanish,
           "statuses": statuses, "timings": timings}
    (HERE / "results").mkdir(exist_ok=True)
    path = HERE / "results" / f"evaluate_{a.name or Path(a.m).name}{'_tta' if a.tta else ''}.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
