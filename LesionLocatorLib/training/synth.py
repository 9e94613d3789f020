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

__all__ = [
    "AMPLITUDES", "SynthConfig", "LesionInfo", "SynthCase", "make_case", "write_case",
    "run_synth", "body_mask", "lung_mask", "growth_displacement", "stacked_growth_field",
]

#: Amplitudes A of the anatomy-informed transform (supplement 7.1).
AMPLITUDES = (-22.0, -18.0, 15.0, 25.0)
LOCATIONS = ("lung", "soft_tissue", "wall")
KINDS = ("ellipsoid", "lobulated", "spiculated")

BODY_HU = -500.0     # body: HU above this, largest component, holes filled per slice
LUNG_HU = -400.0     # lung: HU below this inside the body
BONE_HU = 300.0      # bone and contrast-filled vessels
AIRWAY_HU = -960.0   # 3-voxel mean below this: airway or bowel gas, not lung parenchyma
HU_MIN, HU_MAX = -1024.0, 3071.0
#: max |d2/dn2 Phi(n / sigma)| * sigma**2 = phi(1): peak strain per unit amplitude at a flat lesion border
PLANE_STRAIN = 0.24197


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class SynthConfig:
    """All knobs of the generator; the defaults follow supplement section 7.

    Sizes are millimetres, probabilities per lesion (vanish) or per follow-up.
    """
    # lesion insertion
    diameter_range_mm: tuple = (3.0, 60.0)        # log-uniform nominal diameter
    new_diameter_range_mm: tuple = (3.0, 15.0)    # lesions appearing at follow-ups
    location_weights: tuple = (("lung", 0.4), ("soft_tissue", 0.4), ("wall", 0.2))
    kind_weights: tuple = (("ellipsoid", 0.35), ("lobulated", 0.4), ("spiculated", 0.25))
    min_gap_mm: float = 5.0                       # free space between lesions' outer extents
    partial_volume_sigma_vox: float = 0.6         # alpha = Gaussian-smoothed mask
    # visibility: the lesion's rim or core differs from the median of the tissue around it
    # by at least max(min_contrast_hu, contrast_per_spread * spread), where spread is the
    # larger of the local noise and the surroundings' robust spread (heterogeneous tissue
    # such as fat next to muscle hides a lesion of small contrast), at most max_contrast_hu
    min_contrast_hu: float = 60.0
    contrast_per_spread: float = 2.0
    max_contrast_hu: float = 180.0
    # lesions with a wall (rim-enhancing, necrotic core): the wall gets that contrast, so the outline
    # is visible; False: the part that stands out more (the rim or the core; before 2026-12)
    visible_wall: bool = True
    # no soft-tissue lesion is darker than water (fluid, necrosis, cysts; fat-containing lesions
    # aside): a hypodense lesion whose contrast rule would take it below this is drawn brighter than
    # its surroundings instead. Without it, a "hypodense" lesion next to fat (tissue median near
    # 0 HU) became fat-dense (-100 HU) and invisible where it touched fat; None: no floor (before
    # 2026-12-01 (5))
    soft_lesion_min_hu: Optional[float] = 0.0
    # how follow-up labels follow the image's trilinear resampling (growth and image-level spatial
    # transform): "linear": a voxel gets a lesion's label where that lesion's trilinearly resampled
    # indicator is >= 0.5, i.e. where the resampled image shows more lesion than surroundings;
    # "nearest": nearest neighbour (before 2026-12-01 (6)), whose outline strays from the image's by
    # up to a voxel in places (see :func:`resample_labels`)
    label_resampling: str = "linear"
    # lesion level (7.1)
    amplitudes: tuple = AMPLITUDES
    sigma_s_range: tuple = (4.0, 5.5)             # mm (voxels of the 1 mm grid)
    r_range: tuple = (-3.5, 3.5)                  # voxel-wise random scaling of A
    sigma_r: float = 3.0                          # mm
    growth_per_amplitude: float = 0.0075          # stacked stages move the border by about
                                                  # this * |A| * radius per follow-up (|A|=20: 15 %)
    max_stages: int = 8
    p_vanish: float = 0.1
    p_new: float = 0.3
    # image level, spatial (7.2)
    spatial_transform: bool = True
    p_elastic: float = 1.0
    elastic_scale: float = 0.05                   # sigma, fraction of the reference patch
    elastic_magnitude: float = 0.05               # max displacement, fraction of half the patch
    reference_patch_mm: tuple = (160.0, 179.2, 179.2)   # z, y, x: 160x224x224 at 1x0.8x0.8 mm
    p_rotation: float = 1.0
    rotation_deg: tuple = (-5.0, 5.0)             # per axis
    p_scaling: float = 0.5
    scaling: tuple = (0.95, 1.05)                 # synchronised over axes
    p_translation: float = 1.0
    translation_vox: tuple = (-5.0, 5.0)          # per axis
    # image level, intensity (7.2), in nnU-Net CT-normalised units
    intensity_transform: bool = True
    p_noise: float = 1.0
    noise_std: tuple = (0.0, 0.05)
    p_blur: float = 0.1
    blur_sigma_vox: tuple = (0.1, 0.2)
    p_brightness: float = 0.15
    brightness: tuple = (0.75, 1.25)
    p_contrast: float = 0.15
    contrast: tuple = (0.75, 1.25)


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


# --------------------------------------------------------------------------- anatomy
def _fill_per_slice(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndimage.binary_fill_holes(mask[k])
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def body_mask(array: np.ndarray) -> np.ndarray:
    """Body of a CT array (z, y, x) in HU: HU > -500, largest component, holes filled per axial slice."""
    return _fill_per_slice(_largest_component(array > BODY_HU))


def lung_mask(array: np.ndarray, body: Optional[np.ndarray] = None, spacing_zyx=(1.0, 1.0, 1.0),
              min_ml: float = 50.0) -> np.ndarray:
    """Lungs: HU < -400 inside the body, components of at least ``min_ml`` (drops gas bubbles)."""
    if body is None:
        body = body_mask(array)
    air = (array < LUNG_HU) & body
    lab, n = ndimage.label(air)
    if n == 0:
        return air
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    sizes = np.bincount(lab.ravel()) * voxel_ml
    sizes[0] = 0
    keep = np.flatnonzero(sizes >= min_ml)
    return np.isin(lab, keep) if keep.size else np.zeros_like(air)


class _Anatomy:
    """Body/lung/soft-tissue maps on a coarse grid (~2.5 mm) used for placement."""

    def __init__(self, ct: np.ndarray, spacing_zyx, cfg: SynthConfig):
        self.shape = ct.shape
        self.spacing = np.asarray(spacing_zyx, float)
        self.stride = np.array([max(1, int(2.5 // s)) for s in self.spacing])
        fz, fy, fx = self.stride
        c = ct[::fz, ::fy, ::fx].astype(np.float32)
        self.cshape = c.shape
        self.cspacing = self.spacing * self.stride
        if not np.any(c > BODY_HU):
            raise ValueError("no body found in the CT: no voxel is above -500 HU "
                             "(an air-only image, or not a CT in Hounsfield units)")
        if not np.any(c < BODY_HU):
            raise ValueError("no body found in the CT: no voxel is below -500 HU, so no air "
                             "surrounds a body (is this a CT in Hounsfield units?)")
        body = body_mask(c)
        voxel_ml = float(np.prod(self.cspacing)) / 1000.0
        if body.sum() * voxel_ml < 5.0:
            raise ValueError(f"no body found in the CT: the largest region above -500 HU is only "
                             f"{body.sum() * voxel_ml:.1f} ml")
        self.body = body
        self.lung = lung_mask(c, body, self.cspacing)
        gas = (c < LUNG_HU) & body
        bone = (c > BONE_HU) & body
        self.soft = body & ~gas & ~bone & (c > -150) & (c < 250)
        # pure air inside the body (trachea, bronchi, bowel gas; lung parenchyma is denser)
        airway = body & (ndimage.uniform_filter(c, 3) < AIRWAY_HU)
        self.lung &= ~airway
        self.has_lung = bool(self.lung.any())
        edt = ndimage.distance_transform_edt
        self.d_body = edt(body, sampling=self.cspacing).astype(np.float32)
        self.d_hard = edt(~(gas | bone | ~body), sampling=self.cspacing).astype(np.float32)
        self.d_bone = edt(~bone, sampling=self.cspacing).astype(np.float32)
        self.d_airway = edt(~airway, sampling=self.cspacing).astype(np.float32)
        if self.has_lung:
            self.d_lung_in = edt(self.lung, sampling=self.cspacing).astype(np.float32)
        else:
            self.d_lung_in = np.zeros(self.cshape, np.float32)
        # intensity normalisation (nnU-Net CT scheme) on body voxels: image-level
        # intensity parameters are given in these normalised units
        vals = c[body]
        lo, hi = np.percentile(vals, [0.5, 99.5])
        vals = np.clip(vals, lo, hi)
        self.mean = float(vals.mean())
        self.std = float(max(vals.std(), 1.0))
        # how far the image-level spatial transform may move a point at mm offset u from the
        # centre along axis a: rotation ~ sin(theta) * (|u_b| + |u_c|), scaling ~ (s - 1) |u_a|,
        # plus translation, elastic displacement and 3 mm of slack
        self.spatial = bool(cfg.spatial_transform)
        self.rot_sin = math.sin(math.radians(max(abs(v) for v in cfg.rotation_deg)))
        self.scale_dev = max(abs(v - 1.0) for v in cfg.scaling)
        elastic_max = cfg.elastic_magnitude * max(cfg.reference_patch_mm) / 2.0
        self.shift_const = (max(abs(v) for v in cfg.translation_vox) * self.spacing + elastic_max + 3.0)
        self._border_ok = {}

    def body_full(self, box) -> np.ndarray:
        """Full-resolution body mask in a box (nearest neighbour from the coarse grid)."""
        idx = [np.clip(np.round(np.arange(b0, b1) / f).astype(int), 0, n - 1)
               for (b0, b1), f, n in zip(box, self.stride, self.cshape)]
        return self.body[np.ix_(*idx)]

    def border_ok(self, rmax: float) -> np.ndarray:
        """Coarse voxels whose ball of radius ``rmax`` stays in the volume after the spatial transform."""
        key = round(float(rmax), 3)
        if key in self._border_ok:
            return self._border_ok[key]
        n = np.asarray(self.shape)
        pos = [np.arange(self.cshape[a]) * self.stride[a] for a in range(3)]
        u = [np.abs(p - (n[a] - 1) / 2.0) * self.spacing[a] for a, p in enumerate(pos)]
        room = [np.minimum(p, n[a] - 1 - p) * self.spacing[a] for a, p in enumerate(pos)]
        ok = np.ones(self.cshape, bool)
        for a in range(3):
            shape = [1, 1, 1]
            shape[a] = -1
            need = np.full(self.cshape, rmax + 3.0, np.float32)
            if self.spatial:
                b, c = [i for i in range(3) if i != a]
                sb, sc = [1, 1, 1], [1, 1, 1]
                sb[b], sc[c] = -1, -1
                need = need + self.rot_sin * (u[b].reshape(sb) + u[c].reshape(sc)) \
                    + (self.scale_dev * u[a] + self.shift_const[a] - 3.0).reshape(shape)
            ok &= room[a].reshape(shape) >= need
        if len(self._border_ok) > 64:
            self._border_ok.clear()
        self._border_ok[key] = ok
        return ok

    def candidates(self, location: str, rmax: float, occupied: list, gap: float) -> np.ndarray:
        """Coarse voxels where a lesion of outer radius ``rmax`` (mm) of this location may centre."""
        ok = (self.d_body >= rmax + 4.0) & (self.d_airway >= rmax + 3.0)
        if location == "lung":
            ok &= self.lung & (self.d_lung_in >= rmax + 1.0)
        elif location == "wall":
            pleural = (self.lung & (self.d_lung_in >= 0.2 * rmax) & (self.d_lung_in <= 0.7 * rmax + 1.0)
                       & (self.d_bone >= 0.6 * rmax))
            bodywall = self.soft & (self.d_body <= rmax + 15.0) & (self.d_hard >= 0.8 * rmax)
            ok &= pleural | bodywall
        else:
            ok &= self.soft & (self.d_hard >= 0.9 * rmax) & (self.d_body >= rmax + 15.0)
        ok &= self.border_ok(rmax)
        for centre_mm, r in occupied:
            reach = r + rmax + gap + 0.15 * (r + rmax)
            lo = np.maximum(np.floor((centre_mm - reach) / self.cspacing), 0).astype(int)
            hi = np.minimum(np.ceil((centre_mm + reach) / self.cspacing) + 1, self.cshape).astype(int)
            if np.any(hi <= lo):
                continue
            grids = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            d2 = sum(((g * cs) - cm) ** 2 for g, cs, cm in zip(grids, self.cspacing, centre_mm))
            sub = ok[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            sub &= d2 > reach ** 2
        return ok


# --------------------------------------------------------------------------- shapes
def _weighted_choice(rng, pairs, allowed=None):
    names = [n for n, _ in pairs if allowed is None or n in allowed]
    w = np.array([w for n, w in pairs if allowed is None or n in allowed], float)
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _unit(rng, n) -> np.ndarray:
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _sample_shape(rng, kind: str, diameter: float) -> dict:
    """Shape parameters (mm, local frame); ``rmax`` bounds the lesion's extent."""
    r = diameter / 2.0
    rot = _random_rotation(rng)
    axes = np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0)])
    axes /= np.prod(axes) ** (1 / 3)
    p = {"kind": kind, "r": r, "rot": rot, "axes": axes}
    if kind == "ellipsoid":
        p["rmax"] = r * axes.max()
    elif kind == "lobulated":
        if rng.random() < 0.5:
            p["sub"] = "spheres"
            k = int(rng.integers(3, 7))
            dirs = _unit(rng, k)
            dist = r * rng.uniform(0.3, 0.55, size=k)
            radii = r * rng.uniform(0.35, 0.6, size=k)
            p["centres"] = dirs * dist[:, None]
            p["radii"] = np.concatenate([[0.75 * r], radii])
            p["centres"] = np.vstack([[0, 0, 0], p["centres"]])
            p["rmax"] = float(np.max(np.linalg.norm(p["centres"], axis=1) + p["radii"]))
        else:
            p["sub"] = "radial"
            p.update(_radial_params(rng, r))
            p["rmax"] = r * axes.max() * (1 + p["amp_sum"])
    else:  # spiculated
        p["sub"] = "spiculated"
        core = 0.8 * r
        p.update(_radial_params(rng, core, max_amp=0.2))
        p["r"] = core
        k = int(rng.integers(6, 15))
        p["sp_dirs"] = _unit(rng, k)
        p["sp_len"] = core * rng.uniform(1.3, 2.0, size=k)
        p["sp_w0"] = core * rng.uniform(0.10, 0.2, size=k) + 0.3
        p["rmax"] = float(max(core * axes.max() * (1 + p["amp_sum"]), p["sp_len"].max()))
    return p


def _radial_params(rng, r, max_amp=0.3) -> dict:
    k = 4
    freqs = _unit(rng, k) * rng.uniform(0.5, 1.5, size=(k, 1))
    amps = rng.uniform(0.3, 1.0, size=k)
    amps *= max_amp / amps.sum()
    return {"freqs": freqs, "phases": rng.uniform(0, 2 * np.pi, size=k), "amps": amps,
            "amp_sum": float(amps.sum())}


def _shape_mask(p: dict, local: np.ndarray) -> np.ndarray:
    """Boolean mask for the shape at local coordinates ``local`` (3, ...) in mm (lesion frame)."""
    x = np.einsum("ij,j...->i...", p["rot"].T, local)
    kind = p["kind"]
    if kind == "lobulated" and p["sub"] == "spheres":
        inside = np.zeros(local.shape[1:], bool)
        for c, rad in zip(p["centres"], p["radii"]):
            inside |= sum((x[i] - c[i]) ** 2 for i in range(3)) <= rad ** 2
        return inside
    xe = x / p["axes"][:, None, None, None]
    rho = np.sqrt(np.sum(xe ** 2, axis=0))
    if kind == "ellipsoid":
        return rho <= p["r"]
    u = xe / np.maximum(rho, 1e-6)
    g = np.zeros_like(rho)
    for f, ph, a in zip(p["freqs"], p["phases"], p["amps"]):
        g += a * np.cos(2 * np.pi * np.einsum("i,i...->...", f, u) + ph)
    inside = rho <= p["r"] * (1 + g)
    if kind == "spiculated":
        for v, length, w0 in zip(p["sp_dirs"], p["sp_len"], p["sp_w0"]):
            t = np.einsum("i,i...->...", v, x)
            perp2 = np.sum(x ** 2, axis=0) - t ** 2
            w = w0 * (1 - np.clip(t, 0, length) / length) + 0.25
            inside |= (t >= 0) & (t <= length) & (perp2 <= w ** 2)
    return inside


# --------------------------------------------------------------------------- appearance
_APPEARANCE = {
    "lung": (("solid", 0.55), ("ground_glass", 0.2), ("necrotic_core", 0.15), ("hyperdense", 0.1)),
    "soft": (("hypodense", 0.35), ("hyperdense", 0.2), ("rim_enhancing", 0.25), ("necrotic_core", 0.2)),
}
_SOFT_APPEARANCES = {name for name, _ in _APPEARANCE["soft"]}


def _appearance_values(rng, appearance: str, local_hu: float):
    """(rim HU, core HU, rim thickness fraction) relative to the local tissue HU."""
    ref = local_hu if local_hu > -30 else 35.0     # fat / air around: relate to soft tissue
    if appearance == "solid":
        v = rng.uniform(-20, 60)
        return v, v, 0.0
    if appearance == "ground_glass":
        v = rng.uniform(-650, -350)
        return v, v, 0.0
    if appearance == "hyperdense":
        v = ref + rng.uniform(20, 80) if local_hu > -300 else rng.uniform(120, 350)
        return v, v, 0.0
    if appearance == "hypodense":
        v = ref - rng.uniform(20, 70)
        return v, v, 0.0
    if appearance == "rim_enhancing":
        return ref + rng.uniform(30, 90), ref - rng.uniform(15, 50), rng.uniform(0.2, 0.4)
    # necrotic core: a soft-tissue wall around fluid
    wall = ref + rng.uniform(-10, 20) if local_hu > -300 else rng.uniform(20, 60)
    core = min(rng.uniform(0, 20), wall - 20)
    return wall, core, rng.uniform(0.25, 0.45)


def visible_values(rim: float, core: float, rim_frac: float, local_hu: float, needed_hu: float,
                   upward: bool, wall: bool = True) -> tuple:
    """(rim, core) in HU such that the lesion's outline has at least ``needed_hu`` of contrast
    against ``local_hu``.

    What touches the surrounding tissue is moved away from it until its contrast is
    ``needed_hu``: the single value of a homogeneous lesion (``rim_frac == 0``, ``rim == core``
    stays true) or the rim (wall) of a rim-enhancing or necrotic lesion; the core inside the
    wall is unchanged. A rim moves upward (an enhancing wall) unless it is already darker than
    the tissue and ``upward`` is False; a homogeneous value moves in the direction of its
    difference (``upward`` when it equals the surroundings). Without this, a necrotic lesion's
    wall (tissue -10..+20 HU) was invisible and its label reached beyond what the image shows.
    ``wall=False``: the older rule, which moved the part of a walled lesion that stood out more
    (often the fluid core, leaving the wall invisible), kept to reproduce older datasets."""
    if rim_frac > 0 and not wall and abs(core - local_hu) > abs(rim - local_hu):
        if abs(core - local_hu) >= needed_hu:
            return rim, core
        up = core > local_hu or (core == local_hu and upward)
        return rim, local_hu + (needed_hu if up else -needed_hu)
    d = rim - local_hu
    if abs(d) >= needed_hu:
        return rim, core
    up = (d > 0 or upward) if rim_frac > 0 and wall else (d > 0 or (d == 0 and upward))
    v = local_hu + (needed_hu if up else -needed_hu)
    return (v, v) if rim_frac == 0 else (v, core)


def above_water(rim: float, core: float, rim_frac: float, local_hu: float, needed_hu: float,
                min_hu: float) -> tuple:
    """(rim, core) in HU with neither below ``min_hu`` (water: what soft-tissue lesions are made of
    is never darker, fat aside).

    A rim (or the single value of a homogeneous lesion, ``rim_frac == 0``) below ``min_hu`` moves
    to ``needed_hu`` above the surrounding tissue's ``local_hu`` (it stays visible, now brighter
    than its surroundings) but not below ``min_hu``; a core inside a wall is raised to ``min_hu``."""
    if rim < min_hu:
        rim = max(local_hu + needed_hu, min_hu)
        if rim_frac == 0:
            return rim, rim
    return rim, max(core, min_hu)


def robust_sigma(values: np.ndarray) -> float:
    """Standard deviation estimated from the median absolute deviation (1.4826 x MAD)."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def _local_noise_hu(crop: np.ndarray, region: np.ndarray) -> float:
    hp = crop - ndimage.uniform_filter(crop, 3)
    vals = hp[region & (crop > -150) & (crop < 250)]
    if vals.size < 50:
        return 12.0
    return float(np.clip(robust_sigma(vals) * 1.2, 3.0, 40.0))


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


def resample_labels(nearest: np.ndarray, sample_indicator) -> np.ndarray:
    """Instance labels resampled as the image is (trilinear): each label ``lid`` of ``nearest`` (the
    nearest-neighbour resampling, which names the labels that can be there) where
    ``sample_indicator(lid)`` (that label's 0/1 indicator resampled trilinearly through the same
    mapping, an array of ``nearest``'s shape) is >= 0.5, i.e. where the image's partial-volume
    mixture holds more of the lesion than of its surroundings; 0 elsewhere. A label whose
    indicator reaches 0.5 nowhere (a lesion shrunk below a voxel or two) keeps its
    nearest-neighbour voxels, so that a lesion exists at a follow-up exactly when nearest
    neighbour says so (it vanishes only when shrunk to nothing or removed).

    Nearest neighbour rounds each source coordinate on its own, so on an oblique outline it
    labels voxels the trilinear image shows as mostly background (and leaves out some it shows as
    mostly lesion): on the demo case a 3 ml lesion's best intensity threshold matched its baseline
    label with Dice 0.97 but its nearest-neighbour follow-up labels with 0.80-0.81."""
    out = np.zeros_like(nearest)
    for lid in np.unique(nearest):
        if lid:
            inside = sample_indicator(lid) >= 0.5
            out[inside if inside.any() else nearest == lid] = lid
    return out


def _erase_lesion(image: np.ndarray, clean: np.ndarray, label: np.ndarray, lid: int, sl) -> None:
    """In place, within ``sl``: lesion ``lid``'s voxels and the voxels within 4 voxels of it (those
    nearer to it than to another lesion: its partial-volume border) take ``clean``'s values, and
    its label becomes 0."""
    lab = label[sl]
    mine = lab == lid
    d_mine = ndimage.distance_transform_edt(~mine)
    others = (lab != 0) & ~mine
    d_other = ndimage.distance_transform_edt(~others) if others.any() else np.full(lab.shape, np.inf)
    region = (d_mine <= 4.0) & (d_mine < d_other)
    image[sl][region] = clean[sl][region]
    lab[mine] = 0


def _block_mean(a: np.ndarray, f) -> np.ndarray:
    """Mean over f[0] x f[1] x f[2] blocks (the array is edge-padded to a multiple of f)."""
    f = tuple(int(v) for v in f)
    if f == (1, 1, 1):
        return a.astype(np.float32)
    pad = [(0, (-n) % k) for n, k in zip(a.shape, f)]
    a = np.pad(a.astype(np.float32), pad, mode="edge")
    s = a.shape
    return a.reshape(s[0] // f[0], f[0], s[1] // f[1], f[1], s[2] // f[2], f[2]).mean(axis=(1, 3, 5))


def stacked_growth_field(mask: np.ndarray, spacing_zyx, amplitude: float, sigma_s: float,
                         rng: np.random.Generator, target_mm: float,
                         cfg: Optional[SynthConfig] = None) -> np.ndarray:
    """Multi-stage anatomy-informed field (supplement 7.1), composed; voxels of ``mask``'s grid.

    Stage k computes :func:`growth_displacement` from the lesion mask as deformed
    by stages 1..k-1 and is composed with them, ``D_k(x) = V_k(x) + D_{k-1}(x + V_k(x))``.
    Stages are stacked until the largest displacement summed over the stages
    reaches ``target_mm`` (the caller chooses it in proportion to |A| and the
    lesion radius, so that small and large lesions change by a similar
    fraction) or ``cfg.max_stages`` is reached.  The smooth field is computed on
    a grid of about 1.5 mm and interpolated back to ``mask``'s grid.
    """
    cfg = cfg or SynthConfig()
    sp = np.asarray(spacing_zyx, float)
    f = np.array([max(1, int(1.5 // s)) for s in sp])
    S0 = _block_mean(mask, f)
    csp = sp * f
    idx = np.indices(S0.shape, dtype=np.float32)
    D = np.zeros((3,) + S0.shape, np.float32)
    moved = 0.0
    for k in range(max(1, int(cfg.max_stages))):
        Sk = S0 if k == 0 else ndimage.map_coordinates(S0, idx + D, order=1, mode="constant")
        if Sk.max() <= 0:
            break
        V = growth_displacement(Sk, csp, amplitude, sigma_s, rng, cfg.r_range, cfg.sigma_r)
        step = float(np.sqrt(np.sum((V * csp[:, None, None, None]) ** 2, axis=0)).max())
        if k > 0:
            at = idx + V
            V = V + np.stack([ndimage.map_coordinates(D[a], at, order=1, mode="nearest") for a in range(3)])
        D = V
        moved += step
        if moved >= target_mm:
            break
    if np.all(f == 1):
        return D
    # back to the full grid: full voxel p sits at coarse coordinate (p - (f - 1) / 2) / f
    full = [(np.arange(n, dtype=np.float32) - (k - 1) / 2) / k for n, k in zip(mask.shape, f)]
    coords = np.stack(np.meshgrid(*full, indexing="ij"))
    return np.stack([ndimage.map_coordinates(D[a], coords, order=1, mode="nearest") * f[a]
                     for a in range(3)]).astype(np.float32)


def growth_displacement(mask: np.ndarray, spacing_zyx, amplitude: float, sigma_s: float,
                        rng: np.random.Generator, r_range=(-3.5, 3.5), sigma_r: float = 3.0,
                        taper_vox: int = 3) -> np.ndarray:
    """The anatomy-informed deformation field of supplement 7.1, in voxels.

    ``V = grad(G_sigma_s * S) * A(x)`` with the gradient taken in millimetres and
    ``sigma_s``, ``sigma_r`` in millimetres.  Returns the displacement (3, z, y, x)
    in voxel units of ``mask``'s grid; the image is resampled at ``x + V(x)``, so
    the gradient (pointing into the lesion) makes ``A > 0`` grow the lesion.

    Voxel-wise random scaling of the amplitude: ``r(x) ~ U(r_min, r_max)`` is
    smoothed with ``G_sigma_r`` and rescaled back to span ``(r_min, r_max)``, and
    ``A(x) = A + r_smooth(x)``.  The supplement writes ``A * (G_sigma_r * r)``; read
    literally with the zero-mean range (-3.5, 3.5) that product would have a
    random sign and almost no magnitude, contradicting its own statement that the
    sign of A decides growth or shrinkage, so the field modulates A around its
    value instead (|A| >= 15 > 3.5 keeps the sign).

    Size adaptation: the blurred mask is divided by its peak (a no-op for lesions
    larger than the kernel, whose blurred interior is 1), and the field is scaled
    by ``kappa = min(1, PLANE_STRAIN / sigma_s**2 / max|d2 B / dx_i2|)`` so that a
    lesion smaller than the kernel is strained no more than a flat lesion border
    is (its unscaled field would fold space and "destroy" it, as the supplement
    warns).  The field is tapered to zero over the outer ``taper_vox`` voxels so
    that the crop pastes back seamlessly.
    """
    sp = np.asarray(spacing_zyx, float)
    blurred = ndimage.gaussian_filter(mask.astype(np.float32), sigma_s / sp, mode="constant")
    peak = float(blurred.max())
    if peak <= 0:
        return np.zeros((3,) + mask.shape, np.float32)
    blurred /= peak
    grads = np.gradient(blurred, *sp)
    strain = max(float(np.abs(np.gradient(grads[a], sp[a], axis=a)).max()) for a in range(3))
    kappa = min(1.0, PLANE_STRAIN / sigma_s ** 2 / max(strain, 1e-12))
    r = rng.uniform(r_range[0], r_range[1], size=mask.shape).astype(np.float32)
    r = ndimage.gaussian_filter(r, sigma_r / sp, mode="reflect")
    peak = float(np.abs(r).max())
    if peak > 0:
        r *= max(abs(r_range[0]), abs(r_range[1])) / peak
    amp = ((amplitude + r) * kappa).astype(np.float32)
    window = np.ones(mask.shape, np.float32)
    for a, n in enumerate(mask.shape):
        ramp = np.clip(np.minimum(np.arange(n), np.arange(n)[::-1]) / max(taper_vox, 1), 0, 1)
        shape = [1, 1, 1]
        shape[a] = n
        window *= ramp.reshape(shape).astype(np.float32)
    disp = np.empty((3,) + mask.shape, np.float32)
    for a in range(3):
        disp[a] = grads[a] * amp * window / sp[a]
    return disp


# --------------------------------------------------------------------------- image level
def _uniform(rng, lo_hi):
    return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _rotation_matrix(angles_rad) -> np.ndarray:
    a, b, c = angles_rad
    r0 = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    r1 = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    r2 = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return r2 @ r1 @ r0


def _sample_image_transform(rng, cfg: SynthConfig, shape, spacing) -> dict:
    """Random parameters of one follow-up's image-level transforms (all drawn, then applied)."""
    p = {"spatial": bool(cfg.spatial_transform)}
    if cfg.spatial_transform:
        rot = [math.radians(_uniform(rng, cfg.rotation_deg)) for _ in range(3)] \
            if rng.random() < cfg.p_rotation else [0.0, 0.0, 0.0]
        scale = _uniform(rng, cfg.scaling) if rng.random() < cfg.p_scaling else 1.0
        trans = [_uniform(rng, cfg.translation_vox) for _ in range(3)] \
            if rng.random() < cfg.p_translation else [0.0, 0.0, 0.0]
        p.update(rotation_deg=[math.degrees(v) for v in rot], scale=scale, translation_vox=trans)
        p["elastic"] = None
        if rng.random() < cfg.p_elastic and cfg.elastic_magnitude > 0:
            sigma_mm = cfg.elastic_scale * np.asarray(cfg.reference_patch_mm, float)
            mag_mm = cfg.elastic_magnitude * np.asarray(cfg.reference_patch_mm, float) / 2.0
            h = float(max(sigma_mm.min() / 2.0, 1.0))     # coarse grid spacing (mm)
            extent = (np.asarray(shape) - 1) * np.asarray(spacing)
            gshape = tuple(int(math.ceil(e / h)) + 1 for e in extent)
            field_ = rng.standard_normal((3,) + gshape).astype(np.float32)
            for a in range(3):
                field_[a] = ndimage.gaussian_filter(field_[a], sigma_mm / h, mode="wrap")
                mx = float(np.abs(field_[a]).max())
                field_[a] *= (mag_mm[a] / mx) if mx > 0 else 0.0
            p["elastic"] = {"grid_mm": h, "field_mm": field_, "max_mm": mag_mm.tolist()}
    if cfg.intensity_transform:
        p["noise_std"] = _uniform(rng, cfg.noise_std) if rng.random() < cfg.p_noise else 0.0
        p["blur_sigma_vox"] = [_uniform(rng, cfg.blur_sigma_vox) for _ in range(3)] \
            if rng.random() < cfg.p_blur else None
        p["brightness"] = _uniform(rng, cfg.brightness) if rng.random() < cfg.p_brightness else None
        if rng.random() < cfg.p_contrast:
            lo, hi = cfg.contrast
            p["contrast"] = float(rng.uniform(lo, 1.0) if (rng.random() < 0.5 and lo < 1)
                                  else rng.uniform(max(lo, 1.0), hi))
        else:
            p["contrast"] = None
        p["noise_seed"] = int(rng.integers(0, 2 ** 63 - 1))
    return p


def _sampling_nodes(p: dict, shape, spacing) -> tuple:
    """Input index (z, y, x) read for each node of a coarse grid, and the grid spacing (mm).

    For an output point at mm offset u from the volume centre the input is read
    at ``M (u + e) + t`` (elastic first, then rotation*scale, then translation),
    as batchgeneratorsv2's SpatialTransform composes them.  The elastic field
    lives on this coarse grid and the rest is affine, so trilinear interpolation
    of the node values gives the exact mapping at every voxel.
    """
    n = np.asarray(shape, float)
    sp = np.asarray(spacing, float)
    centre = (n - 1) / 2
    extent = np.maximum((n - 1) * sp, 1e-6)
    el = p.get("elastic")
    if el is not None:
        h = np.full(3, float(el["grid_mm"]))
        e = el["field_mm"].astype(np.float64)
    else:
        h = extent
        e = np.zeros((3, 2, 2, 2))
    axes = [np.arange(e.shape[1 + a]) * h[a] - centre[a] * sp[a] for a in range(3)]
    u = np.stack(np.meshgrid(*axes, indexing="ij")) + e
    M = _rotation_matrix(np.radians(p["rotation_deg"])) * p["scale"]
    u = np.einsum("ij,j...->i...", M, u) + (np.asarray(p["translation_vox"]) * sp)[:, None, None, None]
    q = u / sp[:, None, None, None] + centre[:, None, None, None]
    return q, h


def _apply_spatial(image: np.ndarray, label: np.ndarray, p: dict, spacing, label_resampling: str = "linear") -> tuple:
    """Resample ``image`` (trilinear, border padding) and ``label`` (``label_resampling``: "linear"
    as :func:`resample_labels`, or "nearest") through a follow-up mapping."""
    import torch
    import torch.nn.functional as F

    shape = image.shape
    nz, ny, nx = shape
    sp = np.asarray(spacing, float)
    q, h = _sampling_nodes(p, shape, sp)
    norm = np.maximum(np.asarray(shape, float) - 1, 1)[:, None, None, None]
    gq = (q / norm) * 2 - 1                                     # grid_sample units, (z, y, x)
    nodes = torch.from_numpy(np.ascontiguousarray(gq[::-1], dtype=np.float32))[None]  # channels x, y, z
    gsz = np.asarray(q.shape[1:], float)
    # where each voxel falls on the node grid, in grid_sample units (separable)
    ax = [torch.from_numpy(((np.arange(n) * s / hh) / max(g - 1, 1) * 2 - 1).astype(np.float32))
          for n, s, hh, g in zip(shape, sp, h, gsz)]
    inp = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    lab = torch.from_numpy(label.astype(np.float32))[None, None]
    out_img = np.empty(shape, np.float32)
    out_lab = np.empty(shape, label.dtype)
    slab = max(1, int(4_000_000 // (ny * nx)))
    with torch.no_grad():
        for z0 in range(0, nz, slab):
            z1 = min(nz, z0 + slab)
            d = z1 - z0
            ident = torch.stack([ax[2][None, None, :].expand(d, ny, nx),
                                 ax[1][None, :, None].expand(d, ny, nx),
                                 ax[0][z0:z1, None, None].expand(d, ny, nx)], dim=-1)[None]
            g = F.grid_sample(nodes, ident, mode="bilinear", padding_mode="border", align_corners=True)
            g = g[0].permute(1, 2, 3, 0)[None].contiguous()
            out_img[z0:z1] = F.grid_sample(inp, g, mode="bilinear", padding_mode="border",
                                           align_corners=True)[0, 0].numpy()
            nearest = F.grid_sample(lab, g, mode="nearest", padding_mode="zeros",
                                    align_corners=True)[0, 0].numpy().astype(label.dtype)
            if label_resampling == "linear":
                nearest = resample_labels(nearest, lambda lid: F.grid_sample(
                    torch.from_numpy((label == lid).astype(np.float32))[None, None], g, mode="bilinear",
                    padding_mode="zeros", align_corners=True)[0, 0].numpy())
            out_lab[z0:z1] = nearest
    return out_img, out_lab


def _apply_intensity(img: np.ndarray, p: dict, mean: float, std: float) -> np.ndarray:
    """Noise, blur, brightness, contrast (in place), parameters in CT-normalised units."""
    if p.get("noise_std"):
        rng = np.random.default_rng(p["noise_seed"])
        scale = np.float32(p["noise_std"] * std)
        for z0 in range(0, img.shape[0], 16):
            sub = img[z0:z0 + 16]
            sub += rng.standard_normal(sub.shape, dtype=np.float32) * scale
    if p.get("blur_sigma_vox"):
        ndimage.gaussian_filter(img, p["blur_sigma_vox"], output=img)
    if p.get("brightness"):
        img -= mean
        img *= np.float32(p["brightness"])
        img += mean
    if p.get("contrast"):
        m = float(img.mean(dtype=np.float64))
        lo, hi = float(img.min()), float(img.max())
        img -= m
        img *= np.float32(p["contrast"])
        img += m
        np.clip(img, lo, hi, out=img)
    return img


def _to_ct(arr: np.ndarray, hu_range=(HU_MIN, HU_MAX)) -> np.ndarray:
    """Float HU -> int16 HU (clipped to ``hu_range``, rounded), slab by slab."""
    out = np.empty(arr.shape, np.int16)
    for z0 in range(0, arr.shape[0], 16):
        sub = np.clip(arr[z0:z0 + 16], hu_range[0], hu_range[1])
        np.rint(sub, out=sub)
        out[z0:z0 + 16] = sub
    return out


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
              progress: Optional[Callable[[float, str], None]] = None, **overrides) -> Path:
    """CLI entry (``lesionlocator synth``): read a CT, make a case, write it; returns the JSON path.

    ``name`` defaults to ``<ct file stem>_synth_s<seed>``.
    """
    ct_path = Path(ct_path)
    ct = read_image(ct_path)
    if name is None:
        stem = ct_path.name
        for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
            if stem.endswith(ext):
                stem = stem[: -len(ext)]
                break
        name = f"{stem}_synth_s{seed}"
    case = make_case(ct, lesions, followups, seed, progress=progress, **overrides)
    return write_case(case, out, name)
