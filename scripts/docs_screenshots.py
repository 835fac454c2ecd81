"""Screenshot two pages of a built documentation site (the gallery and a tutorial) with headless Chromium.

``python scripts/docs_screenshots.py SITE_DIR OUT_DIR`` serves SITE_DIR on 127.0.0.1 and writes
``gallery.png`` and ``tutorial_attention.png`` (palette PNGs, a few hundred KiB) into OUT_DIR. Needs Debian's
``chromium`` and the ``playwright`` package (never ``playwright install``), as ``tests/test_browser.py`` does.
"""

from __future__ import annotations

import functools
import http.server
import shutil
import sys
import threading
from pathlib import Path

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
#: (output name, page, element at the top of the picture or None, its height in CSS pixels or None: whole page)
SHOTS = [
    ("gallery.png", "generated/gallery/gallery/", None, None),
    ("tutorial_attention.png", "generated/tutorials/03_attention/", "#cell-id\\=03-04", 1760),
]
WIDTH = 1440


def _shrink(path: Path) -> None:
    """Re-save as a 256-colour PNG: the pages are flat colours and text, so this loses little and is small."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(
            colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
        )
    tmp = path.with_name(f".{path.name}.tmp.png")
    small.save(tmp, optimize=True)
    tmp.replace(path)


def take(site: Path, out: Path) -> list[Path]:
    """Serve ``site``, open each page of ``SHOTS``, write the screenshots into ``out``; returns their paths."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": WIDTH, "height": 900})
            for name, rel, anchor, height in SHOTS:
                page.goto(base + rel, wait_until="networkidle")
                top = 0.0
                if anchor:
                    top = page.eval_on_selector(anchor, "e => e.getBoundingClientRect().top + window.scrollY")
                if height is None:
                    height = page.evaluate("document.documentElement.scrollHeight") - top
                path = out / name
                page.screenshot(
                    path=str(path), full_page=True, clip={"x": 0, "y": top, "width": WIDTH, "height": height}
                )
                _shrink(path)
                written.append(path)
            browser.close()
    finally:
        server.shutdown()
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: the site folder and the output folder."""
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print("usage: docs_screenshots.py SITE_DIR OUT_DIR", file=sys.stderr)
        return 2
    for path in take(Path(args[0]), Path(args[1])):
        print(path, f"{path.stat().st_size / 1024:.0f} KiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
