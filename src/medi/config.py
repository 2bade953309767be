"""Typed configuration: `params.yaml` is read once, validated, and turned into frozen dataclasses.

Every key is required and checked against its declared type, so a missing, misspelt or malformed key
stops the run with a message naming the key and what was expected. Stages receive these objects; no
code below the CLI reads `params.yaml` again.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, get_args, get_origin

import yaml

from medi.errors import MediError

PROBE_METHODS = ("none", "real", "cls", "medi")

# Precision is named by its number format: "no" (accelerate's word for fp32) is a YAML 1.1 boolean unless quoted,
# and DVC (`dvc exp run -S`) rewrites params.yaml without those quotes. The old string "no" still reads as fp32;
# a boolean is refused with a message (it could be any of no / off / false). auto: fp32 or bf16, whichever runs
# faster here (timed at start on a CPU; bf16 where a GPU supports it), recorded with the results (medi.precision).
Precision = Literal["fp32", "fp16", "bf16", "auto"]
SamplerKind = Literal["ddim", "dpmsolver++"]         # diffusers schedulers for inference (medi.sampling)
GuidanceColour = Literal["conditional", "guided"]   # what guidance does to a tile's mean colour (sampling.guidance_conditions)
PRECISION_ALIASES = {"no": "fp32"}

# The 32 TCGA projects of TCGA-UT with their folder (zip) names in the Zenodo record: the seven of the paper's three
# probe tasks first. COAD and READ share one folder (TCGA-UT merged them): each slide's class there is its GDC
# project. Other folders can be added in params (`data.class_folders`).
COLON_RECTUM = "Colon_Rectum_adenocarcinoma"
TCGA_UT_FOLDERS: dict[str, str] = {
    "LUAD": "Lung_adenocarcinoma",
    "LUSC": "Lung_squamous_cell_carcinoma",
    "KIRC": "Kidney_renal_clear_cell_carcinoma",
    "KIRP": "Kidney_renal_papillary_cell_carcinoma",
    "KICH": "Kidney_Chromophobe",
    "UCEC": "Uterine_Corpus_Endometrial_Carcinoma",
    "UCS": "Uterine_Carcinosarcoma",
    "ACC": "Adrenocortical_carcinoma",
    "BLCA": "Bladder_Urothelial_Carcinoma",
    "BRCA": "Breast_invasive_carcinoma",
    "CESC": "Cervical_squamous_cell_carcinoma_and_endocervical_adenocarcinoma",
    "CHOL": "Cholangiocarcinoma",
    "COAD": COLON_RECTUM,
    "DLBC": "Lymphoid_Neoplasm_Diffuse_Large_B-cell_Lymphoma",
    "ESCA": "Esophageal_carcinoma",
    "GBM": "Glioblastoma_multiforme",
    "HNSC": "Head_and_Neck_squamous_cell_carcinoma",
    "LGG": "Brain_Lower_Grade_Glioma",
    "LIHC": "Liver_hepatocellular_carcinoma",
    "MESO": "Mesothelioma",
    "OV": "Ovarian_serous_cystadenocarcinoma",
    "PAAD": "Pancreatic_adenocarcinoma",
    "PCPG": "Pheochromocytoma_and_Paraganglioma",
    "PRAD": "Prostate_adenocarcinoma",
    "READ": COLON_RECTUM,
    "SARC": "Sarcoma",
    "SKCM": "Skin_Cutaneous_Melanoma",
    "STAD": "Stomach_adenocarcinoma",
    "TGCT": "Testicular_Germ_Cell_Tumors",
    "THCA": "Thyroid_carcinoma",
    "THYM": "Thymoma",
    "UVM": "Uveal_Melanoma",
}


@dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "tcga_ut"]
    root: str                    # holds tcga-ut/<Class>/<level>/<slide_barcode>/<tile>.jpg and gdc_metadata.csv
    level: str                   # level folder inside each class ("0" = 0.5 um/px)
    classes: list[str]           # classes to prepare from TCGA-UT (project codes, e.g. LUAD)
    class_folders: dict[str, str]  # extra project code -> TCGA-UT folder names beyond the built-in ones
    resolution: int              # training resolution of the packed tiles (px)
    on_bad_tile: Literal["error", "skip"]  # a corrupt / non-RGB tile stops the run, or is skipped and counted
    workers: int                 # decoding processes (0 = all cores)
    output: str                  # artifacts/dataset


@dataclass(frozen=True)
class SyntheticConfig:
    seed: int
    classes: list[str]
    slide_scale: float           # fraction of the real per-class slide counts
    site_scale: float            # fraction of the real per-class TSS counts (the largest sites are kept)
    tiles_per_slide: int
    tile_size: int               # px of the rendered JPEG tiles
    mpp: float                   # micrometres per pixel of the rendered tiles
    stain_strength: float        # how different the sites' stains are (0 = one standard stain)
    slide_jitter: float          # stain variation between slides of one site
    output: str
    figure: str                  # reports/synthetic_tiles.png (a second, counterfactual grid is written beside it)


@dataclass(frozen=True)
class SplitConfig:
    mode: Literal["paper", "random"]
    holdout_fraction: float
    key_columns: list[str]       # slide columns joined into the holdout key (paper: tss, gender, race)
    seed: int                    # mode random's draw, and the validation / test division of the holdout sites
    validation_fraction: float   # share of each class's holdout sites used for validation (the rest: test)
    output: str                  # artifacts/splits
    metrics: str                 # metrics/split.json
    figure: str                  # reports/dataset.png


@dataclass(frozen=True)
class ModelConfig:
    preset: Literal["tiny-cpu", "paper-128", "custom"]
    custom: dict[str, Any]       # UNet spec when preset is custom: block_out_channels, layers_per_block, attention, norm_num_groups
    variants: dict[str, list[str]]  # model name -> conditioning metadata attributes (cls: none; medi: [tss])
    continuous: list[str]        # attributes encoded sinusoidally (e.g. age); the others are categorical
    d_e: int                     # embedding size per metadata attribute; d_class = d_t - k * d_e
    embedding_split: Literal["d_e", "equal"]   # d_e: the paper's text (d_class = d_t - k * d_e); equal: the authors'
                                 # code (d_t split equally between the class and each attribute; d_e unused)
    class_dropout: float         # condition dropout (trains the null tokens for classifier-free guidance)
    attribute_dropout: float
    nested_dropout: bool         # attributes dropped whenever the class is (never an attribute without the class)
    conditioning: Literal["additive", "scale_shift"]   # additive (the paper's) | scale_shift (feature-wise modulation)
    metadata_route: Literal["embedding", "output"]     # embedding (the paper's) | output (modulates the output norm)
    site_pathway: Literal["embedding", "stain", "both"]  # the site as an embedding (the paper's), as its estimated
                                 # stain only (medi.stain), or both; models conditioned on the site only
    prediction_type: Literal["epsilon", "v_prediction", "sample"]
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
    rescale_zero_snr: bool       # rescale betas to zero terminal SNR (Lin et al. 2024)
    timesteps: int
    output: str                  # models/<name>/


@dataclass(frozen=True)
class TrainConfig:
    seed: int
    max_steps: int
    batch_size: int              # per optimizer step, summed over processes and accumulation
    grad_accumulation: int
    lr: float
    adam_betas: list[float]      # AdamW (beta1, beta2)
    warmup_steps: int            # linear warm-up steps of the cosine schedule (0: see warmup_fraction)
    warmup_fraction: float       # warm-up as a fraction of max_steps (the authors': 0.01); only one of the two is > 0
    weight_decay: float
    max_grad_norm: float
    snr_gamma: float             # min-SNR-gamma loss weighting (medi.train.snr_weights); 0 = the plain loss
    ema_decay: float             # EMA decay (the maximum decay when ema_warmup is on)
    ema_warmup: bool             # diffusers EMAModel warm-up: decay = 1 - (1 + step / inv_gamma) ** -power, capped
    ema_inv_gamma: float         # (used when ema_warmup is on)
    ema_power: float             # (used when ema_warmup is on)
    precision: Precision         # auto | fp32 | fp16 | bf16 (accelerate's mixed precision; fp32 = none)
    balanced: bool               # class-balanced sampling, weight 1 / count(class) as in the paper
    augment: bool                # random flips and 90-degree rotations (histology has no orientation)
    workers: int                 # data-loading processes
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int
    grid_every: int              # steps between sample grids logged to MLflow (0 = only at the end)
    grid_scheduler: SamplerKind  # sampler of those grids and of the stain check
    grid_steps: int              # its steps
    grid_seeds: int              # images (seeds) per (class, site) cell of those grids (the stain check's, too)
    grid_guidance: float         # classifier-free guidance scale for the grids and the stain check (1 = none)
    grid_metadata_guidance: float | None  # their metadata scale (as sample.metadata_guidance; None = grid_guidance)
    grid_guidance_colour: GuidanceColour  # their guidance's colour (as sample.guidance_colour)
    eval_every: int              # steps between evaluation hooks (FID curve); 0 = off
    figure: str                  # the last sample grid, e.g. reports/samples_{model}.png
    metrics: str                 # e.g. metrics/train_{model}.json (headline: steps, final loss, images/s)
    detail: str                  # e.g. reports/train_{model}_detail.json (and processes, the stain check's summary)
    plot: str                    # loss (and FID, KID) by step for `dvc plots`, e.g. reports/plots/train_{model}.csv


@dataclass(frozen=True)
class SampleConfig:
    scheduler: SamplerKind
    steps: int
    guidance: float              # classifier-free guidance scale (1 = plain conditional sampling, the paper's)
    metadata_guidance: float | None  # the metadata's own scale (compositional guidance; None = guidance: joint)
    guidance_colour: GuidanceColour  # conditional: guidance pushes structure, the mean colour stays the conditional's
                                     # prediction's | guided: the usual guidance (colour pushed too)
    colour_calibration: int      # stain pathway: the model's own tiles per class its H and E concentrations are
                                 # calibrated on, to the class's training tiles (medi.stain; 0 = off)
    strategy: Literal["match", "uniform", "grid", "explicit"]
    count: int                   # match / uniform: images in all (0 = as many as training tiles, the paper's FID setting)
    per_pair: int                # grid / explicit: images per (class, site) pair
    grid_classes: list[str]      # grid: classes ([] = every class)
    grid_sites: list[str]        # grid: training sites ([] = every training site)
    pairs: list[dict[str, str]]  # explicit: [{class: LUAD, tss: "05"}, ...] (any attribute of the model may be given)
    seed: int
    batch_size: int
    precision: Precision         # auto | fp32 | fp16 | bf16 (autocast)
    processes: int               # CPU processes splitting the batches of `medi sample` / `medi probe` (0 = one per core)
    output: str                  # samples/{model}


@dataclass(frozen=True)
class EncoderConfig:
    """An image encoder: the probe's (params `encoder`) and, under the FID's own key names, the FID network
    (`FidConfig.encoder`). One type, so both resolve, build and cache the same way (`embed.spec_of`)."""
    name: str                    # random:<timm name> (offline default) | uni | uni2-h | h-optimus-0 | phikon | timm:<name>
    weights: str                 # local weights file (required for pretrained encoders)
    input_size: int              # px the tiles are resized to (0 = the encoder's own)
    seed: int                    # random:<name>: initialisation seed
    batch_size: int
    cache: str                   # embeddings on disk, keyed by encoder and image content ("" = off)


@dataclass(frozen=True)
class FidConfig:
    extractor: str               # random:<timm name> (offline default) | inception-v3-compat | timm:<name> | an encoder preset
    weights: str                 # local weights file ("" = inception: the torch hub cache; timm: required)
    input_size: int              # timm extractors: input px (0 = the encoder's own)
    seed: int                    # random:<name>: initialisation seed
    batch_size: int
    min_count: int               # groups with fewer real or generated images are flagged, not reported as figures
    kid_subset_size: int
    kid_subsets: int
    curve_count: int             # images generated per point of the training FID curve (train.eval_every)
    stain_tiles: int             # synthetic data: generated tiles per (class, site) cell for the ground-truth stain check
    unseen_per_pair: int         # unseen-pairs evaluation (medi.unseen): images per (class, site) pair; 0 = off
    deconfounded_per_pair: int   # synthetic world: rendered tiles per (class, training site) that the deconfounded
                                 # classifiers of the unseen-pairs evaluation learn from (medi.unseen); 0 = off
    cache: str                   # features of real tiles, keyed by extractor and image bytes ("" = off)
    metrics: str                 # metrics/fid_{model}.json (headline figures: the contract)
    detail: str                  # reports/fid_{model}_detail.json (every figure, n per group, settings, unseen-pairs cells)
    plot: str                    # FID per class for `dvc plots`, e.g. reports/plots/fid_per_class_{model}.csv

    @property
    def encoder(self) -> EncoderConfig:
        """The FID network (extractor, weights, input_size, seed, batch_size, cache) as an encoder."""
        return EncoderConfig(self.extractor, self.weights, self.input_size, self.seed, self.batch_size, self.cache)


ProbeStrategy = Literal["grid", "unseen", "balanced", "uniform"]


@dataclass(frozen=True)
class ProbeConfig:
    tasks: dict[str, list[str]]  # task -> classes (the paper: nsclc, rcc, uterine)
    methods: list[str]           # none | real (extra real tiles of other training sites) | cls | medi
    models: dict[str, str]       # method -> the model whose samples it adds (cls: cls, medi: medi)
    real_per_class: int          # real tiles per class, from its one chosen training TSS
    ratio: float                 # extra tiles per real tile, for every arm but none (same count per class)
    strategy: ProbeStrategy      # how medi's tiles spread over (class, site) pairs (the paper's: grid)
    tuned_strategies: list[ProbeStrategy]   # medi_tuned: the one of these best on the validation sites ([] = off)
    runs: int                    # TSS combinations per task (0 = every combination; else a seeded random subset)
    seed: int
    generator_seeds: list[int]   # extra train.seed values: each model is also trained with these (models/NAME-seedS)
                                 # and the runs spread over all generators; [] = one generator per method
    pool_per_pair: int           # synthetic images per (model, class, TSS) pair (per class for CLS); pools grow to
                                 # ratio x real_per_class when that is more, so no run repeats an image
    C: float                     # inverse regularisation of the logistic regression
    max_iter: int
    scaler: bool                 # standardise embeddings before the regression (the authors' probe: false)
    bootstrap: int               # clustered-bootstrap worlds for the 95 % intervals
    workers: int                 # parallel runs (-1 = all cores)
    metrics: str                 # metrics/probe.json (test sites; the contract's full Table 1)
    headline: str                # metrics/table1: {task}.json, one row each in `dvc metrics show` (TSS-avg per
                                 # method, the medi-cls difference and its interval)
    detail: str                  # reports/probe_detail.json (validation figures, tuned strategy, draws, design)
    table: str                   # reports/probe.md
    figure: str                  # reports/probe.png


@dataclass(frozen=True)
class ReportConfig:
    models: list[str]            # models compared in the figures (the paper: cls and medi)
    site_classes: list[str]      # the real / CLS / MeDi site rows figure shows these classes (the paper: LUSC, LUAD)
    sites_per_class: int
    tiles_per_row: int
    fid_figure: str              # reports/fid_per_class.png (the paper's Figure 3)
    sites_figure: str            # reports/sites_real_cls_medi.png (the paper's Figure 4)
    index: str                   # reports/index.md: the one page to open after make repro
    probe_plot: str              # the probe's table (test sites) as rows for `dvc plots`: reports/plots/probe.csv


# What a sweep optimises: the probe's figures on the validation sites (tss_avg, overall, worst_tss, gain), the
# FID, or a figure of the unseen-pairs evaluation (`medi.unseen`, training sites only; stain rank and the
# deconfounded classifiers' accuracies: synthetic world).
Objective = Literal["tss_avg", "overall", "worst_tss", "gain", "fid",
                    "pairs_unseen_stain_rank", "pairs_unseen_site_accuracy", "pairs_unseen_class_accuracy",
                    "pairs_seen_stain_rank", "pairs_seen_site_accuracy", "pairs_seen_class_accuracy",
                    "pairs_deconf_unseen_site_accuracy", "pairs_deconf_unseen_class_accuracy",
                    "pairs_deconf_seen_site_accuracy", "pairs_deconf_seen_class_accuracy"]
PROBE_OBJECTIVES = ("tss_avg", "overall", "worst_tss", "gain")


@dataclass(frozen=True)
class SweepConfig:
    study: str                   # Optuna study name (one MLflow run of that name holds its trials)
    storage: str                 # Optuna RDB storage: sqlite:///optuna.db, or any SQLAlchemy URL (PostgreSQL, MySQL)
    trials: int                  # trials one `medi sweep` adds to the study (all its workers together)
    workers: int                 # worker processes `medi sweep` runs on the storage
    timeout: int                 # seconds before no new trial starts (0 = no limit)
    heartbeat: int               # seconds between a running trial's heartbeats in the storage
    grace_period: int            # seconds without a heartbeat after which a trial (its worker died) is failed
    seed: int
    sampler: Literal["tpe", "random", "grid"]
    pruner: Literal["quartile", "median", "none"]   # prune below the lower quartile / the median of earlier trials
    startup_trials: int          # trials before TPE models the space and before the pruner prunes
    objective: Objective | list[Objective]   # one figure, or several: a multi-objective study (its Pareto front)
    methods: list[str]           # one study per method (<study>-<method>), the same trials each: cls, medi
    fid_count: int               # images per FID recorded beside each trial (0 = none)
    space: dict[str, Any]        # dotted param -> [choices] or {low, high, step, log}
    output: str                  # artifacts/sweep: trial models, pools, FID records
    reports: str                 # reports/sweep: figures and the study table

    @property
    def objectives(self) -> tuple[str, ...]:
        """`objective` as a tuple (one name: a single-objective study)."""
        return tuple(self.objective) if isinstance(self.objective, list) else (self.objective,)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str                     # overridden by MLFLOW_TRACKING_URI when set
    experiment: str
    artifact_location: str       # where a new experiment stores artifacts (local store)


@dataclass(frozen=True)
class Config:
    data: DataConfig
    synthetic: SyntheticConfig
    split: SplitConfig
    model: ModelConfig
    train: TrainConfig
    sample: SampleConfig
    fid: FidConfig
    encoder: EncoderConfig
    probe: ProbeConfig
    report: ReportConfig
    sweep: SweepConfig
    tracking: TrackingConfig
    source_path: str = dataclasses.field(default="params.yaml", compare=False)

    def section_dict(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(getattr(self, name))

    def params_hash(self, *sections: str) -> str:
        """Stable short hash of the named sections (when none are named: all the pipeline's, i.e. not `sweep`)."""
        names = sections or tuple(f.name for f in dataclasses.fields(self) if f.name not in ("source_path", "sweep"))
        blob = json.dumps({n: self.section_dict(n) for n in names}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def class_folders(self) -> dict[str, str]:
        return {**TCGA_UT_FOLDERS, **self.data.class_folders}

    def variant(self, name: str) -> list[str]:
        """The conditioning attributes of model `name` (a key of model.variants)."""
        if name not in self.model.variants:
            raise MediError(f"unknown model '{name}'; params model.variants defines {sorted(self.model.variants)}")
        return self.model.variants[name]

    @property
    def classes(self) -> list[str]:
        """The classes of the active data source."""
        return self.synthetic.classes if self.data.source == "synthetic" else self.data.classes


def _check(value: Any, tp: Any, key: str, where: str) -> Any:
    """Validate `value` against the annotation `tp`; return it (ints are accepted for floats)."""
    origin = get_origin(tp)
    if tp is Any:  # free-form (validated by the code that uses it, e.g. a custom UNet spec)
        return value

    def fail(expected: str) -> typing.NoReturn:
        raise MediError(f"{where}: key '{key}': expected {expected}, got {value!r}")

    if origin is Literal:
        if tp is Precision and isinstance(value, bool):
            fail("one of 'fp32', 'fp16', 'bf16', 'auto' (a YAML boolean, e.g. an unquoted no: write fp32)")
        if tp is Precision:
            value = PRECISION_ALIASES.get(value, value)
        if value not in get_args(tp):
            fail("one of " + ", ".join(repr(a) for a in get_args(tp)))
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        lists = [a for a in arms if get_origin(a) is list]      # X | list[X]: a list is checked as the list
        arm = lists[0] if isinstance(value, list) and lists else next(a for a in arms if a not in lists)
        return _check(value, arm, key, where)
    if origin is list:
        if not isinstance(value, list):
            fail("a list")
        (item,) = get_args(tp)
        return [_check(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            fail("a mapping")
        k_tp, v_tp = get_args(tp)
        return {_check(k, k_tp, f"{key} (a key)", where): _check(v, v_tp, f"{key}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            fail("a string")
        return str(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, where)
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not bad input


def _build(cls: type, raw: Any, prefix: str, where: str) -> Any:
    if not isinstance(raw, dict):
        raise MediError(f"{where}: section '{prefix}': expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init and f.name != "source_path"]
    known = {f.name for f in fields}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise MediError(f"{where}: unknown key(s) {', '.join(f'{prefix}.{u}' for u in unknown)}; "
                        f"'{prefix}' takes: {', '.join(sorted(known))}")
    values = {}
    for f in fields:
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in raw:
            raise MediError(f"{where}: missing key '{key}' ({_describe(hints[f.name])})")
        values[f.name] = _check(raw[f.name], hints[f.name], key, where)
    return cls(**values)


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _at_least(where: str, minimum: float, values: dict[str, float]) -> None:
    """Stop at the first key whose value is below `minimum`, naming it."""
    for key, value in values.items():
        if value < minimum:
            raise MediError(f"{where}: '{key}' must be >= {minimum}, got {value}")


# UNet presets. paper-128 is the public MeDi code's model: six levels, 128-256-512-512-1024-1024 channels,
# two layers per block, no attention. tiny-cpu (~1M parameters) is what the default pipeline trains on a CPU.
UNET_PRESETS: dict[str, dict] = {
    "tiny-cpu": {"block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention": False, "norm_num_groups": 8},
    "paper-128": {"block_out_channels": [128, 256, 512, 512, 1024, 1024], "layers_per_block": 2, "attention": False,
                  "norm_num_groups": 32},
}
MIN_D_CLASS = 8                  # the class embedding's smallest width (model.d_e leaves d_t - k * d_e to it)


def time_embedding_width(block_out_channels: list[int]) -> int:
    """d_t, the width the condition vector shares with the time embedding: diffusers' 4 x the first channels."""
    return 4 * block_out_channels[0]

# The UNet spec `model.custom` gives when model.preset is custom (the fields of model.Architecture a preset fixes).
CUSTOM_UNET: dict[str, Any] = {"block_out_channels": list[int], "layers_per_block": int, "attention": bool,
                               "norm_num_groups": int}


def _check_custom_unet(spec: dict[str, Any], where: str) -> None:
    missing, unknown = [k for k in CUSTOM_UNET if k not in spec], sorted(set(spec) - set(CUSTOM_UNET))
    if missing or unknown:
        raise MediError(f"{where}: 'model.custom' (model.preset is 'custom') lacks {missing} and has unknown {unknown}; "
                        f"it takes {', '.join(CUSTOM_UNET)}")
    for key, tp in CUSTOM_UNET.items():
        _check(spec[key], tp, f"model.custom.{key}", where)
    channels = spec["block_out_channels"]
    if not channels:
        raise MediError(f"{where}: 'model.custom.block_out_channels' is empty; give the channels of each UNet level")
    _at_least(where, 1, {"model.custom.layers_per_block": spec["layers_per_block"],
                         "model.custom.norm_num_groups": spec["norm_num_groups"],
                         **{f"model.custom.block_out_channels[{i}]": c for i, c in enumerate(channels)}})
    if any(c % spec["norm_num_groups"] for c in channels):
        raise MediError(f"{where}: 'model.custom.norm_num_groups' ({spec['norm_num_groups']}) must divide every "
                        f"block_out_channels {channels}")


def _check_class_width(m: ModelConfig, where: str) -> None:
    """Each variant's class embedding keeps MIN_D_CLASS of d_t (4 x the first UNet channels) when its k attributes
    take d_e each (embedding_split d_e, attributes on the embedding route)."""
    if m.embedding_split != "d_e" or m.metadata_route != "embedding":
        return
    d_t = time_embedding_width((m.custom if m.preset == "custom" else UNET_PRESETS[m.preset])["block_out_channels"])
    for name, attributes in m.variants.items():
        k = len(attributes)
        if k and d_t - k * m.d_e < MIN_D_CLASS:
            raise MediError(f"{where}: 'model.d_e' = {m.d_e} with the {k} attribute(s) of variant '{name}' leaves "
                            f"d_class = {d_t - k * m.d_e} of d_t = {d_t} (model.preset {m.preset}); use "
                            f"model.d_e <= {(d_t - MIN_D_CLASS) // k}")


def _validate(cfg: Config, where: str) -> None:
    """Every cross-field rule of the params, section group by section group; the first broken one is raised."""
    for check in (_check_data, _check_model_and_training, _check_sampling_and_fid, _check_probe_and_sweep):
        check(cfg, where)


def _check_data(cfg: Config, where: str) -> None:
    """data, synthetic, split."""
    folders = cfg.class_folders
    for section, classes in (("data.classes", cfg.data.classes), ("synthetic.classes", cfg.synthetic.classes)):
        if not classes:
            raise MediError(f"{where}: '{section}' is empty; name at least two classes")
        unknown = [c for c in classes if c not in folders]
        if unknown:
            raise MediError(f"{where}: '{section}': unknown class(es) {unknown}; known: {sorted(folders)} "
                            "(add others with their TCGA-UT folder name under data.class_folders)")
        if len(set(classes)) != len(classes):
            raise MediError(f"{where}: '{section}' lists a class twice: {classes}")
    if not 0.0 < cfg.split.holdout_fraction < 1.0:
        raise MediError(f"{where}: 'split.holdout_fraction' must lie in (0, 1), got {cfg.split.holdout_fraction}")
    if not 0.0 < cfg.split.validation_fraction < 1.0:
        raise MediError(f"{where}: 'split.validation_fraction' must lie in (0, 1) (validation and test sites both "
                        f"needed), got {cfg.split.validation_fraction}")
    if cfg.data.source == "synthetic" and Path(cfg.data.root) != Path(cfg.synthetic.output):
        raise MediError(f"{where}: data.source is 'synthetic' but data.root ({cfg.data.root}) is not "
                        f"synthetic.output ({cfg.synthetic.output}); point data.root at the synthetic world")
    if cfg.data.resolution < 8 or cfg.data.resolution % 8:
        raise MediError(f"{where}: 'data.resolution' must be a multiple of 8 and >= 8, got {cfg.data.resolution}")
    for name, value in (("synthetic.slide_scale", cfg.synthetic.slide_scale),
                        ("synthetic.site_scale", cfg.synthetic.site_scale), ("synthetic.mpp", cfg.synthetic.mpp)):
        if value <= 0:
            raise MediError(f"{where}: '{name}' must be positive, got {value}")
    _at_least(where, 1, {"synthetic.tiles_per_slide": cfg.synthetic.tiles_per_slide})
    _at_least(where, 16, {"synthetic.tile_size": cfg.synthetic.tile_size})
    if not cfg.split.key_columns:
        raise MediError(f"{where}: 'split.key_columns' is empty")


def _check_model_and_training(cfg: Config, where: str) -> None:
    """model, train."""
    for name in ("class_dropout", "attribute_dropout"):
        if not 0.0 <= getattr(cfg.model, name) < 1.0:
            raise MediError(f"{where}: 'model.{name}' must lie in [0, 1), got {getattr(cfg.model, name)}")
    if not cfg.model.variants:
        raise MediError(f"{where}: 'model.variants' is empty; name at least one model, e.g. cls: [] and medi: [tss]")
    if cfg.model.preset == "custom":
        _check_custom_unet(cfg.model.custom, where)
    _check_class_width(cfg.model, where)
    t = cfg.train
    if len(t.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in t.adam_betas):
        raise MediError(f"{where}: 'train.adam_betas' must be two numbers in [0, 1), got {t.adam_betas}")
    if not 0.0 <= t.warmup_fraction < 1.0 or t.warmup_steps < 0 or (t.warmup_fraction > 0 and t.warmup_steps > 0):
        raise MediError(f"{where}: 'train.warmup_fraction' must lie in [0, 1) and 'train.warmup_steps' be >= 0, "
                        f"with at most one of them > 0; got {t.warmup_fraction} and {t.warmup_steps}")
    if t.snr_gamma < 0:
        raise MediError(f"{where}: 'train.snr_gamma' must be >= 0 (0 = the plain loss), got {t.snr_gamma}")
    if not 0.0 < t.ema_decay <= 1.0 or t.ema_inv_gamma <= 0 or t.ema_power <= 0:
        raise MediError(f"{where}: 'train.ema_decay' must lie in (0, 1] and 'train.ema_inv_gamma', 'train.ema_power' "
                        f"be > 0; got {t.ema_decay}, {t.ema_inv_gamma}, {t.ema_power}")
    _at_least(where, 1, {f"train.{k}": getattr(t, k) for k in ("max_steps", "batch_size", "grad_accumulation",
                                                               "checkpoint_every", "keep_checkpoints", "log_every",
                                                               "grid_steps", "grid_seeds")})
    if t.batch_size % t.grad_accumulation:
        raise MediError(f"{where}: 'train.batch_size' ({t.batch_size}) must be divisible by 'train.grad_accumulation' "
                        f"({t.grad_accumulation})")


def _check_sampling_and_fid(cfg: Config, where: str) -> None:
    """sample, fid."""
    smp = cfg.sample
    _at_least(where, 1, {f"sample.{k}": getattr(smp, k) for k in ("steps", "per_pair", "batch_size")})
    _at_least(where, 0, {"sample.count": smp.count, "sample.processes": smp.processes,
                         "sample.colour_calibration": smp.colour_calibration})
    if smp.guidance < 1.0:
        raise MediError(f"{where}: 'sample.guidance' must be >= 1 (1 = no classifier-free guidance), got {smp.guidance}")
    for key, value in (("sample.metadata_guidance", smp.metadata_guidance),
                       ("train.grid_metadata_guidance", cfg.train.grid_metadata_guidance)):
        if value is not None and value < 0.0:
            raise MediError(f"{where}: '{key}' must be >= 0 (0 = the metadata ignored, 1 = unguided), got {value}")
    if smp.strategy == "explicit" and not smp.pairs:
        raise MediError(f"{where}: sample.strategy is 'explicit' but 'sample.pairs' is empty")
    for i, pair in enumerate(smp.pairs):
        if "class" not in pair:
            raise MediError(f"{where}: 'sample.pairs[{i}]' has no 'class': {pair}")
    f = cfg.fid
    _at_least(where, 1, {f"fid.{k}": getattr(f, k) for k in ("batch_size", "min_count", "kid_subset_size", "kid_subsets",
                                                             "curve_count", "stain_tiles")})
    _at_least(where, 0, {"fid.input_size": f.input_size, "fid.unseen_per_pair": f.unseen_per_pair,
                         "fid.deconfounded_per_pair": f.deconfounded_per_pair})


def _check_probe_and_sweep(cfg: Config, where: str) -> None:
    """probe, encoder, sweep, report."""
    pr = cfg.probe
    bad = [m for m in pr.methods if m not in PROBE_METHODS]
    if bad or not pr.methods or len(set(pr.methods)) != len(pr.methods):
        raise MediError(f"{where}: 'probe.methods' must list some of {', '.join(PROBE_METHODS)} once each; got {pr.methods}")
    for method in pr.methods:
        if method not in ("none", "real") and pr.models.get(method) not in cfg.model.variants:
            raise MediError(f"{where}: 'probe.models.{method}' must name a model of model.variants "
                            f"({sorted(cfg.model.variants)}), got {pr.models.get(method)!r}")
    _at_least(where, 1, {"probe.real_per_class": pr.real_per_class, "probe.pool_per_pair": pr.pool_per_pair,
                         "probe.max_iter": pr.max_iter, "encoder.batch_size": cfg.encoder.batch_size})
    _at_least(where, 0, {"probe.ratio": pr.ratio, "probe.runs": pr.runs, "probe.bootstrap": pr.bootstrap})
    if not pr.tasks:
        raise MediError(f"{where}: 'probe.tasks' is empty; name at least one task, e.g. nsclc: [LUAD, LUSC]")
    if 0 < pr.bootstrap < 100:
        raise MediError(f"{where}: 'probe.bootstrap' must be 0 (no intervals) or >= 100 worlds for a 95 % interval, "
                        f"got {pr.bootstrap}")
    if len(set(pr.generator_seeds)) != len(pr.generator_seeds) or cfg.train.seed in pr.generator_seeds:
        raise MediError(f"{where}: 'probe.generator_seeds' must list distinct seeds other than train.seed "
                        f"({cfg.train.seed}, the pipeline's models), got {pr.generator_seeds}")
    if len(set(pr.tuned_strategies)) != len(pr.tuned_strategies):
        raise MediError(f"{where}: 'probe.tuned_strategies' lists a strategy twice: {pr.tuned_strategies}")
    for task, classes in pr.tasks.items():
        if len(classes) < 2:
            raise MediError(f"{where}: 'probe.tasks.{task}' needs at least two classes, got {classes}")
    sw = cfg.sweep
    _at_least(where, 1, {"sweep.trials": sw.trials, "sweep.workers": sw.workers, "sweep.heartbeat": sw.heartbeat})
    _at_least(where, 0, {"sweep.timeout": sw.timeout, "sweep.startup_trials": sw.startup_trials,
                         "sweep.fid_count": sw.fid_count})
    if sw.grace_period <= sw.heartbeat:
        raise MediError(f"{where}: 'sweep.grace_period' ({sw.grace_period}) must be longer than 'sweep.heartbeat' "
                        f"({sw.heartbeat})")
    objectives = sw.objectives
    if not objectives or len(set(objectives)) != len(objectives):
        raise MediError(f"{where}: 'sweep.objective' must name one figure, or a list of distinct figures, "
                        f"got {sw.objective}")
    imaged = [o for o in objectives if o not in PROBE_OBJECTIVES]        # fid and the unseen pairs sample images
    if imaged and sw.fid_count < 2:
        raise MediError(f"{where}: sweep.objective is {imaged[0]!r} but sweep.fid_count is {sw.fid_count}; give it "
                        f"images (e.g. 256)")
    pairs = [o for o in objectives if o.startswith("pairs_")]
    if pairs and cfg.fid.unseen_per_pair < 1:
        raise MediError(f"{where}: sweep.objective is {pairs[0]!r}, a figure of the unseen-pairs evaluation, but "
                        f"fid.unseen_per_pair is 0; give it images per pair (e.g. 4)")
    deconfounded = [o for o in objectives if o.startswith("pairs_deconf_")]
    synthetic = [o for o in objectives if o.endswith("stain_rank") or o in deconfounded]
    if synthetic and cfg.data.source != "synthetic":
        raise MediError(f"{where}: sweep.objective names {synthetic[0]!r}, which needs the synthetic world's ground "
                        f"truth; data.source is {cfg.data.source!r} (use the site or class accuracy)")
    if deconfounded and cfg.fid.deconfounded_per_pair < 1:
        raise MediError(f"{where}: sweep.objective names the deconfounded classifiers' accuracy, but "
                        f"fid.deconfounded_per_pair is 0; give them rendered tiles per pair (e.g. 3)")
    if len(objectives) > 1 and sw.pruner != "none":
        raise MediError(f"{where}: sweep.pruner {sw.pruner!r} prunes on one running objective; a study of several "
                        f"objectives ({', '.join(objectives)}) cannot prune: set sweep.pruner: none")
    bad = [m for m in sw.methods if m not in pr.models]
    if not sw.methods or bad or len(set(sw.methods)) != len(sw.methods):
        raise MediError(f"{where}: 'sweep.methods' must list probe methods with a model (keys of probe.models: "
                        f"{', '.join(pr.models)}) once each, got {sw.methods}")
    unknown = [m for m in cfg.report.models if m not in cfg.model.variants]
    if unknown:
        raise MediError(f"{where}: 'report.models' names {unknown}, which are not in model.variants "
                        f"({sorted(cfg.model.variants)})")


def from_dict(raw: Any, where: str = "params") -> Config:
    cfg = _build(Config, raw, "", where)
    cfg = dataclasses.replace(cfg, source_path=where)
    _validate(cfg, where)
    return cfg


def set_dotted(raw: dict[str, Any], overrides: Mapping[str, Any], where: str, label: str = "") -> dict[str, Any]:
    """`raw` params with {"section.key": value} (or deeper, "model.custom.layers") set: the one place a dotted
    override is applied (`--set`, a sweep trial, `override`). Missing sections along the path are made; a value
    addressed as a section is an error naming the key. Validation is `from_dict`'s, afterwards."""
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        if not all(parents) or not leaf:
            raise MediError(f"{where}: {label}'{dotted}' is not a param; params are section.key")
        node = raw
        for i, part in enumerate(parents):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise MediError(f"{where}: {label}{dotted}: '{'.'.join(parents[:i + 1])}' is a value ({node!r}), "
                                "not a section")
        node[leaf] = value
    return raw


def override(cfg: Config, overrides: dict[str, Any], where: str = "") -> Config:
    """A validated copy of `cfg` with {"section.key": value} replaced (a sweep trial's config)."""
    raw = {f.name: cfg.section_dict(f.name) for f in dataclasses.fields(cfg) if f.name != "source_path"}
    where = where or cfg.source_path
    unknown = [d for d in overrides if d.partition(".")[0] not in raw]
    if unknown:
        raise MediError(f"{where}: '{unknown[0]}' is not a param; params are section.key with section one of "
                        f"{', '.join(raw)}")
    return dataclasses.replace(from_dict(set_dotted(raw, overrides, where), where), source_path=cfg.source_path)


def generator_name(name: str, seed: int) -> str:
    """The model trained like `name` but with train.seed = `seed` (a generator of probe.generator_seeds)."""
    return f"{name}-seed{seed}"


def with_generator(cfg: Config, name: str, seed: int) -> tuple[Config, str]:
    """Params and model name that train `name` with train.seed = `seed` into models/NAME-seedSEED (its
    metrics, figure and checkpoints named alike)."""
    alias = generator_name(name, seed)
    variants = {**cfg.model.variants, alias: cfg.variant(name)}
    return override(cfg, {"train.seed": seed, "model.variants": variants, "probe.generator_seeds": []}), alias


def load(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a params file; `overrides` ({"section.key": value}) win over the file."""
    path = Path(path)
    if not path.exists():
        raise MediError(f"params file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MediError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise MediError(f"{path}: expected a mapping of sections (data, synthetic, ...), got "
                        f"{'an empty file' if raw is None else type(raw).__name__}")
    return from_dict(set_dotted(raw, overrides or {}, str(path), label="--set "), str(path))
