"""A small real HTTP server on 127.0.0.1 that imitates the Zenodo records API, for tests.

``GET /api/records/{id}`` answers the record JSON (files with key, size,
``md5:`` checksum and ``links.self``; metadata with title, version, licence) and
``GET /api/records/{id}/files/{key}/content`` the file, honouring
``Range: bytes=N-`` with 206 Partial Content. Faults can be scripted per path
(an HTTP status, an HTML page, dropping the connection after N bytes), the file
can be sent slowly or held at a gate, and every request is logged with its headers.

    with FixtureServer() as srv:
        srv.add_record("15174217", {"LesionLocatorCheckpoint.zip": data})
        srv.add_fault("/content", kind="drop", after=1000, times=1)
        ... srv.url ... srv.requests
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Fault:
    match: str                 # substring of the request path
    kind: str                  # "status", "html" or "drop"
    status: int = 500
    after: int = 0             # "drop": bytes of the body sent before the connection is cut
    times: int | None = 1      # None: every time


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802
        srv: FixtureServer = self.server.fixture
        srv._log(self)
        fault = srv._take_fault(self.path)
        if fault is not None and fault.kind == "status":
            return self._send(fault.status, b"<html><body><h1>Error</h1></body></html>", "text/html")
        if fault is not None and fault.kind == "html":
            return self._send(200, b"<!DOCTYPE html><html><body>Zenodo is under maintenance</body></html>",
                              "text/html; charset=utf-8")
        m = re.fullmatch(r"/api/records/([^/]+)", self.path)
        if m and m.group(1) in srv.records:
            return self._send(200, json.dumps(srv.record_json(m.group(1))).encode(), "application/json")
        m = re.fullmatch(r"/api/records/([^/]+)/files/([^/]+)/content", self.path)
        if m and m.group(1) in srv.records and m.group(2) in srv.records[m.group(1)]["files"]:
            return self._send_file(srv.records[m.group(1)]["files"][m.group(2)], srv,
                                   fault if fault is not None and fault.kind == "drop" else None)
        return self._send(404, b'{"status": 404, "message": "not found"}', "application/json")

    def _send(self, status: int, body: bytes, ctype: str):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _send_file(self, data: bytes, srv: "FixtureServer", drop: Fault | None):
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.honour_range:
            m = re.fullmatch(r"bytes=(\d+)-", rng.strip())
            start = int(m.group(1)) if m else 0
            if start >= len(data):
                return self._send(416, b"", "text/plain")
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        body = data[start:]
        limit = drop.after if drop is not None else len(body)
        sent = 0
        try:
            while sent < min(limit, len(body)):
                piece = body[sent:min(sent + srv.piece, limit)]
                self.wfile.write(piece)
                sent += len(piece)
                if srv.gate is not None:
                    self.wfile.flush()
                    srv.gate.wait(30)
                if srv.delay:
                    time.sleep(srv.delay)
            self.wfile.flush()
            if drop is not None:
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client went away
            pass


class FixtureServer:
    """Serve records and files on an ephemeral 127.0.0.1 port (a context manager)."""

    def __init__(self):
        self.records: dict = {}
        self.faults: list = []
        self.requests: list = []
        self.delay = 0.0           # seconds to sleep after each piece of a file body
        self.piece = 64 * 1024     # bytes per write of a file body
        self.honour_range = True
        self.gate = None           # a threading.Event: file bodies pause after the first piece until set
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.fixture = self
        self._thread = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def add_record(self, record: str, files: dict, metadata: dict | None = None, md5: dict | None = None,
                   sizes: dict | None = None) -> None:
        """``md5``/``sizes`` override what the JSON claims for a file key (to fake a mismatch)."""
        self.records[record] = {"files": dict(files), "metadata": metadata or {
            "title": "LesionLocator checkpoint (test fixture)", "version": "1.0",
            "license": {"id": "cc-by-4.0"}, "publication_date": "2025-04-08"},
            "md5": md5 or {}, "sizes": sizes or {}}

    def record_json(self, record: str) -> dict:
        r = self.records[record]
        files = [{"id": f"f{i}", "key": key, "size": r["sizes"].get(key, len(data)),
                  "checksum": "md5:" + r["md5"].get(key, hashlib.md5(data).hexdigest()),
                  "links": {"self": f"{self.url}/api/records/{record}/files/{key}/content"}}
                 for i, (key, data) in enumerate(r["files"].items())]
        return {"id": int(record) if record.isdigit() else record, "doi": f"10.5281/zenodo.{record}",
                "metadata": r["metadata"], "files": files,
                "links": {"self": f"{self.url}/api/records/{record}", "html": f"{self.url}/records/{record}"}}

    def add_fault(self, match: str, kind: str = "status", status: int = 500, after: int = 0,
                  times: int | None = 1) -> None:
        self.faults.append(Fault(match, kind, status, after, times))

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.match in path and (f.times is None or f.times > 0):
                    if f.times is not None:
                        f.times -= 1
                    return f
        return None

    def _log(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append({"method": handler.command, "path": handler.path,
                                  "headers": {k.lower(): v for k, v in handler.headers.items()}})

    def requests_to(self, suffix: str) -> list:
        with self._lock:
            return [r for r in self.requests if r["path"].endswith(suffix)]

    def start(self) -> "FixtureServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "FixtureServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
