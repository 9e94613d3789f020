"""Who runs the network: a small protocol between a front end (the Slicer module, the CLI)
and the code that holds the model.

A front end builds a :class:`SegmentationRequest` -- an :class:`~LesionLocatorLib.image.Image`
(LPS world, array (z, y, x)), world prompts (:class:`~LesionLocatorLib.prompts.Point` /
:class:`~LesionLocatorLib.prompts.Box`, LPS millimetres) and a :class:`ModelSpec` -- and hands it
to a :class:`SegmentationRunner`, which answers with a :class:`SegmentationResponse` (one boolean
(z, y, x) mask per prompt ID, on the request image's voxel grid).

Implementations:

* :class:`InProcessRunner` (now): runs :func:`LesionLocatorLib.predict.segment` in the calling
  process and keeps loaded models in a small cache, so repeated clicks do not reload weights.
* a persistent local worker process and a remote GPU server (later) speak the JSON messages
  below; the front end does not change.

Wire protocol for out-of-process runners (one JSON object per line on the worker's
stdin/stdout, or one per WebSocket/HTTP message for a server)::

    -> {"type": "hello", "protocol": "lesionlocator-runner/1"}
    <- {"type": "ready", "protocol": "lesionlocator-runner/1", "library": "0.1.0",
        "torch": "2.13.0", "devices": ["cpu", "cuda"]}

    -> {"type": "segment", "id": "<request id>",
        "image": {"file": "/tmp/ll/req1.nrrd"}                      # any SimpleITK-readable file
              or {"shm": "<shared memory name>", "shape": [z, y, x], "dtype": "int16",
                  "spacing": [x, y, z], "origin": [x, y, z],        # mm, LPS
                  "direction": [9 numbers, row-major, columns = index axes i, j, k]},
        "frame": "LPS", "units": "mm",
        "prompts": [{"id": 1, "point": [x, y, z]},
                    {"id": 2, "box": [[x0, y0, z0], [x1, y1, z1]]}],
        "model": {"path": "/models/LesionLocatorCheckpoint", "folds": [0] or null,
                  "device": "auto", "tta": null},
        "output": "/tmp/ll/req1_masks.npz"}                          # where the masks go
    <- {"type": "progress", "id": "...", "fraction": 0.4, "message": "patch 2/5"}   (0..n times)
    <- {"type": "result", "id": "...",
        "masks": {"file": "/tmp/ll/req1_masks.npz"}   # npz: key "<prompt id>" -> uint8 (z, y, x)
              or {"shm": "<name>", "shape": [n, z, y, x], "ids": [1, 2]},
        "empty": [2], "overlaps": [[1, 2, 35]], "warnings": ["..."], "seconds": 1.8,
        "loads": 1}                                   # models loaded from disk so far
    or <- {"type": "error", "id": "...", "error": "PromptError" | "ModelLayoutError" |
           "CheckpointError" | "MemoryError" | ..., "message": "<the library's message>"}
    or <- {"type": "cancelled", "id": "..."}

    -> {"type": "cancel", "id": "..."}       # the worker stops between network batches
    -> {"type": "load", "id": "...", "model": {...}, "prompt_types": ["point", "box"]}
    <- {"type": "loaded", "id": "...", "loads": 2}   # optional: warm the model cache
    -> {"type": "shutdown"}

:class:`WorkerProcessRunner` is the client of :mod:`LesionLocatorLib.worker`, a local
process speaking this protocol over stdin/stdout with files in a temporary folder.

Masks go through a file or shared memory, never inline JSON. Error types are the
library's exception class names, so a front end can re-raise the same exception with the
same message.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, runtime_checkable

from .image import Image
from .prompts import Box, Point, PromptError

PROTOCOL = "lesionlocator-runner/1"

ProgressCallback = Callable[[float, str], None]


@dataclass(frozen=True)
class ModelSpec:
    """Which model to run: a model root (``LesionLocatorCheckpoint`` or a trained-model
    folder), folds (None = all present), device ('auto', 'cpu', 'cuda', 'cuda:N', 'mps')
    and mirroring test-time augmentation (None = on for GPU, off for CPU).

    The point model runs point prompts, the box model box prompts.
    """
    path: str
    folds: Optional[tuple] = None
    device: str = "auto"
    tta: Optional[bool] = None

    def to_json(self) -> dict:
        return {"path": self.path, "folds": list(self.folds) if self.folds is not None else None,
                "device": self.device, "tta": self.tta}


@dataclass
class SegmentationRequest:
    """An image (LPS, array (z, y, x)), prompts with unique IDs (LPS mm) and a model."""
    image: Image
    prompts: list
    model: ModelSpec
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def prompts_json(self) -> list:
        """The prompts as the wire protocol writes them (LPS mm)."""
        out = []
        for p in self.prompts:
            if isinstance(p, Point):
                out.append({"id": int(p.id), "point": [float(v) for v in p.xyz]})
            else:
                out.append({"id": int(p.id), "box": [[float(v) for v in p.lower], [float(v) for v in p.upper]]})
        return out


@dataclass
class SegmentationResponse:
    """One boolean (z, y, x) mask per prompt ID on the request image's grid.

    ``empty``: IDs whose mask is empty; ``overlaps``: {(id_a, id_b): voxels};
    ``warnings``: the library's warning messages (not CT, empty masks, overlaps);
    ``seconds``: wall time of the run.
    """
    id: str
    masks: dict
    empty: list = field(default_factory=list)
    overlaps: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    seconds: float = 0.0


@runtime_checkable
class SegmentationRunner(Protocol):
    """Runs segmentation requests. ``cancel`` is an object with ``check()`` that raises
    :class:`LesionLocatorLib.predict.Cancelled` (a :class:`~LesionLocatorLib.predict.CancelToken`).
    Errors are the library's exceptions with the library's messages."""

    def run(self, request: SegmentationRequest, progress: Optional[ProgressCallback] = None,
            cancel=None) -> SegmentationResponse: ...

    def close(self) -> None: ...


class InProcessRunner:
    """Runs the library in this process; caches up to ``max_models`` loaded models,
    keyed by (model path, prompt type, folds, device, tta)."""

    def __init__(self, max_models: int = 2):
        self.max_models = max_models
        self._models: OrderedDict = OrderedDict()
        self.loads = 0  # how many times a model was loaded from disk (for tests and the status line)

    def model(self, spec: ModelSpec, prompt_type: str):
        """The loaded model for ``prompt_type`` ('point' or 'box'), from the cache when possible."""
        from .model import load_model

        key = (str(spec.path), prompt_type, spec.folds, spec.device, spec.tta)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        model = load_model(spec.path, prompt_type, folds=list(spec.folds) if spec.folds is not None else None,
                           device=spec.device, tta=spec.tta)
        self.loads += 1
        self._models[key] = model
        while len(self._models) > self.max_models:
            self._models.popitem(last=False)
        return model

    def clear_cache(self) -> None:
        self._models.clear()

    def close(self) -> None:
        self.clear_cache()

    def run(self, request: SegmentationRequest, progress: Optional[ProgressCallback] = None,
            cancel=None) -> SegmentationResponse:
        from .predict import instance_labels, segment

        start = time.perf_counter()
        report = progress or (lambda f, m: None)
        groups = [("point", [p for p in request.prompts if isinstance(p, Point)]),
                  ("box", [p for p in request.prompts if isinstance(p, Box)])]
        unknown = [p for p in request.prompts if not isinstance(p, (Point, Box))]
        if unknown:
            raise PromptError(f"the runner takes Point and Box prompts (LPS mm), got {unknown[0]!r}")
        groups = [(kind, ps) for kind, ps in groups if ps]
        if not groups:
            raise PromptError("no prompts given")
        masks, probabilities, caught = {}, {}, []
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for n, (kind, prompts) in enumerate(groups):
                lo, span = n / len(groups), 1.0 / len(groups)
                report(lo, f"loading the {kind} model")
                if cancel is not None:
                    cancel.check()
                model = self.model(request.model, kind)
                result = segment(request.image, prompts, model, cancel=cancel,
                                 progress=lambda f, m, lo=lo, span=span: report(lo + span * f, m))
                masks.update(result.masks)
                probabilities.update(result.probabilities)
            if len(groups) > 1:  # overlaps between point and box lesions
                _, overlaps = instance_labels(masks, probabilities, request.image)
            else:
                overlaps = result.overlaps
        for w in record:
            msg = str(w.message)
            if msg not in caught:
                caught.append(msg)
        empty = sorted(pid for pid, m in masks.items() if not m.any())
        return SegmentationResponse(request.id, masks, empty, overlaps, caught, time.perf_counter() - start)


class WorkerError(RuntimeError):
    """The worker process failed (crashed, could not start, or sent an unknown error type)."""


def _library_exception(kind: str, message: str) -> Exception:
    """Re-create the library exception the worker reported, with the same message."""
    from . import image, model, prompts

    known = {"PromptError": prompts.PromptError, "ModelLayoutError": model.ModelLayoutError,
             "CheckpointError": model.CheckpointError, "ImageError": image.ImageError,
             "MemoryError": MemoryError, "FileNotFoundError": FileNotFoundError, "ValueError": ValueError}
    try:
        from . import modelgrid
        known["UnsupportedPlansError"] = modelgrid.UnsupportedPlansError
    except (ImportError, AttributeError):
        pass
    cls = known.get(kind)
    return cls(message) if cls is not None else WorkerError(f"{kind}: {message}")


class WorkerProcessRunner:
    """Runs requests in a persistent ``python -m LesionLocatorLib.worker`` process.

    The model stays loaded in the worker between requests; while waiting, ``progress`` is
    called at least every ``poll_s`` seconds (a GUI can process its events there), and a
    cancelled ``cancel`` token sends a cancel message. If the worker does not confirm within
    ``cancel_timeout_s`` it is killed (and restarted on the next request). Volumes go to the
    worker as uncompressed NRRD files, masks come back as ``.npz``, both in a private
    temporary folder removed by :meth:`close`.
    """

    def __init__(self, python: Optional[str] = None, env: Optional[dict] = None, startup_timeout_s: float = 300,
                 poll_s: float = 0.1, cancel_timeout_s: float = 10):
        self.python = python or sys.executable
        self.env = env
        self.startup_timeout_s = startup_timeout_s
        self.poll_s = poll_s
        self.cancel_timeout_s = cancel_timeout_s
        self.loads = 0
        self.info: dict = {}
        self._process = None
        self._lines: queue.Queue = queue.Queue()
        self._tmp = None
        self._log = None

    # ------------------------------------------------------------------ process
    def start(self) -> None:
        """Start the worker (if not running) and wait for its 'ready' answer."""
        if self._process is not None and self._process.poll() is None:
            return
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lesionlocator_worker_")
        env = dict(os.environ if self.env is None else self.env)
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([package_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(os.path.join(self._tmp.name, "worker.log"), "ab")
        self._process = subprocess.Popen([self.python, "-m", "LesionLocatorLib.worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._log, env=env, text=True, bufsize=1)
        self._lines = queue.Queue()
        threading.Thread(target=self._read, args=(self._process, self._lines), daemon=True).start()
        self._send({"type": "hello", "protocol": PROTOCOL})
        message = self._wait(lambda m: m.get("type") == "ready", self.startup_timeout_s)
        if message.get("protocol") != PROTOCOL:
            self.close()
            raise WorkerError(f"the worker speaks {message.get('protocol')!r}, expected {PROTOCOL!r}")
        self.info = message

    @staticmethod
    def _read(process, lines) -> None:
        for line in process.stdout:
            line = line.strip()
            if line:
                try:
                    lines.put(json.loads(line))
                except json.JSONDecodeError:
                    lines.put({"type": "noise", "text": line})
        lines.put(None)  # end of output: the process exited

    def _send(self, message: dict) -> None:
        try:
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise WorkerError("the LesionLocator worker process is not running" + self._log_tail()) from None

    def _log_tail(self, chars: int = 2000) -> str:
        try:
            with open(os.path.join(self._tmp.name, "worker.log"), "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - chars))
                text = f.read().decode(errors="replace").strip()
            return f"; its last output:\n{text}" if text else ""
        except (OSError, AttributeError):
            return ""

    def _next(self, timeout: float):
        try:
            message = self._lines.get(timeout=timeout)
        except queue.Empty:
            return {}
        if message is None:
            self._process.wait(timeout=5)
            raise WorkerError(f"the LesionLocator worker process exited (code {self._process.returncode})"
                              + self._log_tail())
        return message

    def _wait(self, accept, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self._next(min(self.poll_s, max(deadline - time.monotonic(), 0.001)))
            if message and accept(message):
                return message
        self.kill()
        raise WorkerError(f"the LesionLocator worker did not answer within {timeout:.0f} s" + self._log_tail())

    def kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None

    def close(self) -> None:
        """Stop the worker (shutdown message, then kill) and remove the temporary folder."""
        if self._process is not None and self._process.poll() is None:
            try:
                self._send({"type": "shutdown"})
                self._process.wait(timeout=10)
            except (WorkerError, subprocess.TimeoutExpired):
                pass
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    @property
    def pid(self):
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    # ------------------------------------------------------------------ requests
    def run(self, request: SegmentationRequest, progress: Optional[ProgressCallback] = None,
            cancel=None) -> SegmentationResponse:
        from .image import write_image
        from .predict import Cancelled

        report = progress or (lambda f, m: None)
        self.start()
        folder = os.path.join(self._tmp.name, request.id)
        os.makedirs(folder, exist_ok=True)
        try:
            image_file = write_image(request.image, os.path.join(folder, "image.nrrd"), compress=False)
            output = os.path.join(folder, "masks.npz")
            self._send({"type": "segment", "id": request.id, "image": {"file": str(image_file)},
                        "frame": "LPS", "units": "mm", "prompts": request.prompts_json(),
                        "model": request.model.to_json(), "output": output})
            fraction, text, cancel_sent = 0.0, "waiting for the worker", None
            while True:
                if cancel is not None and getattr(cancel, "cancelled", False) and cancel_sent is None:
                    self._send({"type": "cancel", "id": request.id})
                    cancel_sent = time.monotonic()
                if cancel_sent is not None and time.monotonic() - cancel_sent > self.cancel_timeout_s:
                    self.kill()
                    raise Cancelled("cancelled by the user (the worker was stopped)")
                message = self._next(self.poll_s)
                if message.get("id") not in (None, request.id) and message:
                    continue  # an answer to an earlier, abandoned request
                kind = message.get("type")
                if kind == "progress":
                    fraction, text = message["fraction"], message["message"]
                elif kind == "result":
                    import numpy as np

                    with np.load(message["masks"]["file"]) as data:
                        masks = {int(k): data[k].astype(bool) for k in data.files}
                    self.loads = message.get("loads", self.loads)
                    return SegmentationResponse(request.id, masks, list(message.get("empty", [])),
                                                {(a, b): n for a, b, n in message.get("overlaps", [])},
                                                list(message.get("warnings", [])), message.get("seconds", 0.0))
                elif kind == "cancelled":
                    raise Cancelled("cancelled by the user")
                elif kind == "error":
                    raise _library_exception(message.get("error", ""), message.get("message", ""))
                report(fraction, text)
        finally:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
