"""Tracking: one registration per timepoint pair, statuses, Track checkpoints, the track command."""
import json

import numpy as np
import pytest

import LesionLocatorLib.register as register_module
from LesionLocatorLib.cli import main
from LesionLocatorLib.image import Image, write_image
from LesionLocatorLib.model import load_model, registration_weights
from LesionLocatorLib.prompts import MaskPrompt, PromptError, VoxelPrompt
from LesionLocatorLib.track import track
from phantoms import ct_phantom

LESIONS = [((15, 30, 25), 6.0, 120), ((12, 55, 50), 5.0, 90), ((20, 45, 20), 4.0, 100)]


def _series(n_followups=2, shift_vox=(0, 2, 1), direction=None):
    """A baseline and follow-ups whose lesions move by a known voxel shift each time."""
    images, labels = [], []
    for t in range(n_followups + 1):
        lesions = [(tuple(np.add(c, np.multiply(shift_vox, t))), r, hu) for c, r, hu in LESIONS]
        img, lab = ct_phantom(shape_zyx=(30, 80, 70), spacing_xyz=(1.5, 1.5, 2.5), direction=direction,
                              lesions=lesions, seed=t)
        images.append(img)
        labels.append(lab)
    return images, labels


def test_one_registration_per_timepoint_pair_whatever_the_number_of_lesions(tiny_model_root, monkeypatch):
    calls = []
    real = register_module.register

    def counting(fixed, moving, backend="simpleitk", **kw):
        calls.append((id(fixed), id(moving)))
        return real(fixed, moving, backend=backend, **kw)

    monkeypatch.setattr(register_module, "register", counting)
    images, labels = _series(n_followups=3)
    model = load_model(tiny_model_root, "prev_mask", device="cpu")
    result = track(images, labels[0], model, registration="none")
    assert len(calls) == 3 and len(set(calls)) == 3
    assert [c[0] for c in calls] == [id(im) for im in images[1:]]
    assert result.lesion_ids == [1, 2, 3]
    assert all(len(s) == 4 for s in result.status.values())
    assert all(st in ("tracked", "vanished", "outside") for s in result.status.values() for st in s)
    for t, lab in enumerate(result.labels):
        assert lab.same_geometry(images[t])


def test_track_checkpoint_in_official_layout_runs_on_cpu(tiny_model_root):
    model = load_model(tiny_model_root, "prev_mask", device="cpu")
    assert model.trainer_name == "LesionLocatorTrainerTrack"
    assert model.spacing_zyx == (3.0, 0.84, 0.84)
    reg = registration_weights(model)
    assert reg and all(not k.startswith("reg_net.") for k in reg)
    images, labels = _series(n_followups=1)
    result = track(images, labels[0], model, registration="none")
    assert result.masks[1][1].dtype == bool


def test_lesion_outside_the_follow_up_field_of_view(tiny_model_root):
    images, labels = _series(n_followups=1)
    model = load_model(tiny_model_root, "prev_mask", device="cpu")
    # the follow-up covers only the upper half (y < 40) of the baseline's field of view
    fu = images[1]
    cropped = Image(fu.array[:, :40].copy(), fu.spacing, fu.origin, fu.direction)
    result = track([images[0], cropped], labels[0], model, registration="none")
    assert result.status[2] == ["tracked", "outside"]  # lesion 2 is at y = 55
    assert not result.masks[1][2].any()


def test_follow_up_specks_below_the_minimum_volume_count_as_vanished(tiny_model_root):
    images, labels = _series(n_followups=1)
    model = load_model(tiny_model_root, "prev_mask", device="cpu")
    plain = track(images, labels[0], model, registration="none")
    voxel_ml = float(np.prod(images[1].spacing_zyx)) / 1000
    volumes = {i: plain.masks[1][i].sum() * voxel_ml for i in plain.lesion_ids if plain.masks[1][i].any()}
    assert len(volumes) >= 2, "the fixture needs two lesions tracked at the follow-up"
    smallest, *others = sorted(volumes, key=volumes.get)
    threshold = (volumes[smallest] + volumes[others[0]]) / 2 if volumes[others[0]] > volumes[smallest] \
        else volumes[smallest] + 1e-9
    specks = track(images, labels[0], model, registration="none", min_volume_ml=threshold)
    assert specks.status[smallest] == ["tracked", "vanished"]
    assert not specks.masks[1][smallest].any() and not (specks.labels[1].array == smallest).any()
    for i in volumes:
        if volumes[i] >= threshold:   # larger lesions unchanged, mask and label voxels
            assert specks.status[i] == ["tracked", "tracked"]
            assert np.array_equal(specks.masks[1][i], plain.masks[1][i])
            assert np.array_equal(specks.labels[1].array == i, plain.labels[1].array == i)
    assert np.array_equal(specks.masks[0][smallest], plain.masks[0][smallest]), "the baseline is never thresholded"
    with pytest.raises(ValueError, match="min_volume_ml must be >= 0, got -1"):
        track(images, labels[0], model, registration="none", min_volume_ml=-1)


def test_follow_up_remnants_below_the_prompt_fraction_count_as_vanished(tiny_model_root):
    images, labels = _series(n_followups=2)
    model = load_model(tiny_model_root, "prev_mask", device="cpu")
    plain = track(images, labels[0], model, registration="none")
    # registration "none": each follow-up's prompt is the previous mask itself
    fractions = {i: plain.masks[1][i].sum() / plain.masks[0][i].sum() for i in plain.lesion_ids
                 if plain.masks[1][i].any()}
    assert len(set(fractions.values())) >= 2, "the fixture needs two tracked lesions of different fractions"
    smallest, *others = sorted(fractions, key=fractions.get)
    threshold = (fractions[smallest] + min(fractions[i] for i in others if fractions[i] > fractions[smallest])) / 2
    remnants = track(images, labels[0], model, registration="none", min_prompt_fraction=threshold)
    assert remnants.status[smallest][:2] == ["tracked", "vanished"]
    assert not remnants.masks[1][smallest].any() and not (remnants.labels[1].array == smallest).any()
    # its prompt at the second follow-up is still its baseline mask: the same as tracking the baseline
    # straight into the second follow-up
    direct = track([images[0], images[2]], labels[0], model, registration="none", min_prompt_fraction=threshold)
    assert remnants.status[smallest][2] == direct.status[smallest][1]
    assert np.array_equal(remnants.masks[2][smallest], direct.masks[1][smallest])
    for i in fractions:
        if fractions[i] >= threshold:
            assert remnants.status[i][:2] == ["tracked", "tracked"]
            assert np.array_equal(remnants.labels[1].array == i, plain.labels[1].array == i)
    with pytest.raises(ValueError, match="min_prompt_fraction must be >= 0, got -0.1"):
        track(images, labels[0], model, registration="none", min_prompt_fraction=-0.1)
    with pytest.raises(ValueError, match="min_prompt_fraction must be >= 0, got nan"):   # not silently off
        track(images, labels[0], model, registration="none", min_prompt_fraction=float("nan"))


def test_point_prompts_segment_the_baseline_first(tiny_model_root):
    images, _ = _series(n_followups=1)
    seg = load_model(tiny_model_root, "point", device="cpu")
    trk = load_model(tiny_model_root, "prev_mask", device="cpu")
    result = track(images, [VoxelPrompt(4, "point", [15, 30, 25])], trk, seg_model=seg, registration="none")
    assert result.lesion_ids == [4] and result.masks[0][4].any()
    assert "baseline segmentation" in result.timings


def test_bad_baseline_input(tiny_model_root):
    images, labels = _series(n_followups=1)
    model = load_model(tiny_model_root, "prev_mask", device="cpu")
    with pytest.raises(PromptError, match="the baseline mask is empty: there is no lesion to track"):
        track(images, labels[0].with_array(np.zeros_like(labels[0].array)), model, registration="none")
    with pytest.raises(ValueError, match="a baseline and at least one follow-up"):
        track(images[:1], labels[0], model, registration="none")
    overlapping = [MaskPrompt(1, labels[0].with_array(labels[0].array == 1)),
                   MaskPrompt(2, labels[0].with_array(labels[0].array >= 1))]
    with pytest.warns(UserWarning, match=r"baseline lesions overlap: \[\(1, 2\)\]"):
        track(images, overlapping, model, registration="none")


def test_track_command_writes_upstream_names_table_and_plot(tiny_model_root, tmp_path, capsys):
    images, labels = _series(n_followups=2)
    paths = []
    for t, img in enumerate(images):
        paths.append(write_image(img, tmp_path / f"scan_t{t}.nii.gz"))
    write_image(labels[0], tmp_path / "baseline_label.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"broken")
    rc = main(["track", "-bl", str(paths[0]), "-fu", str(paths[1]), str(tmp_path / "broken.nii.gz"), str(paths[2]),
               "-p", str(tmp_path / "baseline_label.nii.gz"), "-t", "prev_mask", "-o", str(tmp_path / "out"),
               "-m", str(tiny_model_root), "--registration", "none", "--disable_progress_bar"])
    captured = capsys.readouterr()
    assert rc == 1, "a follow-up failed to load: non-zero exit, the others finished"
    assert "follow-up " + str(tmp_path / "broken.nii.gz") + " could not be loaded" in captured.err
    out = tmp_path / "out"
    for t in (1, 2):
        assert (out / f"scan_t{t}_lesions.nii.gz").exists()
        for pid in (1, 2, 3):
            assert (out / f"scan_t{t}_lesion_{pid}.nii.gz").exists()
    rows = json.loads((out / "lesions.json").read_text())
    assert len(rows) == 9 and {r["timepoint"] for r in rows} == {"scan_t0", "scan_t1", "scan_t2"}
    base = [r for r in rows if r["index"] == 0]
    # baseline volumes are those of the label image
    for r in base:
        expected = (labels[0].array == r["lesion_id"]).sum() * np.prod(images[0].spacing) / 1000
        assert r["volume_ml"] == pytest.approx(expected, rel=1e-6)
    assert (out / "growth.png").read_bytes()[:4] == b"\x89PNG"
    assert "time per stage" in captured.out


def test_unigradicon_registration_gets_the_track_model(tiny_model_root, monkeypatch):
    """The Track checkpoint holds the registration network: the tracker hands its model to the backend."""
    seen = []

    def fake_unigradicon(fixed, moving, model=None, **options):
        seen.append((model, options))
        return register_module.register_none(fixed, moving)

    monkeypatch.setitem(register_module.BACKENDS, "unigradicon", fake_unigradicon)
    images, labels = _series(n_followups=2)
    model = load_model(tiny_model_root, "prev_mask", device="cpu")
    track(images, labels[0], model, registration="unigradicon", registration_options={"shape": (80, 80, 80)})
    assert len(seen) == 2 and all(m is model and o == {"shape": (80, 80, 80)} for m, o in seen)
