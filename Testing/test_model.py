"""Loading checkpoints in the official layout: folds, devices, safety, errors."""
import shutil

import numpy as np
import pytest
import torch

from LesionLocatorLib.model import (CheckpointError, ModelLayoutError, check_model_root, find_model_folder,
                                    load_checkpoint, load_model, select_device)


def test_loads_point_and_box_models_from_the_official_layout(tiny_model_root):
    check_model_root(tiny_model_root)
    check_model_root(tiny_model_root.parent)  # the folder holding LesionLocatorCheckpoint also works
    point = load_model(tiny_model_root, "point", device="cpu")
    box = load_model(tiny_model_root, "box", device="cpu")
    assert point.folder.name == "point_optimized" and box.folder.name == "bbox_optimized"
    assert point.trainer_name == "LesionLocatorTrainerSegment" and point.configuration_name == "3d_fullres"
    assert point.patch_size == (32, 48, 48) and point.spacing_zyx == (1.0, 0.8, 0.8)
    assert point.mirror_axes == (0, 1, 2)
    assert not point.use_tta, "mirroring must be off by default on CPU"
    assert load_model(tiny_model_root, "point", device="cpu", tta=True).use_tta
    first = next(iter(point.network.parameters()))
    assert first.shape[1] == 2, "image + prompt channels"


def test_fold_ensemble_is_the_mean_of_single_folds(tiny_two_fold_root):
    x = torch.randn(1, 2, 32, 48, 48)
    both = load_model(tiny_two_fold_root, "point", device="cpu").forward(x)
    f0 = load_model(tiny_two_fold_root, "point", folds=[0], device="cpu").forward(x)
    f1 = load_model(tiny_two_fold_root, "point", folds=["1"], device="cpu").forward(x)
    assert not torch.allclose(f0, f1)
    assert torch.allclose(both, (f0 + f1) / 2, atol=1e-5)


def test_weights_are_copied_into_the_network_only_when_the_fold_changes(tiny_model_root, tiny_two_fold_root):
    """One fold: the network keeps its weights (no 400 MB copy per batch, on CUDA a host-to-GPU transfer); two
    folds: one copy per fold switch, and the ensemble still equals the mean of the single folds."""
    x = torch.randn(1, 2, 32, 48, 48)
    for root, expected in ((tiny_model_root, [0, 0, 0]), (tiny_two_fold_root, [1, 2, 2])):
        m = load_model(root, "point", device="cpu")
        loads = []
        m.network.register_load_state_dict_post_hook(lambda module, keys: loads.append(1))
        counts = []
        for _ in range(3):
            m.forward(x)
            counts.append(len(loads))
            loads.clear()
        assert counts == expected, (root, counts)
    f0 = load_model(tiny_two_fold_root, "point", folds=[0], device="cpu").forward(x)
    f1 = load_model(tiny_two_fold_root, "point", folds=[1], device="cpu").forward(x)
    assert torch.allclose(m.forward(x), (f0 + f1) / 2, atol=1e-5)


def test_mirroring_tta_averages_flipped_predictions(tiny_model_root):
    m = load_model(tiny_model_root, "point", device="cpu", tta=True)
    x = torch.randn(1, 2, 32, 48, 48)
    m.use_tta = False
    base = m.forward(x)
    m.use_tta = True
    tta = m.forward(x)
    manual = base.clone()
    m.use_tta = False
    combos = [(2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    for dims in combos:
        manual += torch.flip(m.forward(torch.flip(x, dims)), dims)
    assert torch.allclose(tta, manual / 8, atol=1e-5)


def test_mirrorings_batched_into_one_call_equal_one_at_a_time(tiny_two_fold_root):
    """The CUDA default sends all 8 mirrorings of a patch through the network in one call (up to
    ``mirror_batch_limit`` patches); the result equals one mirroring per call, 2 folds, 2 patches."""
    m = load_model(tiny_two_fold_root, "point", device="cpu", tta=True)
    x = torch.randn(2, 2, 32, 48, 48)
    assert m._views_per_call(2) == 1, "the CPU default: one mirroring per call"
    one_at_a_time = m.forward(x)
    calls = []
    network = m.network
    hook = network.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    try:
        m.mirror_batch_limit = 16
        grouped = m.forward(x)
        m.mirror_batch_limit = 6  # 3 mirrorings per call: groups of 3, 3, 2
        uneven = m.forward(x)
    finally:
        hook.remove()
    assert calls == [16, 16] + [6, 6, 4] * 2, calls
    assert torch.allclose(grouped, one_at_a_time, atol=1e-5, rtol=0)
    assert torch.allclose(uneven, one_at_a_time, atol=1e-5, rtol=0)


def test_out_of_memory_with_grouped_mirrorings_halves_the_groups(tiny_model_root):
    """A CUDA out-of-memory error for a group of mirrorings (raised here by a network that refuses more than
    4 patches, as a GPU with little memory would) halves the group, remembers the smaller size, and gives the
    same logits; one patch that does not fit is re-raised for the caller's fallback."""
    m = load_model(tiny_model_root, "point", device="cpu", tta=True)
    x = torch.randn(1, 2, 32, 48, 48)
    reference = m._forward_one(m.network, x)
    seen = []

    def small_gpu(batch):
        seen.append(batch.shape[0])
        if batch.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return m.network(batch)
    m.mirror_batch_limit = 8
    with pytest.warns(UserWarning, match="out of memory with 8 patches per network call: now 4"):
        out = m._forward_one(small_gpu, x)
    assert seen == [8, 4, 4] and m.mirror_batch_limit == 4
    assert torch.allclose(out, reference, atol=1e-5, rtol=0)
    def no_memory(batch):
        raise torch.OutOfMemoryError("not even one patch")
    m.mirror_batch_limit = 1
    with pytest.raises(torch.OutOfMemoryError, match="not even one patch"):
        m._forward_one(no_memory, x)


def test_folds_with_different_tensors_are_refused_at_load(tiny_two_fold_root, tmp_path):
    root = shutil.copytree(tiny_two_fold_root, tmp_path / "LesionLocatorCheckpoint")
    ckpt = root / "LesionLocatorSeg" / "point_optimized" / "fold_1" / "checkpoint_final.pth"
    data = load_checkpoint(ckpt)
    name = next(k for k in data["network_weights"] if k.endswith("weight"))
    data["network_weights"][name] = torch.zeros(3)
    torch.save(data, ckpt)
    with pytest.raises(CheckpointError, match=rf"fold 1's weights do not match fold 0's \(first difference: "
                                              rf"{name.replace('.', '[.]')}\)"):
        load_model(root, "point", device="cpu")
    assert load_model(root, "point", folds=[0], device="cpu").folds == [0]


def test_missing_fold_and_wrong_layout_errors(tiny_model_root, tmp_path):
    with pytest.raises(ModelLayoutError, match=r"fold\(s\) \[3\] not found in .*point_optimized; available: \[0\]"):
        load_model(tiny_model_root, "point", folds=[3], device="cpu")
    with pytest.raises(ModelLayoutError, match=r"(?s)has no LesionLocatorSeg/point_optimized or bbox_optimized.*"
                                               r"expected a LesionLocator model root"):
        check_model_root(tmp_path)
    with pytest.raises(ModelLayoutError, match="model folder not found"):
        find_model_folder(tmp_path / "nope", "point")
    no_track = shutil.copytree(tiny_model_root, tmp_path / "copy" / "LesionLocatorCheckpoint")
    shutil.rmtree(no_track / "LesionLocatorTrack")
    with pytest.raises(ModelLayoutError, match=r"no 'prev_mask' model in .*LesionLocatorTrack is missing"):
        find_model_folder(no_track, "prev_mask")


def test_corrupt_and_truncated_checkpoints(tiny_model_root, tmp_path):
    root = shutil.copytree(tiny_model_root, tmp_path / "LesionLocatorCheckpoint")
    ckpt = root / "LesionLocatorSeg" / "point_optimized" / "fold_0" / "checkpoint_final.pth"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated checkpoint"):
        load_model(root, "point", device="cpu")
    ckpt.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(ckpt)


def test_random_bytes_are_a_corrupt_checkpoint_whatever_they_hold(tmp_path):
    """Damaged bytes reach the unpickler's internals in many ways (IndexError 'pop from empty list',
    KeyError, UnicodeDecodeError, ...): every one is CheckpointError 'corrupt', never an internal
    error. 200 seeded byte strings, raw and behind a pickle header."""
    rng = np.random.default_rng(7)
    path = tmp_path / "checkpoint_final.pth"
    kinds = set()
    for n in range(200):
        data = rng.integers(0, 256, 5000, dtype=np.uint8).tobytes()
        path.write_bytes(data if n % 2 else b"\x80\x02" + data)
        with pytest.raises(CheckpointError, match="corrupt") as error:
            load_checkpoint(path)
        kinds.add(str(error.value).split("(")[-1].split(":")[0])
    assert len(kinds) >= 2, kinds  # more than one way of failing was exercised


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_non_plain_pickle_is_refused_with_the_reason(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"refused to load .*not plain data.*Python global "
                                              r"'(posix|os)\.system', which is not allowed"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_plans(tiny_model_root, tmp_path):
    root = shutil.copytree(tiny_model_root, tmp_path / "LesionLocatorCheckpoint")
    ckpt = root / "LesionLocatorSeg" / "point_optimized" / "fold_0" / "checkpoint_final.pth"
    data = load_checkpoint(ckpt)
    data["network_weights"] = {k: v for i, (k, v) in enumerate(data["network_weights"].items()) if i > 3}
    torch.save(data, ckpt)
    with pytest.raises(CheckpointError, match="the weights do not fit the architecture in plans.json"):
        load_model(root, "point", device="cpu")


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device 'cuda' requested but CUDA is not available"):
            select_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        select_device("tpu")


def test_checkpoint_with_numpy_log_loads_safely(tiny_model_root):
    ckpt = load_checkpoint(tiny_model_root / "LesionLocatorSeg" / "point_optimized" / "fold_0" /
                           "checkpoint_final.pth")
    assert isinstance(ckpt["_best_ema"], np.floating)
    assert ckpt["init_args"]["configuration"] == "3d_fullres"
