"""3D images with their world geometry, read and written through SimpleITK.

Conventions used everywhere in the library:

* ``Image.array`` is a numpy array in SimpleITK order **(z, y, x)**.
* ``spacing``, ``origin`` and ``direction`` follow ITK: they are given in
  **(x, y, z)** order, in millimetres, in the **LPS** world frame.  ``direction``
  is the 3x3 matrix whose *columns* are the world directions of the index axes
  i (x), j (y), k (z).
* World points are LPS millimetres ``(x, y, z)``; continuous voxel indices
  returned by :meth:`Image.world_to_index` are in array order ``(z, y, x)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .files import atomic_output


class ImageError(ValueError):
    """An image that cannot be used (wrong dimension, unreadable file, ...)."""


@dataclass
class Image:
    """A 3D voxel array with its LPS world geometry.

    ``array`` is (z, y, x); ``spacing``/``origin`` are (x, y, z) millimetres;
    ``direction`` is a 3x3 matrix with the index axes (i=x, j=y, k=z) as columns.
    """

    array: np.ndarray
    spacing: tuple = (1.0, 1.0, 1.0)
    origin: tuple = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self):
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ImageError(f"expected a 3D image, got an array with {self.array.ndim} dimensions "
                             f"(shape {self.array.shape})")
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if min(self.spacing) <= 0:
            raise ImageError(f"spacing must be positive, got {self.spacing}")

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple:
        """Array shape (z, y, x)."""
        return self.array.shape

    @property
    def spacing_zyx(self) -> tuple:
        """Voxel size in millimetres in array order (z, y, x)."""
        return tuple(reversed(self.spacing))

    def index_to_world(self, index_zyx) -> np.ndarray:
        """Continuous voxel index/indices (..., 3) in (z, y, x) -> LPS mm (..., 3) in (x, y, z)."""
        ijk = np.asarray(index_zyx, dtype=float)[..., ::-1]
        return np.asarray(self.origin) + (ijk * np.asarray(self.spacing)) @ self.direction.T

    def world_to_index(self, point_xyz) -> np.ndarray:
        """LPS mm point(s) (..., 3) in (x, y, z) -> continuous voxel index (..., 3) in (z, y, x)."""
        p = np.asarray(point_xyz, dtype=float) - np.asarray(self.origin)
        ijk = (p @ np.linalg.inv(self.direction).T) / np.asarray(self.spacing)
        return ijk[..., ::-1]

    def contains_index(self, index_zyx) -> bool:
        """True if the continuous index rounds to a voxel inside the array."""
        idx = np.round(np.asarray(index_zyx, dtype=float))
        return bool(np.all(idx >= 0) and np.all(idx < np.asarray(self.shape)))

    def same_geometry(self, other: "Image", tol: float = 1e-4) -> bool:
        """True if both images share shape, spacing, origin and direction."""
        return (self.shape == other.shape
                and np.allclose(self.spacing, other.spacing, atol=tol)
                and np.allclose(self.origin, other.origin, atol=tol)
                and np.allclose(self.direction, other.direction, atol=tol))

    def with_array(self, array: np.ndarray) -> "Image":
        """A new image with this geometry and another (z, y, x) array of the same shape."""
        array = np.asarray(array)
        if array.shape != self.shape:
            raise ImageError(f"array shape {array.shape} does not match image shape {self.shape}")
        return Image(array, self.spacing, self.origin, self.direction.copy())

    # --------------------------------------------------------------- conversion
    @classmethod
    def from_sitk(cls, img: sitk.Image) -> "Image":
        if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
            raise ImageError(f"expected a 3D scalar image, got a {img.GetDimension()}D image with "
                             f"{img.GetNumberOfComponentsPerPixel()} component(s) per voxel")
        return cls(sitk.GetArrayFromImage(img), img.GetSpacing(), img.GetOrigin(),
                   np.array(img.GetDirection()).reshape(3, 3))

    def to_sitk(self) -> sitk.Image:
        img = sitk.GetImageFromArray(self.array)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(self.direction.ravel()))
        return img


def read_image(path) -> Image:
    """Read a 3D image (NIfTI, NRRD, MHA, ...) with SimpleITK.

    A 4D file with a single volume is accepted; 2D and real 4D images are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ImageError(f"cannot read image {path}: {str(e).strip().splitlines()[-1]}") from None
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise ImageError(f"{path}: expected a 3D image, got {img.GetDimension()}D with size {img.GetSize()}")
    try:
        return Image.from_sitk(img)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None


def write_image(image: Image, path, compress: bool = True) -> Path:
    """Write atomically: to a temporary file in the target folder, then rename.

    A crash or cancellation never leaves a truncated file under ``path``.
    """
    with atomic_output(path) as tmp:
        sitk.WriteImage(image.to_sitk(), str(tmp), compress)
    return Path(path)


def nonzero_bbox(array: np.ndarray) -> list:
    """Half-open bounding box [[z0, z1], [y0, y1], [x0, x1]] of the nonzero voxels.

    This equals the box nnU-Net crops to (``crop_to_nonzero``: filling holes in
    the nonzero mask never enlarges its bounding box). An all-zero array gives
    the whole array.
    """
    box = []
    for axis in range(array.ndim):
        other = tuple(a for a in range(array.ndim) if a != axis)
        hit = np.flatnonzero(np.any(array != 0, axis=other))
        box.append([int(hit[0]), int(hit[-1]) + 1] if hit.size else [0, array.shape[axis]])
    return box
