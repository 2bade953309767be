"""The memory allocator of medi's processes: tcmalloc where the system has it, else the C library's malloc.

PyTorch's CPU kernels allocate and free megabyte-sized activations at every layer of every step. glibc's malloc
gives such blocks back to the kernel (munmap, heap trimming) and takes page faults to get them again at the next
step; tcmalloc keeps them. The arithmetic is the same, so are the bits (tests/test_allocator.py trains and samples
under both). What it is worth on a machine is measured by `bench/allocator_speed.py` (docs/benchmarks.md).

An allocator is chosen before a process starts (LD_PRELOAD), so a `medi` command line replaces itself once by
the same command with the library preloaded (`preload`, called by `cli.main` for its own command line only).
Processes it starts (torchrun's workers, sweep workers, DataLoader workers) inherit the preload.

Environment `MEDI_MALLOC`: unset or empty = tcmalloc if the dynamic linker finds it, `system` = the C library's
malloc, or the path of a malloc library to preload. `make setup` installs tcmalloc (Debian/Ubuntu:
libtcmalloc-minimal4) where it can.
"""
from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from medi.errors import MediError

ENV = "MEDI_MALLOC"
LIBRARIES = ("tcmalloc_minimal", "tcmalloc")      # as ctypes.util.find_library names them
KNOWN = ("libtcmalloc", "libjemalloc", "libmimalloc")
_PRELOADED = "MEDI_MALLOC_PRELOADED"              # set by `preload`: never replace a process twice


def library() -> str | None:
    """The library to preload: MEDI_MALLOC's path, or tcmalloc as the dynamic linker finds it (None: the C
    library's malloc, on request, off Linux, or when no tcmalloc is installed)."""
    setting = os.environ.get(ENV, "").strip()
    if setting == "system" or not sys.platform.startswith("linux"):
        return None
    if setting:
        if not Path(setting).is_file():
            raise MediError(f"environment {ENV}={setting}: no such file (give a malloc library's path, or 'system')")
        return setting
    for name in LIBRARIES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def in_use() -> str:
    """The allocator of this process: the path of a known malloc library mapped into it, else 'system'."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    for line in maps.splitlines():
        path = line.rsplit(" ", 1)[-1]
        if any(Path(path).name.startswith(k) for k in KNOWN) or (os.environ.get(ENV) and path == os.environ[ENV]):
            return path
    return "system"


def preload(argv: Sequence[str]) -> None:
    """Replace this process by `python -m medi.cli ARGV` with `library()` preloaded; returns when there is none,
    when an allocator is already in use, or when this process is such a replacement (a library the dynamic
    linker could not preload then stays unused rather than looping)."""
    lib = library()
    if lib is None or os.environ.get(_PRELOADED) or in_use() != "system":
        return
    env = {**os.environ, "LD_PRELOAD": " ".join(p for p in (lib, os.environ.get("LD_PRELOAD", "")) if p),
           _PRELOADED: lib}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "medi.cli", *argv], env)


def describe() -> str:
    """One line for logs: the allocator in use, and how to change it."""
    used = in_use()
    if used != "system":
        return f"memory allocator: {used} ({ENV}=system for the C library's malloc)"
    hint = "" if os.environ.get(ENV, "").strip() == "system" else \
        " (tcmalloc not found: install libtcmalloc-minimal4, or `make setup` as root, for faster CPU steps)"
    return f"memory allocator: the C library's malloc{hint}"


if __name__ == "__main__":   # `python -m medi.allocator`: the library `medi` would preload (the Makefile's tests use it)
    try:
        print(library() or "")
    except MediError as exc:
        sys.exit(f"medi.allocator: error: {exc}")
