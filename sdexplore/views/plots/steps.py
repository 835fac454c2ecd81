"""Matplotlib figures of a step Trace: previews / x0 across steps, latent channels, noise level and norm curves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...errors import NotRecordedError
from ...results.trace import Trace
from ..render import LATENT_QUANTITIES, spread, trace_preview

_IMAGE_QUANTITIES = ("preview", "decoded")
_LATENT_QUANTITIES = LATENT_QUANTITIES


def pick_steps(trace: Trace, count: int = 8) -> list[int]:
    """``count`` record positions spread evenly over the trace, always including the first and last."""
    if len(trace) == 0:
        raise NotRecordedError("The trace is empty: nothing to plot (call the pipeline inside the recorder).")
    return spread(len(trace), count)


def step_image(trace: Trace, position: int, quantity: str = "preview", image: int = 0) -> np.ndarray:
    """One record's picture as (H, W, 3) uint8: a preview / decode, or a latent quantity through latent→RGB; a
    video's frames side by side, (H, F·W, 3) (:meth:`Trace.frame_strip`).

    Latent quantities are previewed with the factors the trace was recorded with (``meta["latent_rgb"]``)
    and Euler-type noisy latents scaled by √ᾱ first: :func:`sdexplore.views.render.trace_preview`.
    """
    if quantity not in _IMAGE_QUANTITIES + _LATENT_QUANTITIES:
        raise ValueError(
            f"Cannot draw {quantity!r}; choose one of {', '.join(_IMAGE_QUANTITIES + _LATENT_QUANTITIES)}."
        )
    if quantity in _LATENT_QUANTITIES:
        return trace_preview(trace, position, quantity, image=image)
    rec = trace[position]
    t = getattr(rec, quantity)
    if t is None:
        raise NotRecordedError(
            f"{quantity!r} was not recorded at step {rec.index}; record it with quantities=(..., {quantity!r})."
        )
    if t.ndim == 5:  # a video: (B, F, H, W, 3)
        return np.asarray(trace.frame_strip(position, index=image, quantity=quantity))  # (H, F·W, 3)
    return t[image].cpu().numpy()  # (H, W, 3)


def plot_steps(
    trace: Trace,
    quantities: Sequence[str] = ("preview",),
    *,
    steps: Sequence[int] | int = 8,
    image: int = 0,
    size: float = 1.6,
) -> Any:
    """Grid of pictures across steps: one row per quantity (e.g. ``("preview", "latents")``), one column per step.

    ``steps`` is a count spread evenly over the trace or explicit record positions. Returns the Figure.
    """
    import matplotlib.pyplot as plt

    cols = pick_steps(trace, steps) if isinstance(steps, int) else list(steps)
    fig, axes = plt.subplots(
        len(quantities), len(cols), figsize=(size * len(cols), size * len(quantities) + 0.3), squeeze=False
    )
    for r, q in enumerate(quantities):
        for c, pos in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(step_image(trace, pos, q, image), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                rec = trace[pos]
                ax.set_title(f"step {rec.index}\nσ={rec.sigma:.2g}", fontsize=8)
            if c == 0:
                ax.set_ylabel(q, fontsize=9)
    fig.tight_layout()
    return fig


def plot_latent_channels(
    trace: Trace, position: int = -1, quantity: str = "latents", *, image: int = 0
) -> Any:
    """Each latent channel of one step as its own diverging heat map (shared symmetric colour scale)."""
    import matplotlib.pyplot as plt

    rec = trace[position]
    t = getattr(rec, quantity, None) if quantity in _LATENT_QUANTITIES else None
    if t is None:
        raise ValueError(f"{quantity!r} is not a recorded latent quantity of step {rec.index}.")
    lat = t[image].float().cpu().numpy()  # (C, h, w); a video's (C, F, h, w)
    if lat.ndim == 4:  # a video: each channel's frames side by side
        c, f, h, w = lat.shape
        lat = lat.transpose(0, 2, 1, 3).reshape(c, h, f * w)  # (C, h, F·w)
    lim = float(np.abs(lat).max()) or 1.0
    fig, axes = plt.subplots(1, lat.shape[0], figsize=(1.9 * lat.shape[0] + 0.6, 2.2), squeeze=False)
    for c in range(lat.shape[0]):
        ax = axes[0][c]
        im = ax.imshow(lat[c], cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(f"channel {c}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"{quantity} at step {rec.index} (σ={rec.sigma:.2g})", fontsize=9)
    return fig


def plot_noise_levels(trace: Trace, ax: Any = None) -> Any:
    """σ (log scale) and ᾱ per recorded step: how much noise each step removes. Returns the Axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 2.8))
    x = trace.indices
    sig = trace.sigmas.clamp_min(1e-6)
    sig[torch.isinf(sig)] = float("nan")  # zero-terminal-SNR schedules start at σ = inf: leave that point out
    ax.semilogy(x, sig.numpy(), "o-", ms=3, color="C0", label="σ")
    ax.set_xlabel("step")
    ax.set_ylabel("σ (noise scale)", color="C0")
    twin = ax.twinx()
    twin.plot(x, trace.alpha_bars.numpy(), "s--", ms=3, color="C1", label="ᾱ")
    twin.set_ylabel("ᾱ (signal fraction)", color="C1")
    twin.set_ylim(0, 1.02)
    ax.set_title(f"noise level — {trace.scheduler}", fontsize=9)
    ax.figure.tight_layout()
    return ax


def plot_noise_norms(trace: Trace, ax: Any = None, *, image: int = 0) -> Any:
    """RMS of the guided noise prediction per step, with the unconditional and conditional ones if recorded."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 2.8))
    x = trace.indices
    series = {"guided": "noise_pred", "unconditional": "noise_uncond", "conditional": "noise_cond"}
    drawn = 0
    for label, q in series.items():
        ts = [getattr(s, q) for s in trace]
        if ts and all(t is not None for t in ts):
            y = [float(t[image].float().pow(2).mean().sqrt()) for t in ts]
            ax.plot(x, y, "o-", ms=3, label=label)
            drawn += 1
    if not drawn and all(s.noise_norm is not None for s in trace):
        ax.plot(x, [float(s.noise_norm[image]) for s in trace], "o-", ms=3, label="guided")
        drawn = 1
    if not drawn:
        raise ValueError("Record noise_pred or noise_norm to plot noise-prediction norms.")
    ax.set_xlabel("step")
    ax.set_ylabel("RMS of model output")
    ax.set_title("noise prediction norm", fontsize=9)
    ax.legend(fontsize=7)
    ax.figure.tight_layout()
    return ax
