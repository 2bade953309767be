"""The unseen-pairs evaluation's ceiling on the synthetic world: what a perfect generator would score.

Real tiles of every (class, site) pair of the evaluation's grid (`medi.unseen.pair_grid`: every class x the largest
training site of each class) are rendered by the world's own renderer: the class's morphology under the site's
stain with a slide's jitter, JPEG at the site's quality, decoded and Lanczos-resized to `data.resolution` as
`prepare` packs tiles. They are scored exactly as a model's generated tiles are (`medi.unseen.score`: the same
features, the same class and site classifiers fitted on the real training tiles, the same stain rank). A seen pair
is a tile the dataset could hold; an unseen pair is ground truth the dataset never has. A target above this ceiling
cannot be met by any model, whatever its conditioning: the instrument itself caps it.

Prints the ceiling beside the models' own figures (reports/fid_NAME_detail.json) and, with --section, writes them
to docs/benchmarks.md.

Usage (project root, after `make repro` on the synthetic default): python bench/unseen_ceiling.py [--per-pair 8]
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from medi import artifacts, config, histology
from medi.fidelity import Extractor, condition_classifiers
from medi.groundtruth import GroundTruth
from medi.synthetic import class_morphology, plan_world
from medi.unseen import FIGURES, pair_grid, score

sys.path.insert(0, str(Path(__file__).parent))       # run from the project root
from bench_report import cpu_name, write_section  # noqa: E402


def render_pair(syn, stain: histology.Stain, cls: str, n: int, seed: list[int], resolution: int) -> np.ndarray:
    """n tiles of class `cls` at a site of stain `stain`, each from its own slide (its own jitter), as packed."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        slide = histology.jitter_stain(stain, rng, syn.slide_jitter)
        tile = histology.render_tile(class_morphology(cls), slide, rng, size=syn.tile_size, mpp=syn.mpp)
        buf = io.BytesIO()
        Image.fromarray(tile).save(buf, format="JPEG", quality=slide.jpeg_quality)
        with Image.open(buf) as im:
            im = im.convert("RGB")
            if im.width != resolution:
                im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
            out.append(np.asarray(im, dtype=np.uint8))
    return np.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--per-pair", type=int, default=8)
    ap.add_argument("--models", nargs="*", default=["cls", "medi"])
    ap.add_argument("--section", default="", help="docs/benchmarks.md section to write (default: print only)")
    args = ap.parse_args()
    cfg = config.load(args.params)
    truth = GroundTruth.load(cfg.data.root)
    if cfg.data.source != "synthetic" or truth is None:
        raise SystemExit("the ceiling needs the synthetic world's ground truth (data.source: synthetic, `medi synthesize`)")
    train_index = artifacts.train_frame(cfg)
    order = np.sort(train_index["idx"].to_numpy())
    train_index = train_index.set_index("idx").loc[order].reset_index()      # as the fid stage orders it
    pairs = pair_grid(train_index, sorted(train_index["class"].astype(str).unique()))
    _, stains, _ = plan_world(cfg.synthetic, {c: c for c in cfg.synthetic.classes})
    images = np.stack([render_pair(cfg.synthetic, stains[t], c, args.per_pair, [cfg.synthetic.seed, 7919, i],
                                   cfg.data.resolution)
                       for i, (c, t) in enumerate(zip(pairs["class"], pairs["tss"]))])
    extractor = Extractor.from_config(cfg.fid.encoder)
    real = extractor.cached_features(np.asarray(artifacts.load_tiles(cfg.data.output))[order], cfg.fid.cache,
                                     verbose=False).float().numpy()
    classifiers = condition_classifiers(real, train_index, cfg.fid.seed, cache=cfg.fid.cache)
    feats = extractor.features(images.reshape(-1, *images.shape[2:]), verbose=False).float().numpy()
    ceiling, detail = score(pairs, images, feats, classifiers, truth)

    columns = {"ground truth (rendered)": ceiling}
    for name in args.models:
        path = Path(cfg.fid.detail.format(model=name))
        if path.exists() and "pairs" in json.loads(path.read_text()):
            columns[name] = json.loads(path.read_text())["pairs"]
    rows = [[f"{kind} {f.replace('_', ' ')}", *[f"{c.get(f'{kind}_{f}', float('nan')):.3f}" for c in columns.values()]]
            for f in FIGURES for kind in ("seen", "unseen")]
    per_class = detail[~detail["seen"]].groupby("class")["class_accuracy"].mean()
    head = ["figure (mean over pairs)", *columns]
    text = (f"The unseen-pairs grid ({ceiling['pairs_per_kind']['seen']} seen, {ceiling['pairs_per_kind']['unseen']} "
            f"unseen pairs) scored on ground-truth tiles rendered by the synthetic world ({args.per_pair} per pair, "
            f"each from its own slide), beside the models' own figures of `make repro` "
            f"({json.loads(Path(cfg.fid.detail.format(model=args.models[-1])).read_text())['pairs']['images_per_pair']} "
            f"images per pair); classifiers fitted on the real training tiles in the feature space {cfg.fid.extractor}; "
            f"site chance {ceiling.get('site_chance', 1 / len(classifiers['tss'][0].classes_)):.3f}. "
            f"Ground-truth class accuracy on unseen pairs by class: "
            + ", ".join(f"{c} {v:.2f}" for c, v in per_class.items())
            + f". On {cpu_name()}; `python bench/unseen_ceiling.py --per-pair {args.per_pair}`")
    print(text)
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(r))
    if args.section:
        write_section(args.section, text, head, rows)


if __name__ == "__main__":
    main()
