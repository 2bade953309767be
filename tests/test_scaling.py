"""Scaling out, proved on this machine: data-parallel training on a 2-process gloo group (same weights as one
process, resume after a kill), sampling and features split over 2 processes (same outputs as one), a fresh
MLflow store opened by several processes at once, and an Optuna study on a throwaway PostgreSQL server whose
worker is killed mid-trial."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from helpers import save_pipeline_model, save_untrained, train_index, write_params
from medi import config, unseen
from medi import train as train_stage




def launch(processes: int, params: Path, *args: str, cwd: Path, **env: str) -> subprocess.Popen:
    """`medi` under torchrun with `processes` processes (1: plain `python -m medi.cli`), in its own session
    so that a kill reaches every process of the launch; `env` adds environment variables."""
    cmd = [sys.executable, "-m", "medi.cli", "--params", str(params), *args]
    if processes > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "medi.cli", "--params", str(params), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: int = 300) -> str:
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out
    return out


def shares(log: str, what: str) -> list[int]:
    """The units of each split in a launch's log, checking that ranks 0 and 1 took shares adding up to them."""
    found = [tuple(map(int, m)) for m in re.findall(what + r": process (\d) of 2 takes (\d+) of (\d+)", log)]
    totals = []
    for i in range(0, len(found), 2):
        (r0, k0, n0), (r1, k1, n1) = sorted(found[i:i + 2])
        assert (r0, r1) == (0, 1) and n0 == n1 and k0 + k1 == n0 and abs(k0 - k1) <= 1, found
        totals.append(n0)
    return totals


def max_difference(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


# ----------------------------------------------------------------------------------------------- training
@pytest.mark.processes
def test_two_gloo_processes_train_like_one_and_resume_after_a_kill(tiny_world, tmp_path, monkeypatch, caplog):
    """1 process (this one) for 12 steps; 2 processes killed (SIGKILL, every process) after a checkpoint and
    restarted: the restarted pair resumes, forms a gloo group of ranks 0 and 1, and ends with the one process's
    weights."""
    cfg = tiny_world(train__max_steps=12, train__checkpoint_every=2, train__augment=True, model__class_dropout=0.2,
                     model__attribute_dropout=0.3, train__eval_every=0)     # (no FID curve: not what is compared)
    params = write_params(cfg, tmp_path / "params.yaml")
    runs = {k: tmp_path / k for k in ("one", "two")}
    for d in runs.values():
        d.mkdir()

    def train(processes: int, where: str) -> subprocess.Popen:
        return launch(processes, params, "--set", f"model.output={runs[where] / 'models'}", "train", "--model", "medi",
                      cwd=runs[where])

    monkeypatch.chdir(runs["one"])
    with caplog.at_level(logging.INFO):
        train_stage.run_stage(config.override(cfg, {"model.output": str(runs["one"] / "models")}), "medi")
    assert "trained medi: 12 steps" in caplog.text and "process group" not in caplog.text

    victim = train(2, "two")
    deadline, killed = time.time() + 240, False
    while time.time() < deadline and victim.poll() is None:       # kill the launch once a mid-run checkpoint exists
        if [c for c in (runs["two"] / "checkpoints").glob("medi-*/checkpoint-*") if not c.name.endswith(".tmp")]:
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
    print(f"the restarted launch's process group: {[g for _, g in groups]}")
    resumed = re.findall(r"\(step (\d+) of 12\)", again)
    assert len(resumed) == 2 and len(set(resumed)) == 1 and 2 <= int(resumed[0]) < 12, again   # both ranks, one step
    diff = max_difference(runs["one"] / "models/medi/model.safetensors", runs["two"] / "models/medi/model.safetensors")
    print(f"max |w(2 processes, killed at step {resumed[0]} and resumed) - w(1 process)| after 12 steps: {diff:.3g}")
    assert diff < 1e-5
    assert json.loads((tmp_path / "reports/train_medi_detail.json").read_text())["processes"] == 2


# ----------------------------------------------------------------------------------------------- split work
@pytest.mark.processes
def test_sampling_fid_features_and_probe_pools_split_over_two_processes_as_one_makes_them(tiny_world, tmp_path):
    """`medi sample`, `medi fid` and `medi probe` on 2 gloo processes write what one process writes: the same
    manifest, the same PNG bytes, the same features and embeddings, so the same figures. `medi sample` gets its 2
    processes by launching itself, as on any CPU with several cores (params sample.processes: 0)."""
    import pandas as pd

    from threadpoolctl import threadpool_limits

    from medi import fid, probe, sample

    cfg = tiny_world(sample__batch_size=8, fid__batch_size=8, encoder__batch_size=8,   # several batches each
                     fid__unseen_per_pair=2)
    for name in ("cls", "medi"):
        save_untrained(cfg, name, seed=len(name))
    two = tmp_path / "two"
    outputs = {"sample.output": two / "samples/{model}", "fid.cache": two / "cache/features",
               "fid.metrics": two / "metrics/fid_{model}.json", "fid.detail": two / "reports/fid_{model}_detail.json",
               "fid.plot": two / "reports/fid_{model}.csv", "encoder.cache": two / "cache/embeddings",
               "probe.metrics": two / "metrics/probe.json", "probe.headline": two / "metrics/table1",
               "probe.table": two / "probe.md",
               "probe.figure": two / "probe.png"}
    params = write_params(cfg, tmp_path / "params.yaml")
    sets = [a for k, v in outputs.items() for a in ("--set", f"{k}={v}")]
    # `medi sample` as a plain command on 2 cores launches itself (params sample.processes: 0); fid and probe by torchrun
    logs = {"sample": finish(launch(1, params, *sets, "sample", "--model", "medi", cwd=tmp_path, OMP_NUM_THREADS="2"))}
    assert "running as 2 processes of 1 thread(s)" in logs["sample"]
    logs |= {command[0]: finish(launch(2, params, *sets, *command, cwd=tmp_path))
             for command in (["fid", "--model", "medi"], ["probe"])}
    # each process did its share, and the shares add up: 42 images in 6 batches of 8; FID features of the real
    # tiles and of the 42 images; the probe's embeddings and pools (cls and medi)
    assert shares(logs["sample"], "sampling batches") == [6]
    rendered = len(unseen.deconfounded_set(cfg, train_index(cfg))[0])     # the deconfounded classifiers' tiles
    assert sorted(shares(logs["fid"], "feature batches")) == sorted([6, -(-len(train_index(cfg)) // 8), -(-rendered // 8)])
    assert len(shares(logs["probe"], "embedding batches")) == 3 and len(shares(logs["probe"], "sampling batches")) == 2

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

    two_fid = json.loads(Path(str(outputs["fid.detail"]).format(model="medi")).read_text())
    for key in ("overall", "kid", "per_class", "per_site", "n_real", "n_generated", "conditioning"):
        assert one_fid[key] == two_fid[key], key
    assert [np.load(f).tobytes() for f in sorted(Path(cfg.fid.cache).glob("*.npy"))] == \
        [np.load(f).tobytes() for f in sorted(outputs["fid.cache"].glob("*.npy"))]

    assert one_probe["tasks"] == json.loads(outputs["probe.metrics"].read_text())["tasks"]
    for name in ("cls", "medi"):
        a, b = (Path(str(o).format(model=f"probe/{name}")) for o in (cfg.sample.output, outputs["sample.output"]))
        assert pd.read_csv(a / "manifest.csv").equals(pd.read_csv(b / "manifest.csv"))
        assert all((a / p).read_bytes() == (b / p).read_bytes() for p in pd.read_csv(a / "manifest.csv")["path"])


def test_only_a_sampling_command_line_relaunches_itself_and_only_on_several_cpu_cores(monkeypatch, tmp_path, make_cfg):
    """`medi sample` / `medi probe` given on the command line relaunch under torchrun with params sample.processes
    (0 = one per core); an in-process call (`cli.main(argv)`), one core, `processes: 1`, a launch already running
    and other commands do not."""
    from medi import cli, distributed

    calls = []
    monkeypatch.setattr(distributed, "relaunch", lambda argv, n: calls.append((list(argv), n)) or sys.exit(0))
    monkeypatch.setattr(cli, "COMMANDS", {**cli.COMMANDS, **{c: (lambda cfg, args: None, h)
                                                             for c, (_, h) in cli.COMMANDS.items()}})
    params = write_params(make_cfg(), tmp_path / "params.yaml")

    def command_line(*args: str, cores: str = "2"):
        monkeypatch.setenv("OMP_NUM_THREADS", cores)
        monkeypatch.setattr(sys, "argv", ["medi", "--params", str(params), *args])
        try:
            return cli.main()
        except SystemExit as exc:
            return exc.code

    assert command_line("sample", "--model", "medi") == 0 and calls == [(["--params", str(params), "sample", "--model", "medi"], 2)]
    assert command_line("probe", cores="3") == 0 and calls[-1] == (["--params", str(params), "probe"], 3)
    calls.clear()
    assert command_line("sample", "--model", "medi", cores="1") == 0                        # one core
    assert command_line("--set", "sample.processes=1", "sample", "--model", "medi") == 0    # asked for one process
    assert command_line("fid", "--model", "medi") == 0                                      # not a sampling command
    assert cli.main(["--params", str(params), "sample", "--model", "medi"]) == 0            # in-process: never exec
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.cpu_processes(0) == 1                                                # already launched
    monkeypatch.delenv("WORLD_SIZE")
    assert calls == [] and distributed.cpu_processes(5) == 5


# ----------------------------------------------------------------------------------------------- the MLflow store
STAGE = """
import sys, time
from pathlib import Path
import mlflow
from medi import config, tracking
ready, go, i = Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
cfg = config.load(sys.argv[1], {})
ready.touch()
while not go.exists():
    time.sleep(0.002)
with tracking.stage_run(cfg, "split", ("split",), run_name=f"process-{i}"):
    mlflow.log_metric("process", float(i))
"""


@pytest.mark.processes
def test_processes_opening_a_fresh_store_at_once_all_log(make_cfg, tmp_path):
    """4 processes released together on a fresh sqlite store: MLflow's migrations ran once (under the lock),
    every process logged its run. Without the lock they raced and all but one failed."""
    import mlflow

    cfg = make_cfg()
    store = Path(cfg.tracking.uri.removeprefix("sqlite:///"))
    store.unlink(missing_ok=True)                # conftest's ready-made store would hide the race: a fresh one
    params = write_params(cfg, tmp_path / "params.yaml")
    n = 4
    procs = [subprocess.Popen([sys.executable, "-c", STAGE, str(params), str(tmp_path / f"ready{i}"), str(tmp_path / "go"),
                               str(i)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(n)) and time.time() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()                    # all imported and configured, released at once
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * n, "\n".join(outputs)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list")
    assert sorted((r.info.run_name, r.info.status, r.data.metrics["process"]) for r in runs) == \
        [(f"process-{i}", "FINISHED", float(i)) for i in range(n)]


# ----------------------------------------------------------------------------------------------- PostgreSQL
@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL 16 server on 127.0.0.1 (the pinned pgserver wheel's binaries, run by
    medi.postgres; as `nobody` under root), stopped and deleted afterwards. Yields (port, url of a database)."""
    import socket
    import tempfile

    from medi import postgres as pg

    with socket.socket() as s:                      # a free port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = Path(tempfile.mkdtemp(prefix="medi-pg-")) / "data"    # /tmp: reachable by `nobody`, unlike tmp_path
    data.parent.chmod(0o755)
    try:
        pg.start(data, port, "medi")
    except Exception as exc:  # noqa: BLE001
        pg.stop(data, remove=True)
        pytest.fail(f"the test PostgreSQL server could not start: {exc}")
    try:
        yield port, lambda database: pg.start(data, port, database)
    finally:
        pg.stop(data, remove=True)
        data.parent.rmdir()


def trials_by_worker(study) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for t in study.trials:
        out.setdefault(t.user_attrs.get("worker", "?"), []).append(t.state.name)
    return out


@pytest.mark.processes
def test_a_study_on_postgresql_survives_a_worker_killed_mid_trial(tiny_world, tmp_path, postgres):
    """`medi sweep --workers 2` on PostgreSQL; one worker is SIGKILLed while a trial of it is RUNNING: the
    heartbeat fails that trial (Optuna FAIL, MLflow FAILED) and the call still adds its 6 trials."""
    import mlflow
    import optuna
    from medi import trial

    _, database = postgres
    url = database("optuna_kill")
    cfg = tiny_world(sweep__storage=url, sweep__study="pg", sweep__space={
        "probe.strategy": ["grid", "unseen", "balanced", "uniform"], "probe.ratio": {"low": 0.5, "high": 2.0, "step": 0.5}},
        sweep__sampler="random", sweep__pruner="none", sweep__fid_count=0, sweep__trials=6, sweep__workers=2,
        sweep__heartbeat=1, sweep__grace_period=3, sweep__methods=["medi"])
    save_pipeline_model(cfg)
    params = write_params(cfg, tmp_path / "params.yaml")
    call = subprocess.Popen([sys.executable, "-m", "medi.cli", "--params", str(params), "sweep"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    victim, deadline = None, time.time() + 240
    store = optuna.storages.RDBStorage(url)                          # one connection pool for the polling
    while victim is None and time.time() < deadline and call.poll() is None:
        time.sleep(0.1)
        try:
            study = optuna.load_study(study_name="pg-medi", storage=store)
        except KeyError:                                             # not created yet
            continue
        for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            if "worker" not in t.user_attrs:
                continue
            pid = int(t.user_attrs["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGSTOP)                             # frozen: the trial cannot finish meanwhile
            if study._storage.get_trial(t._trial_id).state == optuna.trial.TrialState.RUNNING:
                os.kill(pid, signal.SIGKILL)
                victim = (t.number, t.user_attrs["worker"])
            else:
                os.kill(pid, signal.SIGCONT)
            break
    out = call.communicate(timeout=300)[0]
    assert victim is not None, "no trial was caught running\n" + out
    assert call.returncode == 0, out
    assert "exited with [-9]" in out and "their remaining trials run here" in out

    study = optuna.load_study(study_name="pg-medi", storage=store)
    by_worker = trials_by_worker(study)
    print(f"PostgreSQL study, trial states per worker: {by_worker}; killed worker {victim[1]} in trial {victim[0]}")
    assert len(study.trials) == 6                                   # the count of the call, reached
    assert study.trials[victim[0]].state.name == "FAIL" and by_worker[victim[1]].count("FAIL") == 1
    assert [t.state.name for t in study.trials].count("FAIL") == 1
    assert len(by_worker) >= 2 and all(s == "COMPLETE" for w, ss in by_worker.items() if w != victim[1] for s in ss)
    run = mlflow.tracking.MlflowClient(cfg.tracking.uri).get_run(study.trials[victim[0]].user_attrs[trial.RUN_ATTR])
    assert run.info.status == "FAILED" and run.data.tags["optuna.state"] == "FAIL"
    assert "stopped sending heartbeats" in run.data.tags["medi.error"]


@pytest.mark.processes
def test_make_mlflow_server_serves_the_stages_from_postgresql(make_cfg, tmp_path, monkeypatch):
    """`make mlflow-server` (on free ports, data and artifacts under tmp): PostgreSQL starts, the tracking server
    answers on 127.0.0.1, a stage logs through MLFLOW_TRACKING_URI alone (run in PostgreSQL, artifact in the
    server's folder), and stopping the target stops PostgreSQL too."""
    import socket
    import tempfile
    import urllib.request

    import mlflow
    import psycopg

    from conftest import REPO
    from medi import postgres as pg
    from medi import tracking

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    pg_port, http_port = ports
    data = Path(tempfile.mkdtemp(prefix="medi-pg-")) / "data"
    data.parent.chmod(0o755)
    artifacts = tmp_path / "served-artifacts"
    server = subprocess.Popen(["make", "-C", str(REPO), "mlflow-server", f"PG_DATA={data}", f"PG_PORT={pg_port}",
                               f"MLFLOW_PORT={http_port}", f"MLFLOW_ARTIFACTS={artifacts}",
                               "MLFLOW_WORKERS=1"],        # one client here: one worker process to start
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.time() < deadline, server.communicate()[0] if server.poll() is not None else "no answer"
            time.sleep(0.5)

        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{http_port}")
        cfg = make_cfg()
        with tracking.stage_run(cfg, "split", ("split",)) as run:
            mlflow.log_metric("x", 2.0)
            mlflow.log_text("hello", "notes/hello.txt")
        got = mlflow.tracking.MlflowClient().get_run(run.info.run_id)
        assert got.info.status == "FINISHED" and got.data.metrics == {"x": 2.0}
        assert [p.read_text() for p in artifacts.rglob("hello.txt")] == ["hello"]
        # nothing local: no artifact folder, and the test's own empty store (conftest) received no run
        assert not (tmp_path / "mlruns").exists()
        with sqlite3.connect(tmp_path / "mlflow.db") as db:
            assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)
        with psycopg.connect(host="127.0.0.1", port=pg_port, user="postgres", dbname="mlflow") as conn:
            assert conn.execute("SELECT run_uuid, status FROM runs").fetchall() == [(run.info.run_id, "FINISHED")]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        out = server.communicate(timeout=60)[0]
        stopped = not pg.running(data)
        pg.stop(data, remove=True)
        data.parent.rmdir()
    assert stopped, out                        # the target stops its PostgreSQL with the server
