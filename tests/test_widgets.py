"""Explorers over real recorded results: sliders change what is shown, never run the pipeline; static fallback.

In a notebook the explorers are anywidget views of the front end's JavaScript (``sdexplore/views/web/``) over the
page payload; these tests check the Python side: the module text, the payload each view holds, the synced
positions. tests/test_browser.py checks them painting in JupyterLab.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import ipywidgets  # noqa: F401  (a dev extra the explorers need: missing, it is an error, not a skip)
import numpy as np
import pytest
import torch
from PIL import Image

from sdexplore.fixtures import tiny_pipeline
from sdexplore.heatmaps import normalize, resize
from sdexplore.record.observe import observe
from sdexplore.results.trace import Trace
from sdexplore.smoothness import smoothness_report
from sdexplore.views import pages
from sdexplore.views import payload as pl
from sdexplore.views.export import read_frames
from sdexplore.views.render import heat_overlay
from sdexplore.views.widgets import (
    AttentionExplorer,
    InterpolationExplorer,
    TimestepScrubber,
    WalkPlayer,
    has_widget_frontend,
)
from sdexplore.views.widgets._base import jpeg_bytes
from sdexplore.views.widgets._web import widget_esm
from sdexplore.walks import walk

PROMPT = "a big red circle on a blue background"
STEPS = 6


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


class UnetCalls:
    """Counts UNet forward calls through a removable forward hook."""

    def __init__(self, pipe):
        self.n = 0
        self.handle = pipe.unet.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.n += 1

    def close(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def run():
    """One recorded run (steps + attention with per-step maps) of the tiny SD1 pipeline, and its image."""
    torch.set_num_threads(1)
    pipe = tiny_pipeline("sd1")
    with observe(pipe, steps=True, attention=True) as obs:
        image = pipe(PROMPT, num_inference_steps=STEPS, generator=_gen()).images[0]
    return pipe, obs, image


@pytest.fixture(scope="module")
def frames():
    torch.set_num_threads(1)
    pipe = tiny_pipeline("sd1")
    return walk(
        pipe, ["a red circle", "a blue square"], seeds=[0, 1], frames=6, num_inference_steps=3, progress=False
    )


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# ---------------------------------------------------------------------------------------- frontend detection
def test_no_frontend_outside_a_kernel_means_static(run, monkeypatch):
    _, obs, _ = run
    assert not has_widget_frontend()  # pytest is not a Jupyter kernel
    scrub = TimestepScrubber(obs)
    assert scrub.static
    bundle = scrub._repr_mimebundle_()
    png = base64.b64decode(bundle["image/png"])
    assert _decode(png).shape[0] > 100  # a real figure, not an error
    monkeypatch.setenv("SDEXPLORE_STATIC", "1")
    assert TimestepScrubber(obs, static=None).static


# ---------------------------------------------------------------------------------------- TimestepScrubber
def test_scrubber_slider_changes_images_without_running_the_pipeline(run):
    pipe, obs, _ = run
    scrub = TimestepScrubber(obs, static=False)
    assert scrub.num_steps == STEPS
    calls = UnetCalls(pipe)
    try:
        scrub.value = 0
        first = {k: scrub.image_bytes(k) for k in ("noisy", "x0", "noise", "latents")}
        scrub.value = STEPS - 1
        last = {k: scrub.image_bytes(k) for k in first}
        for i in range(STEPS):
            scrub.value = i
    finally:
        calls.close()
    assert calls.n == 0
    assert all(first[k] != last[k] for k in first), "every panel must change between the first and last step"
    assert scrub.widget.step == STEPS - 1  # the synced trait the view listens to
    steps = scrub.widget.payload["steps"]
    assert steps["count"] == STEPS and steps["total"] == STEPS
    assert steps["timestep"] == [float(r.timestep) for r in obs.steps]
    assert steps["alpha_bar"] == [float(r.alpha_bar) for r in obs.steps]
    assert f"step {STEPS} / {STEPS}" in scrub._info_html(STEPS - 1)


def test_views_run_the_pages_own_javascript(run):
    """One source of truth: each view's _esm is the module a page inlines, wrapped so positions reach the kernel
    only at rest; every explorer's module text is in it."""
    _, obs, image = run
    for name, view in (
        ("scrubber", TimestepScrubber(obs, static=False).widget),
        ("attention", AttentionExplorer(obs, image, static=False).widget),
    ):
        body = pages.module_source(name).split("export default", 1)[0]
        assert view._esm == widget_esm(name) and view._esm.startswith(body)
        assert pages.web_file(f"{name}.js").split("import {", 1)[0] in view._esm  # the explorer's own header
        assert "save_changes() {\n      pending = true;" in view._esm  # moves stay in the browser
        assert view._css == pages.web_file("explorer.css")
        assert f"sdx-view-{name}" in view._dom_classes


def test_scrubber_x0_panel_shows_the_recorded_x0(run):
    _, obs, _ = run
    scrub = TimestepScrubber(obs, static=False)
    scrub.value = 2
    expected = obs.steps[2].preview[0].numpy()  # the recorder's own preview of x0, (h, w, 3)
    shown = _decode(scrub.image_bytes("x0"))  # lossless PNG or WebP, at the latent size (the view enlarges)
    assert shown.shape == expected.shape
    assert np.abs(shown.astype(int) - expected.astype(int)).max() <= 1


def test_scrubber_fills_in_live_and_follows_the_newest_step():
    pipe = tiny_pipeline("sd1")
    scrub = TimestepScrubber(static=False, live_fps=None)  # draw every step
    scrub.widget  # noqa: B018 - shown before the run, as in a notebook
    seen = []

    def listener(rec, trace):
        scrub.on_step(rec, trace)
        seen.append((scrub.num_steps, scrub.value))

    with observe(pipe, on_step=listener):
        pipe(PROMPT, num_inference_steps=STEPS, generator=_gen())
    assert seen == [(i + 1, i) for i in range(STEPS)], "each step appears as it arrives; the slider follows"
    assert scrub.widget.payload["steps"]["count"] == STEPS and scrub.pushes == 1 + STEPS
    live_bytes = scrub.image_bytes("x0")
    # the user moves back: the next run starts over, and a moved slider is not dragged along
    with observe(pipe, on_step=scrub.on_step) as obs:
        pipe(PROMPT, num_inference_steps=STEPS, generator=_gen())
    assert scrub.trace is obs.steps and scrub.num_steps == STEPS
    assert scrub.image_bytes("x0") == live_bytes  # same seed, same final step
    scrub.value = 1  # as the view reports a slider let go on step 2
    scrub.on_step(obs.steps[-1], obs.steps)
    assert scrub.value == 1 and scrub.num_steps == STEPS + 1
    assert scrub.widget.payload["steps"]["count"] == STEPS + 1  # the new step is there, the slider not moved


def test_live_scrubber_throttles_updates_but_always_sends_the_last_step():
    pipe = tiny_pipeline("sd1")
    scrub = TimestepScrubber(static=False, live_fps=1e-6)  # at most one update in the run: the first step
    scrub.widget  # noqa: B018
    with observe(pipe, on_step=scrub.on_step) as obs:
        pipe(PROMPT, num_inference_steps=STEPS, generator=_gen())
    scrub.wait()  # the worker may still be encoding when the call returns
    assert scrub.pushes == 1 + 2, "the empty view, the first step, the last step: nothing in between"
    assert scrub.value == STEPS - 1 and scrub.widget.payload["steps"]["count"] == STEPS
    last = scrub.image_bytes("x0")
    scrub.value = 2
    assert scrub.image_bytes("x0") != last
    reference = TimestepScrubber(obs, static=False)
    reference.value = 2
    assert reference.image_bytes("x0") == scrub.image_bytes("x0")
    assert reference.widget.payload["steps"]["panels"] == scrub.widget.payload["steps"]["panels"]


def test_live_scrubber_draws_off_the_denoising_thread(monkeypatch):
    """The step listener only copies and queues: no picture is drawn or encoded on the thread running the
    pipeline, the image equals a plain call's, and the view ends holding every step a replay would show."""
    import threading

    from sdexplore.views.widgets import scrubber as scrubber_module

    drawn_on = []
    real = scrubber_module._payload.steps_block

    def spy(*args, **kwargs):
        drawn_on.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(scrubber_module._payload, "steps_block", spy)
    pipe = tiny_pipeline("sd1")
    plain = np.asarray(pipe(PROMPT, num_inference_steps=STEPS, generator=_gen()).images[0])
    scrub = TimestepScrubber(static=False)
    scrub.widget  # noqa: B018
    caller = threading.current_thread()
    with observe(pipe, on_step=scrub.on_step) as obs:
        watched = np.asarray(pipe(PROMPT, num_inference_steps=STEPS, generator=_gen()).images[0])
    assert drawn_on and caller not in drawn_on, "the denoising thread drew a step"
    scrub.wait()
    assert np.array_equal(watched, plain)
    assert scrub.value == STEPS - 1 and scrub.widget.payload["steps"]["count"] == STEPS
    replay = TimestepScrubber(obs, static=False)
    assert scrub.widget.payload["steps"] == replay.widget.payload["steps"]


def test_live_scrubber_works_on_a_copy_of_each_step():
    """A record written after the listener returned (the caller's own tensors) does not change the view."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    pipe = tiny_pipeline("sd1")
    with observe(pipe) as obs:
        pipe(PROMPT, num_inference_steps=STEPS, generator=_gen())
    trace = obs.steps
    reference = TimestepScrubber(obs, static=False).widget.payload["steps"]
    scrub = TimestepScrubber(static=False)
    scrub.widget  # noqa: B018
    gate = threading.Event()
    scrub._worker = ThreadPoolExecutor(max_workers=1)
    scrub._worker.submit(gate.wait)  # hold the worker until every step is queued and overwritten
    for rec in trace.steps:
        scrub.on_step(rec, trace)
    saved = [rec.latents.clone() for rec in trace.steps]
    for rec in trace.steps:
        rec.latents.fill_(7.0)
    gate.set()
    scrub.wait()
    for rec, kept in zip(trace.steps, saved, strict=True):
        rec.latents.copy_(kept)
    assert scrub.widget.payload["steps"] == reference


def test_live_scrubber_completes_an_interrupted_run_on_wait():
    """A run that stops before its last step (an exception) leaves skipped steps undrawn until wait()."""
    pipe = tiny_pipeline("sd1")
    scrub = TimestepScrubber(static=False, live_fps=1e-6)  # draws the first step only while running
    scrub.widget  # noqa: B018

    def boom(p, i, t, kw):
        if i == 3:
            raise KeyboardInterrupt
        return kw

    with pytest.raises(KeyboardInterrupt):
        with observe(pipe, on_step=scrub.on_step) as obs:
            pipe(PROMPT, num_inference_steps=STEPS, generator=_gen(), callback_on_step_end=boom)
    scrub.wait()
    received = scrub.num_steps
    assert 3 <= received < STEPS and scrub.widget.payload["steps"]["count"] == received
    assert scrub.widget.payload["steps"] == TimestepScrubber(obs.steps, static=False).widget.payload["steps"]


def test_live_scrubber_reports_a_trace_it_cannot_show():
    pipe = tiny_pipeline("sd1")
    scrub = TimestepScrubber(static=False)
    scrub.widget  # noqa: B018
    with pytest.raises(ValueError, match="nothing the scrubber can show"):
        with observe(pipe, quantities=("noise_norm",), on_step=scrub.on_step):
            pipe(PROMPT, num_inference_steps=STEPS, generator=_gen())
        scrub.wait()


def _panel(scrub, panel, shape):
    """The array a scrubber panel shows, at one pixel per latent cell (the view enlarges it, nearest)."""
    shown = _decode(scrub.image_bytes(panel))
    assert shown.shape[:2] == tuple(shape[:2])
    return shown


def _other_factors(trace):
    """Preview factors unlike any family's, scaled so the random model's previews stay unsaturated."""
    spread = float(trace.stack("x0").float().std())
    factors = torch.tensor([[0.5, -0.2, 0.1], [0.1, 0.6, -0.3], [-0.4, 0.2, 0.5], [0.2, 0.1, -0.2]]) / (
        3 * spread
    )
    return factors, torch.tensor([0.05, -0.1, 0.02])


def test_scrubber_previews_with_the_traces_factors_and_never_refits(run):
    """The noisy and x0 panels use trace.meta["latent_rgb"]; without it, the family's factors, never factors
    refitted from the recorded previews (a refit recovered whatever made those previews)."""
    from sdexplore.families import SD1
    from sdexplore.preview import latent_to_rgb, to_uint8

    _, obs, _ = run
    trace = Trace.from_state(*obs.steps.to_state())
    factors, bias = _other_factors(trace)
    trace.meta["latent_rgb"] = {"factors": factors.tolist(), "bias": bias.tolist()}
    rec = trace[3]
    scrub = TimestepScrubber(trace, static=False)
    scrub.value = 3
    for panel, src in (("noisy", rec.latents), ("x0", rec.x0)):
        expected = to_uint8(latent_to_rgb(src[:1].float(), factors, bias))[0].numpy()
        assert np.array_equal(_panel(scrub, panel, expected.shape), expected), panel

    del trace.meta["latent_rgb"]  # a trace saved before traces kept their factors
    for r in trace:  # ... whose previews were made with other factors: they must not leak in
        r.preview = to_uint8(latent_to_rgb(r.x0.float(), factors, bias))
    scrub = TimestepScrubber(trace, static=False)
    scrub.value = 3
    fam = torch.tensor(SD1.latent_rgb_factors), torch.tensor(SD1.latent_rgb_bias)
    expected = to_uint8(latent_to_rgb(rec.x0[:1].float(), *fam))[0].numpy()
    assert np.array_equal(_panel(scrub, "x0", expected.shape), expected)


def test_scrubber_noisy_panel_scales_euler_latents_by_the_signal_level():
    """Euler latents are x0 + σ·ε: the noisy panel is latent_to_rgb(latents · √ᾱ), as the recorder's previews."""
    from diffusers import EulerDiscreteScheduler

    from sdexplore.preview import latent_to_rgb, to_uint8
    from sdexplore.views.render import preview_factors

    pipe = tiny_pipeline("sd1")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with observe(pipe) as obs:
        pipe(PROMPT, num_inference_steps=4, generator=_gen())
    trace = obs.steps
    assert trace.meta["ve_latents"]
    rec = trace[0]  # the noisiest step: σ ≈ 14.6, unscaled latents saturate every pixel
    scrub = TimestepScrubber(trace, static=False)
    scrub.value = 0
    scaled = rec.latents[:1].float() * np.sqrt(rec.alpha_bar)
    expected = to_uint8(latent_to_rgb(scaled, *preview_factors(trace)))[0].numpy()
    unscaled = to_uint8(latent_to_rgb(rec.latents[:1].float(), *preview_factors(trace)))[0].numpy()
    assert not np.array_equal(expected, unscaled)
    assert np.array_equal(_panel(scrub, "noisy", expected.shape), expected)


def test_trace_keeps_the_models_own_preview_factors_and_the_scrubber_uses_them(tmp_path):
    """The embedded model ships its own latent → RGB factors and learned preview: recorded traces carry them,
    also saved, and the scrubber's x0 panel shows the learned preview."""
    import json

    import sdexplore as sdx
    from sdexplore.families import latent_preview
    from sdexplore.preview import conv_preview_to_uint8

    pipe = sdx.load_pipeline()
    shipped = json.loads(
        (Path(sdx.__file__).parent / "models" / "tiny-shapes" / "latent_rgb.json").read_text()
    )
    _, obs = sdx.generate(pipe, "a red circle", seed=0, num_inference_steps=2)
    saved = Trace.load(obs.steps.save(tmp_path / "t.safetensors"))
    for trace in (obs.steps, saved):
        assert np.allclose(trace.meta["latent_rgb"]["factors"], shipped["factors"])
        assert np.allclose(trace.meta["latent_rgb"]["bias"], shipped["bias"])
        scrub = TimestepScrubber(trace, static=False)
        rec = trace[-1]
        # the x0 panel shows the model's learned preview (latent_preview.json), carried in the trace
        assert trace.meta["latent_preview"] == latent_preview(pipe).to_dict()
        expected = conv_preview_to_uint8(rec.x0[:1].float(), latent_preview(pipe))[0].numpy()
        assert np.array_equal(_panel(scrub, "x0", expected.shape), expected)


def test_scrubber_reads_a_saved_trace(run, tmp_path):
    _, obs, _ = run
    path = obs.steps.save(tmp_path / "t.safetensors")
    a, b = TimestepScrubber(obs, static=False), TimestepScrubber(Trace.load(path), static=False)
    a.value = b.value = 3
    # fp16 storage round-trips exactly, so the loaded trace shows the same images
    assert a.image_bytes("latents") == b.image_bytes("latents")


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_scrubber_other_families(family):
    pipe = tiny_pipeline(family)
    with observe(pipe) as obs:
        pipe(PROMPT, num_inference_steps=3, generator=_gen())
    scrub = TimestepScrubber(obs, static=False)
    a = scrub.image_bytes("noisy")
    scrub.value = 0
    assert a != scrub.image_bytes("noisy")
    fig = scrub.figure()
    assert len(fig.axes) == 4 * 3 and fig.axes[0].get_title().startswith("step 1")  # 4 panels × 3 steps
    assert all(len(ax.images) == 1 and np.asarray(ax.images[0].get_array()).std() > 0 for ax in fig.axes)


def test_scrubber_static_figure_has_every_panel(run):
    _, obs, _ = run
    fig = TimestepScrubber(obs, static=True).figure(columns=3)
    assert len(fig.axes) == 4 * 3
    assert all(len(ax.images) == 1 and np.asarray(ax.images[0].get_array()).std() > 0 for ax in fig.axes)
    empty = TimestepScrubber(static=True).figure()  # empty: a message, not an error
    assert [t.get_text() for ax in empty.axes for t in ax.texts] == ["no steps recorded yet"]


# ---------------------------------------------------------------------------------------- AttentionExplorer
def test_attention_controls_change_the_image_without_running_the_pipeline(run):
    pipe, obs, image = run
    ex = AttentionExplorer(obs, image, static=False)
    assert ex.words == ["a", "big", "red", "circle", "on", "blue", "background"]
    calls = UnetCalls(pipe)
    try:
        shown = [ex.displayed_png]
        ex.select(word="circle")
        shown.append(ex.displayed_png)
        ex.select(opacity=0.2)
        shown.append(ex.displayed_png)
        ex.select(step_range=(0, 1))
        shown.append(ex.displayed_png)
        ex.select(layer=next(k for k in ex.layer_groups if k.startswith("up blocks")))
        shown.append(ex.displayed_png)
        grid = ex.grid_html()
    finally:
        calls.close()
    assert calls.n == 0
    assert len(set(shown)) == len(shown), "each control must change the displayed image"
    assert grid.count("<img") == len(ex.step_bins()) * len(ex.words)
    assert ex.widget.word == "circle"  # the synced trait the view listens to


def test_attention_view_holds_every_words_maps(run):
    """The view's payload: every word with the key positions word() sums, the maps as quantised blocks that read
    back within a 1/510 of each map's range, per step and per layer, and the image under them."""
    _, obs, image = run
    m = obs.attention
    ex = AttentionExplorer(obs, image, static=False)
    p = ex.widget.payload
    att = p["attention"]
    assert [w["word"] for w in att["words"]] == ex.words and att["default_word"] == "big"
    circle = next(w for w in att["words"] if w["word"] == "circle")
    agg = pl.dequantize_maps(att["aggregate"])  # (T, H, W)
    assert torch.allclose(
        torch.from_numpy(agg[circle["positions"]].sum(0)),
        m.word("circle"),
        atol=1e-2 * float(m.word("circle").max()),
    )
    assert pl.dequantize_maps(att["steps"]).shape[0] == STEPS
    assert [layer["name"] for layer in att["layers"]] == list(m.layers)
    assert np.array_equal(pl.decode_image(p["image"]), np.asarray(image))
    # the view's word follows the Python side, and the Python side the view
    ex.select(word="red")
    assert ex.widget.word == "red"
    ex.widget.word = "background"  # as the view reports a click on "background"
    assert ex.word == "background"
    with pytest.raises(Exception, match="not offered"):
        ex.select(word="giraffe")


def test_attention_opens_on_the_first_content_word(run):
    """Not on "a": the first word that is not a stop word, punctuation or a special token."""
    from sdexplore.views.render import first_content_word

    _, obs, image = run
    ex = AttentionExplorer(obs, image, static=False)
    assert ex.words[0] == "a" and ex.word == "big"
    assert ex.displayed_png == ex.overlay_png("big", ex.step_range, ex.layer, ex.opacity)  # builds the widget
    assert ex.widget.word == "big" and ex.widget.payload["attention"]["default_word"] == "big"
    assert AttentionExplorer(obs, image, words=["on", "a", "background"], static=False).word == "background"
    assert first_content_word([",", "the", "<|startoftext|>", "</s>", "an", "Circle"]) == "Circle"
    assert first_content_word(["a", "on", "."]) == "a"  # nothing but stop words: the first, not an error


def test_attention_heat_is_the_normalised_word_map(run):
    _, obs, image = run
    ex = AttentionExplorer(obs.attention, image, static=False)
    m = obs.attention
    assert torch.allclose(ex.heat("red"), normalize(m.word("red"), "minmax"))
    assert torch.allclose(ex.heat("red", (1, 2)), normalize(m.word("red", step=range(1, 3)), "minmax"))
    assert not torch.allclose(ex.heat("red", (0, 0)), ex.heat("red", (STEPS - 1, STEPS - 1)))
    bins = ex.step_bins(3)
    assert bins[0][0] == 0 and bins[-1][1] == STEPS - 1 and len(bins) == 3


def test_attention_without_prompt_text_offers_key_positions(run):
    _, obs, image = run
    from sdexplore.record.tokens import unlabelled

    m = obs.attention
    T = int(m.aggregate.shape[1])
    blind = type(m)(**{**m.__dict__, "token_lists": [unlabelled(T)]})  # as if called with prompt_embeds=
    ex = AttentionExplorer(blind, image, static=False)
    assert ex.words[0] == "#1"
    assert torch.allclose(ex.heat("#4"), normalize(m.token(4), "minmax"))
    a = ex.displayed_png
    ex.select(word="#4")
    assert ex.displayed_png != a
    assert ex.widget.payload["attention"]["words"] == []  # the view labels key positions itself ...
    assert ex.widget.word.startswith("#4 ") and ex.word == "#4"  # ... as "#4 <token>"


def test_attention_static_figure(run):
    _, obs, image = run
    fig = AttentionExplorer(obs, image, static=True).figure(n_bins=2, max_words=3)
    assert len(fig.axes) == 3 * 3  # 2 step bins + whole run, × 3 words
    assert [ax.get_title() for ax in fig.axes[:3]] == ["a", "big", "red"]
    shown = [np.asarray(ax.images[0].get_array()) for ax in fig.axes]  # (128, 128, 3) overlays
    assert len({a.tobytes() for a in shown}) == 9  # each word and step bin its own map


def test_attention_explorer_shows_the_shared_overlay(run):
    _, obs, image = run
    ex = AttentionExplorer(obs, image, static=False, size=128)
    ex.select(word="circle")
    expected = heat_overlay(np.asarray(image), ex.heat("circle"), size=128)  # the CLI's and plots' blend
    assert expected.shape == (128, 128, 3) and expected.std() > 5
    assert ex.displayed_png == jpeg_bytes(expected)


# ---------------------------------------------------------------------------------------- interpolation, walks
def test_interpolation_slider_and_smoothness(frames):
    ex = InterpolationExplorer({"walk": frames, "reversed": frames.images[::-1]}, static=False)
    a = ex.displayed("walk")
    ex.value = 3
    assert ex.widget.frame == 3 and ex.displayed("walk") != a
    assert np.array_equal(_decode(ex.displayed("reversed")), frames.images[2])  # lossless, frame 6 - 1 - 3
    assert np.allclose(ex.reports["walk"].distances, smoothness_report(frames.images).distances)
    walk_block = ex.widget.payload["walk"]
    assert [c["name"] for c in walk_block["compare"]] == ["walk", "reversed"]
    assert np.allclose(walk_block["compare"][1]["distances"], ex.reports["reversed"].distances)
    assert "a blue square" in walk_block["labels"][3] and "t = " in walk_block["labels"][3]
    svg0, svg3 = ex.smoothness_svg(0), ex.smoothness_svg(3)
    assert svg0.startswith("<svg") and svg0 != svg3  # the marker moves
    lowres = InterpolationExplorer(frames, metric="lowres", static=False)  # the payload carries its metric
    assert np.allclose(lowres.widget.payload["walk"]["distances"], lowres.reports["frames"].distances)
    assert not np.allclose(lowres.reports["frames"].distances, ex.reports["walk"].distances)
    with pytest.raises(ValueError, match="same number of frames"):
        InterpolationExplorer({"a": frames, "b": frames.images[:3]})
    fig = ex.figure()  # a row of frames per series, then their frame-to-frame distances
    assert len(fig.axes) == 2 * len(frames) + 1
    row = [np.asarray(ax.images[0].get_array()) for ax in fig.axes[: len(frames)]]
    assert all(np.array_equal(a, b) for a, b in zip(row, frames.images, strict=True))
    assert np.allclose(fig.axes[-1].lines[0].get_ydata(), ex.reports["walk"].distances)


def test_walk_player_plays_and_exports(frames, tmp_path):
    player = WalkPlayer(frames, fps=8, static=False)
    a = player.displayed
    player.value = len(frames) - 1
    assert player.displayed != a
    assert np.array_equal(_decode(player.displayed), frames.images[-1])
    assert player._view.payload["walk"]["fps"] == 8 and player._view.fps == 8
    gif = player.export(tmp_path / "w.gif")
    assert read_frames(gif).shape[0] == len(frames)
    player._name.value = str(tmp_path / "w.mp4")
    player._rubber.value = True
    player._on_export()
    assert "saved" in player._status.value and (tmp_path / "w.mp4").stat().st_size > 0
    player._name.value = str(tmp_path / "w.txt")
    player._on_export()  # a bad name is reported in the widget, not raised
    assert "export failed" in player._status.value
    player._view.fps = 20  # as the view reports its speed slider
    assert player.fps == 20
    fig = player.figure()  # every frame, in order
    shown = [np.asarray(ax.images[0].get_array()) for ax in fig.axes]
    assert len(shown) == len(frames)
    assert all(np.array_equal(a, b) for a, b in zip(shown, frames.images, strict=True))


# ---------------------------------------------------------------------------------------- upload control
def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_upload_reads_the_picture_with_a_note_and_refuses_a_non_image():
    from sdexplore.views.widgets import ImageUpload

    got = []
    upload = ImageUpload(lambda im: got.append(im) or "done", size=64)
    upload.widget  # noqa: B018 - the FileUpload and its status line exist
    rgba = Image.new("RGBA", (80, 48), (255, 0, 0, 128))  # another mode, size and aspect ratio
    assert upload.receive(_png(rgba), "mine.png") == "done"
    assert got[0].mode == "RGB" and got[0].size == (64, 64)
    assert "mine.png: 64×64" in upload.status and "resized" in upload.status and "RGBA" in upload.status
    assert upload.receive(b"not an image", "notes.txt") is None and len(got) == 1
    assert upload.status.startswith("notes.txt:") and "image" in upload._status.value


def test_scrubber_with_upload_shows_the_result_of_the_users_run_in_place(run):
    import ipywidgets as w
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe, obs, _ = run
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)

    def rerun(image):  # the user's own code: an img2img call under observe
        with observe(img2img) as new:
            img2img(PROMPT, image=image, strength=0.5, num_inference_steps=4, generator=_gen())
        return new

    scrubber = TimestepScrubber(obs, size=96, static=False).with_upload(rerun, size=64)
    box = scrubber.widget
    before = scrubber.num_steps
    view = scrubber._upload_box.children[0]
    scrubber._upload.receive(_png(Image.new("RGB", (64, 64), (0, 0, 255))), "blue.png")
    assert scrubber.widget is box and scrubber._upload_box.children[0] is not view  # rebuilt in place
    assert before == STEPS and scrubber.num_steps == 2 and scrubber.trace.schedule_indices == [2, 3]
    assert scrubber.size == 96  # options kept
    assert isinstance(box.children[0].children[0], w.FileUpload)


# ---------------------------------------------------------------------------------------- SD3 and Flux
@pytest.fixture(scope="module", params=["sd3", "flux"])
def mmdit_run(request):
    """One recorded 3-step run (steps + joint attention) of the tiny SD3 or Flux pipeline, and its image."""
    torch.set_num_threads(1)
    pipe = tiny_pipeline(request.param)
    with observe(pipe, steps=True, attention=True) as obs:
        image = pipe(
            PROMPT, num_inference_steps=3, height=64, width=64, max_sequence_length=32, generator=_gen()
        ).images[0]
    return request.param, pipe, obs, image


def test_explorers_on_mmdit_change_what_is_shown_without_running_the_transformer(mmdit_run):
    family, pipe, obs, image = mmdit_run
    calls = []
    handle = pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    try:
        scrub = TimestepScrubber(obs, static=False)
        scrub.value = 0
        first = {k: scrub.image_bytes(k) for k in ("noisy", "x0", "noise", "latents")}
        scrub.value = 2
        assert all(first[k] != scrub.image_bytes(k) for k in first), "every panel changes over the run"
        ex = AttentionExplorer(obs, image, static=False)
        assert ex.words == ["a", "big", "red", "circle", "on", "blue", "background"]  # T5 pieces merged
        shown = [ex.displayed_png]
        ex.select(word="circle")
        shown.append(ex.displayed_png)
        ex.select(step_range=(0, 0))
        shown.append(ex.displayed_png)
        ex.select(layer=obs.attention.layer_names[-1])
        shown.append(ex.displayed_png)
        grid = ex.grid_html()
    finally:
        handle.remove()
    assert calls == []
    assert len(set(shown)) == len(shown), "each control must change the displayed image"
    assert grid.count("<img") == len(ex.step_bins()) * len(ex.words)
    m = obs.attention
    assert torch.allclose(ex.heat("red", (1, 2)), normalize(m.word("red", step=range(1, 3)), "minmax"))
    groups = {k: v for k, v in ex.layer_groups.items() if "blocks (" in k}  # Flux: its two kinds of block
    if family == "flux":
        assert groups == {
            "double-stream blocks (2)": ["transformer_blocks.0.attn", "transformer_blocks.1.attn"],
            "single-stream blocks (2)": [
                "single_transformer_blocks.0.attn",
                "single_transformer_blocks.1.attn",
            ],
        }
        double = [resize(m.word("red", layer=n), m.latent_size) for n in groups["double-stream blocks (2)"]]
        want = normalize(torch.stack(double).mean(0), "minmax")
        assert torch.allclose(ex.heat("red", layer="double-stream blocks (2)"), want, atol=1e-6)
    else:  # SD3's joint blocks are all of one kind: the menu has all layers, then each layer
        assert groups == {} and list(ex.layer_groups)[1:] == m.layer_names
    fig = scrub.figure()
    assert len(fig.axes) == 4 * 3
    assert all(np.asarray(ax.images[0].get_array()).std() > 0 for ax in fig.axes)
    fig = AttentionExplorer(obs, image, static=True).figure(n_bins=2, max_words=3)
    assert len({np.asarray(ax.images[0].get_array()).tobytes() for ax in fig.axes}) == 9


def test_walk_explorers_on_mmdit(mmdit_run):
    family, pipe, _, _ = mmdit_run
    frames = walk(pipe, ["a red circle", "a blue square"], seeds=[0, 1], frames=4, num_inference_steps=2,
                  height=64, width=64, max_sequence_length=32, progress=False)  # fmt: skip
    ex = InterpolationExplorer({"walk": frames}, static=False)
    a = ex.displayed("walk")
    ex.value = 2
    assert ex.displayed("walk") != a and "a blue square" in ex.widget.payload["walk"]["labels"][2]
    player = WalkPlayer(frames, static=False)
    b = player.displayed
    player.value = 3
    assert player.displayed != b
    shown = [np.asarray(ax.images[0].get_array()) for ax in player.figure().axes]
    assert all(np.array_equal(x, y) for x, y in zip(shown, frames.images, strict=True))


def test_scrubber_shows_a_flow_models_own_sigma() -> None:
    import re

    flux = tiny_pipeline("flux")
    with observe(flux) as obs:
        flux("a red circle", num_inference_steps=4, height=64, width=64, max_sequence_length=32)
    scrubber = TimestepScrubber(obs, static=True)
    shown = [float(re.search(r"flow σ = ([0-9.]+)", scrubber._info_html(i)).group(1)) for i in range(4)]
    assert shown == pytest.approx(flux.scheduler.sigmas[:4].tolist(), abs=1e-3)


def test_channel_tiles_keep_a_square_latents_aspect_for_any_channel_count() -> None:
    from sdexplore.views.render import channel_tiles

    for c, grid in ((4, 2), (16, 4), (32, 6)):
        tiles = channel_tiles(torch.randn(c, 8, 8), pad=1)
        side = grid * 8 + (grid - 1)  # grid tiles of 8 pixels with 1-pixel gaps
        assert tiles.shape == (-(-c // grid) * 9 - 1, side, 3)
        assert abs(tiles.shape[0] / tiles.shape[1] - 1) < 0.2  # never one long strip


# ---------------------------------------------------------------- EditExplorer


@pytest.fixture(scope="module")
def edit_run():
    """A genuine colour swap of the tiny SD1 pipeline (the maps of both branches) and its ablation."""
    import sdexplore as sdx

    pipe = tiny_pipeline("sd1")
    kw = dict(num_inference_steps=3, height=64, width=64)
    swap = sdx.edit(pipe, "a big red circle", "a big blue circle", generator=_gen(0), **kw)
    ablation = sdx.edit(pipe, "a big red circle", reweight={"circle": 0.0}, generator=_gen(0), **kw)
    return pipe, swap, ablation


def test_edit_explorer_opens_on_the_edited_word_and_its_view_holds_every_words_maps(edit_run):
    from sdexplore.views.widgets import EditExplorer

    pipe, swap, _ = edit_run
    calls = UnetCalls(pipe)
    ex = EditExplorer(swap, static=False)
    assert ex.word == "blue" and ex.words == ["a", "big", "blue", "circle"]
    view = ex.widget
    assert view.word == "blue" and "sdx-view-edit" in view._dom_classes
    assert view._esm == widget_esm("edit")  # the page's own edit.js
    edit = view.payload["edit"]
    assert [w["word"] for w in edit["words"]] == ex.words and edit["default_word"] == "blue"
    before, after = pl.dequantize_maps(edit["before"]), pl.dequantize_maps(edit["after"])  # (words, h, w)
    for k, word in enumerate(ex.words):
        b, a = ex.maps(word)
        assert np.abs(after[k] - a.numpy()).max() <= float(a.max() - a.min()) / 500 + 1e-9
        assert np.abs(before[k] - b.numpy()).max() <= float(b.max() - b.min()) / 500 + 1e-9
    assert np.array_equal(pl.decode_image(edit["edited"]), ex.edited)
    ex.select(word="circle")
    assert view.word == "circle" and ex.word == "circle"
    view.word = "big"  # as the view reports a pick
    assert ex.word == "big" and "big" in ex.caption(ex.word)
    assert calls.n == 0  # the explorer only reads the Edit
    calls.close()


def test_edit_explorer_before_is_the_replaced_words_map_on_the_shared_scale(edit_run):
    from sdexplore.views.widgets import EditExplorer

    _, swap, _ = edit_run
    ex = EditExplorer(swap, static=True)
    before, after = ex.maps("blue")
    assert torch.allclose(before, swap.source_maps.word("red"))  # the swapped-out word's map
    assert torch.equal(after, swap.edited_maps.word("blue"))
    top = max(float(before.max()), float(after.max()))
    want = heat_overlay(ex.edited, after, size=ex.size, vmin=0.0, vmax=top)
    assert np.array_equal(ex.panels("blue")[1], want)  # one scale for both, from 0, not min-max each
    src, out = ex.source.astype(int), ex.edited.astype(int)
    assert np.array_equal(ex.difference, np.abs(out - src))


def test_edit_explorer_shows_an_ablated_maps_zero_after(edit_run):
    from sdexplore.views.widgets import EditExplorer

    _, _, ablation = edit_run
    ex = EditExplorer(ablation, static=False)
    assert ex.word == "circle"  # the reweighted word
    zero = heat_overlay(ex.edited, torch.zeros(8, 8), size=ex.size, vmin=0.0, vmax=1.0)
    assert np.array_equal(ex.panels("circle")[1], zero)  # the bottom of the shared scale everywhere
    edit = ex.widget.payload["edit"]
    k = [w["word"] for w in edit["words"]].index("circle")
    assert np.abs(pl.dequantize_maps(edit["after"])[k]).max() <= 1e-6  # the view paints the same zero map
    assert "after 0.0000" in ex.caption("circle")


def test_edit_explorer_static_figure_and_a_saved_edit(edit_run, tmp_path):
    from sdexplore.results import Edit
    from sdexplore.views.widgets import EditExplorer

    _, swap, _ = edit_run
    ex = EditExplorer(Edit.load(swap.save(tmp_path / "e.safetensors")), static=True)
    fig = ex.figure()
    assert len(fig.axes) == 6  # source | edited | difference, then the swapped word before | after | change
    assert [ax.get_title() for ax in fig.axes[3:5]] == ["“blue” before", "“blue” after"]
    assert "image/png" in ex._repr_mimebundle_()


def test_a_static_explorer_embeds_its_live_page_when_asked(run, tmp_path, monkeypatch):
    """SDEXPLORE_EMBED_PAGES (the docs build): the static bundle gains an <iframe> of the explorer's own page,
    written into that folder with a verifiable payload, and keeps its figure (PNG, and under the frame)."""
    import re

    _, obs, image = run
    folder = tmp_path / "explorers"
    assert "text/html" not in TimestepScrubber(obs, static=True)._repr_mimebundle_()  # not asked: no page
    monkeypatch.setenv("SDEXPLORE_EMBED_PAGES", str(folder))
    for explorer, name in ((TimestepScrubber(obs, static=True), "scrubber"), (AttentionExplorer(obs, image, static=True), "attention")):  # fmt: skip
        bundle = explorer._repr_mimebundle_()
        src = re.search(r'<iframe class="sdx-embed" src="([^"]+)"', bundle["text/html"]).group(1)
        assert src.startswith(f"explorers/{name}-")
        payload = pages.read_payload(tmp_path / src)  # the checksum verifies
        assert payload == {**explorer.payload(), "provenance": payload["provenance"]}
        assert bundle["image/png"] in bundle["text/html"]  # the static figure, under the frame
    assert len(list(folder.iterdir())) == 2
    assert "text/html" not in TimestepScrubber(static=True)._repr_mimebundle_()  # empty: the figure alone
    assert len(list(folder.iterdir())) == 2


def test_scrubber_payload_carries_the_traces_noted_provenance(run):
    _, obs, _ = run
    trace = Trace.from_state(*obs.steps.to_state())
    trace.meta = {
        **trace.meta,
        "prompt": PROMPT,
        "seed": 3,
        "model": "embedded",
    }  # as `sdexplore steps` notes
    prov = TimestepScrubber(trace, static=True).payload()["provenance"]
    assert (prov["prompt"], prov["seed"], prov["model"], prov["steps"]) == (PROMPT, 3, "embedded", STEPS)
    assert (
        "prompt" not in TimestepScrubber(obs, static=True).payload()["provenance"]
    )  # nothing noted: none shown


def test_live_scrubber_in_a_notebook_completes_when_the_cell_ends(monkeypatch):
    """Under IPython the replay-quality encoding of every step waits for post_run_cell, not the run's tail."""
    import IPython
    from IPython.core.events import EventManager, available_events

    class Shell:
        events = None

    shell = Shell()
    shell.events = EventManager(shell, available_events)
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    pipe = tiny_pipeline("sd1")
    scrub = TimestepScrubber(static=False, live_fps=1e-6)  # the first and the last step drawn while running
    scrub.widget  # noqa: B018
    with observe(pipe, on_step=scrub.on_step) as obs:
        pipe(PROMPT, num_inference_steps=STEPS, generator=_gen())
    assert scrub.value == 1 and scrub.widget.payload["steps"]["index"] == [0, STEPS - 1]
    shell.events.trigger("post_run_cell", None)
    scrub._settle()
    assert scrub.value == STEPS - 1
    assert scrub.widget.payload["steps"] == TimestepScrubber(obs, static=False).widget.payload["steps"]
    assert shell.events.callbacks["post_run_cell"] == [], "the hook is removed once it ran"
