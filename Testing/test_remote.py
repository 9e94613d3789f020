"""The client of ``lesionlocator serve``: :class:`LesionLocatorLib.remote.RemoteRunner` and the
command line's ``--server``, against the real server (``lesionlocator serve`` in a subprocess with
a keys file and the demo model), compared with the same work done in this process.

Remote and local must give identical masks and measurements (point, box, refine, track, and the
command line's files byte for byte); a wrong key, a missing server, a server killed mid-job and
Cancel must each give a clear error and leave nothing behind; after a restart the next request
works, uploading its image again by itself.
"""
import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from LesionLocatorLib import cli
from LesionLocatorLib.cancel import CancelToken, Cancelled
from LesionLocatorLib.correct import Correction
from LesionLocatorLib.image import Image, read_image
from LesionLocatorLib.modelfolder import ModelSpec
from LesionLocatorLib.prompts import Box, MaskPrompt, Point, PromptError, VoxelPrompt, read_prompt_file, \
    to_voxel_prompt
from LesionLocatorLib.protocol import WorkerError
from LesionLocatorLib.remote import RemoteRunner, ServerError, read_api_key, world_prompt
from LesionLocatorLib.runner import InProcessRunner, SegmentationRequest, TrackRequest
from LesionLocatorLib.zoo import demo_model_dir
from serve_process import KEY, OTHER_KEY, ServeProcess, free_port

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "Resources" / "Demo"


# ------------------------------------------------------------------------------ the demo case
@pytest.fixture(scope="module")
def demo():
    images = [read_image(DEMO / f"demo_t{t}.nii.gz") for t in range(3)]
    labels = read_image(DEMO / "demo_t0_label.nii.gz")
    points = [Point(vp.id, tuple(images[0].index_to_world(vp.coords))) for vp in read_prompt_file(
        DEMO / "demo_points.json")]
    boxes = [world_prompt(vp, images[0]) for vp in read_prompt_file(DEMO / "demo_boxes.json")]
    return {"images": images, "labels": labels, "points": points, "boxes": boxes}


@pytest.fixture(scope="module")
def local():
    runner = InProcessRunner()
    yield runner
    runner.close()


SPEC = ModelSpec(str(demo_model_dir()), device="cpu")


def _same_segmentation(remote, local):
    assert sorted(remote.masks) == sorted(local.masks)
    for pid, mask in local.masks.items():
        assert remote.masks[pid].dtype == bool and np.array_equal(remote.masks[pid], mask), pid
    assert (remote.empty, remote.overlaps, remote.warnings) == (local.empty, local.overlaps, local.warnings)


def _many_points(image, n=40):
    """``n`` clicks spread over the body: a job of n/2 network batches (seconds on the CPU)."""
    rng = np.random.default_rng(3)
    voxels = rng.uniform(np.asarray(image.shape) * 0.3, np.asarray(image.shape) * 0.7, (n, 3))
    return [Point(i + 1, tuple(image.index_to_world(v))) for i, v in enumerate(voxels)]


# ------------------------------------------------------------------------------ without a server
def test_api_key_files_and_server_urls(tmp_path):
    key = tmp_path / "key"
    key.write_text("# from the admin\n\n   alice:abcdefghijklmnop0123  # mine\nsecond\n")
    assert read_api_key(key) == "abcdefghijklmnop0123"
    key.write_text("plain-key-0123456789\n")
    assert read_api_key(key) == "plain-key-0123456789"
    key.write_text("# nothing\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        read_api_key(key)
    with pytest.raises(FileNotFoundError, match="API key file not found"):
        read_api_key(tmp_path / "missing")
    assert RemoteRunner("https://gpu.example.org/ll/").url == "https://gpu.example.org:443/ll"
    assert "secret" not in repr(RemoteRunner("http://h:1", api_key="secret-key-0123456789"))
    for bad in ("gpu:8000", "ftp://gpu", "http://", "http://h:99999", "http://h:1/?x=1"):
        with pytest.raises(ValueError):
            RemoteRunner(bad)
    with pytest.raises(ValueError, match="printable ASCII"):
        RemoteRunner("http://h:1", api_key="two words")


def test_no_server_at_the_url_is_a_server_error_naming_it(demo):
    url = f"http://127.0.0.1:{free_port()}"
    runner = RemoteRunner(url, KEY, timeout_s=5)
    with pytest.raises(ServerError, match=f"cannot reach the LesionLocator server at {url}") as caught:
        runner.run(SegmentationRequest(demo["images"][0], demo["points"][:1], SPEC))
    assert isinstance(caught.value, WorkerError) and caught.value.status is None
    assert runner.test_connection().startswith(f"Connection failed: cannot reach the LesionLocator server at {url}")


def test_voxel_prompts_go_as_world_prompts_that_give_the_same_voxels(demo):
    """The command line's voxel prompts (upstream JSON) go to the server as LPS mm; the server's
    conversion gives back the same voxels (boxes exactly, points to the last bits)."""
    image = demo["images"][0]
    for vp in read_prompt_file(DEMO / "demo_points.json") + read_prompt_file(DEMO / "demo_boxes.json"):
        world = world_prompt(vp, image)
        assert isinstance(world, Point if vp.kind == "point" else Box)
        back = to_voxel_prompt(world, image).coords
        if vp.kind == "box":
            assert list(back) == list(vp.coords)
        else:
            assert np.allclose(back, vp.coords, rtol=0, atol=1e-12)
    oblique = Image(image.array, image.spacing, image.origin, np.array(
        [[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]]))
    with pytest.raises(PromptError, match="has no world box that gives it back"):
        world_prompt(VoxelPrompt(1, "box", [30, 40, 30, 40, 30, 40]), oblique)
    with pytest.raises(PromptError, match="outside the image"):
        world_prompt(VoxelPrompt(2, "point", [500.0, 1.0, 1.0]), image)


def test_cli_server_options_are_checked_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "out"
    common = ["segment", "-i", str(DEMO / "demo_t0.nii.gz"), "-p", str(DEMO / "demo_points.json"), "-t", "point",
              "-o", str(out)]
    assert cli.main(common + ["--api-key-file", str(tmp_path / "k")]) == 2
    assert "--api-key-file is for --server" in capsys.readouterr().err
    assert cli.main(common + ["--server", "http://127.0.0.1:9", "--save-probabilities"]) == 2
    assert "--save-probabilities cannot be used with --server" in capsys.readouterr().err
    url = f"http://127.0.0.1:{free_port()}"
    assert cli.main(common + ["--server", url]) == 2
    assert f"cannot reach the LesionLocator server at {url}" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------ remote = local
def test_point_box_and_refine_give_the_local_masks(server, demo, local):
    """Clicks, boxes, a mixed request and a refine (mask prompt) on the server equal the in-process
    runner; the image is uploaded once (first request) and then named by its ID only."""
    image = demo["images"][0]
    remote = RemoteRunner(server.url, KEY)
    refine = MaskPrompt(7, demo["labels"].with_array((demo["labels"].array == 2).astype(np.uint8)))
    cases = {"points": demo["points"], "boxes": demo["boxes"], "mixed": [demo["points"][0], demo["boxes"][1]],
             "refine": [refine]}
    try:
        for name, prompts in cases.items():
            messages = []
            got = remote.run(SegmentationRequest(image, prompts, SPEC, image_key="demo_t0"),
                             progress=lambda f, m: messages.append((f, m)))
            _same_segmentation(got, local.run(SegmentationRequest(image, prompts, SPEC)))
            assert messages[-1][0] == 1.0 and any("patch" in m for _, m in messages), name
        assert remote.uploads == 1
        assert remote.test_connection() == (f"Connected to {server.url}: LesionLocator 0.1.0, devices cpu, "
                                            f"models demo; 0 queued, 0 running")
    finally:
        remote.close()


def test_track_gives_the_local_masks_status_and_measurements(server, demo, local):
    images, labels = demo["images"], demo["labels"].array
    baseline = {int(i): labels == i for i in np.unique(labels) if i}
    request = dict(images=images, baseline=baseline, model=SPEC, names=["base", "fu1", "fu2"], min_volume_ml=0.05)
    remote = RemoteRunner(server.url, KEY)
    try:
        got = remote.track(TrackRequest(**request))
    finally:
        remote.close()
    want = local.track(TrackRequest(**request))
    assert got.status == want.status and got.warnings == want.warnings
    assert got.rows == want.rows and len(want.rows) == 12  # 4 lesions x 3 scans
    for t in range(3):
        assert sorted(got.masks[t]) == sorted(want.masks[t])
        assert all(np.array_equal(got.masks[t][i], want.masks[t][i]) for i in want.masks[t])
    assert [r["backend"] for r in got.registrations] == ["simpleitk", "simpleitk"]


def test_corrections_on_the_server_give_the_local_corrections(server, demo, local):
    """A review session in Remote mode: the server keeps the client's tracking run, and a track
    job with ``previous`` and corrections gives exactly the local correction of the local run,
    without registering again; another client cannot correct that run."""
    images, labels = demo["images"], demo["labels"].array
    baseline = {int(i): labels == i for i in np.unique(labels) if i}
    request = dict(images=images, model=SPEC, names=["base", "fu1", "fu2"], min_volume_ml=0.05)
    centre = tuple(images[1].index_to_world(np.argwhere(read_image(DEMO / "demo_t1_label.nii.gz").array == 2)
                                            .mean(axis=0)))
    corrections = [Correction(2, 1, Point(2, centre)), Correction(3, 2, vanished=True),
                   Correction(1, 1, Point(1, tuple(np.asarray(centre) + 1.0)), moved=True)]
    remote = RemoteRunner(server.url, KEY)
    try:
        first = remote.track(TrackRequest(baseline=baseline, **request))
        got = remote.track(TrackRequest(baseline={}, corrections=corrections, previous=first.tracked, **request))
    finally:
        remote.close()
    base = local.track(TrackRequest(baseline=baseline, **request))
    want = local.track(TrackRequest(baseline={}, corrections=corrections, previous=base.tracked, **request))
    assert got.timings["registration"] == 0.0 and got.status == want.status and got.rows == want.rows
    assert got.status[3] == ["tracked", "tracked", "vanished"]
    for t in range(3):
        assert all(np.array_equal(got.masks[t][i], want.masks[t][i]) for i in want.masks[t]), t
    other = RemoteRunner(server.url, OTHER_KEY)
    try:
        with pytest.raises(ServerError, match="is no longer on the server"):
            other.track(TrackRequest(baseline={}, corrections=corrections[:1], previous=first.tracked, **request))
    finally:
        other.close()
    with pytest.raises(ValueError, match="a run tracked elsewhere cannot be corrected on this server"):
        RemoteRunner(server.url, KEY).track(TrackRequest(baseline={}, corrections=corrections[:1],
                                                         previous=base.tracked, **request))


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.endswith(".lock")}


def test_cli_segment_and_track_with_server_write_the_local_files(server, tmp_path, capsys):
    """``--server`` writes byte for byte the files of a local run: segment from voxel points and
    voxel boxes (upstream JSON), track from baseline clicks (segmented on the server, then tracked)
    and from a baseline label image."""
    key = tmp_path / "key.txt"
    key.write_text(f"alice:{KEY}\n")
    remote = ["--server", server.url, "--api-key-file", str(key)]
    runs = {"points": ["segment", "-i", str(DEMO / "demo_t0.nii.gz"), "-p", str(DEMO / "demo_points.json"),
                       "-t", "point", "--disable_progress_bar"],
            "boxes": ["segment", "-i", str(DEMO / "demo_t0.nii.gz"), "-p", str(DEMO / "demo_boxes.json"),
                      "-t", "box", "--disable_progress_bar"],
            "track": ["track", "-bl", str(DEMO / "demo_t0.nii.gz"), "-fu", str(DEMO / "demo_t1.nii.gz"),
                      str(DEMO / "demo_t2.nii.gz"), "-p", str(DEMO / "demo_points.json"), "-t", "point",
                      "--disable_progress_bar"],
            "track_masks": ["track", "-bl", str(DEMO / "demo_t0.nii.gz"), "-fu", str(DEMO / "demo_t1.nii.gz"),
                            "-p", str(DEMO / "demo_t0_label.nii.gz"), "--min-volume-ml", "0.1",
                            "--disable_progress_bar"]}
    for name, argv in runs.items():
        assert cli.main(argv + ["-o", str(tmp_path / f"{name}_local"), "-device", "cpu"]) == 0
        assert cli.main(argv + ["-o", str(tmp_path / f"{name}_remote")] + remote) == 0, capsys.readouterr().err
        assert f"server: {server.url}, model demo" in capsys.readouterr().err
        local, got = _files(tmp_path / f"{name}_local"), _files(tmp_path / f"{name}_remote")
        assert sorted(got) == sorted(local) and len(local) >= 3, name
        assert [n for n in local if got[n] != local[n]] == [], name
    assert {"lesions.csv", "lesions.json", "demo_t1_lesions.nii.gz"} <= set(got)


# ------------------------------------------------------------------------------ errors
def test_a_failed_job_raises_the_library_error_with_its_message(server, demo, local):
    image = demo["images"][0]
    outside = [Point(3, (900.0, 900.0, 900.0))]
    with pytest.raises(PromptError) as want:
        local.run(SegmentationRequest(image, outside, SPEC))
    with pytest.raises(PromptError) as got:
        RemoteRunner(server.url, KEY).run(SegmentationRequest(image, outside, SPEC))
    assert str(got.value) == str(want.value) and "prompt 3: point at voxel" in str(got.value)


def test_wrong_or_missing_key_is_refused_clearly(server, demo, tmp_path, capsys):
    for key, hint in (("wrong-key-0123456789abcdef", ""), (None, "none was given")):
        runner = RemoteRunner(server.url, key)
        with pytest.raises(ServerError, match=f"the server at {server.url} refused the API key") as caught:
            runner.run(SegmentationRequest(demo["images"][0], demo["points"][:1], SPEC))
        assert caught.value.status == 401 and hint in str(caught.value)
        assert runner.uploads == 0
    runner = RemoteRunner(server.url, "wrong-key-0123456789abcdef")
    assert runner.test_connection().startswith(f"Connection failed: the server at {server.url} refused the API key")
    assert runner.health()["status"] == "ok"  # health needs no key
    bad = tmp_path / "bad.txt"
    bad.write_text("wrong-key-0123456789abcdef\n")
    out = tmp_path / "out"
    assert cli.main(["segment", "-i", str(DEMO / "demo_t0.nii.gz"), "-p", str(DEMO / "demo_points.json"), "-t",
                     "point", "-o", str(out), "--server", server.url, "--api-key-file", str(bad)]) == 2
    assert "refused the API key" in capsys.readouterr().err and not out.exists()
    assert cli.main(["segment", "-i", str(DEMO / "demo_t0.nii.gz"), "-p", str(DEMO / "demo_points.json"), "-t",
                     "point", "-o", str(out), "--server", server.url, "--api-key-file", str(tmp_path / "k.txt")]) == 2
    assert "API key file not found" in capsys.readouterr().err


def test_unknown_model_names_what_the_server_has(server, demo, tmp_path, capsys):
    from LesionLocatorLib.plans import ModelLayoutError

    with pytest.raises(ModelLayoutError, match="has no model 'nope'.*it serves: demo"):
        RemoteRunner(server.url, KEY, model="nope").run(SegmentationRequest(demo["images"][0], demo["points"][:1],
                                                                            SPEC))
    key = tmp_path / "key.txt"
    key.write_text(KEY)
    assert cli.main(["segment", "-i", str(DEMO / "demo_t0.nii.gz"), "-p", str(DEMO / "demo_points.json"), "-t",
                     "point", "-o", str(tmp_path / "o"), "-m", "nope", "--server", server.url, "--api-key-file",
                     str(key)]) == 2
    assert "-m nope: the server at" in capsys.readouterr().err


def test_cancel_stops_the_job_and_frees_the_device(server, demo):
    """Cancel during a long job: Cancelled at once, the job cancelled on the server, and the next
    job runs on the freed device."""
    image = demo["images"][0]
    remote = RemoteRunner(server.url, KEY, poll_s=0.2)
    token, seen = CancelToken(), []

    def cancel_at_second_batch(fraction, message):
        seen.append(message)
        if "patch 2/" in message:
            token.cancel()

    start = time.monotonic()
    with pytest.raises(Cancelled):
        remote.run(SegmentationRequest(image, _many_points(image), SPEC, image_key="t0"), cancel_at_second_batch,
                   token)
    assert time.monotonic() - start < 20 and not any("patch 20/20" in m for m in seen)
    assert remote.info()["queue"] == {"queued": 0, "running": 0}
    response = remote.run(SegmentationRequest(image, demo["points"][:1], SPEC, image_key="t0"))
    assert sorted(response.masks) == [1]
    remote.close()


def test_server_killed_mid_job_then_restarted(own_server, demo, local):
    """SIGKILL the server while it runs a job: a ServerError naming the URL; started again on the
    same port, the next request works, its image uploaded again without being asked."""
    image = demo["images"][0]
    remote = RemoteRunner(own_server.url, KEY, poll_s=0.2)
    remote.run(SegmentationRequest(image, demo["points"][:1], SPEC, image_key="t0"))
    assert remote.uploads == 1

    def kill_when_running(fraction, message):
        if "patch 2/" in message:
            own_server.kill()

    with pytest.raises(ServerError, match=f"server at {own_server.url} went away while it ran the job"):
        remote.run(SegmentationRequest(image, _many_points(image), SPEC, image_key="t0"), kill_when_running)
    own_server.start()
    got = remote.run(SegmentationRequest(image, demo["points"], SPEC, image_key="t0"))
    assert remote.uploads == 2  # the restarted server had no image: uploaded again, transparently
    _same_segmentation(got, local.run(SegmentationRequest(image, demo["points"], SPEC)))
    remote.close()


def test_cli_server_killed_mid_job_leaves_no_output(own_server, tmp_path, capsys, monkeypatch):
    key = tmp_path / "key.txt"
    key.write_text(KEY)
    prompts = tmp_path / "many.json"
    image = read_image(DEMO / "demo_t0.nii.gz")
    prompts.write_text(json.dumps({str(p.id): {"point": [str(v) for v in image.world_to_index(p.xyz)]}
                                   for p in _many_points(image)}))

    def killing_bar(enabled, desc):
        def update(fraction, message):
            if "patch 2/" in message:
                own_server.kill()
        return type("Bar", (), {"close": lambda self: None})(), update

    monkeypatch.setattr(cli, "progress_bar", killing_bar)
    out = tmp_path / "out"
    assert cli.main(["segment", "-i", str(DEMO / "demo_t0.nii.gz"), "-p", str(prompts), "-t", "point", "-o", str(out),
                     "--server", own_server.url, "--api-key-file", str(key)]) == 2
    assert f"server at {own_server.url} went away while it ran the job" in capsys.readouterr().err
    assert not out.exists()


def test_busy_answer_and_the_queue_position(tmp_path, demo):
    """One job per client at a time (--max-jobs-per-client 1): a second job is refused as busy (429)
    while the first runs; another client's job waits in the queue, reporting its position."""
    import threading

    serve = ServeProcess(tmp_path, "--max-jobs-per-client", "1").start()
    image = demo["images"][0]
    alice, bob = RemoteRunner(serve.url, KEY, poll_s=0.2), RemoteRunner(serve.url, OTHER_KEY)
    try:
        running, token, outcome = threading.Event(), CancelToken(), {}

        def first():
            try:
                alice.run(SegmentationRequest(image, _many_points(image), SPEC, image_key="t0"),
                          lambda f, m: running.set() if "patch" in m else None, token)
            except Cancelled as e:
                outcome["first"] = e

        thread = threading.Thread(target=first)
        thread.start()
        assert running.wait(60)
        with pytest.raises(ServerError, match=f"the server at {serve.url} is busy: busy: you already have 1 jobs") as e:
            alice.run(SegmentationRequest(image, demo["points"][:1], SPEC, image_key="t0"))
        assert e.value.status == 429
        messages = []

        def cancel_alice_once_queued(fraction, message):
            messages.append(message)
            if message == "queued on the server, position 1":
                token.cancel()

        got = bob.run(SegmentationRequest(image, demo["points"][:1], SPEC), cancel_alice_once_queued)
        thread.join(60)
        assert sorted(got.masks) == [1] and isinstance(outcome.get("first"), Cancelled)
        assert messages[0] == "queued on the server, position 1" and bob.uploads == 1  # bob's own copy
    finally:
        serve.stop()


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs the openssl command to make a test certificate")
def test_https_with_a_private_certificate_authority(tmp_path, demo):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    serve = ServeProcess(tmp_path, "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), ca_file=cert).start()
    try:
        assert serve.url.startswith("https://")
        with pytest.raises(ServerError, match=f"cannot reach the LesionLocator server at {serve.url}.*CERTIFICATE"):
            RemoteRunner(serve.url, KEY).info()  # the system's CAs do not know this one
        remote = RemoteRunner(serve.url, KEY, ca_file=cert)
        got = remote.run(SegmentationRequest(demo["images"][0], demo["points"][:2], SPEC, image_key="t0"))
        assert sorted(got.masks) == [1, 2] and remote.uploads == 1
    finally:
        serve.stop()
