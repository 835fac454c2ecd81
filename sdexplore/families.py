"""Model families (SD 1.x, SD 2.x, SDXL, SD3, Flux.1, Flux.2, PixArt-Σ): everything model-specific lives here, one
record per family."""

from __future__ import annotations

import functools
import inspect
import json
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .errors import InvalidArgumentError, UnsupportedPipelineError
from .preview import ConvPreview, fit_linear_preview, preview_swatches


@dataclass(frozen=True)
class DenoiserArgs:
    """Where the denoiser's ``forward`` finds its inputs, as (keyword, position) pairs.

    The attachment reads the noisy sample, the timestep and the text conditioning through these, and a prompt
    switch replaces the text (and pooled text) through them, so a transformer denoiser with other argument names
    is a new record, not a new recorder.
    """

    sample: tuple[str, int] = ("sample", 0)
    timestep: tuple[str, int] = ("timestep", 1)
    text: tuple[str, int] = ("encoder_hidden_states", 2)
    # The pooled text embedding, either (keyword holding a dict, key) — SDXL's ("added_cond_kwargs",
    # "text_embeds") — or an argument of its own, (keyword, position) — SD3's ("pooled_projections", 2).
    pooled: tuple[str, str] | tuple[str, int] | None = None
    # Flux.1-dev's distilled guidance: the scale itself is an input (B,) of the denoiser (None where it has none)
    guidance: tuple[str, int] | None = None
    # Token positions of the image tokens (Flux's img_ids (N, 3): 0, row, column; Flux.2's (B, N, 4): 0, row,
    # column, 0), which give the latent grid of packed latents
    positions: tuple[str, int] | None = None
    # The denoiser takes the sample and the text as lists of per-row tensors (Z-Image: latents (C, 1, h, w), caption
    # features (L_i, D) of each row's own length); get() hands them on as one batch, (B, C, h, w) and (B, T, D)
    # zero-padded to the longest
    per_row: bool = False

    def _pooled_in_dict(self) -> bool:
        return self.pooled is not None and isinstance(self.pooled[1], str)

    def get(self, which: str, args: tuple, kwargs: dict) -> Any:
        """The value of input ``which`` ("sample", "timestep", "text", "pooled") in a forward call, or None."""
        if which == "pooled":
            if self.pooled is None:
                return None
            if self._pooled_in_dict():
                holder = kwargs.get(self.pooled[0])
                return None if not holder else holder.get(self.pooled[1])
        where = getattr(self, which)
        if where is None:
            return None
        name, pos = where
        value = kwargs[name] if name in kwargs else (args[pos] if len(args) > pos else None)
        if self.per_row and which in ("sample", "text") and isinstance(value, (list, tuple)):
            if which == "sample":
                return torch.stack(value)[:, :, 0]  # (B, C, 1, h, w) → (B, C, h, w)
            return torch.nn.utils.rnn.pad_sequence(list(value), batch_first=True)  # (B, T, D)
        return value

    def replace(self, which: str, args: tuple, kwargs: dict, value: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of a forward call with input ``which`` set to ``value`` (the originals untouched)."""
        kwargs = dict(kwargs)
        if which == "pooled":
            assert self.pooled is not None
            if self._pooled_in_dict():
                kwargs[self.pooled[0]] = {**kwargs[self.pooled[0]], self.pooled[1]: value}
                return args, kwargs
        where = getattr(self, which)
        if where is None or (self.per_row and which in ("sample", "text")):
            raise InvalidArgumentError(f"This denoiser has no {which!r} input to replace.")
        name, pos = where
        if name in kwargs or len(args) <= pos:
            kwargs[name] = value
            return args, kwargs
        return (*args[:pos], value, *args[pos + 1 :]), kwargs


@dataclass(frozen=True)
class TextEncoding:
    """What a pipeline's ``encode_prompt`` returned, named: (N, tokens, D) embeddings, (N, P) pooled ones."""

    embeds: torch.Tensor
    negative: torch.Tensor | None
    pooled: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


#: What a family can do, by name (``Family.capabilities``); ``tests/test_conformance.py`` checks each one a family
#: claims, and checks that each one it lacks is refused with one clear error.
CAPABILITIES: dict[str, str] = {
    "steps": "every timestep recorded (latents, predictions, x0, previews): sdexplore.observe(pipe, steps=True)",
    "steering": "steps changed while they run (latent edits, prompt switches, guidance schedules)",
    "stop_at": "a run stopped after k steps (StepRecorder(stop_at=k), through the pipeline's interrupt flag)",
    "attention": "per-token attention maps: sdexplore.observe(pipe, attention=True)",
    "concepts": "maps of words not in the prompt: AttentionRecorder(concepts=[...])",
    "controls": "attention controls: Reweight, WordSwap, Refine, LocalBlend",
    "inject": "Inject: image keys and values of joint attention taken from a source run",
    "invert": "sdexplore.invert: a picture back to its starting noise",
    "null-text": "null-text inversion (optimised unconditional embeddings)",
    "flowedit": "FlowEdit: inversion-free editing on a flow-matching model",
    "walks": "sdexplore.walk: frames between prompts and seeds",
    "directions": "directions in text or inner space, found and applied",
    "ablate-text": "text-token ablation (a word's keys removed from attention)",
}

_UNET_CAPS = frozenset(
    {
        "steps",
        "steering",
        "stop_at",
        "attention",
        "concepts",
        "controls",
        "invert",
        "null-text",
        "walks",
        "directions",
        "ablate-text",
    }
)
_MMDIT_CAPS = frozenset(
    {
        "steps",
        "steering",
        "stop_at",
        "attention",
        "concepts",
        "controls",
        "inject",
        "invert",
        "flowedit",
        "walks",
        "directions",
        "ablate-text",
    }
)


@dataclass(frozen=True)
class Family:
    """What sdexplore needs to know about one model family.

    Adding a family (SD3, Flux, ...) means adding one record to :data:`FAMILIES`; the attachment, recorders,
    walks and widgets read only these fields and methods.
    """

    name: str  # short id: "sd1", "sd2", "sdxl", "sd3", "flux", "flux2"
    label: str  # human name for tables and plots
    pipeline_classes: tuple[str, ...]  # diffusers pipeline class names this family covers
    text_encoders: tuple[str, ...]  # pipeline attribute names of the text encoders, in concat order
    tokenizers: tuple[str, ...]  # pipeline attribute names of the tokenizers (same order)
    latent_channels: int  # channels of the VAE latent
    # (latent_channels, 3): latent → RGB in [-1, 1]; None where none are published (Sana's DC-AE): then
    # latent_rgb() fits factors from the pipeline's own VAE, once per VAE
    latent_rgb_factors: tuple[tuple[float, float, float], ...] | None
    latent_rgb_bias: tuple[float, float, float]  # added after the factors
    pooled_text_embeds: bool  # does the denoiser take a pooled text embedding (SDXL's add_text_embeds)?
    cfg_uncond_first: bool = True  # in the CFG batch the unconditional half comes first
    denoiser: str = "unet"  # pipeline attribute of the denoising network the attachment hooks
    denoiser_args: DenoiserArgs = DenoiserArgs()  # where its forward finds sample, timestep and text
    optional_text_encoders: tuple[str, ...] = ()  # encoders a pipeline may leave out (SD3's T5: None)
    size_conditioning: bool = False  # SDXL: the UNet also takes (original size, crop, target size) "time ids"
    clip_sequence: tuple[str, ...] | None = None  # encoders whose hidden states fill the first 77 positions,
    # concatenated along the features (None: all of text_encoders; SD3: CLIP-L, CLIP-G, with T5's tokens after)
    prompt_arguments: tuple[str, ...] = ()  # further prompts encode_prompt requires (SD3: prompt_2, prompt_3)
    encode_options: tuple[
        str, ...
    ] = ()  # call arguments that shape encode_prompt's output (max_sequence_length)
    # Does the denoiser see one (uncond, cond) batch under classifier-free guidance? Flux: no. Flux.1-dev is
    # guidance-distilled (the scale is a denoiser input); its optional "true CFG" (true_cfg_scale > 1 with a
    # negative prompt) calls the denoiser twice per step, the prompt first, then the negative prompt.
    cfg_batch: bool = True
    # Latent packing: the denoiser sees (B, h/p · w/p, C·p²) tokens of p×p latent patches instead of (B, C, h, w)
    # latents (Flux: p = 2, diffusers' _pack_latents); the scheduler steps the packed tokens too.
    latent_packing: int = 1
    # Without a CFG batch, which pipeline property says whether a call runs CFG as two denoiser calls per step
    # (Flux.2 [klein]: do_classifier_free_guidance, i.e. guidance_scale > 1 on a model that is not step-distilled,
    # at guidance_scale); None: Flux.1's rule, true_cfg_scale > 1 with a negative prompt (see true_cfg)
    cfg_flag: str | None = None
    # What sdexplore can do with this family: names from CAPABILITIES. Anything missing is refused with
    # UnsupportedPipelineError (or InvalidArgumentError for an option) naming the families that can.
    capabilities: frozenset[str] = frozenset()
    # Call arguments a plain call of this family's pipelines needs, true of the real models (PixArt-Σ: no
    # resolution binning, whose aspect-ratio table starts at 256 pixels); what only the tiny fixtures need is in
    # fixtures.FIXTURE_CALL_DEFAULTS
    call_defaults: tuple[tuple[str, Any], ...] = ()
    # What the pipeline's encode_prompt returns, by position, where it is not (embeds, negative[, pooled, negative
    # pooled]): PixArt-Σ's is ("embeds", "mask", "negative", "negative_mask")
    encode_layout: tuple[str, ...] | None = None
    # The denoiser predicts ε and a learned variance in one (B, 2C, h, w) output (PixArt); the pipeline keeps the
    # first C channels before scheduler.step, and so do prediction()'s readers
    learned_variance: bool = False
    # A CFG-batch pipeline without a do_classifier_free_guidance property (PixArt decides in a local variable):
    # CFG runs where the call's guidance_scale exceeds 1
    cfg_from_guidance_scale: bool = False
    # The scheduler steps -output (Z-Image's denoiser predicts x0 − ε; the pipeline negates it), and the CFG is
    # c + g·(c − u) = u + (g + 1)·(c − u): the recorded scale is the pipeline's plus cfg_scale_offset
    negated_output: bool = False
    cfg_scale_offset: float = 0.0
    # Video: latents (B, C, F, h, w) with F latent frames (Wan: (frames − 1) / 4 + 1); every recorded latent, preview
    # and map keeps the F axis before (h, w). Image families: (B, C, h, w), no F axis anywhere
    video: bool = False
    # A second denoiser some pipelines of the family switch to mid-run (Wan 2.2 A14B's low-noise transformer_2): only
    # `denoiser` is observed, so a pipeline that has one is refused
    second_denoiser: str | None = None
    # A transformer whose text enters through cross-attention (attn2, as in a UNet's blocks: PixArt-Σ, Sana, Wan),
    # not joint attention: its maps are kind "cross"
    cross_attention: bool = False
    # The native image side in pixels where neither the denoiser's config (sample_size) nor the pipeline
    # (default_sample_size) says it: Z-Image's call fills a missing height or width with 1024 in its body
    native_size: int | None = None

    def can(self, capability: str) -> bool:
        """Whether this family has ``capability`` (a key of :data:`CAPABILITIES`)."""
        if capability not in CAPABILITIES:
            raise InvalidArgumentError(
                f"Unknown capability {capability!r}; choose one of {', '.join(CAPABILITIES)}."
            )
        return capability in self.capabilities

    def require(self, capability: str, what: str, *, why: str = "", hint: str = "") -> Family:
        """This family, if it has ``capability``; else :class:`~sdexplore.errors.UnsupportedPipelineError` in one
        sentence naming the families that can (from their records: :func:`capable_families`).

        The one way every module refuses a capability: ``what`` names the tool (``"sdexplore.invert"``; the
        sentence reads "Sana cannot use sdexplore.invert: why. The families that can: ... hint"), ``why``
        (optional) says what the family lacks, ``hint`` (optional) what to do instead.
        """
        if self.can(capability):
            return self
        raise UnsupportedPipelineError(refusal(self, capability, what, why=why, hint=hint))

    def prediction(self, output: torch.Tensor) -> torch.Tensor:
        """The prediction the scheduler steps with, out of a denoiser output: ε alone where the denoiser also
        predicts a learned variance (PixArt's (B, 2C, h, w) → (B, C, h, w), a view), else the output itself."""
        if isinstance(output, (list, tuple)):  # Z-Image: one (C, 1, h, w) per row
            output = torch.stack(output)[:, :, 0]  # (B, C, h, w)
        if self.negated_output:
            return -output
        if self.learned_variance and output.ndim == 4 and output.shape[1] == 2 * self.latent_channels:
            return output[
                :, : self.latent_channels
            ]  # (B, C, h, w): the ε half, as the pipeline's chunk(2)[0]
        return output

    def batch_cfg(self, pipe: Any, arguments: dict[str, Any]) -> bool:
        """Whether a call of ``pipe`` with these (bound) arguments runs one (uncond, cond) CFG batch: the pipeline's
        own ``do_classifier_free_guidance`` where it has one, else ``guidance_scale > 1`` (PixArt's rule)."""
        if not self.cfg_batch:
            return False
        if self.cfg_from_guidance_scale:
            scale = arguments.get("guidance_scale", _call_default(pipe, "guidance_scale"))
            return scale is not None and float(scale) > 1.0
        try:
            return bool(getattr(pipe, "do_classifier_free_guidance", False))
        except (AttributeError, TypeError):
            return False

    def guidance_scale_of(self, pipe: Any, arguments: dict[str, Any]) -> float:
        """The guidance scale of a running call: the pipeline's ``_guidance_scale`` where it keeps one, else the
        call's ``guidance_scale`` or its default (PixArt keeps none)."""
        scale = getattr(pipe, "_guidance_scale", None)
        if scale is None and self.cfg_from_guidance_scale:
            scale = arguments.get("guidance_scale", _call_default(pipe, "guidance_scale"))
        return 1.0 if scale is None else float(scale) + self.cfg_scale_offset

    def true_cfg_scale(self, pipe: Any, arguments: dict[str, Any]) -> float:
        """The call's ``true_cfg_scale``, or its pipeline's default (Flux 1.0, Qwen-Image 4.0)."""
        scale = arguments.get("true_cfg_scale", _call_default(pipe, "true_cfg_scale"))
        return 1.0 if scale is None else float(scale)

    def present_tokenizers(self, pipe: Any) -> list[tuple[str, Any]]:
        """``(attribute, tokenizer)`` of each tokenizer the pipeline has, in order (SD3 may lack T5's)."""
        return [(n, t) for n in self.tokenizers if (t := getattr(pipe, n, None)) is not None]

    def get_denoiser(self, pipe: Any) -> torch.nn.Module:
        """The pipeline's denoising network (``pipe.unet`` for the UNet families)."""
        module = getattr(pipe, self.denoiser, None)
        if module is None:
            raise UnsupportedPipelineError(
                f"{type(pipe).__name__} has no {self.denoiser!r}: sdexplore observes the {self.label} denoiser there."
            )
        if self.second_denoiser is not None and getattr(pipe, self.second_denoiser, None) is not None:
            raise UnsupportedPipelineError(
                f"This {type(pipe).__name__} switches to a second denoiser ({self.second_denoiser}) mid-run, which "
                f"sdexplore does not observe yet: load a single-transformer {self.label} model (Wan 2.1 T2V)."
            )
        return module

    def cfg_halves(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(uncond, cond)`` halves of a CFG batch (2B, ...) in this family's layout; views, no copy."""
        a, b = batch.chunk(2)  # (B, ...) each
        return (a, b) if self.cfg_uncond_first else (b, a)

    def cfg_rows(self, rows: int) -> tuple[slice, slice]:
        """``(uncond, cond)`` row slices of a CFG batch of ``rows`` rows."""
        half = rows // 2
        first, second = slice(0, half), slice(half, rows)
        return (first, second) if self.cfg_uncond_first else (second, first)

    def join_cfg(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The CFG batch (2B, ...) from its halves, in this family's layout."""
        return torch.cat([uncond, cond] if self.cfg_uncond_first else [cond, uncond])

    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) as the denoiser's tokens (B, h/p · w/p, C·p²) (identity for p = 1); exactly
        diffusers' ``FluxPipeline._pack_latents``, so that ``unpack_latents(pack_latents(x), h, w)`` is ``x``."""
        p = self.latent_packing
        if p == 1:
            return latents
        b, c, h, w = latents.shape
        x = latents.reshape(b, c, h // p, p, w // p, p)  # (B, C, h/p, p, w/p, p)
        x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h/p, w/p, C, p, p)
        return x.reshape(b, (h // p) * (w // p), c * p * p)  # (B, h/p · w/p, C·p²)

    def unpack_latents(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The denoiser's tokens (B, h/p · w/p, C·p²) as latents (B, C, h, w), ``grid`` = (h, w) in latent cells
        (diffusers' ``FluxPipeline._unpack_latents``); identity for unpacked families."""
        p = self.latent_packing
        if p == 1:
            return tokens
        b, n, cp = tokens.shape
        h, w = grid
        if n != (h // p) * (w // p) or cp % (p * p):
            raise InvalidArgumentError(
                f"Packed latents {tuple(tokens.shape)} do not fit a {h}×{w} latent grid of {p}×{p} patches."
            )
        x = tokens.reshape(b, h // p, w // p, cp // (p * p), p, p)  # (B, h/p, w/p, C, p, p)
        x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, h/p, p, w/p, p)
        return x.reshape(b, cp // (p * p), h, w)  # (B, C, h, w)

    def latent_grid(self, sample: torch.Tensor, args: tuple, kwargs: dict) -> tuple[int, int]:
        """(h, w) in latent cells of the latents behind a denoiser input ``sample``.

        Unpacked families read it off the sample (B, C, h, w). Packed ones (Flux) read the last image token's
        position (row, column) from the denoiser's position ids — one small host read, made once per run.
        """
        if self.latent_packing == 1:
            return int(sample.shape[-2]), int(sample.shape[-1])
        ids = self.denoiser_args.get("positions", args, kwargs)
        # Qwen-Image's img_shapes: [[(1, h/p, w/p)]] per row
        if isinstance(ids, (list, tuple)) and ids and ids[0]:
            _, rows, cols = ids[0][0]
            return int(rows) * self.latent_packing, int(cols) * self.latent_packing
        if ids is None:
            raise UnsupportedPipelineError(
                f"The {self.label} denoiser was called without image position ids; sdexplore cannot tell the "
                "latent grid of its packed latents."
            )
        row, col = (int(v) for v in ids.reshape(-1, ids.shape[-1])[-1, 1:3].tolist())  # last token: (0, r, c)
        p = self.latent_packing
        h, w = (row + 1) * p, (col + 1) * p
        if (h // p) * (w // p) != sample.shape[1]:
            raise UnsupportedPipelineError(
                f"The {self.label} denoiser's image tokens {tuple(sample.shape)} do not match its position ids "
                f"({h // p}×{w // p} patches); sdexplore cannot unpack them."
            )
        return h, w

    def has_distilled_guidance(self, pipe: Any) -> bool:
        """Whether the denoiser takes the guidance scale as an input (Flux.1-dev; not schnell, not CFG families)."""
        if self.denoiser_args.guidance is None:
            return False
        return bool(getattr(self.get_denoiser(pipe).config, "guidance_embeds", False))

    def true_cfg(self, arguments: dict[str, Any], pipe: Any = None) -> bool:
        """For a family without a CFG batch: does a call with these arguments run classifier-free guidance as two
        denoiser calls per step (Flux: ``true_cfg_scale > 1`` and a negative prompt, as ``FluxPipeline`` decides;
        Flux.2 [klein]: the pipeline's own ``do_classifier_free_guidance``, read from ``pipe`` during its call)?"""
        if self.cfg_batch:
            return False
        if self.cfg_flag is not None:
            return pipe is not None and bool(getattr(pipe, self.cfg_flag, False))
        scale = arguments.get("true_cfg_scale", 1.0) if pipe is None else self.true_cfg_scale(pipe, arguments)
        has_negative = arguments.get("negative_prompt") is not None or (
            arguments.get("negative_prompt_embeds") is not None
            and arguments.get("negative_pooled_prompt_embeds") is not None
        )
        return scale is not None and float(scale) > 1 and has_negative

    def cross_attention_layers(self, unet: torch.nn.Module) -> list[str]:
        """Processor names (keys of ``unet.attn_processors``) of the cross-attention layers.

        Detected structurally, not by size: an ``Attention`` module named ``attn2`` in a transformer block
        (diffusers' convention for text cross-attention). Read from the module tree directly, which is several
        times cheaper than building ``unet.attn_processors``.
        """
        return [
            f"{name}.processor"
            for name, module in unet.named_modules()
            if name.rpartition(".")[2] == "attn2" and hasattr(module, "set_processor")
        ]

    def encode_prompt(
        self,
        pipe: Any,
        prompt: Any,
        *,
        device: Any,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: Any = None,
        clip_skip: int | None = None,
        **options: Any,
    ) -> TextEncoding:
        """Call the pipeline's own ``encode_prompt`` and name what it returns (its tuple differs per family).

        ``options`` are passed on where the family lists them in :attr:`encode_options` (SD3's
        ``max_sequence_length``: the T5 length of the embedding) and dropped otherwise; the family's further
        prompts (SD3's ``prompt_2``, ``prompt_3``) are None, i.e. the same prompt for every text encoder.
        """
        extra: dict[str, Any] = {k: None for k in self.prompt_arguments}
        skip: dict[str, Any] = {"clip_skip": clip_skip}
        if (
            self.encode_layout is not None
        ):  # PixArt, Sana: no negative means "" and the call's defaults hold here
            negative_prompt = "" if negative_prompt is None else negative_prompt
            accepted = signature_of(pipe.encode_prompt).parameters
            extra.update({k: v for k, v in self.call_defaults if k in accepted})
            if "clip_skip" not in accepted and "kwargs" not in accepted:  # Sana's encode_prompt takes none
                if clip_skip is not None:
                    raise InvalidArgumentError(
                        f"The {self.label} pipelines take no clip_skip; leave it None."
                    )
                skip = {}
        extra.update({k: v for k, v in options.items() if k in self.encode_options and v is not None})
        if not self.cfg_batch:
            return self._encode_without_cfg_batch(
                pipe,
                prompt,
                device,
                num_images_per_prompt,
                do_classifier_free_guidance,
                negative_prompt,
                clip_skip,
                extra,
            )
        out = pipe.encode_prompt(
            prompt=prompt,
            device=device,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_classifier_free_guidance,
            negative_prompt=negative_prompt,
            **skip,
            **extra,
        )
        if self.encode_layout is not None:
            named = dict(zip(self.encode_layout, out, strict=False))
            return TextEncoding(
                named["embeds"], named.get("negative"), named.get("pooled"), named.get("negative_pooled")
            )
        # SDXL and SD3 both return (embeds, negative, pooled, negative pooled); SD3's embeds are the CLIP-L ‖
        # CLIP-G hidden states (zero-padded to T5's width) followed by T5's along the token axis.
        if self.pooled_text_embeds:
            return TextEncoding(out[0], out[1], out[2], out[3])
        return TextEncoding(out[0], out[1])

    def _encode_without_cfg_batch(
        self,
        pipe: Any,
        prompt: Any,
        device: Any,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: Any,
        clip_skip: int | None,
        extra: dict[str, Any],
    ) -> TextEncoding:
        # Flux's encode_prompt(prompt, prompt_2, device, num_images_per_prompt, ..., max_sequence_length) returns
        # (T5 sequence (N, L, 4096), CLIP-L pooled (N, 768), text ids (L, 3)) for one prompt: no negative half and
        # no clip_skip. The negative is encoded the same way, and only when one is given (its "true CFG").
        # Flux.2 [klein]'s encode_prompt(prompt, device, num_images_per_prompt, ..., max_sequence_length,
        # text_encoder_out_layers) returns (Qwen3 layers stacked (N, L, 3·D), text ids (N, L, 4)): no pooled vector.
        if clip_skip is not None:
            raise InvalidArgumentError(f"The {self.label} pipelines take no clip_skip; leave it None.")

        accepted = signature_of(pipe.encode_prompt).parameters
        count = "num_videos_per_prompt" if "num_videos_per_prompt" in accepted else "num_images_per_prompt"
        if "do_classifier_free_guidance" in accepted:  # Wan: the negative is encoded below, when one is given
            extra = {**extra, "do_classifier_free_guidance": False}

        def encode(text: Any) -> tuple[torch.Tensor, torch.Tensor]:
            out = pipe.encode_prompt(prompt=text, device=device, **{count: num_images_per_prompt}, **extra)
            return out[0], (out[1] if self.pooled_text_embeds else None)

        embeds, pooled = encode(prompt)
        if not do_classifier_free_guidance or negative_prompt is None:
            return TextEncoding(embeds, None, pooled, None)
        negative, negative_pooled = encode(negative_prompt)
        return TextEncoding(embeds, negative, pooled, negative_pooled)


def _call_default(pipe: Any, name: str) -> Any:
    """The default of argument ``name`` of ``pipe.__call__`` (None where it has none)."""
    param = signature_of(type(pipe).__call__).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


@functools.lru_cache(maxsize=512)
def _signature(func: Any, bound: bool) -> inspect.Signature:
    sig = inspect.signature(func)
    if bound:  # what inspect.signature gives for the bound method: the first parameter (self) dropped
        sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    return sig


def signature_of(fn: Any) -> inspect.Signature:
    """``inspect.signature(fn)``, worked out once per function (keyed on the function object, never an instance):
    a bound method's is its function's without ``self``. Every observed call reads the pipeline's signatures; this
    keeps that reading off each call's cost."""
    func = getattr(fn, "__func__", None)
    try:
        if func is not None and getattr(fn, "__self__", None) is not None:
            return _signature(func, True)
        return _signature(fn, False)
    except TypeError:  # an unhashable callable: not remembered
        return inspect.signature(fn)


# Latent → RGB factors as published with ComfyUI's latent formats (rows = latent channels, columns = R, G, B).
_SD_FACTORS = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SDXL_FACTORS = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)

SD1 = Family(
    name="sd1",
    label="Stable Diffusion 1.x",
    pipeline_classes=(
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    ),
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    latent_channels=4,
    latent_rgb_factors=_SD_FACTORS,
    latent_rgb_bias=(0.0, 0.0, 0.0),
    pooled_text_embeds=False,
    capabilities=_UNET_CAPS,
)
SD2 = replace(SD1, name="sd2", label="Stable Diffusion 2.x")
SDXL = Family(
    name="sdxl",
    label="Stable Diffusion XL",
    pipeline_classes=(
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    ),
    text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"),
    latent_channels=4,
    latent_rgb_factors=_SDXL_FACTORS,
    latent_rgb_bias=(0.1084, -0.0175, -0.0011),
    pooled_text_embeds=True,
    denoiser_args=DenoiserArgs(pooled=("added_cond_kwargs", "text_embeds")),
    size_conditioning=True,
    capabilities=_UNET_CAPS,
)

# SD3's 16-channel VAE, from ComfyUI's comfy/latent_formats.py, class SD3 (latent_rgb_factors and
# latent_rgb_factors_bias). Which latents they expect: ComfyUI samples in "model space", process_in(z) =
# (z − shift_factor) · scale_factor (comfy/samplers.py `sample`: latent_image = model.process_latent_in(...)), and
# its Latent2RGBPreviewer (latent_preview.py) applies the factors to the sampler's denoised x0 in that space, before
# process_out. That is exactly diffusers' SD3 latents = (z − 0.0609) · 1.5305, so the factors apply to the
# sampling-space latents as they are, like every other family's (the factors and bias were fitted there). Only a
# VAE decode needs z = latents / scale + shift (decoding.decode_with).
_SD3_FACTORS = (
    (-0.0922, -0.0175, 0.0749),
    (0.0311, 0.0633, 0.0954),
    (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496),
    (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427),
    (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268),
    (0.0922, 0.0988, 0.0951),
    (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895),
    (-0.0069, -0.0030, -0.0810),
    (-0.0596, -0.0465, -0.0293),
    (-0.1448, -0.1463, -0.1189),
)

SD3 = Family(
    name="sd3",
    label="Stable Diffusion 3 / 3.5",
    pipeline_classes=(
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
    ),
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),  # CLIP-L, CLIP-G, T5-XXL
    tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"),
    latent_channels=16,
    latent_rgb_factors=_SD3_FACTORS,
    latent_rgb_bias=(0.2394, 0.2135, 0.1925),
    pooled_text_embeds=True,  # CLIP-L ‖ CLIP-G pooled → the transformer's pooled_projections
    denoiser="transformer",  # SD3Transformer2DModel (MMDiT)
    # SD3Transformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, ...)
    denoiser_args=DenoiserArgs(
        sample=("hidden_states", 0),
        timestep=("timestep", 3),
        text=("encoder_hidden_states", 1),
        pooled=("pooled_projections", 2),
    ),
    optional_text_encoders=("text_encoder_3",),
    clip_sequence=("text_encoder", "text_encoder_2"),
    prompt_arguments=("prompt_2", "prompt_3"),
    encode_options=("max_sequence_length",),
    capabilities=_MMDIT_CAPS,
)

# Flux.1's 16-channel VAE, from ComfyUI's comfy/latent_formats.py, class Flux (latent_rgb_factors and
# latent_rgb_factors_bias; comfyanonymous/ComfyUI at commit 040a3243). As for SD3 they apply to the sampling-space
# latents, (z − 0.1159) · 0.3611 in both ComfyUI (process_in) and diffusers (the VAE's shift and scaling factors),
# after unpacking Flux's 2×2 token packing.
_FLUX_FACTORS = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)

FLUX = Family(
    name="flux",
    label="Flux.1",
    pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    text_encoders=("text_encoder", "text_encoder_2"),  # CLIP-L (pooled only), T5-XXL (the sequence)
    tokenizers=("tokenizer", "tokenizer_2"),
    latent_channels=16,
    latent_rgb_factors=_FLUX_FACTORS,
    latent_rgb_bias=(-0.0329, -0.0718, -0.0851),
    pooled_text_embeds=True,  # CLIP-L pooled → the transformer's pooled_projections
    denoiser="transformer",  # FluxTransformer2DModel: double-stream (MMDiT) blocks, then single-stream blocks
    # FluxTransformer2DModel.forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
    # txt_ids, guidance, ...); FluxPipeline passes everything by keyword, and timestep as t / 1000
    denoiser_args=DenoiserArgs(
        sample=("hidden_states", 0),
        timestep=("timestep", 3),
        text=("encoder_hidden_states", 1),
        pooled=("pooled_projections", 2),
        guidance=("guidance", 6),
        positions=("img_ids", 4),
    ),
    clip_sequence=(),  # the sequence is T5's alone; CLIP gives the pooled vector only
    prompt_arguments=("prompt_2",),
    encode_options=("max_sequence_length",),
    cfg_batch=False,
    latent_packing=2,
    # directions need one CFG batch per step, which Flux's guidance is not
    capabilities=_MMDIT_CAPS - {"directions"},
)

# Flux.2's 32-channel VAE, from ComfyUI's comfy/latent_formats.py, class Flux2 (latent_rgb_factors,
# latent_rgb_factors_bias; Comfy-Org/ComfyUI at commit 9a9a69f). ComfyUI samples Flux.2 in the 128-channel space of
# 2×2-patchified latents normalised by the VAE's batch-norm statistics (process_in is the identity) and applies the
# 32 rows after its latent_rgb_factors_reshape, (B, 32·2·2, h, w) → (B, 32, 2h, 2w) with channel c·4 + 2·dy + dx —
# the same layout as diffusers' _patchify_latents and as this family's unpacking of the transformer's tokens. So the
# factors apply to the recorded (B, 32, h, w) latents as they are. (The bias is ComfyUI's, equal to Flux.1's.)
_FLUX2_FACTORS = (
    (0.0058, 0.0113, 0.0073),
    (0.0495, 0.0443, 0.0836),
    (-0.0099, 0.0096, 0.0644),
    (0.2144, 0.3009, 0.3652),
    (0.0166, -0.0039, -0.0054),
    (0.0157, 0.0103, -0.0160),
    (-0.0398, 0.0902, -0.0235),
    (-0.0052, 0.0095, 0.0109),
    (-0.3527, -0.2712, -0.1666),
    (-0.0301, -0.0356, -0.0180),
    (-0.0107, 0.0078, 0.0013),
    (0.0746, 0.0090, -0.0941),
    (0.0156, 0.0169, 0.0070),
    (-0.0034, -0.0040, -0.0114),
    (0.0032, 0.0181, 0.0080),
    (-0.0939, -0.0008, 0.0186),
    (0.0018, 0.0043, 0.0104),
    (0.0284, 0.0056, -0.0127),
    (-0.0024, -0.0022, -0.0030),
    (0.1207, -0.0026, 0.0065),
    (0.0128, 0.0101, 0.0142),
    (0.0137, -0.0072, -0.0007),
    (0.0095, 0.0092, -0.0059),
    (0.0000, -0.0077, -0.0049),
    (-0.0465, -0.0204, -0.0312),
    (0.0095, 0.0012, -0.0066),
    (0.0290, -0.0034, 0.0025),
    (0.0220, 0.0169, -0.0048),
    (-0.0332, -0.0457, -0.0468),
    (-0.0085, 0.0389, 0.0609),
    (-0.0076, 0.0003, -0.0043),
    (-0.0111, -0.0460, -0.0614),
)

FLUX2 = Family(
    name="flux2",
    label="Flux.2",
    # Flux2KleinPipeline (Qwen3 text encoder, CFG as two transformer calls) and Flux2Pipeline (Mistral-3 VLM,
    # distilled guidance input) share Flux2Transformer2DModel, AutoencoderKLFlux2 and the latent layout.
    pipeline_classes=("Flux2KleinPipeline", "Flux2Pipeline"),
    # Klein: Qwen3 (hidden states of layers 9, 18, 27), Qwen2TokenizerFast with a chat template; Flux2Pipeline:
    # Mistral-3 (layers 10, 20, 30), a Pixtral processor
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    latent_channels=32,
    latent_rgb_factors=_FLUX2_FACTORS,
    latent_rgb_bias=(-0.0329, -0.0718, -0.0851),
    pooled_text_embeds=False,
    denoiser="transformer",  # Flux2Transformer2DModel: double-stream blocks, then single-stream blocks
    # Flux2Transformer2DModel.forward(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance,
    # ...); the pipelines pass everything by keyword, timestep as t / 1000
    denoiser_args=DenoiserArgs(
        sample=("hidden_states", 0),
        timestep=("timestep", 2),
        text=("encoder_hidden_states", 1),
        guidance=("guidance", 5),
        positions=("img_ids", 3),
    ),
    clip_sequence=(),
    encode_options=("max_sequence_length", "text_encoder_out_layers"),
    cfg_batch=False,
    # The VAE's 32-channel latents, 2×2-patchified to 128 channels and normalised by its batch-norm statistics, are
    # the transformer's tokens (B, h/2 · w/2, 128), in the same channel order as Flux.1's packing
    latent_packing=2,
    cfg_flag="do_classifier_free_guidance",
    # concept maps and text ablation are not built for its fused blocks; walks and directions assume a T5
    # sequence or one CFG batch
    capabilities=_MMDIT_CAPS - {"concepts", "ablate-text", "walks", "directions"},
)

PIXART_SIGMA = Family(
    name="pixart-sigma",
    label="PixArt-Σ",
    pipeline_classes=("PixArtSigmaPipeline",),
    text_encoders=("text_encoder",),  # T5-XXL alone (its sequence, with an attention mask over the padding)
    tokenizers=("tokenizer",),
    latent_channels=4,  # SDXL's VAE, so SDXL's preview factors
    latent_rgb_factors=_SDXL_FACTORS,
    latent_rgb_bias=(0.1084, -0.0175, -0.0011),
    pooled_text_embeds=False,
    denoiser="transformer",  # PixArtTransformer2DModel: DiT blocks, self-attention (attn1), then cross-attention
    # to T5 (attn2, as in a UNet's transformer blocks); it predicts ε and a learned variance (8 output channels),
    # which the pipeline splits before scheduler.step.
    # PixArtTransformer2DModel.forward(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs, ...)
    denoiser_args=DenoiserArgs(sample=("hidden_states", 0), timestep=("timestep", 2)),
    clip_sequence=(),
    encode_options=("max_sequence_length",),
    encode_layout=("embeds", "mask", "negative", "negative_mask"),
    # steps and attn2 cross-attention maps as in a UNet; no stop_at (its loop never reads the interrupt flag);
    # concept maps need unmasked cross-attention (T5's padding is masked here); inversion, walks, controls,
    # directions and text ablation name the families they run on
    capabilities=frozenset({"steps", "steering", "attention"}),
    call_defaults=(("use_resolution_binning", False), ("clean_caption", False)),
    learned_variance=True,
    cfg_from_guidance_scale=True,
    cross_attention=True,
)

CHROMA = Family(
    name="chroma",
    label="Chroma",
    pipeline_classes=("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline"),
    text_encoders=(
        "text_encoder",
    ),  # T5-XXL alone: no CLIP, no pooled vector (a timestep approximator instead)
    tokenizers=("tokenizer",),
    latent_channels=16,  # Flux.1's VAE and its 2×2 packing
    latent_rgb_factors=_FLUX_FACTORS,
    latent_rgb_bias=(-0.0329, -0.0718, -0.0851),
    pooled_text_embeds=False,
    denoiser="transformer",  # ChromaTransformer2DModel: Flux's double- and single-stream blocks
    # ChromaTransformer2DModel.forward(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids,
    # attention_mask, ...); the pipeline passes everything by keyword, timestep as t / 1000
    denoiser_args=DenoiserArgs(
        sample=("hidden_states", 0),
        timestep=("timestep", 2),
        text=("encoder_hidden_states", 1),
        positions=("img_ids", 3),
    ),
    clip_sequence=(),
    encode_options=("max_sequence_length",),
    cfg_batch=False,
    latent_packing=2,
    # CFG as two transformer calls per step, the prompt's then the negative's, where guidance_scale > 1
    cfg_flag="do_classifier_free_guidance",
    # every attention call carries T5's padding mask (diffusers 0.42 passes it as float 0/1, which SDPA adds: kept
    # pairs get +1, "masked" ones 0); the joint maps are the image-query × text-key block of that very softmax.
    # Controls, concepts, inversion, walks and the rest name the families they run on
    capabilities=frozenset({"steps", "steering", "stop_at", "attention"}),
)

SANA = Family(
    name="sana",
    label="Sana",
    pipeline_classes=("SanaPipeline",),
    text_encoders=(
        "text_encoder",
    ),  # Gemma-2 (its last hidden states, T5-like: one sequence with a padding mask)
    tokenizers=("tokenizer",),
    latent_channels=32,  # the DC-AE (32 channels, 32× smaller)
    # No published latent → RGB factors for the DC-AE: latent_rgb() fits them from the pipeline's own VAE (a model
    # folder's latent_rgb.json, where it has one, comes first)
    latent_rgb_factors=None,
    latent_rgb_bias=(0.0, 0.0, 0.0),
    pooled_text_embeds=False,
    denoiser="transformer",  # SanaTransformer2DModel: linear self-attention (attn1), softmax cross-attention (attn2)
    # SanaTransformer2DModel.forward(hidden_states, encoder_hidden_states, timestep, guidance, ...)
    denoiser_args=DenoiserArgs(sample=("hidden_states", 0), timestep=("timestep", 2)),
    clip_sequence=(),
    encode_options=("max_sequence_length",),
    encode_layout=("embeds", "mask", "negative", "negative_mask"),
    # maps are the attn2 cross-attention (softmax over Gemma's unmasked tokens); self-attention is linear (ReLU
    # kernels, no softmax), so it has no probabilities to map; concept maps need unmasked cross-attention
    capabilities=frozenset({"steps", "steering", "stop_at", "attention"}),
    call_defaults=(("use_resolution_binning", False), ("clean_caption", False)),
    cross_attention=True,
)

# Wan 2.1's 16-channel video VAE, from ComfyUI's comfy/latent_formats.py, class Wan21 (latent_rgb_factors,
# latent_rgb_factors_bias). ComfyUI's process_in normalises by the VAE's per-channel latents_mean / latents_std, as
# diffusers' WanPipeline does, so the factors apply to the sampling-space latents of every frame as they are.
_WAN_FACTORS = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)

WAN = Family(
    name="wan",
    label="Wan 2.x",
    pipeline_classes=("WanPipeline",),  # text-to-video
    text_encoders=("text_encoder",),  # UMT5-XXL: one sequence, the padding zeroed (not masked)
    tokenizers=("tokenizer",),
    latent_channels=16,  # the video VAE: 8× smaller in space, 4× in time (frames 1 + 4k → 1 + k latent frames)
    latent_rgb_factors=_WAN_FACTORS,
    latent_rgb_bias=(-0.1835, -0.0868, -0.3360),
    pooled_text_embeds=False,
    denoiser="transformer",  # WanTransformer3DModel: (1, 2, 2) space-time patches; per block self-attention
    # (attn1, RoPE over frame, row, column) and cross-attention to the text (attn2)
    # WanTransformer3DModel.forward(hidden_states, timestep, encoder_hidden_states, ...), all by keyword
    denoiser_args=DenoiserArgs(sample=("hidden_states", 0)),
    clip_sequence=(),
    encode_options=("max_sequence_length",),
    cfg_batch=False,  # CFG as two transformer calls per step, the prompt's then the negative's
    cfg_flag="do_classifier_free_guidance",
    # steps and the attn2 cross-attention maps per frame; controls, concepts, inversion, walks and the rest name
    # the families they run on
    capabilities=frozenset({"steps", "steering", "stop_at", "attention"}),
    video=True,
    second_denoiser="transformer_2",
    cross_attention=True,
)

Z_IMAGE = Family(
    name="z-image",
    label="Z-Image",
    pipeline_classes=("ZImagePipeline",),
    # Qwen3 (hidden_states[-2] of the chat-templated prompt, padding dropped)
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    latent_channels=16,  # Flux.1's VAE (scaling and shift), so Flux's preview factors
    latent_rgb_factors=_FLUX_FACTORS,
    latent_rgb_bias=(-0.0329, -0.0718, -0.0851),
    pooled_text_embeds=False,
    cfg_uncond_first=False,  # the CFG batch is prompt rows, then negative rows
    denoiser="transformer",  # ZImageTransformer2DModel: refiners per stream, then single-stream layers over
    # [image ‖ caption] tokens, each part padded to a multiple of 32 (layers.N.attention)
    # ZImageTransformer2DModel.forward(x, t, cap_feats, ...): lists of per-row latents and caption features
    denoiser_args=DenoiserArgs(sample=("x", 0), timestep=("t", 1), text=("cap_feats", 2), per_row=True),
    clip_sequence=(),
    encode_options=("max_sequence_length",),
    negated_output=True,
    cfg_scale_offset=1.0,
    native_size=1024,  # ZImagePipeline.__call__: height = height or 1024
    # steps, latent edits, stop_at and the joint maps; prompt switches and guidance schedules need a text and an
    # output tensor (these are per-row lists) and are refused; controls, concepts, inversion, walks and the rest
    # name the families they run on
    capabilities=frozenset({"steps", "steering", "stop_at", "attention"}),
)

QWEN_IMAGE = Family(
    name="qwen-image",
    label="Qwen-Image",
    pipeline_classes=("QwenImagePipeline",),
    # Qwen2.5-VL, text only: last hidden states, the system prompt's tokens dropped
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    latent_channels=16,  # a Wan-style 3-D causal VAE normalised by per-channel statistics: Wan 2.1's factors
    latent_rgb_factors=_WAN_FACTORS,
    latent_rgb_bias=(-0.1835, -0.0868, -0.3360),
    pooled_text_embeds=False,
    denoiser="transformer",  # QwenImageTransformer2DModel: double-stream blocks, text first
    # QwenImageTransformer2DModel.forward(hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
    # timestep, img_shapes, guidance, ...); the pipeline passes everything by keyword, timestep as t / 1000
    denoiser_args=DenoiserArgs(
        sample=("hidden_states", 0),
        timestep=("timestep", 3),
        text=("encoder_hidden_states", 1),
        guidance=("guidance", 5),
        positions=("img_shapes", 4),
    ),
    clip_sequence=(),
    encode_options=("max_sequence_length",),
    # true CFG as two transformer calls per step, the prompt's then the negative's (true_cfg_scale > 1 and a
    # negative prompt), the combination rescaled to the prompt's norm
    cfg_batch=False,
    latent_packing=2,
    # steps, steering, stop_at and the joint maps; controls, concepts, inversion, walks and the rest name the
    # families they run on
    capabilities=frozenset({"steps", "steering", "stop_at", "attention"}),
)


def capable_families(capability: str) -> list[Family]:
    """The families whose records claim ``capability`` (a key of :data:`CAPABILITIES`), in :data:`FAMILIES` order."""
    if capability not in CAPABILITIES:
        raise InvalidArgumentError(
            f"Unknown capability {capability!r}; choose one of {', '.join(CAPABILITIES)}."
        )
    return [f for f in FAMILIES.values() if capability in f.capabilities]


def refusal(family: Family, capability: str, what: str, *, why: str = "", hint: str = "") -> str:
    """The sentence a refusal of ``capability`` on ``family`` says (see :meth:`Family.require`): the tool, the family,
    why (optional), the families that can by label, and what to do (optional)."""
    labels = [f.label for f in capable_families(capability)]
    able = (
        " and ".join([", ".join(labels[:-1]), labels[-1]] if len(labels) > 1 else labels) or "no family yet"
    )
    because = f": {why}" if why else ""
    return f"{family.label} cannot use {what}{because}. The families that can: {able}." + (
        f" {hint}" if hint else ""
    )


#: Every supported family, in detection order.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (SD1, SD2, SDXL, SD3, FLUX, FLUX2, PIXART_SIGMA, CHROMA, SANA, WAN, Z_IMAGE, QWEN_IMAGE)
}

_SUPPORTED = ", ".join(sorted({c for f in FAMILIES.values() for c in f.pipeline_classes}))


def detect_family(pipe: Any) -> Family:
    """Return the :class:`Family` of a diffusers pipeline object.

    SD 1.x and SD 2.x share pipeline classes; they are told apart by the text encoder (SD 2.x uses
    OpenCLIP ViT-H, hidden size 1024, and pads with "!") — the tokenizer's pad token is the robust signal.
    Raises :class:`UnsupportedPipelineError` naming the supported classes otherwise.
    """
    cls = type(pipe).__name__
    if cls in SDXL.pipeline_classes:
        return SDXL
    if cls in SD3.pipeline_classes:
        return SD3
    if cls in FLUX.pipeline_classes:
        return FLUX
    if cls in FLUX2.pipeline_classes:
        return FLUX2
    for fam in FAMILIES.values():
        if fam is not SD1 and fam is not SD2 and cls in fam.pipeline_classes:
            return fam
    if cls in SD1.pipeline_classes:
        tok = getattr(pipe, "tokenizer", None)
        te = getattr(pipe, "text_encoder", None)
        hidden = getattr(getattr(te, "config", None), "hidden_size", None)
        if getattr(tok, "pad_token", None) == "!" or hidden == 1024:
            return SD2
        return SD1
    raise UnsupportedPipelineError(
        f"sdexplore does not support {cls}. Supported pipeline classes: {_SUPPORTED}. "
        "Load one with sdexplore.load_pipeline(...) or diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline "
        "/ StableDiffusion3Pipeline / FluxPipeline / Flux2KleinPipeline / PixArtSigmaPipeline."
    )


def model_dir(pipe: Any) -> Path | None:
    """The local folder a pipeline was loaded from, if any (``pipe.config._name_or_path``)."""
    path = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if path and Path(str(path)).is_dir():
        return Path(str(path))
    return None


def latent_rgb(pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent → RGB preview factors for a pipeline: ``(factors (C, 3), bias (3,))`` as float32 CPU tensors.

    A model folder may carry its own fitted factors in ``latent_rgb.json`` (the embedded model does);
    otherwise the family's published factors are used, and where the family has none (Sana's DC-AE) factors
    fitted from the pipeline's own VAE (:func:`fitted_latent_rgb`, once per VAE object).
    """
    folder = model_dir(pipe)
    if folder is not None and (folder / "latent_rgb.json").is_file():
        data = json.loads((folder / "latent_rgb.json").read_text())
        return torch.tensor(data["factors"], dtype=torch.float32), torch.tensor(
            data["bias"], dtype=torch.float32
        )
    fam = detect_family(pipe)
    if fam.latent_rgb_factors is None:
        factors, bias = fitted_latent_rgb(pipe.vae, vae_scale_factor(pipe))
        return factors.clone(), bias.clone()  # the cached pair stays as fitted
    return (
        torch.tensor(fam.latent_rgb_factors, dtype=torch.float32),
        torch.tensor(fam.latent_rgb_bias, dtype=torch.float32),
    )


#: VAE object → its fitted ``(factors, bias)``; weak, so a VAE that is dropped takes its fit with it, and nothing
#: is stored on the pipeline or the VAE
_FITTED_RGB: weakref.WeakKeyDictionary[Any, tuple[torch.Tensor, torch.Tensor]] = weakref.WeakKeyDictionary()


def fitted_latent_rgb(vae: Any, cell: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear latent → RGB factors fitted from a VAE itself: ``(factors (C, 3), bias (3,))`` float32 CPU.

    For a family with no published factors. A fixed set of synthetic colour pictures
    (:func:`~sdexplore.preview.preview_swatches`: solids, gradients, patches; eight latent cells a side, ``cell``
    pixels per latent cell) is encoded to sampling-space latents (:func:`vae_sampling_latents`) and the factors are
    the least-squares map from each latent cell to the picture's colour there
    (:func:`~sdexplore.preview.fit_linear_preview`). Fitted once per VAE object (a weak map); no random state is
    drawn, so a run's result is unchanged.
    """
    fit = _FITTED_RGB.get(vae)
    if fit is None:
        images = preview_swatches(8 * cell, cell)  # (B, 3, 8·cell, 8·cell)
        latents = torch.cat([vae_sampling_latents(vae, chunk) for chunk in images.split(8)])  # (B, C, 8, 8)
        fit = _FITTED_RGB[vae] = fit_linear_preview(latents, images)
    return fit


@torch.no_grad()
def vae_sampling_latents(vae: Any, images: torch.Tensor) -> torch.Tensor:
    """Pictures (B, 3, H, W) in [-1, 1] → the sampling-space latents (B, C, h, w) the denoiser works in, float32.

    The encoder's deterministic latent (a posterior's mode, or a DC-AE's / tiny VAE's latent), then the pipelines'
    normalisation: per-channel ``(z − latents_mean) / latents_std`` for a 3-D video VAE (Wan, Qwen-Image: one
    frame), a batch-norm over 2×2 patches for Flux.2's, else ``(z − shift_factor) · scaling_factor``.
    """
    param = next(vae.parameters())
    config = vae.config
    video = getattr(config, "latents_std", None) is not None
    x = images.to(device=param.device, dtype=param.dtype)
    out = vae.encode(x[:, :, None] if video else x)  # a video VAE reads (B, 3, 1, H, W): one frame
    z = out.latent_dist.mode() if hasattr(out, "latent_dist") else getattr(out, "latent", None)
    if z is None:
        z = out.latents  # AutoencoderTiny
    z = z.float()
    if video:
        z = z[:, :, 0]  # (B, C, h, w)
        mean, std = (torch.tensor(config[k], dtype=z.dtype, device=z.device).view(1, -1, 1, 1) for k in (
            "latents_mean", "latents_std"))  # fmt: skip
        return (z - mean) / std
    if getattr(vae, "bn", None) is not None:  # Flux.2: batch-norm statistics over 2×2 patches
        b, c, h, w = z.shape
        p = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (B, C, dy, dx, h/2, w/2)
        p = p.reshape(b, c * 4, h // 2, w // 2)  # (B, 4C, h/2, w/2): channel c·4 + 2·dy + dx
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(p)  # (1, 4C, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1).to(p) + config.batch_norm_eps)  # (1, 4C, 1, 1)
        p = ((p - mean) / std).reshape(b, c, 2, 2, h // 2, w // 2)  # (B, C, dy, dx, h/2, w/2)
        return p.permute(0, 1, 4, 2, 5, 3).reshape(b, c, h, w)  # (B, C, h, w)
    shift = getattr(config, "shift_factor", None) or 0.0
    return (z - shift) * getattr(config, "scaling_factor", 1.0)


def latent_preview(pipe: Any) -> ConvPreview | None:
    """A pipeline's learned convolutional preview (:class:`~sdexplore.preview.ConvPreview`), or ``None``.

    A model folder may carry one in ``latent_preview.json`` (both embedded models do: their VAE decodes a cell's
    colour from its neighbours too, which no linear factors follow). Where present, every preview of that
    pipeline uses it instead of :func:`latent_rgb`'s factors; elsewhere (every published family) it is ``None``.
    """
    folder = model_dir(pipe)
    path = None if folder is None else folder / "latent_preview.json"
    if path is None or not path.is_file():
        return None
    try:
        return ConvPreview.from_dict(json.loads(path.read_text()))
    except ValueError as e:  # json.JSONDecodeError is a ValueError too
        raise InvalidArgumentError(
            f"{path}: {e}. Refit it (python scripts/fit_preview.py --write) or delete the file to preview with "
            "the linear factors."
        ) from e


def vae_scale_factor(pipe: Any) -> int:
    """Pixels per latent cell along each side (8 for every SD family, SD3 and Flux included; Flux's 2×2 packing
    makes one denoiser token 16×16 pixels, but a latent cell is still 8×8)."""
    factor = getattr(pipe, "vae_scale_factor", None)  # read first: Sana's DC-AE has no block_out_channels
    if factor is None:  # Wan's video VAE: spatial and temporal factors apart
        factor = getattr(pipe, "vae_scale_factor_spatial", None)
    if factor is None:
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return int(factor)


def size_unit(pipe: Any) -> int:
    """Image sizes must be multiples of this many pixels: the VAE's scale factor times the denoiser's patch (8 for
    UNets, 16 for SD3's and Flux's 2×2 patches; a size in between is rounded down by some pipelines, silently)."""
    den = detect_family(pipe).get_denoiser(pipe)
    fam = detect_family(pipe)
    patch = max(fam.latent_packing, spatial_patch(den.config))
    return vae_scale_factor(pipe) * patch


def spatial_patch(config: Any) -> int:
    """Latent cells per denoiser patch along each spatial side: the config's ``patch_size`` (Wan's space-time
    (t, h, w) patches: h; Z-Image's all_patch_size, whose first the pipeline uses), 1 where it has none."""
    patch = getattr(config, "patch_size", None) or (getattr(config, "all_patch_size", None) or (1,))[:1]
    return int(patch[-1] if isinstance(patch, list | tuple) else patch)
