"""The stain pathway (params `model.site_pathway`): a site reaches the image as its H&E stain, not as an embedding.

In TCGA each site sent (nearly) one cancer type, so a learned site embedding learns the class with the stain and
carries the class's morphology to every class it is asked for (docs/conditioning.md). The stain, though, is a
physical, global colour transform: by Beer-Lambert, a pixel's optical density OD = -log10(I / I0) is the
concentrations of hematoxylin and eosin times the site's stain vectors, so two sites' tiles of the same section
differ by a 3x3 linear map in OD space and their white levels I0. That map cannot draw a nucleus, which is what
keeps the site off the class.

For each training site this module estimates, from the site's own training tiles only:
- the H and E optical-density vectors (Macenko, `histology.estimate_stain_vectors`) and a third, residual vector
  orthogonal to both, so the basis is invertible and nothing of a pixel is lost (unmixing onto H and E alone drops
  what the two vectors do not span: noise, blur, compression, and the estimate's own error), estimated against the
  site's white below;
- its white level I0 per channel (a high percentile of its pixels) and the hematoxylin intensity (the 99th
  percentile of the H concentration, Macenko's normalisation), both *relative to the other sites of its class*
  (`fit`): as estimated from one site's tiles they mix the stain with the class's tissue (a class without
  background has no white pixel), and each site sent one class. The white's common level is the brightest
  class's, the intensities' the median site's.

The reference stain is the H and E vectors of every site's tiles pooled (each site equally), with the median
raw white and the median intensity. Training maps every tile from its site's stain to the reference
(`StainPathway.canonical`), so the UNet learns each class's tissue under one stain; sampling maps the generated
tile from the reference to the conditioned site's stain (`StainPathway.restain`). In OD row vectors the map of a site is

    OD_site = OD_ref  V_ref^-1  diag(h_site / h_ref, 1, 1)  V_site      (V: rows H, E, residual)

with OD measured against the reference's white and the tile made against the site's: I = I0_site 10^-OD_site.
The eosin intensity is not transferred: its percentile is the class's cytoplasm more than the site's stain (with it,
re-stained real tiles scored 0.67 class accuracy instead of 0.75, docs/conditioning.md). Blur, noise and
JPEG are not in it; with `both` the UNet still gets the site's embedding as well, which may carry them (and the
class with them).

The colour calibration (params `sample.colour_calibration`; docs/conditioning.md). A short-trained generator's
tiles drift off their class's stain balance (on the default world: 9 % less hematoxylin, 6 % more eosin than the
world's own tiles of the same pairs), which costs fidelity and reads as another site. The pathway keeps, per class,
the quantiles of the H and E concentrations of the class's training tiles under the reference stain
(`fit_calibration`, in training, after `fit`); sampling draws a few of the generator's own tiles per class with the
same sampler (`medi.sampling.calibration_source`) and maps every generated tile's H and E, quantile by quantile, from
the generator's distribution to the training tiles' (`calibrate`) before re-staining it. A monotone map of each
stain's amount per pixel: it changes how dark nuclei and cytoplasm are, never where they are.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import optimize
from torch import nn

from medi import histology
from medi.errors import MediError

PATHWAYS = ("embedding", "stain", "both")
WHITE_LEVELS = ("brightest", "fitted")   # `fit`'s common white level: the brightest class's (the default) or fitted
WHITE_PERCENTILE = 99.5       # I0: this percentile of a site's pixels, per channel
INTENSITY_PERCENTILE = 99.0   # a stain's intensity: this percentile of its concentration (Macenko)
TILES_PER_SITE = 64           # tiles a site's estimate is made from (all of them when fewer)
TRANSFERRED = (True, False)   # the stain intensities a map carries: hematoxylin yes, eosin no (module docstring)
QUANTILES = 101               # the colour calibration's quantiles of each class's H and E concentrations (0..100 %)
CALIBRATION_TILES = 512       # training tiles of a class its target quantiles are taken from (all of them when fewer)
QUANTILE_INPUT = 2 ** 24      # pixels per class and stain torch.quantile takes at most
LEVEL_PIXELS = 16384          # pixels of each site `fitted_white_level` fits the common level on (every n-th, at least)


@dataclass(frozen=True)
class Stain:
    """One site's (or the reference's) estimated stain."""
    vectors: np.ndarray      # (3, 3) unit OD vectors, rows H, E, residual
    intensity: np.ndarray    # (2,) the INTENSITY_PERCENTILE of the H and E concentrations (only H is transferred)
    white: np.ndarray        # (3,) I0 per channel, 0..255

    def to_json(self) -> dict:
        return {"vectors": self.vectors.round(6).tolist(), "intensity": self.intensity.round(6).tolist(),
                "white": self.white.round(4).tolist()}

    @classmethod
    def from_json(cls, values: Mapping) -> "Stain":
        """Back from `to_json` (a model folder's stain.json holds one per site and the reference)."""
        return cls(*(np.asarray(values[k], float) for k in ("vectors", "intensity", "white")))


def basis(he: np.ndarray) -> np.ndarray:
    """H, E and their unit cross product (the residual direction), rows."""
    r = np.cross(he[0], he[1])
    return np.stack([he[0], he[1], r / np.linalg.norm(r)])


def estimate(tiles: np.ndarray, site: str = "", white: np.ndarray | None = None) -> Stain:
    """The stain of a set of tiles (N, H, W, 3) uint8 of one site; `white`: its I0 per channel when known (`fit`
    passes the class-relative one), else the WHITE_PERCENTILE of its pixels, which reads tissue without background
    as a darker white and tilts the H and E vectors estimated against it."""
    pixels = np.asarray(tiles).reshape(-1, 3)
    white = raw_white(pixels) if white is None else white
    try:
        he = histology.estimate_stain_vectors(pixels.reshape(1, -1, 1, 3), illumination=white)
    except ValueError as e:
        raise MediError(f"stain pathway: cannot estimate the stain of site {site or '?'} from its {len(tiles)} "
                        f"training tile(s): {e}") from None
    vectors = basis(he)
    conc = histology.optical_density(pixels, white) @ np.linalg.inv(vectors)
    intensity = np.maximum(np.percentile(conc[:, :2], INTENSITY_PERCENTILE, axis=0), 1e-3)
    return Stain(vectors, intensity, np.asarray(white, np.float64))


def raw_white(tiles: np.ndarray) -> np.ndarray:
    """I0 per channel as one set of tiles (or pixels, last axis RGB) shows it: the WHITE_PERCENTILE of its pixels."""
    pixels = np.asarray(tiles).reshape(-1, 3)
    return np.maximum(np.percentile(pixels, WHITE_PERCENTILE, axis=0).astype(np.float64), 1.0)


def fit(tiles: np.ndarray, train_index: pd.DataFrame, sites: Sequence[str], seed: int = 0, level: str = "brightest"
        ) -> tuple[Stain, dict[str, Stain]]:
    """(reference, {site: stain}) from up to TILES_PER_SITE training tiles of each site in `sites` (a seeded draw,
    rows of `train_index` with `idx` into the packed `tiles`).

    A site's white level and stain intensities, as estimated, mix its stain with its class's tissue (a class
    without background has no white pixel; one with dense nuclei a high hematoxylin percentile), and each site
    sent one class. So both are taken *relative to the other sites of the same class* (its most frequent one):
    the site's value over the median of its class's sites, times a level common to all classes. The class's own
    level cancels; a class with one site keeps the common level. The intensities' level is the median over all
    sites; the white's is the brightest class's (the highest of the classes' median whites): a percentile of
    transmitted light reads no brighter than the illumination on tissue without background and about at it on
    tissue with some, so the other classes' are biased low. In two passes: the white levels first, then each site's
    H and E vectors and intensities estimated against its white (against its own raw percentile, tissue without
    background reads as a darker white, which tilts the vectors: on the default world their mean error to the true
    stains falls from 6.4 to 5.2 degrees, docs/conditioning.md). The reference: the H and E vectors of every site's
    tiles pooled (each site equally) against the brightest class's white, the median intensities and the median of
    the sites' raw whites (a white below the sites' keeps the canonical tiles' brightest pixels off the clip at 255,
    so the maps stay invertible). `level="fitted"`: the white's common level moved from the brightest class's to
    where the stained pixels put it (`fitted_white_level`; measured, not adopted: docs/conditioning.md)."""
    rng = np.random.default_rng(seed)
    by_site = train_index.assign(tss=train_index["tss"].astype(str)).groupby("tss")["idx"]
    picked = {}
    for site in sites:
        if site not in by_site.groups:
            raise MediError(f"stain pathway: site {site} of the model's vocabulary has no training tiles")
        idx = np.sort(by_site.get_group(site).to_numpy())
        idx = np.sort(rng.choice(idx, TILES_PER_SITE, replace=False)) if len(idx) > TILES_PER_SITE else idx
        picked[site] = np.asarray(tiles[idx])
    classes = site_classes(train_index, sites)
    white = np.array([raw_white(picked[s]) for s in sites])
    white_ref = np.median(white, axis=0)
    relative = _relative_to_class(white, classes)
    common = np.max([np.median(white[classes == c], axis=0) for c in np.unique(classes)], axis=0)
    if level not in WHITE_LEVELS:
        raise MediError(f"stain.fit: unknown white level '{level}'; known: {', '.join(WHITE_LEVELS)}")
    if level == "fitted":
        common = fitted_white_level([picked[s] for s in sites], relative, common)
    white = np.minimum(relative * common, 255.0)
    raw = {s: estimate(picked[s], s, white[i]) for i, s in enumerate(sites)}
    intensity = np.array([raw[s].intensity for s in sites])
    intensity_ref = np.median(intensity, axis=0)
    intensity = _relative_to_class(intensity, classes) * intensity_ref
    stains = {s: Stain(raw[s].vectors, intensity[i], white[i]) for i, s in enumerate(sites)}
    n = min(len(v) for v in picked.values())
    pooled = estimate(np.concatenate([v[:n] for v in picked.values()]), "(all sites pooled)", common)
    return Stain(pooled.vectors, intensity_ref, white_ref), stains


def site_classes(train_index: pd.DataFrame, sites: Sequence[str]) -> np.ndarray:
    """The class each of `sites` sent (its most frequent one: each TCGA site sent one), in the order of `sites`."""
    frame = train_index.assign(tss=train_index["tss"].astype(str), **{"class": train_index["class"].astype(str)})
    owner = frame[frame["tss"].isin(list(sites))].groupby("tss")["class"].agg(lambda c: c.value_counts().index[0])
    return owner.loc[list(sites)].to_numpy()


def fitted_white_level(tiles: Sequence[np.ndarray], relative: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The white level common to all sites (I0 per channel; site i's white is relative[i] times it), fitted where
    the tissue says it is: by Beer-Lambert a stained pixel's OD lies on its site's H-E plane through the origin, and
    against a wrong white every OD is shifted by one constant vector, which lifts the pixels off that plane. The
    level is moved from `start` along the normal of the plane of all sites' stained pixels pooled (start * 10^(t n))
    to the t where each site's pixels lie flattest about a plane through the origin (the mean over the sites of the
    smallest eigenvalue of their OD second moment per pixel), t within +-0.1 OD. Only that one direction: a shift
    within the plane keeps the points on a plane (and a brighter white always spreads them further from the origin,
    so fitting all three channels this way runs off to ever brighter whites). Why not the brightest pixels: JPEG and
    the Lanczos resize of `prepare` ring the background's edges up to the clip at 255 (docs/conditioning.md)."""
    pixels = [np.asarray(t, np.float64).reshape(-1, 3) for t in tiles]
    pixels = [p[:: max(1, len(p) // LEVEL_PIXELS)] for p in pixels]
    whites = np.asarray(relative, np.float64) * np.asarray(start, np.float64)
    stained = [histology.optical_density(p, w) for p, w in zip(pixels, whites)]
    stained = [od[np.linalg.norm(od, axis=1) > histology.BACKGROUND_OD] for od in stained]
    # per site, the OD second moment and mean per pixel: shifted by t n, the second moment is
    # second + t (mean n' + n mean') + t^2 n n', so the search never touches the pixels again
    second = np.stack([od.T @ od / max(len(od), 1) for od in stained])
    mean = np.stack([od.sum(axis=0) / max(len(od), 1) for od in stained])
    normal = np.linalg.eigh(second.sum(axis=0))[1][:, 0]
    cross = mean[:, :, None] * normal[None, None, :]

    def off_plane(t: float) -> float:
        shifted = second + t * (cross + cross.transpose(0, 2, 1)) + t * t * np.outer(normal, normal)
        return float(np.linalg.eigvalsh(shifted)[:, 0].mean())

    t = optimize.minimize_scalar(off_plane, bounds=(-0.1, 0.1), method="bounded", options={"xatol": 1e-4}).x
    return np.round(np.asarray(start, np.float64) * 10.0 ** (t * normal), 1)


def _relative_to_class(values: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Each row of `values` (one per site) over the median of the rows of its class."""
    out = values.astype(np.float64, copy=True)
    for c in np.unique(classes):
        mine = classes == c
        out[mine] = values[mine] / np.median(values[mine], axis=0)
    return out


def site_map(reference: Stain, site: Stain, transferred: tuple[bool, bool] = TRANSFERRED) -> np.ndarray:
    """The 3x3 map of OD row vectors from the reference stain to the site's (module docstring); `transferred`:
    which of the H and E intensities it carries (bench/stain_oracle.py compares the choices)."""
    ratio = [site.intensity[k] / reference.intensity[k] if on else 1.0 for k, on in enumerate(transferred)]
    return np.linalg.inv(reference.vectors) @ np.diag([*ratio, 1.0]) @ site.vectors


class StainPathway(nn.Module):
    """Per-site stain maps as buffers indexed like the vocabulary's `tss` table (0, the null token: the reference,
    unchanged). Saved and loaded with the model's weights."""

    def __init__(self, sites: int, classes: int = 0):
        super().__init__()
        self.register_buffer("forward_map", torch.eye(3).repeat(sites + 1, 1, 1))   # reference -> site
        self.register_buffer("inverse_map", torch.eye(3).repeat(sites + 1, 1, 1))   # site -> reference
        self.register_buffer("white", torch.full((sites + 1, 3), 255.0))             # row 0: the reference's
        # the colour calibration (`fit_calibration`, `calibrate`): the reference's H, E, residual OD vectors (rows),
        # and per class (vocabulary index; 0, the null class, never calibrated) the quantiles of the H and E
        # concentrations of its training tiles under the reference stain
        self.register_buffer("basis", torch.eye(3))
        self.register_buffer("target", torch.zeros(classes + 1, 2, QUANTILES))
        self.register_buffer("targeted", torch.zeros(classes + 1, dtype=torch.bool))
        self.estimates: dict = {}       # what `fit` estimated, for the model folder's stain.json
        self.sources: dict = {}         # the calibration's generator quantiles (medi.sampling.calibration_source)

    def fit(self, tiles: np.ndarray, train_index: pd.DataFrame, sites: Sequence[str], seed: int) -> None:
        """Estimate the stains of `sites` (the vocabulary's, in its order) from their training tiles (the module's
        `fit`) and fill the maps."""
        reference, stains = fit(tiles, train_index, [str(s) for s in sites], seed)
        self.set(reference, {i + 1: stains[str(s)] for i, s in enumerate(sites)})
        self.estimates = {"reference": reference.to_json(), **{str(s): stains[str(s)].to_json() for s in sites}}

    def set(self, reference: Stain, stains: Mapping[int, Stain], transferred: tuple[bool, bool] = TRANSFERRED) -> None:
        """Fill the maps: `stains` by vocabulary index (1..sites)."""
        self.set_maps(reference, {i: (site_map(reference, st, transferred), st.white) for i, st in stains.items()})

    def set_maps(self, reference: Stain, maps: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """Fill the maps from given ones: `maps` by vocabulary index, (the 3x3 OD map reference -> site, the site's
        white); `set` passes the estimated stains' (bench/stain_oracle.py, others)."""
        with torch.no_grad():
            self.white[0] = torch.as_tensor(reference.white, dtype=torch.float32)
            self.basis.copy_(torch.as_tensor(reference.vectors, dtype=torch.float32))
            for i, (m, white) in maps.items():
                self.forward_map[i] = torch.as_tensor(m, dtype=torch.float32)
                self.inverse_map[i] = torch.as_tensor(np.linalg.inv(m), dtype=torch.float32)
                self.white[i] = torch.as_tensor(white, dtype=torch.float32)

    def _map(self, x: torch.Tensor, site: torch.Tensor, to_site: bool) -> torch.Tensor:
        """x in [-1, 1] (B, 3, H, W) under one stain -> under the other, float32, clamped to [-1, 1]."""
        site = site.to(self.white.device)
        src, dst = (self.white[0].expand(len(site), 3), self.white[site]) if to_site else \
                   (self.white[site], self.white[0].expand(len(site), 3))
        maps = (self.forward_map if to_site else self.inverse_map)[site]
        od = torch.einsum("bchw,bcd->bdhw", _optical_density(x, src[:, :, None, None]), maps)
        return _from_optical_density(od, dst[:, :, None, None])

    def canonical(self, x: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        """Training tiles of sites `site` (vocabulary indices) under the reference stain."""
        return self._map(x, site, to_site=False)

    def restain(self, x: torch.Tensor, site: torch.Tensor) -> torch.Tensor:
        """Generated tiles (reference stain) under the stains of sites `site` (index 0: left as they are)."""
        return self._map(x, site, to_site=True)

    # ---------------------------------------------------------------- colour calibration (params sample.colour_calibration)

    def concentrations(self, x: torch.Tensor) -> torch.Tensor:
        """Tiles under the reference stain, x in [-1, 1] (B, 3, H, W) -> their H, E and residual concentrations
        (B, 3, H, W) in the reference's basis."""
        od = _optical_density(x, self.white[0][:, None, None])
        return torch.einsum("bchw,cd->bdhw", od, torch.linalg.inv(self.basis))

    def from_concentrations(self, c: torch.Tensor) -> torch.Tensor:
        """The inverse of `concentrations`: tiles in [-1, 1] under the reference stain."""
        return _from_optical_density(torch.einsum("bchw,cd->bdhw", c, self.basis), self.white[0][:, None, None])

    def class_quantiles(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """(len(target), 2, QUANTILES): the quantiles of the H and E concentrations of the tiles `x` (reference
        stain) of each class index in `classes` (zeros for a class without tiles)."""
        c = self.concentrations(x)[:, :2]
        q = torch.linspace(0, 1, QUANTILES, device=c.device)
        out = torch.zeros_like(self.target)
        for k in classes.unique().tolist():
            mine = c[classes.to(c.device) == k].transpose(0, 1).reshape(2, -1)
            mine = mine[:, ::-(-mine.shape[1] // QUANTILE_INPUT)]     # torch.quantile's input limit: every n-th pixel
            out[k] = torch.quantile(mine, q, dim=1).T
        return out

    @torch.no_grad()
    def fit_calibration(self, tiles: np.ndarray, train_index: pd.DataFrame, sites: Sequence[str],
                        classes: Sequence[str], seed: int) -> None:
        """The calibration's targets, after `fit` (or `set`): up to CALIBRATION_TILES training tiles of each class
        (a seeded draw; rows of `train_index` with `idx` into the packed `tiles`), mapped to the reference stain
        with their sites' maps; `sites` and `classes` in the vocabulary's order."""
        rng = np.random.default_rng([seed, 1])
        site_index = {str(s): i for i, s in enumerate(sites, 1)}
        for k, name in enumerate(classes, 1):
            rows = train_index[train_index["class"].astype(str) == str(name)]
            if rows.empty:
                continue
            rows = rows.iloc[rng.choice(len(rows), min(len(rows), CALIBRATION_TILES), replace=False)].sort_values("idx")
            x = torch.from_numpy(np.asarray(tiles[rows["idx"].to_numpy()])).permute(0, 3, 1, 2).float() / 127.5 - 1
            site = torch.tensor([site_index[str(s)] for s in rows["tss"]])
            canonical = torch.cat([self.canonical(x[i:i + 256], site[i:i + 256]) for i in range(0, len(x), 256)])
            self.target[k] = self.class_quantiles(canonical, torch.full((len(x),), k))[k]
            self.targeted[k] = True

    def calibrate(self, x: torch.Tensor, classes: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Generated tiles x (reference stain) of class indices `classes`, with each class's H and E concentrations
        mapped quantile by quantile from `source` (`class_quantiles` of the generator's own tiles of that class) to
        the class's training tiles' (`target`). Tiles of a class without a target are returned unchanged."""
        keep = ~self.targeted[classes.to(self.targeted.device)]
        if bool(keep.all()):
            return x
        c = self.concentrations(x)
        src, dst = source[classes], self.target[classes]                   # (B, 2, Q)
        mapped = [_interp(c[:, k].flatten(1), src[:, k], dst[:, k]).view_as(c[:, k]) for k in range(2)]
        out = self.from_concentrations(torch.stack([*mapped, c[:, 2]], dim=1))
        return torch.where(keep.to(x.device)[:, None, None, None], x.float(), out)


def _optical_density(x: torch.Tensor, white: torch.Tensor) -> torch.Tensor:
    """Tiles in [-1, 1] (B, 3, H, W) -> Beer-Lambert optical densities against the white level `white` (0..255,
    broadcast over the tiles), intensities clipped at 1."""
    return -torch.log10(((x.float() + 1) * 127.5).clamp(min=1.0) / white)


def _from_optical_density(od: torch.Tensor, white: torch.Tensor) -> torch.Tensor:
    """The inverse of `_optical_density`: tiles in [-1, 1], clamped."""
    return (white * torch.pow(10.0, -od) / 127.5 - 1).clamp(-1, 1)


def _interp(v: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Row-wise piecewise-linear interpolation, as numpy.interp: v (B, N) through the points (xp, fp) (B, Q), xp
    non-decreasing; values outside [xp[0], xp[-1]] take the end values."""
    i = torch.searchsorted(xp.contiguous(), v.contiguous(), right=True).clamp(1, xp.shape[1] - 1)
    x0, x1 = xp.gather(1, i - 1), xp.gather(1, i)
    y0, y1 = fp.gather(1, i - 1), fp.gather(1, i)
    w = torch.where(x1 > x0, (v - x0) / (x1 - x0).clamp(min=1e-12), torch.zeros_like(v))
    out = y0 + w.clamp(0, 1) * (y1 - y0)
    return torch.where(v <= xp[:, :1], fp[:, :1], torch.where(v >= xp[:, -1:], fp[:, -1:], out))
