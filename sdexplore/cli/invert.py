"""``sdexplore invert``: turn a picture into the noise that regenerates it; the reconstruction and its PSNR."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy, torch and diffusers load when a command runs: `--help` and bad input stay fast
    pass
from . import _common
from ._common import (
    DEFAULT_STEPS,
    INVERT_ITERATIONS,
    MAX_GUIDANCE,
    MAX_SIDE,
    MAX_STEPS,
    _check_model,
    _check_picture,
    _check_size,
    _common_options,
    _invert,
    _number,
    _output_options,
    _prompt,
    _save_png,
    _start_output,
    _whole,
    _wrote,
)

_INVERT_EPILOG = """\
writes into --out (default sdexplore-invert/):
  image.png              the picture as inverted (resized to the model's size, with a note, if it was not)
  reconstruction.png     the picture regenerated from its inverted noise
  inversion.json         PSNR of the reconstruction and of the VAE's own round trip (the ceiling), the settings
  inversion.safetensors  latents, trace and images: sdexplore.Inversion.load("inversion.safetensors")

The default method is the model's own sampler run backwards (ddim for SD 1.x/2.x/XL, flow for SD3) at CFG 1,
and negative-prompt inversion when --guidance is above 1 (faithful under classifier-free guidance).

examples:
  sdexplore invert scene.png "a big red circle at the top left on a blue background"
  sdexplore invert photo.jpg "a cat on a sofa" --model stable-diffusion-v1-5/stable-diffusion-v1-5 --steps 50
  sdexplore invert scene.png "a big red circle at the top left on a blue background" --guidance 3 --out inv3
"""


def add_parser(sub: Any) -> None:
    """Add ``invert`` to the ``sdexplore`` subparsers ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    v = sub.add_parser(
        "invert",
        parents=[_common_options(), _output_options("sdexplore-invert", "output folder")],
        help="turn a picture into the noise that regenerates it: the inversion, its reconstruction, the PSNR",
        description="Invert a picture: find the starting noise from which the model regenerates it with the "
        "prompt; write the reconstruction, its PSNR and the inversion.",
        epilog=_INVERT_EPILOG,
        formatter_class=fmt,
    )
    v.add_argument("image", metavar="IMAGE", help="the picture: PNG, JPEG, WebP, ...")
    v.add_argument("prompt", metavar="PROMPT", help="what the picture shows, in quotes")
    g = v.add_argument_group("inversion")
    g.add_argument(
        "--steps",
        type=_whole(1, MAX_STEPS),
        default=DEFAULT_STEPS,
        metavar="N",
        help=f"steps (default {DEFAULT_STEPS})",
    )
    g.add_argument(
        "--method",
        choices=("ddim", "negative-prompt", "flow"),
        help="default: ddim (flow for SD3) at CFG 1, negative-prompt above",
    )
    g.add_argument(
        "--guidance",
        type=_number(0.0, MAX_GUIDANCE),
        default=1.0,
        metavar="G",
        help="the reconstruction's classifier-free guidance scale (default 1)",
    )
    g.add_argument(
        "--iterations",
        type=_whole(0, 100),
        default=INVERT_ITERATIONS,
        metavar="K",
        help=f"fixed-point passes per step (default {INVERT_ITERATIONS}; 0: plain DDIM inversion, faster)",
    )
    g.add_argument(
        "--height", type=_whole(8, MAX_SIDE), metavar="H", help="resize to this height (default: the model's)"
    )
    g.add_argument(
        "--width", type=_whole(8, MAX_SIDE), metavar="W", help="resize to this width (default: the model's)"
    )
    v.set_defaults(run=_cmd_invert)


def _cmd_invert(args: argparse.Namespace) -> int:
    prompt = _prompt(args.prompt)
    _check_size(args)
    _check_picture(args.image)
    output = _start_output(args, folder=True)
    _check_model(args, args.model)
    names = {
        "image": "image.png",
        "reconstruction": "reconstruction.png",
        "summary": "inversion.json",
        "inversion": "inversion.safetensors",
    }
    with output:
        pipe = _common._load(args, args.model)
        inv = _invert(pipe, args, guidance=args.guidance, method=args.method)
        output.path.mkdir(parents=True, exist_ok=True)
        _save_png(inv.image, output.path / names["image"])
        _save_png(inv.reconstruction, output.path / names["reconstruction"])
        summary = {
            "image": str(args.image),
            "prompt": prompt,
            "model": args.model or "embedded",
            "method": inv.method,
            "psnr_db": round(inv.psnr, 4),
            "vae_round_trip_psnr_db": round(inv.vae_psnr, 4),
            "gap_db": round(inv.vae_psnr - inv.psnr, 4),
            "height": int(inv.image.shape[0]),
            "width": int(inv.image.shape[1]),
            **inv.settings,
        }
        (output.path / names["summary"]).write_text(json.dumps(summary, indent=1) + "\n")
        inv.save(output.path / names["inversion"])
        output.commit()
    _wrote(output.shown / v for v in names.values())
    print(
        f"PSNR {inv.psnr:.2f} dB against the picture; the VAE's own round trip: {inv.vae_psnr:.2f} dB "
        f"(gap {inv.vae_psnr - inv.psnr:.2f} dB; {inv.method}, {args.steps} steps, CFG {args.guidance:g})"
    )
    return 0
