"""Real-shaped pipelines with random weights, built offline, for ``bench_scale.py``.

What is real and what is reduced (every figure of the benchmark comes from the denoising loop):

- **Denoisers: real.** The UNet / MMDiT of each checkpoint as published (its ``config.json``, written out below),
  random weights, so the compute, the attention layers, the heads and the token counts are the real ones. Except
  **Flux.1-dev**, whose 11.9 B parameters do not fit the benchmark's memory even in bf16: its blocks are the real
  ones (24 heads × 128, width 3072, joint_attention_dim 4096, guidance embedding, RoPE axes 16 + 56 + 56), but
  ``flux_blocks`` (default 2 double-stream + 4 single-stream) of the real 19 + 38. Attention capture is linear in
  layers (``tests/test_attention_budget.py``), so the benchmark reports per-layer figures and extrapolates.
- **Text encoders: real width and real output length, fewer layers.** SD-1.5's CLIP-L is whole (the fixture
  ``sdexplore.fixtures.sd15_shaped_pipeline``). SDXL's CLIP-L (768) and OpenCLIP bigG (1280), SD3.5's CLIP-L, bigG
  and T5-XXL (4096, 256 tokens), Flux's CLIP-L and T5-XXL (4096, 512 tokens) keep their width, heads and feed-forward
  size but ``TEXT_LAYERS`` layers, and T5 has the small offline vocabulary of ``sdexplore.tokenizer.t5_tokenizer``
  (a real tokenizer pads to the same 256/512 tokens). The encoders run once per call, outside the loop: their
  depth changes neither the keys the attention maps have nor a step's cost.
- **VAE: small, never run.** Calls use ``output_type="latent"``; the VAE only sets the 8× latent scale, the latent
  channels (4 or 16) and the scaling/shift factors, which are the real ones.
- **Schedulers: the real ones** (SDXL: Euler, leading spacing; SD3.5: flow-matching Euler, shift 3; Flux.1-dev:
  dynamic shifting), except SD-1.5's PNDM, which the fixture replaces by DDIM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

#: Layers kept in each text encoder other than SD-1.5's (real width, heads and feed-forward size).
TEXT_LAYERS = {"clip": 2, "t5": 1}
#: Flux.1-dev's real depth (double-stream, single-stream blocks) and what is built by default.
FLUX_REAL_BLOCKS = (19, 38)
FLUX_BLOCKS = (2, 4)

# ---- the published denoiser configs ----------------------------------------------------------------------------
#: stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2,567,463,684 parameters).
SDXL_UNET: dict[str, Any] = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,  # CLIP-L (768) ‖ bigG (1280) penultimate hidden states
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids × 256 + bigG's pooled 1280
    norm_num_groups=32,
)
#: stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X).
SD35M_TRANSFORMER: dict[str, Any] = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,  # T5-XXL's width (CLIP-L ‖ bigG is zero-padded to it)
    caption_projection_dim=1536,
    pooled_projection_dim=2048,  # CLIP-L ‖ bigG pooled
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),  # 0..12: a second image-only attention
    qk_norm="rms_norm",
)
#: black-forest-labs/FLUX.1-dev, transformer/config.json (num_layers / num_single_layers set by ``flux_blocks``).
FLUX1_DEV_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels × 2×2 packed patches
    num_layers=FLUX_REAL_BLOCKS[0],
    num_single_layers=FLUX_REAL_BLOCKS[1],
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,  # CLIP-L pooled
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

# ---- the text encoders' real widths --------------------------------------------------------------------------
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, feed_forward_proj="gated-gelu")

MODELS = ("sd15", "sdxl", "sd35m", "flux1")


@dataclass(frozen=True)
class Shaped:
    """A built pipeline and how to call it as its users do."""

    model: str
    pipe: Any
    call: dict[str, Any]  # keyword arguments of a plain text-to-image call at the model's defaults
    denoiser: str  # the pipeline attribute of the denoiser ("unet" or "transformer")
    reduced: str  # what differs from the published model, in words

    @property
    def denoiser_params(self) -> int:
        """Parameters of the denoiser as built."""
        return sum(p.numel() for p in getattr(self.pipe, self.denoiser).parameters())


def denoiser_class(model: str) -> type:
    """The diffusers class of ``model``'s denoiser."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    return {
        "sd15": UNet2DConditionModel,
        "sdxl": UNet2DConditionModel,
        "sd35m": SD3Transformer2DModel,
        "flux1": FluxTransformer2DModel,
    }[model]


def denoiser_config(model: str, flux_blocks: tuple[int, int] | None = None) -> dict[str, Any]:
    """The published denoiser config of ``model`` (Flux.1: with ``flux_blocks`` double/single blocks if given)."""
    if model == "sd15":
        return dict(
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
    cfg = {"sdxl": SDXL_UNET, "sd35m": SD35M_TRANSFORMER, "flux1": FLUX1_DEV_TRANSFORMER}[model]
    cfg = dict(cfg)
    if model == "flux1" and flux_blocks is not None:
        cfg["num_layers"], cfg["num_single_layers"] = flux_blocks
    return cfg


def meta_denoiser(model: str, flux_blocks: tuple[int, int] | None = None) -> torch.nn.Module:
    """``model``'s denoiser on the meta device: the real structure and parameter count, no memory, no weights."""
    with torch.device("meta"):
        return denoiser_class(model)(**denoiser_config(model, flux_blocks))


def _clip(width: dict[str, Any], projection: bool) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=49408,
        max_position_embeddings=77,
        num_hidden_layers=TEXT_LAYERS["clip"],
        projection_dim=width["hidden_size"],  # CLIP-L: 768, bigG: 1280 (as published)
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
        **width,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _t5() -> Any:
    from transformers import T5Config, T5EncoderModel

    from sdexplore.tokenizer import t5_tokenizer

    return T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer()),
            num_layers=TEXT_LAYERS["t5"],
            relative_attention_num_buckets=32,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            **T5_XXL,
        )
    )


def _vae(latent_channels: int, **factors: Any) -> Any:
    from diffusers import AutoencoderKL

    # Four blocks: the real 8× latent scale; tiny widths (never run: calls return latents)
    return AutoencoderKL(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        norm_num_groups=8,
        layers_per_block=1,
        **factors,
    )


def build(
    model: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    flux_blocks: tuple[int, int] = FLUX_BLOCKS,
) -> Shaped:
    """Build ``model`` ("sd15", "sdxl", "sd35m" or "flux1") with random weights directly in ``dtype`` on ``device``
    (no float32 copy: SDXL's UNet takes 5.1 GB in bf16), in eval mode, progress bar off."""
    if model not in MODELS:
        raise ValueError(f"Unknown model {model!r}; choose one of {MODELS}.")
    torch.manual_seed(0)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # every parameter is drawn in dtype: no float32 copy of 2.6 B weights
    try:
        with torch.device(device):
            shaped = _BUILDERS[model](flux_blocks)
    finally:
        torch.set_default_dtype(before)
    # the schedule in float32 on the host, as from_pretrained builds it (not in dtype, not on the meta device)
    shaped.pipe.register_modules(scheduler=_scheduler(model))
    return _done(shaped)


def _scheduler(model: str) -> Any:
    """The model's scheduler as published (SD-1.5: DDIM in place of PNDM, as the fixture has it)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if model == "sd15":
        return DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=False)
    if model == "sdxl":
        return EulerDiscreteScheduler(**betas, timestep_spacing="leading")
    if model == "sd35m":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    return FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev: the shift follows the image's token count
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _done(shaped: Shaped) -> Shaped:
    shaped.pipe.set_progress_bar_config(disable=True)
    for m in shaped.pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval().requires_grad_(False)
    return shaped


def _sd15(_: Any) -> Shaped:
    from sdexplore.fixtures import sd15_shaped_pipeline

    pipe = sd15_shaped_pipeline(str(torch.get_default_device()), torch.get_default_dtype())
    note = "none in the denoising loop (PNDM replaced by DDIM; whole CLIP-L; whole VAE, not run)"
    return Shaped("sd15", pipe, {"guidance_scale": 7.5}, "unet", note)


_TEXT_NOTE = "text encoders at real width and output length, {layers}"


def _sdxl(_: Any) -> Shaped:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    from sdexplore.tokenizer import clip_tokenizer

    pipe = StableDiffusionXLPipeline(
        vae=_vae(4, scaling_factor=0.13025),
        text_encoder=_clip(CLIP_L, projection=False),
        text_encoder_2=_clip(CLIP_BIGG, projection=True),
        tokenizer=clip_tokenizer(pad_token="<|endoftext|>"),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        unet=UNet2DConditionModel(**denoiser_config("sdxl")),
        scheduler=None,  # set by build(), outside the dtype and device of the modules
        add_watermarker=False,
    )
    note = _TEXT_NOTE.format(layers=f"{TEXT_LAYERS['clip']} of 12 / 32 layers (CLIP-L / bigG)")
    return Shaped("sdxl", pipe, {"guidance_scale": 5.0}, "unet", note + "; VAE small, not run")


def _sd35m(_: Any) -> Shaped:
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from sdexplore.tokenizer import clip_tokenizer, t5_tokenizer

    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**denoiser_config("sd35m")),
        scheduler=None,  # set by build(), outside the dtype and device of the modules
        vae=_vae(
            16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
        ),
        text_encoder=_clip(CLIP_L, projection=True),
        tokenizer=clip_tokenizer(pad_token="<|endoftext|>"),
        text_encoder_2=_clip(CLIP_BIGG, projection=True),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        text_encoder_3=_t5(),
        tokenizer_3=t5_tokenizer(),
    )
    note = _TEXT_NOTE.format(
        layers=f"{TEXT_LAYERS['clip']} of 12 / 32 layers (CLIP-L / bigG), {TEXT_LAYERS['t5']} of 24 (T5-XXL)"
    )
    # SD3.5's defaults: 40 steps, CFG 7 (CFG doubles the batch), T5 sequence of 256 tokens (+ 77 CLIP = 333 keys)
    return Shaped(
        "sd35m",
        pipe,
        {"guidance_scale": 7.0, "max_sequence_length": 256},
        "transformer",
        note + "; VAE small, not run",
    )


def _flux1(flux_blocks: tuple[int, int]) -> Shaped:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from sdexplore.tokenizer import clip_tokenizer, t5_tokenizer

    pipe = FluxPipeline(
        scheduler=None,  # set by build(), outside the dtype and device of the modules
        vae=_vae(
            16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
        ),
        text_encoder=_clip(CLIP_L, projection=False),
        tokenizer=clip_tokenizer(pad_token="<|endoftext|>"),
        text_encoder_2=_t5(),
        tokenizer_2=t5_tokenizer(),
        transformer=FluxTransformer2DModel(**denoiser_config("flux1", flux_blocks)),
    )
    d, s = flux_blocks
    note = (
        f"{d} of {FLUX_REAL_BLOCKS[0]} double-stream and {s} of {FLUX_REAL_BLOCKS[1]} single-stream blocks (real "
        "block shapes); "
        + _TEXT_NOTE.format(
            layers=f"{TEXT_LAYERS['clip']} of 12 layers (CLIP-L), {TEXT_LAYERS['t5']} of 24 (T5-XXL)"
        )
    )
    # FLUX.1-dev's defaults: guidance 3.5 as a transformer input (no CFG batch), T5 sequence of 512 tokens
    return Shaped(
        "flux1",
        pipe,
        {"guidance_scale": 3.5, "max_sequence_length": 512},
        "transformer",
        note + "; VAE small, not run",
    )


_BUILDERS = {"sd15": _sd15, "sdxl": _sdxl, "sd35m": _sd35m, "flux1": _flux1}
