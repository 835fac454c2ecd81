"""Attention-map labels come from the prompt each text encoder encoded: SD3's CLIP-L from prompt, CLIP-G from
prompt_2, T5 from prompt_3; SDXL's CLIP-G from prompt_2 (at CLIP-L's positions); Flux's T5 from prompt_2; the
negatives' likewise. The label ids are checked against the ids each encoder was actually given."""

from __future__ import annotations

import pytest
import torch
from conftest import gen

import sdexplore as sdx
from sdexplore.errors import InvalidArgumentError, WordNotFoundError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.record.tokens import sequence_tokens
from sdexplore.results import AttentionMaps

P = "a red circle on a blue background"
P2 = "a yellow star"
P3 = "a green triangle over grass"
KW = dict(num_inference_steps=2, height=64, width=64, output_type="np")
T5_KW = dict(KW, max_sequence_length=24)


class _EncoderInputs:
    """The input ids each text encoder is given, in call order (hooks of the test's own)."""

    def __init__(self, pipe, names) -> None:
        self.ids: dict[str, list[list[int]]] = {n: [] for n in names}
        self.handles = [
            getattr(pipe, n).register_forward_pre_hook(self._hook(n), with_kwargs=True) for n in names
        ]

    def _hook(self, name):
        def hook(module, args, kwargs):
            ids = args[0] if args else kwargs["input_ids"]
            self.ids[name] += ids.tolist()

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _record(pipe, names, **call):
    seen = _EncoderInputs(pipe, names)
    try:
        with sdx.AttentionRecorder(pipe, negative=True) as rec:
            pipe(generator=gen(0), **call)
    finally:
        seen.remove()
    return rec.maps, seen.ids


def _shared(tl):
    return tl.segment("clip").shared


def test_sd3_labels_each_part_from_the_prompt_its_encoder_encoded() -> None:
    pipe = tiny_pipeline("sd3")
    call = dict(
        T5_KW, prompt=P, prompt_2=P2, prompt_3=P3, negative_prompt="blurry", negative_prompt_3="dark fog"
    )
    maps, ids = _record(pipe, ("text_encoder", "text_encoder_2", "text_encoder_3"), **call)
    tl, neg = maps.token_lists[0], maps.negative.token_lists[0]
    clip, t5 = tl.segment("clip"), tl.segment("t5")
    # encode_prompt runs the prompt, then the negative, through each encoder
    assert tl.ids[clip.start : clip.stop] == ids["text_encoder"][0]
    assert list(_shared(tl).ids) == ids["text_encoder_2"][0]
    assert tl.ids[t5.start : t5.stop] == ids["text_encoder_3"][0]
    assert neg.ids[t5.start : t5.stop] == ids["text_encoder_3"][1]
    assert neg.ids[clip.start : clip.stop] == ids["text_encoder"][1]
    assert _shared(neg) is None  # negative_prompt_2 falls back to negative_prompt, "blurry": nothing to share
    assert (t5.source, t5.text, _shared(tl).source, _shared(tl).text) == ("prompt_3", P3, "prompt_2", P2)
    # each word is found where its prompt was encoded
    n_clip = clip.stop - clip.start
    assert all(p >= n_clip for p in tl.positions("triangle")) and tl.positions("triangle", segment="t5")
    assert all(p < n_clip for p in tl.positions("circle"))  # prompt reached CLIP-L only
    assert tl.positions("star") == tl.positions("star", segment="clip_g")  # CLIP-G's, at CLIP's positions
    assert maps.word("grass").shape == maps.aggregate.shape[-2:]
    assert maps.negative.word("fog").shape == maps.aggregate.shape[-2:]
    assert maps.words == P.split()  # the call's prompt
    assert tl.words_of("prompt_3") == P3.split() and tl.words_of("prompt_2") == P2.split()
    with pytest.raises(WordNotFoundError, match="Words of prompt_3: .*'triangle'") as err:
        maps.word("zebra")
    assert "Words of prompt_2: ['a', 'yellow', 'star']" in str(err.value)


def test_sd3_without_further_prompts_labels_as_before() -> None:
    pipe = tiny_pipeline("sd3")
    tl = sequence_tokens(pipe, P, max_sequence_length=24)
    same = sequence_tokens(pipe, P, max_sequence_length=24, prompt_2=P, prompt_3="")  # "" means prompt
    assert tl == same and all(s.source == "prompt" and s.shared is None for s in tl.parts())
    assert "source" not in str(tl.to_json())


def test_sdxl_labels_clip_g_from_prompt_2_at_the_shared_positions(sdxl_pipe) -> None:
    call = dict(KW, prompt=P, prompt_2=P2)
    maps, ids = _record(sdxl_pipe, ("text_encoder", "text_encoder_2"), **call)
    tl = maps.token_lists[0]
    assert tl.ids == ids["text_encoder"][0] and list(_shared(tl).ids) == ids["text_encoder_2"][0]
    # position 3 holds CLIP-L's "circle" (prompt) beside CLIP-G's "star" (prompt_2): each word finds it
    assert tl.positions("star") == tl.positions("circle") == [3] and tl.positions("yellow") == [2]
    assert tl.positions("star", segment="clip_g") == [3]
    with pytest.raises(WordNotFoundError):
        tl.positions("star", segment="clip")  # CLIP-L's labels are prompt's
    assert maps.word("star").shape == maps.aggregate.shape[-2:]
    with pytest.raises(WordNotFoundError, match="Words of prompt_2"):
        maps.word("zebra")


def test_maps_with_further_prompts_round_trip_through_a_file(sdxl_pipe, tmp_path) -> None:
    with sdx.AttentionRecorder(sdxl_pipe) as rec:
        sdxl_pipe(P, prompt_2=P2, generator=gen(0), **KW)
    back = AttentionMaps.load(rec.maps.save(tmp_path / "maps"))
    assert back.token_lists == rec.maps.token_lists
    torch.testing.assert_close(back.word("star"), rec.maps.word("star"))


def test_flux_labels_t5_from_prompt_2() -> None:
    pipe = tiny_pipeline("flux")
    call = dict(T5_KW, prompt=P, prompt_2=P3, guidance_scale=3.5)
    seen = _EncoderInputs(pipe, ("text_encoder", "text_encoder_2"))
    try:
        with sdx.AttentionRecorder(pipe) as rec:
            pipe(generator=gen(0), **call)
    finally:
        seen.remove()
    tl = rec.maps.token_lists[0]
    assert tl.ids == seen.ids["text_encoder_2"][0]  # T5 saw prompt_2 (CLIP-L's pooled vector saw prompt)
    assert tl.segment("t5").source == "prompt_2" and tl.prompt == P
    assert rec.maps.words == P3.split()  # the sequence's words are prompt_2's
    assert rec.maps.word("triangle").shape == rec.maps.aggregate.shape[-2:]
    with pytest.raises(WordNotFoundError, match="not a word of the prompt"):
        rec.maps.word("circle")  # only in prompt, which reached the pooled vector alone


def test_further_prompts_a_family_does_not_take_are_refused(sdxl_pipe) -> None:
    with pytest.raises(InvalidArgumentError, match="takes no prompt_3"):
        sequence_tokens(sdxl_pipe, P, prompt_3=P3)
    with pytest.raises(InvalidArgumentError, match="takes no prompt_2"):
        sequence_tokens(tiny_pipeline("sd1"), P, prompt_2=P2)
    with pytest.raises(InvalidArgumentError, match="not a prompt string"):
        sequence_tokens(sdxl_pipe, P, prompt_2=["a", "b"])


def test_saved_shared_labels_are_checked_when_read(sdxl_pipe) -> None:
    from sdexplore.errors import ResultFileError
    from sdexplore.results.fileformat import Checker
    from sdexplore.results.tokens import segments_from_json

    tl = sequence_tokens(sdxl_pipe, P, prompt_2=P2)
    saved = tl.to_json()["segments"]
    assert segments_from_json(Checker("f"), saved, 77, "segments") == tl.segments
    short = [dict(saved[0], shared=dict(saved[0]["shared"], ids=saved[0]["shared"]["ids"][:-1]))]
    with pytest.raises(ResultFileError, match=r"segments\[0\]\.shared\.ids"):
        segments_from_json(Checker("f"), short, 77, "segments")
    odd = [dict(saved[0], shared=dict(saved[0]["shared"], kinds=["word"] * 77))]
    with pytest.raises(ResultFileError, match=r"shared\.kinds\[0\]"):
        segments_from_json(Checker("f"), odd, 77, "segments")
