"""Explorer responsiveness: kernel-side update latency per control (budget 50 ms), and the cost of watching live.

Rows of group "widgets" report the median latency of one update in ``seconds`` (and ``ms``); their ``ratio``
is the share of the 50 ms budget (≤ 1 is within budget). The "widgets-live" rows compare a plain pipeline
call with the same call feeding a live TimestepScrubber (observe + on_step), interleaved as usual.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _timing import interleaved, rows_vs

BUDGET_MS = 50.0


def _latency(name: str, update: Callable[[int], None], n: int, repeats: int) -> dict[str, Any]:
    """Median wall time of ``update(i)`` over ``repeats`` sweeps of ``i`` in 0..n-1 (first sweep warms caches)."""
    update(0)
    times = []
    for _ in range(max(repeats, 1)):
        for i in range(n):
            t0 = time.perf_counter()
            update(i)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "group": "widgets",
        "name": name,
        "seconds": med,
        "ms": med * 1000,
        "ratio": med * 1000 / BUDGET_MS,
        "peak_mib": 0.0,
        "extra_mib": 0.0,
    }


def benchmark(pipe: Any, *, device: str, repeats: int, gpu: bool) -> list[dict]:
    """Latency of every explorer control on a realistic run, plus the live-scrubber overhead on the call."""
    from sdexplore.record.observe import observe
    from sdexplore.views.widgets import AttentionExplorer, InterpolationExplorer, TimestepScrubber, WalkPlayer
    from sdexplore.walks import walk

    steps = 50 if gpu else 25
    size = {"height": 512, "width": 512} if gpu else {}
    prompt = "a big red circle at the top left on a blue background"

    def call(**kw: Any) -> Any:
        return pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=7.5,
            generator=torch.Generator("cpu").manual_seed(0),
            **size,
            **kw,
        )

    # one realistic recorded run: steps + attention
    with observe(pipe, attention=True) as obs:
        image = call().images[0]
    rows: list[dict] = []

    TimestepScrubber(obs, static=False).widget  # noqa: B018 - warm-up: first ipywidgets/matplotlib imports
    t0 = time.perf_counter()
    scrub = TimestepScrubber(obs, static=False)
    scrub.widget  # noqa: B018
    prep_ms = (time.perf_counter() - t0) * 1000
    rows.append(
        {
            "group": "widgets",
            "name": f"TimestepScrubber build ({steps} steps), ms",
            "seconds": prep_ms / 1000,
            "ms": prep_ms,
            "ratio": float("nan"),
            "peak_mib": 0.0,
            "extra_mib": 0.0,
        }
    )

    def scrub_to(i: int) -> None:
        scrub.value = (i * 7) % scrub.num_steps  # jump around, never the same step twice in a row

    rows.append(_latency("TimestepScrubber slider update", scrub_to, scrub.num_steps, repeats))

    att = AttentionExplorer(obs, image, static=False)
    att.widget  # noqa: B018
    words = att.words
    S = att.num_steps

    rows.append(
        _latency(
            "AttentionExplorer word change (cached)",
            lambda i: att.select(word=words[i % len(words)]),
            len(words),
            repeats,
        )
    )
    opacities = [round(0.05 * k, 2) for k in range(21)]

    def fresh_opacity(i: int) -> None:
        att._png_cache.clear()  # force the composite + encode every time
        att.select(opacity=opacities[i % len(opacities)])

    rows.append(
        _latency("AttentionExplorer opacity change (uncached)", fresh_opacity, len(opacities), repeats)
    )

    def fresh_range(i: int) -> None:
        att._png_cache.clear()
        att._heat_cache.clear()
        att.select(step_range=(i % S, S - 1))

    rows.append(_latency("AttentionExplorer step range change (uncached)", fresh_range, S, repeats))

    frames = 24 if not gpu else 8
    w = walk(
        pipe,
        [prompt, "a big yellow square at the bottom right on a purple background"],
        seeds=[0, 1],
        frames=frames,
        num_inference_steps=10 if not gpu else 25,
        progress=False,
        **size,
    )
    interp = InterpolationExplorer({"slerp": w, "reversed": w.images[::-1]}, static=False)
    interp.widget  # noqa: B018
    rows.append(
        _latency(
            "InterpolationExplorer frame change (2 walks)",
            lambda i: setattr(interp, "value", (i * 5) % frames),
            frames,
            repeats,
        )
    )
    player = WalkPlayer(w, static=False)
    player.widget  # noqa: B018
    rows.append(
        _latency(
            "WalkPlayer frame change", lambda i: setattr(player, "value", (i * 5) % frames), frames, repeats
        )
    )

    # live: the same call, recorded, and recorded while feeding a TimestepScrubber step by step
    live = TimestepScrubber(static=False)
    live.widget  # noqa: B018

    def observed() -> None:
        with observe(pipe):
            call()

    def watched() -> None:
        with observe(pipe, on_step=live.on_step):
            call()

    runs = {"plain": call, "observe (steps)": observed, "observe + live TimestepScrubber": watched}
    rows += rows_vs(interleaved(runs, repeats=repeats, device=device), "plain", "widgets-live")
    return rows


if __name__ == "__main__":  # CPU, the fixture/embedded model: python benchmarks/bench_widgets.py
    import sys

    torch.set_num_threads(1)
    from sdexplore.loading import load_pipeline

    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    for r in benchmark(load_pipeline(device="cpu"), device="cpu", repeats=reps, gpu=False):
        extra = f"{r['ms']:8.2f} ms" if "ms" in r else f"{r['seconds']:8.3f} s  ratio {r['ratio']:.3f}"
        print(f"{r['group']:<13} {r['name']:<52} {extra}")
