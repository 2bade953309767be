"""The processes of one launch (`accelerate launch`, `torchrun`): one process group, work split by rank.

Everything goes through accelerate's `PartialState`, created here once per process. On a machine with GPUs a
launch forms an NCCL group; on one without, accelerate only forms a multi-CPU (gloo) group when asked for the
CPU, so a launched process without CUDA asks for it (`cpu_only`). Without a launch (no `WORLD_SIZE` > 1) the
state is the single default process and every function here is a no-op.

Work that is split (`shard`) goes round-robin over whole units (sampling batches, feature batches), so every
unit is computed exactly as one process computes it and the gathered result equals one process's.
A collective (`shard` + `gather`, `broadcast`, `barrier`) must be reached by every process of the launch.

On a CPU the sampling commands launch themselves (`relaunch`): the small UNet runs its convolutions faster as
one process per core with one thread each than as one process with every core (the sample stages 1.3x faster
on 2 AMD EPYC cores, docs/benchmarks.md), and since every batch is made whole by one single-threaded process, a set is
the same bits whatever the number of processes.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Sequence, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def launched() -> bool:
    """Started by a launcher with more than one process (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


MAX_CPU_PROCESSES = 8      # more processes than this each load the model and import torch for little gain


def cores() -> int:
    """The cores this process may use: OMP_NUM_THREADS when set (a launcher, a test worker or the user capping
    the threads), else the CPUs of its affinity mask."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_processes(setting: int) -> int:
    """How many processes a sampling command runs as on this machine: `setting` (params sample.processes) when
    > 0, else one per core (at most MAX_CPU_PROCESSES); always 1 inside a launch or with a GPU (whose runs are
    launched by hand, docs/scaling.md)."""
    if launched():
        return 1
    n = setting if setting > 0 else min(cores(), MAX_CPU_PROCESSES)
    if n > 1:
        import torch

        if torch.cuda.is_available():
            return 1
    return n


def relaunch(argv: Sequence[str], processes: int) -> None:
    """Replace this process by torchrun running `medi ARGV` as `processes` gloo processes, each with an equal
    share of the cores as its threads. Does not return: torchrun's exit status is the command's."""
    threads = str(max(1, cores() // processes))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           "-m", "medi.cli", *argv]
    log.info("running as %d processes of %s thread(s) (params sample.processes): %s", processes, threads, " ".join(cmd[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)


def cpu_only() -> bool:
    """Whether accelerate must be asked for the CPU: `accelerate launch --cpu`, or a launch without CUDA."""
    import torch

    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or (launched() and not torch.cuda.is_available())


def state():
    """accelerate's `PartialState` of this process (initialising the process group of a launch)."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())


def is_main() -> bool:
    return state().is_main_process if launched() else True


def describe() -> dict[str, Any]:
    """The process group as logged: type, backend, world size and this process's rank."""
    s = state()
    return {"distributed_type": str(s.distributed_type).split(".")[-1], "backend": s.backend or "none",
            "num_processes": s.num_processes, "process_index": s.process_index, "device": str(s.device)}


def shard(units: Sequence[T], what: str = "") -> list[T]:
    """This process's units: every `num_processes`-th, starting at its rank (logged as `what` under a launch)."""
    if not launched():
        return list(units)
    s = state()
    mine = list(units)[s.process_index::s.num_processes]
    if what:
        log.info("%s: process %d of %d takes %d of %d", what, s.process_index, s.num_processes, len(mine), len(units))
    return mine


def gather(mine: list) -> list:
    """Every process's list, concatenated in rank order, on every process (a collective)."""
    if not launched():
        return list(mine)
    from accelerate.utils import gather_object

    state()
    return list(gather_object(list(mine)))


def broadcast(value: T) -> T:
    """The main process's `value`, on every process (a collective)."""
    if not launched():
        return value
    from accelerate.utils import broadcast_object_list

    state()
    return broadcast_object_list([value])[0]


def barrier() -> None:
    if launched():
        state().wait_for_everyone()
