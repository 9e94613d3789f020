"""Optional CPU inference with OpenVINO (``pip install openvino``; ``load_model(..., backend="openvino")``,
``lesionlocator segment/track --backend openvino``).

Each fold's network is converted once (``openvino.convert_model`` of the PyTorch module, traced on a small input and
reshaped to the model's patch and the batch size) and saved as OpenVINO IR in the converted-model cache,
``<model cache>/converted/openvino/<key>/model.xml`` (:func:`LesionLocatorLib.zoo.cache_root`; ``<key>``: the
checkpoint file's SHA-256, the patch (z, y, x), the batch, the precision and the OpenVINO version). Later loads read
the IR (~0.5 s for ResEnc-L) instead of converting again (~10 s). A conversion is written into a temporary folder and
renamed, so an interrupted one leaves nothing half-written; a cache entry that cannot be read is converted again.

Accuracy. OpenVINO's (and ONNX Runtime's) instance normalisation accumulates its mean and variance over all voxels of
a channel in one fp32 reduction; over the 8 M voxels of a full-resolution ResEnc-L stage that loses ~1e-3 relative
per layer, and 62 such layers move the logits by up to 0.2 (Dice 0.979 against PyTorch; measured with
``Testing/benchmarks/bench_cpu_backend.py``). Before conversion every ``InstanceNorm3d`` is therefore replaced by
:class:`StableInstanceNorm` (the same function with blocked reductions and a two-pass variance): logits then match
PyTorch fp32 to ~3e-5. ``precision="bf16"`` (opt-in) lets OpenVINO compute in bfloat16 where the CPU has it (3.3x
faster than PyTorch fp32 on a 2-core AVX512-BF16 CPU, Dice 0.973 against fp32: for previews, not for measurements).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

PRECISIONS = ("f32", "bf16")
CONVERSION_VERSION = 1      # part of the cache key: bump when the conversion changes


class BackendError(RuntimeError):
    """The OpenVINO backend cannot run (package missing, conversion failed)."""


class StableInstanceNorm(torch.nn.Module):
    """``InstanceNorm3d`` (affine) with fp32-accurate reductions for export: the sums along x are a MatMul with a
    vector of 1/X (blocked accumulation over X values), the rest means over small tensors, and the variance is
    two-pass (mean of squared deviations). Same function as the module it replaces, within float rounding."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x):
        ones = x.new_ones(x.shape[-1], 1) / x.shape[-1]
        mean = torch.matmul(x, ones).mean(3, keepdim=True).mean(2, keepdim=True)
        d = x - mean
        var = torch.matmul(d * d, ones).mean(3, keepdim=True).mean(2, keepdim=True)
        scale = torch.rsqrt(var + self.eps) * self.weight.view(1, -1, 1, 1, 1)
        return d * scale + self.bias.view(1, -1, 1, 1, 1)


def stabilise_norms(module: torch.nn.Module, memo: dict | None = None) -> int:
    """Replace every affine ``InstanceNorm3d`` under ``module`` (in place) by :class:`StableInstanceNorm`; returns
    how many. A norm held twice (nnU-Net blocks keep it as ``norm`` and in ``all_modules``) gets one replacement."""
    memo = {} if memo is None else memo
    for name, sub in module.named_children():
        if isinstance(sub, torch.nn.InstanceNorm3d) and sub.affine and not sub.track_running_stats:
            if id(sub) not in memo:
                memo[id(sub)] = StableInstanceNorm(sub)
            setattr(module, name, memo[id(sub)])
        else:
            stabilise_norms(sub, memo)
    return len(memo)


def trace_shape(configuration: dict) -> tuple:
    """A small (z, y, x) input to trace the network on: twice its total stride per axis (the product of the
    plans' encoder strides), at most the patch. The converted graph is then made static at the patch."""
    patch = [int(v) for v in configuration["patch_size"]]
    strides = configuration.get("architecture", {}).get("arch_kwargs", {}).get("strides") or []
    total = [1] * 3
    for s in strides:
        s = [s] * 3 if isinstance(s, int) else list(s)
        total = [a * int(b) for a, b in zip(total, s)]
    return tuple(min(p, 2 * t) for p, t in zip(patch, total))


def _openvino():
    try:
        import openvino
    except ImportError:
        raise BackendError("the OpenVINO backend needs the 'openvino' package: pip install openvino "
                           "(or use the default PyTorch backend)") from None
    return openvino


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class OpenVINONetworks:
    """The folds of a :class:`~LesionLocatorLib.model.LoadedModel` as compiled OpenVINO models, converted on first
    use per (fold, batch size) and cached on disk (see the module docstring). ``net(fold_index, x)``: logits
    (B, C, z, y, x) float32 for an input batch (B, 2, *patch) float32 torch tensor on the CPU."""

    def __init__(self, model, checkpoints: list, cache_dir=None, precision: str = "f32", threads: int | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.ov = _openvino()
        from .zoo import cache_root

        self.model, self.precision, self.threads = model, precision, threads
        self.checkpoints = [Path(p) for p in checkpoints]
        self.root = cache_root(cache_dir) / "converted" / "openvino"
        self.core = self.ov.Core()
        self._hashes: dict = {}
        self._compiled: dict = {}
        self.conversions = 0  # how many conversions this object ran (the rest came from the cache)

    def cache_key(self, fold_index: int, batch: int) -> str:
        """The cache folder name of one fold at one batch size (checkpoint hash, patch, batch, precision, versions)."""
        if fold_index not in self._hashes:
            self._hashes[fold_index] = file_sha256(self.checkpoints[fold_index])
        patch = "x".join(str(v) for v in self.model.patch_size)
        return (f"{self._hashes[fold_index][:32]}_{patch}_b{batch}_{self.precision}_ov{self.ov.__version__}"
                f"_c{CONVERSION_VERSION}").replace("/", "_")

    def __call__(self, fold_index: int, x: torch.Tensor) -> torch.Tensor:
        key = (fold_index, int(x.shape[0]))
        if key not in self._compiled:
            self._compiled[key] = self._compile(*key)
        out = self._compiled[key](np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def _compile(self, fold_index: int, batch: int):
        folder = self.root / self.cache_key(fold_index, batch)
        xml = folder / "model.xml"
        model = None
        if xml.is_file():
            try:
                model = self.core.read_model(str(xml))
            except RuntimeError:
                model = None  # damaged entry: converted again below
        if model is None:
            self._convert(fold_index, batch, folder)
            model = self.core.read_model(str(xml))
        hints = self.ov.properties.hint
        config = {hints.performance_mode: hints.PerformanceMode.LATENCY, hints.inference_precision: self.precision}
        if self.threads:
            config[self.ov.properties.inference_num_threads] = int(self.threads)
        return self.core.compile_model(model, "CPU", config)

    def _convert(self, fold_index: int, batch: int, folder: Path) -> None:
        import copy

        from .plans import input_channels

        network = copy.deepcopy(self.model.network).cpu().float().eval()
        network.load_state_dict(self.model.fold_weights[fold_index])
        stabilise_norms(network)
        channels = input_channels(self.model.dataset_json)
        shape = (batch, channels, *self.model.patch_size)
        example = torch.zeros((1, channels) + trace_shape(self.model.configuration))
        try:
            with torch.no_grad():
                converted = self.ov.convert_model(network, example_input=example, input=[shape])
        except Exception as e:  # the converter raises many kinds of errors
            raise BackendError(f"OpenVINO could not convert the network of {self.model.folder}: {e}") from e
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
        try:
            self.ov.save_model(converted, str(tmp / "model.xml"), compress_to_fp16=False)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.conversions += 1
