"""Long work off the GUI thread: one job at a time, in order, polled by a timer.

A :class:`Job` has three parts: ``prepare()`` runs on the main thread when the job starts (it reads
the scene: prompts, volumes, lesion IDs), ``work(plan, progress, cancel)`` runs on a background
thread (the network in a worker process, registration, a download: it must not touch the scene),
and ``commit(plan, result)`` runs on the main thread again (it writes the scene). The GUI calls
:meth:`JobQueue.poll` from a timer (a ``qt.QTimer`` in Slicer, a loop in tests); progress, results
and errors are delivered there, on the main thread. Jobs submitted while one runs wait in order and
are never dropped; a job whose ``key`` is already waiting is not queued twice (it reads the scene
when it starts, so it sees the latest state anyway).

Qt-free: the Widget supplies the timer.
"""
from __future__ import annotations

import collections
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from LesionLocatorLib.cancel import CancelToken, Cancelled


@dataclass
class Job:
    """One unit of long work. ``key``: identifies what it works on (e.g. a control point), so that
    a job for the same thing is not queued twice. Callbacks run on the main thread:
    ``done(value)`` with what ``commit`` returned, ``failed(error)``, ``cancelled()``."""
    title: str
    work: Callable[[Any, Callable, CancelToken], Any]
    prepare: Callable[[], Any] = lambda: None
    commit: Callable[[Any, Any], Any] = lambda plan, result: result
    key: Optional[str] = None
    done: Callable[[Any], None] = lambda value: None
    failed: Callable[[BaseException], None] = lambda error: None
    cancelled: Callable[[], None] = lambda: None
    token: CancelToken = field(default_factory=CancelToken)


class JobQueue:
    """Runs :class:`Job` s one at a time on a background thread; everything else on the caller's
    (main) thread inside :meth:`poll`. ``progress(fraction, message)`` is called from :meth:`poll`."""

    def __init__(self, progress: Callable[[float, str], None] = lambda fraction, message: None):
        self.progress = progress
        self._waiting: collections.deque = collections.deque()
        self._running: Optional[Job] = None
        self._plan = None
        self._events: queue.Queue = queue.Queue()

    @property
    def busy(self) -> bool:
        return self._running is not None or bool(self._waiting)

    @property
    def running(self) -> Optional[Job]:
        return self._running

    def waiting(self) -> list:
        """Titles of the jobs waiting to start, in order."""
        return [job.title for job in self._waiting]

    def submit(self, job: Job) -> bool:
        """Queue a job (it starts at the next :meth:`poll` when nothing runs). False when a job with
        the same key is already waiting (not started): that one will see the latest scene."""
        if job.key is not None and any(j.key == job.key for j in self._waiting):
            return False
        self._waiting.append(job)
        return True

    def cancel(self) -> None:
        """Cancel the running job (it stops at its next safe point) and drop the waiting ones."""
        dropped = list(self._waiting)
        self._waiting.clear()
        for job in dropped:
            job.cancelled()
        if self._running is not None:
            self._running.token.cancel()

    def poll(self) -> bool:
        """Deliver progress and results, start the next job; returns :attr:`busy`. Call it often
        (every 50 ms) while busy: each call does only main-thread bookkeeping and one commit."""
        while True:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                break
            if kind == "progress":
                self.progress(*payload)
            else:
                self._finish(kind, payload)
        if self._running is None and self._waiting:
            self._start(self._waiting.popleft())
        return self.busy

    def wait(self, timeout: float = 60.0, interval: float = 0.01) -> None:
        """Poll until idle (scripts and tests; a GUI polls from its timer instead)."""
        import time

        end = time.monotonic() + timeout
        while self.poll():
            if time.monotonic() > end:
                raise TimeoutError(f"jobs still running after {timeout} s: {self.waiting()}")
            time.sleep(interval)

    # ------------------------------------------------------------------ internals
    def _start(self, job: Job) -> None:
        self._running = job
        try:
            self._plan = job.prepare()
        except BaseException as error:  # noqa: BLE001 - every failure goes to the job's callback
            self._finish("failed", error)
            return
        self.progress(0.0, job.title)
        threading.Thread(target=self._work, args=(job, self._plan), name=f"LesionLocator: {job.title}",
                         daemon=True).start()

    def _work(self, job: Job, plan) -> None:
        def report(fraction, message):
            self._events.put(("progress", (float(fraction), str(message))))
        try:
            job.token.check()
            result = job.work(plan, report, job.token)
            job.token.check()
        except Cancelled:
            self._events.put(("cancelled", None))
        except BaseException as error:  # noqa: BLE001
            self._events.put(("failed", error))
        else:
            self._events.put(("finished", result))

    def _finish(self, kind: str, payload) -> None:
        job, plan = self._running, self._plan
        self._running, self._plan = None, None
        if kind == "finished":
            if job.token.cancelled:
                kind = "cancelled"
            else:
                try:
                    value = job.commit(plan, payload)
                except BaseException as error:  # noqa: BLE001
                    job.failed(error)
                else:
                    job.done(value)
                return
        if kind == "cancelled":
            job.cancelled()
        else:
            job.failed(payload)
