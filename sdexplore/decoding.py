"""Pictures from latents with a pipeline's own parts: the family's linear preview and a VAE decode.

The pure tensor math (``latent_to_rgb``, ``to_uint8``) lives in :mod:`sdexplore.preview`, which imports nothing
of sdexplore; this module adds what needs a pipeline or a VAE.
"""

from __future__ import annotations

from typing import Any

import torch

from .families import latent_rgb
from .preview import latent_to_rgb, to_uint8


def latent_preview(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """The quick preview of ``latents`` (B, C, h, w) → (B, h, w, 3) uint8, as the step recorder makes it: the model
    folder's learned convolutional preview where it has one (``latent_preview.json``), else the family's linear
    factors."""
    from .families import latent_preview as learned_preview
    from .preview import conv_preview_to_uint8

    net = learned_preview(pipe)
    if net is not None:
        return conv_preview_to_uint8(latents.float(), net)
    factors, bias = latent_rgb(pipe)
    return to_uint8(latent_to_rgb(latents.float(), factors, bias))


@torch.no_grad()
def decode_with(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decode sampling-space latents (B, C, h, w) with an ``AutoencoderKL`` or ``AutoencoderTiny``.

    Undoes the pipeline's latent scaling exactly as the pipelines do: ``z = latents / scaling_factor``, plus
    ``shift_factor`` where the VAE has one (SD3: sampling-space latents are ``(z − shift) · scale``; Flux.2: the
    VAE's batch-norm statistics over 2×2 patches, as ``Flux2KleinPipeline`` undoes them); returns
    (B, H, W, 3) uint8. Decoding never draws random numbers (the decoder is deterministic), so the run's result is
    unchanged.
    """
    param = next(vae.parameters())
    if getattr(vae.config, "latents_std", None) is not None:  # Qwen-Image's 3-D VAE: per-channel statistics
        x = latents.to(device=param.device, dtype=param.dtype)
        mean, std = (
            torch.tensor(vae.config[k], dtype=x.dtype, device=x.device)
            for k in ("latents_mean", "latents_std")
        )
        z = (x * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).unsqueeze(2)  # (B, C, 1, h, w): one frame
        out = vae.decode(z, return_dict=False)[0][:, :, 0]  # (B, 3, H, W) in [-1, 1], as QwenImagePipeline
        return to_uint8(out.permute(0, 2, 3, 1))  # (B, H, W, 3)
    if getattr(vae, "bn", None) is not None:  # AutoencoderKLFlux2 (Flux.2): batch-norm statistics, no scaling
        z = _flux2_denormalize(vae, latents.to(device=param.device, dtype=param.dtype))
    else:
        z = latents.to(device=param.device, dtype=param.dtype) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:  # None or 0.0 for the SD 1.x/2.x/XL VAEs and TAESD
            z = z + shift
    out = vae.decode(z, return_dict=False)[0]  # (B, 3, H, W) in [-1, 1]
    return to_uint8(out.permute(0, 2, 3, 1))  # (B, H, W, 3)


def _flux2_denormalize(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Flux.2's sampling-space latents (B, C, h, w) → the VAE's latents: patchify 2×2 as the pipeline does, undo the
    batch-norm normalisation ``(z − running_mean) / sqrt(running_var + eps)``, unpatchify."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2)  # (B, C, h/2, dy, w/2, dx)
    x = x.permute(0, 1, 3, 5, 2, 4).reshape(
        b, c * 4, h // 2, w // 2
    )  # (B, 4C, h/2, w/2): channel c·4 + 2·dy + dx
    bn = vae.bn
    mean = bn.running_mean.view(1, -1, 1, 1).to(x.dtype)  # (1, 4C, 1, 1)
    std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(
        x.dtype
    )  # (1, 4C, 1, 1)
    x = (x * std + mean).reshape(b, c, 2, 2, h // 2, w // 2)  # (B, C, dy, dx, h/2, w/2)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)  # (B, C, h, w)
