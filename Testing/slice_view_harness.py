"""Drive Slicer's real mouse-interaction pipeline on an offscreen slice view.

Tests of code that reacts to markups placed or moved by the user (a click, a box, a drag)
must see the events Slicer really fires, in Slicer's order. PyPI ``slicer-core`` ships the
C++ that produces them -- ``vtkMRMLSliceViewInteractorStyle``, the displayable managers
(``vtkMRMLMarkupsDisplayableManager`` and the other slice-view managers), the markups widgets
(``vtkSlicerPointsWidget``, ``vtkSlicerROIWidget``) -- but not the Qt slice widget around them.
:class:`SliceView` builds what ``qMRMLSliceWidget``/``qMRMLSliceView`` and the layout manager
build, without Qt:

* the application logic is given to ``vtkMRMLSliceViewDisplayableManagerFactory`` (as
  ``qSlicerCoreApplication`` does) and the slice-view displayable managers are registered
  (the modules' ones -- colour legend, markups, segmentations, transforms -- and the six
  ``qMRMLSliceView`` registers itself);
* an offscreen ``vtkRenderWindow`` with one renderer, a ``vtkGenericRenderWindowInteractor``
  carrying a ``vtkInteractorStyleUser`` (``qMRMLSliceView`` sets that style), the displayable
  manager group instantiated on the renderer;
* a ``vtkMRMLSliceLogic`` (application logic, scene, listed in the application logic's slice
  logics as the layout manager does) owning the slice node of the given layout name;
* a ``vtkMRMLSliceViewInteractorStyle`` given the slice logic, the interactor and the
  displayable manager group; the group is given the slice node; the slice node is resized to
  the view (``ResizeSliceNode``); the window is rendered once.

Mouse actions are replayed the way Qt's ``QVTKInteractorAdapter`` hands them to VTK: event
position and modifier keys set on the interactor, then ``InvokeEvent`` of the VTK mouse event
on the interactor. From there everything is Slicer's: the interactor style turns each event
into a ``vtkMRMLInteractionEventData`` (display position, world position through the slice
node's ``XYToRAS``, modifiers, "mouse moved since button down"), picks the displayable manager
that claims it (closest first) and lets it process the event. Going through the interactor
rather than calling ``DelegateInteractionEventDataToDisplayableManagers`` directly keeps the
parts of Slicer that live in the style: the click detection (a release without motion becomes
a click), the world position computation and the choice between displayable managers.
The window is rendered after an event whenever a displayable manager asked for a render, as
Slicer's scheduled render does between mouse events.

Frames and units:

* RAS: Slicer's world frame, millimetres (no parent transforms are involved here).
* Display: VTK display pixels of the view, origin at the bottom-left corner, x to the right,
  y up (Qt's y is flipped before VTK sees it). The interactor only carries integer pixels,
  so a click "at" a RAS point lands on the pixel nearest to the point's projection onto the
  slice plane; the actions return the RAS of that pixel (``ras_of(pixel_of(ras))``).
* The slice plane: ``XYToRAS`` maps display (x, y, 0) to RAS; ``display_of`` inverts it and
  drops the out-of-plane part, so ``ras_of(display_of(p))`` is the orthogonal projection of
  ``p`` onto the plane.

Usage (pytest)::

    pytest.register_assert_rewrite("slice_view_harness")  # else pytest warns: imported before the plugin
    from slice_view_harness import record_events

    pytest_plugins = ["slicer_harness", "slice_view_harness"]

    def test_click(slicer_scene, slice_view):
        slice_view.show(volume, ras=target)
        with record_events(points) as events:
            slice_view.place_point(points, target)

``slice_view`` is skipped, with the reason, where no offscreen OpenGL context can be made
(VTK crashes when it renders without one, so this is probed once per session in a
subprocess). On Linux without an X server VTK's wheel renders offscreen through EGL (Debian packages
``libegl1`` and ``libgl1-mesa-dri``); no X server or ``xvfb`` is needed.
"""
from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest

# Slice-view displayable managers in the order a Slicer session registers them: the modules'
# (qSlicerColorsModule, qSlicerMarkupsModule, qSlicerSegmentationsModule,
# qSlicerTransformsModule setup()) before the layout creates views, then those qMRMLSliceView
# registers itself (qMRMLSliceViewPrivate::initDisplayableManagers).
SLICE_VIEW_DISPLAYABLE_MANAGERS = (
    "vtkMRMLColorLegendDisplayableManager",
    "vtkMRMLMarkupsDisplayableManager",
    "vtkMRMLSegmentationsDisplayableManager2D",
    "vtkMRMLTransformsDisplayableManager2D",
    "vtkMRMLLinearTransformsDisplayableManager",
    "vtkMRMLVolumeGlyphSliceDisplayableManager",
    "vtkMRMLModelSliceDisplayableManager",
    "vtkMRMLCrosshairDisplayableManager",
    "vtkMRMLOrientationMarkerDisplayableManager",
    "vtkMRMLRulerDisplayableManager",
    "vtkMRMLScalarBarDisplayableManager",
)

# Control-point events of vtkMRMLMarkupsNode that record_events observes by default.
POINT_EVENTS = (
    "PointPositionDefinedEvent",
    "PointStartInteractionEvent",
    "PointEndInteractionEvent",
    "PointModifiedEvent",
    "PointAddedEvent",
    "PointPositionUndefinedEvent",
)


# ------------------------------------------------------------------------------ rendering
_PROBE = """
from vtkmodules.vtkRenderingCore import vtkRenderWindow, vtkRenderer
import vtkmodules.vtkRenderingOpenGL2
window = vtkRenderWindow()
window.SetOffScreenRendering(1)
window.AddRenderer(vtkRenderer())
window.SetSize(8, 8)
window.Render()
print("rendered with", window.GetClassName())
"""


@functools.cache
def offscreen_rendering() -> tuple:
    """``(True, window class)`` if VTK can render offscreen here, else ``(False, reason)``.

    Probed in a subprocess: without an OpenGL context VTK segfaults in ``Render()``.
    """
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], check=False, capture_output=True, text=True,
                              timeout=120)
    except subprocess.TimeoutExpired:
        return False, "VTK offscreen rendering probe timed out"
    if done.returncode == 0 and "rendered with" in done.stdout:
        return True, done.stdout.strip().split()[-1]
    stderr = re.sub(r"\x1b\[[0-9;]*m", "", done.stderr)  # VTK's log colours
    messages = [line.split("| ", 1)[-1].strip() for line in stderr.splitlines() if "WARN|" in line or "ERR|" in line]
    return False, (f"VTK cannot render offscreen here (probe exit status {done.returncode}; "
                   f"{' '.join(messages[-2:]) or stderr.strip()[-300:]}). Install Mesa's EGL "
                   f"(Debian: libegl1 libgl1-mesa-dri) or run under an X server (xvfb-run -a)")


# ------------------------------------------------------------------------------ events
Event = namedtuple("Event", "name index state")
Event.__doc__ = """One observed node event: ``name`` (e.g. ``"PointPositionDefinedEvent"``),
``index`` (the control point index passed as call data, ``None`` when the event carries none,
e.g. ``PointStartInteractionEvent``) and ``state`` (what the recorder's ``snapshot(node)``
returned while the event was being fired, ``None`` without a snapshot)."""


class EventRecorder(list):
    """The events a node fired, in order, as :class:`Event` items; a context manager.

    Observers are removed by :meth:`stop` (or on leaving the ``with`` block); the recorded
    events stay.
    """

    def __init__(self, node, events=POINT_EVENTS, snapshot=None):
        import vtk

        super().__init__()
        self.node = node
        self._tags = []
        for name in events:
            eventId = getattr(type(node), name, None)
            if eventId is None:
                eventId = getattr(vtk.vtkCommand, name)

            def callback(caller, event, callData=None, name=name):
                self.append(Event(name, callData, snapshot(caller) if snapshot else None))

            callback.CallDataType = vtk.VTK_INT  # markups point events pass the point index (int*)
            self._tags.append(node.AddObserver(eventId, callback))

    def names(self) -> list:
        """The event names, in order."""
        return [event.name for event in self]

    def stop(self) -> EventRecorder:
        for tag in self._tags:
            self.node.RemoveObserver(tag)
        self._tags = []
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        return False


def record_events(node, events=POINT_EVENTS, snapshot=None) -> EventRecorder:
    """Record ``events`` (names of ``vtkMRMLMarkupsNode``/``vtkCommand`` events) fired by ``node``.

    ``snapshot``, if given, is called with the node inside each observer, so a test can see
    the node's state at the moment the event fires (e.g. the number of defined control
    points and the ROI size when ``PointPositionDefinedEvent`` arrives).
    """
    return EventRecorder(node, events, snapshot)


# ------------------------------------------------------------------------------ the view
class SliceView:
    """A Slicer slice view (``name`` is its layout name, e.g. "Red") without Qt, driven by mouse events.

    ``harness`` is a :class:`slicer_harness.SlicerHarness`; ``size`` is the view size in
    display pixels (width, height); ``render=False`` never renders (no OpenGL needed; the
    markups events were checked to be the same, see test_slice_view_harness.py).

    Attributes: ``scene``, ``slice_node``, ``slice_logic``, ``render_window``, ``renderer``,
    ``interactor``, ``interactor_style`` (the ``vtkMRMLSliceViewInteractorStyle``),
    ``displayable_managers`` (the group), ``interaction_node``, ``selection_node``.
    """

    def __init__(self, harness, name="Red", size=(400, 400), render=True):
        import slicer
        import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (OpenGL render window classes)
        from vtkmodules.vtkInteractionStyle import vtkInteractorStyleUser
        from vtkmodules.vtkRenderingCore import vtkRenderer, vtkRenderWindow
        from vtkmodules.vtkRenderingUI import vtkGenericRenderWindowInteractor

        self.harness = harness
        self.scene = harness.scene
        self.size = (int(size[0]), int(size[1]))
        self.render_enabled = render
        appLogic = harness.appLogic

        # qSlicerCoreApplication gives the factory the application logic; the modules and
        # qMRMLSliceView register the displayable managers.
        self._factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        self._previousFactoryAppLogic = self._factory.GetMRMLApplicationLogic()
        self._factory.SetMRMLApplicationLogic(appLogic)
        for className in SLICE_VIEW_DISPLAYABLE_MANAGERS:
            if not self._factory.IsDisplayableManagerRegistered(className):
                self._factory.RegisterDisplayableManager(className)

        # the render window, its interactor and the interactor observer (qMRMLSliceView)
        self.render_window = vtkRenderWindow()
        self.render_window.SetOffScreenRendering(1)
        self.render_window.SetSize(*self.size)
        self.renderer = vtkRenderer()
        self.render_window.AddRenderer(self.renderer)
        self.interactor = vtkGenericRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.render_window)
        self.interactor_style = slicer.vtkMRMLSliceViewInteractorStyle()
        self.interactor_style.SetInteractor(self.interactor)
        self.interactor.SetInteractorStyle(vtkInteractorStyleUser())
        self.displayable_managers = self._factory.InstantiateDisplayableManagers(self.renderer)
        self.interactor_style.SetDisplayableManagers(self.displayable_managers)
        self._renderRequested = False
        self._groupObserver = self.displayable_managers.AddObserver(
            "UpdateEvent", lambda caller, event: setattr(self, "_renderRequested", True))

        # the slice logic (qMRMLSliceControllerWidget) and the slice node (the layout's)
        self.slice_logic = slicer.vtkMRMLSliceLogic()
        self.slice_logic.SetMRMLApplicationLogic(appLogic)
        self.slice_logic.SetMRMLScene(self.scene)
        appLogic.GetSliceLogics().AddItem(self.slice_logic)
        self.slice_logic.SetDisplayableManagerGroup(self.displayable_managers)
        sliceNode = self._existing_slice_node(name)
        if sliceNode is None:
            sliceNode = self.slice_logic.AddSliceNode(name)
        else:
            self.slice_logic.SetSliceNode(sliceNode)
        self.slice_node = sliceNode
        self.interactor_style.SetSliceLogic(self.slice_logic)
        self.displayable_managers.SetMRMLDisplayableNode(sliceNode)
        self.slice_logic.ResizeSliceNode(*self.size)  # qMRMLSliceWidget: slice node dimensions = view size

        self.interaction_node = sliceNode.GetInteractionNode()
        self.selection_node = self.scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
        self.markups_logic = harness.logics["Markups"]
        self.render(force=True)  # qMRMLSliceView renders once to create the OpenGL context

    def _existing_slice_node(self, name):
        for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
            node = self.scene.GetNthNodeByClass(i, "vtkMRMLSliceNode")
            if node.GetLayoutName() == name:
                return node
        return None

    def close(self) -> None:
        """Disconnect the view from the scene and the application logic."""
        if self.slice_logic is None:
            return
        self.interactor_style.SetInteractor(None)
        self.displayable_managers.RemoveObserver(self._groupObserver)
        self.displayable_managers.SetMRMLDisplayableNode(None)
        self.harness.appLogic.GetSliceLogics().RemoveItem(self.slice_logic)
        self.slice_logic.SetMRMLScene(None)
        self.slice_logic = None
        self.render_window.Finalize()
        self._factory.SetMRMLApplicationLogic(self._previousFactoryAppLogic)

    def render(self, force=False) -> None:
        """Render the window if a displayable manager asked for it (or ``force``), unless ``render=False``."""
        if self.render_enabled and (force or self._renderRequested):
            self._renderRequested = False
            self.render_window.Render()

    # ---------------------------------------------------------------- geometry
    def show(self, volume_node, ras=None, align_to_volume=True) -> None:
        """Show ``volume_node`` in the view and put the slice plane through it.

        The volume becomes the background layer; with ``align_to_volume`` the slice is
        rotated to the volume's closest IJK plane (Slicer's "Rotate to volume plane"; an
        oblique volume gives an oblique plane), otherwise the slice node keeps its orientation
        (Axial for "Red"). The field of view is fitted to the volume (``FitSliceToAll``); if
        ``ras`` (mm) is given the plane is then centred on it (``JumpSliceByCentering``), so
        ``ras`` lies in the plane exactly at the view's centre pixel (width/2, height/2).
        """
        composite = self.slice_logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(volume_node.GetID())
        if align_to_volume:
            self.slice_logic.RotateSliceToLowestVolumeAxes()
        self.slice_logic.FitSliceToAll()
        if ras is not None:
            self.slice_node.JumpSliceByCentering(*[float(v) for v in ras])
        self.render(force=True)

    def xy_to_ras(self) -> np.ndarray:
        """The slice node's 4x4 ``XYToRAS``: display (x, y, slice index, 1) -> RAS (mm)."""
        m = self.slice_node.GetXYToRAS()
        return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])

    def ras_of(self, display_xy) -> np.ndarray:
        """RAS (mm, shape (3,)) of display position ``(x, y)`` (pixels) in the slice plane."""
        x, y = display_xy
        return (self.xy_to_ras() @ [float(x), float(y), 0.0, 1.0])[:3]

    def display_of(self, ras) -> np.ndarray:
        """Display position ``(x, y)`` (float pixels) of ``ras`` (mm) projected onto the slice plane."""
        xyz = np.linalg.solve(self.xy_to_ras(), [*map(float, ras), 1.0])
        return xyz[:2]

    def pixel_of(self, ras) -> tuple:
        """The integer display pixel a click at ``ras`` uses: ``display_of(ras)`` rounded."""
        x, y = np.floor(self.display_of(ras) + 0.5).astype(int)
        return int(x), int(y)

    def project(self, ras) -> np.ndarray:
        """Orthogonal projection of ``ras`` (mm) onto the slice plane."""
        return self.ras_of(self.display_of(ras))

    def normal(self) -> np.ndarray:
        """Unit normal of the slice plane in RAS."""
        n = self.xy_to_ras()[:3, 2]
        return n / np.linalg.norm(n)

    def pixel_size(self) -> float:
        """Size of one display pixel in the plane, mm (the slice node's FOV / dimensions)."""
        return float(np.linalg.norm(self.xy_to_ras()[:3, 0]))

    # ---------------------------------------------------------------- raw mouse events
    def mouse_event(self, event, display_xy, shift=False, control=False, alt=False) -> None:
        """Hand one VTK mouse event (e.g. ``"LeftButtonPressEvent"``) at integer pixel ``display_xy`` to the view.

        As ``QVTKInteractorAdapter`` does: position and modifiers on the interactor, then the
        event invoked on it; then the window is rendered if a render was requested.
        """
        import vtk

        x, y = (int(v) for v in display_xy)
        self.interactor.SetEventInformation(x, y, int(control), int(shift), "\0", 0, None)
        self.interactor.SetAltKey(int(alt))
        eventId = getattr(vtk.vtkCommand, event) if isinstance(event, str) else event
        self.interactor.InvokeEvent(eventId)
        self.render()

    def move(self, display_xy, **modifiers) -> None:
        self.mouse_event("MouseMoveEvent", display_xy, **modifiers)

    def left_press(self, display_xy, **modifiers) -> None:
        self.mouse_event("LeftButtonPressEvent", display_xy, **modifiers)

    def left_release(self, display_xy, **modifiers) -> None:
        self.mouse_event("LeftButtonReleaseEvent", display_xy, **modifiers)

    def _path(self, start, end, steps):
        """``steps`` integer pixels from ``start`` (excluded) to ``end`` (included), evenly spaced."""
        start, end = np.asarray(start, float), np.asarray(end, float)
        return [tuple(int(v) for v in np.floor(start + (end - start) * i / steps + 0.5)) for i in range(1, steps + 1)]

    # ---------------------------------------------------------------- user actions
    def start_place_mode(self, markups_node, persistent=False) -> None:
        """Enter place mode for ``markups_node`` as the Markups toolbar/place widget does.

        ``vtkSlicerMarkupsLogic.SetActiveList`` (selection node: active place node class and
        ID), then the interaction node's place mode persistence and ``Place`` mode. A node
        without display node gets its default display nodes (a node made in Slicer's GUI has them).
        """
        if markups_node.GetDisplayNode() is None:
            markups_node.CreateDefaultDisplayNodes()
        self.markups_logic.SetActiveList(markups_node)
        self.interaction_node.SetPlaceModePersistence(1 if persistent else 0)
        self.interaction_node.SetCurrentInteractionMode(self.interaction_node.Place)

    def click(self, display_xy) -> None:
        """Mouse moved onto ``display_xy``, left button pressed and released there (no motion in between)."""
        self.move(display_xy)
        self.left_press(display_xy)
        self.left_release(display_xy)

    def place_point(self, markups_node, ras, persistent=False) -> np.ndarray:
        """Place one control point of ``markups_node`` by a click at ``ras`` (mm); returns the clicked RAS.

        Place mode as the toolbar sets it (single placement unless ``persistent``), then a
        mouse move to the pixel of ``ras`` (this adds the preview point), a left press and a
        left release there. The returned RAS is the clicked pixel's (``ras_of(pixel_of(ras))``).
        """
        self.start_place_mode(markups_node, persistent)
        pixel = self.pixel_of(ras)
        self.click(pixel)
        return self.ras_of(pixel)

    def place_roi(self, roi_node, ras_corner1, ras_corner2, steps=5) -> tuple:
        """Place ``roi_node`` (a ``vtkMRMLMarkupsROINode``) with Slicer's two clicks; returns the two clicked RAS.

        Place mode for the ROI (single placement), a click at the first corner, ``steps``
        mouse moves towards the second corner (the preview control point follows the mouse),
        and a click at the second corner.
        """
        self.start_place_mode(roi_node, persistent=False)
        first, second = self.pixel_of(ras_corner1), self.pixel_of(ras_corner2)
        self.click(first)
        for pixel in self._path(first, second, steps):
            self.move(pixel)
        self.left_press(second)
        self.left_release(second)
        return self.ras_of(first), self.ras_of(second)

    def press_release(self, ras) -> np.ndarray:
        """In view (not place) mode: move onto ``ras``, press and release the left button without motion.

        The mouse move makes the control point under the cursor active (the widget's "on
        widget" state), as hovering does in Slicer. Returns the clicked RAS.
        """
        self.interaction_node.SetCurrentInteractionMode(self.interaction_node.ViewTransform)
        pixel = self.pixel_of(ras)
        self.click(pixel)
        return self.ras_of(pixel)

    def drag(self, ras_from, ras_to, steps=5) -> np.ndarray:
        """In view mode: grab what is under ``ras_from`` and drag it to ``ras_to`` in ``steps`` mouse moves.

        Move onto the pixel of ``ras_from``, left press, ``steps`` moves ending on the pixel of
        ``ras_to``, left release there. Returns the RAS of the release pixel. A grabbed control
        point keeps its offset to the mouse (zero when it sits on the pressed pixel), so it
        ends at the release pixel's RAS plus that offset.
        """
        self.interaction_node.SetCurrentInteractionMode(self.interaction_node.ViewTransform)
        start, end = self.pixel_of(ras_from), self.pixel_of(ras_to)
        self.move(start)
        self.left_press(start)
        for pixel in self._path(start, end, steps):
            self.move(pixel)
        self.left_release(end)
        return self.ras_of(end)


# ------------------------------------------------------------------------------ fixture
@pytest.fixture
def slice_view(slicer_scene):
    """A 400x400 offscreen "Red" :class:`SliceView` on ``slicer_scene``. Where VTK cannot render
    offscreen it is built with ``render=False``: the interaction events are the same without
    rendering (``test_rendering_does_not_change_the_events``), so the tests still run."""
    available, detail = offscreen_rendering()
    if not available:
        import warnings
        warnings.warn(f"slice view without rendering: {detail}")
    view = SliceView(slicer_scene, render=available)
    try:
        yield view
    finally:
        view.close()
