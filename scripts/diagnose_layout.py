"""Where does the embedded model decide the layout? Its predicted clean image x0, step by step.

Generates the 9 places of one prompt template (a few seeds each, 25 DDIM steps, CFG 7.5) inside
``sdexplore.observe`` recording x0 at every step, decodes x0, and finds where it departs from its own
median colour (the weighted centroid of the colour difference). A model that has learned place puts that departure
in the prompt's 3×3 cell from the first steps on (at t = 999, with zero terminal SNR, x0 is the model's mean
picture for the prompt); one that has not draws a background only at first and lets the shape grow wherever the
noise starts one, and place is at chance in the final images. Prints the fraction of places right per step and
writes a PNG (rows: a few steps, then the final image; columns: places; first seed).

    python scripts/diagnose_layout.py [model folder] --out runs/layout.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

import sdexplore as sdx
from sdexplore import scenes

REPO = Path(__file__).resolve().parents[1]
SHOW_STEPS = (0, 2, 5, 10)


@torch.no_grad()
def layout_probe(
    pipe: StableDiffusionPipeline, template: str, seeds: int = 3, steps: int = 25
) -> tuple[list[float], np.ndarray]:
    """Per sampling step, the fraction of (place, seed) runs whose decoded x0 departs from its median colour in
    the prompt's cell (the last entry: the final image); and a uint8 grid image (SHOW_STEPS + final × places)."""
    places = list(scenes.PLACES)
    prompts = [template.format(place=p) for p in places]
    hits = np.zeros(steps + 1)
    rows: list[np.ndarray] = []
    for seed in range(seeds):
        gens = [torch.Generator().manual_seed(1000 * seed + k) for k in range(len(places))]
        images, obs = sdx.generate(
            pipe,
            prompts,
            steps={"quantities": ("x0",)},
            generator=gens,
            num_inference_steps=steps,
            guidance_scale=7.5,
            output_type="np",
        )
        per_step = [_decode(pipe, rec.x0) for rec in obs.steps] + [np.asarray(images) * 255.0]
        for i, decoded in enumerate(per_step):  # decoded: (9, H, W, 3) float 0..255
            hits[i] += sum(_departure_place(decoded[k]) == place for k, place in enumerate(places))
        if seed == 0:
            rows = [per_step[i] for i in SHOW_STEPS if i < steps] + [per_step[-1]]
    grid = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)  # (R·H, 9·W, 3)
    return list(hits / (len(places) * seeds)), grid.round().clip(0, 255).astype(np.uint8)


def _decode(pipe: StableDiffusionPipeline, x0: torch.Tensor) -> np.ndarray:
    """x0 latents (B, C, h, w) → images (B, H, W, 3) float 0..255."""
    vae = pipe.vae
    images = vae.decode(x0.to(vae.dtype) / vae.config.scaling_factor).sample.clamp(-1, 1)
    return ((images.float() + 1) * 127.5).permute(0, 2, 3, 1).numpy()


def _departure_place(image: np.ndarray) -> str:
    """The 3×3 cell of the colour-difference centroid from the image's median colour (the background covers
    most of the picture; an early x0 often has a dark rim, so the border is no guide)."""
    h, w, _ = image.shape
    diff = np.linalg.norm(image - np.median(image.reshape(-1, 3), axis=0), axis=-1)  # (H, W)
    diff = np.clip(diff - diff.mean(), 0, None)
    if diff.sum() == 0:
        return "none"
    ys, xs = np.mgrid[0:h, 0:w]
    cy, cx = (diff * ys).sum() / diff.sum() + 0.5, (diff * xs).sum() / diff.sum() + 0.5
    return scenes.grid_place(cx, cy, w, h)  # the scorer's grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default=str(REPO / "sdexplore" / "models" / "tiny-shapes"))
    parser.add_argument("--template", default="a big red circle at the {place} on a white background")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "runs" / "layout.png"))
    args = parser.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    right, grid = layout_probe(pipe, args.template, seeds=args.seeds)
    for i, frac in enumerate(right[:-1]):
        print(f"step {i:2d}: place right in x0 for {100 * frac:3.0f}% (chance 11%)")
    print(f"final image: place right for {100 * right[-1]:.0f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
