"""The conditioned UNet: conditioning arithmetic, null tokens, and the vocabulary saved with the weights."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medi.errors import MediError
from medi.model import MediDiffusion, Vocabulary, architecture, drop_conditions, null_condition

FRAME = pd.DataFrame({"class": ["LUAD", "LUSC", "LUAD", "KIRC"], "tss": ["05", "18", "44", "NA"],
                      "race": ["white", "asian", "white", "Unknown"], "age": [61.0, np.nan, 70.0, 55.0]})


def test_conditioning_is_concatenated_to_the_timestep_size_and_added():
    vocab = Vocabulary.from_frame(FRAME, "class", ["tissue_source_site", "race", "age"], ["age"])
    model = MediDiffusion(architecture("tiny-cpu", 16, d_e=16), vocab)
    enc = model.encoder
    assert enc.d_t == 128 and enc.d_class == 128 - 3 * 16
    cond = vocab.encode(["LUAD", "KIRC"], {"tss": ["05", "NA"], "race": ["white", None], "age": [61, None]})
    z = enc(cond)
    assert z.shape == (2, 128)
    assert torch.equal(z[0, :enc.d_class], enc.class_embedding.weight[vocab.classes.index("LUAD") + 1])
    assert torch.equal(z[1, 80:96], enc.categorical["tss"].weight[vocab.categorical["tss"].index("NA") + 1])
    assert torch.equal(z[1, 96:112], enc.categorical["race"].weight[0])         # race unknown -> null token
    assert torch.equal(z[1, 112:], enc.continuous["age"].null)                 # missing age -> learned null
    # CLS: same UNet, no attributes, the whole d_t is the class embedding.
    cls = MediDiffusion(architecture("tiny-cpu", 16, d_e=16), Vocabulary.from_frame(FRAME, "class", [], []))
    assert cls.encoder.d_class == 128
    assert sum(p.numel() for p in cls.unet.parameters()) == sum(p.numel() for p in model.unet.parameters())
    # The vector reaches the UNet: a different site changes the output.
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 10])
    other = {**cond, "tss": torch.tensor([2, 2])}
    assert not torch.allclose(model(x, t, cond), model(x, t, other))


def test_presets():
    assert architecture("paper-128", 128, 32).block_out_channels == [128, 256, 512, 512, 1024, 1024]
    with pytest.raises(MediError, match="resolution divisible by 32"):
        architecture("paper-128", 48, 32)
    with pytest.raises(MediError, match="unknown preset"):
        architecture("huge", 32, 32)
    with pytest.raises(MediError, match="leaves d_class"):
        MediDiffusion(architecture("tiny-cpu", 16, d_e=64), Vocabulary.from_frame(FRAME, "class", ["tss", "race"], []))


def test_unknown_value_lists_the_known_ones():
    vocab = Vocabulary.from_frame(FRAME, "class", ["tss"], [])
    with pytest.raises(MediError, match=r"unknown value of 'tss' '99' for this model; known values: \['05', '18', '44', 'NA'\]"):
        vocab.encode(["LUAD"], {"tss": ["99"]})
    with pytest.raises(MediError, match=r"unknown class 'BRCA'"):
        vocab.encode(["BRCA"])
    with pytest.raises(MediError, match=r"not conditioned on \['race'\]"):
        vocab.encode(["LUAD"], {"race": ["white"]})


def test_saved_vocabulary_is_looked_up_by_value_never_rebuilt(tmp_path):
    """The paper's code rebuilt the site mapping in another order at sampling time. Here the trained row of
    each site is found by the site's value after a save/load, whatever order a new frame would give."""
    vocab = Vocabulary.from_frame(FRAME, "class", ["tss"], [])
    model = MediDiffusion(architecture("tiny-cpu", 16, d_e=16), vocab)
    table = model.encoder.categorical["tss"].weight
    with torch.no_grad():   # a recognisable vector per site: row of site s is filled with float(index of s)
        for i, site in enumerate(vocab.categorical["tss"]):
            table[i + 1] = float(int(site) if site.isdigit() else 77)
    model.save(tmp_path / "m")
    # A frame with the sites in another order and one site missing would build another mapping...
    rebuilt = Vocabulary.from_frame(FRAME.iloc[[3, 1]], "class", ["tss"], [])
    assert rebuilt.encode(["KIRC"], {"tss": ["NA"]})["tss"].item() != vocab.encode(["KIRC"], {"tss": ["NA"]})["tss"].item()
    # ...but the loaded model carries its own vocabulary, so every site gets its own trained row.
    loaded = MediDiffusion.load(tmp_path / "m")
    for site, expected in [("05", 5.0), ("18", 18.0), ("44", 44.0), ("NA", 77.0)]:
        idx = loaded.vocab.encode(["LUAD"], {"tss": [site]})["tss"]
        assert torch.all(loaded.encoder.categorical["tss"](idx) == expected)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_condition_dropout_and_null_condition():
    vocab = Vocabulary.from_frame(FRAME, "class", ["tss", "age"], ["age"])
    cond = vocab.encode(["LUAD"] * 2000, {"tss": ["05"] * 2000, "age": [60] * 2000})
    g = torch.Generator().manual_seed(0)
    dropped = drop_conditions(cond, 0.1, 0.5, generator=g)
    assert abs((dropped["class"] == 0).float().mean() - 0.1) < 0.03
    assert abs((dropped["tss"] == 0).float().mean() - 0.5) < 0.05 and abs(dropped["age"].isnan().float().mean() - 0.5) < 0.05
    null = null_condition(cond)
    assert (null["class"] == 0).all() and (null["tss"] == 0).all() and null["age"].isnan().all()


def test_load_refuses_incomplete_folder(tmp_path):
    with pytest.raises(MediError, match="missing model.safetensors"):
        MediDiffusion.load(tmp_path)


def test_nested_dropout_drops_the_attributes_with_the_class_and_nothing_else():
    vocab = Vocabulary.from_frame(FRAME, "class", ["tss", "age"], ["age"])
    cond = vocab.encode(["LUAD"] * 500, {"tss": ["05"] * 500, "age": [60] * 500})
    plain = drop_conditions(cond, 0.3, 0.2, generator=torch.Generator().manual_seed(0))
    nested = drop_conditions(cond, 0.3, 0.2, generator=torch.Generator().manual_seed(0), nested=True)
    no_class = plain["class"] == 0
    assert torch.equal(nested["class"], plain["class"]) and 100 < int(no_class.sum()) < 200
    assert (nested["tss"][no_class] == 0).all() and nested["age"][no_class].isnan().all()
    assert torch.equal(nested["tss"][~no_class], plain["tss"][~no_class])          # the same draws elsewhere
    assert torch.equal(nested["age"][~no_class].isnan(), plain["age"][~no_class].isnan())
    assert (plain["tss"][no_class] != 0).any()                     # without `nested` a site stays without its class


def test_default_mechanism_builds_the_papers_network_parameter_for_parameter():
    """The default (additive, metadata with the class) is the network built before the mechanisms existed:
    the same UNet arguments and modules, drawing the same initial weights from the same seed."""
    from diffusers import UNet2DModel

    from medi.model import ConditionEncoder

    vocab = Vocabulary.from_frame(FRAME, "class", ["tss"], [])
    arch = architecture("tiny-cpu", 16, d_e=16)
    assert (arch.conditioning, arch.metadata_route) == ("additive", "embedding")
    torch.manual_seed(3)
    model = MediDiffusion(arch, vocab)
    torch.manual_seed(3)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=tuple(arch.block_out_channels),
                       layers_per_block=arch.layers_per_block, down_block_types=tuple(model.unet.config.down_block_types),
                       up_block_types=tuple(model.unet.config.up_block_types), add_attention=arch.attention,
                       norm_num_groups=arch.norm_num_groups, class_embed_type="identity")
    encoder = ConditionEncoder(vocab, arch.d_t, arch.d_e)
    old = {**{f"unet.{k}": v for k, v in unet.state_dict().items()}, **{f"encoder.{k}": v for k, v in encoder.state_dict().items()}}
    new = model.state_dict()
    assert list(new) == list(old) and all(torch.equal(new[k], old[k]) for k in old)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    cond = vocab.encode(["LUAD", "KIRC"], {"tss": ["05", "44"]})
    assert torch.equal(model(x, t, cond), unet(x, t, class_labels=encoder(cond)).sample)


@pytest.mark.parametrize("conditioning, route", [("scale_shift", "embedding"), ("additive", "output"),
                                                 ("scale_shift", "output")])
def test_other_mechanisms_reach_the_network_and_survive_save_and_load(tmp_path, conditioning, route):
    vocab = Vocabulary.from_frame(FRAME, "class", ["tss"], [])
    arch = architecture("tiny-cpu", 16, d_e=16, conditioning=conditioning, metadata_route=route)
    torch.manual_seed(0)
    model = MediDiffusion(arch, vocab)
    block = model.unet.down_blocks[0].resnets[0]
    channels = block.conv1.out_channels
    # scale_shift: each block's projection gives a scale and a shift (2 x channels), additive a shift only
    assert block.time_emb_proj.out_features == (2 if conditioning == "scale_shift" else 1) * channels
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 10])
    cond = vocab.encode(["LUAD", "LUAD"], {"tss": ["05", "05"]})
    other = {**cond, "tss": torch.tensor([2, 2])}
    if route == "output":
        assert model.encoder.d_class == arch.d_t              # the class alone fills the time embedding's width
        assert torch.equal(model(x, t, cond), model(x, t, other))     # the output modulation starts as the identity
        torch.nn.init.normal_(model.modulation.out.weight, std=0.1)
    assert not torch.allclose(model(x, t, cond), model(x, t, other))      # the site reaches the output
    model.save(tmp_path / "m")
    back = MediDiffusion.load(tmp_path / "m")
    assert (back.arch.conditioning, back.arch.metadata_route) == (conditioning, route)
    assert torch.equal(back(x, t, cond), model(x, t, cond))
    cls = MediDiffusion(arch, Vocabulary.from_frame(FRAME, "class", [], []))        # no attributes: no output route
    assert cls.modulation is None and cls.encoder.d_class == arch.d_t


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_upsampling_is_the_stock_module_bit_for_bit(dtype):
    """The UNet's upsamplers double in channels-last memory (faster on CPUs); outputs and gradients are the stock
    diffusers module's exactly, in fp32 and bf16."""
    from diffusers.models.upsampling import Upsample2D
    from medi.model import ChannelsLastUpsample2D

    model = MediDiffusion(architecture("tiny-cpu", 16, d_e=16), Vocabulary.from_frame(FRAME, "class", ["tss"], []))
    swapped = [u for b in model.unet.up_blocks for u in (b.upsamplers or [])]
    assert swapped and all(type(u) is ChannelsLastUpsample2D for u in swapped)
    torch.manual_seed(0)
    x = torch.randn(3, 64, 8, 8, dtype=dtype, requires_grad=True)
    outputs, grads = [], []
    for cls in (ChannelsLastUpsample2D, Upsample2D):
        swapped[0].__class__ = cls
        swapped[0].zero_grad()
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = swapped[0](x)
        y.float().pow(2).sum().backward()
        outputs.append(y.detach())
        grads.append((x.grad.clone(), swapped[0].conv.weight.grad.clone()))
    assert outputs[0].shape == (3, 64, 16, 16) and outputs[0].is_contiguous()
    assert torch.equal(outputs[0], outputs[1])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
