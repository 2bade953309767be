"""Sampling throughput and the FID each sampler reaches: DDIM-100 (the paper's) vs DPM-Solver++ at 10/15/20/25 steps.

Runs in a project folder after `make train` (it needs models/, artifacts/dataset and artifacts/splits).
Every sampler gets the same `match` plan and seeds, so the FID differences come from the sampler alone;
FID (overall and mean over classes) is computed against all real training tiles in the feature space of
params `fid`. Each sampler's FLOPs (FlopCounterMode over one denoising step's model evaluations, times the steps)
per second are given as a share of this machine's GEMM peak in the precision sampled (`sample.precision`; auto:
the one `medi.precision` chooses), timed in the same run (bench/efficiency.py). Results go to docs/benchmarks.md
(section 'sampling-cpu-<CPU type>').

Usage (from the project root): python bench/sample_speed.py [--model medi] [--count 1000] [--params params.yaml]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medi import artifacts, config
from medi.fidelity import Extractor, frechet
from medi.model import MediDiffusion
from medi.sampling import Sampler, conditions_of, generate, guidance_conditions, plan, sampling_precision

sys.path.insert(0, str(Path(__file__).parent))       # run from the project root
from bench_report import cpu_name, machine_tag, write_section  # noqa: E402
from efficiency import counted_flops, gemm_peak  # noqa: E402

SAMPLERS = [("ddim", 100), ("dpmsolver++", 10), ("dpmsolver++", 15), ("dpmsolver++", 20), ("dpmsolver++", 25)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="medi")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--section", default=f"sampling-cpu-{machine_tag()}", help="docs/benchmarks.md section")
    args = ap.parse_args()
    cfg = config.load(args.params)
    torch.manual_seed(0)
    model = MediDiffusion.load(Path(cfg.model.output) / args.model).eval()
    train_index = pd.read_parquet(Path(cfg.split.output) / "train.parquet")
    rows = plan(dataclasses.replace(cfg.sample, strategy="match", count=args.count, batch_size=args.batch),
                train_index, model.vocab.classes)
    cond = conditions_of(rows, model)
    decision = sampling_precision(model, Sampler.of(cfg.sample), cond, args.batch)
    precision = decision.precision
    print(f"sampling precision: {decision.describe()}", flush=True)
    peak, n = gemm_peak(precision, "cpu")
    first = {k: v[:args.batch] for k, v in cond.items()}
    variants, _ = guidance_conditions(first, cfg.sample.guidance, cfg.sample.metadata_guidance)
    batched = {k: torch.cat([v[k] for v in variants]) for k in first}
    x = torch.zeros(len(batched["class"]), 3, model.arch.sample_size, model.arch.sample_size)
    with torch.no_grad():
        step_flops = counted_flops(lambda: model(x, torch.full((len(x),), 500), batched)) / args.batch  # per image
    extractor = Extractor.from_config(cfg.fid.encoder)
    tiles = artifacts.load_tiles(cfg.data.output)
    real_idx = np.sort(train_index["idx"].to_numpy())
    real = extractor.features(tiles[real_idx], verbose=False)
    real_class = train_index.set_index("idx").loc[real_idx, "class"].to_numpy(str)
    gen_class = rows["class"].to_numpy(str)
    results = []
    for kind, steps in SAMPLERS:
        t0 = time.perf_counter()
        sampler = Sampler(kind, steps, cfg.sample.guidance, cfg.sample.metadata_guidance, precision)
        images = generate(model, sampler, cfg.model, cond, rows["seed"].tolist(), batch_size=args.batch)
        seconds = time.perf_counter() - t0
        gen = extractor.features(images, verbose=False)
        per_class = [frechet(real[real_class == c], gen[gen_class == c]) for c in sorted(set(gen_class))
                     if (gen_class == c).sum() >= cfg.fid.min_count]
        results.append((kind, steps, args.count / seconds, frechet(real, gen), float(np.mean(per_class))))
        achieved = results[-1][2] * step_flops * steps
        print(f"{kind} {steps}: {results[-1][2]:.1f} images/s, FID {results[-1][3]:.4g}, mean class FID {results[-1][4]:.4g}, "
              f"{achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f} % of the {precision} GEMM peak", flush=True)
    ref_speed, ref_fid, ref_class = results[0][2:]
    rows_out = [[k, s, f"{ips:.1f}", f"{ips / ref_speed:.1f}x", f"{fid:.4g}", f"{100 * (fid / ref_fid - 1):+.1f}%",
                 f"{cf:.4g}", f"{100 * (cf / ref_class - 1):+.1f}%", f"{ips * step_flops * s / 1e9:.1f}",
                 f"{100 * ips * step_flops * s / peak:.0f} %"] for k, s, ips, fid, cf in results]
    cpu = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    write_section(args.section,
                  f"Sampling throughput of model '{args.model}' ({cfg.model.preset}, {cfg.data.resolution} px) on {cpu}, "
                  f"{torch.get_num_threads()} threads, batch {args.batch}, guidance {cfg.sample.guidance}, {precision} "
                  f"({decision.how}; the GEMM peak in {precision}: {peak / 1e9:.1f} GFLOP/s, {n}^3 matmul timed in the "
                  f"same run; {step_flops / 1e9:.3g} GFLOP per image and step), "
                  f"{args.count} images of one `match` plan with the same seeds for every sampler; FID against "
                  f"{len(real)} real training tiles in the feature space {extractor.description}; "
                  f"`python bench/sample_speed.py --model {args.model} --count {args.count}`",
                  ["sampler", "steps", "images/s", "speed vs DDIM-100", "FID", "vs DDIM-100", "mean class FID",
                   "vs DDIM-100", "GFLOP/s", "share of peak"], rows_out)


if __name__ == "__main__":
    main()
