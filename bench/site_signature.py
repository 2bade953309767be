"""What a site's look is made of, for the unseen-pairs evaluation's deconfounded site classifier (synthetic world).

1. The world's own tiles of the pair grid (`medi.unseen.pair_grid`, --per-pair each, rendered and packed as
   `medi.unseen.ground_truth_tiles` does, render stream 777), scored by the deconfounded classifiers as rendered and
   with one of each site's traits replaced by the standard stain's / scanner's (`histology.sample_site_stain` at
   strength 0): the scanner (blur, sensor noise, JPEG quality), the whole stain, the white, the H and E intensities,
   the H and E vectors, or without the slides' jitter. What the site accuracy loses is what the classifier reads.
2. With --model DIR (a stain-pathway model): the H, E and residual concentrations of its tiles of the pair grid
   (the evaluation's own sampling) against the world's own tiles of the same pairs, both unmixed with each pair's
   site's TRUE stain, per class: how far the generator's stain balance drifts from the class's.

    python bench/site_signature.py [--per-pair 8] [--model artifacts/ablation/stain_true-seed0/models/medi]

Run in a pipeline folder after `make repro` (default world); prints markdown tables.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from medi import artifacts, config, data, histology, synthetic, unseen
from medi.fidelity import Extractor

SCANNER = ("blur_sigma", "noise_sd", "jpeg_quality")
STAIN = ("hematoxylin", "eosin", "h_intensity", "e_intensity", "illumination")
VARIANTS = [("as rendered", ()), ("scanner standard (blur, noise, JPEG)", SCANNER),
            ("stain standard (scanner kept)", STAIN), ("white standard", ("illumination",)),
            ("H and E intensities standard", ("h_intensity", "e_intensity")),
            ("H and E vectors standard", ("hematoxylin", "eosin")), ("no slide jitter", None)]


def render(cfg, pairs: pd.DataFrame, n: int, standard: tuple | None) -> np.ndarray:
    """n tiles per pair, packed; `standard`: the site traits taken from the standard stain (None: no slide jitter)."""
    syn = cfg.synthetic
    _, stains, _ = synthetic.plan_world(syn, {c: c for c in syn.classes})
    reference = histology.sample_site_stain(np.random.default_rng(0), 0.0)
    out = np.zeros((len(pairs), n, cfg.data.resolution, cfg.data.resolution, 3), np.uint8)
    for i, (cls, tss) in enumerate(zip(pairs["class"], pairs["tss"])):
        rng = np.random.default_rng([syn.seed, 777, i])
        for j in range(n):
            slide = histology.jitter_stain(stains[tss], rng, syn.slide_jitter)
            slide = stains[tss] if standard is None else \
                dataclasses.replace(slide, **{k: getattr(reference, k) for k in standard})
            tile = histology.render_tile(synthetic.class_morphology(cls), slide, rng, size=syn.tile_size, mpp=syn.mpp)
            jpeg = io.BytesIO()
            Image.fromarray(tile).save(jpeg, format="JPEG", quality=slide.jpeg_quality)
            out[i, j] = data.decode_tile(jpeg, cfg.data.resolution)
    return out


def drift(cfg, pairs: pd.DataFrame, folder: Path) -> None:
    from medi.sampling import load_model

    truth = json.loads((Path(cfg.data.root) / "ground_truth.json").read_text())["sites"]
    model = load_model(folder)
    gen = unseen.sample_pairs(cfg, model, pairs)
    real = unseen.ground_truth_tiles(cfg, pairs, gen.shape[1])
    rows = []
    for i, (cls, tss) in enumerate(zip(pairs["class"], pairs["tss"])):
        st = truth[tss]["stain"]
        basis = np.array(truth[tss]["od_matrix"])
        r = np.cross(basis[0], basis[1])
        inverse = np.linalg.inv(np.vstack([basis, r / np.linalg.norm(r)]))
        for kind, tiles in (("generated", gen[i]), ("world", real[i])):
            c = histology.optical_density(tiles.reshape(-1, 3), st["illumination"]) @ inverse
            rows.append({"class": cls, "kind": kind, "H": c[:, 0].mean(), "E": c[:, 1].mean(),
                         "H 99th pct.": np.percentile(c[:, 0], 99), "E 99th pct.": np.percentile(c[:, 1], 99),
                         "|residual|": np.abs(c[:, 2]).mean()})
    table = pd.DataFrame(rows).groupby(["class", "kind"]).mean()
    print(f"\n{folder}: mean concentrations per tile pixel, unmixed with each pair's true stain "
          f"({gen.shape[1]} tiles per pair, every pair of the grid)\n")
    print("| class | tiles | " + " | ".join(table.columns) + " |\n|---|---|" + "---|" * len(table.columns))
    for (cls, kind), row in table.iterrows():
        print(f"| {cls} | {kind} | " + " | ".join(f"{v:.3f}" for v in row) + " |")
    overall = pd.DataFrame(rows).groupby("kind").mean(numeric_only=True)
    print("\nall classes: generated / world = " + ", ".join(
        f"{k} {overall.loc['generated', k] / overall.loc['world', k]:.3f}" for k in overall.columns))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-pair", type=int, default=8)
    ap.add_argument("--model", help="a stain-pathway model's folder: its concentrations against the world's")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    cfg = config.load(args.params)
    train_index = artifacts.train_frame(cfg).sort_values("idx").reset_index(drop=True)
    extractor = Extractor.from_config(cfg.fid.encoder)
    fit_set = unseen.deconfounded_set(cfg, train_index)
    if fit_set is None:
        raise SystemExit("the synthetic world only (and fid.deconfounded_per_pair > 0)")
    deconfounded = unseen.deconfounded_classifiers(
        cfg, extractor.cached_features(fit_set[0], cfg.fid.cache, verbose=False).float().numpy(), fit_set[1])
    pairs = unseen.pair_grid(train_index, sorted(train_index["class"].astype(str).unique()))
    print(f"| the world's tiles of the pair grid, {args.per_pair} per pair | site acc., unseen | class acc., unseen "
          f"| site acc., seen |\n|---|---|---|---|")
    for label, standard in VARIANTS:
        images = render(cfg, pairs, args.per_pair, standard)
        features = extractor.features(images.reshape(-1, *images.shape[2:]), verbose=False).float().numpy()
        v, _ = unseen.score(pairs, images, features, deconfounded)
        print(f"| {label} | {v['unseen_site_accuracy']:.3f} | {v['unseen_class_accuracy']:.3f} | "
              f"{v['seen_site_accuracy']:.3f} |", flush=True)
    if args.model:
        drift(cfg, pairs, Path(args.model))


if __name__ == "__main__":
    main()
