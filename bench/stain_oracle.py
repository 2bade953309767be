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
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from medi import artifacts, config, stain, unseen
from medi.fidelity import Extractor, condition_classifiers
from medi.groundtruth import GroundTruth

PER_PAIR = 7
INTENSITIES = {"H and E": (True, True), "none": (False, False), "H": (True, False)}


def main() -> None:
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
    owner = pairs[pairs["seen"]].set_index("class")["tss"].to_dict()
    sites = sorted(train_index["tss"].astype(str).unique())
    index = {s: i for i, s in enumerate(sites, 1)}
    source = []                       # each pair's real tiles: PER_PAIR of its class at the class's own site
    for i, c in enumerate(pairs["class"]):
        rows = train_index[(train_index["class"] == c) & (train_index["tss"].astype(str) == owner[c])]["idx"].to_numpy()
        source.append(np.sort(np.random.default_rng([i]).choice(rows, PER_PAIR, replace=False)))

    reference, relative = stain.fit(tiles, train_index, sites, seed=0)
    absolute = {s: dataclasses.replace(relative[s], white=stain.estimate(np.asarray(tiles[train_index["idx"][
        train_index["tss"].astype(str) == s].to_numpy()[:stain.TILES_PER_SITE]])).white) for s in sites}
    fixed = {s: dataclasses.replace(relative[s], white=reference.white) for s in sites}
    variants = [(f"re-stained, white {w}, intensity {i}", stains, transfer, reference)
                for w, stains in (("absolute", absolute), ("fixed", fixed), ("relative", relative))
                for i, transfer in INTENSITIES.items()]
    truth_file = json.loads((Path(cfg.data.root) / "ground_truth.json").read_text())["sites"]
    true = {s: stain.Stain(stain.basis(np.array(truth_file[s]["od_matrix"])),
                           np.array([truth_file[s]["stain"]["h_intensity"], truth_file[s]["stain"]["e_intensity"]]),
                           np.array(truth_file[s]["stain"]["illumination"])) for s in sites}
    # the pathway's estimates with one swapped for the world's truth (true intensities are relative to 1, so the
    # reference's are 1 there), then all of them
    unit = dataclasses.replace(reference, intensity=np.ones(2))
    variants += [("the pathway's, with the true white", {s: dataclasses.replace(relative[s], white=true[s].white)
                                                         for s in sites}, stain.TRANSFERRED, reference),
                 ("the pathway's, with the true H and E intensities",
                  {s: dataclasses.replace(relative[s], intensity=true[s].intensity) for s in sites}, (True, True), unit),
                 ("re-stained with the world's true stains (vectors, both intensities, white)", true, (True, True), unit)]

    def score(label: str, images: np.ndarray) -> None:
        features = extractor.features(images.reshape(-1, *images.shape[2:]), verbose=False).float().numpy()
        pipeline, _ = unseen.score(pairs, images, features, classifiers, truth)
        valid, _ = unseen.score(pairs, images, features, deconfounded)
        print(f"| {label} | {pipeline['unseen_stain_rank']:.3f} | {pipeline['unseen_site_accuracy']:.3f} | "
              f"{pipeline['unseen_class_accuracy']:.3f} | {valid['unseen_site_accuracy']:.3f} | "
              f"{valid['unseen_class_accuracy']:.3f} |", flush=True)

    print("| tiles (unseen pairs) | stain rank | site acc. | class acc. | site acc., deconf. | class acc., deconf. |")
    print("|---|---|---|---|---|---|")
    score("real, their own site's stain", np.stack([np.asarray(tiles[s]) for s in source]))
    for label, stains, transfer, ref in variants:
        path = stain.StainPathway(len(sites))
        path.set(ref, {i: stains[s] for s, i in index.items()}, transferred=transfer)
        out = []
        for (c, s), rows in zip(zip(pairs["class"], pairs["tss"]), source):
            x = torch.from_numpy(np.asarray(tiles[rows])).permute(0, 3, 1, 2).float() / 127.5 - 1
            x = path.restain(path.canonical(x, torch.full((len(x),), index[owner[c]])), torch.full((len(x),), index[s]))
            out.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        score(label, np.stack(out))


if __name__ == "__main__":
    main()
