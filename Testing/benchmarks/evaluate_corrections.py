"""Evaluate corrected tracking on the synthetic evaluation cases of ``evaluate_demo_model.py``
(same CTs, seeds and options): tracking as it is (automatic), and with a simulated user who
corrects, scan by scan, each follow-up lesion whose tracked Dice is below ``--threshold`` (0.5)
with one click at its true centre (:func:`LesionLocatorLib.correct.retrack`: that lesion is
segmented there with the point model and re-propagated through the later scans; a lesion the
truth says has vanished is not clicked). Reports tracking Dice, CPM@25 and MED
(:func:`LesionLocatorLib.metrics.aggregate` over every follow-up lesion, as the model card) and
the clicks each needed per lesion, writes ``results/evaluate_corrections.json``. A third row:
verified tracking (:func:`LesionLocatorLib.track.track` with ``confirm``) with a simulated user
who moves each proposed point that is more than ``--tolerance-mm`` (10) from the lesion's true
centre onto it (:class:`VerifyingUser`).

Usage: python Testing/benchmarks/evaluate_corrections.py WORKDIR [-m MODEL] [--cases 4] [--lesions 6]
       [--followups 3] [--registration simpleitk] [--threshold 0.5] [--tolerance-mm 10]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))

from evaluate_demo_model import case_arguments, evaluation_case, evaluation_cts  # noqa: E402


def simulated_user(case, result, ids, models, threshold: float):
    """(the corrected result, clicks): scan by scan, one click at the true centre of each lesion
    present in the truth whose tracked Dice is below ``threshold``, all of a scan in one retrack."""
    from LesionLocatorLib.correct import Correction, retrack
    from LesionLocatorLib.metrics import dice
    from LesionLocatorLib.prompts import Point

    clicks = 0
    for t in range(1, len(case.images)):
        truth = case.labels[t].array
        fixes = []
        for pid in ids:
            where = truth == pid
            if where.any() and dice(result.masks[t].get(pid, np.zeros(where.shape, bool)), where) < threshold:
                centre = case.images[t].index_to_world(np.argwhere(where).mean(axis=0))
                fixes.append(Correction(pid, t, Point(pid, tuple(centre))))
        if fixes:
            clicks += len(fixes)
            result = retrack(case.images, result, fixes, models["prev_mask"], models["point"])
    return result, clicks


class VerifyingUser:
    """Verified tracking's simulated user (a ``confirm`` callback of
    :func:`LesionLocatorLib.track.track`): each proposed point more than ``tolerance_mm`` from
    the lesion's true centre at that scan is moved there (one click); the others, and lesions the
    truth says have vanished, are accepted (a confirmation, no click)."""

    def __init__(self, case, tolerance_mm: float = 10.0):
        self.case, self.tolerance_mm = case, tolerance_mm
        self.clicks = self.confirmations = 0
        self.errors_mm = []  # each proposal's distance to the true centre (lesions present in the truth)

    def __call__(self, t: int, proposals: dict) -> dict:
        from LesionLocatorLib.prompts import Point

        truth, image = self.case.labels[t].array, self.case.images[t]
        moved = {}
        for pid, proposal in proposals.items():
            where = np.argwhere(truth == pid)
            centre = image.index_to_world(where.mean(axis=0)) if len(where) else None
            if centre is not None:
                self.errors_mm.append(float(np.linalg.norm(centre - np.asarray(proposal.xyz))))
            if centre is not None and self.errors_mm[-1] > self.tolerance_mm:
                moved[pid] = Point(pid, tuple(centre))
                self.clicks += 1
            else:
                self.confirmations += 1
        return moved


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("-m", default=str(HERE.parents[1] / "Resources" / "Models" / "LesionLocatorDemo"))
    case_arguments(ap)
    ap.add_argument("--registration", default="simpleitk")
    ap.add_argument("--threshold", type=float, default=0.5, help="a tracked Dice below this gets a click")
    ap.add_argument("--tolerance-mm", type=float, default=10.0,
                    help="verified tracking: a proposed point further than this from the true centre is moved")
    a = ap.parse_args()

    from LesionLocatorLib.metrics import aggregate, evaluate_case, format_table
    from LesionLocatorLib.model import load_model
    from LesionLocatorLib.prompts import MaskPrompt
    from LesionLocatorLib.track import track

    work = Path(a.work)
    cts = evaluation_cts(work, a.ct)
    models = {k: load_model(a.m, k, device="cpu") for k in ("point", "prev_mask")}
    rows = {"automatic": [], "corrected": [], "verified": []}
    clicks, lesions, seconds = {"automatic": 0, "corrected": 0, "verified": 0}, 0, {
        "track": 0.0, "corrections": 0.0, "verified track": 0.0}
    confirmations, errors = 0, []
    for c in range(a.cases):
        case = evaluation_case(cts, c, a)
        base, lab = case.images[0], case.labels[0].array
        ids = [int(i) for i in np.unique(lab) if i > 0]
        lesions += len(ids)
        t0 = time.perf_counter()
        auto = track(case.images, [MaskPrompt(i, base.with_array(lab == i)) for i in ids], models["prev_mask"],
                     registration=a.registration)
        seconds["track"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        fixed, n = simulated_user(case, auto, ids, models, a.threshold)
        seconds["corrections"] += time.perf_counter() - t0
        clicks["corrected"] += n
        user = VerifyingUser(case, a.tolerance_mm)
        t0 = time.perf_counter()
        verified = track(case.images, [MaskPrompt(i, base.with_array(lab == i)) for i in ids], models["prev_mask"],
                         registration=a.registration, confirm=user)
        seconds["verified track"] += time.perf_counter() - t0
        clicks["verified"] += user.clicks
        confirmations += user.confirmations
        errors += user.errors_mm
        for name, result in (("automatic", auto), ("corrected", fixed), ("verified", verified)):
            for t in range(1, len(case.images)):
                rows[name] += evaluate_case(result.labels[t], case.labels[t], lesion_ids=ids, case=f"case{c}_t{t}",
                                            patient=f"case{c}")
        print(f"case {c}: {len(ids)} lesions, {n} correction click(s), {user.clicks} verified-tracking click(s)",
              file=sys.stderr)
    table = []
    for name, n in clicks.items():
        agg = aggregate(rows[name])
        table.append({"tracking": name, **{k: agg[k] for k in ("total_dice", "cpm25", "med_mm")},
                      "clicks": n, "clicks_per_lesion": n / max(lesions, 1)})
    print(f"Tracking on {a.cases} synthetic cases ({lesions} lesions, {a.followups} follow-ups, {a.registration} "
          f"registration). corrected: a click where the tracked Dice < {a.threshold}; verified: a click where the "
          f"proposed point is > {a.tolerance_mm} mm from the true centre ({confirmations} proposals accepted)")
    print(format_table(table, digits=3))
    spread = {"median": float(np.median(errors)), "p95": float(np.percentile(errors, 95)), "max": float(max(errors))} \
        if errors else {}
    print("verified tracking: distance of the proposed point to the true centre (mm): "
          + ", ".join(f"{k} {v:.1f}" for k, v in spread.items()))
    print("time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    (HERE / "results").mkdir(exist_ok=True)
    path = HERE / "results" / ("evaluate_corrections.json" if a.registration == "simpleitk"
                                else f"evaluate_corrections_{a.registration}.json")
    path.write_text(json.dumps({"model": a.m, "cases": a.cases, "lesions": lesions, "followups": a.followups,
                                "registration": a.registration, "threshold": a.threshold,
                                "tolerance_mm": a.tolerance_mm, "confirmations": confirmations,
                                "proposal_error_mm": spread, "rows": table,
                                "seconds": seconds}, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
