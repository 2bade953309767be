"""The `paper` profile (the authors' recipe): its table in docs/paper-recipe.md, `medi profile`, what DVC sees of it,
the settings it needs in training, and (`make smoke-paper`, not in `make test`) the profile end to end on a CPU."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from medi import cli, config, profile
from medi.errors import MediError

BIN = Path(sys.executable).parent
DOC = REPO / "docs" / "paper-recipe.md"
PROFILES = REPO / "profiles"


def recipe_table() -> list[dict[str, str]]:
    """The rows of the table under '## The recipe, setting by setting' in docs/paper-recipe.md."""
    text = DOC.read_text().split("## The recipe, setting by setting", 1)[1].splitlines()
    start = next(i for i, ln in enumerate(text) if ln.startswith("|"))
    end = next((i for i in range(start, len(text)) if not text[i].startswith("|")), len(text))
    lines = text[start:end]                     # the first table after the heading
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        assert len(cells) == len(header), f"table row has {len(cells)} cells, not {len(header)}: {ln}"
        rows.append(dict(zip(header, cells)))
    return rows


def cell_value(cell: str):
    m = re.fullmatch(r"`([^`]*)`", cell)
    assert m, f"a value cell must be one YAML literal in backticks, got {cell!r}"
    return yaml.safe_load(m.group(1))


def same(a, b) -> bool:
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def test_the_table_is_the_defaults_and_the_resolved_profile(tmp_path):
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())
    out = tmp_path / "params.yaml"
    profile.apply(REPO / "params.yaml", ["paper"], output=out, directory=PROFILES)
    resolved = yaml.safe_load(out.read_text())
    rows = recipe_table()
    params = [r["Param"].strip("`") for r in rows]
    assert len(params) == len(set(params)), "a param has two rows"
    assert len(rows) >= 50
    for row, dotted in zip(rows, params):
        section, key = dotted.split(".")
        assert key in defaults[section], f"{dotted} is not a param"
        assert same(defaults[section][key], cell_value(row["Ours"])), f"{dotted}: params.yaml has {defaults[section][key]!r}"
        assert same(resolved[section][key], cell_value(row["Profile"])), f"{dotted}: the profile gives {resolved[section][key]!r}"
        assert row["Authors' code"] and row["Paper's text"] and row["Why ours differs / notes"], dotted
    undocumented = set(profile.read_profile(PROFILES / "paper.yaml")) - set(params)
    assert not undocumented, f"profile keys without a row in {DOC.name}: {sorted(undocumented)}"
    # the recipe as the issue states it, independently of the table
    cfg = config.from_dict(resolved, "paper")
    assert (cfg.data.source, cfg.data.resolution, cfg.model.preset, cfg.model.embedding_split) == ("tcga_ut", 128, "paper-128", "equal")
    assert (cfg.model.prediction_type, cfg.model.rescale_zero_snr, cfg.model.class_dropout, cfg.model.attribute_dropout) == ("epsilon", False, 0.0, 0.0)
    t = cfg.train
    assert (t.max_steps, t.batch_size, t.lr, t.adam_betas, t.weight_decay, t.warmup_steps, t.warmup_fraction) == (800000, 64, 1e-4, [0.95, 0.999], 1e-6, 0, 0.01)
    assert (t.ema_decay, t.ema_warmup, t.ema_inv_gamma, t.ema_power, t.precision, t.augment) == (0.9999, True, 1.0, 0.75, "fp16", False)
    assert (cfg.sample.scheduler, cfg.sample.steps, cfg.fid.extractor, cfg.encoder.name) == ("ddim", 100, "inception-v3-compat", "uni")


def test_profile_writes_params_that_read_back_keep_comments_and_mark_changes(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_text()
    changes = profile.apply(params, ["paper"], directory=PROFILES)
    after = params.read_text()
    assert {c.key for c in changes} == set(profile.read_profile(PROFILES / "paper.yaml")) and len(changes) == 34
    # line for line the same file, but for the changed keys (blank lines and comment lines all kept)
    kept = [(a, b) for a, b in zip(before.splitlines(), after.splitlines()) if "# profile paper (was" not in b]
    assert len(before.splitlines()) == len(after.splitlines()) and all(a == b for a, b in kept) and len(kept) == len(
        before.splitlines()) - 34
    lines = {ln.split(":")[0].strip(): ln for ln in after.splitlines() if ":" in ln}
    assert "# profile paper (was 0.001); " not in lines["lr"] and "# profile paper (was 0.001)" in lines["lr"]
    assert "# profile paper (was v_prediction); v-prediction + zero-terminal-SNR" in lines["prediction_type"]
    assert yaml.safe_load(after)["train"]["weight_decay"] == 1e-6     # a float for PyYAML (1e-06 would be a string)
    assert config.load(params).train.adam_betas == [0.95, 0.999]
    assert profile.apply(params, ["paper"], directory=PROFILES) == [] and params.read_text() == after   # idempotent
    # --set after the profile; the file it writes is what medi reads
    assert cli.main(["--params", str(params), "--set", "train.max_steps=10", "--set", "sample.steps=20",
                     "profile", str(PROFILES / "paper.yaml"), "--output", str(tmp_path / "p2.yaml")]) == 0
    cfg = config.load(tmp_path / "p2.yaml")
    assert (cfg.train.max_steps, cfg.sample.steps, cfg.sample.scheduler) == (10, 20, "ddim")
    # the last key of a section (a blank line below it) and the last key of the file
    profile.apply(params, [], {"data.output": "artifacts/ds2", "tracking.artifact_location": "store"})
    edged = params.read_text().splitlines()
    assert len(edged) == len(after.splitlines()) and edged[edged.index("synthetic:") - 1] == ""
    assert edged[-1] == "  artifact_location: store            # --set (was mlruns)"


def test_profile_errors_name_the_file_and_key_and_write_nothing(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_text()
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "typo.yaml").write_text("train:\n  learning_rate: 0.1\n")
    (tmp_path / "profiles" / "bad.yaml").write_text("train:\n  precision: fp8\n")
    with pytest.raises(MediError, match=r"typo.yaml: 'train.learning_rate' is not a param"):
        profile.apply(params, ["typo"], directory=tmp_path / "profiles")
    with pytest.raises(MediError, match=r"key 'train.precision': expected one of 'fp32', 'fp16', 'bf16', 'auto', got 'fp8'"):
        profile.apply(params, ["bad"], directory=tmp_path / "profiles")
    with pytest.raises(MediError, match=r"profile 'nope': .*nope.yaml not found; known profiles: bad, typo"):
        profile.apply(params, ["nope"], directory=tmp_path / "profiles")
    assert params.read_text() == before
    assert cli.main(["--params", str(params), "profile", str(tmp_path / "profiles" / "bad.yaml")]) == 2
    assert capsys.readouterr().err.startswith("medi profile: error: ")


def _git_dvc_repo(work: Path) -> dict:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "defaults"]):
        done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    return env


def test_dvc_sees_every_param_the_profile_changes(tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, work / name)
    env = _git_dvc_repo(work)
    changes = profile.apply(work / "params.yaml", ["paper"], directory=PROFILES)
    done = subprocess.run(["dvc", "params", "diff", "--json"], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    diff = json.loads(done.stdout)["params.yaml"]
    assert set(diff) == {c.key for c in changes} and len(diff) == 34
    assert diff["train.lr"] == {"old": 0.001, "new": 0.0001, "diff": pytest.approx(-0.0009)}
    assert diff["model.prediction_type"] == {"old": "v_prediction", "new": "epsilon"}


# ------------------------------------------------------------------------- the recipe's settings in training
def test_conditioning_widths_split_like_the_paper_or_like_the_authors_code():
    from medi.model import ConditionEncoder, Vocabulary, architecture
    import pandas as pd

    frame = pd.DataFrame({"class": ["a", "b"], "tss": ["s", "t"], "race": ["x", "y"]})
    for attrs, split, d_e, d_class in ((["tss"], "equal", 256, 256), (["tss", "race"], "equal", 170, 172),
                                       (["tss"], "d_e", 32, 480), ([], "equal", 32, 512)):
        arch = architecture("paper-128", 128, 32, split=split, attributes=len(attrs))
        enc = ConditionEncoder(Vocabulary.from_frame(frame, "class", attrs, []), arch.d_t, arch.d_e)
        assert (arch.d_t, enc.d_class, enc.class_embedding.embedding_dim) == (512, d_class, d_class)
        assert all(e.embedding_dim == d_e for e in enc.categorical.values()), (attrs, split)


@pytest.mark.parametrize("bad, message", [
    ({"train__adam_betas": [0.9]}, "'train.adam_betas' must be two numbers in \\[0, 1\\)"),
    ({"train__warmup_steps": 10, "train__warmup_fraction": 0.01}, "with at most one of them > 0"),
    ({"train__ema_power": 0.0}, "'train.ema_inv_gamma', 'train.ema_power' be > 0"),
    ({"model__embedding_split": "half"}, "key 'model.embedding_split': expected one of 'd_e', 'equal'"),
])
def test_recipe_params_are_validated(make_cfg, bad, message):
    with pytest.raises(MediError, match=message):
        make_cfg(**bad)


def _trained_state(cfg, tmp_path):
    import pandas as pd

    from medi import train
    from medi.model import MediDiffusion

    index = pd.read_parquet(tmp_path / "artifacts/splits/train.parquet")
    result = train.train(cfg, "medi", index, tmp_path / "artifacts/dataset/tiles.npy")
    ckpt = train.checkpoint_root(cfg, "medi", index) / "checkpoint-0000006"
    meta = json.loads((ckpt / "state.json").read_text())
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    return meta, optim, MediDiffusion.load(result.model_dir)


def test_recipe_settings_reach_the_optimizer_schedule_ema_and_model(tiny_world, tmp_path):
    recipe = tiny_world(**{"model__embedding_split": "equal", "train__adam_betas": [0.8, 0.99], "train__warmup_steps": 0,
                           "train__warmup_fraction": 0.5, "train__ema_warmup": True, "train__ema_inv_gamma": 2.0,
                           "train__ema_power": 0.5, "train__lr": 0.01})
    meta, optim, model = _trained_state(recipe, tmp_path)
    assert {k: meta["ema"][k] for k in ("use_ema_warmup", "inv_gamma", "power", "optimization_step")} == {
        "use_ema_warmup": True, "inv_gamma": 2.0, "power": 0.5, "optimization_step": 6}
    assert optim["param_groups"][0]["betas"] == (0.8, 0.99)
    # warm-up int(0.5 * 8) = 4 steps, then cosine: at step 6, half way down
    assert meta["lr_scheduler"]["_last_lr"][0] == pytest.approx(0.01 * 0.5, rel=1e-9)
    assert (model.arch.d_e, model.encoder.d_class) == (64, 64)        # tiny-cpu: d_t = 128, class and TSS 64 each


def test_defaults_keep_the_training_they_had(tiny_world, tmp_path):
    meta, optim, model = _trained_state(tiny_world(), tmp_path)
    assert meta["ema"]["use_ema_warmup"] is False and optim["param_groups"][0]["betas"] == (0.9, 0.999)
    # warm-up 2 steps (TINY), then cosine over the other 6: at step 6, 4/6 of the way
    import math
    assert meta["lr_scheduler"]["_last_lr"][0] == pytest.approx(0.001 * 0.5 * (1 + math.cos(math.pi * 4 / 6)), rel=1e-9)
    assert (model.arch.d_e, model.encoder.d_class) == (32, 96)


# ------------------------------------------------------------------------- the smoke run (make smoke-paper)
SMOKE_SLIDES = [   # two classes, three sites each: the paper split keeps two sites per class for training
    ("LUAD", "05", "4244", "male", "white"), ("LUAD", "05", "4245", "male", "white"),
    ("LUAD", "44", "2655", "female", "asian"), ("LUAD", "50", "1111", "female", "white"),
    ("LUSC", "18", "3406", "male", "white"), ("LUSC", "18", "3407", "male", "white"),
    ("LUSC", "22", "1234", "female", "white"), ("LUSC", "33", "5678", "male", "black or african american"),
]
# Scale only: steps, counts, batch sizes and the fixture's classes. fp16 autocast is a GPU setting (on this CPU
# it is more than 3x slower than fp32), so the smoke trains in fp32; everything else is the profile's.
SMOKE = {
    "data.classes": ["LUAD", "LUSC"], "data.workers": 1,
    "train.max_steps": 2, "train.batch_size": 2, "train.precision": "fp32", "train.workers": 0, "train.log_every": 1,
    "train.checkpoint_every": 2, "train.keep_checkpoints": 1, "train.grid_every": 0, "train.grid_steps": 1,
    "train.grid_seeds": 1,
    "sample.steps": 2, "sample.count": 2, "sample.batch_size": 4,
    "fid.batch_size": 4, "fid.min_count": 2, "fid.kid_subset_size": 2, "fid.kid_subsets": 2,
    "encoder.batch_size": 8,
    "probe.tasks": {"nsclc": ["LUAD", "LUSC"]}, "probe.real_per_class": 2, "probe.pool_per_pair": 1, "probe.runs": 1,
    "probe.workers": 1,
    "report.sites_per_class": 1, "report.tiles_per_row": 2,
    "synthetic.slide_scale": 0.03, "synthetic.site_scale": 0.2, "synthetic.tiles_per_slide": 3,
    "synthetic.tile_size": 32,
}


def test_smoke_overrides_change_scale_only():
    recipe_keys = {k for k in profile.read_profile(PROFILES / "paper.yaml")}
    touched = recipe_keys & set(SMOKE)
    assert touched == {"train.max_steps", "train.batch_size", "train.precision", "train.workers", "train.log_every",
                       "train.checkpoint_every", "train.grid_every", "sample.steps", "sample.batch_size"}


def stand_in_weights(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Randomly initialised state dicts of the real architectures, where the profile expects the weights."""
    import timm
    from torch_fidelity import feature_extractor_inceptionv3 as inc

    from medi import embed, fidelity

    (root / "weights/uni").mkdir(parents=True)
    torch.manual_seed(0)
    uni = timm.create_model(embed.PRESETS["uni"]["architecture"], pretrained=False, num_classes=0,
                            **embed.PRESETS["uni"]["kwargs"])
    torch.save(uni.state_dict(), root / "weights/uni/pytorch_model.bin")
    with monkeypatch.context() as m:                      # build the network without downloading its weights
        m.setattr(inc, "load_state_dict_from_url", lambda *a, **k: None)
        m.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), root / "weights" / fidelity.INCEPTION_FILE)


@pytest.mark.paper_smoke
def test_paper_profile_end_to_end_through_dvc_repro(tmp_path, monkeypatch):
    from tcga_fixture import FixtureSlide, build

    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(PROFILES, work / "profiles")
    (work / ".gitignore").write_text("/data/\n/weights/\n/artifacts/\n/models/\n/checkpoints/\n/samples/\n/mlruns/\n"
                                     "/mlflow.db\n")
    env = _git_dvc_repo(work)
    build(work / "data", [FixtureSlide(c, tss, p, g, r) for c, tss, p, g, r in SMOKE_SLIDES], size=256)
    stand_in_weights(work, monkeypatch)
    changes = profile.apply(work / "params.yaml", ["paper"], SMOKE, directory=work / "profiles")
    print(f"\nmedi profile paper (+ smoke scale): {len(changes)} params changed")

    try:
        repro = subprocess.run(["dvc", "repro"], cwd=work, env=env, capture_output=True, text=True, timeout=5400)
        print(repro.stdout[-6000:])
        check_smoke(work, repro)
    finally:       # a paper-128 checkpoint is 6.6 GB: leave none behind
        for big in ("checkpoints", "models", "weights", ".dvc/cache"):
            shutil.rmtree(work / big, ignore_errors=True)


def check_smoke(work: Path, repro: subprocess.CompletedProcess) -> None:
    assert repro.returncode == 0, repro.stdout[-4000:] + repro.stderr[-4000:]
    for stage in ("prepare", "split", "train@cls", "train@medi", "sample@cls", "sample@medi", "fid@cls", "fid@medi",
                  "probe", "report"):
        assert f"Running stage '{stage}'" in repro.stdout, stage

    import numpy as np
    assert np.load(work / "artifacts/dataset/tiles.npy", mmap_mode="r").shape[1:] == (128, 128, 3)
    for name, d_e in (("cls", 32), ("medi", 256)):
        saved = json.loads((work / f"models/{name}/config.json").read_text())
        assert saved["architecture"]["block_out_channels"] == [128, 256, 512, 512, 1024, 1024]
        assert saved["architecture"]["d_e"] == d_e
        assert (saved["model_params"]["prediction_type"], saved["model_params"]["rescale_zero_snr"]) == ("epsilon", False)
        (ckpt,) = (work / "checkpoints").glob(f"{name}-*/checkpoint-0000002")
        ema = json.loads((ckpt / "state.json").read_text())["ema"]
        assert (ema["decay"], ema["use_ema_warmup"], ema["inv_gamma"], ema["power"]) == (0.9999, True, 1.0, 0.75)
        assert torch.load(ckpt / "optimizer.pt", weights_only=True)["param_groups"][0]["betas"] == (0.95, 0.999)
        info = json.loads((work / f"samples/{name}/sample_info.json").read_text())
        assert "ddim" in json.dumps(info)
        assert json.loads((work / f"metrics/fid_{name}.json").read_text())["extractor"].startswith("inception-v3-compat")
    assert json.loads((work / "metrics/probe.json").read_text())["encoder"].startswith("uni")
    assert "Table 1" in (work / "reports/index.md").read_text()
