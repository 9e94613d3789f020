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

import gzip
import math
import os
import re
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .files import atomic_output, write_failed


class ImageError(ValueError):
    """An image that cannot be used (wrong dimension, unreadable, truncated or corrupt file,
    impossible geometry, NaN voxels, ...). ``str(e)`` is one line naming the file."""


# ------------------------------------------------------------------------------------ geometry
# Bounds for images read from files. Real scans: CT voxels are 0.2-10 mm (PET up to ~6 mm, MR
# slices up to ~10 mm) and a whole-body CT is under 2 m long; 100 mm voxels and 5 m axes are an
# order of magnitude (resp. 2.5x) beyond anything real, so a file outside them has a broken header
# (e.g. spacing in micrometres, or 1e6 read as mm) and would make resampling to the model's
# ~1 mm grid allocate absurd arrays ("Unable to allocate 37.4 GiB").
MAX_SPACING_MM = 100.0
MAX_EXTENT_MM = 5000.0
# Direction matrices are (nearly) orthonormal; |det| of the column-normalised matrix is the sine
# volume of the three axes (1 for orthonormal, 0.87 for a 30 degree gantry tilt). Below 1e-3 two
# axes are within 0.06 degrees of each other: the world position of a voxel is meaningless.
MIN_DIRECTION_DET = 1e-3


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v) + 0.0:.6g}" for v in values) + ")"  # + 0.0: no "-0"


def _fmt_matrix(m) -> str:
    return "(" + ", ".join(_fmt(row) for row in np.asarray(m, dtype=float).reshape(3, 3)) + ")"


def _fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.0f} bytes"


def check_geometry(size_xyz, spacing, origin, direction, where: str = "", limits: bool = True) -> None:
    """Raise :class:`ImageError` unless the geometry is usable.

    Always: spacing finite and > 0, origin finite, direction finite and non-singular (|det| of the
    column-normalised matrix >= ``MIN_DIRECTION_DET``). With ``limits`` (images from files): no
    voxel larger than ``MAX_SPACING_MM`` and no axis longer than ``MAX_EXTENT_MM``. ``size_xyz``,
    ``spacing`` and ``origin`` are (x, y, z); ``direction`` is 3x3 with the index axes as columns.
    ``where`` (a path) starts the message.
    """
    pre = f"{where}: " if where else ""
    spacing = np.asarray(spacing, dtype=float).ravel()
    origin = np.asarray(origin, dtype=float).ravel()
    direction = np.asarray(direction, dtype=float)
    if spacing.size != 3 or origin.size != 3 or direction.size != 9:
        raise ImageError(f"{pre}expected 3 spacings, 3 origin values and a 3x3 direction, got "
                         f"{spacing.size}, {origin.size} and {direction.size} values")
    direction = direction.reshape(3, 3)
    if not np.all(np.isfinite(spacing)):
        raise ImageError(f"{pre}spacing is not finite: {_fmt(spacing)} mm")
    if np.any(spacing <= 0):
        raise ImageError(f"{pre}spacing must be positive, got {_fmt(spacing)} mm")
    if not np.all(np.isfinite(origin)):
        raise ImageError(f"{pre}origin is not finite: {_fmt(origin)} mm")
    _check_direction(direction, pre)
    if not limits:
        return
    size = np.asarray(size_xyz, dtype=float).ravel()
    extent = size * spacing
    if spacing.max() > MAX_SPACING_MM:
        raise ImageError(f"{pre}implausible voxel spacing {_fmt(spacing)} mm (the image would measure "
                         f"{_fmt(extent)} mm): voxels larger than {MAX_SPACING_MM:g} mm mean a broken header")
    if extent.max() > MAX_EXTENT_MM:
        raise ImageError(f"{pre}implausible physical size {_fmt(extent)} mm ({_fmt(size)} voxels of {_fmt(spacing)} "
                         f"mm): no axis of a real scan is longer than {MAX_EXTENT_MM / 1000:g} m")


def _memory_bytes() -> int | None:
    """Physical memory, or the container's limit when lower; None when unknown."""
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        if sys.platform == "win32":
            try:
                import ctypes

                class _Status(ctypes.Structure):
                    _fields_ = [("dwLength", ctypes.c_ulong), ("dwMemoryLoad", ctypes.c_ulong),
                                ("ullTotalPhys", ctypes.c_ulonglong), ("ullAvailPhys", ctypes.c_ulonglong),
                                ("ullTotalPageFile", ctypes.c_ulonglong), ("ullAvailPageFile", ctypes.c_ulonglong),
                                ("ullTotalVirtual", ctypes.c_ulonglong), ("ullAvailVirtual", ctypes.c_ulonglong),
                                ("ullAvailExtendedVirtual", ctypes.c_ulonglong)]
                status = _Status()
                status.dwLength = ctypes.sizeof(_Status)
                if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
                    total = int(status.ullTotalPhys)
            except (AttributeError, OSError):
                pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(Path(limit_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if 0 < limit < (total or limit + 1):
            total = limit
    return total


def check_fits_in_memory(size_xyz, bytes_per_voxel: int, where: str = "", what: str = "voxels") -> None:
    """Raise :class:`ImageError` when an array of ``size_xyz`` voxels of ``bytes_per_voxel`` bytes is
    larger than this machine's memory (instead of numpy's "Unable to allocate ..." later). Also
    useful for an image resampled to a model's spacing."""
    size = [int(n) for n in size_xyz]
    need = math.prod(size) * int(bytes_per_voxel)
    have = _memory_bytes()
    if have is not None and need > have:
        pre = f"{where}: " if where else ""
        raise ImageError(f"{pre}{' x '.join(map(str, size))} {what} of {bytes_per_voxel} byte(s) need "
                         f"{_fmt_bytes(need)}, more than this machine's memory ({_fmt_bytes(have)})")


def check_finite(image, where: str = "") -> None:
    """Raise :class:`ImageError` when a float image (an :class:`Image` or an array) holds NaN or
    infinite voxels, with their count and the first one's index (z, y, x). Integer images pass."""
    a = image.array if isinstance(image, Image) else np.asarray(image)
    if not np.issubdtype(a.dtype, np.inexact) or a.size == 0:
        return
    flat = a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)
    step = 1 << 24  # slabs of 16 M voxels: a bool temporary of 16 MB, not one of the image's size
    first, n_nan, n_inf = None, 0, 0
    for lo in range(0, flat.size, step):
        slab = flat[lo:lo + step]
        if np.isfinite(slab).all():
            continue
        nan = np.isnan(slab)
        n_nan += int(np.count_nonzero(nan))
        n_inf += int(np.count_nonzero(np.isinf(slab)))
        if first is None:
            first = lo + int(np.argmax(~np.isfinite(slab)))
    if first is not None:
        raise ImageError(_non_finite_message(n_nan, n_inf, first, a.shape, where))


def _non_finite_message(n_nan: int, n_inf: int, first: int, shape, where: str = "") -> str:
    pre = f"{where}: " if where else ""
    index = tuple(int(i) for i in np.unravel_index(first, shape))
    return (f"{pre}{n_nan + n_inf} voxel(s) are not finite ({n_nan} NaN, {n_inf} infinite), the first at "
            f"(z, y, x) = {index}")


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


def read_image_header(path) -> ImageHeader:
    """Read and check an image file's header without its voxels (milliseconds, no big import).

    Checks: the file exists (else ``FileNotFoundError``) and SimpleITK can read it; a 3D scalar
    image (a 4D file with one volume counts as 3D); the geometry (:func:`check_geometry` with its
    limits, plus the raw NIfTI/NRRD/MetaImage fields SimpleITK would silently replace, e.g. a NaN
    origin read as 0); the voxel array fits in memory; and the file holds all the voxel bytes its
    header announces (uncompressed: the file size; gzip: the size in the stream's trailer, and the
    whole stream when that does not match). Everything else raises :class:`ImageError`.
    """
    return _read_header(path)[0]


def read_image(path) -> Image:
    """Read a 3D image (NIfTI, NRRD, MHA, ...) with SimpleITK, after :func:`read_image_header`'s checks.

    A 4D file with a single volume is accepted; 2D and real 4D images are refused. Compressed data
    is checked against its checksum (gzip CRC-32, zlib Adler-32; about 40 ms per 150 MB of voxels)
    so that a corrupt file is refused instead of read as garbage, and float images with NaN or
    infinite voxels are refused (:func:`check_finite`).
    """
    path = Path(path)
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
        raise ImageError(f"{path}: not an image file (a folder?)")
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


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False


# ------------------------------------------------------------------------------ file integrity
@dataclass(frozen=True)
class _Voxels:
    """Where a file keeps its voxel bytes, as its header says (sizes in bytes)."""

    file: Path                   # the file that holds them (the image file, or a detached data file)
    start: int | None            # where the stored data begins in ``file``; None: its last ``nbytes`` (raw)
    offset: int                  # bytes before the voxels in the (uncompressed) data (NIfTI: vox_offset)
    nbytes: int                  # voxel bytes announced (a lower bound where unsure)
    encoding: str                # "raw", "gzip" or "zlib"
    compressed_size: int | None = None  # zlib (MetaImage): bytes of compressed data
    dtype: str | None = None     # the stored voxel type with byte order (numpy), for the checksum
    scale: tuple | None = None   # (slope, intercept) SimpleITK applies (NIfTI scl_slope, scl_inter)
    nan_to_zero: bool = False    # the reader silently turns stored NaN/Inf into 0 (NIfTI: niftilib does)


def _file_layout(path: Path):
    """Parse NIfTI-1/2, NRRD and MetaImage headers: raise ImageError for non-finite or singular
    geometry fields, return where the voxels are (None for other formats or when unsure)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(540)
        except (OSError, EOFError, zlib.error):
            return None  # SimpleITK fails next; _unreadable says why
        return _nifti_layout(path, inner, "gzip")
    if head.startswith(b"NRRD"):
        return _nrrd_layout(path, head)
    nifti = _nifti_layout(path, head, "raw")
    if nifti is not None:
        return nifti
    if b"ElementDataFile" in head:
        return _meta_layout(path, head)
    return None


_NIFTI_TYPES = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4", 1024: "i8",
                1280: "u8"}


def _nifti_layout(path: Path, h: bytes, encoding: str):
    if len(h) < 348:
        return None
    for end in "<>":
        sizeof_hdr = struct.unpack_from(end + "i", h, 0)[0]
        if sizeof_hdr in (348, 540):
            break
    else:
        return None
    u = struct.unpack_from
    if sizeof_hdr == 540:
        if len(h) < 540:
            return None
        magic, (datatype, bitpix), dims = h[4:7], u(end + "2h", h, 12), u(end + "8q", h, 16)
        pixdim, vox_offset, scl = u(end + "8d", h, 104), u(end + "q", h, 168)[0], u(end + "2d", h, 176)
        (qcode, scode), quatern, qoffset = u(end + "2i", h, 344), u(end + "3d", h, 352), u(end + "3d", h, 376)
        srow, min_offset = u(end + "12d", h, 400), 544
    else:
        magic, dims, (datatype, bitpix) = h[344:347], u(end + "8h", h, 40), u(end + "2h", h, 70)
        pixdim, vox_offset, scl = u(end + "8f", h, 76), u(end + "f", h, 108)[0], u(end + "2f", h, 112)
        (qcode, scode), quatern, qoffset = u(end + "2h", h, 252), u(end + "3f", h, 256), u(end + "3f", h, 268)
        srow, min_offset = u(end + "12f", h, 280), 352
    if magic not in (b"n+1", b"ni1", b"n+2", b"ni2"):
        return None  # ANALYZE 7.5: no geometry to check
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        return None
    spacing = pixdim[1:1 + min(ndim, 3)]
    if not all(math.isfinite(v) for v in spacing):
        raise ImageError(f"{path}: spacing is not finite: {_fmt(spacing)} mm (NIfTI pixdim)")
    if any(v <= 0 for v in spacing):
        raise ImageError(f"{path}: spacing must be positive, got {_fmt(spacing)} mm (NIfTI pixdim)")
    if qcode > 0:
        if not all(math.isfinite(v) for v in qoffset):
            raise ImageError(f"{path}: origin is not finite: {_fmt(qoffset)} mm (NIfTI qoffset)")
        if not all(math.isfinite(v) for v in quatern):
            raise ImageError(f"{path}: direction is not finite: quaternion {_fmt(quatern)} (NIfTI quatern_b/c/d)")
    if scode > 0:
        rows = np.array(srow, dtype=float).reshape(3, 4)
        if not np.all(np.isfinite(rows[:, 3])):
            raise ImageError(f"{path}: origin is not finite: {_fmt(rows[:, 3])} mm (NIfTI srow)")
        try:
            _check_direction(rows[:, :3], f"{path}: ")
        except ImageError as e:
            raise ImageError(f"{e} (NIfTI sform, spacing included)") from None
    shape = dims[1:1 + ndim]
    stored = _NIFTI_TYPES.get(datatype)
    sizes = [np.dtype(stored).itemsize] if stored else []
    if bitpix > 0 and bitpix % 8 == 0:
        sizes.append(bitpix // 8)
    if not sizes or any(d <= 0 for d in shape) or not math.isfinite(vox_offset) or vox_offset < 0:
        return None
    nbytes = math.prod(shape) * min(sizes)
    slope, inter = (float(v) for v in scl)
    scale = None
    if math.isfinite(slope) and math.isfinite(inter) and slope != 0 and (slope, inter) != (1.0, 0.0):
        scale = (slope, inter)
    dtype = end + stored if stored else None
    if magic in (b"n+1", b"n+2"):
        if vox_offset < min_offset:
            return None
        return _Voxels(path, 0, int(vox_offset), nbytes, encoding, dtype=dtype, scale=scale, nan_to_zero=True)
    # a .hdr/.img pair: the voxels are in the .img (or .img.gz) beside the header
    base = re.sub(r"\.hdr(\.gz)?$", "", path.name, flags=re.IGNORECASE)
    for name in (base + ".img", base + ".img.gz", base + ".IMG"):
        data = path.with_name(name)
        if data.is_file():
            kind = "gzip" if _is_gzip(data) else "raw"
            return _Voxels(data, 0, int(vox_offset), nbytes, kind, dtype=dtype, scale=scale, nan_to_zero=True)
    return None


def _check_direction(direction, pre: str = "") -> None:
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(direction)):
        raise ImageError(f"{pre}direction matrix is not finite: {_fmt_matrix(direction)}")
    norms = np.linalg.norm(direction, axis=0)
    det = abs(float(np.linalg.det(direction / np.where(norms > 0, norms, 1.0))))
    if np.any(norms < 1e-12) or not det >= MIN_DIRECTION_DET:
        raise ImageError(f"{pre}singular direction matrix {_fmt_matrix(direction)} (columns = index axes i, j, "
                         f"k; |det| = {det:.3g}): its axes do not span 3D space")


def _text_header(head: bytes, stop):
    """[(key, value)] of a text header up to the line for which ``stop(key)`` is true, and the
    offset just after that line (None when it is not within ``head``)."""
    fields, pos = [], 0
    while True:
        nl = head.find(b"\n", pos)
        if nl < 0:
            return fields, None
        line = head[pos:nl].decode("latin-1").rstrip("\r")
        pos = nl + 1
        key, value = _split_field(line)
        fields.append((key, value))
        if stop(line, key):
            return fields, pos


def _split_field(line: str):
    for sep in (":=", ":", "="):
        if sep in line and not line.lstrip().startswith("#"):
            key, value = line.split(sep, 1)
            return key.strip().lower(), value.strip()
    return line.strip().lower(), ""


def _non_finite(text: str) -> bool:
    return any(t.lower() in ("nan", "inf", "infinity") for t in re.findall(r"[A-Za-z]+", text))


_NRRD_TYPES = {**dict.fromkeys(("signed char", "int8", "int8_t"), "i1"),
               **dict.fromkeys(("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
               **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
               **dict.fromkeys(("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
               **dict.fromkeys(("int", "signed int", "int32", "int32_t"), "i4"),
               **dict.fromkeys(("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
               **dict.fromkeys(("longlong", "long long", "long long int", "signed long long",
                                "signed long long int", "int64", "int64_t"), "i8"),
               **dict.fromkeys(("ulonglong", "unsigned long long", "unsigned long long int", "uint64",
                                "uint64_t"), "u8"),
               "float": "f4", "double": "f8"}


def _nrrd_layout(path: Path, head: bytes):
    fields, data_start = _text_header(head, lambda line, key: line.strip() == "")
    if data_start is None:
        if len(head) < (1 << 16):  # the whole file: a detached header may end without a blank line
            fields, data_start = _text_header(head + b"\n\n", lambda line, key: line.strip() == "")
        if data_start is None:
            return None
    f = dict(fields)
    for key, what in (("space directions", "direction matrix"), ("space origin", "origin")):
        if key in f and _non_finite(f[key]):
            raise ImageError(f"{path}: {what} is not finite (NRRD {key}: {f[key]})")
    try:
        sizes = [int(v) for v in f["sizes"].split()]
        stored = _NRRD_TYPES[f["type"].lower()]
        encoding = {"raw": "raw", "gzip": "gzip", "gz": "gzip"}[f.get("encoding", "").lower()]
        byte_skip = int(f.get("byte skip", f.get("byteskip", "0")))
        line_skip = int(f.get("line skip", f.get("lineskip", "0")))
    except (KeyError, ValueError):
        return None  # other encodings and types: SimpleITK (teem) checks them as it reads
    if line_skip or any(n <= 0 for n in sizes) or (byte_skip < 0 and encoding != "raw"):
        return None
    order = ">" if f.get("endian", "little").lower() == "big" else "<"
    nbytes = math.prod(sizes) * np.dtype(stored).itemsize
    data_file = f.get("data file", f.get("datafile"))
    if data_file is None:
        if data_start > len(head):
            return None
        file, start = path, data_start
    else:
        if data_file.upper().startswith("LIST") or "%" in data_file or len(data_file.split()) != 1:
            return None
        file, start = path.parent / data_file, 0
    if encoding == "raw":
        return _Voxels(file, None if byte_skip < 0 else start + byte_skip, 0, nbytes, "raw")
    return _Voxels(file, start, byte_skip, nbytes, "gzip", dtype=order + stored)


_META_TYPES = {"MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
               "MET_UINT": "u4", "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8",
               "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


def _meta_layout(path: Path, head: bytes):
    fields, data_start = _text_header(head, lambda line, key: key == "elementdatafile")
    f = dict(fields)
    for key, what in (("elementspacing", "spacing"), ("offset", "origin"), ("origin", "origin"),
                      ("position", "origin"), ("transformmatrix", "direction matrix"),
                      ("rotation", "direction matrix"), ("orientation", "direction matrix")):
        if key in f and _non_finite(f[key]):
            raise ImageError(f"{path}: {what} is not finite (MetaImage {key}: {f[key]})")
    try:
        sizes = [int(v) for v in f["dimsize"].split()]
        stored = _META_TYPES[f["elementtype"].upper()]
        channels = int(f.get("elementnumberofchannels", "1"))
        compressed = f.get("compresseddata", "false").lower() == "true"
        compressed_size = int(f["compresseddatasize"]) if "compresseddatasize" in f else None
        header_size = int(f.get("headersize", "0"))
        data_file = f["elementdatafile"]
    except (KeyError, ValueError):
        return None
    if data_start is None or any(n <= 0 for n in sizes) or channels <= 0:
        return None
    big = any(f.get(k, "false").lower() == "true" for k in ("binarydatabyteordermsb", "elementbyteordermsb"))
    nbytes = math.prod(sizes) * channels * np.dtype(stored).itemsize
    if data_file.upper() == "LOCAL":
        file, start = path, data_start
    elif data_file.upper().startswith("LIST") or "%" in data_file or len(data_file.split()) != 1:
        return None
    else:
        file, start = path.parent / data_file, (None if header_size < 0 else header_size)
    if compressed:
        if compressed_size is None or start is None:
            return None
        return _Voxels(file, start, 0, nbytes, "zlib", compressed_size, dtype=(">" if big else "<") + stored)
    return _Voxels(file, start, 0, nbytes, "raw")


def _truncated(path: Path, voxels: _Voxels, found: int, problem: str | None = None) -> str:
    what = path if voxels.file == path else f"{path}: its data file {voxels.file.name}"
    detail = f"; {problem}" if problem else ""
    return f"{what}: truncated or corrupt (expected {voxels.nbytes} bytes of voxels, found {max(found, 0)}{detail})"


def _check_voxel_bytes(path: Path, voxels: _Voxels) -> None:
    """Refuse a file that holds fewer voxel bytes than its header announces (cheap: sizes only,
    plus a full decompression when a gzip trailer does not match)."""
    try:
        size = voxels.file.stat().st_size
    except FileNotFoundError:
        raise ImageError(f"{path}: its data file {voxels.file} is missing") from None
    if voxels.encoding == "raw":
        have = size - voxels.offset - (voxels.start or 0) if voxels.start is not None else size
        if have < voxels.nbytes:
            raise ImageError(_truncated(path, voxels, have))
    elif voxels.encoding == "zlib":
        have = size - voxels.start
        if have < voxels.compressed_size:
            what = path if voxels.file == path else f"{path}: its data file {voxels.file.name}"
            raise ImageError(f"{what}: truncated or corrupt (expected {voxels.compressed_size} bytes of compressed "
                             f"voxels, found {max(have, 0)})")
    else:
        total = voxels.offset + voxels.nbytes
        if size - voxels.start >= 18:  # the smallest gzip member
            with open(voxels.file, "rb") as f:
                f.seek(size - 4)
                if struct.unpack("<I", f.read(4))[0] == total % (1 << 32):
                    return  # the trailer's uncompressed size (ISIZE) is what the header announces
        out, problem = _inflate(voxels.file, voxels.start, "gzip")  # several members, trailing bytes, or broken
        if problem or out < total:
            raise ImageError(_truncated(path, voxels, out - voxels.offset, problem))


def _inflate(file: Path, start: int, kind: str, length: int | None = None, sink=None):
    """(uncompressed bytes, problem or None) of the gzip members (or zlib stream) at ``start``:
    a full decompression that keeps nothing (``sink`` sees each piece), verifying each CRC/ISIZE
    (Adler-32)."""
    wbits = 31 if kind == "gzip" else 15
    out = 0
    try:
        with open(file, "rb") as f:
            f.seek(start)
            left = length

            def read() -> bytes:
                nonlocal left
                n = 1 << 20 if left is None else min(1 << 20, left)
                data = f.read(n) if n > 0 else b""
                if left is not None:
                    left -= len(data)
                return data

            d, buf = zlib.decompressobj(wbits), b""
            while True:
                if not buf:
                    buf = read()
                    if not buf:
                        return out, None if d.eof else "the compressed data ends early"
                if d.eof:  # a member ended: another one follows, or trailing bytes (ignored, as zlib's gzread does)
                    if kind != "gzip":
                        return out, None
                    while len(buf) < 2 and (more := read()):
                        buf += more
                    if buf[:2] != b"\x1f\x8b":
                        return out, None
                    d = zlib.decompressobj(wbits)
                piece = d.decompress(buf, 1 << 24)
                out += len(piece)
                if sink is not None and piece:
                    sink(piece)
                buf = d.unused_data if d.eof else d.unconsumed_tail
    except zlib.error as e:
        return out, f"invalid compressed data: {e}"
    except OSError as e:
        return out, f"cannot read it: {e.strerror or e}"


def _checksum_matches(voxels: _Voxels, array: np.ndarray) -> bool:
    """True when the stored checksum (gzip CRC-32 / zlib Adler-32) matches the header bytes and
    the voxels SimpleITK returned (converted back to the stored type)."""
    stored = np.dtype(voxels.dtype)
    if array.size * stored.itemsize != voxels.nbytes or voxels.offset > (1 << 24):
        return False
    with open(voxels.file, "rb") as f:
        if voxels.encoding == "gzip":
            f.seek(-8, os.SEEK_END)
            want, isize = struct.unpack("<II", f.read(8))
            if isize != (voxels.offset + voxels.nbytes) % (1 << 32):
                return False
            f.seek(voxels.start)
            prefix = gzip.GzipFile(fileobj=f, mode="rb").read(voxels.offset) if voxels.offset else b""
            if len(prefix) != voxels.offset:
                return False
            update, value = zlib.crc32, zlib.crc32(prefix)
        else:
            f.seek(voxels.start + voxels.compressed_size - 4)
            want = struct.unpack(">I", f.read(4))[0]
            update, value = zlib.adler32, zlib.adler32(b"")
    slabs = array.reshape(array.shape[0], -1) if array.ndim > 1 else array.reshape(1, -1)
    with np.errstate(invalid="ignore", over="ignore"):
        for slab in slabs:
            if voxels.scale is not None:
                slope, inter = voxels.scale
                slab = np.rint((slab.astype(np.float64) - inter) / slope)
            value = update(np.ascontiguousarray(slab.astype(stored, copy=False)), value)
    return value == want


class _NonFiniteCounter:
    """Counts NaN/Inf among stored float voxels fed as bytes (after ``skip`` header bytes)."""

    def __init__(self, dtype: str, skip: int, count: int):
        self.dtype, self.skip, self.left = np.dtype(dtype), skip, count
        self.pending, self.seen, self.n_nan, self.n_inf, self.first = b"", 0, 0, 0, None

    def __call__(self, data: bytes) -> None:
        if self.skip:
            cut = min(self.skip, len(data))
            data, self.skip = data[cut:], self.skip - cut
        data, self.pending = self.pending + data, b""
        n = min(len(data) // self.dtype.itemsize, self.left)
        if n < self.left:
            self.pending = data[n * self.dtype.itemsize:]
        if n:
            self.add(np.frombuffer(data, self.dtype, count=n))

    def add(self, values: np.ndarray) -> None:
        values = values[:max(self.left, 0)]
        bad = ~np.isfinite(values)
        if bad.any():
            self.n_nan += int(np.count_nonzero(np.isnan(values)))
            self.n_inf += int(np.count_nonzero(np.isinf(values)))
            if self.first is None:
                self.first = self.seen + int(np.argmax(bad))
        self.seen += values.size
        self.left -= values.size


def _check_checksum(path: Path, voxels: _Voxels, array: np.ndarray) -> None:
    """Refuse corrupt compressed voxels: a quick CRC of the array read; when that does not match
    (or cannot be computed), a full decompression decides. Where the reader turns NaN/Inf into 0
    (NIfTI), stored float voxels are counted from the file itself."""
    counter = None
    if voxels.nan_to_zero and voxels.dtype is not None and np.dtype(voxels.dtype).kind == "f":
        counter = _NonFiniteCounter(voxels.dtype, voxels.offset, array.size)
    if voxels.encoding == "raw":
        if counter is not None and voxels.start is not None:
            stored = np.memmap(voxels.file, dtype=voxels.dtype, mode="r", offset=voxels.start + voxels.offset,
                               shape=(array.size,))
            for lo in range(0, array.size, 1 << 24):
                counter.add(stored[lo:lo + (1 << 24)])
            del stored
    else:
        try:
            matches = voxels.dtype is not None and _checksum_matches(voxels, array)
        except (OSError, ValueError, EOFError, zlib.error, struct.error):
            matches = False
        if matches:
            return  # the array holds exactly the stored voxels: check_finite(array) sees any NaN
        out, problem = _inflate(voxels.file, voxels.start, voxels.encoding, voxels.compressed_size, counter)
        if problem or out < voxels.offset + voxels.nbytes:
            raise ImageError(_truncated(path, voxels, out - voxels.offset, problem))
    if counter is not None and counter.first is not None:
        raise ImageError(_non_finite_message(counter.n_nan, counter.n_inf, counter.first, array.shape, str(path)))


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
