"""Probe throughput: 200 runs per task, every arm (none, real, cls, medi and medi's strategies for medi_tuned)
on cached embeddings, and the clustered bootstrap of the test figures.

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
    cfg = config.override(config.load(args.params), {"probe.workers": args.workers})
    p = cfg.probe
    t0 = time.perf_counter()
    ctx = probe.prepare(cfg)
    prep = time.perf_counter() - t0
    arms = probe.arms_of(p, p.methods, ctx.site_conditioned, p.tuned_strategies)
    reported = {a.name: a.name for a in arms}
    rows = []
    total = 0.0
    for i, (name, classes) in enumerate(p.tasks.items()):
        task = probe.build_task(classes, ctx, p, probe.PARTS)
        distinct = len(task.combos)
        task.combos = (task.combos * (args.runs // distinct + 1))[: args.runs]
        t1 = time.perf_counter()
        runs = probe.run_task(task, arms, p, i)
        fit_seconds = time.perf_counter() - t1
        t2 = time.perf_counter()
        probe.summarise_part(task, runs, reported, "test", p, p.bootstrap)
        boot_seconds = time.perf_counter() - t2
        total += fit_seconds + boot_seconds
        fits = args.runs * len(arms)
        rows.append([name, args.runs, distinct, len(arms), len(task.eval["test"].y) + len(task.eval["validation"].y),
                     f"{fit_seconds:.1f}", f"{fits / fit_seconds:.0f}", f"{boot_seconds:.1f}"])
        print(name, rows[-1], flush=True)
    rows.append(["all", args.runs * len(p.tasks), "", "", "", f"{total:.1f}", "", ""])
    write_section("probe-cpu",
                  f"Linear-probe runs on cached embeddings ({ctx.encoder}) on {cpu_name()}, joblib workers "
                  f"{args.workers}; {p.real_per_class} real per class + {probe.extra_per_class(p)} extra per class; "
                  f"{len(arms)} arms ({', '.join(a.name for a in arms)}); {p.bootstrap} bootstrap worlds over "
                  f"{len(reported)} arms; embeddings and pools loaded from the cache in {prep:.1f} s; "
                  f"`python bench/probe_speed.py --runs {args.runs}`",
                  ["task", "runs", "distinct TSS combinations", "arms", "holdout tiles", "fit seconds", "fits/s",
                   "bootstrap seconds"], rows)


if __name__ == "__main__":
    main()
