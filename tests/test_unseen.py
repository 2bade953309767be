"""The unseen-pairs evaluation: the pair grid, its figures on hand-made features and on the tiny world's ground
truth, and the evaluation of a model (a site-conditioned one varies by site, a class-only one does not)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers import save_untrained, train_index
from medi import artifacts, config, fidelity, sampling, unseen
from medi.groundtruth import GroundTruth, stain_match


def test_pair_grid_is_every_class_at_every_class_largest_site(tiny_world):
    cfg = tiny_world()
    idx = train_index(cfg)
    classes = sorted(idx["class"].unique())
    pairs = unseen.pair_grid(idx, classes)
    sites = sampling.largest_sites(idx, classes)
    assert pairs[["class", "tss"]].values.tolist() == [[c, s] for c in classes for s in sites]
    truth = GroundTruth.load(cfg.data.root)          # each synthetic site sends one class: the diagonal is seen
    assert pairs["seen"].tolist() == [truth.site_class[s] == c for c in classes for s in sites]
    assert pairs["seen"].sum() == len(classes)


def test_score_tells_a_site_carried_to_other_classes_from_one_that_is_not():
    """Sites far apart in feature space: a generated tile counts for the site whose features it has."""
    rng = np.random.default_rng(0)
    sites = {"s1": "A", "s3": "B"}
    centres = {"s1": 50.0 * np.eye(6)[0], "s3": 50.0 * np.eye(6)[1]}
    index = pd.DataFrame([(f"{s}-{k // 5}", c, s) for s, c in sites.items() for k in range(30)],
                         columns=["slide", "class", "tss"])
    real = np.stack([centres[s] + rng.normal(0, 1, 6) for s in index["tss"]])
    classifiers = fidelity.condition_classifiers(real, index, seed=0)
    pairs = unseen.pair_grid(index, ["A", "B"])
    assert pairs.values.tolist() == [["A", "s1", True], ["A", "s3", False], ["B", "s1", False], ["B", "s3", True]]
    n = 3
    # the model carries the site to the other class for (A, s3) only; (B, s1) shows B's own site s3
    look = {("A", "s1"): "s1", ("A", "s3"): "s3", ("B", "s1"): "s3", ("B", "s3"): "s3"}
    features = np.stack([centres[look[(c, s)]] + rng.normal(0, 1, 6) for c, s in zip(pairs["class"], pairs["tss"])
                         for _ in range(n)])
    headline, detail = unseen.score(pairs, np.zeros((4, n, 8, 8, 3), np.uint8), features, classifiers)
    assert detail["site_accuracy"].tolist() == [1.0, 1.0, 0.0, 1.0]
    # the class classifier reads the look too: (A, s3) looks like B, (B, s1) like B
    assert detail["class_accuracy"].tolist() == [1.0, 0.0, 1.0, 1.0]
    assert headline == {"pairs_per_kind": {"seen": 2, "unseen": 2}, "images_per_pair": n,
                        "seen_site_accuracy": 1.0, "seen_class_accuracy": 1.0,
                        "unseen_site_accuracy": 0.5, "unseen_class_accuracy": 0.5}
    assert "stain_rank" not in detail               # no ground truth (real data): no stain figures


def test_stain_rank_reads_the_ground_truth(tiny_world):
    """Real tiles of a site put in every pair of its column: the stain figures are the ground truth's, per pair."""
    cfg = tiny_world()
    idx = train_index(cfg)
    tiles = np.asarray(artifacts.load_tiles(cfg.data.output))
    truth = GroundTruth.load(cfg.data.root)
    pairs = unseen.pair_grid(idx, sorted(idx["class"].unique()))
    own = {s: tiles[idx[idx["tss"] == s]["idx"].to_numpy()[:3]] for s in pairs["tss"].unique()}
    images = np.stack([own[s] for s in pairs["tss"]])
    # the images of each row's own site instead: the conditioned site's stain is missing off the diagonal
    wrong = np.stack([own[pairs[(pairs["class"] == c) & pairs["seen"]]["tss"].iloc[0]] for c in pairs["class"]])
    features = np.zeros((images.shape[0] * images.shape[1], 4))
    classifiers = {"tss": (_Constant("x"), 1.0), "class": (_Constant("y"), 1.0)}
    right, cells = unseen.score(pairs, images, features, classifiers, truth)
    assert cells["stain_rank"].tolist() == [stain_match(own[s], s, truth)["rank"] for s in pairs["tss"]]
    assert right["unseen_stain_rank"] == pytest.approx(cells.loc[~cells["seen"], "stain_rank"].mean())
    bad, _ = unseen.score(pairs, wrong, features, classifiers, truth)
    assert bad["seen_stain_rank"] == right["seen_stain_rank"]      # the diagonal is the same tiles
    # each site's tiles fill its column once on the diagonal and k - 1 times off it: the same mean (the floor)
    assert right["unseen_stain_rank"] == pytest.approx(right["seen_stain_rank"]) and right["seen_stain_rank"] < 0.25
    assert bad["unseen_stain_rank"] > 0.5          # a row's own site where another was asked: about chance


class _Constant:
    def __init__(self, label):
        self.label, self.classes_ = label, np.array([label])

    def predict(self, x):
        return np.full(len(x), self.label)


def test_evaluate_samples_each_pair_with_shared_seeds_and_a_class_only_model_once_per_class(tiny_world):
    cfg = tiny_world(fid__unseen_per_pair=2, sample__guidance=2.0, sample__metadata_guidance=3.0)
    idx = train_index(cfg).sort_values("idx").reset_index(drop=True)
    classes = sorted(idx["class"].unique())
    k = len(classes)
    for name in ("medi", "cls"):
        model = save_untrained(cfg, name)
        headline, cells, images = unseen.evaluate(cfg, name)
        assert images.shape == (k * k, 2, cfg.data.resolution, cfg.data.resolution, 3)
        assert headline["pairs_per_kind"] == {"seen": k, "unseen": k * k - k}
        assert headline["sampling"] == {"scheduler": cfg.sample.scheduler, "steps": cfg.sample.steps,
                                        "guidance": 2.0, "metadata_guidance": 3.0, "guidance_colour": "conditional",
                                        "colour_calibration": cfg.sample.colour_calibration}
        for kind, sel in (("seen", cells["seen"]), ("unseen", ~cells["seen"])):
            for f in unseen.FIGURES:
                assert headline[f"{kind}_{f}"] == cells.loc[sel, f].mean()
        rows = images.reshape(k, k, *images.shape[1:])
        # the same seeds in every pair: a class-only model draws identical tiles across a row, MeDi varies by site
        assert all(np.array_equal(rows[i, 0], rows[i, j]) for i in range(k) for j in range(k)) == (name == "cls")
        first = cells.iloc[1]           # one pair again, on its own, with seeds sample.seed + 0, 1
        cond = model.vocab.encode([first["class"]] * 2, {"tss": [first["tss"]] * 2} if name == "medi" else {})
        again = sampling.generate(model, sampling.Sampler(cfg.sample.scheduler, cfg.sample.steps, 2.0, 3.0,
                                                          colour="conditional"), cfg.model,
                                  cond, [cfg.sample.seed, cfg.sample.seed + 1])
        assert np.array_equal(again, images[1])


def test_the_ceiling_is_the_ground_truth_scored_by_the_same_instrument(tiny_world, make_cfg):
    """On the synthetic world the evaluation also scores the world's own tiles of every pair (`ceiling_*`): rendered
    like the dataset's, with the conditioned site's stain (its stain rank sits at the real tiles' floor, where an
    untrained model's is near chance); real data have no ceiling."""
    cfg = tiny_world(fid__unseen_per_pair=3)
    save_untrained(cfg, "medi")
    headline, cells, _ = unseen.evaluate(cfg, "medi")
    pairs = cells[["class", "tss", "seen"]]
    truth = unseen.ground_truth_tiles(cfg, pairs, 3)
    assert truth.shape == (len(pairs), 3, cfg.data.resolution, cfg.data.resolution, 3) and truth.dtype == np.uint8
    assert np.array_equal(truth, unseen.ground_truth_tiles(cfg, pairs, 3))                 # deterministic
    assert np.array_equal(truth[:, :2], unseen.ground_truth_tiles(cfg, pairs, 2))         # a tile per draw of its stream
    assert not np.array_equal(truth, unseen.ground_truth_tiles(cfg, pairs, 3, stream=1))
    gt = GroundTruth.load(cfg.data.root)
    assert cells["ceiling_stain_rank"].tolist() == [stain_match(t, s, gt)["rank"] for t, s in zip(truth, pairs["tss"])]
    for kind, sel in (("seen", cells["seen"]), ("unseen", ~cells["seen"])):
        for f in unseen.FIGURES:
            assert headline[f"ceiling_{kind}_{f}"] == pytest.approx(cells.loc[sel, f"ceiling_{f}"].mean())
            assert unseen.figures_of(headline)[f"pairs_ceiling_{kind}_{f}"] == headline[f"ceiling_{kind}_{f}"]
    assert headline["ceiling_unseen_stain_rank"] < 0.25 < headline["unseen_stain_rank"]
    assert unseen.ground_truth_tiles(make_cfg(data__source="tcga_ut"), pairs, 3) is None


def test_the_deconfounded_classifiers_learn_every_class_at_every_site_and_score_model_and_ground_truth(tiny_world,
                                                                                                       make_cfg):
    """`deconf_*`: classifiers fitted on rendered tiles of every class at every training site (so the site's label never
    goes with one class), scoring the model's tiles and the ground truth's; an untrained model's tiles name their site
    no better than chance, the world's own tiles far better."""
    cfg = tiny_world(fid__unseen_per_pair=3, fid__deconfounded_per_pair=4)
    idx = train_index(cfg).sort_values("idx").reset_index(drop=True)
    tiles, labels = unseen.deconfounded_set(cfg, idx)
    classes, sites = sorted(idx["class"].unique()), sorted(idx["tss"].astype(str).unique())
    assert tiles.shape == (len(classes) * len(sites) * 4, cfg.data.resolution, cfg.data.resolution, 3)
    assert (pd.crosstab(labels["class"], labels["tss"]) == 4).all().all() and labels["slide"].is_unique
    assert set(labels["tss"]) == set(sites) and set(labels["class"]) == set(classes)
    again, _ = unseen.deconfounded_set(cfg, idx)
    assert np.array_equal(tiles, again)                                                   # deterministic
    assert unseen.deconfounded_set(config.override(cfg, {"fid.deconfounded_per_pair": 0}), idx) is None
    assert unseen.deconfounded_set(make_cfg(data__source="tcga_ut"), idx) is None
    save_untrained(cfg, "medi")
    headline, cells, _ = unseen.evaluate(cfg, "medi")
    for prefix in ("deconf_", "ceiling_deconf_"):
        for kind, sel in (("seen", cells["seen"]), ("unseen", ~cells["seen"])):
            for f in ("site_accuracy", "class_accuracy"):
                assert headline[f"{prefix}{kind}_{f}"] == pytest.approx(cells.loc[sel, f"{prefix}{f}"].mean())
                assert unseen.figures_of(headline)[f"pairs_{prefix}{kind}_{f}"] == headline[f"{prefix}{kind}_{f}"]
        assert f"{prefix}stain_rank" not in cells                         # accuracies only: the stain rank is one
    assert 0 < headline["deconf_site_accuracy_cv"] <= 1 and 0 < headline["deconf_class_accuracy_cv"] <= 1
    chance = 1 / len(sites)
    assert headline["deconf_unseen_site_accuracy"] < 2 * chance < headline["ceiling_deconf_unseen_site_accuracy"]
    assert not any(k.startswith("pairs_deconf") for k in unseen.figures_of(headline, deconfounded=False))
    off, _, _ = unseen.evaluate(config.override(cfg, {"fid.deconfounded_per_pair": 0}), "medi")
    assert not any(k.startswith(("deconf_", "ceiling_deconf_")) for k in off)
