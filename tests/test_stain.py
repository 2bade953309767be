"""The stain pathway (medi.stain): the stains it estimates from rendered tiles, the class that the relative white
and intensity cancel, exact round trips, transfer to another site's stain, a model whose site changes a tile's
stain only, and the colour calibration of each class's H and E."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from medi import data, histology, stain, synthetic
from medi.groundtruth import stain_angle

SITES = 4
CLASSES = ("KIRC", "LUSC")     # clear cells with bright background / solid sheets without any


def render_world(through_pipeline: bool = False):
    """12 rendered 32 px tiles per (class, site): the same 4 true stains sent once by each class, so every stain
    has a KIRC site and a LUSC site (sites named CLASS-k). `through_pipeline`: rendered at 64 px, saved as JPEG at
    the site's quality and decoded to 32 px as `prepare` packs tiles (Lanczos), which lifts the brightest pixels."""
    stains = [histology.sample_site_stain(np.random.default_rng(i)) for i in range(SITES)]
    tiles, rows = [], []
    for ci, c in enumerate(CLASSES):
        for k, st in enumerate(stains):
            for j in range(12):
                rng = np.random.default_rng([ci, k, j])
                tile = histology.render_tile(synthetic.class_morphology(c), histology.jitter_stain(st, rng, 0.1),
                                             rng, size=64 if through_pipeline else 32)
                if through_pipeline:
                    jpeg = io.BytesIO()
                    Image.fromarray(tile).save(jpeg, format="JPEG", quality=st.jpeg_quality)
                    tile = data.decode_tile(jpeg, 32)
                tiles.append(tile)
                rows.append({"idx": len(rows), "class": c, "tss": f"{c}-{k}"})
    index = pd.DataFrame(rows)
    return np.stack(tiles), index, stains, sorted(index["tss"].unique())


@pytest.fixture(scope="module")
def world():
    return render_world()


def to_unit(tiles: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(tiles)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_each_sites_stain_vectors_are_recovered_from_its_training_tiles(world):
    tiles, index, stains, sites = world
    _, fitted = stain.fit(tiles, index, sites)
    for site in sites:
        angles = [stain_angle(fitted[site].vectors[:2], histology.stain_od_matrix(s)) for s in stains]
        assert np.argmin(angles) == int(site[-1]) and angles[int(site[-1])] < 6.0, (site, angles)
        v = fitted[site].vectors
        assert np.allclose(np.linalg.norm(v, axis=1), 1) and abs(np.linalg.det(v)) > 0.1   # an invertible basis


def test_white_and_intensity_are_relative_to_the_class_so_the_same_stain_fits_alike_under_both_classes(world):
    """LUSC tiles have no background, so a raw white level reads LUSC sites as much darker than the KIRC sites of
    the same stain; taken relative to the class's sites the two agree far better (white and H intensity)."""
    tiles, index, _, sites = world
    _, fitted = stain.fit(tiles, index, sites)
    raw = {s: stain.estimate(tiles[index["tss"] == s]) for s in sites}

    def spread(est):
        white = np.mean([np.abs(est[f"KIRC-{k}"].white - est[f"LUSC-{k}"].white).max() for k in range(SITES)])
        h = np.mean([abs(np.log(est[f"KIRC-{k}"].intensity[0] / est[f"LUSC-{k}"].intensity[0])) for k in range(SITES)])
        return white, h

    (raw_white, raw_h), (rel_white, rel_h) = spread(raw), spread(fitted)
    assert raw_white > 40 and rel_white < 0.4 * raw_white, (raw_white, rel_white)
    assert rel_h < 0.7 * raw_h, (raw_h, rel_h)


def test_vectors_are_estimated_against_the_class_relative_white_whose_level_is_the_brightest_class(world):
    """Against its own raw white (too dark: LUSC has no background) a LUSC site's H and E vectors tilt; estimated
    against the class-relative white they come out as close to the true stain as the KIRC site's of the same stain,
    and KIRC, whose background shows the illumination, keeps its own white level and its vectors."""
    tiles, index, stains, sites = world
    _, fitted = stain.fit(tiles, index, sites)
    raw = {s: stain.estimate(tiles[index["tss"] == s]) for s in sites}

    def error(est, cls):
        return np.mean([stain_angle(est[f"{cls}-{k}"].vectors[:2], histology.stain_od_matrix(stains[k]))
                        for k in range(SITES)])

    assert error(fitted, "LUSC") < 0.7 * error(raw, "LUSC"), (error(raw, "LUSC"), error(fitted, "LUSC"))
    assert error(fitted, "LUSC") < 2 * error(raw, "KIRC")
    assert error(fitted, "KIRC") <= error(raw, "KIRC") + 0.5, (error(raw, "KIRC"), error(fitted, "KIRC"))
    kirc_white = np.array([raw[f"KIRC-{k}"].white for k in range(SITES)])
    assert np.allclose(np.median([fitted[f"KIRC-{k}"].white for k in range(SITES)], axis=0),
                       np.median(kirc_white, axis=0))


def test_a_white_level_fitted_to_the_stained_pixels_comes_down_where_jpeg_and_resizing_lift_the_brightest():
    """Through JPEG and the Lanczos resize the background's brightest pixels overshoot the illumination (blue clips
    at 255), so the brightest class's white is too bright. Moved along the stain plane's normal to where each site's
    stained pixels lie on a plane through the origin (`fitted_white_level`, fit's level="fitted"), the level comes
    down towards the true illumination and the H and E vectors estimated against it come closer to the true stains."""
    tiles, index, stains, sites = render_world(through_pipeline=True)
    picked = [tiles[(index["tss"] == s).to_numpy()] for s in sites]
    classes = np.array([s.split("-")[0] for s in sites])
    raw = np.array([stain.raw_white(p) for p in picked])
    relative = stain._relative_to_class(raw, classes)
    start = np.max([np.median(raw[classes == c], axis=0) for c in CLASSES], axis=0)
    level = stain.fitted_white_level(picked, relative, start)
    truth = np.median([st.illumination for st in stains], axis=0)
    assert abs(level[2] - truth[2]) < 0.5 * abs(start[2] - truth[2]), (start, level, truth)

    def angle(common):
        whites = np.minimum(relative * common, 255.0)
        return np.mean([stain_angle(stain.estimate(p, s, w).vectors[:2], histology.stain_od_matrix(stains[int(s[-1])]))
                        for p, s, w in zip(picked, sites, whites)])

    assert angle(level) < angle(start) - 0.5, (angle(start), angle(level))
    (_, brightest), (_, fitted) = stain.fit(tiles, index, sites), stain.fit(tiles, index, sites, level="fitted")
    k = sites.index("KIRC-0")
    assert np.allclose(brightest["KIRC-0"].white, np.minimum(relative[k] * start, 255.0))
    assert np.allclose(fitted["KIRC-0"].white, np.minimum(relative[k] * level, 255.0))


def test_canonical_and_restain_are_inverse_and_the_null_site_is_left_alone(world):
    tiles, index, _, sites = world
    path = stain.StainPathway(len(sites))
    path.fit(tiles, index, sites, seed=0)
    x = to_unit(tiles[:12])
    site = torch.full((12,), 1 + sites.index(index["tss"][0]))
    there = path.canonical(x, site)
    assert (there - x).abs().max() > 0.05                                        # the map does something
    assert torch.allclose(path.restain(there, site), x, atol=1e-3)              # and comes back
    assert torch.allclose(path.restain(x, torch.zeros(12, dtype=torch.long)), x, atol=1e-4)
    assert set(path.estimates) == {"reference", *sites}


def test_restaining_a_sites_tiles_carries_them_to_another_sites_stain(world):
    """KIRC tiles of stain 0, normalised and restained to the (LUSC) site of stain 2: their estimated stain is then
    nearest stain 2 of the four, not stain 0."""
    tiles, index, stains, sites = world
    path = stain.StainPathway(len(sites))
    path.fit(tiles, index, sites, seed=0)
    pick = (index["tss"] == "KIRC-0").to_numpy()
    x = to_unit(tiles[pick])
    src = torch.full((len(x),), 1 + sites.index("KIRC-0"))
    dst = torch.full((len(x),), 1 + sites.index("LUSC-2"))
    moved = ((path.restain(path.canonical(x, src), dst) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    for images, expected in ((tiles[pick], 0), (moved, 2)):
        est = histology.estimate_stain_vectors(images)
        angles = [stain_angle(est, histology.stain_od_matrix(s)) for s in stains]
        assert np.argmin(angles) == expected, angles


def test_a_site_without_training_tiles_or_without_stained_pixels_is_a_clear_error(world):
    from medi.errors import MediError

    tiles, index, _, sites = world
    with pytest.raises(MediError, match="site XX of the model's vocabulary has no training tiles"):
        stain.fit(tiles, index, [*sites, "XX"])
    with pytest.raises(MediError, match="unknown white level 'darkest'; known: brightest, fitted"):
        stain.fit(tiles, index, sites, level="darkest")
    blank = np.full((2, 32, 32, 3), 250, np.uint8)
    with pytest.raises(MediError, match="cannot estimate the stain of site B1 from its 2 training tile"):
        stain.estimate(blank, "B1")


def stain_model(world, pathway: str):
    """A tiny-cpu model of the world's classes and sites with the stain pathway fitted and UNet weights that make
    tiles not grey, and the noise params to sample it with."""
    from medi.config import ModelConfig
    from medi.model import MediDiffusion, Vocabulary, architecture

    tiles, index, _, sites = world
    vocab = Vocabulary.from_frame(index, "class", ["tss"], [])
    torch.manual_seed(0)
    model = MediDiffusion(architecture("tiny-cpu", 16, d_e=16, attributes=1, site_pathway=pathway), vocab).eval()
    model.stain.fit(tiles, index, vocab.categorical["tss"], seed=0)
    with torch.no_grad():
        for p in model.unet.parameters():        # an untrained UNet predicts ~0; weights that make tiles not grey
            p.add_(torch.randn_like(p) * 0.05)
    noise = ModelConfig(preset="tiny-cpu", custom={}, variants={}, continuous=[], d_e=16, embedding_split="d_e",
                        class_dropout=0.1, attribute_dropout=0.1, nested_dropout=False, conditioning="additive",
                        metadata_route="embedding", site_pathway=pathway, prediction_type="v_prediction",
                        beta_schedule="linear", rescale_zero_snr=True, timesteps=1000, output="")
    return model, noise


@pytest.mark.parametrize("pathway", ["stain", "both"])
def test_the_model_of_a_stain_pathway_changes_only_the_stain_with_the_site(world, tmp_path, pathway):
    """With `stain` the UNet never sees the site: one seed and class sampled at two sites gives the same tile under
    the reference stain (restained back, to uint8 rounding). With `both` the site's embedding reaches the UNet too.
    The maps travel with the weights; CLS (no site) gets no pathway."""
    from medi.model import MediDiffusion, Vocabulary, architecture
    from medi.sampling import Sampler, generate

    tiles, index, _, sites = world
    model, noise = stain_model(world, pathway)
    vocab = model.vocab
    a, b = "KIRC-0", "LUSC-3"
    cond = vocab.encode(["KIRC", "KIRC"], {"tss": [a, b]})
    sampler = Sampler(kind="ddim", steps=3, guidance=1.0, metadata_guidance=None, precision="fp32")
    images = generate(model, sampler, noise, cond, [7, 7])
    canonical = model.stain.canonical(to_unit(images), cond["tss"])
    inside = torch.from_numpy(((images > 3) & (images < 252)).all(axis=(0, 3)))     # clamped in neither tile
    assert inside.float().mean() > 0.2
    gap = (canonical[0] - canonical[1]).abs()[:, inside].mean().item() * 127.5
    assert (images[0].astype(int) - images[1]).__abs__().mean() > 3        # the two sites' tiles look different
    if pathway == "stain":
        assert gap < 2.5, gap                      # ... by their stains alone
    else:
        assert gap > 2.5, gap

    model.save(tmp_path)
    back = MediDiffusion.load(tmp_path)
    assert back.arch.site_pathway == pathway and (tmp_path / "stain.json").exists()
    assert torch.equal(back.stain.forward_map, model.stain.forward_map)
    written = json.loads((tmp_path / "stain.json").read_text())      # the estimates beside the weights rebuild the maps
    rebuilt = stain.StainPathway(len(sites))
    rebuilt.set(stain.Stain.from_json(written["reference"]),
                {i: stain.Stain.from_json(written[str(s)]) for i, s in enumerate(vocab.categorical["tss"], 1)})
    assert torch.allclose(rebuilt.forward_map, model.stain.forward_map, atol=1e-4)
    assert torch.allclose(rebuilt.white, model.stain.white, atol=1e-3)
    cls = MediDiffusion(architecture("tiny-cpu", 16, d_e=16, site_pathway=pathway),
                        Vocabulary.from_frame(index, "class", [], []))
    assert cls.stain is None


def test_interp_is_numpys_row_by_row():
    rng = np.random.default_rng(0)
    xp = np.sort(np.round(rng.normal(size=(3, 11)), 1), axis=1)            # rounded: ties, as quantiles have
    fp = np.sort(rng.normal(size=(3, 11)), axis=1)
    v = rng.normal(scale=2, size=(3, 50))                                   # some beyond either end
    got = stain._interp(torch.from_numpy(v), torch.from_numpy(xp), torch.from_numpy(fp)).numpy()
    want = np.stack([np.interp(v[i], xp[i], fp[i]) for i in range(3)])
    ties = np.isin(v, xp)                                                   # numpy picks one side of a tie
    assert np.allclose(got[~ties], want[~ties], atol=1e-12)


def test_the_colour_calibration_maps_a_drifted_class_back_to_its_training_tiles(world):
    """A class's tiles whose hematoxylin came out 20 % weak and eosin 20 % strong (a short-trained generator's
    drift, docs/conditioning.md) are mapped to the class's training tiles' H and E quantiles under the reference
    stain; the residual is untouched, a class without training tiles is left alone."""
    tiles, index, _, sites = world
    path = stain.StainPathway(len(sites), classes=3)
    path.fit(tiles, index, sites, seed=0)
    path.fit_calibration(tiles, index, sites, [*CLASSES, "UCS"], seed=0)    # UCS: no training tiles here
    assert path.targeted.tolist() == [False, True, True, False]
    for k, c in enumerate(CLASSES, 1):
        pick = (index["class"] == c).to_numpy()
        x = path.canonical(to_unit(tiles[pick]), torch.tensor([1 + sites.index(s) for s in index["tss"][pick]]))
        conc = path.concentrations(x)
        assert torch.allclose(path.from_concentrations(conc), x, atol=0.01)
        drifted = path.from_concentrations(conc * torch.tensor([0.8, 1.2, 1.0])[None, :, None, None])
        classes = torch.full((len(x),), k)
        source = path.class_quantiles(drifted, classes)
        fixed = path.calibrate(drifted, classes, source)
        middle = slice(5, -5)                                                # the 5th to 95th percentiles
        assert (source[k] - path.target[k])[:, middle].abs().max() > 0.03
        assert (path.class_quantiles(fixed, classes)[k] - path.target[k])[:, middle].abs().max() < 0.01
        assert torch.allclose(path.concentrations(fixed)[:, 2], path.concentrations(drifted)[:, 2], atol=0.02)
        assert torch.equal(path.calibrate(drifted, torch.full((len(x),), 3), source), drifted)


def test_a_calibrated_model_samples_the_same_bits_twice_and_loads_from_before_the_calibration(world, tmp_path):
    """`sample.colour_calibration` > 0: the model's own tiles per class are drawn once per sampler (kept on the
    pathway) and every tile is calibrated; the same seeds give the same bits; the training tiles' targets travel
    with the weights; a model saved before the calibration existed loads uncalibrated and samples as before."""
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from medi.model import MediDiffusion
    from medi.sampling import Sampler, generate

    tiles, index, _, sites = world
    model, noise = stain_model(world, "stain")
    model.stain.fit_calibration(tiles, index, sites, list(model.vocab.classes), seed=0)
    cond = model.vocab.encode(["KIRC", "LUSC"], {"tss": ["LUSC-1", "KIRC-2"]})
    plain = Sampler(kind="ddim", steps=3, precision="fp32")
    calibrated = replace(plain, calibration=4)
    assert calibrated.settings() == {**plain.settings(), "colour_calibration": 4}
    assert Sampler.from_settings(calibrated.settings()) == calibrated
    assert Sampler.from_settings(calibrated.columns()).calibration == 4                 # a manifest row
    assert Sampler.from_settings({**plain.columns(), "colour_calibration": float("nan")}).calibration == 0   # empty
    first = generate(model, calibrated, noise, cond, [3, 4])
    assert len(model.stain.sources) == 1
    assert np.array_equal(generate(model, calibrated, noise, cond, [3, 4]), first)
    before = generate(model, plain, noise, cond, [3, 4])
    assert np.abs(first.astype(int) - before).mean() > 0.5

    model.save(tmp_path)
    assert torch.equal(MediDiffusion.load(tmp_path).stain.target, model.stain.target)
    state = load_file(str(tmp_path / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k.rsplit(".", 1)[1] not in ("basis", "target", "targeted")},
              str(tmp_path / "model.safetensors"))
    old = MediDiffusion.load(tmp_path).eval()
    assert not old.stain.targeted.any()
    assert np.array_equal(generate(old, calibrated, noise, cond, [3, 4]), before)
