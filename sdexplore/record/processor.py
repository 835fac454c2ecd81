"""The capturing cross-attention processor: explicit softmax on chosen layers, output equal to the original's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)
from diffusers.models.transformers.sana_transformer import SanaAttnProcessor2_0

#: Processors whose output is one SDPA call, which the capturing processor makes too (bitwise the same output).
#: Sana's cross-attention processor is AttnProcessor2_0 without the norms and residual Sana's attn2 never has.
SDPA_PROCESSORS: tuple[type, ...] = (AttnProcessor2_0, SanaAttnProcessor2_0)

#: Processors whose output is plain softmax attention, so a capturing replacement reproduces it. Any other
#: processor (IP-Adapter, custom editing processors, ...) is left in place and its layer is not captured.
REPRODUCIBLE_PROCESSORS: tuple[type, ...] = (
    AttnProcessor,
    AttnProcessor2_0,
    SanaAttnProcessor2_0,
    SlicedAttnProcessor,
    XFormersAttnProcessor,
)


# Called with (processor name, probabilities (B', heads, HW, T) float32 of the captured batch rows); runs on
# the device, returns nothing.
Sink = Callable[[str, torch.Tensor], None]
# Called with (processor name, query length HW); returns the batch rows to capture, or None to hand the call
# to the original processor.
Gate = Callable[[str, int], "slice | None"]
# Called with (processor name, queries (N, heads, HW, d), keys (N, heads, T, d), the Attention module, the text
# tensor the keys came from, the rows to capture, and where the call had a per-key attention mask (PixArt-Σ's T5
# padding): (what it adds to every query's score on each key (N, heads, T), the mask argument it came from) else
# None): the receiver computes the captured rows' probabilities later (batched over layers and steps), from these
# very tensors.
Defer = Callable[
    [
        str,
        torch.Tensor,
        torch.Tensor,
        Attention,
        torch.Tensor,
        slice,
        "tuple[torch.Tensor, torch.Tensor] | None",
    ],
    None,
]


def query_length(hidden_states: torch.Tensor) -> int:
    """The image tokens of an attention call's input: (B, N, C) tokens, or a (B, C, H, W) feature map's H·W."""
    return (
        hidden_states.shape[1]
        if hidden_states.ndim == 3
        else hidden_states.shape[-1] * hidden_states.shape[-2]
    )


def is_reproducible(processor: Any) -> bool:
    """Whether ``processor`` computes plain attention that :class:`CapturingAttnProcessor` reproduces (under a
    control, the processor the control wraps)."""
    if isinstance(processor, ControlledAttnProcessor):
        processor = processor.original
    return type(processor) in REPRODUCIBLE_PROCESSORS


def attention_probs(
    attn: Attention, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """``softmax(q kᵀ · scale + mask)`` as float32 ``(B, heads, HW, T)`` from ``(B, heads, ·, d)`` queries and keys.

    Scores are computed in the model's dtype (float32 where the layer asks to upcast), like diffusers'
    ``Attention.get_attention_scores``; the softmax always runs in float32.
    """
    B, heads, L, d = query.shape
    q3 = query.reshape(B * heads, L, d)  # (B*heads, HW, d)
    k3 = key.reshape(B * heads, -1, d)  # (B*heads, T, d)
    if attn.upcast_attention:
        q3, k3 = q3.float(), k3.float()
    if mask is None:
        base, beta = q3.new_empty(1, 1, 1), 0.0  # ignored with beta=0 (NaNs in it are not propagated)
    else:
        base, beta = (
            mask.expand(B, heads, L, k3.shape[1]).reshape(B * heads, L, -1).to(q3.dtype),
            1.0,
        )  # (B*heads, HW, T)
    scores = torch.baddbmm(base, q3, k3.transpose(1, 2), beta=beta, alpha=attn.scale)  # (B*heads, HW, T)
    return scores.softmax(dim=-1, dtype=torch.float32).view(B, heads, L, -1)  # (B, heads, HW, T)


class CapturingAttnProcessor:
    """Cross-attention that also hands its softmax probabilities to a sink.

    The layer output is computed the way the original processor computes it, so capture never changes the
    image: with ``AttnProcessor2_0`` (diffusers' default) the output still comes from the same
    ``scaled_dot_product_attention`` call (bitwise equal) and the probabilities of the captured rows only are
    computed beside it (:func:`attention_probs`); with ``AttnProcessor`` its own probabilities are used;
    sliced and xFormers processors are reproduced by the explicit path (equal to ~1e-6 in fp32). Calls the
    gate declines, and self-attention calls, go to the original processor untouched.
    """

    def __init__(self, name: str, original: Any, sink: Sink, gate: Gate, defer: Defer | None = None) -> None:
        self.name = name
        self.original = original
        self.sink = sink
        self.gate = gate
        self.defer = defer

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        seq_len = query_length(hidden_states)
        rows = None if encoder_hidden_states is None else self.gate(self.name, seq_len)
        if rows is None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )

        context = encoder_hidden_states  # the text tensor itself: its keys are the same at every step
        mask_arg = (
            attention_mask  # one tensor per denoiser call, shared by its layers (the prepared one is not)
        )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(
                1, 2
            )  # (N, HW, C)

        batch_size, key_len, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(
                attention_mask, key_len, batch_size
            )  # (N*heads, ., T)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (N, HW, heads*d)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # (N, T, heads*d)
        value = attn.to_v(encoder_hidden_states)  # (N, T, heads*d)
        heads = attn.heads

        if type(self.original) is AttnProcessor:
            query = attn.head_to_batch_dim(query)  # (N*heads, HW, d)
            key = attn.head_to_batch_dim(key)  # (N*heads, T, d)
            value = attn.head_to_batch_dim(value)  # (N*heads, T, d)
            probs = attn.get_attention_scores(query, key, attention_mask)  # (N*heads, HW, T)
            self.sink(
                self.name, probs.view(batch_size, heads, -1, key_len)[rows].float()
            )  # (B', heads, HW, T)
            hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))  # (N, HW, heads*d)
        else:
            head_dim = key.shape[-1] // heads
            query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (N, heads, HW, d)
            key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (N, heads, T, d)
            value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (N, heads, T, d)
            if attention_mask is not None:
                attention_mask = attention_mask.view(
                    batch_size, heads, -1, attention_mask.shape[-1]
                )  # (N, heads, ., T)
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if type(self.original) in SDPA_PROCESSORS:
                # Probabilities of the captured rows only (the conditional half by default), beside the original's
                # own SDPA kernel, which still produces the output: bitwise unchanged.
                if self.defer is not None and (attention_mask is None or attention_mask.shape[-2] == 1):
                    bias = None  # a per-key mask (the same for every query) is a bias on the keys' scores
                    if attention_mask is not None:
                        bias = (attention_mask[:, :, 0], mask_arg)  # (N, heads, T)
                    self.defer(
                        self.name, query, key, attn, context, rows, bias
                    )  # probabilities later, batched
                else:
                    mask = None if attention_mask is None else attention_mask[rows]
                    self.sink(self.name, attention_probs(attn, query[rows], key[rows], mask))
                out = F.scaled_dot_product_attention(
                    query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False
                )  # (N, heads, HW, d)
            else:
                probs = attention_probs(attn, query, key, attention_mask)  # (N, heads, HW, T) float32
                self.sink(self.name, probs[rows])
                out = torch.matmul(probs.to(value.dtype), value)  # (N, heads, HW, d)
            hidden_states = (
                out.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)
            )  # (N, HW, C)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(
                batch_size, channel, height, width
            )  # (N, C, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


# Called with (layer name, cross-attention?, query length HW, batch rows N); returns the call description a
# control edits (opaque here), or None when no control edits this call (then the original processor runs).
Begin = Callable[[str, bool, int, int], Any]
# Called with (that call, probabilities (N, heads, HW, T) float32); edits them in place and returns the batch rows
# it changed.
Apply = Callable[[Any, torch.Tensor], "list[int]"]
# Called with (that call); returns the (target row, source row) pairs whose image-token keys and values the call
# takes from the source row (joint attention only: Stable Flow's injection), or an empty list.
Inject = Callable[[Any], "list[tuple[int, int]]"]


class ControlledAttnProcessor:
    """An attention layer whose probabilities a control may change (cross- or self-attention).

    Installed by the attachment alone, on the layers a control asks for. On a call no control edits, it hands
    the call to ``capture`` (a recorder's :class:`CapturingAttnProcessor`, if one records this layer) or to the
    original processor, untouched: the output is bitwise the plain one. On an edited call it computes the
    probabilities explicitly (:func:`attention_probs`), lets the controls change them, hands the *edited*
    probabilities of the recorder's rows to its sink (so recorded maps show the attention that made the image),
    and computes the changed rows' output as ``probs @ V``; the rows no control changed keep the original
    processor's output bit for bit.
    """

    def __init__(self, name: str, original: Any, cross: bool, begin: Begin, apply: Apply) -> None:
        self.name = name
        self.original = original
        self.cross = cross
        self.begin = begin
        self.apply = apply
        self.capture: CapturingAttnProcessor | None = None  # set by the attachment while a recorder records

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        plain = self.capture if self.capture is not None else self.original
        cross = encoder_hidden_states is not None
        seq_len = query_length(hidden_states)
        call = None if cross != self.cross else self.begin(self.name, cross, seq_len, hidden_states.shape[0])
        if call is None:
            return plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        residual, mask_arg = hidden_states, attention_mask
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(
                1, 2
            )  # (N, HW, C)
        batch_size = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key_len = context.shape[1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key_len, batch_size)
            attention_mask = attention_mask.view(
                batch_size, attn.heads, -1, attention_mask.shape[-1]
            )  # (N, heads, ., T)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)  # (N, HW, heads*d)
        if cross and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key = attn.to_k(context)  # (N, T, heads*d)
        value = attn.to_v(context)  # (N, T, heads*d)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query = query.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (N, heads, HW, d)
        key = key.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (N, heads, T, d)
        value = value.view(batch_size, -1, heads, head_dim).transpose(1, 2)  # (N, heads, T, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        probs = attention_probs(attn, query, key, attention_mask)  # (N, heads, HW, T) float32
        changed = sorted(set(self.apply(call, probs)))
        capture = self.capture
        if cross and capture is not None:
            rows = capture.gate(capture.name, seq_len)
            if rows is not None:
                recorder = getattr(capture.sink, "__self__", None)
                if getattr(recorder, "keep_probs", False):
                    recorder._flush()  # the kept probabilities are filed in call order: the waiting calls first
                capture.sink(capture.name, probs[rows])  # the edited probabilities: what made the image
        if len(changed) == batch_size:
            out = None
        else:  # the rows no control changed: the original processor's output, bitwise
            out = self.original(attn, residual, encoder_hidden_states, mask_arg, temb, *args, **kwargs)
            if not changed:
                return out
        idx = torch.tensor(changed, device=probs.device)
        mixed = torch.matmul(probs[idx].to(value.dtype), value[idx])  # (N', heads, HW, d)
        mixed = (
            mixed.transpose(1, 2).reshape(len(changed), -1, heads * head_dim).to(query.dtype)
        )  # (N', HW, C)
        mixed = attn.to_out[1](attn.to_out[0](mixed))
        if input_ndim == 4:
            mixed = mixed.transpose(-1, -2).reshape(len(changed), channel, height, width)  # (N', C, h, w)
        if attn.residual_connection:
            mixed = mixed + residual[idx]
        mixed = mixed / attn.rescale_output_factor
        if out is None:
            return mixed
        out[idx] = mixed.to(out.dtype)
        return out


def controlled_processor(
    name: str,
    original: Any,
    begin: Begin,
    apply: Apply,
    inject: Inject | None = None,
    text_len: Callable[[], int] | None = None,
) -> Any:
    """The controlled processor for layer ``name`` (a module name) whose processor is ``original``: an SD3 joint
    block's :class:`~sdexplore.record.joint.JointControlledProcessor`, a Flux.1 / Flux.2 block's
    :class:`~sdexplore.record.joint.FluxControlledProcessor` (``text_len()``: the text tokens at the head of a
    single-stream block's sequence), else a UNet layer's :class:`ControlledAttnProcessor` (self-attention for
    ``attn1`` layers, cross-attention otherwise). ``inject`` (joint blocks only) gives the (target row, source row)
    pairs whose image keys and values a call injects."""
    from .joint import REPRODUCIBLE_JOINT, FluxControlledProcessor, JointControlledProcessor

    if type(original) in REPRODUCIBLE_JOINT["image-text"]:
        return JointControlledProcessor(name, original, begin, apply, inject)
    if type(original) in REPRODUCIBLE_JOINT["text-image"] + REPRODUCIBLE_JOINT["single"]:
        return FluxControlledProcessor(name, original, begin, apply, inject, text_len or (lambda: 0))
    return ControlledAttnProcessor(name, original, name.rpartition(".")[2] != "attn1", begin, apply)
