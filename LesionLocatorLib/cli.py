"""The ``lesionlocator`` command.

``lesionlocator segment`` takes the same flags, inputs and output names as
upstream's ``LesionLocator_segment`` (so switching is a change of command name),
plus ``--world`` (our LPS world-coordinate prompt JSON), ``--save-probabilities``
and ``--device auto``. ``lesionlocator prompts`` turns label images into prompt
JSON like upstream's ``LesionLocator_create_prompt_json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _strip_ending(name: str) -> str:
    for e in IMAGE_ENDINGS + (".json",):
        if name.endswith(e):
            return name[: -len(e)]
    return name


def _list_images(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(IMAGE_ENDINGS))


class UsageError(ValueError):
    """A command line that cannot be run (mismatched inputs, missing files)."""


def pair_inputs(image_arg: str, prompt_arg: str) -> list:
    """(image path, prompt path) pairs: one file each, or two folders matched by name."""
    img, prm = Path(image_arg), Path(prompt_arg)
    if not img.exists():
        raise FileNotFoundError(f"input not found: {img}")
    if not prm.exists():
        raise FileNotFoundError(f"prompt not found: {prm}")
    if img.is_file():
        if prm.is_dir():
            raise UsageError("if -i is a file then -p must be a file too, not a folder")
        return [(img, prm)]
    if not prm.is_dir():
        raise UsageError("if -i is a folder then -p must be a folder of prompts named like the images")
    images = {_strip_ending(p.name): p for p in _list_images(img)}
    if not images:
        raise UsageError(f"no images ({', '.join(IMAGE_ENDINGS)}) in {img}")
    prompts = {_strip_ending(p.name): p for p in sorted(prm.iterdir())
               if p.is_file() and p.name.endswith(IMAGE_ENDINGS + (".json",))}
    orphans = sorted(set(prompts) - set(images))
    if orphans:
        raise UsageError(f"prompt file(s) with no image of the same name in {img}: "
                         + ", ".join(prompts[o].name for o in orphans))
    missing = sorted(set(images) - set(prompts))
    if missing:
        raise UsageError(f"image(s) with no prompt file of the same name in {prm}: "
                         + ", ".join(images[m].name for m in missing))
    return [(images[k], prompts[k]) for k in sorted(images)]


def load_prompts(path: Path, prompt_type: str, world: bool):
    """Prompts from a JSON file, or derived from a label image (instance or binary)."""
    from .image import read_image
    from .prompts import prompts_from_labels, read_prompt_file

    if path.name.endswith(".json"):
        return read_prompt_file(path, world=world or None)
    labels = read_image(path).array
    label_type = "semantic" if set(np.unique(labels)) <= {0, 1} else "instance"
    return prompts_from_labels(labels, prompt_type, label_type)


def _progress_bar(enabled: bool, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, disable=not enabled, unit="%", leave=False)

    def update(fraction: float, message: str) -> None:
        bar.n = int(round(100 * fraction))
        bar.set_postfix_str(message)
        bar.refresh()
    return bar, update


def cmd_segment(args) -> int:
    from .image import read_image, write_image
    from .model import load_model
    from .predict import segment

    pairs = pair_inputs(args.i, args.p)
    out = Path(args.o)
    out.mkdir(parents=True, exist_ok=True)
    folds = None if args.f is None else [f if f == "all" else int(f) for f in args.f]
    tta = False if args.disable_tta else (True if args.enable_tta else None)
    model = load_model(_resolve_model(args.m), args.t, folds=folds, device=args.device, tta=tta)
    print(f"model: {model.folder} (folds {model.folds}, device {model.device}, "
          f"test-time mirroring {'on' if model.use_tta else 'off'})", file=sys.stderr)
    for image_path, prompt_path in pairs:
        case = _strip_ending(image_path.name)
        ending = next(e for e in IMAGE_ENDINGS if image_path.name.endswith(e))
        final = out / f"{case}_lesions{ending}"
        if args.continue_prediction and final.exists():
            print(f"{case}: already predicted, skipping (--continue_prediction)", file=sys.stderr)
            continue
        image = read_image(image_path)
        prompts = load_prompts(prompt_path, args.t, args.world)
        bar, update = _progress_bar(not args.disable_progress_bar, case)
        try:
            result = segment(image, prompts, model, progress=update, step_size=args.step_size)
        finally:
            bar.close()
        for pid, mask in result.masks.items():
            write_image(image.with_array(mask.astype(np.uint8)), out / f"{case}_lesion_{pid}{ending}")
            if args.save_probabilities:
                _save_npz(out / f"{case}_lesion_{pid}.npz", result.probabilities[pid])
        write_image(result.labels, final)
        sizes = ", ".join(f"{pid}: {int(m.sum())} voxels" for pid, m in result.masks.items())
        print(f"{case}: {len(result.masks)} lesion(s) -> {final} ({sizes})")
    return 0


def _save_npz(path: Path, probabilities: np.ndarray) -> None:
    from .files import atomic_output
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probabilities=probabilities.astype(np.float16))


def _resolve_model(name_or_path):
    from .zoo import resolve_model
    return resolve_model(name_or_path)


def cmd_prompts(args) -> int:
    from .image import read_image
    from .prompts import prompts_from_labels, write_upstream_json, write_world_json, Point, Box

    src = Path(args.i)
    files = _list_images(src) if src.is_dir() else [src]
    if not files:
        raise UsageError(f"no label images in {src}")
    out = Path(args.o)
    for f in files:
        img = read_image(f)
        name = _strip_ending(f.name) + ".json"
        for kind, sub in (("point", "points"), ("box", "boxes")):
            vps = prompts_from_labels(img.array, kind, args.label_type)
            if args.world:
                world = []
                for vp in vps:
                    if kind == "point":
                        world.append(Point(vp.id, tuple(img.index_to_world(vp.coords))))
                    else:
                        c = np.asarray(vp.coords, float).reshape(3, 2)
                        corners = [c[:, 0], c[:, 1] - 1]
                        world.append(Box.from_points(vp.id, img.index_to_world(np.array(corners))))
                write_world_json(world, out / sub / name)
            else:
                write_upstream_json(vps, out / sub / name)
        print(f"{f.name}: {len(vps)} lesion(s) -> {out / 'points' / name}, {out / 'boxes' / name}")
    return 0


def _track_prompts(paths, prompt_type: str, baseline, world: bool):
    from .image import read_image
    from .prompts import MaskPrompt

    paths = [Path(p) for p in paths]
    if prompt_type != "prev_mask":
        if len(paths) != 1:
            raise UsageError("point/box tracking takes one prompt file (-p)")
        return load_prompts(paths[0], prompt_type, world)
    if any(p.name.endswith(".json") for p in paths):
        raise UsageError("-t prev_mask needs label images as prompts, not JSON")
    if len(paths) == 1:
        labels = read_image(paths[0])
        if set(np.unique(labels.array)) <= {0, 1}:
            from scipy import ndimage
            inst, _ = ndimage.label(labels.array > 0, structure=np.ones((3, 3, 3)))
            labels = labels.with_array(inst.astype(np.uint16))
        return labels
    import re
    natural = sorted(paths, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    return [MaskPrompt(i, read_image(p), name=p.name) for i, p in enumerate(natural, start=1)]


def cmd_track(args) -> int:
    from .image import ImageError, read_image, write_image
    from .modelfolder import ModelSpec
    from .report import format_table, growth_plot, write_table
    from .study import scan_datetime, track_study

    out = Path(args.o)
    folds = None if args.f is None else [f if f == "all" else int(f) for f in args.f]
    baseline = read_image(args.bl)
    paths, images, failed = [Path(args.bl)], [baseline], []
    for fu in args.fu:
        try:
            images.append(read_image(fu))
            paths.append(Path(fu))
        except (ImageError, FileNotFoundError) as e:
            failed.append(fu)
            print(f"lesionlocator track: error: follow-up {fu} could not be loaded, skipped: {e}", file=sys.stderr)
    if len(images) < 2:
        raise UsageError("no follow-up scan could be loaded; nothing to track")
    prompts = _track_prompts(args.p, args.t, baseline, args.world)
    names = [_strip_ending(p.name) for p in paths]
    model = ModelSpec(str(_resolve_model(args.m)), tuple(folds) if folds is not None else None, args.device)
    bar, update = _progress_bar(not args.disable_progress_bar, "tracking")
    try:
        study = track_study(images, prompts, model, names=names, dates=[scan_datetime(p) for p in paths],
                            registration=args.registration, min_volume_ml=args.min_volume_ml,
                            min_prompt_fraction=args.min_prompt_fraction, progress=update)
    finally:
        bar.close()
    for message in study.warnings:
        print(f"lesionlocator track: warning: {message}", file=sys.stderr)
    t0 = time.perf_counter()
    for t, (path, name) in enumerate(zip(paths, names)):
        ending = next(e for e in IMAGE_ENDINGS if path.name.endswith(e))
        if t == 0 and args.t == "prev_mask":
            continue  # the baseline masks are the user's input
        for pid, mask in study.masks[t].items():
            write_image(images[t].with_array(mask.astype(np.uint8)), out / f"{name}_lesion_{pid}{ending}")
        write_image(study.labels[t], out / f"{name}_lesions{ending}")
    write_table(study.rows, out / "lesions")
    growth_plot(study.rows, out / "growth.png")
    study.timings["writing"] = time.perf_counter() - t0
    print(format_table([{k: r[k] for k in ("lesion_id", "timepoint", "status", "volume_ml", "long_axis_mm",
                                          "short_axis_mm", "volume_change_vs_baseline_pct",
                                          "recist_information_only")} for r in study.rows], digits=2))
    print("time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in study.timings.items()))
    print(f"wrote {out / 'lesions.csv'}, {out / 'lesions.json'}, {out / 'growth.png'}")
    return 1 if failed else 0


def _box_jitter(text: str):
    """``--box-jitter-mm``: millimetres (>= 0), or 'legacy' (None)."""
    if text == "legacy":
        return None
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 or 'legacy', got {text}")
    return value


def _non_negative(text: str) -> float:
    """A weight: a number >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    """A share of training samples: a number in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def cmd_train(args) -> int:
    import json as _json
    from .training.train import TrainingDataError, TrainOptions, find_pairs, make_plans, train

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


def cmd_demo(args) -> int:
    from .demo import run_demo
    bar, update = _progress_bar(not args.disable_progress_bar, "demo")
    try:
        run_demo(args.o, model=args.m, device=args.device, registration=args.registration, progress=update)
    finally:
        bar.close()
    return 0


def cmd_synth(args) -> int:
    from .training.synth import run_synth
    bar, update = _progress_bar(not args.disable_progress_bar, "synth")
    try:
        path = run_synth(args.ct, lesions=args.lesions, followups=args.followups, seed=args.seed, out=args.o,
                         name=args.name, progress=update)
    except ValueError as e:  # no body in the CT, too many lesions for it
        raise UsageError(str(e)) from None
    finally:
        bar.close()
    print(f"wrote {path} and its images/labels in {Path(args.o)}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import aggregate, evaluate_folders
    from .report import format_table, write_table

    rows = evaluate_folders(args.pred, args.gt, tolerance_mm=args.tolerance, match_mm=args.match)
    print(format_table(rows))
    summary = aggregate(rows)
    print("\n" + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    out = Path(args.o) if args.o else Path(args.pred) / "evaluation"
    csv_path, json_path = write_table(rows, out)
    print(f"wrote {csv_path} and {json_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lesionlocator", description="Promptable lesion segmentation and tracking "
                                 "in CT (LesionLocator, CVPR 2025). World coordinates are LPS mm.")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("segment", help="segment lesions from point or box prompts (upstream LesionLocator_segment)")
    s.add_argument("-i", required=True, help="input image file or folder (.nii.gz, .nii, .nrrd, .mha)")
    s.add_argument("-o", required=True, help="output folder (created if missing)")
    s.add_argument("-p", required=True, help="prompt file or folder: upstream JSON (voxel z,y,x), our world JSON, "
                   "or an instance/binary label image; files named like their images")
    s.add_argument("-t", required=True, choices=["point", "box"], help="prompt type")
    s.add_argument("-m", default=None, help="model: a LesionLocatorCheckpoint folder or a model name")
    s.add_argument("-f", nargs="+", default=None, help="folds to use (default: all present)")
    s.add_argument("-step_size", "--step_size", type=float, default=0.5, help="sliding-window step (fraction of patch)")
    s.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    s.add_argument("--enable_tta", action="store_true", help="mirroring test-time augmentation also on CPU")
    s.add_argument("--continue_prediction", "--c", action="store_true", help="skip cases already predicted")
    s.add_argument("-device", "--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N, mps")
    s.add_argument("--world", action="store_true", help="prompt JSON is in LPS world millimetres")
    s.add_argument("--save-probabilities", "--save_probabilities", dest="save_probabilities", action="store_true",
                   help="also write each lesion's probability map (.npz)")
    s.add_argument("--disable_progress_bar", action="store_true")
    s.add_argument("--verbose", action="store_true")
    s.add_argument("-npp", type=int, default=None, help="accepted for upstream compatibility; unused")
    s.add_argument("-nps", type=int, default=None, help="accepted for upstream compatibility; unused")
    s.set_defaults(func=cmd_segment)

    p = sub.add_parser("prompts", help="label image(s) -> point and box prompt JSON (upstream format)")
    p.add_argument("-i", required=True, help="label image or folder of label images")
    p.add_argument("-o", required=True, help="output folder; writes points/ and boxes/")
    p.add_argument("-label_type", "--label_type", choices=["instance", "semantic"], default="instance")
    p.add_argument("--world", action="store_true", help="write our LPS world JSON instead of voxel JSON")
    p.set_defaults(func=cmd_prompts)

    t = sub.add_parser("track", help="segment and track lesions through follow-ups (upstream LesionLocator_track)")
    t.add_argument("-bl", required=True, help="baseline scan")
    t.add_argument("-fu", required=True, nargs="+", help="follow-up scans, in time order")
    t.add_argument("-p", required=True, nargs="+", help="baseline prompt JSON (point/box), or for prev_mask one "
                   "instance label image or several binary masks (one per lesion)")
    t.add_argument("-t", default="prev_mask", choices=["point", "box", "prev_mask"], help="prompt type")
    t.add_argument("-o", required=True, help="output folder")
    t.add_argument("-m", default=None, help="model: a LesionLocatorCheckpoint folder or a model name")
    t.add_argument("-f", nargs="+", default=None, help="folds (default: all present)")
    t.add_argument("-device", "--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    t.add_argument("--registration", default="simpleitk", choices=["simpleitk", "greedy", "unigradicon", "none"])
    t.add_argument("--min-volume-ml", "--min_volume_ml", dest="min_volume_ml", type=float, default=0.0,
                   help="a follow-up mask smaller than this (ml) counts as vanished (default 0: any voxel is tracked)")
    t.add_argument("--min-prompt-fraction", "--min_prompt_fraction", dest="min_prompt_fraction", type=float,
                   default=0.0, help="a follow-up mask smaller than this fraction of its warped previous mask "
                   "counts as vanished (default 0: off)")
    t.add_argument("--world", action="store_true", help="prompt JSON is in LPS world millimetres")
    t.add_argument("--disable_progress_bar", action="store_true")
    t.set_defaults(func=cmd_track)

    y = sub.add_parser("synth", help="synthetic lesions and follow-ups from a lesion-free CT (supplement sec. 7)")
    y.add_argument("--ct", required=True, help="lesion-free CT (Hounsfield units)")
    y.add_argument("--lesions", type=int, default=5)
    y.add_argument("--followups", type=int, default=2)
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--name", default=None, help="case name (default: <ct>_synth_s<seed>)")
    y.add_argument("-o", required=True, help="output folder")
    y.add_argument("--disable_progress_bar", action="store_true")
    y.set_defaults(func=cmd_synth)

    r = sub.add_parser("train", help="train or fine-tune a promptable model; writes the official layout")
    r.add_argument("--images", required=True, help="folder of CT images")
    r.add_argument("--labels", required=True, help="folder of instance label images with the same names")
    r.add_argument("--val-images", "--val_images", dest="val_images", default=None)
    r.add_argument("--val-labels", "--val_labels", dest="val_labels", default=None)
    r.add_argument("-o", required=True, help="output folder (resumes if it holds checkpoint_latest.pth)")
    r.add_argument("--plans", default=None, help="plans.json to use (default: a small ResEnc U-Net from the flags)")
    r.add_argument("--features", nargs="+", type=int, default=[16, 32, 64, 128])
    r.add_argument("--blocks", nargs="+", type=int, default=[1, 2, 2, 2])
    r.add_argument("--patch", nargs=3, type=int, default=[64, 96, 96], help="patch size z y x (voxels)")
    r.add_argument("--spacing", nargs=3, type=float, default=[2.0, 1.5, 1.5], help="model spacing z y x (mm)")
    r.add_argument("--epochs", type=int, default=50)
    r.add_argument("--stop-after-epoch", "--stop_after_epoch", dest="stop_after_epoch", type=int, default=None,
                   help="end this run after that epoch (the learning-rate schedule still spans --epochs); "
                        "run again to resume, e.g. with other training data")
    r.add_argument("--vanish-prob", "--vanish_prob", dest="vanish_prob", type=_probability, default=0.0,
                   help="share of previous-mask samples showing a vanished lesion (prompt on lesion-free "
                        "tissue, empty target), so tracking learns to report vanished lesions")
    r.add_argument("--vanish-tissue-hu", "--vanish_tissue_hu", dest="vanish_tissue_hu", type=float, default=None,
                   help="vanished-lesion samples: put the previous mask on tissue whose median is within this "
                        "many HU of the lesion's surroundings (default: anywhere in the body)")
    r.add_argument("--vanish-fragment-prob", "--vanish_fragment_prob", dest="vanish_fragment_prob", type=_probability,
                   default=0.0, help="share of vanished-lesion samples whose previous mask is a small fragment "
                                     "(what a previous false positive leaves as the next prompt)")
    r.add_argument("--low-res-prob", "--low_res_prob", dest="low_res_prob", type=_probability, default=0.0,
                   help="share of training samples made to look like scans coarser than the model spacing "
                        "(down- and up-sampled image, 0.33-1 zoom per axis)")
    r.add_argument("--iterations", type=int, default=50, help="iterations per epoch")
    r.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=2)
    r.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="sgd: nnU-Net's (Nesterov, momentum 0.99, --lr 1e-2); adamw: try --lr 1e-3")
    r.add_argument("--lr", type=float, default=1e-2)
    r.add_argument("--box-jitter-mm", "--box_jitter_mm", dest="box_jitter_mm", type=_box_jitter, default=8.0,
                   help="box prompts: the lesion's bounding box grown by U[0, this] mm per axis (default 8); "
                        "'legacy': U[0, 10] model voxels per side (training runs before 2026-12)")
    r.add_argument("--prompt-types", "--prompt_types", dest="prompt_types", nargs="+",
                   choices=["point", "box", "mask"], default=["point", "box", "mask"],
                   help="prompt types simulated, drawn with equal odds (default: all three; 'box' alone "
                        "trains a box-prompt model such as LesionLocatorSeg/bbox_optimized)")
    r.add_argument("--outline-weight", "--outline_weight", dest="outline_weight", type=_non_negative,
                   default=0.0, help="extra cross-entropy weight of each lesion's outermost voxel layer "
                                     "(partial-volume voxels; default 0: nnU-Net's Dice + CE)")
    r.add_argument("--tight-box-prob", "--tight_box_prob", dest="tight_box_prob", type=_probability, default=0.0,
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
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--init", default=None, help="checkpoint to fine-tune from (same architecture)")
    r.add_argument("-device", "--device", default="auto")
    r.set_defaults(func=cmd_train)

    d = sub.add_parser("demo", help="segment and track the shipped demo case and report Dice per lesion")
    d.add_argument("-o", default="demo_output", help="output folder (default: demo_output)")
    d.add_argument("-m", default=None, help="model (default: the shipped demo model)")
    d.add_argument("-device", "--device", default="auto")
    d.add_argument("--registration", default="simpleitk", choices=["simpleitk", "greedy", "unigradicon", "none"])
    d.add_argument("--disable_progress_bar", action="store_true")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("evaluate", help="per-lesion Dice, NSD, CPM@25, MED of label images against ground truth")
    e.add_argument("--pred", required=True, help="folder of predicted instance label images")
    e.add_argument("--gt", required=True, help="folder of ground-truth instance label images (same names)")
    e.add_argument("-o", default=None, help="output prefix for .csv and .json (default: PRED/evaluation)")
    e.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    e.add_argument("--match", type=float, default=25.0, help="centre distance for a hit in mm (default 25)")
    e.set_defaults(func=cmd_evaluate)

    _add_model_commands(sub)
    return ap


def _add_model_commands(subparsers) -> None:
    """Register ``lesionlocator download`` and ``lesionlocator models`` (each sets ``func``)."""
    from . import zoo

    d = subparsers.add_parser(
        "download", help="download a known model into the cache (default: the official LesionLocator "
        "checkpoint), or install an archive downloaded elsewhere (--from-file)",
        description="Download, verify (MD5) and unpack a model into the cache; an interrupted download is "
        "resumed by running the same command again. Afterwards use -m NAME.")
    d.add_argument("name", nargs="?", default=None,
                   help=f"model name (default: {zoo.DEFAULT_DOWNLOAD}); zenodo:RECORD for another Zenodo record")
    d.add_argument("--from-file", dest="from_file", metavar="ARCHIVE",
                   help="install this archive (e.g. LesionLocatorCheckpoint.zip) instead of downloading")
    d.add_argument("--md5", default=None, help="expected MD5 of --from-file ARCHIVE (as shown on Zenodo)")
    d.add_argument("--url", dest="base_url", default=None,
                   help=f"records API server (default: $LESIONLOCATOR_ZENODO_URL or {zoo.ZENODO_URL})")
    d.add_argument("--cache-dir", dest="cache_dir", default=None,
                   help="model cache (default: $LESIONLOCATOR_HOME or the platform cache folder)")
    d.add_argument("--force", action="store_true", help="download and install again even if installed")
    d.add_argument("--disable_progress_bar", "--no-progress", dest="disable_progress_bar", action="store_true")
    d.set_defaults(func=cmd_download)

    m = subparsers.add_parser("models", help="list the cached models with their sizes")
    m.add_argument("--cache-dir", dest="cache_dir", default=None)
    m.add_argument("--verify", action="store_true", help="re-hash every installed file against its manifest")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=cmd_models)


def _cli_error(command: str, e: BaseException) -> int:
    print(f"lesionlocator {command}: error: {e}", file=sys.stderr)
    return 2


def cmd_download(args) -> int:
    from tqdm import tqdm

    from . import zoo
    from .modelfolder import CheckpointError, ModelLayoutError

    bar = None

    def progress(done, total):
        nonlocal bar
        if args.disable_progress_bar:
            return
        if bar is None:
            bar = tqdm(total=total, initial=done, unit="B", unit_scale=True,
                       desc=args.name or zoo.DEFAULT_DOWNLOAD, file=sys.stderr)
        bar.update(done - bar.n)
    try:
        if args.from_file:
            root = zoo.install_from_archive(args.from_file, args.name, args.cache_dir, md5=args.md5)
        else:
            root = zoo.download_model(args.name or zoo.DEFAULT_DOWNLOAD, args.base_url, args.cache_dir,
                                      progress=progress, force=args.force)
    except (zoo.DownloadCancelled, KeyboardInterrupt):
        if bar is not None:
            bar.close()
        print("\nlesionlocator download: interrupted; the partial download is kept, run the same command to "
              "resume", file=sys.stderr)
        return 130
    except (zoo.ZooError, ModelLayoutError, CheckpointError, OSError, ValueError) as e:
        if bar is not None:
            bar.close()
        return _cli_error("download", e)
    if bar is not None:
        bar.close()
    info = zoo.get_model_info(args.name or zoo.DEFAULT_DOWNLOAD)
    name = info.name if info else args.name
    manifest = zoo.read_manifest(root.parent if (root.parent / zoo.MANIFEST_NAME).exists() else root) or {}
    extra = ", ".join(f"{k} {manifest[k]}" for k in ("version", "license") if manifest.get(k))
    print(f"{name}: ready at {root}" + (f" ({extra})" if extra else "") + f"; use it with -m {name}")
    return 0


def cmd_models(args) -> int:
    from . import zoo

    entries = zoo.list_cached_models(args.cache_dir)
    if args.verify:
        for e in entries:
            if e["status"] == "ok":
                problems = zoo.verify_model(e["name"], args.cache_dir)
                if problems:
                    e.update(status="damaged", problem="; ".join(problems[:3]))
    if args.json:
        print(json.dumps(entries, indent=1))
        return 0 if all(e["status"] != "damaged" for e in entries) else 1
    print(f"model cache: {zoo.cache_root(args.cache_dir)}")
    installed = [e for e in entries if e["status"] != "partial"]
    if installed:
        for e in installed:
            line = f"  {e['name']:<16} {zoo.human_size(e['size']):>9}  "
            if e["status"] == "ok":
                bits = [f"version {e['version']}" if e.get("version") else None,
                        f"licence {e['license']}" if e.get("license") else None,
                        e.get("source"), f"installed {e['date'][:10]}" if e.get("date") else None]
                line += ", ".join(b for b in bits if b)
            else:
                line += f"DAMAGED: {e.get('problem')} (run `lesionlocator download {e['name']} --force`)"
            print(line)
    else:
        print("  (no models downloaded)")
    for e in entries:
        if e["status"] == "partial":
            total = f" of {zoo.human_size(e['total'])}" if e.get("total") else ""
            print(f"  partial download: {e['name']} {e.get('file') or ''} {zoo.human_size(e['size'])}{total} "
                  f"(run `lesionlocator download {e['name']}` to resume)")
    names = {e["name"] for e in installed}
    for info in zoo.REGISTRY.values():
        if info.source == "zenodo" and info.name not in names:
            print(f"  available: {info.name} - {info.title} ({info.homepage}); `lesionlocator download "
                  f"{info.name}`")
    demo = zoo.demo_model_dir()
    print(f"  bundled: demo - {'at ' + str(demo) if demo.is_dir() else 'missing (' + str(demo) + ')'}")
    return 0 if all(e["status"] != "damaged" for e in entries) else 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .image import ImageError
    from .model import CheckpointError, ModelLayoutError
    from .predict import Cancelled
    from .prompts import PromptError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return args.func(args)
    except (UsageError, PromptError, ImageError, ModelLayoutError, CheckpointError, FileNotFoundError,
            RuntimeError, MemoryError) as e:
        print(f"lesionlocator {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Cancelled:
        print(f"lesionlocator {args.command}: cancelled; nothing was written for the current case", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\nlesionlocator {args.command}: interrupted; outputs written so far are complete", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
