"""Step recording overhead: a plain call vs the same call under sdexplore.observe, with previews every step.

Targets: CPU (embedded model / fixture, 64², 25 steps CFG) full recording with previews ≤ 10 % over plain;
GPU (SD-1.5-shaped fp16, 512², 50 steps) ≤ 2 %.
"""

from __future__ import annotations

from typing import Any

import torch
from _timing import interleaved, rows_vs

from sdexplore.record.observe import observe


def benchmark(pipe: Any, *, device: str, repeats: int, gpu: bool) -> list[dict]:
    """Rows for: plain, default recording, full recording (fp32, every quantity), scalars only, VAE every 10th."""
    size = 512 if gpu else 64
    kw = dict(
        prompt="a big red circle at the top left on a blue background",
        num_inference_steps=50 if gpu else 25,
        guidance_scale=7.5,
        height=size,
        width=size,
        output_type="np",
    )

    def call() -> Any:
        return pipe(**kw, generator=torch.Generator("cpu").manual_seed(0)).images

    def recorded(**options: Any) -> Any:
        def run() -> Any:
            with observe(pipe, **options):
                return call()

        return run

    runs = {
        "plain": call,
        "observe (defaults: 7 quantities fp16 + preview)": recorded(),
        "observe (all quantities fp32 + preview)": recorded(quantities="all", dtype=torch.float32),
        "observe (scalars only)": recorded(quantities=()),
        "observe (defaults + VAE decode every 10th)": recorded(decode_every=10),
    }
    return rows_vs(interleaved(runs, repeats=repeats, device=device), "plain", "steps")


if __name__ == "__main__":  # quick CPU run on the SD 1.x fixture: python benchmarks/bench_steps.py [repeats]
    import sys

    from sdexplore.fixtures import tiny_pipeline

    torch.set_num_threads(2)
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    for row in benchmark(tiny_pipeline("sd1"), device="cpu", repeats=reps, gpu=False):
        print(f"{row['name']:<50} {row['seconds']:.3f} s  ×{row['ratio']:.3f}")
