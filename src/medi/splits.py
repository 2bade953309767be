"""The holdout split (`medi split`): whole (site, demographic) groups of slides are held out.

`paper` reproduces the public MeDi code exactly: the key of a slide is TSS_gender_race (missing -> Unknown);
per project, the distinct keys in order of first appearance in the metadata file; the first
floor((1 - holdout_fraction) * n_keys) train, the rest holdout; then any TSS present in both sets moves
wholly to holdout. `random` draws the held-out keys per project with a seed instead of taking file order.
Either way zero TSS overlap between train and holdout is enforced (checked, not assumed).

The split is made on the metadata table (every slide of the classes, with tiles or not), as the public code
does; tiles are joined afterwards, so a slide that has no tiles (or whose tiles were all skipped) cannot move
keys between train and holdout. Slides without tiles are counted in `metrics/split.json`.

The holdout sites of each class are then divided into **validation** and **test** sites (`split.
validation_fraction`, seeded by `split.seed`): a class with two or more holdout sites keeps at least one on each
side; a class with one holdout site gives it to test. Everything that chooses (sweeps, the probe's choice of a
strategy) reads validation sites only; Table 1 reads test sites only. Each slide's `part` (train | validation |
test) is in `slides.parquet` and `holdout.parquet`; `sites.csv` lists every site with its part.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medi.config import Config, SplitConfig
from medi.errors import MediError
from medi.io import atomic_path, write_json, write_parquet

KEY_ALIASES = {"tissue_source_site": "tss", "TSS": "tss"}


PARTS = ("train", "validation", "test")


@dataclass(frozen=True)
class SplitResult:
    slides: pd.DataFrame   # the slides table with `split` ('train' | 'holdout'), `part` (PARTS) and the `key`
    moved_tss: list[str]   # TSS codes moved to holdout because they straddled the split


def slide_keys(slides: pd.DataFrame, key_columns: list[str]) -> pd.Series:
    cols = [KEY_ALIASES.get(c, c) for c in key_columns]
    missing = [c for c in cols if c not in slides.columns]
    if missing:
        raise MediError(f"split.key_columns: unknown column(s) {missing}; slides have {sorted(slides.columns)}")
    parts = [slides[c].astype("string").fillna("Unknown").replace("", "Unknown") for c in cols]
    key = parts[0]
    for p in parts[1:]:
        key = key + "_" + p
    return key


def split_slides(slides: pd.DataFrame, cfg: SplitConfig) -> SplitResult:
    """Assign every slide (rows in metadata-file order) to train or holdout."""
    slides = slides.sort_values("meta_row", kind="stable").reset_index(drop=True).copy()
    slides["key"] = slide_keys(slides, cfg.key_columns)
    rng = np.random.default_rng(cfg.seed)
    holdout_keys: set[tuple[str, str]] = set()
    for project in slides["class"].drop_duplicates():        # projects in order of first appearance
        keys = slides.loc[slides["class"] == project, "key"].drop_duplicates().tolist()  # first appearance
        if cfg.mode == "random":
            keys = [keys[i] for i in rng.permutation(len(keys))]
        n_train = math.floor((1.0 - cfg.holdout_fraction) * len(keys) + 1e-9)
        holdout_keys.update((project, k) for k in keys[n_train:])
    pairs = list(zip(slides["class"], slides["key"]))
    slides["split"] = np.where([p in holdout_keys for p in pairs], "holdout", "train")

    straddling = set(slides.loc[slides.split == "train", "tss"]) & set(slides.loc[slides.split == "holdout", "tss"])
    slides.loc[slides.tss.isin(straddling), "split"] = "holdout"
    overlap = set(slides.loc[slides.split == "train", "tss"]) & set(slides.loc[slides.split == "holdout", "tss"])
    if overlap:  # cannot happen after the move above; a guard against future edits of this function
        raise AssertionError(f"TSS in both train and holdout: {sorted(overlap)}")
    validation = validation_sites(slides, cfg.validation_fraction, cfg.seed)
    slides["part"] = np.where(slides.split == "train", "train",
                              np.where(slides.tss.isin(validation), "validation", "test"))
    return SplitResult(slides, sorted(straddling))


def validation_sites(slides: pd.DataFrame, fraction: float, seed: int) -> set[str]:
    """Per class, a seeded share of its holdout TSS (rounded down, at least one and at most all but one when the class
    has two or more; none when it has one)."""
    rng = np.random.default_rng([seed, 20251])
    chosen: set[str] = set()
    hold = slides[slides.split == "holdout"]
    for project in slides["class"].drop_duplicates():
        sites = sorted(hold.loc[hold["class"] == project, "tss"].unique())
        if len(sites) < 2:
            continue
        n = min(max(1, math.floor(fraction * len(sites) + 1e-9)), len(sites) - 1)
        chosen.update(sites[i] for i in rng.permutation(len(sites))[:n])
    return chosen


def site_table(slides: pd.DataFrame) -> pd.DataFrame:
    """One row per TSS: class, part, slides (with or without tiles) and tiles."""
    return (slides.groupby("tss", sort=False)
            .agg(**{"class": ("class", "first")}, part=("part", "first"), slides=("slide", "size"),
                 tiles=("tiles", "sum"))
            .reset_index().sort_values(["part", "class", "tss"], kind="stable").reset_index(drop=True))


DETAIL_ONLY = ("validation_test_tss_overlap", "slides_without_tiles")   # in summary.json, not metrics/split.json


def split_metrics(slides: pd.DataFrame, index: pd.DataFrame) -> dict:
    """The contract's counts (slides from the metadata table, with or without tiles), the validation / test
    division of the holdout sites, and the slides without tiles."""
    train, hold = slides[slides.split == "train"], slides[slides.split == "holdout"]
    part_of = index.slide.map(dict(zip(slides.slide, slides.part)))
    sites = {p: set(slides.loc[slides.part == p, "tss"]) for p in PARTS}
    out = {
        "train_slides": int(len(train)),
        "holdout_slides": int(len(hold)),
        "train_tss": int(train.tss.nunique()),
        "holdout_tss": int(hold.tss.nunique()),
        "tss_overlap": len(set(train.tss) & set(hold.tss)),
        "train_patches": int((part_of == "train").sum()),
        "holdout_patches": int(part_of.isin(["validation", "test"]).sum()),
        "classes": sorted(slides["class"].unique().tolist()),
    }
    for p in ("validation", "test"):
        out[f"{p}_slides"] = int((slides.part == p).sum())
        out[f"{p}_tss"] = len(sites[p])
        out[f"{p}_patches"] = int((part_of == p).sum())
    out["validation_test_tss_overlap"] = len(sites["validation"] & sites["test"])
    out["slides_without_tiles"] = int((slides["tiles"] == 0).sum()) if "tiles" in slides else 0
    return out


def write_split(cfg: SplitConfig, index: pd.DataFrame, slides: pd.DataFrame) -> tuple[SplitResult, dict]:
    """Split the slides table, join the tiles, write train / holdout (with `part`) / slides / sites and the
    metrics (each file atomically); return the split and all its counts (the metrics file: the contract's)."""
    result = split_slides(slides, cfg)
    part_of = dict(zip(result.slides.slide, result.slides.part))
    index = index.assign(part=index.slide.map(part_of))
    if index.part.isna().any():
        orphan = index.loc[index.part.isna(), "slide"].iloc[0]
        raise MediError(f"tile of slide {orphan} has no row in the slides table; re-run `medi prepare`")
    out = Path(cfg.output)
    write_parquet(out / "train.parquet", index[index.part == "train"].drop(columns="part"))
    write_parquet(out / "holdout.parquet", index[index.part != "train"])
    write_parquet(out / "slides.parquet", result.slides)
    with atomic_path(out / "sites.csv") as tmp:
        site_table(result.slides).to_csv(tmp, index=False)
    metrics = split_metrics(result.slides, index)
    write_json(out / "summary.json", metrics)                  # every count, beside the split it describes
    write_json(cfg.metrics, {k: v for k, v in metrics.items() if k not in DETAIL_ONLY})   # dvc metrics show
    return result, metrics


def run_stage(cfg: Config) -> dict:
    """`medi split`: the split of the prepared dataset's slides table, its artifacts, metrics and figure."""
    import logging

    import mlflow

    from medi import artifacts, figures, tracking

    with tracking.stage_run(cfg, "split", ("split",)):
        index = artifacts.load_index(cfg.data.output)
        result, metrics = write_split(cfg.split, index, artifacts.load_slides(cfg.data.output))
        logging.getLogger(__name__).info("split: %s (moved to holdout: %d TSS)", metrics, len(result.moved_tss))
        mlflow.log_metrics({**{k: v for k, v in metrics.items() if isinstance(v, int)},
                            "moved_tss": len(result.moved_tss)})
        mlflow.log_dict({**metrics, "moved_tss": result.moved_tss}, "split.json")
        for name in ("slides.parquet", "sites.csv"):
            mlflow.log_artifact(str(Path(cfg.split.output) / name), "split")
        fig = figures.dataset_figure(index, result.slides)
        mlflow.log_artifact(str(figures.save(fig, cfg.split.figure)), "figures")
    return metrics
