"""Causal token ablation (sdexplore/record/ablate_text.py) on the tiny random SD1, SDXL and SD3 (with T5) pipelines.

The word is removed from the text encoders' context: in CLIP (causal) every position before the word keeps its
embedding and every later one changes; in T5 (bidirectional) positions on both sides change; the pooled vector
(read at end-of-text) changes. In a call, only the chosen images' conditional rows change: the others are the
plain images bit for bit, and the pipeline is restored exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_restored, gen, pipeline_state

import sdexplore as sdx
from sdexplore.errors import InvalidArgumentError, UnsupportedPipelineError, WordNotFoundError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.record.ablate_text import CausalAblation, ablated_prompt_embeds
from sdexplore.record.control import Control, Reweight
from sdexplore.record.tokens import sequence_tokens

P = "a big red circle on a blue background"
RUN = dict(num_inference_steps=2, output_type="np")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-5, atol=1e-5))


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_the_word_leaves_the_causal_context_only_after_its_position(family) -> None:
    pipe = tiny_pipeline(family)
    plain = sdx.encode_prompt(pipe, P)
    ablated = ablated_prompt_embeds(pipe, P, "circle")
    p = sequence_tokens(pipe, P).positions("circle")[0]  # its CLIP position (SD3: the first 77 are CLIP's)
    assert ablated.positions["text_encoder"] == [p]
    a, b = ablated.prompt_embeds[0], plain.prompt_embeds[0]  # (T, D)
    assert a.shape == b.shape
    assert _close(a[:p], b[:p])  # CLIP is causal: nothing before the word read it
    changed = (a[p + 1 : 77] - b[p + 1 : 77]).abs().amax(-1) > 1e-4
    assert bool(changed.all())  # every later token, end-of-text and the padding had read it
    if plain.pooled_prompt_embeds is not None:  # SDXL, SD3: pooled at end-of-text
        assert not _close(ablated.pooled_prompt_embeds, plain.pooled_prompt_embeds)
    if family == "sd3":  # T5 is bidirectional: its tokens before the word change too
        t5 = sequence_tokens(pipe, P).positions("circle", segment="t5")  # the word's T5 pieces
        assert ablated.positions["text_encoder_3"] == [q - 77 for q in t5]
        assert not _close(a[77 : t5[0]], b[77 : t5[0]]) and not _close(a[t5[-1] + 1 :], b[t5[-1] + 1 :])


def test_no_hook_is_left_on_the_text_encoder_and_a_second_encoding_is_the_same() -> None:
    pipe = tiny_pipeline("sd1")
    first = ablated_prompt_embeds(pipe, P, ["circle", "red"])
    assert pipe.text_encoder._forward_pre_hooks == {}
    assert torch.equal(first.prompt_embeds, ablated_prompt_embeds(pipe, P, ["red", "circle"]).prompt_embeds)
    assert first.positions["text_encoder"] == sorted(
        sequence_tokens(pipe, P).positions("circle") + sequence_tokens(pipe, P).positions("red")
    )


def test_bad_input_is_refused_before_any_encoding() -> None:
    pipe = tiny_pipeline("sd1")
    with pytest.raises(WordNotFoundError, match="square"):
        ablated_prompt_embeds(pipe, P, "square")
    for words in ([], "", [3]):
        with pytest.raises(InvalidArgumentError):
            ablated_prompt_embeds(pipe, P, words)
    with pytest.raises(InvalidArgumentError):
        CausalAblation(pipe, "circle", images=[-1])
    with pytest.raises(
        UnsupportedPipelineError, match="Flux.2 cannot use causal token ablation.*Stable Diffusion 3"
    ):
        CausalAblation(tiny_pipeline("flux2"), "circle")
    with CausalAblation(pipe, "square"), pytest.raises(WordNotFoundError):
        pipe(P, **RUN)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3"])
def test_only_the_chosen_images_change_and_the_pipeline_is_restored(family) -> None:
    pipe = tiny_pipeline(family)
    pipe(P, **RUN)
    before = pipeline_state(pipe)
    plain = pipe([P, P], generator=gen(0), **RUN).images
    with CausalAblation(pipe, ["circle"], images=[1]):
        out = pipe([P, P], generator=gen(0), **RUN).images
    assert np.array_equal(out[0], plain[0])  # image 0 keeps the pipeline's own embeddings, bit for bit
    assert not np.allclose(out[1], plain[1], atol=1e-4)
    assert_restored(pipe, before)
    # with the word's own cross-attention zeroed too (the whole ablation), still only image 1 changes
    with CausalAblation(pipe, ["circle"], images=[1]), Control(pipe, Reweight({"circle": 0.0}, images=[1])):
        both = pipe([P, P], generator=gen(0), **RUN).images
    assert np.array_equal(both[0], plain[0]) and not np.array_equal(both[1], out[1])
    assert_restored(pipe, before)


def test_the_embeddings_given_to_the_denoiser_are_the_ablated_ones() -> None:
    pipe = tiny_pipeline("sd1")
    seen = []
    with CausalAblation(pipe, "circle"):  # a hook added after the attachment's sees what the UNet gets
        hook = pipe.unet.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["encoder_hidden_states"].clone()), with_kwargs=True
        )
        try:
            pipe(P, guidance_scale=5.0, **RUN)
        finally:
            hook.remove()
    want = ablated_prompt_embeds(pipe, P, "circle").prompt_embeds[0]
    neg = sdx.encode_prompt(pipe, P).negative_prompt_embeds[0]
    assert len(seen) == 2
    for batch in seen:  # (2, T, D): the negative half untouched, the conditional half ablated
        assert torch.equal(batch[0], neg) and torch.equal(batch[1], want)


def test_flux_loses_the_word_in_t5_on_both_sides_and_in_clips_pooled_vector() -> None:
    pipe = tiny_pipeline("flux")
    plain = sdx.encode_prompt(pipe, P)
    ablated = ablated_prompt_embeds(pipe, P, "circle")
    t5 = ablated.positions["text_encoder_2"]  # Flux's sequence is T5's alone
    assert t5 == sequence_tokens(pipe, P).positions("circle")
    a, b = ablated.prompt_embeds[0], plain.prompt_embeds[0]
    assert not _close(a[: t5[0]], b[: t5[0]]) and not _close(a[t5[-1] + 1 :], b[t5[-1] + 1 :])
    assert not _close(ablated.pooled_prompt_embeds, plain.pooled_prompt_embeds)
    run = dict(height=64, width=64, **RUN)
    ref = pipe([P, P], generator=gen(0), **run).images
    with CausalAblation(pipe, "circle", images=[1]):
        out = pipe([P, P], generator=gen(0), **run).images
    assert np.array_equal(out[0], ref[0]) and not np.allclose(out[1], ref[1], atol=1e-4)


def test_edit_with_causal_ablation_removes_the_word_from_the_edited_branch_only() -> None:
    """``edit(reweight={w: 0}, ablation="causal")``: the source branch is the attention-only edit's source bit for
    bit, the edited branch differs from the attention-only ablation (the later tokens no longer carry the word),
    the ablated word's map is still exactly 0, and the setting is recorded."""
    pipe = tiny_pipeline("sd1")
    prompt = "a big red circle at the top left"
    kw = dict(num_inference_steps=3, height=64, width=64)
    plain = sdx.edit(pipe, prompt, reweight={"circle": 0.0}, generator=gen(0), **kw)
    causal = sdx.edit(pipe, prompt, reweight={"circle": 0.0}, ablation="causal", generator=gen(0), **kw)
    assert np.array_equal(np.asarray(causal.source), np.asarray(plain.source))
    assert not np.array_equal(np.asarray(causal.edited), np.asarray(plain.edited))
    assert float(causal.edited_maps.word("circle").abs().max()) == 0.0
    assert causal.settings["ablation"] == "causal" and plain.settings["ablation"] is None
    with pytest.raises(InvalidArgumentError, match="ablation="):
        sdx.edit(pipe, prompt, reweight={"circle": 0.0}, ablation="text", **kw)
