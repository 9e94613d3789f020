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

A prompt's ``id`` is the lesion's label value in every output; ``name`` keeps the
key it had in the file. Internally everything is turned into :class:`VoxelPrompt`
(continuous voxel indices of one image, (z, y, x)), which :mod:`LesionLocatorLib.encoding`
draws into the network's prompt channel.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .files import atomic_write_text
from .image import Image


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
    prompt ID, its coordinates and the image extent.
    """
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
def _prompt_id(key, used: set) -> int:
    try:
        value = int(float(key))
        if value > 0 and float(key) == value:
            return value
    except (TypeError, ValueError):
        pass
    value = max(used | {0}) + 1
    return value


def parse_upstream_json(data: dict, source: str = "prompt file") -> list:
    """Upstream LesionLocator prompt JSON (voxel indices, z, y, x) -> list of VoxelPrompt.

    Keys are lesion IDs; integer-like keys keep their value, other keys get the next
    free integer (the key is kept as ``name``).
    """
    if not isinstance(data, dict) or not data:
        raise PromptError(f"{source}: no prompts found (expected {{\"1\": {{\"point\": [z, y, x]}}}} "
                          f"or {{\"1\": {{\"box\": [zmin, zmax, ymin, ymax, xmin, xmax]}}}})")
    prompts, used = [], set()
    int_keys = {int(float(k)) for k in data if _is_int_like(k)}
    used |= int_keys
    for key, entry in data.items():
        pid = int(float(key)) if _is_int_like(key) else _prompt_id(key, used)
        used.add(pid)
        if not isinstance(entry, dict) or not ({"point", "box"} & set(entry)):
            raise PromptError(f"{source}: prompt {key!r} has neither 'point' nor 'box': {entry!r}")
        kind = "point" if "point" in entry else "box"
        try:
            coords = [float(v) for v in entry[kind]]
        except (TypeError, ValueError):
            raise PromptError(f"{source}: prompt {key!r}: {kind} values must be numbers, got {entry[kind]!r}") from None
        need = 3 if kind == "point" else 6
        if len(coords) != need:
            raise PromptError(f"{source}: prompt {key!r}: a {kind} needs {need} values, got {len(coords)}")
        prompts.append(VoxelPrompt(pid, kind, coords, name=str(key)))
    return sorted(prompts, key=lambda p: p.id)


def _is_int_like(key) -> bool:
    try:
        return float(key) == int(float(key)) and int(float(key)) > 0
    except (TypeError, ValueError):
        return False


def parse_world_json(data: dict, source: str = "prompt file") -> list:
    """Our world-coordinate JSON (LPS mm) -> list of Point/Box."""
    if data.get("format") != WORLD_FORMAT:
        raise PromptError(f"{source}: not a world prompt file (expected \"format\": \"{WORLD_FORMAT}\")")
    if data.get("frame", "LPS").upper() != "LPS":
        raise PromptError(f"{source}: frame must be LPS, got {data.get('frame')!r}")
    out = []
    for i, entry in enumerate(data.get("prompts", [])):
        pid = int(entry.get("id", i + 1))
        if "point" in entry:
            out.append(Point(pid, tuple(float(v) for v in entry["point"]), str(entry.get("name", pid))))
        elif "box" in entry:
            lo, hi = entry["box"]
            out.append(Box.from_points(pid, [lo, hi], str(entry.get("name", pid))))
        else:
            raise PromptError(f"{source}: prompt {pid} has neither 'point' nor 'box'")
    if not out:
        raise PromptError(f"{source}: no prompts found")
    return out


def read_prompt_file(path, world: bool | None = None) -> list:
    """Read a prompt JSON. ``world=None`` detects our world format by its "format" key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptError(f"{path}: not valid JSON ({e})") from None
    is_world = isinstance(data, dict) and data.get("format") == WORLD_FORMAT
    if world or is_world:
        return parse_world_json(data, str(path))
    return parse_upstream_json(data, str(path))


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
    labels = np.asarray(labels)
    if label_type == "semantic":
        labels, _ = ndimage.label(labels > 0, structure=np.ones((3, 3, 3)))
    elif label_type != "instance":
        raise PromptError(f"label_type must be 'instance' or 'semantic', got {label_type!r}")
    ids = [int(i) for i in np.unique(labels) if i > 0]
    if not ids:
        raise PromptError("the label image is empty: no lesion to make a prompt from")
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

