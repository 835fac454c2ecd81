"""Tokenizers built offline: the real CLIP BPE tokenizer (SD 1.x ids) from the vocabulary file shipped in the
package, and a small T5 sentencepiece (Unigram) tokenizer for the MMDiT fixtures."""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

from transformers import CLIPTokenizer, T5TokenizerFast

#: Token ids of CLIP's special tokens (identical in SD 1.x, SD 2.x and SDXL tokenizers).
BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"  # MIT, OpenAI (see sdexplore/data/LICENSE-CLIP)
_N_MERGES = 48894  # lines 1..48894 after the header line


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte → printable-unicode table (256 entries)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in codes], strict=True))


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    raw = resources.files("sdexplore.data").joinpath(_BPE_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    return vocab, merges  # type: ignore[return-value]


def clip_tokenizer(pad_token: str = "<|endoftext|>", max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """Build the CLIP tokenizer used by Stable Diffusion, offline.

    ``pad_token="<|endoftext|>"`` matches SD 1.x and SDXL's first tokenizer; SD 2.x and SDXL's second
    tokenizer pad with ``"!"`` (id 0). Ids equal SD 1.5's: "a photo of a cat" → 49406 320 1125 539 320 2368 49407.
    """
    vocab, merges = _vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token)
    tok.model_max_length = max_length
    return tok


# ---- T5 (SD3's third text encoder, Flux's main one), offline -------------------------------------------------
#: T5's special tokens and their ids, as in every T5 / SD3 / Flux tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2).
T5_SPECIAL = ("<pad>", "</s>", "<unk>")
T5_MAX_LENGTH = 512

# Whole words (one piece each) and words a sentencepiece model splits (several pieces): enough for the prompts the
# tests and demos use, so that both one-piece and multi-piece words occur. Scores are log-probabilities: a whole
# piece (-4) beats two split pieces (-5 each), and both beat spelling a word letter by letter (-9/-10 each).
_T5_WORDS = (
    "a an the of on in at with and to is photo picture image big small red blue green white black yellow cat dog "
    "sky sea tree house car man woman city night day"
).split()
_T5_SPLIT = (
    "cir",
    "cle",
    "squ",
    "are",
    "back",
    "ground",
    "sun",
    "set",
    "moun",
    "tain",
    "paint",
    "ing",
    "tri",
    "angle",
)
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()/&"


@lru_cache(maxsize=1)
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    vocab: list[tuple[str, float]] = [(t, 0.0) for t in T5_SPECIAL]
    vocab.append(("▁", -2.0))  # sentencepiece's word-start marker alone (before punctuation)
    vocab += [("▁" + w, -4.0) for w in _T5_WORDS]
    vocab += [("▁" + p if i % 2 == 0 else p, -5.0) for i, p in enumerate(_T5_SPLIT)]  # "▁cir" "cle", ...
    vocab += [("▁" + c, -9.0) for c in _T5_CHARS]
    vocab += [(c, -10.0) for c in _T5_CHARS]
    seen: set[str] = set()
    return tuple(v for v in vocab if not (v[0] in seen or seen.add(v[0])))  # each piece once ("▁a" is a word)


def t5_tokenizer(max_length: int = T5_MAX_LENGTH) -> T5TokenizerFast:
    """A small T5 tokenizer built offline: a ``tokenizers`` Unigram model over a few hundred sentencepiece
    pieces, wrapped as ``T5TokenizerFast`` with T5's real special tokens (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2)
    and its pre-tokenizer (``▁`` word starts) and ``</s>``-appending post-processor.

    Not T5's 32k vocabulary (that ships only with a checkpoint): the ids differ from a real T5, but words split
    into pieces the same way ("circle" → "▁cir", "cle"), which is what word merging needs to be tested on.
    Every ASCII letter, digit and common punctuation mark has a piece, so no English prompt gives ``<unk>``.
    """
    tok = T5TokenizerFast(vocab=list(_t5_vocab()), extra_ids=0)
    tok.model_max_length = max_length
    return tok
