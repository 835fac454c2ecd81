"""AttentionRecorder: capture cross-attention maps per token while the pipeline runs.

The recorder patches nothing: it asks the pipeline's attachment (:mod:`sdexplore.record.attach`) to swap a
capturing processor onto the chosen cross-attention layers, and hears from it when a run starts (the call's
prompt labels the keys), before each denoiser call (a step boundary, the CFG layout) and when the run ends.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from ..errors import InvalidArgumentError, RecorderStateError, UnsupportedPipelineError
from ..families import FAMILIES, detect_family, spatial_patch, vae_scale_factor
from ..heatmaps import resize
from ..results.attention_maps import AttentionMaps
from . import budget, relations
from .attach import AttentionTap, Run, Subscriber, attach, attachment_of, check_attachable
from .budget import Plan
from .concept_stream import ConceptStream, concept_masses
from .joint import (
    CAPTURING_JOINT,
    JOINT_KINDS,
    FluxCapturingProcessor,
    joint_attention_layers,
    output_scores,
    query_bias,
    text_block,
)
from .joint import (
    reproducible as joint_reproducible,
)
from .processor import AttnProcessor2_0, CapturingAttnProcessor, is_reproducible
from .provenance import call_provenance
from .tokens import TokenList, padded_to, sequence_tokens, unlabelled
from .wan import WanCapturingProcessor
from .wan import reproducible as wan_reproducible

LayerFilter = str | Sequence[str] | Callable[[str], bool] | None
#: Queries waiting for their probabilities are turned into maps once this many bytes of them wait (and at the
#: end of the run): many steps in one batch where they are small, a few layers at a time at SD 1.5's 64×64
#: (bounded so that queue + probabilities + sums stay well under 100 MiB of accelerator memory at SD 1.5 512²).
QUEUE_BYTES = 8 << 20
#: The largest probability tensor one batch computes at once (bytes, float32): large on an accelerator (fewer
#: kernels), cache-sized on a CPU (measured on the tiny fixture: 1 MiB batches flush a run in 5.2 ms, 64 MiB
#: ones in 11.7 ms).
PROBS_BYTES = 32 << 20
PROBS_BYTES_CPU = 1 << 20
#: Resized maps held at once while the layers' mean is built at the latent size (a run of layers at a time).
RESIZE_BYTES = 32 << 20
# the attributes that hold one run's state (set aside when a run ends, built into maps when first read)
_RUN_STATE = (
    "_edited",
    "_plan",
    "_timesteps",
    "_latent_size",
    "_frames",
    "_sel",
    "_split",
    "_layer_hw",
    "_hw_cache",
    "_groups",
    "_queue",
    "_joint_queue",
    "_queued_bytes",
    "_probs",
    "_steps",
    "_num_keys",
    "_scales_seen",
    "_first_step_checked",
    "_passed",
    "_rows",
    "_prompt_rows",
    "_provenance",
    "_concept_keys",
    "_qmasks",
    "_qweights",
)


class AttentionRecorder:
    """Record cross-attention maps per token of every pipeline call made inside the ``with`` block.

    ::

        with AttentionRecorder(pipe) as rec:
            image = pipe("a big red circle on a blue background").images[0]
        rec.maps.word("circle")            # (64, 64) for SD 1.5 at 512², raw attention mass

    Only the cross-attention layers get a capturing processor (self-attention keeps its fast kernel); the
    previous processor objects are restored on exit, also after an exception or KeyboardInterrupt. Maps are reduced on the device as the run goes: conditional half of
    the CFG batch, mean over heads, per-step maps at ``step_resolution``, a running per-layer sum; nothing is
    copied to the host until the maps are read, so there is no synchronisation per layer.

    Keys are labelled with ``pipe.tokenizer``'s tokens of ``prompt`` (for SDXL too: its two tokenizers give the
    same ids for the same text, only the padding differs). A run is one top-level ``pipe(...)`` call: calls to
    ``pipe.encode_prompt`` or :func:`sdexplore.inspect_prompt` in the block never reset it. Several calls in one
    block: ``maps`` holds the latest. After a :class:`~sdexplore.record.steering.PromptSwitch` the keys of the later steps
    belong to the switched prompt; the labels stay those of the call's prompt.

    Args:
        pipe: a Stable Diffusion 1.x / 2.x / XL pipeline.
        layers: restrict capture to cross-attention layers whose name contains this substring (or any of these
            substrings), or for which this callable returns True; e.g. ``"up_blocks"``. Default: all.
        scales: keep only layers at these downsampling factors of the latent (1 = full latent resolution, 2 =
            half, ...; SD 1.5 at 512²: 1 → 64×64, 4 → 16×16). Other layers run their original processor. A run
            in which no layer is at these scales stops after its first step with an error naming the scales
            there are.
        step_resolution: size of the per-step maps (for timestep scrubbing): an int caps the longer side (the
            latent's aspect ratio is kept, never above the latent size), a ``(h, w)`` pair is exact, ``None``
            records no per-step maps. Default 16.
        per_head: also keep per-layer maps per head (``maps.layer_heads``), not just the head mean.
        negative: also record the negative / unconditional half of the CFG batch (``maps.negative``).
        keep_probs: keep every probability tensor (``maps.probs``), in the pipeline's dtype. Costly: SD 1.5,
            512², 50 steps, one image: 16 layers × 8 heads × 26,944 queries × 77 keys × 50 steps × 2 bytes ≈
            1.7 GB for the conditional half (3.3 GB with ``negative=True``), held on the device until read.
        kind: what the maps hold. UNet models: ``"cross"`` (the only kind). MMDiT models (SD3, Flux): ``"joint"``
            (default: the image-query × text-key block of the joint softmax, normalised over text *and* image
            keys, from the fused kernel's own log-sum-exp), ``"text"`` (softmax over the text keys only) or
            ``"output"`` (ConceptAttention's attention-output maps). Recorded as ``maps.kind``. ``"output"`` maps need a
            large model: on the embedded tiny-shapes-mmdit they sit on the background (use ``"joint"``).
        concepts: words or short phrases that are *not* in the prompt, to map anyway (``maps.concept("sky")``).
            Each is encoded alone by the pipeline's own text encoder(s). UNet models: each layer's key projection
            gives its words' keys; MMDiT models: its word tokens run through every block's text path beside the
            prompt's (ConceptAttention's concept tokens: they read the image, nothing reads them), giving each
            layer's concept keys and outputs. The run's own queries are scored against them, each concept offered
            beside the prompt's keys (``kind="output"``: its outputs beside the prompt's words). The image and
            the prompt's maps are unchanged. UNet models need diffusers' default attention processor; MMDiT
            models need every layer (no ``layers=``/``scales=``). A model whose text encoder only saw full prompts
            (the embedded tiny-shapes model) gives single-word keys little meaning.
        max_bytes: a bound on the bytes of every map the call stores (``maps.nbytes``, both halves with
            ``negative``). Worked out before the denoising loop from the denoiser's structure: if the full
            recording is larger, the per-step maps get a coarser resolution (while they take more than half of the
            room), then layers are kept from the coarsest grid up while they fit; a ``UserWarning`` and
            :attr:`budget` say what was left out. :class:`~sdexplore.errors.MemoryBudgetError` if even the
            aggregate map and one layer exceed it. Without it, a recording larger than the memory free on the
            denoiser's device (or, on the CPU, twice that: sums and the host copy) is refused before the loop with
            the same error, naming this option.
        relation: which block of the attention to keep, ``"queries->keys"`` (:mod:`sdexplore.record.relations`):
            ``"image->text"`` (default, the per-token maps), ``"image->image"`` (self-attention: UNets' and
            PixArt-Σ's ``attn1``, MMDiT's image block of the joint softmax; one map over the image keys per selected
            query, ``maps.query(i)``), ``"text->image"`` and ``"text->text"`` (MMDiT only: each text token's row of
            the joint softmax over the image keys, or over the text keys as a ``(1, T)`` map; ``maps.word``).
            Recorded as ``maps.relation``; cross-attention models refuse the text-query relations (text is never a
            query there).
        queries: image→image only, and required there: a list of ``(y, x)`` latent cells (``maps.aggregate``'s
            grid) and/or boolean ``(H, W)`` masks of the latent grid; each is one map (a mask: the mean over its
            pixels' rows). Only these rows are computed and kept, never the ``(HW)²`` matrix.
        heads: ``"mean"`` (every head) or a list of head indices: the maps average those heads only (and
            ``per_head``/``keep_probs`` keep only those). Checked against every recorded layer before the loop.
    """

    def __init__(
        self,
        pipe: Any,
        *,
        layers: LayerFilter = None,
        scales: Collection[int] | None = None,
        step_resolution: int | tuple[int, int] | None = 16,
        per_head: bool = False,
        negative: bool = False,
        keep_probs: bool = False,
        kind: str | None = None,
        concepts: Sequence[str] = (),
        max_bytes: int | None = None,
        relation: str = "image->text",
        queries: Any = None,
        heads: Any = "mean",
    ) -> None:
        self.pipe = pipe
        #: What is kept of the attention: the relation, the image queries and the heads (checked here, before any run).
        self.selection = relations.parse(relation, queries, heads)
        #: Which block of the attention the maps hold (``"image->text"``, ``"image->image"``, ``"text->image"``,
        #: ``"text->text"``; :mod:`sdexplore.record.relations`).
        self.relation = self.selection.relation
        if max_bytes is not None and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1
        ):
            raise InvalidArgumentError(
                f"max_bytes={max_bytes!r}: give the bound on the stored maps as a whole number of bytes ≥ 1, e.g. "
                "300 * 2**20, or None for no bound."
            )
        #: The bound on the stored maps' bytes (None: the machine's free memory is the only bound).
        self.max_bytes = max_bytes
        self.family = detect_family(pipe)
        if not self.family.can("attention"):
            able = ", ".join(f.label for f in FAMILIES.values() if f.can("attention"))
            raise UnsupportedPipelineError(
                f"sdexplore cannot record {self.family.label}'s attention yet: attention maps work on {able}. "
                "Record its steps with sdexplore.observe(pipe, steps=True)."
            )
        unet = getattr(pipe, self.family.denoiser, None)
        # the class: the property walks every module (Z-Image's transformer has none: its layers are read below)
        if unet is None or not (
            hasattr(type(unet), "attn_processors") or type(unet).__name__.startswith("ZImage")
        ):
            raise UnsupportedPipelineError(
                f"{type(pipe).__name__} has no {self.family.denoiser} with attention processors; attention maps "
                "need one."
            )
        # cross-attention transformers (PixArt-Σ, Sana, Wan) have attn2 layers only: no module walk for joint ones
        mmdit = self.family.denoiser == "transformer" and not self.family.cross_attention
        joint = dict(joint_attention_layers(unet)) if mmdit else {}
        #: Processor name → layout of each MMDiT attention layer (empty for UNet models).
        self._layouts: dict[str, str] = joint
        if joint:
            kind = "joint" if kind is None else kind
            if kind not in JOINT_KINDS:
                raise InvalidArgumentError(
                    f"kind={kind!r} is not a kind of MMDiT attention map; use one of {', '.join(JOINT_KINDS)} "
                    "('joint': softmax over text and image keys, 'text': over the text keys only, 'output': "
                    "ConceptAttention's attention-output maps)."
                )
        elif kind not in (None, "cross"):
            raise InvalidArgumentError(
                f"kind={kind!r}: a UNet model has cross-attention maps only (kind='cross'); the kinds "
                f"{', '.join(JOINT_KINDS)} are for MMDiT models (SD3, Flux)."
            )
        #: What the recorded maps are: "cross" (UNet) or one of "joint", "text", "output" (MMDiT).
        self.kind = kind or "cross"
        self._check_relation(joint, concepts)
        if self.selection.heads is not None and (concepts or self.kind == "output"):
            raise InvalidArgumentError(
                "heads= picks attention heads to average; concept maps and kind='output' maps are not per head. "
                "Leave heads out, or record without concepts= / kind='output'."
            )
        if self.relation == "image->image" and not joint:  # self-attention: the attn1 layers
            cross = relations.self_attention_layers(unet)
        else:
            cross = list(joint) if joint else self.family.cross_attention_layers(unet)
        if not cross:
            raise UnsupportedPipelineError(
                f"No cross-attention layers found in {type(unet).__name__}: this UNet is not text-conditioned "
                "through cross-attention, so there are no per-token maps to record."
            )
        self._selected = _select_layers(cross, layers)
        if isinstance(concepts, str) or not all(isinstance(c, str) and c.strip() for c in concepts):
            raise InvalidArgumentError(
                f"concepts={concepts!r}: pass a list of words or short phrases, e.g. ['sky', 'grass']."
            )
        #: Words whose maps are recorded although they are not in the prompt (see :meth:`AttentionMaps.concept`).
        self.concepts = list(dict.fromkeys(c.strip() for c in concepts))
        if self.concepts:
            self.family.require(
                "concepts",
                "concept maps (concepts=)",
                why="sdexplore does not carry concept tokens through its denoiser's blocks yet",
                hint="Record its attention maps without concepts=.",
            )
        if self.concepts and joint and (layers is not None or scales is not None):
            raise InvalidArgumentError(
                "Concept maps on an MMDiT model run the concepts through every block, so they need every layer: "
                "leave layers= and scales= out (filter the maps afterwards with maps.concept(..., layer=...))."
            )
        self._concept_text: tuple[torch.Tensor, list[list[int]]] | None = None  # encoded once per block
        #: Module names of the selected cross-attention layers.
        self.layer_names = [n.removesuffix(".processor") for n in self._selected]
        if scales is not None:
            scales = {int(s) for s in scales}
            if not scales or any(s < 1 or s & (s - 1) for s in scales):
                raise InvalidArgumentError(
                    f"scales must be powers of two ≥ 1 (1 = latent resolution), got {sorted(scales)}."
                )
        self.scales = scales
        if step_resolution is not None:
            sr = (
                (step_resolution, step_resolution)
                if isinstance(step_resolution, int)
                else tuple(step_resolution)
            )
            if len(sr) != 2 or min(sr) < 1:
                raise InvalidArgumentError(
                    f"step_resolution must be a positive int, a (h, w) pair or None; got {step_resolution!r}."
                )
        self.step_resolution = step_resolution
        self.per_head = bool(per_head)
        self.negative = bool(negative)
        if self.negative and not self.family.cfg_batch:
            raise InvalidArgumentError(
                f"negative=True records the unconditional half of a CFG batch; {self.family.label} has none (its "
                "true CFG runs the negative prompt as a separate call, which is not recorded). Leave it False."
            )
        self.keep_probs = bool(keep_probs)
        #: Module names of selected cross-attention layers left untouched (their processor is not plain attention).
        self.skipped_layers: list[str] = []
        self._attach: attach | None = None
        self._pending: dict[str, Any] | None = None  # an ended run's state, built into maps when first read
        self._entered_once = False
        self._maps: AttentionMaps | None = None
        self._why_no_maps: str | None = None
        self._last_plan: Plan | None = None
        self._prompt_rows: tuple[list[TokenList], list[TokenList]] | None = None
        # the current call's model, seed, ... (sdexplore.record.provenance)
        self._provenance: dict[str, Any] = {}
        self._reset_run()

    # ---- context manager ----------------------------------------------------------------------------------
    def _check_relation(self, joint: dict[str, str], concepts: Sequence[str]) -> None:
        """Refuse a relation this family's attention does not have, before any run."""
        rel = self.relation
        if rel == "image->text":
            return
        if self.family.video:
            raise InvalidArgumentError(
                f"relation={rel!r} is recorded for image families; {self.family.label}'s maps are image→text per "
                "frame. Leave relation out."
            )
        if concepts:
            raise InvalidArgumentError(
                f"Concept maps are image→text maps; relation={rel!r} records another block. Record them apart."
            )
        if not joint and rel in relations.TEXT_QUERIES:
            able = ", ".join(
                f.label
                for f in FAMILIES.values()
                if f.can("attention")
                and f.denoiser == "transformer"
                and not f.cross_attention
                and not f.video
            )
            raise InvalidArgumentError(
                f"relation={rel!r} needs text queries, and {self.family.label} attends to text by cross-attention, "
                "where text tokens are only keys and values (no text query ever attends). Text→image and "
                f"text→text exist in joint (MMDiT) attention: {able}. On this model record 'image->text' or "
                "'image->image'."
            )
        if joint and self.kind != "joint":
            raise InvalidArgumentError(
                f"relation={rel!r} records a block of the joint softmax as the model weighs it: kind='joint' (the "
                f"default), not kind={self.kind!r}."
            )
        odd = sorted({v for v in joint.values() if v not in ("image-text", "text-image", "single")})
        if odd:
            raise InvalidArgumentError(
                f"relation={rel!r} is not recorded on {self.family.label} yet (its joint attention's layout: "
                f"{', '.join(odd)}); it works on SD3, Flux.1, Flux.2 and Chroma. Record 'image->text' here."
            )

    # ---- context manager ----------------------------------------------------------------------------------
    def __enter__(self) -> AttentionRecorder:
        if self._attach is not None:
            raise RecorderStateError(
                "This AttentionRecorder is already active; leave its `with` block first."
            )
        existing = attachment_of(self.pipe)
        if existing is not None:
            existing.check_free("attention")
        check_attachable(self.pipe, self.family)
        den = self.family.get_denoiser(self.pipe)
        procs = {n: den.get_submodule(n.removesuffix(".processor")).processor for n in self._selected}
        leftover = (CapturingAttnProcessor, relations.SelfCapturingProcessor, *CAPTURING_JOINT.values())
        if any(isinstance(p, leftover) for p in procs.values()):
            raise RecorderStateError(
                "This pipeline still carries sdexplore capturing processors from a recorder that was never exited "
                "(a `with` block left by a crashed kernel?). Leave that block, or rebuild the pipeline."
            )
        capture = [n for n in self._selected if self._reproducible(n, procs[n])]
        skipped = [n for n in self._selected if not self._reproducible(n, procs[n])]
        self.skipped_layers = [n.removesuffix(".processor") for n in skipped]
        if not capture:
            kinds = sorted({type(procs[n]).__name__ for n in self._selected})
            linear = any("Linear" in k for k in kinds)
            raise UnsupportedPipelineError(
                f"Cannot capture attention: every selected attention layer uses a processor sdexplore cannot "
                f"reproduce exactly ({', '.join(kinds)}). "
                + (
                    "Its self-attention is linear: there are no softmax probabilities, so no image→image maps. "
                    if linear and self.relation == "image->image"
                    else ""
                )
                + self._reset_hint()
            )
        if self.concepts and any(
            type(procs[n]) is not AttnProcessor2_0 for n in capture if n not in self._layouts
        ):
            kinds = sorted({type(procs[n]).__name__ for n in capture})
            raise UnsupportedPipelineError(
                f"Concept maps need diffusers' default attention processor (AttnProcessor2_0) on the captured "
                f"layers; these use {', '.join(kinds)}. {self._reset_hint()} Or record without concepts=."
            )
        self._concept_text = None
        #: MMDiT layer → (its block, single-stream?), for the concept stream
        self._blocks = {
            n.removesuffix(".processor"): (
                den.get_submodule(n.removesuffix(".processor").rpartition(".")[0]),
                self._layouts[n] == "single",
            )
            for n in capture
            if n in self._layouts
        }
        if self.skipped_layers:
            kinds = sorted({type(procs[n]).__name__ for n in skipped})
            warnings.warn(
                f"AttentionRecorder left {len(self.skipped_layers)} cross-attention layer(s) untouched because "
                f"their processor ({', '.join(kinds)}) is not plain attention; maps cover the other "
                f"{len(capture)} layer(s). See recorder.skipped_layers.",
                stacklevel=2,
            )

        def capturing(proc_name: str) -> Callable[[Any], Any]:
            name = proc_name.removesuffix(".processor")  # the recorder keys everything by module name
            if proc_name in self._layouts:
                cls = CAPTURING_JOINT[self._layouts[proc_name]]
                need_lse = self.kind == "joint"
                if issubclass(cls, FluxCapturingProcessor):  # Flux, Z-Image: the text length
                    return lambda original: cls(
                        name, original, self._joint_sink, self._joint_gate, need_lse, self._text_len
                    )
                return lambda original: cls(name, original, self._joint_sink, self._joint_gate, need_lse)
            if self.relation == "image->image":  # a UNet's (or PixArt-Σ's) self-attention layer
                return lambda original: relations.SelfCapturingProcessor(
                    name, original, self._gate, self._relate
                )
            if wan_reproducible(procs[proc_name]):  # Wan: every frame's image tokens attend to the text
                return lambda original: WanCapturingProcessor(name, original, self._gate, self._defer)
            return lambda original: CapturingAttnProcessor(
                name, original, self._sink, self._gate, self._defer
            )

        sub = Subscriber(
            kind="attention",
            run_start=self._run_start,
            run_end=self._run_end,
            denoiser_pre=self._denoiser_pre,
            attention=AttentionTap({name: capturing(name) for name in capture}),
        )
        ctx = attach(self.pipe, sub, self.family)
        ctx.__enter__()
        self._attach = ctx
        self._captured = capture
        self._maps, self._why_no_maps = None, None
        self._pending = None
        self._prompt_rows = None
        self._reset_run()
        self._entered_once = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        ctx, self._attach = self._attach, None
        try:
            if ctx is not None:
                ctx.__exit__(exc_type, exc, tb)
        finally:
            try:
                self._build_pending()  # the block's last run, built now: after the block nothing waits on it
            except Exception:
                if exc_type is None:
                    raise  # never mask the block's own exception
            self._reset_run()

    def _reset_hint(self) -> str:
        """How to give the denoiser processors sdexplore reproduces (named for this family's denoiser)."""
        den = f"pipe.{self.family.denoiser}"
        if self._layouts:  # MMDiT: diffusers' own processors, through the native SDPA backend
            return (
                f"Give {den} diffusers' default processors back (this discards what the others do) and, for "
                f"Flux, the native attention backend: {den}.set_attention_backend('native')."
            )
        return f"Reset them with {den}.set_default_attn_processor() (this discards what those processors do)."

    def _reproducible(self, proc_name: str, processor: Any) -> bool:
        layout = self._layouts.get(proc_name)
        if (
            layout is None and self.relation == "image->image"
        ):  # self-attention: diffusers' SDPA processor only
            return type(processor) is AttnProcessor2_0
        if layout is None:
            return is_reproducible(processor) or wan_reproducible(processor)
        return joint_reproducible(layout, processor)

    @property
    def _inside(self) -> bool:
        return self._attach is not None

    # ---- results ------------------------------------------------------------------------------------------
    @property
    def maps(self) -> AttentionMaps:
        """The maps of the last pipeline call made in the ``with`` block (readable inside it, during or after a
        call)."""
        if self._inside and self._timesteps:
            return self._build()  # a run in progress: its maps so far
        self._build_pending(raise_errors=True)
        if self._maps is None:
            if not self._entered_once:
                raise RecorderStateError(
                    "Nothing recorded yet: use `with AttentionRecorder(pipe) as rec:` and call pipe(...) inside."
                )
            raise RecorderStateError(
                self._why_no_maps
                or "No denoising step was recorded: call the pipeline inside the `with` block."
            )
        return self._maps

    # ---- run state ----------------------------------------------------------------------------------------
    def _reset_run(self) -> None:
        self._plan: Plan | None = None  # this call's capture, worked out at its first denoiser call
        self._edited = False  # a control changed this run's cross-attention (Run.attention_edited)
        self._timesteps: list[float] = []  # one per denoiser call, from the host copy of the schedule
        self._latent_size: tuple[int, int] | None = None
        # a video's frames F along the denoiser's tokens (latent frames / the time patch): maps (..., F, h, w); None
        # for an image
        self._frames: int | None = None
        self._sel = slice(None)
        self._split: tuple[slice, slice] | None = None  # (uncond, cond) rows when both halves are kept
        # a layer's query grid: (h, w), or (F, h, w) for a video
        self._layer_hw: dict[str, tuple[int, ...]] = {}
        self._hw_cache: dict[tuple[int, int, int], tuple[int, int] | None] = {}
        # per tuple of layers filed together: [head sums summed over steps (n, B', HW, T), steps, per-head sums
        # (n, B', heads, HW, T) or None, head count]
        self._groups: dict[tuple[str, ...], list[Any]] = {}
        # deferred queries by shape and text: [text tensor, {layer: keys (B', heads, T, d)}, [(step, layer, queries
        # (B', heads, HW, d))], upcast, scale]; turned into probabilities in batches (:meth:`_flush`)
        self._queue: dict[tuple, list[Any]] = {}
        # MMDiT layers' waiting calls: layer → [(step, queries (B', heads, HW, d), text keys (B', heads, T, d),
        # log-sum-exp (B', heads, HW) or None, image keys or None, scale)]
        self._joint_queue: dict[str, list[tuple]] = {}
        self._queued_bytes = 0
        self._probs: dict[str, list[torch.Tensor]] = {}
        # per step: [sums of head-mean maps by resolution group, number of layer maps summed]
        self._steps: list[list[Any]] = []
        self._num_keys = 77
        self._scales_seen: set[int] = set()
        self._first_step_checked = False
        self._passed: set[str] = set()  # layers the scales= filter hands to their own processor this run
        self._rows = -1  # denoiser batch rows the CFG layout was worked out for
        self._latent_off = False  # the current denoiser call is not captured (Flux true CFG's negative call)
        self._concept_hidden: torch.Tensor | None = (
            None  # MMDiT concepts' word tokens, context-embedded (C', D)
        )
        self._word_masks: dict[
            tuple, torch.Tensor | None
        ] = {}  # kind="output": (B', T) masks by batch layout
        self._concept_keys: dict[str, torch.Tensor] = {}  # layer → keys of the concepts' words (heads, C', d)
        self._qmasks: torch.Tensor | None = None  # image→image: the queries' weights on the latent (Q, H, W)
        self._qweights: dict[tuple, torch.Tensor] = {}  # ... on a layer's grid (Q, h*w), by grid and device

    def _run_start(self, run: Run) -> None:
        """A pipeline call begins: a fresh run, its rows labelled with the call's prompt tokens."""
        self._pending = None  # the previous run's maps, never read: "maps" is the latest run's
        self._reset_run()
        self._prompt_rows = self._labels_of_call(run.arguments)
        # the prompt is in the maps' token lists already
        self._provenance = call_provenance(self.pipe, run.arguments, run.scheduler, skip=("prompt",))
        if self.concepts and self._concept_text is None:
            self._concept_text = self._encode_concepts(run.arguments.get("max_sequence_length"))

    def _encode_concepts(self, length: int | None = None) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """The concepts encoded by the pipeline's own text encoder(s), each alone as a prompt: (C, T, D), and
        per concept the span of its word tokens in the flattened key list (one span after another). MMDiT: the
        call's T5 length; the word tokens of every part (SD3: CLIP's and T5's)."""
        den = self.family.get_denoiser(self.pipe)
        enc = self.family.encode_prompt(
            self.pipe,
            list(self.concepts),
            device=den.device,
            do_classifier_free_guidance=False,
            max_sequence_length=length,
        )
        positions = [
            [
                i
                for i, k in enumerate(sequence_tokens(self.pipe, c, max_sequence_length=length).kinds)
                if k == "text"
            ]
            for c in self.concepts
        ]
        empty = [c for c, pos in zip(self.concepts, positions, strict=True) if not pos]
        if empty:
            raise InvalidArgumentError(f"Concept(s) {empty} have no tokens once tokenized; pass real words.")
        self._concept_positions = positions
        spans, start = [], 0
        for pos in positions:
            spans.append((start, start + len(pos)))
            start += len(pos)
        return enc.embeds.to(den.dtype), spans

    def _run_end(self, run: Run, error: BaseException | None) -> None:
        """A pipeline call ended (a failed or interrupted one keeps what it recorded): set its state aside.

        The maps are built when first read, or when the ``with`` block ends, not inside the call: the call
        returns as soon as its last step is done, and a run whose maps are never read costs no build.
        """
        self._edited = run.attention_edited
        if run.started:  # the schedule fields are read at the first denoiser call
            self._provenance = {
                **self._provenance,
                "steps": int(run.num_steps),
                "guidance_scale": float(run.guidance_scale),
            }
        self._pending = {k: getattr(self, k) for k in _RUN_STATE} if self._timesteps else None
        self._maps, self._why_no_maps = None, None
        self._reset_run()

    def _build_pending(self, raise_errors: bool = False) -> None:
        """Build the ended run's maps from its set-aside state (once)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        current = {k: getattr(self, k) for k in _RUN_STATE}
        self.__dict__.update(pending)
        try:
            self._maps, self._why_no_maps = self._build(), None
        except RecorderStateError as err:
            self._maps, self._why_no_maps = None, str(err)
            if raise_errors:
                raise
        finally:
            self.__dict__.update(current)

    def _labels_of_call(self, bound: dict[str, Any]) -> tuple[list[TokenList], list[TokenList]] | None:
        """Token labels of the call's prompt (and negative prompt), one list per image; None for prompt_embeds.

        Each encoder's part is labelled from the prompt it encoded: ``prompt_2`` (SDXL's and SD3's CLIP-G,
        Flux's T5), ``prompt_3`` (SD3's T5), and the negatives' ``negative_prompt_2``/``_3`` likewise.
        """
        prompt = bound.get("prompt")
        if prompt is None:
            return None  # prompt_embeds passed directly: rows stay unlabelled
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = int(bound.get("num_images_per_prompt") or 1)
        negative = bound.get("negative_prompt")
        negatives = (
            [negative or ""] * len(prompts)
            if negative is None or isinstance(negative, str)
            else list(negative)
        )

        def per_prompt(name: str, like: list[str]) -> list[str | None]:
            """The call's ``name`` (prompt_2, negative_prompt_3, ...) for each of ``like``'s prompts (None: the
            pipeline's own fallback, i.e. that prompt; a list of another length fails the call itself)."""
            value = bound.get(name)
            if isinstance(value, list | tuple) and len(value) == len(like):
                return list(value)
            return [value if isinstance(value, str) else None] * len(like)

        length = bound.get("max_sequence_length")  # T5's part of SD3's and Flux's sequence

        # Sana prepends an instruction to the prompt (the call's, else its default), never to the negative prompt
        instruction = {k: bound[k] for k in ("complex_human_instruction",) if k in bound}

        def label(
            p: str, p2: str | None, p3: str | None, **extra: Any
        ) -> TokenList:  # every text key position
            return sequence_tokens(
                self.pipe, p, max_sequence_length=length, prompt_2=p2, prompt_3=p3, **extra
            )

        further = [per_prompt(a, prompts) for a in ("prompt_2", "prompt_3")]
        # the pipelines: negative_prompt_2 = negative_prompt_2 or negative_prompt (SDXL, SD3, Flux)
        neg_further = [per_prompt(a, negatives) for a in ("negative_prompt_2", "negative_prompt_3")]
        cond = [
            label(p, a, b, **instruction) for p, a, b in zip(prompts, *further, strict=True) for _ in range(n)
        ]
        neg = [
            label(p, a, b, complex_human_instruction=None)
            for p, a, b in zip(negatives, *neg_further, strict=True)
            for _ in range(n)
        ]
        for tl in cond:
            if tl.truncated:
                warnings.warn(
                    f"The prompt is longer than {len(tl.ids)} tokens; the text encoder never saw these and they have "
                    f"no map: {' '.join(tl.truncated_words)!r} (listed in maps.truncated).",
                    stacklevel=5,
                )
        return cond, neg

    def _denoiser_pre(self, run: Run, args: tuple, kwargs: dict) -> None:
        """Before each denoiser call: close the previous step, note this step's timestep, latent size, CFG rows."""
        if not self.family.cfg_batch and run.cfg and run.calls % 2 == 1:
            # Flux's true CFG: two calls per step, the prompt's then the negative prompt's (counted here: the
            # attachment counts steps only when a subscriber watches the scheduler); the negative's pass through
            self._latent_off = True
            return None
        self._latent_off = False
        if self._timesteps and not self._first_step_checked:
            self._check_first_step()
        spec = self.family.denoiser_args
        sample = spec.get("sample", args, kwargs)
        context = spec.get("text", args, kwargs)
        # from the host copy of the schedule: no tensor op, no sync
        call = (
            run.calls // 2 if not self.family.cfg_batch and run.cfg else run.calls
        )  # Flux true CFG: 2 per step
        self._timesteps.append(run.timestep(call, spec.get("timestep", args, kwargs)))
        if self.family.latent_packing == 1 or self._latent_size is None:  # packed: one host read per run
            size = self.family.latent_grid(sample, args, kwargs)
        else:
            size = self._latent_size
        if self._latent_size is not None and size != self._latent_size:
            raise RecorderStateError(f"The latent size changed mid-run ({self._latent_size} → {size}).")
        self._latent_size = size
        if sample.ndim == 5:  # a video's latents (N, C, F, h, w), patched in time too (Wan: 1 frame a patch)
            patch = getattr(self.family.get_denoiser(self.pipe).config, "patch_size", None)
            self._frames = int(sample.shape[2]) // (int(patch[0]) if isinstance(patch, list | tuple) else 1)
        if context is not None:
            self._num_keys = int(context.shape[1])
        if self._rows != sample.shape[0]:  # the CFG layout, worked out once per run
            self._rows = rows = int(sample.shape[0])
            uncond, cond = self.family.cfg_rows(rows)
            if not self.family.cfg_batch:  # Flux: the prompt's call only (true CFG's negative call passes)
                self._sel, self._split = slice(None), None
            elif run.cfg and self.negative:
                self._sel, self._split = slice(None), (uncond, cond)
            elif run.cfg:
                self._sel, self._split = cond, None
            else:
                self._sel, self._split = slice(None), None
        if self._plan is None:
            if self.relation == "image->image":  # points and masks against this call's latent grid
                self._qmasks = relations.query_masks(self.selection, self._latent_size)
            self._plan = self._make_plan(run, sample.device)
        if self._plan.step_size is not None:
            self._steps.append([{}, 0])
        if self.concepts and self._layouts:
            self._start_concepts(run, args, kwargs)
        return None

    def _make_plan(self, run: Run, device: torch.device) -> Plan:
        """The call's capture, before its first step: reduced to ``max_bytes`` (layers left out are handed to their
        own processor, as ``scales=`` does), and checked against the memory free on ``device``, where the denoiser
        computes (its input's device: the model's ``device`` property walks every module to honour offloading)."""
        assert self._latent_size is not None
        den = self.family.get_denoiser(self.pipe)
        names = [n.removesuffix(".processor") for n in self._captured]
        patch = max(self.family.latent_packing, spatial_patch(den.config))
        scales = budget.layer_scales(den, names, patch)
        if self.scales is not None:  # layers the scales= filter passes cost nothing
            names = [n for n in names if scales[n] in self.scales]
        calls = max(run.num_steps, 1) * max(int(getattr(self.pipe.scheduler, "order", 1) or 1), 1)
        heads = {n: int(getattr(den.get_submodule(n), "heads", 1) or 1) for n in names}
        relations.check_heads(self.selection, heads)
        if self.selection.heads is not None:  # only the selected heads are averaged (and kept with per_head)
            heads = {n: len(self.selection.heads) for n in names}
        grids = {n: budget.grid(self._latent_size, scales[n]) for n in names}
        keys = self._num_keys + len(self.concepts)
        if self.relation == "text->text":  # each layer's maps: (1, T) rows over the text keys
            grids = {n: self._map_size() for n in names}
        elif self.relation == "image->image":  # one map per selected query
            keys = self.selection.num_queries
        p = budget.plan(
            names=names,
            grids=grids,
            frames=self._frames or 1,
            heads=heads,
            latent=self._map_size(),
            rows=len(range(self._rows)[self._sel]),
            keys=keys,
            calls=calls,
            halves=2 if self._split is not None else 1,
            step_size=None if self.step_resolution is None else self._step_size(),
            per_head=self.per_head,
            keep_probs=self.keep_probs,
            probs_itemsize=den.dtype.itemsize
            if self.keep_probs
            else 0,  # the dtype walks the model: only if kept
            max_bytes=self.max_bytes,
            extra_bytes=0
            if self._qmasks is None
            else (2 if self._split is not None else 1) * self._qmasks.nbytes,
        )
        _check_fits(p, device, self.max_bytes)
        self._last_plan = p
        self._passed.update(p.dropped)  # module names, as the gate is called
        if p.reduced:
            steps = (
                "no per-step maps"
                if p.step_size is None
                else f"per-step maps at {p.step_size[0]}×{p.step_size[1]}"
            )
            warnings.warn(
                f"max_bytes={self.max_bytes:,}: recording {len(p.layers)} of {len(names)} attention layers (the "
                f"coarsest first) and {steps}, about {p.nbytes:,} bytes. recorder.budget lists what was left "
                "out.",
                stacklevel=2,
            )
        return p

    @property
    def budget(self) -> Plan | None:
        """The latest call's capture plan: layers kept and ``dropped`` for ``max_bytes``, the per-step maps'
        ``step_size``, and ``nbytes``, the bytes its maps take (None before a call)."""
        return self._last_plan

    def _start_concepts(self, run: Run, args: tuple, kwargs: dict) -> None:
        """A fresh concept stream for this denoiser call: the concepts' word tokens through the denoiser's
        ``context_embedder``, with the call's time embedding of the captured rows (as its blocks receive it)."""
        assert self._concept_text is not None
        den = self.family.get_denoiser(self.pipe)
        spec = self.family.denoiser_args
        sample = spec.get("sample", args, kwargs)
        t = spec.get("timestep", args, kwargs)
        pooled = spec.get("pooled", args, kwargs)
        rows = self._sel
        n = sample.shape[0]
        t = (t.expand(n) if t.ndim else t.reshape(1).expand(n))[rows].to(sample.dtype)  # (B',)
        pooled = pooled[rows]  # (B', P)
        if self.family.name.startswith("flux"):  # Flux's forward scales timestep (and guidance) by 1000
            g = spec.get("guidance", args, kwargs)
            if g is None:
                temb = den.time_text_embed(t * 1000, pooled)
            else:
                g = (g.expand(n) if g.ndim else g.reshape(1).expand(n))[rows].to(sample.dtype)
                temb = den.time_text_embed(t * 1000, g * 1000, pooled)
        else:
            temb = den.time_text_embed(t, pooled)  # (B', D)
        if self._concept_hidden is None:  # the same for every call of the run: embedded once
            embeds = self._concept_text[0]  # (C, T, D)
            words = torch.cat(
                [embeds[i, pos] for i, pos in enumerate(self._concept_positions)]
            )  # (C', D): every concept's word tokens
            self._concept_hidden = den.context_embedder(words.to(sample.dtype))  # (C', D)
        hidden = self._concept_hidden
        self._stream = ConceptStream(hidden.expand(temb.shape[0], *hidden.shape).clone(), temb)

    def _check_first_step(self) -> None:
        """After the first step: a scales= filter that matched no layer stops the run with the reason."""
        self._first_step_checked = True
        if self.scales is not None and not self._layer_hw:
            raise RecorderStateError(self._no_capture_reason())

    def _no_capture_reason(self) -> str:
        if self.scales is None:
            return "No cross-attention call was captured in this run: the selected layers never ran."
        there = ", ".join(str(s) for s in sorted(self._scales_seen)) or "none"
        return (
            f"No cross-attention layer is at scales={sorted(self.scales)} in this run; the selected layers are at "
            f"scales {there} (1 = latent resolution). Pass scales= from those, or leave it out."
        )

    def _grid(self, seq_len: int) -> tuple[int, ...] | None:
        """(h, w) of a layer's query grid from its sequence length and the latent size (any aspect ratio); a video's
        (F, h, w), its queries frame by frame."""
        assert self._latent_size is not None
        H, W = self._latent_size
        F = self._frames
        key = (seq_len, H, W, F)
        if key not in self._hw_cache:
            found = None
            for k in range(8):
                h, w = math.ceil(H / 2**k), math.ceil(W / 2**k)  # stride-2 convs round up
                if h * w * (F or 1) == seq_len:
                    found = (h, w) if F is None else (F, h, w)
                    break
            self._hw_cache[key] = found
        return self._hw_cache[key]

    def _gate(self, name: str, seq_len: int) -> slice | None:
        """Rows of this call to capture (the CFG layout of the current step), or None to pass it through."""
        if self._latent_off:
            return None
        if name in self._layer_hw:  # placed earlier in this run: the common path, one dict lookup
            return self._sel
        if self._latent_size is None or name in self._passed:
            return None
        hw = self._grid(seq_len)
        if hw is None:
            raise RecorderStateError(
                f"Cannot place the {seq_len} queries of layer {name} on a grid of the {self._latent_size} latent; "
                "record with layers= excluding it."
            )
        if self.scales is not None:
            scale = round(self._latent_size[0] / hw[-2])
            self._scales_seen.add(scale)
            if scale not in self.scales:
                self._passed.add(name)
                return None
        self._layer_hw[name] = hw
        return self._sel

    def _sink(self, name: str, probs: torch.Tensor) -> None:
        """File one layer's probabilities (B', heads, HW, T) at once (a processor that computed them itself)."""
        if self.concepts:
            raise RecorderStateError(
                f"Layer {name} was called with an attention mask: concept maps need unmasked cross-attention. "
                "Record without concepts=."
            )
        probs = self._heads_of(probs)  # (B', heads', HW, T): the selected heads
        self._file([len(self._timesteps) - 1], (name,), probs[None, None])  # (1, 1, B', heads', HW, T)

    def _text_len(self) -> int:
        """Text tokens at the head of a single-stream block's sequence (the denoiser's text input)."""
        return self._num_keys

    def _joint_gate(self, name: str, seq_len: int) -> bool:
        """Whether an MMDiT layer's call with ``seq_len`` image tokens is captured (placed on the latent grid)."""
        return self._gate(name, seq_len) is not None

    def _joint_sink(
        self,
        name: str,
        attn: Any,
        q_img: torch.Tensor,
        k_txt: torch.Tensor,
        lse: torch.Tensor | None,
        o_img: torch.Tensor,
        o_txt: torch.Tensor,
        scale: float,
        k_img: torch.Tensor,
        v_img: torch.Tensor,
        key_bias: torch.Tensor | None = None,
        image_key_bias: torch.Tensor | None = None,
        **extra: Any,
    ) -> None:
        """One MMDiT layer's call: keep the captured rows' image queries (N, heads, HW, d), text keys
        (N, heads, T, d) and the kernel's log-sum-exp (N, heads, HW) until :meth:`_flush_joint` (views, no copy;
        at most :data:`QUEUE_BYTES` wait), or file the attention-output maps from the outputs (N, HW, C) and
        (N, T, C) at once for ``kind="output"``."""
        rows, step = self._sel, len(self._timesteps) - 1
        if self.relation != "image->text":
            self._relate_joint(
                name,
                q_img[rows],
                k_txt[rows],
                None if lse is None else lse[rows],
                k_img[rows],
                scale,
                rows,
                key_bias,
                image_key_bias,
                extra,
            )
            return
        kc = oc = None
        if self.concepts:  # the concept tokens through this block: their keys and attention outputs
            block, single = self._blocks[name]
            kc, oc = self._stream.layer(attn, block, single, k_img[rows], v_img[rows])  # (B', heads, C', d)
        if self.kind == "output":
            keep = self._word_mask(rows, o_txt)
            p = output_scores(o_img[rows], o_txt[rows], keep)  # (B', 1, HW, T)
            if oc is not None:  # each concept's outputs offered beside the prompt's words, as for the keys
                scores = torch.matmul(
                    o_img[rows].float(), o_txt[rows].float().transpose(-1, -2)
                )  # (B', HW, T)
                if keep is not None:
                    scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
                spans = self._concept_text[1]  # type: ignore[index]
                masses = concept_masses(
                    o_img[rows][:, None], oc[:, None], scores.logsumexp(-1)[:, None], 1.0, spans
                )
                p = torch.cat([p, masses], -1)  # (B', 1, HW, T+C)
            self._file([step], (name,), p[None, None])
            return
        lse = _rows(lse, rows)  # (B', heads, HW)
        # image keys, only where "joint" maps need a log-sum-exp the kernel did not give (math fallback; a mask)
        ki = self._heads_of(_rows(k_img, rows) if lse is None and self.kind == "joint" else None)
        q, k = _rows(q_img, rows), _rows(k_txt, rows)  # (B', heads, HW, d), (B', heads, T, d): views, no copy
        q, k, lse = self._heads_of(q), self._heads_of(k), self._heads_of(lse)  # the selected heads (copies)
        kb = _rows(key_bias, rows)  # (B', T): Chroma's mask on the text keys
        kib = None if key_bias is None or ki is None else _rows(image_key_bias, rows)  # (B', HW'): image keys
        self._joint_queue.setdefault(name, []).append((step, q, k, lse, ki, scale, kc, kb, kib))
        self._queued_bytes += sum(x.numel() * x.element_size() for x in (q, k, ki) if x is not None)
        if self._queued_bytes > QUEUE_BYTES:
            self._flush()

    def _flush_joint(self) -> None:
        """Maps of every waiting MMDiT call. Layers that waited for the same steps with tensors of one shape go
        together (steps × layers in one batch where it fits the probability budget); otherwise one layer and step
        at a time, its head mean summed a few heads at a time. Concept columns (``concepts=``) follow the T text
        positions."""
        queue, self._joint_queue = self._joint_queue, {}
        spans = None if self._concept_text is None else self._concept_text[1]

        def shape(x: Any) -> Any:
            return None if x is None else tuple(x.shape)

        groups: dict[tuple, list[str]] = {}
        for name, items in queue.items():
            first = items[0]
            key = (tuple(it[0] for it in items), first[5], *(shape(first[i]) for i in (1, 2, 3, 4, 6, 7, 8)))
            groups.setdefault(key, []).append(name)

        def stacked(names: list[str], i: int) -> torch.Tensor | None:
            if queue[names[0]][0][i] is None:
                return None
            items = [queue[n] for n in names]  # every layer of a group waited for the same steps
            flat = torch.stack([its[s][i] for s in range(len(items[0])) for its in items])  # (S*n, B', ...)
            return flat.unflatten(0, (len(items[0]), len(names)))  # (S, n, B', heads, ...)

        for key, names in groups.items():
            steps, scale = list(key[0]), key[1]
            q, k = stacked(names, 1), stacked(names, 2)  # (S, n, B', heads, HW, d), (S, n, B', heads, T, d)
            lse, ki, kc, kb, kib = (
                stacked(names, 3),
                stacked(names, 4),
                stacked(names, 6),
                stacked(names, 7),
                stacked(names, 8),
            )  # (S, n, B', heads, HW[, d]); the key bias (S, n, B', T) and on the image keys (S, n, B', HW')

            def probs(
                sel: Any, h: Any = slice(None), t: tuple = (q, k, lse, ki, kc, scale, kb, kib)
            ) -> torch.Tensor:
                """(..., heads', HW, T[+C]) of the index ``sel`` (steps, or a step and layer), heads ``h``."""
                q_, k_, lse_, ki_, kc_, scale_, kb_, kib_ = t
                p, norm = text_block(
                    q_[sel][..., h, :, :],
                    k_[sel][..., h, :, :],
                    None if lse_ is None else lse_[sel][..., h, :],
                    scale_,
                    self.kind,
                    None if ki_ is None else ki_[sel][..., h, :, :],
                    None if kb_ is None else kb_[sel],
                    None if kib_ is None else kib_[sel],
                )  # (..., heads', HW, T), (..., heads', HW)
                if kc_ is not None and spans is not None:
                    masses = concept_masses(
                        q_[sel][..., h, :, :], kc_[sel][..., h, :, :], norm, scale_, spans
                    )
                    p = torch.cat([p, masses], -1)
                return p

            S, n, b, heads, length, _ = q.shape
            cap = PROBS_BYTES_CPU if q.device.type == "cpu" else PROBS_BYTES
            per_step = n * b * heads * length * k.shape[-2] * 4
            full = self.per_head or self.keep_probs
            if per_step <= cap or full:
                chunk = max(1, cap // per_step)  # steps per batch
                for a in range(0, S, chunk):
                    p = probs(slice(a, a + chunk))  # (S', n, B', heads, HW, T)
                    if not full:
                        p = p.mean(
                            3, keepdim=True
                        )  # (S', n, B', 1, HW, T): the head mean is all that is kept
                    self._file(steps[a : a + chunk], tuple(names), p)
                continue
            hchunk = max(1, cap // max(1, b * length * k.shape[-2] * 4))  # heads per batch
            for j, name in enumerate(names):
                for i, step in enumerate(steps):
                    total = None
                    for h in range(0, heads, hchunk):
                        p = probs((i, j), slice(h, h + hchunk)).sum(1, keepdim=True)  # (B', 1, HW, T)
                        total = p if total is None else total.add_(p)
                    self._file([step], (name,), total.div_(heads)[None, None])  # (1, 1, B', 1, HW, T)

    # ---- relations other than image→text (computed at once: only the selection is kept) ------------------------
    def _heads_of(self, x: torch.Tensor | None) -> torch.Tensor | None:
        """``x`` (B', heads, ...) restricted to the selected heads."""
        if x is None or self.selection.heads is None:
            return x
        return x[:, list(self.selection.heads)]

    def _weights(self, name: str, device: torch.device) -> torch.Tensor:
        """(Q, h*w): the selected queries' weights on layer ``name``'s query grid (once per grid and run)."""
        hw = self._layer_hw[name]
        key = (hw, device)
        if key not in self._qweights:
            assert self._qmasks is not None
            self._qweights[key] = relations.grid_weights(self._qmasks, hw).to(device)
        return self._qweights[key]

    def _relate(self, name: str, query: torch.Tensor, key: torch.Tensor, rows: slice, scale: float) -> None:
        """A self-attention layer's call (image→image): each selected query's probabilities over the image keys,
        (B', heads, HW, Q), filed like per-token maps (the Q selections in the place of the T tokens)."""
        q, k = self._heads_of(query[rows]), self._heads_of(key[rows])  # (B', heads', HW, d)
        maps = relations.weighted_rows(q, k, self._weights(name, q.device), scale)  # (B', heads', HW, Q)
        self._file([len(self._timesteps) - 1], (name,), maps[None, None])

    def _relate_joint(
        self,
        name: str,
        q_img: torch.Tensor,
        k_txt: torch.Tensor,
        lse: torch.Tensor | None,
        k_img: torch.Tensor,
        scale: float,
        rows: slice,
        key_bias: torch.Tensor | None,
        image_key_bias: torch.Tensor | None,
        extra: dict[str, Any],
    ) -> None:
        """An MMDiT layer's call, the captured rows only (B', heads, ·, d): the image→image, text→image or
        text→text block of the joint softmax, normalised over every key (the kernel's log-sum-exp where it gave
        one, else computed here), filed as (B', heads', keys, queries) maps."""
        step = len(self._timesteps) - 1
        qi, kt, ki = self._heads_of(q_img), self._heads_of(k_txt), self._heads_of(k_img)
        lse = self._heads_of(lse)
        kb = None if key_bias is None else key_bias[rows][:, None, None, :]  # (B', 1, 1, T) on the text keys
        kib = None if image_key_bias is None else image_key_bias[rows][:, None, None, :]  # (B', 1, 1, HW')
        if self.relation == "image->image":

            def lse_of(idx: torch.Tensor) -> torch.Tensor:  # (B', heads', R): these image rows over every key
                if lse is not None:
                    return lse[:, :, idx]
                q = qi[:, :, idx].float()
                own = torch.matmul(q, ki.float().transpose(-1, -2)).mul_(scale)  # (B', heads', R, HW')
                txt = torch.matmul(q, kt.float().transpose(-1, -2)).mul_(scale)  # (B', heads', R, T)
                own = own if kib is None else own.add_(kib)
                txt = txt if kb is None else txt.add_(kb)
                return torch.logaddexp(own.logsumexp(-1), txt.logsumexp(-1))

            w = self._weights(name, qi.device)
            maps = relations.weighted_rows(qi, ki, w, scale, lse_of, kib)  # (B', heads', HW', Q)
            self._file([step], (name,), maps[None, None])
            return
        q_txt = extra.get("q_txt")
        if q_txt is None:
            raise RecorderStateError(
                f"Layer {name} does not hand over its text queries: relation={self.relation!r} is not recorded on "
                f"{self.family.label} yet. Record 'image->text' or 'image->image'."
            )
        qt = self._heads_of(q_txt[rows])  # (B', heads', T, d)
        lse_txt = extra.get("lse_txt")
        lt = None if lse_txt is None else self._heads_of(lse_txt[rows])  # (B', heads', T)
        T = qt.shape[-2]
        rb = extra.get("text_mask")  # the call's (N, 1, L, L) mask, text first
        if rb is not None:  # its addition per text query and key
            rb = query_bias(rb, T)[rows][:, None]  # (B', 1, T, T+HW')
            bt, bi = rb[..., :T], rb[..., T:]
        else:
            bt, bi = kb, kib
        if lt is None:  # the log-normaliser of each text query over every key
            txt = torch.matmul(qt.float(), kt.float().transpose(-1, -2)).mul_(scale)  # (B', heads', T, T)
            img = torch.matmul(qt.float(), ki.float().transpose(-1, -2)).mul_(scale)  # (B', heads', T, HW')
            txt = txt if bt is None else txt.add_(bt)
            img = img if bi is None else img.add_(bi)
            lt = torch.logaddexp(txt.logsumexp(-1), img.logsumexp(-1))  # (B', heads', T)
            lt = lt.masked_fill(
                lt.isneginf(), float("inf")
            )  # a fully masked query row attends nowhere: zeros
        if self.relation == "text->image":
            p = relations.rows_probs(qt, ki, scale, lt, bi)  # (B', heads', T, HW')
        else:
            p = relations.rows_probs(qt, kt, scale, lt, bt)  # (B', heads', T, T)
            self._layer_hw[name] = self._map_size()  # (1, T): a row over the text keys
        self._file([step], (name,), p.transpose(-1, -2)[None, None])  # (1, 1, B', heads', keys, T)

    def _word_mask(self, rows: slice, o_txt: torch.Tensor) -> torch.Tensor | None:
        """(B', T) True at the prompt's word tokens (ConceptAttention's softmax runs over these); None when the
        labels do not fit the sequence (then every position takes part). Worked out once per run and layout: no
        host transfer or read per layer call."""
        key = (o_txt.shape[0], o_txt.shape[1], rows.start, rows.stop, o_txt.device)
        if key not in self._word_masks:
            self._word_masks[key] = self._make_word_mask(rows, o_txt)
        return self._word_masks[key]

    def _make_word_mask(self, rows: slice, o_txt: torch.Tensor) -> torch.Tensor | None:
        if self._prompt_rows is None:
            return None
        cond, neg = self._prompt_rows
        n, t = o_txt.shape[0], o_txt.shape[1]
        if n == len(cond) + len(neg):  # the whole CFG batch, in the family's order
            full = neg + cond if self.family.cfg_uncond_first else cond + neg
        elif n == len(cond):
            full = cond
        else:
            return None
        labels = full[rows]
        if any(len(tl.ids) != t for tl in labels):
            return None
        kinds = [[k == "text" for k in tl.kinds] for tl in labels]  # (B', T) on the host
        if not all(any(row) for row in kinds):
            return None
        return torch.tensor(kinds, device=o_txt.device)  # (B', T)

    def _defer(
        self,
        name: str,
        query: torch.Tensor,
        key: torch.Tensor,
        attn: Any,
        context: Any,
        rows: slice,
        bias: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Keep one layer's queries (N, heads, HW, d) for later, with its keys (N, heads, T, d): the whole CFG
        batch, its ``rows`` taken once per batch rather than once per layer and step.

        The tensors are the layer's own (views, no copy). Queries wait until the run ends, its maps are read, or
        :data:`QUEUE_BYTES` of them are waiting; then every waiting step of every layer of one shape gets its
        probabilities from one batched matmul and softmax (:meth:`_flush`). A layer's keys depend only on the
        text, so one copy serves every step that saw the same text tensor. ``bias``: a per-key attention mask's
        addition to every score (N, heads, T) and the mask argument it came from (one per denoiser call: the
        layers of a call that share it share the bias).
        """
        if bias is not None and self.concepts:
            raise RecorderStateError(
                f"Layer {name} was called with an attention mask: concept maps need unmasked cross-attention. "
                "Record without concepts=."
            )
        if self.selection.heads is not None:  # the selected heads only (N, heads', ·, d): copies
            query, key = self._heads_of(query), self._heads_of(key)
            bias = None if bias is None else (self._heads_of(bias[0]), bias[1])
        if self.concepts and name not in self._concept_keys:
            self._concept_keys[name] = self._keys_of_concepts(attn, key.shape[1])
        upcast = bool(getattr(attn, "upcast_attention", False))
        scale = float(getattr(attn, "scale", key.shape[-1] ** -0.5))  # Wan's: SDPA's default, 1/√d
        source = None if bias is None else bias[1]
        group = (
            query.shape,
            key.shape,
            query.dtype,
            upcast,
            scale,
            id(context),
            rows.start,
            rows.stop,
            id(source),
        )
        batch = self._queue.get(group)
        if (
            batch is None
        ):  # holding the text (and mask) tensor keeps its id() from being reused while batches wait
            batch = self._queue[group] = [context, {}, [], upcast, scale, rows, bias]
        batch[1].setdefault(name, key)
        batch[2].append((len(self._timesteps) - 1, name, query))
        self._queued_bytes += query.numel() * query.element_size()
        if self._queued_bytes > QUEUE_BYTES:
            self._flush()

    def _keys_of_concepts(self, attn: Any, heads: int) -> torch.Tensor:
        """One layer's keys of every concept word, as the layer computes keys from text: (heads, C', d)."""
        assert self._concept_text is not None
        ctx = self._concept_text[0]  # (C, 77, D)
        if attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        k = attn.to_k(ctx)  # (C, 77, heads*d)
        k = k.view(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)  # (C, heads, 77, d)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        return torch.cat(
            [k[i][:, pos] for i, pos in enumerate(self._concept_positions)], dim=1
        )  # (heads, C', d)

    def _flush(self) -> None:
        """Probabilities of every waiting query: per shape, one batch of steps × layers, filed like any others."""
        self._flush_joint()
        queue, self._queue, self._queued_bytes = self._queue, {}, 0
        queue = self._flush_per_step_keys(queue)
        for _, keys, items, upcast, scale, rows, bias in queue.values():
            by_step: dict[int, list[tuple[str, torch.Tensor]]] = {}
            for step, name, q in items:
                by_step.setdefault(step, []).append((name, q))
            by_names: dict[tuple[str, ...], list[int]] = {}  # steps that ran the same layers go together
            for step, entries in by_step.items():
                by_names.setdefault(tuple(n for n, _ in entries), []).append(step)
            for names, steps in by_names.items():
                k = torch.stack([keys[n] for n in names])[:, rows]  # (n, B', heads, T, d)
                n, b, heads, t, d = k.shape
                kt = k.reshape(n * b * heads, t, d).transpose(1, 2)  # (n*B'*heads, d, T)
                length = by_step[steps[0]][0][1].shape[-2]
                cap = PROBS_BYTES_CPU if k.device.type == "cpu" else PROBS_BYTES
                chunk = max(1, cap // (n * b * heads * length * t * 4))  # steps per batch
                for start in range(0, len(steps), chunk):
                    part = steps[start : start + chunk]
                    # name-major, step-minor: the steps of one layer share its keys, so they become one long
                    # query sequence per layer and head, and one bmm serves every step
                    q = torch.stack(
                        [dict(by_step[s])[name] for name in names for s in part]
                    )  # (n*S, N, heads, HW, d): every row of the CFG batch
                    q = (
                        q[:, rows].reshape(n, len(part), b, heads, length, d).permute(0, 2, 3, 1, 4, 5)
                    )  # (n, B', heads, S, HW, d): the captured rows
                    q3 = q.reshape(n * b * heads, len(part) * length, d)  # (n*B'*heads, S*HW, d)
                    if upcast:
                        q3, kt = q3.float(), kt.float()
                    scores = torch.baddbmm(_empty(q3), q3, kt, beta=0.0, alpha=scale)  # (n*B'*heads, S*HW, T)
                    if bias is not None:  # the mask's addition to each key's score, for every query
                        kb = bias[0][rows].to(scores.dtype)  # (B', heads, T)
                        scores += kb.expand(n, b, heads, t).reshape(n * b * heads, 1, t)
                    probs = scores.softmax(-1, dtype=torch.float32)  # (n*B'*heads, S*HW, T)
                    if self.concepts:  # the concepts' columns after the T text positions
                        probs = torch.cat([probs, self._concept_probs(names, b, q3, scores, scale)], -1)
                    probs = probs.view(n, b, heads, len(part), length, -1).permute(3, 0, 1, 2, 4, 5)
                    self._file(part, names, probs)  # (S, n, B', heads, HW, T)

    def _flush_per_step_keys(self, queue: dict[tuple, list[Any]]) -> dict[tuple, list[Any]]:
        """Batches whose text tensor is new at every step (PixArt-Σ and Sana project the caption inside the
        denoiser): one step each, so their keys are not shared. Those of one shape and the same layers are
        computed together here, each step against its own keys, in one batched matmul and softmax; returns the
        batches left for :meth:`_flush`'s shared-keys path."""
        if self.concepts or len(queue) < 2:
            return queue
        buckets: dict[tuple, list[tuple]] = {}
        for group, batch in queue.items():
            steps = {s for s, _, _ in batch[2]}
            names = tuple(n for _, n, _ in batch[2])
            if len(steps) != 1 or len(set(names)) != len(names):
                return queue  # shared keys (or a layer twice): the shared-keys path
            # shape, dtype, upcast, scale, rows; whether a mask bias comes with it; the layers
            buckets.setdefault((*group[:5], *group[6:8], batch[6] is None, names), []).append(group)
        if len(buckets) != 1 or any(len(groups) < 2 for groups in buckets.values()):
            return (
                queue  # one batch of every waiting step, or none: kept probabilities are filed in step order
            )
        for (*_, names), groups in buckets.items():
            batches = [queue[g] for g in groups]
            _, _, _, upcast, scale, rows, bias0 = batches[0]
            k = torch.stack(
                [bt[1][n][rows] for n in names for bt in batches]
            )  # (n*S, B', heads, T, d): each step's own keys, the captured rows only
            q = torch.stack(
                [dict((nm, x) for _, nm, x in bt[2])[n][rows] for n in names for bt in batches]
            )  # (n*S, B', heads, HW, d)
            k = k.view(len(names), len(batches), *k.shape[1:])  # (n, S, B', heads, T, d)
            q = q.view(len(names), len(batches), *q.shape[1:])  # (n, S, B', heads, HW, d)
            n, S, b, heads, t, d = k.shape
            length = q.shape[-2]
            cap = PROBS_BYTES_CPU if k.device.type == "cpu" else PROBS_BYTES
            chunk = max(1, cap // (n * b * heads * length * t * 4))  # steps per batch
            steps = [bt[2][0][0] for bt in batches]
            for a in range(0, S, chunk):
                z = min(S, a + chunk)
                q3 = q[:, a:z].reshape(-1, length, d)  # (n*S'*B'*heads, HW, d)
                kt = k[:, a:z].reshape(-1, t, d).transpose(1, 2)  # (n*S'*B'*heads, d, T)
                if upcast:
                    q3, kt = q3.float(), kt.float()
                scores = torch.baddbmm(_empty(q3), q3, kt, beta=0.0, alpha=scale)  # (n*S'*B'*heads, HW, T)
                if bias0 is not None:  # each step's mask: its addition to each key's score, for every query
                    kb = torch.stack([bt[6][0][rows] for bt in batches[a:z]]).to(
                        scores.dtype
                    )  # (S', B', heads, T)
                    scores += kb.expand(n, z - a, b, heads, t).reshape(-1, 1, t)
                probs = scores.softmax(-1, dtype=torch.float32)  # (n*S'*B'*heads, HW, T)
                probs = probs.view(n, z - a, b, heads, length, t).transpose(0, 1)  # (S', n, B', heads, HW, T)
                self._file(steps[a:z], names, probs)
        return {}

    def _concept_probs(
        self, names: tuple[str, ...], b: int, q3: torch.Tensor, scores: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """(n*B'*heads, S*HW, C) float32: each concept's probability mass when its words are offered as keys
        beside the prompt's (softmax over the T prompt keys and that concept's keys, the concept's part summed).
        ``q3`` (n*B'*heads, S*HW, d) are the queries and ``scores`` their scaled scores on the prompt keys."""
        assert self._concept_text is not None
        kc = torch.stack([self._concept_keys[n] for n in names])  # (n, heads, C', d)
        n, heads, c, d = kc.shape
        kc = kc[:, None].expand(n, b, heads, c, d).reshape(n * b * heads, c, d)  # (n*B'*heads, C', d)
        sc = torch.baddbmm(
            _empty(q3), q3, kc.transpose(1, 2).to(q3.dtype), beta=0.0, alpha=scale
        ).float()  # (n*B'*heads, S*HW, C')
        lse = scores.float().logsumexp(-1, keepdim=True)  # (n*B'*heads, S*HW, 1)
        out = []
        for a, z in self._concept_text[1]:
            own = sc[..., a:z]  # (n*B'*heads, S*HW, |c|)
            both = torch.logaddexp(lse, own.logsumexp(-1, keepdim=True))
            out.append((own - both).exp().sum(-1, keepdim=True))  # (n*B'*heads, S*HW, 1)
        return torch.cat(out, -1)  # (n*B'*heads, S*HW, C)

    def _file(self, steps: list[int], names: tuple[str, ...], p: torch.Tensor) -> None:
        """Reduce the probabilities ``p`` (S, n, B', heads, HW, T) of ``steps`` × the layers ``names`` (all of one
        grid) on the device: no host transfer, no sync. Sums stay in the (HW, T) layout the probabilities come
        in; maps are laid out as (T, h, w) once, for the step maps or when the result is built."""
        heads = p.shape[3]
        m = p.sum(3)  # (S, n, B', HW, T): sums over heads, divided by the head count when read
        slot = self._groups.get(names)
        total = m.sum(0) if len(steps) > 1 else m[0]  # (n, B', HW, T)
        if slot is None:
            head_total = None
            if self.per_head:
                head_total = p.sum(0) if len(steps) > 1 else p[0].clone()  # (n, B', heads, HW, T)
            self._groups[names] = [total.clone(), len(steps), head_total, heads]
        else:
            slot[0].add_(total)
            slot[1] += len(steps)
            if self.per_head:
                slot[2].add_(p.sum(0))  # (n, B', heads, HW, T)
        if self.keep_probs:
            dtype = self.family.get_denoiser(self.pipe).dtype
            for j, name in enumerate(names):
                self._probs.setdefault(name, []).extend(
                    p[i, j].to(dtype, copy=True) for i in range(len(steps))
                )  # (B', heads, HW, T) each
        if self._steps:
            hw = self._layer_hw[names[0]]
            per = m.sum(1).div_(heads) if len(names) > 1 else m[:, 0].div(heads)  # (S, B', HW, T)
            size = self._step_size()
            if hw[-2] * hw[-1] > size[0] * size[1]:  # shrink now: native maps this large would cost memory
                per, key = resize(_grid_maps(per, hw), size), ("shrunk", size)  # (S, B', T, hs, ws)
            else:  # resized for all steps at once when the result is built
                key = ("native", hw)
            for i, step in enumerate(steps):
                if 0 <= step < len(self._steps):
                    parts = self._steps[step]
                    parts[0][key] = per[i] if key not in parts[0] else parts[0][key].add_(per[i])
                    parts[1] += len(names)

    def _per_layer(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """Mean over the run's steps of each layer's head-mean (B', HW, T), and of its heads (B', heads, HW, T)."""
        sums: dict[str, torch.Tensor] = {}
        heads: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for names, (total, count, head_total, num_heads) in self._groups.items():
            for j, name in enumerate(names):
                mean = total[j] / num_heads  # (B', HW, T)
                sums[name] = mean if name not in sums else sums[name] + mean
                counts[name] = counts.get(name, 0) + count
                if head_total is not None:
                    heads[name] = head_total[j] if name not in heads else heads[name] + head_total[j]
        means = {n: s / counts[n] for n, s in sums.items()}
        return means, ({n: h / counts[n] for n, h in heads.items()} if self.per_head else None)

    def _map_size(self) -> tuple[int, int]:
        """The maps' full size: the latent grid, or (1, T) for text→text rows over the T text keys."""
        assert self._latent_size is not None
        return (1, self._num_keys) if self.relation == "text->text" else self._latent_size

    def _step_size(self) -> tuple[int, int]:
        assert self._latent_size is not None
        if self._plan is not None and self._plan.step_size is not None:
            return self._plan.step_size  # step_resolution's size, or coarser to fit max_bytes
        if self.relation == "text->text":
            return self._map_size()
        H, W = self._latent_size
        if isinstance(self.step_resolution, int):
            s = min(self.step_resolution, max(H, W)) / max(H, W)
            return (max(1, round(H * s)), max(1, round(W * s)))
        return (int(self.step_resolution[0]), int(self.step_resolution[1]))  # type: ignore[index]

    def _step_maps(self) -> torch.Tensor | None:
        """(S, B', T, hs, ws): per-step mean over layers, one resize per resolution group for the whole run."""
        if not self._steps or not any(n for _, n in self._steps):
            return None
        size = self._step_size()
        total = None
        for key in dict.fromkeys(k for parts, _ in self._steps for k in parts):
            idx = [s for s, (parts, _) in enumerate(self._steps) if key in parts]
            stacked = torch.stack(
                [self._steps[s][0][key] for s in idx]
            )  # (S', B', HW, T) or (S', B', T, hs, ws)
            if key[0] == "native":
                stacked = _upsized(_grid_maps(stacked, key[1]), size)  # (S', B', T, hs, ws)
            if total is None and len(idx) == len(self._steps):
                total = stacked  # every step in this group (the common case): no scatter into zeros
            elif total is None:
                total = stacked.new_zeros((len(self._steps), *stacked.shape[1:]))
                total[idx] += stacked
            else:
                total[idx] += stacked
        counts = torch.tensor([max(n, 1) for _, n in self._steps], dtype=total.dtype, device=total.device)
        counts = counts.view(-1, *([1] * (total.ndim - 1)))  # (S, 1, ...)
        return total / counts  # a step that captured nothing stays zero

    # ---- building the result ------------------------------------------------------------------------------
    def _labels(self, rows: int) -> tuple[list[TokenList], list[TokenList]]:
        if self._prompt_rows is not None and len(self._prompt_rows[0]) == rows:
            # Z-Image and Qwen-Image keep each prompt's own states: a shorter row is padded to the batch's keys
            cond, neg = ([padded_to(tl, self._num_keys) for tl in part] for part in self._prompt_rows)
            if all(len(tl.ids) == self._num_keys for tl in cond + neg):
                return cond, neg
        if self._prompt_rows is not None:
            warnings.warn(
                "Could not match the prompt's tokens to the denoiser's batch; maps are unlabelled (use .token(i)).",
                stacklevel=3,
            )
        blank = [unlabelled(self._num_keys) for _ in range(rows)]
        return blank, list(blank)

    def _build(self) -> AttentionMaps:
        self._flush()
        if not self._groups:
            raise RecorderStateError(self._no_capture_reason())
        assert self._latent_size is not None
        H, W = self._map_size()
        means, head_means = self._per_layer()
        order = [
            n.removesuffix(".processor") for n in self._captured if n.removesuffix(".processor") in means
        ]
        layers = {n: _grid_maps(means[n], self._layer_hw[n]) for n in order}  # (B', T[, F], h, w) each
        del means  # laid out afresh as the layers' maps: the sums need not stay alive beside them
        aggregate = _resized_mean(list(layers.values()), (H, W))  # (B', T, H, W)
        steps = self._step_maps()  # (S, B', T[, F], hs, ws)
        heads = None
        if head_means is not None:  # (B', heads, T, h, w) each
            heads = {n: _grid_maps(head_means[n], self._layer_hw[n]) for n in order}
        probs = (
            {n: torch.stack(self._probs[n]) for n in order} if self.keep_probs else None
        )  # (S, B', heads, HW, T)
        timesteps = torch.tensor(self._timesteps, dtype=torch.float32)  # (S,) host floats: no device read

        T, C = self._num_keys, len(self.concepts)
        # one part of every row and no concept columns: each tensor above is this build's own, nothing to separate
        solo = self._split is None and not C

        def own(x: torch.Tensor, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
            if solo and x.device.type == "cpu" and x.dtype == (dtype or x.dtype):
                return x.contiguous()  # made by this build: no second copy
            return x.to("cpu", dtype or x.dtype, copy=True)  # a copy: halves never share storage

        def text(x: torch.Tensor, dim: int) -> torch.Tensor:
            return x.narrow(dim, 0, T) if C else x  # the prompt's key positions (concepts come after them)

        def concept(x: torch.Tensor, dim: int) -> torch.Tensor:
            return x.narrow(dim, T, C)

        def part(rows: slice) -> dict[str, Any]:
            out = dict(
                aggregate=own(text(aggregate[rows], 1)),
                layers={n: own(text(m[rows], 1)) for n, m in layers.items()},
                steps=None if steps is None else own(text(steps[:, rows], 2)),
                layer_heads=None if heads is None else {n: own(text(m[rows], 2)) for n, m in heads.items()},
                probs=None
                if probs is None
                else {n: own(text(m[:, rows], 4), None) for n, m in probs.items()},
                timesteps=timesteps.clone(),
            )
            if C:
                out.update(
                    concepts=list(self.concepts),
                    concept_aggregate=own(concept(aggregate[rows], 1)),
                    concept_layers={n: own(concept(m[rows], 1)) for n, m in layers.items()},
                    concept_steps=None if steps is None else own(concept(steps[:, rows], 2)),
                )
            return out

        common = dict(
            latent_size=(H, W),
            frames=self._frames,
            vae_scale=vae_scale_factor(self.pipe),
            skipped_layers=list(self.skipped_layers),
            family=self.family.name,
            kind=self.kind,
            edited=self._edited,
            relation=self.relation,
            query_masks=None if self._qmasks is None else self._qmasks.clone(),
        )
        if self._split is not None:
            neg_rows, cond_rows = self._split
        else:
            cond_rows, neg_rows = slice(None), None
        rows = int(aggregate[cond_rows].shape[0])
        cond_labels, neg_labels = self._labels(rows)
        negative = None
        if neg_rows is not None:
            negative = AttentionMaps(**part(neg_rows), token_lists=neg_labels, **common)  # type: ignore[arg-type]
        return AttentionMaps(
            **part(cond_rows),
            token_lists=cond_labels,
            negative=negative,
            provenance=dict(self._provenance),
            **common,
        )  # type: ignore[arg-type]


_EMPTY: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_FREE_CPU: list[float] = [-math.inf, 0.0]  # (when, bytes): the latest reading of the host's free memory
_FREE_FOR_S = 1.0  # a reading this recent is trusted where a plan needs at most half of it


def _check_fits(p: Plan, device: torch.device, max_bytes: int | None) -> None:
    """:func:`budget.check_fits`, without reading the host's free memory again (a ``/proc`` read every call) where
    a reading under a second old leaves twice the room the plan needs; any closer call reads afresh."""
    if device.type == "cpu" and not os.environ.get("SDEXPLORE_AVAILABLE_BYTES"):
        when, free = _FREE_CPU
        if time.monotonic() - when < _FREE_FOR_S and 2 * p.nbytes * 2 <= free:  # on the CPU: twice the bytes
            return
        free_now = budget.available_bytes(device)
        if free_now is not None:
            _FREE_CPU[:] = [time.monotonic(), float(free_now)]
    budget.check_fits(p, device, max_bytes)


def _rows(x: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """``x[rows]``; ``x`` itself where ``rows`` is every row (no view to make)."""
    if x is None or (rows.start is None and rows.stop is None and rows.step is None):
        return x
    return x[rows]


def _empty(like: torch.Tensor) -> torch.Tensor:
    """A (1, 1, 1) tensor for baddbmm's ignored input (beta=0), made once per dtype and device."""
    key = (like.dtype, like.device)
    base = _EMPTY.get(key)
    if base is None:
        base = _EMPTY[key] = torch.zeros(1, 1, 1, dtype=like.dtype, device=like.device)
    return base


def _upsized(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`~sdexplore.heatmaps.resize` of maps (..., h, w) to ``size``; where no side shrinks, by the plain
    bilinear kernel: antialiasing only widens the filter when shrinking, so the values are the same (to float
    rounding, ~1e-7), at half the cost of the antialiased kernel (which every recorded call pays)."""
    h, w = maps.shape[-2:]
    if size[0] < h or size[1] < w or tuple(maps.shape[-2:]) == tuple(size) or maps.numel() == 0:
        return resize(maps, size)
    flat = maps.reshape(1, -1, h, w).float()  # (1, N, h, w)
    out = torch.nn.functional.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return out.reshape(*maps.shape[:-2], *size).to(maps.dtype)  # (..., H, W)


def _resized_mean(maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Mean of maps (..., h_i, w_i) resized to ``size``, summed a run of layers at a time: consecutive layers on one
    grid are resized together (resizing treats every map alone, so the values are those of one resize per map),
    at most :data:`RESIZE_BYTES` of resized maps at once. Resizing every layer at once would hold them all at the
    full size, twice (SD3.5-medium at 1024²: 24 layers × 333 tokens × 128² cells, 0.5 GiB a copy)."""
    one = 4 * math.prod(maps[0].shape[:-2]) * size[0] * size[1]  # float32 bytes of one resized map
    chunk = max(1, RESIZE_BYTES // max(one, 1))
    total, i = None, 0
    while i < len(maps):
        j = i + 1
        while j < len(maps) and j - i < chunk and maps[j].shape == maps[i].shape:
            j += 1
        part = _upsized(torch.stack(maps[i:j]), size).sum(0)  # (..., H, W): layers i..j-1 summed
        total = part if total is None else total.add_(part)
        i = j
    assert total is not None
    return total.div_(len(maps))


def _grid_maps(flat: torch.Tensor, hw: tuple[int, ...]) -> torch.Tensor:
    """(..., HW, T) sums → (..., T, h, w) maps; a video's (..., FHW, T) → (..., T, F, h, w)."""
    return flat.transpose(-1, -2).reshape(*flat.shape[:-2], flat.shape[-1], *hw)  # (..., T, h, w)


def _select_layers(names: list[str], layers: LayerFilter) -> list[str]:
    if layers is None:
        return list(names)
    if callable(layers):
        chosen = [n for n in names if layers(n.removesuffix(".processor"))]
    else:
        subs = [layers] if isinstance(layers, str) else list(layers)
        chosen = [n for n in names if any(s in n for s in subs)]
    if not chosen:
        listed = ", ".join(n.removesuffix(".processor") for n in names)
        raise InvalidArgumentError(
            f"layers={layers!r} matches no cross-attention layer. Cross-attention layers: {listed}"
        )
    return chosen
