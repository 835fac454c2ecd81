"""``sdexplore sweep`` and ``sdexplore sweep-report``: prompts x seeds into a resumable folder, and its summary.

The sweep engine is :mod:`sdexplore.sweeps`; this module only parses, checks and calls it."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from ._common import _common_options, _generation_options, _seed, _start_page, _whole, resolve_scheduler
from .output import InputError, _one_line

_SWEEP_EPILOG = """\
PROMPTS is a text file (one prompt per line; # comments), a CSV file with a header (prompt, and optionally
seed, negative_prompt, words separated by ';') or a JSONL file ({"prompt": ..., "seed": ..., "words": [...]}).
A row's own seed replaces --seeds; its own words replace --words.

writes into --out:
  sweep.json           the settings (a rerun must match them) and the package versions
  items/NNNNNN/        one folder per item, written atomically: image.png, maps.safetensors (one map per word),
                       steps.json (per-step summaries), scene.json (embedded model: the scorer's reading, IoU),
                       manifest.json (every file's SHA-256)
  index.jsonl          one line per item: status and figures (pandas.read_json(path, lines=True))
and with --html PAGE, beside it: the sweep's gallery (as sweep-report --html writes it)

Rerun the same command to resume: complete items are skipped, missing or corrupt ones redone.

examples:
  sdexplore sweep prompts.txt --seeds 0 1 2 --out sweep1
  sdexplore sweep prompts.csv --keep images,maps --words circle square --out sweep2
  torchrun --nproc_per_node 2 -m sdexplore sweep prompts.txt --out sweep1          # 2 CPU processes
  accelerate launch --multi_gpu --num_processes 4 -m sdexplore sweep prompts.jsonl --out sweep3
  sdexplore sweep-report sweep1
  sdexplore sweep-report sweep1 --html sweep1.html     # every picture, filtered by prompt, seed and word
"""

_REPORT_EPILOG = """\
writes into --out (default DIR/report): summary.md, summary.json, word_maps.png, iou.png (where the scene gives
ground truth), scene_parts.png (embedded model), slowest.png.

With --html PAGE also the sweep's gallery: one self-contained page of every finished item's picture, with
filters by prompt, seed and word (the word's attention map over each picture, where the sweep kept maps); no
network, it opens from file://.

examples:
  sdexplore sweep-report sweep1
  sdexplore sweep-report sweep1 --html sweep1.html
"""


def add_parser(sub: Any) -> None:
    """Add ``sweep`` and ``sweep-report`` to the ``sdexplore`` subparsers ``sub``."""
    fmt = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser(
        "sweep",
        parents=[_common_options(), _generation_options()],
        help="prompts x seeds with observation on, into a resumable folder (accelerate for several processes)",
        description="Generate every prompt x seed of a prompt file with attention and steps observed; each item's "
        "image, word maps and step summaries go into --out, resumable, sharded over accelerate's processes.",
        epilog=_SWEEP_EPILOG,
        formatter_class=fmt,
    )
    s.add_argument("prompts", metavar="PROMPTS", help="prompt file: .txt, .csv or .jsonl")
    s.add_argument(
        "--seeds", type=_seed, nargs="+", default=[0], metavar="S", help="seeds of every prompt (default 0)"
    )
    s.add_argument("--out", required=True, metavar="DIR", help="the sweep folder (created, or resumed)")
    s.add_argument(
        "--keep",
        default="images,maps,trace-summary",
        metavar="WHAT",
        help="comma-separated: images, maps, trace-summary (default all three)",
    )
    s.add_argument(
        "--words", nargs="+", metavar="WORD", help="words whose maps are kept (default every word)"
    )
    s.add_argument(
        "--batch-size",
        type=_whole(1, 1024),
        default=1,
        metavar="N",
        help="images per pipeline call (default 1)",
    )
    s.add_argument(
        "--html",
        metavar="PAGE",
        help="when the sweep is done, also write its gallery: every picture, filtered by prompt, seed and word, as "
        "one self-contained HTML page (.html; no network, opens from file://)",
    )
    s.add_argument("--force", action="store_true", help="replace an existing --html page")
    s.set_defaults(run=_cmd_sweep)
    r = sub.add_parser(
        "sweep-report",
        help="summary table and figures of a sweep folder",
        description="Summarise a sweep folder: a table and PNG figures.",
        epilog=_REPORT_EPILOG,
        formatter_class=fmt,
    )
    r.add_argument("folder", metavar="DIR", help="a folder written by `sdexplore sweep`")
    r.add_argument("--out", metavar="PATH", help="where the report goes (default DIR/report)")
    r.add_argument(
        "--html",
        metavar="PAGE",
        help="also write the gallery: every picture, filtered by prompt, seed and word, as one self-contained "
        "HTML page (.html; no network, opens from file://)",
    )
    r.add_argument("--force", action="store_true", help="replace an existing --html page")
    r.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    r.set_defaults(run=_cmd_report)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ..errors import InvalidArgumentError
    from ..sweeps.folder import check_writable
    from ..sweeps.run import sweep

    try:  # bad input, exit 2 with a sentence, as the other commands' --out (not a bare errno, exit 1)
        check_writable(Path(args.out).expanduser())
    except InvalidArgumentError as e:
        raise InputError(_one_line(e)) from e
    page = _start_page(args)  # checked before any work: a name ending in .html, not there unless --force

    result = sweep(
        args.prompts,
        args.out,
        seeds=args.seeds,
        model=args.model,
        keep=args.keep,
        words=args.words,
        steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative,
        scheduler=resolve_scheduler(args.scheduler),
        height=args.height,
        width=args.width,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    if result.index is not None:  # the main process (one of several under accelerate or torchrun)
        print(result)
        if page is not None:
            from ..views.gallery import save_gallery

            with page:
                save_gallery(args.out, page.path)
                page.commit()
            print(f"wrote {page.shown}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ..errors import InvalidArgumentError
    from ..sweeps.folder import check_writable
    from ..sweeps.report import sweep_report

    if args.out is not None:
        try:
            check_writable(Path(args.out).expanduser())
        except InvalidArgumentError as e:
            raise InputError(_one_line(e)) from e
    page = _start_page(args)  # checked before any work: a name ending in .html, not there unless --force

    with page or contextlib.nullcontext():
        report = sweep_report(args.folder, args.out)
        if page is not None:
            from ..views.gallery import save_gallery

            save_gallery(args.folder, page.path)
            page.commit()
    print(report.markdown)
    for path in report.figures.values():
        print(f"wrote {path}")
    if page is not None:
        print(f"wrote {page.shown}")
    return 0
