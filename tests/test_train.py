"""Training: auto-resume after SIGKILL gives the uninterrupted result, resume only under the same training params
(and into a new MLflow store), NaN stops cleanly, hooks see the EMA weights, gradient accumulation, bf16/fp16 on
the CPU, batches."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from helpers import train_index, write_params
from medi import config, train
from medi.errors import MediError
from medi.model import MediDiffusion

HERE = Path(__file__).resolve().parent


def medi_train(params: Path, *args: str, cwd: Path, kill_at: int | None = None) -> subprocess.CompletedProcess:
    """`medi ... train --model medi` in its own process, with this process's thread count (so its kernels round
    as an in-process run's do); with `kill_at` the process SIGKILLs itself right after that optimizer step
    (tests/kill_at_step.py)."""
    head = [sys.executable, str(HERE / "kill_at_step.py"), str(kill_at)] if kill_at else [sys.executable, "-m", "medi.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.run([*head, "--params", str(params), *args, "train", "--model", "medi"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


class Stop(Exception):
    """Raised by a hook: a training interrupted at a known step, in process."""


def hook_recording(steps: list, stop_at: int | None = None):
    def hook(step, model):
        steps.append(step)
        if step == stop_at:
            raise Stop(step)
        return {}
    return hook


def test_a_run_resumed_with_another_process_count_continues_its_mlflow_run(tiny_world, tmp_path, monkeypatch):
    """docs/scaling.md: a checkpoint written with N processes can be resumed with another N. The MLflow run it
    continues records the process group as tags, which follow the resume (params could not change: MLflow refuses)."""
    from medi import distributed

    monkeypatch.chdir(tmp_path)
    cfg = tiny_world(train__max_steps=2, train__checkpoint_every=2, train__eval_every=0)
    train.run_stage(cfg, "cls")
    group = distributed.describe()
    monkeypatch.setattr(distributed, "describe", lambda: {**group, "num_processes": 2, "distributed_type": "MULTI_CPU"})
    train.run_stage(cfg, "cls")                       # resumes the finished run's last checkpoint
    client = mlflow.MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("medi").experiment_id], "tags.mlflow.runName = 'train-cls'")
    assert run.data.tags["processes"] == "2" and run.data.tags["distributed_type"] == "MULTI_CPU"
    assert "processes" not in run.data.params


def test_sigkill_and_restart_ends_like_an_uninterrupted_run(tiny_world, tmp_path, monkeypatch):
    cfg = tiny_world(train__max_steps=12, train__checkpoint_every=3, train__augment=True,
                     train__eval_every=0)       # no FID curve (test_fid: it leaves the RNG alone)
    params = write_params(cfg, tmp_path / "params.yaml")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()

    # the uninterrupted reference in this process (what `medi train` runs), the killed and resumed runs in their own
    monkeypatch.chdir(a)
    train.run_stage(config.override(cfg, {"model.output": str(a / "models")}), "medi")

    victim = medi_train(params, "--set", f"model.output={b / 'models'}", cwd=b, kill_at=8)   # 2 steps after a checkpoint
    assert victim.returncode == -signal.SIGKILL, victim.stderr
    assert not (b / "models/medi/model.safetensors").exists()
    (ckpt_dir,) = (b / "checkpoints").glob("medi-*")
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint-0000003", "checkpoint-0000006"]

    again = medi_train(params, "--set", f"model.output={b / 'models'}", cwd=b)
    assert again.returncode == 0, again.stderr
    assert f"resuming medi from {ckpt_dir / 'checkpoint-0000006'} (step 6 of 12)" in again.stderr

    final_a, final_b = load_file(str(a / "models/medi/model.safetensors")), load_file(str(b / "models/medi/model.safetensors"))
    assert final_a.keys() == final_b.keys()
    for k in final_a:
        assert torch.equal(final_a[k], final_b[k]), k
    ca, cb = (next((d / "checkpoints").glob("medi-*")) / "checkpoint-0000012" for d in (a, b))
    for f in ("model.safetensors", "ema.safetensors"):
        ta, tb = load_file(str(ca / f)), load_file(str(cb / f))
        assert all(torch.equal(ta[k], tb[k]) for k in ta), f
    oa, ob = (torch.load(c / "optimizer.pt", weights_only=True) for c in (ca, cb))
    for s in oa["state"]:
        assert all(torch.equal(oa["state"][s][k], ob["state"][s][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    sa, sb = (json.loads((c / "state.json").read_text()) for c in (ca, cb))
    assert sa["lr_scheduler"] == sb["lr_scheduler"] and sa["ema"] == sb["ema"] and sa["torch_rng"] == sb["torch_rng"]
    # The resumed run continued the same MLflow run: one train run in b's store, each loss logged once; the steps
    # the kill lost (7 and 8) were trained and logged again on resume.
    client = mlflow.MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("medi").experiment_id])
    b_runs = [r for r in runs if r.data.params.get("model.output") == str(b / "models")]
    assert len(b_runs) == 1 and b_runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(b_runs[0].info.run_id, "loss")]
    assert sorted(steps) == [2, 4, 6, 8, 10, 12]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["checkpoint-0000009", "checkpoint-0000012"]


def test_resume_only_under_the_same_training_params_and_into_a_new_mlflow_store(tiny_world, tmp_path, caplog,
                                                                                mlflow_store):
    cfg = tiny_world()                      # 8 steps, a checkpoint every 2
    with pytest.raises(Stop):
        train.run_stage(cfg, "medi", extra_hooks=[(3, hook_recording([], stop_at=3))])
    root = train.checkpoint_root(cfg, "medi", train_index(cfg))
    assert train.latest_checkpoint(root).name == "checkpoint-0000002"
    old = mlflow.MlflowClient(cfg.tracking.uri)
    (failed,) = old.search_runs([old.get_experiment_by_name("medi").experiment_id])
    assert failed.info.status == "FAILED"

    # Params of other stages changed and the MLflow store is a new one, where the checkpoint's run id is unknown:
    # training resumes at step 2, in a new run of the new store (stopped again after step 5).
    moved = tiny_world(sample__steps=3, fid__min_count=5, tracking__uri=mlflow_store(tmp_path / "new.db"))
    steps: list = []
    with caplog.at_level(logging.INFO, logger="medi.train"), pytest.raises(Stop):
        train.run_stage(moved, "medi", extra_hooks=[(1, hook_recording(steps, stop_at=5))])
    assert steps == [3, 4, 5]
    assert f"resuming medi from {root / 'checkpoint-0000002'} (step 2 of 8)" in caplog.text
    new = mlflow.MlflowClient(moved.tracking.uri)
    (run,) = new.search_runs([new.get_experiment_by_name("medi").experiment_id])
    assert run.info.run_id != failed.info.run_id and run.data.tags["medi.stage"] == "train@medi"
    assert [m.step for m in new.get_metric_history(run.info.run_id, "loss")] == [4]
    assert len(old.search_runs([old.get_experiment_by_name("medi").experiment_id])) == 1

    # A training param changed: training starts again at step 0 in a checkpoint folder of its own.
    steps = []
    other = tiny_world(train__lr=cfg.train.lr / 2)
    with pytest.raises(Stop):
        train.train(other, "medi", train_index(cfg), Path(cfg.data.output) / "tiles.npy", [(1, hook_recording(steps, 1))])
    assert steps == [1] and train.checkpoint_root(other, "medi", train_index(cfg)) != root


def test_a_rerun_from_the_final_checkpoint_writes_every_output_again(tiny_world):
    """DVC deletes a stage's outputs before re-running it; the training resumes at its last step and must still
    write the model and the last sample grid."""
    import shutil

    cfg = tiny_world()
    first = train.run_stage(cfg, "cls")
    figure = Path(cfg.train.figure.format(model="cls"))
    figure.unlink()
    shutil.rmtree(first.model_dir)
    again = train.run_stage(cfg, "cls")
    assert again.steps == cfg.train.max_steps and figure.stat().st_size > 1000
    a, b = load_file(str(first.model_dir / "model.safetensors")), first.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_keeps_last_good_checkpoint_and_fails_the_run(tiny_world, monkeypatch):
    cfg = tiny_world()
    real_forward = MediDiffusion.forward
    calls = {"n": 0}

    def poisoned(self, x, t, cond):
        calls["n"] += 1
        out = real_forward(self, x, t, cond)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(MediDiffusion, "forward", poisoned)
    with pytest.raises(train.TrainingDiverged, match=r"loss is nan at step 4; the last good checkpoint is kept"):
        train.run_stage(cfg, "medi")
    assert train.latest_checkpoint(train.checkpoint_root(cfg, "medi", train_index(cfg))).name == "checkpoint-0000004"
    runs = mlflow.search_runs(experiment_names=["medi"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_hooks_see_the_ema_weights_and_metrics_reach_mlflow(tiny_world):
    cfg = tiny_world(train__max_steps=6, train__grid_every=3)     # a checkpoint every 2 steps, the last 2 kept
    seen = {}

    def hook(step, model):
        seen[step] = ({k: v.clone() for k, v in model.state_dict().items()}, model.training)
        return {"fid_stub_metric": float(step)}

    result = train.run_stage(cfg, "cls", extra_hooks=[(2, hook)])
    assert sorted(seen) == [2, 4, 6] and not any(training for _, training in seen.values())
    root = train.checkpoint_root(cfg, "cls", train_index(cfg))
    for step in (4, 6):                     # a checkpoint holds both weights of the step the hook ran at
        ema = load_file(str(root / f"checkpoint-{step:07d}/ema.safetensors"))
        raw = load_file(str(root / f"checkpoint-{step:07d}/model.safetensors"))
        weights = seen[step][0]
        assert all(torch.equal(weights[k], ema[k]) for k in ema)              # the hook saw the EMA weights,
        assert not all(torch.equal(weights[k], raw[k]) for k in ema)          # not the training weights
    final = result.model.state_dict()
    assert all(torch.equal(seen[6][0][k], final[k]) for k in final)          # the saved model: the EMA of step 6
    assert result.steps == 6 and np.isfinite(result.final_loss)
    client = mlflow.MlflowClient()
    run = mlflow.search_runs(experiment_names=["medi"], output_format="list")[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fid_stub_metric")] == [2, 4, 6]
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == {2, 4, 6}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "grids")}
    assert artifacts == {"grids/cls_step_0000003.png", "grids/cls_step_0000006.png"}
    assert Path(cfg.train.figure.format(model="cls")).exists()
    loaded = MediDiffusion.load(result.model_dir)                 # the saved model is the trained one
    assert loaded.vocab == result.model.vocab and loaded.vocab.attributes == []
    assert loaded.vocab.classes == sorted(set(train_index(cfg)["class"]))
    assert all(torch.equal(loaded.state_dict()[k], final[k]) for k in final)


def test_gradient_accumulation_steps_optimizer_and_schedule_once_per_batch(tiny_world, monkeypatch):
    cfg = tiny_world(train__max_steps=4, train__grad_accumulation=2, train__warmup_steps=2, train__log_every=1)
    sizes = []
    real_forward = MediDiffusion.forward

    def counting(self, x, t, cond):
        sizes.append(len(x))
        return real_forward(self, x, t, cond)

    monkeypatch.setattr(MediDiffusion, "forward", counting)
    logged = {}
    train.train(cfg, "cls", train_index(cfg), Path(cfg.data.output) / "tiles.npy",
                on_log=lambda step, metrics: logged.update({step: metrics}))
    assert sizes == [cfg.train.batch_size // 2] * 8               # two micro-batches of half the batch per step
    ckpt = train.latest_checkpoint(train.checkpoint_root(cfg, "cls", train_index(cfg)))
    state = json.loads((ckpt / "state.json").read_text())
    assert state["train"]["step"] == 4 and state["train"]["images"] == 4 * cfg.train.batch_size
    assert state["lr_scheduler"]["last_epoch"] == 4
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {4.0}
    # cosine schedule with 2 warmup steps over 4 (diffusers): 1/2, 1, 1/2, 0 of train.lr after steps 1-4
    assert sorted(logged) == [1, 2, 3, 4]
    assert [logged[s]["lr"] for s in (1, 2, 3, 4)] == pytest.approx([cfg.train.lr * f for f in (0.5, 1.0, 0.5, 0.0)],
                                                                    rel=1e-12, abs=1e-15)


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one mixed-precision setting per process: a test that changes it starts and ends fresh."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


@pytest.mark.parametrize("precision, autocast", [("bf16", torch.bfloat16), ("fp16", None)])
def test_mixed_precision_training_on_the_cpu(tiny_world, monkeypatch, caplog, fresh_accelerate, precision, autocast):
    """bf16 autocasts the forward pass on the CPU; accelerate has no fp16 autocast there, which the run says."""
    cfg = tiny_world(train__max_steps=2, train__precision=precision)
    seen = set()
    real_forward = MediDiffusion.forward

    def spy(self, x, t, cond):
        seen.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real_forward(self, x, t, cond)

    monkeypatch.setattr(MediDiffusion, "forward", spy)
    with caplog.at_level(logging.WARNING, logger="medi.train"):
        result = train.train(cfg, "cls", train_index(cfg), Path(cfg.data.output) / "tiles.npy")
    assert seen == {autocast} and result.steps == 2 and np.isfinite(result.final_loss)
    warned = f"train.precision is {precision} but accelerate does not autocast it on cpu: this run trains in fp32"
    assert (warned in caplog.text) == (autocast is None)


def test_balanced_batches_are_a_pure_function_of_the_step(tiny_world):
    cfg = tiny_world()
    index = train_index(cfg)
    weights = train.sampling_weights(index["class"], True)
    make = lambda start, rank=0, processes=1: train.StepBatches(
        str(Path(cfg.data.output) / "tiles.npy"), index["idx"].to_numpy(), weights, 256, 0, start, 6, 1, augment=True,
        rank=rank, processes=processes)
    full, tail = list(make(0)), list(make(3))
    for x, y in zip(full[3:], tail):
        assert torch.equal(x["pixels"], y["pixels"]) and torch.equal(x["pos"], y["pos"])
    # Two processes' shards of every step, side by side, are the one-process batch (tiles, order and positions).
    shards = list(zip(make(0, 0, 2), make(0, 1, 2)))
    for x, (a, b) in zip(full, shards):
        assert len(a["pixels"]) == len(b["pixels"]) == 128
        for key in ("pixels", "pos", "index"):
            assert torch.equal(x[key], torch.cat([a[key], b[key]])), key
    assert full[2]["index"].tolist() == list(range(256))
    with pytest.raises(MediError, match="256 tiles does not split over 3 processes"):
        make(0, 0, 3)
    counts = pd.Series(index["class"].to_numpy()[np.concatenate([b["pos"].numpy() for b in full])]).value_counts()
    assert counts.max() / counts.min() < 1.6         # balanced across classes despite their skew
    assert index["class"].value_counts().max() / index["class"].value_counts().min() > 2


def test_min_snr_weights_follow_the_formula_per_prediction_type_and_reach_the_loss():
    """train.snr_gamma: each tile's weight is min(SNR, gamma) / (SNR + 1) under v-prediction, / SNR under epsilon
    (1 at zero SNR), min(SNR, gamma) for x0; the loss `learn` steps on is the weighted mean of the tiles' MSEs."""
    from diffusers import DDPMScheduler
    from accelerate import Accelerator
    noise = DDPMScheduler(num_train_timesteps=1000, rescale_betas_zero_snr=True)
    steps = torch.tensor([0, 40, 200, 600, 999])
    a = noise.alphas_cumprod[steps].double()
    snr = a / (1 - a)
    assert train.snr_weights(noise, steps, "v_prediction", 0.0) is None
    v = train.snr_weights(noise, steps, "v_prediction", 5.0).double()
    assert torch.allclose(v, torch.minimum(snr, torch.tensor(5.0, dtype=torch.double)) / (snr + 1), rtol=1e-4)
    assert v[-1] == 0 and v.max() <= 5 / 6 + 1e-6                 # zero terminal SNR: the pure-noise step drops out
    eps = train.snr_weights(noise, steps, "epsilon", 5.0).double()
    assert eps[-1] == 1 and torch.allclose(eps[:-1], torch.minimum(snr[:-1], torch.tensor(5.0).double()) / snr[:-1],
                                           rtol=1e-4)
    assert torch.allclose(train.snr_weights(noise, steps, "sample", 5.0).double(), snr.clamp(max=5.0), rtol=1e-4)

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 3, 1)
    wrapped = lambda x, t, cond: model(x)                          # noqa: E731 (the model's call signature)
    x, target, w = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.tensor([0.0, 1.0, 0.5, 2.0])
    expected = (((model(x) - target) ** 2).mean(dim=(1, 2, 3)) * w).mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loss = train.learn(Accelerator(cpu=True), wrapped, opt, sched, (x, steps[:4], {}, target), 0.0,
                       lambda bad: AssertionError(bad), w)
    assert torch.allclose(loss, expected)
