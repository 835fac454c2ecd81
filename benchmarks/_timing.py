"""Interleaved timing helpers: every benchmark compares against the plain pipeline in the same process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    runs: dict[str, Callable[[], Any]], *, repeats: int = 5, warmup: int = 1, device: str = "cpu"
) -> dict[str, dict[str, float]]:
    """Time each callable ``repeats`` times, interleaved round-robin (plain, A, B, plain, A, B, ...).

    Interleaving spreads machine noise evenly over the variants. Returns, per name, the median seconds
    and (on CUDA) the peak allocated MiB over that name's runs.
    """
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {k: [] for k in runs}
    peaks: dict[str, float] = {k: 0.0 for k in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if device.startswith("cuda"):
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**20)
    return {k: {"seconds": statistics.median(v), "peak_mib": peaks[k]} for k, v in times.items()}


def rows_vs(results: dict[str, dict[str, float]], baseline: str, group: str) -> list[dict[str, Any]]:
    """Turn :func:`interleaved` results into table rows with a ratio against ``baseline``."""
    base = results[baseline]
    return [
        {
            "group": group,
            "name": name,
            "seconds": r["seconds"],
            "ratio": r["seconds"] / base["seconds"],
            "peak_mib": r["peak_mib"],
            "extra_mib": r["peak_mib"] - base["peak_mib"],
        }
        for name, r in results.items()
    ]
