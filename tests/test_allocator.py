"""medi.allocator: a `medi` command line runs on tcmalloc where the system has it (MEDI_MALLOC chooses), says so,
and computes the same bits as on the C library's malloc."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from helpers import write_params
from medi import allocator, config
from medi.errors import MediError

# what the tests' own environment may carry (make test preloads tcmalloc for pytest): the processes here choose afresh
CHOSEN = ("LD_PRELOAD", allocator.ENV, "MEDI_MALLOC_PRELOADED")


def medi(*args: str, cwd: Path, malloc: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in CHOSEN}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())})
    if malloc is not None:
        env[allocator.ENV] = malloc
    return subprocess.run([sys.executable, "-m", "medi.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def tcmalloc_or_skip(monkeypatch) -> str:
    monkeypatch.delenv(allocator.ENV, raising=False)
    found = allocator.library()
    if found is None:
        pytest.skip("no tcmalloc on this machine (`make setup` installs libtcmalloc-minimal4 where it runs as root)")
    return found


def test_medi_malloc_chooses_the_library(monkeypatch, tmp_path):
    monkeypatch.setenv(allocator.ENV, "system")
    assert allocator.library() is None
    monkeypatch.setenv(allocator.ENV, str(tmp_path / "nowhere.so"))
    with pytest.raises(MediError, match=r"MEDI_MALLOC=.*nowhere\.so: no such file"):
        allocator.library()
    (tmp_path / "libmine.so").write_bytes(b"")
    monkeypatch.setenv(allocator.ENV, str(tmp_path / "libmine.so"))
    assert allocator.library() == str(tmp_path / "libmine.so")


def test_a_command_line_replaces_itself_once_to_run_on_tcmalloc(tmp_path, make_cfg, monkeypatch):
    """`medi check` as a command: tcmalloc in use and named; MEDI_MALLOC=system keeps the C library's malloc; a
    library the dynamic linker cannot preload leaves the command running on malloc, not replacing itself again."""
    tcmalloc_or_skip(monkeypatch)
    params = write_params(make_cfg(), tmp_path / "params.yaml")
    found = medi("--params", str(params), "check", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert "memory allocator: " in found.stderr and "libtcmalloc" in found.stderr.split("memory allocator: ")[1]
    system = medi("--params", str(params), "check", cwd=tmp_path, malloc="system")
    assert system.returncode == 0 and "memory allocator: the C library's malloc\n" in system.stderr
    (tmp_path / "libbroken.so").write_bytes(b"not a library")
    broken = medi("--params", str(params), "check", cwd=tmp_path, malloc=str(tmp_path / "libbroken.so"))
    assert broken.returncode == 0, broken.stderr
    assert "memory allocator: the C library's malloc" in broken.stderr and broken.stderr.count("params OK") == 1
    bad = medi("--params", str(params), "check", cwd=tmp_path, malloc=str(tmp_path / "missing.so"))
    assert bad.returncode == 2 and "error: environment MEDI_MALLOC=" in bad.stderr


def test_training_on_tcmalloc_gives_the_weights_of_malloc_and_tags_its_run(tiny_world, tmp_path, monkeypatch):
    """The same command line trains the same weights, bit for bit, whichever allocator it runs on; each MLflow
    run records the allocator it ran on (tag medi.allocator)."""
    tcmalloc_or_skip(monkeypatch)
    cfg = tiny_world(train__max_steps=6, train__eval_every=0)
    params = write_params(cfg, tmp_path / "params.yaml")
    weights = {}
    for malloc in ("system", ""):
        out = tmp_path / f"models-{malloc or 'default'}"
        done = medi("--params", str(params), "--set", f"model.output={out}", "train", "--model", "medi",
                    cwd=tmp_path, malloc=malloc)
        assert done.returncode == 0, done.stderr
        weights[malloc] = load_file(str(out / "medi/model.safetensors"))
    assert weights["system"].keys() == weights[""].keys()
    assert all(torch.equal(weights["system"][k], weights[""][k]) for k in weights[""])
    client = mlflow.MlflowClient(config.load(params, {}).tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name("medi").experiment_id], "tags.mlflow.runName = 'train-medi'")
    used = sorted(r.data.tags["medi.allocator"] for r in runs)
    assert len(used) == 2 and used[1] == "system" and "libtcmalloc" in Path(used[0]).name
