"""``sdexplore attention``: generate one image and write its attention maps per word and a step x word grid."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _common
from ._common import (
    HEAT_MIN_SIDE,
    MAX_STEPS,
    TILE,
    _call_kwargs,
    _check_directions,
    _check_image_options,
    _check_model,
    _check_size,
    _common_options,
    _directions_option,
    _fit,
    _frames_option,
    _generation_options,
    _html_option,
    _output_options,
    _prompt,
    _reconstruct_observed,
    _save_png,
    _seed,
    _slug,
    _start_output,
    _start_page,
    _steered,
    _tokenizer_before_loading,
    _whole,
    _write_directions_record,
    _write_observation_page,
    _wrote,
)
from .output import InputError

if TYPE_CHECKING:  # numpy, torch and diffusers load when a command runs: `--help` and bad input stay fast
    import numpy as np

_ATTENTION_EPILOG = """\
writes into --out (default sdexplore-attention/):
  image.png                the generated image
  attention_WORD.png       the word's heat map over the image (aggregated over steps and layers), one per word
  attention_grid.png       rows = groups of steps (early -> late), columns = words
  attention.safetensors    the maps: sdexplore.AttentionMaps.load("attention.safetensors")

A video model (Wan) maps every latent frame: frames.png (the clip's frames side by side) replaces image.png,
attention_WORD.png holds one heat map per latent frame left to right (each over the clip frame it ends at), and
each grid cell is such a row of frames.

Each heat map is min-max normalised on its own (it shows where a word attends, not how strongly).
With --image PICTURE the maps are those of the picture's reconstruction (the picture inverted with the prompt,
then regenerated from its inverted noise under observation): attention on your own picture.

With --html PAGE the run is also written as one self-contained page: a word picker over the maps (per word or
token, by step range and layer) and a step slider, with the run's model, seed and prompt; no network, it opens
from file://.

examples:
  sdexplore attention "a big red circle at the top left on a blue background"
  sdexplore attention "a big red circle at the top left on a blue background" --out att --html att.html
  sdexplore attention "a big red circle at the top left on a blue background" --words circle "blue background" --out att
"""


def add_parser(sub: Any) -> None:
    """Add ``attention`` to the ``sdexplore`` subparsers ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    a = sub.add_parser(
        "attention",
        parents=[
            _common_options(),
            _generation_options(),
            _output_options("sdexplore-attention", "output folder"),
        ],
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
    _html_option(a, "the run (a word picker over the maps, and a step slider)")
    _directions_option(a)
    _frames_option(a)
    a.set_defaults(run=_cmd_attention)


def _check_words(tokens: Any, words: Sequence[str], prompt: str) -> None:
    from ..errors import WordNotFoundError

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
    page = _start_page(args)
    scheduler = _check_model(args, args.model, args.scheduler)

    from ..record.tokens import tokenize_prompt

    tokenizer = _tokenizer_before_loading(args.model)
    words = _words_to_map(tokenize_prompt(tokenizer, prompt), args) if tokenizer is not None else None
    with output, page or contextlib.nullcontext():
        pipe = _common._load(args, args.model, scheduler)
        fixed = attention_files(pipe)
        if words is None:  # a hub model: its tokenizer came with it
            words = _words_to_map(tokenize_prompt(pipe.tokenizer, prompt), args)
        word_files = _word_files(words)
        maps = write_attention(
            pipe,
            args,
            {k: output.path / v for k, v in fixed.items()},
            {wd: output.path / v for wd, v in word_files.items()},
            page=page and page.path,
        )
        extra = _write_directions_record(args, output.path)
        output.commit()
        if page is not None:
            page.commit()
    first = fixed.get("image") or fixed["frames"]
    _wrote(output.shown / v for v in (first, *word_files.values(), fixed["grid"], fixed["maps"], *extra))
    _wrote([page.shown] if page is not None else [])
    for word in word_files:
        m = maps.word(word)  # (h, w) raw attention mass; a video's (F, h, w)
        f, rest = divmod(int(m.argmax()), int(m.shape[-2] * m.shape[-1]))
        r, c = divmod(rest, int(m.shape[-1]))
        where = f"of latent frame {f}" if m.ndim == 3 else "of the image"
        print(
            f"{word}: mean attention mass {float(m.mean()):.4f}, "
            f"peak at row {r / m.shape[-2]:.2f}, column {c / m.shape[-1]:.2f} {where}"
        )
    return 0


def attention_files(pipe: Any) -> dict[str, str]:
    """The fixed files ``sdexplore attention`` writes for this pipeline, key → name: the image (a video's frames
    side by side instead), the step × word grid, the maps."""
    from ..families import detect_family

    first = {"frames": "frames.png"} if detect_family(pipe).video else {"image": "image.png"}
    return {**first, "grid": "attention_grid.png", "maps": "attention.safetensors"}


def write_attention(
    pipe: Any,
    args: argparse.Namespace,
    fixed: dict[str, Path],
    word_files: dict[str, Path],
    *,
    page: Path | None = None,
) -> Any:
    """The work of ``sdexplore attention`` on a loaded pipeline: generate, record, write (and, given ``page``,
    the ``--html`` page there, for which the steps are recorded too); returns the maps."""

    import numpy as np

    from ..generation import generate
    from ..views.render import heat_overlay

    if getattr(args, "image", None) is None:
        with _steered(pipe, args):
            images, obs = generate(
                pipe,
                args.prompt,
                steps=page is not None,
                attention=True,
                seed=args.seed,
                **_call_kwargs(args),
            )
    else:
        images, obs = _reconstruct_observed(pipe, args, steps=page is not None, attention=True)
    maps = obs.attention
    if maps.frames is not None:  # a video: one heat map per latent frame, over the clip frame it ends at
        from .steps import _uint8_frames

        clip = _uint8_frames(images[0])  # (N, H, W, 3)
        pictures = _latent_frame_pictures(pipe, clip, maps.frames)  # F × (H, W, 3)
        fixed["frames"].parent.mkdir(parents=True, exist_ok=True)
        _save_png(np.concatenate(list(clip), axis=1), fixed["frames"])  # (H, N·W, 3)
    else:
        pictures = [np.asarray(images[0].convert("RGB"))]  # (H, W, 3) uint8
        fixed["image"].parent.mkdir(parents=True, exist_ok=True)
        _save_png(pictures[0], fixed["image"])
    for word, path in word_files.items():
        heat = maps.word(word)  # (h, w); a video's (F, h, w)
        heats = heat if maps.frames is not None else heat[None]
        overlays = [heat_overlay(pic, m, size=HEAT_MIN_SIDE) for pic, m in zip(pictures, heats, strict=True)]
        _save_png(np.concatenate(overlays, axis=1), path)  # 64x64 is too small to read; frames left to right
    _save_png(_attention_grid(maps, pictures, list(word_files), args.rows), fixed["grid"])
    maps.save(fixed["maps"])
    if page is not None:  # a video's maps over its frames
        _write_observation_page(page, obs, clip if maps.frames is not None else pictures[0], args)
    return maps


def _latent_frame_pictures(pipe: Any, clip: np.ndarray, frames: int) -> list[np.ndarray]:
    """The clip frame each of ``frames`` latent frames ends at: a causal video VAE keeps frame 0, then one latent
    frame per ``vae_scale_factor_temporal`` frames (Wan: 4), so latent frame f covers clip frames 4f − 3 .. 4f."""
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", 1) or 1)
    return [clip[min(f * temporal, len(clip) - 1)] for f in range(frames)]


def _group_label(group: range, ts: list[float]) -> str:
    if len(group) == 1:
        return f"step {group[0]}\nt {ts[group[0]]:.0f}"
    return (
        f"steps {group[0]}-{group[-1]}\nt {ts[group[0]]:.0f}-{ts[group[-1]]:.0f}"  # ASCII: PIL's default font
    )


def _attention_grid(maps: Any, pictures: Sequence[np.ndarray], words: Sequence[str], rows: int) -> np.ndarray:
    """(H, W, 3) uint8: one row per group of steps (early → late), one column per word, heat over the image; a
    video's cell is its latent frames' maps left to right, each over its own clip frame (``pictures``)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from ..views.render import heat_overlay, step_groups

    tiles = [_fit(pic, TILE) for pic in pictures]  # F × (h, w, 3); an image's one
    h, w = tiles[0].shape[:2]
    w *= len(tiles)
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
            heat = maps.word(word) if group is None else maps.word(word, step=group)  # (h', w'); (F, h', w')
            heats = heat if maps.frames is not None else heat[None]
            cell = np.concatenate([heat_overlay(t, m) for t, m in zip(tiles, heats, strict=True)], axis=1)
            canvas.paste(Image.fromarray(cell), (x, y))
            if c == 0:
                text = "all steps" if group is None else _group_label(group, ts)
                draw.multiline_text((3, y + h / 2 - 12), text, fill="black")
    return np.asarray(canvas)
