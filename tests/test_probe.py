"""Embeddings (one preprocessing path, content-keyed cache) and the linear probe as an instrument: equal
synthetic budgets, slide-disjoint seen sites, validation / test sites, clustered intervals, computed verdicts."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medi import artifacts, clustered, embed, pools, probe, sampling
from medi.errors import MediError
from helpers import save_untrained, write_params


def test_a_real_jpeg_tile_and_its_pixels_as_a_generated_png_embed_identically(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "tile.jpg", quality=80)
    real = embed.load_image(tmp_path / "tile.jpg")                # what the JPEG decodes to
    Image.fromarray(real).save(tmp_path / "generated.png")          # the same pixels written as a sample would be
    generated = embed.load_image(tmp_path / "generated.png")
    spec = embed.resolve("random:resnet18", input_size=64)
    a = embed.embed(real[None], spec, progress=False)
    b = embed.embed(generated[None], spec, progress=False)
    assert a.shape == (1, 512) and np.array_equal(a, b)
    Image.fromarray(real).convert("L").save(tmp_path / "grey.png")
    with pytest.raises(MediError, match="grey.png: expected an RGB image, got mode L"):
        embed.load_image(tmp_path / "grey.png")


def test_embeddings_are_cached_by_encoder_and_content(tmp_path, caplog):
    images = np.random.default_rng(1).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    spec = embed.resolve("random:resnet18", input_size=32)
    first = embed.embed(images[:4], spec, str(tmp_path), progress=False)
    with caplog.at_level("INFO"):
        both = embed.embed(images, spec, str(tmp_path), progress=False)      # 4 cached, 2 new
    assert "6 images: 4 from the cache, 2 encoded" in caplog.text
    assert np.array_equal(both[:4], first)
    assert np.allclose(both, embed.embed(images, spec, progress=False), atol=1e-6)
    other = embed.resolve("random:resnet18", input_size=32, seed=1)           # another encoder: its own cache
    assert not np.allclose(embed.embed(images, other, str(tmp_path), progress=False), both)
    assert len(list(tmp_path.glob("*/shard-*.npz"))) == 3


def test_presets_are_timm_architectures_and_need_their_weights():
    import timm

    for name, preset in embed.PRESETS.items():
        assert timm.is_model(preset["architecture"]), name
        with pytest.raises(MediError, match=f"encoder '{name}' needs a local weights file"):
            embed.resolve(name)
    with pytest.raises(MediError, match="weights file /nowhere.bin not found"):
        embed.resolve("uni", weights="/nowhere.bin")



def toy_task(shortcut: float = 3.0, seed: int = 0, pool: int = 40, sites: int = 2, holdout: int = 1) -> probe.TaskData:
    """Two classes with `sites` training sites each (four slides of ten tiles per site) and `holdout` validation
    (v*) and test (t*) sites each; a site's stain direction adds +-`shortcut` to one feature and the class signal
    is weak, so a classifier trained on one site per class learns the site."""
    rng = np.random.default_rng(seed)
    classes = ["A", "B"]
    train_sites = {"A": [f"a{i + 1}" for i in range(sites)], "B": [f"b{i + 1}" for i in range(sites)]}
    sign = {t: (1 if i % 2 == 0 else -1) * (1 if c == "A" else -1) for c, ts in train_sites.items() for i, t in enumerate(ts)}
    for part in "vt":
        for i in range(holdout):
            sign[f"{part}a{i}"], sign[f"{part}b{i}"] = (-1, 1) if i % 2 == 0 else (1, -1)

    def tiles(c, t, n):
        x = rng.normal(0, 1, (n, 6))
        x[:, 0] += 0.8 * (1 if c == "A" else -1)          # the class
        x[:, 1] += shortcut * sign[t]                      # the site
        return x

    every = train_sites["A"] + train_sites["B"]
    real = {(c, t): tiles(c, t, 40) for c in classes for t in train_sites[c]}
    slides = {(c, t): np.repeat([f"{t}-s{i}" for i in range(4)], 10) for c in classes for t in train_sites[c]}
    pools = {"cls": [{(c, None): tiles(c, train_sites[c][0], pool) for c in classes}],
             "medi": [{(c, t): tiles(c, t, pool) for c in classes for t in every}]}

    def evalset(part):
        pairs = [(c, f"{part}{c.lower()}{i}") for i in range(holdout) for c in classes]
        x, y, site = [], [], []
        for i, (c, t) in enumerate(pairs):
            x.append(tiles(c, t, 30))
            y += [classes.index(c)] * 30
            site += [i] * 30
        return probe.EvalSet(np.concatenate(x), np.array(y), np.array(site), [t for _, t in pairs],
                             np.array([classes.index(c) for c, _ in pairs]))

    evals = {"validation": evalset("v"), "test": evalset("t")}
    return probe.TaskData(classes, probe.combinations([train_sites["A"], train_sites["B"]], 0, 0),
                          [train_sites["A"], train_sites["B"]], real, slides, pools, evals, every)


def settings(make_cfg, **overrides) -> probe.ProbeConfig:
    base = {"probe__real_per_class": 20, "probe__ratio": 1.0, "probe__workers": 1, "probe__bootstrap": 200}
    return make_cfg(**{**base, **overrides}).probe


ALL_ARMS = [probe.Arm("real"), probe.Arm("cls")] + [probe.Arm("medi", s) for s in probe.STRATEGIES]


def test_every_arm_adds_the_same_number_of_distinct_images_per_class():
    """Problem 1: every arm adds n = ratio x real_per_class tiles per class, all distinct (never one image twice
    in a run), for CLS, real tiles and MeDi under every strategy; a pool too small for a run is an error."""
    task = toy_task()
    for ratio, n in ((1.0, 20), (2.0, 40), (0.5, 10)):
        for run, combo in enumerate(task.combos):
            picks, _ = probe.real_draws(task, combo, 20, np.random.default_rng([run, 0]))
            for arm in ALL_ARMS:
                x, y, drawn = probe.training_set(task, combo, picks, arm, n, np.random.default_rng([run, arm.code]))
                assert len(x) == len(y) == 40 + 2 * n and (np.bincount(y) == 20 + n).all(), (arm, ratio)
                assert drawn.distinct_per_class(task.classes) == {"A": n, "B": n}, (arm, ratio)
                assert all(len(np.unique(rows)) == len(rows) for rows in drawn.rows.values())
                assert len(np.unique(x, axis=0)) == len(x)              # not one row of the training set repeated
    picks, _ = probe.real_draws(task, ("a1", "b1"), 20, np.random.default_rng(0))
    small = toy_task(pool=15)
    with pytest.raises(MediError, match=r"the pool of cls \('A', None\) holds 15 images, a run asks for 20"):
        probe.training_set(small, ("a1", "b1"), picks, probe.Arm("cls"), 20, np.random.default_rng(0))


def test_the_real_arm_is_left_out_where_a_class_has_no_other_training_site(make_cfg):
    task = toy_task()
    assert probe.unavailable(task, ["none", "real", "cls"], 20) == {}
    del task.real[("A", "a2")]
    task.candidates[0] = ["a1"]
    task.combos = [("a1", "b1"), ("a1", "b2")]
    assert probe.unavailable(task, ["none", "real", "cls"], 20) == {
        "real": "class A has 0 training tiles outside site a1; the arm needs 20 per class"}
    assert probe.unavailable(task, ["none", "cls"], 20) == {}


def test_pool_size_covers_the_largest_ask_and_exceeds_it_by_pool_per_pair(make_cfg):
    assert probe.pool_size(settings(make_cfg, probe__pool_per_pair=40)) == 40
    assert probe.pool_size(settings(make_cfg, probe__pool_per_pair=40, probe__ratio=3.0)) == 60   # grown, not reused
    task = toy_task()
    for arm in ALL_ARMS[1:]:                                       # no key is ever asked for more than n
        for seed in range(20):
            alloc = probe.allocation(task, ("a1", "b1"), 20, arm, 20, np.random.default_rng(seed))
            assert max(m for _, m in alloc) <= 20


def test_the_expected_overlap_of_two_runs_follows_from_their_draws():
    def run(generator, keys):
        return probe.RunResult(generator, {}, {}, {"x": {"keys": keys}})

    same = [run(0, {("A", None): 20}), run(0, {("A", None): 20})]
    assert probe.expected_overlap(same, "x", 40, 20) == 0.5              # 20 x 20 / 40 = 10 shared of 20
    spread = [run(0, {("A", "a1"): 10, ("A", "b1"): 10}), run(0, {("A", "a1"): 10, ("A", "b2"): 10})]
    assert probe.expected_overlap(spread, "x", 40, 20) == 0.125          # only a1 shared: 10 x 10 / 40 = 2.5
    other_generator = [run(0, {("A", None): 20}), run(1, {("A", None): 20})]
    assert probe.expected_overlap(other_generator, "x", 40, 20) == 0.0
    assert probe.expected_overlap(same[:1], "x", 40, 20) is None


def test_strategies_spread_synthetic_tiles_over_pairs_as_documented():
    task = toy_task()
    combo = ("a1", "b1")

    def alloc(strategy, n, seed=0):
        out: dict = {}
        for key, k in probe.allocation(task, combo, 20, probe.Arm("medi", strategy), n, np.random.default_rng(seed)):
            out[key] = out.get(key, 0) + k
        return out

    assert alloc("grid", 20) == {("A", "a1"): 10, ("A", "b1"): 10, ("B", "a1"): 10, ("B", "b1"): 10}
    assert alloc("unseen", 20) == {("A", "b1"): 20, ("B", "a1"): 20}
    assert alloc("balanced", 20) == {("A", "b1"): 20, ("B", "a1"): 20}       # the empty pairs fill first
    assert alloc("balanced", 30) == {("A", "a1"): 5, ("A", "b1"): 25, ("B", "a1"): 25, ("B", "b1"): 5}
    assert sum(v for (c, _), v in alloc("balanced", 21).items() if c == "A") == 21
    uniform = alloc("uniform", 200)
    for c in "AB":                                                  # n per class, over all four task sites
        assert sum(k for (cls, _), k in uniform.items() if cls == c) == 200
        assert {t for (cls, t) in uniform if cls == c} == {"a1", "a2", "b1", "b2"}
    assert dict(probe.allocation(task, combo, 20, probe.Arm("cls"), 20, np.random.default_rng(0))) == {
        ("A", None): 20, ("B", None): 20}                           # CLS knows no sites
    with pytest.raises(MediError, match="unknown probe strategy 'diagonal'"):
        alloc("diagonal", 4)


def test_seen_site_tiles_never_share_a_slide_with_the_training_draw():
    """Problem 5: the seen-site test takes other slides of the chosen site than those the 20 tiles came from."""
    task = toy_task()
    for run in range(50):
        combo = task.combos[run % len(task.combos)]
        picks, rest = probe.real_draws(task, combo, 20, np.random.default_rng(run))
        for c, t, pick, other in zip(task.classes, combo, picks, rest):
            slides = task.slides[(c, t)]
            assert len(pick) == 20 and len(np.unique(pick)) == 20
            assert not set(slides[pick]) & set(slides[other])
            assert len(other) == 20                  # 4 slides of 10 tiles: 2 train (>= half the tiles), 2 test
    one_slide = toy_task()
    one_slide.slides[("A", "a1")] = np.full(40, "only")
    _, rest = probe.real_draws(one_slide, ("a1", "b1"), 20, np.random.default_rng(0))
    assert len(rest[0]) == 0 and len(rest[1]) == 20   # a single-slide site has no seen-site test


def hand_counts():
    """Two runs, three test sites (A: s0, s1; B: s2) of 10 tiles, predicted counts per class (A, B)."""
    counts = np.array([[[8, 2], [6, 4], [3, 7]],
                       [[10, 0], [4, 6], [5, 5]]])
    return counts, np.array([0, 0, 1])


def test_metrics_from_site_counts_match_scikit_learn_and_hand_values():
    from sklearn.metrics import balanced_accuracy_score, matthews_corrcoef

    counts, site_class = hand_counts()
    per = clustered.point(counts, site_class)
    # TSS-avg: run 0 (0.8 + 0.6 + 0.7) / 3 = 0.7, run 1 (1.0 + 0.4 + 0.5) / 3 = 0.6333; worst 0.6 and 0.4
    assert np.allclose(per["tss_avg"], [0.7, 0.63333333]) and np.allclose(per["worst_tss"], [0.6, 0.4])
    for r in range(2):
        y_true = np.concatenate([np.full(10, site_class[s]) for s in range(3)])
        y_pred = np.concatenate([np.repeat([0, 1], counts[r, s]) for s in range(3)])
        assert np.isclose(per["overall"][r], balanced_accuracy_score(y_true, y_pred))
        assert np.isclose(per["mcc"][r], matthews_corrcoef(y_true, y_pred))
    assert np.isclose(per["overall"][0], (14 / 20 + 7 / 10) / 2)     # recall A 14/20, B 7/10
    design = clustered.Design(site_class, np.array([[0, 2], [1, 2]]), np.array([0, 0, 1]), 2)
    out = clustered.summarise({"x": counts, "y": counts}, design, [("x", "y")], 200, 0)
    x = out["arms"]["x"]
    assert np.isclose(x["tss_avg"], 0.66666667) and x["runs"] == 2
    assert np.isclose(x["tss_avg_sem"], np.std([0.7, 0.63333333], ddof=1) / np.sqrt(2))
    assert x["tss_avg_lo"] <= x["tss_avg"] <= x["tss_avg_hi"]
    # seen-site accuracy per run, NaN where a run has no other slides of its training sites
    seen = clustered.summarise({"x": counts, "y": counts}, design, [("x", "y")], 200, 0,
                               extra={"x": np.array([0.9, np.nan]), "y": np.array([0.5, 0.7])})["arms"]
    assert (seen["x"]["seen_sites"], seen["x"]["seen_sites_runs"], seen["x"]["seen_sites_sem"]) == (0.9, 1, 0.0)
    # worlds that drop run 0 have no value for x (not 0): its interval is the one value it has
    assert (seen["x"]["seen_sites_lo"], seen["x"]["seen_sites_hi"]) == (0.9, 0.9)
    assert np.isclose(seen["y"]["seen_sites"], 0.6) and np.isclose(seen["y"]["seen_sites_sem"], 0.1)
    assert 0.5 <= seen["y"]["seen_sites_lo"] < seen["y"]["seen_sites_hi"] <= 0.7
    d = out["differences"]["x-y"]                                # identical arms: exactly 0 in every world
    assert (d["tss_avg"], d["tss_avg_lo"], d["tss_avg_hi"], d["verdict"]) == (0.0, 0.0, 0.0, "no difference shown")


def test_the_bootstrap_resamples_sites_within_class_and_weights_runs_by_their_sites():
    site_class = np.array([0, 0, 0, 1, 1])
    runs = np.array([[0, 3], [0, 4], [1, 3], [2, 4]])             # training sites 0-2 of class A, 3-4 of class B
    design = clustered.Design(np.array([0, 0, 1, 1]), runs, site_class, 2)
    run_w, site_w, train_w = design.resample(np.random.default_rng(0), 500)
    assert (train_w[:, :3].sum(1) == 3).all() and (train_w[:, 3:].sum(1) == 2).all()   # within class, same size
    assert (site_w[:, :2].sum(1) == 2).all() and (site_w[:, 2:].sum(1) == 2).all()
    assert np.array_equal(run_w, train_w[:, runs[:, 0]] * train_w[:, runs[:, 1]])        # a run: its sites' product
    better = np.array([[[9, 1], [9, 1], [1, 9], [1, 9]]] * 4)     # better than `worse` at every site in every run
    worse = np.array([[[6, 4], [5, 5], [4, 6], [5, 5]]] * 4)
    out = clustered.summarise({"b": better, "w": worse}, design, [("b", "w")], 500, 0)
    assert out["differences"]["b-w"]["verdict"] == "better" and out["differences"]["b-w"]["tss_avg_lo"] > 0
    assert clustered.verdict(-0.2, -0.01) == "worse" and clustered.verdict(-0.1, 0.1) == "no difference shown"


def test_verdicts_read_the_paired_differences():
    def d(*verdicts):
        return {f"medi-{o}": {"verdict": v} for o, v in zip(("cls", "none"), verdicts)}
    assert probe.task_verdict(d("better", "better")) == "MeDi beats cls and none"
    assert probe.task_verdict(d("no difference shown", "better")) == "MeDi beats none; no difference shown against cls"
    assert probe.task_verdict(d("worse", "better")) == "MeDi loses to cls (beats none)"
    assert probe.task_verdict(d("no difference shown", "no difference shown")) == \
        "no difference shown between MeDi and cls or none (tie)"


def test_the_table_says_why_medi_tuned_was_not_run():
    """A task without validation sites (a small real dataset): no tuned strategy, and probe.md says why instead of
    failing (found by the paper profile's smoke run: KeyError 'validation_tss_avg')."""
    tuned = probe.tuned_strategy({"nsclc": {"validation": {}}, "rcc": {"validation": {"strategies": {"grid": 0.7}}}},
                                 ["grid", "balanced"])
    assert tuned == {"strategy": None, "why": "a task has no validation sites"}
    design = {"real_per_class": 20, "extra_per_class": 20, "pool_size": 40, "bootstrap_worlds": 1000, "seed": 0,
              "classifier": "logistic regression", "generator_variance": "none"}
    text = probe.markdown_table({"encoder": "random:resnet18", "tasks": {}, "tuned_strategy": None},
                                {"tasks": {}, "tuned": tuned, "settings": {"strategy": "grid"}, "design": design})
    assert "medi_tuned: not run (a task has no validation sites)." in text


def test_medi_augmentation_breaks_the_site_shortcut_that_none_learns(make_cfg):
    task = toy_task(sites=4, holdout=4)
    p = settings(make_cfg, probe__ratio=2.0)
    arms = [probe.Arm("none"), probe.Arm("cls"), probe.Arm("medi", "grid")]
    runs = probe.run_task(task, arms, p, 0)
    out = probe.summarise_part(task, runs, {"none": "none", "cls": "cls", "medi": "medi@grid"}, "test", p, 500)
    none, medi = out["arms"]["none"], out["arms"]["medi"]
    assert none["seen_sites"] > 0.85 and none["tss_avg"] < 0.6         # the shortcut: right at home, wrong elsewhere
    assert medi["tss_avg"] > none["tss_avg"] + 0.15 and medi["worst_tss"] > none["worst_tss"]
    assert out["differences"]["medi-none"]["verdict"] == "better" and none["runs"] == 16
    assert out["design"]["test_sites_per_class"] == {"A": 4, "B": 4} and out["design"]["test_tiles"] == 240


def test_the_probe_stage_scores_test_sites_and_chooses_on_validation_sites(tiny_world, caplog):
    cfg = tiny_world()
    for name in ("cls", "medi"):
        save_untrained(cfg, name, seed=len(name))
    result = probe.run_stage(cfg)
    on_disk = json.loads(Path(cfg.probe.metrics).read_text())
    assert on_disk == result and on_disk["split"] == "test"
    assert on_disk["encoder"].startswith("random:resnet18") and "offline default" in on_disk["encoder"]
    assert set(on_disk["tasks"]) == {"nsclc", "rcc", "uterine"}
    # the headline (`dvc metrics show`): one file per task, TSS-avg per method and medi-cls with its interval
    (Path(cfg.probe.headline) / "gone.json").write_text("{}")             # a task of an earlier run: removed
    probe.write_headline(cfg.probe.headline, on_disk)
    rows = {p.stem: json.loads(p.read_text()) for p in Path(cfg.probe.headline).glob("*.json")}
    assert set(rows) == {"nsclc", "rcc", "uterine"}
    for task, row in rows.items():
        t, d = on_disk["tasks"][task], on_disk["tasks"][task]["differences"]["medi-cls"]
        assert row == {**{arm: t[arm]["tss_avg"] for arm in ("none", "real", "cls", "medi")}, "medi-cls": d["tss_avg"],
                       "medi-cls_lo": d["tss_avg_lo"], "medi-cls_hi": d["tss_avg_hi"]}
    detail = json.loads(Path(cfg.probe.detail).read_text())
    holdout = pd.read_parquet(Path(cfg.split.output) / "holdout.parquet")
    tuned = detail["tuned"]["strategy"]
    assert tuned in probe.STRATEGIES and on_disk["tuned_strategy"] == tuned
    assert tuned == max(detail["tuned"]["validation_tss_avg"], key=detail["tuned"]["validation_tss_avg"].get)
    for task, t in on_disk["tasks"].items():
        assert set(t) == {"none", "real", "cls", "medi", "medi_tuned", "differences", "verdict"}
        for m in (v for k, v in t.items() if k not in ("differences", "verdict")):
            assert {"overall", "overall_sem", "overall_lo", "overall_hi", "tss_avg", "tss_avg_sem", "tss_avg_lo",
                    "tss_avg_hi", "mcc", "worst_tss", "runs"} <= set(m)
            assert m["tss_avg_lo"] <= m["tss_avg"] + 1e-9 and m["tss_avg"] <= m["tss_avg_hi"] + 1e-9
        assert {"medi-cls", "medi-none", "cls-none", "real-none"} <= set(t["differences"])
        assert t["verdict"] == probe.task_verdict(t["differences"])
        classes = cfg.probe.tasks[task]
        test = holdout[(holdout["part"] == "test") & holdout["class"].isin(classes)]
        assert detail["tasks"][task]["test"]["design"]["test_tiles"] == len(test)
        assert detail["tasks"][task]["validation"]["design"]["validation_tiles"] == \
            ((holdout["part"] == "validation") & holdout["class"].isin(classes)).sum()
        n = probe.extra_per_class(cfg.probe)
        for arm, draws in detail["tasks"][task]["draws"].items():
            assert set(draws["distinct_per_class"].values()) == {n}, arm
    table = Path(cfg.probe.table).read_text()
    assert "| nsclc | medi |" in table and f"- nsclc: {on_disk['tasks']['nsclc']['verdict']}" in table
    assert "Generator variance: not in the intervals" in table and Path(cfg.probe.figure).stat().st_size > 10_000
    size = probe.pool_size(cfg.probe)
    for name in ("cls", "medi"):                                     # every pool key holds the pool size
        manifest = artifacts.read_manifest(Path(cfg.sample.output.format(model=f"probe/{name}")) / "manifest.csv")
        assert (manifest.groupby("pool_key").size() >= size).all() and (manifest["strategy"] == "probe-pool").all()
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    (run,) = [r for r in runs if r.data.tags["medi.stage"] == "probe"]
    assert run.data.tags["verdict.nsclc"] == on_disk["tasks"]["nsclc"]["verdict"]
    assert run.data.metrics["nsclc_medi_tss_avg_lo"] == on_disk["tasks"]["nsclc"]["medi"]["tss_avg_lo"]
    with caplog.at_level("INFO"):
        again = probe.run_stage(cfg)                                # pools and embeddings reused
    assert again == result and "generating" not in caplog.text and "0 encoded" in caplog.text


def test_choices_read_validation_sites_only(make_cfg):
    """The tuned strategy and every validation figure stay the same whatever the test tiles hold."""
    task = toy_task()
    p = settings(make_cfg)
    ctx_parts = ("validation",)
    arms = probe.arms_of(p, ["none", "medi"], ("medi",), probe.STRATEGIES)
    a = probe.run_task(task, arms, p, 0)
    poisoned = toy_task()
    poisoned.eval["test"] = probe.EvalSet(np.full_like(task.eval["test"].x, np.nan), task.eval["test"].y,
                                          task.eval["test"].site, task.eval["test"].sites, task.eval["test"].site_class)
    del poisoned.eval["test"]                                       # what build_task does for parts=("validation",)
    b = probe.run_task(poisoned, arms, p, 0)
    for ra, rb in zip(a, b):
        assert set(rb.counts["medi@grid"]) == set(ctx_parts)
        for arm in rb.counts:
            assert np.array_equal(ra.counts[arm]["validation"], rb.counts[arm]["validation"])


def test_pools_grow_on_demand_and_keep_their_images(tiny_world, caplog):
    cfg = tiny_world()
    save_untrained(cfg, "medi", seed=4)
    train = pd.read_parquet(Path(cfg.split.output) / "train.parquet")
    model_dir, out = Path(cfg.model.output) / "medi", Path("pool")
    keys = [("LUAD", str(train[train["class"] == "LUAD"]["tss"].iloc[0])), ("LUSC", None)][:1]
    small = pools.ensure(cfg, model_dir, keys, 2, out, train)
    first = artifacts.load_images(out, small)
    with caplog.at_level("INFO"):
        big = pools.ensure(cfg, model_dir, keys, 5, out, train)
    assert "generating 3 images" in caplog.text                     # only the missing ones
    assert list(big["i"]) == [0, 1, 2, 3, 4] and np.array_equal(artifacts.load_images(out, big)[:2], first)
    assert list(big["seed"][:2]) == list(small["seed"])              # image i of a pair keeps its seed
    regenerated = sampling.regenerate(artifacts.read_manifest(out / "manifest.csv"),
                                    __import__("medi.model", fromlist=["MediDiffusion"]).MediDiffusion.load(model_dir),
                                    cfg.model)
    assert np.array_equal(regenerated, artifacts.load_images(out, artifacts.read_manifest(out / "manifest.csv")))
    save_untrained(cfg, "medi", seed=5)                              # other weights: the pool starts afresh
    caplog.clear()
    with caplog.at_level("INFO"):
        pools.ensure(cfg, model_dir, keys, 2, out, train)
    assert "starting afresh" in caplog.text and len(artifacts.read_manifest(out / "manifest.csv")) == 2


def test_a_pool_starts_from_its_models_sample_set_and_generates_only_what_that_set_lacks(tiny_world, caplog):
    """The sample stage's set of the same weights and sampler is copied into the pool, batches and all: its images of
    a pair are the pair's first pool images (same seeds, same pixels), only the rest is generated, and the pool still
    replays bit for bit. Under another sampler there is nothing to start from."""
    from medi import config, sample
    from medi.model import MediDiffusion

    cfg = tiny_world()
    save_untrained(cfg, "medi", seed=4)
    sample.run_stage(cfg, "medi")
    train = artifacts.train_frame(cfg)
    theirs_dir = Path(cfg.sample.output.format(model="medi"))
    theirs = artifacts.read_manifest(theirs_dir / "manifest.csv")
    per_pair = theirs.groupby(["class", "tss"]).size()
    (c, t), n = per_pair.idxmax(), int(per_pair.max())
    other_site = str(train[train["class"] != c]["tss"].iloc[0])           # a pair the set cannot have
    keys = [(c, t), (c, other_site)]
    model_dir, out = Path(cfg.model.output) / "medi", Path("pool")
    with caplog.at_level("INFO"):
        rows = pools.ensure(cfg, model_dir, keys, n + 2, out, train)
    assert f"starts from the {len(theirs)} images of {theirs_dir}" in caplog.text
    assert f"generating {2 + n + 2} images" in caplog.text                # 2 more of the seen pair, all of the other
    assert len(rows) == 2 * (n + 2) and list(rows["i"]) == [*range(n + 2)] * 2
    first, own = rows.iloc[:n], theirs[(theirs["class"] == c) & (theirs["tss"] == t)]
    assert list(first["seed"]) == list(own["seed"])
    assert np.array_equal(artifacts.load_images(out, first), artifacts.load_images(theirs_dir, own))
    whole = artifacts.read_manifest(out / "manifest.csv")
    assert np.array_equal(sampling.regenerate(whole, MediDiffusion.load(model_dir), cfg.model),
                          artifacts.load_images(out, whole))
    assert pools.read_json(out / pools.INFO)["starts_from"]["set"] == str(theirs_dir)
    from medi import fidelity                                          # the fid stage's features of the set: the
    fidelity.Extractor.from_config(cfg.fid.encoder).cached_features(   # pool's copies are read back, not encoded
        artifacts.load_images(theirs_dir, theirs), cfg.fid.cache, verbose=False)
    caplog.clear()
    with caplog.at_level("INFO"):
        shared = config.override(cfg, {"encoder.cache": cfg.fid.cache})      # one cache root, as in params.yaml
        pools.embedded(shared, model_dir, keys, n + 2, out, train, embed.spec_of(shared.encoder))
    assert f"features of {2 * (n + 2)} images: {n} from the cache, {n + 4} encoded" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        other = pools.ensure(config.override(cfg, {"sample.guidance": 2.0}), model_dir, keys, 2, Path("pool2"), train)
    assert "starts from" not in caplog.text and "generating 4 images" in caplog.text and len(other) == 4


def test_a_preset_loads_a_local_state_dict_of_its_architecture(tmp_path):
    """Phikon's timm architecture (ViT-B/16), randomly initialised, stands in for the real weights file."""
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(3)
    net = timm.create_model(embed.PRESETS["phikon"]["architecture"], pretrained=False, num_classes=1000,
                            **embed.PRESETS["phikon"]["kwargs"])
    save_file(net.state_dict(), str(tmp_path / "phikon.safetensors"))   # with a head, as published checkpoints are
    spec = embed.resolve("phikon", weights=str(tmp_path / "phikon.safetensors"))
    loaded = embed.build(spec)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    out = embed.embed(images, spec, model=loaded, progress=False)
    net.reset_classifier(0)
    with torch.no_grad():
        ref = net.eval()(embed.preprocess(torch.from_numpy(images), spec)).numpy()
    assert out.shape == (2, 768) and np.allclose(out, ref, atol=1e-5)
    assert "phikon (vit_base_patch16_224, 224 px, weights phikon.safetensors)" == spec.describe()


def test_runs_spread_over_generator_seeds_and_their_variance_enters_the_intervals(tiny_world, tmp_path):
    from medi import cli, config

    cfg = tiny_world(probe__generator_seeds=[1], probe__tuned_strategies=[])
    for name in ("cls", "medi"):
        save_untrained(cfg, name, seed=len(name))
    params = write_params(cfg, tmp_path / "params.yaml")
    with pytest.raises(MediError, match=r"models/cls-seed1 not found; train it with `medi train --model cls --seed 1`"):
        probe.prepare(cfg)
    assert cli.main(["--params", str(params), "train", "--model", "cls", "--seed", "1"]) == 0
    trained = json.loads((Path(cfg.model.output) / "cls-seed1/config.json").read_text())
    assert trained["name"] == "cls-seed1" and Path(cfg.train.metrics.format(model="cls-seed1")).exists()
    gcfg, alias = config.with_generator(cfg, "medi", 1)
    assert alias == "medi-seed1" and gcfg.train.seed == 1 and gcfg.variant(alias) == cfg.variant("medi")
    save_untrained(gcfg, alias, seed=9)
    result = probe.run_stage(cfg)
    detail = json.loads(Path(cfg.probe.detail).read_text())
    assert detail["design"]["generators_per_method"] == 2
    assert detail["design"]["generator_variance"].startswith("in the intervals")
    assert "in the intervals: runs spread over 2 trained generators" in Path(cfg.probe.table).read_text()
    for name in ("cls", "cls-seed1", "medi", "medi-seed1"):
        assert (Path(cfg.sample.output.format(model=f"probe/{name}")) / "manifest.csv").exists()
    assert result["tasks"]["nsclc"]["medi"]["runs"] == 4
    # the bootstrap resamples generators: run weights carry their generator's multiplicity
    design = clustered.Design(np.array([0, 1]), np.array([[0, 1]] * 4), np.array([0, 1]), 2, np.array([0, 1, 0, 1]), 2)
    run_w, _, _ = design.resample(np.random.default_rng(0), 300)
    assert set(np.unique(run_w[:, 0] + run_w[:, 1])) == {2.0} and {0.0, 2.0} <= set(np.unique(run_w[:, 0]))
