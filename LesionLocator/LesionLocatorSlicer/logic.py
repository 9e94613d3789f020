"""The Logic facade: everything the module does, callable from the GUI and the Python console.

Console calls (:meth:`LesionLocatorLogic.segment`, :meth:`~LesionLocatorLogic.refineFromSegment`,
:meth:`~LesionLocatorLogic.track`, :meth:`~LesionLocatorLogic.downloadModel`) block until done, as
scripts expect. The GUI uses the same operations as :class:`~LesionLocatorSlicer.jobs.Job` s
(:meth:`~LesionLocatorLogic.segmentationJob`, :meth:`~LesionLocatorLogic.trackJob`,
:meth:`~LesionLocatorLogic.downloadJob`): the scene is read and written on the main thread, the
network runs in the persistent worker process, waited for on a background thread, so Slicer never
blocks. Either way a failure or Cancel leaves the scene as it was.

Remote mode (:meth:`LesionLocatorLogic.useRemoteServer`): the same operations run on a ``lesionlocator
serve`` server (:class:`LesionLocatorLib.remote.RemoteRunner`); no torch is needed here. The server's
URL and API key live in the runner and the user's settings (:mod:`.remotesettings`), never in the
scene.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from . import dependencies, dicomexport, models, results, review, scene, trackoutputs
from .jobs import Job
from .reviewlogic import CorrectionPlan, ReviewLogic, reviewPlan, voxelDigest

PARAM_MODEL_PATH, PARAM_DEVICE, PARAM_FOLDS, PARAM_TTA = "ModelPath", "Device", "Folds", "TTA"
PARAM_AUTO_SEGMENT = "AutoSegment"
PARAM_MIN_VOLUME_ML, PARAM_MIN_PROMPT_FRACTION = "TrackMinVolumeMl", "TrackMinPromptFraction"
REF_BASELINE, REF_PROMPTS = "BaselineVolume", "Prompts"
DEFAULTS = {PARAM_DEVICE: "auto", PARAM_FOLDS: "", PARAM_TTA: "auto", PARAM_AUTO_SEGMENT: "true",
            PARAM_MODEL_PATH: "", PARAM_MIN_VOLUME_ML: "0", PARAM_MIN_PROMPT_FRACTION: "0"}


class MissingDependencyError(RuntimeError):
    """torch, nnunetv2 or another required Python package is not installed."""


@dataclass
class SegmentationPlan:
    """A segmentation run read from the scene (main thread) and handed to the runner."""
    volumeNode: object
    resultNode: object
    specs: list
    ids: list
    request: object
    keepPromptTag: bool = False


@dataclass
class TrackPlan:
    """A tracking run read from the scene (main thread) and handed to the runner."""
    volumes: list
    images: list
    lesions: list
    baselineNode: object
    targets: list
    request: object
    order: str
    imageKeys: list = None
    imageDigests: list = None


class LesionLocatorLogic(ReviewLogic, ScriptedLoadableModuleLogic):
    """MRML <-> LesionLocatorLib; see :mod:`LesionLocatorSlicer` for which file does what.

    The RAS <-> LPS conversion (with parent transforms) is in one place, :mod:`.scene`."""

    STATUSES = trackoutputs.STATUSES

    def __init__(self, runner=None):
        """``runner``: a :class:`LesionLocatorLib.runner.SegmentationRunner`; default: in this process
        (the console's default; the Widget calls :meth:`useWorkerProcess`). Models stay loaded."""
        ScriptedLoadableModuleLogic.__init__(self)
        self._runner = runner
        self.lastResponse = None
        self.lastLesionIds = []
        self.lastTrack = None
        self._cancelToken = None
        self._fallbackTrackRunner = None
        self._undo = []
        self.review = None  # the review of the last tracking run (:class:`.review.ReviewSession`)

    # ------------------------------------------------------------------ runner
    @property
    def runner(self):
        """The :class:`LesionLocatorLib.runner.SegmentationRunner` (created on first use, so that
        the module loads even before its dependencies are installed)."""
        if self._runner is None:
            from LesionLocatorLib.runner import InProcessRunner
            self._runner = InProcessRunner()
        return self._runner

    @runner.setter
    def runner(self, runner):
        self._runner = runner

    def useWorkerProcess(self, enabled: bool = True) -> None:
        """Run the network in a persistent worker process (``LesionLocatorLib.worker``, started with
        Slicer's ``PythonSlicer`` and a hidden console, as ``slicer.util.launchConsoleProcess``
        does) instead of in Slicer's own process: a crash or out-of-memory there costs a message,
        and the next request starts a new worker. The model stays loaded in the worker."""
        import shutil
        import sys

        from LesionLocatorLib.runner import InProcessRunner, WorkerProcessRunner

        self.cleanup()
        python = shutil.which("PythonSlicer") or sys.executable
        self._runner = WorkerProcessRunner(python=python, env=_startupEnvironment()) if enabled else InProcessRunner()

    def useRemoteServer(self, url: str, apiKey=None, model=None, caFile=None) -> None:
        """Run segmentation and tracking on a ``lesionlocator serve`` server at ``url`` (http:// or
        https://; ``caFile``: a CA bundle for a private certificate authority) with the client key
        ``apiKey`` and the server model ``model`` (a name; default the server's first). The
        Model folder and Device settings are then not used (folds and test-time mirroring are).
        The key is kept in the runner only: nothing goes into the scene. ValueError for a URL
        that is not one; nothing is contacted until the first request (see
        :meth:`testServerConnection`)."""
        from LesionLocatorLib.remote import RemoteRunner

        runner = RemoteRunner(url, apiKey or None, model=model or None, ca_file=caFile or None)
        self.cleanup()
        self._runner = runner

    @property
    def isRemote(self) -> bool:
        """True when the runner is a server (:meth:`useRemoteServer`)."""
        from LesionLocatorLib.remote import RemoteRunner

        return isinstance(self._runner, RemoteRunner)

    @staticmethod
    def testServerConnection(url: str, apiKey=None, caFile=None) -> tuple:
        """(one line for the status label: the server's version, devices, models and queue, or what
        went wrong; the server's model names, its default first, or [] when it cannot be used)."""
        from LesionLocatorLib.remote import RemoteRunner

        try:
            runner = RemoteRunner(url, apiKey or None, ca_file=caFile or None)
        except ValueError as error:
            return _("Connection failed: {error}").format(error=error), []
        try:
            line = runner.test_connection()
            return line, [m["name"] for m in (runner.server_info or {}).get("models", [])]
        finally:
            runner.close()

    def cleanup(self) -> None:
        """Release the runner (stops a worker process, frees cached models)."""
        for runner in (self._runner, self._fallbackTrackRunner):
            if runner is not None:
                runner.close()
        self._runner = self._fallbackTrackRunner = None

    def cancel(self) -> None:
        """Ask the running segmentation, tracking or download to stop (between network batches,
        timepoints, downloaded chunks); the scene stays as it was."""
        if self._cancelToken is not None:
            self._cancelToken.cancel()

    # ------------------------------------------------------------------ parameters
    def setDefaultParameters(self, parameterNode) -> None:
        for name, value in DEFAULTS.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    def trackOptions(self, parameterNode=None) -> dict:
        """The tracking options stored in the parameter node (default: the module's) as keyword
        arguments of :meth:`track`: ``minVolumeMl`` (millilitres) and ``minPromptFraction``.
        An unset parameter is 0; a value that is not a number >= 0 is a ValueError."""
        node = parameterNode or self.getParameterNode()
        options = {}
        for keyword, name in (("minVolumeMl", PARAM_MIN_VOLUME_ML), ("minPromptFraction", PARAM_MIN_PROMPT_FRACTION)):
            text = node.GetParameter(name) or "0"
            try:
                value = float(text)
            except ValueError:
                value = float("nan")
            if not value >= 0:
                raise ValueError(_("tracking option {name} must be a number >= 0, got {text}").format(
                    name=name, text=repr(text)))
            options[keyword] = value
        return options

    def modelOptions(self, parameterNode=None) -> dict:
        """``modelPath``, ``device``, ``folds`` and ``tta`` from the parameter node, as keyword
        arguments of :meth:`segment` / :meth:`track`."""
        node = parameterNode or self.getParameterNode()
        return {"modelPath": node.GetParameter(PARAM_MODEL_PATH) or None,
                "device": node.GetParameter(PARAM_DEVICE) or "auto",
                "folds": node.GetParameter(PARAM_FOLDS) or None,
                "tta": {"on": True, "off": False}.get(node.GetParameter(PARAM_TTA))}

    @staticmethod
    def checkDependencies():
        """None when everything is installed, else what is missing and how to install it."""
        return dependencies.status_message()

    def _requireDependencies(self) -> None:
        if self.isRemote:
            return  # the server runs the network: torch and nnunetv2 are not needed here
        message = self.checkDependencies()
        if message:
            raise MissingDependencyError(message)

    # ------------------------------------------------------------------ segmentation
    def segment(self, volumeNode, promptNodes, modelPath=None, device="auto", folds=None, tta=None,
                progress=None, cancel=None, segmentationNode=None, lesionIds=None):
        """Segment one lesion per prompt; return the module's result segmentation node. Blocks.

        ``promptNodes``: point lists (each placed control point is one lesion), ``(point list,
        control point index)`` pairs and ROI nodes (RAS, under any parent transforms).
        ``modelPath``: a LesionLocator model root (default: the bundled demo model). ``device``:
        auto/cpu/cuda/mps; ``folds``: None (all), '0,1' or a list; ``tta``: None (on for GPU),
        True, False. ``progress(fraction, message)``; ``cancel``: a ``CancelToken`` (or use
        :meth:`cancel`). ``segmentationNode``: a previous result node to add to (a node the module
        did not create is never written to). ``lesionIds``: one ID per lesion to replace specific
        lesions. Raises the library's errors (``PromptError`` for a prompt outside the volume,
        ``ModelLayoutError``/``CheckpointError``, ``Cancelled``), ``TransformError`` and
        :class:`MissingDependencyError`; the scene is then unchanged."""
        plan = self._prepareSegmentation(volumeNode, lambda image: scene.promptsFromNodes(promptNodes),
                                         dict(modelPath=modelPath, device=device, folds=folds, tta=tta),
                                         segmentationNode, lesionIds)
        return self._runBlocking(plan, self._runSegmentation, self._commitSegmentation, progress, cancel)

    def refineFromSegment(self, volumeNode, segmentationNode, segmentId, modelPath=None, device="auto",
                          folds=None, tta=None, progress=None, cancel=None, lesionId=None):
        """Segment a lesion again with a segment (e.g. corrected in the Segment Editor) as its mask
        prompt, run with the model root's ``LesionLocatorTrack`` model (one patch centred on the
        mask). A module lesion segment is replaced in place (same ID, name, colour); a user's
        segment is left alone and the result becomes a lesion in the module's node. Blocks; errors
        as for :meth:`segment` (``PromptError`` for an empty segment)."""
        plan = self._prepareRefine(volumeNode, segmentationNode, segmentId,
                                   dict(modelPath=modelPath, device=device, folds=folds, tta=tta), lesionId)
        return self._runBlocking(plan, self._runSegmentation, self._commitSegmentation, progress, cancel)

    def segmentationJob(self, volumeNode, promptNodes=None, refine=None, options=None, done=None, failed=None,
                        cancelled=None, key=None) -> Job:
        """The GUI's form of :meth:`segment` (``promptNodes``) or :meth:`refineFromSegment`
        (``refine=(segmentationNode, segmentId)``): a :class:`Job` for a :class:`~.jobs.JobQueue`.
        The prompts are read when the job starts, so queued clicks get lesion IDs in order;
        ``promptNodes`` may be a function returning them then."""
        options = dict(options or self.modelOptions())
        if refine is not None:
            prepare = lambda: self._prepareRefine(volumeNode, refine[0], refine[1], options, None)  # noqa: E731
        else:
            prepare = lambda: self._prepareSegmentation(  # noqa: E731
                volumeNode, lambda image: scene.promptsFromNodes(promptNodes() if callable(promptNodes)
                                                                 else promptNodes), options, None, None)
        return Job(_("Segmenting"), self._runSegmentation, prepare, self._commitSegmentation, key,
                   done or (lambda node: None), failed or (lambda error: None), cancelled or (lambda: None))

    def _prepareSegmentation(self, volumeNode, specsOf, options, segmentationNode, lesionIds, keepPromptTag=False,
                             image=None) -> SegmentationPlan:
        from LesionLocatorLib.runner import SegmentationRequest

        self._requireDependencies()
        image = image if image is not None else scene.volumeToImage(volumeNode)
        specs = specsOf(image)
        resultNode = results.targetResultNode(volumeNode, segmentationNode)
        ids = results.assignLesionIds(specs, resultNode, lesionIds)
        request = SegmentationRequest(image, [s.toLibrary(i) for s, i in zip(specs, ids)],
                                      models.modelSpec(**options, remote=self.isRemote),
                                      image_key=scene.imageKey(volumeNode, image))
        return SegmentationPlan(volumeNode, resultNode, specs, ids, request, keepPromptTag)

    def _prepareRefine(self, volumeNode, segmentationNode, segmentId, options, lesionId) -> SegmentationPlan:
        self._requireDependencies()
        image = scene.volumeToImage(volumeNode)
        spec = scene.segmentPrompt(segmentationNode, segmentId, volumeNode, image)
        target = results.targetResultNode(volumeNode, segmentationNode if results.isResultNode(segmentationNode)
                                          else None)
        if lesionId is None and target is not None and target is segmentationNode:
            lesionId = results.segmentLesionId(segmentationNode.GetSegmentation().GetSegment(segmentId))
        return self._prepareSegmentation(volumeNode, lambda _image: [spec], options, target,
                                         [lesionId] if lesionId is not None else None,
                                         keepPromptTag=lesionId is not None and target is segmentationNode,
                                         image=image)

    def _runSegmentation(self, plan: SegmentationPlan, progress, cancel):
        """The network (thread-safe: no scene access); returns the runner's response with each mask
        cropped to its bounding box for the commit."""
        from LesionLocatorLib.protocol import mask_bbox

        response = self.runner.run(plan.request, progress=lambda f, m: progress(0.95 * f, m), cancel=cancel)
        response.boxes = {i: mask_bbox(response.masks[i]) for i in plan.ids}
        progress(0.95, _("writing segments"))
        return response

    def _commitSegmentation(self, plan: SegmentationPlan, response):
        labelmaps = {i: scene.labelmapFromMask(response.masks[i], plan.volumeNode, bbox=response.boxes[i])
                     for i in plan.ids}
        node, edit = results.writeResults(plan.volumeNode, plan.resultNode, plan.specs, plan.ids, labelmaps,
                                          plan.keepPromptTag)
        self._undo.append(edit)
        self.lastResponse, self.lastLesionIds = response, plan.ids
        for message in response.warnings:
            logging.warning(f"LesionLocator: {message}")
        return node

    def lastRunSummary(self) -> str:
        """One line about the last run: lesions, empty masks, time."""
        r = self.lastResponse
        if r is None:
            return ""
        text = _("{n} lesion(s) segmented in {seconds:.1f} s").format(n=len(self.lastLesionIds), seconds=r.seconds)
        if r.empty:
            text += _("; no lesion found at prompt(s) {ids} (empty segment)").format(
                ids=", ".join(str(i) for i in r.empty))
        return text

    def undo(self) -> str:
        """Undo the last lesion operation (a click, box, refine or tracking correction): a new lesion
        is removed, a re-segmented one gets its previous mask, name, colour and tags back, a
        corrected tracking run its previous segments, lesion table and plot. Returns what was
        undone; ValueError when there is nothing to undo."""
        if not self._undo:
            raise ValueError(_("nothing to undo"))
        return self._undo.pop().undo()

    @property
    def canUndo(self) -> bool:
        return bool(self._undo)

    # ------------------------------------------------------------------ tracking
    def track(self, baselineVolumeNode, followupVolumeNodes, baselineSegmentationNode=None, modelPath=None,
              device="auto", folds=None, registration="simpleitk", progress=None, cancel=None, tta=None,
              order="auto", minVolumeMl=0.0, minPromptFraction=0.0):
        """Track the baseline lesions through follow-up scans; return :class:`~.trackoutputs.TrackOutputs`.
        Blocks.

        ``followupVolumeNodes`` are ordered by :meth:`orderFollowUps` (``order``: 'auto' = DICOM
        study date/time, else load order; 'given' = as listed). ``baselineSegmentationNode``: where
        the lesions are (default: the module's node for the baseline); only read.
        ``registration``: 'simpleitk' (default), 'none' (aligned already), or another backend of
        :mod:`LesionLocatorLib.register`. ``minVolumeMl`` (ml) / ``minPromptFraction`` (of the
        warped previous mask): smaller follow-up masks are reported vanished and left empty.
        Writes per follow-up a module segmentation with the baseline's segment IDs, names and
        colours (status tag ``LesionLocator.Status``), sequences with a browser, a lesion table
        and a volume plot; an earlier run's outputs from the same baseline are replaced, segments
        not made by tracking are never overwritten. Failures and Cancel change nothing."""
        plan = self._prepareTrack(baselineVolumeNode, followupVolumeNodes, baselineSegmentationNode,
                                  dict(modelPath=modelPath, device=device, folds=folds, tta=tta), registration,
                                  order, minVolumeMl, minPromptFraction)
        return self._runBlocking(plan, self._runTrack, self._commitTrack, progress, cancel)

    def trackJob(self, baselineVolumeNode, followupVolumeNodes, options=None, trackOptions=None,
                 registration="simpleitk", order="given", done=None, failed=None, cancelled=None) -> Job:
        """The GUI's form of :meth:`track`: a :class:`Job` for a :class:`~.jobs.JobQueue`."""
        options, trackOptions = dict(options or self.modelOptions()), dict(trackOptions or self.trackOptions())
        prepare = lambda: self._prepareTrack(baselineVolumeNode, followupVolumeNodes, None, options,  # noqa: E731
                                             registration, order, trackOptions.get("minVolumeMl", 0.0),
                                             trackOptions.get("minPromptFraction", 0.0))
        return Job(_("Tracking"), self._runTrack, prepare, self._commitTrack, None, done or (lambda outputs: None),
                   failed or (lambda error: None), cancelled or (lambda: None))

    def _prepareTrack(self, baseline, followupNodes, baselineSegmentation, options, registration, order,
                      minVolumeMl, minPromptFraction) -> TrackPlan:
        from LesionLocatorLib.prompts import PromptError
        from LesionLocatorLib.register import BACKENDS
        from LesionLocatorLib.runner import TrackRequest

        self._requireDependencies()
        if registration not in BACKENDS:
            raise ValueError(_("unknown registration {name}; choose one of {names}").format(
                name=repr(registration), names=", ".join(BACKENDS)))
        if not (minVolumeMl >= 0 and minPromptFraction >= 0):
            raise ValueError(_("the minimum volume ({v} ml) and prompt fraction ({f}) must be >= 0").format(
                v=minVolumeMl, f=minPromptFraction))
        volumes = self._trackVolumes(baseline, followupNodes, order)
        if baselineSegmentation is None:
            baselineSegmentation = results.resultNodeForVolume(baseline)
            if baselineSegmentation is None:
                raise ValueError(_("no lesions on '{name}' yet: segment them (click each lesion), then track").format(
                    name=baseline.GetName()))
        images = [scene.volumeToImage(v) for v in volumes]
        lesions = results.baselineLesions(baselineSegmentation, baseline, images[0])
        if not any(lesion.mask.any() for lesion in lesions):
            raise PromptError(_("every segment of '{name}' is empty: nothing to track").format(
                name=baselineSegmentation.GetName()))
        targets = [trackoutputs.trackTarget(v, lesions) for v in volumes[1:]]  # raises before any change
        request = TrackRequest(images, {lesion.lesionId: lesion.mask for lesion in lesions},
                               models.modelSpec(**options, remote=self.isRemote), registration,
                               min_volume_ml=minVolumeMl,
                               min_prompt_fraction=minPromptFraction, names=[v.GetName() for v in volumes])
        return TrackPlan(volumes, images, lesions, baselineSegmentation, targets, request, order,
                         [scene.imageKey(v, image) for v, image in zip(volumes, images)])

    def _trackVolumes(self, baseline, followupNodes, order) -> list:
        if baseline is None:
            raise ValueError(_("choose the baseline volume"))
        followups = self.orderFollowUps(followupNodes, order)
        if not followups:
            raise ValueError(_("choose at least one follow-up volume to track the lesions into"))
        if any(v is baseline for v in followups):
            raise ValueError(_("'{name}' is the baseline; it cannot also be a follow-up").format(
                name=baseline.GetName()))
        if len({v.GetID() for v in followups}) != len(followups):
            raise ValueError(_("a follow-up volume is listed twice"))
        return [baseline] + followups

    def _runTrack(self, plan: TrackPlan, progress, cancel):
        """Registration and network (thread-safe: no scene access); each mask's bounding box is
        computed here too, so that the commit only copies small blocks."""
        from LesionLocatorLib.protocol import mask_bbox

        if plan.imageDigests is None:  # a new run: what its scans' voxels were (a correction checks them)
            plan.imageDigests = [voxelDigest(image) for image in plan.images]
        response = self._trackingRunner().track(plan.request, progress=lambda f, m: progress(0.9 * f, m),
                                                cancel=cancel)
        empty = (np.zeros(3, int), np.zeros(3, int))
        response.masks = [{lesion.lesionId: masks.get(lesion.lesionId) for lesion in plan.lesions}
                          for masks in response.masks]
        response.boxes = [{i: mask_bbox(m) if m is not None else empty for i, m in masks.items()}
                          for masks in response.masks]
        progress(0.9, _("building the results"))
        return response

    def _commitTrack(self, plan: TrackPlan, response):
        """A new tracking run into the scene; its review starts (an earlier run's corrections are
        gone: the lesions they added at follow-ups are removed from the follow-up segmentations)."""
        earlier = self.review
        outputs = self._writeTrack(plan, response)
        if earlier is not None and earlier.volumes[0] is plan.volumes[0]:
            keep = {lesion.lesionId for lesion in plan.lesions}
            self._removeTrackedLesions(earlier, [i for i in earlier.newLesionIds if i not in keep])
        self.review = review.ReviewSession(reviewPlan(plan), response, list(plan.imageKeys or []))
        return outputs

    def _writeTrack(self, plan: TrackPlan, response):
        """Write a tracking run's response (a new run, a corrected one or an earlier one on undo):
        follow-up segments in place, sequences, table and plot replaced in one step."""
        from LesionLocatorLib.study import date_order_warnings

        rows = [dict(row) for row in response.rows]
        byId = {lesion.lesionId: lesion for lesion in plan.lesions}
        for row in rows:
            volume = plan.volumes[row["index"]]
            row.update(name=byId[row["lesion_id"]].name, segment_id=results.segmentIdForLesion(row["lesion_id"]),
                       volume_node=volume.GetName(), study_date=scene.studyDateTime(volume) or "")
        masks = [{i: m if m is not None else np.zeros(plan.images[t].shape, bool) for i, m in byLesion.items()}
                 for t, byLesion in enumerate(response.masks)]
        status = {lesion.lesionId: list(response.status[lesion.lesionId]) for lesion in plan.lesions}
        built = trackoutputs.buildTrackOutputs(plan.baselineNode, plan.volumes, plan.images, plan.lesions, masks,
                                               status, rows, plan.targets, self._cancelToken or _NeverCancelled(),
                                               response.boxes)
        outputs = trackoutputs.commitTrackOutputs(built)
        outputs.response = response
        dates = [scene.studyDateTime(v) for v in plan.volumes]
        outputs.warnings = list(response.warnings) + [
            w for w in date_order_warnings([v.GetName() for v in plan.volumes], dates) if w not in response.warnings]
        for message in outputs.warnings:
            logging.warning(f"LesionLocator: {message}")
        self.lastTrack = outputs
        return outputs

    def lastTrackSummary(self) -> str:
        """One line about the last tracking run."""
        outputs = self.lastTrack
        if outputs is None:
            return ""
        counts = {s: sum(v[-1] == s for v in outputs.status.values()) for s in self.STATUSES}
        seconds = outputs.response.seconds if outputs.response is not None else 0.0
        return _("{n} lesion(s) tracked through {m} follow-up(s) in {seconds:.1f} s; at the last scan: {tracked} "
                 "tracked, {vanished} vanished, {outside} outside the scan").format(
            n=len(outputs.status), m=len(outputs.volumeNodes) - 1, seconds=seconds, tracked=counts["tracked"],
            vanished=counts["vanished"], outside=counts["outside"])

    def orderFollowUps(self, volumeNodes, order: str = "auto") -> list:
        """Follow-up volumes in time order: ``order='auto'``: by DICOM study date/time when every
        volume has one, else in load order; ``order='given'``: exactly as given."""
        import slicer

        from LesionLocatorLib.study import chronological_order

        volumes = [v for v in (volumeNodes or []) if v is not None]
        if order == "given":
            return volumes
        if order != "auto":
            raise ValueError(_("order must be 'auto' or 'given', got {order}").format(order=repr(order)))
        byDate = chronological_order([scene.studyDateTime(v) for v in volumes])
        if byDate is not None:
            return [volumes[i] for i in byDate]
        loadOrder = {n.GetID(): i for i, n in enumerate(slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"))}
        return sorted(volumes, key=lambda v: loadOrder.get(v.GetID(), len(loadOrder)))

    def _trackingRunner(self):
        """The runner when it can track; else (a runner without ``track``) an in-process one."""
        from LesionLocatorLib.runner import InProcessRunner

        if hasattr(self.runner, "track"):
            return self.runner
        if self._fallbackTrackRunner is None:
            logging.info("LesionLocator: the runner cannot track; tracking in this process")
            self._fallbackTrackRunner = InProcessRunner()
        return self._fallbackTrackRunner

    # ------------------------------------------------------------------ export and models
    exportTableToCsv = staticmethod(trackoutputs.exportTableToCsv)

    def exportSegmentations(self, folder, format="seg.nrrd", segmentationNodes=None) -> list:
        """Save segmentations (default: the last tracking run's timepoints, else every module result
        segmentation) as ``.seg.nrrd`` or ``.nii.gz`` (see :func:`.trackoutputs.exportSegmentations`)."""
        import slicer

        if segmentationNodes is None:
            tracked = [n for n in (self.lastTrack.segmentationNodes if self.lastTrack is not None else [])
                       if n.GetScene() is slicer.mrmlScene]
            segmentationNodes = tracked or [n for n in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
                                            if results.isResultNode(n)]
        return trackoutputs.exportSegmentations(segmentationNodes, folder, format)

    def exportDicom(self, folder, trackOutputs=None, fileForInstance=None):
        """Write each timepoint's lesions as a DICOM SEG (``<volume name>_seg.dcm``) and a TID 1500 SR
        (``<volume name>_sr.dcm``) on the DICOM series its volume was loaded from, through the
        library (the files ``--dicom-out`` writes); returns the library's ``DicomWritten`` (paths,
        warnings).

        Source: ``trackOutputs`` (default: the last tracking run while its nodes are in the
        scene): the baseline and every follow-up, the Tracking UIDs derived from the baseline's
        series; without one, every module result segmentation, each on its volume as one
        timepoint. Each volume needs its ``DICOM.instanceUIDs`` (set by Slicer's DICOM loader)
        and their files (``fileForInstance(uid) -> path``; default
        ``slicer.dicomDatabase.fileForInstance``), and must still have the series' voxel grid in
        its own frame: parent transforms on volumes are ignored (the SEG lies on the acquired
        slices). ValueError (nothing written) for a volume not loaded from DICOM, instances
        missing from the database, a volume resampled/cropped/moved after loading, nothing to
        export. See :mod:`.dicomexport`."""
        studies = ([dicomexport.trackStudy(trackOutputs)] if trackOutputs is not None
                   else dicomexport.defaultStudies(self.lastTrack))
        return dicomexport.exportDicom(folder, studies, fileForInstance)

    def selectModel(self, model) -> str:
        """Make ``model`` the module's model (parameter ``ModelPath``): a name from
        :func:`.models.availableModels` (e.g. 'lesionlocator' once downloaded) or a folder."""
        path = models.resolveModel(model)
        self.getParameterNode().SetParameter(PARAM_MODEL_PATH, path)
        return path

    def downloadModel(self, name=None, progress=None, cancel=None, baseUrl=None):
        """Download a known model (default: the official checkpoint) with the zoo, select it and return
        its model root. Blocks; see :func:`.models.downloadModel` for errors (nothing is installed
        or selected then; an interrupted download resumes next time)."""
        from LesionLocatorLib.cancel import CancelToken

        token = CancelToken(cancel)
        self._cancelToken = token
        try:
            root = models.downloadModel(name, progress, token, baseUrl)
        finally:
            self._cancelToken = None
        self.selectModel(str(root))
        return root

    def downloadJob(self, name=None, baseUrl=None, done=None, failed=None, cancelled=None) -> Job:
        """The GUI's form of :meth:`downloadModel`: the download on the background thread, the
        model selected on the main thread."""
        def commit(plan, root):
            self.selectModel(str(root))
            return root
        return Job(_("Downloading"),
                   lambda plan, progress, cancel: models.downloadModel(name, progress, cancel, baseUrl),
                   commit=commit, done=done or (lambda root: None), failed=failed or (lambda error: None),
                   cancelled=cancelled or (lambda: None))

    # ------------------------------------------------------------------ blocking runs
    def _runBlocking(self, plan, work, commit, progress, cancel):
        """A console call: ``work`` in this thread with progress and Cancel, then ``commit``."""
        from LesionLocatorLib.cancel import CancelToken

        report = progress or (lambda fraction, message: None)
        token = CancelToken(cancel)
        self._cancelToken = token
        try:
            result = work(plan, report, token)
            token.check()
            value = commit(plan, result)
        finally:
            self._cancelToken = None
        summary = (self.lastTrackSummary() if isinstance(plan, TrackPlan) else
                   self.lastCorrectionSummary() if isinstance(plan, CorrectionPlan) else self.lastRunSummary())
        report(1.0, summary)
        return value


def _startupEnvironment():
    """Slicer's environment from before its launcher changed it (what ``launchConsoleProcess`` gives the
    processes it starts; ``PythonSlicer`` sets up its own), or None (this process's) outside Slicer."""
    import slicer

    try:
        return dict(slicer.util.startupEnvironment())
    except Exception:  # noqa: BLE001 - no Slicer application (scripts, tests): inherit this environment
        return None


class _NeverCancelled:
    def check(self) -> None:
        pass
