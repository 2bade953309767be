"""Scaling out, proved on this machine: data-parallel training on a 2-process gloo group (same weights as one
process, resume after a kill), sampling and features split over 2 processes (same outputs as one), a fresh
MLflow store opened by several processes at once, and an Optuna study on a throwaway PostgreSQL server whose
worker is killed mid-trial."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

SECTIONS = ("data", "synthetic", "split", "model", "train", "sample", "fid", "encoder", "probe", "report", "sweep",
            "tracking")


def write_params(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump({name: cfg.section_dict(name) for name in SECTIONS}))
    return path


def launch(processes: int, params: Path, *args: str, cwd: Path) -> subprocess.Popen:
    """`medi` under torchrun with `processes` processes (1: plain `python -m medi.cli`), in its own session
    so that a kill reaches every process of the launch."""
    cmd = [sys.executable, "-m", "medi.cli", "--params", str(params), *args]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "medi.cli", "--params", str(params), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out
    return out


def max_difference(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


# ----------------------------------------------------------------------------------------------- training
def test_two_gloo_processes_train_like_one_and_resume_after_a_kill(tiny_world, tmp_path):
    """1 process for 12 steps; 2 processes killed (SIGKILL, every process) after a checkpoint and restarted:
    the restarted pair resumes, forms a gloo group of ranks 0 and 1, and ends with the one process's weights."""
    cfg = tiny_world(train__max_steps=12, train__checkpoint_every=2, train__augment=True, model__class_dropout=0.2,
                     model__attribute_dropout=0.3)
    params = write_params(cfg, tmp_path / "params.yaml")
    runs = {k: tmp_path / k for k in ("one", "two")}
    for d in runs.values():
        d.mkdir()

    def train(processes: int, where: str) -> subprocess.Popen:
        return launch(processes, params, "--set", f"model.output={runs[where] / 'models'}", "train", "--model", "medi",
                      cwd=runs[where])

    one = finish(train(1, "one"))
    assert "process group" not in one

    victim = train(2, "two")
    deadline, killed = time.time() + 240, False
    while time.time() < deadline and victim.poll() is None:       # kill the launch once a mid-run checkpoint exists
        if list((runs["two"] / "checkpoints").glob("medi-*/checkpoint-*")):
            workers = psutil.Process(victim.pid).children(recursive=True)   # not in torchrun's process group
            victim.kill()
            for proc in workers:
                proc.kill()
            psutil.wait_procs(workers, timeout=30)
            killed = True
            break
        time.sleep(0.05)
    victim.communicate(timeout=60)
    assert killed and victim.returncode == -signal.SIGKILL, "the launch finished before it could be killed"
    assert not (runs["two"] / "models/medi/model.safetensors").exists()

    again = finish(train(2, "two"))
    groups = sorted({json.loads(g.replace("'", '"'))["process_index"]: json.loads(g.replace("'", '"'))
                     for g in re.findall(r"on a process group: (\{.*?\})", again)}.items())
    assert [rank for rank, _ in groups] == [0, 1], again
    for _, g in groups:
        assert (g["distributed_type"], g["backend"], g["num_processes"]) == ("MULTI_CPU", "gloo", 2)
    resumed = re.findall(r"\(step (\d+) of 12\)", again)
    assert len(resumed) == 2 and len(set(resumed)) == 1 and 2 <= int(resumed[0]) < 12, again   # both ranks, one step
    diff = max_difference(runs["one"] / "models/medi/model.safetensors", runs["two"] / "models/medi/model.safetensors")
    print(f"max |w(2 processes, killed at step {resumed[0]} and resumed) - w(1 process)| after 12 steps: {diff:.3g}")
    assert diff < 1e-5
    assert json.loads((tmp_path / "metrics/train_medi.json").read_text())["processes"] == 2


# ----------------------------------------------------------------------------------------------- split work
def test_sampling_fid_features_and_probe_pools_split_over_two_processes_as_one_makes_them(tiny_world, tmp_path):
    """`medi sample`, `medi fid` and `medi probe` on 2 gloo processes write what one process writes: the same
    manifest, the same PNG bytes, the same features and embeddings, so the same figures."""
    import pandas as pd

    from threadpoolctl import threadpool_limits

    from medi import fid, probe, sample
    from test_sample import save_untrained

    cfg = tiny_world(sample__batch_size=8, fid__batch_size=8, encoder__batch_size=8)   # several batches each
    for name in ("cls", "medi"):
        save_untrained(cfg, name, seed=len(name))
    two = tmp_path / "two"
    outputs = {"sample.output": two / "samples/{model}", "fid.cache": two / "cache/features",
               "fid.metrics": two / "metrics/fid_{model}.json", "encoder.cache": two / "cache/embeddings",
               "probe.metrics": two / "metrics/probe.json", "probe.table": two / "probe.md",
               "probe.figure": two / "probe.png"}
    params = write_params(cfg, tmp_path / "params.yaml")
    sets = [a for k, v in outputs.items() for a in ("--set", f"{k}={v}")]
    for command in (["sample", "--model", "medi"], ["fid", "--model", "medi"], ["probe"]):
        finish(launch(2, params, *sets, *command, cwd=tmp_path))

    # One process, here, with the threads of each launched process (torchrun: 1): CPU kernels round
    # differently with another thread count (features differ by ~1e-7 between 1 and 2 threads in one process).
    threads = torch.get_num_threads()
    limits = threadpool_limits(1)
    torch.set_num_threads(1)
    try:
        one_set = Path(sample.run_stage(cfg, "medi")["output"])
        one_fid = fid.run_stage(cfg, "medi")
        one_probe = probe.run_stage(cfg)
    finally:
        torch.set_num_threads(threads)
        limits.restore_original_limits()

    two_set = Path(str(outputs["sample.output"]).format(model="medi"))
    assert (one_set / "manifest.csv").read_bytes() == (two_set / "manifest.csv").read_bytes()
    pngs = sorted(p.relative_to(one_set) for p in one_set.glob("images/*/*.png"))
    assert len(pngs) == cfg.sample.count and pngs == sorted(p.relative_to(two_set) for p in two_set.glob("images/*/*.png"))
    assert all((one_set / p).read_bytes() == (two_set / p).read_bytes() for p in pngs)

    two_fid = json.loads(Path(str(outputs["fid.metrics"]).format(model="medi")).read_text())
    for key in ("overall", "kid", "per_class", "per_site", "n_real", "n_generated", "conditioning"):
        assert one_fid[key] == two_fid[key], key
    assert [np.load(f).tobytes() for f in sorted(Path(cfg.fid.cache).glob("*.npy"))] == \
        [np.load(f).tobytes() for f in sorted(outputs["fid.cache"].glob("*.npy"))]

    assert one_probe["tasks"] == json.loads(outputs["probe.metrics"].read_text())["tasks"]
    for name in ("cls", "medi"):
        a, b = (Path(str(o).format(model=f"probe_{name}")) for o in (cfg.sample.output, outputs["sample.output"]))
        assert pd.read_csv(a / "manifest.csv").equals(pd.read_csv(b / "manifest.csv"))
        assert all((a / p).read_bytes() == (b / p).read_bytes() for p in pd.read_csv(a / "manifest.csv")["path"])
