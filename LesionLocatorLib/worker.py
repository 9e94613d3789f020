"""A persistent worker process that serves :mod:`LesionLocatorLib.runner`'s JSON protocol.

Start: ``python -m LesionLocatorLib.worker``. It reads one JSON message per line on stdin
and writes one per line on stdout (see :mod:`LesionLocatorLib.runner` for the messages).
Loaded models stay in memory between requests. Requests run one at a time on a work thread;
the main thread keeps reading stdin, so a ``cancel`` message takes effect at the next
network batch. Anything else that prints (libraries, warnings) goes to stderr: stdout
carries only protocol messages.

Files: the request names the input image(s) (any SimpleITK-readable file; the front end
writes uncompressed NRRD) and ``output``, the ``.npz`` file the masks go to, written
atomically: each mask cropped to its bounding box (see "Mask files" in
:mod:`LesionLocatorLib.runner`). Mask prompts of ``segment`` requests name the ``.npz`` file
and key of their mask (on the request image's grid); ``track`` requests name the baseline
masks file. Both are read with the same mask-file reader.
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
import traceback
from collections import OrderedDict

from .protocol import PROTOCOL, ImageNotCached, pack_masks, unpack_masks



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
    if "shm" in spec:
        import numpy as np
        from multiprocessing import shared_memory

        shm = shared_memory.SharedMemory(name=spec["shm"])
        try:
            array = np.ndarray(tuple(spec["shape"]), dtype=spec["dtype"], buffer=shm.buf).copy()
        finally:
            shm.close()
        return Image(array, spec["spacing"], spec["origin"], np.asarray(spec["direction"], float).reshape(3, 3))
    raise ValueError("image: give 'file' or 'shm'")


def _prompts(entries: list, image=None) -> list:
    """Wire prompts -> Point / Box / MaskPrompt. A mask prompt's mask (``{"file", "key"}``,
    key defaulting to the prompt ID) must lie on ``image``'s voxel grid."""
    from .prompts import Box, MaskPrompt, Point, PromptError

    out, files = [], {}
    for e in entries:
        if "point" in e:
            out.append(Point(int(e["id"]), tuple(float(v) for v in e["point"])))
        elif "box" in e:
            out.append(Box.from_points(int(e["id"]), e["box"]))
        elif "mask" in e:
            spec = e["mask"]
            if not isinstance(spec, dict) or "file" not in spec:
                raise PromptError(f"prompt {e.get('id')}: a mask prompt needs {{\"file\": ..., \"key\": ...}}")
            if spec["file"] not in files:
                files[spec["file"]] = _read_masks(spec)
            masks, key = files[spec["file"]], int(spec.get("key", e["id"]))
            if key not in masks:
                raise PromptError(f"prompt {e.get('id')}: no mask {key} in {spec['file']}")
            if image is None or masks[key].shape != tuple(image.shape):
                raise PromptError(f"prompt {e.get('id')}: the mask's shape {masks[key].shape} is not the image's "
                                  f"{None if image is None else tuple(image.shape)}: send it on the image's grid")
            out.append(MaskPrompt(int(e["id"]), image.with_array(masks[key].astype("uint8"))))
        else:
            raise PromptError(f"prompt {e.get('id')}: neither 'point', 'box' nor 'mask'")
    return out


def _model_spec(spec: dict):
    from .runner import ModelSpec

    folds = spec.get("folds")
    return ModelSpec(str(spec["path"]), tuple(folds) if folds is not None else None,
                     spec.get("device", "auto"), spec.get("tta"))


def _write_masks(path: str, masks: dict) -> None:
    import numpy as np

    tmp = path + ".tmp.npz"
    np.savez(tmp, **pack_masks(masks))
    os.replace(tmp, path)


def _read_masks(spec: dict) -> dict:
    import numpy as np

    if "file" not in spec:
        raise ValueError("masks: give 'file'")
    with np.load(spec["file"]) as data:
        return {int(k): v for k, v in unpack_masks(data).items()}


class Worker:
    def __init__(self, channel: _Channel):
        from .runner import InProcessRunner

        self.channel = channel
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
                "devices": devices, "pid": os.getpid()}

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

    def _run(self, message: dict, token) -> None:
        from .predict import Cancelled
        from .runner import SegmentationRequest

        rid = message.get("id")
        try:
            if message["type"] == "load":
                for kind in message.get("prompt_types", ["point"]):
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
            response = self.runner.run(
                request, cancel=token,
                progress=lambda f, m: self.channel.send({"type": "progress", "id": rid, "fraction": f, "message": m}))
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
            self.channel.send({"type": "error", "id": rid, "error": type(e).__name__, "message": str(e)})
        finally:
            with self.lock:
                if self.tokens.get(rid) is token:  # a later message with the same id keeps its own
                    del self.tokens[rid]


    def _track(self, message: dict, token) -> None:
        from .runner import TrackRequest

        rid = message.get("id")
        request = TrackRequest([_image(spec) for spec in message["images"]], _read_masks(message["baseline"]),
                               _model_spec(message["model"]), message.get("registration", "simpleitk"),
                               message.get("registration_options"), rid,
                               float(message.get("min_volume_ml", 0.0)), float(message.get("min_prompt_fraction", 0.0)),
                               message.get("names"))
        response = self.runner.track(
            request, cancel=token,
            progress=lambda f, m: self.channel.send({"type": "progress", "id": rid, "fraction": f, "message": m}))
        _write_masks(message["output"], {f"{t}/{pid}": mask for t, masks in enumerate(response.masks)
                                         for pid, mask in masks.items()})
        self.channel.send({"type": "result", "id": rid, "masks": {"file": message["output"]},
                           "status": {str(k): v for k, v in response.status.items()},
                           "timings": response.timings, "warnings": response.warnings,
                           "registrations": response.registrations, "seconds": response.seconds,
                           "rows": response.rows, "loads": self.runner.loads})


def main() -> int:
    channel = _Channel()
    worker = Worker(channel)
    thread = threading.Thread(target=worker.work, name="lesionlocator-work", daemon=True)
    thread.start()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            message = json.loads(line)
            kind = message.get("type")
        except (json.JSONDecodeError, AttributeError) as e:
            channel.send({"type": "error", "id": None, "error": "ProtocolError", "message": f"not JSON: {e}"})
            continue
        if kind == "hello":
            channel.send(worker.hello())
        elif kind in ("segment", "load", "track"):
            worker.submit(message)
        elif kind == "cancel":
            worker.cancel(message.get("id"))
        elif kind == "shutdown":
            break
        else:
            channel.send({"type": "error", "id": message.get("id"), "error": "ProtocolError",
                          "message": f"unknown message type {kind!r}"})
    worker.requests.put(None)
    thread.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
