"""The steps recorder's per-call and per-step costs (issue 31's ≤ 1.15× on the tiny fixtures).

No timing here: each test asserts that a piece of per-call or per-step work is gone while the values recorded are
exactly those of the explicit computation.
"""

from __future__ import annotations

import math

import pytest
import torch

import sdexplore as sdx
from sdexplore.fixtures import fixture_call_defaults, tiny_pipeline
from sdexplore.preview import latent_to_uint8, uint8_factors
from sdexplore.record import steps as steps_module


def _call(pipe, name: str, steps: int = 2) -> None:
    kw = dict(num_inference_steps=steps, height=64, width=64, output_type="latent")
    kw.update(fixture_call_defaults(name))
    with torch.no_grad():
        pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), **kw)


def test_each_trace_keeps_its_own_preview_factors_without_a_deep_copy(monkeypatch) -> None:
    pipe = tiny_pipeline("qwen-image")

    def no_deepcopy(*args, **kwargs):
        raise AssertionError("copy.deepcopy called for a run's preview factors")

    monkeypatch.setattr(steps_module.copy, "deepcopy", no_deepcopy)
    with sdx.observe(pipe, steps=True) as obs:
        _call(pipe, "qwen-image")
        _call(pipe, "qwen-image")
    first, second = (run.meta["latent_rgb"] for run in obs.runs)
    assert first == second
    first["factors"][0][0] += 1.0  # editing one trace's factors leaves the other's and the recorder's
    first["bias"][0] += 1.0
    assert second["factors"][0][0] == first["factors"][0][0] - 1.0
    assert second["bias"][0] == first["bias"][0] - 1.0


@pytest.mark.parametrize("name", ["qwen-image", "pixart-sigma", "wan"])
def test_recorded_quantities_equal_their_explicit_computation(name) -> None:
    """Every latent-shaped quantity is the step's float32 tensor in float16, the noise norm is the root mean square
    of a row, the preview the uint8 preview of x0: bitwise, with the per-step work cut."""
    pipe = tiny_pipeline(name)
    seen = []

    def listen(rec, trace) -> None:  # a live listener sees the step's record as it is made
        seen.append(rec)

    from sdexplore.record.attach import Subscriber, attach

    raw = []
    tap = Subscriber(
        kind="listener",
        step=lambda step: raw.append(
            (step.sample.clone(), step.model_output.clone(), step.x0.clone(), step.run.denoiser_out.clone())
        ),
    )
    with sdx.observe(pipe, steps=True, on_step=listen) as obs, attach(pipe, tap):
        _call(pipe, name)
    rec = obs.runs[0]
    factors, bias = uint8_factors(*(torch.tensor(v) for v in rec.meta["latent_rgb"].values()))
    assert len(rec.steps) == len(raw) == 2
    for step, (sample, mo, x0, out) in zip(rec.steps, raw, strict=True):
        assert torch.equal(step.latents, sample.to(torch.float16))
        assert torch.equal(step.noise_pred, mo.to(torch.float16))
        assert torch.equal(step.x0, x0.to(torch.float16))
        cond = out if out.shape[0] == sample.shape[0] else out.chunk(2)[1]
        assert torch.equal(step.noise_cond, cond.to(torch.float16))
        norm = torch.linalg.vector_norm(mo, dim=tuple(range(1, mo.ndim)), dtype=torch.float32)
        assert torch.equal(step.noise_norm, norm.mul_(1.0 / math.sqrt(mo[0].numel())))
        src = x0.movedim(2, 1).flatten(0, 1) if x0.ndim == 5 else x0  # a video's frames: (B·F, C, h, w)
        rgb = latent_to_uint8(src, factors, bias, scaled=True)
        if x0.ndim == 5:
            rgb = rgb.unflatten(0, (-1, x0.shape[2]))  # (B, F, h, w, 3)
        assert torch.equal(step.preview, rgb)
        assert step.noise_norm.dtype == torch.float32 and step.preview.dtype == torch.uint8
    assert [s.index for s in seen] == [s.index for s in rec.steps]


def test_the_steps_plan_is_worked_out_once_per_config() -> None:
    pipe = tiny_pipeline("qwen-image")
    rec = steps_module.StepRecorder(pipe, quantities=("latents", "preview"))
    first = rec._plan()
    assert first == (("latents",), True)  # the preview is of x0 by default
    assert rec._plan() is not None and rec.__dict__["_plan_of"][0] is rec.config
    rec.config = steps_module.StepConfig(quantities=("x0", "latents"), preview_of="latents")
    assert rec._plan() == (("latents", "x0"), True)  # a new config, a new plan, in the recording order


@pytest.mark.parametrize("name", ["qwen-image", "flux"])
def test_a_packed_step_is_unpacked_in_one_copy_with_the_same_values(name, monkeypatch) -> None:
    """A packed family's step hands out the prediction, the latents in and out unpacked from one block: one
    unpack a step (not one per tensor), each tensor equal to its own unpacking and contiguous."""
    from sdexplore.families import Family, detect_family
    from sdexplore.record.attach import Subscriber, attach

    pipe = tiny_pipeline(name)
    fam = detect_family(pipe)
    packed, unpacked, calls = [], [], []
    real_step = pipe.scheduler.step

    def scheduler_step(model_output, timestep, sample, *args, **kwargs):  # the scheduler's packed tensors
        out = real_step(model_output, timestep, sample, *args, **kwargs)
        packed.append((model_output.clone(), sample.clone(), out[0].clone()))
        return out

    real_unpack = Family.unpack_latents

    def counting(self, tokens, grid):
        calls.append(tokens.shape[0])
        return real_unpack(self, tokens, grid)

    pipe.scheduler.step = scheduler_step
    monkeypatch.setattr(Family, "unpack_latents", counting)
    tap = Subscriber(
        kind="listener",
        step=lambda step: unpacked.append(
            (step.model_output.clone(), step.sample.clone(), step.prev_sample.clone(), step.run.latent_grid)
        ),
    )
    try:
        with attach(pipe, tap):
            _call(pipe, name)
    finally:
        del pipe.scheduler.step
    assert len(unpacked) == len(packed) == 2
    b = packed[0][0].shape[0]
    assert calls == [3 * b, 3 * b]  # one unpack of the three tensors a step
    for (mo, sample, prev, grid), raw in zip(unpacked, packed, strict=True):
        for got, tokens in zip((mo, sample, prev), raw, strict=True):
            assert torch.equal(got, real_unpack(fam, tokens, grid)) and got.is_contiguous()


def test_a_video_preview_hands_its_frames_channels_last_to_the_linear_preview(monkeypatch) -> None:
    """A video's frames reach the linear preview as (B·F, C, h, w) whose (B·F·h·w, C) rows are already laid out:
    one copy a step, not two; the previews are those of the frames flattened the plain way (the values test
    above)."""
    pipe = tiny_pipeline("wan")
    seen = []
    real = steps_module.latent_to_uint8

    def spying(latents, *args, **kwargs):
        seen.append(latents.permute(0, 2, 3, 1).is_contiguous())
        return real(latents, *args, **kwargs)

    monkeypatch.setattr(steps_module, "latent_to_uint8", spying)
    with sdx.observe(pipe, steps=True) as obs:
        _call(pipe, "wan")
    assert seen == [True, True]
    assert obs.runs[0].steps[0].preview.ndim == 5  # (B, F, h, w, 3)
