"""Attention heatmaps: rows are output tokens, columns input tokens; one panel per layer (and head)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def heatmap(path: Path, panels: list[tuple[str, np.ndarray]], rows: list[str], cols: list[str],
            title: str = "", xlabel: str = "input tokens") -> Path:
    """Write a PNG with one heatmap per (label, matrix (len(rows), len(cols))) panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    ncols = min(n, 4)
    nrows = (n + ncols - 1) // ncols
    cell = 0.28
    w = max(3.0, cell * len(cols) + 1.5)
    h = max(2.5, cell * len(rows) + 1.2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, constrained_layout=True)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    for ax, (label, m) in zip(axes.ravel(), panels, strict=False):
        im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(cols)), [c if c.strip() else "␣" for c in cols], fontsize=7, rotation=90)
        ax.set_yticks(range(len(rows)), [r if r.strip() else "␣" for r in rows], fontsize=7)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("output tokens", fontsize=8)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="attention probability")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
