"""Correcting a tracked study (:func:`LesionLocatorLib.correct.retrack`) on the demo case with the
demo model: four scans (the demo's baseline and two follow-ups, and the second follow-up again,
moved 6 mm: a third follow-up with a known motion), tracked once from the baseline's label image.

A correction at a follow-up leaves the earlier scans and every other lesion bit for bit as they
were, segments the corrected scan from the correction and re-propagates the later scans from it
(the same result as warping the corrected mask with the earlier run's registration and
segmenting it), and runs no registration. A tracking failure (a lesion lost from scan 1 on) is
repaired by one click at the lesion's true centre (Dice against the ground truth); 'vanished'
empties a lesion from its scan on; a lesion first seen at a follow-up is 'absent' before it,
'new' there, tracked after it, and makes that scan's RECIST category PD.
"""
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from LesionLocatorLib import cli, register as register_module
from LesionLocatorLib.correct import Correction, retrack
from LesionLocatorLib.evaluate import dice
from LesionLocatorLib.image import Image, read_image, write_image
from LesionLocatorLib.measure import lesion_measurements
from LesionLocatorLib.model import load_model
from LesionLocatorLib.predict import segment
from LesionLocatorLib.prompts import Box, MaskPrompt, Point, PromptError
from LesionLocatorLib.track import TrackResult, track, warp_lesion
from LesionLocatorLib.zoo import demo_model_dir

DEMO = Path(__file__).resolve().parents[1] / "Resources" / "Demo"
SHIFT_MM = np.array([6.0, -4.0, 3.0])  # the fourth scan: the third moved by this (x, y, z LPS mm)


def _moved(image: Image) -> Image:
    return Image(image.array, image.spacing, np.asarray(image.origin) + SHIFT_MM, image.direction)


@pytest.fixture(scope="module")
def study():
    images = [read_image(DEMO / f"demo_t{t}.nii.gz") for t in range(3)]
    truth = [read_image(DEMO / f"demo_t{t}_label.nii.gz") for t in range(3)]
    images.append(_moved(images[2]))
    truth.append(_moved(truth[2]))
    root = demo_model_dir()
    models = {kind: load_model(root, kind, device="cpu") for kind in ("prev_mask", "point", "box")}
    first = track(images, truth[0], models["prev_mask"])
    return {"images": images, "truth": truth, "models": models, "first": first}


def _centre(label: Image, lesion: int) -> tuple:
    """The world (LPS mm) centre of a ground-truth lesion: where a user would click."""
    return tuple(label.index_to_world(np.argwhere(label.array == lesion).mean(axis=0)))


def _retrack(study, previous, corrections, **options):
    m = study["models"]
    return retrack(study["images"], previous, corrections, m["prev_mask"], {"point": m["point"], "box": m["box"]},
                   **options)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and np.array_equal(a, b)


def _lost_from(previous: TrackResult, lesion: int, t0: int) -> TrackResult:
    """``previous`` with ``lesion`` lost from scan ``t0`` on (a tracking failure to repair)."""
    masks = [dict(m) for m in previous.masks]
    status = {pid: list(s) for pid, s in previous.status.items()}
    for t in range(t0, len(masks)):
        masks[t][lesion] = np.zeros_like(masks[t][lesion])
        status[lesion][t] = "vanished"
    return TrackResult(masks, previous.labels, status, previous.transforms, previous.timings,
                       previous.inside_fraction)


@pytest.fixture
def no_registration(monkeypatch):
    """Every registration backend call fails the test (a correction must reuse the earlier ones)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a correction ran a registration")

    monkeypatch.setattr(register_module, "register", refuse)
    return calls


def test_a_click_at_a_follow_up_changes_that_lesion_from_there_on_only(study, no_registration):
    images, first, m = study["images"], study["first"], study["models"]
    lesion = 2
    click = Point(lesion, _centre(study["truth"][1], lesion))
    got = _retrack(study, first, [Correction(lesion, 1, click)])
    assert no_registration == [] and got.timings["registration"] == 0.0
    assert got.transforms == first.transforms
    for t in range(4):
        for pid in first.masks[t]:
            if pid != lesion or t == 0:
                assert _same(got.masks[t][pid], first.masks[t][pid]), (t, pid)
        for pid in first.status:
            if pid != lesion:
                assert got.status[pid] == first.status[pid]
    assert _same(got.labels[0].array, first.labels[0].array)
    # scan 1: segmented from the click with the point model
    want = segment(images[1], [click], m["point"]).masks[lesion]
    assert _same(got.masks[1][lesion], want) and want.any()
    # scans 2 and 3: re-propagated from the corrected mask with the earlier run's registrations
    carried = want
    for t in (2, 3):
        warped, _ = warp_lesion(carried, images[t - 1], images[t], first.transforms[t - 1])
        expected = segment(images[t], [MaskPrompt(lesion, images[t].with_array(warped))], m["prev_mask"]).masks[lesion]
        assert _same(got.masks[t][lesion], expected), t
        carried = expected if expected.any() else warped
    assert got.status[lesion] == ["tracked"] * 4
    for t in range(1, 4):  # the label images follow the masks; other lesions' voxels are never taken
        assert np.array_equal(got.labels[t].array == lesion, got.masks[t][lesion] & (
            (first.labels[t].array == 0) | (first.labels[t].array == lesion)))
    # the earlier result is not changed
    assert first.status[lesion] == ["tracked"] * 4


def test_one_click_repairs_a_lost_lesion_through_the_later_scans(study, no_registration):
    """Lesion 3 lost from scan 1 on; one click at its true centre at scan 1 brings it back at
    scans 1, 2 and 3 (Dice against the ground truth as good as the automatic run's)."""
    truth, lesion = study["truth"], 3
    broken = _lost_from(study["first"], lesion, 1)
    fixed = _retrack(study, broken, [Correction(lesion, 1, Point(lesion, _centre(truth[1], lesion)))])
    for t in (1, 2, 3):
        assert dice(broken.masks[t][lesion], truth[t].array == lesion) == 0.0
        score = dice(fixed.masks[t][lesion], truth[t].array == lesion)
        auto = dice(study["first"].masks[t][lesion], truth[t].array == lesion)
        assert score >= 0.7 and score >= auto - 0.1, (t, score, auto)
    assert fixed.status[lesion] == ["tracked"] * 4


def test_box_and_mask_corrections(study, no_registration):
    images, truth, lesion = study["images"], study["truth"], 1
    where = np.argwhere(truth[2].array == lesion)
    lo, hi = images[2].index_to_world(where.min(axis=0) - 1), images[2].index_to_world(where.max(axis=0) + 1)
    box = Box.from_points(lesion, [lo, hi])
    got = _retrack(study, study["first"], [Correction(lesion, 2, box)])
    assert _same(got.masks[2][lesion], segment(images[2], [box], study["models"]["box"]).masks[lesion])
    assert dice(got.masks[2][lesion], truth[2].array == lesion) >= 0.7
    edited = MaskPrompt(lesion, truth[2].with_array((truth[2].array == lesion).astype(np.uint8)))
    got = _retrack(study, study["first"], [Correction(lesion, 2, edited)])
    want = segment(images[2], [edited], study["models"]["prev_mask"]).masks[lesion]
    assert _same(got.masks[2][lesion], want) and dice(want, truth[2].array == lesion) >= 0.7


def test_vanished_empties_the_lesion_from_that_scan_on(study, no_registration):
    first, lesion = study["first"], 4
    got = _retrack(study, first, [Correction(lesion, 2, vanished=True)])
    assert got.status[lesion] == first.status[lesion][:2] + ["vanished", "vanished"]
    assert _same(got.masks[1][lesion], first.masks[1][lesion])
    assert not got.masks[2][lesion].any() and not got.masks[3][lesion].any()
    assert not (got.labels[2].array == lesion).any() and not (got.labels[3].array == lesion).any()
    rows = {(r["lesion_id"], r["index"]): r for r in lesion_measurements(study["images"], got.masks, got.status)}
    assert rows[lesion, 2]["volume_ml"] == 0.0 and rows[lesion, 2]["lesion_change_category"] == "disappeared"


@pytest.fixture(scope="module")
def without_lesion_2(study):
    """The study tracked from a baseline without lesion 2."""
    truth = study["truth"]
    baseline = truth[0].with_array(np.where(truth[0].array == 2, 0, truth[0].array).astype(truth[0].array.dtype))
    return track(study["images"], baseline, study["models"]["prev_mask"])


def test_a_lesion_first_seen_at_a_follow_up_is_new_there_and_makes_it_pd(study, without_lesion_2, no_registration):
    """Lesion 2 left out of the baseline (as if it were not there yet) and added at scan 2 as
    lesion 9 with one click: absent at 0 and 1, new at 2, tracked at 3; RECIST PD at scan 2; not a
    target lesion (the sum of long axes leaves it out)."""
    images, truth, first = study["images"], study["truth"], without_lesion_2
    assert 2 not in first.status
    got = _retrack(study, first, [Correction(9, 2, Point(9, _centre(truth[2], 2)), new=True)])
    assert got.status[9] == ["absent", "absent", "new", "tracked"]
    assert not got.masks[0][9].any() and not got.masks[1][9].any()
    for t in (2, 3):
        assert dice(got.masks[t][9], truth[t].array == 2) >= 0.7
    rows = {(r["lesion_id"], r["index"]): r for r in lesion_measurements(images, got.masks, got.status)}
    before = {(r["lesion_id"], r["index"]): r for r in lesion_measurements(images, first.masks, first.status)}
    assert [rows[9, t]["lesion_change_category"] for t in range(3)] == ["absent", "absent", "new"]
    assert rows[9, 3]["lesion_change_category"] in ("stable", "increase", "decrease")  # against scan 2
    assert rows[9, 2]["recist_information_only"] == "PD" and before[1, 2]["recist_information_only"] != "PD"
    assert all(rows[1, t]["sum_long_axes_mm"] == before[1, t]["sum_long_axes_mm"] for t in range(4))
    assert rows[9, 1]["volume_change_vs_baseline_pct"] is None and rows[9, 2]["volume_change_vs_baseline_pct"] == 0.0
    assert rows[9, 3]["volume_change_vs_baseline_pct"] == pytest.approx(
        100 * (rows[9, 3]["volume_ml"] - rows[9, 2]["volume_ml"]) / rows[9, 2]["volume_ml"])


BAD = [
    (Correction(2, 0, Point(2, (0.0, 0.0, 0.0))), "the scan must be a follow-up, 1..3"),
    (Correction(2, 4, Point(2, (0.0, 0.0, 0.0))), "the scan must be a follow-up, 1..3"),
    (Correction(2, 1), "give a point, a box or a mask on that scan, or vanished, and only one"),
    (Correction(2, 1, Point(2, (0.0, 0.0, 0.0)), vanished=True), "and only one"),
    (Correction(2, 1, Point(5, (0.0, 0.0, 0.0))), "its prompt has ID 5"),
    (Correction(0, 1, vanished=True), "a lesion ID is an integer 1..65535"),
    (Correction(9, 1, vanished=True, new=True), "a new lesion needs a point, box or mask at its first scan"),
    (Correction(9, 1, Point(9, (0.0, 0.0, 0.0))), "lesion 9 is not in the study (it has lesions 1, 2, 3, 4); to "
     "add a lesion first seen at this scan, mark it new"),
    (Correction(2, 1, Point(2, (0.0, 0.0, 0.0)), new=True), "lesion 2 is already in the study"),
    (Correction(2, 1, "centre"), "give a point, a box or a mask"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=[m[:30] for _, m in BAD])
def test_a_bad_correction_is_refused_before_any_work(study, no_registration, bad, message):
    with pytest.raises(PromptError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _retrack(study, study["first"], [bad])


def test_the_same_lesion_and_scan_twice_or_other_images_are_refused(study):
    twice = [Correction(2, 1, vanished=True), Correction(2, 1, vanished=True)]
    with pytest.raises(PromptError, match="correction of lesion 2 at scan 1: given twice"):
        _retrack(study, study["first"], twice)
    m = study["models"]
    with pytest.raises(ValueError, match="the earlier run has 4 scans and 3 registrations; these images are 3 scans"):
        retrack(study["images"][:3], study["first"], [Correction(2, 1, vanished=True)], m["prev_mask"])
    outside = Correction(2, 1, Point(2, (900.0, 900.0, 900.0)))
    with pytest.raises(PromptError, match="outside the image"):
        _retrack(study, study["first"], [outside])
    with pytest.raises(PromptError, match="new lesion 9 at scan 1: the network found no lesion"):
        _retrack(study, study["first"], [Correction(9, 1, Point(9, tuple(study["images"][1].index_to_world(
            [1, 1, 1]))), new=True)])


# ------------------------------------------------------------------------------ the command line
def _corrections_file(tmp_path: Path, entries, name="corrections.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({"format": "lesionlocator-corrections/1", "frame": "LPS", "units": "mm",
                                "corrections": entries}))
    return path


def test_cli_track_with_corrections(study, tmp_path, capsys):
    """``track --corrections``: lesion 3 vanished from demo_t1 on, lesion 9 new at scan 2 (where
    lesion 2 is, left out of the baseline), lesion 1 corrected with its edited mask at scan 2:
    lesions.csv and the label images say so."""
    truth = study["truth"]
    baseline = tmp_path / "baseline_label.nii.gz"
    write_image(truth[0].with_array(np.where(truth[0].array == 2, 0, truth[0].array).astype(np.uint8)), baseline)
    edited = tmp_path / "lesion1_t2.nii.gz"
    write_image(truth[2].with_array((truth[2].array == 1).astype(np.uint8)), edited)
    corrections = _corrections_file(tmp_path, [
        {"lesion": 3, "scan": "demo_t1", "vanished": True},
        {"lesion": 9, "scan": 2, "point": list(_centre(truth[2], 2)), "new": True},
        {"lesion": 1, "scan": "demo_t2", "mask": edited.name}])
    out = tmp_path / "out"
    assert cli.main(["track", "-bl", str(DEMO / "demo_t0.nii.gz"), "-fu", str(DEMO / "demo_t1.nii.gz"),
                     str(DEMO / "demo_t2.nii.gz"), "-p", str(baseline), "-t", "prev_mask", "-o", str(out),
                     "--corrections", str(corrections), "--disable_progress_bar", "--device", "cpu"]) == 0
    capsys.readouterr()
    rows = {(int(r["lesion_id"]), r["timepoint"]): r for r in csv.DictReader(open(out / "lesions.csv"))}
    assert [rows[3, n]["status"] for n in ("demo_t0", "demo_t1", "demo_t2")] == ["tracked", "vanished", "vanished"]
    assert [rows[9, n]["status"] for n in ("demo_t0", "demo_t1", "demo_t2")] == ["absent", "absent", "new"]
    assert rows[9, "demo_t2"]["recist_information_only"] == "PD"
    labels = read_image(out / "demo_t2_lesions.nii.gz").array
    assert dice(labels == 9, truth[2].array == 2) >= 0.7 and not (labels == 3).any()
    assert dice(read_image(out / "demo_t2_lesion_1.nii.gz").array > 0, truth[2].array == 1) >= 0.7


BAD_FILES = [
    ({"format": "lesionlocator-corrections/1", "corrections": []}, "\"corrections\" must be a non-empty list"),
    ({"format": "x", "corrections": []}, "a corrections file is an object with \"format\""),
    ({"format": "lesionlocator-corrections/1", "units": "cm", "corrections": [{}]}, "\"units\" \"mm\""),
    ([{"lesion": 2, "scan": 1}], "corrections\\[0\\] \\(lesion 2\\): give exactly one of"),
    ([{"lesion": 2, "scan": 1, "point": [1, 2]}], "corrections\\[0\\]"),
    ([{"lesion": 2, "scan": 1, "mask": "nothere.nii.gz"}], "mask file not found"),
    ([{"lesion": 2, "scan": 1, "vanished": "yes"}], "\"vanished\" must be true or false"),
    ([{"lesion": 2, "scan": 0, "vanished": True}], "\"scan\" is a follow-up's name or its index"),
    ([{"lesion": 2, "scan": 1, "vanished": True}, {"lesion": 2, "scan": 1, "vanished": True}],
     "corrects lesion 2 at scan 1 again"),
    ([{"lesion": 2, "scan": 1, "vanished": True, "color": 1}], 'unknown key "color"'),
    ([{"lesion": 2, "scan": "demo_t7", "vanished": True}], 'no scan named "demo_t7"; the scans are demo_t0, demo_t1'),
    ([{"lesion": 2, "scan": 5, "vanished": True}], "scan 5 does not exist: 2 follow-up\\(s\\) were tracked"),
    ([{"lesion": 7, "scan": 1, "vanished": True}], "lesion 7 is not in the study"),
]


@pytest.mark.parametrize("content,message", BAD_FILES, ids=[f"{n}" for n in range(len(BAD_FILES))])
def test_cli_refuses_a_bad_corrections_file_and_writes_nothing(tmp_path, capsys, content, message):
    path = tmp_path / "corrections.json"
    if isinstance(content, list):
        path = _corrections_file(tmp_path, content)
    else:
        path.write_text(json.dumps(content))
    out = tmp_path / "out"
    code = cli.main(["track", "-bl", str(DEMO / "demo_t0.nii.gz"), "-fu", str(DEMO / "demo_t1.nii.gz"),
                     str(DEMO / "demo_t2.nii.gz"), "-p", str(DEMO / "demo_t0_label.nii.gz"), "-t", "prev_mask",
                     "-o", str(out), "--corrections", str(path), "--disable_progress_bar", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err) and "Traceback" not in err, err
    assert not out.exists()
