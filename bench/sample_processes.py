"""Sampling forwards of the default UNet as one process with every core against one single-threaded process per
core at the same time (what `sample.processes: 0` launches, docs/scaling.md), on random inputs: forwards per
second of the whole machine, both layouts timed in the same run (docs/benchmarks.md, section
sample-processes-cpu-<CPU type>). Also checks that a forward gives the same bits with 1 thread and with all.
Usage: python bench/sample_processes.py [--batch 16] [--forwards 60] [--rounds 3]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch

from bench_report import cpu_name, machine_tag, write_section
from efficiency import counted_flops, gemm_peak
from train_speed import _model, convolutions_alone

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _inputs(batch: int):
    torch.manual_seed(0)
    model = _model("tiny-cpu").eval()
    cond = model.vocab.encode(["c0"] * batch, {"tss": ["s0"] * batch})
    return model, torch.randn(batch, 3, 32, 32), torch.full((batch,), 500), cond


def _forwards(model, x, t, cond, precision: str, n: int) -> float:
    """Forwards per second over n forwards, after 5 untimed."""
    dtype = DTYPES[precision]
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        for _ in range(5):
            model(x, t, cond)
        t0 = time.perf_counter()
        for _ in range(n):
            model(x, t, cond)
    return n / (time.perf_counter() - t0)


def _worker(batch: int, precision: str, n: int, barrier, out) -> None:
    torch.set_num_threads(1)
    model, x, t, cond = _inputs(batch)
    barrier.wait()
    out.put(_forwards(model, x, t, cond, precision, n))


def parallel(cores: int, batch: int, precision: str, n: int) -> float:
    """Forwards per second of `cores` single-threaded processes running at once (their sum)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(cores), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(batch, precision, n, barrier, out)) for _ in range(cores)]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--forwards", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    args = ap.parse_args()
    cores = torch.get_num_threads()
    model, x, t, cond = _inputs(args.batch)
    with torch.no_grad():
        flops = counted_flops(lambda: model(x, t, cond))              # one forward of the batch
    rows = []
    for precision in args.precisions:
        dtype = DTYPES[precision]
        torch.set_num_threads(cores)
        peak, n = gemm_peak(precision)                                # the machine's, all cores
        alone = {k: 0.0 for k in (1, cores)}                          # the convolutions alone, forward only
        for k in alone:
            torch.set_num_threads(k)
            alone[k] = convolutions_alone("tiny-cpu", precision, args.batch, 10, "cpu", backward=False)
        torch.set_num_threads(1)
        alone_one = alone[1] / gemm_peak(precision)[0]                # against the one-thread peak
        torch.set_num_threads(cores)
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            torch.set_num_threads(1)
            one = model(x, t, cond)
            torch.set_num_threads(cores)
            same = torch.equal(one, model(x, t, cond))
        single, split = [], []
        for _ in range(args.rounds):          # alternating rounds; medians compared
            torch.set_num_threads(cores)
            single.append(_forwards(model, x, t, cond, precision, args.forwards))
            split.append(parallel(cores, args.batch, precision, args.forwards))
        a, b = statistics.median(single), statistics.median(split)
        rows.append([precision, args.batch, f"{a:.1f}", f"{b:.1f}", f"{b / a:.2f}x", f"{peak / 1e9:.0f}",
                     f"{100 * a * flops / peak:.0f} %", f"{100 * b * flops / peak:.0f} %",
                     f"{100 * alone[cores] / peak:.0f} % / {100 * alone_one:.0f} %", "yes" if same else "no"])
        print(f"{precision}: 1 process x {cores} threads {a:.1f} forwards/s ({100 * a * flops / peak:.0f} % of the "
              f"{precision} GEMM peak, {peak / 1e9:.0f} GFLOP/s at {n}^3); {cores} processes x 1 thread {b:.1f} "
              f"({100 * b * flops / peak:.0f} %): {b / a:.2f}x; convolutions alone {100 * alone[cores] / peak:.0f} % on "
              f"{cores} threads, {100 * alone_one:.0f} % on 1; same bits at 1 and {cores} threads: {same}", flush=True)
    write_section(f"sample-processes-cpu-{machine_tag()}",
                  f"UNet forwards (tiny-cpu, 32 px, random inputs) on {cpu_name()}, {cores} cores: one process with "
                  f"{cores} threads against {cores} single-threaded processes at once (their summed rate); medians "
                  f"of {args.rounds} alternating rounds of {args.forwards} forwards; 'same bits': a forward at 1 "
                  f"thread equals one at {cores}; shares of the GEMM peak of that precision on all {cores} cores "
                  f"(2048^3 matmul, same run; {flops / args.batch / 1e9:.3f} GFLOP per image and forward); "
                  f"'convolutions alone': the forward's convolutions each run alone at their shapes (fastest of "
                  f"10), as a share of the peak on {cores} threads / on 1 thread (against the 1-thread peak): what "
                  f"a forward would reach if nothing else took time; "
                  f"`python bench/sample_processes.py`",
                  ["precision", "batch", f"1 x {cores} threads, forwards/s", f"{cores} x 1 thread, forwards/s",
                   "ratio", "GEMM peak GFLOP/s", f"share, 1 x {cores}", f"share, {cores} x 1",
                   f"convolutions alone, {cores} / 1 thread(s)", "same bits"], rows)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
