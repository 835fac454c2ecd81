"""Causal token ablation: remove words from the text encoders' context, not only from the denoiser's attention.

Zeroing a word's cross-attention (``Reweight({"circle": 0.0})``) removes the word's own key, but CLIP's text
encoder is causal: every later token, the end-of-text token and the padding have read the word, so its meaning
reaches the denoiser through them (on the embedded model the shape word's own key holds ~5% of the attention on
the shape, end-of-text and padding ~half). This module removes the word from the encoders' context as well: the
prompt is encoded by the pipeline's own ``encode_prompt`` with an attention mask in each text encoder that stops
every token attending to the word's positions (CLIP: the causal mask loses those key columns, so no later token,
end-of-text or padding reads the word; T5, bidirectional: no token reads it in either direction). The positions
keep their place (nothing shifts), the other words are the prompt's own: an intervention on the word, not a
regeneration with another prompt. The pooled vectors (SDXL's, SD3's), read at end-of-text, lose the word too.

- :func:`ablated_prompt_embeds` gives ``(prompt_embeds, pooled_prompt_embeds)`` of one prompt with words removed;
- :class:`CausalAblation` is a subscriber of the pipeline's attachment (it patches nothing) that gives chosen
  images of the calls in its ``with`` block those embeddings in the conditional half of the CFG batch, so the
  call keeps its ``prompt=`` (a :class:`~.control.Control` and the attention recorder still find the words).
  Together with ``Control(pipe, Reweight({word: 0.0}, images=...))`` the word is ablated everywhere.

SD 1.x, 2.x, XL, SD3 (CLIP-L, CLIP-G, T5 when present) and Flux.1 (CLIP-L pooled, T5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidArgumentError, RecorderStateError, WordNotFoundError
from ..families import Family, detect_family
from .attach import Run, Subscriber, attach, attachment_of, module_hooks
from .tokens import resolve_max_sequence_length, tokenize_prompt

__all__ = ["ABLATION_FAMILIES", "AblatedText", "CausalAblation", "ablated_prompt_embeds", "encoder_positions"]

#: Families whose text encoders (CLIP, T5) causal ablation masks. Flux.2's Qwen3 reads a chat template: not yet.
ABLATION_FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")


def check_ablatable(pipe: Any) -> Family:
    """The pipeline's family if causal ablation can mask its text encoders, else UnsupportedPipelineError."""
    return detect_family(pipe).require(
        "ablate-text",
        "causal token ablation",
        why="it masks CLIP and T5 text encoders",
        hint="Zero the word's attention alone with Reweight({word: 0.0}).",
    )


@dataclass(frozen=True)
class AblatedText:
    """A prompt's text conditioning with words removed from the encoders' context.

    ``prompt_embeds`` (1, T, D) and ``pooled_prompt_embeds`` (1, D) or None are what the pipeline's own
    ``encode_prompt`` returns for the prompt under the masks; ``positions`` maps each text encoder (pipeline
    attribute name) to the token positions masked in it.
    """

    prompt: str
    words: tuple[str, ...]
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor | None
    positions: dict[str, list[int]]


def _words(words: Any) -> tuple[str, ...]:
    if isinstance(words, str):
        words = [words]
    if (
        not isinstance(words, Sequence)
        or not words
        or not all(isinstance(w, str) and w.strip() for w in words)
    ):
        raise InvalidArgumentError(
            f"words={words!r}: pass a word of the prompt or a list of them, e.g. ['circle']."
        )
    return tuple(" ".join(w.split()) for w in words)


def encoder_positions(
    pipe: Any, prompt: str, words: Sequence[str], *, max_sequence_length: int | None = None
) -> dict[str, tuple[list[int], list[int]]]:
    """Per text encoder present (pipeline attribute name): ``(ids, positions of the words)`` in the token window
    the pipeline feeds it (CLIP's 77, T5's ``max_sequence_length``).

    Raises :class:`WordNotFoundError` for a word that no encoder's window holds (one truncated out of CLIP's
    window but inside T5's is masked in T5 only).
    """
    family = detect_family(pipe)
    t5_length = resolve_max_sequence_length(pipe, max_sequence_length)
    out: dict[str, tuple[list[int], list[int]]] = {}
    found = dict.fromkeys(words, False)
    for enc_name, tok_name in zip(family.text_encoders, family.tokenizers, strict=True):
        encoder, tokenizer = getattr(pipe, enc_name, None), getattr(pipe, tok_name, None)
        if encoder is None or tokenizer is None:
            continue  # SD3 without T5: zeros in its place, nothing to mask
        is_t5 = t5_length is not None and "T5" in type(encoder).__name__
        length = (
            t5_length
            if is_t5
            else int(getattr(pipe, "tokenizer_max_length", None) or tokenizer.model_max_length)
        )
        tokens = tokenize_prompt(tokenizer, prompt, length, name="t5" if is_t5 else "clip")
        pos: set[int] = set()
        for w in words:
            try:
                pos.update(tokens.positions(w))
                found[w] = True
            except WordNotFoundError:
                pass
        out[enc_name] = (list(tokens.ids), sorted(pos))
    missing = [w for w, f in found.items() if not f]
    if missing:
        raise WordNotFoundError(
            f"{missing[0]!r} is not a word of {prompt!r} (as its text encoders tokenize it): ablate words the "
            "prompt has."
        )
    return out


def _mask_hook(name: str, ids: list[int], positions: list[int], fired: list[str]) -> Any:
    """A forward pre-hook for one text encoder: its attention mask loses the key columns at ``positions``."""
    expected = torch.tensor(ids)

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if (
            input_ids is None
            or input_ids.shape[-1] != len(ids)
            or not bool((input_ids.cpu() == expected).all())
        ):
            raise RecorderStateError(
                f"{name} was called with other token ids than sdexplore expected for the prompt; causal "
                "ablation cannot place its mask."
            )
        keep = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)  # (N, L)
        keep[:, positions] = 0  # no query attends to the word's keys (CLIP: combined with its causal mask)
        given = kwargs.get("attention_mask")
        kwargs = {**kwargs, "attention_mask": keep if given is None else keep * given.to(keep)}
        fired.append(name)
        return args, kwargs

    return hook


def ablated_prompt_embeds(
    pipe: Any,
    prompt: str,
    words: str | Sequence[str],
    *,
    device: Any = None,
    clip_skip: int | None = None,
    max_sequence_length: int | None = None,
) -> AblatedText:
    """``prompt``'s text conditioning with ``words`` removed from every text encoder's context.

    The pipeline's own ``encode_prompt`` runs (one prompt, no CFG half) while each text encoder takes an
    attention mask without the words' positions: in CLIP no later token (end-of-text and padding included)
    reads them; in T5 no token reads them. Positions do not shift and the other tokens are the prompt's. The
    words' own output vectors stay in the sequence (zero their cross-attention with
    ``Reweight({word: 0.0})``, as :class:`CausalAblation`'s users do). The masks exist only during this call.

    Raises :class:`InvalidArgumentError` for no words, :class:`WordNotFoundError` for a word the prompt lacks,
    :class:`~sdexplore.errors.UnsupportedPipelineError` on Flux.2 (:data:`ABLATION_FAMILIES` can), all before
    any encoding.
    """
    family = check_ablatable(pipe)
    if not isinstance(prompt, str):
        raise InvalidArgumentError(f"prompt={prompt!r}: pass one prompt string.")
    words = _words(words)
    where = encoder_positions(pipe, prompt, words, max_sequence_length=max_sequence_length)
    fired: list[str] = []
    hooks = {name: _mask_hook(name, ids, pos, fired) for name, (ids, pos) in where.items() if pos}
    with module_hooks(pipe, pre=hooks):
        options = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
        dev = device if device is not None else getattr(pipe, "_execution_device", "cpu")
        with torch.no_grad():
            enc = family.encode_prompt(
                pipe, prompt, device=dev, do_classifier_free_guidance=False, clip_skip=clip_skip, **options
            )
    unfired = [n for n, (_, pos) in where.items() if pos and n not in fired]
    if unfired:
        raise RecorderStateError(
            f"{family.label}'s encode_prompt never called {unfired[0]}: causal ablation could not mask it."
        )
    return AblatedText(
        prompt=prompt,
        words=words,
        prompt_embeds=enc.embeds,
        pooled_prompt_embeds=enc.pooled,
        positions={n: pos for n, (_, pos) in where.items()},
    )


class CausalAblation:
    """Context manager: in the pipeline calls of the block, chosen images are conditioned on their prompt with
    ``words`` removed from the text encoders' context (:func:`ablated_prompt_embeds`).

    ::

        with CausalAblation(pipe, ["circle"]), Control(pipe, Reweight({"circle": 0.0})):
            image = pipe("a big red circle at the top left on a blue background").images[0]

    ``images``: indices of the images of the call's batch (prompts × ``num_images_per_prompt``) to change
    (default all); the other images keep the pipeline's own embeddings bit for bit. Only the conditional half of
    the CFG batch changes (the negative prompt is left alone; Flux: the prompt's denoiser call of each step, not
    the negative prompt's), at every step, sequence and pooled embeddings both. It subscribes to the pipeline's attachment (``denoiser_pre``), patches nothing, and keeps
    the call's ``prompt=``, so a :class:`~.control.Control` (zeroing the word's own attention) and an attention
    recorder work alongside. Each prompt is encoded once per run.
    """

    def __init__(self, pipe: Any, words: str | Sequence[str], *, images: Sequence[int] | None = None) -> None:
        self.family: Family = check_ablatable(pipe)
        self.words = _words(words)
        if images is not None and (
            isinstance(images, (str, bytes))
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in images)
        ):
            raise InvalidArgumentError(f"images={images!r}: pass a list of image indices (0-based) or None.")
        self.pipe = pipe
        self.images = None if images is None else sorted(set(images))
        self._attach: attach | None = None
        self._rows: list[tuple[int, str]] = []  # (image index, its prompt)
        self._cache: dict[str, AblatedText] = {}

    def __enter__(self) -> CausalAblation:
        if self._attach is not None:
            raise RecorderStateError("This CausalAblation is already active; leave its `with` block first.")
        existing = attachment_of(self.pipe)
        if existing is not None:
            existing.check_free("text-ablation")
        sub = Subscriber(
            kind="text-ablation", order=0, run_start=self._run_start, denoiser_pre=self._denoiser_pre
        )
        ctx = attach(self.pipe, sub, self.family)
        ctx.__enter__()
        self._attach = ctx
        return self

    def __exit__(self, *exc: Any) -> None:
        ctx, self._attach = self._attach, None
        if ctx is not None:
            ctx.__exit__(*exc)

    def _run_start(self, run: Run) -> None:
        prompt = run.arguments.get("prompt")
        if prompt is None:
            raise InvalidArgumentError(
                "CausalAblation needs the call's prompt (to encode it without the words), not prompt_embeds: "
                "pass prompt=."
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = int(run.arguments.get("num_images_per_prompt") or 1)
        images = [p for p in prompts for _ in range(n)]
        chosen = range(len(images)) if self.images is None else self.images
        if self.images is not None and max(self.images, default=-1) >= len(images):
            raise InvalidArgumentError(
                f"CausalAblation(images={self.images}) but the call makes {len(images)} image(s) (indices from 0)."
            )
        self._rows = [(i, images[i]) for i in chosen]
        self._options = {
            k: run.arguments[k]
            for k in ("clip_skip", "max_sequence_length")
            if run.arguments.get(k) is not None
        }
        self._cache = {}
        for p in dict.fromkeys(images[i] for i in chosen):  # WordNotFoundError before any denoising
            encoder_positions(
                self.pipe, p, self.words, max_sequence_length=self._options.get("max_sequence_length")
            )

    def _encoded(self, prompt: str, device: torch.device) -> AblatedText:
        if prompt not in self._cache:
            self._cache[prompt] = ablated_prompt_embeds(
                self.pipe, prompt, self.words, device=device, **self._options
            )
        return self._cache[prompt]

    def _denoiser_pre(self, run: Run, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self._rows:
            return None
        if not self.family.cfg_batch and run.step_calls > 0:
            return None  # Flux's true CFG: the step's second call is the negative prompt's
        spec = self.family.denoiser_args
        text = spec.get("text", args, kwargs)  # (2B|B, T, D)
        pooled = spec.get("pooled", args, kwargs)  # (2B|B, D) or None
        cfg = run.cfg and self.family.cfg_batch
        half = text.shape[0] // 2 if cfg else text.shape[0]
        base = (half if self.family.cfg_uncond_first else 0) if cfg else 0  # first conditional row
        text = text.clone()
        pooled = None if pooled is None else pooled.clone()
        for i, prompt in self._rows:
            enc = self._encoded(prompt, text.device)
            text[base + i] = enc.prompt_embeds[0].to(text.dtype)
            if pooled is not None and enc.pooled_prompt_embeds is not None:
                pooled[base + i] = enc.pooled_prompt_embeds[0].to(pooled.dtype)
        args, kwargs = spec.replace("text", args, kwargs, text)
        if pooled is not None:
            args, kwargs = spec.replace("pooled", args, kwargs, pooled)
        return args, kwargs
