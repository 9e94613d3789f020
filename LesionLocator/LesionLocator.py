"""LesionLocator: promptable lesion segmentation and tracking in 3D Slicer.

Click a lesion (point) or draw a box (ROI) on a CT; the LesionLocator network segments it, and
Track follows the lesions through the follow-up scans. This file holds the module class, a thin
widget shell and the self-test entry; the code is in the ``LesionLocatorSlicer`` package beside it
(see its ``__init__`` for which file does what) and the network code in the pure-Python library
``LesionLocatorLib`` (LPS world millimetres, arrays (z, y, x)).

Everything the module does is in :class:`LesionLocatorLogic`, usable from the Python console
without the GUI (these calls block until done)::

    logic = slicer.util.getModuleLogic("LesionLocator")
    seg = logic.segment(getNode("CT"), getNode("F"), modelPath="/models/LesionLocatorCheckpoint")
    out = logic.track(getNode("CT"), [getNode("CT 2024"), getNode("CT 2025")],
                      modelPath="/models/LesionLocatorCheckpoint")
    logic.reviewCells()                                   # lesion x scan: status, volume (ml)
    logic.showLesion(1, 2)                                # lesion 1 on the second follow-up
    logic.correctTracking(1, 2, "point", getNode("F2"))   # or "box" (ROI), "vanished", "new"
    logic.undo()                                          # the correction, in one step
    logic.exportTableToCsv(out.tableNode, "/tmp/lesions.csv")
    logic.exportSegmentations("/tmp/lesions", format="nii.gz")
    logic.exportDicom("/tmp/dicom")  # DICOM SEG + SR per timepoint, on the series loaded from DICOM
"""
from __future__ import annotations

import os
import sys
import warnings

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleTest,
                                           ScriptedLoadableModuleWidget)


def _useBundledLibrary() -> None:
    """Import the ``LesionLocatorLib`` shipped with this module, even when another copy (e.g. an
    older pip install) is on ``sys.path``: the installed extension ships it next to this file
    (the scripted modules folder), a source checkout one folder up."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "LesionLocatorLib", "__init__.py")):
            if sys.path[:1] != [folder]:
                sys.path.insert(0, folder)
            loaded = sys.modules.get("LesionLocatorLib")
            if loaded is not None and os.path.dirname(os.path.dirname(os.path.abspath(loaded.__file__))) != folder:
                warnings.warn(f"LesionLocator: another LesionLocatorLib was imported first ({loaded.__file__}); "
                              f"restart Slicer to use the module's own copy in {folder}")
            return


_useBundledLibrary()
# Only light imports here: torch and nnunetv2 may still be missing when Slicer loads the module
# (the panel offers to install them); the library is imported where it is used.
from LesionLocatorSlicer.logic import LesionLocatorLogic, MissingDependencyError  # noqa: E402,F401
from LesionLocatorSlicer.scene import TransformError  # noqa: E402,F401
from LesionLocatorSlicer.selftest import SelfTestCases  # noqa: E402


class LesionLocator(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LesionLocator")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["LesionLocator for 3D Slicer contributors"]
        self.parent.helpText = _(
            "Promptable 3D lesion segmentation in CT with LesionLocator (Rokuss et al., CVPR 2025): click a lesion or "
            "draw a box around it, and get its 3D mask as a segment. Each control point of a point list and each ROI "
            "is one lesion; results go to a segmentation named '&lt;volume&gt; lesions', one segment per lesion. "
            "<i>Track</i> propagates the lesions through the checked follow-up scans (in the order listed): one "
            "segmentation per scan with the same segment names and colours, a lesion table (volume, diameters, change "
            "vs baseline and nadir), a growth plot and a sequence browser over the timepoints. Your own segmentations "
            "are never overwritten. <i>Export DICOM SEG + SR</i> writes each timepoint's lesions as a DICOM "
            "segmentation and a measurement report (TID 1500) on the series the scan was loaded from (DICOM module). "
            "<i>Review</i> lists every lesion on every scan: select one to see it, accept it, or correct it with a "
            "point or box (it is re-tracked through the later scans only), mark it vanished, or add a lesion first "
            "seen on a follow-up; Undo reverts a correction. "
            "Shortcuts: P point, B box, R refine, T track, Esc cancel, Ctrl+Z undo, Alt+arrows move in the Review "
            "table.")
        self.parent.helpText += ('<p>' + _('Documentation: <a href="{url}">the project page</a>.').format(
            url="https://github.com/lesionlocator/SlicerLesionLocator") + '</p>')
        self.parent.acknowledgementText = _(
            "LesionLocator: M. Rokuss, Y. Kirchhoff, S. Akbal, B. Kovacs, S. Roy, C. Ulrich, T. Wald, L. T. Rotkopf, "
            "H.-P. Schlemmer, K. Maier-Hein, 'LesionLocator: Zero-Shot Universal Tumor Segmentation and Tracking in 3D "
            "Whole-Body Imaging', CVPR 2025. Built on nnU-Net v2.")


class LesionLocatorWidget(ScriptedLoadableModuleWidget):
    """Adds the module panel (``LesionLocatorSlicer.widget``) to the module's layout."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.panel = None

    def setup(self):
        from LesionLocatorSlicer.widget import LesionLocatorPanel

        ScriptedLoadableModuleWidget.setup(self)
        self.panel = LesionLocatorPanel(self)
        self.panel.setup(self.layout, slicer.util.loadUI(self.resourcePath("UI/LesionLocator.ui")))

    def cleanup(self):
        if self.panel is not None:
            self.panel.cleanup()

    def enter(self):
        self.panel.enter()

    def exit(self):
        self.panel.exit()


class LesionLocatorTest(ScriptedLoadableModuleTest, SelfTestCases):
    """The module's self-test (see ``LesionLocatorSlicer.selftest``); skipped with the reason when
    torch or nnunetv2 are missing (extension build machines)."""

    def setUp(self):
        SelfTestCases.setUp(self)

    def tearDown(self):
        SelfTestCases.tearDown(self)

    def runTest(self):
        SelfTestCases.runTest(self)
