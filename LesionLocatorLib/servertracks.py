"""Tracking runs a ``lesionlocator serve`` server keeps so that clients can correct them
(:class:`TrackStore`, used by :class:`LesionLocatorLib.serverjobs.JobQueue`): a client's last runs,
masks bounding-box packed, registrations in memory. A run is only ever known to the client that
tracked it.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from .protocol import _show
from .serverapi import TRACK_TTL_S


class RunGone(LookupError):
    """The run a correction names is not (or no longer) kept for this client."""


@dataclass
class KeptTrack:
    """A finished tracking run kept for corrections: masks bounding-box packed
    (:func:`~LesionLocatorLib.protocol.pack_masks`, keys 't/lesion id'), statuses, inside fractions,
    verified-tracking points and the registrations (ITK transforms in memory)."""
    packed: dict
    status: dict
    fractions: dict
    points: dict
    transforms: list
    n_images: int

    @classmethod
    def of(cls, tracked) -> "KeptTrack":
        from .protocol import pack_masks, timepoint_keys

        return cls(pack_masks(timepoint_keys(tracked.masks)),
                   {k: list(v) for k, v in tracked.status.items()},
                   {k: list(v) for k, v in tracked.inside_fraction.items()}, dict(tracked.points),
                   list(tracked.transforms), len(tracked.masks))

    def result(self):
        """The run as a :class:`~LesionLocatorLib.track.TrackResult` (labels rebuilt by the correction)."""
        from .protocol import by_timepoint, unpack_masks
        from .track import TrackResult

        return TrackResult(by_timepoint(unpack_masks(self.packed), self.n_images), [],
                           {k: list(v) for k, v in self.status.items()}, list(self.transforms), {},
                           {k: list(v) for k, v in self.fractions.items()}, dict(self.points))


class TrackStore:
    """Each client's last ``per_client`` tracking runs (by job ID) for ``ttl_s`` seconds, so that a
    review session can correct them without registering again; another client's ID is unknown."""

    def __init__(self, per_client: int = 2, ttl_s: float = TRACK_TTL_S):
        self.per_client, self.ttl_s = int(per_client), float(ttl_s)
        self._lock = threading.Lock()
        self._runs: dict = {}  # client -> OrderedDict(job id -> (KeptTrack, time kept))

    def put(self, client: str, job_id: str, kept: "KeptTrack") -> None:
        with self._lock:
            runs = self._runs.setdefault(client, OrderedDict())
            runs[job_id] = (kept, time.monotonic())
            while len(runs) > self.per_client:
                runs.popitem(last=False)

    def get(self, client: str, job_id: str) -> "KeptTrack":
        with self._lock:
            runs = self._runs.get(client, OrderedDict())
            entry = runs.get(job_id)
            if entry is not None and time.monotonic() - entry[1] > self.ttl_s:
                del runs[job_id]
                entry = None
            if entry is None:
                raise RunGone(f"the tracking run {_show(job_id, 40)} is no longer on the server (it keeps the last "
                              f"{self.per_client} runs of each client for {self.ttl_s / 3600:g} h, and forgets them "
                              f"when it restarts): track again, then correct")
            runs.move_to_end(job_id)
            return entry[0]
