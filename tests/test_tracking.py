"""MLflow: the local store, the experiment, the tags on every run, failed runs marked failed."""
from __future__ import annotations

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
    assert (tmp_path / "mlflow.db").exists()


def test_failed_stage_is_marked_failed(make_cfg):
    cfg = make_cfg()
    with pytest.raises(RuntimeError):
        with tracking.stage_run(cfg, "prepare", ("data",)):
            raise RuntimeError("boom")
    runs = mlflow.search_runs(experiment_names=["medi"], output_format="list")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_env_uri_wins(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert tracking.tracking_uri(make_cfg().tracking).endswith("other.db")
