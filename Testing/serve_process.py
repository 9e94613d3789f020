"""``lesionlocator serve`` (the real command, with a keys file and the demo model on the CPU) in a
subprocess that a test or benchmark may kill and start again on the same port. The fixtures
``server`` and ``own_server`` (in ``conftest.py``) are made of it."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from LesionLocatorLib.remote import RemoteRunner, ServerError

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-0123456789abcdef"  # client alice
OTHER_KEY = "other-key-0123456789abcdef"  # client bob


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``lesionlocator serve`` (the real command, ``--models demo --devices cpu`` unless ``options``
    say otherwise: the last value given wins) in a subprocess that a test may kill and start again
    on the same port. ``keys``: {client name: key} for its keys file (default alice and bob);
    ``ca_file``: the CA of the ``--ssl-certfile`` among ``options`` (the server is then reached
    with https)."""

    def __init__(self, folder: Path, *options, ca_file=None, keys=None):
        self.port = free_port()
        self.ca_file = ca_file
        self.url = f"{'https' if ca_file else 'http'}://127.0.0.1:{self.port}"
        self.clients = dict(keys or {"alice": KEY, "bob": OTHER_KEY})
        self.keys = folder / "keys.txt"
        self.keys.write_text("# test clients\n" + "".join(f"{name}:{key}\n" for name, key in self.clients.items()))
        self.keys.chmod(0o600)
        self.log = folder / "serve.log"
        self.options = list(options)
        self.process = None

    def start(self, timeout_s: float = 120.0) -> "ServeProcess":
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "LesionLocatorLib.cli", "serve", "--port", str(self.port), "--api-key-file",
                 str(self.keys), "--models", "demo", "--devices", "cpu", *self.options], stdout=log, stderr=log,
                env=env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lesionlocator serve exited ({self.process.returncode}): {self.tail()}")
            try:
                with RemoteRunner(self.url, ca_file=self.ca_file, timeout_s=5) as runner:
                    runner.health()
                return self
            except ServerError:
                time.sleep(0.2)
        raise RuntimeError(f"lesionlocator serve did not start in {timeout_s:.0f} s: {self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        """The end of the server's log (stdout and stderr)."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def memory(self) -> dict:
        """VmRSS (now) and VmHWM (peak) of the server process, MiB (Linux)."""
        out = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0]) / 1024.0
        return out

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (running jobs cancelled, a clean exit), SIGKILL after 30 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
