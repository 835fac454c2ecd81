"""Label a prompt's key positions with a tokenizer, for attention maps (TokenList itself lives in results).

:func:`tokenize_prompt` labels one tokenizer's window; :func:`sequence_tokens` labels the whole text sequence a
pipeline's denoiser attends to (SD3: CLIP's 77 positions then T5's; Flux: T5's; Flux.2 [klein]: Qwen3's chat-templated
prompt; the UNet families: CLIP's 77).
"""

from __future__ import annotations

import inspect
import weakref
from collections import OrderedDict
from typing import Any

from ..errors import InvalidArgumentError, UnsupportedPipelineError
from ..families import detect_family
from ..results.tokens import BOS, EOS, PAD, TEXT, WORD_END, WORD_START, Segment, TokenList

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "TEXT",
    "TokenList",
    "chat_tokens",
    "default_max_sequence_length",
    "resolve_max_sequence_length",
    "sequence_tokens",
    "tokenize_prompt",
    "unlabelled",
    "word_marker",
]


_CACHE: OrderedDict[tuple[int, str, int], tuple[weakref.ref, tuple]] = OrderedDict()
_CACHE_SIZE = 256  # prompts remembered (a walk or a sweep labels the same few prompts run after run)
_MAX_T5_LENGTH = 512  # diffusers' SD3 and Flux pipelines refuse a larger max_sequence_length


def word_marker(tokenizer: Any) -> tuple[str, str]:
    """``(marker, where)`` of a tokenizer's word marker, read from the tokenizer's own model, not from text.

    CLIP's BPE model appends an end-of-word suffix (``("</w>", "end")``); a sentencepiece tokenizer (T5's Unigram)
    has a Metaspace pre-tokenizer or decoder that starts every word with ``"▁"`` (``("▁", "start")``). A tokenizer
    with neither (no backend, or another scheme) gets ``("", "end")``: every piece is a word of its own.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (pure Python) tokenizer
        if getattr(tokenizer, "sp_model", None) is not None:
            return "▁", WORD_START
        return ("</w>", WORD_END) if hasattr(tokenizer, "bpe_ranks") else ("", WORD_END)
    suffix = getattr(backend.model, "end_of_word_suffix", None)
    if suffix:
        return str(suffix), WORD_END
    for part in (backend.decoder, backend.pre_tokenizer):
        for sub in _members(part):
            replacement = getattr(sub, "replacement", None)
            if type(sub).__name__ == "Metaspace" and replacement:
                return str(replacement), WORD_START
    return "", WORD_END


def _members(part: Any) -> list[Any]:
    """The components of a tokenizers pre-tokenizer/decoder: itself, or those of a Sequence."""
    if part is None:
        return []
    if type(part).__name__ != "Sequence":
        return [part]
    out, i = [], 0
    while True:
        try:
            out.append(part[i])
        except (IndexError, TypeError, AttributeError):
            return out
        i += 1


def tokenize_prompt(
    tokenizer: Any, prompt: str, length: int | None = None, *, name: str = "clip"
) -> TokenList:
    """Label the key positions of ``prompt`` as ``tokenizer`` pads and truncates it for its text encoder.

    ``length`` defaults to ``tokenizer.model_max_length`` (77 for CLIP). The positions are exactly the ids the
    pipeline feeds the encoder (``padding="max_length", truncation=True``): CLIP's BOS, tokens, EOS, padding;
    T5's tokens, ``</s>``, ``<pad>``. Tokens beyond ``length`` are reported in ``truncated`` rather than dropped
    silently. The list is one segment called ``name``, with the tokenizer's word marker (:func:`word_marker`).
    Labels are remembered per tokenizer and prompt (each call returns a TokenList of its own).
    """
    length = int(length or tokenizer.model_max_length)
    key = (id(tokenizer), prompt, length)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is tokenizer:
        _CACHE.move_to_end(key)
        labels = hit[1]
    else:
        labels = _tokenize(tokenizer, prompt, length)
        try:
            _CACHE[key] = (weakref.ref(tokenizer), labels)
        except TypeError:  # a tokenizer that cannot be weakly referenced is simply not remembered
            pass
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    ids, pieces, kinds, truncated, (marker, where) = labels
    return TokenList(
        ids=list(ids),
        pieces=list(pieces),
        kinds=list(kinds),
        truncated=list(truncated),
        prompt=prompt,
        segments=[Segment(name, 0, len(ids), marker, where)],
    )


def _tokenize(tokenizer: Any, prompt: str, length: int) -> tuple:
    enc = tokenizer(
        prompt,
        padding="max_length",
        max_length=length,
        truncation=True,
        return_attention_mask=True,
        return_special_tokens_mask=True,
    )
    ids = [int(i) for i in enc.input_ids]
    kinds = []
    for i, (id_, mask, special) in enumerate(
        zip(ids, enc.attention_mask, enc.special_tokens_mask, strict=True)
    ):
        if not mask:
            kinds.append(PAD)  # CLIP (SD 1.x) pads with its EOS id: the attention mask tells them apart
        elif special and i == 0 and id_ == tokenizer.bos_token_id:
            kinds.append(BOS)
        elif special and id_ == tokenizer.eos_token_id:
            kinds.append(EOS)
        else:
            kinds.append(TEXT)
    full = tokenizer(prompt, padding=False, truncation=False, add_special_tokens=False).input_ids
    cut = list(full[kinds.count(TEXT) :])  # truncation keeps a prefix of the prompt's tokens
    return (
        tuple(ids),
        tuple(tokenizer.convert_ids_to_tokens(ids)),
        tuple(kinds),
        tuple(tokenizer.convert_ids_to_tokens(cut)),
        word_marker(tokenizer),
    )


def unlabelled(length: int) -> TokenList:
    """Placeholder labels when the prompt text was not seen (e.g. ``prompt_embeds`` passed directly)."""
    return TokenList(ids=[-1] * length, pieces=[f"<{i}>" for i in range(length)], kinds=[PAD] * length)


def default_max_sequence_length(pipe: Any) -> int | None:
    """The T5 length a plain call of ``pipe`` uses (its ``__call__`` default: SD3 256, Flux 512); None without T5."""
    if "max_sequence_length" not in detect_family(pipe).encode_options:
        return None
    param = inspect.signature(pipe.__call__).parameters.get("max_sequence_length")
    if param is None or param.default is inspect.Parameter.empty or param.default is None:
        return _MAX_T5_LENGTH
    return int(param.default)


def resolve_max_sequence_length(pipe: Any, value: Any) -> int | None:
    """``value`` checked for ``pipe`` (1 to 512 on a T5 family), or the pipeline's default where None.

    None for a family without T5 (where any other value is an InvalidArgumentError saying so).
    """
    default = default_max_sequence_length(pipe)
    if default is None:
        if value is not None:
            raise InvalidArgumentError(
                f"max_sequence_length applies to T5 families (SD3, Flux); {detect_family(pipe).label} has no T5 "
                "encoder: leave it None."
            )
        return None
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgumentError(
            f"max_sequence_length={value!r} is not an int: pass 1 to {_MAX_T5_LENGTH}."
        )
    if not 1 <= value <= _MAX_T5_LENGTH:
        raise InvalidArgumentError(
            f"max_sequence_length={value} is out of range: the pipelines accept 1 to {_MAX_T5_LENGTH}."
        )
    return int(value)


def sequence_tokens(pipe: Any, prompt: str, *, max_sequence_length: int | None = None) -> TokenList:
    """Labels of every position of the text sequence ``pipe``'s denoiser attends to, for ``prompt``.

    - SD 1.x / 2.x / SDXL: CLIP's 77 positions (``pipe.tokenizer``; SDXL's two encoders share the positions).
    - SD3: CLIP's 77 (CLIP-L and CLIP-G side by side in the features, labelled by ``pipe.tokenizer``), then T5's
      ``max_sequence_length`` positions (``pipe.tokenizer_3``), exactly as ``encode_prompt`` concatenates them
      along the sequence. Without T5 the pipeline puts zeros there: those positions are padding, piece ``<zero>``.
    - Flux: T5's ``max_sequence_length`` positions (CLIP gives only the pooled vector).
    - Flux.2 [klein]: Qwen3's ``max_sequence_length`` positions of the chat-templated prompt (:func:`chat_tokens`).

    ``max_sequence_length`` defaults to the pipeline's own (SD3 256, Flux 512); pass the call's value. The
    result's ``segments`` give each part's name ("clip", "t5") and offsets; ``positions(word)`` finds a word in
    every part (``segment="t5"`` keeps one). ``truncated`` lists what no part had room for.
    """
    if not isinstance(prompt, str):
        raise InvalidArgumentError(
            f"prompt={prompt!r} ({type(prompt).__name__}) is not a prompt string: label one prompt at a time."
        )
    fam = detect_family(pipe)
    max_sequence_length = resolve_max_sequence_length(pipe, max_sequence_length)
    if max_sequence_length is None:
        return tokenize_prompt(getattr(pipe, fam.tokenizers[0]), prompt)
    if fam.name == "flux2":
        if type(pipe).__name__ != "Flux2KleinPipeline":  # Flux2Pipeline: Mistral-3 with a system prompt
            raise UnsupportedPipelineError(
                f"sdexplore labels the text sequence of Flux2KleinPipeline only, not {type(pipe).__name__}'s "
                "system-prompted Mistral-3 input; pass prompt_embeds and read maps by position."
            )
        return chat_tokens(getattr(pipe, fam.tokenizers[0]), prompt, max_sequence_length)
    parts: list[TokenList] = []
    clip = fam.clip_sequence or ()  # a T5 family's CLIP encoders that fill the first positions (SD3's)
    if clip:
        clip_tok = getattr(pipe, fam.tokenizers[fam.text_encoders.index(clip[0])])
        parts.append(
            tokenize_prompt(clip_tok, prompt, int(getattr(pipe, "tokenizer_max_length", 77)), name="clip")
        )
    t5 = getattr(
        pipe, fam.tokenizers[-1], None
    )  # T5's tokenizer is listed last (SD3 tokenizer_3, Flux tokenizer_2)
    if t5 is not None:
        parts.append(tokenize_prompt(t5, prompt, max_sequence_length, name="t5"))
    else:  # SD3 without T5: zeros in T5's place
        zeros = TokenList(
            [-1] * max_sequence_length, ["<zero>"] * max_sequence_length, [PAD] * max_sequence_length
        )
        zeros.segments = [Segment("t5", 0, max_sequence_length, "▁", WORD_START)]
        parts.append(zeros)
    return _concatenate(parts, prompt)


def chat_tokens(tokenizer: Any, prompt: str, length: int, *, name: str = "qwen") -> TokenList:
    """Labels of the ``length`` positions a chat-model text encoder sees for ``prompt`` (Flux.2 [klein]'s Qwen3).

    The prompt is rendered as ``Flux2KleinPipeline`` renders it (one user turn, the assistant header, an empty
    thinking block: ``apply_chat_template(..., add_generation_prompt=True, enable_thinking=False)``) and tokenized
    as it does (``padding="max_length", truncation=True``). The prompt's own tokens are text; the template's tokens
    before them are labelled ``bos`` and those after ``eos`` (so "user" or "assistant" are never found as words);
    padding is ``pad``. Byte-level BPE starts a word with ``Ġ`` (a space), which is the segment's word marker.
    """

    def render(content: str) -> str:
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )

    text = render(prompt)
    pre = render("\x00").split("\x00")[0]  # the template's text before the prompt
    start = len(pre) if text.startswith(pre + prompt) else text.find(prompt)
    stop = start + len(prompt)

    def kind(a: int, b: int) -> str:
        if start <= a and b <= stop and (b > a or not prompt):
            return TEXT
        return BOS if b <= start else EOS

    enc = tokenizer(
        text,
        padding="max_length",
        max_length=length,
        truncation=True,
        return_attention_mask=True,
        return_offsets_mapping=True,
    )
    ids = [int(i) for i in enc.input_ids]
    kinds = [
        kind(a, b) if mask else PAD
        for (a, b), mask in zip(enc.offset_mapping, enc.attention_mask, strict=True)
    ]
    full = tokenizer(text, truncation=False, return_offsets_mapping=True)
    cut = [
        i
        for i, (a, b) in zip(full.input_ids[length:], full.offset_mapping[length:], strict=True)
        if kind(a, b) == TEXT
    ]
    return TokenList(
        ids=ids,
        pieces=list(tokenizer.convert_ids_to_tokens(ids)),
        kinds=kinds,
        truncated=list(tokenizer.convert_ids_to_tokens(cut)),
        prompt=prompt,
        segments=[Segment(name, 0, len(ids), "Ġ", WORD_START)],
    )


def _concatenate(parts: list[TokenList], prompt: str) -> TokenList:
    """One TokenList of ``parts`` one after another along the sequence, segments shifted to their offsets."""
    out = TokenList(ids=[], pieces=[], kinds=[], prompt=prompt)
    best = -1
    for part in parts:
        offset = len(out.ids)
        out.segments += [
            Segment(s.name, s.start + offset, s.stop + offset, s.marker, s.marker_at) for s in part.parts()
        ]
        out.ids += part.ids
        out.pieces += part.pieces
        out.kinds += part.kinds
        seen = part.kinds.count(TEXT)
        if seen > best:  # what no part had room for: the cut of the part that saw the most
            best, out.truncated = seen, list(part.truncated)
    return out
