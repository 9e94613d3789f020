"""Track outputs: per follow-up segmentations, sequences and browser, the lesion table, the volume
plot, and export to files.

Everything is built outside the scene first (:func:`buildTrackOutputs`) and added in one step
(:func:`commitTrackOutputs`), so a failure or Cancel leaves the scene unchanged. No CT is
copied: the volume sequence's items and the browser's proxy share each scan's voxels.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import vtk

import slicer
from slicer.i18n import tr as _

from . import results
from .scene import imageIjkToRas, labelmapFromMask, segmentMask

TRACK_BASELINE_REFERENCE = "LesionLocator.TrackBaseline"
PROMPT_TYPE_TRACK = "track"
STATUSES = ("tracked", "vanished", "outside", "new", "absent")  # new/absent: lesions a correction added
ROLE_TRACK_OUTPUTS = ("TrackTable", "TrackPlotTable", "TrackChart", "TrackSeries", "TrackSequence",
                      "TrackBrowser", "TrackProxy")
# lesion table columns: (name, kind, unit, measurement row key); kind int / str / float
TABLE_COLUMNS = [
    ("Lesion ID", "int", "", "lesion_id"), ("Lesion", "str", "", "name"), ("Timepoint", "int", "", "index"),
    ("Volume", "str", "", "volume_node"), ("Study date", "str", "", "study_date"), ("Status", "str", "", "status"),
    ("Volume (ml)", "float", "ml", "volume_ml"), ("Long axis (mm)", "float", "mm", "long_axis_mm"),
    ("Short axis (mm)", "float", "mm", "short_axis_mm"),
    ("Volume change vs baseline (%)", "float", "%", "volume_change_vs_baseline_pct"),
    ("Volume change vs nadir (%)", "float", "%", "volume_change_vs_nadir_pct"),
    ("Lesion change", "str", "", "lesion_change_category"),
    ("RECIST 1.1 (for information only)", "str", "", "recist_information_only"),
]


@dataclass
class TrackOutputs:
    """What a tracking run made, everything in time order (baseline first).

    ``segmentationNodes[0]`` is the baseline segmentation the lesions came from;
    ``status[lesionId][t]`` is 'tracked', 'vanished' or 'outside' (after a correction also 'new'
    or 'absent', see :meth:`~.logic.LesionLocatorLogic.correctTracking`); ``rows``: one dict per
    lesion and timepoint (:func:`LesionLocatorLib.measure.lesion_measurements`, plus ``name``,
    ``segment_id``, ``volume_node`` and ``study_date``); ``response``: the runner's
    :class:`LesionLocatorLib.runner.TrackResponse`; ``warnings``: the library's and the
    Logic's warnings (e.g. follow-ups dated before the baseline).
    """
    volumeNodes: list
    segmentationNodes: list
    segmentIds: dict
    tableNode: object
    plotChartNode: object
    plotTableNode: object
    plotSeriesNodes: list
    segmentationSequenceNode: object
    volumeSequenceNode: object
    browserNode: object
    status: dict
    rows: list
    response: object = None
    warnings: list = None


# ------------------------------------------------------------------ follow-up segmentations
def trackTarget(volumeNode, lesions):
    """The module's existing result node for a follow-up (segments replaced in place), or None
    (a new node). A segment in it with a tracked lesion's ID that was not made by tracking --
    drawn by the user or made by a click on that scan -- is an error: it is never replaced."""
    node = results.resultNodeForVolume(volumeNode)
    if node is None:
        return None
    segmentation = node.GetSegmentation()
    for lesion in lesions:
        segmentId = results.segmentIdForLesion(lesion.lesionId)
        segment = segmentation.GetSegment(segmentId)
        if segment is not None and results.segmentTag(segment, results.TAG_PROMPT_TYPE) != PROMPT_TYPE_TRACK:
            raise ValueError(_("'{node}' already has a segment '{segment}' ('{name}') that was not made by tracking; "
                               "it is not replaced. Rename or remove it there, then track again.").format(
                node=node.GetName(), segment=segmentId, name=segment.GetName()))
    return node


def removeTrackedSegment(node, baselineNode, lesionId) -> bool:
    """Remove lesion ``lesionId``'s segment from a follow-up segmentation if tracking made it from
    ``baselineNode`` (e.g. a lesion a correction added, when that correction is undone); any other
    segment is left alone. True when one was removed."""
    segmentId = results.segmentIdForLesion(lesionId)
    segment = node.GetSegmentation().GetSegment(segmentId)
    if segment is None or results.segmentTag(segment, results.TAG_PROMPT_TYPE) != PROMPT_TYPE_TRACK \
            or not (results.segmentTag(segment, results.TAG_TRACKED_FROM) or "").startswith(baselineNode.GetID() + "/"):
        return False
    node.GetSegmentation().RemoveSegment(segmentId)
    return True


def tagTrackedSegment(segment, lesion, status, source) -> None:
    """Tags of a tracked segment: lesion ID, status at this timepoint, prompt type 'track' and
    where it came from ('<baseline segmentation node ID>/<baseline segment ID>')."""
    segment.SetTag(results.TAG_LESION_ID, str(lesion.lesionId))
    segment.SetTag(results.TAG_STATUS, status)
    segment.SetTag(results.TAG_PROMPT_TYPE, PROMPT_TYPE_TRACK)
    segment.SetTag(results.TAG_TRACKED_FROM, f"{source}/{lesion.segmentId}")


def trackedSegment(lesion, labelmap, status, source):
    segment = results.newSegment(lesion.name, lesion.color, labelmap)
    tagTrackedSegment(segment, lesion, status, source)
    return segment


def _followUpStep(baselineNode, volume, target, lesions, masks, status, t, boxes) -> dict:
    """One follow-up's labelmaps and (when it has no result node yet) its new segmentation."""
    labelmaps = {lesion.lesionId: labelmapFromMask(masks[lesion.lesionId], volume, bbox=boxes[lesion.lesionId])
                 for lesion in lesions}
    source = baselineNode.GetID()
    node = None
    if target is None:
        node = slicer.vtkMRMLSegmentationNode()
        node.SetName(f"{volume.GetName()} lesions")
        node.SetAttribute(results.ROLE_ATTRIBUTE, results.ROLE_RESULT)
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        for lesion in lesions:
            node.GetSegmentation().AddSegment(
                trackedSegment(lesion, labelmaps[lesion.lesionId], status[lesion.lesionId][t], source),
                results.segmentIdForLesion(lesion.lesionId))
    return {"volume": volume, "node": node, "labelmaps": labelmaps, "source": source}


# ------------------------------------------------------------------ sequences
def _sequence(name):
    sequence = slicer.vtkMRMLSequenceNode()
    sequence.SetName(name)
    sequence.SetIndexName("timepoint")
    sequence.SetIndexUnit("")
    sequence.SetIndexType(slicer.vtkMRMLSequenceNode.NumericIndex)
    sequence.SetAttribute(results.ROLE_ATTRIBUTE, "TrackSequence")
    return sequence


def _segmentationItem(volume, image, lesions, masks, status, source, boxes):
    """One timepoint of the segmentation sequence, in world geometry (scans may have transforms)."""
    worldIjkToRas = slicer.util.vtkMatrixFromArray(imageIjkToRas(image))
    item = slicer.vtkMRMLSegmentationNode()
    item.SetName(f"{volume.GetName()} lesions")
    item.SetAttribute(results.ROLE_ATTRIBUTE, "TrackProxy")  # the browser's proxy copies it
    reference = slicer.vtkOrientedImageData()
    dims = volume.GetImageData().GetDimensions()
    reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    reference.SetImageToWorldMatrix(worldIjkToRas)
    item.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(reference))
    for lesion in lesions:
        labelmap = labelmapFromMask(masks[lesion.lesionId], volume, worldIjkToRas, boxes[lesion.lesionId])
        item.GetSegmentation().AddSegment(trackedSegment(lesion, labelmap, status[lesion.lesionId], source),
                                          results.segmentIdForLesion(lesion.lesionId))
    return item


def _addScanItem(sequence, volume, image, t) -> None:
    """Timepoint ``t`` of the volume sequence: the scan in world geometry, sharing its voxels (an
    empty item is added, then filled by a shallow copy: ``SetDataNodeAtValue`` always deep-copies)."""
    scan = slicer.vtkMRMLScalarVolumeNode()
    scan.SetName(volume.GetName())
    scan.SetAttribute(results.ROLE_ATTRIBUTE, "TrackProxy")
    scan.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(imageIjkToRas(image)))
    empty = slicer.vtkMRMLScalarVolumeNode()
    empty.SetName(volume.GetName())
    sequence.SetDataNodeAtValue(empty, str(t))
    scan.SetAndObserveImageData(volume.GetImageData())
    sequence.UpdateDataNodeAtValue(scan, str(t), True)


def buildSequences(baselineNode, volumes, images, lesions, masks, status, token, boxes) -> tuple:
    """(segmentation sequence, volume sequence): one item per timepoint, in world geometry."""
    base = volumes[0].GetName()
    segmentations = _sequence(f"{base} lesions over time")
    scans = _sequence(f"{base} scans over time")
    scans.SetSaveWithScene(False)  # derived: saving it would write every CT a second time
    for t, (volume, image) in enumerate(zip(volumes, images)):
        statusAtT = {lesion.lesionId: status[lesion.lesionId][t] for lesion in lesions}
        segmentations.SetDataNodeAtValue(
            _segmentationItem(volume, image, lesions, masks[t], statusAtT, baselineNode.GetID(), boxes[t]), str(t))
        _addScanItem(scans, volume, image, t)
        token.check()
    return segmentations, scans


# ------------------------------------------------------------------ table and plot
def lesionTable(name, rows):
    """The lesion table (one row per lesion and timepoint, columns :data:`TABLE_COLUMNS`)."""
    table = slicer.vtkMRMLTableNode()
    table.SetName(name)
    table.SetAttribute(results.ROLE_ATTRIBUTE, "TrackTable")
    for column, kind, unit, key in TABLE_COLUMNS:
        array = {"int": vtk.vtkIntArray, "str": vtk.vtkStringArray, "float": vtk.vtkDoubleArray}[kind]()
        array.SetName(column)
        for row in rows:
            value = row[key]
            if kind == "int":
                array.InsertNextValue(int(value))
            elif kind == "float":
                array.InsertNextValue(float("nan") if value is None else float(value))
            else:
                array.InsertNextValue("" if value is None else str(value))
        table.AddColumn(array)
        if unit:
            table.SetColumnUnitLabel(column, unit)
    table.SetColumnDescription("RECIST 1.1 (for information only)",
                               _("RECIST 1.1 arithmetic on the sum of the tracked lesions' long axes: not a clinical "
                                 "read (no new or non-target lesions, no node rule, no confirmation)"))
    table.SetColumnDescription("Lesion change", _("this lesion's own long-axis change (RECIST thresholds: increase "
                                                  ">= 20 % and 5 mm over its smallest size, decrease <= -30 % vs "
                                                  "baseline); the RECIST column is the sum of all lesions"))
    table.SetColumnDescription("Status", _("tracked / vanished (no lesion found at the warped location) / outside "
                                           "(the lesion left the scan's field of view); after a correction: new "
                                           "(first seen at this scan) / absent (before it)"))
    return table


def _plotSeries(lesion, columnName):
    node = slicer.vtkMRMLPlotSeriesNode()
    node.SetName(lesion.name)
    node.SetAttribute(results.ROLE_ATTRIBUTE, "TrackSeries")
    node.SetXColumnName("Timepoint")
    node.SetYColumnName(columnName)
    node.SetLabelColumnName("Scan")
    node.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    node.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
    node.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
    node.SetColor(*lesion.color)
    return node


def volumePlot(base, volumes, lesions, rows) -> tuple:
    """(plot table, chart, series): lesion volume per timepoint (one column and one series per
    lesion, in its colour); 'outside' timepoints and those before a new lesion appeared
    ('absent') are gaps (not measured)."""
    data = slicer.vtkMRMLTableNode()
    data.SetName(f"{base} lesion volumes (plot data)")
    data.SetAttribute(results.ROLE_ATTRIBUTE, "TrackPlotTable")
    index, labels = vtk.vtkDoubleArray(), vtk.vtkStringArray()
    index.SetName("Timepoint")
    labels.SetName("Scan")
    for t, volume in enumerate(volumes):
        index.InsertNextValue(float(t))
        labels.InsertNextValue(volume.GetName())
    data.AddColumn(index)
    data.AddColumn(labels)
    byLesion = {}
    for row in rows:
        byLesion.setdefault(row["lesion_id"], {})[row["index"]] = row
    chart = slicer.vtkMRMLPlotChartNode()
    chart.SetName(f"{base} lesion volumes")
    chart.SetAttribute(results.ROLE_ATTRIBUTE, "TrackChart")
    chart.SetTitle(_("Lesion volume over time"))
    chart.SetXAxisTitle(_("Timepoint"))
    chart.SetYAxisTitle(_("Volume (ml)"))
    series = []
    for lesion in lesions:
        column = vtk.vtkDoubleArray()
        column.SetName(f"{results.segmentIdForLesion(lesion.lesionId)} (ml)")
        for t in range(len(volumes)):
            row = byLesion[lesion.lesionId][t]
            column.InsertNextValue(float("nan") if row["status"] in ("outside", "absent") else float(row["volume_ml"]))
        data.AddColumn(column)
        series.append(_plotSeries(lesion, column.GetName()))
    return data, chart, series


def buildTrackOutputs(baselineNode, volumes, images, lesions, masks, status, rows, targets, token,
                      boxes=None) -> dict:
    """Every node and labelmap of a tracking run, built outside the scene. ``boxes[t][id]``: each
    mask's bounding box when already known (see :func:`.scene.labelmapFromMask`)."""
    if boxes is None:
        from LesionLocatorLib.protocol import mask_bbox
        boxes = [{i: mask_bbox(m) for i, m in byLesion.items()} for byLesion in masks]
    followups = []
    for t in range(1, len(volumes)):
        followups.append(_followUpStep(baselineNode, volumes[t], targets[t - 1], lesions, masks[t], status, t,
                                       boxes[t]))
        token.check()
    base = volumes[0].GetName()
    return {"baselineNode": baselineNode, "volumes": volumes, "targets": targets, "lesions": lesions,
            "status": status, "rows": rows, "followups": followups,
            "sequences": buildSequences(baselineNode, volumes, images, lesions, masks, status, token, boxes),
            "table": lesionTable(f"{base} lesion table", rows), "plot": volumePlot(base, volumes, lesions, rows)}


# ------------------------------------------------------------------ into the scene
def previousTrackOutputs(baselineVolumeNode) -> list:
    """Nodes of an earlier tracking run from this baseline volume (to be replaced)."""
    out = []
    scene = slicer.mrmlScene
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.GetAttribute(results.ROLE_ATTRIBUTE) in ROLE_TRACK_OUTPUTS and \
                node.GetNodeReferenceID(TRACK_BASELINE_REFERENCE) == baselineVolumeNode.GetID():
            out.append(node)
            if node.IsA("vtkMRMLSequenceBrowserNode"):  # its proxies (their attributes follow the item shown)
                proxies = vtk.vtkCollection()
                node.GetAllProxyNodes(proxies)
                out.extend(proxies.GetItemAsObject(j) for j in range(proxies.GetNumberOfItems()))
    return list({id(n): n for n in out}.values())


def _uniqueName(name):
    scene = slicer.mrmlScene
    return scene.GenerateUniqueName(name) if scene.GetFirstNodeByName(name) is not None else name


def _own(node, baseline, role=None) -> None:
    """Mark a node as a tracking output of ``baseline`` (replaced by the next run from it)."""
    if role is not None:
        node.SetAttribute(results.ROLE_ATTRIBUTE, role)
    node.SetNodeReferenceID(TRACK_BASELINE_REFERENCE, baseline.GetID())


def _commitFollowUp(step, target, lesions, status, t):
    volume, labelmaps = step["volume"], step["labelmaps"]
    if target is None:
        node = step["node"]
        node.SetName(_uniqueName(node.GetName()))
        results.addResultNode(node, volume)
        return node
    wasModified = target.StartModify()
    try:
        target.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
        segmentation = target.GetSegmentation()
        for lesion in lesions:
            segmentId = results.segmentIdForLesion(lesion.lesionId)
            segment = segmentation.GetSegment(segmentId)
            if segment is None:
                segmentation.AddSegment(trackedSegment(lesion, labelmaps[lesion.lesionId], status[lesion.lesionId][t],
                                                       step["source"]), segmentId)
                continue
            results.replaceSegmentVoxels(target, segmentId, labelmaps[lesion.lesionId])
            segment.SetName(lesion.name)
            segment.SetColor(*lesion.color)
            tagTrackedSegment(segment, lesion, status[lesion.lesionId][t], step["source"])
    finally:
        target.EndModify(wasModified)
    return target


def _commitBrowser(sequences, baseline):
    """Add the sequences and a browser over them; the proxies share the items' data (no CT copy)
    and are hidden from node selectors."""
    scene = slicer.mrmlScene
    segmentationSequence, volumeSequence = sequences
    for sequence in sequences:
        sequence.SetName(_uniqueName(sequence.GetName()))
        scene.AddNode(sequence)
        _own(sequence, baseline)
    browser = slicer.vtkMRMLSequenceBrowserNode()
    browser.SetName(_uniqueName(f"{baseline.GetName()} timepoints"))
    scene.AddNode(browser)
    _own(browser, baseline, "TrackBrowser")
    browser.SetAndObserveMasterSequenceNodeID(segmentationSequence.GetID())
    browser.AddSynchronizedSequenceNodeID(volumeSequence.GetID())
    browser.SetSaveChanges(volumeSequence, True)  # proxy = shallow copy of the item (Sequences logic)
    sequencesLogic = getattr(getattr(slicer.modules, "sequences", None), "logic", lambda: None)()
    if sequencesLogic is not None:
        sequencesLogic.UpdateProxyNodesFromSequences(browser)
    for sequence in sequences:
        proxy = browser.GetProxyNode(sequence)
        if proxy is not None:
            _own(proxy, baseline, "TrackProxy")
            proxy.SetHideFromEditors(True)
            if sequence is volumeSequence:
                proxy.SetSaveWithScene(False)
            if proxy.GetDisplayNode() is None and hasattr(proxy, "CreateDefaultDisplayNodes"):
                proxy.CreateDefaultDisplayNodes()
    return browser


def _commitTableAndPlot(table, plot, baseline) -> None:
    scene = slicer.mrmlScene
    plotTable, chart, series = plot
    for node in (table, plotTable, chart, *series):
        node.SetName(_uniqueName(node.GetName()))
        scene.AddNode(node)
        _own(node, baseline)
    for node in series:
        node.SetAndObserveTableNodeID(plotTable.GetID())
        chart.AddAndObservePlotSeriesNodeID(node.GetID())
    for node in (table, chart):
        results.placeBesideVolume(node, baseline)


def commitTrackOutputs(plan) -> TrackOutputs:
    """Everything is computed before this point; here the scene changes (an earlier run's outputs
    from the same baseline are replaced)."""
    volumes, lesions, status = plan["volumes"], plan["lesions"], plan["status"]
    baseline = volumes[0]
    for node in previousTrackOutputs(baseline):
        results.removeNode(node)
    segmentationNodes = [plan["baselineNode"]]
    for t, (step, target) in enumerate(zip(plan["followups"], plan["targets"]), start=1):
        segmentationNodes.append(_commitFollowUp(step, target, lesions, status, t))
    browser = _commitBrowser(plan["sequences"], baseline)
    _commitTableAndPlot(plan["table"], plan["plot"], baseline)
    plotTable, chart, series = plan["plot"]
    return TrackOutputs(volumes, segmentationNodes,
                        {lesion.lesionId: results.segmentIdForLesion(lesion.lesionId) for lesion in lesions},
                        plan["table"], chart, plotTable, series, plan["sequences"][0], plan["sequences"][1], browser,
                        status, plan["rows"], None, [])


# ------------------------------------------------------------------ export
def exportTableToCsv(tableNode, path) -> str:
    """Write a table node as CSV (comma-separated, a header row of column names, numbers with full
    precision, empty cells for missing values). Returns the path. (Slicer's table storage node,
    what ``slicer.util.saveNode`` uses, rounds numbers to 6 significant digits, writes 'nan' for
    missing values and adds a schema file, so it is not used here.)"""
    table = tableNode.GetTable()
    columns = [table.GetColumn(c) for c in range(table.GetNumberOfColumns())]
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([c.GetName() for c in columns])
        for r in range(table.GetNumberOfRows()):
            cells = []
            for c in columns:
                value = c.GetValue(r)
                if isinstance(value, float):
                    cells.append("" if np.isnan(value) else repr(value))
                else:
                    cells.append(str(value))
            writer.writerow(cells)
    os.replace(tmp, path)
    return path


def safeFileNames(names, default) -> list:
    """One file-name stem per name (e.g. node names), in order: every character but letters,
    digits, '-', '_' and '.' becomes '_', leading and trailing '.' and '_' go (``default`` when
    nothing is left), and a stem already given gets '_' appended until it is unique."""
    stems = []
    for name in names:
        stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("._") or default
        while stem in stems:
            stem += "_"
        stems.append(stem)
    return stems


def exportSegmentations(segmentationNodes, folder, format="seg.nrrd") -> list:
    """Save segmentations to ``folder``: ``format='seg.nrrd'`` (Slicer's segmentation file:
    names, colours, tags; written by Slicer's segmentation storage node) or ``'nii.gz'`` (a label
    map on the source volume's voxels, label value = lesion ID; segments without a lesion ID get
    the numbers after the largest one). Files are in each volume's own frame (as Slicer saves the
    volume: parent transforms are not applied). Returns the file paths."""
    format = format.lower().lstrip(".")
    if format not in ("seg.nrrd", "nii.gz"):
        raise ValueError(_("format must be 'seg.nrrd' or 'nii.gz', got {format}").format(format=repr(format)))
    if not segmentationNodes:
        raise ValueError(_("no segmentation to export: segment (and track) lesions first"))
    os.makedirs(folder, exist_ok=True)
    paths = []
    for node, stem in zip(segmentationNodes, safeFileNames([n.GetName() for n in segmentationNodes], "lesions")):
        path = os.path.join(os.fspath(folder), f"{stem}.{format}")
        if format == "seg.nrrd":
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(path)
            if not storage.WriteData(node):
                raise RuntimeError(_("could not write '{node}' to {path}").format(node=node.GetName(), path=path))
        else:
            writeLabelmapFile(node, path)
        paths.append(path)
    return paths


def writeLabelmapFile(segmentationNode, path) -> None:
    """A segmentation as a label map file on its source volume's voxels (label value = lesion ID).
    Slicer's segment export assigns label values from segment order or colour-table names, not from
    our lesion IDs, so the label map is built here and written by Slicer's volume storage node."""
    from vtk.util import numpy_support

    volume = segmentationNode.GetNodeReference(results.SOURCE_VOLUME_REFERENCE) or segmentationNode.GetNodeReference(
        segmentationNode.GetReferenceImageGeometryReferenceRole())
    if volume is None:
        raise ValueError(_("'{node}' has no reference volume to export a label map on").format(
            node=segmentationNode.GetName()))
    segmentation = segmentationNode.GetSegmentation()
    dims = volume.GetImageData().GetDimensions()
    labels = np.zeros((dims[2], dims[1], dims[0]), dtype=np.uint16)
    ids = {sid: results.segmentLesionId(segmentation.GetSegment(sid)) for sid in segmentation.GetSegmentIDs()}
    nextId = max([v for v in ids.values() if v is not None], default=0) + 1
    for segmentId in segmentation.GetSegmentIDs():
        if ids[segmentId] is None:
            ids[segmentId], nextId = nextId, nextId + 1
        labels[segmentMask(segmentationNode, segmentId, volume)] = ids[segmentId]
    labelmap = slicer.vtkMRMLLabelMapVolumeNode()
    ijkToRas = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijkToRas)
    labelmap.SetIJKToRASMatrix(ijkToRas)
    image = vtk.vtkImageData()
    image.SetDimensions(dims)
    image.AllocateScalars(vtk.VTK_UNSIGNED_SHORT, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = labels.ravel()
    labelmap.SetAndObserveImageData(image)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(os.fspath(path))
    storage.SetUseCompression(1)
    if not storage.WriteData(labelmap):
        raise RuntimeError(_("could not write the label map of '{node}' to {path}").format(
            node=segmentationNode.GetName(), path=path))
