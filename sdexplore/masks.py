"""Inpainting masks: read a mask (white = repaint, black = keep), check it matches its image, before any work.

diffusers' inpainting pipelines resize a mask of another size to the image's silently, so a mask drawn for another
picture repaints the wrong place. :func:`load_mask` and :func:`check_inpaint_inputs` (which the attachment calls
when an observed call begins, before the pipeline does anything) give one clear
:class:`~sdexplore.errors.InvalidArgumentError` instead, and the recorded mask travels with the trace so that views
draw its outline (:func:`sdexplore.views.render.heat_overlay`'s ``mask=``). The same start-of-run check refuses an
img2img or inpainting ``strength`` outside (0, 1] and a 16-bit picture, which diffusers meets with raw errors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ._checks import check_size_limit, check_strength
from .errors import InvalidArgumentError

__all__ = ["check_inpaint_inputs", "load_mask", "mask_array"]

_HOW = "a mask is greyscale: white (255) where the picture is repainted, black (0) where it is kept"


def _open(mask: Any) -> Image.Image:
    if isinstance(mask, (str, os.PathLike)):
        path = Path(mask).expanduser()
        try:
            with Image.open(path) as im:
                im.load()
                return im
        except FileNotFoundError as e:
            raise InvalidArgumentError(
                f"mask file {str(path)!r} does not exist: give the path of a PNG"
            ) from e
        except (UnidentifiedImageError, OSError) as e:
            raise InvalidArgumentError(f"mask file {path.name!r} is not an image: {_HOW} (a PNG)") from e
    if isinstance(mask, Image.Image):
        return mask
    raise InvalidArgumentError(
        f"a mask of type {type(mask).__name__} is not accepted: give a PIL image or a path"
    )


#: PIL modes of more than 8 bits per pixel: 32-bit integer, 16-bit integer, 32-bit float.
_HIGH_DEPTH = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _check_high_depth(im: Image.Image, what: str) -> None:
    """A mask of mode I, I;16 or F is read by diffusers through ``mask.convert("L")``, which clips its values to
    0..255: refuse the masks that this would change (a float mask in [0, 1] would become black, nothing repainted;
    a 16-bit gradient mostly white), so the mask checked is the mask the pipeline uses."""
    values = np.asarray(im, dtype=np.float64)  # (H, W), the stored values
    lo, hi = float(values.min()), float(values.max())
    if im.mode == "F" and 0.0 < hi <= 1.0:
        reason = "diffusers reads it through mask.convert('L') as 0..255, so values in [0, 1] repaint nothing"
        fix = "Image.fromarray((np.asarray(mask) * 255).round().astype(np.uint8))"
    elif lo < 0.0 or hi > 255.0:
        reason = "diffusers reads it through mask.convert('L'), which clips values outside 0..255"
        fix = "Image.fromarray((np.asarray(mask) / 257).round().astype(np.uint8)) for a 16-bit mask"
    else:
        return
    raise InvalidArgumentError(
        f"{what} has mode {im.mode} with values in [{lo:g}, {hi:g}]: {reason}. {_HOW}: give mode L, e.g. {fix}"
    )


def _pil_to_array(im: Image.Image, what: str) -> np.ndarray:
    """A mask image → (H, W) float32 in [0, 1]; a colour or transparent mask is refused (which part is white?)."""
    if im.mode in _HIGH_DEPTH:
        _check_high_depth(im, what)
    if im.mode in ("1", "L", *_HIGH_DEPTH):
        # what diffusers' mask processor reads (do_convert_grayscale): mask.convert("L") / 255, (H, W)
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    if im.mode in ("RGB", "RGBA", "LA", "P"):
        rgba = np.asarray(im.convert("RGBA"))  # (H, W, 4)
        if (rgba[..., 3] != 255).any():
            raise InvalidArgumentError(
                f"{what} has transparent pixels (mode {im.mode}): {_HOW}; flatten it, e.g. "
                "mask.convert('L') after pasting it on black"
            )
        rgb = rgba[..., :3]
        if not ((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])).all():
            raise InvalidArgumentError(
                f"{what} is in colour (mode {im.mode}): {_HOW}; convert it with mask.convert('L') if its "
                "brightness is what you mean"
            )
        return rgb[..., 0].astype(np.float32) / 255.0
    raise InvalidArgumentError(f"{what} has mode {im.mode}, which is not a mask: {_HOW}")


def mask_array(mask: Any, *, what: str = "the mask") -> np.ndarray:
    """A mask as diffusers' inpainting pipelines take it → (M, H, W) float32 in [0, 1], M masks (usually 1).

    Takes a PIL image (modes 1, L, I, I;16, F, read as diffusers reads them, through ``convert("L")``: a
    high-bit-depth mask that this would clip is refused; RGB only when grey), a path, a list of those, a numpy array (H, W),
    (H, W, 1) or (M, H, W) (uint8, or float in [0, 1]), or a tensor (H, W), (1, H, W) or (M, 1, H, W) in [0, 1].
    """
    if isinstance(mask, (list, tuple)):
        if not mask:
            raise InvalidArgumentError(f"{what} is an empty list: {_HOW}")
        parts = [mask_array(m, what=f"{what}[{i}]") for i, m in enumerate(mask)]
        if len({p.shape[1:] for p in parts}) > 1:
            raise InvalidArgumentError(f"{what}: the masks of the list differ in size; give one size")
        return np.concatenate(parts)  # (M, H, W)
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().float().cpu().numpy()
    if isinstance(mask, np.ndarray):
        arr = mask
        if arr.ndim == 4 and arr.shape[1] == 1:
            arr = arr[:, 0]  # (M, 1, H, W) → (M, H, W)
        elif arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[None, ..., 0]  # (H, W, 1) → (1, H, W)
        elif arr.ndim == 2:
            arr = arr[None]  # (H, W) → (1, H, W)
        elif arr.ndim == 3 and arr.shape[-1] in (3, 4):
            arr = arr[None]  # (H, W, 3|4): a colour picture, refused below
        if arr.ndim != 3:
            raise InvalidArgumentError(
                f"{what} has shape {mask.shape}, not a mask's: give (H, W) with {_HOW} (a colour mask: one channel)"
            )
        if arr.dtype == np.uint8:
            return arr.astype(np.float32) / 255.0
        if arr.dtype == bool:
            return arr.astype(np.float32)
        arr = arr.astype(np.float32)
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise InvalidArgumentError(f"{what} has values outside [0, 1]: give floats in [0, 1] or uint8")
        return arr
    return _pil_to_array(_open(mask), what)[None]  # (1, H, W)


def load_mask(mask: Any, image: Any = None) -> Image.Image:
    """Read an inpainting mask as a greyscale PIL image (mode ``L``), checked against ``image`` if given.

    ``image``: the picture it belongs to (PIL image, array (H, W, 3) or tensor (3, H, W)), or its
    ``(height, width)``. A mask of another size, a colour or transparent mask, or a file that is not an image
    raises :class:`~sdexplore.errors.InvalidArgumentError` saying what to give.
    """
    arr = mask_array(mask)
    if arr.shape[0] != 1:
        raise InvalidArgumentError(f"load_mask reads one mask, got {arr.shape[0]}; pass them one at a time")
    if image is not None:
        size = image if isinstance(image, tuple) else _image_size(image)
        _check_size(arr.shape[1:], size)
    return Image.fromarray((arr[0] * 255.0).round().astype(np.uint8), mode="L")


def _image_size(image: Any) -> tuple[int, int] | None:
    """(height, width) in pixels of an inpainting pipeline's ``image`` argument, or None (latents, unknown)."""
    if isinstance(image, (list, tuple)) and image:
        image = image[0]
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, (np.ndarray, torch.Tensor)):
        shape = tuple(image.shape)
        if len(shape) == 4:
            shape = shape[1:]  # a batch: (B, …) → one image
        if len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] not in (1, 3):
            return int(shape[0]), int(shape[1])  # (H, W, C)
        if len(shape) == 3 and shape[0] in (1, 3):
            return int(shape[1]), int(shape[2])  # (C, H, W); 4 or 16 channels are latents: no pixel size
        if len(shape) == 2:
            return int(shape[0]), int(shape[1])
    return None


def _check_size(have: tuple[int, ...], size: tuple[int, int] | None) -> None:
    if size is None or tuple(have) == tuple(size):
        return
    raise InvalidArgumentError(
        f"the mask is {have[0]}×{have[1]} (height×width) but the image is {size[0]}×{size[1]}: a mask must match "
        "its picture pixel for pixel. Draw it on the same picture, or resize both with "
        "sdexplore.images.load_image(image, size) and mask.resize((width, height), Image.NEAREST)"
    )


def _check_pictures(image: Any) -> None:
    """The ``image`` of an img2img/inpainting call is one diffusers' image processor reads: 16-bit and float
    pictures are refused (it reads PIL's modes I, I;16 and F as one channel, and numpy uint16 not at all, and fails
    deep inside the VAE), pointing at :func:`sdexplore.images.load_image`, which scales them to 8-bit RGB."""
    items = image if isinstance(image, (list, tuple)) else [image]
    for i, item in enumerate(items):
        what = "image" if items is not image else f"image[{i}]"
        if isinstance(item, Image.Image) and item.mode in _HIGH_DEPTH:
            kind = f"a {'float' if item.mode == 'F' else 'high bit depth'} picture (PIL mode {item.mode})"
        elif isinstance(item, np.ndarray) and item.dtype.kind in "iu" and item.dtype.itemsize > 1:
            kind = f"an integer array of dtype {item.dtype}"
        else:
            continue
        raise InvalidArgumentError(
            f"{what} is {kind}, which diffusers' image processor cannot read (it takes 8-bit RGB pictures, or "
            "float arrays in [0, 1]): pass sdexplore.images.load_image(image) instead, which converts it to 8-bit "
            "RGB (16-bit values scaled, with a note)"
        )


def check_inpaint_inputs(arguments: dict[str, Any], pipe: Any = None) -> torch.Tensor | None:
    """Check an img2img or inpainting call's inputs; return its mask, (M, H, W) float32 in [0, 1] on the CPU, or
    None without one.

    ``arguments``: the call's arguments by name (``image``, ``mask_image``, ``strength``). Called when an
    observed call begins, so each of these fails before any work, with one clear
    :class:`~sdexplore.errors.InvalidArgumentError`: a ``strength`` that is not a number in (0, 1] (diffusers
    fails on 0 and NaN with raw errors), a 16-bit or float picture, and a mask of the wrong size or mode (a
    colour, transparent, or high-bit-depth mask that diffusers' ``convert("L")`` would change). With ``pipe``,
    a ``height`` / ``width`` (or, without them, the picture's size) above the denoiser's limit is refused too
    (an SD3 transformer's ``pos_embed_max_size``: 64 pixels for the embedded ``tiny-shapes-mmdit``), which
    diffusers would find only in the first denoiser call. The mask returned is the one the pipeline reads
    (before it binarizes it at 0.5).
    """
    if pipe is not None:
        height, width = arguments.get("height"), arguments.get("width")
        source = ""
        if height is None and width is None and (size := _image_size(arguments.get("image"))) is not None:
            from .families import vae_scale_factor

            factor = vae_scale_factor(pipe)  # diffusers rounds a picture's own size down to the VAE's factor
            (height, width), source = (s - s % factor for s in size), " (the picture's)"
        check_size_limit(pipe, height, width, source=source)
    if "strength" in arguments:
        check_strength(arguments["strength"])
    if arguments.get("image") is not None:
        _check_pictures(arguments["image"])
    mask = arguments.get("mask_image")
    if mask is None:
        return None
    arr = mask_array(mask, what="mask_image")
    _check_size(arr.shape[1:], _image_size(arguments.get("image")))
    return torch.from_numpy(np.ascontiguousarray(arr))
