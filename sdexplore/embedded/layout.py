"""When does a model decide the layout? Its predicted clean image x0, decoded step by step, and where it departs
from its background.

A model that has learned place puts that departure in the prompt's 3×3 cell from the first steps on (at
t = 999, with zero terminal SNR, x0 is the model's mean picture for the prompt); one that has not draws a
background only at first and lets the shape grow wherever the noise starts one. ``scripts/diagnose_layout.py``
is its command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from . import scenes

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

#: The sampling steps the grid shows (then the final image).
SHOW_STEPS = (0, 2, 5, 10)


@torch.no_grad()
def layout_probe(
    pipe: StableDiffusionPipeline, template: str, seeds: int = 3, steps: int = 25
) -> tuple[list[float], np.ndarray]:
    """Generate the 9 places of ``template`` (a prompt with ``{place}``; ``seeds`` seeds each, CFG 7.5) recording
    x0 at every step (:func:`sdexplore.generate`).

    Returns, per sampling step, the fraction of (place, seed) runs whose decoded x0 departs from its median
    colour in the prompt's cell (the last entry: the final image); and a uint8 grid image (rows: the
    :data:`SHOW_STEPS` below ``steps``, then the final image; columns: places; first seed).
    """
    from .. import generate  # the public name (resolved lazily by sdexplore/__init__.py)

    places = list(scenes.PLACES)
    prompts = [template.format(place=p) for p in places]
    hits = np.zeros(steps + 1)
    rows: list[np.ndarray] = []
    for seed in range(seeds):
        gens = [torch.Generator().manual_seed(1000 * seed + k) for k in range(len(places))]
        images, obs = generate(
            pipe,
            prompts,
            steps={"quantities": ("x0",)},
            generator=gens,
            num_inference_steps=steps,
            guidance_scale=7.5,
            output_type="np",
        )
        per_step = [decode_x0(pipe, rec.x0) for rec in obs.steps] + [np.asarray(images) * 255.0]
        for i, decoded in enumerate(per_step):  # decoded: (9, H, W, 3) float 0..255
            hits[i] += sum(departure_place(decoded[k]) == place for k, place in enumerate(places))
        if seed == 0:
            rows = [per_step[i] for i in SHOW_STEPS if i < steps] + [per_step[-1]]
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)  # (R·H, 9·W, 3)
    return list(hits / (len(places) * seeds)), grid.round().clip(0, 255).astype(np.uint8)


def decode_x0(pipe: StableDiffusionPipeline, x0: torch.Tensor) -> np.ndarray:
    """x0 latents (B, C, h, w) → images (B, H, W, 3) float 0..255."""
    vae = pipe.vae
    images = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1)
    return ((images.float() + 1) * 127.5).permute(0, 2, 3, 1).numpy()


def departure_place(image: np.ndarray) -> str:
    """The 3×3 cell of the colour-difference centroid from the image's median colour (the background covers
    most of the picture; an early x0 often has a dark rim, so the border is no guide); ``"none"`` for a flat
    image. ``image`` (H, W, 3) float 0..255."""
    h, w, _ = image.shape
    diff = np.linalg.norm(image - np.median(image.reshape(-1, 3), axis=0), axis=-1)  # (H, W)
    diff = np.clip(diff - diff.mean(), 0, None)
    if diff.sum() == 0:
        return "none"
    ys, xs = np.mgrid[0:h, 0:w]
    cy, cx = (diff * ys).sum() / diff.sum() + 0.5, (diff * xs).sum() / diff.sum() + 0.5
    return scenes.grid_place(cx, cy, w, h)  # the scorer's grid
