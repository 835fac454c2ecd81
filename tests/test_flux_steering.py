"""Steering on Flux.1 (packed latents, no CFG batch): prompt switch (T5 sequence and CLIP pooled), the distilled
guidance schedule (dev), latent edits in unpacked space, stop at k — as tests/test_sd3_steering.py on SD3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gen
from diffusers import FluxPipeline

from sdexplore.families import FLUX
from sdexplore.fixtures import tiny_pipeline
from sdexplore.record.steering import PromptSwitch
from sdexplore.record.steps import StepRecorder, steer

P, Q = "a red circle", "a blue square"
KW = dict(num_inference_steps=4, height=64, width=64, output_type="np", max_sequence_length=24)


@pytest.fixture(scope="module")
def flux_pipe():
    return tiny_pipeline("flux")


def run(pipe, prompt=P, call=None, **rec_kw):
    with StepRecorder(pipe, quantities="all", dtype=torch.float32, **rec_kw) as rec:
        img = pipe(prompt, generator=gen(0), **KW, **(call or {})).images
    return img, rec.trace


class _Inputs:
    """The transformer's inputs at each call, seen by a hook of the test's own (registered after sdexplore's, so
    it sees what the steering handed on)."""

    def __init__(self, pipe) -> None:
        self.text, self.pooled, self.guidance = [], [], []
        self.handle = pipe.transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.text.append(kwargs["encoder_hidden_states"].clone())
        self.pooled.append(kwargs["pooled_projections"].clone())
        self.guidance.append(None if kwargs["guidance"] is None else kwargs["guidance"].clone())


def test_prompt_switch_replaces_the_t5_sequence_and_the_pooled_embedding_from_k(flux_pipe) -> None:
    _, base = run(flux_pipe)
    _, other = run(flux_pipe, prompt=Q)
    with StepRecorder(
        flux_pipe, quantities="all", dtype=torch.float32, switch_prompt=PromptSwitch(2, Q)
    ) as rec:
        seen = _Inputs(flux_pipe)
        try:
            flux_pipe(P, generator=gen(0), **KW)
        finally:
            seen.handle.remove()
    sw = rec.trace
    new = FLUX.encode_prompt(flux_pipe, Q, device="cpu", max_sequence_length=24)
    old = FLUX.encode_prompt(flux_pipe, P, device="cpu", max_sequence_length=24)
    for i in range(4):  # (1, 24, 64) and (1, 32): one call per step, no CFG batch
        want = new if i >= 2 else old
        torch.testing.assert_close(seen.text[i], want.embeds)
        torch.testing.assert_close(seen.pooled[i], want.pooled)
    for i in (0, 1):
        assert torch.equal(sw[i].noise_pred, base[i].noise_pred)
    assert torch.equal(sw[2].latents, base[2].latents)  # step 2 starts from the same latents...
    assert not torch.allclose(sw[2].noise_pred, base[2].noise_pred)  # ...but is conditioned on the new prompt
    # switching at step 0 is the same as running the new prompt from the start (both embeddings switched)
    _, sw0 = run(flux_pipe, switch_prompt=PromptSwitch(at_step=0, prompt=Q))
    torch.testing.assert_close(sw0[-1].latents_out, other[-1].latents_out, atol=1e-5, rtol=1e-5)
    given = PromptSwitch(at_step=0, prompt_embeds=new.embeds, pooled_prompt_embeds=new.pooled)
    _, sw_given = run(flux_pipe, switch_prompt=given)
    torch.testing.assert_close(sw_given[-1].latents_out, other[-1].latents_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="encode it with the same pipeline"):  # 512 T5 tokens given, 24 used
        wrong = PromptSwitch(0, prompt_embeds=torch.zeros(1, 512, 64), pooled_prompt_embeds=new.pooled)
        run(flux_pipe, switch_prompt=wrong)


def test_prompt_switch_under_true_cfg_leaves_the_negative_call_alone(flux_pipe) -> None:
    call = dict(negative_prompt="blurry", true_cfg_scale=3.0)
    with StepRecorder(
        flux_pipe, quantities="all", dtype=torch.float32, switch_prompt=PromptSwitch(1, Q)
    ) as rec:
        seen = _Inputs(flux_pipe)
        try:
            flux_pipe(P, generator=gen(0), **KW, **call)
        finally:
            seen.handle.remove()
    new = FLUX.encode_prompt(flux_pipe, Q, device="cpu", max_sequence_length=24)
    enc = FLUX.encode_prompt(flux_pipe, P, device="cpu", negative_prompt="blurry", max_sequence_length=24)
    assert len(seen.text) == 8  # two calls per step: the prompt's, then the negative prompt's
    for i in range(4):
        cond = new if i >= 1 else enc
        torch.testing.assert_close(seen.text[2 * i], cond.embeds)
        torch.testing.assert_close(seen.pooled[2 * i], cond.pooled)
        torch.testing.assert_close(seen.text[2 * i + 1], enc.negative)
        torch.testing.assert_close(seen.pooled[2 * i + 1], enc.negative_pooled)
    assert not torch.allclose(seen.text[2], seen.text[0])  # the switch really changed the prompt's call
    for step in rec.trace.steps:
        torch.testing.assert_close(
            step.noise_pred, step.noise_uncond + 3.0 * (step.noise_cond - step.noise_uncond)
        )


def test_guidance_schedule_sets_the_distilled_guidance(flux_pipe) -> None:
    ref2 = flux_pipe(P, generator=gen(0), guidance_scale=2.0, **KW).images
    with steer(flux_pipe, guidance=[2.0] * 4) as rec:
        out = flux_pipe(P, generator=gen(0), guidance_scale=5.0, **KW).images
    assert np.array_equal(out, ref2)  # the same input the pipeline builds at 2.0: bitwise
    assert rec.trace.guidance_scales.tolist() == [2.0] * 4
    with steer(flux_pipe, guidance=lambda i, n: 5.0 if i < n // 2 else 1.5) as rec:
        seen = _Inputs(flux_pipe)
        try:
            half = flux_pipe(P, generator=gen(0), guidance_scale=5.0, **KW).images
        finally:
            seen.handle.remove()
    assert rec.trace.guidance_scales.tolist() == [5.0, 5.0, 1.5, 1.5]
    assert [g.tolist() for g in seen.guidance] == [[5.0], [5.0], [1.5], [1.5]]
    assert np.abs(half - flux_pipe(P, generator=gen(0), guidance_scale=5.0, **KW).images).max() > 1e-4
    with pytest.raises(ValueError, match="true CFG"):
        with steer(flux_pipe, guidance=[2.0] * 4):
            flux_pipe(P, generator=gen(0), negative_prompt="blurry", true_cfg_scale=3.0, **KW)
    schnell = tiny_pipeline("flux", variant="schnell")
    with pytest.raises(ValueError, match="no guidance input"):
        with steer(schnell, guidance=[2.0] * 4):
            schnell(P, generator=gen(0), **KW)


def test_stop_at_k_returns_k_steps_and_decodes(flux_pipe) -> None:
    full, base = run(flux_pipe)
    img, tr = run(flux_pipe, stop_at=2)
    assert len(tr) == 2 and tr.stopped_at == 1 and img.shape == full.shape
    torch.testing.assert_close(tr.final_latents, base[1].latents_out)
    assert np.abs(img - full).max() > 1e-3 and flux_pipe._interrupt is False
    _, tr_x0 = run(flux_pipe, stop_at=2, stop_returns="x0")
    torch.testing.assert_close(tr_x0.final_latents, base[1].x0)
    assert np.abs(flux_pipe(P, generator=gen(0), **KW).images - full).max() == 0


def test_latent_edits_are_unpacked_and_packed_back(flux_pipe) -> None:
    full, base = run(flux_pipe)
    same, _ = run(flux_pipe, edit_latents=lambda i, x: x)
    assert np.abs(same - full).max() == 0
    shapes, packed = [], []

    def zero_left_at_1(i, x):  # (1, 16, 8, 8): the left half of the latent image, in unpacked space
        shapes.append(tuple(x.shape))
        if i != 1:
            return x
        x = x.clone()
        x[..., :4] = 0
        return x

    with StepRecorder(flux_pipe, quantities="all", dtype=torch.float32, edit_latents=zero_left_at_1) as rec:
        img = flux_pipe(
            P,
            generator=gen(0),
            callback_on_step_end=lambda p, i, t, k: packed.append(k["latents"]) or k,
            **KW,
        ).images
    tr = rec.trace
    assert shapes == [(1, 16, 8, 8)] * 4
    torch.testing.assert_close(tr[1].noise_pred, base[1].noise_pred)  # step 1 itself is unchanged
    unpacked = FluxPipeline._unpack_latents(packed[1], 64, 64, 8)  # what the pipeline continued from
    assert unpacked[..., :4].abs().max() == 0 and torch.equal(unpacked[..., 4:], base[1].latents_out[..., 4:])
    assert torch.equal(tr[2].latents, unpacked)
    assert np.abs(img - full).max() > 1e-3
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        run(flux_pipe, edit_latents=lambda i, x: FLUX.pack_latents(x))  # packed tokens are not the latents
