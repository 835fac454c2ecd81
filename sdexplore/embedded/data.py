"""The embedded model's training data: scenes rendered on the training device from sampled parameters (nothing
is stored), the phase-2 latent pool, and the tokenised prompt table."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import scenes

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


def autocast(device: torch.device) -> AbstractContextManager:
    """bf16 autocast on CUDA; nothing on the CPU (fp32 there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def render(
    n: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, scenes.SceneBatch]:
    """Sample ``n`` training scenes (with a CPU ``generator``, so a seed means the same scenes anywhere) and
    draw them on ``device``: images (n, 3, 64, 64) in [-1, 1], shape coverage (n, 1, 64, 64) in [0, 1], and
    the scenes."""
    batch = scenes.sample_scenes(n, generator, device=device)
    images, coverage = scenes.render_batch(batch)
    return images, coverage, batch


def validation_images(n: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The first ``n`` scenes of ``validation_scenes(n, seed)`` drawn on ``device``: (n, 3, 64, 64) in [-1, 1]."""
    images, _ = scenes.render_batch(scenes.validation_scenes(n, seed=seed).to(device))
    return images


@torch.no_grad()
def latent_pool(
    vae: AutoencoderKL, n: int, generator: torch.Generator, device: torch.device, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Render ``n`` training scenes once and keep their VAE posteriors: mean (n, 4, 16, 16), std (n, 4, 16, 16),
    prompt index (n,), and coverage at latent resolution (n, 1, 16, 16) for the shape-weighted loss.

    Phase 2 then samples minibatches from the pool (drawing a fresh posterior sample each time) instead of
    running the frozen VAE encoder every step; on a 2-core CPU that removes about a fifth of a step's time.
    """
    means, stds, index, covers = [], [], [], []
    for start in range(0, n, chunk):
        images, coverage, batch = render(min(chunk, n - start), generator, device)
        dist = vae.encode(images).latent_dist
        means.append(dist.mean.float())  # (b, 4, 16, 16)
        stds.append(dist.std.float())  # (b, 4, 16, 16)
        index.append(batch.prompt_index())
        covers.append(F.adaptive_avg_pool2d(coverage, 16))  # (b, 1, 16, 16): a 16th of the memory
    return torch.cat(means), torch.cat(stds), torch.cat(index), torch.cat(covers)


def tokenised_prompts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every prompt of :func:`~sdexplore.embedded.scenes.prompt_table`, (11664, 77), and of the
    empty caption "" (77,), on ``device``: a batch's captions are rows picked by its scenes' prompt index."""
    from ..tokenizer import clip_tokenizer

    tokenizer = clip_tokenizer()
    table = scenes.prompt_table()
    ids = tokenizer(table, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    return ids.input_ids.to(device), empty.to(device)
