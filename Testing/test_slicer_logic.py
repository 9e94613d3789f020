"""The Slicer module's Logic on a real MRML scene (slicer-core), without the Slicer application.

Geometry tests use a recording runner that paints a known mask at the voxel the library
would use, so they can assert exact voxels; the end-to-end tests run the tiny random-weight
model through the in-process runner and compare with the library called directly.
"""
import importlib.util
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

import slicer
import slicer.util
import vtk

from LesionLocatorLib.image import Image
from LesionLocatorLib.model import ModelLayoutError, load_model
from LesionLocatorLib.predict import CancelToken, Cancelled, segment as library_segment
from LesionLocatorLib.prompts import Box, Point, PromptError, to_voxel_prompt
from LesionLocatorLib.runner import InProcessRunner, SegmentationResponse, SegmentationRunner
pytest_plugins = ["slicer_harness"]  # fixtures: slicer_scene, lesionlocator_module

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "LesionLocator"

SHAPE = (20, 40, 36)  # (k, j, i)
SPACING = (0.9, 1.2, 2.5)  # i, j, k in mm
LESION = (10, 20, 18)  # (k, j, i)


# ------------------------------------------------------------------------------ helpers
def _rotation(axis, degrees):
    t = vtk.vtkTransform()
    t.RotateWXYZ(degrees, *axis)
    return slicer.util.arrayFromVTKMatrix(t.GetMatrix())[:3, :3]


def _ct_array(seed=0):
    """CT-like (k, j, i) int16: air, a body ellipse, a 7 mm lesion at LESION, noise."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    array = np.full(SHAPE, -1000.0)
    array[((j - 19.5) / 17) ** 2 + ((i - 17.5) / 16) ** 2 <= 1] = 40
    lesion = (((k - LESION[0]) * SPACING[2]) ** 2 + ((j - LESION[1]) * SPACING[1]) ** 2
              + ((i - LESION[2]) * SPACING[0]) ** 2) <= 7.0 ** 2
    array[lesion] = 130
    return (array + rng.normal(0, 10, SHAPE)).astype(np.int16)


def _ijk_to_ras(origin=(-20.0, 15.0, 40.0)):
    """Oblique and anisotropic: rotated 25 degrees about an oblique axis, spacing 0.9/1.2/2.5 mm."""
    m = np.eye(4)
    m[:3, :3] = _rotation((1, 0.5, 0.3), 25) @ np.diag(SPACING)
    m[:3, 3] = origin
    return m


def _rigid(axis, degrees, translation):
    m = np.eye(4)
    m[:3, :3] = _rotation(axis, degrees)
    m[:3, 3] = translation
    return m


def _oblique_volume(h, name="CT", transformed=True):
    """The test CT under two nested linear parent transforms (rotations + translations)."""
    volume = h.add_volume(_ct_array(), _ijk_to_ras(), name)
    if transformed:
        outer = h.add_linear_transform(_rigid((0, 0, 1), -12, (3.0, -4.0, 6.0)), "outer")
        inner = h.add_linear_transform(_rigid((1, 0, 0), 17, (5.0, -7.0, 12.0)), "inner", parent=outer)
        volume.SetAndObserveTransformNodeID(inner.GetID())
    return volume


def _world_ras_of_voxel(volume, kji):
    """World RAS of a voxel centre, through MRML's own transform code."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    local = ijk_to_ras.MultiplyPoint([kji[2], kji[1], kji[0], 1.0])[:3]
    world = [0.0, 0.0, 0.0]
    volume.TransformPointToWorld(local, world)
    return np.array(world)


def _hardened_lps_geometry(h, volume):
    """Independent geometry: a copy of the volume with its transform hardened by MRML (C++),
    then RAS -> LPS. Returns (origin, spacing, direction) in the library's conventions."""
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    copy = h.add_volume(np.zeros(SHAPE, np.int16), slicer.util.arrayFromVTKMatrix(m), "hardened copy")
    copy.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    slicer.vtkSlicerTransformLogic.hardenTransform(copy)
    copy.GetIJKToRASMatrix(m)
    ijk_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ slicer.util.arrayFromVTKMatrix(m)
    h.scene.RemoveNode(copy)
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    return ijk_to_lps[:3, 3], spacing, ijk_to_lps[:3, :3] / spacing


def _points(h, world_positions, name="clicks", transform=None):
    node = h.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    if transform is not None:
        node.SetAndObserveTransformNodeID(transform.GetID())
    for p in world_positions:
        node.AddControlPointWorld(list(map(float, p)))
    return node


def _segment_array(node, segment_id, volume):
    return slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume) > 0


def _segments(node):
    seg = node.GetSegmentation()
    return {sid: (seg.GetSegment(sid).GetName(), tuple(round(c, 4) for c in seg.GetSegment(sid).GetColor()))
            for sid in seg.GetSegmentIDs()}


class PaintingRunner:
    """A SegmentationRunner that records requests and answers with a known mask per prompt:
    a ball of radius 2 voxels around the rounded prompt voxel (points) or the voxel box (boxes),
    computed with the library's own world -> voxel mapping."""

    def __init__(self):
        self.requests = []
        self.loads = 0

    def run(self, request, progress=None, cancel=None):
        self.requests.append(request)
        image = request.image
        masks = {}
        for p in request.prompts:
            vp = to_voxel_prompt(p, image)
            mask = np.zeros(image.shape, bool)
            if vp.kind == "point":
                c = np.round(vp.coords).astype(int)
                zz, yy, xx = np.ogrid[:image.shape[0], :image.shape[1], :image.shape[2]]
                mask[(zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 4] = True
            else:
                b = np.clip(np.asarray(vp.coords).reshape(3, 2), 0, np.asarray(image.shape)[:, None])
                mask[b[0, 0]:b[0, 1], b[1, 0]:b[1, 1], b[2, 0]:b[2, 1]] = True
            masks[p.id] = mask
            if progress:
                progress(len(masks) / len(request.prompts), "painted")
            if cancel is not None:
                cancel.check()
        return SegmentationResponse(request.id, masks)

    def close(self):
        pass

    def voxels(self, n=-1):
        """Rounded prompt voxels (k, j, i) of request n, by prompt ID."""
        req = self.requests[n]
        return {p.id: tuple(int(v) for v in np.round(req.image.world_to_index(p.xyz)))
                for p in req.prompts if isinstance(p, Point)}


@pytest.fixture
def LL(lesionlocator_module):
    return lesionlocator_module


@pytest.fixture
def painting(LL):
    runner = PaintingRunner()
    return LL.LesionLocatorLogic(runner=runner), runner


# ------------------------------------------------------------------------------ (a) geometry
@pytest.mark.parametrize("voxel", [LESION, (0, 0, 0), (19, 39, 35), (3, 31, 7)])
def test_click_in_world_ras_lands_on_the_clicked_voxel(slicer_scene, painting, voxel):
    h = slicer_scene
    logic, runner = painting
    volume = _oblique_volume(h)
    points = _points(h, [_world_ras_of_voxel(volume, voxel)])

    result = logic.segment(volume, points, modelPath="unused-by-this-runner")

    image = runner.requests[-1].image
    assert runner.voxels() == {1: voxel}
    origin, spacing, direction = _hardened_lps_geometry(h, volume)
    assert image.shape == SHAPE
    assert np.allclose(image.origin, origin, atol=1e-6)
    assert np.allclose(image.spacing, spacing, atol=1e-9) and np.allclose(image.spacing, SPACING)
    assert np.allclose(image.direction, direction, atol=1e-9)
    assert np.array_equal(image.array, slicer.util.arrayFromVolume(volume))
    # the mask comes back onto the same voxels, centred on the click
    mask = _segment_array(result, "lesion_1", volume)
    assert np.array_equal(mask, runner_mask := _ball(voxel))
    assert mask[voxel] and runner_mask.sum() > 1
    assert result.GetTransformNodeID() == volume.GetTransformNodeID()


def _ball(kji, radius2=4):
    zz, yy, xx = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    return (zz - kji[0]) ** 2 + (yy - kji[1]) ** 2 + (xx - kji[2]) ** 2 <= radius2


def test_markup_under_its_own_parent_transform(slicer_scene, painting):
    h = slicer_scene
    logic, runner = painting
    volume = _oblique_volume(h)
    markup_transform = h.add_linear_transform(_rigid((0.3, 1, 0), 40, (-30.0, 8.0, 2.0)), "markup transform")
    points = _points(h, [_world_ras_of_voxel(volume, LESION), _world_ras_of_voxel(volume, (5, 9, 30))],
                     transform=markup_transform)
    local = np.array(points.GetNthControlPointPosition(0))
    assert np.linalg.norm(local - _world_ras_of_voxel(volume, LESION)) > 10, "the markup transform must matter"

    result = logic.segment(volume, points, modelPath="unused")

    assert runner.voxels() == {1: LESION, 2: (5, 9, 30)}
    assert _segment_array(result, "lesion_1", volume)[LESION]
    assert _segment_array(result, "lesion_2", volume)[(5, 9, 30)]


def test_rotated_roi_under_transform_becomes_the_world_box_around_its_corners(slicer_scene, painting):
    h = slicer_scene
    logic, runner = painting
    volume = _oblique_volume(h)
    roi_transform = h.add_linear_transform(_rigid((0, 1, 0), 20, (4.0, 0.0, -3.0)), "roi transform")
    roi = h.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetAndObserveTransformNodeID(roi_transform.GetID())
    roi.SetSize(12.0, 9.0, 15.0)
    object_to_node = vtk.vtkTransform()
    object_to_node.RotateZ(30)
    object_to_node.PostMultiply()
    local_center = [0.0, 0.0, 0.0]
    roi_transform.GetTransformFromParent().TransformPoint(list(_world_ras_of_voxel(volume, LESION)), local_center)
    object_to_node.Translate(*local_center)
    roi.SetAndObserveObjectToNodeMatrix(object_to_node.GetMatrix())

    result = logic.segment(volume, roi, modelPath="unused")

    box = runner.requests[-1].prompts[0]
    assert isinstance(box, Box) and box.id == 1
    # expected: the LPS axis-aligned box around the ROI's 8 world corners (MRML's object-to-world)
    object_to_world = slicer.util.arrayFromVTKMatrix(roi.GetObjectToWorldMatrix())
    signs = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    corners = (np.c_[signs * np.array(roi.GetSize()), np.ones(8)] @ object_to_world.T)[:, :3] * [-1, -1, 1]
    assert np.allclose(box.lower, corners.min(0), atol=1e-6)
    assert np.allclose(box.upper, corners.max(0), atol=1e-6)
    # every voxel whose centre MRML finds inside the ROI is inside the segmented box
    mask = _segment_array(result, "lesion_1", volume)
    inside = [(k, j, i) for k in range(SHAPE[0]) for j in range(0, SHAPE[1], 3) for i in range(0, SHAPE[2], 3)
              if roi.IsPointInROIWorld(list(_world_ras_of_voxel(volume, (k, j, i))))]
    assert len(inside) > 10 and all(mask[v] for v in inside)


def test_real_model_result_equals_the_library_on_the_hardened_volume(slicer_scene, LL, tiny_model_root):
    h = slicer_scene
    logic = LL.LesionLocatorLogic()
    volume = _oblique_volume(h)
    click = _world_ras_of_voxel(volume, LESION)
    points = _points(h, [click])

    result = logic.segment(volume, points, modelPath=str(tiny_model_root), device="cpu")

    origin, spacing, direction = _hardened_lps_geometry(h, volume)
    image = Image(slicer.util.arrayFromVolume(volume).copy(), spacing, origin, direction)
    expected = library_segment(image, [Point(1, tuple(click * [-1, -1, 1]))],
                               load_model(tiny_model_root, "point", device="cpu")).masks[1]
    assert expected.sum() > 50, "the random model must segment something for the comparison to mean anything"
    assert np.array_equal(_segment_array(result, "lesion_1", volume), expected)
    assert result.GetName() == "CT lesions"
    assert LL.LesionLocatorLogic.isResultNode(result)
    assert result.GetNodeReferenceID(result.GetReferenceImageGeometryReferenceRole()) == volume.GetID()
    assert result.GetTransformNodeID() == volume.GetTransformNodeID()


def test_non_linear_volume_transform_asks_to_harden_and_points_follow_non_linear_transforms(
        slicer_scene, painting, LL):
    h = slicer_scene
    logic, runner = painting
    volume = _oblique_volume(h, transformed=False)
    tps = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p in [(-50, -50, 0), (50, -50, 0), (0, 50, 0), (0, 0, 80), (10, 10, 40)]:
        source.InsertNextPoint(p)
        target.InsertNextPoint(p[0] + 0.1 * p[2], p[1] - 0.05 * p[0], p[2] + 3)
    tps.SetSourceLandmarks(source)
    tps.SetTargetLandmarks(target)
    tps.SetBasisToR()
    warp = h.scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
    warp.SetAndObserveTransformToParent(tps)
    assert not warp.IsTransformToWorldLinear()

    points = _points(h, [_world_ras_of_voxel(volume, LESION)], transform=warp)
    before = h.node_ids()
    volume.SetAndObserveTransformNodeID(warp.GetID())
    with pytest.raises(LL.TransformError, match="Harden the transform"):
        logic.segment(volume, points, modelPath="unused")
    assert h.node_ids() == before

    volume.SetAndObserveTransformNodeID(None)
    logic.segment(volume, points, modelPath="unused")  # the point: mapped exactly through the warp
    world = np.array(points.GetNthControlPointPositionWorld(0))
    assert np.allclose(runner.requests[-1].prompts[0].xyz, world * [-1, -1, 1], atol=1e-6)
    assert runner.voxels() == {1: LESION}


# ------------------------------------------------------------------------------ (b) identity
def test_resegmenting_keeps_segment_ids_names_and_colours(slicer_scene, painting, LL):
    h = slicer_scene
    logic, runner = painting
    volume = _oblique_volume(h)
    points = _points(h, [_world_ras_of_voxel(volume, LESION), _world_ras_of_voxel(volume, (5, 9, 30))])

    node = logic.segment(volume, points, modelPath="unused")
    colors = LL.LesionLocatorLogic.COLORS
    assert _segments(node) == {"lesion_1": ("Lesion 1", tuple(round(c, 4) for c in colors[0])),
                               "lesion_2": ("Lesion 2", tuple(round(c, 4) for c in colors[1]))}
    node.GetSegmentation().GetSegment("lesion_1").SetName("Liver metastasis")  # the user renames it
    lesion2 = _segment_array(node, "lesion_2", volume)

    # move point 1 and segment only that point: lesion_1 changes, keeps its name and colour
    points.SetNthControlPointPositionWorld(0, list(_world_ras_of_voxel(volume, (12, 22, 16))))
    again = logic.segment(volume, (points, 0), modelPath="unused")
    assert again is node
    assert _segments(node)["lesion_1"] == ("Liver metastasis", tuple(round(c, 4) for c in colors[0]))
    assert np.array_equal(_segment_array(node, "lesion_1", volume), _ball((12, 22, 16)))
    assert np.array_equal(_segment_array(node, "lesion_2", volume), lesion2)

    # control point IDs are stable: delete point 1, add a point -> lesion 2 stays lesion 2, new one is 3
    points.RemoveNthControlPoint(0)
    points.AddControlPointWorld(list(_world_ras_of_voxel(volume, (15, 30, 10))))
    logic.segment(volume, points, modelPath="unused")
    assert sorted(node.GetSegmentation().GetSegmentIDs()) == ["lesion_1", "lesion_2", "lesion_3"]
    assert [p.id for p in runner.requests[-1].prompts] == [2, 3]
    assert _segments(node)["lesion_3"] == ("Lesion 3", tuple(round(c, 4) for c in colors[2]))
    assert np.array_equal(_segment_array(node, "lesion_1", volume), _ball((12, 22, 16)))

    # an explicit lesion ID redoes that lesion with a new click
    other = _points(h, [_world_ras_of_voxel(volume, (9, 18, 20))], name="correction")
    logic.segment(volume, other, modelPath="unused", lesionIds=[1])
    assert np.array_equal(_segment_array(node, "lesion_1", volume), _ball((9, 18, 20)))
    assert _segments(node)["lesion_1"][0] == "Liver metastasis"
    assert len(LL.slicer.util.getNodesByClass("vtkMRMLSegmentationNode")) == 1


def test_repeated_clicks_reuse_the_loaded_model(slicer_scene, LL, tiny_model_root):
    h = slicer_scene
    logic = LL.LesionLocatorLogic()
    volume = _oblique_volume(h)
    points = _points(h, [_world_ras_of_voxel(volume, LESION)])
    logic.segment(volume, points, modelPath=str(tiny_model_root), device="cpu")
    logic.segment(volume, points, modelPath=str(tiny_model_root), device="cpu")
    assert logic.runner.loads == 1
    logic.segment(volume, points, modelPath=str(tiny_model_root), device="cpu", folds="0")
    assert logic.runner.loads == 2  # a different model spec is a different model
    assert isinstance(logic.runner, SegmentationRunner) and isinstance(logic.runner, InProcessRunner)


def test_mixed_points_and_box_use_both_models(slicer_scene, LL, tiny_model_root):
    h = slicer_scene
    logic = LL.LesionLocatorLogic()
    volume = _oblique_volume(h)
    points = _points(h, [_world_ras_of_voxel(volume, LESION)])
    roi = h.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(*_world_ras_of_voxel(volume, (6, 12, 10)))
    roi.SetSize(10.0, 10.0, 10.0)
    node = logic.segment(volume, [points, roi], modelPath=str(tiny_model_root), device="cpu")
    assert sorted(node.GetSegmentation().GetSegmentIDs()) == ["lesion_1", "lesion_2"]
    tags = {sid: vtk.reference("") for sid in ("lesion_1", "lesion_2")}
    for sid, ref in tags.items():
        node.GetSegmentation().GetSegment(sid).GetTag("LesionLocator.PromptType", ref)
    assert {sid: str(ref) for sid, ref in tags.items()} == {"lesion_1": "point", "lesion_2": "box"}
    assert logic.runner.loads == 2


# ------------------------------------------------------------------------------ (c) user data
def _user_segmentation(h, volume):
    user = h.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My segmentation")
    user.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    user.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
    user.GetSegmentation().AddEmptySegment("lesion_1", "My tumour", [0.1, 0.2, 0.3])
    mask = np.zeros(SHAPE, np.uint8)
    mask[8:12, 15:25, 14:22] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, user, "lesion_1", volume)
    return user, mask.astype(bool)


def test_user_segmentation_is_never_written_to(slicer_scene, painting, LL):
    h = slicer_scene
    logic, _ = painting
    volume = _oblique_volume(h)
    user, user_mask = _user_segmentation(h, volume)
    points = _points(h, [_world_ras_of_voxel(volume, LESION)])
    user_mtime = user.GetSegmentation().GetSegment("lesion_1").GetMTime()

    result = logic.segment(volume, points, modelPath="unused", segmentationNode=user)

    assert result is not user and LL.LesionLocatorLogic.isResultNode(result)
    assert not LL.LesionLocatorLogic.isResultNode(user)
    assert _segments(user) == {"lesion_1": ("My tumour", (0.1, 0.2, 0.3))}
    assert np.array_equal(_segment_array(user, "lesion_1", volume), user_mask)
    assert user.GetSegmentation().GetSegment("lesion_1").GetMTime() == user_mtime
    assert user.GetName() == "My segmentation"


def test_user_segment_inside_the_module_node_is_never_overwritten(slicer_scene, painting, LL):
    h = slicer_scene
    logic, runner = painting
    volume = _oblique_volume(h)
    points = _points(h, [_world_ras_of_voxel(volume, LESION)])
    node = logic.segment(volume, points, modelPath="unused")
    # the user adds segments by hand, one of them with the ID the module would pick next
    user_mask = np.zeros(SHAPE, np.uint8)
    user_mask[2:5, 30:35, 2:6] = 1
    for sid, name in (("Segment_1", "Kidney"), ("lesion_2", "Hand-drawn")):
        node.GetSegmentation().AddEmptySegment(sid, name, [0.4, 0.6, 0.8])
        slicer.util.updateSegmentBinaryLabelmapFromArray(user_mask, node, sid, volume)

    points.AddControlPointWorld(list(_world_ras_of_voxel(volume, (5, 9, 30))))
    logic.segment(volume, points, modelPath="unused")

    assert [p.id for p in runner.requests[-1].prompts] == [1, 3]  # lesion 2's ID is taken by the user
    for sid, name in (("Segment_1", "Kidney"), ("lesion_2", "Hand-drawn")):
        assert _segments(node)[sid] == (name, (0.4, 0.6, 0.8))
        assert np.array_equal(_segment_array(node, sid, volume), user_mask.astype(bool))
    with pytest.raises(ValueError, match="not made by LesionLocator"):
        logic.segment(volume, (points, 0), modelPath="unused", lesionIds=[2])
    assert np.array_equal(_segment_array(node, "lesion_2", volume), user_mask.astype(bool))


def test_refine_from_segment(slicer_scene, painting, LL):
    h = slicer_scene
    logic, runner = painting
    volume = _oblique_volume(h)
    user, user_mask = _user_segmentation(h, volume)

    # from a user's segment: a new lesion in the module's node, the user's segment untouched
    node = logic.refineFromSegment(volume, user, "lesion_1", modelPath="unused")
    box = runner.requests[-1].prompts[0]
    vp = to_voxel_prompt(box, runner.requests[-1].image)
    hits = np.argwhere(user_mask)
    lo, hi = np.asarray(vp.coords).reshape(3, 2).T
    assert np.all(lo <= hits.min(0)) and np.all(hi >= hits.max(0) + 1)  # the box holds the segment
    assert node is not user and sorted(node.GetSegmentation().GetSegmentIDs()) == ["lesion_1"]
    assert np.array_equal(_segment_array(user, "lesion_1", volume), user_mask)

    # from the module's own lesion: replaced in place
    points = _points(h, [_world_ras_of_voxel(volume, (5, 9, 30))])
    logic.segment(volume, points, modelPath="unused")
    before = _segments(node)
    again = logic.refineFromSegment(volume, node, "lesion_2", modelPath="unused")
    assert again is node and _segments(node) == before
    assert [p.id for p in runner.requests[-1].prompts] == [2]
    with pytest.raises(PromptError, match="empty"):
        node.GetSegmentation().AddEmptySegment("nothing", "Nothing")
        logic.refineFromSegment(volume, node, "nothing", modelPath="unused")


def test_result_goes_beside_the_volume_in_the_subject_hierarchy(slicer_scene, painting):
    h = slicer_scene
    logic, _ = painting
    volume = _oblique_volume(h)
    sh = h.scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Baseline study")
    sh.SetItemParent(sh.GetItemByDataNode(volume), study)
    node = logic.segment(volume, _points(h, [_world_ras_of_voxel(volume, LESION)]), modelPath="unused")
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study


# ------------------------------------------------------------------------------ (d) errors
def test_prompt_outside_the_volume_raises_the_library_message_and_changes_nothing(
        slicer_scene, LL, tiny_model_root):
    h = slicer_scene
    logic = LL.LesionLocatorLogic()
    volume = _oblique_volume(h)
    points = _points(h, [_world_ras_of_voxel(volume, LESION)])
    node = logic.segment(volume, points, modelPath=str(tiny_model_root), device="cpu")
    segments, lesion = _segments(node), _segment_array(node, "lesion_1", volume)
    points.AddControlPointWorld([400.0, 400.0, 400.0])
    before = h.node_ids()
    with pytest.raises(PromptError, match=r"prompt 2: point at voxel .* is outside the image"):
        logic.segment(volume, points, modelPath=str(tiny_model_root), device="cpu")
    assert h.node_ids() == before
    assert _segments(node) == segments and np.array_equal(_segment_array(node, "lesion_1", volume), lesion)


def test_missing_model_folder_raises_model_layout_error(slicer_scene, LL, tmp_path):
    h = slicer_scene
    logic = LL.LesionLocatorLogic()
    volume = _oblique_volume(h)
    points = _points(h, [_world_ras_of_voxel(volume, LESION)])
    before = h.node_ids()
    with pytest.raises(ModelLayoutError, match="model folder not found"):
        logic.segment(volume, points, modelPath=str(tmp_path / "nowhere"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLayoutError, match="no 'point' model"):
        logic.segment(volume, points, modelPath=str(tmp_path / "empty"), device="cpu")
    if logic.defaultModelPath() is None:
        with pytest.raises(ModelLayoutError, match="no model folder given"):
            logic.segment(volume, points)
    assert h.node_ids() == before


def test_bad_inputs_raise_clear_errors(slicer_scene, painting, LL):
    h = slicer_scene
    logic, _ = painting
    volume = _oblique_volume(h)
    empty = h.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "nothing")
    label = h.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    before = h.node_ids()
    with pytest.raises(ValueError, match="no placed control points"):
        logic.segment(volume, empty, modelPath="unused")
    with pytest.raises(ValueError, match="no prompt given"):
        logic.segment(volume, None, modelPath="unused")
    with pytest.raises(ValueError, match="scalar"):
        logic.segment(label, empty, modelPath="unused")
    with pytest.raises(ValueError, match="is not a prompt"):
        logic.segment(volume, volume, modelPath="unused")
    with pytest.raises(ValueError, match="folds must be numbers"):
        logic.segment(volume, _points(h, [_world_ras_of_voxel(volume, LESION)]), modelPath="x", folds="a,b")
    assert set(before) <= set(h.node_ids())


def test_dependency_check_names_what_is_missing(LL, monkeypatch):
    Logic = LL.LesionLocatorLogic
    assert Logic.checkDependencies() is None
    real = importlib.util.find_spec
    monkeypatch.setattr(LL.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "nnunetv2") else real(name, *a))
    message = Logic.checkDependencies()
    assert "torch, nnunetv2" in message and "PyTorch extension" in message and "nnunetv2>=2.8" in message
    assert Logic.pipRequirements(Logic.missingPackages()) == ["nnunetv2>=2.8"]
    with pytest.raises(LL.MissingDependencyError, match="torch"):
        Logic(runner=PaintingRunner()).segment(None, None)


def test_module_file_loads_without_importing_torch():
    code = ("import sys; sys.path.insert(0, 'Testing'); import slicer_harness; "
            "slicer_harness.import_module_file(); "
            "assert 'torch' not in sys.modules and 'nnunetv2' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ------------------------------------------------------------------------------ (e) cancel
def test_cancel_stops_and_leaves_the_scene_unchanged(slicer_scene, LL, tiny_model_root):
    h = slicer_scene
    logic = LL.LesionLocatorLogic()
    volume = _oblique_volume(h)
    points = _points(h, [_world_ras_of_voxel(volume, v) for v in (LESION, (5, 9, 30), (15, 30, 10))])
    before = h.node_ids()
    token = CancelToken()
    messages = []

    def progress(fraction, message):  # cancel after the first network batch (2 of 3 patches)
        messages.append(message)
        if message == "patch 2/3":
            token.cancel()

    with pytest.raises(Cancelled):
        logic.segment(volume, points, modelPath=str(tiny_model_root), device="cpu", progress=progress, cancel=token)
    assert "patch 2/3" in messages and "patch 3/3" not in messages
    assert h.node_ids() == before

    # the Logic's own cancel() (what the Cancel button calls) while the network runs
    node = logic.segment(volume, (points, 0), modelPath=str(tiny_model_root), device="cpu")
    segments, lesion = _segments(node), _segment_array(node, "lesion_1", volume)
    before = h.node_ids()
    with pytest.raises(Cancelled):
        logic.segment(volume, points, modelPath=str(tiny_model_root), device="cpu",
                      progress=lambda f, m: logic.cancel() if m == "patch 2/3" else None)
    assert h.node_ids() == before
    assert _segments(node) == segments and np.array_equal(_segment_array(node, "lesion_1", volume), lesion)


# ------------------------------------------------------------------------------ worker process
def test_worker_process_runner(slicer_scene, LL, tiny_model_root):
    """The same Logic calls through a persistent worker process: same segments, model kept
    loaded, the library's errors with their messages, cancel, restart after a crash."""
    import os
    import signal

    from LesionLocatorLib.runner import WorkerProcessRunner

    h = slicer_scene
    volume = _oblique_volume(h)
    points = _points(h, [_world_ras_of_voxel(volume, v) for v in (LESION, (5, 9, 30), (15, 30, 10))])
    model = str(tiny_model_root)
    reference = LL.LesionLocatorLogic().segment(volume, points, modelPath=model, device="cpu")
    expected = {sid: _segment_array(reference, sid, volume) for sid in reference.GetSegmentation().GetSegmentIDs()}
    h.scene.RemoveNode(reference)

    logic = LL.LesionLocatorLogic()
    logic.useWorkerProcess()
    try:
        assert isinstance(logic.runner, WorkerProcessRunner) and isinstance(logic.runner, SegmentationRunner)
        calls = []
        node = logic.segment(volume, points, modelPath=model, device="cpu", progress=lambda f, m: calls.append(m))
        assert all(np.array_equal(_segment_array(node, sid, volume), expected[sid]) for sid in expected)
        assert "patch 2/3" in calls and logic.runner.info["protocol"] == "lesionlocator-runner/1"
        pid = logic.runner.pid
        logic.segment(volume, (points, 0), modelPath=model, device="cpu")
        assert logic.runner.loads == 1 and logic.runner.pid == pid  # the model stayed loaded in the worker

        segments, lesion = _segments(node), _segment_array(node, "lesion_1", volume)
        outside = _points(h, [(400.0, 400.0, 400.0)], name="outside")
        before = h.node_ids()
        with pytest.raises(PromptError, match=r"prompt 4: point at voxel .* is outside the image"):
            logic.segment(volume, outside, modelPath=model, device="cpu")
        with pytest.raises(ModelLayoutError, match="model folder not found"):
            logic.segment(volume, points, modelPath=model + "_missing", device="cpu")
        # 30 lesions = 15 network batches: Cancel after the first reaches the worker long before the end
        many = _points(h, [_world_ras_of_voxel(volume, (k, j, i)) for k in (4, 10, 16) for j in range(6, 36, 6)
                           for i in (8, 26)], name="many")
        before, seen = h.node_ids(), []

        def cancel_after_first_batch(fraction, message):
            seen.append(message)
            if message == "patch 2/30":
                logic.cancel()

        with pytest.raises(Cancelled):
            logic.segment(volume, many, modelPath=model, device="cpu", progress=cancel_after_first_batch)
        assert "patch 2/30" in seen and "patch 30/30" not in seen
        assert h.node_ids() == before and _segments(node) == segments
        assert np.array_equal(_segment_array(node, "lesion_1", volume), lesion)
        assert logic.runner.pid == pid, "errors and cancel keep the worker"

        os.kill(pid, signal.SIGKILL)  # a crashed worker is restarted for the next request
        logic.runner._process.wait(timeout=10)
        logic.segment(volume, (points, 1), modelPath=model, device="cpu")
        assert logic.runner.pid not in (None, pid)
    finally:
        logic.cleanup()
    assert logic._runner is None


# ------------------------------------------------------------------------------ (f) files
EXPECTED_WIDGET_CLASSES = {
    "baselineVolumeSelector": "qMRMLNodeComboBox",
    "followUpList": "QListWidget",
    "modelPathLineEdit": "ctkPathLineEdit",
    "deviceComboBox": "QComboBox",
    "foldsLineEdit": "QLineEdit",
    "ttaCheckBox": "QCheckBox",
    "promptNodeSelector": "qMRMLNodeComboBox",
    "placePointButton": "QPushButton",
    "placeBoxButton": "QPushButton",
    "autoSegmentCheckBox": "QCheckBox",
    "segmentButton": "QPushButton",
    "refineSegmentSelector": "qMRMLSegmentSelectorWidget",
    "refineButton": "QPushButton",
    "trackButton": "QPushButton",
    "cancelButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "resultsTableView": "qMRMLTableView",
    "installDependenciesButton": "QPushButton",
}


def _ui_widgets():
    root = ET.parse(MODULE_DIR / "Resources" / "UI" / "LesionLocator.ui").getroot()
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    custom = {c.findtext("class"): c.findtext("header") for c in root.iter("customwidget")}
    return root, widgets, custom


def test_every_widget_the_module_uses_exists_in_the_ui_with_the_expected_class():
    root, widgets, custom = _ui_widgets()
    source = (MODULE_DIR / "LesionLocator.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the Widget must use the .ui"
    missing = sorted(used - set(widgets))
    assert not missing, f"used in LesionLocator.py but not in the .ui: {missing}"
    for name, cls in EXPECTED_WIDGET_CLASSES.items():
        assert widgets.get(name) == cls, f"{name}: {widgets.get(name)} in the .ui, expected {cls}"
    unused = sorted(set(EXPECTED_WIDGET_CLASSES) - used)
    assert unused == ["resultsTableView"], f"widgets the module should wire up: {unused}"  # table: next issue
    assert root.find("widget").get("class") == "qMRMLWidget"
    for cls in set(widgets.values()):
        if not cls.startswith("Q"):
            assert cls in custom and custom[cls] == cls + ".h", f"{cls} needs a <customwidget> entry"
    # the MRML widgets get the scene through the .ui's connections
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") ==
                 "setMRMLScene(vtkMRMLScene*)"}
    mrml_widgets = {n for n, c in widgets.items() if c.startswith("qMRML") and n != root.find("widget").get("name")}
    assert mrml_widgets <= receivers, sorted(mrml_widgets - receivers)


def _cmake_list(text, variable):
    found = re.search(r"set\(\s*" + variable + r"\s+(.*?)\)", text, re.S)
    assert found, f"set({variable} ...) not found"
    return [v for v in re.sub(r"#.*", "", found.group(1)).split()]


def test_cmakelists_lists_every_file_the_module_needs():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    library = _cmake_list(text, "LIBRARY_PYTHON_SCRIPTS")
    testing = _cmake_list(text, "TESTING_PYTHON_SCRIPTS")
    assert "${MODULE_NAME}.py" in scripts
    needed_resources = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    listed_resources = {r.replace("${MODULE_NAME}", "LesionLocator") for r in resources}
    assert needed_resources == listed_resources
    assert {"Resources/Icons/LesionLocator.png", "Resources/UI/LesionLocator.ui"} <= listed_resources
    library_files = {p.name for p in (REPO / "LesionLocatorLib").glob("*.py")}
    assert set(library) == library_files, (f"missing: {sorted(library_files - set(library))}, "
                                           f"not there: {sorted(set(library) - library_files)}")
    assert testing == ["build_test_models.py"] and (REPO / "Testing" / "build_test_models.py").is_file()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert "slicerMacroBuildScriptedModule" in text
    top = (REPO / "CMakeLists.txt").read_text()
    assert "add_subdirectory(LesionLocator)" in top and "set(EXTENSION_DEPENDS PyTorch)" in top
    for icon in (REPO / "LesionLocator.png", MODULE_DIR / "Resources" / "Icons" / "LesionLocator.png"):
        assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert icon.read_bytes()[16:24] == (128).to_bytes(4, "big") * 2  # 128 x 128


# ------------------------------------------------------------------------------ (g) self-test
def test_module_self_test_runs(slicer_scene, LL):
    module = LL.LesionLocator(type("Parent", (), {"path": str(MODULE_DIR / "LesionLocator.py")})())
    module.runTest()


def test_parameter_node_defaults(slicer_scene, LL):
    logic = LL.LesionLocatorLogic(runner=PaintingRunner())
    node = logic.getParameterNode()
    logic.setDefaultParameters(node)
    assert node.GetParameter("Device") == "auto" and node.GetParameter("TTA") == "auto"
    assert logic.getParameterNode() is node
    assert LL.LesionLocatorLogic.parseFolds(" 0, 2 ") == (0, 2)
    assert LL.LesionLocatorLogic.parseFolds("") is None and LL.LesionLocatorLogic.parseFolds("all") == ("all",)
