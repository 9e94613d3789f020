"""Synthetic lesions in a CT: where they may go, their shapes and their appearance.

Job: what :func:`.synth.make_case` needs to insert a lesion into a lesion-free CT
(the insertion itself, ``_State.insert``, and the choice of kind, size and spot, ``_place``,
are in :mod:`.synth`):

* **Anatomy and placement**: :func:`body_mask` (HU > -500, largest component, holes filled per
  axial slice), :func:`lung_mask` (HU < -400 inside the body, without gas bubbles) and
  ``_Anatomy``, body/lung/soft-tissue maps on a coarse grid (~2.5 mm) with distance maps, which
  lists the spots where a lesion of a given location ('lung', 'soft_tissue', 'wall') and outer
  radius fits: inside the body, away from airways and bone, apart from other lesions, and far
  enough from the image border that the follow-ups' image-level transforms keep it in view.
* **Shapes**: ellipsoids, lobulated blobs (union of spheres or low-frequency radial noise) and
  spiculated blobs (``_sample_shape``, ``_shape_mask``).
* **Appearance**: rim/core intensities relative to the local tissue (hypo-, hyperdense,
  rim-enhancing, necrotic core; solid or ground-glass in lung), made visible against the
  surroundings (:func:`visible_values`) and never darker than water in soft tissue
  (:func:`above_water`); :func:`robust_sigma` and ``_local_noise_hu`` measure the spread.

Units and frames (as in :mod:`LesionLocatorLib.image`): arrays are (z, y, x) voxel grids,
intensities Hounsfield units, spacing, radii, diameters and distances millimetres (spacing in
z, y, x order).  Shape parameters and the local coordinates of ``_shape_mask`` are mm in the
lesion's frame (3, ...), centred on the lesion; ``_Anatomy`` works on a coarse grid
(``stride`` voxels per coarse voxel, ``cspacing`` mm), its candidate maps are boolean arrays of
that grid.  Randomness only through the ``numpy.random.Generator`` passed in.

Never imports slicer, qt or vtk.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from scipy import ndimage

from .followups import SynthConfig

__all__ = [
    "KINDS", "LOCATIONS", "above_water", "body_mask", "lung_mask", "robust_sigma", "visible_values",
]

LOCATIONS = ("lung", "soft_tissue", "wall")
KINDS = ("ellipsoid", "lobulated", "spiculated")

BODY_HU = -500.0     # body: HU above this, largest component, holes filled per slice
LUNG_HU = -400.0     # lung: HU below this inside the body
BONE_HU = 300.0      # bone and contrast-filled vessels
AIRWAY_HU = -960.0   # 3-voxel mean below this: airway or bowel gas, not lung parenchyma


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
