"""Run the benchmarks: the recorders' overhead in clean paired numbers, or the per-feature ratio tables.

Default set (``overhead``, see ``bench_overhead.py``): plain and recorded calls paired in ABBA order, medians with
95% intervals. On the CPU: host CPU ms per step the recorders add on the tiny SD 1.x fixture (≈ 3 min). With
``--gpu``: denoising-loop time ratios on an SD-1.5-shaped fp16 pipeline at 512² (CUDA events, ≥ 20 pairs at
20 steps, < 4 min with the build); ``--gpu --dry`` runs that code path on the tiny fixture with the host clock.
Both also count device→host reads per step.

Per-feature tables (``--only steps attention walks widgets cli``): each ``bench_<area>.py`` exposes
``benchmark(pipe, *, device, repeats, gpu) -> list[dict]``, timed interleaved with the plain call in the same
process, on the embedded model at its native 64×64 (CPU) or the SD-1.5-shaped pipeline (``--gpu``).

    python benchmarks/run.py                      # CPU overhead set (make bench)
    python benchmarks/run.py --gpu                # GPU overhead set (make bench-gpu)
    python benchmarks/run.py --gpu --dry          # the GPU set's code path, on the CPU, 2 pairs
    python benchmarks/run.py --only steps walks   # per-feature ratio tables
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def _load_pipe(gpu: bool):
    if gpu:
        from sdexplore.fixtures import sd15_shaped_pipeline

        return sd15_shaped_pipeline("cuda", torch.float16), "cuda"
    from sdexplore import load_pipeline

    return load_pipeline(device="cpu"), "cpu"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="run the GPU set (needs CUDA unless --dry)")
    ap.add_argument(
        "--dry",
        action="store_true",
        help="with --gpu: the GPU set's code path on the tiny fixture, CPU clock",
    )
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="overhead (default) and/or module names: steps attention walks ...",
    )
    ap.add_argument(
        "--pairs", type=int, default=None, help="overhead set: pairs per variant (default: chosen)"
    )
    ap.add_argument(
        "--steps", type=int, default=None, help="overhead set: steps per call (default 50 CPU, 20 GPU)"
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="overhead set: seconds of pairs before stopping (default 140 CPU, 200 GPU incl. the build)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="module tables: timed repeats per variant (default 5 CPU, 3 GPU)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.dry and not args.gpu:
        ap.error("--dry goes with --gpu (it checks the GPU set on the CPU); the CPU set runs without flags")
    if args.gpu and not args.dry and not torch.cuda.is_available():
        ap.error(
            "--gpu needs a CUDA GPU; run without --gpu for the CPU set, or add --dry to check its code path"
        )
    if args.pairs is not None and args.pairs < 1:
        ap.error(f"--pairs must be ≥ 1, got {args.pairs}")
    if args.budget is not None and args.budget <= 0:
        ap.error(f"--budget must be > 0 seconds, got {args.budget}")
    if args.steps is not None and args.steps < 2:
        ap.error(f"--steps must be ≥ 2 (host reads are counted after the first step), got {args.steps}")
    areas = args.only or ["overhead"]
    known = (
        sorted(  # the per-feature tables; the others (bench_scale.py, bench_vital.py ...) run on their own
            {"overhead"}
            | {
                p.stem.removeprefix("bench_")
                for p in HERE.glob("bench_*.py")
                if "\ndef benchmark(" in p.read_text(encoding="utf-8")
            }
        )
    )
    unknown = [a for a in areas if a not in known]
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {known}")
    if args.dry and areas != ["overhead"]:
        ap.error("--dry runs only the overhead set; drop --only")
    out: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "diffusers": importlib.metadata.version("diffusers"),
        "cpu": _cpu_model(),
    }

    def save() -> None:  # after every part, so an interrupted run keeps what it measured
        if args.json:
            from bench_overhead import as_json

            _write_atomic(args.json, json.dumps(as_json(out), indent=1))

    if "overhead" in areas:
        import bench_overhead

        if args.gpu:
            out["gpu"] = bench_overhead.gpu_paired(
                dry=args.dry, pairs=args.pairs, steps=args.steps or 20, budget_s=args.budget or 200.0
            )
        else:
            out["cpu_overhead"] = bench_overhead.cpu_set(
                pairs=args.pairs, steps=args.steps or 50, budget_s=args.budget or 140.0
            )
        save()
    modules = [a for a in areas if a != "overhead"]
    if modules:
        out["rows"] = _module_tables(modules, gpu=args.gpu, repeats=args.repeats, save=save, out=out)
    print(f"\n{out['cpu']}; torch {out['torch']}; diffusers {out['diffusers']}; {out['date']}")
    return 0


def _module_tables(areas: list[str], *, gpu: bool, repeats: int | None, save: Any, out: dict) -> list[dict]:
    """The per-feature ratio tables of ``bench_<area>.py`` for each area."""
    repeats = repeats or (3 if gpu else 5)
    if not gpu:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe, device = _load_pipe(gpu)
    out["machine"] = (
        torch.cuda.get_device_name()
        if gpu
        else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"
    )
    rows: list[dict] = []
    out["rows"] = rows
    for area in areas:
        path = HERE / f"bench_{area}.py"
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        t0 = time.perf_counter()
        got = mod.benchmark(pipe, device=device, repeats=repeats, gpu=gpu)
        print(f"[{area}] {len(got)} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        for r in got:
            print(_row(r), flush=True)
        rows.extend(got)
        save()
    print(f"\nmachine: {out['machine']}")
    print(f"{'group':<11} {'variant':<48} {'s/call':>8} {'ratio':>7} {'peak MiB':>9} {'extra MiB':>9}")
    for r in rows:
        print(_row(r))
    return rows


def _cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name") and core count."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _row(r: dict) -> str:
    return (
        f"{r['group']:<11} {r['name'][:48]:<48} {r['seconds']:>8.3f} {r['ratio']:>7.3f} "
        f"{r['peak_mib']:>9.0f} {r['extra_mib']:>9.0f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
