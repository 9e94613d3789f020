"""A tracking run kept on disk, so that a correction re-runs only what it changes.

:func:`save_track_state` writes a :class:`~LesionLocatorLib.track.TrackResult` into a folder
(``lesionlocator track`` writes one into ``OUT/tracking/``); :func:`load_track_state` reads it
back for the same scans, which ``lesionlocator track --resume-from OUT`` and the worker use to
apply corrections (:func:`LesionLocatorLib.correct.retrack`) without registering again. The folder::

    state.json            format, the scans' names and fingerprints, each lesion's status and
                          inside fraction per scan, the registration backend and its results
    masks.npz             every lesion's mask per scan ("<t>/<lesion id>"), bounding-box cropped
                          (:func:`LesionLocatorLib.protocol.pack_masks`)
    registration_t<t>.h5  the registration of scan t (fixed) to scan t-1 (moving), ITK format
                          (:meth:`LesionLocatorLib.register.Transform.save`; an affine + displacement
                          field on the coarse registration grid: ~24 MB per follow-up at 1e6 voxels)

``state.json`` is written last, so a folder without it is an interrupted write and is refused.
A scan's fingerprint is the SHA-256 of its geometry (size, spacing, origin, direction; LPS mm,
rounded to 1e-6 mm so that a file round trip keeps it) and voxels: a state is only used with
exactly the scans it was made from.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

FORMAT = "lesionlocator-track-state/1"
STATE_FILE = "state.json"
MASKS_FILE = "masks.npz"


class TrackStateError(ValueError):
    """A saved tracking run that is missing, incomplete or made from other scans."""


def image_fingerprint(image) -> str:
    """SHA-256 (hex) of an Image's geometry (shape, spacing, origin, direction) and voxels."""
    digest = hashlib.sha256()
    header = {"shape": list(image.shape), "spacing": [round(float(v), 6) for v in image.spacing],
              "origin": [round(float(v), 6) for v in image.origin],
              "direction": [round(float(v), 9) for v in np.ravel(image.direction)], "dtype": str(image.array.dtype)}
    digest.update(json.dumps(header, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(image.array).data)
    return digest.hexdigest()


def save_track_state(folder, result, images, names, registration: str, options: dict | None = None) -> Path:
    """Write ``result`` (a TrackResult on ``images``, named ``names``) into ``folder`` (created);
    ``registration``: the backend name, ``options``: the tracking options to reuse (min_volume_ml,
    min_prompt_fraction). Returns the folder."""
    from .files import atomic_output
    from .protocol import pack_masks, timepoint_keys

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / STATE_FILE).unlink(missing_ok=True)  # the folder is incomplete until state.json is back
    with atomic_output(folder / MASKS_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **pack_masks(timepoint_keys(result.masks)))
    registrations = []
    for t, transform in enumerate(result.transforms, start=1):
        name = f"registration_t{t}.h5"
        transform.save(folder / name)
        registrations.append({"file": name, "backend": transform.backend, "info": transform.info_json()})
    state = {"format": FORMAT, "names": list(names), "fingerprints": [image_fingerprint(i) for i in images],
             "status": {str(k): list(v) for k, v in result.status.items()},
             "inside_fraction": {str(k): list(v) for k, v in result.inside_fraction.items()},
             "registration": registration, "options": dict(options or {}), "registrations": registrations}
    with atomic_output(folder / STATE_FILE) as tmp:
        Path(tmp).write_text(json.dumps(state, indent=1), encoding="utf-8")
    return folder


def read_state_file(folder) -> dict:
    """The checked ``state.json`` of a saved run (torch-free: the CLI reads it before any work)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise TrackStateError(f"{folder}: no saved tracking run here (no {STATE_FILE}; a run written by "
                              f"'lesionlocator track' keeps one in its output folder's 'tracking' folder)")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TrackStateError(f"{path}: not a saved tracking run ({e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrackStateError(f"{path}: not a saved tracking run (format {FORMAT} expected)")
    n = len(state.get("names", []))
    if len(state.get("fingerprints", [])) != n or len(state.get("registrations", [])) != n - 1:
        raise TrackStateError(f"{path}: inconsistent ({n} scans)")
    return state


def load_track_state(folder, images):
    """The TrackResult saved in ``folder`` (labels rebuilt from the masks), for ``images`` -- which
    must be the scans it was made from, in the same order -- and its ``state.json`` dict.
    TrackStateError naming the scan that differs, or the file that is missing."""
    from .protocol import by_timepoint, unpack_masks
    from .register import Transform
    from .track import TrackResult, labels_from_masks

    folder = Path(folder)
    state = read_state_file(folder)
    images = list(images)
    names = state["names"]
    if len(images) != len(names):
        raise TrackStateError(f"{folder}: the saved run tracked {len(names)} scans ({', '.join(names)}); "
                              f"{len(images)} were given")
    for t, (image, expected) in enumerate(zip(images, state["fingerprints"])):
        if image_fingerprint(image) != expected:
            raise TrackStateError(f"{folder}: scan {t} is not the scan '{names[t]}' the saved run tracked (its "
                                  f"voxels or geometry differ); resume only with the same scans in the same order")
    try:
        with np.load(folder / MASKS_FILE) as data:
            packed = unpack_masks(data)
        transforms = [Transform.load(folder / r["file"], r["backend"]) for r in state["registrations"]]
    except (OSError, ValueError, RuntimeError) as e:
        raise TrackStateError(f"{folder}: the saved run cannot be read ({e})") from None
    for transform, r in zip(transforms, state["registrations"]):
        transform.info = dict(r.get("info", {}))
    masks = by_timepoint(packed, len(images))
    status = {int(k): list(v) for k, v in state["status"].items()}
    fractions = {int(k): list(v) for k, v in state.get("inside_fraction", {}).items()}
    labels = [labels_from_masks(image, m) for image, m in zip(images, masks)]
    return TrackResult(masks, labels, status, transforms, {}, fractions), state
