"""A patient's scans over time, as every front end runs them: dates, models, tracking, measurement.

:func:`track_study` is the one pipeline behind ``lesionlocator track``, ``lesionlocator demo``,
the worker's ``track`` message (:class:`LesionLocatorLib.runner.InProcessRunner`) and so the Slicer
module's Track button: it loads the models a request needs, tracks the lesions through the scans
in the order given (:func:`LesionLocatorLib.track.track`), measures every lesion at every
timepoint (:func:`LesionLocatorLib.measure.lesion_measurements`) and warns when the scans' dates
disagree with that order.

Dates are DICOM study/acquisition date and time as one sortable text ``YYYYMMDDHHMMSS.ffffff``
(:func:`dicom_datetime`); scans without one are simply not compared.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
import numpy as np

from .modelfolder import ModelSpec
from .prompts import Box, MaskPrompt, Point, PromptError, VoxelPrompt


# --------------------------------------------------------------------------- dates
def dicom_datetime(date, time=None) -> str | None:
    """A DICOM date (``YYYYMMDD``; separators ignored) and optional time (``HHMMSS.ffffff``, any
    precision) as one sortable text ``YYYYMMDDHHMMSS.ffffff``, or None without a valid date."""
    date = "".join(ch for ch in (date or "") if ch.isdigit())
    if len(date) != 8:
        return None
    whole, _, fraction = (time or "").strip().partition(".")
    whole = "".join(ch for ch in whole if ch.isdigit())[:6].ljust(6, "0")
    fraction = ("".join(ch for ch in fraction if ch.isdigit()) or "0")[:6].ljust(6, "0")
    return f"{date}{whole}.{fraction}"


DICOM_DATE_TAGS = (("0008|0022", "0008|0032"), ("0008|0021", "0008|0031"), ("0008|0020", "0008|0030"))
"""(date, time) header keys tried in turn: acquisition, series, study."""


def scan_datetime(path) -> str | None:
    """The acquisition (else series, else study) date and time stored in an image file's header
    (:func:`dicom_datetime` form), or None when the header has none or cannot be read."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    keys = set(reader.GetMetaDataKeys())
    for date, time in DICOM_DATE_TAGS:
        if date in keys:
            return dicom_datetime(reader.GetMetaData(date), reader.GetMetaData(time) if time in keys else None)
    return None


def chronological_order(dates) -> list | None:
    """Indices that put ``dates`` in time order (ties keep their order), or None unless every
    item has a date (then the caller keeps its own order, e.g. load order)."""
    dates = list(dates)
    if not dates or not all(dates):
        return None
    return sorted(range(len(dates)), key=lambda i: (dates[i], i))


def date_order_warnings(names, dates) -> list:
    """Messages for scans dated before the scan tracked just before them (``names[0]``/``dates[0]``
    is the baseline); tracking follows the order given, so the user should know."""
    out = []
    for t in range(1, len(names)):
        if dates[t] and dates[t - 1] and dates[t] < dates[t - 1]:
            out.append(f"'{names[t]}' ({dates[t][:8]}) is dated before '{names[t - 1]}' ({dates[t - 1][:8]}), "
                       f"which is tracked before it; tracking follows the order given")
    return out


def user_messages(record) -> list:
    """The unique messages, in order, of the ``UserWarning`` s among recorded warnings (the
    library's messages for the user; a ResourceWarning or DeprecationWarning that happens to be
    raised meanwhile, e.g. by garbage collection, is not one)."""
    out = []
    for w in record:
        if issubclass(w.category, UserWarning) and str(w.message) not in out:
            out.append(str(w.message))
    return out


# --------------------------------------------------------------------------- the pipeline
@dataclass
class StudyResult:
    """What :func:`track_study` gives, in the scans' order (t = 0 the baseline).

    ``masks[t][id]``: bool (z, y, x) on scan t; ``labels[t]``: instance label Image;
    ``status[id][t]``: 'tracked', 'vanished' or 'outside'; ``rows``: one measurement row per
    lesion and timepoint (:func:`LesionLocatorLib.measure.lesion_measurements`: volume ml,
    axes mm, changes %); ``transforms[t-1]``: the registration of scan t to scan t-1;
    ``timings``: seconds per stage; ``warnings``: messages for the user (dates, the library's
    warnings while tracking); ``tracked``: the :class:`~LesionLocatorLib.track.TrackResult`
    (with inside fractions and verified-tracking points) to save or correct later."""
    masks: list
    labels: list
    status: dict
    rows: list
    transforms: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    tracked: object = None


def load_for(spec: ModelSpec, prompt_type: str):
    """The loaded model of ``spec`` for a prompt type ('point', 'box', 'prev_mask')."""
    from .model import load_model

    return load_model(spec.path, prompt_type, folds=list(spec.folds) if spec.folds is not None else None,
                      device=spec.device, tta=spec.tta, backend=spec.backend)


def _baseline_kind(prompts) -> str | None:
    """'point' or 'box' for point/box prompts (world or voxel: the model that segments the
    baseline), None for masks and label images."""
    if isinstance(prompts, dict) or not isinstance(prompts, (list, tuple)):
        return None
    kinds = {p.kind if isinstance(p, VoxelPrompt) else
             "point" if isinstance(p, Point) else "box" if isinstance(p, Box) else "mask" for p in prompts}
    if kinds <= {"mask"}:
        return None
    if len(kinds) > 1:
        raise PromptError("track the baseline from one kind of prompt: points, boxes or masks, not a mix")
    return kinds.pop()


def track_study(images, prompts, model: ModelSpec, names=None, dates=None, registration: str = "simpleitk",
                registration_options: dict | None = None, min_volume_ml: float = 0.0,
                min_prompt_fraction: float = 0.0, progress=None, cancel=None, load=load_for,
                corrections=None, previous=None, confirm=None) -> StudyResult:
    """Track the lesions of ``images[0]`` through ``images[1:]`` (in the order given) and measure them.

    ``images``: :class:`~LesionLocatorLib.image.Image` scans, baseline first. ``prompts``: the
    baseline lesions as point or box prompts (segmented first with the point or box model),
    MaskPrompts, an instance label Image, or ``{lesion id: bool (z, y, x) mask}`` on the baseline
    (an empty mask is a lesion reported ``vanished`` throughout). ``model``: which model root,
    folds, device and mirroring to use; ``load(model, prompt_type)`` loads one of its networks
    (a runner passes its model cache). ``names[t]``: the scans' names in the rows (default t0,
    t1, ...); ``dates[t]``: optional :func:`dicom_datetime` texts, compared to warn about scans
    out of time order. ``corrections``: :class:`~LesionLocatorLib.correct.Correction` s applied
    after tracking (:func:`LesionLocatorLib.correct.retrack`: the corrected lesions re-propagated
    from their corrections, with the same registrations). ``previous``: an earlier run's
    :class:`~LesionLocatorLib.track.TrackResult` on the same images (e.g.
    :func:`LesionLocatorLib.trackstate.load_track_state`): it is not tracked again, only
    ``corrections`` are applied to it (``prompts`` are not used). ``confirm``: verified tracking
    (:func:`LesionLocatorLib.track.track`). The other options are
    :func:`LesionLocatorLib.track.track`'s.
    """
    from .measure import lesion_measurements
    from .track import track

    images = list(images)
    names = list(names) if names is not None else [f"t{t}" for t in range(len(images))]
    if len(names) != len(images):
        raise ValueError(f"{len(images)} scans but {len(names)} names")
    messages = date_order_warnings(names, list(dates)) if dates is not None else []
    empty_ids = []
    if previous is not None:
        if len(previous.masks) != len(images) or len(previous.transforms) != len(images) - 1:
            raise ValueError(f"the earlier run tracked {len(previous.masks)} scans; {len(images)} were given")
        prompts = []
    elif isinstance(prompts, dict):
        empty_ids = sorted(int(pid) for pid, mask in prompts.items() if not np.any(mask))
        prompts = [MaskPrompt(int(pid), images[0].with_array(np.asarray(mask, dtype=np.uint8)))
                   for pid, mask in sorted(prompts.items()) if np.any(mask)]
        if not prompts:
            raise PromptError("every baseline lesion mask is empty: nothing to track")
    kind = _baseline_kind(prompts)
    report = progress or (lambda fraction, message: None)
    report(0.0, "loading the models")
    seg_model = load(model, kind) if kind is not None else None
    track_model = load(model, "prev_mask")
    corrections = list(corrections or [])
    share = 0.0 if previous is not None else 0.8 if corrections else 1.0  # of the progress bar for tracking
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if previous is None:
            result = track(images, prompts, track_model, seg_model=seg_model, registration=registration,
                           registration_options=registration_options, progress=lambda f, m: report(share * f, m),
                           cancel=cancel, min_volume_ml=min_volume_ml, min_prompt_fraction=min_prompt_fraction,
                           confirm=confirm)
        else:
            result = previous
        if corrections:
            from .correct import retrack

            kinds = sorted({c.kind for c in corrections} & {"point", "box"})
            models = {k: seg_model if k == kind else load(model, k) for k in kinds}
            result = retrack(images, result, corrections, track_model, models, cancel=cancel,
                             progress=lambda f, m: report(share + (1 - share) * f, f"corrections: {m}"),
                             min_volume_ml=min_volume_ml, min_prompt_fraction=min_prompt_fraction)
    for pid in empty_ids:  # lesions without voxels at baseline: reported, never searched for
        result.status[pid] = ["vanished"] * len(images)
        for t, masks in enumerate(result.masks):
            masks[pid] = np.zeros(images[t].shape, bool)
    rows = lesion_measurements(images, result.masks, result.status, names)
    messages += [m for m in user_messages(caught) if m not in messages]
    return StudyResult(result.masks, result.labels, result.status, rows, result.transforms, dict(result.timings),
                       messages, result)
