"""Prompt channels: how a prompt is drawn into the network's extra input channel, exactly as
upstream LesionLocator encodes it at inference.

Coordinates are voxel indices (z, y, x) of the preprocessed *model grid* (the image resampled
to the plans' spacing, after nnU-Net's nonzero crop); :mod:`LesionLocatorLib.prompts` holds the
user's prompt types and turns them into voxel prompts of the input image first.

* point: a ball of radius :data:`BALL_RADIUS_VOXELS` (model-grid voxels) around the rounded
  mapped voxel;
* box: the mapped half-open box grown by one voxel on each side, filled;
* previous mask: the binary mask itself (resampled by :mod:`LesionLocatorLib.modelgrid`).
"""
from __future__ import annotations

import numpy as np


BALL_RADIUS_VOXELS = 5
"""Point prompts become a ball of this radius (voxels at the model's spacing)."""


def ball(radius: int | None = None) -> np.ndarray:
    """Boolean ball of a (2r+1)^3 grid: voxels with squared distance <= (r + 0.5)^2.

    This is ``skimage.morphology.ball(r, strict_radius=False)``, which upstream uses;
    ``radius`` defaults to :data:`BALL_RADIUS_VOXELS`.
    """
    radius = BALL_RADIUS_VOXELS if radius is None else radius
    g = np.arange(-radius, radius + 1)
    d2 = g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2
    return d2 <= (radius + 0.5) ** 2


def point_to_model_grid(coords_zyx, crop_lo, cropped_shape, model_shape) -> np.ndarray:
    """Upstream's point mapping into the preprocessed (model-spacing) grid.

    ``p' = round(clip(p - crop_lo, 0, cropped_shape) * model_shape / cropped_shape)``
    with numpy's round-half-to-even. Upstream (release) subtracted the crop offset
    twice for points; this is the fixed behaviour (identical when the crop starts at 0).
    """
    p = np.clip(np.asarray(coords_zyx, float) - np.asarray(crop_lo), 0, np.asarray(cropped_shape))
    return np.round(p * np.asarray(model_shape) / np.asarray(cropped_shape)).astype(int)


def box_to_model_grid(box, crop_lo, cropped_shape, model_shape) -> np.ndarray:
    """Upstream's half-open box mapping: floor(min * f), ceil(max * f), then grown by
    one voxel on each side within the preprocessed image. Returns [z0, z1, y0, y1, x0, x1]."""
    b = np.asarray(box, float).reshape(3, 2)
    lo = np.maximum(0, b[:, 0] - np.asarray(crop_lo))
    hi = np.minimum(np.asarray(cropped_shape), b[:, 1] - np.asarray(crop_lo))
    f = np.asarray(model_shape) / np.asarray(cropped_shape)
    lo = np.maximum(0, np.floor(lo * f).astype(int) - 1)
    hi = np.minimum(np.asarray(model_shape), np.ceil(hi * f).astype(int) + 1)
    return np.stack([lo, hi], 1).ravel()


def paint_prompt(channel: np.ndarray, kind: str, model_coords, offset=(0, 0, 0)) -> None:
    """Draw an encoded prompt into ``channel`` (a float32 (z, y, x) block of the model
    grid whose voxel [0, 0, 0] is model-grid voxel ``offset``); 1 inside, untouched outside.

    ``point``: ``model_coords`` = integer centre; a ball of radius 5 clipped at the block.
    ``box``: half-open [z0, z1, y0, y1, x0, x1] filled.
    """
    off = np.asarray(offset, int)
    shape = np.asarray(channel.shape)
    if kind == "point":
        b = ball()
        r = (b.shape[0] - 1) // 2
        c = np.asarray(model_coords, int) - off
        lo, hi = c - r, c + r + 1
        clo, chi = np.maximum(lo, 0), np.minimum(hi, shape)
        if np.any(chi <= clo):
            return
        src = tuple(slice(a - start, b_ - start) for a, b_, start in zip(clo, chi, lo))
        dst = tuple(slice(a, b_) for a, b_ in zip(clo, chi))
        channel[dst] = np.maximum(channel[dst], b[src])
    elif kind == "box":
        bx = np.asarray(model_coords, int).reshape(3, 2) - off[:, None]
        lo, hi = np.maximum(bx[:, 0], 0), np.minimum(bx[:, 1], shape)
        if np.any(hi <= lo):
            return
        channel[tuple(slice(a, b_) for a, b_ in zip(lo, hi))] = 1
    else:
        raise ValueError(f"cannot paint prompt kind {kind!r}")
