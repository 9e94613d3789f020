"""Checks of an image's geometry and voxels, shared by the header reader, the file reader and
:class:`LesionLocatorLib.image.Image`: one place for the rules and their messages.

Geometry is in ITK order (x, y, z), millimetres, LPS; arrays are (z, y, x).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np


class ImageError(ValueError):
    """An image that cannot be used (wrong dimension, unreadable, truncated or corrupt file,
    impossible geometry, NaN voxels, ...). ``str(e)`` is one line naming the file."""


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
    """Raise :class:`ImageError` when a float image (an ``Image`` or an array) holds NaN or
    infinite voxels, with their count and the first one's index (z, y, x). Integer images pass."""
    a = np.asarray(getattr(image, "array", image))
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


def _check_direction(direction, pre: str = "") -> None:
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(direction)):
        raise ImageError(f"{pre}direction matrix is not finite: {_fmt_matrix(direction)}")
    norms = np.linalg.norm(direction, axis=0)
    det = abs(float(np.linalg.det(direction / np.where(norms > 0, norms, 1.0))))
    if np.any(norms < 1e-12) or not det >= MIN_DIRECTION_DET:
        raise ImageError(f"{pre}singular direction matrix {_fmt_matrix(direction)} (columns = index axes i, j, "
                         f"k; |det| = {det:.3g}): its axes do not span 3D space")
