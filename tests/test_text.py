"""Text conditioning: encode_prompt matches a plain call, token inspection, prompt comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gen

from sdexplore.errors import InterpolationError
from sdexplore.interpolate import lerp
from sdexplore.text import compare_prompts, encode_prompt, inspect_prompt, stack_prompts


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_encoded_prompt_reproduces_a_plain_call(family, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    kw = dict(num_inference_steps=2, output_type="np")
    plain = pipe("a red circle", negative_prompt="blurry", generator=gen(3), **kw).images
    enc = encode_prompt(pipe, "a red circle", "blurry")
    via = pipe(**enc.pipe_kwargs(), generator=gen(3), **kw).images
    np.testing.assert_allclose(via, plain, atol=1e-6)


def test_sd1_fields(sd1_pipe):
    enc = encode_prompt(sd1_pipe, "a red circle")
    assert enc.family == "sd1" and enc.prompt == "a red circle"
    assert enc.prompt_embeds.shape == (1, 77, 32) and enc.negative_prompt_embeds.shape == (1, 77, 32)
    assert enc.pooled_prompt_embeds is None and enc.add_time_ids is None
    assert set(enc.pipe_kwargs()) == {"prompt_embeds", "negative_prompt_embeds"}


def test_sdxl_fields_pooled_time_ids_and_zeroed_negative(sdxl_pipe):
    enc = encode_prompt(sdxl_pipe, "a red circle", height=64, width=48)
    assert enc.prompt_embeds.shape == (1, 77, 64)  # both encoders concatenated
    assert enc.pooled_prompt_embeds.shape == (1, 32)
    assert enc.add_time_ids.tolist() == [[64, 48, 0, 0, 64, 48]]
    assert not enc.negative_prompt_embeds.any()  # force_zeros_for_empty_prompt, as in a plain call
    neg = encode_prompt(sdxl_pipe, "a red circle", "blurry")
    assert neg.negative_prompt_embeds.abs().sum() > 0
    assert neg.negative_pooled_prompt_embeds.abs().sum() > 0


def test_encode_prompt_rejects_a_list(sd1_pipe):
    with pytest.raises(TypeError, match="one prompt"):
        encode_prompt(sd1_pipe, ["a", "b"])  # type: ignore[arg-type]


def test_combine_and_stack(sd1_pipe, sdxl_pipe):
    a, b = encode_prompt(sd1_pipe, "a red circle"), encode_prompt(sd1_pipe, "a blue square")
    mid = a.combine([b], lambda x, y: lerp(x, y, 0.5))
    torch.testing.assert_close(mid.prompt_embeds, (a.prompt_embeds + b.prompt_embeds) / 2)
    assert mid.prompt is None
    batch = stack_prompts([a, b, mid])
    assert batch.prompt_embeds.shape == (3, 77, 32)
    with pytest.raises(InterpolationError, match="sdxl"):
        a.combine([encode_prompt(sdxl_pipe, "a red circle")], lerp)


def test_inspect_prompt_shows_bos_eos_padding_and_reference_ids(sd1_pipe):
    info = inspect_prompt(sd1_pipe, "a photo of a cat")
    assert info.ids[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(info.tokens) == len(info.ids) == len(info.kinds) == 77
    assert info.kinds[:7] == ["bos", "word", "word", "word", "word", "word", "eos"]
    assert set(info.kinds[7:]) == {"pad"} and info.n_words == 5
    assert info.tokens[0] == "<|startoftext|>" and info.tokens[6] == "<|endoftext|>"
    assert info.norms.shape == (77,) and info.pooled is None
    table = info.table()
    assert "cat</w>" in table and "70 padding positions" in table
    assert len(info.table(padding=True).splitlines()) == 78


def test_inspect_prompt_sdxl_splits_encoders_and_has_pooled(sdxl_pipe):
    info = inspect_prompt(sdxl_pipe, "a red circle")
    assert info.encoder_norms.shape == (2, 77)
    torch.testing.assert_close(info.encoder_norms.pow(2).sum(0), info.norms.pow(2))
    assert info.pooled is not None and info.pooled.shape == (32,)


def test_compare_prompts_per_token_follows_the_causal_mask(sdxl_pipe):
    same = compare_prompts(sdxl_pipe, "a red circle", "a red circle")
    torch.testing.assert_close(same.per_token, torch.ones(77), atol=1e-5, rtol=0)
    assert same.pooled == pytest.approx(1.0, abs=1e-5)
    diff = compare_prompts(sdxl_pipe, "a red circle", "a blue circle")
    # CLIP's text encoder is causal: positions before the changed word are untouched, from it on they differ
    torch.testing.assert_close(diff.per_token[:2], torch.ones(2), atol=1e-5, rtol=0)
    assert diff.per_token[2] < 0.99 and diff.per_token[3] < 0.999
    assert diff.pooled is not None and diff.pooled < 0.999
    assert diff.mean_words < 1.0
    assert "blue</w>" in diff.table() and "pooled" in diff.table()
