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
    """Linear preview of ``latents`` (B, C, h, w) with the pipeline's family factors → (B, h, w, 3) uint8."""
    factors, bias = latent_rgb(pipe)
    return to_uint8(latent_to_rgb(latents.float(), factors, bias))


@torch.no_grad()
def decode_with(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Decode sampling-space latents (B, C, h, w) with an ``AutoencoderKL`` or ``AutoencoderTiny``.

    Undoes the pipeline's latent scaling exactly as the pipelines do: ``z = latents / scaling_factor``, plus
    ``shift_factor`` where the VAE has one (SD3: sampling-space latents are ``(z − shift) · scale``); returns
    (B, H, W, 3) uint8. Decoding never draws random numbers (the decoder is deterministic), so the run's result is
    unchanged.
    """
    param = next(vae.parameters())
    z = latents.to(device=param.device, dtype=param.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift:  # None or 0.0 for the SD 1.x/2.x/XL VAEs and TAESD
        z = z + shift
    out = vae.decode(z, return_dict=False)[0]  # (B, 3, H, W) in [-1, 1]
    return to_uint8(out.permute(0, 2, 3, 1))  # (B, H, W, 3)
