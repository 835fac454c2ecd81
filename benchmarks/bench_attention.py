"""Attention capture cost: ``AttentionRecorder`` around the user's call against the plain call.

Targets: GPU (SD-1.5-shaped random fp16, 512², 50 steps, CFG): per-step 16×16 maps of every token plus the
aggregate ≤ 5% over plain and ≤ 100 MiB extra peak GPU memory. CPU (embedded model or fixture, 64², 25 steps,
CFG): ≤ 15% over plain. Keeping every probability tensor is measured too, for its stated cost.

    python benchmarks/bench_attention.py           # CPU, on the sd1 fixture (or the embedded model if present)
"""

from __future__ import annotations

from typing import Any

import torch
from _timing import interleaved, rows_vs

from sdexplore.record.attention import AttentionRecorder

PROMPT = "a big red circle at the top left on a blue background"
GUIDANCE = 7.5


def benchmark(pipe: Any, *, device: str, repeats: int, gpu: bool) -> list[dict]:
    """Rows: plain call; default capture (16×16 per-step maps + aggregate); per-head; negative; keep-everything."""
    pipe.set_progress_bar_config(disable=True)
    if gpu:
        size, steps = 512, 50
    else:
        size, steps = pipe.unet.config.sample_size * pipe.vae_scale_factor, 25
    call = dict(
        num_inference_steps=steps, guidance_scale=GUIDANCE, height=size, width=size, output_type="latent"
    )

    def plain() -> None:
        pipe(PROMPT, generator=torch.Generator(device).manual_seed(0), **call)

    def recorded(**options: Any):
        def run() -> None:
            with AttentionRecorder(pipe, **options) as rec:
                pipe(PROMPT, generator=torch.Generator(device).manual_seed(0), **call)
            rec.maps  # noqa: B018 - reading the maps (the one host transfer) is part of the cost

        return run

    runs = {
        "plain": plain,
        "attention: 16x16 per step + aggregate": recorded(),
        "attention: + per head": recorded(per_head=True),
        "attention: + negative prompt": recorded(negative=True),
        "attention: keep every probability": recorded(keep_probs=True),
    }
    return rows_vs(interleaved(runs, repeats=repeats, device=device), "plain", "attention")


if __name__ == "__main__":
    torch.set_num_threads(1)
    from sdexplore.fixtures import tiny_pipeline
    from sdexplore.loading import embedded_model_available, load_pipeline

    pipe = load_pipeline(device="cpu") if embedded_model_available() else tiny_pipeline("sd1")
    for row in benchmark(pipe, device="cpu", repeats=7, gpu=False):
        print(f"{row['name']:<40} {row['seconds']:.3f} s  ratio {row['ratio']:.3f}")
