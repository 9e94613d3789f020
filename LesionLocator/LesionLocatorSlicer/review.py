"""Review of a tracked study: the state of the last tracking run while the user checks it lesion by
lesion and scan by scan (Qt-free, no scene writes).

A :class:`ReviewSession` starts with every tracking run (:meth:`LesionLocatorLogic.track`). It keeps

* the run's first, uncorrected response (``base``): its ``tracked`` result is the ``previous`` of
  every correction request, so nothing is registered or tracked again;
* the corrections so far, one per lesion and scan (a new one for the same lesion and scan replaces
  the old one); each correction request carries all of them (:meth:`ReviewSession.request`), so the
  result never depends on the order they were made in;
* the response shown now (``response``: the base, or the last corrected run), the lesions it has
  (the baseline's and the new ones added at a follow-up) and which cells the user has reviewed
  ('accepted' or 'corrected').

Cells: one per lesion and timepoint (t = 0 is the baseline). Volumes are millilitres; voxel
positions are (k, j, i) = (z, y, x) indices of the scan's library Image (LPS world); the scene
conversion to RAS is :func:`.scene.indexToWorldRas`. Undo (:class:`ReviewEdit`) puts back a
:class:`ReviewSnapshot` taken before a correction.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

REVIEW_ACCEPTED, REVIEW_CORRECTED = "accepted", "corrected"
CORRECTION_KINDS = ("point", "box", "moved", "vanished", "new")


@dataclass(frozen=True)
class ReviewCell:
    """One lesion at one scan: ``status`` (tracked / vanished / outside / new / absent),
    ``volumeMl`` (ml, 0 for an empty mask), ``review`` ('' not reviewed yet, 'accepted' or
    'corrected'), ``volumeName``: the scan's volume node name."""
    lesionId: int
    name: str
    timepoint: int
    volumeName: str
    status: str
    volumeMl: float
    review: str = ""

    @property
    def text(self) -> str:
        """What the review table shows: 'status, 1.23 ml' (and a mark once reviewed)."""
        text = f"{self.status}, {self.volumeMl:.2f} ml"
        return text + {REVIEW_ACCEPTED: " \u2713", REVIEW_CORRECTED: " \u270e"}.get(self.review, "")


@dataclass
class ReviewSnapshot:
    """What a correction changes in a session, to put it back (undo)."""
    response: object
    lesions: list
    corrections: dict
    reviewed: dict
    lastCorrection: object


@dataclass
class ReviewSession:
    """The review state of one tracking run (see the module docstring).

    ``plan``: the run's :class:`~.logic.TrackPlan` with its images replaced by voxel-less grids
    (geometry only: the voxels are read from the volumes again for a correction, after checking
    with ``imageKeys`` that they did not change); ``base``: its first
    :class:`LesionLocatorLib.runner.TrackResponse`; ``response``: the one shown now;
    ``lesions``: :class:`~.results.BaselineLesion` s in table order (new lesions after the
    baseline's, with an empty mask); ``corrections``: ``{(lesion ID, timepoint): Correction}``;
    ``reviewed``: ``{(lesion ID, timepoint): 'accepted' | 'corrected'}``."""
    plan: object
    base: object
    imageKeys: list
    response: object = None
    lesions: list = None
    corrections: dict = field(default_factory=dict)
    reviewed: dict = field(default_factory=dict)
    lastCorrection: object = None

    def __post_init__(self):
        if self.response is None:
            self.response = self.base
        if self.lesions is None:
            self.lesions = list(self.plan.lesions)

    # ------------------------------------------------------------------ reading
    @property
    def volumes(self) -> list:
        return self.plan.volumes

    @property
    def timepoints(self) -> int:
        return len(self.plan.volumes)

    @property
    def lesionIds(self) -> list:
        return [lesion.lesionId for lesion in self.lesions]

    @property
    def newLesionIds(self) -> list:
        """IDs of the lesions added at a follow-up (not in the baseline run)."""
        return [i for i in self.lesionIds if i not in self.base.status]

    def lesion(self, lesionId: int):
        for lesion in self.lesions:
            if lesion.lesionId == lesionId:
                return lesion
        raise ValueError(f"lesion {lesionId} is not in this tracking run (it has {self.lesionIds})")

    def checkCell(self, lesionId: int, timepoint: int) -> None:
        """ValueError unless the lesion is in the run and ``timepoint`` is one of its scans."""
        self.lesion(lesionId)
        if isinstance(timepoint, bool) or not isinstance(timepoint, (int, np.integer)) \
                or not 0 <= timepoint < self.timepoints:
            raise ValueError(f"timepoint {timepoint!r} is not a scan of this tracking run (0..{self.timepoints - 1})")

    def status(self, lesionId: int, timepoint: int) -> str:
        return self.response.status[lesionId][timepoint]

    def mask(self, lesionId: int, timepoint: int):
        """The lesion's bool (z, y, x) mask on scan ``timepoint`` (None when it has none)."""
        return self.response.masks[timepoint].get(lesionId)

    def cells(self) -> list:
        """One :class:`ReviewCell` per lesion and timepoint, lesion by lesion in table order."""
        rows = {(row["lesion_id"], row["index"]): row for row in self.response.rows}
        out = []
        for lesion in self.lesions:
            for t, volume in enumerate(self.volumes):
                row = rows.get((lesion.lesionId, t), {})
                out.append(ReviewCell(lesion.lesionId, lesion.name, t, volume.GetName(),
                                      self.response.status[lesion.lesionId][t], float(row.get("volume_ml") or 0.0),
                                      self.reviewed.get((lesion.lesionId, t), "")))
        return out

    def positionIndex(self, lesionId: int, timepoint: int) -> tuple:
        """(scan, (k, j, i) fractional voxel index) to centre the views on for a cell: the centre of
        the lesion's voxels on scan ``timepoint``; for an empty mask (vanished, outside, absent)
        the last earlier scan where it has voxels, else the next later one, else the centre of
        scan ``timepoint``."""
        self.checkCell(lesionId, timepoint)
        order = [timepoint] + list(range(timepoint - 1, -1, -1)) + list(range(timepoint + 1, self.timepoints))
        for t in order:
            mask = self.mask(lesionId, t)
            if mask is not None and mask.any():
                return t, tuple(float(v) for v in np.argwhere(mask).mean(axis=0))
        shape = self.plan.images[timepoint].shape
        return timepoint, tuple((n - 1) / 2.0 for n in shape)

    # ------------------------------------------------------------------ changing
    def accept(self, lesionId: int, timepoint: int) -> None:
        self.checkCell(lesionId, timepoint)
        self.reviewed[(lesionId, timepoint)] = REVIEW_ACCEPTED

    def newLesionId(self, occupied=()) -> int:
        """The smallest lesion ID not in this run and not in ``occupied`` (IDs whose segment
        ``lesion_<id>`` is taken in one of the run's segmentations)."""
        taken = set(self.lesionIds) | set(self.base.status) | set(occupied)
        lesionId = 1
        while lesionId in taken:
            lesionId += 1
        return lesionId

    def withCorrection(self, correction) -> list:
        """Every correction of the session with ``correction`` added (replacing one for the same
        lesion and scan), in a stable order, each lesion's ``new`` flag set the library's way: a
        lesion not in the base run is new at its first corrected scan only."""
        merged = dict(self.corrections)
        merged[(int(correction.lesion), int(correction.timepoint))] = correction
        return normalised(merged, self.base.status)

    def snapshot(self) -> ReviewSnapshot:
        return ReviewSnapshot(self.response, list(self.lesions), dict(self.corrections), dict(self.reviewed),
                              self.lastCorrection)

    def restore(self, snapshot: ReviewSnapshot) -> None:
        self.response, self.lesions = snapshot.response, list(snapshot.lesions)
        self.corrections, self.reviewed = dict(snapshot.corrections), dict(snapshot.reviewed)
        self.lastCorrection = snapshot.lastCorrection

    def applied(self, correction, corrections: list, response, lesions: list) -> None:
        """A correction's run was committed: it is the response shown now. The corrected cell is
        'corrected'; the lesion's later cells changed, so they are not reviewed any more."""
        self.response, self.lesions = response, list(lesions)
        self.corrections = {(c.lesion, c.timepoint): c for c in corrections}
        lesionId, t = int(correction.lesion), int(correction.timepoint)
        for u in range(t + 1, self.timepoints):
            self.reviewed.pop((lesionId, u), None)
        self.reviewed[(lesionId, t)] = REVIEW_CORRECTED
        self.lastCorrection = correction

    def shareUnchanged(self, response, corrections: list) -> None:
        """Memory: the masks a correction cannot change (a lesion before its first corrected scan,
        every lesion never corrected) are replaced by the base run's arrays when they are equal
        (the library keeps them bit for bit; a worker sends copies). Runs on the worker thread."""
        first = {}
        for c in corrections:
            first[c.lesion] = min(first.get(c.lesion, c.timepoint), c.timepoint)
        for t, masks in enumerate(response.masks):
            for lesionId, mask in masks.items():
                if lesionId in first and t >= first[lesionId]:
                    continue
                old = self.base.masks[t].get(lesionId)
                if old is not None and mask is not None and old is not mask and np.array_equal(old, mask):
                    masks[lesionId] = old
                    if getattr(response, "boxes", None) is not None and getattr(self.base, "boxes", None) is not None:
                        response.boxes[t][lesionId] = self.base.boxes[t][lesionId]


def normalised(corrections: dict, baseStatus: dict) -> list:
    """``{(lesion, timepoint): Correction}`` -> a list ordered by lesion then scan, with ``new`` set
    exactly on the first correction of each lesion that is not in the base run."""
    first = {}
    for lesionId, t in corrections:
        first[lesionId] = min(first.get(lesionId, t), t)
    out = []
    for (lesionId, t), c in sorted(corrections.items()):
        isNew = lesionId not in baseStatus and t == first[lesionId]
        out.append(c if c.new == isNew else dataclasses.replace(c, new=isNew))
    return out


@dataclass
class ReviewEdit:
    """One correction on the Logic's undo stack: ``undo()`` calls ``restore(session, before)``
    (the Logic re-commits the earlier response: segments, table, plot in one step)."""
    session: ReviewSession
    before: ReviewSnapshot
    restore: Callable[[ReviewSession, ReviewSnapshot], str]

    def undo(self) -> str:
        return self.restore(self.session, self.before)
