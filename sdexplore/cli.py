"""The ``sdexplore`` command: describe a model, record steps, attention maps and walks headless, into files."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ._checks import MAX_SEED
from ._signals import sigterm_as_interrupt
from .cli_output import (  # noqa: F401 - InputError and OutputBusyError are part of the CLI's surface
    PROG,
    InputError,
    OutputBusyError,
    _lock_path,
    _note,
    _one_line,
    _Output,
    _side_name,
)

if TYPE_CHECKING:  # numpy, torch and diffusers load when a command runs: `--help` and bad input stay fast
    import numpy as np

#: Short scheduler names the command accepts besides any diffusers scheduler class name.
SCHEDULER_ALIASES: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "kdpm2": "KDPM2DiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
DEFAULT_STEPS = 25  # denoising steps of every command unless --steps says otherwise
TILE = 128  # longer side of one step's tile in the strips and the attention grid, in pixels
HEAT_MIN_SIDE = (
    256  # shorter side of a word's heat-map PNG at least this (a 64x64 image is upscaled, nearest)
)
#: sdexplore.inversion.DEFAULT_ITERATIONS, written out: importing sdexplore.inversion loads torch, and the parser
#: (`--help`, bad input) must not (a test checks the two agree).
INVERT_ITERATIONS = 2


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors become one line (``sdexplore: error: ...``), not usage plus a message."""

    def error(self, message: str) -> NoReturn:
        raise InputError(f"{message} (see `{self.prog} --help`)")


# ---------------------------------------------------------------- argument parsing

_MAIN_EPILOG = """\
examples:
  sdexplore describe
  sdexplore steps "a big red circle at the top left on a blue background" --out run1
  sdexplore attention "a big red circle at the top left on a blue background" --words circle blue --out att
  sdexplore walk "a red circle" "a blue square" --seeds 0 1 --frames 24 --out walk.gif
  sdexplore invert photo.png "a big red circle at the top left on a blue background" --out inv
  sdexplore edit "a big red circle at the top left on a blue background" \
      "a big green circle at the top left on a blue background" --out edit
  sdexplore attention "a big red circle at the top left on a blue background" --image photo.png --out att
  sdexplore direction "a red circle" "a blue circle" --out red-to-blue.safetensors
  sdexplore steps "a red square at the top" --direction red-to-blue.safetensors:1.0 --out blue
  sdexplore steps "an astronaut riding a horse" --model stable-diffusion-v1-5/stable-diffusion-v1-5 --steps 30

Without --model every command uses the embedded tiny model (offline, CPU, seconds).
`sdexplore COMMAND --help` lists each command's options.
"""

_DESCRIBE_EPILOG = """\
examples:
  sdexplore describe
  sdexplore describe stable-diffusion-v1-5/stable-diffusion-v1-5 --steps 30
  sdexplore describe ./my-pipeline-folder --json
  sdexplore describe --prompt "a big red circle at the top left on a blue background"
"""

_STEPS_EPILOG = """\
writes into --out (default sdexplore-steps/):
  image.png           the final image
  steps_x0.png        the predicted clean image (x0, VAE-decoded) at every step, labelled step and timestep
  steps_preview.png   the cheap latent->RGB preview of x0 at every step (learned, or linear)
  denoising.gif       one frame per step (x0; a bar at the bottom shows the progress through the run)
  trace.safetensors   the recorded trace: sdexplore.trace.Trace.load("trace.safetensors")

With --image PICTURE the steps are those of the picture's reconstruction: the picture is inverted with the
prompt (sdexplore invert) and regenerated from its inverted noise under observation (image.png is the
reconstruction; --seed is not used).

examples:
  sdexplore steps "a big red circle at the top left on a blue background"
  sdexplore steps "a big red circle at the top left on a blue background" --image scene.png --out mine
  sdexplore steps "a small green triangle" --steps 50 --scheduler euler --seed 3 --out tri
  sdexplore steps "a castle" --model stable-diffusion-v1-5/stable-diffusion-v1-5 --preview linear --out castle
"""

_ATTENTION_EPILOG = """\
writes into --out (default sdexplore-attention/):
  image.png                the generated image
  attention_WORD.png       the word's heat map over the image (aggregated over steps and layers), one per word
  attention_grid.png       rows = groups of steps (early -> late), columns = words
  attention.safetensors    the maps: sdexplore.attention.AttentionMaps.load("attention.safetensors")

Each heat map is min-max normalised on its own (it shows where a word attends, not how strongly).
With --image PICTURE the maps are those of the picture's reconstruction (the picture inverted with the prompt,
then regenerated from its inverted noise under observation): attention on your own picture.

examples:
  sdexplore attention "a big red circle at the top left on a blue background"
  sdexplore attention "a big red circle at the top left on a blue background" --words circle "blue background" --out att
"""

_WALK_EPILOG = """\
Keyframe i is (PROMPT i, seed i); one prompt or one seed is shared by every keyframe. A walk needs two
keyframes at least: two prompts, two seeds, or both. Each keyframe lands exactly on a frame: the
`sdexplore steps` image of that prompt and seed.

examples:
  sdexplore walk "a big red circle on a white background" "a big blue circle on a white background"
  sdexplore walk "a small green square" --seeds 0 1 2 --frames 36 --circular --out loop.mp4
  sdexplore walk "a red circle" "a blue square" "a yellow triangle" --frames 30 --spacing ease --out tour.gif
  sdexplore walk "a big red circle at the left on a blue background" \
      "a small green square at the top on a white background" --image red.png green.png --frames 12

--image gives one picture per keyframe ("-" for a keyframe that is a prompt and a seed): each picture is
inverted with its keyframe's prompt (at --steps and --guidance; negative-prompt inversion above CFG 1) and
its keyframe frame reconstructs it.
"""

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

_EDIT_EPILOG = """\
writes into --out (default sdexplore-edit/):
  source.png                    the image of SOURCE
  edited.png                    its edit, from the same starting noise in the same batched call
  difference.png                |edited - source| per channel (black: unchanged)
  attention_WORD_before.png     for each word the edit changed: the source's map at that word's place,
  attention_WORD_after.png        and the edited image's map of the word (one colour scale for the pair)
  edit.safetensors              both images and both runs' maps: sdexplore.Edit.load("edit.safetensors")

TARGET (a word swap, Prompt-to-Prompt's replace) must tokenize word for word like SOURCE: the edited image
keeps the source's cross-attention for the first --cross-replace of the steps and its self-attention for the
first --self-replace. --reweight WORD=FACTOR scales a word's attention in the edited image (0 ablates it);
words are looked up in TARGET, or in SOURCE without one.

--image PICTURE edits your own picture; SOURCE describes it. By default (--method inversion) the picture is
inverted first (null-text inversion on SD 1.x/2.x/XL, the flow ODE at guidance 1 on SD3 and Flux) and both
branches start from its latents, so source.png is its reconstruction. --method flowedit (SD3, Flux.1, Flux.2)
edits it inversion-free (FlowEdit, Kulikov et al. 2025): source.png is the picture's VAE round trip, and no
maps are kept.

examples:
  sdexplore edit "a big red circle at the top left on a blue background" \
      "a big green circle at the top left on a blue background"
  sdexplore edit "a big red circle at the top left on a blue background" --reweight red=2 --out louder
  sdexplore edit "a big red circle at the top left on a blue background" --reweight circle=0 --out ablate
  sdexplore edit "a big red circle at the top left on a blue background" \
      "a big blue circle at the top left on a blue background" --image scene.png --out mine
"""


MAX_STEPS = 1000  # diffusers' SD schedulers have 1000 training timesteps; more inference steps fail
MAX_SIDE = 8192  # --height / --width, pixels
MAX_FRAMES = 10_000  # frames of one walk
MAX_GUIDANCE = 100.0  # classifier-free guidance scale (SD uses 1..20; beyond 100 images are saturated noise)
MAX_FPS = 240.0
MAX_GIF_FPS = 50.0  # GIF frame times are 1/100 s; most viewers slow anything under 2/100 s to 1/10 s


def _whole(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high] (a clear one-line error otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, got {text!r}")
        return value

    return parse


def _number(low: float, high: float, *, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] (``above``: (low, high]); nan and ±inf are refused."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        ok = math.isfinite(value) and (low < value if above else low <= value) and value <= high
        if not ok:
            lower = f"above {low:g}" if above else f"from {low:g}"
            raise argparse.ArgumentTypeError(f"must be a finite number {lower} to {high:g}, got {text!r}")
        return value

    return parse


def _reweight(text: str) -> tuple[str, float]:
    """An argparse type: ``WORD=FACTOR`` with a finite FACTOR >= 0 (the last ``=`` splits: a word may hold one)."""
    word, eq, factor = text.rpartition("=")
    try:
        value = float(factor) if eq else math.nan
    except ValueError:
        value = math.nan
    if not word.strip() or not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(
            f"expected WORD=FACTOR with a word of the prompt and a finite factor >= 0 (0 ablates), got {text!r}"
        )
    return word.strip(), value


def _direction_option(text: str) -> tuple[str, float]:
    """An argparse type: ``PATH[:STRENGTH]`` (strength default 1.0, finite). The last ``:`` splits only when what
    follows it is a number, so a path may hold a colon."""
    path, colon, tail = text.rpartition(":")
    if colon:
        try:
            strength = float(tail)
        except ValueError:
            strength = None
        if strength is not None:
            if not math.isfinite(strength) or not path.strip():
                raise argparse.ArgumentTypeError(
                    f"expected PATH[:STRENGTH] with a finite strength (1: the direction's own size, 0: the plain "
                    f"image, -1: the opposite way), got {text!r}"
                )
            return path, strength
    if not text.strip():
        raise argparse.ArgumentTypeError("expected PATH[:STRENGTH], got an empty path")
    return text, 1.0


def _seed(text: str) -> int:
    """An argparse type: a seed, a whole number with 0 <= seed < 2**64 (what torch.Generator.manual_seed takes)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"a seed is a whole number from 0 to 2**64 - 1, got {text!r}")
    return value


def _common(model_option: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model and machine")
    if model_option:
        g.add_argument(
            "--model",
            metavar="M",
            help="hub id, local diffusers folder or .safetensors file (default: the embedded tiny model)",
        )
    g.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    g.add_argument(
        "--dtype",
        default="auto",
        help="auto (float16 on a GPU, float32 on the CPU), float32, float16, bfloat16",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    g.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    return p


def _generation() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("generation")
    g.add_argument(
        "--steps",
        type=_whole(1, MAX_STEPS),
        default=DEFAULT_STEPS,
        metavar="N",
        help=f"denoising steps (default {DEFAULT_STEPS})",
    )
    g.add_argument(
        "--scheduler",
        metavar="NAME",
        help=f"{', '.join(SCHEDULER_ALIASES)}, or a diffusers class name such as EulerDiscreteScheduler "
        "(default: the model's own)",
    )
    g.add_argument(
        "--guidance",
        type=_number(0.0, MAX_GUIDANCE),
        metavar="G",
        help="classifier-free guidance scale (default: the pipeline's; for the embedded model its recommended scale)",
    )
    g.add_argument(
        "--height",
        type=_whole(8, MAX_SIDE),
        metavar="H",
        help="image height in pixels, a multiple of 8 (default: the model's)",
    )
    g.add_argument(
        "--width",
        type=_whole(8, MAX_SIDE),
        metavar="W",
        help="image width in pixels, a multiple of 8 (default: the model's)",
    )
    g.add_argument("--negative", metavar="TEXT", help="negative prompt")
    return p


def _output(default: str, what: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=default, metavar="PATH", help=f"{what} (default {default})")
    g.add_argument(
        "--force", action="store_true", help="replace an existing output as a whole (no stale files remain)"
    )
    return p


def _directions_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--direction",
        type=_direction_option,
        action="append",
        metavar="PATH[:S]",
        help="apply a saved direction (made by `sdexplore direction`) at strength S (default 1; 0: the plain "
        "image, negative: the opposite way); repeat to apply several at once",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``sdexplore`` argument parser with its four commands."""
    from . import __version__

    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        description="Look inside Stable Diffusion from the command line: every denoising step, attention "
        "per word, walks between prompts.",
        epilog=_MAIN_EPILOG,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")

    d = sub.add_parser(
        "describe",
        parents=[_common(model_option=False)],
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

    s = sub.add_parser(
        "steps",
        parents=[_common(), _generation(), _output("sdexplore-steps", "output folder")],
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
        default="decode",
        help="decode: VAE-decode x0 at every step (GIF and x0 strip); linear: only the free linear preview",
    )
    s.add_argument(
        "--fps",
        type=_number(0.0, MAX_GIF_FPS, above=True),
        default=8.0,
        help="GIF frames per second (default 8)",
    )
    s.add_argument("--image", metavar="PICTURE", help="record the reconstruction of this picture (see below)")
    _directions_option(s)
    s.set_defaults(run=_cmd_steps)

    a = sub.add_parser(
        "attention",
        parents=[_common(), _generation(), _output("sdexplore-attention", "output folder")],
        help="generate one image and write attention heat maps per word (cross-attention; joint attention on "
        "SD3/Flux), a step x word grid, the maps",
        description="Generate one image and record its attention maps (UNet cross-attention, SD3/Flux joint attention): an overlay per word, a step x "
        "word grid, and the saved maps.",
        epilog=_ATTENTION_EPILOG,
        formatter_class=fmt,
    )
    a.add_argument("prompt", metavar="PROMPT", help="what to generate, in quotes (put it before --words)")
    a.add_argument(
        "--words", nargs="+", metavar="WORD", help="words of the prompt to show (default: every word)"
    )
    a.add_argument(
        "--seed", type=_seed, default=0, metavar="S", help="random seed, 0 to 2**64 - 1 (default 0)"
    )
    a.add_argument(
        "--rows",
        type=_whole(1, MAX_STEPS),
        default=6,
        metavar="R",
        help="step groups in the grid (default 6)",
    )
    a.add_argument("--image", metavar="PICTURE", help="map the reconstruction of this picture (see below)")
    _directions_option(a)
    a.set_defaults(run=_cmd_attention)

    w = sub.add_parser(
        "walk",
        parents=[_common(), _generation(), _output("sdexplore-walk.gif", "a .gif or .mp4 file")],
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
    _directions_option(w)
    w.set_defaults(run=_cmd_walk)

    r = sub.add_parser(
        "direction",
        parents=[_common(), _output("sdexplore-direction.safetensors", "the direction file, .safetensors")],
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

    v = sub.add_parser(
        "invert",
        parents=[_common(), _output("sdexplore-invert", "output folder")],
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

    e = sub.add_parser(
        "edit",
        parents=[_common(), _generation(), _output("sdexplore-edit", "output folder")],
        help="edit an image by its attention: swap a word (same layout, new word), reweight or ablate a word; "
        "writes both images, their difference, the maps before and after",
        description="Generate SOURCE and its attention edit from the same starting noise (a word swap to TARGET "
        "and/or reweighted words): both images, their difference, the changed words' maps before and after, "
        "and the saved edit.",
        epilog=_EDIT_EPILOG,
        formatter_class=fmt,
    )
    e.add_argument("source", metavar="SOURCE", help="the prompt of the source image, in quotes")
    e.add_argument(
        "target", nargs="?", metavar="TARGET", help="the edited prompt: SOURCE with words swapped one for one"
    )
    e.add_argument(
        "--reweight",
        type=_reweight,
        nargs="+",
        metavar="WORD=FACTOR",
        help="scale a word's attention in the edited image by FACTOR >= 0 (0 ablates it); put it after the prompts",
    )
    e.add_argument(
        "--cross-replace",
        type=_number(0.0, 1.0),
        default=0.8,
        metavar="F",
        help="fraction of the steps that keep the source's cross-attention (word swap; default 0.8)",
    )
    e.add_argument(
        "--self-replace",
        type=_number(0.0, 1.0),
        default=0.4,
        metavar="F",
        help="fraction of the steps that keep the source's self-attention (word swap; default 0.4)",
    )
    e.add_argument(
        "--image",
        metavar="PICTURE",
        help="edit this picture (SOURCE describes it) instead of a generated one",
    )
    e.add_argument(
        "--method",
        choices=("inversion", "flowedit"),
        default=None,
        help="with --image: invert then edit (default), or FlowEdit's inversion-free edit (SD3, Flux)",
    )
    e.add_argument(
        "--seed", type=_seed, default=0, metavar="S", help="random seed, 0 to 2**64 - 1 (default 0)"
    )
    e.set_defaults(run=_cmd_edit)
    from .sweeps.cli import add_parsers as add_sweep_parsers  # sweep, sweep-report: in sdexplore.sweeps

    add_sweep_parsers(sub, common=_common(), generation=_generation(), seed=_seed, whole=_whole)
    return parser


# ---------------------------------------------------------------- checks before the expensive work


def _prompt(text: str) -> str:
    if not text.strip():
        raise InputError(
            'the prompt is empty: pass some text, e.g. "a big red circle at the top left on a blue background"'
        )
    return text


def _check_size(args: argparse.Namespace) -> None:
    for name in ("height", "width"):
        v = getattr(args, name, None)
        if v is not None and v % 8:
            raise InputError(
                f"--{name} must be a positive multiple of 8 (the VAE works in 8x8 blocks), got {v}"
            )


def _check_fps(fps: float, suffix: str, frames: int) -> None:
    """--fps against what the encoder takes (sdexplore.export.check_fps), for ``frames`` frames, before the work."""
    if suffix == ".gif" and fps > MAX_GIF_FPS:
        raise InputError(
            f"--fps {fps:g} is too fast for a GIF (it stores frame times in 1/100 s, and most viewers slow frames "
            f"shorter than 1/{MAX_GIF_FPS:g} s down to 1/10 s): use at most {MAX_GIF_FPS:g}, or write an .mp4"
        )
    from .errors import InvalidArgumentError
    from .export import check_fps

    try:  # the worst case: every frame alike, merged by the GIF writer into one long frame
        check_fps(fps, gif=suffix == ".gif", frames=frames)
    except InvalidArgumentError as e:
        raise InputError(f"--fps {fps:g}: {_one_line(e)}") from e


def resolve_scheduler(name: str | None) -> str | None:
    """A scheduler alias (``euler``, ``dpm++``...) or diffusers class name → the class name; unknown → InputError."""
    if name is None:
        return None
    if name.lower() in SCHEDULER_ALIASES:
        return SCHEDULER_ALIASES[name.lower()]
    import diffusers

    if name.endswith("Scheduler") and hasattr(diffusers, name):
        return name
    known = ", ".join(SCHEDULER_ALIASES)
    raise InputError(
        f"unknown scheduler {name!r}: use one of {known}, or a diffusers scheduler class name such as "
        "EulerDiscreteScheduler"
    )


def _check_model_source(model: str | None) -> None:
    """A local --model that is missing or not loadable is refused here; a hub id must at least be well formed."""
    if model is None:
        return
    from .loading import MOVED_MODEL_IDS, _looks_like_path

    if not model.strip():
        raise InputError(
            "--model is empty: leave it out for the embedded model, or pass a hub id, folder or file"
        )
    path = Path(model).expanduser()
    try:
        exists = path.exists()
    except (OSError, ValueError):
        exists = False
    if exists:
        if path.is_dir() and not (path / "model_index.json").is_file():
            raise InputError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); pass a folder saved with "
                "pipe.save_pretrained(...), a .safetensors file or a hub id"
            )
        if not path.is_dir() and path.suffix.lower() != ".safetensors":
            raise InputError(
                f"{path} is not a .safetensors checkpoint; convert a pickle checkpoint (.ckpt, .bin, .pt) to "
                ".safetensors, or pass a diffusers folder or a hub id"
            )
        return
    if _looks_like_path(model):
        raise InputError(
            f"No such file or folder: {path}. Check the path, or pass a hub id like "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5'"
        )
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(MOVED_MODEL_IDS.get(model, model))
    except HFValidationError as e:
        raise InputError(
            f"--model {model!r} is no file or folder here and not a hub id ('org/name'): {_one_line(e)}"
        ) from e


def _check_model(args: argparse.Namespace, model: str | None, scheduler: str | None = None) -> str | None:
    """Device, dtype, the model's path and the scheduler's fit to the model, without loading anything.

    Returns the scheduler's diffusers class name (``None``: the model's own).
    """
    from .errors import SdexploreError
    from .loading import check_scheduler_name, pick_device, pick_dtype

    try:
        pick_dtype(args.dtype, pick_device(args.device))
    except (
        SdexploreError,
        RuntimeError,
        ValueError,
        TypeError,
    ) as e:  # torch.device("x") raises RuntimeError
        raise InputError(f"--device {args.device} --dtype {args.dtype}: {_one_line(e)}") from e
    _check_model_source(model)
    name = resolve_scheduler(scheduler)
    if name is None:
        return None
    try:  # against the model's scheduler_config.json: FlowMatchEuler cannot drive a DDPM-type UNet
        return check_scheduler_name(name, model)
    except (SdexploreError, ValueError) as e:
        raise InputError(f"--scheduler {scheduler}: {_one_line(e)}") from e


def _tokenizer_before_loading(model: str | None) -> Any:
    """The model's tokenizer read alone from its folder (embedded model or a local folder), or None."""
    from .loading import EMBEDDED_MODEL_DIR, embedded_model_available

    if model is None:
        folder = EMBEDDED_MODEL_DIR if embedded_model_available() else None
    else:
        folder = Path(model).expanduser()
    if folder is None or not (folder / "tokenizer").is_dir():
        return None
    try:
        import transformers

        cls_name = json.loads((folder / "model_index.json").read_text())["tokenizer"][1]
        return getattr(transformers, cls_name).from_pretrained(folder / "tokenizer")
    except Exception:  # noqa: BLE001 - anything odd here is reported by the model load itself
        return None


def _start_output(args: argparse.Namespace, *, folder: bool) -> _Output:
    """The command's output transaction, checked (write probe, what exists); kept on ``args`` for Ctrl-C's note."""
    output = _Output(args.out, folder=folder, force=args.force)
    output.check()
    args.output = output
    return output


@contextlib.contextmanager
def _quiet_libraries(debug: bool) -> Iterator[None]:
    """Hide diffusers' and transformers' informational chatter (not our own notes) unless --debug."""
    if debug:
        yield
        return
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)  # their root loggers are set up on first use
    levels = [lib.get_verbosity() for lib in libraries]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for lib in libraries:
            lib.set_verbosity(logging.ERROR)
        try:
            yield
        finally:
            for lib, level in zip(libraries, levels, strict=True):
                lib.set_verbosity(level)


def _load(args: argparse.Namespace, model: str | None, scheduler: str | None = None) -> Any:
    from .errors import InvalidArgumentError
    from .loading import embedded_model_available, load_pipeline

    if model is None and not embedded_model_available():
        _note(
            "the embedded model is not installed; using a tiny random-weight stand-in (its images are noise)"
        )
    try:
        pipe = load_pipeline(
            model,
            device=args.device,
            dtype=args.dtype,
            scheduler=scheduler,
            progress_bar=not args.no_progress,
        )
    except InvalidArgumentError as e:  # a scheduler that a hub model, checked once loaded, cannot use
        raise InputError(_one_line(e)) from e
    _check_for_model(args, pipe)
    return pipe


def _check_for_model(args: argparse.Namespace, pipe: Any) -> None:
    """What only the loaded model decides, checked before generating: SD3 and Flux work in 2x2 patches of
    latents (sizes in multiples of 16, which FluxPipeline would otherwise round down silently), and Flux.1 has
    no CFG batch (FluxPipeline ignores a negative prompt without true CFG)."""
    from ._checks import check_size_limit
    from .families import detect_family, size_unit, vae_scale_factor

    fam = detect_family(pipe)
    unit = size_unit(pipe)
    patch = unit // vae_scale_factor(pipe)
    for name in ("height", "width"):
        v = getattr(args, name, None)
        if v is not None and v % unit:
            raise InputError(
                f"--{name} must be a multiple of {unit} for {fam.label} (its transformer works in {patch}x{patch} "
                f"patches of the VAE's {vae_scale_factor(pipe)}x{vae_scale_factor(pipe)} blocks), got {v}"
            )
    check_size_limit(pipe, getattr(args, "height", None), getattr(args, "width", None), error=InputError)
    if getattr(args, "negative", None) is not None and not fam.cfg_batch:
        raise InputError(
            f"--negative is not used by {fam.label}: it has no CFG batch (its guidance is distilled into the "
            "model), so the pipeline would ignore the negative prompt; leave --negative out"
        )


def _call_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_inference_steps": args.steps}
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    elif args.model is None:  # the embedded model: its own scale, not diffusers' 7.5
        from .loading import EMBEDDED_GUIDANCE_SCALE

        kwargs["guidance_scale"] = EMBEDDED_GUIDANCE_SCALE
    if args.height is not None:
        kwargs["height"] = args.height
    if args.width is not None:
        kwargs["width"] = args.width
    if args.negative is not None:
        kwargs["negative_prompt"] = args.negative
    return kwargs


def _wrote(paths: Iterable[Path]) -> None:
    for p in paths:
        print(f"wrote {p}")


# ---------------------------------------------------------------- image helpers


def _fit(image: np.ndarray, longest: int, nearest: bool = False) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image so its longer side is ``longest`` pixels (aspect ratio kept)."""
    import numpy as np
    from PIL import Image

    h, w = image.shape[:2]
    scale = longest / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(image).resize(size, resample))


def _label(image: np.ndarray, text: str) -> np.ndarray:
    """Write ``text`` in the top-left corner of a copy of ``image`` (white on a black box)."""
    import numpy as np
    from PIL import Image, ImageDraw

    im = Image.fromarray(image)
    draw = ImageDraw.Draw(im)
    box = draw.textbbox((2, 1), text)
    draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 1, box[3] + 1), fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255))
    return np.asarray(im)


def _strip(
    images: Sequence[np.ndarray], labels: Sequence[str], *, nearest: bool, cols: int = 10
) -> np.ndarray:
    """Tiles of ``images`` (each (H, W, 3) uint8) labelled and laid out row by row, ``cols`` per row."""
    from .export import image_grid

    tiles = [_label(_fit(im, TILE, nearest), lab) for im, lab in zip(images, labels, strict=True)]
    return image_grid(tiles, cols=min(cols, len(tiles)))


def _with_progress_bar(frame: np.ndarray, i: int, n: int) -> np.ndarray:
    """A copy of ``frame`` (H, W, 3) with a bar at the bottom filled to (i + 1) / n: where the run is."""
    out = frame.copy()
    h, w = out.shape[:2]
    bar = max(2, h // 32)
    out[h - bar :] = 0
    out[h - bar :, : max(1, round(w * (i + 1) / n))] = 255
    return out


def _save_png(image: np.ndarray, path: Path) -> None:
    """Write an (H, W, 3) uint8 image as PNG, with light compression: grids save ~3x faster for ~15% more bytes."""
    from PIL import Image

    Image.fromarray(image).save(path, compress_level=1)


def _slug(word: str, taken: set[str]) -> str:
    base = re.sub(r"[^0-9A-Za-z_-]+", "_", word).strip("_") or "word"
    name, k = base, 2
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


# ---------------------------------------------------------------- commands


def _cmd_describe(args: argparse.Namespace) -> int:
    if args.model is not None and args.model_option is not None:
        raise InputError("give the model once: as MODEL or as --model, not both")
    model = args.model if args.model is not None else args.model_option
    _check_size(args)
    if args.prompt is not None:
        _prompt(args.prompt)
    _check_model(args, model)
    from .tour import describe

    pipe = _load(args, model)
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
        from .text import inspect_prompt

        print(f"\nPrompt: {args.prompt!r}")
        print(inspect_prompt(pipe, args.prompt).table())
    return 0


def _prompt_tokens(pipe: Any, prompt: str) -> list[dict[str, Any]]:
    from .text import inspect_prompt

    info = inspect_prompt(pipe, prompt)
    return [
        {"position": i, "kind": k, "id": t_id, "token": tok}
        for i, (tok, t_id, k) in enumerate(zip(info.tokens, info.ids, info.kinds, strict=True))
        if k != "pad"
    ]


def _cmd_steps(args: argparse.Namespace) -> int:
    _prompt(args.prompt)
    _check_size(args)
    _check_fps(args.fps, ".gif", args.steps)  # one GIF frame per step
    _check_image_options(args, [args.image])
    _check_directions(args)
    output = _start_output(args, folder=True)
    scheduler = _check_model(args, args.model, args.scheduler)
    names = {
        "image": "image.png",
        "x0": "steps_x0.png",
        "preview": "steps_preview.png",
        "gif": "denoising.gif",
        "trace": "trace.safetensors",
    }
    if args.preview != "decode":
        del names["x0"]
    with output:  # the lock is taken here: a second run into the same --out is refused before loading
        pipe = _load(args, args.model, scheduler)
        write_steps(pipe, args, {k: output.path / v for k, v in names.items()})
        extra = _write_directions_record(args, output.path)
        output.commit()
    _wrote(output.shown / v for v in [*names.values(), *extra])
    return 0


def write_steps(pipe: Any, args: argparse.Namespace, files: dict[str, Path]) -> None:
    """The work of ``sdexplore steps`` on a loaded pipeline: generate, record, write ``files``."""

    import numpy as np

    from .export import save_gif
    from .generation import generate

    prompt, decode = args.prompt, args.preview == "decode"
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


def decode_x0(pipe: Any, trace: Any, *, progress: bool = True) -> list[np.ndarray]:
    """VAE-decode the x0 of every recorded step (image 0) after the run → (H, W, 3) uint8 each.

    Decoding after the run keeps the denoising loop as fast as a plain call. A float16 VAE whose config asks
    for ``force_upcast`` (SDXL's, which overflows in float16) decodes in float32, as the pipelines do, and
    is put back afterwards.
    """
    from .render import decode_steps

    return decode_steps(pipe.vae, trace, progress=progress)


def _check_words(tokens: Any, words: Sequence[str], prompt: str) -> None:
    from .errors import WordNotFoundError

    for word in words:
        try:
            tokens.positions(word)
        except WordNotFoundError as e:
            if tokens.truncated and "cut off" in str(e):
                raise InputError(str(e)) from e
            known = ", ".join(dict.fromkeys(tokens.words))
            raise InputError(
                f"{word!r} is not a word of the prompt {prompt!r}; its words are: {known}. "
                "Pass --words with some of these"
            ) from e


def _word_files(words: Iterable[str]) -> dict[str, str]:
    """Each word → its overlay's file name (``attention_WORD.png``, made unique)."""
    taken: set[str] = set()
    return {wd: f"attention_{_slug(wd, taken)}.png" for wd in dict.fromkeys(words)}


def _words_to_map(tokens: Any, args: argparse.Namespace) -> list[str]:
    """The words the command maps (--words or every word of the prompt), each checked against the prompt."""
    words = list(dict.fromkeys(args.words)) if args.words is not None else list(dict.fromkeys(tokens.words))
    if not words:
        raise InputError(f"the prompt {args.prompt!r} has no words to map")
    _check_words(tokens, words, args.prompt)
    return words


def _cmd_attention(args: argparse.Namespace) -> int:
    prompt = _prompt(args.prompt)
    _check_size(args)
    if args.words is not None:
        for word in args.words:
            if not word.strip():
                raise InputError("--words has an empty word; pass words of the prompt")
    _check_image_options(args, [args.image])
    _check_directions(args)
    output = _start_output(args, folder=True)
    scheduler = _check_model(args, args.model, args.scheduler)

    from .record.tokens import tokenize_prompt

    tokenizer = _tokenizer_before_loading(args.model)
    words = _words_to_map(tokenize_prompt(tokenizer, prompt), args) if tokenizer is not None else None
    fixed = {"image": "image.png", "grid": "attention_grid.png", "maps": "attention.safetensors"}
    with output:
        pipe = _load(args, args.model, scheduler)
        if words is None:  # a hub model: its tokenizer came with it
            words = _words_to_map(tokenize_prompt(pipe.tokenizer, prompt), args)
        word_files = _word_files(words)
        maps = write_attention(
            pipe,
            args,
            {k: output.path / v for k, v in fixed.items()},
            {wd: output.path / v for wd, v in word_files.items()},
        )
        extra = _write_directions_record(args, output.path)
        output.commit()
    _wrote(
        output.shown / v for v in (fixed["image"], *word_files.values(), fixed["grid"], fixed["maps"], *extra)
    )
    for word in word_files:
        m = maps.word(word)  # (h, w) raw attention mass
        r, c = divmod(int(m.argmax()), int(m.shape[1]))
        print(
            f"{word}: mean attention mass {float(m.mean()):.4f}, "
            f"peak at row {r / m.shape[0]:.2f}, column {c / m.shape[1]:.2f} of the image"
        )
    return 0


def write_attention(
    pipe: Any, args: argparse.Namespace, fixed: dict[str, Path], word_files: dict[str, Path]
) -> Any:
    """The work of ``sdexplore attention`` on a loaded pipeline: generate, record, write; returns the maps."""

    import numpy as np

    from .generation import generate
    from .render import heat_overlay

    if getattr(args, "image", None) is None:
        with _steered(pipe, args):
            images, obs = generate(
                pipe, args.prompt, steps=False, attention=True, seed=args.seed, **_call_kwargs(args)
            )
    else:
        images, obs = _reconstruct_observed(pipe, args, steps=False, attention=True)
    maps = obs.attention
    image = np.asarray(images[0].convert("RGB"))  # (H, W, 3) uint8
    fixed["image"].parent.mkdir(parents=True, exist_ok=True)
    _save_png(image, fixed["image"])
    for word, path in word_files.items():
        _save_png(
            heat_overlay(image, maps.word(word), size=HEAT_MIN_SIDE), path
        )  # 64x64 is too small to read
    _save_png(_attention_grid(maps, image, list(word_files), args.rows), fixed["grid"])
    maps.save(fixed["maps"])
    return maps


def _group_label(group: range, ts: list[float]) -> str:
    if len(group) == 1:
        return f"step {group[0]}\nt {ts[group[0]]:.0f}"
    return (
        f"steps {group[0]}-{group[-1]}\nt {ts[group[0]]:.0f}-{ts[group[-1]]:.0f}"  # ASCII: PIL's default font
    )


def _attention_grid(maps: Any, image: np.ndarray, words: Sequence[str], rows: int) -> np.ndarray:
    """(H, W, 3) uint8: one row per group of steps (early → late), one column per word, heat over the image."""
    import numpy as np
    from PIL import Image, ImageDraw

    from .render import heat_overlay, step_groups

    cell = _fit(image, TILE)  # (h, w, 3)
    h, w = cell.shape[:2]
    groups = step_groups(maps.num_steps, rows) if maps.steps is not None else [None]
    ts = maps.timesteps.tolist()
    left, top, gap = 84, 18, 2
    canvas = Image.new(
        "RGB", (left + len(words) * (w + gap) - gap, top + len(groups) * (h + gap) - gap), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for c, word in enumerate(words):
        x = left + c * (w + gap)
        label = word
        while len(label) > 1 and draw.textlength(label) > w:
            label = label[:-3] + ".."
        draw.text((x + (w - draw.textlength(label)) / 2, 3), label, fill="black")
        for r, group in enumerate(groups):
            y = top + r * (h + gap)
            heat = maps.word(word) if group is None else maps.word(word, step=group)  # (h', w')
            canvas.paste(Image.fromarray(heat_overlay(cell, heat)), (x, y))
            if c == 0:
                text = "all steps" if group is None else _group_label(group, ts)
                draw.multiline_text((3, y + h / 2 - 12), text, fill="black")
    return np.asarray(canvas)


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
    from .errors import InterpolationError
    from .interpolate import keyframe_schedule

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
    scheduler = _check_model(args, args.model, args.scheduler)

    from .walks import walk

    with output, _image_notes():
        pipe = _load(args, args.model, scheduler)
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
        output.commit()
    _wrote([output.shown])
    print(result.smoothness())
    return 0


# ---------------------------------------------------------------- directions: --direction and `direction`


def _model_key(model: str | None) -> str:
    """What a direction file records as its model: "embedded", a local path made absolute, or the hub id."""
    if model is None:
        return "embedded"
    path = Path(model).expanduser()
    try:
        if path.exists():
            return str(path.resolve())
    except (OSError, ValueError):
        pass
    return model


def _check_directions(args: argparse.Namespace) -> None:
    """--direction: every file exists and loads as a direction (checksums, fields, shapes), before the model
    loads; kept on ``args.directions`` as (Direction, strength, path) for the run."""
    given = getattr(args, "direction", None) or []
    args.directions = []
    if not given:
        return
    pictures = getattr(args, "image", None)
    pictures = [pictures] if isinstance(pictures, str) else pictures or []
    if any(p not in (None, "-") for p in pictures):
        raise InputError(
            "--direction cannot be used with --image: the picture's inversion would be steered too; generate "
            "from a prompt with --direction, or leave --direction out"
        )
    from .directions import load
    from .errors import SdexploreError

    for path, strength in given:
        file = Path(path).expanduser()
        if not file.is_file():
            raise InputError(
                f"--direction {path}: no such file; make one with `sdexplore direction FROM TO --out FILE`"
            )
        try:
            d = load(file)
        except (SdexploreError, OSError, ValueError) as e:
            raise InputError(f"--direction {path}: {_one_line(e)}") from e
        args.directions.append((d, strength, path))


def _check_directions_fit(pipe: Any, args: argparse.Namespace) -> Any:
    """Once the model is loaded: each direction was made for this family (``sdexplore.directions.apply``
    refuses another) and, where the file records it, this --model. Returns the context manager applying them
    all (a no-op without --direction)."""
    loaded = getattr(args, "directions", None) or []
    if not loaded:
        return contextlib.nullcontext()
    from . import directions
    from .errors import InvalidArgumentError

    model = _model_key(getattr(args, "model", None))
    for d, strength, path in loaded:
        made = d.settings.get("model")
        if made is not None and made != model:
            raise InputError(
                f"--direction {path} was made with the model {made}, this run uses {model}: a direction fits only "
                f"the model it was found with; make it again with this --model"
            )
        try:
            directions.apply(pipe, [(d, strength)])
        except InvalidArgumentError as e:
            raise InputError(f"--direction {path}: {_one_line(e)}") from e
    return directions.apply(pipe, [(d, strength) for d, strength, _ in loaded])


@contextlib.contextmanager
def _steered(pipe: Any, args: argparse.Namespace) -> Iterator[None]:
    """Apply --direction around the generation; a direction whose shape does not fit this run (found with
    another model of the family, or an inner one at another image size) is refused as bad input."""
    from .errors import InvalidArgumentError

    steering = _check_directions_fit(pipe, args)
    try:
        with steering:
            yield
    except InvalidArgumentError as e:
        if not getattr(args, "directions", None) or "direction" not in str(e):
            raise
        raise InputError(f"--direction: {_one_line(e)}") from e


def _directions_record(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The applied directions as plain JSON, for the run's saved output: what a result says it was made with."""
    from .cli_output import _sha256

    out = []
    for d, strength, path in getattr(args, "directions", None) or []:
        out.append(
            {
                "file": str(path),
                "sha256": _sha256(Path(path).expanduser()),
                "strength": strength,
                "space": d.space,
                "method": d.method,
                "family": d.family,
                "model": d.settings.get("model"),
                "layer": d.layer,
                "steps": d.steps,
                "label": d.label,
                "pairs": [list(pr) for pr in d.pairs],
            }
        )
    return out


def _write_directions_record(args: argparse.Namespace, folder: Path) -> list[str]:
    """``directions.json`` in the output folder when --direction was given; returns the file names written."""
    record = _directions_record(args)
    if not record:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "directions.json").write_text(json.dumps(record, indent=1) + "\n")
    return ["directions.json"]


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
    from .directions.find import check_pairs
    from .errors import InvalidArgumentError

    try:
        check_pairs(pairs)
    except InvalidArgumentError as e:
        raise InputError(_one_line(e)) from e
    output = _start_output(args, folder=False)
    _check_model(args, args.model)
    from .directions import from_pairs

    with output:
        pipe = _load(args, args.model)
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


# ---------------------------------------------------------------- pictures: invert and --image


def _check_picture(path: str) -> None:
    """A picture given on the command line is read now, before anything is loaded: a missing or non-image file
    is one clear error (its conversions are noted later, once, when it is used)."""
    from .errors import InvalidArgumentError
    from .images import ImageNote, load_image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImageNote)
            load_image(path)
    except InvalidArgumentError as e:
        raise InputError(_one_line(e)) from e


def _check_image_options(args: argparse.Namespace, pictures: Sequence[str | None]) -> None:
    """--image: every picture readable; no --negative or --scheduler beside it (the reconstruction regenerates
    with the inversion's own negative prompt and sampler, so either would be ignored)."""
    if not any(p is not None for p in pictures):
        return
    for name, flag in (("negative", "--negative"), ("scheduler", "--scheduler")):
        if getattr(args, name, None) is not None:
            raise InputError(
                f"{flag} cannot be used with --image: a picture is regenerated with its inversion's own "
                f"{'negative prompt' if name == 'negative' else 'sampler (DDIM, or flow matching on SD3)'}; "
                f"leave {flag} out"
            )
    for p in pictures:
        if p is not None:
            _check_picture(p)


@contextlib.contextmanager
def _image_notes() -> Iterator[None]:
    """Notes about a converted or resized picture (sdexplore.images.ImageNote) as ``sdexplore: note:`` lines."""
    from .images import ImageNote

    shown = warnings.showwarning

    def show(message: Any, category: Any, *rest: Any, **kw: Any) -> None:
        if issubclass(category, ImageNote):
            _note(str(message))
        else:
            shown(message, category, *rest, **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("always", ImageNote)
        warnings.showwarning = show
        yield


def _invert(pipe: Any, args: argparse.Namespace, *, guidance: float, method: str | None = None) -> Any:
    """Invert ``args.image`` with ``args.prompt``; a method that does not fit the loaded model is bad input.

    Default method: the model's own sampler backwards at CFG ≤ 1, negative-prompt inversion above.
    """
    from .errors import InvalidArgumentError
    from .inversion import DEFAULT_ITERATIONS, invert

    if method is None and guidance > 1:
        method = "negative-prompt"
    try:
        with _image_notes():
            return invert(
                pipe,
                args.image,
                args.prompt,
                steps=args.steps,
                method=method,
                guidance=guidance,
                iterations=getattr(args, "iterations", DEFAULT_ITERATIONS),
                height=args.height,
                width=args.width,
            )
    except InvalidArgumentError as e:
        raise InputError(_one_line(e)) from e


def _reconstruct_observed(
    pipe: Any, args: argparse.Namespace, *, steps: bool, attention: bool = False
) -> Any:
    """``steps``/``attention`` with --image: the picture's reconstruction pass under observe → (images, obs)."""
    from PIL import Image

    from .record.observe import observe

    guidance = float(_call_kwargs(args).get("guidance_scale", 1.0))
    with observe(pipe, steps=steps, attention=attention) as obs:
        inv = _invert(pipe, args, guidance=guidance)
    _note(
        f"reconstruction of {args.image}: PSNR {inv.psnr:.2f} dB (the VAE's own round trip: {inv.vae_psnr:.2f} dB)"
    )
    return [Image.fromarray(inv.reconstruction)], obs


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
        pipe = _load(args, args.model)
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


def _edit_words(tokens: Any, prompt: str, words: Iterable[str]) -> None:
    """Each --reweight word is a word of ``prompt`` (the target, or the source without one)."""
    from .errors import WordNotFoundError

    for word in words:
        try:
            tokens.positions(word)
        except WordNotFoundError as e:
            known = ", ".join(dict.fromkeys(tokens.words))
            raise InputError(
                f"--reweight {word}: {word!r} is not a word of the prompt {prompt!r}; its words are: {known}"
            ) from e


def _edit_aligned(a: Any, b: Any, source: str, target: str) -> None:
    """TARGET tokenizes word for word like SOURCE (a word swap), checked on the token labels alone."""
    wa, wb = a.word_spans(), b.word_spans()
    if len(wa) != len(wb):
        raise InputError(
            f"a word swap needs prompts with the same number of words: {source!r} has {len(wa)}, {target!r} has "
            f"{len(wb)}; swap words one for one (e.g. red -> blue)"
        )
    for (x, px), (y, py) in zip(wa, wb, strict=True):
        if len(px) != len(py):
            raise InputError(
                f"{x!r} is {len(px)} token(s) but {y!r}, which replaces it, is {len(py)}: a word swap needs words "
                "of the same token count; pick another word or spelling"
            )


def _check_edit_prompts(tokenizer: Any, args: argparse.Namespace) -> None:
    """The swap aligns and every --reweight word is in the prompt it is looked up in (needs the tokenizer)."""
    from .record.tokens import tokenize_prompt

    src = tokenize_prompt(tokenizer, args.source)
    tgt = src if args.target is None else tokenize_prompt(tokenizer, args.target)
    if args.target is not None:
        _edit_aligned(src, tgt, args.source, args.target)
    _edit_words(tgt, args.target or args.source, dict(args.reweight or []))


def _cmd_edit(args: argparse.Namespace) -> int:
    _prompt(args.source)
    if args.target is not None:
        _prompt(args.target)
    if args.target is None and not args.reweight:
        raise InputError(
            "nothing to edit: pass TARGET (SOURCE with a word swapped) and/or --reweight WORD=FACTOR"
        )
    words = [w for w, _ in args.reweight or []]
    if len(set(words)) != len(words):
        raise InputError(
            f"--reweight names {next(w for w in words if words.count(w) > 1)!r} twice; give it once"
        )
    if args.method is not None and args.image is None:
        raise InputError(f"--method {args.method} edits a picture: give it with --image PICTURE")
    if args.method == "flowedit" and args.guidance is not None:
        raise InputError(
            "--guidance does not apply to --method flowedit: FlowEdit guides its source and target branches with "
            "the paper's own scales; leave --guidance out"
        )
    if args.method == "flowedit" and (args.target is None or args.reweight):
        raise InputError(
            "--method flowedit edits toward TARGET and reweights nothing: pass TARGET and leave --reweight out"
        )
    _check_image_options(args, [args.image])
    _check_size(args)
    output = _start_output(args, folder=True)
    scheduler = _check_model(args, args.model, args.scheduler)
    tokenizer = _tokenizer_before_loading(args.model)
    if tokenizer is not None:
        _check_edit_prompts(tokenizer, args)
    with output:
        pipe = _load(args, args.model, scheduler)
        if tokenizer is None:  # a hub model: its tokenizer came with it
            _check_edit_prompts(pipe.tokenizer, args)
        res, names = write_edit(pipe, args, output.path)
        output.commit()
    _wrote(output.shown / v for v in names)
    for word in res.changed_words() if res.edited_maps is not None else []:  # FlowEdit keeps no maps
        before, after = res.word_maps(word)
        was = "none (not in the source)" if before is None else f"{float(before.mean()):.4f}"
        print(f"{word}: mean attention mass before {was}, after {float(after.mean()):.4f}")
    changed = float((res.difference().max(-1) > 8).mean())  # share of pixels changed visibly (> 8/255)
    print(f"pixels changed: {changed:.1%}")
    return 0


def write_edit(pipe: Any, args: argparse.Namespace, folder: Path) -> tuple[Any, list[str]]:
    """The work of ``sdexplore edit`` on a loaded pipeline: edit, write the files; returns (the Edit, file names)."""
    import torch

    from .editing import edit
    from .errors import InvalidArgumentError, UnsupportedPipelineError
    from .render import heat_overlay

    kw = _call_kwargs(args)
    picture = getattr(args, "image", None)
    method = getattr(args, "method", None)
    if method == "flowedit":
        kw.pop("guidance_scale", None)  # the embedded model's scale: FlowEdit sets each branch's own
    if picture is not None and method != "flowedit":
        options: dict[str, Any] = {"image": picture}  # both branches start from its inversion: no noise drawn
    else:
        options = {"generator": torch.Generator("cpu").manual_seed(args.seed)}
        if picture is not None:
            options.update(image=picture, method=method)
    if method != "flowedit":
        options.update(
            reweight=dict(args.reweight or []) or None,
            cross_replace=args.cross_replace,
            self_replace=args.self_replace,
        )
    try:
        with _image_notes():
            res = edit(pipe, args.source, args.target, **options, **kw)
    # what only the loaded model decides, checked by edit() before any step (an MMDiT family, for now)
    except (InvalidArgumentError, UnsupportedPipelineError) as e:
        raise InputError(_one_line(e)) from e
    res.settings.update(seed=args.seed, model=args.model or "embedded", command="sdexplore edit")
    if picture is not None:
        res.settings.update(image=str(picture))
    source, edited = res.images()
    folder.mkdir(parents=True, exist_ok=True)
    names = ["source.png", "edited.png", "difference.png"]
    _save_png(source, folder / names[0])
    _save_png(edited, folder / names[1])
    _save_png(res.difference(), folder / names[2])
    taken: set[str] = set()
    for word in res.changed_words() if res.edited_maps is not None else []:  # FlowEdit keeps no maps
        before, after = res.word_maps(word)
        top = max(float(after.max()), 0.0 if before is None else float(before.max())) or 1.0
        slug = _slug(word, taken)
        if before is not None:
            names.append(f"attention_{slug}_before.png")
            _save_png(
                heat_overlay(source, before, size=HEAT_MIN_SIDE, vmin=0.0, vmax=top), folder / names[-1]
            )
        names.append(f"attention_{slug}_after.png")
        _save_png(heat_overlay(edited, after, size=HEAT_MIN_SIDE, vmin=0.0, vmax=top), folder / names[-1])
    names.append("edit.safetensors")
    res.save(folder / names[-1])
    return res, names


# ---------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``sdexplore`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    0 on success; 2 for bad input (one line on stderr: ``sdexplore: error: ...``); 1 when the work itself
    fails; 130 when interrupted (Ctrl-C or SIGTERM: temporary output removed, the old output as it was).
    ``--debug`` shows the full traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args: argparse.Namespace | None = None
    try:
        parser = build_parser()
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit as done:  # --help and --version
            return int(done.code or 0)
        if extra:
            where = f"{PROG} {args.command}" if args.command else PROG
            raise InputError(f"unrecognized arguments: {' '.join(extra)} (see `{where} --help`)")
        if args.command is None:
            raise InputError(
                "choose a command: describe, steps, attention, walk, invert, edit, direction, sweep or sweep-report "
                "(see "
                "`sdexplore --help`)"
            )
        with sigterm_as_interrupt(), _quiet_libraries(debug):  # SIGTERM (kill, a scheduler) as Ctrl-C
            return int(args.run(args))
    except KeyboardInterrupt:  # the output's temporary files and lock are already removed
        output = getattr(args, "output", None)
        if output is None:
            print(f"{PROG}: interrupted", file=sys.stderr)
        elif output.committed:
            print(f"{PROG}: interrupted after writing {output.shown}", file=sys.stderr)
        else:
            print(f"{PROG}: interrupted; nothing was written ({output.shown} is as it was)", file=sys.stderr)
        return 130
    except Exception as error:  # one line for the user; --debug for the traceback
        from .errors import SdexploreError

        if debug:
            traceback.print_exc()
        expected = isinstance(error, (SdexploreError, ValueError, OSError, LookupError, MemoryError))
        hint = "" if expected or debug else f" ({type(error).__name__}; run with --debug for the traceback)"
        print(f"{PROG}: error: {_one_line(error)}{hint}", file=sys.stderr)
        return 2 if isinstance(error, InputError) else 1


if __name__ == "__main__":
    sys.exit(main())
