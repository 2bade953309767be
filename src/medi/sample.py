"""The `sample` stage (`medi sample --model NAME`): the sample set of params `sample` for one model, logged to
MLflow, and `--from-manifest` to regenerate a set and compare it with the files on disk. The sampler, plans and
sample sets themselves: `medi.sampling`.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medi import artifacts, distributed
from medi.artifacts import MANIFEST, SAMPLE_INFO as INFO, read_manifest, read_png
from medi.config import Config
from medi.errors import MediError
from medi.io import atomic_path, read_json, write_json
from medi.precision import AUTO, Decision
from medi.sampling import (Sampler, conditions_of, generate_set, load_model, plan, regenerate, sampling_precision,
                           weights_digest, write_png)

log = logging.getLogger(__name__)


def run_stage(cfg: Config, name: str, model_dir: Path | None = None, source: str | None = None) -> dict:
    """`medi sample --model NAME`: the sample set of params `sample` for model NAME, logged to MLflow. Under a
    launch the processes split the batches; the main process alone writes the manifest and logs. `model_dir`
    (default models/NAME) may be a registered model's download, named by `source` (`--model-uri`)."""
    import mlflow

    from medi import figures, tracking

    cfg.variant(name)
    model_dir = model_dir or artifacts.model_dir(cfg, name)
    model = load_model(model_dir)
    train_index = artifacts.train_frame(cfg)
    s, sampler = cfg.sample, Sampler.of(cfg.sample)
    rows = plan(s, train_index, model.vocab.classes)
    conditioned = ",".join(["class", *model.vocab.attributes])
    out = Path(s.output.format(model=name))
    info = {"model": name, "model_dir": source or str(model_dir), "weights_sha256_16": weights_digest(model_dir),
            "torch": torch.__version__, "rows": len(rows), "sample": cfg.section_dict("sample")}
    decision = None
    if distributed.is_main():
        previous = read_json(out / INFO) if (out / INFO).exists() else None
        same_set = previous is not None and {k: previous.get(k) for k in info} == info
        if same_set and s.precision == AUTO and previous.get("precision"):   # an interrupted set keeps its choice
            decision = Decision(previous["precision"], AUTO, "recorded by the interrupted sample set resumed")
        else:
            decision = sampling_precision(model, sampler, conditions_of(rows.iloc[:1], model), s.batch_size)
    decision = distributed.broadcast(decision)
    sampler = sampler.at(decision.precision)
    rows = rows.assign(conditioned_on=conditioned, model=name, **sampler.columns(), strategy=s.strategy)
    info.update(precision=decision.precision, plan_sha256_16=hashlib.sha256(
        pd.util.hash_pandas_object(rows, index=False).values.tobytes()).hexdigest()[:16])
    if distributed.is_main():
        if out.exists() and (previous is None or {k: previous.get(k) for k in info} != info):
            log.info("%s holds another (or an unidentified) sample set; starting afresh", out)
            for f in (out / MANIFEST, out / INFO):
                f.unlink(missing_ok=True)
            shutil.rmtree(out / "images", ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / INFO, {**info, "complete": False})
    distributed.barrier()
    if not distributed.is_main():           # the other processes of a launch: their share of the batches
        generate_set(model, rows, out, sampler, cfg.model)
        return {"images": len(rows), "output": str(out)}
    with tracking.stage_run(cfg, f"sample@{name}", ("sample",), run_name=f"sample-{name}"):
        mlflow.log_params({"model_name": name, "conditioned_on": conditioned, "weights_sha256_16": info["weights_sha256_16"],
                           "precision": decision.precision})
        mlflow.log_metrics(decision.mlflow_metrics("precision"))
        log.info("sampling %s in %s", name, decision.describe())
        t0 = time.perf_counter()
        ips = generate_set(model, rows, out, sampler, cfg.model)
        seconds = time.perf_counter() - t0
        with atomic_path(out / MANIFEST) as tmp:
            rows.to_csv(tmp, index=False)
        write_json(out / INFO, {**info, "complete": True, "seconds": seconds})
        mlflow.log_metrics({"images": len(rows), "seconds": seconds, "images_per_second": ips})
        mlflow.log_artifact(str(out / MANIFEST), "samples")
        figures.log(preview(out, rows, f"{name}: {s.strategy} samples, {sampler.describe()}"),
                    f"samples/preview_{name}.png")
        log.info("sampled %d images of %s in %.1fs (%.1f images/s) -> %s", len(rows), name, seconds, ips, out)
    return {"images": len(rows), "seconds": seconds, "images_per_second": ips, "output": str(out)}


def preview(sample_dir: Path, rows: pd.DataFrame, title: str, per_class: int = 8):
    """A figure of the first `per_class` images of each class."""
    from medi import figures

    classes = sorted(rows["class"].unique())
    tiles = [[read_png(sample_dir / p) for p in rows[rows["class"] == c]["path"][:per_class]] for c in classes]
    size = tiles[0][0].shape
    grid = np.zeros((len(classes), per_class, *size), np.uint8)
    for r, row in enumerate(tiles):
        grid[r, :len(row)] = row
    return figures.tile_grid(grid, classes, [""] * per_class, title, scale=0.8)


def regenerate_stage(cfg: Config, name: str, manifest_path: str, output: str | None) -> dict:
    """`medi sample --model NAME --from-manifest PATH`: regenerate a set and compare it with the files on disk."""
    manifest_path = Path(manifest_path)
    manifest = read_manifest(manifest_path)
    model_dir = artifacts.model_dir(cfg, name)
    info_path = manifest_path.parent / INFO
    if info_path.exists() and read_json(info_path)["weights_sha256_16"] != weights_digest(model_dir):
        raise MediError(f"{model_dir} is not the model that generated {manifest_path} (weights differ); "
                        "regenerating would not reproduce the set")
    model = load_model(model_dir)
    images = regenerate(manifest, model, cfg.model)
    out = Path(output) if output else manifest_path.parent.with_name(manifest_path.parent.name + "_regenerated")
    for p, img in zip(manifest["path"], images):
        write_png(out / p, img)
    with atomic_path(out / MANIFEST) as tmp:
        manifest.to_csv(tmp, index=False)
    originals = [manifest_path.parent / p for p in manifest["path"]]
    present = [i for i, f in enumerate(originals) if f.exists()]
    same = sum(np.array_equal(read_png(originals[i]), images[i]) for i in present)
    log.info("regenerated %d images into %s; %d of %d originals on disk are identical bit for bit",
             len(images), out, same, len(present))
    return {"images": len(images), "compared": len(present), "identical": same, "output": str(out)}
