"""Figures for walks: a strip of frames with their path positions, and the consecutive-frame distance curve."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ...smoothness import Metric, SmoothnessReport, smoothness_report
from ..export import as_uint8_frames
from ..render import spread


def plot_frame_strip(walk: Any, *, count: int = 8, height: float = 1.6) -> Figure:
    """One row of frames from a :class:`~sdexplore.walks.Walk` (or an ``(N, H, W, 3)`` array), keyframes included.

    Each frame is titled with its index; on a Walk, keyframes are outlined and labelled with their prompt/seed.
    """
    frames = as_uint8_frames(walk)
    keyframes = list(getattr(walk, "keyframe_frames", []))
    picks = spread(len(frames), count, keep=keyframes)
    fig = Figure(figsize=(height * len(picks), height + 0.5), layout="constrained")
    axes = fig.subplots(1, len(picks), squeeze=False)[0]
    for ax, k in zip(axes, picks, strict=True):
        ax.imshow(frames[k])
        ax.set_xticks([])
        ax.set_yticks([])
        title = f"frame {k}"
        if k in keyframes:
            i = keyframes.index(k)
            prompt = (walk.prompts[i] or "embedding")[:18]
            title = f"{k}: {prompt}\nseed {walk.seeds[i]}"
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:red")
                spine.set_linewidth(2.5)
        ax.set_title(title, fontsize=7)
    return fig


def plot_smoothness(walk_or_report: Any, *, metric: Metric = "pixel", top: int = 3) -> Figure:
    """Distance between consecutive frames (one bar per step), the mean, and the largest jumps in red.

    Takes a Walk, an ``(N, H, W, 3)`` array, or a :class:`~sdexplore.smoothness.SmoothnessReport`.
    """
    if isinstance(walk_or_report, SmoothnessReport):
        report = walk_or_report
    else:
        report = smoothness_report(as_uint8_frames(walk_or_report), metric, top=top)
    d = report.distances
    steps = np.arange(d.size)
    colours = ["tab:red" if i in report.jumps else "tab:blue" for i in steps]
    fig = Figure(figsize=(max(5.0, 0.25 * d.size + 2), 3.0), layout="constrained")
    ax = fig.subplots()
    ax.bar(steps + 0.5, d, width=0.8, color=colours)
    ax.axhline(report.mean, color="k", linestyle="--", linewidth=1, label=f"mean {report.mean:.3f}")
    ax.set_xlabel("frame i → i + 1 (red: largest jumps)")
    ax.set_ylabel(f"{report.metric} distance")
    ax.set_xlim(0, d.size)
    ax.set_ylim(0, 1.25 * float(d.max()) if d.max() > 0 else 1.0)  # headroom for the legend
    ax.set_title(f"max {report.max:.3f}, smoothness 1 − Gini = {report.smoothness:.3f}", fontsize=9)
    ax.legend(fontsize=8, loc="upper right")
    return fig
