"""Figures shared by the stages: the dataset figure (the paper's Figure 2), tile grids, FID per class and site."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

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


def log(fig: plt.Figure, artifact_file: str) -> None:
    """Log a figure to the active MLflow run, then close it (pyplot keeps every figure open until closed)."""
    import mlflow

    mlflow.log_figure(fig, artifact_file)
    plt.close(fig)


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


COLOURS = {"cls": "tab:red", "medi": "tab:blue"}


def guidance_text(sampling: dict) -> str:
    """A sample set's guidance as captions show it (`sampling`: a fid metrics file's record)."""
    colour = ", colour kept" if sampling.get("guidance_colour") == "conditional" else ""   # named only when guided
    metadata = sampling.get("metadata_guidance")
    apart = metadata is not None and metadata != sampling["guidance"]
    return f"guidance {sampling['guidance']}" + (f" / metadata {metadata}" if apart else "") + colour


def fid_figure(metrics: Mapping[str, dict]):
    """Per-class FID bars per model with each model's mean as a dotted line; per-site FID against n real (the
    paper's Figure 3; the report's, and each fid run's in MLflow)."""
    names = list(metrics)
    first = metrics[names[0]]
    classes = sorted(first["n_per_class"], key=lambda c: -first["n_per_class"][c]["real"])
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(classes) + 5), 4.2),
                                  gridspec_kw={"width_ratios": [max(len(classes), 3), 4]})
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        m = metrics[name]
        colour = COLOURS.get(name, f"C{i + 2}")
        values = [m["per_class"].get(c, m["below_min_count"]["class"].get(c, {}).get("fid", np.nan)) for c in classes]
        flagged = [c not in m["per_class"] for c in classes]
        x = np.arange(len(classes)) + (i - (len(names) - 1) / 2) * width
        bars = ax.bar(x, values, width, color=colour, label=f"{name} (mean {m['mean_class_fid']:.3g})"
                      if m["mean_class_fid"] is not None else name)
        for bar, flag in zip(bars, flagged):
            if flag:                       # fewer than fid.min_count images: shown hatched, not averaged
                bar.set_hatch("//")
                bar.set_alpha(0.5)
        if m["mean_class_fid"] is not None:
            ax.axhline(m["mean_class_fid"], color=colour, linestyle=":", linewidth=1.5)
        sites = sorted(m["per_site"])
        ax2.scatter([m["n_per_site"][s]["real"] for s in sites], [m["per_site"][s] for s in sites], color=colour,
                    s=18, alpha=0.8, label=name)
    ax.set_xticks(np.arange(len(classes)))
    ax.set_xticklabels([f"{c}\n(n={first['n_per_class'][c]['real']})" for c in classes], fontsize=8)
    ax.set_ylabel("FID (lower is better)")
    ax.set_title("FID per class; dotted: mean over classes", fontsize=9)
    ax.legend(fontsize=8)
    if any(m["per_site"] for m in metrics.values()):   # no site with fid.min_count images: nothing to log-scale
        ax2.set_xscale("log")
    else:
        ax2.text(0.5, 0.5, f"no site has {first['min_count']} (fid.min_count)\nreal and generated images",
                 ha="center", va="center", transform=ax2.transAxes, fontsize=9, color="0.4")
    if not any(m["per_class"] for m in metrics.values()):
        ax.text(0.5, 0.95, f"every class has fewer than {first['min_count']} (fid.min_count) real or generated images:"
                "\nhatched bars are unreliable; no mean", ha="center", va="top", transform=ax.transAxes, fontsize=8,
                color="0.3")
    ax2.set_xlabel("real training tiles of the site")
    ax2.set_ylabel("FID of the site's images")
    ax2.set_title(f"FID per site (n >= {first['min_count']} both sides)", fontsize=9)
    ax2.legend(fontsize=8)
    s = first["sampling"]
    fig.suptitle(f"Feature space: {first['extractor']}\n{s['strategy']} samples, {s['scheduler']} {s['steps']} steps, "
                 f"{guidance_text(s)}; {first['n_generated']} generated vs {first['n_real']} real", fontsize=8)
    fig.tight_layout()
    return fig
