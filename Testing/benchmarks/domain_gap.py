"""How much of a model's accuracy carries over from its training CT to another CT.

The demo model is trained on synthetic lesions in one registry CT (``chest_1p5mm``) and
evaluated on another (``abdomen_3mm``). This benchmark separates the two things that differ:
the scan's resolution and the anatomy/grey values. It inserts new lesions (seeds not used for
training) into each CT at its native spacing and resampled to the other CT's spacing, segments
them from centre points and tight boxes, and prints mean Dice per (CT, spacing, prompt) as a
table (and writes ``results/domain_gap_<name>.json``).

Usage: python Testing/benchmarks/domain_gap.py WORKDIR [-m MODEL|CHECKPOINT] [--cases 2]
       [--lesions 6] [--name NAME]
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

SETTINGS = (("chest_1p5mm", None), ("chest_1p5mm", 3.0), ("abdomen_3mm", 1.5), ("abdomen_3mm", None))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("-m", default=str(HERE.parents[1] / "Resources" / "Models" / "LesionLocatorDemo"),
                    help="model root or training checkpoint (written as a model root to WORKDIR/model)")
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--lesions", type=int, default=6)
    ap.add_argument("--seed", type=int, default=200, help="first synth seed (training used 0-20)")
    ap.add_argument("--name", default=None)
    a = ap.parse_args()

    from build_demo_model import read_ct
    from registry_ct import fetch_registry_cts
    from LesionLocatorLib.metrics import dice, format_table
    from LesionLocatorLib.model import load_model
    from LesionLocatorLib.predict import segment
    from LesionLocatorLib.prompts import prompts_from_labels
    from LesionLocatorLib.training.synth import make_case
    from evaluate_demo_model import model_root

    work = Path(a.work)
    root = model_root(a.m, work)
    models = {k: load_model(root, k, device="cpu") for k in ("point", "box")}
    paths = fetch_registry_cts(work / "ct_cache", sorted({ct for ct, _ in SETTINGS}))
    rows = []
    for ct_name, spacing in SETTINGS:
        ct = read_ct(Path(paths[ct_name]), spacing)
        scores = {k: [] for k in models}
        t0 = time.perf_counter()
        for c in range(a.cases):
            case = make_case(ct, n_lesions=a.lesions, n_followups=0, seed=a.seed + c,
                             diameter_range_mm=(10.0, 40.0))
            lab = case.labels[0].array
            for kind, model in models.items():
                res = segment(case.images[0], prompts_from_labels(lab, kind), model)
                scores[kind] += [dice(res.masks[i], lab == i) for i in res.masks]
        rows.append({"ct": ct_name, "spacing_mm": "native" if spacing is None else spacing,
                     "point_dice": float(np.mean(scores["point"])), "box_dice": float(np.mean(scores["box"])),
                     "lesions": len(scores["point"]), "seconds": time.perf_counter() - t0})
        print(format_table(rows[-1:]), flush=True)
    print("\nMean Dice on new synthetic lesions (centre point / tight box prompts)")
    print(format_table(rows))
    (HERE / "results").mkdir(exist_ok=True)
    path = HERE / "results" / f"domain_gap_{a.name or Path(root).name}.json"
    path.write_text(json.dumps({"model": str(a.m), "cases": a.cases, "lesions_per_case": a.lesions,
                                "seed": a.seed, "rows": rows}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
