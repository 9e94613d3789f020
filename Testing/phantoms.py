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


def synthetic_body_ct(seed: int, shape=(300, 512, 512), spacing=(0.8, 0.8, 1.5), tissue_sd: float = 10.0,
                      air_sd: float = 1.0) -> np.ndarray:
    """An int16 (z, y, x) CT-like volume of ``shape`` (default 300 x 512 x 512) at ``spacing``
    (x, y, z mm): -1024 outside the round field of view, air (-1000) inside
    it, a body ellipse (soft tissue 40 HU, a fat rim -100, two lungs -850 whose size changes with
    z, an organ 60, a spine 250 with a 900 cortex), Gaussian noise (``tissue_sd`` HU in the body,
    three times that in the lungs, ``air_sd`` in air). zlib level 1 compresses it about 3:1."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    ym = (np.arange(ny) - ny / 2 + 0.5)[:, None] * spacing[1]
    xm = (np.arange(nx) - nx / 2 + 0.5)[None, :] * spacing[0]
    fov = xm ** 2 + ym ** 2 <= (min(nx * spacing[0], ny * spacing[1]) / 2) ** 2
    spine = xm ** 2 + (ym - 85) ** 2 <= 18 ** 2
    cortex = spine & (xm ** 2 + (ym - 85) ** 2 >= 13 ** 2)
    organ = ((xm + 40) / 60) ** 2 + ((ym - 20) / 45) ** 2 <= 1
    background = np.where(fov, -1000.0, -1024.0).astype(np.float32)
    out = np.empty(shape, np.int16)
    for z in range(nz):
        t = z / max(nz - 1, 1)
        a, b = 165 * (1 + 0.06 * np.sin(2 * np.pi * t)), 115 * (1 + 0.04 * np.cos(3 * np.pi * t))
        body = (xm / a) ** 2 + ((ym - 10) / b) ** 2 <= 1
        fat = (xm / (a - 12)) ** 2 + ((ym - 10) / (b - 12)) ** 2 > 1
        lung = ((np.abs(xm) - 70) / 50) ** 2 + ((ym + 5) / (75 * (0.4 + 0.6 * np.sin(np.pi * t)))) ** 2 <= 1
        tissue = np.full((ny, nx), 40.0, np.float32)
        tissue[fat] = -100
        tissue[organ] = 60
        tissue[lung] = -850
        tissue[spine] = 250
        tissue[cortex] = 900
        noise = rng.normal(0, tissue_sd, (ny, nx)).astype(np.float32)
        noise[lung] *= 3
        s = background + np.where(fov, rng.normal(0, air_sd, (ny, nx)).astype(np.float32), 0)
        s[body] = (tissue + noise)[body]
        out[z] = np.rint(s)
    return out
