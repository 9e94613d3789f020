"""Result nodes: the segmentations the module creates, their lesion IDs, tags and colours, and undo.

Results go to a segmentation created by the module (node attribute ``LesionLocator.Role =
Result``), named '<volume> lesions', reference geometry = the volume, under the volume's parent
transform; one segment per lesion with ID ``lesion_<id>``, name 'Lesion <id>' and a fixed colour
per ID. Segmentations and segments the module did not make are never written to.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import vtk

import slicer
from slicer.i18n import tr as _

from LesionLocatorLib.lesionstyle import LESION_COLORS, lesion_color

from .scene import segmentLabelmap, segmentMask

ROLE_ATTRIBUTE = "LesionLocator.Role"
ROLE_RESULT = "Result"
SOURCE_VOLUME_REFERENCE = "LesionLocator.SourceVolume"
TAG_LESION_ID = "LesionLocator.LesionID"
TAG_PROMPT = "LesionLocator.Prompt"
TAG_PROMPT_TYPE = "LesionLocator.PromptType"
TAG_STATUS = "LesionLocator.Status"
TAG_TRACKED_FROM = "LesionLocator.TrackedFrom"
TAGS = (TAG_LESION_ID, TAG_PROMPT, TAG_PROMPT_TYPE, TAG_STATUS, TAG_TRACKED_FROM)

# lesion N gets COLORS[(N - 1) % len(COLORS)] (RGB 0..1), the same at every timepoint and in DICOM SEG
COLORS = LESION_COLORS


# ------------------------------------------------------------------ finding result nodes
def isResultNode(node) -> bool:
    """True for segmentations this module created (never for a user's segmentation)."""
    return node is not None and node.IsA("vtkMRMLSegmentationNode") and node.GetAttribute(ROLE_ATTRIBUTE) == ROLE_RESULT


def resultNodeForVolume(volumeNode):
    """The module's result segmentation for ``volumeNode``, or None."""
    for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
        if isResultNode(node) and node.GetNodeReferenceID(SOURCE_VOLUME_REFERENCE) == volumeNode.GetID():
            return node
    return None


def targetResultNode(volumeNode, segmentationNode):
    """Where results for ``volumeNode`` go: ``segmentationNode`` if it is the module's result node
    for that volume, else the module's own node for the volume (None: a new one is made)."""
    if segmentationNode is not None:
        if isResultNode(segmentationNode) and \
                segmentationNode.GetNodeReferenceID(SOURCE_VOLUME_REFERENCE) == volumeNode.GetID():
            return segmentationNode
        logging.info(f"LesionLocator: '{segmentationNode.GetName()}' was not created by LesionLocator for "
                     f"'{volumeNode.GetName()}'; results go to the module's own segmentation instead")
    return resultNodeForVolume(volumeNode)


# ------------------------------------------------------------------ lesion IDs, tags, colours
def segmentTag(segment, tag):
    """A segment's tag value, or None."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else None


def segmentLesionId(segment):
    """The lesion ID of a module segment (its tag), or None."""
    value = segmentTag(segment, TAG_LESION_ID)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def segmentIdForLesion(lesionId: int) -> str:
    return f"lesion_{int(lesionId)}"


def lesionIdOfSegmentId(segmentId: str):
    """N for a segment ID ``lesion_N``, else None."""
    return int(segmentId[len("lesion_"):]) if segmentId.startswith("lesion_") and \
        segmentId[len("lesion_"):].isdigit() else None


def colorForLesion(lesionId: int) -> tuple:
    return lesion_color(lesionId)


def _existingLesions(resultNode) -> tuple:
    """({prompt ref: lesion ID}, occupied lesion IDs, IDs of segments the user made) of a result node."""
    byPrompt, occupied, userSegments = {}, set(), set()
    if resultNode is None:
        return byPrompt, occupied, userSegments
    segmentation = resultNode.GetSegmentation()
    for segmentId in segmentation.GetSegmentIDs():
        segment = segmentation.GetSegment(segmentId)
        lesionId = segmentLesionId(segment)
        if lesionId is not None and segmentId == segmentIdForLesion(lesionId):
            occupied.add(lesionId)
            ref = segmentTag(segment, TAG_PROMPT)
            if ref is not None:
                byPrompt.setdefault(ref, lesionId)
            continue
        userSegments.add(segmentId)
        if lesionIdOfSegmentId(segmentId) is not None:
            occupied.add(lesionIdOfSegmentId(segmentId))
    return byPrompt, occupied, userSegments


def assignLesionIds(specs, resultNode, lesionIds=None) -> list:
    """Explicit ``lesionIds``; else the lesion this prompt made before (segment tag); else
    the next ID whose segment ID ``lesion_<id>`` is free in the result node.

    Segments the module did not make (no lesion-ID tag, e.g. drawn by the user into the
    result node) are never replaced: their IDs are skipped, and asking for one explicitly
    is an error.
    """
    byPrompt, occupied, userSegments = _existingLesions(resultNode)
    if lesionIds is not None:
        lesionIds = [int(v) for v in lesionIds]
        if len(lesionIds) != len(specs):
            raise ValueError(_("{n} lesion prompt(s) but {m} lesion ID(s) given").format(n=len(specs),
                                                                                       m=len(lesionIds)))
        if len(set(lesionIds)) != len(lesionIds) or min(lesionIds) < 1:
            raise ValueError(_("lesion IDs must be unique positive integers, got {ids}").format(ids=lesionIds))
        for lesionId in lesionIds:
            if segmentIdForLesion(lesionId) in userSegments:
                raise ValueError(_("segment '{segment}' in '{node}' was not made by LesionLocator and is not "
                                   "replaced; choose another lesion ID").format(
                    segment=segmentIdForLesion(lesionId), node=resultNode.GetName()))
        return lesionIds
    ids, taken = [], set()
    for spec in specs:
        lesionId = byPrompt.get(spec.ref)
        if lesionId is None or lesionId in taken:
            lesionId = 1
            while lesionId in occupied or lesionId in taken:
                lesionId += 1
        taken.add(lesionId)
        ids.append(lesionId)
    return ids


def tagSegment(segment, lesionId, spec, keepPromptTag=False) -> None:
    segment.SetTag(TAG_LESION_ID, str(lesionId))
    if not keepPromptTag:
        segment.SetTag(TAG_PROMPT, spec.ref)
    segment.SetTag(TAG_PROMPT_TYPE, spec.kind)


def newSegment(name, color, labelmap):
    """A vtkSegment holding ``labelmap`` as its binary labelmap."""
    segment = slicer.vtkSegment()
    segment.SetName(name)
    segment.SetColor(*color)
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), labelmap)
    return segment


def replaceSegmentVoxels(node, segmentId, labelmap) -> None:
    if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, node, segmentId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
        raise RuntimeError(_("could not write segment {segment} into '{node}'").format(segment=segmentId,
                                                                                   node=node.GetName()))


# ------------------------------------------------------------------ writing
def newResultNode(volumeNode):
    """A result segmentation for ``volumeNode``, not yet in the scene (see :func:`addResultNode`)."""
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(slicer.mrmlScene.GenerateUniqueName(f"{volumeNode.GetName()} lesions"))
    node.SetAttribute(ROLE_ATTRIBUTE, ROLE_RESULT)
    node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    return node


def writeResults(volumeNode, resultNode, specs, ids, labelmaps, keepPromptTag=False):
    """Write one labelmap per lesion ID into the result node (a new one when ``resultNode`` is
    None). Everything is computed before this point; here the scene changes. Returns
    ``(node, edit)``: ``edit`` is the :class:`LesionEdit` that undoes this write."""
    if resultNode is None:
        node = newResultNode(volumeNode)
        for spec, lesionId in zip(specs, ids):
            segment = newSegment(_("Lesion {id}").format(id=lesionId), colorForLesion(lesionId), labelmaps[lesionId])
            tagSegment(segment, lesionId, spec)
            node.GetSegmentation().AddSegment(segment, segmentIdForLesion(lesionId))
        addResultNode(node, volumeNode)
        return node, LesionEdit(node.GetID(), createdNode=True)
    node = resultNode
    edit = LesionEdit.before(node, [segmentIdForLesion(i) for i in ids])
    wasModified = node.StartModify()
    try:
        # the labelmaps are in the volume's frame: follow the volume if it was moved since
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        segmentation = node.GetSegmentation()
        for spec, lesionId in zip(specs, ids):
            segmentId = segmentIdForLesion(lesionId)
            segment = segmentation.GetSegment(segmentId)
            if segment is None:
                segment = newSegment(_("Lesion {id}").format(id=lesionId), colorForLesion(lesionId),
                                     labelmaps[lesionId])
                tagSegment(segment, lesionId, spec)
                segmentation.AddSegment(segment, segmentId)
                continue
            replaceSegmentVoxels(node, segmentId, labelmaps[lesionId])
            tagSegment(segment, lesionId, spec, keepPromptTag)
    finally:
        node.EndModify(wasModified)
    return node, edit


def addResultNode(node, volumeNode) -> None:
    """Add a new result segmentation to the scene on ``volumeNode``: display nodes, the volume's
    parent transform, source-volume and reference-geometry references, placed beside the volume."""
    slicer.mrmlScene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    node.SetNodeReferenceID(SOURCE_VOLUME_REFERENCE, volumeNode.GetID())
    node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), volumeNode.GetID())
    placeBesideVolume(node, volumeNode)


def placeBesideVolume(node, volumeNode) -> None:
    """Put the result under the volume's parent (study) in the subject hierarchy."""
    shNode = slicer.mrmlScene.GetSubjectHierarchyNode()
    if shNode is None:
        return
    volumeItem = shNode.GetItemByDataNode(volumeNode)
    nodeItem = shNode.GetItemByDataNode(node)
    if volumeItem and nodeItem:
        shNode.SetItemParent(nodeItem, shNode.GetItemParent(volumeItem))


def removeNode(node) -> None:
    """Remove a node and its display and storage nodes from the scene."""
    scene = slicer.mrmlScene
    if node is None or node.GetScene() is not scene:
        return
    helpers = [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())] \
        if node.IsA("vtkMRMLDisplayableNode") else []
    if node.IsA("vtkMRMLStorableNode"):
        helpers.append(node.GetStorageNode())
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is scene:
            scene.RemoveNode(helper)


# ------------------------------------------------------------------ undo
@dataclass
class LesionEdit:
    """What one segmentation run changed in a result node, to undo it (Ctrl+Z).

    ``createdNode``: the run made the node (undo removes it). Otherwise ``segments`` holds, per
    segment ID written, None (the segment was new: undo removes it) or its state before the
    run: (labelmap in the node's frame or None when it had no voxel, name, colour, tags)."""
    nodeId: str
    createdNode: bool = False
    segments: dict = field(default_factory=dict)

    @classmethod
    def before(cls, node, segmentIds) -> "LesionEdit":
        segmentation = node.GetSegmentation()
        saved = {}
        for segmentId in segmentIds:
            segment = segmentation.GetSegment(segmentId)
            if segment is None:
                saved[segmentId] = None
                continue
            saved[segmentId] = (segmentLabelmap(node, segmentId), segment.GetName(), tuple(segment.GetColor()),
                                {tag: segmentTag(segment, tag) for tag in TAGS})
        return cls(node.GetID(), False, saved)

    def undo(self) -> str:
        """Put the node back as it was before the run; returns what was undone, for the status line."""
        node = slicer.mrmlScene.GetNodeByID(self.nodeId)
        if node is None:
            raise ValueError(_("nothing to undo: the lesion segmentation was removed"))
        if self.createdNode:
            name = node.GetName()
            removeNode(node)
            return _("removed '{name}'").format(name=name)
        segmentation = node.GetSegmentation()
        wasModified = node.StartModify()
        try:
            for segmentId, state in self.segments.items():
                if state is None:
                    segmentation.RemoveSegment(segmentId)
                    continue
                labelmap, name, color, tags = state
                segment = segmentation.GetSegment(segmentId)
                if segment is None:
                    continue  # removed by the user since: leave it removed
                empty = slicer.vtkOrientedImageData()
                empty.SetExtent(0, 0, 0, 0, 0, 0)
                empty.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
                empty.GetPointData().GetScalars().Fill(0)
                if labelmap is not None:
                    empty = labelmap
                replaceSegmentVoxels(node, segmentId, empty)
                segment.SetName(name)
                segment.SetColor(*color)
                for tag, value in tags.items():
                    if value is None:
                        segment.RemoveTag(tag)
                    else:
                        segment.SetTag(tag, value)
        finally:
            node.EndModify(wasModified)
        return _("restored {n} lesion(s) in '{name}'").format(n=len(self.segments), name=node.GetName())


# ------------------------------------------------------------------ reading lesions back
@dataclass
class BaselineLesion:
    segmentId: str
    lesionId: int
    name: str
    color: tuple
    mask: np.ndarray


def segmentLesionIds(segmentationNode) -> dict:
    """{segment ID: lesion ID} of every segment, in segment order: the module's lesion tag, else N
    of a segment ID ``lesion_N``, else (and for a repeated ID) the next number after the largest."""
    segmentation = segmentationNode.GetSegmentation()
    segmentIds = list(segmentation.GetSegmentIDs())
    ids = {}
    for segmentId in segmentIds:
        lesionId = segmentLesionId(segmentation.GetSegment(segmentId))
        if lesionId is None:
            lesionId = lesionIdOfSegmentId(segmentId)
        if lesionId is not None and lesionId >= 1 and lesionId not in ids.values():
            ids[segmentId] = lesionId
    nextId = max(ids.values(), default=0) + 1
    for segmentId in segmentIds:
        if segmentId not in ids:
            ids[segmentId], nextId = nextId, nextId + 1
    return {segmentId: ids[segmentId] for segmentId in segmentIds}


def baselineLesions(segmentationNode, volumeNode, image=None) -> list:
    """The lesions of a baseline segmentation, in segment order: segment ID, lesion ID
    (:func:`segmentLesionIds`), name, colour and mask on ``volumeNode``'s voxels. Nothing in the
    scene changes."""
    segmentation = segmentationNode.GetSegmentation()
    if not segmentation.GetNumberOfSegments():
        raise ValueError(_("'{name}' has no segments: segment the lesions on the baseline first (click them), "
                           "then track").format(name=segmentationNode.GetName()))
    ids = segmentLesionIds(segmentationNode)
    lesions = []
    for segmentId in ids:
        segment = segmentation.GetSegment(segmentId)
        lesions.append(BaselineLesion(segmentId, ids[segmentId], segment.GetName(),
                                      tuple(float(c) for c in segment.GetColor()),
                                      segmentMask(segmentationNode, segmentId, volumeNode, image)))
    return lesions

