"""Image input: a PIL image, an array, a tensor, bytes or a path → an RGB picture at a size the VAE can take.

Every entry point that accepts a user's picture (:func:`sdexplore.invert`, walks with image keyframes, the
command line's ``--image``, the explorers' upload control) goes through :func:`load_image`, so each kind of bad
input gets one clear message (:class:`~sdexplore.errors.InvalidArgumentError`) and each conversion one note
(:class:`ImageNote`, a ``UserWarning``): a mode other than RGB (alpha composited on white, greyscale, palette,
16-bit, CMYK), an EXIF rotation, or a size that is not the one asked for or not a multiple of the VAE's factor
(resized with Lanczos; a different aspect ratio is scaled to cover and centre-cropped, never stretched).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidArgumentError

__all__ = ["ImageLike", "ImageNote", "encode_image", "image_array", "load_image", "pipeline_image"]

#: What the image entry points accept: a PIL image; a numpy array (H, W), (H, W, 3) or (H, W, 4), uint8, uint16
#: (scaled to 8-bit) or float in [0, 1]; a torch tensor (3, H, W) or (1, 3, H, W) in [-1, 1] (the pipelines' convention); the bytes of
#: an image file (an upload); or a path to an image file.
ImageLike = Image.Image | np.ndarray | torch.Tensor | bytes | bytearray | memoryview | str | os.PathLike

_ACCEPTED = (
    "a PIL image, a numpy array (H, W) / (H, W, 3) / (H, W, 4) (uint8, uint16, or float in [0, 1]), "
    "a torch tensor "
    "(3, H, W) or (1, 3, H, W) in [-1, 1], the bytes of an image file, or the path of a PNG/JPEG/WebP/... file"
)


class ImageNote(UserWarning):
    """A one-line note that an input image was converted (its mode, its orientation) or resized."""


def _note(message: str) -> None:
    warnings.warn(message, ImageNote, stacklevel=3)


def _open_file(data: bytes | None, path: Path | None) -> Image.Image:
    """Open and fully read an image file (bytes or a path); a missing or non-image file is one clear error."""
    where = f"{str(path)!r}" if path is not None else "the given bytes"
    if path is not None:
        if not path.exists():
            raise InvalidArgumentError(f"image file {str(path)!r} does not exist: check the path")
        if path.is_dir():
            raise InvalidArgumentError(
                f"{str(path)!r} is a folder, not an image file: give the path of one image"
            )
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            im.load()  # read it all now: a truncated file fails here, not later
            out = ImageOps.exif_transpose(im)
            if out is im:
                out = im.copy()
            elif im.getexif().get(0x0112, 1) != 1:
                _note(f"image {where} was rotated as its EXIF orientation says")
            return out
    except UnidentifiedImageError as e:
        raise InvalidArgumentError(
            f"{where} is not an image file PIL can read: give a PNG, JPEG, WebP, BMP, GIF or TIFF picture"
        ) from e
    except Image.DecompressionBombError as e:
        raise InvalidArgumentError(
            f"image {where} is too large to open safely ({e}): downscale it first"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidArgumentError(f"image {where} could not be read ({e}): is the file complete?") from e


def _from_array(array: np.ndarray, what: str) -> Image.Image:
    """A numpy array (H, W) / (H, W, 1|3|4), uint8, uint16 (scaled) or float in [0, 1] → a PIL image (mode L,
    RGB or RGBA)."""
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        raise InvalidArgumentError(
            f"{what} of shape {tuple(array.shape)} is channels-first: give (H, W, 3), e.g. array.transpose(1, 2, 0)"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]  # (H, W)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise InvalidArgumentError(
            f"{what} has shape {tuple(array.shape)}: give (H, W), (H, W, 3) or (H, W, 4)"
        )
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.bool_:
        pixels = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidArgumentError(f"{what} holds NaN or infinite values: give finite pixel values")
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidArgumentError(
                f"{what} is float with values in [{lo:.3g}, {hi:.3g}]: float arrays must be in [0, 1] "
                "(divide uint8 values by 255, or map [-1, 1] with (x + 1) / 2)"
            )
        pixels = (array * 255.0 + 0.5).astype(np.uint8)  # round to nearest
    elif array.dtype == np.uint16:  # 16-bit (a PNG read by imageio or OpenCV): scaled, as PIL's I;16 is
        pixels = (array.astype(np.float64) / 65535.0 * 255.0 + 0.5).astype(np.uint8)
        _note(f"{what} is 16-bit (uint16): scaled to 8-bit")
    elif np.issubdtype(array.dtype, np.integer):
        lo, hi = int(array.min()), int(array.max())
        if lo < 0 or hi > 255:
            raise InvalidArgumentError(
                f"{what} is {array.dtype} with values in [{lo}, {hi}]: integer arrays must be in 0..255 "
                "(or pass uint8, or float in [0, 1])"
            )
        pixels = array.astype(np.uint8)
    else:
        raise InvalidArgumentError(f"{what} has dtype {array.dtype}: give uint8 or float pixel values")
    return Image.fromarray(np.ascontiguousarray(pixels))


def _from_tensor(tensor: torch.Tensor) -> Image.Image:
    """A torch tensor (3, H, W) or (1, 3, H, W) in [-1, 1] → a PIL RGB image."""
    t = tensor.detach()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]  # (3, H, W)
    if t.ndim != 3 or t.shape[0] != 3:
        raise InvalidArgumentError(
            f"a tensor image has shape {tuple(tensor.shape)}: give (3, H, W) or (1, 3, H, W) in [-1, 1] "
            "(one image; a batch is a list of images)"
        )
    if not t.is_floating_point():
        raise InvalidArgumentError(f"a tensor image has dtype {t.dtype}: give a float tensor in [-1, 1]")
    t = t.float().cpu()
    if not torch.isfinite(t).all():
        raise InvalidArgumentError("the tensor image holds NaN or infinite values: give finite pixel values")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1.0 - 1e-4 or hi > 1.0 + 1e-4:
        raise InvalidArgumentError(
            f"a tensor image has values in [{lo:.3g}, {hi:.3g}]: tensors are read in [-1, 1] "
            "(the pipelines' convention; map [0, 1] with x * 2 - 1)"
        )
    hwc = ((t.clamp(-1, 1) + 1) * 127.5 + 0.5).to(torch.uint8).permute(1, 2, 0)  # (H, W, 3)
    return Image.fromarray(hwc.numpy())


def _to_rgb(im: Image.Image, what: str) -> Image.Image:
    """Any PIL mode → RGB, with a note for each conversion that changes what the pixels mean."""
    if im.mode == "RGB":
        return im
    mode = im.mode
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(im, dtype=np.float64)  # (H, W)
        top = 65535.0 if mode.startswith("I;16") or values.max() > 255 else 255.0
        if mode == "F":
            top = 1.0 if values.max() <= 1.0 else 255.0
        grey = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        _note(f"{what} is {mode} (greyscale, high bit depth): converted to 8-bit RGB")
        return Image.fromarray(grey).convert("RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            _note(f"{what} has transparency ({mode}): composited on a white background")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    names = {
        "L": "greyscale",
        "1": "black and white",
        "P": "a palette image",
        "CMYK": "CMYK",
        "YCbCr": "YCbCr",
    }
    _note(f"{what} is {names.get(mode, mode)} (mode {mode}): converted to RGB")
    return im.convert("RGB")


def _target_size(size: int | tuple[int, int] | None, have: tuple[int, int], multiple: int) -> tuple[int, int]:
    """(height, width) to resize to: the asked size, or the image's own rounded down to ``multiple``."""
    if size is None:
        h, w = (max(multiple, (s // multiple) * multiple) for s in have)
        return h, w
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)
    ):
        raise InvalidArgumentError(
            f"size={size!r}: give one side in pixels or (height, width), e.g. 512 or (512, 768)"
        )
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0 or h % multiple or w % multiple:
        raise InvalidArgumentError(
            f"size {h}×{w}: height and width must be positive multiples of {multiple} (the VAE's factor), "
            f"e.g. {max(multiple, h // multiple * multiple)}×{max(multiple, w // multiple * multiple)}"
        )
    return h, w


def _resize(im: Image.Image, height: int, width: int, what: str) -> Image.Image:
    """Resize to (height, width): scale to cover and centre-crop when the aspect ratio differs (never stretch)."""
    w0, h0 = im.size
    if (h0, w0) == (height, width):
        return im
    scale = max(height / h0, width / w0)
    cover = (max(width, round(w0 * scale)), max(height, round(h0 * scale)))
    out = im.resize(cover, Image.Resampling.LANCZOS) if cover != (w0, h0) else im
    left, top = (cover[0] - width) // 2, (cover[1] - height) // 2
    cropped = cover != (width, height)
    if cropped:
        out = out.crop((left, top, left + width, top + height))
    how = " (scaled to cover and centre-cropped: the aspect ratio differs)" if cropped else ""
    _note(f"{what} is {h0}×{w0} (height×width): resized to {height}×{width}{how}")
    return out


def load_image(
    image: ImageLike,
    size: int | tuple[int, int] | None = None,
    *,
    multiple: int = 8,
) -> Image.Image:
    """Read ``image`` (see :data:`ImageLike`) as an RGB PIL image of ``size`` pixels.

    ``size`` is ``(height, width)`` or one side; both must be multiples of ``multiple`` (the VAE's factor, 8 for
    every Stable Diffusion family). ``None`` keeps the image's own size rounded down to a multiple. Conversions
    and resizes each give one :class:`ImageNote`; an input that is not an image (a missing or non-image file, a
    wrong shape, dtype or value range) raises :class:`~sdexplore.errors.InvalidArgumentError` saying what to
    give instead.
    """
    if not isinstance(multiple, (int, np.integer)) or isinstance(multiple, bool) or multiple < 1:
        raise InvalidArgumentError(f"multiple={multiple!r}: give a positive whole number of pixels, e.g. 8")
    what = "the image"
    if isinstance(image, Image.Image):
        im = image
    elif isinstance(image, np.ndarray):
        im = _from_array(image, "the image array")
    elif isinstance(image, torch.Tensor):
        im = _from_tensor(image)
    elif isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise InvalidArgumentError("the image bytes are empty: give the contents of an image file")
        im = _open_file(bytes(image), None)
    elif isinstance(image, (str, os.PathLike)):
        if isinstance(image, str) and not image.strip():
            raise InvalidArgumentError("the image path is empty: give the path of an image file")
        path = Path(image).expanduser()
        what = f"image {path.name!r}"
        im = _open_file(None, path)
    else:
        raise InvalidArgumentError(
            f"an image of type {type(image).__name__} is not accepted: give {_ACCEPTED}"
        )
    if getattr(im, "n_frames", 1) > 1:
        _note(f"{what} has {im.n_frames} frames: the first is used")
    im = _to_rgb(im, what)
    height, width = _target_size(size, (im.height, im.width), int(multiple))
    return _resize(im, height, width, what)


def image_array(
    image: ImageLike, size: int | tuple[int, int] | None = None, *, multiple: int = 8
) -> np.ndarray:
    """:func:`load_image` as a uint8 array (H, W, 3)."""
    return np.asarray(load_image(image, size, multiple=multiple), dtype=np.uint8).copy()


def _pipe_size(pipe: Any) -> tuple[tuple[int, int], int]:
    from .families import vae_scale_factor
    from .text import default_size

    return default_size(pipe), vae_scale_factor(pipe)


def pipeline_image(
    pipe: Any, image: ImageLike, *, height: int | None = None, width: int | None = None
) -> Image.Image:
    """:func:`load_image` at the size ``pipe`` will draw: ``height``/``width`` if given, else the model's default
    size (512² for SD 1.5, 1024² for SDXL, 64² for the embedded model); a multiple of the pipeline's VAE factor."""
    (default_h, default_w), factor = _pipe_size(pipe)
    return load_image(image, (height or default_h, width or default_w), multiple=factor)


@torch.no_grad()
def encode_image(
    pipe: Any, image: ImageLike, *, height: int | None = None, width: int | None = None
) -> torch.Tensor:
    """The sampling-space latents (1, C, h, w) of a picture: the VAE posterior's mean, shifted and scaled as the
    pipelines do (``(z − shift_factor) · scaling_factor``), or for a VAE with batch-norm statistics (Flux.2)
    normalised by them over 2×2 patches as ``Flux2KleinPipeline`` does; on the pipeline's device and dtype.

    The posterior mean (not a sample) makes the result deterministic; the picture is read with
    :func:`pipeline_image`.
    """
    pic = pipeline_image(pipe, image, height=height, width=width)
    vae = pipe.vae
    param = next(vae.parameters())
    pixels = torch.from_numpy(np.asarray(pic, dtype=np.float32) / 127.5 - 1.0)  # (H, W, 3) in [-1, 1]
    pixels = pixels.permute(2, 0, 1)[None].to(device=param.device, dtype=param.dtype)  # (1, 3, H, W)
    z = vae.encode(pixels).latent_dist.mode()  # (1, C, h, w)
    if getattr(vae, "bn", None) is not None:
        b, c, h, w = z.shape
        x = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (B, C, dy, dx, h/2, w/2)
        x = x.reshape(b, c * 4, h // 2, w // 2)  # (B, 4C, h/2, w/2): channel c·4 + 2·dy + dx
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(x.dtype)  # (1, 4C, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(x.dtype)
        x = ((x - mean) / std).reshape(b, c, 2, 2, h // 2, w // 2)  # (B, C, dy, dx, h/2, w/2)
        return x.permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)  # (B, C, h, w)
    shift = getattr(vae.config, "shift_factor", None)
    if shift:  # SD3's VAE; None or 0.0 for the SD 1.x/2.x/XL VAEs
        z = z - shift
    return z * vae.config.scaling_factor
