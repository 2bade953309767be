"""Models in MLflow: checkpoints and the final model logged by the training run, registered per variant, and
sampled from the registry in a place that has no models/ folder (the same pixels for the same seeds)."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import mlflow
import numpy as np

from helpers import write_params
from medi import cli, fid, registry, sample, sampling, train
from medi.artifacts import load_images, read_manifest


def artifact_files(client, run_id: str, path: str = "") -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += artifact_files(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_the_registered_model_samples_like_the_local_one_with_only_the_tracking_store(tiny_world, tmp_path):
    cfg = tiny_world(train__max_steps=6, train__checkpoint_every=2, train__keep_checkpoints=2, sample__count=6)
    train.run_stage(cfg, "medi")
    client = mlflow.MlflowClient()
    (run,) = mlflow.search_runs(experiment_names=["medi"], output_format="list")
    files = artifact_files(client, run.info.run_id)
    # the kept checkpoints (steps 4 and 6 of 2, 4, 6), each complete; the model with weights, config, vocabulary
    assert sorted({f.split("/")[1] for f in files if f.startswith("checkpoints/")}) == ["checkpoint-0000004",
                                                                                      "checkpoint-0000006"]
    assert {"checkpoints/checkpoint-0000006/" + f for f in ("model.safetensors", "ema.safetensors", "optimizer.pt",
                                                            "state.json")} <= set(files)
    (version,) = client.search_model_versions("name = 'medi-medi'")
    local_dir = Path(cfg.model.output) / "medi"
    assert str(version.version) == "1" and version.run_id == run.info.run_id
    assert version.tags[registry.DIGEST_TAG] == sampling.weights_digest(local_dir)
    assert run.data.tags["medi.registered_model"] == "models:/medi-medi/1"

    sample.run_stage(cfg, "medi")
    local_out = Path(cfg.sample.output.format(model="medi"))
    manifest = read_manifest(local_out / "manifest.csv")
    local = load_images(local_out, manifest)

    # Elsewhere: the split and the tracking store, no models/ folder.
    other = tmp_path / "elsewhere"
    shutil.copytree(cfg.split.output, other / "splits")
    cfg2 = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, output=str(other / "models")),
                               split=dataclasses.replace(cfg.split, output=str(other / "splits")),
                               sample=dataclasses.replace(cfg.sample, output=str(other / "samples/{model}")))
    params = write_params(cfg2, other / "params.yaml")
    assert cli.main(["--params", str(params), "sample", "--model", "medi", "--model-uri", "models:/medi-medi/1"]) == 0
    assert not (other / "models").exists()
    assert np.array_equal(load_images(other / "samples/medi", read_manifest(other / "samples/medi/manifest.csv")), local)

    # With nothing but the store: the pyfunc model generates the same pixels for the same rows and seeds.
    loaded = mlflow.pyfunc.load_model("models:/medi-medi/1")
    out = loaded.predict(manifest[["class", "tss", "seed"]].head(3))
    assert np.array_equal(np.array(out["image"].tolist(), dtype=np.uint8), local[:3])

    # fid tags the version with its headline figures (found by the weights' digest of the sample set)
    metrics = fid.run_stage(cfg, "medi")
    tags = client.get_model_version("medi-medi", "1").tags
    assert float(tags["overall"]) == float(f"{metrics['overall']:.6g}") and float(tags["n_generated"]) == 6 and "kid" in tags


def test_a_model_uri_that_is_no_medi_model_is_named(tiny_world, capsys):
    cfg = tiny_world()
    with mlflow.start_run() as run:
        mlflow.log_dict({"a": 1}, "model/x.json")
    params = write_params(cfg, Path("p.yaml"))
    code = cli.main(["--params", str(params), "sample", "--model", "medi", "--model-uri", f"runs:/{run.info.run_id}/model"])
    assert code == 2 and "is not a medi model (no artifacts/weights/model.safetensors)" in capsys.readouterr().err
    code = cli.main(["--params", str(params), "sample", "--model", "medi", "--model-uri", "models:/medi-nope/1"])
    assert code == 2 and "cannot load model models:/medi-nope/1 from the tracking store" in capsys.readouterr().err
