"""How close the stain pathway's estimates (`medi.stain.fit`, the training sites') come to the synthetic world's true
stains (ground_truth.json), and how much of the vectors' error is their class's.

    python bench/stain_estimates.py              # in a pipeline folder after `dvc repro split` (synthetic world)
    python bench/stain_estimates.py --level fitted   # the white's common level fitted to the stained pixels

Per training site: the mean angle between its estimated and true H and E vectors; the estimated hematoxylin and eosin
intensities and white level against the true ones (log intensities, mean white over the channels), as correlations
over all sites and within classes (each value minus its class's mean: the pathway takes intensities and white
relative to the class). Then the vectors' error split into its class's mean (an estimator cannot see it: each site
sent one class, so a class's tissue and its sites' average stain are one thing in its tiles) and the rest, with what
subtracting each class's mean estimate (centring, which an estimator can do) gives. Only H's intensity is transferred
by the maps (medi.stain.TRANSFERRED); E's is shown for completeness. Last, each class's mean vectors and mean log H
intensity, as deviations from the mean over all sites, against the truth's: how much of what a class's sites share the
estimates read (the class's tissue shows only together with it; bench/stain_oracle.py measures what it is worth).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from medi import artifacts, config, stain
from medi.groundtruth import stain_angle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seed", type=int, default=0, help="the draw of each site's tiles (training uses train.seed)")
    ap.add_argument("--level", choices=stain.WHITE_LEVELS, default="brightest",
                    help="the white's common level (medi.stain.fit): the brightest class's (the pathway's) or fitted "
                         "to the stained pixels (measured, not adopted)")
    args = ap.parse_args()
    cfg = config.load(args.params)
    train_index = artifacts.train_frame(cfg).sort_values("idx").reset_index(drop=True)
    sites = sorted(train_index["tss"].astype(str).unique())
    reference, est = stain.fit(artifacts.load_tiles(cfg.data.output), train_index, sites, seed=args.seed,
                               level=args.level)
    path = Path(cfg.data.root) / "ground_truth.json"
    if not path.exists():
        raise SystemExit(f"{path}: no ground truth (real data); this bench needs the synthetic world")
    truth = json.loads(path.read_text())["sites"]
    cls = np.array([truth[s]["class"] for s in sites])
    true_vectors = np.array([truth[s]["od_matrix"] for s in sites])
    vectors = np.array([est[s].vectors[:2] for s in sites])

    def within(v: np.ndarray) -> np.ndarray:
        return v - pd.Series(v).groupby(cls).transform("mean").to_numpy()

    def angle(v: np.ndarray, rows: slice = slice(0, 2)) -> float:
        return float(np.mean([stain_angle(a[rows], b[rows]) for a, b in zip(v, true_vectors)]))

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    print(f"{len(sites)} training sites, {len(set(cls))} classes\n\n| estimate | against the truth |\n|---|---|")
    spread = np.mean([stain_angle(a, b) for i, a in enumerate(true_vectors) for b in true_vectors[i + 1:]])
    print(f"| H and E vectors | mean angle {angle(vectors):.2f} degrees (H {angle(vectors, slice(0, 1)):.2f}, E "
          f"{angle(vectors, slice(1, 2)):.2f}; two sites' true stains: {spread:.2f} apart on average) |")
    true = {s: truth[s]["stain"] for s in sites}
    rows = [("H intensity (log)", [np.log(est[s].intensity[0]) for s in sites],
             [np.log(true[s]["h_intensity"]) for s in sites]),
            ("E intensity (log, not transferred)", [np.log(est[s].intensity[1]) for s in sites],
             [np.log(true[s]["e_intensity"]) for s in sites]),
            ("white (mean of the channels)", [est[s].white.mean() for s in sites],
             [np.mean(true[s]["illumination"]) for s in sites])]
    for label, mine, theirs in rows:
        x, y = np.asarray(mine), np.asarray(theirs)
        print(f"| {label} | correlation {np.corrcoef(x, y)[0, 1]:.3f}, "
              f"within classes {np.corrcoef(within(x), within(y))[0, 1]:.3f} |")
    error = vectors - true_vectors
    class_error = np.stack([error[cls == c].mean(0) for c in cls])
    centred = np.stack([vectors[cls == c].mean(0) for c in cls]) - vectors.mean(0)

    def norm(v: np.ndarray) -> float:
        return float(np.linalg.norm(v.reshape(len(sites), -1), axis=1).mean())

    true_spread = norm(true_vectors - true_vectors.mean(0))
    print(f"| vectors: error norm per site | {norm(error):.3f}, its class's mean error removed "
          f"{norm(error - class_error):.3f} (the true stains' spread: {true_spread:.3f}) |")
    print(f"| vectors: mean angle, its class's mean error removed (an oracle) | "
          f"{angle(unit(vectors - class_error)):.2f} |")
    print(f"| vectors: mean angle, centred on their class's mean estimate | {angle(unit(vectors - centred)):.2f} |")
    classes = sorted(set(cls))

    def class_means(v: np.ndarray) -> np.ndarray:
        # each class's mean, as its deviation from the mean over all sites, flattened
        return np.stack([v[cls == c].mean(0) - v.mean(0) for c in classes]).reshape(len(classes), -1)

    h_label, h_mine, h_theirs = rows[0]
    for label, mine, theirs in (("vectors", vectors, true_vectors), (h_label, np.asarray(h_mine), np.asarray(h_theirs))):
        e, t = class_means(mine), class_means(theirs)
        print(f"| {label}: each class's mean (from the mean over all sites) against the truth's | correlation "
              f"{np.corrcoef(e.ravel(), t.ravel())[0, 1]:.2f}, the truth's norm {np.linalg.norm(t, axis=1).mean():.3f}, "
              f"the estimate's error {np.linalg.norm(e - t, axis=1).mean():.3f} ({len(classes)} classes) |")
    print(f"\nreference: white {np.round(reference.white, 1).tolist()}, "
          f"intensity {np.round(reference.intensity, 3).tolist()}")


if __name__ == "__main__":
    main()
