"""``lesionlocator train`` and ``lesionlocator synth``: the command-line side of the training package.

Registered by :func:`LesionLocatorLib.cli.build_parser` when this package is present (the Slicer
extension does not ship it). Nothing heavy is imported until a command runs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..inputs import UsageError, device_value, non_negative, probability


def _box_jitter(text: str):
    """``--box-jitter-mm``: millimetres (>= 0), or 'legacy' (None)."""
    if text == "legacy":
        return None
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 or 'legacy', got {text}")
    return value


def add_training_commands(sub, parents, formatter) -> None:
    """Register ``synth`` and ``train`` on the ``lesionlocator`` sub-parsers."""
    y = sub.add_parser("synth", parents=parents, formatter_class=formatter,
                       help="synthetic lesions and follow-ups from a lesion-free CT (supplement sec. 7)")
    y.add_argument("--ct", required=True, help="lesion-free CT (Hounsfield units): an image file or a folder of DICOM "
                   "files")
    y.add_argument("--series", nargs="+", default=[], metavar="UID",
                   help="Series Instance UID to read when the --ct folder holds several DICOM series")
    y.add_argument("--lesions", type=int, default=5, help="lesions to insert into the baseline")
    y.add_argument("--followups", type=int, default=2, help="follow-up scans to make")
    y.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same case)")
    y.add_argument("--name", default=None, help="case name (default: <ct>_synth_s<seed>)")
    y.add_argument("-o", required=True, help="output folder")
    y.add_argument("--disable_progress_bar", action="store_true", help="no progress bar")
    y.set_defaults(func=cmd_synth)

    r = sub.add_parser("train", parents=parents, formatter_class=formatter,
                       help="train or fine-tune a promptable model; writes the official layout")
    r.add_argument("--images", required=True, help="folder of CT images")
    r.add_argument("--labels", required=True, help="folder of instance label images with the same names")
    r.add_argument("--val-images", "--val_images", dest="val_images", default=None,
                   help="folder of validation CT images (default: the training images)")
    r.add_argument("--val-labels", "--val_labels", dest="val_labels", default=None,
                   help="folder of validation label images with the same names")
    r.add_argument("-o", required=True, help="output folder (resumes if it holds checkpoint_latest.pth)")
    r.add_argument("--plans", default=None, help="plans.json to use (default: a small ResEnc U-Net from the flags)")
    r.add_argument("--features", nargs="+", type=int, default=[16, 32, 64, 128], help="channels per stage")
    r.add_argument("--blocks", nargs="+", type=int, default=[1, 2, 2, 2], help="residual blocks per stage")
    r.add_argument("--patch", nargs=3, type=int, default=[64, 96, 96], help="patch size z y x (voxels)")
    r.add_argument("--spacing", nargs=3, type=float, default=[2.0, 1.5, 1.5], help="model spacing z y x (mm)")
    r.add_argument("--epochs", type=int, default=50, help="epochs (the learning-rate schedule spans them)")
    r.add_argument("--stop-after-epoch", "--stop_after_epoch", dest="stop_after_epoch", type=int, default=None,
                   help="end this run after that epoch (the learning-rate schedule still spans --epochs); "
                        "run again to resume, e.g. with other training data")
    r.add_argument("--vanish-prob", "--vanish_prob", dest="vanish_prob", type=probability, default=0.0,
                   help="share of previous-mask samples showing a vanished lesion (prompt on lesion-free "
                        "tissue, empty target), so tracking learns to report vanished lesions")
    r.add_argument("--vanish-tissue-hu", "--vanish_tissue_hu", dest="vanish_tissue_hu", type=float, default=None,
                   help="vanished-lesion samples: put the previous mask on tissue whose median is within this "
                        "many HU of the lesion's surroundings (default: anywhere in the body)")
    r.add_argument("--vanish-fragment-prob", "--vanish_fragment_prob", dest="vanish_fragment_prob", type=probability,
                   default=0.0, help="share of vanished-lesion samples whose previous mask is a small fragment "
                                     "(what a previous false positive leaves as the next prompt)")
    r.add_argument("--low-res-prob", "--low_res_prob", dest="low_res_prob", type=probability, default=0.0,
                   help="share of training samples made to look like scans coarser than the model spacing "
                        "(down- and up-sampled image, 0.33-1 zoom per axis)")
    r.add_argument("--iterations", type=int, default=50, help="iterations per epoch")
    r.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=2, help="samples per step")
    r.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="sgd: nnU-Net's (Nesterov, momentum 0.99, --lr 1e-2); adamw: try --lr 1e-3")
    r.add_argument("--lr", type=float, default=1e-2, help="initial learning rate (poly schedule)")
    r.add_argument("--box-jitter-mm", "--box_jitter_mm", dest="box_jitter_mm", type=_box_jitter, default=8.0,
                   help="box prompts: the lesion's bounding box grown by U[0, this] mm per axis (default 8); "
                        "'legacy': U[0, 10] model voxels per side (training runs before 2026-12)")
    r.add_argument("--prompt-types", "--prompt_types", dest="prompt_types", nargs="+",
                   choices=["point", "box", "mask"], default=["point", "box", "mask"],
                   help="prompt types simulated, drawn with equal odds (default: all three; 'box' alone "
                        "trains a box-prompt model such as LesionLocatorSeg/bbox_optimized)")
    r.add_argument("--outline-weight", "--outline_weight", dest="outline_weight", type=non_negative,
                   default=0.0, help="extra cross-entropy weight of each lesion's outermost voxel layer "
                                     "(partial-volume voxels; default 0: nnU-Net's Dice + CE)")
    r.add_argument("--tight-box-prob", "--tight_box_prob", dest="tight_box_prob", type=probability, default=0.0,
                   help="share of box prompts that are the lesion's exact bounding box, not grown (default 0)")
    r.add_argument("--cpu-bf16", "--cpu_bf16", dest="cpu_bf16", action="store_true",
                   help="on the CPU, train in bfloat16 autocast (1.6-1.8x faster with AVX512-BF16/AMX)")
    r.add_argument("--intensity-augmentation", "--intensity_augmentation", dest="intensity_augmentation",
                   action="store_true", help="nnU-Net's intensity augmentations (noise, blur, brightness, "
                                             "contrast, gamma) of the image channel")
    r.add_argument("--deep-supervision-targets", "--deep_supervision_targets", dest="deep_supervision_targets",
                   choices=["max_pool", "nearest"], default="max_pool",
                   help="targets of the coarse decoder outputs: max_pool (default; every run before run12) "
                        "or nearest (every 2nd voxel from the first: where the network's coarse voxels are centred)")
    r.add_argument("--seed", type=int, default=0, help="random seed of the sampling and the initialisation")
    r.add_argument("--init", default=None, help="checkpoint to fine-tune from (same architecture)")
    r.add_argument("-device", "--device", type=device_value, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    r.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import json as _json

    from .train import TrainingDataError, TrainOptions, find_pairs, make_plans, train

    try:  # option values (--epochs 0, --lr 0, ...) and training folders: a message, not a traceback
        options = TrainOptions(
            epochs=args.epochs, iterations_per_epoch=args.iterations, batch_size=args.batch_size,
            initial_lr=args.lr, optimizer=args.optimizer, seed=args.seed,
            prompt_types=tuple(dict.fromkeys(args.prompt_types)), box_jitter_mm=args.box_jitter_mm,
            tight_box_prob=args.tight_box_prob, vanish_prob=args.vanish_prob, vanish_tissue_hu=args.vanish_tissue_hu,
            vanish_fragment_prob=args.vanish_fragment_prob, low_res_prob=args.low_res_prob,
            intensity_augmentation=args.intensity_augmentation, deep_supervision_targets=args.deep_supervision_targets,
            outline_weight=args.outline_weight, cpu_bf16=args.cpu_bf16)
        pairs = find_pairs(args.images, args.labels)
        val = find_pairs(args.val_images, args.val_labels) if args.val_images else None
    except (ValueError, TrainingDataError) as e:
        raise UsageError(str(e)) from None
    if args.plans:
        plans = _json.loads(Path(args.plans).read_text())
    else:
        plans = make_plans(args.features, args.blocks, args.patch, args.spacing)
    root = train(pairs, args.o, plans, options, val_pairs=val, init_from=args.init, device=args.device,
                 stop_after_epoch=args.stop_after_epoch)
    if root is None:
        print(f"stopped after epoch {args.stop_after_epoch} of {args.epochs}; the same command without "
              f"--stop-after-epoch (or with a later one) resumes from {Path(args.o) / 'checkpoint_latest.pth'}")
    else:
        print(f"model written to {root} (learning curves: {Path(args.o) / 'progress.png'})")
    return 0


def cmd_synth(args) -> int:
    from .synth import run_synth
    from ..cli import progress_bar
    bar, update = progress_bar(not args.disable_progress_bar, "synth")
    try:
        path = run_synth(args.ct, lesions=args.lesions, followups=args.followups, seed=args.seed, out=args.o,
                         name=args.name, progress=update, series=args.series)
    except ValueError as e:  # no body in the CT, too many lesions for it
        raise UsageError(str(e)) from None
    finally:
        bar.close()
    print(f"wrote {path} and its images/labels in {Path(args.o)}")
    return 0
