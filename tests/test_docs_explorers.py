"""The docs site's tutorials embed live explorers: each explorer a tutorial shows is its self-contained page in an
``<iframe>`` (written by the executed notebook, ``SDEXPLORE_EMBED_PAGES``), copied into the site, its payload's
checksum intact; opened from disk in Chromium with every network request refused, the framed explorer responds.

Reads the site built once per test session (``docs_site`` in conftest.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import load_script

from sdexplore.views import pages

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
#: tutorial → the explorers (front-end module names) its page must frame, in order of first appearance
FRAMED = {
    "02_step_by_step": ["scrubber"],
    "03_attention": ["attention"],
    "04_interpolation": ["interpolation"],
    "05_latent_walks": ["walk"],
    "06_your_own_image": ["scrubber", "attention"],
    "07_edit_by_attention": ["edit"],
    "08_directions": ["directions"],
}
IFRAME = re.compile(r'<iframe class="sdx-embed" src="([^"]+)"')


def _frames(site: Path, tutorial: str) -> list[Path]:
    page = site / "generated" / "tutorials" / f"{tutorial}.html"
    return [(page.parent / src).resolve() for src in IFRAME.findall(page.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("tutorial", list(FRAMED))
def test_each_tutorial_frames_its_explorers_pages_with_their_payloads(docs_site, tutorial):
    frames = _frames(docs_site, tutorial)
    kinds = list(dict.fromkeys(f.name.split("-")[0] for f in frames))
    assert kinds == FRAMED[tutorial], f"{tutorial}: framed {kinds}"
    for frame in frames:
        assert frame.is_file() and docs_site in frame.parents, f"{tutorial}: {frame} is not in the site"
        text = frame.read_text(encoding="utf-8")
        payload = pages.read_payload(text)  # ResultFileError if the checksum does not verify
        name = frame.name.split("-")[0]
        block = {
            "scrubber": "steps",
            "attention": "attention",
            "interpolation": "walk",
            "walk": "walk",
            "edit": "edit",
            "directions": "directions",
        }[name]
        assert payload.get(block), f"{frame.name}: no {block} in its payload"
        assert f'data-explorer="{name}"' in text and "<script src" not in text  # one file, no network


def test_a_framed_explorer_responds_on_the_page_opened_from_disk(docs_site):
    if CHROMIUM is None:
        pytest.skip("environment: no Chromium on this machine (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    digest = (
        "(c) => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let h = 2166136261; "
        "for (let i = 0; i < d.length; i++) { h ^= d[i]; h = Math.imul(h, 16777619) >>> 0; } return h; }"
    )
    requests = []
    page_path = docs_site / "generated" / "tutorials" / "02_step_by_step.html"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=load_script("docs_screenshots").CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 1000})
            page.route(
                "**/*",
                lambda r: (
                    r.continue_()
                    if r.request.url.startswith("file://")
                    else (requests.append(r.request.url), r.abort())
                ),
            )
            page.goto(page_path.as_uri())
            frame_el = page.locator("iframe.sdx-embed").first
            frame_el.scroll_into_view_if_needed()
            frame = frame_el.element_handle().content_frame()
            frame.wait_for_function("() => window.sdexplore && window.sdexplore.ready")
            assert frame.evaluate("async () => (await window.sdexplore.ready).error || 'ok'") == "ok"
            x0 = frame.locator("canvas.sdx-panel-x0")
            before = x0.evaluate(digest)
            frame.locator("input.sdx-step-slider").focus()
            page.keyboard.press("Home")  # the first step: the noisiest x0
            frame.wait_for_function(
                f"(b) => ({digest})(document.querySelector('canvas.sdx-panel-x0')) !== b", arg=before
            )
            # the frame took its page's height (it posts it): the whole explorer shows, no inner scroll bar
            need = frame.evaluate("() => Math.ceil(document.body.getBoundingClientRect().bottom)")
            page.wait_for_function(
                "(n) => document.querySelector('iframe.sdx-embed').getBoundingClientRect().height >= n",
                arg=need,
            )
        finally:
            browser.close()
    assert requests == []  # the tutorial page and its explorer load nothing from the network
