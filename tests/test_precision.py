"""precision: auto: the decision from (injected) timings, explicit settings untouched, the choice recorded in the
checkpoint, the model and the manifest, and a resume keeping it."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from helpers import autocast_spy, save_untrained, train_index
from medi import artifacts, precision, sample, sampling, train
from medi.model import MediDiffusion


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one mixed-precision setting per process: a test that changes it starts and ends fresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.fixture
def timings(monkeypatch):
    """Replace the timing: `timings.seconds` are the seconds per round each candidate takes; `timings.calls`
    counts the measurements (each still runs every candidate's step once, so the step functions are exercised)."""
    class Fake:
        seconds = {"fp32": 1.0, "bf16": 1.0}
        calls = 0

        def __call__(self, step, candidates=precision.CANDIDATES, **_):
            Fake.calls += 1
            for p in candidates:
                step(p)
            return {p: self.seconds[p] for p in candidates}

    fake = Fake()
    monkeypatch.setattr(precision, "time_rounds", fake)
    monkeypatch.setattr(precision, "_SAMPLING", {})
    return fake


@pytest.mark.parametrize("ips, chosen", [
    ({"fp32": 101.0, "bf16": 161.0}, "bf16"),      # AMD EPYC, avx512_bf16 (issue 14)
    ({"fp32": 107.0, "bf16": 84.0}, "fp32"),       # Intel Xeon, avx512_bf16 without AMX (docs/benchmarks.md)
    ({"fp32": 100.0, "bf16": 104.9}, "fp32"),      # within the margin: the more exact one
    ({"fp32": 100.0, "bf16": 105.0}, "bf16"),
    ({"fp32": 100.0, "bf16": float("nan")}, "fp32"),
    ({"fp32": float("nan"), "bf16": 1.0}, "bf16"),
])
def test_the_faster_precision_wins_by_the_margin(ips, chosen):
    assert precision.choose(ips) == chosen


def test_time_rounds_alternates_and_takes_each_precisions_median(monkeypatch):
    clock, order = [0.0], []
    cost = {"fp32": iter([9.0, 1.0, 2.0, 3.0, 100.0]), "bf16": iter([9.0, 5.0, 4.0, 6.0, 0.5])}

    def step(p):
        order.append(p)
        clock[0] += next(cost[p])

    monkeypatch.setattr(precision.time, "perf_counter", lambda: clock[0])
    seconds = precision.time_rounds(step, rounds=4, warmup=1, budget_s=1e9)
    assert order == ["fp32", "bf16", "fp32", "bf16", "bf16", "fp32", "fp32", "bf16", "bf16", "fp32"]
    assert seconds == {"fp32": 2.5, "bf16": 4.5}       # medians of (1, 2, 3, 100) and (5, 4, 6, 0.5)
    # the budget stops it after two timed rounds
    cost = {"fp32": iter([0.0, 1.0, 1.0, 1.0]), "bf16": iter([0.0, 1.0, 1.0, 1.0])}
    order.clear()
    assert precision.time_rounds(step, rounds=4, warmup=1, budget_s=3.0) == {"fp32": 1.0, "bf16": 1.0}
    assert len(order) == 6


def test_explicit_settings_are_untouched_and_cuda_decides_by_capability(tiny_world, timings, monkeypatch):
    cfg = tiny_world()
    model = save_untrained(cfg, "medi")
    cond = sampling.conditions_of(sampling.plan(cfg.sample, train_index(cfg), model.vocab.classes).iloc[:1], model)
    for p in ("fp32", "fp16", "bf16"):
        d = precision.for_training(p, model, lambda: pytest.fail("no batch for an explicit setting"), torch.device("cpu"))
        assert (d.precision, d.how, dict(d.images_per_second)) == (p, "explicit", {})
        assert sampling.sampling_precision(model, sampling.Sampler(steps=2, precision=p), cond, 16).precision == p
        assert precision.for_training(p, model, None, torch.device("cpu"), recorded="bf16").precision == p
    assert timings.calls == 0
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "H200")
    d = precision.for_training("auto", model, None, torch.device("cuda"))
    assert (d.precision, d.how) == ("bf16", "device capability (H200)")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.for_sampling("auto", model, cond, 16, 1, 2, torch.device("cuda")).precision == "fp16"
    assert timings.calls == 0


def test_sampling_auto_is_timed_once_per_shape_with_the_guidance_evaluations(tiny_world, timings):
    cfg = tiny_world()
    model = save_untrained(cfg, "medi")
    cond = sampling.conditions_of(sampling.plan(cfg.sample, train_index(cfg), model.vocab.classes).iloc[:1], model)
    timings.seconds = {"fp32": 0.5, "bf16": 0.25}
    guided = sampling.Sampler(steps=4, guidance=2.0, precision="auto")
    d = sampling.sampling_precision(model, guided, cond, 16)
    # batch 16, 4 steps, one forward of 2 x 16 rows (guided) per step: 16 / (0.5 x 4) = 8 images/s in fp32
    assert (d.precision, d.how, dict(d.images_per_second)) == ("bf16", "measured", {"fp32": 8.0, "bf16": 16.0})
    assert sampling.sampling_precision(model, guided, cond, 16) == d and timings.calls == 1
    sampling.sampling_precision(model, guided, cond, 8)
    assert timings.calls == 2
    key = [k for k in precision._SAMPLING if k[1] == 16]
    assert [k[2] for k in key] == [2]                   # two condition sets per step under guidance 2


def test_auto_trains_in_the_measured_choice_records_it_and_a_resume_keeps_it(tiny_world, timings, monkeypatch,
                                                                             fresh_accelerate, caplog):
    cfg = tiny_world(train__max_steps=4, train__checkpoint_every=2, train__precision="auto")
    seen = autocast_spy(monkeypatch)
    timings.seconds = {"fp32": 2.0, "bf16": 1.0}
    index, tiles = train_index(cfg), Path(cfg.data.output) / "tiles.npy"
    before = torch.get_rng_state()
    decision = train.training_precision(cfg, "cls", index)
    assert torch.equal(torch.get_rng_state(), before)     # the timing leaves the run's generator alone
    # micro-batch 8: 8 images / 2 s in fp32; the timing ran one step in each precision
    assert (decision.precision, decision.how, dict(decision.images_per_second)) == ("bf16", "measured",
                                                                                  {"fp32": 4.0, "bf16": 8.0})
    assert seen == [None, torch.bfloat16]
    seen.clear()
    with caplog.at_level(logging.INFO, logger="medi.train"):
        result = train.train(cfg, "cls", index, tiles)
    assert "training cls in bf16 (auto: measured; fp32 4.0 images/s, bf16 8.0 images/s)" in caplog.text
    assert result.precision.precision == "bf16" and timings.calls == 2
    assert seen[2:] == [torch.bfloat16] * 4              # after the timing's two steps, every training step
    root = train.checkpoint_root(cfg, "cls", index)
    assert [json.loads((c / "state.json").read_text())["train"]["precision"] for c in sorted(root.glob("checkpoint-*"))] \
        == ["bf16", "bf16"]
    assert json.loads((result.model_dir / "config.json").read_text())["precision"] == "bf16"

    # resume after the last checkpoint is lost, on a machine where fp32 now looks faster: bf16 is kept, untimed
    import shutil
    shutil.rmtree(sorted(root.glob("checkpoint-*"))[-1])
    timings.seconds = {"fp32": 1.0, "bf16": 2.0}
    seen.clear()
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    resumed = train.train(cfg, "cls", index, tiles)
    assert (resumed.precision.precision, resumed.precision.how) == ("bf16", "recorded in the checkpoint resumed")
    assert timings.calls == 2 and seen == [torch.bfloat16] * 2 and resumed.steps == 4


def test_the_sample_stage_records_the_auto_choice_and_an_interrupted_set_keeps_it(tiny_world, timings):
    cfg = tiny_world(sample__count=20, sample__batch_size=16, sample__precision="auto")
    save_untrained(cfg, "medi")
    timings.seconds = {"fp32": 1.0, "bf16": 2.0}
    sample.run_stage(cfg, "medi")
    out = Path(cfg.sample.output.format(model="medi"))
    manifest = artifacts.read_manifest(out / artifacts.MANIFEST)
    assert set(manifest["precision"]) == {"fp32"}
    run = mlflow.search_runs(filter_string="tags.mlflow.runName = 'sample-medi'", output_format="list")[0]
    assert run.data.params["precision"] == "fp32" and run.data.params["sample.precision"] == "auto"
    # batch 16, 2 steps, guidance 1: 16 / (1 s x 2) = 8 images/s in fp32, 4 in bf16
    assert (run.data.metrics["precision_fp32_images_per_second"], run.data.metrics["precision_bf16_images_per_second"]) \
        == (8.0, 4.0)
    images = artifacts.load_images(out, manifest)
    model = MediDiffusion.load(Path(cfg.model.output) / "medi")
    assert np.array_equal(sampling.regenerate(manifest, model, cfg.model), images)

    # interrupted (a batch lost, no manifest yet), resumed where bf16 now looks faster: the set stays fp32
    (out / manifest["path"].iloc[18]).unlink()
    (out / artifacts.MANIFEST).unlink()
    info = json.loads((out / artifacts.SAMPLE_INFO).read_text())
    (out / artifacts.SAMPLE_INFO).write_text(json.dumps({**info, "complete": False}))
    timings.seconds = {"fp32": 2.0, "bf16": 1.0}
    precision._SAMPLING.clear()                          # a new process: nothing decided yet
    calls = timings.calls
    sample.run_stage(cfg, "medi")
    assert timings.calls == calls
    assert set(artifacts.read_manifest(out / artifacts.MANIFEST)["precision"]) == {"fp32"}
    assert np.array_equal(artifacts.load_images(out, manifest), images)


def test_the_train_stage_logs_the_choice_both_figures_and_what_grids_and_stain_check_cost(tiny_world, timings,
                                                                                          fresh_accelerate):
    cfg = tiny_world(train__max_steps=2, train__precision="auto")
    timings.seconds = {"fp32": 1.0, "bf16": 4.0}
    result = train.run_stage(cfg, "medi")
    run = mlflow.search_runs(filter_string="tags.mlflow.runName = 'train-medi'", output_format="list")[0]
    assert (run.data.params["precision"], run.data.params["train.precision"]) == ("fp32", "auto")
    # micro-batch 8: 8 images / 1 s in fp32, / 4 s in bf16
    assert (run.data.metrics["precision_fp32_images_per_second"], run.data.metrics["precision_bf16_images_per_second"]) \
        == (8.0, 2.0)
    assert run.data.metrics["grid_seconds"] > 0 and run.data.metrics["stain_check_seconds"] > 0
    share = (run.data.metrics["grid_seconds"] + run.data.metrics["stain_check_seconds"]) / (
        2 * cfg.train.batch_size / result.images_per_second)
    assert run.data.metrics["grid_stain_share_of_training"] == pytest.approx(share)
    assert json.loads((Path(cfg.model.output) / "medi" / "config.json").read_text())["precision"] == "fp32"
