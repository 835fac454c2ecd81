"""``sdexplore edit``: edit an image by its attention (word swap, reweight); both images and the maps before and after."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .output import InputError, _one_line

if TYPE_CHECKING:  # numpy, torch and diffusers load when a command runs: `--help` and bad input stay fast
    pass
from . import _common
from ._common import (
    HEAT_MIN_SIDE,
    _call_kwargs,
    _check_image_options,
    _check_model,
    _check_size,
    _common_options,
    _generation_options,
    _image_notes,
    _number,
    _output_options,
    _prompt,
    _reweight,
    _save_png,
    _seed,
    _slug,
    _start_output,
    _tokenizer_before_loading,
    _wrote,
)

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


def add_parser(sub: Any) -> None:
    """Add ``edit`` to the ``sdexplore`` subparsers ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    e = sub.add_parser(
        "edit",
        parents=[
            _common_options(),
            _generation_options(),
            _output_options("sdexplore-edit", "output folder"),
        ],
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


def _edit_words(tokens: Any, prompt: str, words: Iterable[str]) -> None:
    """Each --reweight word is a word of ``prompt`` (the target, or the source without one)."""
    from ..errors import WordNotFoundError

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
    from ..record.tokens import tokenize_prompt

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
        pipe = _common._load(args, args.model, scheduler)
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

    from ..editing import edit
    from ..errors import InvalidArgumentError, UnsupportedPipelineError
    from ..views.render import heat_overlay

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
