"""Training: a few iterations of the tiny network, the official layout, resume, bad data, full disk."""
import errno
import json

import numpy as np
import pytest
import torch

import LesionLocatorLib.training.train as train_module
from LesionLocatorLib.image import write_image
from LesionLocatorLib.model import load_checkpoint, load_model
from LesionLocatorLib.predict import segment
from LesionLocatorLib.prompts import MaskPrompt, Point
from LesionLocatorLib.training.train import (TrainingDataError, TrainOptions, find_pairs, make_plans, save_atomically,
                                             train)
from phantoms import ct_phantom

PLANS = make_plans((4, 8, 16), (1, 1, 1), (32, 48, 48), spacing=(2.5, 1.5, 1.5))
NORMALIZE = train_module.ct_normalizer(PLANS["foreground_intensity_properties_per_channel"]["0"])


@pytest.fixture()
def data(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for i, seed in enumerate((1, 2)):
        img, lab = ct_phantom(shape_zyx=(24, 64, 64), seed=seed,
                              lesions=[((12, 30, 25), 7.0, 110), ((10, 40, 45), 5.0, -30)])
        write_image(img, tmp_path / "images" / f"c{i}.nii.gz")
        write_image(lab, tmp_path / "labels" / f"c{i}.nii.gz")
    return tmp_path


def test_few_iterations_write_a_loadable_model_in_the_official_layout(data):
    pairs = find_pairs(data / "images", data / "labels")
    root = train(pairs, data / "run", PLANS,
                 TrainOptions(epochs=2, iterations_per_epoch=2, batch_size=2, val_samples=3), device="cpu",
                 log=lambda m: None)
    assert (data / "run" / "progress.png").read_bytes()[:4] == b"\x89PNG"
    for kind in ("point", "box", "prev_mask"):
        model = load_model(root, kind, device="cpu")
        assert model.patch_size == (32, 48, 48)
    ckpt = load_checkpoint(root / "LesionLocatorSeg" / "point_optimized" / "fold_0" / "checkpoint_final.pth")
    assert set(ckpt) >= {"network_weights", "optimizer_state", "logging", "init_args", "trainer_name",
                         "inference_allowed_mirroring_axes", "current_epoch"}
    assert ckpt["init_args"]["configuration"] == "3d_fullres" and ckpt["current_epoch"] == 2
    assert len(ckpt["logging"]["val_dice"]) == 2
    img, lab = ct_phantom(shape_zyx=(24, 64, 64), lesions=[((12, 30, 25), 7.0, 110)])
    seg = segment(img, [Point(1, tuple(img.index_to_world([12, 30, 25])))], load_model(root, "point", device="cpu"))
    assert seg.labels.same_geometry(img)
    trk = segment(img, [MaskPrompt(1, lab)], load_model(root, "prev_mask", device="cpu"))
    assert trk.masks[1].shape == img.shape


def test_resume_continues_from_the_last_epoch(data):
    pairs = find_pairs(data / "images", data / "labels")
    logs = []
    train(pairs, data / "run", PLANS, TrainOptions(epochs=1, iterations_per_epoch=1, val_samples=2), device="cpu",
          log=logs.append)
    logs.clear()
    train(pairs, data / "run", PLANS, TrainOptions(epochs=2, iterations_per_epoch=1, val_samples=2), device="cpu",
          log=logs.append)
    assert any("resuming from" in m and "at epoch 1" in m for m in logs)
    assert sum(m.startswith("epoch ") for m in logs) == 1, "only the missing epoch runs"


def test_stop_after_epoch_then_resume_with_other_data(data, tmp_path):
    """Training in phases: the first run ends after epoch 1 of 3 without a final model; the second,
    on other data, resumes at epoch 2 on the same learning-rate schedule and writes the model."""
    pairs = find_pairs(data / "images", data / "labels")
    logs = []
    assert train(pairs, data / "run", PLANS, TrainOptions(epochs=3, iterations_per_epoch=1, val_samples=2),
                 device="cpu", log=logs.append, stop_after_epoch=1) is None
    assert sum(m.startswith("epoch ") for m in logs) == 1 and "stopped after epoch 1 of 3" in logs[-1]
    assert not (data / "run" / "LesionLocatorCheckpoint").exists()
    first = load_checkpoint(data / "run" / "checkpoint_latest.pth")
    assert first["current_epoch"] == 1
    logs.clear()
    root = train(pairs[:1], data / "run", PLANS, TrainOptions(epochs=3, iterations_per_epoch=1, val_samples=2),
                 device="cpu", log=logs.append)
    assert any("at epoch 1" in m for m in logs) and sum(m.startswith("epoch ") for m in logs) == 2
    lrs = load_checkpoint(root / "LesionLocatorSeg" / "point_optimized" / "fold_0" / "checkpoint_final.pth")[
        "logging"]["lrs"]
    assert np.allclose(lrs, [1e-2 * (1 - e / 3) ** 0.9 for e in range(3)])  # one poly schedule over 3 epochs


def test_mismatched_training_folders(data):
    (data / "labels" / "c1.nii.gz").rename(data / "labels" / "other.nii.gz")
    with pytest.raises(TrainingDataError, match=r"images and labels do not match by name: images without label "
                                                r"\['c1'\], labels without image \['other'\]"):
        find_pairs(data / "images", data / "labels")
    img, _ = ct_phantom(shape_zyx=(24, 64, 64))
    _, small = ct_phantom(shape_zyx=(24, 60, 64))
    write_image(img, data / "images" / "g.nii.gz")
    write_image(small, data / "labels" / "g.nii.gz")
    with pytest.raises(TrainingDataError, match="does not have the geometry of"):
        train_module.load_case(data / "images" / "g.nii.gz", data / "labels" / "g.nii.gz",
                               PLANS["configurations"]["3d_fullres"], NORMALIZE)


def test_full_disk_leaves_no_truncated_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "fold_0" / "checkpoint_final.pth"
    save_atomically({"network_weights": {"w": torch.ones(3)}}, target)
    before = target.read_bytes()

    def full_disk(obj, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"disk full: cannot write .*checkpoint_final.pth \(no space left on device; "
                                      r".*\); the previous file is unchanged") as raised:
        save_atomically({"network_weights": {}}, target)
    assert raised.value.errno == errno.ENOSPC and str(raised.value).count("checkpoint_final.pth") == 1
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["checkpoint_final.pth"]


def test_training_samples_are_slices_of_the_case_resampled_once(tmp_path):
    """load_case resamples image and lesions to the model grid once; the blocks cut from them equal
    what ModelGrid.extract / extract_mask give for that block (the inference path), here on a thick-
    slice scan whose z axis nnU-Net resamples separately, with padding in y and x."""
    config = make_plans((4, 8, 16), (1, 1, 1), (32, 48, 48), spacing=(2.0, 1.0, 1.0))["configurations"]["3d_fullres"]
    img, lab = ct_phantom(shape_zyx=(24, 64, 64), spacing_xyz=(0.7, 0.7, 3.0), seed=3,
                          lesions=[((12, 30, 25), 6.0, 110), ((10, 40, 45), 4.0, -30)])
    write_image(img, tmp_path / "img.nii.gz")
    write_image(lab, tmp_path / "lab.nii.gz")
    case = train_module.load_case(tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", config, NORMALIZE)
    grid, patch = case.grid, np.array([32, 48, 48])
    assert grid.data_methods[0] != grid.data_methods[1], "z is resampled on its own"
    assert grid.pad_lo[1] > 0 and case.model_image.shape == grid.padded_shape
    rng = np.random.default_rng(0)
    for _ in range(8):
        lo = rng.integers(0, np.asarray(grid.padded_shape) - patch + 1)
        block = tuple(slice(a, b) for a, b in zip(lo, lo + patch))
        np.testing.assert_allclose(case.model_image[block], grid.extract(img.array, lo, lo + patch, NORMALIZE),
                                   atol=1e-5)
        for pid in (1, 2):
            expected = grid.extract_mask(lab.array == pid, lo, lo + patch)
            assert np.array_equal(train_module._paste(*case.model_lesions[pid], lo, tuple(patch)), expected)
    whole = [grid.extract_mask(lab.array == pid, (0, 0, 0), grid.padded_shape).sum() for pid in (1, 2)]
    assert [case.model_lesions[pid][1].sum() for pid in (1, 2)] == whole and min(whole) > 0


def test_prompt_simulation_targets_the_chosen_lesion_only(data):
    case = train_module.load_case(data / "images" / "c0.nii.gz", data / "labels" / "c0.nii.gz",
                                  PLANS["configurations"]["3d_fullres"], NORMALIZE)
    rng = np.random.default_rng(0)
    for kind in ("point", "box", "mask"):
        x, y = train_module.simulate_sample(case, rng, (32, 48, 48), kind)
        assert x.shape == (2, 32, 48, 48) and y.shape == (1, 32, 48, 48)
        assert x[1].any() and y.any(), f"{kind} prompt and target drawn"
        if kind == "point":  # the click is a voxel of the lesion: the ball overlaps it
            assert (x[1] * y[0]).sum() > 0
        elif kind == "box":  # the (grown) box holds the whole target
            assert (y[0] * (1 - x[1])).sum() == 0
        else:  # a perturbed copy of the lesion (shifted by <= 2 voxels, dilated or eroded by one)
            assert 2 * (x[1] * y[0]).sum() / (x[1].sum() + y[0].sum()) > 0.3


def test_box_prompts_grow_by_at_most_the_jitter_in_millimetres(data):
    config = PLANS["configurations"]["3d_fullres"]
    case = train_module.load_case(data / "images" / "c0.nii.gz", data / "labels" / "c0.nii.gz", config, NORMALIZE)
    spacing = np.asarray(config["spacing"])
    tight_rng, loose_rng = np.random.default_rng(1), np.random.default_rng(1)   # the same draws
    growth = []
    for _ in range(30):
        tight, y = train_module.simulate_sample(case, tight_rng, (32, 48, 48), "box", box_jitter_mm=0.0)
        loose, y2 = train_module.simulate_sample(case, loose_rng, (32, 48, 48), "box", box_jitter_mm=8.0)
        assert np.array_equal(y, y2), "the same lesion and patch"
        tight_box, loose_box, target = (np.argwhere(v > 0) for v in (tight[1], loose[1], y[0]))
        for box in (tight_box, loose_box):
            assert (box.min(0) <= target.min(0)).all() and (box.max(0) >= target.max(0)).all()
        # without jitter: the lesion's box on the model grid (box_to_model_grid's rounding + 1 voxel per side)
        assert ((tight_box.max(0) - tight_box.min(0)) - (target.max(0) - target.min(0)) <= 4).all()
        growth.append((loose_box.max(0) - loose_box.min(0)) - (tight_box.max(0) - tight_box.min(0)))
    growth = np.asarray(growth) * spacing      # mm the jitter added per axis
    assert growth.min() >= 0 and growth.max() <= 8.0 + spacing.max() + 1e-6, growth.max(0)
    assert growth.mean() > 2.0, "boxes are jittered, not all tight"


def test_tight_box_share_gives_exact_bounding_boxes_and_leaves_other_runs_samples_alone(data):
    config = PLANS["configurations"]["3d_fullres"]
    case = train_module.load_case(data / "images" / "c0.nii.gz", data / "labels" / "c0.nii.gz", config, NORMALIZE)

    def box_sample(seed, **options):
        """(input, target) of one box sample; the same seed = the same lesion and patch."""
        return train_module.simulate_sample(case, np.random.default_rng(seed), (32, 48, 48), "box", **options)

    def extent(x):  # the box's extent in model voxels per axis (mirroring does not change it)
        return np.ptp(np.argwhere(x[1] > 0), 0)

    kinds = []
    for seed in range(16):
        exact = extent(box_sample(seed, box_jitter_mm=0.0)[0])
        assert np.array_equal(extent(box_sample(seed, box_jitter_mm=8.0, tight_box_prob=1.0)[0]), exact)
        # off (the default): the samples of a run without the option are unchanged
        default, off = box_sample(seed, box_jitter_mm=8.0), box_sample(seed, box_jitter_mm=8.0, tight_box_prob=0.0)
        assert all(np.array_equal(a, b) for a, b in zip(default, off))
        half = extent(box_sample(seed, box_jitter_mm=8.0, tight_box_prob=0.5)[0])
        assert (half >= exact).all()
        kinds.append(np.array_equal(half, exact))
    assert 3 <= sum(kinds) <= 13, kinds   # about half of them tight, the others grown

def test_vanished_lesion_samples_put_the_previous_mask_on_lesion_free_body_with_an_empty_target(data):
    case = train_module.load_case(data / "images" / "c0.nii.gz", data / "labels" / "c0.nii.gz",
                                  PLANS["configurations"]["3d_fullres"], NORMALIZE)
    rng = np.random.default_rng(0)
    lesion = case.labels == 1
    for _ in range(5):
        moved = train_module.vanished_mask(case, lesion, rng)
        assert moved is not None and moved.sum() == lesion.sum(), "the same shape, moved"
        assert not (moved & (case.labels > 0)).any(), "on tissue without any lesion"
        assert np.asarray(case.image.array)[moved].mean() > -900, "inside the body"
    x, y = train_module.simulate_sample(case, rng, (32, 48, 48), "mask", vanish_prob=1.0)
    assert x[1].sum() > 50 and not y.any()
    # points and boxes are never made empty, and a mask sample without vanish_prob has its lesion
    for kind in ("point", "box", "mask"):
        prob = 0.0 if kind == "mask" else 1.0
        assert train_module.simulate_sample(case, rng, (32, 48, 48), kind, vanish_prob=prob)[1].any()


def test_vanished_masks_can_be_kept_on_tissue_like_the_lesions_surroundings(data):
    """Both phantom lesions sit in a lung (-850 HU): with ``tissue_hu`` the vanished lesion's mask
    stays on lung; without it, it also lands on the 40 HU soft tissue."""
    case = train_module.load_case(data / "images" / "c0.nii.gz", data / "labels" / "c0.nii.gz",
                                  PLANS["configurations"]["3d_fullres"], NORMALIZE)
    image = np.asarray(case.image.array)
    lesion = case.labels == 2
    rng = np.random.default_rng(1)
    anywhere = [np.median(image[train_module.vanished_mask(case, lesion, rng)]) for _ in range(12)]
    like = [np.median(image[train_module.vanished_mask(case, lesion, rng, tissue_hu=100.0)]) for _ in range(12)]
    assert max(anywhere) > -100, "without the tissue rule some masks land on soft tissue"
    assert max(like) < -750 and min(like) > -950, like


def test_a_fragment_is_a_small_piece_of_the_mask_and_still_a_vanished_sample(data):
    case = train_module.load_case(data / "images" / "c0.nii.gz", data / "labels" / "c0.nii.gz",
                                  PLANS["configurations"]["3d_fullres"], NORMALIZE)
    lesion = case.labels == 1
    rng = np.random.default_rng(0)
    sizes = set()
    for _ in range(10):
        piece = train_module.fragment(lesion, rng)
        idx = np.argwhere(piece)
        assert piece.any() and not (piece & ~lesion).any()
        assert (np.ptp(idx, 0) <= 4).all() and piece.sum() <= 33, "within a ball of radius 2"
        sizes.add(int(piece.sum()))
    assert min(sizes) <= 7 < max(sizes), sizes          # radius 1 (<= 7 voxels) and radius 2
    x, y = train_module.simulate_sample(case, rng, (32, 48, 48), "mask", vanish_prob=1.0, vanish_fragment_prob=1.0)
    assert 0 < (x[1] > 0).sum() < lesion.sum() and not y.any()


def test_vanished_mask_gives_none_when_no_lesion_free_place_exists(data):
    case = train_module.load_case(data / "images" / "c0.nii.gz", data / "labels" / "c0.nii.gz",
                                  PLANS["configurations"]["3d_fullres"], NORMALIZE)
    everything = np.ones_like(case.labels, dtype=bool)
    assert train_module.vanished_mask(case, everything, np.random.default_rng(0)) is None


def test_adamw_optimizer_is_used_and_resumed_and_another_or_unknown_one_is_refused(data):
    pairs = find_pairs(data / "images", data / "labels")
    train(pairs, data / "run", PLANS, TrainOptions(epochs=1, iterations_per_epoch=1, val_samples=1, initial_lr=1e-3,
                                                   optimizer="adamw"), device="cpu", log=lambda m: None)
    state = load_checkpoint(data / "run" / "checkpoint_latest.pth")["optimizer_state"]
    assert "exp_avg" in next(iter(state["state"].values())), "AdamW's moment estimates are saved"
    assert state["param_groups"][0]["weight_decay"] == 1e-2
    before = (data / "run" / "checkpoint_latest.pth").read_bytes()
    with pytest.raises(ValueError, match=r"written by the 'adamw' optimizer: resume with optimizer 'adamw'"):
        train(pairs, data / "run", PLANS,
              TrainOptions(epochs=2, iterations_per_epoch=1, val_samples=1, optimizer="sgd"), device="cpu",
              log=lambda m: None)
    assert (data / "run" / "checkpoint_latest.pth").read_bytes() == before, "the checkpoint is left as it was"
    train(pairs, data / "run", PLANS, TrainOptions(epochs=2, iterations_per_epoch=1, val_samples=1, initial_lr=1e-3,
                                                   optimizer="adamw"), device="cpu", log=lambda m: None)
    assert load_checkpoint(data / "run" / "checkpoint_latest.pth")["current_epoch"] == 2, "resumed with AdamW"
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        train(pairs, data / "other", PLANS, TrainOptions(epochs=1, iterations_per_epoch=1, optimizer="adam"),
              device="cpu", log=lambda m: None)
    assert not (data / "other").exists(), "refused before anything is written"


def test_cpu_bf16_training_steps_follow_the_float32_ones(data):
    pairs = find_pairs(data / "images", data / "labels")

    def weights(folder, **kw):
        root = train(pairs, data / folder, PLANS, TrainOptions(epochs=1, val_samples=1, **kw), device="cpu",
                     log=lambda m: None)
        return load_checkpoint(root / "LesionLocatorSeg" / "point_optimized" / "fold_0" /
                               "checkpoint_final.pth")["network_weights"]
    start = weights("start", iterations_per_epoch=0)        # the same seed: the same initial weights
    fp32 = weights("fp32", iterations_per_epoch=3)
    bf16 = weights("bf16", iterations_per_epoch=3, cpu_bf16=True)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in bf16.values() if v.is_floating_point())
    convs = [k for k, v in start.items() if v.ndim == 5]
    step32 = torch.cat([(fp32[k] - start[k]).ravel() for k in convs])
    step16 = torch.cat([(bf16[k] - start[k]).ravel() for k in convs])
    cosine = float(torch.nn.functional.cosine_similarity(step32, step16, dim=0))
    assert step16.abs().max() > 0 and cosine > 0.9, cosine


def test_box_jitter_and_other_options_of_the_train_command(data, capsys):
    from LesionLocatorLib.cli import build_parser, main
    base = ["train", "--images", str(data / "images"), "--labels", str(data / "labels"), "-o", str(data / "run")]
    assert build_parser().parse_args(base).box_jitter_mm == 8.0
    assert build_parser().parse_args(base + ["--box-jitter-mm", "legacy"]).box_jitter_mm is None
    assert build_parser().parse_args(base + ["--box-jitter-mm", "0"]).box_jitter_mm == 0.0
    assert build_parser().parse_args(base).tight_box_prob == 0.0
    assert build_parser().parse_args(base + ["--tight-box-prob", "0.5"]).tight_box_prob == 0.5
    with pytest.raises(SystemExit):
        main(base + ["--tight-box-prob", "1.5"])
    assert "must be between 0 and 1, got 1.5" in capsys.readouterr().err
    for option in ("--low-res-prob", "--vanish-prob", "--vanish-fragment-prob"):   # shares, as --tight-box-prob
        with pytest.raises(SystemExit):
            main(base + [option, "2"])
        assert f"argument {option}" in (err := capsys.readouterr().err) and "must be between 0 and 1, got 2" in err
    assert build_parser().parse_args(base).prompt_types == ["point", "box", "mask"]
    assert build_parser().parse_args(base + ["--prompt-types", "box"]).prompt_types == ["box"]
    assert build_parser().parse_args(base).outline_weight == 0.0
    assert build_parser().parse_args(base + ["--outline-weight", "2"]).outline_weight == 2.0
    with pytest.raises(SystemExit):
        main(base + ["--outline-weight", "-1"])
    assert "argument --outline-weight/--outline_weight: must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--prompt-types", "scribble"])
    assert "invalid choice: 'scribble'" in capsys.readouterr().err
    assert not build_parser().parse_args(base).intensity_augmentation
    assert build_parser().parse_args(base + ["--intensity-augmentation", "--cpu-bf16"]).cpu_bf16
    parsed = build_parser().parse_args(base + ["--vanish-tissue-hu", "100", "--vanish-fragment-prob", "0.3"])
    assert (parsed.vanish_tissue_hu, parsed.vanish_fragment_prob) == (100.0, 0.3)
    assert build_parser().parse_args(base).vanish_tissue_hu is None
    assert build_parser().parse_args(base).deep_supervision_targets == "max_pool"
    assert build_parser().parse_args(base + ["--deep-supervision-targets", "nearest"]).deep_supervision_targets \
        == "nearest"
    with pytest.raises(SystemExit):
        main(base + ["--box-jitter-mm", "-3"])
    assert "must be >= 0 or 'legacy', got -3" in capsys.readouterr().err
    assert not (data / "run").exists()
    # the legacy scheme grows each side by up to 10 model voxels
    case = train_module.load_case(data / "images" / "c0.nii.gz", data / "labels" / "c0.nii.gz",
                                  PLANS["configurations"]["3d_fullres"], NORMALIZE)
    rng = np.random.default_rng(3)
    extents = [np.ptp(np.argwhere(train_module.simulate_sample(case, rng, (32, 48, 48), "box",
                                                               box_jitter_mm=None)[0][1] > 0), 0)
               for _ in range(10)]
    assert np.max(extents, 0)[1] > 20, "legacy boxes are much looser than 8 mm of jitter"


def test_deep_supervision_targets_match_the_network_outputs_and_nearest_ones_sit_on_their_centres(data):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = make_plans((4, 4, 4, 4), (1, 1, 1, 1), (32, 48, 48))   # four stages: three outputs
    cm = PlansManager(plans).get_configuration("3d_fullres")
    network = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                     cm.network_arch_init_kwargs_req_import, 2, 2, deep_supervision=True)
    strides = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["strides"][1:-1]
    y = torch.zeros(1, 1, 32, 48, 48)
    y[0, 0, 9:16, 20:27, 30:37] = 1   # a 7-voxel cube centred on voxel (12, 23, 33)
    with torch.no_grad():
        outputs = network(torch.zeros(1, 2, 32, 48, 48))
    for mode in ("max_pool", "nearest"):
        targets = train_module.downsample_targets(y, strides, mode)
        assert [tuple(t.shape[2:]) for t in targets] == [tuple(o.shape[2:]) for o in outputs]
    # coarse voxel i of a stride-2 level is centred on fine voxel 2 i: the nearest target is the label there
    near = train_module.downsample_targets(y, strides, "nearest")
    assert torch.equal(near[1], y[:, :, ::2, ::2, ::2]) and torch.equal(near[2], y[:, :, ::4, ::4, ::4])
    centre = np.argwhere(near[1][0, 0].numpy() > 0).mean(0) * 2
    assert np.allclose(centre, (12, 23, 33))
    # max pooling marks every coarse voxel whose block touches the cube: 512 and 768 fine voxels' worth of 343
    pooled = train_module.downsample_targets(y, strides, "max_pool")
    assert float(pooled[1].sum()) * 8 == 512 and float(pooled[2].sum()) * 64 == 768
    with pytest.raises(ValueError, match="unknown deep-supervision target mode 'mean'"):
        train_module.downsample_targets(y, strides, "mean")
    with pytest.raises(ValueError, match="unknown deep-supervision target mode 'mean'"):
        train(find_pairs(data / "images", data / "labels"), data / "run", PLANS,
              TrainOptions(deep_supervision_targets="mean"))
    assert not (data / "run").exists()


def test_outline_weight_adds_cross_entropy_on_each_lesions_outermost_layer_only(data):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    target = torch.zeros(1, 1, 7, 7, 7)
    target[0, 0, 2:5, 2:5, 2:5] = 1                                   # a 3-voxel cube
    target[0, 0, 0, 0, 0] = 1                                         # and a voxel in the patch's corner
    outline = train_module.outline_voxels(target)[0, 0]
    expected = target[0, 0].bool().clone()
    expected[3, 3, 3] = False                                         # the centre has no background neighbour
    assert torch.equal(outline, expected) and int(outline.sum()) == 26 + 1
    base = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    logits = torch.randn(1, 2, 7, 7, 7, generator=torch.Generator().manual_seed(0), requires_grad=True)
    extra = train_module.OutlineWeightedLoss(base, 3.0)(logits, target) - base(logits, target)
    ce = torch.nn.functional.cross_entropy(logits, target[:, 0].long(), reduction="none")[0]
    assert float(extra) == pytest.approx(3.0 * float(ce[outline].sum()) / 343, rel=1e-5)
    extra.backward()
    grad = logits.grad[0].abs().sum(0)
    assert grad[~outline].max() < 1e-6 < grad[outline].min(), "the extra term pulls on the outline voxels only"
    # in training: the same first step costs more with the weight; a negative weight is refused
    pairs = find_pairs(data / "images", data / "labels")

    def first_loss(folder, **kw):
        train(pairs, data / folder, PLANS, TrainOptions(epochs=1, iterations_per_epoch=1, val_samples=1, **kw),
              device="cpu", log=lambda m: None)
        return load_checkpoint(data / folder / "checkpoint_latest.pth")["logging"]["train_losses"][0]
    assert first_loss("weighted", outline_weight=3.0) > first_loss("plain") + 1e-3   # same samples and weights
    with pytest.raises(ValueError, match="outline_weight must be >= 0, got -1"):
        train(pairs, data / "negative", PLANS, TrainOptions(epochs=1, outline_weight=-1), device="cpu",
              log=lambda m: None)
    assert not (data / "negative").exists(), "refused before anything is written"


def test_intensity_augmentation_changes_about_two_thirds_of_the_blocks_reproducibly():
    block = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    first = [train_module.augment_intensity(block, np.random.default_rng(s)) for s in range(300)]
    again = [train_module.augment_intensity(block, np.random.default_rng(s)) for s in range(300)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again)), "deterministic for a seed"
    assert all(a.dtype == np.float32 and a.shape == block.shape and np.isfinite(a).all() for a in first)
    changed = np.mean([not np.allclose(a, block) for a in first])
    # nothing applied with probability 0.9 * 0.8 * 0.85 * 0.85 * 0.9 * 0.7 = 0.328
    assert 0.57 < changed < 0.77, changed


def test_the_build_plan_repeats_only_the_runs_the_installed_model_builds_on():
    import build_demo_model as build
    runs = [{"out": "a", "parent": None}, {"out": "b", "parent": None}, {"out": "c", "parent": "b"},
            {"out": "d", "parent": "c"}, {"out": "e", "parent": "c"}]
    assert [r["out"] for r in build.run_chain(runs, "d")] == ["b", "c", "d"]
    assert [r["out"] for r in build.run_chain(runs, "b")] == ["b"]
    # one folder per prompt type from two branches of the same chain: the shared runs come once,
    # each before the runs that start from it; "a" is history
    installed = {"LesionLocatorSeg/point_optimized": "d", "LesionLocatorSeg/bbox_optimized": "e",
                 "LesionLocatorTrack": "d"}
    assert [r["out"] for r in build.runs_of_installed_model(runs, installed)] == ["b", "c", "d", "e"]
    # the plan installs the three folders the loader expects, each from a run of the plan
    assert sorted(build.PLAN["installed"]) == ["LesionLocatorSeg/bbox_optimized", "LesionLocatorSeg/point_optimized",
                                               "LesionLocatorTrack"]
    assert set(build.PLAN["installed"].values()) <= {r["out"] for r in build.runs_of_installed_model()}
    # every dataset a run of the plan reads is made by the data step
    needed = build.datasets_of_installed_model()
    assert needed and set(needed) <= set(build.PLAN["datasets"])
    for run in build.PLAN["runs"]:
        for phase in run["phases"]:
            assert all(d in build.PLAN["datasets"] for d in build.PLAN["mixtures"].get(phase["data"], [phase["data"]]))


def test_the_install_step_puts_each_folder_of_its_run_into_the_model_and_keeps_the_card(tmp_path, monkeypatch):
    import build_demo_model as build
    monkeypatch.setattr(build, "REPO", tmp_path)
    work = tmp_path / "work"
    for run in ("p", "b"):   # two model roots whose checkpoints say which run wrote them
        for folder in ("LesionLocatorSeg/point_optimized", "LesionLocatorSeg/bbox_optimized", "LesionLocatorTrack"):
            save_atomically({"run": run},
                            work / run / "LesionLocatorCheckpoint" / folder / "fold_0" / "checkpoint_final.pth")
        (work / run / "progress.png").write_bytes(run.encode())
    monkeypatch.setitem(build.PLAN, "installed", {"LesionLocatorSeg/point_optimized": "p",
                                                  "LesionLocatorSeg/bbox_optimized": "b", "LesionLocatorTrack": "p"})
    target = tmp_path / "Resources" / "Models" / "LesionLocatorDemo"
    (target / "LesionLocatorSeg" / "stale").mkdir(parents=True)
    (target / "MODEL_CARD.md").write_text("card")
    build.step_install(work)
    got = {str(f.parent.parent.relative_to(target)): torch.load(f)["run"] for f in target.rglob("checkpoint_final.pth")}
    assert got == {"LesionLocatorSeg/point_optimized": "p", "LesionLocatorSeg/bbox_optimized": "b",
                   "LesionLocatorTrack": "p"}
    assert not (target / "LesionLocatorSeg" / "stale").exists()
    assert (target / "MODEL_CARD.md").read_text() == "card"
    assert (target / "training_curves_b.png").read_bytes() == b"b"


def test_the_build_keeps_the_run_unfinished_or_finished_for_the_next_machine(tmp_path, monkeypatch):
    import build_demo_model as build
    monkeypatch.setattr(build, "STATE", tmp_path / "state")      # outside the repository
    monkeypatch.setattr(build, "REPO", tmp_path / "repo")
    last = build.runs_of_installed_model()[-1]["out"]
    work = tmp_path / "work"
    save_atomically({"current_epoch": 7}, work / last / "checkpoint_latest.pth")
    build.step_keep(work)
    kept = tmp_path / "state" / last / "checkpoint_latest.pth"
    assert torch.load(kept)["current_epoch"] == 7
    # a finished run (its model root exists) is kept too: on a new machine ``train`` only exports it
    kept.unlink()
    save_atomically({"current_epoch": 9}, work / last / "checkpoint_latest.pth")
    (work / last / "LesionLocatorCheckpoint").mkdir()
    build.step_keep(work)
    assert torch.load(kept)["current_epoch"] == 9


def test_resuming_a_finished_run_trains_nothing_and_writes_its_model_root(data, tmp_path):
    pairs = find_pairs(data / "images", data / "labels")
    train(pairs, data / "run", PLANS, TrainOptions(epochs=1, iterations_per_epoch=1, val_samples=2), device="cpu",
          log=lambda m: None)
    moved = tmp_path / "new_machine"
    moved.mkdir()
    (data / "run" / "checkpoint_latest.pth").rename(moved / "checkpoint_latest.pth")
    logs = []
    root = train(pairs, moved, PLANS, TrainOptions(epochs=1, iterations_per_epoch=1, val_samples=2), device="cpu",
                 log=logs.append)
    assert not any(m.startswith("epoch ") for m in logs)
    final = load_checkpoint(root / "LesionLocatorSeg" / "point_optimized" / "fold_0" / "checkpoint_final.pth")
    latest = load_checkpoint(moved / "checkpoint_latest.pth")
    assert final["network_weights"].keys() == latest["network_weights"].keys()
    assert all(torch.equal(final["network_weights"][k], latest["network_weights"][k])
               for k in latest["network_weights"])


def test_train_options_hold_the_command_defaults_and_refuse_values_out_of_range(data):
    from dataclasses import asdict

    from LesionLocatorLib.cli import build_parser
    base = ["train", "--images", "i", "--labels", "l", "-o", "o"]
    args = build_parser().parse_args(base)
    flags = {"iterations_per_epoch": "iterations", "initial_lr": "lr"}
    defaults = asdict(TrainOptions())
    assert {k: v for k, v in defaults.items() if k != "val_samples"} == \
        {k: tuple(getattr(args, flags.get(k, k))) if k == "prompt_types" else getattr(args, flags.get(k, k))
         for k in defaults if k != "val_samples"}, "the library and the command agree on every default"
    assert TrainOptions(prompt_types=["box"]).prompt_types == ("box",)
    for bad, message in ((dict(tight_box_prob=1.5), "tight_box_prob must be between 0 and 1, got 1.5"),
                         (dict(vanish_prob=-0.1), "vanish_prob must be between 0 and 1, got -0.1"),
                         (dict(low_res_prob=float("nan")), "low_res_prob must be between 0 and 1, got nan"),
                         (dict(box_jitter_mm=-3), "box_jitter_mm must be >= 0 or None, got -3"),
                         (dict(epochs=0), "epochs must be a whole number >= 1, got 0"),
                         (dict(batch_size=1.5), "batch_size must be a whole number >= 1, got 1.5"),
                         (dict(initial_lr=0), "initial_lr must be > 0, got 0"),
                         (dict(prompt_types=("scribble",)),
                          r"prompt_types must be some of \('point', 'box', 'mask'\), got \('scribble',\)")):
        with pytest.raises(ValueError, match=message):
            TrainOptions(**bad)
    with pytest.raises(TypeError, match="options must be a TrainOptions, got dict"):
        train(find_pairs(data / "images", data / "labels"), data / "run", PLANS, {"epochs": 1})
    assert not (data / "run").exists()


def test_no_shipped_module_imports_the_training_package():
    import ast
    from pathlib import Path
    lib = Path(train_module.__file__).resolve().parents[1]
    for path in lib.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{'.' * node.level}{node.module or ''}"] if isinstance(node, ast.ImportFrom) else []
            if path.name == "cli.py" and isinstance(node, ast.ImportFrom) and node.module == "training.commands":
                continue   # registers the train and synth commands when the package is there (ImportError: skipped)
            assert not any("training" in n.split(".") for n in names), f"{path.name} imports {names}"


def test_the_build_plan_gives_the_train_command_every_option_of_each_run(tmp_path):
    import build_demo_model as build
    from LesionLocatorLib.cli import build_parser
    parser = build_parser()
    for run in build.runs_of_installed_model():
        commands = build.train_commands(tmp_path, run)
        assert len(commands) == len(run["phases"])
        for cmd, phase in zip(commands, run["phases"]):
            args = vars(parser.parse_args(cmd[3:]))
            expected = TrainOptions(**run["options"], **phase["options"])
            for name, flag in build.TRAIN_FLAGS.items():   # what the command parses = what the plan says
                value = args[flag[2:].replace("-", "_")]
                assert (tuple(value) if name == "prompt_types" else value) == getattr(expected, name), (run, name)
            assert args["stop_after_epoch"] == phase["until_epoch"]
            assert (args["init"] is None) == (run["parent"] is None)
    # a plan that leaves an option to a default, or misspells one, is refused before anything runs
    for change, message in ((lambda plan: plan["runs"][1].update(parent="run99"),
                             "run9's parent 'run99' is not a run listed before it"),
                            (lambda plan: plan["runs"][0]["options"].pop("box_jitter_mm"),
                             r"run7 \(phase until epoch 300\) misses \['box_jitter_mm'\]$"),
                            (lambda plan: plan["runs"][0]["options"].update(box_jitter=8.0),
                             r"has unknown options \['box_jitter'\]")):
        plan = json.loads(build.PLAN_FILE.read_text())
        change(plan)
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        with pytest.raises(build.PlanError, match=message):
            build.load_plan(tmp_path / "plan.json")


def test_keep_writes_only_outside_the_repository(tmp_path, monkeypatch):
    import build_demo_model as build
    monkeypatch.setattr(build, "REPO", tmp_path / "repo")
    monkeypatch.setattr(build, "STATE", None)
    with pytest.raises(SystemExit, match="give --state DIR"):
        build.step_keep(tmp_path / "work")
    monkeypatch.setattr(build, "STATE", tmp_path / "repo" / "Testing" / "state")
    with pytest.raises(SystemExit, match="lies inside the repository"):
        build.step_keep(tmp_path / "work")
    assert not (tmp_path / "repo").exists()
