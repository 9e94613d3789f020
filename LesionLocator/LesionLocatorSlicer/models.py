"""Model choice and download, through the library's zoo (the same cache and checks as
``lesionlocator download`` / ``lesionlocator models``).

The bundled demo model and demo case are found by the library (:func:`LesionLocatorLib.zoo.demo_model_dir`,
:func:`LesionLocatorLib.demo.demo_case_dir`): next to the module in an installed extension and at
the top of a source checkout alike.
"""
from __future__ import annotations

from slicer.i18n import tr as _


def defaultModelPath():
    """The bundled demo model folder, or None when it is not installed."""
    from LesionLocatorLib.zoo import demo_model_dir

    path = demo_model_dir()
    return str(path) if path.is_dir() else None


def demoCasePath():
    """The demo case folder (``demo_t0.nii.gz``, ``demo_t1.nii.gz``, ... with ``_label`` files and
    ``demo_points.json``) when complete, or None."""
    from LesionLocatorLib.demo import demo_case_dir, demo_scans

    folder = demo_case_dir()
    scans = demo_scans(folder) if folder.is_dir() else []
    complete = len(scans) >= 2 and (folder / "demo_points.json").is_file() and all(
        p.with_name(p.name.replace(".nii.gz", "_label.nii.gz")).is_file() for p in scans)
    return str(folder) if complete else None


def parseFolds(folds):
    """None/'' -> None (all folds); '0, 1' or [0, 1] -> (0, 1); 'all' -> ('all',)."""
    if folds is None:
        return None
    parts = [p for p in folds.replace(";", ",").replace(" ", ",").split(",") if p] if isinstance(folds, str) \
        else list(folds)
    if not parts:
        return None
    out = []
    for p in parts:
        if str(p).strip().lower() == "all":
            out.append("all")
            continue
        try:
            out.append(int(p))
        except (TypeError, ValueError):
            raise ValueError(_("folds must be numbers or 'all' (e.g. '0,1,2'), got {folds}").format(
                folds=repr(folds))) from None
    return tuple(out)


def modelSpec(modelPath=None, device="auto", folds=None, tta=None, remote=False):
    """The :class:`LesionLocatorLib.modelfolder.ModelSpec` for the module's settings (default model:
    the bundled demo model). ``remote``: for a server, which picks the model by name and the
    device itself (only folds and tta are used): no local model folder is needed."""
    from LesionLocatorLib.modelfolder import ModelLayoutError, ModelSpec

    path = modelPath or defaultModelPath() or ("" if remote else None)
    if path is None:
        raise ModelLayoutError(_("no model folder given and no model installed: choose the "
                                 "LesionLocatorCheckpoint folder (Model > Model folder)"))
    return ModelSpec(str(path), parseFolds(folds), (device or "auto").strip().lower(), tta)


def availableModels() -> list:
    """The models the module can use, as dicts with ``name``, ``title`` and ``path`` (the model
    root for the Model folder): the bundled demo model when installed, then every intact model
    in the download cache (``$LESIONLOCATOR_HOME`` or the per-user cache folder), with
    ``version`` and ``license``."""
    from LesionLocatorLib import zoo

    models = []
    demo = defaultModelPath()
    if demo:
        models.append({"name": "demo", "title": zoo.get_model_info("demo").title, "path": demo,
                       "version": None, "license": None})
    for entry in zoo.list_cached_models():
        if entry["status"] == "ok":
            models.append({"name": entry["name"], "title": entry.get("title") or entry["name"],
                           "path": entry["path"], "version": entry.get("version"), "license": entry.get("license")})
    return models


def resolveModel(model) -> str:
    """A model folder for ``model``: a name from :func:`availableModels` (e.g. 'lesionlocator' once
    downloaded) or a folder. Raises the zoo's ``ModelNotFoundError`` for a name that is not
    downloaded (saying how to get it) and a folder that does not exist."""
    from LesionLocatorLib import zoo

    path = {m["name"]: m["path"] for m in availableModels()}.get(str(model))
    return path if path is not None else str(zoo.resolve_model(model))


def describeDownload(name=None, baseUrl=None, timeout=20.0) -> str:
    """The question to ask before a download: what is downloaded from where, its size and licence
    (read from the Zenodo record: a network call, so the Widget calls it off the GUI thread), or
    that it is downloaded already. When the record cannot be read the question says so and that
    the download is large."""
    from LesionLocatorLib import zoo

    name = name or zoo.DEFAULT_DOWNLOAD
    info = zoo.get_model_info(name)
    if info is None or info.source != "zenodo":
        return _("'{name}' is not a model that can be downloaded.").format(name=name)
    installed = zoo.installed_model_or_none(info.name)
    if installed is not None:
        return _("{title} is downloaded already ({path}).\n\nUse it as the model?").format(title=info.title,
                                                                                          path=installed)
    lines = [_("Download {title}?").format(title=info.title)]
    try:
        record = zoo.fetch_record(info.record, baseUrl, retries=0, timeout=timeout)
        remote = zoo.pick_file(record, f"{zoo.zenodo_url(baseUrl)}/api/records/{info.record}", info.archive)
    except zoo.ZooError as e:
        lines.append(_("The size could not be read from the Zenodo record ({error}); the checkpoint is a large "
                       "download (gigabytes).").format(error=e))
    else:
        metadata = record.get("metadata") or {}
        licence = metadata.get("license")
        licence = licence.get("id") if isinstance(licence, dict) else licence
        lines.append(f"{remote.key}: {zoo.human_size(remote.size)} from {zoo.zenodo_url(baseUrl)}, record "
                     f"{info.record}" + (f", version {metadata['version']}" if metadata.get("version") else "")
                     + (f", licence {licence}" if licence else "") + ".")
    lines.append(_("It is checked (MD5), unpacked and kept in {cache} (needs about twice its size free while "
                   "unpacking). Cancel keeps the part downloaded so far; downloading again resumes it.").format(
        cache=zoo.default_cache_dir()))
    return "\n\n".join(lines)


def downloadModel(name=None, progress=None, cancel=None, baseUrl=None):
    """Download a known model (default: the official LesionLocator checkpoint) into the cache with
    :func:`LesionLocatorLib.zoo.download_model` (MD5 check, resume, retries, atomic install) and
    return its model root (a ``Path``); an installed model is returned without downloading.
    ``progress(fraction, message)``; ``cancel``: a :class:`LesionLocatorLib.cancel.CancelToken`
    or ``threading.Event``. Raises the zoo's errors (``DownloadError``, ``ChecksumError``,
    ``DiskFullError``, ``ModelNotFoundError``, ``DownloadCancelled``); then nothing is installed.
    Touches no scene node: safe off the GUI thread."""
    from LesionLocatorLib import zoo

    name = name or zoo.DEFAULT_DOWNLOAD
    report = progress or (lambda fraction, message: None)

    def downloading(done, total):
        report(0.9 * done / total if total else 0.0,
               _("Downloading {name}: {done} of {total}").format(name=name, done=zoo.human_size(done),
                                                                 total=zoo.human_size(total)))

    def unpacking(done, total):
        report(0.9 + 0.1 * done / total if total else 0.9, _("Unpacking {name}").format(name=name))

    root = zoo.download_model(name, baseUrl, progress=downloading, cancel=cancel, unpack_progress=unpacking)
    report(1.0, _("Model '{name}' ready: {root}").format(name=name, root=root))
    return root
