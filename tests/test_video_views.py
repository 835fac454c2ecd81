"""The static explorers on a video (Wan's fixture): the scrubber draws each step's frames as a strip, the attention
explorer a word's map per latent frame over the clip frame that latent frame ends at."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdexplore as sdx
from sdexplore.fixtures import fixture_call_defaults, tiny_pipeline


@pytest.fixture(scope="module")
def wan():
    pipe = tiny_pipeline("wan")
    with sdx.observe(pipe, steps=True, attention=True) as obs:
        out = pipe(
            prompt="a red circle",
            generator=torch.Generator().manual_seed(0),
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            max_sequence_length=32,
            **fixture_call_defaults("wan"),
        )
    return obs, np.asarray(out.frames[0])  # (N, H, W, 3) float in [0, 1]


def test_a_video_steps_preview_is_its_frames_side_by_side(wan) -> None:
    from sdexplore.views.render import trace_preview

    obs, _ = wan
    trace = obs.steps
    F = trace.frames
    lat = trace[0].latents  # (B, C, F, h, w)
    strip = trace_preview(trace, 0, "x0")
    assert strip.shape == (lat.shape[3], F * lat.shape[4], 3)
    # the recorder previews x0 with the same function, frame by frame (its factors prescaled: a level, rarely)
    assert trace[0].preview is not None
    recorded = np.asarray(trace.frame_strip(0)).astype(int)
    assert recorded.shape == strip.shape and np.abs(strip.astype(int) - recorded).max() <= 1
    # frame f's columns are frame f's own preview, not a copy of frame 0
    w = lat.shape[4]
    assert not np.array_equal(strip[:, :w], strip[:, w:])


def test_the_scrubbers_figure_shows_each_steps_frame_strip(wan) -> None:
    from sdexplore.views.widgets import TimestepScrubber

    obs, _ = wan
    scrub = TimestepScrubber(obs, static=True)
    fig = scrub.figure(columns=2)
    F, w = obs.steps.frames, obs.steps[0].latents.shape[-1]
    drawn = [np.asarray(im.get_array()) for ax in fig.axes for im in ax.get_images()]
    widths = {a.shape[1] for a in drawn}
    assert F * w in widths  # the noisy latents and x0 previews: F frames of w cells
    assert all(a.max() - a.min() > 0 for a in drawn)


def test_the_attention_explorer_draws_each_latent_frame_over_its_clip_frame(wan) -> None:
    from sdexplore.views.payload import encode_image
    from sdexplore.views.render import as_uint8_image, heat_overlay
    from sdexplore.views.widgets import AttentionExplorer

    obs, clip = wan
    F = obs.attention.frames
    assert len(clip) == 4 * (F - 1) + 1  # Wan: pixel frame j in latent frame (j + 3) // 4
    ex = AttentionExplorer(obs, clip, static=True)
    # latent frame f over the last pixel frame it holds, 4f
    for f in range(F):
        assert np.array_equal(ex._clip[f], as_uint8_image(clip[4 * f]))
    assert ex.payload()["image"] == [encode_image(as_uint8_image(clip[4 * f])) for f in range(F)]
    # one frame's overlay is that frame's map over that frame's picture
    heat = ex.heat("circle")
    assert heat.shape[0] == F
    want = heat_overlay(as_uint8_image(clip[4 * (F - 1)]), heat[F - 1], size=64)
    got = ex._overlay("circle", (0, ex.num_steps - 1), ex.layer, ex.opacity, 64, F - 1)
    assert np.array_equal(got, want)
    assert ex.overlay_png("circle", frame=0) != ex.overlay_png("circle", frame=F - 1)
    with pytest.raises(sdx.errors.InvalidArgumentError, match="not a frame"):
        ex.overlay_png("circle", frame=F)
    fig = ex.figure(n_bins=2, max_words=2)
    drawn = [np.asarray(im.get_array(), np.float64) for ax in fig.axes for im in ax.get_images()]
    assert drawn and all(a.max() - a.min() > 1e-6 for a in drawn)
    assert "latent frames" in fig._suptitle.get_text()


def test_the_plots_draw_a_video_frame_by_frame(wan) -> None:
    from sdexplore.views.plots.attention import plot_words, word_overlay
    from sdexplore.views.plots.steps import plot_latent_channels, step_image
    from sdexplore.views.render import as_uint8_image, heat_overlay

    obs, clip = wan
    maps, trace = obs.attention, obs.steps
    F = maps.frames
    strip = word_overlay(maps, "circle", image=clip)  # every frame, side by side
    H, W = clip.shape[1:3]
    assert strip.shape == (H, F * W, 3)
    last = word_overlay(maps, "circle", image=clip, frame=F - 1)
    want = heat_overlay(as_uint8_image(clip[-1]), maps.word("circle", frame=F - 1))
    assert np.array_equal(last, want) and np.array_equal(strip[:, -W:], last)
    assert np.array_equal(step_image(trace, 0, "preview"), np.asarray(trace.frame_strip(0)))
    plot_words(maps, ["red", "circle"], image=clip)
    plot_latent_channels(trace, 0)
