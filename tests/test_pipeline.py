"""End to end: the CLI's error handling, and the DVC pipeline at a tiny scale (synthesize -> ... -> report)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY
from medi import cli

BIN = Path(sys.executable).parent


def test_cli_bad_param_is_one_line_and_exit_2(tmp_path, capsys):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    del raw["split"]["mode"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    assert cli.main(["--params", str(tmp_path / "p.yaml"), "split"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"medi split: error: {tmp_path / 'p.yaml'}: missing key 'split.mode' (one of 'paper', 'random')"
    assert cli.main(["--params", str(REPO / "params.yaml"), "--set", "data.source", "check"]) == 2
    assert "--set expects KEY=VALUE" in capsys.readouterr().err


def test_check_names_the_fetch_command_for_missing_real_data(tmp_path, capsys):
    code = cli.main(["--params", str(REPO / "params.yaml"), "--set", "data.source=tcga_ut",
                     "--set", f"data.root={tmp_path / 'data'}", "check"])
    assert code == 2 and "make tcga-ut" in capsys.readouterr().err


def tiny_params() -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in TINY.items():
        section, name = key.split("__")
        raw[section][name] = value
    return raw


@pytest.mark.e2e
def test_dvc_repro_runs_the_pipeline_and_is_incremental(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run = lambda *args: subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert run("dvc", "init", "--no-scm", "-q").returncode == 0

    first = run("dvc", "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in ("synthesize", "prepare", "split", "train@cls", "train@medi", "sample@cls", "sample@medi", "fid@cls",
                  "fid@medi", "probe", "report"):
        assert f"Running stage '{stage}'" in first.stdout
    split = json.loads((work / "metrics/split.json").read_text())
    assert {"train_slides", "holdout_slides", "train_tss", "holdout_tss", "tss_overlap", "train_patches",
            "holdout_patches", "classes", "validation_tss", "test_tss", "slides_without_tiles"} <= set(split)
    assert split["tss_overlap"] == 0 and split["train_slides"] > 0 and split["holdout_slides"] > 0
    assert split["validation_tss"] + split["test_tss"] == split["holdout_tss"] and split["test_tss"] > 0
    for name in ("cls", "medi"):
        assert (work / f"models/{name}/model.safetensors").exists() and (work / f"reports/samples_{name}.png").exists()
        assert json.loads((work / f"metrics/train_{name}.json").read_text())["steps"] == TINY["train__max_steps"]
        fid = json.loads((work / f"metrics/fid_{name}.json").read_text())
        assert {"extractor", "overall", "per_class", "per_site", "kid", "n_real", "n_generated"} <= set(fid)
        assert fid["n_generated"] == TINY["sample__count"] == len(list((work / f"samples/{name}/images").rglob("*.png")))
    probe = json.loads((work / "metrics/probe.json").read_text())
    assert set(probe["tasks"]) == {"nsclc", "rcc", "uterine"} and probe["split"] == "test"
    assert set(probe["tasks"]["rcc"]) == {"none", "real", "cls", "medi", "medi_tuned", "differences", "verdict"}
    assert "Table 1" in (work / "reports/index.md").read_text()
    for fig in ("dataset.png", "synthetic_tiles.png", "synthetic_tiles_counterfactual.png", "fid_per_class.png",
                "sites_real_cls_medi.png", "probe.png"):
        assert (work / "reports" / fig).stat().st_size > 10_000
    assert not (work / "data").exists()            # the default never touches the raw-data folder

    again = run("dvc", "repro")
    assert again.returncode == 0 and "Running stage" not in again.stdout

    params = tiny_params()
    params["split"]["mode"] = "random"
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    third = run("dvc", "repro")
    assert third.returncode == 0, third.stdout + third.stderr
    assert "Running stage 'split'" in third.stdout and "Running stage 'prepare'" not in third.stdout

    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["medi"], output_format="list")
    stages = sorted(r.data.tags["medi.stage"] for r in runs)
    assert stages.count("split") == 2 and stages.count("report") == 2
    assert {"synthesize", "prepare", "train@cls", "train@medi", "sample@cls", "fid@medi"} <= set(stages)
    assert all(r.info.status == "FINISHED" for r in runs)
