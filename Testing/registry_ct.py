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
  lungs; int32 HU, -1207..3382.  The **evaluation** and **demo** CT (never
  used for training).
* ``chest_1p5mm``: contrast-enhanced chest CT (CT angiography, sternal wires),
  neck base to liver dome, both lungs, arms beside the body; int16 HU,
  -1094..3343.  A **different patient**: the **training** CT.
* ``abdomen_3mm_crop``: 30 slices cut out of ``abdomen_3mm`` (same patient,
  same origin): never use it beside ``abdomen_3mm`` as independent data.
* ``abdomen_dicom``: a 40 mm slab (20 axial slices, 3 mm thick every 2 mm) of
  the upper abdomen (liver, stomach, spleen, arms beside the body), Siemens,
  120 kV, empty patient tags; another scan (whether another patient is not
  documented).  Too thin for :func:`LesionLocatorLib.training.synth.make_case` with the
  default image-level spatial transform (no lesion fits away from the
  border); without it, at 3 mm, lesions up to ~20 mm fit: training data
  (contrast-enhanced, soft tissue 61 HU median vs 32 in ``abdomen_3mm``, so
  another scan).

Real lesions (:data:`REAL_LESION_CTS`, fetched by name only; their label
with :func:`label_path`), from pyradiomics' sdist on PyPI
(``pyradiomics-3.1.0.tar.gz``, BSD-3-Clause, "Copyright 2017 Harvard Medical
School"; its ``data/README.md`` does not say where the scans come from):

=============  =====================================  ===============  ======================
``lung1_5mm``  ``data/lung1_image.nrrd`` (+ label)    48 x 512 x 512   0.57 x 0.57 x 5.0, 1.4 ml nodule
``lung2_5mm``  ``data/lung2_image.nrrd`` (+ label)    61 x 512 x 512   0.63 x 0.63 x 5.0, 48 ml tumour
=============  =====================================  ===============  ======================

Never train on them: they are the check on real lesions
(``Testing/benchmarks/real_lesions.py``).

Usage::

    python Testing/registry_ct.py CACHE_DIR [NAME ...]

prints ``name<TAB>path`` per volume.  :func:`fetch_registry_cts` downloads the
sdist with pip (``pip download --no-deps --no-binary :all:``) into
``CACHE_DIR/sdist``, checks its sha256, and extracts only the CT files to
``CACHE_DIR/totalsegmentator-2.18.0/...``; later calls reuse the cache.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

PACKAGE = "totalsegmentator"
VERSION = "2.18.0"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
LICENSE = "Apache-2.0 (TotalSegmentator sdist LICENSE file)"


@dataclass(frozen=True)
class Sdist:
    """A source distribution on PyPI, pinned by its sha256."""
    package: str
    version: str
    sha256: str
    licence: str

    @property
    def root(self) -> str:
        """The folder the archive unpacks to (and the cache sub-folder of its files)."""
        return f"{self.package}-{self.version}"

    @property
    def filename(self) -> str:
        return f"{self.root}.tar.gz"


TOTALSEGMENTATOR = Sdist(PACKAGE, VERSION, SDIST_SHA256, LICENSE)
# pyradiomics' test data: two lung CTs with a real lung tumour each and its label
# (``data/lung{1,2}_{image,label}.nrrd``), BSD-3-Clause ("Copyright 2017 Harvard Medical School",
# LICENSE.txt at the sdist's root). Real lesions, never used for training: the real-lesion check.
PYRADIOMICS = Sdist("pyradiomics", "3.1.0", "24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4",
                    "BSD-3-Clause (pyradiomics sdist LICENSE.txt, Copyright 2017 Harvard Medical School)")


@dataclass(frozen=True)
class RegistryCT:
    member: str                 # path inside the sdist, below its root; a folder for DICOM
    shape_zyx: tuple
    spacing_xyz: tuple
    region: str
    sha256: str = ""            # of the extracted file ("" for a DICOM folder)
    dicom_files: int = 0
    sdist: Sdist = TOTALSEGMENTATOR
    label_member: str = ""      # a real lesion's label image (voxel value 1), when the CT has one


CTS = {
    "abdomen_3mm": RegistryCT(
        "tests/reference_files/example_ct.nii.gz", (112, 101, 122), (3.0, 3.0, 3.0),
        "native abdomen + pelvis (evaluation, demo)",
        "dbd3ae6d614d1d7ef3a46925c30c70038ed52da6b37fdd6afdc7b9b71387e3e1"),
    "chest_1p5mm": RegistryCT(
        "tests/reference_files/aorta_report/example_ct.nii.gz", (191, 167, 233), (1.5, 1.5, 1.5),
        "contrast-enhanced chest, both lungs (training)",
        "372d98723e3283a8d4a0ae2f0ef1e581c0ad17b673b30b2e8d3e215180cc2a12"),
    "abdomen_3mm_crop": RegistryCT(
        "tests/reference_files/example_ct_sm.nii.gz", (30, 101, 122), (3.0, 3.0, 3.0),
        "30-slice crop of abdomen_3mm (same patient)",
        "e50c00b2914e2cac0aaee8e7f3b5f57d44d9f21bfd5c0577271c54c0cb49e9fb"),
    "abdomen_dicom": RegistryCT(
        "tests/reference_files/example_ct_dicom", (20, 512, 512), (0.9765625, 0.9765625, 2.0),
        "40 mm upper-abdomen slab, DICOM series", dicom_files=20),
}

# CTs with a real lesion and its label (not lesion-free: never for ``synth``); fetched only by name
REAL_LESION_CTS = {
    "lung1_5mm": RegistryCT(
        "data/lung1_image.nrrd", (48, 512, 512), (0.5703125, 0.5703125, 5.0),
        "chest, a 1.4 ml lung nodule",
        "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed", sdist=PYRADIOMICS,
        label_member="data/lung1_label.nrrd"),
    "lung2_5mm": RegistryCT(
        "data/lung2_image.nrrd", (61, 512, 512), (0.6269531, 0.6269531, 5.0),
        "chest, a 48 ml lung tumour",
        "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651", sdist=PYRADIOMICS,
        label_member="data/lung2_label.nrrd"),
}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _target(cache: Path, ct: RegistryCT, member: str = "") -> Path:
    return cache / ct.sdist.root / (member or ct.member)


def _is_ready(cache: Path, ct: RegistryCT) -> bool:
    p = _target(cache, ct)
    if ct.dicom_files:
        return p.is_dir() and len([f for f in p.iterdir() if f.is_file()]) == ct.dicom_files
    if ct.label_member and not _target(cache, ct, ct.label_member).is_file():
        return False
    return p.is_file() and _sha256(p) == ct.sha256


def download_sdist(cache_dir, python: str | None = None, timeout: float = 900,
                   sdist: Sdist = TOTALSEGMENTATOR) -> Path:
    """Download ``sdist`` into ``cache_dir/sdist`` and check its sha256.

    First with ``pip download`` (pip's index, proxy and certificate settings); pip builds an
    sdist's metadata before saving it, which fails for some (pyradiomics 3.1.0 needs numpy in its
    build), so then the file is taken from PyPI's simple index (https://pypi.org/simple/) directly.
    """
    dest = Path(cache_dir) / "sdist"
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / sdist.filename
    if not (path.is_file() and _sha256(path) == sdist.sha256):
        cmd = [python or sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"{sdist.package}=={sdist.version}", "-d", str(dest), "--disable-pip-version-check", "-q"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0 or not path.is_file():
            try:
                download_from_simple_index(sdist, path, timeout)
            except OSError as err:
                raise RuntimeError(f"could not download {sdist.package}=={sdist.version}: pip exited "
                                   f"{res.returncode} ({(res.stderr or res.stdout).strip()[-1500:]}); "
                                   f"PyPI's simple index: {err}") from err
    digest = _sha256(path)
    if digest != sdist.sha256:
        raise RuntimeError(f"{path}: sha256 {digest} does not match the expected {sdist.sha256}")
    return path


def download_from_simple_index(sdist: Sdist, path: Path, timeout: float = 900,
                               index_url: str = "https://pypi.org/simple/") -> None:
    """Save to ``path`` (atomically) the file named ``sdist.filename`` that the simple package index
    at ``index_url`` (PEP 503) links for the package; OSError when it links none."""
    import re
    import urllib.request
    index = f"{index_url.rstrip('/')}/{sdist.package}/"
    with urllib.request.urlopen(index, timeout=timeout) as r:
        page = r.read().decode("utf-8", "replace")
    links = [u for u in re.findall(r'href="([^"#]+)', page) if u.rsplit("/", 1)[-1] == sdist.filename]
    if not links:
        raise OSError(f"{index} links no {sdist.filename}")
    tmp = path.with_name(".tmp_" + path.name)
    with urllib.request.urlopen(urllib.request.urljoin(index, links[0]), timeout=timeout) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
    tmp.replace(path)


def _extract(archive: Path, root: str, cache: Path, members: list) -> None:
    wanted = [f"{root}/{m}" for m in members]
    with tarfile.open(archive, "r:gz") as tar:
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
    """Make sure the named CTs (default: all of :data:`CTS`; :data:`REAL_LESION_CTS` by name) are
    in ``cache_dir``; return name -> path.

    A path is a ``.nii.gz`` file, or for ``abdomen_dicom`` the folder of its
    DICOM series (read it with ``SimpleITK.ImageSeriesReader``); a real lesion's
    label is at :func:`label_path`.  Downloads an sdist only when a file is
    missing or its checksum is wrong.
    """
    cache = Path(cache_dir)
    known = {**CTS, **REAL_LESION_CTS}
    names = list(CTS) if names is None else list(names)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise KeyError(f"unknown CT name(s) {unknown}; known: {sorted(known)}")
    missing = [n for n in names if not _is_ready(cache, known[n])]
    for sdist in dict.fromkeys(known[n].sdist for n in missing):
        archive = download_sdist(cache, python, sdist=sdist)
        members = [m for n in missing if known[n].sdist == sdist for m in (known[n].member, known[n].label_member) if m]
        _extract(archive, sdist.root, cache, members)
    bad = [n for n in missing if not _is_ready(cache, known[n])]
    if bad:
        raise RuntimeError(f"extracted files for {bad} are missing or have a wrong checksum")
    return {n: _target(cache, known[n]) for n in names}


def label_path(cache_dir, name: str) -> Path:
    """The label image of the real lesion in the CT ``name`` of :data:`REAL_LESION_CTS` (fetched)."""
    return _target(Path(cache_dir), REAL_LESION_CTS[name], REAL_LESION_CTS[name].label_member)


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
