"""Clicks, boxes and drags as Slicer delivers them, through the module's interaction code.

Each test replays what a user does in a slice view through slicer-core's real interaction pipeline
(``slice_view_harness``: the interactor style, the markups displayable manager and widgets fire the
events Slicer fires) on an oblique, anisotropic volume, and the module's
``InteractiveSegmentation`` (``LesionLocatorSlicer/interaction.py``) decides what runs. The
network is a recording runner that paints a ball at the prompt voxel, slowly where timing matters,
so the tests assert exact runs, voxels and lesion IDs; one test runs the real worker process.
"""
import os
import signal
import time

import numpy as np
import pytest

import slicer
import slicer.util

pytest.register_assert_rewrite("slice_view_harness", "slicer_harness")
from slice_view_harness import record_events  # noqa: E402
from slicer_harness import import_module_file, oblique_ijk_to_ras  # noqa: E402

pytest_plugins = ["slicer_harness", "slice_view_harness"]  # fixtures: slicer_scene, slice_view

import_module_file()  # LesionLocator/ on sys.path, as Slicer does
from LesionLocatorLib.prompts import Box, Point, to_voxel_prompt  # noqa: E402
from LesionLocatorLib.runner import SegmentationResponse  # noqa: E402
from LesionLocatorSlicer.interaction import InteractiveSegmentation  # noqa: E402
from LesionLocatorSlicer.logic import LesionLocatorLogic  # noqa: E402

SHAPE = (20, 40, 36)  # (k, j, i)
SPACING = (0.9, 1.2, 2.5)  # i, j, k in mm
PLANE_K = 10  # the view shows this K slice of the volume


IJK_TO_RAS = oblique_ijk_to_ras(SPACING)


def ras(kji):
    """RAS (mm) of the centre of voxel (k, j, i) (the volume has no parent transform here)."""
    return (IJK_TO_RAS @ [kji[2], kji[1], kji[0], 1.0])[:3]


class SlowPaintingRunner:
    """Records each request and answers after ``delay`` seconds (cancellable) with a ball of radius 2
    voxels at each point's voxel, or the box's voxels, computed with the library's own mapping."""

    def __init__(self, delay=0.0):
        self.delay = delay
        self.requests = []
        self.loads = 0

    def run(self, request, progress=None, cancel=None):
        self.requests.append(request)
        end = time.monotonic() + self.delay
        while time.monotonic() < end:
            if cancel is not None:
                cancel.check()
            time.sleep(0.01)
        image, masks = request.image, {}
        zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in image.shape)]
        for p in request.prompts:
            vp = to_voxel_prompt(p, image)
            if vp.kind == "point":
                c = np.round(vp.coords).astype(int)
                masks[p.id] = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= 4
            else:
                b = np.clip(np.asarray(vp.coords).reshape(3, 2), 0, np.asarray(image.shape)[:, None])
                masks[p.id] = np.zeros(image.shape, bool)
                masks[p.id][b[0, 0]:b[0, 1], b[1, 0]:b[1, 1], b[2, 0]:b[2, 1]] = True
        return SegmentationResponse(request.id, masks, seconds=self.delay)

    def close(self):
        pass

    def runs(self):
        """Per request: {lesion ID: rounded prompt voxel (k, j, i), or ("box", half-open voxel box)}."""
        out = []
        for request in self.requests:
            run = {}
            for p in request.prompts:
                if isinstance(p, Point):
                    run[p.id] = tuple(int(v) for v in np.round(request.image.world_to_index(p.xyz)))
                elif isinstance(p, Box):  # the voxel box the library makes of it: [z0, z1, y0, y1, x0, x1)
                    run[p.id] = ("box", tuple(int(v) for v in to_voxel_prompt(p, request.image).coords))
            out.append(run)
        return out


@pytest.fixture
def volume(slicer_scene):
    array = np.full(SHAPE, 40, np.int16)
    return slicer_scene.add_volume(array, IJK_TO_RAS, name="oblique CT")


@pytest.fixture
def session(slicer_scene, slice_view, volume):
    """The module's interaction on the view, with a recording runner (``session.runner``)."""
    slice_view.show(volume, ras=ras((PLANE_K, 20, 18)))
    runner = SlowPaintingRunner()
    logic = LesionLocatorLogic(runner=runner)
    outcome = {"done": [], "failed": [], "progress": []}
    s = InteractiveSegmentation(logic, volume=lambda: volume, options=lambda: {"modelPath": "unused", "device": "cpu"},
                                done=outcome["done"].append, failed=outcome["failed"].append,
                                progress=lambda f, m: outcome["progress"].append(m))
    s.runner, s.outcome, s.view, s.volume_node = runner, outcome, slice_view, volume
    yield s
    s.close()


def _points(h, name="lesion points"):
    node = h.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.CreateDefaultDisplayNodes()
    return node


def _mask(volume, lesion_id):
    """The lesion's segment on the volume's voxels (read without adding nodes to the scene)."""
    from LesionLocatorSlicer.scene import segmentMask

    node = slicer.util.getNodesByClass("vtkMRMLSegmentationNode")[0]
    return segmentMask(node, f"lesion_{lesion_id}", volume)


def test_a_click_on_a_voxel_runs_once_on_that_voxel(slicer_scene, session):
    points = _points(slicer_scene)
    session.watcher.watch(points)
    voxel = (PLANE_K, 24, 15)
    with record_events(points) as events:
        session.view.place_point(points, ras(voxel))
    session.jobs.wait()
    assert events.names().count("PointPositionDefinedEvent") == 1
    assert session.runner.runs() == [{1: voxel}]
    assert session.outcome["failed"] == [] and len(session.outcome["done"]) == 1
    assert _mask(session.volume_node, 1)[voxel]


def test_a_box_drawn_with_two_clicks_runs_once_after_the_second(slicer_scene, session):
    roi = slicer_scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "lesion box")
    roi.CreateDefaultDisplayNodes()
    session.watcher.watch(roi)
    view, first, second = session.view, ras((PLANE_K, 14, 10)), ras((PLANE_K, 26, 22))
    view.start_place_mode(roi)
    view.click(view.pixel_of(first))
    assert session.poll() is False and session.runner.requests == []  # one corner: nothing runs
    for xy in view._path(view.pixel_of(first), view.pixel_of(second), 5):
        view.move(xy)
    view.click(view.pixel_of(second))
    session.jobs.wait()
    runs = session.runner.runs()
    assert len(runs) == 1 and list(runs[0]) == [1]
    z0, z1, y0, y1, x0, x1 = runs[0][1][1]
    # the voxel box holds both clicked corners (the ROI is axis-aligned in RAS, so the oblique volume's
    # voxel box around it is somewhat larger, never smaller) and the clicked plane
    assert y0 <= 14 and y1 > 26 and x0 <= 10 and x1 > 22 and z0 <= PLANE_K < z1
    assert (y1 - y0) <= 20 and (x1 - x0) <= 20


def test_press_and_release_on_a_point_does_not_run_again(slicer_scene, session):
    points = _points(slicer_scene)
    session.watcher.watch(points)
    session.view.place_point(points, ras((PLANE_K, 24, 15)))
    session.jobs.wait()
    with record_events(points) as events:
        session.view.press_release(ras((PLANE_K, 24, 15)))
    session.jobs.wait()
    assert "PointEndInteractionEvent" in events.names()  # Slicer does fire it
    assert len(session.runner.requests) == 1


def test_dragging_a_point_runs_once_for_that_lesion_only(slicer_scene, session):
    points = _points(slicer_scene)
    session.watcher.watch(points)
    session.view.place_point(points, ras((PLANE_K, 24, 15)))
    session.view.place_point(points, ras((PLANE_K, 12, 25)))
    session.jobs.wait()
    before = _mask(session.volume_node, 1)
    session.view.drag(ras((PLANE_K, 12, 25)), ras((PLANE_K, 16, 28)))
    session.jobs.wait()
    assert session.runner.runs() == [{1: (PLANE_K, 24, 15)}, {2: (PLANE_K, 12, 25)}, {2: (PLANE_K, 16, 28)}]
    assert np.array_equal(_mask(session.volume_node, 1), before)
    assert _mask(session.volume_node, 2)[PLANE_K, 16, 28] and not _mask(session.volume_node, 2)[PLANE_K, 12, 25]


def test_three_quick_clicks_during_a_slow_run_give_three_lesions_in_order(slicer_scene, session):
    points = _points(slicer_scene)
    session.watcher.watch(points)
    session.runner.delay = 0.5
    voxels = [(PLANE_K, 24, 15), (PLANE_K, 12, 25), (PLANE_K, 30, 8)]
    session.view.place_point(points, ras(voxels[0]))
    session.poll()  # the first run starts
    assert session.jobs.running is not None
    for voxel in voxels[1:]:
        session.view.place_point(points, ras(voxel))  # while the first one runs
    assert len(session.jobs.waiting()) == 2
    session.jobs.wait()
    assert session.runner.runs() == [{1: voxels[0]}, {2: voxels[1]}, {3: voxels[2]}]
    assert all(_mask(session.volume_node, i + 1)[v] for i, v in enumerate(voxels))


def test_undo_restores_the_previous_scene_state(slicer_scene, session):
    points = _points(slicer_scene)
    session.watcher.watch(points)
    before_click = set(slicer_scene.node_ids())
    session.view.place_point(points, ras((PLANE_K, 24, 15)))
    session.jobs.wait()
    first = _mask(session.volume_node, 1).copy()
    node = slicer.util.getNodesByClass("vtkMRMLSegmentationNode")[0]
    node.GetSegmentation().GetSegment("lesion_1").SetName("Liver lesion")  # the user's name survives
    session.view.drag(ras((PLANE_K, 24, 15)), ras((PLANE_K, 20, 20)))
    session.jobs.wait()
    assert not np.array_equal(_mask(session.volume_node, 1), first)
    assert session.logic.undo().startswith("restored 1 lesion(s)")
    assert np.array_equal(_mask(session.volume_node, 1), first)
    assert node.GetSegmentation().GetSegment("lesion_1").GetName() == "Liver lesion"
    assert session.logic.undo().startswith("removed")  # the first click made the node: it goes
    assert set(slicer_scene.node_ids()) == before_click
    with pytest.raises(ValueError, match="nothing to undo"):
        session.logic.undo()


def test_cancel_drops_waiting_prompts_and_changes_nothing(slicer_scene, session):
    points = _points(slicer_scene)
    session.watcher.watch(points)
    session.runner.delay = 2.0
    before = set(slicer_scene.node_ids())
    session.view.place_point(points, ras((PLANE_K, 24, 15)))
    session.poll()
    session.view.place_point(points, ras((PLANE_K, 12, 25)))
    session.cancel()
    session.jobs.wait(timeout=10)
    assert set(slicer_scene.node_ids()) == before and session.outcome["done"] == []


def test_a_worker_killed_mid_run_leaves_the_scene_unchanged_and_the_next_click_works(
        slicer_scene, slice_view, volume, tiny_model_root):
    from LesionLocatorLib.protocol import WorkerError

    slice_view.show(volume, ras=ras((PLANE_K, 20, 18)))
    logic = LesionLocatorLogic()
    logic.useWorkerProcess()
    failed, done, progress = [], [], []
    session = InteractiveSegmentation(logic, volume=lambda: volume,
                                      options=lambda: {"modelPath": str(tiny_model_root), "device": "cpu"},
                                      done=done.append, failed=failed.append, progress=lambda f, m: progress.append(m))
    try:
        points = _points(slicer_scene)
        session.watcher.watch(points)
        before = set(slicer_scene.node_ids())
        slice_view.place_point(points, ras((PLANE_K, 24, 15)))
        end = time.monotonic() + 120
        while not any(m.startswith("loading the point model") for m in progress):  # the worker has the request
            assert session.poll() and time.monotonic() < end
            time.sleep(0.01)
        os.kill(logic.runner.pid, signal.SIGKILL)
        session.jobs.wait(timeout=60)
        assert len(failed) == 1 and isinstance(failed[0], WorkerError) and done == []
        assert "worker process exited" in str(failed[0])
        assert set(slicer_scene.node_ids()) == before  # nothing written
        slice_view.place_point(points, ras((PLANE_K, 12, 25)))  # a new worker serves the next click
        session.jobs.wait(timeout=120)
        assert len(done) == 1 and len(failed) == 1
        node = done[0]
        assert list(node.GetSegmentation().GetSegmentIDs()) == ["lesion_1"]
        assert logic.runner.pid is not None
    finally:
        session.close()
        logic.cleanup()
