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

The HTTP transfer (records API, resume, retries, MD5) lives in
:mod:`LesionLocatorLib.download` and safe unpacking in :mod:`LesionLocatorLib.archives`;
this module keeps the registry, the cache places, the per-model lock, installing
into the cache with its manifest, the installed models and the public API, and
re-exports the errors and helpers of both modules.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .archives import ArchiveError, _archive_members, _extract, _find_model_root
from .archives import UnsafeArchiveError  # noqa: F401  (re-exported: the zoo API)
from .download import (ZENODO_URL, ChecksumError, DownloadCancelled, ZooError, _check_free, _hash_file,
                       download_file, fetch_record, human_size, pick_file, zenodo_url)
from .download import CHUNK, MAX_BACKOFF, RETRY_STATUS  # noqa: F401  (re-exported: the zoo API)
from .download import DiskFullError, DownloadError, RemoteFile  # noqa: F401  (re-exported: the zoo API)

MANIFEST_NAME = "lesionlocator-model.json"
MANIFEST_FORMAT = "lesionlocator-model/1"
DEFAULT_DOWNLOAD = "lesionlocator"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL_DIR = REPO_ROOT / "Resources" / "Models" / "LesionLocatorDemo"


# --------------------------------------------------------------------------- errors
class ModelNotFoundError(FileNotFoundError):
    """A model name that is not installed (or not known), or a model folder that does not exist."""


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


def demo_model_dir() -> Path:
    """The bundled demo model (``$LESIONLOCATOR_DEMO_MODEL`` overrides)."""
    env = os.environ.get("LESIONLOCATOR_DEMO_MODEL")
    return Path(env).expanduser() if env else DEMO_MODEL_DIR


def cache_root(cache_dir=None) -> Path:
    """The model cache folder: ``cache_dir`` if given, else :func:`default_cache_dir`."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _notify(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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


# --------------------------------------------------------------------------- installing into the cache
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

