"""Export to DICOM: each timepoint's lesions as a DICOM SEG and a TID 1500 SR on the DICOM series its
volume was loaded from, written by the library (:func:`LesionLocatorLib.dicomresults.write_dicom_results`,
what the command line's ``--dicom-out`` writes) for the baseline and every tracked follow-up.

Where a volume comes from: Slicer's DICOM scalar volume plugin gives a volume it loads the node
attribute ``DICOM.instanceUIDs``: the SOP Instance UIDs of its slices, separated by spaces, in the
volume's slice (k) order ('Unknown' for a file without one); the DICOM database gives each
instance's file (``slicer.dicomDatabase.fileForInstance``; '' for a UID it does not hold). Those
files are read (headers only) and checked by :func:`LesionLocatorLib.dicomseries.read_series_files`.

Frames: the export works on the volume's **own voxel grid**, which must be the series' grid (size,
spacing, origin and direction within :data:`GRID_TOLERANCE_MM`, compared in the volume's own frame
by :func:`.scene.volumeGrid`). Parent transforms on the volume (display, registration) are
ignored: a SEG lies on the acquired slices, in the series' patient frame. A volume resampled,
cropped or moved after loading (a hardened transform, a changed origin) is refused. Each mask is a
segment's voxels on the volume's voxels (:func:`.scene.segmentMask`; exact for the module's
segmentations, which follow their volume's transform). The SR's measurements are the library's
(:func:`LesionLocatorLib.measure.lesion_measurements`) of these masks on the series' geometry, as
the command line measures them.

Everything is read and checked before the first file is written: a failed check writes nothing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

import slicer
from slicer.i18n import tr as _

from . import results, scene, trackoutputs

INSTANCE_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"
GRID_TOLERANCE_MM = 1e-3
"""Largest difference (mm; direction cosines: the same number) between a volume's grid and its
series' grid: far above the rounding of DICOM decimal strings and ITK's orthonormalisation, far
below any resampling or cropping (a voxel's size)."""


@dataclass
class DicomStudy:
    """One :func:`~LesionLocatorLib.dicomresults.write_dicom_results` call: ``volumes`` in time order
    (baseline first, the Tracking UIDs derive from its series) and each one's lesion segmentation;
    ``lesionIds``: the lesions to export (None: every segment, lesion IDs by
    :func:`.results.segmentLesionIds`); ``status``: a tracking run's {lesion ID: [status per
    timepoint]} (None: from the masks)."""
    volumes: list
    segmentations: list
    lesionIds: list = None
    status: dict = None


# ------------------------------------------------------------------ what to export
def trackStudy(outputs) -> DicomStudy:
    """A tracking run's timepoints (:class:`.trackoutputs.TrackOutputs`) and its lesions."""
    return DicomStudy(list(outputs.volumeNodes), list(outputs.segmentationNodes), sorted(outputs.status),
                      outputs.status)


def resultStudies() -> list:
    """Every module result segmentation with segments, each on its source volume (one timepoint)."""
    nodes = [n for n in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
             if results.isResultNode(n) and n.GetSegmentation().GetNumberOfSegments()]
    return [DicomStudy([n.GetNodeReference(results.SOURCE_VOLUME_REFERENCE)], [n]) for n in nodes]


def defaultStudies(lastTrack) -> list:
    """The last tracking run while all its nodes are in the scene, else :func:`resultStudies`."""
    if lastTrack is not None and all(n is not None and n.GetScene() is slicer.mrmlScene
                                     for n in lastTrack.volumeNodes + lastTrack.segmentationNodes):
        return [trackStudy(lastTrack)]
    return resultStudies()


# ------------------------------------------------------------------ packages
def checkDicomPackages() -> None:
    """ValueError unless pydicom 3 and highdicom can be imported: Slicer 5.12 and later bundle both
    (pydicom 3.0.2, highdicom 0.27); Slicer 5.10 bundles pydicom 2.4, which Slicer's own DICOM
    module needs, so it is never upgraded from here."""
    try:
        import pydicom
    except ImportError:
        pydicom = None
    version = getattr(pydicom, "__version__", "none")
    if pydicom is None or int(version.split(".")[0]) < 3:
        raise ValueError(_("Export to DICOM needs pydicom 3 (bundled with Slicer 5.12 and later); this Slicer has "
                           "pydicom {version}").format(version=version))
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise ValueError(_("Export to DICOM needs highdicom (bundled with Slicer 5.12 and later; or run "
                           "slicer.util.pip_install('highdicom') in the Python console)")) from None


# ------------------------------------------------------------------ the series of a volume
def databaseLookup():
    """``slicer.dicomDatabase.fileForInstance``; a ValueError when no DICOM database is open."""
    database = getattr(slicer, "dicomDatabase", None)
    if database is None or not database.isOpen:
        raise ValueError(_("no DICOM database is open: open the DICOM module (its database holds the files the "
                           "volumes were loaded from), then export again"))
    return database.fileForInstance


def instanceFiles(volumeNode, fileForInstance=None) -> list:
    """The files of the DICOM instances ``volumeNode`` was loaded from (``DICOM.instanceUIDs``),
    through ``fileForInstance(uid) -> path or ''`` (default: the DICOM database). ValueError for a
    volume not loaded from DICOM and for instances without a file."""
    uids = (volumeNode.GetAttribute(INSTANCE_UIDS_ATTRIBUTE) or "").split()
    if not uids:
        raise ValueError(_("volume '{name}' was not loaded from DICOM (it has no {attribute} attribute): a DICOM SEG "
                           "and SR must reference the series they segment. Load the scan through the DICOM module "
                           "and segment it there").format(name=volumeNode.GetName(),
                                                          attribute=INSTANCE_UIDS_ATTRIBUTE))
    lookup = fileForInstance or databaseLookup()
    files = [lookup(uid) or "" for uid in uids]
    missing = [uid for uid, path in zip(uids, files) if not path or not os.path.isfile(path)]
    if missing:
        raise ValueError(_("{n} of the {total} DICOM instance(s) of volume '{name}' are not in the DICOM database or "
                           "their files are gone ({uids}); import the series into the DICOM database again").format(
            n=len(missing), total=len(uids), name=volumeNode.GetName(),
            uids=", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")))
    return files


def volumeSeries(volumeNode, fileForInstance=None):
    """The checked :class:`~LesionLocatorLib.dicomseries.DicomSeries` ``volumeNode`` was loaded from,
    whose grid the volume still has (:func:`checkGrid`); library errors name the volume."""
    from LesionLocatorLib.dicomresults import check_references
    from LesionLocatorLib.dicomseries import read_series_files

    files = instanceFiles(volumeNode, fileForInstance)
    try:
        series = read_series_files(files)
        check_references(series)
    except (ValueError, OSError) as error:
        raise ValueError(_("volume '{name}': {error}").format(name=volumeNode.GetName(), error=error)) from error
    checkGrid(volumeNode, series)
    return series


def checkGrid(volumeNode, series) -> None:
    """ValueError unless the volume's own voxel grid (parent transforms left out) is the series'."""
    differences = series.header.geometry_differences(scene.volumeGrid(volumeNode, world=False),
                                                     tol=GRID_TOLERANCE_MM)
    if differences:
        raise ValueError(_("volume '{name}' is no longer on the voxel grid of the DICOM series it was loaded from "
                           "(the series has {differences}): it was resampled, cropped or moved after loading. Load "
                           "the series again from the DICOM database and export its lesions on it").format(
            name=volumeNode.GetName(), differences="; ".join(differences)))


def seriesGrid(series):
    """The series' voxel grid as a library Image without voxels (LPS, the series' own geometry)."""
    from LesionLocatorLib.image import Image

    header = series.header
    return Image(np.broadcast_to(np.zeros((), bool), header.shape), header.spacing, header.origin,
                 header.direction_matrix)


# ------------------------------------------------------------------ masks, status, measurements
def lesionMasks(segmentationNode, volumeNode, shape, lesionIds=None) -> dict:
    """{lesion ID: bool (k, j, i) mask on the volume's voxels}: every segment (``lesionIds`` None),
    or exactly those lesions (a lesion without a segment has an empty mask)."""
    if segmentationNode is None:
        raise ValueError(_("volume '{name}' has no lesion segmentation to export").format(name=volumeNode.GetName()))
    masks = {lesionId: scene.segmentMask(segmentationNode, segmentId, volumeNode)
             for segmentId, lesionId in results.segmentLesionIds(segmentationNode).items()
             if lesionIds is None or lesionId in lesionIds}
    for lesionId in lesionIds or ():
        masks.setdefault(lesionId, np.zeros(shape, bool))
    return masks


def statusAt(given, mask) -> str:
    """A lesion's status in the SR: 'tracked' when its mask has a voxel, else 'outside' where the
    tracking run said so, else 'vanished' (a mask edited after tracking counts as it is now)."""
    if np.any(mask):
        return "tracked"
    return "outside" if given == "outside" else "vanished"


def prepareStudy(study: DicomStudy, names, fileForInstance=None) -> tuple:
    """(series, names, masks by timepoint, measurement rows) for
    :func:`~LesionLocatorLib.dicomresults.write_dicom_results`; raises before anything is written."""
    from LesionLocatorLib.measure import lesion_measurements

    series = [volumeSeries(v, fileForInstance) for v in study.volumes]
    masks = [lesionMasks(node, volume, s.header.shape, study.lesionIds)
             for node, volume, s in zip(study.segmentations, study.volumes, series)]
    given = study.status or {}
    status = {pid: [statusAt(given.get(pid, [None] * len(masks))[t], m[pid]) for t, m in enumerate(masks)]
              for pid in sorted({pid for m in masks for pid in m})}
    rows = lesion_measurements([seriesGrid(s) for s in series], masks, status, names)
    return series, list(names), masks, rows


def exportDicom(folder, studies, fileForInstance=None):
    """Write every study's SEG and SR files into ``folder`` (``<volume name>_seg.dcm``,
    ``<volume name>_sr.dcm``, names made safe for files and unique); returns the library's
    ``DicomWritten`` (paths; warnings, with the series' notes). Every study is checked first."""
    checkDicomPackages()
    from LesionLocatorLib.dicomresults import DicomWritten, write_dicom_results

    if not studies:
        raise ValueError(_("nothing to export: segment (and track) lesions on a volume loaded from DICOM first"))
    if any(v is None for s in studies for v in s.volumes):
        raise ValueError(_("a lesion segmentation has no volume to export it on"))
    stems = iter(trackoutputs.safeFileNames([v.GetName() for s in studies for v in s.volumes], "scan"))
    prepared = [prepareStudy(s, [next(stems) for _v in s.volumes], fileForInstance) for s in studies]
    paths, warnings = [], [note for series, *_rest in prepared for s in series for note in s.notes]
    for series, names, masks, rows in prepared:
        written = write_dicom_results(folder, series, names, masks, rows)
        paths += written.paths
        warnings += written.warnings
    return DicomWritten(paths, warnings)
