"""The optional OpenVINO CPU backend (:mod:`LesionLocatorLib.openvinobackend`): conversion once per fold and batch,
cached on disk by checkpoint hash, patch and batch; same masks as PyTorch (the upstream-equivalence fixtures run
with it too: ``Testing/test_upstream_equivalence.py``, logits within 1e-3); the norm replacement that makes fp32
results equal; clear errors for a missing package, a GPU device, --server; a damaged cache entry converted again.
"""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from LesionLocatorLib import cli
from LesionLocatorLib.image import Image, read_image, write_image
from LesionLocatorLib.model import load_model
from LesionLocatorLib.openvinobackend import BackendError, StableInstanceNorm, file_sha256, stabilise_norms, \
    trace_shape
from LesionLocatorLib.predict import segment
from LesionLocatorLib.prompts import Point

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="the optional 'openvino' package is not installed")


def _phantom() -> Image:
    rng = np.random.default_rng(3)
    array = rng.normal(40, 15, (40, 64, 64)).astype(np.float32)
    zz, yy, xx = np.ogrid[:40, :64, :64]
    array[(zz - 20) ** 2 + (yy - 30) ** 2 + (xx - 34) ** 2 < 64] += 120
    array[:, :, :10] = -1000  # air beside the body
    direction = np.array([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])  # oblique, anisotropic
    return Image(array, (0.8, 0.8, 2.5), (-20.0, 10.0, -50.0), direction)


def test_stable_instance_norm_is_instance_norm():
    norm = torch.nn.InstanceNorm3d(4, affine=True, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        norm.bias.copy_(torch.tensor([0.0, 1.0, -2.0, 3.0]))
    x = torch.randn(2, 4, 6, 20, 24) * 3 + 500  # a large mean: where one-pass variance loses digits
    assert torch.allclose(StableInstanceNorm(norm)(x), norm(x), atol=2e-4)
    net = torch.nn.Sequential(torch.nn.Conv3d(4, 4, 1), norm, torch.nn.LeakyReLU())
    net.all_modules = torch.nn.Sequential(norm)  # nnU-Net blocks hold their norm twice
    assert stabilise_norms(net) == 1 and isinstance(net[1], StableInstanceNorm) and net[1] is net.all_modules[0]


def test_trace_shape_is_twice_the_total_stride_within_the_patch():
    config = {"patch_size": [40, 64, 64], "architecture": {"arch_kwargs": {
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]}}}
    assert trace_shape(config) == (8, 16, 16)
    assert trace_shape({"patch_size": [4, 64, 64], "architecture": {"arch_kwargs": {"strides": [2, 2, 2]}}}) == (
        4, 16, 16)


@needs_openvino
def test_converted_once_then_loaded_from_the_cache_with_the_same_masks(tiny_model_root, tmp_path):
    image, cache = _phantom(), tmp_path / "cache"
    click = [Point(1, tuple(image.index_to_world([20, 30, 34])))]
    reference = segment(image, click, load_model(tiny_model_root, "point", device="cpu"))
    model = load_model(tiny_model_root, "point", device="cpu", backend="openvino", cache_dir=cache)
    first = segment(image, click, model)
    assert model.runtime.conversions == 1
    entries = list((cache / "converted" / "openvino").iterdir())
    checkpoint = model.folder / "fold_0" / "checkpoint_final.pth"
    assert len(entries) == 1 and entries[0].name.startswith(file_sha256(checkpoint)[:32])
    assert "_b1_f32_" in entries[0].name and (entries[0] / "model.xml").is_file()
    again = load_model(tiny_model_root, "point", device="cpu", backend="openvino", cache_dir=cache)
    second = segment(image, click, again)
    assert again.runtime.conversions == 0
    assert np.array_equal(first.masks[1], second.masks[1]) and np.array_equal(first.masks[1], reference.masks[1])
    assert reference.masks[1].any()
    diff = np.abs(first.probabilities[1] - reference.probabilities[1]).max()
    assert diff < 1e-4, diff
    # a damaged entry is converted again, not trusted
    (entries[0] / "model.xml").write_text("<net")
    damaged = load_model(tiny_model_root, "point", device="cpu", backend="openvino", cache_dir=cache)
    assert np.array_equal(segment(image, click, damaged).masks[1], first.masks[1])
    assert damaged.runtime.conversions == 1


def test_the_backend_names_agree_everywhere():
    from LesionLocatorLib import model, modelfolder, protocol

    assert protocol.MODEL_BACKENDS == modelfolder.BACKENDS == model.BACKENDS


def test_missing_package_and_gpu_device_are_clear_errors(tiny_model_root, monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'onnx'; choose one of torch, openvino, openvino-bf16"):
        load_model(tiny_model_root, "point", device="cpu", backend="onnx")
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(BackendError, match="needs the 'openvino' package: pip install openvino"):
        load_model(tiny_model_root, "point", device="cpu", backend="openvino")


@pytest.mark.parametrize("extra,message", [
    (["--device", "cuda"], "--backend openvino runs on the CPU; use --device cpu"),
    (["--server", "http://127.0.0.1:9"], "--backend cannot be used with --server"),
])
def test_cli_refuses_the_backend_where_it_cannot_run(tmp_path, capsys, extra, message):
    image = tmp_path / "ct.nii.gz"
    write_image(_phantom(), image)
    (tmp_path / "ct.json").write_text('{"1": {"point": [20, 30, 34]}}')
    out = tmp_path / "out"
    code = cli.main(["segment", "-i", str(image), "-o", str(out), "-p", str(tmp_path / "ct.json"), "-t", "point",
                     "--backend", "openvino", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


@needs_openvino
def test_cli_segment_with_openvino_writes_the_torch_masks(tiny_model_root, tmp_path, capsys):
    image = _phantom()
    path = tmp_path / "ct.nii.gz"
    write_image(image, path)
    (tmp_path / "ct.json").write_text('{"1": {"point": [20, 30, 34]}}')
    outputs = {}
    for backend in ("torch", "openvino"):
        out = tmp_path / backend
        assert cli.main(["segment", "-i", str(path), "-p", str(tmp_path / "ct.json"), "-t", "point", "-o", str(out),
                         "-m", str(tiny_model_root), "--device", "cpu", "--backend", backend,
                         "--disable_progress_bar"]) == 0, capsys.readouterr().err
        outputs[backend] = read_image(out / "ct_lesions.nii.gz").array
    assert outputs["torch"].any() and np.array_equal(outputs["torch"], outputs["openvino"])
