"""Matplotlib figures of attention maps (UNet cross-attention, MMDiT joint attention): one word over the image, a
row of words, a step × word grid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ...errors import InvalidArgumentError
from ...heatmaps import Normalization
from ...heatmaps import normalize as norm
from ...results.attention_maps import AttentionMaps, StepSelector
from ..render import HEAT_CMAP, HEAT_OPACITY, as_uint8_image, clip_frames, frame_row, heat_overlay, spread


def word_overlay(
    maps: AttentionMaps,
    word: str,
    *,
    image: Any = None,
    step: StepSelector = None,
    layer: str | None = None,
    index: int = 0,
    normalize: Normalization = "minmax",
    cmap: str = HEAT_CMAP,
    alpha: float = HEAT_OPACITY,
    mask: Any = None,
    frame: int | None = None,
) -> np.ndarray:
    """The picture :func:`plot_word` draws: ``word``'s map over ``image`` (or alone), (H, W, 3) uint8; ``mask``:
    an inpainting mask (``obs.mask``) whose outline is drawn on top.

    A video's maps (``maps.frames``): latent frame ``frame``'s map, or with ``frame=None`` every frame's side by
    side, (H, F·W, 3); ``image`` may then be the clip (N, H, W, 3), each map drawn over the last pixel frame its
    latent frame holds (:func:`sdexplore.views.render.clip_frames`).

    ``"minmax"`` stretches each map to the whole colour map; ``"mass"`` / ``"sum"`` keep zero at its bottom
    and the map's peak at its top. The blend is :func:`sdexplore.views.render.heat_overlay`, as in the CLI and widgets.
    """
    if maps.frames is not None:
        frames = range(maps.frames) if frame is None else [frame]
        pictures = clip_frames(image, maps.frames) if image is not None else [None] * maps.frames
        one = dict(
            step=step, layer=layer, index=index, normalize=normalize, cmap=cmap, alpha=alpha, mask=mask
        )
        return frame_row([_overlay(maps, word, pictures[f], frame=f, **one) for f in frames])
    return _overlay(
        maps,
        word,
        image,
        step=step,
        layer=layer,
        index=index,
        normalize=normalize,
        cmap=cmap,
        alpha=alpha,
        mask=mask,
    )


def _overlay(
    maps: AttentionMaps,
    word: str,
    image: Any,
    *,
    step: StepSelector,
    layer: str | None,
    index: int,
    normalize: Normalization,
    cmap: str,
    alpha: float,
    mask: Any,
    frame: int | None = None,
) -> np.ndarray:
    """One map (an image's, or a video's latent frame ``frame``) over one picture, (H, W, 3) uint8."""
    heat = maps.word(word, step=step, layer=layer, index=index, frame=frame)  # (h, w) attention mass
    # heat_overlay stretches min-max by itself: the raw map keeps the blend bit for bit the CLI's and widgets'
    if normalize != "minmax":
        heat = norm(heat, normalize)
    vmin = None if normalize == "minmax" else 0.0
    if image is None:
        return heat_overlay(None, heat, cmap=cmap, size=min(maps.image_size), vmin=vmin, mask=mask)
    return heat_overlay(as_uint8_image(image), heat, opacity=alpha, cmap=cmap, vmin=vmin, mask=mask)


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
    cmap: str = HEAT_CMAP,
    alpha: float = HEAT_OPACITY,
    mask: Any = None,
) -> Any:
    """Heat map of ``word`` over the generated ``image`` (PIL, array or tensor); returns the matplotlib Axes.
    ``mask``: an inpainting mask (``obs.mask``) whose outline is drawn on top.

    The map is upsampled bilinearly to the image's pixel size and blended over it (:func:`word_overlay`);
    ``normalize`` defaults to per-map min-max (the shape of the map; ``"mass"`` keeps zero at the bottom of
    the colour map). Without ``image`` the heat map is drawn alone.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    picture = word_overlay(
        maps,
        word,
        image=image,
        step=step,
        layer=layer,
        index=index,
        normalize=normalize,
        cmap=cmap,
        alpha=alpha,
        mask=mask,
    )
    ax.imshow(picture)
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
    cmap: str = HEAT_CMAP,
    alpha: float = HEAT_OPACITY,
    size: float = 2.2,
    mask: Any = None,
) -> Any:
    """A row: the image (if given), then each word's heat map over it. Default words: every word of the prompt.
    ``mask``: an inpainting mask (``obs.mask``) whose outline is drawn on every map."""
    import matplotlib.pyplot as plt

    if isinstance(words, str):
        words = [words]
    if words is not None and (not isinstance(words, Sequence) or not all(isinstance(w, str) for w in words)):
        raise InvalidArgumentError(
            f"plot_words(maps, words, image=...) takes the words as a list of strings, got {type(words).__name__}; "
            "pass the picture as image=."
        )
    words = list(words) if words is not None else _default_words(maps, index)
    lead = 1 if image is not None else 0
    aspect = maps.image_size[0] / maps.image_size[1] / (maps.frames or 1)  # rows / columns of a cell
    n = lead + len(words)
    fig, axes = plt.subplots(1, n, figsize=(size * n, size * aspect + 0.4), squeeze=False)
    if image is not None:
        lead_picture = (
            as_uint8_image(image) if maps.frames is None else frame_row(clip_frames(image, maps.frames))
        )  # a video's: the frame under each latent frame, side by side
        axes[0, 0].imshow(lead_picture)
        axes[0, 0].set_title("image", fontsize=9)
        axes[0, 0].set_axis_off()
    for ax, word in zip(axes[0, lead:], words, strict=True):
        plot_word(
            maps,
            word,
            image=image,
            ax=ax,
            index=index,
            normalize=normalize,
            cmap=cmap,
            alpha=alpha,
            mask=mask,
        )
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
    cmap: str = HEAT_CMAP,
    alpha: float = HEAT_OPACITY,
    size: float = 1.8,
) -> Any:
    """A grid of per-step maps: one row per step (default: up to 6 spread over the run), one column per word."""
    import matplotlib.pyplot as plt

    if maps.steps is None:
        raise ValueError("These maps have no per-step maps (recorded with step_resolution=None).")
    words = list(words) if words is not None else _default_words(maps, index)
    if steps is None:
        steps = spread(maps.num_steps, 6)
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
