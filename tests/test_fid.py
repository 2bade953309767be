"""Fidelity: FID sanity, the feature extractors (offline default, timm weights, Inception weights), groups
below the minimum count, conditioning accuracy, the fid and report stages, and the training FID curve."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import save_untrained, train_index
from medi import artifacts, embed, fid, fidelity, report, sample, sampling, train, unseen
from medi.errors import MediError
from medi.groundtruth import GroundTruth
from medi.model import MediDiffusion


def real_tiles(cfg) -> np.ndarray:
    return np.asarray(artifacts.load_tiles(cfg.data.output))


def test_fid_sanity_real_halves_near_zero_and_noise_large(tiny_world):
    cfg = tiny_world()
    tiles = real_tiles(cfg)
    scores = fidelity.real_halves(cfg.fid, tiles)
    assert scores["noise"] > 0
    assert scores["halves"] < 0.05 * scores["noise"], scores
    assert abs(scores["kid_halves"]) < 0.05 * scores["kid_noise"], scores


def test_kid_of_two_whole_sets_is_computed_once_and_equals_the_mean_over_every_subset(make_cfg, monkeypatch):
    """Where the subset size is both sets whole (a fid group: as many generated as real images, under
    kid_subset_size), each of torch-fidelity's kid_subsets subsets is the same two sets: one subset gives the value;
    sets of other sizes still draw every subset."""
    from torch_fidelity import metric_kid

    cfg = make_cfg(fid__kid_subsets=50, fid__kid_subset_size=1000)
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(n, 16, generator=g, dtype=torch.float64) + shift for n, shift in ((40, 0.0), (40, 0.3), (60, 0.3)))
    full = metric_kid.kid_features_to_metric(a, b, kid_subsets=50, kid_subset_size=40, rng_seed=0, verbose=False)
    calls, real = [], metric_kid.kid_features_to_metric
    monkeypatch.setattr(metric_kid, "kid_features_to_metric", lambda *x, **k: calls.append(k["kid_subsets"]) or real(*x, **k))
    assert fidelity.kid(a, b, cfg.fid) == pytest.approx(full[metric_kid.KEY_METRIC_KID_MEAN], rel=1e-12, abs=1e-15)
    fidelity.kid(a, c, cfg.fid)                                  # 40 vs 60: subsets of c differ
    assert calls == [1, 50]


def test_timm_extractor_loads_a_local_state_dict_and_rejects_a_foreign_one(tmp_path, make_cfg):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(5)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    save_file(net.state_dict(), str(tmp_path / "r18.safetensors"))
    cfg = make_cfg(fid__extractor="timm:resnet18", fid__weights=str(tmp_path / "r18.safetensors"), fid__input_size=32)
    loaded = fidelity.Extractor.from_config(cfg.fid.encoder)
    random5 = fidelity.Extractor.from_config(dataclasses.replace(cfg.fid.encoder, name="random:resnet18", seed=5))
    random6 = fidelity.Extractor.from_config(dataclasses.replace(cfg.fid.encoder, name="random:resnet18", seed=6))
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    feats = loaded.features(images, verbose=False)
    assert feats.shape == (6, 512)
    assert torch.allclose(feats, random5.features(images, verbose=False))    # same weights, same features
    assert not torch.allclose(feats, random6.features(images, verbose=False))
    assert "offline default" in random5.description and "offline default" not in loaded.description

    torch.save(timm.create_model("resnet34", num_classes=0).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(MediError, match="do not fit timm resnet18: missing"):
        fidelity.Extractor.from_config(dataclasses.replace(cfg.fid.encoder, weights=str(tmp_path / "r34.pth")))
    with pytest.raises(MediError, match="needs a local weights file"):
        fidelity.Extractor.from_config(dataclasses.replace(cfg.fid.encoder, name="uni", weights=""))
    with pytest.raises(MediError, match="not a timm architecture"):
        fidelity.Extractor.from_config(dataclasses.replace(cfg.fid.encoder, name="random:no_such_net"))


def test_one_preprocessing_for_hwc_and_chw_tiles():
    spec = embed.resolve("random:resnet18", input_size=24)
    hwc = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8))
    a, b = embed.preprocess(hwc, spec), embed.preprocess(hwc.permute(0, 3, 1, 2).contiguous(), spec)
    assert a.shape == (2, 3, 24, 24) and torch.equal(a, b)
    # and laid out alike (channels first): a channels-last tensor runs other kernels, whose sums differ in the last
    # bits on some CPUs (AVX2-only AMD EPYC), and the feature cache needs fid's and the probe's vectors equal
    assert a.is_contiguous() and a.stride() == b.stride()
    with pytest.raises(MediError, match="uint8"):
        embed.preprocess(hwc.float(), spec)


def test_inception_needs_its_weights_offline_and_loads_a_local_file(tmp_path, make_cfg, monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as inc

    cfg = make_cfg(fid__extractor="inception-v3-compat", fid__weights="")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MediError, match=f"put {fidelity.INCEPTION_FILE} .* at {tmp_path / 'torch'}/hub/checkpoints"):
        fidelity.Extractor.from_config(cfg.fid.encoder)
    with pytest.raises(MediError, match="fid.weights: /nowhere.pth not found"):
        fidelity.Extractor.from_config(dataclasses.replace(cfg.fid.encoder, weights="/nowhere.pth"))

    # a randomly initialised network of the same architecture stands in for the real weights file
    with monkeypatch.context() as m:
        m.setattr(inc, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    cache = tmp_path / "torch/hub/checkpoints"
    cache.mkdir(parents=True)
    torch.save(net.state_dict(), cache / fidelity.INCEPTION_FILE)
    ext = fidelity.Extractor.from_config(cfg.fid.encoder)                       # found in the torch hub cache
    assert ext.name == "inception-v3-compat" and fidelity.INCEPTION_FILE in ext.description
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    assert ext.features(images, verbose=False).shape == (3, 2048)
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(MediError, match="cannot load Inception weights .*broken.pth"):
        fidelity.Extractor.from_config(dataclasses.replace(cfg.fid.encoder, weights=str(tmp_path / "broken.pth")))


def test_feature_cache_is_keyed_by_extractor_and_image_bytes(tmp_path, make_cfg, caplog):
    cfg = make_cfg(fid__input_size=32)
    ext = fidelity.Extractor.from_config(cfg.fid.encoder)
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    first = ext.cached_features(images, str(tmp_path / "c"), verbose=False)
    with caplog.at_level("INFO"):
        again = ext.cached_features(images, str(tmp_path / "c"), verbose=False)
    assert "from the cache" in caplog.text and torch.equal(first, again)
    changed = images.copy()
    changed[0, 0, 0, 0] ^= 1
    other = fidelity.Extractor.from_config(dataclasses.replace(cfg.fid.encoder, seed=1))
    caplog.clear()
    with caplog.at_level("INFO"):
        ext.cached_features(changed, str(tmp_path / "c"), verbose=False)       # one image changed: one encoded
        other.cached_features(images, str(tmp_path / "c"), verbose=False)      # another network: its own folder
    assert "features of 5 images: 4 from the cache, 1 encoded (random:resnet18)" in caplog.text
    assert "features of 5 images: 0 from the cache, 5 encoded (random:resnet18)" in caplog.text
    assert len(list((tmp_path / "c").iterdir())) == 2


def test_small_groups_are_flagged_with_their_n_not_reported(make_cfg):
    cfg = make_cfg(fid__min_count=10)
    g = torch.Generator().manual_seed(0)
    real, gen = torch.randn(60, 4, generator=g, dtype=torch.float64), torch.randn(33, 4, generator=g, dtype=torch.float64)
    real_groups = np.array(["a"] * 40 + ["b"] * 20)
    gen_groups = np.array(["a"] * 25 + ["b"] * 5 + ["c"] * 3)
    out = fidelity.group_scores(real, real_groups, gen, gen_groups, cfg.fid)
    assert set(out["fid"]) == {"a"} and set(out["kid"]) == {"a"}
    assert out["below_min_count"]["b"]["generated"] == 5 and "fid" in out["below_min_count"]["b"]
    assert out["below_min_count"]["c"] == {"real": 0, "generated": 3}
    assert out["n"]["a"] == {"real": 40, "generated": 25}


def test_conditioning_accuracy_tells_right_from_wrong_conditions():
    """Sites far apart in feature space (every classifier separates them): accuracies are exactly 1 or 0."""
    rng = np.random.default_rng(0)
    sites = {"s1": "A", "s2": "A", "s3": "B", "s4": "B"}
    centres = {s: 50.0 * np.eye(8)[i] for i, s in enumerate(sites)}
    rows = [(f"{s}-{k // 5}", sites[s], s) for s in sites for k in range(30)]
    index = pd.DataFrame(rows, columns=["slide", "class", "tss"])
    real = np.stack([centres[s] + rng.normal(0, 1, 8) for s in index["tss"]])
    gen_rows = pd.DataFrame([(sites[s], s) for s in sites for _ in range(10)], columns=["class", "tss"])
    gen = np.stack([centres[s] + rng.normal(0, 1, 8) for s in gen_rows["tss"]])
    good = fidelity.conditioning_accuracy(real, index, gen, gen_rows, True, seed=0)
    assert {k: v for k, v in good.items() if k != "classifier"} == {
        "site_conditioned": True, "class_accuracy": 1.0, "class_accuracy_real_cv": 1.0, "class_chance": 0.5,
        "class_accuracy_per_class": {"A": 1.0, "B": 1.0}, "site_accuracy": 1.0, "site_accuracy_real_cv": 1.0,
        "site_chance": 0.25, "site_accuracy_per_class": {"A": 1.0, "B": 1.0}, "site_accuracy_seen_pairs": 1.0,
        "seen_pairs_images": 40, "site_accuracy_unseen_pairs": None, "unseen_pairs_images": 0,
        "class_accuracy_seen_pairs": 1.0, "class_accuracy_unseen_pairs": None}
    # the images of s1 asked for as s3 (a site of the other class): the class is right, every site wrong
    wrong = gen_rows.assign(tss=gen_rows["tss"].map({"s1": "s3", "s2": "s4", "s3": "s1", "s4": "s2"}))
    bad = fidelity.conditioning_accuracy(real, index, gen, wrong, True, seed=0)
    assert (bad["class_accuracy"], bad["site_accuracy"], bad["site_accuracy_per_class"]) == (1.0, 0.0, {"A": 0.0, "B": 0.0})
    assert (bad["seen_pairs_images"], bad["unseen_pairs_images"], bad["site_accuracy_unseen_pairs"]) == (0, 40, 0.0)
    assert (bad["class_accuracy_unseen_pairs"], bad["class_accuracy_seen_pairs"]) == (1.0, None)
    # the classifiers fitted once and passed in give the same figures
    once = fidelity.condition_classifiers(real, index, seed=0)
    assert fidelity.conditioning_accuracy(real, index, gen, wrong, True, seed=0, classifiers=once) == bad


def test_condition_classifiers_are_fitted_once_per_real_features_and_labels(tmp_path, monkeypatch):
    """With a cache the second fid stage (another model, the same real tiles) loads the classifiers: the same
    predictions and ceilings to the bit, nothing fitted; other labels or features are fitted anew."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(1)
    index = pd.DataFrame({"slide": [f"sl{i // 2}" for i in range(60)], "class": ["A", "B", "C"] * 20,
                          "tss": [f"s{i % 6}" for i in range(60)]})
    real = rng.normal(size=(60, 12)).astype(np.float32) + (np.arange(60) % 3)[:, None]
    gen = rng.normal(size=(30, 12)).astype(np.float32) + (np.arange(30) % 3)[:, None]
    first = fidelity.condition_classifiers(real, index, seed=0, cache=tmp_path)
    (saved,) = (tmp_path / "classifiers").glob("*.npz")
    fits = []
    monkeypatch.setattr(LogisticRegression, "fit", lambda self, *a, **k: fits.append(1) or pytest.fail("refitted"))
    again = fidelity.condition_classifiers(real, index, seed=0, cache=tmp_path)
    assert fits == []
    for target in ("class", "tss"):
        assert again[target][1] == first[target][1]
        assert np.array_equal(again[target][0].predict(gen), first[target][0].predict(gen))
        assert np.array_equal(again[target][0].decision_function(gen), first[target][0].decision_function(gen))
    monkeypatch.undo()
    fidelity.condition_classifiers(real, index.assign(tss=index["tss"].str.upper()), seed=0, cache=tmp_path)
    fidelity.condition_classifiers(real + 1, index, seed=0, cache=tmp_path)
    assert len(list((tmp_path / "classifiers").glob("*.npz"))) == 3 and saved.exists()


def test_sample_fid_and_report_stages_write_the_contract(tiny_world):
    cfg = tiny_world(sample__guidance=2.0)      # guided: the detail and the page name the guidance's colour
    idx = train_index(cfg).sort_values("idx")
    real_classes = idx["class"].to_numpy(str)
    extractor = fidelity.Extractor.from_config(cfg.fid.encoder)
    real = extractor.features(real_tiles(cfg)[idx["idx"].to_numpy()], verbose=False)
    truth = GroundTruth.load(cfg.data.root)
    k = min(4, cfg.fid.stain_tiles)
    for name in ("cls", "medi"):
        save_untrained(cfg, name, seed=len(name))
        sample.run_stage(cfg, name)
        metrics = fid.run_stage(cfg, name)
        on_disk = json.loads(Path(cfg.fid.detail.format(model=name)).read_text())
        assert on_disk["extractor"].startswith("random:resnet18") and "offline default" in on_disk["extractor"]
        assert metrics["overall"] == on_disk["overall"]
        s = cfg.sample                      # the detail names every setting that made the images
        assert on_disk["sampling"] == {
            "strategy": s.strategy, "conditioned_on": "class,tss" if name == "medi" else "class", "scheduler": s.scheduler,
            "steps": s.steps, "guidance": s.guidance, "metadata_guidance": s.guidance, "precision": s.precision,
            "guidance_colour": s.guidance_colour, "colour_calibration": s.colour_calibration}
        # the metrics file: the contract's headline figures only (mean per class, per site, stain check, n per group,
        # settings: the detail)
        headline = json.loads(Path(cfg.fid.metrics.format(model=name)).read_text())
        assert headline == {"extractor": "random:resnet18", "overall": on_disk["overall"], "per_class": on_disk["per_class"],
                            "kid": on_disk["kid"], "n_real": len(idx), "n_generated": 42,
                            **{k: on_disk["conditioning"][k] for k in ("class_accuracy", "site_accuracy")},
                            **{f"pairs_{k}": v for k, v in on_disk["pairs"].items() if k.startswith("unseen_")}}
        assert on_disk["stain"]["summary"]["seen"]["rank_percentile"] is not None
        assert {"pairs_unseen_site_accuracy", "pairs_unseen_stain_rank", "pairs_unseen_class_accuracy"} <= set(headline)
        plot = pd.read_csv(cfg.fid.plot.format(model=name))
        assert plot["class"].tolist() == sorted(on_disk["n_per_class"]) and plot["reliable"].sum() == len(on_disk["per_class"])
        # every figure again from the files on disk: the PNGs against all real training tiles
        folder = Path(cfg.sample.output.format(model=name))
        manifest = artifacts.read_manifest(folder / artifacts.MANIFEST)
        gen = extractor.features(np.stack([np.asarray(Image.open(folder / p)) for p in manifest["path"]]), verbose=False)
        gen_classes = manifest["class"].to_numpy(str)
        assert (on_disk["n_real"], on_disk["n_generated"]) == (len(idx), 42)
        assert on_disk["overall"] == fidelity.frechet(real, gen)
        n = {c: {"real": int((real_classes == c).sum()), "generated": int((gen_classes == c).sum())}
             for c in sorted(set(real_classes) | set(gen_classes))}
        reported = [c for c in n if min(n[c].values()) >= cfg.fid.min_count]
        assert on_disk["n_per_class"] == n and sorted(on_disk["below_min_count"]["class"]) == sorted(set(n) - set(reported))
        assert on_disk["per_class"] == {c: fidelity.frechet(real[real_classes == c], gen[gen_classes == c]) for c in reported}
        assert on_disk["mean_class_fid"] == float(np.mean([on_disk["per_class"][c] for c in reported]))
        cond = on_disk["conditioning"]
        assert cond["site_conditioned"] == (name == "medi") and cond["class_chance"] == 1 / len(set(real_classes))
        per_class = cond["class_accuracy_per_class"]                    # the overall accuracy is their weighted mean
        assert cond["class_accuracy"] == pytest.approx(sum(per_class[c] * n[c]["generated"] for c in per_class) / 42)
        # the stain check scores each (class, site) group of >= 4 tiles at a site of the ground truth; the match
        # plan only has training pairs, so every cell is a pair seen in training
        groups = manifest.groupby(["class", "tss"]).size()
        cells = [(c, s) for (c, s), size in groups.items() if s in truth.stains and size >= k]
        real_cells = [(c, s) for c, s in cells if ((idx["class"] == c) & (idx["tss"] == s)).sum() >= k]
        assert all(truth.site_class[s] == c for c, s in cells)
        assert on_disk["stain"]["summary"]["seen"]["pairs"] == len(cells) and "unseen" not in on_disk["stain"]["summary"]
        assert on_disk["stain"]["real"]["pairs"] == len(real_cells)
        # the unseen-pairs evaluation: its unseen figures in the metrics file, every figure and one cell per pair
        # in the detail file (on_disk)
        pairs = on_disk["pairs"]
        c = len(set(real_classes))
        assert pairs["pairs_per_kind"] == {"seen": c, "unseen": c * c - c} and "pairs_cells" not in headline
        assert len(on_disk["pairs_cells"]) == c * c
        grid = pd.DataFrame(on_disk["pairs_cells"])
        assert pairs["unseen_stain_rank"] == pytest.approx(grid.loc[~grid["seen"], "stain_rank"].mean())
        assert pairs["site_conditioned"] == (name == "medi") and pairs["images_per_pair"] == cfg.fid.unseen_per_pair
    (folder,) = [f for f in Path(cfg.fid.cache).iterdir() if f.name != "classifiers"]   # one network in the cache
    # fitted once for both models: the classifiers of the real tiles, and the deconfounded ones of the rendered tiles
    assert len(list((Path(cfg.fid.cache) / "classifiers").glob("*.npz"))) == 2
    keys = [k for shard in folder.glob("shard-*.npz") for k in np.load(shard)["keys"]]
    # the real tiles and the deconfounded classifiers' rendered tiles encoded once for both models, and each model's 42
    # generated images (the probe's pools start from these sets and read their features back)
    rendered = len(unseen.deconfounded_set(cfg, train_index(cfg))[0])
    assert len(keys) == len(set(keys)) == len(real_classes) + rendered + 2 * 42
    summary = report.run_stage(cfg)
    cls, medi = (json.loads(Path(cfg.fid.metrics.format(model=m)).read_text())["per_class"] for m in ("cls", "medi"))
    common = sorted(set(cls) & set(medi))
    assert summary["classes_compared"] == len(common) >= 1
    assert summary["medi_better_classes"] == [c for c in common if medi[c] < cls[c]]
    page = Path(cfg.report.index).read_text()
    assert f"MeDi better than CLS on {len(summary['medi_better_classes'])} of {len(common)} classes." in page
    assert "## Fidelity" in page and "offline default" in page and "](fid_per_class.png)" in page
    assert f"{cfg.sample.steps} steps, guidance {cfg.sample.guidance}, colour kept;" in page
    assert "Table 1" not in page                                   # no probe metrics yet: no probe section
    for fig in (cfg.report.fid_figure, cfg.report.sites_figure):
        assert Path(fig).stat().st_size > 10_000
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    stages = {r.data.tags["medi.stage"]: r for r in runs}
    assert {"sample@cls", "sample@medi", "fid@cls", "fid@medi", "report"} <= set(stages)
    logged = stages["fid@medi"].data.metrics
    medi_metrics = json.loads(Path(cfg.fid.detail.format(model="medi")).read_text())
    assert logged["fid"] == medi_metrics["overall"]
    assert logged["class_accuracy"] == medi_metrics["conditioning"]["class_accuracy"]
    assert logged["pairs_unseen_site_accuracy"] == medi_metrics["pairs"]["unseen_site_accuracy"]


def hand_metrics(per_class: dict, mean: float | None, overall: float, site_accuracy: float | None) -> dict:
    """The fields of metrics/fid_<model>.json that the report reads."""
    return {"extractor": "random:resnet18", "overall": overall, "per_class": per_class, "mean_class_fid": mean,
            "kid": 0.0125, "n_generated": 10, "n_real": 20,
            "sampling": {"strategy": "match", "scheduler": "ddim", "steps": 2, "guidance": 1.0},
            "conditioning": {"class_accuracy": 0.5, "site_accuracy": site_accuracy, "class_accuracy_real_cv": 0.9,
                             "site_accuracy_real_cv": 0.8, "class_chance": 0.5, "site_chance": 0.25}}


def test_the_report_names_the_classes_medi_wins_and_dashes_what_a_stage_could_not_compute(make_cfg):
    cfg = make_cfg()
    metrics = {"cls": hand_metrics({"LUAD": 10.0, "LUSC": 5.0, "UCS": 7.0}, 22 / 3, 12.0, 0.25),
               "medi": hand_metrics({"LUAD": 8.0, "LUSC": 6.0, "KIRC": 1.0}, None, 11.0, None)}
    summary = report.fid_comparison(metrics)
    assert summary == {"mean_class_fid_cls": 7.5, "mean_class_fid_medi": 7.0, "medi_better_classes": ["LUAD"],
                       "classes_compared": 2, "overall_fid_cls": 12.0, "overall_fid_medi": 11.0}
    page = report.index_page(cfg, metrics, summary, None, {})
    assert "| cls | 12 | 7.333 | 0.0125 | 0.500 | 0.250 | - |" in page
    assert "| medi | 11 | - | 0.0125 | 0.500 | - | - |" in page          # every class below fid.min_count
    assert "MeDi better than CLS on 1 of 2 classes." in page
    apart = report.fid_comparison({"cls": metrics["cls"], "medi": hand_metrics({"KIRC": 1.0}, 1.0, 11.0, None)})
    assert (apart["classes_compared"], apart["medi_better_classes"], apart["mean_class_fid_medi"]) == (0, [], None)


def test_report_refuses_metrics_from_different_feature_spaces(tiny_world):
    cfg = tiny_world()
    for name, extractor in (("cls", "a"), ("medi", "b")):
        path = Path(cfg.fid.detail.format(model=name))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"extractor": extractor}))
    with pytest.raises(MediError, match="different feature spaces"):
        report.load_fid_metrics(cfg)
    Path(cfg.fid.detail.format(model="cls")).unlink()
    with pytest.raises(MediError, match="run `medi fid --model cls`"):
        report.load_fid_metrics(cfg)


def test_training_logs_an_fid_curve(tiny_world):
    cfg = tiny_world(train__max_steps=6, train__eval_every=3)
    idx = train_index(cfg)
    hook = fidelity.curve_hook(cfg, "medi", idx, real_tiles(cfg))
    result = train.run_stage(cfg, "medi", extra_hooks=[(cfg.train.eval_every, hook)])
    client = mlflow.tracking.MlflowClient()
    run = next(r for r in mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
               if r.data.tags["medi.stage"] == "train@medi")
    history = client.get_metric_history(run.info.run_id, "fid")
    assert [m.step for m in history] == [3, 6]
    # the last point by hand: the saved model (the EMA weights of step 6) samples the curve's plan, against all
    # real training tiles, with the sample settings but without the colour calibration (the curve follows the network)
    model = MediDiffusion.load(result.model_dir)
    assert model.stain.targeted[1:].all() and cfg.sample.colour_calibration > 0    # trained with the targets
    rows = sampling.plan(dataclasses.replace(cfg.sample, strategy="match", count=cfg.fid.curve_count), idx,
                       sorted(idx["class"].unique()))
    curve_sampler = dataclasses.replace(sampling.Sampler.of(cfg.sample), calibration=0)
    images = sampling.generate(model, curve_sampler, cfg.model, sampling.conditions_of(rows, model),
                               rows["seed"].tolist(), batch_size=cfg.sample.batch_size)
    extractor = fidelity.Extractor.from_config(cfg.fid.encoder)
    real = extractor.features(real_tiles(cfg)[np.sort(idx["idx"].to_numpy())], verbose=False)
    assert history[1].value == fidelity.frechet(real, extractor.features(images, verbose=False))
    assert history[0].value != history[1].value


def test_the_fid_curve_changes_neither_the_weights_nor_the_random_streams(tiny_world, tmp_path):
    """The default training computes an FID curve; the trained weights (and so the samples and the probe) and the
    global RNG (saved in checkpoints) must be those of a training without it."""
    idx = train_index(tiny_world())
    runs = {}
    for eval_every in (0, 3):
        cfg = tiny_world(train__max_steps=6, train__eval_every=eval_every, model__output=str(tmp_path / f"m{eval_every}"))
        hooks = [(3, fidelity.curve_hook(cfg, "medi", idx, real_tiles(cfg)))] if eval_every else []
        torch.manual_seed(123)
        logged = {}
        result = train.train(cfg, "medi", idx, Path(cfg.data.output) / "tiles.npy", hooks,
                             on_log=lambda step, m: logged.update({step: dict(m)}))
        runs[eval_every] = (result.model.state_dict(), torch.get_rng_state(), logged)
    (w0, rng0, log0), (w3, rng3, log3) = runs[0], runs[3]
    assert sorted(k for s in log3.values() for k in s if k in ("fid", "kid")) == ["fid", "fid", "kid", "kid"]
    assert all(torch.equal(w0[k], w3[k]) for k in w0) and torch.equal(rng0, rng3)
    assert [(s, m["loss"]) for s, m in log0.items()] == [(s, m["loss"]) for s, m in log3.items() if "loss" in m]
