"""The bytes of image files, read without SimpleITK: where a NIfTI, NRRD or MetaImage file keeps its
voxels according to its header, whether they are all there (truncated files), whether they are intact
(the gzip/zlib checksums SimpleITK never checks) and NaN/Inf voxels that SimpleITK's NIfTI reader
turns into 0 without a word. Used by :func:`LesionLocatorLib.image.read_image` and ``read_image_header``.
"""
from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .imagechecks import ImageError, _check_direction, _fmt, _non_finite_message


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


def _is_gzip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False
