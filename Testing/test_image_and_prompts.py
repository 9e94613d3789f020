"""Image geometry, prompt files, prompt encoding (pinned to upstream's rules)."""
import json

import numpy as np
import pytest

from LesionLocatorLib.image import Image, ImageError, read_image, write_image, nonzero_bbox
from LesionLocatorLib.encoding import ball, box_to_model_grid, paint_prompt, point_to_model_grid
from LesionLocatorLib.prompts import (Box, Point, PromptError, VoxelPrompt, prompts_from_labels, read_prompt_file,
                                      to_voxel_prompt, write_upstream_json, write_world_json)
from phantoms import ct_phantom, oblique_direction

OBLIQUE = dict(shape_zyx=(20, 40, 30), spacing_xyz=(0.7, 1.3, 3.1), origin_xyz=(12.5, -40.0, 100.0),
               direction=oblique_direction(25.0))


def test_world_index_round_trip_on_oblique_anisotropic_image():
    img, _ = ct_phantom(**OBLIQUE)
    idx = np.array([[3.0, 17.0, 5.0], [19.0, 0.0, 29.0]])
    world = img.index_to_world(idx)
    # the same mapping SimpleITK computes
    sitk_img = img.to_sitk()
    for (k, j, i), w in zip(idx, world):
        assert np.allclose(sitk_img.TransformContinuousIndexToPhysicalPoint((i, j, k)), w)
    assert np.allclose(img.world_to_index(world), idx)


def test_write_read_keeps_geometry_exactly(tmp_path):
    img, _ = ct_phantom(**OBLIQUE)
    path = write_image(img, tmp_path / "a.nii.gz")
    back = read_image(path)
    assert back.same_geometry(img, tol=1e-5)
    assert np.array_equal(back.array, img.array)
    assert not list(tmp_path.glob(".tmp_*"))


def test_2d_and_4d_images_are_refused(tmp_path):
    import SimpleITK as sitk
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(tmp_path / "2d.nii.gz"))
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkInt16), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(ImageError, match=r"expected a 3D image, got 2D"):
        read_image(tmp_path / "2d.nii.gz")
    with pytest.raises(ImageError, match=r"expected a 3D image, got 4D with size \(4, 4, 4, 3\)"):
        read_image(tmp_path / "4d.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ImageError, match="cannot read image"):
        read_image(tmp_path / "junk.nii.gz")


def test_nonzero_bbox_matches_nnunet_crop():
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    a = np.zeros((10, 12, 14), np.float32)
    a[2:7, 3:12, 1:5] = -1000
    a[4, 5, 2] = 0  # a hole does not change the box
    _, _, bbox = crop_to_nonzero(a[None].copy())
    assert nonzero_bbox(a) == [list(b) for b in bbox] == [[2, 7], [3, 12], [1, 5]]


def test_ball_is_skimage_ball_radius_5_not_strict():
    from skimage.morphology import ball as sk_ball
    assert np.array_equal(ball(5), sk_ball(5, strict_radius=False).astype(bool))
    assert ball(5).sum() == 739


def test_point_and_box_mapping_follow_upstream_rules():
    # crop starts at 2 along z; cropped 50 voxels become 100 model voxels (factor 2)
    crop_lo, cropped, model = (2, 0, 0), (50, 40, 40), (100, 30, 60)
    assert list(point_to_model_grid([12.25, 10.0, 10.0], crop_lo, cropped, model)) == [20, 8, 15]
    # round half to even, as numpy does: 10.25 * 2 = 20.5 -> 20
    assert point_to_model_grid([12.25, 0, 0], crop_lo, cropped, model)[0] == 20
    # box: floor(min*f), ceil(max*f), grown by one voxel, clipped to the model grid
    b = box_to_model_grid([3, 10, 0, 40, 5, 7], crop_lo, cropped, model)
    assert list(b) == [1, 17, 0, 30, 6, 12]


def test_paint_point_ball_and_box():
    ch = np.zeros((20, 20, 20), np.float32)
    paint_prompt(ch, "point", [10, 10, 10])
    assert ch.sum() == 739 and ch[10, 10, 15] == 1 and ch[10, 10, 16] == 0 and ch[10, 14, 13] == 1
    ch2 = np.zeros((20, 20, 20), np.float32)
    paint_prompt(ch2, "point", [1, 10, 10])  # clipped at the border
    assert ch2[0, 10, 10] == 1 and ch2.sum() < 739
    ch3 = np.zeros((20, 20, 20), np.float32)
    paint_prompt(ch3, "box", [2, 5, 3, 8, 4, 6], offset=(1, 1, 1))
    assert ch3.sum() == 3 * 5 * 2 and ch3[1, 2, 3] == 1 and ch3[3, 6, 4] == 1
    assert ch3[4, 6, 4] == 0 and ch3[3, 6, 5] == 0


def test_upstream_json_strings_numbers_and_odd_ids(tmp_path):
    p = tmp_path / "case.json"
    p.write_text(json.dumps({"1": {"point": ["166.01", "361.74", 162.64]}, "3": {"box": [1, 5, "2", 9, 3, 7]},
                             "lesion_a": {"point": [1, 2, 3]}}))
    prompts = read_prompt_file(p)
    assert [(q.id, q.kind, q.name) for q in prompts] == [(1, "point", "1"), (3, "box", "3"), (4, "point", "lesion_a")]
    assert prompts[0].coords == [166.01, 361.74, 162.64]
    out = write_upstream_json(prompts[:2], tmp_path / "back.json")
    again = read_prompt_file(out)
    assert again[0].coords == prompts[0].coords and again[1].coords == [1, 5, 2, 9, 3, 7]


@pytest.mark.parametrize("content, message", [
    ("", "not valid JSON"),
    ("{}", "no prompts found"),
    ('{"1": {"centre": [1, 2, 3]}}', "has neither 'point' nor 'box'"),
    ('{"1": {"point": [1, 2]}}', "a point needs 3 values, got 2"),
    ('{"1": {"box": ["a", 1, 2, 3, 4, 5]}}', "box values must be numbers"),
])
def test_malformed_prompt_files(tmp_path, content, message):
    p = tmp_path / "bad.json"
    p.write_text(content)
    with pytest.raises(PromptError, match=message):
        read_prompt_file(p)


def test_world_json_round_trip(tmp_path):
    write_world_json([Point(2, (1.5, -3.0, 40.0)), Box(5, (0, 1, 2), (3, 4, 5))], tmp_path / "w.json")
    back = read_prompt_file(tmp_path / "w.json")
    assert isinstance(back[0], Point) and back[0].id == 2 and back[0].xyz == (1.5, -3.0, 40.0)
    assert isinstance(back[1], Box) and back[1].lower == (0, 1, 2) and back[1].upper == (3, 4, 5)


def test_world_point_lands_on_the_named_voxel_of_an_oblique_anisotropic_image():
    img, _ = ct_phantom(**OBLIQUE)
    target = (13, 7, 22)
    world = img.index_to_world(np.array(target, float) + [0.3, -0.2, 0.4])  # inside that voxel
    vp = to_voxel_prompt(Point(1, tuple(world)), img)
    assert tuple(np.round(vp.coords).astype(int)) == target
    # a world box around voxels (z 4..6, y 10..14, x 3..8) selects exactly those voxel centres
    corners = img.index_to_world(np.array([[4, 10, 3], [6, 14, 8]], float))
    box = to_voxel_prompt(Box.from_points(2, corners), img)
    assert box.coords[0] <= 4 and box.coords[1] >= 7 and box.coords[2] <= 10 and box.coords[3] >= 15


def test_prompt_outside_the_image_names_id_coordinates_and_extent():
    img, _ = ct_phantom(**OBLIQUE)
    outside = img.index_to_world([25.0, 5.0, 5.0])
    with pytest.raises(PromptError, match=r"prompt 7: point at voxel \(z, y, x\) = \(25\.0, 5\.0, 5\.0\).*"
                       r"outside the image; image size \(z, y, x\) = \(20, 40, 30\) voxels, LPS extent"):
        to_voxel_prompt(Point(7, tuple(outside)), img)
    with pytest.raises(PromptError, match=r"prompt 3: box .* does not overlap the image"):
        to_voxel_prompt(VoxelPrompt(3, "box", [30, 40, 0, 5, 0, 5]), img)
    with pytest.raises(PromptError, match=r"prompt 4: empty box"):
        to_voxel_prompt(VoxelPrompt(4, "box", [5, 5, 0, 5, 0, 5]), img)


def test_prompts_from_instance_and_binary_labels():
    lab = np.zeros((10, 20, 20), np.uint8)
    lab[2:5, 3:8, 4:6] = 3
    lab[6:9, 10:12, 10:15] = 7
    pts = prompts_from_labels(lab, "point", "instance")
    assert [p.id for p in pts] == [3, 7]
    assert np.allclose(pts[0].coords, [3.0, 5.0, 4.5])
    boxes = prompts_from_labels(lab, "box", "instance")
    assert boxes[1].coords == [6, 9, 10, 12, 10, 15]
    semantic = prompts_from_labels(lab > 0, "box", "semantic")
    assert [b.coords for b in semantic] == [[2, 5, 3, 8, 4, 6], [6, 9, 10, 12, 10, 15]]
    with pytest.raises(PromptError, match="the label image is empty"):
        prompts_from_labels(np.zeros((3, 3, 3)), "point")


def test_image_rejects_wrong_array_shape():
    img = Image(np.zeros((2, 3, 4)))
    with pytest.raises(ImageError, match=r"array shape \(3, 3, 4\) does not match image shape \(2, 3, 4\)"):
        img.with_array(np.zeros((3, 3, 4)))


def test_written_files_get_normal_permissions(tmp_path):
    import os
    import stat
    img, _ = ct_phantom(**OBLIQUE)
    path = write_image(img, tmp_path / "p.nii.gz")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
