"""Train or fine-tune a promptable lesion segmentation network, nnU-Net style.

Data: pairs of CT images and instance label images (label value = lesion ID),
matched by file name. Each training sample picks an image, a lesion and a prompt
type, cuts the patch the network would see at inference (the same model grid as
:mod:`LesionLocatorLib.predict`, so training and inference see identical inputs)
and simulates the prompt as the paper describes (section 2.5):

* point: a random voxel of the lesion, drawn as a ball of radius 5 voxels;
* box: the lesion's bounding box grown along each axis by U[0, ``box_jitter_mm``] (default 8 mm,
  the paper's U[0, 10] voxels at its ~0.8 mm spacing), split at random between both sides, or
  (a ``tight_box_prob`` share) the exact bounding box;
* mask: the lesion mask, perturbed (shifted, dilated or eroded) as a propagated
  previous mask would be.

Loss: Dice + cross-entropy with deep supervision (optionally more cross-entropy weight on each
lesion's outermost voxel layer); SGD (Nesterov) with a poly learning rate; AMP on CUDA. The
output is a model root in the official layout
(``LesionLocatorCheckpoint/LesionLocatorSeg/{point,bbox}_optimized`` and
``LesionLocatorTrack``, all the same multi-prompt network), so the normal loader
runs it. Training resumes from ``checkpoint_latest.pth``. The recipe (schedule, optimizer, prompt
simulation, augmentation, loss) is one :class:`TrainOptions`.
"""
from __future__ import annotations

import contextlib
import json
import numbers
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ..encoding import box_to_model_grid, paint_prompt, point_to_model_grid
from ..files import atomic_output
from ..image import Image, nonzero_bbox, read_image
from ..model import checkpoint_dict  # noqa: F401  (re-exported: the training API)
from ..modelgrid import ModelGrid, ct_normalizer
from ..plans import CT_INTENSITIES, DATASET_JSON, make_plans  # noqa: F401  (re-exported: the training API)

PROMPT_TYPES = ("point", "box", "mask")
PERTURB_MARGIN = 4    # voxels around a lesion's bounding box that its perturbed mask may reach
BOX_JITTER_MM = 8.0   # the paper's U[0, 10] voxels at upstream's ~0.8 mm in-plane spacing


class TrainingDataError(ValueError):
    """Training images and labels that do not match."""


def save_atomically(obj, path: Path) -> Path:
    """torch.save to a temporary file beside ``path``, then rename: a full disk or a crash
    never leaves a truncated file under ``path`` (the previous version stays)."""
    path = Path(path)
    try:
        with atomic_output(path) as tmp:
            torch.save(obj, tmp)
    except OSError as e:  # files.WriteError names the file already
        raise OSError(e.errno, f"{e.strerror or e}; the previous file is unchanged") from None
    return path


# ------------------------------------------------------------------------------ data
@dataclass
class Case:
    name: str
    image: Image
    labels: np.ndarray
    grid: ModelGrid
    lesions: dict  # id -> (slices of its bounding box, voxel indices (N, 3))
    model_image: np.ndarray  # the normalised image on the padded model grid (z, y, x), float32
    model_lesions: dict  # id -> (lo: its block's first padded model-grid voxel, bool block): resampled as a label


def find_pairs(images_dir, labels_dir) -> list:
    """(image, label) paths matched by name; clear errors for unmatched files. A label ``<case>_label.*``
    matches image ``<case>.*`` (what ``lesionlocator synth`` writes, images and labels in one folder)."""
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise TrainingDataError(f"training folder not found: {d}")

    def stem(p: Path) -> str:
        n = p.name
        for e in (".nii.gz", ".nii", ".nrrd", ".mha"):
            if n.endswith(e):
                return n[: -len(e)]
        return n
    def label_case(p: Path) -> str:  # lesionlocator synth names labels <case>_label.<ending>
        return stem(p)[: -len("_label")] if stem(p).endswith("_label") else stem(p)
    imgs = {stem(p): p for p in sorted(images_dir.iterdir()) if stem(p) != p.name and not stem(p).endswith("_label")}
    labs = {label_case(p): p for p in sorted(labels_dir.iterdir()) if stem(p) != p.name
            and (stem(p).endswith("_label") or images_dir.resolve() != labels_dir.resolve())}
    if not imgs:
        raise TrainingDataError(f"no images in {images_dir}")
    if set(imgs) != set(labs):
        raise TrainingDataError(f"images and labels do not match by name: images without label "
                                f"{sorted(set(imgs) - set(labs))}, labels without image "
                                f"{sorted(set(labs) - set(imgs))}")
    return [(imgs[k], labs[k]) for k in sorted(imgs)]


def load_case(image_path, label_path, configuration: dict, normalize) -> Case:
    """One training image and its instance labels, with the image and every lesion resampled to the
    model grid once (as nnU-Net preprocesses its training data): a sample is then a slice of
    them, the blocks :meth:`ModelGrid.extract` and :meth:`ModelGrid.extract_mask` would give.
    ``normalize``: original-resolution float32 HU -> normalised values (:func:`ct_normalizer`)."""
    image, labels = read_image(image_path), read_image(label_path)
    if not image.same_geometry(labels):
        raise TrainingDataError(f"{label_path} does not have the geometry of {image_path} "
                                f"(size {labels.shape} vs {image.shape}, spacing {labels.spacing} vs {image.spacing})")
    lab = np.asarray(labels.array).astype(np.int32)
    grid = ModelGrid.for_image(image.array, nonzero_bbox(image.array), image.spacing_zyx, configuration)
    lesions = {}
    for pid, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        idx = np.argwhere(lab[sl] == pid) + [s.start for s in sl]
        lesions[pid] = (sl, idx)
    if not lesions:
        raise TrainingDataError(f"{label_path} has no lesion")
    model_image = grid.extract(image.array, (0, 0, 0), grid.padded_shape, normalize)
    model_lesions = {pid: _mask_block(grid, lab == pid, sl) for pid, (sl, _) in lesions.items()}
    return Case(Path(image_path).name, image, lab, grid, lesions, model_image, model_lesions)


def _mask_block(grid: ModelGrid, mask: np.ndarray, sl) -> tuple:
    """(lo, block): a lesion ``mask`` (original grid, bounding box ``sl``) resampled to the model
    grid (:meth:`ModelGrid.extract_mask`) over the model-grid rows its bounding box reaches
    (padded coordinates); outside them the resampled mask is empty."""
    lo, hi = [], []
    for axis, s in enumerate(sl):
        c0 = min(max(s.start - grid.crop_lo[axis], 0), grid.cropped_shape[axis] - 1)
        c1 = min(max(s.stop - grid.crop_lo[axis], c0 + 1), grid.cropped_shape[axis])
        rows = np.flatnonzero(np.any(grid.mask_weights(axis)[0][:, c0:c1] != 0, axis=1))
        lo.append(int(rows[0]) + grid.pad_lo[axis])
        hi.append(int(rows[-1]) + 1 + grid.pad_lo[axis])
    return np.asarray(lo), grid.extract_mask(mask, lo, hi) > 0


def _paste(block_lo, block: np.ndarray, lo, shape) -> np.ndarray:
    """float32 array of ``shape`` whose voxel 0 is padded model-grid voxel ``lo``, holding the part of
    ``block`` (first voxel ``block_lo``) that falls inside it, zeros elsewhere."""
    out = np.zeros(shape, np.float32)
    a = np.maximum(block_lo, lo)
    b = np.minimum(block_lo + block.shape, np.asarray(lo) + shape)
    if (b > a).all():
        out[tuple(slice(i - j, k - j) for i, j, k in zip(a, lo, b))] = \
            block[tuple(slice(i - j, k - j) for i, j, k in zip(a, block_lo, b))]
    return out


def simulate_sample(case: Case, rng: np.random.Generator, patch, prompt_type: str,
                    low_res_prob: float = 0.0, vanish_prob: float = 0.0,
                    box_jitter_mm: float | None = BOX_JITTER_MM, intensity_augmentation: bool = False,
                    vanish_tissue_hu: float | None = None, vanish_fragment_prob: float = 0.0,
                    tight_box_prob: float = 0.0) -> tuple:
    """(input (2, *patch) float32, target (1, *patch) float32) for one random lesion of ``case``.

    ``box_jitter_mm``: a box prompt is the lesion's bounding box grown along each axis by
    U[0, box_jitter_mm] millimetres in total (a sloppy user's box), split at random between the two
    sides. In millimetres, not model voxels: on a coarse model grid the paper's U[0, 10] voxels
    would grow a 10 mm lesion's box to 50 mm, far looser than the boxes users draw. None: that
    older scheme (U[0, 10] model voxels on each side; training runs before 2026-12).
    ``tight_box_prob``: share of box prompts that are the lesion's exact bounding box (no growth:
    a careful user's box), so that the network learns to fill a tight box to its edges.
    ``intensity_augmentation``: also :func:`augment_intensity` (noise, blur, brightness,
    contrast, gamma), so that a model trained on few CTs relies less on their exact grey values.

    ``low_res_prob``: probability of simulating a scan coarser than the model spacing (see
    :func:`simulate_low_resolution`). ``vanish_prob``: probability that a mask-prompt sample
    shows a lesion that has vanished (:func:`vanished_mask`: the previous mask lies on tissue
    without a lesion, the target is empty), so that tracking can report ``vanished``;
    ``vanish_tissue_hu`` and ``vanish_fragment_prob``: where that mask lies and what is left of it
    (see :func:`vanished_mask` and :func:`fragment`)."""
    grid = case.grid
    pid = int(rng.choice(list(case.lesions)))
    sl, idx = case.lesions[pid]
    lesion = case.labels == pid if prompt_type == "mask" else None
    prompt_mask, vanished = None, False
    if prompt_type == "mask" and rng.random() < vanish_prob:
        prompt_mask = vanished_mask(case, perturb_mask(lesion, sl, rng), rng, tissue_hu=vanish_tissue_hu)
        if prompt_mask is not None:
            vanished = True
            if rng.random() < vanish_fragment_prob:
                prompt_mask = fragment(prompt_mask, rng)
            idx = np.argwhere(prompt_mask)
    voxel = idx[rng.integers(len(idx))]
    centre = np.round(grid.original_to_model(voxel)).astype(int) + np.asarray(grid.pad_lo)
    jitter = rng.integers(-np.asarray(patch) // 4, np.asarray(patch) // 4 + 1)
    lo = np.clip(centre - np.asarray(patch) // 2 + jitter, 0, np.maximum(np.asarray(grid.padded_shape) - patch, 0))
    hi = lo + np.asarray(patch)
    x = np.zeros((2,) + tuple(patch), np.float32)
    x[0] = case.model_image[tuple(slice(a, b) for a, b in zip(lo, hi))]
    y = np.zeros((1,) + tuple(patch), np.float32)
    if not vanished:
        y[0] = _paste(*case.model_lesions[pid], lo, tuple(patch))
    offset = tuple(int(a - p) for a, p in zip(lo, grid.pad_lo))
    if prompt_type == "point":
        paint_prompt(x[1], "point", point_to_model_grid(voxel, grid.crop_lo, grid.cropped_shape, grid.model_shape),
                     offset)
    elif prompt_type == "box":
        box = box_to_model_grid([v for s in sl for v in (s.start, s.stop)], grid.crop_lo, grid.cropped_shape,
                                grid.model_shape).reshape(3, 2)
        # (a random number is drawn for the tight-box choice only when it is on: runs without it
        # keep their sample streams)
        if tight_box_prob > 0 and rng.random() < tight_box_prob:
            grow = np.zeros((3, 2), int)
        elif box_jitter_mm is None:
            grow = rng.integers(0, 11, size=(3, 2))
        else:
            total = rng.uniform(0, box_jitter_mm, size=3) / np.asarray(grid.target_spacing)  # model voxels per axis
            share = rng.uniform(0, 1, size=3)
            grow = np.round(np.stack([total * share, total * (1 - share)], 1)).astype(int)
        box = np.stack([np.maximum(box[:, 0] - grow[:, 0], 0),
                        np.minimum(box[:, 1] + grow[:, 1], grid.model_shape)], 1)
        paint_prompt(x[1], "box", box.ravel(), offset)
    else:
        if prompt_mask is None:
            prompt_mask = perturb_mask(lesion, sl, rng)
            region = _grown(sl, PERTURB_MARGIN)
        else:
            region = tuple(slice(a, b + 1) for a, b in zip(idx.min(0), idx.max(0)))
        x[1] = _paste(*_mask_block(grid, prompt_mask, region), lo, tuple(patch))
    # mirroring augmentation (the axes test-time augmentation uses) and mild intensity jitter
    for axis in (1, 2, 3):
        if rng.random() < 0.5:
            x, y = np.flip(x, axis), np.flip(y, axis)
    x[0] = x[0] * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)
    if rng.random() < low_res_prob:
        x[0] = simulate_low_resolution(x[0], rng)
    if intensity_augmentation:
        x[0] = augment_intensity(x[0], rng)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def augment_intensity(block: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """nnU-Net's default intensity augmentations of a normalised image block (z, y, x), each
    applied with its own probability: Gaussian noise (p 0.1, variance U[0, 0.1]), Gaussian blur
    (p 0.2, sigma U[0.5, 1] voxels), brightness (p 0.15, x U[0.75, 1.25]), contrast (p 0.15,
    U[0.75, 1.25] around the mean, clipped to the block's range) and gamma (p 0.3, U[0.7, 1.5]
    on the block rescaled to [0, 1]; inverted image with p 0.1)."""
    out = np.asarray(block, np.float32)
    if rng.random() < 0.1:
        out = out + rng.normal(0.0, np.sqrt(rng.uniform(0.0, 0.1)), out.shape).astype(np.float32)
    if rng.random() < 0.2:
        out = ndimage.gaussian_filter(out, rng.uniform(0.5, 1.0))
    if rng.random() < 0.15:
        out = out * rng.uniform(0.75, 1.25)
    if rng.random() < 0.15:
        lo, hi, mean = out.min(), out.max(), out.mean()
        out = np.clip((out - mean) * rng.uniform(0.75, 1.25) + mean, lo, hi)
    for inverted, p in ((True, 0.1), (False, 0.3)):
        if rng.random() < p:
            lo, hi = float(out.min()), float(out.max())
            if hi - lo < 1e-6:
                continue
            unit = (out - lo) / (hi - lo)
            unit = 1.0 - (1.0 - unit) ** rng.uniform(0.7, 1.5) if inverted else unit ** rng.uniform(0.7, 1.5)
            out = unit * (hi - lo) + lo
    return out.astype(np.float32)


def simulate_low_resolution(block: np.ndarray, rng: np.random.Generator, zoom_range=(0.33, 1.0)) -> np.ndarray:
    """The image channel as a scan of coarser voxels would look on the model grid: each axis
    down-sampled by a factor from ``zoom_range`` (linear, i.e. voxel averaging and loss of noise
    and detail) and up-sampled back (linear), like nnU-Net's low-resolution augmentation. A 3 mm
    scan on a 1.5 mm model grid is a zoom of 0.5."""
    zoom = rng.uniform(*zoom_range, size=3)
    small_shape = np.maximum(np.round(np.asarray(block.shape) * zoom).astype(int), 2)
    small = ndimage.zoom(block, small_shape / np.asarray(block.shape), order=1, grid_mode=True, mode="nearest")
    return ndimage.zoom(small, np.asarray(block.shape) / small.shape, order=1, grid_mode=True,
                        mode="nearest").astype(np.float32)[tuple(slice(0, n) for n in block.shape)]


def vanished_mask(case: Case, mask: np.ndarray, rng: np.random.Generator, max_shift_mm: float = 60.0,
                  margin: int = 2, tries: int = 20, tissue_hu: float | None = None) -> np.ndarray | None:
    """``mask`` (a previous lesion mask, original voxel grid) moved by up to ``max_shift_mm`` per
    axis to where the image has no lesion within ``margin`` voxels of its bounding box and the
    tissue under it is body (mean above -900 HU, lung included): what a tracked lesion's warped
    mask covers after the lesion vanished. None when ``tries`` random moves find no such place.

    ``tissue_hu``: also require the median HU under the moved mask to be within ``tissue_hu`` of
    the median of the tissue around the lesion (a ``margin``-voxel shell): a vanished lesion
    leaves the tissue it grew in (an organ's parenchyma, muscle), not any body tissue, and that
    tissue is where a model is tempted to segment "something"; such a place is rarer, so at least
    60 moves are tried. None: anywhere in the body (the scheme of training runs before
    2026-12-01 (6))."""
    idx = np.argwhere(mask)
    shape = np.asarray(mask.shape)
    limit = np.maximum(np.round(max_shift_mm / np.asarray(case.image.spacing_zyx)).astype(int), 1)
    image = np.asarray(case.image.array)
    if tissue_hu is not None:
        region = tuple(slice(max(a - margin, 0), b + margin + 1) for a, b in zip(idx.min(0), idx.max(0)))
        inside = mask[region]
        shell = ndimage.binary_dilation(inside, iterations=margin) & ~inside
        surroundings = float(np.median(image[region][shell])) if shell.any() else float(np.median(image[mask]))
        tries = max(tries, 60)     # a narrower target: more tries
    # moves that keep the mask and its margin inside the image
    low = np.maximum(-limit, margin - idx.min(0))
    high = np.minimum(limit, shape - margin - 1 - idx.max(0))
    if (low > high).any():
        return None
    for _ in range(tries):
        moved = idx + rng.integers(low, high + 1)
        lo, hi = moved.min(0) - margin, moved.max(0) + margin + 1
        if case.labels[tuple(slice(a, b) for a, b in zip(lo, hi))].any():
            continue
        if image[tuple(moved.T)].mean() <= -900:
            continue
        if tissue_hu is not None and abs(float(np.median(image[tuple(moved.T)])) - surroundings) > tissue_hu:
            continue
        out = np.zeros_like(mask)
        out[tuple(moved.T)] = True
        return out
    return None


def fragment(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small piece of ``mask``: its voxels within 1 or 2 voxels (random) of one of them: what a
    tracker's previous false positive (a few voxels found where a lesion had vanished) passes on
    as the next prompt. Never empty when ``mask`` is not."""
    idx = np.argwhere(mask)
    centre = idx[rng.integers(len(idx))]
    radius = int(rng.integers(1, 3))
    near = idx[((idx - centre) ** 2).sum(1) <= radius ** 2]
    out = np.zeros_like(mask)
    out[tuple(near.T)] = True
    return out


def _grown(sl, margin: int) -> tuple:
    """Slices ``sl`` grown by ``margin`` voxels on each side (the stop may pass the array's end)."""
    return tuple(slice(max(s.start - margin, 0), s.stop + margin) for s in sl)


def perturb_mask(mask: np.ndarray, sl, rng: np.random.Generator) -> np.ndarray:
    """A previous-timepoint-like version of a lesion mask: shifted by up to a fifth of its
    extent (at most 2 voxels) per axis and dilated or eroded by one voxel (never empty); it lies
    inside the bounding box ``sl`` grown by ``PERTURB_MARGIN`` voxels."""
    box = _grown(sl, PERTURB_MARGIN)
    part = mask[box]
    limit = np.minimum(2, np.array([(s.stop - s.start) // 5 for s in sl]))
    shift = rng.integers(-limit, limit + 1)
    part = ndimage.shift(part.astype(np.uint8), shift, order=0) > 0
    op = rng.integers(3)
    if op == 1:
        part = ndimage.binary_dilation(part)
    elif op == 2 and ndimage.binary_erosion(part).any():
        part = ndimage.binary_erosion(part)
    out = np.zeros_like(mask)
    out[box] = part if part.any() else mask[box]
    return out


# ------------------------------------------------------------------------------ training
DEEP_SUPERVISION_TARGETS = ("max_pool", "nearest")


def _check_deep_supervision_targets(mode: str) -> None:
    if mode not in DEEP_SUPERVISION_TARGETS:
        raise ValueError(f"unknown deep-supervision target mode {mode!r}: use one of {DEEP_SUPERVISION_TARGETS}")


def downsample_targets(y: torch.Tensor, strides, mode: str = "max_pool") -> list:
    """Deep-supervision targets of a (batch, 1, z, y, x) label ``y``: ``y`` and one per further
    decoder output, each ``strides[i]`` (per axis, the encoder stages' strides after the first)
    coarser than the one before. ``"nearest"``: every stride-th voxel starting at 0, the voxel a
    stride-2, kernel-3, padding-1 convolution's output is centred on (nnU-Net samples voxel
    2 i + 1 instead, ``interpolate(mode="nearest-exact")``). ``"max_pool"``: a voxel is
    foreground when any voxel of its stride block is: blocks are centred half a fine voxel off the
    convolution's output, and coarse targets grow a lesion by up to a block per side."""
    _check_deep_supervision_targets(mode)
    out = [y]
    for stride in strides:
        stride = tuple(int(s) for s in stride)
        if mode == "nearest":
            out.append(out[-1][:, :, ::stride[0], ::stride[1], ::stride[2]])
        else:
            out.append(torch.nn.functional.max_pool3d(out[-1], stride, ceil_mode=True))
    return out


def outline_voxels(target: torch.Tensor) -> torch.Tensor:
    """Lesion voxels of a (batch, 1, z, y, x) label tensor that have a background voxel among
    their 26 neighbours: each lesion's outermost voxel layer (a patch's border counts as no
    neighbour). Bool, same shape."""
    t = target.float()
    shrunk = -torch.nn.functional.max_pool3d(-t, 3, 1, 1)
    return (t > 0) & (shrunk != t)


class OutlineWeightedLoss(torch.nn.Module):
    """``loss(logits, target)`` plus ``weight`` times the cross-entropy of the
    :func:`outline_voxels`, averaged over all voxels: with nnU-Net's Dice + CE, a cross-entropy
    weight of 1 + ``weight`` on each lesion's outermost layer and 1 elsewhere. In a scan those
    voxels are partly lesion, partly surroundings (partial volume: grey values between the two),
    and the label counts them as lesion; an unweighted loss lets a small network leave many of
    them out (run13: recall 0.81, precision 0.95 on tight boxes; the missed voxels are that
    layer). Weighting only the inner layer moves the decision outwards; weighting the layer outside
    too (more voxels) moved it inwards."""

    def __init__(self, loss: torch.nn.Module, weight: float):
        super().__init__()
        self.loss, self.weight = loss, float(weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        outline = outline_voxels(target)[:, 0]
        ce = torch.nn.functional.cross_entropy(logits, target[:, 0].long(), reduction="none")
        return self.loss(logits, target) + self.weight * (ce * outline).sum() / ce.numel()


def _dice(pred: torch.Tensor, y: torch.Tensor) -> float:
    p, t = pred.bool(), y.bool()
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2 * (p & t).sum() / denom)


@dataclass(frozen=True)
class TrainOptions:
    """The training recipe of :func:`train`: everything that decides what a run learns. Every
    option has the default of ``lesionlocator train``; values are checked when the options are
    made (``ValueError`` naming the option).

    Schedule and optimizer:

    * ``epochs`` (count, >= 1; default 50): length of the run; the poly learning-rate schedule
      spans it, also when a run is trained in phases (``stop_after_epoch`` of :func:`train`).
    * ``iterations_per_epoch`` (count, >= 0; 50): training steps (batches) per epoch.
    * ``batch_size`` (samples, >= 1; 2): samples per step.
    * ``initial_lr`` (learning rate, > 0; 1e-2): start of the poly schedule
      (``lr = initial_lr * (1 - epoch / epochs) ** 0.9``).
    * ``optimizer`` ("sgd" or "adamw"; "sgd"): "sgd" is nnU-Net's (Nesterov, momentum 0.99,
      weight decay 3e-5); "adamw" (weight decay 1e-2) wants an ``initial_lr`` near 1e-3. A run
      resumes only with the optimizer that wrote its checkpoint.
    * ``seed`` (integer; 0): seeds torch (initial weights) and the sample stream; a resumed run
      reseeds its sample stream with (seed, epoch).

    Prompt simulation (see :func:`simulate_sample`):

    * ``prompt_types`` (names from ``("point", "box", "mask")``, drawn with equal odds per
      entry; all three): which prompts are simulated; ``("box",)`` trains a box-prompt model.
    * ``box_jitter_mm`` (millimetres, >= 0, or None; 8.0): a box prompt is the lesion's bounding
      box grown by U[0, this] mm per axis, split at random between both sides; None: the legacy
      scheme, U[0, 10] model voxels per side (runs before 2026-12).
    * ``tight_box_prob`` (share of box prompts, [0, 1]; 0): boxes that are the exact bounding box.
    * ``vanish_prob`` (share of mask-prompt samples, [0, 1]; 0): the lesion has vanished: the
      previous mask lies on lesion-free tissue, the target is empty (:func:`vanished_mask`).
    * ``vanish_tissue_hu`` (Hounsfield units, >= 0, or None; None): a vanished lesion's mask lies on
      tissue whose median is within this many HU of the lesion's surroundings; None: anywhere in
      the body.
    * ``vanish_fragment_prob`` (share of vanished-lesion samples, [0, 1]; 0): the previous mask is
      a small fragment (:func:`fragment`), as a tracker's earlier false positive would be.

    Augmentation:

    * ``low_res_prob`` (share of samples, [0, 1]; 0): the image looks like a coarser scan
      (:func:`simulate_low_resolution`, zoom 0.33-1 per axis).
    * ``intensity_augmentation`` (bool; False): nnU-Net's grey-value augmentations
      (:func:`augment_intensity`).

    Loss and arithmetic:

    * ``deep_supervision_targets`` ("max_pool" or "nearest"; "max_pool"): how the coarse decoder
      outputs' targets are made (:func:`downsample_targets`).
    * ``outline_weight`` (loss weight, >= 0; 0): extra cross-entropy weight of each lesion's
      outermost voxel layer (:class:`OutlineWeightedLoss`); 0 is nnU-Net's Dice + CE.
    * ``cpu_bf16`` (bool; False): on the CPU, forward and backward passes in bfloat16 autocast
      (weights, loss and validation stay float32): 1.6-1.8x faster steps on CPUs with
      AVX512-BF16 or AMX, slower elsewhere. On CUDA, AMP (float16) is always used.

    Validation:

    * ``val_samples`` (samples, >= 1; 16): fixed validation samples (seed + 999, prompt types in
      turn) whose mean Dice is logged after every epoch.
    """
    epochs: int = 50
    iterations_per_epoch: int = 50
    batch_size: int = 2
    initial_lr: float = 1e-2
    optimizer: str = "sgd"
    seed: int = 0
    prompt_types: tuple = PROMPT_TYPES
    box_jitter_mm: float | None = BOX_JITTER_MM
    tight_box_prob: float = 0.0
    vanish_prob: float = 0.0
    vanish_tissue_hu: float | None = None
    vanish_fragment_prob: float = 0.0
    low_res_prob: float = 0.0
    intensity_augmentation: bool = False
    deep_supervision_targets: str = "max_pool"
    outline_weight: float = 0.0
    cpu_bf16: bool = False
    val_samples: int = 16

    def __post_init__(self):
        object.__setattr__(self, "prompt_types", tuple(self.prompt_types))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for the first option out of range (the one place options are checked)."""
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use 'sgd' or 'adamw'")
        _check_deep_supervision_targets(self.deep_supervision_targets)
        if not self.outline_weight >= 0:
            raise ValueError(f"outline_weight must be >= 0, got {self.outline_weight}")
        for name in ("tight_box_prob", "vanish_prob", "vanish_fragment_prob", "low_res_prob"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        for name in ("box_jitter_mm", "vanish_tissue_hu"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        for name, least in (("epochs", 1), ("iterations_per_epoch", 0), ("batch_size", 1), ("val_samples", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
                raise ValueError(f"{name} must be a whole number >= {least}, got {value}")
        if not self.initial_lr > 0:
            raise ValueError(f"initial_lr must be > 0, got {self.initial_lr}")
        if not self.prompt_types or not set(self.prompt_types) <= set(PROMPT_TYPES):
            raise ValueError(f"prompt_types must be some of {PROMPT_TYPES}, got {self.prompt_types}")


def train(pairs, out_dir, plans: dict, options: TrainOptions | None = None, *, val_pairs=None,
          init_from=None, device: str = "auto", stop_after_epoch: int | None = None, progress=None,
          log=print) -> Path | None:
    """Train (or fine-tune from ``init_from``, a checkpoint of the same architecture) with the
    recipe ``options`` (default: ``TrainOptions()``) and write a model root
    ``out_dir/LesionLocatorCheckpoint``. Resumes from ``out_dir/checkpoint_latest.pth``.

    ``pairs``, ``val_pairs``: (image, label) paths (:func:`find_pairs`); without ``val_pairs`` the
    validation samples come from the training cases. ``device``: "auto" (CUDA > MPS > CPU), "cpu",
    "cuda", "cuda:N", "mps". ``stop_after_epoch``: end this session after that epoch, before
    ``options.epochs`` (the learning-rate schedule still spans ``options.epochs``), and return None;
    a later call resumes, possibly with other data (training in phases, or across sessions on a
    machine with a time limit). ``progress(fraction, message)`` after each epoch; ``log(message)``
    for each line of the training log."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
    from ..model import _network_state, build_network, load_checkpoint, select_device

    if options is None:
        options = TrainOptions()
    elif not isinstance(options, TrainOptions):
        raise TypeError(f"options must be a TrainOptions, got {type(options).__name__}")
    epochs, seed, optimizer, prompt_types = options.epochs, options.seed, options.optimizer, options.prompt_types
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = select_device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    config = plans["configurations"]["3d_fullres"]
    patch = tuple(config["patch_size"])
    normalize = ct_normalizer(plans["foreground_intensity_properties_per_channel"]["0"])
    cases = [load_case(i, lab, config, normalize) for i, lab in pairs]
    val_cases = [load_case(i, lab, config, normalize) for i, lab in (val_pairs or [])] or cases
    network = build_network(plans, "3d_fullres", DATASET_JSON, deep_supervision=True).to(dev)
    n_out = len(config["architecture"]["arch_kwargs"]["features_per_stage"]) - 1
    target_strides = config["architecture"]["arch_kwargs"]["strides"][1:n_out]
    weights = np.array([1 / (2 ** i) for i in range(n_out)])
    weights[-1] = 0
    weights = weights / weights.sum()
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    if options.outline_weight:
        loss = OutlineWeightedLoss(loss, options.outline_weight)
    loss_fn = DeepSupervisionWrapper(loss, weights)
    if optimizer == "sgd":
        opt = torch.optim.SGD(network.parameters(), options.initial_lr, weight_decay=3e-5, momentum=0.99,
                              nesterov=True)
    else:
        opt = torch.optim.AdamW(network.parameters(), options.initial_lr, weight_decay=1e-2)
    scheduler = PolyLRScheduler(opt, options.initial_lr, epochs)
    scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" else None
    if scaler is not None:
        def autocast():
            return torch.autocast("cuda")
    elif options.cpu_bf16:
        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext
    logging = {"train_losses": [], "val_dice": [], "ema_fg_dice": [], "lrs": [], "epoch_seconds": []}
    start_epoch = 0
    latest = out_dir / "checkpoint_latest.pth"
    if latest.exists():
        ckpt = load_checkpoint(latest)
        saved_with = optimizer_name(ckpt["optimizer_state"])
        if saved_with != optimizer:
            raise ValueError(f"{latest} was written by the {saved_with!r} optimizer: resume with "
                             f"optimizer {saved_with!r} (--optimizer {saved_with}) or train into another folder")
        network.load_state_dict(ckpt["network_weights"])
        opt.load_state_dict(ckpt["optimizer_state"])
        logging = ckpt["logging"]
        start_epoch = int(ckpt["current_epoch"])
        rng = np.random.default_rng([seed, start_epoch])
        log(f"resuming from {latest} at epoch {start_epoch}")
    elif init_from is not None:
        state = _network_state(load_checkpoint(init_from)["network_weights"])
        missing = network.load_state_dict(state, strict=False)
        log(f"initialised from {init_from} (missing keys: {len(missing.missing_keys)})")
    val_rng = np.random.default_rng(seed + 999)
    val_set = [simulate_sample(val_cases[i % len(val_cases)], val_rng, patch,
                               prompt_types[i % len(prompt_types)], box_jitter_mm=options.box_jitter_mm)
               for i in range(options.val_samples)]
    from tqdm import tqdm
    last = epochs if stop_after_epoch is None else min(int(stop_after_epoch), epochs)
    for epoch in range(start_epoch, last):
        t0 = time.perf_counter()
        scheduler.step(epoch)
        network.train()
        losses = []
        bar = tqdm(range(options.iterations_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", leave=False)
        for _ in bar:
            samples = [simulate_sample(cases[rng.integers(len(cases))], rng, patch,
                                       prompt_types[rng.integers(len(prompt_types))], options.low_res_prob,
                                       options.vanish_prob, options.box_jitter_mm, options.intensity_augmentation,
                                       options.vanish_tissue_hu, options.vanish_fragment_prob,
                                       options.tight_box_prob)
                       for _ in range(options.batch_size)]
            x = torch.from_numpy(np.stack([s[0] for s in samples])).to(dev)
            y = torch.from_numpy(np.stack([s[1] for s in samples])).to(dev)
            opt.zero_grad(set_to_none=True)
            with autocast():
                out = network(x)
            loss = loss_fn([o.float() for o in out],
                           downsample_targets(y, target_strides, options.deep_supervision_targets))
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
                opt.step()
            losses.append(float(loss.detach()))
            bar.set_postfix_str(f"loss {np.mean(losses):.3f}")
        network.eval()
        with torch.no_grad():
            dices = [_dice(network(torch.from_numpy(x[None]).to(dev))[0].argmax(1), torch.from_numpy(y).to(dev))
                     for x, y in val_set]
        val = float(np.mean(dices))
        logging["train_losses"].append(float(np.mean(losses)) if losses else float("nan"))
        logging["val_dice"].append(val)
        ema = val if not logging["ema_fg_dice"] else 0.9 * logging["ema_fg_dice"][-1] + 0.1 * val
        logging["ema_fg_dice"].append(ema)
        logging["lrs"].append(float(opt.param_groups[0]["lr"]))
        logging["epoch_seconds"].append(time.perf_counter() - t0)
        log(f"epoch {epoch + 1}/{epochs}: loss {logging['train_losses'][-1]:.4f}, validation Dice {val:.3f}, "
            f"{logging['epoch_seconds'][-1]:.0f} s")
        save_atomically(checkpoint_dict(network.state_dict(), plans, logging=logging, epoch=epoch + 1,
                                        optimizer_state=opt.state_dict()), latest)
        plot_curves(logging, out_dir / "progress.png")
        if progress:
            progress((epoch + 1) / epochs, f"epoch {epoch + 1}: validation Dice {val:.3f}")
    if last < epochs:
        log(f"stopped after epoch {last} of {epochs}: run again to resume from {latest}")
        return None
    return export_model(network.state_dict(), plans, logging, epochs, out_dir)


def optimizer_name(optimizer_state: dict) -> str:
    """Which optimizer of :func:`train` wrote a checkpoint's ``optimizer_state``: "adamw" (its
    parameter groups carry Adam's ``betas``) or "sgd"."""
    groups = optimizer_state.get("param_groups") or [{}]
    return "adamw" if "betas" in groups[0] else "sgd"


def export_model(state: dict, plans: dict, logging: dict, epochs: int, out_dir: Path) -> Path:
    """Write the trained network as a model root in the official layout (one multi-prompt
    network for point, box and previous-mask prompts)."""
    root = Path(out_dir) / "LesionLocatorCheckpoint"
    state = {k: v.detach().cpu() for k, v in state.items()}
    # the deep-supervision heads are ordinary decoder layers: the keys equal the inference network's
    for folder, trainer, weights in (
            (root / "LesionLocatorSeg" / "point_optimized", "LesionLocatorTrainerSegment", state),
            (root / "LesionLocatorSeg" / "bbox_optimized", "LesionLocatorTrainerSegment", state),
            (root / "LesionLocatorTrack", "LesionLocatorTrainerTrack", {f"unet.{k}": v for k, v in state.items()})):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "plans.json").write_text(json.dumps(plans, indent=1))
        (folder / "dataset.json").write_text(json.dumps(DATASET_JSON, indent=1))
        save_atomically(checkpoint_dict(weights, plans, trainer, logging=logging, epoch=epochs),
                        folder / "fold_0" / "checkpoint_final.pth")
    return root


def plot_curves(logging: dict, path: Path) -> None:
    """Training loss, validation Dice and its moving average per epoch, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = range(1, len(logging["train_losses"]) + 1)
    ax.plot(epochs, logging["train_losses"], label="training loss")
    ax2 = ax.twinx()
    ax2.plot(epochs, logging["val_dice"], color="tab:green", label="validation Dice")
    ax2.plot(epochs, logging["ema_fg_dice"], color="tab:olive", linestyle="--", label="Dice (moving average)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2.set_ylabel("Dice")
    ax2.set_ylim(0, 1)
    fig.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
