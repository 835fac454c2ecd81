"""sdexplore.edit (this module is `editing` so that importing it never hides the function): edit a generated image by its attention maps (Prompt-to-Prompt word swap, reweighting, ablation).

One batched pipeline call of the source prompt(s) and the target prompt(s), both from the same initial latents,
under a :class:`~sdexplore.record.control.Control` (the edits) and an attention recorder (the maps of both
branches): the source branch is the plain image, the target branch the edit. Every input is checked before any
work. The families of ``record.control.CONTROL_FAMILIES`` (on SD3 and Flux the edits act on the image-query ×
text-key block of the joint attention; ``self_replace`` has no effect there).

Your own picture (``image=``): null-text inversion (SD 1.x/2.x/XL) or the flow-ODE inversion (SD3, Flux.1,
Flux.2) under the source prompt gives both branches' starting latents; or ``method="flowedit"`` (SD3, Flux.1,
Flux.2; :mod:`sdexplore.flowedit`) edits it inversion-free, without attention controls.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import InvalidArgumentError
from .families import vae_scale_factor
from .record.attach import attachment_of
from .record.control import (
    Control,
    LocalBlend,
    Refine,
    Reweight,
    WordSwap,
    check_aligned,
    check_controllable,
    check_weight,
    token_alignment,
)
from .results.edit import Edit, take_images


def _prompts(name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise InvalidArgumentError(f"{name}={value!r}: pass a prompt (a string) or a non-empty list of prompts.")


def edit(
    pipe: Any,
    prompt: str | list[str],
    target: str | list[str] | None = None,
    *,
    reweight: Mapping[str, float] | None = None,
    masks: Mapping[str, Any] | None = None,
    cross_replace: float = 0.8,
    self_replace: float = 0.4,
    steps: tuple[float, float] = (0.0, 1.0),
    mode: str | None = None,
    blend: Sequence[str] | None = None,
    blend_threshold: float = 0.3,
    blend_start: float = 0.2,
    inject: Any = None,
    ablation: str = "attention",
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    image: Any = None,
    method: str | None = None,
    n_max: int | None = None,
    n_min: int | None = None,
    n_avg: int | None = None,
    source_guidance: float | None = None,
    target_guidance: float | None = None,
    num_images_per_prompt: int = 1,
    attention: bool = True,
    **call: Any,
) -> Edit:
    """Generate ``prompt`` and its edit in one batched call from the same initial latents.

    ::

        res = sdexplore.edit(pipe, "a big red circle at the top left, blue background",
                             "a big blue circle at the top left, blue background", generator=g)
        res.source, res.edited, res.edited_maps.word("circle")
        sdexplore.edit(pipe, "a big red circle at the top left, blue background", reweight={"circle": 0.0})

    - ``target`` (a word swap, Prompt-to-Prompt's replace): a prompt that tokenizes word for word like
      ``prompt``; the edited image takes the source's cross-attention maps for the first ``cross_replace``
      fraction of the steps and its self-attention maps (16×16 layers and smaller) for the first
      ``self_replace`` fraction.
    - ``reweight``: words → factors ≥ 0 scaling their cross-attention in the edited image (0 ablates the word),
      during the ``steps`` (start, end) fraction; words are looked up in ``target`` (or ``prompt`` without one).
    - ``ablation``: what a factor of 0 in ``reweight`` does. ``"attention"`` (default, Prompt-to-Prompt's): the
      word's cross-attention is zeroed; the later tokens of a causal text encoder (CLIP) still carry it.
      ``"causal"``: the word is also removed from the text encoders' context for the edited image
      (:class:`sdexplore.record.ablate_text.CausalAblation`: no later token, end-of-text or padding reads it; T5 in
      both directions; the pooled vector too), as if it had never been read, positions unchanged.
    - ``masks``: words → ``(h, w)`` arrays in [0, 1]: the word's attention is put where the mask is.
    - ``mode``: ``"replace"`` (the word swap above) or ``"refine"`` (Prompt-to-Prompt's refinement: ``target``
      adds or removes words; the target's tokens aligned with the source's take their cross-attention, new
      tokens keep their own). By default: replace when the prompts align word for word, else refine.
    - ``inject`` (SD3, Flux.1, Flux.2): Stable Flow's edit. A :class:`~sdexplore.vital.VitalLayers` from
      :func:`sdexplore.vital_layers` (its measured vital blocks), ``"all"``, ``"none"`` or block names: in those
      blocks' joint attention the target's image keys and values are the source's, during the ``steps`` fraction.
      Runs on its own (no reweight, masks, blend, mode or image).
    - ``blend``: words of the source and/or target (Prompt-to-Prompt's local blend): from the ``blend_start``
      fraction of the steps on, the edited latents outside a mask of those words' cross-attention (both
      branches, thresholded at ``blend_threshold`` of its maximum, dilated) are set to the source's after each
      step, so the edit stays where those words are.
    - Prompt syntax (needs ``pip install 'sdexplore[edit]'``, parsed by compel's own parser): in ``prompt``,
      ``"a big (red)1.5 circle"``, ``"a big red++ circle"`` or ``"a big red-- circle"`` reweight words' attention
      (Prompt-to-Prompt reweighting of the edited image, not compel's embedding weighting), and
      ``"a big red.swap(blue) circle"`` makes the source/target pair of a swap. The images and maps are
      labelled with the plain words ("red").

    ``generator`` draws the initial latents as the pipeline itself would (so the source is the plain image of
    ``prompt`` with that seed, and ``pipe(target, generator=same seed)`` is the naive baseline); ``latents``
    (B, C, h, w) gives them directly. ``image`` edits your own picture: a picture (anything
    :func:`sdexplore.images.load_image` reads) is inverted under ``prompt`` (its description;
    ``num_inference_steps`` and ``guidance_scale`` as given, else the inversion's defaults) with null-text
    inversion on SD 1.x/2.x/XL, or with the flow ODE on SD3, Flux.1 and Flux.2 (at CFG 1: a ``guidance_scale``
    other than 1 is refused there, except as a guidance-distilled transformer's input); or a null-text (UNet) /
    flow (SD3, Flux) :class:`~sdexplore.results.inversion.Inversion` made before is used as it is; both branches
    then start from its latents (null-text: with its per-step unconditional embeddings,
    ``sdexplore.inversion.applied``), so the source branch is the picture's reconstruction. Other keywords go to the pipeline call (``num_inference_steps``,
    ``guidance_scale``, ``negative_prompt``, ``height``, ``width``...). Edits apply to the conditional half of
    the CFG batch. ``attention=True`` records the maps of both branches (``res.source_maps``,
    ``res.edited_maps``); inside an enclosing ``observe(pipe, attention=True)`` block that block records them
    instead (the edited probabilities) and the result's maps are None.

    ``method="flowedit"`` (SD3, Flux.1, Flux.2; :mod:`sdexplore.flowedit`) edits ``image`` from ``prompt`` (its
    description) to ``target`` with FlowEdit (Kulikov et al. 2025), no inversion and no attention control:
    ``n_max``, ``n_min``, ``n_avg``, ``source_guidance``, ``target_guidance`` (None: the paper's, scaled to
    ``num_inference_steps``) and ``generator`` (its noise; the same seed gives the same edit) are its settings,
    ``height``/``width``/``num_inference_steps`` the only pipeline keywords it takes; the result's ``source`` is
    the picture's VAE round trip and its maps are None. ``method="inversion"`` (the default with ``image``)
    inverts the picture as described above: null-text on SD 1.x/2.x/XL, the flow ODE (CFG 1, ``guidance_scale``
    1) on SD3.

    Raises InvalidArgumentError before any work for invalid prompt syntax (quoting compel's message), prompts
    that cannot be aligned, a weight that is NaN or
    negative, a fraction outside [0, 1], or nothing to edit; WordNotFoundError for a word not in the prompt;
    UnsupportedPipelineError on a family that cannot take controls (``CONTROL_FAMILIES`` names those that can),
    and for ``method="flowedit"`` on a family that is not a flow-matching one (SD3, Flux.1, Flux.2 can).
    """
    if method not in (None, "inversion", "flowedit"):
        raise InvalidArgumentError(
            f"method={method!r}: pass 'flowedit' (SD3/Flux, inversion-free), 'inversion' (invert image=, then "
            "edit by attention) or None."
        )
    flowedit_args = dict(
        n_max=n_max,
        n_min=n_min,
        n_avg=n_avg,
        source_guidance=source_guidance,
        target_guidance=target_guidance,
    )
    if method == "flowedit":
        return _flowedit(
            pipe,
            prompt,
            target,
            image,
            generator,
            flowedit_args,
            dict(
                reweight=reweight,
                masks=masks,
                blend=blend,
                mode=mode,
                latents=latents,
                num_images_per_prompt=None if num_images_per_prompt == 1 else num_images_per_prompt,
            ),
            call,
        )
    given = [k for k, v in flowedit_args.items() if v is not None]
    if given:
        raise InvalidArgumentError(
            f"{', '.join(given)}: FlowEdit's settings; pass method='flowedit' with them."
        )
    if method == "inversion" and image is None:
        raise InvalidArgumentError("method='inversion' edits your own picture: pass image=picture.")
    if ablation not in ("attention", "causal"):
        raise InvalidArgumentError(
            f"ablation={ablation!r}: pass 'attention' (the word's cross-attention is zeroed) or 'causal' (the word "
            "also leaves the text encoders' context)."
        )
    if inject is not None:
        taken = [
            k
            for k, v in dict(reweight=reweight, masks=masks, blend=blend, mode=mode, image=image).items()
            if v is not None
        ]
        if taken or num_images_per_prompt != 1:
            raise InvalidArgumentError(
                f"{', '.join(taken) or 'num_images_per_prompt'}: inject= (Stable Flow's injection at chosen blocks, "
                "SD3/Flux) runs on its own; drop them."
            )
        from .vital import edit as inject_edit  # lazily: only injection edits need it

        return inject_edit(
            pipe,
            prompt,
            target,
            inject=inject,
            steps=steps,
            generator=generator,
            latents=latents,
            attention=attention,
            **call,
        )
    family = check_controllable(pipe)
    if mode not in (None, "replace", "refine"):
        raise InvalidArgumentError(
            f"mode={mode!r}: pass 'replace', 'refine' or None (chosen from the prompts)."
        )
    sources = _prompts("prompt", prompt)
    syntax_weights: dict[str, float] | None = None
    written = sources[0]
    if len(sources) == 1 and _has_syntax(sources[0]):
        plain, swapped, syntax_weights = parse_syntax(sources[0])
        if swapped is not None and target is not None:
            raise InvalidArgumentError(
                f"{prompt!r} has a .swap() and target={target!r} is given too: use one of them."
            )
        if swapped is not None:
            target = swapped
        prompt = plain
        sources = [plain]
        reweight = {**syntax_weights, **dict(reweight or {})}
    targets = sources if target is None else _prompts("target", target)
    if len(targets) != len(sources):
        raise InvalidArgumentError(
            f"{len(sources)} source prompt(s) but {len(targets)} target prompt(s): pass one target per source."
        )
    if target is None and not reweight and not masks and syntax_weights is None:
        raise InvalidArgumentError(
            "Nothing to edit: pass a target prompt (a word swap), reweight={word: factor} or masks={word: mask}."
        )
    if (
        isinstance(num_images_per_prompt, bool)
        or not isinstance(num_images_per_prompt, int)
        or num_images_per_prompt < 1
    ):
        raise InvalidArgumentError(f"num_images_per_prompt={num_images_per_prompt!r}: pass a positive int.")
    for forbidden in ("prompt_embeds", "output_type", "callback_on_step_end"):
        if forbidden in call:
            raise InvalidArgumentError(
                f"edit() does not take {forbidden}=: it needs the prompts' words and returns PIL images; call the "
                "pipeline yourself inside `with sdexplore.Control(pipe, ...)` for that."
            )
    if image is not None:
        if latents is not None or generator is not None:
            raise InvalidArgumentError(
                "image= starts both branches from the picture's inversion: drop latents= and generator=."
            )
        if len(sources) != 1 or num_images_per_prompt != 1:
            raise InvalidArgumentError(
                "image= edits one picture: pass one source prompt (a description of the picture) and "
                "num_images_per_prompt=1."
            )
        if "negative_prompt" in call:
            raise InvalidArgumentError(
                "image= regenerates with the inversion's own per-step unconditional embeddings, which take the "
                "negative prompt's place: drop negative_prompt=."
            )
    n_src = len(sources) * num_images_per_prompt  # images per branch
    edits: list[Any] = []
    chosen = None
    if target is not None:
        chosen = mode or (
            "replace"
            if all(_aligned(pipe, s, t) for s, t in zip(sources, targets, strict=True))
            else "refine"
        )
        swap = (WordSwap if chosen == "replace" else Refine)(
            cross_replace, self_replace
        )  # checks the fractions
        for s, t in zip(sources, targets, strict=True):
            if chosen == "replace":
                check_aligned(pipe, s, t)
            else:
                token_alignment(pipe, s, t)  # refuses prompts with nothing in common
        edits.append(swap)
    if reweight or masks or syntax_weights is not None:
        rw = Reweight(reweight, masks=masks, steps=steps, images=list(range(n_src, 2 * n_src)))
        for t in dict.fromkeys(targets):
            rw.positions(pipe, t)  # WordNotFoundError before any work
        edits.append(rw)
    ablated = [w for w, v in (reweight or {}).items() if v == 0.0] if ablation == "causal" else []
    text_ablation: Any = None
    if ablated:
        from .record.ablate_text import CausalAblation  # lazily: only causal ablation needs it

        text_ablation = CausalAblation(
            pipe, ablated, images=list(range(n_src, 2 * n_src))
        )  # checks the family
    if blend is not None:
        lb = LocalBlend(blend, threshold=blend_threshold, start=blend_start)
        for s, t in zip(sources, targets, strict=True):
            lb.check(pipe, s, t)  # WordNotFoundError before any work
        edits.append(lb)

    den = family.get_denoiser(pipe)
    scale = vae_scale_factor(pipe)
    from .inversion import FLOW_FAMILIES
    from .text import default_size

    size_h, size_w = default_size(pipe)
    height, width = int(call.pop("height", None) or size_h), int(call.pop("width", None) or size_w)
    # sampling-space latents (B, C, h, w); Flux's are packed for the call (flowedit.pipe_latents)
    channels = family.latent_channels if family.latent_packing > 1 else int(den.config.in_channels)
    shape = (n_src, channels, height // scale, width // scale)
    inversion = None
    if image is not None:
        from .inversion import DEFAULT_STEPS, Inversion, invert

        inverse = "flow" if family.name in FLOW_FAMILIES else "null-text"
        if isinstance(image, Inversion):
            if image.method != inverse or image.prompt != sources[0]:
                raise InvalidArgumentError(
                    f"image= takes a {inverse} inversion of the source prompt {sources[0]!r}; this one is a "
                    f"{image.method!r} inversion of {image.prompt!r}: invert again with "
                    f"sdexplore.invert(pipe, picture, prompt, method={inverse!r})."
                )
            for key, made in (
                ("num_inference_steps", image.settings["steps"]),
                ("guidance_scale", image.settings["guidance"]),
            ):
                if key in call and call[key] != made:
                    raise InvalidArgumentError(
                        f"{key}={call[key]!r}, but the inversion was made for {made!r}: it regenerates the picture "
                        f"only with its own; drop {key}= (or invert again with it)."
                    )
            inversion = image
        else:
            if inverse == "flow" and not _distilled(pipe) and call.get("guidance_scale", 1.0) != 1.0:
                raise InvalidArgumentError(
                    f"guidance_scale={call['guidance_scale']!r}: the flow-ODE inversion regenerates the picture "
                    "only without classifier-free guidance; drop guidance_scale= (1.0), or edit with "
                    "method='flowedit', which has a guidance scale per branch."
                )
            inversion = invert(
                pipe,
                image,
                sources[0],
                method=inverse,
                steps=call.get("num_inference_steps", DEFAULT_STEPS),
                guidance=call.get("guidance_scale"),
                height=height,
                width=width,
            )
        call.update(  # the run the inversion was made for
            num_inference_steps=int(inversion.settings["steps"]),
            guidance_scale=float(inversion.settings["guidance"]),
        )
        height, width = inversion.image.shape[:2]
        shape = (n_src, channels, height // scale, width // scale)
        latents = inversion.latents.to(den.device, den.dtype)
    from .flowedit import pipe_latents

    if latents is None:
        from diffusers.utils.torch_utils import randn_tensor

        device = getattr(pipe, "_execution_device", den.device)
        drawn = shape
        if family.name == "flux2":  # Flux2KleinPipeline draws its noise 2×2-patchified: (B, 4C, h/2, w/2)
            drawn = (n_src, 4 * channels, shape[2] // 2, shape[3] // 2)
        latents = randn_tensor(drawn, generator=generator, device=torch.device(device), dtype=den.dtype)
        if family.name != "flux2":
            latents = pipe_latents(pipe, latents)
    elif not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
        raise InvalidArgumentError(
            f"latents must be a tensor of shape {shape} (one per source image), got "
            f"{getattr(latents, 'shape', type(latents).__name__)}."
        )
    else:
        latents = pipe_latents(pipe, latents)
    both = torch.cat([latents, latents])  # (2B, ...): the same noise for source and target

    record = attention
    existing = attachment_of(pipe)
    if existing is not None and any(s.kind == "attention" for s in existing.subscribers):
        record = False  # the enclosing block records the edited maps itself
    recorder = None
    if record:
        from .record.attention import AttentionRecorder

        recorder = AttentionRecorder(pipe)
    from contextlib import nullcontext

    from .inversion import applied

    regenerate = nullcontext() if inversion is None else applied(pipe, inversion)
    with regenerate, text_ablation or nullcontext(), Control(pipe, *edits):
        if recorder is not None:
            with recorder:
                out = _call(
                    pipe, sources + targets, both, generator, num_images_per_prompt, height, width, call
                )
            maps = recorder.maps
        else:
            out = _call(pipe, sources + targets, both, generator, num_images_per_prompt, height, width, call)
            maps = None
    images = list(out.images)
    one = n_src == 1
    settings = dict(
        mode=chosen,
        cross_replace=None if target is None else float(cross_replace),
        self_replace=None if target is None else float(self_replace),
        reweight=dict(reweight or {}),
        ablation=ablation if ablated else None,
        masks=sorted(masks or {}),
        steps=list(steps),
        syntax=None if syntax_weights is None else written,
        blend=None if blend is None else list(blend),
        blend_threshold=None if blend is None else float(blend_threshold),
        blend_start=None if blend is None else float(blend_start),
        num_images_per_prompt=num_images_per_prompt,
        inversion_psnr=None if inversion is None else float(inversion.psnr),
        **{k: v for k, v in call.items() if isinstance(v, (int, float, str))},
    )
    return Edit(
        source=images[0] if one else images[:n_src],
        edited=images[n_src] if one else images[n_src:],
        source_prompt=prompt if isinstance(prompt, str) else list(prompt),
        edited_prompt=targets[0] if isinstance(prompt, str) else targets,
        source_maps=None if maps is None else take_images(maps, slice(0, n_src)),
        edited_maps=None if maps is None else take_images(maps, slice(n_src, 2 * n_src)),
        settings=settings,
    )


def _flowedit(
    pipe: Any,
    prompt: Any,
    target: Any,
    image: Any,
    generator: Any,
    settings: dict[str, Any],
    others: dict[str, Any],
    call: dict[str, Any],
) -> Edit:
    """``edit(..., method="flowedit")``: every refusal before any work, then :func:`sdexplore.flowedit.flowedit`."""
    from .flowedit import check_flow_family, flowedit

    check_flow_family(pipe)
    if image is None:
        raise InvalidArgumentError(
            "method='flowedit' edits a picture: pass image=picture (a path, PIL image, array or tensor)."
        )
    from .results.inversion import Inversion

    if isinstance(image, Inversion):
        raise InvalidArgumentError(
            "method='flowedit' needs no inversion: pass the picture itself (inversion.image), not an Inversion."
        )
    if not isinstance(prompt, str) or _has_syntax(prompt):
        raise InvalidArgumentError(
            f"prompt={prompt!r}: FlowEdit takes one plain source prompt describing the picture (no lists, no "
            "compel syntax)."
        )
    if target is None:
        raise InvalidArgumentError(
            "method='flowedit' needs a target prompt: edit(pipe, source, target, image=picture, method='flowedit')."
        )
    if not isinstance(target, str):
        raise InvalidArgumentError(f"target={target!r}: FlowEdit takes one target prompt (a string).")
    taken = [k for k, v in others.items() if v is not None]
    if taken:
        raise InvalidArgumentError(
            f"{', '.join(taken)}: not taken by method='flowedit', which edits by the velocity field, not by "
            "attention or starting latents; drop them, or edit by attention with method='inversion'."
        )
    if "guidance_scale" in call:
        raise InvalidArgumentError(
            "method='flowedit' has a guidance scale per branch: pass source_guidance= and target_guidance= "
            "instead of guidance_scale=."
        )
    extra = sorted(set(call) - {"num_inference_steps", "height", "width"})
    if extra:
        raise InvalidArgumentError(
            f"{', '.join(extra)}: method='flowedit' takes num_inference_steps, height and width of the pipeline's "
            "keywords, and no others."
        )
    return flowedit(
        pipe,
        image,
        prompt,
        target,
        generator=generator,
        num_inference_steps=call.get("num_inference_steps"),
        height=call.get("height"),
        width=call.get("width"),
        **settings,
    )


def _call(
    pipe: Any,
    prompts: list[str],
    latents: torch.Tensor,
    generator: Any,
    n: int,
    height: int,
    width: int,
    call: dict[str, Any],
) -> Any:
    """The one batched pipeline call. A list of generators drew the latents already (the pipeline would refuse
    a list of another length than its batch); one generator still drives a stochastic sampler's noise."""
    gen = generator if isinstance(generator, torch.Generator) else None
    return pipe(
        prompt=prompts,  # by name: Flux2KleinPipeline's first parameter is its condition image
        latents=latents,
        generator=gen,
        num_images_per_prompt=n,
        height=height,
        width=width,
        **call,
    )


def _distilled(pipe: Any) -> bool:
    from .flowedit import distilled_guidance

    return distilled_guidance(pipe)


def _aligned(pipe: Any, source: str, target: str) -> bool:
    try:
        check_aligned(pipe, source, target)
    except InvalidArgumentError:
        return False
    return True


# Characters of compel's syntax: weights "(word)1.5", "word++"/"word--", ".swap(...)", quoted phrases.
_SYNTAX = re.compile(r"[()\"]|\+\+|--|\w[+-]+(?=\s|$)|\.swap\(")


def _has_syntax(prompt: str) -> bool:
    return bool(_SYNTAX.search(prompt))


def parse_syntax(prompt: str) -> tuple[str, str | None, dict[str, float]]:
    """``(plain source prompt, target prompt or None, {word: attention weight})`` of a prompt in compel's syntax.

    Parsed by compel's own parser (``pip install 'sdexplore[edit]'``): ``(red)1.5`` / ``red++`` / ``red--`` give
    the word a weight (compel's factors: 1.1 per ``+``, 0.9 per ``-``), ``red.swap(blue)`` makes a target prompt
    with ``blue`` in its place. Compel's ``.blend()``/``.and()`` and swap options are refused: edit()'s
    ``cross_replace``/``self_replace`` say when a swap applies. Raises :class:`InvalidArgumentError` quoting
    compel's message for invalid syntax, and for a weight that is not a finite number ≥ 0.
    """
    try:
        import transformers

        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # compel imports image processors that warn about torchvision
        try:
            from compel.prompt_parser import (
                CrossAttentionControlSubstitute,
                FlattenedPrompt,
                Fragment,
                PromptParser,
            )
        finally:
            transformers.logging.set_verbosity(verbosity)
    except ImportError as e:
        raise InvalidArgumentError(
            f"{prompt!r} uses prompt syntax ((word)1.5, word++, .swap()), which needs compel: "
            "pip install 'sdexplore[edit]' (or write the prompt plainly and pass reweight= / target=)."
        ) from e
    try:
        parsed = PromptParser().parse_conjunction(prompt)
    except Exception as e:  # noqa: BLE001 - compel raises its ParsingException and pyparsing's errors
        raise InvalidArgumentError(f"Cannot parse the prompt {prompt!r}: {e}") from None
    if len(parsed.prompts) != 1 or not isinstance(parsed.prompts[0], FlattenedPrompt):
        raise InvalidArgumentError(
            f"{prompt!r} is a compel blend or conjunction of prompts: edit() takes one prompt, with weights "
            "((word)1.5, word++) and at most .swap()s."
        )
    source: list[str] = []
    target: list[str] = []
    weights: dict[str, float] = {}
    swapped = False
    defaults = {"s_start": 0.0, "s_end": 0.0, "t_start": 0.2, "t_end": 1.0}

    def texts(fragments: list[Any], into: list[str], weigh: bool) -> None:
        for f in fragments:
            text = f.text.strip()
            if not text:
                continue
            into.append(text)
            if weigh and not f.weight == 1.0:  # NaN too: check_weight refuses it
                weights[text] = check_weight(text, f.weight)

    for part in parsed.prompts[0].children:
        if isinstance(part, CrossAttentionControlSubstitute):
            options = {k: v for k, v in part.options.items() if defaults.get(k) != v}
            if options:
                raise InvalidArgumentError(
                    f"{prompt!r}: .swap() options {options} are not taken; edit()'s cross_replace and "
                    "self_replace say for which fraction of the steps the source's attention is used."
                )
            swapped = True
            texts(part.original, source, False)
            texts(part.edited, target, True)
        elif isinstance(part, Fragment):
            texts([part], source, True)
            texts([part], target, False)
        else:
            raise InvalidArgumentError(f"{prompt!r}: {type(part).__name__} is not taken by edit().")
    plain = " ".join(source)
    return plain, (" ".join(target) if swapped else None), weights
