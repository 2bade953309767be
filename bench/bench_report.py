"""docs/benchmarks.md: one section per benchmark, replaced in place when a benchmark is re-run."""
from __future__ import annotations

import datetime as dt
import platform
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nMeasured by the scripts in `bench/` (`make bench`); each section is rewritten when its script runs.\n"


def write_section(name: str, caption: str, columns: list[str], rows: list[list], allocator: bool = True) -> None:
    """Replace section NAME of docs/benchmarks.md (or append it). With `allocator`, the caption names the memory
    allocator this process ran on (medi.allocator: it moves CPU figures by up to 1.3x)."""
    if allocator:
        from medi.allocator import in_use

        used = in_use()
        caption += "; allocator: " + ("the C library's malloc" if used == "system" else Path(used).name)
    text = DOC.read_text() if DOC.exists() else HEADER
    table = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    table += "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in rows)
    block = f"<!-- {name} -->\n## {name}\n\n{caption}. Measured {dt.date.today().isoformat()}.\n\n{table}<!-- /{name} -->\n"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->\n", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def machine_tag() -> str:
    """A short name of this CPU for section names ('epyc', 'xeon', else a slug of its name), so that a benchmark
    run on one machine type never overwrites another type's figures in docs/benchmarks.md."""
    name = cpu_name().lower()
    for tag in ("epyc", "xeon"):
        if tag in name:
            return tag
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:24] or "cpu"
