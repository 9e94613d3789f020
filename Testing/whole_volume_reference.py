"""Whole-volume segmentation the way upstream LesionLocator does it, for comparison.

Preprocesses the *entire* image with nnU-Net's own functions (crop to nonzero,
CT normalisation, the plans' resampling function), places the prompt, predicts
the same tiles, marks never-predicted voxels NaN, resamples the logits back with
the plans' probability resampling and takes the argmax. Used by the ROI
equivalence test and by the benchmark as the reference path; not shipped.
"""
from __future__ import annotations

import numpy as np
import torch

from LesionLocatorLib.model import LoadedModel
from LesionLocatorLib.predict import _encode, _tiles, _blend
from LesionLocatorLib.encoding import paint_prompt
from LesionLocatorLib.prompts import to_voxel_prompt
from LesionLocatorLib.modelgrid import ModelGrid


def preprocess_whole(array: np.ndarray, spacing_zyx, model: LoadedModel):
    """(model-grid data (1, z, y, x), crop bbox, cropped shape) via nnunetv2."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(model.plans).get_configuration(model.configuration_name)
    data = array[None].astype(np.float32)
    data, _, bbox = crop_to_nonzero(data)
    cropped = data.shape[1:]
    new_shape = compute_new_shape(cropped, list(spacing_zyx), cm.spacing)
    norm = CTNormalization(use_mask_for_norm=False, intensityproperties=model.intensity_properties)
    data[0] = norm.run(data[0])
    data = cm.resampling_fn_data(data, new_shape, list(spacing_zyx), cm.spacing)
    return np.asarray(data, dtype=np.float32), bbox, cropped


def segment_whole_volume(image, prompt, model: LoadedModel, step_size: float = 0.5):
    """(mask bool (z, y, x), lesion probability float32) for one prompt, whole-volume path."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    cm = PlansManager(model.plans).get_configuration(model.configuration_name)
    data, bbox, cropped = preprocess_whole(image.array, image.spacing_zyx, model)
    grid = ModelGrid.for_image(image.array, bbox, image.spacing_zyx, model.configuration)
    assert tuple(data.shape[1:]) == grid.model_shape
    vp = to_voxel_prompt(prompt, image)
    (kind, coords), ext_lo, ext_hi = _encode(vp, grid)
    channel = np.zeros(data.shape[1:], np.float32)
    paint_prompt(channel, kind, coords)
    x = np.concatenate([data, channel[None]], 0)
    x, revert = pad_nd_image(x, grid.patch_size, "constant", {"constant_values": 0}, True, None)
    patch = grid.patch_size
    starts = _tiles(grid, ext_lo, ext_hi, step_size)
    tiles = []
    for s in starts:
        sl = (slice(None),) + tuple(slice(a, a + p) for a, p in zip(s, patch))
        tiles.append((s, model.forward(torch.from_numpy(np.ascontiguousarray(x[sl]))[None])[0]))
    gaussian = compute_gaussian(tuple(patch), 1. / 8, 10, dtype=torch.float32, device=torch.device("cpu"))
    lo, block = _blend(tiles, gaussian, patch)
    logits = torch.full((block.shape[0],) + tuple(x.shape[1:]), float("nan"))
    logits[(slice(None),) + tuple(slice(a, a + n) for a, n in zip(lo, block.shape[1:]))] = block
    logits = logits[(slice(None),) + tuple(revert[1:])]
    back = cm.resampling_fn_probabilities(logits.numpy(), cropped, cm.spacing, list(image.spacing_zyx))
    back = torch.from_numpy(np.asarray(back, dtype=np.float32))
    probs = torch.softmax(back, 0)
    seg = np.zeros(image.shape, bool)
    prob = np.zeros(image.shape, np.float32)
    sl = tuple(slice(a, b) for a, b in bbox)
    valid = ~torch.isnan(probs[0])
    fg = (torch.nan_to_num(probs, nan=-1.0).argmax(0) != 0) & valid
    seg[sl] = fg.numpy()
    prob[sl] = torch.where(valid, 1 - probs[0], torch.zeros_like(probs[0])).numpy()
    return seg, prob
