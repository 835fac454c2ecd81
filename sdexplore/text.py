"""Text conditioning: encode a prompt the way the pipeline does, inspect its tokens, compare two prompts."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .errors import InterpolationError, InvalidArgumentError, UnsupportedPipelineError
from .families import detect_family, vae_scale_factor
from .record.tokens import resolve_max_sequence_length, sequence_tokens
from .results.tokens import TEXT, Segment, TokenList

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
    pipeline's device and dtype. SD 1.x/2.x fill the first two fields; SDXL fills all of them; SD3 and Flux fill
    the embeddings (SD3: CLIP's 77 positions then T5's along the sequence; Flux: T5's) and the pooled CLIP vector
    (Flux has a negative only when one was given).
    """

    family: str  # "sd1", "sd2", "sdxl", "sd3", "flux"
    prompt: str | None  # the text, None for an interpolated or computed embedding
    negative_prompt: str | None
    prompt_embeds: torch.Tensor  # (1, tokens, D): SDXL concatenates both encoders' hidden states
    negative_prompt_embeds: (
        torch.Tensor | None
    )  # (1, tokens, D): "" or the negative (SDXL: zeros; Flux: None)
    pooled_prompt_embeds: torch.Tensor | None = None  # (1, P): SDXL's pooled text embedding
    negative_pooled_prompt_embeds: torch.Tensor | None = None  # (1, P)
    add_time_ids: torch.Tensor | None = (
        None  # (1, 6): SDXL's original size, crop, target size (for reference)
    )

    def pipe_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``pipe(...)``: the embeddings (time ids are recomputed by the pipeline)."""
        kw = {"prompt_embeds": self.prompt_embeds}
        if self.negative_prompt_embeds is not None:  # Flux without a negative prompt has none
            kw["negative_prompt_embeds"] = self.negative_prompt_embeds
        if self.pooled_prompt_embeds is not None:
            kw["pooled_prompt_embeds"] = self.pooled_prompt_embeds
        if self.negative_pooled_prompt_embeds is not None:
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
    """The pipeline's default ``(height, width)`` in pixels, as its ``__call__`` computes it.

    ``pipe.default_sample_size`` (SDXL, SD3, Flux) or the denoiser's ``sample_size`` (SD 1.x/2.x), in latent
    cells, × the VAE scale factor.
    """
    cells = getattr(pipe, "default_sample_size", None)
    if cells is None:
        cells = detect_family(pipe).get_denoiser(pipe).config.sample_size
    side = int(cells) * vae_scale_factor(pipe)
    return side, side


def encode_prompt(
    pipe: Any,
    prompt: str,
    negative_prompt: str | None = None,
    *,
    height: int | None = None,
    width: int | None = None,
    clip_skip: int | None = None,
    max_sequence_length: int | None = None,
) -> EncodedPrompt:
    """Encode ``prompt`` (and its negative) exactly as ``pipe(prompt, negative_prompt=...)`` would.

    Calls the pipeline's own ``encode_prompt`` (so LoRA scales, textual inversion and SDXL's zeroed empty
    negative behave as in a plain call); the negative half is always computed so the result serves any
    ``guidance_scale`` (Flux, whose "true CFG" runs only with a negative prompt: only when one is given).
    ``height``/``width`` only set SDXL's reference ``add_time_ids``. ``max_sequence_length`` (SD3, Flux) is
    T5's length, as in a call (default the pipeline's: SD3 256, Flux 512).
    """
    fam = detect_family(pipe)
    if not isinstance(prompt, str):
        raise InvalidArgumentError(
            f"encode_prompt takes one prompt string, got {type(prompt).__name__}; call it per prompt."
        )
    max_sequence_length = resolve_max_sequence_length(pipe, max_sequence_length)
    with torch.no_grad():
        enc = fam.encode_prompt(
            pipe,
            prompt,
            device=pipe._execution_device,
            negative_prompt=negative_prompt,
            clip_skip=clip_skip,
            max_sequence_length=max_sequence_length,
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
    """One prompt as the denoiser sees it: every position of its text sequence, padding included.

    SD 1.x/2.x/SDXL: CLIP's 77 positions. SD3: CLIP's 77, then T5's ``max_sequence_length`` (the joint sequence,
    in that order). Flux: T5's alone. Flux.2 [klein]: Qwen3's, of the chat-templated prompt. ``labels`` say which tokenizer labelled which positions (its segments);
    :meth:`side_by_side` lines the CLIP and T5 tokens of each word up.
    """

    prompt: str
    family: str
    tokens: list[str]  # (tokens,) raw pieces: "<|startoftext|>", "circle</w>", "▁cir", "</s>", padding
    ids: list[int]  # (tokens,) ids, from the tokenizer that labels each position
    kinds: list[str]  # (tokens,) "bos", "word", "eos" or "pad"
    embeds: torch.Tensor  # (tokens, D) the hidden states the denoiser attends to (float32, CPU)
    norms: torch.Tensor  # (tokens,) L2 norm of each position's embedding
    encoder_norms: (
        torch.Tensor
    )  # (encoders, tokens) per text encoder (SDXL, SD3: CLIP halves; 0 where absent)
    pooled: torch.Tensor | None  # (P,) pooled text embedding where the family has one
    labels: TokenList | None = None  # the positions' labels with their segments ("clip", "t5") and words
    encoders: tuple[str, ...] = ()  # pipeline attribute of the text encoder of each encoder_norms row

    @property
    def n_words(self) -> int:
        """Number of word tokens between BOS and EOS (of every segment: SD3 counts CLIP's and T5's)."""
        return self.kinds.count("word")

    def _parts(self) -> list[Segment]:
        return self.labels.parts() if self.labels is not None else [Segment("clip", 0, len(self.ids))]

    def _part_of(self) -> list[str]:
        names = [""] * len(self.ids)
        for seg in self._parts():
            names[seg.start : seg.stop] = [seg.name] * (seg.stop - seg.start)
        return names

    def table(self, *, padding: bool = False) -> str:
        """A plain-text table: position, (part,) kind, id, token, norm (padding rows only if asked).

        The part column ("clip", "t5") appears where the sequence has several (SD3).
        """
        multi = len(self._parts()) > 1
        part = self._part_of()
        head = f"{'pos':>3}  " + (f"{'part':<4}  " if multi else "")
        rows = [head + f"{'kind':<4}  {'id':>5}  {'token':<20}  norm"]
        for i, (tok, id_, kind) in enumerate(zip(self.tokens, self.ids, self.kinds, strict=True)):
            if kind == "pad" and not padding:
                continue
            col = f"{part[i]:<4}  " if multi else ""
            rows.append(f"{i:>3}  {col}{kind:<4}  {id_:>5}  {tok:<20}  {self.norms[i].item():.3f}")
        n_pad = self.kinds.count("pad")
        if n_pad and not padding:
            rows.append(f"... {n_pad} padding positions (table(padding=True) shows them)")
        return "\n".join(rows)

    def side_by_side(self) -> str:
        """Each word of the prompt with its tokens in every part of the sequence, one column per part.

        On SD3: CLIP's BPE tokens and T5's sentencepiece pieces of the same word, with their positions
        (``80-81: cir·cle``); a word one part cut off (CLIP stops at 77) shows ``-`` there.
        """
        if self.labels is None:
            return self.table()
        parts = self._parts()
        columns = []
        for seg in parts:
            spans = self.labels.word_spans(seg.name)
            cells = [
                (
                    w,
                    f"{ps[0]}{'-' + str(ps[-1]) if len(ps) > 1 else ''}: "
                    + "·".join(seg.display(self.labels.pieces[p]) for p in ps),
                )
                for w, ps in spans
            ]
            columns.append(cells)
        n = max((len(c) for c in columns), default=0)
        width = [
            max([len(seg.name)] + [len(cell) for _, cell in col])
            for seg, col in zip(parts, columns, strict=True)
        ]
        rows = [
            f"{'word':<14}  " + "  ".join(f"{seg.name:<{w}}" for seg, w in zip(parts, width, strict=True))
        ]
        for i in range(n):
            word = next((col[i][0] for col in columns if i < len(col)), "")
            cells = [col[i][1] if i < len(col) else "-" for col in columns]
            rows.append(f"{word:<14}  " + "  ".join(f"{c:<{w}}" for c, w in zip(cells, width, strict=True)))
        for seg in parts:
            kinds = self.kinds[seg.start : seg.stop]
            special = [f"{k} {seg.start + j}" for j, k in enumerate(kinds) if k in ("bos", "eos")]
            rows.append(
                f"{seg.name}: positions {seg.start}-{seg.stop - 1}"
                + (f", {', '.join(special)}" if special else "")
                + f", {kinds.count('pad')} padding"
            )
        if self.labels.truncated:
            rows.append(f"cut off (no part had room): {' '.join(self.labels.truncated_words)!r}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        parts = ", ".join(f"{s.name} {s.start}-{s.stop - 1}" for s in self._parts())
        return (
            f"PromptInfo({self.prompt!r}, family={self.family!r}, positions={len(self.ids)} ({parts}), "
            f"words={self.n_words}, embeds={tuple(self.embeds.shape)})"
        )

    def _repr_html_(self) -> str:
        body = self.side_by_side() if len(self._parts()) > 1 else self.table()
        return f"<b>{html.escape(repr(self))}</b><pre>{html.escape(body)}</pre>"


def _encoder_norms(
    pipe: Any, fam: Any, embeds: torch.Tensor, parts: list[Segment]
) -> tuple[list[str], torch.Tensor]:
    """Rows of ``(encoders, tokens)`` norms: each text encoder's features over the positions it fills, 0 elsewhere.

    CLIP's part ("clip") splits into its encoders' feature blocks (SDXL, SD3: CLIP-L ‖ CLIP-G); every other part
    (SD3's and Flux's "t5", Flux.2's "qwen") is the family's last text encoder's.
    """
    names, rows = [], []
    clip = fam.clip_sequence if fam.clip_sequence is not None else fam.text_encoders
    for part in parts:
        if part.name == "clip" and clip:
            widths = [getattr(pipe, name).config.hidden_size for name in clip]
            block = embeds[part.start : part.stop, : sum(widths)]  # (77, D_clip): CLIP's features
            if sum(widths) == embeds.shape[-1] or fam.clip_sequence is not None:
                for name, piece in zip(clip, torch.split(block, widths, dim=-1), strict=True):
                    row = torch.zeros(embeds.shape[0])
                    row[part.start : part.stop] = piece.norm(dim=-1)
                    names.append(name)
                    rows.append(row)
            else:
                names.append(clip[0])
                rows.append(embeds.norm(dim=-1))
            continue
        row = torch.zeros(embeds.shape[0])
        row[part.start : part.stop] = embeds[part.start : part.stop].norm(dim=-1)
        names.append(fam.text_encoders[-1])
        rows.append(row)
    return names, torch.stack(rows)


def inspect_prompt(pipe: Any, prompt: str, *, max_sequence_length: int | None = None) -> PromptInfo:
    """Tokens (BOS, words, EOS, padding), ids, per-token embedding norms and the pooled embedding of ``prompt``.

    Every position of the text sequence the denoiser attends to is listed: on SD3 CLIP's 77 then T5's
    ``max_sequence_length`` (default the pipeline's, 256), on Flux T5's (default 512), on Flux.2 [klein] Qwen3's
    positions of the chat-templated prompt (default 512; the template's tokens are ``bos``/``eos``);
    ``side_by_side()`` shows each word's CLIP tokens beside its T5 pieces. ``Flux2Pipeline`` (Mistral-3 with a
    system prompt) is refused with UnsupportedPipelineError: its sequence is not labelled.
    """
    if not isinstance(prompt, str):
        raise InvalidArgumentError(
            f"inspect_prompt takes one prompt string, got {type(prompt).__name__}; call it per prompt."
        )
    fam = detect_family(pipe)
    labels = sequence_tokens(pipe, prompt, max_sequence_length=max_sequence_length)
    enc = encode_prompt(pipe, prompt, max_sequence_length=max_sequence_length)
    embeds = enc.prompt_embeds[0].float().cpu()  # (tokens, D): the whole sequence (SD3: CLIP ‖ T5 along it)
    if embeds.shape[0] != len(labels.ids):
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__}'s text sequence has {embeds.shape[0]} positions but its tokenizers label "
            f"{len(labels.ids)}: sdexplore does not know this pipeline's text layout."
        )
    names, encoder_norms = _encoder_norms(pipe, fam, embeds, labels.parts())
    pooled = enc.pooled_prompt_embeds[0].float().cpu() if enc.pooled_prompt_embeds is not None else None
    return PromptInfo(
        prompt=prompt,
        family=fam.name,
        tokens=list(labels.pieces),
        ids=list(labels.ids),
        kinds=["word" if k == TEXT else k for k in labels.kinds],
        embeds=embeds,
        norms=embeds.norm(dim=-1),
        encoder_norms=encoder_norms,  # (encoders, tokens)
        pooled=pooled,
        labels=labels,
        encoders=tuple(names),
    )


@dataclass
class PromptComparison:
    """Cosine similarity of two prompts' conditioning, position by position and pooled."""

    a: PromptInfo
    b: PromptInfo
    per_token: torch.Tensor  # (tokens,) cosine similarity at each position of the text sequence
    pooled: float | None  # cosine similarity of the pooled embeddings (SDXL, SD3, Flux), else None

    @property
    def mean_words(self) -> float:
        """Mean per-token cosine over positions that are words (or BOS/EOS) in either prompt, padding excluded."""
        keep = torch.tensor(
            [ka != "pad" or kb != "pad" for ka, kb in zip(self.a.kinds, self.b.kinds, strict=True)]
        )
        return float(self.per_token[keep].mean())

    def table(self) -> str:
        """A plain-text table of the non-padding positions: (part,) token in A, token in B, cosine."""
        multi = len(self.a._parts()) > 1
        part = self.a._part_of()
        rows = [f"{'pos':>3}  " + (f"{'part':<4}  " if multi else "") + f"{'A':<18}  {'B':<18}  cosine"]
        for i, (ta, tb) in enumerate(zip(self.a.tokens, self.b.tokens, strict=True)):
            if self.a.kinds[i] == "pad" and self.b.kinds[i] == "pad":
                continue
            col = f"{part[i]:<4}  " if multi else ""
            rows.append(f"{i:>3}  {col}{ta:<18}  {tb:<18}  {self.per_token[i].item():+.3f}")
        if self.pooled is not None:
            rows.append(f"pooled cosine: {self.pooled:+.3f}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        pooled = "" if self.pooled is None else f", pooled={self.pooled:+.3f}"
        return f"PromptComparison({self.a.prompt!r} vs {self.b.prompt!r}, mean_words={self.mean_words:+.3f}{pooled})"

    def _repr_html_(self) -> str:
        return f"<b>{html.escape(repr(self))}</b><pre>{html.escape(self.table())}</pre>"


def compare_prompts(pipe: Any, a: str, b: str, *, max_sequence_length: int | None = None) -> PromptComparison:
    """Compare two prompts: per-position cosine of the embeddings the denoiser sees, and of the pooled ones.

    On SD3 the positions are CLIP's 77 then T5's; on Flux T5's (``max_sequence_length`` as in a call).
    """
    ia = inspect_prompt(pipe, a, max_sequence_length=max_sequence_length)
    ib = inspect_prompt(pipe, b, max_sequence_length=max_sequence_length)
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
