"""Figures shared by the stages: the dataset figure (the paper's Figure 2) and tile grids."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from medi.io import atomic_path  # noqa: E402


def save(fig: plt.Figure, path: str | Path, dpi: int = 120) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def dataset_figure(index: pd.DataFrame, slides: pd.DataFrame, cap: int = 1600) -> plt.Figure:
    """Left: patches per class x TSS (capped; validation and test sites hatched). Right: race and gender shares per class."""
    part_of = dict(zip(slides.tss, slides.part)) if "part" in slides else {}
    counts = index.groupby(["class", "tss"]).size().unstack(fill_value=0)
    classes = index["class"].value_counts().index.tolist()            # largest class on top
    counts = counts.loc[classes]
    order = sorted(counts.columns, key=lambda t: (classes.index(counts[t].idxmax()), -counts[t].max()))
    counts = counts[order]
    data = np.minimum(counts.to_numpy(), cap).astype(float)
    data[data == 0] = np.nan

    fig = plt.figure(figsize=(max(10, 0.12 * len(order) + 6), 1.0 + 0.45 * len(classes) + 2.5))
    gs = fig.add_gridspec(2, 2, width_ratios=[3, 1.2], height_ratios=[1, 0.05], wspace=0.25, hspace=0.35)
    ax = fig.add_subplot(gs[0, 0])
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    hatches = {"validation": "\\\\\\", "test": "///"}
    for j, t in enumerate(order):
        if part_of.get(t) in hatches:
            ax.axvspan(j - 0.5, j + 0.5, facecolor="none", edgecolor="0.6", hatch=hatches[part_of[t]], lw=0)
    ax.set_yticks(range(len(classes)), classes)
    step = max(1, len(order) // 60)
    ax.set_xticks(range(0, len(order), step), order[::step], rotation=90, fontsize=6)
    n_part = {p: sum(part_of.get(t) == p for t in order) for p in hatches}
    ax.set_xlabel(f"tissue source site (TSS); holdout sites hatched: \\\\\\ validation ({n_part['validation']}), "
                  f"/// test ({n_part['test']}), of {len(order)}")
    ax.set_title(f"Patches per class and TSS (capped at {cap})")
    cax = fig.add_subplot(gs[1, 0])
    fig.colorbar(im, cax=cax, orientation="horizontal", label="patches")

    sub = gs[0, 1].subgridspec(2, 1, hspace=0.9)
    for k, col in enumerate(["race", "gender"]):
        axb = fig.add_subplot(sub[k])
        share = pd.crosstab(index["class"], index[col], normalize="index").loc[classes[::-1]]
        left = np.zeros(len(share))
        cmap = plt.get_cmap("tab10")
        for i, value in enumerate(share.columns):
            axb.barh(share.index, share[value], left=left, color=cmap(i % 10), label=value)
            left += share[value].to_numpy()
        axb.set_xlim(0, 1)
        axb.set_title(f"{col} (share of patches)", fontsize=9)
        axb.tick_params(labelsize=7)
        axb.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    return fig


def tile_grid(tiles: np.ndarray, row_labels: list[str], col_labels: list[str] | list[list[str]], title: str = "",
              scale: float = 1.0) -> plt.Figure:
    """A grid of uint8 tiles shaped (rows, cols, H, W, 3); an all-zero tile is shown blank (no such pair).

    `col_labels` is one label per column, or one per cell (a list of rows) when columns differ by row.
    """
    per_cell = bool(col_labels) and isinstance(col_labels[0], list)
    rows, cols = tiles.shape[:2]
    aspect = tiles.shape[2] / tiles.shape[3]       # cell height / width (cells may hold several tiles side by side)
    width = scale * 1.1 * cols + 1
    fig, axes = plt.subplots(rows, cols, figsize=(width, scale * 1.1 * aspect * rows + 0.8), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r, c]
            if tiles[r, c].any():
                ax.imshow(tiles[r, c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c == 0:
                ax.set_ylabel(row_labels[r], fontsize=8)
            if per_cell:
                ax.set_title(col_labels[r][c], fontsize=7)
            elif r == 0:
                ax.set_title(col_labels[c], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
