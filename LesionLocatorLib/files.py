"""Atomic file output: write to a temporary file beside the target, check it, then rename.

A crash, a full disk, a failed check, Ctrl-C or SIGTERM (after :func:`install_termination_handler`)
never leaves a half-written file under the target name nor a ``.tmp_*`` file beside it; an existing
file stays as it was until the new one is complete and verified.

Failures while writing raise :class:`WriteError` (an ``OSError``) with a one-line message that names
the target; a full disk says "disk full".
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import os
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

__all__ = ["WriteError", "atomic_output", "atomic_write_text", "install_termination_handler", "write_failed"]

# Below this much free space, a write that failed (or wrote a file that fails its check) is
# reported as "disk full": writers fail when the next buffer (KiB to a few MiB) does not fit, and
# some (ITK's NIfTI writer) ignore the error and leave a short file instead of raising.
_FULL_BELOW_BYTES = 4 << 20


class WriteError(OSError):
    """A file could not be written completely: the disk is full (``errno.ENOSPC``), the writer
    failed, or the written file failed its check. The target was left as it was; no temporary
    file remains. ``str(e)`` is one line naming the target."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


# ----------------------------------------------------------------------------- termination
class _Termination:
    depth = 0          # > 0 while the main thread is in a section that must not be interrupted
    pending = None     # the exception deferred until that section ends


def install_termination_handler() -> bool:
    """Turn SIGTERM into ``SystemExit(143)`` (and keep Ctrl-C's ``KeyboardInterrupt``), so that
    ``finally`` blocks and :func:`atomic_output` clean up instead of the process dying mid-write.

    Inside :func:`atomic_output`'s short bookkeeping steps (creating, renaming, removing the
    temporary file) either signal is deferred to the end of the step. Call it once, from the main
    thread, at program start; returns False (and does nothing) elsewhere.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_signal)
    return True


def _on_signal(signum, frame):
    exc = KeyboardInterrupt() if signum == signal.SIGINT else SystemExit(128 + signum)
    if _Termination.depth > 0:
        _Termination.pending = _Termination.pending or exc
        return
    raise exc


@contextmanager
def _uninterrupted():
    """Defer SIGTERM/SIGINT (when our handler is installed) in the main thread until the block ends."""
    main = threading.current_thread() is threading.main_thread()
    if main:
        _Termination.depth += 1
    try:
        yield
    finally:
        if main:
            _Termination.depth -= 1
            if _Termination.depth == 0 and _Termination.pending is not None:
                exc, _Termination.pending = _Termination.pending, None
                raise exc


# Temporary files not yet renamed or removed, removed at interpreter exit (e.g. a daemon thread
# that was writing when the main thread ended).
_LIVE: set = set()


@atexit.register
def _remove_leftovers() -> None:
    for tmp in list(_LIVE):
        with contextlib.suppress(OSError):
            os.remove(tmp)
    _LIVE.clear()


# ----------------------------------------------------------------------------- atomic output
@contextmanager
def atomic_output(path, suffix: str | None = None, verify=None, allow_empty: bool = False,
                  fsync: bool = True):
    """Yield a temporary path in ``path``'s folder; when the block succeeds, check the file and
    rename it to ``path``.

    The check: the file exists, is not empty (unless ``allow_empty``), is flushed to disk
    (``fsync``) and ``verify(tmp_path)`` (optional; raise any exception to refuse) passes. On any
    failure, including ``KeyboardInterrupt`` and ``SystemExit``, ``path`` is not created or
    replaced and the temporary file is removed. Errors while writing or checking become
    :class:`WriteError` (disk full: errno ENOSPC, message "disk full: cannot write PATH ...");
    ``KeyboardInterrupt``/``SystemExit`` and exceptions from the block on a disk that is not full
    propagate unchanged.

    ``suffix`` defaults to the target's extension(s) (e.g. ``.nii.gz``), so writers that choose
    the format by extension keep working.
    """
    path = Path(path)
    if suffix is None:
        suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    tmp = None
    try:
        try:
            _make_folder(path)
            with _uninterrupted():
                fd, name = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=path.parent)
                tmp = Path(name)
                _LIVE.add(tmp)
                os.close(fd)
        except WriteError:
            raise
        except OSError as e:
            raise _write_error(e, path) from e
        try:
            yield tmp
        except Exception as e:  # KeyboardInterrupt and SystemExit pass through unchanged
            full = _disk_full_error(e, path)
            if full is not None:
                raise full from e
            raise
        _check_written(tmp, path, verify, allow_empty, fsync)
        try:
            with _uninterrupted():
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
                os.replace(tmp, path)
                _LIVE.discard(tmp)
        except OSError as e:
            raise _write_error(e, path) from e
        _fsync_folder(path.parent)
    finally:
        if tmp is not None:
            with _uninterrupted():
                with contextlib.suppress(OSError):
                    if os.path.lexists(tmp):
                        os.remove(tmp)
                _LIVE.discard(tmp)


def _make_folder(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = path.parent
        while not blocker.exists() and blocker != blocker.parent:
            blocker = blocker.parent
        raise WriteError(errno.ENOTDIR, f"cannot write {path}: {blocker} is a file, not a folder") from None


def _check_written(tmp: Path, path: Path, verify, allow_empty: bool, fsync: bool) -> None:
    if not tmp.is_file():
        raise WriteError(errno.EIO, f"cannot write {path}: the writer left no file")
    try:
        if fsync:
            with open(tmp, "rb+") as f:  # write access: Windows' fsync (_commit) needs it
                os.fsync(f.fileno())
        size = tmp.stat().st_size
    except OSError as e:
        raise _write_error(e, path) from e
    if size == 0 and not allow_empty:
        raise write_failed(path, "the written file is empty")
    if verify is not None:
        try:
            verify(tmp)
        except Exception as e:
            reason = str(e).strip().replace(str(tmp), "the written file") or type(e).__name__
            raise write_failed(path, reason.splitlines()[0]) from e


def write_failed(path, reason: str) -> WriteError:
    """The error for a writer that failed (or wrote a file that fails its check) for ``reason``
    without saying why: "disk full" when the disk is (nearly) full, else "cannot write PATH: reason"."""
    path = Path(path)
    free = _free_bytes(path.parent)
    if free is not None and free < _FULL_BELOW_BYTES:
        return _disk_full(path, free)
    return WriteError(errno.EIO, f"cannot write {path}: {reason}")


def _disk_full(path: Path, free: int | None, code: int = errno.ENOSPC) -> WriteError:
    left = "" if free is None else f"; {_fmt_bytes(free)} free on its disk"
    return WriteError(code, f"disk full: cannot write {path} ({os.strerror(code).lower()}{left})")


def _disk_full_error(e: BaseException, path: Path) -> WriteError | None:
    """The "disk full" error that explains ``e``, or None when the disk is not full."""
    if isinstance(e, OSError) and e.errno is not None:  # the system says why: believe it
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return _disk_full(path, _free_bytes(path.parent), e.errno)
        return None
    free = _free_bytes(path.parent)  # writers that hide the cause (ITK's RuntimeError)
    if free is not None and free < _FULL_BELOW_BYTES:
        return _disk_full(path, free)
    return None


def _write_error(e: OSError, path: Path) -> WriteError:
    full = _disk_full_error(e, path)
    if full is not None:
        return full
    return WriteError(e.errno or errno.EIO, f"cannot write {path}: {e.strerror or e}")


def _free_bytes(folder: Path) -> int | None:
    """Bytes this process may still write on ``folder``'s file system (root may use the reserve)."""
    try:
        if hasattr(os, "statvfs"):
            st = os.statvfs(folder)
            blocks = st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail
            return blocks * st.f_frsize
        import shutil
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (POSIX; a no-op where folders cannot be opened)."""
    if sys.platform == "win32":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fmt_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, flushed to disk and its size checked before
    the rename."""
    data = text.encode("utf-8")

    def verify(tmp: Path) -> None:
        size = tmp.stat().st_size
        if size != len(data):
            raise OSError(errno.EIO, f"wrote {size} of {len(data)} bytes")

    with atomic_output(path, verify=verify, allow_empty=not data) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)
