"""The command line's ``--server URL --api-key-file F`` (``segment`` and ``track``): its options,
the connection checked before any output is made, and the runs on the server
(:class:`~LesionLocatorLib.remote.RemoteRunner`). Standard library only until a server is used.
"""
from __future__ import annotations

import contextlib
import sys

from .inputs import UsageError


def add_server_options(p) -> None:
    """``--server`` and ``--api-key-file`` on a sub-parser."""
    p.add_argument("--server", default=None, metavar="URL",
                   help="run on a LesionLocator server (`lesionlocator serve`, http://host:port or https://...) "
                   "instead of loading a model here; -m is then a model name on the server (default: its first). "
                   "For a private certificate authority set SSL_CERT_FILE")
    p.add_argument("--api-key-file", dest="api_key_file", default=None, metavar="FILE",
                   help="file holding the server's API key (its first line that is not a # comment); a key is "
                   "never given on the command line")


def connect_server(args, prompt_types):
    """A :class:`~LesionLocatorLib.remote.RemoteRunner` for ``--server`` (None without it), checked
    before any output is made: the key file, the options a server cannot take, the connection and
    key (``/v1/info``), and that the model (``-m``, a name; default the server's first) is served
    and takes ``prompt_types``."""
    if not args.server:
        if args.api_key_file:
            raise UsageError("--api-key-file is for --server")
        return None
    from .remote import RemoteRunner, read_api_key

    for flag, local_only in (("--save-probabilities", getattr(args, "save_probabilities", False)),
                             ("--step_size", getattr(args, "step_size", 0.5) != 0.5),
                             ("--device", args.device != "auto"),
                             ("--backend", getattr(args, "backend", "torch") != "torch")):
        if local_only:
            raise UsageError(f"{flag} cannot be used with --server (the server chooses; probabilities are not sent)")
    key = read_api_key(args.api_key_file) if args.api_key_file else None
    runner = RemoteRunner(args.server, key, model=args.m)
    try:
        models = {m["name"]: m.get("prompt_types", []) for m in runner.info().get("models", [])}
        name = runner.model_name()
        if name not in models:
            raise UsageError(f"-m {name}: the server at {runner.url} has no such model; it serves: "
                             f"{', '.join(models) or 'none'}")
        missing = [t for t in prompt_types if t not in models[name]]
        if missing:
            raise UsageError(f"the server's model {name} takes no {', '.join(missing)} prompts")
    except BaseException:
        runner.close()
        raise
    runner.model = name
    return runner


def server_spec(server, args, tta):
    """The ModelSpec a server run sends (the model's name, folds, mirroring), announced on stderr."""
    from .modelfolder import ModelSpec

    print(f"server: {server.url}, model {server.model} (folds {'all' if args.f is None else args.f}, test-time "
          f"mirroring {'auto' if tta is None else 'on' if tta else 'off'})", file=sys.stderr)
    return ModelSpec(server.model, tuple(args.f) if args.f is not None else None, "auto", tta)


def server_segmenter(server, args, tta):
    """``run(image, prompts, progress) -> SegmentationResult`` on the server
    (:func:`LesionLocatorLib.remote.segment_on_server`), as the command line's local segmenter."""
    from .remote import segment_on_server

    spec = server_spec(server, args, tta)
    return lambda image, prompts, progress: segment_on_server(server, image, prompts, spec, progress)


def closing(runner):
    """A ``with`` context that closes ``runner`` at its end (nothing for None)."""
    return runner if runner is not None else contextlib.nullcontext()
