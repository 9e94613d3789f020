"""``lesionlocator demo``: the shipped demo case, end to end, offline.

Segments the demo baseline from its point prompts with the shipped demo model,
tracks the lesions through the follow-ups, and reports per lesion and timepoint
the Dice against the ground truth, the volume and its change. Writes the label
images, the lesion table, the growth plot and a PNG of the baseline slice
through each lesion with the ground-truth and predicted outlines.

Demo case layout (``Resources/Demo``)::

    demo_t0.nii.gz, demo_t1.nii.gz, ...              scans, in time order
    demo_t0_label.nii.gz, demo_t1_label.nii.gz, ...  ground-truth instance labels
    demo_points.json, demo_boxes.json                baseline point / box prompts (upstream format)
    demo_case.json                                   how it was made (CT, seed, lesions, volumes)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .image import read_image, write_image
from .evaluate import dice
from .report import format_table, write_table
from .prompts import read_prompt_file
from .report import baseline_figure, growth_plot

REPO = Path(__file__).resolve().parents[1]
DEMO_CASE = REPO / "Resources" / "Demo"


def demo_case_dir() -> Path:
    """The shipped demo case: ``Resources/Demo`` beside the library, which is the top of a source
    checkout and the scripted-modules folder of an installed Slicer extension alike
    (``$LESIONLOCATOR_DEMO_CASE`` overrides)."""
    import os

    env = os.environ.get("LESIONLOCATOR_DEMO_CASE")
    return Path(env).expanduser() if env else DEMO_CASE


def demo_scans(folder: Path) -> list:
    """The scans ``demo_t<N>.nii.gz`` of a demo case folder in time order (label files excluded)."""
    scans = [p for p in folder.glob("demo_t[0-9]*.nii.gz") if p.name[len("demo_t"):-len(".nii.gz")].isdigit()]
    return sorted(scans, key=lambda p: int(p.name[len("demo_t"):-len(".nii.gz")]))


def run_demo(out, model=None, case_dir=None, device: str = "auto", registration: str = "simpleitk",
             progress=None) -> list:
    """Run the demo and return the per lesion/timepoint rows (with ``dice``)."""
    from .modelfolder import ModelSpec
    from .study import track_study
    from .zoo import resolve_model

    case_dir = Path(case_dir or demo_case_dir())
    out = Path(out)
    scans = demo_scans(case_dir)
    if len(scans) < 2:
        raise FileNotFoundError(f"demo case not found or incomplete in {case_dir} (expected demo_t0.nii.gz, "
                                f"demo_t1.nii.gz, ... with _label files and demo_points.json)")
    images = [read_image(p) for p in scans]
    truths = [read_image(p.with_name(p.name.replace(".nii.gz", "_label.nii.gz"))).array for p in scans]
    prompts = read_prompt_file(case_dir / "demo_points.json")
    spec = ModelSpec(str(resolve_model(model)), device=device)
    names = [p.name[: -len(".nii.gz")] for p in scans]
    t0 = time.perf_counter()
    result = track_study(images, prompts, spec, names=names, registration=registration, progress=progress)
    for t, name in enumerate(names):
        write_image(result.labels[t], out / f"{name}_lesions.nii.gz")
    rows = result.rows
    for r in rows:
        t, pid = r["index"], r["lesion_id"]
        r["dice"] = dice(result.masks[t].get(pid, np.zeros(images[t].shape, bool)), truths[t] == pid)
        r["true_volume_ml"] = float((truths[t] == pid).sum() * np.prod(images[t].spacing) / 1000)
    write_table(rows, out / "lesions")
    baseline_figure(images[0], truths[0], result.masks[0], out / "baseline_lesions.png")
    growth_plot(rows, out / "growth.png")
    seconds = time.perf_counter() - t0
    shown = [{k: r[k] for k in ("lesion_id", "timepoint", "status", "dice", "volume_ml", "true_volume_ml",
                                "volume_change_vs_baseline_pct")} for r in rows]
    print(format_table(shown, digits=2))
    mean = np.mean([r["dice"] for r in rows if r["true_volume_ml"] > 0])
    print(f"\nmean Dice over lesions present in the ground truth: {mean:.3f}  ({seconds:.0f} s, "
          f"stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()) + ")")
    print(f"outputs in {out}: *_lesions.nii.gz, lesions.csv/json, growth.png, baseline_lesions.png", file=sys.stderr)
    return rows
