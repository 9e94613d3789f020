"""The wire protocol between a front end and a worker process (one definition for both sides).

Wire protocol for out-of-process runners (one JSON object per line on the worker's
stdin/stdout, or one per WebSocket/HTTP message for a server)::

    -> {"type": "hello", "protocol": "lesionlocator-runner/1"}     # "protocol" optional
    <- {"type": "ready", "protocol": "lesionlocator-runner/1", "library": "0.1.0",
        "torch": "2.13.0", "devices": ["cpu", "cuda"], "pid": 1234, "session": true}

    -> {"type": "segment", "id": "<request id>",
        "image": {"file": "/tmp/ll/req1.nrrd"}     # .nrrd/.nii/.nii.gz/.mha in the session folder
                                                  # (+ "cache": "<key>": keep it under this key)
              or {"cached": "<key>"}              # an image sent before with "cache": "<key>"
              or {"shm": "<shared memory name>", "shape": [z, y, x], "dtype": "int16",
                  "spacing": [x, y, z], "origin": [x, y, z],        # mm, LPS
                  "direction": [9 numbers, row-major, columns = index axes i, j, k]},
        "frame": "LPS", "units": "mm",
        "prompts": [{"id": 1, "point": [x, y, z]},
                    {"id": 2, "box": [[x0, y0, z0], [x1, y1, z1]]},
                    {"id": 3, "mask": {"file": "/tmp/ll/req1_prompts.npz", "key": "3"}}],
                    # a mask prompt: the mask under "key" in an npz ("Mask files" below), on the
                    # request image's voxel grid; runs with the previous-mask (LesionLocatorTrack)
                    # model, one patch centred on the mask's centre of mass
        "model": {"path": "/models/LesionLocatorCheckpoint", "folds": [0] or null,
                  "device": "auto", "tta": null},
        "output": "/tmp/ll/req1_masks.npz"}                          # where the masks go
    <- {"type": "progress", "id": "...", "fraction": 0.4, "message": "patch 2/5"}   (0..n times)
    <- {"type": "result", "id": "...",
        "masks": {"file": "/tmp/ll/req1_masks.npz"}   # npz, see "Mask files" below
              or {"shm": "<name>", "shape": [n, z, y, x], "ids": [1, 2]},
        "empty": [2], "overlaps": [[1, 2, 35]], "warnings": ["..."], "seconds": 1.8,
        "timings": {"preprocessing": 0.2, "network": 1.4, "postprocessing": 0.1},
        "loads": 1}                                   # models loaded from disk so far
    or <- {"type": "error", "id": "...", "error": "PromptError" | "ModelLayoutError" |
           "CheckpointError" | "MemoryError" | ..., "message": "<the library's message>"}
           ("ImageNotCached": the worker no longer holds that key; send the file again)
    or <- {"type": "cancelled", "id": "..."}

    -> {"type": "cancel", "id": "..."}       # the worker stops between network batches
    -> {"type": "load", "id": "...", "model": {...}, "prompt_types": ["point", "box", "prev_mask"]}
    <- {"type": "loaded", "id": "...", "loads": 2}   # optional: warm the model cache
    -> {"type": "shutdown"}

    -> {"type": "track", "id": "...",
        "images": [{"file": "t0.nrrd"}, {"file": "t1.nrrd"}, ...],  # baseline first, then time order
        "frame": "LPS", "units": "mm",
        "baseline": {"file": "baseline.npz"},          # one mask per lesion ID on images[0]
        "model": {...}, "registration": "simpleitk", "registration_options": {} or null,
        "min_volume_ml": 0.0, "min_prompt_fraction": 0.0,  # optional: track()'s options
        "names": ["baseline", "fu1", ...],             # optional: scan names in the rows
        "previous": {"folder": "state0"},              # optional: an earlier run saved by
                                                       #   LesionLocatorLib.trackstate on these images:
                                                       #   not tracked again, only corrected
        "corrections": {"file": "corrections.json"},   # optional: LesionLocatorLib.correctionfile
                                                       #   (scans by index; mask files in the session)
        "state": {"folder": "state1"},                 # optional: save this run there (trackstate)
        "output": "tracked.npz"}
    <- {"type": "progress", ...}                       (0..n times)
    <- {"type": "result", "id": "...", "masks": {"file": "tracked.npz"},   # keys "<t>/<lesion id>"
        "status": {"1": ["tracked", "tracked", "vanished"], ...},
        "timings": {"registration": 6.1, "network": 2.0, ...}, "warnings": [...],
        "registrations": [{"backend": "simpleitk", "result": "affine + demons", ...}, ...],
        "rows": [{"lesion_id": 1, "timepoint": "t0", "volume_ml": 9.0, ...}, ...],  # measurements
        "seconds": 9.3, "loads": 2}
    or "error" / "cancelled" as for "segment"; "cancel" works the same way.

Mask files (``.npz``): a mask stored under key K is either the full (z, y, x) uint8 array, or
(what the worker writes) the uint8 block of its bounding box under K with ``K@lo`` (the block's
first voxel, z, y, x) and ``K@shape`` (the full shape); an empty mask is a (0, 0, 0) block.
Segment results and mask prompts use K = "<prompt id>", track results K = "<timepoint>/<lesion id>",
track baselines K = "<lesion id>".

:class:`WorkerProcessRunner` is the client of :mod:`LesionLocatorLib.worker`, a local
process speaking this protocol over stdin/stdout with files in a temporary folder.

Masks go through a file or shared memory, never inline JSON. Error types are the
library's exception class names, so a front end can re-raise the same exception with the
same message.

Checks (:func:`parse_message`, :func:`validate_message`): the worker checks every line before it
queues or acts on it, and answers a bad one with ::

    <- {"type": "error", "id": "<its id, or null>", "error": "ProtocolError",
        "message": "prompts[1].box: expected 2 corners of 3 numbers, got [1, 2, 3]"}

and keeps serving; nothing is started. A line must be UTF-8 JSON holding one object, with no
duplicate keys. Each message type has a fixed set of fields (an unknown field is an error, so a
misspelt option is never ignored): ``id`` a non-empty string (at most 200 characters);
``frame`` "LPS" and ``units`` "mm" (required); ``model`` {path: non-empty string, folds: null
or a non-empty list of fold numbers >= 0 / "all", device: auto | cpu | mps | cuda | cuda:N,
tta: null or a boolean}; each prompt exactly one of ``point`` (3 finite numbers), ``box`` (2
corners of 3 finite numbers) or ``mask`` ({file, key}; key a prompt ID, default the prompt's
own), with ``id`` an integer 1..65535, unique in the message; an image exactly one of ``file``
(+ optional ``cache`` key), ``cached`` or ``shm`` (with shape: 3 positive integers, dtype: a
numeric type name, spacing: 3 finite numbers > 0, origin: 3 finite numbers, direction: 9 finite
numbers); ``registration`` one of :data:`REGISTRATION_BACKENDS`; ``registration_options`` null
or an object of named numbers, strings, booleans and lists of them; ``min_volume_ml`` and
``min_prompt_fraction`` numbers >= 0; ``names`` null or one string per image;
``prompt_types`` (load) a non-empty list of point / box / prev_mask.

The session folder: files travel only through a private folder that the front end creates
(:class:`~LesionLocatorLib.runner.WorkerProcessRunner`: a ``tempfile.TemporaryDirectory``) and
names when it starts the worker: ``python -m LesionLocatorLib.worker --session DIR``. Every file
path of a message (``image.file``, ``images[t].file``, ``prompts[i].mask.file``,
``baseline.file``, ``output``) is resolved against that folder when relative, then with
``os.path.realpath`` (symlinks followed), and must lie inside it; anything else is refused
("image.file: /etc/passwd is outside the session folder"). A worker started without
``--session`` takes no file path at all (images through ``shm`` or ``cached`` still work). The
model ``path`` is not a session file: model folders live in the user's folders and the zoo
cache, and are checked as data by the loader. Image files must be ``.nrrd``, ``.nii``,
``.nii.gz`` or ``.mha``, their content what the ending says, with the voxels inside the file
(a detached-data header, which would make the reader open another file, is refused);
``output`` must end with ``.npz`` and not be a folder. A result names its mask file by that
resolved path. The worker writes ``output`` atomically
(:func:`LesionLocatorLib.files.atomic_output`, read back before the rename): a failed write
leaves neither the file nor a temporary file.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np

PROTOCOL = "lesionlocator-runner/1"


class ImageNotCached(KeyError):
    """The worker no longer holds the image key a request names: send the file again."""


def mask_bbox(mask) -> tuple:
    """Half-open bounding box (lo, hi) of a boolean mask, as two int arrays; (0, 0, 0) twice
    for an empty mask. Fast on large volumes (projections, no voxel list)."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        if not hit.size:
            return np.zeros(mask.ndim, dtype=int), np.zeros(mask.ndim, dtype=int)
        lo.append(int(hit[0]))
        hi.append(int(hit[-1]) + 1)
    return np.asarray(lo), np.asarray(hi)


def pack_masks(masks: dict) -> dict:
    """``{key: bool (z, y, x)}`` -> npz entries: each mask cropped to its bounding box
    (``key``), with ``key@lo`` and ``key@shape`` (see "Mask files" above)."""
    out = {}
    for key, mask in masks.items():
        mask = np.asarray(mask, dtype=bool)
        lo, hi = mask_bbox(mask)
        out[str(key)] = np.ascontiguousarray(mask[tuple(slice(a, b) for a, b in zip(lo, hi))], dtype=np.uint8)
        out[f"{key}@lo"] = np.asarray(lo, dtype=np.int64)
        out[f"{key}@shape"] = np.asarray(mask.shape, dtype=np.int64)
    return out


def timepoint_keys(masks_by_time) -> dict:
    """Per-timepoint ``[{lesion id: mask}, ...]`` -> ``{"<t>/<lesion id>": mask}`` (a track result's
    mask keys, see "Mask files" above)."""
    return {f"{t}/{pid}": mask for t, per in enumerate(masks_by_time) for pid, mask in per.items()}


def by_timepoint(masks: dict, n_images: int) -> list:
    """The inverse of :func:`timepoint_keys` for ``n_images`` scans: ``[{lesion id: mask}, ...]``."""
    out = [{} for _ in range(n_images)]
    for key, mask in masks.items():
        t, pid = key.split("/")
        out[int(t)][int(pid)] = mask
    return out


def unpack_masks(data) -> dict:
    """npz entries (an open ``np.load`` or a dict) -> ``{key: bool (z, y, x)}``; reads full
    masks and cropped ones (see :func:`pack_masks`)."""
    keys = list(data.files if hasattr(data, "files") else data.keys())
    out = {}
    for key in keys:
        if "@" in key:
            continue
        block = np.asarray(data[key]).astype(bool)
        if f"{key}@lo" not in keys:
            out[key] = block
            continue
        lo = [int(v) for v in data[f"{key}@lo"]]
        mask = np.zeros(tuple(int(v) for v in data[f"{key}@shape"]), dtype=bool)
        mask[tuple(slice(a, a + n) for a, n in zip(lo, block.shape))] = block
        out[key] = mask
    return out


def library_exception(kind: str, message: str) -> Exception:
    """Re-create the library exception the worker reported, with the same message."""
    from . import image, plans, prompts
    from .modelfolder import CheckpointError

    known = {"PromptError": prompts.PromptError, "ModelLayoutError": plans.ModelLayoutError,
             "PlansError": plans.PlansError,
             "UnsupportedPlansError": plans.UnsupportedPlansError,
             "CheckpointError": CheckpointError, "ImageError": image.ImageError,
             "ImageNotCached": ImageNotCached, "ProtocolError": ProtocolError,
             "MemoryError": MemoryError, "FileNotFoundError": FileNotFoundError, "ValueError": ValueError}
    try:
        from . import register
        known["RegistrationError"] = register.RegistrationError
    except ImportError:
        pass
    try:
        from .files import WriteError
        known["WriteError"] = WriteError
    except ImportError:
        pass
    cls = known.get(kind)
    return cls(message) if cls is not None else WorkerError(f"{kind}: {message}")


class WorkerError(RuntimeError):
    """The worker process failed (crashed, could not start, or sent an unknown error type)."""


# ------------------------------------------------------------------------------ message checks
class ProtocolError(ValueError):
    """A message that breaks the protocol; the text starts with the field: '<field>: <what is wrong>'."""


MESSAGE_TYPES = ("hello", "segment", "track", "load", "cancel", "shutdown")
REGISTRATION_BACKENDS = ("simpleitk", "none", "greedy", "unigradicon")  # = register.BACKENDS (tested)
PROMPT_TYPES = ("point", "box", "prev_mask")
MODEL_BACKENDS = ("torch", "openvino", "openvino-bf16")  # = modelfolder.BACKENDS (tested)
MAX_PROMPT_ID = 65535
MAX_ID_CHARS = 200
IMAGE_DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64", "float32", "float64")
IMAGE_ENDINGS = (".nrrd", ".nii", ".nii.gz", ".mha")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d{1,3})?)$")
OPTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
SHM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}$")
NO_SESSION = "this worker was started without a session folder (--session DIR), so it takes no file paths"

_FIELDS = {  # type -> (required, optional) top-level fields
    "hello": ((), ("id", "protocol")),
    "segment": (("id", "image", "frame", "units", "prompts", "model", "output"), ()),
    "track": (("id", "images", "frame", "units", "baseline", "model", "output"),
              ("registration", "registration_options", "min_volume_ml", "min_prompt_fraction", "names", "previous",
               "corrections", "state")),
    "load": (("id", "model"), ("prompt_types",)),
    "cancel": (("id",), ()),
    "shutdown": ((), ("id",)),
}


def _show(value, limit: int = 60) -> str:
    try:
        text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _fail(field: str, what: str):
    raise ProtocolError(f"{field}: {what}")


def _object(value, field: str, required=(), optional=()) -> dict:
    if not isinstance(value, dict):
        _fail(field, f"expected an object, got {_show(value)}")
    prefix = f"{field}." if field else ""
    for key in value:
        if key not in required and key not in optional:
            _fail(prefix + str(key), "unknown field")
    for key in required:
        if key not in value:
            _fail(prefix + key, "missing")
    return value


def _string(value, field: str, limit: int = 4096) -> str:
    if not isinstance(value, str) or not value:
        _fail(field, f"expected a non-empty string, got {_show(value)}")
    if len(value) > limit:
        _fail(field, f"longer than {limit} characters")
    if "\x00" in value:
        _fail(field, "contains a NUL character")
    return value


def _number(value, field: str, low=None, high=None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(field, f"expected a number, got {_show(value)}")
    try:
        value = float(value)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        _fail(field, f"expected a finite number, got {_show(value)}")
    if low is not None and value < low:
        _fail(field, f"must be >= {low}, got {_show(value)}")
    if high is not None and value > high:
        _fail(field, f"must be <= {high}, got {_show(value)}")
    return value


def _integer(value, field: str, low=None, high=None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(field, f"expected an integer, got {_show(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        _fail(field, f"must be an integer in {low}..{high}, got {_show(value)}")
    return value


def _vector(value, field: str, n: int, low=None, what: str = "") -> list:
    if not isinstance(value, list) or len(value) != n:
        _fail(field, f"expected {what or f'{n} numbers'}, got {_show(value)}")
    return [_number(v, f"{field}[{i}]", low) for i, v in enumerate(value)]


def _list(value, field: str, minimum: int = 0) -> list:
    if not isinstance(value, list):
        _fail(field, f"expected a list, got {_show(value)}")
    if len(value) < minimum:
        _fail(field, f"expected at least {minimum} entr{'y' if minimum == 1 else 'ies'}, got {len(value)}")
    return value


def _is_inside(path: str, folder: str) -> bool:
    try:
        return path != folder and os.path.commonpath([path, folder]) == folder
    except ValueError:  # another drive (Windows)
        return False


def session_path(value, field: str, session) -> str:
    """``value`` resolved (relative to ``session``; symlinks followed) and checked to lie inside the
    session folder ``session`` (a real path); raises :class:`ProtocolError` naming ``field``."""
    value = _string(value, field)
    if session is None:
        _fail(field, NO_SESSION)
    session = os.path.realpath(session)
    path = os.path.realpath(os.path.join(session, value))
    if not _is_inside(path, session):
        _fail(field, f"{value} is outside the session folder")
    return path


HEADER_BYTES = 65536


def _nifti_magic(head: bytes) -> bool:
    return head[344:348] == b"n+1\x00" or head[4:8] == b"n+2\x00"


def _image_content(path: str):
    """What is wrong with an image file's content for its ending, or None: the file must be what its
    name says (so no other reader is picked) and hold its voxels (an NRRD ``data file`` or a
    MetaImage ``ElementDataFile`` other than LOCAL would make the reader open another file)."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError:
        return None  # the reader reports a missing or unreadable file
    name = path.lower()
    if name.endswith(".nrrd"):
        if not head.startswith(b"NRRD"):
            return "is not an NRRD file"
        lines = head.splitlines()
        for line in lines[1:]:
            text = line.decode("latin-1").strip()
            if not text:
                return None
            key, sep, rest = text.partition(":")
            if sep and not rest.startswith("=") and key.strip().lower().replace(" ", "") == "datafile":
                return f"names a detached data file ({_show(rest.strip())}): write the voxels into the file"
        return f"has no end of header in its first {HEADER_BYTES} bytes"
    if name.endswith(".mha"):
        for line in head.splitlines():
            key, sep, rest = line.decode("latin-1").partition("=")
            if sep and key.strip().lower() == "elementdatafile":
                if rest.strip().upper() == "LOCAL":
                    return None
                return f"names a detached data file ({_show(rest.strip())}): write the voxels into the file"
        return f"has no 'ElementDataFile = LOCAL' in its first {HEADER_BYTES} bytes"
    if name.endswith(".nii.gz"):
        import gzip
        import zlib

        try:
            with gzip.open(path, "rb") as f:
                head = f.read(548)
        except (OSError, EOFError, zlib.error):
            return "is not a gzip-compressed NIfTI file"
    return None if _nifti_magic(head) else "is not a NIfTI file"


def input_file(value, field: str, session) -> str:
    """A file the worker reads: :func:`session_path`, and a regular file if it exists (a pipe or a
    device would block or never end; a missing file is reported by the reader)."""
    path = session_path(value, field, session)
    if os.path.lexists(path) and not os.path.isfile(path):
        _fail(field, f"{value} is not a regular file")
    return path


def _image_file(value, field: str, session) -> str:
    path = input_file(value, field, session)
    if not path.lower().endswith(IMAGE_ENDINGS):
        _fail(field, f"{value}: give an image file ending in {', '.join(IMAGE_ENDINGS)}")
    problem = _image_content(path)
    if problem is not None:
        _fail(field, f"{value} {problem}")
    return path


def _image(value, field: str, session) -> dict:
    kinds = [k for k in ("file", "cached", "shm") if isinstance(value, dict) and k in value]
    if not isinstance(value, dict) or len(kinds) != 1:
        _fail(field, f"expected exactly one of 'file', 'cached' or 'shm', got {_show(value)}")
    if kinds == ["file"]:
        _object(value, field, ("file",), ("cache",))
        out = {"file": _image_file(value["file"], f"{field}.file", session)}
        if "cache" in value:
            out["cache"] = _string(value["cache"], f"{field}.cache", MAX_ID_CHARS)
        return out
    if kinds == ["cached"]:
        _object(value, field, ("cached",))
        return {"cached": _string(value["cached"], f"{field}.cached", MAX_ID_CHARS)}
    _object(value, field, ("shm", "shape", "dtype", "spacing", "origin", "direction"))
    name = _string(value["shm"], f"{field}.shm", 256)
    if not SHM_NAME.match(name):
        _fail(f"{field}.shm", f"not a shared memory name: {_show(name)}")
    shape = value["shape"]
    if not isinstance(shape, list) or len(shape) != 3:
        _fail(f"{field}.shape", f"expected 3 integers (z, y, x), got {_show(shape)}")
    shape = [_integer(n, f"{field}.shape[{i}]", 1, 1 << 20) for i, n in enumerate(shape)]
    if value["dtype"] not in IMAGE_DTYPES:
        _fail(f"{field}.dtype", f"expected one of {', '.join(IMAGE_DTYPES)}, got {_show(value['dtype'])}")
    return {"shm": name, "shape": shape, "dtype": value["dtype"],
            "spacing": _vector(value["spacing"], f"{field}.spacing", 3, low=1e-9),
            "origin": _vector(value["origin"], f"{field}.origin", 3),
            "direction": _vector(value["direction"], f"{field}.direction", 9)}


def prompt_entries(value, field: str, minimum: int = 0, limit=None) -> list:
    """[(id, kind, value)] of a list of prompt objects, each with an ``id`` (1..MAX_PROMPT_ID, no
    repeats) and exactly one of ``point`` (3 numbers: x, y, z, LPS mm), ``box`` (2 such corners)
    or ``mask`` (its value returned unchecked, for the caller); ``minimum`` to ``limit`` entries."""
    entries = _list(value, field, minimum)
    if limit is not None and len(entries) > limit:
        _fail(field, f"at most {limit} prompts per request, got {len(entries)}")
    xyz = "3 numbers (x, y, z; LPS mm)"
    out, seen = [], set()
    for n, entry in enumerate(entries):
        where = f"{field}[{n}]"
        kinds = [k for k in ("point", "box", "mask") if isinstance(entry, dict) and k in entry]
        if not isinstance(entry, dict) or len(kinds) != 1:
            _fail(where, f"expected exactly one of 'point', 'box' or 'mask', got {_show(entry)}")
        _object(entry, where, ("id", kinds[0]))
        pid = _integer(entry["id"], f"{where}.id", 1, MAX_PROMPT_ID)
        if pid in seen:
            _fail(f"{where}.id", f"prompt ID {pid} is given twice")
        seen.add(pid)
        kind, spec = kinds[0], entry[kinds[0]]
        if kind == "point":
            spec = _vector(spec, f"{where}.point", 3, what=xyz)
        elif kind == "box":
            if not isinstance(spec, list) or len(spec) != 2 or not all(isinstance(c, list) for c in spec):
                _fail(f"{where}.box", f"expected 2 corners of 3 numbers (LPS mm), got {_show(spec)}")
            spec = [_vector(c, f"{where}.box[{i}]", 3, what=xyz) for i, c in enumerate(spec)]
        out.append((pid, kind, spec))
    return out


def _prompts(value, field: str, session) -> list:
    out = []
    for n, (pid, kind, spec) in enumerate(prompt_entries(value, field)):
        if kind != "mask":
            out.append({"id": pid, kind: spec})
            continue
        where = f"{field}[{n}]"
        _object(spec, f"{where}.mask", ("file",), ("key",))
        key = spec.get("key", pid)
        if isinstance(key, str) and key.isdigit() and key.isascii() and len(key) < 8:
            key = int(key)
        key = _integer(key, f"{where}.mask.key", 1, MAX_PROMPT_ID)
        out.append({"id": pid, "mask": {"file": input_file(spec["file"], f"{where}.mask.file", session),
                                        "key": key}})
    return out


def _model(value, field: str) -> dict:
    _object(value, field, ("path",), ("folds", "device", "tta", "backend"))
    folds = value.get("folds")
    if folds is not None:
        for i, fold in enumerate(_list(folds, f"{field}.folds", 1)):
            if fold != "all":
                _integer(fold, f"{field}.folds[{i}]", 0, 999)
        folds = list(folds)
    device = value.get("device", "auto")
    if not isinstance(device, str) or not DEVICE.match(device):
        _fail(f"{field}.device", f"expected auto, cpu, mps, cuda or cuda:N, got {_show(device)}")
    tta = value.get("tta")
    if tta is not None and not isinstance(tta, bool):
        _fail(f"{field}.tta", f"expected null, true or false, got {_show(tta)}")
    backend = value.get("backend", "torch")
    if backend not in MODEL_BACKENDS:
        _fail(f"{field}.backend", f"expected one of {', '.join(MODEL_BACKENDS)}, got {_show(backend)}")
    return {"path": _string(value["path"], f"{field}.path"), "folds": folds, "device": device, "tta": tta,
            "backend": backend}


def _option_value(value, field: str, depth: int = 0):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return value if isinstance(value, int) else _number(value, field)
    if isinstance(value, list) and depth < 2:
        return [_option_value(v, f"{field}[{i}]", depth + 1) for i, v in enumerate(value)]
    _fail(field, f"expected a number, string, boolean or a list of them, got {_show(value)}")


def _registration_options(value, field: str):
    if value is None:
        return None
    if not isinstance(value, dict):
        _fail(field, f"expected null or an object, got {_show(value)}")
    out = {}
    for key, option in value.items():
        if not OPTION_NAME.match(key) or key in ("model", "weights"):
            _fail(f"{field}.{key}", "not an option that can be set over the protocol")
        out[key] = _option_value(option, f"{field}.{key}")
    return out


def _output(value, session) -> str:
    path = session_path(value, "output", session)
    if not path.endswith(".npz"):
        _fail("output", f"{value}: the mask file's name must end in .npz")
    if os.path.isdir(path):
        _fail("output", f"{value} is a folder")
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        _fail("output", f"{value}: {parent} is a file, not a folder")
    return path


def _frame(message: dict) -> None:
    if message["frame"] != "LPS":
        _fail("frame", f"expected \"LPS\", got {_show(message['frame'])}")
    if message["units"] != "mm":
        _fail("units", f"expected \"mm\", got {_show(message['units'])}")


def message_id(message):
    """The message's ``id`` when it is a usable one (a non-empty string), else None: what an error
    reply echoes."""
    rid = message.get("id") if isinstance(message, dict) else None
    return rid if isinstance(rid, str) and rid and len(rid) <= MAX_ID_CHARS else None


def parse_message(line) -> dict:
    """One protocol line (bytes or str) -> a JSON object; :class:`ProtocolError` ("message: ...")
    for text that is not UTF-8, not JSON, not one object, or has a key twice."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            _fail("message", f"not UTF-8 text ({e.reason} at byte {e.start})")

    def no_duplicates(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                _fail("message", f"the key {_show(key)} appears twice in one object")
            out[key] = value
        return out

    try:
        message = json.loads(line, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:
        if isinstance(e, ProtocolError):
            raise
        _fail("message", f"not JSON: {str(e)[:200]}")
    if not isinstance(message, dict):
        _fail("message", f"expected a JSON object, got {type(message).__name__} {_show(message)}")
    return message


def validate_message(message: dict, session=None) -> dict:
    """Check one message against its type's schema; return it normalised (defaults filled in,
    numbers as floats, file paths resolved inside ``session``, the real path of the session
    folder, or None: no file paths allowed). Raises :class:`ProtocolError` "<field>: <what>"."""
    if not isinstance(message, dict):
        _fail("message", f"expected a JSON object, got {_show(message)}")
    kind = message.get("type")
    if "type" not in message:
        _fail("type", "missing")
    if not isinstance(kind, str) or kind not in _FIELDS:
        _fail("type", f"unknown message type {_show(kind)}")
    required, optional = _FIELDS[kind]
    _object(message, "", ("type",) + required, optional)
    out = {"type": kind}
    if "id" in message:
        out["id"] = _string(message["id"], "id", MAX_ID_CHARS)
    if kind == "hello":
        if "protocol" in message and message["protocol"] != PROTOCOL:
            _fail("protocol", f"this worker speaks {PROTOCOL}, not {_show(message['protocol'])}")
    elif kind == "load":
        types = message.get("prompt_types", ["point"])
        for i, t in enumerate(_list(types, "prompt_types", 1)):
            if t not in PROMPT_TYPES:
                _fail(f"prompt_types[{i}]", f"expected one of {', '.join(PROMPT_TYPES)}, got {_show(t)}")
        out.update(model=_model(message["model"], "model"), prompt_types=list(types))
    elif kind == "segment":
        _frame(message)
        out.update(image=_image(message["image"], "image", session), frame="LPS", units="mm",
                   prompts=_prompts(message["prompts"], "prompts", session), model=_model(message["model"], "model"),
                   output=_output(message["output"], session))
    elif kind == "track":
        _frame(message)
        images = _list(message["images"], "images")
        if len(images) < 2:
            _fail("images", f"tracking needs a baseline and at least one follow-up scan, got {len(images)} image(s)")
        registration = message.get("registration", "simpleitk")
        if registration not in REGISTRATION_BACKENDS:
            _fail("registration", f"unknown registration backend {_show(registration)}; "
                                  f"choose one of {', '.join(REGISTRATION_BACKENDS)}")
        names = message.get("names")
        if names is not None:
            if not isinstance(names, list) or len(names) != len(images):
                _fail("names", f"expected null or {len(images)} names (one per image), got {_show(names)}")
            names = [_string(n, f"names[{i}]", 200) for i, n in enumerate(names)]
        baseline = _object(message["baseline"], "baseline", ("file",))
        out.update(images=[_image(spec, f"images[{t}]", session) for t, spec in enumerate(images)],
                   frame="LPS", units="mm", baseline={"file": input_file(baseline["file"], "baseline.file", session)},
                   model=_model(message["model"], "model"), registration=registration,
                   registration_options=_registration_options(message.get("registration_options"),
                                                              "registration_options"),
                   min_volume_ml=_number(message.get("min_volume_ml", 0.0), "min_volume_ml", 0.0),
                   min_prompt_fraction=_number(message.get("min_prompt_fraction", 0.0), "min_prompt_fraction", 0.0),
                   names=names, output=_output(message["output"], session))
        for key, kind in (("previous", "folder"), ("corrections", "file"), ("state", "folder")):
            if message.get(key) is not None:
                value = _object(message[key], key, (kind,))[kind]
                out[key] = {kind: input_file(value, f"{key}.{kind}", session) if kind == "file"
                            else session_path(value, f"{key}.{kind}", session)}
    return out
