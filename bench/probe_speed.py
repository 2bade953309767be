"""Probe throughput: 200 runs x 3 tasks x 3 methods on cached embeddings (the target: under 2 minutes on 2 cores).

Runs in a project folder after `make repro` (embeddings and synthetic pools are then cached; nothing is
generated again). The default world has fewer TSS combinations than 200 per task, so combinations are
cycled; every run still draws its own real tiles (its seed differs). Results: docs/benchmarks.md ('probe-cpu').
Usage (from the project root): python bench/probe_speed.py [--runs 200] [--params params.yaml]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from medi import config, probe

sys.path.insert(0, str(Path(__file__).parent))
from bench_report import cpu_name, write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--workers", type=int, default=-1)
    args = ap.parse_args()
    cfg = config.load(args.params)
    p = cfg.probe
    t0 = time.perf_counter()
    spec, tasks = probe.prepare(cfg)
    prep = time.perf_counter() - t0
    rows = []
    total = 0.0
    for i, (name, task) in enumerate(tasks.items()):
        distinct = len(task.combos)
        task.combos = (task.combos * (args.runs // distinct + 1))[: args.runs]
        t1 = time.perf_counter()
        probe.run_task(task, p.methods, p.real_per_class, p.ratio, p.C, p.seed, i, args.workers)
        seconds = time.perf_counter() - t1
        total += seconds
        fits = args.runs * len(p.methods)
        rows.append([name, args.runs, distinct, len(p.methods), len(task.test_y), f"{seconds:.1f}", f"{fits / seconds:.0f}"])
        print(name, rows[-1], flush=True)
    rows.append(["all", args.runs * len(tasks), "", "", "", f"{total:.1f}", ""])
    write_section("probe-cpu",
                  f"Linear-probe runs on cached embeddings ({spec.describe()}) on {cpu_name()}, joblib workers "
                  f"{args.workers}; {p.real_per_class} real per class + {p.ratio:g} synthetic per real; embeddings and pools "
                  f"loaded from the cache in {prep:.1f} s; `python bench/probe_speed.py --runs {args.runs}`",
                  ["task", "runs", "distinct TSS combinations", "methods", "test tiles", "seconds", "fits/s"], rows)


if __name__ == "__main__":
    main()
