"""Where does the embedded model decide the layout? Its predicted clean image x0, step by step.

Generates the 9 places of one prompt template (a few seeds each, 25 DDIM steps, CFG 7.5) inside
``sdexplore.observe`` recording x0 at every step, decodes x0, and finds where it departs from its own
median colour (the weighted centroid of the colour difference). A model that has learned place puts that departure
in the prompt's 3×3 cell from the first steps on (at t = 999, with zero terminal SNR, x0 is the model's mean
picture for the prompt); one that has not draws a background only at first and lets the shape grow wherever the
noise starts one, and place is at chance in the final images. Prints the fraction of places right per step and
writes a PNG (rows: a few steps, then the final image; columns: places; first seed). The code is
:mod:`sdexplore.embedded.layout`; this is its command line.

    python scripts/diagnose_layout.py [model folder] --out runs/layout.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sdexplore.embedded.layout import departure_place, layout_probe
from sdexplore.embedded.model import EMBEDDED_MODEL_DIR

REPO = Path(__file__).resolve().parents[1]
_departure_place = departure_place  # its name in tests/test_embedded_model.py


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`layout_probe`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default=str(EMBEDDED_MODEL_DIR))
    parser.add_argument("--template", default="a big red circle at the {place} on a white background")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "runs" / "layout.png"))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from PIL import Image

    from sdexplore.embedded.evaluate import load

    right, grid = layout_probe(load(Path(args.model)), args.template, seeds=args.seeds)
    for i, frac in enumerate(right[:-1]):
        print(f"step {i:2d}: place right in x0 for {100 * frac:3.0f}% (chance 11%)")
    print(f"final image: place right for {100 * right[-1]:.0f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
