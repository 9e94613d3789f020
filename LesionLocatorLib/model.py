"""Load LesionLocator networks from model folders in the official nnU-Net v2 layout
(:mod:`LesionLocatorLib.modelfolder`).

A checkpoint is a dict with ``network_weights``, ``trainer_name``, ``init_args``
(holding the configuration name) and ``inference_allowed_mirroring_axes``. It is
loaded with ``torch.load(weights_only=True)``; the only extra globals allowed are
the numpy scalar/dtype types that nnU-Net's training log stores.
"""
from __future__ import annotations

import itertools
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .modelfolder import BACKENDS, CHECKPOINT_NAME, SEG_SUBFOLDERS, CheckpointError, available_folds, \
    check_model_root, find_model_folder, read_model_json
from .plans import DATASET_JSON, ModelLayoutError, PlansError, check_architecture, input_channels, \
    resolve_configuration, segmentation_heads
from .plans import build_network as plans_build_network

__all__ = ["ModelLayoutError", "PlansError", "CheckpointError", "LoadedModel", "load_model", "check_model_root",
           "find_model_folder", "available_folds", "build_network", "load_checkpoint", "select_device",
           "SEG_SUBFOLDERS", "CHECKPOINT_NAME"]


# --------------------------------------------------------------------------- checkpoints
def _safe_globals() -> list:
    """The non-tensor globals nnU-Net checkpoints contain: numpy scalars and dtypes
    in the training log (names of numpy 1.x and 2.x)."""
    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    allowed = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            allowed.append(getattr(np.dtypes, name))
    return allowed


def load_checkpoint(path) -> dict:
    """``torch.load(path, weights_only=True)`` with nnU-Net's numpy globals allowed.

    Raises :class:`CheckpointError` for a missing, truncated/corrupt, or
    non-plain-data file (the reason names the refused global).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        import re
        found = re.search(r"GLOBAL ([\w.]+)", msg)
        if found:  # a real pickle that names code: refused, whatever else it holds
            raise CheckpointError(f"refused to load {path}: it is not plain data (tensors, numbers, strings) and "
                                  f"loading it could run code. It asks for the Python global '{found.group(1)}', "
                                  f"which is not allowed.") from None
        reason = next((ln.strip() for ln in msg.splitlines() if "Unsupported" in ln), "")
        raise CheckpointError(f"corrupt checkpoint {path}: not a readable PyTorch checkpoint (damaged, or another "
                              f"kind of file){': ' + reason if reason else ''}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt or truncated checkpoint {path}: {str(e).strip().splitlines()[0]}") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - damaged bytes reach the unpickler's internals (IndexError, KeyError...)
        raise CheckpointError(f"corrupt checkpoint {path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                              f"{(str(e).strip() or 'no detail').splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise CheckpointError(f"{path} is not an nnU-Net checkpoint (no 'network_weights' entry)")
    return ckpt


# --------------------------------------------------------------------------- devices
def select_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then MPS, then CPU; an explicit device must be available."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine "
                           f"(use --device cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise RuntimeError("device 'mps' requested but Apple MPS is not available (use --device cpu or auto)")
    if not (name == "cpu" or name == "mps" or name.startswith("cuda")):
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


# --------------------------------------------------------------------------- model
@dataclass
class LoadedModel:
    """A network with its plans, ready for inference.

    ``spacing_zyx`` (mm) and ``patch_size`` (voxels) are in array order (z, y, x).
    """
    folder: Path
    network: torch.nn.Module
    fold_weights: list
    folds: list
    plans: dict
    configuration: dict
    configuration_name: str
    dataset_json: dict
    trainer_name: str
    mirror_axes: tuple | None
    device: torch.device
    use_tta: bool
    intensity_properties: dict = field(default_factory=dict)
    runtime: object = None  # None: PyTorch; else a callable (fold index, x) -> logits, e.g. OpenVINONetworks
    cuda_fp16: bool = True  # on CUDA, run the network under fp16 autocast (logits summed in fp32); False: fp32
    # patches per network call when mirroring (TTA): None = up to 8 on CUDA, one mirroring at a time on the CPU
    mirror_batch_limit: int | None = None
    network_fold: int = 0  # index into fold_weights of the weights ``network`` holds now (built with the first)

    @property
    def patch_size(self) -> tuple:
        return tuple(int(v) for v in self.configuration["patch_size"])

    @property
    def spacing_zyx(self) -> tuple:
        return tuple(float(v) for v in self.configuration["spacing"])

    @property
    def normalization(self) -> str:
        return self.configuration["normalization_schemes"][0]

    def host_buffer(self, shape: tuple) -> torch.Tensor:
        """An empty float32 CPU tensor for a network input batch; in page-locked (pinned) memory when the model runs
        on CUDA, so :meth:`forward` copies it to the GPU asynchronously. Fill it through ``.numpy()``."""
        return torch.empty(shape, dtype=torch.float32, pin_memory=self.device.type == "cuda")

    def forward(self, x: torch.Tensor, on_device: bool = False) -> torch.Tensor:
        """Logits (B, C, z, y, x) float32 for an input batch (B, 2, *patch), averaged over folds and, if
        ``use_tta``, over the allowed mirrorings: on the CPU, or with ``on_device`` left on the model's device
        (so that resampling them back to the scan can run there too)."""
        x = x.to(self.device, non_blocking=x.is_pinned())
        total = None
        for i, weights in enumerate(self.fold_weights):
            if self.runtime is not None:
                network = lambda batch, i=i: self.runtime(i, batch)  # noqa: E731
            else:
                if self.network_fold != i:  # one fold: never; several: on CUDA a copy on the GPU (weights kept there)
                    self.network.load_state_dict(weights)
                    self.network_fold = i
                network = self.network
            out = self._forward_one(network, x)
            total = out if total is None else total + out
        total = total / len(self.fold_weights)  # float32: _forward_one sums in fp32
        return total if on_device else _to_host(total)

    def _views_per_call(self, batch: int) -> int:
        """How many mirrorings of a batch of ``batch`` patches go through the network in one call."""
        if self.runtime is not None:
            return 1  # converted networks are compiled for one batch size
        limit = self.mirror_batch_limit
        if limit is None:  # the CPU gains nothing from larger batches, only memory
            limit = 8 if self.device.type == "cuda" else 1
        return max(1, limit // max(batch, 1))

    @torch.inference_mode()
    def _forward_one(self, network, x: torch.Tensor) -> torch.Tensor:
        """One fold's logits (float32, on the model's device), averaged over the mirrorings when ``use_tta``: the
        mirrored copies go through the network together (up to ``mirror_batch_limit`` patches per call; on
        CUDA out-of-memory the groups are halved), each prediction flipped back and summed in fp32 in a fixed
        order, so the result does not depend on the grouping beyond the network's own arithmetic."""
        ctx = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" and self.cuda_fp16 \
            else _nullcontext()
        views = [()]
        if self.use_tta and self.mirror_axes:
            axes = [a + 2 for a in self.mirror_axes]
            views += [c for n in range(1, len(axes) + 1) for c in itertools.combinations(axes, n)]
        per_call, done, pred, n = self._views_per_call(x.shape[0]), 0, None, x.shape[0]
        with ctx:
            while done < len(views):
                group = views[done:done + per_call]
                try:
                    out = network(torch.cat([_flip(x, dims) for dims in group]) if len(group) > 1
                                  else _flip(x, group[0]))
                except torch.OutOfMemoryError:
                    if len(group) == 1:
                        raise
                    torch.cuda.empty_cache()
                    per_call = max(1, len(group) // 2)
                    self.mirror_batch_limit = per_call * n  # remembered for the next batches
                    warnings.warn(f"out of memory with {len(group) * n} patches per network call: now "
                                  f"{per_call * n}", stacklevel=2)
                    continue
                for k, dims in enumerate(group):
                    one = _flip(out[k * n:(k + 1) * n], dims).float()
                    pred = one if pred is None else pred + one
                done += len(group)
        return pred / len(views) if len(views) > 1 else pred


def _flip(x: torch.Tensor, dims: tuple) -> torch.Tensor:
    return torch.flip(x, dims) if dims else x


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor on the CPU; from CUDA through page-locked memory (one asynchronous copy, then a wait)."""
    if t.device.type != "cuda":
        return t.cpu()
    host = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return host


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def build_network(plans: dict, configuration_name: str, dataset_json: dict, device=None,
                  initialize: bool = True, deep_supervision: bool = False) -> torch.nn.Module:
    """The network the plans describe, with one extra input channel for the prompt, built from
    the allow-list only (:mod:`LesionLocatorLib.plans`: nothing named in plans.json is imported)."""
    config = resolve_configuration(plans, configuration_name)
    return plans_build_network(check_architecture(config), input_channels(dataset_json),
                               segmentation_heads(dataset_json), deep_supervision=deep_supervision,
                               device=device, initialize=initialize)


def _network_for_weights(plans: dict, configuration_name: str, dataset_json: dict, weights: dict, device,
                         folder: Path) -> torch.nn.Module:
    """The plans' network on ``device`` holding ``weights``. The architecture is first built on the
    meta device (no memory, no initialisation) and its tensor names and shapes compared with the
    weights, so plans that do not fit the checkpoint (or describe an absurdly large network) fail
    before anything is allocated."""
    skeleton = build_network(plans, configuration_name, dataset_json, device="meta")
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in weights.items()}
    problems = ([f"{k}: checkpoint {given[k]}, plans {expected[k]}" for k in expected
                 if k in given and given[k] != expected[k]]
                + [f"missing {k}" for k in expected if k not in given]
                + [f"unexpected {k}" for k in given if k not in expected])
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{folder}: the weights do not fit the architecture in plans.json: "
                              f"{'; '.join(problems[:3])}{more}")
    network = skeleton.to_empty(device=device)
    network.load_state_dict(weights, strict=True)
    return network


def load_model(path, prompt_type: str = "point", folds=None, device: str = "auto", tta: bool | None = None,
               checkpoint_name: str = CHECKPOINT_NAME, backend: str = "torch", cache_dir=None) -> LoadedModel:
    """Load the model for ``prompt_type`` from a model root or trained-model folder.

    ``folds``: list of fold numbers (or 'all'); None uses every fold present.
    ``tta``: mirroring test-time augmentation; None = on for GPU, off for CPU.
    ``backend``: 'torch' (default), or on the CPU 'openvino' (fp32, logits within ~1e-4 of PyTorch) or
    'openvino-bf16' (opt-in reduced precision) of :mod:`LesionLocatorLib.openvinobackend`; converted networks are
    cached under ``cache_dir`` (default: the model cache, :func:`LesionLocatorLib.zoo.cache_root`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    folder = find_model_folder(path, prompt_type)
    plans, dataset_json = read_model_json(folder)
    present = available_folds(folder)
    if folds is None:
        folds = present
    folds = [f if f == "all" else int(f) for f in folds]
    missing = [f for f in folds if f not in present]
    if missing:
        raise ModelLayoutError(f"fold(s) {missing} not found in {folder}; available: {present}")
    dev = select_device("cpu" if backend != "torch" and (device or "auto") == "auto" else device)
    weights, trainer, config_name, mirror = [], None, None, None
    for f in folds:
        ckpt = load_checkpoint(folder / f"fold_{f}" / checkpoint_name)
        if trainer is None:
            trainer = ckpt.get("trainer_name", "")
            init_args = ckpt.get("init_args") or {}
            config_name = init_args.get("configuration", "3d_fullres")
            mirror = ckpt.get("inference_allowed_mirroring_axes")
        weights.append(_network_state(ckpt["network_weights"]))
    if config_name not in plans["configurations"]:
        raise ModelLayoutError(f"{folder}/plans.json has no configuration {config_name!r} "
                               f"(checkpoint asks for it); has {list(plans['configurations'])}")
    config = resolve_configuration(plans, config_name, f"{folder / 'plans.json'}")
    if len(config["patch_size"]) != 3:
        raise ModelLayoutError(f"{folder}/plans.json: configuration {config_name!r} is not 3D "
                               f"(patch_size {config['patch_size']}); LesionLocator models are 3D")
    network = _network_for_weights(plans, config_name, dataset_json, weights[0], dev, folder).eval()
    _check_same_tensors(weights, folds, folder)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed patch shapes: let cuDNN time its algorithms once per shape
        if len(weights) > 1:  # switching folds is then a copy on the GPU, not a host-to-GPU transfer per batch
            weights = [{k: v.to(dev) for k, v in w.items()} for w in weights]
    use_tta = (dev.type != "cpu") if tta is None else bool(tta)
    intensity = plans.get("foreground_intensity_properties_per_channel", {}).get("0", {})
    model = LoadedModel(folder, network, weights, folds, plans, config, config_name, dataset_json, trainer,
                        tuple(mirror) if mirror is not None else None, dev, use_tta, intensity)
    if backend != "torch":
        if dev.type != "cpu":
            raise ValueError(f"the {backend} backend runs on the CPU; use device 'cpu' (or the torch backend on "
                             f"{dev.type})")
        from .openvinobackend import OpenVINONetworks

        model.runtime = OpenVINONetworks(model, [folder / f"fold_{f}" / checkpoint_name for f in folds], cache_dir,
                                         precision="bf16" if backend == "openvino-bf16" else "f32")
    return model


def _check_same_tensors(weights: list, folds: list, folder: Path) -> None:
    """Every fold's weights have the first fold's tensor names and shapes (they are swapped into one network)."""
    first = {k: tuple(v.shape) for k, v in weights[0].items()}
    for fold, w in zip(folds[1:], weights[1:]):
        other = {k: tuple(v.shape) for k, v in w.items()}
        if other != first:
            diff = sorted(set(first) ^ set(other)) or [k for k in first if first[k] != other[k]]
            raise CheckpointError(f"{folder}: fold {fold}'s weights do not match fold {folds[0]}'s "
                                  f"(first difference: {diff[0]})")


def _network_state(weights: dict) -> dict:
    """The segmentation network's state dict from a checkpoint's ``network_weights``.

    Strips a torch.compile prefix ('_orig_mod.'). Official LesionLocatorTrack
    checkpoints hold a TrackNet: its U-Net under 'unet.' (used here) and the
    uniGradICON registration network under 'reg_net.' (see :func:`registration_weights`).
    """
    if any(k.startswith("_orig_mod.") for k in weights):
        weights = {k.replace("_orig_mod.", "", 1): v for k, v in weights.items()}
    if any(k.startswith("unet.") for k in weights):
        weights = {k[len("unet."):]: v for k, v in weights.items() if k.startswith("unet.")}
    return weights


def registration_weights(model: "LoadedModel") -> dict:
    """The 'reg_net.' tensors of a LesionLocatorTrack checkpoint (fold of the first weights), or {}."""
    ckpt = load_checkpoint(model.folder / f"fold_{model.folds[0]}" / CHECKPOINT_NAME)
    return {k[len("reg_net."):]: v for k, v in ckpt["network_weights"].items() if k.startswith("reg_net.")}


def warn_if_not_ct(array: np.ndarray) -> None:
    """Warn when the intensities do not look like CT in Hounsfield units."""
    sample = np.asarray(array).ravel()[:: max(1, array.size // 200000)]
    lo, hi = np.percentile(sample, [1, 99])
    if lo > -300 or hi < 0 or hi > 5000:
        warnings.warn(f"the image does not look like CT in Hounsfield units (1st/99th percentile "
                      f"{lo:.0f}/{hi:.0f}); LesionLocator was trained on CT", stacklevel=2)


def checkpoint_dict(weights: dict, plans: dict, trainer: str = "LesionLocatorTrainerSegment", fold: int = 0,
                    logging: dict | None = None, epoch: int = 0, optimizer_state=None, grad_scaler_state=None) -> dict:
    """A checkpoint with the entries nnU-Net / LesionLocator training writes."""
    return {
        "network_weights": weights,
        "optimizer_state": optimizer_state if optimizer_state is not None else {"state": {}, "param_groups": []},
        "grad_scaler_state": grad_scaler_state,
        "logging": logging if logging is not None else {},
        "_best_ema": max((logging or {}).get("ema_fg_dice", [0.0]) or [0.0]),
        "current_epoch": epoch,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold,
                      "dataset_json": DATASET_JSON, "device": torch.device("cpu")},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
