"""The unseen-pairs evaluation's ceiling on the synthetic world: what a perfect generator would score.

Real tiles of every (class, site) pair of the evaluation's grid (`medi.unseen.pair_grid`: every class x the largest
training site of each class) are rendered by the world's own renderer: the class's morphology under the site's
stain with a slide's jitter, JPEG at the site's quality, decoded and Lanczos-resized to `data.resolution` as
`prepare` packs tiles (`medi.unseen.ground_truth_tiles`, which the fid stage also scores, `fid.unseen_per_pair`
per pair, as its `pairs_ceiling_*` figures). They are scored exactly as a model's generated tiles are (`medi.unseen.score`: the same
features, the same class and site classifiers fitted on the real training tiles, the same stain rank). A seen pair
is a tile the dataset could hold; an unseen pair is ground truth the dataset never has. A target above this ceiling
cannot be met by any model, whatever its conditioning: the instrument itself caps it.

A second instrument, possible only where the ground truth is known: classifiers fitted on rendered tiles of
*every* class at *every* training site (`--train-per-pair` each), so the class classifier never sees a stain
that goes with one class and the site classifier never sees a morphology that goes with one site. It measures
morphology and stain apart; its ceiling (ground-truth tiles of held-out render seeds) shows how far it can see.
Both instruments score the ground truth, the pipeline's models (`models/NAME`, regenerated with params
`sample`) and, with --ablation, every model of bench/conditioning_ablation.py under its four guidance settings.

With --stain-transfer, each pipeline model's tiles are also scored after a colour-only site pathway: every tile is
re-stained to its pair's site by Macenko stain separation (`stain_of`, `restain`). The source stain is the class's,
fitted on all training tiles of the class (what the model learned to paint it in); the target is the site's, fitted
on that site's training tiles. "transfer" moves the H and E optical-density vectors, the illumination and the
concentration scale (each stain's 99th percentile); "vectors" keeps the tile's concentrations; "relative" moves the
vectors and the illumination and rescales each concentration by the site's 99th percentile over that of the class
the site sent (its staining strength relative to its own class's sites, which a site's tiles alone confound with
the class's tissue). "ground truth at its site + stain ..." applies the same re-staining to the ground truth's tiles
of each class at its own site (source: that site's stain), which separates the method's error from the model's.

Usage (project root, after `make repro` on the synthetic default):
    python bench/unseen_ceiling.py [--per-pair 8] [--train-per-pair 6] [--ablation] [--stain-transfer] [--section NAME]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from medi import artifacts, config, histology
from medi.fidelity import Extractor, condition_classifiers
from medi.groundtruth import GroundTruth
from medi.unseen import deconfounded_set, ground_truth_tiles, pair_grid, score

sys.path.insert(0, str(Path(__file__).parent))       # run from the project root
from bench_report import cpu_name, write_section  # noqa: E402


def stain_of(tiles: np.ndarray, beta: float = 0.15) -> dict:
    """Macenko stain of a set of tiles: illumination (99.5th percentile per channel), unit H and E optical-density
    vectors, and each stain's 99th-percentile concentration over the stained pixels."""
    i0 = np.percentile(np.asarray(tiles, np.float64).reshape(-1, 3), 99.5, axis=0)
    vectors = histology.estimate_stain_vectors(tiles, i0)
    od = histology.optical_density(tiles, i0)
    conc = np.linalg.lstsq(vectors.T, od.T, rcond=None)[0].T
    return {"i0": i0, "vectors": vectors, "cmax": np.percentile(conc[np.linalg.norm(od, axis=1) > beta], 99, axis=0)}


def restain(tile: np.ndarray, source: dict, target: dict, factor: np.ndarray) -> np.ndarray:
    """`tile` separated into H and E concentrations with the `source` stain and recomposed in the `target` stain,
    each stain's concentration multiplied by `factor` (H, E)."""
    od = histology.optical_density(tile, source["i0"])
    conc = np.linalg.lstsq(source["vectors"].T, od.T, rcond=None)[0].T * factor
    rgb = target["i0"] * 10.0 ** (-(conc @ target["vectors"]))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).reshape(tile.shape)


def features_of(extractor, images: np.ndarray) -> np.ndarray:
    return extractor.features(images.reshape(-1, *images.shape[2:]), verbose=False).float().numpy()


def deconfounded_classifiers(cfg, extractor, train_index: pd.DataFrame, per_pair: int):
    """Class and site classifiers fitted on `per_pair` rendered tiles of every class at every training site (the
    pipeline's `unseen.deconfounded_set`, at this count), in `condition_classifiers`' form but with the accuracy on 2
    further rendered tiles per pair: {"class"|"tss": (fitted, held-out accuracy)}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fit, labels = deconfounded_set(config.override(cfg, {"fid.deconfounded_per_pair": per_pair}), train_index)
    grid = labels.drop_duplicates(["class", "tss"])[["class", "tss"]].reset_index(drop=True)
    held = ground_truth_tiles(cfg, grid, 2, stream=130363)
    x_fit = extractor.features(fit, verbose=False).float().numpy()
    x_held = features_of(extractor, held)
    out = {}
    for target in ("class", "tss"):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, tol=1e-3, random_state=cfg.fid.seed))
        model.fit(x_fit, labels[target].to_numpy(str))
        out[target] = (model, float(np.mean(model.predict(x_held) == np.repeat(grid[target].to_numpy(str), 2))))
    return out


def pair_interval(detail, figure: str, kind_seen: bool = False, worlds: int = 2000) -> str:
    """Mean over the pairs of one kind with a 95 % percentile bootstrap interval over those pairs (the unit the
    evaluation samples: a pair's tiles share its condition)."""
    values = detail.loc[detail["seen"] == kind_seen, figure].to_numpy(float)
    rng = np.random.default_rng(0)
    means = values[rng.integers(0, len(values), (worlds, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return f"{values.mean():.3f} [{lo:.3f}, {hi:.3f}]"


def model_images(cfg, model_dir: Path, pairs, guidance: tuple[float, float | None] | None = None) -> np.ndarray:
    from medi import config as config_mod
    from medi.sampling import load_model
    from medi.unseen import sample_pairs

    if guidance is not None:
        cfg = config_mod.override(cfg, {"sample.guidance": guidance[0], "sample.metadata_guidance": guidance[1]})
    return sample_pairs(cfg, load_model(model_dir), pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--per-pair", type=int, default=8)
    ap.add_argument("--train-per-pair", type=int, default=6)
    ap.add_argument("--models", nargs="*", default=["cls", "medi"])
    ap.add_argument("--ablation", action="store_true", help="also every model under artifacts/ablation (4 guidance settings)")
    ap.add_argument("--stain-transfer", action="store_true",
                    help="also each model's tiles re-stained to the pair's site (a colour-only site pathway)")
    ap.add_argument("--section", default="", help="docs/benchmarks.md section to write (default: print only)")
    args = ap.parse_args()
    cfg = config.load(args.params)
    truth = GroundTruth.load(cfg.data.root)
    if cfg.data.source != "synthetic" or truth is None:
        raise SystemExit("the ceiling needs the synthetic world's ground truth (data.source: synthetic, `medi synthesize`)")
    train_index = artifacts.train_frame(cfg)
    order = np.sort(train_index["idx"].to_numpy())
    train_index = train_index.set_index("idx").loc[order].reset_index()      # as the fid stage orders it
    classes = sorted(train_index["class"].astype(str).unique())
    pairs = pair_grid(train_index, classes)
    truth_images = ground_truth_tiles(cfg, pairs, args.per_pair)
    extractor = Extractor.from_config(cfg.fid.encoder)
    real = extractor.cached_features(np.asarray(artifacts.load_tiles(cfg.data.output))[order], cfg.fid.cache,
                                     verbose=False).float().numpy()
    instruments = {
        "pipeline": condition_classifiers(real, train_index, cfg.fid.seed, cache=cfg.fid.cache),
        "deconfounded": deconfounded_classifiers(cfg, extractor, train_index, args.train_per_pair),
    }
    subjects = {"ground truth": truth_images}
    tiles = np.asarray(artifacts.load_tiles(cfg.data.output))
    stain = {(col, key): stain_of(tiles[train_index.loc[train_index[col].astype(str) == key, "idx"].to_numpy()])
             for col in ("class", "tss") for key in (pairs[col].unique() if args.stain_transfer else [])}
    home = dict(zip(train_index["tss"].astype(str), train_index["class"].astype(str)))     # the one class each site sent
    if args.stain_transfer:   # the method alone: each class's ground-truth tiles at its own site, re-stained to the pair's
        at_home = {c: i for i, (c, t, seen) in enumerate(zip(pairs["class"], pairs["tss"], pairs["seen"])) if seen}
        own_site = {c: pairs["tss"][i] for c, i in at_home.items()}
        for how in ("vectors", "relative"):
            subjects[f"ground truth at its site + stain {how}"] = np.stack([
                [restain(tile, stain["tss", own_site[c]], stain["tss", t],
                         np.ones(2) if how == "vectors" else stain["tss", t]["cmax"] / stain["class", home[t]]["cmax"]
                         * stain["class", c]["cmax"] / stain["tss", own_site[c]]["cmax"])
                 for tile in truth_images[at_home[c]]]
                for c, t in zip(pairs["class"], pairs["tss"])])
    for name in args.models:
        images = subjects[f"{name} (params sample)"] = model_images(cfg, artifacts.model_dir(cfg, name), pairs)
        factors = {   # (class, site) -> how each stain's concentration is rescaled
            "transfer": lambda c, t: stain["tss", t]["cmax"] / stain["class", c]["cmax"],
            "vectors": lambda c, t: np.ones(2),
            "relative": lambda c, t: stain["tss", t]["cmax"] / stain["class", home[t]]["cmax"],
        }
        for how, factor in factors.items() if args.stain_transfer else ():
            subjects[f"{name} + stain {how}"] = np.stack([
                [restain(tile, stain["class", c], stain["tss", t], factor(c, t)) for tile in images[i]]
                for i, (c, t) in enumerate(zip(pairs["class"], pairs["tss"]))])
    if args.ablation:
        from conditioning_ablation import GUIDANCE, ROOT
        for folder in sorted(ROOT.glob("*-seed*")):
            if (folder / "models" / "medi" / "model.safetensors").exists():
                for g in GUIDANCE:
                    subjects[f"{folder.name} {g[0]:g} / {g[1]:g}"] = model_images(cfg, folder / "models" / "medi", pairs, g)
    rows = []
    for subject, images in subjects.items():
        feats = features_of(extractor, images)
        pipe, deconf = (score(pairs, images, feats, classifiers, truth) for classifiers in instruments.values())
        rows.append([subject, pair_interval(pipe[1], "stain_rank"),
                     *(pair_interval(d[1], f) for d in (pipe, deconf) for f in ("site_accuracy", "class_accuracy")),
                     f"{pipe[0]['seen_stain_rank']:.3f}",
                     *(f"{d[0][f'seen_{f}']:.3f}" for d in (pipe, deconf) for f in ("site_accuracy", "class_accuracy"))])
    head = ["tiles", "unseen: stain rank", "site acc. (pipeline)", "class acc. (pipeline)", "site acc. (deconf.)",
            "class acc. (deconf.)", "seen: stain rank", "site acc. (pipeline)", "class acc. (pipeline)",
            "site acc. (deconf.)", "class acc. (deconf.)"]
    d = instruments["deconfounded"]
    text = (f"The unseen-pairs grid ({len(pairs)} pairs: {int(pairs['seen'].sum())} seen, {int((~pairs['seen']).sum())} "
            f"unseen) scored on ground-truth tiles the synthetic world renders ({args.per_pair} per pair, each from its "
            f"own slide) and on the models' tiles ({cfg.fid.unseen_per_pair} per pair, regenerated), by two instruments "
            f"in the feature space {cfg.fid.extractor}: *pipeline* = the fid stage's class and site classifiers, fitted "
            f"on the real training tiles (class and site confounded: cross-validated accuracy on real tiles "
            f"{instruments['pipeline']['class'][1]:.3f} / {instruments['pipeline']['tss'][1]:.3f}); *deconfounded* = the "
            f"same regressions fitted on rendered tiles of every class at every training site ({args.train_per_pair} "
            f"per pair; held-out rendered accuracy {d['class'][1]:.3f} class, {d['tss'][1]:.3f} site). Chance: site "
            f"{1 / len(d['tss'][0].classes_):.3f}, class {1 / len(classes):.3f}, stain rank 0.5. On {cpu_name()}; "
            f"`python bench/unseen_ceiling.py --per-pair {args.per_pair} --train-per-pair {args.train_per_pair}"
            f"{' --ablation' if args.ablation else ''}{' --stain-transfer' if args.stain_transfer else ''}`. Unseen cells: mean over the pairs [95 % bootstrap interval over "
            f"the pairs, 2000 resamples]; seen cells: means over {int(pairs['seen'].sum())} pairs")
    print(text)
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(r), flush=True)
    if args.section:
        write_section(args.section, text, head, rows)


if __name__ == "__main__":
    main()
