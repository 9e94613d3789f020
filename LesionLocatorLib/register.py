"""Registration of two timepoints: one small protocol, several backends.

``register(fixed, moving, backend)`` returns a :class:`Transform` between two
scans of the same patient:

* ``fixed``: the scan we move *to* (the follow-up, timepoint t);
* ``moving``: the scan we move *from* (the previous timepoint t-1).

The transform follows ITK's convention internally (it maps a fixed-space world
point to the matching moving-space world point, which is what resampling needs);
:meth:`Transform.map_points` goes the other way, moving -> fixed, as a tracker
needs for prompts. All points are LPS millimetres (x, y, z).

Backends: ``simpleitk`` (default: moments initialisation, multi-resolution affine,
then fast symmetric forces demons, all at a coarse isotropic spacing, with a
similarity check that falls back to the affine), ``none`` (the scans are already
aligned in world space), and ``greedy`` / ``unigradicon`` (optional packages).
Every call counts in :data:`REGISTRATION_CALLS`.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .image import Image

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

    # -------------------------------------------------------------------- points
    def fixed_to_moving(self, points_xyz) -> np.ndarray:
        """Fixed-space LPS points (N, 3) -> moving-space LPS points (ITK direction)."""
        pts = np.asarray(points_xyz, float).reshape(-1, 3)
        return np.array([self.itk.TransformPoint(tuple(p)) for p in pts])

    def map_points(self, points_xyz, iterations: int = 50, tol_mm: float = 1e-3) -> np.ndarray:
        """Moving-space LPS points (N, 3) -> fixed-space LPS points.

        Inverts the transform numerically (fixed-point iteration started at the
        point itself), which works for the smooth, invertible deformations registration gives.
        """
        targets = np.asarray(points_xyz, float).reshape(-1, 3)
        x = targets.copy()
        for _ in range(iterations):
            err = self.fixed_to_moving(x) - targets
            x = x - err
            if np.max(np.abs(err)) < tol_mm:
                break
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
        src = _crop_image(mask.with_array(arr.astype(np.float32)), arr, margin_vox=3)
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

    def _target_region(self, arr, mask: Image, reference: Image, margin_mm: float):
        idx = np.argwhere(arr)
        lo, hi = idx.min(0), idx.max(0)
        corners = np.array([[z, y, x] for z in (lo[0], hi[0]) for y in (lo[1], hi[1]) for x in (lo[2], hi[2])], float)
        mapped = reference.world_to_index(self.map_points(mask.index_to_world(corners)))
        margin = margin_mm / np.asarray(reference.spacing_zyx)
        a = np.floor(mapped.min(0) - margin).astype(int)
        b = np.ceil(mapped.max(0) + margin).astype(int) + 1
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
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(0) - margin_vox, 0)
    hi = np.minimum(idx.max(0) + margin_vox + 1, mask.shape)
    sub = image.array[tuple(slice(a, b) for a, b in zip(lo, hi))]
    cropped = Image(sub, image.spacing, tuple(image.index_to_world(lo.astype(float))), image.direction)
    return cropped.to_sitk()


def _sub_reference(reference: Image, lo, hi) -> sitk.Image:
    shape = tuple(int(b - a) for a, b in zip(lo, hi))
    sub = Image(np.zeros(shape, np.float32), reference.spacing, tuple(reference.index_to_world(np.asarray(lo, float))),
                reference.direction)
    return sub.to_sitk()


# ------------------------------------------------------------------------ backends
def _coarse(image: Image, spacing_mm: float) -> sitk.Image:
    """Float image clipped to [-1000, 1000] HU on an isotropic grid of ``spacing_mm``."""
    img = sitk.Clamp(sitk.Cast(image.to_sitk(), sitk.sitkFloat32), sitk.sitkFloat32, -1000.0, 1000.0)
    size = [max(int(round(n * s / spacing_mm)), 4) for n, s in zip(img.GetSize(), img.GetSpacing())]
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing([spacing_mm] * 3)
    ref.SetOrigin(img.GetOrigin())
    ref.SetDirection(img.GetDirection())
    smooth = sitk.SmoothingRecursiveGaussian(img, spacing_mm / 2)
    return sitk.Resample(smooth, ref, sitk.Transform(), sitk.sitkLinear, -1000.0)


def _ncc(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Normalised cross-correlation of fixed and the warped moving image (coarse grid)."""
    warped = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1000.0))
    f = sitk.GetArrayFromImage(fixed)
    f, w = f - f.mean(), warped - warped.mean()
    denom = np.sqrt((f * f).sum() * (w * w).sum())
    return float((f * w).sum() / denom) if denom > 0 else 0.0


def _affine(fixed: sitk.Image, moving: sitk.Image, iterations: int) -> sitk.Transform:
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                 relaxationFactor=0.6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SetInitialTransform(init, inPlace=False)
    return reg.Execute(fixed, moving)


def _demons(fixed: sitk.Image, moving_aligned: sitk.Image, iterations: int, smoothing: float) -> sitk.Image:
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
                       deformable: bool = True, demons_iterations: int = 50, demons_smoothing: float = 1.5,
                       field_scale: float = 1.0) -> Transform:
    """Affine (+ demons) registration at an isotropic ``spacing_mm`` grid (default:
    :func:`coarse_spacing` of the fixed scan, 2 to 4 mm).

    ``field_scale`` multiplies the deformable field (1.0; other values only to test
    the divergence check). If the deformable stage lowers the similarity of the
    images or produces non-finite values, the affine is kept and a warning says so.
    """
    spacing_mm = coarse_spacing(fixed) if spacing_mm is None else spacing_mm
    f, m = _coarse(fixed, spacing_mm), _coarse(moving, spacing_mm)
    affine = _affine(f, m, affine_iterations)
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
    if not np.all(np.isfinite(arr)):
        warnings.warn("deformable registration diverged (non-finite field); falling back to the affine",
                      stacklevel=3)
        return Transform(affine, "simpleitk", dict(info, result="affine (deformable diverged)"))
    field = sitk.GetImageFromArray(arr.astype(np.float64), isVector=True)
    field.CopyInformation(f)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    composite.AddTransform(sitk.DisplacementFieldTransform(field))  # applied first: x -> x + d(x), then affine
    ncc_deformable = _ncc(f, m, composite)
    info["ncc_deformable"] = ncc_deformable
    if not np.isfinite(ncc_deformable) or ncc_deformable < ncc_affine:
        warnings.warn(f"deformable registration diverged (similarity NCC {ncc_affine:.3f} after the affine, "
                      f"{ncc_deformable:.3f} after the deformable stage); falling back to the affine", stacklevel=3)
        return Transform(affine, "simpleitk", dict(info, result="affine (deformable diverged)"))
    return Transform(composite, "simpleitk", dict(info, result="affine + demons"))


def register_none(fixed: Image, moving: Image) -> Transform:
    """Identity: the scans are already aligned in world coordinates."""
    return Transform(sitk.AffineTransform(3), "none", {"result": "identity"})


def _optional_backend(name: str, package: str):
    def run(fixed, moving, **options):
        raise RegistrationError(f"the '{name}' registration backend is not available in this version "
                                f"(it needs the optional package '{package}'); use --registration simpleitk")
    return run


BACKENDS = {
    "simpleitk": register_simpleitk,
    "none": register_none,
    "greedy": _optional_backend("greedy", "picsl-greedy"),
    "unigradicon": _optional_backend("unigradicon", "unigradicon"),
}


def register(fixed: Image, moving: Image, backend: str = "simpleitk", **options) -> Transform:
    """Register ``moving`` (timepoint t-1) to ``fixed`` (timepoint t) with a named backend."""
    global REGISTRATION_CALLS
    if backend not in BACKENDS:
        raise ValueError(f"unknown registration backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    REGISTRATION_CALLS += 1
    return BACKENDS[backend](fixed, moving, **options)
