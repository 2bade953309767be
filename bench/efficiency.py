"""Efficiency as a ratio: the FLOPs a piece of work does (torch's FlopCounterMode: matmuls and convolutions)
per second, against this machine's GEMM peak for the same precision timed in the same run (an n^3 matmul:
2048 on a CPU, 8192 on a GPU, where 2048 is too small to fill it). A regression or a better machine then shows
as a share of the peak, not as a wall time that depends on the machine and on who else shares it.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gemm_peak(precision: str, device: str = "cpu", n: int | None = None, reps: int = 5) -> tuple[float, int]:
    """(FLOP/s, n) of the fastest of `reps` n x n x n matmuls in `precision` (after one untimed)."""
    n = n or (8192 if device == "cuda" else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=DTYPE[precision])
    b = torch.randn(n, n, generator=g).to(device=device, dtype=DTYPE[precision])
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best, n


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call of `fn` (matmuls and convolutions, forward and backward, whatever the dtype)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def describe(flops_per_second: float, peak: float, n: int, precision: str) -> str:
    return (f"{flops_per_second / 1e9:.1f} GFLOP/s = {100 * flops_per_second / peak:.0f} % of the {precision} GEMM peak "
            f"({peak / 1e9:.1f} GFLOP/s, {n}^3 matmul)")
