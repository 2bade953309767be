"""Training a diffusion model (`medi train --model NAME`): accelerate loop, EMA, checkpoints, auto-resume.

- Devices, mixed precision and distribution come from accelerate (`train.precision: auto` picks fp32 or bf16 by
  timing both on this machine at start, `medi.precision`, and the checkpoints and the saved model record the
  choice, so a resumed run keeps it): `accelerate launch` / `torchrun` with N
  processes train one model data-parallel (NCCL on GPUs, gloo on CPUs; `medi.distributed`), gradients
  averaged over the processes; the default is one process on the CPU.
- The global batch of a step (`train.batch_size` tiles, in `grad_accumulation` micro-batches) is a pure
  function of (seed, step): class-balanced indices (weight 1 / count(class)) and flips/rotations come from a
  generator seeded by (step, micro-batch), and each tile's noise, timestep and condition dropout from one
  seeded by its position in the step. Each process trains on its contiguous share of every micro-batch, so N
  processes see the same tiles and noise as one and end with the same weights (to float rounding).
  Resuming therefore needs no data-loader state, and a run killed at any moment and restarted (with as many
  processes) ends with the same weights as an uninterrupted one.
- EMA, checkpoints, the saved model, MLflow and figures are the main process's alone; every process resumes
  from the checkpoint the main process chose (checkpoints must be on a file system all processes see).
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
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel, compute_snr
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from medi import artifacts, distributed, precision
from medi.config import Config, ModelConfig, TrainConfig
from medi.errors import MediError
from medi.io import write_json, write_text
from medi.model import SITE, MediDiffusion, Vocabulary, architecture, drop_conditions, training_scheduler
from medi.stain import StainPathway

HEADLINE = ("steps", "final_loss", "images_per_second")   # metrics/train_NAME.json (dvc metrics show)

log = logging.getLogger(__name__)

Hook = Callable[[int, MediDiffusion], Mapping[str, float]]


class TrainingDiverged(MediError):
    """The loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------- data
class StepBatches(torch.utils.data.IterableDataset):
    """This process's share of the micro-batches of steps [start, stop).

    Micro-batch (step, micro) of the whole run depends only on the seed and those numbers: `global_micro`
    tiles drawn and augmented by a generator seeded with (seed, step, micro), of which process `rank` of
    `processes` takes the contiguous slice [rank * n, (rank + 1) * n), n = global_micro / processes. `index`
    is each tile's position in the step's global batch (what its noise is seeded by)."""

    def __init__(self, tiles_file: str, rows: np.ndarray, weights: np.ndarray, global_micro: int, seed: int,
                 start: int, stop: int, accumulation: int, augment: bool, rank: int = 0, processes: int = 1):
        super().__init__()
        if global_micro % processes:
            raise MediError(f"a micro-batch of {global_micro} tiles does not split over {processes} processes")
        self.tiles_file, self.rows, self.p = tiles_file, rows, weights / weights.sum()
        self.global_micro, self.seed, self.start, self.stop = global_micro, seed, start, stop
        self.accumulation, self.augment, self.rank, self.processes = accumulation, augment, rank, processes

    def batch(self, tiles: np.ndarray, step: int, micro: int) -> dict[str, torch.Tensor]:
        g = np.random.default_rng([self.seed, step, micro])
        pick = np.sort(g.choice(len(self.rows), self.global_micro, p=self.p))
        k, flip = g.integers(0, 4, len(pick)), g.random(len(pick)) < 0.5
        n = self.global_micro // self.processes
        mine = slice(self.rank * n, (self.rank + 1) * n)
        pick, k, flip = pick[mine], k[mine], flip[mine]
        x = tiles[self.rows[pick]]                            # (B, H, W, 3) uint8, sorted rows read sequentially
        if self.augment:                                      # the 8 symmetries of the square
            x = np.stack([np.rot90(t[:, ::-1] if f else t, int(r)) for t, r, f in zip(x, k, flip)])
        index = micro * self.global_micro + np.arange(self.rank * n, (self.rank + 1) * n)
        return {"pixels": torch.from_numpy(np.ascontiguousarray(x)), "pos": torch.from_numpy(pick),
                "index": torch.from_numpy(index), "step": torch.tensor(step), "micro": torch.tensor(micro)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        tiles = np.load(self.tiles_file, mmap_mode="r")
        for i, (step, micro) in enumerate((s, m) for s in range(self.start, self.stop) for m in range(self.accumulation)):
            if i % nw == wid:
                yield self.batch(tiles, step, micro)


def tile_generators(seed: int, step: int, index: Sequence[int]) -> list[torch.Generator]:
    """One generator per tile, seeded by its position in the step's global batch: its noise, timestep and
    condition dropout are the same whichever process trains it."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, int(j), 1]).generate_state(1)[0]))
            for j in index]


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
    precision: str | None = None        # what the run trains in (train.precision auto: the choice made at its start)


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


def load_checkpoint(folder: Path, model: MediDiffusion, ema: EMAModel | None, optimizer, scheduler) -> TrainState:
    """Restore everything `save_checkpoint` wrote (the EMA only where there is one). Nothing here unpickles
    arbitrary objects."""
    meta = json.loads((folder / "state.json").read_text())
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    if ema is not None:
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
    model: MediDiffusion            # with EMA weights (the other processes of a launch: the trained weights)
    precision: precision.Decision   # what it trained in, and why


def build_model(cfg: Config, name: str, train_index: pd.DataFrame) -> MediDiffusion:
    """The untrained model `name` (its vocabulary from the training split), from the global generator."""
    m = cfg.model
    vocab = Vocabulary.from_frame(train_index, "class", cfg.variant(name), m.continuous)
    arch = architecture(m.preset, cfg.data.resolution, m.d_e, m.custom, m.embedding_split, len(vocab.attributes),
                        m.conditioning, m.metadata_route, m.site_pathway)
    return MediDiffusion(arch, vocab)


def training_precision(cfg: Config, name: str, train_index: pd.DataFrame) -> precision.Decision:
    """train.precision as this run applies it: explicit as given; auto as recorded by the checkpoint a resume
    starts from, else on a CPU the faster of fp32 and bf16 over a few training steps of this model at this
    micro-batch and resolution (seconds; the global generator is left as it was)."""
    t, device = cfg.train, distributed.state().device
    recorded = None
    ckpt = latest_checkpoint(checkpoint_root(cfg, name, train_index))
    if t.precision == precision.AUTO and ckpt is not None:
        recorded = json.loads((ckpt / "state.json").read_text())["train"].get("precision")
    micro = max(1, t.batch_size // t.grad_accumulation // distributed.state().num_processes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        model = build_model(cfg, name, train_index) if t.precision == precision.AUTO and not recorded else None
        noise = training_scheduler(cfg.model)

        def batch():
            rows = train_index.iloc[np.arange(micro) % len(train_index)]
            cond = model.vocab.encode(rows["class"].tolist(), {a: rows[a].tolist() for a in model.vocab.attributes})
            size = model.arch.sample_size
            x0, eps = torch.rand(micro, 3, size, size) * 2 - 1, torch.randn(micro, 3, size, size)
            steps = torch.randint(0, noise.config.num_train_timesteps, (micro,))
            return (noise.add_noise(x0, eps, steps).to(device), steps.to(device),
                    {k: v.to(device) for k, v in cond.items()}, eps.to(device))

        return precision.for_training(t.precision, model, batch, device, recorded)


def make_accelerator(t: TrainConfig, chosen: str) -> Accelerator:
    """The accelerate set-up of a run in precision `chosen`; train.batch_size is the global batch (split_batches),
    so the LR schedule steps once per optimizer step whatever the number of processes."""
    accelerator = Accelerator(mixed_precision="no" if chosen == "fp32" else chosen,
                              gradient_accumulation_steps=t.grad_accumulation, cpu=distributed.cpu_only(),
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    if chosen != "fp32" and not accelerator.native_amp:
        log.warning("train.precision is %s but accelerate does not autocast it on %s: this run trains in fp32",
                    chosen, accelerator.device.type)
    if t.batch_size % (t.grad_accumulation * accelerator.num_processes):
        raise MediError(f"train.batch_size {t.batch_size} does not split into train.grad_accumulation "
                        f"{t.grad_accumulation} x {accelerator.num_processes} process(es) equal micro-batches")
    return accelerator


def optimisation(t: TrainConfig, model: MediDiffusion, main: bool) -> tuple[EMAModel | None, torch.optim.Optimizer, Any]:
    """The EMA (the main process's alone), AdamW and the cosine schedule with linear warm-up."""
    ema = EMAModel(model.parameters(), decay=t.ema_decay, use_ema_warmup=t.ema_warmup, inv_gamma=t.ema_inv_gamma,
                   power=t.ema_power) if main else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    warmup = t.warmup_steps or int(t.max_steps * t.warmup_fraction)     # the authors': int(0.01 * steps)
    return ema, optimizer, get_cosine_schedule_with_warmup(optimizer, warmup, t.max_steps)


def step_loader(t: TrainConfig, train_index: pd.DataFrame, tiles_file: str | Path, start: int,
                accelerator: Accelerator) -> torch.utils.data.DataLoader:
    """This process's micro-batches from optimizer step `start` on (`StepBatches`)."""
    data = StepBatches(str(tiles_file), train_index["idx"].to_numpy(), sampling_weights(train_index["class"], t.balanced),
                       t.batch_size // t.grad_accumulation, t.seed, start, t.max_steps, t.grad_accumulation, t.augment,
                       accelerator.process_index, accelerator.num_processes)
    return torch.utils.data.DataLoader(data, batch_size=None, num_workers=t.workers, prefetch_factor=4 if t.workers else None,
                                       generator=torch.Generator().manual_seed(t.seed))  # leaves the global RNG alone


def noised_batch(batch: Mapping, conditions: Mapping[str, torch.Tensor], noise, m: ModelConfig, seed: int,
                 device: torch.device, stain: StainPathway | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, dict, torch.Tensor]:
    """A micro-batch as the model sees it: (x_t, timesteps, dropped-out conditions, target). Each tile's noise,
    timestep and dropout come from its own generator (`tile_generators`), not from the batch it lands in. With a
    stain pathway the tiles are first mapped from their sites' stains to the reference stain."""
    gens = tile_generators(seed, int(batch["step"]), batch["index"].tolist())
    x0 = batch["pixels"].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if stain is not None:
        x0 = stain.canonical(x0, conditions[SITE][batch["pos"]].to(device))
    eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
    timesteps = torch.cat([torch.randint(0, noise.config.num_train_timesteps, (1,), generator=g) for g in gens])
    timesteps = timesteps.to(device)
    cond = {k: v[batch["pos"]].to(device) for k, v in conditions.items()}
    cond = drop_conditions(cond, m.class_dropout, m.attribute_dropout, generator=gens, nested=m.nested_dropout)
    x_t = noise.add_noise(x0, eps, timesteps)
    if m.prediction_type == "v_prediction":
        target = noise.get_velocity(x0, eps, timesteps)
    else:
        target = eps if m.prediction_type == "epsilon" else x0
    return x_t, timesteps, cond, target


def snr_weights(noise, timesteps: torch.Tensor, prediction_type: str, gamma: float) -> torch.Tensor | None:
    """Min-SNR-gamma loss weights per tile (Hang et al. 2023, as diffusers' training examples apply them): each
    timestep's loss counts as its x0 error weighted by min(SNR, gamma), so the nearly clean steps, whose SNR is
    large, stop dominating. None when gamma is 0 (the plain loss). A zero-SNR step (zero terminal SNR) under
    epsilon prediction keeps weight 1, as in diffusers."""
    if gamma <= 0:
        return None
    snr = compute_snr(noise, timesteps)
    weights = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return weights / (snr + 1)
    if prediction_type == "epsilon":
        return torch.where(snr > 0, weights / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
    return weights                                               # sample (x0) prediction


def learn(accelerator: Accelerator, model, optimizer, lr_scheduler, inputs: tuple, max_grad_norm: float,
          diverged: Callable[[float], Exception], weights: torch.Tensor | None = None) -> torch.Tensor:
    """One micro-batch forward and backward, and the optimizer step once the accumulation is complete; the loss
    (the mean squared error, each tile's weighted by `weights` when given: `snr_weights`). A loss that is not
    finite (summed over the processes, so all stop together) stops the run before any update."""
    x_t, timesteps, cond, target = inputs
    with accelerator.accumulate(model):
        with accelerator.autocast():
            pred = model(x_t, timesteps, cond)
        if weights is None:
            loss = torch.nn.functional.mse_loss(pred.float(), target)
        else:
            per_tile = torch.nn.functional.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
            loss = (per_tile * weights).mean()
        checked = accelerator.reduce(loss.detach(), "sum") if accelerator.num_processes > 1 else loss
        if not torch.isfinite(checked):
            raise diverged(checked.item())
        accelerator.backward(loss)
        if accelerator.sync_gradients and max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


def due_hooks(hooks: Sequence[tuple[int, Hook]], step: int, max_steps: int, with_ema) -> dict[str, float]:
    """The metrics of the hooks due at `step` (every = 0: the last step only), each called with the EMA weights."""
    metrics: dict[str, float] = {}
    for every, hook in hooks:
        if (every and step % every == 0) or step == max_steps:
            metrics.update(with_ema(lambda mdl: hook(step, mdl)) or {})
    return metrics


class LogWindow:
    """Loss and throughput between two log steps; time spent in hooks is not training time."""

    def __init__(self):
        self.images, self.t0, self.loss_sum, self.n = 0, time.perf_counter(), 0.0, 0

    def add(self, loss: float, images: int) -> None:
        self.loss_sum, self.n, self.images = self.loss_sum + loss, self.n + 1, self.images + images

    def pause(self, seconds: float) -> None:
        self.t0 += seconds

    def close(self, accelerator: Accelerator) -> tuple[float, float]:
        """(mean loss over the global batch, images per second) of the window; a new window starts."""
        loss, per_second = self.loss_sum / self.n, self.images / (time.perf_counter() - self.t0)
        if accelerator.num_processes > 1:
            loss = accelerator.reduce(torch.tensor(loss, device=accelerator.device), "mean").item()
        self.__init__()
        return loss, per_second


def train(cfg: Config, name: str, train_index: pd.DataFrame, tiles_file: str | Path,
          hooks: Sequence[tuple[int, Hook]] = (), on_log: Callable[[int, dict], None] | None = None,
          mlflow_run_id: str | None = None, on_checkpoint: Callable[[Path], None] | None = None,
          decision: precision.Decision | None = None) -> TrainResult:
    """Train model `name` (a key of model.variants) on `train_index` rows of the packed `tiles_file`.

    `hooks` are (every_n_steps, fn) pairs called with the EMA weights in place; their metrics go to
    `on_log` (MLflow in the CLI) at that step, as do loss, lr and throughput every `train.log_every` steps;
    `on_checkpoint` gets each checkpoint folder once written (main process). `decision`: the precision
    (`training_precision`, made here when not given; the main process's, under a launch).
    """
    t, m = cfg.train, cfg.model
    distributed.state()                  # the process group of a launch (gloo on CPUs), before the Accelerator
    if decision is None and distributed.is_main():
        decision = training_precision(cfg, name, train_index)
    decision = distributed.broadcast(decision)
    if distributed.is_main():
        log.info("training %s in %s", name, decision.describe())
    accelerator = make_accelerator(t, decision.precision)
    processes, main = accelerator.num_processes, accelerator.is_main_process
    if processes > 1:
        log.info("training %s on a process group: %s", name, distributed.describe())

    torch.manual_seed(t.seed)
    model = build_model(cfg, name, train_index)
    if model.stain is not None:          # each site's stain, from its training tiles (a resume loads the same)
        tiles = np.load(tiles_file, mmap_mode="r")
        model.stain.fit(tiles, train_index, model.vocab.categorical[SITE], t.seed)
        model.stain.fit_calibration(tiles, train_index, model.vocab.categorical[SITE], model.vocab.classes, t.seed)
    ema, optimizer, lr_scheduler = optimisation(t, model, main)
    root = checkpoint_root(cfg, name, train_index)
    state = TrainState(mlflow_run_id=mlflow_run_id)
    ckpt = distributed.broadcast(latest_checkpoint(root))      # every process resumes from the same one
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, ema, optimizer, lr_scheduler)
        state.mlflow_run_id = mlflow_run_id or state.mlflow_run_id
        log.info("resuming %s from %s (step %d of %d)", name, ckpt, state.step, t.max_steps)
    state.precision = decision.precision
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    # without accelerate's autocast wrapper: the loop autocasts its own forward, and what the hooks sample (the grids,
    # the FID curve) runs in the precision their sampler chose, not in the training's under another name
    core: MediDiffusion = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    conditions = core.vocab.encode(train_index["class"].tolist(), {a: train_index[a].tolist() for a in core.vocab.attributes})
    noise = training_scheduler(m)

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
               disable=not main)
    window, last_loss = LogWindow(), float("nan")
    run_t0, hook_seconds = time.perf_counter() - state.seconds, 0.0
    model.train()
    for batch in step_loader(t, train_index, tiles_file, state.step, accelerator):
        step = int(batch["step"])
        x_t, timesteps, cond, target = noised_batch(batch, conditions, noise, m, t.seed, accelerator.device, core.stain)
        loss = learn(accelerator, model, optimizer, lr_scheduler, (x_t, timesteps, cond, target), t.max_grad_norm,
                     lambda bad: TrainingDiverged(f"training {name}: loss is {bad} at step {step}; the last good "
                                                  f"checkpoint is kept in {root} (try a lower train.lr or precision: fp32)"),
                     snr_weights(noise, timesteps, m.prediction_type, t.snr_gamma))
        window.add(loss.item(), len(x_t) * processes)
        if int(batch["micro"]) < t.grad_accumulation - 1:
            continue

        # one optimizer step done
        if main:
            ema.step(core.parameters())
        state.step, state.images = step + 1, state.images + t.batch_size
        bar.update(1)
        metrics: dict[str, float] = {}
        if state.step % t.log_every == 0 or state.step == t.max_steps:
            last_loss, per_second = window.close(accelerator)
            metrics.update(loss=last_loss, lr=lr_scheduler.get_last_lr()[0], images_per_second=per_second)
            bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{per_second:.1f}")
        hook_t0 = time.perf_counter()
        if main:
            metrics.update(due_hooks(hooks, state.step, t.max_steps, with_ema))
        hook_seconds += time.perf_counter() - hook_t0
        window.pause(time.perf_counter() - hook_t0)      # throughput counts training time only
        if metrics and on_log and main:
            on_log(state.step, metrics)
        if state.step % t.checkpoint_every == 0 or state.step == t.max_steps:
            state.seconds = time.perf_counter() - run_t0 - hook_seconds
            if main:
                folder = save_checkpoint(root, state, core, ema, optimizer, lr_scheduler, t.keep_checkpoints)
                if on_checkpoint:
                    on_checkpoint(folder)
            accelerator.wait_for_everyone()
    bar.close()
    return finish(cfg, name, train_index, core, ema, state, time.perf_counter() - run_t0 - hook_seconds, last_loss,
                  decision)


def finish(cfg: Config, name: str, train_index: pd.DataFrame, core: MediDiffusion, ema: EMAModel | None,
           state: TrainState, seconds: float, last_loss: float, decision: precision.Decision) -> TrainResult:
    """The EMA weights into the model, saved (main process) with what made it; the run's result."""
    if ema is not None:
        ema.copy_to(core.parameters())
    core.eval()
    model_dir = artifacts.model_dir(cfg, name)
    if ema is not None:
        core.save(model_dir, extra={"name": name, "attributes": cfg.variant(name), "model_params": asdict(cfg.model),
                                    "steps": state.step, "run_hash": run_hash(cfg, name, train_index),
                                    "precision": decision.precision})
    ips = (state.images / seconds) if seconds > 0 else math.nan
    return TrainResult(model_dir, state.step, last_loss, ips, core, decision)


# ----------------------------------------------------------------------------------------------- the stage
def grid_hook(cfg: Config, name: str, train_index: pd.DataFrame, vocab: Vocabulary, sink: dict,
              precision_: str) -> Hook:
    """Sample the fixed (class, site) grid with fixed seeds (in the training's precision `precision_`), log it to
    MLflow, keep the last one in `sink`."""
    import matplotlib.pyplot as plt
    import mlflow

    from medi import figures
    from medi.sampling import Sampler, generate, grid_conditions, grid_layout

    classes, sites = grid_layout(vocab, train_index)
    cond, seeds = grid_conditions(vocab, classes, sites, cfg.train.grid_seeds)
    site_class = train_index.drop_duplicates("tss").set_index("tss")["class"].to_dict()
    labels = [f"TSS {s} ({site_class[s]})" if s else "class only" for s in sites]
    grid_sampler = Sampler.for_grids(cfg.train, precision_)
    sampler = f"{grid_sampler.kind} {grid_sampler.steps} steps"
    metadata = "" if grid_sampler.metadata_guidance is None else f" (site {grid_sampler.metadata_guidance})"

    def hook(step: int, model: MediDiffusion) -> dict[str, float]:
        images = generate(model, grid_sampler, cfg.model, cond, seeds)
        n, k = len(classes), cfg.train.grid_seeds
        cells = images.reshape(n, len(sites), k, *images.shape[1:])
        cells = np.concatenate(list(cells.transpose(2, 0, 1, 3, 4, 5)), axis=3)   # seeds side by side in a cell
        title = (f"{name} at step {step}: rows = conditioned class, columns = conditioned site "
                 f"(diagonal = pairs seen in training, the rest never seen), {sampler}, "
                 f"guidance {cfg.train.grid_guidance}{metadata}, EMA")
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


def stain_check(cfg: Config, grid: dict, train_index: pd.DataFrame, tiles: np.ndarray) -> dict | None:
    """On the synthetic world: score the last sample grid (`grid_hook`'s sink) against the ground truth. Its
    cells are every (class, largest training site of each class) pair, so each cell's tiles are compared with the
    conditioned site's true stain; real tiles of each site (as many as a cell holds) give the estimator's floor.
    Nothing is generated here: the grid's images are the stain check's (same pairs, sampler and precision).

    A model not conditioned on the site (CLS) has one class-only row per class; its images are scored against the
    same sites, which shows how far class conditioning alone reproduces a site's stain (its dominant site) or
    cannot (the others)."""
    from medi.groundtruth import GroundTruth, stain_report
    from medi.sampling import largest_sites

    truth = GroundTruth.load(cfg.data.root)
    if truth is None:
        return None
    classes, columns, k = grid["classes"], grid["sites"], cfg.train.grid_seeds
    cells = grid["images"].reshape(len(classes), len(columns), k, *grid["images"].shape[1:])
    sites = largest_sites(train_index, classes)
    if columns[0] is None:                  # class-only rows: every image of the row is the class's sample
        rows = {c: cells[i].reshape(-1, *cells.shape[3:]) for i, c in enumerate(classes)}
        scored = [(c, s, rows[c]) for c in classes for s in sites]
    else:
        scored = [(c, s, cells[i, j]) for i, c in enumerate(classes) for j, s in enumerate(columns)]
    report = stain_report(scored, truth)
    real = [(c, s, tiles[train_index[train_index.tss == s]["idx"].to_numpy()[:k]]) for c, s in zip(classes, sites)]
    report["real"] = stain_report(real, truth)["summary"]["seen"]
    return report


def curves(run_id: str, name: str) -> pd.DataFrame:
    """Loss, FID and KID by step of a training run, from its MLflow history (a resumed run included), for
    `dvc plots`; steps without an FID point leave those cells empty."""
    import mlflow

    client = mlflow.MlflowClient()
    frame = pd.DataFrame({"step": pd.Series(dtype=int)})
    for key in ("loss", "fid", "kid"):
        history = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        frame = frame.merge(pd.DataFrame({"step": pd.Series(list(history), dtype=int),
                                          key: pd.Series(list(history.values()), dtype=float)}), on="step", how="outer")
    return frame.sort_values("step").assign(model=name)


def run_stage(cfg: Config, name: str, extra_hooks: Sequence[tuple[int, Hook]] = ()) -> TrainResult:
    """`medi train --model NAME`: train (resuming if a checkpoint exists), log everything, save the model."""
    import mlflow

    from medi import figures, registry, tracking
    from medi.sampling import Sampler

    train_index = artifacts.train_frame(cfg)
    tiles_file = Path(cfg.data.output) / "tiles.npy"
    attributes = cfg.variant(name)
    if not distributed.is_main():   # the other processes of a launch: train, nothing else
        return train(cfg, name, train_index, tiles_file)
    vocab = Vocabulary.from_frame(train_index, "class", attributes, cfg.model.continuous)
    run_id = resumable_run_id(cfg, name, train_index)
    with tracking.stage_run(cfg, f"train@{name}", ("data", "model", "train"), run_name=f"train-{name}",
                            run_id=run_id) as run:
        group = distributed.describe()      # tags, not params: a checkpoint may be resumed with another N processes
        mlflow.set_tags({"processes": group["num_processes"], "distributed_type": group["distributed_type"],
                         "backend": group["backend"]})
        mlflow.log_params({"model_name": name, "attributes": ",".join(attributes) or "none",
                           "train_tiles": len(train_index), "vocab_sizes": json.dumps({a: len(v) for a, v in vocab.categorical.items()})})
        logging_seconds = [0.0]             # what logging the checkpoints and the model to MLflow costs

        def log_checkpoint(folder: Path) -> None:
            t0 = time.perf_counter()
            registry.log_checkpoint(folder, cfg.train.keep_checkpoints)
            logging_seconds[0] += time.perf_counter() - t0

        decision = training_precision(cfg, name, train_index)
        mlflow.log_params({"precision": decision.precision})       # the same on a resume (recorded in the checkpoint)
        mlflow.log_metrics(decision.mlflow_metrics("precision"))
        last_grid: dict = {}
        grid_seconds = [0.0]                # what the sample grids cost (their share of training: docs/benchmarks.md)
        draw_grid = grid_hook(cfg, name, train_index, vocab, last_grid, decision.precision)

        def grid(step: int, model: MediDiffusion) -> dict:
            t0 = time.perf_counter()
            try:
                return draw_grid(step, model)
            finally:
                grid_seconds[0] += time.perf_counter() - t0

        result = train(cfg, name, train_index, tiles_file, [(cfg.train.grid_every, grid), *extra_hooks],
                       on_log=lambda step, metrics: mlflow.log_metrics(dict(metrics), step=step),
                       mlflow_run_id=run.info.run_id, on_checkpoint=log_checkpoint, decision=decision)
        if not last_grid:       # resumed from the final checkpoint, so no step ran: the last grid is drawn now
            grid(result.steps, result.model)
        # the model as an MLflow model, registered as medi-<name> (a sweep trial's, nested in its trial: not registered)
        t0 = time.perf_counter()
        version = registry.log_model(result.model_dir, name, {**Sampler.of(cfg.sample).settings(),
                                                              "batch_size": cfg.sample.batch_size},
                                     {"medi.model": name, "attributes": ",".join(attributes) or "none",
                                      "steps": result.steps, "medi.pipeline": run.data.tags.get("medi.pipeline", "")},
                                     register="mlflow.parentRunId" not in run.data.tags)
        logging_seconds[0] += time.perf_counter() - t0
        mlflow.log_metric("model_logging_seconds", logging_seconds[0])
        if version is not None:
            mlflow.set_tag("medi.registered_model", f"models:/{registry.registered_name(name)}/{version}")
            log.info("registered %s as models:/%s/%s", name, registry.registered_name(name), version)
        metrics = {"steps": result.steps, "final_loss": result.final_loss, "images_per_second": result.images_per_second,
                   "processes": group["num_processes"]}
        t0 = time.perf_counter()
        stains = stain_check(cfg, last_grid, train_index, np.load(tiles_file, mmap_mode="r"))
        stain_seconds = time.perf_counter() - t0
        mlflow.log_metrics({"grid_seconds": grid_seconds[0], "stain_check_seconds": stain_seconds})
        if result.images_per_second > 0:      # (nan when resumed from the last checkpoint: no step ran)
            train_seconds = result.steps * cfg.train.batch_size / result.images_per_second
            mlflow.log_metric("grid_stain_share_of_training", (grid_seconds[0] + stain_seconds) / train_seconds)
        if stains is not None:
            for kind in ("seen", "unseen"):
                for key, value in stains["summary"].get(kind, {}).items():
                    metrics[f"stain_{kind}_{key}"] = value
            metrics.update({f"stain_real_{k}": v for k, v in stains["real"].items()})
            mlflow.log_dict(stains, "stain_check.json")
            log.info("stain check of %s (angle to the conditioned site's true stain; rank 0 = the nearest of all "
                     "sites, 0.5 = chance): %s; real tiles: %s", name, stains["summary"], stains["real"])
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        # the metrics file: headline figures (dvc metrics show); the detail file: those, the processes and the stain
        # check's summary (every stain figure is in the run and its stain_check.json)
        write_json(cfg.train.metrics.format(model=name), {k: metrics[k] for k in HEADLINE})
        write_json(cfg.train.detail.format(model=name), metrics)
        write_text(cfg.train.plot.format(model=name), curves(run.info.run_id, name).to_csv(index=False))
        if last_grid:
            path = figures.save(last_grid["figure"], cfg.train.figure.format(model=name))
            log.info("sample grid of %s at step %d: %s", name, last_grid["step"], path)
        log.info("trained %s: %d steps, final loss %.4f, %.1f images/s", name, result.steps, result.final_loss,
                 result.images_per_second)
    return result
