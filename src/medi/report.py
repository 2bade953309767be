"""The report (`medi report`): figures comparing the models from the stages' metrics and sample sets.

- `reports/fid_per_class.png` (the paper's Figure 3): FID per class for every compared model, classes in
  descending order of real images, dotted lines at each model's average; beside it, FID per site against
  the site's number of real tiles.
- `reports/sites_real_cls_medi.png` (the paper's Figure 4): for two classes and their largest training
  sites, a row of real tiles of the site and a row of each model's tiles generated for that (class, site).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd

from medi.config import Config
from medi.errors import MediError
from medi.io import read_json, write_text

log = logging.getLogger(__name__)

def sites_figure(cfg: Config, train_index: pd.DataFrame, tiles: np.ndarray, sets: Mapping[str, tuple[Path, pd.DataFrame]]):
    """Per class, columns = its largest training sites; rows = real tiles of the site, then each model's tiles
    generated for that (class, site), `report.tiles_per_row` side by side (blank: none generated)."""
    from medi import figures
    from medi.artifacts import read_png

    r = cfg.report
    classes = [c for c in r.site_classes if c in set(train_index["class"])] or \
        train_index["class"].value_counts().index[:2].tolist()
    k, size = r.tiles_per_row, tiles.shape[1:]
    blocks = {c: train_index[train_index["class"] == c]["tss"].value_counts().index[: r.sites_per_class].tolist()
              for c in classes}
    width = max(len(s) for s in blocks.values())
    rows, labels, titles = [], [], []

    def cell(images: list[np.ndarray]) -> np.ndarray:
        out = np.zeros((k, *size), np.uint8)
        if images:
            out[: min(len(images), k)] = np.stack(images[:k])
        return np.concatenate(list(out), axis=1)            # k tiles side by side

    for c, sites in blocks.items():
        pad = [np.zeros((size[0], size[1] * k, 3), np.uint8)] * (width - len(sites))
        real = [cell([tiles[i] for i in train_index[(train_index["class"] == c) & (train_index["tss"] == s)]["idx"][:k]])
                for s in sites]
        rows.append(real + pad)
        labels.append(f"{c}: real")
        titles.append([f"{c}, TSS {s}" for s in sites] + [""] * len(pad))
        for name, (folder, manifest) in sets.items():
            conditioned = "tss" in str(manifest["conditioned_on"].iloc[0]).split(",")
            rows.append([cell([read_png(folder / p) for p in
                               manifest[(manifest["class"] == c) & (manifest["tss"] == s)]["path"][:k]]) for s in sites] + pad)
            labels.append(f"{c}: {name}" + ("" if conditioned else "\n(class only)"))
            titles.append([""] * width)
    return figures.tile_grid(np.stack([np.stack(r) for r in rows]), labels, titles,
                             "Real tiles of a site (top row of each class) and tiles generated for that class and site",
                             scale=0.9 * k)


def load_fid_metrics(cfg: Config) -> dict[str, dict]:
    out = {}
    for name in cfg.report.models:
        path = Path(cfg.fid.detail.format(model=name))
        if not path.exists():
            raise MediError(f"{path} not found; run `medi fid --model {name}` (or `dvc repro fid@{name}`) first")
        out[name] = read_json(path)
    extractors = {m["extractor"] for m in out.values()}
    if len(extractors) > 1:
        raise MediError(f"the FID metrics were computed in different feature spaces and cannot be compared: {extractors}")
    return out


def fid_comparison(metrics: Mapping[str, dict], baseline: str = "cls", model: str = "medi") -> dict | None:
    """Mean per-class FID of each model and the classes where `model` beats `baseline`."""
    if baseline not in metrics or model not in metrics:
        return None
    a, b = metrics[baseline]["per_class"], metrics[model]["per_class"]
    common = sorted(set(a) & set(b))
    better = [c for c in common if b[c] < a[c]]
    return {f"mean_class_fid_{baseline}": float(np.mean([a[c] for c in common])) if common else None,
            f"mean_class_fid_{model}": float(np.mean([b[c] for c in common])) if common else None,
            f"{model}_better_classes": better, "classes_compared": len(common),
            f"overall_fid_{baseline}": metrics[baseline]["overall"], f"overall_fid_{model}": metrics[model]["overall"]}


def not_shown(cfg: Config, metrics: Mapping[str, dict]) -> list[str]:
    """What the report's figures and tables cannot show for these metrics, and why (tiny or empty groups, an
    FID curve that was not computed), one sentence each."""
    out = []
    k = cfg.fid.min_count
    for name, m in metrics.items():
        k = m.get("min_count", k)
        n = m.get("n_per_class", {})
        if not m["per_class"]:
            most = max(n, key=lambda c: min(n[c].values())) if n else None
            out.append(f"{name}: no class has {k} (fid.min_count) real and generated images"
                       + (f" (at most {n[most]['real']} real and {n[most]['generated']} generated, {most})" if most else "")
                       + ", so there is no mean FID per class; the bars are hatched, from fewer images.")
        below = m.get("below_min_count", {}).get("class", {})
        none = sorted(c for c in n if c not in m["per_class"] and below.get(c, {}).get("fid") is None)
        if none:
            out.append(f"{name}: no FID bar for {', '.join(none)} (fewer than 2 real or generated images).")
    if not any(m.get("per_site") for m in metrics.values()):
        out.append(f"FID per site (right panel): no site has {k} (fid.min_count) real and generated images, so the "
                   "panel is empty.")
    if cfg.train.eval_every == 0:
        out.append("FID curves during training: train.eval_every is 0, so none was computed.")
    return out


def probe_rows(probe: dict) -> pd.DataFrame:
    """metrics/probe.json as one row per (task, method), for `dvc plots`."""
    keys = ("overall", "overall_lo", "overall_hi", "tss_avg", "tss_avg_lo", "tss_avg_hi")
    rows = [{"task": task, "method": method, "arm": f"{task} {method}", **{k: v.get(k) for k in keys}}
            for task, arms in probe["tasks"].items() for method, v in arms.items()
            if method not in ("differences", "verdict")]
    return pd.DataFrame(rows, columns=["task", "method", "arm", *keys])


def _figure(value: float | None, spec: str) -> str:
    """A figure of a report table; '-' where the stage had none (e.g. mean FID per class with every class
    below fid.min_count)."""
    return "-" if value is None else format(value, spec)


def pairs_table(metrics: Mapping[str, dict]) -> list[str]:
    """The index page's lines on the unseen-pairs evaluation (medi.unseen): each model's figures on pairs never seen
    in training and on seen ones, and the ground truth's on the synthetic world; none where no fid stage ran it."""
    names = ("site_accuracy", "stain_rank", "class_accuracy")
    have = {name: m["pairs"] for name, m in metrics.items() if m.get("pairs")}
    if not have:
        return []
    any_pairs = next(iter(have.values()))

    def row(label: str, p: dict, prefix: str = "", figures: tuple[str, ...] = names) -> str:
        return f"| {label} | " + " | ".join(_figure(p.get(f"{prefix}{kind}_{f}"), ".3f")
                                           for kind in ("unseen", "seen") for f in figures) + " |"

    lines = ["", "### Pairs never seen in training", "",
             f"Every class at the largest training site of every class ({any_pairs['pairs_per_kind']['unseen']} unseen, "
             f"{any_pairs['pairs_per_kind']['seen']} seen pairs, {any_pairs['images_per_pair']} images each): can a model "
             "carry a site's look to classes that site never sent? Site and class accuracy by the classifiers above "
             "(chance as above), stain rank against the true stains (0 = nearest, 0.5 = chance; synthetic world). "
             "The ground truth's row is what a perfect generator scores with the same instrument (docs/conditioning.md).", "",
             "| tiles | unseen: site accuracy | unseen: stain rank | unseen: class accuracy "
             "| seen: site accuracy | seen: stain rank | seen: class accuracy |", "|---|---|---|---|---|---|---|"]
    lines += [row(name, p) for name, p in have.items()]
    truth = next((p for p in have.values() if "ceiling_unseen_site_accuracy" in p), None)   # the same world for all
    if truth is not None:
        lines.append(row("ground truth", truth, "ceiling_"))
    valid = next((p for p in have.values() if "deconf_unseen_site_accuracy" in p), None)
    if valid is None:
        return lines
    accuracies = ("site_accuracy", "class_accuracy")

    lines += ["", "The same tiles read by classifiers that learnt from the world's own tiles of every class at every "
              f"training site ({valid['deconf_site_accuracy_cv']:.2f} site and {valid['deconf_class_accuracy_cv']:.2f} "
              "class accuracy on held-out rendered tiles), so neither reads a site's stain as its class nor a class's "
              "tissue as its site: a valid instrument, which only the synthetic world allows.", "",
              "| tiles | unseen: site accuracy | unseen: class accuracy | seen: site accuracy | seen: class accuracy |",
              "|---|---|---|---|---|"]
    lines += [row(name, p, "deconf_", accuracies) for name, p in have.items() if "deconf_unseen_site_accuracy" in p]
    if "ceiling_deconf_unseen_site_accuracy" in valid:
        lines.append(row("ground truth", valid, "ceiling_deconf_", accuracies))
    return lines


def index_page(cfg: Config, metrics: Mapping[str, dict], summary: dict, probe_table: str | None,
               train_metrics: Mapping[str, dict]) -> str:
    """reports/index.md: every figure and table of a pipeline run, with the settings that produced it and the
    paper's figures beside ours (the probe's table as the probe stage wrote it)."""
    from medi import figures

    out = Path(cfg.report.index).parent

    def rel(path: str) -> str:
        return Path(os.path.relpath(Path(path).resolve(), out.resolve())).as_posix()

    first = next(iter(metrics.values()))
    s = first["sampling"]
    lines = ["# medi report", "",
             f"Data: `{cfg.data.source}` ({', '.join(cfg.classes)}), {cfg.data.resolution} px; models "
             f"{', '.join(cfg.report.models)} ({cfg.model.preset}, {cfg.train.max_steps} steps of batch {cfg.train.batch_size}).", "",
             "## Dataset (the paper's Figure 2)", "", f"![dataset]({rel(cfg.split.figure)})", "",
             "## Samples during training", ""]
    for name in cfg.report.models:
        lines += [f"![{name}]({rel(cfg.train.figure.format(model=name))})", ""]
        stain = train_metrics.get(name, {})
        if "stain_unseen_rank_percentile" in stain:
            lines += [f"{name}: stain rank of the conditioned site (0 = nearest, 0.5 = chance) "
                      f"{stain['stain_seen_rank_percentile']:.2f} on seen and {stain['stain_unseen_rank_percentile']:.2f} "
                      f"on unseen pairs; real tiles {stain['stain_real_rank_percentile']:.2f}.", ""]
    lines += ["## Fidelity (the paper's Figures 3 and 4)", "",
              f"Feature space: {first['extractor']}. Samples: `{s['strategy']}`, {s['scheduler']} {s['steps']} steps, "
              f"{figures.guidance_text(s)}; {first['n_generated']} generated vs {first['n_real']} real training tiles. "
              "Paper (Inception, DDIM 100, 800k steps): mean FID per class CLS 50.65, MeDi 37.73, MeDi better on 23 of 32 classes.", "",
              f"![fid]({rel(cfg.report.fid_figure)})", "", f"![sites]({rel(cfg.report.sites_figure)})", "",
              "| model | FID overall | mean FID per class | KID | class accuracy | site accuracy | stain rank (seen) |",
              "|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        c = m["conditioning"]
        stain = m.get("stain", {}).get("summary", {}).get("seen", {}).get("rank_percentile")
        lines.append(f"| {name} | {m['overall']:.4g} | {_figure(m['mean_class_fid'], '.4g')} | {m['kid']:.3g} "
                     f"| {_figure(c['class_accuracy'], '.3f')} | {_figure(c['site_accuracy'], '.3f')} "
                     f"| {_figure(stain, '.3f')} |")
    c = first["conditioning"]
    lines += ["", f"Ceilings (the classifiers on held-out real slides): class {c['class_accuracy_real_cv']:.3f}, site "
              f"{c['site_accuracy_real_cv']:.3f}; chance {c['class_chance']:.3f} / {c['site_chance']:.3f}."]
    if summary:
        lines += ["", f"MeDi better than CLS on {len(summary['medi_better_classes'])} of {summary['classes_compared']} classes."]
    lines += pairs_table(metrics)
    missing = not_shown(cfg, metrics)
    if missing:
        lines += ["", "### What these figures cannot show", "", *[f"- {m}" for m in missing]]
    if probe_table is not None:
        lines += ["", "## Downstream bias: the linear probe (the paper's Table 1)", "",
                  probe_table, f"![probe]({rel(cfg.probe.figure)})"]
    return "\n".join(lines) + "\n"


def run_stage(cfg: Config) -> dict:
    """`medi report`: the comparison figures and reports/index.md, in reports/ and MLflow."""
    import mlflow

    from medi import artifacts, figures, tracking
    from medi.artifacts import read_manifest, train_frame

    metrics = load_fid_metrics(cfg)
    train_index = train_frame(cfg)
    tiles = artifacts.load_tiles(cfg.data.output)
    sets = {}
    for name in cfg.report.models:
        folder = Path(cfg.sample.output.format(model=name))
        sets[name] = (folder, read_manifest(folder / "manifest.csv"))
    with tracking.stage_run(cfg, "report", ("report",), run_name="report"):
        fid_path = figures.save(figures.fid_figure(metrics), cfg.report.fid_figure)
        sites_path = figures.save(sites_figure(cfg, train_index, tiles, sets), cfg.report.sites_figure)
        for p in (fid_path, sites_path):
            mlflow.log_artifact(str(p), "figures")
        probe_path = Path(cfg.probe.table)
        probe_table = probe_path.read_text() if probe_path.exists() else None
        train_metrics = {n: read_json(cfg.train.detail.format(model=n)) for n in cfg.report.models
                         if Path(cfg.train.detail.format(model=n)).exists()}
        probe_metrics = Path(cfg.probe.metrics)
        if probe_metrics.exists():
            write_text(cfg.report.probe_plot, probe_rows(read_json(probe_metrics)).to_csv(index=False))
        for line in not_shown(cfg, metrics):
            log.warning("report: %s", line)
        write_text(cfg.report.index, index_page(cfg, metrics, fid_comparison(metrics) or {}, probe_table, train_metrics))
        mlflow.log_artifact(cfg.report.index, "report")
        summary = fid_comparison(metrics) or {}
        if summary:
            mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, float)})
            mlflow.log_metric("medi_better_classes", len(summary["medi_better_classes"]))
            log.info("mean FID per class: CLS %s, MeDi %s; MeDi better on %d of %d classes (%s)",
                     _figure(summary["mean_class_fid_cls"], ".4g"), _figure(summary["mean_class_fid_medi"], ".4g"),
                     len(summary["medi_better_classes"]),
                     summary["classes_compared"], ", ".join(summary["medi_better_classes"]))
        log.info("report figures: %s, %s", fid_path, sites_path)
    return summary
