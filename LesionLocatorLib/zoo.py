"""Known models: download, verify, cache and resolve them by name.

A *model name* may be given wherever a model folder is accepted (``-m NAME`` on
the command line, the Slicer module's model selector):

* ``demo``: the small demo model shipped with the extension in
  ``Resources/Models/LesionLocatorDemo`` (the default when no model is given;
  a one-line notice says so).
* ``lesionlocator``: the official LesionLocator checkpoint (CVPR 2025), Zenodo
  record 15174217, downloaded once with ``lesionlocator download``.
* ``zenodo:RECORD``: any later release published as a Zenodo record holding one
  zip archive in the official layout (installed as ``zenodo-RECORD``).
* any name given to ``lesionlocator download NAME --from-file ARCHIVE``.

Downloads use the Zenodo records API (``{base}/api/records/{id}`` lists the
files with size and ``md5:`` checksum). The base URL is ``https://zenodo.org``
unless ``$LESIONLOCATOR_ZENODO_URL`` or the ``base_url`` argument says
otherwise. A download

* checks the free disk space against the size in the record first,
* resumes an interrupted transfer with an HTTP ``Range`` request (the partial
  file ``downloads/NAME/<md5>-<file>.part`` survives network errors,
  cancellation and Ctrl-C, and a later call continues it),
* retries network errors and HTTP 429/5xx a bounded number of times with
  exponential backoff, and fails at once on 4xx and on HTML pages,
* verifies the MD5 checksum (a mismatch removes the file),
* unpacks into a temporary folder inside the cache, refusing archives whose
  entries would land outside it (absolute paths, ``..``, links), validates the
  layout with :func:`LesionLocatorLib.model.check_model_root`, writes a
  manifest and moves the folder into place with one ``os.replace``, so a
  half-downloaded or half-unpacked model is never found under its name,
* holds a per-model lock (``locks/NAME.lock``; ``fcntl.flock`` on POSIX,
  ``msvcrt.locking`` on Windows, an ``O_EXCL`` lock file elsewhere) so a second
  download of the same model waits and then reuses the first one's result.

Cache layout (``$LESIONLOCATOR_HOME``, or the platform cache folder:
``~/.cache/lesionlocator`` (``$XDG_CACHE_HOME``) on Linux,
``~/Library/Caches/lesionlocator`` on macOS, ``%LOCALAPPDATA%\\lesionlocator``
on Windows)::

    models/NAME/lesionlocator-model.json   manifest (name, version, licence, source,
                                           md5, sizes, date, sha256 of every file)
    models/NAME/LesionLocatorCheckpoint/   the model root (what -m NAME resolves to)
    downloads/NAME/*.part                  partial downloads (resumable)
    locks/NAME.lock

Only the standard library is used for HTTP (urllib).
"""
from __future__ import annotations

import datetime
import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .cancel import Cancelled

ZENODO_URL = "https://zenodo.org"
MANIFEST_NAME = "lesionlocator-model.json"
MANIFEST_FORMAT = "lesionlocator-model/1"
DEFAULT_DOWNLOAD = "lesionlocator"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL_DIR = REPO_ROOT / "Resources" / "Models" / "LesionLocatorDemo"
CHUNK = 256 * 1024
RETRY_STATUS = (408, 425, 429, 500, 502, 503, 504)
MAX_BACKOFF = 60.0


# --------------------------------------------------------------------------- errors
class ZooError(RuntimeError):
    """A model could not be downloaded or installed (the message says why and what to do)."""


class DownloadError(ZooError):
    """The server could not be reached, refused, or answered something other than the file."""


class ChecksumError(DownloadError):
    """The downloaded file does not match the checksum published with it."""


class ArchiveError(ZooError):
    """An archive that cannot be unpacked into a model (not an archive, no model inside)."""


class UnsafeArchiveError(ArchiveError):
    """An archive with entries that would be written outside the target folder."""


class ModelNotFoundError(FileNotFoundError):
    """A model name that is not installed (or not known), or a model folder that does not exist."""


class DiskFullError(OSError):
    """Not enough disk space for a download or an unpacked model."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


class DownloadCancelled(Cancelled):
    """The download was cancelled; the partial file is kept and the next call resumes it."""


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ModelInfo:
    """A known model: where it comes from and under which terms."""

    name: str
    title: str
    source: str                  # "bundled" or "zenodo"
    record: str | None = None    # Zenodo record id
    archive: str | None = None   # preferred file in the record (else its only zip)
    version: str | None = None   # None: read from the record at download time
    license: str | None = None   # None: read from the record at download time
    homepage: str | None = None
    aliases: tuple = field(default_factory=tuple)


REGISTRY: dict = {}


def register_model(info: ModelInfo) -> None:
    """Add (or replace) a known model, e.g. a later release."""
    REGISTRY[info.name] = info


register_model(ModelInfo(
    name="demo", title="LesionLocator demo model (small, for trying the extension)", source="bundled",
    version=None, license=None, aliases=("LesionLocatorDemo",)))
register_model(ModelInfo(
    name="lesionlocator", title="LesionLocator official checkpoint (Rokuss et al., CVPR 2025)", source="zenodo",
    record="15174217", archive="LesionLocatorCheckpoint.zip", version=None, license=None,
    homepage="https://zenodo.org/records/15174217", aliases=("official",)))

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ZENODO_RE = re.compile(r"^zenodo[:\-](\d+)$", re.IGNORECASE)


def get_model_info(name: str) -> ModelInfo | None:
    """The registry entry for a name or alias (case-insensitive); ``zenodo:RECORD`` for any record."""
    m = _ZENODO_RE.match(name)
    if m:
        rec = m.group(1)
        for info in REGISTRY.values():
            if info.record == rec:
                return info
        return ModelInfo(name=f"zenodo-{rec}", title=f"Zenodo record {rec}", source="zenodo", record=rec,
                         homepage=f"{ZENODO_URL}/records/{rec}")
    low = name.lower()
    for info in REGISTRY.values():
        if low == info.name.lower() or low in (a.lower() for a in info.aliases):
            return info
    return None


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise ValueError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' "
                         "(at most 64 characters, starting with a letter or digit)")
    return name


# --------------------------------------------------------------------------- places
def default_cache_dir() -> Path:
    """``$LESIONLOCATOR_HOME``, else the platform's per-user cache folder + ``lesionlocator``."""
    env = os.environ.get("LESIONLOCATOR_HOME")
    if env:
        return Path(env).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        return (Path(base) if base else home / "AppData" / "Local") / "lesionlocator"
    if sys.platform == "darwin":
        return home / "Library" / "Caches" / "lesionlocator"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else home / ".cache"
    return base / "lesionlocator"


def zenodo_url(base_url: str | None = None) -> str:
    return (base_url or os.environ.get("LESIONLOCATOR_ZENODO_URL") or ZENODO_URL).rstrip("/")


def demo_model_dir() -> Path:
    """The bundled demo model (``$LESIONLOCATOR_DEMO_MODEL`` overrides)."""
    env = os.environ.get("LESIONLOCATOR_DEMO_MODEL")
    return Path(env).expanduser() if env else DEMO_MODEL_DIR


def cache_root(cache_dir=None) -> Path:
    """The model cache folder: ``cache_dir`` if given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _notify(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sleep(seconds: float) -> None:  # patched by tests
    time.sleep(seconds)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"


# --------------------------------------------------------------------------- lock
try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None
try:
    import msvcrt
except ImportError:
    msvcrt = None


class _Lock:
    """An inter-process lock on ``path`` (also between threads: each holder opens its own file).

    ``backend``: "flock" (POSIX), "msvcrt" (Windows) or "excl" (a lock file created
    with O_EXCL holding the owner's pid; broken when that process is gone).
    """

    def __init__(self, path: Path, cancel=None, on_wait=None, poll: float = 0.1, backend: str | None = None,
                 stale_after: float = 24 * 3600):
        self.path = Path(path)
        self.cancel = cancel
        self.on_wait = on_wait
        self.poll = poll
        self.backend = backend or ("flock" if fcntl else "msvcrt" if msvcrt else "excl")
        self.stale_after = stale_after
        self._fd = None

    def _holder(self) -> str:
        try:
            return self.path.read_text().strip() or "?"
        except OSError:
            return "?"

    def _try(self) -> bool:
        if self.backend == "excl":
            for _ in range(2):
                try:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                    return True
                except FileExistsError:
                    if not self._break_if_stale():
                        return False
            return False
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if self.backend == "flock":
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def _break_if_stale(self) -> bool:
        """Remove the lock file of an owner that is gone (or a very old one); True if removed."""
        try:
            text = self.path.read_text().split()
            pid = int(text[0]) if text else None
        except (OSError, ValueError):
            pid = None
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return True  # released meanwhile
        same_host = pid is not None and len(text) > 1 and text[1] == socket.gethostname()
        dead = same_host and not _pid_alive(pid)
        if dead or age > self.stale_after or (pid is None and age > 60):
            try:
                os.unlink(self.path)
            except OSError:
                pass
            return True
        return False

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        waited = False
        while not self._try():
            if not waited and self.on_wait:
                self.on_wait(self._holder())
            waited = True
            if self.cancel is not None and self.cancel.is_set():
                raise DownloadCancelled("cancelled while waiting for another download of the same model")
            time.sleep(self.poll)
        self.waited = waited
        if self.backend != "msvcrt":  # msvcrt locks byte 0: keep the file as is
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            os.write(self._fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        return self

    def __exit__(self, *exc):
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self.backend == "excl":
            os.close(fd)
            try:
                os.unlink(self.path)
            except OSError:
                pass
            return
        try:
            if self.backend == "flock":
                fcntl.flock(fd, fcntl.LOCK_UN)
            else:
                os.lseek(fd, 0, os.SEEK_SET)
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    if sys.platform == "win32":  # os.kill would terminate it there; rely on the lock's age instead
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _model_lock(cache: Path, name: str, cancel=None) -> _Lock:
    def waiting(holder: str) -> None:
        _notify(f"lesionlocator: another download or install of '{name}' is in progress (process {holder}); "
                "waiting for it to finish...")
    return _Lock(cache / "locks" / f"{name}.lock", cancel=cancel, on_wait=waiting)


# --------------------------------------------------------------------------- HTTP
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout)


def _user_agent() -> str:
    from . import __version__
    return f"LesionLocatorLib/{__version__} (+https://github.com/MIC-DKFZ/LesionLocator)"


def _check_web_url(url: str) -> None:
    """Only http(s) links are followed: a record (or a redirect) naming file://, ftp:// or anything
    else is refused, so a download can never read a local file or another protocol."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"refused to open {url!r}: only http:// and https:// links are followed "
                            f"(this one is {scheme + '://' if scheme else 'not a web address'})")


class _WebOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        _check_web_url(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _urlopen(url: str, headers: dict, timeout: float):
    _check_web_url(url)
    req = urllib.request.Request(url, headers={"User-Agent": _user_agent(), **headers})
    return urllib.request.build_opener(_WebOnlyRedirects).open(req, timeout=timeout)


def _is_html(content_type: str | None, head: bytes = b"") -> bool:
    ctype = (content_type or "").split(";")[0].strip().lower()
    return ctype in ("text/html", "application/xhtml+xml") or head.lstrip()[:15].lower().startswith(
        (b"<!doctype html", b"<html"))


def _reason(e: BaseException) -> str:
    """A short text for a network error (the socket error inside a URLError)."""
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason
        if not isinstance(e, BaseException):
            return str(e)
    return str(e).strip() or type(e).__name__


def _backoff_delay(backoff: float, attempt: int, retry_after: str | None = None) -> float:
    delay = backoff * (2 ** attempt)
    if retry_after:
        try:
            delay = max(delay, float(retry_after))
        except ValueError:
            pass
    return min(delay, MAX_BACKOFF)


def fetch_record(record: str, base_url: str | None = None, *, retries: int = 4, backoff: float = 2.0,
                 timeout: float = 60.0) -> dict:
    """The Zenodo records API JSON of a record (``{base}/api/records/{record}``)."""
    url = f"{zenodo_url(base_url)}/api/records/{record}"
    for attempt in range(retries + 1):
        try:
            with _urlopen(url, {"Accept": "application/json"}, timeout) as resp:
                body = resp.read(16 * 1024 * 1024)
                ctype = resp.headers.get("Content-Type")
        except urllib.error.HTTPError as e:
            if e.code in RETRY_STATUS and attempt < retries:
                _sleep(_backoff_delay(backoff, attempt, e.headers.get("Retry-After") if e.headers else None))
                continue
            if e.code == 404:
                raise DownloadError(f"Zenodo record {record} not found at {url} (HTTP 404)") from None
            tries = f" after {attempt + 1} attempts" if e.code in RETRY_STATUS else ""
            raise DownloadError(f"{url}: the server answered HTTP {e.code} {e.reason}{tries}; "
                                "try again later") from None
        except _NETWORK_ERRORS as e:
            if attempt < retries:
                _sleep(_backoff_delay(backoff, attempt))
                continue
            raise DownloadError(f"could not reach {url} after {attempt + 1} attempts: {_reason(e)} "
                                "(check the network connection, or download the archive elsewhere and "
                                "use `lesionlocator download --from-file ARCHIVE`)") from None
        if _is_html(ctype, body[:64]):
            raise DownloadError(f"{url} returned an HTML page, not the Zenodo records API JSON "
                                "(is the server address right? it is set by LESIONLOCATOR_ZENODO_URL)")
        try:
            data = json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DownloadError(f"{url} returned invalid JSON ({e})") from None
        if not isinstance(data, dict):
            raise DownloadError(f"{url} returned JSON that is not a Zenodo record")
        return data
    raise AssertionError("unreachable")


@dataclass
class RemoteFile:
    key: str
    url: str
    size: int
    md5: str | None


def _record_files(data: dict) -> list:
    files = data.get("files") or []
    if isinstance(files, dict):  # InvenioRDM style {"entries": [...]}
        files = files.get("entries") or []
        if isinstance(files, dict):
            files = list(files.values())
    return [f for f in files if isinstance(f, dict) and f.get("key")]


def pick_file(data: dict, api_url: str, preferred: str | None = None) -> RemoteFile:
    """The archive to download from a record: ``preferred`` if listed, else its only zip file."""
    files = _record_files(data)
    if not files:
        raise DownloadError(f"{api_url}: the record lists no files")
    chosen = [f for f in files if preferred and f["key"] == preferred]
    if not chosen:
        chosen = [f for f in files if f["key"].lower().endswith((".zip", ".tar.gz", ".tgz", ".tar"))]
    if len(chosen) != 1:
        raise DownloadError(f"{api_url}: cannot tell which file is the model: "
                            + ", ".join(f["key"] for f in files))
    f = chosen[0]
    links = f.get("links") or {}
    link = links.get("self") or links.get("content") or links.get("download")
    if not link:
        link = f"{api_url}/files/{urllib.parse.quote(f['key'])}/content"
    checksum = str(f.get("checksum") or "")
    md5 = checksum.split(":", 1)[1].lower() if checksum.lower().startswith("md5:") else None
    try:
        size = int(f.get("size") or f.get("filesize"))
    except (TypeError, ValueError):
        raise DownloadError(f"{api_url}: the record gives no size for {f['key']}") from None
    return RemoteFile(key=f["key"], url=urllib.parse.urljoin(api_url, link), size=size, md5=md5)


def _check_free(folder: Path, need: int, what: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DiskFullError(f"not enough free disk space in {folder}: {what} needs {human_size(need)}, "
                            f"{human_size(free)} free; free some space or set LESIONLOCATOR_HOME to a "
                            "folder on a bigger disk")


def _open_part(path: Path, mode: str):  # a seam for tests (disk full while writing)
    return open(path, mode)


def _is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1))


def _hash_file(path: Path, algo: str = "md5", cancel=None):
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while True:
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled("cancelled")
            b = f.read(4 * CHUNK)
            if not b:
                return h
            h.update(b)


def download_file(remote: RemoteFile, part: Path, progress=None, cancel=None, *, retries: int = 4,
                  backoff: float = 2.0, timeout: float = 60.0) -> Path:
    """Download ``remote`` into ``part`` (resuming what is there) and verify its MD5.

    Network errors and HTTP 429/5xx are retried ``retries`` times in a row without
    progress, waiting ``backoff * 2**n`` seconds (at most 60 s); an attempt that
    brought new bytes resets that count. The partial file is kept on network errors,
    cancellation and Ctrl-C (the next call resumes it with an HTTP Range request); it
    is removed on a checksum mismatch, an oversized answer and a full disk.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > remote.size:
        part.unlink()
        have = 0
    hasher = _hash_file(part, cancel=cancel) if have else hashlib.md5()
    failures = 0
    if progress:
        progress(have, remote.size)

    def check_cancel():
        if cancel is not None and cancel.is_set():
            raise DownloadCancelled(f"download of {remote.key} cancelled at {human_size(have)} of "
                                    f"{human_size(remote.size)}; the partial file is kept for resuming")

    def give_up(msg: str) -> DownloadError:
        kept = (f"; {human_size(have)} of {human_size(remote.size)} are kept in {part}, run the command again "
                "to resume") if have else ""
        return DownloadError(msg + kept)

    def restart():
        nonlocal have, hasher
        part.unlink(missing_ok=True)
        have, hasher = 0, hashlib.md5()

    def stream(resp) -> int:
        """Append the response body to the part file; returns the bytes received."""
        nonlocal have
        got = 0
        try:
            with _open_part(part, "ab" if have else "wb") as f:
                while True:
                    check_cancel()
                    chunk = resp.read1(CHUNK)
                    if not chunk:
                        break
                    if have + len(chunk) > remote.size:
                        f.close()
                        restart()
                        raise DownloadError(f"{remote.url} sent more than the {remote.size} bytes the record "
                                            "lists; the file was removed")
                    f.write(chunk)
                    hasher.update(chunk)
                    have += len(chunk)
                    got += len(chunk)
                    if progress:
                        progress(have, remote.size)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            if isinstance(e, _NETWORK_ERRORS) or not _is_disk_full(e):
                raise
            restart()
            raise DiskFullError(f"the disk is full: writing {part} failed ({e.strerror}); the partial file "
                                "was removed; free some space or set LESIONLOCATOR_HOME to a folder on a "
                                "bigger disk") from None
        return got

    while have < remote.size:
        check_cancel()
        before, last_error, retry_after = have, "", None
        try:
            resp = _urlopen(remote.url, {"Range": f"bytes={have}-"} if have else {}, timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the server will not resume this file: start again
                restart()
                last_error = "HTTP 416 Range Not Satisfiable"
            elif e.code in RETRY_STATUS:
                last_error = f"HTTP {e.code} {e.reason}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
            else:
                raise give_up(f"download of {remote.key} failed: HTTP {e.code} {e.reason} from "
                              f"{remote.url}") from None
        except _NETWORK_ERRORS as e:
            last_error = _reason(e)
        else:
            with resp:
                if _is_html(resp.headers.get("Content-Type")):
                    raise give_up(f"{remote.url} returned an HTML page instead of {remote.key} "
                                  "(the server may be down for maintenance; try again later)")
                ok = True
                if resp.status == 206:
                    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range") or "")
                    if not m or int(m.group(1)) != have:
                        last_error = (f"the server resumed at the wrong place (Content-Range "
                                      f"{resp.headers.get('Content-Range')!r} for bytes={have}-)")
                        restart()
                        ok = False
                elif have:  # 200: the server sends the whole file again
                    restart()
                if ok:
                    try:
                        stream(resp)
                    except (*_NETWORK_ERRORS, http.client.HTTPException) as e:
                        last_error = _reason(e)
                    if have < remote.size and not last_error:
                        last_error = (f"the connection closed after {human_size(have)} of "
                                      f"{human_size(remote.size)}")
        if have >= remote.size:
            break
        failures = 0 if have > before else failures + 1
        if failures > retries:
            raise give_up(f"download of {remote.key} failed after {retries + 1} attempts without progress: "
                          f"{last_error}")
        _sleep(_backoff_delay(backoff, max(failures - 1, 0), retry_after))
    digest = hasher.hexdigest()
    if remote.md5 and digest != remote.md5:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"checksum mismatch for {remote.key}: expected md5 {remote.md5}, got {digest}; "
                            "the downloaded file was removed (run the command again to download it afresh)")
    return part


# --------------------------------------------------------------------------- archives
_SKIP = ("__MACOSX/",)


def _safe_relpath(name: str, label: str) -> str | None:
    """The member's relative path, or None for entries to skip; raises for unsafe names."""
    n = name.replace("\\", "/")
    if n.startswith(_SKIP) or n.rstrip("/").split("/")[-1] == ".DS_Store":
        return None
    if n.startswith("/") or re.match(r"^[A-Za-z]:", n) or "\x00" in n:
        raise UnsafeArchiveError(f"refused to unpack {label}: entry {name!r} has an absolute path")
    parts = [p for p in n.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"refused to unpack {label}: entry {name!r} would be written outside "
                                 "the target folder")
    return "/".join(parts) or None


def _archive_members(archive: Path, label: str) -> tuple:
    """(kind, entries): entries are (relpath, is_dir, size, member); every entry checked first."""
    entries = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                mode = (info.external_attr >> 16) & 0o170000
                rel = _safe_relpath(info.filename, label)
                if rel is None:
                    continue
                if mode and mode not in (stat.S_IFREG, stat.S_IFDIR):
                    raise UnsafeArchiveError(f"refused to unpack {label}: entry {info.filename!r} is a "
                                             "link or special file")
                entries.append((rel, info.is_dir(), info.file_size, info))
        return "zip", entries
    try:
        is_tar = tarfile.is_tarfile(archive)
    except OSError:
        is_tar = False
    if is_tar:
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                rel = _safe_relpath(m.name, label)
                if rel is None:
                    continue
                if not (m.isfile() or m.isdir()):
                    raise UnsafeArchiveError(f"refused to unpack {label}: entry {m.name!r} is a link or "
                                             "special file")
                entries.append((rel, m.isdir(), m.size, m))
        return "tar", entries
    raise ArchiveError(f"{label} is not a zip or tar archive")


def _extract(archive: Path, kind: str, entries: list, dest: Path, label: str, cancel=None, progress=None) -> dict:
    """Unpack the checked entries into ``dest``; returns {relpath: {size, sha256}}."""
    total = sum(e[2] for e in entries if not e[1])
    done = 0
    files = {}
    dest_real = os.path.realpath(dest)
    opener = zipfile.ZipFile if kind == "zip" else tarfile.open
    with opener(archive) as ar:
        for rel, is_dir, size, member in entries:
            if cancel is not None and cancel.is_set():
                raise DownloadCancelled("cancelled while unpacking")
            target = dest / rel
            real = os.path.realpath(target)
            if os.path.commonpath([dest_real, real]) != dest_real:  # belt and braces
                raise UnsafeArchiveError(f"refused to unpack {label}: entry {rel!r} would be written "
                                         "outside the target folder")
            if is_dir:
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            src = ar.open(member) if kind == "zip" else ar.extractfile(member)
            try:
                with src, open(target, "wb") as out:
                    while True:
                        b = src.read(4 * CHUNK)
                        if not b:
                            break
                        out.write(b)
                        h.update(b)
                        done += len(b)
                        if progress:
                            progress(done, total)
            except OSError as e:
                if _is_disk_full(e):
                    raise DiskFullError(f"the disk is full while unpacking {label} into {dest.parent} "
                                        f"({e.strerror}); nothing was installed") from None
                raise
            except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
                raise ArchiveError(f"{label} is corrupt: {rel}: {e}") from None
            files[rel] = {"size": target.stat().st_size, "sha256": h.hexdigest()}
    return files


def _find_model_root(folder: Path) -> Path | None:
    """The folder holding ``LesionLocatorSeg`` (the unpacked top folder or one/two levels down)."""
    def candidates(d: Path, depth: int):
        yield d
        if depth:
            for sub in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(("__MACOSX", "."))):
                yield from candidates(sub, depth - 1)
    found = [d for d in candidates(folder, 2) if (d / "LesionLocatorSeg").is_dir()]
    return found[0] if len(found) == 1 else None


def _clean_leftovers(models: Path, name: str) -> None:
    """Staging folders of this model left by a crashed process (we hold the model's lock)."""
    for d in models.glob(f".tmp-{name}-*"):
        shutil.rmtree(d, ignore_errors=True)
    for d in models.glob(f".old-{name}-*"):
        shutil.rmtree(d, ignore_errors=True)


def _install_locked(archive: Path, name: str, cache: Path, meta: dict, cancel=None, unpack_progress=None,
                    label: str | None = None) -> Path:
    from .modelfolder import EXPECTED_LAYOUT, ModelLayoutError, check_model_root

    label = label or archive.name

    models = cache / "models"
    models.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(models, name)
    kind, entries = _archive_members(archive, label)
    need = sum(e[2] for e in entries if not e[1])
    _check_free(models, need, f"unpacking {label} ({human_size(need)})")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=models))
    try:
        files = _extract(archive, kind, entries, tmp, label, cancel, unpack_progress)
        root = _find_model_root(tmp)
        if root is None:
            top = sorted(p.name for p in tmp.iterdir())[:10]
            raise ModelLayoutError(f"{label} holds no LesionLocator model (top-level entries: "
                                   f"{', '.join(top) or 'none'})\n{EXPECTED_LAYOUT}")
        try:
            check_model_root(root)
        except ModelLayoutError as e:
            raise ModelLayoutError(f"{label} does not unpack to a complete LesionLocator model: {e}") \
                from None
        manifest = {
            "format": MANIFEST_FORMAT, "name": name, **meta,
            "root": root.relative_to(tmp).as_posix() or ".",
            "installed_bytes": sum(f["size"] for f in files.values()),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": files,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
        target = models / name
        if target.exists():
            old = models / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target / manifest["root"]


# --------------------------------------------------------------------------- installed models
def read_manifest(model_dir: Path) -> dict | None:
    """The install manifest of a cached model folder, or None when it is missing or unreadable."""
    try:
        data = json.loads((model_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _quick_problems(model_dir: Path, manifest: dict) -> list:
    """Missing or resized files (cheap: stat only)."""
    problems = []
    for rel, f in (manifest.get("files") or {}).items():
        p = model_dir / rel
        try:
            size = p.stat().st_size
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        if size != f.get("size"):
            problems.append(f"{rel} has {size} bytes, expected {f.get('size')}")
    return problems


def verify_model(name: str, cache_dir=None) -> list:
    """Re-hash every file of an installed model against its manifest; returns the problems (empty = ok)."""
    d = cache_root(cache_dir) / "models" / name
    manifest = read_manifest(d)
    if manifest is None:
        return [f"{d} has no readable {MANIFEST_NAME}"]
    problems = _quick_problems(d, manifest)
    for rel, f in (manifest.get("files") or {}).items():
        p = d / rel
        if p.is_file() and p.stat().st_size == f.get("size") and \
                _hash_file(p, "sha256").hexdigest() != f.get("sha256"):
            problems.append(f"{rel} was modified (sha256 differs)")
    return problems


def installed_model(name: str, cache_dir=None) -> Path | None:
    """The model root of an installed, intact model, or None when it is not installed.

    Raises :class:`ZooError` when it is installed but damaged (files missing or resized).
    """
    d = cache_root(cache_dir) / "models" / name
    manifest = read_manifest(d)
    if manifest is None:
        return None
    problems = _quick_problems(d, manifest)
    if problems:
        raise ZooError(f"the cached model '{name}' in {d} is damaged ({'; '.join(problems[:3])}); "
                       f"run `lesionlocator download {name} --force` to replace it")
    return d / manifest.get("root", ".")


def list_cached_models(cache_dir=None) -> list:
    """What the cache holds: installed models (status 'ok' or 'damaged') and partial downloads
    (status 'partial'). Each entry is a dict with at least name, status, path and size (bytes)."""
    cache = cache_root(cache_dir)
    out = []
    models = cache / "models"
    if models.is_dir():
        for d in sorted(p for p in models.iterdir() if p.is_dir() and not p.name.startswith(".")):
            manifest = read_manifest(d)
            if manifest is None:
                out.append({"name": d.name, "status": "damaged", "path": str(d), "size": _du(d),
                            "problem": f"no {MANIFEST_NAME}"})
                continue
            problems = _quick_problems(d, manifest)
            entry = {k: manifest.get(k) for k in ("version", "license", "title", "source", "record", "file",
                                                  "md5", "date")}
            entry.update(name=d.name, status="damaged" if problems else "ok",
                         path=str(d / manifest.get("root", ".")), size=_du(d),
                         archive_size=manifest.get("archive_size"))
            if problems:
                entry["problem"] = "; ".join(problems[:3])
            out.append(entry)
    downloads = cache / "downloads"
    if downloads.is_dir():
        for part in sorted(downloads.glob("*/*.part")):
            info = {}
            try:
                info = json.loads(part.with_suffix(".json").read_text())
            except (OSError, ValueError):
                pass
            out.append({"name": part.parent.name, "status": "partial", "path": str(part),
                        "size": part.stat().st_size, "total": info.get("size"), "file": info.get("key")})
    return out


def _du(folder: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(folder):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except OSError:
                pass
    return total


# --------------------------------------------------------------------------- public API
def download_model(name: str = DEFAULT_DOWNLOAD, base_url: str | None = None, cache_dir=None, progress=None,
                   cancel=None, *, force: bool = False, retries: int = 4, backoff: float = 2.0,
                   timeout: float = 60.0, unpack_progress=None) -> Path:
    """Download a known model into the cache (once) and return its model root.

    ``progress(done_bytes, total_bytes)`` is called per chunk; ``cancel`` is any
    object with ``is_set()`` (e.g. ``threading.Event``), checked per chunk:
    setting it raises :class:`DownloadCancelled` and keeps the partial file, which
    the next call resumes. A second call for the same model while one runs (in
    this or another process) waits for it and returns the installed model.
    """
    info = get_model_info(name)
    if info is None:
        known = ", ".join(sorted(i.name for i in REGISTRY.values() if i.source == "zenodo"))
        raise ModelNotFoundError(f"unknown model '{name}': known downloads are {known} (or zenodo:RECORD); "
                                 "for an archive downloaded elsewhere use "
                                 f"`lesionlocator download {name} --from-file ARCHIVE`")
    if info.source == "bundled":
        return _demo_root(notice=False)
    name = _check_name(info.name)
    cache = cache_root(cache_dir)

    root = None if force else installed_model_or_none(name, cache)
    if root is not None:
        return root
    with _model_lock(cache, name, cancel) as lock:
        # whoever held the lock may just have installed it (with --force too: it is fresh)
        root = installed_model_or_none(name, cache) if (not force or lock.waited) else None
        if root is not None:
            return root
        api_url = f"{zenodo_url(base_url)}/api/records/{info.record}"
        data = fetch_record(info.record, base_url, retries=retries, backoff=backoff, timeout=timeout)
        remote = pick_file(data, api_url, info.archive)
        folder = cache / "downloads" / name
        stem = f"{remote.md5 or 'nomd5'}-{remote.key}"
        part = folder / f"{stem}.part"
        if folder.is_dir():  # partial files of other versions are of no use now
            for other in folder.iterdir():
                if other.name not in (part.name, f"{stem}.json"):
                    other.unlink(missing_ok=True)
        have = part.stat().st_size if part.exists() else 0
        _check_free(cache, (remote.size - have) + remote.size,
                    f"downloading {remote.key} ({human_size(remote.size)}, {human_size(have)} already here) "
                    "and unpacking it")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.json").write_text(json.dumps({"key": remote.key, "url": remote.url,
                                                         "size": remote.size, "md5": remote.md5}))
        download_file(remote, part, progress, cancel, retries=retries, backoff=backoff, timeout=timeout)
        md = data.get("metadata") or {}
        lic = md.get("license") or md.get("rights")
        if isinstance(lic, list):
            lic = lic[0] if lic else None
        if isinstance(lic, dict):
            lic = lic.get("id") or lic.get("title")
            lic = lic.get("en") if isinstance(lic, dict) else lic
        meta = {
            "title": md.get("title") or info.title,
            "version": md.get("version") or info.version or md.get("publication_date"),
            "license": lic or info.license,
            "source": data.get("links", {}).get("html") or info.homepage or api_url,
            "record": info.record, "doi": data.get("doi") or md.get("doi"),
            "file": remote.key, "md5": remote.md5 or _hash_file(part).hexdigest(), "archive_size": remote.size,
        }
        from .modelfolder import ModelLayoutError
        try:
            root = _install_locked(part, name, cache, meta, cancel, unpack_progress, label=remote.key)
        except (ArchiveError, ModelLayoutError):
            shutil.rmtree(folder, ignore_errors=True)  # verified but unusable: downloading again will not help
            raise
        shutil.rmtree(folder, ignore_errors=True)
        return root


def installed_model_or_none(name: str, cache_dir=None) -> Path | None:
    """Like :func:`installed_model`, but None also for a damaged install (to be replaced)."""
    try:
        return installed_model(name, cache_dir)
    except ZooError:
        return None


def install_from_archive(archive, name: str | None = None, cache_dir=None, *, md5: str | None = None,
                         cancel=None, unpack_progress=None) -> Path:
    """Install an archive downloaded elsewhere (offline use) under ``name`` (default: the
    official model's name) and return its model root. ``md5``: the expected checksum (the
    archive is left untouched when it does not match). An installed model of that name
    is replaced atomically."""
    archive = Path(archive).expanduser()
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {archive}")
    info = get_model_info(name or DEFAULT_DOWNLOAD)
    if info is not None and info.source == "bundled":
        raise ValueError("'demo' is the bundled demo model; install the archive under another name")
    name = _check_name(info.name if info is not None else name)
    cache = cache_root(cache_dir)
    digest = _hash_file(archive, cancel=cancel).hexdigest()
    if md5 and digest != md5.lower().removeprefix("md5:"):
        raise ChecksumError(f"checksum mismatch for {archive.name}: expected md5 {md5.lower()}, got {digest}; "
                            "the archive was not installed (download it again)")
    meta = {"title": info.title if info else name, "version": info.version if info else None,
            "license": info.license if info else None, "source": f"file:{archive.resolve()}",
            "record": info.record if info else None, "file": archive.name, "md5": digest,
            "archive_size": archive.stat().st_size}
    with _model_lock(cache, name, cancel):
        return _install_locked(archive, name, cache, meta, cancel, unpack_progress)


_demo_notice_shown = False


def _demo_root(notice: bool) -> Path:
    global _demo_notice_shown
    d = demo_model_dir()
    if not d.is_dir():
        raise ModelNotFoundError(f"no model given and the demo model is missing ({d}); pass -m with a model "
                                 "folder or name (run `lesionlocator download` for the official LesionLocator "
                                 "checkpoint, then use -m lesionlocator)")
    if notice and not _demo_notice_shown:
        _demo_notice_shown = True
        _notify("lesionlocator: no model given, using the bundled demo model (a small demo, not the published "
                "LesionLocator weights; run `lesionlocator download` and pass -m lesionlocator for those)")
    return d


def resolve_model(name_or_path=None, cache_dir=None) -> Path:
    """A model folder for ``-m``: an existing folder as is, a model name from the cache,
    or (None) the bundled demo model, with a one-line notice on stderr the first time.

    Layout problems of an explicit folder are reported by the loader (it names the
    prompt type that is missing). Raises :class:`ModelNotFoundError` (a
    FileNotFoundError) for a folder that does not exist, a name that is not
    downloaded yet (saying which command downloads it) and an unknown name.
    """
    if name_or_path is None or str(name_or_path).strip() == "":
        return _demo_root(notice=True)
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            from .modelfolder import ModelLayoutError
            hint = (f"; to install this archive run `lesionlocator download --from-file {text}`"
                    if text.lower().endswith((".zip", ".tar.gz", ".tgz", ".tar")) else "")
            raise ModelLayoutError(f"{text} is a file, not a model folder{hint}")
        return path
    info = get_model_info(text)
    if info is not None and info.source == "bundled":
        return _demo_root(notice=False)
    key = info.name if info is not None else text
    cache = cache_root(cache_dir)
    if _NAME_RE.match(key):
        root = installed_model(key, cache)
        if root is not None:
            return root
    if info is not None:
        offline = (f" (offline: download {info.archive} from {info.homepage} and run "
                   f"`lesionlocator download {info.name} --from-file {info.archive}`)") if info.archive else ""
        raise ModelNotFoundError(f"model '{info.name}' is not downloaded yet: run `lesionlocator download "
                                 f"{info.name}`{offline}, or pass -m with a model folder")
    if any(c in text for c in "/\\") or text.startswith((".", "~")):
        raise ModelNotFoundError(f"model folder not found: {text}")
    installed = [m["name"] for m in list_cached_models(cache) if m["status"] != "partial"]
    known = sorted(i.name for i in REGISTRY.values())
    raise ModelNotFoundError(f"unknown model '{text}': not a folder and not a model name (known: "
                             f"{', '.join(known)}; installed: {', '.join(installed) or 'none'})")


# --------------------------------------------------------------------------- command line


