"""Model zoo: download from a Zenodo-like records API (a real HTTP server on 127.0.0.1),
resume, checksums, bounded retries, unsafe archives, disk full, locking, offline install,
and `lesionlocator segment -m NAME` on the downloaded model."""
import errno
import hashlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections import namedtuple
from pathlib import Path

import pytest

from http_fixture_server import FixtureServer
from LesionLocatorLib import download, zoo
from LesionLocatorLib.cli import main
from LesionLocatorLib.model import ModelLayoutError, check_model_root

REPO = Path(__file__).resolve().parents[1]
RECORD = "15174217"
KEY = "LesionLocatorCheckpoint.zip"
NAME = "lesionlocator"


# --------------------------------------------------------------------------- fixtures
def zip_model(model_root: Path, dest: Path, extra: dict | None = None, top: str = "LesionLocatorCheckpoint") -> bytes:
    """A zip in the official layout: ``LesionLocatorCheckpoint/LesionLocatorSeg/...``."""
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(model_root.rglob("*")):
            zf.write(p, f"{top}/{p.relative_to(model_root).as_posix()}")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return dest.read_bytes()


@pytest.fixture(scope="module")
def model_files(tiny_model_root) -> dict:
    return {p.relative_to(tiny_model_root).as_posix(): p.read_bytes()
            for p in sorted(tiny_model_root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def archive(tiny_model_root, tmp_path_factory) -> bytes:
    return zip_model(tiny_model_root, tmp_path_factory.mktemp("zip") / KEY)


@pytest.fixture()
def server(archive):
    with FixtureServer() as srv:
        srv.add_record(RECORD, {KEY: archive})
        yield srv


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    c = tmp_path / "cache"
    monkeypatch.setenv("LESIONLOCATOR_HOME", str(c))
    monkeypatch.delenv("LESIONLOCATOR_ZENODO_URL", raising=False)
    monkeypatch.delenv("LESIONLOCATOR_DEMO_MODEL", raising=False)
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    return c


@pytest.fixture(autouse=True)
def sleeps(monkeypatch) -> list:
    """Backoff waits are recorded, not slept."""
    waits = []
    monkeypatch.setattr(download, "_sleep", waits.append)
    return waits


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def assert_nothing_installed(cache: Path, name: str = NAME) -> None:
    models = cache / "models"
    assert not (models / name).exists()
    leftovers = sorted(p.name for p in models.iterdir()) if models.exists() else []
    assert leftovers == [], leftovers  # no .tmp-* / .old-* staging folders


def assert_installed_model_equals(root: Path, model_files: dict) -> None:
    check_model_root(root)
    got = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert got.keys() == model_files.keys()
    assert all(got[k] == model_files[k] for k in got)


def file_requests(server) -> list:
    return server.requests_to("/content")


# --------------------------------------------------------------------------- downloads
def test_full_download_verifies_installs_atomically_and_is_reused(server, cache, archive, model_files):
    seen = []
    root = zoo.download_model(NAME, base_url=server.url, progress=lambda d, t: seen.append((d, t)))
    assert root == cache / "models" / NAME / "LesionLocatorCheckpoint"
    assert_installed_model_equals(root, model_files)
    manifest = json.loads((cache / "models" / NAME / zoo.MANIFEST_NAME).read_text())
    assert {k: manifest[k] for k in ("name", "version", "license", "record", "file", "md5", "archive_size", "root",
                                     "doi")} == {
        "name": NAME, "version": "1.0", "license": "cc-by-4.0", "record": RECORD, "file": KEY, "md5": md5(archive),
        "archive_size": len(archive), "root": "LesionLocatorCheckpoint", "doi": f"10.5281/zenodo.{RECORD}"}
    assert manifest["source"] == f"{server.url}/records/{RECORD}"
    ckpt = "LesionLocatorCheckpoint/LesionLocatorSeg/point_optimized/fold_0/checkpoint_final.pth"
    assert manifest["files"][ckpt]["sha256"] == hashlib.sha256(model_files[ckpt[24:]]).hexdigest()
    # progress: monotonic, ends at the full size
    assert seen[-1] == (len(archive), len(archive)) and all(t == len(archive) for _, t in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) >= 3
    # one metadata request, one file request without Range; the archive and lock leave no debris
    assert [r["path"] for r in server.requests] == [f"/api/records/{RECORD}",
                                                    f"/api/records/{RECORD}/files/{KEY}/content"]
    assert "range" not in server.requests[1]["headers"]
    assert not (cache / "downloads" / NAME).exists()
    assert sorted(p.name for p in (cache / "models").iterdir()) == [NAME]
    # installed: a second call and name resolution touch no network
    assert zoo.download_model(NAME, base_url=server.url) == root
    assert zoo.resolve_model(NAME) == root and zoo.resolve_model("official") == root
    assert len(server.requests) == 2
    [entry] = zoo.list_cached_models()
    assert entry["name"] == NAME and entry["status"] == "ok" and entry["path"] == str(root)
    assert entry["size"] == sum(len(b) for b in model_files.values()) + (
        cache / "models" / NAME / zoo.MANIFEST_NAME).stat().st_size


@pytest.mark.parametrize("honour_range", [True, False], ids=["206", "server-ignores-range"])
def test_resume_after_the_server_drops_the_connection_mid_file(server, cache, archive, model_files, sleeps,
                                                               honour_range):
    cut = len(archive) // 3
    server.add_fault("/content", kind="drop", after=cut, times=1)
    server.honour_range = honour_range  # if not, the 200 answer restarts the file from byte 0
    root = zoo.download_model(NAME, base_url=server.url)
    first, second = file_requests(server)
    assert "range" not in first["headers"]
    assert second["headers"]["range"] == f"bytes={cut}-"
    assert sleeps == [2.0]  # one backoff wait before resuming
    assert_installed_model_equals(root, model_files)


def test_cancel_keeps_the_partial_file_and_the_next_call_resumes(server, cache, archive, model_files):
    server.piece, server.delay = 16 * 1024, 0.005  # small chunks reach the client
    cancel = threading.Event()

    def progress(done, total):
        if done >= total // 2:
            cancel.set()
    with pytest.raises(zoo.DownloadCancelled, match="the partial file is kept for resuming"):
        zoo.download_model(NAME, base_url=server.url, progress=progress, cancel=cancel)
    [part] = list((cache / "downloads" / NAME).glob("*.part"))
    have = part.stat().st_size
    assert len(archive) // 2 <= have < len(archive) and part.read_bytes() == archive[:have]
    assert_nothing_installed(cache)
    partial = [e for e in zoo.list_cached_models() if e["status"] == "partial"]
    assert partial == [{"name": NAME, "status": "partial", "path": str(part), "size": have, "total": len(archive),
                        "file": KEY}]
    with pytest.raises(zoo.ModelNotFoundError, match="model 'lesionlocator' is not downloaded yet"):
        zoo.resolve_model(NAME)
    root = zoo.download_model(NAME, base_url=server.url)
    assert file_requests(server)[-1]["headers"]["range"] == f"bytes={have}-"
    assert len(file_requests(server)) == 2
    assert_installed_model_equals(root, model_files)


def test_checksum_mismatch_removes_the_file_with_a_clear_error(server, cache, archive):
    server.add_record(RECORD, {KEY: archive}, md5={KEY: "0" * 32})
    with pytest.raises(zoo.ChecksumError) as e:
        zoo.download_model(NAME, base_url=server.url)
    assert str(e.value) == (f"checksum mismatch for {KEY}: expected md5 {'0' * 32}, got {md5(archive)}; the "
                            "downloaded file was removed (run the command again to download it afresh)")
    assert list((cache / "downloads").rglob("*.part")) == []
    assert_nothing_installed(cache)
    assert len(file_requests(server)) == 1


@pytest.mark.parametrize("fault, n_meta, n_file, waits, message", [
    (dict(match="/records/", kind="status", status=404, times=None), 1, 0, [],
     "Zenodo record 15174217 not found at {url}/api/records/15174217 (HTTP 404)"),
    (dict(match="/records/", kind="status", status=500, times=None), 3, 0, [1.0, 2.0],
     "{url}/api/records/15174217: the server answered HTTP 500 Internal Server Error after 3 attempts; "
     "try again later"),
    (dict(match="/records/", kind="html", times=None), 1, 0, [],
     "{url}/api/records/15174217 returned an HTML page, not the Zenodo records API JSON (is the server "
     "address right? it is set by LESIONLOCATOR_ZENODO_URL)"),
    (dict(match="/content", kind="status", status=503, times=None), 1, 3, [1.0, 2.0],
     "download of LesionLocatorCheckpoint.zip failed after 3 attempts without progress: "
     "HTTP 503 Service Unavailable"),
    (dict(match="/content", kind="status", status=404, times=None), 1, 1, [],
     "download of LesionLocatorCheckpoint.zip failed: HTTP 404 Not Found from "
     "{url}/api/records/15174217/files/LesionLocatorCheckpoint.zip/content"),
    (dict(match="/content", kind="html", times=None), 1, 1, [],
     "{url}/api/records/15174217/files/LesionLocatorCheckpoint.zip/content returned an HTML page instead of "
     "LesionLocatorCheckpoint.zip (the server may be down for maintenance; try again later)"),
], ids=["record-404", "record-500", "record-html", "file-503", "file-404", "file-html"])
def test_server_errors_fail_clearly_after_bounded_retries(server, cache, sleeps, fault, n_meta, n_file, waits,
                                                          message):
    server.add_fault(**fault)
    with pytest.raises(zoo.DownloadError) as e:
        zoo.download_model(NAME, base_url=server.url, retries=2, backoff=1.0)
    assert str(e.value) == message.format(url=server.url)
    assert len(server.requests_to(f"/records/{RECORD}")) == n_meta
    assert len(file_requests(server)) == n_file
    assert sleeps == waits
    assert_nothing_installed(cache)
    assert list((cache / "downloads").rglob("*.part")) == []


def test_transient_errors_are_retried_then_succeed(server, cache, sleeps, model_files):
    server.add_fault("/records/", kind="status", status=502, times=2)
    server.add_fault("/content", kind="status", status=429, times=1)
    root = zoo.download_model(NAME, base_url=server.url, backoff=0.5)
    assert len(server.requests_to(f"/records/{RECORD}")) == 3 and len(file_requests(server)) == 2
    assert sleeps == [0.5, 1.0, 0.5]
    assert_installed_model_equals(root, model_files)


def test_unreachable_server(cache, sleeps):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(zoo.DownloadError, match=rf"could not reach http://127.0.0.1:{port}/api/records/15174217 "
                                                r"after 2 attempts: .*refused"):
        zoo.download_model(NAME, base_url=f"http://127.0.0.1:{port}", retries=1)
    assert sleeps == [2.0]


def test_base_url_from_the_environment(server, cache, monkeypatch, model_files):
    monkeypatch.setenv("LESIONLOCATOR_ZENODO_URL", server.url + "/")
    assert_installed_model_equals(zoo.download_model(), model_files)
    assert len(server.requests) == 2


# --------------------------------------------------------------------------- unsafe archives, disk full
def test_path_traversal_archive_from_the_server_is_refused(server, cache, tiny_model_root, tmp_path):
    evil = zip_model(tiny_model_root, tmp_path / "evil.zip", extra={"../escaped.txt": b"gotcha"})
    server.add_record(RECORD, {KEY: evil})
    with pytest.raises(zoo.UnsafeArchiveError) as e:
        zoo.download_model(NAME, base_url=server.url)
    assert str(e.value) == (f"refused to unpack {KEY}: entry '../escaped.txt' would be written outside the "
                            "target folder")
    assert [p for p in tmp_path.rglob("escaped.txt")] == []
    assert_nothing_installed(cache)
    assert not (cache / "downloads" / NAME).exists()  # verified but unusable: not kept


def _zip_with(entry: str, data=b"x", symlink=False):
    def build(model_root: Path, path: Path) -> None:
        zip_model(model_root, path)
        with zipfile.ZipFile(path, "a") as zf:
            info = zipfile.ZipInfo(entry)
            if symlink:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, data)
    return build


def _tar_with_symlink(model_root: Path, path: Path) -> None:
    with tarfile.open(path, "w:gz") as tf:
        tf.add(model_root, arcname="LesionLocatorCheckpoint")
        link = tarfile.TarInfo("LesionLocatorCheckpoint/evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)


@pytest.mark.parametrize("build, message", [
    (_zip_with("/tmp/lesionlocator-escaped.txt"), "entry '/tmp/lesionlocator-escaped.txt' has an absolute path"),
    (_zip_with("C:/escaped.txt"), "entry 'C:/escaped.txt' has an absolute path"),
    (_zip_with("LesionLocatorCheckpoint/../../escaped.txt"),
     "entry 'LesionLocatorCheckpoint/../../escaped.txt' would be written outside the target folder"),
    (_zip_with("..\\escaped.txt"), "entry '..\\\\escaped.txt' would be written outside the target folder"),
    (_zip_with("LesionLocatorCheckpoint/link", b"/etc/passwd", symlink=True),
     "entry 'LesionLocatorCheckpoint/link' is a link or special file"),
    (_tar_with_symlink, "entry 'LesionLocatorCheckpoint/evil' is a link or special file"),
], ids=["absolute", "drive", "dotdot-inside", "backslash", "zip-symlink", "tar-symlink"])
def test_unsafe_archives_are_refused_before_anything_is_written(cache, tiny_model_root, tmp_path, build, message):
    path = tmp_path / "model.archive"
    build(tiny_model_root, path)
    with pytest.raises(zoo.UnsafeArchiveError) as e:
        zoo.install_from_archive(path)
    assert str(e.value) == f"refused to unpack model.archive: {message}"
    assert not Path("/tmp/lesionlocator-escaped.txt").exists()
    assert_nothing_installed(cache)
    assert path.exists()  # the user's file is left alone


def test_not_enough_disk_space_is_refused_before_downloading(server, cache, archive, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 1000, 1000))
    with pytest.raises(zoo.DiskFullError) as e:
        zoo.download_model(NAME, base_url=server.url)
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    need = zoo.human_size(2 * len(archive))
    assert str(e.value) == (f"not enough free disk space in {cache}: downloading {KEY} ({zoo.human_size(len(archive))}"
                            f", 0 B already here) and unpacking it needs {need}, 1.0 KB free; free some space or "
                            "set LESIONLOCATOR_HOME to a folder on a bigger disk")
    assert file_requests(server) == []
    assert_nothing_installed(cache)


def test_disk_full_while_writing_removes_the_partial_file(server, cache, monkeypatch):
    class FullDisk(io.FileIO):
        def write(self, b):
            if self.tell() > 100_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)
    monkeypatch.setattr(download, "_open_part", lambda path, mode: FullDisk(path, mode.replace("b", "")))
    with pytest.raises(zoo.DiskFullError, match=r"^the disk is full: writing .*\.part failed \(No space left on "
                                                r"device\); the partial file was removed"):
        zoo.download_model(NAME, base_url=server.url)
    assert list((cache / "downloads").rglob("*.part")) == []
    assert_nothing_installed(cache)
    assert len(file_requests(server)) == 1  # no retry on a full disk


# --------------------------------------------------------------------------- concurrency
def test_concurrent_downloads_share_one_transfer(server, cache, archive, model_files):
    """One thread downloads (held at a gate by the server); another process and another thread
    ask for the same model meanwhile: they wait on the lock and reuse the result."""
    server.gate = threading.Event()
    watchdog = threading.Timer(20, server.gate.set)
    watchdog.start()
    results, errors = {}, []

    def run(key):
        try:
            results[key] = zoo.download_model(NAME, base_url=server.url)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    first = threading.Thread(target=run, args=("thread-1",))
    first.start()
    deadline = time.time() + 10
    while not file_requests(server) and time.time() < deadline:
        time.sleep(0.01)
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from LesionLocatorLib.zoo import download_model; "
            f"print(download_model({NAME!r}, base_url={server.url!r}))")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "LESIONLOCATOR_HOME": str(cache)})
    waiting = other.stderr.readline()  # the other process says it waits for this one
    second = threading.Thread(target=run, args=("thread-2",))
    second.start()
    time.sleep(0.2)
    server.gate.set()
    out, err = other.communicate(timeout=30)
    first.join(30)
    second.join(30)
    watchdog.cancel()
    assert errors == [] and other.returncode == 0, (errors, err)
    root = cache / "models" / NAME / "LesionLocatorCheckpoint"
    assert results == {"thread-1": root, "thread-2": root} and out.strip() == str(root)
    assert waiting.startswith(f"lesionlocator: another download or install of '{NAME}' is in progress (process "
                              f"{os.getpid()} ") and waiting.rstrip().endswith("waiting for it to finish...")
    assert len(server.requests_to(f"/records/{RECORD}")) == 1 and len(file_requests(server)) == 1
    assert_installed_model_equals(root, model_files)


def test_o_excl_lock_fallback_waits_and_breaks_a_dead_owners_lock(tmp_path):
    path = tmp_path / "m.lock"
    order = []
    holder = zoo._Lock(path, backend="excl").__enter__()

    def second():
        with zoo._Lock(path, backend="excl", poll=0.01) as lock:
            order.append(("second", lock.waited))
    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.2)
    order.append("first released")
    holder.__exit__(None, None, None)
    t.join(5)
    assert order == ["first released", ("second", True)]
    assert not path.exists()
    path.write_text(f"999999999 {socket.gethostname()}\n")  # left by a process of this machine that is gone
    with zoo._Lock(path, backend="excl") as lock:
        assert not lock.waited and path.read_text().split()[0] == str(os.getpid())
    path.write_text("999999999 another-host\n")  # another machine's (shared disk): only broken when old
    assert not zoo._Lock(path, backend="excl")._try()
    os.utime(path, (time.time() - 2 * 24 * 3600,) * 2)
    with zoo._Lock(path, backend="excl") as lock:
        assert not lock.waited and path.read_text().split()[0] == str(os.getpid())


# --------------------------------------------------------------------------- offline install, listing, names
def test_from_file_install_listing_and_verify(cache, archive, tmp_path, model_files, capsys):
    path = tmp_path / KEY
    path.write_bytes(archive)
    assert main(["download", "--md5", "1" * 32, "--from-file", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lesionlocator download: error: checksum mismatch for {KEY}: expected md5 {'1' * 32}, got {md5(archive)}; "
        "the archive was not installed (download it again)")
    assert_nothing_installed(cache)
    assert main(["download", "--from-file", str(path), "--md5", md5(archive)]) == 0
    root = cache / "models" / NAME / "LesionLocatorCheckpoint"
    assert capsys.readouterr().out.strip() == f"{NAME}: ready at {root}; use it with -m {NAME}"
    assert path.read_bytes() == archive  # the user's archive is kept
    assert_installed_model_equals(root, model_files)
    manifest = json.loads((root.parent / zoo.MANIFEST_NAME).read_text())
    assert manifest["source"] == f"file:{path.resolve()}" and manifest["md5"] == md5(archive)
    # another name, and a re-install that replaces atomically
    assert zoo.install_from_archive(path, "my-model") == cache / "models" / "my-model" / "LesionLocatorCheckpoint"
    assert zoo.resolve_model("my-model") == cache / "models" / "my-model" / "LesionLocatorCheckpoint"
    assert zoo.install_from_archive(path, "my-model") == cache / "models" / "my-model" / "LesionLocatorCheckpoint"
    assert sorted(p.name for p in (cache / "models").iterdir()) == [NAME, "my-model"]
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    size = zoo.human_size(zoo._du(root.parent))
    assert f"  {NAME:<16} {size:>9}  file:{path.resolve()}, installed " in out
    assert f"  my-model         {size:>9}  " in out
    # --json lists what the text lists: both cached models and the bundled demo model
    assert main(["models", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["cache"] == str(cache)
    assert [(e["name"], e["status"]) for e in listing["models"]] == [(NAME, "ok"), ("my-model", "ok"),
                                                                     ("demo", "bundled")]
    # a file modified in place (same size) is found by --verify; a missing one by any lookup
    ckpt = root / "LesionLocatorSeg" / "point_optimized" / "fold_0" / "checkpoint_final.pth"
    data = bytearray(ckpt.read_bytes())
    data[-10] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    assert main(["models", "--verify"]) == 1
    assert ("DAMAGED: LesionLocatorCheckpoint/LesionLocatorSeg/point_optimized/fold_0/checkpoint_final.pth "
            "was modified (sha256 differs)") in capsys.readouterr().out
    ckpt.unlink()
    with pytest.raises(zoo.ZooError, match=r"the cached model 'lesionlocator' in .* is damaged \(LesionLocator"
                                           r"Checkpoint/LesionLocatorSeg/point_optimized/fold_0/checkpoint_final"
                                           r"\.pth is missing\); run `lesionlocator download lesionlocator "
                                           r"--force` to replace it"):
        zoo.resolve_model(NAME)


def test_archive_without_a_model_is_refused(cache, tmp_path):
    path = tmp_path / "notes.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("README.txt", "hello")
        zf.writestr("LesionLocatorCheckpoint/LesionLocatorSeg/point_optimized/plans.json", "{}")
    with pytest.raises(ModelLayoutError, match=r"^notes.zip does not unpack to a complete LesionLocator model: "
                                               r".*point_optimized is incomplete"):
        zoo.install_from_archive(path)
    (tmp_path / "text.zip").write_text("not an archive")
    with pytest.raises(zoo.ArchiveError, match="text.zip is not a zip or tar archive"):
        zoo.install_from_archive(tmp_path / "text.zip")
    assert_nothing_installed(cache)


def test_a_later_release_by_zenodo_record(server, cache, archive, model_files):
    server.add_record("99999999", {"LesionLocatorModel.zip": archive, "README.md": b"notes"})
    root = zoo.download_model("zenodo:99999999", base_url=server.url)
    assert root == cache / "models" / "zenodo-99999999" / "LesionLocatorCheckpoint"
    assert zoo.resolve_model("zenodo:99999999") == root
    assert_installed_model_equals(root, model_files)


def test_resolve_model_paths_names_and_the_demo_default(cache, tiny_model_root, tmp_path, monkeypatch, capsys):
    assert zoo.resolve_model(str(tiny_model_root)) == tiny_model_root
    assert zoo.resolve_model(tiny_model_root) == tiny_model_root
    with pytest.raises(zoo.ModelNotFoundError) as e:
        zoo.resolve_model(NAME)
    assert str(e.value) == (
        "model 'lesionlocator' is not downloaded yet: run `lesionlocator download lesionlocator` (offline: "
        "download LesionLocatorCheckpoint.zip from https://zenodo.org/records/15174217 and run `lesionlocator "
        "download lesionlocator --from-file LesionLocatorCheckpoint.zip`), or pass -m with a model folder")
    with pytest.raises(zoo.ModelNotFoundError, match="^model folder not found: no/such/folder$"):
        zoo.resolve_model("no/such/folder")
    with pytest.raises(zoo.ModelNotFoundError) as e:
        zoo.resolve_model("foo")
    assert str(e.value) == ("unknown model 'foo': not a folder and not a model name (known: demo, lesionlocator; "
                            "installed: none)")
    monkeypatch.setenv("LESIONLOCATOR_DEMO_MODEL", str(tmp_path / "missing"))
    with pytest.raises(zoo.ModelNotFoundError, match="no model given and the demo model is missing"):
        zoo.resolve_model(None)
    monkeypatch.setenv("LESIONLOCATOR_DEMO_MODEL", str(tiny_model_root))
    monkeypatch.setattr(zoo, "_demo_notice_shown", False)
    capsys.readouterr()
    assert zoo.resolve_model(None) == tiny_model_root and zoo.resolve_model(None) == tiny_model_root
    assert zoo.resolve_model("demo") == tiny_model_root
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lesionlocator: no model given, using the bundled demo model")


def test_default_cache_dir_per_platform(monkeypatch, tmp_path):
    monkeypatch.delenv("LESIONLOCATOR_HOME")
    monkeypatch.setattr(Path, "home", classmethod(lambda cls: tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(zoo.sys, "platform", "linux")
    assert zoo.default_cache_dir() == tmp_path / "xdg" / "lesionlocator"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert zoo.default_cache_dir() == tmp_path / ".cache" / "lesionlocator"
    monkeypatch.setattr(zoo.sys, "platform", "darwin")
    assert zoo.default_cache_dir() == tmp_path / "Library" / "Caches" / "lesionlocator"
    monkeypatch.setattr(zoo.sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "Local"))
    assert zoo.default_cache_dir() == tmp_path / "Local" / "lesionlocator"
    monkeypatch.setenv("LESIONLOCATOR_HOME", str(tmp_path / "home"))
    assert zoo.default_cache_dir() == tmp_path / "home"


# --------------------------------------------------------------------------- end to end
def test_cli_download_then_segment_with_the_model_name(server, cache, tmp_path, tiny_model_root, monkeypatch,
                                                       capsys):
    from LesionLocatorLib.image import read_image, write_image
    from phantoms import ct_phantom

    assert main(["download", "--url", server.url]) == 0  # with the progress bar
    captured = capsys.readouterr()
    root = cache / "models" / NAME / "LesionLocatorCheckpoint"
    assert captured.out.strip() == f"{NAME}: ready at {root} (version 1.0, license cc-by-4.0); use it with -m {NAME}"
    img, _ = ct_phantom(shape_zyx=(30, 64, 64), lesions=[((15, 32, 30), 8.0, 120)])
    write_image(img, tmp_path / "case.nii.gz")
    (tmp_path / "case.json").write_text(json.dumps({"1": {"point": [15, 32, 30]}}))
    args = ["segment", "-i", str(tmp_path / "case.nii.gz"), "-p", str(tmp_path / "case.json"), "-t", "point",
            "--device", "cpu", "--disable_progress_bar"]
    assert main(args + ["-o", str(tmp_path / "out"), "-m", NAME]) == 0
    err = capsys.readouterr().err
    assert f"model: {root / 'LesionLocatorSeg' / 'point_optimized'} (folds [0]" in err
    out = read_image(tmp_path / "out" / "case_lesions.nii.gz")
    assert out.shape == img.shape and set(out.array.ravel().tolist()) <= {0, 1}
    # no -m: the demo model, with its notice
    monkeypatch.setenv("LESIONLOCATOR_DEMO_MODEL", str(tiny_model_root))
    monkeypatch.setattr(zoo, "_demo_notice_shown", False)
    assert main(args + ["-o", str(tmp_path / "out2")]) == 0
    err = capsys.readouterr().err
    assert "using the bundled demo model" in err and f"model: {tiny_model_root / 'LesionLocatorSeg'}" in err
    # a checksum failure through the command line: exit 2 and one clear line
    server.add_record(RECORD, {KEY: b"corrupt"}, md5={KEY: md5(b"other")})
    assert main(["download", "--url", server.url, "--force", "--disable_progress_bar"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lesionlocator download: error: checksum mismatch for {KEY}: expected md5 {md5(b'other')}, got "
        f"{md5(b'corrupt')}; the downloaded file was removed (run the command again to download it afresh)")
    assert zoo.resolve_model(NAME) == root  # the installed model is untouched


@pytest.mark.parametrize("where", ["base_url", "file_link", "redirect"])
def test_only_http_and_https_links_are_followed(server, cache, tmp_path, where):
    """A record (or a redirect) that points at file:// or ftp:// is refused before anything is opened."""
    secret = tmp_path / "secret.zip"
    secret.write_bytes(b"local file")
    if where == "base_url":
        with pytest.raises(zoo.DownloadError, match=r"refused to open 'file:///.*only http:// and https:// links "
                                                    r"are followed \(this one is file://\)"):
            zoo.download_model(NAME, base_url=f"file://{tmp_path}")
    elif where == "file_link":
        record = server.record_json
        server.record_json = lambda r: {**record(r), "files": [
            {**record(r)["files"][0], "links": {"self": secret.as_uri()}}]}
        with pytest.raises(zoo.DownloadError, match=r"refused to open 'file:///.*secret\.zip'"):
            zoo.download_model(NAME, base_url=server.url)
    else:
        import http.server

        class Redirect(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(302)
                self.send_header("Location", "ftp://127.0.0.1/LesionLocatorCheckpoint.zip")
                self.end_headers()

            def log_message(self, *args):
                pass

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        try:
            with pytest.raises(zoo.DownloadError, match=r"refused to open 'ftp://127\.0\.0\.1/.*this one is ftp://"):
                zoo.fetch_record(RECORD, base_url=f"http://127.0.0.1:{httpd.server_address[1]}", retries=0)
        finally:
            httpd.shutdown()
            httpd.server_close()
    assert_nothing_installed(cache)


@pytest.mark.parametrize("mode,suffix", [("w", ".tar"), ("w:gz", ".tar.gz")])
def test_a_plain_tar_of_the_model_installs(cache, tiny_model_root, tmp_path, mode, suffix):
    """A plain .tar ends with a checkpoint, which is itself a zip file (PyTorch's format): the archive is
    still a tar, not taken for a zip (zipfile.is_zipfile finds the .pth's end record)."""
    archive = tmp_path / f"LesionLocatorCheckpoint{suffix}"
    with tarfile.open(archive, mode) as tf:
        tf.add(tiny_model_root, arcname="LesionLocatorCheckpoint")
    if mode == "w":
        assert zipfile.is_zipfile(archive), "the trap this test is about: the tar looks like a zip to zipfile"
    root = zoo.install_from_archive(archive, "plain-tar")
    assert_installed_model_equals(root, {p.relative_to(tiny_model_root).as_posix(): p.read_bytes()
                                         for p in sorted(tiny_model_root.rglob("*")) if p.is_file()})
