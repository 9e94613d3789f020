"""Follow-ups of a case with synthetic lesions (LesionLocator supplement, section 7), and the generator's parameters.

Job: everything that changes between timepoints, as array functions on the baseline frame:

* **Lesion level (7.1)**, anatomy-informed growth/shrinkage: :func:`growth_displacement` (one
  stage, ``V = grad(G_sigma_s * S_lesion) * A(x)``) and :func:`stacked_growth_field` (stages
  stacked and composed until the border has moved by the target); :func:`resample_labels`
  (instance labels resampled as the trilinear image is) and :func:`_erase_lesion` (a lesion
  vanishes: its voxels and partial-volume border take the lesion-free anatomy's values).
* **Image level (7.2)**: :func:`_sample_image_transform` draws one follow-up's elastic
  deformation, rotation, scaling and translation and its Gaussian noise, blur, brightness and
  contrast; :func:`_apply_spatial` and :func:`_apply_intensity` apply them; :func:`_to_ct`
  rounds float HU to int16.
* :class:`SynthConfig`, all knobs of the generator (insertion ones included), lives here
  because this is the lowest module that needs it at run time (:func:`stacked_growth_field`'s
  default); :mod:`.lesions` and :mod:`.synth` import it from here.

Which lesions vanish or appear, and the order of these steps per follow-up, is decided by
:func:`.synth.make_case` (the longitudinal state, ``_State``, lives there too); the overview of
the whole generator is :mod:`.synth`'s docstring.

Units and frames (as in :mod:`LesionLocatorLib.image`): arrays are (z, y, x) voxel grids,
intensities Hounsfield units (float32 while transformed; image-level intensity parameters in
nnU-Net CT-normalised units, mapped to HU with the body's clipped mean/std), spacing and lengths
millimetres (``spacing``/``spacing_zyx`` in z, y, x order).  Displacement fields are
(3, z, y, x) in voxels of the grid they belong to (the image is read at ``x + V(x)``, backward
mapping); the elastic field and rotation/scaling act on mm offsets from the volume centre,
translation is in voxels.  Randomness only through the ``numpy.random.Generator`` passed in.

Never imports slicer, qt or vtk.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage

__all__ = [
    "AMPLITUDES", "HU_MAX", "HU_MIN", "PLANE_STRAIN", "SynthConfig", "growth_displacement",
    "resample_labels", "stacked_growth_field",
]

#: Amplitudes A of the anatomy-informed transform (supplement 7.1).
AMPLITUDES = (-22.0, -18.0, 15.0, 25.0)
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


# --------------------------------------------------------------------------- lesion level (7.1)
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
