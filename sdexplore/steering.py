"""Ways to intervene at step k of a run: edit latents, switch the prompt, schedule guidance, stop early.

Every intervention is applied by :class:`sdexplore.steps.StepRecorder` (and so by ``sdexplore.observe`` and
``sdexplore.steer``) through public extension points only:

- **edit latents** — ``edit_latents(step, latents) -> latents`` is called with the latents *leaving* step
  ``step`` (the scheduler's ``prev_sample``, inside a wrapper of the scheduler instance's ``step``); what it
  returns is what step ``step + 1`` starts from (and what gets decoded after the last step).
- **switch prompt** — :class:`PromptSwitch` replaces the conditional text embedding (and SDXL's pooled
  embedding) given to the UNet from step ``at_step`` on, in a UNet forward pre-hook; the unconditional
  (negative) half is kept. Steps before ``at_step`` are bit-identical to a plain run.
- **guidance schedule** — a list (one scale per step) or a callable ``(step, num_steps) -> scale``. The UNet
  forward hook rewrites the conditional prediction ``c`` to ``u + (g_k / g)(c − u)`` so that the pipeline's
  own ``u + g (c' − u)`` equals ``u + g_k (c − u)``. The pipeline must run with CFG (``guidance_scale > 1``);
  ``guidance_rescale`` then sees the rewritten ``c'``.
- **stop at step k** — after ``k`` steps the recorder sets ``pipe._interrupt = True`` (diffusers' own
  interrupt flag): the remaining steps are skipped and the latents after step ``k − 1`` are decoded as usual
  (``stop_returns="x0"`` replaces them by that step's predicted clean latent first, for a clean image).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

LatentEdit = Callable[[int, torch.Tensor], torch.Tensor]
GuidanceSchedule = Sequence[float] | Callable[[int, int], float]


@dataclass(frozen=True)
class PromptSwitch:
    """Condition on another prompt from step ``at_step`` on (steps before it are unchanged).

    Give either ``prompt`` (encoded with the pipeline's own ``encode_prompt``) or ``prompt_embeds``
    (1 or B, tokens, dim) — plus ``pooled_prompt_embeds`` (1 or B, dim) for SDXL.
    """

    at_step: int
    prompt: str | None = None
    prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.at_step, int) or self.at_step < 0:
            raise ValueError(f"PromptSwitch.at_step must be an int ≥ 0, got {self.at_step!r}.")
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise ValueError("PromptSwitch needs exactly one of prompt= or prompt_embeds=.")


def guidance_at(schedule: GuidanceSchedule, step: int, num_steps: int) -> float:
    """The guidance scale a schedule gives at ``step`` of a ``num_steps`` run."""
    if callable(schedule):
        return float(schedule(step, num_steps))
    return float(schedule[step])


def check_guidance_schedule(schedule: GuidanceSchedule, num_steps: int) -> None:
    """Raise a clear error if a list schedule is too short for the run."""
    if not callable(schedule) and len(schedule) < num_steps:
        raise ValueError(
            f"The guidance schedule has {len(schedule)} values but the run has {num_steps} steps; give one scale "
            "per step (len(pipe.scheduler.timesteps)) or a callable (step, num_steps) -> scale."
        )


def rescale_conditional(
    uncond: torch.Tensor, cond: torch.Tensor, base_scale: float, target_scale: float
) -> torch.Tensor:
    """The conditional prediction c' for which ``u + base (c' − u) == u + target (c − u)``."""
    if base_scale == 0:
        raise ValueError("Cannot schedule guidance when the pipeline's guidance_scale is 0.")
    return uncond + (target_scale / base_scale) * (cond - uncond)


def encode_switch(
    pipe: Any, switch: PromptSwitch, device: torch.device, dtype: torch.dtype
) -> tuple[Any, Any]:
    """Conditional embedding (1|B, tokens, dim) and pooled embedding (or None) for a :class:`PromptSwitch`."""
    if switch.prompt_embeds is not None:
        pooled = switch.pooled_prompt_embeds
        return switch.prompt_embeds.to(device, dtype), None if pooled is None else pooled.to(device, dtype)
    out = pipe.encode_prompt(
        prompt=switch.prompt,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        clip_skip=getattr(pipe, "_clip_skip", None),
    )
    pooled = out[2] if len(out) >= 4 else None  # SDXL: (embeds, neg, pooled, neg_pooled)
    return out[0].to(device, dtype), None if pooled is None else pooled.to(device, dtype)


def replace_conditional(current: torch.Tensor, new: torch.Tensor, cfg: bool) -> torch.Tensor:
    """``current`` (2B|B, ...) with its conditional rows (the second half under CFG) set to ``new`` (1|B, ...)."""
    n = current.shape[0] // 2 if cfg else current.shape[0]
    if new.shape[1:] != current.shape[1:]:
        raise ValueError(
            f"The switched prompt's embedding has shape {tuple(new.shape[1:])} per image but the pipeline uses "
            f"{tuple(current.shape[1:])}; encode it with the same pipeline (or pass prompt= instead)."
        )
    new = new.expand(n, *new.shape[1:]) if new.shape[0] == 1 else new
    if new.shape[0] != n:
        raise ValueError(f"The switched prompt's embedding has batch {new.shape[0]}; expected 1 or {n}.")
    if cfg:
        return torch.cat([current[: current.shape[0] - n], new.to(current.dtype)])  # (2B, ...) uncond first
    return new.to(current.dtype).clone()
