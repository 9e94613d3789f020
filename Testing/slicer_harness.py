"""Run the LesionLocator Slicer module's Logic on a real MRML scene, without the Slicer application.

PyPI ``slicer-core`` ships the real MRML scene, node classes and module logics (the same
C++ that runs inside Slicer), but not the Qt application around them. This harness builds
the part of the application the module's Logic needs:

* a ``vtkMRMLScene`` and a ``vtkSlicerApplicationLogic``, and the module logics -- colours,
  volumes, segmentations, markups, transforms, sequences, subject hierarchy -- each given
  the application logic and the scene and registered with ``SetModuleLogic`` as Slicer's
  module manager does. The wheel has no share folder, so the application points at a
  temporary one holding a generated ``GenericColors.txt`` (the table label maps ask for);
  terminologies are not loaded;
* ``slicer.mrmlScene``, a small ``slicer.modules`` namespace (``slicer.modules.volumes.logic()``
  etc., what ``slicer.util`` and module code call) and a minimal ``slicer.app``;
* subject-hierarchy items for data nodes. In Slicer, Qt subject-hierarchy plugins create
  them when a node is added and remove them with the node; the harness does the same on
  ``NodeAddedEvent``/``NodeRemovedEvent``;
* stand-ins for what the wheel lacks: the ``qt`` and ``ctk`` modules (empty: any attribute
  raises an error naming it, so GUI code that runs by mistake fails loudly),
  ``slicer.ScriptedLoadableModule`` (the four base classes, behaving like Slicer's for
  everything that does not need Qt) and ``slicer.i18n`` (``tr``/``translate`` return the text).

Stand-ins are installed only where the real module is missing, so running the same tests
inside Slicer's Python uses the real ones.

Usage: ``pytest_plugins = ["slicer_harness"]`` or import the fixtures; ``slicer_scene`` gives
a fresh :class:`SlicerHarness` per test; ``lesionlocator_module`` imports
``LesionLocator/LesionLocator.py``.
"""
from __future__ import annotations

import importlib
import logging
import sys
import tempfile
import types
import unittest
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "LesionLocator"


# ------------------------------------------------------------------------------ stand-ins
class _MissingInHarness(types.ModuleType):
    """A module whose every attribute raises: GUI code must not run under the harness."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{self.__name__}.{name} is not available outside the Slicer application "
                             f"(test harness stand-in); only the Widget may use {self.__name__}")


def _scripted_loadable_module_standin() -> types.ModuleType:
    """``slicer.ScriptedLoadableModule``: the base classes without their Qt parts."""
    import slicer

    mod = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = self.__class__.__name__
            parent.title = ""
            parent.categories = []
            parent.dependencies = []
            parent.contributors = []
            parent.helpText = ""
            parent.acknowledgementText = ""
            if not hasattr(slicer, "selfTests"):
                slicer.selfTests = {}
            slicer.selfTests[self.moduleName] = self.runTest

        def resourcePath(self, filename):
            return str(Path(self.parent.path).parent / "Resources" / filename)

        def getDefaultModuleDocumentationLink(self, docPage=None):
            return ""

        def runTest(self, msec=0, **kwargs):
            module = importlib.import_module(self.__module__)
            testCase = getattr(module, self.moduleName + "Test")()
            testCase.messageDelay = msec
            testCase.runTest(**kwargs)

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            raise RuntimeError("module widgets need the Slicer application (not available in the test harness)")

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[:-5]
            self.isSingletonParameterNode = True

        def getParameterNode(self):
            scene = slicer.mrmlScene
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is not None:
                if node.GetAttribute("ModuleName") != self.moduleName:
                    node.SetAttribute("ModuleName", self.moduleName)
                return node
            return scene.AddNode(self.createParameterNode())

        def getAllParameterNodes(self):
            scene = slicer.mrmlScene
            nodes = [scene.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
                     for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode"))]
            return [n for n in nodes if n.GetAttribute("ModuleName") == self.moduleName]

        def createParameterNode(self):
            scene = slicer.mrmlScene
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.enableScreenshots = False
            self.screenshotScaleFactor = 1.0

        def delayDisplay(self, message, requestedDelay=None, msec=None):
            logging.info(message)

        def takeScreenshot(self, name, description, type=-1):
            logging.info(description)

        def runTest(self):
            logging.warning("No test is defined in " + self.__class__.__name__)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        cls.__module__ = mod.__name__
        setattr(mod, cls.__name__, cls)
    mod.__all__ = ["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                   "ScriptedLoadableModuleTest"]
    return mod


def _i18n_standin() -> types.ModuleType:
    """``slicer.i18n``: Slicer's translation helpers without Qt (the text is returned as it is)."""
    mod = types.ModuleType("slicer.i18n")
    mod.tr = lambda text: text
    mod.translate = lambda context, text: text
    return mod


def install_standins() -> None:
    """Put the stand-ins into ``sys.modules`` where the real modules are missing."""
    import slicer

    for name in ("qt", "ctk"):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _MissingInHarness(name)
    try:
        importlib.import_module("slicer.i18n")
    except ImportError:
        sys.modules["slicer.i18n"] = slicer.i18n = _i18n_standin()
    try:
        importlib.import_module("slicer.ScriptedLoadableModule")
    except ImportError:
        mod = _scripted_loadable_module_standin()
        sys.modules["slicer.ScriptedLoadableModule"] = mod
        slicer.ScriptedLoadableModule = mod


class _AppStandin:
    """The few ``slicer.app`` members that non-GUI code calls."""

    def __init__(self, harness):
        self._harness = harness
        self.commandOptions = lambda: types.SimpleNamespace(testingEnabled=True)

    def processEvents(self, *args):
        pass

    def applicationLogic(self):
        return self._harness.appLogic

    def mrmlScene(self):
        return self._harness.scene

    @property
    def testingEnabled(self):
        return True


class _ModuleStandin:
    def __init__(self, name, logic, path=None):
        self.name = name
        self._logic = logic
        self.path = path

    def logic(self):
        return self._logic


# ------------------------------------------------------------------------------ the scene
class SlicerHarness:
    """A real MRML scene with the application and module logics the LesionLocator module uses."""

    MODULE_LOGICS = {  # Slicer module name -> slicer-core logic class name
        "SubjectHierarchy": "vtkSlicerSubjectHierarchyModuleLogic",
        "Volumes": "vtkSlicerVolumesLogic",
        "Segmentations": "vtkSlicerSegmentationsModuleLogic",
        "Markups": "vtkSlicerMarkupsLogic",
        "Transforms": "vtkSlicerTransformLogic",
        "Sequences": "vtkSlicerSequencesLogic",
    }

    def __init__(self):
        import slicer
        from vtkmodules.vtkCommonCore import vtkCollection

        self.scene = slicer.vtkMRMLScene()
        self.appLogic = slicer.vtkSlicerApplicationLogic()
        # The wheel has no share folder (colour files, terminologies): point the application
        # at an empty one so the colour logic builds its default colour nodes without files.
        self._share = tempfile.TemporaryDirectory(prefix="slicer_harness_share")
        colorFiles = Path(self._share.name, "share", "ColorFiles")
        colorFiles.mkdir(parents=True)
        # label maps (e.g. slicer.util's temporary ones) look for this default table
        (colorFiles / "GenericColors.txt").write_text(
            "0 background 0 0 0 0\n" + "".join(f"{i} label_{i} {(i * 67) % 256} {(i * 131) % 256} "
                                                  f"{(i * 199) % 256} 255\n" for i in range(1, 256)))
        self.appLogic.SetHomeDirectory(self._share.name)
        self.appLogic.SetShareDirectory("share")
        self.appLogic.SetMRMLScene(self.scene)
        colors = slicer.vtkSlicerColorLogic()  # the Colors module's logic, as in Slicer
        colors.SetMRMLApplicationLogic(self.appLogic)
        self.appLogic.SetColorLogic(colors)
        colors.SetMRMLScene(self.scene)
        self.appLogic.SetSliceLogics(vtkCollection())
        self.appLogic.SetViewLogics(vtkCollection())
        self.logics = {"Colors": colors}
        self.appLogic.SetModuleLogic("Colors", colors)
        for name, className in self.MODULE_LOGICS.items():
            logic = getattr(slicer, className)()
            logic.SetMRMLApplicationLogic(self.appLogic)
            logic.SetMRMLScene(self.scene)
            self.appLogic.SetModuleLogic(name, logic)
            self.logics[name] = logic
        # Terminologies are left out: the wheel ships no terminology files (segments get
        # their colours from the module's colour list).
        self._observers = [self.scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, self._onNodeAdded),
                           self.scene.AddObserver(slicer.vtkMRMLScene.NodeRemovedEvent, self._onNodeRemoved)]
        self._saved = {}

    # In Slicer, Qt subject-hierarchy plugins give every data node an item under the scene
    # and remove the item when the node is removed.
    def _onNodeAdded(self, scene, event, node=None):
        if node is None or node.GetHideFromEditors():
            return
        if not (node.IsA("vtkMRMLDisplayableNode") or node.IsA("vtkMRMLTransformNode")
                or node.IsA("vtkMRMLTableNode")):
            return
        sh = scene.GetSubjectHierarchyNode()
        if sh is not None and not sh.GetItemByDataNode(node):
            sh.CreateItem(sh.GetSceneItemID(), node)

    def _onNodeRemoved(self, scene, event, node=None):
        sh = scene.GetSubjectHierarchyNode()
        if node is None or sh is None or node is sh:
            return
        item = sh.GetItemByDataNode(node)
        if item:
            sh.RemoveItem(item, False, False)  # keep the (already removed) node, keep children

    from vtkmodules.vtkCommonCore import VTK_OBJECT
    _onNodeAdded.CallDataType = VTK_OBJECT  # receive the node as call data
    _onNodeRemoved.CallDataType = VTK_OBJECT
    del VTK_OBJECT

    def activate(self) -> "SlicerHarness":
        """Make this scene ``slicer.mrmlScene`` and install ``slicer.modules``/``slicer.app``."""
        import slicer

        install_standins()
        for attr in ("mrmlScene", "modules", "app"):
            self._saved[attr] = getattr(slicer, attr, None)
        slicer.mrmlScene = self.scene
        slicer.app = _AppStandin(self)
        modules = types.SimpleNamespace()
        for name, logic in self.logics.items():
            setattr(modules, name.lower(), _ModuleStandin(name, logic))
        modules.lesionlocator = _ModuleStandin("LesionLocator", None, str(MODULE_DIR / "LesionLocator.py"))
        slicer.modules = modules
        return self

    def deactivate(self) -> None:
        import slicer

        for tag in self._observers:
            self.scene.RemoveObserver(tag)
        self.scene.Clear(True)
        self._share.cleanup()
        for attr, value in self._saved.items():
            if value is None:
                if hasattr(slicer, attr):
                    delattr(slicer, attr)
            else:
                setattr(slicer, attr, value)

    # --------------------------------------------------------------------- conveniences
    def node_ids(self) -> list:
        """IDs of all nodes in the scene (to check that a failed call added nothing)."""
        return [self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())]

    def add_volume(self, array_kji, ijk_to_ras, name="volume"):
        """A scalar volume from a (k, j, i) array and a 4x4 IJK-to-RAS matrix."""
        import slicer
        import slicer.util

        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras))
        slicer.util.updateVolumeFromArray(node, array_kji)
        node.CreateDefaultDisplayNodes()
        return node

    def voxel_buffers(self) -> dict:
        """{address of a voxel buffer: number of voxels} of every volume in the scene, the items of
        every sequence included: the memory the scene's images really use (shared buffers count once)."""
        import slicer
        from vtk.util import numpy_support

        images = []
        for node in slicer.util.getNodesByClass("vtkMRMLVolumeNode"):
            images.append(node.GetImageData())
        for sequence in slicer.util.getNodesByClass("vtkMRMLSequenceNode"):
            for i in range(sequence.GetNumberOfDataNodes()):
                item = sequence.GetNthDataNode(i)
                if item is not None and item.IsA("vtkMRMLVolumeNode"):
                    images.append(item.GetImageData())
        buffers = {}
        for image in images:
            scalars = image.GetPointData().GetScalars() if image is not None else None
            if scalars is not None and scalars.GetNumberOfTuples():
                address = numpy_support.vtk_to_numpy(scalars).__array_interface__["data"][0]
                buffers[address] = scalars.GetNumberOfTuples()
        return buffers

    def add_linear_transform(self, matrix_to_parent, name="transform", parent=None):
        import slicer.util

        node = self.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
        node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(matrix_to_parent))
        if parent is not None:
            node.SetAndObserveTransformNodeID(parent.GetID())
        return node


OBLIQUE_SPACING = (0.9, 1.2, 2.5)  # i, j, k in mm


def oblique_ijk_to_ras(spacing=OBLIQUE_SPACING, origin=(-20.0, 15.0, 40.0), axis=(1, 0.5, 0.3), degrees=25.0):
    """The 4x4 IJK-to-RAS matrix of the module tests' oblique, anisotropic volume: index axes rotated
    ``degrees`` about an oblique ``axis`` (through MRML's own vtkTransform), ``spacing`` mm, ``origin`` RAS mm."""
    import numpy as np
    import slicer.util
    import vtk

    t = vtk.vtkTransform()
    t.RotateWXYZ(degrees, *axis)
    m = np.eye(4)
    m[:3, :3] = slicer.util.arrayFromVTKMatrix(t.GetMatrix())[:3, :3] @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def import_module_file():
    """Import ``LesionLocator/LesionLocator.py`` as Slicer does (its folder on sys.path)."""
    install_standins()
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    return importlib.import_module("LesionLocator")


@pytest.fixture
def slicer_scene():
    """A fresh MRML scene with application and module logics, active as ``slicer.mrmlScene``."""
    harness = SlicerHarness().activate()
    try:
        yield harness
    finally:
        harness.deactivate()


@pytest.fixture(scope="session")
def lesionlocator_module():
    """The scripted module file ``LesionLocator/LesionLocator.py``, imported."""
    return import_module_file()
