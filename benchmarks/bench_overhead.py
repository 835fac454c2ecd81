"""Recording overhead in clean numbers: paired plain/recorded calls (ABBA), medians with 95% intervals.

Three instruments, all on the public API ``sdexplore.observe(pipe, steps=..., attention=...)``:

* :func:`cpu_overhead` — host CPU time the recorders add, on the tiny SD 1.x fixture, one thread, 50 steps:
  per pair, (process CPU s of the recorded call − of the plain call) / steps. Targets: steps with a
  preview every step ≤ 0.3 ms per step; attention maps of every token ≤ 0.06 ms per cross-attention layer per step.
* :func:`gpu_paired` — the same three variants on an SD-1.5-shaped fp16 pipeline at 512², time of the denoising
  loop only (CUDA events), per-pair ratios. Targets: steps ≤ 1.02×, attention ≤ 1.05×, both ≤ 1.05×,
  peak memory ≤ 100 MiB extra. ``dry=True`` runs the same code on the tiny fixture with the host clock.
* :func:`count_host_reads` — calls that force a device→host synchronisation on a GPU (``Tensor.item``, ``.cpu()``,
  ``.tolist()``, ``.numpy()``, ``__float__``/``__bool__``/``__int__``/``__index__``/``__format__``/``__array__``,
  ``.to("cpu")``) made during a call after its first step, per step, with the source lines that made them.

    python benchmarks/bench_overhead.py            # the CPU set (≈ 3 min); same as python benchmarks/run.py
    python benchmarks/run.py --gpu                 # the GPU set; --gpu --dry checks it on the CPU
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from _paired import PairedSeries, Summary, median_interval, process_clock, run_pairs
from torch.overrides import TorchFunctionMode

import sdexplore
from sdexplore.families import detect_family

PROMPT = "a big red circle at the top left on a blue background"
GUIDANCE = 7.5

#: (name, observe() keyword arguments) of the three recorded variants, in the order they are reported.
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("steps", {"steps": True}),  # default quantities and a linear preview every step
    ("attention", {"steps": False, "attention": True}),  # per-step maps of every token + aggregate
    ("both", {"steps": True, "attention": True}),
)
#: CPU targets: ms per step for steps, ms per cross-attention layer per step for attention.
CPU_TARGET_STEPS_MS = 0.3
CPU_TARGET_ATTENTION_MS_PER_LAYER = 0.06
#: GPU targets: ratio of the denoising loop's time to the plain loop's; peak memory extra.
GPU_TARGET_RATIO = {"steps": 1.02, "attention": 1.05, "both": 1.05}
GPU_TARGET_EXTRA_MIB = 100.0


# ---- the calls ----------------------------------------------------------------------------------------------------


def _pipe_call(pipe: Any, steps: int, size: int) -> Callable[[], Any]:
    """One seeded text-to-image call that ends with the denoising loop (``output_type="latent"``: no VAE decode)."""
    device = pipe.unet.device.type
    kw = dict(
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        height=size,
        width=size,
        output_type="latent",
    )

    def call() -> Any:
        return pipe(PROMPT, generator=torch.Generator(device).manual_seed(0), **kw).images

    return call


def _observed(pipe: Any, call: Callable[[], Any], options: dict[str, Any]) -> Callable[[], Any]:
    """``call`` inside ``sdexplore.observe(pipe, **options)``, reading the results as a user would (the recorders'
    end-of-call work counts as their cost)."""

    def run() -> Any:
        with sdexplore.observe(pipe, **options) as obs:
            out = call()
        if options.get("steps"):
            obs.steps  # noqa: B018 - the trace of the call
        if options.get("attention"):
            obs.attention  # noqa: B018 - the maps (built on exit)
        return out

    return run


def cross_attention_layer_count(pipe: Any) -> int:
    """How many cross-attention layers the attention recorder captures by default (4 on the tiny fixture, 16 on
    SD 1.5), from the family record."""
    n = len(detect_family(pipe).cross_attention_layers(pipe.unet))
    if n < 1:
        raise ValueError(
            f"{type(pipe.unet).__name__} has no cross-attention layers; use a text-conditioned UNet."
        )
    return n


class _UnetCalls:
    """Counts UNet forward calls during a ``with`` block and runs ``on_call(index)`` before each (a forward pre-hook,
    registered before the recorders' hooks, so it runs ahead of their per-step work)."""

    def __init__(self, unet: torch.nn.Module, on_call: Callable[[int], None]) -> None:
        self.unet = unet
        self.on_call = on_call
        self.calls = 0
        self._handle: Any = None

    def _hook(self, module: Any, args: Any) -> None:
        self.on_call(self.calls)
        self.calls += 1

    def __enter__(self) -> _UnetCalls:
        self.calls = 0
        self._handle = self.unet.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


# ---- host reads (device→host synchronisations) ---------------------------------------------------------------------

_HOST_READS = frozenset(
    {
        "item",
        "cpu",
        "tolist",
        "numpy",
        "__float__",
        "__bool__",
        "__int__",
        "__index__",
        "__format__",
        "__array__",
    }
)
_TORCH_DIR = os.path.dirname(torch.__file__)


def _is_host_copy(args: tuple, kwargs: dict) -> bool:
    """Whether ``Tensor.to(*args, **kwargs)`` is a blocking copy to the host: to the CPU from another device, or to
    a literal ``"cpu"`` (so it would be one on a GPU even when this run is on the CPU). A ``device=`` taken from a
    tensor at run time cannot be told from a no-op on the CPU; the ``--gpu`` run counts those for real.
    ``non_blocking=True`` copies do not wait, so they are not counted."""
    if kwargs.get("non_blocking") or any(a is True for a in args[1:]):
        return False
    src = args[0] if args and isinstance(args[0], torch.Tensor) else None
    for a in (*args[1:], kwargs.get("device")):
        if isinstance(a, str) and a.split(":")[0] == "cpu":
            return True
        if isinstance(a, torch.device) and a.type == "cpu" and src is not None and src.device.type != "cpu":
            return True
    return False


def _caller() -> str:
    """``path:line (function)`` of the innermost frame outside torch and this file."""
    f = sys._getframe(2)
    while f is not None and (f.f_code.co_filename.startswith(_TORCH_DIR) or f.f_code.co_filename == __file__):
        f = f.f_back
    if f is None:
        return "?"
    path = f.f_code.co_filename
    for root in ("site-packages" + os.sep, os.sep + "work" + os.sep):
        if root in path:
            path = path.split(root, 1)[1]
            break
    return f"{path}:{f.f_lineno} ({f.f_code.co_name})"


class HostReadCounter(TorchFunctionMode):
    """Counts tensor calls that read a value back to the host while ``active``; ``sites`` records which source
    line made each ("method [device]: path:line (function)" → count).

    Only calls made from Python are seen (a TorchFunctionMode), which is where a recorder's per-step work runs.
    A read is a device→host synchronisation when its tensor lives on an accelerator: ``device_count`` counts
    those. On the CPU every tensor is a host tensor, so there ``count`` flags the lines that would wait if their
    tensor lived on the GPU (a read of a CPU copy kept on purpose, e.g. of the schedule, would not).
    """

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.sites: Counter[str] = Counter()
        self.device_count = 0

    @property
    def count(self) -> int:
        """How many host reads were counted (of tensors on any device)."""
        return sum(self.sites.values())

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.active:
            name = getattr(func, "__name__", "")
            if name in _HOST_READS or (name == "to" and _is_host_copy(args, kwargs)):
                dev = args[0].device.type if args and isinstance(args[0], torch.Tensor) else "?"
                self.sites[f"{name} [{dev}]: {_caller()}"] += 1
                self.device_count += dev not in ("cpu", "?")
        return func(*args, **kwargs)


def count_host_reads(
    pipe: Any, call: Callable[[], Any], steps: int, options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Host reads per step made while ``call`` runs (inside ``sdexplore.observe(pipe, **options)`` when given),
    from its second UNet call (step 1) until the pipeline returns.

    The first step's one-off set-up (reading the schedule, first-step caches) and the recorders' end-of-call work
    (building maps, the one transfer of the results) are outside the window; the work after the last UNet call
    (its scheduler step and callbacks) is inside. Returns ``per_step`` (count / (steps − 1)), ``device_per_step``
    (reads of tensors on an accelerator: real synchronisations), the counts, and ``sites`` (most frequent first).
    """
    if steps < 2:
        raise ValueError(f"count_host_reads needs steps ≥ 2 (it skips the first step), got {steps}.")
    counter = HostReadCounter()

    def on_call(i: int) -> None:
        if i == 1:
            counter.active = True

    def counted() -> Any:
        try:
            return call()
        finally:
            counter.active = False

    run = counted if options is None else _observed(pipe, counted, options)
    with _UnetCalls(pipe.unet, on_call), counter:
        run()
    return {
        "per_step": counter.count / (steps - 1),
        "device_per_step": counter.device_count / (steps - 1),
        "steps_counted": steps - 1,
        "count": counter.count,
        "device_count": counter.device_count,
        "sites": dict(counter.sites.most_common()),
    }


def host_reads(pipe: Any, steps: int, size: int) -> dict[str, dict[str, Any]]:
    """:func:`count_host_reads` for the plain call and each recorded variant; adds ``recorder_per_step``
    (recorded − plain: what sdexplore itself adds; diffusers' own reads, e.g. DDIM's ``if prev_timestep >= 0``,
    are in the plain count) and ``recorder_sites`` (the sites in sdexplore's files)."""
    call = _pipe_call(pipe, steps, size)
    out = {"plain": count_host_reads(pipe, call, steps)}
    for name, options in VARIANTS:
        got = count_host_reads(pipe, call, steps, options)
        got["recorder_per_step"] = got["per_step"] - out["plain"]["per_step"]
        got["recorder_device_per_step"] = got["device_per_step"] - out["plain"]["device_per_step"]
        got["recorder_sites"] = {k: v for k, v in got["sites"].items() if f"sdexplore{os.sep}" in k}
        out[name] = got
    return out


# ---- CPU: host overhead per step -----------------------------------------------------------------------------------


def cpu_overhead(
    *,
    steps: int = 50,
    max_pairs: int = 200,
    min_pairs: int = 12,
    budget_s: float = 140.0,
    pipe: Any = None,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Host CPU milliseconds the recorders add, per step (and per cross-attention layer per step for attention).

    Runs on one thread (``torch.set_num_threads(1)``) on the tiny SD 1.x fixture at 64², CFG 7.5. Pairs continue
    (round-robin over the variants, ABBA within each) past ``min_pairs`` until every interval is narrower than a
    third of its target on each side, or ``budget_s`` seconds of pairs have run, or ``max_pairs``.
    """
    from sdexplore.fixtures import tiny_pipeline

    torch.set_num_threads(1)
    pipe = pipe if pipe is not None else tiny_pipeline("sd1")
    layers = cross_attention_layer_count(pipe)
    call = _pipe_call(pipe, steps, 64)
    ms_per_step = 1000.0 / steps
    # what each variant's interval is compared with, in seconds of CPU per call
    precision_s = {
        "steps": CPU_TARGET_STEPS_MS / 3 / ms_per_step,
        "attention": CPU_TARGET_ATTENTION_MS_PER_LAYER * layers / 3 / ms_per_step,
        "both": (CPU_TARGET_STEPS_MS + CPU_TARGET_ATTENTION_MS_PER_LAYER * layers) / 3 / ms_per_step,
    }
    variants = {name: process_clock(_observed(pipe, call, options)) for name, options in VARIANTS}
    t0 = time.perf_counter()
    load0 = os.getloadavg()

    def keep_going(series: dict[str, PairedSeries]) -> bool:
        if time.perf_counter() - t0 > budget_s:
            return False
        return any(median_interval(s.differences()).half_width > precision_s[n] for n, s in series.items())

    series = run_pairs(
        process_clock(call), variants, pairs=max_pairs, keep_going=keep_going, min_pairs=min_pairs
    )
    elapsed = time.perf_counter() - t0
    plain = median_interval([p["time"] for p in series["steps"].plain]).scaled(ms_per_step)
    rows = {name: median_interval(s.differences()).scaled(ms_per_step) for name, s in series.items()}
    half = {n: median_interval(s.differences()).half_width for n, s in series.items()}
    precise = all(half[n] <= precision_s[n] for n in series)
    n = rows["steps"].n
    result = {
        "steps": steps,
        "cross_attention_layers": layers,
        "pairs": rows["steps"].n,
        "seconds": elapsed,
        "load_before": load0,
        "load_after": os.getloadavg(),
        "plain_ms_per_step": plain,
        "ms_per_step": rows,
        "attention_ms_per_layer_step": rows["attention"].scaled(1 / layers),
        "orders": series["steps"].orders,
        "stopped": (
            "precision reached"
            if precise
            else ("time budget spent" if n < max_pairs else "max_pairs reached")
        ),
        # pairs the interval would need for ± a third of the target at the spread measured (width ∝ 1/√n)
        "pairs_for_precision": {k: math.ceil(n * (half[k] / precision_s[k]) ** 2) for k in series},
        "raw_cpu_s": {
            k: {"plain": [p["time"] for p in v.plain], "recorded": [r["time"] for r in v.variant]}
            for k, v in series.items()
        },
    }
    if log:
        log(format_cpu(result))
    return result


def _verdict(s: Summary, target: float) -> str:
    if s.hi <= target:
        return "PASS (whole interval within)"
    if s.median <= target:
        return "PASS by the median (interval reaches over)"
    if s.lo > target:
        return "FAIL (whole interval over)"
    return "FAIL by the median (interval reaches under)"


def _fmt(s: Summary, digits: int = 3) -> str:
    return f"{s.median:.{digits}f} [{s.lo:.{digits}f}, {s.hi:.{digits}f}]"


def format_cpu(r: dict[str, Any]) -> str:
    """The CPU figures as a table: median [95% interval] per variant, targets and verdicts beside them."""
    rows = r["ms_per_step"]
    lay = r["cross_attention_layers"]
    att = r["attention_ms_per_layer_step"]
    cov = rows["steps"].coverage
    lines = [
        f"CPU host overhead, tiny SD 1.x fixture 64², {r['steps']} steps, CFG {GUIDANCE}, 1 thread, process CPU time; "
        f"{r['pairs']} ABBA pairs per variant in {r['seconds']:.0f} s ({r['stopped']}); median [{cov:.1%} interval]",
        f"load average (1, 5, 15 min) before {tuple(round(x, 2) for x in r['load_before'])}, "
        f"after {tuple(round(x, 2) for x in r['load_after'])}",
        f"  plain call: {_fmt(r['plain_ms_per_step'])} ms per step",
        f"  (a) steps, preview every step: {_fmt(rows['steps'])} ms/step   target ≤ {CPU_TARGET_STEPS_MS}: "
        f"{_verdict(rows['steps'], CPU_TARGET_STEPS_MS)}",
        f"  (b) attention, every token:   {_fmt(att, 4)} ms/layer/step ({lay} layers; {_fmt(rows['attention'])} "
        f"ms/step)   target ≤ {CPU_TARGET_ATTENTION_MS_PER_LAYER}: "
        f"{_verdict(att, CPU_TARGET_ATTENTION_MS_PER_LAYER)}",
        f"  (c) both:                     {_fmt(rows['both'])} ms/step   (no target; (a) + (b)'s targets = "
        f"{CPU_TARGET_STEPS_MS + CPU_TARGET_ATTENTION_MS_PER_LAYER * lay:.2f})",
        "  pairs needed for an interval of ± a third of the target at this spread: "
        + ", ".join(f"{k} {v}" for k, v in r["pairs_for_precision"].items()),
    ]
    return "\n".join(lines)


def format_host_reads(reads: dict[str, dict[str, Any]], cuda: bool = False) -> str:
    """Host reads per step, plain and recorded, with the sdexplore lines that made them.

    On a GPU the verdict counts reads of device tensors (real synchronisations); on the CPU, every read of a
    tensor from a sdexplore line (each would wait if its tensor lived on the GPU: look at the lines listed).
    """
    key = "device_per_step" if cuda else "per_step"
    what = (
        "device→host syncs (reads of CUDA tensors)"
        if cuda
        else "host reads of tensors (CPU run: all tensors)"
    )
    lines = [f"{what} per step after the first; target: none added by sdexplore"]
    lines.append(f"  plain diffusers: {reads['plain'][key]:.2f}")
    for name, _ in VARIANTS:
        r = reads[name]
        ours = r["recorder_sites"]
        if cuda:
            ours = {k: v for k, v in ours.items() if "[cpu]" not in k}
        verdict = "PASS" if r[f"recorder_{key}"] <= 0 and not ours else "FAIL"
        lines.append(
            f"  {name}: {r[key]:.2f} ({r[f'recorder_{key}']:+.2f} vs plain; "
            f"{sum(ours.values()) / r['steps_counted']:.2f} from sdexplore lines): "
            f"{verdict}"
        )
        for site, n in list(ours.items())[:8]:
            lines.append(f"      {n:>4} × {site}")
    return "\n".join(lines)


# ---- GPU: denoising-loop time ratios -------------------------------------------------------------------------------


class _LoopClock:
    """Times the denoising loop of one call: from the first UNet call to the pipeline's return.

    Why there: a UNet forward pre-hook registered before ``observe`` enters runs ahead of every recorder's work for
    step 0 (``callback_on_step_end`` at step 0 would come after step 0's UNet and scheduler step, and the
    recorders' own callbacks may run before or after a user callback). The end mark is taken right after the
    pipeline returns, still inside the ``observe`` block: with ``output_type="latent"`` only the last step's
    callbacks lie between the loop and it, while text encoding before the loop and the recorders' end-of-call
    work on leaving the block (building maps, copying results to the host) fall outside; ``wall`` times the whole
    call with them. CUDA events on a GPU: they sit in the stream, so nothing waits mid-call and host stalls that
    starve the GPU are timed; ``time.perf_counter`` on the CPU (``dry``).
    """

    def __init__(
        self, pipe: Any, call: Callable[[], Any], cuda: bool, options: dict[str, Any] | None = None
    ) -> None:
        self.pipe, self.call, self.cuda = pipe, call, cuda
        self.run = self._timed if options is None else _observed(pipe, self._timed, options)
        self._start: Any = None
        self._end: Any = None

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _on_unet(self, i: int) -> None:
        if i == 0:
            self._start = self._mark()

    def _timed(self) -> Any:
        out = self.call()
        self._end = self._mark()
        return out

    def __call__(self) -> dict[str, float]:
        self._start = self._end = None
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        wall0 = time.perf_counter()
        with _UnetCalls(self.pipe.unet, self._on_unet):
            self.run()
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - wall0
        if self._start is None or self._end is None:
            raise RuntimeError("The UNet was never called: nothing to time.")
        if self.cuda:
            loop = self._start.elapsed_time(self._end) / 1000.0
            peak = torch.cuda.max_memory_allocated() / 2**20
        else:
            loop, peak = self._end - self._start, float("nan")
        return {"time": loop, "wall": wall, "peak_mib": peak}


def gpu_paired(
    *,
    dry: bool = False,
    pairs: int | None = None,
    steps: int = 20,
    budget_s: float = 200.0,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Loop-time ratios recorded/plain on an SD-1.5-shaped fp16 pipeline at 512² (``dry``: tiny fixture, 64², CPU).

    ``pairs`` (default 24 on the GPU, 2 dry) rounds of ABBA pairs per variant after one warm-up of each; rounds
    stop early once past 20 pairs if ``budget_s`` seconds (counted from the pipeline build) are spent. Also counts
    host reads per step on the same pipeline.
    """
    t0 = time.perf_counter()
    if dry:
        from sdexplore.fixtures import tiny_pipeline

        pipe, size, cuda, machine = (
            tiny_pipeline("sd1"),
            64,
            False,
            "CPU (dry run: tiny SD 1.x fixture, host clock)",
        )
    else:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "gpu_paired needs a CUDA GPU; pass dry=True (run.py --gpu --dry) to check it on the CPU."
            )
        from sdexplore.fixtures import sd15_shaped_pipeline

        pipe, size, cuda = sd15_shaped_pipeline("cuda", torch.float16), 512, True
        machine = torch.cuda.get_device_name()
    pairs = pairs or (2 if dry else 24)
    build_s = time.perf_counter() - t0
    call = _pipe_call(pipe, steps, size)
    plain = _LoopClock(pipe, call, cuda)
    variants = {name: _LoopClock(pipe, call, cuda, options) for name, options in VARIANTS}
    series = run_pairs(
        plain,
        variants,
        pairs=pairs,
        keep_going=lambda _: time.perf_counter() - t0 < budget_s,
        min_pairs=min(pairs, 20),
    )
    reads = host_reads(pipe, steps, size)
    per_step = 1000.0 / steps
    result: dict[str, Any] = {
        "machine": machine,
        "dry": dry,
        "steps": steps,
        "size": size,
        "build_s": build_s,
        "pairs": len(series["steps"].orders),
        "orders": series["steps"].orders,
        "plain_loop_ms_per_step": median_interval([p["time"] for p in series["steps"].plain]).scaled(
            per_step
        ),
        "ratio": {n: median_interval(s.ratios()) for n, s in series.items()},
        "wall_ratio": {n: median_interval(s.ratios("wall")) for n, s in series.items()},
        "extra_ms_per_step": {
            n: median_interval(s.differences()).scaled(per_step) for n, s in series.items()
        },
        "extra_mib": (
            {n: median_interval(s.differences("peak_mib")) for n, s in series.items()} if cuda else None
        ),
        "host_reads": reads,
        "seconds": time.perf_counter() - t0,
    }
    if log:
        log(format_gpu(result))
    return result


def format_gpu(r: dict[str, Any]) -> str:
    """The GPU figures as a table: per-pair ratio median [95% interval], targets and verdicts beside them."""
    cov = r["ratio"]["steps"].coverage
    lines = [
        f"{r['machine']}: SD-1.5-shaped {'tiny fixture' if r['dry'] else 'fp16'} {r['size']}², {r['steps']} steps, "
        f"CFG {GUIDANCE}; denoising loop only; {r['pairs']} ABBA pairs per variant; median [{cov:.1%} interval]; "
        f"{r['seconds']:.0f} s in all ({r['build_s']:.0f} s building the pipeline)",
        f"  plain loop: {_fmt(r['plain_loop_ms_per_step'], 2)} ms per step",
    ]
    for name, _ in VARIANTS:
        ratio = r["ratio"][name]
        target = GPU_TARGET_RATIO[name]
        lines.append(
            f"  {name:<10} ratio {_fmt(ratio)}  (+{_fmt(r['extra_ms_per_step'][name], 2)} ms/step; whole call "
            f"{_fmt(r['wall_ratio'][name])})   target ≤ {target}: {_verdict(ratio, target)}"
        )
    if r["extra_mib"] is None:
        lines.append("  peak memory extra: not measured (no CUDA)")
    else:
        worst = max(r["extra_mib"].values(), key=lambda s: s.median)
        per = ", ".join(f"{n} {s.median:.0f}" for n, s in r["extra_mib"].items())
        lines.append(
            f"  peak memory extra (MiB, median): {per}   target ≤ {GPU_TARGET_EXTRA_MIB:.0f}: "
            f"{_verdict(worst, GPU_TARGET_EXTRA_MIB)}"
        )
    lines.append(format_host_reads(r["host_reads"], cuda=r["extra_mib"] is not None))
    return "\n".join(lines)


def as_json(obj: Any) -> Any:
    """Results with every :class:`Summary` turned into a plain dict (for ``--json``)."""
    if isinstance(obj, Summary):
        return {"median": obj.median, "lo": obj.lo, "hi": obj.hi, "coverage": obj.coverage, "n": obj.n}
    if isinstance(obj, dict):
        return {k: as_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [as_json(v) for v in obj]
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj


def cpu_set(
    *,
    pairs: int | None = None,
    steps: int = 50,
    budget_s: float = 140.0,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """The CPU set: :func:`cpu_overhead` (``pairs`` fixes the count; by default it is chosen from the spread within
    ``budget_s`` seconds of pairs) and the host reads per step on the same fixture."""
    from sdexplore.fixtures import tiny_pipeline

    torch.set_num_threads(1)
    pipe = tiny_pipeline("sd1")
    kw: dict[str, Any] = (
        {"max_pairs": pairs, "min_pairs": pairs, "budget_s": float("inf")}
        if pairs
        else {"budget_s": budget_s}
    )
    result = cpu_overhead(steps=steps, pipe=pipe, log=log, **kw)
    result["host_reads"] = host_reads(pipe, steps, 64)
    if log:
        log(format_host_reads(result["host_reads"]))
    return result


if __name__ == "__main__":
    cpu_set()
