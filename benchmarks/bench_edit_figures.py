"""Issue 29's editing figures on both embedded models, each against the naive baseline (regenerate the edited prompt
with the same seed): colour swaps, kind swaps, ablating the shape word (the word's attention zeroed, with and
without causal ablation in the text encoders), ablating the background word, and the cost of an edit.

    python benchmarks/bench_edit_figures.py                       # both models, 12 held-out prompts: ~40 min, 1 thread
    python benchmarks/bench_edit_figures.py --model mmdit --only ablation kinds --json out.json
    python benchmarks/bench_edit_figures.py --tune colour kinds --only   # the settings grids on TUNING only

Models: the embedded tiny-shapes UNet (``load_pipeline()``, 25 steps, CFG 3) and the embedded tiny-shapes-mmdit
(``load_pipeline("tiny-shapes-mmdit")``, SD3 family, 20 steps, CFG 3). Prompts: :data:`EVAL`, 12 held-out prompts of
``validation_prompts()`` (4 circles, 4 squares, 4 triangles, each at another place), seed ``i`` for the ``i``-th;
settings are chosen on :data:`TUNING`, 12 other held-out prompts, never on EVAL. Pictures are read back with
``read_scene``. Each edit is one batched call ``pipe([source, target], latents=cat([x, x]))`` with ``x`` drawn as
the pipeline draws one image's latents, so the source is the plain image of the prompt with that seed. Times are
process CPU seconds in ABBA pairs (benchmarks/_paired.py) on one torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paired import median_interval, process_clock, run_pairs  # noqa: E402

import sdexplore as sdx  # noqa: E402
from sdexplore.embedded import scenes  # noqa: E402
from sdexplore.embedded.model import (  # noqa: E402
    EMBEDDED_GUIDANCE_SCALE,
    EMBEDDED_STEPS,
    MMDIT_GUIDANCE_SCALE,
    MMDIT_STEPS,
)
from sdexplore.record.ablate_text import CausalAblation  # noqa: E402
from sdexplore.record.control import Control, LocalBlend, Reweight, WordSwap  # noqa: E402

MODELS = {
    "unet": (None, dict(num_inference_steps=EMBEDDED_STEPS, guidance_scale=EMBEDDED_GUIDANCE_SCALE)),
    "mmdit": (
        "tiny-shapes-mmdit",
        dict(num_inference_steps=MMDIT_STEPS, guidance_scale=MMDIT_GUIDANCE_SCALE),
    ),
}
_ALL = scenes.validation_prompts()  # 216 held out from training; index % 27 = 9 · shape + place
#: 4 circles, 4 squares, 4 triangles at places 0, 2, 4, 6 (held out): the measured set.
EVAL = [_ALL[k * 9 + p] for k in range(3) for p in (0, 2, 4, 6)]
#: The same pattern 2 cycles later (other sizes, colours, backgrounds): settings are chosen here only.
TUNING = [_ALL[54 + k * 9 + p] for k in range(3) for p in (1, 3, 5, 7)]
assert not set(EVAL) & set(TUNING)
KIND_SWAPS = {"circle": "square", "square": "triangle", "triangle": "circle"}
#: Prompt-to-Prompt's settings (sdexplore.edit's defaults).
DEFAULT_SWAP = dict(cross_replace=0.8, self_replace=0.4, blend_threshold=None)


def load(model: str) -> Any:
    """The embedded pipeline ``model`` ("unet" or "mmdit")."""
    name = MODELS[model][0]
    return sdx.load_pipeline() if name is None else sdx.load_pipeline(name)


def latents(pipe: Any, seed: int) -> torch.Tensor:
    """One image's initial latents (1, C, h, w), drawn from ``seed`` as the pipeline draws them."""
    from diffusers.utils.torch_utils import randn_tensor

    from sdexplore.families import detect_family

    den = detect_family(pipe).get_denoiser(pipe)
    size = int(den.config.sample_size)
    shape = (1, int(den.config.in_channels), size, size)
    return randn_tensor(shape, generator=torch.Generator().manual_seed(seed), dtype=den.dtype)


def pair(pipe: Any, model: str, source: str, target: str, seed: int, *edits: Any, ablate: Any = None) -> list:
    """``[source image, edited image]`` from one batched call under ``Control(pipe, *edits)`` (and a
    :class:`CausalAblation` of the target image when ``ablate`` names words)."""
    x = latents(pipe, seed)
    kw = MODELS[model][1]
    with Control(pipe, *edits):
        if ablate:
            with CausalAblation(pipe, ablate, images=[1]):
                return pipe([source, target], latents=torch.cat([x, x]), **kw).images
        return pipe([source, target], latents=torch.cat([x, x]), **kw).images


def plain(pipe: Any, model: str, prompt: str, seed: int) -> Any:
    """The naive baseline: ``prompt`` generated from the same initial latents."""
    return pipe(prompt, latents=latents(pipe, seed), **MODELS[model][1]).images[0]


def read(image: Any) -> scenes.SceneReading:
    return scenes.read_scene(np.asarray(image))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def swap_edits(settings: dict[str, Any], blend_words: Sequence[str]) -> list[Any]:
    edits: list[Any] = [WordSwap(settings["cross_replace"], settings["self_replace"])]
    if settings.get("blend_threshold") is not None:
        edits.insert(0, LocalBlend(list(blend_words), threshold=settings["blend_threshold"]))
    return edits


def _kept(s: scenes.SceneReading, e: scenes.SceneReading) -> dict[str, bool]:
    return {
        "place": e.place == s.place,
        "colour": e.colour == s.colour,
        "background": e.background == s.background,
    }


def colour_target(prompt: str) -> tuple[str, str]:
    """``prompt`` with its shape's colour swapped for one that is neither the shape's nor the background's."""
    p = scenes.parse_prompt(prompt)
    colour = next(c for c in ("blue", "red", "green", "yellow") if c not in (p.colour, p.background))
    return prompt.replace(f" {p.colour} {p.shape}", f" {colour} {p.shape}"), colour


def colour_swaps(
    pipe: Any, model: str, prompts: Sequence[str], settings: dict[str, Any] = DEFAULT_SWAP, naive: bool = True
) -> list[dict]:
    """Per prompt: shape-mask IoU source vs edit (and vs the naive baseline), the colour read, place/background kept."""
    rows = []
    for i, prompt in enumerate(prompts):
        target, colour = colour_target(prompt)
        shape = scenes.parse_prompt(prompt).shape
        src, edt = (read(im) for im in pair(pipe, model, prompt, target, i, *swap_edits(settings, [shape])))
        row = dict(prompt=prompt, iou=iou(src.mask, edt.mask), colour=edt.colour == colour)
        row.update({f"{k}_kept": v for k, v in _kept(src, edt).items() if k != "colour"})
        row["shape_kept"] = edt.shape == src.shape
        if naive:
            nv = read(plain(pipe, model, target, i))
            row.update(naive_iou=iou(src.mask, nv.mask), naive_colour=nv.colour == colour)
        rows.append(row)
    return rows


def kind_swaps(
    pipe: Any, model: str, prompts: Sequence[str], settings: dict[str, Any] = DEFAULT_SWAP, naive: bool = True
) -> list[dict]:
    """Per prompt: circle→square, square→triangle, triangle→circle; the target kind read and place, colour and
    background kept (the edit's and the naive baseline's, each against the source image)."""
    rows = []
    for i, prompt in enumerate(prompts):
        kind = scenes.parse_prompt(prompt).shape
        new = KIND_SWAPS[kind]
        target = prompt.replace(f" {kind} ", f" {new} ")
        src, edt = (
            read(im) for im in pair(pipe, model, prompt, target, i, *swap_edits(settings, [kind, new]))
        )
        row = dict(prompt=prompt, swap=f"{kind}→{new}", source_kind=src.shape == kind, kind=edt.shape == new)
        row.update({f"{k}_kept": v for k, v in _kept(src, edt).items()})
        if naive:
            nv = read(plain(pipe, model, target, i))
            row["naive_kind"] = nv.shape == new
            row.update({f"naive_{k}_kept": v for k, v in _kept(src, nv).items()})
        rows.append(row)
    return rows


def ablations(
    pipe: Any,
    model: str,
    prompts: Sequence[str],
    which: str = "shape",
    variants: Sequence[str] = ("attention", "causal"),
    naive: bool = True,
) -> list[dict]:
    """Per prompt, ablating the shape word (``which="shape"``), the background's colour word ("background") or the
    word "background" ("background noun"):
    the word's cross-attention zeroed (``attention``), and also removed from the text encoders' context
    (``causal``, :class:`CausalAblation`); the naive baseline regenerates the prompt with the word deleted.
    Reports the edited shape's area / the source's, its mask IoU with the source's, and whether the kind stayed.
    ``variants`` and ``naive`` choose what is run (a test holding one figure runs only that)."""
    rows = []
    for i, prompt in enumerate(prompts):
        p = scenes.parse_prompt(prompt)
        word = {"shape": p.shape, "background": p.background, "background noun": "background"}[which]
        deleted = " ".join(w for w in prompt.split() if w != word)
        row: dict[str, Any] = dict(prompt=prompt, word=word)
        src = None
        for name, causal in (("attention", False), ("causal", True)):
            if name not in variants:
                continue
            images = pair(
                pipe,
                model,
                prompt,
                prompt,
                i,
                Reweight({word: 0.0}, images=[1]),
                ablate=[word] if causal else None,
            )
            src, edt = read(images[0]), read(images[1])
            row[f"{name}_area"] = float(edt.mask.sum() / max(src.mask.sum(), 1))
            row[f"{name}_iou"] = iou(src.mask, edt.mask)
            row[f"{name}_kind_kept"] = edt.shape == src.shape
            row[f"{name}_colour_kept"] = edt.colour == src.colour
        assert src is not None
        if not naive:
            rows.append(row)
            continue
        nv = read(plain(pipe, model, deleted, i))
        row.update(
            naive_area=float(nv.mask.sum() / max(src.mask.sum(), 1)),
            naive_iou=iou(src.mask, nv.mask),
            naive_kind_kept=nv.shape == src.shape,
            causal_kind_as_naive=(edt.shape == nv.shape) if "causal" in variants else None,  # edt: causal
        )
        if which == "shape":  # no prompt makes an empty scene: the empty prompt's shape, for scale
            row["empty_prompt_area"] = float(
                read(plain(pipe, model, "", i)).mask.sum() / max(src.mask.sum(), 1)
            )
        rows.append(row)
    return rows


def cost(pipe: Any, model: str, pairs: int = 5) -> dict[str, dict]:
    """Median (and its interval) of paired interleaved CPU-time ratios to one plain generation: a P2P word swap
    (two branches in one batch), and the same batch with the shape word causally ablated in the second."""
    prompt = EVAL[0]
    target, _ = colour_target(prompt)
    shape = scenes.parse_prompt(prompt).shape
    variants: dict[str, Callable[[], dict[str, float]]] = {
        "p2p word swap": process_clock(lambda: pair(pipe, model, prompt, target, 0, WordSwap(0.8, 0.4))),
        "causal ablation": process_clock(
            lambda: pair(pipe, model, prompt, prompt, 0, Reweight({shape: 0.0}, images=[1]), ablate=[shape])
        ),
    }
    series = run_pairs(process_clock(lambda: plain(pipe, model, prompt, 0)), variants, pairs=pairs)
    out = {}
    for name, s in series.items():
        m = median_interval(s.ratios())
        out[name] = dict(
            median=m.median,
            lo=m.lo,
            hi=m.hi,
            coverage=m.coverage,
            n=m.n,
            plain_s=statistics.median(p["time"] for p in s.plain),
        )
    return out


def summary(rows: list[dict]) -> dict[str, float]:
    """Mean of every numeric or boolean field over the rows (booleans: the fraction true)."""
    keys = [k for k, v in rows[0].items() if isinstance(v, (bool, int, float))]
    return {k: float(np.mean([float(r[k]) for r in rows])) for k in keys}


#: The colour-swap settings tried on TUNING (cross, self, local-blend threshold of the shape word or None).
COLOUR_GRID = [
    dict(cross_replace=c, self_replace=s, blend_threshold=b)
    for c, s in ((0.8, 0.4), (1.0, 0.6), (1.0, 1.0))
    for b in (None, 0.6, 0.8)
]
#: The kind-swap settings tried on TUNING (a new kind needs the source's maps for fewer steps).
KIND_GRID = [
    dict(cross_replace=c, self_replace=s, blend_threshold=None) for c in (0.8, 0.5, 0.2) for s in (0.4, 0.2)
]


def tune(pipe: Any, model: str, what: str) -> list[dict]:
    """Means over :data:`TUNING` of each setting of :data:`COLOUR_GRID` (``what="colour"``) or
    :data:`KIND_GRID` ("kinds")."""
    out = []
    grid, fn = (COLOUR_GRID, colour_swaps) if what == "colour" else (KIND_GRID, kind_swaps)
    if model == "mmdit":  # SD3: self_replace has no effect; no local blend on its joint attention here
        seen = {}
        for g in grid:
            if g["blend_threshold"] is None:
                seen.setdefault(g["cross_replace"], dict(g, self_replace=0.0))
        grid = list(seen.values())
    for settings in grid:
        rows = fn(pipe, model, TUNING, settings, naive=False)
        out.append(dict(settings, **summary(rows)))
        print(model, what, json.dumps(out[-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=[*MODELS, "both"], default="both")
    ap.add_argument(
        "--only",
        nargs="*",
        default=["colour", "kinds", "ablation", "background", "background noun", "cost"],
        choices=["colour", "kinds", "ablation", "background", "background noun", "cost"],
    )
    ap.add_argument("--prompts", type=int, default=len(EVAL), help="the first N of EVAL")
    ap.add_argument("--pairs", type=int, default=5, help="timing pairs")
    ap.add_argument(
        "--tune", nargs="*", default=[], choices=["colour", "kinds"], help="settings grids on TUNING"
    )
    ap.add_argument("--colour", default=None, help="colour-swap settings as JSON: '{\"cross_replace\": 1.0}'")
    ap.add_argument("--kinds", default=None, help="kind-swap settings as JSON")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    colour_settings = {**DEFAULT_SWAP, **(json.loads(args.colour) if args.colour else {})}
    kind_settings = {**DEFAULT_SWAP, **(json.loads(args.kinds) if args.kinds else {})}
    prompts = EVAL[: args.prompts]
    results: dict[str, Any] = {"colour": colour_settings, "kinds": kind_settings, "prompts": prompts}
    for model in MODELS if args.model == "both" else [args.model]:
        pipe = load(model)
        res: dict[str, Any] = {}
        t0 = time.time()
        for what in args.tune:
            res[f"tune_{what}"] = tune(pipe, model, what)
        for fig, fn, arg in (
            ("colour", colour_swaps, colour_settings),
            ("kinds", kind_swaps, kind_settings),
            ("ablation", ablations, "shape"),
            ("background", ablations, "background"),
            ("background noun", ablations, "background noun"),
        ):
            if fig in args.only:
                rows = fn(pipe, model, prompts, arg)
                res[fig] = dict(rows=rows, mean=summary(rows))
                print(model, fig, json.dumps(res[fig]["mean"], indent=None), flush=True)
        if "cost" in args.only:
            res["cost"] = cost(pipe, model, args.pairs)
            print(model, "cost", json.dumps(res["cost"]), flush=True)
        res["seconds"] = time.time() - t0
        results[model] = res
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
