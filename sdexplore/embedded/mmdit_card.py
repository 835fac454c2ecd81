"""tiny-shapes-mmdit's card: ``MODEL_CARD.md`` from the evaluation's numbers and ``training.json``, every bar
of issue 18 with its figure, met or not."""

from __future__ import annotations

import json
from pathlib import Path

from . import scenes

#: The bars tiny-shapes-mmdit is held to (fractions; IoU mean; seconds per 64×64 image on 2 CPU threads).
MMDIT_BARS = {
    "colour": 0.95,
    "place": 0.95,
    "background": 0.95,
    "shape": 0.90,
    "every kind": 0.85,
    "attention_iou": 0.55,
}
MMDIT_MAX_CPU_SECONDS = 1.0

#: What was tried on the way to the shipped weights, oldest first: (change, shape, squares, IoU, what it showed),
#: each measured on the 216 held-out prompts at 20 steps, CFG 4 unless said, on the 2-core CPU (4,000-step runs took about
#: 70 min each, two side by side on one thread each). The card's "What was tried" table.
TRIED: list[tuple[str, str, str, str, str]] = [
    (
        "2×2 patches, flow shift 2, 8,000 steps (shipped 2026-11-30)",
        "76.9%",
        "33%",
        "0.409",
        "squares come out round",
    ),
    ("the same weights, 50 sampling steps", "75.5%", "31%", "0.408", "sampling is not the cause"),
    ("the same weights, sampler shift 1", "75.9%", "31%", "0.411", ""),
    ("`--patch 1` (a token per latent pixel), flow shift 2, 4,000 steps", "80.1%", "44%", "0.170", ""),
    (
        "`--patch 1 --flow-shift 1`, 4,000 steps",
        "87.5%",
        "64%",
        "0.152",
        "sharper squares; the shape word's map is a faint grid over the whole image",
    ),
    (
        "`--patch 1 --flow-shift 1 --attention-weight 0.05` (pooled vector kept), stopped at 2,700 of 4,000 steps",
        "70% (27 prompts, 1,400 steps)",
        "11%",
        "0.713",
        "the attention loss puts the maps on the shapes; not shipped: its maps would be partly trained",
    ),
    (
        "`--patch 1 --flow-shift 1 --no-pooled`, 4,400 steps (these weights)",
        "80.6%",
        "44%",
        "0.627",
        "without the pooled vector the prompt must go through joint attention: the maps sit on the shapes",
    ),
    (
        "these weights at CFG 3 (best on the tuning set; the recommended scale)",
        "88.0%",
        "64%",
        "0.632",
        "lower guidance draws straighter square edges",
    ),
    (
        "`--no-pooled` runs with `--flow-shift 0.5`, and with `--shape-weight 30`",
        "",
        "",
        "",
        "stopped at 1,650 of 4,000 steps for the session's time: no conclusion",
    ),
    (
        "these flags with `--threads 2 --steps 7800` (the same recipe, longer)",
        "",
        "9 of 16 (these weights: 10 of 16 in the same check)",
        "",
        "read on the first 16 held-out square prompts only, at CFG 3: straighter sides, but tapered",
    ),
    (
        "these flags with `--square-boost 2` (squares drawn twice as often), 4,400 steps, CFG 3",
        "87.0%",
        "65%",
        "0.550",
        "circles 97%, triangles 99%: more squares in training trade the other kinds for them; best scale on "
        "the tuning set still 3 (shape 85.2% there, these weights 90.7%)",
    ),
    (
        "these flags with `--square-boost 2 --pixel-weight 20` (a pixel loss through the frozen decoder), "
        "2,955 steps, CFG 3",
        "66.2%",
        "43%",
        "0.564",
        "worse on every kind and on place (88%); the weight and the fewer steps (1.69 s per step against 1.37 "
        "for the run beside it) were not told apart",
    ),
]


def per_kind(rows: list[dict]) -> dict[str, float]:
    """Fraction of images whose kind of shape was read right, per kind the prompt asked for."""
    out = {}
    for kind in scenes.SHAPES:
        hits = [r["shape"] for r in rows if scenes.parse_prompt(r["prompt"]).shape == kind]
        out[kind] = sum(hits) / len(hits) if hits else float("nan")
    return out


def figures(result: dict) -> dict[str, float]:
    """Each bar's measured figure (``every kind``: the worst kind)."""
    kinds = [v for v in per_kind(result["rows"]).values() if v == v]  # kinds the prompts asked for (not NaN)
    return {**result["scores"], "every kind": min(kinds), "attention_iou": result["attention_iou"]}


def _text_paths(train: dict) -> str:
    """The card's sentences on how the prompt reaches the image (the pooled vector, an attention loss)."""
    pooled = (
        "The pooled text vector is ignored (`--no-pooled`: its projection's input weights are zero and frozen), "
        "so the prompt reaches the image only through joint attention."
        if train.get("pooled") is False
        else "The pooled text vector modulates every block (AdaLN), as in SD3."
    )
    weight = train.get("attention_weight") or 0.0
    if not weight:
        return pooled + " The loss is flow matching alone: nothing trains the attention maps directly."
    return (
        f"{pooled} An auxiliary loss (`--attention-weight {weight:g}`) pulls the shape word's joint-attention map "
        "onto the drawn shape: the KL divergence of the shape's coverage (pooled to the token grid) to the "
        "word's map (its probability in the joint softmax, mean over blocks and heads, normalised over the "
        "image), on a quarter of each batch. The maps below are therefore partly trained: the IoU figure "
        "measures how well that holds on held-out prompts, read at inference by sdexplore's own recorder."
    )


def mmdit_model_card(folder: Path, result: dict) -> str:
    """The card's Markdown for the MMDiT folder ``folder``, from :func:`~.evaluate.run_eval`'s ``result``."""
    train = json.loads((Path(folder) / "training.json").read_text())
    transformer = json.loads((Path(folder) / "transformer" / "config.json").read_text())
    fig = figures(result)
    kinds = per_kind(result["rows"])
    cpu = result["cpu_seconds_per_image"]

    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    rows = [
        f"| {k.replace('_', ' ')} | {fig[k]:.3f} | ≥ {bar} | {mark(fig[k] >= bar)} (by {fig[k] - bar:+.3f}) |"
        for k, bar in MMDIT_BARS.items()
    ]
    rows.append(
        f"| CPU s/image (2 threads, median) | {cpu['median']:.2f} | ≤ {MMDIT_MAX_CPU_SECONDS} | "
        f"{mark(cpu['median'] <= MMDIT_MAX_CPU_SECONDS)} (load {cpu['load']}) |"
    )
    missed = [k for k, bar in MMDIT_BARS.items() if fig[k] < bar]
    if cpu["median"] > MMDIT_MAX_CPU_SECONDS:
        missed.append("CPU speed")
    status = (
        "**Status:** meets every bar on the held-out prompts."
        if not missed
        else f"**Status: partly trained.** Misses {', '.join(missed)} (table below); the transformer saw "
        f"{train.get('steps', 0) * train['batch']:,} training samples, all the CPU time it had."
    )
    kind_line = ", ".join(f"{k} {100 * v:.1f}%" for k, v in kinds.items())
    sd = result.get("at_sd_guidance")
    sd_line = (
        ""
        if not sd
        else f"At CFG {sd['guidance_scale']} (diffusers' SD3 default): "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in sd["scores"].items())
        + f", attention IoU {sd['attention_iou']:.3f}."
    )
    grid = "\n".join(f"| {r['prompt']} | {r['read']} |" for r in result.get("grid", []))
    text_paths = _text_paths(train)
    tried = "\n".join(f"| {' | '.join(row)} |" for row in TRIED)
    params = train["params"]
    return f"""# tiny-shapes-mmdit: the embedded MMDiT model of sdexplore

A tiny SD3-style text-to-image model (MMDiT transformer, rectified flow) trained on the same little world as
tiny-shapes, shipped inside the package (`sdexplore/models/tiny-shapes-mmdit/`) so that sdexplore's SD3 paths
(steps, joint-attention maps, steering) can be tested for meaning offline. A plain diffusers folder:
`StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)` loads it (diffusers
asks for the absent T5 to be named), and so does `sdexplore.load_pipeline("tiny-shapes-mmdit")`.

{status}

![samples](sample_grid.png)

## Use

```python
import sdexplore as sdx

pipe = sdx.load_pipeline("tiny-shapes-mmdit")
image = pipe("a big red circle at the top left on a blue background",
             num_inference_steps={result["steps"]}, guidance_scale={result["guidance_scale"]}).images[0]
```

Recommended: {result["steps"]} steps of the saved `FlowMatchEulerDiscreteScheduler` (shift {train["shift"]}),
guidance scale {result["guidance_scale"]} (`sdexplore.embedded.model.MMDIT_STEPS`, `MMDIT_GUIDANCE_SCALE`).

## Why SD3 (and not Flux)

SD3's pipeline runs without T5 (`text_encoder_3=None`: zeros take T5's place in the joint sequence), on two
CLIP encoders, so the model uses the real CLIP tokenizer and starts its first CLIP from tiny-shapes' trained text
encoder; Flux needs T5 for its whole text sequence. The VAE is tiny-shapes' (4 latent channels: the SD3 pipeline
takes the channel count from the transformer), with SD3's `shift_factor` set to its latent mean.

## Architecture

| part | class | parameters |
| --- | --- | --- |
| transformer | `SD3Transformer2DModel`, 16×16×{transformer["in_channels"]} latents, {transformer["patch_size"]}×{transformer["patch_size"]} patches, {transformer["num_layers"]} joint blocks, {transformer["num_attention_heads"]} heads × {transformer["attention_head_dim"]} | {params["transformer"]:,} |
| text encoder | `CLIPTextModelWithProjection`, hidden 64, from tiny-shapes' | {params["text_encoder"]:,} |
| text encoder 2 | `CLIPTextModelWithProjection`, hidden 16, 2 layers | {params["text_encoder_2"]:,} |
| VAE | tiny-shapes' `AutoencoderKL` (frozen), 64×64×3 ↔ 16×16×4 | {params["vae"]:,} |

All weights: {result["weights_mb"]:.1f} MB (bar ≤ 25 MB).

## Training

Rectified flow on tiny-shapes' VAE latents: x_s = (1 − s)·x0 + s·ε, target v = ε − x0, s logit-normal
({train["logit_normal"][0]}, {train["logit_normal"][1]}) shifted by {train["shift"]} (the scheduler's shift);
{train["latent_pool"]:,} pre-encoded scenes, 10% captions dropped to "", loss weighted {1 + train["shape_weight"]:g}×
on the shape and its edge, AdamW lr {train["lr"]} warmup + cosine, batch {train["batch"]}, EMA {train["ema"]}.
{train.get("steps", 0):,} steps, {train["seconds"]["transformer"]:.0f} s on {train["machine"]}.
Final training loss (smoothed) {train.get("final_loss") or float("nan"):.4f}.
{text_paths}
Training attends to the 256 zero T5 rows as one row whose logit carries +log 256, which is exactly the
pipeline's attention over all of them (text tokens have no position in SD3, so the rows stay identical).

Reproduce: `{train["command"]}`, then `python scripts/eval_embedded.py --model sdexplore/models/tiny-shapes-mmdit`.

## Measured ({result["n_prompts"]} held-out prompts, prompt i with seed i, recommended settings)

| figure | measured | bar | |
| --- | --- | --- | --- |
{chr(10).join(rows)}

Kinds: {kind_line}. {sd_line} VAE PSNR {result["psnr"]:.1f} dB; the scorer reads the VAE's own reconstructions
of these scenes: {", ".join(f"{k} {100 * v:.0f}%" for k, v in result.get("vae_ceiling", {}).items())}.
Attention IoU: the shape word's joint-attention map (image queries × its key in the joint softmax, mean over
blocks, heads and steps, upsampled), min-max normalised and thresholded at 0.5, against the drawn shape.

## What was tried

| change | shape | squares | IoU | |
| --- | --- | --- | --- | --- |
{tried}

## Sample grid (seed 0)

| prompt | read back |
| --- | --- |
{grid}
"""
