"""What a user gives the command line, checked before any work starts (no torch, no network).

The order is the one a user can act on: options, paths, the output folder, images (headers only),
prompt files (schema, IDs, units, frame) and their kind against ``-t``, the model folder (layout
and plans.json's allow-list). Each check raises one clear error naming the input: a
:class:`UsageError` for command lines that cannot run, ``FileNotFoundError``, the library's
``ImageError``, ``PromptError`` and ``ModelLayoutError``. Only then do the commands import torch
and load a model, so a mistake is reported within a second.

Case names: an image ``<case>.nii.gz`` (or .nii, .nrrd, .mha, .mhd) pairs with a prompt file
``<case>.json`` or label image ``<case>.<ending>``; a ``_label`` suffix on a prompt's name is
also accepted (``lesionlocator synth`` writes ``<case>_label.nii.gz`` beside ``<case>.nii.gz``).
A folder of DICOM files is one scan (:mod:`LesionLocatorLib.dicomseries`) named after the folder;
its NIfTI outputs end in ``.nii.gz``.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
LABEL_SUFFIX = "_label"
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class UsageError(ValueError):
    """A command line that cannot be run (mismatched inputs, missing files, a bad option value)."""


# --------------------------------------------------------------------------- option values
def folds_value(text: str):
    """A fold: a non-negative integer or 'all' (argparse type of ``-f``)."""
    if str(text).lower() == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a fold is a number such as 0 or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a fold is a number >= 0, got {text}")
    return value


def device_value(text: str) -> str:
    """A device name: auto, cpu, cuda, cuda:N or mps (argparse type; whether it exists is checked when the
    model loads)."""
    name = str(text).strip().lower()
    if not DEVICE_PATTERN.match(name):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}: use auto, cpu, cuda, cuda:N or mps")
    return name


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative(text: str) -> float:
    """A finite number >= 0 (argparse type)."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """A share: a number in [0, 1] (argparse type)."""
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def step_fraction(text: str) -> float:
    """A sliding-window step as a fraction of the patch: in (0, 1] (argparse type)."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 1, got {text}")
    return value


# --------------------------------------------------------------------------- names and paths
def image_ending(name: str) -> str | None:
    return next((e for e in IMAGE_ENDINGS if name.endswith(e)), None)


def case_name(name: str) -> str:
    """A file name without its image or .json ending."""
    for e in IMAGE_ENDINGS + (".json",):
        if name.endswith(e):
            return name[: -len(e)]
    return name


def is_dicom_input(path) -> bool:
    """True for a folder of DICOM files (one scan: a DICOM series)."""
    path = Path(path)
    if not path.is_dir():
        return False
    from .dicomseries import is_dicom_folder

    return is_dicom_folder(path)


def scan_name(path) -> str:
    """The case name of a scan: an image file's name without its ending, a DICOM folder's name."""
    path = Path(path)
    return path.name if path.is_dir() else case_name(path.name)


def scan_ending(path) -> str:
    """The ending of a scan's image outputs: the input's own (.nii.gz, .nrrd, ...), .nii.gz for DICOM."""
    return image_ending(Path(path).name) or ".nii.gz"


def unique_names(names) -> list:
    """Case names made unique for one output folder: a name that occurs more than once (two scans
    in folders named alike, e.g. .../2024/CT and .../2025/CT) gets ``_t<index>`` (its position)."""
    names = list(names)
    return [f"{n}_t{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def check_dicom_out(folder, scans, series=()):
    """The ``--dicom-out`` folder (not created yet), or None without one. DICOM SEG and SR must
    reference the scans' own DICOM instances, patient and study, so every scan must be a DICOM
    series with its UIDs: no patient, study or UID is ever made up (``series``: the ``--series``
    UIDs)."""
    if folder is None:
        return None
    others = [str(p) for p in scans if not is_dicom_input(p)]
    if others:
        raise UsageError(f"--dicom-out needs DICOM series as input (SEG and SR reference the scans' DICOM "
                         f"instances, patient and study); not DICOM: {', '.join(others)}")
    from .dicomresults import check_references
    from .dicomseries import read_series_header

    for scan in scans:
        try:
            check_references(read_series_header(scan, series))
        except ValueError as e:
            raise UsageError(f"{e} (run without --dicom-out for the other outputs)") from None
    return check_output_folder(folder)


def list_images(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_file() and image_ending(p.name) and not p.name.startswith("."))


def pair_inputs(image_arg: str, prompt_arg: str) -> list:
    """(image path, prompt path) pairs: one file each, or two folders matched by case name (a
    prompt ``<case>_label.*`` matches image ``<case>.*``; label images beside the images, named
    ``*_label.*``, are not cases themselves)."""
    img, prm = Path(image_arg), Path(prompt_arg)
    if not img.exists():
        raise FileNotFoundError(f"input not found: {img}")
    if not prm.exists():
        raise FileNotFoundError(f"prompt not found: {prm}")
    if img.is_file() or (not list_images(img) and is_dicom_input(img)):
        if prm.is_dir():
            raise UsageError(f"if -i is {'a file' if img.is_file() else 'a DICOM series folder'} then -p must be a "
                             f"file too, not a folder")
        return [(img, prm)]
    images = {case_name(p.name): p for p in list_images(img) if not case_name(p.name).endswith(LABEL_SUFFIX)}
    if not images:
        raise UsageError(f"no images ({', '.join(IMAGE_ENDINGS)}) or DICOM files in {img}")
    if not prm.is_dir():
        raise UsageError("if -i is a folder then -p must be a folder of prompts named like the images")
    same_folder = img.resolve() == prm.resolve()
    prompts = {}
    for p in sorted(prm.iterdir()):
        if not p.is_file() or p.name.startswith(".") or not (image_ending(p.name) or p.name.endswith(".json")):
            continue
        name = case_name(p.name)
        if same_folder and images.get(name) == p:
            continue  # the image itself, not a prompt
        base = name[: -len(LABEL_SUFFIX)] if name.endswith(LABEL_SUFFIX) else None
        key = base if base in images else name
        if key in prompts:
            raise UsageError(f"two prompt files for case {key!r} in {prm}: {prompts[key].name} and {p.name}")
        prompts[key] = p
    orphans = sorted(set(prompts) - set(images))
    if same_folder:  # other files beside the scans (e.g. synth's <case>.json): every scan still needs its prompt
        orphans = []
    if orphans:
        raise UsageError(f"prompt file(s) with no image of the same name in {img}: "
                         + ", ".join(prompts[o].name for o in orphans))
    missing = sorted(set(images) - set(prompts))
    if missing:
        raise UsageError(f"image(s) with no prompt file of the same name in {prm}: "
                         + ", ".join(images[m].name for m in missing))
    return [(images[k], prompts[k]) for k in sorted(images)]


def check_output_folder(path) -> Path:
    """The output folder, not created yet: an existing folder must be writable; a new one must be
    creatable (no file in its way, the nearest existing parent a writable folder)."""
    out = Path(path).expanduser()
    if out.exists():
        if not out.is_dir():
            raise UsageError(f"the output folder {out} is a file")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"the output folder {out} is not writable")
        return out
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"cannot create the output folder {out}: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create the output folder {out}: {parent} is not writable")
    return out


# --------------------------------------------------------------------------- images and prompts
def check_images(paths, series=()) -> dict:
    """{path: header} of image files and DICOM series folders, read and checked from their headers
    only (see :func:`LesionLocatorLib.image.read_image_header`; ``series``: the ``--series`` UIDs
    that choose a series in a folder holding several)."""
    from .image import read_image_header

    return {Path(p): read_image_header(p, series) for p in paths}


def read_prompts(path: Path, prompt_type: str, world: bool, allow_many: bool = False):
    """The prompts of one file for ``-t prompt_type`` ('point' or 'box'): a prompt JSON (checked:
    schema, IDs, units, frame, and that its prompts are of that kind) or a label image (points =
    centres of mass, boxes = bounding boxes of its lesions)."""
    from .prompts import check_prompt_count, check_prompt_kind, prompts_from_labels, read_prompt_file

    path = Path(path)
    if path.name.endswith(".json"):
        prompts = read_prompt_file(path, world=world or None)
        check_prompt_kind(prompts, prompt_type, str(path))
    else:
        import numpy as np

        from .image import read_image

        labels = read_image(path).array
        label_type = "semantic" if set(np.unique(labels)) <= {0, 1} else "instance"
        prompts = prompts_from_labels(labels, prompt_type, label_type)
    check_prompt_count(len(prompts), allow_many, str(path))
    return prompts


def check_backend(backend: str, device: str) -> None:
    """``--backend`` against ``--device`` and the installed packages (no torch, no import of openvino)."""
    if backend == "torch":
        return
    import importlib.util

    if device not in ("auto", "cpu"):
        raise UsageError(f"--backend {backend} runs on the CPU; use --device cpu (or the torch backend on {device})")
    if importlib.util.find_spec("openvino") is None:
        raise UsageError(f"--backend {backend} needs the 'openvino' package: pip install openvino")


def check_model(model_arg, prompt_types) -> Path:
    """The model root for ``-m`` (a folder or a downloaded model's name; default the bundled demo
    model), checked for the folders ``prompt_types`` need ('point', 'box', 'prev_mask'), their
    plans.json against the architecture allow-list and their checkpoints' presence: no torch."""
    from .modelfolder import find_model_folder, read_model_json
    from .plans import check_supported_preprocessing, resolve_configuration
    from .zoo import resolve_model

    root = resolve_model(model_arg)
    for prompt_type in prompt_types:
        folder = find_model_folder(root, prompt_type)
        plans, _ = read_model_json(folder)
        for name in plans["configurations"]:
            where = f"{folder / 'plans.json'} ({name})"
            check_supported_preprocessing(resolve_configuration(plans, name, where), where)
    return root
