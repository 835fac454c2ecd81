"""Tiny random-weight SD 1.x / SD 2.x / SDXL pipelines built in code: offline structure tests and demos.

They have the real architecture classes and the real CLIP tokenizer but random weights, so they draw
noise: use them for structure (shapes, hooks, restore guarantees), never for meaning.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from .tokenizer import clip_tokenizer

FixtureFamily = Literal["sd1", "sd2", "sdxl"]
FIXTURE_FAMILIES: tuple[str, ...] = ("sd1", "sd2", "sdxl")

_TEXT_HIDDEN = 32


@lru_cache(maxsize=2)
def _tokenizer(pad_token: str) -> CLIPTokenizer:
    return clip_tokenizer(pad_token=pad_token)


def _text_config(projection_dim: int | None = None) -> CLIPTextConfig:
    kwargs: dict[str, Any] = dict(
        vocab_size=49408,
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        hidden_act="gelu",
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def _vae() -> AutoencoderKL:
    # Four blocks → 8× downsampling, like every real SD VAE: 64×64×3 pixels ↔ 8×8×4 latents.
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=64,
    )


def _unet(family: str) -> UNet2DConditionModel:
    common: dict[str, Any] = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
    )
    if family == "sd1":
        return UNet2DConditionModel(**common, cross_attention_dim=_TEXT_HIDDEN, attention_head_dim=8)
    if family == "sd2":
        return UNet2DConditionModel(
            **common, cross_attention_dim=_TEXT_HIDDEN, attention_head_dim=(2, 4), use_linear_projection=True
        )
    # SDXL: both encoders' hidden states concatenated, plus pooled text + 6 time ids through "text_time".
    return UNet2DConditionModel(
        **common,
        cross_attention_dim=2 * _TEXT_HIDDEN,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + _TEXT_HIDDEN,
    )


def _scheduler(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


@lru_cache(maxsize=3)
def _state(family: str) -> dict[str, dict[str, torch.Tensor]]:
    """Random weights of each component, drawn once with a fixed seed (so every fixture is identical)."""
    torch.manual_seed(0)
    parts: dict[str, torch.nn.Module] = {"unet": _unet(family), "vae": _vae()}
    parts["text_encoder"] = CLIPTextModel(_text_config())
    if family == "sdxl":
        parts["text_encoder_2"] = CLIPTextModelWithProjection(_text_config(projection_dim=_TEXT_HIDDEN))
    return {k: {n: t.clone() for n, t in m.state_dict().items()} for k, m in parts.items()}


def tiny_pipeline(family: FixtureFamily = "sd1", *, prediction_type: str | None = None) -> Any:
    """Build a fresh tiny random-weight pipeline of ``family`` ("sd1", "sd2" or "sdxl").

    Every call returns a new, independent pipeline with the same weights (fp32, CPU, DDIM scheduler).
    ``sd2`` defaults to v-prediction like SD 2.x 768 models; the others to epsilon. 64×64 pixels → 8×8 latents.
    """
    if family not in FIXTURE_FAMILIES:
        raise ValueError(f"Unknown fixture family {family!r}; choose one of {FIXTURE_FAMILIES}.")
    pred = prediction_type or ("v_prediction" if family == "sd2" else "epsilon")
    state = _state(family)
    unet = _unet(family)
    vae = _vae()
    te = CLIPTextModel(_text_config())
    for module, key in ((unet, "unet"), (vae, "vae"), (te, "text_encoder")):
        module.load_state_dict(state[key])
        module.eval()
    if family == "sdxl":
        te2 = CLIPTextModelWithProjection(_text_config(projection_dim=_TEXT_HIDDEN))
        te2.load_state_dict(state["text_encoder_2"])
        te2.eval()
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=te,
            text_encoder_2=te2,
            tokenizer=_tokenizer("<|endoftext|>"),
            tokenizer_2=_tokenizer("!"),
            unet=unet,
            scheduler=_scheduler(pred),
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=te,
            tokenizer=_tokenizer("!" if family == "sd2" else "<|endoftext|>"),
            unet=unet,
            scheduler=_scheduler(pred),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd15_shaped_pipeline(device: str = "cuda", dtype: torch.dtype = torch.float16) -> Any:
    """A pipeline with Stable Diffusion 1.5's exact architecture and random weights (about 1.07 B parameters).

    Same compute and memory as the real checkpoint, so speed and memory benchmarks are honest without
    downloading weights. Configs follow SD 1.5's published ``config.json`` files; PNDM is replaced by DDIM.
    Weights are initialised directly on ``device`` (seconds on a GPU instead of a minute on the CPU).
    """
    with torch.device(device):
        return _sd15_shaped(device, dtype)


def _sd15_shaped(device: str, dtype: torch.dtype) -> Any:
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
        scaling_factor=0.18215,
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=_tokenizer("<|endoftext|>"),
        unet=unet,
        scheduler=_scheduler("epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)
