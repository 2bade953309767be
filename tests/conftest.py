"""Shared test set-up: offline environment, a temporary MLflow store, and config builders."""
from __future__ import annotations

import os

from medi.runtime import OFFLINE_ENV

os.environ.update(OFFLINE_ENV)
# Under pytest-xdist (`make test` runs one worker per core) each worker gets an equal share of the cores, set before
# torch is imported and inherited by the processes the tests start: workers do not oversubscribe the machine.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import mlflow  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from medi import config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params_dict(tmp_path: Path) -> dict:
    """The repo's params.yaml with every output redirected under tmp_path."""
    return redirected_params(tmp_path)


def redirected_params(tmp_path: Path) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["synthetic"]["output"] = str(tmp_path / "artifacts/synthetic")
    raw["synthetic"]["figure"] = str(tmp_path / "reports/synthetic_tiles.png")
    raw["data"]["root"] = raw["synthetic"]["output"]
    raw["data"]["output"] = str(tmp_path / "artifacts/dataset")
    raw["split"]["output"] = str(tmp_path / "artifacts/splits")
    raw["split"]["metrics"] = str(tmp_path / "metrics/split.json")
    raw["split"]["figure"] = str(tmp_path / "reports/dataset.png")
    raw["model"]["output"] = str(tmp_path / "models")
    raw["train"]["figure"] = str(tmp_path / "reports/samples_{model}.png")
    raw["train"]["metrics"] = str(tmp_path / "metrics/train_{model}.json")
    raw["train"]["detail"] = str(tmp_path / "reports/train_{model}_detail.json")
    raw["sample"]["output"] = str(tmp_path / "samples/{model}")
    raw["fid"]["metrics"] = str(tmp_path / "metrics/fid_{model}.json")
    raw["fid"]["detail"] = str(tmp_path / "reports/fid_{model}_detail.json")
    raw["fid"]["plot"] = str(tmp_path / "reports/plots/fid_per_class_{model}.csv")
    raw["train"]["plot"] = str(tmp_path / "reports/plots/train_{model}.csv")
    raw["report"]["probe_plot"] = str(tmp_path / "reports/plots/probe.csv")
    raw["fid"]["cache"] = str(tmp_path / "artifacts/cache/features")
    raw["encoder"]["cache"] = str(tmp_path / "artifacts/cache/embeddings")
    raw["probe"]["metrics"] = str(tmp_path / "metrics/probe.json")
    raw["probe"]["headline"] = str(tmp_path / "metrics/table1")
    raw["probe"]["table"] = str(tmp_path / "reports/probe.md")
    raw["probe"]["figure"] = str(tmp_path / "reports/probe.png")
    raw["report"]["index"] = str(tmp_path / "reports/index.md")
    raw["report"]["fid_figure"] = str(tmp_path / "reports/fid_per_class.png")
    raw["report"]["sites_figure"] = str(tmp_path / "reports/sites_real_cls_medi.png")
    raw["sweep"]["storage"] = f"sqlite:///{tmp_path / 'optuna.db'}"
    raw["sweep"]["output"] = str(tmp_path / "artifacts/sweep")
    raw["sweep"]["reports"] = str(tmp_path / "reports/sweep")
    raw["tracking"]["uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw["tracking"]["artifact_location"] = str(tmp_path / "mlruns")
    return raw


@pytest.fixture
def make_cfg(params_dict: dict):
    """Build a validated Config from the test params with dotted overrides."""
    def build(**overrides) -> config.Config:      # section__key=value: config's own dotted overrides
        dotted = {k.replace("__", "."): v for k, v in overrides.items()}
        return config.from_dict(config.set_dotted(params_dict, dotted, "test-params"), "test-params")
    return build


@pytest.fixture(scope="session")
def _empty_mlflow_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made: creating them takes seconds, copying the file does not."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(_empty_mlflow_store):
    """Make an empty MLflow SQLite store at a path; returns its tracking URI."""
    def make(path: Path) -> str:
        shutil.copy(_empty_mlflow_store, path)
        return f"sqlite:///{path}"
    return make


@pytest.fixture(autouse=True)
def _pytest_is_never_replaced(monkeypatch: pytest.MonkeyPatch):
    """A test that runs `cli.main()` as a command line must not replace pytest's own process by `medi` with
    tcmalloc preloaded (`medi.allocator.preload`); processes the tests start still do that."""
    from medi import allocator

    monkeypatch.setattr(allocator, "preload", lambda argv: None)


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _empty_mlflow_store: Path):
    """Each test starts in its own folder with MLflow pointing at its own (empty) store, no active run or
    experiment, and leaves none behind."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copy(_empty_mlflow_store, tmp_path / "mlflow.db")
    _reset_mlflow(tmp_path)
    yield
    _reset_mlflow(tmp_path)


def _reset_mlflow(tmp_path: Path) -> None:
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")     # (sets MLFLOW_TRACKING_URI: dropped below)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    mlflow.tracking.fluent._active_experiment_id = None      # no public way to forget the experiment


TINY = {
    "synthetic__slide_scale": 0.03, "synthetic__site_scale": 0.2, "synthetic__tiles_per_slide": 3,
    "synthetic__tile_size": 32, "data__resolution": 16, "data__workers": 1,
    "train__max_steps": 8, "train__batch_size": 8, "train__checkpoint_every": 2, "train__keep_checkpoints": 2,
    "train__log_every": 2, "train__grid_every": 0, "train__grid_steps": 2, "train__grid_seeds": 1,
    "train__warmup_steps": 2, "train__precision": "fp32", "sample__precision": "fp32",
    "sample__count": 42, "sample__steps": 2, "sample__batch_size": 16, "fid__input_size": 32, "fid__min_count": 4,
    "fid__curve_count": 16, "fid__stain_tiles": 4, "report__sites_per_class": 2, "report__tiles_per_row": 3,
    "probe__real_per_class": 3, "probe__pool_per_pair": 2, "probe__runs": 4, "probe__workers": 1, "probe__bootstrap": 200,
    "encoder__input_size": 32,
}


WORLD_SECTIONS = ("synthetic__", "data__", "split__")       # what the tiny world is made of


@pytest.fixture(scope="session")
def _tiny_world_once(tmp_path_factory) -> Path:
    """The tiny synthetic world, synthesized, prepared and split once per session (about 2 s)."""
    from medi import artifacts, data, splits, synthetic

    root = tmp_path_factory.mktemp("tiny_world")
    raw = redirected_params(root)
    for key, value in TINY.items():
        section, name = key.split("__")
        raw[section][name] = value
    cfg = config.from_dict(raw, "tiny-world")
    synthetic.synthesize(cfg, workers=1)
    data.prepare(cfg)
    splits.write_split(cfg.split, artifacts.load_index(cfg.data.output), artifacts.load_slides(cfg.data.output))
    return root


@pytest.fixture
def tiny_world(make_cfg, tmp_path, _tiny_world_once):
    """A tiny synthetic world, prepared and split (built once per session, copied under tmp_path): returns a config
    builder over it. Overrides may change any section but those the world is made of."""
    shutil.copytree(_tiny_world_once / "artifacts", tmp_path / "artifacts")

    def build(**overrides):
        shaping = sorted(k for k in overrides if k.startswith(WORLD_SECTIONS))
        if shaping:
            raise ValueError(f"tiny_world is built once per session; {shaping} would change it (use make_cfg)")
        return make_cfg(**{**TINY, **overrides})

    return build


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`--dist loadgroup`): the end-to-end test and the tests that run several processes at once
    are two groups, each on one worker, started first; the other tests fill in around them. Two multi-process tests
    at once would run four or more busy processes on two cores."""
    for item in items:
        for group in ("e2e", "processes"):          # the marker names the group
            if item.get_closest_marker(group):
                item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=lambda item: (item.get_closest_marker("e2e") is None, item.get_closest_marker("processes") is None))
