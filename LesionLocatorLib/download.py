"""Downloading one file over HTTP(S) for the model zoo: its job is the transfer, not the cache.

* the Zenodo records API (:func:`fetch_record`: ``{base}/api/records/{id}`` JSON,
  base ``https://zenodo.org`` unless ``$LESIONLOCATOR_ZENODO_URL`` or ``base_url``
  says otherwise) and picking the model archive from it (:func:`pick_file`),
* :func:`download_file`: a resumable transfer (HTTP ``Range`` on a ``.part``
  file) with bounded retries and exponential backoff (seconds, at most
  :data:`MAX_BACKOFF`), an MD5 check, and disk-full handling (sizes in bytes),
* only http:// and https:// links are opened, redirects included.

It also holds the errors of the zoo that concern transfers (:class:`ZooError`, the
base of every zoo error, :class:`DownloadError`, :class:`ChecksumError`,
:class:`DiskFullError`, :class:`DownloadCancelled`) and :func:`human_size`;
:mod:`LesionLocatorLib.zoo` re-exports them. Only the standard library is used
for HTTP (urllib).
"""
from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .cancel import Cancelled

ZENODO_URL = "https://zenodo.org"
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


class DiskFullError(OSError):
    """Not enough disk space for a download or an unpacked model."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


class DownloadCancelled(Cancelled):
    """The download was cancelled; the partial file is kept and the next call resumes it."""


# --------------------------------------------------------------------------- helpers
def zenodo_url(base_url: str | None = None) -> str:
    return (base_url or os.environ.get("LESIONLOCATOR_ZENODO_URL") or ZENODO_URL).rstrip("/")


def _sleep(seconds: float) -> None:  # patched by tests
    time.sleep(seconds)


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"


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
