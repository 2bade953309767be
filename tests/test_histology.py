"""Tests of the procedural H&E renderer: determinism, optics (Beer-Lambert, Macenko), and that classes
differ by structure while sites differ by stain."""

import colorsys
import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

from medi import histology as H

CLASSES = list(H.CLASS_MORPHOLOGY)
STANDARD = H.sample_site_stain(np.random.default_rng(0), strength=0.0)
# a site with a blue hematoxylin and a purplish eosin, clearly unlike the standard stain
BLUE = dataclasses.replace(STANDARD, hematoxylin=H._unit((0.5, 0.72, 0.48)), eosin=H._unit((0.22, 0.95, 0.24)),
                           h_intensity=1.2, e_intensity=0.8, illumination=(236.0, 242.0, 250.0))


def tiles(cls: str, stain: H.Stain, n: int, seed: int = 0, size: int = 64, mpp: float = 1.0) -> np.ndarray:
    return np.stack([H.render_tile(H.CLASS_MORPHOLOGY[cls], stain, np.random.default_rng([seed, i]), size, mpp)
                     for i in range(n)])


def angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise angle in degrees between unit vectors."""
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1, 1)))


def nucleus_stats(cls: str, n: int = 4) -> tuple[float, float]:
    """Median axis ratio of nuclei and nuclei per tile, from thresholded hematoxylin maps (64 um at 0.5 um/px)."""
    ratios, counts = [], []
    yy, xx = np.mgrid[:128, :128]
    for i in range(n):
        h, _ = H.render_concentrations(H.CLASS_MORPHOLOGY[cls], np.random.default_rng([7, i]), 128, 0.5)
        lab = ndimage.label(h > 0.45)[0].ravel()
        area = np.bincount(lab)[1:]
        keep = area >= 12  # ignore specks
        mean = lambda f: np.bincount(lab, f.ravel())[1:] / area
        my, mx = mean(yy), mean(xx)
        cyy, cxx, cxy = mean(yy * yy) - my ** 2, mean(xx * xx) - mx ** 2, mean(xx * yy) - mx * my
        half, disc = (cyy + cxx) / 2, np.sqrt(((cyy - cxx) / 2) ** 2 + cxy ** 2)
        ratios += list(np.sqrt((half + disc) / np.maximum(half - disc, 1e-6))[keep])
        counts.append(keep.sum())
    return float(np.median(ratios)), float(np.mean(counts))


# ---------------------------------------------------------------- API contract

@pytest.mark.parametrize("size,mpp", [(64, 1.0), (256, 0.5), (48, 1.3), (32, 2.0)])
def test_shape_dtype(size, mpp):
    for cls in ("LUAD", "UCS"):
        t = H.render_tile(H.CLASS_MORPHOLOGY[cls], STANDARD, np.random.default_rng(1), size, mpp)
        assert t.shape == (size, size, 3) and t.dtype == np.uint8
        h, e = H.render_concentrations(H.CLASS_MORPHOLOGY[cls], np.random.default_rng(1), size, mpp)
        for c in (h, e):
            assert c.shape == (size, size) and c.dtype == np.float32 and np.isfinite(c).all() and c.min() >= 0


def test_deterministic_by_seed():
    morph, site = H.CLASS_MORPHOLOGY["KIRP"], H.sample_site_stain(np.random.default_rng(3))
    a = H.render_tile(morph, site, np.random.default_rng(42))
    assert a.tobytes() == H.render_tile(morph, site, np.random.default_rng(42)).tobytes()
    assert a.tobytes() != H.render_tile(morph, site, np.random.default_rng(43)).tobytes()
    rng = np.random.default_rng(5)  # consecutive tiles from one generator differ
    assert H.render_tile(morph, site, rng).tobytes() != H.render_tile(morph, site, rng).tobytes()


def test_generic_morphology_renders_stained_tissue_with_nuclei():
    m = H.generic_morphology(np.random.default_rng(11))
    assert m == H.generic_morphology(np.random.default_rng(11)) != H.generic_morphology(np.random.default_rng(12))
    assert m.elongation >= 1 and 0 <= m.glands <= 1 and m.nuclear_density > 0 and m not in H.CLASS_MORPHOLOGY.values()
    for site, other in ((STANDARD, BLUE), (BLUE, STANDARD)):   # the tiles carry the site's H and E, not another's
        batch = np.stack([H.render_tile(m, site, np.random.default_rng([0, i])) for i in range(4)])
        est = H.estimate_stain_vectors(batch, site.illumination)
        assert angles(est, H.stain_od_matrix(site)).max() < 5 < angles(est, H.stain_od_matrix(other)).min()
    h, _ = H.render_concentrations(m, np.random.default_rng(0), 128, 0.5)
    assert ndimage.label(h > 0.45)[1] >= 10                    # nuclei (hematoxylin blobs), as the classes have


def test_stain_is_json_serialisable_and_unit():
    for s in (H.sample_site_stain(np.random.default_rng(2)), H.jitter_stain(STANDARD, np.random.default_rng(2), 0.3)):
        json.dumps(dataclasses.asdict(s))  # plain Python numbers, for ground-truth files
        m = H.stain_od_matrix(s)
        assert m.shape == (2, 3) and np.allclose(np.linalg.norm(m, axis=1), 1) and (m >= 0).all()
        assert 60 <= s.jpeg_quality <= 95 and all(0 < c <= 255 for c in s.illumination)


def test_strength_zero_is_the_standard_stain():
    a, b = (H.sample_site_stain(np.random.default_rng(i), 0.0) for i in (1, 2))
    assert a == b
    assert angles(H.stain_od_matrix(a), H._unit(H.RUIFROK_H)).min() < 1e-6


def test_jitter_stain_is_small():
    site = H.sample_site_stain(np.random.default_rng(4))
    same = H.jitter_stain(site, np.random.default_rng(0), 0.0)
    assert np.allclose(H.stain_od_matrix(same), H.stain_od_matrix(site)) and same.illumination == site.illumination
    j = H.jitter_stain(site, np.random.default_rng(0), 0.15)
    assert angles(H.stain_od_matrix(site), H.stain_od_matrix(j)).max() < 5
    assert abs(np.log(j.h_intensity / site.h_intensity)) < 0.3
    assert angles(H.stain_od_matrix(H.jitter_stain(BLUE, np.random.default_rng(0), 0.15)),
                  H.stain_od_matrix(BLUE)).max() < 10  # hand-made stains outside the usual family jitter too


# ---------------------------------------------------------------- optics

def test_beer_lambert_round_trip():
    site = dataclasses.replace(H.sample_site_stain(np.random.default_rng(9)), blur_sigma=0.0, noise_sd=0.0)
    h, e = H.render_concentrations(H.CLASS_MORPHOLOGY["LUSC"], np.random.default_rng(0), 64, 1.0)
    rgb = H.concentrations_to_rgb(h, e, site, np.random.default_rng(0)).astype(np.float64)
    od = -np.log10(np.maximum(rgb, 0.5) / np.asarray(site.illumination))
    basis = H.stain_od_matrix(site) * np.array([[site.h_intensity], [site.e_intensity]])
    conc, *_ = np.linalg.lstsq(basis.T, od.reshape(-1, 3).T, rcond=None)
    ok = (rgb.reshape(-1, 3) >= 8).all(1)  # away from 8-bit saturation
    assert ok.mean() > 0.95
    assert np.abs(conc[0] - h.ravel())[ok].max() < 0.05
    assert np.abs(conc[1] - e.ravel())[ok].max() < 0.05


def test_estimate_stain_vectors_recovers_and_separates_sites():
    est = {}
    for name, st in (("std", STANDARD), ("blue", BLUE)):
        batch = np.concatenate([tiles(c, st, 2, seed=1) for c in CLASSES])
        est[name] = H.estimate_stain_vectors(batch, st.illumination)
        assert est[name].shape == (2, 3)
        assert angles(est[name], H.stain_od_matrix(st)).max() < 5
        assert angles(H.estimate_stain_vectors(batch), H.stain_od_matrix(st)).max() < 8  # I0 estimated
        assert angles(H.estimate_stain_vectors(batch[0], st.illumination), H.stain_od_matrix(st)).max() < 10
    gap = angles(est["std"], est["blue"])  # the two sites' estimates differ far beyond the estimation error
    assert gap.min() > 10
    assert angles(est["std"], H.stain_od_matrix(BLUE)).min() > 10


def test_estimate_stain_vectors_rejects_blank_tiles():
    with pytest.raises(ValueError, match="stained pixels"):
        H.estimate_stain_vectors(np.full((32, 32, 3), 248, np.uint8), STANDARD.illumination)


# ---------------------------------------------------------------- H&E appearance

@pytest.mark.parametrize("cls", CLASSES)
def test_looks_like_he(cls):
    t = tiles(cls, STANDARD, 4).astype(np.float64)
    od = -np.log10(np.maximum(t, 1) / 248)
    tissue = t[np.linalg.norm(od, axis=-1) > 0.3]
    assert len(tissue) > 0.3 * t[..., 0].size  # tissue fills much of the tile
    r, g, b = tissue.mean(0)
    assert r > g + 20 and b > g + 20  # pink-purple, not green/grey
    hue = colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)[0] * 360
    assert 240 < hue < 345


def test_unstained_areas_are_near_illumination():
    site = dataclasses.replace(BLUE, blur_sigma=0.0, noise_sd=0.0)
    for cls in ("LUAD", "KIRP", "KIRC"):
        rng = np.random.default_rng(3)
        h, e = H.render_concentrations(H.CLASS_MORPHOLOGY[cls], rng, 64, 1.0)
        rgb = H.concentrations_to_rgb(h, e, site, rng).astype(np.float64)
        empty = (h < 0.02) & (e < 0.03)
        assert empty.mean() > 0.05
        assert np.abs(rgb[empty] - site.illumination).max() < 0.1 * 255


# ---------------------------------------------------------------- class cues beyond colour

def test_clear_and_luminal_space_by_class():
    white = {c: (tiles(c, STANDARD, 6, seed=2) > 0.85 * 248).all(-1).mean() for c in CLASSES}
    assert white["KIRC"] > 0.15 and white["LUSC"] < 0.03 and white["KICH"] < 0.08  # clear cells vs solid pink sheets
    assert white["KIRP"] > 0.3 and white["LUAD"] > 0.1 and white["UCEC"] > 0.05   # spaces between papillae, lumina
    assert min(white["KIRC"], white["KIRP"], white["LUAD"]) > 2 * max(white["LUSC"], white["KICH"], white["UCS"])


def test_nuclear_shape_and_density_by_class():
    stats = {c: nucleus_stats(c) for c in ("KIRC", "KICH", "LUSC", "UCEC", "UCS")}
    assert stats["UCS"][0] > stats["KIRC"][0] + 0.5   # spindle / bizarre vs round nuclei
    assert stats["UCEC"][0] > stats["KIRC"][0] + 0.5  # elongated columnar nuclei
    assert stats["KIRC"][0] < 1.4
    assert stats["UCEC"][1] > stats["KICH"][1] and stats["KIRC"][1] > stats["LUSC"][1]


def test_keratin_pearls_make_lusc_eosinophilic():
    pink = {}  # area of broad (not membrane-thin) strongly eosinophilic patches
    for c in ("LUSC", "KICH", "UCEC", "LUAD"):
        e = [H.render_concentrations(H.CLASS_MORPHOLOGY[c], np.random.default_rng([4, i]), 64, 1.0)[1]
             for i in range(6)]
        pink[c] = np.mean([(ndimage.uniform_filter(x, 9) > 0.35).mean() for x in e])
    assert pink["LUSC"] > 0.08 and pink["LUSC"] > 5 * max(pink["KICH"], pink["UCEC"], pink["LUAD"])


# ---------------------------------------------------------------- sites are an easy cue

def site_clusters(features: np.ndarray) -> tuple[float, float]:
    """features (sites, tiles, d): nearest-centroid accuracy, and median between-centre distance over the
    mean within-site spread."""
    centres = features.mean(1)
    within = np.linalg.norm(features - centres[:, None], axis=-1).mean()
    k = len(centres)
    between = np.median([np.linalg.norm(centres[i] - centres[j]) for i in range(k) for j in range(i)])
    nearest = np.linalg.norm(features[:, :, None] - centres[None, None], axis=-1).argmin(-1)
    return float((nearest == np.arange(k)[:, None]).mean()), float(between / within)


SITES = [H.sample_site_stain(np.random.default_rng([21, i]), 1.0) for i in range(5)]


@pytest.mark.parametrize("cls", ["LUSC", "KICH", "KIRC"])
def test_sites_separate_by_mean_tile_colour(cls):
    means = np.stack([tiles(cls, s, 6, seed=si).reshape(6, -1, 3).mean(1) for si, s in enumerate(SITES)])
    accuracy, ratio = site_clusters(means)
    assert accuracy >= 0.8 and ratio > 3


def test_sites_separate_by_stain_whatever_the_class():
    # per-tile Macenko vectors: the stain is read off any tile, whatever its class and structure
    feats = np.stack([[H.estimate_stain_vectors(t, s.illumination).ravel()
                       for c in CLASSES for t in tiles(c, s, 2, seed=si)] for si, s in enumerate(SITES)])
    accuracy, ratio = site_clusters(feats)
    assert accuracy >= 0.95 and ratio > 3
    same = {H.sample_site_stain(np.random.default_rng([21, i]), 0.0) for i in range(3)}
    assert len(same) == 1
