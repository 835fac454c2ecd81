"""The offline tokenizers: CLIP gives exactly SD 1.5's token ids; T5 splits words into sentencepiece pieces that merge back."""

import pytest

from sdexplore.errors import WordNotFoundError
from sdexplore.record.tokens import tokenize_prompt, word_marker
from sdexplore.results.tokens import Segment, TokenList
from sdexplore.tokenizer import BOS_ID, EOS_ID, T5_SPECIAL, VOCAB_SIZE, clip_tokenizer, t5_tokenizer


def test_reference_ids_match_sd15():
    tok = clip_tokenizer()
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("An image of Angkor with a sunset sky.").input_ids == [
        49406, 550, 2867, 539, 883, 24175, 593, 320, 3424, 2390, 269, 49407,
    ]  # fmt: skip


def test_vocab_size_special_tokens_and_padding():
    tok = clip_tokenizer()
    assert len(tok) == VOCAB_SIZE
    assert tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID
    ids = tok("x", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and ids[-1] == EOS_ID  # SD 1.x pads with <|endoftext|>
    sd2 = clip_tokenizer(pad_token="!")
    ids2 = sd2("x", padding="max_length", max_length=77).input_ids
    assert ids2[:3] == ids[:3] and ids2[-1] == 0  # SD 2.x pads with "!" (id 0), same ids otherwise


def test_truncation_at_77():
    tok = clip_tokenizer()
    ids = tok("cat " * 100, truncation=True, max_length=tok.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == BOS_ID and ids[-1] == EOS_ID


# ---- the offline T5 tokenizer and word merging per tokenizer ------------------------------------------------


def test_t5_tokenizer_splits_words_into_sentencepiece_pieces():
    tok = t5_tokenizer()
    pieces = tok("a big red circle on a background", add_special_tokens=False).tokens()
    assert pieces == [
        "▁a",
        "▁big",
        "▁red",
        "▁cir",
        "cle",
        "▁on",
        "▁a",
        "▁back",
        "ground",
    ]  # multi-piece words
    ids = tok("a cat").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0 and tok.bos_token_id is None
    assert tok.convert_ids_to_tokens([0, 1, 2]) == list(T5_SPECIAL)
    assert (
        "<unk>" not in tok("Zebra-7, (Quick)!", add_special_tokens=False).tokens()
    )  # every ASCII char has a piece


def test_word_marker_is_read_from_the_tokenizer():
    assert word_marker(clip_tokenizer()) == ("</w>", "end")
    assert word_marker(t5_tokenizer()) == ("▁", "start")


def test_t5_labels_merge_pieces_into_words_and_label_special_tokens():
    tl = tokenize_prompt(t5_tokenizer(), "a red circle, on a background", 16, name="t5")
    assert tl.kinds == ["text"] * 9 + ["eos"] + ["pad"] * 6  # no BOS in T5; </s> then <pad>
    assert tl.pieces[9] == "</s>" and tl.pieces[10] == "<pad>"
    assert tl.words == ["a", "red", "circle", ",", "on", "a", "background"]
    assert tl.positions("circle") == [2, 3] and tl.tokens[2:4] == ["cir", "cle"]
    assert tl.positions("a", occurrence=1) == [6] and tl.positions("on a") == [5, 6]
    assert tl.segments == [Segment("t5", 0, 16, "▁", "start")]
    assert TokenList.from_json(tl.to_json()) == tl


def test_t5_truncation_is_reported_in_words():
    tl = tokenize_prompt(t5_tokenizer(), "a red circle on a background", 4, name="t5")
    assert tl.kinds == ["text"] * 3 + ["eos"] and tl.truncated == ["cle", "▁on", "▁a", "▁back", "ground"]
    assert tl.truncated_words == ["cle", "on", "a", "background"]
    with pytest.raises(WordNotFoundError, match="cut off"):
        tl.positions("background")


def test_clip_labels_keep_their_words_and_a_saved_clip_list_has_no_segments():
    tl = tokenize_prompt(clip_tokenizer(), "a photo of a cat, sunset")
    assert tl.kinds[:2] == ["bos", "text"] and tl.kinds.count("eos") == 1 and len(tl.ids) == 77
    assert tl.words == ["a", "photo", "of", "a", "cat", ",", "sunset"]
    assert (
        "segments" not in tl.to_json()
    )  # one CLIP window: the file format of the UNet families is unchanged
    assert TokenList.from_json(tl.to_json()).positions("cat") == tl.positions("cat") == [5]
