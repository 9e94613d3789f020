"""Random-weight LesionLocator checkpoints in the official folder layout, for tests.

* :func:`build_tiny_checkpoint`: a 3-stage residual encoder U-Net (a few MB),
  patch 32x48x48, for fast tests.
* :func:`build_resencl_checkpoint`: the released architecture and plans
  (ResEnc-L, 6 stages [32, 64, 128, 256, 320, 320], blocks [1, 3, 4, 6, 6, 6],
  patch 160x224x224, spacing 1.0x0.8x0.8 mm, CT normalisation values from
  upstream's published plans), random weights, about 400 MB per fold.

The checkpoint dicts carry the same entries as nnU-Net/LesionLocator training
writes (network_weights, optimizer_state, grad_scaler_state, logging with numpy
scalars, _best_ema, current_epoch, init_args, trainer_name,
inference_allowed_mirroring_axes). Weights are perturbed (norm affine, biases, a
stronger prompt input) so that the prompt visibly changes the output.

Run as a script: ``python Testing/build_test_models.py OUT_DIR [--resencl]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from LesionLocatorLib.model import build_network  # noqa: E402

CT_INTENSITIES = {  # upstream's published LesionLocatorSeg plans
    "max": 3603.951904296875, "mean": -63.00682013436269, "median": 37.23089790344238,
    "min": -1411.0, "percentile_00_5": -918.0, "percentile_99_5": 723.0, "std": 282.3602283405916,
}
DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1},
                "numTraining": 0, "file_ending": ".nii.gz"}


def make_plans(features, blocks, patch, spacing=(1.0, 0.8, 0.8), resampling="resample_data_or_seg_to_shape",
               name="LesionLocatorSeg"):
    """nnU-Net v2 plans for a ResidualEncoderUNet with the given stages."""
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
        "resampling_fn_data_kwargs": data_kw,
        "resampling_fn_seg_kwargs": dict(data_kw, is_seg=True),
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
        "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {"0": CT_INTENSITIES},
    }


def perturb(network: torch.nn.Module, seed: int) -> dict:
    """Random weights whose output depends on the prompt channel."""
    g = torch.Generator().manual_seed(seed)
    state = network.state_dict()
    out = {}
    for k, v in state.items():
        v = v.clone()
        if v.is_floating_point():
            if k.endswith("bias"):
                v = torch.randn(v.shape, generator=g) * 0.2
            elif v.dim() == 1 and k.endswith("weight"):  # norm affine
                v = 1.0 + torch.randn(v.shape, generator=g) * 0.2
        out[k] = v
    first = [k for k, v in out.items() if v.dim() == 5 and v.shape[1] == 2][0]
    out[first][:, 1] *= 4.0  # make the prompt channel matter
    return out


def checkpoint_dict(weights: dict, plans: dict, trainer: str = "LesionLocatorTrainerSegment", fold: int = 0) -> dict:
    return {
        "network_weights": weights,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.99, "nesterov": True,
                                                           "weight_decay": 3e-05, "params": [0, 1]}]},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
                    "train_losses": [np.float32(-0.4)], "epoch_start_timestamps": [1.0]},
        "_best_ema": np.float64(0.5),
        "current_epoch": 1000,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold,
                      "dataset_json": DATASET_JSON, "device": torch.device("cpu")},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }


def track_net_weights(unet_weights: dict, seed: int) -> dict:
    """A TrackNet state dict as in official LesionLocatorTrack checkpoints: the U-Net under
    'unet.', a (placeholder, random) registration network under 'reg_net.', and the
    'unet_patch_size' buffer."""
    g = torch.Generator().manual_seed(seed)
    out = {f"unet.{k}": v for k, v in unet_weights.items()}
    out["reg_net.regis_net.netPhi.down_convs.0.weight"] = torch.randn((16, 2, 3, 3, 3), generator=g) * 0.1
    out["reg_net.regis_net.netPhi.down_convs.0.bias"] = torch.zeros(16)
    return out


def write_model_folder(folder: Path, plans: dict, folds=(0,), seed: int = 0,
                       trainer: str = "LesionLocatorTrainerSegment") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON, indent=1))
    net = build_network(plans, "3d_fullres", DATASET_JSON)
    for f in folds:
        torch.manual_seed(seed + f)
        net = build_network(plans, "3d_fullres", DATASET_JSON)
        weights = perturb(net, seed + 1000 * f)
        if trainer == "LesionLocatorTrainerTrack":
            weights = track_net_weights(weights, seed + f)
            weights["unet_patch_size"] = torch.tensor(plans["configurations"]["3d_fullres"]["patch_size"])
        (folder / f"fold_{f}").mkdir(exist_ok=True)
        torch.save(checkpoint_dict(weights, plans, trainer, f), folder / f"fold_{f}" / "checkpoint_final.pth")
    return folder


TINY = dict(features=(4, 8, 16), blocks=(1, 1, 1), patch=(32, 48, 48))
RESENC_L = dict(features=(32, 64, 128, 256, 320, 320), blocks=(1, 3, 4, 6, 6, 6), patch=(160, 224, 224))


def build_tiny_checkpoint(root: Path, folds=(0,), seed: int = 0, resampling="resample_data_or_seg_to_shape",
                          spacing=(1.0, 0.8, 0.8)) -> Path:
    """Write a tiny model root ``root/LesionLocatorCheckpoint`` (point, box and Track models)."""
    ckpt = Path(root) / "LesionLocatorCheckpoint"
    plans = make_plans(TINY["features"], TINY["blocks"], TINY["patch"], spacing, resampling)
    for i, sub in enumerate(("point_optimized", "bbox_optimized")):
        write_model_folder(ckpt / "LesionLocatorSeg" / sub, plans, folds, seed + i)
    track_plans = make_plans(TINY["features"], TINY["blocks"], TINY["patch"], (3.0, 0.84, 0.84), resampling,
                             name="LesionLocatorTrack")
    write_model_folder(ckpt / "LesionLocatorTrack", track_plans, folds, seed + 2, trainer="LesionLocatorTrainerTrack")
    return ckpt


def build_resencl_checkpoint(root: Path, folds=(0,), seed: int = 0, prompt_types=("point",)) -> Path:
    """Write the released ResEnc-L architecture with random weights (~400 MB per fold)."""
    ckpt = Path(root) / "LesionLocatorCheckpoint"
    plans = make_plans(RESENC_L["features"], RESENC_L["blocks"], RESENC_L["patch"])
    subs = {"point": "point_optimized", "box": "bbox_optimized"}
    for i, t in enumerate(prompt_types):
        write_model_folder(ckpt / "LesionLocatorSeg" / subs[t], plans, folds, seed + 17 * i)
    return ckpt


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--resencl", action="store_true", help="the released ResEnc-L architecture (large)")
    ap.add_argument("--folds", nargs="+", type=int, default=[0])
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    fn = build_resencl_checkpoint if a.resencl else build_tiny_checkpoint
    print(fn(Path(a.out), folds=a.folds))
