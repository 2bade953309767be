"""Training throughput of N gloo processes against 1 process on the same cores: `make bench`.

Runs the real `medi train --model NAME` on the pipeline's split (run `dvc repro split` first) for `--steps`
steps, once as one process and once under `torchrun --nproc_per_node N` (one thread per process, torchrun's
default), each into a temporary folder with its own MLflow store, and reads the images/s each run reports
(training time only, main process). Writes the ratio to docs/benchmarks.md (section 'processes').
Usage: python bench/train_processes.py [--steps 60] [--processes 2] [--model cls]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_report import cpu_name, write_section

REPO = Path(__file__).resolve().parents[1]


def run(processes: int, steps: int, model: str, root: Path, threads: int | None = None) -> dict:
    out = root / f"p{processes}-t{threads}"
    sets = {"train.max_steps": steps, "train.checkpoint_every": steps, "train.grid_every": 0,
            "train.eval_every": 0, "model.output": out / "models", "train.metrics": out / "train_{model}.json",
            "train.detail": out / "train_{model}_detail.json",
            "train.figure": out / "samples_{model}.png"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    cmd = [sys.executable, "-m", "medi.cli", "--params", str(REPO / "params.yaml"), *args, "train", "--model", model]
    if processes > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), "-m", "medi.cli"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out.mkdir(parents=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / f"train_{model}_detail.json").read_text())     # the headline and the processes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--model", default="cls")
    args = ap.parse_args()
    if not (REPO / "artifacts/splits/train.parquet").exists():
        sys.exit("run `dvc repro split` first (the benchmark trains on the pipeline's split)")
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, args.steps, args.model, Path(tmp))
        one_thread = run(1, args.steps, args.model, Path(tmp), threads=1)
        many = run(args.processes, args.steps, args.model, Path(tmp))
    assert many["processes"] == args.processes, many
    ips = one["images_per_second"]
    rows = [[f"1 process ({os.cpu_count()} threads, the default)", f"{ips:.1f}", "1.00"],
            ["1 process, 1 thread", f"{one_thread['images_per_second']:.1f}", f"{one_thread['images_per_second'] / ips:.2f}"],
            [f"{args.processes} gloo processes (torchrun, 1 thread each)", f"{many['images_per_second']:.1f}",
             f"{many['images_per_second'] / ips:.2f}"]]
    for r in rows:
        print(" | ".join(r))
    write_section("processes", f"`medi train --model {args.model}` (params.yaml, {args.steps} steps, global batch "
                  f"unchanged) as one process and as {args.processes} data-parallel gloo processes, images/s of "
                  f"training on {cpu_name()} ({os.cpu_count()} cores); same session, so compare the ratio",
                  ["run", "images/s", "ratio to 1 process"], rows)


if __name__ == "__main__":
    main()
