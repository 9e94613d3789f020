"""The corrections file of ``lesionlocator track --corrections`` (JSON, world LPS millimetres),
read into :class:`LesionLocatorLib.correct.Correction` s. Torch-free: the file is checked before
any work starts (:func:`read_corrections`); scans and mask files are matched once the scans are
loaded (:func:`resolve_corrections`)::

    {"format": "lesionlocator-corrections/1", "frame": "LPS", "units": "mm",
     "corrections": [
       {"lesion": 2, "scan": "ct_2024_03", "point": [12.5, -40.2, 101.0]},
       {"lesion": 3, "scan": 2, "box": [[0, -50, 90], [20, -30, 110]]},
       {"lesion": 4, "scan": "ct_2024_03", "mask": "lesion4_fixed.nii.gz"},
       {"lesion": 1, "scan": 3, "vanished": true},
       {"lesion": 5, "scan": 1, "moved_point": [40.0, -12.5, 95.0]},
       {"lesion": 9, "scan": 2, "point": [30.0, 10.0, 80.0], "new": true}]}

``lesion``: the lesion ID (as in ``lesions.csv``). ``scan``: the follow-up's name (as in
``lesions.csv``'s ``timepoint`` column: its file or folder name without the extension) or its
index (1 = the first follow-up). Exactly one of ``point`` ([x, y, z]), ``box`` (two opposite
corners), ``mask`` (an image file on that scan's grid, relative to the JSON's folder; the lesion
is its voxels equal to the lesion ID if there are any, else all non-zero voxels),
``moved_point`` ([x, y, z]: the lesion's tracked mask moved there, as verified tracking does) or
``"vanished": true``. ``"new": true`` adds a lesion first seen at that scan (its ID must not be
in the study). One correction per lesion and scan.
"""
from __future__ import annotations

import json
from pathlib import Path

from .prompts import Box, Point, PromptError, _coordinates, _show, _unique_keys, check_prompt_id

FORMAT = "lesionlocator-corrections/1"
_KEYS = ("format", "frame", "units", "corrections")
_ENTRY_KEYS = ("lesion", "scan", "point", "box", "mask", "moved_point", "vanished", "new")


def read_corrections(path) -> list:
    """The checked entries of a corrections file: dicts with ``lesion`` (int), ``scan`` (name or
    index), ``kind`` ('point', 'box', 'mask', 'vanished'), ``value`` (coordinates, a mask Path or
    None) and ``new``; PromptError naming the file and entry for anything else."""
    path = Path(path)
    source = str(path)
    data = _read_json(path, "corrections")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise PromptError(f"{source}: a corrections file is an object with \"format\": \"{FORMAT}\"")
    extra = [k for k in data if k not in _KEYS]
    if extra:
        raise PromptError(f"{source}: unknown key {_show(extra[0])} (allowed: {', '.join(_KEYS)})")
    if data.get("frame", "LPS") != "LPS" or data.get("units", "mm") != "mm":
        raise PromptError(f"{source}: \"frame\" must be \"LPS\" and \"units\" \"mm\" (nothing is converted)")
    entries = data.get("corrections")
    if not isinstance(entries, list) or not entries:
        raise PromptError(f"{source}: \"corrections\" must be a non-empty list")
    out, seen = [], {}
    for i, entry in enumerate(entries):
        item = _entry(entry, f"{source}: corrections[{i}]", path.parent)
        key = (item["lesion"], item["scan"])
        if key in seen:
            raise PromptError(f"{source}: corrections[{i}] corrects lesion {key[0]} at scan {_show(key[1])} again "
                              f"(first in corrections[{seen[key]}]); one correction per lesion and scan")
        seen[key] = i
        out.append(item)
    return out


def correction_entry(entry, where: str, folder) -> dict:
    """One checked entry of a corrections file (see :func:`read_corrections`); ``folder``: where its
    mask files are, or None where masks cannot be given (a server job)."""
    return _entry(entry, where, folder)


def _read_json(path: Path, what: str):
    """The JSON in ``path`` (no duplicate keys); PromptError "<what> file not found" or "not a <what>
    JSON file"."""
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    except FileNotFoundError:
        raise PromptError(f"{what} file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PromptError(f"{path}: not a {what} JSON file ({e})") from None


def _entry(entry, where: str, folder) -> dict:
    if not isinstance(entry, dict):
        raise PromptError(f"{where} must be an object such as {{\"lesion\": 2, \"scan\": 1, \"point\": [x, y, z]}}")
    extra = [k for k in entry if k not in _ENTRY_KEYS]
    if extra:
        raise PromptError(f"{where}: unknown key {_show(extra[0])} (allowed: {', '.join(_ENTRY_KEYS)})")
    for key in ("lesion", "scan"):
        if key not in entry:
            raise PromptError(f"{where}: \"{key}\" is missing")
    lesion = check_prompt_id(entry["lesion"], f"{where}: lesion")
    scan = entry["scan"]
    if isinstance(scan, bool) or not isinstance(scan, (str, int)) or (isinstance(scan, int) and scan < 1) or scan == "":
        raise PromptError(f"{where}: \"scan\" is a follow-up's name or its index (1 = the first follow-up), got "
                          f"{_show(scan)}")
    for flag in ("vanished", "new"):
        if flag in entry and not isinstance(entry[flag], bool):
            raise PromptError(f"{where}: \"{flag}\" must be true or false, got {_show(entry[flag])}")
    kinds = [k for k in ("point", "box", "mask", "moved_point") if k in entry] + (
        ["vanished"] if entry.get("vanished") else [])
    if len(kinds) != 1:
        raise PromptError(f"{where} (lesion {lesion}): give exactly one of \"point\", \"box\", \"mask\", "
                          f"\"moved_point\" or \"vanished\": true")
    kind, value = kinds[0], entry.get(kinds[0])
    if kind in ("point", "moved_point"):
        value = _coordinates(value, 3, kind, where, "[x, y, z]")
    elif kind == "box":
        if not isinstance(value, list) or len(value) != 2:
            raise PromptError(f"{where}: a box needs 2 corners [[x0, y0, z0], [x1, y1, z1]], got {_show(value)}")
        value = [_coordinates(c, 3, "box corner", where, "[x, y, z]") for c in value]
    elif kind == "mask":
        if folder is None:
            raise PromptError(f"{where}: mask corrections cannot be sent here: use a point, box or moved_point")
        if not isinstance(value, str) or not value:
            raise PromptError(f"{where}: \"mask\" is an image file name, got {_show(value)}")
        value = folder / value if not Path(value).is_absolute() else Path(value)
        if not value.is_file():
            raise PromptError(f"{where}: mask file not found: {value}")
    else:
        value = None
    return {"lesion": lesion, "scan": scan, "kind": kind, "value": value, "new": bool(entry.get("new", False))}


def resolve_corrections(entries, names, images) -> list:
    """:class:`~LesionLocatorLib.correct.Correction` s of :func:`read_corrections` entries for the
    scans tracked (``names[t]``, ``images[t]``; t = 0 the baseline). A scan is found by name or
    index; a mask file must have its scan's geometry."""
    from .correct import Correction
    from .image import read_image
    from .prompts import MaskPrompt

    out = []
    for item in entries:
        t = scan_index(item["scan"], names)
        pid, kind, value = item["lesion"], item["kind"], item["value"]
        if kind in ("point", "moved_point"):
            prompt = Point(pid, tuple(value))
        elif kind == "box":
            prompt = Box.from_points(pid, value)
        elif kind == "mask":
            mask = read_image(value)
            if not mask.same_geometry(images[t]):
                raise PromptError(f"correction of lesion {pid}: the mask {value.name} does not have the geometry of "
                                  f"scan {names[t]} (size, spacing, origin and direction must match)")
            voxels = mask.array == pid if (mask.array == pid).any() else mask.array != 0
            prompt = MaskPrompt(pid, mask.with_array(voxels.astype("uint8")))
        else:
            prompt = None
        out.append(Correction(pid, t, prompt, vanished=kind == "vanished", new=item["new"],
                              moved=kind == "moved_point"))
    return out


def scan_index(scan, names) -> int:
    """The index of a correction's ``scan`` (a name or an index) among the scans ``names``."""
    if isinstance(scan, int):
        if scan >= len(names):
            raise PromptError(f"corrections: scan {scan} does not exist: {len(names) - 1} follow-up(s) were tracked")
        return scan
    if scan not in names:
        raise PromptError(f"corrections: no scan named {_show(scan)}; the scans are {', '.join(names)}")
    index = list(names).index(scan)
    if index == 0:
        raise PromptError(f"corrections: {scan} is the baseline; correct the baseline by segmenting it again")
    return index


def correction_entries(corrections, mask_file=None) -> list:
    """The corrections file's entries (JSON dicts, scans by index) of
    :class:`~LesionLocatorLib.correct.Correction` s; ``mask_file(correction)`` names a mask
    correction's file (None: mask corrections are refused with ValueError)."""
    entries = []
    for c in corrections:
        entry = {"lesion": int(c.lesion), "scan": int(c.timepoint)}
        if c.vanished:
            entry["vanished"] = True
        elif c.kind in ("point", "moved"):
            entry["point" if c.kind == "point" else "moved_point"] = [float(v) for v in c.prompt.xyz]
        elif c.kind == "box":
            entry["box"] = [[float(v) for v in c.prompt.lower], [float(v) for v in c.prompt.upper]]
        elif mask_file is None:
            raise ValueError(f"lesion {c.lesion} at scan {c.timepoint}: a mask correction cannot be sent here; use a "
                             f"point, box or moved point")
        else:
            entry["mask"] = mask_file(c)
        if c.new:
            entry["new"] = True
        entries.append(entry)
    return entries


def write_corrections(path, corrections) -> Path:
    """Write :class:`~LesionLocatorLib.correct.Correction` s as a corrections file that
    :func:`read_corrections` and :func:`resolve_corrections` read back to the same corrections
    (scans by index; a mask correction's mask as ``<file stem>_lesion<id>_scan<t>.nrrd`` beside
    it, on the grid of the correction's mask). Returns ``path``."""
    from .files import atomic_output
    from .image import write_image

    path = Path(path)

    def mask_file(c) -> str:
        name = f"{path.stem}_lesion{int(c.lesion)}_scan{int(c.timepoint)}.nrrd"
        write_image(c.prompt.mask.with_array((c.prompt.mask.array > 0).astype("uint8")), path.parent / name)
        return name

    entries = correction_entries(corrections, mask_file)
    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps({"format": FORMAT, "frame": "LPS", "units": "mm", "corrections": entries},
                                        indent=1), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- verified tracking
POINTS_FORMAT = "lesionlocator-confirmed-points/1"
"""The points file of ``lesionlocator track --confirmed-points`` (verified tracking)::

    {"format": "lesionlocator-confirmed-points/1", "frame": "LPS", "units": "mm",
     "points": [{"lesion": 2, "scan": "ct_2024_03", "point": [12.5, -40.2, 101.0]}, ...]}

Each entry moves (or confirms) lesion ``lesion``'s proposed point at follow-up ``scan`` (name or
index, as in the corrections file); a lesion and scan without an entry keep the proposal (the
centre of the warped previous mask). ``"points": []`` accepts every proposal. A tracking run
writes the points it used as ``tracking/points.json`` in this format, each entry with the
``proposed`` point too, so it can be edited and given back."""


def read_confirmed_points(path) -> dict:
    """``{(scan, lesion): (x, y, z)}`` of a confirmed-points file (scans as written: a name or an
    index); PromptError naming the file and entry otherwise."""
    path = Path(path)
    data = _read_json(path, "confirmed-points")
    if not isinstance(data, dict) or data.get("format") != POINTS_FORMAT or not isinstance(data.get("points"), list):
        raise PromptError(f"{path}: a confirmed-points file is an object with \"format\": \"{POINTS_FORMAT}\" and a "
                          f"\"points\" list")
    if data.get("frame", "LPS") != "LPS" or data.get("units", "mm") != "mm":
        raise PromptError(f"{path}: \"frame\" must be \"LPS\" and \"units\" \"mm\" (nothing is converted)")
    out = {}
    for i, entry in enumerate(data["points"]):
        where = f"{path}: points[{i}]"
        if not isinstance(entry, dict) or not {"lesion", "scan", "point"} <= set(entry) \
                or set(entry) - {"lesion", "scan", "point", "proposed"}:
            raise PromptError(f"{where} must be an object {{\"lesion\": ID, \"scan\": name or index, \"point\": "
                              f"[x, y, z]}}")
        lesion = check_prompt_id(entry["lesion"], f"{where}: lesion")
        scan = entry["scan"]
        if isinstance(scan, bool) or not isinstance(scan, (str, int)) or scan in ("", 0) or \
                (isinstance(scan, int) and scan < 1):
            raise PromptError(f"{where}: \"scan\" is a follow-up's name or its index (1 = the first follow-up), "
                              f"got {_show(scan)}")
        if (scan, lesion) in out:
            raise PromptError(f"{where}: lesion {lesion} at scan {_show(scan)} is given twice")
        out[(scan, lesion)] = tuple(_coordinates(entry["point"], 3, "point", where, "[x, y, z]"))
    return out


def confirm_with_points(points: dict, names):
    """A verified-tracking ``confirm`` callback (:func:`LesionLocatorLib.track.track`) that moves
    the proposals found in ``points`` (:func:`read_confirmed_points`; scans among ``names``) and
    accepts the others."""
    by_index = {(scan_index(scan, names), lesion): xyz for (scan, lesion), xyz in points.items()}

    def confirm(t: int, proposals: dict) -> dict:
        return {pid: Point(pid, by_index[(t, pid)]) for pid in proposals if (t, pid) in by_index}

    return confirm


def write_points(path, points: dict, names) -> Path:
    """The points verified tracking used (``TrackResult.points``: ``{(t, id): {"proposed",
    "confirmed"}}``) as a confirmed-points file with each entry's ``proposed`` point."""
    from .files import atomic_output

    entries = [{"lesion": int(pid), "scan": names[t], "point": p["confirmed"], "proposed": p["proposed"]}
               for (t, pid), p in sorted(points.items())]
    with atomic_output(Path(path)) as tmp:
        Path(tmp).write_text(json.dumps({"format": POINTS_FORMAT, "frame": "LPS", "units": "mm", "points": entries},
                                        indent=1), encoding="utf-8")
    return Path(path)
