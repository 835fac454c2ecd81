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


def uint8_factors(factors: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(127.5 · factors, 127.5 · (bias + 1) + 0.5)`` as float32: factors that map latents straight to
    [0, 255] plus one half, so that truncating to uint8 rounds to the nearest level."""
    return factors.float() * 127.5, (bias.float() + 1.0) * 127.5 + 0.5


def latent_to_uint8(
    latents: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor, *, scaled: bool = False
) -> torch.Tensor:
    """The linear preview as a picture: ``latents`` (B, C, h, w) → (B, h, w, 3) uint8, on the latents' device.

    Equals ``to_uint8(latent_to_rgb(latents, factors, bias))`` up to float rounding (one level, rarely), in three
    kernels instead of a dozen: this is the preview sdexplore records and shows everywhere. Pass factors from
    :func:`uint8_factors` with ``scaled=True`` to skip rescaling them on every call.
    """
    if latents.ndim != 4 or latents.shape[1] != factors.shape[0]:
        raise ValueError(
            f"latent_to_uint8 expects latents (B, {factors.shape[0]}, h, w); got {tuple(latents.shape)}."
        )
    if not scaled:
        factors, bias = uint8_factors(factors, bias)
    b, c, h, w = latents.shape
    x = latents if latents.dtype == torch.float32 else latents.float()
    x = x.permute(0, 2, 3, 1).reshape(-1, c)  # (B·h·w, C)
    if factors.device != x.device:
        factors, bias = factors.to(x.device), bias.to(x.device)
    rgb = torch.addmm(bias, x, factors)  # (B·h·w, 3) = 127.5 (rgb + 1) + 0.5
    return rgb.clamp_(0.0, 255.0).to(torch.uint8).view(b, h, w, 3)  # (B, h, w, 3): truncation rounds (+0.5)
