"""Text conditioning: encode a prompt the way the pipeline does, inspect its tokens, compare two prompts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .errors import InterpolationError, InvalidArgumentError
from .families import detect_family, vae_scale_factor

_TENSOR_FIELDS = (
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "add_time_ids",
)


@dataclass
class EncodedPrompt:
    """The conditioning one prompt gives a pipeline (batch of 1), as the pipeline's own ``encode_prompt`` makes it.

    Pass :meth:`pipe_kwargs` to the pipeline instead of ``prompt=``/``negative_prompt=``. Tensors stay on the
    pipeline's device and dtype. SD 1.x/2.x fill the first two fields; SDXL fills all of them.
    """

    family: str  # "sd1", "sd2", "sdxl"
    prompt: str | None  # the text, None for an interpolated or computed embedding
    negative_prompt: str | None
    prompt_embeds: torch.Tensor  # (1, tokens, D): SDXL concatenates both encoders' hidden states
    negative_prompt_embeds: torch.Tensor  # (1, tokens, D): "" or the negative prompt (SDXL: zeros if none)
    pooled_prompt_embeds: torch.Tensor | None = None  # (1, P): SDXL's pooled text embedding
    negative_pooled_prompt_embeds: torch.Tensor | None = None  # (1, P)
    add_time_ids: torch.Tensor | None = (
        None  # (1, 6): SDXL's original size, crop, target size (for reference)
    )

    def pipe_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``pipe(...)``: the embeddings (time ids are recomputed by the pipeline)."""
        kw = {"prompt_embeds": self.prompt_embeds, "negative_prompt_embeds": self.negative_prompt_embeds}
        if self.pooled_prompt_embeds is not None:
            kw["pooled_prompt_embeds"] = self.pooled_prompt_embeds
            kw["negative_pooled_prompt_embeds"] = self.negative_pooled_prompt_embeds
        return kw

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor field that is set, by name."""
        return {k: getattr(self, k) for k in _TENSOR_FIELDS if getattr(self, k) is not None}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> EncodedPrompt:
        """A copy with every tensor moved (time ids keep their dtype)."""
        moved = {
            k: v.to(device=device, dtype=None if k == "add_time_ids" else dtype)
            for k, v in self.tensors().items()
        }
        return replace(self, **moved)

    def combine(self, others: Sequence[EncodedPrompt], fn: Any, *, text: str | None = None) -> EncodedPrompt:
        """Apply ``fn(self_tensor, *other_tensors)`` field by field (e.g. a lerp or an embedding direction)."""
        for o in others:
            if o.family != self.family:
                raise InterpolationError(
                    f"Cannot combine a {self.family} prompt with a {o.family} prompt: encode all with one pipeline."
                )
            if set(o.tensors()) != set(self.tensors()):
                raise InterpolationError("Cannot combine prompts encoded with different fields.")
        out = {
            k: fn(v, *[getattr(o, k) for o in others])
            for k, v in self.tensors().items()
            if k != "add_time_ids"
        }
        return replace(self, prompt=text, **out)


def default_size(pipe: Any) -> tuple[int, int]:
    """The pipeline's default ``(height, width)`` in pixels: the denoiser's sample size × VAE scale factor."""
    side = int(detect_family(pipe).get_denoiser(pipe).config.sample_size) * vae_scale_factor(pipe)
    return side, side


def encode_prompt(
    pipe: Any,
    prompt: str,
    negative_prompt: str | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    clip_skip: int | None = None,
) -> EncodedPrompt:
    """Encode ``prompt`` (and its negative) exactly as ``pipe(prompt, negative_prompt=...)`` would.

    Calls the pipeline's own ``encode_prompt`` (so LoRA scales, textual inversion and SDXL's zeroed empty
    negative behave as in a plain call); the negative half is always computed so the result serves any
    ``guidance_scale``. ``height``/``width`` only set SDXL's reference ``add_time_ids``.
    """
    fam = detect_family(pipe)
    if not isinstance(prompt, str):
        raise InvalidArgumentError(
            f"encode_prompt takes one prompt string, got {type(prompt).__name__}; call it per prompt."
        )
    with torch.no_grad():
        enc = fam.encode_prompt(
            pipe,
            prompt,
            device=pipe._execution_device,
            negative_prompt=negative_prompt,
            clip_skip=clip_skip,
        )
    if not fam.pooled_text_embeds:
        return EncodedPrompt(fam.name, prompt, negative_prompt, enc.embeds, enc.negative)
    if not fam.size_conditioning:
        return EncodedPrompt(
            fam.name, prompt, negative_prompt, enc.embeds, enc.negative, enc.pooled, enc.negative_pooled
        )
    h, w = (height, width) if height and width else default_size(pipe)
    time_ids = torch.tensor(
        [[h, w, 0, 0, h, w]], dtype=torch.float32
    )  # (1, 6): SDXL's size/crop conditioning
    return EncodedPrompt(
        fam.name, prompt, negative_prompt, enc.embeds, enc.negative, enc.pooled, enc.negative_pooled, time_ids
    )


def stack_prompts(prompts: Sequence[EncodedPrompt]) -> EncodedPrompt:
    """Concatenate batch-of-1 encodings into one batch along dim 0 (for a batched pipeline call)."""
    first = prompts[0]
    out = {k: torch.cat([getattr(p, k) for p in prompts]) for k in first.tensors()}
    return replace(first, prompt=None, negative_prompt=None, **out)


# ---------------------------------------------------------------- inspection


@dataclass
class PromptInfo:
    """One prompt seen by the text encoder(s): every position of the 77-token window, padding included."""

    prompt: str
    family: str
    tokens: list[str]  # (tokens,) decoded token strings, "<|startoftext|>", "<|endoftext|>", padding
    ids: list[int]  # (tokens,) ids from the first tokenizer
    kinds: list[str]  # (tokens,) "bos", "word", "eos" or "pad"
    embeds: torch.Tensor  # (tokens, D) the hidden states the UNet attends to (float32, CPU)
    norms: torch.Tensor  # (tokens,) L2 norm of each position's embedding
    encoder_norms: torch.Tensor  # (encoders, tokens) per text encoder (SDXL: both halves of D)
    pooled: torch.Tensor | None  # (P,) pooled text embedding where the family has one

    @property
    def n_words(self) -> int:
        """Number of word tokens between BOS and EOS."""
        return self.kinds.count("word")

    def table(self, *, padding: bool = False) -> str:
        """A plain-text table: position, kind, id, token, norm (padding rows only if asked)."""
        rows = [f"{'pos':>3}  {'kind':<4}  {'id':>5}  {'token':<20}  norm"]
        for i, (tok, id_, kind) in enumerate(zip(self.tokens, self.ids, self.kinds, strict=True)):
            if kind == "pad" and not padding:
                continue
            rows.append(f"{i:>3}  {kind:<4}  {id_:>5}  {tok:<20}  {self.norms[i].item():.3f}")
        n_pad = self.kinds.count("pad")
        if n_pad and not padding:
            rows.append(f"... {n_pad} padding positions (table(padding=True) shows them)")
        return "\n".join(rows)


def _kinds(ids: list[int], bos: int, eos: int) -> list[str]:
    kinds, seen_eos = [], False
    for i, id_ in enumerate(ids):
        if i == 0 and id_ == bos:
            kinds.append("bos")
        elif id_ == eos and not seen_eos:
            kinds.append("eos")
            seen_eos = True
        elif seen_eos:
            kinds.append("pad")
        else:
            kinds.append("word")
    return kinds


def inspect_prompt(pipe: Any, prompt: str) -> PromptInfo:
    """Tokens (BOS, words, EOS, padding), ids, per-token embedding norms and the pooled embedding of ``prompt``.

    The tokens are the CLIP tokenizer's; for SD3 the embeddings shown are the CLIP part of its joint sequence (the
    T5 tokens that follow it are not listed here).
    """
    fam = detect_family(pipe)
    tok = getattr(pipe, fam.tokenizers[0])
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    tokens = tok.convert_ids_to_tokens(ids)
    enc = encode_prompt(pipe, prompt)
    clip = fam.clip_sequence or fam.text_encoders
    widths = [getattr(pipe, name).config.hidden_size for name in clip]
    # (tokens, D): SD3's joint sequence holds CLIP's 77 positions (zero-padded to T5's width), then T5's tokens:
    # the CLIP part is what these tokens label
    embeds = enc.prompt_embeds[0, : len(ids)].float().cpu()
    if fam.clip_sequence is not None:
        embeds = embeds[:, : sum(widths)]
    parts = torch.split(embeds, widths, dim=-1) if sum(widths) == embeds.shape[-1] else (embeds,)
    pooled = enc.pooled_prompt_embeds[0].float().cpu() if enc.pooled_prompt_embeds is not None else None
    return PromptInfo(
        prompt=prompt,
        family=fam.name,
        tokens=list(tokens),
        ids=list(ids),
        kinds=_kinds(list(ids), tok.bos_token_id, tok.eos_token_id),
        embeds=embeds,
        norms=embeds.norm(dim=-1),
        encoder_norms=torch.stack([p.norm(dim=-1) for p in parts]),  # (encoders, tokens)
        pooled=pooled,
    )


@dataclass
class PromptComparison:
    """Cosine similarity of two prompts' conditioning, position by position and pooled."""

    a: PromptInfo
    b: PromptInfo
    per_token: torch.Tensor  # (tokens,) cosine similarity at each of the 77 positions
    pooled: float | None  # cosine similarity of the pooled embeddings (SDXL), else None

    @property
    def mean_words(self) -> float:
        """Mean per-token cosine over positions that are words (or BOS/EOS) in either prompt, padding excluded."""
        keep = torch.tensor(
            [ka != "pad" or kb != "pad" for ka, kb in zip(self.a.kinds, self.b.kinds, strict=True)]
        )
        return float(self.per_token[keep].mean())

    def table(self) -> str:
        """A plain-text table of the non-padding positions: token in A, token in B, cosine."""
        rows = [f"{'pos':>3}  {'A':<18}  {'B':<18}  cosine"]
        for i, (ta, tb) in enumerate(zip(self.a.tokens, self.b.tokens, strict=True)):
            if self.a.kinds[i] == "pad" and self.b.kinds[i] == "pad":
                continue
            rows.append(f"{i:>3}  {ta:<18}  {tb:<18}  {self.per_token[i].item():+.3f}")
        if self.pooled is not None:
            rows.append(f"pooled cosine: {self.pooled:+.3f}")
        return "\n".join(rows)


def compare_prompts(pipe: Any, a: str, b: str) -> PromptComparison:
    """Compare two prompts: per-position cosine of the embeddings the UNet sees, and of the pooled ones."""
    ia, ib = inspect_prompt(pipe, a), inspect_prompt(pipe, b)
    per_token = torch.nn.functional.cosine_similarity(ia.embeds, ib.embeds, dim=-1)  # (tokens,)
    pooled = None
    if ia.pooled is not None and ib.pooled is not None:
        pooled = float(torch.nn.functional.cosine_similarity(ia.pooled, ib.pooled, dim=0))
    return PromptComparison(ia, ib, per_token, pooled)


__all__ = [
    "EncodedPrompt",
    "PromptComparison",
    "PromptInfo",
    "compare_prompts",
    "default_size",
    "encode_prompt",
    "inspect_prompt",
    "stack_prompts",
]
