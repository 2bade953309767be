"""The embedded default dataset: a synthetic TCGA-UT world (`medi synthesize`).

It is written in exactly the real format, so one loader serves both:
  <output>/tcga-ut/<Class_folder>/0/<slide_barcode>/<level>_<x>_<y>.jpg   (TCGA-UT layout)
  <output>/gdc_metadata.csv    GDC-style slide metadata, real column names, `'--` for missing values
  <output>/ground_truth.json   every site's stain and every class's morphology, for later checks

Structure follows the real per-class figures (scaled down): slide counts, the skew of slides over tissue
source sites (TSS codes exclusive to one class, as in TCGA; `NA` is one of the UCS codes), and race,
gender and age per slide. Each site has its own stain (see `medi.histology`), so the site is an easy
cue, as the stain is in TCGA. Everything is deterministic given `synthetic.seed`.
"""
from __future__ import annotations

import csv
import dataclasses
import logging
import os
import shutil
import string
import time
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from medi import histology
from medi.config import Config, SyntheticConfig
from medi.artifacts import METADATA_FILE, TILES_DIR
from medi.io import write_json

log = logging.getLogger(__name__)

GDC_COLUMNS = [
    "project_id", "case_submitter_id", "sample_submitter_id", "slide_submitter_id", "tissue_source_site",
    "sample_type", "is_ffpe", "preservation_method", "age_at_index", "days_to_birth", "ethnicity", "gender",
    "race", "vital_status", "primary_diagnosis", "site_of_resection_or_biopsy",
]
MISSING = "'--"
RACES = ["white", "black or african american", "asian", "not reported", "american indian or alaska native"]


@dataclass(frozen=True)
class ClassFacts:
    """Real per-project figures (reference table): slides, TSS codes, the five largest TSS, race, female share."""
    slides: int
    tss: int
    largest_tss: tuple[int, ...]
    race_counts: tuple[int, int, int, int]  # white, black, asian, not reported
    female: float
    age_mean: float
    diagnosis: str
    organ_site: str


FACTS: dict[str, ClassFacts] = {
    "LUAD": ClassFacts(494, 33, (88, 80, 46, 34, 31), (401, 53, 8, 31), 0.57, 66, "Adenocarcinoma, NOS", "Upper lobe, lung"),
    "LUSC": ClassFacts(468, 35, (48, 47, 39, 38, 35), (326, 32, 9, 101), 0.25, 68, "Squamous cell carcinoma, NOS", "Upper lobe, lung"),
    "KIRC": ClassFacts(389, 17, (101, 83, 50, 36, 30), (339, 38, 6, 6), 0.36, 61, "Clear cell adenocarcinoma, NOS", "Kidney, NOS"),
    "KIRP": ClassFacts(227, 29, (24, 23, 20, 14, 14), (165, 45, 6, 10), 0.23, 62, "Papillary adenocarcinoma, NOS", "Kidney, NOS"),
    "KICH": ClassFacts(82, 6, (20, 17, 16, 15, 9), (70, 8, 3, 1), 0.43, 51, "Renal cell carcinoma, chromophobe type", "Kidney, NOS"),
    "UCEC": ClassFacts(414, 28, (61, 46, 39, 33, 33), (281, 89, 14, 21), 1.00, 64, "Endometrioid adenocarcinoma, NOS", "Endometrium"),
    "UCS": ClassFacts(71, 10, (14, 11, 10, 9, 9), (51, 11, 9, 0), 1.00, 70, "Carcinosarcoma, NOS", "Corpus uteri"),
}
# Classes without real figures get a mid-sized generic profile.
GENERIC_FACTS = ClassFacts(250, 20, (40, 30, 25, 20, 15), (200, 25, 10, 15), 0.5, 62, "Carcinoma, NOS", "Not otherwise specified")


def site_shares(facts: ClassFacts) -> np.ndarray:
    """Share of a class's slides per TSS, largest first: the five real largest, a geometric tail for the rest."""
    head = np.array(facts.largest_tss[: facts.tss], dtype=float)
    n_tail = facts.tss - len(head)
    rest = max(facts.slides - head.sum(), 0.0)
    if n_tail > 0:
        tail = 0.85 ** np.arange(1, n_tail + 1)
        head = np.concatenate([head, rest * tail / tail.sum()])
    return head / head.sum()


def allocate(total: int, shares: np.ndarray, min_sites: int = 3) -> np.ndarray:
    """Integer slide counts per site (largest-remainder rounding); sites left with none are dropped."""
    raw = shares * total
    counts = np.floor(raw).astype(int)
    order = np.argsort(-(raw - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    for i in range(min(min_sites, len(counts))):  # keep the head: every class spans at least a few sites
        if counts[i] == 0:
            counts[i] = 1
            counts[np.argmax(counts)] -= 1
    return counts[counts > 0]


def class_site_shares(facts: ClassFacts, site_scale: float) -> np.ndarray:
    """Slide shares over the scaled-down number of sites (the largest real sites kept, renormalised)."""
    shares = site_shares(facts)
    n = min(len(shares), max(3, round(facts.tss * site_scale)))
    return shares[:n] / shares[:n].sum()


def tss_codes(rng: np.random.Generator, classes: list[str], site_scale: float) -> dict[str, list[str]]:
    """Two-character TSS codes, each exclusive to one class. UCS gets `NA`, a real code that naive parsers lose."""
    alphabet = string.digits + string.ascii_uppercase
    pool = [a + b for a in alphabet for b in alphabet if a + b != "NA"]
    rng.shuffle(pool)
    out: dict[str, list[str]] = {}
    it = iter(pool)
    for c in classes:
        n = len(class_site_shares(FACTS.get(c, GENERIC_FACTS), site_scale))
        codes = [next(it) for _ in range(n)]
        if c == "UCS":
            codes[-1] = "NA"
        out[c] = codes
    return out


@dataclass(frozen=True)
class Slide:
    cls: str
    folder: str
    barcode: str
    tss: str
    row: dict[str, str]      # the GDC metadata row
    seed: int


def _participant(rng: np.random.Generator, used: set[str]) -> str:
    alphabet = np.array(list(string.digits + string.ascii_uppercase))
    while True:
        code = "".join(rng.choice(alphabet, 4))
        if code not in used:
            used.add(code)
            return code


def plan_world(cfg: SyntheticConfig, folders: dict[str, str]) -> tuple[list[Slide], dict[str, histology.Stain], dict[str, str]]:
    """Decide every slide, its site and its demographics (no pixels yet)."""
    rng = np.random.default_rng(cfg.seed)
    codes = tss_codes(rng, cfg.classes, cfg.site_scale)
    stains: dict[str, histology.Stain] = {}
    site_class: dict[str, str] = {}
    slides: list[Slide] = []
    used: set[str] = set()
    for c in cfg.classes:
        facts = FACTS.get(c, GENERIC_FACTS)
        n_slides = max(8, round(facts.slides * cfg.slide_scale))
        counts = allocate(n_slides, class_site_shares(facts, cfg.site_scale))
        race_p = np.array([*facts.race_counts, max(facts.slides - sum(facts.race_counts), 0)], dtype=float) + 0.5
        race_p /= race_p.sum()
        class_slides = []
        for tss, n in zip(codes[c], counts):
            stains[tss] = histology.sample_site_stain(rng, cfg.stain_strength)
            site_class[tss] = c
            site_race = rng.dirichlet(20 * race_p)  # sites differ in who they serve
            for _ in range(n):
                case = f"TCGA-{tss}-{_participant(rng, used)}"
                female = rng.random() < facts.female
                age = int(np.clip(rng.normal(facts.age_mean, 10), 20, 90))
                missing_age = rng.random() < 0.03
                row = {
                    "project_id": f"TCGA-{c}",
                    "case_submitter_id": case,
                    "sample_submitter_id": f"{case}-01A",
                    "slide_submitter_id": f"{case}-01Z-00-DX1",
                    "tissue_source_site": f"Synthetic Medical Center {tss}",
                    "sample_type": "Primary Tumor",
                    "is_ffpe": "true",
                    "preservation_method": "FFPE",
                    "age_at_index": MISSING if missing_age else str(age),
                    "days_to_birth": MISSING if missing_age else str(-int(age * 365.25 + rng.integers(0, 365))),
                    "ethnicity": str(rng.choice(["not hispanic or latino", "hispanic or latino", "not reported", MISSING],
                                                p=[0.8, 0.04, 0.13, 0.03])),
                    "gender": "female" if female else "male",
                    "race": RACES[rng.choice(len(RACES), p=site_race)],
                    "vital_status": str(rng.choice(["Alive", "Dead"], p=[0.65, 0.35])),
                    "primary_diagnosis": facts.diagnosis,
                    "site_of_resection_or_biopsy": facts.organ_site,
                }
                class_slides.append(Slide(c, folders[c], row["slide_submitter_id"], tss, row, int(rng.integers(2**31))))
        # Like a GDC export: projects in turn, cases sorted by barcode (so a site's slides are contiguous).
        slides.extend(sorted(class_slides, key=lambda sl: sl.barcode))
    return slides, stains, site_class


def class_morphology(cls: str) -> histology.Morphology:
    """The morphology program of a class: the built-in one, or a generic one seeded by the class name."""
    if cls in histology.CLASS_MORPHOLOGY:
        return histology.CLASS_MORPHOLOGY[cls]
    return histology.generic_morphology(np.random.default_rng(zlib.crc32(cls.encode())))


def _render_slide(args: tuple[Slide, histology.Stain, SyntheticConfig, str]) -> int:
    slide, site_stain, cfg, tiles_root = args
    rng = np.random.default_rng(slide.seed)
    stain = histology.jitter_stain(site_stain, rng, cfg.slide_jitter)
    morph = class_morphology(slide.cls)
    folder = Path(tiles_root) / slide.folder / "0" / slide.barcode
    folder.mkdir(parents=True, exist_ok=True)
    grid = rng.choice(40 * 40, size=cfg.tiles_per_slide, replace=False)  # distinct tile positions on the slide
    for g in grid:
        tile = histology.render_tile(morph, stain, rng, size=cfg.tile_size, mpp=cfg.mpp)
        Image.fromarray(tile).save(folder / f"0_{g // 40}_{g % 40}.jpg", quality=stain.jpeg_quality)
    return cfg.tiles_per_slide


def synthesize(cfg: Config, workers: int | None = None) -> dict:
    """Render the world into `cfg.synthetic.output` (replaced atomically) and return a summary."""
    syn = cfg.synthetic
    out = Path(syn.output)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    slides, stains, site_class = plan_world(syn, cfg.class_folders)

    tiles_root = tmp / TILES_DIR
    jobs = [(s, stains[s.tss], syn, str(tiles_root)) for s in slides]
    workers = workers or os.cpu_count() or 1
    n_tiles = 0
    with ProcessPoolExecutor(workers) if workers > 1 else _InProcess() as pool:
        for n in tqdm(pool.map(_render_slide, jobs, chunksize=4), total=len(jobs), desc="synthesize slides",
                      unit="slide", mininterval=1.0):
            n_tiles += n

    with open(tmp / METADATA_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=GDC_COLUMNS)
        writer.writeheader()
        writer.writerows(s.row for s in slides)

    summary = {
        "classes": syn.classes,
        "slides": len(slides),
        "tiles": n_tiles,
        "sites": len(stains),
        "slides_per_class": {c: sum(s.cls == c for s in slides) for c in syn.classes},
        "sites_per_class": {c: sum(v == c for v in site_class.values()) for c in syn.classes},
    }
    write_json(tmp / "ground_truth.json", {
        "summary": summary,
        "tile_size": syn.tile_size,
        "mpp": syn.mpp,
        "sites": {tss: {"class": site_class[tss], "stain": dataclasses.asdict(st),
                        "od_matrix": histology.stain_od_matrix(st).round(6).tolist()} for tss, st in stains.items()},
        "classes": {c: dataclasses.asdict(class_morphology(c)) for c in syn.classes},
    })
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return summary


class _InProcess:
    """Stand-in for a process pool when one worker is asked for (simpler tracebacks, no fork)."""

    def __enter__(self) -> "_InProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn, items, chunksize: int = 1):  # noqa: ARG002 - same signature as Executor.map
        return map(fn, items)


def dataset_grid(cfg: SyntheticConfig, per_class: int = 6) -> tuple[np.ndarray, list[str], list[list[str]]]:
    """Tiles of the written world: one row per class, one column per site of that class (largest first)."""
    import pandas as pd  # local: only the figure needs it

    meta = pd.read_csv(Path(cfg.output) / METADATA_FILE, dtype=str, keep_default_na=False)
    tiles_root = Path(cfg.output) / TILES_DIR
    rows, labels = [], []
    for c in cfg.classes:
        sub = meta[meta.project_id == f"TCGA-{c}"]
        tss = sub.slide_submitter_id.str.slice(5, 7)
        sites = tss.value_counts().index[:per_class].tolist()
        row, lab = [], []
        for site in sites:
            slide = sub.slide_submitter_id[tss == site].iloc[0]
            tile = sorted((next(tiles_root.glob(f"*/0/{slide}"))).glob("*.jpg"))[0]
            row.append(np.asarray(Image.open(tile).convert("RGB")))
            lab.append(f"TSS {site}")
        blank = np.zeros_like(row[0])
        rows.append(row + [blank] * (per_class - len(row)))
        labels.append(lab + [""] * (per_class - len(lab)))
    return np.stack([np.stack(r) for r in rows]), list(cfg.classes), labels


def counterfactual_grid(cfg: SyntheticConfig, n_sites: int = 8) -> tuple[np.ndarray, list[str], list[str]]:
    """Every class rendered with the stains of `n_sites` sites taken across classes (pairs TCGA never has).

    Shows that a class keeps its morphology under any site's stain, and a site its stain under any class.
    """
    slides, stains, site_class = plan_world(cfg, {c: c for c in cfg.classes})
    by_class: dict[str, list[str]] = {}
    for tss, c in site_class.items():
        by_class.setdefault(c, []).append(tss)
    picked = [s for group in zip(*by_class.values()) for s in group][:n_sites] if len(by_class) > 1 else list(stains)[:n_sites]
    grid = np.stack([
        np.stack([histology.render_tile(
            class_morphology(c), stains[s], np.random.default_rng([cfg.seed, i, j]), size=cfg.tile_size, mpp=cfg.mpp)
            for j, s in enumerate(picked)])
        for i, c in enumerate(cfg.classes)])
    return grid, list(cfg.classes), [f"TSS {s} ({site_class[s]})" for s in picked]


# ----------------------------------------------------------------------------------------------- the stage
def run_stage(cfg: Config, workers: int | None = None) -> dict:
    """`medi synthesize`: the synthetic world under `data.root` and its two figures, logged to MLflow."""
    import mlflow

    from medi import figures, tracking

    with tracking.stage_run(cfg, "synthesize", ("synthetic",)):
        t0 = time.perf_counter()
        summary = synthesize(cfg, workers=workers)
        seconds = time.perf_counter() - t0
        log.info("synthesized %d tiles of %d slides at %d sites in %.1fs", summary["tiles"], summary["slides"],
                 summary["sites"], seconds)
        mlflow.log_metrics({"tiles": summary["tiles"], "slides": summary["slides"], "sites": summary["sites"],
                            "seconds": seconds, "tiles_per_second": summary["tiles"] / seconds})
        grid, rows, cols = dataset_grid(cfg.synthetic)
        fig_path = Path(cfg.synthetic.figure)
        figures.save(figures.tile_grid(grid, rows, cols, "Synthetic TCGA-UT: tiles per class (rows) at that "
                                       "class's largest sites (columns)", scale=1.2), fig_path)
        grid, rows, cols = counterfactual_grid(cfg.synthetic)
        cf_path = fig_path.with_name(fig_path.stem + "_counterfactual" + fig_path.suffix)
        figures.save(figures.tile_grid(grid, rows, cols, "Every class under the stains of sites of other classes "
                                       "(ground-truth renderer; pairs the dataset never has)", scale=1.2), cf_path)
        mlflow.log_artifact(str(fig_path), "figures")
        mlflow.log_artifact(str(cf_path), "figures")
        mlflow.log_dict(summary, "synthetic_summary.json")
    return summary
