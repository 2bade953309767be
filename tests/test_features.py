"""The one feature cache (medi.features): fid and the probe share it for the same network, so the probe encodes
none of the real tiles fid encoded, with the same vectors; weights are keyed by content, not by path."""
from __future__ import annotations

import dataclasses
import logging
import shutil

import numpy as np
import torch

from helpers import save_untrained
from medi import embed, features, fid, probe, sample


def test_after_fid_the_probe_encodes_none_of_its_tiles_and_gets_the_same_vectors(tiny_world, tmp_path, caplog):
    cfg = tiny_world(sample__count=16, fid__unseen_per_pair=0)
    assert cfg.fid.cache != cfg.encoder.cache
    shared = dataclasses.replace(cfg, encoder=dataclasses.replace(cfg.encoder, cache=cfg.fid.cache))
    assert (cfg.fid.extractor, cfg.fid.input_size, cfg.fid.seed) == (cfg.encoder.name, cfg.encoder.input_size,
                                                                     cfg.encoder.seed)
    save_untrained(cfg, "medi")
    sample.run_stage(cfg, "medi")
    fid.evaluate(shared, "medi")                          # what the fid stage computes
    train_index, holdout = probe.load_splits(cfg)
    classes = sorted({c for cs in cfg.probe.tasks.values() for c in cs})
    n_train = int(train_index["class"].isin(classes).sum())
    n_holdout = int((holdout["part"].isin(["validation", "test"]) & holdout["class"].isin(classes)).sum())
    assert n_train > 0 and n_holdout > 0
    spec = embed.spec_of(shared.encoder)
    with caplog.at_level(logging.INFO, logger="medi.features"):
        after_fid = probe.real_embeddings(shared, spec, train_index, holdout, ["validation", "test"])
    # every training tile of the task classes came from fid's features; only the holdout tiles were encoded
    assert (f"features of {n_train + n_holdout} images: {n_train} from the cache, {n_holdout} encoded "
            "(random:resnet18)") in caplog.text
    alone = probe.real_embeddings(cfg, spec, train_index, holdout, ["validation", "test"])   # its own, empty cache
    assert sorted(after_fid) == sorted(alone)
    for idx, vector in alone.items():
        np.testing.assert_array_equal(after_fid[idx], vector)


def test_a_network_is_keyed_by_its_weights_content_not_their_path(tmp_path, caplog):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    save_file(net.state_dict(), str(tmp_path / "a.safetensors"))
    shutil.copy(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    a = embed.resolve("timm:resnet18", str(tmp_path / "a.safetensors"), 32)
    b = embed.resolve("timm:resnet18", str(tmp_path / "b.safetensors"), 32)
    assert a.identity() == b.identity() and "sha256:" in a.identity() and "a.safetensors" not in a.identity()
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    first = embed.embed(images, a, str(tmp_path / "cache"), progress=False)
    with caplog.at_level(logging.INFO, logger="medi.features"):
        again = embed.embed(images, b, str(tmp_path / "cache"), progress=False)
    assert "features of 3 images: 3 from the cache, 0 encoded (timm:resnet18)" in caplog.text
    np.testing.assert_array_equal(first, again)
    torch.manual_seed(1)
    save_file(timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict(), str(tmp_path / "b.safetensors"))
    assert embed.resolve("timm:resnet18", str(tmp_path / "b.safetensors"), 32).identity() != a.identity()
    assert features.image_keys(images[:1]) != features.image_keys(images[:1].transpose(0, 2, 1, 3).copy())
