"""Steering at step k: prompt switch, stop early, guidance schedule, latent edits — and nothing else changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gen

from sdexplore.record.steering import PromptSwitch
from sdexplore.record.steps import StepRecorder, steer

KW = dict(num_inference_steps=4, height=64, width=64, output_type="np")


def run(pipe, prompt="a red circle", **rec_kw):
    with StepRecorder(pipe, quantities="all", dtype=torch.float32, **rec_kw) as rec:
        img = pipe(prompt, generator=gen(0), **KW).images
    return img, rec.trace


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_prompt_switch_changes_only_steps_from_k(family: str, request) -> None:
    pipe = request.getfixturevalue(f"{family}_pipe")
    _, base = run(pipe)
    _, other = run(pipe, prompt="a blue square")
    img, sw = run(pipe, switch_prompt=PromptSwitch(at_step=2, prompt="a blue square"))
    for i in (0, 1):
        assert torch.equal(sw[i].noise_pred, base[i].noise_pred)
    assert torch.equal(sw[2].latents, base[2].latents)  # step 2 starts from the same latents...
    assert not torch.allclose(sw[2].noise_cond, base[2].noise_cond)  # ...but is conditioned on the new prompt
    torch.testing.assert_close(sw[2].noise_uncond, base[2].noise_uncond)
    # switching at step 0 is the same as running the new prompt from the start
    _, sw0 = run(pipe, switch_prompt=PromptSwitch(at_step=0, prompt="a blue square"))
    torch.testing.assert_close(sw0[-1].latents_out, other[-1].latents_out, atol=1e-5, rtol=1e-5)


def test_stop_at_k_returns_k_steps_and_decodes(sd1_pipe) -> None:
    full, base = run(sd1_pipe)
    img, tr = run(sd1_pipe, stop_at=2)
    assert len(tr) == 2 and tr.stopped_at == 1 and img.shape == full.shape
    torch.testing.assert_close(tr.final_latents, base[1].latents_out)
    assert np.abs(img - full).max() > 1e-3
    assert sd1_pipe._interrupt is False  # the flag is handed back
    _, tr_x0 = run(sd1_pipe, stop_at=2, stop_returns="x0")
    torch.testing.assert_close(tr_x0.final_latents, base[1].x0)
    # the next plain call runs all steps again
    again = sd1_pipe("a red circle", generator=gen(0), **KW).images
    assert np.abs(again - full).max() == 0


def test_guidance_schedule_equals_the_pipeline_at_that_scale(sd1_pipe) -> None:
    ref3 = sd1_pipe("a red circle", generator=gen(0), guidance_scale=3.0, **KW).images
    with steer(sd1_pipe, guidance=[3.0] * 4) as rec:
        out = sd1_pipe("a red circle", generator=gen(0), guidance_scale=7.5, **KW).images
    assert np.abs(out - ref3).max() <= 1e-5
    assert rec.trace.guidance_scales.tolist() == [3.0] * 4
    with steer(sd1_pipe, guidance=lambda i, n: 7.5 if i < n // 2 else 1.5) as rec:
        sd1_pipe("a red circle", generator=gen(0), guidance_scale=7.5, **KW)
    assert rec.trace.guidance_scales.tolist() == [7.5, 7.5, 1.5, 1.5]
    with pytest.raises(ValueError, match="one scale per step"):
        with steer(sd1_pipe, guidance=[2.0, 3.0]):
            sd1_pipe("a red circle", generator=gen(0), **KW)
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        with steer(sd1_pipe, guidance=[2.0] * 4):
            sd1_pipe("a red circle", generator=gen(0), guidance_scale=1.0, **KW)


def test_latent_edit_applies_from_the_next_step(sd1_pipe) -> None:
    full, base = run(sd1_pipe)
    same, _ = run(sd1_pipe, edit_latents=lambda i, x: x)
    assert np.abs(same - full).max() <= 1e-6

    def zero_at_1(i, x):
        return torch.zeros_like(x) if i == 1 else x

    img, tr = run(sd1_pipe, edit_latents=zero_at_1)
    torch.testing.assert_close(tr[1].noise_pred, base[1].noise_pred)  # step 1 itself is unchanged
    assert tr[2].latents.abs().max() == 0 and tr[1].latents_out.abs().max() == 0
    assert np.abs(img - full).max() > 1e-3
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        run(sd1_pipe, edit_latents=lambda i, x: x[:, :2])


def test_steer_rejects_recording_options(sd1_pipe) -> None:
    with pytest.raises(TypeError, match="unexpected option"):
        steer(sd1_pipe, quantities=("x0",))
    with pytest.raises(ValueError, match="exactly one of"):
        PromptSwitch(at_step=1)
