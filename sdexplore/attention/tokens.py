"""Token labels for attention maps: now in :mod:`sdexplore.record.tokens` and :mod:`sdexplore.results.tokens`."""

from ..record.tokens import BOS, EOS, PAD, TEXT, TokenList, tokenize_prompt, unlabelled

__all__ = ["BOS", "EOS", "PAD", "TEXT", "TokenList", "tokenize_prompt", "unlabelled"]
