"""Stable Flow's vital layers on the embedded tiny-shapes-mmdit, and editing by injection at them (issue 29).

1. Vital layers (``sdexplore.vital.vital_layers``): 8 held-out prompts × seeds 0, 1, 20 steps, CFG 3; each of the
   4 joint blocks bypassed in turn; per block the mean absolute pixel change (0-1), the PSNR and the fraction of
   pictures whose read scene (colour, background, kind, place) changed. Vital: change > 0.05.
2. Editing (``sdexplore.vital.edit``: source and target in one batch from the same noise, the target's image keys
   and values in the chosen blocks' joint attention replaced by the source's, at every step, as the paper does) on
   6 other held-out prompts with a circle: a kind swap (circle → square) and a colour swap (to blue, or red/green
   where blue is taken), injecting at the vital blocks, at all blocks, at none (the naive baseline: the target
   regenerated from the same noise) and at the non-vital blocks. Per setting: how often the edit reads as the
   target, how often place, the other attribute and background are kept (``read_scene`` of the source against
   the edit), the IoU of the two shapes' masks and the PSNR outside both masks.

    python benchmarks/bench_vital.py [--json out.json] [--threads 2]     # ≈ 6 min on 2 idle CPU cores
    python benchmarks/bench_vital.py --swaps colour --vital transformer_blocks.0 transformer_blocks.2 \
        transformer_blocks.3                                            # the colour edits only, blocks given
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

import numpy as np
import torch

import sdexplore
from sdexplore import scenes
from sdexplore.vital import VitalLayers, candidate_blocks, edit, vital_layers

STEPS, GUIDANCE = 20, 3.0
MEASURE = slice(20, 28)  # held-out prompts for the measurement
EDIT_FROM = 40  # the edit prompts: the first 6 held-out prompts with a circle from here on


def _edit_prompts() -> list[str]:
    return [p for i, p in enumerate(scenes.validation_prompts()) if i >= EDIT_FROM and " circle " in p][:6]


def _colour_target(prompt: str) -> str:
    scene = scenes.parse_prompt(prompt)
    new = next(c for c in ("blue", "red", "green") if c not in (scene.colour, scene.background))
    return prompt.replace(f" {scene.colour} ", f" {new} ", 1)


def _psnr_outside(a: np.ndarray, b: np.ndarray, keep: np.ndarray) -> float:
    diff = (a.astype(np.float64) - b.astype(np.float64))[keep]  # (K, 3): pixels outside both shapes
    mse = float(np.mean(diff**2)) if diff.size else 0.0
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def score_edit(res: Any, targets: list[str], swap: str) -> dict[str, float]:
    """Fractions of the edits reading as the target and keeping place, the other attribute and background; mean
    mask IoU and PSNR outside both masks (finite values only)."""
    rows = []
    for src, out, tgt in zip(res.source, res.edited, targets, strict=True):
        a, b = np.asarray(src.convert("RGB")), np.asarray(out.convert("RGB"))
        rs, re_ = scenes.read_scene(a), scenes.read_scene(b)
        want = scenes.parse_prompt(tgt)
        union = rs.mask | re_.mask
        rows.append(
            dict(
                target=re_.shape == want.shape if swap == "kind" else re_.colour == want.colour,
                place=re_.place == rs.place,
                other=re_.colour == rs.colour if swap == "kind" else re_.shape == rs.shape,
                background=re_.background == rs.background,
                iou=float((rs.mask & re_.mask).sum() / max(union.sum(), 1)),
                psnr_outside=_psnr_outside(a, b, ~union),
            )
        )
    out = {k: float(np.mean([r[k] for r in rows])) for k in ("target", "place", "other", "background", "iou")}
    finite = [r["psnr_outside"] for r in rows if math.isfinite(r["psnr_outside"])]
    out["psnr_outside"] = float(np.mean(finite)) if finite else math.inf
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the numbers to this file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--swaps", nargs="+", choices=("kind", "colour"), default=["kind", "colour"])
    ap.add_argument(
        "--vital", nargs="+", metavar="BLOCK", help="skip the measurement: these blocks are the vital ones"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = sdexplore.load_pipeline("tiny-shapes-mmdit")
    call = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE)

    t = time.perf_counter()
    if args.vital:  # a rerun of the edits with the blocks a measurement found
        blocks = candidate_blocks(pipe)
        if set(args.vital) - set(blocks):
            ap.error(f"--vital: the blocks are {blocks}")
        vl = VitalLayers(
            blocks, [float(b in args.vital) for b in blocks], [math.nan] * len(blocks), None, 0.5
        )
    else:
        vl = vital_layers(pipe, scenes.validation_prompts()[MEASURE], seeds=[0, 1], read_scenes=True, **call)
        took = time.perf_counter() - t
        print(f"vital layers ({took:.0f} s, 8 prompts × 2 seeds, {STEPS} steps, CFG {GUIDANCE}):")
        print(vl.table())
    print(f"vital: {vl.vital}  non-vital: {vl.non_vital}\n", flush=True)

    prompts = _edit_prompts()
    swaps = {
        "kind": [p.replace(" circle ", " square ") for p in prompts],
        "colour": [_colour_target(p) for p in prompts],
    }
    swaps = {k: v for k, v in swaps.items() if k in args.swaps}
    settings = {"vital": vl, "all": "all", "none": "none", "non-vital": vl.non_vital}
    results: dict[str, dict[str, dict[str, float]]] = {}
    print(
        "| swap | inject at | target read | place kept | other kept | background kept | mask IoU | PSNR outside (dB) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for swap, targets in swaps.items():
        results[swap] = {}
        for name, inject in settings.items():
            gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
            res = edit(pipe, prompts, targets, inject=inject, generator=gens, **call)
            r = results[swap][name] = score_edit(res, targets, swap)
            print(
                f"| {swap} | {name} | {r['target']:.2f} | {r['place']:.2f} | {r['other']:.2f} | "
                f"{r['background']:.2f} | {r['iou']:.3f} | {r['psnr_outside']:.1f} |",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    blocks=vl.blocks,
                    scores=vl.scores,
                    psnr=vl.psnr,
                    scene_changed=vl.scene_changed,
                    vital=vl.vital,
                    threshold=vl.threshold,
                    edit_prompts=prompts,
                    edits=results,
                    settings=dict(steps=STEPS, guidance=GUIDANCE, threads=args.threads),
                ),
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
