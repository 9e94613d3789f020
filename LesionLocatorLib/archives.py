"""Reading and unpacking model archives safely: its job is the archive, not the cache.

:func:`_archive_members` tells a zip from a tar archive and checks every entry
before anything is written (no absolute paths, no ``..``, no links or special
files; ``__MACOSX/`` and ``.DS_Store`` are skipped), :func:`_extract` unpacks the
checked entries into a folder (re-checking that each lands inside it) and returns
each file's size in bytes and sha256, and :func:`_find_model_root` finds the
folder holding ``LesionLocatorSeg``. The errors :class:`ArchiveError` and
:class:`UnsafeArchiveError` are re-exported by :mod:`LesionLocatorLib.zoo`.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import tarfile
import zipfile
from pathlib import Path

from .download import CHUNK, DiskFullError, DownloadCancelled, ZooError, _is_disk_full


# --------------------------------------------------------------------------- errors
class ArchiveError(ZooError):
    """An archive that cannot be unpacked into a model (not an archive, no model inside)."""


class UnsafeArchiveError(ArchiveError):
    """An archive with entries that would be written outside the target folder."""


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


def _starts_like_zip(archive: Path) -> bool:
    """True when the file starts as a zip archive does (a local file header, or an empty archive's end
    record). ``zipfile.is_zipfile`` alone looks for an end record anywhere near the end, so it takes a
    plain .tar whose last member is a zip file (a PyTorch ``.pth``) for a zip archive."""
    with open(archive, "rb") as f:
        return f.read(4) in (b"PK\x03\x04", b"PK\x05\x06")


def _archive_members(archive: Path, label: str) -> tuple:
    """(kind, entries): entries are (relpath, is_dir, size, member); every entry checked first."""
    entries = []
    if _starts_like_zip(archive) and zipfile.is_zipfile(archive):
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
