"""``sdexplore walk``: walk between prompts and/or seeds into a GIF or MP4, with its smoothness report."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .output import InputError, _one_line

if TYPE_CHECKING:  # numpy, torch and diffusers load when a command runs: `--help` and bad input stay fast
    pass
from . import _common
from ._common import (
    MAX_FPS,
    MAX_FRAMES,
    _call_kwargs,
    _check_directions,
    _check_fps,
    _check_image_options,
    _check_model,
    _check_size,
    _common_options,
    _directions_option,
    _generation_options,
    _html_option,
    _image_notes,
    _number,
    _output_options,
    _prompt,
    _seed,
    _start_output,
    _start_page,
    _steered,
    _whole,
    _wrote,
)

_WALK_EPILOG = """\
Keyframe i is (PROMPT i, seed i); one prompt or one seed is shared by every keyframe. A walk needs two
keyframes at least: two prompts, two seeds, or both. Each keyframe lands exactly on a frame: the
`sdexplore steps` image of that prompt and seed.

With --html PAGE the walk is also written as one self-contained page (play, scrub, the distance between
consecutive frames; the keyframes' prompts and seeds): no network, it opens from file://.

examples:
  sdexplore walk "a big red circle on a white background" "a big blue circle on a white background"
  sdexplore walk "a red circle" "a blue square" --frames 12 --out walk.gif --html walk.html
  sdexplore walk "a small green square" --seeds 0 1 2 --frames 36 --circular --out loop.mp4
  sdexplore walk "a red circle" "a blue square" "a yellow triangle" --frames 30 --spacing ease --out tour.gif
  sdexplore walk "a big red circle at the left on a blue background" \
      "a small green square at the top on a white background" --image red.png green.png --frames 12

--image gives one picture per keyframe ("-" for a keyframe that is a prompt and a seed): each picture is
inverted with its keyframe's prompt (at --steps and --guidance; negative-prompt inversion above CFG 1) and
its keyframe frame reconstructs it.
"""


def add_parser(sub: Any) -> None:
    """Add ``walk`` to the ``sdexplore`` subparsers ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    w = sub.add_parser(
        "walk",
        parents=[
            _common_options(),
            _generation_options(),
            _output_options("sdexplore-walk.gif", "a .gif or .mp4 file"),
        ],
        help="walk between prompts and/or seeds and write a GIF or MP4; prints how smooth the walk is",
        description="Walk between keyframes (prompts, seeds or both), write the frames as a GIF or MP4 and "
        "print the smoothness report.",
        epilog=_WALK_EPILOG,
        formatter_class=fmt,
    )
    w.add_argument("prompts", nargs="+", metavar="PROMPT", help="one prompt per keyframe (or one for all)")
    w.add_argument(
        "--seeds",
        type=_seed,
        nargs="+",
        default=[0],
        metavar="S",
        help="one seed, or one per keyframe (default 0)",
    )
    w.add_argument(
        "--frames",
        type=_whole(2, MAX_FRAMES),
        default=16,
        metavar="N",
        help="frames in the walk (default 16)",
    )
    w.add_argument("--circular", action="store_true", help="return to the first keyframe: a seamless loop")
    w.add_argument(
        "--spacing", choices=("even", "ease"), default="even", help="ease: slow down near keyframes"
    )
    w.add_argument(
        "--fps", type=_number(0.0, MAX_FPS, above=True), default=12.0, help="frames per second (default 12)"
    )
    w.add_argument(
        "--batch-size",
        type=_whole(1, MAX_FRAMES),
        metavar="B",
        help="frames per pipeline call (default: what fits)",
    )
    w.add_argument(
        "--image",
        nargs="+",
        metavar="PICTURE",
        help='one picture per keyframe, "-" for none: image keyframes (see below)',
    )
    _html_option(w, "the walk (a player and a frame slider with the frame-to-frame distances)")
    _directions_option(w)
    w.set_defaults(run=_cmd_walk)


def _cmd_walk(args: argparse.Namespace) -> int:
    prompts = [_prompt(p) for p in args.prompts]
    _check_size(args)
    pictures = None if args.image is None else [None if p == "-" else p for p in args.image]
    n_keys = max(len(prompts), len(args.seeds), len(pictures or []))
    if n_keys < 2:
        raise InputError("a walk needs 2 keyframes at least: give 2+ prompts, 2+ --seeds, or both")
    if pictures is not None and len(pictures) != n_keys:
        raise InputError(
            f'{len(pictures)} --image for {n_keys} keyframes: give one per keyframe ("-" for a prompt keyframe)'
        )
    _check_image_options(args, pictures or [])
    for name, values in (("prompts", prompts), ("--seeds", args.seeds)):
        if len(values) not in (1, n_keys):
            raise InputError(f"{len(values)} {name} for {n_keys} keyframes: give one, or one per keyframe")
    from ..errors import InterpolationError
    from ..interpolate import keyframe_schedule

    try:  # every keyframe must land on a frame
        keyframe_schedule(n_keys, args.frames, spacing=args.spacing, loop=args.circular)
    except InterpolationError as e:
        raise InputError(f"{n_keys} keyframes, --frames {args.frames}: {_one_line(e)}") from e
    suffix = Path(args.out).suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise InputError(f"--out must end in .gif or .mp4, got {args.out!r}")
    _check_fps(args.fps, suffix, args.frames)
    _check_directions(args)
    output = _start_output(args, folder=False)
    page = _start_page(args)
    scheduler = _check_model(args, args.model, args.scheduler)

    from ..walks import walk

    with output, page or contextlib.nullcontext(), _image_notes():
        pipe = _common._load(args, args.model, scheduler)
        kwargs = _call_kwargs(args)
        with _steered(pipe, args):
            result = walk(
                pipe,
                prompts,
                seeds=args.seeds,
                images=pictures,
                frames=args.frames,
                batch_size=args.batch_size,
                negative_prompt=kwargs.pop("negative_prompt", None),
                num_inference_steps=kwargs.pop("num_inference_steps"),
                guidance_scale=kwargs.pop("guidance_scale", None),
                height=kwargs.pop("height", None),
                width=kwargs.pop("width", None),
                spacing=args.spacing,
                loop=args.circular,
                generator_device="cpu",  # as `steps` and `attention`: a seed gives the same image on every device
                progress=not args.no_progress,
            )
        if suffix == ".mp4":
            result.save_mp4(output.path, fps=args.fps)
        else:
            result.save_gif(output.path, fps=args.fps)
        if page is not None:
            from ..views.pages import save_walk

            save_walk(result, page.path, fps=min(args.fps, 60), model=args.model or "embedded")
        output.commit()
        if page is not None:
            page.commit()
    _wrote([output.shown] + ([page.shown] if page is not None else []))
    print(result.smoothness())
    return 0
