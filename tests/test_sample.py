"""Sampling: strategies, the sample set on disk (PNG + manifest), bit-for-bit regeneration, resume."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import save_untrained, train_index, write_params
from medi import artifacts, cli, sample, sampling
from medi.errors import MediError
from medi.model import MediDiffusion, Vocabulary, architecture


def test_match_reproduces_the_training_frequencies(tiny_world):
    cfg = tiny_world()
    idx = train_index(cfg)
    rows = sampling.plan(dataclasses.replace(cfg.sample, strategy="match", count=0), idx, sorted(idx["class"].unique()))
    assert len(rows) == len(idx)
    pd.testing.assert_series_equal(rows.groupby(["class", "tss"]).size(), idx.groupby(["class", "tss"]).size())
    twice = sampling.plan(dataclasses.replace(cfg.sample, strategy="match", count=2 * len(idx) + 5), idx,
                        sorted(idx["class"].unique()))
    assert (twice.groupby(["class", "tss"]).size() >= 2 * idx.groupby(["class", "tss"]).size()).all()
    assert twice["seed"].is_unique and twice["path"].is_unique
    assert (twice["batch"] == np.arange(len(twice)) // cfg.sample.batch_size).all()


def test_uniform_grid_and_explicit_strategies(tiny_world):
    cfg = tiny_world()
    idx = train_index(cfg)
    classes = sorted(idx["class"].unique())
    uni = sampling.plan(dataclasses.replace(cfg.sample, strategy="uniform", count=7 * len(classes) + 3), idx, classes)
    counts = uni["class"].value_counts()
    assert set(counts) <= {7, 8} and counts.sum() == len(uni)
    assert all(idx[(idx["class"] == r["class"]) & (idx["tss"] == r["tss"])].shape[0] for _, r in uni.iterrows())

    sites = sorted(idx["tss"].unique())[:3]
    grid = sampling.plan(dataclasses.replace(cfg.sample, strategy="grid", per_pair=2, grid_classes=classes[:2],
                                           grid_sites=sites), idx, classes)
    assert len(grid) == 2 * 2 * 3
    assert set(zip(grid["class"], grid["tss"])) == {(c, s) for c in classes[:2] for s in sites}
    site_rows = idx.set_index("tss")
    for _, r in grid.iterrows():            # demographics come from a real row of the site
        donors = site_rows.loc[[r["tss"]]]
        assert ((donors["race"] == r["race"]) & (donors["gender"] == r["gender"])).any()

    pairs = [{"class": classes[0], "tss": sites[-1]}, {"class": classes[1], "tss": sites[0]}]
    exp = sampling.plan(dataclasses.replace(cfg.sample, strategy="explicit", per_pair=3, pairs=pairs), idx, classes)
    assert list(zip(exp["class"], exp["tss"])) == [(p["class"], p["tss"]) for p in pairs for _ in range(3)]

    with pytest.raises(MediError, match="grid_sites.*not in the training split"):
        sampling.plan(dataclasses.replace(cfg.sample, strategy="grid", grid_sites=["ZZ"]), idx, classes)
    with pytest.raises(MediError, match="unknown class 'BRCA'"):
        sampling.plan(dataclasses.replace(cfg.sample, strategy="explicit", pairs=[{"class": "BRCA"}]), idx, classes)


def test_manifest_keeps_site_code_NA_as_text(tmp_path):
    rows = pd.DataFrame({"path": ["images/UCS/000000.png"], "class": ["UCS"], "tss": ["NA"], "race": ["white"],
                         "gender": ["female"], "age": [float("nan")], "seed": [0], "batch": [0]})
    rows.to_csv(tmp_path / "manifest.csv", index=False)
    back = artifacts.read_manifest(tmp_path / "manifest.csv")
    assert back["tss"].tolist() == ["NA"] and np.isnan(back["age"].iloc[0])


def test_sample_stage_writes_pngs_and_a_manifest_that_regenerates_bit_for_bit(tiny_world, caplog, capsys):
    cfg = tiny_world(sample__count=40, sample__batch_size=16, sample__guidance=2.0)
    save_untrained(cfg, "medi")
    result = sample.run_stage(cfg, "medi")
    out = Path(cfg.sample.output.format(model="medi"))
    manifest = artifacts.read_manifest(out / artifacts.MANIFEST)
    assert result["images"] == len(manifest) == 40
    assert {"path", "class", "tss", "race", "gender", "age", "seed", "batch", "model", "scheduler", "steps",
            "guidance", "conditioned_on", "precision", "strategy"} <= set(manifest.columns)
    assert (manifest["conditioned_on"] == "class,tss").all() and (manifest["guidance"] == 2.0).all()
    images = artifacts.load_images(out, manifest)
    assert images.shape == (40, cfg.data.resolution, cfg.data.resolution, 3) and images.dtype == np.uint8
    assert len({im.tobytes() for im in images}) == 40            # one seed per image: all different

    model = MediDiffusion.load(Path(cfg.model.output) / "medi")
    assert np.array_equal(sampling.regenerate(manifest, model, cfg.model), images)
    assert np.array_equal(sampling.regenerate(manifest.iloc[16:32], model, cfg.model), images[16:32])

    # an interrupted run: the missing batch is made again, identically, and the rest is kept
    (out / manifest["path"].iloc[20]).unlink()
    (out / artifacts.MANIFEST).unlink()
    before = (out / manifest["path"].iloc[0]).stat().st_mtime_ns
    with caplog.at_level("INFO"):
        sample.run_stage(cfg, "medi")
    assert "resuming: 2 of 3 batches already on disk" in caplog.text
    assert (out / manifest["path"].iloc[0]).stat().st_mtime_ns == before
    assert np.array_equal(artifacts.load_images(out, manifest), images)

    # a manifest this model cannot replay: sampler settings mixed within a batch, other conditioning attributes
    mixed = manifest.assign(steps=np.where(np.arange(40) == 3, cfg.sample.steps + 1, cfg.sample.steps))
    with pytest.raises(MediError, match=r"manifest batch 0 mixes sampler settings"):
        sampling.regenerate(mixed, model, cfg.model)
    class_only = MediDiffusion(architecture(cfg.model.preset, cfg.data.resolution, cfg.model.d_e),
                               Vocabulary.from_frame(train_index(cfg), "class", [], cfg.model.continuous))
    with pytest.raises(MediError, match=r"the manifest was conditioned on \['tss'\], this model on the class only"):
        sampling.regenerate(manifest, class_only, cfg.model)

    # the CLI checks a regeneration against the files on disk: exit 0 when identical, 2 when a file differs
    params = str(write_params(cfg, Path("params.yaml")))
    regen = ["--params", params, "sample", "--model", "medi", "--from-manifest", str(out / artifacts.MANIFEST)]
    assert cli.main([*regen, "--output", "regen"]) == 0
    assert np.array_equal(artifacts.load_images("regen", manifest), images)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    assert any(r.data.tags["medi.stage"] == "sample@medi" and r.data.metrics["images"] == 40 for r in runs)
    Image.fromarray(255 - images[7]).save(out / manifest["path"].iloc[7])      # one file on disk altered
    capsys.readouterr()
    assert cli.main([*regen, "--output", "regen2"]) == 2
    assert capsys.readouterr().err == (f"medi sample: error: 1 of 40 regenerated images differ from the files beside "
                                       f"{out / artifacts.MANIFEST}\n")


def test_other_weights_cannot_regenerate_a_set(tiny_world, capsys):
    cfg = tiny_world(sample__count=8)
    save_untrained(cfg, "cls")
    sample.run_stage(cfg, "cls")
    manifest = Path(cfg.sample.output.format(model="cls")) / artifacts.MANIFEST
    assert (artifacts.read_manifest(manifest)["conditioned_on"] == "class").all()
    save_untrained(cfg, "cls", seed=1)
    with pytest.raises(MediError, match="not the model that generated"):
        sample.regenerate_stage(cfg, "cls", str(manifest), None)


def test_unknown_site_in_explicit_pairs_names_the_known_ones(tiny_world):
    cfg = tiny_world(sample__strategy="explicit", sample__pairs=[{"class": "LUAD", "tss": "ZZ"}])
    save_untrained(cfg, "medi")
    with pytest.raises(MediError, match="unknown value of 'tss' 'ZZ'.*known values"):
        sample.run_stage(cfg, "medi")


def test_a_changed_setting_or_other_weights_start_the_set_afresh(tiny_world, caplog):
    cfg = tiny_world(sample__count=8, sample__batch_size=8)
    out = Path(cfg.sample.output.format(model="cls"))
    model = save_untrained(cfg, "cls")
    sample.run_stage(cfg, "cls")
    first = artifacts.load_images(out, artifacts.read_manifest(out / artifacts.MANIFEST))

    def again(c, model) -> np.ndarray:
        caplog.clear()
        with caplog.at_level("INFO", logger="medi.sample"):
            sample.run_stage(c, "cls")
        manifest = artifacts.read_manifest(out / artifacts.MANIFEST)
        images = artifacts.load_images(out, manifest)
        assert np.array_equal(images, sampling.regenerate(manifest, model, c.model))   # what this model makes now
        return images

    assert np.array_equal(again(cfg, model), first) and "starting afresh" not in caplog.text   # same set: kept
    fewer_steps = tiny_world(sample__count=8, sample__batch_size=8, sample__steps=1)
    second = again(fewer_steps, model)
    assert "holds another (or an unidentified) sample set; starting afresh" in caplog.text
    assert not np.array_equal(second, first)
    other = save_untrained(cfg, "cls", seed=1)                    # retrained: same settings, other weights
    third = again(fewer_steps, other)
    assert "starting afresh" in caplog.text and not np.array_equal(third, second)


def test_one_ddim_step_is_the_models_prediction_of_the_clean_image(tiny_world):
    """v-prediction with zero terminal SNR: DDIM's single (trailing) step from t = T-1 to the clean image returns
    x0 = sqrt(a) x - sqrt(1 - a) v, a the last cumulative alpha (0 here)."""
    cfg = tiny_world()
    model = save_untrained(cfg, "medi").eval()
    rows = sampling.plan(dataclasses.replace(cfg.sample, count=6), train_index(cfg), model.vocab.classes)
    cond, seeds = sampling.conditions_of(rows, model), rows["seed"].tolist()
    images = sampling.generate(model, sampling.Sampler("ddim", 1), cfg.model, cond, seeds)

    size = cfg.data.resolution
    x = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    a = sampling.Sampler("ddim", 1).scheduler(cfg.model).alphas_cumprod[-1]
    with torch.no_grad():
        v = model(x, torch.full((len(x),), cfg.model.timesteps - 1), cond)
    x0 = a.sqrt() * x - (1 - a).sqrt() * v
    assert np.array_equal(images, ((x0.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    manifest = rows.assign(conditioned_on="class,tss", scheduler="ddim", steps=1, guidance=1.0, precision="fp32")
    assert np.array_equal(sampling.regenerate(manifest, model, cfg.model), images)
    assert not np.array_equal(sampling.generate(model, sampling.Sampler("dpmsolver++", 2), cfg.model, cond, seeds), images)


def test_bf16_and_fp16_sampling_autocast_on_the_cpu_and_regenerate(tiny_world, monkeypatch):
    cfg = tiny_world()
    model = save_untrained(cfg, "cls").eval()
    rows = sampling.plan(dataclasses.replace(cfg.sample, count=4), train_index(cfg), model.vocab.classes)
    cond, seeds = sampling.conditions_of(rows, model), rows["seed"].tolist()
    seen = []
    real_forward = MediDiffusion.forward

    def spy(self, x, t, c):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real_forward(self, x, t, c)

    monkeypatch.setattr(MediDiffusion, "forward", spy)
    images = {p: sampling.generate(model, sampling.Sampler("dpmsolver++", 2, precision=p), cfg.model, cond, seeds)
              for p in ("fp32", "bf16", "fp16")}
    assert seen == [None] * 2 + [torch.bfloat16] * 2 + [torch.float16] * 2
    assert not np.array_equal(images["bf16"], images["fp32"]) and not np.array_equal(images["fp16"], images["fp32"])
    for p, expected in images.items():
        manifest = rows.assign(conditioned_on="class", scheduler="dpmsolver++", steps=2, guidance=1.0, precision=p)
        assert np.array_equal(sampling.regenerate(manifest, model, cfg.model), expected), p


def test_compositional_guidance_pushes_the_class_and_the_metadata_by_their_own_scales():
    cond = {"class": torch.tensor([2, 3]), "tss": torch.tensor([4, 1])}
    e_full, e_class, e_null = (torch.full((2, 3, 4, 4), v) for v in (5.0, 3.0, 1.0))

    def evaluations(variants):      # the prediction each condition batch stands for, in the order asked
        preds = {(True, True): e_full, (True, False): e_class, (False, False): e_null}
        return [preds[(bool((v["class"] != 0).all()), bool((v["tss"] != 0).all()))] for v in variants]

    # joint guidance (the metadata's scale unset or equal): e(null) + g (e(c, m) - e(null)), two evaluations
    for metadata in (None, 2.0):
        variants, combine = sampling.guidance_conditions(cond, 2.0, metadata)
        assert len(variants) == 2 and torch.equal(combine(evaluations(variants)), e_null + 2.0 * (e_full - e_null))
    variants, combine = sampling.guidance_conditions(cond, 1.0, None)
    assert len(variants) == 1 and torch.equal(combine(evaluations(variants)), e_full)
    # compositional: e(null) + g_c (e(c) - e(null)) + g_m (e(c, m) - e(c)); the class-only batch keeps the class
    variants, combine = sampling.guidance_conditions(cond, 2.0, 3.0)
    assert torch.equal(variants[1]["class"], cond["class"]) and (variants[1]["tss"] == 0).all()
    assert torch.equal(combine(evaluations(variants)), e_null + 2.0 * (e_class - e_null) + 3.0 * (e_full - e_class))
    variants, combine = sampling.guidance_conditions(cond, 1.0, 3.0)       # g_c = 1: e(null) cancels, two evaluations
    assert len(variants) == 2 and torch.equal(combine(evaluations(variants)), e_class + 3.0 * (e_full - e_class))
    # a class-only model has no metadata to guide: its scale is ignored
    variants, _ = sampling.guidance_conditions({"class": cond["class"]}, 2.0, 3.0)
    assert len(variants) == 2


def test_guidance_that_keeps_the_colour_pushes_only_what_varies_across_a_tile():
    cond = {"class": torch.tensor([2, 3]), "tss": torch.tensor([4, 1])}
    g = torch.Generator().manual_seed(0)
    e_full, e_class, e_null = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    preds = {(True, True): e_full, (True, False): e_class, (False, False): e_null}

    def evaluations(variants):
        return [preds[(bool((v["class"] != 0).all()), bool((v["tss"] != 0).all()))] for v in variants]

    def centred(x):
        return x - x.mean((2, 3), keepdim=True)

    for scales in ((2.0, None), (2.0, 3.0), (1.0, 3.0)):
        usual_variants, usual = sampling.guidance_conditions(cond, *scales)
        variants, keep = sampling.guidance_conditions(cond, *scales, colour="conditional")
        assert [v.keys() for v in variants] == [v.keys() for v in usual_variants]     # the same evaluations
        out, pushed = keep(evaluations(variants)), usual(evaluations(variants))
        # the mean colour per image and channel is the conditional prediction's; what varies is guided as usual
        assert torch.allclose(out.mean((2, 3)), e_full.mean((2, 3)), atol=1e-6)
        assert torch.allclose(centred(out), centred(pushed), atol=1e-6)
        assert not torch.allclose(out.mean((2, 3)), pushed.mean((2, 3)))
    variants, keep = sampling.guidance_conditions(cond, 1.0, None, colour="conditional")   # no guidance: unchanged
    assert len(variants) == 1 and torch.equal(keep(evaluations(variants)), e_full)
    with pytest.raises(MediError, match="unknown guidance colour 'mean'"):
        sampling.guidance_conditions(cond, 2.0, None, colour="mean")


def test_the_guidance_colour_is_part_of_a_sets_identity_only_where_guidance_is_applied():
    Sampler = sampling.Sampler
    kept, usual = Sampler(guidance=2.0, colour="conditional"), Sampler(guidance=2.0)
    assert kept.settings() == {**usual.settings(), "guidance_colour": "conditional"}
    assert Sampler.from_settings(kept.settings()) == kept and Sampler.from_settings(usual.settings()) == usual
    # unguided sampling is the same whatever the colour: same identity, same manifest columns
    assert Sampler(colour="conditional").settings() == Sampler().settings()
    assert Sampler(colour="conditional").columns() == Sampler().columns()
    assert Sampler(guidance=1.0, metadata_guidance=3.0, colour="conditional").settings()["guidance_colour"] == "conditional"
    assert Sampler.from_settings({**kept.columns(), "guidance_colour": float("nan")}).colour == "guided"   # an empty cell


def test_metadata_guidance_in_the_sample_stage_regenerates_and_joint_is_unchanged(tiny_world):
    cfg = tiny_world(sample__count=8, sample__batch_size=8, sample__guidance=2.0, sample__metadata_guidance=4.0)
    model = save_untrained(cfg, "medi")
    sample.run_stage(cfg, "medi")
    out = Path(cfg.sample.output.format(model="medi"))
    manifest = artifacts.read_manifest(out / artifacts.MANIFEST)
    assert (manifest["guidance"] == 2.0).all() and (manifest["metadata_guidance"] == 4.0).all()
    images = artifacts.load_images(out, manifest)
    assert np.array_equal(sampling.regenerate(manifest, model, cfg.model), images)
    cond, seeds = sampling.conditions_of(manifest, model), manifest["seed"].tolist()

    assert cfg.sample.guidance_colour == "conditional" and (manifest["guidance_colour"] == "conditional").all()

    def draw(guidance, metadata, colour="conditional"):
        return sampling.generate(model, sampling.Sampler(cfg.sample.scheduler, cfg.sample.steps, guidance, metadata,
                                                         colour=colour), cfg.model, cond, seeds)

    assert np.array_equal(draw(2.0, 4.0), images) and not np.array_equal(draw(2.0, 4.0, "guided"), images)
    assert np.array_equal(draw(2.0, None), draw(2.0, 2.0)) and not np.array_equal(draw(2.0, 2.0), images)
    # a manifest written before the settings existed replays as joint, usual guidance
    old = manifest.drop(columns=["metadata_guidance", "guidance_colour"])
    assert np.array_equal(sampling.regenerate(old, model, cfg.model), draw(2.0, 2.0, "guided"))
    grown = manifest.assign(metadata_guidance=np.nan)      # older rows of a pool grown after it existed
    assert np.array_equal(sampling.regenerate(grown, model, cfg.model), draw(2.0, 2.0))
