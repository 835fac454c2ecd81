"""Draw the documentation gallery from the embedded model: a denoising strip, heat maps per word, a walk GIF.

``python scripts/docs_gallery.py OUT_DIR`` writes ``denoising.png``, ``attention_words.png``, ``walk.gif`` and
``gallery.md`` (the page, with what was drawn and how long it took) into OUT_DIR. A few seconds on 2 CPU cores.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

PROMPT = "a big green triangle at the bottom right on a white background"
WALK_PROMPTS = (
    "a big red circle at the top left on a blue background",
    "a big yellow square at the bottom right on a purple background",
)
STEPS = 20  # denoising steps: the embedded model is good at 20, and the gallery stays a few seconds
STRIP = 6  # steps shown in the denoising strip
WALK_FRAMES = 12
PIXELS = 256  # every picture is enlarged (nearest neighbour) to at least this side: 128-px images are small


def _atomic_save(save, path: Path) -> None:
    """Call ``save(tmp)`` then move the file into place, so a half-written picture never lands."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    save(tmp)
    tmp.replace(path)


def build(out: Path) -> dict[str, float]:
    """Render the three pictures and the page into ``out``; returns seconds per picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    import sdexplore as sdx
    from sdexplore.views.export import save_gif
    from sdexplore.views.plots.attention import word_overlay
    from sdexplore.views.render import decode_steps, spread, trace_preview, upscale

    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    pipe = sdx.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    seconds["load"] = time.perf_counter() - t0

    # one image, observed: every step (x0 kept for decoding) and the cross-attention maps
    t0 = time.perf_counter()
    with sdx.observe(pipe, steps=True, attention=True) as obs:
        image = pipe(
            PROMPT,
            num_inference_steps=STEPS,
            guidance_scale=sdx.EMBEDDED_GUIDANCE_SCALE,
            generator=torch.Generator("cpu").manual_seed(0),
        ).images[0]
    trace, maps = obs.steps, obs.attention
    positions = spread(len(trace), STRIP)
    x0s = decode_steps(pipe.vae, trace, positions)  # (H, W, 3) uint8 each
    rows = [
        ("noisy latents $x_t$\n(linear preview)", [trace_preview(trace, p, "latents") for p in positions]),
        ("predicted $\\hat{x}_0$\n(VAE decode)", x0s),
    ]
    fig, axes = plt.subplots(2, len(positions), figsize=(1.9 * len(positions) + 0.6, 2 * 2.1), squeeze=False)
    for r, (label, pics) in enumerate(rows):
        for c, (pos, pic) in enumerate(zip(positions, pics, strict=True)):
            ax = axes[r, c]
            ax.imshow(pic, interpolation="nearest")
            ax.set_xticks([])  # keep the frame: white pictures on a white page need one
            ax.set_yticks([])
            if r == 0:
                ax.set_title(
                    f"step {trace[pos].index + 1}/{len(trace)}\nt = {float(trace[pos].timestep):.0f}",
                    fontsize=9,
                )
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.tight_layout()
    _atomic_save(lambda p: fig.savefig(p, dpi=110), out / "denoising.png")
    plt.close(fig)
    seconds["denoising"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    words = ["big", "green", "triangle", "bottom", "right", "white", "background"]
    cols = (len(words) + 2) // 2  # the image, then the words, on two rows
    fig, axes = plt.subplots(2, cols, figsize=(2.4 * cols, 2 * 2.6), squeeze=False)
    panels = [("image", np.asarray(image))] + [(f"“{w}”", word_overlay(maps, w)) for w in words]
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, (title, pic) in zip(axes.flat, panels, strict=False):
        ax.imshow(pic, interpolation="bilinear")
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    _atomic_save(lambda p: fig.savefig(p, dpi=110), out / "attention_words.png")
    plt.close(fig)
    seconds["attention"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    w = sdx.walk(
        pipe,
        list(WALK_PROMPTS),
        seeds=[0, 1],
        frames=WALK_FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=sdx.EMBEDDED_GUIDANCE_SCALE,
        progress=False,
    )
    frames = np.stack([upscale(f, PIXELS) for f in w.images])  # (N, 256, 256, 3)
    save_gif(frames, out / "walk.gif", fps=6, rubber=True)  # written atomically by sdexplore.views.export
    seconds["walk"] = time.perf_counter() - t0

    page = PAGE.format(
        prompt=PROMPT,
        steps=STEPS,
        strip=len(positions),
        frames=WALK_FRAMES,
        a=WALK_PROMPTS[0],
        b=WALK_PROMPTS[1],
        guidance=sdx.EMBEDDED_GUIDANCE_SCALE,
        size=f"{image.size[0]}×{image.size[1]}",
        timing=", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
        threads=torch.get_num_threads(),
    )
    _atomic_save(lambda p: p.write_text(page, encoding="utf-8"), out / "gallery.md")
    return seconds


PAGE = """# Gallery

Drawn from the embedded tiny model by `scripts/docs_gallery.py` at every build of this site (CPU, {threads}
thread(s): {timing}). Prompt: *"{prompt}"*, seed 0, {steps} DDIM steps, guidance {guidance:g}; images are
{size} pixels, shown enlarged.

## Denoising, step by step

![The noisy latents and the predicted clean image at {strip} of the {steps} steps](denoising.png)

*{strip} of the {steps} steps, from pure noise (left) to the final image (right). Top: the noisy latents x_t
through the free linear latent→RGB preview (one pixel per latent cell). Bottom: the model's guess of the
finished image at that step (x̂0, VAE-decoded after the run). `sdx.observe(pipe, steps=True)`,
`sdexplore.views.render.trace_preview` and `sdexplore.views.render.decode_steps`.*

## Cross-attention, one heat map per word

![The image and each word's cross-attention map over it](attention_words.png)

*Where each word of the prompt attends, averaged over steps, layers and heads, beside the generated image (top left):
`sdx.observe(pipe, attention=True)` and `sdexplore.views.plots.attention.word_overlay` (the blend of `plot_words`). Each map is stretched to the
whole colour map, so it shows where a word looks, not how strongly.*

## A walk between two prompts

![A walk from the first prompt and seed to the second](walk.gif)

*{frames} frames from "{a}" (seed 0) to "{b}" (seed 1), prompt embeddings and noise slerped, played forward
then back: `sdx.walk(...)` and `sdexplore.views.export.save_gif`.*
"""


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: one argument, the output folder."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: docs_gallery.py OUT_DIR", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # on a shared 2-core box, spinning OpenMP pools cost 10-30x
    seconds = build(Path(args[0]))
    print("gallery:", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
