"""Helpers shared by the test modules (test modules never import each other)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import torch
import yaml

from medi.model import MediDiffusion, Vocabulary, architecture


def train_index(cfg) -> pd.DataFrame:
    """The training split of a tiny world."""
    return pd.read_parquet(Path(cfg.split.output) / "train.parquet")


def save_untrained(cfg, name: str, seed: int = 0) -> MediDiffusion:
    """A randomly initialised model saved like a trained one (sampling does not care how good it is)."""
    torch.manual_seed(seed)
    vocab = Vocabulary.from_frame(train_index(cfg), "class", cfg.variant(name), cfg.model.continuous)
    model = MediDiffusion(architecture(cfg.model.preset, cfg.data.resolution, cfg.model.d_e, cfg.model.custom), vocab)
    model.save(Path(cfg.model.output) / name, {"name": name})
    return model


def write_params(cfg, path: Path) -> Path:
    """`cfg` as a params file the CLI reads back to an equal Config."""
    raw = {f.name: dataclasses.asdict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "source_path"}
    path = Path(path)
    path.write_text(yaml.safe_dump(raw))
    return path


def save_pipeline_model(cfg, name: str = "medi", seed: int = 0) -> MediDiffusion:
    """An untrained model saved where the train stage puts `name`, with the run hash of `cfg` (so a sweep or a
    probe takes it for the pipeline's model instead of training one)."""
    from medi import train

    model = save_untrained(cfg, name, seed)
    model.save(Path(cfg.model.output) / name, {"run_hash": train.run_hash(cfg, name, train_index(cfg))})
    return model


def autocast_spy(monkeypatch) -> list:
    """The CPU autocast dtype (None: off) of every MediDiffusion forward from now on, in call order."""
    seen: list = []
    real_forward = MediDiffusion.forward

    def spy(self, x, t, cond):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real_forward(self, x, t, cond)

    monkeypatch.setattr(MediDiffusion, "forward", spy)
    return seen
