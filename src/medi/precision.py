"""`precision: auto` for training and sampling: fp32 or bf16 autocast, whichever this machine runs faster.

On a CPU the faster of the two depends on the CPU (measured in docs/benchmarks.md: an Intel Xeon with
avx512_bf16 but no AMX trains tiny-cpu faster in fp32, an AMD EPYC with avx512_bf16 1.6x faster in bf16), so
`auto` times a few steps of the actual model, at the actual batch and resolution, in both, and keeps the
faster: bf16 only when it is at least `MARGIN` faster (fp32 is the more exact of the two, and a closer race
is within timing noise). Rounds alternate the two precisions, and each precision's median round counts.
On CUDA nothing is timed: bf16 where the device supports it, else fp16 (the paper's). An explicit setting
(fp32 / fp16 / bf16) is returned untouched.

The decision is recorded where its results are (a training checkpoint and the saved model; every row of a
sample manifest), so a resumed training keeps the precision it started with and a sample set is replayed in
the precision it was made in. Figures are bit-reproducible for a fixed precision on one CPU type; `auto` may
choose differently on another CPU type.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

log = logging.getLogger(__name__)

AUTO = "auto"
CANDIDATES = ("fp32", "bf16")           # what `auto` chooses between on a CPU
MARGIN = 0.05                           # bf16 must be this much faster than fp32 to be chosen
ROUNDS, WARMUP, BUDGET_S = 4, 1, 8.0    # timed rounds at most (at least 2), untimed rounds first, seconds of timing


@dataclass(frozen=True)
class Decision:
    precision: str                      # what runs: fp32 | fp16 | bf16
    requested: str                      # what params said: auto | fp32 | fp16 | bf16
    how: str                            # explicit | measured | device capability | recorded (a resume)
    images_per_second: Mapping[str, float] = field(default_factory=dict)   # measured: per candidate

    def describe(self) -> str:
        timing = ", ".join(f"{p} {v:.1f} images/s" for p, v in self.images_per_second.items())
        return f"{self.precision} ({self.requested}: {self.how}{'; ' + timing if timing else ''})"

    def mlflow_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_{p}_images_per_second": v for p, v in self.images_per_second.items()}


def choose(images_per_second: Mapping[str, float], margin: float = MARGIN) -> str:
    """fp32 unless bf16 ran at least `margin` faster (a missing or non-finite figure never wins)."""
    fp32, bf16 = images_per_second.get("fp32", float("nan")), images_per_second.get("bf16", float("nan"))
    if bf16 == bf16 and (not fp32 == fp32 or bf16 >= fp32 * (1.0 + margin)):
        return "bf16"
    return "fp32"


def autocast(device_type: str, precision: str):
    """The autocast context of `precision` (none for fp32)."""
    if precision == "fp32":
        return torch.autocast(device_type=device_type, enabled=False)
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def time_rounds(step: Callable[[str], None], candidates=CANDIDATES, rounds: int = ROUNDS, warmup: int = WARMUP,
                budget_s: float = BUDGET_S) -> dict[str, float]:
    """Median seconds of `step(precision)` per candidate: `warmup` untimed rounds, then alternating timed rounds
    (at least two, at most `rounds`, stopping once `budget_s` seconds have gone)."""
    for _ in range(warmup):
        for p in candidates:
            step(p)
    seconds: dict[str, list[float]] = {p: [] for p in candidates}
    t_start = time.perf_counter()
    for r in range(rounds):
        for p in (candidates if r % 2 == 0 else tuple(reversed(candidates))):
            t0 = time.perf_counter()
            step(p)
            seconds[p].append(time.perf_counter() - t0)
        if r >= 1 and time.perf_counter() - t_start > budget_s:
            break
    return {p: statistics.median(s) for p, s in seconds.items()}


def _on_cuda(requested: str, device: torch.device) -> Decision:
    bf16 = torch.cuda.is_bf16_supported()
    return Decision("bf16" if bf16 else "fp16", requested, f"device capability ({torch.cuda.get_device_name(device)}"
                                                            f"{'' if bf16 else ' has no bf16'})")


def for_training(requested: str, model: torch.nn.Module, batch: Callable[[], tuple], device: torch.device,
                 recorded: str | None = None) -> Decision:
    """The training precision. `batch()` gives (x_t, timesteps, cond, target) of one micro-batch; `recorded` is
    the precision a checkpoint being resumed was trained in (kept as it is)."""
    if requested != AUTO:
        return Decision(requested, requested, "explicit")
    if recorded:
        return Decision(recorded, requested, "recorded in the checkpoint resumed")
    if device.type == "cuda":
        return _on_cuda(requested, device)
    if device.type != "cpu":
        return Decision("fp32", requested, f"no bf16 timing on {device.type}")
    x, t, cond, target = batch()
    n = len(x)
    model = model.to(device).train()

    def step(p: str) -> None:
        with autocast(device.type, p):
            pred = model(x, t, cond)
        torch.nn.functional.mse_loss(pred.float(), target).backward()
        model.zero_grad(set_to_none=True)

    with torch.random.fork_rng(devices=[]):     # the model's dropout draws must not move the run's generator
        seconds = time_rounds(step)
    ips = {p: n / s for p, s in seconds.items()}
    return Decision(choose(ips), requested, "measured", ips)


_SAMPLING: dict[tuple, Decision] = {}       # per process: (architecture, batch, evaluations, device) -> decision


def for_sampling(requested: str, model: torch.nn.Module, cond: Mapping[str, torch.Tensor], batch: int,
                 evaluations: int, steps: int, device: torch.device) -> Decision:
    """The sampling precision for batches of `batch` images, each step evaluating the model on `evaluations`
    condition sets (guidance); decided once per process and shape. `cond` holds at least one row of conditions."""
    if requested != AUTO:
        return Decision(requested, requested, "explicit")
    if device.type == "cuda":
        return _on_cuda(requested, device)
    if device.type != "cpu":
        return Decision("fp32", requested, f"no bf16 timing on {device.type}")
    arch = getattr(model, "arch", None)
    key = (repr(arch), batch, evaluations, str(device))
    if key in _SAMPLING:
        return _SAMPLING[key]
    rows = batch * evaluations
    size = arch.sample_size
    with torch.random.fork_rng(devices=[]):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, 3, size, size, generator=g).to(device)
        c = {k: v[torch.arange(rows) % len(v)].to(device) for k, v in cond.items()}
        t = torch.full((rows,), 500, device=device, dtype=torch.long)

        @torch.no_grad()
        def step(p: str) -> None:
            with autocast(device.type, p):
                model(x, t, c)

        seconds = time_rounds(step)
    ips = {p: batch / (s * steps) for p, s in seconds.items()}
    decision = Decision(choose(ips), requested, "measured", ips)
    log.info("sampling precision: %s, batch %d x %d evaluations per step", decision.describe(), batch, evaluations)
    _SAMPLING[key] = decision
    return decision
