"""Training throughput (images/s) of the UNet presets, fp32 vs bf16 autocast, and its share of this machine's
GEMM peak for that precision (bench/efficiency.py): `make bench`.

Times full optimizer steps (forward, v-prediction loss, backward, AdamW) on random data at each preset's
resolution, after warm-up steps, counts the FLOPs of a forward + backward per image (FlopCounterMode), times
a 2048^3 matmul in each precision in the same run, and writes a table to docs/benchmarks.md (section
'training-cuda' or 'training-cpu-<CPU type>'), with the precision `train.precision: auto` would choose here.
Usage: python bench/train_speed.py [--batch 32] [--steps 5] [--presets tiny-cpu paper-128] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from medi.model import MediDiffusion, Vocabulary, architecture
from medi.precision import choose
from bench_report import cpu_name, machine_tag, write_section
from efficiency import counted_flops, gemm_peak

RESOLUTION = {"tiny-cpu": 32, "paper-128": 128}


def _model(preset: str) -> MediDiffusion:
    frame = pd.DataFrame({"class": [f"c{i}" for i in range(7)], "tss": [f"s{i}" for i in range(7)]})
    vocab = Vocabulary.from_frame(frame, "class", ["tss"], [])
    return MediDiffusion(architecture(preset, RESOLUTION[preset], 32), vocab)


def train_flops_per_image(preset: str) -> float:
    """FLOPs of a forward + backward of one image (counted on the meta device: no compute)."""
    with torch.device("meta"):
        model = _model(preset)
        x, t = torch.randn(1, 3, RESOLUTION[preset], RESOLUTION[preset]), torch.zeros(1, dtype=torch.long)
    cond = {k: c.to("meta") for k, c in model.vocab.encode(["c0"], {"tss": ["s0"]}).items()}
    return counted_flops(lambda: model(x, t, cond).float().pow(2).mean().backward())


def convolutions_alone(preset: str, precision: str, batch: int, reps: int, device: str, backward: bool = True) -> float:
    """FLOP/s of the model's own convolutions, each run alone (forward + backward at its shape in the model, or the
    forward only without `backward`; on random data, fastest of `reps`), summed over the network: what the UNet
    would reach if nothing but its convolutions took time. A training (or sampling) share of the peak is read
    against this attainable share."""
    model = _model(preset).to(device)
    shapes = []
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.append((m, tuple(i[0].shape))))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    cond = {k: v.to(device) for k, v in model.vocab.encode(["c0"] * batch, {"tss": ["s0"] * batch}).items()}
    size = RESOLUTION[preset]
    with torch.no_grad():
        model(torch.randn(batch, 3, size, size, device=device), torch.zeros(batch, dtype=torch.long, device=device), cond)
    for h in hooks:
        h.remove()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    flops = seconds = 0.0
    for conv, shape in shapes:
        x = torch.randn(shape, device=device, requires_grad=backward)

        def run(conv=conv, x=x):
            with torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None), \
                    torch.set_grad_enabled(backward):
                y = conv(x)
            if backward:
                y.float().sum().backward()

        flops += counted_flops(run)
        best = float("inf")
        for _ in range(reps + 1):                  # the first is untimed
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        seconds += best
    return flops / seconds


def images_per_second(preset: str, precision: str, batch: int, micro: int, steps: int, warmup: int, device: str) -> float:
    """Optimizer steps of `batch` images, accumulated over micro-batches of `micro` (what fits in memory)."""
    torch.manual_seed(0)
    size = RESOLUTION[preset]
    model = _model(preset).to(device).train()
    vocab = model.vocab
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
    ap.add_argument("--section", default=None,
                    help="docs/benchmarks.md section (default: training-cuda, or training-cpu-<CPU type>)")
    args = ap.parse_args()
    micro_of = {p: int(n) for p, n in (m.split("=") for m in args.micro)} if args.device == "cpu" else {}
    rows, peaks, auto = [], {}, {}
    for preset in args.presets:
        micro = min(micro_of.get(preset, args.batch), args.batch)
        base, flops, measured = None, train_flops_per_image(preset), {}
        for precision in args.precisions:
            steps = args.steps if preset == "tiny-cpu" or args.device != "cpu" else max(2, args.steps // 3)
            ips = images_per_second(preset, precision, args.batch, micro, steps,
                                    1 if preset == "paper-128" else args.warmup, args.device)
            base, measured[precision] = base or ips, ips
            if precision not in peaks:                 # timed between the presets' runs, in the same process
                peaks[precision] = gemm_peak(precision, args.device)
            peak, n = peaks[precision]
            alone = convolutions_alone(preset, precision, micro, 8 if preset == "tiny-cpu" else 2, args.device)
            shape = f"{args.batch}" if micro == args.batch else f"{args.batch} ({args.batch // micro} x {micro})"
            rows.append([preset, RESOLUTION[preset], precision, shape, f"{ips:.1f}" if ips >= 10 else f"{ips:.2f}",
                         f"{ips / base:.2f}x", f"{flops / 1e9:.3g}", f"{ips * flops / 1e9:.1f}", f"{peak / 1e9:.1f}",
                         f"{100 * ips * flops / peak:.0f} %", f"{100 * alone / peak:.0f} %",
                         f"{100 * ips * flops / alone:.0f} %"])
            print(f"{preset:10s} {precision:5s} batch {shape}: {ips:8.2f} images/s, {ips * flops / 1e9:.1f} GFLOP/s = "
                  f"{100 * ips * flops / peak:.0f} % of the {precision} GEMM peak ({peak / 1e9:.1f} GFLOP/s, {n}^3); "
                  f"its convolutions alone: {100 * alone / peak:.0f} % of the peak", flush=True)
        if {"fp32", "bf16"} <= set(measured):
            auto[preset] = choose(measured)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    chosen = "; ".join(f"{p}: {c}" for p, c in auto.items())
    write_section(args.section or ("training-cuda" if args.device == "cuda" else f"training-cpu-{machine_tag()}"),
                  f"Training throughput on {where} (torch {torch.__version__}); FLOPs of a forward + backward per "
                  f"image counted by FlopCounterMode, the GEMM peak of each precision timed in the same run "
                  f"({peaks[args.precisions[0]][1]}^3 matmul); 'convolutions alone': the model's convolutions each "
                  f"run alone at their shapes (forward + backward, fastest of several), the share a training step "
                  f"could reach if nothing else took time, and 'of attainable' the training's share of that; "
                  f"`precision: auto` would choose here: "
                  f"{chosen or 'n/a (needs fp32 and bf16)'}; `python bench/train_speed.py --batch {args.batch} "
                  f"--device {args.device}`",
                  ["preset", "px", "precision", "batch", "images/s", "vs fp32", "GFLOP/image", "GFLOP/s",
                   "GEMM peak GFLOP/s", "share of peak", "convolutions alone", "of attainable"], rows)


if __name__ == "__main__":
    main()
