"""Model families (SD 1.x, SD 2.x, SDXL, SD3): everything model-specific lives here, one record per family."""

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
    # The pooled text embedding, either (keyword holding a dict, key) — SDXL's ("added_cond_kwargs",
    # "text_embeds") — or an argument of its own, (keyword, position) — SD3's ("pooled_projections", 2).
    pooled: tuple[str, str] | tuple[str, int] | None = None

    def _pooled_in_dict(self) -> bool:
        return self.pooled is not None and isinstance(self.pooled[1], str)

    def get(self, which: str, args: tuple, kwargs: dict) -> Any:
        """The value of input ``which`` ("sample", "timestep", "text", "pooled") in a forward call, or None."""
        if which == "pooled":
            if self.pooled is None:
                return None
            if self._pooled_in_dict():
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
            if self._pooled_in_dict():
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

    name: str  # short id: "sd1", "sd2", "sdxl", "sd3"
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
    optional_text_encoders: tuple[str, ...] = ()  # encoders a pipeline may leave out (SD3's T5: None)
    size_conditioning: bool = False  # SDXL: the UNet also takes (original size, crop, target size) "time ids"
    clip_sequence: tuple[str, ...] | None = None  # encoders whose hidden states fill the first 77 positions,
    # concatenated along the features (None: all of text_encoders; SD3: CLIP-L, CLIP-G, with T5's tokens after)
    prompt_arguments: tuple[str, ...] = ()  # further prompts encode_prompt requires (SD3: prompt_2, prompt_3)
    encode_options: tuple[
        str, ...
    ] = ()  # call arguments that shape encode_prompt's output (max_sequence_length)

    def present_tokenizers(self, pipe: Any) -> list[tuple[str, Any]]:
        """``(attribute, tokenizer)`` of each tokenizer the pipeline has, in order (SD3 may lack T5's)."""
        return [(n, t) for n in self.tokenizers if (t := getattr(pipe, n, None)) is not None]

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
        **options: Any,
    ) -> TextEncoding:
        """Call the pipeline's own ``encode_prompt`` and name what it returns (its tuple differs per family).

        ``options`` are passed on where the family lists them in :attr:`encode_options` (SD3's
        ``max_sequence_length``: the T5 length of the embedding) and dropped otherwise; the family's further
        prompts (SD3's ``prompt_2``, ``prompt_3``) are None, i.e. the same prompt for every text encoder.
        """
        extra: dict[str, Any] = {k: None for k in self.prompt_arguments}
        extra.update({k: v for k, v in options.items() if k in self.encode_options and v is not None})
        out = pipe.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            clip_skip=clip_skip,
            **extra,
        )
        # SDXL and SD3 both return (embeds, negative, pooled, negative pooled); SD3's embeds are the CLIP-L ‖
        # CLIP-G hidden states (zero-padded to T5's width) followed by T5's along the token axis.
        if self.pooled_text_embeds:
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
    size_conditioning=True,
)

# SD3's 16-channel VAE, from ComfyUI's comfy/latent_formats.py, class SD3 (latent_rgb_factors and
# latent_rgb_factors_bias). Which latents they expect: ComfyUI samples in "model space", process_in(z) =
# (z − shift_factor) · scale_factor (comfy/samplers.py `sample`: latent_image = model.process_latent_in(...)), and
# its Latent2RGBPreviewer (latent_preview.py) applies the factors to the sampler's denoised x0 in that space, before
# process_out. That is exactly diffusers' SD3 latents = (z − 0.0609) · 1.5305, so the factors apply to the
# sampling-space latents as they are, like every other family's (the factors and bias were fitted there). Only a
# VAE decode needs z = latents / scale + shift (decoding.decode_with).
_SD3_FACTORS = (
    (-0.0922, -0.0175, 0.0749),
    (0.0311, 0.0633, 0.0954),
    (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496),
    (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427),
    (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268),
    (0.0922, 0.0988, 0.0951),
    (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895),
    (-0.0069, -0.0030, -0.0810),
    (-0.0596, -0.0465, -0.0293),
    (-0.1448, -0.1463, -0.1189),
)

SD3 = Family(
    name="sd3",
    label="Stable Diffusion 3 / 3.5",
    pipeline_classes=(
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
    ),
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),  # CLIP-L, CLIP-G, T5-XXL
    tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"),
    latent_channels=16,
    latent_rgb_factors=_SD3_FACTORS,
    latent_rgb_bias=(0.2394, 0.2135, 0.1925),
    pooled_text_embeds=True,  # CLIP-L ‖ CLIP-G pooled → the transformer's pooled_projections
    denoiser="transformer",  # SD3Transformer2DModel (MMDiT)
    # SD3Transformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)
    denoiser_args=DenoiserArgs(
        sample=("hidden_states", 0),
        timestep=("timestep", 3),
        text=("encoder_hidden_states", 1),
        pooled=("pooled_projections", 2),
    ),
    optional_text_encoders=("text_encoder_3",),
    clip_sequence=("text_encoder", "text_encoder_2"),
    prompt_arguments=("prompt_2", "prompt_3"),
    encode_options=("max_sequence_length",),
)

#: Every supported family, in detection order.
FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL, SD3)}

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
    if cls in SD3.pipeline_classes:
        return SD3
    if cls in SD1.pipeline_classes:
        tok = getattr(pipe, "tokenizer", None)
        te = getattr(pipe, "text_encoder", None)
        hidden = getattr(getattr(te, "config", None), "hidden_size", None)
        if getattr(tok, "pad_token", None) == "!" or hidden == 1024:
            return SD2
        return SD1
    raise UnsupportedPipelineError(
        f"sdexplore does not support {cls}. Supported pipeline classes: {_SUPPORTED}. "
        "Load one with sdexplore.load_pipeline(...) or diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline "
        "/ StableDiffusion3Pipeline."
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
    """Pixels per latent cell along each side (8 for every SD family, SD3 included)."""
    return int(getattr(pipe, "vae_scale_factor", 2 ** (len(pipe.vae.config.block_out_channels) - 1)))
