"""Does bf16 cost quality? The default model trained and sampled in fp32 and in bf16 autocast, each with several
training seeds: FID (overall, mean over classes) and conditioning accuracy (class, site), and whether the two
precisions' means differ by more than the seeds' run-to-run spread (issue 14's quality check of `precision: auto`).

Runs in a project folder after `dvc repro split` (it needs artifacts/dataset and artifacts/splits); everything it
writes goes under --out (models, checkpoints, sample sets, an MLflow store). Each run is a default training
(`train.max_steps` of params, about 3.5 min on 2 CPU cores in fp32), one `match` sample set and the FID
evaluation; 2 precisions x 3 seeds take about 30 min on 2 quiet cores. Killed and restarted, it resumes
(training from its checkpoints, sampling from the images on disk, finished runs from their results file).
Results go to docs/benchmarks.md (section 'precision-quality').

Usage (from the project root): python bench/precision_quality.py [--seeds 0 1 2] [--model medi] [--out artifacts/bench/precision]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medi import config, fid, sample, train

sys.path.insert(0, str(Path(__file__).parent))       # run from the project root
from bench_report import cpu_name, write_section  # noqa: E402

FIGURES = {"FID": ("overall",), "mean class FID": ("mean_class_fid",),
           "class accuracy": ("conditioning", "class_accuracy"), "site accuracy": ("conditioning", "site_accuracy")}


def figure(metrics: dict, path: tuple[str, ...]) -> float:
    """The figure at `path` of fid.evaluate's result; nan where the stage had none (e.g. no class with
    fid.min_count images); a path the result lacks is an error, not a silent nan."""
    for key in path:
        if not isinstance(metrics, dict) or key not in metrics:
            raise KeyError(f"fid.evaluate's result has no {'.'.join(path)}")
        metrics = metrics[key]
    return float("nan") if metrics is None else float(metrics)


def one_run(base: config.Config, model: str, precision: str, seed: int, out: Path) -> dict:
    work = out / f"{precision}-seed{seed}"
    done = work / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    cfg = config.override(base, {
        "train.precision": precision, "sample.precision": precision, "train.seed": seed,
        "model.output": str(work / "models"), "sample.output": str(work / "samples/{model}"),
        "fid.unseen_per_pair": 0, "tracking.uri": f"sqlite:///{(work / 'mlflow.db').resolve()}",
        "tracking.artifact_location": str((work / "mlruns").resolve())})
    work.mkdir(parents=True, exist_ok=True)
    index = pd.read_parquet(Path(cfg.split.output) / "train.parquet")
    trained = train.train(cfg, model, index, Path(cfg.data.output) / "tiles.npy")
    sample.run_stage(cfg, model)
    metrics = fid.evaluate(cfg, model)
    result = {"precision": precision, "seed": seed, "steps": trained.steps, "images_per_second": trained.images_per_second,
              **{name: figure(metrics, path) for name, path in FIGURES.items()}}
    done.write_text(json.dumps(result))
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", default="medi")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--out", default="artifacts/bench/precision")
    args = ap.parse_args()
    from accelerate.state import AcceleratorState

    base, out = config.load(args.params), Path(args.out)
    results = []
    for seed in args.seeds:                              # seed by seed, so a cut-short run compares like with like
        for precision in args.precisions:
            AcceleratorState._reset_state(True)          # one mixed-precision setting per Accelerator
            results.append(one_run(base, args.model, precision, seed, out))
    frame = pd.DataFrame(results)
    rows, verdicts = [], []
    for name in FIGURES:
        by = {p: frame.loc[frame.precision == p, name].to_numpy(float) for p in args.precisions}
        spread = max(np.ptp(v) for v in by.values())           # the largest seed-to-seed range of one precision
        gap = abs(np.mean(by[args.precisions[1]]) - np.mean(by[args.precisions[0]])) if len(by) > 1 else float("nan")
        verdicts.append(gap <= spread)
        rows.append([name, *(f"{np.mean(v):.4g} ({', '.join(f'{x:.4g}' for x in v)})" for v in by.values()),
                     f"{gap:.3g}", f"{spread:.3g}", "yes" if gap <= spread else "NO"])
    ips = {p: frame.loc[frame.precision == p, "images_per_second"].mean() for p in args.precisions}
    write_section("precision-quality",
                  f"The default model '{args.model}' ({base.model.preset}, {base.train.max_steps} steps) trained and "
                  f"sampled in each precision with train.seed {args.seeds}, on {cpu_name()}, {torch.get_num_threads()} "
                  f"threads (training images/s: " + ", ".join(f"{p} {v:.1f}" for p, v in ips.items()) + "); FID in the "
                  f"feature space of params `fid` against the real training tiles; the gap between the precisions' "
                  f"means against the largest seed-to-seed range of either; `python bench/precision_quality.py`",
                  ["figure", *[f"{p}: mean (per seed)" for p in args.precisions], "gap of the means",
                   "run-to-run range", "within"], rows)
    print("bf16 within the run-to-run spread on every figure" if all(verdicts) else
          "bf16 differs from fp32 by more than the run-to-run spread on some figure (see docs/benchmarks.md)")


if __name__ == "__main__":
    main()
