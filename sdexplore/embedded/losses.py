"""The training losses of the embedded model (VAE reconstruction, UNet v-prediction) and its training timesteps.

Both losses can weight the shape: plain MSE spends almost all of its gradient on the large, easy background,
while the kind of a 10-pixel shape (circle, square, triangle) is a few pixels at its edge.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def shape_weight_map(coverage: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weight: 1 on the background, 1 + ``weight`` on the shape and a one-latent-pixel
    ring around it (where circle, square and triangle differ), normalised to mean 1 per image.

    ``coverage`` (B, 1, 64, 64), or already at latent resolution (B, 1, 16, 16) as the latent pool keeps it,
    → (B, 1, 16, 16).
    """
    small = F.adaptive_avg_pool2d(coverage.float(), 16)  # (B, 1, 16, 16); 4×4 means at 64×64
    near = F.max_pool2d(small, 3, stride=1, padding=1)  # (B, 1, 16, 16): dilated by one latent pixel
    w = 1 + weight * near
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


def diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, coverage: torch.Tensor, shape_weight: float
) -> torch.Tensor:
    """Phase 2's loss: MSE of the v-prediction, or with ``shape_weight`` > 0 weighted by
    :func:`shape_weight_map`. ``pred``/``target`` (B, 4, 16, 16), ``coverage`` (B, 1, 64, 64) or (B, 1, 16, 16)."""
    if not shape_weight:
        return F.mse_loss(pred, target)
    err = (pred - target).pow(2)  # (B, 4, 16, 16)
    return (err * shape_weight_map(coverage, shape_weight)).mean()


def pixel_loss(
    decoded: torch.Tensor, target: torch.Tensor, coverage: torch.Tensor, shape_weight: float
) -> torch.Tensor:
    """MSE of decoded images, weighted as :func:`diffusion_loss` weights latents (each latent pixel's weight
    spread over its 4×4 image pixels). ``decoded``/``target`` (B, 3, 64, 64), ``coverage`` (B, 1, 16, 16) or
    (B, 1, 64, 64).

    The latent loss treats every latent channel alike, but the decoder turns some latent errors into rounded
    corners and others into nothing: a square read as a circle can have a small latent error. This term
    measures the error where the kinds differ, after the decoder."""
    err = (decoded - target).pow(2)  # (B, 3, 64, 64)
    if not shape_weight:
        return err.mean()
    w = F.interpolate(shape_weight_map(coverage, shape_weight), size=err.shape[-2:], mode="nearest")
    return (err * w).mean()  # w: (B, 1, 64, 64), mean 1 per image


def reconstruction_loss(
    recon: torch.Tensor, images: torch.Tensor, coverage: torch.Tensor, shape_weight: float
) -> torch.Tensor:
    """Phase 1's reconstruction term: MSE, or with ``shape_weight`` > 0, L1 + MSE weighted 1 + ``shape_weight``
    on the shape and a 2-pixel ring around it. Images (B, 3, 64, 64), coverage (B, 1, 64, 64)."""
    if not shape_weight:
        return F.mse_loss(recon, images)
    near = F.max_pool2d(coverage.float(), 5, stride=1, padding=2)  # (B, 1, 64, 64): shape + 2-px ring
    err = recon - images
    return ((1 + shape_weight * near) * (err.abs() + err**2)).mean()


def sample_timesteps(
    n: int,
    high_noise: float,
    device: torch.device,
    generator: torch.Generator,
    num_timesteps: int = 1000,
) -> torch.Tensor:
    """Training timesteps (n,): uniform over 0..num_timesteps-1, except a ``high_noise`` fraction drawn from the
    upper half.

    The layout of a scene (where the shape goes, which colour and kind it is) is decided in the first, noisiest
    sampling steps; small budgets (a CPU) learn place faster when those steps get more of the batch.
    """
    T = num_timesteps
    t = torch.randint(0, T, (n,), device=device, generator=generator)
    if high_noise > 0:
        upper = torch.randint(T // 2, T, (n,), device=device, generator=generator)
        pick = torch.rand(n, device=device, generator=generator) < high_noise
        t = torch.where(pick, upper, t)
    return t


def sample_flow_sigmas(
    n: int, shift: float, mean: float, std: float, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """Flow-matching noise levels s (n,) in (0, 1): logit-normal (SD3's ``mean``, ``std``), then shifted as
    ``FlowMatchEulerDiscreteScheduler(shift=...)`` shifts its sigmas: s' = shift·s / (1 + (shift − 1)·s)."""
    s = torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
    return shift * s / (1 + (shift - 1) * s)


def flow_matching_pair(
    x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow: the noisy input x_s = (1 − s)·x0 + s·ε and the velocity target v = ε − x0 (what SD3's
    transformer predicts; the Euler sampler steps x ← x + (s_next − s)·v). ``x0``/``noise`` (B, C, H, W),
    ``sigmas`` (B,)."""
    s = sigmas.view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    return (1 - s) * x0 + s * noise, noise - x0


def attention_localisation_loss(
    text_probs: list[torch.Tensor], word_index: torch.Tensor, coverage: torch.Tensor
) -> torch.Tensor:
    """KL(shape coverage ‖ the shape word's joint-attention map), for images whose caption names a shape.

    ``text_probs``: one (B, heads, N, T) tensor per joint block, the image queries' softmax probabilities on the
    T text keys (N = n×n image tokens in raster order); ``word_index`` (B,): the shape word's position in the
    caption, −1 where the caption has none (dropped for classifier-free guidance); ``coverage`` (B, 1, 16, 16)
    at latent resolution. The map is the probability on the word averaged over heads and blocks, as
    :func:`~sdexplore.embedded.evaluate.shape_word_maps` reads it, normalised over the image; the target is the
    coverage pooled to the token grid, normalised the same way. 0 when no image in the batch names a shape.
    """
    probs = torch.stack([p.mean(dim=1) for p in text_probs]).mean(dim=0)  # (B, N, T)
    b, n_tokens, _ = probs.shape
    side = int(round(n_tokens**0.5))
    valid = word_index >= 0
    if not bool(valid.any()):
        return probs.sum() * 0.0
    index = word_index.clamp(min=0)[:, None, None].expand(b, n_tokens, 1)  # (B, N, 1)
    word = probs.gather(2, index)[..., 0]  # (B, N)
    target = F.adaptive_avg_pool2d(coverage.float(), side).flatten(1)  # (B, N)
    valid = valid & (target.sum(dim=1) > 0)
    p = word / word.sum(dim=1, keepdim=True).clamp_min(1e-12)  # (B, N)
    q = target / target.sum(dim=1, keepdim=True).clamp_min(1e-12)  # (B, N)
    kl = (q * (torch.log(q.clamp_min(1e-12)) - torch.log(p.clamp_min(1e-12)))).sum(dim=1)  # (B,)
    return (kl * valid).sum() / valid.sum().clamp_min(1)
