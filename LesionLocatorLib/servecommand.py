"""``lesionlocator serve``: its options and its command (FastAPI and uvicorn are imported only when
it runs; see :mod:`LesionLocatorLib.server`).

Every option is checked before anything starts (a user error is one line, exit status 2): the
keys file (``name:key`` or ``key`` per line, ``#`` comments; a warning when group or others may
read it), the host (no keys: loopback only, with a warning), the TLS files (both or neither), the
devices (they must exist) and the models (:func:`LesionLocatorLib.serverjobs.load_models`).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import stat
import sys

from .inputs import UsageError

DEFAULT_PORT = 8765
CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_KEY_CHARS = 16


def add_serve_command(sub, parents, formatter) -> None:
    """Register ``serve`` on the ``lesionlocator`` sub-parsers."""
    s = sub.add_parser("serve", parents=parents, formatter_class=formatter,
                       help="serve segmentation and tracking over HTTP to Slicer and command-line clients",
                       description="Serve segmentation, refinement and tracking over HTTP (API: "
                       "LesionLocatorLib.serverapi). Clients upload each volume once (by content ID), submit jobs "
                       "that name a model from --models, and poll for results. Stop with Ctrl-C or SIGTERM.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (without --api-key-file: a "
                   "loopback address only)")
    s.add_argument("--port", type=_port, default=DEFAULT_PORT, help="TCP port")
    s.add_argument("--api-key-file", metavar="FILE", help="the clients' API keys, one per line: NAME:KEY or KEY "
                   "(named client1, client2, ...); '#' starts a comment. Keep it readable by this user only")
    s.add_argument("--models", nargs="+", metavar="NAME", default=["demo"],
                   help="models offered, by zoo name (demo, lesionlocator, ...), model folder (named after the "
                   "folder) or NAME=FOLDER")
    s.add_argument("--devices", type=_devices, default=None, help="comma-separated torch devices, one job at a "
                   "time on each: e.g. cuda:0,cuda:1 or cpu (default: cuda:0 if available, else cpu)")
    s.add_argument("--max-cache-gb", type=_positive, default=8.0, help="memory for cached uploaded volumes "
                   "(voxel bytes, all clients); least recently used evicted first")
    s.add_argument("--max-upload-mb", type=_positive, default=2048.0, help="largest request body (MiB)")
    s.add_argument("--max-jobs-per-client", type=_count, default=4, help="jobs one client may have queued or running")
    s.add_argument("--ssl-certfile", metavar="PEM", help="TLS certificate (chain) file: serve HTTPS")
    s.add_argument("--ssl-keyfile", metavar="PEM", help="TLS private key file (with --ssl-certfile)")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    """Check the options, print the URL, models and devices, then serve until SIGINT/SIGTERM."""
    from .serverjobs import Service, describe_config

    config = server_config(args)
    try:
        from .server import run_server
    except ImportError as e:
        raise UsageError(f"lesionlocator serve needs FastAPI and uvicorn ({e}): pip install fastapi uvicorn, or "
                         f"install this package with its 'server' extra") from None
    service = Service(config)
    print(describe_config(config, service.models), file=sys.stderr, flush=True)
    run_server(config, service)
    print("lesionlocator serve: stopped", file=sys.stderr)
    return 0


def server_config(args):
    """A :class:`~LesionLocatorLib.serverjobs.ServerConfig` from the parsed options, every one checked."""
    from .serverjobs import GIB, MIB, ServerConfig

    keys = read_api_keys(args.api_key_file) if args.api_key_file else None
    if keys is None and not is_loopback(args.host):
        raise UsageError(f"--host {args.host}: without --api-key-file the server listens on a loopback address "
                         f"only (127.0.0.1, ::1, localhost); give the clients keys to serve the network")
    if keys is None:
        _warn(f"no --api-key-file: every local user and program can use this server on {args.host}:{args.port}")
    elif not args.ssl_certfile and not is_loopback(args.host):
        _warn("no --ssl-certfile: API keys and scans cross the network unencrypted; use TLS here or in a proxy")
    certfile, keyfile = _tls_files(args.ssl_certfile, args.ssl_keyfile)
    return ServerConfig(host=args.host, port=args.port, keys=keys, models=tuple(args.models),
                        devices=tuple(check_devices(args.devices or default_devices())),
                        max_cache_bytes=int(args.max_cache_gb * GIB), max_upload_bytes=int(args.max_upload_mb * MIB),
                        max_jobs_per_client=args.max_jobs_per_client, ssl_certfile=certfile, ssl_keyfile=keyfile)


def read_api_keys(path) -> dict:
    """``{client name: key}`` from a keys file (see ``--api-key-file``); warns when the file is
    readable by group or others. Raises :class:`UsageError` for a bad line, a repeated name or key,
    a key shorter than 16 characters, or a file without keys."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        mode = os.stat(path).st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--api-key-file {path}: {e}") from None
    if os.name == "posix" and mode & (stat.S_IRGRP | stat.S_IROTH):
        _warn(f"--api-key-file {path} is readable by other users (mode {stat.S_IMODE(mode):o}); run chmod 600 on it")
    keys = {}
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if text:
            name, key = _key_line(text, f"{path}:{number}", len(keys) + 1)
            if name in keys or key in keys.values():
                raise UsageError(f"--api-key-file {path}:{number}: the {'name' if name in keys else 'key'} is "
                                 f"given twice")
            keys[name] = key
    if not keys:
        raise UsageError(f"--api-key-file {path}: no key in it (one per line: NAME:KEY or KEY)")
    return keys


def _key_line(text: str, where: str, n: int) -> tuple:
    name, sep, key = text.partition(":")
    if not sep:
        name, key = f"client{n}", text
    name, key = name.strip(), key.strip()
    if not CLIENT_NAME.match(name):
        raise UsageError(f"--api-key-file {where}: {name!r} is not a client name (letters, digits, '.', '_', '-')")
    if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
        raise UsageError(f"--api-key-file {where}: a key needs at least {MIN_KEY_CHARS} characters and no spaces "
                         f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return name, key


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_devices() -> list:
    """``["cuda:0"]`` when torch sees a CUDA device, else ``["cpu"]``."""
    import torch

    return ["cuda:0"] if torch.cuda.is_available() else ["cpu"]


def check_devices(devices) -> list:
    """The devices, with ``cuda`` as ``cuda:0``; :class:`UsageError` for a CUDA or MPS device this machine lacks."""
    out = ["cuda:0" if d == "cuda" else d for d in devices]
    if any(d.startswith("cuda") for d in out) or "mps" in out:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        for device in out:
            if device.startswith("cuda") and int(device.split(":")[1]) >= count:
                raise UsageError(f"--devices {device}: this machine has {count} CUDA device(s)")
            if device == "mps" and not torch.backends.mps.is_available():
                raise UsageError("--devices mps: MPS is not available on this machine")
    return out


def _tls_files(certfile, keyfile) -> tuple:
    if bool(certfile) != bool(keyfile):
        raise UsageError("--ssl-certfile and --ssl-keyfile go together: give both or neither")
    for option, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if path and not os.path.isfile(path):
            raise UsageError(f"{option} {path}: not a file")
    return certfile, keyfile


def _devices(text: str) -> list:
    from .inputs import device_value

    names = [device_value(part) for part in str(text).split(",") if part.strip()]
    if not names or "auto" in names:
        raise argparse.ArgumentTypeError(f"give device names such as cuda:0,cuda:1 or cpu, got {text!r}")
    return names


def _port(text: str) -> int:
    if not str(text).isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"a port is a number from 1 to 65535, got {text!r}")
    return int(text)


def _positive(text: str) -> float:
    from .inputs import _number

    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _count(text: str) -> int:
    if not str(text).isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, got {text!r}")
    return int(text)


def _warn(message: str) -> None:
    print(f"lesionlocator serve: warning: {message}", file=sys.stderr)
