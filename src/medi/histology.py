"""Procedural H&E histology: morphology programs -> stain concentration maps -> RGB by Beer-Lambert.

The synthetic TCGA-UT-like world renders every tile in two physically separate steps.

1. Tissue (`render_concentrations`). A per-class `Morphology` program draws, in micrometres, how much
   hematoxylin (H, binds chromatin: nuclei) and eosin (E, binds proteins: cytoplasm, collagen, keratin,
   red cells) each pixel holds. Architecture comes from a jittered lattice of "units" (glands, papillae,
   nests) in a noise-warped coordinate frame: Worley distances to the unit centres carve lumina, fibrovascular
   cores, keratin pearls and stroma septa; a smooth random field splits off a sarcomatous zone. Cells are a
   second, finer jittered lattice: the nearest two seeds give Voronoi cells and their membranes, and each
   seed carries one elliptical nucleus (size, axis ratio, orientation, contour irregularity, chromatin
   texture, nucleolus) drawn where its normalised radius is the smallest among the 3x3 neighbouring seeds,
   so long spindle nuclei cross cell borders. Lumina and clear cytoplasm hold (almost) no stain: white.

2. Stain (`concentrations_to_rgb`). Each tissue source site (hospital) has a `Stain`: unit optical-density
   (OD) vectors of H and E, intensity multipliers, the scanner's illumination I0 (white level / tint),
   optical blur and sensor noise. Beer-Lambert: OD_c = h * h_int * H_c + e * e_int * E_c, I_c = I0_c 10^-OD_c.
   `sample_site_stain` perturbs the Ruifrok-Johnston vectors per site, so the site is an easy colour cue
   while the class is carried by structure, as with TCGA's hospital-specific staining.

`estimate_stain_vectors` (Macenko) recovers the H/E OD vectors from RGB, to check the stain of generated
tiles against the site they were conditioned on. All randomness comes from the caller's
`np.random.Generator`, so a tile is a pure function of the generator state.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from statistics import NormalDist

import numpy as np
from scipy import ndimage

RUIFROK_H = (0.65, 0.70, 0.29)  # Ruifrok & Johnston (2001) OD vectors, before normalisation
RUIFROK_E = (0.07, 0.99, 0.11)

EPI, LUMEN, STROMA, CORE, VESSEL, KERATIN, SARCOMA = range(7)  # tissue compartments (pixel labels)
SOLID, GLAND, PAPILLA = range(3)                                # architectural unit types


@dataclass(frozen=True)
class Morphology:
    """Morphology program of one cancer class. Lengths in micrometres, concentrations in OD units."""
    nuclear_density: float      # nuclei per 1000 um^2 of cellular (epithelial) area
    nuclear_radius: float       # mean radius, um
    nuclear_radius_sd: float    # um
    elongation: float           # mean axis ratio >= 1
    pleomorphism: float         # 0..1: size/shape/contour/chromasia irregularity
    chromatin: float            # hematoxylin concentration inside nuclei
    chromatin_texture: float    # 0..1: vesicular/granular (coarse) vs smooth
    nucleoli: float             # 0..1 probability of a prominent nucleolus
    cytoplasm_eosin: float      # eosin concentration of cytoplasm
    cytoplasm_clearing: float   # 0..1: clear (emptied) cytoplasm, as in clear cell RCC
    glands: float               # 0..1: fraction of units forming a gland around a lumen
    lumen_radius: float         # um
    papillae: float             # 0..1: fraction of units forming papillae (fibrovascular core, free surface)
    keratin: float              # 0..1: probability that a solid nest holds a keratin pearl
    stroma: float               # 0..1: ~area fraction of collagenous stroma between units
    spindle: float              # 0..1: area fraction of sarcomatous zone (dense spindle-cell tumour)
    halo: float = 0.0           # 0..1: perinuclear clearing (chromophobe RCC)
    wrinkle: float = 0.0        # 0..1: wrinkled "raisinoid" nuclear contour
    membrane: float = 0.0       # eosin added on cell borders (< 0: pale intercellular gaps of squamous cells)
    cytoplasm_hematoxylin: float = 0.04  # basophilia of cytoplasm
    vessels: float = 0.0        # 0..1: capillaries (red cells) along unit borders, i.e. around nests
    unit_size: float = 45.0     # um: spacing of glands / papillae / nests
    lining: float = 10.0        # um: thickness of the epithelium lining a lumen or papillary core
    core_radius: float = 6.0    # um: radius of fibrovascular papillary cores
    stroma_eosin: float = 0.32  # eosin concentration of collagen


CLASS_MORPHOLOGY: dict[str, Morphology] = {
    # lung adenocarcinoma: acinar glands and lepidic alveolar spaces lined by cuboidal cells, some stroma
    "LUAD": Morphology(nuclear_density=8.0, nuclear_radius=3.8, nuclear_radius_sd=0.8, elongation=1.35,
                       pleomorphism=0.45, chromatin=0.75, chromatin_texture=0.5, nucleoli=0.35,
                       cytoplasm_eosin=0.2, cytoplasm_clearing=0.05, glands=0.9, lumen_radius=11.0,
                       papillae=0.0, keratin=0.0, stroma=0.3, spindle=0.0, unit_size=42.0, lining=11.0),
    # lung squamous: solid nests of large polygonal pink cells, keratin pearls, pale intercellular gaps
    "LUSC": Morphology(nuclear_density=5.5, nuclear_radius=4.6, nuclear_radius_sd=1.0, elongation=1.2,
                       pleomorphism=0.55, chromatin=1.0, chromatin_texture=0.3, nucleoli=0.3,
                       cytoplasm_eosin=0.36, cytoplasm_clearing=0.0, glands=0.0, lumen_radius=0.0,
                       papillae=0.0, keratin=0.5, stroma=0.22, spindle=0.0, membrane=-0.08, unit_size=62.0),
    # clear cell RCC: nests of empty cells with crisp pink borders, small round dark nuclei, capillaries
    "KIRC": Morphology(nuclear_density=8.0, nuclear_radius=2.7, nuclear_radius_sd=0.4, elongation=1.1,
                       pleomorphism=0.15, chromatin=1.0, chromatin_texture=0.15, nucleoli=0.1,
                       cytoplasm_eosin=0.15, cytoplasm_clearing=0.88, glands=0.0, lumen_radius=0.0,
                       papillae=0.0, keratin=0.0, stroma=0.02, spindle=0.0, membrane=0.3, vessels=1.0,
                       unit_size=38.0),
    # papillary RCC: fronds with pale fibrovascular cores lined by small basophilic cells with dark nuclei
    "KIRP": Morphology(nuclear_density=11.0, nuclear_radius=3.4, nuclear_radius_sd=0.6, elongation=1.3,
                       pleomorphism=0.3, chromatin=0.9, chromatin_texture=0.3, nucleoli=0.2,
                       cytoplasm_eosin=0.16, cytoplasm_clearing=0.1, glands=0.0, lumen_radius=0.0,
                       papillae=0.95, keratin=0.0, stroma=0.05, spindle=0.0, cytoplasm_hematoxylin=0.1,
                       unit_size=38.0, lining=8.0, core_radius=6.0),
    # chromophobe RCC: sheets of large pale reticulated cells, thick membranes, halos, raisinoid nuclei
    "KICH": Morphology(nuclear_density=4.5, nuclear_radius=3.6, nuclear_radius_sd=0.7, elongation=1.15,
                       pleomorphism=0.4, chromatin=0.85, chromatin_texture=0.2, nucleoli=0.05,
                       cytoplasm_eosin=0.26, cytoplasm_clearing=0.3, glands=0.0, lumen_radius=0.0,
                       papillae=0.0, keratin=0.0, stroma=0.05, spindle=0.0, halo=0.85, wrinkle=0.6,
                       membrane=0.4, unit_size=70.0),
    # endometrioid: crowded back-to-back glands, pseudostratified elongated nuclei perpendicular to lumen
    "UCEC": Morphology(nuclear_density=14.0, nuclear_radius=3.3, nuclear_radius_sd=0.6, elongation=2.3,
                       pleomorphism=0.4, chromatin=0.85, chromatin_texture=0.35, nucleoli=0.25,
                       cytoplasm_eosin=0.22, cytoplasm_clearing=0.0, glands=0.95, lumen_radius=8.0,
                       papillae=0.0, keratin=0.0, stroma=0.1, spindle=0.0, unit_size=36.0, lining=12.0),
    # carcinosarcoma: glands next to a sarcomatous zone of streaming spindle cells with bizarre nuclei
    "UCS": Morphology(nuclear_density=12.0, nuclear_radius=4.0, nuclear_radius_sd=1.4, elongation=1.6,
                      pleomorphism=0.9, chromatin=1.0, chromatin_texture=0.5, nucleoli=0.45,
                      cytoplasm_eosin=0.24, cytoplasm_clearing=0.0, glands=0.6, lumen_radius=7.0,
                      papillae=0.0, keratin=0.0, stroma=0.15, spindle=0.5, unit_size=36.0, lining=11.0),
}


def generic_morphology(rng: np.random.Generator) -> Morphology:
    """A plausible random carcinoma: glandular, papillary or solid (maybe keratinising), with random cytology."""
    u = rng.uniform
    pattern = rng.integers(3)
    glands, papillae, keratin = [(u(0.5, 0.95), 0.0, 0.0), (0.0, u(0.85, 1.0), 0.0), (0.0, 0.0, u(0, 0.4))][pattern]
    return Morphology(
        nuclear_density=u(5, 14), nuclear_radius=u(2.8, 4.8), nuclear_radius_sd=u(0.4, 1.2),
        elongation=u(1.0, 2.2), pleomorphism=u(0.1, 0.8), chromatin=u(0.7, 1.05), chromatin_texture=u(0.1, 0.6),
        nucleoli=u(0, 0.5), cytoplasm_eosin=u(0.12, 0.36), cytoplasm_clearing=u(0, 0.5) ** 2, glands=glands,
        lumen_radius=u(6, 14), papillae=papillae, keratin=keratin, stroma=u(0.05, 0.35),
        spindle=u(0, 0.3) * (u() < 0.25), membrane=u(-0.1, 0.3), unit_size=u(34, 60), lining=u(8, 13))


@dataclass(frozen=True)
class Stain:
    """Stain and scanner of one tissue source site (hospital)."""
    hematoxylin: tuple[float, float, float]   # unit optical-density vector (R, G, B)
    eosin: tuple[float, float, float]         # unit OD vector
    h_intensity: float                        # multiplies H concentration
    e_intensity: float                        # multiplies E concentration
    illumination: tuple[float, float, float]  # I0 per channel, 0..255 (background white level / tint)
    blur_sigma: float                         # px, optical blur (scanner focus)
    noise_sd: float                           # additive sensor noise, 0..255 units
    jpeg_quality: int                         # for the caller's JPEG encoder; the renderer does not encode


def _unit(v) -> tuple[float, float, float]:
    """Unit vector with non-negative components (optical densities cannot be negative), as plain floats."""
    v = np.abs(np.asarray(v, float))
    return tuple(float(c) for c in v / np.linalg.norm(v))


def _he_family(h: tuple, e: tuple) -> bool:
    """Hematoxylin absorbs blue least (blue-purple nuclei), eosin absorbs green most (pink), and the two unit
    vectors are >= 25 degrees apart, so nuclei and cytoplasm keep distinct hues."""
    return np.dot(h, e) <= np.cos(np.radians(25)) and h[2] < 0.8 * min(h[:2]) and e[1] > 2 * max(e[0], e[2])


def _perturb_vectors(h, e, rng: np.random.Generator, sd: float) -> tuple[tuple, tuple]:
    """Randomly tilted, renormalised H and E OD vectors; redrawn until they are in the H&E family
    (unless the given vectors are not)."""
    check = _he_family(_unit(h), _unit(e))
    while True:
        h2, e2 = _unit(np.asarray(h) + rng.normal(0, sd, 3)), _unit(np.asarray(e) + rng.normal(0, sd, 3))
        if not check or _he_family(h2, e2):
            return h2, e2


# (standard value, spread at strength 1) of a site's stain; jitter_stain reuses the spreads
_VECTOR_SD = 0.15           # per-component perturbation of the unit OD vectors (~10 degrees)
_LOG_H_SD, _LOG_E_SD = 0.35, 0.35
_WHITE, _WHITE_SD, _TINT_SD = 248.0, 6.0, 7.0
_BLUR, _BLUR_SD = 0.5, 0.2
_LOG_NOISE_SD = 0.4


def sample_site_stain(rng: np.random.Generator, strength: float = 1.0) -> Stain:
    """One site's stain. `strength` scales the between-site spread; 0 gives the standard stain."""
    s = strength
    hematoxylin, eosin = _perturb_vectors(RUIFROK_H, RUIFROK_E, rng, _VECTOR_SD * s)
    white = _WHITE - abs(rng.normal(0, _WHITE_SD * s))
    return Stain(
        hematoxylin=hematoxylin,
        eosin=eosin,
        h_intensity=float(np.exp(np.clip(rng.normal(0, _LOG_H_SD * s), -0.5, 0.5))),
        e_intensity=float(np.exp(np.clip(rng.normal(0, _LOG_E_SD * s), -0.55, 0.55))),
        illumination=tuple(float(np.clip(white + rng.normal(0, _TINT_SD * s), 215, 255)) for _ in range(3)),
        blur_sigma=float(np.clip(_BLUR + rng.normal(0, _BLUR_SD * s), 0.2, 1.2)),
        noise_sd=float(2.0 * np.exp(rng.normal(0, _LOG_NOISE_SD * s))),
        jpeg_quality=int(np.clip(round(85 + rng.uniform(-25, 10) * s), 60, 95)))


def jitter_stain(stain: Stain, rng: np.random.Generator, amount: float) -> Stain:
    """Per-slide variation around a site's stain; `amount` = 1 is as large as the between-site spread."""
    a = amount
    hematoxylin, eosin = _perturb_vectors(stain.hematoxylin, stain.eosin, rng, _VECTOR_SD * a)
    return replace(
        stain,
        hematoxylin=hematoxylin,
        eosin=eosin,
        h_intensity=float(stain.h_intensity * np.exp(rng.normal(0, _LOG_H_SD * a))),
        e_intensity=float(stain.e_intensity * np.exp(rng.normal(0, _LOG_E_SD * a))),
        illumination=tuple(float(np.clip(c + rng.normal(0, _TINT_SD * a), 200, 255)) for c in stain.illumination),
        blur_sigma=float(max(0.0, stain.blur_sigma + rng.normal(0, _BLUR_SD * a))),
        noise_sd=float(stain.noise_sd * np.exp(rng.normal(0, _LOG_NOISE_SD * a))))


def stain_od_matrix(stain: Stain) -> np.ndarray:
    """2x3 matrix of unit OD vectors, rows (H, E)."""
    m = np.array([stain.hematoxylin, stain.eosin], float)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


# ---------------------------------------------------------------- random fields and lattices

def _noise(rng: np.random.Generator, size: int, mpp: float, sigmas: list[float]) -> np.ndarray:
    """Periodic Gaussian random fields with correlation lengths `sigmas` (um), zero mean and unit std each,
    shape (len(sigmas), size, size). They are synthesised on a grid of step min(sigmas)/3 and upsampled."""
    sigma = np.asarray(sigmas, float)[:, None, None]
    step = max(mpp, sigma.min() / 3)
    m = max(4, int(np.ceil(size * mpp / step)))
    white = rng.standard_normal((2, sigma.size, m, m // 2 + 1), dtype=np.float32)  # spectrum of white noise
    ky, kx = np.fft.fftfreq(m)[:, None], np.fft.rfftfreq(m)[None]
    gain = np.exp(-2 * (np.pi * sigma * m / (size * mpp)) ** 2 * (ky ** 2 + kx ** 2)).astype(np.float32)
    g = np.fft.irfft2((white[0] + 1j * white[1]) * gain, s=(m, m))
    g = (g - g.mean((1, 2), keepdims=True)) / (g.std((1, 2), keepdims=True) + 1e-8)
    if m != size:  # periodic bilinear upsampling as two small matrix products
        pos = (np.arange(size) + 0.5) * m / size - 0.5
        w = np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(m)[None]))
        w += np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(m)[None] - m))  # wrap-around at the start
        w += np.maximum(0, 1 - np.abs(pos[:, None] - np.arange(m)[None] + m))  # and at the end
        g = w @ g @ w.T
    return g.astype(np.float32)


class _Lattice:
    """Jittered square lattice of seeds (one per cell) covering the given coordinates with a margin, for
    Worley-style nearest-seed queries over the 3x3 neighbouring cells."""

    def __init__(self, rng: np.random.Generator, y: np.ndarray, x: np.ndarray, spacing: float, jitter: float):
        self.s = spacing
        self.origin = np.array([y.min(), x.min()]) - (2 + rng.uniform(size=2)) * spacing  # random phase
        self.n = int(np.ceil(max(y.max() - self.origin[0], x.max() - self.origin[1]) / spacing)) + 2
        iy, ix = np.mgrid[: self.n, : self.n]
        off = 0.5 + jitter * rng.uniform(-0.5, 0.5, (2, self.n, self.n))
        self.y = (self.origin[0] + (iy + off[0]) * spacing).ravel().astype(np.float32)
        self.x = (self.origin[1] + (ix + off[1]) * spacing).ravel().astype(np.float32)

    def neighbours(self, y: np.ndarray, x: np.ndarray) -> Iterator[np.ndarray]:
        """Yield, for each of the 3x3 cell offsets, the flat seed index seen from every query point."""
        cy = ((y - self.origin[0]) // self.s).astype(np.int32)
        cx = ((x - self.origin[1]) // self.s).astype(np.int32)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yield (cy + dy) * self.n + (cx + dx)

    def nearest2(self, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Index of the nearest seed, and distances to the nearest and second nearest seeds."""
        d1 = np.full(y.shape, np.inf, np.float32)
        d2, idx = d1.copy(), np.zeros(y.shape, np.int32)
        for j in self.neighbours(y, x):
            d = (y - self.y[j]) ** 2 + (x - self.x[j]) ** 2
            idx = np.where(d < d1, j, idx)
            d1, d2 = np.minimum(d1, d), np.minimum(d2, np.maximum(d1, d))
        return idx, np.sqrt(d1), np.sqrt(d2)


# ---------------------------------------------------------------- tissue

def _architecture(m: Morphology, rng: np.random.Generator, y: np.ndarray, x: np.ndarray, fields: np.ndarray):
    """Compartment of each point (y, x) (flat arrays, um), and the geometry of its architectural unit:
    distance to and offset (dy, dx) from the unit centre, unit type, radius of its lumen / core / pearl.
    fields: smooth unit noise at the points, rows (warp y, warp x, stroma width, sarcoma)."""
    S = m.unit_size
    warp = fields[:2] * (0.08 * S * (1 + m.pleomorphism))  # irregular, non-circular units
    stretch, ang = 1 + 0.7 * m.papillae, rng.uniform(0, np.pi)  # papillary fronds are elongated
    c, s = float(np.cos(ang)), float(np.sin(ang))
    wy, wx = y + warp[0], x + warp[1]
    u, v = (c * wx + s * wy) / stretch, c * wy - s * wx
    lat = _Lattice(rng, v, u, S, jitter=0.7)
    idx, d1, d2 = lat.nearest2(v, u)
    du, dv = u - lat.x[idx], v - lat.y[idx]
    offset = np.stack([s * du * stretch + c * dv, c * du * stretch - s * dv])

    p = rng.uniform(size=lat.y.size)
    kind = np.where(p < m.glands, GLAND, np.where(p < m.glands + m.papillae, PAPILLA, SOLID))
    pearl = np.where(rng.uniform(size=p.size) < m.keratin, S * rng.uniform(0.22, 0.36, p.size), 0.0)
    radius = np.choose(kind, [pearl, m.lumen_radius * np.exp(rng.normal(0, 0.25, p.size)),
                              m.core_radius * np.exp(rng.normal(0, 0.2, p.size))]).astype(np.float32)
    k, r = kind[idx], radius[idx]

    edge = (d2 - d1) / 2  # ~distance to the unit border
    lab = np.full(y.shape, EPI, np.int8)
    lab[edge < m.stroma * S / 3 * (1 + 0.7 * fields[2])] = STROMA
    lab[edge < 1.6 * m.vessels] = VESSEL
    lab[(k == GLAND) & (d1 < r)] = LUMEN
    lab[(k == PAPILLA) & (d1 > r + m.lining)] = LUMEN
    lab[(k == PAPILLA) & (d1 < r)] = CORE
    lab[(k == PAPILLA) & (d1 < 1.5)] = VESSEL  # capillary in the core
    lab[(k == SOLID) & (d1 < r)] = KERATIN
    if m.spindle > 0:  # threshold on the tile-normalised field: every tile gets ~`spindle` sarcomatous area
        lab[fields[3] > NormalDist().inv_cdf(1 - m.spindle)] = SARCOMA
    return lab, d1, offset, k, r


def _nuclei(m: Morphology, rng: np.random.Generator, lat: _Lattice, lab, dist, offset, k, r, fibre_angle,
            mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """One nucleus per cell seed, given the architecture at the seeds. Returns the geometry table
    (6, n): centre y, x, cos, sin of the long axis, 1/a, 1/b, and the appearance table (7, n): chromatin,
    lobulation amplitude and phase, wrinkle amplitude and phase, nucleolus, minor radius in px."""
    n, pleo = lat.y.size, m.pleomorphism
    # the epithelium lining a lumen / papillary core: nuclei line up at a depth of 25-75% of the lining
    # (pseudostratified when the lining is thick), long axis perpendicular to the surface
    lined = (((k == GLAND) & (dist < r + m.lining) | (k == PAPILLA) & (dist < r + m.lining + 0.5 * lat.s))
             & (dist > r - 0.5 * lat.s) & (lab != STROMA) & (lab != SARCOMA))
    tumour, sarcoma = (lab == EPI) | lined, lab == SARCOMA
    support = ~tumour & ((((lab == STROMA) | (lab == CORE)) & (rng.uniform(size=n) < 0.22)) |
                         ((lab == VESSEL) & (rng.uniform(size=n) < 0.5)))  # fibroblasts, endothelium
    alive = tumour | sarcoma | support
    near_pearl = tumour & (k == SOLID) & (r > 0) & (dist < 1.5 * r)

    rad = m.nuclear_radius * np.exp(rng.normal(0, m.nuclear_radius_sd / m.nuclear_radius, n))
    giant = sarcoma & (rng.uniform(size=n) < 0.15 * pleo)  # bizarre tumour giant nuclei
    rad = np.where(giant, 2.0 * rad, np.where(support, 2.3, rad))
    el = np.maximum(1.0, m.elongation * np.exp(rng.normal(0, 0.1 + 0.2 * pleo, n)))
    el = np.where(support, 4.5, np.where(sarcoma & ~giant, 4.2 * np.exp(rng.normal(0, 0.2, n)),
                                         np.where(near_pearl, 2.5, el)))
    a = np.minimum(rad * np.sqrt(el), 1.4 * lat.s)
    b = rad / np.sqrt(el)

    radial = np.arctan2(offset[0], offset[1])  # direction from the unit centre
    theta = np.where(sarcoma | (lab == STROMA) | (lab == CORE), fibre_angle,
                     np.where((lab == VESSEL) | near_pearl, radial + np.pi / 2,
                              np.where(tumour & (k != SOLID), radial, rng.uniform(0, np.pi, n))))
    depth = np.where(lined, r + m.lining * rng.uniform(0.25, 0.75, n) - dist, 0.0)
    cy = lat.y + depth * np.sin(radial) + rng.normal(0, 0.08 * lat.s, n)
    cx = lat.x + depth * np.cos(radial) + rng.normal(0, 0.08 * lat.s, n)

    chrom = np.where(support, 0.9, m.chromatin * np.exp(rng.normal(0, 0.1 + 0.25 * pleo, n)) * (1 + 0.2 * giant))
    lobe = np.where(support, 0.0, 0.2 * pleo * rng.uniform(size=n))
    wrinkle = np.where(tumour, 0.12 * m.wrinkle * rng.uniform(0.5, 1, n), 0.0)
    nucleolus = ~support & (rng.uniform(size=n) < m.nucleoli)
    dead = 1e3  # 1/axis of a seed without nucleus: never the best candidate
    geom = np.stack([cy, cx, np.cos(theta), np.sin(theta), np.where(alive, 1 / a, dead), np.where(alive, 1 / b, dead)])
    look = np.stack([chrom, lobe, rng.uniform(0, 2 * np.pi, n), wrinkle, rng.uniform(0, 2 * np.pi, n),
                     nucleolus, b / mpp])
    return geom.astype(np.float32), look.astype(np.float32)


def _nucleus_frame(geom: np.ndarray, j: np.ndarray, y: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of the points (y, x) in the normalised frame of nuclei j (unit circle = nucleus)."""
    cy, cx, cos, sin, ia, ib = np.take(geom, j, axis=1)
    dy, dx = y - cy, x - cx
    return (dx * cos + dy * sin) * ia, (dy * cos - dx * sin) * ib


def render_concentrations(morph: Morphology, rng: np.random.Generator, size: int, mpp: float
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Hematoxylin and eosin concentration maps (float32, size x size, >= 0) of one tile; mpp = um / px."""
    m = morph
    y, x = (np.mgrid[:size, :size].astype(np.float32) + 0.5) * mpp
    # smooth fields: unit warp (2), stroma width, sarcomatous zone, collagen fibres; fine: cytoplasm, chromatin
    coarse = _noise(rng, size, mpp, [0.3 * m.unit_size] * 2 + [6.0, 10.0, 12.0])
    mid, fine = _noise(rng, size, mpp, [1.2, 0.5])
    # collagen fibres follow the iso-lines of a smooth field; stromal and spindle nuclei align with them
    fibres = 0.5 + 0.5 * np.sin(2 * np.pi * 12.0 / 4.0 * coarse[4] + 1.5 * mid)
    gy, gx = np.gradient(coarse[4])
    fibre_angle = np.arctan2(gy, gx) + np.pi / 2

    # architecture, evaluated at the pixels and at the cell seeds (fields looked up at the nearest pixel)
    lat = _Lattice(rng, y, x, float(np.sqrt(1000 / m.nuclear_density)), jitter=0.75)
    pix = np.clip((np.stack([lat.y, lat.x]) / mpp).astype(np.int32), 0, size - 1)
    seed_at = (slice(None), pix[0], pix[1])
    pts = np.concatenate([np.stack([y, x]).reshape(2, -1), np.stack([lat.y, lat.x])], 1)
    fields = np.concatenate([coarse[:4].reshape(4, -1), coarse[:4][seed_at]], 1)
    lab, d1, offset, kind, radius = _architecture(m, rng, pts[0], pts[1], fields)
    P = size * size
    geom, look = _nuclei(m, rng, lat, lab[P:], d1[P:], offset[:, P:], kind[P:], radius[P:],
                         fibre_angle[seed_at[1:]], mpp)
    lab, d1 = lab[:P].reshape(size, size), d1[:P].reshape(size, size)

    # cells: Voronoi cells of the seeds (membranes); per pixel the nucleus of smallest normalised radius
    c1 = np.full((size, size), np.inf, np.float32)
    c2, best, bj = c1.copy(), c1.copy(), np.zeros((size, size), np.int32)
    for j in lat.neighbours(y, x):
        d = (y - lat.y[j]) ** 2 + (x - lat.x[j]) ** 2
        c1, c2 = np.minimum(c1, d), np.minimum(c2, np.maximum(c1, d))
        u, v = _nucleus_frame(geom, j, y, x)
        r2 = u * u + v * v
        bj = np.where(r2 < best, j, bj)
        best = np.minimum(best, r2)
    bu, bv = _nucleus_frame(geom, bj, y, x)
    border = np.clip(1 - (np.sqrt(c2) - np.sqrt(c1)) / max(1.2, mpp), 0, 1)  # cell membranes

    chrom, lobe, lobe_phase, wrinkle, wrinkle_phase, nucleolus, b_px = np.take(look, bj, axis=1)
    phi = np.arctan2(bv, bu)
    rho = np.sqrt(best) / (1 + lobe * np.cos(3 * phi + lobe_phase) + wrinkle * np.cos(9 * phi + wrinkle_phase))
    nuc = np.clip((1 - rho) * b_px + 0.5, 0, 1)  # antialiased nucleus mask
    rim = np.clip((rho - 0.6) / 0.4, 0, 1) ** 2      # chromatin margination (vesicular nuclei)
    t = m.chromatin_texture
    nuc_h = chrom * np.maximum(0, 1 - t + t * (0.45 + 0.8 * rim + 0.4 * fine))
    nucleolus = nucleolus * (((bu - 0.15) ** 2 + bv ** 2) < 0.22 ** 2)

    # background stain of each compartment
    halo = m.halo * np.clip((1.7 - rho) / 0.7, 0, 1) * (rho > 1)
    epi_e = m.cytoplasm_eosin * (1 - m.cytoplasm_clearing) * np.exp(0.3 * mid) * (1 - halo) + m.membrane * border
    keratin = 0.5 + 0.12 * np.sin(2 * np.pi * d1 / 3.5 + 2 * mid)  # concentric lamellae of the pearl
    se = m.stroma_eosin  # compartments in label order: EPI, LUMEN, STROMA, CORE, VESSEL, KERATIN, SARCOMA
    e = np.choose(lab, [epi_e, 0.015 * (1 + mid), se * (0.75 + 0.25 * fibres), 0.5 * se * (0.6 + 0.4 * fibres),
                        0.7 + 0.1 * mid, keratin, 0.26 * (0.6 + 0.4 * fibres)])
    h = np.choose(lab, [m.cytoplasm_hematoxylin, 0.005, 0.03, 0.03, 0.03, 0.03, 0.06]) * (1 + 0.5 * mid)

    h = h * (1 - nuc) + nuc * nuc_h + 0.2 * nucleolus
    e = e * (1 - 0.7 * nuc) + 0.45 * nucleolus
    return np.maximum(h, 0).astype(np.float32), np.maximum(e, 0).astype(np.float32)


# ---------------------------------------------------------------- optics

def concentrations_to_rgb(h: np.ndarray, e: np.ndarray, stain: Stain, rng: np.random.Generator) -> np.ndarray:
    """Beer-Lambert transmission of the stained section, then optical blur and sensor noise; uint8 HxWx3."""
    M = stain_od_matrix(stain).astype(np.float32)
    od = (h * stain.h_intensity)[..., None] * M[0] + (e * stain.e_intensity)[..., None] * M[1]
    rgb = np.asarray(stain.illumination, np.float32) * np.exp(np.float32(-np.log(10)) * od)
    if stain.blur_sigma > 0:
        rgb = ndimage.gaussian_filter(rgb, (stain.blur_sigma, stain.blur_sigma, 0), mode="reflect")
    if stain.noise_sd > 0:
        rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * np.float32(stain.noise_sd)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def render_tile(morph: Morphology, stain: Stain, rng: np.random.Generator, size: int = 64, mpp: float = 1.0
                ) -> np.ndarray:
    """One RGB tile, uint8 (size, size, 3); deterministic given the generator state."""
    h, e = render_concentrations(morph, rng, size, mpp)
    return concentrations_to_rgb(h, e, stain, rng)


def optical_density(rgb: np.ndarray, illumination) -> np.ndarray:
    """Beer-Lambert optical density of every pixel, (N, 3): -log10(I / I0), intensities clipped at 1."""
    return -np.log10(np.clip(np.asarray(rgb, np.float64).reshape(-1, 3), 1, None) / np.asarray(illumination, np.float64))


BACKGROUND_OD = 0.15   # a pixel whose OD norm is below this is background (Macenko's beta)


def estimate_stain_vectors(rgb: np.ndarray, illumination=None, beta: float = BACKGROUND_OD, alpha: float = 2.0
                           ) -> np.ndarray:
    """Macenko estimate of the unit H and E OD vectors (2x3, rows H, E) of a tile (H,W,3) or batch (N,H,W,3).

    Pixels with OD norm < beta (background) are dropped; the OD plane is the top two eigenvectors of the
    second-moment matrix; the stain vectors are the alpha / (100 - alpha) percentile angles in that plane.
    `illumination` is I0 per channel (best: the site's); None estimates it as the 99.5th percentile intensity
    of each channel, which is biased on tiles without background."""
    x = np.asarray(rgb, np.float64).reshape(-1, 3)
    i0 = np.percentile(x, 99.5, axis=0) if illumination is None else np.asarray(illumination, np.float64)
    od = optical_density(x, i0)
    od = od[np.linalg.norm(od, axis=1) > beta]
    if len(od) < 10:
        raise ValueError(f"estimate_stain_vectors: only {len(od)} stained pixels (OD norm > {beta})")
    _, vecs = np.linalg.eigh(od.T @ od)
    plane = vecs[:, [2, 1]] * np.sign(vecs[:, [2, 1]].sum(0))
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v = np.stack([plane @ [np.cos(lo), np.sin(lo)], plane @ [np.cos(hi), np.sin(hi)]])
    v = v * np.sign(v.sum(1, keepdims=True))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v if v[0, 0] >= v[1, 0] else v[::-1]  # hematoxylin absorbs red far more than eosin
