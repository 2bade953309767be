"""The conditioning ablation of docs/conditioning.md: mechanisms x training seeds x guidance scales, scored by
the unseen-pairs evaluation (`medi.unseen`). Run in a pipeline folder after `dvc repro split`:

    python bench/conditioning_ablation.py train additive 0          # one training (default budget, params.yaml)
    python bench/conditioning_ablation.py train stain_true 0        # an oracle: the stain pathway with the world's true stains
    python bench/conditioning_ablation.py train stain_fitted_level 0   # the stain pathway, white level fitted (not adopted)
    python bench/conditioning_ablation.py evaluate                   # every trained model x every guidance
    python bench/conditioning_ablation.py evaluate --only stain --joint   # those models, joint guidance settings only
    python bench/conditioning_ablation.py table                      # mean and spread over the seeds (markdown)
    python bench/conditioning_ablation.py paired stain "2 / 2 colour kept" "2 / 2"   # paired over the unseen pairs
    python bench/conditioning_ablation.py paired stain_true "1 / 1" "1 / 1" --against stain   # two mechanisms, paired
    python bench/conditioning_ablation.py figure                     # the trade-off plot (docs/figures/)
    python bench/conditioning_ablation.py fid --only additive stain  # FID of those models (the fid stage's setting)
    python bench/conditioning_ablation.py fid --only stain --guidance 2 --colour guided   # ... sampled with guidance 2

A mechanism is a set of param overrides on params.yaml (MECHANISMS below); nothing else changes between
them. Models, timings and results go under artifacts/ablation/ (git-ignored); `evaluate` skips a (model,
guidance) already scored, so it resumes after a kill, and `train` resumes from its checkpoints.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
import time
import typing
from pathlib import Path

import numpy as np
import pandas as pd

from medi import config
from medi.io import read_json, write_json

ROOT = Path("artifacts/ablation")
MECHANISMS: dict[str, dict] = {
    "additive": {},                                               # the paper's (today's default)
    "scale_shift": {"model.conditioning": "scale_shift"},         # condition modulates every ResNet block's norm
    "output": {"model.metadata_route": "output"},                 # the site modulates the output norm only
    "nested": {"model.nested_dropout": True},                     # the site is never seen without the class
    "scale_shift_nested": {"model.conditioning": "scale_shift",   # the two that each moved one side of the
                           "model.nested_dropout": True},         # trade-off (stain / class), together
    "stain": {"model.site_pathway": "stain"},                     # the site as its estimated stain only (medi.stain)
    "stain_both": {"model.site_pathway": "both"},                 # the stain, and the site's embedding as well
    "stain_true": {"model.site_pathway": "stain"},                # ORACLE below: the stain with the world's true maps
    "stain_long": {"model.site_pathway": "stain", "train.max_steps": 1950},   # the default trained 3x longer
    "stain_true_long": {"model.site_pathway": "stain", "train.max_steps": 1950},   # ORACLE, trained 3x longer
    "stain_fitted_level": {"model.site_pathway": "stain"},        # ESTIMATOR below: the white level fitted
    "stain_minsnr": {"model.site_pathway": "stain", "train.snr_gamma": 5.0},   # min-SNR-5 loss weighting
    "stain_b16": {"model.site_pathway": "stain", "train.batch_size": 16,       # half the batch, the steps that fit
                  "train.max_steps": 1100},                                    # in the default's time (1.7x the steps/s)
}
# Oracles (synthetic world only; not options of the product): `stain_true` trains and samples the stain pathway with
# maps from the world's true stains (bench/stain_oracle.py `true_stains`: vectors, both intensities, white) in place
# of the estimates. The maps travel in the weights, so `evaluate` and `fid` need nothing more. What perfect stain
# estimates would give this generator; `stain_true_long` the same at three times the budget (what the stain estimates
# cost once the generator is more faithful).
ORACLES = {"stain_true", "stain_true_long"}
# Estimators measured and not adopted (medi.stain.fit's options that no param reaches): `stain_fitted_level` fits the
# pathway with the white's common level fitted to the stained pixels (`level="fitted"`) instead of the brightest
# class's (docs/conditioning.md).
ESTIMATORS = {"stain_fitted_level": {"level": "fitted"}}
# (class guidance, metadata guidance, colour): plain, joint 2 (the two settings before compositional guidance), the
# site alone pushed, both apart (all with the usual guidance, "guided"), and joint 2 keeping the conditional
# prediction's mean colour (sample.guidance_colour: conditional, the default since it was measured here).
GUIDANCE = [(1.0, 1.0, "guided"), (2.0, 2.0, "guided"), (1.0, 3.0, "guided"), (2.0, 4.0, "guided"),
            (2.0, 2.0, "conditional")]


def guidance_label(g_c: float, g_m: float, colour: str = "guided") -> str:
    """How tables, figures and file names show a guidance setting ("2 / 2" or "2 / 2 colour kept")."""
    return f"{g_c:g} / {g_m:g}" + (" colour kept" if colour == "conditional" else "")


def model_cfg(params: str, mechanism: str, seed: int) -> config.Config:
    out = ROOT / f"{mechanism}-seed{seed}"
    return config.load(params, {**MECHANISMS[mechanism], "train.seed": seed, "model.output": str(out / "models")})


def cmd_train(args) -> None:
    from medi import train

    cfg = model_cfg(args.params, args.mechanism, args.seed)
    train_index = pd.read_parquet(Path(cfg.split.output) / "train.parquet")
    t0 = time.perf_counter()
    with patched(args.mechanism, cfg.data.root):
        result = train.train(cfg, "medi", train_index, Path(cfg.data.output) / "tiles.npy")
    write_json(Path(cfg.model.output).parent / "train.json",
               {"mechanism": args.mechanism, "seed": args.seed, "overrides": MECHANISMS[args.mechanism],
                "steps": result.steps, "final_loss": result.final_loss, "seconds": time.perf_counter() - t0,
                "images_per_second": result.images_per_second})
    print(f"trained {args.mechanism} seed {args.seed}: loss {result.final_loss:.4f} in {time.perf_counter() - t0:.0f}s")


def patched(mechanism: str, root: str):
    """The context a mechanism trains in: an oracle's true stain maps, an estimator's options, or nothing."""
    if mechanism in ORACLES:
        return true_stain_maps(root)
    if mechanism in ESTIMATORS:
        return stain_estimator(**ESTIMATORS[mechanism])
    return contextlib.nullcontext()


@contextlib.contextmanager
def true_stain_maps(root: str):
    """While open, a stain pathway fitted in training takes the world's true stains (both intensities transferred;
    the reference: the estimated pooled vectors, intensities 1, the median white) instead of its estimates."""
    from medi.stain import StainPathway, fit
    from stain_oracle import true_stains

    estimate = StainPathway.fit

    def oracle(self, tiles, train_index, sites, seed):
        reference, _ = fit(tiles, train_index, [str(s) for s in sites], seed)
        reference = dataclasses.replace(reference, intensity=np.ones(2))
        true = true_stains(root, [str(s) for s in sites])
        self.set(reference, {i: true[str(s)] for i, s in enumerate(sites, 1)}, transferred=(True, True))
        self.estimates = {"reference": reference.to_json(), **{s: st.to_json() for s, st in true.items()}}

    StainPathway.fit = oracle
    try:
        yield
    finally:
        StainPathway.fit = estimate


@contextlib.contextmanager
def stain_estimator(**options):
    """While open, a stain pathway fitted in training estimates its stains with medi.stain.fit's `options`."""
    from medi import stain

    estimate = stain.fit
    stain.fit = functools.partial(estimate, **options)
    try:
        yield
    finally:
        stain.fit = estimate


def real_features(base: config.Config):
    """(training split in `idx` order, the fid stage's extractor, its features of the real training tiles)."""
    from medi import artifacts
    from medi.fidelity import Extractor

    extractor = Extractor.from_config(base.fid.encoder)
    train_index = pd.read_parquet(Path(base.split.output) / "train.parquet").sort_values("idx").reset_index(drop=True)
    tiles = artifacts.load_tiles(base.data.output)
    return train_index, extractor, extractor.cached_features(tiles[train_index["idx"].to_numpy()], base.fid.cache,
                                                             verbose=False)


def trained(only) -> list[Path]:
    """The folders of the trained models (of the mechanisms `only`, when given)."""
    return [f for f in sorted(ROOT.glob("*-seed*")) if (f / "models" / "medi" / "model.safetensors").exists()
            and (not only or f.name.rsplit("-seed", 1)[0] in only)]


def cmd_evaluate(args) -> None:
    from medi import figures, unseen
    from medi.fidelity import condition_classifiers

    base = config.load(args.params)
    train_index, extractor, real = real_features(base)
    classifiers = condition_classifiers(real.float().numpy(), train_index, base.fid.seed)   # once for all models
    for folder in trained(args.only):
        info = read_json(folder / "train.json")
        cfg = model_cfg(args.params, info["mechanism"], info["seed"])
        for g_c, g_m, colour in GUIDANCE:
            if args.joint and g_c != g_m:
                continue
            out = folder / f"eval-g{g_c:g}-m{g_m:g}{'-kept' if colour == 'conditional' else ''}.json"
            if out.exists():
                continue
            gcfg = config.override(cfg, {"sample.guidance": g_c, "sample.metadata_guidance": g_m,
                                         "sample.guidance_colour": colour})
            t0 = time.perf_counter()
            headline, cells, images = unseen.evaluate(gcfg, "medi", extractor=extractor, train_index=train_index,
                                                      classifiers=classifiers)
            write_json(out, {"mechanism": info["mechanism"], "seed": info["seed"], "guidance": g_c,
                             "metadata_guidance": g_m, "guidance_colour": colour, "headline": headline,
                             "cells": cells.to_dict("records"),
                             "seconds": time.perf_counter() - t0})
            figures.save(unseen.grid_figure(cells, images, f"{folder.name}, guidance {guidance_label(g_c, g_m, colour)}: "
                                                           f"rows = class, columns = the largest site of each class"),
                         out.with_suffix(".png"))
            print(f"{folder.name} g {guidance_label(g_c, g_m, colour)}: {json.dumps(headline)}", flush=True)


FIGURES = [("unseen_stain_rank", "stain rank, unseen"), ("unseen_site_accuracy", "site acc., unseen"),
           ("unseen_class_accuracy", "class acc., unseen"), ("seen_stain_rank", "stain rank, seen"),
           ("seen_site_accuracy", "site acc., seen"), ("seen_class_accuracy", "class acc., seen")]
# the same unseen pairs read by the deconfounded classifiers (evaluations made since they exist: medi.unseen)
DECONFOUNDED = [("deconf_unseen_site_accuracy", "site acc., unseen, deconf."),
                ("deconf_unseen_class_accuracy", "class acc., unseen, deconf.")]


def cmd_table(args) -> None:
    frame = summary()
    shown = FIGURES + [f for f in DECONFOUNDED if f[0] in frame]
    order = {m: i for i, m in enumerate(MECHANISMS)}
    lines = ["| mechanism | guidance class / site | seeds | " + " | ".join(label for _, label in shown) + " |",
             "|---|---|---|" + "---|" * len(shown)]
    for (mech, guid), g in sorted(frame.groupby(["mechanism", "guidance"]), key=lambda kv: (order[kv[0][0]], kv[0][1])):
        cells = []
        for key, _ in shown:
            v = g[key].dropna().to_numpy(float)
            cells.append("-" if not len(v) else f"{v.mean():.3f} ± {np.ptp(v) / 2:.3f}" if len(v) > 1 else f"{v[0]:.3f}")
        lines.append(f"| {mech} | {guid} | {','.join(map(str, sorted(g['seed'])))} | " + " | ".join(cells) + " |")
    truth = frame.filter(like="ceiling_").dropna(how="all")
    if len(truth):                  # the same for every evaluation: the world's own tiles of the pairs
        first = truth.iloc[0]
        lines.append("| ground truth | | | " + " | ".join(_cell(first.get(f"ceiling_{key}")) for key, _ in shown) + " |")
    print("\n".join(lines))
    trained = [read_json(p) for p in sorted(ROOT.glob("*-seed*/train.json"))]
    print("\n" + "\n".join(f"- {t['mechanism']} seed {t['seed']}: {t['steps']} steps, final loss {t['final_loss']:.4f}, "
                           f"{t['seconds']:.0f} s" for t in trained))


def _cell(value) -> str:
    return "-" if value is None or pd.isna(value) else f"{value:.3f}"


def summary() -> pd.DataFrame:
    """One row per evaluation: mechanism, seed, guidance label and the headline figures (ground truth's included)."""
    rows = [read_json(p) for p in sorted(ROOT.glob("*-seed*/eval-*.json"))]
    if not rows:
        sys.exit("no evaluations under artifacts/ablation; run `evaluate` first")
    return pd.DataFrame([{"mechanism": r["mechanism"], "seed": r["seed"],
                          "guidance": guidance_label(r["guidance"], r["metadata_guidance"], r.get("guidance_colour", "guided")),
                          **r["headline"]} for r in rows])


TARGETS = {"unseen_stain_rank": 0.25, "unseen_site_accuracy": 0.25, "unseen_class_accuracy": 0.65}   # issue 16


def cmd_figure(args) -> None:
    """Unseen class accuracy against unseen stain rank and against unseen site accuracy, and the same two
    accuracies by the deconfounded classifiers (where every evaluation has them): every mechanism x guidance (mean
    of the seeds, bars = their range), the issue's target region, and the ground truth scored with the same
    instrument (where an evaluation recorded it)."""
    import matplotlib.pyplot as plt

    from medi import figures

    frame = summary()
    panels = [("unseen_stain_rank", "unseen_class_accuracy", "le",
               "stain rank of the conditioned site, unseen pairs (0 = nearest, 0.5 = chance)"),
              ("unseen_site_accuracy", "unseen_class_accuracy", "ge", "site accuracy, unseen pairs (chance 0.023)")]
    if frame.filter(like="deconf_unseen").notna().all().all() and len(frame.filter(like="deconf_unseen").columns):
        panels.append(("deconf_unseen_site_accuracy", "deconf_unseen_class_accuracy", "ge",
                       "deconfounded classifiers: site accuracy (x), class accuracy (y)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.2), sharey=True)
    marks = {guidance_label(*g): m for g, m in zip(GUIDANCE, "osD^v")}
    colours = dict(zip(MECHANISMS, plt.get_cmap("tab10").colors))
    for ax, (x, y, better, label) in zip(axes, panels):
        x0, y0 = TARGETS[x.removeprefix("deconf_")], TARGETS[y.removeprefix("deconf_")]
        ax.set_xlim(0.0, 0.45) if better == "le" else ax.set_xlim(0.0, 0.55)
        left, right = ax.get_xlim()
        ax.add_patch(plt.Rectangle((left, y0), x0 - left, 1 - y0, color="0.9", zorder=0) if better == "le" else
                     plt.Rectangle((x0, y0), right - x0, 1 - y0, color="0.9", zorder=0))
        ax.text(x0, 0.98, "targets ", fontsize=8, color="0.35", ha="right" if better == "le" else "left", va="top")
        for mech, g in frame.groupby("mechanism"):
            stats = g.groupby("guidance")[[x, y]].agg(["mean", "min", "max"])
            for guid, row in stats.iterrows():
                ax.errorbar(row[(x, "mean")], row[(y, "mean")],
                            xerr=[[row[(x, "mean")] - row[(x, "min")]], [row[(x, "max")] - row[(x, "mean")]]],
                            yerr=[[row[(y, "mean")] - row[(y, "min")]], [row[(y, "max")] - row[(y, "mean")]]],
                            fmt=marks.get(guid, "x"), color=colours[mech], ms=6, elinewidth=0.8, capsize=2)
        truth = frame.filter(like="ceiling_").dropna()
        if len(truth):
            ax.plot(truth[f"ceiling_{x}"].iloc[0], truth[f"ceiling_{y}"].iloc[0], "*", color="k", ms=14)
        ax.set_xlabel(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("class accuracy, unseen pairs (chance 0.143)")
    handles = [plt.Line2D([], [], color=c, lw=3) for c in colours.values()] + \
              [plt.Line2D([], [], color="0.3", marker=m, ls="") for m in marks.values()] + \
              [plt.Line2D([], [], color="k", marker="*", ms=12, ls="")]
    names = [*colours] + [f"guidance {g} (class / site)" for g in marks] + ["ground truth, same instrument"]
    fig.legend(handles, names, loc="lower center", ncol=6, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.08))
    seeds = ",".join(str(s) for s in sorted(frame.seed.unique()))
    fig.suptitle(f"Unseen (class, site) pairs: every mechanism x guidance (mean of training seeds {seeds}, bars = their "
                 f"range); shaded: the issue's targets (a setting meets them all only inside every panel's)", fontsize=10)
    print(figures.save(fig, args.out))


def cmd_fid(args) -> None:
    """FID overall and per class of every trained model on the sample stage's plan (params `sample`: the images
    the fid stage scores for the default model), against the training tiles in the fid stage's features; written
    to <model folder>/fid.json (skipped where present). With --guidance G [--colour C], sampled with that joint
    guidance instead (fid-gG.json, fid-gG-kept.json for the colour kept)."""
    from medi.fidelity import frechet, group_scores
    from medi.sampling import Sampler, conditions_of, generate, load_model, plan

    base = config.load(args.params)
    name = "fid.json"
    if args.guidance is not None:
        base = config.override(base, {"sample.guidance": args.guidance, "sample.metadata_guidance": None,
                                      "sample.guidance_colour": args.colour})
        name = f"fid-g{args.guidance:g}{'-kept' if args.colour == 'conditional' else ''}.json"
    train_index, extractor, real = real_features(base)
    for folder in trained(args.only):
        out = folder / name
        if out.exists():
            continue
        model = load_model(folder / "models" / "medi")
        rows = plan(base.sample, train_index, model.vocab.classes)
        images = generate(model, Sampler.of(base.sample), base.model, conditions_of(rows, model), rows["seed"].tolist(),
                          batch_size=base.sample.batch_size)
        gen = extractor.features(images, verbose=False)
        per_class = group_scores(real, train_index["class"].to_numpy(str), gen, rows["class"].to_numpy(str), base.fid)["fid"]
        result = {"overall": frechet(real, gen), "mean_class": float(np.mean(list(per_class.values()))),
                  "per_class": per_class, "images": len(images), "sampling": Sampler.of(base.sample).settings()}
        write_json(out, result)
        print(f"{folder.name} ({name}): FID {result['overall']:.5f}, mean per class {result['mean_class']:.4f}, "
              + ", ".join(f"{c} {v:.4f}" for c, v in per_class.items()), flush=True)


def cmd_paired(args) -> None:
    """One mechanism's setting A minus setting B (guidance labels as `table` prints them) -- or, with --against M,
    minus setting B of mechanism M -- paired over the unseen pairs: each pair's difference averaged over the training
    seeds that have both, then a 95 % bootstrap interval over the pairs (2,000 resamples, numpy seed 0)."""
    def cells(folder: Path, label: str) -> pd.DataFrame | None:
        for path in folder.glob("eval-*.json"):
            r = read_json(path)
            if guidance_label(r["guidance"], r["metadata_guidance"], r.get("guidance_colour", "guided")) == label:
                c = pd.DataFrame(r["cells"])
                return c[~c["seen"]].set_index(["class", "tss"]).drop(columns="seen")
        return None

    def by_seed(mechanism: str, label: str) -> dict[int, pd.DataFrame]:
        found = {read_json(f / "train.json")["seed"]: cells(f, label) for f in trained([mechanism])}
        return {seed: c for seed, c in found.items() if c is not None}

    against = args.against or args.mechanism
    a, b = by_seed(args.mechanism, args.a), by_seed(against, args.b)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        sys.exit(f"no training seed has both {args.mechanism} '{args.a}' and {against} '{args.b}' evaluated")
    mean = sum(a[s] - b[s] for s in seeds) / len(seeds)
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(mean), (2000, len(mean)))
    print(f"{args.mechanism} '{args.a}' minus {against} '{args.b}', {len(mean)} unseen pairs, seeds {seeds}")
    for figure in [c for c in mean.columns if mean[c].notna().all() and not c.startswith("ceiling_")]:
        d = mean[figure].to_numpy(float)
        lo, hi = np.percentile(d[draws].mean(axis=1), [2.5, 97.5])
        print(f"  {figure}: {d.mean():+.3f} [{lo:+.3f}, {hi:+.3f}]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("mechanism", choices=sorted(MECHANISMS))
    t.add_argument("seed", type=int)
    e = sub.add_parser("evaluate")
    e.add_argument("--only", nargs="*", choices=sorted(MECHANISMS), help="these mechanisms alone (parallel workers)")
    e.add_argument("--joint", action="store_true",
                   help="the joint settings alone (the stain pathway's UNet never sees the site: nothing for metadata "
                        "guidance to push)")
    sub.add_parser("table")
    pr = sub.add_parser("paired")
    pr.add_argument("mechanism", choices=sorted(MECHANISMS))
    pr.add_argument("a", help='a guidance setting as `table` labels it, e.g. "2 / 2 colour kept"')
    pr.add_argument("b", help='the setting it is compared with, e.g. "2 / 2"')
    pr.add_argument("--against", choices=sorted(MECHANISMS),
                    help="take setting b from this mechanism (the same training seeds), e.g. stain_long 1/1 vs stain")
    d = sub.add_parser("fid")
    d.add_argument("--only", nargs="*", choices=sorted(MECHANISMS), help="these mechanisms alone")
    d.add_argument("--guidance", type=float, help="joint guidance scale (default: params sample.guidance)")
    d.add_argument("--colour", choices=typing.get_args(config.GuidanceColour), default="conditional",
                   help="with --guidance: sample.guidance_colour")
    f = sub.add_parser("figure")
    f.add_argument("--out", default="docs/figures/conditioning_tradeoff.png")
    args = ap.parse_args()
    {"train": cmd_train, "evaluate": cmd_evaluate, "table": cmd_table, "figure": cmd_figure, "fid": cmd_fid,
     "paired": cmd_paired}[args.cmd](args)


if __name__ == "__main__":
    main()
