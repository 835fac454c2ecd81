"""Text on SD3 (and the other MMDiT fixtures): encode_prompt gives what the pipeline itself uses; inspect_prompt
shows CLIP and T5 tokens; sequence_tokens labels the joint sequence exactly as the transformer sees it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gen

import sdexplore as sdx
from sdexplore.errors import InvalidArgumentError
from sdexplore.fixtures import MMDIT_FIXTURE_FAMILIES, tiny_pipeline
from sdexplore.record.tokens import default_max_sequence_length, sequence_tokens


@pytest.fixture
def sd3_pipe():
    return tiny_pipeline("sd3")


def test_encode_prompt_reproduces_the_pipelines_own_conditioning(sd3_pipe) -> None:
    enc = sdx.encode_prompt(sd3_pipe, "a big red circle", "a blue square")
    assert enc.family == "sd3" and enc.pooled_prompt_embeds is not None
    assert enc.add_time_ids is None  # size conditioning is SDXL's, not SD3's
    kw = dict(num_inference_steps=3, output_type="np")
    ref = sd3_pipe("a big red circle", negative_prompt="a blue square", generator=gen(0), **kw).images
    out = sd3_pipe(**enc.pipe_kwargs(), generator=gen(0), **kw).images
    assert np.array_equal(out, ref)


def test_inspect_prompt_labels_the_clip_part_of_the_joint_sequence(sd3_pipe) -> None:
    info = sdx.inspect_prompt(sd3_pipe, "a big red circle")
    assert len(info.tokens) == 77 and info.tokens[1:5] == ["a</w>", "big</w>", "red</w>", "circle</w>"]
    widths = [sd3_pipe.text_encoder.config.hidden_size, sd3_pipe.text_encoder_2.config.hidden_size]
    enc = sdx.encode_prompt(sd3_pipe, "a big red circle")
    assert enc.prompt_embeds.shape[1] > 77  # T5's tokens follow CLIP's 77
    assert torch.equal(info.embeds, enc.prompt_embeds[0, :77, : sum(widths)].float())
    assert info.encoder_norms.shape == (2, 77)
    assert (
        sdx.text.default_size(sd3_pipe)
        == (sd3_pipe.transformer.config.sample_size * sd3_pipe.vae_scale_factor,) * 2
    )


# ---- the labels of the joint sequence (sequence_tokens) ------------------------------------------------------
LONG = " ".join(["a big red circle on a blue background"] * 12)  # 96 words: > 77 CLIP tokens, < 256 T5 pieces


def _encoder_inputs(pipe, prompt, **options):
    """The input ids each text encoder receives when the pipeline encodes ``prompt``, by encoder attribute."""
    fam = sdx.families.detect_family(pipe)
    seen, handles = {}, []
    for name in fam.text_encoders:
        module = getattr(pipe, name, None)
        if module is not None:

            def hook(module, args, name=name) -> None:
                seen.setdefault(name, args[0][0].tolist())

            handles.append(module.register_forward_pre_hook(hook))
    try:
        enc = fam.encode_prompt(pipe, prompt, device="cpu", do_classifier_free_guidance=False, **options)
    finally:
        for h in handles:
            h.remove()
    return seen, enc.embeds


@pytest.mark.parametrize("family", MMDIT_FIXTURE_FAMILIES)
@pytest.mark.parametrize("max_sequence_length", [None, 512])
def test_sequence_tokens_label_exactly_what_the_transformer_attends_to(family, max_sequence_length) -> None:
    pipe = tiny_pipeline(family)
    fam = sdx.families.detect_family(pipe)
    tl = sequence_tokens(pipe, LONG, max_sequence_length=max_sequence_length)
    seen, embeds = _encoder_inputs(pipe, LONG, max_sequence_length=max_sequence_length)
    assert len(tl.ids) == embeds.shape[1]  # one label per position of the joint text sequence
    t5 = tl.segment("t5")
    assert tl.ids[t5.start : t5.stop] == seen[fam.text_encoders[-1]]  # T5's positions: the ids T5 encoded
    assert t5.stop - t5.start == (max_sequence_length or default_max_sequence_length(pipe))
    if fam.clip_sequence:
        clip = tl.segment("clip")
        assert (clip.start, clip.stop, t5.start) == (
            0,
            77,
            77,
        )  # CLIP first, T5 after, as encode_prompt concatenates
        assert tl.ids[:77] == seen[fam.text_encoders[0]]
        assert tl.kinds[0] == "bos" and tl.kinds[76] == "eos"  # CLIP cut at 77 ...
    assert tl.truncated == []  # ... but T5 saw the whole prompt: not truncated at 77
    last = [p for p in tl.positions("background", segment="t5")][-2:]
    assert [tl.pieces[p] for p in last] == ["▁back", "ground"] and last[-1] > 77
    assert len(tl.positions("circle", segment="t5")) == 24 and tl.words.count("circle") == 12


def test_sequence_tokens_without_t5_label_the_zeros_as_padding() -> None:
    pipe = tiny_pipeline("sd3", t5=False)
    tl = sequence_tokens(pipe, "a big red circle")
    assert len(tl.ids) == sdx.encode_prompt(pipe, "a big red circle").prompt_embeds.shape[1]
    t5 = tl.segment("t5")
    assert set(tl.kinds[t5.start :]) == {"pad"} and set(tl.pieces[t5.start :]) == {"<zero>"}
    assert tl.positions("circle") == [4]  # only CLIP's position


def test_sequence_tokens_rejects_bad_lengths_before_tokenizing(sd3_pipe) -> None:
    for bad in (0, 513, 3.5, True):
        with pytest.raises(InvalidArgumentError, match="max_sequence_length"):
            sequence_tokens(sd3_pipe, "a cat", max_sequence_length=bad)
    with pytest.raises(InvalidArgumentError, match="no T5"):
        sequence_tokens(tiny_pipeline("sd1"), "a cat", max_sequence_length=77)
    assert len(sequence_tokens(tiny_pipeline("sd1"), "a cat").ids) == 77
