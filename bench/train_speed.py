"""Training throughput (images/s) of the UNet presets, fp32 vs bf16 autocast: `make bench`.

Times full optimizer steps (forward, v-prediction loss, backward, AdamW) on random data at each preset's
resolution, after warm-up steps, and writes a table to docs/benchmarks.md (section 'training').
Usage: python bench/train_speed.py [--batch 32] [--steps 5] [--presets tiny-cpu paper-128] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from medi.model import MediDiffusion, Vocabulary, architecture
from bench_report import cpu_name, write_section

RESOLUTION = {"tiny-cpu": 32, "paper-128": 128}


def images_per_second(preset: str, precision: str, batch: int, micro: int, steps: int, warmup: int, device: str) -> float:
    """Optimizer steps of `batch` images, accumulated over micro-batches of `micro` (what fits in memory)."""
    torch.manual_seed(0)
    frame = pd.DataFrame({"class": [f"c{i}" for i in range(7)], "tss": [f"s{i}" for i in range(7)]})
    vocab = Vocabulary.from_frame(frame, "class", ["tss"], [])
    size = RESOLUTION[preset]
    model = MediDiffusion(architecture(preset, size, 32), vocab).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cond = {k: v.to(device) for k, v in vocab.encode(["c0"] * micro, {"tss": ["s0"] * micro}).items()}
    x = torch.randn(micro, 3, size, size, device=device)
    t = torch.randint(0, 1000, (micro,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    elapsed = 0.0
    for i in range(warmup + steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(batch // micro):
            with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = (model(x, t, cond).float() - x).pow(2).mean() * micro / batch
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            elapsed += time.perf_counter() - t0
    return batch * steps / elapsed



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--micro", nargs="+", default=["paper-128=8"], metavar="PRESET=N",
                    help="micro-batch per preset where the batch does not fit in memory (paper-128 at batch 32 "
                         "needs more than 24 GiB on the CPU): the batch is accumulated over micro-batches")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--presets", nargs="+", default=["tiny-cpu", "paper-128"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--section", default=None, help="docs/benchmarks.md section (default: training-<device>)")
    args = ap.parse_args()
    micro_of = {p: int(n) for p, n in (m.split("=") for m in args.micro)} if args.device == "cpu" else {}
    rows = []
    for preset in args.presets:
        micro = min(micro_of.get(preset, args.batch), args.batch)
        base = None
        for precision in args.precisions:
            steps = args.steps if preset == "tiny-cpu" or args.device != "cpu" else max(2, args.steps // 3)
            ips = images_per_second(preset, precision, args.batch, micro, steps,
                                    1 if preset == "paper-128" else args.warmup, args.device)
            base = base or ips
            shape = f"{args.batch}" if micro == args.batch else f"{args.batch} ({args.batch // micro} x {micro})"
            rows.append([preset, RESOLUTION[preset], precision, shape, f"{ips:.1f}" if ips >= 10 else f"{ips:.2f}", f"{ips / base:.2f}x"])
            print(f"{preset:10s} {precision:5s} batch {shape}: {ips:8.2f} images/s", flush=True)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    write_section(args.section or f"training-{args.device}",
                  f"Training throughput on {where} (torch {torch.__version__}); `python bench/train_speed.py "
                  f"--batch {args.batch} --device {args.device}`",
                  ["preset", "px", "precision", "batch", "images/s", "vs fp32"], rows)


if __name__ == "__main__":
    main()
