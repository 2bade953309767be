"""Sampling from a trained model: schedulers, classifier-free guidance, sampling plans (which conditions to
sample), and sample sets on disk that can be regenerated bit for bit. The engine under the `sample` stage, the
training grids, the FID curve, the unseen-pairs evaluation, the probe's pools and the registered model.

Every image is generated from its own seed (its initial noise comes from a generator seeded with it).
A sample set is lossless PNGs plus `manifest.csv`, one row per image: path, class, the metadata of the
row (tss, race, gender, age), which of them the model was conditioned on, seed, generation batch,
model, scheduler, steps, guidance, metadata_guidance, guidance_colour, precision (`sample.precision: auto`: the
one chosen, `medi.precision`) and strategy. Replaying the manifest's batches through `regenerate` gives the same
pixels on the same machine (`medi sample --from-manifest`). Where sets live and how they are read: `medi.artifacts`.

Strategies (params `sample.strategy`) say which conditions to sample:
- `match`: the training split's rows (class with its metadata), so class and (class, site) frequencies are
  those of the training data: the paper's FID setting. Every model gets the same rows and seeds, so CLS
  and MeDi sets are paired; a model not conditioned on the site ignores the row's site.
- `uniform`: equal counts per class, metadata drawn from training rows of the class (the CLS augmentation).
- `grid`: every (class, site) of `grid_classes` x `grid_sites`, `per_pair` each, including pairs never seen
  in training (the MeDi augmentation that fills missing pairs).
- `explicit`: the (class, attribute) pairs listed in `sample.pairs`, `per_pair` each.
"""
from __future__ import annotations

import hashlib
import logging
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image

from medi import distributed
from medi.config import GuidanceColour, ModelConfig, SampleConfig, SamplerKind, TrainConfig
from medi.errors import MediError
from medi.io import atomic_path
from medi.model import SITE, MediDiffusion, noise_kwargs, null_condition
from medi.precision import AUTO, Decision, for_sampling

log = logging.getLogger(__name__)

METADATA = ("tss", "race", "gender", "age")            # metadata columns a plan row carries

SAMPLERS = typing.get_args(SamplerKind)  # both deterministic given the initial noise


def diffusers_scheduler(kind: str, cfg: ModelConfig):
    """A diffusers scheduler for inference on the noise schedule of `cfg`. With zero-terminal-SNR the timesteps
    must start at the last one ('trailing' spacing), as Lin et al. prescribe; we use trailing spacing for every
    schedule."""
    kw = {**noise_kwargs(cfg), "timestep_spacing": "trailing"}
    if kind == "ddim":
        return DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=True)
    if kind == "dpmsolver++":
        return DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2,
                                           final_sigmas_type="zero")
    raise MediError(f"unknown sampler '{kind}'; known: {', '.join(SAMPLERS)}")


@dataclass(frozen=True)
class Sampler:
    """How images are drawn from a model, besides its weights and the seeds: the scheduler and its steps, the
    guidance scales and the precision. One value where these travelled as five loose arguments; it builds the
    diffusers scheduler (`scheduler`) and names itself in manifests, pool identities, cache keys and the
    registered model (`settings`)."""
    kind: str = "dpmsolver++"                   # ddim | dpmsolver++ (params: scheduler)
    steps: int = 15
    guidance: float = 1.0                       # classifier-free guidance scale (1 = plain conditional sampling)
    metadata_guidance: float | None = None      # the metadata's own scale (None = guidance: joint guidance)
    precision: str = "fp32"                     # fp32 | bf16 | fp16 | auto (resolved before sampling)
    colour: str = "guided"                      # conditional | guided (guidance_conditions); guided: sets made before
                                                # the setting existed
    calibration: int = 0                        # stain pathway: the generator's own tiles per class its colour
                                                # calibration is fitted on (`calibration_source`; 0 = none)

    @classmethod
    def of(cls, s: SampleConfig) -> "Sampler":
        """The sampler of params `sample` (the sample stage, FID curve, unseen pairs, pools, registry)."""
        return cls(s.scheduler, s.steps, s.guidance, s.metadata_guidance, s.precision, s.guidance_colour,
                   s.colour_calibration)

    @classmethod
    def for_grids(cls, t: TrainConfig, precision: str) -> "Sampler":
        """The sampler of the training grids (and the stain check that scores them), in `precision`."""
        return cls(t.grid_scheduler, t.grid_steps, t.grid_guidance, t.grid_metadata_guidance, precision,
                   t.grid_guidance_colour)

    @classmethod
    def from_settings(cls, settings: Mapping) -> "Sampler":
        """Back from `settings()` or a manifest row (rows made before metadata guidance or the guidance colour
        existed: joint, usual guidance)."""
        mg = settings.get("metadata_guidance")
        mg = None if mg is None or mg != mg else float(mg)       # (NaN: a manifest cell left empty)
        colour = settings.get("guidance_colour")
        colour = "guided" if colour is None or colour != colour else str(colour)
        calibration = settings.get("colour_calibration")
        calibration = 0 if calibration is None or calibration != calibration else int(calibration)
        return cls(str(settings["scheduler"]), int(settings["steps"]), float(settings["guidance"]), mg,
                   str(settings["precision"]), colour, calibration)

    @property
    def metadata_scale(self) -> float:
        return self.guidance if self.metadata_guidance is None else self.metadata_guidance

    def at(self, precision: str) -> "Sampler":
        return replace(self, precision=precision)

    def scheduler(self, noise: ModelConfig):
        """A fresh diffusers scheduler (it keeps state while sampling) on the model's noise schedule."""
        return diffusers_scheduler(self.kind, noise)

    def settings(self) -> dict:
        """What makes images what they are, as plain values; metadata_guidance only when set apart from the class,
        guidance_colour only when guidance is applied and not the usual one (pools and sets made before either
        existed keep their identity)."""
        out = {"scheduler": self.kind, "steps": self.steps, "guidance": self.guidance, "precision": self.precision}
        if self.metadata_guidance is not None:
            out["metadata_guidance"] = self.metadata_guidance
        if self.colour != "guided" and self.guided:
            out["guidance_colour"] = self.colour
        if self.calibration:
            out["colour_calibration"] = self.calibration
        return out

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance is applied (a scale other than 1)."""
        return self.guidance != 1.0 or self.metadata_scale != 1.0

    def columns(self) -> dict:
        """The manifest columns of the images it makes (metadata_guidance: the scale applied, joint or not;
        guidance_colour: "guided" where no guidance is applied, whatever the setting)."""
        return {"scheduler": self.kind, "steps": self.steps, "guidance": self.guidance,
                "metadata_guidance": self.metadata_scale, "precision": self.precision,
                "guidance_colour": self.colour if self.guided else "guided", "colour_calibration": self.calibration}

    def describe(self) -> str:
        colour = f" (colour {self.colour})" if self.guided else ""
        calibrated = f", colour calibrated on {self.calibration} tiles per class" if self.calibration else ""
        return (f"{self.kind} {self.steps} steps, guidance {self.guidance} / metadata {self.metadata_scale}{colour}, "
                f"{self.precision}{calibrated}")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def autocast_for(device: torch.device, precision: str):
    if precision in ("fp32", "no"):            # "no": sample sets written before fp32 was named so
        return nullcontext()
    if precision not in ("bf16", "fp16"):
        raise MediError(f"unknown sampling precision '{precision}' (auto is resolved before sampling)")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def sampling_precision(model: MediDiffusion, sampler: Sampler, cond: Mapping[str, torch.Tensor], batch: int) -> Decision:
    """`sampler.precision` as sampling applies it: auto = the faster of fp32 and bf16 for this model, batch and
    guidance (timed once per process and shape, `medi.precision`)."""
    device = next(model.parameters()).device
    first = {k: v[:1] for k, v in cond.items()}
    evaluations = len(guidance_conditions(first, sampler.guidance, sampler.metadata_guidance)[0])
    return for_sampling(sampler.precision, model, first, batch, evaluations, sampler.steps, device)


def guidance_conditions(cond: Mapping[str, torch.Tensor], guidance: float, metadata_guidance: float | None,
                        colour: str = "guided") -> tuple[list[dict[str, torch.Tensor]], Callable]:
    """The condition batches one guided step evaluates, and how their predictions combine.

    With c the class and m the metadata attributes, e(.) the model's prediction and null the null token:
    - joint (metadata_guidance None or equal to guidance, or no attributes): e(null) + g (e(c, m) - e(null)),
      the usual classifier-free guidance (g = 1: plain conditional sampling, one evaluation);
    - compositional: e(null) + g_c (e(c, null) - e(null)) + g_m (e(c, m) - e(c, null)): the class pushed by
      g_c, the metadata on top of it by g_m (three evaluations; two when g_c = 1, where e(null) cancels).
      Equal scales give the joint formula.

    `colour` "conditional": the guided prediction (B, C, H, W) keeps the per-channel mean over the image of the
    conditional prediction e(c, m), so guidance sharpens what varies across a tile (the class's tissue) and leaves
    its mean colour as plain conditional sampling draws it. The usual guidance ("guided") pushes the mean as well:
    under the stain pathway that is the class's colour in the reference stain, pushed away from what the site's map
    expects (docs/conditioning.md, "Guidance and colour"). Without guidance nothing changes."""
    if colour not in typing.get_args(GuidanceColour):
        raise MediError(f"unknown guidance colour '{colour}'; known: {', '.join(typing.get_args(GuidanceColour))}")
    variants, combine = _guidance(cond, guidance, metadata_guidance)
    if colour == "guided" or len(variants) == 1:
        return variants, combine

    def keep_colour(e: Sequence[torch.Tensor]) -> torch.Tensor:
        guided = combine(e)
        return guided - guided.mean((2, 3), keepdim=True) + e[0].mean((2, 3), keepdim=True)
    return variants, keep_colour


def _guidance(cond: Mapping[str, torch.Tensor], guidance: float,
              metadata_guidance: float | None) -> tuple[list[dict[str, torch.Tensor]], Callable]:
    """guidance_conditions' evaluations (the full condition first) and how they combine."""
    attributes = [k for k in cond if k != "class"]
    g_c = guidance
    g_m = guidance if metadata_guidance is None or not attributes else metadata_guidance
    if g_m == g_c:
        if g_c == 1.0:
            return [dict(cond)], lambda e: e[0]
        return [dict(cond), null_condition(cond)], lambda e: e[1] + g_c * (e[0] - e[1])
    class_only = {**null_condition(cond), "class": cond["class"]}
    if g_c == 1.0:
        return [dict(cond), class_only], lambda e: e[1] + g_m * (e[0] - e[1])
    return ([dict(cond), class_only, null_condition(cond)],
            lambda e: e[2] + g_c * (e[1] - e[2]) + g_m * (e[0] - e[1]))


@torch.no_grad()
def generate(model: MediDiffusion, sampler: Sampler, noise: ModelConfig, cond: Mapping[str, torch.Tensor],
             seeds: Sequence[int], batch_size: int = 64) -> np.ndarray:
    """Generate one image per seed under the encoded conditions `cond` (tensors of length len(seeds)), with
    `sampler` on the noise schedule of `noise` (params `model`).

    guidance = 1 is plain conditional sampling; > 1 is classifier-free guidance against the null condition;
    `metadata_guidance` scales the metadata apart from the class (compositional guidance,
    `guidance_conditions`). Returns uint8 (N, H, W, 3).
    """
    device = next(model.parameters()).device
    if sampler.precision == AUTO:
        sampler = sampler.at(sampling_precision(model, sampler, cond, min(batch_size, len(seeds))).precision)
    calibrated = model.stain is not None and sampler.calibration > 0 and bool(model.stain.targeted.any())
    source = calibration_source(model, sampler, noise, batch_size) if calibrated else None
    out = []
    for lo in range(0, len(seeds), batch_size):
        chunk = list(seeds[lo:lo + batch_size])
        c = {k: v[lo:lo + len(chunk)].to(device) for k, v in cond.items()}
        x = denoise(model, sampler, noise, c, chunk)
        if source is not None:              # each class's H and E as its training tiles' (medi.stain)
            x = model.stain.calibrate(x, c["class"], source)
        if model.stain is not None:         # the stain pathway: from the reference stain to each tile's site's
            x = model.stain.restain(x, c.get(SITE))
        out.append(to_uint8(x))
    return np.concatenate(out)


@torch.no_grad()
def denoise(model: MediDiffusion, sampler: Sampler, noise: ModelConfig, c: Mapping[str, torch.Tensor],
            seeds: Sequence[int]) -> torch.Tensor:
    """One batch of `generate` (conditions `c` on the model's device, precision resolved), [-1, 1] (B, 3, H, W),
    under the reference stain where the model has the stain pathway."""
    device, size = next(model.parameters()).device, model.arch.sample_size
    scheduler = sampler.scheduler(noise)
    x = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)
    x = x * scheduler.init_noise_sigma
    variants, combine = guidance_conditions(c, sampler.guidance, sampler.metadata_guidance, sampler.colour)
    k = len(variants)
    c = {key: torch.cat([v[key] for v in variants]) for key in c}
    scheduler.set_timesteps(sampler.steps)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x] * k) if k > 1 else x, t)
        with autocast_for(device, sampler.precision):
            pred = model(inp, t.to(device).expand(inp.shape[0]), c).float()
        pred = combine(pred.chunk(k))
        x = scheduler.step(pred, t, x).prev_sample
    return x


CALIBRATION_SEED = 900_000_000      # the calibration tiles' seeds: CALIBRATION_SEED + 0, 1, ... (apart from plans')


@torch.no_grad()
def calibration_source(model: MediDiffusion, sampler: Sampler, noise: ModelConfig, batch_size: int) -> torch.Tensor:
    """The quantiles of the H and E concentrations of the model's own tiles of each class (`StainPathway.
    class_quantiles`), `sampler.calibration` per class drawn with this sampler (precision resolved) and the class
    alone (the metadata at its null token), seeds CALIBRATION_SEED + i; computed once per sampler and weights (kept
    on the model's stain pathway while its parameters are not written to)."""
    key = (tuple(sorted(sampler.settings().items())), tuple(p._version for p in model.parameters()))
    cache = model.stain.sources
    if key not in cache:
        cache.clear()
        classes = [c for k, c in enumerate(model.vocab.classes, 1) if bool(model.stain.targeted[k])]
        names = [c for c in classes for _ in range(sampler.calibration)]
        cond = model.vocab.encode(names)
        seeds = [CALIBRATION_SEED + i for i in range(len(names))]
        device, t0 = next(model.parameters()).device, time.perf_counter()
        tiles = [denoise(model, sampler, noise, {k: v[lo:lo + batch_size].to(device) for k, v in cond.items()},
                         seeds[lo:lo + batch_size]) for lo in range(0, len(seeds), batch_size)]
        cache[key] = model.stain.class_quantiles(torch.cat(tiles), cond["class"])
        log.info("colour calibration: %d of the model's own tiles per class (%s), %s, %.1f s", sampler.calibration,
                 ", ".join(classes), sampler.describe(), time.perf_counter() - t0)
    return cache[key]


def grid_layout(vocab, train_index) -> tuple[list[str], list[str | None]]:
    """The fixed (class, site) grid logged during training: rows = classes; columns = the largest training
    site of each class when the model is conditioned on the site (the diagonal is seen in training, every
    other cell is a pair never seen together), else one unconditioned column per class row."""
    classes = list(vocab.classes)
    if "tss" not in vocab.categorical:
        return classes, [None] * len(classes)
    return classes, largest_sites(train_index, classes)


def largest_sites(train_index, classes: Sequence[str]) -> list[str]:
    """The training site with the most tiles of each class."""
    largest = train_index.groupby("class").tss.agg(lambda s: s.value_counts().index[0])
    return [largest[c] for c in classes]


def grid_conditions(vocab, classes: Sequence[str], sites: Sequence[str | None], seeds: int):
    """Encoded conditions and seeds for every (class, site) cell, `seeds` images each, row-major."""
    # Cells of one row share their seeds when they differ by site (same noise, so only the site changes);
    # unconditioned columns get seeds of their own.
    rows = [(c, s, 1000 + k + (j * seeds if s is None else 0))
            for c in classes for j, s in enumerate(sites) for k in range(seeds)]
    attrs = {"tss": [s for _, s, _ in rows]} if "tss" in vocab.categorical else {}
    return vocab.encode([c for c, _, _ in rows], attrs), [seed for _, _, seed in rows]


# ----------------------------------------------------------------------------------------------- plans
def plan(cfg: SampleConfig, train_index: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """The conditions of a sample set: one row per image (class, metadata, seed, batch, path), per strategy."""
    rng = np.random.default_rng([cfg.seed, 20250])
    meta = [c for c in METADATA if c in train_index.columns]
    rows_of = train_index.reset_index(drop=True)
    if cfg.strategy in ("match", "uniform"):
        n = cfg.count or len(rows_of)
        if cfg.strategy == "match":       # every training row once per full pass, the remainder at random
            reps, rest = divmod(n, len(rows_of))
            pick = np.concatenate([np.tile(np.arange(len(rows_of)), reps), np.sort(rng.permutation(len(rows_of))[:rest])])
        else:                             # equal counts per class, each with the metadata of a random row of it
            pick = []
            for i, c in enumerate(classes):
                own = np.flatnonzero(rows_of["class"].to_numpy(str) == c)
                pick.append(own[rng.integers(0, len(own), n // len(classes) + (i < n % len(classes)))])
            pick = np.concatenate(pick)
        rows = rows_of.iloc[pick][["class", *meta]].reset_index(drop=True)
    else:
        rows = pd.DataFrame([dict(pair) for pair in _pairs(cfg, rows_of, classes) for _ in range(cfg.per_pair)])
        rows = _fill_metadata(rows, rows_of, meta, rng)
    rows["class"] = rows["class"].astype(str)
    for c in ("tss", "race", "gender"):
        if c in rows:
            rows[c] = rows[c].astype(str)
    n = len(rows)
    rows["seed"] = cfg.seed * 1_000_000 + np.arange(n)
    rows["batch"] = np.arange(n) // cfg.batch_size
    rows.insert(0, "path", [f"images/{c}/{i:06d}.png" for i, c in enumerate(rows["class"])])
    return rows


def _pairs(cfg: SampleConfig, train_index: pd.DataFrame, classes: Sequence[str]) -> list[dict]:
    if cfg.strategy == "explicit":
        pairs = [dict(p) for p in cfg.pairs]
        for i, p in enumerate(pairs):
            if p["class"] not in classes:
                raise MediError(f"sample.pairs[{i}]: unknown class '{p['class']}'; known: {list(classes)}")
        return pairs
    sites = sorted(train_index["tss"].astype(str).unique())
    grid_classes, grid_sites = cfg.grid_classes or list(classes), cfg.grid_sites or sites
    for what, chosen, known in (("grid_classes", grid_classes, list(classes)), ("grid_sites", grid_sites, sites)):
        unknown = [v for v in chosen if v not in known]
        if unknown:
            raise MediError(f"sample.{what}: {unknown} not in the training split; known: {known}")
    return [{"class": c, "tss": s} for c in grid_classes for s in grid_sites]


def _fill_metadata(rows: pd.DataFrame, train_index: pd.DataFrame, meta: list[str], rng) -> pd.DataFrame:
    """Metadata a pair does not give comes from a random training row of its site (or, without one, its class)."""
    out = rows.copy()
    for col in meta:
        if col not in out:
            out[col] = None
    for i, row in out.iterrows():
        key = ("tss", row["tss"]) if row.get("tss") is not None else ("class", row["class"])
        pool = train_index[train_index[key[0]].astype(str) == str(key[1])]
        if pool.empty:
            pool = train_index[train_index["class"] == row["class"]]
        donor = pool.iloc[int(rng.integers(0, len(pool)))]
        for col in meta:
            if row[col] is None or (isinstance(row[col], float) and np.isnan(row[col])):
                out.at[i, col] = donor[col]
    return out


# ----------------------------------------------------------------------------------------------- sample sets
def conditions_of(rows: pd.DataFrame, model: MediDiffusion) -> dict[str, torch.Tensor]:
    """Encode plan rows with the model's saved vocabulary (looked up by value; unknown values are an error)."""
    attrs = {a: [None if pd.isna(v) else v for v in rows[a]] for a in model.vocab.attributes}
    return model.vocab.encode(rows["class"].tolist(), attrs)


def load_model(model_dir: str | Path) -> MediDiffusion:
    """A trained model as everything that samples it loads it: on this process's device (accelerate), in eval mode."""
    return MediDiffusion.load(model_dir).to(distributed.state().device).eval()


def weights_digest(model_dir: str | Path) -> str:
    return hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()[:16]


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", compress_level=1)


def generate_set(model: MediDiffusion, rows: pd.DataFrame, out_dir: Path, sampler: Sampler, noise: ModelConfig) -> float:
    """Generate the plan's images batch by batch as PNGs under `out_dir`; batches whose images all exist
    already (an interrupted run of the same plan) are skipped. Returns images per second of this run.

    Under a launch this is a collective: the main process lists the batches to do, each process generates
    every N-th of them (whole batches, so each image is computed as one process computes it), and all
    return once every batch is on disk."""
    from tqdm import tqdm

    todo = [b for b, g in rows.groupby("batch", sort=True) if not all((out_dir / p).exists() for p in g["path"])]
    todo = distributed.broadcast(todo)          # what the main process saw, before anyone writes
    if len(todo) < rows["batch"].nunique() and distributed.is_main():
        log.info("resuming: %d of %d batches already on disk", rows["batch"].nunique() - len(todo), rows["batch"].nunique())
    mine = distributed.shard(todo, "sampling batches")
    made, t0 = 0, time.perf_counter()
    with tqdm(total=int(rows["batch"].isin(mine).sum()), unit="img", desc=f"sampling ({sampler.kind} {sampler.steps})",
              disable=not distributed.is_main()) as bar:
        for b in mine:
            g = rows[rows["batch"] == b]
            images = generate(model, sampler, noise, conditions_of(g, model), g["seed"].tolist(), batch_size=len(g))
            for p, img in zip(g["path"], images):
                write_png(out_dir / p, img)
            made += len(g)
            bar.update(len(g))
            bar.set_postfix(img_s=f"{made / (time.perf_counter() - t0):.1f}")
    distributed.barrier()
    return int(rows["batch"].isin(todo).sum()) / max(time.perf_counter() - t0, 1e-9)


def regenerate(manifest: pd.DataFrame, model: MediDiffusion, noise: ModelConfig) -> np.ndarray:
    """Replay a manifest's batches: the images, in manifest order, bit for bit as first generated."""
    out = np.zeros((len(manifest), model.arch.sample_size, model.arch.sample_size, 3), np.uint8)
    for _, g in manifest.groupby("batch", sort=True):
        # rows made before a setting existed (a whole set, or the older rows of a grown pool): joint, usual guidance
        g = g.assign(metadata_guidance=g.get("metadata_guidance", g["guidance"]).fillna(g["guidance"]),
                     guidance_colour=g.get("guidance_colour", pd.Series("guided", index=g.index)).fillna("guided"),
                     colour_calibration=g.get("colour_calibration", pd.Series(0, index=g.index)).fillna(0).astype(int))
        settings = g[["scheduler", "steps", "guidance", "metadata_guidance", "precision",
                      "guidance_colour", "colour_calibration"]].drop_duplicates()
        if len(settings) != 1:
            raise MediError(f"manifest batch {g['batch'].iloc[0]} mixes sampler settings: {settings.to_dict('records')}")
        attrs = [a for a in str(g["conditioned_on"].iloc[0]).split(",") if a and a != "class"]
        if sorted(attrs) != sorted(model.vocab.attributes):
            raise MediError(f"the manifest was conditioned on {attrs or 'the class only'}, this model on "
                            f"{model.vocab.attributes or 'the class only'}")
        out[np.flatnonzero(manifest.index.isin(g.index))] = generate(
            model, Sampler.from_settings(settings.iloc[0]), noise, conditions_of(g, model), g["seed"].tolist(),
            batch_size=len(g))
    return out
