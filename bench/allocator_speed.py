"""The memory allocator on the CPU: the C library's malloc against tcmalloc (`medi.allocator`), on the default
model's work: a sampling forward (tiny-cpu, batch 16, bf16 autocast) in one thread, as each process of the sample
stage runs it, and with every core's thread; a training step (batch 32, bf16 autocast, AdamW) with every core.

An allocator is fixed when a process starts, so each measurement is a fresh process (`--child`), the two
allocators alternating for `--rounds` rounds; the medians are compared as a ratio measured in one run. Each child
also digests what it computed (the trained weights, the forward's output) from fixed inputs: the allocators must
give the same bits. Results go to docs/benchmarks.md, section allocator-cpu-<CPU type>.
Usage: python bench/allocator_speed.py [--rounds 4]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

WORK = {  # name: (batch, threads: 0 = every core, training?)
    "sampling forward, 1 thread": (16, 1, False),
    "sampling forward, all cores": (16, 0, False),
    "training step, all cores": (32, 0, True),
}


def child(name: str) -> dict:
    import torch

    from medi import allocator
    from train_speed import _model

    batch, threads, training = WORK[name]
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = _model("tiny-cpu").train(training)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if training else None
    g = torch.Generator().manual_seed(1)
    cond = model.vocab.encode(["c0"] * batch, {"tss": ["s0"] * batch})
    x, t = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 1000, (batch,), generator=g)
    digest = hashlib.sha256()

    def step():
        if not training:
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                return model(x, t, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (model(x, t, cond).float() - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    reps = 6 if training else 12
    for _ in range(3):
        digest.update(step().float().numpy().tobytes())
    best = float("inf")
    for _ in range(4):
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        best = min(best, (time.perf_counter() - t0) / reps)
    if training:
        for p in model.parameters():
            digest.update(p.detach().numpy().tobytes())
    return {"images_per_s": batch / best, "digest": digest.hexdigest()[:16], "allocator": allocator.in_use(),
            "threads": torch.get_num_threads()}


def run_child(name: str, library: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if library:
        env["LD_PRELOAD"] = library
    out = subprocess.run([sys.executable, __file__, "--child", name], env=env, check=True, capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return

    from medi import allocator
    from bench_report import cpu_name, machine_tag, write_section

    library = allocator.library()
    if library is None:
        sys.exit("no tcmalloc to compare with (install libtcmalloc-minimal4, or `make setup` as root)")
    rows = []
    for name in WORK:
        runs: dict[str, list[dict]] = {"system": [], "tcmalloc": []}
        for _ in range(args.rounds):
            runs["system"].append(run_child(name, None))
            runs["tcmalloc"].append(run_child(name, library))
        assert all(r["allocator"] == "system" for r in runs["system"]), runs["system"]
        assert all(r["allocator"] != "system" for r in runs["tcmalloc"]), runs["tcmalloc"]
        rates = {k: [r["images_per_s"] for r in v] for k, v in runs.items()}
        same = len({r["digest"] for v in runs.values() for r in v}) == 1
        system, tc = (statistics.median(rates[k]) for k in ("system", "tcmalloc"))
        spread = {k: f"{min(v):.0f}-{max(v):.0f}" for k, v in rates.items()}
        rows.append([name, runs["system"][0]["threads"], f"{system:.1f} ({spread['system']})",
                     f"{tc:.1f} ({spread['tcmalloc']})", f"{tc / system:.2f}x", "yes" if same else "**no**"])
        print(f"{name}: system {system:.1f}, tcmalloc {tc:.1f} images/s: {tc / system:.2f}x; same bits: {same}",
              flush=True)
    write_section(f"allocator-cpu-{machine_tag()}",
                  f"The memory allocator: the C library's malloc against tcmalloc ({library}), each measurement a "
                  f"fresh process, {args.rounds} alternating rounds, medians (range); {cpu_name()}, tiny-cpu at 32 px "
                  f"in bf16 autocast; `python bench/allocator_speed.py`",
                  ["work", "threads", "system malloc, images/s", "tcmalloc, images/s", "speed-up", "same bits"], rows,
                  allocator=False)


if __name__ == "__main__":
    main()
