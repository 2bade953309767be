"""What the stain pathway can give at best, and which of its estimates matter: real tiles of each class at its own
(largest) site, mapped from that site's estimated stain to the reference and re-stained to every other column's
site, then scored as the unseen-pairs evaluation scores a model (`medi.unseen`: the pipeline's classifiers, the
deconfounded ones, the stain rank). A perfect class-only generator behind the pathway would score these figures.

    python bench/stain_oracle.py              # in a pipeline folder after `dvc repro split` (synthetic world)

Variants (one line each): the tiles as they are (their own site's stain); and re-stained with the white level
estimated per site ("absolute"), fixed to the reference's, or relative to the site's class (`medi.stain.fit`), each
with the hematoxylin and eosin intensities transferred, none, or hematoxylin only (the default pathway's:
relative white, hematoxylin); and re-stained with the world's true stains (ground_truth.json: vectors, both
intensities, illumination), which separates what the estimates miss from what a colour map cannot carry (blur,
noise, JPEG). 7 tiles per pair, drawn with numpy seed [pair]; AMD EPYC figures in docs/conditioning.md.

Then how much of that rests on knowing each class's mean stain, which the data confound with the class's tissue (each
site sent one class): the world's true maps (reference -> site, in OD) and whites with each class's mean replaced by the
mean over all sites (both, the maps only, the white only). That is the best an estimator can do that reads the
differences between a class's sites perfectly and assumes the classes' sites share one stain on average.

    python bench/stain_oracle.py --figure docs/figures/stain_oracle.png   # and the deconfounded figures as bars
    python bench/stain_oracle.py --model models/medi   # a trained stain-pathway model's own tiles instead

With --model the tiles are the model's (the unseen-pairs evaluation's grid, `fid.unseen_per_pair` per pair, the
sample stage's sampler): as sampled (the model's estimated maps), and mapped back to the reference stain with those
maps, then re-stained with the world's true white, true intensities, true vectors, or all three. Seen pairs are
scored as well: the generator's own fidelity to a site it was trained on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from medi import artifacts, config, stain, unseen
from medi.fidelity import Extractor, condition_classifiers
from medi.groundtruth import GroundTruth
from medi.sampling import load_model, to_uint8

PER_PAIR = 7
PATHWAY_ROW = "re-stained, white relative, intensity H"      # the pathway's estimates, as medi.stain uses them
INTENSITIES = {"H and E": (True, True), "none": (False, False), "H": (True, False)}


def true_stains(root: str | Path, sites) -> dict[str, stain.Stain]:
    """The synthetic world's true stain of each site (ground_truth.json) in the pathway's form: the H, E and residual
    vectors, both intensities (relative to 1: a reference's are 1) and the illumination as the white level."""
    truth = json.loads((Path(root) / "ground_truth.json").read_text())["sites"]
    return {s: stain.Stain(stain.basis(np.array(truth[s]["od_matrix"])),
                           np.array([truth[s]["stain"]["h_intensity"], truth[s]["stain"]["e_intensity"]]),
                           np.array(truth[s]["stain"]["illumination"])) for s in sites}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a trained stain-pathway model's folder: score its tiles instead of real ones")
    ap.add_argument("--figure", help="real tiles: also draw every row's deconfounded site and class accuracy here")
    args = ap.parse_args()
    cfg = config.load("params.yaml")
    train_index = artifacts.train_frame(cfg).sort_values("idx").reset_index(drop=True)
    tiles = artifacts.load_tiles(cfg.data.output)
    extractor = Extractor.from_config(cfg.fid.encoder)
    real = extractor.cached_features(tiles[train_index["idx"].to_numpy()], cfg.fid.cache, verbose=False).float().numpy()
    classifiers = condition_classifiers(real, train_index, cfg.fid.seed, cache=cfg.fid.cache)
    fit_set = unseen.deconfounded_set(cfg, train_index)
    deconfounded = unseen.deconfounded_classifiers(
        cfg, extractor.cached_features(fit_set[0], cfg.fid.cache, verbose=False).float().numpy(), fit_set[1])
    truth = GroundTruth.load(cfg.data.root)
    pairs = unseen.pair_grid(train_index, sorted(train_index["class"].astype(str).unique()))
    sites = sorted(train_index["tss"].astype(str).unique())
    true = true_stains(cfg.data.root, sites)

    results = []                      # (label, deconfounded site and class accuracy on the unseen pairs)

    def score(label: str, images: np.ndarray, seen: bool = False) -> None:
        features = extractor.features(images.reshape(-1, *images.shape[2:]), verbose=False).float().numpy()
        pipeline, _ = unseen.score(pairs, images, features, classifiers, truth)
        valid, _ = unseen.score(pairs, images, features, deconfounded)
        results.append((label, valid["unseen_site_accuracy"], valid["unseen_class_accuracy"]))
        extra = f" {valid['seen_site_accuracy']:.3f} | {valid['seen_class_accuracy']:.3f} |" if seen else ""
        print(f"| {label} | {pipeline['unseen_stain_rank']:.3f} | {pipeline['unseen_site_accuracy']:.3f} | "
              f"{pipeline['unseen_class_accuracy']:.3f} | {valid['unseen_site_accuracy']:.3f} | "
              f"{valid['unseen_class_accuracy']:.3f} |" + extra, flush=True)

    header = "| tiles (unseen pairs) | stain rank | site acc. | class acc. | site acc., deconf. | class acc., deconf. |"
    if args.model:
        print(header + " seen: site acc., deconf. | seen: class acc., deconf. |\n|---|---|---|---|---|---|---|---|")
        model_tiles(cfg, Path(args.model), pairs, true, score)
        return
    print(header + "\n|---|---|---|---|---|---|")
    owner = pairs[pairs["seen"]].set_index("class")["tss"].to_dict()
    index = {s: i for i, s in enumerate(sites, 1)}
    source = []                       # each pair's real tiles: PER_PAIR of its class at the class's own site
    for i, c in enumerate(pairs["class"]):
        rows = train_index[(train_index["class"] == c) & (train_index["tss"].astype(str) == owner[c])]["idx"].to_numpy()
        source.append(np.sort(np.random.default_rng([i]).choice(rows, PER_PAIR, replace=False)))

    reference, relative = stain.fit(tiles, train_index, sites, seed=0)
    absolute = {s: dataclasses.replace(relative[s], white=stain.raw_white(np.asarray(tiles[train_index["idx"][
        train_index["tss"].astype(str) == s].to_numpy()[:stain.TILES_PER_SITE]]))) for s in sites}
    fixed = {s: dataclasses.replace(relative[s], white=reference.white) for s in sites}
    variants = [(f"re-stained, white {w}, intensity {i}", stains, transfer, reference)
                for w, stains in (("absolute", absolute), ("fixed", fixed), ("relative", relative))
                for i, transfer in INTENSITIES.items()]
    variants += swapped(reference, relative, true)[:2] + [
        ("re-stained with the world's true stains (vectors, both intensities, white)", true, (True, True),
         dataclasses.replace(reference, intensity=np.ones(2)))]

    paths = []
    for label, stains, transfer, ref in variants:
        path = stain.StainPathway(len(sites))
        path.set(ref, {i: stains[s] for s, i in index.items()}, transferred=transfer)
        paths.append((label, path))
    paths += class_means(variants[-1][3], true, sites, stain.site_classes(train_index, sites), index)

    score("ground truth (the world's own tiles of the pairs)", unseen.ground_truth_tiles(cfg, pairs, PER_PAIR))
    score("real, their own site's stain", np.stack([np.asarray(tiles[s]) for s in source]))
    for label, path in paths:
        out = []
        for (c, s), rows in zip(zip(pairs["class"], pairs["tss"]), source):
            x = torch.from_numpy(np.asarray(tiles[rows])).permute(0, 3, 1, 2).float() / 127.5 - 1
            out.append(to_uint8(path.restain(path.canonical(x, torch.full((len(x),), index[owner[c]])),
                                             torch.full((len(x),), index[s]))))
        score(label, np.stack(out))
    if args.figure:
        print(figure(results, args.figure))


def figure(results: list[tuple], out: str) -> str:
    """Horizontal bars: each row's deconfounded site and class accuracy on the unseen pairs, with the issue's site
    target (0.25) and the ground truth's site accuracy as lines."""
    import matplotlib.pyplot as plt

    from medi import figures

    labels, site, cls = zip(*results[::-1])
    fig, ax = plt.subplots(figsize=(11, 0.34 * len(results) + 1.4))
    y = np.arange(len(results))
    ax.barh(y + 0.2, site, 0.4, color="tab:blue", label="site accuracy (chance 0.023)")
    ax.barh(y - 0.2, cls, 0.4, color="tab:orange", alpha=0.6, label="class accuracy (chance 0.143)")
    ax.axvline(0.25, color="k", ls="--", lw=0.8, label="the issue's site target (0.25)")
    ax.axvline(results[0][1], color="tab:blue", ls=":", lw=0.8, label="ground truth's site accuracy")
    ax.set_yticks(y, labels, fontsize=7)
    for tick in ax.get_yticklabels():
        tick.set_fontweight("bold" if tick.get_text() == PATHWAY_ROW else "normal")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"deconfounded classifiers, the 42 unseen pairs ({PER_PAIR} real tiles per pair re-stained)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title("Real tissue behind the stain pathway (bold: its estimates): what the estimates give, and what each "
                 "class's mean stain is worth", fontsize=9)
    return figures.save(fig, out)


def swapped(reference: stain.Stain, estimated: dict, true: dict) -> list[tuple]:
    """(label, stains, transferred intensities, reference) with one of the pathway's estimates swapped for the world's
    truth (true intensities are relative to 1, so the reference's are 1 there), then all of them."""
    unit = dataclasses.replace(reference, intensity=np.ones(2))
    return [("the pathway's, with the true white",
             {s: dataclasses.replace(e, white=true[s].white) for s, e in estimated.items()}, stain.TRANSFERRED, reference),
            ("the pathway's, with the true H and E intensities",
             {s: dataclasses.replace(e, intensity=true[s].intensity) for s, e in estimated.items()}, (True, True), unit),
            ("the pathway's, with the true H and E vectors",
             {s: dataclasses.replace(e, vectors=true[s].vectors) for s, e in estimated.items()}, stain.TRANSFERRED,
             reference),
            ("the world's true stains (vectors, both intensities, white)",
             {s: true[s] for s in estimated}, (True, True), unit)]


def class_means(unit: stain.Stain, true: dict, sites: list, classes: np.ndarray, index: dict) -> list[tuple]:
    """(label, pathway): the world's true stains with each class's mean map (reference -> site, OD) and mean log white
    replaced by those over all sites; with both intensities transferred (as the true stains' row), then hematoxylin
    only (the pathway's choice). Averaging the maps is the same in any reference's frame."""
    def centred(v: np.ndarray) -> np.ndarray:
        return v - np.stack([v[classes == c].mean(0) for c in classes]) + v.mean(0)

    white = np.log(np.array([true[s].white for s in sites]))
    out = []
    for transfer, what in (((True, True), "both"), ((True, True), "maps"), ((True, True), "white"),
                           ((True, False), "both")):
        maps = np.array([stain.site_map(unit, true[s], transfer) for s in sites])
        maps = centred(maps) if what != "white" else maps
        whites = np.clip(np.exp(centred(white) if what != "maps" else white), 1.0, 255.0)
        path = stain.StainPathway(len(sites))
        path.set_maps(unit, {index[s]: (maps[k], whites[k]) for k, s in enumerate(sites)})
        label = {"both": "maps and white", "maps": "maps", "white": "white"}[what]
        out.append((f"true stains, each class's mean {label} set to all sites' (intensities "
                    f"{'H and E' if transfer[1] else 'H'})", path))
    return out


def model_tiles(cfg: config.Config, folder: Path, pairs, true: dict, score) -> None:
    """Score a stain-pathway model's tiles of the pair grid as sampled, then mapped back to the reference stain with
    the model's own maps and re-stained with one estimate (or all) swapped for the world's truth."""
    model = load_model(folder)
    if model.stain is None:
        raise SystemExit(f"{folder}: not a stain-pathway model (model.site_pathway embedding)")
    estimates = json.loads((folder / "stain.json").read_text())
    reference = stain.Stain.from_json(estimates.pop("reference"))
    estimated = {s: stain.Stain.from_json(e) for s, e in estimates.items()}
    first = pairs["class"].iloc[0]
    index = {s: int(model.vocab.encode([first], {"tss": [s]})["tss"][0]) for s in estimated}
    images = unseen.sample_pairs(cfg, model, pairs)
    score("ground truth (the world's own tiles of the pairs)", unseen.ground_truth_tiles(cfg, pairs, images.shape[1]),
          seen=True)
    score("the model's tiles, as sampled (its estimated maps)", images, seen=True)
    canonical = [model.stain.canonical(torch.from_numpy(im).permute(0, 3, 1, 2).float() / 127.5 - 1,
                                       torch.full((len(im),), index[s])) for im, s in zip(images, pairs["tss"])]
    for label, stains, transfer, ref in swapped(reference, estimated, true):
        path = stain.StainPathway(len(model.stain.white) - 1)
        path.set(ref, {index[s]: st for s, st in stains.items()}, transferred=transfer)
        score("the model's tiles, " + label.removeprefix("the pathway's, ").replace("the world's", "re-stained with the world's"),
              np.stack([to_uint8(path.restain(x, torch.full((len(x),), index[s]))) for x, s in zip(canonical, pairs["tss"])]),
              seen=True)


if __name__ == "__main__":
    main()
