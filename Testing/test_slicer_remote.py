"""The Slicer module's Logic in Remote mode on a real MRML scene (slicer-core), against the real
``lesionlocator serve`` (a subprocess serving the demo model): a click gives the mask the local
run gives, refine and track too; the API key never reaches the scene; a server killed mid-job is
a WorkerError with the scene unchanged, and after a restart the next click works (the volume is
uploaded again by itself). The panel's Remote settings are checked without Qt.
"""
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

import slicer
import slicer.util

from LesionLocatorLib.image import read_image
from LesionLocatorLib.protocol import WorkerError
from LesionLocatorLib.remote import RemoteRunner, ServerError

pytest_plugins = ["slicer_harness"]  # fixtures: slicer_scene, lesionlocator_module
pytest.register_assert_rewrite("slicer_harness")
from slicer_harness import import_module_file  # noqa: E402
from serve_process import KEY  # noqa: E402  (fixtures server, own_server: lesionlocator serve in a subprocess)
from test_remote import _many_points  # noqa: E402

import_module_file()
from LesionLocatorSlicer import remotesettings  # noqa: E402
from LesionLocatorSlicer.jobs import JobQueue  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "Resources" / "Demo"
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture
def LL(lesionlocator_module):
    return lesionlocator_module


# ------------------------------------------------------------------------------ the demo case in a scene
def _demo_volume(h, t=0):
    """demo_t{t} as a scalar volume (its LPS geometry as RAS)."""
    image = read_image(DEMO / f"demo_t{t}.nii.gz")
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = LPS_TO_RAS @ np.asarray(image.direction) @ np.diag(image.spacing)
    ijk_to_ras[:3, 3] = LPS_TO_RAS @ np.asarray(image.origin)
    return h.add_volume(image.array, ijk_to_ras, f"demo t{t}"), image


def _clicks(h, image, voxels, name="clicks"):
    node = h.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for kji in voxels:
        node.AddControlPointWorld([float(v) for v in LPS_TO_RAS @ image.index_to_world(kji)])
    return node


DEMO_CLICKS = [(37.08, 68.91, 38.1), (52.89, 18.92, 89.88), (44.09, 23.85, 24.53), (81.98, 66.98, 101.06)]


def _arrays(node, volume) -> dict:
    return {sid: slicer.util.arrayFromSegmentBinaryLabelmap(node, sid, volume) > 0
            for sid in node.GetSegmentation().GetSegmentIDs()}


def _same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ remote = local
def test_click_refine_and_track_on_the_server_give_the_local_results(slicer_scene, LL, server, tmp_path):
    h = slicer_scene
    volume, image = _demo_volume(h)
    clicks = _clicks(h, image, DEMO_CLICKS)
    local = LL.LesionLocatorLogic()
    localNode = local.segment(volume, clicks, device="cpu")
    expected = _arrays(localNode, volume)
    h.scene.RemoveNode(localNode)
    assert expected["lesion_1"].any()

    logic = LL.LesionLocatorLogic()
    logic.useRemoteServer(server.url, KEY)
    try:
        assert logic.isRemote and isinstance(logic.runner, RemoteRunner)
        messages = []
        node = logic.segment(volume, clicks, progress=lambda f, m: messages.append(m))
        assert _same(_arrays(node, volume), expected)
        assert any(m.startswith("queued on the server") or "patch" in m for m in messages)
        assert logic.lastRunSummary().startswith("4 lesion(s) segmented")
        again = logic.segment(volume, (clicks, 2))  # one click more, same volume: not uploaded again
        assert again is node and logic.runner.uploads == 1

        # refine: a module lesion as its own mask prompt, on the server and here
        refined = _arrays(logic.refineFromSegment(volume, node, "lesion_2"), volume)["lesion_2"]
        local_node = local.segment(volume, clicks, device="cpu")
        assert np.array_equal(refined, _arrays(local.refineFromSegment(volume, local_node, "lesion_2", device="cpu"),
                                               volume)["lesion_2"])
        h.scene.RemoveNode(local_node)

        # the key is nowhere in the scene: the module's parameter node included
        logic.setDefaultParameters(logic.getParameterNode())
        h.scene.SetURL(str(tmp_path / "scene.mrml"))
        assert h.scene.Commit()
        text = (tmp_path / "scene.mrml").read_text()
        assert "LesionLocator" in text and KEY not in text and server.url not in text
    finally:
        logic.cleanup()


def test_track_on_the_server_gives_the_local_outputs(slicer_scene, LL, server):
    h = slicer_scene
    (base, image), (fu1, _), (fu2, _) = [_demo_volume(h, t) for t in range(3)]
    clicks = _clicks(h, image, DEMO_CLICKS)
    logic = LL.LesionLocatorLogic()
    logic.segment(base, clicks, device="cpu")
    local = logic.track(base, [fu1, fu2], device="cpu")
    want = [_arrays(n, v) for n, v in zip(local.segmentationNodes, local.volumeNodes)]
    logic.useRemoteServer(server.url, KEY)
    try:
        out = logic.track(base, [fu1, fu2])  # replaces the local run's outputs
    finally:
        logic.cleanup()
    assert out.status == local.status and out.response.rows == local.response.rows
    assert all(_same(_arrays(n, v), w) for n, v, w in zip(out.segmentationNodes, out.volumeNodes, want))
    assert logic.lastTrackSummary().startswith("4 lesion(s) tracked through 2 follow-up(s)")


def test_review_corrections_in_remote_mode_give_the_local_corrections(slicer_scene, LL, server):
    """The review panel's Logic in Remote mode: the server keeps the run, a point correction and a
    moved-point correction there give the segments of the same corrections made locally, and undo
    restores the remote run's segments."""
    h = slicer_scene
    (base, image), (fu1, image1), (fu2, _) = [_demo_volume(h, t) for t in range(3)]
    clicks = _clicks(h, image, DEMO_CLICKS)
    point = _clicks(h, image1, [DEMO_CLICKS[1]], "correction")
    moved = _clicks(h, image1, [tuple(np.asarray(DEMO_CLICKS[2]) + 2.0)], "moved")
    logic = LL.LesionLocatorLogic()
    logic.segment(base, clicks, device="cpu")
    logic.track(base, [fu1, fu2], device="cpu")
    logic.correctTracking(2, 1, "point", promptNode=point)
    local = logic.correctTracking(3, 1, "moved", promptNode=moved)
    want = [_arrays(n, v) for n, v in zip(local.segmentationNodes, local.volumeNodes)]
    logic.useRemoteServer(server.url, KEY)
    try:
        first = logic.track(base, [fu1, fu2])
        before = [_arrays(n, v) for n, v in zip(first.segmentationNodes, first.volumeNodes)]
        logic.correctTracking(2, 1, "point", promptNode=point)
        out = logic.correctTracking(3, 1, "moved", promptNode=moved)
        assert out.response.timings["registration"] == 0.0
        assert out.status == local.status and out.response.rows == local.response.rows
        assert all(_same(_arrays(n, v), w) for n, v, w in zip(out.segmentationNodes, out.volumeNodes, want))
        logic.undo()
        logic.undo()
        after = [_arrays(n, v) for n, v in zip(logic.lastTrack.segmentationNodes, logic.lastTrack.volumeNodes)]
        assert all(_same(a, b) for a, b in zip(after, before))
    finally:
        logic.cleanup()


def test_remote_mode_needs_no_torch_here(slicer_scene, LL, server, monkeypatch):
    from LesionLocatorSlicer import logic as logic_module

    h = slicer_scene
    volume, image = _demo_volume(h)
    clicks = _clicks(h, image, DEMO_CLICKS[:1])
    monkeypatch.setattr(logic_module.dependencies, "status_message", lambda: "torch is not installed")
    with pytest.raises(LL.MissingDependencyError, match="torch"):
        LL.LesionLocatorLogic().segment(volume, clicks)
    logic = LL.LesionLocatorLogic()
    logic.useRemoteServer(server.url, KEY, model="demo")
    try:
        assert logic.segment(volume, clicks) is not None
    finally:
        logic.cleanup()


# ------------------------------------------------------------------------------ failures
def test_server_killed_mid_click_then_restarted(slicer_scene, LL, own_server):
    """As the panel runs it (a job): the failure arrives as a WorkerError, the scene is as before;
    the server started again, the next click works and the volume is uploaded again by itself."""
    h = slicer_scene
    volume, image = _demo_volume(h)
    clicks = _clicks(h, image, DEMO_CLICKS)
    logic = LL.LesionLocatorLogic()
    logic.useRemoteServer(own_server.url, KEY)
    logic.getParameterNode()  # the panel's jobs read their options from it
    node = logic.segment(volume, (clicks, 0))
    lesion = _arrays(node, volume)
    many = _clicks(h, image, [image.world_to_index(p.xyz) for p in _many_points(image)], name="many")
    before = h.node_ids()

    def kill_when_running(fraction, message):
        if "patch 2/" in message:
            own_server.kill()

    jobs, outcome = JobQueue(progress=kill_when_running), {}
    jobs.submit(logic.segmentationJob(volume, many, done=lambda n: outcome.update(done=n),
                                      failed=lambda e: outcome.update(failed=e)))
    jobs.wait(timeout=120)
    error = outcome.get("failed")
    assert isinstance(error, ServerError) and isinstance(error, WorkerError), outcome
    assert f"server at {own_server.url} went away while it ran the job" in str(error)
    assert h.node_ids() == before and _same(_arrays(node, volume), lesion)

    own_server.start()
    assert logic.segment(volume, (clicks, 1)) is node
    assert logic.runner.uploads == 2 and _arrays(node, volume)["lesion_2"].any()
    logic.cleanup()


def test_connection_test_lines(LL, server):
    line, names = LL.LesionLocatorLogic.testServerConnection(server.url, KEY)
    assert line.startswith(f"Connected to {server.url}: LesionLocator ") and "models demo" in line
    assert names == ["demo"]
    line, names = LL.LesionLocatorLogic.testServerConnection(server.url, "wrong-key-0123456789abcdef")
    assert line.startswith("Connection failed: ") and "refused the API key" in line and names == []
    line, names = LL.LesionLocatorLogic.testServerConnection("gpu-server:8000")
    assert line.startswith("Connection failed: not a server URL") and names == []


# ------------------------------------------------------------------------------ the panel's settings
class FakeSettings(dict):
    """``qt.QSettings``'s value/setValue/remove."""

    def value(self, key, default=None):
        return self.get(key, default)

    def setValue(self, key, value):
        self[key] = value

    def remove(self, key):
        self.pop(key, None)


class FakeKeyring(dict):
    def get_password(self, service, user):
        return self.get((service, user))

    def set_password(self, service, user, password):
        self[(service, user)] = password

    def delete_password(self, service, user):
        del self[(service, user)]


def test_remote_settings_are_kept_per_user_with_the_key_in_the_keyring():
    settings, keyring = FakeSettings(), FakeKeyring()
    assert remotesettings.load(settings) == remotesettings.RemoteSettings()
    remote = remotesettings.RemoteSettings(True, "https://gpu:8443", "demo", KEY)
    assert KEY not in repr(remote)
    assert remotesettings.save(remote, settings, keyring) == "keyring"
    assert KEY not in settings.values() and keyring[(remotesettings.KEYRING_SERVICE, "https://gpu:8443")] == KEY
    assert remotesettings.load(settings, keyring) == remote
    assert remotesettings.save(remote, settings) == "settings"  # no keyring: the user's settings file
    assert settings[remotesettings.KEY] == KEY and remotesettings.load(settings) == remote
    assert remotesettings.save(remotesettings.RemoteSettings(False, "https://gpu:8443"), settings, keyring) == ""
    assert remotesettings.KEY not in settings and not keyring
    assert remotesettings.load(settings, keyring) == remotesettings.RemoteSettings(False, "https://gpu:8443")


def test_the_panel_has_the_remote_widgets():
    root = ET.parse(REPO / "LesionLocator" / "Resources" / "UI" / "LesionLocator.ui").getroot()
    widgets = {w.get("name"): w for w in root.iter("widget")}
    expected = {"runModeComboBox": "QComboBox", "serverUrlLineEdit": "QLineEdit", "apiKeyLineEdit": "QLineEdit",
                "serverModelComboBox": "QComboBox", "testConnectionButton": "QPushButton"}
    assert {name: widgets[name].get("class") for name in expected} == expected
    echo = widgets["apiKeyLineEdit"].find("property[@name='echoMode']/enum")
    assert echo is not None and echo.text == "QLineEdit::Password"
    source = (REPO / "LesionLocator" / "LesionLocatorSlicer" / "widget.py").read_text()
    assert all(f"ui.{name}" in source for name in expected)
    assert "SetParameter" not in source.split("# ------------------------------------------------------------------ "
                                              "remote mode")[1].split("# ----")[0]
