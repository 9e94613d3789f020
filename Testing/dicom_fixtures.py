"""DICOM CT series written from a volume with pydicom, for tests, benchmarks and the README's example.

:func:`write_ct_series` writes one single-frame CT Image Storage instance per slice of an
:class:`LesionLocatorLib.image.Image` (array (z, y, x), LPS geometry): Image Position (Patient) of
slice k = ``origin + k * spacing_z * normal``, Image Orientation (Patient) = the direction's first
two columns, Pixel Spacing = (row spacing, column spacing) = (spacing y, spacing x). The voxels are
what a reader gets through the Modality LUT: stored value = (voxel - intercept) / slope, with
``rescale`` (slope, intercept) for the whole series or one pair per slice (default (1, 0)), stored
as int16, or uint16 with ``unsigned``, in ``bits_stored`` bits (a ValueError when a voxel has no
exact stored value). ``tilt_mm`` shifts each slice sideways along the column direction (a
gantry-tilted series); ``skip`` leaves slices out (a gap); ``transfer_syntax`` compresses the pixel
data with pydicom's encoders (RLE Lossless, JPEG 2000 Lossless (32 x 32 pixels at least), JPEG-LS
Lossless; Deflated Explicit VR Little Endian deflates the whole dataset, the retired Explicit VR
Big Endian swaps the bytes) or, for a syntax nothing encodes here, encapsulates the raw bytes
under that syntax's name (a reader must refuse it before decoding); ``preamble=False`` writes bare
datasets (implicit VR little endian, no preamble, no file meta: old ACR-NEMA-style exports);
``edit(ds, k)`` changes slice k's dataset last (a localizer, a missing tag, another position).

:func:`write_seg` writes a DICOM SEG (highdicom) of one voxel on a series' files, to put beside them.

Usage (the README's DICOM example)::

    python Testing/dicom_fixtures.py OUT_FOLDER

writes the demo study (Resources/Demo/demo_t0..t2) as three DICOM series under OUT_FOLDER/t0,
t1, t2 (one patient, one study per timepoint, dated a year apart in 6-month steps).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from LesionLocatorLib.image import Image, read_image  # noqa: E402

DEMO = HERE.parent / "Resources" / "Demo"
PATIENT = {"PatientName": "Demo^Patient", "PatientID": "LL-DEMO-1", "PatientBirthDate": "19600101",
           "PatientSex": "O"}


def _stored(plane: np.ndarray, slope: float, intercept: float, unsigned: bool, bits_stored: int) -> np.ndarray:
    """The stored values whose Modality LUT output is ``plane`` (ValueError when there are none)."""
    value = (np.asarray(plane, dtype=np.float64) - intercept) / slope
    lo, hi = (0, 2 ** bits_stored - 1) if unsigned else (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1)
    if not np.array_equal(value, np.round(value)) or value.min() < lo or value.max() > hi:
        raise ValueError(f"voxels {plane.min()}..{plane.max()} have no exact stored value in {bits_stored} "
                         f"{'unsigned' if unsigned else 'signed'} bits with slope {slope}, intercept {intercept}")
    return value.astype(np.uint16 if unsigned else np.int16)


def _encode(ds, syntax) -> None:
    """Compress ``ds``'s pixel data as ``syntax``; else (no encoder here) encapsulate the raw bytes
    under that syntax's name, a file no reader here can decode."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

    if syntax == ExplicitVRBigEndian:  # (retired) the dataset is written big endian, the pixels swapped here
        ds.PixelData = np.frombuffer(ds.PixelData, np.uint16).byteswap().tobytes()
    if syntax in (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian):  # deflated: the whole dataset when written
        ds.file_meta.TransferSyntaxUID = syntax
        return
    try:
        ds.compress(syntax)
    except (NotImplementedError, RuntimeError, ValueError):
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = syntax


def _save(ds, path: Path, preamble: bool) -> None:
    """As a DICOM file; without ``preamble`` a bare implicit VR dataset; a transfer syntax pydicom does
    not know (JPEG XL in pydicom 3.0) has its dataset written in explicit VR little endian."""
    import pydicom
    from pydicom.dataset import validate_file_meta

    if not preamble:
        del ds.file_meta
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    elif ds.file_meta.TransferSyntaxUID.is_transfer_syntax:
        ds.save_as(path, enforce_file_format=True)
    else:
        validate_file_meta(ds.file_meta, enforce_standard=True)
        ds.preamble = b"\0" * 128
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=True, force_encoding=True)


def write_ct_series(image: Image, folder, *, study_uid=None, series_uid=None, series_number: int = 2,
                    description: str = "CT", date: str = "20240115", time: str = "101500", patient=None,
                    frame_of_reference_uid=None, tilt_mm: float = 0.0, skip=(), transfer_syntax=None,
                    name: str = "IM{k:04d}.dcm", rescale=(1, 0), unsigned: bool = False, bits_stored: int = 16,
                    preamble: bool = True, edit=None) -> dict:
    """Write ``image`` as a DICOM CT series into ``folder`` (created); returns its UIDs
    {"study", "series", "frame_of_reference", "instances": [SOP Instance UID per slice k]}."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, UID, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = frame_of_reference_uid or generate_uid()
    direction = np.asarray(image.direction, float)
    row, col, normal = direction[:, 0], direction[:, 1], direction[:, 2]
    sx, sy, sz = image.spacing
    syntax = UID(transfer_syntax) if transfer_syntax else ExplicitVRLittleEndian
    pairs = [tuple(rescale)] * image.shape[0] if np.ndim(rescale) == 1 else [tuple(p) for p in rescale]
    instances = []
    for k in range(image.shape[0]):
        sop = generate_uid()
        instances.append(sop)
        if k in set(skip):
            continue
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
        for key, value in (patient or PATIENT).items():
            setattr(ds, key, value)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
        ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "ACC1", "1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", series_number, k + 1
        ds.SeriesDescription, ds.StudyDescription = description, "CT abdomen"
        ds.Manufacturer, ds.BodyPartExamined, ds.PatientPosition = "LesionLocator test fixtures", "ABDOMEN", "FFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [round(float(v), 10) for v in (*row, *col)]
        position = np.asarray(image.origin) + k * sz * normal + k * tilt_mm * col
        ds.ImagePositionPatient = [round(float(v), 6) for v in position]
        ds.PixelSpacing = [float(sy), float(sx)]
        ds.SliceThickness = float(sz)
        ds.PositionReferenceIndicator, ds.KVP, ds.AcquisitionNumber = "", 120, 1
        ds.Rows, ds.Columns = image.shape[1], image.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
        ds.PixelRepresentation = 0 if unsigned else 1
        slope, intercept = pairs[k]
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, slope, "HU"
        ds.PixelData = _stored(image.array[k], slope, intercept, unsigned, bits_stored).tobytes()
        if syntax != ExplicitVRLittleEndian:
            _encode(ds, syntax)
        if edit is not None:
            edit(ds, k)
        _save(ds, folder / name.format(k=k), preamble)
    return {"study": study_uid, "series": series_uid, "frame_of_reference": frame_uid, "instances": instances}


def write_seg(source_files, path) -> Path:
    """A DICOM SEG (highdicom, binary, one segment of one voxel) on the series of ``source_files``,
    saved at ``path``: a non-image instance with Rows and Columns, as results written beside a study."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    sources = [pydicom.dcmread(p) for p in source_files]
    sources.sort(key=lambda ds: int(ds.InstanceNumber))
    mask = np.zeros((len(sources), int(sources[0].Rows), int(sources[0].Columns)), dtype=bool)
    mask[len(sources) // 2, 1, 1] = True
    segment = hd.seg.SegmentDescription(1, "lesion", codes.SCT.MorphologicallyAbnormalStructure,
                                        codes.SCT.Tissue, hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(sources, mask, "BINARY", [segment], hd.UID(), 90, hd.UID(), 1, "fixtures",
                              "fixtures", "1", "1")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return Path(path)


def write_demo_study(out) -> list:
    """The demo's three scans as DICOM series out/t0, out/t1, out/t2 (one patient, a study per scan,
    6 months apart); returns the folders."""
    out = Path(out)
    folders = []
    for t, date in enumerate(("20240115", "20240715", "20250115")):
        folder = out / f"t{t}"
        write_ct_series(read_image(DEMO / f"demo_t{t}.nii.gz"), folder, date=date, description=f"demo scan {t}",
                        series_number=2 + t)
        folders.append(folder)
    return folders


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python Testing/dicom_fixtures.py OUT_FOLDER")
    for f in write_demo_study(sys.argv[1]):
        print(f)
