"""What the ``sdexplore`` commands share: argument types and limits, the option groups, the checks made before
the model loads, loading, image helpers, ``--direction`` and ``--image``."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._checks import MAX_SEED
from .output import InputError, _note, _one_line, _Output

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

MAX_STEPS = 1000  # diffusers' SD schedulers have 1000 training timesteps; more inference steps fail
MAX_SIDE = 8192  # --height / --width, pixels
MAX_FRAMES = 10_000  # frames of one walk
MAX_GUIDANCE = 100.0  # classifier-free guidance scale (SD uses 1..20; beyond 100 images are saturated noise)
MAX_FPS = 240.0
MAX_GIF_FPS = 50.0  # GIF frame times are 1/100 s; most viewers slow anything under 2/100 s to 1/10 s


# -------------------------------------------------------------------------------------------- argument types
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


# --------------------------------------------------------------------------------------------- option groups
def _common_options(model_option: bool = True) -> argparse.ArgumentParser:
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


def _generation_options() -> argparse.ArgumentParser:
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


def _output_options(default: str, what: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("--out", default=default, metavar="PATH", help=f"{what} (default {default})")
    g.add_argument(
        "--force", action="store_true", help="replace an existing output as a whole (no stale files remain)"
    )
    return p


def _frames_option(p: argparse.ArgumentParser) -> None:
    """``--frames N``: the clip length of a video model (Wan), for the commands that write a video's frames."""
    p.add_argument(
        "--frames",
        dest="num_frames",
        type=_whole(1, MAX_FRAMES),
        metavar="N",
        help="video models (Wan): frames of the clip, 1 + 4k such as 5 or 81 (default: the pipeline's, 81 for "
        "Wan; fewer frames run faster)",
    )


def _directions_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--direction",
        type=_direction_option,
        action="append",
        metavar="PATH[:S]",
        help="apply a saved direction (made by `sdexplore direction`) at strength S (default 1; 0: the plain "
        "image, negative: the opposite way); repeat to apply several at once",
    )


# -------------------------------------------------------------------------- checks before the expensive work
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
    """--fps against what the encoder takes (sdexplore.views.export.check_fps), for ``frames`` frames, before the work."""
    if suffix == ".gif" and fps > MAX_GIF_FPS:
        raise InputError(
            f"--fps {fps:g} is too fast for a GIF (it stores frame times in 1/100 s, and most viewers slow frames "
            f"shorter than 1/{MAX_GIF_FPS:g} s down to 1/10 s): use at most {MAX_GIF_FPS:g}, or write an .mp4"
        )
    from ..errors import InvalidArgumentError
    from ..views.export import check_fps

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
    from ..loading import MOVED_MODEL_IDS, _looks_like_path

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
    from ..errors import SdexploreError
    from ..loading import EMBEDDED_MODELS, check_scheduler_name, pick_device, pick_dtype

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
    if getattr(args, "num_frames", None) is not None and (model is None or model in EMBEDDED_MODELS):
        raise InputError(
            f"--frames sets a video model's clip length, and the embedded model {model or 'tiny-shapes'} makes "
            "pictures: leave --frames out, or pass --model with a video model (Wan)"
        )
    name = resolve_scheduler(scheduler)
    if name is None:
        return None
    try:  # against the model's scheduler_config.json: FlowMatchEuler cannot drive a DDPM-type UNet
        return check_scheduler_name(name, model)
    except (SdexploreError, ValueError) as e:
        raise InputError(f"--scheduler {scheduler}: {_one_line(e)}") from e


def _tokenizer_before_loading(model: str | None) -> Any:
    """The model's tokenizer read alone from its folder (embedded model or a local folder), or None."""
    from ..loading import EMBEDDED_MODEL_DIR, embedded_model_available

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


def _html_option(p: argparse.ArgumentParser, what: str) -> None:
    """``--html PAGE``: also write ``what`` as one self-contained HTML page (its own output transaction)."""
    p.add_argument(
        "--html",
        metavar="PAGE",
        help=f"also write {what} as one self-contained HTML page (.html; no network, opens from file://; "
        "--force replaces an existing one)",
    )


def _start_page(args: argparse.Namespace) -> _Output | None:
    """The ``--html`` page's output transaction, checked before the model loads (None without ``--html``): a
    name ending in .html, outside the ``--out`` folder (written whole), not existing unless ``--force``."""
    page = getattr(args, "html", None)
    if page is None:
        return None
    if Path(page).suffix.lower() not in (".html", ".htm"):
        raise InputError(f"--html {page!r} does not end in .html; pass a page name such as run.html")
    output = _Output(page, folder=False, force=args.force, option="--html", suffixes=".html")
    out = getattr(args, "output", None)
    if (
        out is not None
        and out.folder
        and (out.target == output.target or out.target in output.target.parents)
    ):
        raise InputError(
            f"--html {page} is inside --out {out.shown}, which is written whole; pass a page path beside it, "
            f"e.g. {out.shown.with_suffix('.html')}"
        )
    output.check()
    return output


def _write_observation_page(path: Path, obs: Any, image: Any, args: argparse.Namespace) -> None:
    """The ``--html`` page of a run: its steps and/or attention explorers over the final ``image``, with the
    run's provenance (model, seed, prompt)."""
    from ..views.pages import save_observation

    picture = getattr(args, "image", None)
    save_observation(
        obs,
        path,
        image=image,
        model=args.model,  # None: the recorded provenance names the model (the embedded one by its name)
        seed=None if picture is not None else args.seed,
        prompt=args.prompt,
        negative_prompt=args.negative,
        title=f"sdexplore {args.command} · {args.prompt}",
    )


def _load(args: argparse.Namespace, model: str | None, scheduler: str | None = None) -> Any:
    from ..errors import InvalidArgumentError
    from ..loading import embedded_model_available, load_pipeline

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
    latents (sizes in multiples of 16, which FluxPipeline would otherwise round down silently), Flux.1 has
    no CFG batch (FluxPipeline ignores a negative prompt without true CFG), and --frames needs a video model
    (Wan) and a clip length its VAE takes."""
    from .._checks import check_size_limit
    from ..families import detect_family, size_unit, vae_scale_factor

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
    negative = getattr(args, "negative", None)
    if negative is not None and "negative_prompt" not in inspect.signature(type(pipe).__call__).parameters:
        raise InputError(
            f"--negative is not taken by {fam.label}: {type(pipe).__name__} has no negative prompt; leave "
            "--negative out"
        )
    # a family without a CFG batch uses the negative prompt where it runs CFG as two calls per step: always where
    # its pipeline decides by the guidance scale (Chroma, Wan), where its default true_cfg_scale exceeds 1
    # (Qwen-Image); never on Flux.1 at its default true_cfg_scale of 1
    if negative is not None and not fam.cfg_batch and fam.cfg_flag is None:
        if not fam.true_cfg({"negative_prompt": negative}, pipe):
            raise InputError(
                f"--negative is not used by {fam.label}: it has no CFG batch (its guidance is distilled into the "
                "model), so the pipeline would ignore the negative prompt; leave --negative out"
            )
    frames = getattr(args, "num_frames", None)
    if frames is not None and not fam.video:
        raise InputError(
            f"--frames sets a video model's clip length, and {fam.label} makes pictures: leave it out"
        )
    step = getattr(pipe, "vae_scale_factor_temporal", 1)  # Wan: 4 frames per latent frame after the first
    if frames is not None and (frames - 1) % step:
        low = (frames - 1) // step * step + 1
        raise InputError(
            f"--frames {frames}: {fam.label}'s video VAE takes 1 + {step}k frames (the pipeline would round down); "
            f"pass {low} or {low + step}"
        )


def _call_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"num_inference_steps": args.steps}
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    elif args.model is None:  # the embedded model: its own scale, not diffusers' 7.5
        from ..loading import EMBEDDED_GUIDANCE_SCALE

        kwargs["guidance_scale"] = EMBEDDED_GUIDANCE_SCALE
    if args.height is not None:
        kwargs["height"] = args.height
    if args.width is not None:
        kwargs["width"] = args.width
    if args.negative is not None:
        kwargs["negative_prompt"] = args.negative
    if getattr(args, "num_frames", None) is not None:  # --frames: a video model's clip length
        kwargs["num_frames"] = args.num_frames
    return kwargs


def _wrote(paths: Iterable[Path]) -> None:
    for p in paths:
        print(f"wrote {p}")


# --------------------------------------------------------------------------------------------- image helpers
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
    from ..views.export import image_grid

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


# ----------------------------------------------------------------------------------------------- --direction
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
    from ..directions import load
    from ..errors import SdexploreError

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
    from .. import directions
    from ..errors import InvalidArgumentError

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
    from ..errors import InvalidArgumentError

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
    from .output import _sha256

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


# --------------------------------------------------------------------- --image: pictures and their inversion
def _check_picture(path: str) -> None:
    """A picture given on the command line is read now, before anything is loaded: a missing or non-image file
    is one clear error (its conversions are noted later, once, when it is used)."""
    from ..errors import InvalidArgumentError
    from ..images import ImageNote, load_image

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
    from ..images import ImageNote

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
    from ..errors import InvalidArgumentError
    from ..inversion import DEFAULT_ITERATIONS, invert

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

    from ..record.observe import observe

    guidance = float(_call_kwargs(args).get("guidance_scale", 1.0))
    with observe(pipe, steps=steps, attention=attention) as obs:
        inv = _invert(pipe, args, guidance=guidance)
    _note(
        f"reconstruction of {args.image}: PSNR {inv.psnr:.2f} dB (the VAE's own round trip: {inv.vae_psnr:.2f} dB)"
    )
    return [Image.fromarray(inv.reconstruction)], obs
