"""``sdexplore steps``: generate one image and write every denoising step (strips, a GIF, the trace)."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _common
from ._common import (
    MAX_GIF_FPS,
    TILE,
    _call_kwargs,
    _check_directions,
    _check_fps,
    _check_image_options,
    _check_model,
    _check_size,
    _common_options,
    _directions_option,
    _directions_record,
    _fit,
    _frames_option,
    _generation_options,
    _html_option,
    _number,
    _output_options,
    _prompt,
    _reconstruct_observed,
    _save_png,
    _seed,
    _start_output,
    _start_page,
    _steered,
    _strip,
    _with_progress_bar,
    _write_directions_record,
    _write_observation_page,
    _wrote,
)
from .output import InputError

if TYPE_CHECKING:  # numpy, torch and diffusers load when a command runs: `--help` and bad input stay fast
    import numpy as np

_STEPS_EPILOG = """\
writes into --out (default sdexplore-steps/):
  image.png           the final image
  steps_x0.png        the predicted clean image (x0, VAE-decoded) at every step, labelled step and timestep
  steps_preview.png   the cheap latent->RGB preview of x0 at every step (learned, or linear)
  denoising.gif       one frame per step (x0; a bar at the bottom shows the progress through the run)
  trace.safetensors   the recorded trace: sdexplore.Trace.load("trace.safetensors")

A video model (Wan) writes the clip and its frames at every step instead (its causal VAE decodes whole clips, so
the steps show the linear preview of x0, every latent frame):
  video.gif           the generated clip (--fps frames per second)
  frames.png          the clip's frames side by side
  steps_preview.png   one row per step: the preview of each latent frame, left to right (Trace.frame_strip)
  denoising.gif       one frame per step: that row, with the progress bar
  trace.safetensors   the recorded trace, its latents (B, C, frames, h, w)

With --image PICTURE the steps are those of the picture's reconstruction: the picture is inverted with the
prompt (sdexplore invert) and regenerated from its inverted noise under observation (image.png is the
reconstruction; --seed is not used).

With --html PAGE the run is also written as one self-contained page (a step slider over the noisy latents,
x0 and the latent channels, with the run's model, seed and prompt): no network, it opens from file://.

examples:
  sdexplore steps "a big red circle at the top left on a blue background"
  sdexplore steps "a big red circle at the top left on a blue background" --out red --html red.html
  sdexplore steps "a big red circle at the top left on a blue background" --image scene.png --out mine
  sdexplore steps "a small green triangle" --steps 50 --scheduler euler --seed 3 --out tri
  sdexplore steps "a castle" --model stable-diffusion-v1-5/stable-diffusion-v1-5 --preview linear --out castle
"""


def add_parser(sub: Any) -> None:
    """Add ``steps`` to the ``sdexplore`` subparsers ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser(
        "steps",
        parents=[
            _common_options(),
            _generation_options(),
            _output_options("sdexplore-steps", "output folder"),
        ],
        help="generate one image and write every denoising step: x0 and preview strips, a GIF, the trace",
        description="Generate one image and record every denoising step: the final image, strips of x0 and "
        "previews, an animated GIF of the denoising, and the saved trace.",
        epilog=_STEPS_EPILOG,
        formatter_class=fmt,
    )
    s.add_argument("prompt", metavar="PROMPT", help="what to generate, in quotes")
    s.add_argument(
        "--seed", type=_seed, default=0, metavar="S", help="random seed, 0 to 2**64 - 1 (default 0)"
    )
    s.add_argument(
        "--preview",
        choices=("decode", "linear"),
        default=None,
        help="decode: VAE-decode x0 at every step (GIF and x0 strip; the default for images); linear: only the "
        "free linear preview (a video model's only one)",
    )
    s.add_argument(
        "--fps",
        type=_number(0.0, MAX_GIF_FPS, above=True),
        default=8.0,
        help="GIF frames per second (default 8)",
    )
    s.add_argument("--image", metavar="PICTURE", help="record the reconstruction of this picture (see below)")
    _html_option(s, "the steps (a step slider over the run)")
    _directions_option(s)
    _frames_option(s)
    s.set_defaults(run=_cmd_steps)


def _cmd_steps(args: argparse.Namespace) -> int:
    _prompt(args.prompt)
    _check_size(args)
    _check_fps(args.fps, ".gif", args.steps)  # one GIF frame per step
    _check_image_options(args, [args.image])
    _check_directions(args)
    output = _start_output(args, folder=True)
    page = _start_page(args)
    scheduler = _check_model(args, args.model, args.scheduler)
    # the locks are taken here: a second run into the same --out (or --html) is refused before loading
    with output, page or contextlib.nullcontext():
        pipe = _common._load(args, args.model, scheduler)
        names = step_files(pipe, args)  # an image's or a video's files, checked before any step
        write_steps(pipe, args, {k: output.path / v for k, v in names.items()}, page=page and page.path)
        extra = _write_directions_record(args, output.path)
        output.commit()
        if page is not None:
            page.commit()
    _wrote(output.shown / v for v in [*names.values(), *extra])
    _wrote([page.shown] if page is not None else [])
    return 0


def step_files(pipe: Any, args: argparse.Namespace) -> dict[str, str]:
    """What ``sdexplore steps`` writes for this pipeline, key → file name: an image's (image, x0 strip unless
    ``--preview linear``, previews, GIF, trace) or a video's (clip, frames, per-step frame strips, GIF, trace).
    ``--preview decode`` on a video model is refused here, before any step."""
    from ..families import detect_family

    fam = detect_family(pipe)
    if not fam.video:
        names = {"image": "image.png", "x0": "steps_x0.png", "preview": "steps_preview.png"}
        if args.preview == "linear":
            del names["x0"]
        return {**names, "gif": "denoising.gif", "trace": "trace.safetensors"}
    if args.preview == "decode":
        raise InputError(
            f"--preview decode is not available for {fam.label}: its causal video VAE decodes whole clips, not "
            "one step's x0; leave --preview out (every step's frames are shown by the linear preview)"
        )
    return {
        "video": "video.gif",
        "frames": "frames.png",
        "preview": "steps_preview.png",
        "gif": "denoising.gif",
        "trace": "trace.safetensors",
    }


def write_steps(
    pipe: Any, args: argparse.Namespace, files: dict[str, Path], *, page: Path | None = None
) -> None:
    """The work of ``sdexplore steps`` on a loaded pipeline: generate, record, write ``files`` (see
    :func:`step_files`; a video model's are its clip, its frames and a frame strip per step) and, given
    ``page``, the ``--html`` page there."""

    import numpy as np

    from ..generation import generate
    from ..views.export import save_gif

    prompt, decode = args.prompt, args.preview != "linear" and "x0" in files
    if getattr(args, "image", None) is None:
        with _steered(pipe, args):
            images, obs = generate(pipe, prompt, steps=True, seed=args.seed, **_call_kwargs(args))
    else:
        images, obs = _reconstruct_observed(pipe, args, steps=True)
    trace = obs.steps
    trace.meta.update(
        prompt=prompt,
        seed=args.seed,
        model=args.model or "embedded",
        negative_prompt=args.negative,
        command="sdexplore steps",
    )
    if getattr(args, "directions", None):
        trace.meta.update(directions=_directions_record(args))
    if getattr(args, "image", None) is not None:
        trace.meta.update(image=str(args.image), seed=None)
    if page is not None:  # a video's page draws its frames from the trace
        _write_observation_page(page, obs, None if "video" in files else images[0].convert("RGB"), args)
    if "video" in files:
        _write_video_steps(images[0], trace, files, fps=args.fps)
        return
    image = np.asarray(images[0].convert("RGB"))  # (H, W, 3) uint8
    h, w = image.shape[:2]
    labels = [f"{s.index} t={s.timestep:.0f}" for s in trace]
    previews = [s.preview[0].numpy() for s in trace]  # each (h, w, 3) uint8, one pixel per latent cell
    files["image"].parent.mkdir(parents=True, exist_ok=True)
    _save_png(image, files["image"])
    _save_png(_strip(previews, labels, nearest=True), files["preview"])
    if decode:
        x0s = decode_x0(pipe, trace, progress=not args.no_progress)  # each (H, W, 3) uint8
        _save_png(_strip(x0s, labels, nearest=False), files["x0"])
        frames = x0s
    else:
        frames = [_fit(p, max(h, w), nearest=True) for p in previews]
    n = len(frames)
    save_gif(
        np.stack([_with_progress_bar(f, i, n) for i, f in enumerate(frames)]), files["gif"], fps=args.fps
    )
    trace.save(files["trace"])


def _write_video_steps(clip: Any, trace: Any, files: dict[str, Path], *, fps: float) -> None:
    """A video's ``sdexplore steps`` files: the clip (frames, H, W, 3) as a GIF and side by side, each step's
    latent frames in a row (:meth:`~sdexplore.results.Trace.frame_strip`, rows top to bottom), the denoising GIF
    of those rows, the trace."""
    import numpy as np

    from ..views.export import image_grid, save_gif
    from ._common import _label

    frames = _uint8_frames(clip)  # (N, H, W, 3)
    files["video"].parent.mkdir(parents=True, exist_ok=True)
    save_gif(frames, files["video"], fps=fps)
    _save_png(np.concatenate(list(frames), axis=1), files["frames"])  # (H, N·W, 3): the frames left to right
    F = trace.frames or 1
    rows = [np.asarray(trace.frame_strip(i)) for i in range(len(trace))]  # each (h, F·w, 3) uint8
    rows = [_fit(r, TILE * F, nearest=True) for r in rows]  # each latent frame about one tile wide
    labels = [f"{s.index} t={s.timestep:.0f}" for s in trace]
    _save_png(
        image_grid([_label(r, lab) for r, lab in zip(rows, labels, strict=True)], cols=1), files["preview"]
    )
    n = len(rows)
    save_gif(np.stack([_with_progress_bar(r, i, n) for i, r in enumerate(rows)]), files["gif"], fps=fps)
    trace.save(files["trace"])


def _uint8_frames(clip: Any) -> np.ndarray:
    """A video pipeline's clip — frames (N, H, W, 3) floats in [0, 1] (``output_type="np"``), a uint8 array, or a
    list of PIL images — as (N, H, W, 3) uint8."""
    import numpy as np

    if isinstance(clip, (list, tuple)):
        return np.stack([np.asarray(f.convert("RGB")) for f in clip])
    a = np.asarray(clip)
    if a.dtype == np.uint8:
        return a
    return (a.astype(np.float32).clip(0.0, 1.0) * 255.0).round().astype(np.uint8)


def decode_x0(pipe: Any, trace: Any, *, progress: bool = True) -> list[np.ndarray]:
    """VAE-decode the x0 of every recorded step (image 0) after the run → (H, W, 3) uint8 each.

    Decoding after the run keeps the denoising loop as fast as a plain call. A float16 VAE whose config asks
    for ``force_upcast`` (SDXL's, which overflows in float16) decodes in float32, as the pipelines do, and
    is put back afterwards.
    """
    from ..views.render import decode_steps

    return decode_steps(pipe.vae, trace, progress=progress)
