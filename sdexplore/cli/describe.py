"""``sdexplore describe``: the component tour of a model as a table or JSON."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from .output import InputError

if TYPE_CHECKING:  # numpy, torch and diffusers load when a command runs: `--help` and bad input stay fast
    pass
from . import _common
from ._common import (
    DEFAULT_STEPS,
    MAX_SIDE,
    MAX_STEPS,
    _check_model,
    _check_size,
    _common_options,
    _prompt,
    _whole,
)

_DESCRIBE_EPILOG = """\
examples:
  sdexplore describe
  sdexplore describe stable-diffusion-v1-5/stable-diffusion-v1-5 --steps 30
  sdexplore describe ./my-pipeline-folder --json
  sdexplore describe --prompt "a big red circle at the top left on a blue background"
"""


def add_parser(sub: Any) -> None:
    """Add ``describe`` to the ``sdexplore`` subparsers ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    d = sub.add_parser(
        "describe",
        parents=[_common_options(model_option=False)],
        help="the component tour of a model as a table (tokenizer, text encoder, UNet, VAE, scheduler)",
        description="Print the component tour of a model: each component's class, parameters, dtype, device "
        "and role; the latent arithmetic; the scheduler and its timesteps.",
        epilog=_DESCRIBE_EPILOG,
        formatter_class=fmt,
    )
    d.add_argument(
        "model", nargs="?", metavar="MODEL", help="hub id, folder or .safetensors (default: embedded model)"
    )
    d.add_argument("--model", dest="model_option", metavar="M", help="the same as MODEL")
    d.add_argument(
        "--steps",
        type=_whole(1, MAX_STEPS),
        default=DEFAULT_STEPS,
        metavar="N",
        help=f"inference steps whose timesteps to list (default {DEFAULT_STEPS})",
    )
    d.add_argument(
        "--height", type=_whole(8, MAX_SIDE), metavar="H", help="image height for the latent arithmetic"
    )
    d.add_argument(
        "--width", type=_whole(8, MAX_SIDE), metavar="W", help="image width for the latent arithmetic"
    )
    d.add_argument("--prompt", metavar="TEXT", help="also show how this prompt is tokenized")
    d.add_argument("--json", action="store_true", help="print the description as JSON")
    d.set_defaults(run=_cmd_describe)


def _cmd_describe(args: argparse.Namespace) -> int:
    if args.model is not None and args.model_option is not None:
        raise InputError("give the model once: as MODEL or as --model, not both")
    model = args.model if args.model is not None else args.model_option
    _check_size(args)
    if args.prompt is not None:
        _prompt(args.prompt)
    _check_model(args, model)
    from ..tour import describe

    pipe = _common._load(args, model)
    desc = describe(pipe, steps=args.steps, height=args.height, width=args.width)
    if args.json:
        data = desc.to_dict()
        data["model"] = model or "embedded"
        if args.prompt is not None:
            data["prompt_tokens"] = _prompt_tokens(pipe, args.prompt)
        print(json.dumps(data, indent=1))
        return 0
    print(f"Model: {model or 'embedded (sdexplore.load_pipeline())'}")
    print(desc)
    if args.prompt is not None:
        from ..text import inspect_prompt

        print(f"\nPrompt: {args.prompt!r}")
        print(inspect_prompt(pipe, args.prompt).table())
    return 0


def _prompt_tokens(pipe: Any, prompt: str) -> list[dict[str, Any]]:
    from ..text import inspect_prompt

    info = inspect_prompt(pipe, prompt)
    return [
        {"position": i, "kind": k, "id": t_id, "token": tok}
        for i, (tok, t_id, k) in enumerate(zip(info.tokens, info.ids, info.kinds, strict=True))
        if k != "pad"
    ]
