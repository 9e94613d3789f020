"""Clinical measurement of lesion masks: volume, RECIST-style axial diameters, change over time.

Pure numpy/scipy; never imports slicer, qt or vtk.

Conventions (as in :mod:`LesionLocatorLib.image`):

* Masks are numpy arrays in **(z, y, x)** order.
* ``spacing_zyx`` is the voxel size in **millimetres** in array order (z, y, x)
  (``Image.spacing_zyx``; note ``Image.spacing`` itself is (x, y, z)).
* World points are **LPS millimetres (x, y, z)**, obtained from voxel *centres*
  through :meth:`Image.index_to_world` (so spacing, origin and an oblique
  ``direction`` are all honoured).
* Volumes are in millilitres (1 ml = 1000 mm^3); lengths in mm; changes in percent.

Scores against a ground truth (Dice, NSD, CPM@25, ...) are in :mod:`LesionLocatorLib.evaluate`.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from .image import Image

# 4-connected within an axial slice (constant k / array[z]), nothing across slices.
_FACE_STRUCTURE_AXIAL = np.zeros((3, 3, 3), dtype=bool)
_FACE_STRUCTURE_AXIAL[1] = ndimage.generate_binary_structure(2, 1)


def _as_bool(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    return a if a.dtype == bool else a != 0


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


def _spacing3(spacing_zyx) -> tuple:
    s = tuple(float(v) for v in spacing_zyx)
    if len(s) != 3 or min(s) <= 0:
        raise ValueError(f"spacing_zyx must be three positive numbers (mm, z y x), got {spacing_zyx!r}")
    return s


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
        elif nadir == 0:
            cat = "PD"
        else:
            cat = {"increase": "PD", "decrease": "PR", "stable": "SD"}[_change(v, nadir, baseline)]
        out.append(cat)
        nadir = min(nadir, v)
    if isinstance(sum_diameters_by_timepoint, dict):
        return dict(zip(labels, out))
    return out


def _change(value: float, nadir: float, baseline: float) -> str:
    """RECIST 1.1's thresholds on a diameter (mm): 'increase' (>= 20 % over the nadir and >= 5 mm),
    'decrease' (<= 70 % of baseline, i.e. at least 30 % smaller) or 'stable'."""
    if value >= 1.2 * nadir - 1e-9 and value - nadir >= 5.0 - 1e-9:
        return "increase"
    if value <= 0.7 * baseline + 1e-9:
        return "decrease"
    return "stable"


LESION_CHANGE_CATEGORIES = ("baseline", "n/a", "disappeared", "reappeared", "increase", "decrease", "stable")
"""Values of :func:`lesion_change_category` (the ``lesion_change_category`` column)."""


def lesion_change_category(long_axes_by_timepoint):
    """One lesion's own change class per timepoint, from its long axis (mm) -- **for information
    only**, and not a RECIST response: RECIST 1.1 classifies the *sum* of the target lesions'
    diameters (:func:`recist_category`); this applies the same thresholds to one lesion, so that a
    lesion that grows while the sum is stable is visible.

    Input: dict ``{timepoint: long_axis_mm}`` in chronological order or a sequence, the first
    entry the baseline; ``None`` marks a timepoint where the lesion was not measured (e.g. it lies
    outside the scan's field of view). Output (same kind as the input), checked in this order:

    * ``'baseline'`` for the first entry;
    * ``'n/a'``: not measured now, or not measurable at baseline (long axis None or 0 mm);
    * ``'disappeared'``: 0 mm now (the lesion is gone);
    * ``'reappeared'``: > 0 mm after a nadir of 0 mm;
    * ``'increase'``: >= 1.2 x nadir **and** >= nadir + 5 mm, where nadir is the smallest
      measured long axis at any earlier timepoint (baseline included);
    * ``'decrease'``: <= 0.7 x baseline (a decrease of at least 30 %);
    * ``'stable'``: otherwise.
    """
    labels, values = _series(long_axes_by_timepoint)
    if any(v is not None and v < 0 for v in values):
        raise ValueError(f"long axes must be numbers >= 0 mm (or None), got {values}")
    baseline = values[0]
    out, nadir = ["baseline"], baseline
    for v in values[1:]:
        if v is None or not baseline:
            cat = "n/a"
        elif v == 0:
            cat = "disappeared"
        elif nadir == 0:
            cat = "reappeared"
        else:
            cat = _change(v, nadir, baseline)
        out.append(cat)
        if v is not None and baseline:
            nadir = min(nadir, v)
    if isinstance(long_axes_by_timepoint, dict):
        return dict(zip(labels, out))
    return out


def _overall_response(long_sum, not_evaluable) -> list:
    """:func:`recist_category` of the sums, where ``not_evaluable[t]`` (a baseline-measurable lesion
    was not measured at t) gives ``'NE'`` unless the measured lesions' sum already shows
    progression (RECIST 1.1); such timepoints never set the nadir."""
    n = len(long_sum)
    if long_sum[0] <= 0:
        return [None] * n
    evaluable = [0] + [t for t in range(1, n) if not not_evaluable[t]]
    categories = dict(zip(evaluable, recist_category([long_sum[t] for t in evaluable])))
    out, nadir = [None], long_sum[0]
    for t in range(1, n):
        if t in categories:
            out.append(categories[t])
            nadir = min(nadir, long_sum[t])
            continue
        v = long_sum[t]
        progressed = (nadir == 0 and v > 0) or (v >= 1.2 * nadir - 1e-9 and v - nadir >= 5.0 - 1e-9)
        out.append("PD" if progressed else "NE")
    return out


def lesion_measurements(images, masks_by_timepoint, status=None, names=None) -> list:
    """One row per lesion and timepoint: volume (ml), RECIST-style long/short axis (mm),
    change vs baseline and vs nadir (%, volume and long axis), status, the lesion's own change
    class, and per timepoint the RECIST 1.1 category of the sum of long axes (for information
    only).

    ``images[t]``: the scan (geometry for world measurements); ``masks_by_timepoint[t]``:
    {lesion id: bool (z, y, x)}; ``status[id][t]``: optional status strings;
    ``names[t]``: optional timepoint names.

    Two columns classify change, and they answer different questions:

    * ``recist_information_only``: the **overall** response of the timepoint, the same in every
      lesion's row: :func:`recist_category` of ``sum_long_axes_mm`` (the sum over all lesions).
      At a follow-up where a lesion measurable at baseline is ``outside`` the scan's field of view
      it is ``'NE'`` (not evaluable, RECIST 1.1), or ``'PD'`` when the measured lesions alone
      already show progression; ``sum_long_axes_mm`` there is the sum of the lesions measured.
    * ``lesion_change_category``: **this lesion's** own change class
      (:func:`lesion_change_category` of its long axis): ``'baseline'``, ``'n/a'`` (``outside``,
      or nothing to measure at baseline), ``'disappeared'``, ``'reappeared'``, ``'increase'``,
      ``'decrease'`` or ``'stable'``; a lesion first seen at a follow-up (status ``'new'`` there,
      ``'absent'`` before, see :mod:`LesionLocatorLib.correct`) is ``'absent'``, then ``'new'``,
      then changes against that scan; it is not a target lesion (left out of the sum) and makes
      its scan's overall response ``'PD'``. A lesion that grows 63 % while the sum is stable shows
      ``'increase'`` here and ``'SD'`` in ``recist_information_only``.

    A lesion with an empty mask has 0 ml and 0 mm. Where it is ``outside`` (not measured, only
    its mask is empty) its changes are None, its change class ``'n/a'``, and that timepoint is
    never its nadir.
    """
    n = len(images)
    names = list(names) if names else [f"t{t}" for t in range(n)]
    ids = sorted({pid for masks in masks_by_timepoint for pid in masks})
    status = status or {}
    rows, long_sum = [], [0.0] * n
    not_evaluable, appeared = [False] * n, [False] * n
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
            if _status_at(status, pid, 0) != "absent":  # a lesion new at a follow-up is not a target lesion
                long_sum[t] += long_mm
        outside = [t > 0 and _status_at(status, pid, t) == "outside" for t in range(n)]
        for t in range(1, n):
            not_evaluable[t] |= outside[t] and longs[0] > 0
            appeared[t] |= _status_at(status, pid, t) == "new"
        per_lesion[pid] = (vols, longs, shorts, outside)
    recist = [("PD" if appeared[t] else r) for t, r in enumerate(_overall_response(long_sum, not_evaluable))]
    for pid in ids:
        vols, longs, shorts, outside = per_lesion[pid]
        first = next((t for t in range(n) if _status_at(status, pid, t) != "absent"), 0)  # > 0: a new lesion
        vchange = _from(first, change_table, [None if outside[t] else vols[t] for t in range(n)])
        measured_longs = [None if outside[t] else longs[t] for t in range(n)]
        lchange = _from(first, change_table, measured_longs)
        own = ["absent"] * first + (["new"] + lesion_change_category(measured_longs[first:])[1:] if first else
                                    lesion_change_category(measured_longs))
        for t in range(n):
            rows.append({
                "lesion_id": pid, "timepoint": names[t], "index": t,
                "status": status.get(pid, ["-"] * n)[t],
                "volume_ml": vols[t], "long_axis_mm": longs[t], "short_axis_mm": shorts[t],
                "volume_change_vs_baseline_pct": vchange[t]["change_vs_baseline_pct"],
                "volume_change_vs_nadir_pct": vchange[t]["change_vs_nadir_pct"],
                "long_axis_change_vs_baseline_pct": lchange[t]["change_vs_baseline_pct"],
                "long_axis_change_vs_nadir_pct": lchange[t]["change_vs_nadir_pct"],
                "sum_long_axes_mm": long_sum[t],
                "recist_information_only": recist[t],
                "lesion_change_category": own[t],
            })
    return rows


def _from(first: int, table, values) -> list:
    """``table(values[first:])`` after ``first`` timepoints without change values (a lesion first
    seen at scan ``first`` changes against that scan)."""
    return [{"change_vs_baseline_pct": None, "change_vs_nadir_pct": None}] * first + table(values[first:])


def _status_at(status: dict, pid, t: int):
    per = status.get(pid)
    return per[t] if per is not None and t < len(per) else None
