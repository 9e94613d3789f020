"""Checks the Slicer Extensions Index (catalogue) runs on a submission, run here offline.

Read from github:Slicer/ExtensionsIndex at commit 07f1d1b (2026-08-07): the pull-request
workflow ``.github/workflows/extension-validation.yml`` runs ``scripts/check_description_files.py``
on the submitted ``<ExtensionName>.json`` (it clones ``scm_url`` at ``scm_revision`` and checks
the clone), and ``.pre-commit-config.yaml`` lints the file (prettier with multi-line arrays,
end-of-file/trailing-whitespace/tab/line-ending hooks, check-jsonschema against
``schemas/slicer-extension-catalog-entry-schema-v1.0.2.json``, the same file as
github:Slicer/Slicer ``Schemas/``). Each test below names the check it mirrors. Network checks
(fetching the image URLs, the schema URL, the GitHub topic ``3d-slicer-extension``) cannot
run here: the URL tests check instead that each URL names a file of this repository.

Run: ``.venv/bin/python -m pytest -q Testing/test_catalogue.py``
"""
from __future__ import annotations

import json
import re
import struct
import subprocess
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
EXTENSION_NAME = "LesionLocator"
DESCRIPTION_FILE = REPO / f"{EXTENSION_NAME}.json"
CMAKELISTS = REPO / "CMakeLists.txt"
HOMEPAGE = "https://github.com/lesionlocator/SlicerLesionLocator"
RAW_PREFIX = "https://raw.githubusercontent.com/lesionlocator/SlicerLesionLocator/"
SCREENSHOT_DIR = "Resources/Screenshots"

# scripts/check_description_files.py, check_repository_size: size_limit_mb = 100, compared with
# (sum of the sizes of every file under the clone) / (1024 * 1024); its rglob('*') also walks .git
PROJECT_TREE_LIMIT_BYTES = 40 * 2**20  # the project's own target (repository hygiene)
SIZE_LIMIT_BYTES = 100 * 1024 * 1024

# The canonical Apache License 2.0 text (https://www.apache.org/licenses/LICENSE-2.0.txt,
# 11358 bytes; the same bytes as Debian's /usr/share/common-licenses/Apache-2.0)
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"

# Lesion colours of the module (LesionLocatorLogic.COLORS[0:4], RGB 0..1) as the screenshots
# were rendered with them; Testing/render_screenshots.py re-renders.
LESION_COLORS = {1: (0.902, 0.098, 0.294), 2: (0.235, 0.706, 0.294), 3: (0.263, 0.388, 0.847),
                 4: (0.961, 0.510, 0.192)}

EXPECTED_DESCRIPTION = {
    "$schema": "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
               "slicer-extension-catalog-entry-schema-v1.0.2.json#",
    "build_dependencies": ["PyTorch"],
    "build_subdirectory": ".",
    "category": "Segmentation",
    "scm_revision": "main",
    "scm_url": HOMEPAGE,
    "tier": 1,
}


# ------------------------------------------------------------------------------ helpers
def description() -> dict:
    return json.loads(DESCRIPTION_FILE.read_text(encoding="utf-8"))


def cmake_text() -> str:
    return CMAKELISTS.read_text(encoding="utf-8")


def cmake_set(name: str) -> str:
    """The value of ``set(<name> <value>)`` in the top-level CMakeLists.txt (quotes removed)."""
    found = re.findall(r"^\s*set\s*\(\s*" + name + r"\s+(\"[^\"]*\"|[^)\"]*?)\s*\)", cmake_text(), re.MULTILINE)
    assert len(found) == 1, f"{name}: expected exactly one set() in CMakeLists.txt, found {found}"
    return found[0].strip('"')


def git(*args) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def in_git():
    try:
        if git("rev-parse", "--is-inside-work-tree").strip() != "true":
            pytest.skip("not a git checkout")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (or no git)")


def repository_files() -> list:
    """What a commit of this working tree holds: tracked files plus untracked, not ignored ones."""
    names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    return sorted({n for n in names if n and (REPO / n).is_file()})


def url_to_path(url: str) -> str:
    """raw.githubusercontent.com/<owner>/<repo>/<branch>/<path> -> <path>; branch must be scm_revision."""
    assert url.startswith(RAW_PREFIX), f"{url} is not a raw.githubusercontent.com URL of {HOMEPAGE}"
    branch, _, path = url[len(RAW_PREFIX):].partition("/")
    assert branch == description()["scm_revision"], f"{url}: branch {branch!r} is not scm_revision"
    assert path and not path.startswith("/") and ".." not in path.split("/"), url
    return path


def png_info(path: Path) -> dict:
    """Parse a PNG completely: signature, chunk CRCs, IHDR, IDAT stream, IEND last."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name}: not a PNG signature"
    pos, chunks, idat = 8, [], b""
    while pos < len(data):
        assert pos + 12 <= len(data), f"{path.name}: truncated chunk at byte {pos}"
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert len(body) == length and zlib.crc32(kind + body) == crc, f"{path.name}: bad {kind!r} chunk"
        chunks.append(kind)
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND", f"{path.name}: chunks {chunks[:3]}...{chunks[-2:]}"
    ihdr = data[16:29]
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", ihdr)
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    raw = zlib.decompress(idat)
    if interlace == 0:  # each row: a filter byte and the packed samples
        assert len(raw) == height * (1 + (width * channels * depth + 7) // 8), f"{path.name}: pixel data size"
    return {"width": width, "height": height, "depth": depth, "color_type": color, "bytes": len(data)}


# ------------------------------------------------------------------------------ the description file
def test_description_file_format():
    # mirrors check_json_file_format (valid JSON, LF-only line endings) and the index's
    # pre-commit lint: prettier (2-space indent, every array on several lines, as
    # multilineArraysWrapThreshold 0 asks), end-of-file-fixer, trailing-whitespace,
    # mixed-line-ending, forbid-tabs
    raw = DESCRIPTION_FILE.read_bytes()
    assert b"\r" not in raw
    assert b"\t" not in raw
    text = raw.decode("utf-8")
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    assert all(line == line.rstrip() for line in text.splitlines())


# The rules of slicer-extension-catalog-entry-schema-v1.0.2.json, written out: property ->
# (JSON type, extra rule). "required": $schema, category, scm_url; "additionalProperties": false.
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}
SCHEMA_PROPERTIES = {
    "$schema": (str, None),
    "category": (str, None),
    "scm_url": (str, None),
    "scm_revision": (str, None),
    "scm_type": (str, lambda v: v in ("git", "local")),
    "build_dependencies": (list, lambda v: all(isinstance(item, str) for item in v)),
    "dicom_support_rule": (str, None),
    "build_subdirectory": (str, None),
    "enabled": (bool, None),
    "tier": (int, lambda v: not isinstance(v, bool) and 1 <= v <= 5),
}


def schema_errors(data) -> list:
    if not isinstance(data, dict):
        return ["not an object"]
    errors = [f"missing required {key}" for key in sorted(SCHEMA_REQUIRED - data.keys())]
    errors += [f"additional property {key}" for key in sorted(data.keys() - SCHEMA_PROPERTIES.keys())]
    for key, value in data.items():
        if key in SCHEMA_PROPERTIES:
            kind, rule = SCHEMA_PROPERTIES[key]
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                errors.append(f"{key}: {type(value).__name__} is not {kind.__name__}")
            elif rule is not None and not rule(value):
                errors.append(f"{key}: {value!r} breaks the schema rule")
    return errors


def test_description_file_schema():
    # mirrors check_json_schema (jsonschema.validate against the schema its $schema URL names)
    # and the pre-commit check-jsonschema hook (local copy of schema v1.0.2)
    data = description()
    assert schema_errors(data) == []
    assert data["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/")
    assert data == EXPECTED_DESCRIPTION


def test_schema_rules_can_fail():
    # the hand-written schema rules reject what jsonschema would reject
    good = dict(EXPECTED_DESCRIPTION)
    assert schema_errors(good) == []
    assert schema_errors({k: v for k, v in good.items() if k != "scm_url"}) == ["missing required scm_url"]
    assert schema_errors({**good, "homepage": HOMEPAGE}) == ["additional property homepage"]
    assert schema_errors({**good, "tier": 6}) == ["tier: 6 breaks the schema rule"]
    assert schema_errors({**good, "tier": "1"}) == ["tier: str is not int"]
    assert schema_errors({**good, "build_dependencies": "PyTorch"}) == ["build_dependencies: str is not list"]
    assert schema_errors({**good, "scm_type": "svn"}) == ["scm_type: 'svn' breaks the schema rule"]
    assert schema_errors({**good, "enabled": 1}) == ["enabled: int is not bool"]


def test_extension_name():
    # mirrors check_extension_name (the name must not start with "Slicer") and the project()
    # part of check_cmakelists_content (project name == description file name)
    assert DESCRIPTION_FILE.stem == EXTENSION_NAME
    assert not EXTENSION_NAME.lower().startswith("slicer")
    projects = re.findall(r"^\s*project\s*\(\s*([^\s)]+)", cmake_text(), re.IGNORECASE | re.MULTILINE)
    assert projects == [EXTENSION_NAME]


def test_category():
    # mirrors check_category: "Segmentation" is in its ACCEPTED_EXTENSION_CATEGORIES; the PR
    # checklist asks the json to agree with the top-level CMakeLists.txt
    assert description()["category"] == "Segmentation"
    assert cmake_set("EXTENSION_CATEGORY") == "Segmentation"


def test_scm_url():
    # mirrors check_scm_url_syntax (scheme://host/path, scheme git or https),
    # check_git_repository_name (repository name starts with "Slicer"), and the PR checklist
    # (scm url and revision correct, json consistent with CMakeLists.txt: EXTENSION_HOMEPAGE)
    data = description()
    url = data["scm_url"]
    assert "://" in url and urlsplit(url).scheme in ("git", "https")
    repo_name = Path(urlsplit(url.strip().strip("/")).path).stem
    assert repo_name == "SlicerLesionLocator" and repo_name.startswith("Slicer")
    assert urlsplit(url).netloc == "github.com"  # GitHub: the topic check (network) applies
    assert url == cmake_set("EXTENSION_HOMEPAGE") == HOMEPAGE
    assert data["scm_revision"] == "main"


def test_build_dependencies_match_cmakelists():
    # mirrors check_dependencies (every build dependency is an extension of the index: PyTorch.json
    # is there) and the PR checklist item "json consistent with CMakeLists.txt (dependencies)"
    deps = description()["build_dependencies"]
    assert deps == ["PyTorch"]
    assert cmake_set("EXTENSION_DEPENDS").split() == deps


# ------------------------------------------------------------------------------ icon and screenshots
def test_cmakelists_image_urls_parse_like_the_index():
    # mirrors check_cmakelists_content: its regular expressions for EXTENSION_ICONURL (one quoted
    # URL) and EXTENSION_SCREENSHOTURLS (quoted, space-separated, closing parenthesis right after
    # the quote), and validate_image_url's "starts with http" and image file extension
    text = cmake_text()
    icons = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', text, re.IGNORECASE | re.MULTILINE)
    shots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', text, re.IGNORECASE | re.MULTILINE)
    assert icons == [RAW_PREFIX + "main/LesionLocator.png"]
    assert len(shots) == 1
    assert shots[0].split() == [RAW_PREFIX + f"main/{SCREENSHOT_DIR}/segment.png",
                                RAW_PREFIX + f"main/{SCREENSHOT_DIR}/track.png"]
    for url in [icons[0], *shots[0].split()]:
        assert url.startswith("http") and url.lower().endswith((".png", ".jpg", ".jpeg", ".gif"))


def test_image_urls_name_files_of_this_repository(in_git):
    # the offline stand-in for validate_image_url's download: each URL, prefix and branch
    # stripped, is a file that a commit of this tree holds (tracked, or new and not git-ignored),
    # and the screenshot URLs name exactly the files in Resources/Screenshots
    files = set(repository_files())
    icon = url_to_path(cmake_set("EXTENSION_ICONURL"))
    shots = [url_to_path(u) for u in cmake_set("EXTENSION_SCREENSHOTURLS").split()]
    assert icon == "LesionLocator.png"
    for path in [icon, *shots]:
        assert path in files, f"{path} (named in CMakeLists.txt) is not a file of the repository"
    in_folder = sorted(f for f in files if f.startswith(SCREENSHOT_DIR + "/"))
    assert sorted(shots) == in_folder == [f"{SCREENSHOT_DIR}/segment.png", f"{SCREENSHOT_DIR}/track.png"]


def test_icon_is_a_128_px_png():
    # mirrors validate_image_url on EXTENSION_ICONURL (Content-Type image/png) plus Slicer's
    # icon convention (128 x 128)
    info = png_info(REPO / url_to_path(cmake_set("EXTENSION_ICONURL")))
    assert (info["width"], info["height"]) == (128, 128)


@pytest.mark.parametrize("name, lesions", [("segment.png", (1, 2, 3, 4)), ("track.png", (3, 4))])
def test_screenshot_is_a_sensible_png(name, lesions):
    # mirrors validate_image_url on each EXTENSION_SCREENSHOTURLS entry (a real image), plus size
    # limits for the catalogue page and a look at the content: a grey CT with the lesion outlines
    # in the module's colours
    path = REPO / SCREENSHOT_DIR / name
    info = png_info(path)
    assert 600 <= info["width"] <= 1920 and 400 <= info["height"] <= 1200, info
    assert 20_000 <= info["bytes"] <= 500_000, info
    Image = pytest.importorskip("PIL.Image")
    import numpy as np

    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    grey = (rgb.max(axis=-1) - rgb.min(axis=-1)) < 8
    assert grey.mean() > 0.85, "mostly a grey CT slice"
    assert rgb[grey].std() > 30, "not blank"
    for lesionId, colour in LESION_COLORS.items():
        exact = (rgb == np.round(np.array(colour) * 255).astype(int)).all(axis=-1).sum()
        if lesionId in lesions:
            assert exact >= 100, f"lesion {lesionId} outline colour: {exact} pixels"
        else:
            assert exact == 0, f"lesion {lesionId} should not be in {name}"


# ------------------------------------------------------------------------------ licence and size
def test_license_file():
    # mirrors check_license_file (one of LICENSE, LICENCE, License.txt, ... at the repository
    # root) and the PR checklist (licence named on the homepage): the unmodified Apache 2.0 text
    import hashlib

    candidates = [n for n in ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING",
                              "COPYING.txt") if (REPO / n).is_file()]
    assert candidates == ["LICENSE"]
    text = (REPO / "LICENSE").read_bytes()
    assert hashlib.sha256(text).hexdigest() == APACHE_2_SHA256
    assert b"Apache License\n                           Version 2.0, January 2004" in text
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()
    assert "Apache-2.0" in (REPO / "README.md").read_text()


def test_checked_out_size_under_limit(in_git):
    # mirrors check_repository_size, the working-tree part: the files a clone checks out
    total = sum((REPO / f).stat().st_size for f in repository_files())
    assert total <= PROJECT_TREE_LIMIT_BYTES, f"tracked tree {total / 2**20:.1f} MiB > the project's 40 MiB"
    assert total <= SIZE_LIMIT_BYTES, (
        f"checked-out files {total / 2**20:.1f} MiB > 100 MiB catalogue limit; largest: "
        + ", ".join(f"{f} {(REPO / f).stat().st_size / 2**20:.1f} MiB" for f in
                    sorted(repository_files(), key=lambda f: -(REPO / f).stat().st_size)[:3]))


# Not checked here: check_repository_size walks the whole clone, .git included, and this repository's
# history still holds the training checkpoints removed from the tree on 2026-12-05 (about 134 MiB).
# Publishing to the catalogue needs a repository without them (a fresh history of today's tree, or
# `git filter-repo --path Testing/demo_build_state --invert-paths`); CI cannot rewrite history.
