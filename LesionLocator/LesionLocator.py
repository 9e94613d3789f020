"""LesionLocator: promptable lesion segmentation in 3D Slicer.

Click a lesion (point) or draw a box (ROI) on a CT; the LesionLocator network segments it.

Everything the module does is in :class:`LesionLocatorLogic`, usable from the Python console
without the GUI::

    logic = slicer.util.getModuleLogic("LesionLocator")
    seg = logic.segment(getNode("CT"), getNode("F"), modelPath="/models/LesionLocatorCheckpoint")
    out = logic.track(getNode("CT"), [getNode("CT 2024"), getNode("CT 2025")],
                      modelPath="/models/LesionLocatorCheckpoint")
    logic.exportTableToCsv(out.tableNode, "/tmp/lesions.csv")
    logic.exportSegmentations("/tmp/lesions", format="nii.gz")

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
import threading
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
            "<i>Track</i> propagates the lesions through the checked follow-up scans (in the order "
            "listed): one segmentation per scan with the same segment names and colours, a lesion "
            "table (volume, diameters, change vs baseline and nadir), a growth plot and a sequence "
            "browser over the timepoints. Your own segmentations are never overwritten.")
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
        self._followUpRefreshPending = False

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
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onVolumesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onVolumesChanged)

        self.ui.baselineVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.promptNodeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.foldsLineEdit.connect("editingFinished()", self.updateParameterNodeFromGUI)
        self.ui.ttaCheckBox.connect("stateChanged(int)", self.updateParameterNodeFromGUI)
        self.ui.autoSegmentCheckBox.connect("toggled(bool)", self.updateParameterNodeFromGUI)
        self.ui.minVolumeSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)
        self.ui.minPromptFractionSpinBox.connect("valueChanged(double)", self.updateParameterNodeFromGUI)

        self.ui.placePointButton.connect("clicked()", self.onPlacePoint)
        self.ui.placeBoxButton.connect("clicked()", self.onPlaceBox)
        self.ui.segmentButton.connect("clicked()", self.onSegment)
        self.ui.refineButton.connect("clicked()", self.onRefine)
        self.ui.trackButton.connect("clicked()", self.onTrack)
        self.ui.cancelButton.connect("clicked()", self.onCancel)
        self.ui.installDependenciesButton.connect("clicked()", self.onInstallDependencies)
        self.ui.downloadModelButton.connect("clicked()", self.onDownloadModel)
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

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onVolumesChanged(self, caller, event, node=None):
        """A volume was loaded or removed: refresh the follow-up list (once, after the load)."""
        if node is not None and node.IsA("vtkMRMLScalarVolumeNode") and not self._followUpRefreshPending:
            self._followUpRefreshPending = True
            qt.QTimer.singleShot(0, self._refreshFollowUps)

    def _refreshFollowUps(self):
        self._followUpRefreshPending = False
        self.updateFollowUpList()

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
            try:
                options = self.logic.trackOptions(node)
            except ValueError as error:  # e.g. a scene saved by hand: shown as 0, tracking refuses it
                logging.warning(f"LesionLocator: {error}")
                options = {"minVolumeMl": 0.0, "minPromptFraction": 0.0}
            self.ui.minVolumeSpinBox.value = options["minVolumeMl"]
            self.ui.minPromptFractionSpinBox.value = options["minPromptFraction"]
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
        node.SetParameter(L.PARAM_MIN_VOLUME_ML, repr(float(self.ui.minVolumeSpinBox.value)))
        node.SetParameter(L.PARAM_MIN_PROMPT_FRACTION, repr(float(self.ui.minPromptFractionSpinBox.value)))
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
        self.ui.trackButton.enabled = haveVolume and not self._busy
        self.ui.downloadModelButton.enabled = not self._busy
        self.ui.cancelButton.enabled = self._busy

    def updateFollowUpList(self, *args):
        """Every other scalar volume, checkable, in time order (study date, else load order);
        the user may drag them into another order, which tracking then follows."""
        baseline = self.ui.baselineVolumeSelector.currentNode()
        items = [self.ui.followUpList.item(i) for i in range(self.ui.followUpList.count)]
        checked = {item.data(qt.Qt.UserRole) for item in items if item.checkState() == qt.Qt.Checked}
        shown = [item.data(qt.Qt.UserRole) for item in items]  # the user's order so far
        self.ui.followUpList.clear()
        volumes = [v for v in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                   if v is not baseline and not v.IsA("vtkMRMLLabelMapVolumeNode")
                   and v.GetAttribute(LesionLocatorLogic.ROLE_ATTRIBUTE) != "TrackProxy"]
        byId = {v.GetID(): v for v in volumes}
        ordered = [byId[i] for i in shown if i in byId]
        ordered += [v for v in self.logic.orderFollowUps(volumes) if v.GetID() not in shown]
        for volume in ordered:
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
        followUps = [slicer.mrmlScene.GetNodeByID(self.ui.followUpList.item(i).data(qt.Qt.UserRole))
                     for i in range(self.ui.followUpList.count)
                     if self.ui.followUpList.item(i).checkState() == qt.Qt.Checked]
        if not followUps:
            slicer.util.warningDisplay("Check the follow-up scans to track the lesions into (Inputs > Follow-ups).",
                                       windowTitle="LesionLocator")
            return
        self._run(lambda **kw: self.logic.track(self._baseline(), followUps, order="given",
                                                **self.logic.trackOptions(self._parameterNode), **kw),
                  done=self.showTrackResults)

    def showTrackResults(self, outputs):
        """The lesion table in the module panel, the volume plot in the layout's plot view."""
        self.ui.resultsTableView.setMRMLTableNode(outputs.tableNode)
        self.ui.resultsCollapsibleButton.collapsed = False
        plots = getattr(slicer.modules, "plots", None)
        if plots is not None and outputs.plotChartNode is not None:
            plots.logic().ShowChartInLayout(outputs.plotChartNode)
        self.ui.statusLabel.text = self.logic.lastTrackSummary()
        if outputs.warnings:
            slicer.util.warningDisplay("\n".join(outputs.warnings), windowTitle="LesionLocator")

    def onDownloadModel(self):
        """Ask (with the download's size), then download the official weights with the module's
        progress bar and Cancel, and make them the model."""
        with slicer.util.WaitCursor():
            question = self.logic.describeDownload()
        if not slicer.util.confirmOkCancelDisplay(question, windowTitle="LesionLocator"):
            return
        self._run(lambda progress, **kw: self.logic.downloadModel(progress=progress), done=self.showDownloadedModel)

    def showDownloadedModel(self, modelRoot):
        """The downloaded model is selected (the Logic set the parameter node): remember it."""
        self.ui.modelPathLineEdit.addCurrentPathToHistory()
        qt.QSettings().setValue(self.SETTINGS_MODEL_PATH, str(modelRoot))
        self.ui.statusLabel.text = f"Model ready and selected: {modelRoot}"

    def onCancel(self):
        self.logic.cancel()
        self.ui.statusLabel.text = "Cancelling..."

    def runSegmentation(self, prompts):
        self._run(lambda **kw: self.logic.segment(self._baseline(), prompts, **kw))

    def _baseline(self):
        return self._parameterNode.GetNodeReference(LesionLocatorLogic.REF_BASELINE)

    def _run(self, call, done=None):
        """Run a Logic call with progress, Cancel and errors shown in a message box; ``done(result)``
        shows the result (default: a segmentation run's summary)."""
        from LesionLocatorLib.zoo import DownloadCancelled
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
            slicer.app.processEvents()  # keeps Cancel clickable while the network (or a download) runs

        try:
            with slicer.util.WaitCursor():
                result = call(modelPath=node.GetParameter(L.PARAM_MODEL_PATH) or None,
                              device=node.GetParameter(L.PARAM_DEVICE) or "auto",
                              folds=node.GetParameter(L.PARAM_FOLDS) or None,
                              tta={"on": True, "off": False}.get(node.GetParameter(L.PARAM_TTA)),
                              progress=progress)
            if done is not None:
                done(result)
            else:
                summary = self.logic.lastRunSummary()
                self.ui.statusLabel.text = summary
                self.ui.refineSegmentSelector.setCurrentNode(result)
                if self.logic.lastResponse is not None and self.logic.lastResponse.empty:
                    slicer.util.warningDisplay(summary, windowTitle="LesionLocator")
        except Cancelled:
            self.ui.statusLabel.text = "Cancelled: nothing was changed."
        except DownloadCancelled:
            self.ui.statusLabel.text = ("Download cancelled: nothing was installed; downloading again resumes "
                                        "where it stopped.")
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
    control point, ROI or segment again replaces the same lesion. ``kind``: 'point', 'box' or
    'mask'. ``lps``: (3,) point or (N, 3) box corners, LPS world millimetres (None for a mask).
    ``mask``: for 'mask', a :class:`LesionLocatorLib.image.Image` (uint8, 1 = inside) on the
    volume's voxel grid.
    """
    ref: str
    kind: str
    lps: np.ndarray = None
    mask: object = None

    def toLibrary(self, lesionId: int):
        from LesionLocatorLib.prompts import Box, MaskPrompt, Point

        if self.kind == "point":
            return Point(int(lesionId), tuple(float(v) for v in self.lps), name=self.ref)
        if self.kind == "mask":
            return MaskPrompt(int(lesionId), self.mask, name=self.ref)
        return Box.from_points(int(lesionId), self.lps, name=self.ref)


@dataclass
class TrackOutputs:
    """What :meth:`LesionLocatorLogic.track` made, everything in time order (baseline first).

    ``segmentationNodes[0]`` is the baseline segmentation the lesions came from;
    ``status[lesionId][t]`` is 'tracked', 'vanished' or 'outside'; ``rows``: one dict per
    lesion and timepoint (:func:`LesionLocatorLib.metrics.lesion_measurements`, plus ``name``,
    ``segment_id``, ``volume_node`` and ``study_date``); the table, the plot and the sequences
    are described in :meth:`LesionLocatorLogic.track`; ``response``: the runner's
    :class:`LesionLocatorLib.runner.TrackResponse`; ``warnings``: the library's and the
    Logic's warnings (e.g. follow-ups dated before the baseline).
    """
    volumeNodes: list
    segmentationNodes: list
    segmentIds: dict
    tableNode: object
    plotChartNode: object
    plotTableNode: object
    plotSeriesNodes: list
    segmentationSequenceNode: object
    volumeSequenceNode: object
    browserNode: object
    status: dict
    rows: list
    response: object
    warnings: list


class _DownloadCancel:
    """The cancel flag of a model download: the zoo asks ``is_set()``; :meth:`LesionLocatorLogic.cancel`
    calls ``cancel()``; a caller's ``threading.Event`` or ``CancelToken`` counts too."""

    def __init__(self, callerFlag=None):
        self._event = threading.Event()
        self._callerFlag = callerFlag

    def cancel(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        flag = self._callerFlag
        if flag is not None and (flag.is_set() if hasattr(flag, "is_set") else flag.cancelled):
            return True
        return self._event.is_set()


@dataclass
class _BaselineLesion:
    segmentId: str
    lesionId: int
    name: str
    color: tuple
    mask: np.ndarray


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
    PARAM_MIN_VOLUME_ML = "TrackMinVolumeMl"
    PARAM_MIN_PROMPT_FRACTION = "TrackMinPromptFraction"
    DEFAULTS = {PARAM_DEVICE: "auto", PARAM_FOLDS: "", PARAM_TTA: "auto", PARAM_AUTO_SEGMENT: "true",
                PARAM_MODEL_PATH: "", PARAM_MIN_VOLUME_ML: "0", PARAM_MIN_PROMPT_FRACTION: "0"}

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

    # Where the demo model and demo case are looked for, relative to this file (first existing
    # wins): next to the module in an installed extension, then a source checkout's Resources/.
    DEMO_MODEL_SUBPATHS = [os.path.join("Resources", "Models", "LesionLocatorDemo"),
                           os.path.join(os.pardir, "Resources", "Models", "LesionLocatorDemo")]
    DEMO_CASE_SUBPATHS = [os.path.join("Resources", "Demo"), os.path.join(os.pardir, "Resources", "Demo")]

    # tracking outputs: segment tags, node roles (ROLE_ATTRIBUTE) and the reference to the baseline
    TAG_STATUS = "LesionLocator.Status"
    TAG_TRACKED_FROM = "LesionLocator.TrackedFrom"
    PROMPT_TYPE_TRACK = "track"
    STATUSES = ("tracked", "vanished", "outside")
    ROLE_TRACK_OUTPUTS = ("TrackTable", "TrackPlotTable", "TrackChart", "TrackSeries", "TrackSequence",
                          "TrackBrowser", "TrackProxy")
    TRACK_BASELINE_REFERENCE = "LesionLocator.TrackBaseline"
    # lesion table columns: (name, kind, unit); kind int / str / float
    TABLE_COLUMNS = [
        ("Lesion ID", "int", ""), ("Lesion", "str", ""), ("Timepoint", "int", ""), ("Volume", "str", ""),
        ("Study date", "str", ""), ("Status", "str", ""), ("Volume (ml)", "float", "ml"),
        ("Long axis (mm)", "float", "mm"), ("Short axis (mm)", "float", "mm"),
        ("Volume change vs baseline (%)", "float", "%"), ("Volume change vs nadir (%)", "float", "%"),
        ("RECIST 1.1 (for information only)", "str", ""),
    ]

    def __init__(self, runner=None):
        """``runner``: a :class:`LesionLocatorLib.runner.SegmentationRunner`; default: the
        in-process runner, which keeps loaded models cached for this Logic's lifetime."""
        ScriptedLoadableModuleLogic.__init__(self)
        self._runner = runner
        self.lastResponse = None
        self.lastLesionIds = []
        self.lastTrack = None
        self._cancelToken = None
        self._fallbackTrackRunner = None

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
        if self._fallbackTrackRunner is not None:
            self._fallbackTrackRunner.close()
            self._fallbackTrackRunner = None

    # ------------------------------------------------------------------ parameters
    def setDefaultParameters(self, parameterNode) -> None:
        for name, value in self.DEFAULTS.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    def trackOptions(self, parameterNode=None) -> dict:
        """The tracking options stored in the parameter node (default: the module's) as keyword
        arguments of :meth:`track`: ``minVolumeMl`` (millilitres) and ``minPromptFraction``.
        An unset parameter is 0; a value that is not a number >= 0 is a ValueError."""
        node = parameterNode or self.getParameterNode()
        options = {}
        for keyword, name in (("minVolumeMl", self.PARAM_MIN_VOLUME_ML),
                              ("minPromptFraction", self.PARAM_MIN_PROMPT_FRACTION)):
            text = node.GetParameter(name) or "0"
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not value >= 0:
                raise ValueError(f"tracking option {name} must be a number >= 0, got {text!r}")
            options[keyword] = value
        return options

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

    @staticmethod
    def imageKey(volumeNode, image) -> str:
        """A name for exactly this volume's voxels and world geometry (node ID, the voxel data's
        modification time, the LPS geometry), so that a worker process keeps the volume between
        clicks. Slicer marks voxel edits as modifications (``arrayFromVolumeModified``)."""
        geometry = np.r_[image.origin, image.spacing, np.ravel(image.direction)]
        return (f"{volumeNode.GetID()}:{volumeNode.GetImageData().GetMTime()}:"
                + ",".join(f"{v:.6g}" for v in geometry))

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

    def _segmentPrompt(self, segmentationNode, segmentId, volumeNode, image) -> PromptSpec:
        """A segment as a mask prompt: its voxels on ``volumeNode``'s grid (:meth:`segmentMask`,
        which follows the parent transforms of both nodes), as a mask Image with ``image``'s
        (the volume's :meth:`volumeToImage`) geometry. Raises ``PromptError`` when no voxel of
        the segment lies on the volume (an empty segment: nothing to refine)."""
        from LesionLocatorLib.prompts import PromptError

        segment = segmentationNode.GetSegmentation().GetSegment(segmentId) if segmentationNode else None
        if segment is None:
            raise ValueError(f"segment {segmentId!r} not found")
        mask = self.segmentMask(segmentationNode, segmentId, volumeNode, image)
        if not mask.any():
            if self._segmentLabelmap(segmentationNode, segmentId) is not None:
                raise PromptError(f"segment '{segment.GetName()}' has no voxel inside volume "
                                  f"'{volumeNode.GetName()}': nothing to refine there")
            raise PromptError(f"segment '{segment.GetName()}' is empty: nothing to refine")
        return PromptSpec(f"{segmentationNode.GetID()}/{segmentId}", "mask",
                          mask=image.with_array(mask.astype(np.uint8)))

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
        """The demo model folder ``Resources/Models/LesionLocatorDemo`` (next to the module in an
        installed extension, or at the root of a source checkout), or None."""
        for sub in self.DEMO_MODEL_SUBPATHS:
            path = os.path.normpath(os.path.join(self.moduleDir(), sub))
            if os.path.isdir(path):
                return path
        return None

    def demoCasePath(self):
        """The demo case folder ``Resources/Demo`` (``demo_t0.nii.gz``, ``demo_t1.nii.gz``, ... with
        ``_label`` files and ``demo_points.json``) when complete, or None."""
        for sub in self.DEMO_CASE_SUBPATHS:
            path = os.path.normpath(os.path.join(self.moduleDir(), sub))
            if all(os.path.isfile(os.path.join(path, name)) for name in
                   ("demo_t0.nii.gz", "demo_t0_label.nii.gz", "demo_t1.nii.gz", "demo_t1_label.nii.gz",
                    "demo_points.json")):
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

    def availableModels(self) -> list:
        """The models the module can use, as dicts with ``name``, ``title`` and ``path`` (the model
        root for the Model folder): the bundled demo model when installed, then every intact model
        in the download cache (:meth:`downloadModel`, ``lesionlocator download``; the cache is
        ``$LESIONLOCATOR_HOME`` or the per-user cache folder), with ``version`` and ``license``."""
        from LesionLocatorLib import zoo

        models = []
        demo = self.defaultModelPath()
        if demo:
            models.append({"name": "demo", "title": zoo.get_model_info("demo").title, "path": demo,
                           "version": None, "license": None})
        for entry in zoo.list_cached_models():
            if entry["status"] == "ok":
                models.append({"name": entry["name"], "title": entry.get("title") or entry["name"],
                               "path": entry["path"], "version": entry.get("version"),
                               "license": entry.get("license")})
        return models

    def selectModel(self, model) -> str:
        """Make ``model`` the module's model (parameter ``ModelPath``, shown as the Model folder): a
        name from :meth:`availableModels` (e.g. 'lesionlocator' once downloaded) or a model folder.
        Returns the folder. Raises the zoo's ``ModelNotFoundError`` for a name that is not
        downloaded (saying how to get it) and a folder that does not exist."""
        from LesionLocatorLib import zoo

        path = {m["name"]: m["path"] for m in self.availableModels()}.get(str(model))
        if path is None:
            path = str(zoo.resolve_model(model))
        self.getParameterNode().SetParameter(self.PARAM_MODEL_PATH, path)
        return path

    def describeDownload(self, name=None, baseUrl=None) -> str:
        """The question to ask before :meth:`downloadModel`: what is downloaded from where, its
        size and licence (read from the Zenodo record), or that it is downloaded already. When
        the record cannot be read the question says so and that the download is large."""
        from LesionLocatorLib import zoo

        name = name or zoo.DEFAULT_DOWNLOAD
        info = zoo.get_model_info(name)
        if info is None or info.source != "zenodo":
            return f"'{name}' is not a model that can be downloaded."
        installed = zoo.installed_model_or_none(info.name)
        if installed is not None:
            return f"{info.title} is downloaded already ({installed}).\n\nUse it as the model?"
        lines = [f"Download {info.title}?"]
        try:
            record = zoo.fetch_record(info.record, baseUrl, retries=0, timeout=20.0)
            remote = zoo.pick_file(record, f"{zoo.zenodo_url(baseUrl)}/api/records/{info.record}", info.archive)
        except zoo.ZooError as e:
            lines.append(f"The size could not be read from the Zenodo record ({e}); the checkpoint is a "
                         "large download (gigabytes).")
        else:
            metadata = record.get("metadata") or {}
            licence = metadata.get("license")
            licence = licence.get("id") if isinstance(licence, dict) else licence
            lines.append(f"{remote.key}: {zoo.human_size(remote.size)} from {zoo.zenodo_url(baseUrl)}, record "
                         f"{info.record}" + (f", version {metadata['version']}" if metadata.get("version") else "")
                         + (f", licence {licence}" if licence else "") + ".")
        lines.append(f"It is checked (MD5), unpacked and kept in {zoo.default_cache_dir()} (needs about twice "
                     "its size free while unpacking). Cancel keeps the part downloaded so far; downloading "
                     "again resumes it.")
        return "\n\n".join(lines)

    def downloadModel(self, name=None, progress=None, cancel=None, baseUrl=None):
        """Download a known model (default: the official LesionLocator checkpoint, 'lesionlocator'
        alias 'official') into the model cache with the zoo (:func:`LesionLocatorLib.zoo.download_model`,
        what ``lesionlocator download`` runs: MD5 check, resume, retries, atomic install), select
        it (:meth:`selectModel`) and return its model root (a ``Path``). An installed model is
        selected without downloading.

        ``progress(fraction, message)``; ``cancel``: a ``threading.Event`` or the library's
        ``CancelToken`` (or use :meth:`cancel`). Raises the zoo's errors with their messages
        (``DownloadError``, ``ChecksumError``, ``DiskFullError``, ``ModelNotFoundError`` for an
        unknown name, ``DownloadCancelled``); then nothing is installed and nothing is selected
        (an interrupted download's partial file is kept, and the next call resumes it).
        """
        from LesionLocatorLib import zoo

        name = name or zoo.DEFAULT_DOWNLOAD
        report = progress or (lambda fraction, message: None)

        def downloading(done, total):
            report(0.9 * done / total if total else 0.0,
                   f"Downloading {name}: {zoo.human_size(done)} of {zoo.human_size(total)}")

        def unpacking(done, total):
            report(0.9 + 0.1 * done / total if total else 0.9, f"Unpacking {name}")

        token = _DownloadCancel(cancel)
        self._cancelToken = token
        try:
            root = zoo.download_model(name, baseUrl, progress=downloading, cancel=token, unpack_progress=unpacking)
        finally:
            self._cancelToken = None
        self.selectModel(str(root))
        report(1.0, f"Model '{name}' ready: {root}")
        return root

    # ------------------------------------------------------------------ running
    def cancel(self) -> None:
        """Ask the running segmentation, tracking or model download to stop (between network
        batches, between timepoints, between downloaded chunks); the scene stays as it was."""
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
        """Segment a lesion again with a segment (e.g. one corrected in the Segment Editor) as its
        mask prompt: the segment's voxels on ``volumeNode``'s grid (:meth:`segmentMask`, through
        the parent transforms of both nodes) go to the model that takes previous-mask prompts
        (the model root's ``LesionLocatorTrack``), which sees one patch centred on the mask's
        centre of mass. A module lesion segment is replaced in place (same segment ID, name and
        colour); a user's segment is left alone and the result becomes a lesion in the module's
        node (refining the same segment again replaces that lesion). Other arguments as for
        :meth:`segment`; ``lesionId`` overrides the lesion the result goes to.

        Raises ``PromptError`` for an empty segment (or one with no voxel inside the volume),
        ``ValueError`` for an unknown segment, and the errors of :meth:`segment`; the scene is
        then unchanged."""
        self._requireDependencies()
        image = self.volumeToImage(volumeNode)
        spec = self._segmentPrompt(segmentationNode, segmentId, volumeNode, image)
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
                                      self.modelSpec(modelPath, device, folds, tta),
                                      image_key=self.imageKey(volumeNode, image))
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

    # ------------------------------------------------------------------ tracking
    @staticmethod
    def studyDateTime(volumeNode):
        """The DICOM study date and time of a volume as a sortable 'YYYYMMDDHHMMSS.ffffff' string,
        or None. Read from the node's own ``DICOM.StudyDate``/``DICOM.StudyTime`` attributes, else
        from its subject-hierarchy ancestors (the study item the DICOM loader creates)."""
        constants = slicer.vtkMRMLSubjectHierarchyConstants
        dateName, timeName = constants.GetDICOMStudyDateAttributeName(), constants.GetDICOMStudyTimeAttributeName()

        def combine(date, time):
            date = "".join(ch for ch in (date or "") if ch.isdigit())
            if len(date) != 8:
                return None
            time = (time or "").strip()
            whole, _, fraction = time.partition(".")
            whole = "".join(ch for ch in whole if ch.isdigit())[:6].ljust(6, "0")
            return f"{date}{whole}.{(''.join(ch for ch in fraction if ch.isdigit()) or '0')[:6].ljust(6, '0')}"

        found = combine(volumeNode.GetAttribute(dateName), volumeNode.GetAttribute(timeName))
        if found:
            return found
        shNode = slicer.mrmlScene.GetSubjectHierarchyNode() if slicer.mrmlScene is not None else None
        if shNode is None:
            return None
        item = shNode.GetItemByDataNode(volumeNode)
        while item and item != shNode.GetSceneItemID():
            found = combine(shNode.GetItemAttribute(item, dateName), shNode.GetItemAttribute(item, timeName))
            if found:
                return found
            item = shNode.GetItemParent(item)
        return None

    def orderFollowUps(self, volumeNodes, order: str = "auto") -> list:
        """Follow-up volumes in time order.

        ``order='auto'``: by DICOM study date/time (:meth:`studyDateTime`) when every volume has
        one, else in load order (the order the volumes were added to the scene);
        ``order='given'``: exactly as given (the user's order).
        """
        volumes = [v for v in (volumeNodes or []) if v is not None]
        if order == "given":
            return volumes
        if order != "auto":
            raise ValueError(f"order must be 'auto' or 'given', got {order!r}")
        dates = [self.studyDateTime(v) for v in volumes]
        if volumes and all(dates):
            return [v for _, _, v in sorted(zip(dates, range(len(volumes)), volumes), key=lambda x: x[:2])]
        loadOrder = {n.GetID(): i for i, n in enumerate(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))}
        return sorted(volumes, key=lambda v: loadOrder.get(v.GetID(), len(loadOrder)))

    @staticmethod
    def imageIjkToRas(image) -> np.ndarray:
        """The 4x4 IJK-to-RAS matrix (world) of a library Image: the inverse of the RAS -> LPS step
        of :meth:`volumeToImage` (no transform involved: the Image is in world already)."""
        m = np.eye(4)
        m[:3, :3] = np.asarray(image.direction, dtype=float) @ np.diag(np.asarray(image.spacing, dtype=float))
        m[:3, 3] = np.asarray(image.origin, dtype=float)
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ m

    def segmentMask(self, segmentationNode, segmentId, volumeNode, image=None) -> np.ndarray:
        """A segment as a boolean (k, j, i) array on ``volumeNode``'s voxels, without adding nodes
        to the scene. Only the segment's own voxels count (segments edited in the Segment Editor
        share a labelmap layer, each with its own label value). A segmentation under the volume's
        own parent transform is read in that frame (exact for segments made on this volume);
        otherwise both go to world first -- the segmentation through its parent transforms
        (non-linear ones too), the volume through :meth:`volumeToImage` (``image``: computed
        when not given) -- and the segment is resampled (nearest neighbour) onto the volume's
        voxels."""
        from vtk.util import numpy_support

        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise ValueError(f"'{segmentationNode.GetName()}' has no segment {segmentId!r}")
        sameFrame = segmentationNode.GetParentTransformNode() is volumeNode.GetParentTransformNode()
        labelmap = self._segmentLabelmap(segmentationNode, segmentId, toWorld=not sameFrame)
        dims = volumeNode.GetImageData().GetDimensions()
        mask = np.zeros((dims[2], dims[1], dims[0]), dtype=bool)
        if labelmap is None:
            return mask
        reference = slicer.vtkOrientedImageData()
        reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
        if sameFrame:
            ijkToRas = vtk.vtkMatrix4x4()
            volumeNode.GetIJKToRASMatrix(ijkToRas)
        else:
            ijkToRas = slicer.util.vtkMatrixFromArray(self.imageIjkToRas(
                image if image is not None else self.volumeToImage(volumeNode)))
        reference.SetImageToWorldMatrix(ijkToRas)
        resampled = slicer.vtkOrientedImageData()
        if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                labelmap, reference, resampled, False, True):
            raise RuntimeError(f"could not resample segment '{segment.GetName()}' onto '{volumeNode.GetName()}'")
        e = resampled.GetExtent()
        if resampled.GetPointData().GetScalars() is None or e[1] < e[0]:
            return mask
        block = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(
            e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1) > 0
        lo = np.maximum([e[4], e[2], e[0]], 0)
        hi = np.minimum([e[5] + 1, e[3] + 1, e[1] + 1], mask.shape)
        if np.all(hi > lo):
            mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = block[lo[0] - e[4]:hi[0] - e[4], lo[1] - e[2]:hi[1] - e[2],
                                                                lo[2] - e[0]:hi[2] - e[0]]
        return mask

    @staticmethod
    def _segmentLabelmap(segmentationNode, segmentId, toWorld=False):
        """A segment's voxels as a 0/1 vtkOrientedImageData in the segmentation node's frame (or
        in world with ``toWorld``: through the node's parent transforms), or None when the
        segment has no voxel. The segment's binary labelmap may be a layer shared with other
        segments: only voxels carrying this segment's label value are kept."""
        from vtk.util import numpy_support

        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        internal = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
        if internal is None:
            raise ValueError(f"segment '{segment.GetName()}' of '{segmentationNode.GetName()}' has no binary "
                             f"labelmap; create it in the Segmentations module (Representations)")
        extent = internal.GetExtent()
        if internal.GetPointData().GetScalars() is None or extent[1] < extent[0] or extent[3] < extent[2] \
                or extent[5] < extent[4]:
            return None
        labelmap = slicer.vtkOrientedImageData()
        labelmap.DeepCopy(internal)  # voxels and geometry (image to node frame)
        values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
        own = values == segment.GetLabelValue()
        if not own.any():
            return None
        values[:] = own
        labelmap.Modified()
        if toWorld:
            slicer.vtkSlicerSegmentationsModuleLogic.ApplyParentTransformToOrientedImageData(segmentationNode, labelmap)
        return labelmap

    def baselineLesions(self, segmentationNode, volumeNode, image=None) -> list:
        """The lesions of a baseline segmentation, in segment order: segment ID, lesion ID (the
        module's lesion tag, else N from a segment ID ``lesion_N``, else the next free number),
        name, colour and mask on ``volumeNode``'s voxels. Nothing in the scene changes."""
        segmentation = segmentationNode.GetSegmentation()
        segmentIds = list(segmentation.GetSegmentIDs())
        if not segmentIds:
            raise ValueError(f"'{segmentationNode.GetName()}' has no segments: segment the lesions on the baseline "
                             f"first (click them), then track")
        ids = {}
        for segmentId in segmentIds:
            lesionId = self.segmentLesionId(segmentation.GetSegment(segmentId))
            if lesionId is None and segmentId.startswith("lesion_") and segmentId[len("lesion_"):].isdigit():
                lesionId = int(segmentId[len("lesion_"):])
            if lesionId is not None and lesionId >= 1 and lesionId not in ids.values():
                ids[segmentId] = lesionId
        nextId = max(ids.values(), default=0) + 1
        lesions = []
        for segmentId in segmentIds:
            if segmentId not in ids:
                ids[segmentId], nextId = nextId, nextId + 1
            segment = segmentation.GetSegment(segmentId)
            lesions.append(_BaselineLesion(segmentId, ids[segmentId], segment.GetName(),
                                           tuple(float(c) for c in segment.GetColor()),
                                           self.segmentMask(segmentationNode, segmentId, volumeNode, image)))
        return lesions

    def track(self, baselineVolumeNode, followupVolumeNodes, baselineSegmentationNode=None, modelPath=None,
              device="auto", folds=None, registration="simpleitk", progress=None, cancel=None, tta=None,
              order="auto", minVolumeMl=0.0, minPromptFraction=0.0):
        """Track the baseline lesions through follow-up scans; return :class:`TrackOutputs`.

        ``followupVolumeNodes``: the follow-up CTs, ordered by :meth:`orderFollowUps` (``order``:
        'auto' = DICOM study date/time, else load order; 'given' = as listed).
        ``baselineSegmentationNode``: where the baseline lesions are (default: the module's result
        node for the baseline volume); it is only read. ``registration``: 'simpleitk' (default),
        'none' (scans already aligned in world space), or another backend of
        :mod:`LesionLocatorLib.register`. Model arguments, ``progress`` and ``cancel`` as for
        :meth:`segment`; the model root's ``LesionLocatorTrack`` model is used.
        ``minVolumeMl`` (millilitres) and ``minPromptFraction`` (of the warped previous mask): a
        follow-up mask smaller than either is reported vanished and left empty (specks and
        remnants a small model leaves where a lesion has gone); 0 (default) keeps every mask.

        Writes, after everything was computed: per follow-up a module segmentation '<volume>
        lesions' under the volume's parent transform, with the baseline's lesions under the
        same segment IDs (``lesion_<id>``), names and colours (empty segments for lesions that
        vanished or left the scan; the status is the segment tag ``LesionLocator.Status``); a
        sequence of the timepoint segmentations and one of the volumes (world geometry) with a
        sequence browser; a lesion table; a plot of lesion volume over time. Tracking outputs
        of an earlier run from the same baseline volume are replaced; segments the module did not
        make by tracking are never overwritten (a clash is an error, nothing changes).
        Failures and Cancel leave the scene unchanged.
        """
        from LesionLocatorLib.metrics import lesion_measurements
        from LesionLocatorLib.predict import CancelToken
        from LesionLocatorLib.prompts import PromptError
        from LesionLocatorLib.register import BACKENDS
        from LesionLocatorLib.runner import TrackRequest

        self._requireDependencies()
        report = progress or (lambda fraction, message: None)
        if registration not in BACKENDS:
            raise ValueError(f"unknown registration {registration!r}; choose one of {', '.join(BACKENDS)}")
        if baselineVolumeNode is None:
            raise ValueError("choose the baseline volume")
        if minVolumeMl < 0 or minPromptFraction < 0:
            raise ValueError(f"the minimum volume ({minVolumeMl} ml) and prompt fraction ({minPromptFraction}) "
                             f"must be >= 0")
        followups = self.orderFollowUps(followupVolumeNodes, order)
        if not followups:
            raise ValueError("choose at least one follow-up volume to track the lesions into")
        if any(v is baselineVolumeNode for v in followups):
            raise ValueError(f"'{baselineVolumeNode.GetName()}' is the baseline; it cannot also be a follow-up")
        if len({v.GetID() for v in followups}) != len(followups):
            raise ValueError("a follow-up volume is listed twice")
        if baselineSegmentationNode is None:
            baselineSegmentationNode = self.resultNodeForVolume(baselineVolumeNode)
            if baselineSegmentationNode is None:
                raise ValueError(f"no lesions on '{baselineVolumeNode.GetName()}' yet: segment them (click each "
                                 f"lesion), then track")
        volumes = [baselineVolumeNode] + followups
        images = [self.volumeToImage(v) for v in volumes]
        spec = self.modelSpec(modelPath, device, folds, tta)
        lesions = self.baselineLesions(baselineSegmentationNode, baselineVolumeNode, images[0])
        present = {lesion.lesionId: lesion.mask for lesion in lesions if lesion.mask.any()}
        if not present:
            raise PromptError(f"every segment of '{baselineSegmentationNode.GetName()}' is empty: nothing to track")
        targets = [self._trackTarget(v, lesions) for v in followups]  # raises before any change

        token = cancel if cancel is not None else CancelToken()
        self._cancelToken = token
        try:
            runner = self._trackingRunner()
            response = runner.track(TrackRequest(images, present, spec, registration,
                                                 min_volume_ml=minVolumeMl, min_prompt_fraction=minPromptFraction),
                                    progress=lambda f, m: report(0.9 * f, m), cancel=token)
            token.check()
            report(0.9, "building the results")
            n = len(volumes)
            masks = [{lesion.lesionId: lesion.mask for lesion in lesions}]
            status = {}
            for lesion in lesions:
                status[lesion.lesionId] = list(response.status.get(lesion.lesionId, ["vanished"] * n))
            empty = {t: np.zeros(images[t].shape, dtype=bool) for t in range(1, n)}
            for t in range(1, n):
                masks.append({lesion.lesionId: response.masks[t].get(lesion.lesionId, empty[t]) for lesion in lesions})
            rows = lesion_measurements(images, masks, status, [v.GetName() for v in volumes])
            byId = {lesion.lesionId: lesion for lesion in lesions}
            for row in rows:
                row["name"] = byId[row["lesion_id"]].name
                row["segment_id"] = self.segmentIdForLesion(row["lesion_id"])
                row["volume_node"] = volumes[row["index"]].GetName()
                row["study_date"] = self.studyDateTime(volumes[row["index"]]) or ""
            token.check()
            plan = self._buildTrackOutputs(baselineSegmentationNode, volumes, images, lesions, masks, status, rows,
                                           targets, token)
            token.check()
        finally:
            self._cancelToken = None
        outputs = self._commitTrackOutputs(plan)
        outputs.response = response
        outputs.warnings = list(response.warnings) + self._dateWarnings(volumes, order)
        for message in outputs.warnings:
            logging.warning(f"LesionLocator: {message}")
        self.lastTrack = outputs
        report(1.0, self.lastTrackSummary())
        return outputs

    def _dateWarnings(self, volumes, order) -> list:
        dates = [self.studyDateTime(v) for v in volumes]
        out = []
        for volume, date in zip(volumes[1:], dates[1:]):
            if date and dates[0] and date < dates[0]:
                out.append(f"follow-up '{volume.GetName()}' is dated before the baseline "
                           f"'{volumes[0].GetName()}' (study dates)")
        if order == "given" and all(dates[1:]) and dates[1:] != sorted(dates[1:]):
            out.append("the follow-ups are not in study-date order (tracked in the order given)")
        return out

    def lastTrackSummary(self) -> str:
        """One line about the last tracking run."""
        outputs = self.lastTrack
        if outputs is None:
            return ""
        counts = {s: sum(v[-1] == s for v in outputs.status.values()) for s in self.STATUSES}
        seconds = outputs.response.seconds if outputs.response is not None else 0.0
        return (f"{len(outputs.status)} lesion(s) tracked through {len(outputs.volumeNodes) - 1} follow-up(s) in "
                f"{seconds:.1f} s; at the last scan: {counts['tracked']} tracked, {counts['vanished']} vanished, "
                f"{counts['outside']} outside the scan")

    def _trackingRunner(self):
        """The runner when it can track; else (a runner without ``track``) an in-process one."""
        from LesionLocatorLib.runner import InProcessRunner

        if hasattr(self.runner, "track"):
            return self.runner
        if self._fallbackTrackRunner is None:
            logging.info("LesionLocator: the runner cannot track; tracking in this process")
            self._fallbackTrackRunner = InProcessRunner()
        return self._fallbackTrackRunner

    def _trackTarget(self, volumeNode, lesions):
        """The module's existing result node for a follow-up (segments replaced in place), or None
        (a new node). A segment in it with a tracked lesion's ID that was not made by tracking --
        drawn by the user or made by a click on that scan -- is an error: it is never replaced."""
        node = self.resultNodeForVolume(volumeNode)
        if node is None:
            return None
        segmentation = node.GetSegmentation()
        for lesion in lesions:
            segmentId = self.segmentIdForLesion(lesion.lesionId)
            segment = segmentation.GetSegment(segmentId)
            if segment is None:
                continue
            kind = vtk.reference("")
            if not (segment.GetTag(self.TAG_PROMPT_TYPE, kind) and str(kind) == self.PROMPT_TYPE_TRACK):
                raise ValueError(f"'{node.GetName()}' already has a segment '{segmentId}' ('{segment.GetName()}') that "
                                 f"was not made by tracking; it is not replaced. Rename or remove it there, then "
                                 f"track again.")
        return node

    def _trackedSegment(self, lesion, labelmap, status, source):
        segment = slicer.vtkSegment()
        segment.SetName(lesion.name)
        segment.SetColor(*lesion.color)
        segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap)
        self._tagTrackedSegment(segment, lesion, status, source)
        return segment

    def _tagTrackedSegment(self, segment, lesion, status, source):
        """Tags of a tracked segment: lesion ID, status at this timepoint, prompt type 'track' and
        where it came from ('<baseline segmentation node ID>/<baseline segment ID>')."""
        segment.SetTag(self.TAG_LESION_ID, str(lesion.lesionId))
        segment.SetTag(self.TAG_STATUS, status)
        segment.SetTag(self.TAG_PROMPT_TYPE, self.PROMPT_TYPE_TRACK)
        segment.SetTag(self.TAG_TRACKED_FROM, f"{source}/{lesion.segmentId}")

    def _buildTrackOutputs(self, baselineNode, volumes, images, lesions, masks, status, rows, targets, token):
        """Every node and labelmap of a tracking run, built outside the scene."""
        plan = {"baselineNode": baselineNode, "volumes": volumes, "targets": targets, "lesions": lesions,
                "status": status, "rows": rows, "followups": []}
        base = volumes[0].GetName()
        for t in range(1, len(volumes)):
            labelmaps = {lesion.lesionId: self._labelmapFromMask(masks[t][lesion.lesionId], volumes[t])
                         for lesion in lesions}
            source = baselineNode.GetID()
            node = None
            if targets[t - 1] is None:
                node = slicer.vtkMRMLSegmentationNode()
                node.SetName(f"{volumes[t].GetName()} lesions")
                node.SetAttribute(self.ROLE_ATTRIBUTE, self.ROLE_RESULT)
                node.SetReferenceImageGeometryParameterFromVolumeNode(volumes[t])
                for lesion in lesions:
                    node.GetSegmentation().AddSegment(
                        self._trackedSegment(lesion, labelmaps[lesion.lesionId], status[lesion.lesionId][t], source),
                        self.segmentIdForLesion(lesion.lesionId))
            plan["followups"].append({"volume": volumes[t], "node": node, "labelmaps": labelmaps, "source": source})
            token.check()

        # sequences: one item per timepoint, in world geometry (each scan may have its own transform)
        segmentationSequence = slicer.vtkMRMLSequenceNode()
        segmentationSequence.SetName(f"{base} lesions over time")
        volumeSequence = slicer.vtkMRMLSequenceNode()
        volumeSequence.SetName(f"{base} scans over time")
        for sequence in (segmentationSequence, volumeSequence):
            sequence.SetIndexName("timepoint")
            sequence.SetIndexUnit("")
            sequence.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)
            sequence.SetAttribute(self.ROLE_ATTRIBUTE, "TrackSequence")
        for t, (volume, image) in enumerate(zip(volumes, images)):
            worldIjkToRas = slicer.util.vtkMatrixFromArray(self.imageIjkToRas(image))
            item = slicer.vtkMRMLSegmentationNode()
            item.SetName(f"{volume.GetName()} lesions")
            item.SetAttribute(self.ROLE_ATTRIBUTE, "TrackProxy")  # the browser's proxy copies it
            reference = slicer.vtkOrientedImageData()
            dims = volume.GetImageData().GetDimensions()
            reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
            reference.SetImageToWorldMatrix(worldIjkToRas)
            item.GetSegmentation().SetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
                slicer.vtkSegmentationConverter.SerializeImageGeometry(reference))
            for lesion in lesions:
                labelmap = self._labelmapFromMask(masks[t][lesion.lesionId], volume, worldIjkToRas)
                item.GetSegmentation().AddSegment(
                    self._trackedSegment(lesion, labelmap, status[lesion.lesionId][t], baselineNode.GetID()),
                    self.segmentIdForLesion(lesion.lesionId))
            segmentationSequence.SetDataNodeAtValue(item, str(t))
            scan = slicer.vtkMRMLScalarVolumeNode()
            scan.SetName(volume.GetName())
            scan.SetAttribute(self.ROLE_ATTRIBUTE, "TrackProxy")
            scan.SetIJKToRASMatrix(worldIjkToRas)
            scan.SetAndObserveImageData(volume.GetImageData())
            volumeSequence.SetDataNodeAtValue(scan, str(t))
            token.check()
        plan["sequences"] = (segmentationSequence, volumeSequence)
        plan["table"] = self._lesionTable(f"{base} lesion table", rows)
        plan["plot"] = self._volumePlot(base, volumes, lesions, rows)
        return plan

    def _lesionTable(self, name, rows):
        """The lesion table (one row per lesion and timepoint, columns :attr:`TABLE_COLUMNS`)."""
        table = slicer.vtkMRMLTableNode()
        table.SetName(name)
        table.SetAttribute(self.ROLE_ATTRIBUTE, "TrackTable")
        keys = ["lesion_id", "name", "index", "volume_node", "study_date", "status", "volume_ml", "long_axis_mm",
                "short_axis_mm", "volume_change_vs_baseline_pct", "volume_change_vs_nadir_pct",
                "recist_information_only"]
        for (column, kind, unit), key in zip(self.TABLE_COLUMNS, keys):
            array = {"int": vtk.vtkIntArray, "str": vtk.vtkStringArray, "float": vtk.vtkDoubleArray}[kind]()
            array.SetName(column)
            for row in rows:
                value = row[key]
                if kind == "int":
                    array.InsertNextValue(int(value))
                elif kind == "float":
                    array.InsertNextValue(float("nan") if value is None else float(value))
                else:
                    array.InsertNextValue("" if value is None else str(value))
            table.AddColumn(array)
            if unit:
                table.SetColumnUnitLabel(column, unit)
        table.SetColumnDescription("RECIST 1.1 (for information only)",
                                   "RECIST 1.1 arithmetic on the sum of the tracked lesions' long axes: not a "
                                   "clinical read (no new or non-target lesions, no node rule, no confirmation)")
        table.SetColumnDescription("Status", "tracked / vanished (no lesion found at the warped location) / "
                                             "outside (the lesion left the scan's field of view)")
        return table

    def _volumePlot(self, base, volumes, lesions, rows):
        """A table of lesion volume per timepoint (one column per lesion) and a chart with one
        series per lesion in its colour; 'outside' timepoints are gaps (not measured)."""
        data = slicer.vtkMRMLTableNode()
        data.SetName(f"{base} lesion volumes (plot data)")
        data.SetAttribute(self.ROLE_ATTRIBUTE, "TrackPlotTable")
        index = vtk.vtkDoubleArray()
        index.SetName("Timepoint")
        labels = vtk.vtkStringArray()
        labels.SetName("Scan")
        for t, volume in enumerate(volumes):
            index.InsertNextValue(float(t))
            labels.InsertNextValue(volume.GetName())
        data.AddColumn(index)
        data.AddColumn(labels)
        byLesion = {}
        for row in rows:
            byLesion.setdefault(row["lesion_id"], {})[row["index"]] = row
        chart = slicer.vtkMRMLPlotChartNode()
        chart.SetName(f"{base} lesion volumes")
        chart.SetAttribute(self.ROLE_ATTRIBUTE, "TrackChart")
        chart.SetTitle("Lesion volume over time")
        chart.SetXAxisTitle("Timepoint")
        chart.SetYAxisTitle("Volume (ml)")
        series = []
        for lesion in lesions:
            column = vtk.vtkDoubleArray()
            column.SetName(f"{self.segmentIdForLesion(lesion.lesionId)} (ml)")
            for t in range(len(volumes)):
                row = byLesion[lesion.lesionId][t]
                column.InsertNextValue(float("nan") if row["status"] == "outside" else float(row["volume_ml"]))
            data.AddColumn(column)
            node = slicer.vtkMRMLPlotSeriesNode()
            node.SetName(lesion.name)
            node.SetAttribute(self.ROLE_ATTRIBUTE, "TrackSeries")
            node.SetXColumnName("Timepoint")
            node.SetYColumnName(column.GetName())
            node.SetLabelColumnName("Scan")
            node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            node.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
            node.SetColor(*lesion.color)
            series.append(node)
        return data, chart, series

    def _previousTrackOutputs(self, baselineVolumeNode) -> list:
        """Nodes of an earlier tracking run from this baseline volume (to be replaced)."""
        out = []
        for i in range(slicer.mrmlScene.GetNumberOfNodes()):
            node = slicer.mrmlScene.GetNthNode(i)
            if node.GetAttribute(self.ROLE_ATTRIBUTE) in self.ROLE_TRACK_OUTPUTS and \
                    node.GetNodeReferenceID(self.TRACK_BASELINE_REFERENCE) == baselineVolumeNode.GetID():
                out.append(node)
                if node.IsA("vtkMRMLSequenceBrowserNode"):  # its proxies (their attributes follow the item shown)
                    proxies = vtk.vtkCollection()
                    node.GetAllProxyNodes(proxies)
                    out.extend(proxies.GetItemAsObject(j) for j in range(proxies.GetNumberOfItems()))
        return list({id(n): n for n in out}.values())

    def _commitTrackOutputs(self, plan) -> TrackOutputs:
        """Everything is computed before this point; here the scene changes."""
        scene = slicer.mrmlScene
        volumes, lesions, status = plan["volumes"], plan["lesions"], plan["status"]
        baseline = volumes[0]
        for node in self._previousTrackOutputs(baseline):
            if node.GetScene() is scene:
                helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
                    if node.IsA("vtkMRMLDisplayableNode") else []
                if node.IsA("vtkMRMLStorableNode"):
                    helpers.append(node.GetStorageNode())
                scene.RemoveNode(node)
                for helper in helpers:
                    if helper is not None and helper.GetScene() is scene:
                        scene.RemoveNode(helper)

        def unique(name):
            return scene.GenerateUniqueName(name) if scene.GetFirstNodeByName(name) is not None else name

        def own(node, role=None):
            if role is not None:
                node.SetAttribute(self.ROLE_ATTRIBUTE, role)
            node.SetNodeReferenceID(self.TRACK_BASELINE_REFERENCE, baseline.GetID())

        segmentationNodes = [plan["baselineNode"]]
        for step, target in zip(plan["followups"], plan["targets"]):
            volume, labelmaps = step["volume"], step["labelmaps"]
            if target is None:
                node = step["node"]
                node.SetName(unique(node.GetName()))
                self._addResultNode(node, volume)
            else:
                node = target
                t = len(segmentationNodes)
                wasModified = node.StartModify()
                try:
                    node.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
                    segmentation = node.GetSegmentation()
                    for lesion in lesions:
                        segmentId = self.segmentIdForLesion(lesion.lesionId)
                        segment = segmentation.GetSegment(segmentId)
                        if segment is None:
                            segmentation.AddSegment(self._trackedSegment(
                                lesion, labelmaps[lesion.lesionId], status[lesion.lesionId][t], step["source"]),
                                segmentId)
                            continue
                        if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                                labelmaps[lesion.lesionId], node, segmentId,
                                slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
                            raise RuntimeError(f"could not write segment {segmentId} into '{node.GetName()}'")
                        segment.SetName(lesion.name)
                        segment.SetColor(*lesion.color)
                        self._tagTrackedSegment(segment, lesion, status[lesion.lesionId][t], step["source"])
                finally:
                    node.EndModify(wasModified)
            segmentationNodes.append(node)

        segmentationSequence, volumeSequence = plan["sequences"]
        for sequence in (segmentationSequence, volumeSequence):
            sequence.SetName(unique(sequence.GetName()))
            scene.AddNode(sequence)
            own(sequence)
        browser = slicer.vtkMRMLSequenceBrowserNode()
        browser.SetName(unique(f"{baseline.GetName()} timepoints"))
        scene.AddNode(browser)
        own(browser, "TrackBrowser")
        browser.SetAndObserveMasterSequenceNodeID(segmentationSequence.GetID())
        browser.AddSynchronizedSequenceNodeID(volumeSequence.GetID())
        sequencesLogic = getattr(getattr(slicer.modules, "sequences", None), "logic", lambda: None)()
        if sequencesLogic is not None:
            sequencesLogic.UpdateProxyNodesFromSequences(browser)
        for sequence in (segmentationSequence, volumeSequence):
            proxy = browser.GetProxyNode(sequence)
            if proxy is not None:
                own(proxy, "TrackProxy")
                if proxy.GetDisplayNode() is None and hasattr(proxy, "CreateDefaultDisplayNodes"):
                    proxy.CreateDefaultDisplayNodes()

        table = plan["table"]
        table.SetName(unique(table.GetName()))
        scene.AddNode(table)
        own(table)
        plotTable, chart, series = plan["plot"]
        for node in (plotTable, chart):
            node.SetName(unique(node.GetName()))
            scene.AddNode(node)
            own(node)
        for node in series:
            node.SetName(unique(node.GetName()))
            scene.AddNode(node)
            own(node)
            node.SetAndObserveTableNodeID(plotTable.GetID())
            chart.AddAndObservePlotSeriesNodeID(node.GetID())
        for node in (table, chart):
            self._placeBesideVolume(node, baseline)

        return TrackOutputs(volumes, segmentationNodes,
                            {lesion.lesionId: self.segmentIdForLesion(lesion.lesionId) for lesion in lesions},
                            table, chart, plotTable, series, segmentationSequence, volumeSequence, browser,
                            status, plan["rows"], None, [])

    # ------------------------------------------------------------------ export
    @classmethod
    def exportTableToCsv(cls, tableNode, path) -> str:
        """Write a table node as CSV (comma-separated, a header row of column names, numbers
        with full precision, empty cells for missing values). Returns the path."""
        import csv

        table = tableNode.GetTable()
        columns = [table.GetColumn(c) for c in range(table.GetNumberOfColumns())]
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([c.GetName() for c in columns])
            for r in range(table.GetNumberOfRows()):
                cells = []
                for c in columns:
                    value = c.GetValue(r)
                    if isinstance(value, float):
                        cells.append("" if np.isnan(value) else repr(value))
                    else:
                        cells.append(str(value))
                writer.writerow(cells)
        os.replace(tmp, path)
        return path

    def exportSegmentations(self, folder, format="seg.nrrd", segmentationNodes=None) -> list:
        """Save segmentations to ``folder``: ``format='seg.nrrd'`` (Slicer's segmentation file:
        names, colours, tags) or ``'nii.gz'`` (a label map on the source volume's voxels, label
        value = lesion ID; segments without a lesion ID get the numbers after the largest one).
        Default nodes: the timepoint segmentations of the last tracking run, else every module
        result segmentation. Files are in each volume's own frame (as Slicer saves the volume:
        parent transforms are not applied). Returns the file paths."""
        format = format.lower().lstrip(".")
        if format not in ("seg.nrrd", "nii.gz"):
            raise ValueError(f"format must be 'seg.nrrd' or 'nii.gz', got {format!r}")
        if segmentationNodes is None:
            tracked = [n for n in (self.lastTrack.segmentationNodes if self.lastTrack is not None else [])
                       if n.GetScene() is slicer.mrmlScene]
            segmentationNodes = tracked or [n for n in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
                                            if self.isResultNode(n)]
        if not segmentationNodes:
            raise ValueError("no segmentation to export: segment (and track) lesions first")
        os.makedirs(folder, exist_ok=True)
        paths, used = [], set()
        for node in segmentationNodes:
            stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in node.GetName()).strip("._") or "lesions"
            while stem in used:
                stem += "_"
            used.add(stem)
            path = os.path.join(os.fspath(folder), f"{stem}.{format}")
            if format == "seg.nrrd":
                storage = slicer.vtkMRMLSegmentationStorageNode()
                storage.SetFileName(path)
                if not storage.WriteData(node):
                    raise RuntimeError(f"could not write '{node.GetName()}' to {path}")
            else:
                self._writeLabelmapFile(node, path)
            paths.append(path)
        return paths

    def _writeLabelmapFile(self, segmentationNode, path) -> None:
        from vtk.util import numpy_support

        volume = segmentationNode.GetNodeReference(self.SOURCE_VOLUME_REFERENCE) or segmentationNode.GetNodeReference(
            segmentationNode.GetReferenceImageGeometryReferenceRole())
        if volume is None:
            raise ValueError(f"'{segmentationNode.GetName()}' has no reference volume to export a label map on")
        segmentation = segmentationNode.GetSegmentation()
        dims = volume.GetImageData().GetDimensions()
        labels = np.zeros((dims[2], dims[1], dims[0]), dtype=np.uint16)
        ids = {sid: self.segmentLesionId(segmentation.GetSegment(sid)) for sid in segmentation.GetSegmentIDs()}
        nextId = max([v for v in ids.values() if v is not None], default=0) + 1
        for segmentId in segmentation.GetSegmentIDs():
            if ids[segmentId] is None:
                ids[segmentId], nextId = nextId, nextId + 1
            mask = self.segmentMask(segmentationNode, segmentId, volume)
            labels[mask] = ids[segmentId]
        labelmap = slicer.vtkMRMLLabelMapVolumeNode()
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        labelmap.SetIJKToRASMatrix(ijkToRas)
        image = vtk.vtkImageData()
        image.SetDimensions(dims)
        image.AllocateScalars(vtk.VTK_UNSIGNED_SHORT, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = labels.ravel()
        labelmap.SetAndObserveImageData(image)
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(os.fspath(path))
        storage.SetUseCompression(1)
        if not storage.WriteData(labelmap):
            raise RuntimeError(f"could not write the label map of '{segmentationNode.GetName()}' to {path}")

    # ------------------------------------------------------------------ writing
    @staticmethod
    def _labelmapFromMask(mask, volumeNode, ijkToRas=None):
        """A (k, j, i) boolean mask on the volume's voxels -> vtkOrientedImageData in the
        volume's own (parent-transform) frame (or with the given IJK-to-RAS matrix), cropped to
        the mask's bounding box (one empty voxel for an empty mask)."""
        from vtk.util import numpy_support

        from LesionLocatorLib.runner import mask_bbox

        mask = np.asarray(mask, dtype=bool)
        lo, hi = mask_bbox(mask)
        hi = np.maximum(hi - 1, lo)  # inclusive; an empty mask gives voxel (0, 0, 0)
        block = np.ascontiguousarray(mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1], dtype=np.uint8)
        image = slicer.vtkOrientedImageData()
        image.SetExtent(int(lo[2]), int(hi[2]), int(lo[1]), int(hi[1]), int(lo[0]), int(hi[0]))
        if ijkToRas is None:
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
            self._addResultNode(node, volumeNode)
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

    def _addResultNode(self, node, volumeNode) -> None:
        """Add a new result segmentation to the scene on ``volumeNode``: display nodes, the volume's
        parent transform, source-volume and reference-geometry references, placed beside the volume."""
        slicer.mrmlScene.AddNode(node)
        node.CreateDefaultDisplayNodes()
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        node.SetNodeReferenceID(self.SOURCE_VOLUME_REFERENCE, volumeNode.GetID())
        node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), volumeNode.GetID())
        self._placeBesideVolume(node, volumeNode)

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
    not segmentation quality. Tracking: with the demo model and the demo case
    (``Resources/Demo``) it segments the demo baseline from its points, tracks through the
    follow-ups and asks for Dice >= 0.8 against the ground truth for every lesion at every
    timepoint; without them it tracks the phantom through shifted follow-ups and checks
    geometry and lesion identity.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()
        self._tempDir = None

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
    def _phantomVolume(name="LesionLocatorTestCT", shift=(0, 0, 0)):
        """A 20x40x36 (k, j, i) CT-like volume, spacing 0.9 x 1.2 x 2.5 mm, rotated axes,
        under a rotating + translating parent transform. A 7 mm lesion at voxel (10, 20, 18)
        (+ ``shift`` voxels, for follow-ups)."""
        k, j, i = np.meshgrid(np.arange(20), np.arange(40), np.arange(36), indexing="ij")
        array = np.full((20, 40, 36), -1000, dtype=np.int16)
        body = ((j - 19.5) / 17) ** 2 + ((i - 17.5) / 16) ** 2 <= 1
        array[body] = 40
        c = np.array([10, 20, 18]) + np.asarray(shift)
        lesion = ((k - c[0]) * 2.5) ** 2 + ((j - c[1]) * 1.2) ** 2 + ((i - c[2]) * 0.9) ** 2 <= 7.0 ** 2
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
        """World RAS of a (continuous) voxel index (k, j, i), through the volume's transforms."""
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        local = ijkToRas.MultiplyPoint([float(kji[2]), float(kji[1]), float(kji[0]), 1.0])[:3]
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

    def test_TrackThroughFollowUps(self):
        logic = LesionLocatorLogic()
        if logic.defaultModelPath() and logic.demoCasePath():
            self._trackDemoCase(logic)
        else:
            self._trackPhantom(logic)

    def _trackPhantom(self, logic):
        self.delayDisplay("Tracking keeps lesion identity through follow-ups (phantom)")
        baseline, voxel = self._phantomVolume("Baseline")
        followUps = [self._phantomVolume(f"Follow-up {t}", shift=(0, 2 * t, -t))[0] for t in (1, 2)]
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicks")
        points.AddControlPointWorld(*self._worldRasOfVoxel(baseline, voxel))
        points.AddControlPointWorld(*self._worldRasOfVoxel(baseline, (8, 12, 10)))
        model = self._modelPath(logic)
        first = logic.segment(baseline, points, modelPath=model, device="cpu")
        first.GetSegmentation().GetSegment("lesion_2").SetName("Node in the liver")
        outputs = logic.track(baseline, followUps, modelPath=model, device="cpu", registration="none")
        self.assertIs(outputs.segmentationNodes[0], first)
        self.assertEqual([n.GetName() for n in outputs.segmentationNodes],
                         ["Baseline lesions", "Follow-up 1 lesions", "Follow-up 2 lesions"])
        expected = {sid: (first.GetSegmentation().GetSegment(sid).GetName(),
                          first.GetSegmentation().GetSegment(sid).GetColor()) for sid in ("lesion_1", "lesion_2")}
        for volume, node in zip(outputs.volumeNodes[1:], outputs.segmentationNodes[1:]):
            self.assertTrue(logic.isResultNode(node))
            self.assertEqual(node.GetTransformNodeID(), volume.GetTransformNodeID())
            segmentation = node.GetSegmentation()
            self.assertEqual(sorted(segmentation.GetSegmentIDs()), ["lesion_1", "lesion_2"])
            for sid, (name, color) in expected.items():
                segment = segmentation.GetSegment(sid)
                self.assertEqual((segment.GetName(), segment.GetColor()), (name, color))
                status = vtk.reference("")
                self.assertTrue(segment.GetTag(LesionLocatorLogic.TAG_STATUS, status))
                self.assertIn(str(status), LesionLocatorLogic.STATUSES)
                mask = slicer.util.arrayFromSegmentBinaryLabelmap(node, sid, volume)
                self.assertEqual(mask.shape, slicer.util.arrayFromVolume(volume).shape)
        self.assertEqual(outputs.tableNode.GetNumberOfRows(), 2 * 3)
        self.assertEqual(outputs.segmentationSequenceNode.GetNumberOfDataNodes(), 3)
        self.assertEqual(outputs.volumeSequenceNode.GetNumberOfDataNodes(), 3)
        self.assertEqual(len(outputs.plotSeriesNodes), 2)
        self.delayDisplay("Test passed")

    def _trackDemoCase(self, logic):
        """The demo case: segment the baseline from demo_points.json, track, Dice >= 0.8."""
        import json

        from LesionLocatorLib.image import read_image
        from LesionLocatorLib.metrics import dice
        from LesionLocatorLib.prompts import parse_upstream_json

        self.delayDisplay("Tracking the demo case with the demo model")
        case = logic.demoCasePath()
        names = sorted((n for n in os.listdir(case) if n.startswith("demo_t") and n.endswith(".nii.gz")
                        and not n.endswith("_label.nii.gz")), key=lambda n: int(n[len("demo_t"):].split(".")[0]))
        volumes, truths = [], []
        for name in names:
            volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name[:-len(".nii.gz")])
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(os.path.join(case, name))
            self.assertTrue(storage.ReadData(volume), f"could not read {name}")
            volume.CreateDefaultDisplayNodes()
            truth = read_image(os.path.join(case, name.replace(".nii.gz", "_label.nii.gz")))
            image = logic.volumeToImage(volume)
            self.assertEqual(truth.shape, image.shape)
            self.assertTrue(truth.same_geometry(image, tol=1e-3), f"{name}: label and scan geometry differ")
            volumes.append(volume)
            truths.append(np.asarray(truth.array))
        with open(os.path.join(case, "demo_points.json")) as f:
            prompts = parse_upstream_json(json.load(f), "demo_points.json")
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "demo points")
        for prompt in prompts:  # voxel (z, y, x) of the baseline -> world RAS
            points.AddControlPointWorld(*self._worldRasOfVoxel(volumes[0], prompt.coords))
        model = logic.defaultModelPath()
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
        low = [(t, i, round(d, 3)) for t, i, d in scores if d < 0.8]
        self.assertFalse(low, f"Dice below 0.8 (timepoint, lesion, Dice): {low}")
        self.delayDisplay("Test passed")

