"""Semantic directions on the embedded models: do directions found from prompt pairs move held-out prompts, keep the
rest, transfer to unseen seeds, and what do they cost; which of the unsupervised directions (PCA, the Jacobian's
singular vectors) the scene reader names.

    python benchmarks/bench_directions.py                   # both models, text and inner: ~15 min on 2 CPU cores
    python benchmarks/bench_directions.py --model unet --space text --json dirs.json
    python benchmarks/bench_directions.py --quick           # a small subset (what tests/test_directions_figures.py runs)

For each model (the UNet ``tiny-shapes``, the SD3-family ``tiny-shapes-mmdit``) and space (text, inner):

- **colour**: pairs ("a red {shape} at the {place}", "a blue …") over the training places; held out: red prompts
  at the other places (target blue), and prompts of the other colours at every place;
- **place**: pairs ("a {colour} {shape} at the left", "… at the right") over the training colours; held out: the
  other colours (target right);
- **size**: pairs ("a small {colour} {shape} at the {place}", "a big …") over training colours and places; held out:
  the others (target: the shape's side grows by more than 3 px).

Each held-out prompt is generated from seeds the inner directions were found on ("seen") and from others
("unseen"), plainly and with the direction at each strength. The scene reader (``sdexplore.embedded.scenes.read_scene``)
reads every image: **turned** = the read attribute is the target; **kept** = the other attributes (place and kind
for colour, colour and kind for place, colour, place and kind for size) read as in the plain image of that prompt and
seed. Cost: process CPU seconds of one generation with a direction applied against the plain call, ABBA pairs
(benchmarks/_paired.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paired import median_interval, process_clock, run_pairs  # noqa: E402

SHAPES = ("circle", "square", "triangle")
TRAIN_PLACES = ("left", "center", "top right", "bottom")
HELD_PLACES = ("top", "right", "bottom left", "top left", "bottom right")
OTHER_COLOURS = ("green", "yellow", "purple", "orange")
TRAIN_COLOURS = ("red", "green", "yellow")
HELD_COLOURS = ("blue", "purple", "orange")
FIND_SEEDS = (0, 1)
UNSEEN_SEEDS = (100, 101)
SIZE_PX = 3.0  # side growth (sqrt of area, pixels) that counts as "bigger"


def tasks(quick: bool) -> dict[str, dict]:
    """Per direction: its pairs, its held-out prompts (each with the plain reading's expected target) and what it
    should turn and keep."""
    shapes = SHAPES[:2] if quick else SHAPES
    held_places = HELD_PLACES[:2] if quick else HELD_PLACES
    others = OTHER_COLOURS[:2] if quick else OTHER_COLOURS
    held_colours = HELD_COLOURS[:2] if quick else HELD_COLOURS
    return {
        "colour": {
            "pairs": [
                (f"a red {s} at the {p}", f"a blue {s} at the {p}") for s in shapes for p in TRAIN_PLACES
            ],
            "held": [f"a red {s} at the {p}" for s in shapes for p in held_places],
            "other": [f"a {c} {s} at the {p}" for c in others for s in shapes[:1] for p in held_places],
            "target": ("colour", "blue"),
            "keep": ("place", "kind"),
        },
        "place": {
            "pairs": [
                (f"a {c} {s} at the left", f"a {c} {s} at the right") for c in TRAIN_COLOURS for s in shapes
            ],
            "held": [f"a {c} {s} at the left" for c in held_colours for s in shapes],
            "other": [],
            "target": ("place", "right"),
            "keep": ("colour", "kind"),
        },
        "size": {
            "pairs": [
                (f"a small {c} {s} at the {p}", f"a big {c} {s} at the {p}")
                for c in TRAIN_COLOURS[:2]
                for s in shapes
                for p in TRAIN_PLACES[:2]
            ],
            "held": [
                f"a small {c} {s} at the {p}" for c in held_colours for s in shapes for p in held_places[:2]
            ],
            "other": [],
            "target": ("size", None),
            "keep": ("colour", "place", "kind"),
        },
    }


def read(images: list[np.ndarray]) -> list[dict]:
    from sdexplore.embedded.scenes import read_scene

    out = []
    for im in images:
        r = read_scene(im)
        out.append({"colour": r.colour, "place": r.place, "kind": r.shape, "size": r.size_px})
    return out


def score(task: dict, plain: list[dict], moved: list[dict]) -> dict[str, float]:
    """Fractions turned and kept (each kept attribute separately, and all of them together)."""
    what, target = task["target"]
    turned, kept = [], {k: [] for k in task["keep"]}
    for a, b in zip(plain, moved, strict=True):
        if what == "size":
            turned.append(b["size"] - a["size"] > SIZE_PX)
        else:
            turned.append(b[what] == target)
        for k in task["keep"]:
            kept[k].append(b[k] == a[k])
    out = {"turned": float(np.mean(turned)), "n": len(turned)}
    for k, v in kept.items():
        out[f"kept_{k}"] = float(np.mean(v))
    out["kept_all"] = float(np.mean([all(kept[k][i] for k in kept) for i in range(len(turned))]))
    return out


def generate(
    pipe, prompts: list[str], seeds: tuple[int, ...], call: dict, direction=None, strength=0.0
) -> list:
    from sdexplore import directions as D

    flat_p = [p for p in prompts for _ in seeds]
    flat_s = [s for _ in prompts for s in seeds]
    if direction is None:
        gens = [torch.Generator().manual_seed(s) for s in flat_s]
        ims = pipe(prompt=flat_p, generator=gens, output_type="np", **call).images
        return [np.clip(np.round(im * 255), 0, 255).astype(np.uint8) for im in ims]
    return D.explore.render(pipe, direction, flat_p, flat_s, strength, **call)


def measure_model(pipe, model: str, spaces: list[str], strengths: list[float], quick: bool) -> dict:
    from sdexplore import directions as D
    from sdexplore.embedded.evaluate import recommended

    steps, cfg = recommended(pipe)
    call = {"num_inference_steps": steps, "guidance_scale": cfg}
    result: dict = {"model": model, "steps": steps, "guidance_scale": cfg, "directions": {}}
    for name, task in tasks(quick).items():
        for space in spaces:
            t0 = time.perf_counter()
            extra = {"seeds": list(FIND_SEEDS), **call} if space == "inner" else {}
            d = D.from_pairs(pipe, task["pairs"], space=space, label=name, **extra)
            found_s = time.perf_counter() - t0
            row: dict = {"pairs": len(task["pairs"]), "find_seconds": round(found_s, 1), "norm": d.norm}
            for seen, seeds in (("seen", FIND_SEEDS), ("unseen", UNSEEN_SEEDS)):
                for which in ("held", "other"):
                    prompts = task[which]
                    if not prompts:
                        continue
                    plain = read(generate(pipe, prompts, seeds, call))
                    for s in strengths:
                        moved = read(generate(pipe, prompts, seeds, call, d, s))
                        row[f"{which}/{seen}/{s:g}"] = score(task, plain, moved)
                        if which == "other":  # for other colours "turned" = the colour changed at all
                            row[f"{which}/{seen}/{s:g}"]["changed"] = float(
                                np.mean(
                                    [a["colour"] != b["colour"] for a, b in zip(plain, moved, strict=True)]
                                )
                            )
            result["directions"][f"{name}/{space}"] = row
            print(json.dumps({"model": model, "direction": f"{name}/{space}", **row}), flush=True)
    return result


def measure_cost(pipe, pairs: int) -> dict:
    """Process CPU seconds of one generation, plain vs with a text and an inner direction, ABBA pairs."""
    from sdexplore import directions as D
    from sdexplore.embedded.evaluate import recommended

    steps, cfg = recommended(pipe)
    call = {"num_inference_steps": steps, "guidance_scale": cfg}
    pair = [("a red circle at the left", "a blue circle at the left")]
    text = D.from_pairs(pipe, pair)
    inner = D.from_pairs(pipe, pair, space="inner", seeds=[0], **call)

    def one():
        pipe("a red square at the top", generator=torch.Generator().manual_seed(0), output_type="np", **call)

    def with_direction(d):
        def run():
            with d.apply(pipe, strength=1.0):
                one()

        return run

    series = run_pairs(
        process_clock(one),
        {"text": process_clock(with_direction(text)), "inner": process_clock(with_direction(inner))},
        pairs=pairs,
    )
    out = {}
    for name, s in series.items():
        m = median_interval(s.ratios())
        out[name] = {"ratio": m.median, "lo": m.lo, "hi": m.hi, "coverage": m.coverage, "pairs": m.n}
    return out


def unsupervised(pipe, quick: bool) -> list[dict]:
    """Top 5 PCA directions of the inner space over mixed prompts and 16 seeds, each named by the scene reader."""
    from sdexplore import directions as D
    from sdexplore.embedded.evaluate import recommended

    steps, cfg = recommended(pipe)
    call = {"num_inference_steps": steps, "guidance_scale": cfg}
    prompts = [
        "a red circle at the left",
        "a big blue square at the top right",
        "a small yellow triangle at the center",
    ]
    comps = D.pca(pipe, prompts, seeds=list(range(4 if quick else 16)), components=5, **call)
    out = []
    for c in comps:
        named = D.name(pipe, c, prompts, seeds=[200, 201], strength=2.0, attention=False, scene=True, **call)
        out.append(
            {"variance_explained": c.variance_explained, "scene": named["scene"], "label": named["label"]}
        )
        print(json.dumps({"pca": out[-1]}), flush=True)
    return out


def jacobian_named(pipe, quick: bool, step: int = 6, strength: float = 1.0) -> dict:
    """Top 5 Jacobian directions (Park et al.) at ``step`` of one prompt's run, each named by the scene reader,
    beside random latent moves of the same size (the floor: what any move of x_t that large changes)."""
    from sdexplore import directions as D
    from sdexplore.embedded.evaluate import recommended

    steps, cfg = recommended(pipe)
    call = {"num_inference_steps": steps, "guidance_scale": cfg}
    prompts = [
        "a red circle at the left",
        "a big blue square at the top right",
        "a small yellow triangle at the center",
    ]
    seeds = [0, 200] if quick else [0, 200, 201]
    comps = D.jacobian(pipe, prompts[0], step=step, k=5, iterations=10, **call)
    gen = torch.Generator().manual_seed(123)
    randoms = []
    for _ in range(1 if quick else 2):
        r = torch.randn(comps[0].shift.shape, generator=gen)  # (C, h, w)
        r = r / r.norm() * comps[0].settings["step_size"]
        randoms.append(
            D.Direction(
                space="latent",
                method="jacobian",
                family=comps[0].family,
                shift=r,
                layer=comps[0].layer,
                steps=[step],
            )
        )
    out: dict = {"step": step, "strength": strength, "components": [], "random": []}
    for kind, ds in (("components", comps), ("random", randoms)):
        for d in ds:
            named = D.name(
                pipe, d, prompts, seeds=seeds, strength=strength, attention=False, scene=True, **call
            )
            v = d.shift / d.shift.norm()  # (C, h, w) unit
            dc = float(
                v.mean((1, 2)).square().sum() * v[0].numel()
            )  # share of the vector in per-channel means
            row = {"scene": named["scene"], "label": named["label"], "dc_share": dc}
            if kind == "components":
                row["singular_value"] = d.settings["singular_value"]
            out[kind].append(row)
            print(json.dumps({"jacobian": {kind: row}}), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("unet", "mmdit", "both"), default="both")
    parser.add_argument("--space", choices=("text", "inner", "both"), default="both")
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--pairs", type=int, default=6, help="ABBA timing pairs (0: no timing)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a small subset of prompts")
    parser.add_argument("--no-pca", action="store_true")
    parser.add_argument("--no-jacobian", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    import sdexplore as sdx

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    spaces = ["text", "inner"] if args.space == "both" else [args.space]
    models = {"unet": None, "mmdit": "tiny-shapes-mmdit"}
    chosen = list(models) if args.model == "both" else [args.model]
    results = {}
    for m in chosen:
        pipe = sdx.load_pipeline(models[m])
        pipe.set_progress_bar_config(disable=True)
        r = measure_model(pipe, m, spaces, args.strengths, args.quick)
        if args.pairs:
            r["cost"] = measure_cost(pipe, args.pairs)
            print(json.dumps({"model": m, "cost": r["cost"]}), flush=True)
        if not args.no_pca:
            r["pca"] = unsupervised(pipe, args.quick)
        if not args.no_jacobian:
            r["jacobian"] = jacobian_named(pipe, args.quick)
        results[m] = r
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
