"""Prompt -> mask: segment lesions around prompts at the input's full resolution.

For each prompt only the region the network sees is preprocessed: the patch (or
the sliding-window tiles) that upstream LesionLocator would place around the
prompt on the whole-volume model grid is computed piecewise by
:class:`~LesionLocatorLib.modelgrid.ModelGrid`, run through the network (several
prompts in one batch), and the logits are resampled back onto the original voxels
they cover. Results match whole-volume preprocessing.

Arrays are (z, y, x); prompts are world (LPS mm) or voxel prompts, see
:mod:`LesionLocatorLib.prompts`.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .cancel import CancelToken, Cancelled  # noqa: F401  (re-exported: the library API)
from .image import Image, nonzero_bbox
from .model import LoadedModel, warn_if_not_ct
from .modelgrid import ModelGrid, ct_normalizer
from .plans import SUPPORTED_NORMALIZATIONS, UnsupportedPlansError
from .encoding import BALL_RADIUS_VOXELS, box_to_model_grid, paint_prompt, point_to_model_grid
from .prompts import PromptError, to_voxel_prompt


@dataclass
class SegmentationResult:
    """Per-prompt masks on the input grid plus an instance label image.

    ``masks[id]``: bool (z, y, x); ``probabilities[id]``: float32 lesion probability
    (0 outside the predicted region); ``labels``: uint16 Image, label = prompt ID,
    overlaps given to the prompt with the highest probability; ``overlaps``:
    {(id_a, id_b): voxels} where two masks overlapped; ``empty``: IDs with an empty mask.
    """
    masks: dict
    probabilities: dict
    labels: Image
    overlaps: dict = field(default_factory=dict)
    empty: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)


@dataclass
class _Tile:
    prompt_index: int
    lo: tuple  # padded model-grid start (z, y, x)


def _normalizer(model: LoadedModel):
    scheme = model.normalization
    if scheme == "CTNormalization":
        return ct_normalizer(model.intensity_properties)
    if scheme == "NoNormalization":
        return lambda block: block
    raise UnsupportedPlansError(f"normalisation {scheme!r} needs whole-image statistics and is not supported; "
                                f"supported: {', '.join(SUPPORTED_NORMALIZATIONS)}")


def _encode(vp, grid: ModelGrid):
    """(kind, model-grid coords) of a voxel prompt, and its inclusive extent [lo, hi] in the model grid."""
    shape = np.asarray(grid.model_shape)
    if vp.kind == "point":
        c = point_to_model_grid(vp.coords, grid.crop_lo, grid.cropped_shape, grid.model_shape)
        r = BALL_RADIUS_VOXELS
        return ("point", c), np.maximum(c - r, 0), np.minimum(c + r, shape - 1)
    if vp.kind == "box":
        b = box_to_model_grid(vp.coords, grid.crop_lo, grid.cropped_shape, grid.model_shape).reshape(3, 2)
        if np.any(b[:, 1] <= b[:, 0]):
            raise PromptError(f"prompt {vp.id}: box {vp.coords} is empty after mapping to the model grid")
        return ("box", b.ravel()), b[:, 0], b[:, 1] - 1
    if vp.kind == "mask":
        # like upstream's tracker: one patch centred on the mask's rounded centre of mass on the model grid
        centre = _mask_centre(vp.mask, grid)
        return ("mask", vp.mask), centre, centre
    raise PromptError(f"prompt {vp.id}: unknown prompt kind {vp.kind!r}")


def _mask_centre(mask: np.ndarray, grid: ModelGrid) -> np.ndarray:
    """Upstream TrackNet's patch centre for a (warped) previous mask: the centre of mass of the mask's voxels
    *on the model grid* (as :meth:`ModelGrid.extract_mask` resamples it), computed as TrackNet's
    ``get_patch_around_mask`` does at inference (``torch.nonzero(mask).float().mean(0).round()``: float32 mean,
    rounded half to even). Only the model-grid block that the mask's bounding box reaches is resampled.
    A mask that vanishes on the model grid (upstream skips such a lesion) falls back to its original-grid centre
    of mass mapped to the model grid."""
    from scipy import ndimage
    shape = np.asarray(grid.model_shape)
    box = (ndimage.find_objects(np.asarray(mask, dtype=np.uint8)) or [None])[0]
    rows = []
    for a in range(3):
        c0 = max(box[a].start - grid.crop_lo[a], 0) if box else 0
        c1 = min(box[a].stop - grid.crop_lo[a], grid.cropped_shape[a]) if box else 0
        reach = np.flatnonzero(np.any(grid.mask_weights(a)[0][:, c0:c1] != 0, axis=1)) if c1 > c0 else []
        rows.append((int(reach[0]), int(reach[-1]) + 1) if len(reach) else None)
    if all(r is not None for r in rows):
        lo = [r[0] for r in rows]
        block = grid.extract_mask(mask, [l_ + p for l_, p in zip(lo, grid.pad_lo)],
                                  [r[1] + p for r, p in zip(rows, grid.pad_lo)])
        fg = torch.nonzero(torch.from_numpy(block))
        if fg.shape[0]:
            return (fg + torch.tensor(lo)).float().mean(0).round().int().numpy().astype(int)
    centre = np.round(grid.original_to_model(ndimage.center_of_mass(mask))).astype(int)
    return np.clip(centre, 0, shape - 1)


def _track_background(grid: ModelGrid, lo, block: torch.Tensor) -> tuple:
    """Upstream's TrackNet returns logits [1, 0] (background) outside its one patch, and its export resamples
    them together with the patch: extend the patch logits (start ``lo``, padded coordinates) by the model voxels
    that the original voxels the patch reaches also read, filled with [1, 0]."""
    klo = [max(l_ - p, 0) for l_, p in zip(lo, grid.pad_lo)]
    khi = [min(l_ + n - p, m) for l_, n, p, m in zip(lo, block.shape[1:], grid.pad_lo, grid.model_shape)]
    new_lo, new_hi = [], []
    for a in range(3):
        _, support = grid.prob_weights(a)
        rows = np.any(support[:, klo[a]:khi[a]], axis=1)
        cols = np.flatnonzero(np.any(support[rows], axis=0))
        if cols.size == 0:
            return lo, block
        new_lo.append(min(int(cols[0]) + grid.pad_lo[a], lo[a]))
        new_hi.append(max(int(cols[-1]) + 1 + grid.pad_lo[a], lo[a] + block.shape[a + 1]))
    out = torch.zeros((block.shape[0],) + tuple(h - l_ for l_, h in zip(new_lo, new_hi)), dtype=block.dtype,
                      device=block.device)
    out[0] = 1.0
    out[(slice(None),) + tuple(slice(l_ - n, l_ - n + s) for l_, n, s in zip(lo, new_lo, block.shape[1:]))] = block
    return tuple(new_lo), out


def _tiles(grid: ModelGrid, ext_lo, ext_hi, step: float) -> list:
    """Upstream's tile placement around a prompt with inclusive extent [ext_lo, ext_hi]."""
    patch, size = np.asarray(grid.patch_size), np.asarray(grid.padded_shape)
    if np.all(ext_hi - ext_lo < patch):
        lo = []
        for a in range(3):
            start = int((ext_lo[a] + ext_hi[a] - patch[a]) / 2)
            start = min(max(start, 0), size[a] - patch[a])
            lo.append(start)
        return [tuple(lo)]
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
    steps = compute_steps_for_sliding_window(tuple(size), tuple(patch), step)
    keep = [[s for s in steps[a] if ext_lo[a] < s + patch[a] and ext_hi[a] > s] for a in range(3)]
    return [(z, y, x) for z in keep[0] for y in keep[1] for x in keep[2]]


def segment(image: Image, prompts, model: LoadedModel, progress=None, cancel: CancelToken | None = None,
            batch_size: int | None = None, step_size: float = 0.5, check_intensities: bool = True
            ) -> SegmentationResult:
    """Segment one lesion per prompt in ``image``.

    ``prompts``: Point/Box (LPS mm), MaskPrompt (a previous mask, e.g. warped from the
    last timepoint) or VoxelPrompt objects, each with a unique ``id``. A mask prompt
    gets one patch centred on its centre of mass, as upstream's tracker does.
    ``progress(fraction, message)`` is called as work advances; ``cancel`` stops
    between network batches by raising :class:`Cancelled`.
    ``batch_size``: prompt patches per forward pass (default: 2 on CPU, 4 on GPU).
    """
    prompts = list(prompts)
    if not prompts:
        raise PromptError("no prompts given")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise PromptError(f"prompt IDs must be unique, got {ids}")
    voxel_prompts = [to_voxel_prompt(p, image) for p in prompts]
    report = progress or (lambda f, m: None)
    if check_intensities:
        warn_if_not_ct(image.array)

    grid = ModelGrid.for_image(image.array, nonzero_bbox(image.array), image.spacing_zyx, model.configuration)
    normalize = _normalizer(model)
    encoded, tiles = [], []
    for i, vp in enumerate(voxel_prompts):
        enc, ext_lo, ext_hi = _encode(vp, grid)
        encoded.append(enc)
        tiles += [_Tile(i, t) for t in _tiles(grid, ext_lo, ext_hi, step_size)]

    patch = grid.patch_size
    gaussian = None
    if any(sum(t.prompt_index == i for t in tiles) > 1 for i in range(len(prompts))):
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian
        gaussian = compute_gaussian(tuple(patch), sigma_scale=1. / 8, value_scaling_factor=10,
                                    dtype=torch.float32, device=torch.device("cpu"))
    if batch_size is None:
        batch_size = 2 if model.device.type == "cpu" else 4

    timings = {"preprocessing": 0.0, "network": 0.0, "postprocessing": 0.0}
    tile_logits = [[] for _ in prompts]  # per prompt: [(padded start, logits (C, *patch))]
    done = 0
    report(0.0, f"segmenting {len(prompts)} lesion(s): {len(tiles)} patch(es)")
    for start in range(0, len(tiles), batch_size):
        if cancel is not None:
            cancel.check()
        batch = tiles[start:start + batch_size]
        t0 = time.perf_counter()
        x_tensor = model.host_buffer((len(batch), 2) + patch).zero_()  # pinned on CUDA: asynchronous upload
        x = x_tensor.numpy()
        for b, t in enumerate(batch):
            hi = tuple(l_ + p for l_, p in zip(t.lo, patch))
            x[b, 0] = grid.extract(image.array, t.lo, hi, normalize)
            kind, coords = encoded[t.prompt_index]
            offset = tuple(l_ - p for l_, p in zip(t.lo, grid.pad_lo))
            if kind == "mask":
                x[b, 1] = grid.extract_mask(coords, t.lo, hi)
            else:
                paint_prompt(x[b, 1], kind, coords, offset)
            # the prompt is drawn on the unpadded model grid; padding stays 0
            _zero_padding(x[b, 1], t.lo, grid)
        t1 = time.perf_counter()
        logits = _run_with_fallback(model, x_tensor)  # stays on the model's device: resampled there
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)  # so that "network" holds the network's time
        timings["preprocessing"] += t1 - t0
        timings["network"] += time.perf_counter() - t1
        for b, t in enumerate(batch):
            tile_logits[t.prompt_index].append((t.lo, logits[b]))
        done += len(batch)
        report(done / len(tiles), f"patch {done}/{len(tiles)}")

    t0 = time.perf_counter()
    masks, probs, regions = {}, {}, {}
    for i, vp in enumerate(voxel_prompts):
        lo, block = _blend(tile_logits[i], gaussian, patch)
        if vp.kind == "mask":
            lo, block = _track_background(grid, lo, block)
        slices, orig = grid.logits_to_original(block, lo)
        # full-size arrays are allocated lazily (zero pages); only the covered region is written
        prob = np.zeros(image.shape, dtype=np.float32)
        mask = np.zeros(image.shape, dtype=bool)
        if slices is not None:
            prob[slices] = (1.0 - torch.softmax(orig, 0)[0]).cpu().numpy()
            # argmax != 0, exactly (ties go to background, as argmax takes the first maximum), without
            # argmax's slow strided reduction over the channel axis
            mask[slices] = (orig[1:].amax(0) > orig[0]).cpu().numpy()
        masks[vp.id], probs[vp.id], regions[vp.id] = mask, prob, slices
    labels, overlaps = instance_labels(masks, probs, image, regions)
    empty = [pid for pid, m in masks.items() if regions[pid] is None or not m[regions[pid]].any()]
    if empty:
        warnings.warn(f"the network found no lesion at prompt(s) {empty}: their masks are empty", stacklevel=2)
    timings["postprocessing"] = time.perf_counter() - t0
    report(1.0, "done")
    return SegmentationResult(masks, probs, labels, overlaps, empty, timings)


def _zero_padding(channel: np.ndarray, lo, grid: ModelGrid) -> None:
    for a in range(3):
        n0 = max(grid.pad_lo[a] - lo[a], 0)
        n1 = max(lo[a] + channel.shape[a] - (grid.pad_lo[a] + grid.model_shape[a]), 0)
        idx = [slice(None)] * 3
        if n0:
            idx[a] = slice(0, n0)
            channel[tuple(idx)] = 0
        if n1:
            idx[a] = slice(channel.shape[a] - n1, None)
            channel[tuple(idx)] = 0


def _blend(tiles, gaussian, patch) -> tuple:
    """(start, logits) of one prompt's tiles: the tile itself, or upstream's
    Gaussian-weighted average over the union of several tiles."""
    if len(tiles) == 1:
        return tiles[0]
    device = tiles[0][1].device  # the model's (a tile that fell back to the CPU is moved there)
    lo = tuple(min(t[0][a] for t in tiles) for a in range(3))
    hi = tuple(max(t[0][a] + patch[a] for t in tiles) for a in range(3))
    shape = tuple(h - l_ for l_, h in zip(lo, hi))
    total = torch.zeros((tiles[0][1].shape[0],) + shape, device=device)
    weight = torch.zeros(shape, device=device)
    gaussian = gaussian.to(device)
    for start, logits in tiles:
        sl = tuple(slice(a - b, a - b + p) for a, b, p in zip(start, lo, patch))
        total[(slice(None),) + sl] += logits.to(device) * gaussian
        weight[sl] += gaussian
    return lo, total / weight


def _run_with_fallback(model: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    """Forward pass, logits left on the model's device; on CUDA out-of-memory retry with smaller batches, then on
    the CPU (those logits are then on the CPU)."""
    try:
        return model.forward(x, on_device=True)
    except torch.OutOfMemoryError:
        if model.device.type != "cuda":
            raise MemoryError("out of memory running the network on the CPU; use a smaller batch_size "
                              "or a machine with more memory") from None
        torch.cuda.empty_cache()
        if x.shape[0] > 1:
            warnings.warn("CUDA out of memory: retrying with a smaller batch", stacklevel=2)
            half = x.shape[0] // 2
            first, second = _run_with_fallback(model, x[:half]), _run_with_fallback(model, x[half:])
            return torch.cat([first, second.to(first.device)])
        warnings.warn("CUDA out of memory even for one patch: running this patch on the CPU", stacklevel=2)
        device = model.device
        model.network.to("cpu")
        model.device = torch.device("cpu")
        try:
            return model.forward(x, on_device=True)
        finally:
            model.network.to(device)
            model.device = device


def instance_labels(masks: dict, probabilities: dict, reference: Image, regions: dict | None = None) -> tuple:
    """Combine per-prompt masks into one uint16 label image (label = prompt ID).

    Where masks overlap, the prompt with the higher lesion probability wins; the
    overlaps are returned as {(id_a, id_b): voxel count} and reported in a warning.
    ``regions`` (optional, id -> tuple of slices) bounds where each mask can be
    non-zero, so only that part of the volume is visited (a click on a large scan
    stays fast); without it the masks' bounding boxes are computed.
    """
    from scipy import ndimage
    labels = np.zeros(reference.shape, dtype=np.uint16)
    overlaps = {}
    for pid in sorted(masks):
        if regions is not None and pid in regions:
            region = regions[pid]
        else:
            region = (ndimage.find_objects(np.asarray(masks[pid], dtype=np.uint8)) or [None])[0]
        if region is None:
            continue
        m = np.asarray(masks[pid])[region]
        if not m.any():
            continue
        lab = labels[region]
        take = m & (lab == 0)
        clash = m & (lab > 0)
        if clash.any():  # a voxel goes to this lesion if it is more probable than the lesion holding it
            prob = np.asarray(probabilities[pid])[region]
            for other in np.unique(lab[clash]):
                where = np.nonzero(clash & (lab == other))
                overlaps[(int(other), int(pid))] = int(where[0].size)
                take[where] = prob[where] > np.asarray(probabilities[int(other)])[region][where]
        np.copyto(lab, pid, where=take)
    if overlaps:
        warnings.warn("overlapping lesion masks resolved by highest probability (ids: voxels) "
                      + ", ".join(f"{a}/{b}: {n}" for (a, b), n in overlaps.items())
                      + "; each lesion's own mask is kept whole", stacklevel=2)
    return reference.with_array(labels), overlaps
