"""The work behind ``lesionlocator serve``, free of HTTP and FastAPI (:mod:`LesionLocatorLib.server`
is the thin HTTP layer over :class:`Service`; the API itself is :mod:`LesionLocatorLib.serverapi`).

* :class:`ServerConfig`: the server's settings (what ``lesionlocator serve``'s options give).
* :class:`Authenticator`: API key -> client name, in constant time over all keys.
* :func:`load_models`: the models a server offers, by name, each checked at startup.
* :class:`ImageCache`: uploaded volumes per client, least recently used evicted under a byte budget.
* :func:`parse_job`: a job's JSON -> a library request (every field checked; images from the cache).
* :class:`JobQueue`: one FIFO queue shared by one worker thread per device (each with its own
  :class:`~LesionLocatorLib.runner.InProcessRunner`), so each device runs one job at a time and the
  queue spreads over the devices; per-client limit, cancel, long-poll status, result expiry.

Isolation: every image and job belongs to the client whose key uploaded or submitted it; another
client's ID answers exactly like an unknown one. Errors that reach a client are
:class:`ServiceError` (an HTTP status and a one-line ``detail``); a job's library error becomes its
``error`` (class name and the library's first message line); anything else is an internal error
whose traceback goes only to the server's log (logger ``lesionlocator.server``).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .cancel import CancelToken, Cancelled
from .protocol import MAX_PROMPT_ID, ProtocolError, _fail, _integer, _list, _model, _number, _object, _show, \
    _string, parse_message, prompt_entries, timepoint_keys
from .serverapi import MAX_WAIT_S, RESULT_TTL_S, EncodingError, decode_image, encode_masks, image_id
from .servertracks import KeptTrack, RunGone, TrackStore

log = logging.getLogger("lesionlocator.server")

GIB = 1 << 30
MIB = 1 << 20
LOCAL_CLIENT = "local"  # the one client of a server started without API keys (loopback only)
MAX_LESIONS = 256  # prompts of a segment job, baseline lesions of a track job (each one full-size mask)
MAX_TIMEPOINTS = 32  # images of a track job
IMAGE_ID = re.compile(r"^[0-9a-f]{64}$")
QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
PROMPT_TYPES = ("point", "box", "prev_mask")


class ServiceError(Exception):
    """An answer other than success: HTTP ``status``, a one-line ``detail``, extra reply fields."""

    def __init__(self, status: int, detail: str, **extra):
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


@dataclass
class ServerConfig:
    """Settings of one server. ``keys``: client name -> API key (None: no authentication, allowed on
    a loopback host only; every request is client ``local``); ``models``: zoo names, model folders or
    ``NAME=FOLDER``; ``devices``: torch device names, one worker thread each (repeats allowed);
    byte limits; ``result_ttl_s``: seconds a finished job is kept; TLS files for uvicorn."""
    host: str = "127.0.0.1"
    port: int = 8765
    keys: Optional[dict] = None
    models: tuple = ("demo",)
    devices: tuple = ("cpu",)
    max_cache_bytes: int = 8 * GIB
    max_upload_bytes: int = 2 * GIB
    max_jobs_per_client: int = 4
    result_ttl_s: float = RESULT_TTL_S
    ssl_certfile: Optional[str] = None
    ssl_keyfile: Optional[str] = None


# --------------------------------------------------------------------------- authentication
class Authenticator:
    """``Authorization: Bearer KEY`` -> client name. The key's SHA-256 is compared with
    ``hmac.compare_digest`` against every client's (no early exit), so the time taken says nothing
    about which key, or whether any, matched. ``keys`` None: every request is client ``local``."""

    def __init__(self, keys: Optional[dict]):
        self._digests = None if keys is None else [(name, _digest(key)) for name, key in keys.items()]

    def client(self, authorization: Optional[str]) -> Optional[str]:
        """The client name, or None for a missing or wrong key."""
        if self._digests is None:
            return LOCAL_CLIENT
        scheme, _, key = (authorization or "").strip().partition(" ")
        given, found = _digest(key.strip()), None
        for name, digest in self._digests:
            if hmac.compare_digest(given, digest) and found is None:
                found = name
        return found if scheme.lower() == "bearer" and key.strip() else None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


# --------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelEntry:
    """A model the server offers: its ``name`` on the wire, its model root folder ``path`` (never
    sent to a client) and the prompt types it has (point, box, prev_mask = mask prompts and tracking)."""
    name: str
    path: str
    prompt_types: tuple


def load_models(specs) -> dict:
    """``{name: ModelEntry}`` from zoo names (``demo``, ``lesionlocator``, ...), model folders (named
    after the folder) or ``NAME=FOLDER``; each checked against the library's allow-list
    (:func:`LesionLocatorLib.inputs.check_model`). Raises ValueError for a duplicate or bad name and
    the library's errors for a missing or broken model."""
    out = {}
    for spec in specs:
        entry = model_entry(str(spec))
        if entry.name in out:
            raise ValueError(f"--models: the name {entry.name!r} is given twice; use NAME=FOLDER to rename one")
        out[entry.name] = entry
    if not out:
        raise ValueError("--models: give at least one model")
    return out


def model_entry(spec: str) -> ModelEntry:
    """One ``--models`` value checked: see :func:`load_models`."""
    from .inputs import check_model
    from .modelfolder import ModelLayoutError, find_model_folder
    from .zoo import _NAME_RE, get_model_info, resolve_model

    name, sep, target = spec.partition("=")
    if not sep:
        name, target = "", spec
    root = resolve_model(target)
    info = None if Path(target).expanduser().exists() else get_model_info(target)
    name = name or (info.name if info is not None else Path(root).name)
    if not _NAME_RE.match(name):
        raise ValueError(f"--models: {name!r} is not a usable model name (letters, digits, '.', '_', '-'); "
                         "use NAME=FOLDER")
    present = []
    for prompt_type in PROMPT_TYPES:
        try:
            find_model_folder(root, prompt_type)
            present.append(prompt_type)
        except ModelLayoutError:
            pass
    check_model(str(root), present or ["point"])
    return ModelEntry(name, str(root), tuple(present))


# --------------------------------------------------------------------------- image cache
class ImageCache:
    """Decoded images per client, keyed (client, image ID), least recently used evicted first while
    the voxel bytes of all clients' images exceed ``budget`` bytes. A job holds references to its
    images, so evicting one mid-job does not break the job (its memory is freed when the job ends)."""

    def __init__(self, budget: int):
        self.budget = int(budget)
        self.used = 0
        self._lock = threading.Lock()
        self._images: OrderedDict = OrderedDict()

    def put(self, client: str, key: str, image) -> int:
        """Keep ``image`` for ``client``; returns its voxel bytes."""
        size = int(image.array.nbytes)
        if size > self.budget:
            raise ServiceError(413, f"the image's {size} voxel bytes exceed the whole cache of {self.budget} bytes")
        with self._lock:
            old = self._images.pop((client, key), None)
            self.used -= 0 if old is None else int(old.array.nbytes)
            self._images[(client, key)] = image
            self.used += size
            while self.used > self.budget:
                (who, evicted), dropped = self._images.popitem(last=False)
                self.used -= int(dropped.array.nbytes)
                log.info("cache: evicted image %s of client %s (%d bytes)", evicted[:12], who, dropped.array.nbytes)
        return size

    def get(self, client: str, keys) -> list:
        """The client's images for ``keys`` (marked as just used), or :class:`ServiceError` 409 with
        ``missing``: the IDs the client must upload (again)."""
        with self._lock:
            missing = sorted({k for k in keys if (client, k) not in self._images})
            if missing:
                raise ServiceError(409, f"{len(missing)} image(s) not cached on this server (never uploaded by you, or "
                                        f"evicted): upload them again and resubmit", missing=missing)
            for k in keys:
                self._images.move_to_end((client, k))
            return [self._images[(client, k)] for k in keys]

    def stats(self) -> dict:
        with self._lock:
            return {"budget_bytes": self.budget, "used_bytes": self.used, "images": len(self._images)}


# --------------------------------------------------------------------------- job requests
@dataclass
class SegmentWork:
    """A segmentation (points, boxes, mask prompts) to run; the device is chosen when it runs."""
    request: object  # SegmentationRequest

    def run(self, runner, device: str, progress, cancel) -> dict:
        """Run on ``device`` with ``runner`` (an InProcessRunner); the result JSON of the API."""
        request = replace(self.request, model=replace(self.request.model, device=device))
        r = runner.run(request, progress, cancel)
        return {"masks": encode_masks(r.masks), "empty": [int(i) for i in r.empty],
                "overlaps": [[int(a), int(b), int(n)] for (a, b), n in r.overlaps.items()],
                "warnings": list(r.warnings), "seconds": r.seconds, "timings": dict(r.timings)}


@dataclass
class TrackWork:
    """A tracking job (baseline masks through the follow-ups, or corrections of an earlier run);
    the device is chosen when it runs. ``kept``: the run to keep for later corrections
    (:class:`TrackStore`), set when it has run."""
    request: object  # TrackRequest
    kept: object = None

    def run(self, runner, device: str, progress, cancel) -> dict:
        request = replace(self.request, model=replace(self.request.model, device=device))
        r = runner.track(request, progress, cancel)
        if request.previous is None:  # a run to correct later (corrections always refer to the first run)
            self.kept = KeptTrack.of(r.tracked)
        return {"masks": encode_masks(timepoint_keys(r.masks)),
                "status": {str(k): list(v) for k, v in r.status.items()},
                "timings": dict(r.timings), "warnings": list(r.warnings), "seconds": r.seconds,
                "registrations": list(r.registrations), "rows": list(r.rows)}


_JOB_FIELDS = {"segment": (("type", "image", "model", "prompts"), ("masks", "options")),
               "track": (("type", "images", "model"),
                         ("baseline", "registration", "min_volume_ml", "min_prompt_fraction", "names", "options",
                          "previous", "corrections"))}


def parse_body(data: bytes) -> dict:
    """A request body -> its JSON object (UTF-8, no duplicate keys); :class:`ProtocolError` "body: ..."."""
    try:
        return parse_message(bytes(data))
    except ProtocolError as e:
        raise ProtocolError("body" + str(e)[len("message"):]) from None


def parse_job(body: dict, models: dict, images: Callable, previous: Optional[Callable] = None) -> object:
    """A job's JSON (see :mod:`LesionLocatorLib.serverapi`) -> :class:`SegmentWork` or
    :class:`TrackWork`. ``models``: name -> ModelEntry; ``images(ids)``: the client's cached images
    (raising 409 for missing ones). Raises :class:`ProtocolError` "<field>: <what>" (422),
    :class:`ServiceError` 404 for an unknown model. Masks are checked against their image's shape
    from their headers before they are decoded. ``previous(job_id)``: the client's kept tracking run
    (:class:`TrackStore`), for a track job that corrects one."""
    if not isinstance(body, dict):
        _fail("body", f"expected a JSON object, got {_show(body)}")
    if "type" not in body:
        _fail("type", "missing")
    if body["type"] not in _JOB_FIELDS:
        _fail("type", f"expected \"segment\" or \"track\", got {_show(body['type'])}")
    _object(body, "", *_JOB_FIELDS[body["type"]])
    if body["type"] == "segment":
        return _segment(body, models, images)
    return _track(body, models, images, previous)


def _segment(body: dict, models: dict, images: Callable) -> SegmentWork:
    from .runner import SegmentationRequest

    key = _image_ref(body["image"], "image")
    prompts = _prompt_list(body["prompts"])
    needs = {"point": "point", "box": "box", "mask": "prev_mask"}
    entry = _model_entry(body["model"], models, {needs[kind] for _, kind, _ in prompts})
    spec = _model_spec(entry, body.get("options"))
    mask_keys = [value for _, kind, value in prompts if kind == "mask"]
    if mask_keys and "masks" not in body:
        _fail("masks", "missing: the mask prompts' masks (encode_masks) must be sent with them")
    if "masks" in body and not mask_keys:
        _fail("masks", "given, but no prompt is a mask prompt")
    (image,) = images([key])
    masks = _decode_masks(body["masks"], "masks", image.shape) if mask_keys else {}
    return SegmentWork(SegmentationRequest(image, [_prompt(p, masks, image) for p in prompts], spec, image_key=key))


def _track(body: dict, models: dict, images: Callable, previous: Optional[Callable] = None) -> TrackWork:
    from .register import BACKENDS
    from .runner import TrackRequest

    refs = _list(body["images"], "images", 2)
    if len(refs) > MAX_TIMEPOINTS:
        _fail("images", f"at most {MAX_TIMEPOINTS} images per tracking job, got {len(refs)}")
    keys = [_image_ref(ref, f"images[{t}]") for t, ref in enumerate(refs)]
    registration = body.get("registration", "simpleitk")
    if registration not in BACKENDS:
        _fail("registration", f"unknown registration backend {_show(registration)}; "
                              f"choose one of {', '.join(BACKENDS)}")
    names = _names(body.get("names"), len(keys))
    min_volume = _number(body.get("min_volume_ml", 0.0), "min_volume_ml", 0.0)
    min_fraction = _number(body.get("min_prompt_fraction", 0.0), "min_prompt_fraction", 0.0, 1.0)
    entry = _model_entry(body["model"], models, {"prev_mask"})
    spec = _model_spec(entry, body.get("options"))
    if "previous" in body:
        return _correction(body, keys, images, previous, spec, registration, min_volume, min_fraction, names)
    if "corrections" in body:
        _fail("corrections", "corrections need \"previous\": the job ID of the tracking run they correct")
    if "baseline" not in body:
        _fail("baseline", "missing")
    scans = images(keys)
    baseline = {_lesion_id(k): m for k, m in _decode_masks(body["baseline"], "baseline", scans[0].shape).items()}
    if not baseline:
        _fail("baseline", "holds no mask: give at least one baseline lesion")
    return TrackWork(TrackRequest(scans, baseline, spec, registration, None, min_volume_ml=min_volume,
                                  min_prompt_fraction=min_fraction, names=names))


def _correction(body: dict, keys: list, images: Callable, previous: Optional[Callable], spec, registration,
                min_volume: float, min_fraction: float, names) -> TrackWork:
    """A track job that corrects the client's earlier run ``previous`` (its job ID) on the same images:
    ``corrections`` as in a corrections file (:mod:`LesionLocatorLib.correctionfile`; scans by index;
    no mask corrections)."""
    from .correctionfile import correction_entry, resolve_corrections
    from .prompts import PromptError
    from .runner import TrackRequest

    if "baseline" in body:
        _fail("baseline", "a correction of an earlier run takes no baseline: its lesions are the run's")
    job = _string(body["previous"], "previous", 64)
    entries = _list(body.get("corrections"), "corrections", 1)
    if previous is None:
        raise ServiceError(409, "this server keeps no tracking runs")
    try:
        kept = previous(job)
    except RunGone as e:
        raise ServiceError(409, str(e)) from None
    if kept.n_images != len(keys):
        _fail("images", f"the run {job} tracked {kept.n_images} scans, this job names {len(keys)}")
    scans = images(keys)
    try:
        checked = [correction_entry(e, f"corrections[{i}]", None) for i, e in enumerate(entries)]
        corrections = resolve_corrections(checked, [f"t{t}" for t in range(len(scans))], scans)
    except PromptError as e:
        _fail("corrections", str(e))
    return TrackWork(TrackRequest(scans, {}, spec, registration, None, min_volume_ml=min_volume,
                                  min_prompt_fraction=min_fraction, names=names, corrections=corrections,
                                  previous=kept.result()))


def _image_ref(value, where: str) -> str:
    if not isinstance(value, str) or not IMAGE_ID.match(value):
        _fail(where, f"expected an image ID (64 lowercase hex digits, serverapi.image_id), got {_show(value)}")
    return value


def _prompt_list(value) -> list:
    """[(id, kind, value)]: points (LPS mm), boxes (2 corners) or mask keys (text)."""
    out = prompt_entries(value, "prompts", 1, MAX_LESIONS)
    for n, (pid, kind, spec) in enumerate(out):
        if kind == "mask":
            _string(spec, f"prompts[{n}].mask", 200)
    return out


def _prompt(parsed: tuple, masks: dict, image):
    from .prompts import Box, MaskPrompt, Point

    pid, kind, value = parsed
    if kind == "point":
        return Point(pid, tuple(value))
    if kind == "box":
        return Box.from_points(pid, value)
    return MaskPrompt(pid, image.with_array(masks[value].astype(np.uint8)))


def _model_entry(name, models: dict, needs: set):
    if not isinstance(name, str):
        _fail("model", f"expected a model name, got {_show(name)}")
    entry = models.get(name)
    if entry is None:
        raise ServiceError(404, f"unknown model {_show(name)}; this server has: {', '.join(models)}")
    lacking = sorted(needs - set(entry.prompt_types))
    if lacking:
        what = {"prev_mask": "mask-prompt and tracking (LesionLocatorTrack)"}
        _fail("model", f"model {name!r} has no {' or '.join(what.get(t, t) for t in lacking)} model")
    return entry


def _model_spec(entry: ModelEntry, options):
    """The ModelSpec of a model entry with the job's ``options`` (folds, tta; the device is the server's)."""
    from .modelfolder import ModelSpec

    options = {} if options is None else _object(options, "options", (), ("folds", "tta"))
    checked = _model({**options, "path": entry.path}, "options")
    folds = tuple(checked["folds"]) if checked["folds"] is not None else None
    return ModelSpec(entry.path, folds, "cpu", checked["tta"])


def _decode_masks(text, where: str, shape) -> dict:
    from .serverapi import decode_masks

    try:
        return decode_masks(text, shape=tuple(shape), max_masks=MAX_LESIONS)
    except EncodingError as e:
        _fail(where, str(e))


def _lesion_id(key: str) -> int:
    if not (key.isascii() and key.isdigit() and len(key) < 8):
        _fail("baseline", f"mask key {_show(key)} is not a lesion ID (1..{MAX_PROMPT_ID})")
    return _integer(int(key), f"baseline[{key}]", 1, MAX_PROMPT_ID)


def _names(value, count: int):
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != count:
        _fail("names", f"expected null or {count} names (one per image), got {_show(value)}")
    return [_string(n, f"names[{i}]", 200) for i, n in enumerate(value)]


# --------------------------------------------------------------------------- jobs
@dataclass(eq=False)
class Job:
    """One submitted job. ``version`` grows with every visible change (long polls wait for it)."""
    id: str
    client: str
    work: object
    state: str = QUEUED
    progress: float = 0.0
    message: str = ""
    result: Optional[dict] = None
    error: Optional[dict] = None
    device: Optional[str] = None
    token: CancelToken = field(default_factory=CancelToken)
    version: int = 0
    finished_at: Optional[float] = None


def _library_errors() -> tuple:
    from .imagechecks import ImageError
    from .modelfolder import CheckpointError
    from .plans import ModelLayoutError
    from .prompts import PromptError
    from .register import RegistrationError

    return PromptError, ImageError, ModelLayoutError, CheckpointError, RegistrationError, MemoryError


_WIRE_KINDS = ("PromptError", "ModelLayoutError", "PlansError", "UnsupportedPlansError", "CheckpointError",
               "ImageError", "RegistrationError", "MemoryError")  # what protocol.library_exception re-creates


def job_error(exc: BaseException, job_id: str) -> dict:
    """The ``error`` of a failed job: a library error's class name (the nearest one a client can
    re-create) and the first line of its message; anything else an internal error, logged with its
    traceback and never sent."""
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        return {"kind": "MemoryError", "message": "the device ran out of memory for this job"}
    if isinstance(exc, _library_errors()):
        kind = next(c.__name__ for c in type(exc).__mro__ if c.__name__ in _WIRE_KINDS)
        text = (str(exc).strip() or kind).splitlines()[0]
        log.info("job %s failed: %s: %s", job_id, kind, text)
        return {"kind": kind, "message": text}
    log.error("job %s: internal error", job_id, exc_info=exc)
    return {"kind": "InternalError", "message": f"internal error in job {job_id}; the details are in the server's log"}


class JobQueue:
    """A FIFO queue of jobs shared by one worker thread per entry of ``devices``: each device runs
    one job at a time with its own runner (``make_runner()``, called in its thread; default
    :class:`~LesionLocatorLib.runner.InProcessRunner`, which keeps that device's models loaded).
    A job's ``work`` has ``run(runner, device, progress, cancel) -> result dict``.

    A client has at most ``max_per_client`` jobs queued or running (more: 429); a finished job is
    kept ``ttl_s`` seconds. All state is guarded by one lock; its condition wakes long polls."""

    def __init__(self, devices, max_per_client: int = 4, ttl_s: float = RESULT_TTL_S, make_runner=None,
                 tracks: Optional["TrackStore"] = None):
        self.devices = list(devices)
        self.tracks = tracks if tracks is not None else TrackStore()
        self.max_per_client = int(max_per_client)
        self.ttl_s = float(ttl_s)
        self._make_runner = make_runner or _in_process_runner
        self._cond = threading.Condition()
        self._queue: deque = deque()
        self._jobs: dict = {}
        self._closed = False
        self._threads = [threading.Thread(target=self._serve, args=(d,), name=f"lesionlocator-{d}-{n}", daemon=True)
                         for n, d in enumerate(self.devices)]

    def start(self) -> None:
        for thread in self._threads:
            if not thread.is_alive():
                thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Cancel queued and running jobs, wake every long poll, wait up to ``timeout_s`` for the threads."""
        with self._cond:
            self._closed = True
            while self._queue:
                self._finish(self._queue.popleft(), CANCELLED, message="the server is shutting down")
            for job in self._jobs.values():
                job.token.cancel()
            self._cond.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            if thread.is_alive():
                thread.join(max(deadline - time.monotonic(), 0.0))

    # ------------------------------------------------------------------ the client's calls
    def check_limit(self, client: str) -> None:
        """Raise 429 when ``client`` already has its maximum of jobs queued or running."""
        with self._cond:
            self._check_limit(client)

    def submit(self, client: str, work) -> dict:
        """Queue ``work`` for ``client``; the 202 reply ``{"job", "state", "position"}``."""
        with self._cond:
            if self._closed:
                raise ServiceError(503, "the server is shutting down")
            self._expire()
            self._check_limit(client)
            job = Job(uuid.uuid4().hex, client, work)
            self._jobs[job.id] = job
            self._queue.append(job)
            self._cond.notify_all()
            log.info("job %s (%s) of client %s queued at position %d", job.id, type(work).__name__, client,
                     len(self._queue) - 1)
            return {"job": job.id, "state": job.state, "position": len(self._queue) - 1}

    def status(self, client: str, job_id: str, wait_s: float = 0.0) -> dict:
        """The job's state; with ``wait_s`` > 0 (at most MAX_WAIT_S) answered as soon as its state,
        progress or message changes, or when that time has passed; at once for a finished job. A
        queued job's position is in every answer, but its moving up the queue does not end a wait
        (that would wake every waiting client at every job start)."""
        wait_s = min(wait_s, MAX_WAIT_S) if wait_s > 0 else 0.0  # also NaN -> 0
        deadline = time.monotonic() + wait_s
        with self._cond:
            job = self._find(client, job_id)
            version = job.version
            while job.version == version and job.state not in FINISHED and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return self._describe(job)

    def cancel(self, client: str, job_id: str) -> dict:
        """Cancel: a queued job is dropped at once, a running one stops at its next check (its state
        turns 'cancelled' then); a finished one is left as it is. ``{"job", "state"}``."""
        with self._cond:
            job = self._find(client, job_id)
            if job.state == QUEUED:
                self._queue.remove(job)
                self._finish(job, CANCELLED, message="cancelled before it started")
            elif job.state == RUNNING:
                job.token.cancel()
                job.message = "cancelling"
                self._changed(job)
            log.info("job %s: cancel asked by client %s (%s)", job.id, client, job.state)
            return {"job": job.id, "state": job.state}

    def counts(self) -> dict:
        with self._cond:
            running = sum(1 for j in self._jobs.values() if j.state == RUNNING)
            return {"queued": len(self._queue), "running": running}

    # ------------------------------------------------------------------ inside (lock held)
    def _check_limit(self, client: str) -> None:
        active = sum(1 for j in self._jobs.values() if j.client == client and j.state in (QUEUED, RUNNING))
        if active >= self.max_per_client:
            raise ServiceError(429, f"busy: you already have {active} jobs queued or running, the limit per client; "
                                    f"wait for one to finish (or cancel one) and submit again")

    def _find(self, client: str, job_id: str) -> Job:
        self._expire()
        job = self._jobs.get(job_id)
        if job is None or job.client != client:
            raise ServiceError(404, f"no job {_show(job_id, 80)} (unknown, another client's, or expired)")
        return job

    def _expire(self) -> None:
        now = time.monotonic()
        for job_id in [j.id for j in self._jobs.values() if j.finished_at is not None
                       and now - j.finished_at > self.ttl_s]:
            del self._jobs[job_id]

    def _describe(self, job: Job) -> dict:
        position = self._queue.index(job) if job.state == QUEUED else 0
        message = f"waiting for a device: {position} job(s) ahead" if job.state == QUEUED else job.message
        out = {"job": job.id, "state": job.state, "position": position, "progress": job.progress, "message": message}
        if job.state == DONE:
            out["result"] = job.result
        elif job.state == FAILED:
            out["error"] = job.error
        return out

    def _changed(self, job: Job) -> None:
        job.version += 1
        self._cond.notify_all()

    def _finish(self, job: Job, state: str, result=None, error=None, message: str = "") -> None:
        job.state, job.result, job.error, job.work = state, result, error, None  # drop the images
        job.message = message or state
        job.progress = 1.0 if state == DONE else job.progress
        job.finished_at = time.monotonic()
        self._changed(job)

    # ------------------------------------------------------------------ device threads
    def _serve(self, device: str) -> None:
        runner = self._make_runner()
        try:
            while True:
                job = self._next(device)
                if job is None:
                    return
                self._execute(job, runner, device)
        finally:
            runner.close()

    def _next(self, device: str) -> Optional[Job]:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            job = self._queue.popleft()
            job.state, job.device, job.message = RUNNING, device, f"running on {device}"
            self._changed(job)
            return job

    def _execute(self, job: Job, runner, device: str) -> None:
        start = time.monotonic()
        log.info("job %s of client %s: running on %s", job.id, job.client, device)
        try:
            result = job.work.run(runner, device, self._progress(job), job.token)
            if getattr(job.work, "kept", None) is not None:
                self.tracks.put(job.client, job.id, job.work.kept)
            outcome = dict(state=DONE, result=_json_safe(result), message="done")
        except Cancelled:
            outcome = dict(state=CANCELLED, message="cancelled")
        except Exception as e:  # noqa: BLE001 - every failure becomes the job's error, never a crash
            outcome = dict(state=FAILED, error=job_error(e, job.id), message="failed")
        with self._cond:
            self._finish(job, **outcome)
        log.info("job %s: %s after %.1f s on %s", job.id, job.state, time.monotonic() - start, device)

    def _progress(self, job: Job):
        def report(fraction: float, message: str) -> None:
            with self._cond:
                job.progress = min(max(float(fraction), 0.0), 1.0)
                job.message = str(message)[:200]
                self._changed(job)
        return report


def _in_process_runner():
    from .runner import InProcessRunner

    return InProcessRunner()


def _json_safe(value):
    """``value`` with numpy scalars as Python numbers and NaN/Inf as None (JSON has neither)."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --------------------------------------------------------------------------- the service
class Service:
    """What the HTTP endpoints call, one method per endpoint: the models (checked at construction),
    the image cache, the job queue and the authenticator of one ``config``. :meth:`start` starts the
    device threads, :meth:`close` cancels the jobs and stops them."""

    def __init__(self, config: ServerConfig, make_runner=None):
        self.config = config
        self.models = load_models(config.models)
        self.cache = ImageCache(config.max_cache_bytes)
        self.jobs = JobQueue(config.devices, config.max_jobs_per_client, config.result_ttl_s, make_runner)
        self.auth = Authenticator(config.keys)

    def start(self) -> None:
        self.jobs.start()

    def close(self) -> None:
        self.jobs.close()

    def health(self) -> dict:
        from . import __version__
        from .serverapi import API_VERSION

        return {"status": "ok", "version": __version__, "api": API_VERSION}

    def info(self) -> dict:
        config = self.config
        return {**{k: v for k, v in self.health().items() if k != "status"}, "devices": list(config.devices),
                "models": [{"name": m.name, "prompt_types": list(m.prompt_types)} for m in self.models.values()],
                "max_upload_bytes": config.max_upload_bytes, "max_jobs_per_client": config.max_jobs_per_client,
                "cache": self.cache.stats(), "queue": self.jobs.counts()}

    def upload(self, client: str, key: str, data) -> dict:
        """Decode, check and cache an uploaded image (:func:`~LesionLocatorLib.serverapi.encode_image`
        bytes) under its ID; 400 for a bad ID or bytes that do not decode or do not match it."""
        if not IMAGE_ID.match(key):
            raise ServiceError(400, f"image ID {_show(key, 80)}: expected 64 lowercase hex digits (serverapi.image_id)")
        try:
            image = decode_image(data, self.cache.budget)
        except EncodingError as e:
            raise ServiceError(400, f"image {key[:12]}...: {e}") from None
        actual = image_id(image)
        if not hmac.compare_digest(actual, key):
            raise ServiceError(400, f"the image's content ID is {actual}, not {key}: upload it under its image_id()")
        size = self.cache.put(client, key, image)
        log.info("client %s uploaded image %s (%s, %d voxel bytes)", client, key[:12], "x".join(map(str, image.shape)),
                 size)
        return {"image": key, "bytes": size}

    def submit(self, client: str, data) -> dict:
        """Check a job body and queue it (422 naming the field, 404 unknown model, 409 missing images, 429 busy)."""
        self.jobs.check_limit(client)
        try:
            work = parse_job(parse_body(data), self.models, lambda keys: self.cache.get(client, keys),
                             lambda job: self.jobs.tracks.get(client, job))
        except ProtocolError as e:
            raise ServiceError(422, str(e)) from None
        return self.jobs.submit(client, work)


def describe_config(config: ServerConfig, models: dict) -> str:
    """Lines for the console when the server starts: URL, models, devices, limits (no keys)."""
    scheme = "https" if config.ssl_certfile else "http"
    host = f"[{config.host}]" if ":" in config.host else config.host
    clients = "none (loopback only, every request is client 'local')" if config.keys is None else ", ".join(config.keys)
    return "\n".join([f"lesionlocator serve: {scheme}://{host}:{config.port}",
                      "  models:  " + ", ".join(f"{m.name} ({'/'.join(m.prompt_types)})" for m in models.values()),
                      "  devices: " + ", ".join(config.devices),
                      f"  clients: {clients}",
                      f"  image cache {config.max_cache_bytes / GIB:g} GiB, uploads up to "
                      f"{config.max_upload_bytes / MIB:g} MiB, {config.max_jobs_per_client} jobs per client"])

