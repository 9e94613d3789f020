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
* ``outside``: the warped lesion lies mostly outside the scan's field of view (the rule
  below). Its mask is empty and nothing is measured; it is not followed further: a lesion
  ``outside`` at scan t stays ``outside`` at every later scan.

The field-of-view rule. The previous mask is warped with the registration (linear
interpolation, threshold 0.5) onto a grid of scan t's voxel size and orientation that is
not cut at scan t's edges, and :data:`MIN_INSIDE_FRACTION` of that warped volume (world
mm^3: every voxel of the grid has the same size, so voxel counts are volumes) must fall
inside scan t's voxel grid for the lesion to be segmented there. With less, it is
``outside``. The reason: a network prompted with a sliver of the lesion at the edge of the
scan segments that sliver, and its volume and diameters would be read as a response
(e.g. -99.9 %, "PR") when the lesion simply left the field of view. Half is where "mostly
outside" starts; for a lesion symmetric about its centre (a sphere or ellipsoid cut by the
scan's edge) it is also where its centre leaves the scan. A lesion with at least half of
its volume inside but clipped by the edge is ``tracked`` and measured on the part inside;
a warning names it and the share outside (:attr:`TrackResult.inside_fraction` holds the
fractions). A lesion that thins out to nothing when warped (smaller than a voxel) has no
volume to count: it is ``outside`` when its warped centre of mass is outside scan t, and
otherwise prompted with a ball of its volume around that centre.

No overlap. When the two scans' fields of view do not intersect after registration
(:func:`fields_of_view_overlap`: scan t's grid mapped into scan t-1's world misses scan
t-1's grid, or the other way round), a warning says that registration found no overlap
between the two scans, and every lesion followed from scan t-1 is ``outside`` at scan t.

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
from .prompts import MaskPrompt, Point, PromptError

STATUSES = ("tracked", "vanished", "outside", "new", "absent")  # new/absent: lesions added by a correction

MIN_INSIDE_FRACTION = 0.5
"""A lesion is segmented at scan t only if at least this fraction of its warped previous mask's
volume lies inside scan t's voxel grid; with less it is ``outside`` (see the module docstring)."""

_WARP_MARGIN_MM = 25.0        # as Transform.warp_mask: the region resampled around a mapped lesion
_MAX_EXTENDED_VOXELS = 2 ** 24  # the uncut grid of one lesion is coarsened beyond this (odd transforms only)


@dataclass
class TrackResult:
    """``masks[t][id]``: bool (z, y, x) on scan t; ``labels[t]``: instance label Image;
    ``status[id][t]``: one of STATUSES; ``transforms[t-1]``: registration of scan t
    (fixed) to scan t-1 (moving); ``timings``: seconds per stage; ``inside_fraction[id][t]``:
    the fraction of the lesion's warped previous mask (world volume) inside scan t's field of
    view (1.0 at the baseline; 0.0 when the scans do not overlap; None where the lesion was
    not warped (no longer followed) or warped to less than a voxel); ``points[(t, id)]``: verified
    tracking's proposed and confirmed point of the lesion at scan t (LPS mm; see
    :func:`verified_prompts`), empty without it."""
    masks: list
    labels: list
    status: dict
    transforms: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    inside_fraction: dict = field(default_factory=dict)
    points: dict = field(default_factory=dict)

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


def paint_labels(labels: Image, masks: dict) -> Image:
    """``labels`` (an instance label Image) with the lesions of ``masks`` ({id: bool (z, y, x)})
    repainted: their old voxels cleared, their new ones set where no other lesion is (in ID order;
    the other lesions are never touched). A new Image; ``labels`` is unchanged."""
    array = np.asarray(labels.array, np.uint16).copy()
    for pid in masks:
        array[array == pid] = 0
    for pid, mask in sorted(masks.items()):
        array[mask & (array == 0)] = pid
    return labels.with_array(array)


def labels_from_masks(reference: Image, masks: dict) -> Image:
    """The instance label Image (uint16, label = lesion ID) of ``masks`` on ``reference``'s grid;
    where masks overlap the lower ID wins."""
    return paint_labels(reference.with_array(np.zeros(reference.shape, np.uint16)), masks)


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


def _grid_lattice(image: Image, n: int) -> np.ndarray:
    """World points (LPS mm) of an n^3 lattice spanning the image's full extent (voxel faces)."""
    axes = [np.linspace(-0.5, size - 0.5, n) for size in image.shape]
    index = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    return image.index_to_world(index)


def _boxes_intersect(index_points: np.ndarray, shape) -> bool:
    """Whether the bounding box of continuous (z, y, x) indices meets a grid's extent with a volume."""
    lo, hi = index_points.min(0), index_points.max(0)
    return bool(np.all(hi > -0.5) and np.all(lo < np.asarray(shape) - 0.5))


def fields_of_view_overlap(fixed: Image, moving: Image, transform) -> bool:
    """Whether the scans' fields of view intersect after registration.

    ``fixed``'s grid (a 9^3 lattice over its extent, corners included) mapped into ``moving``'s
    world by ``transform`` must meet ``moving``'s grid, and ``moving``'s grid (3^3 lattice)
    mapped into ``fixed``'s world must meet ``fixed``'s grid. Bounding boxes are compared, so the
    test never reports "no overlap" for scans that do overlap under an affine transform (the
    box of a mapped box contains it); a thin oblique miss may pass as overlap, and then every
    lesion is simply found ``outside`` by the field-of-view rule.
    """
    in_moving = moving.world_to_index(transform.fixed_to_moving(_grid_lattice(fixed, 9)))
    if not np.all(np.isfinite(in_moving)) or not _boxes_intersect(in_moving, moving.shape):
        return False
    in_fixed = fixed.world_to_index(transform.map_points(_grid_lattice(moving, 3)))
    return bool(np.all(np.isfinite(in_fixed)) and _boxes_intersect(in_fixed, fixed.shape))


def _mapped_region(mask: np.ndarray, moving: Image, fixed: Image, transform):
    """Half-open (z, y, x) index box on ``fixed``'s grid, not cut at its edges, around the mapped
    bounding box of ``mask`` plus the margin that :meth:`Transform.warp_mask` resamples."""
    return transform.mapped_region(mask, moving, fixed, _WARP_MARGIN_MM)


def inside_fraction(mask: np.ndarray, moving: Image, fixed: Image, transform) -> float | None:
    """Fraction of the volume of ``mask`` (bool (z, y, x) on ``moving``), warped by ``transform``
    (linear interpolation, threshold 0.5), that lies inside ``fixed``'s voxel grid; None when
    the mask warps to nothing (smaller than a voxel) or is empty.

    The warp is made on a grid of ``fixed``'s voxel size and orientation, aligned with its voxels
    but extended beyond its edges as far as the mapped lesion reaches (coarsened by an integer
    factor only if that grid would exceed 2^24 voxels), so the part outside is counted as
    well: equal voxels, so the voxel count ratio is the world volume ratio. A lesion whose
    mapped region lies well inside the grid is 1.0 without a second warp.
    """
    mask = np.asarray(mask, bool)
    if not mask.any():
        return None
    a, b = _mapped_region(mask, moving, fixed, transform)
    shape = np.asarray(fixed.shape)
    if np.all(a >= 0) and np.all(b <= shape):
        return 1.0   # everything Transform.warp_mask can produce for this lesion is inside
    extent = b - a
    factor = max(1, int(np.ceil((np.prod(extent.astype(float)) / _MAX_EXTENDED_VOXELS) ** (1 / 3))))
    coarse = -(-extent // factor)
    reference = Image(np.zeros(tuple(int(n) for n in coarse), np.uint8), tuple(np.asarray(fixed.spacing) * factor),
                      tuple(fixed.index_to_world(a.astype(float))), fixed.direction)
    warped = transform.warp_mask(moving.with_array(mask.astype(np.uint8)), reference, linear=True,
                                 threshold=0.5).array
    total = int(np.count_nonzero(warped))
    if total == 0:
        return None
    # coarse voxel i sits on fixed index a + i * factor: inside when 0 <= that < shape
    first = np.maximum(-(a // factor), 0)                # ceil(-a / factor), at least 0
    last = np.minimum(-((a - shape) // factor), coarse)  # ceil((shape - a) / factor), at most the grid
    if np.any(last <= first):
        return 0.0
    inside = int(np.count_nonzero(warped[tuple(slice(int(f), int(e)) for f, e in zip(first, last))]))
    return inside / total


def warp_lesion(mask: np.ndarray, moving: Image, fixed: Image, transform) -> tuple:
    """``(prompt, fraction)``: a lesion mask on scan ``moving`` warped onto scan ``fixed``, or None
    when it lies outside ``fixed``'s field of view by the module's rule (less than
    :data:`MIN_INSIDE_FRACTION` of its warped volume inside), and that fraction
    (:func:`inside_fraction`; None when it warps to less than a voxel).

    Linear interpolation + threshold 0.5; a lesion that thins out to nothing keeps
    its mapped centre and equivalent-sphere radius (deterministic, from the transform),
    and is outside when that centre is.
    """
    warped = transform.warp_mask(moving.with_array(mask.astype(np.uint8)), fixed, linear=True, threshold=0.5)
    warped = np.asarray(warped.array) > 0
    fraction = inside_fraction(mask, moving, fixed, transform)
    if fraction is not None and fraction < MIN_INSIDE_FRACTION:
        return None, fraction
    if warped.any():
        return warped, fraction
    centre = moving.index_to_world(ndimage.center_of_mass(mask))
    mapped = transform.map_points(np.asarray([centre]))[0]
    index = fixed.world_to_index(mapped)
    if not fixed.contains_index(index):
        return None, fraction
    volume = mask.sum() * np.prod(moving.spacing)
    radius = max((3 * volume / (4 * np.pi)) ** (1 / 3), max(fixed.spacing))
    ball = _ball_mask(fixed, index, radius)
    return (ball if ball.any() else None), fraction


def warp_prompt(mask: np.ndarray, moving: Image, fixed: Image, transform) -> np.ndarray | None:
    """Warp a lesion mask from scan ``moving`` onto scan ``fixed``; None if it lies outside the field
    of view (less than :data:`MIN_INSIDE_FRACTION` of it inside). See :func:`warp_lesion`."""
    return warp_lesion(mask, moving, fixed, transform)[0]


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
          min_volume_ml: float = 0.0, min_prompt_fraction: float = 0.0, confirm=None) -> TrackResult:
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
    ``confirm``: verified tracking (None: off). Before each follow-up is segmented,
    ``confirm(t, {id: Point})`` gets each followed lesion's proposed point on scan t (the centre of
    its warped previous mask, LPS mm) and answers the points it confirms or moves; the lesion is
    then segmented from its warped mask moved onto that point (:func:`verified_prompts`).
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
    fractions = {pid: [1.0 if m.any() else None] for pid, m in baseline.items()}
    transforms, points = [], {}
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
        now, labels_t, carried = follow_up(t, images, transform, carried, status, fractions, track_model, timings,
                                           report, cancel, min_volume_ml, min_prompt_fraction,
                                           confirm=confirm, points=points)
        masks.append(now)
        labels.append(labels_t)
    report(1.0, "done")
    return TrackResult(masks, labels, status, transforms, timings, fractions, points)


def proposed_point(mask: np.ndarray, image: Image) -> np.ndarray:
    """The centre of mass (LPS mm, x y z) of a non-empty bool (z, y, x) ``mask`` on ``image``."""
    from .protocol import mask_bbox

    lo, hi = mask_bbox(mask)
    block = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
    return image.index_to_world(np.asarray(ndimage.center_of_mass(block)) + lo)


def shift_mask(mask: np.ndarray, offset_zyx) -> np.ndarray:
    """``mask`` moved by whole voxels ``offset_zyx`` (z, y, x); what leaves the grid is lost."""
    out = np.zeros_like(mask)
    offset = [int(v) for v in offset_zyx]
    src = tuple(slice(max(0, -d), n - max(0, d)) for d, n in zip(offset, mask.shape))
    dst = tuple(slice(max(0, d), n - max(0, -d)) for d, n in zip(offset, mask.shape))
    if all(s.stop > s.start for s in src):
        out[dst] = mask[src]
    return out


def verified_prompts(t: int, image: Image, prompts: list, confirm, points: dict | None = None) -> list:
    """Verified tracking at scan ``t``: the warped previous masks ``prompts`` (MaskPrompts on
    ``image``) after a user confirmed or moved each lesion's proposed point.

    Each lesion's proposal is the centre of mass of its warped mask (LPS mm).
    ``confirm(t, {id: Point})`` answers ``{id: Point}`` with the points it moved or confirmed
    (a lesion it leaves out keeps its proposal). How the two prompt types are combined with a
    network that takes one previous-mask channel: the warped mask is translated by whole voxels so
    that its centre of mass lands on the confirmed point, and that mask is the prompt (shape and
    size from the previous scan, position from the user). An accepted proposal leaves the prompt
    exactly as automatic tracking has it. ``points`` (optional dict) gets ``(t, id) ->
    {"proposed": [x, y, z], "confirmed": [x, y, z]}``. PromptError for a point outside the scan or
    with another lesion's ID."""
    proposals = {p.id: Point(p.id, tuple(float(v) for v in proposed_point(p.mask.array, image))) for p in prompts}
    answer = confirm(t, dict(proposals)) or {}
    out = []
    for p in prompts:
        point = answer.get(p.id, proposals[p.id])
        if not isinstance(point, Point) or point.id != p.id:
            raise PromptError(f"verified tracking, lesion {p.id} at scan {t}: the confirmation must be a Point with "
                              f"the lesion's ID, got {point!r}")
        index = image.world_to_index(point.xyz)
        if not image.contains_index(index):
            raise PromptError(f"verified tracking, lesion {p.id} at scan {t}: the confirmed point "
                              f"{tuple(round(v, 1) for v in point.xyz)} mm (LPS) is outside that scan")
        offset = np.rint(index - image.world_to_index(proposals[p.id].xyz)).astype(int)
        mask = shift_mask(p.mask.array, offset) if offset.any() else p.mask.array
        if points is not None:
            points[(t, p.id)] = {"proposed": [float(v) for v in proposals[p.id].xyz],
                                 "confirmed": [float(v) for v in point.xyz]}
        out.append(MaskPrompt(p.id, image.with_array(mask)) if offset.any() else p)
    return out


def follow_up(t: int, images, transform, carried: dict, status: dict, fractions: dict, track_model, timings: dict,
              report, cancel, min_volume_ml: float = 0.0, min_prompt_fraction: float = 0.0, lesions=None,
              confirm=None, points=None) -> tuple:
    """One step of the autoregressive loop: the lesions of ``status`` (or only ``lesions``, a
    subset) at scan ``t``, from ``carried`` ({id: bool mask on scan t-1}: each lesion's last known
    location) warped by ``transform`` (scan t fixed, scan t-1 moving) and segmented with
    ``track_model`` in one batch. Appends each lesion's status and inside fraction at t to
    ``status`` and ``fractions``, adds seconds to ``timings``. ``confirm``/``points``: verified
    tracking (:func:`verified_prompts`). Returns ({id: bool mask on scan t}, the instance label
    Image of those lesions, the next ``carried``)."""
    fixed, moving = images[t], images[t - 1]
    t0 = time.perf_counter()
    prompts_t, next_carried, now = [], {}, {}
    labels_t = fixed.with_array(np.zeros(fixed.shape, np.uint16))
    lesions = sorted(status) if lesions is None else sorted(lesions)
    overlap = fields_of_view_overlap(fixed, moving, transform)
    followed = [pid for pid in lesions if pid in carried]
    if not overlap and followed:
        warnings.warn(f"registration found no overlap between scan {t} and scan {t - 1} (backend "
                      f"'{transform.backend}'): their fields of view do not intersect after registration, so "
                      f"the {len(followed)} lesion(s) followed from scan {t - 1} are reported 'outside' at "
                      f"scan {t}; check the scans' positions (origin) or the registration", stacklevel=3)
    for pid in lesions:
        if pid not in carried:
            status[pid].append(status[pid][-1] if status[pid][-1] == "outside" else "vanished")
            fractions[pid].append(None)
            now[pid] = np.zeros(fixed.shape, bool)
            continue
        warped, fraction = warp_lesion(carried[pid], moving, fixed, transform) if overlap else (None, 0.0)
        fractions[pid].append(fraction)
        if warped is None:
            status[pid].append("outside")
            now[pid] = np.zeros(fixed.shape, bool)
            continue
        if fraction is not None and fraction < 1.0:
            outside_pct = 100.0 * (1.0 - fraction)
            share = f"{outside_pct:.0f} %" if outside_pct >= 1.0 else "less than 1 %"
            warnings.warn(f"lesion {pid}: {share} of its mask warped from scan {t - 1} lies outside the field "
                          f"of view of scan {t}; only the part inside is segmented and measured", stacklevel=3)
        prompts_t.append(MaskPrompt(pid, fixed.with_array(warped)))
        next_carried[pid] = warped
    timings["warping"] += time.perf_counter() - t0
    if confirm is not None and prompts_t:
        prompts_t = verified_prompts(t, fixed, prompts_t, confirm, points)
        next_carried.update({p.id: p.mask.array for p in prompts_t})
    if prompts_t:
        n_steps = len(images)
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
    return now, labels_t, next_carried
