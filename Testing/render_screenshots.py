"""Render the extension's catalogue screenshots through Slicer's own slice-view machinery.

    .venv/bin/python Testing/render_screenshots.py [--demo-output DIR] [--out DIR]

What it does, all on a real MRML scene (:class:`slicer_harness.SlicerHarness`, PyPI
``slicer-core``), offscreen, without the Slicer application:

1. runs ``lesionlocator demo`` (the shipped demo model on the shipped demo case, about 20 s
   on CPU) unless ``--demo-output`` names a folder it already wrote: per timepoint an
   instance label map ``demo_t<N>_lesions.nii.gz`` (label = lesion ID) and ``lesions.csv``;
2. loads the demo CTs (``Resources/Demo/demo_t<N>.nii.gz``) as scalar volumes and each
   label map as a label map volume, imported into a segmentation with the Segmentations
   module logic: one segment per lesion ID, named "Lesion N" and coloured as the module
   colours lesion N (``LesionLocatorSlicer.results.colorForLesion``); the baseline clicks
   (``Resources/Demo/demo_points.json``, voxel z, y, x of demo_t0) become a point list;
3. renders slice views as Slicer's slice widget does: a ``vtkMRMLSliceLogic`` per view (its
   blended layer image drawn by a ``vtkImageMapper``/``vtkActor2D``, the CT in the background
   layer at W 400 / L 40), and the displayable managers registered with
   ``vtkMRMLSliceViewDisplayableManagerFactory`` (``vtkMRMLSegmentationsDisplayableManager2D``,
   ``vtkMRMLMarkupsDisplayableManager``) instantiated on the view's renderer of an offscreen
   ``vtkRenderWindow``; each segmentation and the point list are shown only in their views
   (display node view IDs), as one would set them up in Slicer;
4. writes ``Resources/Screenshots/segment.png`` (2 x 2 axial baseline slices, one through each
   click: the point and every lesion outline/fill crossing that slice) and ``track.png``
   (rows: the shrinking lesion 3 and the growing lesion 4; columns: baseline, follow-up 1,
   follow-up 2, each the axial slice through that lesion's centre at that timepoint, with
   its volume and change from ``lesions.csv``).

Rendering needs an OpenGL context, not an X display: VTK's wheel falls back to EGL (Mesa:
Debian ``libegl1 libegl-mesa0 libgl1-mesa-dri``) when ``DISPLAY`` is unset; under
``xvfb-run -a`` it uses GLX instead. Either gives the same pictures.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO = REPO / "Resources" / "Demo"
SCREENSHOTS = REPO / "Resources" / "Screenshots"
TIMEPOINTS = 3  # demo_t0 (baseline), demo_t1, demo_t2
WINDOW, LEVEL = 400.0, 40.0  # soft-tissue CT window
TRACK_LESIONS = (3, 4)  # rows of track.png: lesion 3 shrinks, lesion 4 grows
TRACK_FOV_MM = 150.0  # width of a track.png panel
SEGMENT_PANEL = (400, 330)  # pixels of one segment.png view (the demo slice is 366 x 303 mm)
TRACK_PANEL = (300, 260)

if not os.environ.get("DISPLAY"):
    # no X server: go straight to VTK's EGL window instead of trying X first (and warning)
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

sys.path.insert(0, str(HERE))
from slicer_harness import SlicerHarness, import_module_file  # noqa: E402  (after the path and EGL set-up)


# ----------------------------------------------------------------------------- demo data
def run_demo(out: Path) -> None:
    exe = Path(sys.executable).with_name("lesionlocator")
    cmd = [str(exe), "demo", "-o", str(out), "--disable_progress_bar"]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def read_table(path: Path) -> dict:
    """lesions.csv -> {(lesion_id, timepoint index): row}."""
    with open(path, newline="") as f:
        return {(int(r["lesion_id"]), int(r["index"])): r for r in csv.DictReader(f)}


def read_points(path: Path) -> dict:
    """Upstream point prompts {"<id>": {"point": [z, y, x]}} -> {id: (i, j, k)} voxel indices."""
    with open(path) as f:
        data = json.load(f)
    return {int(key): tuple(float(v) for v in reversed(value["point"])) for key, value in data.items()}


# ----------------------------------------------------------------------------- the scene
class Scene:
    def __init__(self, harness: SlicerHarness, colorForLesion):
        import slicer

        self.slicer = slicer
        self.h = harness
        self.scene = harness.scene
        self.colorForLesion = colorForLesion

    def load_volume(self, path: Path, name: str, labelmap: bool = False):
        slicer = self.slicer
        node = self.scene.AddNewNodeByClass(
            "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            raise RuntimeError(f"could not read {path}")
        node.CreateDefaultDisplayNodes()
        if not labelmap:
            display = node.GetDisplayNode()
            display.SetAutoWindowLevel(0)
            display.SetWindowLevel(WINDOW, LEVEL)
        return node

    def lesion_segmentation(self, labelPath: Path, volume, name: str):
        """Label map (instance labels = lesion IDs) -> segmentation, one segment per lesion."""
        labelmap = self.load_volume(labelPath, name + " labels", labelmap=True)
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        if not self.h.logics["Segmentations"].ImportLabelmapToSegmentationNode(labelmap, node):
            raise RuntimeError(f"could not import {labelPath}")
        self.scene.RemoveNode(labelmap)
        segmentation = node.GetSegmentation()
        ids = {}
        for segmentId in segmentation.GetSegmentIDs():
            segment = segmentation.GetSegment(segmentId)
            lesionId = segment.GetLabelValue()
            segment.SetName(f"Lesion {lesionId}")
            segment.SetColor(*self.colorForLesion(lesionId))
            ids[lesionId] = segmentId
        present = sorted(int(v) for v in np.unique(self._labels(labelPath)) if v)
        if sorted(ids) != present:
            raise RuntimeError(f"{labelPath}: segments {sorted(ids)} != labels {present}")
        display = node.GetDisplayNode()
        display.SetSliceIntersectionThickness(2)  # readable outlines at catalogue size
        return node, ids

    def _labels(self, path: Path) -> np.ndarray:
        import nibabel

        return np.asarray(nibabel.load(str(path)).dataobj)

    def point_list(self, name: str, volume, points_ijk: dict):
        from vtkmodules.vtkCommonDataModel import vtkVector3d
        from vtkmodules.vtkCommonMath import vtkMatrix4x4

        node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        ijkToRas = vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        for lesionId, ijk in sorted(points_ijk.items()):
            ras = ijkToRas.MultiplyPoint((*ijk, 1.0))[:3]
            node.AddControlPointWorld(vtkVector3d(*ras), str(lesionId))
        node.SetLocked(True)
        node.GetDisplayNode().SetGlyphScale(2.5)  # Slicer's default is 3 (% of the view): less of the lesion hidden
        return node


def voxel_to_ras(volume, ijk) -> np.ndarray:
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    m = vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    return np.array(m.MultiplyPoint((*map(float, ijk), 1.0))[:3])


# ----------------------------------------------------------------------------- slice views
class SliceView:
    """One slice view as qMRMLSliceWidget builds it: slice logic + displayable managers."""

    _factory = None

    @classmethod
    def factory(cls, appLogic):
        import slicer

        if cls._factory is None:
            factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
            factory.SetMRMLApplicationLogic(appLogic)
            for name in ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLMarkupsDisplayableManager"):
                if not factory.IsDisplayableManagerRegistered(name):
                    factory.RegisterDisplayableManager(name)
            cls._factory = factory
        return cls._factory

    def __init__(self, harness: SlicerHarness, name: str, size, background):
        import slicer
        from vtkmodules.vtkRenderingCore import (
            vtkActor2D,
            vtkImageMapper,
            vtkRenderer,
            vtkRenderWindow,
            vtkRenderWindowInteractor,
        )

        self.size = size
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(harness.appLogic)
        self.logic.SetMRMLScene(harness.scene)
        self.logic.AddSliceNode(name)
        harness.appLogic.GetSliceLogics().AddItem(self.logic)
        self.node = self.logic.GetSliceNode()
        self.node.SetOrientation("Axial")
        self.node.SetDimensions(size[0], size[1], 1)
        self.logic.GetSliceCompositeNode().SetBackgroundVolumeID(background.GetID())
        self.logic.FitSliceToAll()

        self.window = vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetSize(*size)
        self.renderer = vtkRenderer()
        self.renderer.SetBackground(0, 0, 0)
        self.window.AddRenderer(self.renderer)
        # Slicer's views always have an interactor; the displayable managers need it
        self.interactor = vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        # the slice logic's blended layers, drawn as ctkVTKSliceView draws them
        mapper = vtkImageMapper()
        mapper.SetColorWindow(255)
        mapper.SetColorLevel(127.5)
        mapper.SetInputConnection(self.logic.GetImageDataConnection())
        self.imageActor = vtkActor2D()
        self.imageActor.SetMapper(mapper)
        self.renderer.AddViewProp(self.imageActor)
        self.managers = self.factory(harness.appLogic).InstantiateDisplayableManagers(self.renderer)
        self.managers.SetMRMLDisplayableNode(self.node)

    def show_on_slice_through(self, ras, fov_mm=None):
        if fov_mm is None:
            self.logic.FitSliceToAll()
            self.logic.SetSliceOffset(float(ras[2]))
        else:
            aspect = self.size[1] / self.size[0]
            self.node.SetFieldOfView(fov_mm, fov_mm * aspect, self.node.GetFieldOfView()[2])
            self.node.JumpSliceByCentering(*map(float, ras))

    def text(self, lines, corner: str, size=15, color=(1, 1, 1)):
        from vtkmodules.vtkRenderingCore import vtkTextActor

        actor = vtkTextActor()
        actor.SetInput("\n".join(lines))
        prop = actor.GetTextProperty()
        prop.SetFontSize(size)
        prop.SetColor(*color)
        prop.SetFontFamilyToArial()
        prop.ShadowOn()
        prop.SetJustificationToLeft() if corner.endswith("left") else prop.SetJustificationToRight()
        prop.SetVerticalJustificationToTop() if corner.startswith("top") else prop.SetVerticalJustificationToBottom()
        x = 6 if corner.endswith("left") else self.size[0] - 6
        y = self.size[1] - 5 if corner.startswith("top") else 5
        actor.SetDisplayPosition(x, y)
        self.renderer.AddViewProp(actor)

    def capture(self) -> np.ndarray:
        from vtkmodules.util.numpy_support import vtk_to_numpy
        from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

        self.window.Render()
        grab = vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        w, h, _ = image.GetDimensions()
        pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[::-1, :, :3]
        return np.ascontiguousarray(pixels)

    def close(self):
        self.managers.SetMRMLDisplayableNode(None)
        self.window.Finalize()


def show_only_in(displayNode, views) -> None:
    displayNode.RemoveAllViewNodeIDs()
    for view in views:
        displayNode.AddViewNodeID(view.node.GetID())


def grid(rows, gap=4) -> np.ndarray:
    """Panels (rows of equally sized HxWx3 arrays) -> one image with white gaps."""
    height = sum(r[0].shape[0] for r in rows) + gap * (len(rows) - 1)
    width = sum(p.shape[1] for p in rows[0]) + gap * (len(rows[0]) - 1)
    out = np.full((height, width, 3), 255, np.uint8)
    y = 0
    for row in rows:
        x = 0
        for panel in row:
            out[y:y + panel.shape[0], x:x + panel.shape[1]] = panel
            x += panel.shape[1] + gap
        y += row[0].shape[0] + gap
    return out


def save_png(pixels: np.ndarray, path: Path) -> None:
    """RGB PNG, the rendered pixels unchanged (a 256-colour palette shifts the lesion colours)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, optimize=True)


# ----------------------------------------------------------------------------- screenshots
def render(demo_out: Path, out_dir: Path) -> dict:
    harness = SlicerHarness().activate()
    import_module_file()  # puts the module's folder on sys.path, as Slicer does
    from LesionLocatorSlicer.results import colorForLesion
    scene = Scene(harness, colorForLesion)
    table = read_table(demo_out / "lesions.csv")
    points = read_points(DEMO / "demo_points.json")

    volumes, segmentations = [], []
    for t in range(TIMEPOINTS):
        volume = scene.load_volume(DEMO / f"demo_t{t}.nii.gz", f"demo_t{t}")
        seg = scene.lesion_segmentation(demo_out / f"demo_t{t}_lesions.nii.gz", volume, f"demo_t{t} lesions")
        volumes.append(volume)
        segmentations.append(seg)
    pointList = scene.point_list("Lesion points", volumes[0], points)
    labels = [scene._labels(demo_out / f"demo_t{t}_lesions.nii.gz") for t in range(TIMEPOINTS)]

    # segment.png: the baseline slice through each click
    segViews = []
    for lesionId, ijk in sorted(points.items()):
        view = SliceView(harness, f"Click{lesionId}", SEGMENT_PANEL, volumes[0])
        view.show_on_slice_through(voxel_to_ras(volumes[0], ijk))  # the whole slice, through the click
        row = table[(lesionId, 0)]
        view.text([f"Lesion {lesionId}"], "top left", size=17, color=colorForLesion(lesionId))
        view.text(["Baseline"], "top right", size=15)
        view.text([f"{float(row['volume_ml']):.1f} ml", f"{float(row['long_axis_mm']):.0f} mm long axis"],
                  "bottom right", size=14)
        segViews.append(view)

    # track.png: each tracked lesion at each timepoint, through its centre there
    trackRows, trackViews = [], [[] for _ in range(TIMEPOINTS)]
    for lesionId in TRACK_LESIONS:
        row = []
        for t in range(TIMEPOINTS):
            view = SliceView(harness, f"Track{lesionId}t{t}", TRACK_PANEL, volumes[t])
            centre_ijk = np.argwhere(labels[t] == lesionId).mean(axis=0)  # nibabel (i, j, k)
            view.show_on_slice_through(voxel_to_ras(volumes[t], centre_ijk), fov_mm=TRACK_FOV_MM)
            r = table[(lesionId, t)]
            view.text(["Baseline" if t == 0 else f"Follow-up {t}"], "top left", size=16)
            view.text([f"Lesion {lesionId}"], "top right", size=16, color=colorForLesion(lesionId))
            change = "" if t == 0 else f" ({float(r['volume_change_vs_baseline_pct']):+.0f}%)"
            view.text([f"{float(r['volume_ml']):.1f} ml{change}"], "bottom right", size=15)
            trackViews[t].append(view)
            row.append(view)
        trackRows.append(row)

    # Which view shows what (an empty view list would mean every view): the baseline lesions
    # and the clicks in the segment views and the baseline column, follow-up t's lesions in
    # column t only.
    show_only_in(segmentations[0][0].GetDisplayNode(), segViews + trackViews[0])
    show_only_in(pointList.GetDisplayNode(), segViews)
    for t in range(1, TIMEPOINTS):
        show_only_in(segmentations[t][0].GetDisplayNode(), trackViews[t])
    segPanels = [view.capture() for view in segViews]
    segment = grid([segPanels[0:2], segPanels[2:4]])
    track = grid([[view.capture() for view in row] for row in trackRows])
    views = segViews + [v for row in trackRows for v in row]

    out_dir.mkdir(parents=True, exist_ok=True)
    save_png(segment, out_dir / "segment.png")
    save_png(track, out_dir / "track.png")
    for view in views:
        view.close()
    harness.deactivate()
    return {"segment.png": segment.shape, "track.png": track.shape}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-output", type=Path,
                        help="folder written by `lesionlocator demo -o` (default: run the demo now)")
    parser.add_argument("--out", type=Path, default=SCREENSHOTS, help=f"where the PNGs go (default {SCREENSHOTS})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lesionlocator_screenshots_") as tmp:
        demo_out = args.demo_output
        if demo_out is None:
            demo_out = Path(tmp)
            run_demo(demo_out)
        demoTime = time.perf_counter() - start
        shapes = render(demo_out, args.out)
    for name, shape in shapes.items():
        path = args.out / name
        print(f"wrote {path} ({shape[1]} x {shape[0]} px, {path.stat().st_size // 1024} KB)")
    print(f"demo {demoTime:.1f} s, rendering {time.perf_counter() - start - demoTime:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
