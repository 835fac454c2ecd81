"""Per-step previews, pure tensor math: linear latent → RGB (essentially free) and [-1, 1] → uint8.

Imports nothing of sdexplore; the pipeline- and VAE-bound helpers are in :mod:`sdexplore.decoding`.
"""

from __future__ import annotations

import torch


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
