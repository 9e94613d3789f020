"""Registration of two timepoints: one small protocol, several backends.

``register(fixed, moving, backend)`` returns a :class:`Transform` between two
scans of the same patient:

* ``fixed``: the scan we move *to* (the follow-up, timepoint t);
* ``moving``: the scan we move *from* (the previous timepoint t-1).

The transform follows ITK's convention internally (it maps a fixed-space world
point to the matching moving-space world point, which is what resampling needs);
:meth:`Transform.map_points` goes the other way, moving -> fixed, as a tracker
needs for prompts. All points are LPS millimetres (x, y, z).

Backends:

* ``simpleitk`` (default): moments initialisation, multi-resolution affine, then fast
  symmetric forces demons, all at a coarse isotropic spacing, with a similarity check
  that falls back to the affine;
* ``greedy`` (optional package ``picsl-greedy``): the same pipeline with greedy's
  affine and deformable NCC registration;
* ``unigradicon`` (optional package ``unigradicon``): LesionLocator's own registration
  network, stored in the LesionLocatorTrack checkpoint ('reg_net.' weights), on both
  scans resampled to 175^3 (GPU recommended; about half a minute on a 2-core CPU);
* ``none``: the scans are already aligned in world space.

Every call counts in :data:`REGISTRATION_CALLS`.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .image import Image
from .protocol import mask_bbox

REGISTRATION_CALLS = 0
"""Number of registrations run in this process (the tracker runs one per timepoint pair)."""


class RegistrationError(RuntimeError):
    """A registration backend that cannot run (missing package, unusable images)."""


class Transform:
    """A fixed <- moving mapping between two scans (see the module docstring for directions)."""

    def __init__(self, itk_transform: sitk.Transform, backend: str, info: dict | None = None):
        self.itk = itk_transform
        self.backend = backend
        self.info = dict(info or {})

    def info_json(self) -> dict:
        """``info`` as JSON values: texts kept, numbers as floats."""
        return {k: v if isinstance(v, str) else float(v) for k, v in self.info.items()}

    # -------------------------------------------------------------------- points
    def fixed_to_moving(self, points_xyz) -> np.ndarray:
        """Fixed-space LPS points (N, 3) -> moving-space LPS points (ITK direction)."""
        pts = np.asarray(points_xyz, float).reshape(-1, 3)
        return np.array([self.itk.TransformPoint(tuple(p)) for p in pts])

    def map_points(self, points_xyz, iterations: int = 50, tol_mm: float = 1e-3, step_mm: float = 0.5) -> np.ndarray:
        """Moving-space LPS points (N, 3) -> fixed-space LPS points.

        Inverts the transform numerically: Newton iterations started at the point itself,
        with the Jacobian from finite differences of ``step_mm``, which works for the
        smooth, invertible deformations registration gives, also when their linear part
        is far from the identity (scans of different orientation or extent).
        """
        targets = np.asarray(points_xyz, float).reshape(-1, 3)
        x = targets.copy()
        offsets = np.vstack([np.zeros(3), np.eye(3) * step_mm])  # (4, 3)
        for _ in range(iterations):
            moved = self.fixed_to_moving((x[:, None, :] + offsets[None]).reshape(-1, 3)).reshape(-1, 4, 3)
            err = moved[:, 0] - targets
            if np.max(np.abs(err)) < tol_mm:
                break
            jac = np.transpose(moved[:, 1:] - moved[:, :1], (0, 2, 1)) / step_mm  # (N, 3, 3): d moved / d x
            try:
                x = x - np.linalg.solve(jac, err[..., None])[..., 0]
            except np.linalg.LinAlgError:  # a singular finite difference (degenerate field): plain fixed point
                x = x - err
        return x

    # -------------------------------------------------------------------- images
    def warp_mask(self, mask: Image, reference: Image, linear: bool = True, threshold: float = 0.5,
                  margin_mm: float = 25.0) -> Image:
        """A binary mask on the moving grid -> bool mask on ``reference`` (the fixed grid).

        Linear interpolation + ``threshold`` (or nearest neighbour). Only the region
        around the mapped mask is resampled, so warping a lesion is cheap on large scans.
        """
        arr = np.asarray(mask.array) > 0
        out = np.zeros(reference.shape, bool)
        if not arr.any():
            return reference.with_array(out)
        region = self._target_region(arr, mask, reference, margin_mm)
        if region is None:
            return reference.with_array(out)
        lo, hi = region
        src = _crop_image(mask.with_array(arr), arr, margin_vox=3)
        ref = _sub_reference(reference, lo, hi)
        interp = sitk.sitkLinear if linear else sitk.sitkNearestNeighbor
        warped = sitk.GetArrayFromImage(sitk.Resample(src, ref, self.itk, interp, 0.0, sitk.sitkFloat32))
        out[tuple(slice(a, b) for a, b in zip(lo, hi))] = warped >= threshold if linear else warped > 0.5
        return reference.with_array(out)

    def warp_labels(self, labels: Image, reference: Image) -> Image:
        """Instance labels on the moving grid -> the fixed grid (nearest neighbour, IDs kept)."""
        src = labels.with_array(np.asarray(labels.array).astype(np.uint16)).to_sitk()
        ref = reference.with_array(np.zeros(reference.shape, np.uint16)).to_sitk()
        out = sitk.Resample(src, ref, self.itk, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
        return reference.with_array(sitk.GetArrayFromImage(out))

    def mapped_region(self, arr, mask: Image, reference: Image, margin_mm: float) -> tuple:
        """Half-open (z, y, x) index box ``(a, b)`` on ``reference``'s grid, not cut at its edges, around
        the bounding box of ``arr`` (voxels of ``mask``'s grid) mapped by this transform, plus
        ``margin_mm`` millimetres on every side."""
        lo, hi = mask_bbox(arr)
        hi = hi - 1  # the last voxel
        corners = np.array([[z, y, x] for z in (lo[0], hi[0]) for y in (lo[1], hi[1]) for x in (lo[2], hi[2])], float)
        mapped = reference.world_to_index(self.map_points(mask.index_to_world(corners)))
        margin = margin_mm / np.asarray(reference.spacing_zyx)
        a = np.floor(mapped.min(0) - margin).astype(int)
        b = np.ceil(mapped.max(0) + margin).astype(int) + 1
        return a, b

    def _target_region(self, arr, mask: Image, reference: Image, margin_mm: float):
        a, b = self.mapped_region(arr, mask, reference, margin_mm)
        a, b = np.maximum(a, 0), np.minimum(b, reference.shape)
        return None if np.any(b <= a) else (a, b)

    # ---------------------------------------------------------------------- files
    def save(self, path) -> Path:
        """Write the ITK transform (.tfm, .txt or .h5; displacement fields need .h5)."""
        from .files import atomic_output
        transform = self.itk
        if transform.GetName() == "CompositeTransform":
            transform = sitk.CompositeTransform(transform)
            transform.FlattenTransform()  # nested composites cannot be written
        with atomic_output(path) as tmp:
            sitk.WriteTransform(transform, str(tmp))
        return Path(path)

    @classmethod
    def load(cls, path, backend: str = "file") -> "Transform":
        return cls(sitk.ReadTransform(str(path)), backend)


def _crop_image(image: Image, mask: np.ndarray, margin_vox: int) -> sitk.Image:
    """``image`` cropped to the bounding box of the non-empty bool ``mask`` plus ``margin_vox``
    voxels, as float32 (only the crop is converted), with its world position kept."""
    lo, hi = mask_bbox(mask)
    lo = np.maximum(lo - margin_vox, 0)
    hi = np.minimum(hi + margin_vox, mask.shape)
    sub = image.array[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(np.float32)
    cropped = Image(sub, image.spacing, tuple(image.index_to_world(lo.astype(float))), image.direction)
    return cropped.to_sitk()


def _sub_reference(reference: Image, lo, hi) -> sitk.Image:
    shape = tuple(int(b - a) for a, b in zip(lo, hi))
    sub = Image(np.zeros(shape, np.float32), reference.spacing, tuple(reference.index_to_world(np.asarray(lo, float))),
                reference.direction)
    return sub.to_sitk()


# ------------------------------------------------------------------------ backends
_SIGNED_TYPES = (sitk.sitkInt16, sitk.sitkInt32, sitk.sitkInt64, sitk.sitkFloat32, sitk.sitkFloat64)


def _coarse(image: Image, spacing_mm: float, block_average: bool = True) -> sitk.Image:
    """Float32 image clipped to [-1000, 1000] HU on an isotropic grid of ``spacing_mm`` (mm),
    with the scan's origin and direction.

    Before the Gaussian smoothing (sigma ``spacing_mm / 2`` mm, the anti-aliasing), the clipped
    scan is averaged over blocks of whole voxels no longer than ``spacing_mm / 2`` along each
    axis (e.g. 2 x 2 x 1 voxels of 0.8 x 0.8 x 1.5 mm for a 4 mm grid): a block's width adds a
    twelfth of the smoothing's variance at most, and smoothing a 4 times smaller image is 4 times
    cheaper (a 512 x 512 x 300 pair: 1.7 s instead of 5.6 s on 2 cores). Clipping and
    averaging run in the scan's own signed type (no float copy of the full scan).
    ``block_average=False`` smooths the full-resolution scan (the pipeline before 2026-12-05).
    """
    img = image.to_sitk()
    if img.GetPixelID() not in _SIGNED_TYPES:
        img = sitk.Cast(img, sitk.sitkFloat32)
    img = sitk.Clamp(img, img.GetPixelID(), -1000, 1000)
    factors = [max(int(0.5 * spacing_mm / s), 1) for s in img.GetSpacing()]
    if block_average and any(f > 1 for f in factors):
        img = sitk.BinShrink(img, factors)  # block means, rounded to whole HU for integer scans
    img = sitk.Cast(img, sitk.sitkFloat32)
    size = [max(int(round(n * s / spacing_mm)), 4) for n, s in zip(image.shape[::-1], image.spacing)]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([spacing_mm] * 3)
    ref.SetOrigin(image.origin)
    ref.SetDirection(tuple(np.asarray(image.direction, float).ravel()))
    smooth = sitk.SmoothingRecursiveGaussian(img, spacing_mm / 2)
    return sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, -1000.0)


def _ncc(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Normalised cross-correlation of fixed and the warped moving image (coarse grid)."""
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1000.0))
    f = sitk.GetArrayFromImage(fixed)
    f, w = f - f.mean(), warped - warped.mean()
    denom = np.sqrt((f * f).sum() * (w * w).sum())
    return float((f * w).sum() / denom) if denom > 0 else 0.0


def _affine(fixed: sitk.Image, moving: sitk.Image, iterations: int, sampling: float = 0.25) -> sitk.Transform:
    """Moments initialisation, then a 12-parameter affine maximising the correlation of the two
    images at three levels (the coarse grid shrunk 4, 2 and 1 times, Gaussian sigmas 2, 1 and 0
    voxels), each at most ``iterations`` steps of regular step gradient descent on a seeded
    random ``sampling`` fraction of the fixed grid's voxels."""
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                 relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(fixed, moving)


def _demons(fixed: sitk.Image, moving_aligned: sitk.Image, iterations: int, smoothing: float) -> sitk.Image:
    """Fast symmetric forces demons of the affinely aligned moving image (histogram-matched to
    the fixed one) on the fixed coarse grid: ``iterations`` updates of at most half a voxel
    each (ITK's default step), the field smoothed with a Gaussian of ``smoothing`` voxels after
    every update. Returns the displacement field (LPS mm, vectors of float64) on the fixed grid."""
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(smoothing)
    matcher = sitk.HistogramMatching(moving_aligned, fixed)
    return demons.Execute(fixed, matcher)


def coarse_spacing(image: Image, target_voxels: float = 1e6) -> float:
    """Isotropic registration spacing (mm): about ``target_voxels`` over the scan, within [2, 4] mm."""
    extent = np.prod(np.asarray(image.shape) * np.asarray(image.spacing_zyx))
    return float(np.clip((extent / target_voxels) ** (1 / 3), 2.0, 4.0))


def register_simpleitk(fixed: Image, moving: Image, spacing_mm: float | None = None, affine_iterations: int = 100,
                       deformable: bool = True, demons_iterations: int = 20, demons_smoothing: float = 1.5,
                       field_scale: float = 1.0, affine_sampling: float = 0.25,
                       block_average: bool = True) -> Transform:
    """Affine (+ demons) registration at an isotropic ``spacing_mm`` grid (mm; default:
    :func:`coarse_spacing` of the fixed scan, 2 to 4 mm, about 10^6 voxels).

    The stages, all on that coarse grid (:func:`_coarse`: both scans clipped to [-1000, 1000] HU,
    smoothed and resampled; about 6 s in all for a 512 x 512 x 300 pair on 2 free cores, see
    Testing/benchmarks/bench_registration.py):

    1. affine (:func:`_affine`): moments initialisation, then a correlation-driven affine at 4x,
       2x and 1x the grid's spacing, at most ``affine_iterations`` steps per level, on a random
       ``affine_sampling`` fraction of the voxels (0.25; 0.1 halves the affine's time but its
       result varied more between pairs in Testing/benchmarks/bench_registration.py);
    2. deformable (:func:`_demons`, when ``deformable``): ``demons_iterations`` fast symmetric
       forces demons updates of at most half a voxel (20; 50 took 2.5 times as long for lesion
       overlaps and centre errors within the variation between pairs), the field smoothed
       with a Gaussian of ``demons_smoothing`` voxels;
    3. checks: the affine is dropped for the images' world alignment if it lowers the
       normalised cross-correlation (NCC) of the coarse images; if the deformable stage lowers
       it below the affine's or produces non-finite values, the affine is kept. A warning
       says so.

    ``field_scale`` multiplies the deformable field (1.0; other values only to test the
    divergence check). ``block_average=False, demons_iterations=50`` is the pipeline before
    2026-12-05 (:func:`_coarse`), which the benchmark compares with. ITK runs every stage on all the process's threads
    (``sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()``).
    """
    spacing_mm = coarse_spacing(fixed) if spacing_mm is None else spacing_mm
    f, m = _coarse(fixed, spacing_mm, block_average), _coarse(moving, spacing_mm, block_average)
    affine = _affine(f, m, affine_iterations, affine_sampling)
    ncc_identity, ncc_affine = _ncc(f, m, sitk.Transform()), _ncc(f, m, affine)
    info = {"ncc_identity": ncc_identity, "ncc_affine": ncc_affine, "spacing_mm": spacing_mm}
    if ncc_affine < ncc_identity:
        warnings.warn(f"affine registration lowered the image similarity (NCC {ncc_identity:.3f} -> "
                      f"{ncc_affine:.3f}); using the images' world alignment instead", stacklevel=3)
        return Transform(sitk.AffineTransform(3), "simpleitk", dict(info, result="identity"))
    if not deformable:
        return Transform(affine, "simpleitk", dict(info, result="affine"))
    moved = sitk.Resample(m, f, affine, sitk.sitkLinear, -1000.0)
    field = _demons(f, moved, demons_iterations, demons_smoothing)
    arr = sitk.GetArrayFromImage(field) * field_scale
    return _affine_plus_field(f, m, affine, arr, "simpleitk", info, ncc_affine, "affine + demons")


def _affine_plus_field(f: sitk.Image, m: sitk.Image, affine: sitk.Transform, field_zyx3: np.ndarray, backend: str,
                       info: dict, ncc_affine: float, result: str) -> Transform:
    """The affine composed with a displacement field (``field_zyx3``: (z, y, x, 3) LPS mm on the
    fixed grid ``f``, applied first: x -> affine(x + u(x))), or the affine alone with a warning
    when the field is not finite or lowers the similarity (NCC) reached by the affine."""
    if not np.all(np.isfinite(field_zyx3)):
        warnings.warn("deformable registration diverged (non-finite field); falling back to the affine",
                      stacklevel=4)
        return Transform(affine, backend, dict(info, result="affine (deformable diverged)"))
    field = sitk.GetImageFromArray(np.asarray(field_zyx3, np.float64), isVector=True)
    field.CopyInformation(f)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    composite.AddTransform(sitk.DisplacementFieldTransform(field))  # applied first: x -> x + u(x), then affine
    ncc_deformable = _ncc(f, m, composite)
    info["ncc_deformable"] = ncc_deformable
    if not np.isfinite(ncc_deformable) or ncc_deformable < ncc_affine:
        warnings.warn(f"deformable registration diverged (similarity NCC {ncc_affine:.3f} after the affine, "
                      f"{ncc_deformable:.3f} after the deformable stage); falling back to the affine", stacklevel=4)
        return Transform(affine, backend, dict(info, result="affine (deformable diverged)"))
    return Transform(composite, backend, dict(info, result=result))


def register_none(fixed: Image, moving: Image) -> Transform:
    """Identity: the scans are already aligned in world coordinates."""
    return Transform(sitk.AffineTransform(3), "none", {"result": "identity"})


# ------------------------------------------------------------------------ greedy
_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # flips x and y: LPS <-> RAS (its own inverse)


def _affine_to_matrix(transform: sitk.Transform) -> np.ndarray:
    """A SimpleITK affine-like transform (LPS, fixed -> moving) as a 4x4 LPS matrix."""
    m = np.eye(4)
    # the transform of any point p is A p + t: recover A and t from the origin and the unit vectors
    t = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    for i in range(3):
        m[:3, i] = np.asarray(transform.TransformPoint(tuple(np.eye(3)[i]))) - t
    m[:3, 3] = t
    return m


def _matrix_to_affine(m: np.ndarray) -> sitk.AffineTransform:
    """A 4x4 LPS matrix (fixed -> moving) as a SimpleITK affine transform."""
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple(float(v) for v in np.asarray(m)[:3, :3].ravel()))
    affine.SetTranslation(tuple(float(v) for v in np.asarray(m)[:3, 3]))
    return affine


class _quiet_stdout:
    """Send file descriptor 1 to /dev/null for the duration (greedy's optimiser prints there)."""

    def __enter__(self):
        import os
        import sys
        self._saved = None
        try:
            sys.stdout.flush()
            saved = os.dup(1)
        except (OSError, ValueError, AttributeError):  # no file descriptor 1 (some GUI hosts): nothing to hide
            return
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
        self._saved = saved

    def __exit__(self, *exc):
        import os
        if self._saved is not None:
            os.dup2(self._saved, 1)
            os.close(self._saved)


# greedy jitters its affine sample points at random, unseeded by default ("-seed 0": a new result each
# run, 0.6-3.4 mm apart on the test pair); a fixed seed makes the same pair register the same way with
# one thread (with several, the threads' sampling order still varies from run to run)
GREEDY_SEED = 1


def register_greedy(fixed: Image, moving: Image, spacing_mm: float | None = None,
                    affine_iterations: str = "100x50x10", deformable: bool = True,
                    deformable_iterations: str = "100x50x20", ncc_radius_vox: int = 2,
                    smoothing: tuple = ("2.0vox", "0.5vox"), threads: int | None = None) -> Transform:
    """Affine + deformable NCC registration with greedy (``picsl-greedy``) on the CPU.

    Both scans go on an isotropic ``spacing_mm`` grid (default :func:`coarse_spacing`
    of the fixed scan, 2 to 4 mm), clipped to [-1000, 1000] HU. Greedy then runs a
    moments-initialised (centre of mass) affine registration (12 degrees of freedom,
    NCC, multi-resolution ``affine_iterations``) and a deformable one (NCC with a
    window of ``2 * ncc_radius_vox + 1`` voxels, ``deformable_iterations``, smoothing
    ``smoothing`` of the gradient and of the field).

    Greedy's conventions, converted here: its affine matrices are in RAS (x and y
    flipped against ITK's LPS) and map fixed points to moving points; its warp is a
    displacement field on the fixed grid in LPS mm, applied before the affine:
    ``T(x) = A(x + u(x))``. The result is the SimpleITK composite of both (LPS mm,
    fixed -> moving as ITK needs), with the same similarity checks and fallbacks as
    :func:`register_simpleitk`.
    """
    try:
        from picsl_greedy import Greedy3D
    except ImportError:
        raise RegistrationError("the 'greedy' registration backend needs the optional package 'picsl-greedy' "
                                "(pip install picsl-greedy); use --registration simpleitk") from None
    import os
    spacing_mm = coarse_spacing(fixed) if spacing_mm is None else spacing_mm
    f, m = _coarse(fixed, spacing_mm), _coarse(moving, spacing_mm)
    threads = threads or os.cpu_count() or 1
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    init_ras = _LPS_RAS @ _affine_to_matrix(init) @ _LPS_RAS
    ncc = "x".join([str(int(ncc_radius_vox))] * 3)
    g = Greedy3D()
    with tempfile.TemporaryDirectory() as tmp, _quiet_stdout():
        init_file = Path(tmp) / "init.mat"  # greedy reads initial matrices from text files only
        np.savetxt(init_file, init_ras)
        g.execute(f"-i fixed moving -a -dof 12 -n {affine_iterations} -m NCC {ncc} -ia {init_file} -o affine "
                  f"-threads {int(threads)} -seed {GREEDY_SEED} -V 0", fixed=f, moving=m, affine=None)
    affine = _matrix_to_affine(_LPS_RAS @ np.asarray(g["affine"], float) @ _LPS_RAS)
    ncc_identity, ncc_affine = _ncc(f, m, sitk.Transform()), _ncc(f, m, affine)
    info = {"ncc_identity": ncc_identity, "ncc_affine": ncc_affine, "spacing_mm": spacing_mm}
    if not np.isfinite(ncc_affine) or ncc_affine < ncc_identity:
        warnings.warn(f"affine registration lowered the image similarity (NCC {ncc_identity:.3f} -> "
                      f"{ncc_affine:.3f}); using the images' world alignment instead", stacklevel=3)
        return Transform(sitk.AffineTransform(3), "greedy", dict(info, result="identity"))
    if not deformable:
        return Transform(affine, "greedy", dict(info, result="affine"))
    with _quiet_stdout():
        g.execute(f"-i fixed moving -it affine -n {deformable_iterations} -m NCC {ncc} -s {smoothing[0]} "
                  f"{smoothing[1]} -wp 0 -o warp -threads {int(threads)} -seed {GREEDY_SEED} -V 0", warp=None)
    arr = sitk.GetArrayFromImage(g["warp"]).astype(np.float64)  # (z, y, x, 3), LPS mm on the fixed grid
    return _affine_plus_field(f, m, affine, arr, "greedy", info, ncc_affine, "affine + greedy NCC")


# ------------------------------------------------------------------- uniGradICON
UNIGRADICON_SHAPE = (175, 175, 175)
"""The grid both scans are resampled to for LesionLocator's registration network (paper: 175^3)."""

_UNIGRADICON_CACHE: dict = {}  # one network kept between calls: {key: network}


def _box_grid(image: Image, shape_zyx, z_edges=None) -> sitk.Image:
    """An empty float image of ``shape_zyx`` voxels spanning ``image``'s box along its own index axes.

    The box runs from voxel edge to voxel edge (index -0.5 to N - 0.5 per axis; along z
    ``z_edges`` = (first, last) continuous index edges may restrict it), as
    ``torch.nn.functional.interpolate(align_corners=False)`` resizes an array: the same
    direction, spacing = box length / shape, origin at the first cell centre (LPS mm).
    """
    n_in = np.asarray(image.shape, float)  # z, y, x
    lo = np.full(3, -0.5)
    hi = n_in - 0.5
    if z_edges is not None:
        lo[0], hi[0] = z_edges
    n_out = np.asarray(shape_zyx, float)
    step = (hi - lo) / n_out  # input voxels per output voxel, z, y, x
    first = lo + 0.5 * step  # continuous input index (z, y, x) of output voxel 0
    grid = sitk.Image([int(v) for v in n_out[::-1]], sitk.sitkFloat32)
    grid.SetSpacing(tuple(float(v) for v in (step * np.asarray(image.spacing_zyx))[::-1]))
    grid.SetOrigin(tuple(float(v) for v in image.index_to_world(first)))
    grid.SetDirection(tuple(float(v) for v in np.asarray(image.direction, float).ravel()))
    return grid


def _resample_to(image: sitk.Image, grid: sitk.Image, background: float) -> np.ndarray:
    """Linear resampling of ``image`` onto ``grid``'s geometry, as a float32 (z, y, x) array."""
    out = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, background, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _z_window(fixed: np.ndarray, moving: np.ndarray, max_difference: int):
    """Upstream LesionLocator's optional z alignment, on arrays (z, y, x) of normalised
    intensities at the Track model's z spacing: if the slice counts differ by more than
    ``max_difference``, slide the shorter scan along the longer one and keep the window of
    least mean squared difference. Returns the slice windows ((f0, f1), (m0, m1))."""
    nf, nm = fixed.shape[0], moving.shape[0]
    windows = [(0, nf), (0, nm)]
    if abs(nf - nm) <= max_difference:
        return windows
    short, long_, which = (fixed, moving, 1) if nf < nm else (moving, fixed, 0)
    n = short.shape[0]
    errors = [np.mean((long_[i:i + n] - short) ** 2) for i in range(long_.shape[0] - n)]
    start = int(np.argmin(errors))
    windows[which] = (start, start + n)
    return windows


def unigradicon_inputs(fixed: Image, moving: Image, normalise, shape=UNIGRADICON_SHAPE, z_spacing_mm: float = 3.0,
                       z_max_difference: int = 20):
    """The registration network's inputs: ([fixed grid, moving grid], [fixed array, moving array], windowed).

    Each scan is normalised with ``normalise`` (HU array -> network intensities) and
    linearly resampled to ``shape`` (z, y, x) over its own box (:func:`_box_grid`),
    after upstream's optional z alignment (:func:`_z_window`) on grids of
    ``z_spacing_mm`` slices; ``windowed`` says whether a box was cut along z.
    """
    shape = tuple(int(v) for v in shape)
    scans = [image.with_array(normalise(np.asarray(image.array, np.float32).copy())) for image in (fixed, moving)]
    sitk_scans = [s.to_sitk() for s in scans]
    background = float(normalise(np.array([-1024.0], np.float32))[0])
    n_slices = [max(int(round(s.shape[0] * s.spacing_zyx[0] / z_spacing_mm)), 1) for s in scans]
    edges = [None, None]
    if abs(n_slices[0] - n_slices[1]) > z_max_difference:
        arrays = [_resample_to(ss, _box_grid(s, (n, shape[1], shape[2])), background)
                  for s, ss, n in zip(scans, sitk_scans, n_slices)]
        windows = _z_window(arrays[0], arrays[1], z_max_difference)
        for i, (s, n, (a, b)) in enumerate(zip(scans, n_slices, windows)):
            if (a, b) != (0, n):
                per_slice = s.shape[0] / n  # input slices per window slice
                edges[i] = (-0.5 + a * per_slice, -0.5 + b * per_slice)
    grids = [_box_grid(s, shape, e) for s, e in zip(scans, edges)]
    arrays = [_resample_to(ss, g, background) for ss, g in zip(sitk_scans, grids)]
    return grids, arrays, any(e is not None for e in edges)


def _index_to_world_matrix(grid: sitk.Image) -> np.ndarray:
    """The 3x3 matrix L of a grid's index (x, y, z order) -> LPS map ``origin + L @ index``."""
    return np.asarray(grid.GetDirection()).reshape(3, 3) * np.asarray(grid.GetSpacing())


def _displacement_mm(phi: np.ndarray, fixed_grid: sitk.Image) -> np.ndarray:
    """(z, y, x, 3) LPS mm: how far each fixed-grid voxel moves, measured in the fixed grid's
    units, when normalised coordinates ``phi`` (3, z, y, x) replace its own (see
    :func:`displacement_to_transform`)."""
    phi = np.asarray(phi, np.float64)
    shape = np.asarray(phi.shape[1:])
    identity = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    delta_zyx = phi * (shape - 1)[:, None, None, None] - identity  # in fixed-grid voxels, (z, y, x)
    return np.einsum("ij,jzyx->zyxi", _index_to_world_matrix(fixed_grid), delta_zyx[::-1])


def displacement_to_transform(phi: np.ndarray, fixed_grid: sitk.Image, moving_grid: sitk.Image) -> sitk.Transform:
    """A registration network's output -> a SimpleITK transform (LPS mm, fixed -> moving).

    ``phi``: array (3, n0, n1, n2): for every voxel of the fixed grid (array order z, y, x),
    the matching position in the moving grid in normalised coordinates, channel c being
    the moving index along array axis c divided by (n_c - 1) (icon_registration's
    convention: 0 and 1 are the first and last voxel centres). ``fixed_grid`` and
    ``moving_grid``: the two grids' geometries (see :func:`_box_grid`).

    The result is ``A0(x + d(x))``: ``A0`` is the affine that maps the fixed grid onto the
    moving grid voxel for voxel (the identity network output), ``d`` a displacement field
    on the fixed grid (LPS mm), zero outside it, so far from the grid the transform is ``A0``.
    """
    field = sitk.GetImageFromArray(_displacement_mm(phi, fixed_grid), isVector=True)
    field.CopyInformation(fixed_grid)
    lin_f, lin_m = _index_to_world_matrix(fixed_grid), _index_to_world_matrix(moving_grid)
    matrix = lin_m @ np.linalg.inv(lin_f)
    a0 = sitk.AffineTransform(3)
    a0.SetMatrix(tuple(matrix.ravel()))
    a0.SetTranslation(tuple(np.asarray(moving_grid.GetOrigin()) - matrix @ np.asarray(fixed_grid.GetOrigin())))
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(a0)
    composite.AddTransform(sitk.DisplacementFieldTransform(field))  # applied first
    return composite


def unigradicon_network(weights: dict, shape=UNIGRADICON_SHAPE, source: str = "the given weights"):
    """LesionLocator's registration network: uniGradICON's architecture built with
    ``unigradicon.make_network(include_last_step=True)`` (as upstream's Track trainer
    does, nothing downloaded), loaded with ``weights`` (a Track checkpoint's 'reg_net.'
    tensors, prefix stripped: keys 'regis_net.*'). Returned in eval mode on the CPU."""
    try:
        import unigradicon
    except ImportError:
        raise RegistrationError("the 'unigradicon' registration backend needs the optional package "
                                "'unigradicon' (pip install unigradicon); use --registration simpleitk") from None
    net = unigradicon.make_network([1, 1, *[int(v) for v in shape]], include_last_step=True)
    try:
        net.load_state_dict(weights)
    except RuntimeError as e:
        raise RegistrationError(f"the registration weights in {source} do not fit uniGradICON's network: "
                                f"{str(e).splitlines()[0]}") from None
    return net.eval()


def _registration_source(model=None, weights=None):
    """(load weights, description, cache key or None) from a loaded Track model or a state dict."""
    if weights is not None:
        return (lambda: dict(weights)), "the given weights", None
    if model is None:
        raise RegistrationError("the 'unigradicon' registration backend needs a LesionLocatorTrack model: "
                                "its checkpoint holds the registration network ('reg_net.' weights)")
    from .model import CHECKPOINT_NAME, registration_weights
    checkpoint = Path(model.folder) / f"fold_{model.folds[0]}" / CHECKPOINT_NAME

    def load():
        found = registration_weights(model)
        if not found:
            raise RegistrationError(f"{checkpoint} holds no registration network ('reg_net.' weights): the "
                                    f"'unigradicon' backend needs an official LesionLocatorTrack checkpoint")
        return found
    return load, str(checkpoint), (str(checkpoint), checkpoint.stat().st_mtime_ns)


def register_unigradicon(fixed: Image, moving: Image, model=None, weights: dict | None = None,
                         device=None, shape=UNIGRADICON_SHAPE, intensity: str = "auto",
                         z_spacing_mm: float | None = None, z_max_difference: int = 20) -> Transform:
    """LesionLocator's own registration: the uniGradICON network of a LesionLocatorTrack checkpoint.

    ``model``: the loaded Track model (:func:`LesionLocatorLib.model.load_model`); its
    checkpoint's 'reg_net.' weights are used (or pass ``weights``, a state dict with
    keys 'regis_net.*'). ``device``: torch device (default: the model's, else CPU; fp32).

    As upstream LesionLocator feeds it: each scan is normalised (``intensity="model"``:
    the Track model's CT normalisation, as the network was fine-tuned on;
    ``"window"``: uniGradICON's own CT preprocessing, [-1000, 1000] HU -> [0, 1];
    ``"auto"``: the model's when given) and resampled, in its own box and along its own
    index axes, to ``shape`` (175^3, array order z, y, x). When the scans' lengths
    differ by more than ``z_max_difference`` slices of ``z_spacing_mm`` (default the
    model's z spacing, else 3 mm), the longer scan's box is first cut to the best
    matching z window (upstream's optional z translation). The network's map (fixed
    grid -> moving grid, normalised coordinates) becomes a displacement field in LPS mm:
    see :func:`displacement_to_transform`.
    """
    import torch
    load, source, key = _registration_source(model, weights)
    shape = tuple(int(v) for v in shape)
    if device is None:
        device = getattr(model, "device", None) or "cpu"
    device = torch.device(device)
    if intensity == "auto":
        intensity = "model" if getattr(model, "intensity_properties", None) else "window"
    if intensity == "model":
        from .modelgrid import ct_normalizer
        normalise = ct_normalizer(model.intensity_properties)
    elif intensity == "window":
        def normalise(a):
            return (np.clip(a, -1000.0, 1000.0) + 1000.0) / 2000.0
    else:
        raise ValueError(f"unknown intensity preprocessing {intensity!r}; use 'auto', 'model' or 'window'")
    if z_spacing_mm is None:
        z_spacing_mm = float(model.spacing_zyx[0]) if model is not None else 3.0
    grids, (fixed_arr, moving_arr), windowed = unigradicon_inputs(fixed, moving, normalise, shape, z_spacing_mm,
                                                                  z_max_difference)
    cache_key = None if key is None else key + (shape, str(device))
    net = _UNIGRADICON_CACHE.get(cache_key) if cache_key is not None else None
    if net is None:
        _UNIGRADICON_CACHE.clear()  # keep at most one network (about 300 MB) in memory
        net = unigradicon_network(load(), shape, source).to(device)
        if cache_key is not None:
            _UNIGRADICON_CACHE[cache_key] = net
    with torch.no_grad():
        image_a = torch.from_numpy(moving_arr)[None, None].to(device)  # A: moving (t-1), as upstream's x0
        image_b = torch.from_numpy(fixed_arr)[None, None].to(device)  # B: fixed (t), as upstream's x1
        identity = net.identity_map
        identity.isIdentity = True
        phi = net.regis_net(image_a, image_b)(identity)[0].float().cpu().numpy()
    if not np.all(np.isfinite(phi)):
        raise RegistrationError("the registration network gave a non-finite deformation")
    transform = displacement_to_transform(phi, grids[0], grids[1])
    info = {"result": "uniGradICON", "shape": "x".join(map(str, shape)), "intensity": intensity,
            "z_window": "yes" if windowed else "no",
            "max_displacement_mm": float(np.max(np.linalg.norm(_displacement_mm(phi, grids[0]), axis=-1)))}
    return Transform(transform, "unigradicon", info)


BACKENDS = {
    "simpleitk": register_simpleitk,
    "none": register_none,
    "greedy": register_greedy,
    "unigradicon": register_unigradicon,
}


def register(fixed: Image, moving: Image, backend: str = "simpleitk", **options) -> Transform:
    """Register ``moving`` (timepoint t-1) to ``fixed`` (timepoint t) with a named backend.

    ``options`` go to the backend: e.g. ``spacing_mm`` (simpleitk, greedy), ``model``
    (unigradicon: the loaded LesionLocatorTrack model whose checkpoint holds the network;
    :func:`LesionLocatorLib.track.track` passes its Track model) or ``weights``."""
    global REGISTRATION_CALLS
    if backend not in BACKENDS:
        raise ValueError(f"unknown registration backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    REGISTRATION_CALLS += 1
    return BACKENDS[backend](fixed, moving, **options)
