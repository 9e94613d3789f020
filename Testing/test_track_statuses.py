"""Tracking statuses at the edge of and beyond a follow-up's field of view, and each lesion's own
change class apart from the overall (RECIST) response (issue 23, items 6 and 7).

The field-of-view rule (LesionLocatorLib.track): a lesion is segmented at scan t only if at least
MIN_INSIDE_FRACTION (0.5) of its warped previous mask's volume lies inside scan t's voxel grid;
with less it is 'outside'. Scans whose fields of view do not intersect after registration: a
warning, and every followed lesion 'outside'.
"""
import warnings

import numpy as np
import pytest

import LesionLocatorLib.track as track_module
from LesionLocatorLib import measure as Ms
from LesionLocatorLib.image import Image
from LesionLocatorLib.model import load_model
from LesionLocatorLib.register import register
from LesionLocatorLib.study import track_study
from LesionLocatorLib.track import MIN_INSIDE_FRACTION, fields_of_view_overlap, inside_fraction, track, warp_lesion
from test_track import _series

NO_OVERLAP = "registration found no overlap between scan 1 and scan 0 (backend 'none')"


@pytest.fixture(scope="module")
def track_model(tiny_model_root):
    return load_model(tiny_model_root, "prev_mask", device="cpu")


def _crop_y(image: Image, rows: int) -> Image:
    """The scan's first ``rows`` rows (y < rows): same origin, so registration 'none' aligns it."""
    return Image(image.array[:, :rows].copy(), image.spacing, image.origin, image.direction)


def _shifted(image: Image, offset_mm) -> Image:
    return Image(image.array, image.spacing, tuple(np.add(image.origin, offset_mm)), image.direction)


def _track(images, labels, model, registration="none"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = track(images, labels, model, registration=registration)
    return result, [str(w.message) for w in caught]


def _cuboid_label(image: Image, y_rows=(20, 30)) -> Image:
    """Lesion 1: a 10-row cuboid (y 20..29) at the phantom's lesion 1 (z 13..17, x 22..28)."""
    label = np.zeros(image.shape, np.uint8)
    label[13:18, y_rows[0]:y_rows[1], 22:29] = 1
    return image.with_array(label)


# ------------------------------------------------------------------ centre outside / clipped
def test_lesion_whose_centre_lies_outside_a_cropped_follow_up_is_outside_with_no_volume(track_model):
    images, labels = _series(n_followups=1)
    # lesion 2 (radius 5 mm) is centred on row y = 55 of the baseline; the follow-up keeps y < 55:
    # its centre is outside and 39 % of its warped volume is inside (the audit's "tracked, 0.01 ml, PR")
    cropped = _crop_y(images[1], 55)
    result, messages = _track([images[0], cropped], labels[0], track_model)
    assert result.status[2] == ["tracked", "outside"]
    assert result.status[1] == ["tracked", "tracked"] and result.status[3] == ["tracked", "tracked"]
    assert result.inside_fraction[2][0] == 1.0
    assert result.inside_fraction[2][1] == pytest.approx(35 / 89)   # voxels of the warped sphere inside
    assert not result.masks[1][2].any() and not (result.labels[1].array == 2).any()
    assert result.masks[1][2].shape == cropped.shape
    assert not any("registration found no overlap" in m for m in messages)
    rows = {(r["lesion_id"], r["index"]): r for r in Ms.lesion_measurements([images[0], cropped], result.masks,
                                                                             result.status)}
    row = rows[(2, 1)]
    assert (row["status"], row["volume_ml"], row["long_axis_mm"]) == ("outside", 0.0, 0.0)
    assert row["volume_change_vs_baseline_pct"] is None and row["long_axis_change_vs_baseline_pct"] is None
    assert row["lesion_change_category"] == "n/a"
    # never PR/CR because a lesion left the scan: NE, or PD when the measured lesions alone progress
    measured = [rows[(pid, t)]["long_axis_mm"] for pid in (1, 3) for t in (0, 1)]
    baseline_sum = measured[0] + measured[2] + rows[(2, 0)]["long_axis_mm"]
    progressed = measured[1] + measured[3] >= 1.2 * baseline_sum and measured[1] + measured[3] - baseline_sum >= 5
    assert row["recist_information_only"] == ("PD" if progressed else "NE")
    assert rows[(2, 0)]["lesion_change_category"] == "baseline"


def test_lesion_clipped_by_the_edge_but_mostly_inside_is_tracked_with_a_warning(track_model):
    images, labels = _series(n_followups=1)
    cropped = _crop_y(images[1], 56)   # rows up to 55, the centre: 61 % of lesion 2 inside
    result, messages = _track([images[0], cropped], labels[0], track_model)
    assert result.status[2] == ["tracked", "tracked"]
    assert result.inside_fraction[2][1] == pytest.approx(54 / 89)
    assert result.masks[1][2].any()
    assert "lesion 2: 39 % of its mask warped from scan 0 lies outside the field of view of scan 1; " \
           "only the part inside is segmented and measured" in messages
    assert not any(m.startswith(("lesion 1:", "lesion 3:")) for m in messages)   # well inside: no warning
    assert result.inside_fraction[1] == [1.0, 1.0] and result.inside_fraction[3] == [1.0, 1.0]


# ------------------------------------------------------------------------- the threshold
@pytest.mark.parametrize("rows, fraction, status", [(24, 0.4, "outside"), (25, 0.5, "tracked"),
                                                    (26, 0.6, "tracked"), (30, 1.0, "tracked"),
                                                    (20, 0.0, "outside")])
def test_threshold_boundary_on_a_cuboid_lesion(track_model, rows, fraction, status):
    """A 10-row cuboid cut after ``rows`` rows: exactly 0.5 inside is still tracked, 0.4 is outside."""
    assert MIN_INSIDE_FRACTION == 0.5
    images, _ = _series(n_followups=1)
    label = _cuboid_label(images[0])
    cropped = _crop_y(images[1], rows)
    transform = register(cropped, images[0], "none")
    assert inside_fraction(label.array == 1, images[0], cropped, transform) == pytest.approx(fraction, abs=1e-12)
    prompt, got = warp_lesion(label.array == 1, images[0], cropped, transform)
    assert got == pytest.approx(fraction, abs=1e-12)
    if status == "outside":
        assert prompt is None
    else:
        assert prompt.sum() == 5 * 7 * (rows - 20)      # the clipped cuboid itself
    result, messages = _track([images[0], cropped], label, track_model)
    assert result.status[1] == ["tracked", status]
    if status == "outside":
        assert not result.masks[1][1].any()
    clipped = [m for m in messages if m.startswith("lesion 1:")]
    if 0.5 <= fraction < 1.0:
        assert clipped == [f"lesion 1: {100 - 100 * fraction:.0f} % of its mask warped from scan 0 lies outside "
                           f"the field of view of scan 1; only the part inside is segmented and measured"]
    else:
        assert clipped == []


def test_inside_fraction_counts_world_volume_on_another_grid_and_when_coarsened(monkeypatch):
    """Follow-up of another voxel size, oblique cut through the middle of a lesion; the same fraction
    when the uncut grid must be coarsened (pathological transforms)."""
    images, labels = _series(n_followups=1)
    moving, mask = images[0], labels[0].array == 1          # sphere r = 6 mm centred at y = 30 (1.5 mm rows)
    centre_y = moving.origin[1] + 30 * 1.5
    # a follow-up of 1 mm voxels whose last row centre is 0.5 mm before the lesion's centre plane
    n_rows = int(round(centre_y - moving.origin[1]))
    fixed = Image(np.zeros((75, n_rows, 105), np.int16), (1.0, 1.0, 1.0), moving.origin)
    transform = register(fixed, moving, "none")
    exact = inside_fraction(mask, moving, fixed, transform)
    assert 0.4 < exact < 0.6
    monkeypatch.setattr(track_module, "_MAX_EXTENDED_VOXELS", 20_000)
    coarse = inside_fraction(mask, moving, fixed, transform)
    assert coarse == pytest.approx(exact, abs=0.15) and coarse != exact
    assert inside_fraction(np.zeros_like(mask), moving, fixed, transform) is None


@pytest.mark.parametrize("rows, fraction, prompted", [(20, 1.0, True), (9, None, True), (7, None, False)])
def test_lesion_thinned_to_less_than_a_voxel_uses_its_warped_centre(rows, fraction, prompted):
    """One voxel warped onto 4x larger voxels leaves nothing to count: then the lesion is outside
    exactly when its warped centre of mass is (row 7.5 of the coarse grid here)."""
    images, _ = _series(n_followups=1)
    one = np.zeros(images[0].shape, bool)
    one[15, 30, 25] = True
    coarse = Image(np.zeros((10, rows, 20), np.int16), (6.0, 6.0, 7.5), images[0].origin)
    transform = register(coarse, images[0], "none")
    assert not transform.warp_mask(images[0].with_array(one.astype(np.uint8)), coarse).array.any()
    assert inside_fraction(one, images[0], coarse, transform) == fraction   # 1.0: far from the edges
    prompt, got = warp_lesion(one, images[0], coarse, transform)
    assert got == fraction
    assert (prompt is not None and bool(prompt.any())) is prompted    # a ball of the lesion's volume


# ---------------------------------------------------------------------------- no overlap
def test_follow_up_shifted_5_m_warns_and_reports_every_lesion_outside(track_model):
    images, labels = _series(n_followups=2)
    far = _shifted(images[1], (0.0, 5000.0, 0.0))
    with pytest.warns(UserWarning, match="registration found no overlap") as record:
        result = track([images[0], far, images[2]], labels[0], track_model, registration="none")
    messages = [str(w.message) for w in record]
    assert messages.count(NO_OVERLAP + ": their fields of view do not intersect after registration, so the 3 "
                          "lesion(s) followed from scan 0 are reported 'outside' at scan 1; check the scans' "
                          "positions (origin) or the registration") == 1
    assert result.status == {1: ["tracked", "outside", "outside"], 2: ["tracked", "outside", "outside"],
                             3: ["tracked", "outside", "outside"]}   # 'outside' is final: not followed further
    assert all(result.inside_fraction[pid] == [1.0, 0.0, None] for pid in (1, 2, 3))
    for t in (1, 2):
        assert all(not m.any() for m in result.masks[t].values()) and not result.labels[t].array.any()
    assert not any("scan 2 and scan 1" in m for m in messages)   # nothing left to follow: no second warning


def test_no_overlap_reaches_the_study_warnings_and_rows(track_model):
    images, labels = _series(n_followups=1)
    far = _shifted(images[1], (5000.0, 0.0, 0.0))
    study = track_study([images[0], far], labels[0], model=None, names=["base", "far"], registration="none",
                        load=lambda spec, kind: track_model)
    assert any(m.startswith(NO_OVERLAP) for m in study.warnings)
    assert study.status == {1: ["tracked", "outside"], 2: ["tracked", "outside"], 3: ["tracked", "outside"]}
    follow_up = [r for r in study.rows if r["index"] == 1]
    assert [r["lesion_change_category"] for r in follow_up] == ["n/a"] * 3
    assert [r["recist_information_only"] for r in follow_up] == ["NE"] * 3
    assert all(r["volume_change_vs_baseline_pct"] is None for r in follow_up)


def test_fields_of_view_overlap_at_touching_and_overlapping_edges():
    images, _ = _series(n_followups=0)
    base = images[0]                                       # 70 x 1.5 mm columns in x
    touching = _shifted(base, (70 * 1.5, 0.0, 0.0))        # starts where the baseline ends
    one_column = _shifted(base, (69 * 1.5, 0.0, 0.0))      # shares one column of voxels
    assert fields_of_view_overlap(touching, base, register(touching, base, "none")) is False
    assert fields_of_view_overlap(one_column, base, register(one_column, base, "none")) is True
    assert fields_of_view_overlap(base, base, register(base, base, "none")) is True


# ------------------------------------------------------------------ real registration (simpleitk)
@pytest.mark.parametrize("rows, status", [(54, "outside"), (58, "tracked")])
def test_cropped_follow_up_with_simpleitk_registration(track_model, rows, status):
    images, labels = _series(n_followups=1)
    cropped = _crop_y(images[1], rows)   # lesion 2: ~20 % inside (centre out) / ~96 % inside (clipped)
    result, messages = _track([images[0], cropped], labels[0], track_model, registration="simpleitk")
    assert result.status[2] == ["tracked", status]
    fraction = result.inside_fraction[2][1]
    assert (fraction < 0.5) if status == "outside" else (0.5 <= fraction <= 1.0)
    assert bool(result.masks[1][2].any()) is (status == "tracked")
    assert not any("registration found no overlap" in m for m in messages)


def test_simpleitk_recovers_a_5_m_shift_so_the_scans_overlap(track_model):
    """The check is on the registered scans: simpleitk's moments initialisation finds the shift."""
    images, labels = _series(n_followups=1)
    far = _shifted(images[1], (0.0, 5000.0, 0.0))
    result, messages = _track([images[0], far], labels[0], track_model, registration="simpleitk")
    assert fields_of_view_overlap(far, images[0], result.transforms[0]) is True
    assert not any("registration found no overlap" in m for m in messages)
    assert all(result.status[pid] == ["tracked", "tracked"] for pid in (1, 2, 3))


# ------------------------------------------------------------------ per-lesion change column
def _streak(image: Image, z: int, y: int, x0: int, length_mm: int) -> np.ndarray:
    """A one-voxel-wide streak along x on a 1 mm grid: long axis ``length_mm`` (voxel centres)."""
    mask = np.zeros(image.shape, bool)
    mask[z, y, x0:x0 + length_mm + 1] = True
    return mask


def test_lesion_that_grew_63_percent_is_increase_while_the_overall_response_is_sd():
    image = Image(np.zeros((5, 40, 80), np.int16), (1.0, 1.0, 1.0))
    masks = [{1: _streak(image, 2, 5, 2, 50), 4: _streak(image, 2, 30, 2, 16)},    # sum 66 mm
             {1: _streak(image, 2, 5, 2, 44), 4: _streak(image, 2, 30, 2, 26)}]    # sum 70 mm (+6 %)
    rows = {(r["lesion_id"], r["index"]): r for r in Ms.lesion_measurements([image, image], masks)}
    four, one = rows[(4, 1)], rows[(1, 1)]
    assert four["long_axis_change_vs_baseline_pct"] == pytest.approx(62.5)
    assert (four["recist_information_only"], four["lesion_change_category"]) == ("SD", "increase")
    assert (one["recist_information_only"], one["lesion_change_category"]) == ("SD", "stable")
    assert four["sum_long_axes_mm"] == pytest.approx(70.0)
    assert rows[(4, 0)]["lesion_change_category"] == "baseline" and rows[(4, 0)]["recist_information_only"] is None
    # existing columns keep their names and order; the new one comes last
    assert list(four) == ["lesion_id", "timepoint", "index", "status", "volume_ml", "long_axis_mm",
                          "short_axis_mm", "volume_change_vs_baseline_pct", "volume_change_vs_nadir_pct",
                          "long_axis_change_vs_baseline_pct", "long_axis_change_vs_nadir_pct", "sum_long_axes_mm",
                          "recist_information_only", "lesion_change_category"]


def test_outside_lesion_makes_the_overall_response_not_evaluable():
    image = Image(np.zeros((5, 40, 80), np.int16), (1.0, 1.0, 1.0))
    empty = np.zeros(image.shape, bool)
    masks = [{1: _streak(image, 2, 5, 2, 50), 2: _streak(image, 2, 30, 2, 30)},   # sum 80
             {1: _streak(image, 2, 5, 2, 50), 2: empty},                           # 2 outside: 50 measured
             {1: _streak(image, 2, 5, 2, 70), 2: empty}]                           # 70 >= 1.2 x 50 + 5: PD
    status = {1: ["tracked"] * 3, 2: ["tracked", "outside", "outside"]}
    rows = {(r["lesion_id"], r["index"]): r for r in Ms.lesion_measurements([image] * 3, masks, status)}
    assert [rows[(1, t)]["recist_information_only"] for t in range(3)] == [None, "NE", "NE"]
    assert [rows[(2, t)]["lesion_change_category"] for t in range(3)] == ["baseline", "n/a", "n/a"]
    assert rows[(2, 1)]["volume_ml"] == 0.0 and rows[(2, 1)]["long_axis_change_vs_nadir_pct"] is None
    assert [rows[(1, t)]["lesion_change_category"] for t in range(3)] == ["baseline", "stable", "increase"]
    # the same masks with lesion 2 'vanished' (measured as gone): the sum falls by 37.5 %, PR
    vanished = {1: ["tracked"] * 3, 2: ["tracked", "vanished", "vanished"]}
    rows = {(r["lesion_id"], r["index"]): r for r in Ms.lesion_measurements([image] * 3, masks, vanished)}
    assert [rows[(1, t)]["recist_information_only"] for t in range(3)] == [None, "PR", "PD"]
    assert [rows[(2, t)]["lesion_change_category"] for t in range(3)] == ["baseline", "disappeared", "disappeared"]
    # while a lesion is outside, the measured lesions alone can still show progression: PD, not NE
    base = {1: _streak(image, 2, 5, 2, 50), 2: _streak(image, 2, 30, 2, 10)}          # nadir 60 mm
    for long_mm, expected in ((71, "NE"), (72, "PD")):                                 # PD: >= 1.2 x 60 and +5 mm
        follow_up = {1: _streak(image, 2, 5, 2, long_mm), 2: empty}
        rows = Ms.lesion_measurements([image] * 2, [base, follow_up], {1: ["tracked"] * 2, 2: ["tracked", "outside"]})
        assert [r["recist_information_only"] for r in rows if r["index"] == 1] == [expected] * 2


@pytest.mark.parametrize("series, expected", [
    ([20.0, 14.0], "decrease"),          # exactly -30 %
    ([20.0, 14.1], "stable"),            # -29.5 %
    ([25.0, 30.0], "increase"),          # exactly +20 % and +5 mm vs nadir 25
    ([20.0, 24.0], "stable"),            # +20 % but only +4 mm
    ([40.0, 20.0, 26.0], "increase"),    # +30 % and +6 mm vs nadir 20 though -35 % vs baseline
    ([40.0, 20.0, 24.0], "decrease"),    # +20 % but +4 mm vs nadir; -40 % vs baseline
    ([20.0, 0.0], "disappeared"),
    ([20.0, 0.0, 3.0], "reappeared"),
    ([20.0, None], "n/a"),               # not measured (outside)
    ([0.0, 12.0], "n/a"),                # nothing to measure at baseline
    ([20.0, None, 25.0], "increase"),    # the unmeasured timepoint is not the nadir: +25 % and +5 mm vs 20
])
def test_lesion_change_category_thresholds(series, expected):
    out = Ms.lesion_change_category(series)
    assert out[0] == "baseline" and out[-1] == expected
    assert set(out) <= set(Ms.LESION_CHANGE_CATEGORIES)
    names = [f"FU{t}" for t in range(len(series))]
    assert Ms.lesion_change_category(dict(zip(names, series))) == dict(zip(names, out))
    with pytest.raises(ValueError, match="long axes must be numbers >= 0 mm"):
        Ms.lesion_change_category([10.0, -1.0])
