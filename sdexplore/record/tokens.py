"""Label a prompt's key positions with a tokenizer, for attention maps (TokenList itself lives in results).

:func:`tokenize_prompt` labels one tokenizer's window; :func:`sequence_tokens` labels the whole text sequence a
pipeline's denoiser attends to (SD3: CLIP's 77 positions then T5's; Flux: T5's; Flux.2 [klein]: Qwen3's chat-templated
prompt; Sana: Gemma's positions kept of the instruction-prefixed prompt; the UNet families: CLIP's 77), each part from
the prompt its encoder encoded (``prompt_2``, ``prompt_3``). Word markers are read from each tokenizer's own
components (:func:`word_marker`), never from a family's name.
"""

from __future__ import annotations

import inspect
import json
import weakref
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from ..errors import InvalidArgumentError, UnsupportedPipelineError
from ..families import detect_family, signature_of
from ..results.tokens import BOS, EOS, PAD, TEXT, WORD_END, WORD_START, Segment, SharedLabels, TokenList

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "TEXT",
    "TokenList",
    "CALL_DEFAULT",
    "chat_tokens",
    "padded_to",
    "default_max_sequence_length",
    "instructed_tokens",
    "resolve_max_sequence_length",
    "sequence_tokens",
    "tokenize_prompt",
    "unlabelled",
    "word_marker",
]


_CACHE: OrderedDict[tuple[int, str, int], tuple[weakref.ref, tuple]] = OrderedDict()
_CACHE_SIZE = 256  # prompts remembered (a walk or a sweep labels the same few prompts run after run)
_MAX_T5_LENGTH = 512  # diffusers' SD3 and Flux pipelines refuse a larger max_sequence_length


class _CallDefault:
    def __repr__(self) -> str:
        return "CALL_DEFAULT"


#: ``sequence_tokens(..., complex_human_instruction=CALL_DEFAULT)``: the pipeline's own default, as a plain call.
CALL_DEFAULT: Any = _CallDefault()


def word_marker(tokenizer: Any) -> tuple[str, str]:
    """``(marker, where)`` of a tokenizer's word marker, read from the tokenizer's own model, not from text.

    CLIP's BPE model appends an end-of-word suffix (``("</w>", "end")``); a sentencepiece tokenizer starts every
    word with ``"▁"`` (``("▁", "start")``), which it declares either as a Metaspace pre-tokenizer or decoder (T5's
    Unigram) or as a normalizer that replaces spaces by ``"▁"`` and a decoder that turns it back (Gemma's BPE); a
    byte-level BPE (GPT-2, Qwen) starts a word with the byte symbol of a space, ``"Ġ"``. A tokenizer with none of
    these (no backend, or another scheme) gets ``("", "end")``: every piece is a word of its own.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (pure Python) tokenizer
        if getattr(tokenizer, "sp_model", None) is not None:
            return "▁", WORD_START
        return ("</w>", WORD_END) if hasattr(tokenizer, "bpe_ranks") else ("", WORD_END)
    suffix = getattr(backend.model, "end_of_word_suffix", None)
    if suffix:
        return str(suffix), WORD_END
    decoder, pre = _components(backend.decoder), _components(backend.pre_tokenizer)
    for sub in decoder + pre:
        if sub.get("type") == "Metaspace" and sub.get("replacement"):
            return str(sub["replacement"]), WORD_START
    spaces_to = {  # what the normalizer writes for a space, and what the decoder writes back as one
        str(r["content"])
        for r in _components(backend.normalizer)
        if r.get("type") == "Replace" and r.get("pattern") == {"String": " "} and r.get("content")
    }
    for sub in decoder:
        marker = (sub.get("pattern") or {}).get("String") if sub.get("type") == "Replace" else None
        if marker and sub.get("content") == " " and (marker in spaces_to or not spaces_to):
            return str(marker), WORD_START
    if any(sub.get("type") == "ByteLevel" for sub in pre):
        return "Ġ", WORD_START  # byte-level BPE maps the space byte to "Ġ", which starts the word it precedes
    return "", WORD_END


def _components(part: Any) -> list[dict[str, Any]]:
    """The JSON records of a tokenizers normalizer, pre-tokenizer or decoder: itself and, for a Sequence, each of
    its members (nested ones too), as the tokenizers library serialises them (``{"type": "Replace", ...}``)."""
    if part is None:
        return []
    try:
        state = json.loads(part.__getstate__())
    except (AttributeError, TypeError, ValueError):  # a custom Python component has no JSON form
        return []
    out: list[dict[str, Any]] = []
    todo = [state]
    while todo:
        node = todo.pop(0)
        if isinstance(node, dict):
            out.append(node)
            todo += [v for v in node.values() if isinstance(v, dict | list)]
        elif isinstance(node, list):
            todo += node
    return out


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
    for id_, mask, special in zip(ids, enc.attention_mask, enc.special_tokens_mask, strict=True):
        if not mask:
            kinds.append(PAD)  # CLIP (SD 1.x) pads with its EOS id: the attention mask tells them apart
        elif special and id_ == tokenizer.bos_token_id:  # first, after left padding too (Gemma pads left)
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


def padded_to(tokens: TokenList, length: int) -> TokenList:
    """``tokens`` followed by padding keys up to ``length`` positions (a pipeline that keeps only each prompt's own
    states, Z-Image's or Qwen-Image's, pads a batch to its longest row); ``tokens`` itself when not shorter."""
    n = length - len(tokens.ids)
    if n <= 0:
        return tokens
    return replace(
        tokens,
        ids=tokens.ids + [-1] * n,
        pieces=tokens.pieces + ["<pad>"] * n,
        kinds=tokens.kinds + [PAD] * n,
    )


def unlabelled(length: int) -> TokenList:
    """Placeholder labels when the prompt text was not seen (e.g. ``prompt_embeds`` passed directly)."""
    return TokenList(ids=[-1] * length, pieces=[f"<{i}>" for i in range(length)], kinds=[PAD] * length)


def default_max_sequence_length(pipe: Any) -> int | None:
    """The T5 length a plain call of ``pipe`` uses (its ``__call__`` default: SD3 256, Flux 512); None without T5."""
    if "max_sequence_length" not in detect_family(pipe).encode_options:
        return None
    param = signature_of(pipe.__call__).parameters.get("max_sequence_length")
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


def sequence_tokens(
    pipe: Any,
    prompt: str,
    *,
    max_sequence_length: int | None = None,
    prompt_2: str | None = None,
    prompt_3: str | None = None,
    complex_human_instruction: Any = CALL_DEFAULT,
) -> TokenList:
    """Labels of every position of the text sequence ``pipe``'s denoiser attends to, for ``prompt``.

    - SD 1.x / 2.x: CLIP's 77 positions (``pipe.tokenizer``).
    - SDXL: CLIP's 77 positions, where CLIP-L's and CLIP-G's hidden states sit side by side along the features:
      labelled by ``pipe.tokenizer`` from ``prompt``; where ``prompt_2`` differs, the segment's shared labels
      ("clip_g", :class:`~sdexplore.results.tokens.SharedLabels`) hold ``pipe.tokenizer_2``'s tokens of it.
    - SD3: CLIP's 77 (CLIP-L from ``prompt``, CLIP-G from ``prompt_2`` as for SDXL), then T5's
      ``max_sequence_length`` positions (``pipe.tokenizer_3``) from ``prompt_3``, exactly as ``encode_prompt``
      concatenates them along the sequence. Without T5 the pipeline puts zeros there: those positions are
      padding, piece ``<zero>``.
    - Flux: T5's ``max_sequence_length`` positions, from ``prompt_2`` (CLIP gives only the pooled vector, from
      ``prompt``).
    - Flux.2 [klein]: Qwen3's ``max_sequence_length`` positions of the chat-templated prompt (:func:`chat_tokens`).
    - A pipeline whose ``encode_prompt`` prepends an instruction to the prompt (Sana's ``complex_human_instruction``):
      the positions it keeps of the instructed prompt (:func:`instructed_tokens`). ``complex_human_instruction`` is
      the call's (None, False or [] for none); left out, the pipeline's own default, as a plain call uses. Negative
      prompts are encoded without it: label them with ``complex_human_instruction=None``.

    ``prompt_2``/``prompt_3`` follow the pipelines' rule: None or empty means ``prompt``; a family whose
    ``encode_prompt`` takes no such argument refuses it. ``max_sequence_length`` defaults to the pipeline's own
    (SD3 256, Flux 512); pass the call's value. The result's ``segments`` give each part's name ("clip", "t5"),
    offsets and ``source`` (the argument it was labelled from); ``positions(word)`` finds a word in every part,
    each in its own prompt (``segment="t5"`` keeps one). ``truncated`` lists what no part had room for.
    """
    if not isinstance(prompt, str):
        raise InvalidArgumentError(
            f"prompt={prompt!r} ({type(prompt).__name__}) is not a prompt string: label one prompt at a time."
        )
    fam = detect_family(pipe)
    prompt_2, prompt_3 = (
        _further_prompt(pipe, fam, n, v, prompt) for n, v in (("prompt_2", prompt_2), ("prompt_3", prompt_3))
    )
    max_sequence_length = resolve_max_sequence_length(pipe, max_sequence_length)
    instructed = _takes_instruction(pipe)
    if not instructed and complex_human_instruction is not CALL_DEFAULT and complex_human_instruction:
        raise InvalidArgumentError(
            f"{fam.label} ({type(pipe).__name__}) prepends no instruction to the prompt; leave "
            "complex_human_instruction out."
        )
    if instructed and max_sequence_length is not None:
        if complex_human_instruction is CALL_DEFAULT:
            complex_human_instruction = _call_default(pipe, "complex_human_instruction")
        tokenizer = getattr(pipe, fam.tokenizers[0])
        encoder = getattr(pipe, fam.text_encoders[0], None)
        name = str(getattr(getattr(encoder, "config", None), "model_type", None) or "text")
        return instructed_tokens(
            tokenizer,
            prompt,
            max_sequence_length,
            complex_human_instruction,
            preprocess=_preprocessor(pipe),
            name=name,
        )
    if max_sequence_length is None:
        tokenizers = fam.present_tokenizers(pipe)  # SDXL's refiner has tokenizer_2 alone: it labels prompt
        main = tokenize_prompt(tokenizers[0][1], prompt)
        if fam.tokenizers[0] == tokenizers[0][0] and len(tokenizers) > 1 and prompt_2 != prompt:
            main.segments = [
                _with_shared(main.parts()[0], tokenize_prompt(tokenizers[1][1], prompt_2), prompt_2)
            ]
        return main
    if fam.name == "flux2":
        if type(pipe).__name__ != "Flux2KleinPipeline":  # Flux2Pipeline: Mistral-3 with a system prompt
            raise UnsupportedPipelineError(
                f"sdexplore labels the text sequence of Flux2KleinPipeline only, not {type(pipe).__name__}'s "
                "system-prompted Mistral-3 input; pass prompt_embeds and read maps by position."
            )
        return chat_tokens(getattr(pipe, fam.tokenizers[0]), prompt, max_sequence_length)
    if fam.name == "z-image":  # thinking on, and only the unmasked states are kept: no padding
        return chat_tokens(pipe.tokenizer, prompt, max_sequence_length, thinking=True, pad=False)
    if fam.name == "qwen-image":  # its system prompt, whose tokens the pipeline drops by count
        template, drop = pipe.prompt_template_encode, int(pipe.prompt_template_encode_start_idx)
        return chat_tokens(
            pipe.tokenizer, prompt, max_sequence_length, template=template, drop=drop, pad=False
        )
    parts: list[TokenList] = []
    clip = fam.clip_sequence or ()  # a T5 family's CLIP encoders that fill the first positions (SD3's)
    if clip:
        length = int(getattr(pipe, "tokenizer_max_length", 77))
        clip_tok = getattr(pipe, fam.tokenizers[fam.text_encoders.index(clip[0])])
        part = tokenize_prompt(clip_tok, prompt, length, name="clip")
        if len(clip) > 1 and prompt_2 != prompt:  # CLIP-G encoded prompt_2 at the same positions
            second = getattr(pipe, fam.tokenizers[fam.text_encoders.index(clip[1])])
            part.segments = [
                _with_shared(part.parts()[0], tokenize_prompt(second, prompt_2, length), prompt_2)
            ]
        parts.append(part)
    t5 = getattr(
        pipe, fam.tokenizers[-1], None
    )  # T5's tokenizer is listed last (SD3 tokenizer_3, Flux tokenizer_2)
    source = "prompt_3" if "prompt_3" in fam.prompt_arguments else "prompt_2"  # what T5 encodes
    text = prompt_3 if source == "prompt_3" else prompt_2
    if t5 is not None:
        preprocess = _preprocessor(pipe)  # PixArt lower-cases and strips the prompt before T5 reads it
        part = tokenize_prompt(
            t5, text if preprocess is None else preprocess(text), max_sequence_length, name="t5"
        )
        if text != prompt:
            part.segments = [replace(part.parts()[0], source=source, text=text)]
        parts.append(part)
    else:  # SD3 without T5: zeros in T5's place
        zeros = TokenList(
            [-1] * max_sequence_length, ["<zero>"] * max_sequence_length, [PAD] * max_sequence_length
        )
        zeros.segments = [Segment("t5", 0, max_sequence_length, "▁", WORD_START)]
        parts.append(zeros)
    return _concatenate(parts, prompt)


def _further_prompt(pipe: Any, fam: Any, name: str, value: Any, prompt: str) -> str:
    """``prompt_2``/``prompt_3`` as the pipeline reads it (None or "" → ``prompt``), checked."""
    if value is None:
        return prompt
    if not isinstance(value, str):
        raise InvalidArgumentError(
            f"{name}={value!r} ({type(value).__name__}) is not a prompt string: label one prompt at a time."
        )
    encode = getattr(pipe, "encode_prompt", None)
    if encode is None or name not in signature_of(encode).parameters:
        raise InvalidArgumentError(
            f"{fam.label} ({type(pipe).__name__}) takes no {name}: its text encoders all encode prompt; leave "
            f"{name} None."
        )
    return value or prompt


def _with_shared(segment: Segment, second: TokenList, text: str) -> Segment:
    """``segment`` with CLIP-G's labels of ``text`` (``second``, one window over the same positions) shared."""
    s2 = second.parts()[0]
    shared = SharedLabels(
        "clip_g",
        "prompt_2",
        text,
        tuple(second.ids),
        tuple(second.pieces),
        tuple(second.kinds),
        s2.marker,
        s2.marker_at,
    )
    return replace(segment, shared=shared)


def _takes_instruction(pipe: Any) -> bool:
    """Whether ``pipe.encode_prompt`` prepends an instruction to the prompt (Sana's ``complex_human_instruction``)."""
    encode = getattr(pipe, "encode_prompt", None)
    return encode is not None and "complex_human_instruction" in signature_of(encode).parameters


def _call_default(pipe: Any, name: str) -> Any:
    """The default of argument ``name`` of ``pipe.__call__`` (None where it has none)."""
    param = signature_of(type(pipe).__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _preprocessor(pipe: Any) -> Any:
    """The text clean-up the pipeline applies before tokenizing (PixArt's and Sana's ``_text_preprocessing`` with
    ``clean_caption=False``: lower case, stripped), or None where it has none."""
    method = getattr(pipe, "_text_preprocessing", None)
    if method is None:
        return None
    return lambda text: method(text, clean_caption=False)[0]


def instructed_tokens(
    tokenizer: Any,
    prompt: str,
    length: int,
    instruction: Any,
    *,
    preprocess: Any = None,
    name: str = "gemma",
) -> TokenList:
    """Labels of the ``length`` positions a text encoder's output keeps for ``prompt`` when the pipeline prepends an
    instruction to it (Sana's ``complex_human_instruction``, a list of lines).

    As ``SanaPipeline.encode_prompt`` does: the text is the lines joined by newlines followed by the (preprocessed)
    prompt, tokenized to ``n + length − 2`` positions where ``n`` is the instruction's own token count (BOS
    included), padded on the right; of the encoder's output it keeps position 0 (BOS) and the last ``length − 1``.
    Tokens holding a character of the prompt are text (the piece that carries the instruction's last space into
    the prompt's first word, ``"▁a"``, included); the instruction's tokens that are kept are labelled ``bos``, as a
    chat template's are, so its words are never found as the prompt's; padding is ``pad``. Without an instruction
    (None, False or []) the text is the prompt alone, ``length`` positions. The word marker is the tokenizer's own
    (:func:`word_marker`: Gemma's ``"▁"``).
    """
    if isinstance(instruction, str) or (instruction and not all(isinstance(x, str) for x in instruction)):
        raise InvalidArgumentError(
            f"complex_human_instruction={instruction!r} is not a list of lines: pass a list of strings, or None."
        )
    encoded = preprocess(prompt) if preprocess is not None else prompt
    prefix = "\n".join(instruction) if instruction else ""
    text = prefix + encoded
    total = len(tokenizer.encode(prefix)) + length - 2 if prefix else length
    start, stop = len(prefix), len(text)

    def kind(a: int, b: int, special: int, id_: int) -> str:
        if not special and a < stop and b > start:
            return TEXT
        if special:
            return BOS if id_ == tokenizer.bos_token_id else EOS
        return BOS if b <= start else EOS

    enc = tokenizer(
        text,
        padding="max_length",
        max_length=total,
        truncation=True,
        padding_side="right",  # as the pipeline sets it
        return_attention_mask=True,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    # the pipeline's select_index: BOS, then the last length − 1
    keep = [0, *range(total - length + 1, total)]
    ids = [int(enc.input_ids[i]) for i in keep]
    kinds = [
        kind(*enc.offset_mapping[i], enc.special_tokens_mask[i], ids[j]) if enc.attention_mask[i] else PAD
        for j, i in enumerate(keep)
    ]
    full = tokenizer(text, truncation=False, return_offsets_mapping=True, return_special_tokens_mask=True)
    cut = [
        int(i)
        for i, (a, b), sp in zip(
            full.input_ids[total:], full.offset_mapping[total:], full.special_tokens_mask[total:], strict=True
        )
        if kind(a, b, sp, int(i)) == TEXT
    ]
    marker, where = word_marker(tokenizer)
    return TokenList(
        ids=ids,
        pieces=list(tokenizer.convert_ids_to_tokens(ids)),
        kinds=kinds,
        truncated=list(tokenizer.convert_ids_to_tokens(cut)),
        prompt=prompt,
        segments=[Segment(name, 0, len(ids), marker, where)],
    )


_CHAT_CACHE: OrderedDict[tuple, tuple[weakref.ref, TokenList]] = OrderedDict()  # as _CACHE, for chat_tokens


def chat_tokens(
    tokenizer: Any,
    prompt: str,
    length: int,
    *,
    name: str = "qwen",
    thinking: bool = False,
    template: str | None = None,
    drop: int = 0,
    pad: bool = True,
) -> TokenList:
    """Labels of the ``length`` positions a chat-model text encoder sees for ``prompt`` (Flux.2 [klein]'s Qwen3).

    The prompt is rendered as ``Flux2KleinPipeline`` renders it (one user turn, the assistant header, an empty
    thinking block: ``apply_chat_template(..., add_generation_prompt=True, enable_thinking=False)``) and tokenized
    as it does (``padding="max_length", truncation=True``). The prompt's own tokens are text; the template's tokens
    before them are labelled ``bos`` and those after ``eos`` (so "user" or "assistant" are never found as words);
    padding is ``pad``. Byte-level BPE starts a word with ``Ġ`` (a space), which is the segment's word marker.

    Other pipelines: ``thinking=True`` renders no thinking block (``ZImagePipeline``); ``template`` is a ``"{}"``
    format string in place of the chat template, whose first ``drop`` tokens the pipeline drops (``QwenImagePipeline``'s
    system prompt); ``pad=False`` labels only the tokens the encoder keeps (both drop the padded states).
    Labels are remembered per tokenizer, prompt and options (each call returns a TokenList of its own).
    """
    key = (id(tokenizer), prompt, length, name, thinking, template, drop, pad)
    hit = _CHAT_CACHE.get(key)
    if hit is not None and hit[0]() is tokenizer:
        _CHAT_CACHE.move_to_end(key)
        tl = hit[1]
    else:
        tl = _chat_tokens(tokenizer, prompt, length, name, thinking, template, drop, pad)
        try:
            _CHAT_CACHE[key] = (weakref.ref(tokenizer), tl)
        except TypeError:  # a tokenizer that cannot be weakly referenced is simply not remembered
            pass
        while len(_CHAT_CACHE) > _CACHE_SIZE:
            _CHAT_CACHE.popitem(last=False)
    return replace(
        tl,
        ids=list(tl.ids),
        pieces=list(tl.pieces),
        kinds=list(tl.kinds),
        truncated=list(tl.truncated),
        segments=list(tl.segments),
    )


def _chat_tokens(
    tokenizer: Any,
    prompt: str,
    length: int,
    name: str,
    thinking: bool,
    template: str | None,
    drop: int,
    pad: bool,
) -> TokenList:
    def render(content: str) -> str:
        if template is not None:
            return template.format(content)
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
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
        padding="max_length" if pad else False,
        max_length=length + drop,
        truncation=True,
        return_attention_mask=True,
        return_offsets_mapping=True,
    )
    ids = [int(i) for i in enc.input_ids][drop:]
    kinds = [
        kind(a, b) if mask else PAD
        for (a, b), mask in zip(enc.offset_mapping, enc.attention_mask, strict=True)
    ][drop:]
    full = tokenizer(text, truncation=False, return_offsets_mapping=True)
    cut = [
        i
        for i, (a, b) in zip(
            full.input_ids[length + drop :], full.offset_mapping[length + drop :], strict=True
        )
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
    """One TokenList of ``parts`` one after another along the sequence, segments shifted to their offsets.

    ``truncated`` is the cut of the part labelled from ``prompt`` that saw the most of it (of any part where
    none was: Flux's T5 from another ``prompt_2``).
    """
    out = TokenList(ids=[], pieces=[], kinds=[], prompt=prompt)
    best = -1
    from_prompt = any(p.parts()[0].source == "prompt" for p in parts)
    for part in parts:
        offset = len(out.ids)
        out.segments += [replace(s, start=s.start + offset, stop=s.stop + offset) for s in part.parts()]
        out.ids += part.ids
        out.pieces += part.pieces
        out.kinds += part.kinds
        seen = part.kinds.count(TEXT)
        if seen > best and (part.parts()[0].source == "prompt" or not from_prompt):
            best, out.truncated = seen, list(part.truncated)
    return out
