"""Concept tokens run beside an MMDiT's text stream (ConceptAttention, arXiv 2502.04320), for concept maps.

A concept ("sky") is encoded alone by the pipeline's own text encoders; its word tokens enter the denoiser through
its ``context_embedder`` and go through every block's text path (adaptive norm with the step's ``temb``, the
block's text projections, its feed-forward) exactly as text tokens do, except that in attention they only *read*:
concept queries attend to the image tokens and the concepts, and nothing attends to the concepts. The image and
the prompt's text stream are therefore untouched (the image stays bitwise equal); the concept keys of each layer
are what a concept map scores the image queries against.

Covered block kinds: SD3's ``JointTransformerBlock`` (including the last, ``context_pre_only`` block) and Flux's
``FluxTransformerBlock`` (double-stream) and ``FluxSingleTransformerBlock`` (single-stream: shared projections, the
concept tokens' attention output and MLP go through ``proj_out``). Text positions carry no rotary embedding in
Flux (``txt_ids`` are zeros), so concept tokens get none either.

What a concept map means depends on the text encoder having seen the concept as a prompt of its own. The embedded
tiny-shapes-mmdit's encoder only ever saw whole scene prompts: there a shape's concept map marks the drawn shape
whichever shape it names (joint maps, 24 prompts: depicted shape IoU 0.47, absent shapes 0.43, paired difference
+0.04 ± 0.12), and its ``kind="output"`` concept maps sit on the background (IoU 0.00). The paper's own variant
(softmax over the concepts only, with a "background" concept) does no better there (0.18 against 0.13, ± 0.12).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


class ConceptStream:
    """The concept tokens' hidden states (B', C', D) through one denoiser call, advanced block by block."""

    def __init__(self, hidden: torch.Tensor, temb: torch.Tensor) -> None:
        self.hidden = hidden  # (B', C', D): the captured rows, every concept's word tokens
        self.temb = temb  # (B', D'): the step's time (and pooled text) embedding of the same rows

    def layer(
        self, attn: Any, block: Any, single: bool, img_k: torch.Tensor, img_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block: returns the concepts' keys (B', heads, C', d) and attention outputs (B', C', heads*d) at its
        attention layer, and advances the stream through the block's text path. ``img_k``/``img_v``
        (B', heads, HW, d) are the image tokens' keys and values in that layer (after RoPE, as the image saw them)."""
        c = self.hidden
        if single:
            norm_c, gate = block.norm(c, emb=self.temb)
            q, k, v = attn.to_q(norm_c), attn.to_k(norm_c), attn.to_v(norm_c)  # (B', C', heads*d)
            q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))  # (B', C', heads, d)
            q, k = attn.norm_q(q), attn.norm_k(k)
        else:
            pre_only = bool(getattr(block, "context_pre_only", False))
            if pre_only:
                norm_c = block.norm1_context(c, self.temb)
            else:
                norm_c, g_msa, shift, scale, g_mlp = block.norm1_context(c, emb=self.temb)
            heads = img_k.shape[1]
            q, k, v = attn.add_q_proj(norm_c), attn.add_k_proj(norm_c), attn.add_v_proj(norm_c)
            q, k, v = (x.unflatten(-1, (heads, -1)) for x in (q, k, v))  # (B', C', heads, d)
            if getattr(attn, "norm_added_q", None) is not None:
                q = attn.norm_added_q(q)
            if getattr(attn, "norm_added_k", None) is not None:
                k = attn.norm_added_k(k)
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B', heads, C', d)
        keys = torch.cat([img_k, k.to(img_k.dtype)], 2)  # (B', heads, HW+C', d)
        values = torch.cat([img_v, v.to(img_v.dtype)], 2)
        out = F.scaled_dot_product_attention(q.to(img_k.dtype), keys, values)  # (B', heads, C', d)
        out = out.transpose(1, 2).flatten(2)  # (B', C', heads*d)
        if single:
            mlp = block.act_mlp(block.proj_mlp(norm_c))
            self.hidden = c + gate.unsqueeze(1) * block.proj_out(torch.cat([out.to(c.dtype), mlp], 2))
        elif not pre_only:
            c = c + g_msa.unsqueeze(1) * attn.to_add_out(out.to(c.dtype))
            n2 = block.norm2_context(c) * (1 + scale[:, None]) + shift[:, None]
            self.hidden = c + g_mlp.unsqueeze(1) * block.ff_context(n2)
        return k, out


def concept_masses(
    q: torch.Tensor, kc: torch.Tensor, lse: torch.Tensor, scale: float, spans: list[tuple[int, int]]
) -> torch.Tensor:
    """Each concept's probability mass per image query when its word keys are offered beside the keys the
    prompt's softmax ran over (log-normaliser ``lse``): queries (..., HW, d), concept keys (..., C', d), lse
    (..., HW) → (..., HW, C) float32 (one column per concept: softmax over the prompt's keys and that concept's)."""
    sc = torch.matmul(q.float(), kc.float().transpose(-1, -2)).mul_(scale)  # (..., HW, C')
    out = []
    for a, z in spans:
        own = sc[..., a:z]  # (..., HW, |c|)
        both = torch.logaddexp(lse, own.logsumexp(-1))  # (..., HW)
        out.append((own - both.unsqueeze(-1)).exp().sum(-1))  # (..., HW)
    return torch.stack(out, -1)  # (..., HW, C)
