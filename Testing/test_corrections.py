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
from LesionLocatorLib.correctionfile import read_confirmed_points, read_corrections, resolve_corrections, \
    write_corrections
from LesionLocatorLib.evaluate import dice
from LesionLocatorLib.image import Image, read_image, write_image
from LesionLocatorLib.measure import lesion_measurements
from LesionLocatorLib.model import load_model
from LesionLocatorLib.modelfolder import ModelSpec
from LesionLocatorLib.predict import segment
from LesionLocatorLib.prompts import Box, MaskPrompt, Point, PromptError
from LesionLocatorLib.runner import InProcessRunner, TrackRequest, WorkerProcessRunner
from LesionLocatorLib.track import TrackResult, shift_mask, track, warp_lesion
from LesionLocatorLib.trackstate import TrackStateError, load_track_state, save_track_state
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


def test_cli_track_with_corrections_then_resumed_with_more(study, tmp_path, capsys, monkeypatch):
    """``track --corrections``: lesion 3 vanished from demo_t1 on; then ``--resume-from`` that
    output with lesion 9 new at scan 2 (where lesion 2 is, left out of the baseline) and lesion 1
    corrected with its edited mask at scan 2, without registering again: lesions.csv and the label
    images say so, and lesion 1 at scan 1 is the earlier run's file voxel for voxel."""
    truth = study["truth"]
    baseline = tmp_path / "baseline_label.nii.gz"
    write_image(truth[0].with_array(np.where(truth[0].array == 2, 0, truth[0].array).astype(np.uint8)), baseline)
    edited = tmp_path / "lesion1_t2.nii.gz"
    write_image(truth[2].with_array((truth[2].array == 1).astype(np.uint8)), edited)
    first = _corrections_file(tmp_path, [{"lesion": 3, "scan": "demo_t1", "vanished": True}], "first.json")
    corrections = _corrections_file(tmp_path, [
        {"lesion": 9, "scan": 2, "point": list(_centre(truth[2], 2)), "new": True},
        {"lesion": 1, "scan": "demo_t2", "mask": edited.name}])
    scans = ["-bl", str(DEMO / "demo_t0.nii.gz"), "-fu", str(DEMO / "demo_t1.nii.gz"), str(DEMO / "demo_t2.nii.gz")]
    earlier, out = tmp_path / "earlier", tmp_path / "out"
    assert cli.main(["track", *scans, "-p", str(baseline), "-t", "prev_mask", "-o", str(earlier),
                     "--corrections", str(first), "--disable_progress_bar", "--device", "cpu"]) == 0
    assert (earlier / "tracking" / "state.json").is_file()
    assert sorted(p.name for p in (earlier / "tracking").glob("registration_t*.h5")) == [
        "registration_t1.h5", "registration_t2.h5"]
    # the second set of corrections on the earlier run: no registration, no tracking of the others
    calls = []
    monkeypatch.setattr(register_module, "register", lambda *a, **k: calls.append(a))
    assert cli.main(["track", *scans, "-o", str(out), "--resume-from", str(earlier), "--corrections",
                     str(corrections), "--disable_progress_bar", "--device", "cpu"]) == 0
    assert calls == []
    capsys.readouterr()
    lesion_1_t1 = "demo_t1_lesion_1.nii.gz"
    assert _same(read_image(out / lesion_1_t1).array, read_image(earlier / lesion_1_t1).array)
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


# ------------------------------------------------------------------------------ saved runs (--resume-from)
def test_a_saved_run_loads_back_and_corrects_exactly_like_the_original(study, tmp_path, no_registration):
    first, images = study["first"], study["images"]
    names = ["t0", "t1", "t2", "t3"]
    folder = save_track_state(tmp_path / "tracking", first, images, names, "simpleitk")
    loaded, state = load_track_state(folder, images)
    assert state["names"] == names and loaded.status == first.status
    for t in range(4):
        assert sorted(loaded.masks[t]) == sorted(first.masks[t])
        for pid, mask in first.masks[t].items():
            assert _same(loaded.masks[t][pid], mask), (t, pid)
    points = np.array([images[1].index_to_world(np.asarray(images[1].shape) * f) for f in (0.3, 0.5, 0.7)])
    for a, b in zip(first.transforms, loaded.transforms):
        assert np.abs(a.fixed_to_moving(points) - b.fixed_to_moving(points)).max() < 1e-6
        assert b.info == {k: v if isinstance(v, str) else float(v) for k, v in a.info.items()}
    click = Correction(2, 1, Point(2, _centre(study["truth"][1], 2)))
    want, got = _retrack(study, first, [click]), _retrack(study, loaded, [click])
    for t in range(4):
        for pid in want.masks[t]:
            assert _same(got.masks[t][pid], want.masks[t][pid]), (t, pid)
    assert got.status == want.status and no_registration == []


def test_a_saved_run_is_refused_for_other_scans_or_when_incomplete(study, tmp_path):
    images = study["images"]
    folder = save_track_state(tmp_path / "tracking", study["first"], images, ["t0", "t1", "t2", "t3"], "simpleitk")
    changed = list(images)
    changed[2] = images[2].with_array(images[2].array + 1)
    with pytest.raises(TrackStateError, match="scan 2 is not the scan 't2' the saved run tracked"):
        load_track_state(folder, changed)
    with pytest.raises(TrackStateError, match="the saved run tracked 4 scans"):
        load_track_state(folder, images[:3])
    (folder / "state.json").unlink()
    with pytest.raises(TrackStateError, match="no saved tracking run here"):
        load_track_state(folder, images)


@pytest.mark.parametrize("which", ["swapped", "other voxels", "no state"])
def test_cli_resume_from_other_scans_is_refused_before_any_work(study, tmp_path, capsys, which):
    earlier = tmp_path / "earlier"
    if which == "no state":
        earlier.mkdir()
    else:
        save_track_state(earlier / "tracking", TrackResult([{}] * 3, [], {}, study["first"].transforms[:2]),
                         study["images"][:3], ["demo_t0", "demo_t1", "demo_t2"], "simpleitk")
    follow_ups = [DEMO / "demo_t1.nii.gz", DEMO / "demo_t2.nii.gz"]
    message = {"swapped": "that run tracked demo_t0, demo_t1, demo_t2; these scans are demo_t0, demo_t2, demo_t1",
               "other voxels": "scan 1 is not the scan 'demo_t1' the saved run tracked",
               "no state": "no saved tracking run here"}[which]
    if which == "swapped":
        follow_ups.reverse()
    if which == "other voxels":
        moved = tmp_path / "moved"
        moved.mkdir()
        write_image(_moved(study["images"][1]), moved / "demo_t1.nii.gz")
        follow_ups[0] = moved / "demo_t1.nii.gz"
    out = tmp_path / "out"
    code = cli.main(["track", "-bl", str(DEMO / "demo_t0.nii.gz"), "-fu", *map(str, follow_ups), "-o", str(out),
                     "--resume-from", str(earlier), "--disable_progress_bar", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err
    assert not out.exists()


def test_runners_correct_a_tracked_study_without_registering(study, tmp_path):
    """The front ends' path: a TrackResponse's ``tracked`` given back as ``previous`` with a
    correction. In this process and in the worker process alike: the same masks, statuses and
    rows, no registration time, the earlier response unchanged."""
    images, truth = study["images"][:3], study["truth"]
    spec = ModelSpec(str(demo_model_dir()), device="cpu")
    baseline = {pid: truth[0].array == pid for pid in (1, 2, 3)}
    click = Correction(2, 1, Point(2, _centre(truth[1], 2)))
    local = InProcessRunner()
    first = local.track(TrackRequest(images, baseline, spec, "simpleitk"))
    before = [{pid: m.copy() for pid, m in masks.items()} for masks in first.masks]
    fixed = local.track(TrackRequest(images, {}, spec, corrections=[click], previous=first.tracked))
    assert fixed.timings["registration"] == 0.0 and fixed.tracked.transforms == first.tracked.transforms
    assert _same(fixed.masks[1][2], segment(images[1], [click.prompt], local.model(spec, "point")).masks[2])
    assert all(_same(before[t][pid], first.masks[t][pid]) for t in range(3) for pid in before[t])
    worker = WorkerProcessRunner()
    try:
        remote_fixed = worker.track(TrackRequest(images, {}, spec, corrections=[click], previous=first.tracked))
    finally:
        worker.close()
    assert remote_fixed.timings["registration"] == 0.0 and remote_fixed.status == fixed.status
    assert remote_fixed.rows == fixed.rows
    for t in range(3):
        for pid in fixed.masks[t]:
            assert _same(remote_fixed.masks[t][pid], fixed.masks[t][pid]), (t, pid)


# ------------------------------------------------------------------------------ verified tracking
def test_verified_tracking_that_accepts_every_proposal_is_automatic_tracking(study):
    images, truth, m = study["images"], study["truth"], study["models"]
    asked = []

    def accept(t, proposals):
        asked.append((t, sorted(proposals)))
        return {}

    auto = track(images, truth[0], m["prev_mask"], registration="none")
    verified = track(images, truth[0], m["prev_mask"], registration="none", confirm=accept)
    assert asked == [(t, sorted(study["first"].status)) for t in (1, 2, 3)]
    for t in range(4):
        for pid in auto.masks[t]:
            assert _same(verified.masks[t][pid], auto.masks[t][pid]), (t, pid)
    warped, _ = warp_lesion(auto.masks[0][2], images[0], images[1], auto.transforms[0])
    centre = images[1].index_to_world(np.argwhere(warped).mean(axis=0))
    assert np.allclose(verified.points[(1, 2)]["proposed"], centre, atol=1e-6)
    assert verified.points[(1, 2)]["confirmed"] == verified.points[(1, 2)]["proposed"]


def test_a_moved_point_moves_the_warped_mask_onto_it(study):
    """The combination of the two prompts: the warped previous mask translated (whole voxels) so
    that its centre lands on the confirmed point, then the tracking model."""
    images, truth, m = study["images"], study["truth"], study["models"]
    offset = np.array([0, 3, -2])  # voxels (z, y, x)

    def move(t, proposals):
        if t != 1:
            return {}
        index = images[1].world_to_index(proposals[2].xyz) + offset
        return {2: Point(2, tuple(images[1].index_to_world(index)))}

    verified = track(images[:2], truth[0], m["prev_mask"], registration="none", confirm=move)
    warped, _ = warp_lesion(truth[0].array == 2, images[0], images[1], verified.transforms[0])
    moved = shift_mask(warped, offset)
    assert moved.sum() == warped.sum() and np.allclose(np.argwhere(moved).mean(0) - np.argwhere(warped).mean(0),
                                                        offset)
    want = segment(images[1], [MaskPrompt(2, images[1].with_array(moved))], m["prev_mask"]).masks[2]
    assert _same(verified.masks[1][2], want)
    outside = lambda t, proposals: {1: Point(1, tuple(images[t].index_to_world([-5, 0, 0])))}  # noqa: E731
    with pytest.raises(PromptError, match="lesion 1 at scan 1: the confirmed point .* is outside that scan"):
        track(images[:2], truth[0], m["prev_mask"], registration="none", confirm=outside)


def test_cli_confirmed_points_are_used_and_written_back(study, tmp_path, capsys):
    target = _centre(study["truth"][1], 1)
    points = tmp_path / "points.json"
    points.write_text(json.dumps({"format": "lesionlocator-confirmed-points/1", "points": [
        {"lesion": 1, "scan": "demo_t1", "point": list(target)}]}))
    out = tmp_path / "out"
    assert cli.main(["track", "-bl", str(DEMO / "demo_t0.nii.gz"), "-fu", str(DEMO / "demo_t1.nii.gz"),
                     str(DEMO / "demo_t2.nii.gz"), "-p", str(DEMO / "demo_t0_label.nii.gz"), "-o", str(out),
                     "--registration", "none", "--confirmed-points", str(points), "--disable_progress_bar",
                     "--device", "cpu"]) == 0
    capsys.readouterr()
    used = json.loads((out / "tracking" / "points.json").read_text())
    assert used["format"] == "lesionlocator-confirmed-points/1"
    entries = {(e["lesion"], e["scan"]): e for e in used["points"]}
    assert sorted(entries) == sorted((pid, s) for pid in study["first"].status for s in ("demo_t1", "demo_t2"))
    assert np.allclose(entries[1, "demo_t1"]["point"], target)
    assert all(e["point"] == e["proposed"] for k, e in entries.items() if k != (1, "demo_t1"))
    assert read_confirmed_points(out / "tracking" / "points.json")[("demo_t1", 1)] == pytest.approx(target)


def test_a_moved_point_correction_is_verified_tracking_after_the_fact(study, tmp_path):
    """Correcting lesion 2 at scan 1 with a moved point gives, at every scan and for every
    lesion, what verified tracking gives when the user moves that proposal there."""
    images, truth, m = study["images"], study["truth"], study["models"]
    target = _centre(truth[1], 2)
    shifted = tuple(np.asarray(target) + np.array([4.0, -3.0, 2.0]))  # not where the automatic mask is
    auto = track(images, truth[0], m["prev_mask"], registration="none")
    moved = Correction(2, 1, Point(2, shifted), moved=True)
    got = _retrack(study, auto, [moved])
    want = track(images, truth[0], m["prev_mask"], registration="none",
                 confirm=lambda t, proposals: {2: Point(2, shifted)} if t == 1 else {})
    for t in range(4):
        for pid in want.masks[t]:
            assert _same(got.masks[t][pid], want.masks[t][pid]), (t, pid)
    assert not _same(got.masks[1][2], auto.masks[1][2])
    assert got.status == want.status
    # through the corrections file (what the worker and --corrections read)
    path = write_corrections(tmp_path / "c.json", [moved])
    entry = json.loads(path.read_text())["corrections"][0]
    assert entry == {"lesion": 2, "scan": 1, "moved_point": list(shifted)}
    assert resolve_corrections(read_corrections(path), ["t0", "t1", "t2", "t3"], images) == [moved]
    with pytest.raises(PromptError, match="a new lesion needs a point, box or mask at its first scan, not 'moved'"):
        _retrack(study, auto, [Correction(9, 1, Point(9, shifted), new=True, moved=True)])
