"""TCGA-UT tiles + GDC slide metadata -> a packed, memory-mapped training set (`medi prepare`).

Input in `data.root` (real data in `data/`, or the synthetic world in the same format):
  tcga-ut/<Class_folder>/<level>/<slide_barcode>/<tile>.jpg
  gdc_metadata.csv: the GDC slide metadata export, one row per slide, `'--` for missing values.

Output in `data.output` (default `artifacts/dataset/`):
  tiles.npy            uint8 (N, R, R, 3), R = data.resolution; open with `artifacts.load_tiles` (memory-mapped)
  index.parquet        one row per tile: idx (row in tiles.npy), path, slide, case, class, tss, race, gender, age
  slides.parquet       one row per metadata slide of the classes, with or without tiles (`tiles` counts them),
                       in metadata-file order: the split is made on this table, as the paper's code does
  prepare_report.json  what was read, what was skipped and why (nothing is dropped uncounted)

The TSS is parsed from the slide barcode as a string (`NA` is a real TSS code, never a missing value).
Packing is resumable: progress is kept in `<output>.partial/` and picked up when the inputs are unchanged.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Mapping

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from medi.artifacts import METADATA_FILE, TILES_DIR
from medi.config import Config
from medi.errors import MediError
from medi.io import write_json, write_parquet

log = logging.getLogger(__name__)

MISSING = "'--"
UNKNOWN = "Unknown"  # missing race/gender, as the paper's code writes them
REQUIRED_COLUMNS = ["project_id", "case_submitter_id", "slide_submitter_id", "gender", "race", "age_at_index"]
BARCODE = re.compile(r"^TCGA-(?P<tss>[A-Z0-9]{2})-(?P<participant>[A-Z0-9]{4})-(?P<sample>\d{2}[A-Z])"
                     r"-(?P<portion>\d{2})-(?P<slide>[A-Z]{2}[0-9A-Z]+)$")
TILE_SUFFIXES = {".jpg", ".jpeg"}
CHUNK = 256


def tss_of(barcode: str) -> str:
    """TSS code of a slide barcode: its second field, as a string (`TCGA-NA-...` -> 'NA')."""
    m = BARCODE.match(barcode)
    if m is None:
        raise MediError(f"'{barcode}' is not a TCGA slide barcode (expected e.g. TCGA-3B-A9HI-01Z-00-DX1)")
    return m["tss"]


# ----------------------------------------------------------------------------------------------- metadata
def read_metadata(path: str | Path) -> pd.DataFrame:
    """Read a GDC slide-metadata CSV: every value a string, `'--` -> missing, rows validated.

    Returns one row per slide with columns slide, case, class, tss, race, gender, age, meta_row
    (0-based data row in the file), in file order.
    """
    path = Path(path)
    if not path.exists():
        raise MediError(f"metadata file not found: {path}")
    # keep_default_na=False: 'NA' and friends stay strings; only the GDC marker means missing.
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    missing_cols = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing_cols:
        raise MediError(f"{path}: missing required column(s) {missing_cols}; found {list(raw.columns)}")
    raw = raw.map(lambda v: v.strip())

    def bad(i: int, col: str, msg: str) -> MediError:  # CSV line = data row + 2 (header, 1-based)
        return MediError(f"{path}: row {i + 1} (line {i + 2}), field '{col}': {msg}")

    rows = []
    for i, r in enumerate(raw.itertuples(index=False)):
        slide, project = r.slide_submitter_id, r.project_id
        if not BARCODE.match(slide):
            raise bad(i, "slide_submitter_id", f"'{slide}' is not a TCGA slide barcode")
        if not project.startswith("TCGA-") or len(project) < 6:
            raise bad(i, "project_id", f"expected a TCGA project such as TCGA-LUAD, got '{project}'")
        age_s = r.age_at_index
        if age_s in ("", MISSING):
            age = np.nan
        else:
            try:
                age = float(age_s)
            except ValueError:
                raise bad(i, "age_at_index", f"expected a number or {MISSING}, got '{age_s}'") from None
        rows.append({
            "slide": slide,
            "case": r.case_submitter_id if r.case_submitter_id not in ("", MISSING) else slide[:12],
            "class": project.removeprefix("TCGA-"),
            "tss": tss_of(slide),
            "race": r.race if r.race not in ("", MISSING) else UNKNOWN,
            "gender": r.gender if r.gender not in ("", MISSING) else UNKNOWN,
            "age": age,
            "meta_row": i,
        })
    meta = pd.DataFrame(rows, columns=["slide", "case", "class", "tss", "race", "gender", "age", "meta_row"])
    dup = meta[meta.duplicated("slide", keep=False)]
    if len(dup):
        first = dup.iloc[0]["slide"]
        where = [int(x) + 1 for x in dup[dup.slide == first].meta_row]
        raise MediError(f"{path}: slide_submitter_id '{first}' appears in rows {where}; expected one row per slide")
    return meta


# ----------------------------------------------------------------------------------------------- tiles
@dataclass
class Scan:
    tiles: pd.DataFrame                     # class, slide, path (relative to root)
    empty_slides: list[str] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)


def scan_tiles(root: str | Path, classes: list[str], folders: dict[str, str], level: str,
               slide_class: Mapping[str, str] | None = None) -> Scan:
    """List the tiles of `classes` in the TCGA-UT layout, checking every folder name on the way. A folder of
    several classes (COAD and READ) is read once; each slide there takes its class from `slide_class` (the
    metadata's project), else the first of them."""
    root = Path(root)
    records, empty, ignored = [], [], []
    sharing: dict[str, list[str]] = {}
    for c in classes:
        sharing.setdefault(folders[c], []).append(c)
    for folder, members in sharing.items():
        c = members[0]
        level_dir = root / folder / level
        if not level_dir.is_dir():
            present = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
            raise MediError(f"class {c}: expected the folder {level_dir} (<root>/<Class>/<level>/<slide>/<tile>.jpg); "
                            f"{root} holds {present[:20]}")
        for slide_dir in sorted(level_dir.iterdir()):
            if not slide_dir.is_dir():
                ignored.append(str(slide_dir.relative_to(root)))
                continue
            if not BARCODE.match(slide_dir.name):
                raise MediError(f"{slide_dir}: folder name '{slide_dir.name}' is not a TCGA slide barcode "
                                "(expected e.g. TCGA-3B-A9HI-01Z-00-DX1)")
            n_before = len(records)
            for tile in sorted(slide_dir.iterdir()):
                rel = str(tile.relative_to(root))
                if tile.is_file() and tile.suffix.lower() in TILE_SUFFIXES:
                    own = (slide_class or {}).get(slide_dir.name)
                    records.append((own if len(members) > 1 and own in members else c, slide_dir.name, rel))
                else:
                    ignored.append(rel)
            if len(records) == n_before:
                empty.append(slide_dir.name)
    return Scan(pd.DataFrame(records, columns=["class", "slide", "path"]), empty, ignored)


def build_index(scan: Scan, meta: pd.DataFrame, classes: list[str], metadata_path: str) -> tuple[pd.DataFrame, dict]:
    """Join tiles with metadata; count (never silently drop) tiles without metadata and metadata without tiles."""
    tiles = scan.tiles
    meta_sel = meta[meta["class"].isin(classes)]
    joined = tiles.merge(meta.drop(columns="class"), on="slide", how="left", indicator=True)
    clash = tiles.merge(meta[["slide", "class", "meta_row"]], on="slide", suffixes=("", "_meta"))
    clash = clash[clash["class"] != clash["class_meta"]]
    if len(clash):
        r = clash.iloc[0]
        raise MediError(f"{metadata_path}: row {int(r.meta_row) + 1}: slide {r.slide} is in project TCGA-{r.class_meta} "
                        f"but its tiles are in the folder of class {r['class']}")
    no_meta = joined[joined["_merge"] == "left_only"]
    index = joined[joined["_merge"] == "both"].drop(columns="_merge")
    slides_with_tiles = set(tiles.slide)
    meta_without_tiles = meta_sel[~meta_sel.slide.isin(slides_with_tiles)]
    # Metadata order first (the paper's split takes keys in order of first appearance), tile name within a slide.
    index = index.sort_values(["meta_row", "path"], kind="stable").reset_index(drop=True)
    index.insert(0, "idx", np.arange(len(index), dtype=np.int64))
    index = index[["idx", "path", "slide", "case", "class", "tss", "race", "gender", "age", "meta_row"]]
    skipped = {
        "tiles_without_metadata": int(len(no_meta)),
        "slides_without_metadata": sorted(no_meta.slide.unique().tolist()),
        "metadata_rows_without_tiles": int(len(meta_without_tiles)),
        "slides_without_tiles": sorted(meta_without_tiles.slide.tolist()),
        "empty_slide_folders": scan.empty_slides,
        "ignored_files": scan.ignored_files,
        "metadata_rows_other_classes": int((~meta["class"].isin(classes)).sum()),
    }
    return index, skipped


# ----------------------------------------------------------------------------------------------- packing
def decode_tile(path: Path | BinaryIO, resolution: int) -> np.ndarray:
    """Decode one tile (a file, or its bytes) to (R, R, 3) uint8. Raises ValueError with the reason for a bad tile."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                raise ValueError(f"expected an RGB image, got mode {im.mode}")
            if im.width != im.height:
                raise ValueError(f"expected a square tile, got {im.width}x{im.height}")
            if im.width != resolution:
                im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode: {exc}") from None


def _decode_chunk(args: tuple[str, list[str], int]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    root, paths, resolution = args
    out = np.zeros((len(paths), resolution, resolution, 3), np.uint8)
    bad = []
    for i, p in enumerate(paths):
        try:
            out[i] = decode_tile(Path(root) / p, resolution)
        except ValueError as exc:
            bad.append((i, str(exc)))
    return out, bad


def _fingerprint(root: Path, paths: list[str], resolution: int) -> str:
    h = hashlib.sha256(f"{root.resolve()}|{resolution}".encode())
    for p in paths:
        st = (root / p).stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def pack_tiles(root: Path, paths: list[str], resolution: int, partial: Path, on_bad: str, workers: int) -> tuple[Path, np.ndarray, list[dict]]:
    """Decode and resize every tile into one uint8 .npy (memory-mapped), resumably.

    Returns the packed file, the mask of good tiles and the bad tiles (path, reason). With on_bad='error'
    the first bad tile stops the run with its path and reason.
    """
    partial.mkdir(parents=True, exist_ok=True)
    state_path, array_path = partial / "state.json", partial / "tiles.npy"
    fp = _fingerprint(root, paths, resolution)
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("fingerprint") != fp or not array_path.exists():
        state = {"fingerprint": fp, "done": 0, "bad": []}
        arr = np.lib.format.open_memmap(array_path, mode="w+", dtype=np.uint8, shape=(len(paths), resolution, resolution, 3))
    else:
        arr = np.load(array_path, mmap_mode="r+")
        log.info("resuming prepare at tile %d of %d", state["done"], len(paths))
    start = state["done"]
    chunks = [(str(root), paths[i:i + CHUNK], resolution) for i in range(start, len(paths), CHUNK)]
    workers = workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(chunks) > 1 else None
    try:
        results = pool.map(_decode_chunk, chunks) if pool else map(_decode_chunk, chunks)
        bar = tqdm(total=len(paths), initial=start, desc="prepare tiles", unit="tile", mininterval=1.0)
        for (chunk_root, chunk_paths, _), (block, bad) in zip(chunks, results):
            lo = state["done"]
            for i, reason in bad:
                if on_bad == "error":
                    raise MediError(f"{Path(chunk_root) / chunk_paths[i]}: bad tile: {reason} "
                                    "(set data.on_bad_tile: skip to skip and count such tiles)")
                state["bad"].append({"path": chunk_paths[i], "reason": reason, "position": lo + i})
            arr[lo:lo + len(block)] = block
            arr.flush()
            state["done"] = lo + len(block)
            write_json(state_path, state)  # atomic: a crash resumes from the last whole chunk
            bar.update(len(block))
        bar.close()
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    done = len(paths) - start
    if done:
        log.info("packed %d tiles in %.1fs (%.0f tiles/s)", done, time.perf_counter() - t0, done / max(time.perf_counter() - t0, 1e-9))
    good = np.ones(len(paths), bool)
    good[[b["position"] for b in state["bad"]]] = False
    del arr
    return array_path, good, state["bad"]


def metadata_slides(meta: pd.DataFrame, classes: list[str], index: pd.DataFrame) -> pd.DataFrame:
    """Every metadata row of `classes` (the split's input), with its number of packed tiles (0: none)."""
    tiles = index.groupby("slide").size()
    slides = meta[meta["class"].isin(classes)].sort_values("meta_row", kind="stable").reset_index(drop=True)
    slides = slides[["slide", "case", "class", "tss", "race", "gender", "age", "meta_row"]].copy()
    slides["tiles"] = slides.slide.map(tiles).fillna(0).astype(np.int64)
    return slides


def dataset_paths(cfg: Config) -> tuple[Path, Path]:
    """Tile root and metadata CSV of the active data source, with a clear message when they are absent."""
    root = Path(cfg.data.root)
    paths = (root / TILES_DIR, root / METADATA_FILE)
    if cfg.data.source == "synthetic":
        hint = "run `medi synthesize` (or `dvc repro`) first"
    else:
        hint = (f"fetch TCGA-UT with `make tcga-ut CLASSES=\"...\"` (or `dvc pull` where a DVC remote holds it) and "
                f"put the GDC slide metadata export at {root / METADATA_FILE}; see README, 'Real data'")
    for p in paths:
        if not p.exists():
            raise MediError(f"data.source is '{cfg.data.source}' but {p} does not exist: {hint}")
    return paths


def prepare(cfg: Config) -> dict:
    """Scan, join, pack; write the dataset folder atomically; return the report."""
    root, metadata_csv = dataset_paths(cfg)
    classes = cfg.classes
    meta = read_metadata(metadata_csv)
    scan = scan_tiles(root, classes, cfg.class_folders, cfg.data.level, dict(zip(meta["slide"], meta["class"])))
    index, skipped = build_index(scan, meta, classes, str(metadata_csv))
    if index.empty:
        raise MediError(f"no tile of classes {classes} under {root} has a metadata row in {metadata_csv}")

    out = Path(cfg.data.output)
    partial = out.with_name(out.name + ".partial")
    array_path, good, bad = pack_tiles(root, index.path.tolist(), cfg.data.resolution, partial,
                                       cfg.data.on_bad_tile, cfg.data.workers)
    if not good.all():  # rare: copy the good rows into a compact array
        src = np.load(array_path, mmap_mode="r")
        compact = np.lib.format.open_memmap(partial / "tiles.compact.npy", mode="w+", dtype=np.uint8,
                                            shape=(int(good.sum()), *src.shape[1:]))
        compact[:] = src[good]
        compact.flush()
        del compact, src
        os.replace(partial / "tiles.compact.npy", array_path)
        index = index[good].reset_index(drop=True)
        index["idx"] = np.arange(len(index), dtype=np.int64)

    slides = metadata_slides(meta, classes, index)
    report = {
        "source": cfg.data.source,
        "root": str(root),
        "metadata_csv": str(metadata_csv),
        "resolution": cfg.data.resolution,
        "classes": classes,
        "tiles": int(len(index)),
        "slides": int((slides.tiles > 0).sum()),
        "tss": int(slides.loc[slides.tiles > 0, "tss"].nunique()),
        "tiles_per_class": {c: int((index["class"] == c).sum()) for c in classes},
        "skipped": {**skipped, "bad_tiles": len(bad), "bad_tile_list": bad},
    }
    tmp_out = out.with_name(out.name + ".new")
    shutil.rmtree(tmp_out, ignore_errors=True)
    tmp_out.mkdir(parents=True)
    os.replace(array_path, tmp_out / "tiles.npy")
    write_parquet(tmp_out / "index.parquet", index)
    write_parquet(tmp_out / "slides.parquet", slides)
    write_json(tmp_out / "prepare_report.json", report)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp_out, out)
    shutil.rmtree(partial, ignore_errors=True)
    return report


# ----------------------------------------------------------------------------------------------- the stage
def run_stage(cfg: Config) -> dict:
    """`medi prepare`: index, check and pack the raw tiles (`prepare`), report what was skipped, log to MLflow."""
    import mlflow

    from medi import tracking

    with tracking.stage_run(cfg, "prepare", ("data",) + (("synthetic",) if cfg.data.source == "synthetic" else ())):
        t0 = time.perf_counter()
        report = prepare(cfg)
        seconds = time.perf_counter() - t0
        sk = report["skipped"]
        log.info("prepared %d tiles from %d slides (%d TSS) in %.1fs", report["tiles"], report["slides"],
                 report["tss"], seconds)
        for name in ("tiles_without_metadata", "metadata_rows_without_tiles", "bad_tiles"):
            if sk[name]:
                log.warning("skipped: %s = %d (listed in %s/prepare_report.json)", name, sk[name], cfg.data.output)
        for name in ("empty_slide_folders", "ignored_files", "slides_without_metadata"):
            if sk[name]:
                log.warning("skipped: %d %s (listed in %s/prepare_report.json)", len(sk[name]), name.replace("_", " "),
                            cfg.data.output)
        mlflow.log_metrics({"tiles": report["tiles"], "slides": report["slides"], "tss": report["tss"],
                            "seconds": seconds, "tiles_per_second": report["tiles"] / max(seconds, 1e-9),
                            **{f"skipped_{k}": (v if isinstance(v, int) else len(v)) for k, v in sk.items()
                               if k != "bad_tile_list"}})
        mlflow.log_dict(report, "prepare_report.json")
    return report
