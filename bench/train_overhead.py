"""What the training stage's sample grids and ground-truth stain check cost, as a share of the training itself
(issue 14: under 5 %), on the default params, all timed in one run so the ratio holds on a shared machine.

Times, with the trained model of `--model` (models/NAME): one sample grid as the train stage draws it (its images,
figure and MLflow logging, into a throwaway store), the stain check, and `--steps` training steps of the default
model at the default batch in the precision `train.precision` resolves to here. The share is
(grids x grid + stain check) / (train.max_steps x step), with the grids a default run draws (every
`train.grid_every` steps and the last). Results go to docs/benchmarks.md (section 'train-overhead').

Usage (from the project root, after `dvc repro train`): python bench/train_overhead.py [--model medi] [--steps 10]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from medi import config, train
from medi.model import MediDiffusion

sys.path.insert(0, str(Path(__file__).parent))       # run from the project root
from bench_report import cpu_name, write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="medi")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    cfg = config.load(args.params)
    t = cfg.train
    index = pd.read_parquet(Path(cfg.split.output) / "train.parquet")
    tiles = np.load(Path(cfg.data.output) / "tiles.npy", mmap_mode="r")
    decision = train.training_precision(cfg, args.model, index)
    model = MediDiffusion.load(Path(cfg.model.output) / args.model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        with mlflow.start_run():
            last: dict = {}
            grid = train.grid_hook(cfg, args.model, index, model.vocab, last, decision.precision)
            grid(0, model)                                  # untimed: first-call set-up
            t0 = time.perf_counter()
            grid(t.max_steps, model)
            grid_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        stains = train.stain_check(cfg, last, index, tiles)          # scores the last grid: generates nothing
        stain_s = time.perf_counter() - t0 if stains is not None else 0.0
        short = config.override(cfg, {"train.max_steps": args.steps + 2, "train.checkpoint_every": 10 ** 9,
                                      "train.log_every": 1, "model.output": f"{tmp}/models"})
        logged: dict[int, float] = {}
        train.train(short, args.model, index, Path(cfg.data.output) / "tiles.npy", decision=decision,
                    on_log=lambda step, m: logged.__setitem__(step, m.get("images_per_second", np.nan)))
    ips = float(np.median([v for s, v in logged.items() if s > 2]))     # the first two steps warm up
    step_s = t.batch_size / ips
    grids = t.max_steps // t.grid_every + (t.max_steps % t.grid_every > 0) if t.grid_every else 1
    share = (grids * grid_s + stain_s) / (t.max_steps * step_s)
    print(f"training step {step_s:.3f} s ({ips:.1f} images/s, {decision.precision}); grid {grid_s:.2f} s x {grids}; "
          f"stain check {stain_s:.2f} s; share of a {t.max_steps}-step training: {100 * share:.1f} %", flush=True)
    write_section("train-overhead",
                  f"The train stage's sample grids and stain check against its training steps (model '{args.model}', "
                  f"default params, {decision.precision}: {decision.how}) on {cpu_name()}, {torch.get_num_threads()} "
                  f"threads, timed in one run; `python bench/train_overhead.py --model {args.model}`",
                  ["training step (batch)", "grid (each)", "grids per run", "stain check", "training of a run",
                   "grids + stain check, share"],
                  [[f"{step_s:.3f} s ({t.batch_size})", f"{grid_s:.2f} s", grids, f"{stain_s:.2f} s",
                    f"{t.max_steps} steps = {t.max_steps * step_s:.0f} s", f"{100 * share:.1f} %"]])


if __name__ == "__main__":
    main()
