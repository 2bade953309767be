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

The objective may also be a figure of the unseen-pairs evaluation (`pairs_unseen_stain_rank`, `..._site_accuracy`,
`..._class_accuracy`, and the `pairs_seen_` ones; `medi.unseen`, on training sites only), computed with the FID's
images budget (`sweep.fid_count` > 0). A list of figures makes a multi-objective study (Optuna, one direction
each, no pruning): e.g. [pairs_unseen_stain_rank, pairs_unseen_class_accuracy] maps the trade-off between carrying
a site's stain to classes it never sent and keeping the class (docs/conditioning.md) as a Pareto front. A study
of unseen-pairs figures alone trains and samples what its trials change, but builds no pool and fits no probe.

After each call the best trial of each study is scored once on the **test** sites (`best_test` in its
summary, beside `best_value` on validation, each labelled): that is the figure to quote, and it never feeds
back into the search. A multi-objective study has no single best: each trial of its Pareto front (no other trial
better on every objective) is scored so, and the summary lists them (`pareto_front`), with a Pareto-front figure
and one history, importance and parallel-coordinates figure per objective.

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
import json
import logging
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from medi import config as config_mod
from medi import runtime
from medi.config import Config
from medi.errors import MediError
from medi.space import SWEEPABLE, Dimension, parse_space, scope, split_of, study_name, trial_config
from medi import trial as medi_trial
from medi.trial import RUN_ATTR, Workspace, score

log = logging.getLogger(__name__)

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def directions(cfg: Config) -> list[str]:
    """Optuna's direction of each objective of `sweep.objective`, in order: the probe's figures and every accuracy are
    maximised, the FID and the stain ranks minimised."""
    return ["maximize" if o in config_mod.PROBE_OBJECTIVES or o.endswith("_accuracy") else "minimize"
            for o in cfg.sweep.objectives]


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


def objective_label(cfg: Config) -> str:
    return ", ".join(cfg.sweep.objectives)


def open_study(cfg: Config, method: str, dims: list[Dimension]):
    """Create the method's study (and its MLflow run) or load it; creating is atomic in the RDB, so of several
    workers starting together exactly one creates both and the others wait for the run id."""
    import mlflow
    import optuna

    from medi import tracking

    sw, name, wanted = cfg.sweep, study_name(cfg, method), directions(cfg)
    store = storage(sw.storage, sw.heartbeat, sw.grace_period)
    sampler, pruner = make_sampler(cfg, dims), make_pruner(cfg)
    tracking.configure(cfg.tracking)
    try:
        study = optuna.create_study(storage=store, study_name=name, directions=wanted, sampler=sampler, pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=store, sampler=sampler, pruner=pruner)
        have = [d.name.lower() for d in study.directions]
        if have != wanted or study.user_attrs.get("objective", objective_label(cfg)) != objective_label(cfg):
            raise MediError(f"study '{name}' in {sw.storage} optimises {study.user_attrs.get('objective', '?')} "
                            f"({', '.join(have)}), but sweep.objective is {objective_label(cfg)} "
                            f"({', '.join(wanted)}); name another study (sweep.study)") from None
        for _ in range(600):
            if RUN_ATTR in study.user_attrs:
                return study
            time.sleep(0.1)
        raise MediError(f"study '{name}' has no MLflow run id after 60 s; was it created by another tool?") from None
    with mlflow.start_run(run_name=f"sweep-{name}", tags={**tracking.run_tags(cfg, "sweep", ("sweep",)),
                                                        "medi.study": name, "medi.method": method}) as run:
        mlflow.log_params({"study": name, "storage": sw.storage, "objective": objective_label(cfg), "method": method,
                           "split": split_of(sw.objectives), "direction": ",".join(wanted), "sampler": sw.sampler,
                           "pruner": sw.pruner,
                           "space": json.dumps({d.name: sw.space[d.name] for d in dims})[:6000]})
        study.set_user_attr(RUN_ATTR, run.info.run_id)
        study.set_user_attr("objective", objective_label(cfg))
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
        study.optimize(lambda t: medi_trial.run_trial(t, cfg, method, dims, ws, parent), n_trials=n_trials,
                       timeout=cfg.sweep.timeout or None, catch=(Exception,))


def start_workers(cfg: Config, method: str, shares: list[tuple[int, int]]) -> list:
    """Worker processes of one method's study, (worker number, trials) each: fresh interpreters (spawn) given
    the parsed config itself, each with its share of the cores for torch and the probe."""
    import multiprocessing

    threads = max(1, (os.cpu_count() or 1) // len(shares))
    wcfg = config_mod.override(cfg, {"probe.workers": threads})
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_worker, args=(wcfg, method, n, w, threads, logging.getLogger().level),
                           name=f"medi-sweep-{method}-{w}") for w, n in shares]
    saved = {k: os.environ.get(k) for k in THREAD_ENV}
    os.environ.update({k: str(threads) for k in THREAD_ENV})       # read by the children's OpenMP at start
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return procs


def _worker(cfg: Config, method: str, n_trials: int, worker: int, threads: int, level: int) -> None:
    """The body of a spawned worker: `optimise`; bad input exits 2 with its message, as `medi` does."""
    import torch

    runtime.setup(level)
    torch.set_num_threads(threads)
    try:
        optimise(cfg, method, n_trials, worker)
    except MediError as exc:
        print(f"medi sweep worker {worker}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def run(cfg: Config, trials: int | None = None, workers: int | None = None) -> dict:
    """`medi sweep`: add `trials` trials to each method's study with `workers` processes, score each study's
    best trial (several objectives: each trial of its Pareto front) once on the test sites, and summarise."""
    from mlflow.tracking import MlflowClient

    trials = trials or cfg.sweep.trials
    workers = workers or cfg.sweep.workers
    summaries = {}
    for method in cfg.sweep.methods:
        dims = parse_space(cfg, method)
        log.info("sweep %s: %d param(s) (%s), objective %s of %s %s, storage %s",
                 study_name(cfg, method), len(dims),
                 ", ".join(f"{d.name} [{SWEEPABLE[d.name.split('.')[0]]}]" for d in dims), objective_label(cfg),
                 method, scope(cfg.sweep.objectives), cfg.sweep.storage)
        study = open_study(cfg, method, dims)
        MlflowClient().update_run(study.user_attrs[RUN_ATTR], status="RUNNING")
        t0 = time.perf_counter()
        dead: dict[str, int] = {}
        if workers == 1:
            optimise(cfg, method, trials)
        else:                               # the trials split between processes; the cores too
            shares = [trials // workers + (w < trials % workers) for w in range(workers)]
            procs = start_workers(cfg, method, [(w, n) for w, n in enumerate(shares) if n])
            for p in procs:
                p.join()
            names = [f"{socket.gethostname()}:{p.pid}" for p in procs]       # trial user attr "worker"
            dead = {name: p.exitcode for name, p in zip(names, procs) if p.exitcode}
            if dead:
                replace_dead_workers(cfg, method, dims, trials, names, dead)
        summary = summarise(cfg, method)
        if dead:
            summary["dead_workers"] = dead
        summary["call_seconds"] = time.perf_counter() - t0
        summaries[method] = summary
        if "pareto_front" in summary:
            log.info("study %s: %d trials (%s); Pareto front of %s %s: %s; reports in %s", summary["study"],
                     summary["trials"], summary["states"], objective_label(cfg), scope(cfg.sweep.objectives),
                     "; ".join(f"trial {f['trial']} {f['values']} with {f['params']}" for f in summary["pareto_front"]),
                     Path(cfg.sweep.reports) / summary["study"])
        else:
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
def on_test(cfg: Config, trial, method: str, dims: list[Dimension]) -> dict:
    """Trial `trial`'s objectives on the test sites, the figures to quote (the validation values that chose it are
    optimistic); never read by the search. The probe's figures are measured there; FID and the unseen-pairs
    figures read no validation or test site, so they are the trial's own. A study of unseen-pairs figures alone
    runs no probe (`trial.runs_probe`), here either."""
    objectives, values = cfg.sweep.objectives, trial.values
    out: dict[str, Any] = {"trial": trial.number, "objective": objective_label(cfg), "split": "test"}
    tasks: dict = {}
    if medi_trial.runs_probe(cfg):
        tcfg = trial_config(cfg, {d.name: trial.params[d.name] for d in dims if d.name in trial.params})
        result = score(tcfg, method, Workspace(cfg, ("test",)))
        tasks = {t: f["test"] for t, f in result["tasks"].items() if "arms" in f.get("test", {})}
        out["tasks"] = {t: {**{k: v for k, v in f["arms"][method].items() if k.startswith("tss_avg")},
                            "none_tss_avg": f["arms"]["none"]["tss_avg"],
                            f"{method}-none": f["differences"].get(f"{method}-none", {})} for t, f in tasks.items()}
    else:
        out["split"] = "none (the unseen-pairs evaluation reads training sites only)"
    measured = []
    for objective, value in zip(objectives, values):
        if objective == "gain":
            value = float(np.mean([f["arms"][method]["tss_avg"] - f["arms"]["none"]["tss_avg"]
                                   for f in tasks.values()]))
        elif objective in config_mod.PROBE_OBJECTIVES:
            value = float(np.mean([f["arms"][method][objective] for f in tasks.values()]))
        measured.append(value)
    out["values"] = dict(zip(objectives, measured))
    if len(objectives) == 1:
        out["value"] = measured[0]
    return out


def best_on_test(cfg: Config, study, method: str, dims: list[Dimension]) -> dict:
    """The best trial on the test sites (`on_test`), computed once per best trial and kept in the study."""
    stored = study.user_attrs.get("best_test", {})
    if stored.get("trial") == study.best_trial.number:
        return stored
    out = on_test(cfg, study.best_trial, method, dims)
    study.set_user_attr("best_test", out)
    return out


def front_on_test(cfg: Config, study, method: str, dims: list[Dimension]) -> list[dict]:
    """A multi-objective study's Pareto front (its best trials on validation), each with its values, params and
    its figures on the test sites (`on_test`, computed once per trial and kept in the study)."""
    stored = study.user_attrs.get("front_test", {})
    front = sorted(study.best_trials, key=lambda t: t.number)
    tests = {str(t.number): stored.get(str(t.number)) or on_test(cfg, t, method, dims) for t in front}
    if tests != stored:
        study.set_user_attr("front_test", tests)
    return [{"trial": t.number, "values": dict(zip(cfg.sweep.objectives, t.values)), "params": t.params,
             "test": tests[str(t.number)]} for t in front]


def trials_table(study) -> str:
    label = study.user_attrs.get("objective", "")
    lines = [f"Study `{study.study_name}`: objective {label} of {study.user_attrs.get('method')} "
             f"{scope(label.split(', '))} ({', '.join(d.name.lower() for d in study.directions)}).",
             "", "| trial | state | value | params | FID | work | seconds |", "|---|---|---|---|---|---|---|"]
    for t in study.get_trials(deepcopy=False):
        m = t.user_attrs.get("metrics", {})
        seconds = m.get("seconds") or (t.duration.total_seconds() if t.duration else float("nan"))
        value = " / ".join(f"{v:.4f}" for v in t.values) if t.values is not None else "-"
        if t.state.name == "PRUNED" and t.intermediate_values:      # Optuna keeps the last running value
            step = max(t.intermediate_values)
            value = f"({t.intermediate_values[step]:.4f} after task {step + 1})"
        fid = f"{m['fid']:.4g}" if "fid" in m else "-"
        params = ", ".join(f"{k}={v}" for k, v in t.params.items())
        lines.append(f"| {t.number} | {t.state.name} | {value} | {params} | {fid} | {t.user_attrs.get('work', '-')} "
                     f"| {seconds:.1f} |")
    best = study.user_attrs.get("best_test") if len(study.directions) == 1 else None
    if best and best["split"] == "test":
        lines += ["", f"Best trial {best['trial']} scored once on the **test** sites: {best['objective']} "
                  f"{best['value']:.4f} (its validation value above chose it and is optimistic)."]
    elif best:
        lines += ["", f"Best trial {best['trial']}: {best['objective']} {best['value']:.4f} (split: {best['split']})."]
    front = study.user_attrs.get("front_test", {}) if len(study.directions) > 1 else {}
    if front:
        lines += ["", f"Pareto front ({len(front)} trial{'s' * (len(front) != 1)}: no other trial is better on every "
                  f"objective), each scored once on the **test** sites where the probe is an objective:", ""]
        for number, test in sorted(front.items(), key=lambda kv: int(kv[0])):
            values = ", ".join(f"{k} {v:.4f}" for k, v in test["values"].items())
            lines.append(f"- trial {number}: {values} (split: {test['split']})")
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
    objectives = cfg.sweep.objectives
    summary: dict[str, Any] = {"study": name, "method": method, "storage": cfg.sweep.storage,
                               "objective": cfg.sweep.objective, "split": split_of(objectives),
                               "direction": ", ".join(d.name.lower() for d in study.directions),
                               "trials": sum(states.values()), "states": states,
                               "time_per_trial": time_per_trial(study)}
    dims = parse_space(cfg, method)
    if states.get("COMPLETE") and len(objectives) > 1:
        summary["pareto_front"] = front_on_test(cfg, study, method, dims)
        client.log_metric(run_id, "pareto_trials", len(summary["pareto_front"]), step=len(study.trials))
        client.set_tag(run_id, "pareto.trials", ",".join(str(f["trial"]) for f in summary["pareto_front"]))
    elif states.get("COMPLETE"):
        best = study.best_trial
        summary.update({"best_value": best.value, "best_params": best.params, "best_trial": best.number,
                        "best_metrics": best.user_attrs.get("metrics", {}),
                        "best_test": best_on_test(cfg, study, method, dims)})
        client.log_metric(run_id, "best_value_validation", best.value, step=len(study.trials))
        client.log_metric(run_id, "best_value_test", summary["best_test"]["value"], step=len(study.trials))
        for k, v in best.params.items():
            client.set_tag(run_id, f"best.{k}", str(v))
        client.set_tag(run_id, "best.trial", str(best.number))
    vis = optuna.visualization.matplotlib
    targets = ([(o, lambda t, i=i: t.values[i]) for i, o in enumerate(objectives)] if len(objectives) > 1
               else [("", None)])      # ("", None): the single objective, as Optuna names it
    plots = {f"{kind}{'_' + o if o else ''}": functools.partial(plot, target=target, target_name=o or "Objective Value")
             for kind, plot in (("optimization_history", vis.plot_optimization_history),
                                ("param_importances", vis.plot_param_importances),
                                ("parallel_coordinate", vis.plot_parallel_coordinate)) for o, target in targets}
    if len(objectives) > 1:     # the trade-off itself: every trial's values, the front marked
        plots["pareto_front"] = functools.partial(vis.plot_pareto_front, target_names=list(objectives))
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
            fig.suptitle(f"study {name}: {objective_label(cfg)} of {method} {scope(objectives)} "
                         f"({summary['direction']}), {summary['trials']} trials", fontsize=9)
            fig.set_size_inches(8, 4.5)
            fig.tight_layout()
            path = figures.save(fig, out / f"{plot_name}.png")
            client.log_artifact(run_id, str(path), "study")
        try:
            summary["importances"] = {o: optuna.importance.get_param_importances(study, target=target)
                                      for o, target in targets}
            if len(objectives) == 1:
                summary["importances"] = summary["importances"][""]
        except (ValueError, RuntimeError) as exc:
            summary["importances"] = {}
            log.info("no parameter importances yet: %s", exc)
    write_text(out / "study.md", trials_table(study))
    write_json(out / "study.json", summary)
    client.log_artifact(run_id, str(out / "study.md"), "study")
    client.log_artifact(run_id, str(out / "study.json"), "study")
    client.set_terminated(run_id, "FINISHED")
    return summary
