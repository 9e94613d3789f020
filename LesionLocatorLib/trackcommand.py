"""``lesionlocator track``: segment and track lesions through follow-up scans, with corrections
(``--corrections``), a saved earlier run (``--resume-from``) and verified tracking
(``--confirmed-points``); the parser is :mod:`LesionLocatorLib.cli`'s. Like every command it checks
its inputs before importing torch or creating the output folder (:class:`~LesionLocatorLib.inputs.UsageError`).
"""
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

from .cli import _read_scan, _warn, _write_dicom, progress_bar
from .inputs import UsageError
from .serverclient import closing, connect_server, server_spec


def _track_prompts(paths, prompt_type: str, world: bool, allow_many: bool):
    """The baseline prompts: one point/box file (checked against ``-t``), or for prev_mask one
    instance label image (a binary one is split into connected lesions) or one mask per lesion."""
    import re

    from .image import read_image
    from .inputs import read_prompts
    from .prompts import MaskPrompt

    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"prompt file not found: {p}")
    if prompt_type != "prev_mask":
        if len(paths) != 1:
            raise UsageError("point/box tracking takes one prompt file (-p)")
        return read_prompts(paths[0], prompt_type, world, allow_many)
    if any(p.name.endswith(".json") for p in paths):
        raise UsageError("-t prev_mask needs label images as prompts, not JSON")
    from .dicomseg import is_seg_file

    if any(is_seg_file(p) for p in paths):
        if len(paths) != 1:
            raise UsageError("-t prev_mask takes one DICOM SEG file (one segment per lesion) or label images")
        return paths[0]  # placed on the baseline scan once it is read (_baseline_prompts)
    if len(paths) == 1:
        import numpy as np

        labels = read_image(paths[0])
        if set(np.unique(labels.array)) <= {0, 1}:
            from scipy import ndimage
            inst, _ = ndimage.label(labels.array > 0, structure=np.ones((3, 3, 3)))
            labels = labels.with_array(inst.astype(np.uint16))
        return labels
    natural = sorted(paths, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    return [MaskPrompt(i, read_image(p), name=p.name) for i, p in enumerate(natural, start=1)]


def _readable_followups(paths, series=()) -> tuple:
    """(follow-up paths whose headers check out, messages for the others): a follow-up that cannot
    be read is reported by name and the others are still tracked."""
    from .image import ImageError, read_image_header

    good, failed = [], []
    for fu in paths:
        try:
            read_image_header(fu, series)
            good.append(Path(fu))
        except (ImageError, FileNotFoundError) as e:
            failed.append(f"follow-up {fu} could not be loaded, skipped: {e}")
    return good, failed


def cmd_track(args) -> int:
    from .inputs import check_backend, check_dicom_out, check_images, check_model, check_output_folder, scan_name, \
        unique_names

    check_images([args.bl], args.series)
    followups, failed = _readable_followups(args.fu, args.series)
    if not followups:
        raise UsageError("no follow-up scan could be loaded; nothing to track: " + "; ".join(failed))
    out = check_output_folder(args.o)
    paths = [Path(args.bl)] + followups
    dicom_out = check_dicom_out(args.dicom_out, paths, args.series)
    names = unique_names(scan_name(p) for p in paths)
    _check_resume(args, names)
    prompts = _track_prompts(args.p, args.t, args.world, args.allow_many_prompts) if args.p else None
    types = ["prev_mask"] if args.t == "prev_mask" or args.resume_from else [args.t, "prev_mask"]
    corrections = _read_corrections(args, types, names)
    server = connect_server(args, types)
    check_backend(args.backend, args.device)
    root = check_model(args.m, types) if server is None else server
    for message in failed:
        print(f"lesionlocator track: error: {message}", file=sys.stderr)
    from .outputs import OutputFolder

    with closing(server), OutputFolder(out) as folder:
        study, dicom = _run_study(paths, names, prompts, root, args, corrections)
        _write_study(study, paths, names, folder, args)
        if dicom_out is not None:
            _write_dicom(dicom_out, dicom, names, study.masks, study.rows, "track")
    return 1 if failed else 0


def _baseline_prompts(prompts, image, dicom):
    """The baseline prompts on the baseline scan: a DICOM SEG file becomes one mask prompt per
    segment with voxels (an empty segment, e.g. a lesion that had vanished where the SEG was
    made, is left out with a warning); a label image must share the scan's geometry."""
    from .prompts import MaskPrompt, PromptError

    if isinstance(prompts, Path):
        from .dicomseg import read_seg

        masks = read_seg(prompts, image, dicom)
        empty = sorted(pid for pid, mask in masks.items() if not mask.any())
        if empty:
            _warn("track", f"{prompts.name}: no voxel on the baseline scan for lesion(s) "
                           f"{', '.join(map(str, empty))}; they are not tracked")
        return [MaskPrompt(pid, image.with_array(mask), name=f"{prompts.name} lesion {pid}")
                for pid, mask in sorted(masks.items()) if mask.any()]
    if not isinstance(prompts, list) and not prompts.same_geometry(image):
        raise PromptError("the baseline label image does not have the baseline scan's geometry")
    return prompts


def _check_resume(args, names) -> None:
    """``--resume-from`` and ``--confirmed-points`` checked before any work (torch-free): the saved
    run's state file (:mod:`LesionLocatorLib.trackstate`) and its scans' names, the points file;
    ``args.resume_from`` becomes the state's folder and ``args.confirmed_points`` its points."""
    if args.confirmed_points:
        from .correctionfile import read_confirmed_points, scan_index

        if args.resume_from:
            raise UsageError("--confirmed-points verifies a new tracking run; with --resume-from nothing is tracked "
                             "again (correct the resumed run with --corrections)")
        args.confirmed_points = read_confirmed_points(args.confirmed_points)
        for scan, _ in args.confirmed_points:
            scan_index(scan, names)
    if not args.resume_from:
        if not args.p:
            raise UsageError("the baseline lesions are needed: give -p (or --resume-from an earlier output folder)")
        return
    if args.server:
        raise UsageError("--resume-from cannot be used with --server: resume on this computer")
    from .trackstate import STATE_FILE, TrackStateError, read_state_file

    folder = Path(args.resume_from)
    folder = folder / "tracking" if not (folder / STATE_FILE).is_file() and (folder / "tracking").is_dir() else folder
    try:
        state = read_state_file(folder)
    except TrackStateError as e:
        raise UsageError(str(e)) from None
    if list(state["names"]) != list(names):
        raise UsageError(f"--resume-from {args.resume_from}: that run tracked {', '.join(state['names'])}; these "
                         f"scans are {', '.join(names)} (give the same scans in the same order)")
    if args.p:
        _warn("track", f"-p is not used with --resume-from: the lesions are the ones of {args.resume_from}")
    args.resume_from = folder


def _read_corrections(args, types: list, names):
    """The entries of ``--corrections`` (:func:`LesionLocatorLib.correctionfile.read_corrections`),
    checked before any work, their scans among ``names``; ``types`` gains the point/box models
    they need. None without it."""
    if not args.corrections:
        return None
    if args.server:
        raise UsageError("--corrections cannot be used with --server yet: run the corrected tracking locally")
    from .correctionfile import read_corrections, scan_index

    entries = read_corrections(args.corrections)
    for entry in entries:
        scan_index(entry["scan"], names)
    types += sorted({e["kind"] for e in entries} & {"point", "box"} - set(types))
    return entries


def _run_study(paths, names, prompts, root, args, corrections=None):
    """(StudyResult with ``images``, the scans' DicomSeries or None each); ``root``: the local
    model root, or the :class:`~LesionLocatorLib.remote.RemoteRunner` of ``--server``;
    ``corrections``: the entries of ``--corrections``, applied after tracking."""
    from .modelfolder import ModelSpec
    from .remote import RemoteRunner, track_study_on_server
    from .study import scan_datetime, track_study

    scans = [_read_scan(p, args.series) for p in paths]
    images, dicom = [image for image, _ in scans], [series for _, series in scans]
    prompts = _baseline_prompts(prompts, images[0], dicom[0]) if prompts is not None else None
    dates = [series.datetime() if series is not None else scan_datetime(p) for p, series in zip(paths, dicom)]
    if isinstance(root, RemoteRunner):
        model, track = server_spec(root, args, None), partial(track_study_on_server, root)
    else:
        model = ModelSpec(str(root), tuple(args.f) if args.f is not None else None, args.device,
                          backend=args.backend)
        if corrections:
            from .correctionfile import resolve_corrections

            corrections = resolve_corrections(corrections, names, images)
        track = partial(track_study, corrections=corrections, previous=_resumed(args, images),
                        confirm=_confirm(args, names))
    bar, update = progress_bar(not args.disable_progress_bar, "tracking")
    try:
        study = track(images, prompts, model, names=names, dates=dates, registration=args.registration,
                      min_volume_ml=args.min_volume_ml, min_prompt_fraction=args.min_prompt_fraction,
                      progress=update)
    finally:
        bar.close()
    study.images = images
    for message in study.warnings:
        _warn("track", message)
    return study, dicom


def _resumed(args, images):
    """The TrackResult saved in ``--resume-from`` for these scans, or None."""
    if not args.resume_from:
        return None
    from .trackstate import TrackStateError, load_track_state

    try:
        return load_track_state(args.resume_from, images)[0]
    except TrackStateError as e:
        raise UsageError(str(e)) from None


def _confirm(args, names):
    """Verified tracking's confirm callback of ``--confirmed-points``, or None."""
    if args.confirmed_points is None:
        return None
    from .correctionfile import confirm_with_points

    return confirm_with_points(args.confirmed_points, names)


def _write_study(study, paths, names, folder, args) -> None:
    import numpy as np

    from .image import write_image
    from .inputs import scan_ending
    from .report import format_table, growth_plot, write_table

    t0 = time.perf_counter()
    for t, (path, name) in enumerate(zip(paths, names)):
        if t == 0 and args.t == "prev_mask":
            continue  # the baseline masks are the user's input
        ending = scan_ending(path)
        folder.begin_case(name)
        written = [write_image(study.images[t].with_array(mask.astype(np.uint8)),
                               folder.path / f"{name}_lesion_{pid}{ending}") for pid, mask in study.masks[t].items()]
        written.append(write_image(study.labels[t], folder.path / f"{name}_lesions{ending}"))
        folder.finish_case(name, written)
    write_table(study.rows, folder.path / "lesions")
    growth_plot(study.rows, folder.path / "growth.png")
    if study.tracked is not None:  # a server run keeps its registrations on the server
        from .correctionfile import write_points
        from .trackstate import save_track_state

        save_track_state(folder.path / "tracking", study.tracked, study.images, names, args.registration,
                         {"min_volume_ml": args.min_volume_ml, "min_prompt_fraction": args.min_prompt_fraction})
        if args.confirmed_points is not None:
            write_points(folder.path / "tracking" / "points.json", study.tracked.points, names)
    study.timings["writing"] = time.perf_counter() - t0
    print(format_table([{k: r[k] for k in ("lesion_id", "timepoint", "status", "volume_ml", "long_axis_mm",
                                          "short_axis_mm", "volume_change_vs_baseline_pct",
                                          "lesion_change_category", "recist_information_only")}
                        for r in study.rows], digits=2))
    print("time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in study.timings.items()))
    print(f"wrote {folder.path / 'lesions.csv'}, {folder.path / 'lesions.json'}, {folder.path / 'growth.png'}")
