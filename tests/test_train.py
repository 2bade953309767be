"""Training: auto-resume after SIGKILL gives the uninterrupted result, NaN stops cleanly, hooks, sampling."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from medi import train
from medi.errors import MediError
from medi.model import MediDiffusion


def write_params(cfg_dict_path: Path, cfg) -> Path:
    import dataclasses
    raw = {f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "source_path"}
    cfg_dict_path.write_text(yaml.safe_dump(raw))
    return cfg_dict_path


def medi(params: Path, *args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "medi.cli", "--params", str(params), *args, "train", "--model", "medi"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_and_restart_ends_like_an_uninterrupted_run(tiny_world, tmp_path):
    cfg = tiny_world(train__max_steps=12, train__checkpoint_every=3, train__augment=True)
    params = write_params(tmp_path / "params.yaml", cfg)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()

    ref = medi(params, "--set", f"model.output={a / 'models'}", cwd=a)
    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    victim = medi(params, "--set", f"model.output={b / 'models'}", cwd=b)
    ckpt_dir = None
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None:   # kill it once a mid-run checkpoint exists
        found = sorted((b / "checkpoints").glob("medi-*/checkpoint-0000006"))
        if found:
            ckpt_dir = found[0].parent
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (b / "models/medi/model.safetensors").exists()
    killed_at = max(int(p.name.split("-")[1]) for p in ckpt_dir.glob("checkpoint-*") if not p.name.endswith(".tmp"))
    assert 6 <= killed_at < 12

    again = medi(params, "--set", f"model.output={b / 'models'}", cwd=b)
    out = again.communicate(timeout=300)[0]
    assert again.returncode == 0, out
    assert f"(step {killed_at} of 12)" in out

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
    # The resumed run continued the same MLflow run: one train run in b's store, loss logged on both sides of the kill.
    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=["medi"], output_format="list")
    b_runs = [r for r in runs if r.data.params.get("model.output") == str(b / "models")]
    assert len(b_runs) == 1 and b_runs[0].info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(b_runs[0].info.run_id, "loss")]
    assert set(steps) == {2, 4, 6, 8, 10, 12}   # steps after the last checkpoint are logged again on resume
    assert len(list(ckpt_dir.glob("checkpoint-*"))) == cfg.train.keep_checkpoints


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
    train_index = pd.read_parquet(Path(cfg.split.output) / "train.parquet")
    assert train.latest_checkpoint(train.checkpoint_root(cfg, "medi", train_index)).name == "checkpoint-0000004"
    runs = mlflow.search_runs(experiment_names=["medi"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_hooks_see_ema_weights_and_metrics_reach_mlflow(tiny_world):
    cfg = tiny_world(train__max_steps=6, train__grid_every=3)
    seen = []

    def hook(step, model):
        seen.append((step, model.training))
        return {"fid_stub_metric": float(step)}

    result = train.run_stage(cfg, "cls", extra_hooks=[(2, hook)])
    assert seen == [(2, False), (4, False), (6, False)]
    assert result.steps == 6 and np.isfinite(result.final_loss)
    client = mlflow.MlflowClient()
    run = mlflow.search_runs(experiment_names=["medi"], output_format="list")[0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fid_stub_metric")] == [2, 4, 6]
    assert {m.step for m in client.get_metric_history(run.info.run_id, "loss")} == {2, 4, 6}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "grids")}
    assert artifacts == {"grids/cls_step_0000003.png", "grids/cls_step_0000006.png"}
    assert Path(cfg.train.figure.format(model="cls")).exists()
    loaded = MediDiffusion.load(result.model_dir)
    assert loaded.vocab.attributes == [] and loaded.vocab.classes == sorted(loaded.vocab.classes)


def test_balanced_batches_are_a_pure_function_of_the_step(tiny_world):
    cfg = tiny_world()
    index = pd.read_parquet(Path(cfg.split.output) / "train.parquet")
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
