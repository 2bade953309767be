"""params.yaml -> typed config: every bad key is named."""
from __future__ import annotations

import pytest
import yaml

from medi import config
from medi.errors import MediError
from conftest import REPO


def test_repo_params_load():
    cfg = config.load(REPO / "params.yaml")
    assert cfg.data.source == "synthetic" and cfg.classes == cfg.synthetic.classes
    assert cfg.data.resolution == 32 and isinstance(cfg.synthetic.mpp, float)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["split"].pop("seed"), r"missing key 'split.seed'"),
    (lambda r: r["split"].update(mode="stratified"), r"key 'split.mode': expected one of 'paper', 'random', got 'stratified'"),
    (lambda r: r["data"].update(resolution="big"), r"key 'data.resolution': expected an integer, got 'big'"),
    (lambda r: r["synthetic"].update(tiles_per_slide=True), r"'synthetic.tiles_per_slide': expected an integer"),
    (lambda r: r["data"].update(resolutoin=32), r"unknown key\(s\) data.resolutoin"),
    (lambda r: r.update(extra={}), r"unknown key\(s\) .extra"),
    (lambda r: r.pop("tracking"), r"missing key 'tracking'"),
    (lambda r: r["synthetic"].update(classes=["LUAD", "BRCA"]), r"unknown class\(es\) \['BRCA'\]; known: \["),
    (lambda r: r["synthetic"].update(classes="LUAD"), r"'synthetic.classes': expected a list"),
    (lambda r: r["split"].update(holdout_fraction=1.5), r"holdout_fraction' must lie in \(0, 1\)"),
    (lambda r: r["data"].update(root="elsewhere"), r"data.root \(elsewhere\) is not synthetic.output"),
])
def test_bad_params_are_named(tmp_path, edit, message):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(MediError, match=message):
        config.load(path)


def test_extra_classes_by_folder_name_and_overrides(tmp_path):
    cfg = config.load(REPO / "params.yaml", {"data.class_folders": {"BRCA": "Breast_invasive_carcinoma"},
                                             "data.classes": ["BRCA", "LUAD"], "data.source": "tcga_ut",
                                             "data.root": "data"})
    assert cfg.class_folders["BRCA"] == "Breast_invasive_carcinoma" and cfg.classes == ["BRCA", "LUAD"]


def test_params_hash_tracks_only_named_sections():
    a = config.load(REPO / "params.yaml")
    b = config.load(REPO / "params.yaml", {"split.seed": 99})
    assert a.params_hash("data") == b.params_hash("data")
    assert a.params_hash("split") != b.params_hash("split") and a.params_hash() != b.params_hash()


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(MediError, match="not valid YAML"):
        config.load(bad)
    with pytest.raises(MediError, match="params file not found"):
        config.load(tmp_path / "nope.yaml")
