"""Wan 2.x text-to-video, the first video family: the fixture, the frame axis of traces and maps, their files, and the
refusals around them. The conformance suite (tests/test_conformance.py) checks Wan like every family; these are the
video-only details."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sdexplore as sdx
from sdexplore.errors import (
    InvalidArgumentError,
    NotRecordedError,
    ResultFileError,
    SelectionError,
    UnsupportedPipelineError,
)
from sdexplore.fixtures import fixture_call_defaults, tiny_pipeline
from sdexplore.record.steps import StepRecorder
from sdexplore.results import fileformat as ff
from sdexplore.results.attention_maps import AttentionMaps
from sdexplore.results.trace import Trace

P = "a red circle on a blue background"
KW = dict(num_frames=5, height=64, width=64, num_inference_steps=2, max_sequence_length=32, output_type="np")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("wan")


@pytest.fixture(scope="module")
def obs(pipe):
    with sdx.observe(pipe, steps=True, attention={"per_head": True, "keep_probs": True}) as o:
        o.video = pipe(prompt=P, generator=gen(), **KW).frames
    return o


@pytest.fixture(scope="module")
def sd1_obs():
    pipe = tiny_pipeline("sd1")
    with sdx.observe(pipe, steps=True, attention=True) as o:
        pipe(P, num_inference_steps=2, height=64, width=64, generator=gen())
    return o


def reseal(path, key: str, edit) -> None:
    """Edit a saved file's header and seal it again: every checksum right, only the content wrong."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = json.loads(f.metadata()[key])
    save_file(tensors, str(path), metadata={key: json.dumps(ff.seal(edit(header), tensors))})


# ---- the fixture ----------------------------------------------------------------------------------------------
def test_the_fixture_makes_a_short_video(pipe, obs):
    assert obs.video.shape == (1, 5, 64, 64, 3)  # (B, frames, H, W, 3)
    assert obs.steps.frames == 2 == obs.attention.frames  # 5 frames → 1 + (5 − 1) / 4 latent frames
    assert obs.steps[0].latents.shape == (1, 16, 2, 8, 8)


def test_generate_leaves_the_frame_count_to_the_pipeline(pipe):
    """The record's call defaults are the real model's: generate() adds no frame count, so a real Wan makes the
    pipeline's 81 frames (21 latent frames); the fixture's 5 frames are the tests' (fixture_call_defaults)."""
    assert "num_frames" not in dict(sdx.FAMILIES["wan"].call_defaults)
    assert fixture_call_defaults("wan") == {"num_frames": 5}
    kw = {
        **{k: v for k, v in KW.items() if k != "num_frames"},
        "num_inference_steps": 1,
        "output_type": "latent",
    }
    _, obs = sdx.generate(pipe, P, seed=0, steps=True, attention=False, **kw)
    assert obs.steps.frames == 21 and obs.steps[0].latents.shape == (1, 16, 21, 8, 8)


def test_the_fixture_is_deterministic_independent_and_fixed(pipe):
    a, b = pipe, tiny_pipeline("wan")
    assert a.transformer is not b.transformer
    x = a(prompt=P, generator=gen(0), **KW).frames
    assert np.array_equal(x, b(prompt=P, generator=gen(0), **KW).frames)
    assert np.abs(x - a(prompt=P, generator=gen(1), **KW).frames).max() > 1e-3
    with pytest.raises(ValueError, match="fixed"):
        tiny_pipeline("wan", prediction_type="epsilon")


def test_a_second_denoiser_is_refused_before_anything_runs(pipe):
    """Wan 2.2 A14B switches to transformer_2 mid-run, which the attachment would not see."""
    pipe.transformer_2 = (
        pipe.transformer
    )  # an attribute the pipeline checks (not registered: nothing else moves)
    try:
        with pytest.raises(UnsupportedPipelineError, match="transformer_2"):
            sdx.observe(pipe, steps=True)
    finally:
        pipe.transformer_2 = None


def test_decoding_every_step_is_refused_naming_the_preview(pipe):
    with pytest.raises(InvalidArgumentError, match="frame_strip"):
        StepRecorder(pipe, decode_every=1)


# ---- traces -----------------------------------------------------------------------------------------------------
def test_frame_strip_options_and_errors(obs, sd1_obs):
    tr = obs.steps
    assert tr.frame_strip(-1).size == (2 * 8, 8)
    with pytest.raises(NotRecordedError, match="decoded"):
        tr.frame_strip(0, quantity="decoded")
    with pytest.raises(InvalidArgumentError, match="quantity"):
        tr.frame_strip(0, quantity="x0")
    with pytest.raises(InvalidArgumentError, match="scale"):
        tr.frame_strip(0, scale=0)
    with pytest.raises(SelectionError, match="index"):
        tr.frame_strip(0, index=1)
    with pytest.raises(IndexError):
        tr.frame_strip(5)
    image = sd1_obs.steps  # an image's trace: no frame axis, its strip is its one preview
    assert image.frames is None
    assert np.array_equal(np.asarray(image.frame_strip(0)), image[0].preview[0].numpy())


def test_a_video_trace_round_trips_and_its_frames_are_checked(obs, sd1_obs, tmp_path):
    path = obs.steps.save(tmp_path / "t.safetensors")
    back = Trace.load(path)
    assert back.frames == 2 and torch.equal(back[0].preview, obs.steps[0].preview)
    reseal(path, "sdexplore.trace", lambda h: {**h, "family": "sd3"})  # video tensors, an image family
    with pytest.raises(ResultFileError, match="video"):
        Trace.load(path)
    image = sd1_obs.steps.save(tmp_path / "i.safetensors")
    reseal(image, "sdexplore.trace", lambda h: {**h, "family": "wan"})  # image tensors, the video family
    with pytest.raises(ResultFileError, match="video"):
        Trace.load(image)


def test_a_trace_mixing_frame_axes_fails_naming_the_tensor(obs, tmp_path):
    tensors, header = obs.steps.to_state()
    tensors["step0.preview"] = tensors["step0.preview"][:, 0].contiguous()  # (B, h, w, 3): one frame's
    with pytest.raises(ResultFileError, match="step0.preview"):
        Trace.from_state(tensors, header)


# ---- attention maps --------------------------------------------------------------------------------------------
def test_maps_carry_the_frame_axis_everywhere(obs):
    m = obs.attention
    F, (H, W), T = m.frames, m.latent_size, m.aggregate.shape[1]
    assert m.aggregate.shape == (1, T, F, H, W)
    assert m.steps.shape[:4] == (2, 1, T, F)
    for name, layer in m.layers.items():
        h, w = layer.shape[-2:]
        assert layer.shape == (1, T, F, h, w)
        assert m.layer_heads[name].shape == (1, 4, T, F, h, w)
        assert m.probs[name].shape == (2, 1, 4, F * h * w, T)
    torch.testing.assert_close(m.aggregate.sum(1), torch.ones(1, F, H, W))  # a softmax over T at every pixel
    assert m.word("circle").shape == (F, H, W) and m.word("circle", frame=-1).shape == (H, W)


def test_frame_selection_errors(obs, sd1_obs):
    m = obs.attention
    for bad in (2, -3, 1.0, True, "0"):
        with pytest.raises(SelectionError, match="frame"):
            m.word("circle", frame=bad)
    with pytest.raises(SelectionError, match="no frames"):
        sd1_obs.attention.word("circle", frame=0)
    assert torch.equal(m.token(2, frame=1), m.token(2)[1])


def test_maps_files_store_the_frame_axis_and_image_files_are_unchanged(obs, sd1_obs, tmp_path):
    path = obs.attention.save(tmp_path / "m.safetensors")
    back = AttentionMaps.load(path)
    assert back.frames == 2 and torch.equal(
        back.probs["blocks.0.attn2"], obs.attention.probs["blocks.0.attn2"]
    )
    _, header = sd1_obs.attention.to_state()
    assert "frames" not in header["maps"]  # an image's file: the format as before videos
    reseal(path, "sdexplore.AttentionMaps", lambda h: {**h, "maps": {**h["maps"], "frames": 3}})
    with pytest.raises(ResultFileError, match="aggregate"):
        AttentionMaps.load(path)
    path = obs.attention.save(tmp_path / "n.safetensors")
    reseal(
        path,
        "sdexplore.AttentionMaps",
        lambda h: {**h, "maps": {k: v for k, v in h["maps"].items() if k != "frames"}},
    )
    with pytest.raises(ResultFileError, match="aggregate"):  # 5-dimensional maps without a frames field
        AttentionMaps.load(path)


def test_video_maps_relabelled_as_an_image_family_fail_naming_frames(obs, tmp_path):
    path = obs.attention.save(tmp_path / "m.safetensors")
    reseal(path, "sdexplore.AttentionMaps", lambda h: {**h, "maps": {**h["maps"], "family": "pixart-sigma"}})
    with pytest.raises(ResultFileError, match="maps.frames"):
        AttentionMaps.load(path)
