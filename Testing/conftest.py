"""Shared pytest fixtures: tiny random-weight models in the official layout, phantoms, a real
``lesionlocator serve`` subprocess (``server``, ``own_server``)."""
import sys
import warnings
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import serve_process  # noqa: E402
from build_test_models import build_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory) -> Path:
    """A tiny model root (point + box, fold 0, nnU-Net's scipy resampling)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_torch_model_root(tmp_path_factory) -> Path:
    """The same tiny model with the torch (trilinear) resampling plans."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_torch"), resampling="resample_torch_fornnunet")


@pytest.fixture(scope="session")
def tiny_two_fold_root(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny2"), folds=(0, 1))


@pytest.fixture(autouse=True)
def _quiet_ct_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the network found no lesion")
        yield


@pytest.fixture(scope="session")
def totalsegmentator_dicom():
    """TotalSegmentator 2.18.0's real DICOM CT test series (Testing/registry_ct.py: 20 JPEG 2000
    slices, 512x512), cached in $LESIONLOCATOR_TEST_CACHE or ~/.cache/lesionlocator/test-data
    (downloaded once from PyPI, 38 MB)."""
    import os
    import subprocess

    from registry_ct import fetch_registry_cts

    cache = Path(os.environ.get("LESIONLOCATOR_TEST_CACHE") or Path.home() / ".cache" / "lesionlocator" / "test-data")
    try:
        return fetch_registry_cts(cache, ["abdomen_dicom"])["abdomen_dicom"]
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        pytest.skip(f"TotalSegmentator's sdist is not in {cache} and could not be downloaded ({e})")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module's tests that do not kill it."""
    serve = serve_process.ServeProcess(tmp_path_factory.mktemp("serve")).start()
    yield serve
    serve.stop()


@pytest.fixture
def own_server(tmp_path):
    """A server of this test's own, to kill and restart."""
    serve = serve_process.ServeProcess(tmp_path).start()
    yield serve
    serve.stop()


@pytest.fixture(scope="module")
def three_timepoints():
    """Three CT phantoms (oblique, anisotropic), two lesions moving by a known amount and a
    world shift of the whole scan; images are the world (LPS) geometry the volumes get
    (``slicer_cases.phantom_case`` loads them into a scene)."""
    from phantoms import ct_phantom, oblique_direction

    images = []
    for t in range(3):
        image, _ = ct_phantom(shape_zyx=(24, 64, 60), spacing_xyz=(1.4, 1.1, 2.6), direction=oblique_direction(25),
                              origin_xyz=(-40.0 + 2.0 * t, -35.0, 20.0 - 1.5 * t), seed=t,
                              lesions=[((12, 30 + 2 * t, 28 - t), 7.0 + t, 120), ((10, 44, 42 + t), 5.0, 110)])
        images.append(image)
    return images
