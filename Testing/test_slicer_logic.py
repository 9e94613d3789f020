"""The Slicer module's Logic on a real MRML scene (slicer-core), without the Slicer application.

Geometry tests use a recording runner that paints a known mask at the voxel the library
would use, so they can assert exact voxels; the end-to-end tests run the tiny random-weight
model through the in-process runner and compare with the library called directly.
"""
import importlib.util
import inspect
import os
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
from LesionLocatorLib.prompts import Box, MaskPrompt, Point, PromptError, to_voxel_prompt
from LesionLocatorLib.runner import InProcessRunner, SegmentationResponse, SegmentationRunner
pytest_plugins = ["slicer_harness"]  # fixtures: slicer_scene, lesionlocator_module
pytest.register_assert_rewrite("slicer_harness")
from slicer_harness import import_module_file  # noqa: E402
from slicer_cases import (ijk_to_ras_of as _ijk_to_ras_of, phantom_case as _phantom_case,  # noqa: E402,F401
                          points as _points, rigid as _rigid, rotation as _rotation,
                          volume_at_world_geometry as _volume_at_world_geometry)

import_module_file()  # puts LesionLocator/ on sys.path, as Slicer does
from LesionLocatorSlicer import logic as logic_module, models, results, scene  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "LesionLocator"

SHAPE = (20, 40, 36)  # (k, j, i)
SPACING = (0.9, 1.2, 2.5)  # i, j, k in mm
LESION = (10, 20, 18)  # (k, j, i)


# ------------------------------------------------------------------------------ helpers
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


def _segment_array(node, segment_id, volume):
    return slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume) > 0


def _segments(node):
    seg = node.GetSegmentation()
    return {sid: (seg.GetSegment(sid).GetName(), tuple(round(c, 4) for c in seg.GetSegment(sid).GetColor()))
            for sid in seg.GetSegmentIDs()}


class PaintingRunner:
    """A SegmentationRunner that records requests and answers with a known mask per prompt:
    a ball of radius 2 voxels around the rounded prompt voxel (points), the voxel box (boxes)
    or the mask itself (mask prompts), computed with the library's own world -> voxel mapping."""

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
            elif vp.kind == "mask":
                mask = vp.mask.copy()
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
    assert results.isResultNode(result)
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
    colors = results.COLORS
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

    assert result is not user and results.isResultNode(result)
    assert not results.isResultNode(user)
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


def _prompt_type(node, segment_id):
    ref = vtk.reference("")
    node.GetSegmentation().GetSegment(segment_id).GetTag("LesionLocator.PromptType", ref)
    return str(ref)


def test_refine_from_segment(slicer_scene, painting, LL):
    h = slicer_scene
    logic, runner = painting
    volume = _oblique_volume(h)
    user, user_mask = _user_segmentation(h, volume)
    user_mtime = user.GetSegmentation().GetSegment("lesion_1").GetMTime()

    # from a user's segment: its voxels are the mask prompt; a new lesion in the module's node,
    # the user's segment untouched
    node = logic.refineFromSegment(volume, user, "lesion_1", modelPath="unused")
    (prompt,) = runner.requests[-1].prompts
    assert isinstance(prompt, MaskPrompt) and prompt.id == 1
    sent = to_voxel_prompt(prompt, runner.requests[-1].image).mask
    assert np.array_equal(sent, user_mask) and sent.sum() == user_mask.sum() == 320
    assert node is not user and sorted(node.GetSegmentation().GetSegmentIDs()) == ["lesion_1"]
    assert np.array_equal(_segment_array(node, "lesion_1", volume), user_mask)
    assert _prompt_type(node, "lesion_1") == "mask"
    assert _segments(user) == {"lesion_1": ("My tumour", (0.1, 0.2, 0.3))}
    assert np.array_equal(_segment_array(user, "lesion_1", volume), user_mask)
    assert user.GetSegmentation().GetSegment("lesion_1").GetMTime() == user_mtime

    # a second segment painted into the same labelmap layer (as the Segment Editor does, with
    # its own label value): only its own voxels are the prompt, not the layer's
    user.GetSegmentation().AddEmptySegment("edit", "Edited")
    edited = np.zeros(SHAPE, bool)
    edited[10:14, 20:26, 3:9] = True
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        scene.labelmapFromMask(edited, volume), user, "edit",
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    segmentation = user.GetSegmentation()
    assert segmentation.GetLayerIndex("edit") == segmentation.GetLayerIndex("lesion_1")  # one shared layer
    logic.refineFromSegment(volume, user, "edit", modelPath="unused")
    assert np.array_equal(to_voxel_prompt(runner.requests[-1].prompts[0], runner.requests[-1].image).mask, edited)
    assert [p.id for p in runner.requests[-1].prompts] == [2]
    # refining the same user segment again replaces the lesion it made
    logic.refineFromSegment(volume, user, "lesion_1", modelPath="unused")
    assert [p.id for p in runner.requests[-1].prompts] == [1]
    assert sorted(node.GetSegmentation().GetSegmentIDs()) == ["lesion_1", "lesion_2"]

    # from the module's own lesion: replaced in place, same ID, name and colour
    points = _points(h, [_world_ras_of_voxel(volume, (5, 9, 30))])
    logic.segment(volume, points, modelPath="unused")
    lesion3 = _segment_array(node, "lesion_3", volume)
    before = _segments(node)
    again = logic.refineFromSegment(volume, node, "lesion_3", modelPath="unused")
    assert again is node and _segments(node) == before
    assert [p.id for p in runner.requests[-1].prompts] == [3]
    assert np.array_equal(to_voxel_prompt(runner.requests[-1].prompts[0], runner.requests[-1].image).mask, lesion3)
    assert _prompt_type(node, "lesion_3") == "mask"

    # nothing to refine: the library's PromptError, nothing in the scene changes
    node.GetSegmentation().AddEmptySegment("nothing", "Nothing")
    before_ids, before_segments, n = h.node_ids(), _segments(node), len(runner.requests)
    with pytest.raises(PromptError, match=r"segment 'Nothing' is empty: nothing to refine"):
        logic.refineFromSegment(volume, node, "nothing", modelPath="unused")
    far = h.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "elsewhere")
    far.GetSegmentation().AddEmptySegment("far", "Far away")
    shifted = np.eye(4)
    shifted[:3, 3] = (500.0, 500.0, 500.0)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        scene.labelmapFromMask(user_mask, volume, slicer.util.vtkMatrixFromArray(shifted)), far,
        "far", slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    before_ids = h.node_ids()
    with pytest.raises(PromptError, match=r"segment 'Far away' has no voxel inside volume 'CT'"):
        logic.refineFromSegment(volume, far, "far", modelPath="unused")
    with pytest.raises(ValueError, match="not found"):
        logic.refineFromSegment(volume, node, "no such segment", modelPath="unused")
    assert h.node_ids() == before_ids and _segments(node) == before_segments and len(runner.requests) == n


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
    if models.defaultModelPath() is None:
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
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "nnunetv2") else real(name, *a))
    message = Logic.checkDependencies()
    assert "torch, nnunetv2" in message and "PyTorch extension" in message
    with pytest.raises(LL.MissingDependencyError, match="torch"):
        Logic(runner=PaintingRunner()).segment(None, None)


def test_module_file_loads_without_importing_torch():
    code = ("import sys; sys.path.insert(0, 'Testing'); import slicer_harness; "
            "slicer_harness.import_module_file(); "
            "assert 'torch' not in sys.modules and 'nnunetv2' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_the_module_uses_its_own_library_even_when_another_copy_comes_first_on_the_path(tmp_path):
    """An older LesionLocatorLib pip-installed into Slicer's Python (found first on sys.path) must not
    shadow the copy shipped with the module."""
    other = tmp_path / "site-packages" / "LesionLocatorLib"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("OTHER_COPY = True\n")
    code = ("import sys; sys.path.insert(0, 'Testing'); import slicer_harness; slicer_harness.import_module_file(); "
            "import LesionLocatorLib, LesionLocatorSlicer.logic; print(LesionLocatorLib.__file__)")
    env = dict(os.environ, PYTHONPATH=str(other.parent))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == REPO / "LesionLocatorLib" / "__init__.py"


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


# ------------------------------------------------------------------------------ refine: mask prompts
class RecordingRunner(InProcessRunner):
    """The in-process runner, keeping the requests it ran."""

    def __init__(self):
        super().__init__()
        self.requests = []

    def run(self, request, progress=None, cancel=None):
        self.requests.append(request)
        return super().run(request, progress, cancel)


def _edited_mask():
    """A hand-edited lesion: a ball around LESION with a slab cut away and a blob added."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    mask = ((k - LESION[0]) * SPACING[2]) ** 2 + ((j - LESION[1]) * SPACING[1]) ** 2 \
        + ((i - LESION[2]) * SPACING[0]) ** 2 <= 6.0 ** 2
    mask[:, LESION[1] + 2:LESION[1] + 4, :] = False
    mask[9:12, 12:15, 20:24] = True
    return mask


def _user_segment_in_another_frame(h, LL, volume, mask):
    """A user's segmentation under the volume's outer transform only (not the volume's own), its
    labelmap placed so that in world its voxels are ``mask`` on the volume's voxels."""
    inner = volume.GetParentTransformNode()
    user = h.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "My edits")
    user.SetAndObserveTransformNodeID(inner.GetTransformNodeID())
    user.GetSegmentation().AddEmptySegment("edited", "Edited lesion", [0.1, 0.2, 0.3])
    to_parent, ijk = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    inner.GetMatrixTransformToParent(to_parent)
    volume.GetIJKToRASMatrix(ijk)
    ijk_to_user = slicer.util.arrayFromVTKMatrix(to_parent) @ slicer.util.arrayFromVTKMatrix(ijk)
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        scene.labelmapFromMask(mask, volume, slicer.util.vtkMatrixFromArray(ijk_to_user)), user,
        "edited", slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    assert user.GetParentTransformNode() is not volume.GetParentTransformNode()
    return user


def _library_refine(h, volume, mask, model_root):
    """What the library gives for ``mask`` as a mask prompt on the (independently hardened) volume."""
    origin, spacing, direction = _hardened_lps_geometry(h, volume)
    image = Image(slicer.util.arrayFromVolume(volume).copy(), spacing, origin, direction)
    return library_segment(image, [MaskPrompt(1, image.with_array(mask.astype(np.uint8)))],
                           load_model(model_root, "prev_mask", device="cpu")).masks[1]


def test_refine_runs_the_edited_segment_as_a_mask_prompt_with_the_tiny_model(slicer_scene, LL, tiny_model_root):
    h = slicer_scene
    runner = RecordingRunner()
    logic = LL.LesionLocatorLogic(runner=runner)
    volume = _oblique_volume(h)
    edited = _edited_mask()
    user = _user_segment_in_another_frame(h, LL, volume, edited)
    user_before = (_segments(user), scene.segmentMask(user, "edited", volume),
                   user.GetSegmentation().GetSegment("edited").GetMTime())

    node = logic.refineFromSegment(volume, user, "edited", modelPath=str(tiny_model_root), device="cpu")

    # the request: the segment's voxels on the volume's grid, exactly, as a mask prompt
    (request,) = runner.requests
    (prompt,) = request.prompts
    assert isinstance(prompt, MaskPrompt) and prompt.id == 1
    sent = to_voxel_prompt(prompt, request.image).mask
    assert sent.sum() == edited.sum() > 300 and np.array_equal(sent, edited)
    # the result: what the library gives with the previous-mask model, exactly
    expected = _library_refine(h, volume, edited, tiny_model_root)
    assert expected.sum() > 50, "the random model must segment something for the comparison to mean anything"
    assert np.array_equal(_segment_array(node, "lesion_1", volume), expected)
    assert logic.runner.loads == 1 and [key[1] for key in runner._models] == ["prev_mask"]
    assert node is not user and results.isResultNode(user) is False
    assert sorted(node.GetSegmentation().GetSegmentIDs()) == ["lesion_1"]
    assert _segments(user) == user_before[0]
    assert np.array_equal(scene.segmentMask(user, "edited", volume), user_before[1])
    assert user.GetSegmentation().GetSegment("edited").GetMTime() == user_before[2]

    # the user corrects the module's lesion in place (Segment Editor) and refines it: replaced in
    # place, same ID, name and colour; the prompt is the corrected segment
    corrected = expected.copy()
    corrected[8:13, 16:20, 15:20] = True
    corrected[:, :, :LESION[2] - 3] = False
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        scene.labelmapFromMask(corrected, volume), node, "lesion_1",
        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    node.GetSegmentation().GetSegment("lesion_1").SetName("Liver metastasis")
    before = _segments(node)
    again = logic.refineFromSegment(volume, node, "lesion_1", modelPath=str(tiny_model_root), device="cpu")
    assert again is node and _segments(node) == before
    assert [p.id for p in runner.requests[-1].prompts] == [1]
    assert np.array_equal(to_voxel_prompt(runner.requests[-1].prompts[0], runner.requests[-1].image).mask,
                          corrected)
    assert np.array_equal(_segment_array(node, "lesion_1", volume),
                          _library_refine(h, volume, corrected, tiny_model_root))
    assert logic.runner.loads == 1


def test_refine_through_the_worker_process_gives_the_in_process_masks(slicer_scene, LL, tiny_model_root):
    from LesionLocatorLib.runner import WorkerProcessRunner

    h = slicer_scene
    volume = _oblique_volume(h)
    user = _user_segment_in_another_frame(h, LL, volume, _edited_mask())
    model = str(tiny_model_root)
    reference = LL.LesionLocatorLogic().refineFromSegment(volume, user, "edited", modelPath=model, device="cpu")
    expected = _segment_array(reference, "lesion_1", volume)
    h.scene.RemoveNode(reference)

    logic = LL.LesionLocatorLogic()
    logic.useWorkerProcess()
    try:
        assert isinstance(logic.runner, WorkerProcessRunner)
        node = logic.refineFromSegment(volume, user, "edited", modelPath=model, device="cpu")
        assert expected.sum() > 50 and np.array_equal(_segment_array(node, "lesion_1", volume), expected)
        assert np.array_equal(logic.lastResponse.masks[1], expected)
        before = h.node_ids()
        user.GetSegmentation().AddEmptySegment("nothing", "Nothing")
        with pytest.raises(PromptError, match="is empty: nothing to refine"):
            logic.refineFromSegment(volume, user, "nothing", modelPath=model, device="cpu")
        assert h.node_ids() == before and logic.runner.loads == 1
    finally:
        logic.cleanup()


def test_runners_take_mask_prompts_with_the_previous_mask_model(tiny_model_root):
    """Point, box and mask prompts in one request: each group runs with its model; the worker
    gets the mask prompt on the image's grid in an npz and answers the in-process masks."""
    import json

    from LesionLocatorLib.runner import ModelSpec, SegmentationRequest, WorkerProcessRunner, unpack_masks

    image = Image(_ct_array(), SPACING, (10.0, -20.0, 30.0), _rotation((1, 0.5, 0.3), 25))
    centre = image.index_to_world(LESION)
    # a mask prompt on another grid (coarser, axis-aligned): resampled onto the image's voxels
    coarse = Image(np.zeros((8, 12, 12), np.uint8), (3.0, 3.0, 3.0), tuple(np.asarray(centre) - 16.5), np.eye(3))
    coarse.array[3:6, 4:8, 4:8] = 1
    # point and box off voxel centres: the NRRD the worker reads keeps the geometry to ~1e-16,
    # which must not decide a rounding tie on the model grid
    prompts = [Point(1, tuple(image.index_to_world((5.3, 9.2, 29.7)))),
               Box(2, tuple(image.index_to_world((13.4, 27.6, 8.3))), tuple(image.index_to_world((16.6, 34.4, 13.7)))),
               MaskPrompt(3, coarse)]
    request = SegmentationRequest(image, prompts, ModelSpec(str(tiny_model_root), device="cpu"))
    on_grid = to_voxel_prompt(prompts[2], image).mask
    assert on_grid.sum() > 20 and list(request.prompt_masks()) == ["3"]
    assert np.array_equal(request.prompt_masks()["3"], on_grid)
    wire = request.prompts_json("/tmp/prompts.npz")
    assert wire[2] == {"id": 3, "mask": {"file": "/tmp/prompts.npz", "key": "3"}}
    json.dumps(wire)
    with pytest.raises(ValueError, match="npz"):
        request.prompts_json()

    in_process = InProcessRunner()
    expected = in_process.run(request)
    assert in_process.loads == 3 and sorted(key[1] for key in in_process._models) == ["box", "point", "prev_mask"]
    direct = library_segment(image, [prompts[2]], in_process.model(request.model, "prev_mask")).masks[3]
    assert np.array_equal(expected.masks[3], direct)

    worker = WorkerProcessRunner()
    try:
        written = []
        real_savez = np.savez

        def recording_savez(path, **arrays):
            written.append((path, {k: np.array(v) for k, v in arrays.items()}))
            return real_savez(path, **arrays)

        np.savez = recording_savez
        try:
            got = worker.run(request)
        finally:
            np.savez = real_savez
        assert sorted(got.masks) == [1, 2, 3] and worker.loads == 3
        assert all(np.array_equal(got.masks[i], expected.masks[i]) for i in (1, 2, 3))
        ((path, arrays),) = written  # the mask prompt, cropped to its bounding box ("Mask files")
        assert path.endswith("prompts.npz") and set(arrays) == {"3", "3@lo", "3@shape"}
        assert arrays["3"].shape != image.shape and np.array_equal(unpack_masks(arrays)["3"], on_grid)
        # an empty mask prompt: the library's PromptError with its message, as in-process
        empty = SegmentationRequest(image, [MaskPrompt(4, image.with_array(np.zeros(image.shape, np.uint8)))],
                                    request.model)
        for runner in (in_process, worker):
            with pytest.raises(PromptError, match="prompt 4: the mask prompt is empty"):
                runner.run(empty)
    finally:
        worker.close()


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
    "minVolumeSpinBox": "QDoubleSpinBox",
    "minPromptFractionSpinBox": "QDoubleSpinBox",
    "cancelButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "resultsTableView": "qMRMLTableView",
    "installDependenciesButton": "QPushButton",
    "downloadModelButton": "QPushButton",
    "exportDicomButton": "QPushButton",
    "reviewCollapsibleButton": "ctkCollapsibleButton",
    "reviewTable": "QTableWidget",
    "reviewAcceptButton": "QPushButton",
    "reviewCorrectPointButton": "QPushButton",
    "reviewCorrectBoxButton": "QPushButton",
    "reviewMoveButton": "QPushButton",
    "reviewVanishedButton": "QPushButton",
    "reviewNewLesionButton": "QPushButton",
}


def _ui_widgets():
    root = ET.parse(MODULE_DIR / "Resources" / "UI" / "LesionLocator.ui").getroot()
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    custom = {c.findtext("class"): c.findtext("header") for c in root.iter("customwidget")}
    return root, widgets, custom


def test_every_widget_the_module_uses_exists_in_the_ui_with_the_expected_class():
    root, widgets, custom = _ui_widgets()
    source = "".join((MODULE_DIR / f).read_text() for f in ("LesionLocator.py", "LesionLocatorSlicer/widget.py"))
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the Widget must use the .ui"
    missing = sorted(used - set(widgets))
    assert not missing, f"used in the module's panel but not in the .ui: {missing}"
    for name, cls in EXPECTED_WIDGET_CLASSES.items():
        assert widgets.get(name) == cls, f"{name}: {widgets.get(name)} in the .ui, expected {cls}"
    unused = sorted(set(EXPECTED_WIDGET_CLASSES) - used)
    assert unused == [], f"widgets the module should wire up: {unused}"
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


def test_cmakelists_lists_every_file_the_module_needs(LL):
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = _cmake_list(text, "MODULE_PYTHON_SCRIPTS")
    resources = _cmake_list(text, "MODULE_PYTHON_RESOURCES")
    library = _cmake_list(text, "LIBRARY_PYTHON_SCRIPTS")
    testing = _cmake_list(text, "TESTING_PYTHON_SCRIPTS")
    assert "${MODULE_NAME}.py" in scripts
    package = {f"LesionLocatorSlicer/{p.name}" for p in (MODULE_DIR / "LesionLocatorSlicer").glob("*.py")}
    assert set(scripts) - {"${MODULE_NAME}.py"} == package, "every file of the module's package, nothing else"
    needed_resources = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    listed_resources = {r.replace("${MODULE_NAME}", "LesionLocator") for r in resources}
    assert needed_resources == listed_resources
    assert {"Resources/Icons/LesionLocator.png", "Resources/UI/LesionLocator.ui"} <= listed_resources
    library_files = {p.name for p in (REPO / "LesionLocatorLib").glob("*.py")}
    assert set(library) == library_files, (f"missing: {sorted(library_files - set(library))}, "
                                           f"not there: {sorted(set(library) - library_files)}")
    assert testing == ["build_test_models.py"] and (REPO / "Testing" / "build_test_models.py").is_file()
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    # the shipped demo model and case go next to the module, where the Logic and the self-test look
    shipped = _cmake_list(text, "SHIPPED_DATA_DIRS")
    assert shipped == ["Models/LesionLocatorDemo", "Demo"]
    assert "install(DIRECTORY ${CMAKE_CURRENT_SOURCE_DIR}/../Resources/${dir}" in text
    # the library finds them beside itself: the top of a checkout, the scripted-modules folder once installed
    from LesionLocatorLib.demo import demo_case_dir
    from LesionLocatorLib.zoo import demo_model_dir
    assert [demo_model_dir(), demo_case_dir()] == [REPO / "Resources" / sub for sub in shipped]
    assert "DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/Resources/${parent}" in text
    assert not any("training" in f for f in library), "the extension ships no training code"
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


def test_module_self_test_skips_with_the_reason_without_torch(slicer_scene, LL, monkeypatch):
    """On an extension build machine (no torch, no nnunetv2) the registered self-test is skipped with a
    message naming what is missing, for Slicer's test runner (each test_* method) and Reload and Test."""
    import unittest

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "nnunetv2")
                        else real(name, *a))
    module = LL.LesionLocator(type("Parent", (), {"path": str(MODULE_DIR / "LesionLocator.py")})())
    with pytest.raises(unittest.SkipTest, match="torch") as skipped:
        module.runTest()
    assert "nnunetv2" in str(skipped.value)
    suite = unittest.TestLoader().loadTestsFromTestCase(LL.LesionLocatorTest)
    outcome = unittest.TestResult()
    suite.run(outcome)
    assert outcome.testsRun == 4 and len(outcome.skipped) == 4 and not outcome.errors and not outcome.failures


def test_parameter_node_defaults(slicer_scene, LL):
    logic = LL.LesionLocatorLogic(runner=PaintingRunner())
    node = logic.getParameterNode()
    logic.setDefaultParameters(node)
    assert node.GetParameter("Device") == "auto" and node.GetParameter("TTA") == "auto"
    assert logic.getParameterNode() is node
    assert models.parseFolds(" 0, 2 ") == (0, 2)
    assert models.parseFolds("") is None and models.parseFolds("all") == ("all",)


def test_track_options_come_from_the_parameter_node_as_track_keywords(slicer_scene, LL):
    """The Track panel's spin boxes store the two tracking options in the parameter node; the
    Widget passes trackOptions() to track()."""
    logic = LL.LesionLocatorLogic(runner=PaintingRunner())
    node = logic.getParameterNode()
    logic.setDefaultParameters(node)
    assert logic.trackOptions() == {"minVolumeMl": 0.0, "minPromptFraction": 0.0}  # off by default
    node.SetParameter(logic_module.PARAM_MIN_VOLUME_ML, "0.0654")
    node.SetParameter(logic_module.PARAM_MIN_PROMPT_FRACTION, "0.1")
    assert logic.trackOptions(node) == {"minVolumeMl": 0.0654, "minPromptFraction": 0.1}
    import inspect
    assert set(logic.trackOptions()) <= set(inspect.signature(logic.track).parameters)
    for bad in ("-1", "many", "nan"):
        node.SetParameter(logic_module.PARAM_MIN_PROMPT_FRACTION, bad)
        with pytest.raises(ValueError, match=f"TrackMinPromptFraction must be a number >= 0, got '{bad}'"):
            logic.trackOptions()


# ------------------------------------------------------------------------------ (h) tracking
from LesionLocatorLib.runner import TrackResponse, TrackingRunner  # noqa: E402

STATUSES = {"tracked", "vanished", "outside"}


def _voxel_of_world_ras(volume, ras):
    """(k, j, i) of the voxel nearest a world RAS point, through MRML's transform code."""
    local = [0.0, 0.0, 0.0]
    volume.TransformPointFromWorld(list(map(float, ras)), local)
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(ras_to_ijk)
    ijk = ras_to_ijk.MultiplyPoint(local + [1.0])[:3]
    return tuple(int(v) for v in np.round(ijk[::-1]))


def _voxel_ml(volume):
    return float(np.prod(volume.GetSpacing())) / 1000.0


def _table_rows(table_node):
    table = table_node.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    return [{n: table.GetColumn(c).GetValue(r) for c, n in enumerate(names)} for r in range(table.GetNumberOfRows())]


def _segment_tag(node, segment_id, tag):
    value = vtk.reference("")
    assert node.GetSegmentation().GetSegment(segment_id).GetTag(tag, value), f"{segment_id}: no tag {tag}"
    return str(value)


class ShiftingTracker(PaintingRunner):
    """A runner that paints on click (PaintingRunner) and tracks with known answers: lesion
    ``pid`` at timepoint t is a ball of radius 2 voxels at its baseline mask's centre (world)
    moved by ``shifts[t][pid]`` (LPS mm); ``None`` = vanished (empty mask); a centre outside
    scan t = outside. Computed with the library's Image geometry only."""

    def __init__(self, shifts):
        super().__init__()
        self.shifts = shifts
        self.track_requests = []

    def track(self, request, progress=None, cancel=None):
        from scipy import ndimage

        self.track_requests.append(request)
        images = request.images
        masks, status = [dict(request.baseline)], {pid: ["tracked"] for pid in request.baseline}
        for t in range(1, len(images)):
            if progress:
                progress(t / len(images), f"scan {t}")
            if cancel is not None:
                cancel.check()
            masks.append({})
            for pid, mask in request.baseline.items():
                shift = self.shifts[t][pid]
                masks[t][pid] = np.zeros(images[t].shape, bool)
                if shift is None:
                    status[pid].append("vanished")
                    continue
                centre = images[0].index_to_world(ndimage.center_of_mass(mask)) + np.asarray(shift)
                index = np.round(images[t].world_to_index(centre)).astype(int)
                if not images[t].contains_index(index):
                    status[pid].append("outside")
                    continue
                zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in images[t].shape)]
                masks[t][pid] = (zz - index[0]) ** 2 + (yy - index[1]) ** 2 + (xx - index[2]) ** 2 <= 4
                status[pid].append("tracked")
        from LesionLocatorLib.measure import lesion_measurements
        from LesionLocatorLib.report import plain_rows

        rows = plain_rows(lesion_measurements(images, masks, status, request.names))  # the library's measurement
        return TrackResponse(request.id, masks, status, {"registration": 0.0}, [], 0.01, [], rows)


def _follow_up_volume(h, name, rotation_axis, degrees, spacing, centre_world, parent=None, seed=1):
    """A SHAPE volume with its own orientation and spacing whose voxel LESION lies at world RAS
    ``centre_world``, under the linear transform ``parent`` (to world) when given."""
    m = np.eye(4)
    m[:3, :3] = _rotation(rotation_axis, degrees) @ np.diag(spacing)
    local_centre = (np.linalg.inv(parent) if parent is not None else np.eye(4)) @ np.r_[centre_world, 1.0]
    m[:3, 3] = local_centre[:3] - m[:3, :3] @ np.array(LESION[::-1], float)
    volume = h.add_volume(_ct_array(seed), m, name)
    if parent is not None:
        volume.SetAndObserveTransformNodeID(h.add_linear_transform(parent, name + " transform").GetID())
    return volume


def _set_study_date(h, volume, date, time="120000"):
    sh = h.scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient " + volume.GetName()),
                               "Study " + volume.GetName())
    sh.SetItemAttribute(study, "DICOM.StudyDate", date)
    sh.SetItemAttribute(study, "DICOM.StudyTime", time)
    sh.SetItemParent(sh.GetItemByDataNode(volume), study)


def test_track_writes_every_timepoint_on_its_own_volume_with_the_baseline_identity(slicer_scene, LL):
    """Known tracked masks (ShiftingTracker) on three differently oriented, anisotropic volumes
    under different parent transforms: every follow-up mask lands on the voxels MRML maps the
    moved lesion to; IDs, names and colours follow the baseline; statuses, table, sequences,
    plot; user data unchanged; follow-ups in study-date order."""
    h = slicer_scene
    baseline = _oblique_volume(h, "Baseline")
    centre = _world_ras_of_voxel(baseline, LESION) + [1.5, -2.0, 3.0]
    fu1 = _follow_up_volume(h, "Follow-up 1", (0.2, 1, 0.4), -30, (1.1, 0.8, 2.0), centre,
                            parent=_rigid((1, 1, 0), 12, (4.0, 9.0, -6.0)))
    fu2 = _follow_up_volume(h, "Follow-up 2", (1, 0, 0.3), 15, (0.7, 1.3, 3.0), centre - [2.0, 1.0, 0.0], seed=2)
    _set_study_date(h, baseline, "20240105")
    _set_study_date(h, fu1, "20240302", "081500")
    _set_study_date(h, fu2, "20240302", "143000.5")
    user, user_mask = _user_segmentation(h, baseline)
    user_mtime = user.GetSegmentation().GetSegment("lesion_1").GetMTime()
    shifts = {1: {1: (3.3, -2.1, 4.2), 2: None, 3: (1.7, 2.9, -3.1)},
              2: {1: (6.1, -4.3, 8.3), 2: (0.4, 0.3, -0.2), 3: (400.0, 0.0, 0.0)}}
    tracker = ShiftingTracker(shifts)
    logic = LL.LesionLocatorLogic(runner=tracker)
    assert isinstance(tracker, TrackingRunner)
    clicks = [LESION, (5, 9, 30), (15, 30, 10)]
    base_node = logic.segment(baseline, _points(h, [_world_ras_of_voxel(baseline, v) for v in clicks]),
                              modelPath="unused")
    base_node.GetSegmentation().GetSegment("lesion_2").SetName("Liver metastasis")  # the user renames one
    baseline_segments = _segments(base_node)
    base_arrays = {sid: _segment_array(base_node, sid, baseline) for sid in baseline_segments}

    progress = []
    out = logic.track(baseline, [fu2, fu1], modelPath="unused", progress=lambda f, m: progress.append((f, m)))

    # order: by study date/time, not as given
    assert out.volumeNodes == [baseline, fu1, fu2]
    assert [r.shape for r in tracker.track_requests[-1].images] == [SHAPE] * 3
    assert progress[-1][0] == 1.0 and all(0 <= f <= 1 for f, _ in progress)
    # identity: same segment IDs, names, colours at every timepoint
    assert out.segmentationNodes[0] is base_node and _segments(base_node) == baseline_segments
    assert len(out.segmentationNodes) == 3 and out.segmentIds == {1: "lesion_1", 2: "lesion_2", 3: "lesion_3"}
    for volume, node in zip(out.volumeNodes[1:], out.segmentationNodes[1:]):
        assert results.isResultNode(node) and node.GetName() == f"{volume.GetName()} lesions"
        assert _segments(node) == baseline_segments
        assert node.GetTransformNodeID() == volume.GetTransformNodeID()
        assert node.GetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole()) == volume.GetID()
        assert results.resultNodeForVolume(volume) is node
    # geometry: each follow-up mask is the ball around the moved centre, as MRML maps it
    for t, (volume, node) in enumerate(zip(out.volumeNodes, out.segmentationNodes)):
        for pid, kji in zip((1, 2, 3), clicks):
            sid = f"lesion_{pid}"
            mask = _segment_array(node, sid, volume)
            if t == 0:
                assert np.array_equal(mask, base_arrays[sid])
                continue
            expected = np.zeros(SHAPE, bool)
            status = "vanished"
            if shifts[t][pid] is not None:
                ras = _world_ras_of_voxel(baseline, kji) + np.asarray(shifts[t][pid]) * [-1, -1, 1]
                voxel = _voxel_of_world_ras(volume, ras)
                status = "outside"
                if all(0 <= v < n for v, n in zip(voxel, SHAPE)):
                    expected, status = _ball(voxel), "tracked"
                    assert mask[voxel]
            assert np.array_equal(mask, expected), (t, sid)
            assert _segment_tag(node, sid, "LesionLocator.Status") == status == out.status[pid][t]
            assert _segment_tag(node, sid, "LesionLocator.TrackedFrom") == f"{base_node.GetID()}/{sid}"
    assert out.status == {1: ["tracked"] * 3, 2: ["tracked", "vanished", "tracked"],
                          3: ["tracked", "tracked", "outside"]}
    # the table: one row per lesion and timepoint; volumes = the label maps in the scene
    rows = _table_rows(out.tableNode)
    assert len(rows) == 9 and out.tableNode.GetScene() is h.scene
    assert list(rows[0]) == ["Lesion ID", "Lesion", "Timepoint", "Volume", "Study date", "Status", "Volume (ml)",
                             "Long axis (mm)", "Short axis (mm)", "Volume change vs baseline (%)",
                             "Volume change vs nadir (%)", "Lesion change", "RECIST 1.1 (for information only)"]
    for row in rows:
        t, sid = row["Timepoint"], f"lesion_{row['Lesion ID']}"
        volume, node = out.volumeNodes[t], out.segmentationNodes[t]
        assert row["Volume"] == volume.GetName() and row["Lesion"] == baseline_segments[sid][0]
        assert row["Status"] == out.status[row["Lesion ID"]][t] and row["Status"] in STATUSES
        assert row["Volume (ml)"] == pytest.approx(_segment_array(node, sid, volume).sum() * _voxel_ml(volume),
                                                   rel=1e-9)
        assert row["Study date"].startswith(["20240105", "20240302081500", "20240302143000.5"][t])
    assert rows[0]["Volume change vs baseline (%)"] == 0.0
    assert np.isnan(rows[0]["Volume change vs nadir (%)"]) and rows[0]["RECIST 1.1 (for information only)"] == ""
    assert [r["Lesion change"] for r in rows if r["Timepoint"] == 0] == ["baseline"] * 3
    assert [r["Lesion change"] for r in rows if r["Status"] == "outside"] == ["n/a"]
    # sequences over timepoints, browser, proxies in world geometry
    segs, vols, browser = out.segmentationSequenceNode, out.volumeSequenceNode, out.browserNode
    assert segs.GetNumberOfDataNodes() == 3 and vols.GetNumberOfDataNodes() == 3
    assert browser.GetMasterSequenceNode() is segs and browser.IsSynchronizedSequenceNode(vols.GetID())
    browser.SetSelectedItemNumber(1)
    proxy_seg, proxy_vol = browser.GetProxyNode(segs), browser.GetProxyNode(vols)
    assert not results.isResultNode(proxy_seg) and proxy_vol.GetTransformNodeID() is None
    assert np.array_equal(slicer.util.arrayFromVolume(proxy_vol), slicer.util.arrayFromVolume(fu1))
    origin, spacing, direction = _hardened_lps_geometry(h, fu1)
    proxy_ijk = vtk.vtkMatrix4x4()
    proxy_vol.GetIJKToRASMatrix(proxy_ijk)
    proxy_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ slicer.util.arrayFromVTKMatrix(proxy_ijk)
    assert np.allclose(proxy_lps[:3, 3], origin, atol=1e-6)
    assert np.allclose(proxy_lps[:3, :3], direction * spacing, atol=1e-6)
    for sid in baseline_segments:
        assert np.array_equal(_segment_array(proxy_seg, sid, proxy_vol),
                              _segment_array(out.segmentationNodes[1], sid, fu1))
    # no CT is copied: the volume sequence's items and the proxy share the scans' voxels, at every
    # timepoint; the proxies are hidden from node selectors and the volume sequence is not saved again
    scan_voxels = int(np.prod(SHAPE))
    for t in range(3):
        browser.SetSelectedItemNumber(t)
        same_size = [a for a, n in h.voxel_buffers().items() if n == scan_voxels]
        assert len(same_size) == 3, f"timepoint {t}: {len(same_size)} scan-sized voxel buffers (the 3 scans' own)"
    assert proxy_vol.GetHideFromEditors() and proxy_seg.GetHideFromEditors()
    assert not vols.GetSaveWithScene() and not proxy_vol.GetSaveWithScene()
    # plot: one series per lesion, in the lesion's colour, volume over time
    assert out.plotChartNode.GetNumberOfPlotSeriesNodes() == 3
    for node, sid in zip(out.plotSeriesNodes, ("lesion_1", "lesion_2", "lesion_3")):
        assert node.GetName() == baseline_segments[sid][0]
        assert tuple(round(c, 4) for c in node.GetColor()) == baseline_segments[sid][1]
        assert node.GetTableNode() is out.plotTableNode
        values = slicer.util.arrayFromTableColumn(out.plotTableNode, node.GetYColumnName())
        expected = [r["Volume (ml)"] if r["Status"] != "outside" else np.nan
                    for r in rows if f"lesion_{r['Lesion ID']}" == sid]
        assert np.allclose(values, expected, equal_nan=True)
    # the user's segmentation is untouched
    assert _segments(user) == {"lesion_1": ("My tumour", (0.1, 0.2, 0.3))}
    assert np.array_equal(_segment_array(user, "lesion_1", baseline), user_mask)
    assert user.GetSegmentation().GetSegment("lesion_1").GetMTime() == user_mtime
    assert "3 lesion(s) tracked through 2 follow-up(s)" in logic.lastTrackSummary()

    # tracking again replaces the outputs (no second table, sequence, follow-up node, display node)
    def inventory():
        nodes = [h.scene.GetNthNode(i) for i in range(h.scene.GetNumberOfNodes())]
        return sorted((n.GetClassName(), str(n.GetAttribute("LesionLocator.Role"))) for n in nodes)

    before = inventory()
    again = logic.track(baseline, [fu1, fu2], modelPath="unused", order="given")
    assert again.segmentationNodes[1:] == out.segmentationNodes[1:]
    assert inventory() == before
    assert out.tableNode.GetScene() is None and again.tableNode.GetName() == "Baseline lesion table"


def test_follow_up_order(slicer_scene, painting, LL):
    h = slicer_scene
    logic, _ = painting
    a, b, c = (h.add_volume(np.zeros((2, 3, 4), np.int16), np.eye(4), n) for n in ("A", "B", "C"))
    assert logic.orderFollowUps([c, a, b]) == [a, b, c]  # no dates: load order
    assert logic.orderFollowUps([c, a, b], order="given") == [c, a, b]
    a.SetAttribute("DICOM.StudyDate", "20230101")
    assert logic.orderFollowUps([c, a, b]) == [a, b, c]  # dates on only some: load order
    b.SetAttribute("DICOM.StudyDate", "20221231")
    c.SetAttribute("DICOM.StudyDate", "2023-01-01")
    c.SetAttribute("DICOM.StudyTime", "000001")
    assert logic.orderFollowUps([a, b, c]) == [b, a, c]
    assert scene.studyDateTime(c) == "20230101000001.000000"
    _set_study_date(h, a, "20200101")  # the node's own attribute wins over its study's
    assert scene.studyDateTime(a).startswith("20230101")
    with pytest.raises(ValueError, match="order must be"):
        logic.orderFollowUps([a], order="date")


@pytest.mark.parametrize("registration", ["none", "simpleitk"])
def test_track_with_the_tiny_model(slicer_scene, LL, tiny_model_root, three_timepoints, registration, tmp_path):
    h = slicer_scene
    logic = LL.LesionLocatorLogic()
    volumes, clicks = _phantom_case(h, three_timepoints)
    model = str(tiny_model_root)
    base = logic.segment(volumes[0], clicks, modelPath=model, device="cpu")
    assert all(_segment_array(base, sid, volumes[0]).any() for sid in ("lesion_1", "lesion_2"))
    image = scene.volumeToImage(volumes[1])
    assert image.same_geometry(three_timepoints[1].with_array(image.array), tol=1e-6)  # world geometry as built

    out = logic.track(volumes[0], volumes[1:], modelPath=model, device="cpu", registration=registration)

    assert out.volumeNodes == volumes and logic.runner.loads == 2  # point model + tracking model
    assert set(out.response.masks[1]) == {1, 2}
    for t, (volume, node) in enumerate(zip(out.volumeNodes, out.segmentationNodes)):
        assert _segments(node) == _segments(base)
        for pid in (1, 2):
            assert out.status[pid][t] in STATUSES
            if t:
                assert np.array_equal(_segment_array(node, f"lesion_{pid}", volume), out.response.masks[t][pid])
    for row in _table_rows(out.tableNode):
        volume, node = out.volumeNodes[row["Timepoint"]], out.segmentationNodes[row["Timepoint"]]
        labels = _segment_array(node, f"lesion_{row['Lesion ID']}", volume)
        assert row["Volume (ml)"] == pytest.approx(labels.sum() * _voxel_ml(volume), rel=1e-9)
    assert out.segmentationSequenceNode.GetNumberOfDataNodes() == 3
    assert [r["backend"] for r in out.response.registrations] == [registration] * 2
    if registration == "none":
        return
    assert all(r["result"] in ("affine + demons", "affine", "affine (deformable diverged)", "identity")
               for r in out.response.registrations)
    # CSV round trip
    import csv

    path = logic.exportTableToCsv(out.tableNode, tmp_path / "lesions.csv")
    with open(path, newline="") as f:
        read = list(csv.reader(f))
    rows = _table_rows(out.tableNode)
    assert read[0] == list(rows[0])
    for line, row in zip(read[1:], rows):
        for text, value in zip(line, row.values()):
            if isinstance(value, float):
                assert (text == "" and np.isnan(value)) or float(text) == value
            else:
                assert text == str(value)
    assert len(read) == len(rows) + 1
    # segmentations: .seg.nrrd (segment IDs, names) and NIfTI label maps (lesion IDs on the voxels)
    files = logic.exportSegmentations(tmp_path / "seg")
    assert [Path(f).name for f in files] == ["CT_t0_lesions.seg.nrrd", "CT_t1_lesions.seg.nrrd",
                                             "CT_t2_lesions.seg.nrrd"]
    loaded = slicer.vtkMRMLSegmentationNode()
    h.scene.AddNode(loaded)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(files[1])
    assert storage.ReadData(loaded)
    assert _segments(loaded) == _segments(out.segmentationNodes[1])
    from LesionLocatorLib.image import read_image

    for path, volume, node in zip(logic.exportSegmentations(tmp_path / "nii", format="nii.gz"), out.volumeNodes,
                                  out.segmentationNodes):
        labels = read_image(path)
        expected = np.zeros(labels.shape, np.uint16)
        for pid in (1, 2):
            expected[_segment_array(node, f"lesion_{pid}", volume)] = pid
        m = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(m)  # the volume's own frame, as Slicer saves the volume
        local = np.diag([-1.0, -1.0, 1.0, 1.0]) @ slicer.util.arrayFromVTKMatrix(m)
        assert np.array_equal(labels.array, expected) and expected.any()
        assert np.allclose(labels.origin, local[:3, 3], atol=1e-4)
        assert np.allclose(np.asarray(labels.direction) * np.asarray(labels.spacing), local[:3, :3], atol=1e-4)


def test_track_cancel_and_errors_leave_the_scene_unchanged(slicer_scene, LL, tiny_model_root, three_timepoints):
    h = slicer_scene
    logic = LL.LesionLocatorLogic()
    volumes, clicks = _phantom_case(h, three_timepoints)
    model = str(tiny_model_root)
    before = h.node_ids()
    with pytest.raises(ValueError, match="no lesions on 'CT t0' yet"):
        logic.track(volumes[0], volumes[1:], modelPath=model, device="cpu", registration="none")
    base = logic.segment(volumes[0], clicks, modelPath=model, device="cpu")
    segments = _segments(base)
    # a lesion clicked on the follow-up itself has ID 1 there: never replaced by tracking
    own = logic.segment(volumes[1], _points(h, [_world_ras_of_voxel(volumes[1], (12, 32, 27))], name="fu clicks"),
                        modelPath=model, device="cpu")
    own_mask = _segment_array(own, "lesion_1", volumes[1])
    before = h.node_ids()
    for kwargs, error, message in [
            (dict(followupVolumeNodes=[]), ValueError, "at least one follow-up"),
            (dict(followupVolumeNodes=[volumes[0]]), ValueError, "is the baseline"),
            (dict(followupVolumeNodes=[volumes[2], volumes[2]]), ValueError, "listed twice"),
            (dict(followupVolumeNodes=volumes[2:], registration="magic"), ValueError, "unknown registration"),
            (dict(followupVolumeNodes=volumes[1:]), ValueError, "was not made by tracking"),
            (dict(followupVolumeNodes=volumes[2:], modelPath=model + "_missing"), ModelLayoutError, "not found")]:
        kwargs = dict(dict(modelPath=model, device="cpu", registration="none"), **kwargs)
        with pytest.raises(error, match=message):
            logic.track(volumes[0], **kwargs)
        assert h.node_ids() == before
    assert np.array_equal(_segment_array(own, "lesion_1", volumes[1]), own_mask)
    before = h.node_ids()  # (slicer.util's segment export leaves a display node behind)

    # Cancel while the tracker runs (library) and while the results are built (Logic)
    for when in ("scan 1", "building the results"):
        token, seen = CancelToken(), []

        def progress(fraction, message, token=token, seen=seen, when=when):
            seen.append(message)
            if message.startswith(when):
                token.cancel()

        with pytest.raises(Cancelled):
            logic.track(volumes[0], volumes[2:], modelPath=model, device="cpu", registration="none",
                        progress=progress, cancel=token)
        assert any(m.startswith(when) for m in seen) and h.node_ids() == before
    with pytest.raises(Cancelled):  # the Logic's cancel(), as the Cancel button calls it
        logic.track(volumes[0], volumes[2:], modelPath=model, device="cpu", registration="none",
                    progress=lambda f, m: logic.cancel() if m.startswith("registering") else None)
    assert h.node_ids() == before and _segments(base) == segments
    out = logic.track(volumes[0], volumes[2:], modelPath=model, device="cpu", registration="none")
    assert out.volumeNodes == [volumes[0], volumes[2]]


def test_track_through_the_worker_process(slicer_scene, LL, tiny_model_root, three_timepoints):
    """Tracking through the persistent worker gives the in-process result (masks as cropped
    blocks on the wire) and keeps the tracking model loaded."""
    h = slicer_scene
    volumes, clicks = _phantom_case(h, three_timepoints)
    model = str(tiny_model_root)
    reference_logic = LL.LesionLocatorLogic()
    reference_logic.segment(volumes[0], clicks, modelPath=model, device="cpu")
    reference = reference_logic.track(volumes[0], volumes[1:], modelPath=model, device="cpu", registration="none")
    expected = [{pid: m.copy() for pid, m in masks.items()} for masks in reference.response.masks]

    logic = LL.LesionLocatorLogic()
    logic.useWorkerProcess()
    try:
        seen = []
        out = logic.track(volumes[0], volumes[1:], modelPath=model, device="cpu", registration="none",
                          progress=lambda f, m: seen.append(m))
        assert any(m.startswith("scan 2") for m in seen)
        assert out.status == reference.status
        for t in (1, 2):
            for pid in (1, 2):
                assert np.array_equal(out.response.masks[t][pid], expected[t][pid])
                assert np.array_equal(_segment_array(out.segmentationNodes[t], f"lesion_{pid}", volumes[t]),
                                      expected[t][pid])
        assert out.response.registrations == reference.response.registrations
        logic.track(volumes[0], volumes[2:], modelPath=model, device="cpu", registration="none")
        assert logic.runner.loads == 1

        # track's options travel to the worker: with a prompt fraction no mask reaches, every
        # follow-up lesion the reference tracked is reported vanished with an empty segment
        assert any("tracked" in s[1:] for s in reference.status.values())
        gone = logic.track(volumes[0], volumes[1:], modelPath=model, device="cpu", registration="none",
                           minPromptFraction=1e6)
        assert {pid: s[1:] for pid, s in gone.status.items()} == {pid: ["vanished", "vanished"] for pid in (1, 2)}
        for t in (1, 2):
            for pid in (1, 2):
                assert not _segment_array(gone.segmentationNodes[t], f"lesion_{pid}", volumes[t]).any()
        with pytest.raises(ValueError, match=r"the minimum volume \(-1 ml\) and prompt fraction \(0.0\) must be >= 0"):
            logic.track(volumes[0], volumes[1:], modelPath=model, device="cpu", registration="none", minVolumeMl=-1)

        # clicks: the volume goes to the worker once, then only its key, until its voxels change
        import LesionLocatorLib.image as image_module

        writes = []
        real_write = image_module.write_image

        def counting_write(image, path, **kwargs):
            writes.append(path)
            return real_write(image, path, **kwargs)

        image_module.write_image = counting_write
        try:
            first = logic.segment(volumes[1], _points(h, [_world_ras_of_voxel(volumes[1], (12, 32, 27))]),
                                  modelPath=model, device="cpu")
            points = _points(h, [_world_ras_of_voxel(volumes[1], (10, 44, 43))], name="second")
            logic.segment(volumes[1], points, modelPath=model, device="cpu", segmentationNode=first)
            assert len(writes) == 1
            array = slicer.util.arrayFromVolume(volumes[1])
            array[:] = array[:, ::-1, ::-1] // 2 + 300  # other voxels everywhere
            slicer.util.arrayFromVolumeModified(volumes[1])  # new voxels: a new key, sent again
            logic.segment(volumes[1], (points, 0), modelPath=model, device="cpu")
            assert len(writes) == 2
            fresh = _segment_array(first, "lesion_2", volumes[1])
            in_process = LL.LesionLocatorLogic().segment(volumes[1], (points, 0), modelPath=model, device="cpu")
            assert in_process is first and np.array_equal(_segment_array(first, "lesion_2", volumes[1]), fresh)
            assert logic.runner._sent and len(logic.runner._sent) <= logic.runner.IMAGE_CACHE
            # the client believes the worker holds a key it never got: the worker says
            # ImageNotCached and the client sends the file after all
            logic.runner._sent["not-in-the-worker"] = True
            real_key = scene.imageKey
            scene.imageKey = lambda volume, image: "not-in-the-worker"
            try:
                node = logic.segment(volumes[1], (points, 0), modelPath=model, device="cpu")
            finally:
                scene.imageKey = real_key
            assert len(writes) == 3 and node is first
            assert np.array_equal(_segment_array(node, "lesion_2", volumes[1]), fresh)
        finally:
            image_module.write_image = real_write
    finally:
        logic.cleanup()


# ------------------------------------------------------------------------------ (i) model download
@pytest.fixture
def zenodo(tiny_model_root, tmp_path, monkeypatch):
    """The official model's Zenodo record on a real HTTP server on 127.0.0.1 (the archive in the
    official layout, from the tiny model), an empty model cache, backoff waits not slept."""
    import shutil

    from http_fixture_server import FixtureServer
    from LesionLocatorLib import download

    archive = Path(shutil.make_archive(str(tmp_path / "LesionLocatorCheckpoint"), "zip",
                                       root_dir=tiny_model_root.parent, base_dir=tiny_model_root.name)).read_bytes()
    monkeypatch.setenv("LESIONLOCATOR_HOME", str(tmp_path / "cache"))
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    monkeypatch.setattr(download, "_sleep", lambda seconds: None)
    with FixtureServer() as server:
        server.add_record("15174217", {"LesionLocatorCheckpoint.zip": archive})
        server.archive, server.cache = archive, tmp_path / "cache"
        monkeypatch.setenv("LESIONLOCATOR_ZENODO_URL", server.url)
        yield server


def _assert_nothing_installed(cache):
    assert not (cache / "models").exists() or list((cache / "models").iterdir()) == []


def test_download_official_weights_selects_them_and_they_segment(slicer_scene, LL, zenodo):
    from LesionLocatorLib import zoo

    h = slicer_scene
    logic = LL.LesionLocatorLogic()
    assert "lesionlocator" not in [m["name"] for m in models.availableModels()]
    question = models.describeDownload()
    assert question.startswith("Download LesionLocator official checkpoint (Rokuss et al., CVPR 2025)?")
    assert (f"LesionLocatorCheckpoint.zip: {zoo.human_size(len(zenodo.archive))} from {zenodo.url}, record 15174217, "
            "version 1.0, licence cc-by-4.0.") in question

    seen = []
    root = logic.downloadModel(progress=lambda fraction, message: seen.append((fraction, message)))

    assert root == zenodo.cache / "models" / "lesionlocator" / "LesionLocatorCheckpoint"
    load_model(root, "point", device="cpu")  # the library's loader accepts the installed folder
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("Downloading lesionlocator: ") for _, m in seen)
    assert seen[-1][1] == f"Model 'lesionlocator' ready: {root}"
    # selectable, and selected as the module's model
    [entry] = [m for m in models.availableModels() if m["name"] == "lesionlocator"]
    assert entry["path"] == str(root) and entry["version"] == "1.0" and entry["license"] == "cc-by-4.0"
    assert logic.getParameterNode().GetParameter(logic_module.PARAM_MODEL_PATH) == str(root)
    assert logic.selectModel("lesionlocator") == str(root) == logic.selectModel("official")
    assert models.describeDownload("official").startswith("LesionLocator official checkpoint (Rokuss et al., CVPR "
                                                         f"2025) is downloaded already ({root}).")
    requests = len(zenodo.requests)
    assert logic.downloadModel("official") == root and len(zenodo.requests) == requests  # installed: no network
    # a segment with the selected model places a mask in the scene
    volume = _oblique_volume(h)
    points = _points(h, [_world_ras_of_voxel(volume, LESION)])
    selected = logic.getParameterNode().GetParameter(logic_module.PARAM_MODEL_PATH)
    result = logic.segment(volume, points, modelPath=selected,
                           device="cpu")
    mask = _segment_array(result, "lesion_1", volume)
    assert mask.sum() > 0 and np.array_equal(mask, logic.lastResponse.masks[1])


@pytest.mark.parametrize("fault", ["checksum", "http-404"])
def test_failed_download_raises_the_zoo_error_and_changes_nothing(slicer_scene, LL, zenodo, fault):
    from LesionLocatorLib import zoo

    h = slicer_scene
    if fault == "checksum":
        zenodo.add_record("15174217", {"LesionLocatorCheckpoint.zip": zenodo.archive},
                          md5={"LesionLocatorCheckpoint.zip": "0" * 32})
        error, message = zoo.ChecksumError, (r"^checksum mismatch for LesionLocatorCheckpoint.zip: expected md5 0{32}, "
                                             r"got [0-9a-f]{32}; the downloaded file was removed")
    else:
        zenodo.add_fault("/content", kind="status", status=404, times=None)
        error, message = zoo.DownloadError, r"^download of LesionLocatorCheckpoint.zip failed: HTTP 404 Not Found"
    logic = LL.LesionLocatorLogic()
    before = h.node_ids()
    with pytest.raises(error, match=message):
        logic.downloadModel()
    assert h.node_ids() == before  # not even the parameter node: nothing was selected
    _assert_nothing_installed(zenodo.cache)
    assert list(zenodo.cache.rglob("*.part")) == []
    assert "lesionlocator" not in [m["name"] for m in models.availableModels()]
    with pytest.raises(zoo.ModelNotFoundError, match="model 'lesionlocator' is not downloaded yet"):
        logic.selectModel("lesionlocator")


def test_cancel_during_the_download_installs_nothing_and_the_next_download_resumes(slicer_scene, LL, zenodo):
    import threading

    from LesionLocatorLib import zoo

    h = slicer_scene
    zenodo.piece, zenodo.delay = 16 * 1024, 0.005  # small chunks reach the client
    logic = LL.LesionLocatorLogic()
    before = h.node_ids()
    with pytest.raises(zoo.DownloadCancelled, match="the partial file is kept for resuming"):
        logic.downloadModel(progress=lambda fraction, message: logic.cancel() if fraction >= 0.45 else None)
    assert h.node_ids() == before
    _assert_nothing_installed(zenodo.cache)
    [part] = zenodo.cache.rglob("*.part")
    have = part.stat().st_size
    assert 0 < have < len(zenodo.archive)
    event = threading.Event()  # a caller's own flag works too
    event.set()
    with pytest.raises(zoo.DownloadCancelled):
        logic.downloadModel(cancel=event)
    root = logic.downloadModel()
    assert zenodo.requests_to("/content")[-1]["headers"]["range"] == f"bytes={have}-"
    assert logic.getParameterNode().GetParameter(logic_module.PARAM_MODEL_PATH) == str(root)


def test_the_panel_imports_without_qt_and_every_shortcut_and_button_has_its_handler():
    """The Qt panel cannot run here; its module must still import (slicer-core, the qt stand-in) and every
    keyboard shortcut and button it wires must name a method that exists."""
    from LesionLocatorSlicer import widget

    assert [keys for keys, _ in widget.SHORTCUTS] == ["P", "B", "R", "T", "Esc", "Ctrl+Z", "Alt+Down", "Alt+Up",
                                                      "Alt+Right", "Alt+Left"]
    for _, handler in widget.SHORTCUTS:
        assert callable(getattr(widget.LesionLocatorPanel, handler)), handler
    source = (MODULE_DIR / "LesionLocatorSlicer" / "widget.py").read_text()
    for handler in re.findall(r"self\.(on\w+|show\w+|poll|update\w+)\b", source):
        assert callable(getattr(widget.LesionLocatorPanel, handler, None)), handler
    # the review panel: every button is connected to its handler, the table's selection to showLesion
    for button, handler in (("reviewAcceptButton", "onReviewAccept"),
                            ("reviewCorrectPointButton", "onReviewCorrectPoint"),
                            ("reviewCorrectBoxButton", "onReviewCorrectBox"),
                            ("reviewMoveButton", "onReviewMove"),
                            ("reviewVanishedButton", "onReviewVanished"),
                            ("reviewNewLesionButton", "onReviewNewLesion")):
        assert re.search(rf"\(ui\.{button}, self\.{handler}\)", source), button
    assert 'ui.reviewTable.connect("currentCellChanged(int,int,int,int)", self.onReviewCellChanged)' in source
    assert "self.logic.showLesion(" in source and "self.logic.correctionJob(" in source
    for handler in ("showTrackResults", "showCorrection", "onUndo"):  # the review table follows every change
        body = inspect.getsource(getattr(widget.LesionLocatorPanel, handler))
        assert "self.updateReviewTable()" in body, handler
