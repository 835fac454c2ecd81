"""The embedded model's parts: standard diffusers/transformers classes, small, and its noise schedule."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from . import scenes

#: Noise schedule: SD's scaled_linear betas rescaled to zero terminal SNR, with v-prediction and "trailing"
#: timesteps (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"). SD's own
#: schedule ends at alpha_bar_T = 0.0047, which on a 16×16 latent leaves enough signal for the initial noise,
#: not the prompt, to pick where the shape goes; and epsilon prediction gives the high-noise steps, where the
#: layout is decided, almost no gradient. An eps-prediction, linear-beta run (1.16M samples) placed 10%.
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    rescale_betas_zero_snr=True,
)
PREDICTION = "v_prediction"


def build_vae() -> AutoencoderKL:
    """AutoencoderKL 64×64×3 ↔ 16×16×4 (two downsamplings), ~0.54M parameters."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(24, 48, 48),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=scenes.IMAGE_SIZE,
    )


def build_unet() -> UNet2DConditionModel:
    """UNet2DConditionModel on 16×16×4 latents, two levels (16×16 with 48 channels, 8×8 with 80) with
    cross-attention at both and in the mid block, ~1.8M parameters; the mid block's self-attention sees the
    whole 8×8 map, and zero padding tells each position where it is.

    Two levels, not three: at 64×64 every layer's cost on a CPU is mostly per-call overhead, so the number of
    blocks sets the speed (2 threads, batch 2: three levels (32, 64, 80) ~40 ms a call, these two ~27 ms)."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
        block_out_channels=(48, 80),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=16,
    )


def build_text_encoder() -> CLIPTextModel:
    """CLIPTextModel, hidden 64, 3 layers, 4 heads, the full 49,408-token CLIP vocabulary (SD 1.x ids)."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=64,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_scheduler() -> DDIMScheduler:
    """The saved default sampler: DDIM (eta 0), trailing timesteps so the first step is t = 999 (pure noise)."""
    return DDIMScheduler(
        **SCHEDULE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
        prediction_type=PREDICTION,
    )


def n_params(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
