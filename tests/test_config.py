"""params.yaml -> typed config: every bad key is named."""
from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from medi import cli, config
from medi.errors import MediError
from conftest import REPO


def test_repo_params_load_every_key_as_written():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    cfg = config.load(REPO / "params.yaml")
    assert {name: cfg.section_dict(name) for name in raw} == raw          # nothing dropped, renamed or altered
    assert type(cfg.synthetic.mpp) is float and type(cfg.train.lr) is float   # numbers typed as declared
    assert cfg.source_path == str(REPO / "params.yaml")


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["split"].pop("seed"), r"missing key 'split.seed'"),
    (lambda r: r["split"].update(mode="stratified"), r"key 'split.mode': expected one of 'paper', 'random', got 'stratified'"),
    (lambda r: r["data"].update(resolution="big"), r"key 'data.resolution': expected an integer, got 'big'"),
    (lambda r: r["synthetic"].update(tiles_per_slide=True), r"'synthetic.tiles_per_slide': expected an integer"),
    (lambda r: r["data"].update(resolutoin=32), r"unknown key\(s\) data.resolutoin"),
    (lambda r: r.update(extra={}), r"unknown key\(s\) .extra"),
    (lambda r: r.pop("tracking"), r"missing key 'tracking'"),
    (lambda r: r["synthetic"].update(classes=["LUAD", "XYZ"]), r"unknown class\(es\) \['XYZ'\]; known: \["),
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


def test_params_read_the_same_after_dvc_rewrites_them(tmp_path):
    """`dvc exp run -S KEY=VALUE` rewrites params.yaml with ruamel (YAML 1.2), which drops quotes YAML 1.1 needs:
    an unquoted `no` then reads as false. Every value of params.yaml must read the same after that rewrite."""
    from dvc.utils.serialize import modify_yaml

    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    with modify_yaml(path) as raw:
        raw["model"]["d_e"] = 8
    assert config.load(path) == config.load(REPO / "params.yaml", {"model.d_e": 8})


@pytest.mark.parametrize("written, read", [("fp32", "fp32"), ('"no"', "fp32"), ("bf16", "bf16")])
def test_precision_is_named_fp32_and_the_old_quoted_no_still_reads(written, read):
    cfg = config.load(REPO / "params.yaml", cli.parse_overrides([f"train.precision={written}",
                                                                 f"sample.precision={written}"]))
    assert cfg.train.precision == cfg.sample.precision == read


def test_overrides_win_over_the_file_and_change_nothing_else():
    base = config.load(REPO / "params.yaml")
    cfg = config.load(REPO / "params.yaml", {"data.class_folders.BRCA": "Breast_invasive_carcinoma",
                                             "data.classes": ["BRCA", "LUAD"], "data.source": "tcga_ut",
                                             "data.root": "data"})
    assert cfg.class_folders == {**config.TCGA_UT_FOLDERS, "BRCA": "Breast_invasive_carcinoma"}
    assert cfg.classes == ["BRCA", "LUAD"]                            # the real data's classes now, not synthetic's
    assert dataclasses.replace(cfg.data, class_folders={}, classes=base.data.classes, source="synthetic",
                               root=base.data.root) == base.data
    assert all(getattr(cfg, f.name) == getattr(base, f.name) for f in dataclasses.fields(cfg) if f.name != "data")


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


# Every check of config._validate (and the parse errors around it), through the CLI: `medi check` exits with
# status 2 and one line naming the key.
SEVEN = ("max_steps", "batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "grid_steps", "grid_seeds")
BAD_PARAMS = [
    (["train.precision=no"], "train.precision", r"key 'train.precision': expected one of 'fp32', 'fp16', 'bf16', 'auto' \(a "
     r"YAML boolean, e.g. an unquoted no: write fp32\), got False"),
    (["sample.precision=off"], "sample.precision", r"'sample.precision': expected one of 'fp32', .* got False"),
    (["train.precision=fp8"], "train.precision", r"key 'train.precision': expected one of 'fp32', 'fp16', 'bf16', 'auto', "
                                                 r"got 'fp8'"),
    (["data.resolution=big"], "data.resolution", r"key 'data.resolution': expected an integer, got 'big'"),
    (["data.resolutoin=32"], "data.resolutoin", r"unknown key\(s\) data.resolutoin; 'data' takes: class_folders, classes, "),
    (["data=1"], "data", r"section 'data': expected a mapping, got 1"),
    (["data.resolution.x=1"], "data.resolution", r"--set data.resolution.x: 'data.resolution' is a value \(32\), not a "
                                                 r"section"),
    (["data.classes=[]"], "data.classes", r"'data.classes' is empty; name at least two classes"),
    (["synthetic.classes=[]"], "synthetic.classes", r"'synthetic.classes' is empty"),
    (["data.classes=[LUAD, XYZ]"], "data.classes", r"'data.classes': unknown class\(es\) \['XYZ'\]; known: \["),
    (["data.classes=[KIRC, KIRC]"], "data.classes", r"'data.classes' lists a class twice: \['KIRC', 'KIRC'\]"),
    (["synthetic.classes=[LUAD, LUSC, LUAD]"], "synthetic.classes", r"'synthetic.classes' lists a class twice"),
    (["split.holdout_fraction=0"], "split.holdout_fraction", r"'split.holdout_fraction' must lie in \(0, 1\), got 0.0"),
    (["data.root=elsewhere"], "data.root", r"data.source is 'synthetic' but data.root \(elsewhere\) is not "
                                           r"synthetic.output \(artifacts/synthetic\)"),
    (["data.resolution=12"], "data.resolution", r"'data.resolution' must be a multiple of 8 and >= 8, got 12"),
    (["data.resolution=0"], "data.resolution", r"'data.resolution' must be a multiple of 8 and >= 8, got 0"),
    (["synthetic.slide_scale=0"], "synthetic.slide_scale", r"'synthetic.slide_scale' must be positive, got 0.0"),
    (["synthetic.site_scale=-0.5"], "synthetic.site_scale", r"'synthetic.site_scale' must be positive, got -0.5"),
    (["synthetic.mpp=0"], "synthetic.mpp", r"'synthetic.mpp' must be positive, got 0.0"),
    (["synthetic.tiles_per_slide=0"], "synthetic.tiles_per_slide", r"'synthetic.tiles_per_slide' must be >= 1, got 0"),
    (["synthetic.tile_size=8"], "synthetic.tile_size", r"'synthetic.tile_size' must be >= 16, got 8"),
    (["model.class_dropout=1.0"], "model.class_dropout", r"'model.class_dropout' must lie in \[0, 1\), got 1.0"),
    (["model.attribute_dropout=-0.1"], "model.attribute_dropout", r"'model.attribute_dropout' must lie in \[0, 1\)"),
    (["model.variants={}"], "model.variants", r"'model.variants' is empty; name at least one model"),
    (["model.preset=custom", "model.custom={block_out_channels: [32, 64]}"], "model.custom",
     r"'model.custom' \(model.preset is 'custom'\) lacks \['layers_per_block', 'attention', 'norm_num_groups'\] and "
     r"has unknown \[\]; it takes block_out_channels, layers_per_block, attention, norm_num_groups"),
    (["model.preset=custom", "model.custom.dropout=0.1"], "model.custom", r"lacks \[\] and has unknown \['dropout'\]"),
    (["model.preset=custom", "model.custom.layers_per_block=two"], "model.custom.layers_per_block",
     r"key 'model.custom.layers_per_block': expected an integer, got 'two'"),
    (["model.preset=custom", "model.custom.block_out_channels=[]"], "model.custom.block_out_channels",
     r"'model.custom.block_out_channels' is empty"),
    (["model.preset=custom", "model.custom.block_out_channels=[64, 0]"], "model.custom.block_out_channels[1]",
     r"'model.custom.block_out_channels\[1\]' must be >= 1, got 0"),
    (["model.preset=custom", "model.custom.layers_per_block=0"], "model.custom.layers_per_block",
     r"'model.custom.layers_per_block' must be >= 1, got 0"),
    (["model.preset=custom", "model.custom.norm_num_groups=48"], "model.custom.norm_num_groups",
     r"'model.custom.norm_num_groups' \(48\) must divide every block_out_channels \[64, 128, 128, 256\]"),
    (["model.d_e=31", "model.variants={medi: [tss, race, gender, age]}"], "model.d_e",
     r"'model.d_e' = 31 with the 4 attribute\(s\) of variant 'medi' leaves d_class = 4 of d_t = 128 \(model.preset "
     r"tiny-cpu\); use model.d_e <= 30"),
    (["train.grad_accumulation=0"], "train.grad_accumulation", r"'train.grad_accumulation' must be >= 1, got 0"),
    (["train.grad_accumulation=3"], "train.batch_size",
     r"'train.batch_size' \(32\) must be divisible by 'train.grad_accumulation' \(3\)"),
    *[([f"train.{k}=0"], f"train.{k}", rf"'train.{k}' must be >= 1, got 0") for k in SEVEN],
    (["split.key_columns=[]"], "split.key_columns", r"'split.key_columns' is empty"),
    *[([f"sample.{k}=0"], f"sample.{k}", rf"'sample.{k}' must be >= 1, got 0") for k in ("steps", "per_pair", "batch_size")],
    (["sample.count=-1"], "sample.count", r"'sample.count' must be >= 0, got -1"),
    (["sample.guidance=0.5"], "sample.guidance", r"'sample.guidance' must be >= 1 \(1 = no classifier-free guidance\), "
                                                 r"got 0.5"),
    *[([f"{k}=-1"], k, rf"'{k}' must be >= 0 \(0 = the metadata ignored, 1 = unguided\), got -1.0")
      for k in ("sample.metadata_guidance", "train.grid_metadata_guidance")],
    (["model.conditioning=film"], "model.conditioning",
     r"key 'model.conditioning': expected one of 'additive', 'scale_shift', got 'film'"),
    (["model.metadata_route=attention"], "model.metadata_route",
     r"key 'model.metadata_route': expected one of 'embedding', 'output', got 'attention'"),
    (["model.site_pathway=colour"], "model.site_pathway",
     r"key 'model.site_pathway': expected one of 'embedding', 'stain', 'both', got 'colour'"),
    (["sample.strategy=explicit"], "sample.pairs", r"sample.strategy is 'explicit' but 'sample.pairs' is empty"),
    (["sample.pairs=[{tss: '05'}]"], "sample.pairs[0]", r"'sample.pairs\[0\]' has no 'class': \{'tss': '05'\}"),
    *[([f"fid.{k}=0"], f"fid.{k}", rf"'fid.{k}' must be >= 1, got 0")
      for k in ("batch_size", "min_count", "kid_subset_size", "kid_subsets", "curve_count", "stain_tiles")],
    (["fid.input_size=-1"], "fid.input_size", r"'fid.input_size' must be >= 0, got -1"),
    (["fid.unseen_per_pair=-1"], "fid.unseen_per_pair", r"'fid.unseen_per_pair' must be >= 0, got -1"),
    (["probe.methods=[none, foo]"], "probe.methods", r"'probe.methods' must list some of none, real, cls, medi once "
     r"each; got \['none', 'foo'\]"),
    (["probe.methods=[]"], "probe.methods", r"'probe.methods' must list some of none, real, cls, medi once each; got \[\]"),
    (["probe.methods=[cls, cls]"], "probe.methods", r"once each; got \['cls', 'cls'\]"),
    (["probe.models={cls: cls}"], "probe.models.medi", r"'probe.models.medi' must name a model of model.variants "
                                                       r"\(\['cls', 'medi'\]\), got None"),
    (["probe.real_per_class=0"], "probe.real_per_class", r"'probe.real_per_class' must be >= 1, got 0"),
    (["probe.pool_per_pair=0"], "probe.pool_per_pair", r"'probe.pool_per_pair' must be >= 1, got 0"),
    (["encoder.batch_size=0"], "encoder.batch_size", r"'encoder.batch_size' must be >= 1, got 0"),
    (["probe.ratio=-1"], "probe.ratio", r"'probe.ratio' must be >= 0, got -1.0"),
    (["probe.runs=-1"], "probe.runs", r"'probe.runs' must be >= 0, got -1"),
    (["probe.tasks={}"], "probe.tasks", r"'probe.tasks' is empty; name at least one task"),
    (["probe.tasks={nsclc: [LUAD]}"], "probe.tasks.nsclc", r"'probe.tasks.nsclc' needs at least two classes, got "
                                                           r"\['LUAD'\]"),
    (["sweep.trials=0"], "sweep.trials", r"'sweep.trials' must be >= 1, got 0"),
    (["sweep.workers=0"], "sweep.workers", r"'sweep.workers' must be >= 1, got 0"),
    *[([f"sweep.{k}=-1"], f"sweep.{k}", rf"'sweep.{k}' must be >= 0, got -1") for k in ("timeout", "startup_trials",
                                                                                          "fid_count")],
    (["sweep.objective=fid", "sweep.fid_count=0"], "sweep.fid_count", r"sweep.objective is 'fid' but sweep.fid_count "
                                                                      r"is 0; give it images"),
    (["sweep.objective=[pairs_unseen_stain_rank]", "sweep.fid_count=0"], "sweep.fid_count",
     r"sweep.objective is 'pairs_unseen_stain_rank' but sweep.fid_count is 0; give it images"),
    (["sweep.objective=[tss_avg, tss_avg]"], "sweep.objective", r"must name one figure, or a list of distinct figures, "
                                                               r"got \['tss_avg', 'tss_avg'\]"),
    (["sweep.objective=[]"], "sweep.objective", r"must name one figure, or a list of distinct figures, got \[\]"),
    (["sweep.objective=[tss_avg, stain]"], "sweep.objective[1]", r"expected one of 'tss_avg'.*got 'stain'"),
    (["sweep.objective=pairs_unseen_class_accuracy", "fid.unseen_per_pair=0"], "fid.unseen_per_pair",
     r"a figure of the unseen-pairs evaluation, but fid.unseen_per_pair is 0"),
    (["sweep.objective=pairs_seen_stain_rank", "data.source=tcga_ut"], "sweep.objective",
     r"names 'pairs_seen_stain_rank', which needs the synthetic world's ground truth; data.source is 'tcga_ut'"),
    (["sweep.objective=[pairs_deconf_unseen_site_accuracy]", "fid.deconfounded_per_pair=0"],
     "fid.deconfounded_per_pair", r"names the deconfounded classifiers' accuracy, but fid.deconfounded_per_pair is 0"),
    (["fid.deconfounded_per_pair=-1"], "fid.deconfounded_per_pair", r"'fid.deconfounded_per_pair' must be >= 0, got -1"),
    (["sweep.objective=[pairs_unseen_stain_rank, pairs_unseen_class_accuracy]"], "sweep.pruner",
     r"sweep.pruner 'quartile' prunes on one running objective; a study of several objectives .* cannot prune: set "
     r"sweep.pruner: none"),
    (["sweep.methods=[none]"], "sweep.methods", r"'sweep.methods' must list probe methods with a model \(keys of "
     r"probe.models: cls, medi\) once each, got \['none'\]"),
    (["sweep.methods=[]"], "sweep.methods", r"'sweep.methods' must list probe methods with a model .* got \[\]"),
    (["sweep.methods=[medi, medi]"], "sweep.methods", r"once each, got \['medi', 'medi'\]"),
    (["sweep.heartbeat=0"], "sweep.heartbeat", r"'sweep.heartbeat' must be >= 1, got 0"),
    (["sweep.grace_period=5", "sweep.heartbeat=10"], "sweep.grace_period",
     r"'sweep.grace_period' \(5\) must be longer than 'sweep.heartbeat' \(10\)"),
    (["split.validation_fraction=1"], "split.validation_fraction",
     r"'split.validation_fraction' must lie in \(0, 1\) \(validation and test sites both needed\), got 1.0"),
    (["train.adam_betas=[0.9]"], "train.adam_betas", r"'train.adam_betas' must be two numbers in \[0, 1\), got \[0.9\]"),
    (["train.adam_betas=[0.9, 1.0]"], "train.adam_betas", r"must be two numbers in \[0, 1\), got \[0.9, 1.0\]"),
    (["train.warmup_fraction=0.1", "train.warmup_steps=5"], "train.warmup_fraction",
     r"with at most one of them > 0; got 0.1 and 5"),
    (["train.warmup_fraction=1.0", "train.warmup_steps=0"], "train.warmup_fraction", r"must lie in \[0, 1\).* got 1.0 and 0"),
    (["train.ema_decay=0"], "train.ema_decay", r"'train.ema_decay' must lie in \(0, 1\] and 'train.ema_inv_gamma', "
     r"'train.ema_power' be > 0; got 0.0, "),
    (["train.ema_power=0"], "train.ema_power", r"be > 0; got .*, 0.0$"),
    (["train.snr_gamma=-1"], "train.snr_gamma", r"'train.snr_gamma' must be >= 0 \(0 = the plain loss\), got -1.0"),
    (["probe.max_iter=0"], "probe.max_iter", r"'probe.max_iter' must be >= 1, got 0"),
    (["probe.bootstrap=-1"], "probe.bootstrap", r"'probe.bootstrap' must be >= 0, got -1"),
    (["probe.bootstrap=50"], "probe.bootstrap", r"'probe.bootstrap' must be 0 \(no intervals\) or >= 100 worlds .*got 50"),
    (["probe.generator_seeds=[1, 1]"], "probe.generator_seeds", r"'probe.generator_seeds' must list distinct seeds "
     r"other than train.seed \(0, the pipeline's models\), got \[1, 1\]"),
    (["probe.generator_seeds=[0, 1]"], "probe.generator_seeds", r"other than train.seed \(0, .*got \[0, 1\]"),
    (["probe.tuned_strategies=[grid, grid]"], "probe.tuned_strategies",
     r"'probe.tuned_strategies' lists a strategy twice: \['grid', 'grid'\]"),
    (["report.models=[cls, foo]"], "report.models", r"'report.models' names \['foo'\], which are not in model.variants"),
]


@pytest.mark.parametrize("sets, key, message", BAD_PARAMS, ids=[" ".join(s) for s, _, _ in BAD_PARAMS])
def test_bad_input_is_one_line_naming_the_key_and_exit_2(capsys, sets, key, message):
    code = cli.main(["--params", str(REPO / "params.yaml"), *[a for s in sets for a in ("--set", s)], "check"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"medi check: error: {REPO / 'params.yaml'}: ")
    assert key in err and re.search(message, err), err


@pytest.mark.parametrize("text, got", [("", "an empty file"), ("# only a comment\n", "an empty file"),
                                       ("- data\n- model\n", "list")])
def test_a_params_file_that_is_no_mapping_is_named_with_or_without_overrides(tmp_path, capsys, text, got):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    for sets in ([], ["--set", "data.resolution=16"]):
        assert cli.main(["--params", str(path), *sets, "check"]) == 2
        assert capsys.readouterr().err == (f"medi check: error: {path}: expected a mapping of sections (data, synthetic, "
                                           f"...), got {got}\n")


def test_the_matrix_reaches_every_check_of_validate():
    """Each `raise` of config._validate and of the helpers it calls is where a row of BAD_PARAMS stops."""
    import ast
    import inspect

    checks = (config._check_data, config._check_model_and_training, config._check_sampling_and_fid,
              config._check_probe_and_sweep, config._at_least, config._check_custom_unet, config._check_class_width)
    reached = set()
    for sets, _, _ in BAD_PARAMS:
        with pytest.raises(MediError) as err:
            config.load(REPO / "params.yaml", cli.parse_overrides(sets))
        frame = err.tb.tb_next
        while frame.tb_next is not None:                          # the frame that raised
            frame = frame.tb_next
        reached.add((frame.tb_frame.f_code.co_name, frame.tb_lineno))
    raises = set()
    for fn in checks:
        start = inspect.getsourcelines(fn)[1]
        raises |= {(fn.__name__, start + node.lineno - 1) for node in ast.walk(ast.parse(inspect.getsource(fn)))
                   if isinstance(node, ast.Raise)}
    assert raises <= reached, sorted(raises - reached)


def test_the_class_width_rule_is_checked_in_params_and_the_sweep_space_refuses_it_before_any_trial():
    from medi import space

    cfg = config.load(REPO / "params.yaml")                       # tiny-cpu: d_t = 128; medi has one attribute
    assert config.override(cfg, {"model.d_e": 120}).model.d_e == 120          # d_class = 8: the least allowed
    for other in ({"model.embedding_split": "equal"}, {"model.metadata_route": "output"}):
        assert config.override(cfg, {"model.d_e": 121, **other}).model.d_e == 121   # d_e does not take d_t there
    with pytest.raises(MediError, match=r"sweep.space \(model.d_e: 121\).*leaves d_class = 7 of d_t = 128"):
        space.parse_space(config.override(cfg, {"sweep.space": {"model.d_e": {"low": 8, "high": 121}}}), "medi")
