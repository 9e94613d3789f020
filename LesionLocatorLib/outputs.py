"""What the command line writes into an output folder: one run at a time, whole cases, no stale files.

* :class:`OutputFolder` creates the folder (only after every input was checked) and holds a lock
  file while a run writes there: a second run into the same folder is refused with the first one's
  process ID (a lock left by a process that died is taken over).
* Each case's files are written atomically one by one (:mod:`LesionLocatorLib.files`); then files of
  an earlier run of that case that this run did not write (``<case>_lesion_3.nii.gz`` when there
  are only two lesions now) are removed; last comes the case's manifest
  ``.<case>.lesionlocator.json`` (file names and sizes; hidden, so the folder holds exactly upstream's
  file names). ``--continue_prediction`` skips a case only when its manifest is there and every file
  it lists has that size: a case interrupted half-way is computed again.
* A run that fails before writing anything removes the output folder it created (an empty folder
  is never left behind).
"""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

from .files import atomic_write_text
from .inputs import IMAGE_ENDINGS, UsageError

LOCK_NAME = ".lesionlocator.lock"
MANIFEST_SUFFIX = ".lesionlocator.json"
MANIFEST_FORMAT = "lesionlocator-case/1"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputFolder:
    """An output folder held for one run (a context manager: creates the folder, takes the lock)."""

    def __init__(self, path):
        self.path = Path(path)
        self._lock = self.path / LOCK_NAME
        self._held = False
        self._created = []

    def __enter__(self) -> "OutputFolder":
        self._created = [d for d in (self.path, *self.path.parents) if not d.exists()]  # deepest first
        self.path.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(self._lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None:
                    raise UsageError(f"another lesionlocator run (process {holder}) is writing to {self.path}; "
                                     f"wait for it to finish or choose another output folder") from None
                self._lock.unlink(missing_ok=True)  # left by a run that died: take it over
                continue
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            self._held = True
            return self
        raise UsageError(f"could not lock the output folder {self.path}")

    def _holder(self):
        """The process ID holding the lock when that process is alive on this machine, else None."""
        try:
            pid, host = self._lock.read_text().split()[:2]
            pid = int(pid)
        except (OSError, ValueError):
            return None
        if host != socket.gethostname():
            return f"{pid} on {host}"
        return pid if _pid_alive(pid) and pid != os.getpid() else None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._held:
            self._lock.unlink(missing_ok=True)
            self._held = False
        if exc_type is not None:  # nothing was written: the folders this run created go again
            for folder in self._created:
                try:
                    folder.rmdir()
                except OSError:  # not empty (or not ours to remove): keep it and everything above it
                    break
        return False

    # ------------------------------------------------------------------ cases
    def manifest(self, case: str) -> Path:
        return self.path / f".{case}{MANIFEST_SUFFIX}"

    def case_complete(self, case: str) -> bool:
        """True when the case's manifest is there and every file it lists has its recorded size."""
        try:
            data = json.loads(self.manifest(case).read_text())
            files = data["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if data.get("format") != MANIFEST_FORMAT or not files:
            return False
        for name, size in files.items():
            path = self.path / name
            if Path(name).name != name or not path.is_file() or path.stat().st_size != size:
                return False
        return True

    def begin_case(self, case: str) -> None:
        """The case is being written again: it is incomplete until :meth:`finish_case`."""
        self.manifest(case).unlink(missing_ok=True)

    def finish_case(self, case: str, written) -> Path:
        """Remove the case's files of an earlier run that this run did not write, then record the files
        written (paths in this folder) with their sizes in the case's manifest."""
        names = {Path(p).name for p in written}
        for stale in self.case_files(case):
            if stale.name not in names:
                stale.unlink(missing_ok=True)
        files = {name: (self.path / name).stat().st_size for name in sorted(names)}
        return atomic_write_text(self.manifest(case), json.dumps({"format": MANIFEST_FORMAT, "case": case,
                                                                   "files": files}, indent=1) + "\n")

    def case_files(self, case: str) -> list:
        """The files this program writes for ``case``: ``<case>_lesions<ending>``,
        ``<case>_lesion_<id><ending>`` and ``<case>_lesion_<id>.npz``."""
        endings = "|".join(re.escape(e) for e in IMAGE_ENDINGS + (".npz",))
        pattern = re.compile(rf"^{re.escape(case)}_(lesions|lesion_\d+)({endings})$")
        return sorted(p for p in self.path.iterdir() if p.is_file() and pattern.match(p.name))
