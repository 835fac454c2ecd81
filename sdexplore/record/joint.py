"""Joint-attention capture for MMDiT denoisers (SD3's joint blocks; Flux's double- and single-stream blocks).

In an MMDiT block image and text tokens attend jointly: one softmax over the keys of both. The per-token map
of a text token is the image-query × text-key block of that softmax. Materialising the whole softmax is costly
(SD3 at 1024²: 4,429 keys per query), so the output still comes from the fused kernel and the kernel's own
log-sum-exp over *all* keys is kept beside it (:func:`sdpa_with_lse`); the text block is then
``exp(q·kₜᵀ·scale − lse)``, computed for the captured rows only. Where the kernel gives no log-sum-exp (the math
fallback), it is computed explicitly.

Map kinds (recorded in each map's metadata):

- ``"joint"``: the text block of the joint softmax, normalised over all keys (text and image), as the model
  weighs them. A token's maps then sum to less than one per query: the rest of the mass went to image keys.
- ``"text"``: the same scores with the softmax taken over the text keys only (comparable to UNet
  cross-attention, where every query's mass is spread over the text).
- ``"output"``: ConceptAttention's attention-output maps (Helbling et al., arXiv 2502.04320): the image tokens'
  attention outputs projected onto the text tokens' outputs, softmax over the prompt's word tokens.

``"output"`` against the paper: the outputs are the attention op's, before the output projections, heads
concatenated (as the paper's code takes them); the prompt's words play the part of the paper's concepts in the
softmax; every layer and step is averaged (the paper keeps Flux's last double-stream layers: read one layer with
``maps.layers``). Its meaning depends on the model. On the embedded tiny-shapes-mmdit (4 blocks) these maps do not
localise: the text tokens' outputs are alike and point away from the drawn shape, so every word's map peaks on the
background (shape-word IoU 0.12 against 0.68 for ``"joint"``, 24 prompts; no single layer, head subset or
normalisation tried did better). Use ``"joint"`` there; ``tests/test_embedded_mmdit.py`` holds these figures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb as _apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
from diffusers.models.transformers.transformer_flux import _get_qkv_projections as _flux_projections
from diffusers.models.transformers.transformer_flux2 import Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor
from diffusers.models.transformers.transformer_flux2 import _get_qkv_projections as _flux2_projections
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen as _qwen_rope
from diffusers.models.transformers.transformer_z_image import SEQ_MULTI_OF as _Z_MULTIPLE
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

from ..errors import RecorderStateError

#: The map kinds of MMDiT attention (see the module docstring).
JOINT_KINDS = ("joint", "text", "output")

# Called with (layer name, the Attention module, queries of the image tokens (N, heads, HW, d), keys of the text tokens (N, heads, T, d),
# log-sum-exp of each image query over all keys (N, heads, HW) float32 or None, the attention output of the
# image tokens (N, HW, C) and of the text tokens (N, T, C) (before the output projections), the layer's scale,
# keys and values of the image tokens (N, heads, HW, d), for a log-sum-exp the kernel did not give and for
# concept tokens).
JointSink = Callable[..., None]
# Called with (layer name, number of image tokens); returns True to capture this call.
JointGate = Callable[[str, int], bool]

_FLASH, _EFFICIENT, _CUDNN = 1, 2, 3  # torch's SDPBackend values (torch._fused_sdp_choice)
# the CPU flash kernel's (output, log-sum-exp): torch's own binding where it has one (the op packet's Python
# dispatch costs more than the kernel at small sizes)
_FLASH_CPU = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None) or (
    lambda *a, **k: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*a, **k)
)


def sdpa_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    need_lse: bool = True,
    attn_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``F.scaled_dot_product_attention(q, k, v)`` and the log-sum-exp of each query's scores over all keys.

    Inputs are (B, heads, L, d). The output is computed by the very kernel SDPA would pick
    (``torch._fused_sdp_choice``), called through its ATen op so that it also returns the log-sum-exp it
    computes anyway: the output is bitwise SDPA's (checked for the CPU flash kernel in the tests). Returns
    (output (B, heads, L, d), lse (B, heads, L) float32 in natural-log units, or None where the chosen backend
    gives none (the math fallback): callers then compute it explicitly).

    ``attn_mask`` is the call's mask as SDPA takes it (bool: False masked; or float, added): where SDPA picks the
    CPU flash kernel for it, that kernel is called with the mask as SDPA hands it over (bool → 0 / −inf in the
    queries' dtype), and the log-sum-exp is over the kept keys; elsewhere SDPA runs and the log-sum-exp is None.
    """
    if attn_mask is not None:
        return _masked_sdpa_with_lse(query, key, value, attn_mask, need_lse)
    if need_lse:
        try:
            choice = int(torch._fused_sdp_choice(query, key, value, None, 0.0, False))
            if query.device.type == "cpu" and choice == _FLASH:
                return _FLASH_CPU(query, key, value, 0.0, False)
            if query.device.type == "cuda" and choice == _FLASH:
                res = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, False, False)
                return res[0], _lse_shape(res[1], query)
            if query.device.type == "cuda" and choice == _EFFICIENT:
                res = torch.ops.aten._scaled_dot_product_efficient_attention(
                    query, key, value, None, True, 0.0, False
                )
                return res[0], _lse_shape(res[1], query)
            if query.device.type == "cuda" and choice == _CUDNN:
                res = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    query, key, value, None, True, 0.0, False, False
                )
                return res[0], _lse_shape(res[1], query)
        except (RuntimeError, AttributeError, TypeError):
            pass  # an op this torch build lacks: SDPA for the output, the log-sum-exp computed by the caller
    return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False), None


def _masked_sdpa_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, need_lse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`sdpa_with_lse` with a mask: the CPU flash kernel where SDPA picks it (bitwise SDPA's output), else
    SDPA itself (log-sum-exp None)."""
    if need_lse and query.device.type == "cpu" and mask.dtype in (torch.bool, query.dtype):
        try:
            if int(torch._fused_sdp_choice(query, key, value, mask, 0.0, False)) == _FLASH:
                if mask.dtype == torch.bool:  # as SDPA converts a boolean mask before its kernel
                    mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(
                        ~mask, float("-inf")
                    )
                return _FLASH_CPU(query, key, value, 0.0, False, attn_mask=mask)
        except (RuntimeError, AttributeError, TypeError):
            pass  # a torch build without the masked kernel: SDPA, the log-sum-exp computed by the caller
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask), None


def _lse_shape(lse: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """A kernel's log-sum-exp as (B, heads, L) float32 (the efficient kernel pads L to a multiple of 32)."""
    B, heads, L, _ = query.shape
    return lse.reshape(B, heads, -1)[..., :L].float()  # (B, heads, L)


def text_block(
    q_img: torch.Tensor,
    k_txt: torch.Tensor,
    lse: torch.Tensor | None,
    scale: float,
    kind: str,
    k_img: Any = None,
    key_bias: torch.Tensor | None = None,
    image_key_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities of image queries (..., HW, d) on text keys (..., T, d) → (..., HW, T) float32, and the
    log-normaliser the softmax used, (..., HW) float32 (concept maps are normalised against it).

    ``kind="joint"``: normalised over every key (``lse`` from the kernel; when it is None, ``k_img`` (..., HW', d)
    supplies the image keys to compute it); ``kind="text"``: softmax over the text keys only. ``key_bias``
    (..., T) float32, where the call had an attention mask: what it adds to every image query's score on each
    text key (−inf for a masked key; Chroma's float mask adds 1 or 0); with ``kind="joint"`` then ``lse`` must be
    the masked call's own, or None with ``k_img`` and ``image_key_bias`` (..., HW') float32, what the mask adds on
    each image key.
    """
    scores = torch.matmul(q_img.float(), k_txt.float().transpose(-1, -2)).mul_(scale)  # (B, heads, HW, T)
    if key_bias is not None:
        scores = scores.add_(key_bias.unsqueeze(-2).unsqueeze(-2))  # (B, 1, 1, T) over heads and queries
    if kind == "text":
        lse = scores.logsumexp(-1)  # (B, heads, HW)
    elif lse is None:
        img = torch.matmul(q_img.float(), k_img.float().transpose(-1, -2)).mul_(scale)  # (B, heads, HW, HW')
        if image_key_bias is not None:
            img = img.add_(
                image_key_bias.unsqueeze(-2).unsqueeze(-2)
            )  # (B, 1, 1, HW') over heads and queries
        lse = torch.logaddexp(img.logsumexp(-1), scores.logsumexp(-1))  # (B, heads, HW)
    return scores.sub_(lse.unsqueeze(-1)).exp_(), lse


def output_scores(o_img: torch.Tensor, o_txt: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """ConceptAttention maps: image outputs (B, HW, C) · text outputs (B, T, C)ᵀ, softmax over the kept text
    tokens (``keep`` (B, T) bool; None keeps all); returns (B, 1, HW, T) float32 (one "head").

    The outputs are the attention op's before the output projection, every head's channels together (C = heads·d):
    one dot product over all heads, as in the paper."""
    scores = torch.matmul(o_img.float(), o_txt.float().transpose(-1, -2))  # (B, HW, T)
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    return scores.softmax(-1).nan_to_num_(0.0).unsqueeze(1)  # (B, 1, HW, T)


def joint_attention_layers(denoiser: torch.nn.Module) -> list[tuple[str, str]]:
    """(processor name, layout) of the text-conditioned attention layers of an MMDiT denoiser.

    Layout ``"image-text"``: SD3's joint blocks (image tokens first, then text, from two projections);
    ``"text-image"``: Flux's and Flux.2's double-stream blocks (text first); ``"single"``: their single-stream
    blocks (one sequence, text first, the text length known only from the denoiser's input). Image-only attention (SD3.5's
    ``attn2``) carries no text and is not listed. ``"qwen"``: Qwen-Image's double-stream blocks (text first, its own
    rotary embedding and mask); ``"unified"``: Z-Image's main layers (one sequence, image first; its refiners see
    one stream each and are not listed).
    """
    kind = type(denoiser).__name__
    if kind.startswith("ZImage"):
        return [(f"{n}.processor", "unified") for n, _ in denoiser.named_modules() if _z_layer(n)]
    layers = []
    for name, module in denoiser.named_modules():
        # the class first: most modules are not attention, and a missing attribute on a module instance is slow
        if not hasattr(type(module), "set_processor") or not (
            hasattr(module, "to_q") or hasattr(module, "to_qkv_mlp_proj")  # Flux.2's fused single-stream
        ):
            continue
        if getattr(module, "add_k_proj", None) is not None:
            flux = type(module).__name__.startswith("Flux")
            own = "qwen" if kind.startswith("QwenImage") else "image-text"
            layers.append((f"{name}.processor", "text-image" if flux else own))
        elif name.startswith("single_transformer_blocks."):
            layers.append((f"{name}.processor", "single"))
    return layers


class JointCapturingProcessor:
    """SD3's ``JointAttnProcessor2_0``, step for step, also handing the captured rows' queries, keys, the kernel's
    log-sum-exp and the attention outputs to a sink. The output comes from the same kernel: bitwise unchanged.
    Calls without text (image-only attention) and calls the gate declines go to the original processor."""

    def __init__(self, name: str, original: Any, sink: JointSink, gate: JointGate, need_lse: bool) -> None:
        self.name = name
        self.original = original
        self.sink = sink
        self.gate = gate
        self.need_lse = need_lse

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if (
            encoder_hidden_states is None
            or attention_mask is not None
            or not self.gate(self.name, hidden_states.shape[1])
        ):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        batch_size, hw = hidden_states.shape[:2]
        query, key, value = sd3_qkv(attn, hidden_states, encoder_hidden_states)  # (N, heads, HW+T, d)
        img_q = query[:, :, :hw]
        head_dim = query.shape[-1]

        out, lse = sdpa_with_lse(query, key, value, self.need_lse)  # (N, heads, HW+T, d), (N, heads, HW+T)
        hidden_states = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)  # (N, HW+T, C)
        hidden_states = hidden_states.to(query.dtype)
        self.sink(
            self.name,
            attn,
            img_q,
            key[:, :, hw:],
            None if lse is None else lse[:, :, :hw],
            hidden_states[:, :hw],
            hidden_states[:, hw:],
            float(attn.scale),
            key[:, :, :hw],
            value[:, :, :hw],
            q_txt=query[:, :, hw:],  # the text rows, for text→image and text→text maps
            lse_txt=None if lse is None else lse[:, :, hw:],
        )
        return sd3_output(attn, hidden_states, hw)


def sd3_qkv(
    attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of an SD3 joint block as ``JointAttnProcessor2_0`` computes them, image tokens
    first, then text: each (N, heads, HW+T, d)."""
    batch_size = hidden_states.shape[0]
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
    txt_q = attn.add_q_proj(encoder_hidden_states)  # (N, T, heads*d)
    txt_k = attn.add_k_proj(encoder_hidden_states)
    txt_v = attn.add_v_proj(encoder_hidden_states)
    txt_q = txt_q.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (N, heads, T, d)
    txt_k = txt_k.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    txt_v = txt_v.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_added_q is not None:
        txt_q = attn.norm_added_q(txt_q)
    if attn.norm_added_k is not None:
        txt_k = attn.norm_added_k(txt_k)
    query = torch.cat([query, txt_q], dim=2)  # (N, heads, HW+T, d)
    key = torch.cat([key, txt_k], dim=2)
    value = torch.cat([value, txt_v], dim=2)
    return query, key, value


def sd3_output(attn: Any, hidden_states: torch.Tensor, hw: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An SD3 joint block's attention output (N, HW+T, C) split and projected as ``JointAttnProcessor2_0`` does:
    (image tokens (N, HW, C'), text tokens (N, T, C'))."""
    hidden_states, encoder_hidden_states = hidden_states[:, :hw], hidden_states[:, hw:]
    if not attn.context_pre_only:
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    return hidden_states, encoder_hidden_states


class JointControlledProcessor:
    """An SD3 joint block whose image-query × text-key probabilities a control may change, and whose image-token
    keys and values a control may inject from other batch rows.

    Installed by the attachment alone (:func:`~sdexplore.record.processor.controlled_processor`), on the joint
    blocks a control asks for. On a call no control edits, it hands the call to ``capture`` (a recorder's
    :class:`JointCapturingProcessor`) or to the original processor, untouched: bitwise the plain output. On an
    edited call:

    - **injection** first (``inject(call)``: (target row, source row) pairs, Stable Flow's attention injection):
      the target rows' image-token keys and values, the image part of K and V in the joint attention, are the
      source rows' (their queries and text keys and values stay their own), so the target's image and text
      tokens attend to the source image's features;
    - then the original's kernel runs (:func:`sdpa_with_lse`: the same output and the log-sum-exp of every query
      over all keys), the image-query × text-key block of the joint softmax is formed explicitly,
      ``P = exp(q·kₜᵀ·scale − lse)`` (N, heads, HW, T) float32, and the controls edit it in place, the same
      probabilities and the same contract as a UNet layer's cross-attention. Nothing is renormalised (as in
      Prompt-to-Prompt): a word scaled by 0 gives its share of each image query's attention to nobody, the image
      keys and the other words keep theirs. The changed rows' image-token outputs are then the joint attention
      with the edited block, ``o' = o + (P' − P)·vₜ`` (the image-key part of the softmax is unchanged, so this is
      ``P_img·v_img + P'·vₜ`` exactly).

    Text-token queries and the rows no control changed keep the kernel's output bit for bit. A recorder of
    ``"joint"`` maps in the same block records the edited block (and, under injection, the block the injected
    keys gave).
    """

    cross = True

    def __init__(
        self,
        name: str,
        original: Any,
        begin: Callable,
        apply: Callable,
        inject: Callable | None = None,
    ) -> None:
        self.name = name
        self.original = original
        self.begin = begin
        self.apply = apply
        self.inject = inject  # (call) -> [(target row, source row)]: image keys and values to take
        self.capture: JointCapturingProcessor | None = None  # set by the attachment while a recorder records

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        plain = self.capture if self.capture is not None else self.original
        call = None
        if encoder_hidden_states is not None and attention_mask is None:
            call = self.begin(self.name, True, hidden_states.shape[1], hidden_states.shape[0])
        if call is None:
            return plain(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        batch_size, hw = hidden_states.shape[:2]
        query, key, value = sd3_qkv(attn, hidden_states, encoder_hidden_states)  # (N, heads, HW+T, d)
        out = self._attend(attn, call, query, key, value, slice(0, hw), slice(hw, None), float(attn.scale))
        hidden_states = out.transpose(1, 2).reshape(
            batch_size, -1, attn.heads * query.shape[-1]
        )  # (N, HW+T, C)
        return sd3_output(attn, hidden_states.to(query.dtype), hw)

    def _attend(
        self,
        attn: Any,
        call: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        img: slice,
        txt: slice,
        scale: float,
    ) -> torch.Tensor:
        """The edited call's attention output (N, heads, L, d) from its queries, keys and values (N, heads, L, d),
        ``img`` and ``txt`` the image and text tokens' places in the joint sequence: injection, the kernel, the
        controls' edit of the image-query × text-key block, the recorder's maps."""
        pairs = [] if self.inject is None else list(self.inject(call))
        if pairs:
            tgt = torch.tensor([t for t, _ in pairs], device=key.device)
            src = torch.tensor([s for _, s in pairs], device=key.device)
            key, value = key.clone(), value.clone()
            key[tgt, :, img] = key[src, :, img]  # (N', heads, HW, d): the source image's keys
            value[tgt, :, img] = value[src, :, img]  # and values
        out, lse = sdpa_with_lse(query, key, value)  # (N, heads, L, d), (N, heads, L) or None
        capture = self.capture
        captured = capture is not None and bool(capture.gate(capture.name, query[:, :, img].shape[2]))
        if not getattr(call, "probs", True):  # only injections act: no probabilities to form
            if captured:
                self._record(attn, query, key, value, out, lse, None, img, txt, scale, False)
            return out
        n = query.shape[0]
        # the rows whose block is formed: those the controls read or edit, and those a "joint" recorder files
        rows = getattr(call, "prob_rows", slice(None))
        kept = self._joint_rows() if captured else None
        if rows.step not in (None, 1) or (kept is not None and kept != rows):
            rows = slice(None)
        lo, hi, _ = rows.indices(n)
        q_img, k_txt, v_txt = query[:, :, img], key[:, :, txt], value[:, :, txt]
        plain_probs, _ = text_block(
            q_img[lo:hi],
            k_txt[lo:hi],
            None if lse is None else lse[lo:hi, :, img],
            scale,
            "joint",
            key[lo:hi, :, img],
        )  # (N', heads, HW, T) float32: the image queries' share of each text key, rows lo:hi
        if (lo, hi) == (0, n):
            probs = plain_probs.clone()
        else:  # the rows nobody reads are not formed: zero
            probs = plain_probs.new_empty((n, *plain_probs.shape[1:]))  # (N, heads, HW, T)
            probs[:lo].zero_()
            probs[lo:hi] = plain_probs
            probs[hi:].zero_()
        changed = sorted(set(self.apply(call, probs)))
        if captured:
            self._record(attn, query, key, value, out, lse, probs, img, txt, scale, bool(changed))
        if changed:
            if changed[0] < lo or changed[-1] >= hi:
                raise RecorderStateError(
                    f"A control changed rows {changed} of {self.name} but declared it reads rows {lo} to "
                    f"{hi - 1} only: a ControlTap's rows must cover every row its edit changes."
                )
            a, b = changed[0], changed[-1] + 1
            # consecutive rows (a word swap's targets, a reweighted image): slices, no gathered copies
            idx: Any = slice(a, b) if b - a == len(changed) else torch.tensor(changed, device=out.device)
            plain_idx = slice(a - lo, b - lo) if isinstance(idx, slice) else idx - lo
            delta = probs[idx] - plain_probs[plain_idx]  # (N', heads, HW, T): the edit of the text block
            fix = torch.matmul(delta, v_txt[idx].float())  # (N', heads, HW, d)
            # in place: ``out`` is the kernel's own new tensor, and what the recorder was handed is a copy
            out[idx, :, img] = (out[idx, :, img].float() + fix).to(out.dtype)
        return out

    def _joint_rows(self) -> slice | None:
        """The rows a recorder of ``"joint"`` maps files from the edited block (None: no such recorder here; it
        takes what its capture hands it)."""
        recorder = getattr(getattr(self.capture, "sink", None), "__self__", None)
        rows = getattr(recorder, "_sel", None)
        if (
            getattr(recorder, "kind", None) == "joint"
            and not getattr(recorder, "concepts", None)
            and getattr(recorder, "relation", "image->text") == "image->text"  # the block the controls edit
        ):
            return rows
        return None

    def _record(
        self,
        attn: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor | None,
        probs: torch.Tensor | None,
        img: slice,
        txt: slice,
        scale: float,
        edited: bool,
    ) -> None:
        """Hand this call to the recorder capturing the layer (its gate has taken the call): the edited
        probabilities where its maps are ``"joint"`` maps (the block the controls edit), else what its capture
        hands it (unedited)."""
        capture = self.capture
        assert capture is not None
        recorder = getattr(capture.sink, "__self__", None)
        rows = self._joint_rows()
        if edited and rows is not None:
            if getattr(recorder, "keep_probs", False):
                recorder._flush()  # the kept probabilities are filed in call order: the waiting calls first
            recorder._sink(capture.name, probs[rows])  # (B', heads, HW, T): what made the image
            return
        o = out.transpose(1, 2).reshape(out.shape[0], -1, attn.heads * out.shape[-1]).to(query.dtype)
        if o.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
            o = o.clone()  # one head: a view of ``out``, which the edit then changes in place
        capture.sink(
            capture.name,
            attn,
            query[:, :, img],
            key[:, :, txt],
            None if lse is None else lse[:, :, img],
            o[:, img],
            o[:, txt],
            scale,
            key[:, :, img],
            value[:, :, img],
            q_txt=query[:, :, txt],  # the text rows, for text→image and text→text maps
            lse_txt=None if lse is None else lse[:, :, txt],
        )


class FluxControlledProcessor(JointControlledProcessor):
    """A Flux.1 / Flux.2 attention layer (double-stream: text and image from two projections; single-stream: one
    sequence) under control: the same edits and contract as :class:`JointControlledProcessor`, in Flux's layout.

    The joint sequence is text first, then image (``text_len()`` text tokens at the head of a single-stream
    block's sequence, from the denoiser's input); queries and keys carry the rotary embeddings (as
    :func:`flux_qkv` computes them), so the edited block is that of the very softmax the model takes, at SDPA's
    default scale. Flux has no CFG batch: every row is a conditional row (true CFG's negative call is its own call,
    which word edits leave alone). Calls with an attention mask and calls no control edits go to the capture or the
    original processor untouched: bitwise the plain output.
    """

    def __init__(
        self,
        name: str,
        original: Any,
        begin: Callable,
        apply: Callable,
        inject: Callable | None,
        text_len: Callable[[], int],
    ) -> None:
        super().__init__(name, original, begin, apply, inject)
        self.text_len = text_len

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        plain = self.capture if self.capture is not None else self.original
        parallel = type(self.original) is Flux2ParallelSelfAttnProcessor  # Flux.2's single-stream blocks
        if parallel:  # called as (attn, hidden_states, attention_mask, image_rotary_emb)
            mask, rope, context = encoder_hidden_states, attention_mask, None
        else:
            mask, rope, context = attention_mask, image_rotary_emb, encoder_hidden_states
        double = context is not None
        txt = context.shape[1] if double else self.text_len()
        hw = hidden_states.shape[1] - (0 if double else txt)
        call = None
        if mask is None and txt > 0 and hw > 0:
            call = self.begin(self.name, True, hw, hidden_states.shape[0])
        if call is None:
            if parallel:
                return plain(attn, hidden_states, mask, rope)
            return plain(attn, hidden_states, context, mask, rope)
        q, k, v, mlp = flux_qkv(attn, self.original, hidden_states, context, rope)  # (N, heads, T+HW, d)
        scale = q.shape[-1] ** -0.5  # SDPA's default scale, as native dispatch calls it
        out = self._attend(attn, call, q, k, v, slice(txt, None), slice(0, txt), scale)
        hidden = out.permute(0, 2, 1, 3).flatten(2, 3).to(q.dtype)  # (N, T+HW, heads*d)
        return flux_output(attn, self.original, hidden, txt, double, mlp)


def _native_backend(processor: Any) -> bool:
    """Whether diffusers' attention dispatch sends this Flux processor's calls to torch's SDPA ("native")."""
    backend = getattr(processor, "_attention_backend", None)
    if backend is None:
        backend = _AttentionBackendRegistry.get_active_backend()[0]
    return (
        str(getattr(backend, "value", backend)) == "native"
        and getattr(processor, "_parallel_config", None) is None
    )


class FluxCapturingProcessor(JointCapturingProcessor):
    """Flux's ``FluxAttnProcessor`` (and Flux.2's ``Flux2AttnProcessor`` / ``Flux2ParallelSelfAttnProcessor``, whose
    single-stream blocks fuse q, k, v and the MLP's input in one projection), step for step, for double-stream blocks (text and image from two projections,
    text first) and single-stream blocks (one sequence, text first, its length ``text_len()`` from the denoiser's
    input). Attention goes through the same SDPA kernel as diffusers' native dispatch (bitwise unchanged); the
    captured rows' image queries, text keys, log-sum-exp and outputs go to the sink. Calls with an attention mask,
    and calls the gate declines, go to the original processor."""

    def __init__(
        self,
        name: str,
        original: Any,
        sink: JointSink,
        gate: JointGate,
        need_lse: bool,
        text_len: Callable[[], int],
    ) -> None:
        super().__init__(name, original, sink, gate, need_lse)
        self.text_len = text_len

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        parallel = type(self.original) is Flux2ParallelSelfAttnProcessor  # Flux.2's single-stream blocks
        if parallel:  # called as (attn, hidden_states, attention_mask, image_rotary_emb)
            image_rotary_emb, attention_mask = attention_mask, encoder_hidden_states
            encoder_hidden_states = None
        double = encoder_hidden_states is not None
        txt = encoder_hidden_states.shape[1] if double else self.text_len()
        hw = hidden_states.shape[1] - (0 if double else txt)
        length = hidden_states.shape[1] + (txt if double else 0)  # the joint sequence
        if (
            (attention_mask is not None and not _per_query_mask(attention_mask, length))
            or txt <= 0
            or hw <= 0
            or not self.gate(self.name, hw)  # first: the calls it declines (true CFG's negative) cost nothing
        ):
            if parallel:
                return self.original(attn, hidden_states, attention_mask, image_rotary_emb)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        bias = None if attention_mask is None else key_bias(attention_mask, length)  # (N, L)
        q, k, v, mlp = flux_qkv(attn, self.original, hidden_states, encoder_hidden_states, image_rotary_emb)
        if bias is None:
            out, lse = sdpa_with_lse(q, k, v, self.need_lse)
        else:  # Chroma: the mask as native dispatch passes it (bitwise the same call); without the kernel's
            # normaliser the recorder works it out later, batched, from the image keys and the mask's bias
            out, lse = sdpa_with_lse(q, k, v, self.need_lse, attention_mask)  # (N, heads, L, d), the CPU
            # flash kernel's log-sum-exp over the kept keys where SDPA picks it, else None
        hidden_states = out.permute(0, 2, 1, 3).flatten(2, 3)  # (N, L, heads*d)
        hidden_states = hidden_states.to(q.dtype)
        self.sink(
            self.name,
            attn,
            q[:, :, txt:],
            k[:, :, :txt],
            None if lse is None else lse[:, :, txt:],
            hidden_states[:, txt:],
            hidden_states[:, :txt],
            q.shape[-1] ** -0.5,  # SDPA's default scale, as native dispatch calls it
            k[:, :, txt:],
            v[:, :, txt:],
            **({} if bias is None else {"key_bias": bias[:, :txt], "image_key_bias": bias[:, txt:]}),
            q_txt=q[:, :, :txt],  # the text rows, for text→image and text→text maps
            lse_txt=None if lse is None or bias is not None else lse[:, :, :txt],  # masked: worked out there
            text_mask=attention_mask,  # text→image / text→text read the text queries' rows of it
        )
        return flux_output(attn, self.original, hidden_states, txt, double, mlp)


def query_bias(mask: torch.Tensor, rows: int) -> torch.Tensor:
    """What a (N, 1, L, L) attention mask adds to each of the first ``rows`` queries' scores on every key,
    (N, rows, L) float32 (bool: −inf where masked)."""
    part = mask[:, 0, :rows, :]  # (N, rows, L)
    if part.dtype == torch.bool:
        return torch.zeros(part.shape, dtype=torch.float32, device=part.device).masked_fill_(
            ~part, float("-inf")
        )
    return part.float()


def _per_query_mask(mask: torch.Tensor, length: int) -> bool:
    """Whether ``mask`` is the (N, 1, L, L) attention mask over the ``length``-token joint sequence that
    :func:`key_bias` reads."""
    return mask.ndim == 4 and mask.shape[-1] == length and mask.shape[-2] == length and mask.shape[1] == 1


def key_bias(mask: torch.Tensor, length: int) -> torch.Tensor | None:
    """What an attention mask (N, 1, L, L) — bool (False: masked) or float (added, as SDPA takes it) — adds to an
    image query's score on each of the L keys, (N, L) float32, read from the last query row (an image token's);
    None for a mask of another shape. Chroma's mask is the outer product of a per-token mask whose image part is
    1, so every image query's row is that one."""
    if not _per_query_mask(mask, length):
        return None
    row = mask[:, 0, -1, :]  # (N, L): the last query is an image token
    if row.dtype == torch.bool:
        return torch.zeros(row.shape, dtype=torch.float32, device=row.device).masked_fill_(
            ~row, float("-inf")
        )
    return row.float()


def flux_qkv(
    attn: Any,
    original: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None,
    image_rotary_emb: Any,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Queries, keys and values of a Flux.1 / Flux.2 attention call as ``original`` (``FluxAttnProcessor``,
    ``Flux2AttnProcessor`` or ``Flux2ParallelSelfAttnProcessor``) computes them, text tokens first, rotary
    embeddings applied: each (N, heads, T+HW, d), as native dispatch hands them to SDPA; and the MLP's input of
    Flux.2's fused single-stream projection (else None)."""
    parallel = type(original) is Flux2ParallelSelfAttnProcessor
    mlp = None
    if parallel:
        # one fused projection: q, k, v and the MLP's input (split as Flux2ParallelSelfAttnProcessor)
        fused = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim, mlp_dim = 3 * attn.inner_dim, attn.mlp_hidden_dim * attn.mlp_mult_factor
        local = fused.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(fused, [local, fused.shape[-1] - local], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        enc_q = enc_k = enc_v = None
    else:
        projections = _flux2_projections if type(original) is Flux2AttnProcessor else _flux_projections
        query, key, value, enc_q, enc_k, enc_v = projections(attn, hidden_states, encoder_hidden_states)
    query = query.unflatten(-1, (-1, attn.head_dim))  # (N, L, heads, d)
    key = key.unflatten(-1, (-1, attn.head_dim))
    value = value.unflatten(-1, (-1, attn.head_dim))
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        enc_q = enc_q.unflatten(-1, (-1, attn.head_dim))  # (N, T, heads, d)
        enc_k = enc_k.unflatten(-1, (-1, attn.head_dim))
        enc_v = enc_v.unflatten(-1, (-1, attn.head_dim))
        enc_q = attn.norm_added_q(enc_q)
        enc_k = attn.norm_added_k(enc_k)
        query = torch.cat([enc_q, query], dim=1)  # (N, T+HW, heads, d): text first
        key = torch.cat([enc_k, key], dim=1)
        value = torch.cat([enc_v, value], dim=1)
    if image_rotary_emb is not None:
        query = _apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = _apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # (N, heads, L, d): as native dispatch
    return q, k, v, mlp


def flux_output(
    attn: Any, original: Any, hidden_states: torch.Tensor, txt: int, double: bool, mlp: torch.Tensor | None
) -> Any:
    """A Flux.1 / Flux.2 attention call's result from its attention output (N, T+HW, C), text first, as
    ``original`` returns it: double-stream blocks (image (N, HW, C'), text (N, T, C')) projected; single-stream
    blocks the whole sequence (Flux.2's fused block: with its MLP branch, through ``to_out``)."""
    flux2 = type(original) is Flux2AttnProcessor
    if type(original) is Flux2ParallelSelfAttnProcessor:
        return attn.to_out(torch.cat([hidden_states, attn.mlp_act_fn(mlp)], dim=-1))
    if double:
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [txt, hidden_states.shape[1] - txt], dim=1
        )
        if flux2:  # Flux2AttnProcessor's own order, no copies
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
            return hidden_states, encoder_hidden_states
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states
    if flux2:
        return attn.to_out[1](attn.to_out[0](hidden_states))
    return hidden_states


def _z_layer(name: str) -> bool:
    """Whether a module of a Z-Image transformer is a main layer's attention (``layers.N.attention``)."""
    parts = name.split(".")
    return len(parts) == 3 and parts[0] == "layers" and parts[2] == "attention"


def mask_bias(mask: torch.Tensor) -> torch.Tensor:
    """A boolean key mask (N, 1, 1, L) as an additive bias (N, L) float32 (0 kept, −inf masked)."""
    return torch.zeros(mask.shape[0], mask.shape[-1], device=mask.device).masked_fill_(
        ~mask[:, 0, 0], float("-inf")
    )


def masked_lse(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, rows: slice
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a boolean key mask (N, 1, 1, L): the log-sum-exp (N, heads, R) of the queries ``rows`` over the kept keys,
    at SDPA's default scale, and the mask as an additive bias (N, L) float32 (0 kept, −inf masked)."""
    bias = torch.zeros(mask.shape[0], mask.shape[-1], device=q.device).masked_fill_(
        ~mask[:, 0, 0], float("-inf")
    )
    scores = torch.matmul(q[:, :, rows].float(), k.float().transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    return scores.add_(bias[:, None, None, :]).logsumexp(-1), bias  # (N, heads, R), (N, L)


class QwenCapturingProcessor(JointCapturingProcessor):
    """Qwen-Image's ``QwenDoubleStreamAttnProcessor2_0``, step for step: text and image from two projections, text
    first, Qwen's complex rotary embedding, and the joint padding mask it builds from ``encoder_hidden_states_mask``.
    Attention goes through the same SDPA call as native dispatch (bitwise unchanged); the captured rows' image
    queries, text keys, log-sum-exp (over the kept keys where masked) and outputs go to the sink."""

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        txt, hw = encoder_hidden_states.shape[1], hidden_states.shape[1]
        if attention_mask is not None or not self.gate(self.name, hw):
            return self.original(
                attn,
                hidden_states,
                encoder_hidden_states,
                encoder_hidden_states_mask,
                attention_mask,
                image_rotary_emb,
            )
        d = attn.inner_dim // attn.heads
        img = [
            f(hidden_states).unflatten(-1, (-1, d)) for f in (attn.to_q, attn.to_k, attn.to_v)
        ]  # (N, HW, h, d)
        tx = [
            f(encoder_hidden_states).unflatten(-1, (-1, d))
            for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        ]
        for x, norms in ((img, (attn.norm_q, attn.norm_k)), (tx, (attn.norm_added_q, attn.norm_added_k))):
            x[:2] = [x[i] if n is None else n(x[i]) for i, n in enumerate(norms)]
        if image_rotary_emb is not None:
            img[:2] = [_qwen_rope(x, image_rotary_emb[0], use_real=False) for x in img[:2]]
            tx[:2] = [_qwen_rope(x, image_rotary_emb[1], use_real=False) for x in tx[:2]]
        q, k, v = (
            torch.cat([t, i], 1).permute(0, 2, 1, 3) for t, i in zip(tx, img, strict=True)
        )  # (N, h, T+HW, d)
        bias = None
        if encoder_hidden_states_mask is None:
            out, lse = sdpa_with_lse(q, k, v, self.need_lse)
        else:  # the processor's own joint mask (N, 1, 1, T+HW), as native dispatch passes it
            keep = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            mask = torch.cat([encoder_hidden_states_mask, keep], 1)[:, None, None, :]
            out, lse = sdpa_with_lse(q, k, v, self.need_lse, mask)  # lse over the kept keys, where given
            if lse is None:
                lse, bias = masked_lse(q, k, mask, slice(txt, None))  # (N, h, HW): the image rows
            else:
                lse, bias = lse[:, :, txt:], mask_bias(mask)  # (N, h, HW), (N, T+HW)
        joint = out.permute(0, 2, 1, 3).flatten(2, 3).to(q.dtype)  # (N, T+HW, h·d)
        self.sink(
            self.name,
            attn,
            q[:, :, txt:],
            k[:, :, :txt],
            lse if bias is not None else (None if lse is None else lse[:, :, txt:]),
            joint[:, txt:],
            joint[:, :txt],
            d**-0.5,
            k[:, :, txt:],
            v[:, :, txt:],
            **({} if bias is None else {"key_bias": bias[:, :txt]}),
        )
        image = attn.to_out[0](joint[:, txt:].contiguous())
        if len(attn.to_out) > 1:
            image = attn.to_out[1](image)
        return image, attn.to_add_out(joint[:, :txt].contiguous())


class ZImageCapturingProcessor(FluxCapturingProcessor):
    """Z-Image's ``ZSingleStreamAttnProcessor`` in its main layers, step for step. Each row's sequence is its image
    tokens, padded to a multiple of 32, then its caption's tokens (``text_len()``: the longest row's count), padded
    likewise, then the batch's padding (masked). The real image tokens are counted once per sequence shape from
    the rotary table (padding sits at position (0, 0, 0), whose rotation is exactly 1). Attention goes through the
    same SDPA call as native dispatch (bitwise unchanged); the captured rows' image queries, caption keys,
    log-sum-exp and outputs go to the sink (the image and caption padding are keys like any other)."""

    _counts: dict[tuple[int, int], int]

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        freqs_cis: torch.Tensor | None = None,
    ) -> Any:
        txt = self.text_len()
        x_len = hidden_states.shape[1] - -(-txt // _Z_MULTIPLE) * _Z_MULTIPLE  # the padded image part
        hw = self._image_tokens(freqs_cis, x_len) if txt > 0 and x_len > 0 else 0
        if hw <= 0 or not self.gate(self.name, hw):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, freqs_cis)
        qkv = [f(hidden_states).unflatten(-1, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v)]
        qkv[:2] = [x if n is None else n(x) for x, n in zip(qkv[:2], (attn.norm_q, attn.norm_k), strict=True)]
        if freqs_cis is not None:  # the processor's own rotation: complex pairs, float32, back to the dtype
            rot = freqs_cis.unsqueeze(2)  # (N, L, 1, d/2)
            qkv[:2] = [
                torch.view_as_real(torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * rot)
                .flatten(3)
                .type_as(x)
                for x in qkv[:2]
            ]
        q, k, v = (x.permute(0, 2, 1, 3) for x in qkv)  # (N, heads, L, d): as native dispatch
        text = slice(x_len, x_len + txt)
        bias = None
        if attention_mask is None:
            out, lse = sdpa_with_lse(q, k, v, self.need_lse)
            lse = None if lse is None else lse[:, :, :hw]
        else:
            mask = attention_mask[:, None, None, :] if attention_mask.ndim == 2 else attention_mask
            out, lse = sdpa_with_lse(q, k, v, self.need_lse, mask)  # lse over the kept keys, where given
            if lse is None:
                lse, bias = masked_lse(q, k, mask, slice(0, hw))
            else:
                lse, bias = lse[:, :, :hw], mask_bias(mask)
        others = torch.cat([k[:, :, :x_len], k[:, :, text.stop :]], 2) if lse is None else k[:, :, :hw]
        hidden = out.permute(0, 2, 1, 3).flatten(2, 3).to(q.dtype)  # (N, L, heads·d)
        self.sink(
            self.name,
            attn,
            q[:, :, :hw],
            k[:, :, text],
            lse,
            hidden[:, :hw],
            hidden[:, text],
            q.shape[-1] ** -0.5,
            others,
            v[:, :, :hw],
            **({} if bias is None else {"key_bias": bias[:, text]}),
        )
        output = attn.to_out[0](hidden)
        return attn.to_out[1](output) if len(attn.to_out) > 1 else output

    def _image_tokens(self, freqs: torch.Tensor | None, x_len: int) -> int:
        """Real image tokens among the first ``x_len`` (one host read per sequence shape and layer)."""
        if freqs is None:
            return 0
        counts = self.__dict__.setdefault("_counts", {})
        key = (int(freqs.shape[1]), x_len)
        if key not in counts:
            counts[key] = int((freqs[0, :x_len] != 1).any(-1).sum())
        return counts[key]


#: Original processors each capturing processor reproduces exactly, by layout (Flux: with the native backend).
REPRODUCIBLE_JOINT: dict[str, tuple[type, ...]] = {
    "image-text": (JointAttnProcessor2_0,),
    "text-image": (FluxAttnProcessor, Flux2AttnProcessor),
    "single": (FluxAttnProcessor, Flux2ParallelSelfAttnProcessor),
    "qwen": (QwenDoubleStreamAttnProcessor2_0,),
    "unified": (ZSingleStreamAttnProcessor,),
}
CAPTURING_JOINT: dict[str, type] = {
    "image-text": JointCapturingProcessor,
    "text-image": FluxCapturingProcessor,
    "single": FluxCapturingProcessor,
    "qwen": QwenCapturingProcessor,
    "unified": ZImageCapturingProcessor,
}


def reproducible(layout: str, processor: Any) -> bool:
    """Whether the capturing processor of ``layout`` reproduces ``processor`` exactly."""
    if isinstance(processor, (JointControlledProcessor, JointCapturingProcessor)):  # the processor it wraps
        processor = processor.original
    if type(processor) not in REPRODUCIBLE_JOINT.get(layout, ()):
        return False
    return layout == "image-text" or _native_backend(processor)
