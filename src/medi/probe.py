"""The paper's linear probe under subpopulation shift (`medi probe`, its Table 1).

For each task (a set of classes) and each run (one training TSS per class, all different, as when every
cancer type comes from a single hospital):
- take `real_per_class` real tiles of each class from its chosen TSS;
- add `ratio` synthetic tiles per real one: `none` adds none; `cls` adds CLS samples uniform over the
  classes; `medi` adds MeDi samples spread over (class, TSS) pairs by `probe.strategy` (below);
- fit a logistic regression (balanced class weights) on the encoder's embeddings;
- test on every holdout tile of the task's classes (sites the diffusion models never saw).

Metrics per run: balanced accuracy overall, accuracy per holdout TSS averaged (TSS-avg; each TSS holds one
class), Matthews correlation, and the worst TSS; mean and standard error over runs. The real draws of a
run are the same for every method (a paired comparison). Synthetic tiles come from pools generated once
per model and (class, TSS) pair (`samples/probe_MODEL/`, with a manifest like any sample set); runs draw
from them. Runs are independent and fitted in parallel (joblib) on cached embeddings.

Strategies for a site-conditioned model's tiles (`probe.strategy`; a run's chosen sites are one per class):
- `grid` (the paper's): equal counts for every class x every chosen site, so each class appears at every
  site of the run, seen pair or not, which breaks the class-site correlation.
- `unseen`: only the pairs the real data lacks (a class at another class's chosen site), equal counts.
- `balanced` (frequency balancing): each synthetic tile goes to the (class, chosen site) pair with the fewest
  tiles so far, real ones included, so the rarest pairs fill first; with few synthetic tiles it is `unseen`,
  with many it tends to `grid`.
- `uniform`: equal counts per class, each tile at a site drawn uniformly from all training sites of the
  task's classes (not only the run's), the widest spread of stains.
A model without site conditioning (CLS) always gets equal counts per class.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from medi.errors import MediError

log = logging.getLogger(__name__)

METHODS = ("none", "cls", "medi")
STRATEGIES = ("grid", "unseen", "balanced", "uniform")


@dataclass
class TaskData:
    """Everything one task's runs need, as arrays (embeddings are looked up by row)."""
    classes: list[str]
    combos: list[tuple[str, ...]]                       # one training TSS per class, per run
    real: dict[tuple[str, str], np.ndarray]             # (class, TSS) -> embeddings of its real training tiles
    pools: dict[str, dict[tuple[str, str | None], np.ndarray]]   # method -> (class, TSS or None) -> embeddings
    test_x: np.ndarray
    test_y: np.ndarray                                  # class index
    test_tss: np.ndarray
    sites: list[str]                                    # every candidate training TSS of the task's classes


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


def draw(pool: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n rows of a pool, without replacement when it is large enough."""
    if len(pool) == 0:
        raise MediError("an empty synthetic pool was asked for images")
    return pool[rng.choice(len(pool), n, replace=n > len(pool))]


def real_draws(task: TaskData, combo: tuple[str, ...], real_per_class: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per class, the rows of its chosen TSS's real tiles that go into training (the rest test the seen sites)."""
    return [rng.choice(len(task.real[(c, t)]), real_per_class, replace=False) for c, t in zip(task.classes, combo)]


def _equal(keys: list, n: int, rng: np.random.Generator) -> list[tuple]:
    """n split as evenly as possible over keys; which keys get the remainder varies by run."""
    share = np.full(len(keys), n // len(keys)) + (np.arange(len(keys)) < n % len(keys))
    return [(keys[i], int(k)) for i, k in zip(rng.permutation(len(keys)), share)]


def allocation(task: TaskData, combo: tuple[str, ...], real_counts: Sequence[int], method: str, strategy: str,
               n_syn: int, rng: np.random.Generator) -> list[tuple[tuple[str, str | None], int]]:
    """How many synthetic tiles each pool key gets: [((class, TSS or None), n), ...] (see the module doc)."""
    if method == "cls":
        return _equal([(c, None) for c in task.classes], n_syn, rng)
    own = dict(zip(task.classes, combo))
    if strategy == "grid":
        return _equal([(c, t) for c in task.classes for t in combo], n_syn, rng)
    if strategy == "unseen":
        return _equal([(c, t) for c in task.classes for t in combo if t != own[c]], n_syn, rng)
    if strategy == "balanced":
        keys = [(c, t) for c in task.classes for t in combo]
        total = np.array([real_counts[task.classes.index(c)] if t == own[c] else 0 for c, t in keys], float)
        given = np.zeros(len(keys), int)
        tiebreak = rng.random(len(keys))                   # equal totals: a per-run random order
        for _ in range(n_syn):
            i = int(np.lexsort((tiebreak, total))[0])
            given[i] += 1
            total[i] += 1
        return [(k, int(n)) for k, n in zip(keys, given)]
    if strategy == "uniform":
        out = []
        for c, n in _equal(list(task.classes), n_syn, rng):
            sites, counts = np.unique(rng.choice(task.sites, n), return_counts=True) if n else ([], [])
            out += [((c, str(t)), int(k)) for t, k in zip(sites, counts)]
        return out
    raise MediError(f"unknown probe strategy '{strategy}'; known: {', '.join(STRATEGIES)}")


def training_set(task: TaskData, combo: tuple[str, ...], picks: list[np.ndarray], method: str, ratio: float,
                 rng: np.random.Generator, strategy: str = "grid") -> tuple[np.ndarray, np.ndarray]:
    xs = [task.real[(c, t)][p] for c, t, p in zip(task.classes, combo, picks)]
    ys = [np.full(len(p), k) for k, p in enumerate(picks)]
    n_syn = int(round(ratio * sum(len(p) for p in picks)))
    if method != "none" and n_syn:
        for key, n in allocation(task, combo, [len(p) for p in picks], method, strategy, n_syn, rng):
            if n:
                xs.append(draw(task.pools[method][key], n, rng))
                ys.append(np.full(n, task.classes.index(key[0])))
    return np.concatenate(xs), np.concatenate(ys)


def seen_sites_test(task: TaskData, combo: tuple[str, ...], picks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The chosen TSS's real tiles not used for training: accuracy there vs on unseen sites is the shortcut."""
    xs, ys = [], []
    for k, (c, t, p) in enumerate(zip(task.classes, combo, picks)):
        rest = np.setdiff1d(np.arange(len(task.real[(c, t)])), p)
        xs.append(task.real[(c, t)][rest])
        ys.append(np.full(len(rest), k))
    return np.concatenate(xs), np.concatenate(ys)


def fit_and_score(x: np.ndarray, y: np.ndarray, task: TaskData, seen: tuple[np.ndarray, np.ndarray], C: float,
                  seed: int) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, matthews_corrcoef
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight="balanced", max_iter=500,
                                                             random_state=seed))
    pred = clf.fit(x, y).predict(task.test_x)
    per_tss = {t: float(np.mean(pred[task.test_tss == t] == task.test_y[task.test_tss == t]))
               for t in np.unique(task.test_tss)}
    out = {"overall": float(balanced_accuracy_score(task.test_y, pred)), "tss_avg": float(np.mean(list(per_tss.values()))),
           "mcc": float(matthews_corrcoef(task.test_y, pred)), "worst_tss": float(min(per_tss.values()))}
    if len(seen[1]):                    # mean accuracy over the classes whose training TSS has tiles left
        hit = clf.predict(seen[0]) == seen[1]
        out["seen_sites"] = float(np.mean([hit[seen[1] == k].mean() for k in np.unique(seen[1])]))
    return out


def one_run(task: TaskData, combo: tuple[str, ...], methods: Sequence[str], real_per_class: int, ratio: float,
            C: float, seed: Sequence[int], strategy: str = "grid") -> dict[str, dict[str, float]]:
    picks = real_draws(task, combo, real_per_class, np.random.default_rng([*seed, 0]))   # the same for every method
    seen = seen_sites_test(task, combo, picks)
    out = {}
    for method in methods:
        x, y = training_set(task, combo, picks, method, ratio, np.random.default_rng([*seed, 1 + METHODS.index(method)]),
                            strategy)
        out[method] = fit_and_score(x, y, task, seen, C, int(seed[0]))
    return out


def run_task(task: TaskData, methods: Sequence[str], real_per_class: int, ratio: float, C: float, seed: int,
             task_id: int, workers: int = -1, strategy: str = "grid") -> dict[str, dict]:
    """All runs of one task in parallel; per method the mean, standard error and per-run figures."""
    from joblib import Parallel, delayed

    results = Parallel(n_jobs=workers)(
        delayed(one_run)(task, combo, methods, real_per_class, ratio, C, (seed, task_id, i), strategy)
        for i, combo in enumerate(task.combos))
    summary = {}
    for method in methods:
        runs = pd.DataFrame([r[method] for r in results])
        sem = runs.std(ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else runs.iloc[0] * 0
        summary[method] = {"overall": float(runs["overall"].mean()), "overall_sem": float(sem["overall"]),
                           "tss_avg": float(runs["tss_avg"].mean()), "tss_avg_sem": float(sem["tss_avg"]),
                           "mcc": float(runs["mcc"].mean()), "worst_tss": float(runs["worst_tss"].mean()),
                           "runs": int(len(runs))}
        if "seen_sites" in runs:          # accuracy on held-out tiles of the training sites: the shortcut's other side
            summary[method]["seen_sites"] = float(runs["seen_sites"].mean())
            summary[method]["seen_sites_sem"] = float(sem["seen_sites"])
    return summary


def build_task(classes: Sequence[str], train_index: pd.DataFrame, holdout_index: pd.DataFrame,
               embeddings: Mapping[int, np.ndarray], pools: Mapping[str, Mapping[tuple[str, str | None], np.ndarray]],
               real_per_class: int, runs: int, seed: int) -> TaskData:
    """Arrays of one task: real embeddings per (class, TSS), the test set, and the runs' TSS combinations.
    `embeddings` maps a tile's idx (row of the packed tiles) to its embedding."""
    classes = list(classes)
    candidates = task_candidates(classes, train_index, real_per_class)
    combos = combinations(candidates, runs, seed)
    real = {(c, t): np.stack([embeddings[i] for i in train_index[(train_index["class"] == c) & (train_index["tss"] == t)]["idx"]])
            for c, cands in zip(classes, candidates) for t in cands}
    test = holdout_index[holdout_index["class"].isin(classes)]
    if test.empty:
        raise MediError(f"probe: the holdout split has no tiles of {classes}")
    return TaskData(classes, combos, real, {m: dict(p) for m, p in pools.items()},
                    np.stack([embeddings[i] for i in test["idx"]]), test["class"].map(classes.index).to_numpy(),
                    test["tss"].to_numpy(str), list(dict.fromkeys(t for cands in candidates for t in cands)))


def pool_pairs(tasks: Mapping[str, Sequence[str]], train_index: pd.DataFrame, real_per_class: int,
               method: str) -> list[tuple[str, str | None]]:
    """The (class, TSS) pairs a method's pool needs: CLS one per class; MeDi every task class x every candidate
    TSS of the task's classes (seen and unseen pairs)."""
    pairs: list[tuple[str, str | None]] = []
    for classes in tasks.values():
        sites = [t for cands in task_candidates(classes, train_index, real_per_class) for t in cands]
        pairs += [(c, None) for c in classes] if method == "cls" else [(c, t) for c in classes for t in sites]
    return list(dict.fromkeys(pairs))


# ----------------------------------------------------------------------------------------------- the stage
PAPER_TABLE1 = {   # balanced accuracy in %, mean +- standard error (../shared/reference/tcga-ut.md)
    "nsclc": {"none": (74.31, 75.76), "cls": (79.99, 81.72), "medi": (81.37, 83.04)},
    "rcc": {"none": (73.25, 81.74), "cls": (78.21, 84.64), "medi": (74.87, 84.17)},
    "uterine": {"none": (67.73, 62.82), "cls": (67.77, 70.80), "medi": (74.86, 71.21)},
}


def synthetic_pool(cfg, method: str, pairs: list[tuple[str, str | None]], train_index: pd.DataFrame, spec,
                   model_dir=None, out=None) -> dict[tuple[str, str | None], np.ndarray]:
    """Generate (or resume) the pool of a method's model as a sample set (default `samples/probe_MODEL/`, the
    model from `models/MODEL`) and embed it."""
    import dataclasses
    from pathlib import Path

    from accelerate import PartialState

    from medi import embed, sample
    from medi.io import atomic_path
    from medi.model import MediDiffusion

    name = cfg.probe.models[method]
    model_dir = Path(model_dir) if model_dir else Path(cfg.model.output) / name
    model = MediDiffusion.load(model_dir).to(PartialState().device).eval()
    scfg = dataclasses.replace(cfg.sample, strategy="explicit", per_pair=cfg.probe.pool_per_pair,
                               pairs=[{"class": c, **({"tss": t} if t else {})} for c, t in pairs])
    rows = sample.plan(scfg, train_index, model.vocab.classes)
    rows = rows.assign(pool_key=[f"{c}|{t or ''}" for c, t in pairs for _ in range(cfg.probe.pool_per_pair)],
                       conditioned_on=",".join(["class", *model.vocab.attributes]), model=name,
                       scheduler=scfg.scheduler, steps=scfg.steps, guidance=scfg.guidance, precision=scfg.precision,
                       strategy="probe-pool")
    out = Path(out) if out else Path(cfg.sample.output.format(model=f"probe_{name}"))
    sample.generate_set(model, rows, out, scfg.scheduler, scfg.steps, scfg.guidance, scfg.precision, cfg.model)
    with atomic_path(out / sample.MANIFEST) as tmp:
        rows.to_csv(tmp, index=False)
    vectors = embed.embed(sample.load_images(out, rows), spec, cfg.encoder.cache, cfg.encoder.batch_size)
    return {(c, t): vectors[(rows["pool_key"] == f"{c}|{t or ''}").to_numpy()] for c, t in pairs}


def markdown_table(result: dict) -> str:
    strategy = result.get("settings", {}).get("strategy", "grid")
    lines = [f"Linear probe, balanced accuracy in % (mean +- standard error over runs); encoder: {result['encoder']}; "
             f"MeDi tiles over (class, site) pairs: {strategy}.",
             "Paper (Table 1, UNI embeddings of TCGA-UT) in brackets: same protocol, other data and encoder, so compare "
             "directions, not values.", "",
             "| task | method | runs | overall | TSS-avg | MCC | worst TSS | training sites |", "|---|---|---|---|---|---|---|---|"]
    for task, methods in result["tasks"].items():
        for method, m in methods.items():
            paper = PAPER_TABLE1.get(task, {}).get(method)
            ref = (f" [{paper[0]:.2f}]", f" [{paper[1]:.2f}]") if paper else ("", "")
            seen = f"{100 * m['seen_sites']:.2f}" if "seen_sites" in m else "-"
            lines.append(f"| {task} | {method} | {m['runs']} | {100 * m['overall']:.2f} +- {100 * m['overall_sem']:.2f}{ref[0]} "
                         f"| {100 * m['tss_avg']:.2f} +- {100 * m['tss_avg_sem']:.2f}{ref[1]} | {m['mcc']:.3f} "
                         f"| {100 * m['worst_tss']:.2f} | {seen} |")
    return "\n".join(lines) + "\n"


def figure(result: dict):
    """Per task, TSS-avg balanced accuracy on unseen sites per method (error bars: standard error), with the
    accuracy on held-out tiles of the training sites beside it (the shortcut's size)."""
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.6), squeeze=False)
    colours = {"none": "tab:gray", "cls": "tab:red", "medi": "tab:blue"}
    for ax, task in zip(axes[0], tasks):
        methods = list(result["tasks"][task])
        m = result["tasks"][task]
        x = np.arange(len(methods))
        ax.bar(x - 0.2, [m[k]["tss_avg"] for k in methods], 0.4, yerr=[m[k]["tss_avg_sem"] for k in methods],
               color=[colours.get(k, "C0") for k in methods], label="unseen sites (TSS-avg)")
        ax.bar(x + 0.2, [m[k].get("seen_sites", np.nan) for k in methods], 0.4, color="none",
               edgecolor=[colours.get(k, "C0") for k in methods], hatch="//", label="training sites")
        ax.set_xticks(x)
        ax.set_xticklabels(methods)
        ax.set_ylim(0, 1)
        ax.set_title(f"{task} ({m[methods[0]]['runs']} runs)", fontsize=9)
        ax.set_ylabel("balanced accuracy")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Linear probe under subpopulation shift; encoder {result['encoder']}", fontsize=8)
    fig.tight_layout()
    return fig


def load_splits(cfg) -> tuple[pd.DataFrame, pd.DataFrame]:
    from pathlib import Path

    split = Path(cfg.split.output)
    for name in ("train.parquet", "holdout.parquet"):
        if not (split / name).exists():
            raise MediError(f"{split / name} not found; run `medi split` (or `dvc repro split`) first")
    return pd.read_parquet(split / "train.parquet"), pd.read_parquet(split / "holdout.parquet")


def real_embeddings(cfg, spec, train_index: pd.DataFrame, holdout_index: pd.DataFrame) -> dict[int, np.ndarray]:
    """Embeddings of the real tiles of every task's classes, by tile idx (from the cache when there)."""
    from medi import data, embed

    tiles = data.load_tiles(cfg.data.output)
    classes = sorted({c for cs in cfg.probe.tasks.values() for c in cs})
    needed = pd.concat([train_index[train_index["class"].isin(classes)], holdout_index[holdout_index["class"].isin(classes)]])
    idx = np.sort(needed["idx"].to_numpy())
    return dict(zip(idx.tolist(), embed.embed(np.asarray(tiles[idx]), spec, cfg.encoder.cache, cfg.encoder.batch_size)))


def prepare(cfg):
    """The encoder spec and every task's arrays: real embeddings (cached), synthetic pools (generated once)."""
    from medi import embed

    p = cfg.probe
    train_index, holdout_index = load_splits(cfg)
    spec = embed.resolve(cfg.encoder.name, cfg.encoder.weights, cfg.encoder.input_size, cfg.encoder.seed)
    embeddings = real_embeddings(cfg, spec, train_index, holdout_index)
    pools = {m: synthetic_pool(cfg, m, pool_pairs(p.tasks, train_index, p.real_per_class, m), train_index, spec)
             for m in p.methods if m != "none"}
    tasks = {task: build_task(cs, train_index, holdout_index, embeddings, pools, p.real_per_class, p.runs, p.seed)
             for task, cs in p.tasks.items()}
    return spec, tasks


def run_stage(cfg) -> dict:
    """`medi probe`: embeddings, synthetic pools, every task x method x run; metrics/probe.json, table, figure."""
    import time

    import mlflow

    from medi import figures, tracking
    from medi.io import write_json, write_text

    p = cfg.probe
    with tracking.stage_run(cfg, "probe", ("encoder", "probe", "sample"), run_name="probe"):
        t0 = time.perf_counter()
        spec, tasks = prepare(cfg)
        prep_seconds = time.perf_counter() - t0
        result = {"encoder": spec.describe(), "tasks": {}, "settings": cfg.section_dict("probe")}
        t1 = time.perf_counter()
        for i, (task, td) in enumerate(tasks.items()):
            result["tasks"][task] = run_task(td, p.methods, p.real_per_class, p.ratio, p.C, p.seed, i, p.workers,
                                             p.strategy)
            log.info("probe %s (%d runs): %s", task, len(td.combos),
                     {m: f"TSS-avg {v['tss_avg']:.3f}+-{v['tss_avg_sem']:.3f}" for m, v in result["tasks"][task].items()})
        result["seconds"] = {"embeddings_and_pools": prep_seconds, "runs": time.perf_counter() - t1}
        write_json(p.metrics, result)
        write_text(p.table, markdown_table(result))
        fig_path = figures.save(figure(result), p.figure)
        mlflow.log_metrics({f"{task}_{m}_{k}": v for task, ms in result["tasks"].items() for m, vals in ms.items()
                            for k, v in vals.items() if isinstance(v, float)})
        mlflow.log_dict(result, "probe.json")
        mlflow.log_artifact(str(p.table), "probe")
        mlflow.log_artifact(str(fig_path), "figures")
    return result
