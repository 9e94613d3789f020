"""segment(): ROI preprocessing equals whole-volume preprocessing; batching, overlaps, cancel."""
import warnings

import numpy as np
import pytest

from LesionLocatorLib.model import load_model
from LesionLocatorLib.predict import CancelToken, Cancelled, segment
from LesionLocatorLib.prompts import Point, PromptError, VoxelPrompt
from phantoms import ct_phantom, oblique_direction
from whole_volume_reference import segment_whole_volume


def _phantom(spacing, zero_border=True):
    img, lab = ct_phantom(shape_zyx=(30, 80, 70), spacing_xyz=spacing, direction=oblique_direction(),
                          lesions=[((15, 40, 30), 8.0, 120)])
    if zero_border:  # exact zeros on two sides: nnU-Net's nonzero crop then does not start at 0
        a = img.array.copy()
        a[:, :5] = 0
        a[:3] = 0
        img = img.with_array(a)
    return img, lab


def _assert_same(ours_mask, ours_prob, ref_mask, ref_prob):
    assert ref_mask.sum() > 50, "the reference must segment something for the comparison to mean anything"
    undecided = np.abs(ref_prob - 0.5) < 1e-5  # float-rounding ties
    assert np.array_equal(ours_mask & ~undecided, ref_mask & ~undecided)
    assert np.abs(ours_prob - ref_prob).max() < 1e-4


# spacings (x, y, z): upsampled, nnU-Net's separate-z path (z > 3x in-plane), downsampled in z, and
# axes whose size does not change (x and z at the model spacing: scipy still reads a neighbour there)
SPACINGS = [(1.5, 1.5, 2.5), (0.7, 0.7, 4.0), (1.0, 0.9, 0.6), (0.8, 1.2, 1.0)]


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("kind", ["point", "box"])
def test_roi_path_equals_whole_volume_preprocessing(tiny_model_root, spacing, kind):
    model = load_model(tiny_model_root, kind, device="cpu")
    img, _ = _phantom(spacing)
    prompt = (VoxelPrompt(1, "point", [15.3, 40, 30.6]) if kind == "point"
              else VoxelPrompt(1, "box", [10, 22, 30, 52, 20, 42]))
    ours = segment(img, [prompt], model)
    ref_mask, ref_prob = segment_whole_volume(img, prompt, model)
    _assert_same(ours.masks[1], ours.probabilities[1], ref_mask, ref_prob)


@pytest.mark.parametrize("spacing", SPACINGS[:2])
def test_roi_path_equals_whole_volume_with_torch_resampling_plans(tiny_torch_model_root, spacing):
    model = load_model(tiny_torch_model_root, "point", device="cpu")
    img, _ = _phantom(spacing)
    prompt = VoxelPrompt(1, "point", [15, 41, 29])
    ours = segment(img, [prompt], model)
    _assert_same(ours.masks[1], ours.probabilities[1], *segment_whole_volume(img, prompt, model))


def test_large_box_uses_gaussian_sliding_window_and_matches_whole_volume(tiny_model_root):
    model = load_model(tiny_model_root, "box", device="cpu")
    img, _ = _phantom((0.7, 0.7, 4.0))
    prompt = VoxelPrompt(1, "box", [4, 28, 10, 75, 5, 65])  # larger than one 32x48x48 patch
    ours = segment(img, [prompt], model)
    _assert_same(ours.masks[1], ours.probabilities[1], *segment_whole_volume(img, prompt, model))


def test_small_image_is_padded_to_the_patch(tiny_model_root):
    model = load_model(tiny_model_root, "point", device="cpu")
    img, _ = ct_phantom(shape_zyx=(8, 20, 18), spacing_xyz=(1.0, 1.0, 2.0), lesions=[((4, 10, 9), 4.0, 100)])
    prompt = VoxelPrompt(1, "point", [4, 10, 9])
    ours = segment(img, [prompt], model)
    _assert_same(ours.masks[1], ours.probabilities[1], *segment_whole_volume(img, prompt, model))


def test_batch_of_prompts_equals_prompts_one_by_one(tiny_model_root):
    model = load_model(tiny_model_root, "point", device="cpu")
    img, _ = _phantom((1.5, 1.5, 2.5), zero_border=False)
    prompts = [VoxelPrompt(1, "point", [15, 40, 30]), VoxelPrompt(2, "point", [10, 60, 50]),
               VoxelPrompt(5, "point", [20, 20, 20])]
    together = segment(img, prompts, model, batch_size=3)
    for p in prompts:
        alone = segment(img, [p], model)
        assert np.array_equal(alone.masks[p.id], together.masks[p.id])
    assert set(np.unique(together.labels.array)) <= {0, 1, 2, 5}
    assert together.labels.same_geometry(img)


def test_overlapping_lesions_go_to_the_more_probable_prompt_and_are_reported(tiny_model_root):
    model = load_model(tiny_model_root, "point", device="cpu")
    img, _ = _phantom((1.5, 1.5, 2.5), zero_border=False)
    prompts = [VoxelPrompt(1, "point", [15, 40, 30]), VoxelPrompt(2, "point", [15, 42, 32])]
    with pytest.warns(UserWarning, match=r"overlapping lesion masks resolved by highest probability \(ids: "
                                         r"voxels\) 1/2: \d+"):
        res = segment(img, prompts, model)
    both = res.masks[1] & res.masks[2]
    assert res.overlaps[(1, 2)] == int(both.sum()) > 0
    lab = res.labels.array
    p1, p2 = res.probabilities[1], res.probabilities[2]
    assert np.all(lab[both & (p2 > p1)] == 2) and np.all(lab[both & (p1 >= p2)] == 1)
    # each lesion's own mask is kept whole
    assert res.masks[1].sum() > (lab == 1).sum() or res.masks[2].sum() > (lab == 2).sum()


def test_world_prompt_and_progress_and_cancel(tiny_model_root):
    model = load_model(tiny_model_root, "point", device="cpu")
    img, _ = _phantom((1.5, 1.5, 2.5), zero_border=False)
    world = Point(3, tuple(img.index_to_world([15, 40, 30])))
    seen = []
    res = segment(img, [world], model, progress=lambda f, m: seen.append(f))
    assert seen[0] == 0.0 and seen[-1] == 1.0 and res.masks[3].any()
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        segment(img, [world], model, cancel=token)


def test_bad_prompt_lists(tiny_model_root):
    model = load_model(tiny_model_root, "point", device="cpu")
    img, _ = _phantom((1.5, 1.5, 2.5), zero_border=False)
    with pytest.raises(PromptError, match="no prompts given"):
        segment(img, [], model)
    with pytest.raises(PromptError, match=r"prompt IDs must be unique, got \[1, 1\]"):
        segment(img, [VoxelPrompt(1, "point", [1, 1, 1]), VoxelPrompt(1, "point", [2, 2, 2])], model)


def test_non_ct_intensities_warn(tiny_model_root):
    model = load_model(tiny_model_root, "point", device="cpu")
    img, _ = _phantom((1.5, 1.5, 2.5), zero_border=False)
    mri_like = img.with_array(np.random.default_rng(0).uniform(0, 1, img.shape).astype(np.float32))
    with pytest.warns(UserWarning, match="does not look like CT in Hounsfield units"):
        segment(mri_like, [VoxelPrompt(1, "point", [15, 40, 30])], model)


def test_empty_prediction_is_reported_not_silent(tiny_model_root):
    model = load_model(tiny_model_root, "point", device="cpu")
    img, _ = _phantom((1.5, 1.5, 2.5), zero_border=False)
    # make the lesion logit hugely negative by biasing the output layer
    seg_layer = [m for m in model.network.modules() if isinstance(m, __import__("torch").nn.Conv3d)][-1]
    keep = seg_layer.bias.data.clone()
    seg_layer.bias.data[1] = -1e4
    model.fold_weights = [model.network.state_dict()]
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            res = segment(img, [VoxelPrompt(1, "point", [15, 40, 30])], model)
        assert res.empty == [1] and not res.masks[1].any()
        assert any("the network found no lesion at prompt(s) [1]" in str(x.message) for x in w)
    finally:
        seg_layer.bias.data[:] = keep
