"""The holdout split: the public code's algorithm exactly, a seeded random variant, and zero TSS overlap."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medi import splits
from medi.config import SplitConfig
from medi.errors import MediError


def cfg(mode="paper", frac=0.3, seed=0, keys=("tss", "gender", "race")) -> SplitConfig:
    return SplitConfig(mode=mode, holdout_fraction=frac, key_columns=list(keys), seed=seed,
                       output="unused", metrics="unused", figure="unused")


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
    s = splits.split_slides(HAND, cfg()).slides
    index = pd.DataFrame({"slide": ["s1", "s1", "s5", "s8", "s10"]})
    m = splits.split_metrics(s, index)
    assert set(m) == {"train_slides", "holdout_slides", "train_tss", "holdout_tss", "tss_overlap",
                      "train_patches", "holdout_patches", "classes"}
    assert (m["train_slides"], m["holdout_slides"], m["tss_overlap"]) == (5, 5, 0)
    assert (m["train_tss"], m["holdout_tss"], m["train_patches"], m["holdout_patches"]) == (3, 4, 3, 2)
