"""The model grid: the image as nnU-Net preprocessing would resample it, built piecewise.

nnU-Net (and upstream LesionLocator) preprocess the *whole* image: crop to the
nonzero box, CT-normalise, resample to the model spacing with the plans'
resampling function, and resample the logits back with another one. All of these
are separable linear maps along the array axes, so every output voxel is a fixed
weighted sum of input voxels along z, y and x. :class:`ModelGrid` computes those
per-axis weight matrices for the *whole* image once (cheap: one matrix per axis)
and then evaluates only the block that is needed:

* :meth:`ModelGrid.extract` returns model-grid voxels ``[lo, hi)`` of the
  normalised image, reading only the original voxels those weights touch;
* :meth:`ModelGrid.logits_to_original` maps a block of model-grid logits back to
  the original grid, marking original voxels whose interpolation would read
  model-grid voxels that were never predicted (upstream leaves those NaN, which
  become background).

The values equal whole-volume preprocessing up to float rounding (the cubic
spline's infinite support is cut where its weights fall below 1e-7).

Index order is the array order (z, y, x) throughout; spacings are mm (z, y, x).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from scipy import ndimage

from .plans import SUPPORTED_RESAMPLING, UnsupportedPlansError  # noqa: F401  (UnsupportedPlansError: re-exported)

ANISOTROPY_THRESHOLD = 3.0
WEIGHT_CUTOFF = 1e-7


def compute_new_shape(old_shape, old_spacing, new_spacing) -> np.ndarray:
    """nnU-Net's rule: round(old_spacing / new_spacing * old_shape) per axis."""
    return np.array([int(round(s / t * n)) for s, t, n in zip(old_spacing, new_spacing, old_shape)])


def separate_axis(force_separate_z, current_spacing, new_spacing, threshold=ANISOTROPY_THRESHOLD):
    """nnU-Net's choice of a low-resolution axis resampled on its own (or None)."""
    def lowres(sp):
        sp = np.asarray(sp, float)
        axes = np.where(max(sp) / sp == 1)[0]
        return int(axes[0]) if len(axes) == 1 else None

    if force_separate_z is not None:
        return lowres(current_spacing) if force_separate_z else None
    for sp in (current_spacing, new_spacing):
        if np.max(sp) / np.min(sp) > threshold:
            return lowres(sp)
    return None


@lru_cache(maxsize=64)
def axis_weights(n_in: int, n_out: int, method: str) -> tuple:
    """(weights (n_out, n_in) float64, support (n_out, n_in) bool) of a 1D resampling.

    ``method``: 'spline0'..'spline5' (scipy zoom, grid mode, edge mode: what
    skimage.resize does for nnU-Net), 'mapcoord0'..'mapcoord5' (scipy map_coordinates
    at (o + 0.5) * n_in / n_out - 0.5, nnU-Net's out-of-plane step), 'linear' and
    'nearest-exact' (torch.nn.functional.interpolate, align_corners=False).
    ``support`` marks the inputs an output reads, even with weight zero (a NaN
    there makes the output NaN), found by resampling one-hot NaN vectors.
    """
    if method.startswith("spline"):
        order = int(method[-1])
        # zoomed as a column of a 2-wide image that is zoomed along its other axis too, as in a 3D
        # resize: scipy copies instead of interpolating when *no* axis changes size, which would hide
        # the neighbour that an unchanged axis still reads when the others change size.
        def run(v):
            two = np.repeat(v[:, None], 2, axis=1)
            return ndimage.zoom(two, (n_out / n_in, 2.0), order=order, mode="nearest", grid_mode=True)[:, 0]
    elif method.startswith("mapcoord"):
        order = int(method[-1])
        coords = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        run = lambda v: ndimage.map_coordinates(v, [coords], order=order, mode="nearest")  # noqa: E731
    elif method in ("linear", "nearest-exact"):
        def run(v):
            t = torch.from_numpy(v.astype(np.float32))[None, None, :]
            return torch.nn.functional.interpolate(t, size=n_out, mode=method)[0, 0].double().numpy()
    else:
        raise UnsupportedPlansError(f"unknown 1D resampling method {method!r}")
    w = np.empty((n_out, n_in))
    support = np.empty((n_out, n_in), dtype=bool)
    prefiltered = method.startswith("spline") and int(method[-1]) > 1
    for j in range(n_in):
        v = np.zeros(n_in)
        v[j] = 1.0
        col = run(v)
        if col.shape != (n_out,):
            raise RuntimeError(f"resampling {n_in} -> {n_out} gave {col.shape[0]} values")
        w[:, j] = col
        if not prefiltered:  # prefiltered splines read everything; cut them by weight instead
            v[j] = np.nan
            support[:, j] = np.isnan(run(v))
    if prefiltered:
        support = np.abs(w) > WEIGHT_CUTOFF
    w = np.where(np.abs(w) > WEIGHT_CUTOFF, w, 0.0)
    return w, support


def axis_methods(fn_name: str, kwargs: dict, current_spacing, new_spacing, old_shape, new_shape) -> list:
    """The 1D method per axis (z, y, x) that an nnU-Net resampling function applies."""
    if fn_name not in SUPPORTED_RESAMPLING:
        raise UnsupportedPlansError(f"resampling function {fn_name!r} in plans.json is not supported; "
                                    f"supported: {', '.join(SUPPORTED_RESAMPLING)}")
    kwargs = dict(kwargs or {})
    if kwargs.get("is_seg"):
        raise UnsupportedPlansError("segmentation-style resampling of images/logits is not supported")
    if fn_name == "resample_data_or_seg_to_shape":
        force = kwargs.get("force_separate_z", False)
        axis = separate_axis(force, current_spacing, new_spacing,
                             kwargs.get("separate_z_anisotropy_threshold", ANISOTROPY_THRESHOLD))
        order, order_z = int(kwargs.get("order", 3)), int(kwargs.get("order_z", 0))
        if np.all(np.asarray(old_shape) == np.asarray(new_shape)):
            return ["identity"] * 3  # nnU-Net returns the data untouched
        return ["identity" if a == axis and old_shape[a] == new_shape[a] else  # skipped out-of-plane step
                f"mapcoord{order_z}" if a == axis else f"spline{order}" for a in range(3)]
    force = kwargs.get("force_separate_z", None)
    axis = separate_axis(force, current_spacing, new_spacing,
                         kwargs.get("separate_z_anisotropy_threshold", ANISOTROPY_THRESHOLD))
    mode = kwargs.get("mode", "linear")
    aniso = kwargs.get("aniso_axis_mode", "nearest-exact")
    if mode != "linear" or aniso not in ("nearest-exact", "linear"):
        raise UnsupportedPlansError(f"torch resampling mode {mode!r}/{aniso!r} is not supported")
    return [aniso if a == axis else "linear" for a in range(3)]


def seg_axis_methods(fn_name: str, kwargs: dict | None, current_spacing, new_spacing, old_shape, new_shape) -> tuple:
    """(1D method per axis, strict) with which the plans' segmentation resampling (``resampling_fn_seg``) maps a
    binary mask: the resampled foreground indicator, thresholded at 0.5.

    ``resample_data_or_seg_to_shape`` (nnU-Net's ``resize_segmentation``): a spline of the seg ``order`` in-plane
    (``order_z``, 0 in nnU-Net's plans, along a separately resampled axis), foreground where >= 0.5.
    ``resample_torch_fornnunet``: trilinear (nearest-exact along a separate axis), foreground where > 0.5
    (``strict``). Without seg kwargs in the plans, nnU-Net's defaults (order 1, order_z 0).
    """
    kwargs = dict(kwargs) if kwargs is not None else {"order": 1, "order_z": 0, "force_separate_z": None}
    kwargs.pop("is_seg", None)
    return (axis_methods(fn_name, kwargs, current_spacing, new_spacing, old_shape, new_shape),
            fn_name == "resample_torch_fornnunet")


def _weights(n_in, n_out, method):
    if method == "identity":
        eye = np.eye(n_in)
        return eye, eye.astype(bool)
    return axis_weights(int(n_in), int(n_out), method)


def apply_axes(block: torch.Tensor, mats: dict) -> torch.Tensor:
    """Apply matrices {axis: (rows_out, cols_in)} to the last three dims of ``block``, in the given order, on the
    block's device."""
    out = block
    for axis, m in mats.items():
        dim = out.dim() - 3 + axis
        mt = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32)).to(out.device)
        out = torch.movedim(torch.tensordot(out, mt, dims=([dim], [1])), -1, dim)
    return out


def apply_separable(block: torch.Tensor, mats) -> torch.Tensor:
    """Apply per-axis matrices [z, y, x] (rows_out, cols_in) to the last three dims of ``block``."""
    return apply_axes(block, {2: mats[2], 1: mats[1], 0: mats[0]})


@dataclass
class ModelGrid:
    """Geometry of one image on one model's grid (all tuples in (z, y, x)).

    ``crop_lo``/``cropped_shape``: nnU-Net's nonzero crop of the original array;
    ``model_shape``: the resampled (preprocessed) shape; ``pad_lo``: padding that
    brings the model grid up to the patch size (``padded`` = model + padding).
    """
    crop_lo: tuple
    cropped_shape: tuple
    model_shape: tuple
    spacing: tuple
    target_spacing: tuple
    patch_size: tuple
    data_methods: list
    prob_methods: list
    clip: tuple | None = None
    mask_methods: list | None = None  # segmentation resampling of masks; None: linear where the data is a spline
    mask_strict: bool = False         # mask foreground where the resampled indicator is > 0.5 (else >= 0.5)
    pad_lo: tuple = field(init=False)
    padded_shape: tuple = field(init=False)

    def __post_init__(self):
        diff = np.maximum(np.asarray(self.patch_size) - np.asarray(self.model_shape), 0)
        self.pad_lo = tuple(int(d // 2) for d in diff)
        self.padded_shape = tuple(int(m + d) for m, d in zip(self.model_shape, diff))

    @classmethod
    def for_image(cls, array: np.ndarray, crop_box, spacing_zyx, configuration: dict) -> "ModelGrid":
        """The grid of ``array`` (z, y, x) cropped to ``crop_box`` for a plans configuration."""
        crop_lo = tuple(int(b[0]) for b in crop_box)
        cropped = tuple(int(b[1] - b[0]) for b in crop_box)
        target = tuple(float(v) for v in configuration["spacing"])
        spacing = tuple(float(v) for v in spacing_zyx)
        model_shape = tuple(int(v) for v in compute_new_shape(cropped, spacing, target))
        data = axis_methods(configuration.get("resampling_fn_data", "resample_data_or_seg_to_shape"),
                            configuration.get("resampling_fn_data_kwargs", {}), spacing, target, cropped, model_shape)
        prob = axis_methods(configuration.get("resampling_fn_probabilities", "resample_data_or_seg_to_shape"),
                            configuration.get("resampling_fn_probabilities_kwargs", {"order": 1}),
                            target, spacing, model_shape, cropped)
        seg, strict = seg_axis_methods(configuration.get("resampling_fn_seg", "resample_data_or_seg_to_shape"),
                                       configuration.get("resampling_fn_seg_kwargs"), spacing, target, cropped,
                                       model_shape)
        return cls(crop_lo, cropped, model_shape, spacing, target,
                   tuple(int(v) for v in configuration["patch_size"]), data, prob,
                   _clip_bounds(array, crop_box, data), seg, strict)

    # ------------------------------------------------------------------ forward
    def data_weights(self, axis: int):
        return _weights(self.cropped_shape[axis], self.model_shape[axis], self.data_methods[axis])

    def input_range(self, axis: int, lo: int, hi: int) -> tuple:
        """Original (cropped) voxel range [a, b) that model-grid rows [lo, hi) read along ``axis``."""
        w, _ = self.data_weights(axis)
        cols = np.flatnonzero(np.any(w[lo:hi] != 0, axis=0))
        return int(cols[0]), int(cols[-1]) + 1

    def extract(self, array: np.ndarray, lo, hi, normalize) -> np.ndarray:
        """Normalised model-grid block [lo, hi) in *padded* coordinates, float32 (z, y, x).

        Voxels in the padding are 0, as nnU-Net pads after normalising.
        ``normalize`` maps an original-resolution float32 block to normalised values.
        """
        out = np.zeros([h - l_ for l_, h in zip(lo, hi)], dtype=np.float32)
        mlo = [max(l_ - p, 0) for l_, p in zip(lo, self.pad_lo)]
        mhi = [min(h - p, m) for h, p, m in zip(hi, self.pad_lo, self.model_shape)]
        if any(b <= a for a, b in zip(mlo, mhi)):
            return out
        ranges = [self.input_range(a, mlo[a], mhi[a]) for a in range(3)]
        src = array[tuple(slice(c + r[0], c + r[1]) for c, r in zip(self.crop_lo, ranges))]
        src = normalize(np.asarray(src, dtype=np.float32))
        mats = {a: self.data_weights(a)[0][mlo[a]:mhi[a], ranges[a][0]:ranges[a][1]] for a in (2, 1, 0)}
        sep = next((a for a, m in enumerate(self.data_methods) if m.startswith("mapcoord")), None)
        block = torch.from_numpy(np.ascontiguousarray(src))
        if sep is None:
            block = apply_axes(block, mats)
            if self.clip is not None:
                lo_v = normalize(np.array(self.clip[0], np.float32))
                hi_v = normalize(np.array(self.clip[1], np.float32))
                block = torch.clamp(block, float(lo_v), float(hi_v))
        else:
            block = apply_axes(block, {a: m for a, m in mats.items() if a != sep})
            if self.clip is not None:
                r = ranges[sep]
                shape = [1, 1, 1]
                shape[sep] = r[1] - r[0]
                lo_v = normalize(np.asarray(self.clip[0][r[0]:r[1]], np.float32)).reshape(shape)
                hi_v = normalize(np.asarray(self.clip[1][r[0]:r[1]], np.float32)).reshape(shape)
                block = torch.minimum(torch.maximum(block, torch.from_numpy(lo_v)), torch.from_numpy(hi_v))
            block = apply_axes(block, {sep: mats[sep]})
        block = block.numpy()
        dst = tuple(slice(a - l_ + p, b - l_ + p) for a, b, l_, p in zip(mlo, mhi, lo, self.pad_lo))
        out[dst] = block
        return out

    def mask_weights(self, axis: int):
        """Per-axis weights of the plans' segmentation resampling (``mask_methods``); without them, like
        :meth:`data_weights` but linear where the data uses a spline."""
        if self.mask_methods is not None:
            method = self.mask_methods[axis]
        else:
            method = self.data_methods[axis]
            if method.startswith("spline"):
                method = "spline1"
        return _weights(self.cropped_shape[axis], self.model_shape[axis], method)

    def extract_mask(self, mask: np.ndarray, lo, hi) -> np.ndarray:
        """Binary mask (z, y, x, original grid) -> float32 0/1 model-grid block [lo, hi) in padded
        coordinates, as the plans' ``resampling_fn_seg`` resamples a segmentation (upstream's preprocessing
        of a previous mask): the resampled foreground indicator thresholded at 0.5 (see
        :func:`seg_axis_methods`)."""
        out = np.zeros([h - l_ for l_, h in zip(lo, hi)], dtype=np.float32)
        mlo = [max(l_ - p, 0) for l_, p in zip(lo, self.pad_lo)]
        mhi = [min(h - p, m) for h, p, m in zip(hi, self.pad_lo, self.model_shape)]
        if any(b <= a for a, b in zip(mlo, mhi)):
            return out
        mats, ranges = {}, []
        for a in range(3):
            w = self.mask_weights(a)[0][mlo[a]:mhi[a]]
            cols = np.flatnonzero(np.any(w != 0, axis=0))
            ranges.append((int(cols[0]), int(cols[-1]) + 1))
            mats[a] = w[:, ranges[a][0]:ranges[a][1]]
        src = mask[tuple(slice(c + r[0], c + r[1]) for c, r in zip(self.crop_lo, ranges))]
        block = apply_axes(torch.from_numpy(np.ascontiguousarray(src, dtype=np.float32)),
                           {2: mats[2], 1: mats[1], 0: mats[0]})
        dst = tuple(slice(a - l_ + p, b - l_ + p) for a, b, l_, p in zip(mlo, mhi, lo, self.pad_lo))
        block = block.numpy()
        out[dst] = ((block > 0.5) if self.mask_strict else (block >= 0.5)).astype(np.float32)
        return out

    def original_to_model(self, index_zyx) -> np.ndarray:
        """Continuous original voxel index (z, y, x) -> continuous unpadded model-grid index."""
        scale = np.asarray(self.model_shape) / np.asarray(self.cropped_shape)
        return (np.asarray(index_zyx, float) - np.asarray(self.crop_lo) + 0.5) * scale - 0.5

    # ----------------------------------------------------------------- backward
    def prob_weights(self, axis: int):
        return _weights(self.model_shape[axis], self.cropped_shape[axis], self.prob_methods[axis])

    def logits_to_original(self, logits: torch.Tensor, lo) -> tuple:
        """Map model-grid logits (C, dz, dy, dx) whose voxel 0 is *padded* voxel ``lo``
        back to the original grid.

        Returns (slices into the original array, logits (C, ...) on those voxels) or
        (None, None) when no original voxel is fully covered. Original voxels whose
        interpolation reads an unpredicted model voxel are left out (background),
        as in upstream where they become NaN.
        """
        klo = [max(l_ - p, 0) for l_, p in zip(lo, self.pad_lo)]
        khi = [min(l_ + n - p, m) for l_, n, p, m in zip(lo, logits.shape[1:], self.pad_lo, self.model_shape)]
        rows, mats = [], []
        for a in range(3):
            w, sup = self.prob_weights(a)
            outside = np.ones(w.shape[1], bool)
            outside[klo[a]:khi[a]] = False
            ok = ~np.any(sup[:, outside], axis=1) & np.any(sup, axis=1)
            idx = np.flatnonzero(ok)
            if idx.size == 0:
                return None, None
            r0, r1 = int(idx[0]), int(idx[-1]) + 1
            rows.append((r0, r1))
            mats.append(w[r0:r1, klo[a]:khi[a]])
        src = logits[(slice(None),) + tuple(slice(k0 - l_ + p, k1 - l_ + p)
                                           for k0, k1, l_, p in zip(klo, khi, lo, self.pad_lo))]
        out = apply_separable(src.float(), mats)
        slices = tuple(slice(c + r0, c + r1) for c, (r0, r1) in zip(self.crop_lo, rows))
        return slices, out


def _clip_bounds(array: np.ndarray, crop_box, methods) -> tuple | None:
    """Raw-intensity bounds that skimage's resize clips cubic-spline output to.

    nnU-Net resizes with ``skimage.transform.resize``, which clips its output to
    the input's [min, max]: of the whole cropped volume, or of each slice when the
    low-resolution axis is resampled separately (then per slice along that axis).
    Normalisation is monotonic, so raw bounds are normalised later.
    """
    splines = [m for m in methods if m.startswith("spline") and int(m[-1]) > 1]
    if not splines:
        return None
    crop = array[tuple(slice(a, b) for a, b in crop_box)]
    sep = next((a for a, m in enumerate(methods) if m.startswith("mapcoord")), None)
    if sep is None:
        return float(crop.min()), float(crop.max())
    other = tuple(a for a in range(3) if a != sep)
    return crop.min(axis=other).astype(np.float64), crop.max(axis=other).astype(np.float64)


def ct_normalizer(intensity: dict):
    """nnU-Net's CTNormalization: clip to the 0.5/99.5 foreground percentiles,
    subtract the mean, divide by the std (values from plans.json)."""
    lo, hi = float(intensity["percentile_00_5"]), float(intensity["percentile_99_5"])
    mean, std = float(intensity["mean"]), max(float(intensity["std"]), 1e-8)

    def run(block: np.ndarray) -> np.ndarray:
        block = np.clip(block, lo, hi)
        block -= mean
        block /= std
        return block
    return run
