"""The ``lesionlocator`` command.

``lesionlocator segment`` takes the same flags, inputs and output names as upstream's
``LesionLocator_segment`` (so switching is a change of command name), plus ``--world`` (our LPS
world-coordinate prompt JSON), ``--save-probabilities`` and ``--device auto``.

``segment`` and ``track`` with ``--server URL --api-key-file F`` send the work to a ``lesionlocator
serve`` server (:mod:`LesionLocatorLib.remote`) instead of loading a model here: ``-m`` is then a
model name on the server (default: the server's first), the inputs are checked here first and the
output files are written here exactly as a local run writes them. ``lesionlocator
prompts`` turns label images into prompt JSON like upstream's ``LesionLocator_create_prompt_json``.

Every command checks all of its inputs first (:mod:`LesionLocatorLib.inputs`: options, paths, the
output folder, image headers, prompt files, the model folder) without importing torch, and creates
its output folder only then. A user error is one line on stderr and exit status 2 (``--verbose``
adds the traceback); Ctrl-C or SIGTERM is one line and exit status 130/143, with no partial file
left (every file is written atomically); an internal error says so, exit status 1.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .inputs import UsageError, device_value, folds_value, non_negative, step_fraction
from .serverclient import add_server_options, closing, connect_server, server_segmenter

REGISTRATIONS = ["simpleitk", "greedy", "unigradicon", "none"]


def progress_bar(enabled: bool, desc: str):
    """A tqdm bar on stderr and its ``update(fraction, message)`` callback."""
    from tqdm import tqdm

    bar = tqdm(total=100, desc=desc, disable=not enabled, unit="%", leave=False)

    def update(fraction: float, message: str) -> None:
        bar.n = int(round(100 * fraction))
        bar.set_postfix_str(message)
        bar.refresh()
    return bar, update


def _warn(command: str, message: str) -> None:
    print(f"lesionlocator {command}: warning: {message}", file=sys.stderr)


# --------------------------------------------------------------------------- segment
def cmd_segment(args) -> int:
    from .inputs import check_backend, check_dicom_out, check_images, check_model, check_output_folder, \
        pair_inputs, read_prompts, scan_ending, scan_name

    pairs = pair_inputs(args.i, args.p)
    out = check_output_folder(args.o)
    check_images([image for image, _ in pairs], args.series)
    dicom_out = check_dicom_out(args.dicom_out, [image for image, _ in pairs], args.series)
    prompts = {image: read_prompts(prompt, args.t, args.world, args.allow_many_prompts) for image, prompt in pairs}
    server = connect_server(args, [args.t])
    check_backend(args.backend, args.device)
    root = check_model(args.m, [args.t]) if server is None else None
    from .outputs import OutputFolder

    with closing(server), OutputFolder(out) as folder:
        todo = [(image, scan_name(image), scan_ending(image)) for image, _ in pairs]
        if args.continue_prediction:
            done = {case for _, case, _ in todo if folder.case_complete(case) and _dicom_complete(dicom_out, case)}
            for case in sorted(done):
                print(f"{case}: already predicted, skipping (--continue_prediction)", file=sys.stderr)
            todo = [item for item in todo if item[1] not in done]
        if not todo:
            return 0
        run = _segmenter(root, args) if server is None else server_segmenter(server, args, _tta(args))
        for image_path, case, ending in todo:
            _segment_case(image_path, case, ending, prompts[image_path], run, folder, args, dicom_out)
    return 0


def _dicom_complete(dicom_out, case: str) -> bool:
    """True without --dicom-out, else when the case's SR (written after its SEG) is there."""
    from .dicomresults import sr_path

    return dicom_out is None or sr_path(dicom_out, case).is_file()


def _read_scan(path, series):
    """(Image, DicomSeries or None): a scan file, or a DICOM series folder with its headers."""
    from .dicomseries import read_series
    from .image import read_image
    from .inputs import is_dicom_input

    if is_dicom_input(path):
        return read_series(path, series)
    return read_image(path), None


def _tta(args):
    return False if args.disable_tta else (True if args.enable_tta else None)


def _segmenter(root, args):
    """``run(image, prompts, progress) -> SegmentationResult`` with the local model loaded."""
    from .model import load_model
    from .predict import segment

    model = load_model(root, args.t, folds=args.f, device=args.device, tta=_tta(args), backend=args.backend)
    print(f"model: {model.folder} (folds {model.folds}, device {model.device}, "
          f"test-time mirroring {'on' if model.use_tta else 'off'})", file=sys.stderr)
    return lambda image, prompts, progress: segment(image, prompts, model, progress=progress,
                                                    step_size=args.step_size)


def _segment_case(image_path, case, ending, prompts, run, folder, args, dicom_out=None) -> None:
    """Segment one case (``run``: :func:`_segmenter` or
    :func:`~LesionLocatorLib.serverclient.server_segmenter`) and write its
    files; the case's manifest is written last, then (with ``--dicom-out``) its DICOM SEG and SR."""
    import numpy as np

    from .image import write_image

    image, dicom = _read_scan(image_path, args.series)
    bar, update = progress_bar(not args.disable_progress_bar, case)
    try:
        result = run(image, prompts, update)
    finally:
        bar.close()
    folder.begin_case(case)
    written = []
    for pid, mask in result.masks.items():
        lesion = folder.path / f"{case}_lesion_{pid}{ending}"
        written.append(write_image(image.with_array(mask.astype(np.uint8)), lesion))
        if args.save_probabilities:
            written.append(_save_npz(folder.path / f"{case}_lesion_{pid}.npz", result.probabilities[pid]))
    final = write_image(result.labels, folder.path / f"{case}_lesions{ending}")
    folder.finish_case(case, written + [final])
    sizes = ", ".join(f"{pid}: {int(m.sum())} voxels" for pid, m in result.masks.items())
    print(f"{case}: {len(result.masks)} lesion(s) -> {final} ({sizes})")
    if dicom_out is not None:
        from .measure import lesion_measurements

        status = {pid: ["tracked" if m.any() else "vanished"] for pid, m in result.masks.items()}
        rows = lesion_measurements([image], [result.masks], status, names=[case])
        _write_dicom(dicom_out, [dicom], [case], [result.masks], rows, "segment")


def _save_npz(path: Path, probabilities) -> Path:
    import numpy as np

    from .files import atomic_output

    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, probabilities=probabilities.astype(np.float16))
    return path


# --------------------------------------------------------------------------- prompts
def cmd_prompts(args) -> int:
    import numpy as np

    from .image import read_image
    from .inputs import case_name, check_images, check_output_folder, list_images
    from .prompts import Box, Point, prompts_from_labels, write_upstream_json, write_world_json

    src = Path(args.i)
    if not src.exists():
        raise FileNotFoundError(f"label image or folder not found: {src}")
    files = list_images(src) if src.is_dir() else [src]
    if not files:
        raise UsageError(f"no label images in {src}")
    out = check_output_folder(args.o)
    check_images(files)
    for f in files:
        img = read_image(f)
        name = case_name(f.name)
        name = (name[: -len("_label")] if name.endswith("_label") else name) + ".json"  # <case>_label -> <case>
        for kind, sub in (("point", "points"), ("box", "boxes")):
            vps = prompts_from_labels(img.array, kind, args.label_type)
            if args.world:
                world = []
                for vp in vps:
                    if kind == "point":
                        world.append(Point(vp.id, tuple(img.index_to_world(vp.coords))))
                    else:
                        c = np.asarray(vp.coords, float).reshape(3, 2)
                        world.append(Box.from_points(vp.id, img.index_to_world(np.array([c[:, 0], c[:, 1] - 1]))))
                write_world_json(world, out / sub / name)
            else:
                write_upstream_json(vps, out / sub / name)
        print(f"{f.name}: {len(vps)} lesion(s) -> {out / 'points' / name}, {out / 'boxes' / name}")
    return 0


def _write_dicom(out, series, names, masks, rows, command: str) -> None:
    """Each scan's DICOM SEG and SR TID 1500 into ``out`` (:func:`.dicomresults.write_dicom_results`)."""
    from .dicomresults import write_dicom_results

    written, warnings = write_dicom_results(out, series, names, masks, rows)
    for message in warnings:
        _warn(command, message)
    print(f"wrote {len(written)} DICOM file(s) (SEG and SR per scan) to {out}")


# --------------------------------------------------------------------------- demo, evaluate
def cmd_demo(args) -> int:
    from .demo import run_demo
    from .inputs import check_model, check_output_folder

    out = check_output_folder(args.o)
    root = check_model(args.m, ["point", "prev_mask"])
    bar, update = progress_bar(not args.disable_progress_bar, "demo")
    try:
        run_demo(out, model=str(root), device=args.device, registration=args.registration, progress=update)
    finally:
        bar.close()
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import aggregate, evaluate_paths
    from .report import format_table, write_table

    rows = evaluate_paths(args.pred, args.gt, tolerance_mm=args.tolerance, match_mm=args.match)
    print(format_table(rows))
    summary = aggregate(rows)
    print("\n" + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    pred = Path(args.pred)
    out = Path(args.o) if args.o else (pred if pred.is_dir() else pred.parent) / "evaluation"
    csv_path, json_path = write_table(rows, out)
    print(f"wrote {csv_path} and {json_path}")
    return 0


# --------------------------------------------------------------------------- models
def cmd_download(args) -> int:
    from tqdm import tqdm

    from . import zoo

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
        print("\nlesionlocator download: interrupted; the partial download is kept, run the same command to "
              "resume", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    info = zoo.get_model_info(args.name or zoo.DEFAULT_DOWNLOAD)
    name = info.name if info else args.name
    manifest = zoo.read_manifest(root.parent if (root.parent / zoo.MANIFEST_NAME).exists() else root) or {}
    extra = ", ".join(f"{k} {manifest[k]}" for k in ("version", "license") if manifest.get(k))
    print(f"{name}: ready at {root}" + (f" ({extra})" if extra else "") + f"; use it with -m {name}")
    return 0


def model_entries(cache_dir=None, verify: bool = False) -> list:
    """Every model the command line knows, as the text and JSON listings show them: cached ones
    (status ok, damaged or partial), downloadable ones not cached (available) and the bundled demo
    model (bundled or missing)."""
    from . import zoo

    entries = zoo.list_cached_models(cache_dir)
    if verify:
        for e in entries:
            if e["status"] == "ok":
                problems = zoo.verify_model(e["name"], cache_dir)
                if problems:
                    e.update(status="damaged", problem="; ".join(problems[:3]))
    names = {e["name"] for e in entries if e["status"] != "partial"}
    for info in zoo.REGISTRY.values():
        if info.source == "zenodo" and info.name not in names:
            entries.append({"name": info.name, "status": "available", "title": info.title,
                            "homepage": info.homepage})
    demo = zoo.demo_model_dir()
    entries.append({"name": "demo", "status": "bundled" if demo.is_dir() else "missing", "path": str(demo),
                    "title": zoo.get_model_info("demo").title})
    return entries


def cmd_models(args) -> int:
    from . import zoo

    entries = model_entries(args.cache_dir, args.verify)
    code = 0 if all(e["status"] != "damaged" for e in entries) else 1
    if args.json:
        print(json.dumps({"cache": str(zoo.cache_root(args.cache_dir)), "models": entries}, indent=1))
        return code
    print(f"model cache: {zoo.cache_root(args.cache_dir)}")
    cached = [e for e in entries if e["status"] in ("ok", "damaged")]
    for e in cached:
        line = f"  {e['name']:<16} {zoo.human_size(e['size']):>9}  "
        if e["status"] == "ok":
            bits = [f"version {e['version']}" if e.get("version") else None,
                    f"licence {e['license']}" if e.get("license") else None,
                    e.get("source"), f"installed {e['date'][:10]}" if e.get("date") else None]
            line += ", ".join(b for b in bits if b)
        else:
            line += f"DAMAGED: {e.get('problem')} (run `lesionlocator download {e['name']} --force`)"
        print(line)
    if not cached:
        print("  (no models downloaded)")
    for e in entries:
        if e["status"] == "partial":
            total = f" of {zoo.human_size(e['total'])}" if e.get("total") else ""
            print(f"  partial download: {e['name']} {e.get('file') or ''} {zoo.human_size(e['size'])}{total} "
                  f"(run `lesionlocator download {e['name']}` to resume)")
        elif e["status"] == "available":
            print(f"  available: {e['name']} - {e['title']} ({e['homepage']}); `lesionlocator download {e['name']}`")
        elif e["status"] in ("bundled", "missing"):
            print(f"  bundled: demo - {'at ' if e['status'] == 'bundled' else 'missing ('}{e['path']}"
                  f"{'' if e['status'] == 'bundled' else ')'}")
    return code


# --------------------------------------------------------------------------- the parser
def _model_options(p, prompt_flag=True) -> None:
    p.add_argument("-m", default=None, help="model: a LesionLocatorCheckpoint folder or a downloaded model's name "
                   "(default: the bundled demo model); with --server a model name on the server")
    p.add_argument("-f", nargs="+", type=folds_value, default=None,
                   help="folds to use, e.g. 0 1 or all (default: every fold present)")
    p.add_argument("-device", "--device", type=device_value, default="auto",
                   help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps")
    from .modelfolder import BACKENDS

    p.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="inference runtime: torch (default), or with --device cpu openvino (pip install openvino; "
                   "the network is converted once and cached; same results) or openvino-bf16 (opt-in, faster, "
                   "reduced precision)")


def _dicom_options(p) -> None:
    p.add_argument("--series", nargs="+", default=[], metavar="UID",
                   help="Series Instance UID(s) to read from DICOM folders that hold several series (each folder "
                   "takes the one it holds; the error lists a folder's series)")
    p.add_argument("--dicom-out", "--dicom_out", dest="dicom_out", default=None, metavar="DIR",
                   help="also write per scan a DICOM SEG (<case>_seg.dcm, one segment per lesion) and an SR TID 1500 "
                   "measurement report (<case>_sr.dcm) referencing the DICOM input series; needs DICOM input")


def _add_segment(sub, parents, formatter) -> None:
    s = sub.add_parser("segment", parents=parents, formatter_class=formatter,
                       help="segment lesions from point or box prompts (upstream LesionLocator_segment)")
    s.add_argument("-i", required=True, help="input image file, folder of images (.nii.gz, .nii, .nrrd, .mha), or a "
                   "folder of DICOM files (one scan)")
    s.add_argument("-o", required=True, help="output folder (created once every input checks out)")
    s.add_argument("-p", required=True, help="prompt file or folder: upstream JSON (voxel z,y,x), our world JSON, "
                   "or an instance/binary label image; files named like their images")
    s.add_argument("-t", required=True, choices=["point", "box"], help="prompt type (must match the prompt files)")
    _model_options(s)
    s.add_argument("-step_size", "--step_size", type=step_fraction, default=0.5,
                   help="sliding-window step (fraction of the patch, > 0 and <= 1)")
    s.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    s.add_argument("--enable_tta", action="store_true", help="mirroring test-time augmentation also on CPU")
    s.add_argument("--continue_prediction", "--c", action="store_true",
                   help="skip cases whose outputs are complete (their manifest and files)")
    s.add_argument("--world", action="store_true", help="prompt JSON is in LPS world millimetres")
    s.add_argument("--save-probabilities", "--save_probabilities", dest="save_probabilities", action="store_true",
                   help="also write each lesion's probability map (.npz)")
    s.add_argument("--allow-many-prompts", dest="allow_many_prompts", action="store_true",
                   help="allow more than 1000 prompts per image (each one is a network run)")
    s.add_argument("--disable_progress_bar", action="store_true", help="no progress bar")
    _dicom_options(s)
    add_server_options(s)
    s.add_argument("-npp", type=int, default=None, help="accepted for upstream compatibility; unused")
    s.add_argument("-nps", type=int, default=None, help="accepted for upstream compatibility; unused")
    s.set_defaults(func=cmd_segment)


def _add_track(sub, parents, formatter) -> None:
    t = sub.add_parser("track", parents=parents, formatter_class=formatter,
                       help="segment and track lesions through follow-ups (upstream LesionLocator_track)")
    t.add_argument("-bl", required=True, help="baseline scan: an image file or a folder of DICOM files")
    t.add_argument("-fu", required=True, nargs="+", help="follow-up scans, in time order (files or DICOM folders)")
    t.add_argument("-p", nargs="+", help="baseline prompt JSON (point/box), or for prev_mask one "
                   "instance label image, several binary masks (one per lesion) or one DICOM SEG file (required "
                   "unless --resume-from)")
    t.add_argument("-t", default="prev_mask", choices=["point", "box", "prev_mask"], help="prompt type")
    t.add_argument("-o", required=True, help="output folder (created once every input checks out)")
    _model_options(t)
    t.add_argument("--registration", default="simpleitk", choices=REGISTRATIONS, help="registration backend")
    t.add_argument("--min-volume-ml", "--min_volume_ml", dest="min_volume_ml", type=non_negative, default=0.0,
                   help="a follow-up mask smaller than this (ml) counts as vanished (0: any voxel is tracked)")
    t.add_argument("--min-prompt-fraction", "--min_prompt_fraction", dest="min_prompt_fraction", type=non_negative,
                   default=0.0, help="a follow-up mask smaller than this fraction of its warped previous mask "
                   "counts as vanished (0: off)")
    t.add_argument("--world", action="store_true", help="prompt JSON is in LPS world millimetres")
    t.add_argument("--corrections", default=None, metavar="JSON",
                   help="corrections after tracking (LesionLocatorLib.correctionfile: per lesion and follow-up a "
                   "point, box or mask, 'vanished', or a new lesion; world LPS mm): each corrected lesion is "
                   "re-propagated from its correction through the later scans")
    t.add_argument("--resume-from", dest="resume_from", default=None, metavar="OUT",
                   help="an earlier 'track' output folder on the same scans: its registrations and masks are "
                   "reused (OUT/tracking), nothing is registered or tracked again; with --corrections only the "
                   "corrected lesions are re-run from their corrections on")
    t.add_argument("--confirmed-points", dest="confirmed_points", default=None, metavar="JSON",
                   help="verified tracking: each follow-up lesion is segmented from its warped mask moved onto "
                   "the point given here (lesionlocator-confirmed-points/1, world LPS mm), or onto its proposal "
                   "(the warped mask's centre) when none is given; the points used go to OUT/tracking/points.json")
    t.add_argument("--allow-many-prompts", dest="allow_many_prompts", action="store_true",
                   help="allow more than 1000 baseline prompts")
    t.add_argument("--disable_progress_bar", action="store_true", help="no progress bar")
    _dicom_options(t)
    add_server_options(t)
    from .trackcommand import cmd_track

    t.set_defaults(func=cmd_track)


def _add_small_commands(sub, parents, formatter) -> None:
    p = sub.add_parser("prompts", parents=parents, formatter_class=formatter,
                       help="label image(s) -> point and box prompt JSON (upstream format)")
    p.add_argument("-i", required=True, help="label image or folder of label images")
    p.add_argument("-o", required=True, help="output folder; writes points/ and boxes/, named like the images "
                   "(a '_label' suffix is dropped, so they pair with <case>.nii.gz in lesionlocator segment)")
    p.add_argument("-label_type", "--label_type", choices=["instance", "semantic"], default="instance",
                   help="instance: label value = lesion ID; semantic: connected components are lesions")
    p.add_argument("--world", action="store_true", help="write our LPS world JSON instead of voxel JSON")
    p.set_defaults(func=cmd_prompts)

    d = sub.add_parser("demo", parents=parents, formatter_class=formatter,
                       help="segment and track the shipped demo case and report Dice per lesion")
    d.add_argument("-o", default="demo_output", help="output folder")
    d.add_argument("-m", default=None, help="model (default: the shipped demo model)")
    d.add_argument("-device", "--device", type=device_value, default="auto", help="auto, cpu, cuda, cuda:N or mps")
    d.add_argument("--registration", default="simpleitk", choices=REGISTRATIONS, help="registration backend")
    d.add_argument("--disable_progress_bar", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)

    e = sub.add_parser("evaluate", parents=parents, formatter_class=formatter,
                       help="per-lesion Dice, NSD, CPM@25, MED of label images against ground truth")
    e.add_argument("--pred", required=True, help="predicted instance label image, or a folder of them "
                   "(<case>.nii.gz or lesionlocator's <case>_lesions.nii.gz)")
    e.add_argument("--gt", required=True, help="ground-truth instance label image, or a folder (same case names)")
    e.add_argument("-o", default=None, help="output prefix for .csv and .json (default: PRED folder/evaluation)")
    e.add_argument("--tolerance", type=non_negative, default=2.0, help="NSD tolerance in mm")
    e.add_argument("--match", type=non_negative, default=25.0, help="centre distance for a hit in mm")
    e.set_defaults(func=cmd_evaluate)


def _add_model_commands(sub, parents, formatter) -> None:
    from .download import ZENODO_URL
    from .zoo import DEFAULT_DOWNLOAD

    d = sub.add_parser(
        "download", parents=parents, formatter_class=formatter,
        help="download a known model into the cache (default: the official LesionLocator checkpoint), or install "
        "an archive downloaded elsewhere (--from-file)",
        description="Download, verify (MD5) and unpack a model into the cache; an interrupted download is "
        "resumed by running the same command again. Afterwards use -m NAME.")
    d.add_argument("name", nargs="?", default=None,
                   help=f"model name (default: {DEFAULT_DOWNLOAD}); zenodo:RECORD for another Zenodo record")
    d.add_argument("--from-file", dest="from_file", metavar="ARCHIVE",
                   help="install this archive (e.g. LesionLocatorCheckpoint.zip) instead of downloading")
    d.add_argument("--md5", default=None, help="expected MD5 of --from-file ARCHIVE (as shown on Zenodo)")
    d.add_argument("--url", dest="base_url", default=None,
                   help=f"records API server (default: $LESIONLOCATOR_ZENODO_URL or {ZENODO_URL})")
    d.add_argument("--cache-dir", dest="cache_dir", default=None,
                   help="model cache (default: $LESIONLOCATOR_HOME or the platform cache folder)")
    d.add_argument("--force", action="store_true", help="download and install again even if installed")
    d.add_argument("--disable_progress_bar", "--no-progress", dest="disable_progress_bar", action="store_true",
                   help="no progress bar")
    d.set_defaults(func=cmd_download)

    m = sub.add_parser("models", parents=parents, formatter_class=formatter,
                       help="list the models: cached (with sizes), downloadable and bundled")
    m.add_argument("--cache-dir", dest="cache_dir", default=None,
                   help="model cache (default: $LESIONLOCATOR_HOME or the platform cache folder)")
    m.add_argument("--verify", action="store_true", help="re-hash every installed file against its manifest")
    m.add_argument("--json", action="store_true", help="print the same listing as JSON")
    m.set_defaults(func=cmd_models)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    formatter = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(prog="lesionlocator", parents=[common], formatter_class=formatter,
                                 description="Promptable lesion segmentation and tracking in CT (LesionLocator, "
                                 "CVPR 2025). World coordinates are LPS mm.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_segment(sub, [common], formatter)
    _add_small_commands(sub, [common], formatter)
    _add_track(sub, [common], formatter)
    try:
        from .training.commands import add_training_commands
    except ImportError:  # the Slicer extension ships no training code
        pass
    else:
        add_training_commands(sub, [common], formatter)
    _add_model_commands(sub, [common], formatter)
    from .servecommand import add_serve_command

    add_serve_command(sub, [common], formatter)
    return ap


# --------------------------------------------------------------------------- main
def _run(args) -> int:
    import warnings

    from .cancel import Cancelled

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda message, *rest, **kw: _warn(args.command, str(message))
            return args.func(args)
    except Cancelled:
        print(f"lesionlocator {args.command}: cancelled; nothing was written for the current case", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, MemoryError) as e:  # the library's errors are these kinds
        if args.verbose:
            import traceback
            traceback.print_exc()
        print(f"lesionlocator {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit) and e.code not in (130, 143):
            raise
        print(f"\nlesionlocator {args.command}: interrupted; files written so far are complete, nothing partial "
              f"is left", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    except Exception as e:  # noqa: BLE001 - a bug: say so in one line, the traceback with --verbose
        if args.verbose:
            import traceback
            traceback.print_exc()
        print(f"lesionlocator {args.command}: internal error ({type(e).__name__}: {_one_line(e)}); run again with "
              f"--verbose and report the traceback", file=sys.stderr)
        return 1


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text if isinstance(e, (ValueError, OSError)) else text.splitlines()[0]


def main(argv=None) -> int:
    try:
        from .files import install_termination_handler

        install_termination_handler()
        args = build_parser().parse_args(argv)
        return _run(args)
    except KeyboardInterrupt:  # while starting up, before a command runs
        print("\nlesionlocator: interrupted", file=sys.stderr)
        return 130


def run() -> int:
    """The console entry point: :func:`main`, then Ctrl-C and SIGTERM are ignored while the interpreter shuts
    down, so a signal that comes after the work is done cannot turn the exit status into a crash.

    After an interruption (exit status 130/143; every ``finally`` and temporary-file cleanup has run) the
    process ends with ``os._exit``: CPython remembers a KeyboardInterrupt that interrupted Python code run
    from C (as torch's import does) even when it was caught, and would otherwise kill itself with SIGINT
    at exit (status -2) after our one-line message."""
    import os
    import signal

    try:
        code = main()
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's message was being printed
        code = 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
    if code in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(run())
