"""The module's self-test cases (run by ``LesionLocatorTest`` in ``LesionLocator.py``, inside Slicer
or on slicer-core's MRML scene under pytest).

On a synthetic CT (an oblique, anisotropic volume under a parent transform) with the demo model
when installed, else a tiny random-weight model in the official layout (``build_test_models.py``):
then they check geometry and lesion identity, not segmentation quality. Tracking: with the demo
model and demo case it segments the demo baseline from its points, tracks through the follow-ups
and asks for Dice >= 0.8 for every lesion at every timepoint; without them it tracks the phantom
through shifted follow-ups and checks geometry and identity. Without torch and nnunetv2 (extension
build machines) the test is skipped with the reason.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import vtk

import slicer

from . import dependencies, models, results, scene, trackoutputs
from .logic import LesionLocatorLogic

MIN_DEMO_DICE = 0.8


class SelfTestCases:
    """Mixed into the module's ``ScriptedLoadableModuleTest`` (``self.assert*``, ``self.delayDisplay``)."""

    def setUp(self):
        """Skips (``unittest.SkipTest`` with the reason) where torch or nnunetv2 are missing; Slicer's
        test runner calls it before each ``test_*`` method, the module's Reload and Test via runTest."""
        self._tempDir = None
        reason = dependencies.self_test_skip_reason()
        if reason:
            self.skipTest(reason)
        slicer.mrmlScene.Clear()

    def tearDown(self):
        if self._tempDir is not None:
            self._tempDir.cleanup()

    def runTest(self):
        for test in (self.test_PointLandsOnClickedVoxel, self.test_ResegmentKeepsLesionIdentity,
                     self.test_PromptOutsideVolumeLeavesSceneUnchanged, self.test_TrackThroughFollowUps):
            self.setUp()
            try:
                test()
            finally:
                self.tearDown()

    # -- fixtures
    def _modelPath(self):
        path = models.defaultModelPath()
        if path:
            return path
        if self._tempDir is None:
            self._tempDir = tempfile.TemporaryDirectory(prefix="LesionLocatorTest")
        return str(self._testModelBuilder().build_tiny_checkpoint(self._tempDir.name))

    @staticmethod
    def _testModelBuilder():
        """``build_test_models``: importable, in the source checkout's Testing/, or installed with
        the extension under LesionLocatorTesting/."""
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        installed, checkout = os.path.join(here, "LesionLocatorTesting"), os.path.join(os.path.dirname(here), "Testing")
        for folder in (None, installed, checkout):
            if folder is not None and os.path.isdir(folder) and folder not in sys.path:
                sys.path.append(folder)
            if importlib.util.find_spec("build_test_models") is not None:
                import build_test_models
                return build_test_models
        raise RuntimeError("no demo model and no build_test_models.py to build a test model")

    @staticmethod
    def _phantomVolume(name="LesionLocatorTestCT", shift=(0, 0, 0)):
        """A 20x40x36 (k, j, i) CT-like volume, spacing 0.9 x 1.2 x 2.5 mm, rotated axes, under a
        rotating + translating parent transform. A 7 mm lesion at voxel (10, 20, 18) (+ ``shift``
        voxels, for follow-ups)."""
        k, j, i = np.meshgrid(np.arange(20), np.arange(40), np.arange(36), indexing="ij")
        array = np.full((20, 40, 36), -1000, dtype=np.int16)
        array[((j - 19.5) / 17) ** 2 + ((i - 17.5) / 16) ** 2 <= 1] = 40
        c = np.array([10, 20, 18]) + np.asarray(shift)
        array[((k - c[0]) * 2.5) ** 2 + ((j - c[1]) * 1.2) ** 2 + ((i - c[2]) * 0.9) ** 2 <= 7.0 ** 2] = 130
        angle = np.deg2rad(25)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        ijkToRas = np.eye(4)
        ijkToRas[:3, :3] = rotation @ np.diag([0.9, 1.2, 2.5])
        ijkToRas[:3, 3] = [-20.0, 15.0, 40.0]
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRas))
        slicer.util.updateVolumeFromArray(volume, array)
        volume.CreateDefaultDisplayNodes()
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name + " transform")
        moving = vtk.vtkTransform()
        moving.RotateX(15)
        moving.RotateZ(-10)
        moving.Translate(5.0, -7.0, 12.0)
        transform.SetMatrixTransformToParent(moving.GetMatrix())
        volume.SetAndObserveTransformNodeID(transform.GetID())
        return volume, (10, 20, 18)

    @staticmethod
    def _worldRasOfVoxel(volume, kji):
        """World RAS of a (continuous) voxel index (k, j, i), through the volume's transforms."""
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        local = ijkToRas.MultiplyPoint([float(kji[2]), float(kji[1]), float(kji[0]), 1.0])[:3]
        world = [0.0, 0.0, 0.0]
        volume.TransformPointToWorld(local, world)  # applies the volume's parent transforms
        return world

    def _clicks(self, volume, voxels, name="clicks"):
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        for voxel in voxels:
            points.AddControlPointWorld(*self._worldRasOfVoxel(volume, voxel))
        return points

    # -- tests
    def test_PointLandsOnClickedVoxel(self):
        self.delayDisplay("A click in world RAS reaches the library on the clicked voxel")
        logic = LesionLocatorLogic()
        volume, voxel = self._phantomVolume()
        points = self._clicks(volume, [voxel])
        image = scene.volumeToImage(volume)
        spec = scene.promptsFromNodes(points)[0]
        self.assertEqual(tuple(int(v) for v in np.round(image.world_to_index(spec.lps))), voxel)
        self.assertEqual(image.array[voxel], 130)
        result = logic.segment(volume, points, modelPath=self._modelPath(), device="cpu")
        self.assertTrue(results.isResultNode(result))
        self.assertEqual(result.GetName(), "LesionLocatorTestCT lesions")
        self.assertEqual(result.GetTransformNodeID(), volume.GetTransformNodeID())
        self.assertEqual(result.GetNodeReferenceID(result.GetReferenceImageGeometryReferenceRole()), volume.GetID())
        segment = result.GetSegmentation().GetSegment("lesion_1")
        self.assertIsNotNone(segment)
        self.assertEqual(segment.GetName(), "Lesion 1")
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(result, "lesion_1", volume)
        self.assertEqual(mask.shape, image.shape)
        self.assertTrue(np.array_equal(mask > 0, logic.lastResponse.masks[1]))
        self.delayDisplay("Test passed")

    def test_ResegmentKeepsLesionIdentity(self):
        self.delayDisplay("Re-segmenting keeps segment IDs, names and colours")
        logic = LesionLocatorLogic()
        volume, voxel = self._phantomVolume()
        points = self._clicks(volume, [voxel, (8, 12, 10)])
        model = self._modelPath()
        first = logic.segment(volume, points, modelPath=model, device="cpu")
        segmentation = first.GetSegmentation()
        before = {sid: (segmentation.GetSegment(sid).GetName(), segmentation.GetSegment(sid).GetColor())
                  for sid in segmentation.GetSegmentIDs()}
        self.assertEqual(sorted(before), ["lesion_1", "lesion_2"])
        loads = logic.runner.loads
        second = logic.segment(volume, (points, 1), modelPath=model, device="cpu")
        self.assertIs(second, first)
        self.assertEqual(logic.runner.loads, loads, "the cached model must be reused")
        after = {sid: (segmentation.GetSegment(sid).GetName(), segmentation.GetSegment(sid).GetColor())
                 for sid in segmentation.GetSegmentIDs()}
        self.assertEqual(after, before)
        self.delayDisplay("Test passed")

    def test_PromptOutsideVolumeLeavesSceneUnchanged(self):
        self.delayDisplay("A prompt outside the volume is an error and changes nothing")
        from LesionLocatorLib.prompts import PromptError

        logic = LesionLocatorLogic()
        volume, _ = self._phantomVolume()
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
        points.AddControlPointWorld(500.0, 500.0, 500.0)
        count = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(PromptError) as raised:
            logic.segment(volume, points, modelPath=self._modelPath(), device="cpu")
        self.assertIn("outside the image", str(raised.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Test passed")

    def test_TrackThroughFollowUps(self):
        logic = LesionLocatorLogic()
        if models.defaultModelPath() and models.demoCasePath():
            self._trackDemoCase(logic)
        else:
            self._trackPhantom(logic)

    def _trackPhantom(self, logic):
        self.delayDisplay("Tracking keeps lesion identity through follow-ups (phantom)")
        baseline, voxel = self._phantomVolume("Baseline")
        followUps = [self._phantomVolume(f"Follow-up {t}", shift=(0, 2 * t, -t))[0] for t in (1, 2)]
        model = self._modelPath()
        first = logic.segment(baseline, self._clicks(baseline, [voxel, (8, 12, 10)]), modelPath=model, device="cpu")
        first.GetSegmentation().GetSegment("lesion_2").SetName("Node in the liver")
        outputs = logic.track(baseline, followUps, modelPath=model, device="cpu", registration="none")
        self.assertIs(outputs.segmentationNodes[0], first)
        self.assertEqual([n.GetName() for n in outputs.segmentationNodes],
                         ["Baseline lesions", "Follow-up 1 lesions", "Follow-up 2 lesions"])
        expected = {sid: (first.GetSegmentation().GetSegment(sid).GetName(),
                          first.GetSegmentation().GetSegment(sid).GetColor()) for sid in ("lesion_1", "lesion_2")}
        for volume, node in zip(outputs.volumeNodes[1:], outputs.segmentationNodes[1:]):
            self.assertTrue(results.isResultNode(node))
            self.assertEqual(node.GetTransformNodeID(), volume.GetTransformNodeID())
            segmentation = node.GetSegmentation()
            self.assertEqual(sorted(segmentation.GetSegmentIDs()), ["lesion_1", "lesion_2"])
            for sid, (name, color) in expected.items():
                segment = segmentation.GetSegment(sid)
                self.assertEqual((segment.GetName(), segment.GetColor()), (name, color))
                self.assertIn(results.segmentTag(segment, results.TAG_STATUS), trackoutputs.STATUSES)
                mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, sid, volume)
                self.assertEqual(mask.shape, slicer.util.arrayFromVolume(volume).shape)
        self.assertEqual(outputs.tableNode.GetNumberOfRows(), 2 * 3)
        self.assertEqual(outputs.segmentationSequenceNode.GetNumberOfDataNodes(), 3)
        self.assertEqual(outputs.volumeSequenceNode.GetNumberOfDataNodes(), 3)
        self.assertEqual(len(outputs.plotSeriesNodes), 2)
        self.delayDisplay("Test passed")

    def _loadDemoCase(self, case):
        from LesionLocatorLib.demo import demo_scans
        from LesionLocatorLib.image import read_image

        volumes, truths = [], []
        for path in demo_scans(Path(case)):
            volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", path.name[:-len(".nii.gz")])
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(str(path))
            self.assertTrue(storage.ReadData(volume), f"could not read {path.name}")
            volume.CreateDefaultDisplayNodes()
            truth = read_image(path.with_name(path.name.replace(".nii.gz", "_label.nii.gz")))
            self.assertTrue(truth.same_geometry(scene.volumeToImage(volume), tol=1e-3),
                            f"{path.name}: label and scan geometry differ")
            volumes.append(volume)
            truths.append(np.asarray(truth.array))
        return volumes, truths

    def _trackDemoCase(self, logic):
        """The demo case: segment the baseline from demo_points.json, track, Dice >= 0.8."""
        from LesionLocatorLib.evaluate import dice
        from LesionLocatorLib.prompts import parse_upstream_json

        self.delayDisplay("Tracking the demo case with the demo model")
        case = models.demoCasePath()
        volumes, truths = self._loadDemoCase(case)
        with open(os.path.join(case, "demo_points.json")) as f:
            prompts = parse_upstream_json(json.load(f), "demo_points.json")
        points = self._clicks(volumes[0], [p.coords for p in prompts], "demo points")  # baseline voxels (z, y, x)
        model = models.defaultModelPath()
        baseline = logic.segment(volumes[0], points, modelPath=model, lesionIds=[p.id for p in prompts])
        outputs = logic.track(volumes[0], volumes[1:], modelPath=model, order="given")
        self.assertIs(outputs.segmentationNodes[0], baseline)
        scores = []
        for t, (volume, node) in enumerate(zip(outputs.volumeNodes, outputs.segmentationNodes)):
            for prompt in prompts:
                mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, f"lesion_{prompt.id}", volume) > 0
                scores.append((t, prompt.id, dice(mask, truths[t] == prompt.id)))
        logging.info("LesionLocator demo Dice (timepoint, lesion, Dice): " + ", ".join(
            f"({t}, {i}, {d:.3f})" for t, i, d in scores))
        self.lastDemoDice = scores
        low = [(t, i, round(d, 3)) for t, i, d in scores if d < MIN_DEMO_DICE]
        self.assertFalse(low, f"Dice below {MIN_DEMO_DICE} (timepoint, lesion, Dice): {low}")
        self.delayDisplay("Test passed")
