"""Token labels read from the tokenizer and the pipeline themselves: word markers declared by a normalizer and a
decoder (Gemma's ``▁``, any other symbol), byte-level BPE's ``Ġ``, and Sana's complex human instruction, which the
pipeline prepends to the prompt before keeping BOS and the last ``max_sequence_length − 1`` positions."""

from __future__ import annotations

import inspect

import pytest
import torch
from tokenizers import Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from sdexplore.errors import InvalidArgumentError
from sdexplore.fixtures import gemma_tokenizer, qwen_tokenizer, tiny_pipeline
from sdexplore.record.tokens import instructed_tokens, sequence_tokens, word_marker

L = 24  # max_sequence_length of the checks


@pytest.fixture(scope="module")
def sana():
    return tiny_pipeline("sana")


def _marked_tokenizer(marker: str) -> PreTrainedTokenizerFast:
    """A BPE whose words start with ``marker``: spaces become it (normalizer), and it becomes a space (decoder)."""
    letters = sorted(set("abcdefghijklmnopqrstuvwxyz"))
    vocab = {"<unk>": 0, "<pad>": 1, marker: 2, **{c: i + 3 for i, c in enumerate(letters)}}
    merges = [(marker, "r"), (marker + "r", "e"), (marker + "re", "d")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", marker)
    tok.decoder = decoders.Sequence([decoders.Replace(marker, " "), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>")


def test_word_markers_are_read_from_the_tokenizer_components() -> None:
    assert word_marker(gemma_tokenizer()) == ("▁", "start")  # normalizer Replace(" ", "▁"), decoder back
    assert word_marker(_marked_tokenizer("¦")) == ("¦", "start")  # not a hard-coded "▁"
    assert word_marker(qwen_tokenizer()) == ("Ġ", "start")  # byte-level BPE
    plain = Tokenizer(BPE(vocab={"<unk>": 0, "a": 1}, merges=[], unk_token="<unk>"))
    assert word_marker(PreTrainedTokenizerFast(tokenizer_object=plain, unk_token="<unk>")) == ("", "end")


def test_a_replace_marked_tokenizer_merges_its_pieces_into_words() -> None:
    tl = instructed_tokens(_marked_tokenizer("¦"), "a red bed", 12, None, name="x")
    assert tl.pieces[:6] == ["a", "¦red", "¦", "b", "e", "d"]
    assert tl.words == ["a", "red", "bed"] and tl.positions("bed") == [2, 3, 4, 5]


def _encoder_view(pipe, prompt: str, instruction) -> tuple[list[int], list[bool]]:
    """The ids the denoiser's text keys come from and their mask, as the pipeline itself makes them: the text
    encoder's input ids (hooked) at the positions ``encode_prompt`` keeps, found by matching its output rows."""
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        seen["ids"] = kwargs.get("input_ids", args[0] if args else None)[0]
        seen["states"] = output[0][0]  # (N_all, D)

    handle = pipe.text_encoder.register_forward_hook(hook, with_kwargs=True)
    try:
        embeds, mask, _, _ = pipe.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            device="cpu",
            max_sequence_length=L,
            complex_human_instruction=instruction,
        )
    finally:
        handle.remove()
    states = seen["states"]
    rows = [int((states == e).all(-1).nonzero()[0]) for e in embeds[0]]  # where each kept row came from
    return [int(seen["ids"][r]) for r in rows], [bool(m) for m in mask[0]]


@pytest.mark.parametrize(
    "instruction",
    [
        "default",
        None,
        ["Describe the picture in detail.", "User Prompt: "],
        ["Words, no space at the end:"],
    ],
)
@pytest.mark.parametrize("prompt", ["a red circle on a blue background", "  A Big RED square "])
def test_sana_labels_are_the_ids_its_denoiser_sees(sana, instruction, prompt) -> None:
    if instruction == "default":  # left out: the pipeline's own, as a plain call prepends
        kwargs = {}
        instruction = inspect.signature(sana.__call__).parameters["complex_human_instruction"].default
        assert instruction
    else:
        kwargs = {"complex_human_instruction": instruction}
    tl = sequence_tokens(sana, prompt, max_sequence_length=L, **kwargs)
    ids, mask = _encoder_view(sana, prompt, instruction)
    assert tl.ids == ids  # position by position, what the denoiser's keys were computed from
    assert [k != "pad" for k in tl.kinds] == mask
    assert tl.kinds[0] == "bos"
    assert (
        tl.words == prompt.lower().split()
    )  # the pipeline lower-cases; the instruction's words are not words
    assert tl.prompt == prompt and tl.segments[0].name == "gemma2" and tl.segments[0].marker == "▁"


def test_a_long_prompt_reports_what_was_cut(sana) -> None:
    prompt = " ".join(["red circle"] * 20)
    tl = sequence_tokens(sana, prompt, max_sequence_length=8)
    assert tl.kinds == ["bos"] + ["text"] * 7 and tl.words == prompt.split()[:7]
    assert tl.truncated_words == prompt.split()[7:]


def test_an_instruction_is_refused_where_the_pipeline_prepends_none_or_is_not_a_list(sana) -> None:
    sd1 = tiny_pipeline("sd1")
    assert sequence_tokens(sd1, "a red circle", complex_human_instruction=None).words == [
        "a",
        "red",
        "circle",
    ]
    with pytest.raises(InvalidArgumentError, match="prepends no instruction"):
        sequence_tokens(sd1, "a red circle", complex_human_instruction=["Describe:"])
    with pytest.raises(InvalidArgumentError, match="list of lines"):
        sequence_tokens(sana, "a red circle", complex_human_instruction="Describe:")


def test_pixart_labels_read_the_prompt_as_the_pipeline_cleans_it() -> None:
    pipe = tiny_pipeline("pixart-sigma")
    seen: list[list[int]] = []
    handle = pipe.text_encoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(
            kwargs.get("input_ids", args[0] if args else None)[0].tolist()
        ),
        with_kwargs=True,
    )
    try:
        pipe.encode_prompt(
            "  A Big RED square ", do_classifier_free_guidance=False, device="cpu", max_sequence_length=L
        )
    finally:
        handle.remove()
    tl = sequence_tokens(pipe, "  A Big RED square ", max_sequence_length=L)
    assert (
        tl.ids == seen[0] and tl.words == ["a", "big", "red", "square"] and tl.prompt == "  A Big RED square "
    )


def test_a_left_padding_tokenizer_labels_its_bos() -> None:
    """Gemma's tokenizer pads on the left until a Sana pipeline sets it right: BOS is found where it is."""
    from sdexplore.record.tokens import tokenize_prompt

    tok = gemma_tokenizer()
    assert tok.padding_side == "left"
    tl = tokenize_prompt(tok, "a red circle", 8, name="gemma")
    assert tl.kinds == ["pad"] * 4 + ["bos", "text", "text", "text"]
    assert tl.words == ["a", "red", "circle"] and tl.positions("circle") == [7]
