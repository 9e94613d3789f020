"""Click and box interaction, as Slicer's markups widgets really deliver it (Qt-free).

What Slicer 5.x fires (checked on slicer-core's real slice-view widgets, see
``Testing/test_slice_view_harness.py``):

* a click in place mode: ``PointPositionDefinedEvent`` (call data: the point's index) on release;
* an ROI drawn with two clicks: ``PointPositionDefinedEvent`` after the first corner (size 0) and
  again after the second (the ROI then has its size; its control point is its centre);
* press and release on an existing point: ``PointStartInteractionEvent`` and
  ``PointEndInteractionEvent``, nothing moved;
* dragging a point or an ROI handle: ``PointStartInteractionEvent``, ``PointModifiedEvent`` s,
  ``PointEndInteractionEvent``.

:class:`PromptWatcher` turns that into "this lesion prompt is ready": a point when placed, and again
only when it really moved; a box once, when fully placed, and again only when it changed.
:class:`InteractiveSegmentation` queues each ready prompt as a job (:mod:`.jobs`): in order, never
dropped, one run at a time, while the GUI keeps running.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import vtk

import slicer

from .jobs import Job, JobQueue
from .scene import roiCornersLocal

MOVE_TOLERANCE_MM = 1e-4


class PromptWatcher:
    """Observes point lists and ROIs; calls ``ready(node, controlPointId)`` (``controlPointId``
    None for an ROI) when a lesion prompt should run."""

    def __init__(self, ready: Callable):
        self.ready = ready
        self._observations = []   # (node, tag)
        self._lastRun = {}        # (node ID, control point ID or None) -> positions the prompt last ran with

    def watch(self, node) -> None:
        """Start observing ``node`` (a point list or an ROI); observing it twice is harmless."""
        if node is None or any(n is node for n, _ in self._observations):
            return
        defined = node.AddObserver(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onDefined)
        ended = node.AddObserver(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self._onEndInteraction)
        self._observations += [(node, defined), (node, ended)]

    def unwatch(self, node=None) -> None:
        """Stop observing ``node`` (default: every node)."""
        keep = []
        for n, tag in self._observations:
            if node is None or n is node:
                n.RemoveObserver(tag)
            else:
                keep.append((n, tag))
        self._observations = keep

    @property
    def watched(self) -> list:
        return list({id(n): n for n, _ in self._observations}.values())

    # ------------------------------------------------------------------ events
    @vtk.calldata_type(vtk.VTK_INT)
    def _onDefined(self, node, event, index=None):
        if node.IsA("vtkMRMLMarkupsROINode"):
            self._roiChanged(node)
        elif isinstance(index, int) and 0 <= index < node.GetNumberOfControlPoints():
            self._pointChanged(node, node.GetNthControlPointID(index))

    def _onEndInteraction(self, node, event):
        if node.IsA("vtkMRMLMarkupsROINode"):
            self._roiChanged(node)
            return
        for i in range(node.GetNumberOfControlPoints()):
            self._pointChanged(node, node.GetNthControlPointID(i))

    def _pointChanged(self, node, pointId) -> None:
        index = node.GetNthControlPointIndexByID(pointId)
        if index < 0 or node.GetNthControlPointPositionStatus(index) != slicer.vtkMRMLMarkupsNode.PositionDefined:
            return
        self._readyIfMoved(node, pointId, np.array(node.GetNthControlPointPosition(index), dtype=float))

    def _roiChanged(self, node) -> None:
        if node.GetNumberOfDefinedControlPoints() < 1 or not np.all(np.array(node.GetSize()) > 0):
            return  # the first corner of a box being drawn: wait for the second
        self._readyIfMoved(node, None, roiCornersLocal(node))

    def _readyIfMoved(self, node, pointId, positions) -> None:
        key = (node.GetID(), pointId)
        last = self._lastRun.get(key)
        if last is not None and np.allclose(last, positions, atol=MOVE_TOLERANCE_MM):
            return  # a press and release without motion, or an event repeated
        self._lastRun[key] = positions
        self.ready(node, pointId)


class InteractiveSegmentation:
    """Segments each prompt the user places on ``volume()`` as soon as it is ready, through the
    Logic's jobs (network in the worker process, off the GUI thread), in arrival order.

    ``volume()`` and ``options()`` give the current baseline volume and model options (read when a
    prompt arrives); ``enabled()`` says whether segment-on-click is on. Callbacks (main thread):
    ``done(resultNode)``, ``failed(error)``, ``cancelled()``. The GUI calls :meth:`poll` from a
    timer; ``progress(fraction, message)`` comes from there."""

    def __init__(self, logic, volume: Callable, options: Callable = lambda: None, enabled: Callable = lambda: True,
                 done: Callable = lambda node: None, failed: Callable = lambda error: None,
                 cancelled: Callable = lambda: None, progress: Callable = lambda fraction, message: None):
        self.logic = logic
        self.volume, self.options, self.enabled = volume, options, enabled
        self.done, self.failed, self.cancelled = done, failed, cancelled
        self.jobs = JobQueue(progress)
        self.watcher = PromptWatcher(self._promptReady)

    def _promptReady(self, node, pointId) -> None:
        if not self.enabled():
            return
        self.submit(self.promptJob(node, pointId))

    def promptJob(self, node, pointId=None) -> Job:
        """The job that segments one prompt: a control point (by ID, so that points added or removed
        before it starts do not shift it) or an ROI."""
        def prompts():
            if pointId is None:
                return node
            index = node.GetNthControlPointIndexByID(pointId)
            if index < 0:
                raise ValueError(f"the point was removed before it could be segmented ({node.GetName()})")
            return (node, index)
        return self.logic.segmentationJob(self.volume(), prompts, options=self.options(), done=self.done,
                                          failed=self.failed, cancelled=self.cancelled, key=f"{node.GetID()}/{pointId}")

    def submit(self, job: Job) -> bool:
        """Queue any job (segment, refine, track, download) behind the prompts already waiting."""
        return self.jobs.submit(job)

    def poll(self) -> bool:
        return self.jobs.poll()

    def cancel(self) -> None:
        """Cancel the running job and drop the waiting ones: the scene stays as it was."""
        self.jobs.cancel()

    def close(self) -> None:
        self.watcher.unwatch()
        self.jobs.cancel()

