"""Training a diffusion model (`medi train --model NAME`): accelerate loop, EMA, checkpoints, auto-resume.

- Devices, mixed precision and distribution come from accelerate (`accelerate launch -m medi.cli train ...`
  runs the same code on many GPUs); the default is the CPU with bf16 autocast.
- Batches are a pure function of (seed, step, micro-batch, process): class-balanced indices (weight
  1 / count(class)), flips/rotations, noise and timesteps all come from generators seeded by the step.
  Resuming therefore needs no data-loader state, and a run killed at any moment and restarted ends with the
  same weights as an uninterrupted one.
- Checkpoints (every `train.checkpoint_every` steps, the last `keep_checkpoints` kept) live in
  `<checkpoints>/<NAME>-<params hash>/checkpoint-<step>/`, outside the DVC output (DVC deletes outputs
  before a stage runs), written to a temporary folder and renamed. Weights and EMA are safetensors; the
  optimizer is a tensor-only torch file loaded with `weights_only=True`; the rest is JSON.
- A NaN or infinite loss stops the run (`TrainingDiverged`); the last good checkpoint stays, and the MLflow
  run is marked FAILED.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator, PartialState
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from medi.config import Config
from medi.errors import MediError
from medi.io import write_json
from medi.model import MediDiffusion, Vocabulary, architecture, drop_conditions
from medi.sample import training_scheduler

log = logging.getLogger(__name__)

Hook = Callable[[int, MediDiffusion], Mapping[str, float]]


class TrainingDiverged(MediError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------- data
class StepBatches(torch.utils.data.IterableDataset):
    """Micro-batches for steps [start, stop): batch (step, micro) depends only on the seed and those numbers."""

    def __init__(self, tiles_file: str, rows: np.ndarray, weights: np.ndarray, micro_batch: int, seed: int,
                 start: int, stop: int, accumulation: int, rank: int, augment: bool):
        super().__init__()
        self.tiles_file, self.rows, self.p = tiles_file, rows, weights / weights.sum()
        self.micro_batch, self.seed, self.start, self.stop = micro_batch, seed, start, stop
        self.accumulation, self.rank, self.augment = accumulation, rank, augment

    def batch(self, tiles: np.ndarray, step: int, micro: int) -> dict[str, torch.Tensor]:
        g = np.random.default_rng([self.seed, step, micro, self.rank])
        pick = np.sort(g.choice(len(self.rows), self.micro_batch, p=self.p))
        x = tiles[self.rows[pick]]                            # (B, H, W, 3) uint8, sorted rows read sequentially
        if self.augment:                                      # the 8 symmetries of the square
            k, flip = g.integers(0, 4, len(x)), g.random(len(x)) < 0.5
            x = np.stack([np.rot90(t[:, ::-1] if f else t, int(r)) for t, r, f in zip(x, k, flip)])
        return {"pixels": torch.from_numpy(np.ascontiguousarray(x)), "pos": torch.from_numpy(pick),
                "step": torch.tensor(step), "micro": torch.tensor(micro)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        tiles = np.load(self.tiles_file, mmap_mode="r")
        for i, (step, micro) in enumerate((s, m) for s in range(self.start, self.stop) for m in range(self.accumulation)):
            if i % nw == wid:
                yield self.batch(tiles, step, micro)


def sampling_weights(classes: pd.Series, balanced: bool) -> np.ndarray:
    """1 / count(class) per tile (the paper's class-balanced sampling), or uniform."""
    if not balanced:
        return np.ones(len(classes))
    return (1.0 / classes.map(classes.value_counts())).to_numpy(dtype=float)


# ----------------------------------------------------------------------------------------------- checkpoints
def checkpoint_root(cfg: Config, name: str, train_index: pd.DataFrame) -> Path:
    return Path(cfg.model.output).parent / "checkpoints" / f"{name}-{run_hash(cfg, name, train_index)}"


def run_hash(cfg: Config, name: str, train_index: pd.DataFrame) -> str:
    """What a checkpoint must match to be resumed: the params that shape training, the variant, and the
    training tiles themselves (a new split or new data starts a new run, never resumes an old one)."""
    data_hash = hashlib.sha256(pd.util.hash_pandas_object(train_index[["idx", "slide", "class", "tss"]],
                                                          index=False).values.tobytes()).hexdigest()[:8]
    variant = "_".join(cfg.variant(name)) or "none"
    return f"{cfg.params_hash('data', 'model', 'train')}-{data_hash}-{variant}"


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def resumable_run_id(cfg: Config, name: str, train_index: pd.DataFrame) -> str | None:
    """The MLflow run of an interrupted training with the same params, so a resumed run continues it."""
    ckpt = latest_checkpoint(checkpoint_root(cfg, name, train_index))
    if ckpt is None:
        return None
    return json.loads((ckpt / "state.json").read_text())["train"].get("mlflow_run_id")


@dataclass
class TrainState:
    step: int = 0
    images: int = 0
    mlflow_run_id: str | None = None
    seconds: float = 0.0


def save_checkpoint(root: Path, state: TrainState, model: MediDiffusion, ema: EMAModel, optimizer, scheduler,
                    keep: int) -> Path:
    final = root / f"checkpoint-{state.step:07d}"
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = [n for n, _ in model.named_parameters()]
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    ema_state = ema.state_dict()
    save_file({n: p.detach().cpu().contiguous() for n, p in zip(names, ema_state.pop("shadow_params"))},
              str(tmp / "ema.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"train": asdict(state), "ema": ema_state,
                                                "lr_scheduler": scheduler.state_dict(),
                                                "torch_rng": torch.get_rng_state().tolist()}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(p for p in root.glob("checkpoint-*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(folder: Path, model: MediDiffusion, ema: EMAModel, optimizer, scheduler) -> TrainState:
    """Restore everything `save_checkpoint` wrote. Nothing here unpickles arbitrary objects."""
    meta = json.loads((folder / "state.json").read_text())
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    shadow = load_file(str(folder / "ema.safetensors"))
    ema.load_state_dict({**meta["ema"], "shadow_params": [shadow[n] for n, _ in model.named_parameters()]})
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(meta["lr_scheduler"])
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    return TrainState(**meta["train"])


# ----------------------------------------------------------------------------------------------- the loop
@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    final_loss: float
    images_per_second: float
    model: MediDiffusion            # with EMA weights


def train(cfg: Config, name: str, train_index: pd.DataFrame, tiles_file: str | Path,
          hooks: Sequence[tuple[int, Hook]] = (), on_log: Callable[[int, dict], None] | None = None,
          mlflow_run_id: str | None = None) -> TrainResult:
    """Train model `name` (a key of model.variants) on `train_index` rows of the packed `tiles_file`.

    `hooks` are (every_n_steps, fn) pairs called with the EMA weights in place; their metrics go to
    `on_log` (MLflow in the CLI) at that step, as do loss, lr and throughput every `train.log_every` steps.
    """
    t, m = cfg.train, cfg.model
    attributes = cfg.variant(name)
    accelerator = Accelerator(mixed_precision=t.precision, gradient_accumulation_steps=t.grad_accumulation)
    if t.precision != "no" and not accelerator.native_amp:
        log.warning("train.precision is %s but accelerate does not autocast it on %s: this run trains in fp32",
                    t.precision, accelerator.device.type)
    micro = t.batch_size // (t.grad_accumulation * accelerator.num_processes)
    if micro < 1:
        raise MediError(f"train.batch_size {t.batch_size} is smaller than grad_accumulation x processes")

    torch.manual_seed(t.seed)
    vocab = Vocabulary.from_frame(train_index, "class", attributes, m.continuous)
    arch = architecture(m.preset, cfg.data.resolution, m.d_e, m.custom)
    model = MediDiffusion(arch, vocab)
    ema = EMAModel(model.parameters(), decay=t.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    lr_scheduler = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    noise = training_scheduler(m)

    root = checkpoint_root(cfg, name, train_index)
    state = TrainState(mlflow_run_id=mlflow_run_id)
    ckpt = latest_checkpoint(root)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, ema, optimizer, lr_scheduler)
        state.mlflow_run_id = mlflow_run_id or state.mlflow_run_id
        log.info("resuming %s from %s (step %d of %d)", name, ckpt, state.step, t.max_steps)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema.to(accelerator.device)
    core: MediDiffusion = accelerator.unwrap_model(model)

    conditions = vocab.encode(train_index["class"].tolist(), {a: train_index[a].tolist() for a in vocab.attributes})
    data = StepBatches(str(tiles_file), train_index["idx"].to_numpy(), sampling_weights(train_index["class"], t.balanced),
                       micro, t.seed, state.step, t.max_steps, t.grad_accumulation, accelerator.process_index, t.augment)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=t.workers, prefetch_factor=4 if t.workers else None,
                                         generator=torch.Generator().manual_seed(t.seed))  # leaves the global RNG alone

    def with_ema(fn):
        ema.store(core.parameters())
        ema.copy_to(core.parameters())
        core.eval()
        try:
            return fn(core)
        finally:
            ema.restore(core.parameters())
            core.train()

    bar = tqdm(total=t.max_steps, initial=state.step, desc=f"train {name}", unit="step", mininterval=1.0,
               disable=not accelerator.is_main_process)
    window_images, window_t0, loss_sum, loss_n, last_loss = 0, time.perf_counter(), 0.0, 0, float("nan")
    run_t0, hook_seconds = time.perf_counter() - state.seconds, 0.0
    model.train()
    for batch in loader:
        step, mb = int(batch["step"]), int(batch["micro"])
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([t.seed, step, mb, accelerator.process_index, 1])
                                              .generate_state(1)[0]))
        x0 = batch["pixels"].to(accelerator.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        eps = torch.randn(x0.shape, generator=g).to(accelerator.device)
        timesteps = torch.randint(0, noise.config.num_train_timesteps, (len(x0),), generator=g).to(accelerator.device)
        cond = {k: v[batch["pos"]].to(accelerator.device) for k, v in conditions.items()}
        cond = drop_conditions(cond, m.class_dropout, m.attribute_dropout, generator=g)
        x_t = noise.add_noise(x0, eps, timesteps)
        if m.prediction_type == "v_prediction":
            target = noise.get_velocity(x0, eps, timesteps)
        else:
            target = eps if m.prediction_type == "epsilon" else x0
        with accelerator.accumulate(model):
            with accelerator.autocast():
                pred = model(x_t, timesteps, cond)
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"training {name}: loss is {loss.item()} at step {step}; the last good "
                                       f"checkpoint is kept in {root} (try a lower train.lr or precision: no)")
            accelerator.backward(loss)
            if accelerator.sync_gradients and t.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
        window_images += len(x0) * accelerator.num_processes
        if mb < t.grad_accumulation - 1:
            continue

        # one optimizer step done
        ema.step(core.parameters())
        state.step, state.images = step + 1, state.images + micro * t.grad_accumulation * accelerator.num_processes
        bar.update(1)
        metrics: dict[str, float] = {}
        if state.step % t.log_every == 0 or state.step == t.max_steps:
            elapsed = time.perf_counter() - window_t0
            last_loss = loss_sum / loss_n
            metrics.update(loss=last_loss, lr=lr_scheduler.get_last_lr()[0], images_per_second=window_images / elapsed)
            bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{window_images / elapsed:.1f}")
            window_images, window_t0, loss_sum, loss_n = 0, time.perf_counter(), 0.0, 0
        hook_t0 = time.perf_counter()
        for every, hook in hooks:  # every = 0: only at the last step
            if (every and state.step % every == 0) or state.step == t.max_steps:
                metrics.update(with_ema(lambda mdl: hook(state.step, mdl)) or {})
        hook_seconds += time.perf_counter() - hook_t0
        window_t0 += time.perf_counter() - hook_t0      # throughput counts training time only
        if metrics and on_log and accelerator.is_main_process:
            on_log(state.step, metrics)
        if state.step % t.checkpoint_every == 0 or state.step == t.max_steps:
            state.seconds = time.perf_counter() - run_t0 - hook_seconds
            if accelerator.is_main_process:
                save_checkpoint(root, state, core, ema, optimizer, lr_scheduler, t.keep_checkpoints)
            accelerator.wait_for_everyone()
    bar.close()

    ema.copy_to(core.parameters())
    core.eval()
    model_dir = Path(m.output) / name
    seconds = time.perf_counter() - run_t0 - hook_seconds
    if accelerator.is_main_process:
        core.save(model_dir, extra={"name": name, "attributes": attributes, "model_params": asdict(m),
                                    "steps": state.step, "run_hash": run_hash(cfg, name, train_index)})
    ips = (state.images / seconds) if seconds > 0 else math.nan
    return TrainResult(model_dir, state.step, last_loss, ips, core)


# ----------------------------------------------------------------------------------------------- the stage
def grid_hook(cfg: Config, name: str, train_index: pd.DataFrame, vocab: Vocabulary, sink: dict) -> Hook:
    """Sample the fixed (class, site) grid with fixed seeds, log it to MLflow, keep the last one in `sink`."""
    import matplotlib.pyplot as plt
    import mlflow

    from medi import figures
    from medi.sample import generate, grid_conditions, grid_layout, make_sampler

    classes, sites = grid_layout(vocab, train_index)
    cond, seeds = grid_conditions(vocab, classes, sites, cfg.train.grid_seeds)
    site_class = train_index.drop_duplicates("tss").set_index("tss")["class"].to_dict()
    labels = [f"TSS {s} ({site_class[s]})" if s else "class only" for s in sites]
    sampler = f"{cfg.train.grid_scheduler} {cfg.train.grid_steps} steps"

    def hook(step: int, model: MediDiffusion) -> dict[str, float]:
        images = generate(model, make_sampler(cfg.train.grid_scheduler, cfg.model), cond, seeds, cfg.train.grid_steps,
                          guidance=cfg.train.grid_guidance, precision=cfg.train.precision)
        n, k = len(classes), cfg.train.grid_seeds
        cells = images.reshape(n, len(sites), k, *images.shape[1:])
        cells = np.concatenate(list(cells.transpose(2, 0, 1, 3, 4, 5)), axis=3)   # seeds side by side in a cell
        title = (f"{name} at step {step}: rows = conditioned class, columns = conditioned site "
                 f"(diagonal = pairs seen in training, the rest never seen), {sampler}, "
                 f"guidance {cfg.train.grid_guidance}, EMA")
        if sites[0] is None:
            title = (f"{name} at step {step}: rows = conditioned class, {sampler}, "
                     f"guidance {cfg.train.grid_guidance}, EMA")
        fig = figures.tile_grid(cells, classes, labels, title, scale=0.9 * k)
        mlflow.log_figure(fig, f"grids/{name}_step_{step:07d}.png")
        if "figure" in sink:
            plt.close(sink["figure"])
        sink.update(step=step, images=images, figure=fig, classes=classes, sites=sites)
        return {}

    return hook


def stain_check(cfg: Config, model: MediDiffusion, train_index: pd.DataFrame, tiles: np.ndarray) -> dict | None:
    """On the synthetic world: generate every (class, largest training site of each class) pair and compare the
    tiles' stain with the conditioned site's true stain; real tiles of each site give the estimator's floor.

    A model not conditioned on the site (CLS) is scored against the same sites, which shows how far class
    conditioning alone reproduces a site's stain (its dominant site) or cannot (the others)."""
    from medi.groundtruth import GroundTruth, stain_report
    from medi.sample import generate, largest_sites, make_sampler

    truth = GroundTruth.load(cfg.data.root)
    if truth is None:
        return None
    n = cfg.train.stain_check_seeds
    classes = list(model.vocab.classes)
    sites = largest_sites(train_index, classes)
    conditioned = "tss" in model.vocab.categorical
    # A site-conditioned model is sampled for every (class, site) pair; any other model once per class, and
    # those class samples are then scored against every site.
    pairs = [(c, s if conditioned else None) for c in classes for s in (sites if conditioned else [None])]
    cond = model.vocab.encode([c for c, _ in pairs for _ in range(n)],
                              {"tss": [s for _, s in pairs for _ in range(n)]} if conditioned else {})
    images = generate(model, make_sampler(cfg.train.grid_scheduler, cfg.model), cond, list(range(n)) * len(pairs),
                      cfg.train.grid_steps,
                      guidance=cfg.train.grid_guidance, precision=cfg.train.precision).reshape(len(pairs), n, *tiles.shape[1:])
    sampled = dict(zip(pairs, images))
    cells = [(c, s, sampled[(c, s if conditioned else None)]) for c in classes for s in sites]
    report = stain_report(cells, truth)
    real = [(c, s, tiles[train_index[train_index.tss == s]["idx"].to_numpy()[:n]]) for c, s in zip(classes, sites)]
    report["real"] = stain_report(real, truth)["summary"]["seen"]
    return report


def run_stage(cfg: Config, name: str, extra_hooks: Sequence[tuple[int, Hook]] = ()) -> TrainResult:
    """`medi train --model NAME`: train (resuming if a checkpoint exists), log everything, save the model."""
    import mlflow

    from medi import figures, tracking

    split_dir = Path(cfg.split.output)
    if not (split_dir / "train.parquet").exists():
        raise MediError(f"{split_dir / 'train.parquet'} not found; run `medi split` (or `dvc repro split`) first")
    train_index = pd.read_parquet(split_dir / "train.parquet")
    tiles_file = Path(cfg.data.output) / "tiles.npy"
    attributes = cfg.variant(name)
    if not PartialState().is_main_process:   # other processes of a distributed run: train, nothing else
        return train(cfg, name, train_index, tiles_file)
    vocab = Vocabulary.from_frame(train_index, "class", attributes, cfg.model.continuous)
    run_id = resumable_run_id(cfg, name, train_index)
    with tracking.stage_run(cfg, f"train@{name}", ("data", "model", "train"), run_name=f"train-{name}",
                            run_id=run_id) as run:
        mlflow.log_params({"model_name": name, "attributes": ",".join(attributes) or "none",
                           "train_tiles": len(train_index), "vocab_sizes": json.dumps({a: len(v) for a, v in vocab.categorical.items()})})
        last_grid: dict = {}
        grid = grid_hook(cfg, name, train_index, vocab, last_grid)
        result = train(cfg, name, train_index, tiles_file, [(cfg.train.grid_every, grid), *extra_hooks],
                       on_log=lambda step, metrics: mlflow.log_metrics(dict(metrics), step=step),
                       mlflow_run_id=run.info.run_id)
        if not last_grid:       # resumed from the final checkpoint, so no step ran: the last grid is drawn now
            grid(result.steps, result.model)
        for f in ("config.json", "vocab.json"):
            mlflow.log_artifact(str(result.model_dir / f), "model")
        metrics = {"steps": result.steps, "final_loss": result.final_loss, "images_per_second": result.images_per_second}
        stains = stain_check(cfg, result.model, train_index, np.load(tiles_file, mmap_mode="r"))
        if stains is not None:
            for kind in ("seen", "unseen"):
                for key, value in stains["summary"].get(kind, {}).items():
                    metrics[f"stain_{kind}_{key}"] = value
            metrics.update({f"stain_real_{k}": v for k, v in stains["real"].items()})
            mlflow.log_dict(stains, "stain_check.json")
            log.info("stain check of %s (angle to the conditioned site's true stain; rank 0 = the nearest of all "
                     "sites, 0.5 = chance): %s; real tiles: %s", name, stains["summary"], stains["real"])
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        write_json(cfg.train.metrics.format(model=name), metrics)
        if last_grid:
            path = figures.save(last_grid["figure"], cfg.train.figure.format(model=name))
            log.info("sample grid of %s at step %d: %s", name, last_grid["step"], path)
        log.info("trained %s: %d steps, final loss %.4f, %.1f images/s", name, result.steps, result.final_loss,
                 result.images_per_second)
    return result
