"""Results for people: tables (CSV/JSON files, terminal text) and figures (lesion growth over time,
lesion slices with outlines, PNG)."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from .files import atomic_output, atomic_write_text
from .image import Image


def growth_plot(rows, path: Path) -> None:
    """Volume (ml) of each lesion per timepoint, from lesion_measurements rows, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for pid in sorted({r["lesion_id"] for r in rows}):
        mine = [r for r in rows if r["lesion_id"] == pid]
        ax.plot([r["index"] for r in mine], [r["volume_ml"] for r in mine], marker="o", label=f"Lesion {pid}")
    ax.set_xticks(range(len({r["index"] for r in rows})))
    ax.set_xticklabels([r["timepoint"] for r in rows if r["lesion_id"] == rows[0]["lesion_id"]], rotation=20)
    ax.set_ylabel("volume (ml)")
    ax.set_title("Lesion volume over time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def baseline_figure(image: Image, truth: np.ndarray, result_masks: dict, path: Path) -> None:
    """One panel per lesion: the axial slice through its centre, ground truth (green)
    and prediction (red) outlines, at the image's in-plane aspect ratio."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ids = sorted(result_masks)
    fig, axes = plt.subplots(1, len(ids), figsize=(3.2 * len(ids), 3.4), squeeze=False)
    sy, sx = image.spacing_zyx[1:]
    for ax, pid in zip(axes[0], ids):
        gt = truth == pid
        k = int(np.round(np.argwhere(gt).mean(0)[0])) if gt.any() else image.shape[0] // 2
        ys, xs = np.nonzero(gt[k] | result_masks[pid][k])
        cy, cx = (int(ys.mean()), int(xs.mean())) if ys.size else (image.shape[1] // 2, image.shape[2] // 2)
        r = 40
        win = (slice(max(cy - r, 0), cy + r), slice(max(cx - r, 0), cx + r))
        ax.imshow(np.clip(image.array[k][win], -200, 300), cmap="gray", aspect=sy / sx)
        if gt[k][win].any():
            ax.contour(gt[k][win], levels=[0.5], colors="lime", linewidths=1)
        if result_masks[pid][k][win].any():
            ax.contour(result_masks[pid][k][win], levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"Lesion {pid} (slice {k})", fontsize=9)
        ax.axis("off")
    fig.suptitle("baseline: ground truth (green), LesionLocator (red)", fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


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


def plain_rows(rows: list) -> list:
    """``rows`` (flat dicts) with JSON-safe plain values (see :func:`write_table`'s JSON)."""
    return [{k: _plain(v) for k, v in r.items()} for r in rows]


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
    plain = plain_rows(rows)
    json_text = json.dumps(plain, indent=2, allow_nan=False) + "\n"
    cols = _columns(plain)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
    writer.writeheader()
    for r in plain:
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
