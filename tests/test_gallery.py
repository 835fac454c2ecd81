"""The sweep gallery (sdexplore.views.gallery): its payload holds every finished item's picture and word maps as
the sweep wrote them, and the page works in Chromium from file:// with no request: the prompt and seed filters
show exactly the matching pictures, a word paints its map over them."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

from sdexplore.errors import InvalidArgumentError
from sdexplore.views import gallery, pages
from sdexplore.views import payload as pl

PROMPTS = [
    "a big red circle at the top left on a blue background",
    "a small green square at the bottom right on a white background",
]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory):
    """2 prompts × 2 seeds of the embedded model (3 steps), and one item left unfinished (its folder removed)."""
    from sdexplore.sweeps.run import sweep

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sweep") / "sw"
    sweep(PROMPTS, out, seeds=[0, 1, 2], steps=3, progress=False)
    shutil.rmtree(out / "items" / "000005")  # as if stopped before the last item
    return out


def test_the_payload_holds_each_finished_items_picture_and_maps(sweep_folder):
    from safetensors.torch import load_file

    p = gallery.gallery_payload(sweep_folder)
    g = p["gallery"]
    assert (
        p["kind"] == "gallery" and g["planned"] == 6 and len(g["items"]) == 5
    )  # the unfinished one left out
    assert [(it["prompt"], it["seed"]) for it in g["items"]] == [
        (PROMPTS[0], 0), (PROMPTS[0], 1), (PROMPTS[0], 2), (PROMPTS[1], 0), (PROMPTS[1], 1)
    ]  # fmt: skip
    for it in g["items"]:
        folder = sweep_folder / "items" / f"{it['item']:06d}"
        want = np.asarray(Image.open(folder / "image.png").convert("RGB"))
        assert np.array_equal(pl.decode_image(it["image"]), want)  # lossless
        maps = load_file(folder / "maps.safetensors")
        assert set(it["maps"]) == set(maps)
        for word, m in maps.items():
            got = pl.dequantize_maps(it["maps"][word])
            assert np.abs(got - m.numpy()).max() <= (m.max() - m.min()).item() / 500
    assert {"circle", "square", "white"} <= set(g["words"])
    assert "iou" in g["figures"] and all("iou" in it["figures"] for it in g["items"])  # the scene scorer's


def test_the_page_round_trips_and_a_folder_that_is_no_sweep_is_refused(sweep_folder, tmp_path):
    page = gallery.save_gallery(sweep_folder, tmp_path / "g.html")
    assert pages.read_payload(page)["gallery"]["items"][0]["prompt"] == PROMPTS[0]  # the checksum verifies
    assert (
        "<script src" not in page.read_text() and "http" not in page.read_text().split("<script", 1)[1][:200]
    )
    with pytest.raises(InvalidArgumentError, match="not a sweep folder"):
        gallery.gallery_payload(tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"\.html"):
        gallery.save_gallery(sweep_folder, tmp_path / "g.png")


@pytest.mark.browser
@pytest.mark.slow
def test_the_filters_work_offline_in_chromium(sweep_folder, tmp_path):
    if CHROMIUM is None:
        pytest.skip("environment: no Chromium on this machine (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    page_path = gallery.save_gallery(sweep_folder, tmp_path / "g.html")
    requests, errors = [], []
    digest = (
        "(c) => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let h = 2166136261; "
        "for (let i = 0; i < d.length; i++) { h ^= d[i]; h = Math.imul(h, 16777619) >>> 0; } return h; }"
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, args=load_script("docs_screenshots").CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page()
            page.route(
                "**/*",
                lambda r: (
                    r.continue_()
                    if r.request.url.startswith("file://")
                    else (requests.append(r.request.url), r.abort())
                ),
            )
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_path.as_uri())
            page.wait_for_function("() => window.sdexplore && window.sdexplore.ready")
            assert page.evaluate("async () => (await window.sdexplore.ready).error || 'ok'") == "ok"

            def shown():
                return page.evaluate(
                    "() => [...document.querySelectorAll('.sdx-gallery-card')]"
                    ".filter((c) => c.style.display !== 'none').map((c) => Number(c.dataset.item))"
                )

            assert shown() == [0, 1, 2, 3, 4]
            page.select_option(".sdx-filter-prompt", PROMPTS[1])
            assert shown() == [3, 4]
            page.select_option(".sdx-filter-seed", "1")
            assert shown() == [4]
            page.select_option(".sdx-filter-prompt", "")
            assert shown() == [1, 4]
            card = ".sdx-gallery-card[data-item='4'] canvas"
            before = page.locator(card).evaluate(digest)
            picture = np.asarray(
                Image.open(io.BytesIO(page.locator(card).screenshot())).convert("RGB"), dtype=np.int16
            )
            page.select_option(".sdx-filter-word", "square")
            assert shown() == [4]  # the words of the other prompt's seed-1 picture hold no "square"
            assert page.locator(card).evaluate(digest) != before  # the map is painted over the picture
            heat = np.asarray(
                Image.open(io.BytesIO(page.locator(card).screenshot())).convert("RGB"), np.int16
            )
            assert np.abs(heat - picture).mean() > 10
            assert "square" in page.locator(".sdx-gallery-count").text_content()
            page.screenshot(path=str(tmp_path / "gallery.png"), full_page=True)
        finally:
            browser.close()
    assert requests == [] and errors == []
