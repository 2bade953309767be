"""Hyperparameter sweeps (`medi sweep`, `make sweep`): Optuna studies over params, tracked in MLflow, that
choose on the validation sites and never read a test site.

The search space is params `sweep.space`: dotted params (`model.d_e`, `probe.strategy`, `sample.guidance`,
...) mapped to a list of choices or a `{low, high, step, log}` range. Every method of `sweep.methods` (CLS
and MeDi by default) gets its own study, `<sweep.study>-<method>`, with the same number of trials: the same
tuning budget for the baseline as for MeDi. A param that cannot change a method is left out of its study
(the site strategy for a model without site conditioning; attribute embeddings for a class-only model).

A trial is a copy of the params with its values, validated like params.yaml. What a trial has to do depends on
what it changes, and everything it makes is kept under `sweep.output` for later trials, later calls and
other workers:
- `model.*` / `train.*`: the method's model is trained (once per distinct setting; a setting equal to the
  pipeline's reuses `models/NAME`), nested as a training run under the trial's run;
- `sample.*` (or a larger ratio): the method's synthetic pool is generated or grown (once per model and
  sampler setting);
- `probe.*` / `encoder.*` only: the trial fits the probe on cached embeddings and pools, in seconds.
The objective (`sweep.objective`) reads the probe's figures of the method on the **validation** sites
(`split.validation_fraction`), averaged over the tasks, through the same evaluation function as `medi probe`
(`probe.evaluate` with parts ("validation",): the test tiles are not even loaded). Tasks are scored one after
another and the running objective is reported after each, so the pruner can stop a trial early. The FID of
`sweep.fid_count` images of the trial's model and sampler is recorded beside it.

After each call the best trial of each study is scored once on the **test** sites (`best_test` in its
summary, beside `best_value` on validation, each labelled): that is the figure to quote, and it never feeds
back into the search.

The study lives in an RDB (`sweep.storage`, sqlite by default): calling again continues it, and several
processes on one storage (`--workers N`, or commands started by hand, on one machine or many with a
PostgreSQL URL) take trials in parallel. A trial whose worker died is failed after a heartbeat grace period.
In MLflow each study is one run and every trial a run nested under it, with the trial's params and figures;
a failed trial is FAILED in both, a pruned one PRUNED in Optuna and KILLED in MLflow, and the study goes on.
The study run gets the best params, the optimisation history, parameter importances and parallel
coordinates, also written to `sweep.reports`/STUDY/ with a table of the trials (`study.md`).
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medi import config as config_mod
from medi.config import Config
from medi.errors import MediError

log = logging.getLogger(__name__)

# What changing a section costs a trial; the other sections change the dataset or only the reports.
SWEEPABLE = {"model": "trains", "train": "trains", "sample": "new pool", "probe": "probe only", "encoder": "probe only"}
MAXIMISE = ("tss_avg", "overall", "worst_tss", "gain")
RUN_ATTR = "mlflow_run_id"          # study user attribute: the study's MLflow run


# ----------------------------------------------------------------------------------------------- the space
@dataclass(frozen=True)
class Dimension:
    """One searched param: categorical choices, or an int / float range."""
    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def is_int(self) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in (self.low, self.high, self.step or 1))

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.is_int:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid_values(self) -> list:
        """Every value, for the grid sampler (a range needs a step)."""
        if self.choices is not None:
            return list(self.choices)
        if self.step is None:
            raise MediError(f"sweep.sampler grid: '{self.name}' is a range without a step; give it a step or choices")
        values = np.arange(self.low, self.high + self.step / 2, self.step)
        return [int(v) for v in values] if self.is_int else [round(float(v), 10) for v in values]

    def ends(self) -> list:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


def parse_space(cfg: Config, method: str | None = None) -> list[Dimension]:
    """`sweep.space` as dimensions; every choice and both ends of every range are checked as param values.
    With a method, the params that cannot change it are left out (`inert`)."""
    where = f"{cfg.source_path}: sweep.space"
    if not cfg.sweep.space:
        raise MediError(f"{where} is empty; name at least one param to search, e.g. probe.strategy: [grid, unseen]")
    dims = []
    for name, spec in cfg.sweep.space.items():
        section = name.partition(".")[0]
        if section not in SWEEPABLE:
            raise MediError(f"{where}: '{name}' cannot be swept; sweepable sections: {', '.join(SWEEPABLE)} "
                            "(data, split and synthetic change the dataset: run a pipeline per setting)")
        if isinstance(spec, list):
            if not spec:
                raise MediError(f"{where}: '{name}' has no choices")
            dim = Dimension(name, choices=tuple(spec))
        elif isinstance(spec, dict):
            extra = sorted(set(spec) - {"low", "high", "step", "log"})
            if extra or not {"low", "high"} <= set(spec):
                raise MediError(f"{where}: '{name}' needs {{low, high}} and optionally step and log; got {spec}")
            dim = Dimension(name, low=spec["low"], high=spec["high"], step=spec.get("step"), log=bool(spec.get("log", False)))
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (dim.low, dim.high)) \
                    or dim.low >= dim.high:
                raise MediError(f"{where}: '{name}' needs numbers low < high, got {spec}")
        else:
            raise MediError(f"{where}: '{name}' must be a list of choices or {{low, high, step, log}}, got {spec!r}")
        for value in dim.ends():
            config_mod.override(cfg, {name: value}, where=f"{where} ({name}: {value!r})")
        dims.append(dim)
    if method is not None:
        dims = [d for d in dims if d.name not in inert(cfg, method)]
        if not dims:
            raise MediError(f"{where}: no param of the space can change method '{method}' "
                            f"(left out: {', '.join(sorted(inert(cfg, method)))})")
    return dims


def inert(cfg: Config, method: str) -> set[str]:
    """Params that cannot change a method's figures: the site strategy without site conditioning, attribute
    embeddings and their dropout without any attribute."""
    attributes = cfg.variant(cfg.probe.models[method])
    out = set() if "tss" in attributes else {"probe.strategy"}
    if not attributes:
        out |= {"model.d_e", "model.attribute_dropout", "model.continuous", "model.nested_dropout",
                "model.metadata_route", "sample.metadata_guidance"}
    return out


def study_name(cfg: Config, method: str) -> str:
    return f"{cfg.sweep.study}-{method}"


def trial_config(cfg: Config, values: dict[str, Any]) -> Config:
    return config_mod.override(cfg, values, where=f"{cfg.source_path}: sweep trial {values}")


def objective_value(tasks: dict[str, dict], objective: str, method: str) -> float:
    """The objective over the tasks scored so far: the mean of the method's validation figure (gain: minus
    none's)."""
    figures = [t["validation"]["arms"] for t in tasks.values() if "arms" in t.get("validation", {})]
    if not figures:
        raise MediError("sweep: no task has validation sites (a class needs two or more holdout sites to give one "
                        "to validation; see split.validation_fraction and artifacts/splits/sites.csv)")
    if objective == "gain":
        return float(np.mean([m[method]["tss_avg"] - m["none"]["tss_avg"] for m in figures]))
    return float(np.mean([m[method][objective] for m in figures]))


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------- a worker's state
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
        from medi import artifacts, probe, sampling

        spec = probe.encoder_spec(cfg)
        if spec.identity() not in self._embeddings:
            self._embeddings[spec.identity()] = probe.real_embeddings(cfg, spec, self.train_index, self.holdout_index,
                                                                      self.parts)
        s = cfg.sample
        sampler = _digest(sampling.weights_digest(model_dir), s.scheduler, s.steps, s.guidance, s.precision, s.seed,
                          *([] if s.metadata_guidance is None else [s.metadata_guidance]))
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
        from medi import artifacts, fid, sampling
        from medi.io import read_json, write_json
        from medi.model import MediDiffusion

        s, n = cfg.sample, cfg.sweep.fid_count
        key = _digest(sampling.weights_digest(model_dir), s.scheduler, s.steps, s.guidance, s.precision, s.seed, n,
                      {k: v for k, v in cfg.section_dict("fid").items() if k not in ("metrics", "cache")},
                      *([] if s.metadata_guidance is None else [s.metadata_guidance]))
        path = self.root / "fid" / f"{model_dir.name}-{key}.json"
        if key not in self._fid:
            with self._lock(path):
                if not path.exists():
                    from accelerate import PartialState

                    fcfg = config_mod.override(cfg, {"fid.curve_count": n})
                    model = MediDiffusion.load(model_dir).to(PartialState().device).eval()
                    hook = fid.curve_hook(fcfg, name, self.train_index, np.asarray(artifacts.load_tiles(cfg.data.output)))
                    record = {**hook(0, model), "images": n, "extractor": cfg.fid.extractor}
                    if cfg.fid.unseen_per_pair:
                        from medi import unseen

                        pairs = unseen.evaluate(fcfg, name, model=model)[0]
                        record |= unseen.figures_of(pairs)
                    write_json(path, record)
                self._fid[key] = read_json(path)
        return self._fid[key]


# ----------------------------------------------------------------------------------------------- a trial
def score(cfg: Config, method: str, ws: Workspace, on_task=None) -> dict:
    """The probe's figures of `method` (beside `none`) on the workspace's parts, for the trial's params: the
    model, the pool and the same evaluation function as `medi probe`."""
    from medi import probe

    model_dir = ws.model(cfg, cfg.probe.models[method])
    ctx = ws.context(cfg, method, model_dir)
    return probe.evaluate(cfg.probe, ctx, ws.parts, methods=["none", method], on_task=on_task, tune=False,
                          n_boot=cfg.probe.bootstrap if "test" in ws.parts else 0)


def run_trial(trial, cfg: Config, method: str, dims: list[Dimension], ws: Workspace, parent_run_id: str) -> float:
    """One trial: its params, what they need (model, pool), the probe task by task on the validation sites with
    pruning, FID beside."""
    import mlflow
    import optuna

    from medi import tracking

    values = {d.name: d.suggest(trial) for d in dims}
    t0 = time.perf_counter()
    ws.work = []

    def work() -> str:
        return ", ".join(ws.work) or "probe only"

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
                if cfg.sweep.objective != "fid":
                    running = objective_value(done, cfg.sweep.objective, method)
                    mlflow.log_metric("objective_running", running, step=len(done) - 1)
                    trial.report(running, len(done) - 1)
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"running objective {running:.4f} after {task}")

            score(tcfg, method, ws, after_task)
            for k in ("tss_avg", "overall", "worst_tss", "gain"):
                metrics[f"mean_{k}_validation"] = objective_value(done, k, method)
            value = metrics["fid"] if cfg.sweep.objective == "fid" else metrics[f"mean_{cfg.sweep.objective}_validation"]
            seconds = time.perf_counter() - t0
            metrics.update({"objective": value, "seconds": seconds})
            mlflow.log_metrics(metrics)
            mlflow.set_tag("medi.work", work())
            mlflow.tracking.MlflowClient().log_metric(parent_run_id, "trial_objective", value, step=trial.number)
            trial.set_user_attr("metrics", {k: metrics[k] for k in ("mean_tss_avg_validation", "mean_gain_validation",
                                                                    "fid", "seconds") if k in metrics})
            trial.set_user_attr("work", work())
            log.info("trial %d (%s): %s -> validation %s %.4f (%s; %.1fs)", trial.number, method, values,
                     cfg.sweep.objective, value, work(), seconds)
            return value
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


# ----------------------------------------------------------------------------------------------- the study
@functools.lru_cache(maxsize=None)
def storage(url: str, heartbeat: int = 30, grace_period: int = 120):
    """The RDB storage (one per process and URL: one connection pool), with a heartbeat so a trial whose worker died is failed (and its MLflow run with it):
    a running trial writes one every `heartbeat` s, and one silent for `grace_period` s is failed by the next
    worker that starts a trial. Its tables are created (or upgraded) under `tracking.store_lock`, so workers
    starting together on a fresh storage wait for the first instead of racing it."""
    import optuna

    from medi import tracking

    kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings(), tracking.store_lock(url):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat,
                                              grace_period=grace_period, heartbeat_stale_trial_callback=_fail_stale_run)
        except Exception as exc:  # noqa: BLE001  (sqlalchemy: a bad URL, a missing driver, a server down)
            raise MediError(f"sweep.storage {url!r}: cannot open the Optuna storage: {exc}") from None


def _fail_stale_run(study, trial) -> None:
    from mlflow.tracking import MlflowClient

    run_id = trial.user_attrs.get(RUN_ATTR)
    if run_id:
        client = MlflowClient()
        client.set_terminated(run_id, "FAILED")
        client.set_tag(run_id, "optuna.state", "FAIL")
        worker = trial.user_attrs.get("worker", "?")
        client.set_tag(run_id, "medi.error", f"its worker ({worker}) stopped sending heartbeats")
    log.warning("trial %d of %s failed: its worker stopped sending heartbeats", trial.number, study.study_name)


def make_sampler(cfg: Config, dims: list[Dimension], seed_offset: int = 0):
    import optuna

    sw, seed = cfg.sweep, cfg.sweep.seed + seed_offset
    if sw.sampler == "grid":
        return optuna.samplers.GridSampler({d.name: d.grid_values() for d in dims}, seed=seed)
    if sw.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=sw.startup_trials, multivariate=True, constant_liar=True)


def make_pruner(cfg: Config):
    """Prune a trial whose running objective after a task is below the median (or the lower quartile) of the
    earlier trials' at that task, once `startup_trials` trials have finished."""
    import optuna

    sw = cfg.sweep
    if sw.pruner == "none":
        return optuna.pruners.NopPruner()
    # PercentilePruner(p) keeps the top p % at a step: 75 prunes the bottom quartile only.
    return optuna.pruners.PercentilePruner(50.0 if sw.pruner == "median" else 75.0, n_startup_trials=sw.startup_trials)


def open_study(cfg: Config, method: str, dims: list[Dimension]):
    """Create the method's study (and its MLflow run) or load it; creating is atomic in the RDB, so of several
    workers starting together exactly one creates both and the others wait for the run id."""
    import mlflow
    import optuna

    from medi import tracking

    sw, name = cfg.sweep, study_name(cfg, method)
    direction = "maximize" if sw.objective in MAXIMISE else "minimize"
    store = storage(sw.storage, sw.heartbeat, sw.grace_period)
    sampler, pruner = make_sampler(cfg, dims), make_pruner(cfg)
    tracking.configure(cfg.tracking)
    try:
        study = optuna.create_study(storage=store, study_name=name, direction=direction, sampler=sampler, pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=store, sampler=sampler, pruner=pruner)
        if study.direction.name.lower() != direction:
            raise MediError(f"study '{name}' in {sw.storage} {study.direction.name.lower()}s, but sweep.objective "
                            f"{sw.objective} is to {direction}; name another study (sweep.study)") from None
        for _ in range(600):
            if RUN_ATTR in study.user_attrs:
                return study
            time.sleep(0.1)
        raise MediError(f"study '{name}' has no MLflow run id after 60 s; was it created by another tool?") from None
    with mlflow.start_run(run_name=f"sweep-{name}", tags={**tracking.run_tags(cfg, "sweep", ("sweep",)),
                                                        "medi.study": name, "medi.method": method}) as run:
        mlflow.log_params({"study": name, "storage": sw.storage, "objective": sw.objective, "method": method,
                           "split": "validation", "direction": direction, "sampler": sw.sampler, "pruner": sw.pruner,
                           "space": json.dumps({d.name: sw.space[d.name] for d in dims})[:6000]})
        study.set_user_attr(RUN_ATTR, run.info.run_id)
        study.set_user_attr("objective", sw.objective)
        study.set_user_attr("method", method)
    return study


def optimise(cfg: Config, method: str, n_trials: int, worker: int = 0) -> None:
    """One worker of one method's study: `n_trials` trials (or fewer, at sweep.timeout). Its sampler seed
    differs from other workers' and from earlier calls' (seed + 1000 x worker + trials so far), so none repeats
    another's draws. Its workspace holds the validation sites only."""
    import optuna

    dims = parse_space(cfg, method)
    ws = Workspace(cfg, ("validation",))
    study = open_study(cfg, method, dims)
    study.sampler = make_sampler(cfg, dims, seed_offset=1000 * worker + len(study.trials))
    parent = study.user_attrs[RUN_ATTR]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.optimize(lambda t: run_trial(t, cfg, method, dims, ws, parent), n_trials=n_trials,
                       timeout=cfg.sweep.timeout or None, catch=(Exception,))


def run(cfg: Config, params_args: list[str], trials: int | None = None, workers: int | None = None) -> dict:
    """`medi sweep`: add `trials` trials to each method's study with `workers` processes, score each study's
    best trial once on the test sites, and summarise."""
    from mlflow.tracking import MlflowClient

    trials = trials or cfg.sweep.trials
    workers = workers or cfg.sweep.workers
    summaries = {}
    for method in cfg.sweep.methods:
        dims = parse_space(cfg, method)
        log.info("sweep %s: %d param(s) (%s), objective %s of %s on the validation sites, storage %s",
                 study_name(cfg, method), len(dims),
                 ", ".join(f"{d.name} [{SWEEPABLE[d.name.split('.')[0]]}]" for d in dims), cfg.sweep.objective,
                 method, cfg.sweep.storage)
        study = open_study(cfg, method, dims)
        MlflowClient().update_run(study.user_attrs[RUN_ATTR], status="RUNNING")
        t0 = time.perf_counter()
        dead: dict[str, int] = {}
        if workers == 1:
            optimise(cfg, method, trials)
        else:                               # the trials split between processes; the cores too
            threads = max(1, (os.cpu_count() or 1) // workers)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            shares = [trials // workers + (w < trials % workers) for w in range(workers)]
            procs = [subprocess.Popen([sys.executable, "-m", "medi.cli", *params_args, "--set", f"probe.workers={threads}",
                                       "sweep", "--method", method, "--worker", str(w), "--trials", str(n)], env=env)
                     for w, n in enumerate(shares) if n]
            codes = [p.wait() for p in procs]
            names = [f"{socket.gethostname()}:{p.pid}" for p in procs]       # trial user attr "worker"
            dead = {name: code for name, code in zip(names, codes) if code}
            if dead:
                replace_dead_workers(cfg, method, dims, trials, names, dead)
        summary = summarise(cfg, method)
        if dead:
            summary["dead_workers"] = dead
        summary["call_seconds"] = time.perf_counter() - t0
        summaries[method] = summary
        log.info("study %s: %d trials (%s); best validation %s = %s, on the test sites %s, with %s; reports in %s",
                 summary["study"], summary["trials"], summary["states"], cfg.sweep.objective,
                 summary.get("best_value"), summary.get("best_test", {}).get("value"), summary.get("best_params"),
                 Path(cfg.sweep.reports) / summary["study"])
    return summaries


def replace_dead_workers(cfg: Config, method: str, dims: list[Dimension], trials: int, names: list[str],
                         dead: dict[str, int]) -> None:
    """Worker processes of this call died (killed, out of memory): wait until the heartbeat has failed the
    trials they left running (in Optuna and MLflow), then run the trials they did not do here, so the call
    still adds `trials` trials to the study."""
    import optuna

    log.warning("sweep worker(s) %s exited with %s; their running trials fail after %d s without a heartbeat, then "
                "their remaining trials run here", ", ".join(dead), list(dead.values()), cfg.sweep.grace_period)
    study = open_study(cfg, method, dims)
    deadline = time.time() + cfg.sweep.grace_period + 3 * cfg.sweep.heartbeat + 60
    while [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
           if t.user_attrs.get("worker") in dead]:
        if time.time() > deadline:
            raise MediError(f"trials of the dead sweep workers {sorted(dead)} are still RUNNING after the grace period")
        time.sleep(cfg.sweep.heartbeat)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    done = sum(t.user_attrs.get("worker") in names for t in study.get_trials(deepcopy=False))
    if trials > done:
        optimise(cfg, method, trials - done, worker=len(names))


# ----------------------------------------------------------------------------------------------- the summary
def best_on_test(cfg: Config, study, method: str, dims: list[Dimension]) -> dict:
    """The best trial's figures on the test sites, computed once per best trial and kept in the study: the
    figure to quote (the validation value that chose it is optimistic). Never read by the search."""
    best = study.best_trial
    stored = study.user_attrs.get("best_test", {})
    if stored.get("trial") == best.number:
        return stored
    tcfg = trial_config(cfg, {d.name: best.params[d.name] for d in dims if d.name in best.params})
    ws = Workspace(cfg, ("test",))
    result = score(tcfg, method, ws)
    tasks = {t: f["test"] for t, f in result["tasks"].items() if "arms" in f.get("test", {})}
    objective = cfg.sweep.objective
    if objective == "fid":
        value = best.value
    elif objective == "gain":
        value = float(np.mean([f["arms"][method]["tss_avg"] - f["arms"]["none"]["tss_avg"] for f in tasks.values()]))
    else:
        value = float(np.mean([f["arms"][method][objective] for f in tasks.values()]))
    out = {"trial": best.number, "objective": objective, "value": value, "split": "test",
           "tasks": {t: {**{k: v for k, v in f["arms"][method].items() if k.startswith("tss_avg")},
                         "none_tss_avg": f["arms"]["none"]["tss_avg"],
                         f"{method}-none": f["differences"].get(f"{method}-none", {})} for t, f in tasks.items()}}
    study.set_user_attr("best_test", out)
    return out


def trials_table(study) -> str:
    lines = [f"Study `{study.study_name}`: objective {study.user_attrs.get('objective')} of "
             f"{study.user_attrs.get('method')} on the validation sites ({study.direction.name.lower()}).",
             "", "| trial | state | validation value | params | FID | work | seconds |", "|---|---|---|---|---|---|---|"]
    for t in study.get_trials(deepcopy=False):
        m = t.user_attrs.get("metrics", {})
        seconds = m.get("seconds") or (t.duration.total_seconds() if t.duration else float("nan"))
        value = f"{t.value:.4f}" if t.value is not None else "-"
        if t.state.name == "PRUNED" and t.intermediate_values:      # Optuna keeps the last running value
            step = max(t.intermediate_values)
            value = f"({t.intermediate_values[step]:.4f} after task {step + 1})"
        fid = f"{m['fid']:.4g}" if "fid" in m else "-"
        params = ", ".join(f"{k}={v}" for k, v in t.params.items())
        lines.append(f"| {t.number} | {t.state.name} | {value} | {params} | {fid} | {t.user_attrs.get('work', '-')} "
                     f"| {seconds:.1f} |")
    best = study.user_attrs.get("best_test")
    if best:
        lines += ["", f"Best trial {best['trial']} scored once on the **test** sites: {best['objective']} "
                  f"{best['value']:.4f} (its validation value above chose it and is optimistic)."]
    return "\n".join(lines) + "\n"


def time_per_trial(study) -> dict[str, dict[str, float]]:
    """Median seconds of finished trials by what they had to do (trained / new pool / probe only)."""
    by: dict[str, list[float]] = {}
    for t in study.get_trials(deepcopy=False):
        if t.state.name in ("COMPLETE", "PRUNED") and t.duration is not None:
            by.setdefault(t.user_attrs.get("work", "?"), []).append(t.duration.total_seconds())
    return {k: {"trials": len(v), "median_seconds": float(np.median(v))} for k, v in by.items()}


def summarise(cfg: Config, method: str) -> dict:
    """Best params, the best trial on the test sites, figures and the trials table: to `sweep.reports`/STUDY
    and to the study's MLflow run."""
    import optuna
    from mlflow.tracking import MlflowClient

    from medi import figures, tracking
    from medi.io import write_json, write_text

    tracking.configure(cfg.tracking)
    name = study_name(cfg, method)
    study = optuna.load_study(study_name=name, storage=storage(cfg.sweep.storage, cfg.sweep.heartbeat,
                                                               cfg.sweep.grace_period))
    client, run_id = MlflowClient(), study.user_attrs[RUN_ATTR]
    states: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        states[t.state.name] = states.get(t.state.name, 0) + 1
    out = Path(cfg.sweep.reports) / name
    summary: dict[str, Any] = {"study": name, "method": method, "storage": cfg.sweep.storage,
                               "objective": cfg.sweep.objective, "split": "validation",
                               "direction": study.direction.name.lower(), "trials": sum(states.values()),
                               "states": states, "time_per_trial": time_per_trial(study)}
    if states.get("COMPLETE"):
        best = study.best_trial
        summary.update({"best_value": best.value, "best_params": best.params, "best_trial": best.number,
                        "best_metrics": best.user_attrs.get("metrics", {}),
                        "best_test": best_on_test(cfg, study, method, parse_space(cfg, method))})
        client.log_metric(run_id, "best_value_validation", best.value, step=len(study.trials))
        client.log_metric(run_id, "best_value_test", summary["best_test"]["value"], step=len(study.trials))
        for k, v in best.params.items():
            client.set_tag(run_id, f"best.{k}", str(v))
        client.set_tag(run_id, "best.trial", str(best.number))
    plots = {"optimization_history": optuna.visualization.matplotlib.plot_optimization_history,
             "param_importances": optuna.visualization.matplotlib.plot_param_importances,
             "parallel_coordinate": optuna.visualization.matplotlib.plot_parallel_coordinate}
    with warnings.catch_warnings():       # experimental plots; constant params warn about flat axes
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)
        for plot_name, plot in plots.items():
            try:
                ax = plot(study)
            except (ValueError, RuntimeError) as exc:      # e.g. importances need two complete trials
                log.warning("no %s figure yet: %s", plot_name, exc)
                summary.setdefault("figures_skipped", {})[plot_name] = str(exc)
                continue
            fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).figure
            fig.suptitle(f"study {name}: {cfg.sweep.objective} of {method} on the validation sites "
                         f"({summary['direction']}), {summary['trials']} trials", fontsize=9)
            fig.set_size_inches(8, 4.5)
            fig.tight_layout()
            path = figures.save(fig, out / f"{plot_name}.png")
            client.log_artifact(run_id, str(path), "study")
        try:
            summary["importances"] = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError) as exc:
            summary["importances"] = {}
            log.info("no parameter importances yet: %s", exc)
    write_text(out / "study.md", trials_table(study))
    write_json(out / "study.json", summary)
    client.log_artifact(run_id, str(out / "study.md"), "study")
    client.log_artifact(run_id, str(out / "study.json"), "study")
    client.set_terminated(run_id, "FINISHED")
    return summary
