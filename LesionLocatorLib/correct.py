"""Correcting a tracked study: :func:`retrack` applies a user's :class:`Correction` s to a
:class:`~LesionLocatorLib.track.TrackResult` and re-propagates only what they change.

A correction fixes one lesion at one follow-up scan ``t`` (1 = the first follow-up):

* a **point** or **box** (:class:`~LesionLocatorLib.prompts.Point`/``Box``, LPS mm on scan t):
  the lesion is segmented there with the point or box model;
* a **mask** (:class:`~LesionLocatorLib.prompts.MaskPrompt` on scan t, e.g. an edited segment):
  segmented there with the tracking model from that mask, as "Refine from segment" does;
* a **moved** point (a Point with ``moved=True``): verified tracking after the fact. The lesion's
  mask on scan t-1 (as corrected so far) is warped onto scan t, translated so that its centre
  lands on the point, and segmented with the tracking model
  (:func:`~LesionLocatorLib.track.verified_prompts`): the result verified tracking gives when the
  user moves the proposed point of that lesion at scan t there;
* **vanished**: the lesion is gone from scan t on (empty, status ``vanished`` at t and after);
* a **new lesion** (an ID the study does not have, with a point, box or mask): a lesion first
  seen at scan t. It is ``absent`` before t, ``new`` at t, and tracked forward from there.
  RECIST counts it (:func:`LesionLocatorLib.measure.lesion_measurements`: PD at t).

From the corrected scan on, each corrected lesion is re-propagated through the later scans
exactly as :func:`~LesionLocatorLib.track.track` does (:func:`~LesionLocatorLib.track.follow_up`:
the previous mask warped, segmented with the tracking model, the same ``min_volume_ml`` and
``min_prompt_fraction`` rules), with the registrations of the earlier run (no registration
runs: a correction costs one network run per later scan, all corrected lesions in one batch).
Earlier scans and every other lesion keep their masks, statuses and labels bit for bit.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .prompts import Box, MaskPrompt, Point, PromptError
from .track import TrackResult, follow_up, labels_from_masks, paint_labels


@dataclass(frozen=True)
class Correction:
    """``lesion``: the lesion ID (an ID the study does not have adds a new lesion);
    ``timepoint``: the scan's index (1..n-1; 0 is the baseline, corrected by segmenting it again);
    ``prompt``: a Point or Box (LPS mm) or a MaskPrompt on that scan, or None with ``vanished``;
    ``new``: True for a lesion first seen at this scan (an ID the study does not have; saying so
    keeps a mistyped ID from becoming a new lesion); ``moved``: the Point is where the tracked
    mask belongs (verified tracking), not a click for the point model."""
    lesion: int
    timepoint: int
    prompt: Optional[object] = None
    vanished: bool = False
    new: bool = False
    moved: bool = False

    @property
    def kind(self) -> str:
        """'vanished', 'point', 'box', 'mask' or 'moved'."""
        if self.vanished:
            return "vanished"
        if self.moved:
            return "moved" if isinstance(self.prompt, Point) else "?"
        return {Point: "point", Box: "box", MaskPrompt: "mask"}.get(type(self.prompt), "?")


def check_corrections(corrections, previous: TrackResult, n_images: int) -> dict:
    """``{lesion id: {timepoint: Correction}}``, every correction checked against the earlier run:
    a follow-up index, exactly one of prompt and vanished, one correction per lesion and scan,
    a new lesion (an ID not in ``previous``) with a prompt and no earlier correction.
    Raises :class:`~LesionLocatorLib.prompts.PromptError` naming the lesion and scan."""
    out: dict = {}
    for c in corrections:
        where = f"correction of lesion {c.lesion} at scan {c.timepoint}"
        if isinstance(c.lesion, bool) or not isinstance(c.lesion, (int, np.integer)) or not 1 <= c.lesion <= 65535:
            raise PromptError(f"{where}: a lesion ID is an integer 1..65535")
        if isinstance(c.timepoint, bool) or not isinstance(c.timepoint, (int, np.integer)) \
                or not 1 <= c.timepoint < n_images:
            raise PromptError(f"{where}: the scan must be a follow-up, 1..{n_images - 1} (the baseline is corrected "
                              f"by segmenting it again)")
        if c.vanished == (c.prompt is not None) or c.kind == "?":
            raise PromptError(f"{where}: give a point, a box or a mask on that scan, or vanished, and only one "
                              f"(a moved point is a Point)")
        if c.prompt is not None and c.prompt.id != c.lesion:
            raise PromptError(f"{where}: its prompt has ID {c.prompt.id}; a correction's prompt carries the "
                              f"lesion's ID")
        if c.timepoint in out.get(c.lesion, {}):
            raise PromptError(f"{where}: given twice")
        out.setdefault(int(c.lesion), {})[int(c.timepoint)] = c
    for pid, per in out.items():
        first, later = per[min(per)], [c for t, c in per.items() if t != min(per)]
        where = f"correction of lesion {pid} at scan {first.timepoint}"
        if pid in previous.status and first.new:
            raise PromptError(f"{where}: lesion {pid} is already in the study; a new lesion needs an ID of its own")
        if pid not in previous.status and not first.new:
            raise PromptError(f"{where}: lesion {pid} is not in the study (it has {_ids(previous)}); to add a lesion "
                              f"first seen at this scan, mark it new")
        if first.new and first.kind in ("vanished", "moved"):
            raise PromptError(f"{where}: a new lesion needs a point, box or mask at its first scan, not "
                              f"'{first.kind}' (it has no earlier mask to move)")
        again = [c.timepoint for c in later if c.new]
        if again:
            raise PromptError(f"lesion {pid}: marked new at scan {min(again)}, after a correction at scan "
                              f"{first.timepoint}; a lesion is new once, at its first scan")
    return out


def _ids(previous: TrackResult) -> str:
    ids = sorted(previous.status)
    return "lesions " + ", ".join(map(str, ids[:20])) + (", ..." if len(ids) > 20 else "") if ids else "no lesion"


def retrack(images, previous: TrackResult, corrections, track_model, seg_model=None, progress=None,
            cancel=None, min_volume_ml: float = 0.0, min_prompt_fraction: float = 0.0) -> TrackResult:
    """``previous`` (a :func:`~LesionLocatorLib.track.track` result on the same ``images``) with
    ``corrections`` applied (see the module docstring); a new TrackResult, ``previous`` unchanged.

    ``track_model``: the model taking previous-mask prompts (as for ``track``); ``seg_model``: the
    point or box model for point/box corrections, or ``{"point": model, "box": model}``. The
    options are ``track``'s and should be the ones of the earlier run."""
    images = list(images)
    n = len(images)
    if len(previous.masks) != n or len(previous.transforms) != n - 1:
        raise ValueError(f"the earlier run has {len(previous.masks)} scans and {len(previous.transforms)} "
                         f"registrations; these images are {n} scans")
    todo = check_corrections(list(corrections), previous, n)
    if not todo:
        return previous
    report = progress or (lambda f, m: None)
    timings = {"registration": 0.0, "warping": 0.0, "preprocessing": 0.0, "network": 0.0, "postprocessing": 0.0}
    masks = [dict(m) for m in previous.masks]
    labels = list(previous.labels) or [labels_from_masks(image, m) for image, m in zip(images, previous.masks)]
    status = {pid: list(s) for pid, s in previous.status.items()}
    fractions = {pid: list(previous.inside_fraction.get(pid, [None] * n)) for pid in previous.status}
    first = {pid: min(per) for pid, per in todo.items()}
    for pid, t in first.items():  # the corrected lesions' history is cut at their first correction
        if pid not in status:
            status[pid], fractions[pid] = ["absent"] * t, [None] * t
            for u in range(t):
                masks[u][pid] = np.zeros(images[u].shape, bool)
        del status[pid][t:], fractions[pid][t:]
    carried: dict = {}
    start = min(first.values())
    for t in range(start, n):
        if cancel is not None:
            cancel.check()
        report(t / n, f"scan {t}: corrections")
        corrected = {pid: per[t] for pid, per in todo.items() if t in per}
        followed = [pid for pid, t0 in first.items() if t0 < t and pid not in corrected]
        now, carried_next = {}, {}
        if followed:
            now, _, carried_next = follow_up(t, images, previous.transforms[t - 1], carried, status, fractions,
                                             track_model, timings, report, cancel, min_volume_ml,
                                             min_prompt_fraction, lesions=followed)
        moved = {pid: _moved_prompt(t, images, masks[t - 1].get(pid), previous.transforms[t - 1], c.prompt)
                 for pid, c in corrected.items() if c.kind == "moved"}
        fixed = _apply(t, images[t], corrected, previous, status, fractions, track_model, seg_model, timings,
                       cancel, moved) if corrected else {}
        now.update(fixed)
        carried = {**carried_next, **{pid: m for pid, m in fixed.items() if m.any()}}
        for pid, mask in now.items():
            masks[t][pid] = mask
        labels[t] = paint_labels(labels[t], now)
    report(1.0, "done")
    points = {(t, pid): p for (t, pid), p in previous.points.items() if not (pid in first and t >= first[pid])}
    return TrackResult(masks, labels, status, list(previous.transforms), timings, fractions, points)


def _moved_prompt(t: int, images, before, transform, point) -> MaskPrompt:
    """A moved-point correction's prompt on scan t: the lesion's mask ``before`` on scan t-1
    warped by ``transform`` and translated onto ``point`` (:func:`~LesionLocatorLib.track.verified_prompts`)."""
    from .track import verified_prompts, warp_lesion

    where = f"moved point of lesion {point.id} at scan {t}"
    if before is None or not before.any():
        raise PromptError(f"{where}: the lesion has no mask at scan {t - 1} to move; correct it with a point or box")
    warped = warp_lesion(before, images[t - 1], images[t], transform)[0]
    if warped is None:
        raise PromptError(f"{where}: its mask at scan {t - 1} maps outside scan {t}; correct it with a point or box")
    prompt = MaskPrompt(point.id, images[t].with_array(warped))
    return verified_prompts(t, images[t], [prompt], lambda _t, _proposals: {point.id: point})[0]


def _apply(t: int, image, corrected: dict, previous: TrackResult, status: dict, fractions: dict, track_model,
           seg_model, timings: dict, cancel, moved: dict | None = None) -> dict:
    """The corrected lesions' masks at scan t ({id: bool}); their status and fraction appended.
    ``moved``: the prompts of moved-point corrections (:func:`_moved_prompt`)."""
    from .predict import segment

    out = {}
    groups = {"point": [], "box": [], "mask": []}
    for pid, c in sorted(corrected.items()):
        if c.vanished:
            out[pid] = np.zeros(image.shape, bool)
        elif c.kind == "moved":
            groups["mask"].append(moved[pid])
        else:
            groups[c.kind].append(c.prompt)
    for kind, prompts in groups.items():
        if not prompts:
            continue
        model = track_model if kind == "mask" else _model_for(seg_model, kind)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="the network found no lesion")
            result = segment(image, prompts, model, cancel=cancel)
        timings["network"] += time.perf_counter() - t0
        for p in prompts:
            out[p.id] = result.masks[p.id]
    for pid, mask in sorted(out.items()):
        is_new = pid not in previous.status
        if is_new and not mask.any():
            raise PromptError(f"new lesion {pid} at scan {t}: the network found no lesion at its prompt; place it on "
                              f"the lesion")
        if not mask.any() and not corrected[pid].vanished:
            warnings.warn(f"lesion {pid} at scan {t}: the network found no lesion at the correction's prompt; it is "
                          f"'vanished' there", stacklevel=3)
        status[pid].append("new" if is_new else "tracked" if mask.any() else "vanished")
        fractions[pid].append(1.0 if mask.any() else None)
    return out


def _model_for(seg_model, kind: str):
    model = seg_model.get(kind) if isinstance(seg_model, dict) else seg_model
    if model is None:
        raise ValueError(f"a {kind} correction needs the {kind} model (seg_model)")
    return model
