"""Prompts: where the user says a lesion is.

Two ways to say it:

* world prompts, the library's own: :class:`Point` and :class:`Box` in LPS world
  millimetres ``(x, y, z)``, and :class:`MaskPrompt` (a binary :class:`Image`);
* upstream LesionLocator's prompt JSON: voxel indices of the image in ``(z, y, x)``
  order, ``{"1": {"point": [z, y, x]}}`` or ``{"1": {"box": [zmin, zmax, ymin, ymax,
  xmin, xmax]}}`` with half-open boxes; values may be strings or numbers.

Our world JSON (``--world``)::

    {"format": "lesionlocator-world/1", "frame": "LPS", "units": "mm",
     "prompts": [{"id": 1, "point": [x, y, z]},
                 {"id": 2, "box": [[x0, y0, z0], [x1, y1, z1]]}]}

A prompt's ``id`` is the lesion's label value in every output, a whole number from 1
to 65535 (the label images are uint16); ``name`` keeps the key it had in the file.

Prompt files come from outside and are checked before any image or model is read
(:func:`read_prompt_file`, cheap: no torch): valid JSON without duplicate keys, the
schema of :func:`parse_upstream_json` or :func:`parse_world_json` (unknown keys are
refused, coordinates finite, IDs 1..65535 and unique, world files in LPS millimetres).
Every error is one :class:`PromptError` line naming the file and the offending key.
:func:`prompt_kind` / :func:`check_prompt_kind` match the prompts to the model
(``-t``), :func:`check_prompt_count` warns above 100 prompts and refuses above 1000
unless allowed. Internally everything is turned into :class:`VoxelPrompt`
(continuous voxel indices of one image, (z, y, x)), which :mod:`LesionLocatorLib.encoding`
draws into the network's prompt channel.
"""
from __future__ import annotations

import json
import math
import numbers
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .files import atomic_write_text

if TYPE_CHECKING:  # SimpleITK and scipy load only when used: prompt files are checked before any image
    from .image import Image  # or model is read, so reading them stays cheap (no torch, no SimpleITK, no scipy)


WORLD_FORMAT = "lesionlocator-world/1"


class PromptError(ValueError):
    """A prompt or prompt file that cannot be used."""


@dataclass
class Point:
    """A click at LPS world position ``xyz`` (mm)."""
    id: int
    xyz: tuple
    name: str = ""


@dataclass
class Box:
    """A world-axis-aligned box with corners ``lower``/``upper`` (LPS mm, x, y, z)."""
    id: int
    lower: tuple
    upper: tuple
    name: str = ""

    @classmethod
    def from_points(cls, id: int, points_xyz, name: str = "") -> "Box":
        """The smallest world-axis-aligned box holding the given LPS points (e.g. ROI corners)."""
        p = np.asarray(points_xyz, dtype=float).reshape(-1, 3)
        return cls(id, tuple(p.min(0)), tuple(p.max(0)), name)


@dataclass
class MaskPrompt:
    """A binary mask (any geometry; resampled onto the image grid) as the prompt."""
    id: int
    mask: Image
    name: str = ""


@dataclass
class VoxelPrompt:
    """A prompt in continuous voxel indices (z, y, x) of one image.

    kind ``point``: ``coords`` = [z, y, x];
    kind ``box``: ``coords`` = [zmin, zmax, ymin, ymax, xmin, xmax], half-open;
    kind ``mask``: ``mask`` = boolean (z, y, x) array on the image grid.
    """
    id: int
    kind: str
    coords: list = field(default_factory=list)
    mask: np.ndarray | None = None
    name: str = ""


# --------------------------------------------------------------------------- to voxels
def to_voxel_prompt(prompt, image: Image) -> VoxelPrompt:
    """Express a world or voxel prompt in ``image``'s continuous voxel indices (z, y, x).

    Raises :class:`PromptError` when the prompt lies outside the image, naming the
    prompt ID, its coordinates and the image extent, or when its ID is not in 1..65535.
    """
    if isinstance(prompt, (VoxelPrompt, Point, Box, MaskPrompt)):
        check_prompt_id(prompt.id, f"prompt {prompt.id}")
    if isinstance(prompt, VoxelPrompt):
        vp = prompt
    elif isinstance(prompt, Point):
        vp = VoxelPrompt(prompt.id, "point", list(image.world_to_index(prompt.xyz)), name=prompt.name)
    elif isinstance(prompt, Box):
        lo, hi = np.asarray(prompt.lower, float), np.asarray(prompt.upper, float)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        idx = image.world_to_index(corners)
        # voxels whose centres lie inside the box: [ceil(min), floor(max) + 1)
        lo_i = np.ceil(idx.min(0) - 1e-6).astype(int)
        hi_i = np.floor(idx.max(0) + 1e-6).astype(int) + 1
        vp = VoxelPrompt(prompt.id, "box", [int(v) for pair in zip(lo_i, hi_i) for v in pair], name=prompt.name)
    elif isinstance(prompt, MaskPrompt):
        vp = VoxelPrompt(prompt.id, "mask", mask=_mask_on_grid(prompt.mask, image), name=prompt.name)
    else:
        raise TypeError(f"not a prompt: {prompt!r}")
    _check_inside(vp, image)
    return vp


def _mask_on_grid(mask: Image, image: Image) -> np.ndarray:
    if mask.same_geometry(image):
        return np.asarray(mask.array) > 0
    import SimpleITK as sitk
    src = mask.to_sitk() if mask.array.dtype != bool else mask.with_array(mask.array.astype(np.uint8)).to_sitk()
    ref = image.with_array(np.zeros(image.shape, np.uint8)).to_sitk()
    out = sitk.Resample(src, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(out) > 0


def _fmt(values, digits: int = 1) -> str:
    return "(" + ", ".join(f"{float(v):.{digits}f}" for v in values) + ")"


def _extent_text(image: Image) -> str:
    lo = image.index_to_world([0, 0, 0])
    hi = image.index_to_world(np.asarray(image.shape) - 1)
    return (f"image size (z, y, x) = {tuple(int(n) for n in image.shape)} voxels, "
            f"LPS extent from {_fmt(lo)} to {_fmt(hi)} mm")


def _check_inside(vp: VoxelPrompt, image: Image) -> None:
    shape = np.asarray(image.shape)
    if vp.kind == "point":
        c = np.asarray(vp.coords, float)
        if c.shape != (3,) or not np.all(np.isfinite(c)):
            raise PromptError(f"prompt {vp.id}: a point needs 3 finite coordinates, got {vp.coords}")
        if np.any(np.round(c) < 0) or np.any(np.round(c) > shape - 1):
            raise PromptError(f"prompt {vp.id}: point at voxel (z, y, x) = {_fmt(c)} "
                              f"(LPS {_fmt(image.index_to_world(c))} mm) is outside the image; "
                              + _extent_text(image))
    elif vp.kind == "box":
        b = np.asarray(vp.coords, float)
        if b.shape != (6,) or not np.all(np.isfinite(b)):
            raise PromptError(f"prompt {vp.id}: a box needs 6 values [zmin, zmax, ymin, ymax, xmin, xmax], "
                              f"got {vp.coords}")
        lo, hi = b[0::2], b[1::2]
        if np.any(hi <= lo):
            raise PromptError(f"prompt {vp.id}: empty box [zmin, zmax, ymin, ymax, xmin, xmax] = {vp.coords} "
                              f"(half-open: each max must exceed its min)")
        if np.any(hi <= 0) or np.any(lo >= shape):
            raise PromptError(f"prompt {vp.id}: box (z, y, x) voxels {vp.coords} does not overlap the image; "
                              + _extent_text(image))
    elif vp.kind == "mask":
        if vp.mask is None or not vp.mask.any():
            raise PromptError(f"prompt {vp.id}: the mask prompt is empty (no voxel inside the image)")
    else:
        raise PromptError(f"prompt {vp.id}: unknown prompt kind {vp.kind!r}")


# --------------------------------------------------------------------------- files
MIN_PROMPT_ID, MAX_PROMPT_ID = 1, 65535
MANY_PROMPTS = 100  # more: a warning
MAX_PROMPTS = 1000  # more: refused unless allowed (--allow-many-prompts)
_ID_RULE = f"prompt IDs are whole numbers from {MIN_PROMPT_ID} to {MAX_PROMPT_ID} (the label images are uint16)"
_UPSTREAM_EXAMPLE = '{"1": {"point": [z, y, x]}} or {"1": {"box": [zmin, zmax, ymin, ymax, xmin, xmax]}}'
_WORLD_KEYS = ("format", "frame", "units", "prompts")
_WORLD_PROMPT_KEYS = ("id", "name", "point", "box")
_NUMBER_WORDS = {"nan", "inf", "infinity"}  # float() reads them, but as keys they are names


class ManyPromptsWarning(UserWarning):
    """More prompts in one image than is usual (see :func:`check_prompt_count`)."""


class _DuplicateKey(Exception):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs) -> dict:
    """``object_pairs_hook`` for :func:`json.loads`: refuses a key given twice in one object, at any level."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise _DuplicateKey(key)
        obj[key] = value
    return obj


def _show(value, limit: int = 80) -> str:
    """``value`` as JSON text on one line (keys and strings quoted, NaN as NaN), shortened to ``limit``."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _type_name(value) -> str:
    if isinstance(value, bool):
        return f"{value}".lower()
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def check_prompt_id(value, where: str = "prompt") -> int:
    """``value`` as a prompt ID: an int from 1 to 65535 (the label images are uint16).

    Accepts an integer, a whole float (``3.0``) or a numeric string (``"3"``, ``"3.0"``);
    refuses booleans, fractions, NaN/Inf, 0, negatives and anything above 65535 with a
    :class:`PromptError` that starts with ``where`` and names the ID and the allowed range.
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float, str)):
        raise PromptError(f"{where}: the ID must be a whole number, got {_show(value)}; {_ID_RULE}")
    if isinstance(value, numbers.Integral):
        n = int(value)
    else:
        try:
            f = float(value)
        except ValueError:
            raise PromptError(f"{where}: the ID {_show(value)} is not a number; {_ID_RULE}") from None
        if math.isinf(f):
            raise PromptError(f"{where}: the ID {_show(value)} is out of range; {_ID_RULE}")
        if math.isnan(f) or f != int(f):
            raise PromptError(f"{where}: the ID {_show(value)} is not a whole number; {_ID_RULE}")
        n = int(f)
    if not MIN_PROMPT_ID <= n <= MAX_PROMPT_ID:
        raise PromptError(f"{where}: the ID {n} is out of range; {_ID_RULE}")
    return n


def _is_numeric_key(key: str) -> bool:
    if key.strip().lstrip("+-").lower() in _NUMBER_WORDS:
        return False
    try:
        float(key)
    except ValueError:
        return False
    return True


def _free_ids(used: set):
    """IDs for non-numeric keys, in file order: counting on from the largest ID in use (as always);
    past 65535, the smallest unused IDs. Never one in ``used``, never one twice."""
    taken = set(used)
    n = max(taken, default=0) + 1
    while n <= MAX_PROMPT_ID:
        taken.add(n)
        yield n
        n += 1
    for n in range(MIN_PROMPT_ID, MAX_PROMPT_ID + 1):
        if n not in taken:
            taken.add(n)
            yield n


def _coordinates(values, count: int, kind: str, where: str, layout: str) -> list:
    """``count`` finite floats from a JSON list of numbers or numeric strings."""
    if not isinstance(values, list):
        raise PromptError(f"{where}: a {kind} needs a list of {count} numbers {layout}, got {_show(values)}")
    out = []
    for v in values:
        try:
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                raise TypeError
            out.append(float(v))
        except (TypeError, ValueError, OverflowError):
            raise PromptError(f"{where}: {kind} values must be numbers, got {_show(values)}") from None
    if len(out) != count:
        raise PromptError(f"{where}: a {kind} needs {count} values, got {len(out)} (expected {layout})")
    if not all(math.isfinite(v) for v in out):
        raise PromptError(f"{where}: {kind} values must be finite numbers, got {_show(values)}")
    return out


def parse_upstream_json(data: dict, source: str = "prompt file") -> list:
    """Upstream LesionLocator prompt JSON (voxel indices, z, y, x) -> list of VoxelPrompt, sorted by ID.

    * The top level is an object of ``key: entry``; each entry an object with exactly one
      of ``"point": [z, y, x]`` or ``"box": [zmin, zmax, ymin, ymax, xmin, xmax]`` (half-open,
      each max above its min) and no other key. Values are numbers or numeric strings, finite.
    * A numeric key (``"3"``, ``"3.0"``) is the lesion ID: a whole number from 1 to 65535;
      ``"0"``, ``"-3"``, ``"1.5"``, ``"70000"`` are refused, and so are two keys meaning
      the same ID (``"1"`` and ``"1.0"``).
    * Any other key (``"lesion_a"``; also ``"nan"``, ``"inf"``) is a name: the prompt gets
      the next free ID (one above the largest ID in use, in file order; past 65535, the
      smallest unused one), so it never collides, and the key is kept as ``name``.
    """
    if not isinstance(data, dict):
        raise PromptError(f"{source}: the top level must be a JSON object such as {_UPSTREAM_EXAMPLE}, "
                          f"got {_type_name(data)}")
    if not data:
        raise PromptError(f"{source}: no prompts found (expected {_UPSTREAM_EXAMPLE})")
    ids, owner = {}, {}
    for key in data:
        if _is_numeric_key(key):
            pid = check_prompt_id(key, f"{source}: prompt {_show(key)}")
            if pid in owner:
                raise PromptError(f"{source}: prompt keys {_show(owner[pid])} and {_show(key)} are both ID {pid}; "
                                  f"each prompt needs its own ID")
            ids[key], owner[pid] = pid, key
    free = _free_ids(set(owner))
    for key in data:
        if key not in ids:
            ids[key] = next(free, None)
            if ids[key] is None:
                raise PromptError(f"{source}: more than {MAX_PROMPT_ID} prompts; {_ID_RULE}")
    prompts = [_upstream_entry(key, entry, ids[key], f"{source}: prompt {_show(key)}") for key, entry in data.items()]
    return sorted(prompts, key=lambda p: p.id)


def _upstream_entry(key: str, entry, pid: int, where: str) -> VoxelPrompt:
    if not isinstance(entry, dict):
        raise PromptError(f"{where} must be an object such as {{\"point\": [z, y, x]}} or "
                          f"{{\"box\": [zmin, zmax, ymin, ymax, xmin, xmax]}}, got {_show(entry)}")
    kinds = [k for k in ("point", "box") if k in entry]
    if not kinds:
        found = f" (its keys: {', '.join(_show(k) for k in entry)})" if entry else " (it is empty)"
        raise PromptError(f"{where} has neither 'point' nor 'box'{found}")
    if len(kinds) == 2:
        raise PromptError(f"{where} has both 'point' and 'box'; give one of them per prompt")
    extra = [k for k in entry if k not in ("point", "box")]
    if extra:
        raise PromptError(f"{where}: unknown key {_show(extra[0])} beside {_show(kinds[0])} "
                          f"(an entry holds only \"point\" or \"box\")")
    kind = kinds[0]
    if kind == "point":
        coords = _coordinates(entry["point"], 3, "point", where, "[z, y, x]")
    else:
        coords = _coordinates(entry["box"], 6, "box", where, "[zmin, zmax, ymin, ymax, xmin, xmax]")
        for axis, lo, hi in zip("zyx", coords[0::2], coords[1::2]):
            if hi <= lo:
                raise PromptError(f"{where}: empty box along {axis}: {axis}max {hi:g} must exceed {axis}min {lo:g} "
                                  f"(box = [zmin, zmax, ymin, ymax, xmin, xmax], half-open)")
    return VoxelPrompt(pid, kind, coords, name=str(key))


def parse_world_json(data: dict, source: str = "prompt file") -> list:
    """Our world-coordinate JSON (LPS mm) -> list of Point/Box, in file order.

    * The top level is an object with exactly the keys ``format`` (``"lesionlocator-world/1"``,
      required), ``frame`` (``"LPS"``; missing means LPS, any other value, ``null``
      included, is refused), ``units`` (``"mm"``; missing means mm, anything else is
      refused: nothing is converted) and ``prompts`` (a non-empty list).
    * Each prompt is an object with exactly one of ``"point": [x, y, z]`` or ``"box":
      [[x0, y0, z0], [x1, y1, z1]]`` (any two opposite corners), an optional ``id`` (a whole
      number from 1 to 65535; missing: the prompt's position, 1-based), an optional ``name``
      and no other key. Coordinates are finite numbers (or numeric strings). IDs are unique.
    """
    if not isinstance(data, dict):
        raise PromptError(f"{source}: a world prompt file must be a JSON object "
                          f"{{\"format\": \"{WORLD_FORMAT}\", ...}}, got {_type_name(data)}")
    if "format" not in data:
        raise PromptError(f"{source}: not a world prompt file: \"format\": \"{WORLD_FORMAT}\" is missing")
    if data["format"] != WORLD_FORMAT:
        raise PromptError(f"{source}: \"format\" must be \"{WORLD_FORMAT}\", got {_show(data['format'])}")
    extra = [k for k in data if k not in _WORLD_KEYS]
    if extra:
        raise PromptError(f"{source}: unknown key {_show(extra[0])} in a world prompt file "
                          f"(allowed: {', '.join(_show(k) for k in _WORLD_KEYS)})")
    frame = data.get("frame", "LPS")
    if not isinstance(frame, str) or frame.upper() != "LPS":
        raise PromptError(f"{source}: \"frame\" must be \"LPS\", got {_show(frame)} "
                          f"(world prompts are LPS; from RAS, negate x and y)")
    units = data.get("units", "mm")
    if units != "mm":
        raise PromptError(f"{source}: \"units\" must be \"mm\", got {_show(units)} "
                          f"(convert the coordinates to millimetres)")
    entries = data.get("prompts")
    if "prompts" not in data:
        raise PromptError(f"{source}: no prompts found (\"prompts\" is missing)")
    if not isinstance(entries, list):
        raise PromptError(f"{source}: \"prompts\" must be a list of prompts, got {_type_name(entries)}")
    if not entries:
        raise PromptError(f"{source}: no prompts found (\"prompts\" is empty)")
    out, owner = [], {}
    for i, entry in enumerate(entries):
        where = f"{source}: prompts[{i}]"
        prompt = _world_entry(entry, i, where)
        if prompt.id in owner:
            first = f"prompts[{owner[prompt.id]}]"
            if "id" in entry:
                raise PromptError(f"{where}: id {prompt.id} is already used by {first}; each prompt needs its own id")
            raise PromptError(f"{where} has no \"id\", so it gets its position {prompt.id}, which {first} already "
                              f"uses as id; give each prompt its own \"id\"")
        owner[prompt.id] = i
        out.append(prompt)
    return out


def _world_entry(entry, i: int, where: str):
    if not isinstance(entry, dict):
        raise PromptError(f"{where} must be an object such as {{\"id\": 1, \"point\": [x, y, z]}}, got {_show(entry)}")
    extra = [k for k in entry if k not in _WORLD_PROMPT_KEYS]
    if extra:
        raise PromptError(f"{where}: unknown key {_show(extra[0])} "
                          f"(allowed: {', '.join(_show(k) for k in _WORLD_PROMPT_KEYS)})")
    pid = check_prompt_id(entry["id"], where) if "id" in entry else check_prompt_id(i + 1, where)
    name = entry.get("name", pid)
    if isinstance(name, bool) or not isinstance(name, (str, int, float)):
        raise PromptError(f"{where}: \"name\" must be a string, got {_show(name)}")
    kinds = [k for k in ("point", "box") if k in entry]
    if len(kinds) != 1:
        raise PromptError(f"{where} (id {pid}) has " + ("neither 'point' nor 'box'" if not kinds else
                                                         "both 'point' and 'box'; give one of them per prompt"))
    if kinds[0] == "point":
        return Point(pid, tuple(_coordinates(entry["point"], 3, "point", where, "[x, y, z]")), str(name))
    corners = entry["box"]
    if not isinstance(corners, list) or len(corners) != 2:
        raise PromptError(f"{where}: a box needs 2 corners [[x0, y0, z0], [x1, y1, z1]], got {_show(corners)}")
    lo, hi = (_coordinates(c, 3, "box corner", where, "[x, y, z]") for c in corners)
    return Box.from_points(pid, [lo, hi], str(name))


def _looks_like_world(data) -> bool:
    """Our world format: a "format" key that is not an upstream entry, or a "prompts" list."""
    return isinstance(data, dict) and (("format" in data and not isinstance(data["format"], dict))
                                       or isinstance(data.get("prompts"), list))


def parse_prompt_json(text: str, source: str = "prompt text", world: bool | None = None) -> list:
    """Prompts from JSON text: duplicate keys (at any level) are refused, then the world or
    upstream rules apply (``world=None``/``False``: detected, ``True``: world only)."""
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise PromptError(f"{source}: duplicate key {_show(e.key)}: JSON keeps only the last one, so a prompt "
                          f"would be lost; give each key once") from None
    except json.JSONDecodeError as e:
        raise PromptError(f"{source}: not valid JSON ({e})") from None
    except RecursionError:
        raise PromptError(f"{source}: not a prompt file (JSON nested too deeply)") from None
    if world or _looks_like_world(data):
        return parse_world_json(data, source)
    return parse_upstream_json(data, source)


def read_prompt_file(path, world: bool | None = None) -> list:
    """Read a prompt JSON (UTF-8). ``world=None`` detects our world format by its "format" key.

    Every rule of :func:`parse_upstream_json` / :func:`parse_world_json` is checked, and
    duplicate keys are refused; errors are :class:`PromptError`, one line starting with the
    path. Cheap: no torch, no image library. The prompt count is checked separately
    (:func:`check_prompt_count`), and the kind against the model by :func:`check_prompt_kind`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptError(f"{path}: not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except OSError as e:
        raise PromptError(f"{path}: cannot read the prompt file ({e.strerror or e})") from None
    return parse_prompt_json(text, str(path), world)


def _kind_of(prompt) -> str:
    if isinstance(prompt, VoxelPrompt):
        return prompt.kind
    for cls, kind in ((Point, "point"), (Box, "box"), (MaskPrompt, "mask")):
        if isinstance(prompt, cls):
            return kind
    raise TypeError(f"not a prompt: {prompt!r}")


def prompt_kind(prompts) -> str:
    """``"point"``, ``"box"`` or ``"mask"`` when all prompts are of that kind, else ``"mixed"``.

    Works on :class:`VoxelPrompt` and on world :class:`Point` / :class:`Box` / :class:`MaskPrompt`;
    :class:`PromptError` for no prompts.
    """
    kinds = {_kind_of(p) for p in prompts}
    if not kinds:
        raise PromptError("no prompts")
    return kinds.pop() if len(kinds) == 1 else "mixed"


def check_prompt_kind(prompts, prompt_type: str, source: str = "the prompts") -> str:
    """Refuse prompts that the ``prompt_type`` model (``-t point|box|prev_mask``) would misread:
    a point file run with ``-t box``, or a file mixing points and boxes. Returns the kind."""
    prompts = list(prompts)
    want = "mask" if prompt_type == "prev_mask" else prompt_type
    kind = prompt_kind(prompts)
    if kind == want:
        return kind
    if kind == "mixed":
        counts = {}
        for p in prompts:
            counts[_kind_of(p)] = counts.get(_kind_of(p), 0) + 1
        held = ", ".join(f"{n} {k}" for k, n in counts.items())
        raise PromptError(f"{source}: mixes prompt kinds ({held}), but one run uses one model (-t {prompt_type}); "
                          f"put each kind in its own file")
    flag = "prev_mask" if kind == "mask" else kind
    raise PromptError(f"{source}: holds {kind} prompts, but the prompt type is {prompt_type!r}; "
                      f"run with -t {flag} (the {prompt_type} model would misread them)")


def check_prompt_count(n, allow_many: bool = False, source: str = "") -> int:
    """Guard against runaway runs (each prompt runs the network once): a
    :class:`ManyPromptsWarning` above 100 prompts, a :class:`PromptError` above 1000 unless
    ``allow_many`` (the CLI's ``--allow-many-prompts``). ``n``: a count or the prompts."""
    count = int(n) if isinstance(n, numbers.Integral) else len(n)
    where = f"{source}: " if source else ""
    if count > MAX_PROMPTS and not allow_many:
        raise PromptError(f"{where}{count} prompts, more than the limit of {MAX_PROMPTS} (each prompt runs the "
                          f"network once); pass --allow-many-prompts (allow_many=True) to run them all")
    if count > MANY_PROMPTS:
        warnings.warn(f"{where}{count} prompts (more than {MANY_PROMPTS}): each runs the network once, "
                      f"so this will take long", ManyPromptsWarning, stacklevel=2)
    return count


def write_upstream_json(prompts, path) -> Path:
    """Write VoxelPrompts as upstream prompt JSON (values as strings, 2 decimals, like upstream)."""
    data = {}
    for p in prompts:
        vals = [round(float(v), 2) for v in p.coords]
        data[str(p.id)] = {p.kind: [str(int(v)) if p.kind == "box" else str(v) for v in vals]}
    atomic_write_text(Path(path), json.dumps(data, indent=4))
    return Path(path)


def write_world_json(prompts, path) -> Path:
    entries = []
    for p in prompts:
        if isinstance(p, Point):
            entries.append({"id": p.id, "point": [float(v) for v in p.xyz]})
        else:
            entries.append({"id": p.id, "box": [[float(v) for v in p.lower], [float(v) for v in p.upper]]})
    atomic_write_text(Path(path), json.dumps({"format": WORLD_FORMAT, "frame": "LPS", "units": "mm",
                                               "prompts": entries}, indent=2))
    return Path(path)


def prompts_from_labels(labels: np.ndarray, kind: str, label_type: str = "instance") -> list:
    """Derive point/box VoxelPrompts from a (z, y, x) label array.

    ``instance``: each label value is one lesion (ID = label value).
    ``semantic``: the binary foreground is split into 26-connected components,
    numbered 1..n in scan order. Points are centres of mass (continuous voxel
    indices); boxes are half-open voxel bounding boxes, as upstream's
    ``LesionLocator_create_prompt_json`` writes them.
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    if label_type == "semantic":
        labels, _ = ndimage.label(labels > 0, structure=np.ones((3, 3, 3)))
    elif label_type != "instance":
        raise PromptError(f"label_type must be 'instance' or 'semantic', got {label_type!r}")
    ids = [int(i) for i in np.unique(labels) if i > 0]
    if not ids:
        raise PromptError("the label image is empty: no lesion to make a prompt from")
    if ids[-1] > MAX_PROMPT_ID:
        found = f"lesion label {ids[-1]}" if label_type == "instance" else f"{ids[-1]} separate lesions"
        raise PromptError(f"the label image has {found}; {_ID_RULE}")
    out = []
    slices = ndimage.find_objects(labels.astype(np.int64))
    for pid in ids:
        sl = slices[pid - 1]
        if kind == "point":
            com = ndimage.center_of_mass(labels[sl] == pid)
            out.append(VoxelPrompt(pid, "point", [float(c + s.start) for c, s in zip(com, sl)]))
        elif kind == "box":
            out.append(VoxelPrompt(pid, "box", [v for s in sl for v in (int(s.start), int(s.stop))]))
        else:
            raise PromptError(f"prompt type must be 'point' or 'box', got {kind!r}")
    return out

