"""How smooth is a walk: distances between consecutive frames, their evenness (1 − Gini) and the largest jumps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Metric = Literal["pixel", "lowres"]


def _as_float(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 or float → float32 in [0, 1]."""
    arr = np.asarray(images)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    return arr.astype(np.float32)


def _downsample(x: np.ndarray, side: int = 16) -> np.ndarray:
    """Area-average (N, H, W, C) down to at most ``side`` cells per axis (crops the remainder)."""
    n, h, w, c = x.shape
    fh, fw = max(1, h // side), max(1, w // side)
    x = x[:, : (h // fh) * fh, : (w // fw) * fw]
    return x.reshape(n, h // fh, fh, w // fw, fw, c).mean(
        axis=(2, 4)
    )  # (N, h', fh, w', fw, C) → (N, h', w', C)


def frame_distances(images: np.ndarray, metric: Metric = "pixel") -> np.ndarray:
    """Distance between each pair of consecutive frames: ``(N − 1,)``.

    "pixel": RMS difference of the RGB values in [0, 1]. "lowres": the same after area-averaging each frame
    to 16×16 cells, a cheap perceptual-ish proxy that follows layout and colour and ignores fine texture.
    """
    x = _as_float(images)
    if x.ndim != 4 or x.shape[0] < 2:
        raise ValueError(f"Need frames shaped (N >= 2, H, W, C), got {x.shape}.")
    if metric == "lowres":
        x = _downsample(x)
    elif metric != "pixel":
        raise ValueError(f"Unknown metric {metric!r}; choose 'pixel' or 'lowres'.")
    diff = x[1:] - x[:-1]  # (N-1, H, W, C)
    return np.sqrt((diff**2).reshape(diff.shape[0], -1).mean(axis=1))


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values: 0 when all equal, → 1 when one value holds everything."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = v.size
    if n == 0 or v.sum() <= 0:
        return 0.0
    index = np.arange(1, n + 1)
    return float((2 * index - n - 1).dot(v) / (n * v.sum()))


@dataclass
class SmoothnessReport:
    """Consecutive-frame distances of a walk and how evenly they are spread (as in AID, NeurIPS 2024)."""

    distances: np.ndarray  # (frames − 1,) distance between frame i and i + 1
    metric: str  # "pixel" or "lowres"
    mean: float  # mean step
    max: float  # largest step
    smoothness: float  # 1 − Gini of the steps: 1 = perfectly even steps
    jumps: list[int]  # indices i of the largest steps (frame i → i + 1), largest first

    def __str__(self) -> str:
        j = ", ".join(f"{i}→{i + 1} ({self.distances[i]:.3f})" for i in self.jumps)
        return (
            f"{len(self.distances) + 1} frames, {self.metric} distance: mean {self.mean:.4f}, max {self.max:.4f}, "
            f"smoothness (1 − Gini) {self.smoothness:.3f}; largest jumps: {j}"
        )


def smoothness_report(images: np.ndarray, metric: Metric = "pixel", *, top: int = 3) -> SmoothnessReport:
    """Measure a sequence of frames ``(N, H, W, 3)``: mean/max step, 1 − Gini, and the ``top`` largest jumps."""
    d = frame_distances(images, metric)
    order = np.argsort(-d, kind="stable")
    return SmoothnessReport(
        distances=d,
        metric=metric,
        mean=float(d.mean()),
        max=float(d.max()),
        smoothness=1.0 - gini(d),
        jumps=[int(i) for i in order[: min(top, d.size)]],
    )


def insertion_plan(distances: np.ndarray, extra: int) -> list[int]:
    """Where to insert ``extra`` frames: greedily split the currently largest step, one frame at a time.

    Returns, for each original step ``i`` (frame i → i + 1), how many frames to insert there; a step split into
    ``m + 1`` parts is assumed to shrink to ``d / (m + 1)``.
    """
    d = np.asarray(distances, dtype=np.float64)
    counts = [0] * d.size
    for _ in range(max(0, extra)):
        i = int(np.argmax(d / (np.asarray(counts) + 1)))
        counts[i] += 1
    return counts
