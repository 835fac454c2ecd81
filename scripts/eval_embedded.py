"""Evaluate the embedded tiny-shapes model and write its model card.

Generates the held-out validation prompts (:func:`sdexplore.embedded.scenes.validation_prompts`, seed i for
prompt i, 25 steps of the saved DDIM scheduler, the recommended CFG scale; also diffusers' default 7.5 for the
card), reads each image back with the world's scorer, and measures how well the shape word's cross-attention
sits on the generated shape (IoU). Also measures VAE reconstruction PSNR, CPU seconds per image and the weights'
size, then writes ``MODEL_CARD.md``, ``eval.json`` and ``sample_grid.png`` into the model folder. The code is
:mod:`sdexplore.embedded.evaluate`; this is its command line.

    python scripts/eval_embedded.py                # full set (216 prompts) on the CPU, writes the card
    python scripts/eval_embedded.py --subset 16 --no-write
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# BARS, evaluate and vae_ceiling: tests/test_embedded_model.py reaches them through this script.
from sdexplore.embedded.card import BARS  # noqa: F401
from sdexplore.embedded.evaluate import (  # noqa: F401
    MODEL_DIR,
    TUNING_SCALES,
    evaluate,
    run_eval,
    tune_guidance,
    vae_ceiling,
)


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`run_eval` and :func:`tune_guidance`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(MODEL_DIR))
    parser.add_argument(
        "--subset", type=int, default=None, help="evaluate only the first N validation prompts"
    )
    parser.add_argument("--no-write", action="store_true", help="print the numbers, write nothing")
    parser.add_argument("--timing-threads", type=int, default=2, help="CPU threads for the speed measurement")
    parser.add_argument(
        "--tune-guidance",
        action="store_true",
        help=f"only score the tuning set at CFG {', '.join(map(str, TUNING_SCALES))} (how GUIDANCE was chosen)",
    )
    parser.add_argument("--device", default="cpu", help="where --tune-guidance generates (cpu, cuda)")
    parser.add_argument(
        "--scales", type=float, nargs="+", default=TUNING_SCALES, help="the CFG scales --tune-guidance tries"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.tune_guidance:
        print(json.dumps(tune_guidance(Path(args.model), tuple(args.scales), device=args.device), indent=1))
        return
    result = run_eval(
        Path(args.model), args.subset, write=not args.no_write, timing_threads=args.timing_threads
    )
    result.pop("rows", None)
    result.pop("grid", None)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
