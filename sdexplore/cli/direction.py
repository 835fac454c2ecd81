"""``sdexplore direction``: find a semantic direction from prompt pairs and save it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .output import InputError, _one_line

if TYPE_CHECKING:  # numpy, torch and diffusers load when a command runs: `--help` and bad input stay fast
    pass
from . import _common
from ._common import (
    DEFAULT_STEPS,
    MAX_GUIDANCE,
    MAX_SIDE,
    MAX_STEPS,
    _call_kwargs,
    _check_model,
    _check_size,
    _common_options,
    _model_key,
    _number,
    _output_options,
    _prompt,
    _seed,
    _start_output,
    _whole,
    _wrote,
)

_DIRECTION_EPILOG = """\
writes --out (default sdexplore-direction.safetensors): the direction, a checksummed result file, applied with
  sdexplore steps|attention|walk ... --direction FILE[:STRENGTH]   or in Python sdexplore.directions.load(FILE)

A direction fits only the model it was found with (the file records its family and the --model); an inner
direction also only the image size it was found at.

examples:
  sdexplore direction "a big red circle at the left" "a big blue circle at the left" --out red-to-blue.safetensors
  sdexplore direction "a red square" "a blue square" --pair "a red circle" "a blue circle" --out colour.safetensors
  sdexplore direction "a small circle" "a big circle" --space inner --seeds 0 1 2 --out size.safetensors
  sdexplore steps "a red square at the top" --direction red-to-blue.safetensors:1.5 --out blue
"""


def add_parser(sub: Any) -> None:
    """Add ``direction`` to the ``sdexplore`` subparsers ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    r = sub.add_parser(
        "direction",
        parents=[
            _common_options(),
            _output_options("sdexplore-direction.safetensors", "the direction file, .safetensors"),
        ],
        help="find a semantic direction from prompt pairs and save it, for --direction or "
        "sdexplore.directions.load",
        description="Find a semantic direction from prompt pairs (the mean of second - first, on the prompt "
        "embedding or inside the denoiser) and save it as a checksummed result file.",
        epilog=_DIRECTION_EPILOG,
        formatter_class=fmt,
    )
    r.add_argument("first", metavar="FROM", help="the first prompt of a pair, in quotes")
    r.add_argument("second", metavar="TO", help="the second prompt: the direction moves FROM onto TO")
    r.add_argument(
        "--pair",
        nargs=2,
        action="append",
        metavar=("FROM", "TO"),
        help="another pair of prompts (repeat): the direction is the mean over all pairs",
    )
    r.add_argument(
        "--space",
        choices=("text", "inner"),
        default="text",
        help="text: a shift of the prompt embedding (no generation, default); inner: a shift of the denoiser's "
        "image stream at one attention layer (generates every prompt from every seed)",
    )
    r.add_argument("--label", metavar="NAME", help="a name for the direction (e.g. colour)")
    g = r.add_argument_group("inner space only")
    g.add_argument(
        "--layer", metavar="NAME", help="the attention module to shift (default: the family's own)"
    )
    g.add_argument(
        "--seeds", type=_seed, nargs="+", metavar="S", help="seeds of the finding runs (default 0 1)"
    )
    g.add_argument(
        "--steps",
        type=_whole(1, MAX_STEPS),
        metavar="N",
        help=f"denoising steps of the finding runs (default {DEFAULT_STEPS})",
    )
    g.add_argument(
        "--guidance",
        type=_number(0.0, MAX_GUIDANCE),
        metavar="G",
        help="classifier-free guidance scale of the finding runs (default: as `sdexplore steps`)",
    )
    g.add_argument(
        "--height", type=_whole(8, MAX_SIDE), metavar="H", help="image height (the direction fits it)"
    )
    g.add_argument(
        "--width", type=_whole(8, MAX_SIDE), metavar="W", help="image width (the direction fits it)"
    )
    r.set_defaults(run=_cmd_direction)


def _cmd_direction(args: argparse.Namespace) -> int:
    pairs = [(args.first, args.second), *[tuple(pr) for pr in args.pair or []]]
    for a, b in pairs:
        _prompt(a)
        _prompt(b)
    if args.label is not None and not args.label.strip():
        raise InputError("--label is empty: give the direction a name, or leave --label out")
    if args.space == "text":
        for name in ("layer", "seeds", "steps", "guidance", "height", "width"):
            if getattr(args, name) is not None:
                raise InputError(
                    f"--{name} is for --space inner (a text direction needs no generation); leave it out or "
                    "add --space inner"
                )
    _check_size(args)
    if Path(args.out).suffix.lower() != ".safetensors":
        raise InputError(f"--out must end in .safetensors (a direction is one result file), got {args.out!r}")
    from ..directions.find import check_pairs
    from ..errors import InvalidArgumentError

    try:
        check_pairs(pairs)
    except InvalidArgumentError as e:
        raise InputError(_one_line(e)) from e
    output = _start_output(args, folder=False)
    _check_model(args, args.model)
    from ..directions import from_pairs

    with output:
        pipe = _common._load(args, args.model)
        options: dict[str, Any] = {"label": args.label}
        if args.space == "inner":
            call = _call_kwargs(
                argparse.Namespace(
                    steps=args.steps or DEFAULT_STEPS,
                    guidance=args.guidance,
                    model=args.model,
                    height=args.height,
                    width=args.width,
                    negative=None,
                )
            )
            options.update(
                layer=args.layer,
                num_inference_steps=call["num_inference_steps"],
                guidance_scale=call.get("guidance_scale"),
                height=call.get("height"),
                width=call.get("width"),
            )
            if args.seeds is not None:
                options["seeds"] = args.seeds
        try:
            d = from_pairs(pipe, pairs, args.space, **options)
        except InvalidArgumentError as e:  # what only the loaded model decides (its family, the layer)
            raise InputError(_one_line(e)) from e
        d.settings.update(model=_model_key(args.model), command="sdexplore direction")
        d.save(output.path)
        output.commit()
    _wrote([output.shown])
    print(f"{d!r}, norm {d.norm:.4g}")
    return 0
