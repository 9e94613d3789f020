"""Real lesion-free CT volumes that ship inside a registry package (no data-set download).

TotalSegmentator's source distribution on PyPI, ``totalsegmentator==2.18.0``
(``totalsegmentator-2.18.0.tar.gz``, 38 MB, sha256 below), carries the CT
volumes its own test suite runs on.  The whole sdist is under the Apache
License 2.0 (``LICENSE`` at its root; ``PKG-INFO``: ``License: Apache 2.0``);
it has no separate notice for ``tests/reference_files``, and it does not say
where the example scans come from.  Name the source in the model card:
"CT volumes from the test files of TotalSegmentator 2.18.0 (Wasserthal et al.,
https://github.com/wasserth/TotalSegmentator, Apache-2.0)".

The volumes (shapes in array order z, y, x; spacing x, y, z in mm):

====================  =======================================================  ===============  ================
name                  file in the sdist (under ``totalsegmentator-2.18.0/``)  shape (z, y, x)  spacing (mm)
====================  =======================================================  ===============  ================
``abdomen_3mm``       ``tests/reference_files/example_ct.nii.gz``              112 x 101 x 122  3.0 x 3.0 x 3.0
``chest_1p5mm``       ``tests/reference_files/aorta_report/example_ct.nii.gz`` 191 x 167 x 233  1.5 x 1.5 x 1.5
``abdomen_3mm_crop``  ``tests/reference_files/example_ct_sm.nii.gz``           30 x 101 x 122   3.0 x 3.0 x 3.0
``abdomen_dicom``     ``tests/reference_files/example_ct_dicom/`` (20 files)   20 x 512 x 512   0.977 x 0.977 x 2.0
====================  =======================================================  ===============  ================

* ``abdomen_3mm``: native (non-contrast) abdomen and pelvis, kidneys to hips
  (TotalSegmentator's phase model says "native" for its crop), bowel gas, no
  lungs; int32 HU, -1207..3382.  Use it for **training**.
* ``chest_1p5mm``: contrast-enhanced chest CT (CT angiography, sternal wires),
  neck base to liver dome, both lungs, arms beside the body; int16 HU,
  -1094..3343.  A **different patient**: use it for the **demo** case.
* ``abdomen_3mm_crop``: 30 slices cut out of ``abdomen_3mm`` (same patient,
  same origin): never use it beside ``abdomen_3mm`` as independent data.
* ``abdomen_dicom``: a 40 mm slab (20 axial slices, 3 mm thick every 2 mm) of
  the upper abdomen (liver, stomach, spleen, arms beside the body), Siemens,
  120 kV, empty patient tags; another scan (whether another patient is not
  documented).  Too thin for :func:`LesionLocatorLib.synth.make_case` with the
  default image-level transforms (no lesion fits away from the border).

Usage::

    python Testing/registry_ct.py CACHE_DIR [NAME ...]

prints ``name<TAB>path`` per volume.  :func:`fetch_registry_cts` downloads the
sdist with pip (``pip download --no-deps --no-binary :all:``) into
``CACHE_DIR/sdist``, checks its sha256, and extracts only the CT files to
``CACHE_DIR/totalsegmentator-2.18.0/...``; later calls reuse the cache.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PACKAGE = "totalsegmentator"
VERSION = "2.18.0"
SDIST_NAME = f"totalsegmentator-{VERSION}.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
ROOT = f"totalsegmentator-{VERSION}"
LICENSE = "Apache-2.0 (TotalSegmentator sdist LICENSE file)"


@dataclass(frozen=True)
class RegistryCT:
    member: str                 # path inside the sdist, below ROOT; a folder for DICOM
    shape_zyx: tuple
    spacing_xyz: tuple
    region: str
    sha256: str = ""            # of the extracted file ("" for a DICOM folder)
    dicom_files: int = 0


CTS = {
    "abdomen_3mm": RegistryCT(
        "tests/reference_files/example_ct.nii.gz", (112, 101, 122), (3.0, 3.0, 3.0),
        "native abdomen + pelvis (training)",
        "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1"),
    "chest_1p5mm": RegistryCT(
        "tests/reference_files/aorta_report/example_ct.nii.gz", (191, 167, 233), (1.5, 1.5, 1.5),
        "contrast-enhanced chest, both lungs (demo)",
        "372d98723e3283a8d4a0ae2f0ef1e581c0ad17b673b30b2e8d3e215180cc2a12"),
    "abdomen_3mm_crop": RegistryCT(
        "tests/reference_files/example_ct_sm.nii.gz", (30, 101, 122), (3.0, 3.0, 3.0),
        "30-slice crop of abdomen_3mm (same patient)",
        "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb"),
    "abdomen_dicom": RegistryCT(
        "tests/reference_files/example_ct_dicom", (20, 512, 512), (0.9765625, 0.9765625, 2.0),
        "40 mm upper-abdomen slab, DICOM series", dicom_files=20),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _target(cache: Path, ct: RegistryCT) -> Path:
    return cache / ROOT / ct.member


def _is_ready(cache: Path, ct: RegistryCT) -> bool:
    p = _target(cache, ct)
    if ct.dicom_files:
        return p.is_dir() and len([f for f in p.iterdir() if f.is_file()]) == ct.dicom_files
    return p.is_file() and _sha256(p) == ct.sha256


def download_sdist(cache_dir, python: str | None = None, timeout: float = 900) -> Path:
    """``pip download`` the TotalSegmentator sdist into ``cache_dir/sdist`` and check its sha256."""
    dest = Path(cache_dir) / "sdist"
    dest.mkdir(parents=True, exist_ok=True)
    sdist = dest / SDIST_NAME
    if not (sdist.is_file() and _sha256(sdist) == SDIST_SHA256):
        cmd = [python or sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"{PACKAGE}=={VERSION}", "-d", str(dest), "--disable-pip-version-check", "-q"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0 or not sdist.is_file():
            raise RuntimeError(f"pip could not download {PACKAGE}=={VERSION} (exit {res.returncode}):\n"
                               f"{(res.stderr or res.stdout).strip()[-2000:]}")
    digest = _sha256(sdist)
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{sdist}: sha256 {digest} does not match the expected {SDIST_SHA256}")
    return sdist


def _extract(sdist: Path, cache: Path, members: list) -> None:
    wanted = [f"{ROOT}/{m}" for m in members]
    with tarfile.open(sdist, "r:gz") as tar:
        for info in tar.getmembers():
            name = PurePosixPath(info.name)
            if not info.isfile() or name.is_absolute() or ".." in name.parts:
                continue
            if not any(info.name == w or info.name.startswith(w + "/") for w in wanted):
                continue
            out = cache / Path(*name.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(".tmp_" + out.name)
            with tar.extractfile(info) as src, open(tmp, "wb") as dst:
                dst.write(src.read())
            tmp.replace(out)


def fetch_registry_cts(cache_dir, names=None, python: str | None = None) -> dict:
    """Make sure the named CTs (default: all of :data:`CTS`) are in ``cache_dir``; return name -> path.

    A path is a ``.nii.gz`` file, or for ``abdomen_dicom`` the folder of its
    DICOM series (read it with ``SimpleITK.ImageSeriesReader``).  Downloads
    the sdist only when a file is missing or its checksum is wrong.
    """
    cache = Path(cache_dir)
    names = list(CTS) if names is None else list(names)
    unknown = [n for n in names if n not in CTS]
    if unknown:
        raise KeyError(f"unknown CT name(s) {unknown}; known: {sorted(CTS)}")
    missing = [n for n in names if not _is_ready(cache, CTS[n])]
    if missing:
        sdist = download_sdist(cache, python)
        _extract(sdist, cache, [CTS[n].member for n in missing])
        bad = [n for n in missing if not _is_ready(cache, CTS[n])]
        if bad:
            raise RuntimeError(f"extracted files for {bad} are missing or have a wrong checksum")
    return {n: _target(cache, CTS[n]) for n in names}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    for name, path in fetch_registry_cts(argv[0], argv[1:] or None).items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
