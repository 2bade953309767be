"""Trained models in MLflow: checkpoints as run artifacts, the final model as an MLflow model in the Model Registry.

- **Checkpoints.** Each checkpoint a training writes is logged to its run under `checkpoints/checkpoint-<step>/`;
  the run keeps the last `train.keep_checkpoints` of them, as the disk does.
- **Models.** The final EMA model (safetensors, config, vocabulary) is logged as an MLflow pyfunc model
  (`model/` of the training run, shown on the experiment's Models tab) and registered under one name per
  variant, `medi-<model>` (`medi-cls`, `medi-medi`): every training adds a version, tagged with what made it
  (`medi.weights_sha256_16`, steps, attributes) and, once `medi fid` has run on its samples, with the headline
  figures (`fid`, `kid`, `mean_class_fid`, ...).
- **Using a registered model** elsewhere, with only the tracking store: `medi sample --model medi --model-uri
  models:/medi-medi/<version>` samples the params' plan from it, and
  `mlflow.pyfunc.load_model("models:/medi-medi/1").predict(frame)` generates one image per row of a frame with
  columns `class`, the model's attributes (e.g. `tss`) and `seed` (same seeds, same pixels as the local model).
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping

import mlflow.pyfunc
import pandas as pd

from medi.errors import MediError

log = logging.getLogger(__name__)

WEIGHTS = "weights"                 # the model folder's name inside the MLflow model's artifacts
DIGEST_TAG = "medi.weights_sha256_16"


def registered_name(model: str) -> str:
    """The Model Registry name of a variant (`medi-cls`, `medi-medi`; a generator seed: `medi-medi-seed1`)."""
    return f"medi-{model}"


class MediPyfunc(mlflow.pyfunc.PythonModel):
    """A pyfunc wrapper around a `MediDiffusion` folder: predict(frame) -> one image (H, W, 3 uint8, as nested
    lists in a column `image`) per row, sampled with the settings stored beside the weights."""

    def load_context(self, context) -> None:
        from medi.sampling import load_model

        folder = Path(context.artifacts[WEIGHTS])
        self.model = load_model(folder)
        self.config = json.loads((folder / "config.json").read_text())
        self.sampler = json.loads((folder / "sampler.json").read_text())

    def predict(self, context, model_input, params=None):       # (no type hints: no signature to infer)
        import numpy as np

        images = sample_frame(self.model, self.config, {**self.sampler, **(params or {})}, model_input)
        return pd.DataFrame({"image": [np.asarray(i).tolist() for i in images]})


def sample_frame(model, config: Mapping[str, Any], sampler: Mapping[str, Any], frame: pd.DataFrame):
    """Images of `model` for the rows of `frame` (class, the model's attributes, seed)."""
    from medi.config import ModelConfig
    from medi.sampling import Sampler, generate

    missing = [c for c in ("class", "seed", *model.vocab.attributes) if c not in frame.columns]
    if missing:
        raise MediError(f"the rows to sample lack column(s) {missing}; this model takes class, "
                        f"{', '.join(model.vocab.attributes) or 'no attribute'} and seed")
    cond = model.vocab.encode(frame["class"].astype(str).tolist(),
                              {a: frame[a].tolist() for a in model.vocab.attributes})
    model_cfg = ModelConfig(**config["model_params"])
    return generate(model, Sampler.from_settings(sampler), model_cfg, cond, frame["seed"].astype(int).tolist(),
                    int(sampler.get("batch_size", 64)))


def log_checkpoint(folder: Path, keep: int) -> None:
    """Log checkpoint `folder` to the active run and drop the run's older ones beyond `keep`."""
    import mlflow
    from mlflow.artifacts import list_artifacts
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    mlflow.log_artifacts(str(folder), f"checkpoints/{folder.name}")
    run = mlflow.active_run()
    logged = sorted(a.path for a in list_artifacts(run_id=run.info.run_id, artifact_path="checkpoints") if a.is_dir)
    repo = get_artifact_repository(run.info.artifact_uri)
    for old in logged[:-keep]:
        try:
            repo.delete_artifacts(old)
        except NotImplementedError:          # a store that cannot delete (rare): every checkpoint stays
            log.warning("the artifact store of this run cannot delete %s; older checkpoints stay in MLflow", old)
            return


def log_model(model_dir: Path, name: str, sample_settings: Mapping[str, Any], tags: Mapping[str, str],
              register: bool = True) -> str | None:
    """Log model folder `model_dir` as the active run's MLflow model and (`register`) register it as
    `medi-<name>`; returns the new model version (None unregistered)."""
    import shutil

    import mlflow

    from medi import sampling

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / WEIGHTS
        shutil.copytree(model_dir, weights)
        (weights / "sampler.json").write_text(json.dumps(dict(sample_settings)))
        code = Path(tmp) / "medi_model.py"         # a model from code: loading it unpickles nothing
        code.write_text("import mlflow\nfrom medi.registry import MediPyfunc\n\nmlflow.models.set_model(MediPyfunc())\n")
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code), artifacts={WEIGHTS: str(weights)},
                                       pip_requirements=_requirements(),
                                       registered_model_name=registered_name(name) if register else None,
                                       await_registration_for=0)
    if info.registered_model_version is None:
        return None
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in {DIGEST_TAG: sampling.weights_digest(model_dir), **tags}.items():
        client.set_model_version_tag(registered_name(name), str(version), key, str(value))
    return version


def _requirements() -> list[str]:
    """The installed medi and its core libraries (given, not inferred: inference imports the model in a subprocess)."""
    from importlib.metadata import version

    return [f"{p}=={version(p)}" for p in ("torch", "diffusers", "safetensors", "pandas", "mlflow")]


def download(uri: str, dst: Path | None = None) -> Path:
    """The model folder (weights, config, vocabulary) of an MLflow model URI (`models:/medi-medi/1`,
    `runs:/<id>/model`), downloaded from the tracking store."""
    import mlflow

    try:
        root = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(dst) if dst else None))
    except mlflow.exceptions.MlflowException as exc:
        raise MediError(f"cannot load model {uri} from the tracking store {mlflow.get_tracking_uri()}: "
                        f"{str(exc).splitlines()[0]}") from None
    folder = root / "artifacts" / WEIGHTS
    if not (folder / "model.safetensors").exists():
        raise MediError(f"{uri} is not a medi model (no artifacts/{WEIGHTS}/model.safetensors)")
    return folder


def tag_version(name: str, weights_digest: str, figures: Mapping[str, float | None]) -> str | None:
    """Tag the registered version of `medi-<name>` whose weights have this digest with `figures`; returns the
    version, or None when no version has those weights (a model trained without the registry)."""
    import mlflow

    client = mlflow.MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{registered_name(name)}'")
    except mlflow.exceptions.MlflowException:
        return None
    match = [v for v in versions if v.tags.get(DIGEST_TAG) == weights_digest]
    if not match:
        return None
    version = max(match, key=lambda v: int(v.version)).version
    for key, value in figures.items():
        if value is not None:
            client.set_model_version_tag(registered_name(name), version, key, f"{value:.6g}")
    return version
