"""Registration: known motion recovered, lesion masks warped, divergence fallback, files, counter."""
import numpy as np
import pytest
import SimpleITK as sitk

import LesionLocatorLib.register as reg
from LesionLocatorLib.image import Image
from LesionLocatorLib.metrics import dice
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


def test_simpleitk_recovers_the_motion(pair):
    img, lab, fu, fu_lab = pair
    tr = register(fu, img)
    assert tr.info["result"] == "affine + demons" and tr.info["spacing_mm"] == 2.0
    unmoved = register(fu, img, backend="none")
    for pid, least in ((1, 0.9), (2, 0.8)):  # 2 is small and of low contrast (-40 HU in 40 HU tissue)
        lesion = lab.with_array(lab.array == pid)
        warped = tr.warp_mask(lesion, fu)
        assert dice(warped.array, fu_lab.array == pid) >= least
        assert dice(warped.array, fu_lab.array == pid) > dice(unmoved.warp_mask(lesion, fu).array, fu_lab.array == pid)
        mapped = tr.map_points([_centre(img, lab.array == pid)])[0]
        assert np.linalg.norm(mapped - _centre(fu, fu_lab.array == pid)) < 2.0
    warped_labels = tr.warp_labels(lab, fu)
    assert set(np.unique(warped_labels.array)) == {0, 1, 2}


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
    with pytest.raises(RegistrationError, match="the 'greedy' registration backend is not available"):
        register(fu, img, backend="greedy")


def test_mask_leaving_the_field_of_view_warps_to_nothing(pair):
    img, lab, fu, _ = pair
    small = Image(fu.array[:, :30].copy(), fu.spacing, fu.origin, fu.direction)  # lesion 2 is at y = 62
    tr = register(small, img, backend="none")
    assert not tr.warp_mask(lab.with_array(lab.array == 2), small).array.any()
