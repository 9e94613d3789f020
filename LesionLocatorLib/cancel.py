"""Cancelling long work: one torch-free token for network runs, tracking and downloads.

A :class:`CancelToken` is set from any thread (a GUI's Cancel button, a worker's ``cancel``
message, Ctrl-C handling); the work checks it at safe points (between network batches,
between timepoints, between downloaded chunks) and raises :class:`Cancelled`, and nothing
partial is kept. The zoo asks ``is_set()`` (so a ``threading.Event`` works there too); the
network and tracking code call ``check()``.
"""
from __future__ import annotations

import threading


class Cancelled(Exception):
    """Raised when a :class:`CancelToken` was cancelled; nothing is written."""


class CancelToken:
    """Thread-safe cancellation flag.

    ``parent``: another flag (a ``CancelToken``, a ``threading.Event``, anything with
    ``is_set()`` or ``cancelled``) whose cancellation counts as this token's too, e.g. a
    caller's token handed to a front end that also has its own Cancel button."""

    def __init__(self, parent=None):
        self._event = threading.Event()
        self._parent = parent

    def cancel(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        if self._event.is_set():
            return True
        parent = self._parent
        if parent is None:
            return False
        return bool(parent.is_set() if hasattr(parent, "is_set") else parent.cancelled)

    @property
    def cancelled(self) -> bool:
        return self.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if cancelled."""
        if self.is_set():
            raise Cancelled("cancelled by the user")
