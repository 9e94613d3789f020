"""The wire protocol between a front end and a worker process (one definition for both sides).

Wire protocol for out-of-process runners (one JSON object per line on the worker's
stdin/stdout, or one per WebSocket/HTTP message for a server)::

    -> {"type": "hello", "protocol": "lesionlocator-runner/1"}
    <- {"type": "ready", "protocol": "lesionlocator-runner/1", "library": "0.1.0",
        "torch": "2.13.0", "devices": ["cpu", "cuda"]}

    -> {"type": "segment", "id": "<request id>",
        "image": {"file": "/tmp/ll/req1.nrrd"}                      # any SimpleITK-readable file
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
"""
from __future__ import annotations

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
             "CheckpointError": CheckpointError, "ImageError": image.ImageError,
             "ImageNotCached": ImageNotCached,
             "MemoryError": MemoryError, "FileNotFoundError": FileNotFoundError, "ValueError": ValueError}
    try:
        from . import modelgrid
        known["UnsupportedPlansError"] = modelgrid.UnsupportedPlansError
    except (ImportError, AttributeError):
        pass
    try:
        from . import register
        known["RegistrationError"] = register.RegistrationError
    except ImportError:
        pass
    cls = known.get(kind)
    return cls(message) if cls is not None else WorkerError(f"{kind}: {message}")


class WorkerError(RuntimeError):
    """The worker process failed (crashed, could not start, or sent an unknown error type)."""
