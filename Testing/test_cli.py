"""`lesionlocator segment` / `prompts`: upstream-compatible flags, outputs and errors."""
import json

import numpy as np
import pytest

from LesionLocatorLib.cli import main
from LesionLocatorLib.image import read_image, write_image
from phantoms import ct_phantom, oblique_direction


@pytest.fixture()
def case(tmp_path):
    img, lab = ct_phantom(shape_zyx=(30, 80, 70), spacing_xyz=(1.5, 1.3, 2.5), origin_xyz=(-20.0, 33.0, -90.0),
                          direction=oblique_direction(15), lesions=[((15, 40, 30), 8.0, 120), ((10, 60, 50), 6.0, 90)])
    (tmp_path / "in").mkdir()
    write_image(img, tmp_path / "in" / "case01.nii.gz")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "case01.json").write_text(json.dumps({"1": {"point": ["15", "40", "30"]},
                                                                   "2": {"point": [10, 60, 50]}}))
    write_image(lab, tmp_path / "labels.nii.gz")
    return tmp_path, img, lab


def test_segment_single_file_writes_upstream_names_with_exact_geometry(case, tiny_model_root, capsys):
    tmp, img, _ = case
    rc = main(["segment", "-i", str(tmp / "in" / "case01.nii.gz"), "-p", str(tmp / "prompts" / "case01.json"),
               "-t", "point", "-o", str(tmp / "out"), "-m", str(tiny_model_root), "--device", "cpu",
               "--disable_progress_bar", "--save-probabilities"])
    assert rc == 0
    names = sorted(p.name for p in (tmp / "out").iterdir() if not p.name.startswith("."))
    assert names == ["case01_lesion_1.nii.gz", "case01_lesion_1.npz", "case01_lesion_2.nii.gz",
                     "case01_lesion_2.npz", "case01_lesions.nii.gz"]  # upstream's names
    manifest = json.loads((tmp / "out" / ".case01.lesionlocator.json").read_text())  # hidden: the case is complete
    assert manifest["files"] == {n: (tmp / "out" / n).stat().st_size for n in names}
    for name in ("case01_lesion_1.nii.gz", "case01_lesions.nii.gz"):
        out = read_image(tmp / "out" / name)
        assert out.shape == img.shape and np.allclose(out.spacing, img.spacing)
        assert np.allclose(out.origin, img.origin, atol=1e-4) and np.allclose(out.direction, img.direction, atol=1e-6)
    lesions = read_image(tmp / "out" / "case01_lesions.nii.gz").array
    assert set(np.unique(lesions)) <= {0, 1, 2} and (lesions == 1).any()
    assert "case01: 2 lesion(s)" in capsys.readouterr().out


def test_folder_mode_label_prompts_and_continue(case, tiny_model_root, capsys):
    tmp, _, lab = case
    (tmp / "labels").mkdir()
    write_image(lab, tmp / "labels" / "case01.nii.gz")
    args = ["segment", "-i", str(tmp / "in"), "-p", str(tmp / "labels"), "-t", "box", "-o", str(tmp / "out"),
            "-m", str(tiny_model_root), "-f", "0", "--disable_progress_bar"]
    assert main(args) == 0
    first = (tmp / "out" / "case01_lesions.nii.gz").stat().st_mtime_ns
    assert main(args + ["--continue_prediction"]) == 0
    assert (tmp / "out" / "case01_lesions.nii.gz").stat().st_mtime_ns == first
    assert "already predicted, skipping" in capsys.readouterr().err


def test_world_prompts_from_the_prompts_command(case, tiny_model_root):
    tmp, img, lab = case
    assert main(["prompts", "-i", str(tmp / "labels.nii.gz"), "-o", str(tmp / "pj"), "--world"]) == 0
    world = json.loads((tmp / "pj" / "points" / "labels.json").read_text())
    assert world["format"] == "lesionlocator-world/1" and len(world["prompts"]) == 2
    # the world point is the lesion's centre of mass
    centre = img.world_to_index(world["prompts"][0]["point"])
    assert np.allclose(centre, [15, 40, 30], atol=0.5)
    assert main(["prompts", "-i", str(tmp / "labels.nii.gz"), "-o", str(tmp / "pv")]) == 0
    boxes = json.loads((tmp / "pv" / "boxes" / "labels.json").read_text())
    assert set(boxes) == {"1", "2"} and len(boxes["1"]["box"]) == 6


@pytest.mark.parametrize("setup, message", [
    (lambda t: ("in/case01.nii.gz", "missing.json"), "prompt not found"),
    (lambda t: ("in", "prompts/case01.json"), "if -i is a folder then -p must be a folder"),
    (lambda t: (t / "prompts" / "other.json").write_text("{}") and ("in", "prompts"),
     "prompt file\\(s\\) with no image of the same name .*other.json"),
    (lambda t: (t / "prompts" / "case01.json").write_text('{"1": {"point": [500, 1, 1]}}') and
     ("in/case01.nii.gz", "prompts/case01.json"), "prompt 1: point at voxel .* is outside the image"),
])
def test_errors_exit_2_with_a_message_and_write_nothing(case, tiny_model_root, capsys, setup, message):
    import re
    tmp = case[0]
    i, p = setup(tmp)
    rc = main(["segment", "-i", str(tmp / i), "-p", str(tmp / p), "-t", "point", "-o", str(tmp / "out"),
               "-m", str(tiny_model_root), "--disable_progress_bar"])
    assert rc == 2
    err = capsys.readouterr().err
    assert re.search("lesionlocator segment: error: " + message, err), err
    assert not (tmp / "out").exists() or not any((tmp / "out").iterdir())


def test_wrong_model_folder_lists_the_expected_layout(case, tmp_path, capsys):
    tmp = case[0]
    rc = main(["segment", "-i", str(tmp / "in" / "case01.nii.gz"), "-p", str(tmp / "prompts" / "case01.json"),
               "-t", "point", "-o", str(tmp / "out"), "-m", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no 'point' model in" in err and "LesionLocatorSeg/point_optimized/{plans.json" in err


def test_evaluate_command_prints_table_and_writes_csv_json(case, capsys):
    tmp, img, lab = case
    (tmp / "gt").mkdir()
    (tmp / "pred").mkdir()
    write_image(lab, tmp / "gt" / "case01.nii.gz")
    pred = lab.array.copy()
    pred[pred == 2] = 0  # lesion 2 missed
    write_image(lab.with_array(pred), tmp / "pred" / "case01.nii.gz")
    assert main(["evaluate", "--pred", str(tmp / "pred"), "--gt", str(tmp / "gt"), "-o", str(tmp / "ev")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp / "ev.json").read_text())
    by_id = {r["lesion_id"]: r for r in rows}
    assert by_id[1]["dice"] == 1.0 and by_id[2]["dice"] == 0.0
    assert (tmp / "ev.csv").read_text().count("\n") == 3
    assert "lesion_id" in out and "total_dice=0.500" in out


def test_the_user_flow_chains_synth_prompts_segment_evaluate_and_train_without_renaming(tmp_path, tiny_model_root,
                                                                                       capsys):
    """lesionlocator synth writes <case>_t<k>.nii.gz and <case>_t<k>_label.nii.gz side by side; prompts made
    from those labels, segment, evaluate and train's pairing take them as they are."""
    from LesionLocatorLib.training.train import find_pairs

    img, _ = ct_phantom(shape_zyx=(40, 96, 96), spacing_xyz=(1.5, 1.5, 2.5))
    write_image(img, tmp_path / "ct.nii.gz")
    synth = tmp_path / "synth"
    assert main(["synth", "--ct", str(tmp_path / "ct.nii.gz"), "--lesions", "2", "--followups", "1", "--seed", "3",
                 "-o", str(synth), "--name", "case", "--disable_progress_bar"]) == 0
    assert main(["prompts", "-i", str(synth / "case_t0_label.nii.gz"), "-o", str(tmp_path / "prompts")]) == 0
    assert (tmp_path / "prompts" / "points" / "case_t0.json").is_file()  # named after the scan, not the label
    points = tmp_path / "prompts" / "points"
    (points / "case_t1.json").write_text((points / "case_t0.json").read_text())  # same lesion IDs
    assert main(["segment", "-i", str(synth), "-p", str(points), "-t", "point", "-o", str(tmp_path / "out"),
                 "-m", str(tiny_model_root), "--device", "cpu", "--disable_progress_bar"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").glob("*_lesions.nii.gz")) == ["case_t0_lesions.nii.gz",
                                                                                  "case_t1_lesions.nii.gz"]
    assert main(["segment", "-i", str(synth), "-p", str(synth), "-t", "box", "-o", str(tmp_path / "out_labels"),
                 "-m", str(tiny_model_root), "--device", "cpu", "--disable_progress_bar"]) == 0  # labels as prompts
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "out"), "--gt", str(synth)]) == 0
    rows = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert sorted({r["case"] for r in rows}) == ["case_t0", "case_t1"] and len(rows) >= 4
    assert [(a.name, b.name) for a, b in find_pairs(synth, synth)] == [
        ("case_t0.nii.gz", "case_t0_label.nii.gz"), ("case_t1.nii.gz", "case_t1_label.nii.gz")]
