"""The worker protocol trusts nothing: every message is checked before it is queued or acted on, a
bad one gets a ProtocolError reply naming the field and the worker keeps serving; files are read
and written only inside the session folder the front end created; the output is written
atomically and a failed write leaves nothing behind.

The real worker process is started as :class:`WorkerProcessRunner` starts it
(``python -m LesionLocatorLib.worker --session DIR``) and raw JSON lines are sent to it."""
import json
import os
import queue
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from LesionLocatorLib.image import write_image
from LesionLocatorLib.protocol import PROTOCOL, REGISTRATION_BACKENDS, ProtocolError, pack_masks, parse_message, \
    validate_message
from phantoms import ct_phantom

REPO = Path(__file__).resolve().parents[1]
CENTRE = (10, 20, 20)  # the phantom's lesion, voxel (z, y, x)


class Worker:
    """A worker process and a reader thread; ``send`` writes raw lines, ``reply`` waits for the next
    answer that is not progress."""

    def __init__(self, session=None, preexec_fn=None):
        args = [sys.executable, "-m", "LesionLocatorLib.worker"] + (["--session", str(session)] if session else [])
        self.proc = subprocess.Popen(args, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, preexec_fn=preexec_fn)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def send(self, message) -> None:
        if isinstance(message, dict):
            message = json.dumps(message)
        if isinstance(message, str):
            message = message.encode()
        self.proc.stdin.write(message + b"\n")
        self.proc.stdin.flush()

    def reply(self, timeout: float = 120) -> dict:
        while True:
            message = self.lines.get(timeout=timeout)
            assert message is not None, f"the worker exited (code {self.proc.wait(timeout=10)})"
            if message["type"] != "progress":
                return message

    def ask(self, message, timeout: float = 120) -> dict:
        self.send(message)
        return self.reply(timeout)

    def close(self) -> int:
        try:
            self.send({"type": "shutdown"})
        except (BrokenPipeError, OSError):
            pass
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


class Session:
    """A session folder with an image, a mask-prompt file, a baseline, and things that try to escape it."""

    def __init__(self, root: Path, model: Path):
        self.dir = root / "session"
        self.outside = root / "outside"
        self.dir.mkdir()
        self.outside.mkdir()
        self.model = str(model)
        self.image, _ = ct_phantom(shape_zyx=(20, 40, 40), lesions=[(CENTRE, 5.0, 100)])
        write_image(self.image, self.dir / "image.nrrd", compress=False)
        write_image(self.image, self.outside / "image.nrrd", compress=False)
        mask = np.zeros(self.image.shape, bool)
        mask[8:12, 18:22, 18:22] = True
        np.savez(self.dir / "prompts.npz", **pack_masks({"1": mask}))
        np.savez(self.outside / "prompts.npz", **pack_masks({"1": mask}))
        (self.dir / "link.nrrd").symlink_to(self.outside / "image.nrrd")
        (self.dir / "linkdir").symlink_to(self.outside, target_is_directory=True)
        (self.dir / "detached.nrrd").write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 2 2 2\n"
                                                "encoding: raw\ndata file: /etc/hostname\n\n")
        (self.dir / "detached.mha").write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\n"
                                               "ElementType = MET_SHORT\nElementDataFile = /etc/hostname\n")
        (self.dir / "notes.txt").write_text("not an image")
        (self.dir / "nrrd.nii").write_bytes((self.dir / "image.nrrd").read_bytes())  # another reader's file
        (self.dir / "plain.mha").write_text("ObjectType = Image\nNDims = 3\n")
        (self.dir / "taken.npz").mkdir()
        os.mkfifo(self.dir / "pipe.nrrd")  # opening it would block the worker
        os.mkfifo(self.dir / "pipe.npz")
        self.point = [float(v) for v in self.image.index_to_world(CENTRE)]

    def segment(self, **change) -> dict:
        message = {"type": "segment", "id": "s", "image": {"file": str(self.dir / "image.nrrd")}, "frame": "LPS",
                   "units": "mm", "prompts": [{"id": 1, "point": self.point}],
                   "model": {"path": self.model, "folds": [0], "device": "cpu", "tta": None},
                   "output": str(self.dir / "out.npz")}
        return _changed(message, change)

    def track(self, **change) -> dict:
        message = {"type": "track", "id": "t", "images": [{"file": "image.nrrd"}, {"file": "image.nrrd"}],
                   "frame": "LPS", "units": "mm", "baseline": {"file": "prompts.npz"},
                   "model": {"path": self.model, "device": "cpu"}, "registration": "none",
                   "registration_options": None, "min_volume_ml": 0.0, "min_prompt_fraction": 0.0,
                   "names": ["t0", "t1"], "output": "tracked.npz"}
        return _changed(message, change)

    def load(self, rid: str) -> dict:
        return {"type": "load", "id": rid, "model": {"path": self.model, "device": "cpu"}, "prompt_types": ["point"]}


DROP = object()


def _changed(message: dict, change: dict) -> dict:
    out = dict(message)
    for key, value in change.items():
        if value is DROP:
            out.pop(key)
        else:
            out[key] = value
    return out


@pytest.fixture(scope="module")
def session(tiny_model_root, tmp_path_factory) -> Session:
    return Session(tmp_path_factory.mktemp("protocol"), tiny_model_root)


@pytest.fixture(scope="module")
def worker(session):
    w = Worker(session.dir)
    ready = w.ask({"type": "hello", "protocol": PROTOCOL})
    assert ready["type"] == "ready" and ready["session"] is True
    yield w
    assert w.close() == 0


def _point(value):
    return lambda s: s.segment(prompts=[{"id": 1, "point": value}])


def _prompt_id(value):
    return lambda s: s.segment(prompts=[{"id": value, "point": s.point}])


def _image(spec):
    return lambda s: s.segment(image=spec(s) if callable(spec) else spec)


def _model(**change):
    return lambda s: s.segment(model=_changed(s.segment()["model"], change))


# (name, message: a function of the Session giving a dict / str / bytes, fragment of the error message,
#  the id the error reply carries)
BAD = [
    ("segment without anything", lambda s: {"type": "segment"}, "id: missing", None),
    ("segment without id", lambda s: s.segment(id=DROP), "id: missing", None),
    ("empty id", lambda s: s.segment(id=""), "id: expected a non-empty string", None),
    ("numeric id", lambda s: s.segment(id=5), "id: expected a non-empty string", None),
    ("unknown type", lambda s: {"type": "explode", "id": "x"}, "type: unknown message type \"explode\"", "x"),
    ("type a list", lambda s: {"type": ["segment"], "id": "x"}, "type: unknown message type [\"segment\"]", "x"),
    ("no type", lambda s: {"id": "x"}, "type: missing", "x"),
    ("misspelt field", lambda s: _changed(s.segment(), {"outptu": "x.npz"}), "outptu: unknown field", "s"),
    ("model a string", lambda s: s.segment(model="/models/x"), "model: expected an object", "s"),
    ("model without path", _model(path=DROP), "model.path: missing", "s"),
    ("folds a string", _model(folds="0"), "model.folds: expected a list", "s"),
    ("negative fold", _model(folds=[-1]), "model.folds[0]: must be an integer in 0..999", "s"),
    ("unknown device", _model(device="gpu"), "model.device: expected auto, cpu", "s"),
    ("tta a string", _model(tta="yes"), "model.tta: expected null, true or false", "s"),
    ("prompts an object", lambda s: s.segment(prompts={"1": s.point}), "prompts: expected a list", "s"),
    ("prompt a string", lambda s: s.segment(prompts=["1,2,3"]), "prompts[0]: expected exactly one of", "s"),
    ("point and box", lambda s: s.segment(prompts=[{"id": 1, "point": s.point, "box": [s.point, s.point]}]),
     "prompts[0]: expected exactly one of", "s"),
    ("NaN point", lambda s: json.dumps(s.segment(prompts=[{"id": 1, "point": [float("nan"), 0.0, 0.0]}])),
     "prompts[0].point[0]: expected a finite number", "s"),
    ("1e400 point", lambda s: json.dumps(s.segment(prompts=[{"id": 1, "point": [0, 0, 0]}]))
     .replace("[0, 0, 0]", "[0, 1e400, 0]"), "prompts[0].point[1]: expected a finite number", "s"),
    ("2-value point", _point([1.0, 2.0]), "prompts[0].point: expected 3 numbers", "s"),
    ("string in point", _point([1.0, "2", 3.0]), "prompts[0].point[1]: expected a number", "s"),
    ("boolean in point", _point([1.0, True, 3.0]), "prompts[0].point[1]: expected a number", "s"),
    ("3-value box", lambda s: s.segment(prompts=[{"id": 1, "box": [1.0, 2.0, 3.0]}]),
     "prompts[0].box: expected 2 corners of 3 numbers", "s"),
    ("2-value corner", lambda s: s.segment(prompts=[{"id": 1, "box": [[1.0, 2.0], [3.0, 4.0, 5.0]]}]),
     "prompts[0].box[0]: expected 3 numbers", "s"),
    ("prompt id 0", _prompt_id(0), "prompts[0].id: must be an integer in 1..65535", "s"),
    ("prompt id 70000", _prompt_id(70000), "prompts[0].id: must be an integer in 1..65535", "s"),
    ("prompt id -3", _prompt_id(-3), "prompts[0].id: must be an integer in 1..65535", "s"),
    ("prompt id a string", _prompt_id("1"), "prompts[0].id: expected an integer", "s"),
    ("prompt id 1.5", _prompt_id(1.5), "prompts[0].id: expected an integer", "s"),
    ("duplicate prompt ids", lambda s: s.segment(prompts=[{"id": 2, "point": s.point}, {"id": 2, "point": s.point}]),
     "prompts[1].id: prompt ID 2 is given twice", "s"),
    ("duplicate JSON key", lambda s: '{"type": "cancel", "id": "a", "id": "b"}',
     "message: the key \"id\" appears twice", None),
    ("frame RAS", lambda s: s.segment(frame="RAS"), "frame: expected \"LPS\"", "s"),
    ("units cm", lambda s: s.segment(units="cm"), "units: expected \"mm\"", "s"),
    ("no units", lambda s: s.segment(units=DROP), "units: missing", "s"),
    ("unknown image kind", _image({"url": "http://example.com/ct.nrrd"}), "image: expected exactly one of", "s"),
    ("file and cached", _image(lambda s: {"file": "image.nrrd", "cached": "k"}), "image: expected exactly one of",
     "s"),
    ("image /etc/passwd", _image({"file": "/etc/passwd"}), "image.file: /etc/passwd is outside the session folder",
     "s"),
    ("image ../", _image({"file": "../outside/image.nrrd"}), "image.file: ../outside/image.nrrd is outside", "s"),
    ("image absolute with ..", _image(lambda s: {"file": f"{s.dir}/../outside/image.nrrd"}),
     "/../outside/image.nrrd is outside the session folder", "s"),
    ("image symlink out", _image({"file": "link.nrrd"}), "image.file: link.nrrd is outside the session folder", "s"),
    ("image in a linked folder", _image({"file": "linkdir/image.nrrd"}), "image.file: linkdir/image.nrrd is outside",
     "s"),
    ("image the session itself", _image({"file": "."}), "image.file: . is outside the session folder", "s"),
    ("detached NRRD", _image({"file": "detached.nrrd"}), "image.file: detached.nrrd names a detached data file",
     "s"),
    ("detached MetaImage", _image({"file": "detached.mha"}), "image.file: detached.mha names a detached data file",
     "s"),
    ("NRRD named .nii", _image({"file": "nrrd.nii"}), "image.file: nrrd.nii is not a NIfTI file", "s"),
    ("MetaImage without its data", _image({"file": "plain.mha"}), "image.file: plain.mha has no 'ElementDataFile",
     "s"),
    ("image a pipe", _image({"file": "pipe.nrrd"}), "image.file: pipe.nrrd is not a regular file", "s"),
    ("mask file a pipe", lambda s: s.segment(prompts=[{"id": 1, "mask": {"file": "pipe.npz"}}]),
     "prompts[0].mask.file: pipe.npz is not a regular file", "s"),
    ("baseline a folder", lambda s: s.track(baseline={"file": "taken.npz"}),
     "baseline.file: taken.npz is not a regular file", "t"),
    ("not an image ending", _image({"file": "notes.txt"}), "image.file: notes.txt: give an image file ending in",
     "s"),
    ("cache key a number", _image({"file": "image.nrrd", "cache": 3}), "image.cache: expected a non-empty string",
     "s"),
    ("shm dtype", _image({"shm": "ll_x", "shape": [2, 2, 2], "dtype": "object", "spacing": [1, 1, 1],
                          "origin": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}), "image.dtype: expected one",
     "s"),
    ("shm 2-d shape", _image({"shm": "ll_x", "shape": [2, 2], "dtype": "int16", "spacing": [1, 1, 1],
                              "origin": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}),
     "image.shape: expected 3 integers", "s"),
    ("shm zero spacing", _image({"shm": "ll_x", "shape": [2, 2, 2], "dtype": "int16", "spacing": [1, 0, 1],
                                 "origin": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}),
     "image.spacing[1]: must be >= 1e-09", "s"),
    ("shm name with a slash", _image({"shm": "../x", "shape": [2, 2, 2], "dtype": "int16", "spacing": [1, 1, 1],
                                      "origin": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}),
     "image.shm: not a shared memory name", "s"),
    ("mask file outside", lambda s: s.segment(prompts=[{"id": 1, "mask": {"file": str(s.outside / "prompts.npz"),
                                                                         "key": "1"}}]),
     "prompts[0].mask.file: ", "s"),
    ("mask key 0", lambda s: s.segment(prompts=[{"id": 1, "mask": {"file": "prompts.npz", "key": "0"}}]),
     "prompts[0].mask.key: must be an integer in 1..65535", "s"),
    ("output /tmp", lambda s: s.segment(output="/tmp/evil.npz"), "output: /tmp/evil.npz is outside the session", "s"),
    ("output ../", lambda s: s.segment(output="../outside/evil.npz"), "output: ../outside/evil.npz is outside", "s"),
    ("output through a link", lambda s: s.segment(output="linkdir/evil.npz"), "output: linkdir/evil.npz is outside",
     "s"),
    ("output not npz", lambda s: s.segment(output="out.nii.gz"), "output: out.nii.gz: the mask file's name must end",
     "s"),
    ("output a folder", lambda s: s.segment(output="taken.npz"), "output: taken.npz is a folder", "s"),
    ("output under a file", lambda s: s.segment(output="image.nrrd/out.npz"), "output: image.nrrd/out.npz: ", "s"),
    ("bad registration", lambda s: s.track(registration="magic"), "registration: unknown registration backend", "t"),
    ("negative min_volume_ml", lambda s: s.track(min_volume_ml=-1), "min_volume_ml: must be >= 0.0", "t"),
    ("min_prompt_fraction true", lambda s: s.track(min_prompt_fraction=True), "min_prompt_fraction: expected a number",
     "t"),
    ("min_volume_ml a string", lambda s: s.track(min_volume_ml="1"), "min_volume_ml: expected a number", "t"),
    ("names too short", lambda s: s.track(names=["t0"]), "names: expected null or 2 names", "t"),
    ("name a number", lambda s: s.track(names=["t0", 1]), "names[1]: expected a non-empty string", "t"),
    ("one image to track", lambda s: s.track(images=[{"file": "image.nrrd"}], names=None),
     "images: tracking needs a baseline and at least one follow-up", "t"),
    ("follow-up outside", lambda s: s.track(images=[{"file": "image.nrrd"}, {"file": "/etc/passwd"}]),
     "images[1].file: /etc/passwd is outside", "t"),
    ("baseline outside", lambda s: s.track(baseline={"file": "../outside/prompts.npz"}),
     "baseline.file: ../outside/prompts.npz is outside", "t"),
    ("registration option model", lambda s: s.track(registration_options={"model": "x"}),
     "registration_options.model: not an option", "t"),
    ("registration option an object", lambda s: s.track(registration_options={"spacing_mm": {"a": 1}}),
     "registration_options.spacing_mm: expected a number", "t"),
    ("unknown prompt type", lambda s: _changed(s.load("l"), {"prompt_types": ["lasso"]}),
     "prompt_types[0]: expected one of point, box, prev_mask", "l"),
    ("cancel without id", lambda s: {"type": "cancel"}, "id: missing", None),
    ("another protocol", lambda s: {"type": "hello", "protocol": "lesionlocator-runner/2"}, "protocol: this worker",
     None),
    ("not JSON", lambda s: "segment please", "message: not JSON", None),
    ("a JSON list", lambda s: '[{"type": "hello"}]', "message: expected a JSON object, got list", None),
    ("a JSON string", lambda s: '"hello"', "message: expected a JSON object, got str", None),
    ("not UTF-8", lambda s: b'{"type": "hello", "id": "\xff\xfe"}', "message: not UTF-8 text", None),
    ("deep nesting", lambda s: "[" * 100000, "message: not JSON", None),
]


def test_the_table_is_big_enough():
    assert len(BAD) >= 25 and len({name for name, *_ in BAD}) == len(BAD)


@pytest.mark.parametrize("name, make, fragment, rid", BAD, ids=[case[0] for case in BAD])
def test_a_bad_message_gets_an_error_naming_the_field_and_the_worker_keeps_serving(name, make, fragment, rid,
                                                                                  worker, session):
    reply = worker.ask(make(session))
    assert reply["type"] == "error" and reply["error"] == "ProtocolError", reply
    assert fragment in reply["message"], reply
    assert reply["id"] == rid
    good = worker.ask(session.load("good"))  # nothing was queued: the next answer is the good message's
    assert good["type"] == "loaded" and good["id"] == "good", good
    assert not (session.dir / "out.npz").exists() and not (session.dir / "tracked.npz").exists()
    assert not (session.outside / "evil.npz").exists() and not Path("/tmp/evil.npz").exists()
    assert not list(session.dir.glob(".tmp_*")) and not list(session.dir.glob("*.tmp.npz"))


def test_good_requests_run_with_paths_relative_to_the_session(worker, session):
    """Relative paths name files in the session folder; the result names the resolved output."""
    reply = worker.ask(session.segment(image={"file": "image.nrrd", "cache": "ct"}, output="sub/masks.npz"))
    assert reply["type"] == "result", reply
    out = Path(reply["masks"]["file"])
    assert out == (session.dir / "sub" / "masks.npz").resolve() and out.is_file()
    with np.load(out) as data:
        assert "1" in data.files
    # a mask prompt read from the session's npz, on the cached image
    reply = worker.ask(session.segment(id="m", image={"cached": "ct"},
                                       prompts=[{"id": 3, "mask": {"file": "prompts.npz", "key": "1"}}]))
    assert reply["type"] == "result" and reply["id"] == "m", reply
    reply = worker.ask(session.track())
    assert reply["type"] == "result" and reply["id"] == "t", reply
    assert set(reply["status"]) == {"1"} and Path(reply["masks"]["file"]).is_file()
    assert not list(session.dir.rglob(".tmp_*"))
    for name in ("out.npz", "tracked.npz", "sub"):
        target = session.dir / name
        if target.is_dir():
            for f in target.iterdir():
                f.unlink()
            target.rmdir()
        elif target.exists():
            target.unlink()


def test_a_worker_without_a_session_folder_takes_no_file_path(session):
    w = Worker()
    try:
        ready = w.ask({"type": "hello"})
        assert ready["type"] == "ready" and ready["session"] is False
        reply = w.ask(session.segment(image={"file": str(session.dir / "image.nrrd")}))
        assert reply["type"] == "error" and reply["error"] == "ProtocolError"
        assert reply["message"].startswith("image.file: this worker was started without a session folder")
        assert w.ask(session.load("l")) == {"type": "loaded", "id": "l", "loads": 1}  # models still load
    finally:
        assert w.close() == 0


def test_a_worker_with_a_missing_session_folder_refuses_to_start(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "LesionLocatorLib.worker", "--session", str(tmp_path / "none")],
                          cwd=REPO, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "not a folder" in proc.stderr and "Traceback" not in proc.stderr


def _tiny_file_size_limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))  # a full disk, also for root


def test_a_write_failure_in_the_worker_leaves_no_file_and_the_worker_keeps_serving(tiny_model_root, tmp_path):
    """The output cannot be written (files are limited to 64 bytes): an error reply, neither the
    output nor a temporary file, and the next request is answered."""
    s = Session(tmp_path, tiny_model_root)
    before = sorted(p.name for p in s.dir.iterdir())
    w = Worker(s.dir, preexec_fn=_tiny_file_size_limit)
    try:
        reply = w.ask(s.segment())
        assert reply["type"] == "error" and reply["id"] == "s" and reply["error"] in ("OSError", "WriteError"), reply
        assert "File too large" in reply["message"]
        assert sorted(p.name for p in s.dir.iterdir()) == before  # no out.npz, no .tmp_*
        assert w.ask(s.load("after"))["type"] == "loaded"
    finally:
        assert w.close() == 0


def test_a_failed_rename_leaves_neither_the_output_nor_a_temp_file(tmp_path, monkeypatch):
    from LesionLocatorLib import worker

    masks = {1: np.ones((2, 3, 4), bool)}
    worker._write_masks(str(tmp_path / "old.npz"), masks)
    old = (tmp_path / "old.npz").read_bytes()

    def refuse(*args, **kwargs):
        raise OSError("rename refused")

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(os, "rename", refuse)
    for name in ("new.npz", "old.npz"):
        with pytest.raises(OSError, match="rename refused"):
            worker._write_masks(str(tmp_path / name), {2: np.zeros((2, 2, 2), bool)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.npz"]
    assert (tmp_path / "old.npz").read_bytes() == old  # an existing output stays as it was


def test_a_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    from LesionLocatorLib import worker

    def disk_full(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="(?i)no space left"):
        worker._write_masks(str(tmp_path / "out.npz"), {1: np.ones((2, 2, 2), bool)})
    assert list(tmp_path.iterdir()) == []


def test_the_runners_messages_pass_the_checks_and_relative_paths_stay_inside(tmp_path):
    """A message as the WorkerProcessRunner builds it passes; paths come back resolved."""
    (tmp_path / "req").mkdir()
    write_image(ct_phantom(shape_zyx=(4, 5, 6))[0], tmp_path / "req" / "image.nrrd", compress=False)
    message = {"type": "segment", "id": "r", "image": {"file": str(tmp_path / "req" / "image.nrrd"), "cache": "k"},
               "frame": "LPS", "units": "mm", "prompts": [{"id": 1, "point": [1, 2, 3]},
                                                         {"id": 2, "box": [[0, 0, 0], [1, 1, 1]]},
                                                         {"id": 3, "mask": {"file": str(tmp_path / "req" / "p.npz"),
                                                                            "key": "3"}}],
               "model": {"path": "/anywhere/model", "folds": None, "device": "auto", "tta": None},
               "output": str(tmp_path / "req" / "masks.npz")}
    checked = validate_message(parse_message(json.dumps(message)), str(tmp_path / "req"))
    assert checked["prompts"][2]["mask"] == {"file": os.path.realpath(tmp_path / "req" / "p.npz"), "key": 3}
    assert checked["output"] == os.path.realpath(tmp_path / "req" / "masks.npz")
    assert checked["model"]["path"] == "/anywhere/model"  # model folders are not session files
    # a sibling folder whose name starts with the session's is outside it
    with pytest.raises(ProtocolError, match=r"^output: .*/req-evil/masks\.npz is outside the session folder"):
        validate_message(dict(message, output=str(tmp_path / "req-evil" / "masks.npz")), str(tmp_path / "req"))


@pytest.mark.parametrize("ending", [".nrrd", ".nii", ".nii.gz", ".mha"])
def test_each_image_format_the_worker_takes_passes_the_content_check(ending, tmp_path):
    image = ct_phantom(shape_zyx=(4, 5, 6))[0]
    for compress in (False, True):
        name = f"ct{int(compress)}{ending}"
        write_image(image, tmp_path / name, compress=compress)
        message = {"type": "segment", "id": "r", "image": {"file": name}, "frame": "LPS", "units": "mm",
                   "prompts": [], "model": {"path": "m"}, "output": "o.npz"}
        assert validate_message(message, str(tmp_path))["image"]["file"] == os.path.realpath(tmp_path / name)


def test_the_registration_backends_are_the_librarys():
    from LesionLocatorLib.register import BACKENDS

    assert set(REGISTRATION_BACKENDS) == set(BACKENDS)


def test_the_runner_starts_its_worker_on_a_session_folder(tiny_model_root):
    from LesionLocatorLib.prompts import MaskPrompt, Point
    from LesionLocatorLib.runner import ModelSpec, SegmentationRequest, WorkerProcessRunner

    img, _ = ct_phantom(shape_zyx=(20, 40, 40), lesions=[(CENTRE, 5.0, 100)])
    mask = np.zeros(img.shape, np.uint8)
    mask[8:12, 18:22, 18:22] = 1
    runner = WorkerProcessRunner()
    try:
        start = time.perf_counter()
        response = runner.run(SegmentationRequest(img, [Point(1, tuple(img.index_to_world(CENTRE))),
                                                        MaskPrompt(2, img.with_array(mask))],
                                                  ModelSpec(str(tiny_model_root), device="cpu")))
        assert sorted(response.masks) == [1, 2] and time.perf_counter() - start < 120
        assert runner.info["session"] is True
        with pytest.raises(ProtocolError, match=r"^prompts\[0\]\.id: must be an integer in 1\.\.65535"):
            runner.run(SegmentationRequest(img, [Point(70000, tuple(img.index_to_world(CENTRE)))],
                                           ModelSpec(str(tiny_model_root), device="cpu")))
        pid = runner.pid
        assert runner.run(SegmentationRequest(img, [Point(3, tuple(img.index_to_world(CENTRE)))],
                                              ModelSpec(str(tiny_model_root), device="cpu"))).masks
        assert runner.pid == pid
    finally:
        runner.close()
