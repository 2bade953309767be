"""The processes of one launch (`accelerate launch`, `torchrun`): one process group, work split by rank.

Everything goes through accelerate's `PartialState`, created here once per process. On a machine with GPUs a
launch forms an NCCL group; on one without, accelerate only forms a multi-CPU (gloo) group when asked for the
CPU, so a launched process without CUDA asks for it (`cpu_only`). Without a launch (no `WORLD_SIZE` > 1) the
state is the single default process and every function here is a no-op.

Work that is split (`shard`) goes round-robin over whole units (sampling batches, feature batches), so every
unit is computed exactly as one process computes it and the gathered result equals one process's.
A collective (`shard` + `gather`, `broadcast`, `barrier`) must be reached by every process of the launch.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def launched() -> bool:
    """Started by a launcher with more than one process (torchrun / accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


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
