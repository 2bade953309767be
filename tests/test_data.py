"""The real-data path (`medi prepare`) on fixtures laid out exactly like TCGA-UT + a GDC export."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import tcga_fixture as tf
from medi import artifacts, data
from medi.errors import MediError


@pytest.fixture
def real_cfg(make_cfg, tmp_path):
    def build(**overrides):
        base = {"data__source": "tcga_ut", "data__root": str(tmp_path / "data"), "data__classes": ["LUAD", "LUSC", "UCS"],
                "data__resolution": 8, "data__workers": 1}
        return make_cfg(**{**base, **overrides})
    return build


def test_prepare_packs_every_tile_with_its_metadata(real_cfg, tmp_path):
    fx = tf.build(tmp_path / "data")
    cfg = real_cfg()
    report = data.prepare(cfg)
    index, tiles = artifacts.load_index(cfg.data.output), artifacts.load_tiles(cfg.data.output)
    n = sum(s.tiles for s in fx.slides)
    assert report["tiles"] == len(index) == n and tiles.shape == (n, 8, 8, 3) and tiles.dtype == np.uint8
    assert isinstance(tiles, np.memmap)
    assert (index.idx.to_numpy() == np.arange(n)).all()
    # 'NA' stays a TSS code; `'--` becomes Unknown / NaN, never the literal marker.
    assert set(index.tss) == {"05", "44", "18", "NA", "N5"}
    row = index[index.slide == "TCGA-05-4245-01Z-00-DX1"].iloc[0]
    assert row.race == "Unknown" and np.isnan(row.age) and row.gender == "female"
    assert index[index.slide == "TCGA-NA-A4QV-01Z-00-DX1"]["class"].eq("UCS").all()
    # Rows follow the metadata file (the paper's split depends on that order).
    assert index.drop_duplicates("slide").slide.tolist() == [s.barcode for s in fx.slides]
    # The packed pixels are the tile resized, for an arbitrary row.
    r = index.iloc[5]
    expected = np.asarray(Image.open(fx.tiles_root / r.path).resize((8, 8), Image.Resampling.LANCZOS))
    assert np.array_equal(tiles[r.idx], expected)
    assert report["skipped"]["tiles_without_metadata"] == 0 and report["skipped"]["bad_tiles"] == 0
    slides = artifacts.load_slides(cfg.data.output)
    assert slides.tiles.sum() == n and slides.meta_row.is_monotonic_increasing


def test_the_32_classes_are_built_in_and_coad_and_read_share_their_folder(real_cfg, tmp_path):
    """TCGA-UT's folders: 32 projects, COAD and READ merged in one folder; each slide there keeps its project."""
    from medi import config

    assert len(config.TCGA_UT_FOLDERS) == 32 and len(set(config.TCGA_UT_FOLDERS.values())) == 31
    slides = [tf.FixtureSlide("COAD", "AA", "3514"), tf.FixtureSlide("READ", "AG", "3580", tiles=2),
              tf.FixtureSlide("LUAD", "05", "4244")]
    tf.build(tmp_path / "data", slides)
    data.prepare(real_cfg(data__classes=["COAD", "READ", "LUAD"]))
    index = artifacts.load_index(str(tmp_path / "artifacts/dataset"))
    assert sorted(map(tuple, index.groupby("class")["slide"].agg(["first", "size"]).reset_index().values.tolist())) == [
        ("COAD", "TCGA-AA-3514-01Z-00-DX1", 3), ("LUAD", "TCGA-05-4244-01Z-00-DX1", 3),
        ("READ", "TCGA-AG-3580-01Z-00-DX1", 2)]


def test_orphans_are_counted_not_dropped_silently(real_cfg, tmp_path):
    slides = tf.DEFAULT_SLIDES + [
        tf.FixtureSlide("LUAD", "05", "9999", in_metadata=False, tiles=2),   # tiles, no metadata row
        tf.FixtureSlide("LUSC", "18", "8888", has_folder=False),             # metadata row, no tiles
        tf.FixtureSlide("LUSC", "18", "7777", tiles=0),                      # empty slide folder
    ]
    fx = tf.build(tmp_path / "data", slides)
    (fx.tiles_root / "Lung_adenocarcinoma/0/TCGA-05-4244-01Z-00-DX1/notes.txt").write_text("x")
    report = data.prepare(real_cfg())
    sk = report["skipped"]
    assert sk["tiles_without_metadata"] == 2 and sk["slides_without_metadata"] == ["TCGA-05-9999-01Z-00-DX1"]
    assert sk["metadata_rows_without_tiles"] == 2
    assert set(sk["slides_without_tiles"]) == {"TCGA-18-8888-01Z-00-DX1", "TCGA-18-7777-01Z-00-DX1"}
    assert sk["empty_slide_folders"] == ["TCGA-18-7777-01Z-00-DX1"]
    assert sk["ignored_files"] == ["Lung_adenocarcinoma/0/TCGA-05-4244-01Z-00-DX1/notes.txt"]
    assert report["tiles"] == sum(s.tiles for s in tf.DEFAULT_SLIDES)
    on_disk = json.loads((tmp_path / "artifacts/dataset/prepare_report.json").read_text())
    assert on_disk["skipped"]["tiles_without_metadata"] == 2


def test_corrupt_tile_stops_with_its_path_or_is_skipped_and_counted(real_cfg, tmp_path):
    fx = tf.build(tmp_path / "data")
    bad = tf.tile_path(fx, fx.slides[3], 1)
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(MediError, match=r"TCGA-18-3406-01Z-00-DX1/0_1_2.jpg: bad tile: cannot decode"):
        data.prepare(real_cfg())
    report = data.prepare(real_cfg(data__on_bad_tile="skip"))
    assert report["skipped"]["bad_tiles"] == 1
    assert report["skipped"]["bad_tile_list"][0]["path"].endswith("TCGA-18-3406-01Z-00-DX1/0_1_2.jpg")
    index = artifacts.load_index(tmp_path / "artifacts/dataset")
    assert len(index) == sum(s.tiles for s in fx.slides) - 1 == len(artifacts.load_tiles(tmp_path / "artifacts/dataset"))
    assert not index.path.str.endswith("TCGA-18-3406-01Z-00-DX1/0_1_2.jpg").any()
    assert (index.idx.to_numpy() == np.arange(len(index))).all()


def test_non_rgb_tile_is_an_error_naming_the_file(real_cfg, tmp_path):
    fx = tf.build(tmp_path / "data")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tf.tile_path(fx, fx.slides[0]))
    with pytest.raises(MediError, match=r"TCGA-05-4244-01Z-00-DX1/0_0_1.jpg: bad tile: expected an RGB image, got mode L"):
        data.prepare(real_cfg())


def test_missing_column_names_file_and_column(real_cfg, tmp_path):
    tf.build(tmp_path / "data", columns=[c for c in tf.GDC_COLUMNS if c != "race"])
    with pytest.raises(MediError, match=r"gdc_metadata.csv: missing required column\(s\) \['race'\]"):
        data.prepare(real_cfg())


def test_folder_that_is_not_a_barcode_is_an_error(real_cfg, tmp_path):
    fx = tf.build(tmp_path / "data")
    (fx.tiles_root / "Lung_adenocarcinoma/0/slide_17").mkdir()
    with pytest.raises(MediError, match=r"slide_17: folder name 'slide_17' is not a TCGA slide barcode"):
        data.prepare(real_cfg())


def test_malformed_metadata_rows_name_row_and_field(tmp_path):
    fx = tf.build(tmp_path / "data")
    df = pd.read_csv(fx.csv, dtype=str, keep_default_na=False)
    df.loc[2, "age_at_index"] = "sixty"
    df.to_csv(fx.csv, index=False)
    with pytest.raises(MediError, match=r"row 3 \(line 4\), field 'age_at_index': expected a number"):
        data.read_metadata(fx.csv)
    df.loc[2, "age_at_index"] = "61"
    df.loc[4, "slide_submitter_id"] = df.loc[3, "slide_submitter_id"]
    df.to_csv(fx.csv, index=False)
    with pytest.raises(MediError, match=r"TCGA-18-3406-01Z-00-DX1' appears in rows \[4, 5\]"):
        data.read_metadata(fx.csv)


def test_project_and_folder_disagree(real_cfg, tmp_path):
    fx = tf.build(tmp_path / "data")
    df = pd.read_csv(fx.csv, dtype=str, keep_default_na=False)
    df.loc[0, "project_id"] = "TCGA-LUSC"
    df.to_csv(fx.csv, index=False)
    with pytest.raises(MediError, match=r"row 1: slide TCGA-05-4244-01Z-00-DX1 is in project TCGA-LUSC"):
        data.prepare(real_cfg())


def test_missing_data_names_the_fetch_command(real_cfg, tmp_path):
    with pytest.raises(MediError, match=r"make tcga-ut"):
        data.prepare(real_cfg(data__root=str(tmp_path / "nowhere")))


def test_missing_class_folder_lists_what_is_there(real_cfg, tmp_path):
    tf.build(tmp_path / "data")
    with pytest.raises(MediError, match=r"class KIRC: expected the folder .*Kidney_renal_clear_cell_carcinoma/0"):
        data.prepare(real_cfg(data__classes=["LUAD", "KIRC"]))


def test_packing_resumes_after_a_crash(real_cfg, tmp_path, monkeypatch):
    slides = [tf.FixtureSlide("LUAD", "05", f"{1000 + i}", tiles=20) for i in range(20)] + \
             [tf.FixtureSlide("LUSC", "18", f"{2000 + i}", tiles=20) for i in range(20)]
    tf.build(tmp_path / "data", slides)
    cfg = real_cfg(data__classes=["LUAD", "LUSC"])
    reference = data.prepare(cfg)
    expected = np.array(artifacts.load_tiles(cfg.data.output))
    seen = []
    real_decode = data._decode_chunk

    def crash_on_third_chunk(args):
        seen.append(len(seen))
        if len(seen) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_decode(args)

    monkeypatch.setattr(data, "_decode_chunk", crash_on_third_chunk)
    import shutil
    shutil.rmtree(cfg.data.output)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(cfg)
    state = json.loads((tmp_path / "artifacts/dataset.partial/state.json").read_text())
    assert state["done"] == 2 * data.CHUNK
    assert not (tmp_path / "artifacts/dataset").exists()      # nothing half-written where readers look
    calls_before = len(seen)
    assert data.prepare(cfg) == reference
    assert len(seen) - calls_before == -(-(800 - 2 * data.CHUNK) // data.CHUNK)  # only the remaining chunks
    assert np.array_equal(np.array(artifacts.load_tiles(cfg.data.output)), expected)


def test_packing_starts_again_when_a_tile_or_the_resolution_changed(real_cfg, tmp_path, monkeypatch, caplog):
    """A half-packed dataset is resumed only for the same tiles at the same resolution."""
    fx = tf.build(tmp_path / "data", [tf.FixtureSlide("LUAD", "05", f"{1000 + i}", tiles=20) for i in range(8)] +
                  [tf.FixtureSlide("LUSC", "18", f"{2000 + i}", tiles=20) for i in range(7)])      # 300 tiles: 2 chunks
    cfg = real_cfg(data__classes=["LUAD", "LUSC"])
    calls = []
    real_decode = data._decode_chunk

    def crash_on_second_chunk(args):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return real_decode(args)

    def crashed_after_one_chunk(c):
        calls.clear()
        with monkeypatch.context() as m:
            m.setattr(data, "_decode_chunk", crash_on_second_chunk)
            with pytest.raises(KeyboardInterrupt):
                data.prepare(c)
        assert json.loads((tmp_path / "artifacts/dataset.partial/state.json").read_text())["done"] == data.CHUNK

    def prepare_counting(c):
        calls.clear()
        caplog.clear()
        with monkeypatch.context() as m, caplog.at_level("INFO", logger="medi.data"):
            m.setattr(data, "_decode_chunk", lambda args: calls.append(args[2]) or real_decode(args))
            data.prepare(c)
        return artifacts.load_index(c.data.output), np.array(artifacts.load_tiles(c.data.output))

    crashed_after_one_chunk(cfg)
    changed = tf.tile_path(fx, fx.slides[0], 0)                      # a tile of the chunk already packed
    Image.fromarray(np.full((16, 16, 3), (200, 30, 90), np.uint8)).save(changed, quality=95)
    index, tiles = prepare_counting(cfg)
    assert calls == [8, 8] and "resuming prepare" not in caplog.text   # both chunks decoded again
    row = int(index[index.path == str(changed.relative_to(fx.tiles_root))]["idx"].iloc[0])
    assert np.array_equal(tiles[row], data.decode_tile(changed, 8))

    crashed_after_one_chunk(cfg)
    index16, tiles16 = prepare_counting(real_cfg(data__classes=["LUAD", "LUSC"], data__resolution=16))
    assert calls == [16, 16] and "resuming prepare" not in caplog.text and tiles16.shape == (300, 16, 16, 3)
    assert np.array_equal(tiles16[row], data.decode_tile(changed, 16))

    crashed_after_one_chunk(cfg)                                      # nothing changed: only the second chunk is left
    assert prepare_counting(cfg)[0].equals(index) and calls == [8] and "resuming prepare at tile 256 of 300" in caplog.text
