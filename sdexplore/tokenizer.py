"""The real CLIP BPE tokenizer (SD 1.x ids), built offline from the vocabulary file shipped in the package."""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

from transformers import CLIPTokenizer

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
