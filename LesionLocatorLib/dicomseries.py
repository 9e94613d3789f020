"""DICOM image series as input: find the series in a folder, check them, read one as an :class:`Image`.

Finding: a folder (searched with its subfolders, as PACS exports and DICOMDIR media lay files out;
hidden files and the DICOMDIR index itself are skipped, its files are found by the search) is a
DICOM input when it holds DICOM files. Files are recognised by their content, never by their name
(media files have no extension): the DICOM preamble ("DICM" at byte 128), or, for files written
without it (bare datasets of old ACR-NEMA-style exports), a first data element of group 0002 or
0008. Image series are told apart by Series Instance UID (files without one, as some anonymisers
leave them, make one series with an empty UID, chosen with ``--series ""``); a folder with one
image series is read as that volume, a folder with several needs the series chosen
(``--series UID``), and the error lists them (UID, number, modality, description, slices, rows x
columns). Instances that are not images (SEG, SR, RT objects, presentation states, key objects)
are skipped, so results written beside a study do not make it ambiguous; so are **localizer**
(scout) images (Image Type LOCALIZER) in an image series, with a warning: a projection image is
never a slice of the volume.

What is read: single-frame image instances of one series, one slice each. Checked before any
voxel is decoded, each with a one-line :class:`DicomError`: one grey value per pixel (colour and
multi-frame images are refused); same rows, columns, pixel spacing and orientation in every
slice; no two slices at one position; slice positions on one straight line along the slice normal
(a **gantry-tilted** series, whose slices are shifted sideways from slice to slice, is
**refused** with its angle: resampling it would change the voxels a radiologist measured on);
even slice spacing (a **gap** - missing slices - is refused and located); a transfer syntax this
installation can decode (else the error names it). **Oblique** series (any orientation with the
slices stacked along its normal) are read with their geometry as it is: the :class:`Image`
direction is the DICOM orientation, nothing is resampled. Tolerances: :data:`POSITION_TOLERANCE`,
:data:`TILT_TOLERANCE`, :data:`SAME_TOLERANCE`.

Geometry: array index (z, y, x) = (slice, row, column); slices are sorted along the normal
``n = row direction x column direction`` (ITK's and Slicer's order); ``origin`` is the first
slice's Image Position (Patient); ``direction`` columns are the row direction (x: along a row,
i.e. increasing column), column direction (y) and ``n``; spacing (x, y, z) is (column spacing,
row spacing, slice step) in millimetres, the step being the distance from the first to the last
slice over the number of steps. DICOM's patient frame is LPS, like the library's.

Voxels: the stored values (signed or unsigned as Pixel Representation says, bits beyond Bits
Stored ignored) through each slice's own Modality LUT (Rescale Slope and Intercept, Hounsfield
units for CT; or a Modality LUT Sequence): int16 when every slice's slope and intercept are
integers and every value fits, else float32. Kept as they are: voxels equal to Pixel Padding Value
(outside a CT's reconstruction circle; ITK and GDCM keep them too, the model's CT normalisation
clips them) and the values of MONOCHROME1 images (white for the lowest value is a display rule,
a Hounsfield unit means the same; ITK and GDCM invert them, v -> -1 - v).

pydicom (3.x) reads the files, each once for its header and once more only from its Pixel Data
element on; JPEG, JPEG-LS, JPEG 2000, HTJ2K and RLE data are decoded by the pylibjpeg plugins
and pyjpegls this package depends on.
"""
from __future__ import annotations

import math
import os
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .image import Image, ImageError, ImageHeader
from .imagechecks import check_fits_in_memory, check_geometry

# Modalities that are never image series to read (results and annotations beside the images).
NON_IMAGE_MODALITIES = ("SEG", "SR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "PR", "KO", "REG", "DOC",
                        "PLAN", "FID")
POSITION_TOLERANCE = 0.2
"""Largest distance of a slice from its place in an evenly spaced stack (through the first and the
last slice), as a fraction of the slice step. A missing slice puts some slice at least half a
step off; position rounding in real exports stays under a tenth of a step (0.05 mm on 0.625 mm
slices when positions are written to 0.1 mm)."""
TILT_TOLERANCE = 0.25
"""Largest sideways shift of a slice from the line through the first slice along the normal, in
in-plane pixels: reading such a stack as orthogonal misplaces voxels by at most a quarter pixel.
A real gantry tilt shifts slices by millimetres (0.9 mm per 2.5 mm slice at 20 degrees),
position rounding by thousandths of a millimetre."""
SAME_TOLERANCE = 1e-4
"""Largest difference between slices in a direction cosine of Image Orientation (Patient)
(0.006 degrees) or in Pixel Spacing (mm): above rounding in the files, far below anything visible."""
SAME_POSITION_MM = 1e-3
"""Two slices closer than this along the normal are at one position."""
NEWER_SYNTAXES = {"1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
                  "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
                  "1.2.840.10008.1.2.4.112": "JPEG XL"}
"""Names of transfer syntaxes newer than pydicom 3.0's dictionary, for the refusal message."""
_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN "
                 b"UR US UT UV".split())


class DicomError(ImageError):
    """A DICOM input that cannot be read as a volume; ``str(e)`` is one line naming the folder."""


@dataclass(frozen=True)
class SeriesSummary:
    """One series in a folder, as listed to the user: ``files`` counts its image instances
    (localizers left out)."""

    uid: str
    number: str
    modality: str
    description: str
    files: int
    rows: int
    columns: int
    study_date: str

    def line(self) -> str:
        return (f"{self.uid or '(no Series Instance UID)'}  #{self.number or '-'} {self.modality or '?'} "
                f"{self.description or '(no description)'!r}: {self.files} image(s) of {self.rows}x{self.columns}, "
                f"study date {self.study_date or '-'}")


@dataclass
class DicomSeries:
    """A checked image series: its instances' headers (no pixel data) in slice order, so that
    ``datasets[k]`` and ``files[k]`` are array slice ``k``; ``header`` is the volume's geometry;
    ``offsets[k]``: where file k's Pixel Data element starts (None: decode from the whole file);
    ``notes``: what was left out (localizers), also given as warnings."""

    folder: Path
    files: list
    datasets: list
    header: ImageHeader
    offsets: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def first(self):
        return self.datasets[0]

    @property
    def uid(self) -> str:
        return str(self.first.get("SeriesInstanceUID", "") or "")

    @property
    def study_uid(self) -> str:
        return str(self.first.get("StudyInstanceUID", "") or "")

    @property
    def modality(self) -> str:
        return str(self.first.get("Modality", "") or "")

    def datetime(self) -> str | None:
        """The earliest acquisition date and time of the slices, else the series', else the study's
        (:func:`~LesionLocatorLib.study.dicom_datetime` form); None when no slice has a valid date."""
        from .study import dicom_datetime

        for date, time in (("AcquisitionDate", "AcquisitionTime"), ("SeriesDate", "SeriesTime"),
                           ("StudyDate", "StudyTime")):
            values = [dicom_datetime(str(ds.get(date, "") or ""), str(ds.get(time, "") or "")) for ds in self.datasets]
            if any(values):
                return min(v for v in values if v)
        return None


class _Instance(NamedTuple):
    path: Path
    ds: object                # pydicom Dataset, read up to its pixel data
    offset: int | None        # where its Pixel Data element starts; None: decode from the whole file


# --------------------------------------------------------------------------- finding files
def _candidates(folder: Path):
    """Files under ``folder`` and its subfolders, without hidden ones and DICOMDIR indexes."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.upper() != "DICOMDIR":
                yield Path(root) / name


def _bare_dataset(head: bytes) -> bool:
    """A dataset without preamble and file meta: it starts with a little-endian element of group
    0x0002 or 0x0008, in explicit VR (a VR's two letters) or implicit VR (an even length < 64 KiB)."""
    if len(head) < 8:
        return False
    group, element, length = struct.unpack_from("<HHI", head)
    return (group in (0x0002, 0x0008) and element < 0x0100
            and (head[4:6] in _VRS or (length < 1 << 16 and length % 2 == 0)))


def is_dicom_file(path) -> bool:
    """True for a file with the DICOM preamble or a bare DICOM dataset (by content, not by name)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or _bare_dataset(head)


def dicom_files(folder) -> list:
    """DICOM files under ``folder`` and its subfolders (hidden files and DICOMDIR skipped), sorted."""
    return sorted(p for p in _candidates(Path(folder)) if is_dicom_file(p))


def is_dicom_folder(path) -> bool:
    """True for a folder holding at least one DICOM file (itself or in subfolders)."""
    path = Path(path)
    return path.is_dir() and any(is_dicom_file(p) for p in _candidates(path))


# --------------------------------------------------------------------------- reading headers
def _read_instance(path: Path) -> _Instance:
    """The header of one file (parsed up to its pixel data) and where its Pixel Data starts."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    try:
        with open(path, "rb") as f:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            offset = f.tell()
    except Exception as e:  # noqa: BLE001 - pydicom raises many types for broken files
        raise DicomError(f"{path}: not a readable DICOM file ({type(e).__name__}: {e})") from None
    deflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
    return _Instance(path, ds, None if deflated else offset)


def _is_image(ds) -> bool:
    return "Rows" in ds and str(ds.get("Modality", "") or "").upper() not in NON_IMAGE_MODALITIES


def _is_localizer(ds) -> bool:
    image_type = ds.get("ImageType") or []
    values = [image_type] if isinstance(image_type, str) else list(image_type)
    return any(str(v).strip().upper() == "LOCALIZER" for v in values)


def _read_headers(folder: Path) -> dict:
    """{series UID: [_Instance, ...]} of the image series in ``folder`` (localizers included; a
    series of localizers only is left out)."""
    files = dicom_files(folder)
    if not files:
        raise DicomError(f"{folder}: no DICOM files in this folder or its subfolders")
    series = {}
    for path in files:
        instance = _read_instance(path)
        if _is_image(instance.ds):
            series.setdefault(str(instance.ds.get("SeriesInstanceUID", "") or ""), []).append(instance)
    series = {uid: items for uid, items in series.items() if not all(_is_localizer(i.ds) for i in items)}
    if not series:
        raise DicomError(f"{folder}: {len(files)} DICOM file(s) but no image series (only segmentations, "
                         f"reports, localizer images or other non-image objects)")
    return series


def _summary(uid: str, items: list) -> SeriesSummary:
    images = [i.ds for i in items if not _is_localizer(i.ds)]
    ds = images[0]
    return SeriesSummary(uid, str(ds.get("SeriesNumber", "") or ""), str(ds.get("Modality", "") or ""),
                         str(ds.get("SeriesDescription", "") or ""), len(images), int(ds.get("Rows", 0) or 0),
                         int(ds.get("Columns", 0) or 0), str(ds.get("StudyDate", "") or ""))


def _listing(series: dict) -> list:
    return sorted((_summary(uid, items) for uid, items in series.items()), key=lambda s: (s.number.zfill(8), s.uid))


def list_series(folder) -> list:
    """The image series in ``folder`` (:class:`SeriesSummary`), by series number then UID."""
    return _listing(_read_headers(Path(folder)))


def _choose(folder: Path, series: dict, wanted) -> str:
    if len(series) == 1:
        return next(iter(series))
    picked = [u for u in dict.fromkeys(str(u) for u in (wanted or ())) if u in series]
    if not picked:
        listing = "; ".join(s.line() for s in _listing(series))
        raise DicomError(f"{folder} holds {len(series)} image series; choose one with --series UID: {listing}")
    if len(picked) > 1:
        raise DicomError(f"{folder}: --series names {len(picked)} of its series ({', '.join(picked)}); name one")
    return picked[0]


def _without_localizers(items: list, where: str) -> tuple:
    """(the series' slices, notes on the localizers left out)."""
    localizers = [i.path.name for i in items if _is_localizer(i.ds)]
    if not localizers:
        return items, []
    shown = ", ".join(localizers[:3]) + (", ..." if len(localizers) > 3 else "")
    note = (f"{where}: left out {len(localizers)} localizer (scout) image(s) ({shown}): projections, not slices "
            f"of the volume")
    return [i for i in items if not _is_localizer(i.ds)], [note]


# --------------------------------------------------------------------------- checking geometry
def _floats(instance: _Instance, keyword: str, count: int) -> np.ndarray:
    value = instance.ds.get(keyword)
    try:
        out = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        out = np.array([])
    if out.size != count or not np.all(np.isfinite(out)):
        raise DicomError(f"{instance.path}: {keyword} is missing or invalid ({value!r}); cannot place the slice "
                         f"in space")
    return out


def _check_same(items: list, keyword: str, values, where: str) -> None:
    values = np.asarray(values, dtype=float).reshape(len(items), -1)
    differ = np.flatnonzero(np.abs(values - values[0]).max(axis=1) > SAME_TOLERANCE)
    if differ.size:
        k = int(differ[0])
        shown = [f"{v[0]:g}" if v.size == 1 else "[" + ", ".join(f"{x:g}" for x in v) + "]" for v in values[[0, k]]]
        raise DicomError(f"{where}: slices differ in {keyword} ({items[0].path.name}: {shown[0]}, "
                         f"{items[k].path.name}: {shown[1]}); a volume needs the same value in every slice")


def _check_frames(items: list) -> None:
    """One frame of one grey value per pixel in every instance."""
    for path, ds, _ in items:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
            raise DicomError(f"{path}: a multi-frame (enhanced) image with {frames} frame(s); only series of "
                             f"single-frame images are read (export the series as classic single-frame images)")
        photometric = str(ds.get("PhotometricInterpretation", "") or "MONOCHROME2").strip().upper()
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise DicomError(f"{path}: a colour image ({photometric}); a scan has one grey value per pixel")


def _plane(items: list, where: str) -> tuple:
    """(row direction, column direction, pixel spacing (between rows, between columns)), the same in
    every slice."""
    for keyword in ("Rows", "Columns"):
        _check_same(items, keyword, [int(i.ds.get(keyword, 0) or 0) for i in items], where)
    orientations = [_floats(i, "ImageOrientationPatient", 6) for i in items]
    _check_same(items, "ImageOrientationPatient", orientations, where)
    spacings = [_floats(i, "PixelSpacing", 2) for i in items]
    _check_same(items, "PixelSpacing", spacings, where)
    row, col = orientations[0][:3], orientations[0][3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise DicomError(f"{items[0].path}: Image Orientation (Patient) {list(orientations[0])} is not two "
                         f"perpendicular unit vectors")
    if np.any(spacings[0] <= 0):
        raise DicomError(f"{items[0].path}: Pixel Spacing {list(spacings[0])} is not positive")
    return row / np.linalg.norm(row), col / np.linalg.norm(col), spacings[0]


def _check_duplicates(items: list, along: np.ndarray, where: str) -> None:
    same = np.flatnonzero(np.diff(along) < SAME_POSITION_MM)
    if same.size:
        k = int(same[0])
        raise DicomError(f"{where}: {items[k].path.name} and {items[k + 1].path.name} are at the same position "
                         f"({along[k]:.3f} mm along the slice normal; {same.size} such pair(s)): several "
                         f"acquisitions, echoes or phases in one series cannot be one volume")


def _check_even(items: list, along: np.ndarray, step: float, where: str) -> None:
    worst = float(np.max(np.abs(along - along[0] - step * np.arange(len(along)))))
    if worst <= POSITION_TOLERANCE * step:
        return
    steps = np.diff(along)
    typical = float(np.median(steps))
    k = int(np.argmax(np.abs(steps - typical)))
    kind = "missing slice(s)" if steps[k] > 1.5 * typical else "uneven slice spacing"
    raise DicomError(f"{where}: {kind}: {steps[k]:.3f} mm between {items[k].path.name} and "
                     f"{items[k + 1].path.name} where the slices are {typical:.3f} mm apart; an evenly spaced "
                     f"volume would misplace slices by up to {worst:.3f} mm (re-export the complete series)")


def _check_tilt(items: list, positions: np.ndarray, normal: np.ndarray, pixel: np.ndarray, where: str) -> None:
    offsets = positions - positions[0]
    along = offsets @ normal
    shift = np.linalg.norm(offsets - np.outer(along, normal), axis=1)
    k = int(np.argmax(shift))
    if shift[k] <= TILT_TOLERANCE * float(min(pixel)):
        return
    angle = math.degrees(math.atan2(float(shift[k]), abs(float(along[k]))))
    tilt = items[0].ds.get("GantryDetectorTilt")
    said = f"; Gantry/Detector Tilt says {float(tilt):g} degrees" if tilt not in (None, "") else ""
    raise DicomError(f"{where}: the slices are not stacked along their normal: {items[k].path.name} is shifted "
                     f"{shift[k]:.2f} mm sideways over {abs(along[k]):.2f} mm, a gantry tilt of {angle:.1f} "
                     f"degrees{said}; tilted series are not read (resample it to an orthogonal volume first)")


def _stack(items: list, normal: np.ndarray, pixel: np.ndarray, where: str) -> tuple:
    """(items sorted along the normal, the first one's position, the slice step), refusing two slices
    at one position, gaps, uneven spacing and tilt."""
    positions = np.array([_floats(i, "ImagePositionPatient", 3) for i in items])
    order = np.argsort(positions @ normal, kind="stable")
    items, positions = [items[i] for i in order], positions[order]
    if len(items) == 1:
        ds = items[0].ds
        return items, positions[0], abs(float(ds.get("SpacingBetweenSlices", 0) or ds.get("SliceThickness", 0) or 1))
    along = positions @ normal
    _check_duplicates(items, along, where)
    step = float(along[-1] - along[0]) / (len(items) - 1)
    _check_even(items, along, step, where)
    _check_tilt(items, positions, normal, pixel, where)
    return items, positions[0], step


def _geometry(items: list, where: str) -> tuple:
    """(items in slice order, spacing (x, y, z), origin, direction): the checks of the module docstring."""
    _check_frames(items)
    row, col, pixel = _plane(items, where)
    normal = np.cross(row, col)
    items, origin, step = _stack(items, normal, pixel, where)
    spacing = (float(pixel[1]), float(pixel[0]), step)
    return items, spacing, tuple(float(v) for v in origin), np.column_stack([row, col, normal])


# --------------------------------------------------------------------------- decoding
def _transfer_syntax(ds):
    """The file's transfer syntax; for a bare dataset the encoding pydicom found."""
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts:
        return UID(str(ts))
    implicit, little = ds.original_encoding
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRBigEndian if little is False else ExplicitVRLittleEndian


def _check_decodable(items: list, where: str) -> None:
    from pydicom.pixels import get_decoder

    for ts in sorted({_transfer_syntax(i.ds) for i in items}):
        name = ts.name if ts.is_transfer_syntax else NEWER_SYNTAXES.get(str(ts), "an unknown transfer syntax")
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise DicomError(f"{where}: the pixel data is encoded as {name} ({ts}), which no installed decoder "
                             f"reads; convert the series to an uncompressed transfer syntax (e.g. gdcmconv --raw "
                             f"or dcmdjpeg) and try again") from None
        if not decoder.is_available:
            raise DicomError(f"{where}: the pixel data is encoded as {name} ({ts}) and its decoder is not "
                             f"installed ({'; '.join(decoder.missing_dependencies)})")


def _pixel_element(f, ts) -> dict:
    """Read the Pixel Data element's tag and length at ``f``'s position, leaving ``f`` at its value;
    returns the decoder options that come from the element."""
    order = "<" if ts.is_little_endian else ">"
    head = f.read(8)
    if len(head) < 8:
        raise ValueError("no Pixel Data element")
    group, element = struct.unpack_from(order + "HH", head)
    if (group, element) != (0x7FE0, 0x0010):
        raise ValueError(f"({group:04X},{element:04X}) where the Pixel Data element should be")
    if ts.is_implicit_VR:
        return {"pixel_keyword": "PixelData"}
    f.read(4)  # explicit VR OB/OW: 2 reserved bytes were in head, the 32-bit length follows
    return {"pixel_keyword": "PixelData", "pixel_vr": head[4:6].decode("ascii")}


def _stored_values(instance: _Instance) -> np.ndarray:
    """One slice's stored values, decoded by pydicom from its Pixel Data element on (the header is
    not parsed again); a deflated file is read whole."""
    import pydicom
    from pydicom.pixels import get_decoder
    from pydicom.pixels.utils import as_pixel_options

    try:
        if instance.offset is None:
            return pydicom.dcmread(instance.path, force=True).pixel_array
        ts = _transfer_syntax(instance.ds)
        options = as_pixel_options(instance.ds, transfer_syntax_uid=ts)
        with open(instance.path, "rb") as f:
            f.seek(instance.offset)
            options.update(_pixel_element(f, ts))
            return get_decoder(ts).as_array(f, validate=True, **options)[0]
    except Exception as e:  # noqa: BLE001 - decoders raise many types
        raise DicomError(f"{instance.path}: cannot decode the pixel data ({type(e).__name__}: {e})") from None


def _rescale(instance: _Instance) -> tuple:
    """(slope, intercept) of the slice's Modality LUT rescale; (1, 0) when absent."""
    ds = instance.ds
    try:
        slope = float(1 if ds.get("RescaleSlope") in (None, "") else ds.RescaleSlope)
        intercept = float(0 if ds.get("RescaleIntercept") in (None, "") else ds.RescaleIntercept)
    except (TypeError, ValueError):
        slope = intercept = math.nan
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0:
        raise DicomError(f"{instance.path}: invalid Rescale Slope/Intercept ({ds.get('RescaleSlope')!r}, "
                         f"{ds.get('RescaleIntercept')!r})")
    return slope, intercept


def _modality_values(stored: np.ndarray, instance: _Instance, rescale: tuple, integral: bool) -> np.ndarray:
    """The slice through its Modality LUT: int32/int64 with ``integral`` rescales, else float64."""
    if "ModalityLUTSequence" in instance.ds:
        from pydicom.pixels import apply_modality_lut

        return apply_modality_lut(stored, instance.ds)
    slope, intercept = rescale
    if not integral:
        return stored * slope + intercept
    values = stored.astype(np.int64 if stored.itemsize >= 4 else np.int32)
    if slope != 1:
        values *= int(slope)
    if intercept:
        values += int(intercept)
    return values


# --------------------------------------------------------------------------- public readers
def read_series_header(folder, series=()) -> DicomSeries:
    """Find, choose and check one image series in ``folder`` (headers only, no pixel data).

    ``series``: Series Instance UIDs to choose from (e.g. every ``--series`` of a command line);
    needed only when the folder holds several image series. Raises :class:`DicomError`; warns
    about localizers left out."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"DICOM folder not found: {folder}")
    found = _read_headers(folder)
    uid = _choose(folder, found, series)
    return _checked_series(folder, found[uid], f"{folder} (series {uid or '(no Series Instance UID)'})")


def read_series_files(files) -> DicomSeries:
    """The checked series made of exactly these DICOM files (e.g. the instances Slicer loaded a
    volume from), as :func:`read_series_header` checks a folder's series (one Series Instance UID,
    the geometry), except that the pixel data's transfer syntax need not be decodable here: this
    is for referencing a series (DICOM SEG and SR), not for reading its voxels."""
    files = [Path(f) for f in files]
    if not files:
        raise DicomError("no DICOM files given")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"DICOM file(s) not found: {', '.join(missing[:3])}"
                                f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}")
    items = [_read_instance(f) for f in files]
    uids = sorted({str(i.ds.get("SeriesInstanceUID", "") or "") for i in items})
    if len(uids) != 1:
        raise DicomError(f"the {len(files)} files belong to {len(uids)} series ({', '.join(uids)}), not one")
    folder = Path(os.path.commonpath([str(f.parent) for f in files]))
    return _checked_series(folder, items, f"{folder} (series {uids[0] or '(no Series Instance UID)'})", False)


def _checked_series(folder: Path, instances: list, where: str, decodable: bool = True) -> DicomSeries:
    items, notes = _without_localizers(instances, where)
    if decodable:
        _check_decodable(items, where)
    items, spacing, origin, direction = _geometry(items, where)
    ds0 = items[0].ds
    size = (int(ds0.Columns), int(ds0.Rows), len(items))
    check_geometry(size, spacing, origin, direction, where)
    check_fits_in_memory(size, 4, where)
    rows = tuple(tuple(float(v) + 0.0 for v in r) for r in direction)
    header = ImageHeader(folder, size, spacing, origin, rows, "DICOM", 1, 4)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return DicomSeries(folder, [i.path for i in items], [i.ds for i in items], header,
                       [i.offset for i in items], notes)


def read_series(folder, series=()) -> tuple:
    """(:class:`Image`, :class:`DicomSeries`) of one checked image series (:func:`read_series_header`,
    or a :class:`DicomSeries` it returned): voxels through the Modality LUT, int16 when every slope
    and intercept is an integer and every value fits, else float32."""
    info = folder if isinstance(folder, DicomSeries) else read_series_header(folder, series)
    columns, rows, n = info.header.size
    offsets = info.offsets or [None] * n
    instances = [_Instance(p, ds, o) for p, ds, o in zip(info.files, info.datasets, offsets)]
    rescales = [_rescale(i) for i in instances]
    integral = all(s.is_integer() and b.is_integer() for s, b in rescales)
    values = np.empty((n, rows, columns), dtype=np.int16 if integral else np.float32)
    for k, instance in enumerate(instances):
        plane = _modality_values(_stored_values(instance), instance, rescales[k], integral)
        if values.dtype == np.int16 and (plane.min() < -32768 or plane.max() > 32767):
            values = values.astype(np.float32)
        values[k] = plane
    image = Image(values, info.header.spacing, info.header.origin, np.array(info.header.direction))
    return image, info
