"""Matplotlib figures of cross-attention maps: one word over the image, a row of words, a step × word grid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..attention.maps import AttentionMaps, StepSelector
from ..heatmaps import Normalization, upsample
from ..heatmaps import normalize as norm


def _picture(image: Any) -> np.ndarray | None:
    """A PIL image, uint8/float array (H, W, 3) or tensor (3, H, W) / (H, W, 3) in [0, 1] → float (H, W, 3)."""
    if image is None:
        return None
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4:
            t = t[0]
        if t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)  # (H, W, C)
        arr = t.numpy()
    else:
        arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def _heat(
    maps: AttentionMaps,
    word: str,
    *,
    step: StepSelector,
    layer: str | None,
    index: int,
    normalize: Normalization,
    size: tuple[int, int],
) -> np.ndarray:
    m = maps.word(word, step=step, layer=layer, index=index)  # (h, w) raw mass
    return norm(upsample(m, size), normalize).numpy()  # (H, W) in image pixels, normalised after upsampling


def plot_word(
    maps: AttentionMaps,
    word: str,
    *,
    image: Any = None,
    ax: Any = None,
    step: StepSelector = None,
    layer: str | None = None,
    index: int = 0,
    normalize: Normalization = "minmax",
    cmap: str = "jet",
    alpha: float = 0.5,
) -> Any:
    """Heat map of ``word`` over the generated ``image`` (PIL, array or tensor); returns the matplotlib Axes.

    The map is upsampled bilinearly to the image's pixel size; ``normalize`` defaults to per-map min-max
    (shape of the map; use ``"mass"`` with a shared scale to compare strengths). Without ``image`` the heat map
    is drawn alone.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    pic = _picture(image)
    size = pic.shape[:2] if pic is not None else maps.image_size
    heat = _heat(maps, word, step=step, layer=layer, index=index, normalize=normalize, size=size)
    if pic is not None:
        ax.imshow(pic)
        ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0 if normalize == "minmax" else None)
    else:
        ax.imshow(heat, cmap=cmap, vmin=0.0, vmax=1.0 if normalize == "minmax" else None)
    title = word if step is None else f"{word} · step {step}"
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return ax


def _default_words(maps: AttentionMaps, index: int) -> list[str]:
    return list(dict.fromkeys(w for w in maps.token_lists[index].words if any(c.isalnum() for c in w)))


def plot_words(
    maps: AttentionMaps,
    words: Sequence[str] | None = None,
    *,
    image: Any = None,
    index: int = 0,
    normalize: Normalization = "minmax",
    cmap: str = "jet",
    alpha: float = 0.5,
    size: float = 2.2,
) -> Any:
    """A row: the image (if given), then each word's heat map over it. Default words: every word of the prompt."""
    import matplotlib.pyplot as plt

    words = list(words) if words is not None else _default_words(maps, index)
    lead = 1 if image is not None else 0
    aspect = maps.image_size[0] / maps.image_size[1]  # rows / columns of a cell
    n = lead + len(words)
    fig, axes = plt.subplots(1, n, figsize=(size * n, size * aspect + 0.4), squeeze=False)
    if image is not None:
        axes[0, 0].imshow(_picture(image))
        axes[0, 0].set_title("image", fontsize=9)
        axes[0, 0].set_axis_off()
    for ax, word in zip(axes[0, lead:], words, strict=True):
        plot_word(maps, word, image=image, ax=ax, index=index, normalize=normalize, cmap=cmap, alpha=alpha)
    fig.tight_layout()
    return fig


def plot_step_grid(
    maps: AttentionMaps,
    words: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    *,
    image: Any = None,
    index: int = 0,
    normalize: Normalization = "minmax",
    cmap: str = "jet",
    alpha: float = 0.5,
    size: float = 1.8,
) -> Any:
    """A grid of per-step maps: one row per step (default: up to 6 spread over the run), one column per word."""
    import matplotlib.pyplot as plt

    if maps.steps is None:
        raise ValueError("These maps have no per-step maps (recorded with step_resolution=None).")
    words = list(words) if words is not None else _default_words(maps, index)
    if steps is None:
        steps = sorted({int(round(x)) for x in np.linspace(0, maps.num_steps - 1, min(6, maps.num_steps))})
    steps = list(steps)
    aspect = maps.image_size[0] / maps.image_size[1]  # rows / columns of a cell
    fig, axes = plt.subplots(
        len(steps),
        len(words),
        figsize=(size * len(words) + 0.5, size * aspect * len(steps) + 0.4),
        squeeze=False,
    )
    for r, step in enumerate(steps):
        for c, word in enumerate(words):
            ax = axes[r, c]
            plot_word(
                maps,
                word,
                image=image,
                ax=ax,
                step=step,
                index=index,
                normalize=normalize,
                cmap=cmap,
                alpha=alpha,
            )
            t = float(maps.timesteps[step])
            ax.set_title(word if r == 0 else "", fontsize=9)
            if c == 0:
                ax.set_axis_on()
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_ylabel(f"step {step}\nt={t:g}", fontsize=8)
                for spine in ax.spines.values():
                    spine.set_visible(False)
    fig.tight_layout()
    return fig
