"""Wan's cross-attention capture: the image tokens of every frame (F·h·w space-time patches) attending to the text.

Wan's ``attn2`` (``WanAttention`` with ``WanAttnProcessor``) normalises queries and keys over all heads (RMSNorm
across heads) before splitting them, and calls diffusers' ``dispatch_attention_fn``. The capturing processor
makes that very call (same projections, norms and backend: the output is bitwise the original's) and hands the
captured rows' queries and keys to the recorder, which computes ``softmax(q kᵀ / √d)`` later, batched over layers and
steps, like any UNet layer's. The queries run frame by frame (frame-major, then rows, then columns), so a layer's
probabilities (B', heads, F·h·w, T) reshape to maps (B', T, F, h, w).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from .processor import Defer, Gate


def reproducible(processor: Any) -> bool:
    """Whether ``processor`` is Wan's own, which :class:`WanCapturingProcessor` reproduces bit for bit."""
    return type(processor) is WanAttnProcessor


class WanCapturingProcessor:
    """Wan's text cross-attention (``attn2``), its queries and keys also handed to the recorder.

    Calls the gate declines, self-attention calls and image-conditioned layers (Wan I2V's extra image keys) go to
    the original processor untouched.
    """

    def __init__(self, name: str, original: Any, gate: Gate, defer: Defer) -> None:
        self.name = name
        self.original = original
        self.gate = gate
        self.defer = defer

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        plain = (
            encoder_hidden_states is None
            or attention_mask is not None
            or rotary_emb is not None
            or attn.add_k_proj is not None
            or getattr(attn, "fused_projections", False)
        )
        rows = None if plain else self.gate(self.name, hidden_states.shape[1])  # F·h·w image tokens
        if rows is None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs
            )
        query = attn.norm_q(attn.to_q(hidden_states))  # (N, FHW, heads·d): normed across heads
        key = attn.norm_k(attn.to_k(encoder_hidden_states))  # (N, T, heads·d)
        value = attn.to_v(encoder_hidden_states)  # (N, T, heads·d)
        query, key, value = (
            x.unflatten(2, (attn.heads, -1)) for x in (query, key, value)
        )  # (N, L, heads, d)
        # (N, heads, L, d) views for the recorder: probabilities later, batched over layers and steps
        self.defer(self.name, query.transpose(1, 2), key.transpose(1, 2), attn, encoder_hidden_states, rows)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            backend=self.original._attention_backend,
            parallel_config=None,
        )  # (N, FHW, heads, d): the original's own call
        out = out.flatten(2, 3).type_as(query)  # (N, FHW, heads·d)
        return attn.to_out[1](attn.to_out[0](out))
