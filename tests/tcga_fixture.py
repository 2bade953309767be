"""Build small datasets laid out exactly like TCGA-UT + a GDC metadata export, for tests."""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

GDC_COLUMNS = [
    "project_id", "case_submitter_id", "sample_submitter_id", "slide_submitter_id", "tissue_source_site",
    "sample_type", "is_ffpe", "preservation_method", "age_at_index", "days_to_birth", "ethnicity", "gender",
    "race", "vital_status", "primary_diagnosis", "site_of_resection_or_biopsy",
]
FOLDERS = {"LUAD": "Lung_adenocarcinoma", "LUSC": "Lung_squamous_cell_carcinoma", "UCS": "Uterine_Carcinosarcoma",
           "COAD": "Colon_Rectum_adenocarcinoma", "READ": "Colon_Rectum_adenocarcinoma"}   # one folder, two projects


@dataclass
class FixtureSlide:
    cls: str
    tss: str
    participant: str
    gender: str = "female"
    race: str = "white"
    age: str = "60"
    tiles: int = 3
    in_metadata: bool = True
    has_folder: bool = True

    @property
    def barcode(self) -> str:
        return f"TCGA-{self.tss}-{self.participant}-01Z-00-DX1"


@dataclass
class Fixture:
    root: Path                      # the data root: tcga-ut/ + gdc_metadata.csv
    slides: list[FixtureSlide]
    colors: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def tiles_root(self) -> Path:
        return self.root / "tcga-ut"

    @property
    def csv(self) -> Path:
        return self.root / "gdc_metadata.csv"


DEFAULT_SLIDES = [
    FixtureSlide("LUAD", "05", "4244", "male", "white", "70"),
    FixtureSlide("LUAD", "05", "4245", "female", "'--", "'--"),
    FixtureSlide("LUAD", "44", "2655", "female", "asian", "61", tiles=2),
    FixtureSlide("LUSC", "18", "3406", "male", "black or african american", "66"),
    FixtureSlide("LUSC", "18", "3407", "male", "not reported", "72", tiles=1),
    FixtureSlide("UCS", "NA", "A4QV", "female", "white", "68"),     # 'NA' is a real TSS code
    FixtureSlide("UCS", "N5", "A4RA", "female", "asian", "59", tiles=2),
]


def build(root: Path, slides: list[FixtureSlide] | None = None, size: int = 16, quality: int = 90,
          columns: list[str] | None = None) -> Fixture:
    """Write tiles (<tiles_root>/<Folder>/0/<barcode>/0_x_y.jpg) and a GDC-style CSV with `'--` markers."""
    slides = DEFAULT_SLIDES if slides is None else slides
    fx = Fixture(root, slides)
    rng = np.random.default_rng(0)
    rows = []
    for s in slides:
        if s.has_folder:
            folder = fx.tiles_root / FOLDERS[s.cls] / "0" / s.barcode
            folder.mkdir(parents=True, exist_ok=True)
            for t in range(s.tiles):
                px = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(px).save(folder / f"0_{t}_{t + 1}.jpg", quality=quality)
        if s.in_metadata:
            case = s.barcode[:12]
            rows.append({
                "project_id": f"TCGA-{s.cls}", "case_submitter_id": case, "sample_submitter_id": f"{case}-01A",
                "slide_submitter_id": s.barcode, "tissue_source_site": "Some Hospital", "sample_type": "Primary Tumor",
                "is_ffpe": "true", "preservation_method": "FFPE", "age_at_index": s.age,
                "days_to_birth": "'--" if s.age == "'--" else str(-int(s.age) * 365), "ethnicity": "'--",
                "gender": s.gender, "race": s.race, "vital_status": "Alive", "primary_diagnosis": "'--",
                "site_of_resection_or_biopsy": "'--",
            })
    columns = columns or GDC_COLUMNS
    root.mkdir(parents=True, exist_ok=True)
    with open(fx.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return fx


def tile_path(fx: Fixture, slide: FixtureSlide, t: int = 0) -> Path:
    return fx.tiles_root / FOLDERS[slide.cls] / "0" / slide.barcode / f"0_{t}_{t + 1}.jpg"
