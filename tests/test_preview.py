"""The linear preview: one function (latent_to_uint8) for the recorder and every view, equal to the float path."""

from __future__ import annotations

import torch

from sdexplore.preview import latent_to_rgb, latent_to_uint8, to_uint8, uint8_factors


def test_uint8_preview_equals_the_float_path_to_one_level() -> None:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 16, 24, generator=g) * 2  # (B, C, h, w): some pixels clip at both ends
    factors, bias = torch.randn(4, 3, generator=g) * 0.4, torch.randn(3, generator=g) * 0.1
    fast = latent_to_uint8(latents, factors, bias)
    slow = to_uint8(latent_to_rgb(latents, factors, bias))
    assert fast.shape == (3, 16, 24, 3) and fast.dtype == torch.uint8
    diff = (fast.int() - slow.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    assert fast.min() == 0 and fast.max() == 255  # clipping, not wrapping
    # pre-scaled factors give the same picture
    assert torch.equal(latent_to_uint8(latents, *uint8_factors(factors, bias), scaled=True), fast)


def test_preview_rounds_to_the_nearest_level() -> None:
    factors = torch.eye(3, 3)  # channel c → colour c
    levels = torch.tensor([0.1, 0.6, 254.4]) / 127.5 - 1  # values just off a level, in [-1, 1]
    latents = levels.view(1, 3, 1, 1)
    assert latent_to_uint8(latents, factors, torch.zeros(3)).flatten().tolist() == [0, 1, 254]
