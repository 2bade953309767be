"""The artifacts the stages hand each other on disk, and the one place that finds and reads them.

| artifact | written by | where (params) |
|---|---|---|
| raw tiles in the TCGA-UT layout (`tcga-ut/CLASS/...`) and the GDC metadata (`gdc_metadata.csv`) | `medi synthesize` or `make tcga-ut` | `data.root` |
| the prepared dataset: `index.parquet` (one row per tile), `slides.parquet`, packed tiles `tiles.npy` (row `idx`) | `medi prepare` | `data.output` |
| split frames: `train.parquet`, `holdout.parquet` (part = validation / test) | `medi split` | `split.output` |
| a trained model: `model.safetensors`, `config.json`, `vocab.json` (and `stain.json` with the stain pathway) | `medi train` | `model.output`/NAME |
| a sample set: `manifest.csv` (one row per image) + lossless PNGs under `images/` | `medi sample`, the probe's pools | `sample.output` |

Writers stay with the stage that owns the artifact (each writes atomically); readers live here, so a change of
layout is one edit and a missing input names the command that makes it. This module imports no torch: a stage
that only reads artifacts (the report) starts without it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medi.config import Config
from medi.errors import MediError

TILES_DIR, METADATA_FILE = "tcga-ut", "gdc_metadata.csv"   # inside data.root, for real and synthetic data alike
MANIFEST, SAMPLE_INFO = "manifest.csv", "sample_info.json"
# manifest columns read as text: site code 'NA' is a site, not a missing value
TEXT_COLUMNS = ("path", "class", "tss", "race", "gender", "conditioned_on", "model", "scheduler", "precision",
                "strategy")


# ----------------------------------------------------------------------------------------------- the dataset
def load_tiles(dataset_dir: str | Path) -> np.ndarray:
    """The packed tiles, memory-mapped read-only: (N, R, R, 3) uint8, row i = index.idx == i."""
    return np.load(Path(dataset_dir) / "tiles.npy", mmap_mode="r")


def load_index(dataset_dir: str | Path) -> pd.DataFrame:
    return pd.read_parquet(Path(dataset_dir) / "index.parquet")


def load_slides(dataset_dir: str | Path) -> pd.DataFrame:
    return pd.read_parquet(Path(dataset_dir) / "slides.parquet")


# ----------------------------------------------------------------------------------------------- splits
def _split_file(cfg: Config, name: str) -> Path:
    path = Path(cfg.split.output) / name
    if not path.exists():
        raise MediError(f"{path} not found; run `medi split` (or `dvc repro split`) first")
    return path


def train_frame(cfg: Config) -> pd.DataFrame:
    """The training split: one row per tile (idx into the packed tiles, slide, class, tss, metadata)."""
    return pd.read_parquet(_split_file(cfg, "train.parquet"))


def holdout_frame(cfg: Config) -> pd.DataFrame:
    """The held-out sites' tiles, each row's `part` validation or test."""
    path = _split_file(cfg, "holdout.parquet")
    holdout = pd.read_parquet(path)
    if "part" not in holdout:
        raise MediError(f"{path} has no validation / test division (made by an older `medi split`); run "
                        "`medi split` (or `dvc repro split`) again")
    return holdout


def has_split(cfg: Config) -> bool:
    return (Path(cfg.split.output) / "train.parquet").exists()


# ----------------------------------------------------------------------------------------------- models
def model_dir(cfg: Config, name: str) -> Path:
    """Where `medi train --model NAME` saves its final (EMA) model."""
    return Path(cfg.model.output) / name


# ----------------------------------------------------------------------------------------------- sample sets
def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode != "RGB":
            raise MediError(f"{path}: expected an RGB PNG, got mode {im.mode}")
        return np.asarray(im, dtype=np.uint8)


def read_manifest(path: str | Path) -> pd.DataFrame:
    """A sample set's manifest, its text columns kept as text."""
    path = Path(path)
    if not path.exists():
        raise MediError(f"{path} not found; run `medi sample` first")
    return pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS}, keep_default_na=False, na_values={"age": [""]})


def load_images(sample_dir: str | Path, manifest: pd.DataFrame) -> np.ndarray:
    """The manifest's images as uint8 (N, H, W, 3), in manifest order."""
    sample_dir = Path(sample_dir)
    missing = [p for p in manifest["path"] if not (sample_dir / p).exists()]
    if missing:
        raise MediError(f"{sample_dir}: {len(missing)} image(s) of the manifest are missing, e.g. {missing[0]}")
    return np.stack([read_png(sample_dir / p) for p in manifest["path"]])
