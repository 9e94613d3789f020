"""DICOM SEG for lesion masks: one timepoint's lesions written as a binary SEG on its CT series,
and a SEG (ours or another tool's) read back as lesion masks on a scan's voxel grid.

Writing (:func:`build_seg`): one **BINARY** segment per lesion (1 bit per voxel, exactly the
voxels of the NIfTI outputs; lesions may overlap, a binary SEG allows it: SegmentsOverlap YES).
Frames lie on the source series' slices, each referencing its CT instance; only the slices that
hold a lesion are stored, and a segment's empty frames are left out (when no lesion has a
voxel, one slice of empty frames is stored: a SEG needs a frame). Every lesion of the study
is a segment at every timepoint (empty where it vanished or lies outside the scan), so segment
numbers never change between timepoints. DICOM wants segment numbers 1..N: when the lesion IDs
are 1..N the segment number *is* the lesion ID, otherwise (e.g. 1, 2, 5) segments are numbered
in lesion-ID order (:func:`segment_numbers` says so in a warning) and each segment still names
its lesion by Tracking ID ('Lesion 5', :func:`.lesionstyle.lesion_label`) and Tracking UID.
Segment label and recommended display colour are the lesion's (the Slicer module's).

Reading (:func:`read_seg`): BINARY, FRACTIONAL (a voxel belongs to the lesion where its value
is at least 0.5 of the maximum) and LABELMAP SEGs in the patient coordinate system. The lesion
ID of a segment is N of its Tracking ID 'Lesion N' when every segment has a distinct one, else
its segment number. Each segment is placed on the reference scan by world position (LPS mm): a
reference voxel takes the value of the SEG voxel nearest to its centre (through highdicom's
volume affine of the SEG's own frames), so a SEG on another grid of the same frame of reference
is resampled, nearest voxel. Refusals are :class:`SegError`, a
:class:`~LesionLocatorLib.prompts.PromptError` (a ``ValueError``): not a SEG, an unsupported
segmentation type or coordinate system, another Frame of Reference UID than the reference
series', or no voxel inside the reference scan.

highdicom builds and parses the objects; it is imported only when one is written or read.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .image import Image, nonzero_bbox
from .lesionstyle import lesion_color, lesion_label
from .prompts import PromptError

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SEG_SOP_CLASSES = (SEG_SOP_CLASS, "1.2.840.10008.5.1.4.1.1.66.7")  # Segmentation, Label Map Segmentation
SEG_SERIES_NUMBER = 901
_TRACKING_ID = re.compile(r"^Lesion ([1-9]\d*)$")


class SegError(PromptError):
    """A DICOM SEG that cannot be read as lesion masks on the reference scan; ``str(e)`` is one
    line naming the file."""


def is_seg_file(path) -> bool:
    """True for a file that is a DICOM (Label Map) Segmentation Storage instance (read up to its SOP class)."""
    import pydicom

    path = Path(path)
    if not path.is_file():
        return False
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001 - anything pydicom cannot parse is not a SEG
        return False
    return str(ds.get("SOPClassUID", "")) in SEG_SOP_CLASSES


def segment_numbers(lesion_ids) -> tuple:
    """({lesion id: segment number}, warning text or None): the lesion ID itself when the IDs
    are 1..N, else 1..N in lesion-ID order, with a warning that says so."""
    ids = sorted(int(i) for i in lesion_ids)
    numbers = {pid: n for n, pid in enumerate(ids, start=1)}
    if ids == list(range(1, len(ids) + 1)):
        return numbers, None
    shown = ", ".join(f"{lesion_label(pid)} = segment {n}" for pid, n in numbers.items() if pid != n)
    return numbers, (f"lesion IDs {', '.join(map(str, ids))} are not 1..{len(ids)}; DICOM SEG segment numbers "
                     f"must be, so the segments are numbered in lesion-ID order ({shown}); each segment keeps its "
                     f"lesion's Tracking ID and Tracking UID")


def _algorithm():
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from . import __version__

    return hd.AlgorithmIdentificationSequence(name="LesionLocator", version=__version__,
                                              family=codes.DCM.ArtificialIntelligence)


def _description(number: int, lesion_id: int, tracking_uid: str, algorithm):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    rgb = [min(255.0, max(0.0, 255.0 * c)) for c in lesion_color(lesion_id)]
    return hd.seg.SegmentDescription(
        segment_number=number, segment_label=lesion_label(lesion_id),
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type="AUTOMATIC", algorithm_identification=algorithm,
        tracking_uid=tracking_uid, tracking_id=lesion_label(lesion_id),
        display_color=hd.color.CIELabColor.from_rgb(*rgb))


def _frames(masks: dict, order: list, shape: tuple) -> tuple:
    """(pixel array for highdicom, the series slices it covers).

    Only the slices holding a lesion are stacked. Without overlap: a label array (slice, row,
    column) of segment numbers (cheap to build and for highdicom to check); with overlap: a bool
    stack (slice, row, column, segment)."""
    from .measure import _bbox  # scipy: imported only when writing

    boxes = {pid: _bbox(np.asarray(masks[pid], dtype=bool)) for pid in order if pid in masks}
    boxes = {pid: box for pid, box in boxes.items() if box is not None}
    occupied = np.zeros(shape[0], dtype=bool)
    for box in boxes.values():
        occupied[box[0]] = True
    slices = np.flatnonzero(occupied)
    first = np.cumsum(occupied) - 1  # series slice -> row of the stack
    labels = np.zeros((slices.size, shape[1], shape[2]), dtype=np.uint8 if len(order) < 256 else np.uint16)
    overlap = False
    for number, pid in enumerate(order, start=1):
        if pid not in boxes:
            continue
        zs, ys, xs = boxes[pid]
        box = (slice(first[zs.start], first[zs.stop - 1] + 1), ys, xs)
        inside = np.asarray(masks[pid], dtype=bool)[zs, ys, xs]
        target = labels[box]
        overlap = overlap or bool(np.any(target[inside]))
        target[inside] = number
    if not overlap:
        return labels, slices
    stack = np.zeros((len(order),) + labels.shape, dtype=bool)  # segment-major: each segment contiguous
    for number, pid in enumerate(order, start=1):
        if pid in boxes:
            zs, ys, xs = boxes[pid]
            stack[number - 1, first[zs.start]:first[zs.stop - 1] + 1, ys, xs] = np.asarray(masks[pid], bool)[zs, ys, xs]
    return np.moveaxis(stack, 0, -1), slices


def check_masks(series, masks: dict) -> None:
    """Raise ``ValueError`` unless every mask has the series' shape (z, y, x)."""
    shape = series.header.shape
    for pid, mask in masks.items():
        if np.shape(mask) != shape:
            raise ValueError(f"lesion {pid}: mask of shape {np.shape(mask)} on series {series.uid} of shape "
                             f"{shape} (z, y, x)")


def build_seg(series, masks: dict, numbers: dict, tracking_uids: dict):
    """The binary SEG (a ``highdicom.seg.Segmentation``, not yet saved) of one timepoint.

    ``series``: the timepoint's :class:`~LesionLocatorLib.dicomseries.DicomSeries`;
    ``masks``: {lesion id: bool (z, y, x) on that series' grid} (a lesion of ``numbers`` without
    a mask is an empty segment); ``numbers``: {lesion id: segment number 1..N}
    (:func:`segment_numbers`); ``tracking_uids``: {lesion id: Tracking UID}. New SOP Instance and
    Series UIDs are random UUID-derived ('2.25.') UIDs; patient and study come from the series.
    Uncompressed (Explicit VR Little Endian: every reader takes it; highdicom's encoding
    ``workers`` apply only to compressed syntaxes).
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    from . import __version__

    check_masks(series, masks)
    shape = series.header.shape
    order = sorted(numbers, key=numbers.get)
    if [numbers[pid] for pid in order] != list(range(1, len(order) + 1)):
        raise ValueError(f"segment numbers must be 1..{len(order)}, got {sorted(numbers.values())}")
    frames, slices = _frames(masks, order, shape)
    empty = slices.size == 0
    if empty:  # every segment empty: one slice of empty frames (highdicom cannot omit them all)
        slices, frames = np.array([0]), np.zeros((1, shape[1], shape[2]), dtype=np.uint8)
    positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, series.datasets[k].ImagePositionPatient)
                 for k in slices]
    algorithm = _algorithm()
    descriptions = [_description(numbers[pid], pid, tracking_uids[pid], algorithm) for pid in order]
    return hd.seg.Segmentation(
        source_images=series.datasets, pixel_array=frames, segmentation_type="BINARY",
        segment_descriptions=descriptions, series_instance_uid=generate_uid(prefix=None),
        series_number=SEG_SERIES_NUMBER, sop_instance_uid=generate_uid(prefix=None), instance_number=1,
        manufacturer="LesionLocator", manufacturer_model_name="LesionLocator", software_versions=__version__,
        device_serial_number="0", series_description="LesionLocator lesions", content_label="LESIONS",
        content_description="Lesions segmented and tracked by LesionLocator", plane_positions=positions,
        omit_empty_frames=not empty)


# --------------------------------------------------------------------------- reading
def _lesion_ids(seg) -> dict:
    """{segment number: lesion id}: N of 'Lesion N' tracking IDs when all segments have distinct
    ones, else the segment numbers."""
    numbers = [int(n) for n in seg.segment_numbers]
    found = {}
    for n in numbers:
        match = _TRACKING_ID.match(str(seg.get_segment_description(n).get("TrackingID", "")).strip())
        if match:
            found[n] = int(match.group(1))
    if len(found) == len(numbers) and len(set(found.values())) == len(numbers):
        return found
    return {n: n for n in numbers}


def _index_affine(image: Image) -> np.ndarray:
    """4x4 map from ``image``'s voxel index (z, y, x, 1) to LPS mm (x, y, z, 1)."""
    out = np.eye(4)
    scaled = image.direction * np.asarray(image.spacing)  # columns: i, j, k steps in mm
    out[:3, :3] = scaled[:, ::-1]
    out[:3, 3] = image.origin
    return out


def place_on_grid(values: np.ndarray, affine: np.ndarray, reference: Image) -> np.ndarray:
    """A bool (z, y, x) mask on ``reference``: each reference voxel takes the value of the voxel
    of ``values`` (a bool 3D array whose index maps to LPS mm through the 4x4 ``affine``) nearest
    to its centre; False outside ``values``."""
    out = np.zeros(reference.shape, dtype=bool)
    if not values.any():
        return out
    to_ref = np.linalg.inv(_index_affine(reference)) @ affine
    (lo0, hi0), (lo1, hi1), (lo2, hi2) = nonzero_bbox(values)
    lo, hi = (lo0, lo1, lo2), (hi0 - 1, hi1 - 1, hi2 - 1)
    corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    box = (corners @ to_ref.T)[:, :3]
    start = np.maximum(np.floor(box.min(axis=0)).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(box.max(axis=0)).astype(int) + 2, reference.shape)
    if np.any(stop <= start):
        return out
    to_values = np.linalg.inv(affine) @ _index_affine(reference)
    ys, xs = np.mgrid[start[1]:stop[1], start[2]:stop[2]]
    plane = np.stack([np.zeros_like(ys), ys, xs, np.ones_like(ys)], axis=-1).reshape(-1, 4).astype(float)
    limit = np.asarray(values.shape)
    for z in range(start[0], stop[0]):
        plane[:, 0] = z
        idx = np.rint(plane @ to_values[:3].T).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < limit), axis=1)
        hit = np.zeros(len(idx), dtype=bool)
        hit[inside] = values[idx[inside, 0], idx[inside, 1], idx[inside, 2]]
        out[z, start[1]:stop[1], start[2]:stop[2]] = hit.reshape(ys.shape)
    return out


def _open(path: Path):
    import highdicom as hd

    if not path.is_file():
        raise FileNotFoundError(f"DICOM SEG not found: {path}")
    if not is_seg_file(path):
        raise SegError(f"{path}: not a DICOM SEG (Segmentation or Label Map Segmentation Storage) file")
    try:
        seg = hd.seg.segread(path)
    except Exception as e:  # noqa: BLE001 - highdicom raises many types for malformed objects
        raise SegError(f"{path}: cannot read the DICOM SEG ({type(e).__name__}: {e})") from None
    kind = seg.segmentation_type.value
    if kind not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise SegError(f"{path}: segmentation type {kind} is not supported (binary, fractional or labelmap)")
    system = seg.coordinate_system
    if system is None or system.value != "PATIENT":
        raise SegError(f"{path}: the SEG is not in the patient coordinate system "
                       f"({system.value if system else 'no coordinate system'}); it cannot be placed on a CT scan")
    return seg


def read_seg(path, reference: Image, series=None) -> dict:
    """{lesion id: bool (z, y, x) mask on ``reference``'s grid} from the DICOM SEG at ``path``.

    ``series``: the reference scan's :class:`~LesionLocatorLib.dicomseries.DicomSeries`, when it
    is one: the SEG must have its Frame of Reference UID. Segments that are empty on the
    reference grid are returned empty (a lesion without voxels there); a SEG none of whose
    segments has a voxel inside the reference scan is refused. Raises :class:`SegError`.
    """
    path = Path(path)
    seg = _open(path)
    frame = str(seg.get("FrameOfReferenceUID", ""))
    if series is not None:
        theirs = str(series.first.get("FrameOfReferenceUID", "") or "")
        if theirs and frame != theirs:
            raise SegError(f"{path}: the SEG is in frame of reference {frame or '(none)'}, the scan {series.folder} "
                           f"(series {series.uid}) in {theirs}: it was drawn on another scan's coordinates; "
                           f"register the scans or segment this one")
    ids = _lesion_ids(seg)
    fractional = seg.segmentation_type.value == "FRACTIONAL"
    masks = {}
    for number, pid in sorted(ids.items()):
        try:
            volume = seg.get_volume(segment_numbers=[number], combine_segments=False,
                                    dtype=np.float32 if fractional else bool)
        except Exception as e:  # noqa: BLE001 - irregular frames, missing positions, ...
            raise SegError(f"{path}: segment {number} cannot be read as a volume ({type(e).__name__}: {e})") from None
        values = np.asarray(volume.array)[..., 0]
        values = values >= 0.5 if fractional else values.astype(bool, copy=False)
        masks[pid] = place_on_grid(values, np.asarray(volume.affine, dtype=float), reference)
    if not any(mask.any() for mask in masks.values()):
        origin = tuple(round(v, 1) for v in reference.origin)
        raise SegError(f"{path}: none of its {len(masks)} segment(s) has a voxel inside the scan it is to be "
                       f"placed on (shape {reference.shape} (z, y, x), origin {origin} LPS mm): the SEG belongs "
                       f"to another scan or region")
    return masks


def seg_label_image(path, reference: Image) -> Image:
    """The DICOM SEG at ``path`` as an instance label image on ``reference``'s grid (label = lesion
    ID, :func:`read_seg`; where lesions overlap, the lower ID)."""
    masks = read_seg(path, reference)
    if max(masks, default=0) > 65535:
        raise SegError(f"{path}: lesion IDs above 65535 do not fit a label image")
    labels = np.zeros(reference.shape, dtype=np.uint16)
    for pid in sorted(masks, reverse=True):
        labels[masks[pid]] = pid
    return reference.with_array(labels)
