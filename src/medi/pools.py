"""Synthetic pools of the probe: images of a model per (class, TSS) pair (or per class for a model without
site conditioning), generated once, kept as a sample set, grown on demand, and embedded.

A pool is a sample set like any other (`manifest.csv` + PNGs; `medi sample --from-manifest` regenerates it
bit for bit), with one difference: image i of a pair always has the same seed (a function of the sampling
seed, the pair and i), so a pool of 60 images per pair holds the pool of 40, and asking for more images
only generates the missing ones, in new batches. `pool_info.json` names the weights and the sampler; a pool
made by other weights or another sampler is discarded and generated again.

No image is generated twice: when the sample stage's set of the same model (`samples/NAME`) was made by the same
weights and sampler, the pool starts as a copy of it, whole batches and all, so it still replays bit for bit. Its
images of a pair are that pair's first images (in the set's order, with the set's seeds); the pair's later images
are generated as above. The pool's identity then names that set (the digest of its manifest), and the probe's
features of those images come from the feature cache the fid stage filled.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from medi.config import Config
from medi.errors import MediError
from medi.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

INFO = "pool_info.json"
Key = tuple[str, "str | None"]


def key_name(key: Key) -> str:
    return f"{key[0]}|{key[1] or ''}"


def image_path(key: Key, i: int) -> str:
    """Where image i of a pair lives in a pool folder."""
    return f"images/{key[0]}/{key[1] or '_'}/{i:05d}.png"


def image_seed(seed: int, key: Key, i: int) -> int:
    """The seed of image i of a pair: stable whatever else the pool holds."""
    h = int.from_bytes(hashlib.sha256(f"{seed}|{key_name(key)}".encode()).digest()[:4], "big")
    return h * 1_000_000 + i


def plan_rows(keys: Sequence[Key], size: int, seed: int, have: set[tuple[str, int]]) -> pd.DataFrame:
    """Rows of the images each key still lacks to hold `size` (image index i, seed, path)."""
    rows = [{"path": image_path((c, t), i), "class": c, "tss": t or "", "pool_key": key_name((c, t)),
             "i": i, "seed": image_seed(seed, (c, t), i)}
            for c, t in keys for i in range(size) if (key_name((c, t)), i) not in have]
    return pd.DataFrame(rows, columns=["path", "class", "tss", "pool_key", "i", "seed"])


def _fill_metadata(rows: pd.DataFrame, train_index: pd.DataFrame, attributes: Sequence[str]) -> pd.DataFrame:
    """Attributes a pair does not fix (race, gender, age of a model conditioned on them) come from a training
    tile of the pair's site (else of its class), chosen by the image's seed."""
    from medi.sampling import METADATA

    out = rows.copy()
    for col in (a for a in METADATA if a != "tss"):
        out[col] = None
    wanted = [a for a in attributes if a != "tss"]
    if not wanted or out.empty:
        return out
    by_site = {t: g for t, g in train_index.groupby("tss")}
    by_class = {c: g for c, g in train_index.groupby("class")}
    for i, row in out.iterrows():
        donors = by_site.get(row["tss"]) if row["tss"] else None
        donors = donors if donors is not None else by_class[row["class"]]
        donor = donors.iloc[int(row["seed"]) % len(donors)]
        for col in wanted:
            out.at[i, col] = donor[col]
    return out


def donor(cfg: Config, model_dir: Path, weights: str) -> tuple[Path, pd.DataFrame, str] | None:
    """The sample stage's set of this model (`sample.output` for its name) when it is complete and was made by the
    same weights (digest `weights`) and sampler: (folder, manifest, the precision it was made in); else None."""
    from medi import artifacts, sampling

    folder = Path(cfg.sample.output.format(model=model_dir.name))
    if not (folder / artifacts.SAMPLE_INFO).exists() or not (folder / artifacts.MANIFEST).exists():
        return None
    info = read_json(folder / artifacts.SAMPLE_INFO)
    theirs = info.get("sample", {})
    if not info.get("complete") or info.get("weights_sha256_16") != weights or "scheduler" not in theirs \
            or sampling.Sampler.from_settings(theirs).settings() != sampling.Sampler.of(cfg.sample).settings():
        return None
    return folder, artifacts.read_manifest(folder / artifacts.MANIFEST), str(info["precision"])


def identity(cfg: Config, model_dir: Path) -> dict:
    """What makes a pool's images what they are: the weights, the sampler and the sample set it starts from."""
    return origin(cfg, model_dir)[0]


def origin(cfg: Config, model_dir: Path) -> tuple[dict, tuple[Path, pd.DataFrame, str] | None]:
    """(the pool's identity, the sample set it starts from or None), reading the weights once."""
    from medi import sampling
    from medi.artifacts import MANIFEST
    from medi.features import file_digest

    weights = sampling.weights_digest(model_dir)
    source = donor(cfg, model_dir, weights)
    start = None if source is None else {"set": str(source[0]),
                                         "manifest_sha256_16": file_digest(source[0] / MANIFEST)[:16]}
    return {"weights_sha256_16": weights, **sampling.Sampler.of(cfg.sample).settings(), "seed": cfg.sample.seed,
            "starts_from": start}, source


def _start_from(source: tuple[Path, pd.DataFrame, str], out: Path, site_conditioned: bool) -> pd.DataFrame:
    """Copy a sample set into the empty pool `out`: every image, as image i of its pair in the set's order, in the
    set's batches (so the pool replays bit for bit). Returns its manifest rows."""
    folder, rows, _ = source
    keys = [(c, t if site_conditioned and isinstance(t, str) and t else None) for c, t in zip(rows["class"], rows["tss"])]
    rows = rows.assign(tss=[t for _, t in keys], pool_key=[key_name(k) for k in keys])
    rows["i"] = rows.groupby("pool_key", sort=False).cumcount()
    paths = [image_path(k, i) for k, i in zip(keys, rows["i"])]
    for theirs, ours in zip(rows["path"], paths):
        (out / ours).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / theirs, out / ours)
    log.info("pool %s starts from the %d images of %s (no image is generated twice)", out, len(rows), folder)
    return rows.assign(path=paths)


def ensure(cfg: Config, model_dir: Path, keys: Sequence[Key], size: int, out: Path,
           train_index: pd.DataFrame) -> pd.DataFrame:
    """Make `out` hold at least `size` images of every key, generated by the model in `model_dir` with the
    sampler of params `sample`; return the manifest rows of exactly those images (key order, then i). Under a
    launch the processes split the batches; the main process alone removes, writes and lists files."""
    from medi import artifacts, distributed, sampling

    s = cfg.sample
    info, source = origin(cfg, model_dir)
    manifest_path = out / artifacts.MANIFEST
    main = distributed.is_main()
    if main and out.exists() and (not (out / INFO).exists() or read_json(out / INFO) != info):
        log.info("%s holds another model's or sampler's pool (or none identified); starting afresh", out)
        shutil.rmtree(out)
    if main and source is not None and not manifest_path.exists():
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / INFO, info)
        started = _start_from(source, out, "tss" in str(source[1]["conditioned_on"].iloc[0]).split(","))
        with atomic_path(manifest_path) as tmp:
            started.to_csv(tmp, index=False)
    distributed.barrier()
    old = artifacts.read_manifest(manifest_path) if manifest_path.exists() else None
    have = set(zip(old["pool_key"], old["i"].astype(int))) if old is not None else set()
    new = plan_rows(keys, size, s.seed, have)
    if len(new):
        model = sampling.load_model(model_dir)
        if "tss" not in model.vocab.attributes and any(t for _, t in keys):
            raise MediError(f"{model_dir}: the model is not conditioned on the site but its pool asks for sites")
        first_batch = int(old["batch"].max()) + 1 if old is not None and len(old) else 0
        new = _fill_metadata(new, train_index, model.vocab.attributes)
        sampler = sampling.Sampler.of(s)
        if sampler.precision == sampling.AUTO and source is not None:
            sampler = sampler.at(source[2])             # auto: the precision the set the pool starts from was made in
        else:                                           # auto: the one chosen here
            sampler = sampler.at(distributed.broadcast(sampling.sampling_precision(
                model, sampler, sampling.conditions_of(new.iloc[:1], model), s.batch_size).precision if main else None))
        new = new.assign(batch=first_batch + np.arange(len(new)) // s.batch_size,
                         conditioned_on=",".join(["class", *model.vocab.attributes]), model=model_dir.name,
                         **sampler.columns(), strategy="probe-pool")
        if "tss" not in model.vocab.attributes:
            new["tss"] = new["tss"].replace("", None)
        if main:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / INFO, info)
            log.info("pool %s: generating %d images (%d keys, %d per key)", out, len(new), len(keys), size)
        distributed.barrier()
        sampling.generate_set(model, new, out, sampler, cfg.model)
        if main:
            manifest = pd.concat([old, new], ignore_index=True) if old is not None else new
            with atomic_path(manifest_path) as tmp:
                manifest.to_csv(tmp, index=False)
        distributed.barrier()
    manifest = artifacts.read_manifest(manifest_path)
    wanted = {key_name(k): n for n, k in enumerate(keys)}
    rows = manifest[manifest["pool_key"].isin(wanted) & (manifest["i"].astype(int) < size)]
    return rows.assign(_k=rows["pool_key"].map(wanted)).sort_values(["_k", "i"], kind="stable").drop(columns="_k")


def embedded(cfg: Config, model_dir: Path, keys: Sequence[Key], size: int, out: Path, train_index: pd.DataFrame,
             spec) -> dict[Key, np.ndarray]:
    """The pool (grown as needed) as embeddings: key -> (size, D), image i in row i."""
    from medi import artifacts, embed

    rows = ensure(cfg, model_dir, keys, size, out, train_index)
    vectors = embed.embed(artifacts.load_images(out, rows), spec, cfg.encoder.cache, cfg.encoder.batch_size)
    names = rows["pool_key"].to_numpy()
    return {k: vectors[names == key_name(k)] for k in keys}
