"""A persistent worker process that serves :mod:`LesionLocatorLib.runner`'s JSON protocol.

Start: ``python -m LesionLocatorLib.worker --session DIR``. It reads one JSON message per line on
stdin and writes one per line on stdout (the messages: :mod:`LesionLocatorLib.protocol`).
Loaded models stay in memory between requests. Every line is checked first
(:func:`~LesionLocatorLib.protocol.parse_message`,
:func:`~LesionLocatorLib.protocol.validate_message`): a bad one is answered with a
``ProtocolError`` reply naming the field, nothing is queued, and the worker keeps serving.
Requests run one at a time on a work thread; the main thread keeps reading stdin, so a
``cancel`` message takes effect at the next network batch. Anything else that prints
(libraries, warnings) goes to stderr: stdout carries only protocol messages.

Files: only inside the session folder ``DIR`` that the front end created (paths resolved,
symlinks followed; see "The session folder" in :mod:`LesionLocatorLib.protocol`). Without
``--session`` the worker takes no file path (images through shared memory or the cache only).
The request names the input image(s) (the front end writes uncompressed NRRD) and ``output``,
the ``.npz`` file the masks go to, written atomically and checked before the rename (each mask
cropped to its bounding box, see "Mask files"); a failed write leaves no file behind. Mask
prompts of ``segment`` requests name the ``.npz`` file and key of their mask (on the request
image's grid); ``track`` requests name the baseline masks file. Both are read with the same
mask-file reader (no pickles).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import traceback
from collections import OrderedDict

from .protocol import PROTOCOL, ImageNotCached, ProtocolError, message_id, pack_masks, parse_message, \
    timepoint_keys, unpack_masks, validate_message


class _Channel:
    """Protocol output on the original stdout; fd 1 then points at stderr."""

    def __init__(self):
        sys.stdout.flush()
        self._out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self._lock = threading.Lock()

    def send(self, message: dict) -> None:
        with self._lock:
            self._out.write(json.dumps(message) + "\n")
            self._out.flush()


IMAGE_CACHE = 2  # images kept by key ("cache"/"cached" in the protocol), least recently used dropped


def _image(spec: dict, cache=None):
    """A checked image spec (:func:`~LesionLocatorLib.protocol.validate_message`) -> Image."""
    from .image import Image, read_image

    if "cached" in spec:
        if cache is None or spec["cached"] not in cache:
            raise ImageNotCached(f"image {spec['cached']!r} is not cached here; send the file")
        cache.move_to_end(spec["cached"])
        return cache[spec["cached"]]
    if "file" in spec:
        image = read_image(spec["file"])
        if cache is not None and spec.get("cache"):
            cache[spec["cache"]] = image
            cache.move_to_end(spec["cache"])
            while len(cache) > IMAGE_CACHE:
                cache.popitem(last=False)
        return image
    import numpy as np
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(name=spec["shm"])
    try:
        dtype = np.dtype(spec["dtype"])
        if int(np.prod(spec["shape"])) * dtype.itemsize > shm.size:
            raise ProtocolError(f"image.shape: {spec['shape']} {spec['dtype']} needs more than the "
                                f"{shm.size} bytes of shared memory {spec['shm']!r}")
        array = np.ndarray(tuple(spec["shape"]), dtype=dtype, buffer=shm.buf).copy()
    finally:
        shm.close()
    return Image(array, spec["spacing"], spec["origin"], np.asarray(spec["direction"], float).reshape(3, 3))


def _prompts(entries: list, image=None) -> list:
    """Checked wire prompts -> Point / Box / MaskPrompt. A mask prompt's mask (``{"file", "key"}``)
    must lie on ``image``'s voxel grid."""
    from .prompts import Box, MaskPrompt, Point, PromptError

    out, files = [], {}
    for e in entries:
        if "point" in e:
            out.append(Point(e["id"], tuple(e["point"])))
        elif "box" in e:
            out.append(Box.from_points(e["id"], e["box"]))
        else:
            spec = e["mask"]
            if spec["file"] not in files:
                files[spec["file"]] = _read_masks(spec["file"])
            masks, key = files[spec["file"]], spec["key"]
            if key not in masks:
                raise PromptError(f"prompt {e['id']}: no mask {key} in {spec['file']}")
            if image is None or masks[key].shape != tuple(image.shape):
                raise PromptError(f"prompt {e['id']}: the mask's shape {masks[key].shape} is not the image's "
                                  f"{None if image is None else tuple(image.shape)}: send it on the image's grid")
            out.append(MaskPrompt(e["id"], image.with_array(masks[key].astype("uint8"))))
    return out


def _model_spec(spec: dict):
    from .runner import ModelSpec

    folds = spec["folds"]
    return ModelSpec(spec["path"], tuple(folds) if folds is not None else None, spec["device"], spec["tta"],
                     spec.get("backend", "torch"))


def _write_masks(path: str, masks: dict) -> None:
    """The masks as an npz at ``path``, atomically: written to a temporary file beside it, flushed,
    read back, then renamed; a failure at any step leaves neither ``path`` nor the temporary file."""
    import numpy as np

    from .files import atomic_output

    packed = pack_masks(masks)
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:  # a file object: np.savez adds no second ".npz"
            np.savez(f, **packed)
            f.flush()
            os.fsync(f.fileno())
        with np.load(tmp) as data:  # the file holds what was written, before it gets the name
            if sorted(data.files) != sorted(packed):
                raise OSError(f"{path}: the mask file read back differs from what was written")


def _read_masks(path: str) -> dict:
    import numpy as np

    with np.load(path, allow_pickle=False) as data:
        out = {}
        for key, mask in unpack_masks(data).items():
            try:
                out[int(key)] = mask
            except ValueError:
                raise ValueError(f"{path}: mask key {key!r} is not a lesion ID") from None
        return out


class Worker:
    def __init__(self, channel: _Channel, session: str | None = None):
        from .runner import InProcessRunner

        self.channel = channel
        self.session = os.path.realpath(session) if session is not None else None
        self.runner = InProcessRunner()
        self.images: OrderedDict = OrderedDict()  # image key -> Image (only the work thread uses it)
        self.requests: queue.Queue = queue.Queue()
        self.tokens: dict = {}  # request id -> CancelToken (queued or running)
        self.lock = threading.Lock()

    def hello(self) -> dict:
        from . import __version__

        devices = ["cpu"]
        try:
            import torch

            if torch.cuda.is_available():
                devices.append("cuda")
            if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                devices.append("mps")
            torch_version = torch.__version__
        except ImportError:
            torch_version = None
        return {"type": "ready", "protocol": PROTOCOL, "library": __version__, "torch": torch_version,
                "devices": devices, "pid": os.getpid(), "session": self.session is not None}

    def handle(self, line) -> bool:
        """Check and act on one line from the front end; False after ``shutdown``. A bad line gets a
        ProtocolError reply and changes nothing."""
        rid = None
        try:
            message = parse_message(line)
            rid = message_id(message)
            message = validate_message(message, self.session)
        except ProtocolError as e:
            self._error(rid, "ProtocolError", str(e))
            return True
        kind = message["type"]
        if kind == "hello":
            self.channel.send(self.hello())
        elif kind in ("segment", "load", "track"):
            self.submit(message)
        elif kind == "cancel":
            self.cancel(message["id"])
        elif kind == "shutdown":
            return False
        return True

    def _error(self, rid, kind: str, text: str) -> None:
        self.channel.send({"type": "error", "id": rid, "error": kind, "message": text})

    def submit(self, message: dict) -> None:
        from .predict import CancelToken

        token = CancelToken()
        with self.lock:
            self.tokens[message["id"]] = token
        self.requests.put((message, token))  # the token travels with its message (ids may repeat)

    def cancel(self, request_id: str) -> None:
        with self.lock:
            token = self.tokens.get(request_id)
        if token is not None:
            token.cancel()

    def work(self) -> None:
        while True:
            item = self.requests.get()
            if item is None:
                return
            self._run(*item)

    def _progress(self, rid):
        return lambda f, m: self.channel.send({"type": "progress", "id": rid, "fraction": f, "message": m})

    def _run(self, message: dict, token) -> None:
        from .predict import Cancelled
        from .runner import SegmentationRequest

        rid = message["id"]
        try:
            if message["type"] == "load":
                for kind in message["prompt_types"]:
                    self.runner.model(_model_spec(message["model"]), kind)
                self.channel.send({"type": "loaded", "id": rid, "loads": self.runner.loads})
                return
            token.check()
            if message["type"] == "track":
                self._track(message, token)
                return
            image = _image(message["image"], self.images)
            request = SegmentationRequest(image, _prompts(message["prompts"], image),
                                          _model_spec(message["model"]), rid)
            response = self.runner.run(request, cancel=token, progress=self._progress(rid))
            _write_masks(message["output"], response.masks)
            self.channel.send({"type": "result", "id": rid, "masks": {"file": message["output"]},
                               "empty": response.empty,
                               "overlaps": [[a, b, n] for (a, b), n in response.overlaps.items()],
                               "warnings": response.warnings, "seconds": response.seconds,
                               "timings": response.timings, "loads": self.runner.loads})
        except Cancelled:
            self.channel.send({"type": "cancelled", "id": rid})
        except Exception as e:  # every failure goes back as a message with the library's text
            traceback.print_exc(file=sys.stderr)
            self._error(rid, type(e).__name__, str(e))
        finally:
            with self.lock:
                if self.tokens.get(rid) is token:  # a later message with the same id keeps its own
                    del self.tokens[rid]

    def _track(self, message: dict, token) -> None:
        from .runner import TrackRequest

        rid = message["id"]
        request = TrackRequest([_image(spec, self.images) for spec in message["images"]],
                               _read_masks(message["baseline"]["file"]), _model_spec(message["model"]),
                               message["registration"], message["registration_options"], rid,
                               message["min_volume_ml"], message["min_prompt_fraction"], message["names"])
        if message.get("previous") is not None:
            from .trackstate import load_track_state

            request.previous = load_track_state(message["previous"]["folder"], request.images)[0]
        if message.get("corrections") is not None:
            request.corrections = self._corrections(message["corrections"]["file"], request.images)
        response = self.runner.track(request, cancel=token, progress=self._progress(rid))
        if message.get("state") is not None:
            from .trackstate import save_track_state

            save_track_state(message["state"]["folder"], response.tracked, request.images,
                             request.names or [f"t{t}" for t in range(len(request.images))], request.registration)
        _write_masks(message["output"], timepoint_keys(response.masks))
        self.channel.send({"type": "result", "id": rid, "masks": {"file": message["output"]},
                           "status": {str(k): v for k, v in response.status.items()},
                           "timings": response.timings, "warnings": response.warnings,
                           "registrations": response.registrations, "seconds": response.seconds,
                           "rows": response.rows, "loads": self.runner.loads})


    def _corrections(self, path: str, images) -> list:
        """The Corrections of a corrections file in the session; its mask files must be there too."""
        from .correctionfile import read_corrections, resolve_corrections
        from .protocol import input_file

        entries = read_corrections(path)
        for i, entry in enumerate(entries):
            if entry["kind"] == "mask":
                input_file(str(entry["value"]), f"corrections[{i}].mask", self.session)
        return resolve_corrections(entries, [f"t{t}" for t in range(len(images))], images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m LesionLocatorLib.worker",
                                     description="LesionLocator worker: JSON lines on stdin/stdout.")
    parser.add_argument("--session", metavar="DIR", default=None,
                        help="the private folder the front end created; every file a message names must lie in it "
                             "(default: none, so no file paths are accepted)")
    args = parser.parse_args(argv)
    if args.session is not None and not os.path.isdir(args.session):
        print(f"lesionlocator worker: --session {args.session}: not a folder", file=sys.stderr)
        return 2
    channel = _Channel()
    worker = Worker(channel, args.session)
    thread = threading.Thread(target=worker.work, name="lesionlocator-work", daemon=True)
    thread.start()
    for line in sys.stdin.buffer:  # bytes: a line that is not UTF-8 is answered, not fatal
        if not line.strip():
            continue
        try:
            if not worker.handle(line):
                break
        except Exception as e:  # a bug in a check must not take the worker down
            traceback.print_exc(file=sys.stderr)
            worker._error(None, type(e).__name__, f"the worker could not handle the message: {e}")
    worker.requests.put(None)
    thread.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
