"""Cost of the paper recipe (profiles/paper.yaml) in GPU-hours: `make bench-gpu` on a GPU, an estimate elsewhere.

- FLOPs per image of the paper-128 UNet at 128 px, counted by torch's FlopCounterMode on the meta device (no
  compute): one forward (a sampling step) and one forward + backward (a training image).
- Measured: training throughput (images/s, optimizer steps with AdamW) on this device, by train_speed.py's loop,
  in each of `--precisions` (on a GPU: bf16 and fp16 at batch 64), with its share of the device's GEMM peak in
  that precision (an 8192^3 matmul on a GPU, 2048^3 on a CPU, timed in the same run; bench/efficiency.py) and,
  on a GPU with a datasheet figure, of the datasheet peak.
- On a GPU (`--device cuda`) the GPU-hours come from the measured throughput. On a CPU they are an ESTIMATE:
  FLOPs divided by a GPU's published dense fp16 tensor-core peak times an assumed utilisation (`--mfu`); the
  measured CPU throughput only checks that the FLOP count explains the time the CPU takes (achieved GFLOP/s).
- Work: two models (CLS, MeDi), each `--steps-total` optimizer steps of `--batch-total` images, and each one
  FID sample set of `--fid-images` images with `--sample-steps` DDIM steps (the paper's 271,710 x 100).
Usage: python bench/paper_cost.py [--device cpu|cuda] [--gpus 1 2 4 8]
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_report import cpu_name, write_section
from efficiency import gemm_peak
from medi.model import MediDiffusion, Vocabulary, architecture
from train_speed import images_per_second

# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's datasheets (SXM parts).
PEAKS = {"A100": 312.0, "H100": 989.0}
DATASHEET = {**PEAKS, "H200": 989.0}                  # measured GPUs' share of their datasheet peak


def datasheet_peak(device_name: str) -> float | None:
    """TFLOP/s of the dense fp16/bf16 tensor-core peak of a GPU named like one of DATASHEET."""
    return next((peak for name, peak in DATASHEET.items() if name in device_name), None)


def vocab() -> Vocabulary:
    frame = pd.DataFrame({"class": [f"c{i}" for i in range(7)], "tss": [f"s{i}" for i in range(7)]})
    return Vocabulary.from_frame(frame, "class", ["tss"], [])


def flops_per_image() -> tuple[float, float]:
    """(forward, forward + backward) FLOPs of paper-128 at 128 px for one image, conditioned on class + TSS."""
    v = vocab()
    with torch.device("meta"):
        model = MediDiffusion(architecture("paper-128", 128, 32, split="equal", attributes=1), v)
        x, t = torch.randn(1, 3, 128, 128), torch.zeros(1, dtype=torch.long)
    cond = {k: c.to("meta") for k, c in v.encode(["c0"], {"tss": ["s0"]}).items()}
    with FlopCounterMode(display=False) as fwd:
        model(x, t, cond)
    with FlopCounterMode(display=False) as both:
        model(x, t, cond).float().pow(2).mean().backward()
    return float(fwd.get_total_flops()), float(both.get_total_flops())


def forward_per_second(batch: int, device: str, precision: str, steps: int = 5) -> float:
    """Denoising forward passes (images x steps) per second: the sampling cost."""
    v = vocab()
    model = MediDiffusion(architecture("paper-128", 128, 32, split="equal", attributes=1), v).to(device).eval()
    cond = {k: c.to(device) for k, c in v.encode(["c0"] * batch, {"tss": ["s0"] * batch}).items()}
    x, t = torch.randn(batch, 3, 128, 128, device=device), torch.full((batch,), 500, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    elapsed = 0.0
    with torch.no_grad(), torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(steps + 1):
            torch.cuda.synchronize() if device == "cuda" else None
            t0 = time.perf_counter()
            model(x, t, cond)
            torch.cuda.synchronize() if device == "cuda" else None
            if i:
                elapsed += time.perf_counter() - t0
    return batch * steps / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="measured batch (default: 64 on a GPU, 4 on a CPU)")
    ap.add_argument("--micro", type=int, default=None, help="micro-batch (default: the batch on a GPU, 2 on a CPU)")
    ap.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: 10 on a GPU, 1 on a CPU)")
    ap.add_argument("--precisions", nargs="+", default=None,
                    help="fp16 | bf16 | fp32, the first sizes the GPU-hours (default: bf16 fp16 on a GPU, fp32 on a CPU)")
    ap.add_argument("--steps-total", type=int, default=800_000)
    ap.add_argument("--batch-total", type=int, default=64)
    ap.add_argument("--fid-images", type=int, default=271_710)
    ap.add_argument("--sample-steps", type=int, default=100)
    ap.add_argument("--mfu", type=float, default=0.35, help="assumed share of the GPU peak a conv UNet reaches")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    gpu = args.device == "cuda"
    batch = args.batch or (64 if gpu else 4)
    micro = args.micro or (batch if gpu else 2)
    precisions = args.precisions or (["bf16", "fp16"] if gpu else ["fp32"])

    fwd, train_flops = flops_per_image()
    print(f"paper-128 at 128 px: {fwd / 1e9:.1f} GFLOP forward, {train_flops / 1e9:.1f} GFLOP forward + backward per image")
    where = torch.cuda.get_device_name() if gpu else f"{cpu_name()}, {torch.get_num_threads()} threads"
    sheet = datasheet_peak(where) if gpu else None
    measured, efficiency = {}, []
    for p in precisions:
        measured[p] = images_per_second("paper-128", p, batch, micro, args.steps or (10 if gpu else 1), 2 if gpu else 1,
                                        args.device)
        peak, n = gemm_peak(p, args.device)
        achieved = measured[p] * train_flops
        efficiency.append([where, p, f"{batch} ({batch // micro} x {micro})", f"{measured[p]:.3g}",
                           f"{achieved / 1e12:.3g}", f"{peak / 1e12:.3g} ({n}^3)", f"{100 * achieved / peak:.0f} %",
                           f"{100 * achieved / (sheet * 1e12):.0f} % of {sheet:g}" if sheet and p != "fp32" else "-"])
        print(f"measured on {where}: {measured[p]:.3g} training images/s ({p}, batch {batch} as {batch // micro} x "
              f"{micro}), {achieved / 1e12:.3g} TFLOP/s = {100 * achieved / peak:.0f} % of the {p} GEMM peak "
              f"({peak / 1e12:.3g} TFLOP/s, {n}^3)", flush=True)
    precision, ips = precisions[0], measured[precisions[0]]
    write_section(f"paper-efficiency-{args.device}",
                  f"paper-128 training at 128 px ({train_flops / 1e9:.0f} GFLOP per image, FlopCounterMode) on {where}, "
                  f"torch {torch.__version__}: images/s and the share of the device's GEMM peak in the same precision, "
                  f"timed in the same run; `python bench/paper_cost.py --device {args.device}` (`make bench-gpu`)",
                  ["device", "precision", "batch", "training images/s", "TFLOP/s", "GEMM peak TFLOP/s",
                   "share of GEMM peak", "share of datasheet peak (TFLOP/s)"], efficiency)

    train_images = args.steps_total * args.batch_total * 2          # two models
    sample_passes = args.fid_images * args.sample_steps * 2
    rows = []
    if gpu:
        fps = forward_per_second(min(batch * 2, 128), args.device, precision)
        kinds = [(f"{where} (measured)", ips, fps)]
    else:
        kinds = [(f"{name} (estimate: {peak:g} TFLOP/s x {args.mfu:g})", peak * 1e12 * args.mfu / train_flops,
                  peak * 1e12 * args.mfu / fwd) for name, peak in PEAKS.items()]
    for kind, train_ips, passes_ps in kinds:
        train_h, sample_h = train_images / train_ips / 3600, sample_passes / passes_ps / 3600
        for n in args.gpus:
            rows.append([kind, n, f"{train_ips:.0f}", f"{train_h:,.0f}", f"{sample_h:,.0f}", f"{train_h + sample_h:,.0f}",
                         f"{(train_h + sample_h) / n:,.0f}"])
            print(" | ".join(str(c) for c in rows[-1]))
    write_section(f"paper-cost-{args.device}",
                  f"GPU-hours of the paper recipe: 2 models x {args.steps_total:,} steps x {args.batch_total} images at "
                  f"128 px (paper-128, {train_flops / 1e9:.0f} GFLOP per training image, {fwd / 1e9:.0f} per sampling "
                  f"step), plus 2 FID sets of {args.fid_images:,} images x {args.sample_steps} DDIM steps. Measured "
                  f"on {where}: {ips:.3g} training images/s ({precision}), {ips * train_flops / 1e12:.3g} TFLOP/s "
                  f"achieved. Wall-clock on N GPUs assumes perfect data-parallel scaling (GPU-hours unchanged); "
                  f"`python bench/paper_cost.py --device {args.device}`",
                  ["GPU", "GPUs", "training images/s per GPU", "training GPU-h", "FID sampling GPU-h", "total GPU-h",
                   "wall-clock h"], rows)


if __name__ == "__main__":
    main()
