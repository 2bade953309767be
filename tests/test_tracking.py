"""MLflow: the local store, the experiment, the tags on every run, failed runs marked failed."""
from __future__ import annotations

import os

import mlflow
import pytest

from medi import tracking


def test_stage_run_logs_params_and_tags(make_cfg, tmp_path):
    cfg = make_cfg()
    with tracking.stage_run(cfg, "split", ("split",)) as run:
        mlflow.log_metric("x", 1.0)
    got = mlflow.get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["split.mode"] == "paper" and got.data.params["split.key_columns"] == "['tss', 'gender', 'race']"
    tags = got.data.tags
    assert tags["medi.stage"] == "split" and tags["medi.params_hash"] == cfg.params_hash("split")
    assert tags["medi.pipeline"].endswith(cfg.params_hash()) and "medi.git_commit" in tags
    exp = mlflow.get_experiment(got.info.experiment_id)
    assert exp.name == "medi" and exp.artifact_location.startswith((tmp_path / "mlruns").as_uri())
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"     # the UI opens on the runs table
    assert run_ids(cfg.tracking.uri) == [run.info.run_id]            # in the store of params tracking.uri


def test_failed_stage_is_marked_failed(make_cfg):
    cfg = make_cfg()
    with pytest.raises(RuntimeError):
        with tracking.stage_run(cfg, "prepare", ("data",)):
            raise RuntimeError("boom")
    runs = mlflow.search_runs(experiment_names=["medi"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


def run_ids(uri: str) -> list[str]:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("medi")
    return [] if experiment is None else [r.info.run_id for r in client.search_runs([experiment.experiment_id])]


def test_env_uri_wins(make_cfg, tmp_path, monkeypatch, mlflow_store):
    other = mlflow_store(tmp_path / "other.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    cfg = make_cfg()
    with tracking.stage_run(cfg, "split", ("split",)) as run:
        pass
    assert run_ids(other) == [run.info.run_id] and run_ids(cfg.tracking.uri) == []
    with tracking.stage_run(make_cfg(tracking__uri=mlflow_store(tmp_path / "third.db")), "split", ("split",)) as second:
        pass
    assert run_ids(other) == [second.info.run_id, run.info.run_id]          # still the environment's store


def test_each_config_logs_to_its_own_store(make_cfg, tmp_path, mlflow_store):
    """MLflow exports the URI it is given as MLFLOW_TRACKING_URI; that must not outrank the next config's store."""
    a = make_cfg()
    b = make_cfg(tracking__uri=mlflow_store(tmp_path / "b.db"))
    with tracking.stage_run(a, "split", ("split",)) as run_a:
        pass
    with tracking.stage_run(b, "split", ("split",)) as run_b:
        pass
    assert run_ids(a.tracking.uri) == [run_a.info.run_id] and run_ids(b.tracking.uri) == [run_b.info.run_id]
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_a_run_id_unknown_to_the_store_starts_a_new_run(make_cfg):
    """A resumed training's checkpoint names an MLflow run of another (e.g. deleted) store: a new run is started."""
    cfg = make_cfg()
    with tracking.stage_run(cfg, "train@medi", ("train",), run_name="train-medi", run_id="0" * 32) as run:
        pass
    got = mlflow.get_run(run.info.run_id)
    assert run.info.run_id != "0" * 32 and got.info.run_name == "train-medi" and got.info.status == "FINISHED"
