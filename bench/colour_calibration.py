"""The stain pathway's colour calibration (params `sample.colour_calibration`, medi.stain) measured on trained models.

For each model folder (a stain-pathway model; one made before the calibration existed gets its targets fitted here,
in memory, from its training tiles with its own maps and its training seed): the unseen-pairs evaluation
(`medi.unseen.evaluate`: pipeline and deconfounded classifiers) and the FID of the sample stage's plan (2190 images
on the default world, the fid stage's features, overall and mean per class), each sampled without the calibration and
with it (`--per-class` tiles per class). Then the calibrated minus the plain figures, paired over the unseen pairs
(each pair's difference averaged over the models, 95 % bootstrap over the pairs, 2,000 resamples, numpy seed 0).

    python bench/colour_calibration.py models/medi:0 artifacts/ablation/stain-seed1/models/medi:1
    python bench/colour_calibration.py --calibrated-only A:0 B:1 --against OLD0.json OLD1.json   # other models (code)
    python bench/colour_calibration.py --calibrated-only --unseen-only A:0        # the unseen pairs alone (no FID)

(FOLDER:SEED, the seed the model was trained with; run in a pipeline folder after `make repro`.) Results go to
artifacts/colour_calibration/<n>.json, and a markdown table to stdout.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from medi import artifacts, config, unseen
from medi.fidelity import Extractor, condition_classifiers, frechet, group_scores
from medi.io import write_json
from medi.model import SITE
from medi.sampling import Sampler, conditions_of, generate, load_model, plan

OUT = Path("artifacts/colour_calibration")
FIGURES = ["unseen_stain_rank", "unseen_site_accuracy", "unseen_class_accuracy", "deconf_unseen_site_accuracy",
           "deconf_unseen_class_accuracy", "deconf_seen_site_accuracy", "deconf_seen_class_accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="FOLDER:SEED of each stain-pathway model")
    ap.add_argument("--per-class", type=int, default=32, help="the calibration's own tiles per class")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--calibrated-only", action="store_true", help="sample with the calibration only (no plain run)")
    ap.add_argument("--unseen-only", action="store_true",
                    help="the unseen-pairs evaluation only, no FID (its figures are left out of the table)")
    ap.add_argument("--against", nargs="+", metavar="JSON",
                    help="earlier results of this bench (other models: e.g. made by other code): print this run's "
                         "calibrated figures minus theirs, paired over the unseen pairs")
    args = ap.parse_args()
    base = config.load(args.params)
    train_index = artifacts.train_frame(base).sort_values("idx").reset_index(drop=True)
    tiles = artifacts.load_tiles(base.data.output)
    extractor = Extractor.from_config(base.fid.encoder)
    real = extractor.cached_features(tiles[train_index["idx"].to_numpy()], base.fid.cache, verbose=False)
    classifiers = condition_classifiers(real.float().numpy(), train_index, base.fid.seed, cache=base.fid.cache)
    results = []
    for spec in args.models:
        folder, seed = spec.rsplit(":", 1)
        model = load_model(folder)
        if model.stain is None:
            raise SystemExit(f"{folder}: not a stain-pathway model")
        if not model.stain.targeted.any():          # made before the calibration: its targets, as training fits them
            model.stain.fit_calibration(tiles, train_index, model.vocab.categorical[SITE], model.vocab.classes, int(seed))
        result = {"model": folder, "seed": int(seed)}
        for n in (args.per_class,) if args.calibrated_only else (0, args.per_class):
            cfg = config.override(base, {"sample.colour_calibration": n})
            headline, cells, _ = unseen.evaluate(cfg, "medi", extractor=extractor, train_index=train_index,
                                                 classifiers=classifiers, model=model)
            result[n] = {**{f: float(headline[f]) for f in FIGURES}, "cells": cells.to_dict("records"),
                         "sampling": Sampler.of(cfg.sample).settings()}
            if not args.unseen_only:
                result[n] |= fidelity(cfg, model, train_index, extractor, real)
            print(f"{folder} calibration {n}: " + ", ".join(f"{k} {result[n][k]:.4f}" for k in
                                                             [*FIGURES, "fid", "fid_mean_class"] if k in result[n]),
                  flush=True)
        write_json(OUT / f"{Path(folder).parent.parent.name or 'pipeline'}-{Path(folder).name}-seed{seed}.json",
                   {**result, "per_class": args.per_class})
        results.append(result)
    n = args.per_class
    if not args.calibrated_only:
        print(paired(results, n, results, 0, f"calibrated ({n} per class)", "without"))
    if args.against:
        earlier = [json.loads(Path(f).read_text()) for f in args.against]
        print(paired(results, n, earlier, str(n), "these models", "the earlier ones (--against)"))


def fidelity(cfg: config.Config, model, train_index: pd.DataFrame, extractor: Extractor, real) -> dict:
    """FID of the sample stage's plan (overall, mean and each per class) in the fid stage's features."""
    rows = plan(cfg.sample, train_index, model.vocab.classes)
    images = generate(model, Sampler.of(cfg.sample), cfg.model, conditions_of(rows, model), rows["seed"].tolist(),
                      batch_size=cfg.sample.batch_size)
    gen = extractor.features(images, verbose=False)
    per_class = group_scores(real, train_index["class"].to_numpy(str), gen, rows["class"].to_numpy(str), cfg.fid)["fid"]
    return {"fid": float(frechet(real, gen)), "fid_mean_class": float(np.mean(list(per_class.values()))),
            "fid_per_class": {c: float(v) for c, v in per_class.items()}}


def paired(a: list[dict], a_key, b: list[dict], b_key, a_label: str, b_label: str) -> str:
    """Markdown: each figure's mean ± spread over the models of `a` (their results under `a_key`) and of `b`, and
    a minus b on the unseen pairs, each pair averaged over each side's models, 95 % bootstrap over the pairs (2,000
    resamples, numpy seed 0)."""
    def cells(results, key):
        return sum(pd.DataFrame(r[key]["cells"]).query("not seen").set_index(["class", "tss"]).drop(columns="seen")
                   for r in results) / len(results)

    mean = cells(a, a_key) - cells(b, b_key)
    draws = np.random.default_rng(0).integers(0, len(mean), (2000, len(mean)))
    lines = [f"\n| figure | {b_label} | {a_label} | {a_label} minus {b_label}, paired over the unseen pairs |",
             "|---|---|---|---|"]
    for f in [*FIGURES, "fid", "fid_mean_class"]:
        if not all(f in r[k] for rs, k in ((a, a_key), (b, b_key)) for r in rs):
            continue                                    # (--unseen-only: no FID)
        this, that = (np.array([r[k][f] for r in rs]) for rs, k in ((a, a_key), (b, b_key)))
        cell = f.removeprefix("unseen_").replace("deconf_unseen_", "deconf_")
        interval = ""
        if f.startswith(("unseen_", "deconf_unseen_")) and cell in mean and mean[cell].notna().all():
            d = mean[cell].to_numpy(float)
            lo, hi = np.percentile(d[draws].mean(axis=1), [2.5, 97.5])
            interval = f"{d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]"
        lines.append(f"| {f} | {that.mean():.4f} ± {that.std():.4f} | {this.mean():.4f} ± {this.std():.4f} | {interval} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
