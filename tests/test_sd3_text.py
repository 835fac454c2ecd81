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


def test_inspect_prompt_lists_the_whole_joint_sequence(sd3_pipe) -> None:
    info = sdx.inspect_prompt(sd3_pipe, "a big red circle")
    enc = sdx.encode_prompt(sd3_pipe, "a big red circle")
    assert len(info.tokens) == enc.prompt_embeds.shape[1] == 77 + 256  # CLIP's 77, then T5's 256
    assert info.tokens[1:5] == ["a</w>", "big</w>", "red</w>", "circle</w>"]
    assert info.tokens[77:82] == ["▁a", "▁big", "▁red", "▁cir", "cle"] and info.kinds[82] == "eos"
    assert torch.equal(info.embeds, enc.prompt_embeds[0].float())
    widths = [sd3_pipe.text_encoder.config.hidden_size, sd3_pipe.text_encoder_2.config.hidden_size]
    assert info.encoders == ("text_encoder", "text_encoder_2", "text_encoder_3")
    assert torch.equal(info.encoder_norms[0, :77], info.embeds[:77, : widths[0]].norm(dim=-1))
    assert torch.equal(info.encoder_norms[2, 77:], info.norms[77:]) and not info.encoder_norms[2, :77].any()
    assert not info.encoder_norms[:2, 77:].any()  # CLIP fills none of T5's positions
    assert (
        sdx.text.default_size(sd3_pipe)
        == (sd3_pipe.transformer.config.sample_size * sd3_pipe.vae_scale_factor,) * 2
    )


@pytest.mark.parametrize("family", MMDIT_FIXTURE_FAMILIES)
def test_inspect_and_compare_show_t5_and_clip_tokens_side_by_side(family) -> None:
    pipe = tiny_pipeline(family)
    info = sdx.inspect_prompt(pipe, "a red circle, on a background")
    rows = info.side_by_side().splitlines()
    circle = next(r for r in rows if r.startswith("circle "))
    assert "cir·cle" in circle  # T5's two pieces of one word
    if family == "sd3":
        assert (
            rows[0].split() == ["word", "clip", "t5"] and "3: circle" in circle and "79-80: cir·cle" in circle
        )
    assert "t5" in repr(info) and len(repr(info)) < 200 and "<pre>" in info._repr_html_()
    table = info.table()
    assert "▁cir" in table and "padding positions" in table and len(table.splitlines()) < 30
    diff = sdx.compare_prompts(pipe, "a red circle", "a blue circle")
    assert diff.pooled is not None and "pooled" in diff.table() and len(diff.per_token) == len(info.ids)
    blue = [i for i, t in enumerate(diff.b.tokens) if t in ("blue</w>", "▁blue")]
    assert blue and all(diff.per_token[i] < 0.999 for i in blue)  # the changed word differs in every part
    assert "mean_words" in repr(diff)
    with pytest.raises(InvalidArgumentError, match="max_sequence_length"):
        sdx.inspect_prompt(pipe, "a cat", max_sequence_length=600)


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
