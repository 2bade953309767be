"""Sampling from a trained model: schedulers, classifier-free guidance, per-image seeds.

Every image is generated from its own seed (its initial noise comes from a generator seeded with it), so
any image can be regenerated alone, bit for bit on the same machine, from (model, conditions, seed,
scheduler, steps, guidance).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Mapping, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from medi.config import ModelConfig
from medi.errors import MediError
from medi.model import MediDiffusion, null_condition

SAMPLERS = ("ddim", "dpmsolver++")  # both deterministic given the initial noise


def noise_kwargs(cfg: ModelConfig) -> dict:
    """The training noise schedule, shared by the training scheduler and every sampler."""
    return {"num_train_timesteps": cfg.timesteps, "beta_schedule": cfg.beta_schedule,
            "prediction_type": cfg.prediction_type, "rescale_betas_zero_snr": cfg.rescale_zero_snr}


def training_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    return DDPMScheduler(**noise_kwargs(cfg), clip_sample=False)


def make_sampler(kind: str, cfg: ModelConfig):
    """A diffusers scheduler for inference. With zero-terminal-SNR the timesteps must start at the last one
    ('trailing' spacing), as Lin et al. prescribe; we use trailing spacing for every schedule."""
    kw = {**noise_kwargs(cfg), "timestep_spacing": "trailing"}
    if kind == "ddim":
        return DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=True)
    if kind == "dpmsolver++":
        return DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2,
                                           final_sigmas_type="zero")
    raise MediError(f"unknown sampler '{kind}'; known: {', '.join(SAMPLERS)}")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def autocast_for(device: torch.device, precision: str):
    if precision == "no":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def generate(model: MediDiffusion, sampler, cond: Mapping[str, torch.Tensor], seeds: Sequence[int], steps: int,
             guidance: float = 1.0, precision: str = "no", batch_size: int = 64) -> np.ndarray:
    """Generate one image per seed under the encoded conditions `cond` (tensors of length len(seeds)).

    guidance = 1 is plain conditional sampling; > 1 is classifier-free guidance against the null condition.
    Returns uint8 (N, H, W, 3).
    """
    device = next(model.parameters()).device
    size = model.arch.sample_size
    out = []
    for lo in range(0, len(seeds), batch_size):
        chunk = list(seeds[lo:lo + batch_size])
        c = {k: v[lo:lo + len(chunk)].to(device) for k, v in cond.items()}
        x = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(int(s))) for s in chunk]).to(device)
        x = x * sampler.init_noise_sigma
        if guidance != 1.0:
            c = {k: torch.cat([v, null_condition({k: v})[k]]) for k, v in c.items()}
        sampler.set_timesteps(steps)
        for t in sampler.timesteps:
            inp = sampler.scale_model_input(torch.cat([x, x]) if guidance != 1.0 else x, t)
            with autocast_for(device, precision):
                pred = model(inp, t.to(device).expand(inp.shape[0]), c).float()
            if guidance != 1.0:
                cond_pred, uncond_pred = pred.chunk(2)
                pred = uncond_pred + guidance * (cond_pred - uncond_pred)
            x = sampler.step(pred, t, x).prev_sample
        out.append(to_uint8(x))
    return np.concatenate(out)


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
