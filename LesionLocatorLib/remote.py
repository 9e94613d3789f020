"""The client of ``lesionlocator serve``: :class:`RemoteRunner` runs segmentation and tracking
requests on a LesionLocator server over the HTTP API of :mod:`LesionLocatorLib.serverapi`, behind
the same runner interface as :class:`~LesionLocatorLib.runner.InProcessRunner` and
:class:`~LesionLocatorLib.runner.WorkerProcessRunner` (``run``, ``track``, ``close``). Standard
library (``http.client``) and numpy only: it runs in Slicer's Python, which has no torch and no
third-party HTTP client.

What travels: images as :func:`~LesionLocatorLib.serverapi.encode_image` bytes (uploaded once per
image and server: a job names its images by content ID, and when the server answers 409 "missing"
-- a first use, an eviction from its cache, a restart -- the client uploads them and submits the
job again, transparently), prompts as LPS millimetres, masks as
:func:`~LesionLocatorLib.serverapi.encode_masks` text. Never a file path.

Choosing the model: the server serves models by **name** (``GET /v1/info``). ``RemoteRunner(model=
NAME)`` runs every request with that model; without it, the server's first listed model (its
default) is used. A request's :class:`~LesionLocatorLib.modelfolder.ModelSpec` is a local folder
and means nothing to the server: only its ``folds`` and ``tta`` are sent (as ``options``); the
server chooses the device.

Speed per click (after the upload): one kept-alive connection (a small pool, so a background
thread and the GUI thread do not share a socket), the job submitted with the image's ID only, its
end heard at once through long polling (``GET /v1/jobs/{id}?wait=``), and an image's content ID
(SHA-256 of its voxels) computed once per ``SegmentationRequest.image_key``: the key's contract
(a new key whenever voxels or geometry change, as the worker runner already relies on) makes the
cached ID safe; the shape and voxel type are checked too. Requests without a key are hashed each
time.

Errors: the library's own exception with the server's message for a failed job
(:func:`~LesionLocatorLib.protocol.library_exception`), :class:`~LesionLocatorLib.cancel.Cancelled`
after Cancel (the job is cancelled on the server, which frees its device), and
:class:`ServerError` -- a :class:`~LesionLocatorLib.protocol.WorkerError`, so front ends treat it
as a failed worker -- naming the server's URL for everything about the connection: not reachable,
gone mid-job, refused API key (401), busy (429), upload too large (413).

The command line (``--server URL --api-key-file F``) uses :func:`segment_on_server` and
:func:`track_study_on_server`, which give what :func:`LesionLocatorLib.predict.segment` and
:func:`LesionLocatorLib.study.track_study` give, so both write the same files.
"""
from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import quote, urlsplit

import numpy as np

from . import serverapi
from .cancel import Cancelled
from .protocol import WorkerError, library_exception
from .runner import (ProgressCallback, SegmentationRequest, SegmentationResponse, TrackRequest, TrackResponse,
                     segmentation_response, track_response)

DEFAULT_TIMEOUT_S = 60.0
FINAL_STATES = ("done", "failed", "cancelled")
_RETRYABLE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class ServerError(WorkerError):
    """The server could not be reached, refused a request or went away mid-job; the message names
    its URL. ``status``: the HTTP status of the refusal, or None when there was no answer."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


def read_api_key(path) -> str:
    """The API key in a key file: its first line that holds one once ``#`` comments and spaces are
    removed, written ``KEY`` or ``NAME:KEY`` (the server's keys-file format, so a line copied from
    it works). Keys are read from files, never taken on a command line."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"API key file not found: {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"API key file {path} is not UTF-8 text") from None
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, key = line.partition(":")
            return key.strip() if sep else line
    raise ValueError(f"API key file {path} holds no key (only empty or # comment lines)")


def _check_key(key: Optional[str]) -> Optional[str]:
    if key is None or key == "":
        return None
    if not all(33 <= ord(ch) < 127 for ch in key):
        raise ValueError("the API key must be printable ASCII without spaces")
    return key


def _split_url(url: str) -> tuple:
    """(scheme, host, port, path prefix) of a server URL ``http(s)://host[:port][/prefix]``."""
    parts = urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a server URL: {url!r}; give http://host:port or https://host[:port]")
    if parts.query or parts.fragment or parts.username:
        raise ValueError(f"give the server URL without a query, fragment or user name: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"bad port in the server URL {url!r}") from None
    return parts.scheme, parts.hostname, port, parts.path.rstrip("/")


def _detail(data: bytes) -> str:
    """The one-line ``detail`` of an error answer (FastAPI's list form joined), else the text."""
    try:
        detail = json.loads(data).get("detail", "")
    except (ValueError, AttributeError):
        return data.decode("utf-8", "replace").strip()[:300]
    if isinstance(detail, list):
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg', '')}"
                           if isinstance(d, dict) else str(d) for d in detail)
    return str(detail)


class RemoteRunner:
    """Runs :class:`~LesionLocatorLib.runner.SegmentationRequest` and
    :class:`~LesionLocatorLib.runner.TrackRequest` on a ``lesionlocator serve`` server.

    ``url``: ``http://host:port`` or ``https://host[:port]`` (a path prefix is kept, for a server
    behind a reverse proxy). ``api_key``: the client's key (see :func:`read_api_key`).
    ``timeout_s``: seconds to wait for the connection and for each answer (a job itself may run
    longer). ``model``: the server model's name (default: the server's first). ``ca_file``: a CA
    bundle for https servers with a private certificate authority (default: the system's).
    ``poll_s``: the long-polling wait; progress is reported and Cancel noticed at least that
    often. ``cancel_timeout_s``: how long to wait for the server to confirm a cancel.

    ``uploads`` counts the images uploaded (for tests and a status line)."""

    IMAGE_IDS = 16  # image keys whose content ID is remembered

    def __init__(self, url: str, api_key: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 model: Optional[str] = None, ca_file=None, poll_s: float = 0.5, cancel_timeout_s: float = 10.0):
        self.scheme, self.host, self.port, self.prefix = _split_url(url)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"{self.scheme}://{host}:{self.port}{self.prefix}"
        self._key = _check_key(api_key)
        self.timeout_s = float(timeout_s)
        self.model = model or None
        self.poll_s = float(poll_s)
        self.cancel_timeout_s = float(cancel_timeout_s)
        self._context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None) \
            if self.scheme == "https" else None
        self._idle: list = []
        self._lock = threading.Lock()
        self._ids: OrderedDict = OrderedDict()  # image_key -> (shape, dtype, content ID)
        self._info: Optional[dict] = None
        self.uploads = 0

    def __repr__(self) -> str:  # never shows the key
        return f"RemoteRunner({self.url!r}, model={self.model!r})"

    # ------------------------------------------------------------------ HTTP
    def _connect(self) -> http.client.HTTPConnection:
        if self._context is not None:
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout_s, context=self._context)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)

    def _take(self) -> tuple:
        """(a connection, whether it was used before): an idle kept-alive one when there is one."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _exchange(self, method: str, path: str, body: Optional[bytes], headers: dict) -> tuple:
        """(status, body bytes). A kept-alive connection that turns out to have been closed by the
        server (idle timeout, restart) before it answered is dropped and the request sent again on
        the next one (a fresh connection once the idle ones are used up)."""
        while True:
            conn, reused = self._take()
            try:
                conn.request(method, self.prefix + serverapi.PREFIX + path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except _RETRYABLE:
                conn.close()
                if reused:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            if response.will_close:
                conn.close()
            else:
                with self._lock:
                    self._idle.append(conn)
            return response.status, data

    def _call(self, method: str, path: str, body=None, raw: bool = False, during: str = "") -> tuple:
        """(HTTP status, decoded JSON answer) of one request; :class:`ServerError` (naming the URL)
        when there is no answer or the server refuses the key or is busy."""
        headers = {"Accept": "application/json"}
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key}"
        if body is not None:
            headers["Content-Type"] = "application/octet-stream" if raw else "application/json"
            body = body if raw else json.dumps(body, allow_nan=False).encode()
        try:
            status, data = self._exchange(method, path, body, headers)
        except (OSError, http.client.HTTPException) as e:
            raise self._unreachable(e, during) from None
        if status == 401:
            raise ServerError(f"the server at {self.url} refused the API key: " + (
                "check the key you were given" if self._key else "none was given (the key, or --api-key-file)"), 401)
        if status == 429:
            raise ServerError(f"the server at {self.url} is busy: {_detail(data)}; try again when your running "
                              f"jobs have finished", 429)
        if status >= 500:
            raise ServerError(f"the server at {self.url} failed ({status}): {_detail(data)}", status)
        try:
            answer = json.loads(data) if data else {}
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ServerError(f"{self.url} did not answer as a LesionLocator server does (HTTP {status}, not a JSON "
                              f"object)", status)
        return status, answer

    def _unreachable(self, error: BaseException, during: str) -> ServerError:
        reason = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        if during:
            return ServerError(f"the LesionLocator server at {self.url} went away {during} ({reason}); nothing "
                               f"was changed. Check that it is running, then try again")
        return ServerError(f"cannot reach the LesionLocator server at {self.url} ({reason})")

    def _refused(self, status: int, answer: dict, what: str) -> ServerError:
        return ServerError(f"the server at {self.url} refused {what} (HTTP {status}): {answer.get('detail', '')}",
                           status)

    # ------------------------------------------------------------------ server
    def health(self) -> dict:
        """``GET /v1/health``: status, version and API level (no key needed)."""
        status, answer = self._call("GET", "/health")
        if status != 200 or answer.get("status") != "ok":
            raise self._refused(status, answer, "the health check")
        return answer

    def info(self) -> dict:
        """``GET /v1/info``: version, devices, models (name, prompt types), limits, cache, queue."""
        status, answer = self._call("GET", "/info")
        if status != 200:
            raise self._refused(status, answer, "the info request")
        if answer.get("api") != serverapi.API_VERSION:
            raise ServerError(f"the server at {self.url} speaks API {answer.get('api')!r}; this client speaks "
                              f"{serverapi.API_VERSION}: update the one that is older")
        self._info = answer
        return answer

    @property
    def server_info(self) -> Optional[dict]:
        """The last :meth:`info` answer (None before the first)."""
        return self._info

    def test_connection(self) -> str:
        """One line for a status label: the server's version, devices, models and queue, or what
        went wrong (never raises for a server that cannot be used)."""
        try:
            info = self.info()
        except (WorkerError, ValueError, OSError) as e:
            return f"Connection failed: {e}"
        models = ", ".join(m.get("name", "?") for m in info.get("models", [])) or "none"
        queue = info.get("queue", {})
        return (f"Connected to {self.url}: LesionLocator {info.get('version', '?')}, devices "
                f"{', '.join(info.get('devices', [])) or '?'}, models {models}; {queue.get('queued', 0)} queued, "
                f"{queue.get('running', 0)} running")

    def model_names(self) -> list:
        """The names of the server's models, its default first."""
        info = self._info or self.info()
        return [m["name"] for m in info.get("models", [])]

    def model_name(self) -> str:
        """The model requests run with: ``model``, else the server's first (default) model."""
        if self.model:
            return self.model
        names = self.model_names()
        if not names:
            raise ServerError(f"the server at {self.url} serves no model")
        return names[0]

    # ------------------------------------------------------------------ images
    def image_id(self, image, key: Optional[str] = None) -> str:
        """The image's content ID (:func:`~LesionLocatorLib.serverapi.image_id`), remembered under
        ``key`` (a request's ``image_key``) together with the shape and voxel type."""
        array = np.asarray(image.array)
        stamp = (tuple(array.shape), array.dtype.str)
        with self._lock:
            cached = self._ids.get(key) if key else None
            if cached is not None and cached[0] == stamp:
                self._ids.move_to_end(key)
                return cached[1]
        digest = serverapi.image_id(image)
        if key:
            with self._lock:
                self._ids[key] = (stamp, digest)
                while len(self._ids) > self.IMAGE_IDS:
                    self._ids.popitem(last=False)
        return digest

    def upload(self, image, digest: Optional[str] = None) -> str:
        """``PUT /v1/images/{id}``: send an image (its ID is computed when not given); returns the ID.
        An image over the server's upload limit (``max_upload_bytes`` of ``/v1/info``) is refused
        here, before sending: a server stops reading an oversized body, so the refusal would
        otherwise arrive as a broken connection."""
        digest = digest or serverapi.image_id(image)
        data = serverapi.encode_image(image)
        limit = (self._info or self.info()).get("max_upload_bytes")
        if isinstance(limit, int) and len(data) > limit:
            raise ServerError(f"the image is {len(data)} bytes encoded, over the upload limit of {limit} bytes of the "
                              f"server at {self.url}; ask its administrator for a larger --max-upload-mb", 413)
        status, answer = self._call("PUT", f"/images/{digest}", data, raw=True, during="while the image was uploaded")
        if status not in (200, 201):
            raise self._refused(status, answer, "the image upload" if status != 413 else "the image: it is too large")
        self.uploads += 1
        return digest

    # ------------------------------------------------------------------ jobs
    def _submit(self, payload: dict, images: dict) -> dict:
        """``POST /v1/jobs``; images the server does not hold (409 ``missing``) are uploaded and the
        job submitted again. ``images``: {content ID: Image}. Returns the job's first state."""
        for attempt in range(3):
            status, answer = self._call("POST", "/jobs", payload)
            if status in (200, 201, 202):
                return answer
            if status == 409 and answer.get("missing") and attempt < 2:
                unknown = [i for i in answer["missing"] if i not in images]
                if unknown:
                    raise ServerError(f"the server at {self.url} asked for images this job did not name: {unknown}")
                for digest in answer["missing"]:
                    self.upload(images[digest], digest)
                continue
            if status == 404:
                from .plans import ModelLayoutError
                raise ModelLayoutError(f"the server at {self.url} has no model {payload['model']!r} "
                                       f"({answer.get('detail', '')}); it serves: {', '.join(self.model_names())}")
            if status == 422:
                from .protocol import ProtocolError
                raise ProtocolError(answer.get("detail", f"the server at {self.url} refused the job"))
            raise self._refused(status, answer, "the job")
        raise ServerError(f"the server at {self.url} keeps losing the uploaded images (its cache is too small?)")

    @staticmethod
    def _progress(state: dict) -> tuple:
        if state.get("state") == "queued":
            return 0.0, f"queued on the server, position {int(state.get('position') or 0) + 1}"
        return float(state.get("progress") or 0.0), state.get("message") or state.get("state", "")

    def _poll(self, job: str) -> dict:
        wait = max(0.0, min(self.poll_s, serverapi.MAX_WAIT_S, self.timeout_s / 2))
        status, answer = self._call("GET", f"/jobs/{quote(job)}?wait={wait:g}", during="while it ran the job")
        if status == 404:
            raise ServerError(f"the server at {self.url} no longer knows job {job} (was it restarted?); nothing was "
                              f"changed, try again", 404)
        if status != 200:
            raise self._refused(status, answer, "the job status request")
        return answer

    def cancel_job(self, job: str) -> dict:
        """``DELETE /v1/jobs/{id}``: drop a queued job, stop a running one."""
        status, answer = self._call("DELETE", f"/jobs/{quote(job)}", during="while the job was cancelled")
        if status not in (200, 202, 404):
            raise self._refused(status, answer, "the cancel")
        return answer

    def _follow(self, state: dict, progress: Optional[ProgressCallback], cancel) -> dict:
        """Relay the job's progress until it ends; its result, or the library's exception,
        :class:`Cancelled`, :class:`ServerError`. A cancelled token (or Ctrl-C) cancels the job."""
        report = progress or (lambda fraction, message: None)
        job, cancel_sent = state["job"], None
        try:
            while True:
                if cancel_sent is None and cancel is not None and getattr(cancel, "cancelled", False):
                    self.cancel_job(job)
                    cancel_sent = time.monotonic()
                if cancel_sent is not None and time.monotonic() - cancel_sent > self.cancel_timeout_s:
                    raise Cancelled("cancelled by the user (the server did not confirm in time)")
                report(*self._progress(state))
                if state.get("state") in FINAL_STATES:
                    return self._outcome(state)
                state = self._poll(job)
        except KeyboardInterrupt:
            self._cancel_quietly(job)
            raise

    def _cancel_quietly(self, job: str) -> None:
        try:
            self.cancel_job(job)
        except (WorkerError, OSError):
            pass

    @staticmethod
    def _outcome(state: dict) -> dict:
        if state["state"] == "done":
            return state.get("result") or {}
        if state["state"] == "cancelled":
            raise Cancelled("cancelled by the user")
        error = state.get("error") or {}
        raise library_exception(error.get("kind", "ServerError"), error.get("message", "the job failed"))

    def _options(self, spec) -> dict:
        folds = list(spec.folds) if getattr(spec, "folds", None) is not None else None
        return {"folds": folds, "tta": getattr(spec, "tta", None)}

    # ------------------------------------------------------------------ the runner interface
    def run(self, request: SegmentationRequest, progress: Optional[ProgressCallback] = None,
            cancel=None) -> SegmentationResponse:
        """Segment on the server: one boolean (z, y, x) mask per prompt ID on the request image's grid.
        Mask prompts are sent resampled onto the image's grid."""
        start = time.perf_counter()
        digest = self.image_id(request.image, request.image_key)
        masks = request.prompt_masks()
        prompts = request.prompts_json(mask_file="")  # points and boxes in LPS mm, as the worker gets them
        for entry in prompts:
            if "mask" in entry:
                entry["mask"] = str(entry["id"])
        payload = {"type": "segment", "image": digest, "model": self.model_name(), "prompts": prompts,
                   "options": self._options(request.model)}
        if masks:
            payload["masks"] = serverapi.encode_masks(masks)
        result = self._follow(self._submit(payload, {digest: request.image}), progress, cancel)
        response = segmentation_response(request.id, serverapi.decode_masks(result["masks"], request.image.shape),
                                         result)
        response.seconds = time.perf_counter() - start
        return response

    def track(self, request: TrackRequest, progress: Optional[ProgressCallback] = None,
              cancel=None) -> TrackResponse:
        """Track on the server (registration, network and measurements there)."""
        if request.registration_options:
            raise ValueError("registration options cannot be sent to a LesionLocator server; track without them")
        correcting = request.previous is not None or bool(request.corrections)
        if correcting and (not isinstance(request.previous, ServerRun) or request.previous.url != self.url):
            raise ValueError("a run tracked elsewhere cannot be corrected on this server: correct it where it was "
                             "tracked, or track it on this server first")
        start = time.perf_counter()
        ids = [serverapi.image_id(image) for image in request.images]
        payload = {"type": "track", "images": ids, "model": self.model_name(),
                   "registration": request.registration, "min_volume_ml": float(request.min_volume_ml),
                   "min_prompt_fraction": float(request.min_prompt_fraction),
                   "names": list(request.names) if request.names is not None else None,
                   "options": self._options(request.model)}
        if correcting:
            from .correctionfile import correction_entries

            payload.update(previous=request.previous.job, corrections=correction_entries(request.corrections))
        else:
            payload["baseline"] = serverapi.encode_masks({str(int(k)): v for k, v in request.baseline.items()})
        state = self._submit(payload, dict(zip(ids, request.images)))
        result = self._follow(state, progress, cancel)
        response = track_response(request.id, len(request.images), serverapi.decode_masks(result["masks"]), result)
        response.seconds = time.perf_counter() - start
        if request.previous is None:
            response.tracked = ServerRun(self.url, state["job"])
        return response

    def close(self) -> None:
        """Close the kept-alive connections (the runner can still be used: it reconnects)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def __enter__(self) -> "RemoteRunner":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __del__(self):  # a runner dropped without close(): its sockets closed now, not left to the collector
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to close
            pass


# --------------------------------------------------------------------------- command line
def world_prompt(prompt, image):
    """A voxel point or box prompt (:class:`~LesionLocatorLib.prompts.VoxelPrompt`, continuous
    (z, y, x) indices, boxes half-open) as the LPS world Point or Box that the server's
    :func:`~LesionLocatorLib.prompts.to_voxel_prompt` turns back into the same voxel coordinates,
    so that ``--server`` segments exactly what a local run segments. World prompts are returned
    as they are. :class:`~LesionLocatorLib.prompts.PromptError` for a voxel box that no world box
    gives back (an oblique image: a world box is axis-aligned in LPS, not in voxels)."""
    from .prompts import Box, Point, PromptError, VoxelPrompt, to_voxel_prompt

    if not isinstance(prompt, VoxelPrompt):
        return prompt
    to_voxel_prompt(prompt, image)  # the library's checks and messages (outside the image, ...)
    if prompt.kind == "point":
        return Point(prompt.id, tuple(float(v) for v in _exact_world(image, prompt.coords)), prompt.name)
    corners = np.asarray(prompt.coords, float).reshape(3, 2)
    box = Box.from_points(prompt.id, image.index_to_world(np.array([corners[:, 0], corners[:, 1] - 1])),
                          prompt.name)
    back = to_voxel_prompt(box, image).coords
    if not np.array_equal(np.asarray(back, float), np.asarray(prompt.coords, float)):
        raise PromptError(f"prompt {prompt.id}: the voxel box {list(prompt.coords)} has no world box that gives it "
                          f"back on this image (oblique or fractional voxel box): give the box as a world box "
                          f"(--world) to segment it on a server")
    return box


def _exact_world(image, index_zyx, reach: int = 2) -> np.ndarray:
    """LPS mm whose :meth:`Image.world_to_index` is nearest ``index_zyx``: the plain conversion
    and its neighbours up to ``reach`` floating-point steps on each axis; exact where one of them
    is (often not: millimetres cannot hold every index to the last bit, so a point may come back
    about 1e-14 voxels off, which changes nothing unless it lies exactly on a half voxel of the
    model's grid)."""
    import itertools

    index_zyx = np.asarray(index_zyx, float)
    world = image.index_to_world(index_zyx)
    steps = np.array(list(itertools.product(range(-reach, reach + 1), repeat=3)), float)
    candidates = world + steps * np.spacing(np.abs(world))
    error = np.abs(image.world_to_index(candidates) - index_zyx)
    return candidates[np.lexsort((error.sum(axis=1), error.max(axis=1)))[0]]


@dataclass(frozen=True)
class ServerRun:
    """A tracking run kept on a server (``TrackResponse.tracked`` of :meth:`RemoteRunner.track`): give it
    back as ``TrackRequest.previous`` with corrections; the server keeps a client's last 2 runs for
    8 hours (:class:`LesionLocatorLib.serverjobs.TrackStore`)."""
    url: str
    job: str


def labels_from_masks(masks: dict, image):
    """The uint16 instance label Image of per-lesion masks (label = lesion ID); where masks overlap
    the lower ID keeps the voxel (a local run gives it to the higher lesion probability, which the
    server does not send; without overlaps both are the same). See
    :func:`LesionLocatorLib.track.labels_from_masks`."""
    from .track import labels_from_masks as paint

    return paint(image, masks)


def segment_on_server(runner: RemoteRunner, image, prompts, model, progress=None, cancel=None):
    """:func:`LesionLocatorLib.predict.segment` on the server: a
    :class:`~LesionLocatorLib.predict.SegmentationResult` (``probabilities`` empty: they are not
    sent; ``labels`` from :func:`labels_from_masks`). Voxel prompts go as world prompts
    (:func:`world_prompt`); the server's warnings are issued here as ``UserWarning`` s."""
    import warnings

    from .predict import SegmentationResult

    request = SegmentationRequest(image, [world_prompt(p, image) for p in prompts], model)
    response = runner.run(request, progress, cancel)
    for message in response.warnings:
        warnings.warn(message, UserWarning, stacklevel=2)
    masks = {int(pid): response.masks[int(pid)] for pid in (p.id for p in prompts)}
    return SegmentationResult(masks, {}, labels_from_masks(masks, image), dict(response.overlaps),
                              list(response.empty), dict(response.timings))


def track_study_on_server(runner: RemoteRunner, images, prompts, model, names=None, dates=None,
                          registration: str = "simpleitk", min_volume_ml: float = 0.0,
                          min_prompt_fraction: float = 0.0, progress=None, cancel=None):
    """:func:`LesionLocatorLib.study.track_study` on the server: the baseline is segmented there
    first when ``prompts`` are points or boxes, then tracked; returns the same
    :class:`~LesionLocatorLib.study.StudyResult` (``labels`` from :func:`labels_from_masks`,
    ``transforms`` empty: they stay on the server; the registrations are in the response)."""
    from .study import StudyResult, _baseline_kind, date_order_warnings
    from .track import _baseline_masks

    images = list(images)
    names = list(names) if names is not None else [f"t{t}" for t in range(len(images))]
    report = progress or (lambda fraction, message: None)
    if _baseline_kind(prompts) is not None:
        baseline = segment_on_server(runner, images[0], prompts, model, lambda f, m: report(0.2 * f, f"baseline: {m}"),
                                     cancel).masks
        start = 0.2
    else:
        baseline, start = _baseline_masks(images[0], prompts, None, None, cancel, {})[0], 0.0
    response = runner.track(TrackRequest(images, baseline, model, registration, names=names,
                                         min_volume_ml=min_volume_ml, min_prompt_fraction=min_prompt_fraction),
                            lambda f, m: report(start + (1 - start) * f, m), cancel)
    messages = date_order_warnings(names, list(dates)) if dates is not None else []
    messages += [m for m in response.warnings if m not in messages]
    labels = [labels_from_masks(masks, image) for masks, image in zip(response.masks, images)]
    return StudyResult(response.masks, labels, response.status, list(response.rows), [], dict(response.timings),
                       messages)
