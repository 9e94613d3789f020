"""Tests of LesionLocatorLib.metrics against analytic values.

Shapes are built in WORLD coordinates (LPS mm) on anisotropic, oblique grids, so a
metric that ignores spacing or direction gives a wrong number and fails.
"""
import csv
import json
import math

import numpy as np
import pytest

from LesionLocatorLib import evaluate as E
from LesionLocatorLib import measure as Ms
from LesionLocatorLib import report as R
from LesionLocatorLib.image import Image, write_image
from phantoms import oblique_direction


# ----------------------------------------------------------------------------- helpers
def blank(shape_zyx, spacing_xyz, direction=None, origin=(12.0, -30.0, 7.5)):
    return Image(np.zeros(shape_zyx, np.uint8), spacing_xyz, origin,
                 np.eye(3) if direction is None else direction)


def ellipsoid(img, centre_world, axes_world, semi_axes_mm):
    """Boolean (z, y, x) mask of the voxels whose centres lie in a world ellipsoid.

    ``axes_world`` holds the ellipsoid's unit axes as columns (LPS), semi-axes in mm.
    """
    idx = np.indices(img.shape).reshape(3, -1).T.astype(float)
    local = (img.index_to_world(idx) - np.asarray(centre_world)) @ np.asarray(axes_world)
    return (((local / np.asarray(semi_axes_mm, float)) ** 2).sum(axis=1) <= 1.0).reshape(img.shape)


def sphere(img, centre_world, radius_mm):
    return ellipsoid(img, centre_world, np.eye(3), (radius_mm,) * 3)


def cube_shift_nsd(side, fails_extra=0):
    """Analytic NSD for a side^3 voxel cube shifted by 3 mm along one axis (tolerance 2 mm).

    Surface voxels of A that fail: the whole trailing face (3 mm from B's face) and,
    on the leading face, the interior voxels more than 2 voxels (mm) from its edges.
    By symmetry B fails the same number.
    """
    surface = side ** 3 - (side - 2) ** 3
    fails = side ** 2 + (side - 6) ** 2
    return 1.0 - fails / surface


# ------------------------------------------------------------------------------- dice
def test_dice_of_offset_spheres_matches_lens_volume():
    d = oblique_direction(20.0)
    img = blank((30, 60, 60), (0.8, 0.8, 1.5), d)
    r, dist = 12.0, 8.0
    c = img.index_to_world(np.array([15.0, 30.0, 30.0])) + np.array([0.1, 0.2, 0.3])
    u = np.array([1.0, 2.0, 2.0]) / 3.0          # oblique in the world and in the grid
    a = sphere(img, c - u * dist / 2, r)
    b = sphere(img, c + u * dist / 2, r)
    lens = math.pi * (4 * r + dist) * (2 * r - dist) ** 2 / 12.0
    expected = lens / (4.0 / 3.0 * math.pi * r ** 3)   # 2|A∩B| / (|A|+|B|) with |A| = |B|
    assert expected == pytest.approx(0.5185, abs=1e-4)
    assert E.dice(a, b) == pytest.approx(expected, rel=0.02)
    assert E.dice(b, a) == E.dice(a, b)


def test_dice_conventions_and_shape_check():
    z = np.zeros((4, 5, 6), bool)
    one = z.copy()
    one[1, 2, 3] = True
    assert E.dice(z, z) == 1.0
    assert E.dice(one, z) == 0.0 and E.dice(z, one) == 0.0
    assert E.dice(one, one.astype(np.uint8) * 7) == 1.0
    half = one.copy()
    half[1, 2, 4] = True
    assert E.dice(one, half) == pytest.approx(2 * 1 / 3)
    with pytest.raises(ValueError, match=r"different shapes: \(4, 5, 6\) vs \(4, 5, 5\)"):
        E.dice(z, z[:, :, :5])


# -------------------------------------------------------------------------------- NSD
def test_nsd_identical_masks_is_one():
    img = blank((24, 40, 40), (0.7, 0.9, 2.5), oblique_direction())
    s = sphere(img, img.index_to_world(np.array([12.0, 20.0, 20.0])), 9.0)
    assert E.normalized_surface_dice(s, s.copy(), img.spacing_zyx) == 1.0


def test_nsd_of_cube_shifted_3mm_at_2mm_tolerance():
    side = 20
    a = np.zeros((30, 30, 34), bool)
    a[5:25, 5:25, 5:25] = True
    b = np.roll(a, 3, axis=2)                     # 3 voxels = 3 mm along x
    expected = cube_shift_nsd(side)
    assert expected == pytest.approx(0.72509, abs=1e-5)
    assert E.normalized_surface_dice(b, a, (1.0, 1.0, 1.0), 2.0) == pytest.approx(expected, abs=1e-12)
    # Larger tolerance: every surface voxel is within 3 mm of the other surface.
    assert E.normalized_surface_dice(b, a, (1.0, 1.0, 1.0), 3.0) == 1.0


def test_nsd_uses_anisotropic_spacing():
    """A one-slice shift is 2.5 mm (same analytic value as 3 mm) at 2.5 mm slices, 1.5 mm at 1.5 mm."""
    a = np.zeros((30, 30, 30), bool)
    a[5:25, 5:25, 5:25] = True
    b = np.roll(a, 1, axis=0)                     # one voxel along z
    # With 2.5 mm along z: trailing z face fails entirely, leading face interior beyond 2 mm fails.
    assert E.normalized_surface_dice(b, a, (2.5, 1.0, 1.0), 2.0) == pytest.approx(cube_shift_nsd(20), abs=1e-12)
    assert E.normalized_surface_dice(b, a, (1.5, 1.0, 1.0), 2.0) == 1.0


def test_nsd_empty_conventions_and_lesion_on_image_border():
    z = np.zeros((6, 6, 6), bool)
    a = z.copy()
    a[:3] = True                                   # touches the image border
    assert E.normalized_surface_dice(z, z, (1, 1, 1)) == 1.0
    assert E.normalized_surface_dice(a, z, (1, 1, 1)) == 0.0
    assert E.normalized_surface_dice(a, a, (1, 1, 1)) == 1.0
    with pytest.raises(ValueError, match="spacing_zyx"):
        E.normalized_surface_dice(a, a, (1, 1))


# ----------------------------------------------------------------------------- volume
@pytest.mark.parametrize("spacing_xyz", [(0.7, 0.9, 2.5), (0.8, 0.8, 3.0), (1.0, 1.0, 1.0)])
def test_sphere_volume_in_ml(spacing_xyz):
    img = blank((24, 64, 64), spacing_xyz, oblique_direction())
    c = img.index_to_world(np.array([12.3, 32.4, 32.1]))
    s = sphere(img, c, 10.0)
    expected_ml = 4.0 / 3.0 * math.pi * 10.0 ** 3 / 1000.0    # 4.18879 ml
    assert Ms.lesion_volume_ml(s, img.spacing_zyx) == pytest.approx(expected_ml, rel=0.03)
    assert Ms.lesion_volume_ml(s.astype(np.uint8), img.spacing_zyx) == Ms.lesion_volume_ml(s, img.spacing_zyx)


# -------------------------------------------------------------------------- diameters
@pytest.mark.parametrize("angle_deg", [0.0, 20.0, 60.0])
def test_axial_diameters_of_ellipsoid_on_anisotropic_oblique_image(angle_deg):
    """A 30 x 16 mm (in-plane) x 12 mm ellipsoid, rotated 60 degrees inside the k-slices.

    At 60 degrees the k-slices are tilted 30 degrees out of the world axial plane, so
    measuring in world x-y instead of in the slice plane shortens the axes by ~10 %.
    """
    d = oblique_direction(angle_deg)
    img = blank((24, 64, 64), (0.7, 0.9, 2.5), d)
    centre_idx = np.array([12.0, 32.0, 32.0])
    t = np.deg2rad(60.0)
    e1 = np.cos(t) * d[:, 0] + np.sin(t) * d[:, 1]
    e2 = -np.sin(t) * d[:, 0] + np.cos(t) * d[:, 1]
    mask = ellipsoid(img, img.index_to_world(centre_idx), np.stack([e1, e2, d[:, 2]], axis=1), (15.0, 8.0, 6.0))
    long_mm, short_mm, k = Ms.axial_diameters(img.with_array(mask.astype(np.uint8)))
    voxel_diag = math.hypot(0.7, 0.9)
    assert k == 12
    assert abs(long_mm - 30.0) <= voxel_diag
    assert abs(short_mm - 16.0) <= voxel_diag
    assert long_mm <= 30.0 + 1e-9                    # voxel centres lie inside the ellipse


def test_short_axis_is_longest_perpendicular_chord_not_width():
    """Slanted parallelogram (0,0) (20,0) (30,4) (10,4) in voxel (x, y): its lattice hull is itself.

    Long axis: diagonal (0,0)-(30,4).  Short axis: the chord through (20,0) perpendicular
    to it, 4 / cos(atan(4/30)); the perpendicular *width* (5.29 mm) would be wrong.
    """
    img = blank((3, 8, 34), (1.0, 1.0, 3.0))
    m = np.zeros(img.shape, np.uint8)
    for y in range(5):
        x0 = math.ceil(2.5 * y)                        # left edge x = 2.5 y, right edge x = 20 + 2.5 y
        m[1, y, x0:int(20 + 2.5 * y) + 1] = 1
    long_mm, short_mm, k = Ms.axial_diameters(img.with_array(m))
    assert k == 1
    assert long_mm == pytest.approx(math.hypot(30.0, 4.0), abs=1e-9)
    assert short_mm == pytest.approx(4.0 * math.hypot(30.0, 4.0) / 30.0, abs=1e-9)


def test_axial_diameters_picks_slice_and_handles_small_and_empty():
    img = blank((5, 20, 20), (0.5, 2.0, 3.0))
    m = np.zeros(img.shape, np.uint8)
    m[1, 5, 2:9] = 1                                   # 6 steps of 0.5 mm = 3 mm, one voxel wide
    m[3, 2:8, 5] = 1                                   # 5 steps of 2 mm = 10 mm (longest)
    m[3, 4, 4:7] = 1                                   # 2 steps of 0.5 mm = 1 mm across
    long_mm, short_mm, k = Ms.axial_diameters(img.with_array(m))
    assert (long_mm, short_mm, k) == (pytest.approx(10.0), pytest.approx(1.0), 3)
    line = np.zeros(img.shape, np.uint8)
    line[1, 5, 2:9] = 1
    assert Ms.axial_diameters(img.with_array(line)) == (pytest.approx(3.0), 0.0, 1)
    dot = np.zeros(img.shape, np.uint8)
    dot[2, 3, 3] = 1
    assert Ms.axial_diameters(img.with_array(dot)) == (0.0, 0.0, 2)
    assert Ms.axial_diameters(img) == (0.0, 0.0, None)


# --------------------------------------------------------------------------------- MED
def test_centre_of_mass_and_distance_of_known_shift_on_oblique_grid():
    img = blank((30, 50, 50), (0.7, 0.9, 2.5), oblique_direction(25.0))
    centre_idx = np.array([15.0, 25.0, 25.0])
    c = img.index_to_world(centre_idx)
    gt = sphere(img, c, 7.013)                        # no voxel centre exactly on the surface
    shift_zyx = (1, 3, -2)
    pred = np.roll(gt, shift_zyx, axis=(0, 1, 2))
    expected = math.sqrt((1 * 2.5) ** 2 + (3 * 0.9) ** 2 + (-2 * 0.7) ** 2)   # sqrt(15.5) mm
    com = Ms.centre_of_mass_world(img.with_array(gt.astype(np.uint8)))
    np.testing.assert_allclose(com, c, atol=1e-9)      # symmetric about a voxel centre
    rows = E.evaluate_case(img.with_array(pred.astype(np.uint8)), img.with_array(gt.astype(np.uint8)))
    assert len(rows) == 1
    assert rows[0]["centre_distance_mm"] == pytest.approx(expected, abs=1e-9)
    assert rows[0]["cpm_hit"] is True
    assert Ms.centre_of_mass_world(img) is None


# -------------------------------------------------------------------------- longitudinal
def test_change_table_vs_baseline_and_nadir():
    rows = Ms.change_table({"BL": 10.0, "FU1": 8.0, "FU2": 12.0, "FU3": 6.0, "FU4": 9.0})
    assert [r["timepoint"] for r in rows] == ["BL", "FU1", "FU2", "FU3", "FU4"]
    assert [r["change_vs_baseline_pct"] for r in rows] == pytest.approx([0.0, -20.0, 20.0, -40.0, -10.0])
    assert [r["nadir"] for r in rows] == [None, 10.0, 8.0, 8.0, 6.0]
    assert rows[0]["change_vs_nadir_pct"] is None
    assert [r["change_vs_nadir_pct"] for r in rows[1:]] == pytest.approx([-20.0, 50.0, -25.0, 50.0])
    seq = Ms.change_table([0.0, 2.0])
    assert seq[1]["timepoint"] == 1 and seq[1]["change_vs_baseline_pct"] is None   # 0 baseline


def test_recist_categories_on_hand_made_series():
    sums = {"BL": 100.0, "FU1": 80.0, "FU2": 65.0, "FU3": 60.0, "FU4": 71.0, "FU5": 72.0, "FU6": 0.0}
    # FU1 -20 % vs BL: SD; FU2 -35 %: PR; FU3 -40 %: PR; FU4 -29 % vs BL, +18 % vs nadir 60: SD;
    # FU5 +20 % and +12 mm vs nadir 60: PD; FU6 all gone: CR.
    assert Ms.recist_category(sums) == {"BL": None, "FU1": "SD", "FU2": "PR", "FU3": "PR",
                                       "FU4": "SD", "FU5": "PD", "FU6": "CR"}
    # Exactly -30 % is PR; +21 % vs nadir but only +3 mm is not PD; PD beats PR.
    assert Ms.recist_category([20.0, 14.0, 17.0]) == [None, "PR", "SD"]
    assert Ms.recist_category([100.0, 10.0, 60.0]) == [None, "PR", "PD"]
    # Reappearance after a complete response is progression.
    assert Ms.recist_category([30.0, 0.0, 3.0]) == [None, "CR", "PD"]
    with pytest.raises(ValueError, match="baseline sum of diameters > 0"):
        Ms.recist_category([0.0, 5.0])


# ------------------------------------------------------------------------------ tracking
def _tracking_case():
    """GT lesions 1, 2, 3; prediction: 1 shifted 3 mm (hit), 2 shifted 30 mm (miss), 3 absent, 4 spurious."""
    img = blank((40, 64, 64), (1.0, 1.0, 1.0), oblique_direction(15.0))
    gt = np.zeros(img.shape, np.uint8)
    pred = np.zeros(img.shape, np.uint8)
    s1 = sphere(img, img.index_to_world(np.array([20.0, 20.0, 20.0])), 6.0)
    s2 = sphere(img, img.index_to_world(np.array([20.0, 44.0, 12.0])), 5.0)
    s3 = sphere(img, img.index_to_world(np.array([8.0, 40.0, 45.0])), 3.0)
    s4 = sphere(img, img.index_to_world(np.array([32.0, 12.0, 50.0])), 4.0)
    gt[s1], gt[s2], gt[s3] = 1, 2, 3
    pred[np.roll(s1, 3, axis=2)] = 1
    pred[np.roll(s2, 30, axis=2)] = 2
    pred[s4] = 4
    return img, img.with_array(pred), img.with_array(gt), s1


def test_evaluate_case_paper_metrics():
    img, pred, gt, s1 = _tracking_case()
    rows = E.evaluate_case(pred, gt, lesion_ids=[1, 2, 3, 5], case="scan1", patient="P1")
    by_id = {r["lesion_id"]: r for r in rows}
    assert sorted(by_id) == [1, 2, 3, 4, 5]
    d1 = E.dice(np.roll(s1, 3, axis=2), s1)
    assert 0.4 < d1 < 0.8
    r1, r2, r3, r4, r5 = (by_id[i] for i in (1, 2, 3, 4, 5))
    assert (r1["centre_distance_mm"], r1["cpm_hit"], r1["dice"]) == (pytest.approx(3.0), True, pytest.approx(d1))
    assert r1["gt_volume_ml"] == pytest.approx(4 / 3 * math.pi * 6 ** 3 / 1000, rel=0.05)
    assert (r2["centre_distance_mm"], r2["cpm_hit"], r2["dice"]) == (pytest.approx(30.0), False, 0.0)
    assert (r3["pred_present"], r3["centre_distance_mm"], r3["cpm_hit"], r3["dice"], r3["nsd"]) == \
        (False, None, False, 0.0, 0.0)
    assert (r4["gt_present"], r4["cpm_hit"], r4["dice"], r4["pred_volume_ml"] > 0) == (False, None, 0.0, True)
    assert (r5["gt_present"], r5["pred_present"], r5["cpm_hit"], r5["dice"]) == (False, False, None, 1.0)
    assert all(r["case"] == "scan1" and r["patient"] == "P1" for r in rows)

    summary = E.aggregate(rows)
    assert summary["n_lesions"] == 5 and summary["n_scans"] == 1 and summary["n_patients"] == 1
    assert summary["cpm25"] == pytest.approx(1 / 3)          # lesions 1, 2, 3 have a ground truth
    assert summary["dice25"] == pytest.approx(d1)             # only lesion 1 matched
    assert summary["med_mm"] == pytest.approx((3.0 + 30.0) / 2)
    assert summary["total_dice"] == pytest.approx((d1 + 0 + 0 + 0 + 1) / 5)

    # A looser matching radius turns lesion 2 into a hit.
    rows35 = E.evaluate_case(pred, gt, match_mm=35.0)
    assert E.aggregate(rows35)["cpm25"] == pytest.approx(2 / 3)


def test_aggregate_weights_patients_equally():
    def row(case, patient, dice_value, hit, dist):
        return {"case": case, "patient": patient, "lesion_id": 1, "dice": dice_value, "nsd": dice_value,
                "cpm_hit": hit, "centre_distance_mm": dist}
    rows = [row("a", "P1", 1.0, True, 2.0), row("a", "P1", 0.0, False, None),   # scan a: 0.5
            row("b", "P1", 1.0, True, 4.0),                                     # scan b: 1.0
            row("c", "P2", 0.2, True, 10.0)]                                    # scan c: 0.2
    s = E.aggregate(rows)
    assert (s["n_patients"], s["n_scans"], s["n_lesions"]) == (2, 3, 4)
    assert s["total_dice"] == pytest.approx(((0.5 + 1.0) / 2 + 0.2) / 2)        # 0.475, not 0.55 or 0.567
    assert s["cpm25"] == pytest.approx(((0.5 + 1.0) / 2 + 1.0) / 2)
    assert s["dice25"] == pytest.approx(((1.0 + 1.0) / 2 + 0.2) / 2)
    assert s["med_mm"] == pytest.approx(((2.0 + 4.0) / 2 + 10.0) / 2)


def test_evaluate_case_label_maps_float_and_invalid():
    img, pred, gt, _ = _tracking_case()
    as_float = E.evaluate_case(pred.with_array(pred.array.astype(np.float32)),
                               gt.with_array(gt.array.astype(np.float64)), lesion_ids=np.array([5]))
    assert as_float == E.evaluate_case(pred, gt, lesion_ids=[5])
    bad = gt.with_array(gt.array.astype(np.float32) * 0.5)
    with pytest.raises(ValueError, match="ground truth label map has non-integer values"):
        E.evaluate_case(pred, bad)
    neg = pred.with_array(pred.array.astype(np.int16) - 1)
    with pytest.raises(ValueError, match="prediction label map has negative values"):
        E.evaluate_case(neg, gt)


def test_evaluate_case_geometry_mismatch():
    img = blank((4, 5, 6), (1.0, 1.0, 2.0))
    other = Image(img.array, (1.0, 1.0, 2.5), img.origin, img.direction)
    with pytest.raises(ValueError, match=r"geometry differ: spacing"):
        E.evaluate_case(other, img)


# ------------------------------------------------------------------------------- folders
def test_evaluate_folders_matches_by_case_name(tmp_path):
    img, pred, gt, _ = _tracking_case()
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    write_image(gt, tmp_path / "gt" / "c1.nii.gz")
    write_image(pred, tmp_path / "pred" / "c1.nrrd")            # other extension, same case
    write_image(gt, tmp_path / "gt" / "c2.mha")
    write_image(gt, tmp_path / "pred" / "c2.mha")               # perfect prediction
    write_image(gt, tmp_path / "pred" / "extra.nii.gz")         # no ground truth: ignored
    (tmp_path / "gt" / "notes.txt").write_text("not an image")
    rows = E.evaluate_folders(tmp_path / "pred", tmp_path / "gt", patient_of=lambda c: "P")
    assert [(r["case"], r["lesion_id"]) for r in rows] == [("c1", 1), ("c1", 2), ("c1", 3), ("c1", 4),
                                                          ("c2", 1), ("c2", 2), ("c2", 3)]
    assert all(r["dice"] == 1.0 and r["nsd"] == 1.0 for r in rows if r["case"] == "c2")
    assert all(r["patient"] == "P" for r in rows)
    direct = E.evaluate_case(pred, gt, case="c1", patient="P")
    for got, want in zip(rows[:4], direct):          # the files store the direction in float32-ish precision
        assert got.keys() == want.keys()
        assert got == {k: pytest.approx(v) if isinstance(v, float) else v for k, v in want.items()}


def test_evaluate_folders_missing_prediction(tmp_path):
    img = blank((4, 5, 6), (1.0, 1.0, 2.0))
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    write_image(img, tmp_path / "gt" / "a.nii.gz")
    write_image(img, tmp_path / "pred" / "a.nii.gz")
    write_image(img, tmp_path / "gt" / "b.nii.gz")
    gt_b = tmp_path / "gt" / "b.nii.gz"
    with pytest.raises(FileNotFoundError, match=rf"no prediction for ground-truth file {gt_b}: expected "):
        E.evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no label files .* in ground-truth folder"):
        E.evaluate_folders(tmp_path / "pred", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="prediction folder not found"):
        E.evaluate_folders(tmp_path / "nowhere", tmp_path / "gt")


@pytest.mark.parametrize("field, make", [
    ("spacing", lambda im: Image(im.array, (1.0, 1.0, 2.5), im.origin, im.direction)),
    ("origin", lambda im: Image(im.array, im.spacing, (0.0, 0.0, 1.0), im.direction)),
    ("direction", lambda im: Image(im.array, im.spacing, im.origin, oblique_direction())),
    ("shape", lambda im: Image(im.array[:3], im.spacing, im.origin, im.direction)),
])
def test_evaluate_folders_geometry_mismatch_names_files_and_field(tmp_path, field, make):
    img = blank((4, 5, 6), (1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0))
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    write_image(img, tmp_path / "gt" / "a.nii.gz")
    write_image(make(img), tmp_path / "pred" / "a.nii.gz")
    with pytest.raises(ValueError) as err:
        E.evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    msg = str(err.value)
    assert msg.startswith(f"geometry mismatch between prediction {tmp_path / 'pred' / 'a.nii.gz'} "
                          f"and ground truth {tmp_path / 'gt' / 'a.nii.gz'}: {field}")
    assert "differs" in msg


# -------------------------------------------------------------------------------- tables
def test_write_table_csv_json_and_atomic_failure(tmp_path):
    rows = [{"case": "c1", "lesion_id": 1, "dice": np.float32(0.5), "hit": True, "med": None},
            {"case": "c2", "lesion_id": 2, "dice": float("nan"), "extra": "x"}]
    csv_path, json_path = R.write_table(rows, tmp_path / "out" / "metrics")
    assert csv_path == tmp_path / "out" / "metrics.csv" and json_path == tmp_path / "out" / "metrics.json"
    with open(csv_path, newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0].keys()) == ["case", "lesion_id", "dice", "hit", "med", "extra"]
    assert read[0] == {"case": "c1", "lesion_id": "1", "dice": "0.5", "hit": "True", "med": "", "extra": ""}
    assert json.loads(json_path.read_text()) == [
        {"case": "c1", "lesion_id": 1, "dice": 0.5, "hit": True, "med": None},
        {"case": "c2", "lesion_id": 2, "dice": None, "extra": "x"}]
    before = (csv_path.read_bytes(), json_path.read_bytes())
    with pytest.raises(TypeError):
        R.write_table([{"bad": object()}], tmp_path / "out" / "metrics")
    assert (csv_path.read_bytes(), json_path.read_bytes()) == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["metrics.csv", "metrics.json"]


def test_format_table_fixed_width():
    rows = [{"case": "c1", "lesion_id": 1, "dice": 0.91234, "cpm_hit": True},
            {"case": "long_case", "lesion_id": 12, "dice": None, "cpm_hit": False}]
    assert R.format_table(rows) == (
        "case       lesion_id   dice  cpm_hit\n"
        "---------  ---------  -----  -------\n"
        "c1                 1  0.912  yes\n"
        "long_case         12      -  no")
    assert R.format_table([]) == "(no rows)"


def test_the_old_metrics_module_still_offers_every_name():
    """Scripts written against LesionLocatorLib.metrics keep working: the same functions."""
    from LesionLocatorLib import metrics

    assert metrics.dice is E.dice and metrics.lesion_measurements is Ms.lesion_measurements
    assert metrics.write_table is R.write_table
    assert all(hasattr(metrics, name) for name in metrics.__all__)
