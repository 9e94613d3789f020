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

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .files import atomic_output, write_failed


from .imagechecks import ImageError, _fmt, _fmt_matrix, check_finite, check_fits_in_memory, check_geometry
from .imagefiles import _check_checksum, _check_voxel_bytes, _file_layout, _inflate, _is_gzip, _truncated


# ------------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says about its image (read without its voxels by :func:`read_image_header`).

    ``size``, ``spacing`` and ``origin`` are (x, y, z) (voxels, mm, LPS mm); ``direction`` is the
    3x3 matrix as a tuple of rows, with the index axes i, j, k as columns; ``pixel_type`` is
    SimpleITK's name of the voxel type as read (e.g. "16-bit signed integer"); ``components`` is
    1 for the scalar images that pass the checks.
    """

    path: Path
    size: tuple
    spacing: tuple
    origin: tuple
    direction: tuple
    pixel_type: str
    components: int = 1
    bytes_per_voxel: int = 0

    @property
    def shape(self) -> tuple:
        """The array shape (z, y, x) :func:`read_image` will return."""
        return tuple(reversed(self.size))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.array(self.direction, dtype=float)

    @property
    def nbytes(self) -> int:
        """Bytes of the voxel array in memory."""
        return math.prod(self.size) * self.bytes_per_voxel

    def geometry_differences(self, image: "Image", tol: float = 1e-4) -> list:
        """What differs between this header and ``image`` (size, spacing, origin, direction)."""
        out = []
        if tuple(self.size) != tuple(reversed(image.shape)):
            out.append(f"size {self.size} instead of {tuple(reversed(image.shape))}")
        for name, mine, theirs in (("spacing", self.spacing, image.spacing), ("origin", self.origin, image.origin),
                                   ("direction", self.direction_matrix, image.direction)):
            if not np.allclose(mine, theirs, rtol=1e-5, atol=tol):
                shown = _fmt_matrix if name == "direction" else _fmt
                out.append(f"{name} {shown(mine)} instead of {shown(theirs)}")
        return out


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
        check_geometry(tuple(reversed(self.array.shape)), self.spacing, self.origin, self.direction, limits=False)

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


def read_image_header(path, series=()) -> ImageHeader:
    """Read and check an image file's header without its voxels (milliseconds, no big import).

    Checks: the file exists (else ``FileNotFoundError``) and SimpleITK can read it; a 3D scalar
    image (a 4D file with one volume counts as 3D); the geometry (:func:`check_geometry` with its
    limits, plus the raw NIfTI/NRRD/MetaImage fields SimpleITK would silently replace, e.g. a NaN
    origin read as 0); the voxel array fits in memory; and the file holds all the voxel bytes its
    header announces (uncompressed: the file size; gzip: the size in the stream's trailer, and the
    whole stream when that does not match). Everything else raises :class:`ImageError`.

    A folder of DICOM files is one image series (:func:`LesionLocatorLib.dicomseries.read_series_header`;
    ``series``: Series Instance UIDs to choose from when the folder holds several).
    """
    if Path(path).is_dir():
        from .dicomseries import is_dicom_folder, read_series_header

        if is_dicom_folder(path):
            return read_series_header(path, series).header
    return _read_header(path)[0]


def read_image(path, series=()) -> Image:
    """Read a 3D image (NIfTI, NRRD, MHA, ...) with SimpleITK, after :func:`read_image_header`'s checks.

    A 4D file with a single volume is accepted; 2D and real 4D images are refused. Compressed data
    is checked against its checksum (gzip CRC-32, zlib Adler-32; about 40 ms per 150 MB of voxels)
    so that a corrupt file is refused instead of read as garbage, and float images with NaN or
    infinite voxels are refused (:func:`check_finite`).

    A folder of DICOM files is read as one image series (:func:`LesionLocatorLib.dicomseries.read_series`;
    ``series``: Series Instance UIDs to choose from when the folder holds several).
    """
    path = Path(path)
    if path.is_dir():
        from .dicomseries import is_dicom_folder, read_series

        if is_dicom_folder(path):
            return read_series(path, series)[0]
    _, voxels = _read_header(path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ImageError(_unreadable(path, e, voxels)) from None
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    if img.GetDimension() != 3:
        raise ImageError(f"{path}: expected a 3D image, got {img.GetDimension()}D with size {img.GetSize()}")
    try:
        image = Image.from_sitk(img)
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None
    if voxels is not None:
        try:
            _check_checksum(path, voxels, image.array)
        except OSError as e:
            raise ImageError(f"cannot read image {path}: {e.strerror or e}") from None
    check_finite(image, str(path))
    return image


# Formats that keep the voxels in a second file: a temporary header would name a temporary data file.
_DETACHED_ENDINGS = (".mhd", ".nhdr", ".hdr", ".img", ".hdr.gz", ".img.gz")


def write_image(image: Image, path, compress: bool = True) -> Path:
    """Write atomically: to a temporary file in the target folder, check it, then rename.

    The check reads the written header back (:func:`read_image_header`'s integrity checks) and
    compares size, spacing, origin and direction with ``image``. A crash, cancellation, full disk
    (``files.WriteError``, "disk full") or failed check never leaves a file under ``path`` (an
    existing one stays as it was) nor a temporary file beside it.
    """
    path = Path(path)
    if path.name.lower().endswith(_DETACHED_ENDINGS):
        raise ImageError(f"{path}: cannot write this format atomically (it keeps the voxels in a second file); "
                         f"use .nii.gz, .nii, .nrrd or .mha")

    def verify(tmp: Path) -> None:
        header, _ = _read_header(tmp, limits=False)
        differences = header.geometry_differences(image)
        if differences:
            raise ImageError(f"the file read back has {'; '.join(differences)}")

    with atomic_output(path, verify=verify) as tmp:
        try:
            sitk.WriteImage(image.to_sitk(), str(tmp), compress)
        except RuntimeError as e:
            raise write_failed(path, _itk_reason(e)) from None
    return path


# ------------------------------------------------------------------------------ reading headers
def _read_header(path, limits: bool = True):
    """(ImageHeader, _Voxels or None): read_image_header, plus where the voxel bytes are."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageError(f"{path}: not an image file (a folder with no DICOM files)")
    from .dicomseries import is_dicom_file

    if is_dicom_file(path):
        raise ImageError(f"{path}: a single DICOM file (one slice or object); give the folder holding the "
                         f"series' files")
    try:
        voxels = _file_layout(path)  # also refuses raw header fields that SimpleITK would silently replace
    except OSError as e:
        raise ImageError(f"cannot read image {path}: {e.strerror or e}") from None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise ImageError(_unreadable(path, e)) from None
    dim, size = reader.GetDimension(), tuple(reader.GetSize())
    if dim == 4 and size[3] == 1:
        dim = 3
    if dim != 3:
        raise ImageError(f"{path}: expected a 3D image, got {dim}D with size {size}")
    components = reader.GetNumberOfComponents()
    if components != 1:
        raise ImageError(f"{path}: expected a scalar image (one value per voxel), got {components} "
                         f"components per voxel")
    n = reader.GetDimension()
    spacing, origin = tuple(reader.GetSpacing()[:3]), tuple(reader.GetOrigin()[:3])
    direction = np.array(reader.GetDirection(), dtype=float).reshape(n, n)[:3, :3]
    check_geometry(size[:3], spacing, origin, direction, str(path), limits)
    pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    bytes_per_voxel = _bytes_per_voxel(pixel_type) * components
    if limits:
        check_fits_in_memory(size[:3], bytes_per_voxel, str(path))
    if voxels is not None:
        try:
            _check_voxel_bytes(path, voxels)
        except OSError as e:
            raise ImageError(f"cannot read image {path}: {e.strerror or e}") from None
    elif _is_gzip(path):  # a compressed format we do not parse: check the whole stream
        _, problem = _inflate(path, 0, "gzip")
        if problem:
            raise ImageError(f"{path}: truncated or corrupt ({problem})")
    rows = tuple(tuple(float(v) + 0.0 for v in row) for row in direction)
    header = ImageHeader(path, size[:3], spacing, origin, rows, pixel_type, components, bytes_per_voxel)
    return header, voxels


def _itk_reason(e: RuntimeError) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    reason = lines[-1] if lines else "unknown error"
    return re.sub(r"^(sitk::ERROR:|ITK ERROR:)\s*", "", reason)


def _unreadable(path: Path, e: RuntimeError, voxels=None) -> str:
    """The message for a file SimpleITK cannot read: "truncated or corrupt" for a broken
    compressed stream, else SimpleITK's reason."""
    if voxels is not None and voxels.encoding != "raw":
        out, problem = _inflate(voxels.file, voxels.start, voxels.encoding, voxels.compressed_size)
        if problem:
            return _truncated(path, voxels, out - voxels.offset, problem)
    elif _is_gzip(path):
        _, problem = _inflate(path, 0, "gzip")
        if problem:
            return f"{path}: truncated or corrupt ({problem})"
    return f"cannot read image {path}: {_itk_reason(e)}"


def _bytes_per_voxel(pixel_type: str) -> int:
    m = re.search(r"(\d+)-bit", pixel_type)
    n = int(m.group(1)) // 8 if m else 1
    return 2 * n if "complex" in pixel_type else n


# ------------------------------------------------------------------------------ file integrity


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
