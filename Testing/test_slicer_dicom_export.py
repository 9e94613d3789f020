"""Export to DICOM from the Slicer module (``LesionLocatorLogic.exportDicom``) on a real MRML scene.

Scans are written as DICOM CT series (``dicom_fixtures``) and loaded the way Slicer's DICOM module
loads a series: files sorted along the slice normal (``DICOMLib/DICOMUtils.getSortedImageFiles``),
read by the volumes logic's archetype reader (``DICOMScalarVolumePlugin.loadFilesWithArchetype``),
and the slices' SOP Instance UIDs, in slice order, set as the node attribute ``DICOM.instanceUIDs``
(``DICOMScalarVolumePlugin.setVolumeNodeProperties``). A {SOP Instance UID: file} lookup built from
the written folders stands in for the DICOM database's ``fileForInstance``.

Lesions: the demo case's ground-truth label images (``Resources/Demo/demo_t{0,1,2}_label.nii.gz``),
given by a runner that answers a click with the label under it and tracks lesion N as label N of
the next scans (no network: what is tested is the way from the scene to the files). Readers:
highdicom (SEG), dcmqi's ``tid1500reader`` (SR).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy.spatial.transform import Rotation

import slicer
import slicer.util
import vtk

from dicom_fixtures import DEMO, write_ct_series, write_demo_study
from LesionLocatorLib.dicomresults import seg_path, sr_path, tracking_uid, write_dicom_results
from LesionLocatorLib.dicomseries import read_series
from LesionLocatorLib.image import Image, read_image
from LesionLocatorLib.measure import lesion_measurements
from LesionLocatorLib.report import plain_rows
from LesionLocatorLib.runner import SegmentationResponse, TrackResponse

pytest_plugins = ["slicer_harness"]  # fixtures: slicer_scene, lesionlocator_module
pytest.register_assert_rewrite("slicer_harness")
from slicer_harness import import_module_file  # noqa: E402

import_module_file()  # puts LesionLocator/ on sys.path, as Slicer does
from LesionLocatorSlicer import dicomexport, trackoutputs  # noqa: E402

BIN = Path(sys.executable).parent
NAMES = ["t0", "t1", "t2"]
LESIONS = (1, 2, 3, 4)


# ------------------------------------------------------------------------------ loading as Slicer does
def _load_like_slicer(h, folder, name):
    """(volume, {SOP Instance UID: file}) of the series in ``folder``, loaded as Slicer's DICOM module
    loads it (see the module docstring)."""
    headers = {str(p): pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(Path(folder).glob("*.dcm"))}
    first = next(iter(headers.values()))
    normal = np.cross(*np.reshape(np.asarray(first.ImageOrientationPatient, float), (2, 3)))
    files = sorted(headers, key=lambda f: float(np.dot(np.asarray(headers[f].ImagePositionPatient, float), normal)))
    fileList = vtk.vtkStringArray()
    for f in files:
        fileList.InsertNextValue(f)
    volume = slicer.modules.volumes.logic().AddArchetypeScalarVolume(files[0], name, 0, fileList)
    ijkToRas = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijkToRas)
    assert slicer.vtkMRMLVolumeNode.IsIJKCoordinateSystemRightHanded(ijkToRas)  # Slicer reverses it otherwise
    uids = [str(headers[f].SOPInstanceUID) for f in files]
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    return volume, dict(zip(uids, files))


def _database(*lookups):
    """``fileForInstance`` of a DICOM database holding these files ('' for an unknown UID)."""
    files = {uid: path for lookup in lookups for uid, path in lookup.items()}
    return lambda uid: files.get(uid, "")


def _uids(volume):
    return volume.GetAttribute("DICOM.instanceUIDs").split()


class LabelRunner:
    """A click is the label under it in ``labels[0]``; lesion N at scan t is ``labels[t] == N``
    (tracked, or vanished when empty); measurement rows are the library's."""

    def __init__(self, labels):
        self.labels = labels

    def run(self, request, progress=None, cancel=None):
        masks = {}
        for prompt in request.prompts:
            voxel = tuple(np.round(request.image.world_to_index(prompt.xyz)).astype(int))
            masks[prompt.id] = self.labels[0] == self.labels[0][voxel]
        return SegmentationResponse(request.id, masks)

    def track(self, request, progress=None, cancel=None):
        masks = [dict(request.baseline)] + [{pid: self.labels[t] == pid for pid in request.baseline}
                                            for t in range(1, len(request.images))]
        status = {pid: ["tracked" if m[pid].any() else "vanished" for m in masks] for pid in request.baseline}
        rows = plain_rows(lesion_measurements(request.images, masks, status, request.names))
        return TrackResponse(request.id, masks, status, rows=rows)

    def close(self):
        pass


def _click(h, volume, kji, name="clicks"):
    """A point list with one control point at the world RAS centre of voxel ``kji`` of ``volume``."""
    ijkToRas = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijkToRas)
    local = ijkToRas.MultiplyPoint([float(kji[2]), float(kji[1]), float(kji[0]), 1.0])[:3]
    world = [0.0, 0.0, 0.0]
    volume.TransformPointToWorld(local, world)
    node = h.scene.GetFirstNodeByName(name) or h.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    node.AddControlPointWorld(world)
    return node


def _inside_voxel(mask):
    """The voxel of ``mask`` nearest its centre of mass."""
    voxels = np.argwhere(mask)
    return tuple(voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))])


# ------------------------------------------------------------------------------ readers
def _seg(path):
    import highdicom as hd

    return hd.seg.segread(path)


def _seg_masks(seg, volume) -> dict:
    """{segment number: bool (k, j, i)} of a SEG on ``volume``'s slices, frame by frame through the
    CT instance each frame references (a slice without a frame is empty)."""
    return {n: seg.get_pixels_by_source_instance(_uids(volume), segment_numbers=[n], dtype=bool,
                                                 assert_missing_frames_are_empty=True)[..., 0]
            for n in seg.segment_numbers}


def _rgb(description):
    import highdicom as hd

    lab = [int(v) for v in description.RecommendedDisplayCIELabValue]
    return np.array(hd.color.CIELabColor.from_dicom_value(lab).to_rgb()) / 255.0


def _sr_json(path: Path, out: Path) -> dict:
    done = subprocess.run([str(BIN / "tid1500reader"), "--inputDICOM", str(path), "--outputMetadata", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text())


def _without_instance_uids(report: dict) -> dict:
    """An SR's tid1500reader JSON less the UIDs of the new objects (random in every export)."""
    report = {k: v for k, v in report.items() if k != "compositeContext"}
    report["Measurements"] = [{k: v for k, v in g.items() if k != "segmentationSOPInstanceUID"}
                              for g in report["Measurements"]]
    return report


def _segment_array(node, segment_id, volume):
    return slicer.util.arrayFromSegmentBinaryLabelmap(node, segment_id, volume) > 0


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture
def LL(lesionlocator_module):
    return lesionlocator_module


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory):
    """The demo scans as DICOM series, their label images, and what the command line writes for
    these masks: ``write_dicom_results`` on the series read as ``--dicom-out`` reads them."""
    tmp = tmp_path_factory.mktemp("demo")
    folders = write_demo_study(tmp / "ct")
    labels = [read_image(DEMO / f"demo_t{t}_label.nii.gz").array for t in range(3)]
    scans = [read_series(f) for f in folders]
    masks = [{pid: labels[t] == pid for pid in LESIONS} for t in range(3)]
    status = {pid: ["tracked"] * 3 for pid in LESIONS}
    rows = lesion_measurements([image for image, _ in scans], masks, status, NAMES)
    write_dicom_results(tmp / "cli", [series for _, series in scans], NAMES, masks, rows)
    return {"folders": folders, "labels": labels, "series": [s for _, s in scans], "cli": tmp / "cli"}


def _demo_scene(h, demo_study):
    volumes, lookups = zip(*(_load_like_slicer(h, f, name) for f, name in zip(demo_study["folders"], NAMES)))
    return list(volumes), _database(*lookups)


def _segment_and_track(h, LL, demo_study, volumes):
    logic = LL.LesionLocatorLogic(runner=LabelRunner(demo_study["labels"]))
    for pid in LESIONS:
        clicks = _click(h, volumes[0], _inside_voxel(demo_study["labels"][0] == pid))
    logic.segment(volumes[0], clicks, modelPath="unused")
    outputs = logic.track(volumes[0], volumes[1:], modelPath="unused", order="given")
    return logic, outputs


# ------------------------------------------------------------------------------ tracked study
def test_export_after_tracking_writes_every_timepoint_on_its_series(slicer_scene, LL, demo_study, tmp_path):
    """The last tracking run: per timepoint a SEG whose segments are the module's segments voxel for
    voxel on the series' slices, with their names and colours, and an SR with one Tracking UID per
    lesion at every timepoint; the same files as the command line writes for these masks."""
    h = slicer_scene
    volumes, fileForInstance = _demo_scene(h, demo_study)
    logic, outputs = _segment_and_track(h, LL, demo_study, volumes)
    written = logic.exportDicom(tmp_path / "out", fileForInstance=fileForInstance)

    assert written.warnings == []
    assert written.paths == [p for name in NAMES for p in (seg_path(tmp_path / "out", name),
                                                           sr_path(tmp_path / "out", name))]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written.paths)
    baseline_uid = demo_study["series"][0].uid
    tracking = {}
    for t, (name, volume, node) in enumerate(zip(NAMES, volumes, outputs.segmentationNodes)):
        seg = _seg(seg_path(tmp_path / "out", name))
        assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == demo_study["series"][t].uid
        on_slices = _seg_masks(seg, volume)
        segmentation = node.GetSegmentation()
        assert sorted(on_slices) == list(LESIONS)
        for pid in LESIONS:
            segment, description = segmentation.GetSegment(f"lesion_{pid}"), seg.get_segment_description(pid)
            module_mask = _segment_array(node, f"lesion_{pid}", volume)
            assert module_mask.any() and np.array_equal(on_slices[pid], module_mask), (name, pid)
            assert np.array_equal(module_mask, demo_study["labels"][t] == pid)
            assert description.segment_label == segment.GetName() == f"Lesion {pid}"
            assert np.allclose(_rgb(description), segment.GetColor(), atol=1.5 / 255)
            assert description.tracking_uid == tracking_uid(baseline_uid, pid)
        report = _sr_json(sr_path(tmp_path / "out", name), tmp_path / f"{name}.json")
        for group in report["Measurements"]:
            tracking.setdefault(group["TrackingIdentifier"], set()).add(group["TrackingUniqueIdentifier"])
        # the command line's files for the same masks: same segments, pixels, Tracking UIDs, measurements
        cli = _seg(seg_path(demo_study["cli"], name))
        assert list(cli.segment_numbers) == list(seg.segment_numbers)
        for pid in LESIONS:
            ours, theirs = seg.get_segment_description(pid), cli.get_segment_description(pid)
            assert (ours.segment_label, ours.tracking_id, ours.tracking_uid) == \
                   (theirs.segment_label, theirs.tracking_id, theirs.tracking_uid)
            assert list(ours.RecommendedDisplayCIELabValue) == list(theirs.RecommendedDisplayCIELabValue)
        assert all(np.array_equal(a, b) for a, b in zip(_seg_masks(cli, volume).values(), on_slices.values()))
        cli_report = _sr_json(sr_path(demo_study["cli"], name), tmp_path / f"cli_{name}.json")
        assert _without_instance_uids(report) == _without_instance_uids(cli_report)
    assert sorted(tracking) == [f"Lesion {pid}" for pid in LESIONS]
    assert all(len(uids) == 1 for uids in tracking.values())  # one Tracking UID per lesion at every timepoint


def test_a_follow_up_not_loaded_from_dicom_writes_nothing(slicer_scene, LL, demo_study, tmp_path):
    h = slicer_scene
    volumes, fileForInstance = _demo_scene(h, demo_study)
    logic, outputs = _segment_and_track(h, LL, demo_study, volumes)
    volumes[2].RemoveAttribute("DICOM.instanceUIDs")
    with pytest.raises(ValueError) as error:
        logic.exportDicom(tmp_path / "out", fileForInstance=fileForInstance)
    assert str(error.value) == (
        "volume 't2' was not loaded from DICOM (it has no DICOM.instanceUIDs attribute): a DICOM SEG and SR must "
        "reference the series they segment. Load the scan through the DICOM module and segment it there")
    assert not (tmp_path / "out").exists()  # not even the baseline's files


# ------------------------------------------------------------------------------ oblique, under a transform
def _rigid(rotvec_degrees, translation):
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(np.radians(rotvec_degrees)).as_matrix()
    m[:3, 3] = translation
    return m


@pytest.fixture(scope="module")
def oblique_series(tmp_path_factory):
    """An oblique (rotated about all axes), anisotropic (0.7 x 0.9 x 2.5 mm) CT series with a ball
    lesion, and its label image (1 = lesion) on the series' voxels."""
    shape = (24, 40, 48)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    lesion = ((z - 11) / 3) ** 2 + ((y - 19) / 6) ** 2 + ((x - 27) / 7) ** 2 <= 1
    array = np.where(lesion, 120, -20).astype(np.int16)
    direction = Rotation.from_euler("xyz", [20, -15, 30], degrees=True).as_matrix()
    folder = tmp_path_factory.mktemp("oblique") / "ct"
    write_ct_series(Image(array, (0.7, 0.9, 2.5), (10.0, -20.0, 30.0), direction), folder)
    return folder, lesion.astype(np.uint8)


def test_oblique_volume_under_a_transform_exports_on_the_series_own_voxels(slicer_scene, LL, oblique_series,
                                                                          tmp_path):
    """A parent transform on the volume (and its result segmentation) moves both in the views; the
    SEG still lies on the series' slices, in the series' frame: display transforms are ignored.
    Without a tracking run, the module's result segmentation is exported as one timepoint."""
    h = slicer_scene
    folder, labels = oblique_series
    volume, lookup = _load_like_slicer(h, folder, "Oblique CT: 1/2")
    outer = h.add_linear_transform(_rigid((0, 0, -12), (3.0, -4.0, 6.0)), "outer")
    inner = h.add_linear_transform(_rigid((17, 5, 0), (5.0, -7.0, 12.0)), "inner", parent=outer)
    volume.SetAndObserveTransformNodeID(inner.GetID())
    logic = LL.LesionLocatorLogic(runner=LabelRunner([labels]))
    node = logic.segment(volume, _click(h, volume, _inside_voxel(labels == 1)), modelPath="unused")
    assert node.GetTransformNodeID() == inner.GetID()

    written = logic.exportDicom(tmp_path, fileForInstance=_database(lookup))

    assert [p.name for p in written.paths] == ["Oblique_CT__1_2_seg.dcm", "Oblique_CT__1_2_sr.dcm"]
    seg = _seg(written.paths[0])
    assert np.array_equal(_seg_masks(seg, volume)[1], labels == 1)
    assert np.array_equal(_segment_array(node, "lesion_1", volume), labels == 1)
    positions = {str(ds.SOPInstanceUID): [float(v) for v in ds.ImagePositionPatient]
                 for ds in map(pydicom.dcmread, lookup.values())}
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame on its CT slice, in the series' frame
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                           positions[source], atol=1e-4)
    [group] = _sr_json(written.paths[1], tmp_path / "sr.json")["Measurements"]
    volume_ml = float(next(m["value"] for m in group["measurementItems"] if m["quantity"]["CodeValue"] == "118565006"))
    assert volume_ml == pytest.approx((labels == 1).sum() * 0.7 * 0.9 * 2.5 / 1000, rel=1e-4)


# ------------------------------------------------------------------------------ refusals
@pytest.fixture
def clicked_demo(slicer_scene, LL, demo_study):
    """The demo baseline loaded from DICOM with one lesion segmented (no tracking run)."""
    h = slicer_scene
    volume, lookup = _load_like_slicer(h, demo_study["folders"][0], "t0")
    logic = LL.LesionLocatorLogic(runner=LabelRunner(demo_study["labels"]))
    logic.segment(volume, _click(h, volume, _inside_voxel(demo_study["labels"][0] == 1)), modelPath="unused")
    return logic, volume, lookup


def _refused(logic, folder, fileForInstance, message):
    with pytest.raises(ValueError) as error:
        logic.exportDicom(folder, fileForInstance=fileForInstance)
    assert str(error.value) == message
    assert not Path(folder).exists()


def test_volume_not_loaded_from_dicom_is_refused(slicer_scene, LL, tmp_path):
    h = slicer_scene
    volume = h.add_volume(np.zeros((4, 5, 6), np.int16), np.eye(4), "From NIfTI")
    logic = LL.LesionLocatorLogic(runner=LabelRunner([np.ones((4, 5, 6), np.uint8)]))
    logic.segment(volume, _click(h, volume, (2, 2, 2)), modelPath="unused")
    _refused(logic, tmp_path / "out", _database({}),
             "volume 'From NIfTI' was not loaded from DICOM (it has no DICOM.instanceUIDs attribute): a DICOM SEG "
             "and SR must reference the series they segment. Load the scan through the DICOM module and segment "
             "it there")


@pytest.mark.parametrize("how", ["not in the database", "file deleted"])
def test_missing_instance_is_refused(clicked_demo, tmp_path, how):
    logic, volume, lookup = clicked_demo
    uid = _uids(volume)[5]
    files = dict(lookup)
    if how == "file deleted":
        copy = tmp_path / "copy"
        shutil.copytree(Path(files[uid]).parent, copy)
        files = {u: str(copy / Path(f).name) for u, f in files.items()}
        Path(files[uid]).unlink()
    else:
        del files[uid]
    _refused(logic, tmp_path / "out", _database(files),
             f"1 of the 112 DICOM instance(s) of volume 't0' are not in the DICOM database or their files are gone "
             f"({uid}); import the series into the DICOM database again")


@pytest.mark.parametrize("change, differences", [
    ("cropped", "size (122, 101, 112) instead of (122, 101, 110)"),
    ("moved", "origin (177.956, -11.319, 94.3018) instead of (177.956, -11.319, 96.3018)"),
])
def test_volume_changed_after_loading_is_refused(clicked_demo, tmp_path, change, differences):
    logic, volume, lookup = clicked_demo
    if change == "cropped":
        slicer.util.updateVolumeFromArray(volume, slicer.util.arrayFromVolume(volume)[2:].copy())
    else:
        origin = list(volume.GetOrigin())
        volume.SetOrigin(origin[0], origin[1], origin[2] + 2.0)
    _refused(logic, tmp_path / "out", _database(lookup),
             f"volume 't0' is no longer on the voxel grid of the DICOM series it was loaded from (the series has "
             f"{differences}): it was resampled, cropped or moved after loading. Load the series again from the "
             f"DICOM database and export its lesions on it")


class FakeDatabase:
    """What the export uses of ``slicer.dicomDatabase`` (a ctkDICOMDatabase)."""

    def __init__(self, files):
        self.isOpen = True
        self.fileForInstance = _database(files)


def test_default_lookup_is_the_dicom_database(clicked_demo, tmp_path, monkeypatch):
    logic, volume, lookup = clicked_demo
    _refused(logic, tmp_path / "out", None,
             "no DICOM database is open: open the DICOM module (its database holds the files the volumes were "
             "loaded from), then export again")
    monkeypatch.setattr(slicer, "dicomDatabase", FakeDatabase(lookup), raising=False)
    written = logic.exportDicom(tmp_path / "out")
    assert [p.name for p in written.paths] == ["t0_seg.dcm", "t0_sr.dcm"]


@pytest.mark.parametrize("missing, message", [
    ("pydicom 2", "Export to DICOM needs pydicom 3 (bundled with Slicer 5.12 and later); this Slicer has pydicom "
                  "2.4.4"),
    ("highdicom", "Export to DICOM needs highdicom (bundled with Slicer 5.12 and later; or run "
                  "slicer.util.pip_install('highdicom') in the Python console)"),
])
def test_a_slicer_without_pydicom_3_or_highdicom_is_told_so(clicked_demo, tmp_path, monkeypatch, missing, message):
    import pydicom

    logic, volume, lookup = clicked_demo
    if missing == "pydicom 2":
        monkeypatch.setattr(pydicom, "__version__", "2.4.4")
    else:
        monkeypatch.setitem(sys.modules, "highdicom", None)  # import highdicom raises ImportError
    _refused(logic, tmp_path / "out", _database(lookup), message)


def test_nothing_to_export(slicer_scene, LL, tmp_path):
    _refused(LL.LesionLocatorLogic(runner=LabelRunner([])), tmp_path / "out", _database({}),
             "nothing to export: segment (and track) lesions on a volume loaded from DICOM first")


def test_safe_file_names_are_shared_by_both_exports():
    assert trackoutputs.safeFileNames(["CT 1/2: arterial", "CT 1/2: arterial", "..", "t0"], "scan") == \
        ["CT_1_2__arterial", "CT_1_2__arterial_", "scan", "t0"]
    assert dicomexport.GRID_TOLERANCE_MM < 0.01
