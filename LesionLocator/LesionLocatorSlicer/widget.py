"""The module's panel: wires the .ui to the Logic and the parameter node; no behaviour of its own.

Everything long runs as a job (:mod:`.jobs`) polled by a ``QTimer`` every 50 ms: the network in the
persistent worker process (or on a LesionLocator server in Remote mode: Model > Run on; its settings
are the user's, :mod:`.remotesettings`, never the scene's), waited for on a background thread, so
the GUI never blocks. Prompts placed while a job runs wait in order (:mod:`.interaction`). Keyboard
shortcuts while the module is shown: P point, B box, R refine, T track, Esc cancel, Ctrl+Z undo;
in the Review table Alt+Down/Alt+Up next/previous lesion, Alt+Right/Alt+Left next/previous scan.

Review (after tracking): a table of lesions (rows) by scans (columns); selecting a cell shows that
lesion on that scan (:meth:`LesionLocatorLogic.showLesion`); Accept marks it reviewed; Correct with
point / box and Add new lesion here enter Slicer's place mode for a prompt node of the panel's own
(not the Lesions prompts, so nothing is segmented on the baseline), and once it is placed the
correction runs as a job (:meth:`LesionLocatorLogic.correctionJob`); Mark vanished runs at once.
"""
from __future__ import annotations

import logging
import os

import vtk

import qt
import slicer
from slicer.i18n import tr as _
from slicer.util import VTKObservationMixin

from . import dependencies, logic as logicModule, models, remotesettings, trackoutputs
from .interaction import InteractiveSegmentation, PromptWatcher
from .jobs import Job
from .logic import LesionLocatorLogic

L = logicModule
POLL_MS = 50
SHORTCUTS = (("P", "onPlacePoint"), ("B", "onPlaceBox"), ("R", "onRefine"), ("T", "onTrack"),
             ("Esc", "onCancel"), ("Ctrl+Z", "onUndo"),
             ("Alt+Down", "onNextLesion"), ("Alt+Up", "onPreviousLesion"),
             ("Alt+Right", "onNextTimepoint"), ("Alt+Left", "onPreviousTimepoint"))


class LesionLocatorPanel(VTKObservationMixin):
    """The GUI of the module (``parent``: the ScriptedLoadableModuleWidget)."""

    SETTINGS_MODEL_PATH = "LesionLocator/ModelPath"
    SETTINGS_DICOM_FOLDER = "LesionLocator/DicomExportFolder"

    def __init__(self, moduleWidget):
        VTKObservationMixin.__init__(self)
        self.moduleWidget = moduleWidget
        self.logic = None
        self._parameterNode = None
        self._updatingGUI = False
        self._followUpRefreshPending = False
        self._shortcuts = []
        self._runModePending = False
        self._runMode = None
        self._updatingReview = False
        self._reviewLesionIds = []
        self._reviewPrompt = None  # (prompt node, lesion ID or None for a new lesion, timepoint, kind)
        self.reviewWatcher = PromptWatcher(self._reviewPromptReady)
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.poll)

    # ------------------------------------------------------------------ set-up
    def setup(self, layout, uiWidget):
        layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LesionLocatorLogic()
        self.remote = remotesettings.load(qt.QSettings(), remotesettings.systemKeyring())
        self.session = InteractiveSegmentation(
            self.logic, volume=self._baseline, options=lambda: self.logic.modelOptions(self._parameterNode),
            enabled=lambda: self._parameterNode.GetParameter(L.PARAM_AUTO_SEGMENT) == "true",
            done=self.showSegmentation, failed=self.showError, cancelled=self.showCancelled,
            progress=self.showProgress)
        for event, handler in ((slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose),
                               (slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose),
                               (slicer.mrmlScene.NodeAddedEvent, self.onVolumesChanged),
                               (slicer.mrmlScene.NodeRemovedEvent, self.onVolumesChanged)):
            self.addObserver(slicer.mrmlScene, event, handler)
        self._connect()
        savedPath = qt.QSettings().value(self.SETTINGS_MODEL_PATH, "")
        self.initializeParameterNode()
        if savedPath and not self._parameterNode.GetParameter(L.PARAM_MODEL_PATH):
            self._parameterNode.SetParameter(L.PARAM_MODEL_PATH, savedPath)
        self.ui.progressBar.setVisible(False)
        self.showRemoteSettings()
        self.applyRunMode()  # the worker process (a crash or OOM there costs a message only) or the server

    def _connect(self):
        ui = self.ui
        for widget, signal in ((ui.baselineVolumeSelector, "currentNodeChanged(vtkMRMLNode*)"),
                               (ui.promptNodeSelector, "currentNodeChanged(vtkMRMLNode*)"),
                               (ui.modelPathLineEdit, "currentPathChanged(QString)"),
                               (ui.deviceComboBox, "currentIndexChanged(int)"), (ui.foldsLineEdit, "editingFinished()"),
                               (ui.ttaCheckBox, "stateChanged(int)"), (ui.autoSegmentCheckBox, "toggled(bool)"),
                               (ui.minVolumeSpinBox, "valueChanged(double)"),
                               (ui.minPromptFractionSpinBox, "valueChanged(double)")):
            widget.connect(signal, self.updateParameterNodeFromGUI)
        for button, handler in ((ui.placePointButton, self.onPlacePoint), (ui.placeBoxButton, self.onPlaceBox),
                                (ui.segmentButton, self.onSegment), (ui.refineButton, self.onRefine),
                                (ui.trackButton, self.onTrack), (ui.cancelButton, self.onCancel),
                                (ui.undoButton, self.onUndo),
                                (ui.installDependenciesButton, self.onInstallDependencies),
                                (ui.downloadModelButton, self.onDownloadModel),
                                (ui.exportDicomButton, self.onExportDicom),
                                (ui.reviewAcceptButton, self.onReviewAccept),
                                (ui.reviewCorrectPointButton, self.onReviewCorrectPoint),
                                (ui.reviewCorrectBoxButton, self.onReviewCorrectBox),
                                (ui.reviewMoveButton, self.onReviewMove),
                                (ui.reviewVanishedButton, self.onReviewVanished),
                                (ui.reviewNewLesionButton, self.onReviewNewLesion)):
            button.connect("clicked()", handler)
        ui.reviewTable.connect("currentCellChanged(int,int,int,int)", self.onReviewCellChanged)
        ui.runModeComboBox.connect("currentIndexChanged(int)", self.onRemoteSettingsChanged)
        ui.serverModelComboBox.connect("currentIndexChanged(int)", self.onRemoteSettingsChanged)
        for lineEdit in (ui.serverUrlLineEdit, ui.apiKeyLineEdit, ui.serverModelComboBox.lineEdit()):
            lineEdit.connect("editingFinished()", self.onRemoteSettingsChanged)
        ui.testConnectionButton.connect("clicked()", self.onTestConnection)
        ui.baselineVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateFollowUpList)
        ui.refineSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtonStates)
        ui.refineSegmentSelector.connect("currentSegmentChanged(QString)", self.updateButtonStates)

    def cleanup(self):
        self.timer.stop()
        self.removeObservers()
        if self.logic is not None:
            self._dropReviewPrompt()
            self.session.close()
            self.logic.cleanup()

    def enter(self):
        self.initializeParameterNode()
        mainWindow = slicer.util.mainWindow()
        for keys, handler in SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(keys), mainWindow)
            shortcut.connect("activated()", getattr(self, handler))
            self._shortcuts.append(shortcut)

    def exit(self):
        self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
            shortcut.deleteLater()
        self._shortcuts = []

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
        self.session.cancel()
        self.session.watcher.unwatch()
        self._dropReviewPrompt()
        self.logic.review = self.logic.lastTrack = None
        self.updateReviewTable()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.moduleWidget.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node
    def initializeParameterNode(self):
        node = self.logic.getParameterNode()
        self.logic.setDefaultParameters(node)
        if not node.GetNodeReference(L.REF_BASELINE):
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first is not None and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                node.SetNodeReferenceID(L.REF_BASELINE, first.GetID())
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
        if node is None or self._updatingGUI:
            return
        self._updatingGUI = True
        try:
            self.ui.baselineVolumeSelector.setCurrentNode(node.GetNodeReference(L.REF_BASELINE))
            self.ui.promptNodeSelector.setCurrentNode(node.GetNodeReference(L.REF_PROMPTS))
            self.ui.modelPathLineEdit.currentPath = node.GetParameter(L.PARAM_MODEL_PATH)
            device = self.ui.deviceComboBox.findText(node.GetParameter(L.PARAM_DEVICE))
            self.ui.deviceComboBox.setCurrentIndex(max(device, 0))
            self.ui.foldsLineEdit.text = node.GetParameter(L.PARAM_FOLDS)
            self.ui.ttaCheckBox.setCheckState({"on": qt.Qt.Checked, "off": qt.Qt.Unchecked}.get(
                node.GetParameter(L.PARAM_TTA), qt.Qt.PartiallyChecked))
            self.ui.autoSegmentCheckBox.checked = node.GetParameter(L.PARAM_AUTO_SEGMENT) == "true"
            try:
                options = self.logic.trackOptions(node)
            except ValueError as error:  # e.g. a scene saved by hand: shown as 0, tracking refuses it
                logging.warning(f"LesionLocator: {error}")
                options = {"minVolumeMl": 0.0, "minPromptFraction": 0.0}
            self.ui.minVolumeSpinBox.value = options["minVolumeMl"]
            self.ui.minPromptFractionSpinBox.value = options["minPromptFraction"]
            self.session.watcher.unwatch()
            self.session.watcher.watch(node.GetNodeReference(L.REF_PROMPTS))
            self.updateButtonStates()
        finally:
            self._updatingGUI = False

    def updateParameterNodeFromGUI(self, *args):
        node = self._parameterNode
        if node is None or self._updatingGUI:
            return
        wasModified = node.StartModify()
        node.SetNodeReferenceID(L.REF_BASELINE, self.ui.baselineVolumeSelector.currentNodeID)
        node.SetNodeReferenceID(L.REF_PROMPTS, self.ui.promptNodeSelector.currentNodeID)
        node.SetParameter(L.PARAM_MODEL_PATH, self.ui.modelPathLineEdit.currentPath)
        node.SetParameter(L.PARAM_DEVICE, self.ui.deviceComboBox.currentText)
        node.SetParameter(L.PARAM_FOLDS, self.ui.foldsLineEdit.text.strip())
        state = self.ui.ttaCheckBox.checkState()
        node.SetParameter(L.PARAM_TTA, {qt.Qt.Checked: "on", qt.Qt.Unchecked: "off"}.get(state, "auto"))
        node.SetParameter(L.PARAM_AUTO_SEGMENT, "true" if self.ui.autoSegmentCheckBox.checked else "false")
        node.SetParameter(L.PARAM_MIN_VOLUME_ML, repr(float(self.ui.minVolumeSpinBox.value)))
        node.SetParameter(L.PARAM_MIN_PROMPT_FRACTION, repr(float(self.ui.minPromptFractionSpinBox.value)))
        node.EndModify(wasModified)
        if self.ui.modelPathLineEdit.currentPath:
            qt.QSettings().setValue(self.SETTINGS_MODEL_PATH, self.ui.modelPathLineEdit.currentPath)

    def updateButtonStates(self, *args):
        node = self._parameterNode
        haveVolume = node is not None and node.GetNodeReference(L.REF_BASELINE) is not None
        havePrompts = node is not None and node.GetNodeReference(L.REF_PROMPTS) is not None
        busy = self.session.jobs.busy
        self.ui.placePointButton.enabled = self.ui.placeBoxButton.enabled = haveVolume  # clicks queue while busy
        self.ui.segmentButton.enabled = haveVolume and havePrompts
        self.ui.refineButton.enabled = (haveVolume and self.ui.refineSegmentSelector.currentNodeID() != ""
                                        and bool(self.ui.refineSegmentSelector.currentSegmentID()))
        self.ui.trackButton.enabled = haveVolume and not busy
        self.ui.downloadModelButton.enabled = self.ui.exportDicomButton.enabled = not busy
        self.ui.undoButton.enabled = self.logic.canUndo and not busy
        self.ui.cancelButton.enabled = busy
        cell = self._currentReviewCell()
        followUp = cell is not None and cell[1] > 0 and not busy
        self.ui.reviewAcceptButton.enabled = cell is not None
        for button in (self.ui.reviewCorrectPointButton, self.ui.reviewCorrectBoxButton, self.ui.reviewMoveButton,
                       self.ui.reviewVanishedButton, self.ui.reviewNewLesionButton):
            button.enabled = followUp

    def updateFollowUpList(self, *args):
        """Every other scalar volume, checkable, in time order (study date, else load order); the
        user may drag them into another order, which tracking then follows."""
        baseline = self.ui.baselineVolumeSelector.currentNode()
        items = [self.ui.followUpList.item(i) for i in range(self.ui.followUpList.count)]
        checked = {item.data(qt.Qt.UserRole) for item in items if item.checkState() == qt.Qt.Checked}
        shown = [item.data(qt.Qt.UserRole) for item in items]  # the user's order so far
        self.ui.followUpList.clear()
        volumes = [v for v in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                   if v is not baseline and not v.IsA("vtkMRMLLabelMapVolumeNode") and not v.GetHideFromEditors()]
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
        node = self._parameterNode.GetNodeReference(L.REF_PROMPTS)
        if node is None or not node.IsA("vtkMRMLMarkupsFiducialNode"):
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode",
                                                      slicer.mrmlScene.GenerateUniqueName(_("Lesion points")))
            node.CreateDefaultDisplayNodes()
        self._startPlacing(node, persistent=True)

    def onPlaceBox(self):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode",
                                                  slicer.mrmlScene.GenerateUniqueName(_("Lesion box")))
        node.CreateDefaultDisplayNodes()
        self._startPlacing(node, persistent=False)

    def _startPlacing(self, node, persistent):
        """Make ``node`` the prompts (watched by the interaction) and enter Slicer's place mode for it."""
        self._parameterNode.SetNodeReferenceID(L.REF_PROMPTS, node.GetID())
        markups = slicer.modules.markups.logic()
        markups.SetActiveList(node)
        markups.StartPlaceMode(persistent)

    # ------------------------------------------------------------------ actions
    def _baseline(self):
        return self._parameterNode.GetNodeReference(L.REF_BASELINE)

    def submit(self, job: Job):
        """Queue a job and make sure the timer polls it."""
        self.session.submit(job)
        self.poll()

    def poll(self):
        busy = self.session.poll()
        if busy and not self.timer.isActive():
            self.timer.start()
            self.ui.progressBar.setVisible(True)
        elif not busy and self.timer.isActive():
            self.timer.stop()
            self.ui.progressBar.setVisible(False)
        if not busy and self._runModePending:
            self.applyRunMode()
        self.updateButtonStates()

    def onSegment(self):
        prompts = self._parameterNode.GetNodeReference(L.REF_PROMPTS)
        self.submit(self.logic.segmentationJob(self._baseline(), prompts, options=self.logic.modelOptions(),
                                               done=self.showSegmentation, failed=self.showError,
                                               cancelled=self.showCancelled))

    def onRefine(self):
        refine = (self.ui.refineSegmentSelector.currentNode(), self.ui.refineSegmentSelector.currentSegmentID())
        if refine[0] is None or not refine[1]:
            return
        self.submit(self.logic.segmentationJob(self._baseline(), refine=refine, options=self.logic.modelOptions(),
                                               done=self.showSegmentation, failed=self.showError,
                                               cancelled=self.showCancelled))

    def onTrack(self):
        followUps = [slicer.mrmlScene.GetNodeByID(self.ui.followUpList.item(i).data(qt.Qt.UserRole))
                     for i in range(self.ui.followUpList.count)
                     if self.ui.followUpList.item(i).checkState() == qt.Qt.Checked]
        if not followUps:
            slicer.util.warningDisplay(_("Check the follow-up scans to track the lesions into (Inputs > Follow-ups)."),
                                       windowTitle="LesionLocator")
            return
        with slicer.util.tryWithErrorDisplay(_("Invalid tracking options."), waitCursor=False):
            options = self.logic.trackOptions(self._parameterNode)
            self.submit(self.logic.trackJob(self._baseline(), followUps, self.logic.modelOptions(), options,
                                            done=self.showTrackResults, failed=self.showError,
                                            cancelled=self.showCancelled))

    def onDownloadModel(self):
        """Ask (with the size, read from the record off the GUI thread), then download the official
        weights with the module's progress bar and Cancel, and make them the model."""
        def ask(question):
            if slicer.util.confirmOkCancelDisplay(question, windowTitle="LesionLocator"):
                self.submit(self.logic.downloadJob(done=self.showDownloadedModel, failed=self.showError,
                                                   cancelled=self.showDownloadCancelled))
        self.submit(Job(_("Reading the model record"), lambda plan, progress, cancel: models.describeDownload(),
                        done=ask, failed=self.showError))

    def onCancel(self):
        self.session.cancel()
        self.ui.statusLabel.text = _("Cancelling...")

    def onUndo(self):
        if self.session.jobs.busy:
            return
        with slicer.util.tryWithErrorDisplay(_("Nothing could be undone."), waitCursor=False):
            self.ui.statusLabel.text = _("Undone: {what}").format(what=self.logic.undo())
        outputs = self.logic.lastTrack
        if outputs is not None and outputs.tableNode.GetScene() is slicer.mrmlScene:
            self.ui.resultsTableView.setMRMLTableNode(outputs.tableNode)  # a correction undone: a new table
        self.updateReviewTable()
        self.updateButtonStates()

    def onExportDicom(self):
        """Ask for a folder, then write the DICOM SEG and SR files there (the last tracking run, else
        every lesion segmentation; :meth:`LesionLocatorLogic.exportDicom`)."""
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Export DICOM SEG + SR to folder"),
                                                     qt.QSettings().value(self.SETTINGS_DICOM_FOLDER, ""))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("DICOM export failed."), waitCursor=True):
            written = self.logic.exportDicom(folder)
            qt.QSettings().setValue(self.SETTINGS_DICOM_FOLDER, folder)
            self.showDicomExport(folder, written)

    # ------------------------------------------------------------------ results
    def showProgress(self, fraction, message):
        self.ui.progressBar.value = int(100 * fraction)
        waiting = len(self.session.jobs.waiting())
        self.ui.statusLabel.text = message + (_(" ({n} waiting)").format(n=waiting) if waiting else "")

    def showSegmentation(self, resultNode):
        summary = self.logic.lastRunSummary()
        self.ui.statusLabel.text = summary
        self.ui.refineSegmentSelector.setCurrentNode(resultNode)
        if self.logic.lastResponse is not None and self.logic.lastResponse.empty:
            slicer.util.warningDisplay(summary, windowTitle="LesionLocator")

    def showTrackResults(self, outputs: trackoutputs.TrackOutputs):
        """The lesion table in the module panel, the volume plot in the layout's plot view."""
        self.ui.resultsTableView.setMRMLTableNode(outputs.tableNode)
        self.ui.resultsCollapsibleButton.collapsed = False
        plots = getattr(slicer.modules, "plots", None)
        if plots is not None and outputs.plotChartNode is not None:
            plots.logic().ShowChartInLayout(outputs.plotChartNode)
        self.ui.statusLabel.text = self.logic.lastTrackSummary()
        self.ui.reviewCollapsibleButton.collapsed = False
        self.updateReviewTable()
        if outputs.warnings:
            slicer.util.warningDisplay("\n".join(outputs.warnings), windowTitle="LesionLocator")

    def showDicomExport(self, folder, written):
        """The status line: the files written and the library's warnings."""
        text = _("Wrote {n} DICOM file(s) to {folder}: {files}").format(
            n=len(written.paths), folder=folder, files=", ".join(os.path.basename(p) for p in written.paths))
        if written.warnings:
            text += "\n" + _("Warnings: {warnings}").format(warnings=" ".join(written.warnings))
        self.ui.statusLabel.text = text

    def showDownloadedModel(self, modelRoot):
        self.ui.modelPathLineEdit.addCurrentPathToHistory()
        qt.QSettings().setValue(self.SETTINGS_MODEL_PATH, str(modelRoot))
        self.ui.statusLabel.text = _("Model ready and selected: {path}").format(path=modelRoot)

    def showError(self, error):
        """Every failure is a message (the scene is unchanged), not only a traceback in the log."""
        logging.error("LesionLocator failed", exc_info=(type(error), error, error.__traceback__))
        self.ui.statusLabel.text = _("Failed: {error}").format(error=error)
        slicer.util.errorDisplay(str(error), windowTitle="LesionLocator")

    def showCancelled(self):
        self.ui.statusLabel.text = _("Cancelled: nothing was changed.")

    def showDownloadCancelled(self):
        self.ui.statusLabel.text = _("Download cancelled: nothing was installed; downloading again resumes where "
                                     "it stopped.")

    # ------------------------------------------------------------------ review
    def updateReviewTable(self, *args):
        """The review table from the Logic's last tracking run: rows lesions, columns scans, cells
        'status, volume ml' (a mark once accepted or corrected); the selected cell is kept."""
        table = self.ui.reviewTable
        current = self._currentReviewCell()
        cells = self.logic.reviewCells()
        self._updatingReview = True
        try:
            table.clear()
            self._reviewLesionIds = list(dict.fromkeys(cell.lesionId for cell in cells))
            columns = self.logic.review.timepoints if cells else 0
            table.setRowCount(len(self._reviewLesionIds))
            table.setColumnCount(columns)
            if cells:
                table.setHorizontalHeaderLabels([f"t{t}: {self.logic.review.volumes[t].GetName()}"
                                                 for t in range(columns)])
                names = {cell.lesionId: cell.name for cell in cells}
                table.setVerticalHeaderLabels([f"{names[i]} ({i})" for i in self._reviewLesionIds])
            for cell in cells:
                item = qt.QTableWidgetItem(cell.text)
                item.setFlags(qt.Qt.ItemIsSelectable | qt.Qt.ItemIsEnabled)
                item.setToolTip(_("{lesion} on '{scan}': {status}, {volume:.3f} ml").format(
                    lesion=cell.name, scan=cell.volumeName, status=cell.status, volume=cell.volumeMl))
                table.setItem(self._reviewLesionIds.index(cell.lesionId), cell.timepoint, item)
            table.resizeColumnsToContents()
            if current is not None and current[0] in self._reviewLesionIds and current[1] < columns:
                table.setCurrentCell(self._reviewLesionIds.index(current[0]), current[1])
        finally:
            self._updatingReview = False
        self.updateButtonStates()

    def _currentReviewCell(self):
        """(lesion ID, timepoint) of the selected review cell, or None."""
        table = self.ui.reviewTable
        row, column = table.currentRow(), table.currentColumn()
        if not 0 <= row < len(self._reviewLesionIds) or column < 0 or self.logic.review is None:
            return None
        return self._reviewLesionIds[row], column

    def _selectReviewCell(self, lesionId, timepoint):
        if lesionId in self._reviewLesionIds:
            self.ui.reviewTable.setCurrentCell(self._reviewLesionIds.index(lesionId), timepoint)

    def onReviewCellChanged(self, row, column, previousRow=-1, previousColumn=-1):
        """A cell was selected: show that lesion on that scan."""
        if self._updatingReview:
            return
        cell = self._currentReviewCell()
        if cell is not None:
            try:
                self.logic.showLesion(*cell)
            except ValueError as error:
                self.ui.statusLabel.text = str(error)
        self.updateButtonStates()

    def _moveReviewCell(self, rows, columns):
        table = self.ui.reviewTable
        if table.rowCount == 0 or table.columnCount == 0:
            return
        row, column = max(table.currentRow(), 0), max(table.currentColumn(), 0)
        table.setCurrentCell(min(max(row + rows, 0), table.rowCount - 1),
                             min(max(column + columns, 0), table.columnCount - 1))

    def onNextLesion(self):
        self._moveReviewCell(1, 0)

    def onPreviousLesion(self):
        self._moveReviewCell(-1, 0)

    def onNextTimepoint(self):
        self._moveReviewCell(0, 1)

    def onPreviousTimepoint(self):
        self._moveReviewCell(0, -1)

    def onReviewAccept(self):
        """Mark the selected cell reviewed, then go to the next scan (or the next lesion's first follow-up)."""
        cell = self._currentReviewCell()
        if cell is None:
            return
        self.logic.acceptCell(*cell)
        self.updateReviewTable()
        table = self.ui.reviewTable
        if cell[1] + 1 < table.columnCount:
            self._moveReviewCell(0, 1)
        elif table.currentRow() + 1 < table.rowCount:
            table.setCurrentCell(table.currentRow() + 1, min(1, table.columnCount - 1))

    def onReviewCorrectPoint(self):
        self._startReviewCorrection("point")

    def onReviewCorrectBox(self):
        self._startReviewCorrection("box")

    def onReviewMove(self):
        self._startReviewCorrection("moved")

    def onReviewNewLesion(self):
        self._startReviewCorrection("new")

    def onReviewVanished(self):
        cell = self._currentReviewCell()
        if cell is None or cell[1] == 0:
            return
        self.submit(self.logic.correctionJob(cell[0], cell[1], "vanished", done=self.showCorrection,
                                             failed=self.showError, cancelled=self.showCancelled))

    def _startReviewCorrection(self, kind):
        """Show the selected cell and enter place mode for a prompt node of the panel's own: a point
        ('point', 'new') or an ROI ('box'); once placed, :meth:`_reviewPromptReady` runs the correction."""
        cell = self._currentReviewCell()
        if cell is None or cell[1] == 0:
            self.ui.statusLabel.text = _("Select a follow-up cell in the Review table first.")
            return
        lesionId, timepoint = cell
        try:
            self.logic.showLesion(lesionId, timepoint)
        except ValueError as error:
            self.ui.statusLabel.text = str(error)
            return
        self._dropReviewPrompt()
        className = "vtkMRMLMarkupsROINode" if kind == "box" else "vtkMRMLMarkupsFiducialNode"
        node = slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GenerateUniqueName(_("Correction")))
        node.CreateDefaultDisplayNodes()
        self._reviewPrompt = (node, None if kind == "new" else lesionId, timepoint, kind)
        self.reviewWatcher.watch(node)
        markups = slicer.modules.markups.logic()
        markups.SetActiveList(node)
        markups.StartPlaceMode(False)
        scan = self.logic.review.volumes[timepoint].GetName()
        self.ui.statusLabel.text = (_("Draw a box around the lesion on '{scan}'.") if kind == "box" else
                                    _("Click the new lesion on '{scan}'.") if kind == "new" else
                                    _("Click the centre of the lesion on '{scan}': its tracked mask moves there.")
                                    if kind == "moved" else
                                    _("Click the lesion on '{scan}'.")).format(scan=scan)

    def _reviewPromptReady(self, node, pointId):
        pending = self._reviewPrompt
        if pending is None or pending[0] is not node:
            return
        self.reviewWatcher.unwatch(node)
        self._reviewPrompt = None
        _node, lesionId, timepoint, kind = pending
        prompt = node if pointId is None else (node, node.GetNthControlPointIndexByID(pointId))

        def done(outputs):
            self._removePromptNode(node)
            self.showCorrection(outputs)

        def failed(error):
            self._removePromptNode(node)
            self.showError(error)

        def cancelled():
            self._removePromptNode(node)
            self.showCancelled()
        self.submit(self.logic.correctionJob(lesionId, timepoint, kind, prompt, done=done, failed=failed,
                                             cancelled=cancelled))

    def _dropReviewPrompt(self):
        """Forget a correction prompt still being placed (and remove its node)."""
        pending, self._reviewPrompt = self._reviewPrompt, None
        if pending is not None:
            self.reviewWatcher.unwatch(pending[0])
            self._removePromptNode(pending[0])

    @staticmethod
    def _removePromptNode(node):
        if node is not None and node.GetScene() is slicer.mrmlScene:
            slicer.mrmlScene.RemoveNode(node)

    def showCorrection(self, outputs: trackoutputs.TrackOutputs):
        """A correction was written: the new lesion table and plot, the review table, the corrected cell."""
        self.ui.resultsTableView.setMRMLTableNode(outputs.tableNode)
        plots = getattr(slicer.modules, "plots", None)
        if plots is not None and outputs.plotChartNode is not None:
            plots.logic().ShowChartInLayout(outputs.plotChartNode)
        self.updateReviewTable()
        correction = self.logic.review.lastCorrection if self.logic.review is not None else None
        if correction is not None:
            self._selectReviewCell(correction.lesion, correction.timepoint)
        self.ui.statusLabel.text = self.logic.lastCorrectionSummary()
        if outputs.warnings:
            slicer.util.warningDisplay("\n".join(outputs.warnings), windowTitle="LesionLocator")

    # ------------------------------------------------------------------ remote mode
    def showRemoteSettings(self):
        ui, remote = self.ui, self.remote
        self._updatingGUI = True
        try:
            ui.runModeComboBox.setCurrentIndex(1 if remote.enabled else 0)
            ui.serverUrlLineEdit.text = remote.url
            ui.apiKeyLineEdit.text = remote.apiKey
            ui.serverModelComboBox.setEditText(remote.model)
        finally:
            self._updatingGUI = False
        self.updateRemoteWidgets()

    def updateRemoteWidgets(self):
        """The server's fields in Remote mode, the local model's otherwise (folds and mirroring: both)."""
        ui = self.ui
        remote = ui.runModeComboBox.currentIndex == 1
        for widget in (ui.serverUrlLabel, ui.serverUrlLineEdit, ui.apiKeyLabel, ui.apiKeyLineEdit,
                       ui.serverModelLabel, ui.serverModelComboBox, ui.testConnectionButton):
            widget.setVisible(remote)
        for widget in (ui.modelPathLabel, ui.modelPathLineEdit, ui.deviceLabel, ui.deviceComboBox,
                       ui.downloadModelButton):
            widget.setVisible(not remote)

    def onRemoteSettingsChanged(self, *args):
        """Save the Remote settings (user settings and keyring, never the scene) and use them."""
        if self._updatingGUI:
            return
        ui = self.ui
        self.remote = remotesettings.RemoteSettings(ui.runModeComboBox.currentIndex == 1,
                                                    ui.serverUrlLineEdit.text.strip(),
                                                    ui.serverModelComboBox.currentText.strip(),
                                                    ui.apiKeyLineEdit.text.strip())
        remotesettings.save(self.remote, qt.QSettings(), remotesettings.systemKeyring())
        self.updateRemoteWidgets()
        self.applyRunMode()

    def applyRunMode(self):
        """Give the Logic the runner the settings ask for (the server or the local worker process);
        while a job runs, once it has finished."""
        if self.session.jobs.busy:
            self._runModePending = True
            return
        self._runModePending = False
        remote = self.remote
        mode = (remote.url, remote.apiKey, remote.model) if remote.enabled and remote.url else "local"
        if mode == self._runMode:
            return
        self._runMode = mode
        if mode != "local":
            try:
                self.logic.useRemoteServer(remote.url, remote.apiKey, remote.model)
            except ValueError as error:  # not a URL
                self.ui.statusLabel.text = _("Server: {error}").format(error=error)
                self._runMode = None
                self.logic.useWorkerProcess()
        else:
            self.logic.useWorkerProcess()
        self.updateDependencyStatus()

    def onTestConnection(self):
        """Ask the server for its version, devices and models (off the GUI thread)."""
        self.onRemoteSettingsChanged()
        url, apiKey = self.remote.url, self.remote.apiKey
        self.ui.statusLabel.text = _("Connecting to {url}...").format(url=url)
        self.submit(Job(_("Testing the connection"),
                        lambda plan, progress, cancel: self.logic.testServerConnection(url, apiKey),
                        done=self.showConnectionTest, failed=self.showError))

    def showConnectionTest(self, result):
        """The test's line in the status label; the server's models in the model list."""
        line, names = result
        self.ui.statusLabel.text = line
        combo, current = self.ui.serverModelComboBox, self.ui.serverModelComboBox.currentText
        self._updatingGUI = True
        try:
            combo.clear()
            combo.addItems(names)
            combo.setEditText(current)
        finally:
            self._updatingGUI = False

    # ------------------------------------------------------------------ dependencies
    def updateDependencyStatus(self):
        message = None if self.logic.isRemote else dependencies.status_message()  # a server needs none here
        self.ui.installDependenciesButton.setVisible(message is not None)
        if message:
            self.ui.statusLabel.text = message

    def onInstallDependencies(self):
        message = dependencies.status_message()
        if message is None:
            self.updateDependencyStatus()
            return
        if not slicer.util.confirmOkCancelDisplay(message + "\n\n" + _("Install them now? This downloads several "
                                                                       "hundred MB."), windowTitle="LesionLocator"):
            return
        with slicer.util.WaitCursor():
            problem = dependencies.install_in_slicer(report=self._showInstallStep)
        if problem:
            self.ui.statusLabel.text = problem
            slicer.util.errorDisplay(problem, windowTitle="LesionLocator")
        self.updateDependencyStatus()

    def _showInstallStep(self, message):
        self.ui.statusLabel.text = message
        slicer.app.processEvents()
