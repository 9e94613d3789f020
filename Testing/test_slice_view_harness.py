"""Slicer's real mouse-interaction pipeline on an offscreen slice view (Testing/slice_view_harness.py).

Each test replays what a user does in a slice view -- a click in place mode, an ROI drawn
with two clicks, a press-release on a control point, a drag -- through slicer-core's
vtkMRMLSliceViewInteractorStyle, displayable managers and markups widgets, and asserts the
control-point events and positions that result. The event sequences written in the
docstrings were observed here (slicer-core 5.13, the same C++ as Slicer 5.x); code that
observes markups nodes is written against them.

The volume is oblique and anisotropic (spacing 0.9/1.2/2.5 mm, rotated 25 degrees about
(1, 0.5, 0.3)); the view is 400x400 pixels, rotated to the volume's K plane and fitted to it
(field of view 48 mm, so a pixel is 0.12 mm; volume offsets of 2 voxels along I and 1 along
J are whole pixels).
"""
import numpy as np
import pytest

import slicer
import slicer.util

pytest.register_assert_rewrite("slice_view_harness", "slicer_harness")  # imported before pytest loads them
from slice_view_harness import POINT_EVENTS, SliceView, offscreen_rendering, record_events  # noqa: E402
from slicer_harness import oblique_ijk_to_ras  # noqa: E402

pytest_plugins = ["slicer_harness", "slice_view_harness"]  # fixtures: slicer_scene, slice_view

SHAPE = (20, 40, 36)  # (k, j, i)
SPACING = (0.9, 1.2, 2.5)  # i, j, k in mm
CENTRE = (18, 20, 10)  # (i, j, k): the view is centred here
HALF_PIXEL_DIAGONAL = 0.12 * np.sqrt(2) / 2  # mm: farthest a click can land from its target


IJK_TO_RAS = oblique_ijk_to_ras(SPACING)


def ras(ijk):
    """RAS (mm) of a continuous IJK position of the test volume."""
    return (IJK_TO_RAS @ [*ijk, 1.0])[:3]


@pytest.fixture
def volume(slicer_scene):
    array = np.random.default_rng(0).normal(0, 100, SHAPE).astype(np.int16)
    return slicer_scene.add_volume(array, IJK_TO_RAS, name="oblique")


def position(node, index=0):
    return np.array(node.GetNthControlPointPositionWorld(index))


def test_view_is_built_like_slicers(slicer_scene, slice_view, volume):
    """The slice node has the view's size; the plane is the volume's K plane through CENTRE; frames round-trip."""
    view = slice_view
    view.show(volume, ras=ras(CENTRE))
    assert view.slice_node.GetDimensions() == (400, 400, 1)
    assert view.displayable_managers.GetDisplayableManagerByClassName("vtkMRMLMarkupsDisplayableManager") is not None
    assert view.interaction_node.GetID() == "vtkMRMLInteractionNodeSingleton"
    k_axis = IJK_TO_RAS[:3, 2] / np.linalg.norm(IJK_TO_RAS[:3, 2])
    assert abs(abs(view.normal() @ k_axis) - 1) < 1e-9  # oblique plane = the volume's K plane
    assert view.pixel_size() == pytest.approx(0.12, abs=1e-12)  # 48 mm (40 x 1.2 mm) over 400 pixels
    np.testing.assert_allclose(view.display_of(ras(CENTRE)), (200, 200), atol=1e-9)
    for ijk in [(20, 21, 10), (14, 16, 10), (24, 27, 10)]:  # in the plane, whole pixels
        x, y = view.display_of(ras(ijk))
        assert abs(x - round(x)) < 1e-9 and abs(y - round(y)) < 1e-9
        np.testing.assert_allclose(view.ras_of(view.pixel_of(ras(ijk))), ras(ijk), atol=1e-9)
    off_plane = ras((20, 21, 10.3))  # 0.3 voxel = 0.75 mm off the plane
    np.testing.assert_allclose(view.project(off_plane), ras((20, 21, 10)), atol=1e-9)


def test_click_in_place_mode_places_one_point(slicer_scene, slice_view, volume):
    """A click in place mode: one control point at the clicked RAS, one PointPositionDefinedEvent.

    Observed (single placement, as the Markups toolbar sets it):

    * mouse move onto the view:   PointAddedEvent(0), PointModifiedEvent(0)  -- a *preview*
      point follows the mouse (position status Preview, not defined); hovering adds it
    * left press:                 nothing
    * left release:               PointModifiedEvent(0), PointPositionDefinedEvent(0)
      -- the preview point becomes defined; the interaction node goes back to ViewTransform
      while the release is processed.

    The call data is the control point index. A second click in a list of one point gives
    the same sequence with index 1. A click lands on a whole display pixel: the point is at
    ``ras_of(pixel)``, in the slice plane, within half a pixel diagonal of the target's
    projection onto the plane.
    """
    view = slice_view
    target = ras(CENTRE)
    view.show(volume, ras=target)
    points = slicer_scene.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    points.CreateDefaultDisplayNodes()
    interaction = view.interaction_node

    with record_events(points) as events:
        view.start_place_mode(points)
        assert view.selection_node.GetActivePlaceNodeID() == points.GetID()
        assert view.selection_node.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsFiducialNode"
        assert interaction.GetCurrentInteractionMode() == interaction.Place
        assert interaction.GetPlaceModePersistence() == 0
        pixel = view.pixel_of(target)
        assert pixel == (200, 200)
        view.move(pixel)
        assert events == [("PointAddedEvent", 0, None), ("PointModifiedEvent", 0, None)]
        assert points.GetNumberOfControlPoints() == 1 and points.GetNumberOfDefinedControlPoints() == 0
        assert points.GetNthControlPointPositionStatus(0) == points.PositionPreview
        view.left_press(pixel)
        assert len(events) == 2
        view.left_release(pixel)
    assert events == [("PointAddedEvent", 0, None), ("PointModifiedEvent", 0, None),
                      ("PointModifiedEvent", 0, None), ("PointPositionDefinedEvent", 0, None)]
    assert events.names().count("PointPositionDefinedEvent") == 1
    assert points.GetNumberOfControlPoints() == 1 and points.GetNumberOfDefinedControlPoints() == 1
    assert np.linalg.norm(position(points) - target) < 1e-3  # the centre pixel is exactly the target
    assert interaction.GetCurrentInteractionMode() == interaction.ViewTransform

    # a target off the plane (0.75 mm) and between pixels
    off = ras((15.3, 24.6, 10.3))
    with record_events(points) as events:
        clicked = view.place_point(points, off)
    assert events == [("PointAddedEvent", 1, None), ("PointModifiedEvent", 1, None),
                      ("PointModifiedEvent", 1, None), ("PointPositionDefinedEvent", 1, None)]
    assert points.GetNumberOfControlPoints() == 2
    placed = position(points, 1)
    assert np.linalg.norm(placed - clicked) < 1e-9
    assert abs((placed - target) @ view.normal()) < 1e-9  # in the slice plane
    projected = view.project(off)
    assert np.linalg.norm(projected - ras((15.3, 24.6, 10))) < 1e-9
    assert 1e-3 < np.linalg.norm(placed - projected) <= HALF_PIXEL_DIAGONAL
    np.testing.assert_allclose(position(points, 0), target, atol=1e-9)  # the first point did not move


def _roi_state(roi):
    return (roi.GetNumberOfControlPoints(), roi.GetNumberOfDefinedControlPoints(),
            np.array(roi.GetSize()), np.array(roi.GetCenter()))


@pytest.mark.parametrize("align_to_volume", [True, False], ids=["oblique_plane", "axial_plane"])
def test_roi_drawn_with_two_clicks(slicer_scene, slice_view, volume, align_to_volume):
    """An ROI is placed with two clicks; PointPositionDefinedEvent fires once per click.

    Observed (``place_roi``: click at corner 1, 5 mouse moves to corner 2, click there;
    each event with the node's state when it fired: control points, defined points, size):

    * move onto corner 1:  PointAddedEvent(0), PointModifiedEvent(0)        -- preview point
    * release at corner 1: PointModifiedEvent(0), PointPositionDefinedEvent(0) with
      1 point, 1 defined, size (0, 0, 0), centre = corner 1
    * 5 moves:             PointAddedEvent(1), then PointModifiedEvent(1) per move (5 in all)
      -- the preview second corner already sizes the ROI (2 points, 1 defined, size > 0)
    * release at corner 2: PointRemovedEvent, PointPositionUndefinedEvent, PointModifiedEvent,
      PointAboutToBeRemovedEvent (these four without call data, in this order),
      PointModifiedEvent(1), PointPositionDefinedEvent(1)
      -- the ROI node has already replaced its two corners by ONE control point at its centre
      (and now requires/allows 1 point): at the second PointPositionDefinedEvent the node has
      1 control point, 1 defined, and the call data (1) is no longer a valid index.

    The ROI is a box aligned with the RAS axes (the rotation part of its ObjectToNode matrix
    stays identity, even on an oblique slice; its translation is the centre):
    size = |corner2 - corner1| per R, A, S axis, where a zero component (both corners on an
    axis-aligned plane, e.g. an axial view) is padded with the smallest non-zero one;
    centre = (corner1 + corner2) / 2. The corners are the clicked pixels' RAS.
    The interaction node is back in ViewTransform afterwards.
    """
    view = slice_view
    corner1, corner2 = ras(CENTRE), ras((24, 27, 10))
    if not align_to_volume:  # an axial plane through CENTRE: corner 2 moved into it
        corner2 = corner1 + np.array([4.2, 8.4, 0.0])
    view.show(volume, ras=corner1, align_to_volume=align_to_volume)
    roi = slicer_scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    roi.CreateDefaultDisplayNodes()
    assert roi.GetROIType() == roi.ROITypeBox

    with record_events(roi, POINT_EVENTS + ("PointRemovedEvent", "PointAboutToBeRemovedEvent"),
                       snapshot=_roi_state) as events:
        clicked1, clicked2 = view.place_roi(roi, corner1, corner2)
    assert [(e.name, e.index) for e in events] == [
        ("PointAddedEvent", 0), ("PointModifiedEvent", 0),
        ("PointModifiedEvent", 0), ("PointPositionDefinedEvent", 0),
        ("PointAddedEvent", 1)] + [("PointModifiedEvent", 1)] * 5 + [
        ("PointRemovedEvent", None), ("PointPositionUndefinedEvent", None), ("PointModifiedEvent", None),
        ("PointAboutToBeRemovedEvent", None),
        ("PointModifiedEvent", 1), ("PointPositionDefinedEvent", 1)]

    np.testing.assert_allclose(clicked1, corner1, atol=1e-9)
    assert np.linalg.norm(clicked2 - view.project(corner2)) <= HALF_PIXEL_DIAGONAL
    expected = np.abs(clicked2 - clicked1)
    if not align_to_volume:
        assert expected[2] < 1e-9
        expected[2] = min(expected[0], expected[1])
    else:
        assert np.all(expected > 2.0)  # oblique plane: the box spans all three RAS axes

    defined = [e for e in events if e.name == "PointPositionDefinedEvent"]
    assert len(defined) == 2
    count, defined_count, size, centre = defined[0].state
    assert (count, defined_count) == (1, 1)
    np.testing.assert_array_equal(size, (0.0, 0.0, 0.0))
    np.testing.assert_allclose(centre, clicked1, atol=1e-9)
    count, defined_count, size, centre = defined[1].state
    assert (count, defined_count) == (1, 1)
    assert np.all(size > 0)
    np.testing.assert_allclose(size, expected, atol=1e-9)
    np.testing.assert_allclose(centre, (clicked1 + clicked2) / 2, atol=1e-9)

    assert roi.GetNumberOfControlPoints() == 1
    np.testing.assert_allclose(position(roi), (clicked1 + clicked2) / 2, atol=1e-9)
    np.testing.assert_allclose(roi.GetSize(), expected, atol=1e-9)
    object_to_node = slicer.util.arrayFromVTKMatrix(roi.GetObjectToNodeMatrix())
    np.testing.assert_array_equal(object_to_node[:3, :3], np.eye(3))  # not rotated to the slice
    np.testing.assert_allclose(object_to_node[:3, 3], (clicked1 + clicked2) / 2, atol=1e-9)
    assert view.interaction_node.GetCurrentInteractionMode() == view.interaction_node.ViewTransform


def _point_at(slicer_scene, view, target):
    points = slicer_scene.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    points.CreateDefaultDisplayNodes()
    view.place_point(points, target)
    return points


def test_press_release_on_point(slicer_scene, slice_view, volume):
    """Press-release on a control point in view mode: Start/End interaction, no motion, no PointPositionDefinedEvent.

    Observed: mouse move onto the point -> nothing (the point becomes the display node's
    active component); left press -> PointStartInteractionEvent; left release without
    motion -> PointEndInteractionEvent. Both carry no call data (index None). The release
    is then taken as a click: Slicer's "jump to point" (markups logic) offsets the slice to
    the point, which is already in the plane, so the view does not change.
    """
    view = slice_view
    target = ras(CENTRE)
    view.show(volume, ras=target)
    points = _point_at(slicer_scene, view, target)
    before = position(points)
    xy_to_ras = view.xy_to_ras()

    with record_events(points) as events:
        pixel = view.pixel_of(target)
        view.move(pixel)
        assert events == []
        assert points.GetDisplayNode().GetActiveComponentType() == points.GetDisplayNode().ComponentControlPoint
        view.left_press(pixel)
        assert events == [("PointStartInteractionEvent", None, None)]
        view.left_release(pixel)
    assert events == [("PointStartInteractionEvent", None, None), ("PointEndInteractionEvent", None, None)]
    np.testing.assert_array_equal(position(points), before)
    assert points.GetNumberOfControlPoints() == 1
    np.testing.assert_allclose(view.xy_to_ras(), xy_to_ras, atol=1e-9)

    with record_events(points) as events:  # the one-call form does the same
        view.press_release(target)
    assert events.names() == ["PointStartInteractionEvent", "PointEndInteractionEvent"]
    np.testing.assert_array_equal(position(points), before)


def test_drag_moves_point(slicer_scene, slice_view, volume):
    """Dragging a control point in view mode moves it to the release position (projected onto the plane).

    Observed (``drag(from, to, steps=5)``: move onto the point, press, 5 moves, release):
    PointStartInteractionEvent (on press, no call data), PointModifiedEvent(0) once per mouse
    move (5), PointEndInteractionEvent (on release, no call data); no
    PointPositionDefinedEvent. The point is already at its final position when
    PointEndInteractionEvent fires.
    """
    view = slice_view
    start = ras(CENTRE)
    view.show(volume, ras=start)
    points = _point_at(slicer_scene, view, start)
    destination = ras((14, 16, 10.3))  # 0.75 mm off the plane; its projection is a whole pixel

    with record_events(points, snapshot=position) as events:
        released = view.drag(start, destination, steps=5)
    assert [(e.name, e.index) for e in events] == (
        [("PointStartInteractionEvent", None)] + [("PointModifiedEvent", 0)] * 5 + [("PointEndInteractionEvent", None)])
    final = position(points)
    projected = view.project(destination)
    np.testing.assert_allclose(projected, ras((14, 16, 10)), atol=1e-9)
    assert np.linalg.norm(final - projected) < 1e-3
    np.testing.assert_allclose(final, released, atol=1e-9)
    np.testing.assert_allclose(events[-1].state, final, atol=1e-12)
    assert points.GetNumberOfControlPoints() == 1 and points.GetNumberOfDefinedControlPoints() == 1


def _scenario(harness, volume, render):
    """Place a point, press-release it, drag it; the events, as (name, index) lists per action."""
    view = SliceView(harness, render=render)
    try:
        view.show(volume, ras=ras(CENTRE))
        points = harness.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
        roi = harness.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
        actions = [lambda: view.place_point(points, ras(CENTRE)),
                   lambda: view.press_release(ras(CENTRE)),
                   lambda: view.drag(ras(CENTRE), ras((20, 23, 10)))]
        result = []
        for action in actions:
            with record_events(points) as events:
                action()
            result.append([(e.name, e.index) for e in events])
        with record_events(roi) as events:
            view.place_roi(roi, ras(CENTRE), ras((24, 27, 10)))
        result.append([(e.name, e.index) for e in events])
        return result, position(points), np.array(roi.GetSize())
    finally:
        view.close()


def test_rendering_does_not_change_the_events(slicer_scene, volume):
    """``SliceView(render=False)`` (no OpenGL) fires the same markups events as a rendering view."""
    available, detail = offscreen_rendering()
    if not available:
        pytest.skip(detail)
    rendered = _scenario(slicer_scene, volume, render=True)
    not_rendered = _scenario(slicer_scene, volume, render=False)
    assert rendered[0] == not_rendered[0]
    np.testing.assert_array_equal(rendered[1], not_rendered[1])
    np.testing.assert_array_equal(rendered[2], not_rendered[2])
