"""DICOM series as input (LesionLocatorLib.dicomseries): real files written with pydicom, read back and
against SimpleITK's GDCM series reader; the refusals with their exact messages; a real scanner's series."""
import random
import shutil
import warnings

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, JPEG2000Lossless, JPEGLSLossless,
                         RLELossless)

from dicom_fixtures import write_ct_series, write_seg
from LesionLocatorLib.dicomseries import (DicomError, DicomSeries, SeriesSummary, dicom_files, is_dicom_folder,
                                          list_series, read_series, read_series_header)
from LesionLocatorLib.image import Image, ImageError, read_image, read_image_header


def _rotation(about_z: float, about_x: float) -> np.ndarray:
    a, b = np.deg2rad(about_z), np.deg2rad(about_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def _oblique(shape=(12, 40, 36), seed=0) -> Image:
    """Rotated 25 degrees about z and 20 about x, 0.8 x 0.6 x 2.5 mm, random int16 HU (rows != columns)."""
    values = np.random.default_rng(seed).integers(-1024, 3072, size=shape).astype(np.int16)
    return Image(values, (0.8, 0.6, 2.5), (-120.5, 30.25, 410.0), _rotation(25.0, 20.0))


def _axial(n=10, seed=1) -> Image:
    """Axial, 10 slices from z = 100 mm every 2.5 mm, 0.8 x 0.6 mm pixels."""
    values = np.random.default_rng(seed).integers(-1024, 2000, size=(n, 16, 12)).astype(np.int16)
    return Image(values, (0.8, 0.6, 2.5), (-4.0, -5.0, 100.0))


def _gdcm(folder, series_uid: str = "") -> Image:
    """The series as SimpleITK's GDCM series reader reads it (an independent reader)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))
    return Image.from_sitk(reader.Execute())


def _assert_same(image: Image, expected: Image, dtype=None) -> None:
    assert image.shape == expected.shape
    assert np.array_equal(image.array, expected.array)
    assert image.array.dtype == (dtype or expected.array.dtype)
    assert np.allclose(image.spacing, expected.spacing, rtol=0, atol=1e-4), (image.spacing, expected.spacing)
    assert np.allclose(image.origin, expected.origin, rtol=0, atol=1e-4), (image.origin, expected.origin)
    assert np.allclose(image.direction, expected.direction, rtol=0, atol=1e-4), (image.direction, expected.direction)


def _refused(folder, message: str, series=()) -> None:
    """read_image_header and read_image both raise DicomError with exactly ``message``."""
    for reader in (read_image_header, read_image):
        with pytest.raises(DicomError) as info:
            reader(folder, series)
        assert str(info.value) == message


# ------------------------------------------------------------------------------------ geometry
def test_oblique_anisotropic_series_reads_back_as_written_and_as_gdcm_reads_it(tmp_path):
    image = _oblique()
    uids = write_ct_series(image, tmp_path / "ct")
    back = read_image(tmp_path / "ct")
    _assert_same(back, image)
    _assert_same(back, _gdcm(tmp_path / "ct"))
    header = read_image_header(tmp_path / "ct")
    assert header.shape == image.shape and header.geometry_differences(image) == []
    series = read_series_header(tmp_path / "ct")
    assert series.uid == uids["series"] and series.study_uid == uids["study"] and series.modality == "CT"
    assert [str(ds.SOPInstanceUID) for ds in series.datasets] == uids["instances"]      # slice k is datasets[k]
    assert [p.name for p in series.files] == [f"IM{k:04d}.dcm" for k in range(12)]


def test_slice_files_shuffled_renamed_and_nested_read_the_same(tmp_path):
    image = _oblique()
    write_ct_series(image, tmp_path / "flat")
    files = sorted((tmp_path / "flat").iterdir())
    random.Random(3).shuffle(files)
    nested = tmp_path / "nested"
    for n, path in enumerate(files):       # names in an order unrelated to the slices, no extension
        target = nested / ("a" if n % 3 else "b/c") / f"{(n * 7919) % 1000:03d}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    (nested / "DICOMDIR").write_bytes((tmp_path / "flat" / "IM0000.dcm").read_bytes())  # an index: not a slice
    (nested / ".hidden").write_bytes((tmp_path / "flat" / "IM0001.dcm").read_bytes())
    (nested / "README.txt").write_text("exported by a PACS\n")
    assert len(dicom_files(nested)) == 12
    _assert_same(read_image(nested), image)


def test_bare_datasets_without_preamble_or_extension_are_read(tmp_path):
    image = _oblique()
    write_ct_series(image, tmp_path / "acr", preamble=False, name="{k}")
    assert (tmp_path / "acr" / "0").read_bytes()[128:132] != b"DICM"
    (tmp_path / "acr" / "notes").write_bytes(b"\x00\x01 not a dataset")
    assert is_dicom_folder(tmp_path / "acr") and len(dicom_files(tmp_path / "acr")) == 12
    _assert_same(read_image(tmp_path / "acr"), image)


def test_tiny_position_noise_and_tilt_below_the_tolerance_are_read(tmp_path):
    image = _oblique()
    row, col, normal = image.direction.T

    def jitter(ds, k):
        noise = 1e-4 * (k % 2)                                      # IPP rounding noise, along and across
        ds.ImagePositionPatient = [float(v) for v in np.asarray(image.origin) + (k * 2.5 + noise) * normal
                                   + k * 1e-4 * col + noise * row]
    write_ct_series(image, tmp_path / "ct", edit=jitter)
    _assert_same(read_image(tmp_path / "ct"), image)


# ------------------------------------------------------------------------------------ several series
def test_a_folder_with_two_series_and_a_seg_lists_both_and_reads_the_chosen_one(tmp_path):
    folder = tmp_path / "study"
    a, b = _axial(6), _oblique((4, 32, 36))
    ua = write_ct_series(a, folder, series_number=2, description="arterial", name="A{k:03d}.dcm")
    ub = write_ct_series(b, folder, series_number=3, description="venous", name="B{k:03d}.dcm",
                         study_uid=ua["study"])
    write_seg(sorted(folder.glob("A*.dcm")), folder / "SEG.dcm")   # results beside the images: ignored
    summaries = [SeriesSummary(ua["series"], "2", "CT", "arterial", 6, 16, 12, "20240115"),
                 SeriesSummary(ub["series"], "3", "CT", "venous", 4, 32, 36, "20240115")]
    assert list_series(folder) == summaries
    listing = (f"{ua['series']}  #2 CT 'arterial': 6 image(s) of 16x12, study date 20240115; "
               f"{ub['series']}  #3 CT 'venous': 4 image(s) of 32x36, study date 20240115")
    _refused(folder, f"{folder} holds 2 image series; choose one with --series UID: {listing}")
    _refused(folder, f"{folder} holds 2 image series; choose one with --series UID: {listing}", ["1.2.3"])
    _refused(folder, f"{folder}: --series names 2 of its series ({ub['series']}, {ua['series']}); name one",
             [ub["series"], ua["series"]])
    _assert_same(read_image(folder, ["1.2.3", ub["series"]]), b)
    _assert_same(read_image(folder, [ua["series"]]), a)
    assert read_image_header(folder, [ub["series"]]).shape == (4, 32, 36)
    _assert_same(read_image(folder, [ub["series"]]), _gdcm(folder, ub["series"]))


def test_a_folder_with_only_non_image_objects_is_refused(tmp_path):
    write_ct_series(_axial(), tmp_path / "ct")
    write_seg(sorted((tmp_path / "ct").glob("*.dcm")), tmp_path / "seg" / "SEG.dcm")
    _refused(tmp_path / "seg", f"{tmp_path / 'seg'}: 1 DICOM file(s) but no image series (only segmentations, "
                               f"reports, localizer images or other non-image objects)")


def test_a_folder_without_dicom_files_is_not_an_image(tmp_path):
    (tmp_path / "notes.txt").write_text("no scan here\n")
    sitk.WriteImage(Image(np.zeros((2, 3, 4), np.int16)).to_sitk(), str(tmp_path / "scan.nii.gz"))
    assert not is_dicom_folder(tmp_path) and dicom_files(tmp_path) == []
    for reader in (read_image_header, read_image):          # an ImageError for a path, not a DICOM error
        with pytest.raises(ImageError) as info:
            reader(tmp_path)
        assert type(info.value) is ImageError
        assert str(info.value) == f"{tmp_path}: not an image file (a folder with no DICOM files)"
    with pytest.raises(DicomError) as info:
        read_series(tmp_path)
    assert str(info.value) == f"{tmp_path}: no DICOM files in this folder or its subfolders"


def test_a_localizer_in_the_series_is_left_out_with_a_warning(tmp_path):
    image = _axial()
    uids = write_ct_series(image, tmp_path / "ct")

    def scout(ds, k):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]          # a coronal projection
        ds.ImagePositionPatient = [-250.0, 0.0, 200.0]
    write_ct_series(Image(np.zeros((1, 20, 30), np.int16)), tmp_path / "ct", series_uid=uids["series"],
                    study_uid=uids["study"], name="SCOUT.dcm", edit=scout)
    with pytest.warns(UserWarning) as caught:
        back = read_image(tmp_path / "ct")
    assert [str(w.message) for w in caught] == [
        f"{tmp_path / 'ct'} (series {uids['series']}): left out 1 localizer (scout) image(s) (SCOUT.dcm): "
        f"projections, not slices of the volume"]
    _assert_same(back, image)
    assert list_series(tmp_path / "ct")[0].files == 10


def test_a_series_without_series_uid_is_one_series(tmp_path):
    """Anonymised exports (TotalSegmentator's test series) can leave Series Instance UID empty."""
    image = _axial()

    def anonymise(ds, k):
        ds.SeriesInstanceUID = ""
    write_ct_series(image, tmp_path / "ct", edit=anonymise)
    write_ct_series(_axial(4), tmp_path / "ct", name="other{k}.dcm", series_number=7)
    first, other = list_series(tmp_path / "ct")
    assert first.uid == ""
    assert first.line() == "(no Series Instance UID)  #2 CT 'CT': 10 image(s) of 16x12, study date 20240115"
    assert other.number == "7" and other.files == 4
    _assert_same(read_image(tmp_path / "ct", [""]), image)
    with pytest.raises(DicomError, match=r"holds 2 image series; choose one with --series UID: \(no Series"):
        read_image(tmp_path / "ct")


# ------------------------------------------------------------------------------------ refusals
def _positions(z_of):
    """An ``edit`` placing slice k of an axial series at z = z_of(k)."""
    def edit(ds, k):
        ds.ImagePositionPatient = [-4.0, -5.0, float(z_of(k))]
    return edit


def _set(k_target, **attributes):
    """An ``edit`` setting (value None: deleting) attributes of slice ``k_target``."""
    def edit(ds, k):
        if k != k_target:
            return
        for key, value in attributes.items():
            if value is None:
                delattr(ds, key)
            else:
                setattr(ds, key, value)
    return edit


REFUSALS = {
    "gap": (dict(skip=(5,)),
            "{where}: missing slice(s): 5.000 mm between IM0004.dcm and IM0006.dcm where the slices are 2.500 mm "
            "apart; an evenly spaced volume would misplace slices by up to 1.250 mm (re-export the complete series)"),
    "uneven": (dict(edit=_positions(lambda k: 100 + 2.5 * k if k <= 6 else 115 + 3.2 * (k - 6))),
               "{where}: uneven slice spacing: 3.200 mm between IM0006.dcm and IM0007.dcm where the slices are "
               "2.500 mm apart; an evenly spaced volume would misplace slices by up to 1.400 mm (re-export the "
               "complete series)"),
    "duplicate": (dict(edit=_set(4, ImagePositionPatient=[-4.0, -5.0, 107.5])),
                  "{where}: IM0003.dcm and IM0004.dcm are at the same position (107.500 mm along the slice normal; "
                  "1 such pair(s)): several acquisitions, echoes or phases in one series cannot be one volume"),
    "tilt": (dict(tilt_mm=1.0, edit=lambda ds, k: setattr(ds, "GantryDetectorTilt", 21.8)),
             "{where}: the slices are not stacked along their normal: IM0009.dcm is shifted 9.00 mm sideways over "
             "22.50 mm, a gantry tilt of 21.8 degrees; Gantry/Detector Tilt says 21.8 degrees; tilted series are "
             "not read (resample it to an orthogonal volume first)"),
    "multi-frame": (dict(edit=_set(2, NumberOfFrames=3)),
                    "{folder}/IM0002.dcm: a multi-frame (enhanced) image with 3 frame(s); only series of "
                    "single-frame images are read (export the series as classic single-frame images)"),
    "colour": (dict(edit=_set(0, SamplesPerPixel=3, PhotometricInterpretation="RGB")),
               "{folder}/IM0000.dcm: a colour image (RGB); a scan has one grey value per pixel"),
    "no position": (dict(edit=_set(3, ImagePositionPatient=None)),
                    "{folder}/IM0003.dcm: ImagePositionPatient is missing or invalid (None); cannot place the "
                    "slice in space"),
    "orientation": (dict(edit=_set(7, ImageOrientationPatient=[1, 0, 0, 0, 0.9998, 0.02])),
                    "{where}: slices differ in ImageOrientationPatient (IM0000.dcm: [1, 0, 0, 0, 1, 0], IM0007.dcm: "
                    "[1, 0, 0, 0, 0.9998, 0.02]); a volume needs the same value in every slice"),
    "MPEG2": (dict(transfer_syntax="1.2.840.10008.1.2.4.100"),
              "{where}: the pixel data is encoded as MPEG2 Main Profile / Main Level (1.2.840.10008.1.2.4.100), "
              "which no installed decoder reads; convert the series to an uncompressed transfer syntax (e.g. "
              "gdcmconv --raw or dcmdjpeg) and try again"),
    "JPEG XL": (dict(transfer_syntax="1.2.840.10008.1.2.4.110"),
                "{where}: the pixel data is encoded as JPEG XL Lossless (1.2.840.10008.1.2.4.110), which no "
                "installed decoder reads; convert the series to an uncompressed transfer syntax (e.g. gdcmconv "
                "--raw or dcmdjpeg) and try again"),
    "bad rescale": (dict(edit=_set(1, RescaleSlope="0")),
                    "{folder}/IM0001.dcm: invalid Rescale Slope/Intercept ('0', '0.0')"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_problem_and_where(tmp_path, case):
    options, message = REFUSALS[case]
    folder = tmp_path / "ct"
    uid = write_ct_series(_axial(), folder, **options)["series"]
    expected = message.format(where=f"{folder} (series {uid})", folder=folder)
    if case == "bad rescale":          # found when the voxels are read (the header reader checks geometry)
        read_image_header(folder)
        with pytest.raises(DicomError) as info:
            read_image(folder)
        assert str(info.value) == expected
        return
    _refused(folder, expected)


def test_slices_of_another_size_in_the_series_are_refused(tmp_path):
    folder = tmp_path / "ct"
    uid = write_ct_series(_axial(5), folder, name="A{k}.dcm")["series"]
    write_ct_series(Image(np.zeros((5, 24, 12), np.int16), (0.8, 0.6, 2.5), (-4.0, -5.0, 200.0)), folder,
                    series_uid=uid, name="B{k}.dcm")
    _refused(folder, f"{folder} (series {uid}): slices differ in Rows (A0.dcm: 16, B0.dcm: 24); a volume needs "
                     f"the same value in every slice")


def test_an_undecodable_syntax_is_refused_before_any_decoding(tmp_path, monkeypatch):
    from LesionLocatorLib import dicomseries

    write_ct_series(_axial(), tmp_path / "ct", transfer_syntax="1.2.840.10008.1.2.4.100")
    monkeypatch.setattr(dicomseries, "_stored_values", lambda *a: pytest.fail("decoding started"))
    with pytest.raises(DicomError, match="MPEG2 Main Profile"):
        read_image(tmp_path / "ct")


def test_given_files_are_checked_as_a_series_without_needing_a_decoder(tmp_path):
    """read_series_files (Slicer's export: the files a volume was loaded from) checks headers and
    geometry only: an MPEG2 series is referenced, shuffled files come back in slice order."""
    from LesionLocatorLib.dicomseries import read_series_files

    written = write_ct_series(_axial(), tmp_path / "ct", transfer_syntax="1.2.840.10008.1.2.4.100")
    files = sorted((tmp_path / "ct").glob("*.dcm"))
    random.Random(3).shuffle(files)
    series = read_series_files(files)
    assert [str(ds.SOPInstanceUID) for ds in series.datasets] == written["instances"]
    assert series.header.size == (12, 16, 10) and series.header.spacing == (0.8, 0.6, 2.5)
    with pytest.raises(DicomError, match="MPEG2 Main Profile"):
        read_series_header(tmp_path / "ct")
    write_ct_series(_axial(), tmp_path / "other", name="X{k:04d}.dcm")
    with pytest.raises(DicomError, match=r"the 11 files belong to 2 series"):
        read_series_files(files + [tmp_path / "other" / "X0000.dcm"])


def test_a_corrupt_slice_is_refused_naming_the_file(tmp_path):
    write_ct_series(_axial(), tmp_path / "ct")
    path = tmp_path / "ct" / "IM0006.dcm"
    path.write_bytes(path.read_bytes()[:-100])                   # truncated pixel data
    read_image_header(tmp_path / "ct")
    with pytest.raises(DicomError) as info:
        read_image(tmp_path / "ct")
    assert str(info.value).startswith(f"{path}: cannot decode the pixel data (")


# ------------------------------------------------------------------------------------ encodings
@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless, JPEGLSLossless, DeflatedExplicitVRLittleEndian,
                                    ExplicitVRBigEndian], ids=["RLE", "JPEG2000", "JPEG-LS", "deflated", "big-endian"])
def test_compressed_series_read_voxel_identical(tmp_path, syntax):
    image = _oblique()
    write_ct_series(image, tmp_path / "raw")
    write_ct_series(image, tmp_path / "packed", transfer_syntax=syntax)
    meta = pydicom.dcmread(tmp_path / "packed" / "IM0000.dcm", stop_before_pixels=True).file_meta
    assert meta.TransferSyntaxUID == syntax
    assert image.array[0].astype("<i2").tobytes() not in (tmp_path / "packed" / "IM0000.dcm").read_bytes()  # encoded
    packed = read_image(tmp_path / "packed")
    _assert_same(packed, read_image(tmp_path / "raw"))
    _assert_same(packed, image)


def test_reading_without_pixel_offsets_decodes_whole_files_the_same(tmp_path):
    image = _oblique()
    write_ct_series(image, tmp_path / "ct", transfer_syntax=JPEGLSLossless)
    series = read_series_header(tmp_path / "ct")
    assert all(isinstance(o, int) and o > 0 for o in series.offsets)
    bare = DicomSeries(series.folder, series.files, series.datasets, series.header)   # as another helper builds it
    _assert_same(read_series(bare)[0], image)


# ------------------------------------------------------------------------------------ Modality LUT
def test_fractional_slope_gives_float32_hounsfield_units(tmp_path):
    values = np.random.default_rng(2).integers(-2048, 6000, size=(4, 16, 12)) / 2 - 1024   # multiples of 0.5
    image = Image(values, (0.8, 0.6, 2.5), (-4.0, -5.0, 100.0))
    write_ct_series(image, tmp_path / "ct", rescale=(0.5, -1024))
    back = read_image(tmp_path / "ct")
    assert back.array.dtype == np.float32 and np.array_equal(back.array, values)
    assert np.array_equal(_gdcm(tmp_path / "ct").array, values)


def test_unsigned_12_bit_with_integer_intercept_gives_int16_hounsfield_units(tmp_path):
    image = _axial()
    high_bits = lambda ds, k: setattr(ds, "PixelData", (np.frombuffer(ds.PixelData, np.uint16) | 0xF000).tobytes())  # noqa: E731
    write_ct_series(image, tmp_path / "ct", rescale=(1, -1024), unsigned=True, bits_stored=12, edit=high_bits)
    ds = pydicom.dcmread(tmp_path / "ct" / "IM0000.dcm")
    assert ds.PixelRepresentation == 0 and ds.BitsStored == 12
    assert int(np.frombuffer(ds.PixelData, np.uint16).min()) >= 0xF000             # garbage in the unused bits
    back = read_image(tmp_path / "ct")        # bits above Bits Stored are not part of the value
    _assert_same(back, image)
    _assert_same(back, _gdcm(tmp_path / "ct"))


def test_each_slice_has_its_own_intercept(tmp_path):
    image = _axial()
    pairs = [(1, -1024 + 10 * k) for k in range(10)]
    write_ct_series(image, tmp_path / "ct", rescale=pairs)
    stored = [int(pydicom.dcmread(p).pixel_array[0, 0]) for p in sorted((tmp_path / "ct").iterdir())]
    assert stored == [int(image.array[k, 0, 0]) + 1024 - 10 * k for k in range(10)]
    back = read_image(tmp_path / "ct")
    _assert_same(back, image)
    _assert_same(back, _gdcm(tmp_path / "ct"), dtype=np.int16)       # GDCM: int32 (-1024 + a 16-bit range)


def test_values_beyond_int16_give_float32(tmp_path):
    values = np.zeros((4, 16, 12))
    values[3, 2, 1] = 40000.0                                     # only in the last slice read
    write_ct_series(Image(values, (0.8, 0.6, 2.5)), tmp_path / "ct", rescale=(10, 0))
    back = read_image(tmp_path / "ct")
    assert back.array.dtype == np.float32 and np.array_equal(back.array, values)


def test_monochrome1_and_padding_values_keep_their_meaning(tmp_path):
    image = _axial()

    def edit(ds, k):
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PixelPaddingValue = int(image.array.min())
    write_ct_series(image, tmp_path / "ct", edit=edit)
    _assert_same(read_image(tmp_path / "ct"), image)
    assert np.array_equal(_gdcm(tmp_path / "ct").array, -1 - image.array.astype(int))   # ITK inverts; we do not


# ------------------------------------------------------------------------------------ dates
@pytest.mark.parametrize("missing, expected", [
    ((), "20240103080910.250000"),
    (("AcquisitionDate",), "20240102070000.000000"),
    (("AcquisitionDate", "SeriesDate"), "20240101060000.000000"),
    (("AcquisitionDate", "SeriesDate", "StudyDate"), None),
])
def test_datetime_is_acquisition_else_series_else_study(tmp_path, missing, expected):
    def edit(ds, k):
        ds.StudyDate, ds.StudyTime = "20240101", "06"
        ds.SeriesDate, ds.SeriesTime = "20240102", "070000"
        ds.AcquisitionDate, ds.AcquisitionTime = "20240103", f"0809{10 + k:02d}.25"   # the earliest slice wins
        for key in missing:
            delattr(ds, key)
    write_ct_series(_axial(), tmp_path / "ct", edit=edit)
    assert read_series_header(tmp_path / "ct").datetime() == expected


# ------------------------------------------------------------------------------------ a real scanner's series
def test_a_real_scanner_series_reads_as_gdcm_reads_it(totalsegmentator_dicom):
    folder = totalsegmentator_dicom
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image, series = read_series(folder)
    assert image.shape == (20, 512, 512) and image.array.dtype == np.int16
    assert image.spacing == (0.9765625, 0.9765625, 2.0)
    assert image.origin == (-249.51171875, -437.51171875, -804.5)
    assert np.array_equal(image.direction, np.eye(3))
    _assert_same(image, _gdcm(folder))
    assert (int(image.array.min()), int(image.array.max())) == (-1024, 1839)
    # JPEG 2000 lossless files named CT.<SOP UID> (no extension), Series/Study/SOP Instance UIDs emptied
    assert str(series.first.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.90"
    assert series.uid == "" and series.study_uid == "" and series.modality == "CT"
    assert [int(ds.InstanceNumber) for ds in series.datasets] == list(range(286, 266, -1))
    assert series.datetime() == "20221208140352.457000"          # slices have their own times: the earliest
    assert list_series(folder) == [SeriesSummary("", "", "CT", "CT Body 3.0", 20, 512, 512, "20221208")]
