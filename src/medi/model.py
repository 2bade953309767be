"""The metadata-conditioned diffusion UNet (the paper's Section 3.1) on the stock diffusers `UNet2DModel`.

Conditioning: a class embedding (d_class) and one embedding (d_e) per metadata attribute, concatenated to a
vector of the timestep-embedding size d_t = d_class + k * d_e and *added* to the timestep embedding. The
UNet is built with `class_embed_type="identity"`, so diffusers adds whatever vector we pass as
`class_labels`; the embeddings live in `ConditionEncoder` and train jointly with the UNet. CLS is the same
code with k = 0 (d_class = d_t), so both models have the same UNet.

Two choices change how the condition reaches the network (params `model.conditioning`, `model.metadata_route`;
docs/conditioning.md measures them):
- `conditioning`: `additive` (the paper's: each ResNet block adds a projection of time + condition to its
  features) or `scale_shift` (diffusers' `resnet_time_scale_shift="scale_shift"`: the projection scales and
  shifts each block's normalised features, feature-wise modulation);
- `metadata_route`: `embedding` (the paper's: the attributes travel in the vector above) or `output` (the class
  alone fills d_t; the attributes, with the time, scale and shift the UNet's output normalisation only, a
  per-channel transform just before the last convolution, so a site can change the look of a tile more
  easily than its structure);
- `site_pathway`: `embedding` (the paper's: the site is an attribute like the others), `stain` (the site reaches
  the tile only as its estimated H&E stain: the UNet learns every tile under one reference stain and never sees
  the site; each generated tile is re-stained to its site's, `medi.stain`) or `both` (the stain, and the site's
  embedding as well).

Categorical attributes (tss, race, gender) use a learnable table; continuous ones (age) a sinusoidal
encoding of the value to d_e followed by a linear map. Index 0 of every table, and a learned vector for
continuous attributes, is the null token used by condition dropout and classifier-free guidance.

The `Vocabulary` (value -> index, per attribute) is saved beside the weights and looked up by value at
sampling time, never rebuilt: an unknown value is an error that lists the known ones.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.models.upsampling import Upsample2D
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from medi.config import MIN_D_CLASS, UNET_PRESETS, ModelConfig, time_embedding_width
from medi.errors import MediError
from medi.io import atomic_path, write_json
from medi.stain import PATHWAYS, StainPathway

NULL = "<null>"
SITE = "tss"
ATTRIBUTE_ALIASES = {"tissue_source_site": "tss", "TSS": "tss", "age_at_index": "age"}

def canonical(name: str) -> str:
    return ATTRIBUTE_ALIASES.get(name, name)


# --------------------------------------------------------------------------------------------- vocabulary
@dataclass
class Vocabulary:
    """Class and categorical-attribute values -> embedding indices (0 is the null token of each)."""
    classes: list[str]
    categorical: dict[str, list[str]]      # attribute -> values, index = position + 1
    continuous: list[str]                   # attribute names encoded sinusoidally

    @classmethod
    def from_frame(cls, frame, class_column: str, attributes: Sequence[str], continuous: Sequence[str]) -> "Vocabulary":
        attributes = [canonical(a) for a in attributes]
        missing = [a for a in [class_column, *attributes] if a not in frame.columns]
        if missing:
            raise MediError(f"conditioning attribute(s) {missing} are not columns of the index; it has {list(frame.columns)}")
        cont = [a for a in attributes if a in {canonical(c) for c in continuous}]
        cat = {a: sorted(map(str, frame[a].unique())) for a in attributes if a not in cont}
        return cls(sorted(map(str, frame[class_column].unique())), cat, cont)

    @property
    def attributes(self) -> list[str]:
        return [*self.categorical, *self.continuous]

    def _lookup(self, values: Sequence, known: list[str], what: str) -> torch.Tensor:
        table = {v: i + 1 for i, v in enumerate(known)}
        out = []
        for v in values:
            if v is None or v == NULL:
                out.append(0)
                continue
            if str(v) not in table:
                raise MediError(f"unknown {what} {v!r} for this model; known values: {known}")
            out.append(table[str(v)])
        return torch.tensor(out, dtype=torch.long)

    def encode(self, classes: Sequence, attributes: Mapping[str, Sequence] | None = None) -> dict[str, torch.Tensor]:
        """Look conditions up by value. None / '<null>' (or NaN for continuous) means 'not conditioned'."""
        attributes = {canonical(k): v for k, v in (attributes or {}).items()}
        extra = sorted(set(attributes) - set(self.attributes))
        if extra:
            raise MediError(f"this model is not conditioned on {extra}; its attributes are {self.attributes}")
        n = len(classes)
        cond = {"class": self._lookup(classes, self.classes, "class")}
        for a, known in self.categorical.items():
            cond[a] = self._lookup(attributes.get(a, [None] * n), known, f"value of '{a}'")
        for a in self.continuous:
            vals = attributes.get(a, [None] * n)
            cond[a] = torch.tensor([np.nan if v is None else float(v) for v in vals], dtype=torch.float32)
        return cond

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Vocabulary":
        return cls(d["classes"], d["categorical"], d["continuous"])


def null_condition(cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The unconditional version of a condition batch (for classifier-free guidance)."""
    return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else torch.zeros_like(v) for k, v in cond.items()}


def drop_conditions(cond: Mapping[str, torch.Tensor], p_class: float, p_attribute: float,
                    generator: torch.Generator | Sequence[torch.Generator] | None = None,
                    nested: bool = False) -> dict[str, torch.Tensor]:
    """Condition dropout: each entry independently replaced by its null token (class and each attribute).
    `generator` is one generator for the batch, or one per row (a row's draws then depend on it alone).
    `nested`: a row whose class is dropped loses its attributes too, so the model never sees an attribute
    without the class (the draws are the same; only those rows change)."""
    out = {}
    for k, v in cond.items():
        p = p_class if k == "class" else p_attribute
        if isinstance(generator, Sequence):
            u = torch.stack([torch.rand(v.shape[1:], generator=g) for g in generator])
        else:
            u = torch.rand(v.shape, generator=generator)
        drop = u.to(v.device) < p                                          # drawn on the CPU: same on any device
        null = torch.full_like(v, float("nan")) if v.is_floating_point() else torch.zeros_like(v)
        out[k] = torch.where(drop, null, v)
    if nested:
        no_class = out["class"] == 0
        out = {k: v if k == "class" else torch.where(no_class.view(-1, *[1] * (v.dim() - 1)), null_condition({k: v})[k], v)
               for k, v in out.items()}
    return out


# --------------------------------------------------------------------------------------------- modules
def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """Sinusoidal features of a scalar per row (as for diffusion timesteps), (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim - 2 * half))


class ContinuousEmbedding(nn.Module):
    """A continuous attribute (e.g. age in years) -> d_e: sinusoidal features, a linear map; NaN -> learned null."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(dim, dim)
        self.null = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(x)
        emb = self.proj(sinusoidal(torch.nan_to_num(x), self.dim))
        return torch.where(missing[:, None], self.null.to(emb.dtype).expand_as(emb), emb)


class ConditionEncoder(nn.Module):
    """z_cond = concat(z_class, z_meta_1, ..., z_meta_k) in R^{d_t}, d_t = d_class + k * d_e.

    With `separate` (metadata_route: output) the class embedding fills d_t and `parts` returns the metadata
    embeddings (k * d_e) apart."""

    def __init__(self, vocab: Vocabulary, d_t: int, d_e: int, separate: bool = False):
        super().__init__()
        k = len(vocab.attributes)
        d_class = d_t if separate else d_t - k * d_e
        if d_class < MIN_D_CLASS:       # (params are checked in config; this guards a model built by hand)
            raise MediError(f"model.d_e = {d_e} with {k} attribute(s) leaves d_class = {d_class} of d_t = {d_t}; "
                            f"use d_e <= {(d_t - MIN_D_CLASS) // max(k, 1)}")
        self.d_t, self.d_e, self.d_class = d_t, d_e, d_class
        self.class_embedding = nn.Embedding(len(vocab.classes) + 1, d_class)
        self.categorical = nn.ModuleDict({a: nn.Embedding(len(v) + 1, d_e) for a, v in vocab.categorical.items()})
        self.continuous = nn.ModuleDict({a: ContinuousEmbedding(d_e) for a in vocab.continuous})

    def forward(self, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        z_class, z_meta = self.parts(cond)
        return z_class if z_meta is None else torch.cat([z_class, z_meta], dim=-1)

    def parts(self, cond: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(class embedding, concatenated metadata embeddings or None without attributes)."""
        meta = [emb(cond[a]) for a, emb in self.categorical.items()]
        meta += [emb(cond[a]) for a, emb in self.continuous.items()]
        return self.class_embedding(cond["class"]), (torch.cat(meta, dim=-1) if meta else None)


class OutputModulation(nn.Module):
    """The metadata route `output`: the metadata embeddings with the time embedding give a per-channel scale
    and shift of the UNet's output normalisation, h * (1 + scale) + shift. The last layer starts at zero, so
    an untrained pathway is the identity."""

    def __init__(self, d_meta: int, d_t: int, channels: int):
        super().__init__()
        self.meta = nn.Linear(d_meta, d_t)
        self.out = nn.Linear(d_t, 2 * channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor, z_meta: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.out(nn.functional.silu(t_emb + self.meta(z_meta))).to(h.dtype).chunk(2, dim=-1)
        return h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild the network (saved as config.json beside the weights)."""
    sample_size: int
    block_out_channels: list[int]
    layers_per_block: int
    attention: bool
    norm_num_groups: int
    d_e: int
    conditioning: str = "additive"         # additive | scale_shift (how time + condition enter the ResNet blocks)
    metadata_route: str = "embedding"      # embedding | output (where the metadata attributes enter)
    site_pathway: str = "embedding"        # embedding | stain | both (how the site enters; `medi.stain`)

    @property
    def d_t(self) -> int:
        return time_embedding_width(self.block_out_channels)

    def unet(self) -> UNet2DModel:
        n = len(self.block_out_channels)
        down = ["AttnDownBlock2D" if self.attention and i >= n - 2 else "DownBlock2D" for i in range(n)]
        up = ["AttnUpBlock2D" if self.attention and i < 2 else "UpBlock2D" for i in range(n)]
        unet = UNet2DModel(sample_size=self.sample_size, in_channels=3, out_channels=3,
                           block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                           down_block_types=tuple(down), up_block_types=tuple(up), add_attention=self.attention,
                           norm_num_groups=self.norm_num_groups, class_embed_type="identity",
                           resnet_time_scale_shift="scale_shift" if self.conditioning == "scale_shift" else "default")
        for block in unet.up_blocks:
            for upsampler in block.upsamplers or []:
                if type(upsampler) is Upsample2D:
                    upsampler.__class__ = ChannelsLastUpsample2D     # same module and weights, faster doubling on CPUs
        return unet


class ChannelsLastUpsample2D(Upsample2D):
    """diffusers' `Upsample2D` whose nearest-neighbour doubling runs in channels-last memory on a CPU.

    torch's CPU kernel for nearest upsampling of an NCHW tensor is 3-4x slower than its channels-last kernel at
    this UNet's sizes (16 x 64 x 16 x 16 in bf16: 1.5 ms against 0.5 ms with both layout changes, AMD EPYC), and
    the UNet samples 5 % faster for it (bench/upsample_speed.py). Nearest upsampling copies values, so the result
    is the stock module's bit for bit; other configurations (a norm, a transposed convolution, an explicit output
    size, CUDA) take the stock path."""

    def forward(self, hidden_states: torch.Tensor, output_size: int | None = None, *args, **kwargs) -> torch.Tensor:
        if (hidden_states.device.type != "cpu" or output_size is not None or args or kwargs or self.norm is not None
                or self.use_conv_transpose or not self.interpolate or self.name != "conv"):
            return super().forward(hidden_states, output_size, *args, **kwargs)
        doubled = F.interpolate(hidden_states.contiguous(memory_format=torch.channels_last), scale_factor=2.0,
                                mode="nearest").contiguous()
        return self.conv(doubled) if self.use_conv else doubled


class MediDiffusion(nn.Module):
    """UNet2DModel + ConditionEncoder. forward(x_t, t, cond) -> the UNet's prediction (epsilon, v or x0)."""

    def __init__(self, arch: Architecture, vocab: Vocabulary):
        super().__init__()
        self.arch, self.vocab = arch, vocab
        self.unet = arch.unet()
        separate = arch.metadata_route == "output" and bool(vocab.attributes)
        self.encoder = ConditionEncoder(vocab, arch.d_t, arch.d_e, separate=separate)
        self.modulation = None
        if separate:   # hooks: the time embedding is kept, the output normalisation modulated (the UNet unchanged)
            self.modulation = OutputModulation(len(vocab.attributes) * arch.d_e, arch.d_t, arch.block_out_channels[0])
            self._route: dict = {}
            self.unet.time_embedding.register_forward_hook(lambda _m, _i, out: self._route.__setitem__("t_emb", out))
            self.unet.conv_norm_out.register_forward_hook(
                lambda _m, _i, out: self.modulation(out, self._route["z_meta"], self._route["t_emb"]))
        # the stain pathway: only for a model conditioned on the site (CLS stays the paper's CLS)
        self.stain = (StainPathway(len(vocab.categorical[SITE]), len(vocab.classes)) if arch.site_pathway != "embedding"
                      and SITE in vocab.categorical else None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.stain is not None and self.arch.site_pathway == "stain":    # the site reaches the tile as its stain
            cond = {**cond, SITE: torch.zeros_like(cond[SITE])}             # alone: the UNet sees its null token
        if self.modulation is None:
            return self.unet(x, t, class_labels=self.encoder(cond)).sample
        z_class, self._route["z_meta"] = self.encoder.parts(cond)
        try:
            return self.unet(x, t, class_labels=z_class).sample
        finally:
            self._route.clear()

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        """Weights (safetensors), architecture and vocabulary; each file written atomically."""
        folder = Path(folder)
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        write_json(folder / "config.json", {"architecture": asdict(self.arch), **(extra or {})})
        write_json(folder / "vocab.json", self.vocab.to_json())
        if self.stain is not None and self.stain.estimates:
            write_json(folder / "stain.json", self.stain.estimates)

    @classmethod
    def load(cls, folder: str | Path, map_location: str = "cpu") -> "MediDiffusion":
        """Rebuild from `save` output. safetensors only: loading never unpickles objects."""
        folder = Path(folder)
        for name in ("model.safetensors", "config.json", "vocab.json"):
            if not (folder / name).exists():
                raise MediError(f"{folder}: missing {name}; train the model first (medi train)")
        config = json.loads((folder / "config.json").read_text())
        model = cls(Architecture(**config["architecture"]), Vocabulary.from_json(json.loads((folder / "vocab.json").read_text())))
        state = load_file(str(folder / "model.safetensors"), device=map_location)
        own = model.state_dict()
        for key in own.keys() - state.keys():      # saved before the stain pathway's colour calibration existed:
            if key.startswith("stain.") and key.rsplit(".", 1)[1] in ("basis", "target", "targeted"):
                state[key] = own[key]              # left uncalibrated
        model.load_state_dict(state)
        return model


def architecture(preset: str, sample_size: int, d_e: int, custom: Mapping | None = None, split: str = "d_e",
                 attributes: int = 0, conditioning: str = "additive", metadata_route: str = "embedding",
                 site_pathway: str = "embedding") -> Architecture:
    """The network of a preset. `split` sets the conditioning widths for `attributes` (k) metadata attributes:
    'd_e' gives each attribute d_e and the class d_t - k * d_e (the paper's text); 'equal' splits d_t equally
    between the class and each attribute, d_t // (k + 1) each with the remainder to the class (the authors' code).
    `conditioning`, `metadata_route` and `site_pathway`: see the module docstring."""
    if split not in ("d_e", "equal"):
        raise MediError(f"model.embedding_split: unknown split '{split}'; known: d_e, equal")
    if conditioning not in ("additive", "scale_shift"):
        raise MediError(f"model.conditioning: unknown mechanism '{conditioning}'; known: additive, scale_shift")
    if metadata_route not in ("embedding", "output"):
        raise MediError(f"model.metadata_route: unknown route '{metadata_route}'; known: embedding, output")
    if site_pathway not in PATHWAYS:
        raise MediError(f"model.site_pathway: unknown pathway '{site_pathway}'; known: {', '.join(PATHWAYS)}")
    if preset == "custom":
        spec = dict(custom or {})
    elif preset in UNET_PRESETS:
        spec = UNET_PRESETS[preset]
    else:
        raise MediError(f"model.preset: unknown preset '{preset}'; known: {sorted(UNET_PRESETS)} or 'custom'")
    need = len(spec["block_out_channels"]) - 1
    if sample_size % (2 ** need):
        raise MediError(f"model: {len(spec['block_out_channels'])} UNet levels need a resolution divisible by "
                        f"{2 ** need}; data.resolution is {sample_size}")
    arch = Architecture(sample_size=sample_size, d_e=d_e, conditioning=conditioning, metadata_route=metadata_route,
                        site_pathway=site_pathway, **spec)
    if split == "equal" and attributes > 0:
        arch = replace(arch, d_e=arch.d_t // (attributes + 1))
    return arch


# ----------------------------------------------------------------------------------------------- noise schedule
def noise_kwargs(cfg: ModelConfig) -> dict:
    """The training noise schedule, shared by the training scheduler and every sampler."""
    return {"num_train_timesteps": cfg.timesteps, "beta_schedule": cfg.beta_schedule,
            "prediction_type": cfg.prediction_type, "rescale_betas_zero_snr": cfg.rescale_zero_snr}


def training_scheduler(cfg: ModelConfig) -> DDPMScheduler:
    """The forward (noising) process training draws from; samplers share its schedule (`noise_kwargs`)."""
    return DDPMScheduler(**noise_kwargs(cfg), clip_sample=False)
