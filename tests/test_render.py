"""The shared view helpers: one heat-map blend, one step picker, one trace preview, one x0 decode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gen
from hypothesis import given
from hypothesis import strategies as st

from sdexplore.errors import NotRecordedError, SdexploreError
from sdexplore.preview import latent_to_rgb, to_uint8
from sdexplore.record.steps import StepRecorder
from sdexplore.results.trace import StepRecord, Trace
from sdexplore.views.render import (
    as_uint8_image,
    decode_steps,
    heat_overlay,
    preview_factors,
    spread,
    step_groups,
    trace_preview,
)


# ---------------------------------------------------------------------------------------- heat overlay
def test_heat_overlay_blends_the_upsampled_coloured_map():
    img = np.full((16, 16, 3), 100, np.uint8)
    heat = torch.zeros(4, 4)
    heat[:2] = 3.0  # top half hot (raw mass: min-max normalised by default)
    full = heat_overlay(img, heat, opacity=1.0, cmap="gray")
    assert full.shape == (16, 16, 3)
    assert full[0, 0].tolist() == [255] * 3 and full[-1, -1].tolist() == [0] * 3
    assert np.array_equal(heat_overlay(img, heat, opacity=0.0, cmap="gray"), img)
    half = heat_overlay(img, heat, opacity=0.5, cmap="gray")
    assert half[0, 0].tolist() == [177] * 3 and half[-1, -1].tolist() == [50] * 3  # (100 + 255) / 2, 100 / 2
    # explicit ends of the colour map: 3.0 is half way up [0, 6]
    assert heat_overlay(img, heat, opacity=1.0, cmap="gray", vmin=0.0, vmax=6.0)[0, 0, 0] == 128


def test_heat_overlay_sizes():
    heat = torch.rand(4, 6)
    small = np.zeros((8, 12, 3), np.uint8)
    assert heat_overlay(small, heat).shape == (8, 12, 3)  # keeps the image's size
    assert heat_overlay(small, heat, size=32).shape == (32, 48, 3)  # nearest upscale to a legible size
    assert heat_overlay(None, heat, size=40).shape == (40, 60, 3)  # the map alone, aspect kept
    with pytest.raises(ValueError, match="opacity"):
        heat_overlay(small, heat, opacity=2.0)
    with pytest.raises(ValueError, match="one 2-D map"):
        heat_overlay(small, torch.rand(2, 4, 6))


def test_as_uint8_image_takes_every_layout():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    chw = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255  # (3, H, W) in [0, 1]
    assert np.array_equal(as_uint8_image(chw), rgb)
    assert np.array_equal(as_uint8_image(chw[None]), rgb)
    assert as_uint8_image(np.zeros((5, 7))).shape == (5, 7, 3)
    with pytest.raises(ValueError, match="Expected an image"):
        as_uint8_image(np.zeros((5, 7, 2)))


# ---------------------------------------------------------------------------------------- which steps
@given(st.integers(0, 200), st.integers(1, 20))
def test_spread_keeps_the_ends_and_at_most_k(n, k):
    picks = spread(n, k)
    assert picks == sorted(set(picks)) and all(0 <= p < n for p in picks)
    assert len(picks) == min(n, k)
    if n and k > 1:
        assert picks[0] == 0 and picks[-1] == n - 1
    if n and k == 1:
        assert picks == [n - 1]
    assert n - 1 in spread(n, 2, keep=[n - 1, n + 5]) if n else spread(0, 2, keep=[3]) == []


@given(st.integers(1, 200), st.integers(1, 20), st.integers(0, 10))
def test_step_groups_cover_the_range_in_order(n, k, start):
    groups = step_groups(n, k, start=start)
    assert len(groups) == min(n, k)
    assert [i for g in groups for i in g] == list(range(start, start + n))
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1


def test_step_pickers_refuse_nonsense():
    with pytest.raises(ValueError, match="k >= 1"):
        spread(5, 0)
    with pytest.raises(ValueError, match="n >= 1"):
        step_groups(0, 3)


# ---------------------------------------------------------------------------------------- trace previews
def _trace(ve: bool) -> Trace:
    """A hand-made 3-step run with known levels (ᾱ = 0.25, 0.5, 0.81): latents 0.5, x0 0.25, identity factors."""
    steps = [
        StepRecord(index=i, timestep=900 - 300 * i, sigma=0.0, alpha_bar=ab, guidance_scale=1.0)
        for i, ab in enumerate((0.25, 0.5, 0.81))
    ]
    for s in steps:
        s.latents = torch.ones(2, 4, 2, 3) * 0.5
        s.latents_out = torch.ones(2, 4, 2, 3) * 0.5
        s.x0 = torch.full((2, 4, 2, 3), 0.25)
    f = torch.eye(4, 3)  # channel c → colour c (channel 3 unused)
    meta = {"latent_rgb": {"factors": f.tolist(), "bias": [0.0, 0.0, 0.0]}, "ve_latents": ve}
    return Trace(steps=steps, family="sd1", num_steps=3, meta=meta)


def test_trace_preview_scales_ve_latents_by_their_signal_level():
    vp, ve = _trace(False), _trace(True)
    level = {0: 0.5, 1: 0.5**0.5, 2: 0.9}  # √ᾱ of each step
    for pos in range(3):
        assert trace_preview(vp, pos, "latents")[0, 0, 0] == to_uint8(torch.tensor(0.5))
        assert trace_preview(ve, pos, "latents")[0, 0, 0] == to_uint8(torch.tensor(0.5 * level[pos]))
        assert trace_preview(ve, pos, "x0")[0, 0, 0] == to_uint8(torch.tensor(0.25))  # x0 is never scaled
    # latents leaving a step sit at the next step's level; after the last step σ = 0
    assert trace_preview(ve, 0, "latents_out")[0, 0, 0] == to_uint8(torch.tensor(0.5 * level[1]))
    assert trace_preview(ve, 2, "latents_out")[0, 0, 0] == to_uint8(torch.tensor(0.5))
    assert trace_preview(ve, ve[1], "latents").tolist() == trace_preview(ve, 1, "latents").tolist()


def test_trace_preview_uses_the_traces_factors_or_given_ones():
    tr = _trace(False)
    tr.meta["latent_rgb"]["bias"] = [0.1, -0.2, 0.3]
    got = trace_preview(tr, -1, "x0", image=1)
    assert got.shape == (2, 3, 3)
    assert got[0, 0].tolist() == to_uint8(torch.tensor([0.35, 0.05, 0.55])).tolist()
    other = trace_preview(tr, 0, "x0", factors=(torch.ones(4, 3), torch.zeros(3)))
    assert other[0, 0].tolist() == to_uint8(torch.tensor([1.0, 1.0, 1.0])).tolist()
    del tr.meta["latent_rgb"]  # an older trace: its family's published factors
    f, b = preview_factors(tr)
    expected = to_uint8(latent_to_rgb(tr[0].x0[:1], f, b))[0].numpy()
    assert np.array_equal(trace_preview(tr, 0, "x0"), expected)


def test_a_trace_without_factors_of_a_family_without_published_ones_asks_for_factors():
    tr = _trace(False)
    del tr.meta["latent_rgb"]
    tr.family = "sana"  # no published latent → RGB factors for its DC-AE latents
    for call in (lambda: preview_factors(tr), lambda: trace_preview(tr, 0, "x0")):
        with pytest.raises(
            NotRecordedError, match=r"Sana has no published ones; pass factors=\(factors \(C, 3\)"
        ):
            call()
    given = trace_preview(tr, 0, "x0", factors=(torch.ones(4, 3), torch.zeros(3)))
    assert given[0, 0].tolist() == to_uint8(torch.tensor([1.0, 1.0, 1.0])).tolist()


def test_trace_preview_errors_say_what_to_do():
    tr = _trace(False)
    tr[0].x0 = None
    with pytest.raises(NotRecordedError, match=r"quantities=\(\.\.\., 'x0'\)") as e:
        trace_preview(tr, 0, "x0")
    assert isinstance(e.value, SdexploreError) and isinstance(e.value, ValueError)
    with pytest.raises(ValueError, match="Cannot preview 'preview'"):
        trace_preview(tr, 0, "preview")
    with pytest.raises(IndexError, match="3 recorded steps"):
        trace_preview(tr, 5, "latents")
    with pytest.raises(IndexError, match="image 2"):
        trace_preview(tr, 1, "latents", image=2)
    with pytest.raises(ValueError, match="not one of this trace's steps"):
        trace_preview(tr, _trace(False)[0], "latents")
    stranger = Trace(steps=tr.steps, family="a-family-sdexplore-does-not-know", meta={})
    with pytest.raises(NotRecordedError, match="factors="):
        trace_preview(stranger, 1, "latents")


def test_trace_preview_matches_the_recorders_own_previews(sd1_pipe):
    """The recorder's preview_of="latents" previews (scaled inside the run) equal the views' recomputation."""
    from diffusers import EulerDiscreteScheduler

    sd1_pipe.scheduler = EulerDiscreteScheduler.from_config(sd1_pipe.scheduler.config)
    with StepRecorder(sd1_pipe, quantities=("latents", "preview"), preview_of="latents") as rec:
        sd1_pipe("a red circle", generator=gen(0), num_inference_steps=3, height=64, width=64)
    tr = rec.trace
    assert tr.meta["ve_latents"]
    for pos in range(len(tr)):
        diff = trace_preview(tr, pos, "latents").astype(int) - tr[pos].preview[0].numpy().astype(int)
        assert np.abs(diff).max() <= 1  # float16 storage of the latents: one uint8 level at most


# ---------------------------------------------------------------------------------------- x0 decodes
def test_decode_steps_decodes_the_chosen_steps_and_checks_first(sd1_pipe):
    from sdexplore.decoding import decode_with

    with StepRecorder(sd1_pipe, quantities=("latents", "x0")) as rec:
        sd1_pipe("a red circle", generator=gen(0), num_inference_steps=3, height=64, width=64)
    tr = rec.trace
    out = decode_steps(sd1_pipe.vae, tr, [0, -1])
    assert len(out) == 2 and out[0].shape == (64, 64, 3) and out[0].dtype == np.uint8
    assert np.array_equal(out[1], decode_with(sd1_pipe.vae, tr[2].x0[:1])[0].numpy())
    assert not np.array_equal(out[0], out[1])
    tr[1].x0 = None
    calls = []
    handle = sd1_pipe.vae.decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(NotRecordedError, match="x0 was not recorded at step 1"):
            decode_steps(sd1_pipe.vae, tr)
    finally:
        handle.remove()
    assert not calls  # refused before any decode
