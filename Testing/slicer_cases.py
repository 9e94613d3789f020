"""Scene builders shared by the module's tests on the real MRML scene (``slicer_harness``): linear
transforms, volumes at a given world geometry, point lists, and the three-timepoint phantom study
(``three_timepoints`` in conftest.py) loaded as oblique, anisotropic volumes under parent transforms."""
import numpy as np

import slicer
import slicer.util
import vtk


def rotation(axis, degrees):
    """3x3 rotation about ``axis`` (through MRML's own vtkTransform)."""
    t = vtk.vtkTransform()
    t.RotateWXYZ(degrees, *axis)
    return slicer.util.arrayFromVTKMatrix(t.GetMatrix())[:3, :3]


def rigid(axis, degrees, translation):
    """4x4 rigid transform: a rotation about ``axis`` then a translation (mm)."""
    m = np.eye(4)
    m[:3, :3] = rotation(axis, degrees)
    m[:3, 3] = translation
    return m


def ijk_to_ras_of(image):
    """World IJK-to-RAS (4x4) of a library Image (LPS), computed here independently."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(image.direction) @ np.diag(image.spacing)
    m[:3, 3] = image.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ m


def volume_at_world_geometry(h, image, name, parent_to_world=None):
    """A volume whose world geometry is the Image's: under ``parent_to_world`` (4x4) its own
    IJK-to-RAS is inverse(parent) @ world."""
    world = ijk_to_ras_of(image)
    local = world if parent_to_world is None else np.linalg.inv(parent_to_world) @ world
    volume = h.add_volume(np.asarray(image.array), local, name)
    if parent_to_world is not None:
        volume.SetAndObserveTransformNodeID(h.add_linear_transform(parent_to_world, name + " transform").GetID())
    return volume


def points(h, world_positions, name="clicks", transform=None):
    """A point list with one control point per world RAS position (optionally under ``transform``)."""
    node = h.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    if transform is not None:
        node.SetAndObserveTransformNodeID(transform.GetID())
    for p in world_positions:
        node.AddControlPointWorld(list(map(float, p)))
    return node


PHANTOM_LESION_CENTRES = [(12, 30, 28), (10, 44, 42)]  # (k, j, i) of the two lesions on the baseline


def phantom_case(h, images):
    """The ``three_timepoints`` images as volumes (t0 and t1 under rotating parent transforms, t2
    without) and a point list clicking the two lesions on the baseline."""
    parents = [rigid((0.3, 1, 0.2), 20, (8.0, -6.0, 4.0)), rigid((1, 0, 0), -15, (-3.0, 2.0, 9.0)), None]
    volumes = [volume_at_world_geometry(h, image, f"CT t{t}", parent) for t, (image, parent)
               in enumerate(zip(images, parents))]
    ijk = vtk.vtkMatrix4x4()
    volumes[0].GetIJKToRASMatrix(ijk)
    world = []
    for kji in PHANTOM_LESION_CENTRES:
        local = ijk.MultiplyPoint([kji[2], kji[1], kji[0], 1.0])[:3]
        out = [0.0, 0.0, 0.0]
        volumes[0].TransformPointToWorld(local, out)
        world.append(out)
    return volumes, points(h, world, name="baseline clicks")
