"""DICOM through the command line: the demo study as DICOM series in, NIfTI + DICOM SEG + SR out.

The demo's three scans are written as DICOM CT series (``dicom_fixtures.write_demo_study``: the
same voxels and geometry as Resources/Demo/demo_t*.nii.gz) and run through ``lesionlocator``
with the shipped demo model. Independent readers check what comes out: highdicom (the SEG,
through :func:`LesionLocatorLib.dicomseg.read_seg`) and dcmqi's ``tid1500reader`` (the SR).
The writers' own round trips (dcmqi's segimage2itkimage, dciodvfy) are in test_dicom_output.py,
the reader's refusals in test_dicom_input.py and the command-line refusals in test_bad_inputs.py.
"""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_fixtures import write_demo_study
from LesionLocatorLib.cli import main
from LesionLocatorLib.dicomseg import read_seg
from LesionLocatorLib.dicomseries import read_series
from LesionLocatorLib.image import read_image

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "Resources" / "Demo"
POINTS = DEMO / "demo_points.json"
TID1500READER = Path(sys.executable).parent / "tid1500reader"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The demo's scans as DICOM series t0, t1, t2 (dated 2024-01, 2024-07, 2025-01)."""
    return write_demo_study(tmp_path_factory.mktemp("dicom"))


def run(*argv) -> int:
    return main([*map(str, argv), "--disable_progress_bar"])


def sr_groups(path: Path, tmp: Path) -> dict:
    """{tracking identifier: measurement group} of an SR, read by dcmqi's tid1500reader."""
    out = tmp / (path.stem + ".json")
    subprocess.run([str(TID1500READER), "--inputDICOM", str(path), "--outputMetadata", str(out)], check=True,
                   capture_output=True)
    return {g["TrackingIdentifier"]: g for g in json.loads(out.read_text())["Measurements"]}


def measured(group: dict, meaning: str) -> float:
    return next(float(m["value"]) for m in group["measurementItems"] if m["quantity"]["CodeMeaning"] == meaning)


def test_segment_on_a_dicom_series_gives_the_masks_of_the_same_volume_as_nifti(study, tmp_path):
    nifti = tmp_path / "t0.nii.gz"
    shutil.copy(DEMO / "demo_t0.nii.gz", nifti)
    assert run("segment", "-i", study[0], "-p", POINTS, "-t", "point", "-o", tmp_path / "a") == 0
    assert run("segment", "-i", nifti, "-p", POINTS, "-t", "point", "-o", tmp_path / "b") == 0
    a, b = read_image(tmp_path / "a" / "t0_lesions.nii.gz"), read_image(tmp_path / "b" / "t0_lesions.nii.gz")
    assert a.same_geometry(b)
    assert sorted(np.unique(a.array)) == [0, 1, 2, 3, 4]
    assert np.array_equal(a.array, b.array)


def test_track_writes_per_scan_a_seg_equal_to_the_nifti_masks_and_an_sr_equal_to_lesions_csv(study, tmp_path):
    out, dicom_out = tmp_path / "out", tmp_path / "dicom"
    assert run("track", "-bl", study[0], "-fu", study[1], study[2], "-p", POINTS, "-t", "point", "-o", out,
               "--registration", "none", "--dicom-out", dicom_out) == 0
    assert sorted(p.name for p in dicom_out.iterdir()) == [f"t{t}_{k}.dcm" for t in range(3) for k in ("seg", "sr")]
    rows = list(csv.DictReader(open(out / "lesions.csv")))
    uids = {}
    for t, folder in enumerate(study):
        image, series = read_series(folder)
        masks = read_seg(dicom_out / f"t{t}_seg.dcm", image, series)
        assert sorted(masks) == [1, 2, 3, 4]
        groups = sr_groups(dicom_out / f"t{t}_sr.dcm", tmp_path)
        assert sorted(groups) == [f"Lesion {i}" for i in range(1, 5)]
        for pid, mask in masks.items():
            nifti = read_image(out / f"t{t}_lesion_{pid}.nii.gz").array > 0
            assert np.array_equal(mask, nifti), (t, pid)
            row = next(r for r in rows if int(r["lesion_id"]) == pid and int(r["index"]) == t)
            group = groups[f"Lesion {pid}"]
            assert measured(group, "Volume") == pytest.approx(float(row["volume_ml"]), rel=1e-6)
            assert measured(group, "Long Axis") == pytest.approx(float(row["long_axis_mm"]), rel=1e-6)
            assert measured(group, "Short Axis") == pytest.approx(float(row["short_axis_mm"]), rel=1e-6)
            uids.setdefault(pid, set()).add(group["TrackingUniqueIdentifier"])
    assert all(len(u) == 1 for u in uids.values()), "one Tracking UID per lesion at every timepoint"
    assert len(set.union(*uids.values())) == 4, "different lesions, different Tracking UIDs"


def test_a_seg_from_segment_tracks_as_prev_mask_and_keeps_lesion_ids_and_tracking_uids(study, tmp_path):
    first = tmp_path / "first"
    assert run("segment", "-i", study[0], "-p", POINTS, "-t", "point", "-o", tmp_path / "seg", "--dicom-out",
               first) == 0
    then = tmp_path / "then"
    assert run("track", "-bl", study[0], "-fu", study[1], "-p", first / "t0_seg.dcm", "-t", "prev_mask", "-o",
               tmp_path / "trk", "--registration", "none", "--dicom-out", then) == 0
    segmented = sr_groups(first / "t0_sr.dcm", tmp_path)
    tracked = sr_groups(then / "t1_sr.dcm", tmp_path)
    assert sorted(tracked) == sorted(segmented) == [f"Lesion {i}" for i in range(1, 5)]
    for name in segmented:
        assert tracked[name]["TrackingUniqueIdentifier"] == segmented[name]["TrackingUniqueIdentifier"]
    image, series = read_series(study[0])
    baseline = read_seg(then / "t0_seg.dcm", image, series)
    for pid, mask in baseline.items():  # the baseline of prev_mask tracking is the SEG it was given
        assert np.array_equal(mask, read_image(tmp_path / "seg" / f"t0_lesion_{pid}.nii.gz").array > 0)


def test_follow_ups_in_folders_named_alike_get_names_of_their_own(study, tmp_path):
    for year, t in (("2024", 1), ("2025", 2)):
        shutil.copytree(study[t], tmp_path / year / "CT")
    out = tmp_path / "out"
    assert run("track", "-bl", study[0], "-fu", tmp_path / "2024" / "CT", tmp_path / "2025" / "CT", "-p", POINTS,
               "-t", "point", "-o", out, "--registration", "none") == 0
    assert {p.name for p in out.glob("*_lesions.nii.gz")} == {"t0_lesions.nii.gz", "CT_t1_lesions.nii.gz",
                                                              "CT_t2_lesions.nii.gz"}


def test_follow_ups_given_out_of_date_order_are_tracked_as_given_with_a_warning(study, tmp_path, capsys):
    assert run("track", "-bl", study[0], "-fu", study[2], study[1], "-p", POINTS, "-t", "point", "-o",
               tmp_path / "out", "--registration", "none") == 0
    err = capsys.readouterr().err
    assert "'t1' (20240715) is dated before 't2' (20250115), which is tracked before it" in err


def test_evaluate_takes_a_dicom_seg_as_the_prediction(study, tmp_path, capsys):
    dicom_out = tmp_path / "dicom"
    assert run("segment", "-i", study[0], "-p", POINTS, "-t", "point", "-o", tmp_path / "out", "--dicom-out",
               dicom_out) == 0
    gt = DEMO / "demo_t0_label.nii.gz"
    assert main(["evaluate", "--pred", str(dicom_out / "t0_seg.dcm"), "--gt", str(gt), "-o",
                 str(tmp_path / "seg_eval")]) == 0
    assert main(["evaluate", "--pred", str(tmp_path / "out" / "t0_lesions.nii.gz"), "--gt", str(gt), "-o",
                 str(tmp_path / "nifti_eval")]) == 0
    from_seg = json.loads((tmp_path / "seg_eval.json").read_text())
    from_nifti = json.loads((tmp_path / "nifti_eval.json").read_text())
    assert [r["dice"] for r in from_seg] == [r["dice"] for r in from_nifti]
    assert len(from_seg) == 4 and min(r["dice"] for r in from_seg) > 0.8


def test_segment_on_a_real_scanner_series_equals_segment_on_its_nifti_from_gdcm(totalsegmentator_dicom, tmp_path):
    """A real Siemens series (JPEG 2000, 12-bit unsigned, intercept -1024, empty UIDs): the masks from
    the DICOM folder equal those from a NIfTI of the same volume made by SimpleITK's GDCM reader."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(totalsegmentator_dicom)))
    nifti = tmp_path / "real.nii.gz"
    sitk.WriteImage(reader.Execute(), str(nifti))
    prompts = tmp_path / "real.json"
    prompts.write_text(json.dumps({"1": {"point": [10, 300, 200]}, "2": {"point": [8, 250, 330]}}))
    assert run("segment", "-i", totalsegmentator_dicom, "-p", prompts, "-t", "point", "-o", tmp_path / "a") == 0
    assert run("segment", "-i", nifti, "-p", prompts, "-t", "point", "-o", tmp_path / "b") == 0
    name = Path(totalsegmentator_dicom).name
    a, b = read_image(tmp_path / "a" / f"{name}_lesions.nii.gz"), read_image(tmp_path / "b" / "real_lesions.nii.gz")
    assert a.same_geometry(b) and a.shape == (20, 512, 512)
    assert all(np.count_nonzero(a.array == pid) > 0 for pid in (1, 2)), "each click gives a mask"
    assert np.array_equal(a.array, b.array)


def test_continue_prediction_redoes_a_case_whose_dicom_results_are_missing(study, tmp_path, capsys):
    argv = ["segment", "-i", study[0], "-p", POINTS, "-t", "point", "-o", tmp_path / "out", "--dicom-out",
            tmp_path / "dicom", "--continue_prediction"]
    assert run(*argv) == 0
    first = (tmp_path / "dicom" / "t0_seg.dcm").stat().st_mtime_ns
    capsys.readouterr()
    assert run(*argv) == 0
    assert "t0: already predicted, skipping (--continue_prediction)" in capsys.readouterr().err
    (tmp_path / "dicom" / "t0_sr.dcm").unlink()
    assert run(*argv) == 0
    assert "already predicted" not in capsys.readouterr().err
    assert (tmp_path / "dicom" / "t0_sr.dcm").is_file()
    assert (tmp_path / "dicom" / "t0_seg.dcm").stat().st_mtime_ns != first
