"""Cost at real sizes (issue 33): memory and host time of step and attention recording on real-shaped pipelines.

Rows (``ROWS``): SD-1.5 at 256² and 512², SDXL at 512² and 1024², SD3.5-medium and Flux.1-dev at 512² and 1024²,
each a pipeline with the real denoiser and random weights (``_shaped.py`` says what is real and what is reduced:
the text encoders are shallower, the VAE is not run, Flux.1 has 2 + 4 of its 19 + 38 blocks on the CPU). Each row
runs in its own subprocess, so peaks never mix, and measures four calls of ``sdexplore.observe`` in paired order
(``_paired.run_pairs``: plain and recorded calls, ABBA):

- ``steps``: ``observe(pipe, steps=True)`` (default quantities, a preview every step);
- ``attention``: ``observe(pipe, steps=False, attention=True)`` (default settings: every token, per-step maps);
- ``both``: ``observe(pipe, steps=True, attention=True)``.

For each: the peak resident memory of the call over the plain call's (Linux's peak RSS, ``VmHWM``, reset before
each call; on a GPU the allocator's peak as well), the bytes of the stored results (``obs.steps.nbytes``,
``obs.attention.nbytes``) and the host time per step as a ratio to the plain call's (process CPU time on the CPU;
wall time with the device synchronised on a GPU). Calls return latents (``output_type="latent"``).

Extrapolations, by the growth laws of ``tests/test_attention_budget.py``: the stored trace and per-step maps grow
linearly in steps (the rest of the stored maps does not), so ``at50`` adds the stored bytes of 50 steps to the
measured peak; attention maps grow linearly in layers, so Flux.1's ``full_depth`` scales the layers' part to 57.

    python benchmarks/bench_scale.py --quick                  # the smallest row (SD-1.5 at 256²)
    nice -n 10 python benchmarks/bench_scale.py               # the CPU table, row by row (hours on 2 cores)
    python benchmarks/bench_scale.py --rows sdxl-1024 --json scale.json
    python benchmarks/bench_scale.py --dry --quick            # the code path on the tiny fixtures (seconds)
    nice -n 10 python benchmarks/bench_scale.py --rows sdxl-1024 sd15-512 --until 01:05 --json scale.json

On the CPU the model runs in bf16 (AMX: about 5× float32's matmul throughput here), 1–2 steps per call, so the
recorders' fixed costs per call (set-up, building the maps at the end) are not spread over 50 steps: the time
ratios are upper bounds of a long run's.

The GPU rows, one prepared command (bf16, 20 steps, 3 ABBA pairs; SD-1.5 512², then Flux.1-dev 1024² at its full
19 + 38 blocks (24 GB of bf16 weights), SDXL 1024², SD3.5-medium 1024²; within ``--budget`` 540 s, so it fits one
10-minute command of a 15-minute lease; rows past the budget are listed with the command that runs them). It needs
torch with CUDA, diffusers ≥ 0.42 and transformers on the machine, nothing from the Hub:

    python benchmarks/bench_scale.py --gpu --json "$OUT/scale-gpu.json"
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime as dt
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
if (
    str(HERE.parent) not in sys.path
):  # the checkout's sdexplore where it is not installed (a lent GPU machine)
    sys.path.append(str(HERE.parent))

import _shaped  # noqa: E402
from _paired import Summary, median_interval, run_pairs  # noqa: E402

PROMPT = "a big red circle at the top left on a blue background"
MIB = 2**20


@dataclass(frozen=True)
class Row:
    """One benchmark row: a model at a size, with the steps and pairs used on the CPU."""

    name: str
    model: str  # a key of _shaped.MODELS
    size: int  # pixels per side
    steps: int = 2  # denoising steps per call on the CPU (1 where a step takes minutes)
    pairs: int = 2  # ABBA pairs per variant on the CPU (AB + BA)


ROWS: dict[str, Row] = {
    r.name: r
    for r in (
        Row("sd15-256", "sd15", 256),
        Row("sd15-512", "sd15", 512),
        Row("sdxl-512", "sdxl", 512),
        Row("sdxl-1024", "sdxl", 1024, steps=1),
        Row("sd35m-512", "sd35m", 512, steps=1),
        Row("sd35m-1024", "sd35m", 1024, steps=1, pairs=1),
        Row("flux1-512", "flux1", 512, steps=1),
        Row("flux1-1024", "flux1", 1024, steps=1, pairs=1),
    )
}
#: ``--quick``: the smallest row.
QUICK_ROW = "sd15-256"
#: ``--gpu``: the rows of the prepared GPU command (bf16, 20 steps); Flux.1 at its full 19 + 38 blocks.
GPU_ROWS = ("sd15-512", "sdxl-1024", "flux1-1024", "sd35m-1024")
GPU_STEPS = 20
GPU_PAIRS = 3
#: ``--dry``: the tiny fixture family standing in for each model (64², float32, the same code path).
DRY_FAMILY = {"sd15": "sd1", "sdxl": "sdxl", "sd35m": "sd3", "flux1": "flux"}
#: (name, observe() keyword arguments) of the recorded variants, in the order they are reported.
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("steps", {"steps": True}),
    ("attention", {"steps": False, "attention": True}),
    ("both", {"steps": True, "attention": True}),
)
#: Issue 33's targets.
TARGET_ATTENTION_MIB_SDXL_1024 = 300.0  # attention capture of every token at 1024² on SDXL, default settings
TARGET_STEPS_MIB_50 = 50.0  # steps with previews, 50 steps
TARGET_RATIO = {"steps": 1.03, "attention": 1.05}  # host time per step at 512²/1024² on the CPU
EXTRAPOLATE_STEPS = 50


# ---- peak memory -------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]


class PeakMemory:
    """Peak resident memory of this process over a window, above its resident memory at the window's start.

    Linux keeps the peak RSS (``VmHWM``); writing 5 to ``/proc/self/clear_refs`` resets it to the current RSS, so
    the peak of each call is exact, with no sampling. Before each window the garbage collector runs and glibc
    hands its free pages back (``malloc_trim``), so every call starts from what is live. On CUDA the
    allocator's peak above its allocation at the start is read too.
    """

    def __init__(self, device: str = "cpu") -> None:
        self.cuda = device.startswith("cuda")
        try:
            self._trim: Callable[[int], int] | None = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:  # not glibc
            self._trim = None
        self.base = 0
        self.cuda_base = 0

    def start(self) -> None:
        """Open a window: collect, trim, reset the peaks, remember where the window starts."""
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        self.base = _status_kib("VmRSS") * 1024
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.cuda_base = torch.cuda.memory_allocated()

    def stop(self) -> dict[str, float]:
        """Close the window: ``peak`` (bytes of RSS above the start) and, on CUDA, ``cuda_peak``."""
        out = {"peak": float(_status_kib("VmHWM") * 1024 - self.base)}
        if self.cuda:
            torch.cuda.synchronize()
            out["cuda_peak"] = float(torch.cuda.max_memory_allocated() - self.cuda_base)
        return out


def peak_memory_supported() -> bool:
    """Whether this system lets a process read and reset its peak RSS (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_kib("VmHWM")
        return True
    except (OSError, AttributeError):
        return False


# ---- one row -------------------------------------------------------------------------------------------------
def _build(
    row: Row, *, dry: bool, gpu: bool, flux_blocks: tuple[int, int] | None
) -> tuple[Any, dict, str, str]:
    """(pipe, call kwargs, what is reduced, device) for ``row``."""
    if dry:
        from sdexplore.fixtures import tiny_pipeline

        pipe = tiny_pipeline(DRY_FAMILY[row.model])  # type: ignore[arg-type]
        return pipe, {}, f"tiny {DRY_FAMILY[row.model]} fixture at 64², float32 (code path only)", "cpu"
    device = "cuda" if gpu else "cpu"
    blocks = flux_blocks or (_shaped.FLUX_REAL_BLOCKS if gpu else _shaped.FLUX_BLOCKS)
    shaped = _shaped.build(row.model, device=device, dtype=torch.bfloat16, flux_blocks=blocks)
    return shaped.pipe, shaped.call, shaped.reduced, device


def _denoiser(pipe: Any) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def _layers_per_block(pipe: Any) -> tuple[int, int] | None:
    """Flux.1's built (double, single) blocks, or None for other models."""
    den = _denoiser(pipe)
    if not hasattr(den, "single_transformer_blocks"):
        return None
    return len(den.transformer_blocks), len(den.single_transformer_blocks)


def run_row(
    name: str,
    *,
    steps: int | None = None,
    pairs: int | None = None,
    dry: bool = False,
    gpu: bool = False,
    flux_blocks: tuple[int, int] | None = None,
    stop_at: float | None = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Build row ``name``'s pipeline, then measure plain and recorded calls in ABBA pairs (see the module doc).

    ``dry`` runs the same code on the row's tiny fixture at 64² (float32, CPU). With ``stop_at`` (seconds since
    the epoch), no pair starts that would end after it, as far as the pairs so far tell (the first pair always
    runs; AB and BA stay balanced). Returns plain data (JSON-ready).
    """
    row = ROWS[name]
    steps = steps or (GPU_STEPS if gpu else (2 if dry else row.steps))
    pairs = pairs or (GPU_PAIRS if gpu else row.pairs)
    size = 64 if dry else row.size
    t0 = time.perf_counter()
    pipe, call_kw, reduced, device = _build(row, dry=dry, gpu=gpu, flux_blocks=flux_blocks)
    build_s = time.perf_counter() - t0
    den = _denoiser(pipe)
    meter = PeakMemory(device)
    if log:
        params = sum(p.numel() for p in den.parameters())
        log(
            f"[{name}] built in {build_s:.0f} s: {type(den).__name__}, {params / 1e9:.3f} B parameters, {den.dtype}"
        )

    def call(n: int = steps) -> Any:
        gen = torch.Generator(device).manual_seed(0)
        kw = dict(num_inference_steps=n, height=size, width=size, output_type="latent", **call_kw)
        return pipe(PROMPT, generator=gen, **kw).images

    stored: dict[str, dict[str, Any]] = {}

    def observed(variant: str, options: dict[str, Any], n: int = steps) -> Callable[[], Any]:
        def run() -> Any:
            import sdexplore

            with sdexplore.observe(pipe, **options) as obs:
                call(n)
            got: dict[str, Any] = {}
            if options.get("steps"):
                trace = obs.steps  # the trace, read as a user would
                final = trace.final_latents
                got["trace_bytes"] = trace.nbytes
                got["trace_final_bytes"] = 0 if final is None else final.numel() * final.element_size()
                got["trace_records"] = len(trace.steps)
            if options.get("attention"):
                maps = obs.attention  # built on first read: part of the recorder's cost
                got["attention_bytes"] = maps.nbytes
                step_part = maps.timesteps.numel() * 4 + (0 if maps.steps is None else maps.steps.numel() * 4)
                got["attention_step_bytes"] = step_part  # the part that grows with steps
                got["attention_layer_bytes"] = [m.numel() * m.element_size() for m in maps.layers.values()]
                got["layers"] = len(maps.layer_names)
                got["text_keys"] = int(maps.aggregate.shape[1])
                got["latent"] = list(maps.aggregate.shape[-2:])
                got["finest_grid"] = max(m.shape[-2] * m.shape[-1] for m in maps.layers.values())
                got["calls"] = maps.num_steps
            stored[variant] = got
            return obs  # kept alive until the window closes: the stored results are part of the peak

        return run

    def measured(fn: Callable[[], Any]) -> Callable[[], dict[str, float]]:
        def measure() -> dict[str, float]:
            meter.start()
            t_cpu, t_wall = time.process_time(), time.perf_counter()
            out = fn()
            if gpu:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t_wall
            got = {"time": wall if gpu else time.process_time() - t_cpu, "wall": wall, **meter.stop()}
            del out
            return got

        return measure

    # warm-up: one 1-step call plain and one with both recorders (kernels for these shapes, first-call costs)
    t1 = time.perf_counter()
    measured(lambda: call(1))()
    measured(observed("warmup", {"steps": True, "attention": True}, 1))()
    stored.clear()
    warm_s = time.perf_counter() - t1
    if log:
        log(
            f"[{name}] warm-up (2 one-step calls) {warm_s:.0f} s; {pairs} ABBA pair(s) × 3 variants × {steps} steps"
        )
    t_pairs = time.time()

    def keep_going(series: dict) -> bool:
        done = len(next(iter(series.values())).orders)
        return stop_at is None or time.time() + (time.time() - t_pairs) / max(done, 1) < stop_at

    variants = {v: measured(observed(v, o)) for v, o in VARIANTS}
    series = run_pairs(measured(call), variants, pairs=pairs, warmup=0, keep_going=keep_going, min_pairs=1)
    return _summarise(
        row,
        series,
        stored,
        pipe=pipe,
        steps=steps,
        size=size,
        dry=dry,
        gpu=gpu,
        device=device,
        reduced=reduced,
        build_s=build_s,
        warm_s=warm_s,
        total_s=time.perf_counter() - t0,
    )


def _summarise(
    row: Row,
    series: dict,
    stored: dict,
    *,
    pipe: Any,
    steps: int,
    size: int,
    dry: bool,
    gpu: bool,
    device: str,
    reduced: str,
    build_s: float,
    warm_s: float,
    total_s: float,
) -> dict[str, Any]:
    den = _denoiser(pipe)
    plain_time = [p["time"] for p in series["steps"].plain]
    out: dict[str, Any] = {
        "row": row.name,
        "model": row.model,
        "size": size,
        "steps": steps,
        "pairs": len(series["steps"].orders),
        "orders": series["steps"].orders,
        "dry": dry,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": str(den.dtype).removeprefix("torch."),
        "reduced": reduced,
        "denoiser": type(den).__name__,
        "denoiser_params": sum(p.numel() for p in den.parameters()),
        "published_params": None if dry else _published_params(row.model),
        "build_s": build_s,
        "warmup_s": warm_s,
        "total_s": total_s,
        "time": "wall s, device synchronised" if gpu else "process CPU s (all threads)",
        "plain_s_per_step": _asdict(median_interval(plain_time).scaled(1 / steps)),
        "plain_peak_mib": _asdict(
            median_interval([p["peak"] / MIB for s in series.values() for p in s.plain])
        ),
        "ratio": {},
        "extra_mib": {},
        "extra_cuda_mib": {},
        "stored": stored,
    }
    for name, s in series.items():
        out["ratio"][name] = _asdict(median_interval(s.ratios("time")))
        out["extra_mib"][name] = _asdict(median_interval([d / MIB for d in s.differences("peak")]))
        if gpu:
            out["extra_cuda_mib"][name] = _asdict(
                median_interval([d / MIB for d in s.differences("cuda_peak")])
            )
    att = stored.get("attention", {})
    if att:
        out["image_tokens"] = att["finest_grid"]  # query positions of the finest captured layer
        out["text_keys"] = att["text_keys"]
        out["layers"] = att["layers"]
    out["at50"] = _at_steps(out, EXTRAPOLATE_STEPS)
    blocks = _layers_per_block(pipe)
    if blocks is not None and not dry and blocks != _shaped.FLUX_REAL_BLOCKS and att:
        out["full_depth"] = _at_depth(out, blocks, _shaped.FLUX_REAL_BLOCKS)
    return out


def _asdict(s: Summary) -> dict[str, float]:
    return dataclasses.asdict(s)


def _published_params(model: str) -> int:
    return sum(p.numel() for p in _shaped.meta_denoiser(model).parameters())


def _at_steps(r: dict[str, Any], n: int) -> dict[str, float]:
    """The stored bytes and the peak extra at ``n`` steps, by the growth law in steps: the trace's per-step
    records and the per-step attention maps grow linearly, nothing else (the transient peak of one step does not
    grow with steps)."""
    k = n / r["steps"]
    st, out = r["stored"], {}
    if "steps" in st:
        s = st["steps"]
        grow = s["trace_bytes"] - s["trace_final_bytes"]
        out["trace_bytes"] = s["trace_final_bytes"] + grow * k
        out["steps_extra_mib"] = r["extra_mib"]["steps"]["median"] + grow * (k - 1) / MIB
    if "attention" in st:
        a = st["attention"]
        out["attention_bytes"] = a["attention_bytes"] + a["attention_step_bytes"] * (k - 1)
        out["attention_extra_mib"] = (
            r["extra_mib"]["attention"]["median"] + a["attention_step_bytes"] * (k - 1) / MIB
        )
    if "both" in st and "steps" in st and "attention" in st:
        grow = (
            st["both"]["trace_bytes"] - st["both"]["trace_final_bytes"] + st["both"]["attention_step_bytes"]
        )
        out["both_extra_mib"] = r["extra_mib"]["both"]["median"] + grow * (k - 1) / MIB
    return out


def _at_depth(r: dict[str, Any], built: tuple[int, int], real: tuple[int, int]) -> dict[str, float]:
    """Flux.1's attention figures at its real depth, by the growth law in layers: one captured layer per block,
    every layer's stored map the same size (one grid), the transient peak of one layer unchanged."""
    a = r["stored"]["attention"]
    per_layer = sum(a["attention_layer_bytes"]) / max(a["layers"], 1)
    layers = a["layers"] * sum(real) // sum(built)
    more = per_layer * (layers - a["layers"])
    at50 = r["at50"]
    return {
        "layers": layers,
        "attention_layer_bytes": per_layer,
        "attention_bytes": a["attention_bytes"] + more,
        "attention_bytes_at50": at50["attention_bytes"] + more,
        "attention_extra_mib": r["extra_mib"]["attention"]["median"] + more / MIB,
        "attention_extra_mib_at50": at50["attention_extra_mib"] + more / MIB,
        # per captured layer per step, over the plain call: the time ratio is per block, so it holds at depth
        "attention_ms_per_layer_step": 1000
        * (r["ratio"]["attention"]["median"] - 1)
        * r["plain_s_per_step"]["median"]
        / a["layers"],
    }


# ---- the table -----------------------------------------------------------------------------------------------
def _fmt_ratio(s: dict[str, float]) -> str:
    if s["n"] < 2:
        return f"{s['median']:.3f}"
    return f"{s['median']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}]"


def format_rows(results: list[dict[str, Any]]) -> str:
    """The results as text: one block per row, figures beside the issue's targets."""
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"{r['row']}: not measured ({r['error']}); to run it: {r.get('command', '')}")
            continue
        lines.append(
            f"{r['row']}: {r['denoiser']} {r['denoiser_params'] / 1e9:.3f} B params ({r['dtype']}, {r['device']}, "
            f"{r['threads']} threads), {r['size']}², {r['steps']} step(s), {r['pairs']} pair(s) {r['orders']}; "
            f"{r.get('image_tokens', '?')} image tokens × {r.get('text_keys', '?')} text keys × "
            f"{r.get('layers', '?')} layers; build {r['build_s']:.0f} s, row {r['total_s']:.0f} s"
        )
        lines.append(f"    reduced: {r['reduced']}")
        lines.append(
            f"    plain: {r['plain_s_per_step']['median']:.2f} s/step ({r['time']}), peak "
            f"{r['plain_peak_mib']['median']:.0f} MiB over the call's start"
        )
        st = r["stored"]
        for v, _ in VARIANTS:
            stored = []
            if "trace_bytes" in st.get(v, {}):
                stored.append(f"trace {st[v]['trace_bytes'] / MIB:.2f}")
            if "attention_bytes" in st.get(v, {}):
                stored.append(f"maps {st[v]['attention_bytes'] / MIB:.2f}")
            target = TARGET_RATIO.get(v)
            verdict = (
                ""
                if target is None
                else (" ≤ " if r["ratio"][v]["median"] <= target else " > ") + f"{target}"
            )
            cuda = f", CUDA extra {r['extra_cuda_mib'][v]['median']:.1f} MiB" if r["extra_cuda_mib"] else ""
            lines.append(
                f"    {v:<9} time ×{_fmt_ratio(r['ratio'][v])}{verdict}; peak extra "
                f"{r['extra_mib'][v]['median']:.1f} MiB{cuda}; stored MiB: {', '.join(stored)}"
            )
        a50 = r["at50"]
        parts = [f"{k.removesuffix('_mib')} {v:.1f} MiB" for k, v in a50.items() if k.endswith("_mib")]
        parts += [
            f"{k.removesuffix('_bytes')} stored {v / MIB:.1f} MiB"
            for k, v in a50.items()
            if k.endswith("bytes")
        ]
        lines.append(f"    at {EXTRAPOLATE_STEPS} steps (growth law): " + "; ".join(parts))
        if "steps_extra_mib" in a50:
            ok = a50["steps_extra_mib"] <= TARGET_STEPS_MIB_50
            lines.append(
                f"      steps ≤ {TARGET_STEPS_MIB_50:.0f} MiB for 50 steps: {'met' if ok else 'NOT met'}"
            )
        if r["row"] == "sdxl-1024" and not r["dry"]:
            ok = r["extra_mib"]["attention"]["median"] <= TARGET_ATTENTION_MIB_SDXL_1024
            lines.append(
                f"      attention ≤ {TARGET_ATTENTION_MIB_SDXL_1024:.0f} MiB at 1024² SDXL: "
                f"{'met' if ok else 'NOT met'}"
            )
        if "full_depth" in r:
            f = r["full_depth"]
            lines.append(
                f"    at Flux.1's full depth (19 + 38 blocks, {f['layers']} layers, growth law in layers): maps "
                f"{f['attention_bytes'] / MIB:.1f} MiB ({f['attention_layer_bytes'] / MIB:.2f} per layer), attention "
                f"extra {f['attention_extra_mib']:.1f} MiB, at 50 steps {f['attention_extra_mib_at50']:.1f} MiB; "
                f"{f['attention_ms_per_layer_step']:.1f} ms per layer per step"
            )
    return "\n".join(lines)


# ---- driver: one subprocess per row ------------------------------------------------------------------------------
def _child_cmd(name: str, out: Path, args: argparse.Namespace, stop_at: float | None = None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--out", str(out)]
    if args.dry:
        cmd.append("--dry")
    if args.gpu:
        cmd.append("--gpu")
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    if args.pairs:
        cmd += ["--pairs", str(args.pairs)]
    if args.flux_blocks:
        cmd += ["--flux-blocks", *map(str, args.flux_blocks)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if stop_at is not None:
        cmd += ["--stop-at", f"{stop_at:.0f}"]
    return cmd


def _deadline(until: str | None) -> float | None:
    """Seconds since the epoch of ``HH:MM`` UTC (today, or tomorrow if already past), or None."""
    if until is None:
        return None
    now = dt.datetime.now(dt.UTC)
    h, m = (int(x) for x in until.split(":"))
    at = now.replace(hour=h, minute=m, second=0, microsecond=0)
    if at <= now:
        at += dt.timedelta(days=1)
    return at.timestamp()


def _machine(gpu: bool) -> str:
    name = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = f"{name}, {os.cpu_count()} cores, {mem:.0f} GiB"
    return f"{torch.cuda.get_device_name()}; host {cpu}" if gpu else cpu


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--rows", nargs="+", choices=list(ROWS), help="rows to run (default: all; --gpu: GPU_ROWS)"
    )
    ap.add_argument("--quick", action="store_true", help=f"only the smallest row ({QUICK_ROW})")
    ap.add_argument("--gpu", action="store_true", help=f"CUDA, bf16, {GPU_STEPS} steps, Flux.1 at full depth")
    ap.add_argument(
        "--dry", action="store_true", help="each row's code path on its tiny fixture (64², seconds)"
    )
    ap.add_argument("--steps", type=int, help="steps per call (default: the row's; --gpu: 20)")
    ap.add_argument("--pairs", type=int, help="ABBA pairs per variant (default: the row's; --gpu: 3)")
    ap.add_argument(
        "--flux-blocks",
        type=int,
        nargs=2,
        metavar=("DOUBLE", "SINGLE"),
        help="Flux.1's blocks to build (default 2 4 on the CPU, 19 38 on a GPU)",
    )
    ap.add_argument(
        "--until", metavar="HH:MM", help="UTC time to stop: no row starts after it, a running one ends"
    )
    ap.add_argument(
        "--budget", type=float, help="seconds for all rows (default: none; --gpu: 540, one 10-minute command)"
    )
    ap.add_argument("--stop-at", type=float, help=argparse.SUPPRESS)
    ap.add_argument(
        "--threads", type=int, help="torch threads in each row (default: torch's, the core count)"
    )
    ap.add_argument("--json", type=Path, help="write the results to this JSON file (after each row)")
    ap.add_argument("--inline", action="store_true", help="run rows in this process (tests; peaks may mix)")
    ap.add_argument("--one", choices=list(ROWS), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for flag in ("steps", "pairs", "threads", "budget"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            ap.error(f"--{flag} must be ≥ 1, got {value}")
    if args.flux_blocks and min(args.flux_blocks) < 1:
        ap.error(f"--flux-blocks needs at least one block of each kind, got {args.flux_blocks}")
    if args.gpu and args.dry:
        ap.error("--dry runs the code path on the CPU; drop --gpu")
    if args.gpu and not torch.cuda.is_available():
        ap.error("--gpu needs a CUDA GPU; run without --gpu for the CPU table, or --dry for the code path")
    if args.until:
        try:
            _deadline(args.until)
        except ValueError:
            ap.error(f"--until takes a UTC time HH:MM, got {args.until!r}")
    if not args.dry and not peak_memory_supported():
        ap.error("peak memory needs Linux's /proc/self/clear_refs; run on Linux (or --dry)")
    if args.one:  # a child: one row, its result to --out
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run_row(
            args.one,
            steps=args.steps,
            pairs=args.pairs,
            dry=args.dry,
            gpu=args.gpu,
            flux_blocks=tuple(args.flux_blocks) if args.flux_blocks else None,
            stop_at=args.stop_at,
            log=lambda m: print(m, flush=True),
        )
        args.out.write_text(json.dumps(result))
        return 0
    rows = [QUICK_ROW] if args.quick else (args.rows or (list(GPU_ROWS) if args.gpu else list(ROWS)))
    budget = args.budget or (540.0 if args.gpu else None)
    ends = [t for t in (_deadline(args.until), budget and time.time() + budget) if t is not None]
    deadline = min(ends) if ends else None
    out: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(args.gpu),
        "torch": torch.__version__,
        "command": " ".join(
            [Path(sys.executable).name, "benchmarks/bench_scale.py", *(argv or sys.argv[1:])]
        ),
        "rows": [],
    }
    print(f"{out['machine']}; torch {out['torch']}; {out['date']}", flush=True)
    for name in rows:
        left = None if deadline is None else deadline - time.time()
        if left is not None and left <= 0:
            result = {"row": name, "error": "not started: the time limit (--until / --budget) was reached"}
            result["command"] = _again(name, args.gpu)
        elif args.inline:
            if args.threads:
                torch.set_num_threads(args.threads)
            result = run_row(
                name,
                steps=args.steps,
                pairs=args.pairs,
                dry=args.dry,
                gpu=args.gpu,
                flux_blocks=tuple(args.flux_blocks) if args.flux_blocks else None,
                stop_at=deadline,
            )
        else:
            result = _run_child(name, args, left, deadline)
        out["rows"].append(result)
        print(format_rows([result]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    print("\n" + format_rows(out["rows"]))
    return 0 if all("error" not in r for r in out["rows"]) else 1


def _run_child(
    name: str, args: argparse.Namespace, timeout: float | None, stop_at: float | None
) -> dict[str, Any]:
    """Run row ``name`` in a fresh process (its peaks alone in it); killed after ``timeout`` seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "row.json"
        try:
            proc = subprocess.run(_child_cmd(name, path, args, stop_at), timeout=timeout)
        except subprocess.TimeoutExpired:
            return {
                "row": name,
                "error": "stopped at the time limit (--until / --budget)",
                "command": _again(name, args.gpu),
            }
        if proc.returncode != 0 or not path.exists():
            return {
                "row": name,
                "error": f"the row's process exited with {proc.returncode}",
                "command": _again(name, args.gpu),
            }
        return json.loads(path.read_text())


def _again(name: str, gpu: bool) -> str:
    """The command that runs row ``name`` alone."""
    if gpu:
        return f"python benchmarks/bench_scale.py --gpu --rows {name} --json {name}-gpu.json"
    return f"nice -n 10 python benchmarks/bench_scale.py --rows {name} --json {name}.json"


if __name__ == "__main__":
    raise SystemExit(main())
