"""Full observation vs plain on the tiny family fixtures (issue 31's ≤ 1.15× per family), paired ABBA.

Each family's tiny fixture, 64×64, ``steps`` denoising steps, one thread, process CPU time; per pair the ratio of
``sdexplore.observe(pipe, steps=True, attention=True)`` around the call to the plain call. The call returns latents
(``output_type="latent"``): the VAE decode, the same in both, would only dilute the ratio.

    OMP_NUM_THREADS=1 python benchmarks/bench_family_overhead.py [--families pixart-sigma chroma sana wan z-image
        qwen-image] [--pairs 6]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _paired import median_interval, process_clock, run_pairs  # noqa: E402

import sdexplore  # noqa: E402
from sdexplore.families import detect_family  # noqa: E402
from sdexplore.fixtures import fixture_call_defaults, tiny_pipeline  # noqa: E402

PROMPT = "a big red circle at the top left on a blue background"
TARGET = 1.15


def family_call(pipe: Any, steps: int) -> Callable[[], Any]:
    """One plain call of the fixture ``pipe``: 64×64, ``steps`` steps, latents out, a fixed seed."""
    family = detect_family(pipe)
    kw: dict[str, Any] = dict(num_inference_steps=steps, height=64, width=64, output_type="latent")
    kw.update(fixture_call_defaults(family.name))
    if family.name in ("flux", "chroma", "wan"):  # their T5's 512 positions, mostly padding, at 64 pixels
        kw["max_sequence_length"] = 64

    def call() -> Any:
        with torch.no_grad():
            return pipe(prompt=PROMPT, generator=torch.Generator("cpu").manual_seed(0), **kw)

    return call


def ratios(families: list[str], pairs: int = 6, steps: int = 4) -> dict[str, Any]:
    """Observed / plain process-CPU-time ratio per family (median and 95% interval of the paired ratios)."""
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for name in families:
        pipe = tiny_pipeline(name)
        call = family_call(pipe, steps)

        def observed(call: Callable[[], Any] = call, pipe: Any = pipe) -> Any:
            with sdexplore.observe(pipe, steps=True, attention=True) as obs:
                call()
            return obs.attention  # the maps are built: their cost is part of observing

        series = run_pairs(process_clock(call), {"both": process_clock(observed)}, pairs=pairs, warmup=2)
        s = series["both"]
        out[name] = {
            "ratio": median_interval(s.ratios()).__dict__,
            "plain_ms": 1000 * median_interval([p["time"] for p in s.plain]).median,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--families", nargs="+", default=["pixart-sigma", "chroma", "sana", "wan", "z-image", "qwen-image"]
    )
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    r = ratios(args.families, args.pairs, args.steps)
    print("| family | observed / plain (median, 95% interval) | plain call | ≤ 1.15× |")
    print("|---|---|---|---|")
    for name, row in r.items():
        q = row["ratio"]
        verdict = "met" if q["median"] <= TARGET else "missed"
        print(
            f"| {name} | {q['median']:.3f} [{q['lo']:.3f}, {q['hi']:.3f}] (n={q['n']}) | {row['plain_ms']:.1f} ms | {verdict} |"
        )
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
