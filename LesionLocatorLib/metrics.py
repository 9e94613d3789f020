"""Segmentation, measurement, longitudinal and tracking metrics.

Pure numpy/scipy; never imports slicer, qt or vtk.

Conventions (as in :mod:`LesionLocatorLib.image`):

* Masks and label maps are numpy arrays in **(z, y, x)** order.
* ``spacing_zyx`` is the voxel size in **millimetres** in array order (z, y, x)
  (``Image.spacing_zyx``; note ``Image.spacing`` itself is (x, y, z)).
* World points are **LPS millimetres (x, y, z)**, obtained from voxel *centres*
  through :meth:`Image.index_to_world` (so spacing, origin and an oblique
  ``direction`` are all honoured).
* Volumes are in millilitres (1 ml = 1000 mm^3); lengths and distances in mm.
* Scores (Dice, NSD, CPM@25, ...) are fractions in [0, 1]; the paper prints them
  multiplied by 100.

Tracking metrics follow the LesionLocator paper (CVPR 2025, appendix 9.2):

* **CPM@25** -- "The percentage of ground truth and predicted lesion center points
  within a 25mm distance".  Per lesion: hit if both masks are non-empty and their
  centres of mass (world mm) are at most 25 mm apart.
* **Dice@25** -- "The Dice score for lesions with center points correctly matched
  within 25mm".  Mean Dice over CPM hits.
* **MED** -- "The average Euclidean distance between predicted and ground truth
  lesion center points ... Lesions without a corresponding match in the ground
  truth or prediction are excluded from this calculation."  Mean centre distance
  (mm) over lesions present in both prediction and ground truth.
* **Total Dice** -- "The overall Dice score across all tracked lesions ...
  including missed or wrongly matched lesions."  Mean Dice over every lesion
  (missed or spurious lesions score 0).
* Averaging -- "All tracking metrics are averaged by patient. First, the average
  over all lesions of a particular scan is calculated, and then weighted by the
  number of scans per patient" (see :func:`aggregate`).

Lesion identity: in a label map the voxel value is the lesion ID (0 = background);
the same ID in prediction and ground truth is the same lesion.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from .files import atomic_write_text
from scipy.spatial import ConvexHull, QhullError

from .image import Image, read_image

__all__ = [
    "dice", "normalized_surface_dice", "lesion_volume_ml", "axial_diameters",
    "centre_of_mass_world", "change_table", "recist_category", "evaluate_case",
    "aggregate", "evaluate_folders", "write_table", "format_table", "LABEL_EXTENSIONS",
]

#: File name endings recognised by :func:`evaluate_folders` (longest first).
LABEL_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")

_FACE_STRUCTURE_3D = ndimage.generate_binary_structure(3, 1)
# 4-connected within an axial slice (constant k / array[z]), nothing across slices.
_FACE_STRUCTURE_AXIAL = np.zeros((3, 3, 3), dtype=bool)
_FACE_STRUCTURE_AXIAL[1] = ndimage.generate_binary_structure(2, 1)


# ----------------------------------------------------------------------------- helpers
def _as_bool(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype == bool else a != 0


def _check_same_shape(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth have different shapes: "
                         f"{pred.shape} vs {gt.shape}")


def _bbox(mask: np.ndarray):
    """Half-open (z, y, x) bounding box of the True voxels as a tuple of slices, or None."""
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    if zs.size == 0:
        return None
    sub = mask[zs[0]:zs[-1] + 1]
    ys = np.flatnonzero(sub.any(axis=(0, 2)))
    xs = np.flatnonzero(sub.any(axis=(0, 1)))
    return (slice(int(zs[0]), int(zs[-1]) + 1), slice(int(ys[0]), int(ys[-1]) + 1),
            slice(int(xs[0]), int(xs[-1]) + 1))


def _union_box(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(a, b))


def _spacing3(spacing_zyx) -> tuple:
    s = tuple(float(v) for v in spacing_zyx)
    if len(s) != 3 or min(s) <= 0:
        raise ValueError(f"spacing_zyx must be three positive numbers (mm, z y x), got {spacing_zyx!r}")
    return s


# ------------------------------------------------------------------ overlap metrics
def dice(pred, gt) -> float:
    """Dice similarity coefficient 2|P∩G| / (|P| + |G|) of two masks.

    ``pred`` and ``gt`` are boolean (or 0/non-0) arrays of the same shape, any
    order; the result does not depend on voxel size.  By convention two empty
    masks give **1.0** (nothing to find, nothing found); one empty mask gives 0.0.
    """
    p = _as_bool(pred, "pred")
    g = _as_bool(gt, "gt")
    _check_same_shape(p, g)
    n_p = int(np.count_nonzero(p))
    n_g = int(np.count_nonzero(g))
    if n_p + n_g == 0:
        return 1.0
    if n_p == 0 or n_g == 0:
        return 0.0
    box = _union_box(_bbox(p), _bbox(g))
    inter = int(np.count_nonzero(p[box] & g[box]))
    return 2.0 * inter / (n_p + n_g)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: mask voxels with at least one 6-neighbour outside the mask.

    Voxels on the array border count as surface (outside the array = background).
    """
    eroded = ndimage.binary_erosion(mask, structure=_FACE_STRUCTURE_3D, border_value=0)
    return mask & ~eroded


def normalized_surface_dice(pred, gt, spacing_zyx, tolerance_mm: float = 2.0) -> float:
    """Normalized Surface Dice (NSD) at ``tolerance_mm`` (the paper uses 2 mm).

    NSD = (#{p in S_P : d(p, S_G) <= tol} + #{g in S_G : d(g, S_P) <= tol}) / (|S_P| + |S_G|)

    where S_P, S_G are the surface voxels of prediction and ground truth (mask
    voxels with a face neighbour outside the mask) and d is the Euclidean distance
    in **mm** between voxel centres, computed with an anisotropic distance
    transform (``sampling=spacing_zyx``).  Arrays are (z, y, x); ``spacing_zyx``
    is in mm in the same order.  The work happens in the bounding box of both
    masks (padded by one voxel), so large images with small lesions are cheap.

    Both masks empty -> 1.0; exactly one empty -> 0.0.
    """
    p = _as_bool(pred, "pred")
    g = _as_bool(gt, "gt")
    _check_same_shape(p, g)
    spacing = _spacing3(spacing_zyx)
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    bp, bg = _bbox(p), _bbox(g)
    if bp is None and bg is None:
        return 1.0
    if bp is None or bg is None:
        return 0.0
    box = _union_box(bp, bg)
    # One voxel of zero padding: the erosion then sees background outside the box
    # (and outside the image, so lesions touching the image border have a surface there).
    pc = np.pad(p[box], 1)
    gc = np.pad(g[box], 1)
    sp, sg = _surface(pc), _surface(gc)
    # Distance (mm) from every voxel centre to the nearest surface voxel centre of the other mask.
    dist_to_g = ndimage.distance_transform_edt(~sg, sampling=spacing)
    dist_to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    tol = float(tolerance_mm) + 1e-9
    ok_p = int(np.count_nonzero(dist_to_g[sp] <= tol))
    ok_g = int(np.count_nonzero(dist_to_p[sg] <= tol))
    return (ok_p + ok_g) / float(np.count_nonzero(sp) + np.count_nonzero(sg))


# -------------------------------------------------------------------- measurements
def lesion_volume_ml(mask, spacing_zyx) -> float:
    """Volume of a mask in millilitres: voxel count x voxel volume (mm^3) / 1000.

    ``mask`` is a boolean (or 0/non-0) array; ``spacing_zyx`` the voxel size in mm
    (any order works for a volume, but (z, y, x) is the library convention).
    """
    spacing = _spacing3(spacing_zyx)
    n = int(np.count_nonzero(np.asarray(mask)))
    return n * spacing[0] * spacing[1] * spacing[2] / 1000.0


def centre_of_mass_world(mask_image: Image):
    """Centre of mass of the non-zero voxels of ``mask_image`` in LPS mm (x, y, z).

    The mean of the voxel-centre indices is mapped through
    :meth:`Image.index_to_world` (exact, since that map is affine).  Empty mask -> None.
    """
    m = _as_bool(mask_image.array, "mask")
    box = _bbox(m)
    if box is None:
        return None
    idx = np.nonzero(m[box])
    centre = np.array([ix.mean() + sl.start for ix, sl in zip(idx, box)], dtype=float)
    return mask_image.index_to_world(centre)


def _longest_chord(points_2d: np.ndarray):
    """(length, a, b) of the longest segment between two of the given 2D points."""
    diff = points_2d[:, None, :] - points_2d[None, :, :]
    d2 = np.einsum("ijk,ijk->ij", diff, diff)
    i, j = np.unravel_index(int(np.argmax(d2)), d2.shape)
    return math.sqrt(float(d2[i, j])), points_2d[i], points_2d[j]


def _perpendicular_chord(polygon: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Longest chord of a convex polygon perpendicular to the segment a-b (same units).

    The chord length, as a function of the position t along a-b, is concave for a
    convex polygon and piecewise linear with kinks at the vertices' positions, so
    its maximum is at one of them: evaluate it there.
    """
    u = (b - a) / np.linalg.norm(b - a)
    n = np.array([-u[1], u[0]])
    t_v = polygon @ u                          # vertex positions along the long axis
    s_v = polygon @ n                          # and across it
    t0, t1 = t_v, np.roll(t_v, -1)             # edges (v_k, v_k+1)
    s0, s1 = s_v, np.roll(s_v, -1)
    dt = t1 - t0
    best = 0.0
    for t in t_v:
        crossing = (np.minimum(t0, t1) <= t + 1e-9) & (np.maximum(t0, t1) >= t - 1e-9)
        s_hits = []
        slanted = crossing & (np.abs(dt) > 1e-12)
        if np.any(slanted):
            w = (t - t0[slanted]) / dt[slanted]
            s_hits.append(s0[slanted] + w * (s1[slanted] - s0[slanted]))
        along = crossing & (np.abs(dt) <= 1e-12)   # edges lying on the cutting line
        if np.any(along):
            s_hits.append(s0[along])
            s_hits.append(s1[along])
        if s_hits:
            s_all = np.concatenate(s_hits)
            best = max(best, float(s_all.max() - s_all.min()))
    return best


def _slice_diameters(points_2d: np.ndarray):
    """(long, short) diameters in mm of one axial slice from its boundary voxel centres."""
    if len(points_2d) < 2:
        return 0.0, 0.0
    try:
        hull = ConvexHull(points_2d)
        poly = points_2d[hull.vertices]        # counter-clockwise polygon
    except (QhullError, ValueError):
        # All points collinear (a one-voxel-wide streak): no area, short axis 0.
        length, _, _ = _longest_chord(points_2d)
        return length, 0.0
    length, a, b = _longest_chord(poly)
    if length == 0.0:
        return 0.0, 0.0
    return length, _perpendicular_chord(poly, a, b)


def axial_diameters(mask_image: Image):
    """RECIST-style long and short axis of a lesion, in mm, measured in world geometry.

    Returns ``(long_axis_mm, short_axis_mm, slice_index)``:

    * "axial" slices are the slices of constant k index, i.e. ``array[z]`` (on an
      oblique image these planes are tilted in the world; they are what the
      radiologist scrolls through);
    * on every slice, the points are the centres of the lesion's boundary voxels
      (4-connected in-plane), mapped to LPS mm with :meth:`Image.index_to_world`
      and expressed in an orthonormal basis of the slice plane, so anisotropic
      and oblique (even non-orthogonal) grids are measured correctly;
    * long axis = the longest distance between two points of the slice's convex
      hull; the reported slice is the one where it is longest (first one on ties);
    * short axis = on that slice, the longest chord of the convex hull perpendicular
      to the long axis (equal to the true perpendicular diameter for convex
      lesions; an upper bound for concave ones).

    Distances are between voxel centres, so a one-voxel lesion measures 0 mm.
    ``slice_index`` is the z (k) array index.  Empty mask -> ``(0.0, 0.0, None)``.
    """
    m = _as_bool(mask_image.array, "mask")
    box = _bbox(m)
    if box is None:
        return 0.0, 0.0, None
    pad = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, m.shape))
    sub = m[pad]
    boundary = sub & ~ndimage.binary_erosion(sub, structure=_FACE_STRUCTURE_AXIAL, border_value=0)
    kz, jy, ix = np.nonzero(boundary)
    idx = np.stack([kz + pad[0].start, jy + pad[1].start, ix + pad[2].start], axis=1)
    world = mask_image.index_to_world(idx.astype(float))
    # Orthonormal basis of the axial (constant-k) plane: world steps of one voxel in i and j.
    d = mask_image.direction
    step_i = d[:, 0] * mask_image.spacing[0]
    step_j = d[:, 1] * mask_image.spacing[1]
    q, _ = np.linalg.qr(np.stack([step_i, step_j], axis=1))
    coords = world @ q                         # (n, 2) in-plane mm (offset irrelevant)
    best = (-1.0, 0.0, None)
    order = np.argsort(idx[:, 0], kind="stable")
    ks = idx[order, 0]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    stops = np.r_[starts[1:], len(ks)]
    for s0, s1 in zip(starts, stops):
        pts = coords[order[s0:s1]]
        long_mm, short_mm = _slice_diameters(pts)
        if long_mm > best[0]:
            best = (long_mm, short_mm, int(ks[s0]))
    return float(best[0]), float(best[1]), best[2]


# -------------------------------------------------------------------- longitudinal
def _series(values_by_timepoint):
    """(labels, values) from a dict {timepoint: value} (in its order) or a sequence."""
    if isinstance(values_by_timepoint, dict):
        labels = list(values_by_timepoint.keys())
        values = list(values_by_timepoint.values())
    else:
        values = list(values_by_timepoint)
        labels = list(range(len(values)))
    if not values:
        raise ValueError("need at least one timepoint (the baseline)")
    return labels, [None if v is None else float(v) for v in values]


def _pct(value, reference):
    if value is None or reference is None or reference == 0:
        return None
    return 100.0 * (value - reference) / reference


def change_table(volumes_or_diameters_by_timepoint) -> list:
    """Per-timepoint percentage change versus baseline and versus nadir.

    Input: a dict ``{timepoint_label: value}`` in chronological order, or a
    sequence of values (labels become 0, 1, 2, ...); the first entry is the
    baseline.  Values are volumes (ml) or diameters / sums of diameters (mm);
    ``None`` marks a timepoint without a measurement.

    Returns one dict per timepoint with keys ``timepoint``, ``value``,
    ``change_vs_baseline_pct`` (100 * (v - baseline) / baseline), ``nadir`` (the
    smallest value at any *earlier* timepoint, baseline included; None at
    baseline) and ``change_vs_nadir_pct``.  A percentage whose reference is 0 or
    missing is None.
    """
    labels, values = _series(volumes_or_diameters_by_timepoint)
    baseline = values[0]
    rows, nadir = [], None
    for label, v in zip(labels, values):
        rows.append({
            "timepoint": label,
            "value": v,
            "change_vs_baseline_pct": _pct(v, baseline),
            "nadir": nadir,
            "change_vs_nadir_pct": _pct(v, nadir),
        })
        if v is not None:
            nadir = v if nadir is None else min(nadir, v)
    return rows


def recist_category(sum_diameters_by_timepoint):
    """RECIST 1.1 target-lesion response per timepoint -- **for information only**.

    Not a clinical read: it only applies the arithmetic of RECIST 1.1 to the sum of
    diameters (mm) of the target lesions; it ignores new lesions, non-target
    lesions, the lymph-node short-axis rule and confirmation requirements.

    Input: dict ``{timepoint: sum_mm}`` in chronological order or a sequence; the
    first entry is the baseline (must be > 0).  Output (same kind as the input,
    dict or list): ``None`` for the baseline, then for each follow-up, checked in
    this order:

    * ``'CR'``: the sum is 0 (all target lesions gone);
    * ``'PD'``: sum >= 1.2 x nadir **and** sum - nadir >= 5 mm, where nadir is the
      smallest sum at any earlier timepoint (baseline included); also any
      reappearance (sum > 0) after a nadir of 0;
    * ``'PR'``: sum <= 0.7 x baseline (a decrease of at least 30 %);
    * ``'SD'``: otherwise.
    """
    labels, values = _series(sum_diameters_by_timepoint)
    if values[0] is None or values[0] <= 0:
        raise ValueError(f"RECIST needs a baseline sum of diameters > 0 mm, got {values[0]}")
    if any(v is None or v < 0 for v in values):
        raise ValueError(f"sums of diameters must be numbers >= 0 mm, got {values}")
    baseline = values[0]
    out, nadir = [None], baseline
    for v in values[1:]:
        if v == 0:
            cat = "CR"
        elif (nadir == 0) or (v >= 1.2 * nadir - 1e-9 and v - nadir >= 5.0 - 1e-9):
            cat = "PD"
        elif v <= 0.7 * baseline + 1e-9:
            cat = "PR"
        else:
            cat = "SD"
        out.append(cat)
        nadir = min(nadir, v)
    if isinstance(sum_diameters_by_timepoint, dict):
        return dict(zip(labels, out))
    return out


def lesion_measurements(images, masks_by_timepoint, status=None, names=None) -> list:
    """One row per lesion and timepoint: volume (ml), RECIST-style long/short axis (mm),
    change vs baseline and vs nadir (%, volume and long axis), status, and per
    timepoint the RECIST 1.1 category of the sum of long axes (for information only).

    ``images[t]``: the scan (geometry for world measurements); ``masks_by_timepoint[t]``:
    {lesion id: bool (z, y, x)}; ``status[id][t]``: optional status strings;
    ``names[t]``: optional timepoint names.
    """
    n = len(images)
    names = list(names) if names else [f"t{t}" for t in range(n)]
    ids = sorted({pid for masks in masks_by_timepoint for pid in masks})
    rows, long_sum = [], [0.0] * n
    per_lesion = {}
    for pid in ids:
        vols, longs, shorts = [], [], []
        for t in range(n):
            mask = masks_by_timepoint[t].get(pid)
            if mask is None or not np.any(mask):
                vols.append(0.0), longs.append(0.0), shorts.append(0.0)
                continue
            vols.append(lesion_volume_ml(mask, images[t].spacing_zyx))
            long_mm, short_mm, _ = axial_diameters(images[t].with_array(np.asarray(mask, dtype=bool)))
            longs.append(long_mm), shorts.append(short_mm)
            long_sum[t] += long_mm
        per_lesion[pid] = (vols, longs, shorts)
    recist = recist_category(long_sum) if long_sum[0] > 0 else [None] * n
    for pid in ids:
        vols, longs, shorts = per_lesion[pid]
        vchange, lchange = change_table(vols), change_table(longs)
        for t in range(n):
            rows.append({
                "lesion_id": pid, "timepoint": names[t], "index": t,
                "status": (status or {}).get(pid, ["-"] * n)[t],
                "volume_ml": vols[t], "long_axis_mm": longs[t], "short_axis_mm": shorts[t],
                "volume_change_vs_baseline_pct": vchange[t]["change_vs_baseline_pct"],
                "volume_change_vs_nadir_pct": vchange[t]["change_vs_nadir_pct"],
                "long_axis_change_vs_baseline_pct": lchange[t]["change_vs_baseline_pct"],
                "long_axis_change_vs_nadir_pct": lchange[t]["change_vs_nadir_pct"],
                "sum_long_axes_mm": long_sum[t],
                "recist_information_only": recist[t],
            })
    return rows


# ------------------------------------------------------------------------ tracking
def _label_array(img: Image, what: str) -> np.ndarray:
    a = img.array
    if a.dtype == bool:
        return a.astype(np.uint8)
    if not a.size:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        lo, hi = float(a.min()), float(a.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"{what} label map has NaN or infinite values; label value = lesion ID")
        if lo < 0:
            raise ValueError(f"{what} label map has negative values; label value = lesion ID")
        dtype = np.uint8 if hi < 2 ** 8 else np.uint16 if hi < 2 ** 16 else np.int64
        as_int = a.astype(dtype)
        if not np.array_equal(as_int, a):
            raise ValueError(f"{what} label map has non-integer values; label value = lesion ID")
        return as_int
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{what} label map has unsupported type {a.dtype}; label value = lesion ID")
    if np.issubdtype(a.dtype, np.signedinteger) and a.min() < 0:
        raise ValueError(f"{what} label map has negative values; label value = lesion ID")
    return a


def _geometry_difference(a: Image, b: Image, tol: float = 1e-4):
    """Name and values of the first differing geometry field, or None."""
    if a.shape != b.shape:
        return "shape (z, y, x)", a.shape, b.shape
    for name in ("spacing", "origin", "direction"):
        va, vb = getattr(a, name), getattr(b, name)
        if not np.allclose(va, vb, atol=tol):
            fmt = (lambda v: np.round(np.asarray(v), 6).tolist())
            return name, fmt(va), fmt(vb)
    return None


def _boxes(labels: np.ndarray) -> dict:
    """{lesion_id: bounding-box slices} of every non-zero label (one pass over the array)."""
    found = ndimage.find_objects(labels)
    return {i + 1: box for i, box in enumerate(found) if box is not None}


def evaluate_case(pred_labels: Image, gt_labels: Image, *, tolerance_mm: float = 2.0,
                  match_mm: float = 25.0, lesion_ids=None, case=None, patient=None) -> list:
    """Per-lesion evaluation of one follow-up scan (or any labelled scan).

    ``pred_labels`` and ``gt_labels`` are label maps with identical geometry; the
    voxel value is the lesion ID (0 = background) and equal IDs are the same
    lesion.  The lesions evaluated are the union of the IDs present in either map
    and of ``lesion_ids`` (pass the IDs that were tracked, so that a lesion absent
    from both maps -- a correctly vanished lesion -- is scored too).

    One dict per lesion, sorted by ID, with keys:

    * ``case``, ``patient`` (as given; ``patient`` defaults to ``case``), ``lesion_id``;
    * ``gt_present``, ``pred_present`` (non-empty masks);
    * ``gt_volume_ml``, ``pred_volume_ml``;
    * ``dice`` and ``nsd`` (NSD at ``tolerance_mm``, mm); both empty -> 1.0, one
      empty -> 0.0 (a mask on an empty follow-up scores 0, as in the paper);
    * ``centre_distance_mm``: distance between the centres of mass in LPS world mm,
      None unless both masks are non-empty (MED averages it);
    * ``cpm_hit``: True if that distance is <= ``match_mm`` (25 mm in the paper),
      False if it is larger or the prediction is empty, None when the ground truth
      is empty (such lesions do not count for CPM).

    Raises ValueError if the geometries differ (naming the field).
    """
    diff = _geometry_difference(pred_labels, gt_labels)
    if diff is not None:
        raise ValueError(f"prediction and ground truth geometry differ: {diff[0]} {diff[1]} vs {diff[2]}")
    p_arr = _label_array(pred_labels, "prediction")
    g_arr = _label_array(gt_labels, "ground truth")
    p_boxes, g_boxes = _boxes(p_arr), _boxes(g_arr)
    ids = set(p_boxes) | set(g_boxes) | {int(i) for i in (() if lesion_ids is None else lesion_ids)}
    ids.discard(0)
    spacing = gt_labels.spacing_zyx
    rows = []
    for lid in sorted(ids):
        box = _union_box(p_boxes.get(lid), g_boxes.get(lid))
        row = {"case": case, "patient": case if patient is None else patient, "lesion_id": lid}
        if box is None:
            row.update(gt_present=False, pred_present=False, gt_volume_ml=0.0, pred_volume_ml=0.0,
                       dice=1.0, nsd=1.0, centre_distance_mm=None, cpm_hit=None)
            rows.append(row)
            continue
        pm = p_arr[box] == lid
        gm = g_arr[box] == lid
        pred_present, gt_present = lid in p_boxes, lid in g_boxes
        dist = None
        if pred_present and gt_present:
            offset = np.array([s.start for s in box], dtype=float)
            cp = np.array([ix.mean() for ix in np.nonzero(pm)]) + offset
            cg = np.array([ix.mean() for ix in np.nonzero(gm)]) + offset
            dist = float(np.linalg.norm(gt_labels.index_to_world(cp) - gt_labels.index_to_world(cg)))
        row.update(
            gt_present=gt_present,
            pred_present=pred_present,
            gt_volume_ml=lesion_volume_ml(gm, spacing),
            pred_volume_ml=lesion_volume_ml(pm, spacing),
            dice=dice(pm, gm),
            nsd=normalized_surface_dice(pm, gm, spacing, tolerance_mm),
            centre_distance_mm=dist,
            cpm_hit=None if not gt_present else (dist is not None and dist <= match_mm),
        )
        rows.append(row)
    return rows


def _scan_means(rows: list) -> dict:
    """Per-scan means of each metric over that scan's lesions (None if not defined)."""
    def mean(vals):
        vals = [float(v) for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else None
    return {
        "total_dice": mean(r["dice"] for r in rows),
        "nsd": mean(r.get("nsd") for r in rows),
        "cpm25": mean(r["cpm_hit"] for r in rows if r.get("cpm_hit") is not None),
        "dice25": mean(r["dice"] for r in rows if r.get("cpm_hit") is True),
        "med_mm": mean(r.get("centre_distance_mm") for r in rows),
    }


def aggregate(rows: list) -> dict:
    """Paper-style summary of :func:`evaluate_case` rows (from one or many scans).

    For each scan (rows sharing ``case``) every metric is first averaged over its
    lesions; then the scans of each ``patient`` are averaged, and the result is the
    mean over patients -- our reading of the paper's "First, the average over all
    lesions of a particular scan is calculated, and then weighted by the number of
    scans per patient": every patient weighs the same, each of their scans 1/n_scans.
    A scan where a metric is undefined (e.g. Dice@25 with no hit) is skipped for it.

    Returns ``{"n_patients", "n_scans", "n_lesions", "total_dice", "nsd",
    "cpm25", "dice25", "med_mm"}``; scores are fractions in [0, 1] (the paper
    prints x100), ``med_mm`` in mm; a metric defined nowhere is None.  ``cpm25``
    and ``dice25`` are at the ``match_mm`` the rows were made with.
    """
    scans: dict = {}
    for r in rows:
        scans.setdefault(r.get("case"), []).append(r)
    patients: dict = {}
    for case, scan_rows in scans.items():
        patient = scan_rows[0].get("patient")
        patients.setdefault(case if patient is None else patient, []).append(_scan_means(scan_rows))
    keys = ("total_dice", "nsd", "cpm25", "dice25", "med_mm")
    out = {"n_patients": len(patients), "n_scans": len(scans), "n_lesions": len(rows)}
    for key in keys:
        per_patient = []
        for scan_means in patients.values():
            vals = [m[key] for m in scan_means if m[key] is not None]
            if vals:
                per_patient.append(sum(vals) / len(vals))
        out[key] = sum(per_patient) / len(per_patient) if per_patient else None
    return out


# ------------------------------------------------------------------------- folders
def _case_name(path: Path):
    """Case name (file name without a recognised extension), or None if not a label file."""
    name = path.name
    for ext in LABEL_EXTENSIONS:
        if name.lower().endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)]
    return None


def _label_files(folder: Path) -> dict:
    files: dict = {}
    for p in sorted(folder.iterdir()):
        case = _case_name(p)
        if case is None or not p.is_file() or p.name.startswith("."):
            continue
        files.setdefault(case, []).append(p)
    return files


def evaluate_folders(pred_dir, gt_dir, *, tolerance_mm: float = 2.0, match_mm: float = 25.0,
                     patient_of=None) -> list:
    """Evaluate every ground-truth label file in ``gt_dir`` against ``pred_dir``.

    Files are matched by case name: the file name without its extension
    (``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``), so ``case1.nii.gz`` may be
    compared with ``case1.nrrd``.  Predictions without ground truth are ignored.
    ``patient_of(case_name) -> patient`` groups scans by patient for
    :func:`aggregate` (default: every case is its own patient).

    Returns the concatenated :func:`evaluate_case` rows (``case`` = case name).

    Raises FileNotFoundError if a folder does not exist, ``gt_dir`` holds no label
    file, or a ground-truth file has no prediction (naming the file); ValueError if
    a case name matches several files, or the geometries of a pair differ (naming
    both files and the differing field).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for what, folder in (("prediction", pred_dir), ("ground-truth", gt_dir)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{what} folder not found: {folder}")
    gt_files, pred_files = _label_files(gt_dir), _label_files(pred_dir)
    if not gt_files:
        raise FileNotFoundError(f"no label files ({', '.join(LABEL_EXTENSIONS)}) in ground-truth folder {gt_dir}")
    rows = []
    for case, gts in gt_files.items():
        if len(gts) > 1:
            raise ValueError(f"ambiguous ground truth for case {case!r}: {', '.join(map(str, gts))}")
        gt_path = gts[0]
        preds = pred_files.get(case, [])
        if not preds:
            raise FileNotFoundError(f"no prediction for ground-truth file {gt_path}: expected "
                                    f"{pred_dir / gt_path.name} (or {case} with another of "
                                    f"{', '.join(LABEL_EXTENSIONS)})")
        same_name = [p for p in preds if p.name == gt_path.name]
        if len(preds) > 1 and not same_name:
            raise ValueError(f"ambiguous prediction for {gt_path}: {', '.join(map(str, preds))}")
        pred_path = (same_name or preds)[0]
        gt_img, pred_img = read_image(gt_path), read_image(pred_path)
        diff = _geometry_difference(pred_img, gt_img)
        if diff is not None:
            raise ValueError(f"geometry mismatch between prediction {pred_path} and ground truth "
                             f"{gt_path}: {diff[0]} differs ({diff[1]} vs {diff[2]})")
        patient = patient_of(case) if patient_of is not None else None
        rows.extend(evaluate_case(pred_img, gt_img, tolerance_mm=tolerance_mm, match_mm=match_mm,
                                  case=case, patient=patient))
    return rows


# -------------------------------------------------------------------------- tables
def _columns(rows: list) -> list:
    cols: list = []
    seen = set()
    for r in rows:
        for k in r:
            if k not in seen:
                seen.add(k)
                cols.append(k)
    return cols


def _plain(v):
    """JSON-safe plain Python value (numpy scalars unwrapped, NaN/inf -> None)."""
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Path):
        return str(v)
    return v


def write_table(rows: list, out_prefix) -> tuple:
    """Write ``rows`` (a list of flat dicts) to ``<out_prefix>.csv`` and ``<out_prefix>.json``.

    Columns are the union of the keys in order of first appearance; in the CSV a
    missing value or None is an empty cell; the JSON is a list of objects (NaN and
    numpy values converted to plain JSON).  Each file is written to a temporary
    file in the same folder and renamed over the target (``os.replace``), so a
    failure never leaves a half-written table; both texts are built before either
    file is touched.  Returns ``(csv_path, json_path)``.
    """
    out_prefix = Path(out_prefix)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    plain_rows = [{k: _plain(v) for k, v in r.items()} for r in rows]
    json_text = json.dumps(plain_rows, indent=2, allow_nan=False) + "\n"
    cols = _columns(plain_rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
    writer.writeheader()
    for r in plain_rows:
        writer.writerow({k: ("" if v is None else v) for k, v in r.items()})
    csv_path = out_prefix.with_name(out_prefix.name + ".csv")
    json_path = out_prefix.with_name(out_prefix.name + ".json")
    atomic_write_text(csv_path, buf.getvalue())
    atomic_write_text(json_path, json_text)
    return csv_path, json_path


def _cell(v, digits: int) -> str:
    if v is None:
        return "-"
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}f}"
    return str(v)


def format_table(rows: list, digits: int = 3) -> str:
    """A fixed-width text table of ``rows`` (list of flat dicts) for a terminal or log.

    One column per key (union, first-appearance order); floats with ``digits``
    decimals, None as ``-``, booleans as yes/no; numbers right-aligned, text
    left-aligned.  No trailing newline.  Empty list -> ``"(no rows)"``.
    """
    if not rows:
        return "(no rows)"
    cols = _columns(rows)
    cells = [[_cell(r.get(c), digits) for c in cols] for r in rows]
    numeric = [all(isinstance(r.get(c), (int, float, np.number)) and not isinstance(r.get(c), bool)
                   for r in rows if r.get(c) is not None) for c in cols]
    widths = [max(len(str(c)), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(values):
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line([str(c) for c in cols]), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells)
    return "\n".join(out)
