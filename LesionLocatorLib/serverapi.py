"""The HTTP API between ``lesionlocator serve`` (:mod:`LesionLocatorLib.server`) and its client
(:class:`LesionLocatorLib.remote.RemoteRunner`): paths, payloads, and the encodings both sides use.
Torch-free and FastAPI-free (the client needs only the standard library and numpy).

Version 1, every path under ``/v1``. JSON bodies unless said otherwise. World coordinates are
LPS millimetres, arrays (z, y, x), as everywhere in the library. **A client never sends a file
path**: images travel as bytes, models are chosen by name from the server's list.

Authentication: ``Authorization: Bearer <key>`` on every endpoint except ``GET /v1/health``.
The server reads its keys from ``--api-key-file`` (one per line, ``name:key`` or just ``key``;
names default to ``client1``, ``client2``, ... in file order; ``#`` comments). A missing or wrong
key is 401. Keys are compared in constant time. Each key is one **client**: the images it
uploads and the jobs it submits belong to it, and another client's requests for them get 404
exactly as for something that does not exist (separate keys, separate namespaces; image IDs are
content hashes and so guessable, which is why they are namespaced).

Endpoints:

``GET /v1/health``
    ``{"status": "ok", "version": "<package version>", "api": 1}``; no key needed.
``GET /v1/info``
    ``{"version", "api", "devices": ["cpu", ...], "models": [{"name", "prompt_types"}],
    "max_upload_bytes", "max_jobs_per_client", "cache": {"budget_bytes", "used_bytes", "images"},
    "queue": {"queued", "running"}}``.
``PUT /v1/images/{image_id}``
    Body: :func:`encode_image` bytes (``Content-Type: application/octet-stream``). The server
    decodes and checks them and that ``image_id`` is their :func:`image_id`; 201
    ``{"image": image_id, "bytes": <decoded voxel bytes>}``. 413 above the upload limit (the
    ``Content-Length`` is checked before reading), 400 for bytes that do not decode or do not
    match the ID. Cached per client, least recently used evicted first under ``--max-cache-gb``.
``POST /v1/jobs``
    A segmentation::

        {"type": "segment", "image": "<image id>", "model": "<name>",
         "prompts": [{"id": 1, "point": [x, y, z]},
                     {"id": 2, "box": [[x0, y0, z0], [x1, y1, z1]]},
                     {"id": 3, "mask": "<mask id>"}],        # refine: a mask prompt
         "masks": "<encode_masks of the mask prompts, on the image's grid>",  # only with mask prompts
         "options": {"folds": [0] | null, "tta": true | false | null}}

    or a tracking job::

        {"type": "track", "images": ["<baseline id>", "<follow-up id>", ...], "model": "<name>",
         "baseline": "<encode_masks {lesion id: mask on the baseline}>",
         "registration": "simpleitk", "min_volume_ml": 0.0, "min_prompt_fraction": 0.0,
         "names": ["t0", "t1", ...] | null, "options": {...}}

    or corrections of the client's earlier tracking run (kept on the server: the client's last 2
    runs, for ``TRACK_TTL_S``; 409 once it is gone), on the same images, without a baseline::

        {"type": "track", "images": [...], "model": "<name>", "previous": "<job id of that run>",
         "corrections": [{"lesion": 2, "scan": 1, "point": [x, y, z]},
                         {"lesion": 3, "scan": 2, "moved_point": [x, y, z]},
                         {"lesion": 4, "scan": 1, "vanished": true},
                         {"lesion": 9, "scan": 2, "box": [[...], [...]], "new": true}], ...}

    (the entries of a corrections file, :mod:`LesionLocatorLib.correctionfile`, scans by index; no
    mask corrections). Nothing is registered again.

    202 ``{"job": "<job id>", "state": "queued", "position": n}`` (``position``: jobs ahead of it
    in the queue; 0 = next). 409 ``{"detail": "...", "missing": ["<image id>", ...]}`` when an
    image is not (or no longer) cached for this client: the client uploads those and submits
    again. 404 for an unknown model name. 429 when the client already has
    ``max_jobs_per_client`` jobs queued or running. 422 names the invalid field.
``GET /v1/jobs/{job_id}?wait=<seconds>``
    The job's state, answered as soon as its state or progress changes or after ``wait`` seconds
    (at most 30; long polling, so a client hears of a finished job at once; a queued job's
    ``position`` is in every answer, but moving up the queue does not end a wait): ``{"job", "state": "queued" |
    "running" | "done" | "failed" | "cancelled", "position", "progress": 0..1, "message",
    "result": {...} (done), "error": {"kind", "message"} (failed)}``. A segment result:
    ``{"masks": "<encode_masks>", "empty", "overlaps": [[a, b, voxels]], "warnings", "seconds",
    "timings"}``; a track result: ``{"masks": "<encode_masks, keys 't/lesion id'>", "status",
    "timings", "warnings", "seconds", "registrations", "rows"}``. ``error.kind`` is the library
    exception's class name (:func:`LesionLocatorLib.protocol.library_exception` turns it back);
    no traceback is ever sent. A finished job is kept for ``RESULT_TTL_S`` seconds.
``DELETE /v1/jobs/{job_id}``
    Cancel: a queued job is dropped, a running one stops at its next check and frees its device;
    ``{"job", "state"}``.

Errors always have a ``detail`` text of one line; 500s say only that an internal error happened
(the traceback is in the server's log).
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import struct
import zipfile
import zlib

import numpy as np

from .image import Image

API_VERSION = 1
PREFIX = "/v1"
IMAGE_MAGIC = b"LLIMG1\n"
IMAGE_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "float32", "float64")
RESULT_TTL_S = 600.0
TRACK_TTL_S = 8 * 3600.0  # how long a client's tracking run stays correctable (its last 2 runs)
MAX_WAIT_S = 30.0


class EncodingError(ValueError):
    """Bytes that are not an encoded image or mask set (truncated, wrong header, size mismatch)."""


# --------------------------------------------------------------------------- images
def _header(image: Image) -> dict:
    array = np.asarray(image.array)
    if array.dtype.name not in IMAGE_DTYPES:
        raise EncodingError(f"image voxel type {array.dtype.name} is not sent; use one of {', '.join(IMAGE_DTYPES)}")
    return {"dtype": array.dtype.name, "shape": [int(n) for n in array.shape],
            "spacing": [float(v) for v in image.spacing], "origin": [float(v) for v in image.origin],
            "direction": [float(v) for v in np.asarray(image.direction, float).ravel()]}


def _canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def image_id(image: Image) -> str:
    """The image's content ID: SHA-256 (hex) of its geometry and voxels, little-endian C order.
    The same voxels and geometry give the same ID on every machine."""
    array = np.ascontiguousarray(image.array)
    digest = hashlib.sha256(_canonical(_header(image)))
    data = array if array.dtype.byteorder in ("=", "|", "<") and np.little_endian else array.astype(
        array.dtype.newbyteorder("<"))
    digest.update(memoryview(data).cast("B"))
    return digest.hexdigest()


def encode_image(image: Image, level: int = 1) -> bytes:
    """``IMAGE_MAGIC``, a 4-byte little-endian header length, the JSON header (dtype, shape,
    spacing, origin, direction) and the zlib-compressed voxels (C order, little endian;
    ``level`` 1: fast, CT compresses about 3:1)."""
    header = _canonical(_header(image))
    array = np.ascontiguousarray(image.array).astype(np.asarray(image.array).dtype.newbyteorder("<"), copy=False)
    return IMAGE_MAGIC + struct.pack("<I", len(header)) + header + zlib.compress(memoryview(array).cast("B"), level)


def decode_image(data: bytes, max_voxel_bytes: int) -> Image:
    """The :class:`Image` of :func:`encode_image` bytes; :class:`EncodingError` for anything else,
    and for voxels over ``max_voxel_bytes`` (checked from the header before inflating)."""
    data = memoryview(data)
    start = len(IMAGE_MAGIC) + 4
    if len(data) < start or bytes(data[:len(IMAGE_MAGIC)]) != IMAGE_MAGIC:
        raise EncodingError("not an encoded image (wrong magic bytes)")
    (length,) = struct.unpack("<I", data[len(IMAGE_MAGIC):start])
    try:
        header = json.loads(bytes(data[start:start + length]))
        dtype = np.dtype(header["dtype"]).newbyteorder("<")
        shape = tuple(int(n) for n in header["shape"])
        spacing, origin = header["spacing"], header["origin"]
        direction = np.asarray(header["direction"], float).reshape(3, 3)
    except (ValueError, KeyError, TypeError) as e:
        raise EncodingError(f"bad image header ({type(e).__name__}: {e})") from None
    if header["dtype"] not in IMAGE_DTYPES or len(shape) != 3 or min(shape, default=0) < 1:
        raise EncodingError(f"bad image header: dtype {header['dtype']!r}, shape {list(shape)}")
    size = math.prod(shape) * dtype.itemsize  # Python integers: a huge shape cannot wrap around
    if size > max_voxel_bytes:
        raise EncodingError(f"image of {size} voxel bytes is over the limit of {max_voxel_bytes}")
    raw = _inflate_into(data[start + length:], size)
    array = raw.view(dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)
    try:
        return Image(array, spacing, origin, direction)
    except (ValueError, TypeError) as e:  # ImageError: impossible geometry
        raise EncodingError(f"bad image geometry ({e})") from None


def _inflate_into(compressed, size: int, step: int = 1 << 22) -> np.ndarray:
    """The ``size`` bytes that zlib ``compressed`` holds, inflated piece by piece straight into one
    uint8 array (no second copy of the volume, at most ``step`` bytes in flight); EncodingError for
    corrupt data, more or fewer bytes than ``size``, or bytes after the end."""
    out = np.empty(size, np.uint8)
    inflate, filled, offset = zlib.decompressobj(), 0, 0
    try:
        while not inflate.eof:
            if inflate.unconsumed_tail:
                piece = inflate.decompress(inflate.unconsumed_tail, step)
            elif offset < len(compressed):
                piece = inflate.decompress(compressed[offset:offset + step], step)
                offset += step
            else:
                break
            if filled + len(piece) > size:
                raise EncodingError(f"image data holds more than the {size} bytes the header says")
            out[filled:filled + len(piece)] = np.frombuffer(piece, np.uint8)
            filled += len(piece)
    except zlib.error as e:
        raise EncodingError(f"corrupt image data ({e})") from None
    if filled != size or not inflate.eof:
        raise EncodingError(f"image data holds {filled}{'+' if not inflate.eof else ''} bytes, the header says {size}")
    if inflate.unused_data or offset < len(compressed):
        raise EncodingError("image data goes on after its end")
    return out


# --------------------------------------------------------------------------- masks
def encode_masks(masks: dict) -> str:
    """``{key: bool (z, y, x)}`` as base64 text of a compressed npz of
    :func:`LesionLocatorLib.protocol.pack_masks` (each mask cropped to its bounding box)."""
    from .protocol import pack_masks

    buffer = io.BytesIO()
    np.savez_compressed(buffer, **pack_masks({str(k): v for k, v in masks.items()}))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_masks(text: str, shape=None, max_masks=None) -> dict:
    """``{key: bool (z, y, x)}`` from :func:`encode_masks` text (keys as strings); no pickles.

    ``shape`` (z, y, x): when given, every mask must have exactly this shape, and ``max_masks`` (when
    given) caps their number; both are checked from the npz entries' headers before any mask is
    inflated or allocated, so an entry claiming a huge ``@shape`` or block is refused, not allocated."""
    from .protocol import unpack_masks

    if not isinstance(text, str):
        raise EncodingError(f"not an encoded mask set (expected base64 text, got {type(text).__name__})")
    try:
        data = base64.b64decode(text, validate=True)
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise ValueError("a single array, not an npz archive")
        with npz:
            if shape is not None or max_masks is not None:
                _check_mask_entries(npz, shape, max_masks)
            return unpack_masks(npz)
    except (ValueError, KeyError, OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        if isinstance(e, EncodingError):
            raise
        raise EncodingError(f"not an encoded mask set ({type(e).__name__}: {e})") from None


def _entry_header(npz, name: str) -> tuple:
    """(shape, dtype) of one npz entry, read from its .npy header only (nothing inflated beyond it)."""
    with npz.zip.open(name + ".npy") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise EncodingError(f"mask entry {name!r}: unsupported .npy version {version}")
    if dtype.kind not in "biu":
        raise EncodingError(f"mask entry {name!r}: expected integer or boolean voxels, got {dtype}")
    return tuple(shape), dtype


def _small_vector(npz, name: str) -> list:
    """A 3-integer ``@lo`` / ``@shape`` entry (its header checked before it is read)."""
    if _entry_header(npz, name)[0] != (3,):
        raise EncodingError(f"mask entry {name!r}: expected 3 integers (z, y, x)")
    return [int(v) for v in npz[name]]


def _check_mask_entries(npz, shape, max_masks) -> None:
    """Every entry of a mask npz is a mask (``K``) or its ``K@lo`` / ``K@shape`` (see
    :func:`LesionLocatorLib.protocol.pack_masks`); each mask's full shape is ``shape`` and its block
    lies inside it; at most ``max_masks`` masks. Raises :class:`EncodingError` naming the entry."""
    names = npz.zip.namelist()
    if any(not n.endswith(".npy") for n in names):
        raise EncodingError("not an encoded mask set (an entry is not a .npy array)")
    names = {n[:-len(".npy")] for n in names}
    keys = sorted(n for n in names if "@" not in n)
    extra = names - set(keys) - {f"{k}@{part}" for k in keys for part in ("lo", "shape")}
    if extra:
        raise EncodingError(f"mask entry {sorted(extra)[0]!r} belongs to no mask")
    if max_masks is not None and len(keys) > max_masks:
        raise EncodingError(f"{len(keys)} masks, more than the limit of {max_masks}")
    for key in keys:
        _check_mask_entry(npz, names, key, None if shape is None else tuple(int(n) for n in shape))


def _check_mask_entry(npz, names: set, key: str, shape) -> None:
    block, _ = _entry_header(npz, key)
    if len(block) != 3:
        raise EncodingError(f"mask {key!r}: expected a 3-D (z, y, x) block, got shape {list(block)}")
    if (f"{key}@lo" in names) != (f"{key}@shape" in names):
        raise EncodingError(f"mask {key!r}: needs both {key}@lo and {key}@shape, or neither")
    if f"{key}@lo" not in names:
        full, lo = block, [0, 0, 0]
    else:
        full, lo = tuple(_small_vector(npz, f"{key}@shape")), _small_vector(npz, f"{key}@lo")
    if shape is not None and full != shape:
        raise EncodingError(f"mask {key!r}: shape {list(full)} is not the image's (z, y, x) {list(shape)}")
    if min(lo) < 0 or any(a + n > s for a, n, s in zip(lo, block, full)):
        raise EncodingError(f"mask {key!r}: its block {list(block)} at {lo} lies outside the shape {list(full)}")
