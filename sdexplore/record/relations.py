"""Attention relations beyond image→text: which block of which softmax a recording keeps, and the selection by query
and head that keeps it small.

A relation names the queries and the keys, ``"queries->keys"``:

- ``"image->text"`` (the default): every image query's probability on each text key (the per-token maps).
- ``"image->image"``: self-attention. UNets (and PixArt-Σ): the ``attn1`` layers' softmax over the image keys.
  MMDiT (SD3, Flux, Chroma): the image rows × image columns of the joint softmax, normalised over *all* keys (text
  and image), so a query's map sums to less than one. Only the selected queries are kept: each is a point ``(y, x)``
  or a boolean mask ``(H, W)`` on the latent grid (``maps.aggregate``'s grid), and each gives one map over the image
  keys, ``(h, w)`` per layer (the mean over a mask's pixels). Never the ``(HW)²`` matrix.
- ``"text->image"`` (MMDiT only): each text token's probability on every image key, normalised over all keys: a
  token's map of where it reads the image. Maps are indexed by token, as image→text maps are (``maps.word``).
- ``"text->text"`` (MMDiT only): each text token's probability on every text key; one ``(1, T)`` row per token.

UNet cross-attention has no text queries (text is only ever keys and values there), so text→image and text→text do
not exist on UNets, PixArt-Σ or Sana; Sana's self-attention is linear (no probabilities at all).

``heads``: ``"mean"`` (every head) or a list of head indices: the maps are the mean over those heads only (and
``per_head`` keeps those heads one by one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..results.attention_maps import RELATIONS, TEXT_QUERIES
from .processor import query_length

__all__ = ["RELATIONS", "TEXT_QUERIES", "SelfCapturingProcessor", "Selection", "parse"]


@dataclass(frozen=True)
class Selection:
    """A recording's relation and what of it is kept (checked before any run)."""

    relation: str = "image->text"
    points: tuple[Any, ...] = ()  # image queries: (y, x) ints or (H, W) bool masks, in the order given
    heads: tuple[int, ...] | None = None  # None: the mean over every head

    @property
    def num_queries(self) -> int:
        """Maps per image for image→image (one per point or mask)."""
        return len(self.points)


def parse(relation: Any, queries: Any, heads: Any) -> Selection:
    """Check the ``relation``, ``queries`` and ``heads`` options (types only; sizes are checked against the latent
    at the call's first step) and return the selection."""
    if relation is None:
        relation = "image->text"
    if not isinstance(relation, str) or relation.replace(" ", "") not in RELATIONS:
        raise InvalidArgumentError(
            f"relation={relation!r} is not an attention relation; use one of {', '.join(RELATIONS)} "
            "('queries->keys': image→text is the per-token maps, image→image self-attention per query point)."
        )
    relation = relation.replace(" ", "")
    points: tuple[Any, ...] = ()
    if relation == "image->image":
        if queries is None:
            raise InvalidArgumentError(
                "relation='image->image' keeps one map per query you select (never the (HW)² matrix): pass "
                "queries=[(y, x), ...] (latent cells) or a boolean (H, W) mask of the latent grid, e.g. "
                "queries=[(8, 8)]."
            )
        points = _queries(queries)
    elif queries is not None:
        what = (
            "every image query is a pixel of the maps"
            if relation == "image->text"
            else "every text token is recorded; read one with maps.word() or maps.token()"
        )
        raise InvalidArgumentError(
            f"queries= selects image query points for relation='image->image' only; with relation={relation!r} "
            f"{what}. Leave queries out."
        )
    return Selection(relation, points, _heads(heads))


def _queries(queries: Any) -> tuple[Any, ...]:
    if isinstance(queries, (torch.Tensor, np.ndarray)) and np.ndim(queries) == 2 and not _is_point(queries):
        queries = [queries]
    if not isinstance(queries, Sequence) or isinstance(queries, str) or not len(queries):
        raise InvalidArgumentError(
            f"queries={queries!r}: pass a list of (y, x) latent cells and/or boolean (H, W) masks, e.g. [(8, 8)]."
        )
    out = []
    for i, q in enumerate(queries):
        if _is_point(q):
            out.append((int(q[0]), int(q[1])))
        elif isinstance(q, (torch.Tensor, np.ndarray)) and np.ndim(q) == 2:
            mask = torch.as_tensor(np.asarray(q) if isinstance(q, np.ndarray) else q.detach().cpu())
            if mask.dtype != torch.bool:
                raise InvalidArgumentError(
                    f"queries[{i}] is a {tuple(mask.shape)} {mask.dtype} array: a mask must be boolean (True at "
                    "the query pixels)."
                )
            if not bool(mask.any()):
                raise InvalidArgumentError(f"queries[{i}] is a mask with no True pixel: it selects no query.")
            out.append(mask.clone())
        else:
            raise InvalidArgumentError(
                f"queries[{i}]={q!r} is neither a (y, x) pair of ints nor a boolean (H, W) mask."
            )
    return tuple(out)


def _is_point(q: Any) -> bool:
    if isinstance(q, (torch.Tensor, np.ndarray)):
        return np.ndim(q) == 1 and len(q) == 2 and not np.asarray(q).dtype == bool
    return (
        isinstance(q, (tuple, list))
        and len(q) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in q)
    )


def _heads(heads: Any) -> tuple[int, ...] | None:
    if heads is None or (isinstance(heads, str) and heads == "mean"):
        return None
    if (
        isinstance(heads, str)
        or not isinstance(heads, Sequence)
        or not heads
        or not all(isinstance(h, (int, np.integer)) and not isinstance(h, bool) and h >= 0 for h in heads)
    ):
        raise InvalidArgumentError(
            f"heads={heads!r}: pass 'mean' (every head) or a list of head indices ≥ 0, e.g. [0, 3]."
        )
    return tuple(dict.fromkeys(int(h) for h in heads))


def query_masks(sel: Selection, latent: tuple[int, int]) -> torch.Tensor:
    """(Q, H, W) float32: each selected query as weights on the latent grid that sum to 1 (a point: its cell; a
    mask: its pixels equally). Raises InvalidArgumentError for a point outside, or a mask of another size than,
    the latent ``(H, W)``."""
    H, W = latent
    out = torch.zeros(len(sel.points), H, W)
    for i, q in enumerate(sel.points):
        if isinstance(q, tuple):
            y, x = q
            if not (0 <= y < H and 0 <= x < W):
                raise InvalidArgumentError(
                    f"queries[{i}]=({y}, {x}) lies outside this call's {H}×{W} latent grid: give (y, x) with "
                    f"0 ≤ y < {H} and 0 ≤ x < {W} (latent cells, as maps.aggregate)."
                )
            out[i, y, x] = 1.0
        else:
            if tuple(q.shape) != (H, W):
                raise InvalidArgumentError(
                    f"queries[{i}] is a {tuple(q.shape)} mask, but this call's latent grid is {H}×{W}: give masks "
                    "of the latent grid's size (as maps.aggregate)."
                )
            out[i] = q.float() / q.sum()
    return out


def grid_weights(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(Q, h·w) float32: the query weights ``masks`` (Q, H, W) on a layer's ``hw`` grid (area-averaged), each row
    summing to 1."""
    w = F.adaptive_avg_pool2d(masks[:, None], hw)[:, 0].flatten(1)  # (Q, h*w)
    return w / w.sum(-1, keepdim=True)


def check_heads(sel: Selection, heads: dict[str, int]) -> None:
    """Refuse head indices a selected layer does not have (``heads``: layer → its head count)."""
    if sel.heads is None:
        return
    few = {n: h for n, h in heads.items() if max(sel.heads) >= h}
    if few:
        name, count = next(iter(few.items()))
        raise InvalidArgumentError(
            f"heads={list(sel.heads)} names head {max(sel.heads)}, but layer {name} has {count} heads (0..{count - 1}); "
            "pick heads every recorded layer has, or record fewer layers (layers=, scales=)."
        )


def rows_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    lse: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """exp(q·kᵀ·scale + bias − lse) float32: queries (..., R, d) on keys (..., K, d) → (..., R, K).

    ``lse`` (..., R): each query's log-normaliser over *every* key the model weighs (joint attention); None: a
    softmax over these keys alone (self-attention). ``bias`` broadcasts onto the scores (a mask's addition)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)  # (..., R, K)
    if bias is not None:
        scores = scores.add_(bias)
    if lse is None:
        return scores.softmax(-1)
    return scores.sub_(lse.unsqueeze(-1)).exp_()


def weighted_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    scale: float,
    lse_of: Any = None,
    bias: torch.Tensor | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Image→image maps of the selected queries: (B, heads, K, Q) float32 from queries (B, heads, L, d), keys
    (B, heads, K, d) and ``weights`` (Q, L) (rows summing to 1): for each selection, the weighted mean of its query
    rows' probabilities over the keys. Only rows some selection uses are computed, ``chunk`` at a time (working
    memory B·heads·chunk·K floats). ``lse_of(idx)`` gives those rows' log-normalisers over every key (joint
    attention), or None for a softmax over ``k``."""
    used = torch.nonzero(weights.sum(0) > 0).flatten()  # rows any selection reads
    B, heads, _, _ = q.shape
    out = q.new_zeros((B, heads, k.shape[-2], weights.shape[0]), dtype=torch.float32)  # (B, heads, K, Q)
    w = weights.to(q.device)
    for a in range(0, len(used), chunk):
        idx = used[a : a + chunk].to(q.device)
        lse = None if lse_of is None else lse_of(idx)  # (B, heads, R)
        p = rows_probs(q[:, :, idx], k, scale, lse, bias)  # (B, heads, R, K)
        out += torch.matmul(p.transpose(-1, -2), w[:, idx].T)  # (B, heads, K, Q)
    return out


# Called with (layer name, query length HW); returns the batch rows to capture, or None to pass the call through.
Gate = Callable[[str, int], "slice | None"]
# Called with (layer name, queries (N, heads, HW, d), keys (N, heads, HW, d), the rows to capture, SDPA's scale).
Relate = Callable[[str, torch.Tensor, torch.Tensor, slice, float], None]


class SelfCapturingProcessor:
    """A self-attention layer (``attn1``) whose original is diffusers' ``AttnProcessor2_0``, step for step, also
    handing the captured rows' queries and keys to ``relate`` (image→image maps). The output comes from the same
    ``scaled_dot_product_attention`` call: bitwise unchanged. Calls the gate declines, cross-attention calls and
    masked calls go to the original processor."""

    def __init__(self, name: str, original: Any, gate: Gate, relate: Relate) -> None:
        self.name = name
        self.original = original
        self.gate = gate
        self.relate = relate

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        seq_len = query_length(hidden_states)
        rows = None
        if encoder_hidden_states is None and attention_mask is None and not args and not kwargs:
            rows = self.gate(self.name, seq_len)
        if rows is None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        residual = hidden_states  # AttnProcessor2_0's own steps, for a self-attention call without a mask
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(
                1, 2
            )  # (N, HW, C)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)  # (N, HW, heads*d)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (N, heads, HW, d)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        self.relate(
            self.name, query, key, rows, head_dim**-0.5
        )  # SDPA's default scale, as the original calls it
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False
        )  # (N, heads, HW, d)
        hidden_states = hidden_states.transpose(1, 2).reshape(
            batch_size, -1, attn.heads * head_dim
        )  # (N, HW, C)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )  # (N, C, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def self_attention_layers(denoiser: torch.nn.Module) -> list[str]:
    """Processor names of a UNet's (or a cross-attention DiT's) self-attention layers: the ``attn1`` modules."""
    return [
        f"{name}.processor"
        for name, module in denoiser.named_modules()
        if name.rpartition(".")[2] == "attn1" and hasattr(module, "set_processor")
    ]
