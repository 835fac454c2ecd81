"""Sweep benchmarks: the sweep machinery's per-item overhead (paired ABBA, process CPU time), throughput of one
vs two CPU processes (torchrun), and the embedded model's held-out evaluation through ``sdexplore sweep``.

    python benchmarks/bench_sweep.py overhead [--pairs 8] [--steps 25]
    python benchmarks/bench_sweep.py throughput [--items 16] [--steps 25]
    python benchmarks/bench_sweep.py heldout --out DIR [--processes 2]   # the model card's 216 prompts
    python benchmarks/bench_sweep.py compare DIR                         # DIR's figures against eval.json

Overhead target: the sweep's item (generation under observation, PNG, word maps, step summaries, scene
reading, atomic folder with checksummed manifest, verification as a resume does) within 5% of the same
observed pipeline call made bare. The held-out evaluation reproduces ``sdexplore/models/tiny-shapes/eval.json``
(batches of 16 as ``embedded.evaluate`` makes them, seed i for prompt i, 25 steps, CFG 3.0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _paired import median_interval, process_clock, run_pairs

import sdexplore
from sdexplore.embedded import scenes
from sdexplore.record.observe import observe
from sdexplore.sweeps import KEEP, SweepItem
from sdexplore.sweeps import folder as fs
from sdexplore.sweeps.execute import run_batch
from sdexplore.sweeps.report import _rows

PROMPT = "a big red circle at the top left on a blue background"
CARD = Path(sdexplore.EMBEDDED_MODEL_DIR) / "eval.json"


def overhead(pairs: int, steps: int) -> None:
    """Paired: bare pipeline call, the same call observed as a sweep observes it, and the sweep's whole item."""
    torch.set_num_threads(1)
    pipe = sdexplore.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": steps, "guidance_scale": sdexplore.EMBEDDED_GUIDANCE_SCALE}
    root = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    counter = iter(range(10**9))

    def bare() -> None:
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)

    def observed() -> None:
        with observe(pipe, steps={"quantities": ("x0", "noise_norm")}, attention={"step_resolution": None}):
            bare()

    def item() -> None:
        it = SweepItem(next(counter), PROMPT, 0)
        ((files, row),) = run_batch(pipe, [it], kwargs, KEEP, scene=True)
        fs.write_item(root, it, files, row, {"seconds": 0.0, "rank": 0, "host": "bench"})
        assert fs.read_item(root, it) is not None

    try:
        machinery = run_pairs(process_clock(observed), {"sweep item": process_clock(item)}, pairs=pairs)
        totals = run_pairs(
            process_clock(bare),
            {"observed call": process_clock(observed), "sweep item": process_clock(item)},
            pairs=pairs,
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load = os.getloadavg()[0]
    print(
        f"embedded model, 64x64, {steps} steps, 1 thread, process CPU seconds, {pairs} ABBA pairs, load {load:.1f}"
    )
    print("| comparison | median ratio | 95% interval | plain call median (s) |")
    print("| --- | --- | --- | --- |")
    for label, series, name in (
        ("sweep item / the same observed call (the machinery)", machinery, "sweep item"),
        ("observed call / bare call", totals, "observed call"),
        ("sweep item / bare call", totals, "sweep item"),
    ):
        s = median_interval(series[name].ratios())
        base = median_interval([p["time"] for p in series[name].plain])
        print(f"| {label} | {s.median:.3f} | {s.lo:.3f}–{s.hi:.3f} | {base.median:.3f} |")


def throughput(items: int, steps: int) -> None:
    """Wall time of `sdexplore sweep` with one process and with two (torchrun), interleaved 1, 2, 2, 1."""
    root = Path(tempfile.mkdtemp(prefix="bench-sweep-tp-"))
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(scenes.validation_prompts()[:items]) + "\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    try:
        for k, n in enumerate((1, 2, 2, 1)):
            out = root / f"run{k}"
            launch = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(n),
            ]
            cmd = launch + [
                "-m",
                "sdexplore",
                "sweep",
                str(prompts),
                "--steps",
                str(steps),
                "--out",
                str(out),
            ]
            t0 = time.perf_counter()
            subprocess.run(cmd + ["--no-progress"], env=env, check=True, capture_output=True)
            wall = time.perf_counter() - t0
            rows = fs.read_index(out / fs.INDEX)
            generating = max(
                sum(r["seconds"] for r in rows if r["rank"] == rank) for rank in {r["rank"] for r in rows}
            )
            runs[n].append((wall, generating))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"{items} items, embedded model, {steps} steps, OMP_NUM_THREADS=1 per process, load {os.getloadavg()[0]:.1f}"
    )
    print(
        "| processes | wall s (incl. start-up) | items/s (wall) | busiest process's item seconds | items/s (items) |"
    )
    print("| --- | --- | --- | --- | --- |")
    for n, values in runs.items():
        wall = sum(v[0] for v in values) / len(values)
        gen = sum(v[1] for v in values) / len(values)
        print(f"| {n} | {wall:.1f} | {items / wall:.2f} | {gen:.1f} | {items / gen:.2f} |")


def heldout(out: Path, processes: int) -> None:
    """Write the held-out prompts (seed i for prompt i) beside ``out`` and sweep them as the card does."""
    prompts = out.with_name(out.name + "-prompts.jsonl")
    lines = [json.dumps({"prompt": p, "seed": i}) for i, p in enumerate(scenes.validation_prompts())]
    prompts.write_text("\n".join(lines) + "\n")
    cmd = [sys.executable, "-m", "sdexplore", "sweep", str(prompts), "--batch-size", "16", "--out", str(out)]
    if processes > 1:
        cmd[1:3] = [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
            "-m",
            "sdexplore",
        ]
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    compare(out)


def compare(out: Path) -> None:
    """The sweep's figures against the model card's (``eval.json``), on the items done so far."""
    card = json.loads(CARD.read_text())
    rows = [r for r in _rows(out) if r["status"] == "done"]  # the verified items: works half-way too
    card_rows = card["rows"]
    n = len(rows)
    same = sum(r["read"] == card_rows[r["item"]]["read"] for r in rows)
    iou_diff = max((abs(r["iou"] - card_rows[r["item"]]["iou"]) for r in rows), default=0.0)
    print(
        f"{n} of {card['n_prompts']} held-out items done; {same} read exactly as on the card; max IoU difference {iou_diff:.2g}"
    )
    print("| figure | sweep | card (same items) | card (all 216) |")
    print("| --- | --- | --- | --- |")
    for part in ("colour", "background", "shape", "place", "all"):
        mine = sum(bool(r[part]) for r in rows) / n
        theirs = sum(_card_part(card_rows[r["item"]], part) for r in rows) / n
        print(f"| {part} | {mine:.4f} | {theirs:.4f} | {card['scores'][part]:.4f} |")
    mine = sum(r["iou"] for r in rows) / n
    theirs = sum(card_rows[r["item"]]["iou"] for r in rows) / n
    print(f"| attention IoU | {mine:.4f} | {theirs:.4f} | {card['attention_iou']:.4f} |")


def _card_part(row: dict, part: str) -> bool:
    if part == "all":  # the card's rows hold the four parts; "all" is every said part right
        return all(row[p] for p in ("colour", "background", "shape", "place") if row[p] is not None)
    return bool(row[part])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--pairs", type=int, default=8)
    o.add_argument("--steps", type=int, default=25)
    t = sub.add_parser("throughput")
    t.add_argument("--items", type=int, default=16)
    t.add_argument("--steps", type=int, default=25)
    h = sub.add_parser("heldout")
    h.add_argument("--out", type=Path, required=True)
    h.add_argument("--processes", type=int, default=1)
    c = sub.add_parser("compare")
    c.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.what == "overhead":
        overhead(args.pairs, args.steps)
    elif args.what == "throughput":
        throughput(args.items, args.steps)
    elif args.what == "heldout":
        heldout(args.out, args.processes)
    else:
        compare(args.out)


if __name__ == "__main__":
    main()
