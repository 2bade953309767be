"""One trial of `medi sweep`, and the state the trials of one worker share (`Workspace`): the split, real
embeddings, models, pools and FID records, kept under `sweep.output` for later trials, calls and workers. A
trial trains what its values change, scores the method on the validation sites through the probe's own
evaluation (`probe.evaluate`, parts ("validation",)), reports the running objective after each task (so the
pruner can stop it), and records the FID of its model and sampler beside it; all nested in MLflow under the
study's run. A study whose objectives are all unseen-pairs figures fits no probe (`runs_probe`)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np

from medi import config as config_mod
from medi.config import Config
from medi.space import Dimension, objective_value, pairs_only, scope, study_name, trial_config

log = logging.getLogger(__name__)

RUN_ATTR = "mlflow_run_id"          # study user attribute: the study's MLflow run


# ----------------------------------------------------------------------------------------------- a worker's state
def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class Workspace:
    """What the trials of one worker share: the split, real embeddings, models, pools and FID records (in
    memory, and on disk under `sweep.output` for other workers and later calls). It holds validation tiles
    only unless asked for the test part (`parts`)."""

    def __init__(self, cfg: Config, parts: tuple[str, ...] = ("validation",)):
        from medi import probe

        self.base = cfg
        self.parts = parts
        self.root = Path(cfg.sweep.output)
        self.train_index, holdout = probe.load_splits(cfg)
        self.holdout_index = holdout[holdout["part"].isin(parts)]
        self._embeddings: dict[str, dict] = {}
        self._pools: dict[str, dict] = {}
        self._fid: dict[str, dict] = {}
        self.work: list[str] = []              # what the current trial had to do, beside fitting the probe

    def _lock(self, path: Path):
        from filelock import FileLock

        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path) + ".lock")

    def model(self, cfg: Config, name: str) -> Path:
        """The trained model `name` of the trial's params: the pipeline's if they match, else trained once."""
        from medi import train

        key = train.run_hash(cfg, name, self.train_index)
        pipeline = Path(self.base.model.output) / name
        if (pipeline / "config.json").exists() and json.loads((pipeline / "config.json").read_text()).get("run_hash") == key:
            return pipeline
        out = self.root / "models" / key
        with self._lock(out):
            if not (out / name / "model.safetensors").exists():
                self.work.append("trained")
                log.info("trial trains %s (%s) into %s", name, key, out)
                train.run_stage(config_mod.override(cfg, {
                    "model.output": str(out), "train.metrics": str(out / "train_{model}.json"),
                    "train.detail": str(out / "train_{model}_detail.json"),
                    "train.figure": str(out / "samples_{model}.png"), "train.plot": str(out / "train_{model}.csv")}), name)
        return out / name

    def context(self, cfg: Config, method: str, model_dir: Path):
        """The probe's context for a trial: real embeddings of the workspace's parts and the method's pool
        for this model, sampler and encoder (generated or grown once, then from disk)."""
        from medi import artifacts, embed, probe, sampling

        spec = embed.spec_of(cfg.encoder)
        if spec.identity() not in self._embeddings:
            self._embeddings[spec.identity()] = probe.real_embeddings(cfg, spec, self.train_index, self.holdout_index,
                                                                      self.parts)
        sampler = _digest(sampling.weights_digest(model_dir), sampling.Sampler.of(cfg.sample).settings(), cfg.sample.seed)
        key = _digest(sampler, probe.pool_size(cfg.probe), cfg.probe.real_per_class, cfg.probe.tasks, spec.identity())
        if key not in self._pools:
            out = self.root / "pools" / f"{model_dir.name}-{sampler}"
            with self._lock(out):
                self._seed_from_pipeline(cfg, model_dir, out)
                manifest = out / artifacts.MANIFEST
                before = len(artifacts.read_manifest(manifest)) if manifest.exists() else 0
                self._pools[key] = probe.method_pool(cfg, method, model_dir, out, self.train_index, spec)
                if len(artifacts.read_manifest(manifest)) > before:
                    self.work.append("new pool")
        return probe.Context(self.train_index, self.holdout_index, self._embeddings[spec.identity()],
                             {method: [self._pools[key]]}, spec.describe(), probe.site_conditioned(cfg))

    def _seed_from_pipeline(self, cfg: Config, model_dir: Path, out: Path) -> None:
        """Start a new pool from the pipeline's (`samples/probe/NAME`) when it was made by the same weights and
        sampler: a copy, so growing it never touches the DVC output."""
        import shutil

        from medi import pools

        theirs = Path(self.base.sample.output.format(model=f"probe/{model_dir.name}"))
        if out.exists() or not (theirs / pools.INFO).exists():
            return
        if pools.read_json(theirs / pools.INFO) == pools.identity(cfg, model_dir):
            shutil.copytree(theirs, out)
            log.info("pool %s starts from the pipeline's %s", out, theirs)

    def fid(self, cfg: Config, name: str, model_dir: Path) -> dict:
        """FID and KID of `sweep.fid_count` images (match strategy) of the model under the trial's sampler, and
        the unseen-pairs evaluation's headline figures (`pairs_*`, medi.unseen) unless fid.unseen_per_pair is 0."""
        from medi import artifacts, fidelity, sampling
        from medi.io import read_json, write_json

        n = cfg.sweep.fid_count
        key = _digest(sampling.weights_digest(model_dir), sampling.Sampler.of(cfg.sample).settings(), cfg.sample.seed,
                      n, {k: v for k, v in cfg.section_dict("fid").items() if k not in ("metrics", "cache")})
        path = self.root / "fid" / f"{model_dir.name}-{key}.json"
        if key not in self._fid:
            with self._lock(path):
                if not path.exists():
                    model = sampling.load_model(model_dir)
                    score = fidelity.MatchScore(cfg, self.train_index, np.asarray(artifacts.load_tiles(cfg.data.output)), n)
                    record = {**score(model), "images": n, "extractor": cfg.fid.extractor}
                    if cfg.fid.unseen_per_pair:
                        from medi import unseen

                        pairs = unseen.evaluate(cfg, name, model=model)[0]
                        record |= unseen.figures_of(pairs)
                    write_json(path, record)
                self._fid[key] = read_json(path)
        return self._fid[key]


# ----------------------------------------------------------------------------------------------- a trial
def runs_probe(cfg: Config) -> bool:
    """Whether a trial fits the probe: unless every objective is a figure of the unseen-pairs evaluation (which
    needs only the model and sampler: a trial then neither builds a synthetic pool nor fits the probe)."""
    return not pairs_only(cfg.sweep.objectives)


def objective_values(cfg: Config, metrics: dict) -> list[float]:
    """The trial's value of each objective, from its metrics (probe figures as their mean over the tasks)."""
    return [metrics[o] if o not in config_mod.PROBE_OBJECTIVES else metrics[f"mean_{o}_validation"]
            for o in cfg.sweep.objectives]


def score(cfg: Config, method: str, ws: Workspace, on_task=None) -> dict:
    """The probe's figures of `method` (beside `none`) on the workspace's parts, for the trial's params: the
    model, the pool and the same evaluation function as `medi probe`."""
    from medi import probe

    model_dir = ws.model(cfg, cfg.probe.models[method])
    ctx = ws.context(cfg, method, model_dir)
    return probe.evaluate(cfg.probe, ctx, ws.parts, methods=["none", method], on_task=on_task, tune=False,
                          n_boot=cfg.probe.bootstrap if "test" in ws.parts else 0)


def run_trial(trial, cfg: Config, method: str, dims: list[Dimension], ws: Workspace,
              parent_run_id: str) -> float | list[float]:
    """One trial: its params, what they need (model, pool), the probe task by task on the validation sites with
    pruning, FID and the unseen-pairs figures beside; its objective value (several objectives: one each)."""
    import mlflow
    import optuna

    from medi import tracking

    values = {d.name: d.suggest(trial) for d in dims}
    t0 = time.perf_counter()
    ws.work = []

    def work() -> str:
        return ", ".join(ws.work) or ("probe only" if runs_probe(cfg) else "evaluation only")

    with mlflow.start_run(run_name=f"trial-{trial.number}", parent_run_id=parent_run_id, tags={
            **tracking.run_tags(cfg, "sweep-trial", ("sweep",)), "medi.study": study_name(cfg, method),
            "medi.method": method, "optuna.trial": str(trial.number)}) as run:
        trial.set_user_attr(RUN_ATTR, run.info.run_id)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        mlflow.log_params({k: str(v) for k, v in values.items()})
        try:
            tcfg = trial_config(cfg, values)
            metrics: dict[str, float] = {}
            if cfg.sweep.fid_count:
                model_dir = ws.model(tcfg, tcfg.probe.models[method])
                metrics.update({k: v for k, v in ws.fid(tcfg, tcfg.probe.models[method], model_dir).items()
                                if k in ("fid", "kid") or k.startswith("pairs_")})
            done: dict[str, dict] = {}

            def after_task(task: str, figures: dict) -> None:
                done[task] = figures
                for m, f in figures.get("validation", {}).get("arms", {}).items():
                    metrics.update({f"{task}_{m}_{k}_validation": v for k, v in f.items()
                                    if k in ("tss_avg", "overall", "worst_tss")})
                if cfg.sweep.objectives[0] in config_mod.PROBE_OBJECTIVES and len(cfg.sweep.objectives) == 1:
                    running = objective_value(done, cfg.sweep.objectives[0], method)
                    mlflow.log_metric("objective_running", running, step=len(done) - 1)
                    trial.report(running, len(done) - 1)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"running objective {running:.4f} after {task}")

            if runs_probe(cfg):
                score(tcfg, method, ws, after_task)
                for k in config_mod.PROBE_OBJECTIVES:
                    metrics[f"mean_{k}_validation"] = objective_value(done, k, method)
            objectives, value = cfg.sweep.objectives, objective_values(cfg, metrics)
            seconds = time.perf_counter() - t0
            metrics.update({"seconds": seconds, **({"objective": value[0]} if len(value) == 1 else
                                                   {f"objective_{o}": v for o, v in zip(objectives, value)})})
            mlflow.log_metrics(metrics)
            mlflow.set_tag("medi.work", work())
            client = mlflow.tracking.MlflowClient()
            for o, v in zip(objectives, value):
                client.log_metric(parent_run_id, "trial_objective" if len(value) == 1 else f"trial_{o}", v,
                                  step=trial.number)
            trial.set_user_attr("metrics", {k: metrics[k] for k in ("mean_tss_avg_validation", "mean_gain_validation",
                                                                    "fid", "seconds", *objectives) if k in metrics})
            trial.set_user_attr("work", work())
            log.info("trial %d (%s): %s -> %s %s %s (%s; %.1fs)", trial.number, method, values, ", ".join(objectives),
                     scope(objectives), " / ".join(f"{v:.4f}" for v in value), work(), seconds)
            return value[0] if len(value) == 1 else value
        except optuna.TrialPruned as exc:
            trial.set_user_attr("work", work())
            mlflow.set_tags({"optuna.state": "PRUNED", "medi.pruned": str(exc), "medi.work": work()})
            mlflow.log_metric("seconds", time.perf_counter() - t0)
            mlflow.end_run("KILLED")
            log.info("trial %d pruned: %s", trial.number, exc)
            raise
        except Exception as exc:  # noqa: BLE001  (recorded, then Optuna marks the trial failed and goes on)
            mlflow.set_tags({"optuna.state": "FAIL", "medi.error": f"{type(exc).__name__}: {exc}"[:5000]})
            log.error("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
            raise
