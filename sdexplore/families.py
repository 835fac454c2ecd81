"""Model families (SD 1.x, SD 2.x, SDXL): everything model-specific lives here, one record per family."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .errors import UnsupportedPipelineError


@dataclass(frozen=True)
class DenoiserArgs:
    """Where the denoiser's ``forward`` finds its inputs, as (keyword, position) pairs.

    The attachment reads the noisy sample, the timestep and the text conditioning through these, and a prompt
    switch replaces the text (and pooled text) through them, so a transformer denoiser with other argument names
    is a new record, not a new recorder.
    """

    sample: tuple[str, int] = ("sample", 0)
    timestep: tuple[str, int] = ("timestep", 1)
    text: tuple[str, int] = ("encoder_hidden_states", 2)
    pooled: tuple[str, str] | None = (
        None  # (keyword holding a dict, key): SDXL's ("added_cond_kwargs", "text_embeds")
    )

    def get(self, which: str, args: tuple, kwargs: dict) -> Any:
        """The value of input ``which`` ("sample", "timestep", "text", "pooled") in a forward call, or None."""
        if which == "pooled":
            if self.pooled is None:
                return None
            holder = kwargs.get(self.pooled[0])
            return None if not holder else holder.get(self.pooled[1])
        name, pos = getattr(self, which)
        if name in kwargs:
            return kwargs[name]
        return args[pos] if len(args) > pos else None

    def replace(self, which: str, args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of a forward call with input ``which`` set to ``value`` (the originals untouched)."""
        kwargs = dict(kwargs)
        if which == "pooled":
            assert self.pooled is not None
            kwargs[self.pooled[0]] = {**kwargs[self.pooled[0]], self.pooled[1]: value}
            return args, kwargs
        name, pos = getattr(self, which)
        if name in kwargs or len(args) <= pos:
            kwargs[name] = value
            return args, kwargs
        return (*args[:pos], value, *args[pos + 1 :]), kwargs


@dataclass(frozen=True)
class TextEncoding:
    """What a pipeline's ``encode_prompt`` returned, named: (N, tokens, D) embeddings, (N, P) pooled ones."""

    embeds: torch.Tensor
    negative: torch.Tensor | None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


@dataclass(frozen=True)
class Family:
    """What sdexplore needs to know about one model family.

    Adding a family (SD3, Flux, ...) means adding one record to :data:`FAMILIES`; the attachment, recorders,
    walks and widgets read only these fields and methods.
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
    pooled_text_embeds: bool  # does the denoiser take a pooled text embedding (SDXL's add_text_embeds)?
    cfg_uncond_first: bool = True  # in the CFG batch the unconditional half comes first
    denoiser: str = "unet"  # pipeline attribute of the denoising network the attachment hooks
    denoiser_args: DenoiserArgs = DenoiserArgs()  # where its forward finds sample, timestep and text

    def get_denoiser(self, pipe: Any) -> torch.nn.Module:
        """The pipeline's denoising network (``pipe.unet`` for the UNet families)."""
        module = getattr(pipe, self.denoiser, None)
        if module is None:
            raise UnsupportedPipelineError(
                f"{type(pipe).__name__} has no {self.denoiser!r}: sdexplore observes the {self.label} denoiser there."
            )
        return module

    def cfg_halves(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uncond, cond)`` halves of a CFG batch (2B, ...) in this family's layout; views, no copy."""
        a, b = batch.chunk(2)  # (B, ...) each
        return (a, b) if self.cfg_uncond_first else (b, a)

    def cfg_rows(self, rows: int) -> tuple[slice, slice]:
        """``(uncond, cond)`` row slices of a CFG batch of ``rows`` rows."""
        half = rows // 2
        first, second = slice(0, half), slice(half, rows)
        return (first, second) if self.cfg_uncond_first else (second, first)

    def join_cfg(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The CFG batch (2B, ...) from its halves, in this family's layout."""
        return torch.cat([uncond, cond] if self.cfg_uncond_first else [cond, uncond])

    def cross_attention_layers(self, unet: torch.nn.Module) -> list[str]:
        """Processor names (keys of ``unet.attn_processors``) of the cross-attention layers.

        Detected structurally, not by size: an ``Attention`` module named ``attn2`` in a transformer block
        (diffusers' convention for text cross-attention). Read from the module tree directly, which is several
        times cheaper than building ``unet.attn_processors``.
        """
        return [
            f"{name}.processor"
            for name, module in unet.named_modules()
            if name.rpartition(".")[2] == "attn2" and hasattr(module, "set_processor")
        ]

    def encode_prompt(
        self,
        pipe: Any,
        prompt: Any,
        *,
        device: Any,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: Any = None,
        clip_skip: int | None = None,
    ) -> TextEncoding:
        """Call the pipeline's own ``encode_prompt`` and name what it returns (its tuple differs per family)."""
        out = pipe.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            clip_skip=clip_skip,
        )
        if self.pooled_text_embeds:  # (embeds, negative, pooled, negative pooled)
            return TextEncoding(out[0], out[1], out[2], out[3])
        return TextEncoding(out[0], out[1])


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
)
SD2 = replace(SD1, name="sd2", label="Stable Diffusion 2.x")
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
    denoiser_args=DenoiserArgs(pooled=("added_cond_kwargs", "text_embeds")),
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
