"""The network a ``plans.json`` describes, built from an allow-list: a model folder is data, never code.

nnU-Net builds the network by importing whatever dotted names ``plans.json`` holds
(``network_class_name`` and the ``_kw_requires_import`` entries of ``arch_kwargs``, through
``pydoc.locate``), so a model folder from an archive, a cache or a shared drive could name any
callable, e.g. ``torch.hub.load`` with a ``hubconf.py`` beside it. Here nothing in a plans file
is ever imported or called by name:

* :func:`check_architecture` reads a configuration's architecture as plain data (no torch, no
  import) and refuses, with the key named, every class, op, keyword or value that is not in the
  tables below: the U-Net classes of ``dynamic_network_architectures`` and the ``torch.nn``
  convolutions, normalisations, dropouts and activations that nnU-Net plans use.
* :func:`build_network` turns the checked description into the network, looking classes up
  in those fixed tables only.

Official LesionLocator plans (``ResidualEncoderUNet`` with ``Conv3d``, ``InstanceNorm3d``,
``LeakyReLU``) and every plans file nnU-Net's planners write pass unchanged; nnU-Net's old
plans format (``UNet_class_name`` ...) is converted as nnU-Net itself converts it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DNA = "dynamic_network_architectures"

# network_class_name -> (attribute of dynamic_network_architectures.architectures.unet, residual?)
NETWORK_CLASSES = {
    f"{DNA}.architectures.unet.PlainConvUNet": ("PlainConvUNet", False),
    f"{DNA}.architectures.unet.ResidualEncoderUNet": ("ResidualEncoderUNet", True),
    f"{DNA}.architectures.unet.ResidualUNet": ("ResidualUNet", True),
    # where nnU-Net's old-plans converter and older dynamic_network_architectures put it
    f"{DNA}.architectures.residual_unet.ResidualEncoderUNet": ("ResidualEncoderUNet", True),
}

# keyword -> (torch.nn module file, class names): the ops a plans file may name, as
# 'torch.nn.<Name>' or 'torch.nn.modules.<file>.<Name>'
_OP_FAMILIES = {
    "conv_op": [("conv", ("Conv1d", "Conv2d", "Conv3d"))],
    "norm_op": [("instancenorm", ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d")),
                ("batchnorm", ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"))],
    "dropout_op": [("dropout", ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d"))],
    "nonlin": [("activation", ("LeakyReLU", "ReLU", "PReLU", "ELU", "GELU"))],
}
OPS = {key: {spelling: name for file, names in families for name in names
             for spelling in (f"torch.nn.{name}", f"torch.nn.modules.{file}.{name}")}
       for key, families in _OP_FAMILIES.items()}
BLOCKS = {f"{DNA}.building_blocks.residual.{name}": name for name in ("BasicBlockD", "BottleneckD")}

# the keyword arguments each op may get, with their kind
OP_KWARGS = {
    "norm_op_kwargs": {"eps": "number", "affine": "bool", "momentum": "number", "track_running_stats": "bool"},
    "dropout_op_kwargs": {"p": "number", "inplace": "bool"},
    "nonlin_kwargs": {"inplace": "bool", "negative_slope": "number", "num_parameters": "int", "init": "number",
                      "alpha": "number", "approximate": "str"},
}

# keyword -> kind, for every keyword of the U-Net constructors except input_channels / num_classes
_COMMON = {"n_stages": "int", "features_per_stage": "ints", "conv_op": "op", "kernel_sizes": "sizes",
           "strides": "sizes", "n_conv_per_stage_decoder": "ints", "conv_bias": "bool", "norm_op": "op?",
           "norm_op_kwargs": "kwargs", "dropout_op": "op?", "dropout_op_kwargs": "kwargs", "nonlin": "op?",
           "nonlin_kwargs": "kwargs", "deep_supervision": "bool"}
ARCH_KWARGS = {
    False: {**_COMMON, "n_conv_per_stage": "ints", "nonlin_first": "bool"},
    True: {**_COMMON, "n_blocks_per_stage": "ints", "block": "block", "bottleneck_channels": "ints?",
           "stem_channels": "int?"},
}
REQUIRED = {False: ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
                    "n_conv_per_stage_decoder"),
            True: ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_blocks_per_stage",
                   "n_conv_per_stage_decoder")}
IMPORTABLE = ("conv_op", "norm_op", "dropout_op", "nonlin", "block")

MAX_STAGES = 12
MAX_FEATURES = 4096   # channels per stage
MAX_KERNEL = 15       # kernel size and stride per axis
MAX_REPEATS = 64      # blocks or convolutions per stage


class ModelLayoutError(ValueError):
    """A model folder that is not in the official LesionLocator / nnU-Net v2 layout."""


class PlansError(ModelLayoutError):
    """A plans.json or dataset.json that is not plain data of an allowed architecture (the message names the key)."""


class UnsupportedPlansError(PlansError):
    """Plans that ask for a preprocessing step this library does not reproduce."""


SUPPORTED_NORMALIZATIONS = ("CTNormalization", "NoNormalization")
SUPPORTED_RESAMPLING = ("resample_data_or_seg_to_shape", "resample_torch_fornnunet")


def check_supported_preprocessing(configuration: dict, where: str = "plans.json") -> None:
    """Refuse, before any model loads, a configuration whose normalisation or resampling functions
    this library does not reproduce (they are computed per region around a prompt, so only
    schemes without whole-image statistics are possible)."""
    for scheme in configuration.get("normalization_schemes") or []:
        if scheme not in SUPPORTED_NORMALIZATIONS:
            raise UnsupportedPlansError(f"{where}: normalisation {scheme!r} needs whole-image statistics and is not "
                                        f"supported; supported: {', '.join(SUPPORTED_NORMALIZATIONS)}")
    for key in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities"):
        name = configuration.get(key, SUPPORTED_RESAMPLING[0])
        if name not in SUPPORTED_RESAMPLING:
            raise UnsupportedPlansError(f"{where}: {key} {name!r} is not supported; supported: "
                                        f"{', '.join(SUPPORTED_RESAMPLING)}")


@dataclass(frozen=True)
class Architecture:
    """A checked network description: the class's attribute name in
    ``dynamic_network_architectures.architectures.unet`` and its keyword arguments, with each op
    given by its ``torch.nn`` class name (e.g. ``'Conv3d'``) and the block by its name."""
    class_name: str
    residual: bool
    kwargs: dict


def _size(value) -> bool:
    """A kernel size or stride: an int in 1..MAX_KERNEL, or a list of 1 to 3 of them (one per axis)."""
    def one(v):
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_KERNEL
    return one(value) or (isinstance(value, list) and 1 <= len(value) <= 3 and all(one(v) for v in value))


def _kind_ok(kind: str, value) -> bool:
    if kind.endswith("?") and value is None:
        return True
    kind = kind.rstrip("?")
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return is_int and 1 <= value <= MAX_FEATURES
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "str":
        return isinstance(value, str) and len(value) <= 32
    if kind == "ints":
        return _kind_ok("int", value) or (isinstance(value, list) and 0 < len(value) <= MAX_STAGES
                                          and all(_kind_ok("int", v) for v in value))
    if kind == "sizes":  # one size for all stages, or one per stage; a size is an int or one int per axis
        return _size(value) or (isinstance(value, list) and 0 < len(value) <= MAX_STAGES
                                and all(_size(v) for v in value))
    raise AssertionError(kind)


def _check_op_kwargs(key: str, value, where: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise PlansError(f"{where}: arch_kwargs.{key} must be an object or null, got {type(value).__name__}")
    allowed = OP_KWARGS[key]
    for k, v in value.items():
        if k not in allowed:
            raise PlansError(f"{where}: arch_kwargs.{key}.{k} is not an allowed keyword "
                             f"(allowed: {', '.join(allowed)})")
        if not _kind_ok(allowed[k], v):
            raise PlansError(f"{where}: arch_kwargs.{key}.{k} = {v!r} is not a valid {allowed[k]}")


def _convert_old_format(config: dict, where: str) -> dict:
    """nnU-Net's pre-2.4 plans (``UNet_class_name`` ...) as an ``architecture`` entry, as nnU-Net converts them."""
    names = {"PlainConvUNet": f"{DNA}.architectures.unet.PlainConvUNet",
             "ResidualEncoderUNet": f"{DNA}.architectures.residual_unet.ResidualEncoderUNet"}
    unet = config.get("UNet_class_name")
    if unet not in names:
        raise PlansError(f"{where}: UNet_class_name {unet!r} is not allowed (allowed: {', '.join(names)})")
    try:
        n = len(config["n_conv_per_stage_encoder"])
        dim = len(config["patch_size"])
        base, top = config["UNet_base_num_features"], config["unet_max_num_features"]
        arch = {
            "n_stages": n, "features_per_stage": [min(base * 2 ** i, top) for i in range(n)],
            "conv_op": f"torch.nn.modules.conv.Conv{dim}d", "kernel_sizes": config["conv_kernel_sizes"],
            "strides": config["pool_op_kernel_sizes"],
            ("n_conv_per_stage" if unet == "PlainConvUNet" else "n_blocks_per_stage"):
                config["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"], "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dim}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    except (KeyError, TypeError) as e:
        raise PlansError(f"{where}: old-format plans without a valid {e}") from None
    return {"network_class_name": names[unet], "arch_kwargs": arch,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def check_architecture(configuration: dict, where: str = "plans.json") -> Architecture:
    """The architecture of one (resolved) plans configuration, checked against the allow-list.

    Raises :class:`PlansError` naming the first key that is not allowed. Imports nothing."""
    if not isinstance(configuration, dict):
        raise PlansError(f"{where}: the configuration is not an object")
    arch = configuration.get("architecture")
    if arch is None:
        arch = _convert_old_format(configuration, where)
    if not isinstance(arch, dict):
        raise PlansError(f"{where}: 'architecture' must be an object")
    unknown = set(arch) - {"network_class_name", "arch_kwargs", "_kw_requires_import"}
    if unknown:
        raise PlansError(f"{where}: architecture.{sorted(unknown)[0]} is not an allowed key")
    class_name = arch.get("network_class_name")
    if class_name not in NETWORK_CLASSES:
        raise PlansError(f"{where}: architecture.network_class_name {class_name!r} is not an allowed network "
                         f"(allowed: {', '.join(sorted(NETWORK_CLASSES))}); a model folder may not name code")
    attr, residual = NETWORK_CLASSES[class_name]
    kwargs = arch.get("arch_kwargs")
    if not isinstance(kwargs, dict):
        raise PlansError(f"{where}: architecture.arch_kwargs must be an object")
    imports = arch.get("_kw_requires_import", [])
    if not isinstance(imports, list) or not all(isinstance(k, str) for k in imports):
        raise PlansError(f"{where}: architecture._kw_requires_import must be a list of keyword names")
    for k in imports:
        if k not in IMPORTABLE or k not in ARCH_KWARGS[residual]:
            raise PlansError(f"{where}: architecture._kw_requires_import names {k!r}, which may not be imported "
                             f"(only {', '.join(k for k in IMPORTABLE if k in ARCH_KWARGS[residual])})")
    allowed = ARCH_KWARGS[residual]
    checked = {}
    for key, value in kwargs.items():
        kind = allowed.get(key)
        label = f"architecture.arch_kwargs.{key}"
        if kind is None:
            raise PlansError(f"{where}: {label} is not an allowed keyword of {attr}")
        if kind in ("op", "op?"):
            if value is None and kind == "op?":
                checked[key] = None
                continue
            if value not in OPS[key]:
                raise PlansError(f"{where}: {label} {value!r} is not an allowed op (allowed: "
                                 f"{', '.join(sorted(set(OPS[key].values())))} as torch.nn.<name>)")
            checked[key] = OPS[key][value]
        elif kind == "block":
            if value not in BLOCKS:
                raise PlansError(f"{where}: {label} {value!r} is not an allowed block (allowed: {', '.join(BLOCKS)})")
            checked[key] = BLOCKS[value]
        elif kind == "kwargs":
            _check_op_kwargs(key, value, where)
            checked[key] = dict(value) if value is not None else None
        elif not _kind_ok(kind, value):
            raise PlansError(f"{where}: {label} = {value!r} is not a valid value ({kind.rstrip('?')}"
                             f"{', or null' if kind.endswith('?') else ''})")
        else:
            checked[key] = value
    for key in REQUIRED[residual]:
        if key not in checked:
            raise PlansError(f"{where}: architecture.arch_kwargs.{key} is missing")
    if not 1 <= checked["n_stages"] <= MAX_STAGES:
        raise PlansError(f"{where}: architecture.arch_kwargs.n_stages = {checked['n_stages']} "
                         f"is outside 1..{MAX_STAGES}")
    for key in ("n_blocks_per_stage", "n_conv_per_stage", "n_conv_per_stage_decoder"):
        reps = checked.get(key)
        if reps is not None and max(reps if isinstance(reps, list) else [reps]) > MAX_REPEATS:
            raise PlansError(f"{where}: architecture.arch_kwargs.{key} = {reps} exceeds {MAX_REPEATS} per stage")
    return Architecture(attr, residual, checked)


MAX_PATCH_VOXELS = 256 ** 3


def resolve_configuration(plans: dict, name: str, where: str = "plans.json") -> dict:
    """A configuration of ``plans`` with its ``inherits_from`` chain merged (as nnU-Net resolves it),
    its patch size and target spacing checked, and its architecture checked (:func:`check_architecture`).
    ``patch_size`` (voxels) and ``spacing`` (mm) are in array order (z, y, x)."""
    configs = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(configs, dict):
        raise PlansError(f"{where}: 'configurations' must be an object")
    chain = []
    while True:
        if name not in configs:
            raise PlansError(f"{where} has no configuration {name!r}; it has {list(configs)}")
        if name in chain:
            raise PlansError(f"{where}: configuration {chain[0]!r} inherits from itself (via {name!r})")
        if not isinstance(configs[name], dict):
            raise PlansError(f"{where}: configurations.{name} is not an object")
        chain.append(name)
        name = configs[name].get("inherits_from")
        if name is None:
            break
    merged = {}
    for n in reversed(chain):
        merged.update(configs[n])
    merged.pop("inherits_from", None)
    where = f"{where} ({chain[0]})"
    patch, spacing = merged.get("patch_size"), merged.get("spacing")
    if not (isinstance(patch, list) and len(patch) in (2, 3) and all(_kind_ok("int", v) for v in patch)
            and math.prod(patch) <= MAX_PATCH_VOXELS):
        raise PlansError(f"{where}: patch_size must be 3 positive integers (z, y, x; 2 for a 2D configuration) "
                         f"with at most {MAX_PATCH_VOXELS} voxels in all, got {patch!r}")
    if not (isinstance(spacing, list) and len(spacing) == len(patch)
            and all(_kind_ok("number", v) and 0 < v <= 100 for v in spacing)):
        raise PlansError(f"{where}: spacing must be {len(patch)} positive numbers in mm (z, y, x), at most 100, "
                         f"got {spacing!r}")
    check_architecture(merged, where)
    return merged


def check_plans(plans: dict, where: str = "plans.json") -> None:
    """Check every configuration of a plans file (:func:`resolve_configuration`): a plans file
    that names anything outside the allow-list anywhere is refused, used or not."""
    configs = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(configs, dict) or not configs:
        raise PlansError(f"{where}: 'configurations' must be a non-empty object")
    for name in configs:
        resolve_configuration(plans, name, where)


def segmentation_heads(dataset_json: dict, where: str = "dataset.json") -> int:
    """Output channels of the network for a dataset.json: one per label (background included), or one per
    region when labels are regions (lists of label values), as nnU-Net's label manager counts them."""
    labels = dataset_json.get("labels") if isinstance(dataset_json, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise PlansError(f"{where}: 'labels' must be a non-empty object of label name -> value")
    values = list(labels.values())
    if any(isinstance(v, (list, tuple)) for v in values):
        return len([v for k, v in labels.items() if k != "background"])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise PlansError(f"{where}: label values must be integers or lists of integers")
    return len(values)


def input_channels(dataset_json: dict, where: str = "dataset.json") -> int:
    """Image channels in dataset.json plus one prompt channel (LesionLocator's extra input)."""
    channels = dataset_json.get("channel_names", dataset_json.get("modality", {"0": "CT"}))
    if not isinstance(channels, dict) or not channels:
        raise PlansError(f"{where}: 'channel_names' must be a non-empty object")
    return len(channels) + 1


def build_network(architecture: Architecture, in_channels: int, out_channels: int,
                  deep_supervision: bool = False, device=None, initialize: bool = True):
    """The ``torch.nn.Module`` of a checked :class:`Architecture`.

    Classes come only from the allow-list tables. ``device='meta'`` builds the shapes without
    memory (to compare with a checkpoint first). ``initialize``: nnU-Net's He initialisation (as
    ``get_network_from_plans(allow_init=True)``; it draws the same random numbers); pointless
    when weights are loaded right after."""
    import torch
    from dynamic_network_architectures.architectures import unet
    from dynamic_network_architectures.building_blocks import residual

    kwargs = dict(architecture.kwargs)
    for key in ("conv_op", "norm_op", "dropout_op", "nonlin"):
        if kwargs.get(key) is not None:
            kwargs[key] = getattr(torch.nn, kwargs[key])
    if kwargs.get("block") is not None:
        kwargs["block"] = getattr(residual, kwargs["block"])
    kwargs["deep_supervision"] = deep_supervision
    cls = getattr(unet, architecture.class_name)
    if device is not None:
        with torch.device(device):
            network = cls(input_channels=in_channels, num_classes=out_channels, **kwargs)
    else:
        network = cls(input_channels=in_channels, num_classes=out_channels, **kwargs)
    if initialize and hasattr(network, "initialize") and device != "meta":
        network.apply(network.initialize)
    return network


# --------------------------------------------------------------------------- writing plans
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1},
                "numTraining": 0, "file_ending": ".nii.gz"}
CT_INTENSITIES = {  # upstream's published LesionLocatorSeg plans
    "max": 3603.951904296875, "mean": -63.00682013436269, "median": 37.23089790344238,
    "min": -1411.0, "percentile_00_5": -918.0, "percentile_99_5": 723.0, "std": 282.3602283405916,
}


def make_plans(features, blocks, patch, spacing=(1.0, 0.8, 0.8), resampling="resample_data_or_seg_to_shape",
               name="LesionLocatorSeg", intensities=None) -> dict:
    """nnU-Net v2 plans (one '3d_fullres' configuration) for a ResidualEncoderUNet.

    ``features``/``blocks`` per stage; ``patch`` and ``spacing`` (mm) in (z, y, x).
    """
    n = len(features)
    if resampling == "resample_torch_fornnunet":
        data_kw = {"is_seg": False, "memefficient_seg_resampling": True, "force_separate_z": False}
        prob_kw = dict(data_kw)
    else:
        data_kw = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
        prob_kw = {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None}
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [310.0, 512.0, 513.0],
        "spacing": list(spacing), "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
        "resampling_fn_data": resampling, "resampling_fn_seg": resampling,
        "resampling_fn_data_kwargs": data_kw, "resampling_fn_seg_kwargs": dict(data_kw, is_seg=True),
        "resampling_fn_probabilities": resampling, "resampling_fn_probabilities_kwargs": prob_kw,
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
            "arch_kwargs": {
                "n_stages": n, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[3, 3, 3]] * n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                "n_blocks_per_stage": list(blocks), "n_conv_per_stage_decoder": [1] * (n - 1),
                "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": True,
    }
    return {
        "dataset_name": name, "plans_name": "nnUNetResEncUNetLPlans",
        "original_median_spacing_after_transp": [3.0, 0.7890625, 0.7890625],
        "original_median_shape_after_transp": [126, 512, 512], "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {"3d_fullres": config}, "experiment_planner_used": "nnUNetPlannerResEncL",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(intensities or CT_INTENSITIES)},
    }
