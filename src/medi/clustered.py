"""Probe metrics from per-site prediction counts, and a two-way clustered bootstrap for their uncertainty.

The probe's design is crossed: every run trains on one training site per class (a TSS combination; runs
that share a site are correlated), and every run is scored on the same test sites (tiles of one site are
correlated). Runs are therefore not independent replicates, and neither are test tiles. The bootstrap here
resamples both kinds of cluster, each within its class:
- the training sites of each class (a run's weight is the product of its sites' multiplicities, so a
  resampled world keeps the crossed structure of the combinations), and
- the test sites of each class (a site's tiles come and go together);
- and, when the runs spread over several trained generators per method, the generators (a run's weight is
  also multiplied by its generator's multiplicity).
Every method is scored on the same resampled worlds, so differences between methods are paired.

Everything is computed from `counts[r, s, k]`: how many tiles of test site s run r predicted as class k.
From these: per-site accuracy, TSS-avg (mean over sites), balanced accuracy over tiles ("overall"),
Matthews correlation (multiclass, as scikit-learn defines it) and the worst site.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

METRICS = ("overall", "tss_avg", "mcc", "worst_tss")
LEVEL = 0.95


@dataclass(frozen=True)
class Design:
    """Cluster structure of one task's runs and test sites."""
    site_class: np.ndarray                  # (S,) class index of each test site
    run_sites: np.ndarray                   # (R, K) index into `train_sites` of each run's site per class
    train_site_class: np.ndarray            # (T,) class index of each candidate training site
    n_classes: int
    run_generator: np.ndarray | None = None  # (R,) generator of each run (None: one generator)
    n_generators: int = 1

    def resample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`n` bootstrap worlds: run weights (n, R), test-site weights (n, S) and the training-site
        multiplicities (n, T) the run weights are products of."""
        site_w = _multiplicities(self.site_class, self.n_classes, rng, n)
        train_w = _multiplicities(self.train_site_class, self.n_classes, rng, n)
        run_w = np.prod(train_w[:, self.run_sites], axis=2)          # (n, R, K) -> (n, R)
        if self.n_generators > 1:
            gen_w = _multiplicities(np.zeros(self.n_generators, int), 1, rng, n)
            run_w = run_w * gen_w[:, self.run_generator]
        return run_w, site_w, train_w


def _multiplicities(cluster_class: np.ndarray, n_classes: int, rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, C) counts of each cluster in n resamples drawn with replacement within each class."""
    out = np.zeros((n, len(cluster_class)))
    for k in range(n_classes):
        members = np.flatnonzero(cluster_class == k)
        if len(members):
            picks = rng.integers(0, len(members), (n, len(members)))
            np.add.at(out, (np.arange(n)[:, None], members[picks]), 1.0)
    return out


def per_run(counts: np.ndarray, site_class: np.ndarray, site_w: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric per (world, run) for test-site weights `site_w` (B, S); counts (R, S, K)."""
    counts = counts.astype(float)
    n_classes = counts.shape[2]
    n_s = counts.sum(axis=2)                                           # (R, S)
    correct = np.take_along_axis(counts, site_class[None, :, None], axis=2)[..., 0]
    acc = correct / np.maximum(n_s, 1)
    onehot = np.eye(n_classes)[site_class]                             # (S, K)
    present = site_w @ onehot > 0                                      # (B, K) classes with a site in the world
    tss_avg = (site_w @ acc.T) / site_w.sum(axis=1, keepdims=True)     # (B, R)
    # confusion[b, r, i, j]: tiles of true class i predicted j, each site weighted
    confusion = np.einsum("bs,si,rsj->brij", site_w, onehot, counts, optimize=True)
    true_n = confusion.sum(axis=3)
    recall = np.divide(np.diagonal(confusion, axis1=2, axis2=3), true_n, out=np.zeros_like(true_n), where=true_n > 0)
    overall = (recall * present[:, None, :]).sum(axis=2) / present.sum(axis=1, keepdims=True)
    worst = np.where(site_w[:, None, :] > 0, acc[None], np.inf).min(axis=2)
    return {"overall": overall, "tss_avg": tss_avg, "mcc": _mcc(confusion), "worst_tss": worst}


def _mcc(confusion: np.ndarray) -> np.ndarray:
    """Multiclass Matthews correlation of confusion matrices (..., K, K), 0 where undefined (as scikit-learn)."""
    t = confusion.sum(axis=-1)
    p = confusion.sum(axis=-2)
    c = np.trace(confusion, axis1=-2, axis2=-1)
    s = confusion.sum(axis=(-2, -1))
    cov_ytyp = c * s - (t * p).sum(axis=-1)
    cov_ypyp = s ** 2 - (p * p).sum(axis=-1)
    cov_ytyt = s ** 2 - (t * t).sum(axis=-1)
    denom = np.sqrt(cov_ytyt * cov_ypyp)
    return np.divide(cov_ytyp, denom, out=np.zeros_like(cov_ytyp), where=denom > 0)


def point(counts: np.ndarray, site_class: np.ndarray) -> dict[str, np.ndarray]:
    """Each metric per run on the observed world (every site once)."""
    return {k: v[0] for k, v in per_run(counts, site_class, np.ones((1, counts.shape[1]))).items()}


def summarise(arms: Mapping[str, np.ndarray], design: Design, pairs: Sequence[tuple[str, str]], n_boot: int,
              seed: int, extra: Mapping[str, np.ndarray] | None = None, chunk: int = 250) -> dict:
    """Per arm: the mean over runs of every metric, its standard error over runs (the contract's `*_sem`;
    it ignores the clustering) and a 95 % clustered-bootstrap interval; per pair (a, b): the paired difference
    a - b with its interval. `extra` adds per-run figures (R,) of each arm (e.g. seen-site accuracy; NaN: the
    run has none) whose interval only resamples training sites. Percentile intervals of `n_boot` worlds drawn with `seed`."""
    names = list(arms)
    runs = design.run_sites.shape[0]
    obs = {a: point(arms[a], design.site_class) for a in names}
    draws = {a: {m: [] for m in METRICS} for a in names}
    extra_draws: dict[str, list] = {a: [] for a in (extra or {})}
    rng = np.random.default_rng([seed, 31337])
    done = skipped = 0
    while done < n_boot:
        run_w, site_w, _ = design.resample(rng, min(chunk, n_boot - done))
        keep = run_w.sum(axis=1) > 0                 # a subset of combinations can lose every run: redraw
        skipped += int((~keep).sum())
        run_w, site_w = run_w[keep], site_w[keep]
        if not len(run_w):
            if skipped > 100 * n_boot:
                raise RuntimeError("the bootstrap cannot draw a world with runs in it")
            continue
        norm = run_w / run_w.sum(axis=1, keepdims=True)
        for a in names:
            for m, values in per_run(arms[a], design.site_class, site_w).items():
                draws[a][m].append((norm * values).sum(axis=1))
        for a, values in (extra or {}).items():           # runs without a value (NaN) weigh nothing
            w = run_w * ~np.isnan(values)
            total = w.sum(axis=1)                           # 0: the world drew none of the runs with a value
            extra_draws[a].append(np.where(total > 0, np.nan_to_num(values) @ w.T / np.where(total > 0, total, 1),
                                           np.nan))
        done += len(run_w)
    draws = {a: {m: np.concatenate(v)[:n_boot] for m, v in ms.items()} for a, ms in draws.items()}
    lo_q, hi_q = (1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2

    def interval(x: np.ndarray) -> tuple[float, float]:
        return float(np.quantile(x, lo_q)), float(np.quantile(x, hi_q))

    out: dict = {"arms": {}, "differences": {}}
    for a in names:
        fig: dict = {"runs": runs}
        for m in METRICS:
            values = obs[a][m]
            fig[m] = float(values.mean())
            fig[f"{m}_sem"] = float(values.std(ddof=1) / np.sqrt(runs)) if runs > 1 else 0.0
            fig[f"{m}_lo"], fig[f"{m}_hi"] = interval(draws[a][m])
        if extra and a in extra and not np.isnan(extra[a]).all():
            values = extra[a][~np.isnan(extra[a])]
            fig["seen_sites"] = float(values.mean())
            fig["seen_sites_runs"] = int(len(values))
            fig["seen_sites_sem"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
            drawn = np.concatenate(extra_draws[a])[:n_boot]
            fig["seen_sites_lo"], fig["seen_sites_hi"] = interval(drawn[np.isfinite(drawn)])
        out["arms"][a] = fig
    for a, b in pairs:
        diff: dict = {}
        for m in METRICS:
            diff[m] = float((obs[a][m] - obs[b][m]).mean())
            diff[f"{m}_lo"], diff[f"{m}_hi"] = interval(draws[a][m] - draws[b][m])
        diff["verdict"] = verdict(diff["tss_avg_lo"], diff["tss_avg_hi"])
        out["differences"][f"{a}-{b}"] = diff
    out["bootstrap"] = {"worlds": n_boot, "seed": seed, "level": LEVEL, "redrawn": skipped}
    return out


def verdict(lo: float, hi: float) -> str:
    """'better' when the interval of a paired difference lies above 0, 'worse' below, else 'no difference shown'."""
    if lo > 0:
        return "better"
    if hi < 0:
        return "worse"
    return "no difference shown"
