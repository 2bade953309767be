"""Checks of images against the synthetic world's ground truth (`ground_truth.json`): does a tile carry the
stain of the site it was conditioned on?

For a set of tiles the H and E optical-density vectors are estimated (Macenko, `histology`) and compared
with every site's true vectors. Two figures per (class, site) cell: the angle to the conditioned site's
stain, and the site's rank among all sites by that angle as a percentile (0 = the nearest site; 0.5 =
chance). Real tiles of the same site give the estimator's own floor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from medi import histology


@dataclass(frozen=True)
class GroundTruth:
    site_class: dict[str, str]
    stains: dict[str, np.ndarray]          # site -> (2, 3) unit OD vectors (H, E)

    @classmethod
    def load(cls, root: str | Path) -> "GroundTruth | None":
        path = Path(root) / "ground_truth.json"
        if not path.exists():
            return None                    # real data: no ground truth
        truth = json.loads(path.read_text())
        return cls({s: v["class"] for s, v in truth["sites"].items()},
                   {s: np.asarray(v["od_matrix"]) for s, v in truth["sites"].items()})


def stain_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Mean angle (degrees) between corresponding rows (H with H, E with E) of two (2, 3) stain matrices."""
    cos = np.clip(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)), -1, 1)
    return float(np.degrees(np.arccos(cos)).mean())


def stain_match(tiles: np.ndarray, site: str, truth: GroundTruth) -> dict[str, float]:
    """Angle of the tiles' estimated stain to `site`'s, and `site`'s rank percentile among all sites."""
    est = histology.estimate_stain_vectors(tiles)
    angles = {s: stain_angle(est, m) for s, m in truth.stains.items()}
    own = angles[site]
    rank = sum(a < own for a in angles.values()) / max(len(angles) - 1, 1)
    return {"angle": own, "rank": rank, "nearest": min(angles, key=angles.get) == site}


def stain_report(cells: Iterable[tuple[str, str, np.ndarray]], truth: GroundTruth) -> dict:
    """Per cell (class, site, tiles) stain match, and means over seen (site of that class) and unseen pairs."""
    rows = []
    for cls, site, tiles in cells:
        m = stain_match(tiles, site, truth)
        rows.append({"class": cls, "site": site, "seen": truth.site_class[site] == cls, **m})
    summary = {}
    for kind, sel in (("seen", [r for r in rows if r["seen"]]), ("unseen", [r for r in rows if not r["seen"]])):
        if sel:
            summary[kind] = {"pairs": len(sel), "angle_deg": float(np.mean([r["angle"] for r in sel])),
                             "rank_percentile": float(np.mean([r["rank"] for r in sel])),
                             "nearest_is_conditioned": float(np.mean([r["nearest"] for r in sel]))}
    return {"cells": rows, "summary": summary}
