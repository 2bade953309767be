"""MLflow in one place: the store, the experiment, and the tags every run of the pipeline carries.

Default store: `sqlite:///mlflow.db` with artifacts under `mlruns/`; `MLFLOW_TRACKING_URI` points the
pipeline at any tracking server instead. Each run is tagged with the git commit, the DVC stage, a hash of
the params it used, and a pipeline id (commit + full params hash) shared by all stages of one `dvc repro`,
so a whole pipeline run can be filtered in the UI with `tags.medi.pipeline = '<id>'`.

A database store is created and migrated once, under a file lock, before a process uses it: stages started
together (`dvc exp run` queues, sweep workers, the ranks of a launch) on a fresh `sqlite:///mlflow.db` would
otherwise run MLflow's migrations at the same moment and break the file for good. The lock is a file beside
a SQLite database, else under the temporary folder keyed by the URI (it serialises the processes of one
machine; machines sharing one store go through `make mlflow-server`, which migrates it once at start).
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from medi import allocator
from medi.config import Config, TrackingConfig

for _var, _val in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(_var, _val)

import mlflow  # noqa: E402  (after the telemetry switches)


SERVERS = ("http://", "https://", "databricks")      # tracking URIs of a server, which owns its store and artifacts
# MLflow 3's UI shows an experiment without a declared kind as a GenAI one (traces, an assistant); this tag (what
# its "experiment type" selector writes) declares model training, so the experiment opens on its runs.
KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def tracking_uri(cfg: TrackingConfig) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri


def store_lock(uri: str):
    """A lock held while a database store (MLflow's or Optuna's) is created or migrated: a file beside a
    SQLite database, else one under the temporary folder named by the URI's hash. None needed for a server."""
    from filelock import FileLock

    if uri.startswith(SERVERS):
        return nullcontext()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:///:memory:"):
        db = Path(uri[len("sqlite:///"):].split("?")[0]).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(f"{db}.lock")
    return FileLock(str(Path(tempfile.gettempdir()) / f"medi-store-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"))


def configure(cfg: TrackingConfig) -> str:
    """Point MLflow at the store and make sure the experiment exists; return its id. The first use of the
    store by this process (which creates or migrates it) and the experiment's creation happen under
    `store_lock`, so processes starting together on a fresh store wait for one another."""
    user_env = os.environ.get("MLFLOW_TRACKING_URI")
    uri = tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    # set_tracking_uri exports MLFLOW_TRACKING_URI; left there, it would outrank the next config's tracking.uri
    if user_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    with store_lock(uri):
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            location = cfg.artifact_location
            if uri.startswith(SERVERS):   # a tracking server keeps the artifacts (where its machines all reach them)
                location = None
            elif "://" not in location:  # a local folder: MLflow wants an absolute URI
                location = Path(location).resolve().as_uri()
            try:
                experiment_id = mlflow.create_experiment(cfg.experiment, artifact_location=location)
            except mlflow.exceptions.MlflowException as exc:   # another machine created it meanwhile
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment_id = mlflow.get_experiment_by_name(cfg.experiment).experiment_id
        experiment = mlflow.get_experiment(experiment_id)
        if experiment.tags.get(KIND_TAG) != MODEL_TRAINING:    # the UI opens such an experiment on its runs table
            mlflow.MlflowClient().set_experiment_tag(experiment_id, KIND_TAG, MODEL_TRAINING)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() if out.returncode == 0 else "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("-dirty" if dirty and commit != "unknown" else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def run_tags(cfg: Config, stage: str, sections: tuple[str, ...]) -> dict[str, str]:
    commit = git_commit()
    return {
        "medi.stage": stage,
        "medi.git_commit": commit,
        "medi.params_hash": cfg.params_hash(*sections),
        "medi.pipeline": f"{commit[:12]}-{cfg.params_hash()}",
        "medi.data_source": cfg.data.source,
        "medi.allocator": allocator.in_use(),
    }


@contextmanager
def stage_run(cfg: Config, stage: str, sections: tuple[str, ...], run_name: str | None = None,
              run_id: str | None = None) -> Iterator[Any]:
    """An MLflow run for one pipeline stage, with the params of `sections` logged and the standard tags.

    `run_id` continues an existing run (a resumed training). Called inside another run (a sweep trial that
    trains a model), the stage's run is nested under it. An exception inside the block marks the run FAILED
    (MLflow's context manager does this).
    """
    configure(cfg.tracking)
    params: dict[str, Any] = {}
    for name in sections:
        _flatten(name, cfg.section_dict(name), params)
    if run_id is not None:
        try:
            mlflow.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            run_id = None  # the store was reset since the checkpoint was written: start a new run
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else (run_name or stage),
                          tags=run_tags(cfg, stage, sections), nested=mlflow.active_run() is not None) as run:
        # MLflow caps a param value at 6000 characters; ours are short, but lists can be long.
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        yield run
