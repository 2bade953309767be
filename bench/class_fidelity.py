"""How well trained models render the class they are conditioned on (the measurement behind the README's
noise-schedule choice). Run in a pipeline folder after `make train`:

    python bench/class_fidelity.py models/cls models/medi [--per-class 24] [--steps 25]

A linear model on colour statistics (the shortcut test's features), fitted to the real training tiles of
all sites, classifies `per-class` DDIM samples of every class; a MeDi model is conditioned on each class's
largest training site. Prints the class accuracy per model (chance = 1 / number of classes).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_synthetic import simple_features  # noqa: E402  (the features the shortcut test uses)

from medi import config  # noqa: E402
from medi.model import MediDiffusion  # noqa: E402
from medi.sampling import Sampler, generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--per-class", type=int, default=24)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    cfg = config.load(args.params)
    train = pd.read_parquet(Path(cfg.split.output) / "train.parquet")
    tiles = np.load(Path(cfg.data.output) / "tiles.npy", mmap_mode="r")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, class_weight="balanced"))
    clf.fit(simple_features(np.asarray(tiles[train.idx.to_numpy()])), train["class"].to_numpy())
    for folder in args.models:
        model = MediDiffusion.load(folder).eval()
        noise_cfg = config.ModelConfig(**json.loads((Path(folder) / "config.json").read_text())["model_params"])
        classes, n = model.vocab.classes, args.per_class
        attrs = {}
        if "tss" in model.vocab.categorical:
            largest = train.groupby("class").tss.agg(lambda s: s.value_counts().index[0])
            attrs = {"tss": [largest[c] for c in classes for _ in range(n)]}
        cond = model.vocab.encode([c for c in classes for _ in range(n)], attrs)
        images = generate(model, Sampler("ddim", args.steps), noise_cfg, cond, list(range(n)) * len(classes))
        accuracy = (clf.predict(simple_features(images)) == np.repeat(classes, n)).mean()
        print(f"{folder}: class accuracy of generated tiles {accuracy:.3f} (chance {1 / len(classes):.3f})")


if __name__ == "__main__":
    main()
