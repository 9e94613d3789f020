"""The Logic's review of a tracking run (:class:`ReviewLogic`, a part of
:class:`~LesionLocatorSlicer.logic.LesionLocatorLogic`): the lesions x scans cells, showing a lesion
in a scan, and corrections (point, box, moved point, vanished, new lesion) that re-propagate one
lesion with the first run's registrations, each one undo step. The review state itself is
:class:`~LesionLocatorSlicer.review.ReviewSession`; RAS <-> LPS happens in :mod:`.scene` only.
"""
from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass

import numpy as np

from slicer.i18n import tr as _

from . import results, review, scene, trackoutputs
from .jobs import Job


@dataclass
class CorrectionPlan:
    """A correction of the last tracking run read from the scene (main thread): the review
    session it corrects, the tracking plan that re-commits the run (same volumes and follow-up
    nodes, the lesions with any new one), the new correction and every correction sent."""
    session: object
    track: object  # the TrackPlan that re-commits the run
    correction: object
    corrections: list
    kind: str


class ReviewLogic:
    """The review and correction methods of the Logic (mixed into ``LesionLocatorLogic``, whose
    runner, undo stack, ``review`` and ``_writeTrack`` they use)."""

    def _requireReview(self):
        import slicer

        session = self.review
        if session is None:
            raise ValueError(_("no tracking run to review: track the lesions first"))
        for node in session.volumes + [session.plan.baselineNode]:
            if node.GetScene() is not slicer.mrmlScene:
                raise ValueError(_("'{name}' of the last tracking run was removed from the scene: track again").format(
                    name=node.GetName()))
        return session

    def reviewCells(self) -> list:
        """The last tracking run, lesion by lesion (rows) and scan by scan (t = 0 the baseline): one
        :class:`.review.ReviewCell` each with its status ('tracked', 'vanished', 'outside', and
        after corrections 'new' / 'absent'), its volume (ml) and whether it was reviewed
        ('accepted' / 'corrected'). [] before any tracking run."""
        return self.review.cells() if self.review is not None else []

    def lesionPosition(self, lesionId: int, timepoint: int) -> np.ndarray:
        """Where to look at lesion ``lesionId`` on scan ``timepoint`` (0 = baseline), Slicer world
        RAS mm, shape (3,): the centre of its voxels there (through the volume's parent
        transforms as they are now); for an empty mask (vanished, outside, absent) the centre of
        its last earlier non-empty mask, else of its next later one (a lesion new at a later
        scan), else the scan's centre. ValueError for a lesion or scan not in the run."""
        session = self._requireReview()
        t, kji = session.positionIndex(int(lesionId), int(timepoint))
        return scene.indexToWorldRas(scene.volumeGrid(session.volumes[t]), kji)

    def showLesion(self, lesionId: int, timepoint: int) -> np.ndarray:
        """Show lesion ``lesionId`` on scan ``timepoint``: every slice view gets that scan as its
        background, only that scan's lesion segmentation is shown, the tracking's sequence browser
        goes to that timepoint, and all slice views (every view group) are centred on
        :meth:`lesionPosition`. Works on whatever slice views the scene has (none without a
        layout: then only the display state changes). Returns the position (world RAS mm)."""
        import slicer

        position = self.lesionPosition(lesionId, timepoint)
        session, timepoint = self.review, int(timepoint)
        volume = session.volumes[timepoint]
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            composite.SetBackgroundVolumeID(volume.GetID())
        outputs = self.lastTrack
        if outputs is not None:
            for t, node in enumerate(outputs.segmentationNodes):
                if node is not None and node.GetScene() is slicer.mrmlScene and node.GetDisplayNode() is not None:
                    node.GetDisplayNode().SetVisibility(t == timepoint)
            browser = outputs.browserNode
            if browser is not None and browser.GetScene() is slicer.mrmlScene:
                browser.SetSelectedItemNumber(timepoint)
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *(float(v) for v in position),
                                              slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return position

    def acceptCell(self, lesionId: int, timepoint: int) -> None:
        """Mark lesion ``lesionId`` on scan ``timepoint`` as reviewed and right (nothing runs)."""
        self._requireReview().accept(int(lesionId), int(timepoint))

    def correctTracking(self, lesionId, timepoint: int, kind: str, promptNode=None, progress=None, cancel=None):
        """Correct the last tracking run at follow-up scan ``timepoint`` (1 = first follow-up) and
        re-propagate the lesion through the later scans; returns the new
        :class:`~.trackoutputs.TrackOutputs`. Blocks.

        ``kind``: 'point' / 'box': segment lesion ``lesionId`` there again from ``promptNode`` (a
        point list -- its last placed control point --, a ``(point list, index)`` pair, or an ROI;
        RAS under any parent transforms, converted by :mod:`.scene`); 'moved': verified tracking --
        the lesion's tracked mask from the scan before, warped onto this scan, is moved so that its
        centre lands on the point of ``promptNode`` and segmented there with the tracking model
        (keeps the lesion's shape and size, fixes where registration put it); 'vanished': the lesion is
        gone from that scan on (no prompt); 'new': a lesion first seen at that scan, from a point
        or an ROI, with ``lesionId`` an unused ID or None (the smallest free one; it is
        ``logic.review.lastCorrection.lesion`` afterwards): 'absent' before, 'new' there, tracked
        after. Only the corrected lesion changes, and only from that scan on: nothing is
        registered or tracked again (the first run's registrations are reused with every
        correction made so far, :func:`LesionLocatorLib.correct.retrack`); a new correction of the
        same lesion and scan replaces the earlier one. The follow-up segments, sequences, lesion
        table and plot are replaced in one step, which :meth:`undo` reverts. Raises the library's
        errors (``PromptError`` for a prompt outside the scan, the remote server's refusal),
        ``ValueError`` for a wrong lesion, scan or prompt, ``Cancelled``; the scene is then
        unchanged."""
        plan = self._prepareCorrection(lesionId, timepoint, kind, promptNode)
        return self._runBlocking(plan, self._runCorrection, self._commitCorrection, progress, cancel)

    def correctionJob(self, lesionId, timepoint: int, kind: str, promptNode=None, done=None, failed=None,
                      cancelled=None) -> Job:
        """The GUI's form of :meth:`correctTracking`: a :class:`Job` for a :class:`~.jobs.JobQueue`
        (the prompt is read when the job starts)."""
        prepare = lambda: self._prepareCorrection(lesionId, timepoint, kind, promptNode)  # noqa: E731
        return Job(_("Correcting the tracking"), self._runCorrection, prepare, self._commitCorrection, None,
                   done or (lambda outputs: None), failed or (lambda error: None), cancelled or (lambda: None))

    def _prepareCorrection(self, lesionId, timepoint, kind, promptNode) -> CorrectionPlan:
        from LesionLocatorLib.correct import Correction

        session = self._requireReview()
        if kind not in review.CORRECTION_KINDS:
            raise ValueError(_("unknown correction {kind}; choose one of {kinds}").format(
                kind=repr(kind), kinds=", ".join(review.CORRECTION_KINDS)))
        self._requireDependencies()
        n = session.timepoints
        if isinstance(timepoint, bool) or not isinstance(timepoint, (int, np.integer)) or not 0 <= timepoint < n:
            raise ValueError(_("timepoint {t} is not a scan of the last tracking run (0..{last})").format(
                t=repr(timepoint), last=n - 1))
        timepoint = int(timepoint)
        if timepoint == 0:
            raise ValueError(_("the baseline '{name}' is corrected by segmenting the lesion there again (click it or "
                               "refine its segment), then tracking again; corrections are for follow-up scans").format(
                name=session.volumes[0].GetName()))
        if kind == "new":
            occupied = self._occupiedLesionIds(session)
            if lesionId is None:
                lesionId = session.newLesionId(occupied)
            elif int(lesionId) in set(session.lesionIds) | set(session.base.status) | occupied:
                raise ValueError(_("lesion ID {id} is taken; a new lesion needs an ID of its own").format(id=lesionId))
        else:
            session.checkCell(int(lesionId), timepoint)
        lesionId = int(lesionId)
        prompt = None
        if kind != "vanished":
            spec = scene.promptsFromNodes(promptNode)[-1]
            wanted = {"point": ("point",), "moved": ("point",), "box": ("box",), "new": ("point", "box")}[kind]
            if spec.kind not in wanted:
                raise ValueError(_("a '{kind}' correction needs a {wanted} prompt, got a {got}").format(
                    kind=kind, wanted=" or ".join(wanted), got=spec.kind))
            prompt = spec.toLibrary(lesionId)
        correction = Correction(lesionId, timepoint, prompt, vanished=kind == "vanished", new=kind == "new",
                                moved=kind == "moved")
        corrections = session.withCorrection(correction)
        lesions = list(session.lesions)
        if lesionId not in session.lesionIds:
            lesions.append(results.BaselineLesion(results.segmentIdForLesion(lesionId), lesionId,
                                                  _("Lesion {id}").format(id=lesionId),
                                                  tuple(float(c) for c in results.colorForLesion(lesionId)), None))
        images = self._unchangedImages(session)
        targets = [trackoutputs.trackTarget(v, lesions) for v in session.volumes[1:]]  # raises before any change
        base = session.plan
        if session.base.tracked is None and not self.isRemote:
            raise ValueError(_("the last tracking run came from a LesionLocator server, which keeps no registrations: "
                               "track on this computer, then correct"))
        request = dataclasses.replace(base.request, images=images, baseline={}, corrections=corrections,
                                      previous=session.base.tracked, id=uuid.uuid4().hex)
        plan = dataclasses.replace(base, images=images, lesions=lesions, targets=targets, request=request)
        return CorrectionPlan(session, plan, correction, corrections, kind)

    def _occupiedLesionIds(self, session) -> set:
        """Lesion IDs whose segment ``lesion_<id>`` exists in the run's segmentations (a new lesion
        must not take one: tracking never writes over a segment it did not make)."""
        nodes = [session.plan.baselineNode] + [results.resultNodeForVolume(v) for v in session.volumes[1:]]
        occupied = set()
        for node in nodes:
            if node is None:
                continue
            for segmentId in node.GetSegmentation().GetSegmentIDs():
                lesionId = results.lesionIdOfSegmentId(segmentId)
                if lesionId is not None:
                    occupied.add(lesionId)
        return occupied - set(session.lesionIds)

    def _unchangedImages(self, session) -> list:
        """The run's scans read again (LPS world); ValueError when one changed since it was
        tracked (voxels, geometry or transform): the run's registrations would not fit it. The
        voxels are compared by digest only when the volume was marked modified since."""
        images = []
        digests = session.plan.imageDigests or [None] * session.timepoints
        for t, volume in enumerate(session.volumes):
            image = scene.volumeToImage(volume)
            key = scene.imageKey(volume, image)
            if session.imageKeys and key != session.imageKeys[t] and (
                    key.split(":", 2)[2] != session.imageKeys[t].split(":", 2)[2]
                    or digests[t] is None or voxelDigest(image) != digests[t]):
                raise ValueError(_("'{name}' changed since it was tracked (its voxels or its position): track again, "
                                   "then correct").format(name=volume.GetName()))
            images.append(image)
        return images

    def _runCorrection(self, plan: CorrectionPlan, progress, cancel):
        """The runner applies every correction to the first run (thread-safe: no scene access)."""
        response = self._runTrack(plan.track, progress, cancel)
        response.tracked = None  # corrections always start from the first run's (plan.session.base.tracked)
        plan.session.shareUnchanged(response, plan.corrections)
        return response

    def _commitCorrection(self, plan: CorrectionPlan, response):
        session = plan.session
        if self.review is not session:
            raise ValueError(_("the lesions were tracked again meanwhile: correct the new run"))
        before = session.snapshot()
        outputs = self._writeTrack(plan.track, response)
        session.applied(plan.correction, plan.corrections, response, plan.track.lesions)
        self._undo.append(review.ReviewEdit(session, before, self._restoreReview))
        return outputs

    def _restoreReview(self, session, snapshot) -> str:
        """Undo a correction: write the response from before it (segments, table and plot in one step)."""
        if self.review is not session:
            raise ValueError(_("nothing undone: the lesions were tracked again since that correction"))
        self._requireReview()
        kept = {lesion.lesionId for lesion in snapshot.lesions}
        removed = [i for i in session.lesionIds if i not in kept]
        targets = [trackoutputs.trackTarget(v, snapshot.lesions) for v in session.volumes[1:]]
        plan = dataclasses.replace(session.plan, lesions=list(snapshot.lesions), targets=targets)
        self._writeTrack(plan, snapshot.response)
        self._removeTrackedLesions(session, removed)
        correction = session.lastCorrection
        session.restore(snapshot)
        if correction is None:
            return _("restored the tracking run")
        return _("correction of lesion {id} at '{scan}'").format(id=correction.lesion,
                                                                  scan=session.volumes[correction.timepoint].GetName())

    def _removeTrackedLesions(self, session, lesionIds) -> None:
        """Remove lesions a correction added from the run's follow-up segmentations (only segments
        tracking made from this baseline)."""
        for volume in session.volumes[1:]:
            node = results.resultNodeForVolume(volume)
            if node is not None:
                for lesionId in lesionIds:
                    trackoutputs.removeTrackedSegment(node, session.plan.baselineNode, lesionId)

    def lastCorrectionSummary(self) -> str:
        """One line about the last correction."""
        session = self.review
        correction = session.lastCorrection if session is not None else None
        if correction is None:
            return ""
        statuses = session.response.status[correction.lesion][correction.timepoint:]
        return _("Lesion {id} corrected at '{scan}' ({kind}); from there on: {statuses}").format(
            id=correction.lesion, scan=session.volumes[correction.timepoint].GetName(),
            kind="new" if correction.new else correction.kind, statuses=", ".join(statuses))


def voxelDigest(image) -> str:
    """A digest of an Image's voxels (dtype, shape and bytes)."""
    import hashlib

    array = np.ascontiguousarray(image.array)
    digest = hashlib.blake2b(f"{array.dtype.str}{array.shape}".encode(), digest_size=16)
    digest.update(array.view(np.uint8).reshape(-1))
    return digest.hexdigest()


def reviewPlan(plan):
    """The plan a review keeps: voxel-less grids instead of the scans (read again for a
    correction), no baseline masks (the run's response has them)."""
    grids = [image.with_array(np.broadcast_to(np.zeros((), bool), image.shape)) for image in plan.images]
    lesions = [dataclasses.replace(lesion, mask=None) for lesion in plan.lesions]
    return dataclasses.replace(plan, images=grids, lesions=lesions,
                               request=dataclasses.replace(plan.request, images=[], baseline={}))
