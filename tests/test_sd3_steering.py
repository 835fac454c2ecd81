"""Steering on SD3 (flow matching, MMDiT): prompt switch (CLIP+T5 sequence and pooled), guidance schedule,
latent edits, stop at k — as the UNet families' tests in test_steps_steering.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gen

from sdexplore.families import SD3
from sdexplore.fixtures import tiny_pipeline
from sdexplore.record.steering import PromptSwitch
from sdexplore.record.steps import StepRecorder, steer

P, Q = "a red circle", "a blue square"
KW = dict(num_inference_steps=4, height=64, width=64, output_type="np")


@pytest.fixture
def sd3_pipe():
    return tiny_pipeline("sd3")


def run(pipe, prompt=P, call=None, **rec_kw):
    with StepRecorder(pipe, quantities="all", dtype=torch.float32, **rec_kw) as rec:
        img = pipe(prompt, generator=gen(0), **KW, **(call or {})).images
    return img, rec.trace


class _Inputs:
    """The transformer's text inputs at each call, seen by a hook of the test's own (registered after sdexplore's,
    so it sees what the switch handed on)."""

    def __init__(self, pipe) -> None:
        self.text, self.pooled = [], []
        self.handle = pipe.transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.text.append(kwargs["encoder_hidden_states"].clone())
        self.pooled.append(kwargs["pooled_projections"].clone())


@pytest.mark.parametrize("t5", [True, False])
def test_prompt_switch_replaces_the_sequence_and_the_pooled_embedding_from_k(t5: bool) -> None:
    pipe = tiny_pipeline("sd3", t5=t5)
    _, base = run(pipe)
    _, other = run(pipe, prompt=Q)
    with StepRecorder(pipe, quantities="all", dtype=torch.float32, switch_prompt=PromptSwitch(2, Q)) as rec:
        seen = _Inputs(pipe)
        pipe(P, generator=gen(0), **KW)
        seen.handle.remove()
    sw = rec.trace
    new = SD3.encode_prompt(pipe, Q, device="cpu", do_classifier_free_guidance=False)
    old = SD3.encode_prompt(pipe, P, device="cpu")
    for i in range(4):  # (2, tokens, D) and (2, P): the unconditional half first, always the empty prompt's
        cond_text, cond_pooled = (new.embeds, new.pooled) if i >= 2 else (old.embeds, old.pooled)
        torch.testing.assert_close(seen.text[i], torch.cat([old.negative, cond_text]))
        torch.testing.assert_close(seen.pooled[i], torch.cat([old.negative_pooled, cond_pooled]))
    for i in (0, 1):
        assert torch.equal(sw[i].noise_pred, base[i].noise_pred)
    assert torch.equal(sw[2].latents, base[2].latents)  # step 2 starts from the same latents...
    assert not torch.allclose(sw[2].noise_cond, base[2].noise_cond)  # ...but is conditioned on the new prompt
    torch.testing.assert_close(sw[2].noise_uncond, base[2].noise_uncond)
    # switching at step 0 is the same as running the new prompt from the start (both embeddings switched)
    _, sw0 = run(pipe, switch_prompt=PromptSwitch(at_step=0, prompt=Q))
    torch.testing.assert_close(sw0[-1].latents_out, other[-1].latents_out, atol=1e-5, rtol=1e-5)


def test_prompt_switch_follows_the_calls_t5_length_and_takes_embeddings(sd3_pipe) -> None:
    call = dict(max_sequence_length=24)
    _, other = run(sd3_pipe, prompt=Q, call=call)
    _, sw0 = run(sd3_pipe, call=call, switch_prompt=PromptSwitch(at_step=0, prompt=Q))  # 77 + 24 tokens
    torch.testing.assert_close(sw0[-1].latents_out, other[-1].latents_out, atol=1e-5, rtol=1e-5)
    enc = SD3.encode_prompt(
        sd3_pipe, Q, device="cpu", do_classifier_free_guidance=False, max_sequence_length=24
    )
    given = PromptSwitch(at_step=0, prompt_embeds=enc.embeds, pooled_prompt_embeds=enc.pooled)
    _, sw_given = run(sd3_pipe, call=call, switch_prompt=given)
    torch.testing.assert_close(sw_given[-1].latents_out, other[-1].latents_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="encode it with the same pipeline"):  # 77 + 256 tokens given
        wrong = PromptSwitch(0, prompt_embeds=torch.zeros(1, 77 + 256, 64), pooled_prompt_embeds=enc.pooled)
        run(sd3_pipe, call=call, switch_prompt=wrong)


def test_stop_at_k_returns_k_steps_and_decodes(sd3_pipe) -> None:
    full, base = run(sd3_pipe)
    img, tr = run(sd3_pipe, stop_at=2)
    assert len(tr) == 2 and tr.stopped_at == 1 and img.shape == full.shape
    torch.testing.assert_close(tr.final_latents, base[1].latents_out)
    assert np.abs(img - full).max() > 1e-3
    assert sd3_pipe._interrupt is False
    _, tr_x0 = run(sd3_pipe, stop_at=2, stop_returns="x0")
    torch.testing.assert_close(tr_x0.final_latents, base[1].x0)
    torch.testing.assert_close(base[1].x0, base[1].latents - base[1].timestep / 1000 * base[1].noise_pred)
    again = sd3_pipe(P, generator=gen(0), **KW).images
    assert np.abs(again - full).max() == 0


def test_guidance_schedule_equals_the_pipeline_at_that_scale(sd3_pipe) -> None:
    ref3 = sd3_pipe(P, generator=gen(0), guidance_scale=3.0, **KW).images
    with steer(sd3_pipe, guidance=[3.0] * 4) as rec:
        out = sd3_pipe(P, generator=gen(0), guidance_scale=7.0, **KW).images
    assert np.abs(out - ref3).max() <= 1e-5
    assert rec.trace.guidance_scales.tolist() == [3.0] * 4
    with steer(sd3_pipe, guidance=lambda i, n: 7.0 if i < n // 2 else 1.5) as rec:
        half = sd3_pipe(P, generator=gen(0), guidance_scale=7.0, **KW).images
    assert rec.trace.guidance_scales.tolist() == [7.0, 7.0, 1.5, 1.5]
    assert np.abs(half - sd3_pipe(P, generator=gen(0), guidance_scale=7.0, **KW).images).max() > 1e-4
    with pytest.raises(ValueError, match="guidance_scale > 1"):
        with steer(sd3_pipe, guidance=[2.0] * 4):
            sd3_pipe(P, generator=gen(0), guidance_scale=1.0, **KW)


def test_latent_edit_applies_from_the_next_step(sd3_pipe) -> None:
    full, base = run(sd3_pipe)
    same, _ = run(sd3_pipe, edit_latents=lambda i, x: x)
    assert np.abs(same - full).max() == 0

    def zero_at_1(i, x):
        return torch.zeros_like(x) if i == 1 else x

    img, tr = run(sd3_pipe, edit_latents=zero_at_1)
    torch.testing.assert_close(tr[1].noise_pred, base[1].noise_pred)  # step 1 itself is unchanged
    assert tr[2].latents.abs().max() == 0 and tr[1].latents_out.abs().max() == 0
    assert np.abs(img - full).max() > 1e-3
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        run(sd3_pipe, edit_latents=lambda i, x: x[:, :2])
