"""Input integrity and writes that cannot lie (issue 23, items 3 and 4).

Every bad file here is a real one: written by SimpleITK, then cut, bit-flipped or given a broken
header field. Every case checks the exception type, a message fragment and that nothing partial
is left behind (no ``.tmp_*`` file, no final file, an existing target unchanged).
"""
import errno
import gzip
import os
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LesionLocatorLib.files import WriteError, atomic_output, atomic_write_text
from LesionLocatorLib.image import (Image, ImageError, ImageHeader, check_finite, check_fits_in_memory,
                                    read_image, read_image_header, write_image)

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (12, 20, 16)                      # (z, y, x)
SPACING, ORIGIN = (0.8, 0.9, 2.5), (10.0, -20.0, 30.0)
VOXEL_BYTES = int(np.prod(SHAPE)) * 2     # int16


def _array(dtype=np.int16, seed=0):
    return np.random.default_rng(seed).integers(-1000, 1000, SHAPE).astype(dtype)


def _write(path, array=None, compress=True, spacing=SPACING, origin=ORIGIN) -> Path:
    img = sitk.GetImageFromArray(_array() if array is None else array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path), compress)
    return Path(path)


def _leftovers(folder) -> list:
    return sorted(p.name for p in Path(folder).rglob(".tmp_*"))


def _refused(path, fragment, readers=(read_image_header, read_image), exc=ImageError):
    """Each reader raises ``exc`` with ``fragment`` (a regex) and the file's name in one line."""
    for reader in readers:
        with pytest.raises(exc, match=fragment) as info:
            reader(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value), str(info.value)


# ------------------------------------------------------------------------------------ good files
@pytest.mark.parametrize("name, compress", [("a.nii.gz", True), ("a.nii", False), ("a.nrrd", False),
                                            ("a.nrrd", True), ("a.mha", False), ("a.mha", True),
                                            ("a.nhdr", True), ("a.mhd", False)])
def test_valid_files_read_with_their_header(tmp_path, name, compress):
    path = _write(tmp_path / name, compress=compress)
    header = read_image_header(path)
    assert isinstance(header, ImageHeader)
    assert header.size == SHAPE[::-1] and header.shape == SHAPE
    assert np.allclose(header.spacing, SPACING) and np.allclose(header.origin, ORIGIN)
    assert np.allclose(header.direction_matrix, np.eye(3))
    assert header.pixel_type == "16-bit signed integer" and header.components == 1 and header.nbytes == VOXEL_BYTES
    image = read_image(path)
    assert np.array_equal(image.array, _array())
    assert not header.geometry_differences(image)


def test_single_volume_4d_multi_member_and_trailing_bytes_are_accepted(tmp_path):
    img = sitk.JoinSeries([sitk.GetImageFromArray(_array())])  # 4D, one volume
    sitk.WriteImage(img, str(tmp_path / "4d.nii.gz"))
    assert read_image_header(tmp_path / "4d.nii.gz").size == SHAPE[::-1]
    assert np.array_equal(read_image(tmp_path / "4d.nii.gz").array, _array())
    raw = _write(tmp_path / "a.nii", compress=False).read_bytes()
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    (tmp_path / "padded.nii.gz").write_bytes(gzip.compress(raw) + bytes(64))
    for name in ("members.nii.gz", "padded.nii.gz"):
        assert np.array_equal(read_image(tmp_path / name).array, _array())


def test_scaled_nifti_is_read_and_its_checksum_verified(tmp_path):
    """scl_slope/scl_inter make SimpleITK return floats; the CRC is checked on the stored ints."""
    raw = bytearray(_write(tmp_path / "a.nii", compress=False).read_bytes())
    struct.pack_into("<2f", raw, 112, 2.0, -1024.0)
    (tmp_path / "s.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    image = read_image(tmp_path / "s.nii.gz")
    assert image.array.dtype == np.float32 and np.array_equal(image.array, _array() * 2.0 - 1024)
    data = bytearray((tmp_path / "s.nii.gz").read_bytes())
    data[len(data) // 2] ^= 0x40
    (tmp_path / "s.nii.gz").write_bytes(data)
    _refused(tmp_path / "s.nii.gz", r"truncated or corrupt", readers=(read_image,))


# ------------------------------------------------------------------------ truncated and corrupt
@pytest.mark.parametrize("name, compress", [("a.nii.gz", True), ("a.nii", False), ("a.nrrd", False),
                                            ("a.nrrd", True), ("a.mha", False)])
@pytest.mark.parametrize("keep", [0.999, 0.9, 0.5, 0.1])
def test_truncated_files_are_refused(tmp_path, name, compress, keep):
    path = _write(tmp_path / name, compress=compress)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    _refused(path, rf"truncated or corrupt \(expected {VOXEL_BYTES} bytes of voxels, found \d+")


@pytest.mark.parametrize("cut", [8, 4, 1])
def test_nii_gz_without_its_trailer_is_refused(tmp_path, cut):
    path = _write(tmp_path / "a.nii.gz")
    path.write_bytes(path.read_bytes()[:-cut])
    _refused(path, rf"truncated or corrupt \(expected {VOXEL_BYTES} bytes of voxels, found {VOXEL_BYTES}; "
                   r"the compressed data ends early\)")


def test_nii_gz_cut_inside_its_header_is_refused(tmp_path):
    path = _write(tmp_path / "a.nii.gz")
    path.write_bytes(path.read_bytes()[:40])
    _refused(path, r"truncated or corrupt \(the compressed data ends early\)")


def test_truncated_compressed_mha_and_detached_data_are_refused(tmp_path):
    path = _write(tmp_path / "a.mha", compress=True)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 500])
    _refused(path, r"truncated or corrupt \(expected \d+ bytes of compressed voxels, found \d+\)")
    header = _write(tmp_path / "b.nhdr", compress=False)
    raw = tmp_path / "b.raw"
    raw.write_bytes(raw.read_bytes()[:1000])
    _refused(header, rf"its data file b.raw: truncated or corrupt \(expected {VOXEL_BYTES} bytes of voxels, "
                     r"found 1000\)")
    raw.unlink()
    _refused(header, r"cannot read image .*b.nhdr: .*couldn't open .*b.raw")


@pytest.mark.parametrize("name", ["a.nii.gz", "a.nrrd", "a.mha"])
@pytest.mark.parametrize("where", [0.5, 0.9, -3])  # in the deflate data; in the gzip ISIZE / zlib Adler-32
def test_corrupt_compressed_voxels_are_refused(tmp_path, name, where):
    """A flipped bit: SimpleITK reads such files silently as garbage; read_image checks the CRC."""
    array = np.random.default_rng(1).integers(-1000, 1000, (40, 64, 64)).astype(np.int16)  # beyond zlib's buffers
    path = _write(tmp_path / name, array)
    data = bytearray(path.read_bytes())
    data[int(len(data) * where) if where > 0 else len(data) + where] ^= 0x10
    path.write_bytes(data)
    _refused(path, r"truncated or corrupt .*(incorrect (data|length) check|invalid|ends early)", readers=(read_image,))


@pytest.mark.parametrize("content, fragment", [
    (b"not an image at all" * 40, r"cannot read image .*: Unable to determine ImageIO reader"),
    (b"\x1f\x8b\x08\x00" + bytes(np.random.default_rng(2).integers(0, 256, 4000, dtype=np.uint8)),
     r"truncated or corrupt \(invalid compressed data"),
    (bytes(np.random.default_rng(3).integers(0, 256, 4000, dtype=np.uint8)), r"cannot read image"),
])
def test_random_bytes_named_nii_gz_are_refused(tmp_path, content, fragment):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(content)
    _refused(path, fragment)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found: .*nothing.nii.gz"):
        read_image_header(tmp_path / "nothing.nii.gz")
    with pytest.raises(FileNotFoundError, match="image file not found"):
        read_image(tmp_path / "nothing.nii.gz")
    (tmp_path / "dir.nii.gz").mkdir()
    _refused(tmp_path / "dir.nii.gz", r"not an image file \(a folder with no DICOM files\)")


# ------------------------------------------------------------------------------ NaN/Inf voxels
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["a.nii.gz", "a.nii", "a.nrrd", "a.mha"])
def test_nan_and_inf_voxels_are_refused_with_their_count(tmp_path, dtype, name):
    """SimpleITK's NIfTI reader turns NaN/Inf into 0 silently: they are counted in the file itself."""
    array = _array(dtype)
    array[1, 2, 3] = np.nan
    array[5, 0, 0] = np.inf
    array[11, 19, 15] = -np.inf
    array[7, 7, 7] = np.nan
    path = _write(tmp_path / name, array)
    assert read_image_header(path).pixel_type.endswith("float")  # the header alone says nothing about voxels
    _refused(path, r"4 voxel\(s\) are not finite \(2 NaN, 2 infinite\), the first at \(z, y, x\) = \(1, 2, 3\)",
             readers=(read_image,))


def test_check_finite_on_arrays_and_integer_images():
    check_finite(Image(_array()))                     # integers: nothing to check
    check_finite(np.zeros((3, 3, 3), np.float32))
    a = np.zeros((3, 4, 5), np.float32)
    a[2, 3, 4] = np.inf
    with pytest.raises(ImageError, match=r"^scan.nii: 1 voxel\(s\) are not finite \(0 NaN, 1 infinite\), the first "
                                         r"at \(z, y, x\) = \(2, 3, 4\)$"):
        check_finite(a, "scan.nii")


# ----------------------------------------------------------------------------- broken geometry
def _nifti_with(tmp_path, name="g.nii.gz", **fields) -> Path:
    """A real NIfTI-1 file whose header fields (float offsets in the 348-byte header) are changed."""
    raw = bytearray(_write(tmp_path / "base.nii", compress=False).read_bytes())
    offsets = {"pixdim1": 80, "pixdim2": 84, "pixdim3": 88, "qoffset_x": 268}
    for key, value in fields.items():
        if key == "sform":
            struct.pack_into("<2h", raw, 252, 0, 1)        # qform_code 0, sform_code 1
            struct.pack_into("<12f", raw, 280, *value)
        elif key == "codes":
            struct.pack_into("<2h", raw, 252, *value)
        elif key == "dims":
            struct.pack_into("<4h", raw, 40, 3, *value)
        else:
            struct.pack_into("<f", raw, offsets[key], value)
    path = tmp_path / name
    path.write_bytes(gzip.compress(bytes(raw)) if name.endswith(".gz") else bytes(raw))
    return path


def _mha_with(tmp_path, key: str, value: str) -> Path:
    """A real MetaImage file with the header line ``key = ...`` replaced."""
    path = _write(tmp_path / "g.mha", compress=False)
    data = path.read_bytes()
    cut = data.index(b"ElementDataFile")
    header, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", data[:cut].decode())
    assert n == 1, header
    path.write_bytes(header.encode() + data[cut:])
    return path


def _nrrd_with(tmp_path, old: bytes, new: bytes) -> Path:
    path = _write(tmp_path / "g.nrrd", compress=False, spacing=(1.0, 2.0, 3.0), origin=(1.0, 2.0, 3.0))
    data = path.read_bytes()
    assert old in data, data[:400]
    path.write_bytes(data.replace(old, new, 1))
    return path


NAN, INF = float("nan"), float("inf")
SINGULAR_SFORM = [-0.8, 0, 0, 10, 0, -0.9, 0, -20, 0, 0, 0, 30]


@pytest.mark.parametrize("make, fragment", [
    (lambda t: _nifti_with(t, pixdim1=NAN), r"spacing is not finite: \(nan, 0.9, 2.5\) mm \(NIfTI pixdim\)"),
    (lambda t: _nifti_with(t, pixdim1=INF), r"spacing is not finite: \(inf, 0.9, 2.5\) mm"),
    (lambda t: _nifti_with(t, pixdim1=0.0), r"spacing must be positive, got \(0, 0.9, 2.5\) mm"),
    (lambda t: _nifti_with(t, pixdim1=-0.8), r"spacing must be positive, got \(-0.8, 0.9, 2.5\) mm"),
    (lambda t: _mha_with(t, "ElementSpacing", "nan 0.9 2.5"),
     r"spacing is not finite \(MetaImage elementspacing: nan 0.9 2.5\)"),
    (lambda t: _mha_with(t, "ElementSpacing", "0.8 inf 2.5"), r"spacing is not finite"),
    (lambda t: _mha_with(t, "ElementSpacing", "0 0.9 2.5"), r"spacing must be positive, got \(0, 0.9, 2.5\) mm"),
    (lambda t: _mha_with(t, "ElementSpacing", "-2 0.9 2.5"),
     r"spacing must be positive, got \(-2, 0.9, 2.5\) mm"),
    (lambda t: _nifti_with(t, codes=(1, 0), qoffset_x=NAN),  # NIfTI stores RAS: (-x, -y, z)
     r"origin is not finite: \(nan, 20, 30\) mm \(NIfTI qoffset\)"),
    (lambda t: _nifti_with(t, sform=[-0.8, 0, 0, NAN, 0, -0.9, 0, -20, 0, 0, 2.5, 30]),
     r"origin is not finite: \(nan, -20, 30\) mm \(NIfTI srow\)"),
    (lambda t: _mha_with(t, "Offset", "nan -20 30"), r"origin is not finite \(MetaImage offset: nan -20 30\)"),
    (lambda t: _nrrd_with(t, b"space origin: (1,2,3)", b"space origin: (nan,2,3)"),
     r"origin is not finite \(NRRD space origin: \(nan,2,3\)\)"),
    (lambda t: _nifti_with(t, sform=SINGULAR_SFORM),
     r"singular direction matrix \(\(-0.8, 0, 0\), \(0, -0.9, 0\), \(0, 0, 0\)\) \(columns = index axes i, j, k; "
     r"\|det\| = 0\): its axes do not span 3D space \(NIfTI sform, spacing included\)"),
    (lambda t: _mha_with(t, "TransformMatrix", "1 0 0 0 1 0 0 0 0"),
     r"singular direction matrix \(\(1, 0, 0\), \(0, 1, 0\), \(0, 0, 0\)\)"),
    (lambda t: _mha_with(t, "TransformMatrix", "1 0 0 1 0 0 0 0 1"),
     r"singular direction matrix \(\(1, 1, 0\), \(0, 0, 0\), \(0, 0, 1\)\)"),
    (lambda t: _mha_with(t, "TransformMatrix", "nan 0 0 0 1 0 0 0 1"),
     r"direction matrix is not finite \(MetaImage transformmatrix: nan 0 0"),
    (lambda t: _nrrd_with(t, b"space directions: (1,0,0) (0,2,0) (0,0,3)",
                          b"space directions: (1,0,0) (2,0,0) (0,0,3)"),
     r"singular direction matrix \(\(1, 1, 0\), \(0, 0, 0\), \(0, 0, 1\)\)"),
    (lambda t: _nrrd_with(t, b"space directions: (1,0,0)", b"space directions: (nan,0,0)"),
     r"direction matrix is not finite \(NRRD space directions: \(nan,0,0\)"),
], ids=["nii-nan-spacing", "nii-inf-spacing", "nii-zero-spacing", "nii-negative-spacing", "mha-nan-spacing",
        "mha-inf-spacing", "mha-zero-spacing", "mha-negative-spacing", "nii-nan-qoffset", "nii-nan-srow-origin",
        "mha-nan-origin", "nrrd-nan-origin", "nii-singular-sform", "mha-singular", "mha-two-equal-axes",
        "mha-nan-direction", "nrrd-two-equal-axes", "nrrd-nan-direction"])
def test_broken_geometry_is_refused(tmp_path, make, fragment):
    _refused(make(tmp_path), fragment)


@pytest.mark.parametrize("make, fragment", [
    (lambda t: _nifti_with(t, pixdim1=1e6),
     r"implausible voxel spacing \(1e\+06, 0.9, 2.5\) mm \(the image would measure \(1.6e\+07, 18, 30\) mm\): voxels "
     r"larger than 100 mm mean a broken header"),
    (lambda t: _write(t / "long.nii.gz", np.zeros((4, 4, 60), np.int16), spacing=(90.0, 1.0, 1.0)),
     r"implausible physical size \(5400, 4, 4\) mm \(\(60, 4, 4\) voxels of \(90, 1, 1\) mm\): no axis of a real "
     r"scan is longer than 5 m"),
    (lambda t: _nifti_with(t, "huge.nii", dims=(30000, 30000, 30000), pixdim1=0.1, pixdim2=0.1, pixdim3=0.1),
     r"30000 x 30000 x 30000 voxels of 2 byte\(s\) need 49.1 TiB, more than this machine's memory"),
], ids=["spacing-1e6", "5.4-m-axis", "49-TiB"])
def test_absurd_size_is_refused_naming_spacing_and_size(tmp_path, make, fragment):
    _refused(make(tmp_path), fragment)


def test_2d_multi_volume_and_multi_component_images_are_refused(tmp_path):
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(tmp_path / "2d.nii.gz"))
    _refused(tmp_path / "2d.nii.gz", r"expected a 3D image, got 2D with size \(8, 8\)")
    sitk.WriteImage(sitk.Image([4, 4, 4, 3], sitk.sitkInt16), str(tmp_path / "4d.nii.gz"))
    _refused(tmp_path / "4d.nii.gz", r"expected a 3D image, got 4D with size \(4, 4, 4, 3\)")
    for name in ("rgb.nii.gz", "vec.nrrd", "vec.mha"):
        sitk.WriteImage(sitk.Image([6, 5, 4], sitk.sitkVectorFloat32, 3), str(tmp_path / name))
        _refused(tmp_path / name, r"expected a scalar image \(one value per voxel\), got 3 components per voxel")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(spacing=(NAN, 1, 1)), r"^spacing is not finite: \(nan, 1, 1\) mm$"),
    (dict(spacing=(1, INF, 1)), r"^spacing is not finite"),
    (dict(spacing=(1, 0, 1)), r"^spacing must be positive, got \(1, 0, 1\) mm$"),
    (dict(spacing=(1, 1, -1)), r"^spacing must be positive"),
    (dict(origin=(0, NAN, 0)), r"^origin is not finite: \(0, nan, 0\) mm$"),
    (dict(direction=[[1, 0, 0], [0, 1, 0], [0, 0, NAN]]), r"^direction matrix is not finite"),
    (dict(direction=[[1, 1, 0], [0, 0, 0], [0, 0, 1]]), r"^singular direction matrix \(\(1, 1, 0\), \(0, 0, 0\), "),
    (dict(direction=[[1, 0.9999999, 0], [0, 1e-7, 0], [0, 0, 1]]), r"^singular direction matrix"),
])
def test_image_objects_check_their_geometry(kwargs, fragment):
    with pytest.raises(ImageError, match=fragment):
        Image(np.zeros((2, 3, 4), np.int16), **kwargs)


def test_image_objects_have_no_size_limits_but_files_do(tmp_path):
    Image(np.zeros((2, 3, 4)), spacing=(1e6, 1, 1))  # internal grids (e.g. coarse registration grids) are allowed
    with pytest.raises(ImageError, match=r"^x.nii: 1073741824 x 1073741824 x 8 voxels of 1 byte\(s\) need "
                                         r"8192.0 PiB, more than this machine's memory \("):
        check_fits_in_memory((2 ** 30, 2 ** 30, 8), 1, "x.nii")


# ------------------------------------------------------------------------------------- writes
@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 KiB file system (tmpfs; needs root, as in CI)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a 64 KiB tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if r.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {r.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)


def _big_image():
    return Image(np.random.default_rng(4).integers(-30000, 30000, (32, 64, 64)).astype(np.int16))  # 256 KiB


def _write_npz(path):
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, p=np.random.default_rng(5).random(40000))


@pytest.mark.parametrize("name, write", [
    ("big.nii.gz", lambda p: write_image(_big_image(), p)),
    ("big.nii", lambda p: write_image(_big_image(), p, compress=False)),
    ("big.nrrd", lambda p: write_image(_big_image(), p)),
    ("big.mha", lambda p: write_image(_big_image(), p)),
    ("big.json", lambda p: atomic_write_text(p, "x" * 200_000)),
    ("big.npz", _write_npz),
])
@pytest.mark.parametrize("existing", [False, True])
def test_disk_full_leaves_no_file_and_says_so(tiny_disk, name, write, existing):
    target = tiny_disk / name
    before = None
    if existing:
        if name.endswith(("json",)):
            atomic_write_text(target, "{}")
        elif name.endswith("npz"):
            target.write_bytes(b"old")
        else:
            write_image(Image(np.zeros((2, 2, 2), np.int16)), target)
        before = target.read_bytes()
    full = rf"^disk full: cannot write {re.escape(str(target))} \(no space left on device"
    with pytest.raises(WriteError, match=full) as info:
        write(target)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert (target.read_bytes() == before) if existing else not target.exists()
    assert _leftovers(tiny_disk) == []
    assert sorted(p.name for p in tiny_disk.iterdir()) == ([name] if existing else [])


def test_small_writes_still_fit_on_the_tiny_disk(tiny_disk):
    image = Image(np.zeros((8, 8, 8), np.int16), spacing=SPACING, origin=ORIGIN)
    assert read_image(write_image(image, tiny_disk / "small.nii.gz")).same_geometry(image)
    assert _leftovers(tiny_disk) == []


def test_read_only_file_system_fails_cleanly(tiny_disk):
    """A write that fails without a full disk: the file system became read-only (root ignores
    folder permissions, so this remounts the tmpfs)."""
    atomic_write_text(tiny_disk / "old.json", "{}")
    r = subprocess.run(["mount", "-o", "remount,ro", str(tiny_disk)], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
    for target in (tiny_disk / "new.nii.gz", tiny_disk / "old.json"):
        with pytest.raises(WriteError, match=rf"^cannot write {re.escape(str(target))}: Read-only file system$"):
            write_image(Image(np.zeros((2, 2, 2), np.int16)), target) if target.suffix == ".gz" else \
                atomic_write_text(target, "new")
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["old.json"]
    assert (tiny_disk / "old.json").read_text() == "{}"


def test_output_under_a_file_fails_cleanly(tmp_path):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "sub" / "a.nii.gz"
    with pytest.raises(WriteError, match=rf"^cannot write {re.escape(str(target))}: {re.escape(str(tmp_path))}/afile "
                                         r"is a file, not a folder$"):
        write_image(Image(np.zeros((2, 2, 2), np.int16)), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_failed_verification_leaves_no_file(tmp_path):
    target = tmp_path / "out" / "a.txt"

    def refuse(tmp):
        raise ValueError(f"{tmp} looks wrong")

    for existing in (False, True):
        if existing:
            atomic_write_text(target, "old")
        failed = rf"^cannot write {re.escape(str(target))}: the written file looks wrong$"
        with pytest.raises(WriteError, match=failed) as info:
            with atomic_output(target, verify=refuse) as tmp:
                tmp.write_text("new")
        assert info.value.errno == errno.EIO
        assert (target.read_text() == "old") if existing else not target.exists()
        assert _leftovers(tmp_path) == []


def test_write_image_refuses_a_geometry_the_format_cannot_hold(tmp_path):
    """NIfTI coerces a sheared direction to an orthogonal one: the read-back check catches it."""
    sheared = np.array([[1, 0.5, 0], [0, 1, 0], [0, 0, 1.0]])
    image = Image(np.zeros((4, 5, 6), np.int16), direction=sheared / np.linalg.norm(sheared, axis=0))
    target = tmp_path / "s.nii.gz"
    with pytest.raises(WriteError, match=rf"^cannot write {re.escape(str(target))}: the file read back has direction "):
        write_image(image, tmp_path / "s.nii.gz")
    assert not (tmp_path / "s.nii.gz").exists() and _leftovers(tmp_path) == []
    assert read_image(write_image(image, tmp_path / "s.nrrd")).same_geometry(image)  # NRRD keeps it


@pytest.mark.parametrize("body, exc, fragment", [
    (lambda tmp: None, WriteError, r"the written file is empty"),
    (lambda tmp: tmp.unlink(), WriteError, r"the writer left no file"),
    (lambda tmp: (tmp.write_text("x"), _raise(RuntimeError("writer crashed"))), RuntimeError, r"writer crashed"),
    (lambda tmp: (tmp.write_text("x"), _raise(KeyboardInterrupt())), KeyboardInterrupt, None),
    (lambda tmp: (tmp.write_text("x"), _raise(SystemExit(143))), SystemExit, r"143"),
], ids=["empty", "no-file", "writer-error", "ctrl-c", "sigterm-exit"])
def test_failed_writes_leave_nothing(tmp_path, body, exc, fragment):
    target = tmp_path / "a.bin"
    with pytest.raises(exc, match=fragment):
        with atomic_output(target) as tmp:
            body(tmp)
    assert not target.exists() and _leftovers(tmp_path) == []


def _raise(e):
    raise e


def test_rename_onto_a_folder_fails_cleanly(tmp_path):
    (tmp_path / "a.nii.gz").mkdir()
    (tmp_path / "a.nii.gz" / "keep").write_text("x")
    with pytest.raises(WriteError, match=rf"^cannot write {re.escape(str(tmp_path / 'a.nii.gz'))}: Is a directory$"):
        write_image(Image(np.zeros((2, 2, 2), np.int16)), tmp_path / "a.nii.gz")
    assert _leftovers(tmp_path) == []


def test_text_writes_and_detached_formats(tmp_path):
    assert atomic_write_text(tmp_path / "e.txt", "").read_text() == ""
    assert atomic_write_text(tmp_path / "u.txt", "héllo\r\n").read_bytes() == "héllo\r\n".encode()
    with pytest.raises(ImageError, match=r"cannot write this format atomically .* use .nii.gz"):
        write_image(Image(np.zeros((2, 2, 2), np.int16)), tmp_path / "a.mhd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.txt", "u.txt"]


# ----------------------------------------------------------------------------------- SIGTERM
WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, {root!r})
    from LesionLocatorLib.files import install_termination_handler
    from LesionLocatorLib.image import Image, write_image
    if sys.argv[2] == "handler":
        assert install_termination_handler()
    image = Image(np.random.default_rng(0).integers(-1000, 1000, (48, 256, 256)).astype(np.int16))
    out = Path(sys.argv[1])
    write_image(image, out / "first.nii.gz")
    print("ready", flush=True)
    while True:
        write_image(image, out / "scan.nii.gz")
""")


def _terminate_writer(script: Path, out: Path, delay: float, mode: str):
    """Start the writer, SIGTERM it ``delay`` s into its write loop; (return code, stderr, temp files
    present just before the signal)."""
    out.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(out), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(delay)
        during = _leftovers(out)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, during


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is POSIX")
def test_sigterm_during_writes_leaves_no_temporary_file(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT)))
    # positive control: without the handler SIGTERM kills the writer mid-write and leaves its temp file
    for attempt in range(3):
        rc, err, during = _terminate_writer(script, tmp_path / f"control{attempt}", 0.2, "default")
        assert rc == -signal.SIGTERM, err
        if _leftovers(tmp_path / f"control{attempt}"):
            break
    else:
        pytest.fail("the writer never had a temporary file when killed: the test does not hit a write")
    interrupted = 0
    for delay in (0.0, 0.13, 0.31, 0.57):
        out = tmp_path / f"out{delay}"
        rc, err, during = _terminate_writer(script, out, delay, "handler")
        interrupted += bool(during)
        assert rc == 143 and "Traceback" not in err, err
        assert _leftovers(out) == [], delay
        if (out / "scan.nii.gz").exists():  # a completed earlier write: whole and valid
            read_image(out / "scan.nii.gz")
    assert interrupted >= 2  # most signals arrived while a temporary file existed


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM is POSIX")
def test_sigterm_inside_the_rename_step_is_deferred_to_its_end(tmp_path):
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from LesionLocatorLib import files
        files.install_termination_handler()
        try:
            with files._uninterrupted():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(1000):
                    pass
                print("step finished", flush=True)
        except SystemExit as e:
            print("then exit", e.code, flush=True)
            raise
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.split("\n")[:2] == ["step finished", "then exit 143"] and r.returncode == 143, r


def test_termination_handler_is_installed_only_from_the_main_thread():
    import threading

    from LesionLocatorLib.files import install_termination_handler
    before, result = signal.getsignal(signal.SIGTERM), []
    thread = threading.Thread(target=lambda: result.append(install_termination_handler()))
    thread.start()
    thread.join()
    assert result == [False] and signal.getsignal(signal.SIGTERM) is before
