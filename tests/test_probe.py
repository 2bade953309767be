"""Embeddings (one preprocessing path, content-keyed cache) and the linear probe (runs, methods, shortcut)."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medi import embed, probe
from medi.errors import MediError
from helpers import save_untrained


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


def toy_task(shortcut: float = 3.0, seed: int = 0) -> tuple[probe.TaskData, dict]:
    """Two classes, two sites each; a site's stain direction adds `shortcut` to one feature, the class signal is
    weak: a classifier trained on one site per class learns the site."""
    rng = np.random.default_rng(seed)
    classes, sites = ["A", "B"], {"A": ["a1", "a2"], "B": ["b1", "b2"]}
    site_shift = {"a1": 1, "a2": -1, "b1": -1, "b2": 1}

    def tiles(c, t, n):
        x = rng.normal(0, 1, (n, 6))
        x[:, 0] += 0.8 * (1 if c == "A" else -1)          # the class
        x[:, 1] += shortcut * site_shift[t]                # the site
        return x

    real = {(c, t): tiles(c, t, 40) for c in classes for t in sites[c]}
    pools = {"cls": {(c, None): np.concatenate([tiles(c, t, 20) for t in sites[c]]) for c in classes},
             "medi": {(c, t): tiles(c, t, 20) for c in classes for t in sites["A"] + sites["B"]}}
    test = [(c, t, x) for c in classes for t in sites[c] for x in tiles(c, t, 30)]
    task = probe.TaskData(classes, [("a1", "b1")], real, pools, np.stack([x for *_, x in test]),
                          np.array([classes.index(c) for c, *_ in test]), np.array([t for _, t, _ in test]),
                          ["a1", "a2", "b1", "b2"])
    return task, sites


def test_training_sets_have_the_paper_composition():
    task, _ = toy_task()
    picks = probe.real_draws(task, ("a1", "b1"), 20, np.random.default_rng(0))
    for method, n in (("none", 40), ("cls", 80), ("medi", 80)):
        x, y = probe.training_set(task, ("a1", "b1"), picks, method, 1.0, np.random.default_rng(1))
        assert len(x) == len(y) == n and (np.bincount(y) == n // 2).all()
    seen_x, seen_y = probe.seen_sites_test(task, ("a1", "b1"), picks)
    assert len(seen_y) == 40                                        # the 20 undrawn tiles of each chosen site
    assert probe.combinations([["a1", "a2"], ["b1", "b2"]], 0, 0) == [("a1", "b1"), ("a1", "b2"), ("a2", "b1"), ("a2", "b2")]
    assert len(probe.combinations([["a1", "a2"], ["b1", "b2"]], 3, 0)) == 3


def test_strategies_spread_synthetic_tiles_over_pairs_as_documented():
    task, _ = toy_task()
    combo, real = ("a1", "b1"), [20, 20]

    def alloc(strategy, n, method="medi", seed=0):
        out: dict = {}
        for key, k in probe.allocation(task, combo, real, method, strategy, n, np.random.default_rng(seed)):
            out[key] = out.get(key, 0) + k
        return {key: k for key, k in out.items() if k}

    assert alloc("grid", 40) == {("A", "a1"): 10, ("A", "b1"): 10, ("B", "a1"): 10, ("B", "b1"): 10}
    assert alloc("unseen", 40) == {("A", "b1"): 20, ("B", "a1"): 20}
    assert alloc("balanced", 40) == {("A", "b1"): 20, ("B", "a1"): 20}       # the empty pairs fill first
    assert alloc("balanced", 60) == {("A", "a1"): 5, ("A", "b1"): 25, ("B", "a1"): 25, ("B", "b1"): 5}
    assert sum(alloc("balanced", 41).values()) == 41
    uniform = alloc("uniform", 400)
    for c in "AB":                                                  # equal per class, over all four task sites
        assert sum(k for (cls, _), k in uniform.items() if cls == c) == 200
        assert {t for (cls, t) in uniform if cls == c} == {"a1", "a2", "b1", "b2"}
    assert alloc("unseen", 40, method="cls") == {("A", None): 20, ("B", None): 20}   # CLS knows no sites
    with pytest.raises(MediError, match="unknown probe strategy 'diagonal'"):
        alloc("diagonal", 4)
    picks = probe.real_draws(task, combo, 20, np.random.default_rng(0))
    for strategy in probe.STRATEGIES:
        x, y = probe.training_set(task, combo, picks, "medi", 1.0, np.random.default_rng(1), strategy)
        assert len(x) == 80 and (np.bincount(y) == 40).all(), strategy


def test_medi_augmentation_breaks_the_site_shortcut_that_none_learns():
    task, _ = toy_task()
    task.combos = [("a1", "b1"), ("a2", "b2"), ("a1", "b1"), ("a2", "b2")]
    out = probe.run_task(task, ["none", "cls", "medi"], real_per_class=20, ratio=2.0, C=1.0, seed=0, task_id=0, workers=1)
    none, medi = out["none"], out["medi"]
    assert none["seen_sites"] > 0.9 and none["tss_avg"] < 0.7          # the shortcut: right at home, wrong elsewhere
    assert medi["tss_avg"] > none["tss_avg"] + 0.15 and medi["worst_tss"] > none["worst_tss"]
    assert set(none) >= {"overall", "overall_sem", "tss_avg", "tss_avg_sem", "mcc", "worst_tss", "runs"}
    assert none["runs"] == 4


def test_probe_stage_writes_the_contract(tiny_world):
    cfg = tiny_world()
    for name in ("cls", "medi"):
        save_untrained(cfg, name, seed=len(name))
    result = probe.run_stage(cfg)
    on_disk = json.loads(Path(cfg.probe.metrics).read_text())
    assert on_disk["encoder"].startswith("random:resnet18") and "offline default" in on_disk["encoder"]
    assert set(on_disk["tasks"]) == {"nsclc", "rcc", "uterine"}
    for task in on_disk["tasks"].values():
        assert set(task) == {"none", "cls", "medi"}
        for m in task.values():
            assert {"overall", "overall_sem", "tss_avg", "tss_avg_sem", "mcc", "worst_tss", "runs"} <= set(m)
            assert 0 <= m["overall"] <= 1 and 1 <= m["runs"] <= 4
    assert result["tasks"] == on_disk["tasks"]
    assert "| nsclc | medi |" in Path(cfg.probe.table).read_text() and Path(cfg.probe.figure).stat().st_size > 10_000
    manifest = pd.read_csv(Path(cfg.sample.output.format(model="probe_medi")) / "manifest.csv", dtype=str,
                           keep_default_na=False)
    assert (manifest["strategy"] == "probe-pool").all() and manifest["pool_key"].str.contains(r"\|.+").all()
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    assert any(r.data.tags["medi.stage"] == "probe" for r in runs)
    again = probe.run_stage(cfg)                                    # pools and embeddings reused, same figures
    assert again["tasks"] == result["tasks"]


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
