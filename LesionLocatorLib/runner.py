"""Who runs the network: a small protocol between a front end (the Slicer module, the CLI)
and the code that holds the model.

A front end builds a :class:`SegmentationRequest` -- an :class:`~LesionLocatorLib.image.Image`
(LPS world, array (z, y, x)), prompts (:class:`~LesionLocatorLib.prompts.Point` /
:class:`~LesionLocatorLib.prompts.Box` in LPS millimetres, run with the point / box model, and
:class:`~LesionLocatorLib.prompts.MaskPrompt`, a previous or edited mask, run with the model that
takes previous-mask prompts, ``LesionLocatorTrack``) and a :class:`ModelSpec` -- and hands it
to a :class:`SegmentationRunner`, which answers with a :class:`SegmentationResponse` (one boolean
(z, y, x) mask per prompt ID, on the request image's voxel grid).

Tracking goes the same way: a :class:`TrackRequest` (the baseline and follow-up Images in
time order, one boolean baseline mask per lesion ID on the baseline's grid, the model and the
registration backend) -> a :class:`TrackResponse` (per timepoint one mask per lesion ID, and
each lesion's status per timepoint: tracked / vanished / outside). A runner that tracks has a
``track`` method (:class:`TrackingRunner`).

Implementations:

* :class:`InProcessRunner`: runs :func:`LesionLocatorLib.predict.segment` and
  :func:`LesionLocatorLib.track.track` in the calling process and keeps loaded models in a
  small cache, so repeated clicks do not reload weights.
* :class:`WorkerProcessRunner`: the same in a persistent local worker process
  (:mod:`LesionLocatorLib.worker`) speaking the JSON messages of :mod:`LesionLocatorLib.protocol`.
* :class:`LesionLocatorLib.remote.RemoteRunner`: the same on a ``lesionlocator serve`` server over
  HTTP (:mod:`LesionLocatorLib.serverapi`); the front end does not change.

The JSON messages an out-of-process runner speaks are defined in :mod:`LesionLocatorLib.protocol`.
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

import numpy as np

from .image import Image
from .modelfolder import ModelSpec
from .prompts import Box, MaskPrompt, Point, PromptError
from .protocol import PROTOCOL, ImageNotCached, WorkerError, by_timepoint, library_exception, pack_masks, \
    unpack_masks
from .report import plain_rows

ProgressCallback = Callable[[float, str], None]


@dataclass
class SegmentationRequest:
    """An image (LPS, array (z, y, x)), prompts with unique IDs and a model.

    ``prompts``: :class:`~LesionLocatorLib.prompts.Point` and
    :class:`~LesionLocatorLib.prompts.Box` (LPS mm) and
    :class:`~LesionLocatorLib.prompts.MaskPrompt` (a mask Image of any geometry, resampled
    nearest-neighbour onto ``image``'s voxels).

    ``image_key``: optional, the front end's name for exactly this image (voxels and
    geometry), e.g. a volume node ID with its modification time. An out-of-process runner
    sends an image once per key and then only the key, so that repeated clicks on the same
    volume do not copy it again. A new key must be used whenever the voxels change.
    """
    image: Image
    prompts: list
    model: ModelSpec
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    image_key: Optional[str] = None

    def prompts_json(self, mask_file: Optional[str] = None) -> list:
        """The prompts as the wire protocol writes them (points and boxes in LPS mm; a mask
        prompt names its mask in ``mask_file``, the npz :meth:`prompt_masks` go to)."""
        out = []
        for p in self.prompts:
            if isinstance(p, Point):
                out.append({"id": int(p.id), "point": [float(v) for v in p.xyz]})
            elif isinstance(p, Box):
                out.append({"id": int(p.id), "box": [[float(v) for v in p.lower], [float(v) for v in p.upper]]})
            elif isinstance(p, MaskPrompt):
                if mask_file is None:
                    raise ValueError("mask prompts need the npz file their masks are written to")
                out.append({"id": int(p.id), "mask": {"file": str(mask_file), "key": str(int(p.id))}})
            else:
                raise PromptError(f"the runner takes Point and Box prompts (LPS mm) and MaskPrompts, got {p!r}")
        return out

    def prompt_masks(self) -> dict:
        """``{"<prompt id>": bool (z, y, x)}``: each mask prompt on ``image``'s voxel grid (what
        the wire protocol sends, see :func:`pack_masks`). Raises the library's
        :class:`~LesionLocatorLib.prompts.PromptError` for a mask with no voxel in the image."""
        from .prompts import to_voxel_prompt

        return {str(int(p.id)): to_voxel_prompt(p, self.image).mask
                for p in self.prompts if isinstance(p, MaskPrompt)}


@dataclass
class SegmentationResponse:
    """One boolean (z, y, x) mask per prompt ID on the request image's grid.

    ``empty``: IDs whose mask is empty; ``overlaps``: {(id_a, id_b): voxels};
    ``warnings``: the library's warning messages (not CT, empty masks, overlaps);
    ``seconds``: wall time of the run; ``timings``: seconds per stage of the library
    (preprocessing, network, postprocessing).
    """
    id: str
    masks: dict
    empty: list = field(default_factory=list)
    overlaps: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)


@dataclass
class TrackRequest:
    """Images in time order (``images[0]`` the baseline; LPS, arrays (z, y, x)), the baseline
    lesions as ``{lesion id: bool (z, y, x) mask on images[0]}``, a model (its
    ``LesionLocatorTrack`` folder is used) and a registration backend name; ``min_volume_ml`` and
    ``min_prompt_fraction``: :func:`LesionLocatorLib.track.track`'s options (follow-up specks and
    remnants reported ``vanished``; 0 = off); ``names``: the scans' names in the measurement rows
    (default t0, t1, ...). A lesion whose baseline mask is empty is reported ``vanished`` throughout.
    ``corrections``: :class:`~LesionLocatorLib.correct.Correction` s (LPS mm, scans by index) applied
    after tracking; ``previous``: the ``tracked`` result of an earlier response on the same images
    (a :class:`~LesionLocatorLib.track.TrackResult`): then nothing is tracked or registered again,
    only ``corrections`` are applied to it (``baseline`` is not used and may be empty)."""
    images: list
    baseline: dict
    model: ModelSpec
    registration: str = "simpleitk"
    registration_options: Optional[dict] = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    min_volume_ml: float = 0.0
    min_prompt_fraction: float = 0.0
    names: Optional[list] = None
    corrections: list = field(default_factory=list)
    previous: object = None


@dataclass
class TrackResponse:
    """``masks[t][id]``: bool (z, y, x) on ``images[t]`` (t = 0 is the baseline as given);
    ``status[id][t]``: 'tracked', 'vanished' or 'outside'; ``timings``: seconds per stage;
    ``warnings``: the library's warning messages; ``seconds``: wall time;
    ``registrations[t-1]``: what registering scan t to scan t-1 gave (``backend``, ``result``
    such as 'affine + demons', similarity values); ``rows``: one measurement row per lesion and
    timepoint (:func:`LesionLocatorLib.measure.lesion_measurements`: volume ml, axes mm, changes %);
    ``tracked``: the run as a :class:`~LesionLocatorLib.track.TrackResult` (registrations
    included), the ``previous`` of a later request that corrects it (None from a server)."""
    id: str
    masks: list
    status: dict
    timings: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    seconds: float = 0.0
    registrations: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    tracked: object = None


@runtime_checkable
class SegmentationRunner(Protocol):
    """Runs segmentation requests. ``cancel`` is an object with ``check()`` that raises
    :class:`LesionLocatorLib.predict.Cancelled` (a :class:`~LesionLocatorLib.predict.CancelToken`).
    Errors are the library's exceptions with the library's messages."""

    def run(self, request: SegmentationRequest, progress: Optional[ProgressCallback] = None,
            cancel=None) -> SegmentationResponse: ...

    def close(self) -> None: ...


@runtime_checkable
class TrackingRunner(Protocol):
    """A runner that also tracks lesions through follow-ups (same errors and cancel as ``run``)."""

    def track(self, request: TrackRequest, progress: Optional[ProgressCallback] = None,
              cancel=None) -> TrackResponse: ...

    def close(self) -> None: ...


class InProcessRunner:
    """Runs the library in this process; caches up to ``max_models`` loaded models,
    keyed by (model path, prompt type, folds, device, tta): point, box and previous-mask
    (tracking) model."""

    def __init__(self, max_models: int = 3):
        self.max_models = max_models
        self._models: OrderedDict = OrderedDict()
        self.loads = 0  # how many times a model was loaded from disk (for tests and the status line)

    def model(self, spec: ModelSpec, prompt_type: str):
        """The loaded model for ``prompt_type`` ('point', 'box' or 'prev_mask' for mask prompts and
        tracking), from the cache when possible."""
        from .model import load_model

        key = (str(spec.path), prompt_type, spec.folds, spec.device, spec.tta, spec.backend)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        model = load_model(spec.path, prompt_type, folds=list(spec.folds) if spec.folds is not None else None,
                           device=spec.device, tta=spec.tta, backend=spec.backend)
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
        from .study import user_messages

        start = time.perf_counter()
        report = progress or (lambda f, m: None)
        groups = [("point", [p for p in request.prompts if isinstance(p, Point)]),
                  ("box", [p for p in request.prompts if isinstance(p, Box)]),
                  ("prev_mask", [p for p in request.prompts if isinstance(p, MaskPrompt)])]
        unknown = [p for p in request.prompts if not isinstance(p, (Point, Box, MaskPrompt))]
        if unknown:
            raise PromptError(f"the runner takes Point and Box prompts (LPS mm) and MaskPrompts, got {unknown[0]!r}")
        groups = [(kind, ps) for kind, ps in groups if ps]
        if not groups:
            raise PromptError("no prompts given")
        masks, probabilities, caught, timings = {}, {}, [], {}
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            for n, (kind, prompts) in enumerate(groups):
                lo, span = n / len(groups), 1.0 / len(groups)
                report(lo, "loading the " + ("previous-mask" if kind == "prev_mask" else kind) + " model")
                if cancel is not None:
                    cancel.check()
                model = self.model(request.model, kind)
                result = segment(request.image, prompts, model, cancel=cancel,
                                 progress=lambda f, m, lo=lo, span=span: report(lo + span * f, m))
                masks.update(result.masks)
                probabilities.update(result.probabilities)
                for stage, seconds in result.timings.items():
                    timings[stage] = timings.get(stage, 0.0) + seconds
            if len(groups) > 1:  # overlaps between lesions of different models
                _, overlaps = instance_labels(masks, probabilities, request.image)
            else:
                overlaps = result.overlaps
        caught = user_messages(record)
        empty = sorted(pid for pid, m in masks.items() if not m.any())
        return SegmentationResponse(request.id, masks, empty, overlaps, caught, time.perf_counter() - start, timings)

    def track(self, request: TrackRequest, progress: Optional[ProgressCallback] = None,
              cancel=None) -> TrackResponse:
        """Track the baseline masks through the follow-ups with the cached tracking model
        (:func:`LesionLocatorLib.study.track_study`)."""
        from .study import track_study

        start = time.perf_counter()
        report = progress or (lambda f, m: None)
        if len(request.images) < 2:
            raise ValueError("tracking needs a baseline and at least one follow-up scan")
        if not request.baseline and request.previous is None:
            raise PromptError("no baseline lesion to track")
        if cancel is not None:
            cancel.check()
        study = track_study(request.images, dict(request.baseline), request.model, names=request.names,
                            registration=request.registration, registration_options=request.registration_options,
                            min_volume_ml=request.min_volume_ml, min_prompt_fraction=request.min_prompt_fraction,
                            progress=lambda f, m: report(0.02 + 0.98 * f, m), cancel=cancel, load=self.model,
                            corrections=request.corrections, previous=request.previous)
        registrations = [{"backend": t.backend, **t.info_json()} for t in study.transforms]
        return TrackResponse(request.id, study.masks, {int(k): list(v) for k, v in study.status.items()},
                             dict(study.timings), study.warnings, time.perf_counter() - start, registrations,
                             plain_rows(study.rows), study.tracked)


def segmentation_response(request_id: str, masks: dict, result: dict) -> SegmentationResponse:
    """The :class:`SegmentationResponse` of an out-of-process run: ``masks`` {"<prompt id>": bool
    (z, y, x)} and the other fields of a worker's ``result`` message or a server job's result
    (``empty``, ``overlaps`` as [a, b, voxels], ``warnings``, ``seconds``, ``timings``)."""
    return SegmentationResponse(request_id, {int(k): v for k, v in masks.items()}, list(result.get("empty", [])),
                                {(a, b): n for a, b, n in result.get("overlaps", [])},
                                list(result.get("warnings", [])), result.get("seconds", 0.0),
                                dict(result.get("timings", {})))


def track_response(request_id: str, n_images: int, masks: dict, result: dict) -> TrackResponse:
    """The :class:`TrackResponse` of an out-of-process run: ``masks`` {"<t>/<lesion id>": bool
    (z, y, x)} for ``n_images`` scans and the other fields of the worker's or server's result
    (``status``, ``timings``, ``warnings``, ``seconds``, ``registrations``, ``rows``)."""
    return TrackResponse(request_id, by_timepoint(masks, n_images),
                         {int(k): list(v) for k, v in result.get("status", {}).items()},
                         dict(result.get("timings", {})), list(result.get("warnings", [])),
                         result.get("seconds", 0.0), list(result.get("registrations", [])),
                         list(result.get("rows", [])))


def hidden_console() -> dict:
    """``Popen`` keywords that keep a console window from opening on Windows (as Slicer's
    ``slicer.util.launchConsoleProcess`` does); none elsewhere."""
    if os.name != "nt":
        return {}
    info = subprocess.STARTUPINFO()
    info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
    info.wShowWindow = 0  # SW_HIDE
    return {"startupinfo": info}


class WorkerProcessRunner:
    """Runs requests in a persistent ``python -m LesionLocatorLib.worker`` process.

    The model stays loaded in the worker between requests; while waiting, ``progress`` is
    called at least every ``poll_s`` seconds (a GUI can process its events there), and a
    cancelled ``cancel`` token sends a cancel message. If the worker does not confirm within
    ``cancel_timeout_s`` it is killed (and restarted on the next request). Volumes go to the
    worker as uncompressed NRRD files, mask prompts (resampled onto the volume's grid) and
    tracking baselines as ``.npz``, and masks come back as ``.npz``, all in a private
    temporary folder (the *session folder*, made readable by this user only) removed by
    :meth:`close`. The worker is started with ``--session`` naming that folder and accepts no
    file path outside it (see "The session folder" in :mod:`LesionLocatorLib.protocol`).
    """

    IMAGE_CACHE = 2  # images the worker keeps by key (the same number as worker.IMAGE_CACHE)

    def __init__(self, python: Optional[str] = None, env: Optional[dict] = None, startup_timeout_s: float = 300,
                 poll_s: float = 0.1, cancel_timeout_s: float = 10):
        self._sent: OrderedDict = OrderedDict()  # image keys the running worker holds
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
        self._sent.clear()  # a new process holds no images
        env = dict(os.environ if self.env is None else self.env)
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([package_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log = open(os.path.join(self._tmp.name, "worker.log"), "ab")
        self._process = subprocess.Popen([self.python, "-m", "LesionLocatorLib.worker", "--session", self._tmp.name],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env,
                                         text=True, bufsize=1, **hidden_console())
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

        self.start()
        folder = os.path.join(self._tmp.name, request.id)
        os.makedirs(folder, exist_ok=True)
        key = request.image_key

        def image_spec(resend: bool) -> dict:
            if key and key in self._sent and not resend:
                self._sent.move_to_end(key)
                return {"cached": key}
            spec = {"file": str(write_image(request.image, os.path.join(folder, "image.nrrd"), compress=False))}
            if key:
                spec["cache"] = key
            return spec

        try:
            output = os.path.join(folder, "masks.npz")
            prompt_masks = request.prompt_masks()
            mask_file = os.path.join(folder, "prompts.npz") if prompt_masks else None
            if prompt_masks:
                np.savez(mask_file, **pack_masks(prompt_masks))
            prompts = request.prompts_json(mask_file)
            message = None
            for resend in (False, True):
                try:
                    message = self._exchange(
                        {"type": "segment", "id": request.id, "image": image_spec(resend), "frame": "LPS",
                         "units": "mm", "prompts": prompts, "model": request.model.to_json(),
                         "output": output}, progress, cancel)
                    break
                except ImageNotCached:
                    self._sent.pop(key, None)
                    if resend:
                        raise WorkerError("the worker did not keep the image it was sent") from None
            if key:
                self._sent[key] = True
                self._sent.move_to_end(key)
                while len(self._sent) > self.IMAGE_CACHE:
                    self._sent.popitem(last=False)
            with np.load(message["masks"]["file"]) as data:
                return segmentation_response(request.id, unpack_masks(data), message)
        finally:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)

    def track(self, request: TrackRequest, progress: Optional[ProgressCallback] = None,
              cancel=None) -> TrackResponse:
        """Track (or correct ``request.previous``) in the worker; the run's registrations come back
        through a saved state (:mod:`LesionLocatorLib.trackstate`) in the request's folder."""
        from .image import write_image
        from .trackstate import load_track_state, save_track_state

        self.start()
        folder = os.path.join(self._tmp.name, request.id)
        os.makedirs(folder, exist_ok=True)
        try:
            images = [{"file": str(write_image(image, os.path.join(folder, f"t{t}.nrrd"), compress=False))}
                      for t, image in enumerate(request.images)]
            baseline = os.path.join(folder, "baseline.npz")
            np.savez(baseline, **pack_masks({str(int(k)): v for k, v in request.baseline.items()}))
            output = os.path.join(folder, "tracked.npz")
            extra = {"state": {"folder": os.path.join(folder, "state")}}
            if request.previous is not None:
                extra["previous"] = {"folder": str(save_track_state(
                    os.path.join(folder, "previous"), request.previous, request.images,
                    request.names or [f"t{t}" for t in range(len(request.images))], request.registration))}
            if request.corrections:
                from .correctionfile import write_corrections

                extra["corrections"] = {"file": str(write_corrections(os.path.join(folder, "corrections.json"),
                                                                      request.corrections))}
            message = self._exchange(
                {"type": "track", "id": request.id, "images": images, "frame": "LPS", "units": "mm",
                 "baseline": {"file": baseline}, "model": request.model.to_json(),
                 "registration": request.registration, "registration_options": request.registration_options,
                 "min_volume_ml": request.min_volume_ml, "min_prompt_fraction": request.min_prompt_fraction,
                 "names": request.names, "output": output, **extra}, progress, cancel)
            with np.load(message["masks"]["file"]) as data:
                response = track_response(request.id, len(request.images), unpack_masks(data), message)
            response.tracked = load_track_state(extra["state"]["folder"], request.images)[0]
            return response
        finally:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)

    def _exchange(self, request: dict, progress, cancel) -> dict:
        """Send a request; relay progress, forward Cancel; return its 'result' message or raise
        the library's exception (or :class:`~LesionLocatorLib.predict.Cancelled`)."""
        from .predict import Cancelled

        report = progress or (lambda f, m: None)
        rid = request["id"]
        self._send(request)
        fraction, text, cancel_sent = 0.0, "waiting for the worker", None
        while True:
            if cancel is not None and getattr(cancel, "cancelled", False) and cancel_sent is None:
                self._send({"type": "cancel", "id": rid})
                cancel_sent = time.monotonic()
            if cancel_sent is not None and time.monotonic() - cancel_sent > self.cancel_timeout_s:
                self.kill()
                raise Cancelled("cancelled by the user (the worker was stopped)")
            message = self._next(self.poll_s)
            if message.get("id") not in (None, rid) and message:
                continue  # an answer to an earlier, abandoned request
            kind = message.get("type")
            if kind == "progress":
                fraction, text = message["fraction"], message["message"]
            elif kind == "result":
                self.loads = message.get("loads", self.loads)
                return message
            elif kind == "cancelled":
                raise Cancelled("cancelled by the user")
            elif kind == "error":
                raise library_exception(message.get("error", ""), message.get("message", ""))
            report(fraction, text)
