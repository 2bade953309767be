"""The unseen-pairs evaluation: does a model render a site's look on classes that site never sent?

Every class is sampled at the largest training site of every class (the grid of the training log, classes x
sites): the diagonal pairs were seen in training, every other pair never was. Each pair gets
`fid.unseen_per_pair` images (the same seeds across a row's sites, so only the site changes), sampled with the
sampling stage's settings (`sample.scheduler`, `steps`, `guidance`, `metadata_guidance`, `guidance_colour`,
`colour_calibration`, `precision`). Three figures, each on seen and on unseen pairs:

- site accuracy: how often a classifier of the site, fitted on real training tiles (`fidelity.condition_classifiers`),
  names the conditioned site (chance = 1 / training sites);
- stain rank (synthetic world only): the conditioned site's rank among all sites by the angle between the
  tiles' estimated stain and each site's true stain (`groundtruth.stain_match`; 0 = nearest, 0.5 = chance);
- class accuracy: how often the classifier of the class names the conditioned class.

A model not conditioned on the site (CLS) is sampled once per class and those images scored against every
site, as the training stage's stain check does: its figures show what class conditioning alone gives.

On the synthetic world the same figures are also given for the ground truth (`ceiling_*`): the same number of
tiles per pair rendered by the world's own renderer (`ground_truth_tiles`: the class's morphology under the
site's stain, each tile from its own slide, JPEG at the site's quality, decoded as `prepare` packs tiles) and
scored by the same classifiers. It is what a perfect generator would score with this instrument: the classifiers
learnt site and class from tiles where each site sent one class, so on unseen pairs even the ground truth scores
far below the seen pairs (docs/conditioning.md, "The instrument's ceiling").

The synthetic world also allows a valid instrument (`deconf_*`): the same logistic regressions fitted on the
world's own tiles of **every** class at **every** training site (`fid.deconfounded_per_pair` each,
`deconfounded_classifiers`), so the class classifier never learns a stain that goes with one class and the site
classifier never a morphology that goes with one site. Model and ground truth are scored with it as well
(`deconf_*`, `ceiling_deconf_*`).
"""
from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd

from medi.config import Config

log = logging.getLogger(__name__)

FIGURES = ("site_accuracy", "stain_rank", "class_accuracy")


def pair_grid(train_index: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """The (class, site) pairs: every class x the largest training site of each class, with `seen` (the site
    sent that class in training)."""
    from medi.sampling import largest_sites

    sites = list(dict.fromkeys(largest_sites(train_index, classes)))     # a site largest for two classes: once
    sent = set(zip(train_index["class"].astype(str), train_index["tss"].astype(str)))
    return pd.DataFrame([{"class": c, "tss": s, "seen": (c, s) in sent} for c in classes for s in sites])


def sample_pairs(cfg: Config, model, pairs: pd.DataFrame) -> np.ndarray:
    """`fid.unseen_per_pair` images per pair, (pairs, n, H, W, 3) uint8; seeds `sample.seed` + 0..n-1 in every
    pair. A model without the site is sampled once per class (its images repeat across the row's sites)."""
    from medi.sampling import Sampler, generate

    s, n = cfg.sample, cfg.fid.unseen_per_pair
    conditioned = "tss" in model.vocab.categorical
    keys = list(dict.fromkeys(zip(pairs["class"], pairs["tss"] if conditioned else [None] * len(pairs))))
    cond = model.vocab.encode([c for c, _ in keys for _ in range(n)],
                              {"tss": [t for _, t in keys for _ in range(n)]} if conditioned else {})
    seeds = [s.seed + k for _ in keys for k in range(n)]
    images = generate(model, Sampler.of(s), cfg.model, cond, seeds, batch_size=s.batch_size)
    images = dict(zip(keys, images.reshape(len(keys), n, *images.shape[1:])))
    return np.stack([images[(c, t if conditioned else None)] for c, t in zip(pairs["class"], pairs["tss"])])


def score(pairs: pd.DataFrame, images: np.ndarray, features: np.ndarray, classifiers: dict,
          truth=None) -> tuple[dict, pd.DataFrame]:
    """The headline figures (means over seen and over unseen pairs) and one row per pair.

    `features` are the extractor's features of `images` flattened pair-major; `classifiers` as
    `fidelity.condition_classifiers` returns them; `truth` a `groundtruth.GroundTruth` (None: no stain figures)."""
    from medi.groundtruth import stain_match

    n = images.shape[1]
    site_pred = classifiers["tss"][0].predict(features).reshape(len(pairs), n)
    class_pred = classifiers["class"][0].predict(features).reshape(len(pairs), n)
    rows = []
    for i, p in enumerate(pairs.itertuples(index=False)):
        row = {"class": p[0], "tss": p[1], "seen": bool(p[2]),
               "site_accuracy": float(np.mean(site_pred[i] == p[1])),
               "class_accuracy": float(np.mean(class_pred[i] == p[0]))}
        if truth is not None and p[1] in truth.stains:
            m = stain_match(images[i], p[1], truth)
            row |= {"stain_rank": m["rank"], "stain_angle_deg": m["angle"]}
        rows.append(row)
    detail = pd.DataFrame(rows)
    headline: dict = {"pairs_per_kind": {}, "images_per_pair": int(n)}
    for kind, sel in (("seen", detail["seen"]), ("unseen", ~detail["seen"])):
        headline["pairs_per_kind"][kind] = int(sel.sum())
        for f in FIGURES:
            if f in detail and sel.any():
                headline[f"{kind}_{f}"] = float(detail.loc[sel, f].mean())
    return headline, detail


def figures_of(headline: dict, kinds: tuple[str, ...] = ("seen", "unseen"), ceiling: bool = True,
               deconfounded: bool = True) -> dict[str, float]:
    """The headline's figures of the pair kinds `kinds` (the model's; with `deconfounded` also by the deconfounded
    classifiers, `deconf_...`; with `ceiling` the ground truth's, `ceiling_...`, where there are such), named as runs
    and metrics files log them (`pairs_...`)."""
    sources = [""] + ["deconf_"] * deconfounded
    sources += [f"ceiling_{s}" for s in sources] if ceiling else []
    prefixes = tuple(f"{pre}{kind}_" for pre in sources for kind in kinds)
    return {f"pairs_{k}": v for k, v in headline.items() if k.startswith(prefixes)}


CEILING_STREAM = 7919     # the ground truth's random stream (apart from the dataset's slides): [synthetic.seed, this, pair]
DECONFOUNDED_STREAM = 104729     # the deconfounded classifiers' tiles: another stream


def ground_truth_tiles(cfg: Config, pairs: pd.DataFrame, n: int, stream: int = CEILING_STREAM) -> np.ndarray | None:
    """`n` ground-truth tiles per (class, tss) row of `pairs`, (pairs, n, R, R, 3) uint8, rendered as the synthetic
    world renders its tiles and packed as `prepare` packs them (random stream [synthetic.seed, `stream`, row]);
    None where the data are not the synthetic world's."""
    import io

    from PIL import Image

    from medi import data, histology, synthetic

    if cfg.data.source != "synthetic":
        return None
    syn = cfg.synthetic
    _, stains, _ = synthetic.plan_world(syn, {c: c for c in syn.classes})
    out = np.zeros((len(pairs), n, cfg.data.resolution, cfg.data.resolution, 3), np.uint8)
    for i, (cls, tss) in enumerate(zip(pairs["class"], pairs["tss"])):
        rng = np.random.default_rng([syn.seed, stream, i])
        for j in range(n):
            slide = histology.jitter_stain(stains[tss], rng, syn.slide_jitter)
            tile = histology.render_tile(synthetic.class_morphology(cls), slide, rng, size=syn.tile_size, mpp=syn.mpp)
            jpeg = io.BytesIO()
            Image.fromarray(tile).save(jpeg, format="JPEG", quality=slide.jpeg_quality)
            out[i, j] = data.decode_tile(jpeg, cfg.data.resolution)
    return out


def deconfounded_set(cfg: Config, train_index: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame] | None:
    """What the deconfounded classifiers learn from: `fid.deconfounded_per_pair` rendered tiles of every class at every
    training site, each from its own slide, (N, R, R, 3) uint8, and their labels (class, tss, slide); None off the
    synthetic world or when fid.deconfounded_per_pair is 0."""
    n = cfg.fid.deconfounded_per_pair
    if not n or cfg.data.source != "synthetic":
        return None
    classes, sites = (sorted(train_index[c].astype(str).unique()) for c in ("class", "tss"))
    grid = pd.DataFrame([(c, s) for c in classes for s in sites], columns=["class", "tss"])
    tiles = ground_truth_tiles(cfg, grid, n, stream=DECONFOUNDED_STREAM)
    labels = grid.loc[grid.index.repeat(n)].reset_index(drop=True)
    labels["slide"] = [f"rendered-{i}" for i in range(len(labels))]
    return tiles.reshape(-1, *tiles.shape[2:]), labels


def deconfounded_classifiers(cfg: Config, features: np.ndarray, labels: pd.DataFrame) -> dict:
    """Class and site classifiers fitted on the extractor's `features` of `deconfounded_set`, in
    `fidelity.condition_classifiers`' form (cross-validated accuracy on rendered tiles; with fid.cache fitted once
    per set of features)."""
    from medi.fidelity import condition_classifiers

    return condition_classifiers(features, labels, cfg.fid.seed, cache=cfg.fid.cache)


def evaluate(cfg: Config, name: str, extractor=None, train_index: pd.DataFrame | None = None,
             real: np.ndarray | None = None, classifiers: dict | None = None,
             model=None, deconfounded: dict | None = None) -> tuple[dict, pd.DataFrame, np.ndarray]:
    """Sample and score the pair grid of model NAME (`cfg.model.output`/NAME). The fid stage passes what it
    has already computed (the extractor, the real training tiles' features in `train_index` order, the
    classifiers, the deconfounded classifiers); anything missing is computed here. Returns (headline figures, one
    row per pair, the images (pairs, n, H, W, 3))."""
    from medi import artifacts, distributed
    from medi.fidelity import Extractor, condition_classifiers
    from medi.groundtruth import GroundTruth
    from medi.sampling import load_model

    t0 = time.perf_counter()
    if train_index is None:
        from medi.artifacts import train_frame

        train_index = train_frame(cfg)
        train_index = train_index.sort_values("idx").reset_index(drop=True)
    extractor = extractor or Extractor.from_config(cfg.fid.encoder)
    if classifiers is None:
        if real is None:
            tiles = artifacts.load_tiles(cfg.data.output)
            real = extractor.cached_features(tiles[train_index["idx"].to_numpy()], cfg.fid.cache,
                                             verbose=False).float().numpy()
        classifiers = condition_classifiers(real, train_index, cfg.fid.seed, cache=cfg.fid.cache)
    model = model or load_model(artifacts.model_dir(cfg, name))
    pairs = pair_grid(train_index, list(model.vocab.classes))
    t1 = time.perf_counter()
    images = sample_pairs(cfg, model, pairs)
    sample_seconds = time.perf_counter() - t1
    features = extractor.features(images.reshape(-1, *images.shape[2:]), verbose=False).float().numpy()
    truth = GroundTruth.load(cfg.data.root)
    headline, detail = score(pairs, images, features, classifiers, truth)
    real_pairs = ground_truth_tiles(cfg, pairs, images.shape[1]) if truth is not None else None
    reference = deconfounded_set(cfg, train_index) if deconfounded is None and truth is not None else None
    if reference is not None:           # the feature cache's lookups are collectives: not under a launch
        encode = (extractor.features if distributed.state().num_processes > 1 else
                  lambda x, verbose: extractor.cached_features(x, cfg.fid.cache, verbose=verbose))
        deconfounded = deconfounded_classifiers(cfg, encode(reference[0], verbose=False).float().numpy(), reference[1])

    def also(prefix: str, figures: tuple[dict, pd.DataFrame]) -> None:
        nonlocal headline, detail
        headline |= {f"{prefix}{k}": v for k, v in figures[0].items() if k.startswith(("seen_", "unseen_"))}
        detail = detail.join(figures[1][[f for f in FIGURES if f in figures[1]]].add_prefix(prefix))

    if deconfounded is not None:        # the valid instrument on the model's tiles (accuracies only)
        also("deconf_", score(pairs, images, features, deconfounded))
        headline |= {"deconf_site_accuracy_cv": deconfounded["tss"][1],
                     "deconf_class_accuracy_cv": deconfounded["class"][1]}
    if real_pairs is not None:          # the same instruments on the ground truth: what a perfect generator scores
        # (encoded without the feature cache, whose lookups are collectives under a launch: this runs on the main only)
        truth_features = extractor.features(real_pairs.reshape(-1, *real_pairs.shape[2:]), verbose=False)
        truth_features = truth_features.float().numpy()
        also("ceiling_", score(pairs, real_pairs, truth_features, classifiers, truth))
        if deconfounded is not None:
            also("ceiling_deconf_", score(pairs, real_pairs, truth_features, deconfounded))
    headline |= {"site_conditioned": "tss" in model.vocab.categorical,
                 "site_chance": 1.0 / len(classifiers["tss"][0].classes_),
                 "site_accuracy_real_cv": classifiers["tss"][1], "class_accuracy_real_cv": classifiers["class"][1],
                 "sampling": {"scheduler": cfg.sample.scheduler, "steps": cfg.sample.steps,
                              "guidance": cfg.sample.guidance, "metadata_guidance": cfg.sample.metadata_guidance,
                              "guidance_colour": cfg.sample.guidance_colour,
                              "colour_calibration": cfg.sample.colour_calibration},
                 "sample_seconds": sample_seconds, "seconds": time.perf_counter() - t0}
    log.info("unseen pairs of %s: %s", name, {k: round(v, 3) for k, v in figures_of(headline).items()})
    return headline, detail, images


def grid_figure(pairs: pd.DataFrame, images: np.ndarray, title: str):
    """The evaluation's images as a grid: rows = conditioned class, columns = conditioned site."""
    from medi import figures

    classes = list(dict.fromkeys(pairs["class"]))
    sites = list(dict.fromkeys(pairs["tss"]))
    cells = images.reshape(len(classes), len(sites), *images.shape[1:])
    cells = np.concatenate(list(cells.transpose(2, 0, 1, 3, 4, 5)), axis=3)     # a pair's images side by side
    owner = pairs[pairs["seen"]].set_index("tss")["class"].to_dict()
    return figures.tile_grid(cells, classes, [f"TSS {s} ({owner.get(s, '?')})" for s in sites], title,
                             scale=0.9 * images.shape[1])
