"""Run every benchmark (benchmarks/bench_*.py) and print ratios against the plain pipeline.

CPU (default): the embedded model at its native 64×64. GPU (``--gpu``): an SD-1.5-shaped pipeline with
random weights (same compute as the checkpoint), fp16, 512×512. Each bench module exposes
``benchmark(pipe, *, device, repeats, gpu) -> list[dict]``; every row is measured interleaved with the
plain call in the same process.

    python benchmarks/run.py                 # CPU set
    python benchmarks/run.py --gpu           # GPU set
    python benchmarks/run.py --only steps    # one module
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

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
    ap.add_argument("--gpu", action="store_true", help="run the GPU set (needs CUDA)")
    ap.add_argument("--only", nargs="*", default=None, help="module names, e.g. steps attention walks")
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per variant (default 5 CPU, 3 GPU)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if args.gpu and not torch.cuda.is_available():
        ap.error("--gpu needs a CUDA GPU; run without --gpu for the CPU set")
    repeats = args.repeats or (3 if args.gpu else 5)
    if not args.gpu:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe, device = _load_pipe(args.gpu)
    machine = (
        torch.cuda.get_device_name()
        if args.gpu
        else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"
    )
    rows = []
    for path in sorted(HERE.glob("bench_*.py")):
        area = path.stem.removeprefix("bench_")
        if args.only and area not in args.only:
            continue
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        t0 = time.perf_counter()
        got = mod.benchmark(pipe, device=device, repeats=repeats, gpu=args.gpu)
        print(f"[{area}] {len(got)} rows in {time.perf_counter() - t0:.1f} s", flush=True)
        for r in got:
            print(_row(r), flush=True)
        rows.extend(got)
        if args.json:  # after every module, so an interrupted run keeps what it measured
            args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"\nmachine: {machine}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}")
    print(f"{'group':<11} {'variant':<48} {'s/call':>8} {'ratio':>7} {'peak MiB':>9} {'extra MiB':>9}")
    for r in rows:
        print(_row(r))
    return 0


def _row(r: dict) -> str:
    return (
        f"{r['group']:<11} {r['name'][:48]:<48} {r['seconds']:>8.3f} {r['ratio']:>7.3f} "
        f"{r['peak_mib']:>9.0f} {r['extra_mib']:>9.0f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
