"""Optuna sweeps: the search space from params, one study per method with equal budgets, trials as nested MLflow
runs, continuation, parallel workers, failed and pruned trials, trials that train, and an objective that reads
the validation sites only (the best trial is scored once on the test sites)."""
from __future__ import annotations

import os
import json
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest

from medi import cli, config, space, sweep, trial
from medi.errors import MediError
from helpers import save_pipeline_model, write_params

PROBE_SPACE = {"probe.strategy": ["grid", "unseen", "balanced", "uniform"],
               "probe.ratio": {"low": 0.5, "high": 2.0, "step": 0.5}, "sample.steps": [1, 2]}


@pytest.mark.parametrize("bad, message", [
    ({}, "sweep.space is empty"),
    ({"model.d_ee": [8]}, "unknown key.*model.d_ee"),
    ({"data.resolution": [16]}, "'data.resolution' cannot be swept"),
    ({"d_e": [8]}, "'d_e' cannot be swept"),
    ({"probe.strategy": ["grid", "diagonal"]}, r"probe.strategy: 'diagonal'.*expected one of 'grid'"),
    ({"probe.ratio": {"low": 2.0, "high": 1.0}}, "needs numbers low < high"),
    ({"probe.ratio": {"low": 0.5}}, "needs {low, high}"),
    ({"sample.steps": []}, "'sample.steps' has no choices"),
])
def test_a_bad_search_space_is_a_clear_error(make_cfg, bad, message):
    with pytest.raises(MediError, match=message):
        space.parse_space(make_cfg(sweep__space=bad))


def test_a_trial_config_is_validated_like_params(make_cfg):
    cfg = make_cfg()
    trial = space.trial_config(cfg, {"model.d_e": 8, "probe.strategy": "unseen"})
    assert (trial.model.d_e, trial.probe.strategy, trial.probe.ratio) == (8, "unseen", cfg.probe.ratio)
    with pytest.raises(MediError, match=r"sweep trial \{'probe.ratio': -1.0\}: 'probe.ratio' must be >= 0, got -1.0"):
        space.trial_config(cfg, {"probe.ratio": -1.0})
    with pytest.raises(MediError, match=r"key 'probe.strategy': expected one of .*got 'diagonal'"):
        space.trial_config(cfg, {"probe.strategy": "diagonal"})
    with pytest.raises(MediError, match=r"'probe.retio' is not a param|unknown key"):
        space.trial_config(cfg, {"probe.retio": 1.0})
    with pytest.raises(MediError, match="sweep.methods"):
        make_cfg(sweep__methods=["none"])
    with pytest.raises(MediError, match="sweep.methods"):
        make_cfg(sweep__methods=[])
    with pytest.raises(MediError, match="sweep.objective is 'fid' but sweep.fid_count is 0"):
        make_cfg(sweep__objective="fid", sweep__fid_count=0)


def test_the_grid_sampler_needs_a_step_for_ranges(make_cfg):
    cfg = make_cfg(sweep__sampler="grid", sweep__space={"probe.ratio": {"low": 0.5, "high": 3.0}})
    with pytest.raises(MediError, match="'probe.ratio' is a range without a step"):
        sweep.make_sampler(cfg, space.parse_space(cfg))
    cfg = make_cfg(sweep__sampler="grid", sweep__space={"probe.ratio": {"low": 0.5, "high": 1.5, "step": 0.5},
                                                         "model.d_e": {"low": 8, "high": 16, "step": 8}})
    assert [d.grid_values() for d in space.parse_space(cfg)] == [[0.5, 1.0, 1.5], [8, 16]]


@pytest.mark.parametrize("pruner, pruned", [("quartile", [0.1]), ("median", [0.1, 0.22]), ("none", [])])
def test_pruners_stop_trials_below_the_lower_quartile_or_the_median(make_cfg, pruner, pruned):
    study = optuna.create_study(direction="maximize", pruner=sweep.make_pruner(make_cfg(sweep__pruner=pruner,
                                                                                          sweep__startup_trials=4)))
    for value in (0.1, 0.2, 0.3, 0.4):                               # earlier trials' running value after task 1
        t = study.ask()
        t.report(value, 0)
        study.tell(t, value)
    verdicts = {}
    for value in (0.1, 0.22, 0.35):             # quartiles of the earlier trials: 0.175 (lower), 0.25 (median)
        t = study.ask()
        t.report(value, 0)
        verdicts[value] = t.should_prune()                          # (left running: not among the earlier)
    assert [v for v, prune in verdicts.items() if prune] == pruned




def sweep_cli(params: str, *args: str) -> int:
    return cli.main(["--params", str(params), "sweep", *args])


def study_runs(cfg, study: str) -> tuple[mlflow.entities.Run, list[mlflow.entities.Run]]:
    mlflow.set_tracking_uri(cfg.tracking.uri)
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list",
                              filter_string=f"tags.`medi.study` = '{study}'")
    (parent,) = [r for r in runs if r.data.tags["medi.stage"] == "sweep"]
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


@pytest.mark.processes
def test_a_probe_side_study_continues_runs_workers_in_parallel_and_tracks_every_trial(tiny_world, tmp_path):
    cfg = tiny_world(sweep__space=PROBE_SPACE, sweep__trials=4, sweep__startup_trials=2, sweep__fid_count=8,
                     sweep__pruner="median", sweep__methods=["medi"], fid__unseen_per_pair=2)
    save_pipeline_model(cfg)
    params = write_params(cfg, tmp_path / "params.yaml")

    assert sweep_cli(params) == 0
    name = f"{cfg.sweep.study}-medi"
    study = optuna.load_study(study_name=name, storage=cfg.sweep.storage)
    assert len(study.trials) == 4
    first = study.trials[0]
    assert "new pool" in first.user_attrs["work"]                    # the pipeline's model, a pool for its sampler
    assert not any("trained" in t.user_attrs.get("work", "") for t in study.trials)
    assert {"mean_tss_avg_validation", "fid", "seconds"} <= set(first.user_attrs["metrics"])
    parent, children = study_runs(cfg, name)
    assert len(children) == 4 and parent.info.status == "FINISHED"
    assert {c.data.params["probe.strategy"] for c in children} <= set(PROBE_SPACE["probe.strategy"])
    done = [c for c in children if c.info.status == "FINISHED"]
    assert done and all({"objective", "fid", "mean_tss_avg_validation", "nsclc_medi_tss_avg_validation",
                         "pairs_unseen_site_accuracy", "pairs_unseen_stain_rank"} <= set(c.data.metrics) for c in done)
    assert parent.data.tags["best.trial"] == str(study.best_trial.number)
    history = mlflow.tracking.MlflowClient().get_metric_history(parent.info.run_id, "trial_objective")
    assert {(m.step, m.value) for m in history} == {(t.number, t.value) for t in study.trials if t.state.name == "COMPLETE"}
    reports = Path(cfg.sweep.reports) / name
    for fig in ("optimization_history.png", "parallel_coordinate.png", "param_importances.png", "study.md"):
        assert (reports / fig).stat().st_size > 500, fig
    summary = json.loads((reports / "study.json").read_text())
    assert summary["trials"] == 4 and summary["best_params"] == study.best_trial.params
    assert summary["split"] == "validation" and summary["best_test"]["split"] == "test"
    assert summary["best_test"]["trial"] == study.best_trial.number and 0 <= summary["best_test"]["value"] <= 1
    assert "scored once on the **test** sites" in (reports / "study.md").read_text()
    assert {"best_value_validation", "best_value_test"} <= set(mlflow.tracking.MlflowClient().get_run(
        parent.info.run_id).data.metrics)
    client = mlflow.tracking.MlflowClient()
    assert {"study/optimization_history.png", "study/study.md"} <= {
        f.path for f in client.list_artifacts(parent.info.run_id, "study")}

    assert sweep_cli(params, "--trials", "2") == 0                  # the same study, continued
    assert sweep_cli(params, "--trials", "2", "--workers", "2") == 0  # two processes on one storage
    study = optuna.load_study(study_name=name, storage=cfg.sweep.storage)
    assert len(study.trials) == 8
    workers = [t.user_attrs["worker"] for t in study.trials]
    assert len(set(workers[:6])) == 1 and len(set(workers[6:])) == 2 and workers[0] not in workers[6:]
    again, children = study_runs(cfg, name)
    assert again.info.run_id == parent.info.run_id and len(children) == 8
    assert study.trials[6].user_attrs["work"] == "probe only"       # pools from disk, made by the first call
    states = {t.state.name for t in study.trials}
    assert states <= {"COMPLETE", "PRUNED"}                          # (pruning itself: test_a_trial_below_...)
    for t in study.trials:
        run = client.get_run(t.user_attrs[trial.RUN_ATTR])
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[t.state.name]
    assert len(json.loads((reports / "study.json").read_text())["time_per_trial"]) >= 1


def test_a_failed_trial_is_failed_in_optuna_and_mlflow_and_the_study_goes_on(tiny_world, tmp_path):
    cfg = tiny_world(sweep__space={"probe.real_per_class": [3, 100000], "probe.strategy": ["grid", "unseen"]},
                     sweep__sampler="grid", sweep__trials=10, sweep__fid_count=0, sweep__study="failing",
                     sweep__methods=["medi"])
    save_pipeline_model(cfg)
    assert sweep_cli(write_params(cfg, tmp_path / "params.yaml")) == 0
    study = optuna.load_study(study_name="failing-medi", storage=cfg.sweep.storage)
    by_state = {s: [t for t in study.trials if t.state.name == s] for s in ("COMPLETE", "FAIL")}
    assert len(study.trials) == 4                                   # the grid is exhausted: every point once
    assert {(t.params["probe.real_per_class"], t.params["probe.strategy"]) for t in study.trials} == {
        (n, s) for n in (3, 100000) for s in ("grid", "unseen")}
    assert [t.params["probe.real_per_class"] for t in by_state["FAIL"]] == [100000, 100000] and len(by_state["COMPLETE"]) == 2
    client = mlflow.tracking.MlflowClient(cfg.tracking.uri)
    for t in by_state["FAIL"]:
        run = client.get_run(t.user_attrs[trial.RUN_ATTR])
        assert run.info.status == "FAILED" and ">= 100000 tiles" in run.data.tags["medi.error"]
    # A trial whose worker died: Optuna fails it once its heartbeat is stale and calls us to fail its MLflow run.
    orphan = client.create_run(client.get_experiment_by_name(cfg.tracking.experiment).experiment_id)
    stale = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={trial.RUN_ATTR: orphan.info.run_id})
    sweep._fail_stale_run(study, stale)
    assert client.get_run(orphan.info.run_id).info.status == "FAILED"


def test_trials_that_change_the_model_train_it_once_nested_in_the_trial(tiny_world, tmp_path):
    cfg = tiny_world(sweep__space={"model.d_e": [16, 24]}, sweep__sampler="random", sweep__trials=3,
                     sweep__fid_count=0, sweep__study="d_e", sweep__pruner="none", sweep__methods=["medi"])
    assert sweep_cli(write_params(cfg, tmp_path / "params.yaml")) == 0   # no pipeline model: every d_e trains
    study = optuna.load_study(study_name="d_e-medi", storage=cfg.sweep.storage)
    values = [t.params["model.d_e"] for t in study.trials]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert sum("trained" in t.user_attrs["work"] for t in study.trials) == len(set(values))
    models = sorted(Path(cfg.sweep.output, "models").glob("*/medi/model.safetensors"))
    assert len(models) == len(set(values))
    assert {json.loads((m.parent / "config.json").read_text())["model_params"]["d_e"] for m in models} == set(values)
    assert not Path(cfg.model.output, "medi").exists()                 # the pipeline's outputs are not touched
    client = mlflow.tracking.MlflowClient(cfg.tracking.uri)
    trained = [t for t in study.trials if "trained" in t.user_attrs["work"]]
    runs = mlflow.search_runs(experiment_names=[cfg.tracking.experiment], output_format="list",
                              filter_string="tags.`medi.stage` = 'train@medi'")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {t.user_attrs[trial.RUN_ATTR] for t in trained}
    assert client.get_run(trained[0].user_attrs[trial.RUN_ATTR]).data.params["model.d_e"] in {"16", "24"}


def test_the_objective_never_reads_a_test_site(tiny_world, tmp_path):
    """Problem 2: the same trial on a dataset whose test-site tiles are replaced by noise gets the same objective
    (the search reads validation sites only); only the best trial's separate test score sees the change."""
    import numpy as np

    values = {"probe.ratio": [1.0]}
    cfg = tiny_world(sweep__space=values, sweep__sampler="grid", sweep__trials=1, sweep__fid_count=0,
                     sweep__methods=["medi"], sweep__study="clean", probe__bootstrap=0)
    save_pipeline_model(cfg)
    assert sweep_cli(write_params(cfg, tmp_path / "params.yaml")) == 0
    clean = json.loads((Path(cfg.sweep.reports) / "clean-medi/study.json").read_text())

    holdout = pd.read_parquet(tmp_path / "artifacts/splits/holdout.parquet")
    test_rows = holdout.loc[holdout["part"] == "test", "idx"].to_numpy()
    assert len(test_rows) and (holdout["part"] == "validation").any()
    tiles = np.load(Path(cfg.data.output) / "tiles.npy", mmap_mode="r+")
    tiles[test_rows] = np.random.default_rng(0).integers(0, 256, tiles[test_rows].shape, dtype=np.uint8)
    tiles.flush()
    del tiles
    params = write_params(config.override(cfg, {"sweep.study": "poisoned"}), tmp_path / "params2.yaml")
    assert sweep_cli(params) == 0
    dirty = json.loads((Path(cfg.sweep.reports) / "poisoned-medi/study.json").read_text())
    assert dirty["best_value"] == clean["best_value"]                 # the objective: validation sites only
    assert dirty["best_test"]["value"] != clean["best_test"]["value"]  # the one test score does read them


def test_cls_and_medi_get_studies_of_equal_budget_over_the_params_that_can_change_them(tiny_world, tmp_path):
    values = {"probe.strategy": ["grid", "unseen"], "probe.ratio": [1.0, 2.0], "model.d_e": [16]}
    cfg = tiny_world(sweep__space=values, sweep__sampler="random", sweep__trials=2, sweep__fid_count=0,
                     sweep__pruner="none", sweep__study="both", probe__bootstrap=0)
    assert [d.name for d in space.parse_space(cfg, "cls")] == ["probe.ratio"]      # no sites, no attributes
    assert [d.name for d in space.parse_space(cfg, "medi")] == list(values)
    for name in ("cls", "medi"):
        save_pipeline_model(config.override(cfg, {"model.d_e": 16}), name)
    assert sweep_cli(write_params(cfg, tmp_path / "params.yaml")) == 0
    studies = {m: optuna.load_study(study_name=f"both-{m}", storage=cfg.sweep.storage) for m in ("cls", "medi")}
    assert {m: len(s.trials) for m, s in studies.items()} == {"cls": 2, "medi": 2}
    assert set(studies["cls"].trials[0].params) == {"probe.ratio"}
    for m, s in studies.items():
        parent, children = study_runs(cfg, f"both-{m}")
        assert parent.data.params["method"] == m and parent.data.params["split"] == "validation"
        assert len(children) == 2 and all(c.data.tags["medi.method"] == m for c in children)


def test_a_trial_below_the_median_of_earlier_trials_is_pruned_in_optuna_and_killed_in_mlflow(tiny_world, tmp_path):
    """Earlier trials whose running objective (2.0) no probe can reach: the next trial is pruned after its first
    task, whatever it samples."""
    cfg = tiny_world(sweep__space={"probe.ratio": [1.0, 2.0]}, sweep__sampler="random", sweep__trials=1,
                     sweep__fid_count=0, sweep__methods=["medi"], sweep__study="prune", sweep__pruner="median",
                     sweep__startup_trials=2, probe__bootstrap=0)
    save_pipeline_model(cfg)
    params = write_params(cfg, tmp_path / "params.yaml")
    assert sweep_cli(params) == 0
    study = optuna.load_study(study_name="prune-medi", storage=cfg.sweep.storage)
    dist = optuna.distributions.CategoricalDistribution([1.0, 2.0])
    for _ in range(3):
        study.add_trial(optuna.trial.create_trial(params={"probe.ratio": 1.0}, distributions={"probe.ratio": dist},
                                                  value=2.0, intermediate_values={0: 2.0, 1: 2.0, 2: 2.0}))
    assert sweep_cli(params) == 0
    study = optuna.load_study(study_name="prune-medi", storage=cfg.sweep.storage)
    last = study.trials[-1]
    assert last.state.name == "PRUNED" and list(last.intermediate_values) == [0]   # stopped after the first task
    run = mlflow.tracking.MlflowClient(cfg.tracking.uri).get_run(last.user_attrs[trial.RUN_ATTR])
    assert run.info.status == "KILLED"


@pytest.mark.processes
def test_two_workers_run_their_trials_at_the_same_time(tiny_world, tmp_path, monkeypatch):
    """Each worker process waits at the start of its first trial until the other has started one (a barrier
    of files, injected by a sitecustomize on PYTHONPATH): workers that ran one after the other would fail
    their trials at the barrier's timeout."""
    cfg = tiny_world(sweep__space={"probe.ratio": [1.0, 2.0]}, sweep__sampler="random", sweep__trials=2,
                     sweep__workers=2, sweep__fid_count=0, sweep__methods=["medi"], sweep__study="pair",
                     sweep__pruner="none", probe__bootstrap=0)
    save_pipeline_model(cfg)
    hook, barrier = tmp_path / "hook", tmp_path / "barrier"
    hook.mkdir(), barrier.mkdir()
    (hook / "sitecustomize.py").write_text(BARRIER_HOOK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("MEDI_TEST_BARRIER", str(barrier))
    assert sweep_cli(write_params(cfg, tmp_path / "params.yaml")) == 0
    study = optuna.load_study(study_name="pair-medi", storage=cfg.sweep.storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2 and len(list(barrier.iterdir())) == 2
    a, b = study.trials
    assert a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete   # they overlap


BARRIER_HOOK = """
import os, pathlib, time
if os.environ.get("MEDI_TEST_BARRIER"):
    from medi import trial
    real, waited = trial.run_trial, []

    def run_trial(*args, **kwargs):
        if not waited:
            waited.append(1)
            folder = pathlib.Path(os.environ["MEDI_TEST_BARRIER"])
            (folder / str(os.getpid())).touch()
            deadline = time.time() + 120
            while len(list(folder.iterdir())) < 2:
                if time.time() > deadline:
                    raise RuntimeError("the other worker never started a trial")
                time.sleep(0.05)
        return real(*args, **kwargs)

    trial.run_trial = run_trial
"""


def test_objectives_gain_and_fid(tiny_world, tmp_path):
    tasks = {"a": {"validation": {"arms": {"medi": {"tss_avg": 0.8}, "none": {"tss_avg": 0.5}}}},
             "b": {"validation": {"arms": {"medi": {"tss_avg": 0.6}, "none": {"tss_avg": 0.7}}}},
             "c": {"test": {}}}                                       # no validation sites: not counted
    assert space.objective_value(tasks, "gain", "medi") == pytest.approx(0.1)        # ((0.3) + (-0.1)) / 2
    assert space.objective_value(tasks, "tss_avg", "medi") == pytest.approx(0.7)
    with pytest.raises(MediError, match="no task has validation sites"):
        space.objective_value({"c": {"test": {}}}, "tss_avg", "medi")
    cfg = tiny_world(sweep__space={"sample.guidance": [1.0, 2.0]}, sweep__sampler="grid", sweep__trials=2,
                     sweep__objective="fid", sweep__fid_count=8, sweep__methods=["medi"], sweep__study="fid",
                     sweep__pruner="none", probe__bootstrap=0, fid__unseen_per_pair=0)   # (pairs: the probe-side study)
    save_pipeline_model(cfg)
    assert sweep_cli(write_params(cfg, tmp_path / "params.yaml")) == 0
    study = optuna.load_study(study_name="fid-medi", storage=cfg.sweep.storage)
    assert study.direction.name == "MINIMIZE" and len(study.trials) == 2
    for t in study.trials:
        assert t.value == t.user_attrs["metrics"]["fid"] > 0
    assert study.best_trial.value == min(t.value for t in study.trials)


def test_a_study_of_two_unseen_pair_figures_maps_their_pareto_front_and_fits_no_probe(tiny_world, tmp_path):
    objectives = ["pairs_unseen_stain_rank", "pairs_unseen_class_accuracy"]
    cfg = tiny_world(sweep__space={"sample.guidance": [1.0, 2.0, 4.0]}, sweep__sampler="grid", sweep__trials=3,
                     sweep__objective=objectives, sweep__fid_count=8, sweep__methods=["medi"], sweep__study="front",
                     sweep__pruner="none", fid__unseen_per_pair=2)
    save_pipeline_model(cfg)
    assert sweep_cli(write_params(cfg, tmp_path / "params.yaml")) == 0
    study = optuna.load_study(study_name="front-medi", storage=cfg.sweep.storage)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert sorted(t.params["sample.guidance"] for t in study.trials) == [1.0, 2.0, 4.0]
    for t in study.trials:
        assert t.state.name == "COMPLETE" and t.user_attrs["work"] == "evaluation only"
        assert t.values == [t.user_attrs["metrics"][o] for o in objectives]
    assert not Path(cfg.sweep.output, "pools").exists()                     # no pool built, no probe fitted

    def beaten(a, b):                       # b at least as good on both (rank down, accuracy up), better on one
        return b[0] <= a[0] and b[1] >= a[1] and b != a
    front = {t.number for t in study.trials if not any(beaten(t.values, o.values) for o in study.trials)}
    summary = json.loads(Path(cfg.sweep.reports, "front-medi", "study.json").read_text())
    assert {f["trial"] for f in summary["pareto_front"]} == front and summary["direction"] == "minimize, maximize"
    assert summary["split"] == "unseen-pairs grid (training sites)"
    for f in summary["pareto_front"]:
        assert f["test"]["values"] == f["values"] and f["test"]["split"].startswith("none")
    reports = Path(cfg.sweep.reports, "front-medi")
    assert (reports / "pareto_front.png").exists()
    assert {p.name for p in reports.glob("param_importances_*.png")} == {f"param_importances_{o}.png"
                                                                          for o in objectives}
    assert "Pareto front" in (reports / "study.md").read_text()
    parent, trials = study_runs(cfg, "front-medi")
    assert len(trials) == 3 and parent.data.params["objective"] == ", ".join(objectives)
    client = mlflow.tracking.MlflowClient()
    for o in objectives:
        assert len(client.get_metric_history(parent.info.run_id, f"trial_{o}")) == 3
    with pytest.raises(MediError, match="optimises pairs_unseen_stain_rank, pairs_unseen_class_accuracy"):
        sweep.open_study(config.override(cfg, {"sweep.objective": "fid", "sweep.sampler": "random"}), "medi", [])


def test_a_bad_storage_url_is_one_error_and_a_timeout_stops_the_study(tiny_world, tmp_path, capsys):
    cfg = tiny_world(sweep__space={"probe.ratio": [1.0, 2.0]}, sweep__sampler="random", sweep__trials=50,
                     sweep__timeout=1, sweep__fid_count=0, sweep__methods=["medi"], sweep__study="short",
                     sweep__pruner="none", probe__bootstrap=0)
    bad = write_params(config.override(cfg, {"sweep.storage": "nosuchdb://x"}), tmp_path / "bad.yaml")
    assert sweep_cli(bad) == 2
    assert "sweep.storage 'nosuchdb://x': cannot open the Optuna storage" in capsys.readouterr().err
    save_pipeline_model(cfg)
    assert sweep_cli(write_params(cfg, tmp_path / "params.yaml")) == 0
    study = optuna.load_study(study_name="short-medi", storage=cfg.sweep.storage)
    assert len(study.trials) == 1            # a trial takes longer than the 1 s budget: no second one starts
