"""sdexplore.edit (this module is `editing` so that importing it never hides the function): edit a generated image by its attention maps (Prompt-to-Prompt word swap, reweighting, ablation).

One batched pipeline call of the source prompt(s) and the target prompt(s), both from the same initial latents,
under a :class:`~sdexplore.record.control.Control` (the edits) and an attention recorder (the maps of both
branches): the source branch is the plain image, the target branch the edit. Every input is checked before any
work. UNet families (SD 1.x, 2.x, XL) for now.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .errors import InvalidArgumentError
from .families import vae_scale_factor
from .record.attach import attachment_of
from .record.control import Control, Reweight, WordSwap, check_aligned, check_controllable
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
    generator: torch.Generator | list[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
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
    - ``masks``: words → ``(h, w)`` arrays in [0, 1]: the word's attention is put where the mask is.

    ``generator`` draws the initial latents as the pipeline itself would (so the source is the plain image of
    ``prompt`` with that seed, and ``pipe(target, generator=same seed)`` is the naive baseline); ``latents``
    (B, C, h, w) gives them directly. Other keywords go to the pipeline call (``num_inference_steps``,
    ``guidance_scale``, ``negative_prompt``, ``height``, ``width``...). Edits apply to the conditional half of
    the CFG batch. ``attention=True`` records the maps of both branches (``res.source_maps``,
    ``res.edited_maps``); inside an enclosing ``observe(pipe, attention=True)`` block that block records them
    instead (the edited probabilities) and the result's maps are None.

    Raises InvalidArgumentError before any work for prompts that cannot be aligned, a weight that is NaN or
    negative, a fraction outside [0, 1], or nothing to edit; WordNotFoundError for a word not in the prompt;
    UnsupportedPipelineError on an MMDiT family (controls run on SD 1.x/2.x/XL for now).
    """
    family = check_controllable(pipe)
    sources = _prompts("prompt", prompt)
    targets = sources if target is None else _prompts("target", target)
    if len(targets) != len(sources):
        raise InvalidArgumentError(
            f"{len(sources)} source prompt(s) but {len(targets)} target prompt(s): pass one target per source."
        )
    if target is None and not reweight and not masks:
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
    n_src = len(sources) * num_images_per_prompt  # images per branch
    edits: list[Any] = []
    if target is not None:
        swap = WordSwap(cross_replace, self_replace)  # checks the fractions
        for s, t in zip(sources, targets, strict=True):
            check_aligned(pipe, s, t)
        edits.append(swap)
    if reweight or masks:
        rw = Reweight(reweight, masks=masks, steps=steps, images=list(range(n_src, 2 * n_src)))
        for t in dict.fromkeys(targets):
            rw.positions(pipe, t)  # WordNotFoundError before any work
        edits.append(rw)

    den = family.get_denoiser(pipe)
    scale = vae_scale_factor(pipe)
    size = int(den.config.sample_size) * scale
    height, width = int(call.pop("height", None) or size), int(call.pop("width", None) or size)
    shape = (n_src, int(den.config.in_channels), height // scale, width // scale)
    if latents is None:
        from diffusers.utils.torch_utils import randn_tensor

        device = getattr(pipe, "_execution_device", den.device)
        latents = randn_tensor(shape, generator=generator, device=torch.device(device), dtype=den.dtype)
    elif not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
        raise InvalidArgumentError(
            f"latents must be a tensor of shape {shape} (one per source image), got "
            f"{getattr(latents, 'shape', type(latents).__name__)}."
        )
    both = torch.cat([latents, latents])  # (2B, C, h, w): the same noise for source and target

    record = attention
    existing = attachment_of(pipe)
    if existing is not None and any(s.kind == "attention" for s in existing.subscribers):
        record = False  # the enclosing block records the edited maps itself
    recorder = None
    if record:
        from .record.attention import AttentionRecorder

        recorder = AttentionRecorder(pipe)
    with Control(pipe, *edits):
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
        cross_replace=None if target is None else float(cross_replace),
        self_replace=None if target is None else float(self_replace),
        reweight=dict(reweight or {}),
        masks=sorted(masks or {}),
        steps=list(steps),
        num_images_per_prompt=num_images_per_prompt,
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
        prompts,
        latents=latents,
        generator=gen,
        num_images_per_prompt=n,
        height=height,
        width=width,
        **call,
    )
