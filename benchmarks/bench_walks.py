"""Walk throughput: batched ``sdexplore.walk`` against a plain one-frame-at-a-time diffusers loop.

The plain baseline is what a user writes by hand: the same per-frame embeddings and noises (precomputed,
not timed), one ``pipe(prompt_embeds=..., latents=...)`` call per frame. Targets: GPU (SD-1.5-shaped, fp16,
512², 25 steps) walk ≥ 3.5× the loop's throughput and the automatic batch size ≥ 90% of the best fixed one;
CPU (embedded model or fixture, 64², 25 steps) batched ≥ 1.5× the loop.
"""

from __future__ import annotations

from typing import Any

import torch
from _timing import interleaved, rows_vs

from sdexplore.interpolate import keyframe_schedule
from sdexplore.text import default_size
from sdexplore.walks import _frame_inputs, _keyframes, auto_batch_size, walk

PROMPTS = [
    "a big red circle at the top left on a blue background",
    "a small yellow square at the bottom right",
]
SEEDS = [0, 1]
FRAMES_GPU = 16
FRAMES_CPU = 8  # a shared 2-core box: keep the CPU run to minutes
STEPS = 25
GUIDANCE = 7.5


def benchmark(pipe: Any, *, device: str, repeats: int, gpu: bool) -> list[dict]:
    """Rows: plain one-frame loop, walk with the automatic batch size, and walks at fixed batch sizes."""
    height, width = (512, 512) if gpu else default_size(pipe)
    frames = FRAMES_GPU if gpu else FRAMES_CPU
    pipe.set_progress_bar_config(disable=True)
    keys = _keyframes(
        pipe, PROMPTS, SEEDS, None, height=height, width=width, loop=False, gen_device=torch.device(device)
    )
    sched = keyframe_schedule(len(SEEDS), frames)
    cond, noise = _frame_inputs(keys, list(zip(sched.segments, sched.ts, strict=True)))
    call = dict(
        num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=height, width=width, output_type="np"
    )

    def plain_loop() -> None:
        for k in range(frames):
            pipe(
                prompt_embeds=cond.prompt_embeds[k : k + 1],
                negative_prompt_embeds=cond.negative_prompt_embeds[k : k + 1],
                latents=noise[k : k + 1],
                **call,
            )

    def walker(batch_size: int | None):
        def run() -> None:
            walk(
                pipe,
                PROMPTS,
                seeds=SEEDS,
                frames=frames,
                batch_size=batch_size,
                num_inference_steps=STEPS,
                guidance_scale=GUIDANCE,
                height=height,
                width=width,
                progress=False,
            )

        return run

    auto = auto_batch_size(pipe, frames, height=height, width=width)
    fixed = (4, 8, 16) if gpu else (2, 8)
    runs = {"plain": plain_loop, f"walk auto (batch {auto})": walker(None)}
    runs.update({f"walk batch {b}": walker(b) for b in fixed if b != auto})
    results = interleaved(runs, repeats=repeats, device=device)
    rows = rows_vs(results, "plain", "walks")
    best = min(r["seconds"] for r in rows if r["name"] != "plain")
    for r in rows:
        r["throughput_x"] = rows[0]["seconds"] / r["seconds"]  # frames/s relative to the one-frame loop
        r["vs_best_fixed"] = best / r["seconds"]  # 1.0 = the fastest walk variant
    return rows


if __name__ == "__main__":  # quick CPU run on the SD 1.x fixture: python benchmarks/bench_walks.py
    import sys

    torch.set_num_threads(2)
    from sdexplore.fixtures import tiny_pipeline

    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    for row in benchmark(tiny_pipeline("sd1"), device="cpu", repeats=reps, gpu=False):
        print(
            f"{row['name']:<24} {row['seconds']:7.3f} s  throughput ×{row['throughput_x']:.2f}  "
            f"vs best {row['vs_best_fixed']:.2f}"
        )
