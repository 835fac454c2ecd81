"""Write frames out: PNG files, an image grid, animated GIF, MP4 (H.264) and WebM (VP9), each file atomically."""

from __future__ import annotations

import math
import numbers
import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from struct import error as struct_error
from typing import Any

import imageio.v3 as iio
import numpy as np
from PIL import Image

from ..errors import ExportError, InvalidArgumentError

#: GIF frame delays are whole hundredths of a second, and browsers play any delay under 0.02 s as 0.1 s.
MAX_GIF_FPS = 50
#: A GIF frame delay is a 16-bit count of hundredths of a second: at most 655.35 s. Pillow merges a run of
#: identical frames into one frame whose delay is the run's total, which must fit too.
MAX_GIF_FRAME_S = 655.35
#: Slowest video: ffmpeg's frame rate is a fraction with a denominator up to 1001 here; below 1/1000 it is 0.
MIN_VIDEO_FPS = 0.001
#: Video suffix → (ffmpeg muxer, encoder arguments). H.264 in yuv420p plays everywhere; VP9 is the WebM codec
#: browsers play (``-b:v 0``: constant quality, set by ``-crf``).
_VIDEO_CODECS: dict[str, tuple[str, list[str]]] = {
    ".mp4": ("mp4", "-c:v libx264 -pix_fmt yuv420p -movflags +faststart".split()),
    ".webm": ("webm", "-c:v libvpx-vp9 -pix_fmt yuv420p -b:v 0 -deadline good -cpu-used 4 -row-mt 1".split()),
}
_CRF_MAX = {"libx264": 51, "libvpx-vp9": 63}  # worst quality of each encoder's -crf scale


class _BadExportArgument(ExportError, InvalidArgumentError):
    """A parameter no encoder accepts (fps, loop, quality...): an :class:`~sdexplore.errors.InvalidArgumentError`
    found before anything is encoded, and still an :class:`~sdexplore.errors.ExportError` for older callers."""


def _at_least(value: float) -> float:
    """``value`` rounded up to 3 significant digits (a bound shown to a user must itself pass the check)."""
    digits = 2 - math.floor(math.log10(value))
    return math.ceil(value * 10**digits) / 10**digits


def as_uint8_frames(images: Any) -> np.ndarray:
    """Frames as one ``(N, H, W, 3)`` uint8 array from a uint8/float array, PIL images or a :class:`~sdexplore.walks.Walk`."""
    images = getattr(images, "images", images)
    if isinstance(images, np.ndarray):
        arr = images
    else:
        images = list(images)
        if not images:
            raise ExportError("There are no frames to write: pass at least one image.")
        arr = np.stack(
            [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im) for im in images]
        )
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ExportError(f"Expected frames shaped (N, H, W, 3), got {arr.shape}.")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ExportError(
            f"There are no frames to write (shape {arr.shape}): pass at least one non-empty image."
        )
    return arr


def rubber_band(frames: np.ndarray) -> np.ndarray:
    """Forward then back, without repeating either end: 0 1 2 3 2 1 (loops seamlessly when played on repeat)."""
    return np.concatenate([frames, frames[-2:0:-1]]) if len(frames) > 2 else frames


def check_fps(fps: Any, *, gif: bool = False, frames: int | None = None) -> float:
    """``fps`` as a float if the encoder accepts it, else :class:`~sdexplore.errors.InvalidArgumentError` (an
    :class:`~sdexplore.errors.ExportError` too). Cheap: call it before generating the frames.

    A finite number above 0; for a video at least :data:`MIN_VIDEO_FPS`; for a GIF at most :data:`MAX_GIF_FPS`
    and slow enough for its delay field: one frame lasts at most :data:`MAX_GIF_FRAME_S`, and so does a run of
    ``frames`` identical frames (pass the GIF's frame count to check the worst case before the frames exist).
    """
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real):
        raise _BadExportArgument(f"fps must be a number of frames per second, such as 12; got {fps!r}.")
    value = float(fps)
    if not math.isfinite(value) or value <= 0:
        raise _BadExportArgument(f"fps must be a finite number above 0, such as 12; got {fps!r}.")
    if gif and value > MAX_GIF_FPS:
        raise _BadExportArgument(
            f"A GIF cannot play at fps={value:g}: its frame delays are whole hundredths of a second and browsers "
            f"slow anything under 0.02 s down to 0.1 s. Use fps <= {MAX_GIF_FPS}, or save an .mp4 / .webm."
        )
    if gif:
        run = 1 if frames is None else max(1, int(frames))
        slowest = run / MAX_GIF_FRAME_S
        if value < slowest:
            what = "a frame" if run == 1 else f"{run} identical frames in a row (GIF writers merge them)"
            raise _BadExportArgument(
                f"A GIF cannot play at fps={value:g}: it stores a frame's time in 1/100 s in 16 bits, so {what} "
                f"can last {MAX_GIF_FRAME_S} s at most. Use fps >= {_at_least(slowest):g}, or save an .mp4."
            )
    elif value < MIN_VIDEO_FPS:
        raise _BadExportArgument(
            f"A video cannot play at fps={value:g}: ffmpeg's frame rate would round to 0. Use fps >= "
            f"{MIN_VIDEO_FPS:g} (one frame per {1 / MIN_VIDEO_FPS:g} s)."
        )
    return value


def _longest_still_run(frames: np.ndarray) -> int:
    """The most identical frames in a row (N, H, W, 3): a GIF writer merges them into one frame."""
    same = np.all(frames[1:] == frames[:-1], axis=(1, 2, 3))  # (N-1,) frame i+1 equals frame i
    longest = run = 1
    for s in same:
        run = run + 1 if s else 1
        longest = max(longest, run)
    return longest


def _check_target(path: str | os.PathLike[str], suffixes: Sequence[str], writer: str) -> Path:
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise ExportError(
            f"{writer} writes {' or '.join(suffixes)} files; {path.name!r} has another extension."
        )
    _check_folder(path)
    return path


def _check_folder(path: Path) -> None:
    if path.is_dir():
        raise ExportError(f"{path} is a folder; pass a file name.")
    if not path.parent.is_dir():
        raise ExportError(
            f"Cannot write {path.name}: the folder {path.parent} does not exist. Create it first."
        )


def _temporary_beside(path: Path) -> Path:
    """Create an empty temporary file next to ``path`` (same file system, so ``os.replace`` is atomic), with the
    mode an ordinary ``open(path, "w")`` gives (0666 minus the umask)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        except OSError as error:
            raise ExportError(f"Cannot write {path}: {error.strerror or error}.") from error
        return tmp


@contextmanager
def _atomic_files(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Temporary files beside ``paths``; when the block succeeds every one replaces its target, else (any
    exception, ``KeyboardInterrupt`` included) all are removed and the targets stay as they were."""
    temps: list[Path] = []
    try:
        for path in paths:
            temps.append(_temporary_beside(path))
        yield temps
        for tmp, path in zip(temps, paths, strict=True):
            os.replace(tmp, path)
    except BaseException as error:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, ExportError):  # disk full, permissions...
            names = ", ".join(str(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
            raise ExportError(f"Could not write {names}: {error}") from error
        raise


def _save_image(image: Image.Image, tmp: Path, target: Path) -> None:
    fmt = Image.registered_extensions().get(target.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ExportError(
            f"Cannot write {target.name}: Pillow has no writer for {target.suffix or 'a file without an extension'!r}. "
            "Use .png (lossless), .jpg or .webp."
        )
    image.save(tmp, format=fmt)


def save_frames(images: Any, folder: str | Path, *, prefix: str = "frame") -> list[Path]:
    """Write each frame as ``folder/prefix_0000.png``; returns the paths.

    All frames are written to temporary files first and then renamed, so an error or an interrupt leaves the
    folder as it was. Frames of an earlier, longer sequence with the same prefix (``prefix_0007.png`` when
    this one ends at ``prefix_0004.png``) are removed, so the folder holds one sequence.
    """
    if not isinstance(prefix, str) or not prefix or re.search(r"[/\\]", prefix):
        raise _BadExportArgument(f"prefix must be a plain file-name prefix such as 'frame', not {prefix!r}.")
    frames = as_uint8_frames(images)
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; save_frames needs a folder.")
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{prefix}_{i:04d}.png" for i in range(len(frames))]
    with _atomic_files(paths) as temps:
        for frame, tmp in zip(frames, temps, strict=True):
            Image.fromarray(frame).save(tmp, format="PNG")
    stale = len(frames)
    while (out / f"{prefix}_{stale:04d}.png").is_file():
        (out / f"{prefix}_{stale:04d}.png").unlink()
        stale += 1
    return paths


def image_grid(images: Any, *, cols: int | None = None, pad: int = 2, background: int = 255) -> np.ndarray:
    """Tile frames row by row into one ``(rows·(H+pad)−pad, cols·(W+pad)−pad, 3)`` uint8 image."""
    frames = as_uint8_frames(images)
    n, h, w, _ = frames.shape
    if cols is not None and (isinstance(cols, bool) or not isinstance(cols, numbers.Integral) or cols < 1):
        raise _BadExportArgument(
            f"cols must be a whole number of columns >= 1, or None for a square grid; got {cols!r}."
        )
    if isinstance(pad, bool) or not isinstance(pad, numbers.Integral) or pad < 0:
        raise _BadExportArgument(f"pad must be a whole number of pixels >= 0; got {pad!r}.")
    cols = int(cols or math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, 3), background, dtype=np.uint8)
    for i, frame in enumerate(frames):
        r, c = divmod(i, cols)
        grid[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = frame
    return grid


def save_grid(images: Any, path: str | Path, *, cols: int | None = None, pad: int = 2) -> Path:
    """Save :func:`image_grid` as one image, in the format of the suffix (``.png``, ``.jpg``, ``.webp``...)."""
    path = Path(path)
    _check_folder(path)
    grid = Image.fromarray(image_grid(images, cols=cols, pad=pad))
    with _atomic_files([path]) as (tmp,):
        _save_image(grid, tmp, path)
    return path


def _sequence(images: Any, rubber: bool) -> np.ndarray:
    frames = as_uint8_frames(images)
    return rubber_band(frames) if rubber else frames


def save_gif(images: Any, path: str | Path, *, fps: float = 12, rubber: bool = False, loop: int = 0) -> Path:
    """Animated GIF at ``fps`` frames per second (at most :data:`MAX_GIF_FPS`; ``loop=0``: repeat forever, else
    at most 65535 repeats); ``rubber`` plays forward then back. Written atomically. Parameters the GIF format
    cannot hold (see :func:`check_fps`) raise :class:`~sdexplore.errors.InvalidArgumentError` before encoding."""
    fps = check_fps(fps, gif=True)
    if isinstance(loop, bool) or not isinstance(loop, numbers.Integral) or not 0 <= loop <= 65535:
        raise _BadExportArgument(
            f"loop must be 0 (forever) or a whole number of repeats up to 65535 (GIF stores it in 16 bits); "
            f"got {loop!r}."
        )
    path = _check_target(path, (".gif",), "save_gif")
    frames = _sequence(images, rubber)
    check_fps(fps, gif=True, frames=_longest_still_run(frames))
    with _atomic_files([path]) as (tmp,):
        try:
            iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=int(loop))
        except (OverflowError, struct_error) as error:  # frames Pillow merged after quantising to a palette
            raise ExportError(
                f"Could not write {path}: a frame time overflows the GIF's 16-bit field at fps={fps:g} ({error}). "
                "Use a higher fps, or save an .mp4."
            ) from error
    return path


def _frame_bytes(frames: np.ndarray) -> Iterator[bytes]:
    """One frame's raw RGB bytes at a time, as ffmpeg's rawvideo input reads them."""
    for frame in frames:
        yield np.ascontiguousarray(frame).tobytes()


def _ffmpeg_exe() -> str:
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as error:
        raise ExportError(
            f"No ffmpeg to encode video with ({error}): pip install imageio-ffmpeg, or point IMAGEIO_FFMPEG_EXE "
            "at an ffmpeg executable."
        ) from error


def _encode(frames: np.ndarray, tmp: Path, target: Path, fps: float, quality: int) -> None:
    """Pipe ``frames`` through ffmpeg into ``tmp``; any failure raises :class:`ExportError` naming ``target``."""
    muxer, codec_args = _VIDEO_CODECS[target.suffix.lower()]
    _, h, w, _ = frames.shape
    codec = codec_args[codec_args.index("-c:v") + 1]
    crf = round((1 - quality / 10) * _CRF_MAX.get(codec, 51))  # imageio's mapping: quality 10 → crf 0
    rate = Fraction(fps).limit_denominator(1001)
    cmd = [
        _ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(rate), "-i", "-",
        "-an", *codec_args, "-crf", str(crf), "-f", muxer, str(tmp),
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: ffmpeg can never block on a full stderr
        # Its own session: Ctrl-C reaches Python only, which then stops ffmpeg (never a half-killed encoder).
        proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
        )
        try:
            try:
                for chunk in _frame_bytes(frames):
                    proc.stdin.write(chunk)
                proc.stdin.close()
            except BrokenPipeError:  # ffmpeg stopped early; its log says why
                pass
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if code != 0:
            log.seek(0)
            lines = log.read().decode(errors="replace").strip().splitlines()
            detail = " | ".join(lines[-4:]) or f"exit status {code}"
            raise ExportError(f"ffmpeg could not write {target} ({codec}): {detail}")


def save_mp4(
    images: Any, path: str | Path, *, fps: float = 12, rubber: bool = False, quality: int = 8
) -> Path:
    """An ``.mp4`` (H.264, yuv420p: plays everywhere) or ``.webm`` (VP9: plays in browsers) video via the ffmpeg
    that imageio-ffmpeg ships; the suffix picks. Odd sides are padded by one edge pixel (yuv420p needs even
    sides). ``quality`` runs from 1 to 10 (10: best). Written atomically; an encoder failure raises
    :class:`~sdexplore.errors.ExportError` naming the file and ffmpeg's message."""
    fps = check_fps(fps)
    if isinstance(quality, bool) or not isinstance(quality, numbers.Real) or not 1 <= quality <= 10:
        raise _BadExportArgument(f"quality must be a number from 1 to 10 (10: best); got {quality!r}.")
    path = _check_target(path, tuple(_VIDEO_CODECS), "save_mp4")
    frames = _sequence(images, rubber)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:  # yuv420p needs even sides
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with _atomic_files([path]) as (tmp,):
        _encode(frames, tmp, path, fps, quality)
    return path


def read_frames(path: str | Path) -> np.ndarray:
    """Read a GIF, MP4 or WebM back as ``(N, H, W, 3)`` uint8 (for checks and notebooks)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"No such file: {path}.")
    if path.suffix.lower() in _VIDEO_CODECS:
        return np.stack(list(iio.imiter(path, plugin="FFMPEG")))
    arr = iio.imread(path, index=None)
    return arr[..., :3]


__all__: Sequence[str] = [
    "MAX_GIF_FPS",
    "MAX_GIF_FRAME_S",
    "MIN_VIDEO_FPS",
    "as_uint8_frames",
    "check_fps",
    "image_grid",
    "read_frames",
    "rubber_band",
    "save_frames",
    "save_gif",
    "save_grid",
    "save_mp4",
]
