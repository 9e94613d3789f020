"""Our segmentation equals upstream LesionLocator's, on fixtures recorded from upstream.

The fixtures in ``Testing/fixtures/upstream/`` were written by
``Testing/make_upstream_fixtures.py``, which ran the upstream code
(MIC-DKFZ/LesionLocator, commit in ``metadata.json``; installed in its own virtual
environment, never part of this repository) on small CT phantoms with point and
box prompts and the tiny random checkpoint of ``build_test_models``. This test
needs no upstream installation: it rebuilds the identical checkpoint (its state
dict SHA-256 is asserted), runs our :func:`LesionLocatorLib.predict.segment`, and
asserts, per case, model and lesion:

* identical masks: ``result.masks[id]`` equals upstream's exported
  ``<case>_lesion_<id>.nii.gz``;
* max |logit difference| < 1e-3 (fp32, CPU) in upstream's preprocessed grid and
  on the original grid, on the region we predict, which must be exactly the region
  upstream predicts (where its logits are not NaN);
* the same preprocessed geometry (nonzero crop, resampled shape) and the same
  encoded prompt (ball centre / grown box in the preprocessed grid).

Reference run: upstream accumulates the sliding-window logits and Gaussian weights
in fp16 on every device; the reference is the same upstream code with that
accumulation in fp32 (``fp32``, patched at run time by the fixture script). The
as-released fp16 run (``release``) is stored too; its masks may differ from ours
by a few voxels, exactly where upstream's own fp16 and fp32 runs differ
(:func:`test_release_fp16_run_differs_only_by_its_fp16_accumulation`).

Known upstream bug, fixed behaviour matched: upstream's ``get_centroids_from_json``
subtracts the nonzero-crop offset twice for point prompts. With CT the crop
normally starts at 0 and nothing shows; the ``padded`` case (exact zeros padded
on the low z and x sides, crop starting at (6, 0, 10)) exposes it. There we
compare against upstream run with the fixed mapping
``round(clip(p - crop_lo, 0, cropped_shape) * model_shape / cropped_shape)``
(variant ``fp32_fixedpoint``), and check that the as-released output differs.

Test-only hook: ``segment`` does not return logits, so :func:`_run_ours` wraps
``ModelGrid.logits_to_original`` (called once per prompt, in prompt order) to record
the model-grid logits it receives and the original-grid logits it returns; the
wrapper calls the original method and changes nothing.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from build_test_models import DATASET_JSON, TINY, build_tiny_checkpoint, checkpoint_dict, make_plans  # noqa: E402
from make_upstream_fixtures import state_dict_sha256  # noqa: E402

from LesionLocatorLib import modelgrid  # noqa: E402
from LesionLocatorLib.image import Image, read_image  # noqa: E402
from LesionLocatorLib.model import load_checkpoint, load_model  # noqa: E402
from LesionLocatorLib.predict import _encode, _tiles, segment  # noqa: E402
from LesionLocatorLib.encoding import box_to_model_grid, point_to_model_grid  # noqa: E402
from LesionLocatorLib.prompts import MaskPrompt, read_prompt_file, to_voxel_prompt  # noqa: E402

FIX = HERE / "fixtures" / "upstream"
META = json.loads((FIX / "metadata.json").read_text())
PAIRS = [(case, kind) for case, info in META["cases"].items() for kind in info["kinds"]]
LOGIT_TOL = 1e-3
SUBFOLDER = {"point": "point_optimized", "box": "bbox_optimized"}


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def model_roots(tmp_path_factory):
    """The tiny checkpoints, rebuilt; their weights must be bit-identical to the fixtures'."""
    roots = {}
    for resampling, sums in META["checkpoint"]["state_dict_sha256"].items():
        root = build_tiny_checkpoint(tmp_path_factory.mktemp(resampling), seed=0, resampling=resampling)
        for kind, expected in sums.items():
            ck = load_checkpoint(root / "LesionLocatorSeg" / SUBFOLDER[kind] / "fold_0" / "checkpoint_final.pth")
            assert state_dict_sha256(ck["network_weights"]) == expected, (
                f"the rebuilt tiny {kind} checkpoint ({resampling}) differs from the one the upstream fixtures were "
                f"made with: regenerate them with Testing/make_upstream_fixtures.py")
        roots[resampling] = root
    return roots


def _case_image(case: str) -> Image:
    info = META["images"][case]
    img = read_image(FIX / info["file"])
    if info["pad"]:
        img = Image(np.pad(img.array, info["pad"], constant_values=0), img.spacing, img.origin, img.direction)
    assert hashlib.sha256(np.ascontiguousarray(img.array)).hexdigest() == info["sha256"], \
        f"{case}: the input image differs from the one upstream segmented"
    return img


_RUNS = {}


def _run_ours(case: str, kind: str, model_roots, backend: str = "torch"):
    """Our segment() on a fixture case, with the logits recorded (cached per module); ``backend``: 'torch' or
    'openvino' (converted networks cached in a folder of this module's run)."""
    key = (case, kind, backend)
    if key in _RUNS:
        return _RUNS[key]
    root = model_roots[META["cases"][case]["resampling"]]
    if backend != "torch" and "cache" not in _RUNS:
        _RUNS["cache"] = tempfile.mkdtemp(prefix="ll-openvino-cache-")
    model = load_model(root, kind, folds=[0], device="cpu", tta=False, backend=backend, cache_dir=_RUNS.get("cache"))
    image = _case_image(case)
    prompts = read_prompt_file(FIX / f"{case}_{kind}.json")
    calls = []
    original = modelgrid.ModelGrid.logits_to_original

    def spy(self, logits, lo):
        slices, out = original(self, logits, lo)
        calls.append({"grid": self, "logits": logits.clone(), "lo": tuple(lo), "slices": slices,
                      "orig": None if out is None else out.clone()})
        return slices, out

    modelgrid.ModelGrid.logits_to_original = spy
    try:
        with torch.no_grad():
            result = segment(image, prompts, model, check_intensities=False)
    finally:
        modelgrid.ModelGrid.logits_to_original = original
    assert len(calls) == len(prompts)
    _RUNS[key] = (image, prompts, result, {p.id: c for p, c in zip(prompts, calls)})
    return _RUNS[key]


def _fixture(case: str):
    return np.load(FIX / f"{case}.npz")


def _lattice(lo, step, shape):
    return tuple(slice(int(l_), int(l_) + int(step) * n, int(step)) for l_, n in zip(lo, shape))


def _compare_logits(case, kind, model_roots, backend: str = "torch"):
    """Per lesion: (model-grid max |diff|, original-grid max |diff|)."""
    _, prompts, _, calls = _run_ours(case, kind, model_roots, backend)
    fx = _fixture(case)
    variant = META["compared_variant"][case][kind]
    out = {}
    for p in prompts:
        pre = f"{kind}/{variant}/{p.id}/"
        c = calls[p.id]
        grid = c["grid"]
        # --- preprocessed (model) grid: our block in unpadded coordinates
        ours = c["logits"].numpy()
        our_lo = np.array(c["lo"]) - np.array(grid.pad_lo)
        our_hi = np.minimum(our_lo + np.array(ours.shape[1:]), grid.model_shape)
        our_lo_c = np.maximum(our_lo, 0)
        up_lo, up_hi = fx[pre + "model_lo"], fx[pre + "model_hi"]
        assert np.array_equal(our_lo_c, up_lo) and np.array_equal(our_hi, up_hi), (
            f"{case}/{kind}/lesion {p.id}: we predict the preprocessed-grid box [{our_lo_c.tolist()}, "
            f"{our_hi.tolist()}), upstream [{up_lo.tolist()}, {up_hi.tolist()})")
        up = fx[pre + "model_logits"]
        sl = _lattice(up_lo - our_lo, fx[pre + "model_step"], up.shape[1:])
        d_model = float(np.max(np.abs(ours[(slice(None),) + sl] - up)))
        # --- original grid
        assert c["slices"] is not None, f"{case}/{kind}/lesion {p.id}: no original voxel covered"
        o_lo = np.array([s.start for s in c["slices"]])
        o_hi = np.array([s.stop for s in c["slices"]])
        assert np.array_equal(o_lo, fx[pre + "orig_lo"]) and np.array_equal(o_hi, fx[pre + "orig_hi"]), (
            f"{case}/{kind}/lesion {p.id}: covered original box [{o_lo.tolist()}, {o_hi.tolist()}), upstream "
            f"[{fx[pre + 'orig_lo'].tolist()}, {fx[pre + 'orig_hi'].tolist()})")
        up_o = fx[pre + "orig_logits"]
        sl = _lattice(np.zeros(3, int), fx[pre + "orig_step"], up_o.shape[1:])
        d_orig = float(np.max(np.abs(c["orig"].numpy()[(slice(None),) + sl] - up_o)))
        out[p.id] = (d_model, d_orig)
    return out


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("case,kind", PAIRS)
def test_geometry_and_encoded_prompts(case, kind, model_roots):
    """Same nonzero crop, resampled shape and prompt encoding as upstream."""
    _, prompts, _, calls = _run_ours(case, kind, model_roots)
    up = META["cases"][case]["upstream"]
    fx = _fixture(case)
    variant = META["compared_variant"][case][kind]
    for p in prompts:
        g = calls[p.id]["grid"]
        assert [[a, a + n] for a, n in zip(g.crop_lo, g.cropped_shape)] == up["crop_box"]
        assert list(g.model_shape) == up["model_shape"]
        if kind == "point":
            ours = point_to_model_grid(p.coords, g.crop_lo, g.cropped_shape, g.model_shape)
        else:
            ours = box_to_model_grid(p.coords, g.crop_lo, g.cropped_shape, g.model_shape)
        up_enc = fx[f"{kind}/{variant}/{p.id}/encoded_prompt"]
        assert np.array_equal(ours, up_enc), \
            f"{case}/{kind}/lesion {p.id}: encoded prompt {ours.tolist()}, upstream {up_enc.tolist()}"


BACKENDS = ["torch", pytest.param("openvino", marks=pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="the optional 'openvino' package is not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,kind", PAIRS)
def test_masks_identical(case, kind, model_roots, backend):
    """masks[id] equals upstream's exported <case>_lesion_<id>.nii.gz (fp32-accumulation run), with PyTorch and
    with the OpenVINO CPU backend."""
    _, prompts, result, _ = _run_ours(case, kind, model_roots, backend)
    fx = _fixture(case)
    variant = META["compared_variant"][case][kind]
    for p in prompts:
        up = fx[f"{kind}/{variant}/{p.id}/mask"].astype(bool)
        ours = result.masks[p.id]
        assert up.any(), f"{case}/{kind}/lesion {p.id}: upstream's mask is empty (a useless fixture)"
        n_diff = int(np.sum(ours != up))
        assert n_diff == 0, (f"{case}/{kind}/lesion {p.id}: {n_diff} voxels differ from upstream "
                             f"({int(ours.sum())} vs {int(up.sum())} mask voxels)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,kind", PAIRS)
def test_logits_match(case, kind, model_roots, backend):
    """max |logit difference| < 1e-3 in the preprocessed grid and on the original grid (PyTorch and OpenVINO)."""
    diffs = _compare_logits(case, kind, model_roots, backend)
    bad = {lid: d for lid, d in diffs.items() if max(d) >= LOGIT_TOL}
    assert not bad, f"{case}/{kind}: max |logit diff| (model grid, original grid) per lesion = {diffs}"


@pytest.mark.parametrize("case,kind", PAIRS)
def test_probabilities_match_upstream_softmax(case, kind, model_roots):
    """result.probabilities is 1 - softmax[0] of upstream's original-grid logits, 0 where not predicted."""
    _, prompts, result, calls = _run_ours(case, kind, model_roots)
    fx = _fixture(case)
    variant = META["compared_variant"][case][kind]
    for p in prompts:
        pre = f"{kind}/{variant}/{p.id}/"
        up_o = torch.from_numpy(fx[pre + "orig_logits"])
        up_p = 1.0 - torch.softmax(up_o, 0)[0].numpy()
        lo, step = fx[pre + "orig_lo"], fx[pre + "orig_step"]
        ours = result.probabilities[p.id][_lattice(lo, step, up_p.shape)]
        d = float(np.max(np.abs(ours - up_p)))
        assert d < 1e-4, f"{case}/{kind}/lesion {p.id}: max |probability diff| = {d:.3g}"
        outside = np.ones(result.probabilities[p.id].shape, bool)
        outside[tuple(slice(a, b) for a, b in zip(lo, fx[pre + "orig_hi"]))] = False
        assert not result.probabilities[p.id][outside].any(), \
            f"{case}/{kind}/lesion {p.id}: nonzero probabilities outside the region upstream predicts"


RELEASE_BUGGY = (("padded", "point"), ("edgebox", "box"))  # see the test_*_bug tests


@pytest.mark.parametrize("case,kind", [p for p in PAIRS if tuple(p) not in RELEASE_BUGGY])
def test_release_fp16_run_differs_only_by_its_fp16_accumulation(case, kind, model_roots):
    """Against the as-released upstream (fp16 accumulation), our masks differ exactly where upstream's own
    fp16 and fp32 runs differ (a few voxels near the patch border, where the fp16 Gaussian weights are tiny),
    and there only."""
    _, prompts, result, _ = _run_ours(case, kind, model_roots)
    fx = _fixture(case)
    for p in prompts:
        release = fx[f"{kind}/release/{p.id}/mask"].astype(bool)
        fp32 = fx[f"{kind}/fp32/{p.id}/mask"].astype(bool)
        ours = result.masks[p.id] != release
        theirs = fp32 != release
        assert np.array_equal(ours, theirs), (
            f"{case}/{kind}/lesion {p.id}: {int(ours.sum())} voxels differ from the release run, "
            f"{int((ours & ~theirs).sum())} of them not explained by upstream's fp16 accumulation")
        assert ours.sum() <= 0.05 * max(release.sum(), 1), \
            f"{case}/{kind}/lesion {p.id}: {int(ours.sum())} of {int(release.sum())} voxels differ from the release run"


def test_edge_box_exposes_uint16_underflow_bug(model_roots):
    """Upstream (release) maps a box edge at preprocessed voxel 0 to max(0, uint16(0) - 1) = 65535 and skips
    the lesion; we keep such boxes (starting at 0), as upstream intends, and match it with the underflow fixed."""
    _, prompts, result, calls = _run_ours("edgebox", "box", model_roots)
    fx = _fixture("edgebox")
    skipped = META["cases"]["edgebox"]["upstream"]["skipped_by_upstream"]["box/release"]
    assert skipped == [p.id for p in prompts]
    for p in prompts:
        assert f"box/release/{p.id}/mask" not in fx.files
        g = calls[p.id]["grid"]
        enc = box_to_model_grid(p.coords, g.crop_lo, g.cropped_shape, g.model_shape)
        assert 0 in enc[0::2], f"edge box {p.id} should start at preprocessed voxel 0, got {enc.tolist()}"
        assert result.masks[p.id].any()


def test_padded_case_exposes_point_offset_bug(model_roots):
    """Upstream (release) subtracts the crop offset twice for points: its ball lands elsewhere and its
    masks differ; our mapping equals the fixed formula (checked in the other tests)."""
    _, prompts, result, calls = _run_ours("padded", "point", model_roots)
    fx = _fixture("padded")
    up = META["cases"]["padded"]["upstream"]
    crop_lo = np.array([b[0] for b in up["crop_box"]])
    factor = np.array(up["model_shape"]) / np.array(up["cropped_shape"])
    assert crop_lo.any(), "the padded case must have a crop that does not start at 0"
    for p in prompts:
        buggy = fx[f"point/release/{p.id}/encoded_prompt"]
        fixed = fx[f"point/fp32_fixedpoint/{p.id}/encoded_prompt"]
        # the released code maps p - 2 * crop_lo (values here stay inside the image)
        expected_buggy = np.round(np.clip(np.array(p.coords) - 2 * crop_lo, 0, None) * factor).astype(int)
        assert np.array_equal(buggy, expected_buggy)
        assert not np.array_equal(buggy, fixed)
        assert not np.array_equal(result.masks[p.id], fx[f"point/release/{p.id}/mask"].astype(bool))


def test_dna031_state_dict_loads_into_our_network(tmp_path):
    """A state dict written by dynamic-network-architectures 0.3.1 (upstream's pin) loads with strict=True
    into the network we build with 0.4.x from the same plans, with identical key sets."""
    info = META["dna031_state_dict"]
    state = torch.load(FIX / info["file"], map_location="cpu", weights_only=True)
    assert state_dict_sha256(state) == info["sha256"]
    plans = make_plans(TINY["features"], TINY["blocks"], TINY["patch"])
    folder = tmp_path / "LesionLocatorCheckpoint" / "LesionLocatorSeg" / "point_optimized"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    torch.save(checkpoint_dict(state, plans), folder / "fold_0" / "checkpoint_final.pth")
    model = load_model(tmp_path / "LesionLocatorCheckpoint", "point", folds=[0], device="cpu", tta=False)
    ours = model.network.state_dict()
    assert set(ours) == set(state), (sorted(set(ours) ^ set(state)))[:10]
    assert len(state) == info["keys"]
    for k, v in state.items():
        assert torch.equal(ours[k], v), k


# --------------------------------------------------------------------------- previous-mask (tracking) prompts
# trackmask.npz: upstream's tracker (LesionLocatorSegTracker.track_single_lesion -> TrackNet.forward) on a previous
# mask with the registration bypassed (identity warp, baseline = follow-up), recorded by make_upstream_fixtures.py
# (see the ``trackmask`` entry of metadata.json). We feed the same mask as a MaskPrompt (the already-warped mask on
# the follow-up's grid) to segment() with the same tiny LesionLocatorTrack model. Upstream's steps: the mask is
# preprocessed with the plans' resampling_fn_seg (nonzero crop, one-hot spline of the seg order, >= 0.5), TrackNet
# centres one patch on the rounded (half to even) float32 centre of mass of the model-grid mask, clamps it into the
# grid, pads a short patch symmetrically, and the U-Net output fills the patch ([1, 0] logits elsewhere).
#
# Known upstream bug, fixed behaviour matched: the list-of-masks branch (one file per lesion, the autoregressive
# path) feeds nnU-Net's -1 "outside the nonzero region" marker (written into a segmentation where the image is 0
# outside its filled nonzero mask, e.g. a 0 HU voxel on the first or last slice) to TrackNet as prompt voxels with
# value -1, which also count in its centre of mass. We compare against upstream with crop_to_nonzero given
# nonzero_label=0 (variant fp32_fixednonzero) and check that the as-released fp32 run differs exactly there
# (test_trackmask_exposes_nonzero_label_bug).
TRACK = META.get("trackmask")
TRACK_PAIRS = [(case, lid) for case, info in (TRACK or {}).get("cases", {}).items()
               for lid in range(1, len(info["masks"]) + 1)]
_TRACK_RUNS = {}


def _track_fixture():
    return np.load(FIX / TRACK["file"])


@pytest.fixture(scope="module")
def track_model(model_roots):
    root = model_roots[META["cases"]["aniso"]["resampling"]]
    ck = load_checkpoint(root / "LesionLocatorTrack" / "fold_0" / "checkpoint_final.pth")
    assert state_dict_sha256(ck["network_weights"]) == TRACK["checkpoint"]["state_dict_sha256"], (
        "the rebuilt tiny LesionLocatorTrack checkpoint differs from the one trackmask.npz was made with")
    return load_model(root, "prev_mask", folds=[0], device="cpu", tta=False)


def _run_ours_track(case: str, track_model):
    """segment() with one MaskPrompt per previous mask of ``case``; records the network inputs and the
    model-grid/original-grid logits (test-only spies that change nothing)."""
    if case in _TRACK_RUNS:
        return _TRACK_RUNS[case]
    fx = _track_fixture()
    image = _case_image(case)
    assert hashlib.sha256(np.ascontiguousarray(image.array)).hexdigest() == TRACK["cases"][case]["array_sha256"]
    prompts = [MaskPrompt(lid, image.with_array(fx[f"{case}/{lid}/previous_mask"].astype(bool)))
               for lid in range(1, len(TRACK["cases"][case]["masks"]) + 1)]
    inputs, calls = [], []
    original_l2o = modelgrid.ModelGrid.logits_to_original
    original_forward = track_model.forward

    def spy_l2o(self, logits, lo):
        slices, out = original_l2o(self, logits, lo)
        calls.append({"grid": self, "logits": logits.clone(), "lo": tuple(lo), "slices": slices,
                      "orig": None if out is None else out.clone()})
        return slices, out

    def spy_forward(x, **kwargs):
        inputs.extend(x.clone())
        return original_forward(x, **kwargs)

    modelgrid.ModelGrid.logits_to_original = spy_l2o
    track_model.forward = spy_forward
    try:
        with torch.no_grad():
            result = segment(image, prompts, track_model, check_intensities=False)
    finally:
        modelgrid.ModelGrid.logits_to_original = original_l2o
        del track_model.forward
    assert len(inputs) == len(calls) == len(prompts)  # one patch per mask prompt
    _TRACK_RUNS[case] = (image, prompts, result, {p.id: (x, c) for p, x, c in zip(prompts, inputs, calls)})
    return _TRACK_RUNS[case]


def _upstream_patch_start(slicer, patch_size):
    """Unpadded model-grid index of the U-Net input's first voxel: upstream's slicer start minus
    TrackNet.pad_input's low padding ((patch - extent) // 2)."""
    s = np.asarray(slicer).reshape(3, 2)
    return s[:, 0] - (np.asarray(patch_size) - (s[:, 1] - s[:, 0])) // 2


needs_track = pytest.mark.skipif(TRACK is None, reason="no trackmask fixture in metadata.json")


@needs_track
@pytest.mark.parametrize("case,lid", TRACK_PAIRS)
def test_trackmask_model_grid_prompt(case, lid, track_model):
    """The previous mask on the model grid equals upstream's preprocessed (resampling_fn_seg) mask, the
    one TrackNet centres its patch on."""
    image, prompts, _, calls = _run_ours_track(case, track_model)
    fx = _track_fixture()
    pre = f"{case}/{TRACK['compared_variant']}/{lid}/"
    assert bool(fx[pre + "prompt_roundtrip_identity"]), "upstream's 175^3 round trip changed the mask"
    g = calls[lid][1]["grid"]
    up_info = TRACK["cases"][case]
    assert list(g.model_shape) == up_info["model_shape"]
    assert [[a, a + n] for a, n in zip(g.crop_lo, g.cropped_shape)] == up_info["crop_box"]
    mask = prompts[lid - 1].mask.array.astype(bool)
    ours = g.extract_mask(mask, g.pad_lo, tuple(p + m for p, m in zip(g.pad_lo, g.model_shape)))
    lo = fx[pre + "prompt_model_grid_lo"]
    up = fx[pre + "prompt_model_grid"]
    assert int(ours.sum()) == int(fx[pre + "prompt_model_grid_sum"]), \
        f"{case}/{lid}: {int(ours.sum())} model-grid mask voxels, upstream {int(fx[pre + 'prompt_model_grid_sum'])}"
    sub = ours[tuple(slice(a, a + n) for a, n in zip(lo, up.shape))]
    assert np.array_equal(sub, up.astype(np.float32)), f"{case}/{lid}: {int(np.sum(sub != up))} voxels differ"


@needs_track
@pytest.mark.parametrize("case,lid", TRACK_PAIRS)
def test_trackmask_patch_and_prompt_channel(case, lid, track_model):
    """Same patch placement (rounded centre of mass of the model-grid mask, clamped) and, exactly, the same
    prompt channel in the network input as upstream's TrackNet (after its pad_input)."""
    image, prompts, _, runs = _run_ours_track(case, track_model)
    fx = _track_fixture()
    pre = f"{case}/{TRACK['compared_variant']}/{lid}/"
    x, c = runs[lid]
    g = c["grid"]
    vp = to_voxel_prompt(prompts[lid - 1], image)
    (tile,) = _tiles(g, *_encode(vp, g)[1:], 0.5)
    ours_start = np.array(tile) - np.array(g.pad_lo)
    up_start = _upstream_patch_start(fx[pre + "slicer"], TRACK["cases"][case]["patch_size"])
    assert np.array_equal(ours_start, up_start), \
        f"{case}/{lid}: our patch starts at {ours_start.tolist()}, upstream's at {up_start.tolist()}"
    up = fx[pre + "unet_input_prompt"]
    ours = x[1].numpy()
    assert ours.shape == up.shape
    n = int(np.sum(ours != up))
    assert n == 0, f"{case}/{lid}: {n} prompt-channel voxels differ ({int(ours.sum())} vs {int(up.sum())} set)"


@needs_track
@pytest.mark.parametrize("case,lid", TRACK_PAIRS)
def test_trackmask_masks_and_logits(case, lid, track_model):
    """Identical exported masks; max |logit diff| < 1e-3 on the patch and on the original grid where we
    predict; upstream's logits outside our region (its [1, 0] fill mixed in) are background."""
    image, _, result, runs = _run_ours_track(case, track_model)
    fx = _track_fixture()
    pre = f"{case}/{TRACK['compared_variant']}/{lid}/"
    _, c = runs[lid]
    up_mask = fx[pre + "mask"].astype(bool)
    assert up_mask.any(), f"{case}/{lid}: upstream's mask is empty (a useless fixture)"
    n = int(np.sum(result.masks[lid] != up_mask))
    assert n == 0, f"{case}/{lid}: {n} voxels differ ({int(result.masks[lid].sum())} vs {int(up_mask.sum())})"
    # patch logits: upstream's U-Net output for its (padded) patch, on a lattice
    g = c["grid"]
    up_start = _upstream_patch_start(fx[pre + "slicer"], TRACK["cases"][case]["patch_size"])
    start = up_start - (np.array(c["lo"]) - np.array(g.pad_lo))  # inside the block we map back
    up = fx[pre + "patch_logits"]
    step = int(fx[pre + "patch_step"])
    d_patch = float(np.max(np.abs(c["logits"].numpy()[(slice(None),) + _lattice(start, step, up.shape[1:])] - up)))
    assert d_patch < LOGIT_TOL, f"{case}/{lid}: max |patch logit diff| = {d_patch:.3g}"
    # original grid: every voxel the patch reaches (upstream's box, its [1, 0] fill mixed in near the patch
    # border) is in the region we map back, with the same logits
    up_o, olo, ohi = fx[pre + "orig_logits"], fx[pre + "orig_lo"], fx[pre + "orig_hi"]
    ostep = int(fx[pre + "orig_step"])
    our_lo = np.array([sl.start for sl in c["slices"]])
    our_hi = np.array([sl.stop for sl in c["slices"]])
    assert np.all(our_lo <= olo) and np.all(our_hi >= ohi), \
        f"{case}/{lid}: we map back [{our_lo.tolist()}, {our_hi.tolist()}), upstream's patch reaches [{olo}, {ohi})"
    sl = _lattice(olo - our_lo, ostep, up_o.shape[1:])
    d_orig = float(np.max(np.abs(c["orig"].numpy()[(slice(None),) + sl] - up_o)))
    assert d_orig < LOGIT_TOL, f"{case}/{lid}: max |original-grid logit diff| = {d_orig:.3g}"


@needs_track
def test_trackmask_exposes_nonzero_label_bug(track_model):
    """Upstream (fp32, unfixed) puts -1 prompt voxels where nnU-Net marks "outside the nonzero region"; apart from
    those, its model-grid prompt and its U-Net prompt channel equal ours (and its fixed run's)."""
    from scipy.ndimage import binary_fill_holes
    fx = _track_fixture()
    fixed, released = TRACK["compared_variant"], "fp32"
    n_minus = 0
    for case, lid in TRACK_PAIRS:
        _, _, _, runs = _run_ours_track(case, track_model)
        a, b = f"{case}/{fixed}/{lid}/", f"{case}/{released}/{lid}/"
        up_fixed = fx[a + "unet_input_prompt"]
        up_rel = fx[b + "unet_input_prompt"]
        assert not np.any(up_fixed < 0)
        ours = runs[lid][0][1].numpy()
        if np.array_equal(fx[a + "slicer"], fx[b + "slicer"]):
            keep = up_rel >= 0
            assert np.array_equal(ours[keep], up_rel[keep])
            assert np.array_equal(up_rel[~keep], np.full(int((~keep).sum()), -1))
        n_minus += int(np.sum(fx[b + "prompt_model_grid"] < 0))
        fx_lo, rel_lo = fx[a + "prompt_model_grid_lo"], fx[b + "prompt_model_grid_lo"]
        assert np.all(rel_lo <= fx_lo)
        sub = fx[b + "prompt_model_grid"][tuple(slice(f - r, f - r + n) for f, r, n in
                                                 zip(fx_lo, rel_lo, fx[a + "prompt_model_grid"].shape))]
        assert np.array_equal(sub == 1, fx[a + "prompt_model_grid"] == 1)
    assert n_minus > 0, "no -1 prompt voxels in the released run: the fixture no longer exposes the bug"
    image = _case_image("sepz").array
    assert np.any(~binary_fill_holes(image != 0)), "sepz has no 0 voxel outside its filled nonzero region"
