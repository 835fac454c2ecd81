"""Attention controls: subscribers that *change* attention probabilities while the user's own call runs.

A control patches nothing: it subscribes to the pipeline's attachment (:mod:`sdexplore.record.attach`) with a
:class:`~.attach.ControlTap` naming the layers it edits; the attachment puts a controlled processor on them
(self-attention layers only while a control that needs them is subscribed) and restores the very same processor
objects when the block ends. A layer computes explicit probabilities only at a call some edit changes; every
other call runs the original kernel, so an edit at zero strength gives the plain image bit for bit. An
:class:`~sdexplore.record.attention.AttentionRecorder` in the same block records the *edited* probabilities.

Edits (Hertz et al., 2022, "Prompt-to-Prompt Image Editing with Cross Attention Control"), all on the
conditional half of the CFG batch only, as Prompt-to-Prompt does:

- :class:`WordSwap` (P2P replace): a batch of source prompts followed by as many target prompts, word for word
  aligned; each target image takes its source image's cross-attention probabilities for the first
  ``cross_replace`` fraction of the steps and its self-attention probabilities (layers of at most
  ``self_max_queries`` queries, 16×16 as in P2P) for the first ``self_replace`` fraction;
- :class:`Refine` (P2P refine): target prompts that add or remove words; the target's cross-attention at each
  token aligned with a source token (a sequence alignment of the token ids) is the source's, new tokens keep
  their own;
- :class:`Reweight` (P2P reweight, token ablation): scale words' cross-attention by factors (0 ablates the word),
  or put a word's attention where a given ``(h, w)`` mask says ("put the circle here");
- :class:`LocalBlend` (P2P local blend): after each step, the target's latents outside a mask made from chosen
  words' cross-attention are set back to the source's, so the edit stays local.

SD3, Flux.1 and Flux.2 (MMDiT) take the same edits on their joint attention
(:class:`~.joint.JointControlledProcessor`, :class:`~.joint.FluxControlledProcessor`, on every joint block: SD3's,
Flux's double- and single-stream blocks): the probabilities a control edits are the image-query × text-key block
of each block's softmax (normalised over text *and* image keys, never renormalised after the edit), so a word
swap gives the target branch the source's image→text block and a reweight scales a word's column; the
image→image part and the text queries are left alone (``self_replace`` has no effect there). Flux has no CFG
batch (guidance-distilled): the edits apply to the whole target rows; true CFG's negative-prompt call is left
alone. On these families one more edit acts on the image part of the joint attention:

- :class:`Inject` (Stable Flow's attention injection, Avrahami et al., 2025): at chosen layers and steps the
  target images' image-token keys and values are their source images', so the edited image attends to the
  reference image's features.

Other families get an :class:`~sdexplore.errors.UnsupportedPipelineError` naming the families that can.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError, RecorderStateError, UnsupportedPipelineError, WordNotFoundError
from ..families import Family, detect_family
from .attach import AttentionCall, ControlTap, Run, Step, Subscriber, attach, attachment_of, check_attachable
from .tokens import TokenList, sequence_tokens

#: Families whose attention a control can change (the message of every refusal names them).
CONTROL_FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux", "flux2")
#: Families with joint attention, where :class:`Inject` runs.
JOINT_CONTROL_FAMILIES = ("sd3", "flux", "flux2")


def check_controllable(pipe: Any, family: Family | None = None) -> Family:
    """The pipeline's family if a control can run on it, else :class:`UnsupportedPipelineError` saying which can."""
    return (family or detect_family(pipe)).require(
        "controls",
        "attention controls (Reweight, WordSwap, Refine, LocalBlend)",
        hint="Record its attention with sdexplore.observe(pipe, attention=True).",
    )


def check_fraction(name: str, value: Any) -> float:
    """A step fraction in [0, 1], else :class:`InvalidArgumentError`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not 0.0 <= v <= 1.0:
        raise InvalidArgumentError(
            f"{name}={value!r}: a fraction of the steps must be a number in [0, 1] (0 = never, 1 = every step)."
        )
    return v


def check_weight(word: str, value: Any) -> float:
    """An attention weight: finite and ≥ 0, else :class:`InvalidArgumentError`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if isinstance(value, bool) or not math.isfinite(v) or v < 0:
        raise InvalidArgumentError(
            f"The weight of {word!r} is {value!r}: a weight must be a finite number ≥ 0 (1 = unchanged, "
            "0 = ablate the word, 2 = twice its attention)."
        )
    return v


def check_mask(word: str, mask: Any) -> torch.Tensor:
    """A ``(h, w)`` mask in [0, 1] with some area, as float32, else :class:`InvalidArgumentError`."""
    try:
        m = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"The mask for {word!r} is not an array: {e}.") from None
    if m.ndim != 2 or min(m.shape) < 1:
        raise InvalidArgumentError(
            f"The mask for {word!r} has shape {tuple(m.shape)}: pass one (h, w) array (any size; it is resized "
            "to each layer's grid)."
        )
    if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1 or float(m.sum()) <= 0:
        raise InvalidArgumentError(
            f"The mask for {word!r} must hold values in [0, 1], some of them above 0 (1 = put the word here)."
        )
    return m


def _fractions(name: str, steps: Any) -> tuple[float, float]:
    if not isinstance(steps, Sequence) or isinstance(steps, str) or len(steps) != 2:
        raise InvalidArgumentError(
            f"{name}={steps!r}: pass (start, end) fractions of the steps, e.g. (0.0, 1.0) for every step."
        )
    a, b = check_fraction(f"{name}[0]", steps[0]), check_fraction(f"{name}[1]", steps[1])
    if a > b:
        raise InvalidArgumentError(f"{name}={steps!r}: the start fraction is after the end fraction.")
    return a, b


def _in_fraction(step: int, num_steps: int, start: float, end: float) -> bool:
    """Step ``step`` of ``num_steps`` lies in [start·N, end·N) (P2P counts steps the same way)."""
    return start * num_steps <= step < end * num_steps


def _prompts_of(run: Run) -> tuple[list[str], int]:
    """The call's prompts (one per prompt, before ``num_images_per_prompt``) and images per prompt."""
    prompt = run.arguments.get("prompt")
    if prompt is None:
        raise InvalidArgumentError(
            "Attention controls need the call's prompt (to find its words), not prompt_embeds: pass prompt=."
        )
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return prompts, int(run.arguments.get("num_images_per_prompt") or 1)


def _latent_size(run: Run) -> tuple[int, int]:
    """(h, w) latent cells of the run's latents (packed families: from the run's latent grid)."""
    if run.latent_grid is not None:
        return run.latent_grid
    sample = run.denoiser_in
    if sample is None:
        raise RecorderStateError("No denoiser call has been seen yet: the latent size is unknown.")
    return int(sample.shape[-2]), int(sample.shape[-1])


def _grid(queries: int, latent: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer's query grid: the latent size halved (rounding up) until the counts agree."""
    H, W = latent
    for k in range(8):
        h, w = math.ceil(H / 2**k), math.ceil(W / 2**k)
        if h * w == queries:
            return h, w
    raise RecorderStateError(f"Cannot place {queries} queries on a grid of the {latent} latent.")


class AttentionEdit:
    """One edit a :class:`Control` applies; subclasses say which layers, when, and how.

    ``start(run, pipe)`` is called when a run starts (check the call, find words), ``active(call)`` for each
    attention call of the edited layers (False: the original kernel runs, bitwise) and ``edit(call, probs)``
    changes the float32 probabilities (N, heads, HW, T) in place, returning the batch rows it changed. On joint
    attention (SD3, Flux) ``inject(call)`` may return (target row, source row) pairs whose image-token keys and
    values the call takes from the source row (:class:`Inject`). ``bind(pipe, family, layers)`` is called when
    the :class:`Control` is made (check the edit against the pipeline before any work). An edit that reads and
    changes only the conditional rows (``call.cond``) says so with ``conditional_only = True``: a joint layer then
    forms only those rows' probabilities (the others are zero in ``probs``).
    """

    needs_self_attention: bool = False
    reads_first: bool = False  # reads the probabilities before the other edits change them (LocalBlend)
    unconditional: bool = False  # also acts on Flux true CFG's negative-prompt call (no prompt words there)
    reads_probs: bool = True  # reads or edits the probabilities where active (Inject: only keys and values)
    # reads and edits the conditional rows' probabilities only (``call.cond``): a joint layer then forms no others
    conditional_only: bool = False

    def bind(self, pipe: Any, family: Family, layers: list[str]) -> None:
        """The :class:`Control` is made on ``pipe`` (``layers``: the module names it attaches to)."""

    def inject(self, call: AttentionCall) -> list[tuple[int, int]]:
        """(target row, source row) pairs of image-token keys and values to inject at ``call`` (joint attention)."""
        return []

    def start(self, run: Run, pipe: Any) -> None:  # pragma: no cover - an interface
        """A run starts: check its arguments against the edit (before any denoising)."""

    def active(self, call: AttentionCall) -> bool:  # pragma: no cover - an interface
        """Whether this edit changes ``call``."""
        return False

    def edit(self, call: AttentionCall, probs: torch.Tensor) -> list[int]:  # pragma: no cover - an interface
        """Change ``probs`` (N, heads, HW, T) in place; return the rows changed."""
        return []

    def step(self, step: Step, latents: torch.Tensor) -> torch.Tensor | None:
        """After each scheduler step: new latents (B, C, h, w) to continue from, or None to leave them."""
        return None


class Reweight(AttentionEdit):
    """Scale words' cross-attention probabilities (Prompt-to-Prompt's reweighting; 0 ablates a word), or put a
    word's attention where a mask says.

    ``weights`` maps words of the prompt (one or several space-separated words) to factors ≥ 0; every token of the
    word, every occurrence, is scaled. Other tokens' probabilities are left as they are: nothing is renormalised,
    as in P2P. ``masks`` maps words to ``(h, w)`` arrays in [0, 1] (any size, resized to each layer's grid): the
    word's probabilities are replaced by the mask, scaled so that each head keeps the word's total attention mass
    ("put the circle here"). ``steps`` is the (start, end) fraction of the steps the edit runs in; ``images``
    the images of the batch it edits (default all). A factor of 1 and no mask is no edit at all: the plain image
    bit for bit.
    """

    conditional_only = True

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        *,
        masks: Mapping[str, Any] | None = None,
        steps: Sequence[float] = (0.0, 1.0),
        images: Sequence[int] | None = None,
    ) -> None:
        if weights is not None and not isinstance(weights, Mapping):
            raise InvalidArgumentError(
                f"weights={weights!r}: pass a dict of words to factors, e.g. {{'circle': 0.0}}."
            )
        if masks is not None and not isinstance(masks, Mapping):
            raise InvalidArgumentError(f"masks={masks!r}: pass a dict of words to (h, w) arrays.")
        self.weights = {_word(w): check_weight(w, v) for w, v in (weights or {}).items()}
        self.masks = {_word(w): check_mask(w, m) for w, m in (masks or {}).items()}
        self.steps = _fractions("steps", steps)
        if images is not None and (
            isinstance(images, (str, bytes)) or not all(isinstance(i, int) and i >= 0 for i in images)
        ):
            raise InvalidArgumentError(f"images={images!r}: pass a list of image indices (0-based) or None.")
        self.images = None if images is None else sorted(set(images))
        #: per edited image: its index and [(positions, factor or None, mask or None)]
        self._targets: list[tuple[int, list[tuple[list[int], float | None, torch.Tensor | None]]]] = []
        self._latent: tuple[int, int] | None = None
        self._resized: dict[tuple, torch.Tensor] = {}

    @property
    def identity(self) -> bool:
        """True when the edit changes nothing (every factor 1, no mask)."""
        return not self.masks and all(v == 1.0 for v in self.weights.values())

    def positions(self, pipe: Any, prompt: str) -> list[tuple[list[int], float | None, torch.Tensor | None]]:
        """The key positions of each word in ``prompt`` with its factor and mask (WordNotFoundError for a word
        the prompt does not have)."""
        tokens = sequence_tokens(pipe, prompt)
        out = [(tokens.positions(w), v, None) for w, v in self.weights.items() if w not in self.masks]
        out += [(tokens.positions(w), None, m) for w, m in self.masks.items()]
        return out

    def start(self, run: Run, pipe: Any) -> None:
        prompts, n = _prompts_of(run)
        images = [p for p in prompts for _ in range(n)]
        chosen = range(len(images)) if self.images is None else self.images
        if self.images is not None and max(self.images, default=-1) >= len(images):
            raise InvalidArgumentError(
                f"Reweight(images={self.images}) but the call makes {len(images)} image(s) (indices from 0)."
            )
        by_prompt: dict[str, Any] = {}
        self._targets = []
        for i in chosen:
            if images[i] not in by_prompt:
                by_prompt[images[i]] = self.positions(pipe, images[i])
            self._targets.append((i, by_prompt[images[i]]))
        self._resized = {}
        self._latent = None

    def active(self, call: AttentionCall) -> bool:
        return (
            call.cross
            and not self.identity
            and bool(self._targets)
            and _in_fraction(call.step, call.run.num_steps, *self.steps)
        )

    def _mask_on(self, mask: torch.Tensor, call: AttentionCall, like: torch.Tensor) -> torch.Tensor:
        """The mask on the layer's query grid, summing to 1: (HW,)."""
        key = (id(mask), call.queries)
        if key not in self._resized:
            h, w = _grid(call.queries, _latent_size(call.run))
            m = F.interpolate(mask[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
            m = m.clamp(min=0).reshape(-1)  # (HW,)
            if float(m.sum()) <= 0:  # a mask smaller than one cell of a coarse layer: its nearest cell
                m = F.interpolate(mask[None, None], size=(h, w), mode="area")[0, 0].reshape(-1)
            self._resized[key] = (m / m.sum()).to(like.device)
        return self._resized[key]

    def edit(self, call: AttentionCall, probs: torch.Tensor) -> list[int]:
        rows = []
        base = call.cond.start or 0
        for i, words in self._targets:
            r = base + i
            for pos, factor, mask in words:
                idx = torch.tensor(pos, device=probs.device)
                if mask is None:
                    probs[r, :, :, idx] *= factor  # (heads, HW, |pos|)
                else:
                    mass = probs[r, :, :, idx].sum(1, keepdim=True)  # (heads, 1, |pos|): the word's total
                    probs[r, :, :, idx] = self._mask_on(mask, call, probs)[None, :, None] * mass
            rows.append(r)
        return rows


class WordSwap(AttentionEdit):
    """Prompt-to-Prompt's word swap (replace): target images take their source images' attention.

    The call's prompts are the sources followed by as many targets (``pipe([source, target], latents=...)``,
    both with the same initial latents); each target must tokenize word for word like its source (same words
    count, same tokens per word). For the first ``cross_replace`` fraction of the steps a target image's
    cross-attention probabilities are its source's; for the first ``self_replace`` fraction its self-attention
    probabilities too, on layers of at most ``self_max_queries`` queries (P2P: 16×16). Both 0: no edit, bit for
    bit the plain batch.
    """

    conditional_only = True

    def __init__(
        self, cross_replace: float = 0.8, self_replace: float = 0.4, self_max_queries: int = 256
    ) -> None:
        self.cross_replace = check_fraction("cross_replace", cross_replace)
        self.self_replace = check_fraction("self_replace", self_replace)
        if (
            isinstance(self_max_queries, bool)
            or not isinstance(self_max_queries, int)
            or self_max_queries < 1
        ):
            raise InvalidArgumentError(
                f"self_max_queries={self_max_queries!r}: pass a positive int (P2P: 256)."
            )
        self.self_max_queries = self_max_queries
        self.needs_self_attention = self.self_replace > 0
        self._pairs: tuple[list[int], list[int]] = ([], [])

    def start(self, run: Run, pipe: Any) -> None:
        prompts, n = _prompts_of(run)
        if len(prompts) % 2:
            raise InvalidArgumentError(
                f"A word swap runs source prompts followed by as many target prompts; this call has {len(prompts)} "
                "prompt(s). Use sdexplore.edit(pipe, source, target)."
            )
        k = len(prompts) // 2
        for s, t in zip(prompts[:k], prompts[k:], strict=True):
            check_aligned(pipe, s, t)
        half = k * n
        self._pairs = (list(range(half)), list(range(half, 2 * half)))

    def active(self, call: AttentionCall) -> bool:
        fraction = self.cross_replace if call.cross else self.self_replace
        if not call.cross and call.queries > self.self_max_queries:
            return False
        return _in_fraction(call.step, call.run.num_steps, 0.0, fraction)

    def edit(self, call: AttentionCall, probs: torch.Tensor) -> list[int]:
        base = call.cond.start or 0
        src, tgt = self._pairs
        if not tgt:
            return []
        # (k, heads, HW, T): the source's maps, in the target's rows (consecutive rows: one copy, no gather)
        probs[base + tgt[0] : base + tgt[-1] + 1] = probs[base + src[0] : base + src[-1] + 1]
        return [base + t for t in tgt]


def _word(w: Any) -> str:
    if not isinstance(w, str) or not w.strip():
        raise InvalidArgumentError(
            f"{w!r} is not a word: pass words of the prompt as strings, e.g. 'circle'."
        )
    return w.strip()


def word_tokens(tokens: TokenList) -> list[tuple[str, int]]:
    """(word, number of tokens) of a prompt's words, in order."""
    return [(w, len(pos)) for w, pos in tokens.word_spans()]


def check_aligned(pipe: Any, source: str, target: str) -> None:
    """Raise :class:`InvalidArgumentError` unless ``target`` tokenizes word for word like ``source`` (the same
    number of words, each with as many tokens as its counterpart), as a word swap needs."""
    a, b = word_tokens(sequence_tokens(pipe, source)), word_tokens(sequence_tokens(pipe, target))
    if len(a) != len(b):
        raise InvalidArgumentError(
            f"A word swap needs prompts with the same number of words: {source!r} has {len(a)}, {target!r} has "
            f"{len(b)}. Swap words one for one (e.g. 'red' → 'blue')."
        )
    for (wa, na), (wb, nb) in zip(a, b, strict=True):
        if na != nb:
            raise InvalidArgumentError(
                f"{wa!r} is {na} token(s) but {wb!r}, which replaces it, is {nb}: a word swap needs words of the "
                "same token count. Pick another word or spelling."
            )


def token_alignment(pipe: Any, source: str, target: str) -> tuple[list[int], list[int]]:
    """Aligned key positions ``(source positions, target positions)`` of two prompts (Prompt-to-Prompt refine).

    The token ids of the whole key sequence (BOS, the prompt, EOS, padding) are aligned with
    :class:`difflib.SequenceMatcher` (the longest common blocks: words inserted or removed leave the rest
    aligned; substituted tokens stay unaligned, as with P2P's global alignment, whose mismatch costs more than a
    gap). Raises :class:`InvalidArgumentError` when no token of the prompts' text aligns.
    """
    a, b = sequence_tokens(pipe, source), sequence_tokens(pipe, target)
    src: list[int] = []
    tgt: list[int] = []
    matcher = difflib.SequenceMatcher(None, a.ids, b.ids, autojunk=False)
    for block in matcher.get_matching_blocks():
        src += range(block.a, block.a + block.size)
        tgt += range(block.b, block.b + block.size)
    if not any(a.kinds[i] == "text" for i in src):
        raise InvalidArgumentError(
            f"Nothing of {source!r} aligns with {target!r}: a refinement keeps the source's words and adds or "
            "removes some (e.g. 'a red circle' → 'a big red circle'); for a new scene generate it anew."
        )
    return src, tgt


class Refine(WordSwap):
    """Prompt-to-Prompt's refinement: target prompts that add or remove words keep the source's attention.

    The call's prompts are the sources followed by as many targets, as for :class:`WordSwap`, but a target may
    insert or delete words. For the first ``cross_replace`` fraction of the steps the target's cross-attention
    at every token aligned with a source token (:func:`token_alignment`) is the source's at that token; new
    tokens keep their own. Self-attention is replaced as in :class:`WordSwap`. Both fractions 0: no edit, bit
    for bit the plain batch.
    """

    def start(self, run: Run, pipe: Any) -> None:
        prompts, n = _prompts_of(run)
        if len(prompts) % 2:
            raise InvalidArgumentError(
                f"A refinement runs source prompts followed by as many target prompts; this call has "
                f"{len(prompts)} prompt(s). Use sdexplore.edit(pipe, source, target)."
            )
        k = len(prompts) // 2
        aligned = [token_alignment(pipe, s, t) for s, t in zip(prompts[:k], prompts[k:], strict=True)]
        half = k * n
        self._pairs = (list(range(half)), list(range(half, 2 * half)))
        self._aligned = [aligned[i // n] for i in range(half)]  # per target image: (source pos, target pos)

    def edit(self, call: AttentionCall, probs: torch.Tensor) -> list[int]:
        if not call.cross:
            return super().edit(call, probs)
        base = call.cond.start or 0
        for s, t, (src, tgt) in zip(self._pairs[0], self._pairs[1], self._aligned, strict=True):
            a = torch.tensor(src, device=probs.device)
            b = torch.tensor(tgt, device=probs.device)
            probs[base + t, :, :, b] = probs[base + s, :, :, a]  # (heads, HW, |aligned|)
        return [base + t for t in self._pairs[1]]


class LocalBlend(AttentionEdit):
    """Prompt-to-Prompt's local blend: keep the target image equal to the source outside the edited words.

    The call's prompts are the sources followed by as many targets (edited images). At every step the
    cross-attention of ``words`` (words of the source and/or the target prompt; each branch uses those its prompt
    has) is summed over the word's tokens, averaged over heads and over the layers of at most ``max_queries``
    queries (P2P: 16×16; on joint attention, SD3 and Flux, every block: their image→text blocks), on their
    (upsampled) common grid, and accumulated over the steps so far. From the
    ``start`` fraction of the steps on (P2P: 0.2), after each scheduler step the map of each branch is dilated
    (a 3×3 max-pool), brought to the latent size, divided by its maximum and thresholded at ``threshold``; the
    union of a source's and its target's masks is kept from the target, the rest of the target's latents is set
    to the source's (x_t = x_src + mask·(x_tgt − x_src), exactly the source outside the mask). It reads the
    probabilities before other edits change them and leaves every attention output as it is. ``masks`` holds
    the last mask applied, (B, h, w) booleans, for inspection.
    """

    reads_first = True
    conditional_only = True

    def __init__(
        self, words: Sequence[str], *, threshold: float = 0.3, start: float = 0.2, max_queries: int = 256
    ) -> None:
        if isinstance(words, str) or not isinstance(words, Sequence) or not words:
            raise InvalidArgumentError(
                f"blend={words!r}: pass a list of words of the source or target prompt, e.g. ['circle']."
            )
        self.words = [_word(w) for w in words]
        self.threshold = check_fraction("blend threshold", threshold)
        self.start_fraction = check_fraction("blend start", start)
        if isinstance(max_queries, bool) or not isinstance(max_queries, int) or max_queries < 1:
            raise InvalidArgumentError(f"max_queries={max_queries!r}: pass a positive int (P2P: 256).")
        self.max_queries = max_queries
        self.masks: torch.Tensor | None = None
        self._positions: list[list[int]] = []
        self._half = 0
        self._sum: torch.Tensor | None = None  # (2·half, h, w) the words' maps, summed over layers and steps
        self._grid: tuple[int, int] | None = None
        self._every_layer = False  # joint attention (SD3, Flux): one token grid, every block read

    def bind(self, pipe: Any, family: Family, layers: list[str]) -> None:
        self._every_layer = family.denoiser == "transformer"

    def check(self, pipe: Any, source: str, target: str) -> None:
        """Raise :class:`WordNotFoundError` for a blend word in neither prompt (before any work)."""
        self._word_positions(pipe, source, target)

    def _word_positions(self, pipe: Any, source: str, target: str) -> tuple[list[int], list[int]]:
        out: tuple[list[int], list[int]] = ([], [])
        for w in self.words:
            found = False
            for j, prompt in enumerate((source, target)):
                try:
                    out[j].extend(sequence_tokens(pipe, prompt).positions(w))
                    found = True
                except WordNotFoundError:
                    pass
            if not found:
                raise WordNotFoundError(
                    f"The blend word {w!r} is in neither {source!r} nor {target!r}: blend words name what the "
                    "edit changes, in the source or the target prompt."
                )
        return sorted(set(out[0])), sorted(set(out[1]))

    def start(self, run: Run, pipe: Any) -> None:
        prompts, n = _prompts_of(run)
        if len(prompts) % 2:
            raise InvalidArgumentError(
                f"A local blend runs source prompts followed by as many edited prompts; this call has "
                f"{len(prompts)} prompt(s). Use sdexplore.edit(pipe, source, target, blend=[...])."
            )
        k = len(prompts) // 2
        pairs = [self._word_positions(pipe, s, t) for s, t in zip(prompts[:k], prompts[k:], strict=True)]
        self._half = k * n
        self._positions = [pairs[i // n][0] for i in range(self._half)]
        self._positions += [pairs[i // n][1] for i in range(self._half)]
        self._sum, self._grid, self.masks = None, None, None

    def active(self, call: AttentionCall) -> bool:
        return call.cross and (self._every_layer or call.queries <= self.max_queries)

    def edit(self, call: AttentionCall, probs: torch.Tensor) -> list[int]:
        latent = _latent_size(call.run)
        h, w = _grid(call.queries, latent)
        if self._grid is None and self._every_layer:  # joint attention: the blocks' one token grid
            self._grid = (h, w)
        elif self._grid is None:  # the finest grid among the layers read: the latent halved until it fits
            H, W = latent
            k = 0
            while math.ceil(H / 2**k) * math.ceil(W / 2**k) > self.max_queries:
                k += 1
            self._grid = (math.ceil(H / 2**k), math.ceil(W / 2**k))
        base = call.cond.start or 0
        maps = torch.stack(
            [probs[base + r][:, :, pos].sum(-1).mean(0) for r, pos in enumerate(self._positions)]
        )  # (2·half, HW): the words' tokens summed, heads averaged
        maps = maps.reshape(-1, 1, h, w)  # (2·half, 1, h, w)
        if (h, w) != self._grid:
            maps = F.interpolate(maps, size=self._grid, mode="bilinear", align_corners=False)
        maps = maps[:, 0]  # (2·half, gh, gw), on the device: no sync per layer
        self._sum = maps if self._sum is None else self._sum + maps
        return []  # reads only: every output stays the original's

    def step(self, step: Step, latents: torch.Tensor) -> torch.Tensor | None:
        if self._sum is None or not _in_fraction(step.index, step.run.num_steps, self.start_fraction, 1.0):
            return None
        maps = F.max_pool2d(self._sum[:, None], 3, stride=1, padding=1)  # (2·half, 1, gh, gw): dilated
        maps = F.interpolate(maps, size=tuple(latents.shape[-2:]), mode="nearest")[:, 0]  # (2·half, H, W)
        peak = maps.flatten(1).amax(1).clamp(min=torch.finfo(maps.dtype).tiny)[:, None, None]
        masks = (maps / peak) > self.threshold  # (2·half, H, W)
        half = self._half
        keep = (masks[:half] | masks[half:]).to(latents.device)  # (half, H, W): source's or target's words
        self.masks = keep
        out = latents.clone()
        src, tgt = latents[:half], latents[half:]
        out[half:] = torch.where(keep[:, None], tgt, src)  # (half, C, H, W): the source's outside the mask
        return out


class Inject(AttentionEdit):
    """Stable Flow's attention injection (Avrahami et al., 2025, "Stable Flow: Vital Layers for Training-Free Image
    Editing"): the target images attend to their source images' features.

    The call's prompts are the sources followed by as many targets, as for :class:`WordSwap`. In the chosen
    ``layers``, during the ``steps`` (start, end) fraction of the steps, each target image's image-token keys and
    values in the joint attention (the image part of K and V) are its source image's; its queries and its text
    tokens' keys and values stay its own. So the target's image tokens (and text tokens) read the source image
    where they would read their own, and the edit keeps the source's look where the layers chosen carry it.

    ``layers``: the joint-attention layers, as indices into :func:`~sdexplore.record.joint.joint_attention_layers`'s
    order (SD3: its joint blocks; Flux.1 / Flux.2: the double-stream blocks, then the single-stream ones: Stable
    Flow's numbering) or module names (``"single_transformer_blocks.3.attn"``); None: every layer. Which layers
    are "vital" is a property of the model, to be measured, not assumed. Runs on SD3, Flux.1 and Flux.2 (on SD3
    under CFG both halves of the batch are injected: the target's unconditional prediction follows the source's
    too; Flux's true CFG: its negative-prompt call too). No layers or an empty step range is no edit at all: the
    plain image bit for bit.
    """

    unconditional = True
    reads_probs = False

    def __init__(
        self, layers: Sequence[int | str] | None = None, steps: Sequence[float] = (0.0, 1.0)
    ) -> None:
        if layers is not None and (
            isinstance(layers, (str, bytes))
            or not isinstance(layers, Sequence)
            or not all(
                (isinstance(x, int) and not isinstance(x, bool) and x >= 0)
                or (isinstance(x, str) and x.strip())
                for x in layers
            )
        ):
            raise InvalidArgumentError(
                f"layers={layers!r}: pass a list of joint-attention layer indices (0-based, e.g. [0, 1, 17]) or "
                "module names, or None for every layer."
            )
        self.layers = None if layers is None else list(layers)
        self.steps = _fractions("steps", steps)
        self._names: set[str] = set()
        self._half = 0

    @property
    def identity(self) -> bool:
        """True when the edit injects nothing (no layer, or no step)."""
        a, b = self.steps
        return self.layers == [] or a >= b

    def bind(self, pipe: Any, family: Family, layers: list[str]) -> None:
        family.require(
            "inject",
            "Inject",
            why="it replaces image keys and values in joint attention, which this family has not",
            hint="On SD 1.x/2.x/XL use WordSwap's self_replace (self-attention maps).",
        )
        if self.layers is None:
            self._names = set(layers)
            return
        names = set()
        for x in self.layers:
            if isinstance(x, int):
                if x >= len(layers):
                    raise InvalidArgumentError(
                        f"Inject layer {x}: {family.label}'s denoiser has {len(layers)} joint-attention layers "
                        f"(indices 0 to {len(layers) - 1})."
                    )
                names.add(layers[x])
                continue
            name = x.strip().removesuffix(".processor")
            if name not in layers:
                raise InvalidArgumentError(
                    f"Inject layer {x!r} is not a joint-attention layer of this {family.label} denoiser; its layers "
                    f"are {layers[0]!r} ... {layers[-1]!r} (or pass indices 0 to {len(layers) - 1})."
                )
            names.add(name)
        self._names = names

    def start(self, run: Run, pipe: Any) -> None:
        prompts, n = _prompts_of(run)
        if len(prompts) % 2:
            raise InvalidArgumentError(
                f"An injection runs source prompts followed by as many target prompts; this call has {len(prompts)} "
                "prompt(s). Pass [source, target] (the same initial latents for both)."
            )
        self._half = len(prompts) // 2 * n

    def active(self, call: AttentionCall) -> bool:
        return (
            not self.identity
            and call.layer in self._names
            and self._half > 0
            and _in_fraction(call.step, call.run.num_steps, *self.steps)
        )

    def edit(self, call: AttentionCall, probs: torch.Tensor) -> list[int]:
        return []  # the probabilities are left alone: the injection is in the keys and values

    def inject(self, call: AttentionCall) -> list[tuple[int, int]]:
        half = self._half
        bases = [0] if call.cond == slice(None) else [0, call.rows // 2]  # CFG batch: both halves
        return [(b + half + i, b + i) for b in bases for i in range(half)]


class Control:
    """Context manager: apply attention edits to the pipeline calls made in the ``with`` block.

    ::

        with sdexplore.Control(pipe, sdexplore.Reweight({"circle": 0.0})):
            image = pipe("a big red circle at the top left, blue background").images[0]

    The edits apply in the order given (a :class:`LocalBlend` reads first; a :class:`WordSwap`, then a :class:`Reweight` of the target images, is
    P2P's reweighting of an edit). An ``observe(pipe, attention=True)`` block around or inside it records the
    edited probabilities. The pipeline is restored exactly on exit, also after an exception or
    KeyboardInterrupt. SD 1.x, 2.x, XL, SD3, Flux.1 and Flux.2 (their joint attention; :class:`Inject` there only).
    """

    def __init__(self, pipe: Any, *edits: AttentionEdit) -> None:
        self.family = check_controllable(pipe)
        if not edits or not all(isinstance(e, AttentionEdit) for e in edits):
            raise InvalidArgumentError(
                f"Control(pipe, *edits) takes one or more edits (WordSwap, Refine, Reweight, LocalBlend, Inject), "
                f"got {edits!r}."
            )
        self.pipe = pipe
        self.edits = list(edits)
        den = self.family.get_denoiser(pipe)
        self._attach: attach | None = None
        if self.family.denoiser == "transformer":  # SD3, Flux: the joint blocks, image-query × text-key block
            self.layers = _joint_layers(self.family, den)
        else:
            cross = [n.removesuffix(".processor") for n in self.family.cross_attention_layers(den)]
            selfs = []
            if any(e.needs_self_attention for e in self.edits):
                selfs = [c.removesuffix("attn2") + "attn1" for c in cross]
                selfs = [s for s in selfs if _has_module(den, s)]
            self.layers = cross + selfs
        for e in self.edits:
            e.bind(pipe, self.family, self.layers)

    def __enter__(self) -> Control:
        if self._attach is not None:
            raise RecorderStateError("This Control is already active; leave its `with` block first.")
        existing = attachment_of(self.pipe)
        if existing is not None:
            existing.check_free("control")
        check_attachable(self.pipe, self.family)
        sub = Subscriber(
            kind="control",
            order=0,
            run_start=self._run_start,
            step=self._step if any(type(e).step is not AttentionEdit.step for e in self.edits) else None,
            control=ControlTap(self.layers, self._active, self._edit, self._inject, self._reads, self._rows),
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
        for e in self.edits:
            e.start(run, self.pipe)

    def _acting(self, call: AttentionCall) -> list[AttentionEdit]:
        """The edits that act on ``call`` (Flux true CFG's negative-prompt call: those that act unconditionally)."""
        return [e for e in self.edits if (e.unconditional or not call.uncond) and e.active(call)]

    def _active(self, call: AttentionCall) -> bool:
        return bool(self._acting(call))

    def _edit(self, call: AttentionCall, probs: torch.Tensor) -> list[int]:
        rows: set[int] = set()
        # readers see the probabilities unedited
        for e in sorted(self._acting(call), key=lambda e: not e.reads_first):
            rows.update(e.edit(call, probs))
        return sorted(rows)

    def _reads(self, call: AttentionCall) -> bool:
        return any(e.reads_probs for e in self._acting(call))

    def _rows(self, call: AttentionCall) -> slice | None:
        """The rows whose probabilities the acting edits read or edit: the conditional ones where every such
        edit keeps to them, else None (every row)."""
        readers = [e for e in self._acting(call) if e.reads_probs]
        return call.cond if all(e.conditional_only for e in readers) else None

    def _inject(self, call: AttentionCall) -> list[tuple[int, int]]:
        pairs: list[tuple[int, int]] = []
        for e in self._acting(call):
            pairs += e.inject(call)
        return pairs

    def _step(self, step: Step) -> torch.Tensor | None:
        latents = step.prev_sample
        for e in self.edits:
            new = e.step(step, latents)
            if new is not None:
                latents = new
        return None if latents is step.prev_sample else latents


def _joint_layers(family: Family, denoiser: torch.nn.Module) -> list[str]:
    """Module names of an MMDiT denoiser's joint-attention layers (SD3's joint blocks; Flux's double-stream, then
    single-stream blocks), refusing a processor the control cannot reproduce."""
    from .joint import joint_attention_layers, reproducible

    layers = []
    for name, layout in joint_attention_layers(denoiser):
        proc = denoiser.get_submodule(name.removesuffix(".processor")).processor
        if not reproducible(layout, proc):
            default = "JointAttnProcessor2_0" if layout == "image-text" else "Flux attention processors"
            raise UnsupportedPipelineError(
                f"{family.label}'s layer {name} runs {type(proc).__name__}, which an attention control cannot "
                f"reproduce: give its joint blocks diffusers' default {default} back (Flux: with the native "
                "attention backend, transformer.set_attention_backend('native')) before editing."
            )
        layers.append(name.removesuffix(".processor"))
    return layers


def _has_module(module: torch.nn.Module, name: str) -> bool:
    try:
        return hasattr(module.get_submodule(name), "set_processor")
    except AttributeError:
        return False
