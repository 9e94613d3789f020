"""Reproduce the shipped demo model and demo case (CPU, no downloads but PyPI).

What is built is data: ``LesionLocatorLib/training/demo_model_plan.json`` (:data:`PLAN_FILE`) names
the synthetic datasets, the chain of training runs (each starts from its ``parent``'s final network;
its ``options`` are :class:`~LesionLocatorLib.training.train.TrainOptions` fields) and which run each
model folder gets. What each run scored, and the runs that were tried and not shipped:
``Testing/benchmarks/results/ledger.csv``.

Steps (each skipped when its output exists, so an interrupted build resumes):

1. ``data``: fetch the lesion-free CTs from TotalSegmentator's sdist on PyPI
   (:mod:`registry_ct`); make the synthetic training cases of the plan's datasets with
   :func:`LesionLocatorLib.training.synth.make_case` (chest CT and upper-abdomen slab only),
   then the mixtures' folders of links (about 30 min on 2 cores).
2. ``train``: ``lesionlocator train`` for each run of the chain, phase by phase (small ResEnc
   U-Net). A run that is not finished resumes from ``WORKDIR/<run>/checkpoint_latest.pth`` or,
   with ``--state DIR``, from the copy that ``keep`` left there. From scratch the chain is about
   15.5 h of training on 2 CPU cores (run7 alone ~5.7 h; per run: the ledger's ``train_time``).
3. ``install``: copy each model folder from the run the plan's ``installed`` names to
   ``Resources/Models/LesionLocatorDemo`` (its MODEL_CARD.md stays).
4. ``democase``: a baseline and two follow-ups from the **abdomen** CT (never used for
   training) into ``Resources/Demo`` (+ ground truth, point and box prompts).

``keep`` (not run by default; needs ``--state DIR``, a folder outside the repository, e.g. on
storage that outlives the machine): copy the latest checkpoint of each run of the chain (weights,
optimizer state, epoch and learning curves, ~14 MB each) to ``DIR/<run>/checkpoint_latest.pth``;
``train`` with the same ``--state DIR`` on another machine goes on where the last one stopped (a
finished run's checkpoint is only exported, not trained again). Checkpoints are never committed.

Usage: ``python Testing/build_demo_model.py WORKDIR [--steps data train install democase keep]
[--state DIR]``; ``--dry-run`` prints the training commands without running anything.
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
PLAN_FILE = REPO / "LesionLocatorLib" / "training" / "demo_model_plan.json"
STATE: Path | None = None   # ``--state DIR``: where ``keep`` copies checkpoints and ``train`` resumes from
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

# TrainOptions field -> ``lesionlocator train`` flag (every field the plan may set)
TRAIN_FLAGS = {"epochs": "--epochs", "iterations_per_epoch": "--iterations", "batch_size": "--batch-size",
               "initial_lr": "--lr", "optimizer": "--optimizer", "seed": "--seed", "prompt_types": "--prompt-types",
               "box_jitter_mm": "--box-jitter-mm", "tight_box_prob": "--tight-box-prob",
               "vanish_prob": "--vanish-prob", "vanish_tissue_hu": "--vanish-tissue-hu",
               "vanish_fragment_prob": "--vanish-fragment-prob", "low_res_prob": "--low-res-prob",
               "intensity_augmentation": "--intensity-augmentation",
               "deep_supervision_targets": "--deep-supervision-targets", "outline_weight": "--outline-weight",
               "cpu_bf16": "--cpu-bf16"}


class PlanError(ValueError):
    """A build plan that does not hold together."""


def load_plan(path: Path = PLAN_FILE) -> dict:
    """The build plan, checked for what the steps rely on (no torch needed): every mixture part,
    phase dataset, parent and installed run exists, parents come first, and the options of each
    run and phase together set every :data:`TRAIN_FLAGS` option, nothing else, and no name twice."""
    plan = json.loads(Path(path).read_text())
    runs, outs = plan["runs"], [run["out"] for run in plan["runs"]]
    if len(set(outs)) != len(outs):
        raise PlanError(f"{path}: run names appear twice: {outs}")
    for mixture, parts in plan["mixtures"].items():
        if unknown := [d for d in parts if d not in plan["datasets"]]:
            raise PlanError(f"{path}: mixture {mixture} names unknown datasets {unknown}")
    for i, run in enumerate(runs):
        if run["parent"] is not None and run["parent"] not in outs[:i]:
            raise PlanError(f"{path}: {run['out']}'s parent {run['parent']!r} is not a run listed before it")
        for phase in run["phases"]:
            if phase["data"] not in plan["datasets"] and phase["data"] not in plan["mixtures"]:
                raise PlanError(f"{path}: {run['out']} trains on unknown data {phase['data']!r}")
            given = set(run["options"]) | set(phase["options"])
            problems = {"sets twice": set(run["options"]) & set(phase["options"]),
                        "misses": set(TRAIN_FLAGS) - given, "has unknown options": given - set(TRAIN_FLAGS)}
            if any(problems.values()):
                raise PlanError(f"{path}: {run['out']} (phase until epoch {phase['until_epoch']}) "
                                + "; ".join(f"{k} {sorted(v)}" for k, v in problems.items() if v))
    if unknown := {run for run in plan["installed"].values() if run not in outs}:
        raise PlanError(f"{path}: installed runs {sorted(unknown)} are not in the plan")
    return plan


PLAN = load_plan()


def read_ct(path: Path, spacing_mm: float | None = None):
    """A registry CT (NIfTI file or DICOM folder), optionally resampled (linear) to an isotropic
    ``spacing_mm`` grid over the same extent (e.g. the 1.5 mm chest as a 3 mm scan)."""
    import SimpleITK as sitk
    from LesionLocatorLib.image import Image, read_image
    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path)))
        image = Image.from_sitk(reader.Execute())
    else:
        image = read_image(path)
    if spacing_mm is None:
        return image
    img = image.to_sitk()
    size = [int(round(n * s / spacing_mm)) for n, s in zip(img.GetSize(), img.GetSpacing())]
    return Image.from_sitk(sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(),
                                         (spacing_mm,) * 3, img.GetDirection(), -1024, img.GetPixelID()))


def datasets_of_installed_model() -> list[str]:
    """The datasets the training runs of the installed model read (mixtures resolved)."""
    names = [phase["data"] for run in runs_of_installed_model() for phase in run["phases"]]
    return list(dict.fromkeys(part for name in names for part in PLAN["mixtures"].get(name, [name])))


def step_data(work: Path, only=None) -> None:
    """The training datasets (``only``: those names; default: those of the installed model's
    runs), then the mixtures' link folders."""
    from registry_ct import fetch_registry_cts
    from LesionLocatorLib.image import write_image
    from LesionLocatorLib.training.synth import make_case

    only = datasets_of_installed_model() if only is None else only
    datasets = {k: PLAN["datasets"][k] for k in only}
    synthetic = PLAN["synthetic_data"]
    ct_names = {dataset["ct"] for dataset in datasets.values()}
    cts = fetch_registry_cts(work / "ct_cache", sorted(ct_names | {PLAN["demo_case"]["ct"]}))
    for name_of_dataset, dataset in datasets.items():
        ct = read_ct(Path(cts[dataset["ct"]]), dataset["ct_spacing_mm"])
        n_train = dataset["cases"]
        data = work / name_of_dataset
        for seed in range(n_train + synthetic["val_cases"]):
            part = "" if seed < n_train else "val_"   # the last case(s): validation only
            name = f"{dataset['ct'].split('_')[0]}_s{seed}"   # chest_s0, abdomen_s0, ...
            if (data / f"{part}labels" / f"{name}_t{synthetic['followups']}.nii.gz").exists():
                continue
            t0 = time.perf_counter()
            case = make_case(ct, n_lesions=synthetic["lesions_per_case"], n_followups=synthetic["followups"],
                             seed=seed, diameter_range_mm=tuple(dataset["diameter_mm"]), **dataset["generator"])
            for t, (img, lab) in enumerate(zip(case.images, case.labels)):
                if lab.array.any():
                    write_image(img, data / f"{part}images" / f"{name}_t{t}.nii.gz")
                    write_image(lab, data / f"{part}labels" / f"{name}_t{t}.nii.gz")
            print(f"{name_of_dataset}/{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    for mixture, parts in PLAN["mixtures"].items():
        if not all((work / d / "images").is_dir() for d in parts):
            continue
        for dataset in parts:
            for part in ("images", "labels"):
                for f in sorted((work / dataset / part).glob("[!.]*.nii.gz")):
                    _link(f, work / mixture / part / f"{dataset.split('_', 1)[1]}_{f.name}")
        for part in ("val_images", "val_labels"):
            for f in sorted((work / parts[-1] / part).glob("[!.]*.nii.gz")):
                _link(f, work / mixture / part / f.name)


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(target.resolve())


def run_chain(runs: list[dict], out: str) -> list[dict]:
    """The runs that run ``out`` builds on, oldest first, ending with it: its ``parent``, that
    run's parent, and so on; runs outside that chain are not repeated."""
    by_out = {run["out"]: run for run in runs}
    chain = [by_out[out]]
    while chain[0]["parent"]:
        chain.insert(0, by_out[chain[0]["parent"]])
    return chain


def runs_of_installed_model(runs: list[dict] | None = None, installed: dict | None = None) -> list[dict]:
    """The runs the installed model needs (default: ``PLAN``'s), each once, in an order in which
    every run comes after the one it starts from: the chains of the runs ``installed`` names
    (model folder -> run), one after the other."""
    runs = PLAN["runs"] if runs is None else runs
    installed = PLAN["installed"] if installed is None else installed
    needed = {}
    for out in installed.values():
        for run in run_chain(runs, out):
            needed.setdefault(run["out"], run)
    return list(needed.values())


def train_flags(options: dict) -> list[str]:
    """``lesionlocator train`` flags for plan options (:data:`TRAIN_FLAGS` names), checked as a
    :class:`~LesionLocatorLib.training.train.TrainOptions` first (a bad value fails here, not hours in)."""
    from LesionLocatorLib.training.train import TrainOptions

    checked = TrainOptions(**options)
    flags = []
    for name, flag in TRAIN_FLAGS.items():
        value = getattr(checked, name)
        if isinstance(value, bool):
            flags += [flag] if value else []
        elif isinstance(value, tuple):
            flags += [flag, *value]
        elif value is None:   # box_jitter_mm None: the legacy scheme; vanish_tissue_hu None: the default
            flags += [flag, "legacy"] if name == "box_jitter_mm" else []
        else:
            flags += [flag, str(value)]
    return flags


def train_commands(work: Path, run: dict) -> list[list[str]]:
    """One ``lesionlocator train`` command per phase of ``run`` (same output folder: each resumes
    the last one's checkpoint and stops at its ``until_epoch``)."""
    out = work / run["out"]
    init = ["--init", str(work / run["parent"] / PLAN["parent_checkpoint"])] if run["parent"] else []
    commands = []
    for phase in run["phases"]:
        data = work / phase["data"]
        commands.append(
            [sys.executable, "-m", "LesionLocatorLib.cli", "train", "--images", str(data / "images"),
             "--labels", str(data / "labels"), "--val-images", str(data / "val_images"),
             "--val-labels", str(data / "val_labels"), "-o", str(out), "--device", "cpu",
             "--features", *map(str, PLAN["network"]["features"]), "--blocks", *map(str, PLAN["network"]["blocks"]),
             "--patch", *map(str, run["patch"]), "--spacing", *map(str, run["spacing"]),
             "--stop-after-epoch", str(phase["until_epoch"]),
             *train_flags({**run["options"], **phase["options"]}), *init])
    return commands


def step_train(work: Path, dry_run: bool = False) -> None:
    """The training runs the installed model needs, in order; each resumes from its
    ``checkpoint_latest.pth`` (phases of a run too; a phase already done returns at once), and a
    finished run (its model root exists) is skipped. With ``--state DIR``, a run without a
    checkpoint in ``work`` starts from the one ``keep`` left in ``DIR``."""
    for run in runs_of_installed_model():
        out = work / run["out"]
        if (out / "LesionLocatorCheckpoint").exists():
            print(f"{out}: done", flush=True)
            continue
        kept = STATE / run["out"] / "checkpoint_latest.pth" if STATE is not None else None
        if kept is not None and kept.exists() and not (out / "checkpoint_latest.pth").exists() and not dry_run:
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(kept, out / "checkpoint_latest.pth")
            print(f"{out}: resuming from the kept {kept}", flush=True)
        for cmd in train_commands(work, run):
            print(" ".join(cmd), flush=True)
            if not dry_run:
                subprocess.run(cmd, check=True, cwd=REPO)


def _state_dir() -> Path:
    """``STATE``, which must be set and lie outside the repository (checkpoints are never committed)."""
    if STATE is None:
        raise SystemExit("keep: give --state DIR, a folder outside the repository")
    state = Path(STATE).resolve()
    if state == REPO.resolve() or REPO.resolve() in state.parents:
        raise SystemExit(f"keep: --state {STATE} lies inside the repository {REPO}; checkpoints are not committed, "
                         "choose a folder outside it")
    return state


def step_keep(work: Path) -> None:
    """Copy the latest checkpoint of each run of the installed model into ``STATE`` (of a finished
    run too: resumed at its last epoch, ``train`` only exports it)."""
    state = _state_dir()
    for run in runs_of_installed_model():
        latest = work / run["out"] / "checkpoint_latest.pth"
        if not latest.exists():
            continue
        target = state / run["out"] / "checkpoint_latest.pth"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(latest, target)
        print(f"kept {target} ({target.stat().st_size / 1e6:.1f} MB)")


def step_install(work: Path) -> None:
    """Replace the installed model by the runs' that the plan's ``installed`` names, one model folder
    each (``LesionLocatorSeg/point_optimized``, ``LesionLocatorSeg/bbox_optimized``,
    ``LesionLocatorTrack``), with each run's learning curves as ``training_curves_<run>.png``;
    its ``MODEL_CARD.md`` stays (update it)."""
    target = REPO / "Resources" / "Models" / "LesionLocatorDemo"
    card = target / "MODEL_CARD.md"
    card_text = card.read_text() if card.exists() else None
    if target.exists():
        shutil.rmtree(target)
    for folder, run in PLAN["installed"].items():
        shutil.copytree(work / run / "LesionLocatorCheckpoint" / folder, target / folder)
    for run in set(PLAN["installed"].values()):
        shutil.copy(work / run / "progress.png", target / f"training_curves_{run}.png")
    if card_text is not None:
        card.write_text(card_text)
    print(f"installed {target}" + ("; its MODEL_CARD.md is kept: update it" if card_text else ""))


def step_democase(work: Path) -> None:
    from registry_ct import fetch_registry_cts
    from LesionLocatorLib.image import write_image
    from LesionLocatorLib.prompts import prompts_from_labels, write_upstream_json
    from LesionLocatorLib.training.synth import make_case

    demo = PLAN["demo_case"]
    cts = fetch_registry_cts(work / "ct_cache", [demo["ct"]])
    ct = read_ct(Path(cts[demo["ct"]]))
    # measurable lesions (RECIST >= 10 mm at the 3 mm demo resolution), solid-organ and wall lesions
    case = make_case(ct, n_lesions=demo["lesions"], n_followups=demo["followups"], seed=demo["seed"],
                     diameter_range_mm=tuple(demo["diameter_mm"]), p_vanish=demo["p_vanish"], p_new=demo["p_new"],
                     kind_weights=tuple(map(tuple, demo["kind_weights"])),
                     location_weights=tuple(map(tuple, demo["location_weights"])))
    out = REPO / "Resources" / "Demo"
    out.mkdir(parents=True, exist_ok=True)
    for t, (img, lab) in enumerate(zip(case.images, case.labels)):
        write_image(img, out / f"demo_t{t}.nii.gz")
        write_image(lab, out / f"demo_t{t}_label.nii.gz")
    write_upstream_json(prompts_from_labels(case.labels[0].array, "point"), out / "demo_points.json")
    write_upstream_json(prompts_from_labels(case.labels[0].array, "box"), out / "demo_boxes.json")
    (out / "demo_case.json").write_text(json.dumps(
        {"source_ct": demo["ct"], "seed": demo["seed"],
         "lesions": [les.to_dict() for les in case.lesions]}, indent=1, default=str))
    print(f"demo case in {out}")


STEPS = {"data": step_data, "train": step_train, "install": step_install, "democase": step_democase,
         "keep": step_keep}
DEFAULT_STEPS = ["data", "train", "install", "democase"]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", help="working folder (datasets, runs); outside the repository")
    ap.add_argument("--steps", nargs="+", default=DEFAULT_STEPS, choices=list(STEPS))
    ap.add_argument("--state", type=Path, default=None,
                    help="folder outside the repository where keep copies each run's latest checkpoint and "
                         "train resumes from (for machines that do not outlive a session)")
    ap.add_argument("--dry-run", action="store_true", help="print the training commands of the plan; run nothing")
    a = ap.parse_args()
    STATE = a.state
    if a.dry_run:
        step_train(Path(a.work), dry_run=True)
        sys.exit(0)
    for s in a.steps:
        t0 = time.perf_counter()
        STEPS[s](Path(a.work))
        print(f"step {s}: {time.perf_counter() - t0:.0f} s", flush=True)
