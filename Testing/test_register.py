"""Registration: known motion recovered, lesion masks warped, divergence fallback, files, counter;
the optional greedy and uniGradICON backends (skipped when their package is not installed)."""
import numpy as np
import pytest
import SimpleITK as sitk

import LesionLocatorLib.register as reg
from LesionLocatorLib.image import Image
from LesionLocatorLib.evaluate import dice
from LesionLocatorLib.register import RegistrationError, Transform, register
from phantoms import ct_phantom, oblique_direction


@pytest.fixture(scope="module")
def pair():
    """Baseline (moving) and a follow-up (fixed) = baseline moved rigidly and deformed smoothly,
    on an oblique, anisotropic grid; plus the lesion label at both timepoints."""
    img, lab = ct_phantom(shape_zyx=(40, 96, 96), spacing_xyz=(1.5, 1.5, 2.5), direction=oblique_direction(),
                          lesions=[((20, 40, 30), 8.0, 120), ((22, 62, 66), 6.0, -40)])
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(tuple(img.index_to_world([20, 48, 48])))
    rigid.SetRotation(0, 0, np.deg2rad(5))
    rigid.SetTranslation((6, -4, 3))
    bspline = sitk.BSplineTransformInitializer(img.to_sitk(), [4, 4, 4])
    params = np.random.default_rng(0).normal(0, 1.5, len(bspline.GetParameters()))
    bspline.SetParameters(tuple(params))
    motion = sitk.CompositeTransform([rigid, bspline])
    fu = Image.from_sitk(sitk.Resample(img.to_sitk(), img.to_sitk(), motion, sitk.sitkLinear, -1000))
    fu_lab = Image.from_sitk(sitk.Resample(lab.to_sitk(), lab.to_sitk(), motion, sitk.sitkNearestNeighbor, 0))
    return img, lab, fu, fu_lab


def _centre(image, mask):
    return image.index_to_world(np.argwhere(mask).mean(0))


def _assert_recovers_the_motion(tr, pair):
    """Warped lesions overlap the follow-up's (Dice >= 0.9 / 0.8, better than no registration)
    and mapped centres land within 2 mm."""
    img, lab, fu, fu_lab = pair
    unmoved = register(fu, img, backend="none")
    for pid, least in ((1, 0.9), (2, 0.8)):  # 2 is small and of low contrast (-40 HU in 40 HU tissue)
        lesion = lab.with_array(lab.array == pid)
        warped = tr.warp_mask(lesion, fu)
        assert dice(warped.array, fu_lab.array == pid) >= least
        assert dice(warped.array, fu_lab.array == pid) > dice(unmoved.warp_mask(lesion, fu).array, fu_lab.array == pid)
        mapped = tr.map_points([_centre(img, lab.array == pid)])[0]
        assert np.linalg.norm(mapped - _centre(fu, fu_lab.array == pid)) < 2.0


def test_simpleitk_recovers_the_motion(pair):
    img, lab, fu, fu_lab = pair
    tr = register(fu, img)
    assert tr.info["result"] == "affine + demons" and tr.info["spacing_mm"] == 2.0
    _assert_recovers_the_motion(tr, pair)
    warped_labels = tr.warp_labels(lab, fu)
    assert set(np.unique(warped_labels.array)) == {0, 1, 2}


def test_simpleitk_faster_options_still_recover_the_motion(pair):
    """Fewer affine samples and demons iterations than the defaults: the same pipeline, the same checks."""
    img, lab, fu, fu_lab = pair
    tr = register(fu, img, affine_sampling=0.1, demons_iterations=10)
    assert tr.info["result"] == "affine + demons"
    _assert_recovers_the_motion(tr, pair)


def test_coarse_grid_geometry_and_intensities():
    """The coarse image: isotropic spacing (mm) over the scan's box, its origin and direction, float32
    clipped to [-1000, 1000] HU; fine scans are block-averaged first, unsigned ones cast first."""
    rng = np.random.default_rng(3)
    fine = Image(rng.integers(0, 3000, (30, 40, 50)).astype(np.uint16), (0.5, 0.5, 1.0), (-10.0, 5.0, 2.0),
                 oblique_direction())
    coarse = reg._coarse(fine, 2.0)
    assert coarse.GetPixelID() == sitk.sitkFloat32 and coarse.GetSpacing() == (2.0, 2.0, 2.0)
    assert coarse.GetSize() == (12, 10, 15)  # 25 x 20 x 30 mm
    assert np.allclose(coarse.GetOrigin(), fine.origin) and np.allclose(coarse.GetDirection(), fine.direction.ravel())
    values = sitk.GetArrayFromImage(coarse)
    assert values.min() >= -1000 and values.max() <= 1000
    flat = reg._coarse(fine.with_array(np.full(fine.shape, 40, np.int16)), 2.0)
    assert np.allclose(sitk.GetArrayFromImage(flat), 40.0, atol=1e-3)


def test_none_is_the_identity(pair):
    img, lab, fu, _ = pair
    tr = register(fu, img, backend="none")
    pts = np.array([[1.0, 2.0, 3.0], [-40.0, 15.5, 80.0]])
    assert np.allclose(tr.map_points(pts), pts)
    assert np.array_equal(tr.warp_mask(lab, img).array, lab.array > 0)


def test_diverging_deformable_stage_falls_back_to_affine(pair):
    img, _, fu, _ = pair
    with pytest.warns(UserWarning, match=r"deformable registration diverged .*falling back to the affine"):
        tr = register(fu, img, field_scale=40.0)
    assert tr.info["result"] == "affine (deformable diverged)"
    assert isinstance(tr.itk, sitk.Transform) and tr.itk.GetDimension() == 3


def test_save_and_load_give_the_same_mapping(pair, tmp_path):
    img, lab, fu, _ = pair
    tr = register(fu, img)
    path = tr.save(tmp_path / "t1_to_t0.h5")
    again = Transform.load(path)
    pts = np.array([_centre(img, lab.array == 1), _centre(img, lab.array == 2)])
    assert np.allclose(again.map_points(pts), tr.map_points(pts), atol=1e-6)


def test_every_call_is_counted_and_unknown_backends_are_refused(pair):
    img, _, fu, _ = pair
    before = reg.REGISTRATION_CALLS
    register(fu, img, backend="none")
    assert reg.REGISTRATION_CALLS == before + 1
    with pytest.raises(ValueError, match="unknown registration backend 'elastix'"):
        register(fu, img, backend="elastix")
    with pytest.raises(RegistrationError, match="'unigradicon' registration backend needs a LesionLocatorTrack model"):
        register(fu, img, backend="unigradicon")


def test_mask_leaving_the_field_of_view_warps_to_nothing(pair):
    img, lab, fu, _ = pair
    small = Image(fu.array[:, :30].copy(), fu.spacing, fu.origin, fu.direction)  # lesion 2 is at y = 62
    tr = register(small, img, backend="none")
    assert not tr.warp_mask(lab.with_array(lab.array == 2), small).array.any()


# ------------------------------------------------------------------------ greedy
def test_greedy_recovers_the_motion(pair, tmp_path):
    pytest.importorskip("picsl_greedy", reason="optional package picsl-greedy (pip install '.[greedy]')")
    img, lab, fu, fu_lab = pair
    tr = register(fu, img, backend="greedy", threads=1)   # seeded and one thread: the same result every run
    assert tr.info["result"] == "affine + greedy NCC" and tr.info["spacing_mm"] == 2.0
    assert tr.info["ncc_deformable"] > tr.info["ncc_affine"] > tr.info["ncc_identity"]
    _assert_recovers_the_motion(tr, pair)
    affine = register(fu, img, backend="greedy", deformable=False, threads=1)  # greedy's RAS matrix -> LPS
    assert affine.info["result"] == "affine"
    for pid in (1, 2):
        mapped = affine.map_points([_centre(img, lab.array == pid)])[0]
        assert np.linalg.norm(mapped - _centre(fu, fu_lab.array == pid)) < 3.0
    again = Transform.load(tr.save(tmp_path / "greedy.h5"))
    pts = np.array([_centre(img, lab.array == 1), _centre(img, lab.array == 2)])
    assert np.allclose(again.map_points(pts), tr.map_points(pts), atol=1e-6)


# ------------------------------------------------------------------- uniGradICON
def _grid(shape_zyx, spacing_xyz, origin_xyz, direction):
    grid = sitk.Image([int(v) for v in shape_zyx[::-1]], sitk.sitkFloat32)
    grid.SetSpacing(spacing_xyz)
    grid.SetOrigin(origin_xyz)
    grid.SetDirection(tuple(np.asarray(direction, float).ravel()))
    return grid


def test_network_displacement_becomes_the_exact_mm_mapping():
    """A known map in normalised coordinates between two oblique, anisotropic grids of
    different sizes maps every fixed voxel centre exactly onto the moving position it names."""
    fixed_grid = _grid((6, 8, 10), (1.5, 1.2, 3.0), (-20.0, 10.0, 5.0), oblique_direction(20))
    moving_grid = _grid((6, 8, 10), (1.4, 1.3, 2.5), (-15.0, 12.0, 8.0), oblique_direction(-10))
    shape = np.array([6, 8, 10])
    u = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij"))
    phi = u + np.array([0.05, -0.1, 0.02])[:, None, None, None] + 0.03 * np.sin(3 * u[[1, 2, 0]])
    tr = Transform(reg.displacement_to_transform(phi, fixed_grid, moving_grid), "test")
    rng = np.random.default_rng(1)
    for zyx in rng.integers(1, shape - 1, size=(20, 3)):  # inside the field (it stops at the grid's border)
        world_fixed = fixed_grid.TransformIndexToPhysicalPoint(tuple(int(v) for v in zyx[::-1]))
        moving_index_zyx = phi[(slice(None), *zyx)] * (shape - 1)
        expected = moving_grid.TransformContinuousIndexToPhysicalPoint(tuple(moving_index_zyx[::-1]))
        assert np.allclose(tr.fixed_to_moving([world_fixed])[0], expected, atol=1e-6)
        assert np.allclose(tr.map_points([expected])[0], world_fixed, atol=1e-2)
    # the identity map (zero displacement) is the voxel-for-voxel affine between the two boxes
    ident = Transform(reg.displacement_to_transform(u, fixed_grid, moving_grid), "test")
    far = fixed_grid.TransformContinuousIndexToPhysicalPoint((30.0, -7.0, 12.5))  # outside the field too
    assert np.allclose(ident.fixed_to_moving([far])[0],
                       moving_grid.TransformContinuousIndexToPhysicalPoint((30.0, -7.0, 12.5)), atol=1e-6)


def test_network_grid_matches_torch_interpolate():
    """The 175^3-style grid over a scan's box samples it as F.interpolate(align_corners=False)."""
    torch = pytest.importorskip("torch")
    img, _ = ct_phantom(shape_zyx=(12, 20, 16), spacing_xyz=(1.5, 1.2, 2.5), direction=oblique_direction())
    arr = np.asarray(img.array, np.float32)
    grid = reg._box_grid(img, (7, 9, 11))
    ours = reg._resample_to(img.with_array(arr).to_sitk(), grid, -1000.0)
    theirs = torch.nn.functional.interpolate(torch.from_numpy(arr)[None, None], size=(7, 9, 11), mode="trilinear",
                                             align_corners=False)[0, 0].numpy()
    assert np.allclose(ours, theirs, atol=1e-2)


@pytest.fixture(scope="module")
def unigradicon_track_model(tmp_path_factory):
    pytest.importorskip("unigradicon", reason="optional package unigradicon (pip install '.[unigradicon]')")
    from build_test_models import build_unigradicon_track_model
    from LesionLocatorLib.model import load_model
    folder = build_unigradicon_track_model(tmp_path_factory.mktemp("unigradicon") / "LesionLocatorTrack",
                                           displacement_scale=0.004)
    return load_model(folder, "prev_mask", device="cpu")


@pytest.mark.parametrize("z_spacing_mm", [3.0, 1.0])  # 1 mm: the scans differ by > 20 slices, a z window is cut
def test_unigradicon_transform_is_the_networks_own_warp(pair, unigradicon_track_model, z_spacing_mm, tmp_path):
    """End to end on CPU with random weights: the returned ITK transform warps the moving
    network input exactly as icon_registration warps it with the network's own map."""
    import torch
    from icon_registration.mermaidlite import compute_warped_image_multiNC
    from LesionLocatorLib.model import registration_weights
    from LesionLocatorLib.modelgrid import ct_normalizer
    img, lab, fu, _ = pair
    longer = Image(np.concatenate([img.array, img.array[:20]]), img.spacing, img.origin, img.direction)
    longer_lab = longer.with_array(np.concatenate([lab.array, np.zeros_like(lab.array[:20])]))
    model, shape = unigradicon_track_model, (80, 80, 80)
    tr = register(fu, longer, backend="unigradicon", model=model, shape=shape, z_spacing_mm=z_spacing_mm)
    assert tr.info["result"] == "uniGradICON" and tr.info["intensity"] == "model"
    assert tr.info["z_window"] == ("yes" if z_spacing_mm == 1.0 else "no")
    assert 1.0 < tr.info["max_displacement_mm"] < 60.0  # a real, non-trivial deformation
    normalise = ct_normalizer(model.intensity_properties)
    grids, (fixed_arr, moving_arr), _ = reg.unigradicon_inputs(fu, longer, normalise, shape, z_spacing_mm)
    net = reg.unigradicon_network(registration_weights(model), shape)
    with torch.no_grad():
        net.identity_map.isIdentity = True
        phi = net.regis_net(torch.from_numpy(moving_arr)[None, None], torch.from_numpy(fixed_arr)[None, None])(
            net.identity_map)
        icon_warped = compute_warped_image_multiNC(torch.from_numpy(moving_arr)[None, None], phi, net.spacing, 1)
    moving_img = sitk.GetImageFromArray(moving_arr)
    moving_img.CopyInformation(grids[1])
    ours = sitk.GetArrayFromImage(sitk.Resample(moving_img, grids[0], tr.itk, sitk.sitkLinear, np.nan))
    inside = np.all((phi[0].numpy() > 0.02) & (phi[0].numpy() < 0.98), axis=0) & np.isfinite(ours)
    assert inside.mean() > 0.5
    assert np.abs(ours[inside] - icon_warped[0, 0].numpy()[inside]).max() < 1e-3
    # geometry on the scans: the mask lands on the fixed grid, points map both ways, files keep it
    warped = tr.warp_mask(longer_lab.with_array(longer_lab.array == 1), fu)
    assert warped.same_geometry(fu) and warped.array.dtype == bool
    centre = _centre(longer, longer_lab.array == 1)
    assert np.allclose(tr.fixed_to_moving(tr.map_points([centre]))[0], centre, atol=1e-2)
    again = Transform.load(tr.save(tmp_path / "unigradicon.h5"))
    assert np.allclose(again.map_points([centre]), tr.map_points([centre]), atol=1e-6)


def test_unigradicon_refuses_checkpoints_without_its_weights(pair, tiny_model_root):
    from LesionLocatorLib.model import load_model
    img, _, fu, _ = pair
    seg = load_model(tiny_model_root, "point", device="cpu")  # a segmentation checkpoint: no 'reg_net.' tensors
    with pytest.raises(RegistrationError, match=r"point_optimized/fold_0/checkpoint_final.pth holds no registration "
                                                r"network \('reg_net.' weights\)"):
        register(fu, img, backend="unigradicon", model=seg)
    pytest.importorskip("unigradicon", reason="optional package unigradicon (pip install '.[unigradicon]')")
    track = load_model(tiny_model_root, "prev_mask", device="cpu")  # placeholder 'reg_net.' tensors
    with pytest.raises(RegistrationError, match=r"LesionLocatorTrack/fold_0/checkpoint_final.pth do not fit "
                                                r"uniGradICON's network"):
        register(fu, img, backend="unigradicon", model=track, shape=(80, 80, 80))


def test_missing_optional_packages_give_a_clear_error(pair, tiny_model_root, monkeypatch):
    from LesionLocatorLib.model import load_model
    img, _, fu, _ = pair
    monkeypatch.setitem(__import__("sys").modules, "picsl_greedy", None)  # as if not installed
    monkeypatch.setitem(__import__("sys").modules, "unigradicon", None)
    with pytest.raises(RegistrationError, match=r"'greedy' registration backend needs the optional package "
                                                r"'picsl-greedy'"):
        register(fu, img, backend="greedy")
    track = load_model(tiny_model_root, "prev_mask", device="cpu")
    with pytest.raises(RegistrationError, match=r"'unigradicon' registration backend needs the optional package "
                                                r"'unigradicon'"):
        register(fu, img, backend="unigradicon", model=track)
