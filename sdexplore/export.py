"""Write frames out: PNG files, an image grid, animated GIF and MP4 (imageio + imageio-ffmpeg), optional rubber band."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
from PIL import Image


def as_uint8_frames(images: Any) -> np.ndarray:
    """Frames as one ``(N, H, W, 3)`` uint8 array from a uint8/float array, PIL images or a :class:`~sdexplore.walks.Walk`."""
    images = getattr(images, "images", images)
    if isinstance(images, np.ndarray):
        arr = images
    else:
        arr = np.stack(
            [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images]
        )
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"Expected frames shaped (N, H, W, 3), got {arr.shape}.")
    return arr


def rubber_band(frames: np.ndarray) -> np.ndarray:
    """Forward then back, without repeating either end: 0 1 2 3 2 1 (loops seamlessly when played on repeat)."""
    return np.concatenate([frames, frames[-2:0:-1]]) if len(frames) > 2 else frames


def save_frames(images: Any, folder: str | Path, *, prefix: str = "frame") -> list[Path]:
    """Write each frame as ``folder/prefix_0000.png``; returns the paths."""
    frames = as_uint8_frames(images)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, frame in enumerate(frames):
        path = out / f"{prefix}_{i:04d}.png"
        Image.fromarray(frame).save(path)
        paths.append(path)
    return paths


def image_grid(images: Any, *, cols: int | None = None, pad: int = 2, background: int = 255) -> np.ndarray:
    """Tile frames row by row into one ``(rows·(H+pad)−pad, cols·(W+pad)−pad, 3)`` uint8 image."""
    frames = as_uint8_frames(images)
    n, h, w, _ = frames.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), background, dtype=np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, cols)
        grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = frame
    return grid


def save_grid(images: Any, path: str | Path, *, cols: int | None = None, pad: int = 2) -> Path:
    """Save :func:`image_grid` as a PNG."""
    path = Path(path)
    Image.fromarray(image_grid(images, cols=cols, pad=pad)).save(path)
    return path


def _sequence(images: Any, rubber: bool) -> np.ndarray:
    frames = as_uint8_frames(images)
    return rubber_band(frames) if rubber else frames


def save_gif(images: Any, path: str | Path, *, fps: float = 12, rubber: bool = False, loop: int = 0) -> Path:
    """Animated GIF at ``fps`` frames per second (``loop=0``: repeat forever); ``rubber`` plays forward then back."""
    path = Path(path)
    frames = _sequence(images, rubber)
    iio.imwrite(path, frames, extension=".gif", duration=1000 / fps, loop=loop)
    return path


def save_mp4(
    images: Any, path: str | Path, *, fps: float = 12, rubber: bool = False, quality: int = 8
) -> Path:
    """H.264 MP4 via imageio-ffmpeg (yuv420p, plays everywhere); odd sides are padded by one edge pixel."""
    path = Path(path)
    frames = _sequence(images, rubber)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:  # yuv420p needs even sides
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    iio.imwrite(
        path,
        list(frames),
        plugin="FFMPEG",
        extension=".mp4",
        fps=fps,
        codec="libx264",
        quality=quality,
        pixelformat="yuv420p",
        macro_block_size=1,
    )
    return path


def read_frames(path: str | Path) -> np.ndarray:
    """Read a GIF or MP4 back as ``(N, H, W, 3)`` uint8 (for checks and notebooks)."""
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        return np.stack(list(iio.imiter(path, plugin="FFMPEG")))
    arr = iio.imread(path, index=None)
    return arr[..., :3]


__all__: Sequence[str] = [
    "as_uint8_frames",
    "image_grid",
    "read_frames",
    "rubber_band",
    "save_frames",
    "save_gif",
    "save_grid",
    "save_mp4",
]
