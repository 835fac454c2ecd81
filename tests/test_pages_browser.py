"""Self-contained pages in a real browser: Chromium (headless, through Playwright) opens each page from file://
with every other request aborted and counted (there must be none); moving each control changes the pixels of the
canvas it drives; the heat map's colours are those of the Python views; a damaged payload shows an error box.

Screenshots go to ``$SDEXPLORE_SCREENSHOTS`` (default: the test's temp folder).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from PIL import Image

import sdexplore
from sdexplore.views import pages
from sdexplore.views import payload as pl

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_ARGS = load_script("docs_screenshots").CHROMIUM_ARGS
PROMPT = "a big red circle at the top left on a blue background"
#: How long a wait may last (a page's first paint on a loaded 2-core box): bounds a hang, never a speed.
PATIENCE_MS = 120_000

# the page-side digest of a canvas's pixels
CANVAS_DIGEST_JS = "(c) => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; " + (
    "let h = 2166136261; for (let i = 0; i < d.length; i++) { h ^= d[i]; h = Math.imul(h, 16777619) >>> 0; } "
    "return h; }"
)


@pytest.fixture(scope="module")
def results():
    """The embedded model's observation (8 steps keep the browser's work small) and a short walk."""
    torch.set_num_threads(1)
    pipe = sdexplore.load_pipeline()
    with sdexplore.observe(pipe, attention=True) as obs:
        image = pipe(PROMPT, num_inference_steps=8, generator=torch.Generator().manual_seed(0)).images[0]
    w = sdexplore.walk(
        pipe,
        [PROMPT, "a big yellow square at the bottom right on a purple background"],
        seeds=[0, 1],
        frames=5,
        num_inference_steps=4,
        progress=False,
    )
    return obs, image, w


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("environment: no Chromium on this machine (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Opened:
    """A page opened from file:// with every non-file request aborted and counted, and its errors collected."""

    def __init__(self, browser, path: Path, *, page_of_sdexplore: bool = True):
        self.page = browser.new_page(viewport={"width": 1300, "height": 1400})
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.route("**/*", self._route)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.goto(path.as_uri())
        self.state = "ok"
        if not page_of_sdexplore:
            return
        self.page.wait_for_function("() => window.sdexplore && window.sdexplore.ready", timeout=PATIENCE_MS)
        self.state = self.page.evaluate(
            "async () => { const r = await window.sdexplore.ready; return r.error || 'ok'; }"
        )

    def _route(self, route):
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            self.requests.append(route.request.url)
            route.abort()

    def digest(self, selector: str) -> int:
        return self.page.locator(selector).first.evaluate(CANVAS_DIGEST_JS)

    def pixels(self, selector: str) -> np.ndarray:
        url = self.page.locator(selector).first.evaluate("(c) => c.toDataURL('image/png')")
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))

    def moves(self, canvas: str, act) -> None:
        """``act()`` changes the pixels of ``canvas``."""
        before = self.digest(canvas)
        act()
        self.page.wait_for_function(
            f"(b) => ({CANVAS_DIGEST_JS})(document.querySelector({json.dumps(canvas)})) !== b",
            arg=before,
            timeout=PATIENCE_MS,
        )

    def key(self, selector: str, key: str, times: int = 1) -> None:
        self.page.locator(selector).first.focus()
        for _ in range(times):
            self.page.keyboard.press(key)

    def close(self) -> None:
        self.page.close()


def _shots() -> Path:
    out = Path(os.environ.get("SDEXPLORE_SCREENSHOTS", "/tmp/sdexplore-page-shots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def _one_colour(a: np.ndarray) -> bool:
    return len(np.unique(a.reshape(-1, 3), axis=0)) <= 1


def test_observation_page_offline_every_control_changes_the_picture(results, browser, tmp_path):
    obs, image, _ = results
    path = obs.save_html(tmp_path / "run.html", image=image, model="tiny-shapes", seed=0)
    page = Opened(browser, path)
    try:
        assert page.state == "ok" and page.page.locator(".sdx-error").count() == 0
        x0, noisy, heat = ".sdx-panel-x0", ".sdx-panel-noisy", ".sdx-attention-image"
        for c in (x0, noisy, heat):
            assert not _one_colour(page.pixels(c)), f"{c} is one colour"
        page.page.screenshot(path=str(_shots() / "page_observation.png"), full_page=True)
        # the scrubber: it opens on the last step; step back with the keyboard, then play
        assert "step 8 / 8" in page.page.locator(".sdx-scrubber .sdx-info").inner_text()
        page.moves(x0, lambda: page.key(".sdx-step-slider", "ArrowLeft", 4))
        assert "step 4 / 8" in page.page.locator(".sdx-scrubber .sdx-info").inner_text()
        page.moves(noisy, lambda: page.page.locator(".sdx-scrubber .sdx-play").click())
        page.page.locator(".sdx-scrubber .sdx-play").click()  # pause
        # the attention view: a word, the opacity, the step range, a layer, every token
        page.moves(heat, lambda: page.page.locator(".sdx-chip", has_text="circle").click())
        assert "“circle”" in page.page.locator(".sdx-attention .sdx-caption").inner_text()
        page.moves(heat, lambda: page.key(".sdx-opacity", "ArrowRight", 4))
        page.moves(heat, lambda: page.key(".sdx-step-from", "ArrowRight", 5))
        assert "steps 6–8" in page.page.locator(".sdx-attention .sdx-caption").inner_text()
        page.moves(
            heat,
            lambda: page.page.select_option(
                ".sdx-layer", "mid_block.attentions.0.transformer_blocks.0.attn2"
            ),
        )
        assert page.page.locator(".sdx-note").inner_text().startswith("The step range applies")
        page.page.select_option(".sdx-token-mode", "tokens")
        assert page.page.locator(".sdx-chip").count() == 77  # every key position
        page.moves(heat, lambda: page.page.locator(".sdx-chip").nth(0).click())
        page.page.screenshot(path=str(_shots() / "page_observation_after.png"), full_page=True)
        assert page.requests == [] and page.errors == []
    finally:
        page.close()


def test_heat_map_colours_are_the_python_views(results, browser, tmp_path):
    """At opacity 1 the page's heat map of a word is render.heat_overlay's picture (same colour map, same
    bilinear upsampling and min-max), up to the maps' uint8 quantisation."""
    from sdexplore.views.render import heat_overlay

    obs, image, _ = results
    path = obs.save_html(tmp_path / "run.html", image=image)
    page = Opened(browser, path)
    try:
        page.page.locator(".sdx-chip", has_text="circle").click()
        page.page.locator(".sdx-opacity").first.evaluate(
            "(e) => { e.value = 1; e.dispatchEvent(new Event('input')); }"
        )
        got = page.pixels(".sdx-attention-image").astype(int)
        want = heat_overlay(image, obs.attention.word("circle"), opacity=1.0, size=320).astype(int)
        assert got.shape == want.shape == (320, 320, 3)
        diff = np.abs(got - want)
        assert diff.mean() < 2 and np.percentile(diff, 99) <= 24, (diff.mean(), np.percentile(diff, 99))
        assert not _one_colour(got)
    finally:
        page.close()


def test_walk_page_offline_frames_move(results, browser, tmp_path):
    _, _, w = results
    path = w.save_html(tmp_path / "walk.html")
    page = Opened(browser, path)
    try:
        assert page.state == "ok" and page.page.locator(".sdx-error").count() == 0
        player, interp = ".sdx-walk-image", ".sdx-interp-image"
        page.moves(player, lambda: page.key(".sdx-walk-slider", "ArrowRight", 2))
        assert "frame 3 / 5" in page.page.locator(".sdx-walk-player .sdx-info").inner_text()
        page.moves(player, lambda: page.page.locator(".sdx-walk-player .sdx-play").click())
        page.page.locator(".sdx-walk-player .sdx-play").click()
        page.moves(interp, lambda: page.key(".sdx-interpolation-explorer .sdx-frame-slider", "ArrowRight", 4))
        assert not _one_colour(page.pixels(interp))
        page.page.screenshot(path=str(_shots() / "page_walk.png"), full_page=True)
        assert page.requests == [] and page.errors == []
    finally:
        page.close()


def _with_payload(path: Path, change, name: str) -> Path:
    """The page at ``path`` with its payload changed by ``change(payload)`` and a correct checksum."""
    text = path.read_text(encoding="utf-8")
    p = pages.read_payload(text)
    change(p)
    body = pages._payload_text(p)
    new = re.sub(
        r'(<script type="application/json" id="sdx-payload" data-checksum=")[0-9a-f]{8}(">).*?(</script>)',
        lambda m: m.group(1) + pages.fnv1a32(body) + m.group(2) + body + m.group(3),
        text,
        count=1,
        flags=re.S,
    )
    out = path.with_name(name)
    out.write_text(new, encoding="utf-8")
    return out


def test_damaged_payloads_show_an_error_not_a_blank(results, browser, tmp_path):
    obs, image, _ = results
    path = obs.save_html(tmp_path / "run.html", image=image)
    text = path.read_text(encoding="utf-8")
    i = text.index('"kind":"observation"') + 3
    flipped = tmp_path / "flipped.html"
    flipped.write_text(text[:i] + "K" + text[i + 1 :], encoding="utf-8")  # one byte changed
    cut = tmp_path / "cut.html"
    j = text.index('id="sdx-payload"') + 5000
    cut.write_text(text[:j] + text[j + 100 :], encoding="utf-8")  # a piece cut out

    def bad_maps(p):
        p["attention"]["aggregate"]["data"] = p["attention"]["aggregate"]["data"][:200]

    def bad_picture(p):
        p["steps"]["panels"][0]["images"][3]["data"] = base64.b64encode(b"not a png").decode()

    cases = [
        (flipped, "damaged"),
        (cut, "damaged"),
        (_with_payload(path, bad_maps, "bad_maps.html"), "attention.aggregate"),
        (_with_payload(path, bad_picture, "bad_picture.html"), "steps.noisy[3]"),
    ]
    for k, (page_path, message) in enumerate(cases):
        page = Opened(browser, page_path)
        try:
            box = page.page.locator(".sdx-error")
            box.first.wait_for(timeout=PATIENCE_MS)
            assert message in box.first.inner_text()
            if k == 0:
                page.page.screenshot(path=str(_shots() / "page_damaged.png"))
            assert page.requests == []
        finally:
            page.close()


def test_a_video_page_gets_a_frame_slider(browser, tmp_path):
    """A video's page (Wan, tiny fixture: 2 latent frames) shows a frame slider in both explorers, and moving it
    changes the pictures."""
    from sdexplore.fixtures import tiny_pipeline

    pipe = tiny_pipeline("wan")
    kw = dict(
        num_frames=5, height=64, width=64, num_inference_steps=3, max_sequence_length=32, output_type="np"
    )
    with sdexplore.observe(pipe, attention=True) as obs:
        video = pipe(
            prompt="a red circle moving right", generator=torch.Generator().manual_seed(0), **kw
        ).frames[0]
    path = obs.save_html(tmp_path / "video.html", image=video)
    page = Opened(browser, path)
    try:
        assert page.state == "ok" and page.page.locator(".sdx-error").count() == 0
        assert "frame 1 / 2" in page.page.locator(".sdx-scrubber .sdx-info").inner_text()
        chart = page.page.locator(".sdx-scrubber .sdx-chart").inner_html()  # a flow model's mixing weights
        assert "signal 1−σ" in chart and "noise σ" in chart and "√ᾱ" not in chart
        page.moves(".sdx-panel-x0", lambda: page.key(".sdx-scrubber .sdx-frame-slider", "ArrowRight"))
        assert "frame 2 / 2" in page.page.locator(".sdx-scrubber .sdx-info").inner_text()
        page.moves(".sdx-attention-image", lambda: page.key(".sdx-attention .sdx-frame-slider", "ArrowRight"))
        assert "frame 2 / 2" in page.page.locator(".sdx-attention .sdx-caption").inner_text()
        page.page.screenshot(path=str(_shots() / "page_video.png"), full_page=True)
        assert page.errors == [] and page.requests == []
    finally:
        page.close()


def test_edit_page_offline_word_and_opacity_change_the_maps(results, browser, tmp_path):
    obs, image, _ = results
    pipe = sdexplore.load_pipeline()
    e = sdexplore.edit(
        pipe,
        PROMPT,
        PROMPT.replace("red", "green"),
        num_inference_steps=8,
        generator=torch.Generator().manual_seed(0),
    )
    path = pages.save_edit(e, tmp_path / "edit.html")
    page = Opened(browser, path)
    try:
        assert page.state == "ok" and page.page.locator(".sdx-error").count() == 0
        for c in (".sdx-edit-source", ".sdx-edit-edited", ".sdx-edit-before", ".sdx-edit-after"):
            assert not _one_colour(page.pixels(c)), f"{c} is one colour"
        assert "“green” (edited)" in page.page.locator(".sdx-edit-caption").inner_text()
        words = [w["word"] for w in pages.read_payload(path)["edit"]["words"]]
        page.moves(
            ".sdx-edit-after", lambda: page.page.select_option(".sdx-edit-word", str(words.index("circle")))
        )
        page.moves(".sdx-edit-before", lambda: page.key(".sdx-edit-explorer .sdx-opacity", "ArrowLeft", 3))
        page.page.screenshot(path=str(_shots() / "page_edit.png"), full_page=True)
        assert page.requests == [] and page.errors == []
    finally:
        page.close()


def test_each_module_runs_as_anywidget_esm(results, browser, tmp_path):
    """pages.module_source(name), the form anywidget takes as ``_esm``, imports as an ES module and renders from
    a Backbone-like model's ``payload`` trait, writing the control's trait back (``set`` + ``save_changes``)."""
    obs, image, w = results
    cases = [
        ("scrubber", pl.observation_payload(obs, image=image), ".sdx-step-slider", "step"),
        ("attention", pl.observation_payload(obs, image=image), ".sdx-opacity", None),
        ("walk", pl.walk_payload(w), ".sdx-walk-slider", "frame"),
        ("interpolation", pl.walk_payload(w), ".sdx-frame-slider", "frame"),
    ]
    blank = tmp_path / "blank.html"
    blank.write_text('<!doctype html><meta charset="utf-8"><div id="el"></div>')
    page = Opened(browser, blank, page_of_sdexplore=False)
    try:
        for name, payload, slider, trait in cases:
            got = page.page.evaluate(
                """async ([src, payload, slider, trait]) => {
                  const url = URL.createObjectURL(new Blob([src], { type: "text/javascript" }));
                  const mod = (await import(url)).default;
                  const state = { payload }, listeners = {}, saved = [];
                  const model = {
                    get: (k) => state[k],
                    set: (k, v) => { state[k] = v; (listeners["change:" + k] || []).forEach((f) => f()); },
                    on: (e, f) => { (listeners[e] ||= []).push(f); },
                    off: () => {},
                    save_changes: () => saved.push(JSON.stringify(state, (k, v) => k === "payload" ? undefined : v)),
                  };
                  const el = document.getElementById("el");
                  el.replaceChildren();
                  const cleanup = await mod.render({ model, el });
                  const input = el.querySelector(slider);
                  input.value = input.min;
                  input.dispatchEvent(new Event("input"));
                  if (typeof cleanup === "function") cleanup();
                  return { error: !!el.querySelector(".sdx-error"), canvases: el.querySelectorAll("canvas").length,
                           state: trait ? state[trait] : null, saved: saved.length };
                }""",
                [pages.module_source(name), payload, slider, trait],
            )
            assert not got["error"] and got["canvases"] >= 1, (name, got)
            if trait:
                assert got["state"] == 0 and got["saved"] >= 1, (name, got)
        assert page.errors == [] and page.requests == []
    finally:
        page.close()


def test_an_image_to_image_page_offers_its_queries(browser, tmp_path):
    """Self-attention maps (image→image, one per recorded query): the page names the relation, offers a menu of
    the queries instead of the words, and choosing another query repaints the map with its point marked."""
    from sdexplore.fixtures import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[4:6] = True
    with sdexplore.observe(pipe, attention=dict(relation="image->image", queries=[(2, 3), mask])) as obs:
        image = pipe(
            PROMPT, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
        )
    path = obs.save_html(tmp_path / "self_attention.html", image=image.images[0])
    page = Opened(browser, path)
    try:
        assert page.state == "ok" and page.page.locator(".sdx-error").count() == 0
        relation = page.page.locator(".sdx-attention .sdx-relation")
        assert (
            relation.get_attribute("data-relation") == "image->image"
            and "image → image" in relation.inner_text()
        )
        assert page.page.locator(".sdx-attention .sdx-word-buttons").count() == 0  # queries, not words
        caption = page.page.locator(".sdx-attention .sdx-caption")
        assert "query 0: cell (2, 3)" in caption.inner_text()
        second = page.page.locator(".sdx-query option").nth(1).get_attribute("value")
        page.moves(".sdx-attention-image", lambda: page.page.select_option(".sdx-query", second))
        assert "query 1: mask of 16 cells" in caption.inner_text()
        page.page.screenshot(path=str(_shots() / "page_image_to_image.png"), full_page=True)
        assert page.errors == [] and page.requests == []
    finally:
        page.close()
