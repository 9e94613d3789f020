"""``lesionlocator serve`` at the HTTP level: a real uvicorn server on 127.0.0.1 (the FastAPI app
of :mod:`LesionLocatorLib.server` on a background thread, the demo model on the CPU), spoken to
with raw ``http.client`` requests where the test is about the wire and with
:class:`~LesionLocatorLib.remote.RemoteRunner` where it is about results.

Shown here: every endpoint but the health check answers 401 without the right key; an oversized
body is 413 before it is read; a malformed job is 422 naming the field; nothing of a traceback
ever reaches a client; one client cannot read another's images or jobs (separate keys, separate
namespaces: an image ID is a content hash and so guessable, which is why IDs alone are not the
protection); the image cache evicts the least recently used volume and the client re-uploads it
by itself; 20 concurrent clients x 5 clicks lose nothing and mix nothing (each result equals its
in-process reference) and the queue position is reported; two devices run two jobs at once; and
``serve``'s own options are checked before anything starts. Killing the server mid-job, cancel,
busy (429), TLS and remote = local for point/box/refine/track are in ``test_remote.py``.
"""
import http.client
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from LesionLocatorLib import cli, serverapi
from LesionLocatorLib.image import Image, read_image
from LesionLocatorLib.modelfolder import ModelSpec
from LesionLocatorLib.prompts import Point, read_prompt_file
from LesionLocatorLib.remote import RemoteRunner, ServerError
from LesionLocatorLib.runner import InProcessRunner, SegmentationRequest
from LesionLocatorLib.server import serve_in_thread
from LesionLocatorLib.serverjobs import ServerConfig, Service
from LesionLocatorLib.zoo import demo_model_dir
from serve_process import free_port

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "Resources" / "Demo"
SPEC = ModelSpec(str(demo_model_dir()), device="cpu")
KEYS = {f"c{n:02d}": f"key-of-client-{n:02d}-0123456789" for n in range(1, 21)}
ALICE, BOB = KEYS["c01"], KEYS["c02"]


# ------------------------------------------------------------------------------ helpers
def config(**changes) -> ServerConfig:
    return ServerConfig(**{"port": free_port(), "keys": KEYS, "models": ("demo",), "devices": ("cpu",), **changes})


def call(url: str, method: str, path: str, body=None, key=None, headers=None) -> tuple:
    """(status, JSON answer, headers) of one raw request to ``url`` + ``/v1`` + ``path``."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    try:
        conn.request(method, "/v1" + path, body=body, headers=sent)
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else {}, dict(response.getheaders())
    finally:
        conn.close()


def finished(url: str, key: str, job: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, answer, _ = call(url, "GET", f"/jobs/{job}?wait=5", key=key)
        assert status == 200, answer
        if answer["state"] in ("done", "failed", "cancelled"):
            return answer
    raise AssertionError(f"job {job} did not finish")


@pytest.fixture(scope="module")
def demo():
    images = [read_image(DEMO / f"demo_t{t}.nii.gz") for t in range(3)]
    voxels = read_prompt_file(DEMO / "demo_points.json")
    return {"images": images, "points": [Point(vp.id, tuple(images[0].index_to_world(vp.coords))) for vp in voxels]}


@pytest.fixture(scope="module")
def base_url():
    """One server (20 clients' keys, the demo model, one CPU device) for the tests that do not need their own."""
    with serve_in_thread(config()) as url:
        yield url


@pytest.fixture(scope="module")
def uploaded(base_url, demo):
    """demo_t0 uploaded by client c01 (alice): its image ID."""
    image = demo["images"][0]
    digest = serverapi.image_id(image)
    status, answer, _ = call(base_url, "PUT", f"/images/{digest}", serverapi.encode_image(image), key=ALICE)
    assert status == 201 and answer == {"image": digest, "bytes": image.array.nbytes}
    return digest


def _job(image_id: str, point, pid: int = 1) -> dict:
    return {"type": "segment", "image": image_id, "model": "demo", "prompts": [{"id": pid, "point": list(point)}]}


# ------------------------------------------------------------------------------ authentication
def test_health_needs_no_key_and_every_other_endpoint_needs_the_right_one(base_url, uploaded):
    status, answer, _ = call(base_url, "GET", "/health")
    assert status == 200 and answer["status"] == "ok" and answer["api"] == 1
    endpoints = [("GET", "/info", None), ("PUT", f"/images/{uploaded}", b"x"),
                 ("POST", "/jobs", _job(uploaded, (0, 0, 0))), ("GET", "/jobs/0123", None),
                 ("GET", "/jobs/0123?wait=1", None), ("DELETE", "/jobs/0123", None)]
    refusals = [{}, {"Authorization": "Bearer wrong-key-0123456789abc"}, {"Authorization": f"Basic {ALICE}"},
                {"Authorization": "Bearer "}, {"Authorization": ALICE}, {"Authorization": f"Bearer {ALICE}x"},
                {"Authorization": f"Bearer {ALICE[:-1]}"}]
    for method, path, body in endpoints:
        for headers in refusals:
            status, answer, sent = call(base_url, method, path, body, headers=headers)
            assert status == 401, (method, path, headers, status, answer)
            assert answer == {"detail": "missing or wrong API key: send the header 'Authorization: Bearer <key>'"}
            assert sent.get("www-authenticate") == "Bearer"
    assert call(base_url, "GET", "/info", key=ALICE)[0] == 200
    assert call(base_url, "GET", "/docs")[0] == 404 and call(base_url, "GET", "/openapi.json")[0] == 404


def test_clients_cannot_read_each_others_images_or_jobs(base_url, demo, uploaded):
    """Alice's image is not Bob's: a job of his naming its ID is told to upload it (409), and her
    job is 404 to him, exactly like a job that does not exist, for status and cancel alike."""
    status, answer, _ = call(base_url, "POST", "/jobs", _job(uploaded, demo["points"][0].xyz), key=BOB)
    assert status == 409 and answer["missing"] == [uploaded]
    status, answer, _ = call(base_url, "POST", "/jobs", _job(uploaded, demo["points"][0].xyz), key=ALICE)
    assert status == 202 and set(answer) == {"job", "state", "position"}
    job = answer["job"]
    assert len(job) == 32 and int(job, 16) >= 0  # a random 128-bit ID
    unknown = "0" * 32
    for method, path in (("GET", f"/jobs/{job}"), ("GET", f"/jobs/{job}?wait=2"), ("DELETE", f"/jobs/{job}")):
        mine = call(base_url, method, path.replace(job, unknown), key=BOB)
        theirs = call(base_url, method, path, key=BOB)
        assert theirs[0] == mine[0] == 404
        assert theirs[1]["detail"].replace(job, unknown) == mine[1]["detail"]
    done = finished(base_url, ALICE, job)
    assert done["state"] == "done" and sorted(serverapi.decode_masks(done["result"]["masks"])) == ["1"]


# ------------------------------------------------------------------------------ bodies and fields
def announce(url: str, method: str, path: str, key: str, headers: dict, sent: bytes = b"") -> tuple:
    """(status, JSON answer) when only the headers and ``sent`` (raw bytes, e.g. chunks) of a
    request have gone out: what the server answers before the rest of the body exists."""
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest(method, "/v1" + path)
        for name, value in {**headers, "Authorization": f"Bearer {key}"}.items():
            conn.putheader(name, value)
        conn.endheaders()
        if sent:
            conn.send(sent)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_an_oversized_body_is_413_before_it_is_read(demo):
    image = demo["images"][0]
    data = serverapi.encode_image(image)
    digest, limit = serverapi.image_id(image), len(data) - 1
    with serve_in_thread(config(max_upload_bytes=limit)) as url:
        status, answer = announce(url, "PUT", f"/images/{digest}", ALICE, {"Content-Length": str(len(data))})
        assert status == 413 and answer["detail"] == (f"the body holds {len(data)} bytes, over this server's upload "
                                                      f"limit of {limit} bytes (--max-upload-mb)")
        status, answer = announce(url, "POST", "/jobs", ALICE, {"Content-Length": str(10 * limit)})
        assert status == 413 and answer["detail"].startswith(f"the body holds {10 * limit} bytes")
        # a body sent in chunks, without Content-Length: refused once it has grown past the limit
        chunk = b"x" * 65536
        chunks = (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * (limit // len(chunk) + 1)
        status, answer = announce(url, "PUT", f"/images/{digest}", ALICE, {"Transfer-Encoding": "chunked"}, chunks)
        assert status == 413 and answer["detail"] == (f"the body holds more, over this server's upload limit of "
                                                      f"{limit} bytes (--max-upload-mb)")
        # the client knows the limit from /v1/info and says so before sending anything
        remote = RemoteRunner(url, ALICE)
        with pytest.raises(ServerError, match=f"the image is {len(data)} bytes encoded, over the upload limit of "
                                              f"{limit} bytes of the server at {url}") as e:
            remote.run(SegmentationRequest(image, demo["points"][:1], SPEC))
        assert e.value.status == 413 and remote.uploads == 0
        assert remote.info()["cache"]["images"] == 0


def test_an_image_larger_than_the_cache_or_not_matching_its_id_is_refused(demo):
    image = demo["images"][0]
    digest, data = serverapi.image_id(image), serverapi.encode_image(image)
    with serve_in_thread(config(max_cache_bytes=image.array.nbytes - 1)) as url:
        status, answer, _ = call(url, "PUT", f"/images/{digest}", data, key=ALICE)
        assert status == 400 and answer["detail"].endswith(f"image of {image.array.nbytes} voxel bytes is over the "
                                                           f"limit of {image.array.nbytes - 1}")
    other = serverapi.image_id(image.with_array(image.array + 1))
    cases = {f"/images/{other}": (data, f"the image's content ID is {digest}, not {other}"),
             f"/images/{digest}": (data[:-10], "image data holds"),
             f"/images/{digest.upper()}": (data, "expected 64 lowercase hex digits"),
             "/images/../../etc/passwd": (data, None)}
    with serve_in_thread(config()) as url:
        for path, (body, message) in cases.items():
            status, answer, _ = call(url, "PUT", path, body, key=ALICE)
            if message is None:
                assert status == 404  # no route: a path is never a file name
            else:
                assert status == 400 and message in answer["detail"], (path, answer)
        status, answer, _ = call(url, "PUT", f"/images/{digest}", b"LLIMG1\n\xff\xff\xff\x7f{", key=ALICE)
        assert status == 400 and "bad image header" in answer["detail"]
        assert call(url, "GET", "/info", key=ALICE)[1]["cache"]["images"] == 0


MALFORMED = [  # (job body or raw bytes, status, the start of the detail)
    (b"not json", 422, "body: "),
    (b'{"type": "segment", "type": "track"}', 422, "body: "),
    ([1, 2], 422, "body: expected a JSON object"),
    ({}, 422, "type: missing"),
    ({"type": "classify"}, 422, 'type: expected "segment" or "track"'),
    ({"type": "segment", "model": "demo", "prompts": []}, 422, "image: missing"),
    ({"type": "segment", "image": "IMG", "model": "demo", "prompts": [], "extra": 1}, 422, "extra: unknown field"),
    ({"type": "segment", "image": "../etc/passwd", "model": "demo", "prompts": [{"id": 1, "point": [0, 0, 0]}]},
     422, "image: expected an image ID"),
    ({"type": "segment", "image": "IMG", "model": "demo", "prompts": []}, 422, "prompts: expected at least 1 entry"),
    ({"type": "segment", "image": "IMG", "model": "demo", "prompts": [{"id": 1}]}, 422,
     "prompts[0]: expected exactly one of 'point', 'box' or 'mask'"),
    ({"type": "segment", "image": "IMG", "model": "demo", "prompts": [{"id": 1, "point": [0, 0]}]}, 422,
     "prompts[0].point: expected 3 numbers (x, y, z; LPS mm)"),
    ({"type": "segment", "image": "IMG", "model": "demo", "prompts": [{"id": 1, "point": [0, "a", 0]}]}, 422,
     "prompts[0].point[1]: "),
    ({"type": "segment", "image": "IMG", "model": "demo", "prompts": [{"id": 0, "point": [0, 0, 0]}]}, 422,
     "prompts[0].id: must be an integer in 1..65535"),
    ({"type": "segment", "image": "IMG", "model": "demo",
      "prompts": [{"id": 1, "point": [0, 0, 0]}, {"id": 1, "point": [1, 1, 1]}]}, 422,
     "prompts[1].id: prompt ID 1 is given twice"),
    ({"type": "segment", "image": "IMG", "model": "demo", "prompts": [{"id": 1, "box": [[0, 0, 0]]}]}, 422,
     "prompts[0].box: expected 2 corners"),
    ({"type": "segment", "image": "IMG", "model": "demo", "prompts": [{"id": 1, "mask": "1"}]}, 422,
     "masks: missing"),
    ({"type": "segment", "image": "IMG", "model": "demo", "prompts": [{"id": 1, "mask": "1"}], "masks": "!!"}, 422,
     "masks: not an encoded mask set"),
    ({"type": "segment", "image": "IMG", "model": "demo", "prompts": [{"id": 1, "point": [0, 0, 0]}],
      "options": {"folds": "x"}}, 422, "options.folds: "),
    ({"type": "segment", "image": "IMG", "model": "demo", "prompts": [{"id": 1, "point": [0, 0, 0]}],
      "options": {"device": "cuda:0"}}, 422, "options.device: unknown field"),
    ({"type": "segment", "image": "IMG", "model": "/tmp/model", "prompts": [{"id": 1, "point": [0, 0, 0]}]}, 404,
     'unknown model "/tmp/model"; this server has: demo'),
    ({"type": "track", "images": ["IMG"], "model": "demo", "baseline": ""}, 422, "images: expected at least 2"),
    ({"type": "track", "images": ["IMG", "IMG"], "model": "demo", "baseline": "", "registration": "elastix"}, 422,
     "registration: unknown registration backend"),
    ({"type": "track", "images": ["IMG", "IMG"], "model": "demo", "baseline": "", "names": ["a"]}, 422,
     "names: expected null or 2 names"),
    ({"type": "track", "images": ["IMG", "IMG"], "model": "demo", "baseline": "", "min_prompt_fraction": 2}, 422,
     "min_prompt_fraction: "),
    ({"type": "track", "images": ["IMG", "IMG"], "model": "demo"}, 422, "baseline: missing"),
    ({"type": "track", "images": ["IMG", "IMG"], "model": "demo", "baseline": "",
      "corrections": [{"lesion": 1, "scan": 1, "vanished": True}]}, 422, 'corrections: corrections need "previous"'),
    ({"type": "track", "images": ["IMG", "IMG"], "model": "demo", "previous": "0" * 32,
      "corrections": [{"lesion": 1, "scan": 1, "vanished": True}]}, 409, "the tracking run \"0000"),
    ({"type": "track", "images": ["IMG", "IMG"], "model": "demo", "previous": "0" * 32, "baseline": "",
      "corrections": [{"lesion": 1, "scan": 1, "vanished": True}]}, 422, "baseline: a correction of an earlier run"),
]


@pytest.mark.parametrize("body,status,detail", MALFORMED, ids=[f"{n}" for n in range(len(MALFORMED))])
def test_a_malformed_job_is_refused_naming_the_field(base_url, uploaded, body, status, detail):
    if not isinstance(body, bytes):
        body = json.loads(json.dumps(body).replace('"IMG"', json.dumps(uploaded)))
    got, answer, _ = call(base_url, "POST", "/jobs", body, key=ALICE)
    assert (got, answer["detail"][:len(detail)]) == (status, detail), answer
    assert "Traceback" not in answer["detail"] and "File \"" not in answer["detail"]


def test_bad_masks_and_query_values_name_the_field(base_url, demo, uploaded):
    shape = demo["images"][0].shape
    wrong = serverapi.encode_masks({"1": np.ones((2, 2, 2), bool)})
    job = {"type": "segment", "image": uploaded, "model": "demo", "prompts": [{"id": 1, "mask": "1"}], "masks": wrong}
    status, answer, _ = call(base_url, "POST", "/jobs", job, key=ALICE)
    assert status == 422 and answer["detail"] == (f"masks: mask '1': shape [2, 2, 2] is not the image's (z, y, x) "
                                                  f"{list(shape)}")
    status, answer, _ = call(base_url, "GET", "/jobs/abc?wait=soon", key=ALICE)
    assert status == 422 and answer["detail"].startswith("wait: ")


def test_no_traceback_ever_reaches_a_client(demo):
    """A job that fails inside (not a library error) is an InternalError with a reference only;
    an endpoint that fails is a 500 with a reference only; the traceback goes to the log."""
    class Broken:
        def run(self, *args, **kwargs):
            raise RuntimeError("secret detail /srv/models/x.pth")

        def close(self):
            pass

    class BrokenInfo(Service):
        def info(self):
            raise KeyError("/srv/secret/path")

    cfg = config()
    image = demo["images"][0]
    digest = serverapi.image_id(image)
    with serve_in_thread(cfg, BrokenInfo(cfg, make_runner=Broken)) as url:
        assert call(url, "PUT", f"/images/{digest}", serverapi.encode_image(image), key=ALICE)[0] == 201
        status, answer, _ = call(url, "POST", "/jobs", _job(digest, demo["points"][0].xyz), key=ALICE)
        done = finished(url, ALICE, answer["job"])
        assert done["state"] == "failed" and done["error"]["kind"] == "InternalError"
        assert done["error"]["message"] == (f"internal error in job {answer['job']}; the details are in the server's "
                                            f"log")
        status, answer, _ = call(url, "GET", "/info", key=ALICE)
        assert status == 500 and answer["detail"].startswith("internal error (reference ")
        assert "secret" not in json.dumps(answer) + json.dumps(done)


# ------------------------------------------------------------------------------ the image cache
def test_the_cache_evicts_the_least_recently_used_volume_and_the_client_uploads_it_again(demo):
    images = demo["images"]
    budget = images[0].array.nbytes * 2  # room for two of the three scans
    with serve_in_thread(config(max_cache_bytes=budget)) as url:
        remote = RemoteRunner(url, ALICE)
        point = [demo["points"][0]]
        for t in (0, 1, 0, 2):  # t0 used again before t2 arrives: t1 is the least recently used
            remote.run(SegmentationRequest(images[t], point, SPEC, image_key=f"t{t}"))
        assert remote.uploads == 3
        cache = remote.info()["cache"]
        assert cache == {"budget_bytes": budget, "used_bytes": budget, "images": 2}
        digest = serverapi.image_id(images[1])
        status, answer, _ = call(url, "POST", "/jobs", _job(digest, point[0].xyz), key=ALICE)
        assert status == 409 and answer["missing"] == [digest] and "upload them again" in answer["detail"]
        remote.run(SegmentationRequest(images[0], point, SPEC, image_key="t0"))
        assert remote.uploads == 3  # t0 was still there
        remote.run(SegmentationRequest(images[1], point, SPEC, image_key="t1"))
        assert remote.uploads == 4  # t1 was evicted: uploaded again without the caller seeing it
        remote.close()


# ------------------------------------------------------------------------------ under load
def test_twenty_clients_five_clicks_each_lose_nothing_and_mix_nothing(demo):
    """20 clients (own keys) click 5 times each, all at once, on three scans and four places:
    every one of the 100 results equals the in-process result of that very click (at least 8
    different clicks whose masks all differ, each with its own prompt ID), and clients hear their queue
    position while they wait."""
    images, points = demo["images"], demo["points"]
    local = InProcessRunner()
    want = {}
    for t in range(3):
        for n, point in enumerate(points):
            pid = 10 * t + n + 1
            mask = local.run(SegmentationRequest(images[t], [Point(pid, point.xyz)], SPEC)).masks[pid]
            if mask.any():  # the demo's baseline clicks: most, not all, still hit a lesion at the follow-ups
                want[t, n] = mask
    local.close()
    clicks = sorted(want)
    assert len(clicks) >= 8
    assert len({m.tobytes() for m in want.values()}) == len(clicks)  # a mixed-up result would show

    results, positions, errors = {}, [], []

    def client(name: str, key: str, index: int) -> None:
        remote = RemoteRunner(url, key, poll_s=0.2)
        try:
            for k in range(5):
                t, n = clicks[(index + 5 * k) % len(clicks)]
                pid = 10 * t + n + 1

                def heard(fraction, message):
                    if message.startswith("queued on the server, position "):
                        positions.append(int(message.rsplit(" ", 1)[1]))

                got = remote.run(SegmentationRequest(images[t], [Point(pid, points[n].xyz)], SPEC,
                                                     image_key=f"t{t}"), heard)
                results[name, k] = (t, n, got.masks)
        except Exception as e:  # noqa: BLE001 - reported below with the client's name
            errors.append(f"{name}: {type(e).__name__}: {e}")
        finally:
            remote.close()

    with serve_in_thread(config(max_jobs_per_client=1)) as url:
        threads = [threading.Thread(target=client, args=(name, key, i)) for i, (name, key) in enumerate(KEYS.items())]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
        info = RemoteRunner(url, ALICE).info()
    assert errors == [] and len(results) == 100
    for (name, k), (t, n, masks) in results.items():
        pid = 10 * t + n + 1
        assert list(masks) == [pid] and np.array_equal(masks[pid], want[t, n]), (name, k)
    assert max(positions) >= 5  # with 20 clients and one device, most clicks wait behind others
    scans_per_client = {(name, t) for (name, _), (t, _, _) in results.items()}
    assert info["queue"] == {"queued": 0, "running": 0} and info["cache"]["images"] == len(scans_per_client)


def test_two_devices_run_two_jobs_at_once(demo):
    """``--devices cpu,cpu``: a device pool of two; two clients' long jobs run side by side."""
    image = demo["images"][0]
    rng = np.random.default_rng(0)
    many = [{"id": i + 1, "point": list(image.index_to_world(rng.uniform(np.array(image.shape) * 0.3,
                                                                          np.array(image.shape) * 0.7)))}
            for i in range(60)]
    digest, data = serverapi.image_id(image), serverapi.encode_image(image)
    with serve_in_thread(config(devices=("cpu", "cpu"))) as url:
        jobs = []
        for key in (ALICE, BOB):
            assert call(url, "PUT", f"/images/{digest}", data, key=key)[0] == 201
            status, answer, _ = call(url, "POST", "/jobs", {"type": "segment", "image": digest, "model": "demo",
                                                            "prompts": many}, key=key)
            assert status == 202
            jobs.append((key, answer["job"]))
        states = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = [call(url, "GET", f"/jobs/{job}", key=key)[1]["state"] for key, job in jobs]
            if states == ["running", "running"] or "done" in states:
                break
            time.sleep(0.05)
        assert states == ["running", "running"]
        assert call(url, "GET", "/info", key=ALICE)[1]["queue"] == {"queued": 0, "running": 2}
        for key, job in jobs:
            assert call(url, "DELETE", f"/jobs/{job}", key=key)[0] == 200
            assert finished(url, key, job)["state"] == "cancelled"


# ------------------------------------------------------------------------------ the serve command
def _keys_file(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / f"keys{len(list(tmp_path.glob('keys*.txt')))}.txt"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_serve_options_are_checked_before_anything_starts(tmp_path, capsys):
    good = _keys_file(tmp_path, "alice:abcdefghijklmnop0123\n")
    cases = [
        (["--host", "0.0.0.0"], "--host 0.0.0.0: without --api-key-file the server listens on a loopback address only"),
        (["--api-key-file", str(tmp_path / "none.txt")], f"--api-key-file {tmp_path / 'none.txt'}: "),
        (["--api-key-file", _keys_file(tmp_path, "# only comments\n")], "no key in it"),
        (["--api-key-file", _keys_file(tmp_path, "alice:short\n")], ":1: a key needs at least 16 characters"),
        (["--api-key-file", _keys_file(tmp_path, "a b:abcdefghijklmnop0123\n")], ":1: 'a b' is not a client name"),
        (["--api-key-file", _keys_file(tmp_path, "a:abcdefghijklmnop0123\na:abcdefghijklmnop0124\n")],
         ":2: the name is given twice"),
        (["--api-key-file", _keys_file(tmp_path, "a:abcdefghijklmnop0123\nb:abcdefghijklmnop0123\n")],
         ":2: the key is given twice"),
        (["--api-key-file", good, "--ssl-certfile", good], "--ssl-certfile and --ssl-keyfile go together"),
        (["--api-key-file", good, "--ssl-certfile", good, "--ssl-keyfile", str(tmp_path / "k.pem")],
         f"--ssl-keyfile {tmp_path / 'k.pem'}: not a file"),
        (["--devices", "cuda:0"], "--devices cuda:0: this machine has 0 CUDA device(s)"),
        (["--models", str(tmp_path)], ""),
        (["--models", "demo", "demo"], "the name 'demo' is given twice"),
    ]
    for options, message in cases:
        assert cli.main(["serve", "--port", "9", *options]) == 2, options
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (options, err)
    for bad in (["--port", "0"], ["--port", "http"], ["--max-cache-gb", "0"], ["--max-jobs-per-client", "0"],
                ["--devices", ","]):
        with pytest.raises(SystemExit) as e:
            cli.main(["serve", *bad])
        assert e.value.code == 2
        assert "serve: error: argument" in capsys.readouterr().err


def test_serve_warns_about_a_readable_keys_file_and_a_keyless_server(tmp_path, capsys):
    from LesionLocatorLib.servecommand import read_api_keys, server_config

    readable = _keys_file(tmp_path, "x:abcdefghijklmnop0123\nabcdefghijklmnop0124 # second\n", 0o644)
    assert read_api_keys(readable) == {"x": "abcdefghijklmnop0123", "client2": "abcdefghijklmnop0124"}
    assert "is readable by other users (mode 644); run chmod 600 on it" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["serve", "--devices", "cpu"])
    cfg = server_config(args)
    assert cfg.keys is None and cfg.host == "127.0.0.1" and cfg.devices == ("cpu",)
    assert "no --api-key-file: every local user and program can use this server" in capsys.readouterr().err
    with serve_in_thread(ServerConfig(port=free_port(), devices=("cpu",))) as url:  # no keys: client "local"
        assert call(url, "GET", "/info")[0] == 200


def test_an_oblique_anisotropic_volume_travels_exactly():
    """The upload encoding keeps voxels, spacing, origin and an oblique direction bit for bit (and
    so the image ID), for every voxel type it sends."""
    angle = 0.4
    direction = np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])
    rng = np.random.default_rng(1)
    for dtype in serverapi.IMAGE_DTYPES:
        array = rng.integers(-100, 100, (7, 5, 3)).astype(dtype) if np.dtype(dtype).kind != "u" else \
            rng.integers(0, 200, (7, 5, 3)).astype(dtype)
        image = Image(array, (0.7, 0.9, 2.5), (-10.25, 3.5, 100.125), direction)
        back = serverapi.decode_image(serverapi.encode_image(image), 10 ** 6)
        assert back.array.dtype == array.dtype and np.array_equal(back.array, array)
        assert np.array_equal(back.spacing, image.spacing) and np.array_equal(back.origin, image.origin)
        assert np.array_equal(back.direction, image.direction)
        assert serverapi.image_id(back) == serverapi.image_id(image)
    assert serverapi.image_id(image) != serverapi.image_id(Image(array, (0.7, 0.9, 2.5), (-10.25, 3.5, 100.125)))
