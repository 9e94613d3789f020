"""The registry CT fetcher's download from a simple package index, against a real local HTTP server."""
import hashlib
import io
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from registry_ct import Sdist, _extract, download_from_simple_index


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def index(tmp_path):
    """A PEP 503 index served from ``tmp_path/www``: /simple/demo-pkg/ links ../../files/demo-pkg-1.0.tar.gz."""
    www = tmp_path / "www"
    (www / "simple" / "demo-pkg").mkdir(parents=True)
    (www / "files").mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("demo-pkg-1.0/data/ct.nrrd", b"NRRD0004 ct"), ("demo-pkg-1.0/setup.py", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = buf.getvalue()
    (www / "files" / "demo-pkg-1.0.tar.gz").write_bytes(archive)
    digest = hashlib.sha256(archive).hexdigest()
    (www / "simple" / "demo-pkg" / "index.html").write_text(
        '<html><body><a href="../../files/demo-pkg-0.9.tar.gz#sha256=00">demo-pkg-0.9.tar.gz</a>\n'
        f'<a href="../../files/demo-pkg-1.0.tar.gz#sha256={digest}">demo-pkg-1.0.tar.gz</a></body></html>')
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple/", Sdist("demo-pkg", "1.0", digest, "MIT")
    server.shutdown()
    server.server_close()


def test_the_linked_sdist_is_saved_whole_and_its_members_extract(index, tmp_path):
    url, sdist = index
    path = tmp_path / "cache" / "sdist" / sdist.filename
    path.parent.mkdir(parents=True)
    download_from_simple_index(sdist, path, timeout=10, index_url=url)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sdist.sha256
    assert [p.name for p in path.parent.iterdir()] == [sdist.filename]       # no temporary file left
    _extract(path, sdist.root, tmp_path / "cache", ["data/ct.nrrd"])
    assert (tmp_path / "cache" / "demo-pkg-1.0" / "data" / "ct.nrrd").read_bytes() == b"NRRD0004 ct"
    assert not (tmp_path / "cache" / "demo-pkg-1.0" / "setup.py").exists()   # only the members asked for


def test_a_version_the_index_does_not_link_is_a_clear_error(index, tmp_path):
    url, sdist = index
    missing = Sdist(sdist.package, "2.0", sdist.sha256, sdist.licence)
    with pytest.raises(OSError, match=r"links no demo-pkg-2\.0\.tar\.gz"):
        download_from_simple_index(missing, tmp_path / missing.filename, timeout=10, index_url=url)
    assert not list(tmp_path.glob("*.tar.gz"))
