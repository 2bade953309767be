"""The `fid` stage (`medi fid --model NAME`): fidelity of a model's sample set against the real training tiles,
with the measurement of `medi.fidelity`: FID and KID overall, per class and per site, conditioning accuracy, the
unseen-pairs evaluation and (synthetic data) the ground-truth stain check; written to metrics/fid_NAME.json (the
headline), reports/fid_NAME_detail.json and MLflow, and tagged on the model's registered version.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from medi import distributed
from medi.config import Config
from medi.errors import MediError
from medi.fidelity import (PREPROCESSING, Extractor, condition_classifiers, conditioning_accuracy, frechet,
                           group_scores, kid, stain_vs_truth)

log = logging.getLogger(__name__)


def evaluate(cfg: Config, name: str, extractor: Extractor | None = None) -> dict | None:
    """Every figure of `metrics/fid_NAME.json` for the sample set of model NAME. Under a launch the processes
    split the feature extraction; the main process alone computes the figures (the others return None)."""
    from medi import artifacts
    from medi.artifacts import load_images, read_manifest, train_frame
    from medi.sampling import Sampler

    sample_dir = Path(cfg.sample.output.format(model=name))
    manifest = read_manifest(sample_dir / "manifest.csv")
    train_index = train_frame(cfg)
    tiles = artifacts.load_tiles(cfg.data.output)
    real_images = tiles[np.sort(train_index["idx"].to_numpy())]
    train_index = train_index.set_index("idx").loc[np.sort(train_index["idx"].to_numpy())].reset_index()
    gen_images = load_images(sample_dir, manifest)
    if gen_images.shape[1:] != real_images.shape[1:]:
        raise MediError(f"generated images are {gen_images.shape[1:3]} px but the real tiles {real_images.shape[1:3]}: "
                        "the model was trained at another data.resolution")
    extractor = extractor or Extractor.from_config(cfg.fid.encoder)
    t0 = time.perf_counter()
    real = extractor.cached_features(real_images, cfg.fid.cache, split=True)
    gen = extractor.cached_features(gen_images, cfg.fid.cache, split=True)   # the probe's pool reads them back
    reference = None
    if cfg.fid.unseen_per_pair:             # the unseen-pairs evaluation's deconfounded classifiers (synthetic world)
        from medi import unseen

        reference = unseen.deconfounded_set(cfg, train_index)
        if reference is not None:
            reference = (extractor.cached_features(reference[0], cfg.fid.cache, verbose=False, split=True),
                         reference[1])
    feature_seconds = time.perf_counter() - t0
    if not distributed.is_main():
        return None
    site_conditioned = "tss" in str(manifest["conditioned_on"].iloc[0]).split(",")
    per_class = group_scores(real, train_index["class"].to_numpy(str), gen, manifest["class"].to_numpy(str), cfg.fid)
    per_site = group_scores(real, train_index["tss"].to_numpy(str), gen, manifest["tss"].to_numpy(str), cfg.fid)
    out = {
        "extractor": extractor.description,
        "overall": frechet(real, gen),
        "per_class": per_class["fid"],
        "per_site": per_site["fid"],
        "kid": kid(real, gen, cfg.fid),
        "n_real": int(len(real)),
        "n_generated": int(len(gen)),
        "kid_per_class": per_class["kid"],
        "kid_per_site": per_site["kid"],
        "mean_class_fid": float(np.mean(list(per_class["fid"].values()))) if per_class["fid"] else None,
        "n_per_class": per_class["n"],
        "n_per_site": per_site["n"],
        "min_count": cfg.fid.min_count,
        "below_min_count": {"class": per_class["below_min_count"], "site": per_site["below_min_count"]},
        "site_groups": "generated images grouped by the site of their plan row" + (
            "" if site_conditioned else " (this model was not conditioned on it: the per-site figures show how "
                                        "well class conditioning alone reproduces each site)"),
        "preprocessing": PREPROCESSING,
        "sampling": {k: manifest[k].iloc[0] for k in ("strategy", "conditioned_on")}
                    | Sampler.from_settings(manifest.iloc[0]).settings(),
        "feature_seconds": feature_seconds,
    }
    real_np = real.float().numpy()
    classifiers = condition_classifiers(real_np, train_index, cfg.fid.seed,      # shared with the pairs evaluation
                                        cache=cfg.fid.cache)
    out["conditioning"] = conditioning_accuracy(real_np, train_index, gen.float().numpy(), manifest,
                                                site_conditioned, cfg.fid.seed, classifiers=classifiers)
    if cfg.fid.unseen_per_pair:             # the unseen-pairs evaluation (medi.unseen): headline here, cells apart
        deconfounded = (unseen.deconfounded_classifiers(cfg, reference[0].float().numpy(), reference[1])
                        if reference is not None else None)
        out["pairs"], cells, out["pairs_images"] = unseen.evaluate(cfg, name, extractor, train_index,
                                                                   classifiers=classifiers, deconfounded=deconfounded)
        out["pairs_cells"] = cells.to_dict("records")
    stain = stain_vs_truth(cfg, manifest, gen_images, train_index, tiles)
    if stain is not None:
        out["stain"] = {"summary": stain["summary"], "real": stain["real"], "cells": stain["cells"]}
    return out


def run_stage(cfg: Config, name: str) -> dict:
    """`medi fid --model NAME`: evaluate, write metrics/fid_NAME.json, log metrics and figures to MLflow."""
    import mlflow

    from medi import figures, registry, tracking
    from medi.io import read_json, write_json, write_text

    cfg.variant(name)
    if not distributed.is_main():           # the other processes of a launch: their share of the features
        evaluate(cfg, name)
        return {}
    with tracking.stage_run(cfg, f"fid@{name}", ("fid", "sample"), run_name=f"fid-{name}"):
        t0 = time.perf_counter()
        metrics = evaluate(cfg, name)
        metrics["seconds"] = time.perf_counter() - t0
        pair_images, pair_cells = metrics.pop("pairs_images", None), metrics.pop("pairs_cells", None)
        detail = {**metrics, "pairs_cells": pair_cells} if pair_cells is not None else metrics
        write_json(cfg.fid.detail.format(model=name), detail)
        write_json(cfg.fid.metrics.format(model=name), headline(metrics))
        write_text(cfg.fid.plot.format(model=name), per_class_rows(name, metrics).to_csv(index=False))
        mlflow.log_params({"model_name": name, "extractor_description": metrics["extractor"][:500]})
        flat = {"fid": metrics["overall"], "kid": metrics["kid"], "n_real": metrics["n_real"],
                "n_generated": metrics["n_generated"], "seconds": metrics["seconds"]}
        if metrics["mean_class_fid"] is not None:
            flat["mean_class_fid"] = metrics["mean_class_fid"]
        flat.update({f"fid_class_{c}": v for c, v in metrics["per_class"].items()})
        cond = metrics["conditioning"]
        flat.update({k: v for k, v in cond.items() if isinstance(v, float)})
        for kind, summary in metrics.get("stain", {}).get("summary", {}).items():
            flat.update({f"stain_{kind}_{k}": float(v) for k, v in summary.items()})
        if pair_cells is not None:
            from medi import unseen

            flat.update(unseen.figures_of(metrics["pairs"]))
            figures.log(unseen.grid_figure(pd.DataFrame(pair_cells), pair_images,
                                           f"{name}: rows = conditioned class, columns = the largest site of "
                                           f"each class (diagonal seen in training)"),
                        f"figures/pairs_{name}.png")
        mlflow.log_metrics(flat)
        mlflow.log_dict(detail, f"fid_{name}.json")
        figures.log(figures.fid_figure({name: metrics}), f"figures/fid_per_class_{name}.png")
        info = Path(cfg.sample.output.format(model=name)) / "sample_info.json"
        tagged = {k: v for k, v in headline(metrics).items() if isinstance(v, (int, float))}
        version = registry.tag_version(name, read_json(info)["weights_sha256_16"], tagged) \
            if info.exists() else None
        if version is not None:
            mlflow.set_tag("medi.registered_model", f"models:/{registry.registered_name(name)}/{version}")
        log.info("FID of %s (%s): overall %.4g, KID %.4g, mean per class %s; class accuracy %.3f (real %.3f), site "
                 "accuracy %s (real %.3f) in %.1fs", name, metrics["extractor"], metrics["overall"], metrics["kid"],
                 metrics["mean_class_fid"], cond["class_accuracy"], cond["class_accuracy_real_cv"],
                 cond["site_accuracy"], cond["site_accuracy_real_cv"], metrics["seconds"])
    return metrics


def headline(metrics: dict) -> dict:
    """metrics/fid_NAME.json (`dvc metrics show`, the contract): the extractor, FID overall and per class, KID, the
    counts, the headline conditioning accuracy and the unseen-pairs evaluation's unseen figures; the mean per class,
    per site, per seen / unseen pair, the stain check, n per group and settings stay in the detail file."""
    cond = metrics["conditioning"]
    out = {k: metrics[k] for k in ("extractor", "overall", "per_class", "kid", "n_real", "n_generated")}
    out["extractor"] = out["extractor"].split(" (")[0]        # the name; its description is in the detail file
    out.update({k: cond.get(k) for k in ("class_accuracy", "site_accuracy")})   # by seen / unseen pair: detail
    from medi import unseen

    # the unseen-pairs evaluation's unseen figures (seen pairs, the deconfounded classifiers' figures and the ground
    # truth's ceiling: the detail file and MLflow)
    out.update(unseen.figures_of(metrics.get("pairs", {}), ("unseen",), ceiling=False, deconfounded=False))
    return out


def per_class_rows(name: str, metrics: dict) -> pd.DataFrame:
    """FID per class for `dvc plots` (one row per class with its n; `reliable` false below fid.min_count)."""
    below = metrics["below_min_count"]["class"]
    rows = [{"model": name, "class": c, "fid": metrics["per_class"].get(c, below.get(c, {}).get("fid")),
             "reliable": c in metrics["per_class"], "n_real": n["real"], "n_generated": n["generated"]}
            for c, n in metrics["n_per_class"].items()]
    return pd.DataFrame(rows, columns=["model", "class", "fid", "reliable", "n_real", "n_generated"])
