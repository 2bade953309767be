"""Image encoders over timm: one registry and one preprocessing function for every image that reaches one.

An encoder is named by a string:
- a preset (`uni`, `uni2-h`, `h-optimus-0`, `phikon`): the architecture of a pathology foundation model
  with its input size and normalisation; the weights come from a local file (these hubs are gated or
  unreachable offline);
- `timm:<name>`: any timm architecture with weights from a local state dict;
- `random:<name>`: a timm architecture left randomly initialised with a fixed seed. It runs anywhere with
  no download, which makes it the offline default; its figures are only comparable with each other, and
  every output names it (`describe`).

Preprocessing (`preprocess`) is the same for a real tile and a generated one: uint8 RGB -> float in [0, 1]
-> bilinear resize to the encoder's input size (antialiased when shrinking) -> normalisation by the
encoder's mean and standard deviation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medi.config import EncoderConfig
from medi.errors import MediError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EncoderSpec:
    name: str                                # as given in params, e.g. uni, timm:resnet50, random:resnet18
    architecture: str                        # the timm model name
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights: str = ""                        # local state dict ("" for random:)
    seed: int = 0                            # random: initialisation seed
    hub_id: str = ""                         # where the weights are published (for error messages)

    @property
    def pretrained(self) -> bool:
        return not self.name.startswith("random:")

    def identity(self) -> str:
        """What makes this encoder's outputs what they are (the feature cache's key, `medi.features`): the spec with
        the sha256 of the weights file in place of its path."""
        from dataclasses import replace

        from medi.features import file_digest

        return repr(replace(self, weights=f"sha256:{file_digest(self.weights)}" if self.weights else ""))

    def describe(self) -> str:
        """The encoder's name as every output and figure states it."""
        if not self.pretrained:
            return (f"{self.name} (untrained timm {self.architecture}, seed {self.seed}, {self.input_size} px: "
                    "offline default, not comparable with Inception FID or published figures)")
        return f"{self.name} ({self.architecture}, {self.input_size} px, weights {Path(self.weights).name})"


# Architectures of the pathology encoders (../shared/reference/tcga-ut.md); num_classes=0 gives pooled features.
PRESETS: dict[str, dict[str, Any]] = {
    "uni": {"architecture": "vit_large_patch16_224", "hub_id": "hf-hub:MahmoodLab/UNI",
            "kwargs": {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}},
    "uni2-h": {"architecture": "vit_giant_patch14_224", "hub_id": "hf-hub:MahmoodLab/UNI2-h",
               "kwargs": {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                          "embed_dim": 1536, "mlp_ratio": 5.33334, "no_embed_class": True, "reg_tokens": 8,
                          "dynamic_img_size": True, "mlp_layer": "swiglu_packed", "act_layer": "silu"}},
    "h-optimus-0": {"architecture": "vit_giant_patch14_reg4_dinov2", "hub_id": "hf-hub:bioptimus/H-optimus-0",
                    "kwargs": {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
                    "mean": (0.707223, 0.578729, 0.703617), "std": (0.211883, 0.230117, 0.177517)},
    "phikon": {"architecture": "vit_base_patch16_224", "hub_id": "hf-hub:1aurent/vit_base_patch16_224.owkin_pancancer",
               "kwargs": {"img_size": 224}},
}


def spec_of(encoder: EncoderConfig) -> EncoderSpec:
    """The spec of an encoder of params (`encoder`, or `fid.encoder`)."""
    return resolve(encoder.name, encoder.weights, encoder.input_size, encoder.seed)


def resolve(name: str, weights: str = "", input_size: int = 0, seed: int = 0) -> EncoderSpec:
    """An encoder name from params -> its spec (checks the weights file exists for pretrained encoders)."""
    if name in PRESETS:
        p = PRESETS[name]
        spec = EncoderSpec(name, p["architecture"], dict(p["kwargs"]), input_size or p["kwargs"].get("img_size", 224),
                           p.get("mean", IMAGENET_MEAN), p.get("std", IMAGENET_STD), weights, seed, p["hub_id"])
    elif name.startswith(("timm:", "random:")):
        arch = name.split(":", 1)[1]
        _check_architecture(arch, name)
        spec = EncoderSpec(name, arch, {}, input_size or 224, IMAGENET_MEAN, IMAGENET_STD,
                           weights if name.startswith("timm:") else "", seed, f"timm {arch}")
    else:
        raise MediError(f"unknown encoder '{name}'; use a preset ({', '.join(PRESETS)}), timm:<timm model name> "
                        "with a local weights file, or random:<timm model name> (untrained, offline)")
    if spec.pretrained:
        if not spec.weights:
            raise MediError(f"encoder '{name}' needs a local weights file (its weights, {spec.hub_id}, cannot be "
                            "fetched here); set the weights path in params, or use random:<name> offline")
        if not Path(spec.weights).is_file():
            raise MediError(f"encoder '{name}': weights file {spec.weights} not found; download {spec.hub_id} "
                            "where you have access and copy its state dict there")
    return spec


def _check_architecture(arch: str, name: str) -> None:
    import timm

    if not timm.is_model(arch):
        raise MediError(f"encoder '{name}': '{arch}' is not a timm architecture (see timm.list_models())")


def _layer(value: Any) -> Any:
    import timm

    return {"swiglu_packed": timm.layers.SwiGLUPacked, "silu": torch.nn.SiLU}.get(value, value)


def build(spec: EncoderSpec) -> torch.nn.Module:
    """The timm model in eval mode, returning pooled features: weights loaded from the local file, or the
    seeded random initialisation. A state dict that does not fit the architecture is an error naming keys."""
    import timm
    from safetensors.torch import load_file

    kwargs = {k: _layer(v) for k, v in spec.kwargs.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = timm.create_model(spec.architecture, pretrained=False, num_classes=0, **kwargs)
    if spec.pretrained:
        path = Path(spec.weights)
        try:
            state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                           weights_only=True)
        except Exception as exc:  # noqa: BLE001  (any unreadable file: say which and why)
            raise MediError(f"encoder '{spec.name}': cannot read weights {path}: {exc}") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "classifier."))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise MediError(f"encoder '{spec.name}': weights {path} do not fit timm {spec.architecture}: "
                            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    return model.eval().requires_grad_(False)


def preprocess(images: torch.Tensor, spec: EncoderSpec) -> torch.Tensor:
    """uint8 RGB (B, 3, H, W) or (B, H, W, 3) -> normalised float (B, 3, S, S) at the encoder's input size."""
    if images.dtype != torch.uint8:
        raise MediError(f"encoders take uint8 RGB images, got {images.dtype}")
    if images.shape[-1] == 3 and images.shape[1] != 3:
        # channels first in memory too: a channels-last view would run the network on other kernels, whose sums
        # differ in the last bits on some CPUs, and fid's extractor (batches from torch-fidelity's loader) and the
        # probe's encoder (stacked HWC tiles) must give the feature cache the same vectors
        images = images.permute(0, 3, 1, 2).contiguous()
    x = images.float() / 255.0
    size = spec.input_size
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def load_image(path: str | Path) -> np.ndarray:
    """Any RGB image file (a real JPEG tile or a generated PNG) -> uint8 (H, W, 3), the only way images are read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode != "RGB":
                raise MediError(f"{path}: expected an RGB image, got mode {im.mode}")
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise MediError(f"{path}: cannot decode: {exc}") from None


@torch.no_grad()
def embed(images: np.ndarray, spec: EncoderSpec, cache_dir: str = "", batch_size: int = 64,
          model: torch.nn.Module | None = None, progress: bool = True) -> np.ndarray:
    """Embeddings (N, D) float32 of uint8 images (N, H, W, 3): looked up in the feature cache by content
    (`medi.features`, shared with `fid` for the same network), the rest encoded in batches on accelerate's
    device (with a progress bar) and added to it.

    Under a launch this is a collective: the processes encode every N-th batch of what the main process
    found missing, gather the vectors, and the main process alone writes them to the cache."""
    from tqdm import tqdm

    from medi import distributed, features

    def encode(todo: list[int]) -> np.ndarray:
        device = distributed.state().device
        net = (model or build(spec)).to(device)
        batches = [todo[lo:lo + batch_size] for lo in range(0, len(todo), batch_size)]
        mine = []
        for b in tqdm(distributed.shard(range(len(batches)), "embedding batches"), desc=f"embedding ({spec.name})",
                      unit="batch", disable=not (progress and distributed.is_main())):
            batch = torch.from_numpy(np.stack([images[i] for i in batches[b]])).to(device)
            mine.append((b, net(preprocess(batch, spec)).float().cpu().numpy()))
        done = dict(distributed.gather(mine))
        return np.concatenate([done[b] for b in range(len(batches))])

    return features.cached(images, cache_dir, spec.name, spec.identity(), encode)
