"""Heat-map math: resize, normalise, threshold (Otsu / mean), IoU and mean IoU. Pure tensor functions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Normalization = Literal["mass", "minmax", "sum"]


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))


def resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize maps ``(..., h, w)`` to ``size`` = (H, W): bilinear, antialiased when shrinking.

    Every output pixel is a convex combination of input pixels, so maps that sum to 1 over tokens at each
    pixel still do after resizing (no renormalisation needed).
    """
    maps = _as_tensor(maps)
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(1, -1, *maps.shape[-2:]).float()  # (1, N, h, w)
    out = F.interpolate(flat, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*lead, *size).to(maps.dtype)  # (..., H, W)


def upsample(maps: torch.Tensor, size: tuple[int, int] | int) -> torch.Tensor:
    """Upsample maps ``(..., h, w)`` to ``size`` (e.g. the image's pixel size); an int means a square."""
    if isinstance(size, int):
        size = (size, size)
    return resize(maps, size)


def normalize(maps: torch.Tensor, mode: Normalization = "minmax", eps: float = 1e-12) -> torch.Tensor:
    """Normalise each map ``(..., h, w)`` over its last two dims.

    - ``"mass"``: unchanged raw attention mass (mean probability a pixel's query gives the token, in [0, 1]);
      comparable across words, steps and images. The value stored in :class:`AttentionMaps`.
    - ``"minmax"``: per-map min-max to [0, 1]; shows the shape of each map, hides its strength (the default
      for display). A constant map becomes all zeros.
    - ``"sum"``: divide by the map's total so it sums to 1 over pixels (a spatial distribution).
    """
    maps = _as_tensor(maps).float()
    if mode == "mass":
        return maps
    if mode == "minmax":
        lo = maps.amin(dim=(-2, -1), keepdim=True)
        hi = maps.amax(dim=(-2, -1), keepdim=True)
        return (maps - lo) / (hi - lo).clamp_min(eps)
    if mode == "sum":
        return maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(eps)
    raise ValueError(f"Unknown normalisation {mode!r}; choose 'mass', 'minmax' or 'sum'.")


def otsu_threshold(values: torch.Tensor, bins: int = 256) -> float:
    """Otsu's threshold (Otsu 1979): the cut maximising the between-class variance of a histogram."""
    v = _as_tensor(values).detach().float().flatten().cpu()
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        return hi
    hist = torch.histc(v, bins=bins, min=lo, max=hi).double()
    centers = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centers = (centers[:-1] + centers[1:]) / 2
    w0 = hist.cumsum(0)
    w1 = hist.sum() - w0
    m0 = (hist * centers).cumsum(0) / w0.clamp_min(1e-12)
    m1 = ((hist * centers).sum() - (hist * centers).cumsum(0)) / w1.clamp_min(1e-12)
    between = w0 * w1 * (m0 - m1) ** 2
    between = between[:-1]
    best = torch.nonzero(between >= between.max() * (1 - 1e-9)).flatten()
    k = int(
        best[len(best) // 2]
    )  # cut between bin k and k+1; middle of a flat optimum (a gap between classes)
    return float((centers[k] + centers[k + 1]) / 2)


def threshold(maps: torch.Tensor, method: Literal["otsu", "mean"] | float = "otsu") -> torch.Tensor:
    """Binary masks from maps ``(..., h, w)``, each map thresholded on its own.

    ``"otsu"``: Otsu's threshold on the map's values (works without a tuned constant; the default).
    ``"mean"``: pixels above the map's mean. A float: pixels above that fraction of the map's min-max range
    (e.g. 0.4, as in DAAM's evaluation).
    """
    maps = _as_tensor(maps).float()
    flat = maps.reshape(-1, *maps.shape[-2:])  # (N, h, w)
    out = torch.empty_like(flat, dtype=torch.bool)
    for i, m in enumerate(flat):
        if method == "otsu":
            out[i] = m > otsu_threshold(m)
        elif method == "mean":
            out[i] = m > m.mean()
        elif isinstance(method, (int, float)):
            out[i] = normalize(m, "minmax") > float(method)
        else:
            raise ValueError(
                f"Unknown threshold method {method!r}; choose 'otsu', 'mean' or a float in [0, 1]."
            )
    return out.reshape(maps.shape)


def iou(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 when both are empty)."""
    a, b = _as_tensor(a).bool(), _as_tensor(b).bool()
    if a.shape != b.shape:
        raise ValueError(f"Masks differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}; resize one first.")
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def mean_iou(
    predictions: Iterable[torch.Tensor | np.ndarray], targets: Sequence[torch.Tensor | np.ndarray]
) -> float:
    """Mean IoU over pairs of boolean masks (mIoU, as in DAAM's and segmentation evaluations)."""
    scores = [iou(p, t) for p, t in zip(predictions, targets, strict=True)]
    if not scores:
        raise ValueError("mean_iou needs at least one (prediction, target) pair.")
    return float(sum(scores) / len(scores))
