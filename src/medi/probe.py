"""The paper's linear probe under subpopulation shift (`medi probe`, its Table 1), as a measuring instrument.

For each task (a set of classes) and each run (one training TSS per class, all different, as when every
cancer type comes from a single hospital):
- take `real_per_class` real tiles of each class from its chosen TSS, from a random part of its slides (the
  other slides of the site test the shortcut: `seen_sites`, slide-disjoint from training);
- add n = round(ratio x real_per_class) extra tiles per class, the same n for every arm:
  `none` adds none; `real` adds real tiles of the class from its *other* training sites (what perfect
  synthetic data could do); `cls` adds CLS samples of the class; `medi` adds MeDi samples of the class spread
  over (class, TSS) pairs by `probe.strategy`; `medi_tuned` is `medi` with the strategy of
  `probe.tuned_strategies` that scores best on the validation sites;
- fit the authors' probe: logistic regression on the raw embeddings (C, class-balanced, max_iter; a
  StandardScaler only if `probe.scaler`);
- score it on the holdout sites, validation and test apart (`split.validation_fraction`): sites no model
  saw. Table 1 (`metrics/probe.json`, the report) reads test sites only; every choice (the tuned strategy,
  sweeps) reads validation sites only.

Synthetic draws never repeat an image within a run: a pool holds at least n images per (class, TSS) pair
(per class for CLS), every arm's n images of a class are distinct, and pools are larger than n
(`probe.pool_per_pair`) so that runs draw different images; the expected share of a run's synthetic
images that another run also uses is reported. Pools are generated once per model and sampler, grown on
demand (`medi.pools`), and embedded through the content-keyed cache.

Uncertainty: runs share training sites and test sites, so intervals come from a bootstrap that resamples
both, within class (`medi.clustered`); differences between arms are paired (same runs, same real tiles,
same test tiles, same resampled worlds). Each task gets a verdict computed from the intervals of the paired
TSS-avg differences. With one trained generator per method, the variance between training seeds of the
diffusion models is not in the intervals; the outputs say so.

Strategies for a site-conditioned model's tiles of a class c (a run's chosen sites are one per class):
- `grid` (the paper's): equal counts at every chosen site of the run (c at its own site and at every other
  class's site), which breaks the class-site correlation.
- `unseen`: only the pairs the real data lacks (c at the other classes' chosen sites), equal counts.
- `balanced` (frequency balancing): each tile goes to the pair of c with the fewest tiles so far, real ones
  counted, so the empty pairs fill first; with few synthetic tiles it is `unseen`, with many it tends to `grid`.
- `uniform`: each tile at a site drawn uniformly from all candidate training sites of the task's classes
  (not only the run's), the widest spread of stains.
"""
from __future__ import annotations

import itertools
import logging
import typing
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from medi import clustered
from medi.config import Config, ProbeConfig, ProbeStrategy
from medi.errors import MediError

log = logging.getLogger(__name__)

STRATEGIES = typing.get_args(ProbeStrategy)
BASELINES = ("none", "real")                  # arms without a generative model
TUNED = "medi_tuned"
PARTS = ("validation", "test")
# The paired differences every report shows (those whose arms are present).
PAIRS = (("medi", "cls"), ("medi", "none"), ("cls", "none"), ("real", "none"), ("medi", "real"), ("cls", "real"),
         (TUNED, "cls"), (TUNED, "none"), (TUNED, "medi"))


# ----------------------------------------------------------------------------------------------- a task's data
@dataclass
class EvalSet:
    """Holdout tiles of one part (validation or test) of a task."""
    x: np.ndarray
    y: np.ndarray                  # class index
    site: np.ndarray               # index into `sites`
    sites: list[str]
    site_class: np.ndarray         # class index of each site


@dataclass
class TaskData:
    """Everything one task's runs need, as arrays (embeddings are looked up by row)."""
    classes: list[str]
    combos: list[tuple[str, ...]]                       # one candidate training TSS per class, per run
    candidates: list[list[str]]                         # per class, its training TSS with enough tiles
    real: dict[tuple[str, str], np.ndarray]             # (class, TSS) -> embeddings of its training tiles (all sites)
    slides: dict[tuple[str, str], np.ndarray]           # (class, TSS) -> slide of each of those tiles
    pools: dict[str, list[dict[tuple[str, str | None], np.ndarray]]]   # method -> generator -> (class, TSS or None)
                                                        # -> embeddings
    eval: dict[str, EvalSet]                            # part -> holdout tiles
    sites: list[str] = field(default_factory=list)     # every candidate training TSS of the task's classes


@dataclass(frozen=True)
class Arm:
    """One way of building a training set: a method and, for a site-conditioned model, its strategy."""
    method: str
    strategy: str | None = None

    @property
    def name(self) -> str:
        return self.method if self.strategy is None else f"{self.method}@{self.strategy}"

    @property
    def code(self) -> int:                             # its random stream, the same in every process
        return zlib.crc32(self.name.encode())


def candidate_sites(train_index: pd.DataFrame, cls: str, real_per_class: int) -> list[str]:
    """Training TSS of a class with at least `real_per_class` tiles, largest first."""
    counts = train_index[train_index["class"] == cls]["tss"].value_counts()
    return [str(t) for t, n in counts.items() if n >= real_per_class]


def task_candidates(classes: Sequence[str], train_index: pd.DataFrame, real_per_class: int) -> list[list[str]]:
    """candidate_sites of every class of a task; a class without any is an error."""
    missing = [c for c in classes if c not in set(train_index["class"])]
    if missing:
        raise MediError(f"probe task classes {missing} are not in the training split ({sorted(set(train_index['class']))})")
    candidates = [candidate_sites(train_index, c, real_per_class) for c in classes]
    for c, cands in zip(classes, candidates):
        if not cands:
            raise MediError(f"probe: class {c} has no training TSS with >= {real_per_class} tiles (probe.real_per_class)")
    return candidates


def combinations(candidates: Sequence[Sequence[str]], runs: int, seed: int) -> list[tuple[str, ...]]:
    """Every combination of one TSS per class (all different), or a seeded random subset of `runs` of them."""
    every = [c for c in itertools.product(*candidates) if len(set(c)) == len(c)]
    if not every:
        raise MediError("no combination of one training TSS per class exists (all classes need a TSS with enough tiles)")
    if runs == 0 or runs >= len(every):
        return every
    pick = np.random.default_rng(seed).choice(len(every), runs, replace=False)
    return [every[i] for i in sorted(pick)]


def extra_per_class(p: ProbeConfig) -> int:
    """Tiles every arm but `none` adds per class."""
    return int(round(p.ratio * p.real_per_class))


def pool_size(p: ProbeConfig) -> int:
    """Images per pool key: enough that no run repeats one (>= the most any key is asked for, which is the
    class's whole share), and `pool_per_pair` so that runs draw different images."""
    return max(p.pool_per_pair, extra_per_class(p))


def pool_keys(tasks: Mapping[str, Sequence[str]], train_index: pd.DataFrame, real_per_class: int,
              site_conditioned: bool) -> list[tuple[str, str | None]]:
    """The (class, TSS) keys a model's pool needs: one per class without site conditioning; else every task
    class x every candidate TSS of the task's classes (seen and unseen pairs)."""
    keys: list[tuple[str, str | None]] = []
    for classes in tasks.values():
        sites = [t for cands in task_candidates(classes, train_index, real_per_class) for t in cands]
        keys += [(c, t) for c in classes for t in sites] if site_conditioned else [(c, None) for c in classes]
    return list(dict.fromkeys(keys))


# ----------------------------------------------------------------------------------------------- one run
def real_draws(task: TaskData, combo: tuple[str, ...], real_per_class: int,
               rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per class: the rows of its chosen TSS that train, and the rows that test the seen site. The site's slides
    are shuffled; the first ones holding at least max(real_per_class, half the site's tiles) give the training
    draw, the rest (other slides: never a slide of the training draw) the seen-site test."""
    picks, rest = [], []
    for c, t in zip(task.classes, combo):
        slides = task.slides[(c, t)]
        names, sizes = np.unique(slides, return_counts=True)
        order = rng.permutation(len(names))
        need = max(real_per_class, (len(slides) + 1) // 2)
        n_train = int(np.searchsorted(np.cumsum(sizes[order]), need) + 1)
        train_rows = np.flatnonzero(np.isin(slides, names[order[:n_train]]))
        picks.append(rng.choice(train_rows, real_per_class, replace=False))
        rest.append(np.flatnonzero(~np.isin(slides, names[order[:n_train]])))
    return picks, rest


def _equal(keys: list, n: int, rng: np.random.Generator) -> list[tuple]:
    """n split as evenly as possible over keys; which keys get the remainder varies by run."""
    share = np.full(len(keys), n // len(keys)) + (np.arange(len(keys)) < n % len(keys))
    return [(keys[i], int(k)) for i, k in zip(rng.permutation(len(keys)), share)]


def allocation(task: TaskData, combo: tuple[str, ...], real_per_class: int, arm: Arm, n: int,
               rng: np.random.Generator) -> list[tuple[tuple[str, str | None], int]]:
    """How many synthetic tiles each pool key gets, n per class: [((class, TSS or None), count), ...]."""
    out: list[tuple[tuple[str, str | None], int]] = []
    for c, own in zip(task.classes, combo):
        if arm.strategy is None:                            # a model without site conditioning
            out.append(((c, None), n))
        elif arm.strategy == "grid":
            out += _equal([(c, t) for t in combo], n, rng)
        elif arm.strategy == "unseen":
            out += _equal([(c, t) for t in combo if t != own], n, rng)
        elif arm.strategy == "balanced":
            keys = [(c, t) for t in combo]
            total = np.array([real_per_class if t == own else 0 for t in combo], float)
            given = np.zeros(len(keys), int)
            tiebreak = rng.random(len(keys))                # equal totals: a per-run random order
            for _ in range(n):
                i = int(np.lexsort((tiebreak, total))[0])
                given[i] += 1
                total[i] += 1
            out += [(k, int(g)) for k, g in zip(keys, given)]
        elif arm.strategy == "uniform":
            sites, counts = np.unique(rng.choice(task.sites, n), return_counts=True) if n else ([], [])
            out += [((c, str(t)), int(k)) for t, k in zip(sites, counts)]
        else:
            raise MediError(f"unknown probe strategy '{arm.strategy}'; known: {', '.join(STRATEGIES)}")
    return [(k, g) for k, g in out if g]


@dataclass
class Drawn:
    """What one arm of one run trained on, beside the real tiles: per key, the rows of its pool or site."""
    rows: dict[tuple[str, str | None], np.ndarray]

    def distinct_per_class(self, classes: Sequence[str]) -> dict[str, int]:
        return {c: int(sum(len(np.unique(r)) for (k, _), r in self.rows.items() if k == c)) for c in classes}

    def counts(self) -> dict[tuple[str, str | None], int]:
        return {k: len(r) for k, r in self.rows.items()}


def training_set(task: TaskData, combo: tuple[str, ...], picks: list[np.ndarray], arm: Arm, n: int,
                 rng: np.random.Generator, generator: int = 0) -> tuple[np.ndarray, np.ndarray, Drawn]:
    """The run's real tiles plus the arm's n extra tiles per class (never one twice), synthetic ones from the
    pool of the given generator of the arm's method."""
    xs = [task.real[(c, t)][p] for c, t, p in zip(task.classes, combo, picks)]
    ys = [np.full(len(p), k) for k, p in enumerate(picks)]
    drawn: dict[tuple[str, str | None], np.ndarray] = {}
    if arm.method == "real" and n:
        for k, (c, own) in enumerate(zip(task.classes, combo)):
            others = [t for (cc, t) in task.real if cc == c and t != own]
            pool = np.concatenate([task.real[(c, t)] for t in others]) if others else np.zeros((0, xs[0].shape[1]))
            if len(pool) < n:
                raise MediError(f"probe arm 'real': class {c} has {len(pool)} training tiles outside site {own}, "
                                f"fewer than the {n} extra tiles per class (probe.ratio x probe.real_per_class)")
            rows = rng.choice(len(pool), n, replace=False)
            drawn[(c, "other sites")] = rows
            xs.append(pool[rows])
            ys.append(np.full(n, k))
    elif arm.method != "none" and n:
        pools = task.pools[arm.method][generator]
        for key, m in allocation(task, combo, len(picks[0]), arm, n, rng):
            pool = pools[key]
            if len(pool) < m:
                raise MediError(f"probe: the pool of {arm.method} {key} holds {len(pool)} images, a run asks for {m}")
            rows = rng.choice(len(pool), m, replace=False)
            drawn[key] = rows
            xs.append(pool[rows])
            ys.append(np.full(m, task.classes.index(key[0])))
    return np.concatenate(xs), np.concatenate(ys), Drawn(drawn)


def classifier(p: ProbeConfig):
    """The authors' probe: logistic regression on raw embeddings (optionally standardised)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    lr = LogisticRegression(C=p.C, class_weight="balanced", max_iter=p.max_iter)
    return make_pipeline(StandardScaler(), lr) if p.scaler else lr


def site_counts(pred: np.ndarray, ev: EvalSet, n_classes: int) -> np.ndarray:
    """(S, K): tiles of each site predicted as each class."""
    return np.bincount(ev.site * n_classes + pred, minlength=len(ev.sites) * n_classes).reshape(len(ev.sites), n_classes)


@dataclass
class RunResult:
    generator: int                                      # which trained generator of each method the run used
    counts: dict[str, dict[str, np.ndarray]]            # arm -> part -> (S, K)
    seen: dict[str, float]                              # arm -> accuracy on the seen sites' other slides (nan: none)
    drawn: dict[str, dict]                              # arm -> key counts and distinct images per class


def one_run(task: TaskData, combo: tuple[str, ...], arms: Sequence[Arm], p: ProbeConfig,
            seed: Sequence[int], generator: int = 0) -> RunResult:
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    picks, rest = real_draws(task, combo, p.real_per_class, np.random.default_rng([*seed, 0]))
    seen_x = [task.real[(c, t)][r] for c, t, r in zip(task.classes, combo, rest)]
    n = extra_per_class(p)
    K = len(task.classes)
    out = RunResult(generator, {}, {}, {})
    for arm in arms:
        x, y, drawn = training_set(task, combo, picks, arm, n, np.random.default_rng([*seed, arm.code]), generator)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)     # counted by the caller's max_iter, not fatal
            clf = classifier(p).fit(x, y)
        out.counts[arm.name] = {part: site_counts(clf.predict(ev.x), ev, K) if len(ev.y) else np.zeros((0, K), int)
                                for part, ev in task.eval.items()}
        hits = [float(np.mean(clf.predict(sx) == k)) for k, sx in enumerate(seen_x) if len(sx)]
        out.seen[arm.name] = float(np.mean(hits)) if hits else float("nan")
        out.drawn[arm.name] = {"distinct": drawn.distinct_per_class(task.classes), "keys": drawn.counts()}
    return out


def expected_overlap(runs: Sequence[RunResult], arm: str, size: int, n_total: int) -> float | None:
    """Expected share of one run's synthetic images that another run of the task also draws: for runs a != b,
    E|A & B| = sum over pool keys (of the same generator) of n_a(key) n_b(key) / pool size, averaged over
    pairs, over n_total."""
    if len(runs) < 2 or not n_total:
        return None
    s1: dict = {}
    s2: dict = {}
    for r in runs:
        for pool_key, m in r.drawn[arm]["keys"].items():
            key = (r.generator, pool_key)
            s1[key] = s1.get(key, 0) + m
            s2[key] = s2.get(key, 0) + m * m
    shared = sum(s1[k] ** 2 - s2[k] for k in s1) / (size * len(runs) * (len(runs) - 1))
    return float(shared / n_total)


# ----------------------------------------------------------------------------------------------- evaluation
@dataclass
class Context:
    """What every evaluation of the probe reads: the split, real embeddings by tile idx, synthetic pools by
    method, and the encoder's description."""
    train_index: pd.DataFrame
    holdout_index: pd.DataFrame                        # with `part` (validation | test)
    embeddings: dict[int, np.ndarray]
    pools: dict[str, list[dict[tuple[str, str | None], np.ndarray]]]    # method -> generator -> key -> embeddings
    encoder: str
    site_conditioned: tuple[str, ...] = ()             # methods whose model is conditioned on the site


def build_task(classes: Sequence[str], ctx: Context, p: ProbeConfig, parts: Sequence[str]) -> TaskData:
    """Arrays of one task: real embeddings per (class, TSS), the holdout tiles of `parts` only, and the runs'
    TSS combinations. Tiles of other parts are not even looked up."""
    classes = list(classes)
    train = ctx.train_index[ctx.train_index["class"].isin(classes)]
    candidates = task_candidates(classes, ctx.train_index, p.real_per_class)
    real, slides = {}, {}
    for (c, t), g in train.groupby(["class", "tss"], sort=True):
        real[(c, str(t))] = np.stack([ctx.embeddings[i] for i in g["idx"]])
        slides[(c, str(t))] = g["slide"].to_numpy(str)
    evals = {}
    for part in parts:
        hold = ctx.holdout_index[(ctx.holdout_index["part"] == part) & ctx.holdout_index["class"].isin(classes)]
        sites = sorted(hold["tss"].astype(str).unique())
        site_of = {s: i for i, s in enumerate(sites)}
        evals[part] = EvalSet(np.stack([ctx.embeddings[i] for i in hold["idx"]]) if len(hold) else np.zeros((0, 1)),
                              hold["class"].map(classes.index).to_numpy(int), hold["tss"].astype(str).map(site_of).to_numpy(int),
                              sites, np.array([classes.index(hold.loc[hold["tss"].astype(str) == s, "class"].iloc[0])
                                               for s in sites], int))
    if all(len(ev.y) == 0 for ev in evals.values()):
        raise MediError(f"probe: the {'/'.join(parts)} sites hold no tiles of {classes}")
    return TaskData(classes, combinations(candidates, p.runs, p.seed), candidates, real, slides,
                    {m: list(gens) for m, gens in ctx.pools.items()}, evals,
                    list(dict.fromkeys(t for cands in candidates for t in cands)))


def arms_of(p: ProbeConfig, methods: Sequence[str], site_conditioned: Sequence[str],
            strategies: Sequence[str] = ()) -> list[Arm]:
    """The arms to fit: each method (a site-conditioned model's with `probe.strategy`) and MeDi under every
    strategy of `strategies` (the candidates of medi_tuned)."""
    arms = [Arm(m, p.strategy if m in site_conditioned else None) for m in methods]
    arms += [Arm("medi", s) for s in strategies]
    return list(dict.fromkeys(arms))


def n_generators(task: TaskData) -> int:
    return max((len(g) for g in task.pools.values()), default=1)


def run_task(task: TaskData, arms: Sequence[Arm], p: ProbeConfig, task_id: int) -> list[RunResult]:
    """All runs of one task, in parallel (joblib); each run's randomness depends only on (seed, task, run). Run
    i uses generator i mod K of every method (K trained generators per method)."""
    from joblib import Parallel, delayed

    k = n_generators(task)
    return Parallel(n_jobs=p.workers)(delayed(one_run)(task, combo, arms, p, (p.seed, task_id, i), i % k)
                                      for i, combo in enumerate(task.combos))


def summarise_part(task: TaskData, runs: Sequence[RunResult], arms: Mapping[str, str], part: str, p: ProbeConfig,
                   n_boot: int) -> dict:
    """Per reported arm (name -> arm whose runs it reads) the figures on `part`, with intervals and paired
    differences when n_boot > 0."""
    ev = task.eval[part]
    if not len(ev.y):
        return {"skipped": f"no {part} tiles of {task.classes}"}
    site_ids = {t: i for i, t in enumerate(task.sites)}
    design = clustered.Design(ev.site_class, np.array([[site_ids[t] for t in combo] for combo in task.combos]),
                              np.array([next(k for k, cands in enumerate(task.candidates) if t in cands)
                                        for t in task.sites]), len(task.classes),
                              np.array([r.generator for r in runs]), n_generators(task))
    counts = {name: np.stack([r.counts[arm][part] for r in runs]) for name, arm in arms.items()}
    seen = {name: np.array([r.seen[arm] for r in runs]) for name, arm in arms.items()}   # NaN: no other slides
    pairs = [(a, b) for a, b in PAIRS if a in arms and b in arms]
    if n_boot:
        out = clustered.summarise(counts, design, pairs, n_boot, p.seed, extra=seen)
    else:                                                   # point figures only (validation)
        out = {"arms": {}, "differences": {}}
        for name, c in counts.items():
            per = clustered.point(c, design.site_class)
            out["arms"][name] = {"runs": len(runs), **{m: float(v.mean()) for m, v in per.items()}}
            if not np.isnan(seen[name]).all():
                out["arms"][name]["seen_sites"] = float(np.nanmean(seen[name]))
    out["design"] = {"runs": len(runs), "training_sites_per_class": {c: len(s) for c, s in zip(task.classes, task.candidates)},
                     f"{part}_sites_per_class": {c: int((ev.site_class == k).sum()) for k, c in enumerate(task.classes)},
                     f"{part}_tiles": int(len(ev.y))}
    return out


def evaluate(p: ProbeConfig, ctx: Context, parts: Sequence[str], methods: Sequence[str] | None = None,
             on_task: Callable[[str, dict], None] | None = None, n_boot: int | None = None, tune: bool = True) -> dict:
    """The probe, shared by `medi probe` and the sweep: every task, its runs, and per part (validation and/or
    test) the figures of every arm. With "validation" among the parts and `probe.tuned_strategies` set,
    medi_tuned takes the strategy with the best mean validation TSS-avg over tasks, and is reported on the
    other parts (`tune=False`: no medi_tuned). `on_task(task, figures)` is called after each task's runs (the
    sweep prunes there)."""
    for part in parts:
        if part not in PARTS:
            raise MediError(f"probe: unknown part '{part}'; known: {', '.join(PARTS)}")
    methods = list(methods or p.methods)
    tune = tune and bool(p.tuned_strategies) and "medi" in methods and "medi" in ctx.site_conditioned and "validation" in parts
    arms = arms_of(p, methods, ctx.site_conditioned, p.tuned_strategies if tune else ())
    reported = {m: arms[i].name for i, m in enumerate(methods)}       # the first len(methods) arms, in order
    n_boot = p.bootstrap if n_boot is None else n_boot
    size, n = pool_size(p), extra_per_class(p)
    k = max((len(g) for g in ctx.pools.values()), default=1)
    tasks: dict[str, dict] = {}
    done: dict[str, tuple[TaskData, list[RunResult]]] = {}
    shown: dict[str, dict[str, str]] = {}
    for i, (name, classes) in enumerate(p.tasks.items()):
        task = build_task(classes, ctx, p, parts)
        missing = unavailable(task, methods, n)
        shown[name] = {m: a for m, a in reported.items() if m not in missing}
        runs = run_task(task, [a for a in arms if a.method not in missing], p, i)
        done[name] = (task, runs)
        tasks[name] = {"classes": list(classes),
                       "draws": {a.name: {"distinct_per_class": runs[0].drawn[a.name]["distinct"],
                                          "expected_overlap": None if a.method in BASELINES else
                                          expected_overlap(runs, a.name, size, n * len(classes))}
                                 for a in arms if a.method not in ("none", *missing)}}
        if missing:
            tasks[name]["unavailable"] = missing
            log.warning("probe %s: arm(s) left out: %s", name, missing)
        if "validation" in parts:
            tasks[name]["validation"] = summarise_part(task, runs, shown[name], "validation", p, 0)
            if tune:
                tasks[name]["validation"]["strategies"] = {
                    a.strategy: summarise_part(task, runs, {a.name: a.name}, "validation", p, 0).get("arms", {})
                    .get(a.name, {}).get("tss_avg") for a in arms if a.method == "medi" and a.strategy}
        if on_task:
            on_task(name, tasks[name])
    result = {"encoder": ctx.encoder, "parts": list(parts), "tasks": tasks,
              "design": {"real_per_class": p.real_per_class, "extra_per_class": n, "pool_size": size,
                         "bootstrap_worlds": n_boot, "seed": p.seed, "classifier": repr(classifier(p)),
                         "generators_per_method": k,
                         "generator_variance": "not in the intervals: one trained diffusion model per method"
                         if k == 1 else f"in the intervals: runs spread over {k} trained generators per method, "
                                        "resampled by the bootstrap"}}
    if tune:
        result["tuned"] = tuned_strategy(tasks, p.tuned_strategies)
        if result["tuned"]["strategy"]:
            for arms_shown in shown.values():
                arms_shown[TUNED] = Arm("medi", result["tuned"]["strategy"]).name
    for name, (task, runs) in done.items():
        for part in parts:
            if part != "validation":
                tasks[name][part] = summarise_part(task, runs, shown[name], part, p, n_boot)
    return result


def unavailable(task: TaskData, methods: Sequence[str], n: int) -> dict[str, str]:
    """Arms that cannot get n extra tiles per class in every run, and why: `real` needs n training tiles of each
    class outside any of its candidate sites (a class with one training site has none)."""
    out = {}
    if "real" in methods and n:
        for c, cands in zip(task.classes, task.candidates):
            total = sum(len(v) for (cc, _), v in task.real.items() if cc == c)
            short = [t for t in cands if total - len(task.real[(c, t)]) < n]
            if short:
                out["real"] = (f"class {c} has {total - len(task.real[(c, short[0])])} training tiles outside site "
                               f"{short[0]}; the arm needs {n} per class")
                break
    return out


def tuned_strategy(tasks: Mapping[str, dict], strategies: Sequence[str]) -> dict:
    """medi_tuned's strategy: the best mean over tasks of the validation TSS-avg (the first listed on a tie)."""
    scores = {}
    for s in strategies:
        values = [t["validation"].get("strategies", {}).get(s) for t in tasks.values()]
        if all(v is not None for v in values):
            scores[s] = float(np.mean(values))
    if not scores:
        return {"strategy": None, "why": "a task has no validation sites"}
    best = max(scores, key=lambda s: (scores[s], -list(strategies).index(s)))
    return {"strategy": best, "validation_tss_avg": scores, "chosen_on": "validation sites, mean TSS-avg over tasks"}


# ----------------------------------------------------------------------------------------------- the stage's inputs
def load_splits(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    from medi import artifacts

    holdout = artifacts.holdout_frame(cfg)
    return artifacts.train_frame(cfg), holdout


def real_embeddings(cfg: Config, spec, train_index: pd.DataFrame, holdout_index: pd.DataFrame,
                    parts: Sequence[str]) -> dict[int, np.ndarray]:
    """Embeddings of the real tiles the probe reads (training tiles of the task classes and holdout tiles of
    `parts`), by tile idx, from the cache when there."""
    from medi import artifacts, embed

    tiles = artifacts.load_tiles(cfg.data.output)
    classes = sorted({c for cs in cfg.probe.tasks.values() for c in cs})
    hold = holdout_index[holdout_index["part"].isin(parts)]
    needed = pd.concat([train_index[train_index["class"].isin(classes)], hold[hold["class"].isin(classes)]])
    idx = np.sort(needed["idx"].to_numpy())
    return dict(zip(idx.tolist(), embed.embed(np.asarray(tiles[idx]), spec, cfg.encoder.cache, cfg.encoder.batch_size)))


def site_conditioned(cfg: Config) -> tuple[str, ...]:
    """The probe's model methods whose model is conditioned on the site."""
    p = cfg.probe
    return tuple(m for m in p.methods if m in p.models and "tss" in cfg.variant(p.models[m]))


def method_pool(cfg: Config, method: str, model_dir: Path, out: Path, train_index: pd.DataFrame, spec) -> dict:
    """A model method's pool for the probe's tasks (grown to `pool_size`), as embeddings."""
    from medi import pools

    p = cfg.probe
    keys = pool_keys(p.tasks, train_index, p.real_per_class, method in site_conditioned(cfg))
    return pools.embedded(cfg, model_dir, keys, pool_size(p), out, train_index, spec)


def generators(cfg: Config, method: str) -> list[tuple[str, int | None]]:
    """The trained models of a method: the pipeline's, then one per probe.generator_seeds (models/NAME-seedS),
    as (model name, seed or None)."""
    from medi.config import generator_name

    name = cfg.probe.models[method]
    return [(name, None)] + [(generator_name(name, s), s) for s in cfg.probe.generator_seeds]


def prepare(cfg: Config, parts: Sequence[str] = PARTS) -> Context:
    """The pipeline's context: real embeddings (cached) and, per model method, the pool of each of its generators
    (`models/NAME[-seedS]`) in `samples/probe/NAME[-seedS]/`."""
    from medi import artifacts, embed

    p = cfg.probe
    train_index, holdout_index = load_splits(cfg)
    spec = embed.spec_of(cfg.encoder)
    embeddings = real_embeddings(cfg, spec, train_index, holdout_index, parts)
    pool = {}
    for m in (m for m in p.methods if m not in BASELINES):
        pool[m] = []
        for name, seed in generators(cfg, m):
            model_dir = artifacts.model_dir(cfg, name)
            if not (model_dir / "model.safetensors").exists():
                how = f"medi train --model {p.models[m]}" + (f" --seed {seed}" if seed is not None else "")
                raise MediError(f"probe: {model_dir} not found; train it with `{how}` (or `dvc repro`)")
            pool[m].append(method_pool(cfg, m, model_dir, Path(cfg.sample.output.format(model=f"probe/{name}")),
                                       train_index, spec))
    return Context(train_index, holdout_index, embeddings, pool, spec.describe(), site_conditioned(cfg))


# ----------------------------------------------------------------------------------------------- outputs
PAPER_TABLE1 = {   # balanced accuracy in %, mean +- standard error (../shared/reference/tcga-ut.md)
    "nsclc": {"none": (74.31, 75.76), "cls": (79.99, 81.72), "medi": (81.37, 83.04)},
    "rcc": {"none": (73.25, 81.74), "cls": (78.21, 84.64), "medi": (74.87, 84.17)},
    "uterine": {"none": (67.73, 62.82), "cls": (67.77, 70.80), "medi": (74.86, 71.21)},
}


def task_verdict(differences: Mapping[str, dict]) -> str:
    """One sentence per task from the paired TSS-avg differences of MeDi against CLS and none."""
    vs = {other: differences[f"medi-{other}"]["verdict"] for other in ("cls", "none") if f"medi-{other}" in differences}
    if not vs:
        return "no MeDi comparison"
    better = [o for o, v in vs.items() if v == "better"]
    worse = [o for o, v in vs.items() if v == "worse"]
    if worse:
        return f"MeDi loses to {' and '.join(worse)}" + (f" (beats {' and '.join(better)})" if better else "")
    if len(better) == len(vs):
        return f"MeDi beats {' and '.join(better)}"
    if better:
        return f"MeDi beats {' and '.join(better)}; no difference shown against " \
               f"{' and '.join(o for o in vs if o not in better)}"
    return f"no difference shown between MeDi and {' or '.join(vs)} (tie)"


def metrics_json(result: dict) -> dict:
    """metrics/probe.json (the contract): test sites only, headline figures and paired differences."""
    keys = ("overall", "overall_sem", "overall_lo", "overall_hi", "tss_avg", "tss_avg_sem", "tss_avg_lo", "tss_avg_hi",
            "mcc", "worst_tss", "seen_sites", "runs")
    tasks = {}
    for name, t in result["tasks"].items():
        test = t["test"]
        if "skipped" in test:
            continue
        tasks[name] = {arm: {k: v[k] for k in keys if k in v} for arm, v in test["arms"].items()}
        tasks[name]["differences"] = {pair: {k: d[k] for k in ("tss_avg", "tss_avg_lo", "tss_avg_hi", "overall",
                                                              "overall_lo", "overall_hi", "verdict")}
                                      for pair, d in test["differences"].items()}
        tasks[name]["verdict"] = task_verdict(test["differences"])
    out = {"encoder": result["encoder"], "split": "test", "tasks": tasks}
    if result.get("tuned"):
        out["tuned_strategy"] = result["tuned"]["strategy"]
    return out


HEADLINE_ARMS = ("none", "real", "cls", "medi")
HEADLINE_DIFFERENCE = "medi-cls"


def headline_rows(metrics: dict) -> dict[str, dict]:
    """probe.headline ({task}.json each, one row per task in `dvc metrics show`): Table 1's TSS-avg balanced accuracy
    on the test sites per method, and the medi-cls paired difference with its 95 % interval."""
    rows = {}
    for task, arms in metrics["tasks"].items():
        row = {arm: arms[arm]["tss_avg"] for arm in HEADLINE_ARMS if arm in arms}
        d = arms["differences"].get(HEADLINE_DIFFERENCE)
        if d:
            row.update({HEADLINE_DIFFERENCE: d["tss_avg"], f"{HEADLINE_DIFFERENCE}_lo": d["tss_avg_lo"],
                        f"{HEADLINE_DIFFERENCE}_hi": d["tss_avg_hi"]})
        rows[task] = row
    return rows


def write_headline(folder: str, metrics: dict) -> None:
    """One file per task of this run (atomically each); files of tasks no longer run are removed."""
    from medi.io import write_json

    rows = headline_rows(metrics)
    out = Path(folder)
    for task, row in rows.items():
        write_json(out / f"{task}.json", row)
    for stale in out.glob("*.json"):
        if stale.stem not in rows:
            stale.unlink()


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def markdown_table(metrics: dict, detail: dict | None = None) -> str:
    """reports/probe.md: Table 1 on the test sites with intervals, the paired differences, verdicts, design."""
    tuned = metrics.get("tuned_strategy")
    lines = ["Linear probe on the **test sites** (never used for any choice): balanced accuracy in %, mean over runs "
             "[95 % interval of a bootstrap over training sites and test sites]; "
             f"encoder: {metrics['encoder']}.",
             "Paper (Table 1, UNI embeddings of TCGA-UT) in brackets: same protocol, other data and encoder, so compare "
             "directions, not values.", "",
             "| task | arm | runs | overall | TSS-avg | MCC | worst TSS | seen sites |", "|---|---|---|---|---|---|---|---|"]
    for task, arms in metrics["tasks"].items():
        for arm, m in arms.items():
            if arm in ("differences", "verdict"):
                continue
            paper = PAPER_TABLE1.get(task, {}).get(arm)
            ref = (f" [{paper[0]:.1f}]", f" [{paper[1]:.1f}]") if paper else ("", "")
            label = f"{arm} ({tuned})" if arm == TUNED else arm
            seen = _pct(m["seen_sites"]) if "seen_sites" in m else "-"
            lines.append(f"| {task} | {label} | {m['runs']} | {_pct(m['overall'])} [{_pct(m['overall_lo'])}, "
                         f"{_pct(m['overall_hi'])}]{ref[0]} | {_pct(m['tss_avg'])} [{_pct(m['tss_avg_lo'])}, "
                         f"{_pct(m['tss_avg_hi'])}]{ref[1]} | {m['mcc']:.3f} | {_pct(m['worst_tss'])} | {seen} |")
    lines += ["", "Paired differences of TSS-avg (percentage points, same runs, real tiles, test tiles and resampled "
              "worlds for both arms) and the verdict they give:", "",
              "| task | difference | TSS-avg | overall | verdict (TSS-avg) |", "|---|---|---|---|---|"]
    for task, arms in metrics["tasks"].items():
        for pair, d in arms["differences"].items():
            lines.append(f"| {task} | {pair} | {100 * d['tss_avg']:+.1f} [{100 * d['tss_avg_lo']:+.1f}, "
                         f"{100 * d['tss_avg_hi']:+.1f}] | {100 * d['overall']:+.1f} [{100 * d['overall_lo']:+.1f}, "
                         f"{100 * d['overall_hi']:+.1f}] | {d['verdict']} |")
    lines += ["", "**Verdicts** (computed: an interval of the paired difference that excludes 0):", ""]
    lines += [f"- {task}: {arms['verdict']}" for task, arms in metrics["tasks"].items()]
    if detail:
        left_out = [f"{task}: {arm} ({why})" for task, t in detail["tasks"].items() for arm, why in
                    t.get("unavailable", {}).items()]
        if left_out:
            lines += ["", "Arms left out: " + "; ".join(left_out) + "."]
        d = detail["design"]
        lines += ["", "Design: " + f"{d['real_per_class']} real tiles per class from one training site; every other "
                  f"arm adds {d['extra_per_class']} tiles per class (`real`: real tiles of the class's other training "
                  f"sites); synthetic pools of {d['pool_size']} images per (class, site) pair (per class for CLS); "
                  f"{d['bootstrap_worlds']} bootstrap worlds, seed {d['seed']}; probe {d['classifier']}. "
                  f"Generator variance: {d['generator_variance']}."]
        if detail.get("tuned"):
            t = detail["tuned"]
            if t["strategy"] is None:
                lines += ["", f"medi_tuned: not run ({t['why']})."]
            else:
                scores = ", ".join(f"{s} {_pct(v)}" for s, v in t["validation_tss_avg"].items())
                lines += ["", f"medi_tuned: strategy **{t['strategy']}**, chosen on the validation sites (mean TSS-avg "
                          f"over tasks: {scores}); `medi` keeps the paper's `{detail['settings']['strategy']}`."]
        lines += ["", "| task | sites per class (training candidates / validation / test) | runs | distinct synthetic "
                  "images per class in one run | expected share of a run's synthetic images another run also uses |",
                  "|---|---|---|---|---|"]
        for task, t in detail["tasks"].items():
            des = t.get("test", {}).get("design") or t.get("validation", {}).get("design", {})
            val = t.get("validation", {}).get("design", {}).get("validation_sites_per_class", {})
            tst = t.get("test", {}).get("design", {}).get("test_sites_per_class", {})
            sites = ", ".join(f"{c} {des['training_sites_per_class'][c]}/{val.get(c, '-')}/{tst.get(c, '-')}"
                              for c in t["classes"])
            distinct = "; ".join(f"{a}: {', '.join(str(v) for v in x['distinct_per_class'].values())}"
                                 for a, x in t["draws"].items())
            overlap = ", ".join(f"{a} {100 * x['expected_overlap']:.0f} %" for a, x in t["draws"].items()
                                if x["expected_overlap"] is not None)
            lines.append(f"| {task} | {sites} | {des.get('runs', '-')} | {distinct} | {overlap} |")
    return "\n".join(lines) + "\n"


def figure(metrics: dict):
    """Per task: TSS-avg per arm on the test sites with 95 % intervals (left) and the paired differences with
    their intervals (right of each task), the verdict in the title."""
    import matplotlib.pyplot as plt

    tasks = list(metrics["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.8 * len(tasks), 6.4), squeeze=False)
    colours = {"none": "tab:gray", "real": "tab:green", "cls": "tab:red", "medi": "tab:blue", TUNED: "tab:cyan"}
    for j, task in enumerate(tasks):
        t = metrics["tasks"][task]
        arms = [a for a in t if a not in ("differences", "verdict")]
        ax = axes[0][j]
        y = [t[a]["tss_avg"] for a in arms]
        err = [[t[a]["tss_avg"] - t[a]["tss_avg_lo"] for a in arms], [t[a]["tss_avg_hi"] - t[a]["tss_avg"] for a in arms]]
        ax.bar(range(len(arms)), y, yerr=err, capsize=3, color=[colours.get(a, "C0") for a in arms])
        seen = [t[a].get("seen_sites", np.nan) for a in arms]
        ax.scatter(range(len(arms)), seen, marker="_", s=300, color="k", zorder=3, label="seen sites (other slides)")
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, fontsize=8, rotation=20)
        ax.set_ylim(0, 1)
        ax.set_ylabel("TSS-avg balanced accuracy (test sites)")
        ax.set_title(f"{task} ({t[arms[0]]['runs']} runs)", fontsize=9)
        if j == 0:
            ax.legend(fontsize=7, loc="lower left")
        ax2 = axes[1][j]
        pairs = list(t["differences"])
        d = [t["differences"][k] for k in pairs]
        ax2.errorbar([100 * x["tss_avg"] for x in d], range(len(pairs)), fmt="o", color="k",
                     xerr=[[100 * (x["tss_avg"] - x["tss_avg_lo"]) for x in d], [100 * (x["tss_avg_hi"] - x["tss_avg"]) for x in d]])
        ax2.axvline(0, color="0.5", linestyle=":")
        ax2.set_yticks(range(len(pairs)))
        ax2.set_yticklabels(pairs, fontsize=8)
        ax2.invert_yaxis()
        ax2.set_xlabel("paired difference of TSS-avg (points), 95 % interval", fontsize=8)
        ax2.set_title(t["verdict"], fontsize=8, wrap=True)
    fig.suptitle(f"Linear probe under site shift, test sites; encoder {metrics['encoder'][:90]}", fontsize=8)
    fig.tight_layout()
    return fig


def run_stage(cfg: Config) -> dict:
    """`medi probe`: embeddings, pools, every task x arm x run; metrics/probe.json (test sites), the detail
    (validation figures, the tuned strategy, draws, design), the table and the figure."""
    import time

    import mlflow

    from medi import figures, tracking
    from medi.io import write_json, write_text

    p = cfg.probe
    with tracking.stage_run(cfg, "probe", ("encoder", "probe", "sample"), run_name="probe"):
        t0 = time.perf_counter()
        ctx = prepare(cfg)
        prep_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        result = evaluate(p, ctx, PARTS)
        result["settings"] = cfg.section_dict("probe")
        result["seconds"] = {"embeddings_and_pools": prep_seconds, "runs": time.perf_counter() - t1}
        metrics = metrics_json(result)
        for task, t in metrics["tasks"].items():
            log.info("probe %s: %s; %s", task, t["verdict"],
                     {a: f"TSS-avg {v['tss_avg']:.3f} [{v['tss_avg_lo']:.3f}, {v['tss_avg_hi']:.3f}]"
                      for a, v in t.items() if a not in ("differences", "verdict")})
        write_json(p.metrics, metrics)
        write_headline(p.headline, metrics)
        write_json(p.detail, result)
        write_text(p.table, markdown_table(metrics, result))
        fig_path = figures.save(figure(metrics), p.figure)
        mlflow.log_metrics({f"{task}_{arm}_{k}": v for task, arms in metrics["tasks"].items() for arm, vals in arms.items()
                            if arm not in ("differences", "verdict") for k, v in vals.items() if isinstance(v, float)})
        mlflow.log_metrics({f"{task}_diff_{pair.replace('-', '_minus_')}_{k}": v for task, arms in metrics["tasks"].items()
                            for pair, d in arms["differences"].items() for k, v in d.items() if isinstance(v, float)})
        mlflow.set_tags({f"verdict.{task}": t["verdict"] for task, t in metrics["tasks"].items()})
        if result.get("tuned"):
            mlflow.set_tag("probe.tuned_strategy", str(result["tuned"]["strategy"]))
        mlflow.log_dict(result, "probe_detail.json")
        mlflow.log_artifact(str(p.table), "probe")
        mlflow.log_artifact(str(fig_path), "figures")
    return metrics
