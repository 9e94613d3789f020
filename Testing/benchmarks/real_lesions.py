"""Segment real lesions: the lung tumours of pyradiomics' test CTs, with their own labels.

Every model of the demo build is trained on synthetic lesions only; this is the check on real
ones (``registry_ct.REAL_LESION_CTS``: a 1.4 ml lung nodule and a 48 ml lung tumour, 0.6 x 0.6 x
5 mm CTs, never used for training). Per CT and model: the point prompt at the lesion's centre
voxel, ``--offcentre`` point prompts at random voxels inside the lesion (seeded), and the
lesion's bounding box; Dice against the label, predicted vs true volume (ml) and seconds per
prompt. Several ``-m`` models are compared in the same run (e.g. the previous one as the
reference). Prints a table and writes ``results/real_lesions_<name>.json``.

Usage: python Testing/benchmarks/real_lesions.py WORKDIR -m MODEL [-m MODEL ...] [--offcentre 5]
       [--name NAME]   (MODEL: a model root, or a training checkpoint ``.pth``)
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


def real_lesion_rows(model_path: str, work: Path, offcentre: int, seed: int = 0) -> list:
    """One row per CT and prompt kind for the model at ``model_path`` (Dice, volumes in ml, s)."""
    from registry_ct import REAL_LESION_CTS
    from evaluate_demo_model import evaluation_cts, model_root
    from LesionLocatorLib.metrics import dice, lesion_volume_ml
    from LesionLocatorLib.model import load_model
    from LesionLocatorLib.predict import segment
    from LesionLocatorLib.prompts import VoxelPrompt, prompts_from_labels

    root = model_root(model_path, work / Path(model_path).stem)
    models = {k: load_model(root, k, device="cpu") for k in ("point", "box")}
    names = list(REAL_LESION_CTS)
    rows = []
    for name, (image, truth) in zip(names, evaluation_cts(work, names)):
        rng = np.random.default_rng(seed)
        inside = np.argwhere(truth)
        prompts = {"point (centre)": [prompts_from_labels(truth.astype(np.uint8), "point")],
                   "point (off-centre)": [[VoxelPrompt(1, "point",
                                                       list(inside[rng.integers(len(inside))].astype(float)))]
                                          for _ in range(offcentre)],
                   "box": [prompts_from_labels(truth.astype(np.uint8), "box")]}
        true_ml = lesion_volume_ml(truth, image.spacing_zyx)
        for kind, trials in prompts.items():
            dices, volumes, seconds = [], [], []
            for prompt in trials:
                t0 = time.perf_counter()
                result = segment(image, prompt, models["box" if kind == "box" else "point"])
                seconds.append(time.perf_counter() - t0)
                dices.append(dice(result.masks[1], truth))
                volumes.append(lesion_volume_ml(result.masks[1], image.spacing_zyx))
            rows.append({"model": model_path, "ct": name, "prompt": kind, "trials": len(trials),
                         "dice": float(np.mean(dices)), "dice_min": float(np.min(dices)),
                         "true_ml": true_ml, "pred_ml": float(np.mean(volumes)),
                         "s_per_prompt": float(np.mean(seconds))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("-m", action="append", required=True, help="model root or training checkpoint; repeat to compare")
    ap.add_argument("--offcentre", type=int, default=5, help="random inside-lesion point prompts per lesion")
    ap.add_argument("--name", default="models")
    a = ap.parse_args()
    from LesionLocatorLib.metrics import format_table

    work = Path(a.work)
    rows = [r for m in a.m for r in real_lesion_rows(m, work, a.offcentre)]
    print(format_table([{k: (Path(v).parent.name + "/" + Path(v).name if k == "model" else v) for k, v in r.items()}
                        for r in rows]))
    (HERE / "results").mkdir(exist_ok=True)
    out = HERE / "results" / f"real_lesions_{a.name}.json"
    out.write_text(json.dumps({"models": a.m, "rows": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
