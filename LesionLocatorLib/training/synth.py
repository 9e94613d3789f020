"""Synthetic longitudinal CT data: lesion insertion and follow-up generation.

From a real CT without lesions, :func:`make_case` builds a *baseline* with
synthetic lesions and ``n_followups`` follow-up scans, each with an instance
label map whose voxel value is the lesion ID (stable across timepoints).
The follow-ups are generated as the LesionLocator supplement (section 7)
describes:

* **Insertion (baseline)**: ellipsoids, lobulated blobs (union of spheres or
  low-frequency radial noise) and spiculated blobs, 3-60 mm, in the lungs
  ('lung'), in soft tissue/liver ('soft_tissue') or touching a wall (pleura or
  body wall, 'wall'); intensities relative to the local tissue (hypo-,
  hyperdense, rim-enhancing, necrotic core; solid or ground-glass in lung; never
  darker than water in soft tissue) with texture and noise, blended through a
  Gaussian-smoothed mask (partial volume).
  Body: HU > -500, largest component, holes filled per axial slice; lung: HU <
  -400 inside it, without airways/bowel gas.  Lesions keep ``min_gap_mm`` from
  each other, stay inside the body and far enough from the image border that
  the image-level transforms keep them in view.
* **Lesion level (7.1)**, anatomy-informed growth/shrinkage: around each lesion a
  deformation field ``V = grad(G_sigma_s * S_lesion) * A(x)`` is built from its
  mask ``S_lesion``; the image is resampled at ``x + V(x)`` (backward mapping, as
  in the anatomy-informed augmentation the supplement adapts), so ``A > 0``
  dilates the lesion and pushes the surrounding tissue away, ``A < 0`` shrinks
  it.  ``A`` is drawn per lesion from ``{-22, -18, 15, 25}`` and kept for all
  its follow-ups; ``sigma_s`` lies in 4-5.5 mm and grows with lesion size.
  Size adaptation ("multi-stage approach"): stages are stacked (and composed
  into one resampling) until the border has moved by about
  ``growth_per_amplitude * |A| * radius`` (15 % of the radius for |A| = 20);
  for lesions smaller than the kernel the field is normalised so that its peak
  strain equals that at a large lesion's border.  See
  :func:`growth_displacement` for these choices and for how the voxel-wise
  random scaling field r(x) is applied.  Across follow-ups the fields are
  composed too: every follow-up resamples the baseline once (lesions inserted
  later: from their insertion on), so lesions keep their texture and contrast
  and sub-voxel growth accumulates instead of being rounded away at each step.
* **Image level (7.2)**: elastic deformation, rotation, scaling and translation,
  then Gaussian noise, Gaussian blur, multiplicative brightness and contrast,
  with the supplement's probabilities and ranges (batchgeneratorsv2 semantics:
  elastic sigma and maximum displacement are fractions of the network patch,
  160 x 224 x 224 voxels at 1 x 0.8 x 0.8 mm, i.e. about 8-9 mm and 4-4.5 mm;
  intensity parameters are in nnU-Net CT-normalised units, mapped to HU with
  the body's clipped mean/std).  The baseline gets none of them.  Labels are
  resampled through the same mapping as the image (see ``label_resampling``).
* Lesions may vanish (probability ``p_vanish`` per follow-up) and new lesions
  may appear (probability ``p_new`` per follow-up, new IDs).

Units and frames (as in :mod:`LesionLocatorLib.image`): arrays are (z, y, x),
intensities Hounsfield units, lengths millimetres, volumes millilitres, world
points LPS millimetres (x, y, z).  The supplement's kernel sizes and
amplitudes are given in voxels of its ~1 mm training grid; here they are
applied in millimetres, so the result does not depend on the CT's spacing.
All randomness comes from ``numpy.random.Generator`` objects seeded from
``seed``: the same CT, arguments and seed give identical arrays.

Modules: :mod:`.lesions` (anatomy, placement maps, lesion shapes and appearance),
:mod:`.followups` (growth/shrinkage fields, image-level transforms, :class:`SynthConfig`) and
this one (the longitudinal state, :func:`make_case`, :func:`write_case`, :func:`run_synth`).

Never imports slicer, qt or vtk.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from scipy import ndimage

from ..image import Image, read_image, write_image
from .followups import (HU_MAX, HU_MIN, SynthConfig, _apply_intensity, _apply_spatial, _erase_lesion,
                        _sample_image_transform, _to_ct, resample_labels, stacked_growth_field)
from .lesions import (_APPEARANCE, _SOFT_APPEARANCES, LOCATIONS, _Anatomy, _appearance_values, _local_noise_hu,
                      _sample_shape, _shape_mask, _weighted_choice, above_water, robust_sigma, visible_values)

__all__ = ["LesionInfo", "SynthCase", "SynthConfig", "make_case", "run_synth", "write_case"]


# --------------------------------------------------------------------------- results
@dataclass
class LesionInfo:
    """One synthetic lesion through time.

    ``status[t]`` is ``'present'``, ``'new'`` (first appears at follow-up t),
    ``'vanished'`` (existed before, zero voxels now) or ``'absent'`` (not yet
    appeared).  ``volumes_ml[t]`` is measured on ``labels[t]``;
    ``growth_volumes_ml[t]`` is the volume after the lesion-level changes only
    (baseline frame, before the image-level spatial transform, which may change
    apparent volumes by elastic deformation and scaling); ``centers_xyz[t]`` is
    the centre of mass in LPS mm (None when absent).  ``amplitude`` is the A
    used at every follow-up; ``diameter_mm`` the nominal diameter at insertion.
    """
    id: int
    kind: str
    appearance: str
    location: str
    diameter_mm: float
    amplitude: float
    appeared_at: int
    volumes_ml: list = field(default_factory=list)
    growth_volumes_ml: list = field(default_factory=list)
    status: list = field(default_factory=list)
    centers_xyz: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SynthCase:
    """``images[0]`` is the baseline; ``labels[t]`` (uint16) holds lesion IDs."""
    images: list
    labels: list
    lesions: list
    transforms: list
    seed: int
    config: SynthConfig

    @property
    def n_timepoints(self) -> int:
        return len(self.images)

    def lesion(self, lesion_id: int) -> LesionInfo:
        for les in self.lesions:
            if les.id == lesion_id:
                return les
        raise KeyError(f"no lesion with ID {lesion_id}")


# --------------------------------------------------------------------------- state
class _State:
    """The longitudinal state in the baseline frame.

    ``image`` holds the CT with lesions, ``clean`` the same anatomy without them
    (deformed by the same growth fields), ``label`` the lesion IDs.

    Growth is resampled once from a reference state, not step after step: ``base`` holds
    (image, clean, label) as they were before the first growth (or the last lesion insertion), and
    ``total`` (3, z, y, x, voxels) the composed displacement from the current frame into it, so
    the current state is ``base`` sampled at ``x + total(x)``. Resampling the previous timepoint
    again at every follow-up would blur a lesion a little more each time (its contrast and
    texture fade and its label drifts from what the image shows).
    """

    def __init__(self, ct: np.ndarray, spacing_zyx, anatomy: _Anatomy, cfg: SynthConfig):
        self.clean = ct.astype(np.float32, copy=True)
        self.image = self.clean.copy()
        self.label = np.zeros(ct.shape, np.uint16)
        self.base = None       # (image, clean, label) that growth resamples; None: the current state
        self.total = None      # displacement (3, z, y, x) from the current frame into ``base``; None: zero
        self.spacing = np.asarray(spacing_zyx, float)
        self.anatomy = anatomy
        self.cfg = cfg
        self.boxes = {}        # id -> [[z0, z1], [y0, y1], [x0, x1]] of the label
        self.rmax = {}         # id -> outer radius (mm) at insertion
        self.centre_mm = {}    # id -> centre (mm, z y x from voxel 0) at insertion
        self.avoid = []        # (centre mm, radius mm) of lesions the CT already has (``make_case(avoid=)``)

    # boxes ----------------------------------------------------------------
    def _box(self, centre_vox, half_vox):
        return [[max(0, int(math.floor(c - h))), min(n, int(math.ceil(c + h)) + 1)]
                for c, h, n in zip(centre_vox, half_vox, self.image.shape)]

    def _expand(self, box, margin_vox):
        return [[max(0, b0 - m), min(n, b1 + m)] for (b0, b1), m, n in zip(box, margin_vox, self.image.shape)]

    @staticmethod
    def _sl(box):
        return tuple(slice(b0, b1) for b0, b1 in box)

    def update_box(self, lid, search_box) -> int:
        sub = self.label[self._sl(search_box)] == lid
        n = int(sub.sum())
        if n == 0:
            self.boxes.pop(lid, None)
            return 0
        bb = []
        for a in range(3):
            other = tuple(i for i in range(3) if i != a)
            hit = np.flatnonzero(np.any(sub, axis=other))
            bb.append([search_box[a][0] + int(hit[0]), search_box[a][0] + int(hit[-1]) + 1])
        self.boxes[lid] = bb
        return n

    def count(self, lid: int) -> int:
        if lid not in self.boxes:
            return 0
        return int((self.label[self._sl(self.boxes[lid])] == lid).sum())

    def occupied(self):
        """(centre mm, outer radius mm) of every present lesion, from its current box."""
        occ = []
        for lid, bb in self.boxes.items():
            lo = np.array([b[0] for b in bb]) * self.spacing
            hi = (np.array([b[1] for b in bb]) - 1) * self.spacing
            r_box = float(np.linalg.norm(hi - lo) / 2.0)
            occ.append(((lo + hi) / 2.0, max(r_box, self.rmax.get(lid, 0.0))))
        return occ + self.avoid

    def avoid_mask(self, mask: np.ndarray) -> None:
        """Keep new lesions away from each connected part of ``mask`` (bool, z y x, this grid)."""
        parts, _ = ndimage.label(mask)
        for sl in ndimage.find_objects(parts):
            lo = np.array([s.start for s in sl]) * self.spacing
            hi = np.array([s.stop - 1 for s in sl]) * self.spacing
            self.avoid.append(((lo + hi) / 2.0, float(np.linalg.norm(hi - lo) / 2.0) + float(self.spacing.max())))

    # insertion ---------------------------------------------------------------
    def insert(self, rng, lid: int, shape: dict, appearance: str, centre_vox) -> None:
        sp = self.spacing
        half = (shape["rmax"] + 6.0) / sp + 2
        box = self._box(centre_vox, half)
        sl = self._sl(box)
        grids = np.meshgrid(*[(np.arange(b0, b1, dtype=np.float32) - c) * s
                              for (b0, b1), c, s in zip(box, centre_vox, sp)], indexing="ij")
        local = np.stack(grids)
        S = _shape_mask(shape, local)
        S &= self.anatomy.body_full(box)
        S &= self.label[sl] == 0
        if not S.any():
            c = tuple(int(round(ci)) - b[0] for ci, b in zip(centre_vox, box))
            S[c] = True
        crop = self.image[sl]
        outside = ndimage.distance_transform_edt(~S, sampling=sp)
        shell = (outside > 1.5) & (outside < 5.0) & self.anatomy.body_full(box)
        local_hu = float(np.median(crop[shell])) if shell.any() else 40.0
        noise_hu = _local_noise_hu(crop, shell)
        rim, core, rim_frac = _appearance_values(rng, appearance, local_hu)
        needed = self.cfg.min_contrast_hu
        if shell.any():
            spread = robust_sigma(crop[shell])
            needed = min(max(needed, self.cfg.contrast_per_spread * max(spread, noise_hu)), self.cfg.max_contrast_hu)
            rim, core = visible_values(rim, core, rim_frac, local_hu, needed,
                                       upward=appearance in ("hyperdense", "rim_enhancing", "solid") or (
                                           appearance == "necrotic_core" and self.cfg.visible_wall),
                                       wall=self.cfg.visible_wall)
        if self.cfg.soft_lesion_min_hu is not None and appearance in _SOFT_APPEARANCES:
            rim, core = above_water(rim, core, rim_frac, local_hu, needed, self.cfg.soft_lesion_min_hu)
        depth = ndimage.distance_transform_edt(S, sampling=sp)
        r_eq = (3 * S.sum() * np.prod(sp) / (4 * np.pi)) ** (1 / 3)
        if rim_frac > 0 and r_eq > 2 * sp.min():
            th = max(rim_frac * r_eq, 1.0)
            w_core = np.clip((depth - th) / 1.0 + 0.5, 0, 1)
            value = rim + (core - rim) * w_core
        else:
            value = np.full(S.shape, (rim + core) / 2 if rim_frac > 0 else rim, np.float32)
        tex = ndimage.gaussian_filter(rng.standard_normal(S.shape, dtype=np.float32), 1.0 / sp)
        tex /= max(float(tex.std()), 1e-6)
        value = value + tex * rng.uniform(4, 12) + rng.standard_normal(S.shape, dtype=np.float32) * noise_hu
        alpha = ndimage.gaussian_filter(S.astype(np.float32), self.cfg.partial_volume_sigma_vox)
        alpha[self.label[sl] != 0] = 0
        crop[...] = crop * (1 - alpha) + alpha * value
        self.label[sl][S] = lid
        self.base = self.total = None   # drawn in the current frame: growth resamples from here on
        self.rmax[lid] = float(shape["rmax"])
        self.centre_mm[lid] = np.asarray(centre_vox) * sp
        self.update_box(lid, box)

    def remove(self, lid: int) -> None:
        """Let a lesion vanish: its voxels (and partial-volume border) show the clean anatomy, in the
        current state and in ``base`` (so that later growth does not bring it back)."""
        if lid not in self.boxes:
            return
        _erase_lesion(self.image, self.clean, self.label, lid, self._sl(self._expand(self.boxes[lid], [6, 6, 6])))
        if self.base is not None:
            image, clean, label = self.base
            where = np.argwhere(label == lid)
            if len(where):
                box = [[int(lo), int(hi) + 1] for lo, hi in zip(where.min(0), where.max(0))]
                _erase_lesion(image, clean, label, lid, self._sl(self._expand(box, [6, 6, 6])))
        self.boxes.pop(lid, None)

    # growth ------------------------------------------------------------------
    def grow(self, rng, lid: int, amplitude: float) -> int:
        """Anatomy-informed growth/shrinkage of one lesion; returns its voxel count after.

        The stacked stages (:func:`stacked_growth_field`) are composed into one
        displacement, so the image, the lesion-free image and the labels are
        resampled once (linear, linear, nearest neighbour).
        """
        cfg, sp = self.cfg, self.spacing
        if lid not in self.boxes:
            return 0
        n_vox = self.update_box(lid, self.boxes[lid])
        r_eq = (3 * n_vox * np.prod(sp) / (4 * np.pi)) ** (1 / 3)
        s_lo, s_hi = cfg.sigma_s_range
        sigma_s = float(np.interp(r_eq, [2.5, 15.0], [s_lo, s_hi]))
        target = max(cfg.growth_per_amplitude * abs(amplitude) * r_eq, 0.6 * float(sp.min()))
        margin = np.ceil((4 * sigma_s + 1.5 * target + 4.0) / sp).astype(int) + 2
        box = self._expand(self.boxes[lid], margin)
        sl = self._sl(box)
        lab = self.label[sl]
        disp = stacked_growth_field(lab == lid, sp, amplitude, sigma_s, rng, target, cfg)
        if self.base is None:
            self.base = (self.image.copy(), self.clean.copy(), self.label.copy())
            self.total = np.zeros((3,) + self.image.shape, np.float32)
        # current(x) = base(x + total(x)) and new(x) = current(x + disp(x)), so the new displacement
        # is disp(x) + total(x + disp(x)) (global voxel coordinates; disp is zero outside the crop)
        at = np.indices(lab.shape, dtype=np.float32)
        at += np.array([s.start for s in sl], np.float32).reshape(3, 1, 1, 1) + disp
        total = disp + np.stack([ndimage.map_coordinates(self.total[a], at, order=1, mode="nearest")
                                 for a in range(3)])
        self.total[(slice(None),) + sl] = total
        at += total - disp
        image, clean, label = self.base
        self.image[sl] = ndimage.map_coordinates(image, at, order=1, mode="nearest")
        self.clean[sl] = ndimage.map_coordinates(clean, at, order=1, mode="nearest")
        nearest = ndimage.map_coordinates(label, at, order=0, mode="nearest")
        if self.cfg.label_resampling == "linear":
            lo = np.clip(np.floor(at.reshape(3, -1).min(1)).astype(int), 0, None)
            hi = np.ceil(at.reshape(3, -1).max(1)).astype(int) + 2
            source = label[tuple(slice(a, b) for a, b in zip(lo, hi))]
            at -= lo.reshape(3, 1, 1, 1).astype(np.float32)
            nearest = resample_labels(nearest, lambda lid: ndimage.map_coordinates(
                (source == lid).astype(np.float32), at, order=1, mode="nearest"))
        self.label[sl] = nearest
        # neighbours inside the crop were pushed too: re-measure their boxes
        for other, bb in list(self.boxes.items()):
            if other != lid and all(b0 < c1 and c0 < b1 for (b0, b1), (c0, c1) in zip(bb, box)):
                self.update_box(other, self._expand(bb, margin))
        return self.update_box(lid, box)


# --------------------------------------------------------------------------- driver
def _place(rng, anatomy: _Anatomy, state: _State, cfg: SynthConfig, diameter_range, kind=None):
    """Sample kind, size and location and find a free spot; None if nothing fits.

    The sampled diameter is shrunk (x0.75) until some location fits, down to the
    minimum diameter; so a failure means not even the smallest lesion fits.
    """
    d_lo, d_hi = diameter_range
    diameter = float(np.exp(rng.uniform(np.log(d_lo), np.log(d_hi))))
    kind = kind or _weighted_choice(rng, cfg.kind_weights)
    location = _weighted_choice(rng, cfg.location_weights)
    shape_seed = int(rng.integers(0, 2 ** 63 - 1))
    pick_seed = int(rng.integers(0, 2 ** 63 - 1))
    occupied = state.occupied()
    order = [location] + [loc for loc in LOCATIONS if loc != location]
    if not anatomy.has_lung:
        order = [loc for loc in order if loc != "lung"]
    while True:
        shape = _sample_shape(np.random.default_rng(shape_seed), kind, diameter)
        for loc in order:
            ok = anatomy.candidates(loc, shape["rmax"], occupied, cfg.min_gap_mm)
            idx = np.flatnonzero(ok)
            if idx.size:
                prng = np.random.default_rng(pick_seed)
                c = np.array(np.unravel_index(int(idx[prng.integers(idx.size)]), anatomy.cshape), float)
                jitter = prng.uniform(-0.5, 0.5, 3) * (anatomy.stride - 1)
                centre_vox = np.clip(c * anatomy.stride + jitter, 0, np.asarray(anatomy.shape) - 1)
                return shape, loc, diameter, centre_vox
        if diameter <= d_lo + 1e-6:
            return None
        diameter = max(d_lo, diameter * 0.75)


def _appearance_for(rng, anatomy: _Anatomy, location: str, centre_vox, diameter: float) -> str:
    c = tuple(int(min(max(round(v / f), 0), n - 1))
              for v, f, n in zip(centre_vox, anatomy.stride, anatomy.cshape))
    in_lung = anatomy.has_lung and bool(anatomy.lung[c])
    appearance = _weighted_choice(rng, _APPEARANCE["lung" if in_lung else "soft"])
    if in_lung and appearance == "hyperdense" and diameter > 12.0:
        appearance = "solid"        # calcified nodules are small
    return appearance


def _measure(label: np.ndarray, image: Image, ids, voxel_ml: float):
    """Volumes (ml) and centres of mass (LPS mm) of the given IDs in a label array."""
    counts = np.bincount(label.ravel(), minlength=max(ids, default=0) + 1)
    objs = ndimage.find_objects(label)
    vols, centres = {}, {}
    for lid in ids:
        n = int(counts[lid]) if lid < counts.size else 0
        vols[lid] = n * voxel_ml
        if n == 0 or lid > len(objs) or objs[lid - 1] is None:
            centres[lid] = None
            continue
        sl = objs[lid - 1]
        com = np.array(ndimage.center_of_mass(label[sl] == lid)) + [s.start for s in sl]
        centres[lid] = [float(v) for v in image.index_to_world(com)]
    return vols, centres


def make_case(ct: Image, n_lesions: int = 5, n_followups: int = 2, seed: int = 0,
              config: Optional[SynthConfig] = None,
              progress: Optional[Callable[[float, str], None]] = None,
              avoid: Optional[np.ndarray] = None, **overrides) -> SynthCase:
    """Insert ``n_lesions`` synthetic lesions into a lesion-free CT and simulate follow-ups.

    ``ct`` is a CT in Hounsfield units (any spacing/orientation).  Returns a
    :class:`SynthCase` with ``n_followups + 1`` images (int16 HU, same geometry
    as ``ct``; t0 is the baseline, which gets no image-level transform) and
    label maps (uint16, voxel value = lesion ID, IDs stable over time).
    ``config`` (or keyword ``overrides`` of its fields, e.g.
    ``spatial_transform=False``) changes the generator.  ``avoid`` (bool, z y x, the
    CT's grid): lesions the CT already has (e.g. a real tumour's label); synthetic
    lesions keep ``min_gap_mm`` from their bounding spheres (at insertion).

    Raises ``ValueError`` for a CT without a body ("no body found ...") and when
    fewer than ``n_lesions`` lesions fit ("only K of the N requested lesions fit ...").
    """
    cfg = replace(config or SynthConfig(), **overrides)
    if int(n_lesions) != n_lesions or n_lesions < 0:
        raise ValueError(f"n_lesions must be a non-negative integer, got {n_lesions!r}")
    if int(n_followups) != n_followups or n_followups < 0:
        raise ValueError(f"n_followups must be a non-negative integer, got {n_followups!r}")
    n_lesions, n_followups = int(n_lesions), int(n_followups)
    if cfg.label_resampling not in ("linear", "nearest"):
        raise ValueError(f"label_resampling must be 'linear' or 'nearest', got {cfg.label_resampling!r}")
    report = progress or (lambda f, m: None)
    spacing = np.asarray(ct.spacing_zyx, float)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    ss = np.random.SeedSequence(int(seed))
    place_ss, fu_ss = ss.spawn(2)
    lesion_seeds = place_ss.spawn(max(n_lesions, 1))
    fu_seeds = fu_ss.spawn(max(n_followups, 1))

    report(0.0, "analysing anatomy")
    anatomy = _Anatomy(np.asarray(ct.array), spacing, cfg)
    state = _State(np.asarray(ct.array), spacing, anatomy, cfg)
    if avoid is not None:
        if np.shape(avoid) != tuple(ct.array.shape):
            raise ValueError(f"avoid mask shape {np.shape(avoid)} differs from the CT's {tuple(ct.array.shape)}")
        state.avoid_mask(np.asarray(avoid, bool))
    lesions: list = []

    def new_lesion(rng, lid, t, diameter_range):
        placed = _place(rng, anatomy, state, cfg, diameter_range)
        if placed is None:
            return None
        shape, loc, diameter, centre_vox = placed
        appearance = _appearance_for(rng, anatomy, loc, centre_vox, diameter)
        amplitude = float(cfg.amplitudes[int(rng.integers(len(cfg.amplitudes)))])
        state.insert(rng, lid, shape, appearance, centre_vox)
        return LesionInfo(id=lid, kind=shape["kind"], appearance=appearance, location=loc,
                          diameter_mm=round(diameter, 2), amplitude=amplitude, appeared_at=t)

    for i in range(n_lesions):
        report(0.05 + 0.2 * i / max(n_lesions, 1), f"inserting lesion {i + 1} of {n_lesions}")
        info = new_lesion(np.random.default_rng(lesion_seeds[i]), i + 1, 0, cfg.diameter_range_mm)
        if info is None:
            raise ValueError(
                f"only {len(lesions)} of the {n_lesions} requested lesions fit in this CT "
                f"(non-overlapping, inside the body, away from the image border; after those "
                f"not even a {cfg.diameter_range_mm[0]:g} mm lesion fits); ask for at most {len(lesions)}")
        lesions.append(info)

    growth = [{les.id: state.count(les.id) * voxel_ml for les in lesions}]
    src = np.asarray(ct.array)
    hu_range = (max(min(float(src.min()), HU_MIN), -32768.0), min(max(float(src.max()), HU_MAX), 32767.0))
    images = [ct.with_array(_to_ct(state.image, hu_range))]
    labels = [ct.with_array(state.label.copy())]
    transforms = [{"timepoint": 0, "baseline": True}]
    next_id = n_lesions + 1

    for t in range(1, n_followups + 1):
        report(0.25 + 0.75 * (t - 1) / max(n_followups, 1), f"follow-up {t} of {n_followups}")
        rng = np.random.default_rng(fu_seeds[t - 1])
        events = {"vanished": [], "new": []}
        for les in lesions:
            if les.id not in state.boxes:
                continue
            if rng.random() < cfg.p_vanish:
                state.remove(les.id)
                events["vanished"].append(les.id)
                continue
            if state.grow(rng, les.id, les.amplitude) == 0:
                state.remove(les.id)
        if rng.random() < cfg.p_new:
            info = new_lesion(rng, next_id, t, cfg.new_diameter_range_mm)
            if info is not None:
                lesions.append(info)
                events["new"].append(next_id)
                next_id += 1
        growth.append({les.id: state.count(les.id) * voxel_ml for les in lesions})
        params = _sample_image_transform(rng, cfg, ct.shape, spacing)
        if params["spatial"]:
            img, lab = _apply_spatial(state.image, state.label, params, spacing, cfg.label_resampling)
        else:
            img, lab = state.image.copy(), state.label.copy()
        if cfg.intensity_transform:
            _apply_intensity(img, params, anatomy.mean, anatomy.std)
        images.append(ct.with_array(_to_ct(img, hu_range)))
        labels.append(ct.with_array(lab))
        del img
        record = {k: v for k, v in params.items() if k != "elastic"}
        if params.get("elastic") is not None:
            record["elastic_max_mm"] = params["elastic"]["max_mm"]
        record.pop("noise_seed", None)
        transforms.append({"timepoint": t, "baseline": False, **record, **events})

    report(0.97, "measuring lesions")
    ids = [les.id for les in lesions]
    for t, lab in enumerate(labels):
        vols, centres = _measure(lab.array, lab, ids, voxel_ml)
        for les in lesions:
            v = vols[les.id]
            if t < les.appeared_at:
                status = "absent"
            elif v == 0:
                status = "vanished"
            elif t == les.appeared_at and t > 0:
                status = "new"
            else:
                status = "present"
            les.volumes_ml.append(round(v, 4))
            les.growth_volumes_ml.append(round(growth[t].get(les.id, 0.0), 4))
            les.status.append(status)
            les.centers_xyz.append(centres[les.id])
    report(1.0, "done")
    return SynthCase(images=images, labels=labels, lesions=lesions, transforms=transforms,
                     seed=int(seed), config=cfg)


# --------------------------------------------------------------------------- output
def _atomic_json(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.chmod(tmp, 0o644)          # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def write_case(case: SynthCase, out_dir, name: str) -> Path:
    """Write ``<name>_t<k>.nii.gz``, ``<name>_t<k>_label.nii.gz`` and ``<name>.json`` (all atomic).

    The JSON lists the files, each lesion's volume (ml), status and centre
    (LPS mm) per timepoint, and the generator's parameters.  Returns its path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for t, (img, lab) in enumerate(zip(case.images, case.labels)):
        ip, lp = f"{name}_t{t}.nii.gz", f"{name}_t{t}_label.nii.gz"
        write_image(img, out / ip)
        write_image(lab, out / lp)
        files.append({"timepoint": t, "image": ip, "label": lp})
    doc = {
        "name": name,
        "seed": case.seed,
        "n_timepoints": case.n_timepoints,
        "units": {"volume": "ml", "center": "LPS mm (x, y, z)", "intensity": "HU"},
        "files": files,
        "lesions": [les.to_dict() for les in case.lesions],
        "transforms": case.transforms,
        "config": asdict(case.config),
    }
    return _atomic_json(_jsonable(doc), out / f"{name}.json")


def run_synth(ct_path, lesions: int, followups: int, seed: int, out, name: Optional[str] = None,
              progress: Optional[Callable[[float, str], None]] = None, series=(), **overrides) -> Path:
    """CLI entry (``lesionlocator synth``): read a CT (an image file or a DICOM series folder;
    ``series``: the Series Instance UID(s) to choose from when the folder holds several), make a
    case, write it; returns the JSON path.

    ``name`` defaults to ``<ct file stem or folder name>_synth_s<seed>``.
    """
    from ..inputs import scan_name

    ct = read_image(ct_path, series)
    if name is None:
        name = f"{scan_name(ct_path)}_synth_s{seed}"
    case = make_case(ct, lesions, followups, seed, progress=progress, **overrides)
    return write_case(case, out, name)
