"""Model families (SD 1.x, SD 2.x, SDXL): everything model-specific lives here, one record per family."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .errors import UnsupportedPipelineError


@dataclass(frozen=True)
class Family:
    """What sdexplore needs to know about one model family.

    Adding a family (SD3, Flux, ...) means adding one record to :data:`FAMILIES`; recorders, walks and
    widgets read only these fields.
    """

    name: str  # short id: "sd1", "sd2", "sdxl"
    label: str  # human name for tables and plots
    pipeline_classes: tuple[str, ...]  # diffusers pipeline class names this family covers
    text_encoders: tuple[str, ...]  # pipeline attribute names of the text encoders, in concat order
    tokenizers: tuple[str, ...]  # pipeline attribute names of the tokenizers (same order)
    latent_channels: int  # channels of the VAE latent
    latent_rgb_factors: tuple[
        tuple[float, float, float], ...
    ]  # (latent_channels, 3): latent → RGB in [-1, 1]
    latent_rgb_bias: tuple[float, float, float]  # added after the factors
    pooled_text_embeds: bool  # does the UNet take a pooled text embedding (SDXL's add_text_embeds)?
    cfg_uncond_first: bool = True  # in the CFG batch the unconditional half comes first
    default_resolution: int = 512  # native image side in pixels

    def cross_attention_layers(self, unet: torch.nn.Module) -> list[str]:
        """Processor names (keys of ``unet.attn_processors``) of the cross-attention layers.

        Detected structurally, not by size: an ``Attention`` module is cross-attention when it is
        configured with a ``cross_attention_dim`` different from its query dim or named ``attn2`` in a
        transformer block (diffusers' convention for text cross-attention).
        """
        names = []
        for proc_name in unet.attn_processors:
            module_name = proc_name.removesuffix(".processor")
            if module_name.split(".")[-1] == "attn2":
                names.append(proc_name)
        return names


# Latent → RGB factors as published with ComfyUI's latent formats (rows = latent channels, columns = R, G, B).
_SD_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)

SD1 = Family(
    name="sd1",
    label="Stable Diffusion 1.x",
    pipeline_classes=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    latent_channels=4,
    latent_rgb_factors=_SD_FACTORS,
    latent_rgb_bias=(0.0, 0.0, 0.0),
    pooled_text_embeds=False,
    default_resolution=512,
)
SD2 = replace(SD1, name="sd2", label="Stable Diffusion 2.x", default_resolution=768)
SDXL = Family(
    name="sdxl",
    label="Stable Diffusion XL",
    pipeline_classes=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"),
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    latent_channels=4,
    latent_rgb_factors=_SDXL_FACTORS,
    latent_rgb_bias=(0.1084, -0.0175, -0.0011),
    pooled_text_embeds=True,
    default_resolution=1024,
)

#: Every supported family, in detection order.
FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL)}

_SUPPORTED = ", ".join(sorted({c for f in FAMILIES.values() for c in f.pipeline_classes}))


def detect_family(pipe: Any) -> Family:
    """Return the :class:`Family` of a diffusers pipeline object.

    SD 1.x and SD 2.x share pipeline classes; they are told apart by the text encoder (SD 2.x uses
    OpenCLIP ViT-H, hidden size 1024, and pads with "!") — the tokenizer's pad token is the robust signal.
    Raises :class:`UnsupportedPipelineError` naming the supported classes otherwise.
    """
    cls = type(pipe).__name__
    if cls in SDXL.pipeline_classes:
        return SDXL
    if cls in SD1.pipeline_classes:
        tok = getattr(pipe, "tokenizer", None)
        te = getattr(pipe, "text_encoder", None)
        hidden = getattr(getattr(te, "config", None), "hidden_size", None)
        if getattr(tok, "pad_token", None) == "!" or hidden == 1024:
            return SD2
        return SD1
    raise UnsupportedPipelineError(
        f"sdexplore does not support {cls}. Supported pipeline classes: {_SUPPORTED}. "
        "Load one with sdexplore.load_pipeline(...) or diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline."
    )


def model_dir(pipe: Any) -> Path | None:
    """The local folder a pipeline was loaded from, if any (``pipe.config._name_or_path``)."""
    path = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if path and Path(str(path)).is_dir():
        return Path(str(path))
    return None


def latent_rgb(pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent → RGB preview factors for a pipeline: ``(factors (C, 3), bias (3,))`` as float32 CPU tensors.

    A model folder may carry its own fitted factors in ``latent_rgb.json`` (the embedded model does);
    otherwise the family's published factors are used.
    """
    folder = model_dir(pipe)
    if folder is not None and (folder / "latent_rgb.json").is_file():
        data = json.loads((folder / "latent_rgb.json").read_text())
        return torch.tensor(data["factors"], dtype=torch.float32), torch.tensor(
            data["bias"], dtype=torch.float32
        )
    fam = detect_family(pipe)
    return (
        torch.tensor(fam.latent_rgb_factors, dtype=torch.float32),
        torch.tensor(fam.latent_rgb_bias, dtype=torch.float32),
    )


def vae_scale_factor(pipe: Any) -> int:
    """Pixels per latent cell along each side (8 for every SD family)."""
    return int(getattr(pipe, "vae_scale_factor", 2 ** (len(pipe.vae.config.block_out_channels) - 1)))
