"""Model folders in the official LesionLocator / nnU-Net v2 layout, checked as data (no torch).

Official layout (``LesionLocatorCheckpoint`` is the *model root*)::

    LesionLocatorCheckpoint/
      LesionLocatorSeg/point_optimized/{plans.json, dataset.json, fold_N/checkpoint_final.pth}
      LesionLocatorSeg/bbox_optimized/{...}
      LesionLocatorTrack/{plans.json, dataset.json, fold_N/checkpoint_final.pth}

Everything here reads JSON and file names only, so front ends can check a model folder
before importing torch; :mod:`LesionLocatorLib.model` loads the networks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .plans import ModelLayoutError, check_plans, input_channels, segmentation_heads


SEG_SUBFOLDERS = {"point": "point_optimized", "box": "bbox_optimized"}


CHECKPOINT_NAME = "checkpoint_final.pth"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, corrupt or not plain data."""


EXPECTED_LAYOUT = (
    "expected a LesionLocator model root such as 'LesionLocatorCheckpoint/' holding\n"
    "  LesionLocatorSeg/point_optimized/{plans.json, dataset.json, fold_0/checkpoint_final.pth, ...}\n"
    "  LesionLocatorSeg/bbox_optimized/{plans.json, dataset.json, fold_0/checkpoint_final.pth, ...}\n"
    "  LesionLocatorTrack/{plans.json, dataset.json, fold_0/checkpoint_final.pth, ...} (for tracking)\n"
    "or a single trained-model folder with plans.json, dataset.json and fold_N/checkpoint_final.pth")


def _is_model_folder(path: Path) -> bool:
    return (path / "plans.json").is_file() and (path / "dataset.json").is_file() and any(
        (f / CHECKPOINT_NAME).is_file() for f in path.glob("fold_*"))


def read_model_json(folder: Path) -> tuple:
    """(plans, dataset_json) of a trained-model folder, both checked as data: every configuration
    of plans.json against the architecture allow-list (:func:`LesionLocatorLib.plans.check_plans`,
    raising :class:`PlansError`), and dataset.json's labels and channels."""
    texts = {}
    for name in ("plans.json", "dataset.json"):
        try:
            texts[name] = json.loads((folder / name).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLayoutError(f"{folder / name} is not valid JSON ({e})") from None
        if not isinstance(texts[name], dict):
            raise ModelLayoutError(f"{folder / name} must hold a JSON object")
    check_plans(texts["plans.json"], str(folder / "plans.json"))
    segmentation_heads(texts["dataset.json"], str(folder / "dataset.json"))
    input_channels(texts["dataset.json"], str(folder / "dataset.json"))
    return texts["plans.json"], texts["dataset.json"]


def check_model_root(path) -> None:
    """Raise :class:`ModelLayoutError` unless ``path`` is an official-layout model root
    (at least one of the segmentation models present, each complete, each plans.json within the
    architecture allow-list: :class:`PlansError`, a subclass)."""
    root = Path(path)
    if not root.is_dir():
        raise ModelLayoutError(f"model folder not found: {root}\n{EXPECTED_LAYOUT}")
    if (root / "LesionLocatorCheckpoint").is_dir():
        root = root / "LesionLocatorCheckpoint"
    seg = [root / "LesionLocatorSeg" / s for s in SEG_SUBFOLDERS.values()]
    present = [s for s in seg if s.exists()]
    if not present:
        raise ModelLayoutError(f"{root} has no LesionLocatorSeg/point_optimized or bbox_optimized\n{EXPECTED_LAYOUT}")
    for folder in present + ([root / "LesionLocatorTrack"] if (root / "LesionLocatorTrack").exists() else []):
        if not _is_model_folder(folder):
            raise ModelLayoutError(f"{folder} is incomplete (needs plans.json, dataset.json and "
                                   f"fold_N/{CHECKPOINT_NAME})\n{EXPECTED_LAYOUT}")
        read_model_json(folder)


def find_model_folder(path, prompt_type: str) -> Path:
    """The trained-model folder for a prompt type ('point', 'box', 'prev_mask').

    ``path`` may be a model root, its parent, or a trained-model folder itself.
    """
    p = Path(path)
    if _is_model_folder(p):
        return p
    if (p / "LesionLocatorCheckpoint").is_dir():
        p = p / "LesionLocatorCheckpoint"
    if prompt_type == "prev_mask":
        candidate = p / "LesionLocatorTrack"
    elif prompt_type in SEG_SUBFOLDERS:
        candidate = p / "LesionLocatorSeg" / SEG_SUBFOLDERS[prompt_type]
    else:
        raise ValueError(f"prompt type must be one of point, box, prev_mask; got {prompt_type!r}")
    if not _is_model_folder(candidate):
        if not p.exists():
            raise ModelLayoutError(f"model folder not found: {p}\n{EXPECTED_LAYOUT}")
        raise ModelLayoutError(f"no '{prompt_type}' model in {p}: {candidate} is missing or incomplete\n"
                               f"{EXPECTED_LAYOUT}")
    return candidate


def available_folds(folder: Path) -> list:
    folds = []
    for f in sorted(folder.glob("fold_*")):
        suffix = f.name[len("fold_"):]
        if (f / CHECKPOINT_NAME).is_file():
            folds.append(suffix if suffix == "all" else int(suffix))
    return sorted(folds, key=str)


BACKENDS = ("torch", "openvino", "openvino-bf16")
"""Inference runtimes of :func:`LesionLocatorLib.model.load_model` (``backend``)."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to run: a model root (``LesionLocatorCheckpoint`` or a trained-model
    folder), folds (None = all present), device ('auto', 'cpu', 'cuda', 'cuda:N', 'mps')
    and mirroring test-time augmentation (None = on for GPU, off for CPU); ``backend``: 'torch',
    or on the CPU 'openvino' / 'openvino-bf16' (:func:`LesionLocatorLib.model.load_model`).

    The point model runs point prompts, the box model box prompts, the root's
    ``LesionLocatorTrack`` model (prompt type 'prev_mask') mask prompts.
    """
    path: str
    folds: Optional[tuple] = None
    device: str = "auto"
    tta: Optional[bool] = None
    backend: str = "torch"

    def to_json(self) -> dict:
        return {"path": self.path, "folds": list(self.folds) if self.folds is not None else None,
                "device": self.device, "tta": self.tta, "backend": self.backend}
