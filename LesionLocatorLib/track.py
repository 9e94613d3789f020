"""Autoregressive lesion tracking through follow-up scans.

For timepoints t = 1..N (in the order given): register scan t (fixed) to scan
t-1 (moving) once, warp every lesion's mask from t-1 onto scan t, and segment
all lesions of scan t in one batch with the warped masks as prompts. The new
masks become the prompts for t+1. Lesion identity is the prompt ID throughout.

Each lesion gets a status per timepoint:

* ``tracked``: a non-empty mask was predicted;
* ``vanished``: the network predicted nothing at the warped location (the mask is
  empty: never a guess), or less than ``min_volume_ml`` or ``min_prompt_fraction`` of its
  prompt (then the mask is emptied); the warped location keeps being followed, so a lesion
  that comes back is found again;
* ``outside``: the warped lesion lies outside the scan's field of view.

Images are :class:`~LesionLocatorLib.image.Image` (arrays (z, y, x), LPS world).
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from .image import Image
from .measure import lesion_volume_ml
from .predict import CancelToken, instance_labels, segment
from .prompts import MaskPrompt, PromptError

STATUSES = ("tracked", "vanished", "outside")


@dataclass
class TrackResult:
    """``masks[t][id]``: bool (z, y, x) on scan t; ``labels[t]``: instance label Image;
    ``status[id][t]``: one of STATUSES; ``transforms[t-1]``: registration of scan t
    (fixed) to scan t-1 (moving); ``timings``: seconds per stage."""
    masks: list
    labels: list
    status: dict
    transforms: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    @property
    def lesion_ids(self) -> list:
        return sorted(self.status)


def _baseline_masks(image: Image, prompts, seg_model, progress, cancel, timings) -> tuple:
    """Baseline ({id: bool array}, label Image) from a label Image, MaskPrompts, or point/box prompts."""
    if isinstance(prompts, Image):
        if not prompts.same_geometry(image):
            raise PromptError("the baseline label image does not have the baseline scan's geometry "
                              "(size, spacing, origin and direction must match)")
        ids = [int(i) for i in np.unique(prompts.array) if i > 0]
        if not ids:
            raise PromptError("the baseline mask is empty: there is no lesion to track")
        return {i: prompts.array == i for i in ids}, prompts.with_array(np.asarray(prompts.array, np.uint16))
    prompts = list(prompts)
    if not prompts:
        raise PromptError("no baseline prompts given")
    if all(isinstance(p, MaskPrompt) for p in prompts):
        masks = {}
        for p in prompts:
            m = p.mask.array > 0 if p.mask.same_geometry(image) else None
            if m is None:
                raise PromptError(f"lesion {p.id}: the baseline mask does not have the baseline scan's geometry")
            if not m.any():
                raise PromptError(f"lesion {p.id}: the baseline mask is empty")
            masks[p.id] = m
        _warn_overlaps(masks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            labels = instance_labels(masks, {pid: m.astype(np.float32) for pid, m in masks.items()}, image)[0]
        return masks, labels
    if seg_model is None:
        raise ValueError("point/box baseline prompts need a segmentation model (seg_model)")
    t0 = time.perf_counter()
    result = segment(image, prompts, seg_model, progress=progress, cancel=cancel)
    timings["baseline segmentation"] = time.perf_counter() - t0
    return result.masks, result.labels


def _warn_overlaps(masks: dict) -> None:
    ids = sorted(masks)
    pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:] if np.any(masks[a] & masks[b])]
    if pairs:
        warnings.warn(f"baseline lesions overlap: {pairs}; each is tracked with its own mask", stacklevel=3)


def _ball_mask(reference: Image, centre_zyx, radius_mm: float) -> np.ndarray:
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in reference.shape)]
    sz, sy, sx = reference.spacing_zyx
    d2 = ((zz - centre_zyx[0]) * sz) ** 2 + ((yy - centre_zyx[1]) * sy) ** 2 + ((xx - centre_zyx[2]) * sx) ** 2
    return d2 <= radius_mm ** 2


def warp_prompt(mask: np.ndarray, moving: Image, fixed: Image, transform) -> np.ndarray | None:
    """Warp a lesion mask from scan ``moving`` onto scan ``fixed``; None if it leaves the field of view.

    Linear interpolation + threshold 0.5; a lesion that thins out to nothing keeps
    its mapped centre and equivalent-sphere radius (deterministic, from the transform).
    """
    warped = transform.warp_mask(moving.with_array(mask.astype(np.uint8)), fixed, linear=True, threshold=0.5)
    warped = np.asarray(warped.array) > 0
    if warped.any():
        return warped
    centre = moving.index_to_world(ndimage.center_of_mass(mask))
    mapped = transform.map_points(np.asarray([centre]))[0]
    index = fixed.world_to_index(mapped)
    if not fixed.contains_index(index):
        return None
    volume = mask.sum() * np.prod(moving.spacing)
    radius = max((3 * volume / (4 * np.pi)) ** (1 / 3), max(fixed.spacing))
    ball = _ball_mask(fixed, index, radius)
    return ball if ball.any() else None


def _below_minimum(mask: np.ndarray, prompt: np.ndarray, spacing_zyx, min_volume_ml: float,
                   min_prompt_fraction: float) -> bool:
    """Whether a follow-up ``mask`` is non-empty and a speck (< ``min_volume_ml`` millilitres, voxel
    size ``spacing_zyx`` in mm) or a remnant (fewer voxels than ``min_prompt_fraction`` times its
    ``prompt``'s, both on the follow-up grid). Counts no voxel when both thresholds are 0 (the
    default): full-volume counts per lesion and scan are not free."""
    if not (min_volume_ml or min_prompt_fraction) or not mask.any():
        return False
    return (lesion_volume_ml(mask, spacing_zyx) < min_volume_ml
            or np.count_nonzero(mask) < min_prompt_fraction * np.count_nonzero(prompt))


def track(images, prompts, track_model, seg_model=None, registration: str = "simpleitk",
          registration_options: dict | None = None, progress=None, cancel: CancelToken | None = None,
          min_volume_ml: float = 0.0, min_prompt_fraction: float = 0.0) -> TrackResult:
    """Track lesions from ``images[0]`` (baseline) through ``images[1:]`` in the given order.

    ``prompts``: a baseline instance label Image, MaskPrompts, or Point/Box prompts
    (then ``seg_model`` segments the baseline first). ``track_model``: a model that
    takes previous-mask prompts (LesionLocatorTrack, or any segmentation model).
    ``registration``: backend name of :func:`LesionLocatorLib.register.register`
    (``unigradicon`` gets ``track_model`` as its ``model`` option: the registration
    network is inside the Track checkpoint).
    ``min_volume_ml``: a follow-up mask smaller than this (millilitres, in the follow-up's
    voxel volume) is a speck, not the lesion: it is emptied and the lesion is ``vanished``
    (its warped previous mask stays the prompt for the next scan). 0 keeps every non-empty
    mask. The baseline is never thresholded.
    ``min_prompt_fraction``: the same for a follow-up mask smaller than this fraction of its
    prompt (the warped previous mask, voxels counted on the follow-up's grid): a lesion that has
    gone leaves a remnant of the size of a vessel or a partial-volume rim inside its old outline,
    while a shrinking one keeps most of it between two scans. 0 (default) keeps every non-empty
    mask; 0.1 also empties a lesion that really shrank by more than 90 % of its volume between
    two consecutive scans.
    """
    for name, value in (("min_volume_ml", min_volume_ml), ("min_prompt_fraction", min_prompt_fraction)):
        if not value >= 0:   # NaN too: it would switch the option off silently
            raise ValueError(f"{name} must be >= 0, got {value}")
    from .register import register

    images = list(images)
    if len(images) < 2:
        raise ValueError("tracking needs a baseline and at least one follow-up scan")
    report = progress or (lambda f, m: None)
    n_steps = len(images)
    timings = {"registration": 0.0, "warping": 0.0, "preprocessing": 0.0, "network": 0.0, "postprocessing": 0.0}
    baseline, baseline_labels = _baseline_masks(images[0], prompts, seg_model,
                                                lambda f, m: report(f / n_steps, f"baseline: {m}"), cancel, timings)
    masks, labels = [baseline], [baseline_labels]
    status = {pid: ["tracked" if m.any() else "vanished"] for pid, m in baseline.items()}
    carried = {pid: m for pid, m in baseline.items() if m.any()}  # last known location per lesion
    transforms = []
    options = dict(registration_options or {})
    if registration == "unigradicon":
        options.setdefault("model", track_model)
    for t in range(1, len(images)):
        if cancel is not None:
            cancel.check()
        fixed, moving = images[t], images[t - 1]
        report(t / n_steps, f"registering scan {t} to scan {t - 1}")
        t0 = time.perf_counter()
        transform = register(fixed, moving, backend=registration, **options)
        timings["registration"] += time.perf_counter() - t0
        transforms.append(transform)
        t0 = time.perf_counter()
        prompts_t, next_carried, now = [], {}, {}
        labels_t = fixed.with_array(np.zeros(fixed.shape, np.uint16))
        for pid in sorted(status):
            if pid not in carried:
                status[pid].append(status[pid][-1] if status[pid][-1] == "outside" else "vanished")
                now[pid] = np.zeros(fixed.shape, bool)
                continue
            warped = warp_prompt(carried[pid], moving, fixed, transform)
            if warped is None:
                status[pid].append("outside")
                now[pid] = np.zeros(fixed.shape, bool)
                continue
            prompts_t.append(MaskPrompt(pid, fixed.with_array(warped)))
            next_carried[pid] = warped
        timings["warping"] += time.perf_counter() - t0
        if prompts_t:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="the network found no lesion")
                result = segment(fixed, prompts_t, track_model, cancel=cancel,
                                 progress=lambda f, m: report((t + f) / n_steps, f"scan {t}: {m}"))
            for stage, seconds in result.timings.items():
                timings[stage] += seconds
            labels_t = result.labels
            for p in prompts_t:
                mask = result.masks[p.id]
                if _below_minimum(mask, next_carried[p.id], fixed.spacing_zyx, min_volume_ml, min_prompt_fraction):
                    labels_t.array[labels_t.array == p.id] = 0
                    mask = np.zeros_like(mask)
                now[p.id] = mask
                status[p.id].append("tracked" if mask.any() else "vanished")
                if mask.any():
                    next_carried[p.id] = mask
        masks.append(now)
        labels.append(labels_t)
        carried = next_carried
    report(1.0, "done")
    return TrackResult(masks, labels, status, transforms, timings)
