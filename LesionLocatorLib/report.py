"""Figures for people: lesion growth over time and lesion slices with outlines (PNG)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .files import atomic_output
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
