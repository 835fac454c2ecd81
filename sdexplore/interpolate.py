"""Pure interpolation math for prompt and noise walks: lerp, slerp, norm-keeping noise paths, circles, keyframes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from .errors import InterpolationError

Tlike = float | Sequence[float] | torch.Tensor
Spacing = Literal["even", "ease"]
Method = Literal["slerp", "lerp", "noise"]

#: Angle (radians) below which slerp falls back to lerp: the two agree to O(angle²) there.
PARALLEL_ANGLE = 1e-4
#: Angle (radians) from π above which slerp refuses: the great circle through antipodes is undefined.
ANTIPODAL_MARGIN = 1e-3
#: Norm under which a vector counts as zero: its direction is undefined, so slerp falls back to lerp.
ZERO_NORM = 1e-12


def _prepare(a: torch.Tensor, b: torch.Tensor, t: Tlike) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes; return (a, b, t) broadcastable, with a leading frame axis when ``t`` is a sequence."""
    if a.shape != b.shape:
        raise InterpolationError(
            f"Cannot interpolate tensors of different shapes {tuple(a.shape)} and {tuple(b.shape)}; "
            "encode both keyframes with the same pipeline and size."
        )
    if isinstance(t, int | float) or (isinstance(t, torch.Tensor) and t.ndim == 0):
        return a, b, torch.tensor(float(t), dtype=torch.float64)
    tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    return a.unsqueeze(0), b.unsqueeze(0), tt.reshape(-1, *([1] * a.ndim))  # (N, 1, ..., 1)


def lerp(a: torch.Tensor, b: torch.Tensor, t: Tlike) -> torch.Tensor:
    """Linear interpolation ``a + t (b − a)``; ``t`` a float or a sequence (then a leading frame axis is added).

    For two independent Gaussian noises the midpoint's norm is only ≈ 0.71 × theirs (the blur/grey
    frames of naive noise walks): use :func:`noise_slerp` for noise.
    """
    a, b, tt = _prepare(a, b, t)
    out = a.double() + tt * (b.double() - a.double())
    return out.to(a.dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: Tlike, *, dim: int = -1) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) of each slice along ``dim``.

    Every slice's direction moves along the great circle from ``a`` to ``b`` at constant angular speed
    (``angle(out, a) = t · angle(a, b)``); its norm is interpolated linearly between ``|a|`` and ``|b|``
    (equal norms are kept exactly, as in Shoemake's formula). ``dim=-1`` on ``(B, tokens, D)`` prompt
    embeddings is per-token slerp; use :func:`noise_slerp` to treat a whole noise tensor as one vector.
    Endpoints are returned exactly. Documented fallbacks: nearly parallel slices (angle < 1e-4 rad) and
    zero-norm slices use :func:`lerp`; antipodal slices (angle within 1e-3 rad of π) raise
    :class:`InterpolationError`, since no unique great circle joins them.
    """
    a, b, tt = _prepare(a, b, t)
    dtype = a.dtype
    a64, b64 = a.double(), b.double()
    na = a64.norm(dim=dim, keepdim=True)  # (..., 1, ...) norm of each slice
    nb = b64.norm(dim=dim, keepdim=True)
    zero = (na < ZERO_NORM) | (nb < ZERO_NORM)
    ua = a64 / na.clamp_min(ZERO_NORM)
    ub = b64 / nb.clamp_min(ZERO_NORM)
    # Angle via 2·atan2(|ua − ub|, |ua + ub|): accurate at every angle, unlike acos of a dot product.
    theta = 2 * torch.atan2((ua - ub).norm(dim=dim, keepdim=True), (ua + ub).norm(dim=dim, keepdim=True))
    if bool(((theta > math.pi - ANTIPODAL_MARGIN) & ~zero).any()):
        raise InterpolationError(
            "slerp between (nearly) opposite vectors is undefined: no unique great circle joins them. "
            "Pick other keyframes, or use lerp / an intermediate keyframe."
        )
    parallel = (theta < PARALLEL_ANGLE) | zero
    sin_theta = torch.sin(theta).clamp_min(1e-300)
    wa = torch.where(parallel, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    wb = torch.where(parallel, tt, torch.sin(tt * theta) / sin_theta)
    direction = wa * ua + wb * ub
    out = ((1 - tt) * na + tt * nb) * direction
    out = torch.where(zero, a64 + tt * (b64 - a64), out)
    out = torch.where(tt == 0, a64, torch.where(tt == 1, b64, out))
    return out.to(dtype)


def noise_slerp(a: torch.Tensor, b: torch.Tensor, t: Tlike) -> torch.Tensor:
    """Slerp two initial noises, each treated as one vector (all its elements), keeping the expected norm.

    Two independent ``N(0, I)`` draws in ``d`` dimensions have norm ≈ √d and are nearly orthogonal, so the
    great-circle path keeps every frame's norm ≈ √d (within 1% for d ≥ 256), which is what a denoiser
    expects of its input; plain :func:`lerp` loses ≈ 29% of the norm at the midpoint.
    """
    if a.shape != b.shape:
        raise InterpolationError(
            f"Noise shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}; use one image size."
        )
    out = slerp(a.reshape(-1), b.reshape(-1), t)  # (d,) or (N, d)
    return out.reshape(*out.shape[:-1], *a.shape)


def circular(a: torch.Tensor, b: torch.Tensor, t: Tlike) -> torch.Tensor:
    """Circular walk ``a cos 2πt + b sin 2πt`` through ``a`` (t=0) and ``b`` (t=¼), closing at t=1.

    For independent Gaussian noises ``a`` and ``b`` every point is again ``N(0, I)`` (cos² + sin² = 1),
    so a loop of frames ``t = k / n`` animates seamlessly; ``t`` is taken modulo 1, so t=1 returns ``a``.
    """
    a, b, tt = _prepare(a, b, t)
    angle = 2 * math.pi * torch.remainder(tt, 1.0)
    out = a.double() * torch.cos(angle) + b.double() * torch.sin(angle)
    out = torch.where(torch.remainder(tt, 1.0) == 0, a.double(), out)
    return out.to(a.dtype)


def add_direction(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Embedding arithmetic: ``x + scale · (b − a)`` (e.g. "a red square" + ("blue" − "red"))."""
    if not (x.shape == a.shape == b.shape):
        raise InterpolationError(
            f"Embedding arithmetic needs equal shapes, got {tuple(x.shape)}, {tuple(a.shape)}, {tuple(b.shape)}."
        )
    return x + scale * (b - a)


def ease(t: float, spacing: Spacing = "even") -> float:
    """Map a segment's local ``t`` in [0, 1]: "even" keeps it, "ease" is cosine ease-in-out (slow at keyframes)."""
    if spacing == "even":
        return t
    if spacing == "ease":
        return (1 - math.cos(math.pi * t)) / 2
    raise InterpolationError(f"Unknown spacing {spacing!r}; choose 'even' or 'ease'.")


@dataclass
class KeyframeSchedule:
    """Where each frame lies on a keyframe path."""

    segments: list[int]  # per frame: index of the keyframe the segment starts at
    ts: list[float]  # per frame: position in its segment, 0 = that keyframe, 1 = the next one
    keyframe_frames: list[int]  # frame index of each keyframe (exact copies of the keyframe)
    loop: bool  # the path returns to keyframe 0 after the last keyframe

    def __len__(self) -> int:
        return len(self.ts)


def keyframe_schedule(
    n_keyframes: int, frames: int, *, spacing: Spacing = "even", loop: bool = False
) -> KeyframeSchedule:
    """Place ``frames`` frames on a path through ``n_keyframes`` keyframes, every keyframe on a frame.

    Keyframes are spread evenly over the frames (keyframe ``i`` at frame ``round(i (frames−1)/(K−1))``, or
    ``round(i·frames/K)`` for a loop, whose last segment returns to keyframe 0 without repeating it);
    inside a segment frames are evenly spaced ("even") or cosine-eased ("ease").
    """
    if n_keyframes < 2:
        raise InterpolationError(f"A walk needs at least 2 keyframes, got {n_keyframes}.")
    if frames < 2:
        raise InterpolationError(f"A walk needs at least 2 frames, got {frames}.")
    n_points = n_keyframes + 1 if loop else n_keyframes  # path points including the closing one
    span = frames if loop else frames - 1
    if span < n_points - 1:
        raise InterpolationError(
            f"{frames} frames cannot hold {n_keyframes} keyframes{' in a loop' if loop else ''}; "
            f"ask for at least {n_points - 1 if loop else n_keyframes} frames."
        )
    pos = [round(i * span / (n_points - 1)) for i in range(n_points)]
    segments, ts = [], []
    for k in range(frames):
        seg = min(max(i for i in range(n_points - 1) if pos[i] <= k), n_points - 2)
        local = (k - pos[seg]) / (pos[seg + 1] - pos[seg])
        segments.append(seg)
        ts.append(ease(local, spacing))
    return KeyframeSchedule(segments, ts, pos[:n_keyframes], loop)


def interpolate_path(
    keyframes: Sequence[torch.Tensor], schedule: KeyframeSchedule, *, method: Method = "slerp"
) -> torch.Tensor:
    """Interpolate keyframe tensors along a :class:`KeyframeSchedule`: returns ``(frames, *keyframe.shape)``.

    ``method``: "slerp" (per slice along the last axis, e.g. per token), "noise" (:func:`noise_slerp`,
    whole tensor as one vector), or "lerp".
    """
    shapes = {tuple(k.shape) for k in keyframes}
    if len(shapes) > 1:
        raise InterpolationError(f"Keyframes have different shapes {sorted(shapes)}; they must match.")
    fn = {"slerp": slerp, "noise": noise_slerp, "lerp": lerp}.get(method)
    if fn is None:
        raise InterpolationError(f"Unknown method {method!r}; choose 'slerp', 'noise' or 'lerp'.")
    n = len(keyframes)
    out = []
    for seg, t in zip(schedule.segments, schedule.ts, strict=True):
        a, b = keyframes[seg], keyframes[(seg + 1) % n]
        out.append(fn(a, b, t))
    return torch.stack(out)
