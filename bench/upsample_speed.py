"""The UNet's nearest-neighbour upsampling on the CPU: diffusers' stock `Upsample2D` (NCHW) against medi's
`ChannelsLastUpsample2D` (the same values, doubled in channels-last memory), in a sampling forward of the default
model (tiny-cpu, batch 16, bf16 autocast, as the sample stage runs) and a training step (batch 32).

Rounds alternate the two classes on the same model; the medians of the rounds are compared, as a ratio measured
in one run (docs/benchmarks.md, section upsampling-cpu-<CPU type>).
Usage: python bench/upsample_speed.py [--rounds 6]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers.models.upsampling import Upsample2D

from medi.model import ChannelsLastUpsample2D
from bench_report import cpu_name, machine_tag, write_section
from train_speed import _model


def _set(model, cls) -> None:
    for block in model.unet.up_blocks:
        for u in block.upsamplers or []:
            u.__class__ = cls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = _model("tiny-cpu")
    work = {}
    for name, batch in (("sampling forward", 16), ("training step", 32)):
        cond = model.vocab.encode(["c0"] * batch, {"tss": ["s0"] * batch})
        x, t = torch.randn(batch, 3, 32, 32), torch.randint(0, 1000, (batch,))
        if name == "sampling forward":
            def run(x=x, t=t, cond=cond):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    model.eval()(x, t, cond)
            reps = 20
        else:
            def run(x=x, t=t, cond=cond):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = (model.train()(x, t, cond).float() - x).pow(2).mean()
                loss.backward()
                model.zero_grad(set_to_none=True)
            reps = 4
        work[name] = (run, reps, batch)
    rows = []
    for name, (run, reps, batch) in work.items():
        seconds = {Upsample2D: [], ChannelsLastUpsample2D: []}
        for _ in range(args.rounds):
            for cls in seconds:
                _set(model, cls)
                run()
                t0 = time.perf_counter()
                for _ in range(reps):
                    run()
                seconds[cls].append((time.perf_counter() - t0) / reps)
        stock, ours = (statistics.median(seconds[c]) for c in (Upsample2D, ChannelsLastUpsample2D))
        rows.append([name, batch, f"{1e3 * stock:.1f}", f"{1e3 * ours:.1f}", f"{stock / ours:.3f}x"])
        print(f"{name}: stock {1e3 * stock:.1f} ms, channels-last {1e3 * ours:.1f} ms: {stock / ours:.3f}x", flush=True)
    write_section(f"upsampling-cpu-{machine_tag()}",
                  f"The UNet's nearest upsampling, diffusers' stock NCHW path against `ChannelsLastUpsample2D` (same "
                  f"values bit for bit) on {cpu_name()}, {torch.get_num_threads()} threads, tiny-cpu at 32 px in bf16 "
                  f"autocast; medians of {args.rounds} alternating rounds; `python bench/upsample_speed.py`",
                  ["work", "batch", "stock ms", "channels-last ms", "speed-up"], rows)


if __name__ == "__main__":
    main()
