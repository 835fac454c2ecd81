"""Inversion on the embedded model: reconstruction PSNR of held-out rendered scenes against the VAE's round trip (per
method, CFG 1 and CFG > 1, null-text included), the shape word's attention IoU on the reconstruction pass against the scene's true mask,
a walk between two inverted scenes (endpoints, smoothness), and inversion time as a ratio to one generation.

    python benchmarks/bench_invert.py                 # 6 scenes, 25 steps, 4 timing pairs: ~5 min on 2 CPU cores
    python benchmarks/bench_invert.py --scenes 24 --json inv.json
    python benchmarks/bench_invert.py --quick --scenes 48   # default inversion only: PSNR and IoU on more scenes,
                                                            # beside the model's own generations of the prompts

Rendered scenes (``sdexplore.embedded.scenes.render_scene``) are real pictures with known masks: the held-out prompts of
``validation_prompts()``, drawn with seeds the training never used. Times are process CPU seconds in ABBA pairs
(benchmarks/_paired.py), so other processes' load on a shared box shows up far less than in wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paired import median_interval, process_clock, run_pairs  # noqa: E402

#: (label, method, guidance, iterations or None for the default): the table's columns.
VARIANTS = (
    ("ddim, CFG 1, 0 passes", "ddim", 1.0, 0),
    ("ddim, CFG 1, default passes", "ddim", 1.0, None),
    ("ddim, CFG 3, plain", "ddim", 3.0, None),
    ("negative-prompt, CFG 3", "negative-prompt", 3.0, None),
    ("null-text, CFG 3", "null-text", 3.0, None),  # 10 Adam iterations per step, lr 1e-2
)


def scene_prompts(n: int) -> list[str]:
    """``n`` of the 216 held-out prompts of ``validation_prompts()``, drawn at random (seed 0): the list is ordered
    by place, so a stride would take one place only."""
    from sdexplore.embedded.scenes import validation_prompts

    prompts = validation_prompts()
    picks = np.random.default_rng(0).permutation(len(prompts))[:n]
    return [prompts[i] for i in picks]


def shape_iou(pipe, maps, prompt: str, coverage: np.ndarray) -> float:
    """IoU of the shape word's map (mean over layers and steps, as the model's own evaluation) with the true mask."""
    from sdexplore.embedded.evaluate import attention_iou, shape_token_index, shape_word_maps

    amap = (
        shape_word_maps(maps, [shape_token_index(pipe, prompt)], coverage.shape[0])[0].cpu().numpy()
    )  # (H, W)
    return attention_iou(amap, coverage > 0.5)


def measure_scene(pipe, prompt: str, seed: int, steps: int) -> tuple[dict, object]:
    """PSNR of every variant and the IoU of the default inversion's reconstruction pass; returns (row, inversion)."""
    from sdexplore.embedded.scenes import render_scene
    from sdexplore.inversion import invert
    from sdexplore.record.attention import AttentionRecorder

    picture, coverage, _ = render_scene(prompt, seed=seed)  # (64, 64, 3) uint8, (64, 64) float
    row: dict = {"prompt": prompt, "seed": seed}
    kept = None
    for label, method, guidance, passes in VARIANTS:
        kw = {} if passes is None else {"iterations": passes}
        if label == "ddim, CFG 1, default passes":
            with AttentionRecorder(pipe, step_resolution=None) as rec:
                inv = invert(pipe, picture, prompt, steps=steps, method=method, guidance=guidance, **kw)
            row["iou"] = shape_iou(pipe, rec.maps, prompt, coverage)
            kept = inv
        else:
            inv = invert(pipe, picture, prompt, steps=steps, method=method, guidance=guidance, **kw)
        row["vae"] = inv.vae_psnr
        row[label] = inv.psnr
    return row, kept


def measure_quick(pipe, prompt: str, seed: int, steps: int) -> dict:
    """The default inversion only (PSNR, VAE, IoU on the reconstruction pass), and beside it the IoU of the model's
    own generation of the prompt at CFG 1 (seed 0), scored against the generated image's own shape mask as in the
    model's evaluation: how much of the IoU is the model's and how much the inversion's."""
    from sdexplore.embedded.evaluate import attention_iou, shape_token_index, shape_word_maps
    from sdexplore.embedded.scenes import read_scene, render_scene
    from sdexplore.inversion import invert
    from sdexplore.record.attention import AttentionRecorder

    picture, coverage, _ = render_scene(prompt, seed=seed)
    with AttentionRecorder(pipe, step_resolution=None) as rec:
        inv = invert(pipe, picture, prompt, steps=steps)
    row = {"prompt": prompt, "seed": seed, "vae": inv.vae_psnr, "psnr": inv.psnr}
    row["iou"] = shape_iou(pipe, rec.maps, prompt, coverage)
    with AttentionRecorder(pipe, step_resolution=None) as rec:
        out = pipe(prompt, num_inference_steps=steps, guidance_scale=1.0, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    image = (out * 255).round().astype(np.uint8)  # (H, W, 3)
    amap = shape_word_maps(rec.maps, [shape_token_index(pipe, prompt)], image.shape[0])[0].cpu().numpy()
    row["generated_iou"] = attention_iou(amap, read_scene(image).mask)
    return row


def quick(pipe, prompts: list[str], steps: int) -> dict:
    rows = []
    for i, prompt in enumerate(prompts):
        rows.append(measure_quick(pipe, prompt, 100 + i, steps))
        print(
            json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}),
            flush=True,
        )
    out = {"rows": rows, "steps": steps}
    for size in ("big", "small", "all"):
        sel = [r for r in rows if size == "all" or r["prompt"].split()[1] == size]
        if sel:
            out[size] = {
                "n": len(sel),
                "mean_gap_db": statistics.mean(r["vae"] - r["psnr"] for r in sel),
                "max_gap_db": max(r["vae"] - r["psnr"] for r in sel),
                "iou": statistics.mean(r["iou"] for r in sel),
                "iou_sd": statistics.pstdev(r["iou"] for r in sel),
                "generated_iou": statistics.mean(r["generated_iou"] for r in sel),
            }
            print(size, json.dumps({k: round(v, 3) for k, v in out[size].items()}), flush=True)
    return out


def measure_walk(pipe, a, b, frames: int) -> dict:
    """A walk between two inverted scenes: endpoint PSNR against each picture beside its reconstruction's, and
    the smoothness report, beside a seed walk between the same prompts with the same settings."""
    from sdexplore.inversion import psnr
    from sdexplore.walks import walk

    w = walk(pipe, [a, b], frames=frames, progress=False)
    ref = walk(
        pipe,
        [a.prompt, b.prompt],
        seeds=[0, 1],
        frames=frames,
        progress=False,
        num_inference_steps=a.settings["steps"],
        guidance_scale=a.settings["guidance"],
    )
    out = {}
    for name, inv, frame in (("start", a, w.images[0]), ("end", b, w.images[-1])):
        out[name] = {"reconstruction": inv.psnr, "walk_endpoint": psnr(frame, inv.image)}
    for name, result in (("image_walk", w), ("seed_walk", ref)):
        rep = result.smoothness()
        out[name] = {
            "mean": rep.mean,
            "max": rep.max,
            "max_over_mean": rep.max / rep.mean,
            "smoothness": rep.smoothness,
            "distances": [round(float(d), 4) for d in rep.distances],
        }
    return out


def measure_time(pipe, prompt: str, seed: int, steps: int, pairs: int) -> dict:
    """Process CPU time of inversions (default passes; 0 passes) over one generation with the same steps at CFG 1,
    and of the default inversion and null-text inversion over one generation at the model's CFG 3 (the
    pipeline's batch of two)."""
    from sdexplore.embedded.scenes import render_scene
    from sdexplore.inversion import invert

    picture = render_scene(prompt, seed=seed)[0]

    def gen(guidance: float):
        return lambda: pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, output_type="np")

    series = run_pairs(
        process_clock(gen(1.0)),
        {
            "default passes": process_clock(lambda: invert(pipe, picture, prompt, steps=steps)),
            "0 passes": process_clock(lambda: invert(pipe, picture, prompt, steps=steps, iterations=0)),
        },
        pairs=pairs,
    )
    cfg3 = run_pairs(
        process_clock(gen(3.0)),
        {
            "default passes": process_clock(lambda: invert(pipe, picture, prompt, steps=steps)),
            "null-text": process_clock(
                lambda: invert(pipe, picture, prompt, steps=steps, method="null-text", guidance=3.0)
            ),
        },
        pairs=pairs,
    )
    out = {f"{k} / generation CFG 1": median_interval(s.ratios()) for k, s in series.items()}
    for k, s in cfg3.items():
        out[f"{k} / generation CFG 3"] = median_interval(s.ratios())
    return {k: {"median": v.median, "lo": v.lo, "hi": v.hi, "n": v.n} for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=int, default=6, help="held-out scenes (default 6)")
    parser.add_argument(
        "--steps", type=int, default=25, help="steps of inversion and generation (default 25)"
    )
    parser.add_argument("--frames", type=int, default=9, help="frames of the walk (default 9)")
    parser.add_argument("--pairs", type=int, default=4, help="ABBA timing pairs (default 4; 0: no timing)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared box more threads wait on each other)",
    )
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--quick", action="store_true", help="the default inversion's PSNR and IoU only")
    args = parser.parse_args(argv)

    import sdexplore as sdx

    warnings.simplefilter("ignore")  # image notes and library chatter: the table is the output
    torch.set_num_threads(args.threads)
    pipe = sdx.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    if args.quick:
        result = quick(pipe, scene_prompts(args.scenes), args.steps)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return result
    rows, inversions = [], []
    for i, prompt in enumerate(scene_prompts(args.scenes)):
        row, inv = measure_scene(pipe, prompt, 100 + i, args.steps)
        rows.append(row)
        inversions.append(inv)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    labels = [v[0] for v in VARIANTS]
    print("\n| scene | VAE round trip | " + " | ".join(labels) + " | shape-word IoU |")
    print("| --- " * (len(labels) + 3) + "|")
    for r in rows:
        cells = " | ".join(f"{r[label]:.2f}" for label in labels)
        print(f"| {r['prompt']} (seed {r['seed']}) | {r['vae']:.2f} | {cells} | {r['iou']:.3f} |")
    gaps = {label: statistics.mean(r["vae"] - r[label] for r in rows) for label in labels}
    iou = statistics.mean(r["iou"] for r in rows)
    print(
        "| mean gap to the VAE (dB) | — | "
        + " | ".join(f"{gaps[label]:.2f}" for label in labels)
        + f" | {iou:.3f} |"
    )

    # two walks: between two renders of one prompt (the jitter moves the shape a little), and between the first
    # two scenes whose shapes differ (the model's discrete world of 9 places and 8 colours switches somewhere,
    # in a prompt-and-seed walk between the same prompts as much: it is measured beside it)
    from sdexplore.embedded.scenes import parse_prompt, render_scene
    from sdexplore.inversion import invert

    a = inversions[0]
    again = invert(pipe, render_scene(a.prompt, seed=200)[0], a.prompt, steps=args.steps)
    shape = parse_prompt(a.prompt).shape
    b = next((v for v in inversions[1:] if parse_prompt(v.prompt).shape != shape), inversions[1])
    walked = {}
    for name, (x, y) in {"one prompt, two renders": (a, again), "two scenes": (a, b)}.items():
        walked[name] = {"from": x.prompt, "to": y.prompt, **measure_walk(pipe, x, y, args.frames)}
        print(f"\nwalk, {name}: {x.prompt!r} -> {y.prompt!r}, {args.frames} frames:")
        print(json.dumps(walked[name], indent=1), flush=True)

    timing = (
        measure_time(pipe, rows[0]["prompt"], rows[0]["seed"], args.steps, args.pairs) if args.pairs else {}
    )
    for k, v in timing.items():
        print(f"time, {k}: {v['median']:.2f} (95% interval {v['lo']:.2f}–{v['hi']:.2f}, {v['n']} pairs)")
    result = {
        "rows": rows,
        "mean_gap": gaps,
        "mean_iou": iou,
        "walk": walked,
        "time_ratio": timing,
        "steps": args.steps,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
