"""DICOM SEG and SR TID 1500 output (``--dicom-out``), checked with independent readers.

Two studies, written as real CT series with ``dicom_fixtures.write_ct_series``:

* an **oblique, anisotropic** two-timepoint study (0.7 x 0.9 x 2.5 mm, rotated about all axes):
  at t0 lesions 1 and 3 overlap and lesion 2 is beside them; at t1 lesion 1 is tracked, lesion 2
  vanished and lesion 3 lies outside the scan;
* the **demo case** (Resources/Demo, three timepoints, 4 lesions): its shipped label images
  ``demo_t{0,1,2}_label.nii.gz`` are the lesion masks (no network run: the SEG/SR path is what is
  tested, and the masks are the size the demo model gives).

Readers: dcmqi's ``segimage2itkimage`` (SEG -> one NIfTI per segment), dcmqi's ``tid1500reader``
(SR -> JSON), highdicom's ``segread``, dicom3tools' ``dciodvfy`` (IOD validation), dcmqi's
``itkimage2segimage`` (a SEG made by another tool, read back with ``read_seg``).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy.spatial.transform import Rotation

from dicom_fixtures import DEMO, write_ct_series, write_demo_study
from LesionLocatorLib.dicomresults import derived_uid, seg_path, sr_path, tracking_uid, write_dicom_results
from LesionLocatorLib.dicomseg import SegError, read_seg
from LesionLocatorLib.dicomseries import read_series
from LesionLocatorLib.image import Image, read_image, write_image
from LesionLocatorLib.lesionstyle import lesion_color, lesion_label
from LesionLocatorLib.measure import lesion_measurements

BIN = Path(sys.executable).parent
STATUS_CODES = {"tracked": ("52101004", "SCT"), "vanished": ("272519000", "SCT"), "outside": ("121059", "DCM")}
DCIODVFY_WARNINGS: list = []


# --------------------------------------------------------------------------- studies
def _ball(shape, centre, radius) -> np.ndarray:
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    c = centre
    return ((z - c[0]) / radius[0]) ** 2 + ((y - c[1]) / radius[1]) ** 2 + ((x - c[2]) / radius[2]) ** 2 <= 1


def _write_study(folder: Path, images: list, masks: list, status: dict, names: list, **kw) -> dict:
    """Write the scans as DICOM series, read them back, measure and write SEG + SR."""
    series, scans = [], []
    for image, name in zip(images, names):
        write_ct_series(image, folder / "ct" / name, description=name, **kw)
        scan, info = read_series(folder / "ct" / name)
        scans.append(scan)
        series.append(info)
    rows = lesion_measurements(scans, masks, status, names)
    written = write_dicom_results(folder / "dicom", series, names, masks, rows)
    return {"images": scans, "series": series, "masks": masks, "rows": rows, "names": names, "status": status,
            "out": folder / "dicom", "written": written}


@pytest.fixture(scope="module")
def oblique(tmp_path_factory):
    direction = Rotation.from_euler("xyz", [20, -15, 30], degrees=True).as_matrix()
    shape = (24, 40, 48)
    rng = np.random.default_rng(3)
    images = [Image(rng.integers(-100, 100, shape, dtype=np.int16), (0.7, 0.9, 2.5), (10.0, -20.0, 30.0), direction)
              for _ in range(2)]
    m1 = _ball(shape, (10, 20, 20), (3, 6, 8))
    m3 = _ball(shape, (12, 24, 26), (2, 5, 6))  # overlaps lesion 1
    m2 = _ball(shape, (16, 8, 36), (2, 4, 5))
    masks = [{1: m1, 2: m2, 3: m3},
             {1: _ball(shape, (11, 21, 22), (4, 7, 9)), 2: np.zeros(shape, bool), 3: np.zeros(shape, bool)}]
    status = {1: ["tracked", "tracked"], 2: ["tracked", "vanished"], 3: ["tracked", "outside"]}
    return _write_study(tmp_path_factory.mktemp("oblique"), images, masks, status, ["t0", "t1"])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    folders = write_demo_study(tmp / "ct")
    scans = [read_series(f) for f in folders]
    images, series = [s for s, _ in scans], [i for _, i in scans]
    masks = []
    for t in range(3):
        labels = read_image(DEMO / f"demo_t{t}_label.nii.gz").array
        masks.append({pid: labels == pid for pid in range(1, 5)})
    names = ["t0", "t1", "t2"]
    status = {pid: ["tracked"] * 3 for pid in range(1, 5)}
    rows = lesion_measurements(images, masks, status, names)
    nifti = []
    for t, name in enumerate(names):  # the NIfTI outputs, as the command line writes them
        for pid, mask in masks[t].items():
            write_image(images[t].with_array(mask.astype(np.uint8)), tmp / "nifti" / f"{name}_lesion_{pid}.nii.gz")
        nifti.append({pid: read_image(tmp / "nifti" / f"{name}_lesion_{pid}.nii.gz") for pid in masks[t]})
    written = write_dicom_results(tmp / "dicom", series, names, masks, rows)
    return {"images": images, "series": series, "masks": masks, "rows": rows, "names": names, "status": status,
            "out": tmp / "dicom", "written": written, "nifti": nifti}


# --------------------------------------------------------------------------- readers
def _run(tool: str, *args) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / tool), *map(str, args)], capture_output=True, text=True)
    assert done.returncode == 0, f"{tool} failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}"
    return done


def _dcmqi_segments(seg: Path, out: Path) -> tuple:
    """({segment number: Image} from segimage2itkimage, its meta.json)."""
    out.mkdir(parents=True, exist_ok=True)
    _run("segimage2itkimage", "--inputDICOM", seg, "--outputDirectory", out, "-t", "nifti")
    meta = json.loads((out / "meta.json").read_text())
    images = {int(p.name.split(".")[0]): read_image(p) for p in out.glob("*.nii.gz")}
    return images, meta


def _on_grid(part: Image, reference: Image) -> np.ndarray:
    """dcmqi's output (a sub-volume) pasted onto ``reference``'s grid after checking that it lies on it."""
    assert np.allclose(part.spacing, reference.spacing, atol=1e-4), (part.spacing, reference.spacing)
    assert np.allclose(part.direction, reference.direction, atol=1e-5)
    start = reference.world_to_index(part.origin)
    assert np.allclose(start, np.rint(start), atol=1e-3), f"dcmqi origin {part.origin} is not on our grid ({start})"
    start = np.rint(start).astype(int)
    stop = start + np.asarray(part.shape)
    assert np.all(start >= 0) and np.all(stop <= np.asarray(reference.shape)), (start, stop, reference.shape)
    out = np.zeros(reference.shape, dtype=bool)
    out[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] = part.array != 0
    return out


def _sr_json(sr: Path, out: Path) -> dict:
    _run("tid1500reader", "--inputDICOM", sr, "--outputMetadata", out)
    return json.loads(out.read_text())


def _dciodvfy(path: Path) -> list:
    done = subprocess.run([str(BIN / "dciodvfy"), str(path)], capture_output=True, text=True)
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    DCIODVFY_WARNINGS.extend(f"{path.name}: {ln}" for ln in lines if ln.startswith("Warning"))
    return lines


def _rows(study, t) -> dict:
    return {r["lesion_id"]: r for r in study["rows"] if r["index"] == t}


# --------------------------------------------------------------------------- SEG
@pytest.mark.parametrize("case", ["oblique", "demo"])
def test_seg_round_trip_through_dcmqi_equals_masks(case, request, tmp_path):
    study = request.getfixturevalue(case)
    for t, name in enumerate(study["names"]):
        parts, meta = _dcmqi_segments(seg_path(study["out"], name), tmp_path / name)
        ids = sorted(study["masks"][t])
        assert sorted(parts) == ids  # every lesion is a segment at every timepoint, segment number = lesion ID
        for pid in ids:
            expected = study["nifti"][t][pid].array != 0 if case == "demo" else study["masks"][t][pid]
            got = _on_grid(parts[pid], study["images"][t])
            assert np.array_equal(got, expected), f"{case} {name} lesion {pid}: {got.sum()} vs {expected.sum()} voxels"
        attributes = {a["labelID"]: a for group in meta["segmentAttributes"] for a in group}
        for pid in ids:
            a = attributes[pid]
            assert a["SegmentLabel"] == a["TrackingIdentifier"] == lesion_label(pid)
            assert a["TrackingUniqueIdentifier"] == tracking_uid(study["series"][0].uid, pid)
            assert np.allclose(a["recommendedDisplayRGBValue"], np.array(lesion_color(pid)) * 255, atol=1.5)


def test_demo_outputs_share_the_geometry_and_do_not_overlap(demo):
    for t, name in enumerate(demo["names"]):
        for image in demo["nifti"][t].values():
            assert image.same_geometry(demo["images"][t])
        assert pydicom.dcmread(seg_path(demo["out"], name), stop_before_pixels=True).SegmentsOverlap == "NO"


def test_seg_read_by_highdicom(oblique):
    import highdicom as hd

    for t, name in enumerate(oblique["names"]):
        series = oblique["series"][t]
        seg = hd.seg.segread(seg_path(oblique["out"], name))
        assert seg.segmentation_type.value == "BINARY" and seg.BitsAllocated == 1
        assert list(seg.segment_numbers) == [1, 2, 3]
        for pid in (1, 2, 3):
            d = seg.get_segment_description(pid)
            assert d.segment_label == d.tracking_id == lesion_label(pid)
            assert d.tracking_uid == tracking_uid(oblique["series"][0].uid, pid)
            rgb = hd.color.CIELabColor.from_dicom_value([int(v) for v in d.RecommendedDisplayCIELabValue]).to_rgb()
            assert np.allclose(rgb, np.array(lesion_color(pid)) * 255, atol=1.5)
        assert seg.FrameOfReferenceUID == series.first.FrameOfReferenceUID
        for key in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber"):
            assert seg[key].value == series.first[key].value
        assert seg.SeriesInstanceUID.startswith("2.25.") and seg.SOPInstanceUID.startswith("2.25.")
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.uid
        referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
        assert referenced == {str(ds.SOPInstanceUID) for ds in series.datasets}
        by_position = {tuple(round(float(v), 3) for v in ds.ImagePositionPatient): str(ds.SOPInstanceUID)
                       for ds in series.datasets}
        for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame references the CT slice it lies on
            position = tuple(round(float(v), 3) for v in frame.PlanePositionSequence[0].ImagePositionPatient)
            source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            assert by_position[position] == source
        volume = seg.get_volume(combine_segments=False, dtype=bool)
        assert volume.array.shape[-1] == 3
    assert pydicom.dcmread(seg_path(oblique["out"], "t0"), stop_before_pixels=True).SegmentsOverlap == "YES"


# --------------------------------------------------------------------------- SR
@pytest.mark.parametrize("case", ["oblique", "demo"])
def test_sr_round_trip_through_tid1500reader(case, request, tmp_path):
    study = request.getfixturevalue(case)
    baseline = study["series"][0].uid
    uids = {}
    for t, name in enumerate(study["names"]):
        report = _sr_json(sr_path(study["out"], name), tmp_path / f"{name}.json")
        seg = pydicom.dcmread(seg_path(study["out"], name), stop_before_pixels=True)
        rows = _rows(study, t)
        groups = {int(g["TrackingIdentifier"].split()[-1]): g for g in report["Measurements"]}
        assert sorted(groups) == sorted(rows)
        for pid, g in groups.items():
            row, status = rows[pid], study["status"][pid][t]
            assert g["TrackingIdentifier"] == lesion_label(pid) and g["timePoint"] == name
            uids.setdefault(pid, set()).add(g["TrackingUniqueIdentifier"])
            [evaluation] = g["qualitativeEvaluations"]
            assert evaluation["conceptCode"]["CodeValue"] == "121052"
            value = evaluation["conceptValue"]
            assert (value["CodeValue"], value["CodingSchemeDesignator"]) == STATUS_CODES[status]
            items = {m["quantity"]["CodeValue"]: m for m in g.get("measurementItems", [])}
            if status == "outside":
                assert not items
            else:
                for code, key, unit in (("118565006", "volume_ml", "ml"), ("103339001", "long_axis_mm", "mm"),
                                        ("103340004", "short_axis_mm", "mm")):
                    assert items[code]["units"]["CodeValue"] == unit
                    assert float(items[code]["value"]) == pytest.approx(row[key], rel=1e-9, abs=1e-9)
            if status == "tracked":
                assert g["ReferencedSegment"] == pid
                assert g["segmentationSOPInstanceUID"] == seg.SOPInstanceUID
                assert g["SourceSeriesForImageSegmentation"] == study["series"][t].uid
            else:
                assert "ReferencedSegment" not in g and "segmentationSOPInstanceUID" not in g
    assert all(len(u) == 1 for u in uids.values())  # one Tracking UID per lesion at every timepoint
    assert len({next(iter(u)) for u in uids.values()}) == len(uids)  # different between lesions
    assert all(next(iter(u)) == tracking_uid(baseline, pid) for pid, u in uids.items())


def test_sr_context_and_evidence(oblique):
    import highdicom as hd

    for t, name in enumerate(oblique["names"]):
        sr = hd.sr.srread(sr_path(oblique["out"], name))
        seg = pydicom.dcmread(seg_path(oblique["out"], name), stop_before_pixels=True)
        series = oblique["series"][t]
        assert sr.StudyInstanceUID == series.first.StudyInstanceUID and sr.PatientID == series.first.PatientID
        evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                    for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
        assert evidence == {str(ds.SOPInstanceUID) for ds in series.datasets} | {seg.SOPInstanceUID}
        assert sr.CompletionFlag == "COMPLETE" and sr.SeriesInstanceUID.startswith("2.25.")
        text = str(sr.ContentSequence)  # procedure reported, device observer (type, UID, name), algorithm
        assert "25045-6" in text and "121007" in text and derived_uid("device", "LesionLocator") in text
        assert "Algorithm Name" in text and "LesionLocator" in text


def test_dciodvfy_reports_no_errors(oblique, demo):
    for study in (oblique, demo):
        for path in study["written"].paths:
            lines = _dciodvfy(path)
            errors = [ln for ln in lines if ln.startswith("Error")]
            assert not errors, f"{path.name}: {errors}"
    print("dciodvfy warnings:", DCIODVFY_WARNINGS or "none")


# --------------------------------------------------------------------------- identity
def test_tracking_uids_are_derived_and_instances_new(oblique, tmp_path):
    import highdicom as hd

    again = write_dicom_results(tmp_path, oblique["series"], oblique["names"], oblique["masks"], oblique["rows"])
    first = hd.seg.segread(seg_path(oblique["out"], "t1"))
    second = hd.seg.segread(seg_path(tmp_path, "t1"))
    for n in (1, 2, 3):
        assert first.get_segment_description(n).tracking_uid == second.get_segment_description(n).tracking_uid
    assert first.SOPInstanceUID != second.SOPInstanceUID and first.SeriesInstanceUID != second.SeriesInstanceUID
    for name in oblique["names"]:
        a = pydicom.dcmread(sr_path(oblique["out"], name), stop_before_pixels=True)
        b = pydicom.dcmread(sr_path(tmp_path, name), stop_before_pixels=True)
        assert a.SOPInstanceUID != b.SOPInstanceUID
    assert again.warnings == []
    # segment on the baseline alone (``segment --dicom-out``): the same Tracking UIDs as ``track``
    baseline_rows = [r for r in oblique["rows"] if r["index"] == 0]
    write_dicom_results(tmp_path / "segment", oblique["series"][:1], ["t0"], oblique["masks"][:1], baseline_rows)
    alone = hd.seg.segread(seg_path(tmp_path / "segment", "t0"))
    assert [alone.get_segment_description(n).tracking_uid for n in (1, 2, 3)] == \
           [tracking_uid(oblique["series"][0].uid, n) for n in (1, 2, 3)]
    uid = tracking_uid(oblique["series"][0].uid, 1)
    assert uid.startswith("2.25.") and len(uid) <= 64 and int(uid[5:]) < 2 ** 128
    assert tracking_uid(oblique["series"][1].uid, 1) != uid


def test_non_consecutive_lesion_ids(oblique, tmp_path):
    import highdicom as hd

    masks = [{1: m[1], 2: m[2], 5: m[3]} for m in oblique["masks"]]
    status = {1: ["tracked", "tracked"], 2: ["tracked", "vanished"], 5: ["tracked", "outside"]}
    rows = lesion_measurements(oblique["images"], masks, status, oblique["names"])
    written = write_dicom_results(tmp_path, oblique["series"], oblique["names"], masks, rows)
    assert len(written.warnings) == 1 and "Lesion 5 = segment 3" in written.warnings[0]
    seg = hd.seg.segread(seg_path(tmp_path, "t0"))
    assert list(seg.segment_numbers) == [1, 2, 3]
    assert [seg.get_segment_description(n).tracking_id for n in (1, 2, 3)] == ["Lesion 1", "Lesion 2", "Lesion 5"]
    assert seg.get_segment_description(3).tracking_uid == tracking_uid(oblique["series"][0].uid, 5)
    report = _sr_json(sr_path(tmp_path, "t0"), tmp_path / "t0.json")
    assert {g["TrackingIdentifier"]: g["ReferencedSegment"] for g in report["Measurements"]} == \
           {"Lesion 1": 1, "Lesion 2": 2, "Lesion 5": 3}
    back = read_seg(seg_path(tmp_path, "t0"), oblique["images"][0], oblique["series"][0])
    assert sorted(back) == [1, 2, 5] and np.array_equal(back[5], masks[0][5])


def test_timepoint_without_lesion_voxels(oblique, tmp_path):
    """Every lesion gone at t1: a SEG with empty segments (one slice of empty frames) and an SR
    without segment references; both readable and valid."""
    masks = [oblique["masks"][0], {pid: np.zeros_like(m) for pid, m in oblique["masks"][0].items()}]
    status = {pid: ["tracked", "vanished"] for pid in masks[0]}
    rows = lesion_measurements(oblique["images"], masks, status, oblique["names"])
    written = write_dicom_results(tmp_path, oblique["series"], oblique["names"], masks, rows)
    seg = pydicom.dcmread(seg_path(tmp_path, "t1"), stop_before_pixels=True)
    assert seg.NumberOfFrames == 3 and len(seg.SegmentSequence) == 3
    parts, _ = _dcmqi_segments(seg_path(tmp_path, "t1"), tmp_path / "dcmqi")
    assert sorted(parts) == [1, 2, 3] and not any(p.array.any() for p in parts.values())
    report = _sr_json(sr_path(tmp_path, "t1"), tmp_path / "t1.json")
    assert all("ReferencedSegment" not in g for g in report["Measurements"])
    for path in written.paths:
        assert not [ln for ln in _dciodvfy(path) if ln.startswith("Error")]


# --------------------------------------------------------------------------- reading SEG back
def test_read_seg_round_trip_oblique(oblique):
    for t, name in enumerate(oblique["names"]):  # t1 holds only lesion 1: its empty segments come back empty
        back = read_seg(seg_path(oblique["out"], name), oblique["images"][t], oblique["series"][t])
        assert sorted(back) == [1, 2, 3]
        for pid, mask in oblique["masks"][t].items():
            assert back[pid].dtype == bool and np.array_equal(back[pid], mask)


def test_read_seg_places_by_world_position(oblique):
    """A reference grid shifted by whole voxels (a sub-volume of the scan): the masks move with it."""
    image = oblique["images"][0]
    sub = Image(image.array[4:20, 5:, 3:40], image.spacing, tuple(image.index_to_world((4, 5, 3))), image.direction)
    back = read_seg(seg_path(oblique["out"], "t0"), sub)
    for pid, mask in oblique["masks"][0].items():
        assert np.array_equal(back[pid], mask[4:20, 5:, 3:40])


def test_read_seg_made_by_another_tool(oblique, tmp_path):
    """A SEG written by dcmqi's itkimage2segimage (no tracking IDs: lesion ID = segment number)."""
    image, labels = oblique["images"][0], np.zeros(oblique["images"][0].shape, np.uint8)
    labels[oblique["masks"][0][1]] = 1
    labels[oblique["masks"][0][2]] = 2
    write_image(image.with_array(labels), tmp_path / "labels.nii.gz")
    code = {"CodeValue": "52988006", "CodingSchemeDesignator": "SCT", "CodeMeaning": "Lesion"}
    category = {"CodeValue": "49755003", "CodingSchemeDesignator": "SCT",
                "CodeMeaning": "Morphologically Abnormal Structure"}
    meta = {"ContentCreatorName": "Reader^One", "SeriesDescription": "manual", "SeriesNumber": "300",
            "InstanceNumber": "1", "BodyPartExamined": "", "ClinicalTrialSeriesID": "1",
            "ClinicalTrialTimePointID": "1",
            "ClinicalTrialCoordinatingCenterName": "test", "ContentLabel": "MANUAL", "ContentDescription": "manual",
            "segmentAttributes": [[{"labelID": n, "SegmentLabel": f"tumour {n}", "SegmentDescription": f"tumour {n}",
                                    "SegmentAlgorithmType": "MANUAL", "SegmentedPropertyCategoryCodeSequence": category,
                                    "SegmentedPropertyTypeCodeSequence": code,
                                    "recommendedDisplayRGBValue": [200, 50, 50]} for n in (1, 2)]]}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    _run("itkimage2segimage", "--inputImageList", tmp_path / "labels.nii.gz", "--inputDICOMDirectory",
         oblique["series"][0].folder, "--inputMetadata", tmp_path / "meta.json", "--outputDICOM", tmp_path / "seg.dcm")
    back = read_seg(tmp_path / "seg.dcm", image, oblique["series"][0])
    assert sorted(back) == [1, 2]
    assert np.array_equal(back[1], labels == 1) and np.array_equal(back[2], labels == 2)


@pytest.mark.parametrize("kind", ["FRACTIONAL", "LABELMAP"])
def test_read_seg_fractional_and_labelmap(kind, oblique, tmp_path):
    """FRACTIONAL: a voxel is the lesion's where its value is at least 0.5; LABELMAP (Label Map
    Segmentation Storage): the voxels labelled with the segment number."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    series = oblique["series"][0]
    m1, m2 = oblique["masks"][0][1], oblique["masks"][0][2]
    if kind == "FRACTIONAL":
        values = np.stack([m1 * 0.75, m2 * 0.25], axis=-1).astype(np.float32)
        expected = {1: m1, 2: np.zeros_like(m2)}
    else:
        values = (m1 * 1 + m2 * 2).astype(np.uint8)
        expected = {1: m1, 2: m2}
    descriptions = [hd.seg.SegmentDescription(n, f"x{n}", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion,
                                              "MANUAL") for n in (1, 2)]
    seg = hd.seg.Segmentation(series.datasets, values, kind, descriptions, generate_uid(), 5, generate_uid(),
                              1, "test", "test", "1", "1")
    seg.save_as(tmp_path / "seg.dcm")
    back = read_seg(tmp_path / "seg.dcm", oblique["images"][0], series)
    assert sorted(back) == [1, 2]
    assert all(np.array_equal(back[n], expected[n]) for n in (1, 2))


def test_read_seg_of_another_frame_of_reference_is_refused(oblique, demo):
    with pytest.raises(SegError, match="frame of reference .* another scan's coordinates"):
        read_seg(seg_path(demo["out"], "t0"), oblique["images"][0], oblique["series"][0])


def test_read_seg_outside_the_reference_is_refused(oblique):
    image = oblique["images"][0]
    far = Image(image.array, image.spacing, tuple(np.asarray(image.origin) + 500.0), image.direction)
    with pytest.raises(SegError, match="none of its 3 segment"):
        read_seg(seg_path(oblique["out"], "t0"), far)


def test_read_seg_of_a_non_seg_is_refused(oblique):
    with pytest.raises(SegError, match="not a DICOM SEG"):
        read_seg(sr_path(oblique["out"], "t0"), oblique["images"][0])
    with pytest.raises(FileNotFoundError):
        read_seg(oblique["out"] / "missing.dcm", oblique["images"][0])


def test_write_refuses_inputs_that_do_not_fit(oblique, tmp_path):
    with pytest.raises(ValueError, match="not DICOM: t1"):
        write_dicom_results(tmp_path, [oblique["series"][0], None], oblique["names"], oblique["masks"],
                            oblique["rows"])
    with pytest.raises(ValueError, match="mask of shape"):
        write_dicom_results(tmp_path, oblique["series"][:1], ["t0"], [{1: np.zeros((2, 2, 2), bool)}],
                            [{"lesion_id": 1, "index": 0, "status": "tracked", "volume_ml": 0.0,
                              "long_axis_mm": 0.0, "short_axis_mm": 0.0}])
    assert not list(tmp_path.iterdir())
