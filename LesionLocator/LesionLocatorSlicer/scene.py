"""Scene conversion: the one place where Slicer's RAS meets the library's LPS.

Frames: Slicer's world is RAS millimetres; volumes store IJK-to-RAS in their parent (transform)
frame; markups store control points in their parent frame. The library speaks LPS world
millimetres and (z, y, x) = (k, j, i) arrays. Points go through :func:`toLps` (parent transforms,
non-linear ones too, then RAS -> LPS); volume geometry through :func:`volumeToImage` and
:func:`volumeGrid` (built on :func:`toLps`; ``world=False``: the volume's own frame, for the
DICOM export); library masks come back through :func:`labelmapFromMask` (on the volume's voxels,
in the volume's frame) and segments go out through :func:`segmentMask`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import vtk

import slicer
from slicer.i18n import tr as _


class TransformError(ValueError):
    """A volume under a transform the module cannot apply to its voxel grid."""


@dataclass
class PromptSpec:
    """One lesion's prompt taken from the scene.

    ``ref``: where it came from (``"<point list ID>/<control point ID>"``, ``"<ROI ID>"`` or
    ``"<segmentation ID>/<segment ID>"``), stored as a segment tag so that prompting the same
    control point, ROI or segment again replaces the same lesion. ``kind``: 'point', 'box' or
    'mask'. ``lps``: (3,) point or (N, 3) box corners, LPS world millimetres (None for a mask).
    ``mask``: for 'mask', a :class:`LesionLocatorLib.image.Image` (uint8, 1 = inside) on the
    volume's voxel grid.
    """
    ref: str
    kind: str
    lps: np.ndarray = None
    mask: object = None

    def toLibrary(self, lesionId: int):
        from LesionLocatorLib.prompts import Box, MaskPrompt, Point

        if self.kind == "point":
            return Point(int(lesionId), tuple(float(v) for v in self.lps), name=self.ref)
        if self.kind == "mask":
            return MaskPrompt(int(lesionId), self.mask, name=self.ref)
        return Box.from_points(int(lesionId), self.lps, name=self.ref)


# ------------------------------------------------------------------ points and volumes
def toLps(node, pointsRas) -> np.ndarray:
    """Points given in ``node``'s own (parent-transform) RAS frame, mm, shape (3,) or (N, 3)
    -> LPS world mm, shape (N, 3).

    The node's parent transforms are applied exactly (non-linear ones too, point by point),
    giving Slicer world RAS; then x and y change sign (RAS -> LPS). ``node=None`` means the
    points are world RAS already.
    """
    points = np.asarray(pointsRas, dtype=float).reshape(-1, 3)
    parent = node.GetParentTransformNode() if node is not None else None
    if parent is not None:
        toWorld = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, toWorld)
        points = np.array([toWorld.TransformPoint(*p) for p in points], dtype=float).reshape(-1, 3)
    return points * np.array([-1.0, -1.0, 1.0])


def _checkScalarVolume(volumeNode) -> None:
    if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode") \
            or volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
        name = volumeNode.GetName() if volumeNode is not None else None
        raise ValueError(_("choose a scalar (CT) volume to segment; got {name}").format(name=repr(name)))
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        raise ValueError(_("volume '{name}' has no voxels").format(name=volumeNode.GetName()))
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError(_("volume '{name}' has {n} components per voxel; LesionLocator needs a single-component "
                           "CT").format(name=volumeNode.GetName(), n=imageData.GetNumberOfScalarComponents()))


def _checkLinearTransform(volumeNode) -> None:
    parent = volumeNode.GetParentTransformNode()
    if parent is not None and not parent.IsTransformToWorldLinear():
        raise TransformError(_(
            "volume '{name}' is under the non-linear transform '{transform}'. Harden the transform on the volume "
            "first (Data module: right-click the volume > 'Harden transform'), then segment.").format(
            name=volumeNode.GetName(), transform=parent.GetName()))


def volumeGeometry(volumeNode, world=True) -> tuple:
    """(origin, spacing, direction) of a volume in LPS: ``origin`` = LPS of voxel (0, 0, 0),
    ``spacing`` (x, y, z) mm = lengths of the mapped index axes, ``direction`` columns = their unit
    vectors (i, j, k). IJK-to-RAS is composed with the volume's parent transforms to world, then
    RAS -> LPS (through :func:`toLps`); ``world=False``: the parent transforms are left out (the
    volume's own frame, i.e. the patient frame of the file or DICOM series it was loaded from)."""
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    ijkToRas = slicer.util.arrayFromVTKMatrix(ijkToRas)
    ijk = np.array([[0, 0, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1], [0, 0, 1, 1]], dtype=float)
    lps = toLps(volumeNode if world else None, (ijk @ ijkToRas.T)[:, :3])
    origin, axes = lps[0], lps[1:] - lps[0]  # rows: index axes i, j, k in LPS
    spacing = np.linalg.norm(axes, axis=1)
    direction = (axes / spacing[:, None]).T  # columns: i, j, k
    if np.abs(direction.T @ direction - np.eye(3)).max() > 1e-4:
        raise TransformError(_(
            "the transform of volume '{name}' shears or scales its voxel axes unequally; harden the transform on the "
            "volume (or resample it), then segment.").format(name=volumeNode.GetName()))
    return tuple(origin), tuple(spacing), direction


def volumeToImage(volumeNode):
    """A scalar volume -> :class:`LesionLocatorLib.image.Image` in LPS world.

    ``array`` is a copy of the voxels in (k, j, i) = (z, y, x) order; the geometry is
    :func:`volumeGeometry`. A linear parent transform is applied (rotation, translation, uniform
    scaling: anything that keeps the voxel axes orthogonal). A non-linear parent transform raises
    :class:`TransformError` asking to harden it first: the voxel grid cannot follow it.
    """
    grid = volumeGrid(volumeNode)
    return grid.with_array(np.array(slicer.util.arrayFromVolume(volumeNode), copy=True))


def volumeGrid(volumeNode, world=True):
    """A scalar volume's voxel grid as an :class:`LesionLocatorLib.image.Image` without its voxels
    (a read-only array of False that takes no memory): shape (k, j, i), geometry
    :func:`volumeGeometry` in LPS world (as :func:`volumeToImage`), or with ``world=False`` in the
    volume's own frame (parent transforms left out, non-linear ones too)."""
    from LesionLocatorLib.image import Image

    _checkScalarVolume(volumeNode)
    if world:
        _checkLinearTransform(volumeNode)
    origin, spacing, direction = volumeGeometry(volumeNode, world)
    dims = volumeNode.GetImageData().GetDimensions()
    return Image(np.broadcast_to(np.zeros((), bool), (dims[2], dims[1], dims[0])), spacing, origin, direction)


def imageIjkToRas(image) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix (world) of a library Image: the inverse of the RAS -> LPS step
    of :func:`volumeToImage` (no transform involved: the Image is in world already)."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(image.direction, dtype=float) @ np.diag(np.asarray(image.spacing, dtype=float))
    m[:3, 3] = np.asarray(image.origin, dtype=float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ m


def indexToWorldRas(image, kji) -> np.ndarray:
    """A (k, j, i) = (z, y, x) voxel index of a library Image (LPS world; fractional indices
    allowed, e.g. a lesion's centre) -> Slicer world RAS mm, shape (3,). For an Image made by
    :func:`volumeToImage` this is the point MRML maps that voxel of the volume to through its
    parent transforms."""
    k, j, i = (float(v) for v in kji)
    return (imageIjkToRas(image) @ np.array([i, j, k, 1.0]))[:3]


def imageKey(volumeNode, image) -> str:
    """A name for exactly this volume's voxels and world geometry (node ID, the voxel data's
    modification time, the LPS geometry), so that a worker process keeps the volume between
    clicks. Slicer marks voxel edits as modifications (``arrayFromVolumeModified``)."""
    geometry = np.r_[image.origin, image.spacing, np.ravel(image.direction)]
    return (f"{volumeNode.GetID()}:{volumeNode.GetImageData().GetMTime()}:"
            + ",".join(f"{v:.6g}" for v in geometry))


# ------------------------------------------------------------------ prompts
def _noPrompt() -> ValueError:
    return ValueError(_("no prompt given: place a point or draw a box (ROI) on the lesion"))


def promptsFromNodes(promptNodes) -> list:
    """Scene prompts -> one :class:`PromptSpec` per lesion, in LPS world mm.

    ``promptNodes``: a node or a list of: point lists (each defined control point is one
    lesion), ``(point list, control point index)`` pairs (that point only) and ROI nodes
    (one lesion each: the world box around the ROI's 8 corners).
    """
    if promptNodes is None:
        raise _noPrompt()
    if not isinstance(promptNodes, (list, tuple)) or (
            len(promptNodes) == 2 and isinstance(promptNodes[1], int) and not isinstance(promptNodes[0], int)):
        promptNodes = [promptNodes]
    specs = []
    for item in promptNodes:
        index = None
        if isinstance(item, (tuple, list)):
            item, index = item
        if item is None:
            raise _noPrompt()
        if item.IsA("vtkMRMLMarkupsROINode"):
            specs.append(roiPrompt(item))
        elif item.IsA("vtkMRMLMarkupsFiducialNode"):
            specs.extend(pointPrompts(item, index))
        else:
            raise ValueError(_("'{name}' ({cls}) is not a prompt: use a point list or an ROI").format(
                name=item.GetName(), cls=item.GetClassName()))
    if not specs:
        raise ValueError(_("the prompt has no placed control points: click the lesion first"))
    return specs


def pointPrompts(pointList, index=None) -> list:
    """One point :class:`PromptSpec` per defined control point of a point list (or only ``index``);
    points still being placed are skipped."""
    indices = range(pointList.GetNumberOfControlPoints()) if index is None else [index]
    specs = []
    for i in indices:
        if not 0 <= i < pointList.GetNumberOfControlPoints():
            raise ValueError(_("'{name}' has no control point {index}").format(name=pointList.GetName(), index=i))
        if pointList.GetNthControlPointPositionStatus(i) != slicer.vtkMRMLMarkupsNode.PositionDefined:
            continue  # still being placed
        local = np.array(pointList.GetNthControlPointPosition(i), dtype=float)
        specs.append(PromptSpec(f"{pointList.GetID()}/{pointList.GetNthControlPointID(i)}", "point",
                                toLps(pointList, local)[0]))
    return specs


def roiCornersLocal(roiNode) -> np.ndarray:
    """The 8 corners (8, 3) of an ROI in its node (parent-transform) frame, mm."""
    size = np.array(roiNode.GetSize(), dtype=float)
    objectToNode = slicer.util.arrayFromVTKMatrix(roiNode.GetObjectToNodeMatrix())
    signs = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    return (np.c_[signs * size, np.ones(8)] @ objectToNode.T)[:, :3]


def roiPrompt(roiNode) -> PromptSpec:
    """An ROI as a box :class:`PromptSpec`: the world box around its 8 corners (LPS mm)."""
    if roiNode.GetNumberOfControlPoints() == 0:
        raise ValueError(_("ROI '{name}' is not placed yet").format(name=roiNode.GetName()))
    return PromptSpec(roiNode.GetID(), "box", toLps(roiNode, roiCornersLocal(roiNode)))


def segmentPrompt(segmentationNode, segmentId, volumeNode, image) -> PromptSpec:
    """A segment as a mask prompt: its voxels on ``volumeNode``'s grid (:func:`segmentMask`,
    which follows the parent transforms of both nodes), as a mask Image with ``image``'s
    (the volume's :func:`volumeToImage`) geometry. Raises ``PromptError`` when no voxel of
    the segment lies on the volume (an empty segment: nothing to refine)."""
    from LesionLocatorLib.prompts import PromptError

    segment = segmentationNode.GetSegmentation().GetSegment(segmentId) if segmentationNode else None
    if segment is None:
        raise ValueError(_("segment {id} not found").format(id=repr(segmentId)))
    mask = segmentMask(segmentationNode, segmentId, volumeNode, image)
    if not mask.any():
        if segmentLabelmap(segmentationNode, segmentId) is not None:
            raise PromptError(_("segment '{segment}' has no voxel inside volume '{volume}': nothing to refine "
                                "there").format(segment=segment.GetName(), volume=volumeNode.GetName()))
        raise PromptError(_("segment '{segment}' is empty: nothing to refine").format(segment=segment.GetName()))
    return PromptSpec(f"{segmentationNode.GetID()}/{segmentId}", "mask", mask=image.with_array(mask.astype(np.uint8)))


# ------------------------------------------------------------------ segments <-> masks
def segmentMask(segmentationNode, segmentId, volumeNode, image=None) -> np.ndarray:
    """A segment as a boolean (k, j, i) array on ``volumeNode``'s voxels, without adding nodes
    to the scene. Only the segment's own voxels count (segments edited in the Segment Editor
    share a labelmap layer, each with its own label value). A segmentation under the volume's
    own parent transform is read in that frame (exact for segments made on this volume);
    otherwise both go to world first -- the segmentation through its parent transforms
    (non-linear ones too), the volume's grid through :func:`volumeGrid` (``image``: its world
    geometry, e.g. :func:`volumeToImage`; computed when not given) -- and the segment is
    resampled (nearest neighbour) onto the volume's voxels."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is None:
        raise ValueError(_("'{node}' has no segment {id}").format(node=segmentationNode.GetName(), id=repr(segmentId)))
    sameFrame = segmentationNode.GetParentTransformNode() is volumeNode.GetParentTransformNode()
    labelmap = segmentLabelmap(segmentationNode, segmentId, toWorld=not sameFrame)
    dims = volumeNode.GetImageData().GetDimensions()
    mask = np.zeros((dims[2], dims[1], dims[0]), dtype=bool)
    if labelmap is None:
        return mask
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    if sameFrame:
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
    else:
        ijkToRas = slicer.util.vtkMatrixFromArray(imageIjkToRas(image if image is not None
                                                               else volumeGrid(volumeNode)))
    reference.SetImageToWorldMatrix(ijkToRas)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            labelmap, reference, resampled, False, True):
        raise RuntimeError(_("could not resample segment '{segment}' onto '{volume}'").format(
            segment=segment.GetName(), volume=volumeNode.GetName()))
    _pasteExtent(mask, resampled)
    return mask


def _pasteExtent(mask: np.ndarray, image) -> None:
    """Copy the non-zero voxels of a vtkImageData (extent in ``mask``'s (i, j, k) index space) into ``mask``."""
    from vtk.util import numpy_support

    e = image.GetExtent()
    if image.GetPointData().GetScalars() is None or e[1] < e[0]:
        return
    block = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(
        e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1) > 0
    lo = np.maximum([e[4], e[2], e[0]], 0)
    hi = np.minimum([e[5] + 1, e[3] + 1, e[1] + 1], mask.shape)
    if np.all(hi > lo):
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = block[lo[0] - e[4]:hi[0] - e[4], lo[1] - e[2]:hi[1] - e[2],
                                                            lo[2] - e[0]:hi[2] - e[0]]


def segmentLabelmap(segmentationNode, segmentId, toWorld=False):
    """A segment's voxels as a 0/1 vtkOrientedImageData in the segmentation node's frame (or
    in world with ``toWorld``: through the node's parent transforms), or None when the
    segment has no voxel. The segment's binary labelmap may be a layer shared with other
    segments: only voxels carrying this segment's label value are kept."""
    from vtk.util import numpy_support

    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    internal = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
    if internal is None:
        raise ValueError(_("segment '{segment}' of '{node}' has no binary labelmap; create it in the Segmentations "
                           "module (Representations)").format(segment=segment.GetName(),
                                                               node=segmentationNode.GetName()))
    extent = internal.GetExtent()
    if internal.GetPointData().GetScalars() is None or extent[1] < extent[0] or extent[3] < extent[2] \
            or extent[5] < extent[4]:
        return None
    labelmap = slicer.vtkOrientedImageData()
    labelmap.DeepCopy(internal)  # voxels and geometry (image to node frame)
    values = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
    own = values == segment.GetLabelValue()
    if not own.any():
        return None
    values[:] = own
    labelmap.Modified()
    if toWorld:
        slicer.vtkSlicerSegmentationsModuleLogic.ApplyParentTransformToOrientedImageData(segmentationNode, labelmap)
    return labelmap


def labelmapFromMask(mask, volumeNode, ijkToRas=None, bbox=None):
    """A (k, j, i) boolean mask on the volume's voxels -> vtkOrientedImageData in the volume's
    own (parent-transform) frame (or with the given IJK-to-RAS matrix), cropped to the mask's
    bounding box (one empty voxel for an empty mask). ``bbox``: the mask's
    :func:`LesionLocatorLib.protocol.mask_bbox` when already known (it costs a pass over the volume)."""
    from vtk.util import numpy_support

    from LesionLocatorLib.protocol import mask_bbox

    mask = np.asarray(mask, dtype=bool)
    lo, hi = mask_bbox(mask) if bbox is None else bbox
    hi = np.maximum(hi - 1, lo)  # inclusive; an empty mask gives voxel (0, 0, 0)
    block = np.ascontiguousarray(mask[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1], dtype=np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(int(lo[2]), int(hi[2]), int(lo[1]), int(hi[1]), int(lo[0]), int(hi[0]))
    if ijkToRas is None:
        ijkToRas = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(ijkToRas)
    image.SetImageToWorldMatrix(ijkToRas)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = block.ravel()
    return image


# ------------------------------------------------------------------ dates
def studyDateTime(volumeNode):
    """The DICOM study date and time of a volume as a sortable 'YYYYMMDDHHMMSS.ffffff' string
    (:func:`LesionLocatorLib.study.dicom_datetime`), or None. Read from the node's own
    ``DICOM.StudyDate``/``DICOM.StudyTime`` attributes, else from its subject-hierarchy ancestors
    (the study item the DICOM loader creates)."""
    from LesionLocatorLib.study import dicom_datetime

    constants = slicer.vtkMRMLSubjectHierarchyConstants
    dateName, timeName = constants.GetDICOMStudyDateAttributeName(), constants.GetDICOMStudyTimeAttributeName()
    found = dicom_datetime(volumeNode.GetAttribute(dateName), volumeNode.GetAttribute(timeName))
    if found:
        return found
    shNode = slicer.mrmlScene.GetSubjectHierarchyNode() if slicer.mrmlScene is not None else None
    if shNode is None:
        return None
    item = shNode.GetItemByDataNode(volumeNode)
    while item and item != shNode.GetSceneItemID():
        found = dicom_datetime(shNode.GetItemAttribute(item, dateName), shNode.GetItemAttribute(item, timeName))
        if found:
            return found
        item = shNode.GetItemParent(item)
    return None
