"""Per-step previews: linear latent → RGB (essentially free), tiny-autoencoder decode, full VAE decode."""

from __future__ import annotations

from typing import Any

import torch

from .families import latent_rgb


def latent_to_rgb(latents: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Linear latent → RGB preview (the ComfyUI "latent2rgb" method): ``rgb = latentsᵀ · factors + bias``.

    ``latents`` (B, C, h, w), ``factors`` (C, 3), ``bias`` (3,) → (B, h, w, 3) float in [-1, 1] (clamped),
    on the latents' device. One preview pixel per latent cell (1/8 of the image side).
    """
    if latents.ndim != 4 or latents.shape[1] != factors.shape[0]:
        raise ValueError(
            f"latent_to_rgb expects latents (B, {factors.shape[0]}, h, w); got {tuple(latents.shape)}."
        )
    f = factors.to(device=latents.device, dtype=latents.dtype)
    b = bias.to(device=latents.device, dtype=latents.dtype)
    rgb = torch.einsum("bchw,cr->bhwr", latents, f) + b  # (B, h, w, 3)
    return rgb.clamp(-1.0, 1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any layout) → uint8 in [0, 255], same layout."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def latent_preview(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Linear preview of ``latents`` (B, C, h, w) with the pipeline's family factors → (B, h, w, 3) uint8."""
    factors, bias = latent_rgb(pipe)
    return to_uint8(latent_to_rgb(latents.float(), factors, bias))


@torch.no_grad()
def decode_with(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decode sampling-space latents (B, C, h, w) with an ``AutoencoderKL`` or ``AutoencoderTiny``.

    Divides by ``vae.config.scaling_factor`` exactly as the pipelines do; returns (B, H, W, 3) uint8.
    Decoding never draws random numbers (the decoder is deterministic), so the run's result is unchanged.
    """
    param = next(vae.parameters())
    z = latents.to(device=param.device, dtype=param.dtype) / vae.config.scaling_factor
    out = vae.decode(z, return_dict=False)[0]  # (B, 3, H, W) in [-1, 1]
    return to_uint8(out.permute(0, 2, 3, 1))  # (B, H, W, 3)
