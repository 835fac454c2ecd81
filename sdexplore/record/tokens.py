"""Label a prompt's key positions with a tokenizer, for attention maps (TokenList itself lives in results)."""

from __future__ import annotations

from typing import Any

from ..results.tokens import BOS, EOS, PAD, TEXT, TokenList

__all__ = ["BOS", "EOS", "PAD", "TEXT", "TokenList", "tokenize_prompt", "unlabelled"]


def tokenize_prompt(tokenizer: Any, prompt: str, length: int | None = None) -> TokenList:
    """Label the key positions of ``prompt`` as ``tokenizer`` pads and truncates it for the text encoder.

    ``length`` defaults to ``tokenizer.model_max_length`` (77). Tokens beyond it are reported in
    ``truncated`` rather than dropped silently.
    """
    length = int(length or tokenizer.model_max_length)
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
