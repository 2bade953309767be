"""What the default FID curve costs (params train.eval_every, fid.curve_count): the seconds of one curve point
(fid.curve_count images sampled with params `sample`, their features, FID and KID against the cached real
features) against the seconds of one training step, on the default params and dataset (run `dvc repro split`
first). Prints the share of a default training the curve adds; docs/benchmarks.md quotes it.

    python bench/fid_curve_cost.py [--steps 20]
"""
from __future__ import annotations

import argparse
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    from medi import artifacts, config, fidelity, train

    ap = argparse.ArgumentParser()
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    cfg = config.load(args.params)
    index = pd.read_parquet(Path(cfg.split.output) / "train.parquet")
    tiles = np.asarray(artifacts.load_tiles(cfg.data.output))
    with tempfile.TemporaryDirectory() as tmp:
        short = config.override(cfg, {"train.max_steps": args.steps, "train.checkpoint_every": 10 ** 6,
                                      "model.output": str(Path(tmp) / "models"), "train.warmup_steps": 0})
        t0 = time.perf_counter()
        result = train.train(short, "medi", index, Path(cfg.data.output) / "tiles.npy")
        per_step = (time.perf_counter() - t0) / args.steps
        hook = fidelity.curve_hook(cfg, "medi", index, tiles)
        t0 = time.perf_counter()
        hook(1, result.model)                       # builds the extractor; real features from the cache (or made)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        hook(2, result.model)
        point = time.perf_counter() - t0
    t = cfg.train
    points = len({s for s in range(t.eval_every, t.max_steps + 1, t.eval_every)} | {t.max_steps}) if t.eval_every else 0
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")),
                platform.processor())
    print(f"CPU: {name}")
    print(f"one training step (batch {t.batch_size}): {per_step:.3f} s; one curve point ({cfg.fid.curve_count} "
          f"images, {cfg.sample.scheduler} {cfg.sample.steps} steps): {point:.2f} s = {point / per_step:.1f} steps; "
          f"first point (extractor, real features): {first:.2f} s")
    extra = first + (points - 1) * point
    print(f"default: {points} points over {t.max_steps} steps add {extra:.0f} s to {per_step * t.max_steps:.0f} s of "
          f"training ({extra / (per_step * t.max_steps):.0%})")


if __name__ == "__main__":
    main()
