"""Linear preview factors fitted from a pipeline's own VAE, for a family with none published (Sana's DC-AE).

The fit encodes a fixed set of synthetic colour pictures and least-squares fits each latent cell to the picture's
colour there, once per VAE object (a weak map, nothing stored on the pipeline); families with published factors
keep theirs exactly.
"""

from __future__ import annotations

import copy
import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sdexplore as sdx
from sdexplore.families import (
    _FITTED_RGB,
    FAMILIES,
    fitted_latent_rgb,
    latent_rgb,
    vae_sampling_latents,
    vae_scale_factor,
)
from sdexplore.fixtures import tiny_pipeline
from sdexplore.preview import fit_linear_preview, latent_to_rgb, preview_swatches


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def _scene(size: int) -> torch.Tensor:
    """A red disc on blue, (1, 3, size, size) in [-1, 1]: a picture not among the fitting swatches."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.empty((3, size, size), np.float32)
    img[:] = np.array([-0.7, -0.5, 0.6], np.float32)[:, None, None]
    disc = (y - 0.5) ** 2 + (x - 0.35) ** 2 < 0.06
    img[:, disc] = np.array([0.75, -0.8, -0.8], np.float32)[:, None]
    return torch.from_numpy(img)[None]


@pytest.fixture(scope="module")
def sana():
    return tiny_pipeline("sana")


def test_sana_has_no_published_factors_and_gets_fitted_ones(sana) -> None:
    assert FAMILIES["sana"].latent_rgb_factors is None
    factors, bias = latent_rgb(sana)
    assert factors.shape == (32, 3) and bias.shape == (3,)
    assert torch.isfinite(factors).all() and factors.abs().sum() > 0  # not the flat grey of all-zero factors
    # its previews follow the picture they were encoded from (a picture the fit never saw)
    pic = _scene(64)
    latents = vae_sampling_latents(sana.vae, pic)  # (1, 32, 8, 8)
    preview = latent_to_rgb(latents, factors, bias).permute(0, 3, 1, 2)  # (1, 3, 8, 8)
    assert _corr(preview, F.adaptive_avg_pool2d(pic, 8)) > 0.5


def test_the_fit_is_cached_per_vae_weakly_and_leaves_the_pipeline_alone(sana) -> None:
    state = {k: v.clone() for k, v in sana.vae.state_dict().items()}
    attrs = set(vars(sana)) | set(vars(sana.vae))
    rng = torch.random.get_rng_state()
    first = fitted_latent_rgb(sana.vae, vae_scale_factor(sana))
    assert fitted_latent_rgb(sana.vae, vae_scale_factor(sana)) is first  # fitted once per VAE
    a, b = latent_rgb(sana), latent_rgb(sana)
    assert torch.equal(a[0], b[0]) and a[0] is not first[0]  # callers get copies, free to edit
    assert torch.equal(
        torch.random.get_rng_state(), rng
    )  # no random state drawn: a run's result is unchanged
    assert set(vars(sana)) | set(vars(sana.vae)) == attrs
    assert all(torch.equal(v, state[k]) for k, v in sana.vae.state_dict().items())
    other = copy.deepcopy(sana.vae)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    assert not torch.equal(fitted_latent_rgb(other, vae_scale_factor(sana))[0], first[0])  # its own fit
    n = len(_FITTED_RGB)
    del other
    gc.collect()
    assert len(_FITTED_RGB) == n - 1  # the weak map lets a dropped VAE go


@pytest.mark.parametrize("name", ["sd1", "sd3", "flux2", "wan", "qwen-image"])
def test_published_factors_are_kept_bit_for_bit(name) -> None:
    pipe = tiny_pipeline(name)
    fam = FAMILIES[name]
    factors, bias = latent_rgb(pipe)
    assert torch.equal(factors, torch.tensor(fam.latent_rgb_factors, dtype=torch.float32))
    assert torch.equal(bias, torch.tensor(fam.latent_rgb_bias, dtype=torch.float32))
    assert pipe.vae not in _FITTED_RGB  # nothing fitted


def test_the_method_matches_the_shipped_factors_on_the_embedded_vae() -> None:
    """The embedded model's VAE is trained: factors fitted by this method preview a scene nearly as well as the
    factors fitted on its own training scenes (latent_rgb.json; 0.75 against 0.79 here). A scale or channel order
    gone wrong drops the correlation to nothing."""
    pipe = sdx.load_pipeline()
    cell = vae_scale_factor(pipe)
    fitted = fitted_latent_rgb(pipe.vae, cell)
    shipped = latent_rgb(pipe)
    pic = _scene(8 * cell * 2)
    latents = vae_sampling_latents(pipe.vae, pic)
    target = F.adaptive_avg_pool2d(pic, latents.shape[-2:])
    ours = _corr(latent_to_rgb(latents, *fitted).permute(0, 3, 1, 2), target)
    theirs = _corr(latent_to_rgb(latents, *shipped).permute(0, 3, 1, 2), target)
    assert ours > 0.7 and ours > theirs - 0.1, (ours, theirs)


def test_swatches_are_deterministic_and_the_least_squares_fit_recovers_known_factors() -> None:
    a, b = preview_swatches(64, 8), preview_swatches(64, 8)
    assert torch.equal(a, b) and a.shape[1:] == (3, 64, 64) and a.min() >= -1 and a.max() <= 1
    gen = torch.Generator().manual_seed(1)
    true, shift = 0.1 * torch.randn(6, 3, generator=gen), torch.tensor([0.1, -0.2, 0.3])
    latents = torch.randn(20, 6, 4, 4, generator=gen)
    images = latent_to_rgb(latents, true, shift).permute(0, 3, 1, 2)  # (20, 3, 4, 4), clamped
    keep = images.abs().amax((1, 2, 3)) < 1  # the unclamped ones: an exact linear map
    f, c = fit_linear_preview(latents[keep], images[keep], ridge=0.0)
    assert torch.allclose(f, true, atol=1e-4) and torch.allclose(c, shift, atol=1e-4)


@pytest.mark.parametrize("name", ["sd3", "flux2", "wan", "qwen-image", "sana"])
def test_the_fit_runs_on_every_kind_of_vae(name) -> None:
    """Scaled and shifted (SD3), batch-norm over 2×2 patches (Flux.2), 3-D with per-channel statistics (Wan,
    Qwen-Image), a DC-AE (Sana): sampling-space latents of the family's channels, as the pipelines make them."""
    from sdexplore.images import encode_image

    pipe = tiny_pipeline(name)
    cell = vae_scale_factor(pipe)
    pic = _scene(8 * cell)
    latents = vae_sampling_latents(pipe.vae, pic)
    assert latents.shape == (1, FAMILIES[name].latent_channels, 8, 8)
    if name in ("sd3", "flux2"):  # the picture encoders sdexplore.invert uses agree
        pixels = ((pic[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
        want = encode_image(pipe, pixels, height=8 * cell, width=8 * cell).float()
        read = (
            torch.from_numpy(pixels).float().permute(2, 0, 1)[None] / 127.5 - 1
        )  # the picture as it reads it
        assert torch.allclose(vae_sampling_latents(pipe.vae, read), want, atol=1e-5)
    factors, bias = fitted_latent_rgb(copy.deepcopy(pipe.vae), cell)
    assert factors.shape == (FAMILIES[name].latent_channels, 3) and torch.isfinite(factors).all()
