"""The holdout split: the public code's algorithm exactly, a seeded random variant, and zero TSS overlap."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medi import splits
from medi.config import SplitConfig
from medi.errors import MediError


def cfg(mode="paper", frac=0.3, seed=0, keys=("tss", "gender", "race"), validation=0.5, output="unused",
        metrics="unused") -> SplitConfig:
    return SplitConfig(mode=mode, holdout_fraction=frac, key_columns=list(keys), seed=seed, validation_fraction=validation,
                       output=output, metrics=metrics, figure="unused")


def table(rows) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["slide", "class", "tss", "gender", "race"])
    df["meta_row"] = np.arange(len(df))
    return df


HAND = table([
    ("s1", "A", "01", "male", "white"),
    ("s2", "A", "01", "female", "white"),
    ("s3", "A", "02", "male", "white"),
    ("s4", "A", "01", "male", "white"),       # repeats s1's key
    ("s5", "A", "03", "female", "asian"),
    ("s6", "A", "04", "male", "white"),
    ("s7", "B", "10", "male", "white"),
    ("s8", "B", "11", "male", "Unknown"),
    ("s9", "B", "10", "female", "white"),     # holdout key at a training TSS -> TSS 10 moves to holdout
    ("s10", "B", "12", "male", "white"),
])


def test_paper_split_matches_the_public_algorithm_by_hand():
    # A: 5 keys in order of appearance, floor(0.7 * 5) = 3 train (01_m_w, 01_f_w, 02_m_w); B: 4 keys, 2 train.
    result = splits.split_slides(HAND, cfg())
    got = dict(zip(result.slides.slide, result.slides.split))
    assert [s for s, v in got.items() if v == "train"] == ["s1", "s2", "s3", "s4", "s8"]
    assert result.moved_tss == ["10"]
    assert result.slides.set_index("slide").loc["s8", "key"] == "11_male_Unknown"


def test_order_of_first_appearance_not_sorted():
    # Same rows, B's holdout-key slide first in the file: now key 10_female_white trains and 11 is held out.
    reordered = HAND.iloc[[0, 1, 2, 3, 4, 5, 8, 6, 7, 9]].reset_index(drop=True)
    reordered["meta_row"] = np.arange(len(reordered))
    got = splits.split_slides(reordered, cfg()).slides.set_index("slide").split
    assert got["s9"] == "train" and got["s7"] == "train" and got["s8"] == "holdout"


def test_key_aliases_and_missing_values():
    df = HAND.copy()
    df.loc[0, "gender"] = None
    keys = splits.slide_keys(df, ["tissue_source_site", "gender", "race"])
    assert keys[0] == "01_Unknown_white"
    with pytest.raises(MediError, match="unknown column"):
        splits.slide_keys(df, ["hospital"])


def random_world(seed: int, n: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    classes = rng.choice(list("ABCD"), n)
    tss = np.array([f"{c}{rng.integers(0, 12)}" for c in classes])   # TSS exclusive to a class, as in TCGA
    return table(list(zip([f"s{i}" for i in range(n)], classes, tss, rng.choice(["male", "female"], n),
                          rng.choice(["white", "asian", "black", "Unknown"], n))))


@pytest.mark.parametrize("mode", ["paper", "random"])
@pytest.mark.parametrize("seed", range(5))
def test_zero_tss_overlap_and_every_slide_assigned(mode, seed):
    world = random_world(seed)
    s = splits.split_slides(world, cfg(mode=mode, seed=seed)).slides
    assert len(s) == len(world) and set(s.split) == {"train", "holdout"}
    assert not set(s[s.split == "train"].tss) & set(s[s.split == "holdout"].tss)
    for _, grp in s.groupby("class"):        # at least the requested share of keys is held out per class
        n_keys = grp.key.nunique()
        assert grp[grp.split == "holdout"].key.nunique() >= n_keys - np.floor(0.7 * n_keys + 1e-9)


def test_random_mode_is_seeded_and_differs_from_file_order():
    world = random_world(7)
    a = splits.split_slides(world, cfg("random", seed=1)).slides.split.tolist()
    b = splits.split_slides(world, cfg("random", seed=1)).slides.split.tolist()
    c = splits.split_slides(world, cfg("random", seed=2)).slides.split.tolist()
    p = splits.split_slides(world, cfg("paper")).slides.split.tolist()
    assert a == b and a != c and a != p


def test_metrics_follow_the_contract():
    s = splits.split_slides(HAND.assign(tiles=[1, 0, 0, 0, 1, 0, 0, 1, 0, 1]), cfg()).slides
    index = pd.DataFrame({"slide": ["s1", "s1", "s5", "s8", "s10"]})
    m = splits.split_metrics(s, index)
    assert set(m) == {"train_slides", "holdout_slides", "train_tss", "holdout_tss", "tss_overlap",
                      "train_patches", "holdout_patches", "classes", "validation_slides", "validation_tss",
                      "validation_patches", "test_slides", "test_tss", "test_patches", "validation_test_tss_overlap",
                      "slides_without_tiles"}
    assert (m["train_slides"], m["holdout_slides"], m["tss_overlap"]) == (5, 5, 0)
    assert (m["train_tss"], m["holdout_tss"], m["train_patches"], m["holdout_patches"]) == (3, 4, 3, 2)
    # holdout sites: A {03, 04} -> one each side; B {10, 12} -> one each side (which one is seeded)
    assert (m["validation_tss"], m["test_tss"], m["validation_test_tss_overlap"]) == (2, 2, 0)
    assert m["validation_slides"] + m["test_slides"] == 5 and m["slides_without_tiles"] == 6


@pytest.mark.parametrize("seed", range(4))
def test_holdout_sites_divide_into_validation_and_test_sites_per_class(seed):
    world = random_world(seed, n=400)
    s = splits.split_slides(world, cfg(mode="random", seed=seed)).slides
    assert set(s.part) == {"train", "validation", "test"} and (s.part == "train").eq(s.split == "train").all()
    sites = s[s.split == "holdout"].groupby("tss").part.agg(set)
    assert (sites.map(len) == 1).all()                                 # a site is wholly validation or test
    for c, g in s[s.split == "holdout"].groupby("class"):
        n = g.tss.nunique()
        val = g[g.part == "validation"].tss.nunique()
        assert val == min(max(1, int(0.5 * n)), n - 1) and n - val >= 1    # both sides, test the larger half
    again = splits.split_slides(world, cfg(mode="random", seed=seed)).slides
    assert again.part.tolist() == s.part.tolist()                       # deterministic
    other = splits.split_slides(world, cfg(mode="random", seed=seed, validation=0.34)).slides
    assert (other.part == "validation").sum() < (s.part == "validation").sum()


def test_a_class_with_one_holdout_site_gives_it_to_test():
    one = table([("s1", "A", "01", "male", "white"), ("s2", "A", "02", "male", "white"),
                 ("s3", "A", "03", "male", "white")])
    s = splits.split_slides(one, cfg()).slides                        # floor(0.7 * 3) = 2 keys train, 03 holdout
    assert s.set_index("slide").part.to_dict() == {"s1": "train", "s2": "train", "s3": "test"}


def test_the_split_is_made_on_the_metadata_table_not_on_slides_with_tiles(make_cfg, tmp_path):
    """Problem 6: a slide without tiles still holds its key's place in file order; the split is the one the
    full metadata gives (here: LUAD's first key belongs to a slide whose tiles are missing)."""
    import tcga_fixture as tf
    from medi import artifacts, data

    slides = [tf.FixtureSlide("LUAD", "05", "1000", "male", "white", has_folder=False),   # first key, no tiles
              tf.FixtureSlide("LUAD", "38", "1001", "female", "white"),
              tf.FixtureSlide("LUAD", "44", "1002", "male", "asian"),
              tf.FixtureSlide("LUAD", "49", "1003", "female", "white"),
              tf.FixtureSlide("LUSC", "18", "2000"), tf.FixtureSlide("LUSC", "21", "2001"),
              tf.FixtureSlide("UCS", "NA", "3000"), tf.FixtureSlide("UCS", "N5", "3001")]
    tf.build(tmp_path / "data", slides)
    c = make_cfg(data__source="tcga_ut", data__root=str(tmp_path / "data"), data__classes=["LUAD", "LUSC", "UCS"],
                 data__resolution=8, data__workers=1)
    data.prepare(c)
    table_ = artifacts.load_slides(c.data.output)
    assert len(table_) == 8 and table_.set_index("slide").loc["TCGA-05-1000-01Z-00-DX1", "tiles"] == 0
    _, m = splits.write_split(c.split, artifacts.load_index(c.data.output), table_)
    # LUAD keys in file order 05, 38, 44, 49: floor(0.7 * 4) = 2 train (05 and 38), 44 and 49 held out.
    # Split on slides with tiles only, 38, 44, 49 -> floor(2.1) = 2 would train 38 and 44 instead.
    got = pd.read_parquet(tmp_path / "artifacts/splits/slides.parquet").set_index("slide").split
    assert got["TCGA-38-1001-01Z-00-DX1"] == "train" and got["TCGA-44-1002-01Z-00-DX1"] == "holdout"
    assert m["slides_without_tiles"] == 1 and m["train_slides"] + m["holdout_slides"] == 8
    # every count beside the split; the metrics file (dvc metrics show) without the detail-only ones
    assert json.loads((tmp_path / "artifacts/splits/summary.json").read_text()) == m
    assert json.loads(Path(c.split.metrics).read_text()) == {k: v for k, v in m.items() if k not in splits.DETAIL_ONLY}
    train = pd.read_parquet(tmp_path / "artifacts/splits/train.parquet")
    holdout = pd.read_parquet(tmp_path / "artifacts/splits/holdout.parquet")
    assert "38" in set(train.tss) and not {"05", "44", "49"} & set(train.tss)
    assert {"44", "49"} <= set(holdout.tss) and set(holdout.part) <= {"validation", "test"}
    sites = pd.read_csv(tmp_path / "artifacts/splits/sites.csv", dtype=str, keep_default_na=False)
    assert set(sites.tss) == {"05", "38", "44", "49", "18", "21", "NA", "N5"}
    assert sites.set_index("tss").loc["05", "tiles"] == "0"
