"""Pictures for every view (widgets, plots, the CLI): heat-map overlays, step picking, trace previews, x0 decodes.

One implementation of each, so a notebook, a figure and a CLI file show the same thing: numpy/torch in,
(H, W, 3) uint8 out. Imports no widget, no plotting library at import time and no pipeline.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .._images import as_uint8_image
from ..decoding import decode_with
from ..errors import NotRecordedError
from ..heatmaps import resize
from ..preview import ConvPreview, conv_preview_to_uint8, latent_to_uint8

if TYPE_CHECKING:
    from ..results.trace import StepRecord, Trace

#: The colour map of every heat-map overlay (CLI files, widgets, plots).
HEAT_CMAP = "jet"
#: How much of the heat map shows over the image (0: the image only, 1: the heat map only).
HEAT_OPACITY = 0.5
#: Quantities of a step that are latents (B, C, h, w) and so can be previewed through latent → RGB.
LATENT_QUANTITIES = ("x0", "latents", "latents_out", "noise_pred", "noise_cond", "noise_uncond")


# ---------------------------------------------------------------------------------------- images
def upscale(arr: np.ndarray, min_side: int) -> np.ndarray:
    """Nearest-neighbour upscale (H, W, C) by the integer factor that brings its short side to ``min_side``."""
    k = max(1, -(-min_side // min(arr.shape[:2])))  # ceil
    if k == 1:
        return arr
    h, w = arr.shape[:2]
    return np.asarray(Image.fromarray(arr).resize((w * k, h * k), Image.NEAREST))  # (H*k, W*k, C)


@lru_cache(maxsize=16)
def _lut(cmap: str) -> np.ndarray:
    from matplotlib import colormaps  # the colour tables only: no figure, no backend

    return (colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)  # (256, 3)


def _numpy(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy()
    return np.asarray(values, np.float32)


def colorize(values: Any, cmap: str = HEAT_CMAP, vmin: float = 0.0, vmax: float = 1.0) -> np.ndarray:
    """Map a 2-D array to RGB uint8 (h, w, 3) through a matplotlib colour map (a lookup table: no figure)."""
    x = np.subtract(_numpy(values), vmin, dtype=np.float32)
    x *= 255.0 / max(vmax - vmin, 1e-12)
    x += 0.5  # round to the nearest entry
    np.clip(np.nan_to_num(x, copy=False), 0, 255, out=x)
    return np.take(_lut(cmap), x.astype(np.uint8), axis=0)  # (h, w, 3); ~4× faster than lut[idx]


def heat_overlay(
    image: Any,
    heat: Any,
    *,
    opacity: float = HEAT_OPACITY,
    cmap: str = HEAT_CMAP,
    size: int | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    mask: Any = None,
) -> np.ndarray:
    """A heat map (h, w) over an image: bilinearly upsampled, coloured, blended. Returns (H, W, 3) uint8.

    ``vmin`` / ``vmax`` go to the ends of the colour map; by default the upsampled map's own minimum and
    maximum (min-max normalised, so every map shows its shape). ``opacity``: 0 shows the image, 1 the
    colours alone. ``size``: the output's shortest side at least this many pixels (a smaller image is
    upscaled by nearest neighbour, so a 64×64 image stays legible); ``None`` keeps the image's size.
    Without an image (``None``) the coloured map alone is returned, its shorter side ``size`` (default 256).
    ``mask``: an inpainting mask (``obs.mask``, (M, H, W) / (H, W), 1 = repainted) whose outline is drawn on
    top (:func:`draw_mask_outline`), so a map is read against the region that was repainted.
    """
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must lie in [0, 1], got {opacity}.")
    h = torch.as_tensor(_numpy(heat))
    if h.ndim != 2:
        raise ValueError(f"A heat map is one 2-D map (h, w), got shape {tuple(h.shape)}; pick one word/step.")
    if image is None:
        side = size or 256
        k = side / min(h.shape)
        base, out_hw = None, (round(h.shape[0] * k), round(h.shape[1] * k))
    else:
        base = as_uint8_image(image)
        if size is not None:
            base = upscale(base, size)
        out_hw = base.shape[:2]
    m = resize(h, out_hw).numpy()  # (H, W) bilinear
    lo = float(m.min()) if vmin is None else float(vmin)
    hi = float(m.max()) if vmax is None else float(vmax)
    colours = colorize(m, cmap, lo, hi)  # (H, W, 3)
    if base is None:
        out = colours
    else:
        # base · (1 − opacity) + colours · opacity, rounded, in C (~3× faster than the numpy arithmetic)
        out = np.asarray(Image.blend(Image.fromarray(base), Image.fromarray(colours), float(opacity)))
    return out if mask is None else draw_mask_outline(out, mask)


# ---------------------------------------------------------------------------------------- inpainting masks
#: Colour of an inpainting mask's outline on every heat-map overlay.
MASK_COLOUR = (255, 255, 255)


def mask_outline(mask: Any, size: tuple[int, int]) -> np.ndarray:
    """The outline of an inpainting mask at ``size`` = (H, W) pixels: (H, W) bool, True on the mask's border.

    ``mask``: (M, H', W') or (H', W') array or tensor in [0, 1] (the first of M is used), or a PIL image;
    resized by nearest neighbour and cut at 0.5. The line is about 1/64 of the short side thick (≥ 1 pixel),
    inside the repainted region.
    """
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    m = _numpy(mask)
    if m.ndim == 3:
        m = m[0]  # (M, H', W') → the first mask
    if m.ndim != 2:
        raise ValueError(f"A mask is (H, W) or (M, H, W), got shape {m.shape}.")
    inside = (
        np.asarray(
            Image.fromarray((m > 0.5).astype(np.uint8) * 255).resize((size[1], size[0]), Image.NEAREST)
        )
        > 0
    )  # (H, W)
    width = max(1, min(size) // 64)
    eroded = inside.copy()
    for _ in range(
        width
    ):  # erode by one pixel (4-neighbourhood) per round; the border is what erosion removes
        e = eroded.copy()
        e[1:, :] &= eroded[:-1, :]
        e[:-1, :] &= eroded[1:, :]
        e[:, 1:] &= eroded[:, :-1]
        e[:, :-1] &= eroded[:, 1:]
        eroded = e
    return inside & ~eroded


def draw_mask_outline(image: Any, mask: Any, colour: tuple[int, int, int] = MASK_COLOUR) -> np.ndarray:
    """``image`` (any :func:`as_uint8_image` input) with ``mask``'s outline drawn in ``colour``: (H, W, 3) uint8."""
    out = as_uint8_image(image).copy()
    out[mask_outline(mask, out.shape[:2])] = colour
    return out


# ---------------------------------------------------------------------------------------- which steps
def spread(n: int, k: int, keep: Iterable[int] = ()) -> list[int]:
    """``k`` of ``range(n)`` spread evenly, first and last included, plus any ``keep`` (e.g. keyframes).

    The panels of a strip of ``k`` steps (or frames): all of them when ``n <= k``.
    """
    if n < 0 or k < 1:
        raise ValueError(f"spread needs n >= 0 items and k >= 1 panels, got n={n}, k={k}.")
    if n <= k:
        base = set(range(n))
    elif k == 1:
        base = {n - 1}  # one panel: the end of the run
    else:
        base = {round(i * (n - 1) / (k - 1)) for i in range(k)}
    return sorted(base | {i for i in keep if 0 <= i < n})


def step_groups(n: int, k: int, start: int = 0) -> list[range]:
    """``range(start, start + n)`` cut into ``min(k, n)`` consecutive, nearly equal groups (early → late)."""
    if n < 1 or k < 1:
        raise ValueError(f"step_groups needs n >= 1 steps and k >= 1 groups, got n={n}, k={k}.")
    k = min(k, n)
    edges = [start + round(i * n / k) for i in range(k + 1)]
    return [range(edges[i], edges[i + 1]) for i in range(k)]


# ---------------------------------------------------------------------------------------- trace previews
def preview_factors(trace: Trace) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent → RGB factors ``(factors (C, 3), bias (3,))`` a trace's previews were made with.

    ``trace.meta["latent_rgb"]`` (recorded since traces carry it); for an older trace without it, the
    family's published factors. :class:`~sdexplore.errors.NotRecordedError` where there are neither.
    """
    meta = trace.meta.get("latent_rgb")
    if meta:
        return (
            torch.tensor(meta["factors"], dtype=torch.float32),
            torch.tensor(meta["bias"], dtype=torch.float32),
        )
    from ..families import FAMILIES

    fam = FAMILIES.get(trace.family)
    if fam is None:
        raise NotRecordedError(
            f"This trace (family {trace.family!r}) carries no latent → RGB factors in meta['latent_rgb']; "
            "pass factors=(factors (C, 3), bias (3,))."
        )
    if fam.latent_rgb_factors is None:  # Sana: no published factors for its DC-AE latents
        raise NotRecordedError(
            f"This trace carries no latent → RGB factors in meta['latent_rgb'], and {fam.label} has no published "
            "ones; pass factors=(factors (C, 3), bias (3,))."
        )
    return (
        torch.tensor(fam.latent_rgb_factors, dtype=torch.float32),
        torch.tensor(fam.latent_rgb_bias, dtype=torch.float32),
    )


def preview_net(trace: Trace) -> ConvPreview | None:
    """The learned convolutional preview a trace's previews were made with (``trace.meta["latent_preview"]``,
    recorded for a model folder that carries one, as both embedded models do), or ``None``: linear factors."""
    meta = trace.meta.get("latent_preview")
    return None if meta is None else ConvPreview.from_dict(meta)


def _position(trace: Trace, step: int | StepRecord) -> int:
    if isinstance(step, int):
        trace[step]  # noqa: B018 - the trace's own IndexError names the valid range
        return step % len(trace)
    for i, rec in enumerate(trace.steps):
        if rec is step:
            return i
    raise ValueError("That StepRecord is not one of this trace's steps; pass its position in the trace.")


def _signal_level(trace: Trace, pos: int, of: str) -> float:
    """√ᾱ that brings ``of`` of record ``pos`` from variance-exploding form (x0 + σε) to the VP scale."""
    rec = trace[pos]
    if of == "latents":
        return math.sqrt(rec.alpha_bar)
    # latents_out sit at the next step's noise level
    if pos + 1 < len(trace) and trace[pos + 1].index == rec.index + 1:
        return math.sqrt(trace[pos + 1].alpha_bar)
    if trace.num_steps and rec.index >= trace.num_steps - 1:
        return 1.0  # after the last step: σ = 0
    return math.sqrt(rec.alpha_bar)  # the next step was not recorded (every > 1): the nearest level known


def trace_preview(
    trace: Trace,
    step: int | StepRecord,
    of: str = "x0",
    *,
    image: int = 0,
    factors: tuple[Any, Any] | None = None,
) -> np.ndarray:
    """Latent → RGB preview of one recorded step's ``of`` (``"x0"``, ``"latents"``, …): (h, w, 3) uint8; a video's
    (latents (B, C, F, h, w)) is its frames side by side, (h, F·w, 3), as :meth:`Trace.frame_strip` lays them.

    Uses the preview the trace was recorded with: its learned convolutional preview where it has one
    (:func:`preview_net`), else its linear factors (:func:`preview_factors`); ``factors`` forces the linear
    preview with those factors. For an Euler-type trace (``meta["ve_latents"]``, latents = x0 + σ·ε), scales noisy latents by √ᾱ first,
    exactly as the recorder's own ``preview_of="latents"`` previews. ``step``: a position in the trace
    (``trace[step]``) or one of its records.
    """
    if of not in LATENT_QUANTITIES:
        raise ValueError(f"Cannot preview {of!r}; choose one of {', '.join(LATENT_QUANTITIES)}.")
    pos = _position(trace, step)
    rec = trace[pos]
    t = getattr(rec, of)
    if t is None:
        raise NotRecordedError(
            f"{of!r} was not recorded at step {rec.index}; record it with StepRecorder(quantities=(..., {of!r}))."
        )
    if not 0 <= image < t.shape[0]:
        raise IndexError(f"image {image} is out of range: this trace holds {t.shape[0]} image(s) per step.")
    net = preview_net(trace) if factors is None else None
    if net is None:
        f, b = (
            preview_factors(trace)
            if factors is None
            else (torch.as_tensor(factors[0]).float(), torch.as_tensor(factors[1]).float())
        )
    lat = t[image : image + 1].float().cpu()  # (1, C, h, w); a video's (1, C, F, h, w)
    if of in ("latents", "latents_out") and trace.meta.get("ve_latents"):
        lat = lat * _signal_level(trace, pos, of)  # VE → VP form, the scale the factors expect
    if lat.ndim == 5:  # a video: its F frames as a batch (F, C, h, w), then side by side
        lat = lat[0].permute(1, 0, 2, 3)  # (C, F, h, w) → (F, C, h, w)
    # the recorder's own preview function: (1 or F, h, w, 3)
    rgb = conv_preview_to_uint8(lat, net) if net is not None else latent_to_uint8(lat, f, b)
    return rgb.permute(1, 0, 2, 3).flatten(1, 2).numpy()  # (h, F·w, 3): an image's F is 1


def frame_row(pictures: Sequence[np.ndarray], pad: int = 0) -> np.ndarray:
    """Pictures of one height, each (h, w_i, 3) uint8, side by side left to right: (h, Σw_i + pad·(n−1), 3), the
    gaps white (a video's frames as one strip, as :meth:`Trace.frame_strip` lays them)."""
    pictures = [np.asarray(p) for p in pictures]
    if not pictures:
        raise ValueError("frame_row needs at least one picture.")
    gap = np.full((pictures[0].shape[0], pad, 3), 255, np.uint8)  # (h, pad, 3)
    parts = [part for p in pictures for part in (gap, p)][1:] if pad else pictures
    return np.concatenate(parts, axis=1)


def clip_frames(image: Any, frames: int) -> list[np.ndarray]:
    """The picture under each of a video's ``frames`` latent frames, (H, W, 3) uint8 each.

    ``image``: the clip's N pixel frames (N, H, W, 3) (a pipeline's ``.frames[0]``) or a list of them, or one
    picture (shown under every frame). Wan's VAE packs pixel frame j into latent frame (j + 3) // 4 (frame 0
    alone, then four at a time), so latent frame f is shown over the last pixel frame it holds, min(4·f, N − 1);
    a clip of another length (not 4·(F − 1) + 1 frames) is sampled evenly."""
    arr = image if isinstance(image, list) else None
    if arr is None:
        a = image.detach().cpu() if isinstance(image, torch.Tensor) else image
        a = a if isinstance(a, Image.Image) else np.asarray(a)
        arr = list(a) if isinstance(a, np.ndarray) and a.ndim == 4 and a.shape[0] > 1 else None
    if arr is None:  # one picture under every frame
        return [as_uint8_image(image)] * frames
    n = len(arr)
    if n == 4 * (frames - 1) + 1:
        picks = [min(4 * f, n - 1) for f in range(frames)]
    else:
        picks = [round(f * (n - 1) / max(frames - 1, 1)) for f in range(frames)]
    return [as_uint8_image(arr[j]) for j in picks]


# ---------------------------------------------------------------------------------------- x0 decodes
def decode_steps(
    vae: Any,
    trace: Trace,
    steps: Sequence[int] | None = None,
    *,
    image: int = 0,
    progress: bool = False,
) -> list[np.ndarray]:
    """VAE-decode the predicted x0 of recorded ``steps`` (positions; default all) → (H, W, 3) uint8 each.

    Decoding after the run keeps the denoising loop as fast as a plain call. A float16 VAE whose config asks
    for ``force_upcast`` (SDXL's, which overflows in float16) decodes in float32, as the pipelines do, and
    is put back afterwards. Every step is checked for a recorded x0 before the first decode.
    """
    positions = list(range(len(trace))) if steps is None else [_position(trace, s) for s in steps]
    for p in positions:
        if trace[p].x0 is None:
            raise NotRecordedError(
                f"x0 was not recorded at step {trace[p].index}; record it with StepRecorder(quantities=(..., 'x0'))."
            )
    from tqdm.auto import tqdm

    dtype = vae.dtype
    upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        out = []
        for p in tqdm(positions, desc="decoding x0", unit="step", disable=not progress, file=sys.stderr):
            z = trace[p].x0[image : image + 1]  # (1, C, h, w)
            out.append(decode_with(vae, z)[0].cpu().numpy())  # (1, H, W, 3) → (H, W, 3)
        return out
    finally:
        if upcast:
            vae.to(dtype)


# ---------------------------------------------------------------------------------------- shared by the views
def channel_tiles(
    tensor: Any, *, cmap: str = "RdBu_r", pad: int = 1, scale: float | None = None
) -> np.ndarray:
    """Latent-shaped (C, h, w) → RGB (rows·h, cols·w, 3): one tile per channel, symmetric diverging colours.

    ``scale``: values at ±scale reach the ends of the colour map (default: 99th percentile of |x|, so one
    outlier does not wash out the rest). Channels are laid out in a near-square grid (⌈√C⌉ columns: 2×2 for SD's 4,
    4×4 for SD3's and Flux's 16, 6×6 for Flux.2's 32), so the panel keeps the latent's aspect ratio.
    """
    x = (
        tensor.detach().float().cpu().numpy()
        if isinstance(tensor, torch.Tensor)
        else np.asarray(tensor, np.float32)
    )
    c, h, w = x.shape
    if scale is None:
        scale = float(np.percentile(np.abs(x), 99)) or 1.0
    cols = math.ceil(math.sqrt(c))
    rows = -(-c // cols)
    out = np.full((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3), 255, np.uint8)
    for i in range(c):
        r, q = divmod(i, cols)
        tile = colorize(x[i], cmap, -scale, scale)  # (h, w, 3)
        out[r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = tile
    return out


STOP_WORDS = frozenset(
    "a an the of in on at to for from with by and or but is are was be as into onto over under near its it "
    "this that these those".split()
)


def first_content_word(words: Sequence[str]) -> str:
    """The first word that is not a stop word, punctuation or a special token (``words[0]`` if none is)."""
    for word in words:
        plain = word.strip().lower()
        special = plain.startswith("<") and plain.endswith(">")  # <|startoftext|>, </s>, <pad>
        if plain not in STOP_WORDS and any(ch.isalnum() for ch in plain) and not special:
            return word
    return words[0]
