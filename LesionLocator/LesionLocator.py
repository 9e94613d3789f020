"""LesionLocator: promptable lesion segmentation in 3D Slicer.

Click a lesion (point) or draw a box (ROI) on a CT; the LesionLocator network segments it.

Everything the module does is in :class:`LesionLocatorLogic`, usable from the Python console
without the GUI::

    logic = slicer.util.getModuleLogic("LesionLocator")
    seg = logic.segment(getNode("CT"), getNode("F"), modelPath="/models/LesionLocatorCheckpoint")

The network code is the pure-Python library ``LesionLocatorLib`` (LPS world millimetres,
arrays (z, y, x)); this file only converts between MRML nodes and the library, in
:meth:`LesionLocatorLogic.toLps` and :meth:`LesionLocatorLogic.volumeToImage`.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import vtk

import qt
import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin


def _makeLibraryImportable() -> None:
    """The installed extension ships ``LesionLocatorLib/`` next to this file (the scripted
    modules folder is on ``sys.path``); a source checkout has it one folder up."""
    if importlib.util.find_spec("LesionLocatorLib") is not None:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "LesionLocatorLib", "__init__.py")):
            sys.path.insert(0, folder)
            return


_makeLibraryImportable()
# Only light imports here: torch and nnunetv2 may still be missing when Slicer loads the
# module (the Widget offers to install them); the library is imported where it is used.


class TransformError(ValueError):
    """A volume under a transform the module cannot apply to its voxel grid."""


class MissingDependencyError(RuntimeError):
    """torch, nnunetv2 or another required Python package is not installed."""


#
# LesionLocator
#
class LesionLocator(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "LesionLocator"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["LesionLocator for 3D Slicer contributors"]
        self.parent.helpText = (
            "Promptable 3D lesion segmentation in CT with LesionLocator (Rokuss et al., CVPR 2025): "
            "click a lesion or draw a box around it, and get its 3D mask as a segment. "
            "Each control point of a point list and each ROI is one lesion; results go to a "
            "segmentation named '&lt;volume&gt; lesions', one segment per lesion. "
            "Your own segmentations are never overwritten.")
        self.parent.helpText += ('<p>Documentation: <a href="https://github.com/lesionlocator/SlicerLesionLocator">'
                                 'the project page</a>.</p>')
        self.parent.acknowledgementText = (
            "LesionLocator: M. Rokuss, Y. Kirchhoff, S. Akbal, B. Kovacs, S. Roy, C. Ulrich, T. Wald, "
            "L. T. Rotkopf, H.-P. Schlemmer, K. Maier-Hein, 'LesionLocator: Zero-Shot Universal Tumor "
            "Segmentation and Tracking in 3D Whole-Body Imaging', CVPR 2025. Built on nnU-Net v2.")


#
# LesionLocatorWidget
#
class LesionLocatorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the .ui to the Logic and the parameter node; no behaviour of its own."""

    SETTINGS_MODEL_PATH = "LesionLocator/ModelPath"

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._busy = False
        self._observedPromptNode = None

    # ------------------------------------------------------------------ set-up
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LesionLocator.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LesionLocatorLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.baselineVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.promptNodeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.foldsLineEdit.connect("editingFinished()", self.updateParameterNodeFromGUI)
        self.ui.ttaCheckBox.connect("stateChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.autoSegmentCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)

        self.ui.placePointButton.connect("clicked()", self.onPlacePoint)
        self.ui.placeBoxButton.connect("clicked()", self.onPlaceBox)
        self.ui.segmentButton.connect("clicked()", self.onSegment)
        self.ui.refineButton.connect("clicked()", self.onRefine)
        self.ui.trackButton.connect("clicked()", self.onTrack)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.installDependenciesButton.connect("clicked()", self.onInstallDependencies)
        self.ui.baselineVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateFollowUpList)
        self.ui.refineSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtonStates)
        self.ui.refineSegmentSelector.connect("currentSegmentChanged(QString)", self.updateButtonStates)

        savedPath = qt.QSettings().value(self.SETTINGS_MODEL_PATH, "")
        self.initializeParameterNode()
        if savedPath and not self._parameterNode.GetParameter(LesionLocatorLogic.PARAM_MODEL_PATH):
            self._parameterNode.SetParameter(LesionLocatorLogic.PARAM_MODEL_PATH, savedPath)
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setEnabled(False)
        self.updateDependencyStatus()

    def cleanup(self):
        self.removeObservers()
        if self.logic is not None:
            self.logic.cleanup()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self):
        node = self.logic.getParameterNode()
        self.logic.setDefaultParameters(node)
        if not node.GetNodeReference(LesionLocatorLogic.REF_BASELINE):
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                node.SetNodeReferenceID(LesionLocatorLogic.REF_BASELINE, first.GetID())
        self.setParameterNode(node)

    def setParameterNode(self, node):
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = node
        if node is not None:
            self.addObserver(node, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        node = self._parameterNode
        if node is None or self._updatingGUIFromParameterNode:
            return
        L = LesionLocatorLogic
        self._updatingGUIFromParameterNode = True
        try:
            self.ui.baselineVolumeSelector.setCurrentNode(node.GetNodeReference(L.REF_BASELINE))
            self.ui.promptNodeSelector.setCurrentNode(node.GetNodeReference(L.REF_PROMPTS))
            self.ui.modelPathLineEdit.currentPath = node.GetParameter(L.PARAM_MODEL_PATH)
            index = self.ui.deviceComboBox.findText(node.GetParameter(L.PARAM_DEVICE))
            self.ui.deviceComboBox.setCurrentIndex(max(index, 0))
            self.ui.foldsLineEdit.text = node.GetParameter(L.PARAM_FOLDS)
            tta = node.GetParameter(L.PARAM_TTA)
            self.ui.ttaCheckBox.setCheckState({"on": qt.Qt.Checked, "off": qt.Qt.Unchecked}.get(
                tta, qt.Qt.PartiallyChecked))
            self.ui.autoSegmentCheckBox.checked = node.GetParameter(L.PARAM_AUTO_SEGMENT) == "true"
            self.observePromptNode(node.GetNodeReference(L.REF_PROMPTS))
            self.updateButtonStates()
        finally:
            self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, *args):
        node = self._parameterNode
        if node is None or self._updatingGUIFromParameterNode:
            return
        L = LesionLocatorLogic
        wasModified = node.StartModify()
        node.SetNodeReferenceID(L.REF_BASELINE, self.ui.baselineVolumeSelector.currentNodeID)
        node.SetNodeReferenceID(L.REF_PROMPTS, self.ui.promptNodeSelector.currentNodeID)
        node.SetParameter(L.PARAM_MODEL_PATH, self.ui.modelPathLineEdit.currentPath)
        node.SetParameter(L.PARAM_DEVICE, self.ui.deviceComboBox.currentText)
        node.SetParameter(L.PARAM_FOLDS, self.ui.foldsLineEdit.text.strip())
        state = self.ui.ttaCheckBox.checkState()
        node.SetParameter(L.PARAM_TTA, "on" if state == qt.Qt.Checked else "off" if state == qt.Qt.Unchecked else "auto")
        node.SetParameter(L.PARAM_AUTO_SEGMENT, "true" if self.ui.autoSegmentCheckBox.checked else "false")
        node.EndModify(wasModified)
        if self.ui.modelPathLineEdit.currentPath:
            qt.QSettings().setValue(self.SETTINGS_MODEL_PATH, self.ui.modelPathLineEdit.currentPath)

    def updateButtonStates(self, *args):
        node = self._parameterNode
        haveVolume = node is not None and node.GetNodeReference(LesionLocatorLogic.REF_BASELINE) is not None
        havePrompts = node is not None and node.GetNodeReference(LesionLocatorLogic.REF_PROMPTS) is not None
        for button in (self.ui.placePointButton, self.ui.placeBoxButton):
            button.enabled = haveVolume and not self._busy
        self.ui.segmentButton.enabled = haveVolume and havePrompts and not self._busy
        self.ui.refineButton.enabled = (haveVolume and not self._busy
                                        and self.ui.refineSegmentSelector.currentNodeID() != ""
                                        and bool(self.ui.refineSegmentSelector.currentSegmentID()))
        self.ui.trackButton.enabled = False
        self.ui.trackButton.toolTip = "Tracking through follow-ups comes with the next release."
        self.ui.cancelButton.enabled = self._busy

    def updateFollowUpList(self, *args):
        """Every other scalar volume, checkable, in the order the user arranges them."""
        baseline = self.ui.baselineVolumeSelector.currentNode()
        checked = {self.ui.followUpList.item(i).data(qt.Qt.UserRole)
                   for i in range(self.ui.followUpList.count)
                   if self.ui.followUpList.item(i).checkState() == qt.Qt.Checked}
        self.ui.followUpList.clear()
        for volume in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
            if volume is baseline or volume.IsA("vtkMRMLLabelMapVolumeNode"):
                continue
            item = qt.QListWidgetItem(volume.GetName())
            item.setData(qt.Qt.UserRole, volume.GetID())
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if volume.GetID() in checked else qt.Qt.Unchecked)
            self.ui.followUpList.addItem(item)

    # ------------------------------------------------------------------ prompts
    def onPlacePoint(self):
        node = self._parameterNode.GetNodeReference(LesionLocatorLogic.REF_PROMPTS)
        if node is None or not node.IsA("vtkMRMLMarkupsFiducialNode"):
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                                      slicer.mrmlScene.GenerateUniqueName("Lesion points"))
            node.CreateDefaultDisplayNodes()
            self._parameterNode.SetNodeReferenceID(LesionLocatorLogic.REF_PROMPTS, node.GetID())
        slicer.modules.markups.logic().SetActiveList(node)
        slicer.modules.markups.logic().StartPlaceMode(True)

    def onPlaceBox(self):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode",
                                                  slicer.mrmlScene.GenerateUniqueName("Lesion box"))
        node.CreateDefaultDisplayNodes()
        self._parameterNode.SetNodeReferenceID(LesionLocatorLogic.REF_PROMPTS, node.GetID())
        slicer.modules.markups.logic().SetActiveList(node)
        slicer.modules.markups.logic().StartPlaceMode(False)

    def observePromptNode(self, node):
        """Segment on click: a point placed or an ROI released runs that one lesion."""
        if node is self._observedPromptNode:
            return
        if self._observedPromptNode is not None:
            self.removeObserver(self._observedPromptNode, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                                self.onPromptDefined)
            self.removeObserver(self._observedPromptNode, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent,
                                self.onPromptDefined)
        self._observedPromptNode = node
        if node is not None:
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPromptDefined)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onPromptDefined)

    @vtk.calldata_type(vtk.VTK_INT)
    def onPromptDefined(self, caller, event, pointIndex=None):
        """A point was placed (event data: its index) or moved, or an ROI was placed or resized."""
        if self._busy or self._parameterNode.GetParameter(LesionLocatorLogic.PARAM_AUTO_SEGMENT) != "true":
            return
        if caller.IsA("vtkMRMLMarkupsROINode"):
            if caller.GetNumberOfDefinedControlPoints() == 0:
                return
            prompts = [caller]
        else:
            index = pointIndex if isinstance(pointIndex, int) and pointIndex >= 0 else -1
            if index < 0 and caller.GetDisplayNode() is not None:
                index = caller.GetDisplayNode().GetActiveControlPoint()
            if not 0 <= index < caller.GetNumberOfControlPoints():
                index = caller.GetNumberOfControlPoints() - 1
            if index < 0 or caller.GetNthControlPointPositionStatus(index) != slicer.vtkMRMLMarkupsNode.PositionDefined:
                return
            prompts = [(caller, index)]
        qt.QTimer.singleShot(0, lambda: self.runSegmentation(prompts))

    # ------------------------------------------------------------------ actions
    def onSegment(self):
        self.runSegmentation([self._parameterNode.GetNodeReference(LesionLocatorLogic.REF_PROMPTS)])

    def onRefine(self):
        segmentationNode = self.ui.refineSegmentSelector.currentNode()
        segmentId = self.ui.refineSegmentSelector.currentSegmentID()
        self._run(lambda **kw: self.logic.refineFromSegment(self._baseline(), segmentationNode, segmentId, **kw))

    def onTrack(self):
        slicer.util.infoDisplay("Tracking through follow-ups comes with the next release.")

    def onCancel(self):
        self.logic.cancel()
        self.ui.statusLabel.text = "Cancelling..."

    def runSegmentation(self, prompts):
        self._run(lambda **kw: self.logic.segment(self._baseline(), prompts, **kw))

    def _baseline(self):
        return self._parameterNode.GetNodeReference(LesionLocatorLogic.REF_BASELINE)

    def _run(self, call):
        """Run a Logic call with progress, Cancel and errors shown in a message box."""
        try:
            from LesionLocatorLib.predict import Cancelled
        except ImportError:  # torch missing: segment() raises MissingDependencyError, shown below
            Cancelled = ()

        L = LesionLocatorLogic
        node = self._parameterNode
        self._busy = True
        self.updateButtonStates()
        self.ui.progressBar.setVisible(True)
        self.ui.progressBar.value = 0

        def progress(fraction, message):
            self.ui.progressBar.value = int(100 * fraction)
            self.ui.statusLabel.text = message
            slicer.app.processEvents()  # keeps Cancel clickable while the network runs

        try:
            with slicer.util.WaitCursor():
                result = call(modelPath=node.GetParameter(L.PARAM_MODEL_PATH) or None,
                              device=node.GetParameter(L.PARAM_DEVICE) or "auto",
                              folds=node.GetParameter(L.PARAM_FOLDS) or None,
                              tta={"on": True, "off": False}.get(node.GetParameter(L.PARAM_TTA)),
                              progress=progress)
            summary = self.logic.lastRunSummary()
            self.ui.statusLabel.text = summary
            self.ui.refineSegmentSelector.setCurrentNode(result)
            if self.logic.lastResponse is not None and self.logic.lastResponse.empty:
                slicer.util.warningDisplay(summary, windowTitle="LesionLocator")
        except Cancelled:
            self.ui.statusLabel.text = "Cancelled: nothing was changed."
        except Exception as e:  # every failure is a message, not only a traceback in the log
            logging.exception("LesionLocator failed")
            self.ui.statusLabel.text = "Failed: see the message."
            slicer.util.errorDisplay(str(e), windowTitle="LesionLocator")
        finally:
            self._busy = False
            self.ui.progressBar.setVisible(False)
            self.updateButtonStates()

    # ------------------------------------------------------------------ dependencies
    def updateDependencyStatus(self):
        message = LesionLocatorLogic.checkDependencies()
        self.ui.installDependenciesButton.setVisible(message is not None)
        if message:
            self.ui.statusLabel.text = message

    def onInstallDependencies(self):
        missing = LesionLocatorLogic.missingPackages()
        if not missing:
            self.updateDependencyStatus()
            return
        text = LesionLocatorLogic.checkDependencies() + "\n\nInstall them now? This downloads several hundred MB."
        if not slicer.util.confirmOkCancelDisplay(text, windowTitle="LesionLocator"):
            return
        with slicer.util.WaitCursor():
            if "torch" in missing:
                try:
                    import PyTorchUtils
                except ImportError:
                    slicer.util.errorDisplay("Install the PyTorch extension (Extensions Manager) first: it installs "
                                             "the torch build that fits your GPU.", windowTitle="LesionLocator")
                    return
                if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
                    return
            for package in LesionLocatorLogic.pipRequirements(missing):
                slicer.util.pip_install(package)
        self.updateDependencyStatus()


#
# LesionLocatorLogic
#
@dataclass
class PromptSpec:
    """One lesion's prompt taken from the scene.

    ``ref``: where it came from (``"<point list ID>/<control point ID>"``, ``"<ROI ID>"`` or
    ``"<segmentation ID>/<segment ID>"``), stored as a segment tag so that prompting the same
    control point or ROI again replaces the same lesion. ``kind``: 'point' or 'box'.
    ``lps``: (3,) point or (N, 3) box corners, LPS world millimetres.
    """
    ref: str
    kind: str
    lps: np.ndarray

    def toLibrary(self, lesionId: int):
        from LesionLocatorLib.prompts import Box, Point

        if self.kind == "point":
            return Point(int(lesionId), tuple(float(v) for v in self.lps), name=self.ref)
        return Box.from_points(int(lesionId), self.lps, name=self.ref)


class LesionLocatorLogic(ScriptedLoadableModuleLogic):
    """MRML <-> LesionLocatorLib. Everything the module does, callable without the GUI.

    Frames: Slicer's world is RAS millimetres; volumes store IJK-to-RAS in their parent
    (transform) frame; markups store control points in their parent frame. The library speaks
    LPS world millimetres and (z, y, x) = (k, j, i) arrays. The conversion happens only in
    :meth:`toLps` (points) and :meth:`volumeToImage` (volume geometry, built on :meth:`toLps`).

    Results go to a segmentation created by this module (node attribute
    ``LesionLocator.Role = Result``), named '<volume> lesions', reference geometry = the
    volume, under the volume's parent transform; one segment per lesion with ID ``lesion_<id>``,
    name 'Lesion <id>' and a fixed colour per ID. Other segmentations are never written to.
    """

    ROLE_ATTRIBUTE = "LesionLocator.Role"
    ROLE_RESULT = "Result"
    SOURCE_VOLUME_REFERENCE = "LesionLocator.SourceVolume"
    TAG_LESION_ID = "LesionLocator.LesionID"
    TAG_PROMPT = "LesionLocator.Prompt"
    TAG_PROMPT_TYPE = "LesionLocator.PromptType"

    # parameter node
    REF_BASELINE = "BaselineVolume"
    REF_PROMPTS = "Prompts"
    PARAM_MODEL_PATH = "ModelPath"
    PARAM_DEVICE = "Device"
    PARAM_FOLDS = "Folds"
    PARAM_TTA = "TTA"
    PARAM_AUTO_SEGMENT = "AutoSegment"
    DEFAULTS = {PARAM_DEVICE: "auto", PARAM_FOLDS: "", PARAM_TTA: "auto", PARAM_AUTO_SEGMENT: "true",
                PARAM_MODEL_PATH: ""}

    # lesion N gets COLORS[(N - 1) % len(COLORS)] (RGB 0..1), the same at every timepoint
    COLORS = [
        (0.902, 0.098, 0.294), (0.235, 0.706, 0.294), (0.263, 0.388, 0.847), (0.961, 0.510, 0.192),
        (0.569, 0.118, 0.706), (0.275, 0.941, 0.941), (0.941, 0.196, 0.902), (0.824, 0.961, 0.235),
        (0.980, 0.745, 0.831), (0.000, 0.502, 0.502), (0.863, 0.745, 1.000), (0.667, 0.431, 0.157),
        (1.000, 0.980, 0.784), (0.502, 0.000, 0.000), (0.667, 1.000, 0.765), (0.502, 0.502, 0.000),
    ]

    # Required Python packages: (import name, pip requirement)
    REQUIREMENTS = [("torch", None), ("nnunetv2", "nnunetv2>=2.8"), ("SimpleITK", "SimpleITK>=2.2"),
                    ("scipy", "scipy")]

    # Where a model is looked for when no model path is given (first existing wins):
    # a model shipped in the extension, then a model in a source checkout's Resources/.
    DEMO_MODEL_SUBPATHS = [os.path.join("Resources", "Models", "LesionLocatorCheckpoint"),
                           os.path.join(os.pardir, "Resources", "DemoModel", "LesionLocatorCheckpoint")]

    def __init__(self, runner=None):
        """``runner``: a :class:`LesionLocatorLib.runner.SegmentationRunner`; default: the
        in-process runner, which keeps loaded models cached for this Logic's lifetime."""
        ScriptedLoadableModuleLogic.__init__(self)
        self._runner = runner
        self.lastResponse = None
        self.lastLesionIds = []
        self._cancelToken = None

    @property
    def runner(self):
        """The :class:`LesionLocatorLib.runner.SegmentationRunner` (created on first use, so
        that the module loads even before its dependencies are installed)."""
        if self._runner is None:
            from LesionLocatorLib.runner import InProcessRunner
            self._runner = InProcessRunner()
        return self._runner

    @runner.setter
    def runner(self, runner):
        self._runner = runner

    def useWorkerProcess(self, enabled: bool = True) -> None:
        """Run the network in a persistent worker process (``LesionLocatorLib.worker``, started
        with Slicer's ``PythonSlicer``) instead of in Slicer's own process. The model stays
        loaded in the worker; the GUI gets progress calls while waiting; Cancel stops it."""
        import shutil

        from LesionLocatorLib.runner import InProcessRunner, WorkerProcessRunner

        self.cleanup()
        if enabled:
            self._runner = WorkerProcessRunner(python=shutil.which("PythonSlicer") or sys.executable)
        else:
            self._runner = InProcessRunner()

    def cleanup(self) -> None:
        """Release the runner (stops a worker process, frees cached models)."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    # ------------------------------------------------------------------ parameters
    def setDefaultParameters(self, parameterNode) -> None:
        for name, value in self.DEFAULTS.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    # ------------------------------------------------------------------ dependencies
    @classmethod
    def missingPackages(cls) -> list:
        """Import names of required packages that are not installed (nothing is imported)."""
        return [name for name, _ in cls.REQUIREMENTS if importlib.util.find_spec(name) is None]

    @classmethod
    def pipRequirements(cls, missing) -> list:
        """pip requirements for the missing packages other than torch (torch comes from the
        PyTorch extension, which picks the build for the GPU)."""
        return [req for name, req in cls.REQUIREMENTS if name in missing and req]

    @classmethod
    def checkDependencies(cls):
        """None when everything is installed, else a message naming what is missing and how
        to install it. Never installs anything."""
        missing = cls.missingPackages()
        if not missing:
            return None
        lines = [f"LesionLocator needs Python packages that are not installed: {', '.join(missing)}."]
        if "torch" in missing:
            lines.append("torch: install the PyTorch extension (Extensions Manager), then use 'Install "
                         "dependencies' here or the PyTorch Utils module to install torch for your GPU or CPU.")
        others = cls.pipRequirements(missing)
        if others:
            lines.append("Then: slicer.util.pip_install('" + " ".join(others) + "') or 'Install dependencies'.")
        return "\n".join(lines)

    def _requireDependencies(self) -> None:
        message = self.checkDependencies()
        if message:
            raise MissingDependencyError(message)

    # ------------------------------------------------------------------ coordinates (the one place)
    @staticmethod
    def toLps(node, pointsRas) -> np.ndarray:
        """Points given in ``node``'s own (parent-transform) RAS frame, mm, shape (3,) or (N, 3)
        -> LPS world mm, shape (N, 3).

        The node's parent transforms are applied exactly (non-linear ones too, point by
        point), giving Slicer world RAS; then x and y change sign (RAS -> LPS).
        ``node=None`` means the points are world RAS already.
        """
        points = np.asarray(pointsRas, dtype=float).reshape(-1, 3)
        parent = node.GetParentTransformNode() if node is not None else None
        if parent is not None:
            toWorld = vtk.vtkGeneralTransform()
            slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, toWorld)
            points = np.array([toWorld.TransformPoint(*p) for p in points], dtype=float).reshape(-1, 3)
        return points * np.array([-1.0, -1.0, 1.0])

    @classmethod
    def volumeToImage(cls, volumeNode):
        """A scalar volume -> :class:`LesionLocatorLib.image.Image` in LPS world.

        ``array`` is a copy of the voxels in (k, j, i) = (z, y, x) order. Geometry: IJK-to-RAS
        composed with the volume's parent transforms to world, then RAS -> LPS (through
        :meth:`toLps`): ``origin`` = LPS of voxel (0, 0, 0), ``spacing`` (x, y, z) mm = lengths of
        the mapped index axes, ``direction`` columns = their unit vectors (i, j, k).

        A linear parent transform is applied (rotation, translation, uniform scaling: anything
        that keeps the voxel axes orthogonal). A non-linear parent transform raises
        :class:`TransformError` asking to harden it first: the voxel grid cannot follow it.
        """
        from LesionLocatorLib.image import Image

        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode") \
                or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            name = volumeNode.GetName() if volumeNode is not None else None
            raise ValueError(f"choose a scalar (CT) volume to segment; got {name!r}")
        imageData = volumeNode.GetImageData()
        if imageData is None or imageData.GetNumberOfPoints() == 0:
            raise ValueError(f"volume '{volumeNode.GetName()}' has no voxels")
        if imageData.GetNumberOfScalarComponents() != 1:
            raise ValueError(f"volume '{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} "
                             f"components per voxel; LesionLocator needs a single-component CT")
        parent = volumeNode.GetParentTransformNode()
        if parent is not None and not parent.IsTransformToWorldLinear():
            raise TransformError(
                f"volume '{volumeNode.GetName()}' is under the non-linear transform '{parent.GetName()}'. "
                f"Harden the transform on the volume first (Data module: right-click the volume > "
                f"'Harden transform'), then segment.")
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        ijkToRas = slicer.util.arrayFromVTKMatrix(ijkToRas)
        ijk = np.array([[0, 0, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=float)
        lps = cls.toLps(volumeNode, (ijk @ ijkToRas.T)[:, :3])
        origin, axes = lps[0], lps[1:] - lps[0]  # rows: index axes i, j, k in LPS
        spacing = np.linalg.norm(axes, axis=1)
        direction = (axes / spacing[:, None]).T  # columns: i, j, k
        if np.abs(direction.T @ direction - np.eye(3)).max() > 1e-4:
            raise TransformError(
                f"the transform of volume '{volumeNode.GetName()}' shears or scales its voxel axes unequally; "
                f"harden the transform on the volume (or resample it), then segment.")
        array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
        return Image(array, tuple(spacing), tuple(origin), direction)

    # ------------------------------------------------------------------ prompts
    def promptsFromNodes(self, promptNodes) -> list:
        """Scene prompts -> one :class:`PromptSpec` per lesion, in LPS world mm.

        ``promptNodes``: a node or a list of: point lists (each defined control point is one
        lesion), ``(point list, control point index)`` pairs (that point only) and ROI nodes
        (one lesion each: the world box around the ROI's 8 corners).
        """
        if promptNodes is None:
            raise ValueError("no prompt given: place a point or draw a box (ROI) on the lesion")
        if not isinstance(promptNodes, (list, tuple)) or (
                len(promptNodes) == 2 and isinstance(promptNodes[1], int) and not isinstance(promptNodes[0], int)):
            promptNodes = [promptNodes]
        specs = []
        for item in promptNodes:
            index = None
            if isinstance(item, (tuple, list)):
                item, index = item
            if item is None:
                raise ValueError("no prompt given: place a point or draw a box (ROI) on the lesion")
            if item.IsA("vtkMRMLMarkupsROINode"):
                specs.append(self._roiPrompt(item))
            elif item.IsA("vtkMRMLMarkupsFiducialNode"):
                indices = range(item.GetNumberOfControlPoints()) if index is None else [index]
                for i in indices:
                    if not 0 <= i < item.GetNumberOfControlPoints():
                        raise ValueError(f"'{item.GetName()}' has no control point {i}")
                    if item.GetNthControlPointPositionStatus(i) != slicer.vtkMRMLMarkupsNode.PositionDefined:
                        continue  # still being placed
                    local = np.array(item.GetNthControlPointPosition(i), dtype=float)
                    specs.append(PromptSpec(f"{item.GetID()}/{item.GetNthControlPointID(i)}", "point",
                                            self.toLps(item, local)[0]))
            else:
                raise ValueError(f"'{item.GetName()}' ({item.GetClassName()}) is not a prompt: use a point list "
                                 f"or an ROI")
        if not specs:
            raise ValueError("the prompt has no placed control points: click the lesion first")
        return specs

    def _roiPrompt(self, roiNode) -> PromptSpec:
        if roiNode.GetNumberOfControlPoints() == 0:
            raise ValueError(f"ROI '{roiNode.GetName()}' is not placed yet")
        size = np.array(roiNode.GetSize(), dtype=float)
        objectToNode = slicer.util.arrayFromVTKMatrix(roiNode.GetObjectToNodeMatrix())
        signs = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
        corners = np.c_[signs * size, np.ones(8)] @ objectToNode.T
        return PromptSpec(roiNode.GetID(), "box", self.toLps(roiNode, corners[:, :3]))

    def _segmentPrompt(self, segmentationNode, segmentId) -> PromptSpec:
        """The box around a segment's voxels (voxel centres, LPS world mm)."""
        from vtk.util import numpy_support

        from LesionLocatorLib.prompts import PromptError

        segment = segmentationNode.GetSegmentation().GetSegment(segmentId) if segmentationNode else None
        if segment is None:
            raise ValueError(f"segment {segmentId!r} not found")
        # the (possibly shared) internal labelmap, in the node's frame: voxels of this segment
        # carry its label value (toLps applies the node's transform below)
        labelmap = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
        if labelmap is None:
            raise ValueError(f"segment '{segment.GetName()}' has no binary labelmap representation; create it "
                             f"in the Segmentations module (Representations), then refine")
        scalars = labelmap.GetPointData().GetScalars()
        if scalars is None:
            raise PromptError(f"segment '{segment.GetName()}' is empty: nothing to refine")
        extent = labelmap.GetExtent()
        dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
        array = numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1]) == segment.GetLabelValue()
        hits = np.argwhere(array)
        if hits.size == 0:
            raise PromptError(f"segment '{segment.GetName()}' is empty: nothing to refine")
        lo = hits.min(0)[::-1] + np.array(extent[0::2])  # (i, j, k)
        hi = hits.max(0)[::-1] + np.array(extent[0::2])
        corners = np.array([[i, j, k, 1.0] for i in (lo[0], hi[0]) for j in (lo[1], hi[1]) for k in (lo[2], hi[2])])
        imageToNode = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(imageToNode)
        cornersRas = corners @ slicer.util.arrayFromVTKMatrix(imageToNode).T
        return PromptSpec(f"{segmentationNode.GetID()}/{segmentId}", "box",
                          self.toLps(segmentationNode, cornersRas[:, :3]))

    # ------------------------------------------------------------------ result nodes
    @classmethod
    def isResultNode(cls, node) -> bool:
        """True for segmentations this module created (never for a user's segmentation)."""
        return (node is not None and node.IsA("vtkMRMLSegmentationNode")
                and node.GetAttribute(cls.ROLE_ATTRIBUTE) == cls.ROLE_RESULT)

    @classmethod
    def resultNodeForVolume(cls, volumeNode):
        """The module's result segmentation for ``volumeNode``, or None."""
        for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
            if cls.isResultNode(node) and node.GetNodeReferenceID(cls.SOURCE_VOLUME_REFERENCE) == volumeNode.GetID():
                return node
        return None

    def _targetResultNode(self, volumeNode, segmentationNode):
        if segmentationNode is not None:
            if self.isResultNode(segmentationNode) and \
                    segmentationNode.GetNodeReferenceID(self.SOURCE_VOLUME_REFERENCE) == volumeNode.GetID():
                return segmentationNode
            logging.info(f"LesionLocator: '{segmentationNode.GetName()}' was not created by LesionLocator for "
                         f"'{volumeNode.GetName()}'; results go to the module's own segmentation instead")
        return self.resultNodeForVolume(volumeNode)

    @classmethod
    def segmentLesionId(cls, segment):
        """The lesion ID of a module segment (its tag), or None."""
        value = vtk.reference("")
        if segment.GetTag(cls.TAG_LESION_ID, value):
            try:
                return int(str(value))
            except ValueError:
                return None
        return None

    @classmethod
    def segmentIdForLesion(cls, lesionId: int) -> str:
        return f"lesion_{int(lesionId)}"

    @classmethod
    def colorForLesion(cls, lesionId: int) -> tuple:
        return cls.COLORS[(int(lesionId) - 1) % len(cls.COLORS)]

    def _assignLesionIds(self, specs, resultNode, lesionIds) -> list:
        """Explicit ``lesionIds``; else the lesion this prompt made before (segment tag); else
        the next ID whose segment ID ``lesion_<id>`` is free in the result node.

        Segments the module did not make (no lesion-ID tag, e.g. drawn by the user into the
        result node) are never replaced: their IDs are skipped, and asking for one explicitly
        is an error.
        """
        byPrompt, occupied, userSegments = {}, set(), set()
        if resultNode is not None:
            segmentation = resultNode.GetSegmentation()
            for segmentId in segmentation.GetSegmentIDs():
                segment = segmentation.GetSegment(segmentId)
                lesionId = self.segmentLesionId(segment)
                if lesionId is not None and segmentId == self.segmentIdForLesion(lesionId):
                    occupied.add(lesionId)
                    ref = vtk.reference("")
                    if segment.GetTag(self.TAG_PROMPT, ref):
                        byPrompt.setdefault(str(ref), lesionId)
                    continue
                userSegments.add(segmentId)
                if segmentId.startswith("lesion_") and segmentId[len("lesion_"):].isdigit():
                    occupied.add(int(segmentId[len("lesion_"):]))
        if lesionIds is not None:
            lesionIds = [int(v) for v in lesionIds]
            if len(lesionIds) != len(specs):
                raise ValueError(f"{len(specs)} lesion prompt(s) but {len(lesionIds)} lesion ID(s) given")
            if len(set(lesionIds)) != len(lesionIds) or min(lesionIds) < 1:
                raise ValueError(f"lesion IDs must be unique positive integers, got {lesionIds}")
            for lesionId in lesionIds:
                if self.segmentIdForLesion(lesionId) in userSegments:
                    raise ValueError(f"segment '{self.segmentIdForLesion(lesionId)}' in '{resultNode.GetName()}' was "
                                     f"not made by LesionLocator and is not replaced; choose another lesion ID")
            return lesionIds
        ids, taken = [], set()
        for spec in specs:
            lesionId = byPrompt.get(spec.ref)
            if lesionId is None or lesionId in taken:
                lesionId = 1
                while lesionId in occupied or lesionId in taken:
                    lesionId += 1
            taken.add(lesionId)
            ids.append(lesionId)
        return ids

    # ------------------------------------------------------------------ model
    def moduleDir(self) -> str:
        return os.path.dirname(os.path.abspath(__file__))

    def defaultModelPath(self):
        """The first demo/shipped model folder that exists (see DEMO_MODEL_SUBPATHS), or None."""
        for sub in self.DEMO_MODEL_SUBPATHS:
            path = os.path.normpath(os.path.join(self.moduleDir(), sub))
            if os.path.isdir(path):
                return path
        return None

    def modelSpec(self, modelPath=None, device="auto", folds=None, tta=None):
        from LesionLocatorLib.model import ModelLayoutError
        from LesionLocatorLib.runner import ModelSpec

        path = modelPath or self.defaultModelPath()
        if not path:
            raise ModelLayoutError("no model folder given and no model installed: choose the "
                                   "LesionLocatorCheckpoint folder (Model > Model folder)")
        return ModelSpec(str(path), self.parseFolds(folds), (device or "auto").strip().lower(), tta)

    @staticmethod
    def parseFolds(folds):
        """None/'' -> None (all folds); '0, 1' or [0, 1] -> (0, 1); 'all' -> ('all',)."""
        if folds is None:
            return None
        if isinstance(folds, str):
            parts = [p for p in folds.replace(";", ",").replace(" ", ",").split(",") if p]
        else:
            parts = list(folds)
        if not parts:
            return None
        out = []
        for p in parts:
            if str(p).strip().lower() == "all":
                out.append("all")
                continue
            try:
                out.append(int(p))
            except (TypeError, ValueError):
                raise ValueError(f"folds must be numbers or 'all' (e.g. '0,1,2'), got {folds!r}") from None
        return tuple(out)

    # ------------------------------------------------------------------ running
    def cancel(self) -> None:
        """Ask the running segmentation to stop (between network batches); the scene stays as it was."""
        if self._cancelToken is not None:
            self._cancelToken.cancel()

    def segment(self, volumeNode, promptNodes, modelPath=None, device="auto", folds=None, tta=None,
                progress=None, cancel=None, segmentationNode=None, lesionIds=None):
        """Segment one lesion per prompt; return the module's result segmentation node.

        ``promptNodes``: see :meth:`promptsFromNodes` (point lists, (point list, index) pairs,
        ROI nodes). ``modelPath``: a LesionLocator model root (default: :meth:`defaultModelPath`).
        ``device``: auto/cpu/cuda/mps; ``folds``: None (all), '0,1' or a list; ``tta``: None (on
        for GPU), True, False. ``progress(fraction, message)``; ``cancel``: a
        :class:`LesionLocatorLib.predict.CancelToken` (or use :meth:`cancel`).
        ``segmentationNode``: a previous result node to add to (a node the module did not create
        is never written to: the module's own node is used instead). ``lesionIds``: one ID per
        lesion to replace specific lesions (e.g. ``[3]`` to redo lesion 3 with a new click).

        Raises the library's errors (``PromptError`` for a prompt outside the volume,
        ``ModelLayoutError``/``CheckpointError`` for the model, ``Cancelled``) and
        :class:`TransformError`, :class:`MissingDependencyError`; the scene is then unchanged.
        """
        self._requireDependencies()
        image = self.volumeToImage(volumeNode)
        specs = self.promptsFromNodes(promptNodes)
        return self._segmentSpecs(volumeNode, image, specs, modelPath, device, folds, tta, progress, cancel,
                                  segmentationNode, lesionIds)

    def refineFromSegment(self, volumeNode, segmentationNode, segmentId, modelPath=None, device="auto",
                          folds=None, tta=None, progress=None, cancel=None, lesionId=None):
        """Run the box model on the box around a segment (e.g. one corrected in the Segment
        Editor). A module lesion segment is replaced in place; a user's segment is left alone
        and the result becomes a lesion in the module's node."""
        self._requireDependencies()
        image = self.volumeToImage(volumeNode)
        spec = self._segmentPrompt(segmentationNode, segmentId)
        target = self._targetResultNode(volumeNode, segmentationNode if self.isResultNode(segmentationNode) else None)
        if lesionId is None and target is not None and target is segmentationNode:
            lesionId = self.segmentLesionId(segmentationNode.GetSegmentation().GetSegment(segmentId))
        return self._segmentSpecs(volumeNode, image, [spec], modelPath, device, folds, tta, progress, cancel,
                                  target, [lesionId] if lesionId is not None else None,
                                  keepPromptTag=lesionId is not None and target is segmentationNode)

    def _segmentSpecs(self, volumeNode, image, specs, modelPath, device, folds, tta, progress, cancel,
                      segmentationNode, lesionIds, keepPromptTag=False):
        from LesionLocatorLib.predict import CancelToken
        from LesionLocatorLib.runner import SegmentationRequest

        report = progress or (lambda fraction, message: None)
        resultNode = self._targetResultNode(volumeNode, segmentationNode)
        ids = self._assignLesionIds(specs, resultNode, lesionIds)
        request = SegmentationRequest(image, [s.toLibrary(i) for s, i in zip(specs, ids)],
                                      self.modelSpec(modelPath, device, folds, tta))
        token = cancel if cancel is not None else CancelToken()
        self._cancelToken = token
        try:
            response = self.runner.run(request, progress=lambda f, m: report(0.95 * f, m), cancel=token)
            token.check()
            report(0.95, "writing segments")
            labelmaps = {i: self._labelmapFromMask(response.masks[i], volumeNode) for i in ids}
            token.check()
        finally:
            self._cancelToken = None
        node = self._writeResults(volumeNode, resultNode, specs, ids, labelmaps, keepPromptTag)
        self.lastResponse, self.lastLesionIds = response, ids
        for message in response.warnings:
            logging.warning(f"LesionLocator: {message}")
        report(1.0, self.lastRunSummary())
        return node

    def lastRunSummary(self) -> str:
        """One line about the last run: lesions, empty masks, time."""
        r = self.lastResponse
        if r is None:
            return ""
        text = f"{len(self.lastLesionIds)} lesion(s) segmented in {r.seconds:.1f} s"
        if r.empty:
            text += f"; no lesion found at prompt(s) {', '.join(str(i) for i in r.empty)} (empty segment)"
        return text

    # ------------------------------------------------------------------ writing
    @staticmethod
    def _labelmapFromMask(mask, volumeNode):
        """A (k, j, i) boolean mask on the volume's voxels -> vtkOrientedImageData in the
        volume's own (parent-transform) frame, cropped to the mask's bounding box."""
        from vtk.util import numpy_support

        mask = np.asarray(mask, dtype=bool)
        hits = np.argwhere(mask)
        if hits.size:
            lo, hi = hits.min(0), hits.max(0)
        else:
            lo = hi = np.zeros(3, dtype=int)
        block = np.ascontiguousarray(mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1], dtype=np.uint8)
        image = slicer.vtkOrientedImageData()
        image.SetExtent(int(lo[2]), int(hi[2]), int(lo[1]), int(hi[1]), int(lo[0]), int(hi[0]))
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
        image.SetImageToWorldMatrix(ijkToRas)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = block.ravel()
        return image

    def _tagSegment(self, segment, lesionId, spec, keepPromptTag):
        segment.SetTag(self.TAG_LESION_ID, str(lesionId))
        if not keepPromptTag:
            segment.SetTag(self.TAG_PROMPT, spec.ref)
        segment.SetTag(self.TAG_PROMPT_TYPE, spec.kind)

    def _newSegment(self, lesionId, spec, labelmap):
        segment = slicer.vtkSegment()
        segment.SetName(f"Lesion {lesionId}")
        segment.SetColor(*self.colorForLesion(lesionId))
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap)
        self._tagSegment(segment, lesionId, spec, False)
        return segment

    def _writeResults(self, volumeNode, resultNode, specs, ids, labelmaps, keepPromptTag=False):
        """Everything is computed before this point; here the scene changes."""
        scene = slicer.mrmlScene
        if resultNode is None:
            node = slicer.vtkMRMLSegmentationNode()
            node.SetName(scene.GenerateUniqueName(f"{volumeNode.GetName()} lesions"))
            node.SetAttribute(self.ROLE_ATTRIBUTE, self.ROLE_RESULT)
            node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            for spec, lesionId in zip(specs, ids):
                node.GetSegmentation().AddSegment(self._newSegment(lesionId, spec, labelmaps[lesionId]),
                                                  self.segmentIdForLesion(lesionId))
            scene.AddNode(node)
            node.CreateDefaultDisplayNodes()
            node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
            node.SetNodeReferenceID(self.SOURCE_VOLUME_REFERENCE, volumeNode.GetID())
            node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), volumeNode.GetID())
            self._placeBesideVolume(node, volumeNode)
            return node
        node = resultNode
        wasModified = node.StartModify()
        try:
            # the labelmaps are in the volume's frame: follow the volume if it was moved since
            node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
            segmentation = node.GetSegmentation()
            for spec, lesionId in zip(specs, ids):
                segmentId = self.segmentIdForLesion(lesionId)
                segment = segmentation.GetSegment(segmentId)
                if segment is None:
                    segmentation.AddSegment(self._newSegment(lesionId, spec, labelmaps[lesionId]), segmentId)
                    continue
                if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                        labelmaps[lesionId], node, segmentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
                    raise RuntimeError(f"could not write segment {segmentId} into '{node.GetName()}'")
                self._tagSegment(segment, lesionId, spec, keepPromptTag)
        finally:
            node.EndModify(wasModified)
        return node

    @staticmethod
    def _placeBesideVolume(node, volumeNode):
        """Put the result under the volume's parent (study) in the subject hierarchy."""
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
        if shNode is None:
            return
        volumeItem = shNode.GetItemByDataNode(volumeNode)
        nodeItem = shNode.GetItemByDataNode(node)
        if volumeItem and nodeItem:
            shNode.SetItemParent(nodeItem, shNode.GetItemParent(volumeItem))


#
# LesionLocatorTest
#
class LesionLocatorTest(ScriptedLoadableModuleTest):
    """Self-test on a synthetic CT: an oblique, anisotropic volume under a parent transform.

    Uses the demo model when installed, else a tiny random-weight model in the official
    layout (built with ``build_test_models.py``): then it checks geometry and lesion identity,
    not segmentation quality.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()
        self._tempDir = None

    def tearDown(self):
        if self._tempDir is not None:
            self._tempDir.cleanup()

    def runTest(self):
        for test in (self.test_PointLandsOnClickedVoxel, self.test_ResegmentKeepsLesionIdentity,
                     self.test_PromptOutsideVolumeLeavesSceneUnchanged):
            self.setUp()
            try:
                test()
            finally:
                self.tearDown()

    # -- fixtures
    def _modelPath(self, logic):
        path = logic.defaultModelPath()
        if path:
            return path
        if self._tempDir is None:
            self._tempDir = tempfile.TemporaryDirectory(prefix="LesionLocatorTest")
        builder = self._testModelBuilder()
        return str(builder.build_tiny_checkpoint(self._tempDir.name))

    @staticmethod
    def _testModelBuilder():
        """``build_test_models``: importable, in the source checkout's Testing/, or installed
        with the extension under LesionLocatorTesting/."""
        here = os.path.dirname(os.path.abspath(__file__))
        for folder in (None, os.path.join(here, "LesionLocatorTesting"),
                       os.path.join(os.path.dirname(here), "Testing")):
            if folder is not None and os.path.isdir(folder) and folder not in sys.path:
                sys.path.append(folder)
            if importlib.util.find_spec("build_test_models") is not None:
                import build_test_models
                return build_test_models
        raise RuntimeError("no demo model and no build_test_models.py to build a test model")

    @staticmethod
    def _phantomVolume(name="LesionLocatorTestCT"):
        """A 20x40x36 (k, j, i) CT-like volume, spacing 0.9 x 1.2 x 2.5 mm, rotated axes,
        under a rotating + translating parent transform. A 7 mm lesion at voxel (10, 20, 18)."""
        k, j, i = np.meshgrid(np.arange(20), np.arange(40), np.arange(36), indexing="ij")
        array = np.full((20, 40, 36), -1000, dtype=np.int16)
        body = ((j - 19.5) / 17) ** 2 + ((i - 17.5) / 16) ** 2 <= 1
        array[body] = 40
        lesion = ((k - 10) * 2.5) ** 2 + ((j - 20) * 1.2) ** 2 + ((i - 18) * 0.9) ** 2 <= 7.0 ** 2
        array[lesion] = 130
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
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        local = ijkToRas.MultiplyPoint([kji[2], kji[1], kji[0], 1.0])[:3]
        world = [0.0, 0.0, 0.0]
        volume.TransformPointToWorld(local, world)  # applies the volume's parent transforms
        return world

    # -- tests
    def test_PointLandsOnClickedVoxel(self):
        self.delayDisplay("A click in world RAS reaches the library on the clicked voxel")
        logic = LesionLocatorLogic()
        volume, voxel = self._phantomVolume()
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
        points.AddControlPointWorld(*self._worldRasOfVoxel(volume, voxel))
        image = logic.volumeToImage(volume)
        spec = logic.promptsFromNodes(points)[0]
        self.assertEqual(tuple(int(v) for v in np.round(image.world_to_index(spec.lps))), voxel)
        self.assertEqual(image.array[voxel], 130)

        result = logic.segment(volume, points, modelPath=self._modelPath(logic), device="cpu")
        self.assertTrue(logic.isResultNode(result))
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
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
        points.AddControlPointWorld(*self._worldRasOfVoxel(volume, voxel))
        points.AddControlPointWorld(*self._worldRasOfVoxel(volume, (8, 12, 10)))
        model = self._modelPath(logic)
        first = logic.segment(volume, points, modelPath=model, device="cpu")
        before = {sid: (first.GetSegmentation().GetSegment(sid).GetName(),
                        first.GetSegmentation().GetSegment(sid).GetColor())
                  for sid in first.GetSegmentation().GetSegmentIDs()}
        self.assertEqual(sorted(before), ["lesion_1", "lesion_2"])
        loads = logic.runner.loads
        second = logic.segment(volume, (points, 1), modelPath=model, device="cpu")
        self.assertIs(second, first)
        self.assertEqual(logic.runner.loads, loads, "the cached model must be reused")
        after = {sid: (second.GetSegmentation().GetSegment(sid).GetName(),
                       second.GetSegmentation().GetSegment(sid).GetColor())
                 for sid in second.GetSegmentation().GetSegmentIDs()}
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
            logic.segment(volume, points, modelPath=self._modelPath(logic), device="cpu")
        self.assertIn("outside the image", str(raised.exception))
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Test passed")
