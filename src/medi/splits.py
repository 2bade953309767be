"""The holdout split (`medi split`): whole (site, demographic) groups of slides are held out.

`paper` reproduces the public MeDi code exactly: the key of a slide is TSS_gender_race (missing -> Unknown);
per project, the distinct keys in order of first appearance in the metadata file; the first
floor((1 - holdout_fraction) * n_keys) train, the rest holdout; then any TSS present in both sets moves
wholly to holdout. `random` draws the held-out keys per project with a seed instead of taking file order.
Either way zero TSS overlap between train and holdout is enforced (checked, not assumed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from medi.config import SplitConfig
from medi.errors import MediError

KEY_ALIASES = {"tissue_source_site": "tss", "TSS": "tss"}


@dataclass(frozen=True)
class SplitResult:
    slides: pd.DataFrame   # the slides table with a `split` column ('train' | 'holdout') and the `key`
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
    return SplitResult(slides, sorted(straddling))


def split_metrics(slides: pd.DataFrame, index: pd.DataFrame) -> dict:
    train, hold = slides[slides.split == "train"], slides[slides.split == "holdout"]
    tiles_split = index.slide.map(dict(zip(slides.slide, slides.split)))
    return {
        "train_slides": int(len(train)),
        "holdout_slides": int(len(hold)),
        "train_tss": int(train.tss.nunique()),
        "holdout_tss": int(hold.tss.nunique()),
        "tss_overlap": len(set(train.tss) & set(hold.tss)),
        "train_patches": int((tiles_split == "train").sum()),
        "holdout_patches": int((tiles_split == "holdout").sum()),
        "classes": sorted(slides["class"].unique().tolist()),
    }
