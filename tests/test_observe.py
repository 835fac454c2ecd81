"""observe() and generate(): one context manager for every recorder, and the one-call convenience."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import gen

from sdexplore.errors import RecorderStateError, ResultFileError
from sdexplore.generation import generate
from sdexplore.record.attention import AttentionRecorder
from sdexplore.record.observe import observe
from sdexplore.results.observation import Observation
from sdexplore.results.trace import Trace

KW = dict(num_inference_steps=3, height=64, width=64, output_type="np")


def test_observe_steps_on_every_family(any_pipe) -> None:
    ref = any_pipe("a red circle", generator=gen(0), **KW).images
    with observe(any_pipe, steps=True) as obs:
        out = any_pipe("a red circle", generator=gen(0), **KW).images
        assert len(obs.steps) == 3  # live inside the block
    assert np.abs(out - ref).max() <= 1e-6
    assert obs.attention is None and obs.steps[-1].preview.shape[-1] == 3
    assert "step" not in vars(any_pipe.scheduler) and not any_pipe.unet._forward_hooks


def test_options_pass_through_and_bad_combinations_are_refused(sd1_pipe) -> None:
    with observe(sd1_pipe, every=2, quantities=("x0",)) as obs:
        sd1_pipe("a red circle", generator=gen(0), **KW)
    assert obs.steps.indices == [0, 2] and obs.steps.quantities() == ("x0",)
    with pytest.raises(ValueError, match="steps=True and/or attention=True"):
        observe(sd1_pipe, steps=False)
    with pytest.raises(ValueError, match="steps=False"):
        observe(sd1_pipe, steps=False, attention=True, every=2)
    with pytest.raises(RecorderStateError):
        _ = Observation().steps
    with observe(sd1_pipe):
        with pytest.raises(RecorderStateError, match="already active"):
            with observe(sd1_pipe):
                pass


def test_observation_and_trace_save_load_round_trip(sd1_pipe, tmp_path) -> None:
    with observe(sd1_pipe, quantities="all") as obs:
        sd1_pipe("a red circle", generator=gen(0), **KW)
    obs.save(tmp_path / "obs")
    back = Observation.load(tmp_path / "obs")
    a, b = obs.steps, back.steps
    assert len(a) == len(b) and a.scheduler == b.scheduler and a.meta == b.meta
    for s, t in zip(a, b, strict=True):
        assert s.timestep == t.timestep and s.sigma == t.sigma and s.x0_source == t.x0_source
        assert torch.equal(s.x0, t.x0) and torch.equal(s.preview, t.preview) and t.decoded is None
    assert torch.equal(a.final_latents, b.final_latents)
    # truncated and foreign files give clear errors
    path = tmp_path / "trace.safetensors"
    a.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ResultFileError, match="truncated or corrupt"):
        Trace.load(tmp_path / "cut.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ResultFileError, match="no 'sdexplore.trace' header"):
        Trace.load(tmp_path / "other.safetensors")
    tensors, header = a.to_state()
    del tensors["step1.x0"]
    save_file(
        tensors, str(tmp_path / "mismatch.safetensors"), metadata={"sdexplore.trace": json.dumps(header)}
    )
    with pytest.raises(ResultFileError, match="missing tensor 'step1.x0'"):
        Trace.load(tmp_path / "mismatch.safetensors")
    with pytest.raises(ResultFileError, match="not a saved sdexplore Observation"):
        Observation.load(tmp_path)


def test_generate_returns_images_and_observation(sdxl_pipe) -> None:
    ref = sdxl_pipe("a red circle", generator=gen(3), **KW).images
    images, obs = generate(sdxl_pipe, "a red circle", seed=3, **KW)
    assert np.abs(images - ref).max() <= 1e-6
    assert len(obs.steps) == 3 and obs.steps.family == "sdxl"
    with pytest.raises(ValueError, match="either seed= or generator="):
        generate(sdxl_pipe, "x", seed=1, generator=gen(1))


def test_observe_steps_and_attention_together(sd1_pipe) -> None:
    procs = dict(sd1_pipe.unet.attn_processors)
    ref = sd1_pipe("a red circle", generator=gen(0), **KW).images
    with observe(sd1_pipe, steps=True, attention=True) as obs:
        out = sd1_pipe("a red circle", generator=gen(0), **KW).images
    assert np.abs(out - ref).max() <= 1e-5
    assert len(obs.steps) == 3 and obs.attention.words == ["a", "red", "circle"]
    assert obs.attention.steps.shape == (3, 1, 77, 8, 8)  # (steps, images, tokens, h, w)
    assert all(sd1_pipe.unet.attn_processors[k] is v for k, v in procs.items())
    assert not sd1_pipe.unet._forward_hooks and not sd1_pipe.unet._forward_pre_hooks
    # The map observe() recorded is the one an AttentionRecorder alone records for the same call.
    with AttentionRecorder(sd1_pipe) as rec:
        sd1_pipe("a red circle", generator=gen(0), **KW)
    circle = obs.attention.word("circle")
    assert circle.shape == (8, 8) and circle.std() > 0  # a map, not a constant
    assert torch.allclose(circle, rec.maps.word("circle"), atol=1e-6)


def test_saved_results_are_readable_like_ordinary_files(sd1_pipe, tmp_path):
    import os
    import stat

    with observe(sd1_pipe, steps=True, attention=True) as obs:
        sd1_pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=gen(0))
    folder = obs.save(tmp_path / "obs")
    umask = os.umask(0)
    os.umask(umask)
    for f in ("steps.safetensors", "attention.safetensors"):
        assert stat.S_IMODE(os.stat(folder / f).st_mode) == 0o666 & ~umask, f
