"""Fidelity measurement, the library the `fid` stage, the training curve, the unseen-pairs evaluation and the
sweep share: feature extractors (torch-fidelity's Inception, or any `medi.embed` encoder registered with
torch-fidelity), FID / KID overall and per group, the class and site classifiers of conditioning accuracy, the
ground-truth stain check, and a quick score of a model (`MatchScore`).

- **One preprocessing path.** Real and generated images reach the feature extractor the same way: uint8
  RGB at the training resolution (real: the training split's tiles as `prepare` packed them, i.e. the
  JPEG decoded and Lanczos-resized; generated: the lossless PNGs of `medi sample`); the extractor then
  resizes them itself (Inception: torch-fidelity's TensorFlow-compatible bilinear resize to 299 px;
  timm encoders: `medi.embed.preprocess`).
- **Extractors** (params `fid.extractor`): `inception-v3-compat` (torch-fidelity's Inception, the
  published-FID feature space, from a local weights file), any timm encoder of `medi.embed` registered
  with torch-fidelity (a Frechet distance in a pathology encoder's space), and the offline default
  `random:resnet18`, an untrained seeded network, named as such in every output.
- **Statistics from torch-fidelity.** FID and KID of every group come from torch-fidelity's own functions on
  features extracted once per image set. Every group reports its n; groups with fewer than `fid.min_count`
  real or generated images are listed apart (`below_min_count`).
- **Conditioning accuracy.** Logistic regressions fitted on the real training tiles' features predict
  class and site; applied to generated tiles, they say how often a tile shows the class (and site) it was
  conditioned on. Their cross-validated accuracy on real tiles (folds by slide) is the ceiling to read it
  against. On the synthetic world, the stain of each (class, site) group is also compared with the site's
  true stain (`medi.groundtruth`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from medi import distributed, embed, features
from medi.config import Config, EncoderConfig, FidConfig
from medi.errors import MediError
from medi.sampling import Sampler, conditions_of, generate, plan

log = logging.getLogger(__name__)

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
TIMM_EXTRACTOR = "medi-timm"
PREPROCESSING = ("real: training-split tiles as packed by prepare (JPEG decoded, Lanczos to data.resolution); generated: "
                 "lossless PNG at the same resolution; both uint8 RGB into the extractor, which resizes them itself")


class TimmFeatureExtractor(FeatureExtractorBase):
    """A `medi.embed` encoder as a torch-fidelity feature extractor (feature 'pooled': the encoder's output)."""

    def __init__(self, name, features_list, encoder_spec: embed.EncoderSpec | None = None, **kwargs):
        super().__init__(name, features_list)
        if encoder_spec is None:
            raise MediError("the medi-timm feature extractor needs an encoder_spec")
        self.spec = encoder_spec
        self.encoder = embed.build(encoder_spec)

    @staticmethod
    def get_provided_features_list():
        return ("pooled",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "pooled"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 224, 224, dtype=torch.uint8)

    def forward(self, x):
        return (self.encoder(embed.preprocess(x, self.spec)).float(),)


def _register() -> None:
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if TIMM_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TIMM_EXTRACTOR, TimmFeatureExtractor)


_register()


# ----------------------------------------------------------------------------------------------- features
class _Images(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[i])).permute(2, 0, 1)   # a copy: the tiles may be a read-only memmap


def inception_weights(path: str) -> str:
    """The Inception weights file: `fid.weights`, else torch hub's cache; offline without it, an error
    saying where to put it (torch-fidelity would otherwise try GitHub)."""
    if path:
        if not Path(path).is_file():
            raise MediError(f"fid.weights: {path} not found; put torch-fidelity's Inception weights ({INCEPTION_URL}) there")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if cached.is_file():
        return str(cached)
    raise MediError(f"fid.extractor is {INCEPTION} but its weights are not here and cannot be downloaded offline: "
                    f"put {INCEPTION_FILE} (from {INCEPTION_URL}) at {cached}, or set fid.weights to its path")


@dataclass
class Extractor:
    """A torch-fidelity feature extractor with the feature it reports and the name every output uses."""
    module: FeatureExtractorBase
    feature: str
    name: str
    description: str
    cuda: bool
    batch_size: int
    identity: str = ""                 # what makes its features what they are (cache key), beside the images


    @classmethod
    def from_config(cls, cfg: EncoderConfig) -> "Extractor":
        """The extractor of an encoder of params: `fid.encoder` (inception-v3-compat or any `embed` encoder)."""
        from torch_fidelity.utils import create_feature_extractor

        cuda = distributed.state().device.type == "cuda"
        if cfg.name == INCEPTION:
            weights = inception_weights(cfg.weights)
            try:
                module = create_feature_extractor(INCEPTION, ["2048"], cuda=cuda, feature_extractor_weights_path=weights,
                                                  verbose=False)
            except Exception as exc:  # noqa: BLE001  (a corrupt or foreign file: name it)
                raise MediError(f"cannot load Inception weights {weights}: {exc}") from None
            return cls(module, "2048", INCEPTION, f"{INCEPTION} (torch-fidelity Inception-v3, 2048-d pool features, "
                       f"299 px, weights {Path(weights).name})", cuda, cfg.batch_size,
                       f"{INCEPTION} 2048 sha256:{features.file_digest(weights)}")
        spec = embed.spec_of(cfg)
        module = create_feature_extractor(TIMM_EXTRACTOR, ["pooled"], cuda=cuda, encoder_spec=spec, verbose=False)
        return cls(module, "pooled", cfg.name, spec.describe(), cuda, cfg.batch_size, spec.identity())

    def features(self, images: np.ndarray, verbose: bool = True, split: bool = False) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float64 features (N, D), batched with a progress bar.

        `split`: a collective of a launch; each process extracts every N-th batch (the batches one process
        would make, so each feature is computed as one process computes it) and all get every feature."""
        from torch_fidelity.utils import get_featuresdict_from_dataset

        if len(images) == 0:
            raise MediError("no images to extract features from")
        if not (split and distributed.launched()):
            out = get_featuresdict_from_dataset(_Images(images), self.module, self.batch_size, self.cuda, True, verbose)
            return out[self.feature].double()
        size = min(self.batch_size, len(images))
        batches = [np.arange(lo, min(lo + size, len(images))) for lo in range(0, len(images), size)]
        mine = distributed.shard(range(len(batches)), "feature batches")
        parts = []
        if mine:
            subset = torch.utils.data.Subset(_Images(images), np.concatenate([batches[b] for b in mine]).tolist())
            feats = get_featuresdict_from_dataset(subset, self.module, size, self.cuda, True,
                                                  verbose and distributed.is_main())[self.feature].double()
            parts = list(zip(mine, torch.split(feats, [len(batches[b]) for b in mine])))
        done = dict(distributed.gather(parts))
        return torch.cat([done[b] for b in range(len(batches))])

    def cached_features(self, images: np.ndarray, cache_dir: str, verbose: bool = True,
                        split: bool = False) -> torch.Tensor:
        """`features`, kept in the feature cache under `cache_dir` (`medi.features`: keyed by this extractor and
        each image's content; shared with the probe's encoder when it is the same network), so the real tiles are
        encoded once for every model's evaluation and the probe ("" = no cache). With `split`, a collective."""
        vectors = features.cached(images, cache_dir, self.name, self.identity,
                                  lambda todo: self.features(images[np.asarray(todo)], verbose, split).float().numpy())
        return torch.from_numpy(vectors).double()


# ----------------------------------------------------------------------------------------------- metrics
def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between two feature sets (torch-fidelity's statistics and metric)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    if len(a) < 2 or len(b) < 2:
        raise MediError(f"FID needs at least 2 images per side, got {len(a)} and {len(b)}")
    return float(fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)[KEY_METRIC_FID])


def kid(a: torch.Tensor, b: torch.Tensor, cfg: FidConfig) -> float:
    """KID (polynomial-kernel MMD, torch-fidelity), the mean over `kid_subsets` subsets of min(kid_subset_size, n)
    images. When that size is both sets whole, every subset is the same two sets (in another order): one is computed
    (a group of the fid stage's per-class and per-site figures, where the sample set matches the real counts)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    size = min(cfg.kid_subset_size, len(a), len(b))
    subsets = 1 if size == len(a) == len(b) else cfg.kid_subsets
    return float(kid_features_to_metric(a, b, kid_subsets=subsets, kid_subset_size=size, rng_seed=cfg.seed,
                                        verbose=False)[KEY_METRIC_KID_MEAN])


def group_scores(real: torch.Tensor, real_groups: np.ndarray, gen: torch.Tensor, gen_groups: np.ndarray,
                 cfg: FidConfig) -> dict:
    """FID and KID per group value. Groups with enough images on both sides -> `fid`/`kid`; the others are
    listed under `below_min_count` with their n (and values where computable), never silently dropped."""
    out = {"fid": {}, "kid": {}, "n": {}, "below_min_count": {}}
    for value in sorted(set(real_groups) | set(gen_groups)):
        r, g = real[real_groups == value], gen[gen_groups == value]
        n = {"real": int(len(r)), "generated": int(len(g))}
        out["n"][value] = n
        scores = {"fid": frechet(r, g), "kid": kid(r, g, cfg)} if min(len(r), len(g)) >= 2 else {}
        if min(len(r), len(g)) >= cfg.min_count:
            out["fid"][value], out["kid"][value] = scores["fid"], scores["kid"]
        else:
            out["below_min_count"][value] = {**n, **scores}
    return out


def condition_classifiers(real: np.ndarray, train_index: pd.DataFrame, seed: int, folds: int = 3,
                          cache: str | Path = "") -> dict:
    """Logistic regressions on the real training tiles' features predicting the class and the site, each with
    its cross-validated accuracy on real tiles (folds by slide), the ceiling: {"class"|"tss": (fitted, cv)}.

    They depend on the real tiles only, not on a model: with `cache` (fid.cache) they are fitted once and kept
    under `cache`/classifiers/, keyed by the features', labels' and slides' content, the seed, the folds and the
    scikit-learn version, as plain arrays (nothing is unpickled), so the fid stages of every model and the
    sweep's trials reuse them."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def classifier():
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=300, tol=1e-3, random_state=seed))

    slides = train_index["slide"].to_numpy(str)
    path = _classifier_file(cache, real, train_index, seed, folds) if cache else None
    if path is not None and path.exists():
        return _load_classifiers(path, classifier)
    out = {}
    for target in ("class", "tss"):
        y = train_index[target].to_numpy(str)
        cv = cross_val_score(classifier(), real, y, groups=slides, cv=GroupKFold(min(folds, len(set(slides)))))
        out[target] = (classifier().fit(real, y), float(cv.mean()))
    if path is not None:
        _save_classifiers(path, out)
    return out


def _classifier_file(cache: str | Path, real: np.ndarray, train_index: pd.DataFrame, seed: int, folds: int) -> Path:
    import hashlib

    import sklearn

    h = hashlib.sha256()
    real = np.ascontiguousarray(real)
    h.update(f"{real.dtype}|{real.shape}|{seed}|{folds}|sklearn {sklearn.__version__}".encode())
    h.update(real.tobytes())
    for column in ("slide", "class", "tss"):
        h.update("\0".join(train_index[column].astype(str)).encode() + b"\1")
    return Path(cache) / "classifiers" / f"{h.hexdigest()[:32]}.npz"


def _save_classifiers(path: Path, classifiers: dict) -> None:
    from medi.io import atomic_path

    arrays = {}
    for target, (pipe, cv) in classifiers.items():
        scaler, lr = pipe[0], pipe[-1]
        arrays |= {f"{target}.mean": scaler.mean_, f"{target}.scale": scaler.scale_, f"{target}.var": scaler.var_,
                   f"{target}.n_seen": np.asarray(scaler.n_samples_seen_), f"{target}.coef": lr.coef_,
                   f"{target}.intercept": lr.intercept_, f"{target}.classes": lr.classes_.astype(str),
                   f"{target}.n_iter": lr.n_iter_, f"{target}.cv": np.asarray(cv)}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:      # (atomic_path makes the folder)
        np.savez(f, **arrays)


def _load_classifiers(path: Path, classifier) -> dict:
    out = {}
    with np.load(path, allow_pickle=False) as z:
        for target in ("class", "tss"):
            pipe = classifier()
            scaler, lr = pipe[0], pipe[-1]
            scaler.mean_, scaler.scale_, scaler.var_ = z[f"{target}.mean"], z[f"{target}.scale"], z[f"{target}.var"]
            scaler.n_samples_seen_ = z[f"{target}.n_seen"][()]
            lr.coef_, lr.intercept_, lr.classes_ = z[f"{target}.coef"], z[f"{target}.intercept"], z[f"{target}.classes"]
            lr.n_iter_ = z[f"{target}.n_iter"]
            scaler.n_features_in_ = lr.n_features_in_ = lr.coef_.shape[1]
            out[target] = (pipe, float(z[f"{target}.cv"]))
    log.info("condition classifiers from %s (fitted once on these real features)", path)
    return out


def conditioning_accuracy(real: np.ndarray, train_index: pd.DataFrame, gen: np.ndarray, manifest: pd.DataFrame,
                          site_conditioned: bool, seed: int, folds: int = 3, classifiers: dict | None = None) -> dict:
    """How often generated tiles show the class (and site) they were conditioned on, by classifiers fitted on
    real training tiles (`condition_classifiers`, fitted here unless given); the classifiers' cross-validated
    accuracy on real tiles (folds by slide) is the ceiling. Both accuracies are also given on seen pairs (the
    site sent that class in training) and unseen pairs."""
    classifiers = classifiers or condition_classifiers(real, train_index, seed, folds)
    out: dict = {"classifier": "logistic regression on the extractor's features of the real training tiles",
                 "site_conditioned": site_conditioned}
    site_class = train_index.drop_duplicates("tss").set_index("tss")["class"].astype(str).to_dict()
    seen_all = np.array([site_class.get(s) == c for s, c in zip(manifest["tss"].astype(str), manifest["class"].astype(str))])
    for target in ("class", "tss"):
        clf, cv = classifiers[target]
        wanted = manifest[target].to_numpy(str)
        known = np.isin(wanted, clf.classes_)
        hit = clf.predict(gen[known]) == wanted[known]
        key = "class" if target == "class" else "site"
        out[f"{key}_accuracy"] = float(hit.mean()) if hit.size else None
        out[f"{key}_accuracy_real_cv"] = cv
        out[f"{key}_chance"] = 1.0 / len(clf.classes_)
        groups = manifest["class"].to_numpy(str)[known]
        out[f"{key}_accuracy_per_class"] = {c: float(hit[groups == c].mean()) for c in sorted(set(groups))}
        seen = seen_all[known]
        for kind, sel in (("seen", seen), ("unseen", ~seen)):
            out[f"{key}_accuracy_{kind}_pairs"] = float(hit[sel].mean()) if sel.any() else None
            if target == "tss":
                out[f"{kind}_pairs_images"] = int(sel.sum())
    return out


def stain_vs_truth(cfg: Config, manifest: pd.DataFrame, gen: np.ndarray, train_index: pd.DataFrame,
                   tiles: np.ndarray) -> dict | None:
    """Synthetic world only: each (class, site) group's estimated stain against the site's true stain,
    with real tiles of the same sites as the estimator's floor."""
    from medi.groundtruth import GroundTruth, stain_report

    truth = GroundTruth.load(cfg.data.root)
    if truth is None:
        return None
    k = cfg.fid.stain_tiles
    cells, real_cells = [], []
    for (c, s), g in manifest.groupby(["class", "tss"], sort=True):
        if s not in truth.stains or len(g) < min(4, k):
            continue
        cells.append((c, s, gen[g.index.to_numpy()[:k]]))
        own = train_index[(train_index["class"] == c) & (train_index["tss"] == s)]
        if len(own) >= min(4, k):
            real_cells.append((c, s, tiles[own["idx"].to_numpy()[:k]]))
    if not cells:
        return None
    report = stain_report(cells, truth)
    report["real"] = stain_report(real_cells, truth)["summary"].get("seen") if real_cells else None
    report["site_conditioned"] = "tss" in str(manifest["conditioned_on"].iloc[0]).split(",")
    return report


class MatchScore:
    """FID and KID of `count` images of a model, generated with the sample settings (match strategy, fixed seeds),
    against all real training tiles: a score of a model in seconds, for the training curve and a sweep trial.
    The real features are computed (or read from `fid.cache`) once, at the first call. `calibrated` False: without
    the sampler's colour calibration (`sample.colour_calibration`; the training curve: it would cost more than the
    curve's own images at each point)."""

    def __init__(self, cfg: Config, train_index: pd.DataFrame, tiles: np.ndarray, count: int, calibrated: bool = True):
        self.cfg, self.train_index, self.tiles = cfg, train_index, tiles
        self.sampler = Sampler.of(cfg.sample) if calibrated else replace(Sampler.of(cfg.sample), calibration=0)
        self.rows = plan(replace(cfg.sample, strategy="match", count=count), train_index,
                         sorted(train_index["class"].astype(str).unique()))
        self.extractor: Extractor | None = None
        self.real: torch.Tensor | None = None

    def __call__(self, model) -> dict[str, float]:
        cfg = self.cfg
        if self.real is None:
            self.extractor = Extractor.from_config(cfg.fid.encoder)
            self.real = self.extractor.cached_features(self.tiles[np.sort(self.train_index["idx"].to_numpy())],
                                                       cfg.fid.cache, verbose=False)
        images = generate(model, self.sampler, cfg.model, conditions_of(self.rows, model),
                          self.rows["seed"].tolist(), batch_size=cfg.sample.batch_size)
        gen = self.extractor.features(images, verbose=False)
        return {"fid": frechet(self.real, gen), "kid": kid(self.real, gen, cfg.fid)}


def curve_hook(cfg: Config, name: str, train_index: pd.DataFrame, tiles: np.ndarray):
    """The training FID curve (train.eval_every): a `MatchScore` of `fid.curve_count` images with the EMA weights
    (the sample settings without the colour calibration: the curve follows the network), with what the curve has
    cost so far."""
    score, spent = MatchScore(cfg, train_index, tiles, cfg.fid.curve_count, calibrated=False), [0.0]

    def hook(step: int, model) -> dict[str, float]:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):   # torch-fidelity's data loaders draw seeds from the global RNG,
            out = score(model)                    # which training saves in its checkpoints: leave it as it was
        spent[0] += time.perf_counter() - t0
        return {**out, "fid_curve_seconds": spent[0]}

    return hook


def real_halves(cfg: FidConfig, images: np.ndarray, seed: int = 0, extractor: Extractor | None = None) -> dict:
    """The sanity figures: FID between two disjoint random halves of real tiles, and between real tiles and
    uniform noise images of the same size."""
    extractor = extractor or Extractor.from_config(cfg.encoder)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(images))
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
    feats = extractor.features(images, verbose=False)
    noise = rng.integers(0, 256, size=(len(b), *images.shape[1:]), dtype=np.uint8)
    noise_feats = extractor.features(noise, verbose=False)
    return {"halves": frechet(feats[a], feats[b]), "noise": frechet(feats[a], noise_feats),
            "kid_halves": kid(feats[a], feats[b], cfg), "kid_noise": kid(feats[a], noise_feats, cfg)}

