"""The offline CLIP tokenizer gives exactly SD 1.5's token ids."""

from sdexplore.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE, clip_tokenizer


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
