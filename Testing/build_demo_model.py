"""Reproduce the shipped demo model and demo case (CPU, no downloads but PyPI).

Steps (each skipped when its output exists, so an interrupted run resumes):

1. ``data``: fetch the lesion-free CTs from TotalSegmentator's sdist on PyPI
   (:mod:`registry_ct`); make synthetic training cases with
   :func:`LesionLocatorLib.synth.make_case` from the **chest** CT only.
2. ``train``: ``lesionlocator train`` (small ResEnc U-Net, see PLAN below).
3. ``install``: copy the trained model root to ``Resources/Models/LesionLocatorDemo``.
4. ``democase``: a baseline and two follow-ups from the **abdomen** CT (never
   used for training) into ``Resources/Demo`` (+ ground truth, point prompts).

Usage: ``python Testing/build_demo_model.py WORKDIR [--steps data train install democase]``
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

PLAN = {
    "features": [16, 32, 64, 96], "blocks": [1, 2, 2, 2], "patch": [48, 64, 64], "spacing": [2.0, 1.5, 1.5],
    "epochs": 75, "iterations": 100, "batch_size": 2, "seed": 0,
    "train_ct": "chest_1p5mm", "train_cases": 20, "val_cases": 1, "lesions_per_case": 8, "followups": 2,
    # two data phases of one run (the learning-rate schedule spans all epochs): lesions of every
    # size first, then measurable ones (>= 10 mm, as RECIST), which the first phase under-segmented
    # then the same with half of the samples made to look like coarser scans (the 1.5 mm training
    # CT alone left the model blind on 3 mm scans such as the demo case's)
    "phases": [{"data": "data_4to50mm", "diameter_mm": [4.0, 50.0], "until_epoch": 29, "low_res_prob": 0.0},
               {"data": "data_10to50mm", "diameter_mm": [10.0, 50.0], "until_epoch": 52, "low_res_prob": 0.0},
               {"data": "data_10to50mm", "diameter_mm": [10.0, 50.0], "until_epoch": 75, "low_res_prob": 0.5}],
    "demo_ct": "abdomen_3mm", "demo_seed": 2026, "demo_lesions": 4, "demo_diameter_mm": [20.0, 45.0],
    # demo lesions: measurable (RECIST >= 10 mm at the 3 mm demo resolution), solid-organ and wall lesions
    "demo_kinds": [["ellipsoid", 0.5], ["lobulated", 0.5]], "demo_locations": [["soft_tissue", 0.7], ["wall", 0.3]],
}


def read_ct(path: Path):
    from LesionLocatorLib.image import Image, read_image
    if path.is_dir():
        import SimpleITK as sitk
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        return Image.from_sitk(reader.Execute())
    return read_image(path)


def step_data(work: Path) -> None:
    from registry_ct import fetch_registry_cts
    from LesionLocatorLib.image import write_image
    from LesionLocatorLib.synth import make_case

    cts = fetch_registry_cts(work / "ct_cache", [PLAN["train_ct"], PLAN["demo_ct"]])
    ct = read_ct(Path(cts[PLAN["train_ct"]]))
    for phase in {p["data"]: p for p in PLAN["phases"]}.values():
        data = work / phase["data"]
        for seed in range(PLAN["train_cases"] + PLAN["val_cases"]):
            part = "" if seed < PLAN["train_cases"] else "val_"   # the last case(s): validation only
            name = f"chest_s{seed}"
            if (data / f"{part}labels" / f"{name}_t{PLAN['followups']}.nii.gz").exists():
                continue
            t0 = time.perf_counter()
            case = make_case(ct, n_lesions=PLAN["lesions_per_case"], n_followups=PLAN["followups"], seed=seed,
                             diameter_range_mm=tuple(phase["diameter_mm"]))
            for t, (img, lab) in enumerate(zip(case.images, case.labels)):
                if lab.array.any():
                    write_image(img, data / f"{part}images" / f"{name}_t{t}.nii.gz")
                    write_image(lab, data / f"{part}labels" / f"{name}_t{t}.nii.gz")
            print(f"{phase['data']}/{name}: {time.perf_counter() - t0:.0f} s", flush=True)


def step_train(work: Path) -> None:
    """One training run (resumed between phases from ``run/checkpoint_latest.pth``)."""
    for phase in PLAN["phases"]:
        data = work / phase["data"]
        cmd = [sys.executable, "-m", "LesionLocatorLib.cli", "train", "--images", str(data / "images"),
               "--labels", str(data / "labels"), "--val-images", str(data / "val_images"),
               "--val-labels", str(data / "val_labels"), "-o", str(work / "run"), "--device", "cpu",
               "--features", *map(str, PLAN["features"]), "--blocks", *map(str, PLAN["blocks"]),
               "--patch", *map(str, PLAN["patch"]), "--spacing", *map(str, PLAN["spacing"]),
               "--epochs", str(PLAN["epochs"]), "--stop-after-epoch", str(phase["until_epoch"]),
               "--iterations", str(PLAN["iterations"]), "--batch-size", str(PLAN["batch_size"]),
               "--seed", str(PLAN["seed"]), "--low-res-prob", str(phase["low_res_prob"])]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=REPO)


def step_install(work: Path) -> None:
    target = REPO / "Resources" / "Models" / "LesionLocatorDemo"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(work / "run" / "LesionLocatorCheckpoint", target)
    shutil.copy(work / "run" / "progress.png", target / "training_curves.png")
    print(f"installed {target}")


def step_democase(work: Path) -> None:
    from registry_ct import fetch_registry_cts
    from LesionLocatorLib.image import write_image
    from LesionLocatorLib.prompts import prompts_from_labels, write_upstream_json
    from LesionLocatorLib.synth import make_case

    cts = fetch_registry_cts(work / "ct_cache", [PLAN["demo_ct"]])
    ct = read_ct(Path(cts[PLAN["demo_ct"]]))
    case = make_case(ct, n_lesions=PLAN["demo_lesions"], n_followups=2, seed=PLAN["demo_seed"],
                     diameter_range_mm=tuple(PLAN["demo_diameter_mm"]), p_vanish=0.0, p_new=0.0,
                     kind_weights=tuple(map(tuple, PLAN["demo_kinds"])),
                     location_weights=tuple(map(tuple, PLAN["demo_locations"])))
    out = REPO / "Resources" / "Demo"
    out.mkdir(parents=True, exist_ok=True)
    for t, (img, lab) in enumerate(zip(case.images, case.labels)):
        write_image(img, out / f"demo_t{t}.nii.gz")
        write_image(lab, out / f"demo_t{t}_label.nii.gz")
    write_upstream_json(prompts_from_labels(case.labels[0].array, "point"), out / "demo_points.json")
    write_upstream_json(prompts_from_labels(case.labels[0].array, "box"), out / "demo_boxes.json")
    (out / "demo_case.json").write_text(json.dumps(
        {"source_ct": PLAN["demo_ct"], "seed": PLAN["demo_seed"],
         "lesions": [les.to_dict() for les in case.lesions]}, indent=1, default=str))
    print(f"demo case in {out}")


STEPS = {"data": step_data, "train": step_train, "install": step_install, "democase": step_democase}

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work")
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS))
    a = ap.parse_args()
    for s in a.steps:
        t0 = time.perf_counter()
        STEPS[s](Path(a.work))
        print(f"step {s}: {time.perf_counter() - t0:.0f} s", flush=True)
