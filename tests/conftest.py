"""Shared test set-up: offline environment, a temporary MLflow store, and config builders."""
from __future__ import annotations

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1",
               "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}.items():
    os.environ[_k] = _v

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

from medi import config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params_dict(tmp_path: Path) -> dict:
    """The repo's params.yaml with every output redirected under tmp_path."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["synthetic"]["output"] = str(tmp_path / "artifacts/synthetic")
    raw["synthetic"]["figure"] = str(tmp_path / "reports/synthetic_tiles.png")
    raw["data"]["root"] = raw["synthetic"]["output"]
    raw["data"]["output"] = str(tmp_path / "artifacts/dataset")
    raw["split"]["output"] = str(tmp_path / "artifacts/splits")
    raw["split"]["metrics"] = str(tmp_path / "metrics/split.json")
    raw["split"]["figure"] = str(tmp_path / "reports/dataset.png")
    raw["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw["tracking"]["artifact_location"] = str(tmp_path / "mlruns")
    return raw


@pytest.fixture
def make_cfg(params_dict: dict):
    """Build a validated Config from the test params with dotted overrides."""
    def build(**overrides) -> config.Config:
        raw = yaml.safe_load(yaml.safe_dump(params_dict))
        for dotted, value in overrides.items():
            node = raw
            *parents, leaf = dotted.split("__")
            for p in parents:
                node = node[p]
            node[leaf] = value
        return config.from_dict(raw, "test-params")
    return build


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
