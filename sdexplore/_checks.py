"""Checks shared by the entry points that take a seed, an image size or an img2img strength, run before any work.

One helper per kind of argument, so that :func:`sdexplore.generate`, :func:`sdexplore.walk`, :func:`sdexplore.invert`
and the attachment's start-of-run checks (:func:`sdexplore.masks.check_inpaint_inputs`) refuse the same values with
the same sentence, instead of each letting torch or diffusers fail later with a raw error.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

from .errors import InvalidArgumentError, SdexploreError

__all__ = [
    "MAX_SEED",
    "check_seed",
    "check_size",
    "check_size_limit",
    "check_strength",
    "size_limit",
    "size_multiple",
]

#: The largest seed ``torch.Generator.manual_seed`` takes as itself (it reads seeds as unsigned 64-bit numbers).
MAX_SEED = 2**64 - 1


def check_seed(seed: Any, what: str = "seed", error: type[SdexploreError] = InvalidArgumentError) -> int:
    """``seed`` as an int, if it is a whole number from 0 to :data:`MAX_SEED` (a bool is refused), else ``error``.

    torch's ``manual_seed`` overflows above 2**64 − 1 with a raw ``RuntimeError`` and silently remaps negative
    seeds; here both are one clear error, as on the command line.
    """
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed <= MAX_SEED:
        raise error(
            f"{what}={seed!r} is not a seed: give a whole number from 0 to 2**64 - 1 (what "
            "torch.Generator.manual_seed takes), e.g. 0."
        )
    return int(seed)


def size_limit(pipe: Any) -> int | None:
    """The largest height or width in pixels ``pipe``'s denoiser can draw, or None where there is none.

    An SD3 transformer (``pos_embed_max_size`` in its config) crops a fixed grid of positional embeddings, so
    an image of more than ``pos_embed_max_size`` patches per side fails in its first forward: the limit is
    ``pos_embed_max_size × patch × VAE factor`` (64 px for the embedded ``tiny-shapes-mmdit``; 3072 px for SD3
    Medium's 192 × 2 × 8). UNets and Flux's rotary embeddings have no such limit.
    """
    from .families import detect_family, vae_scale_factor

    config = detect_family(pipe).get_denoiser(pipe).config
    cells = getattr(config, "pos_embed_max_size", None)
    if not cells:
        return None
    patch = int(getattr(config, "patch_size", 1) or 1)
    return int(cells) * patch * vae_scale_factor(pipe)


def size_multiple(pipe: Any) -> tuple[int, str]:
    """Heights and widths ``pipe`` can draw are multiples of this many pixels; with the reason, for messages.

    :func:`sdexplore.families.size_unit` (the VAE's factor times the transformer's patch), and for the UNet
    families at least 8: diffusers' Stable Diffusion 1.x/2.x/XL pipelines refuse other sizes whatever the VAE's
    factor (the embedded tiny-shapes' is 4).
    """
    from .families import detect_family, size_unit, vae_scale_factor

    unit, vae = size_unit(pipe), vae_scale_factor(pipe)
    why = f"the VAE's factor {vae}" + (
        f" × the transformer's {unit // vae}×{unit // vae} patch" if unit != vae else ""
    )
    if detect_family(pipe).denoiser == "unet" and unit % 8:
        return math.lcm(unit, 8), f"diffusers' UNet pipelines take multiples of 8; {why}"
    return unit, why


def check_size_limit(
    pipe: Any,
    height: Any,
    width: Any,
    *,
    error: type[SdexploreError] = InvalidArgumentError,
    source: str = "",
) -> None:
    """Whole-number ``height`` / ``width`` above :func:`size_limit` raise ``error`` naming the limit (other values
    are left to :func:`check_size` or to the pipeline). ``source`` says where the size came from, for messages."""
    limit = size_limit(pipe)
    if limit is None:
        return
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, Integral) and not isinstance(value, bool) and value > limit:
            unit, _ = size_multiple(pipe)
            raise error(
                f"{name}={value!r}{source} is above this model's limit of {limit} pixels per side (its "
                f"transformer's positional embeddings, pos_embed_max_size, cover no more): give a multiple of "
                f"{unit} up to {limit}."
            )


def check_size(
    pipe: Any,
    height: Any,
    width: Any,
    *,
    error: type[SdexploreError] = InvalidArgumentError,
) -> None:
    """``height`` and ``width`` (each None for the model's default) are sizes ``pipe`` can draw, else ``error``.

    A size is a positive whole number of pixels, a multiple of :func:`size_multiple`, and at most
    :func:`size_limit` where the denoiser has one. The message says which sizes are allowed.
    """
    from .families import detect_family

    if height is None and width is None:
        return
    unit, why = size_multiple(pipe)
    limit = size_limit(pipe)
    allowed = f"a positive multiple of {unit} ({why})" + (f" up to {limit}" if limit is not None else "")
    for name, value in (("height", height), ("width", width)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, Integral) or value <= 0 or value % unit
        ):
            raise error(
                f"{name}={value!r} is not a size {detect_family(pipe).label} can draw: give {allowed} pixels, "
                "or None for the model's default."
            )
    check_size_limit(pipe, height, width, error=error)


def check_strength(strength: Any, what: str = "strength") -> float:
    """An img2img / inpainting ``strength``: a real number with 0 < strength ≤ 1, else InvalidArgumentError.

    diffusers refuses values outside [0, 1] with a raw error, fails on 0 (no step left to run) and lets NaN
    through to a cast error.
    """
    if isinstance(strength, bool) or not isinstance(strength, Real) or not math.isfinite(strength):
        raise InvalidArgumentError(
            f"{what}={strength!r}: give a number above 0 and at most 1 (how much of the schedule re-noises the "
            "picture: 1 starts from pure noise, e.g. 0.6 keeps its layout)."
        )
    if not 0 < strength <= 1:
        raise InvalidArgumentError(
            f"{what}={strength!r} is outside (0, 1]: give a number above 0 (0 would run no step) and at most 1 "
            "(1 starts from pure noise), e.g. 0.6."
        )
    return float(strength)
