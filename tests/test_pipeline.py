"""End to end: the CLI's error handling, and the DVC pipeline at a tiny scale (synthesize -> ... -> report)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
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


# The pipeline end to end checks that every stage runs, writes its contract and is incremental, not the figures:
# fewer probe runs and tuned strategies and fewer images per unseen pair than the tiny world keep every arm, file
# and plot, for less work in the probe and fid stages (each runs twice: `dvc repro`, then `dvc exp run`).
E2E = {"probe__runs": 2, "probe__tuned_strategies": ["grid", "unseen"], "fid__unseen_per_pair": 2}


def tiny_params() -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {**TINY, **E2E}.items():
        section, name = key.split("__")
        raw[section][name] = value
    return raw


def flat_keys(tree, prefix="") -> set[str]:
    """The columns of `dvc metrics show` (nested keys joined by '.'; DVC's table leaves lists out)."""
    if isinstance(tree, list):
        return set()
    if isinstance(tree, dict):
        return set().union(*[flat_keys(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in tree.items()]) or {prefix}
    return {prefix}


@pytest.mark.e2e
def test_dvc_repro_runs_the_pipeline_and_is_incremental_and_dvc_experiments_work(tmp_path, mlflow_store):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (work / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    mlflow_store(work / "mlflow.db")       # tracking.uri's store with its tables made (once per session, copied)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run = lambda *args: subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert run("git", "init", "-q").returncode == 0 and run("dvc", "init", "-q").returncode == 0

    first = run("dvc", "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in ("synthesize", "prepare", "split", "train@cls", "train@medi", "sample@cls", "sample@medi", "fid@cls",
                  "fid@medi", "probe", "report"):
        assert f"Running stage '{stage}'" in first.stdout
    split = json.loads((work / "metrics/split.json").read_text())
    assert {"train_slides", "holdout_slides", "train_tss", "holdout_tss", "tss_overlap", "train_patches",
            "holdout_patches", "classes", "validation_tss", "test_tss"} <= set(split)
    assert "slides_without_tiles" in json.loads((work / "artifacts/splits/summary.json").read_text())
    assert split["tss_overlap"] == 0 and split["train_slides"] > 0 and split["holdout_slides"] > 0
    assert split["validation_tss"] + split["test_tss"] == split["holdout_tss"] and split["test_tss"] > 0
    for name in ("cls", "medi"):
        assert (work / f"models/{name}/model.safetensors").exists() and (work / f"reports/samples_{name}.png").exists()
        assert json.loads((work / f"metrics/train_{name}.json").read_text())["steps"] == TINY["train__max_steps"]
        fid = json.loads((work / f"metrics/fid_{name}.json").read_text())
        assert {"extractor", "overall", "per_class", "kid", "n_real", "n_generated"} <= set(fid)
        assert "per_site" in json.loads((work / f"reports/fid_{name}_detail.json").read_text())
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

    # DVC at a glance: headline metrics in one screen (at most 40 columns, Table 1 one row per task), every plot
    # loaded; the contract's full probe table on request
    shown = json.loads(run("dvc", "metrics", "show", "--json").stdout)
    files = shown[next(iter(shown))]["data"]
    columns = set().union(*[flat_keys(v["data"]) for v in files.values()])
    assert len(columns) <= 40, sorted(columns)
    table1 = {Path(f).stem: v["data"] for f, v in files.items() if f.startswith("metrics/table1/")}
    probe_json = json.loads((work / "metrics/probe.json").read_text())
    assert set(table1) == set(probe_json["tasks"]) and all(
        row["medi"] == probe_json["tasks"][t]["medi"]["tss_avg"] for t, row in table1.items())
    full = json.loads(run("dvc", "metrics", "show", "--json", "metrics/probe.json").stdout)
    assert "tasks" in full[next(iter(full))]["data"]["metrics/probe.json"]["data"]
    plots = run("dvc", "plots", "show", "--json")
    assert plots.returncode == 0, plots.stderr
    loaded = json.loads(plots.stdout)
    assert loaded.get("errors", []) == [] and {"training loss", "FID during training (train.eval_every; fid feature space)",
                                       "FID per class (hatched in reports/fid_per_class.png where reliable is false)",
                                       "probe balanced accuracy, TSS-avg (test sites)", "reports/fid_per_class.png"} \
        <= set(loaded["data"])
    curve = pd.read_csv(work / "reports/plots/train_medi.csv")
    assert curve.dropna(subset=["fid"])["step"].tolist() == [TINY["train__max_steps"]]   # eval_every > steps: the last

    # An experiment with every class below fid.min_count (tiny groups) and another d_e: `dvc exp run -S` rewrites
    # params.yaml (no quoting trap), retrains MeDi and re-runs what depends on it (`train@medi --downstream`: its
    # samples, FID, the probe, the report; CLS's branch is left as it was), and the report says what it cannot draw
    assert run("git", "add", "-A").returncode == 0 and run("git", "commit", "-qm", "baseline").returncode == 0
    exp = run("dvc", "exp", "run", "train@medi", "--downstream", "-S", "model.d_e=8", "-S", "fid.min_count=100000",
              "-n", "tiny-groups")
    assert exp.returncode == 0, exp.stdout + exp.stderr
    ran = [stage for stage in ("prepare", "train@cls", "train@medi", "sample@cls", "sample@medi", "fid@cls", "fid@medi",
                               "probe", "report") if f"Running stage '{stage}'" in exp.stdout]
    assert ran == ["train@medi", "sample@medi", "fid@medi", "probe", "report"], exp.stdout
    page = (work / "reports/index.md").read_text()
    assert "### What these figures cannot show" in page
    assert "- medi: no class has 100000 (fid.min_count) real and generated images" in page
    assert json.loads((work / "metrics/fid_medi.json").read_text())["per_class"] == {}
    table = json.loads(run("dvc", "exp", "show", "--json").stdout)
    rows = {(r.get("name") or r["rev"]): r for b in table for r in [b, *[e for x in b.get("experiments") or []
                                                                            for e in x["revs"]]]}
    exp_row = rows["tiny-groups"]["data"]
    assert exp_row["params"]["params.yaml"]["data"]["model"]["d_e"] == 8
    assert rows["workspace"]["data"]["params"]["params.yaml"]["data"]["model"]["d_e"] == 8      # applied
    assert exp_row["metrics"]["metrics/fid_medi.json"]["data"].get("per_class", {}) == {}      # (DVC drops {})
    assert "overall" in exp_row["metrics"]["metrics/fid_medi.json"]["data"]
    assert exp_row["metrics"]["metrics/fid_cls.json"]["data"]["n_generated"] == TINY["sample__count"]

    import mlflow
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["medi"], output_format="list")
    stages = sorted(r.data.tags["medi.stage"] for r in runs)
    assert stages.count("train@medi") == 2 and stages.count("report") == 2 and stages.count("split") == 1
    assert all(r.info.status == "FINISHED" for r in runs)
    versions = mlflow.MlflowClient().search_model_versions("name = 'medi-medi'")
    assert sorted(int(v.version) for v in versions) == [1, 2] and all("overall" in v.tags for v in versions)
