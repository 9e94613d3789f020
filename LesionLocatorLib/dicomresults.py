"""DICOM results of a study (``--dicom-out``): per timepoint a binary SEG of its lesions and a
TID 1500 SR of their measurements, the one entry point the command line and Slicer call.

Files: ``<name>_seg.dcm`` (:mod:`.dicomseg`) and ``<name>_sr.dcm`` (:mod:`.dicomsr`) per
timepoint, in the output folder, each written atomically (:func:`.files.atomic_output`; the SR
after the SEG, so an SR on disk means that timepoint is complete). A timepoint where no lesion
has a voxel still gets its SEG (every segment empty, stored as one slice of empty frames) and
its SR (no segment references).

UIDs: all under the UUID-derived root '2.25.' (needs no registration). New objects (SEG, SR,
their series) get random ones. A lesion's **Tracking UID is derived**, not stored: a name-based
UUID (RFC 4122 version 5, SHA-1) of the baseline Series Instance UID and the lesion ID
(:func:`tracking_uid`), so it is the same at every timepoint, in every re-run on the same
baseline series, and in ``segment --dicom-out`` on the baseline and a later ``track``. (pydicom's
``generate_uid(prefix=None, entropy_srcs=...)`` would not do: with ``prefix=None`` it ignores
``entropy_srcs`` and returns a random UUID.)
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .files import atomic_output

UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_OID, "LesionLocator")


class DicomWritten(NamedTuple):
    """What :func:`write_dicom_results` wrote (``paths``, SEG then SR per timepoint) and the
    ``warnings`` to show the user (one line each)."""

    paths: list
    warnings: list


def derived_uid(*parts) -> str:
    """A '2.25.' UID of a version-5 (name-based) UUID of ``parts``: the same parts, the same UID."""
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, '/'.join(str(p) for p in parts)).int}"


def tracking_uid(baseline_series_uid: str, lesion_id: int) -> str:
    """The Tracking UID of lesion ``lesion_id`` of the study whose baseline is series
    ``baseline_series_uid``."""
    return derived_uid("tracking", str(baseline_series_uid), int(lesion_id))


def seg_path(out_dir, name: str) -> Path:
    return Path(out_dir) / f"{name}_seg.dcm"


def sr_path(out_dir, name: str) -> Path:
    return Path(out_dir) / f"{name}_sr.dcm"


def save_dataset(ds, path) -> Path:
    """Save a DICOM dataset (with its file meta) atomically; the file is read back (header) and
    must hold the same SOP Instance UID."""
    import pydicom

    def verify(tmp: Path) -> None:
        back = pydicom.dcmread(tmp, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        if str(back.SOPInstanceUID) != str(ds.SOPInstanceUID):
            raise OSError(f"read back SOP Instance UID {back.SOPInstanceUID}, wrote {ds.SOPInstanceUID}")

    with atomic_output(path, verify=verify) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return Path(path)


REFERENCED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPClassUID", "SOPInstanceUID")


def check_references(series) -> None:
    """Raise ``ValueError`` unless ``series`` (a DicomSeries) has every UID a SEG and SR must
    reference: study, series, frame of reference, and each slice's SOP Class and Instance UIDs.
    (Anonymised or hand-made series sometimes have them empty; nothing is made up for them.)"""
    lacking = [key for key in REFERENCED_UIDS if any(not str(ds.get(key, "") or "") for ds in series.datasets)]
    if lacking:
        raise ValueError(f"{series.folder}: the series has no {', '.join(lacking)} (empty in its files), so a DICOM "
                         f"SEG and SR cannot reference it")


def _rows_at(rows: list, t: int, name: str) -> list:
    return [r for r in rows if (r["index"] == t if "index" in r else str(r.get("timepoint")) == name)]


def write_dicom_results(out_dir, series_list, names, masks_by_timepoint, rows, *,
                        baseline_uid: str | None = None) -> DicomWritten:
    """Write each timepoint's SEG and SR into ``out_dir`` (created); returns (paths, warnings).

    ``series_list[t]``: the timepoint's :class:`~LesionLocatorLib.dicomseries.DicomSeries`
    (every timepoint must be a DICOM series: patient, study and instances are never made up);
    ``names[t]``: its name (file names, SR Time Point); ``masks_by_timepoint[t]``: {lesion id:
    bool (z, y, x) on that series' grid}; ``rows``: the measurement rows of all timepoints
    (:func:`LesionLocatorLib.measure.lesion_measurements`, one per lesion and timepoint, matched
    by their ``index``). ``baseline_uid``: the series the Tracking UIDs derive from (default:
    ``series_list[0]``).
    """
    from .dicomseg import build_seg, check_masks, segment_numbers
    from .dicomsr import build_sr

    series_list, names = list(series_list), [str(n) for n in names]
    masks_by_timepoint = [{int(p): m for p, m in masks.items()} for masks in masks_by_timepoint]
    if not (len(series_list) == len(names) == len(masks_by_timepoint)) or not series_list:
        raise ValueError(f"{len(series_list)} series, {len(names)} names and {len(masks_by_timepoint)} mask sets: "
                         f"need one of each per timepoint")
    missing = [n for n, s in zip(names, series_list) if s is None]
    if missing:
        raise ValueError(f"DICOM SEG and SR need a DICOM series for every timepoint; not DICOM: {', '.join(missing)}")
    ids = sorted({p for masks in masks_by_timepoint for p in masks} | {int(r["lesion_id"]) for r in rows})
    rows_at = []
    for t, (series, name, masks) in enumerate(zip(series_list, names, masks_by_timepoint)):
        check_references(series)
        check_masks(series, masks)
        rows_at.append(_rows_at(rows, t, name))
        lacking = sorted(set(ids) - {int(r["lesion_id"]) for r in rows_at[-1]})
        if lacking:
            raise ValueError(f"timepoint {name}: no measurement row for lesion(s) {', '.join(map(str, lacking))}")
    numbers, warning = segment_numbers(ids)
    baseline = baseline_uid or series_list[0].uid
    uids = {pid: tracking_uid(baseline, pid) for pid in ids}
    written = []
    for series, name, masks, at in zip(series_list, names, masks_by_timepoint, rows_at):
        seg = build_seg(series, masks, numbers, uids)
        written.append(save_dataset(seg, seg_path(out_dir, name)))
        with_voxels = {pid: numbers[pid] for pid, mask in masks.items() if np.any(mask)}
        sr = build_sr(series, at, uids, name, seg, with_voxels)
        written.append(save_dataset(sr, sr_path(out_dir, name)))
    return DicomWritten(written, [warning] if warning else [])
