"""Scores of predicted lesion masks against a ground truth: segmentation and tracking metrics.

Pure numpy/scipy; never imports slicer, qt or vtk.

Conventions (as in :mod:`LesionLocatorLib.image`):

* Masks and label maps are numpy arrays in **(z, y, x)** order.
* ``spacing_zyx`` is the voxel size in **millimetres** in array order (z, y, x)
  (``Image.spacing_zyx``; note ``Image.spacing`` itself is (x, y, z)).
* World points are **LPS millimetres (x, y, z)**, obtained from voxel *centres*
  through :meth:`Image.index_to_world` (so spacing, origin and an oblique
  ``direction`` are all honoured).
* Volumes are in millilitres (1 ml = 1000 mm^3); distances in mm.
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
the same ID in prediction and ground truth is the same lesion. Clinical measurements
(volume, diameters, RECIST) are in :mod:`LesionLocatorLib.measure`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from .image import Image, read_image
from .measure import _as_bool, _bbox, _spacing3, lesion_volume_ml

__all__ = ["dice", "normalized_surface_dice", "evaluate_case", "aggregate", "evaluate_folders", "evaluate_paths",
           "LABEL_EXTENSIONS"]

#: File name endings recognised by :func:`evaluate_folders` (longest first).
LABEL_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")

_FACE_STRUCTURE_3D = ndimage.generate_binary_structure(3, 1)


# ----------------------------------------------------------------------------- helpers


def _check_same_shape(pred: np.ndarray, gt: np.ndarray) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth have different shapes: "
                         f"{pred.shape} vs {gt.shape}")


def _union_box(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(p.start, q.start), max(p.stop, q.stop)) for p, q in zip(a, b))


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
            return name, np.round(np.asarray(va), 6).tolist(), np.round(np.asarray(vb), 6).tolist()
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


PREDICTION_SUFFIX = "_lesions"  # lesionlocator segment/track write <case>_lesions.<ending>
GROUND_TRUTH_SUFFIX = "_label"  # lesionlocator synth writes <case>_label.<ending> beside <case>.<ending>


def evaluate_paths(pred, gt, *, tolerance_mm: float = 2.0, match_mm: float = 25.0, patient_of=None) -> list:
    """Evaluate a prediction against a ground truth, each a label file or a folder of them
    (:func:`evaluate_folders`); two files are one case, named after the ground truth. Of two files,
    one may be a DICOM SEG (segment = lesion), placed on the other one's voxel grid."""
    pred, gt = Path(pred), Path(gt)
    for what, path in (("prediction", pred), ("ground truth", gt)):
        if not path.exists():
            raise FileNotFoundError(f"{what} not found: {path}")
    if pred.is_file() != gt.is_file():
        raise ValueError(f"give two label files or two folders: {pred} is a {'file' if pred.is_file() else 'folder'}, "
                         f"{gt} a {'file' if gt.is_file() else 'folder'}")
    if pred.is_dir():
        return evaluate_folders(pred, gt, tolerance_mm=tolerance_mm, match_mm=match_mm, patient_of=patient_of)
    gt_img, pred_img = _read_label_pair(gt, pred)
    diff = _geometry_difference(pred_img, gt_img)
    if diff is not None:
        raise ValueError(f"geometry mismatch between prediction {pred} and ground truth {gt}: {diff[0]} differs "
                         f"({diff[1]} vs {diff[2]})")
    case = _case_name(gt) or gt.name
    return evaluate_case(pred_img, gt_img, tolerance_mm=tolerance_mm, match_mm=match_mm, case=case,
                         patient=patient_of(case) if patient_of is not None else None)


def _read_label_pair(gt: Path, pred: Path) -> tuple:
    """(ground truth, prediction) label images; one of them may be a DICOM SEG, read onto the other's
    grid with label = lesion ID (:func:`LesionLocatorLib.dicomseg.seg_label_image`)."""
    from .dicomseg import is_seg_file, seg_label_image

    gt_seg, pred_seg = is_seg_file(gt), is_seg_file(pred)
    if gt_seg and pred_seg:
        raise ValueError(f"{pred} and {gt} are both DICOM SEG: give one of them as a label image on the scan's grid "
                         f"(e.g. lesionlocator's <case>_lesions.nii.gz) to put the other on")
    if gt_seg:
        pred_img = read_image(pred)
        return seg_label_image(gt, pred_img), pred_img
    gt_img = read_image(gt)
    return gt_img, seg_label_image(pred, gt_img) if pred_seg else read_image(pred)


def evaluate_folders(pred_dir, gt_dir, *, tolerance_mm: float = 2.0, match_mm: float = 25.0,
                     patient_of=None) -> list:
    """Evaluate every ground-truth label file in ``gt_dir`` against ``pred_dir``.

    Files are matched by case name: the file name without its extension
    (``.nii.gz``, ``.nii``, ``.nrrd`` or ``.mha``), so ``case1.nii.gz`` may be
    compared with ``case1.nrrd``; a prediction ``case1_lesions.nii.gz`` (what
    ``lesionlocator segment`` writes) is matched with ``case1`` too. A ground-truth folder holding
    ``<case>_label`` files (``lesionlocator synth``'s scans and labels side by side) is read as those
    labels, named ``<case>``.  Predictions without ground truth are ignored.
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
    labelled = {c[: -len(GROUND_TRUTH_SUFFIX)]: f for c, f in gt_files.items() if c.endswith(GROUND_TRUTH_SUFFIX)}
    gt_files = labelled or gt_files  # scans and their <case>_label files in one folder: the labels are the truth
    for case in list(pred_files):  # lesionlocator's <case>_lesions.<ending> is the prediction for <case>
        base = case[: -len(PREDICTION_SUFFIX)] if case.endswith(PREDICTION_SUFFIX) else None
        if base in gt_files and base not in pred_files:
            pred_files[base] = pred_files.pop(case)
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
