"""Label a prompt's key positions with a tokenizer, for attention maps (TokenList itself lives in results)."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

from ..results.tokens import BOS, EOS, PAD, TEXT, TokenList

__all__ = ["BOS", "EOS", "PAD", "TEXT", "TokenList", "tokenize_prompt", "unlabelled"]


_CACHE: OrderedDict[tuple[int, str, int], tuple[weakref.ref, tuple]] = OrderedDict()
_CACHE_SIZE = 256  # prompts remembered (a walk or a sweep labels the same few prompts run after run)


def tokenize_prompt(tokenizer: Any, prompt: str, length: int | None = None) -> TokenList:
    """Label the key positions of ``prompt`` as ``tokenizer`` pads and truncates it for the text encoder.

    ``length`` defaults to ``tokenizer.model_max_length`` (77). Tokens beyond it are reported in
    ``truncated`` rather than dropped silently. Labels are remembered per tokenizer and prompt (each call returns
    a TokenList of its own).
    """
    length = int(length or tokenizer.model_max_length)
    key = (id(tokenizer), prompt, length)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is tokenizer:
        _CACHE.move_to_end(key)
        ids, pieces, kinds, truncated = hit[1]
        return TokenList(
            ids=list(ids), pieces=list(pieces), kinds=list(kinds), truncated=list(truncated), prompt=prompt
        )
    labels = _tokenize(tokenizer, prompt, length)
    try:
        _CACHE[key] = (weakref.ref(tokenizer), (labels.ids, labels.pieces, labels.kinds, labels.truncated))
    except TypeError:  # a tokenizer that cannot be weakly referenced is simply not remembered
        return labels
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return TokenList(
        ids=list(labels.ids),
        pieces=list(labels.pieces),
        kinds=list(labels.kinds),
        truncated=list(labels.truncated),
        prompt=prompt,
    )


def _tokenize(tokenizer: Any, prompt: str, length: int) -> TokenList:
    full = tokenizer(prompt, padding=False, truncation=False, add_special_tokens=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    room = length - 2
    kept, cut = list(full[:room]), list(full[room:])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    n_pad = length - len(kept) - 2
    ids = [bos, *kept, eos] + [pad_id] * n_pad
    kinds = [BOS] + [TEXT] * len(kept) + [EOS] + [PAD] * n_pad
    return TokenList(
        ids=[int(i) for i in ids],
        pieces=list(tokenizer.convert_ids_to_tokens(ids)),
        kinds=kinds,
        truncated=list(tokenizer.convert_ids_to_tokens(cut)),
        prompt=prompt,
    )


def unlabelled(length: int) -> TokenList:
    """Placeholder labels when the prompt text was not seen (e.g. ``prompt_embeds`` passed directly)."""
    return TokenList(ids=[-1] * length, pieces=[f"<{i}>" for i in range(length)], kinds=[PAD] * length)
