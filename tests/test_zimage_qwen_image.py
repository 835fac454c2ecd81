"""Z-Image and Qwen-Image beyond the conformance suite: the padded and masked sequences their attention capture
must place (a long negative prompt, a batch of prompts of different lengths), Qwen-Image's true CFG at its own
default scale, prompt switches on Qwen-Image, and the steering Z-Image's per-row inputs cannot take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gen

import sdexplore as sdx
from sdexplore.errors import InvalidArgumentError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.record.steering import PromptSwitch

P = "a red circle on a blue background"
KW = dict(num_inference_steps=2, height=64, width=64, output_type="np")
LONG = " ".join(["a big green square on a white sky"] * 6)  # > 32 Qwen tokens: a second caption block


@pytest.fixture(scope="module")
def zimage():
    return tiny_pipeline("z-image")


@pytest.fixture(scope="module")
def qwen():
    return tiny_pipeline("qwen-image")


def _maps(pipe, **call):
    with sdx.observe(pipe, steps=False, attention={"keep_probs": True}) as obs:
        image = pipe(generator=gen(0), **KW, **call).images
    return image, obs.attention


def test_zimage_long_negative_prompt_masks_the_batch_and_keeps_the_prompts_maps(zimage) -> None:
    """The negative caption fills two blocks of 32, the prompt's one: the batch is padded and masked, the text
    starts after the padded image part in both rows, and the prompt row's maps are those of a call whose batch needs
    no mask at the first step (its own keys are the same; only the kernel differs)."""
    want = zimage(prompt=P, negative_prompt=LONG, generator=gen(0), **KW).images
    image, maps = _maps(zimage, prompt=P, negative_prompt=LONG)
    assert np.array_equal(image, want)  # bitwise: the masked call goes through the same SDPA call
    _, short = _maps(zimage, prompt=P)
    t = len(short.token_lists[0].ids)  # the prompt's own caption tokens
    assert len(maps.token_lists[0].ids) > t and maps.token_lists[0].pieces[t:] == ["<pad>"] * (
        len(maps.token_lists[0].ids) - t
    )
    assert maps.words == P.split()
    for layer, probs in short.probs.items():  # the first step: the same latents (later the negatives differ)
        torch.testing.assert_close(maps.probs[layer][0, ..., :t], probs[0], rtol=0, atol=1e-5)


def test_qwen_image_batch_of_unequal_prompts_masks_the_padding_keys(qwen) -> None:
    """Two prompts of different lengths: Qwen-Image pads the shorter one's states and masks them. Each row's maps
    equal its own single-prompt call's, the padding keys get nothing, the shorter row's labels are padded."""
    prompts = [LONG, P]
    want = qwen(prompt=prompts, generator=[gen(0), gen(1)], **KW).images
    with sdx.observe(qwen, steps=False, attention={"keep_probs": True}) as obs:
        image = qwen(prompt=prompts, generator=[gen(0), gen(1)], **KW).images
    assert np.array_equal(image, want)
    maps = obs.attention
    with sdx.observe(qwen, steps=False, attention={"keep_probs": True}) as obs1:
        qwen(prompt=P, generator=gen(1), **KW)
    alone = obs1.attention
    t = len(alone.token_lists[0].ids)
    assert maps.token_lists[1].pieces[t:] == ["<pad>"] * (len(maps.token_lists[1].ids) - t)
    for layer, probs in alone.probs.items():
        got = maps.probs[layer][:, 1]  # (S, heads, HW, T): the shorter prompt's row
        torch.testing.assert_close(got[..., :t], probs[:, 0], rtol=0, atol=1e-5)
        assert float(got[..., t:].abs().max()) == 0.0  # masked keys: no probability


def test_qwen_image_true_cfg_uses_the_pipelines_default_scale(qwen) -> None:
    """A negative prompt without true_cfg_scale runs true CFG at the pipeline's default 4.0 (two calls per step):
    the steps say so and keep both predictions; the image is the plain call's."""
    want = qwen(prompt=P, negative_prompt="a green square", generator=gen(0), **KW).images
    with sdx.observe(qwen, steps={"quantities": "all"}) as obs:
        image = qwen(prompt=P, negative_prompt="a green square", generator=gen(0), **KW).images
    assert np.array_equal(image, want)
    assert [s.guidance_scale for s in obs.steps.steps] == [4.0, 4.0]
    step = obs.steps.steps[0]
    assert step.noise_uncond is not None and not torch.equal(step.noise_uncond, step.noise_cond)


def test_qwen_image_prompt_switch_needs_as_many_tokens(qwen) -> None:
    """Qwen-Image keeps only the prompt's own tokens: a switch to a prompt of as many tokens steers, another
    length is refused with what to do."""
    want = qwen(prompt=P, generator=gen(0), **KW).images
    with sdx.observe(qwen, switch_prompt=PromptSwitch(at_step=1, prompt=P)):
        same = qwen(prompt=P, generator=gen(0), **KW).images
    assert np.array_equal(same, want)  # switching to the prompt itself: the same embeddings, the same image
    other = "a green square on a white background"  # 9 tokens, as P
    with sdx.observe(qwen, switch_prompt=PromptSwitch(at_step=1, prompt=other)):
        switched = qwen(prompt=P, generator=gen(0), **KW).images
    assert not np.array_equal(switched, want)  # (the tiny random model moves little: any change counts)
    with pytest.raises(InvalidArgumentError, match="as many tokens"):
        with sdx.observe(qwen, switch_prompt=PromptSwitch(at_step=1, prompt="a green square")):
            qwen(prompt=P, generator=gen(0), **KW)


def test_zimage_refuses_prompt_switches_and_guidance_schedules_before_the_run(zimage) -> None:
    with pytest.raises(InvalidArgumentError, match="Prompt switches are not available on Z-Image"):
        sdx.observe(zimage, switch_prompt=PromptSwitch(at_step=1, prompt="a green square"))
    with pytest.raises(InvalidArgumentError, match="Guidance schedules are not available on Z-Image"):
        sdx.observe(zimage, guidance=[5.0, 1.0])


def test_zimage_steps_record_the_negated_prediction_and_the_scale_plus_one(zimage) -> None:
    """Z-Image's CFG is c + g·(c − u) on a model that predicts x0 − ε: recorded as the usual u + (g + 1)·(c − u)
    on the negated outputs, the prediction the scheduler steps."""
    with sdx.observe(zimage, steps={"quantities": "all", "dtype": torch.float32}) as obs:
        zimage(prompt=P, guidance_scale=3.0, generator=gen(0), **KW)
    for step in obs.steps.steps:
        assert step.guidance_scale == 4.0
        u, c = step.noise_uncond, step.noise_cond
        torch.testing.assert_close(step.noise_pred, u + 4.0 * (c - u), rtol=1e-4, atol=1e-5)


def test_sizes_are_multiples_of_the_vae_factor_times_the_patch(zimage, qwen) -> None:
    from sdexplore.families import size_unit

    assert size_unit(zimage) == 16  # Z-Image's transformer patchifies 2×2 itself (all_patch_size)
    assert size_unit(qwen) == 16  # Qwen-Image's pipeline packs 2×2 latents into a token
