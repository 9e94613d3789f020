"""Reviewing and correcting a tracked study in the Slicer module, on a real MRML scene (slicer-core).

The study is ``three_timepoints`` (conftest.py): three oblique, anisotropic CT phantoms, the
baseline and the first follow-up under rotating parent transforms (``slicer_cases.phantom_case``).
Corrections run the tiny random-weight model; the expected masks come from the library itself
(a runner call with the first run as ``previous``, on the phantom images, prompts converted to LPS
here independently of the module), and every other voxel must stay bit for bit.
"""
import numpy as np
import pytest

import slicer
import slicer.util
import vtk

from LesionLocatorLib.cancel import CancelToken, Cancelled
from LesionLocatorLib.correct import Correction
from LesionLocatorLib.prompts import Box, Point, PromptError
from LesionLocatorLib.runner import InProcessRunner, TrackRequest

pytest_plugins = ["slicer_harness"]  # fixtures: slicer_scene, lesionlocator_module
pytest.register_assert_rewrite("slicer_harness")
from slicer_harness import import_module_file  # noqa: E402
from slicer_cases import PHANTOM_LESION_CENTRES, phantom_case, points, rigid  # noqa: E402

import_module_file()
from LesionLocatorSlicer import jobs, results, review  # noqa: E402

RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


# ------------------------------------------------------------------------------ helpers
def _world_ras(volume, kji):
    """World RAS of a (possibly fractional) voxel index (k, j, i), through MRML's own transform code."""
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    local = ijk_to_ras.MultiplyPoint([float(kji[2]), float(kji[1]), float(kji[0]), 1.0])[:3]
    world = [0.0, 0.0, 0.0]
    volume.TransformPointToWorld(local, world)
    return np.array(world)


def _segment(node, segment_id, volume):
    return slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume) > 0


def _all_segments(out):
    """{(t, segment ID): bool (k, j, i) on that scan} of every segment of the run's segmentations."""
    arrays = {}
    for t, (volume, node) in enumerate(zip(out.volumeNodes, out.segmentationNodes)):
        for sid in node.GetSegmentation().GetSegmentIDs():
            arrays[(t, sid)] = _segment(node, sid, volume)
    return arrays


def _identity(out):
    """Segment IDs, names, colours and status tags of every timepoint's segmentation."""
    found = []
    for node in out.segmentationNodes:
        seg = node.GetSegmentation()
        found.append({sid: (seg.GetSegment(sid).GetName(), tuple(round(c, 5) for c in seg.GetSegment(sid).GetColor()),
                            results.segmentTag(seg.GetSegment(sid), results.TAG_STATUS))
                      for sid in seg.GetSegmentIDs()})
    return found


def _table(out):
    table = out.tableNode.GetTable()
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    rows = [tuple(table.GetColumn(c).GetValue(r) for c in range(len(names))) for r in range(table.GetNumberOfRows())]
    return names, rows


def _plot(out):
    """{series name: (colour, y values)} of the volume plot."""
    chart = out.plotChartNode
    series = {}
    for i in range(chart.GetNumberOfPlotSeriesNodes()):
        node = chart.GetNthPlotSeriesNode(i)
        series[node.GetName()] = (tuple(round(c, 5) for c in node.GetColor()),
                                  slicer.util.arrayFromTableColumn(node.GetTableNode(), node.GetYColumnName()).copy())
    return series


def _same_table(a, b):
    assert a[0] == b[0] and len(a[1]) == len(b[1])
    for row_a, row_b in zip(a[1], b[1]):
        for x, y in zip(row_a, row_b):
            if isinstance(x, float):
                assert (np.isnan(x) and np.isnan(y)) or x == y, str(list(zip(a[0], row_a, row_b)))
            else:
                assert x == y, (row_a, row_b)


def _same_plot(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0] and np.array_equal(a[name][1], b[name][1], equal_nan=True), name


def _inventory(h):
    """(class, module role, name) of every node; display and storage nodes by class only (the
    replaced outputs get new ones), without the label map display nodes slicer.util's segment
    export (the test's ``_segment``) leaves behind."""
    nodes = [h.scene.GetNthNode(i) for i in range(h.scene.GetNumberOfNodes())]
    return sorted((n.GetClassName(), str(n.GetAttribute("LesionLocator.Role")),
                   "" if n.IsA("vtkMRMLDisplayNode") or n.IsA("vtkMRMLStorageNode") else n.GetName())
                  for n in nodes if not n.IsA("vtkMRMLLabelMapVolumeDisplayNode"))


def _same_inventory(a, b):
    from collections import Counter

    extra, missing = Counter(a) - Counter(b), Counter(b) - Counter(a)
    assert not extra and not missing, f"extra: {sorted(extra.elements())}, missing: {sorted(missing.elements())}"


def _library(images, model, previous, corrections):
    """The library's answer for the same corrections: a runner call on the phantom images."""
    request = TrackRequest(list(images), {}, model, "none", names=[f"CT t{t}" for t in range(len(images))],
                           corrections=list(corrections), previous=previous)
    return InProcessRunner().track(request)


@pytest.fixture
def LL(lesionlocator_module):
    return lesionlocator_module


@pytest.fixture
def study(slicer_scene, LL, tiny_model_root, three_timepoints):
    """The phantom study segmented on the baseline and tracked (registration 'none') with the tiny model."""
    h = slicer_scene
    logic = LL.LesionLocatorLogic()
    volumes, clicks = phantom_case(h, three_timepoints)
    model = str(tiny_model_root)
    logic.segment(volumes[0], clicks, modelPath=model, device="cpu")
    out = logic.track(volumes[0], volumes[1:], modelPath=model, device="cpu", registration="none")
    return h, logic, volumes, out


def _lesion_voxel(t, pid):
    """Where the phantom puts lesion ``pid`` at scan t, (k, j, i) (see conftest.three_timepoints)."""
    k, j, i = PHANTOM_LESION_CENTRES[pid - 1]
    return (k, j + 2 * t, i - t) if pid == 1 else (k, j, i + t)


def _state(h, logic, out):
    return dict(inventory=_inventory(h), segments=_all_segments(out), identity=_identity(out), table=_table(out),
                plot=_plot(out), cells=logic.reviewCells(), undo=len(logic._undo))


def _assert_unchanged(h, logic, before):
    out = logic.lastTrack
    _same_inventory(_inventory(h), before["inventory"])
    after = _all_segments(out)
    assert after.keys() == before["segments"].keys()
    for key, mask in before["segments"].items():
        assert np.array_equal(after[key], mask), key
    assert _identity(out) == before["identity"]
    _same_table(_table(out), before["table"])
    _same_plot(_plot(out), before["plot"])
    assert logic.reviewCells() == before["cells"] and len(logic._undo) == before["undo"]


# ------------------------------------------------------------------------------ review cells
def test_review_cells_follow_the_tracking_run(study):
    h, logic, volumes, out = study
    cells = logic.reviewCells()
    assert [(c.lesionId, c.timepoint) for c in cells] == [(pid, t) for pid in (1, 2) for t in range(3)]
    rows = {(r["lesion_id"], r["index"]): r for r in out.rows}
    for cell in cells:
        assert cell.status == out.status[cell.lesionId][cell.timepoint]
        assert cell.volumeMl == pytest.approx(rows[(cell.lesionId, cell.timepoint)]["volume_ml"], rel=1e-12)
        assert cell.volumeName == volumes[cell.timepoint].GetName() and cell.review == ""
        assert cell.text == f"{cell.status}, {cell.volumeMl:.2f} ml"
    logic.acceptCell(2, 1)
    assert [c.review for c in logic.reviewCells() if (c.lesionId, c.timepoint) == (2, 1)] == ["accepted"]
    assert logic.reviewCells()[4].text.endswith("\u2713")
    with pytest.raises(ValueError, match="lesion 7 is not in this tracking run"):
        logic.acceptCell(7, 1)
    with pytest.raises(ValueError, match="timepoint 3 is not a scan"):
        logic.acceptCell(1, 3)
    assert type(logic)().reviewCells() == []  # no tracking run yet


# ------------------------------------------------------------------------------ geometry of the views
def test_lesion_position_and_show_lesion_on_oblique_transformed_scans(study):
    """The position is the centre of the lesion's voxels in scan t as MRML maps them to world (the
    scans are oblique, anisotropic, under parent transforms); slice views jump there, show scan t."""
    h, logic, volumes, out = study
    for pid in (1, 2):
        for t in range(3):
            mask = _segment(out.segmentationNodes[t], f"lesion_{pid}", volumes[t])
            assert mask.any()
            expected = _world_ras(volumes[t], np.argwhere(mask).mean(axis=0))
            assert np.allclose(logic.lesionPosition(pid, t), expected, atol=1e-6), (pid, t)
    # no slice view in the scene (no layout): only the display state changes
    position = logic.showLesion(1, 2)
    assert np.allclose(position, logic.lesionPosition(1, 2))
    assert out.browserNode.GetSelectedItemNumber() == 2
    assert [n.GetDisplayNode().GetVisibility() for n in out.segmentationNodes] == [0, 0, 1]
    # three slice views, as a layout makes them: each shows scan t, centred on the lesion
    views = []
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        view = slicer.vtkMRMLSliceNode()
        view.SetLayoutName(name)
        view.SetName(name)
        view.SetDefaultOrientation(orientation)
        view.SetOrientation(orientation)
        view.SetDimensions(256, 256, 1)
        view.SetFieldOfView(200.0, 200.0, 1.0)
        h.scene.AddNode(view)
        composite = slicer.vtkMRMLSliceCompositeNode()
        composite.SetLayoutName(name)
        h.scene.AddNode(composite)
        views.append((view, composite))
    position = logic.showLesion(2, 1)
    for view, composite in views:
        assert composite.GetBackgroundVolumeID() == volumes[1].GetID()
        slice_to_ras = slicer.util.arrayFromVTKMatrix(view.GetSliceToRAS())
        assert np.allclose(slice_to_ras[:3, 3], position, atol=1e-6), view.GetName()
    assert [n.GetDisplayNode().GetVisibility() for n in out.segmentationNodes] == [0, 1, 0]
    # an empty cell (vanished from t1 on): the last position where the lesion was seen
    logic.correctTracking(2, 1, "vanished")
    assert np.allclose(logic.lesionPosition(2, 2), logic.lesionPosition(2, 0), atol=1e-9)
    assert np.allclose(logic.showLesion(2, 2), logic.lesionPosition(2, 0))
    assert views[0][1].GetBackgroundVolumeID() == volumes[2].GetID()


# ------------------------------------------------------------------------------ corrections
def test_point_correction_re_propagates_one_lesion_and_undo_restores_everything(study, three_timepoints):
    h, logic, volumes, out = study
    base = logic.review.base
    # a click on follow-up 1 (under a rotating parent transform) with the point list under a transform of its own
    voxel = tuple(np.add(_lesion_voxel(1, 1), (0, 1, 1)))
    world = _world_ras(volumes[1], voxel)
    click = points(h, [world], name="correction",
                   transform=h.add_linear_transform(rigid((0, 1, 0), 33, (2.0, -5.0, 7.0)), "markup transform"))
    again = points(h, [_world_ras(volumes[1], _lesion_voxel(1, 1))], name="second correction")
    before = _state(h, logic, out)
    seen = []
    corrected = logic.correctTracking(1, 1, "point", promptNode=click, progress=lambda f, m: seen.append((f, m)))
    assert corrected is logic.lastTrack and seen[-1][0] == 1.0 and "Lesion 1 corrected at 'CT t1'" in seen[-1][1]

    expected = _library(three_timepoints, logic.review.plan.request.model, base.tracked,
                        [Correction(1, 1, Point(1, tuple(world * RAS_TO_LPS)))])
    after = _all_segments(corrected)
    for t in range(3):
        for pid in (1, 2):
            mask = after[(t, f"lesion_{pid}")]
            if pid == 1 and t >= 1:
                assert np.array_equal(mask, expected.masks[t][1]), t  # exactly the library's corrected mask
            else:
                assert np.array_equal(mask, before["segments"][(t, f"lesion_{pid}")]), (t, pid)  # bit for bit
    assert any(not np.array_equal(after[(t, "lesion_1")], before["segments"][(t, "lesion_1")]) for t in (1, 2))
    assert logic.review.response.status == expected.status
    # in place: the same nodes (table, plot, sequences replaced one for one), IDs, names, colours
    _same_inventory(_inventory(h), before["inventory"])
    assert corrected.segmentationNodes == out.segmentationNodes
    assert [{sid: v[:2] for sid, v in s.items()} for s in _identity(corrected)] == \
        [{sid: v[:2] for sid, v in s.items()} for s in before["identity"]]
    # table and plot: lesion 1's rows are the library's measurements, lesion 2's unchanged
    names, rows = _table(corrected)
    by = {(r[0], r[2]): dict(zip(names, r)) for r in rows}
    old = {(r[0], r[2]): dict(zip(names, r)) for r in before["table"][1]}
    for row in expected.rows:
        key = (row["lesion_id"], row["index"])
        assert by[key]["Volume (ml)"] == pytest.approx(row["volume_ml"], rel=1e-12)
        assert by[key]["Status"] == row["status"] and by[key]["Lesion change"] == row["lesion_change_category"]
        assert by[key]["RECIST 1.1 (for information only)"] == (row["recist_information_only"] or "")
        if key[0] == 2:
            assert by[key]["Volume (ml)"] == old[key]["Volume (ml)"]
    plot = _plot(corrected)
    assert np.allclose(plot["Lesion 1"][1], [r["volume_ml"] for r in expected.rows if r["lesion_id"] == 1])
    assert np.array_equal(plot["Lesion 2"][1], before["plot"]["Lesion 2"][1])
    # the review: the corrected cell is marked, the volumes follow
    cells = {(c.lesionId, c.timepoint): c for c in logic.reviewCells()}
    assert cells[(1, 1)].review == "corrected" and cells[(1, 2)].review == ""
    assert cells[(1, 2)].volumeMl == pytest.approx(by[(1, 2)]["Volume (ml)"])

    # a second correction of the same cell replaces the first (the library gets one correction)
    logic.correctTracking(1, 1, "point", promptNode=again)
    assert list(logic.review.corrections) == [(1, 1)]
    assert len(logic._undo) == before["undo"] + 2

    # undo twice: segments bit for bit, table, plot, review state, no node left over
    logic.undo()
    masks = _all_segments(logic.lastTrack)
    assert all(np.array_equal(masks[(t, "lesion_1")], after[(t, "lesion_1")]) for t in range(3))
    assert "correction of lesion 1 at 'CT t1'" in logic.undo()
    _assert_unchanged(h, logic, before)
    assert logic.review.corrections == {} and logic.review.response is base


def test_vanished_box_and_new_lesion_corrections(study, three_timepoints):
    h, logic, volumes, out = study
    base = logic.review.base
    # the prompts: a box (an ROI under a translating transform) around lesion 1 on follow-up 2, and a
    # click on the phantom's lesion 2 there (a new lesion once lesion 2 is marked vanished)
    centre = _world_ras(volumes[2], _lesion_voxel(2, 1))
    roi = h.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "correction box")
    shift = np.array([4.0, -3.0, 2.5])
    roi.SetAndObserveTransformNodeID(h.add_linear_transform(rigid((0, 0, 1), 0, shift), "roi transform").GetID())
    roi.SetCenter(*(centre - shift))
    roi.SetSize(18.0, 16.0, 14.0)
    click = points(h, [_world_ras(volumes[2], _lesion_voxel(2, 2))], name="new lesion")
    before = _state(h, logic, out)
    # lesion 2 vanished from follow-up 1 on
    vanished = logic.correctTracking(2, 1, "vanished")
    assert logic.review.response.status[2] == ["tracked", "vanished", "vanished"]
    for t in (1, 2):
        assert not _segment(vanished.segmentationNodes[t], "lesion_2", volumes[t]).any()
        assert results.segmentTag(vanished.segmentationNodes[t].GetSegmentation().GetSegment("lesion_2"),
                                  results.TAG_STATUS) == "vanished"
    assert np.array_equal(_segment(vanished.segmentationNodes[0], "lesion_2", volumes[0]),
                          before["segments"][(0, "lesion_2")])
    names, rows = _table(vanished)
    assert [(r[2], r[names.index("Status")], r[names.index("Volume (ml)")]) for r in rows if r[0] == 2][1:] == \
        [(1, "vanished", 0.0), (2, "vanished", 0.0)]

    # lesion 1 at follow-up 2 from the box (its corners in world: the centre +- half the size)
    boxed = logic.correctTracking(1, 2, "box", promptNode=roi)
    corners = np.array([centre + np.array([x, y, z]) * [9.0, 8.0, 7.0] for x in (-1, 1) for y in (-1, 1)
                        for z in (-1, 1)]) * RAS_TO_LPS
    expected = _library(three_timepoints, logic.review.plan.request.model, base.tracked,
                        [Correction(1, 2, Box.from_points(1, corners)), Correction(2, 1, vanished=True)])
    assert np.array_equal(_segment(boxed.segmentationNodes[2], "lesion_1", volumes[2]), expected.masks[2][1])
    assert np.array_equal(_segment(boxed.segmentationNodes[1], "lesion_1", volumes[1]),
                          before["segments"][(1, "lesion_1")])
    assert logic.review.response.status == expected.status

    # a new lesion first seen at follow-up 2: the phantom's lesion 2 there (vanished for the study now)
    added = logic.correctTracking(None, 2, "new", promptNode=click)
    new_id = logic.review.lastCorrection.lesion
    assert new_id == 3 and logic.review.response.status[3] == ["absent", "absent", "new"]
    expected = _library(three_timepoints, logic.review.plan.request.model, base.tracked,
                        [Correction(1, 2, Box.from_points(1, corners)), Correction(2, 1, vanished=True),
                         Correction(3, 2, Point(3, tuple(_world_ras(volumes[2], _lesion_voxel(2, 2)) * RAS_TO_LPS)),
                                    new=True)])
    assert expected.masks[2][3].any()
    node2 = added.segmentationNodes[2]
    segment = node2.GetSegmentation().GetSegment("lesion_3")
    assert segment.GetName() == "Lesion 3"
    assert tuple(round(c, 5) for c in segment.GetColor()) == tuple(round(c, 5) for c in results.colorForLesion(3))
    assert results.segmentTag(segment, results.TAG_STATUS) == "new"
    assert np.array_equal(_segment(node2, "lesion_3", volumes[2]), expected.masks[2][3])
    assert not _segment(added.segmentationNodes[1], "lesion_3", volumes[1]).any()
    assert added.segmentationNodes[0].GetSegmentation().GetSegment("lesion_3") is None  # the baseline is never written
    names, rows = _table(added)
    new_rows = [dict(zip(names, r)) for r in rows if r[0] == 3]
    assert [(r["Timepoint"], r["Status"], r["Lesion change"]) for r in new_rows] == \
        [(0, "absent", "absent"), (1, "absent", "absent"), (2, "new", "new")]
    assert [r["RECIST 1.1 (for information only)"] for r in new_rows][2] == "PD"
    assert new_rows[2]["Volume (ml)"] == pytest.approx(expected.rows[-1]["volume_ml"], rel=1e-12)
    plot = _plot(added)
    assert list(plot) == ["Lesion 1", "Lesion 2", "Lesion 3"]
    assert np.isnan(plot["Lesion 3"][1][:2]).all()  # absent: gaps
    assert plot["Lesion 3"][1][2] == pytest.approx(new_rows[2]["Volume (ml)"])
    cells = logic.reviewCells()
    assert [(c.lesionId, c.status) for c in cells if c.lesionId == 3] == [(3, "absent"), (3, "absent"), (3, "new")]
    assert np.allclose(logic.lesionPosition(3, 0), logic.lesionPosition(3, 2))  # not there yet: where it appears

    # undo the new lesion: its segments and rows go; undo all: the first run exactly
    logic.undo()
    assert logic.lastTrack.segmentationNodes[2].GetSegmentation().GetSegment("lesion_3") is None
    assert logic.lastTrack.segmentationNodes[1].GetSegmentation().GetSegment("lesion_3") is None
    assert {r[0] for r in _table(logic.lastTrack)[1]} == {1, 2} and list(_plot(logic.lastTrack)) == ["Lesion 1",
                                                                                                       "Lesion 2"]
    logic.undo()
    logic.undo()
    _assert_unchanged(h, logic, before)


def test_moving_the_tracked_lesion_is_verified_tracking(study, three_timepoints):
    """'Move tracked lesion here': the point (a markup under a parent transform, on the oblique
    follow-up) becomes the library's moved-point correction (verified tracking at that scan); the
    other lesion and the baseline keep their voxels; undo restores the first run."""
    h, logic, volumes, out = study
    where = _world_ras(volumes[1], np.asarray(_lesion_voxel(1, 1)) + np.array([0, 3, -2]))
    click = points(h, [where], name="moved centre")
    roi = h.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "not a point")
    roi.SetCenter(*where)
    roi.SetSize(10.0, 10.0, 10.0)
    before = _state(h, logic, out)
    moved = logic.correctTracking(1, 1, "moved", promptNode=click)
    expected = _library(three_timepoints, logic.review.plan.request.model, logic.review.base.tracked,
                        [Correction(1, 1, Point(1, tuple(where * RAS_TO_LPS)), moved=True)])
    for t in (1, 2):
        assert np.array_equal(_segment(moved.segmentationNodes[t], "lesion_1", volumes[t]), expected.masks[t][1]), t
        assert np.array_equal(_segment(moved.segmentationNodes[t], "lesion_2", volumes[t]),
                              before["segments"][(t, "lesion_2")]), t
    assert logic.review.response.status == expected.status
    with pytest.raises(ValueError, match="a 'moved' correction needs a point prompt"):
        logic.correctTracking(1, 1, "moved", promptNode=roi)
    logic.undo()
    _assert_unchanged(h, logic, before)


def test_bad_prompts_the_remote_server_and_cancel_change_nothing(study, tiny_model_root):
    h, logic, volumes, out = study
    before = _state(h, logic, out)
    # a point outside follow-up 1: the library's message
    far = _world_ras(volumes[1], (12, 30, 200))
    with pytest.raises(PromptError, match=r"is outside the image"):
        logic.correctTracking(1, 1, "point", promptNode=points(h, [far], name="outside"))
    _assert_unchanged(h, logic, dict(before, inventory=_inventory(h)))  # (the point list itself is the test's)
    roi = h.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    roi.SetCenter(*_world_ras(volumes[1], _lesion_voxel(1, 1)))
    roi.SetSize(10, 10, 10)
    click = points(h, [_world_ras(volumes[1], _lesion_voxel(1, 1))], name="ok click")
    inventory = _inventory(h)
    for args, error, message in [
            ((1, 0, "point", click), ValueError, "the baseline 'CT t0' is corrected by segmenting"),
            ((1, 3, "point", click), ValueError, "timepoint 3 is not a scan"),
            ((5, 1, "point", click), ValueError, "lesion 5 is not in this tracking run"),
            ((1, 1, "scribble", click), ValueError, "unknown correction 'scribble'"),
            ((1, 1, "point", None), ValueError, "no prompt given"),
            ((1, 1, "point", roi), ValueError, "a 'point' correction needs a point prompt, got a box"),
            ((1, 1, "box", click), ValueError, "a 'box' correction needs a box prompt"),
            ((2, 1, "new", click), ValueError, "lesion ID 2 is taken")]:
        with pytest.raises(error, match=message):
            logic.correctTracking(*args)
        _assert_unchanged(h, logic, dict(before, inventory=inventory))
    # Cancel while the runner works, and through the job queue
    token = CancelToken()
    with pytest.raises(Cancelled):
        logic.correctTracking(1, 1, "point", promptNode=click, cancel=token,
                              progress=lambda f, m: token.cancel() if f > 0 else None)
    _assert_unchanged(h, logic, dict(before, inventory=inventory))
    queue, calls = jobs.JobQueue(), []
    job = logic.correctionJob(1, 1, "point", promptNode=click, done=lambda o: calls.append("done"),
                              failed=lambda e: calls.append(e), cancelled=lambda: calls.append("cancelled"))
    queue.submit(job)
    queue.poll()
    queue.cancel()
    queue.wait(60)
    assert calls == ["cancelled"]
    _assert_unchanged(h, logic, dict(before, inventory=inventory))
    # a run tracked on this computer cannot be corrected on a server (switched to Remote mode since):
    # the runner's message, nothing changes
    from LesionLocatorLib.remote import RemoteRunner

    logic.runner = RemoteRunner("http://127.0.0.1:9", "key")
    with pytest.raises(ValueError, match="a run tracked elsewhere cannot be corrected on this server"):
        logic.correctTracking(1, 1, "point", promptNode=click)
    _assert_unchanged(h, logic, dict(before, inventory=inventory))
    logic.runner = None
    # the job form, once it succeeds: the same as the blocking call
    queue.submit(logic.correctionJob(1, 1, "vanished", done=calls.append, failed=calls.append))
    queue.wait(120)
    assert calls[-1] is logic.lastTrack and logic.review.response.status[1] == ["tracked", "vanished", "vanished"]
    logic.undo()
    _assert_unchanged(h, logic, dict(before, inventory=inventory))
    # a scan marked modified without a voxel changed: still the tracked scan
    slicer.util.arrayFromVolumeModified(volumes[1])
    logic.correctTracking(2, 2, "vanished")
    assert logic.review.response.status[2] == ["tracked", "tracked", "vanished"]
    logic.undo()
    _assert_unchanged(h, logic, dict(before, inventory=inventory))
    # a scan whose voxels changed since tracking (the registrations would not fit it): track again first
    slicer.util.arrayFromVolume(volumes[2])[0, 0, 0] += 1
    slicer.util.arrayFromVolumeModified(volumes[2])
    with pytest.raises(ValueError, match="'CT t2' changed since it was tracked"):
        logic.correctTracking(1, 1, "vanished")
    _assert_unchanged(h, logic, dict(before, inventory=inventory))


def test_a_new_track_ends_the_review_and_removes_the_lesions_corrections_added(study):
    h, logic, volumes, out = study
    click = points(h, [_world_ras(volumes[2], _lesion_voxel(2, 2))], name="new lesion")
    inventory = _inventory(h)
    logic.correctTracking(None, 2, "new", promptNode=click)
    session = logic.review
    model = session.plan.request.model
    again = logic.track(volumes[0], volumes[1:], modelPath=model.path, device="cpu", registration="none")
    assert logic.review is not session and logic.review.corrections == {}
    assert again.segmentationNodes[2].GetSegmentation().GetSegment("lesion_3") is None
    _same_inventory(_inventory(h), inventory)
    with pytest.raises(ValueError, match="tracked again since that correction"):
        logic.undo()


def test_correction_through_the_worker_process_gives_the_in_process_result(study):
    h, logic, volumes, out = study
    click = points(h, [_world_ras(volumes[1], np.add(_lesion_voxel(1, 1), (0, -1, 1)))], name="correction")
    in_process = logic.correctTracking(1, 1, "point", promptNode=click)
    expected = {key: mask.copy() for key, mask in _all_segments(in_process).items()}
    expected_table = _table(in_process)
    logic.undo()
    logic.useWorkerProcess()
    try:
        worker = logic.correctTracking(1, 1, "point", promptNode=click)
        got = _all_segments(worker)
        assert got.keys() == expected.keys()
        for key in expected:
            assert np.array_equal(got[key], expected[key]), key
        # the measurements: the worker measures on its own copy of the scans (geometry through a file,
        # the last bit may differ); the short axis is left out: on a tied long axis (random-weight
        # masks) the last bit picks another perpendicular
        names, rows = _table(worker)
        keep = [names.index(c) for c in ("Lesion ID", "Timepoint", "Status", "Volume (ml)", "Long axis (mm)")]
        assert len(rows) == len(expected_table[1])
        for row, want in zip(rows, expected_table[1]):
            for c in keep:
                assert row[c] == (pytest.approx(want[c], rel=1e-12) if isinstance(want[c], float) else want[c])
        # unchanged masks share the first run's arrays (memory), the corrected lesion's do not
        response, base = logic.review.response, logic.review.base
        assert response.masks[1][2] is base.masks[1][2] and response.masks[0][1] is base.masks[0][1]
        assert response.masks[1][1] is not base.masks[1][1]
    finally:
        logic.cleanup()


def test_review_session_merges_corrections_the_library_way():
    """One correction per lesion and scan (the newest wins); a lesion not in the first run is new
    at its first corrected scan only."""
    first = type("Response", (), {"status": {1: ["tracked"] * 4}, "masks": []})()
    plan = type("Plan", (), {"lesions": [], "volumes": [None] * 4})()
    session = review.ReviewSession(plan, first, [])
    session.corrections = {(1, 2): Correction(1, 2, vanished=True), (4, 3): Correction(4, 3, Point(4, (0, 0, 0)),
                                                                                          new=True)}
    merged = session.withCorrection(Correction(4, 1, Point(4, (1, 1, 1)), new=True))
    assert [(c.lesion, c.timepoint, c.new) for c in merged] == [(1, 2, False), (4, 1, True), (4, 3, False)]
    merged = session.withCorrection(Correction(1, 2, Point(1, (2, 2, 2))))
    assert [(c.lesion, c.timepoint, c.kind) for c in merged] == [(1, 2, "point"), (4, 3, "point")]
    assert merged[1].new
    assert session.newLesionId({2, 3}) == 4 and session.newLesionId() == 2
