"""CT-like test volumes with known lesions, built in memory (no downloads).

Every builder returns :class:`LesionLocatorLib.image.Image` objects in LPS
geometry; arrays are (z, y, x), intensities in Hounsfield units.
"""
from __future__ import annotations

import numpy as np

from LesionLocatorLib.image import Image


def oblique_direction(angle_deg: float = 20.0) -> np.ndarray:
    """A rotation about an oblique axis (columns = index axes i, j, k in LPS)."""
    a = np.deg2rad(angle_deg)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    return rz @ rx


def ct_phantom(shape_zyx=(40, 96, 96), spacing_xyz=(1.5, 1.5, 2.5), origin_xyz=(-60.0, -80.0, 30.0),
               direction=None, seed: int = 0, lesions=(), dtype=np.int16):
    """A torso-like CT: air, an elliptic body of soft tissue with noise, two lungs.

    ``lesions`` is a sequence of (center_zyx_voxels, radius_mm, hu) spheres.
    Returns (image, label) where label holds the lesion IDs 1..n (later ones win).
    """
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape_zyx], indexing="ij")
    nz, ny, nx = shape_zyx
    cy, cx = (ny - 1) / 2, (nx - 1) / 2
    body = ((y - cy) / (0.42 * ny)) ** 2 + ((x - cx) / (0.46 * nx)) ** 2 <= 1
    lung_l = ((y - cy + 0.05 * ny) / (0.22 * ny)) ** 2 + ((x - cx - 0.2 * nx) / (0.14 * nx)) ** 2 <= 1
    lung_r = ((y - cy + 0.05 * ny) / (0.22 * ny)) ** 2 + ((x - cx + 0.2 * nx) / (0.14 * nx)) ** 2 <= 1
    arr = np.full(shape_zyx, -1000.0, dtype=np.float32)
    arr[body] = 40.0
    arr[lung_l | lung_r] = -850.0
    arr += rng.normal(0, 12, size=shape_zyx).astype(np.float32)
    label = np.zeros(shape_zyx, dtype=np.uint8)
    sz, sy, sx = tuple(reversed(spacing_xyz))
    for i, (center, radius_mm, hu) in enumerate(lesions, start=1):
        c = np.asarray(center, dtype=float)
        d2 = ((z - c[0]) * sz) ** 2 + ((y - c[1]) * sy) ** 2 + ((x - c[2]) * sx) ** 2
        inside = d2 <= radius_mm ** 2
        arr[inside] = hu + rng.normal(0, 12, size=int(inside.sum()))
        label[inside] = i
    img = Image(arr.astype(dtype), spacing_xyz, origin_xyz,
                np.eye(3) if direction is None else direction)
    return img, img.with_array(label)
