"""What the explorers cost the kernel, and what watching a run live costs the run.

The explorers repaint in the browser (anywidget over the page payload), so a control's kernel-side "update" is a
trait being set: the input → paint times are ``benchmarks/bench_pages.py``'s (a real browser). Here:

- group "widgets": per explorer, the time to build its view (drawing and encoding its whole payload, once), in
  ``seconds`` / ``ms``, and the payload's size (``kib``); one row times setting the scrubber's step from Python
  (a trait set, what ``scrubber.value = i`` does, budget 50 ms: ``ratio`` is the share of it).
- group "widgets-live": a plain pipeline call, the same call observed, and observed while feeding a live
  TimestepScrubber (its ``on_step``) inside an IPython shell, as in a notebook, interleaved; the live row is
  timed until the view holds every step (the cell's end, then ``scrubber.wait()``), the row after it until the
  call returns (what the run itself pays).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _timing import interleaved, rows_vs

BUDGET_MS = 50.0


def _row(name: str, seconds: float, ratio: float = float("nan"), **extra: Any) -> dict[str, Any]:
    return {
        "group": "widgets",
        "name": name,
        "seconds": seconds,
        "ms": seconds * 1000,
        "ratio": ratio,
        "peak_mib": 0.0,
        "extra_mib": 0.0,
        **extra,
    }


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
    return _row(name, med, med * 1000 / BUDGET_MS)


def _build(name: str, make: Callable[[], Any], repeats: int) -> list[dict[str, Any]]:
    """Median time to build an explorer's view (``make()`` returns the explorer; its payload drawn and encoded),
    and the payload's size as JSON."""
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        explorer = make()
        explorer.widget  # noqa: B018 - builds the view: the whole payload, encoded
        times.append(time.perf_counter() - t0)
    kib = len(json.dumps(explorer._view.payload)) / 1024  # the anywidget view (a box may hold it)
    return [
        _row(f"{name} build (payload encoded), ms", statistics.median(times)),
        _row(f"{name} payload, KiB", float("nan"), kib=kib),
    ]


def benchmark(pipe: Any, *, device: str, repeats: int, gpu: bool) -> list[dict]:
    """Each explorer's build time and payload size on a realistic run, plus what a live scrubber costs the call."""
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

    TimestepScrubber(obs, static=False).widget  # noqa: B018 - warm-up: first anywidget/PIL imports
    rows += _build(f"TimestepScrubber ({steps} steps)", lambda: TimestepScrubber(obs, static=False), repeats)
    scrub = TimestepScrubber(obs, static=False)
    scrub.widget  # noqa: B018

    def scrub_to(i: int) -> None:
        scrub.value = (i * 7) % scrub.num_steps  # jump around, never the same step twice in a row

    rows.append(
        _latency("TimestepScrubber step set from Python (a trait)", scrub_to, scrub.num_steps, repeats)
    )
    rows += _build("AttentionExplorer", lambda: AttentionExplorer(obs, image, static=False), repeats)

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
    rows += _build(
        "InterpolationExplorer (2 walks)",
        lambda: InterpolationExplorer({"slerp": w, "reversed": w.images[::-1]}, static=False),
        repeats,
    )
    rows += _build(f"WalkPlayer ({frames} frames)", lambda: WalkPlayer(w, static=False), repeats)

    # live: the same call, recorded, and recorded while feeding a TimestepScrubber step by step, as in a notebook
    # cell: an IPython shell runs (the scrubber completes its view when the cell ends, post_run_cell)
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    live = TimestepScrubber(static=False)
    live.widget  # noqa: B018
    returned: list[float] = []  # the live call's own time, until it returns

    def observed() -> None:
        with observe(pipe):
            call()

    def watched() -> None:
        t0 = time.perf_counter()
        with observe(pipe, on_step=live.on_step):
            call()
        returned.append(time.perf_counter() - t0)
        shell.events.trigger("post_run_cell", None)  # the cell ends
        live.wait()  # the view holds every step: no encoding left to overlap the next run

    runs = {
        "plain": call,
        "observe (steps)": observed,
        "observe + live TimestepScrubber (view complete)": watched,
    }
    results = interleaved(runs, repeats=repeats, device=device)
    returned = returned[-repeats:]  # the timed runs, not the warm-up
    results["observe + live TimestepScrubber (call returned)"] = {
        "seconds": statistics.median(returned),
        "peak_mib": results["observe + live TimestepScrubber (view complete)"]["peak_mib"],
    }
    rows += rows_vs(results, "plain", "widgets-live")
    observed_s = results["observe (steps)"]["seconds"]
    for r in rows[-2:]:
        r["vs_observe"] = r["seconds"] / observed_s
    return rows


if __name__ == "__main__":  # CPU, the fixture/embedded model: python benchmarks/bench_widgets.py
    import sys

    torch.set_num_threads(1)
    from sdexplore.loading import load_pipeline

    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    for r in benchmark(load_pipeline(device="cpu"), device="cpu", repeats=reps, gpu=False):
        if "kib" in r:
            extra = f"{r['kib']:8.1f} KiB"
        elif "ms" in r:
            extra = f"{r['ms']:8.2f} ms"
        else:
            extra = f"{r['seconds']:8.3f} s  ratio {r['ratio']:.3f}"
            if "vs_observe" in r:
                extra += f"  vs observe {r['vs_observe']:.3f}"
        print(f"{r['group']:<13} {r['name']:<56} {extra}")
