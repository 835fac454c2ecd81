"""DirectionExplorer as the front end's directions.js: its payload (every direction's frames and strengths, as
Direction.walk made them), its anywidget view, and the page in Chromium (each direction's slider paints that
direction's frame at the strength it picks, offline)."""

from __future__ import annotations

import pytest
import torch

from sdexplore import directions as D
from sdexplore.errors import InvalidArgumentError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.views import pages
from sdexplore.views import payload as pl
from sdexplore.views.widgets import DirectionExplorer
from sdexplore.views.widgets._web import widget_esm

PAIR = ("a red circle at the left", "a blue circle at the left")
KW = {"num_inference_steps": 3, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def walks():
    torch.set_num_threads(1)
    pipe = tiny_pipeline("sd1")
    d = D.from_pairs(pipe, [PAIR])
    return {
        "colour": d.walk(pipe, "a red square at the top", frames=3, **KW),
        "twice": d.walk(pipe, "a red square at the top", frames=5, strength=2.0, **KW),
    }


def test_payload_holds_every_directions_frames_and_strengths(walks):
    ex = DirectionExplorer(walks, static=False)
    rows = ex.payload()["directions"]["rows"]
    assert [r["name"] for r in rows] == ["colour", "twice"]
    for row, (name, w) in zip(rows, walks.items(), strict=True):
        assert row["strengths"] == [float(s) for s in w.settings["strengths"]]
        assert row["strengths"][row["start"]] == min(row["strengths"], key=abs)  # opens at strength 0
        for image, frame in zip(row["images"], w.images, strict=True):
            assert (pl.decode_image(image) == frame).all(), f"{name}: the page's picture is not the frame"
    view = ex.widget
    assert view._esm == widget_esm("directions") and "sdx-view-directions" in view._dom_classes
    assert view.payload == ex.payload()
    assert (
        "directions.js" in view._esm and pages.web_file("directions.js").split("import {", 1)[0] in view._esm
    )


def test_static_fallback_and_refusals_stay(walks, tmp_path):
    fig = DirectionExplorer(walks, static=True).figure()
    assert len(fig.axes) == 2 * 5
    frame = DirectionExplorer(walks).frame("twice", 2.0)
    assert (frame == walks["twice"].images[-1]).all()
    with pytest.raises(InvalidArgumentError):
        DirectionExplorer({})
    html = DirectionExplorer(walks, static=True).embed_page(folder=tmp_path)
    assert html is not None and "<iframe" in html and len(list(tmp_path.glob("*.html"))) == 1


@pytest.mark.browser
@pytest.mark.slow
def test_directions_page_each_slider_paints_its_frame(walks, tmp_path):
    """Offline in Chromium: moving a direction's slider paints that direction's frame at the picked strength."""
    from test_pages_browser import CHROMIUM, CHROMIUM_ARGS, Opened

    if CHROMIUM is None:
        pytest.skip("environment: no Chromium on this machine (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    payload = DirectionExplorer(walks, static=True).payload()
    path = pages.write_page(tmp_path / "directions.html", payload, ["directions"])
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = Opened(browser, path)
            assert page.state == "ok" and not page.errors
            row = '.sdx-direction[data-direction="twice"]'
            canvas = f"{row} canvas.sdx-direction-image"
            other = page.digest('.sdx-direction[data-direction="colour"] canvas')
            page.moves(canvas, lambda: page.key(f"{row} .sdx-direction-slider", "End"))
            shown = page.pixels(canvas)
            frame = walks["twice"].images[-1]  # the strongest frame, enlarged by a whole factor
            k = shown.shape[0] // frame.shape[0]
            assert (shown[::k, ::k] == frame).all()
            assert (
                page.digest('.sdx-direction[data-direction="colour"] canvas') == other
            )  # the other row stays
            assert "+2.00" in page.page.locator(f"{row} .sdx-direction-strength").inner_text()
            assert page.requests == [] and page.errors == []
        finally:
            browser.close()
