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

from LesionLocatorLib.model import build_network, checkpoint_dict  # noqa: E402
from LesionLocatorLib.plans import DATASET_JSON, make_plans  # noqa: E402

NNUNET_LOG = {  # as nnU-Net's training log: numpy scalars, which need allow-listed globals to unpickle
    "mean_fg_dice": [np.float64(0.5)], "ema_fg_dice": [np.float64(0.5)],
    "train_losses": [np.float32(-0.4)], "epoch_start_timestamps": [1.0],
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
        torch.save(checkpoint_dict(weights, plans, trainer, f, logging=NNUNET_LOG, epoch=1000),
                   folder / f"fold_{f}" / "checkpoint_final.pth")
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


def build_unigradicon_track_model(folder: Path, seed: int = 0, displacement_scale: float = 0.05) -> Path:
    """A tiny LesionLocatorTrack model folder whose checkpoint holds a real uniGradICON
    network under 'reg_net.' (random weights, needs the optional ``unigradicon`` package)
    beside the tiny U-Net under 'unet.', as official Track checkpoints do (~280 MB).

    uniGradICON initialises its last layers to zero (identity map); they get random
    weights of ``displacement_scale`` here so that the network outputs a deformation."""
    import unigradicon

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plans = make_plans(TINY["features"], TINY["blocks"], TINY["patch"], (3.0, 0.84, 0.84), name="LesionLocatorTrack")
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON, indent=1))
    torch.manual_seed(seed)
    weights = perturb(build_network(plans, "3d_fullres", DATASET_JSON), seed)
    weights = {f"unet.{k}": v for k, v in weights.items()}
    reg = unigradicon.make_network([1, 1, 80, 80, 80], include_last_step=True)  # keys do not depend on the shape
    g = torch.Generator().manual_seed(seed)
    for k, v in reg.state_dict().items():
        if k.endswith("lastConv.weight"):
            v = torch.randn(v.shape, generator=g) * displacement_scale
        weights[f"reg_net.{k}"] = v
    weights["unet_patch_size"] = torch.tensor(plans["configurations"]["3d_fullres"]["patch_size"])
    (folder / "fold_0").mkdir(exist_ok=True)
    torch.save(checkpoint_dict(weights, plans, "LesionLocatorTrainerTrack", 0, logging=NNUNET_LOG, epoch=1000),
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


def build_resencl_checkpoint(root: Path, folds=(0,), seed: int = 0, prompt_types=("point",)) -> Path:
    """Write the released ResEnc-L architecture with random weights (~400 MB per fold)."""
    ckpt = Path(root) / "LesionLocatorCheckpoint"
    plans = make_plans(RESENC_L["features"], RESENC_L["blocks"], RESENC_L["patch"])
    subs = {"point": "point_optimized", "box": "bbox_optimized"}
    for i, t in enumerate(prompt_types):
        if t == "prev_mask":  # the tracking model (its registration network is not included)
            write_model_folder(ckpt / "LesionLocatorTrack", make_plans(
                RESENC_L["features"], RESENC_L["blocks"], RESENC_L["patch"], name="LesionLocatorTrack"), folds,
                seed + 17 * i, trainer="LesionLocatorTrainerTrack")
        else:
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
