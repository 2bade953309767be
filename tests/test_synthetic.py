"""The synthetic TCGA-UT world: real format, real structure, and a real site shortcut."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medi import artifacts, data, synthetic
from medi.synthetic import FACTS


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small default-shaped world (~1,000 tiles), synthesized and prepared once for this module."""
    import yaml
    from medi import config
    from conftest import REPO

    tmp = tmp_path_factory.mktemp("world")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["synthetic"].update(output=str(tmp / "synthetic"), slide_scale=0.08, tiles_per_slide=6)
    raw["data"].update(root=str(tmp / "synthetic"), output=str(tmp / "dataset"), resolution=32)
    cfg = config.from_dict(raw)
    summary = synthetic.synthesize(cfg)
    data.prepare(cfg)
    return cfg, summary


def test_same_format_as_tcga_ut(world):
    cfg, summary = world
    root = cfg.data.root
    meta = pd.read_csv(f"{root}/gdc_metadata.csv", dtype=str, keep_default_na=False)
    assert list(meta.columns) == synthetic.GDC_COLUMNS
    assert (meta == "'--").any().any()                             # GDC's missing marker is used
    assert meta.slide_submitter_id.str.match(data.BARCODE.pattern).all()
    tiles = sorted((Path(root) / "tcga-ut").glob("*/0/TCGA-*/*.jpg"))
    assert len(tiles) == summary["tiles"]
    assert {t.parts[-4] for t in tiles} == {cfg.class_folders[c] for c in cfg.synthetic.classes}
    report = json.loads((Path(cfg.data.output) / "prepare_report.json").read_text())
    assert report["tiles"] == summary["tiles"] and report["skipped"]["tiles_without_metadata"] == 0


def test_structure_follows_the_reference(world):
    cfg, summary = world
    index = artifacts.load_index(cfg.data.output)
    slides = index.drop_duplicates("slide")
    assert (slides.groupby("tss")["class"].nunique() == 1).all()     # every TSS belongs to one class
    assert "NA" in set(slides[slides["class"] == "UCS"].tss)         # the real pitfall is present
    per_class = slides["class"].value_counts()
    assert per_class.idxmax() in ("LUAD", "LUSC") and per_class.idxmin() in ("UCS", "KICH")
    for c, facts in FACTS.items():                                    # slide counts scale the real ones
        assert per_class[c] == max(8, round(facts.slides * cfg.synthetic.slide_scale))
    assert (slides[slides["class"].isin(["UCEC", "UCS"])].gender == "female").all()
    assert slides[slides["class"] == "LUSC"].gender.eq("male").mean() > 0.5
    top = slides[slides["class"] == "KIRC"].tss.value_counts()
    assert top.iloc[0] / top.sum() > 0.25                             # skewed: a few large sites dominate
    assert slides.age.between(20, 90).sum() + slides.age.isna().sum() == len(slides)


def test_deterministic_by_seed(world, tmp_path):
    cfg, _ = world
    import dataclasses
    a = synthetic.plan_world(cfg.synthetic, cfg.class_folders)
    b = synthetic.plan_world(cfg.synthetic, cfg.class_folders)
    c = synthetic.plan_world(dataclasses.replace(cfg.synthetic, seed=1), cfg.class_folders)
    assert [s.row for s in a[0]] == [s.row for s in b[0]] and a[1] == b[1]
    assert [s.row for s in a[0]] != [s.row for s in c[0]]
    truth = json.loads((Path(cfg.data.root) / "ground_truth.json").read_text())
    assert set(truth["sites"]) == set(a[1]) and set(truth["classes"]) == set(cfg.synthetic.classes)
    assert np.allclose(np.linalg.norm(truth["sites"]["NA"]["od_matrix"], axis=1), 1, atol=1e-5)


def simple_features(tiles: np.ndarray) -> np.ndarray:
    """Per-channel mean, spread, optical density and quantiles: what a shortcut-prone model sees first."""
    x = tiles.astype(np.float32) / 255
    od = -np.log(np.clip(x, 1 / 255, 1))
    q = np.quantile(x.reshape(len(x), -1, 3), [0.1, 0.5, 0.9], axis=1).transpose(1, 0, 2).reshape(len(x), -1)
    return np.concatenate([x.mean((1, 2)), x.std((1, 2)), od.mean((1, 2)), q], axis=1)


def test_site_is_a_shortcut(world):
    """A linear model trained on one TSS per class is near-perfect on held-out tiles of those TSS and clearly
    worse on unseen TSS; trained on many TSS, the same model generalises to unseen TSS far better."""
    cfg, _ = world
    index = artifacts.load_index(cfg.data.output)
    feats = simple_features(np.asarray(artifacts.load_tiles(cfg.data.output)))
    y = index["class"].to_numpy()
    fit = lambda rows: make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, class_weight="balanced")).fit(feats[rows], y[rows])
    score = lambda model, rows: balanced_accuracy_score(y[rows], model.predict(feats[rows]))

    rng = np.random.default_rng(0)
    one_site = index.groupby("class").tss.agg(lambda s: s.value_counts().index[0])
    at = index.tss.isin(one_site.values).to_numpy()
    rows = rng.permutation(np.flatnonzero(at))
    model = fit(rows[: int(0.7 * len(rows))])
    seen, unseen = score(model, rows[int(0.7 * len(rows)):]), score(model, np.flatnonzero(~at))
    print(f"\nshortcut: trained on one TSS per class: held-out tiles of the training TSS {seen:.3f}, unseen TSS {unseen:.3f}")
    assert seen >= 0.9 and unseen <= seen - 0.3

    sites = index.drop_duplicates("tss")
    train_sites = set(sites.groupby("class").tss.apply(lambda s: s.iloc[: max(1, int(0.6 * len(s)))].tolist()).sum())
    many = index.tss.isin(train_sites).to_numpy()
    generalist = score(fit(np.flatnonzero(many)), np.flatnonzero(~many))
    print(f"shortcut: trained on 60% of TSS per class: unseen TSS {generalist:.3f}")
    assert generalist >= unseen + 0.2
