"""Ways to intervene at step k of a run: edit latents, switch the prompt, schedule guidance, stop early.

Every intervention is applied by a :class:`Steering` subscriber of the pipeline's attachment
(:mod:`sdexplore.record.attach`), which ``sdexplore.observe``, ``StepRecorder`` and ``sdexplore.steer`` create
from their steering options; it patches nothing itself:

- **edit latents** — ``edit_latents(step, latents) -> latents`` is called with the latents *leaving* step
  ``step`` (the scheduler's ``prev_sample``, inside a wrapper of the scheduler instance's ``step``); what it
  returns is what step ``step + 1`` starts from (and what gets decoded after the last step). Latents are
  (B, C, h, w) for every family: Flux's packed tokens are unpacked for the edit and the result packed back.
- **switch prompt** — :class:`PromptSwitch` replaces the conditional text embedding (and the pooled embedding:
  SDXL's ``text_embeds``, SD3's and Flux's ``pooled_projections``; SD3's sequence embedding is CLIP and T5
  together, Flux's T5's alone) given to the denoiser from step ``at_step`` on, before each denoiser call; the
  unconditional (negative) half is kept (Flux's true CFG: the negative prompt's call is left alone). Steps before
  ``at_step`` are bit-identical to a plain run. A switch given as ``prompt_embeds`` must bring the pooled
  embedding on the families that take one (checked before the run).
- **guidance schedule** — a list (one scale per step) or a callable ``(step, num_steps) -> scale``; every
  scale must be a finite number ≥ 0 (a list is checked up front, a callable's value when it is produced). The
  denoiser's forward hook rewrites the conditional prediction ``c`` to ``u + (g_k / g)(c − u)`` so that the
  pipeline's own ``u + g (c' − u)`` equals ``u + g_k (c − u)``. The pipeline must run with CFG (``guidance_scale > 1``);
  ``guidance_rescale`` then sees the rewritten ``c'``. On a guidance-distilled model (Flux.1-dev) the schedule sets
  the distilled guidance, the denoiser's own ``guidance`` input, at each step instead (the same as calling the
  pipeline with ``guidance_scale=g_k``); Flux.1-schnell has no guidance to schedule, and Flux's "true CFG"
  (``true_cfg_scale`` with a negative prompt) is refused with a schedule, which would be ambiguous there.
- **stop at step k** — after ``k`` steps the attachment sets ``pipe._interrupt = True`` (diffusers' own
  interrupt flag): the remaining steps are skipped and the latents after step ``k − 1`` are decoded as usual
  (``stop_returns="x0"`` replaces them by that step's predicted clean latent first, for a clean image).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidArgumentError, RecorderStateError
from ..families import Family, detect_family
from .attach import Attachment, Run, Step, Subscriber, attach

LatentEdit = Callable[[int, torch.Tensor], torch.Tensor]
GuidanceSchedule = Sequence[float] | Callable[[int, int], float]


@dataclass(frozen=True)
class PromptSwitch:
    """Condition on another prompt from step ``at_step`` on (steps before it are unchanged).

    Give either ``prompt`` (encoded with the pipeline's own ``encode_prompt``, pooled vector included) or
    ``prompt_embeds`` (1 or B, tokens, dim). With ``prompt_embeds`` on a family whose denoiser also takes a pooled
    text vector (SDXL, SD3, Flux.1) ``pooled_prompt_embeds`` (1 or B, dim) is required: the switch replaces both,
    and a switch that kept the original prompt's pooled vector would condition on a mix of two prompts
    (``sdexplore.encode_prompt(pipe, text).pooled_prompt_embeds`` gives it; to keep the original prompt's pooled
    vector on purpose, pass that one). The families without one (SD 1.x/2.x, Flux.2) refuse it. Both are checked
    when the steering is set up, before any run.
    """

    at_step: int
    prompt: str | None = None
    prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.at_step, int) or self.at_step < 0:
            raise InvalidArgumentError(f"PromptSwitch.at_step must be an int ≥ 0, got {self.at_step!r}.")
        if (self.prompt is None) == (self.prompt_embeds is None):
            raise InvalidArgumentError("PromptSwitch needs exactly one of prompt= or prompt_embeds=.")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise InvalidArgumentError(
                f"PromptSwitch.prompt must be a prompt string, got {type(self.prompt).__name__}."
            )
        for name in ("prompt_embeds", "pooled_prompt_embeds"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, torch.Tensor):
                raise InvalidArgumentError(
                    f"PromptSwitch.{name} must be a tensor (e.g. from sdexplore.encode_prompt), got "
                    f"{type(value).__name__}."
                )
        if self.pooled_prompt_embeds is not None and self.prompt_embeds is None:
            raise InvalidArgumentError(
                "PromptSwitch.pooled_prompt_embeds goes with prompt_embeds=: with prompt= the pooled vector is "
                "encoded from the prompt. Drop pooled_prompt_embeds, or pass prompt_embeds= instead of prompt=."
            )

    def check_for(self, family: Family) -> None:
        """Raise InvalidArgumentError unless the switch gives what ``family``'s denoiser takes (before any run):
        ``pooled_prompt_embeds`` with ``prompt_embeds`` where the family has a pooled text vector, none where not."""
        if family.denoiser_args.per_row:
            raise InvalidArgumentError(
                f"Prompt switches are not available on {family.label}: its denoiser takes the text as a list of "
                "per-row caption features, which sdexplore does not replace. Steer it with edit_latents or stop_at."
            )
        if self.prompt_embeds is None:
            return
        pooled = self.pooled_prompt_embeds
        if family.pooled_text_embeds and pooled is None:
            raise InvalidArgumentError(
                f"PromptSwitch(prompt_embeds=...) on {family.label} also needs pooled_prompt_embeds=: the "
                "denoiser takes a pooled text vector too, and the run would keep the original prompt's. Add "
                "pooled_prompt_embeds=sdexplore.encode_prompt(pipe, text).pooled_prompt_embeds (or switch with "
                "prompt=text)."
            )
        if not family.pooled_text_embeds and pooled is not None:
            raise InvalidArgumentError(
                f"{family.label} takes no pooled text vector: leave PromptSwitch.pooled_prompt_embeds None."
            )


def guidance_at(schedule: GuidanceSchedule, step: int, num_steps: int) -> float:
    """The guidance scale a schedule gives at ``step`` of a ``num_steps`` run.

    Each value is checked as it is produced: a number (or a one-element tensor) that is finite and ≥ 0, else
    InvalidArgumentError naming the step and the value (a NaN scale would turn every later latent into NaN).
    """
    value = schedule(step, num_steps) if callable(schedule) else schedule[step]
    scale = value
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()  # the schedule chose a tensor: one host read
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise InvalidArgumentError(
            f"The guidance schedule gave {value!r} ({type(value).__name__}) at step {step} of {num_steps}: it "
            "must return a number, the guidance scale of that step."
        )
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise InvalidArgumentError(
            f"The guidance schedule gave {scale!r} at step {step} of {num_steps}: a guidance scale must be a "
            "finite number ≥ 0."
        )
    return scale


def check_guidance_schedule(schedule: GuidanceSchedule, num_steps: int) -> None:
    """Raise a clear error if a list schedule is too short for the run."""
    if not callable(schedule) and len(schedule) < num_steps:
        raise InvalidArgumentError(
            f"The guidance schedule has {len(schedule)} values but the run has {num_steps} steps; give one scale "
            "per step (len(pipe.scheduler.timesteps)) or a callable (step, num_steps) -> scale."
        )


def rescale_conditional(
    uncond: torch.Tensor, cond: torch.Tensor, base_scale: float, target_scale: float
) -> torch.Tensor:
    """The conditional prediction c' for which ``u + base (c' − u) == u + target (c − u)``."""
    if base_scale == 0:
        raise InvalidArgumentError("Cannot schedule guidance when the pipeline's guidance_scale is 0.")
    return uncond + (target_scale / base_scale) * (cond - uncond)


def encode_switch(
    pipe: Any,
    family: Family,
    switch: PromptSwitch,
    device: torch.device,
    dtype: torch.dtype,
    options: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Conditional embedding (1|B, tokens, dim) and pooled embedding (or None) for a :class:`PromptSwitch`.

    ``options`` are the run's call arguments that shape the encoding (SD3's ``max_sequence_length``), so the
    switched prompt's embedding has the run's shape.
    """
    if switch.prompt_embeds is not None:
        pooled = switch.pooled_prompt_embeds
        return switch.prompt_embeds.to(device, dtype), None if pooled is None else pooled.to(device, dtype)
    enc = family.encode_prompt(
        pipe,
        switch.prompt,
        device=device,
        do_classifier_free_guidance=False,
        clip_skip=getattr(pipe, "_clip_skip", None),
        **(options or {}),
    )
    pooled = enc.pooled
    return enc.embeds.to(device, dtype), None if pooled is None else pooled.to(device, dtype)


def replace_conditional(
    current: torch.Tensor, new: torch.Tensor, cfg: bool, family: Family | None = None
) -> torch.Tensor:
    """``current`` (2B|B, ...) with its conditional rows (under CFG the family's conditional half) set to ``new``
    (1|B, ...)."""
    n = current.shape[0] // 2 if cfg else current.shape[0]
    if new.shape[1:] != current.shape[1:]:
        raise InvalidArgumentError(
            f"The switched prompt's embedding has shape {tuple(new.shape[1:])} per image but the pipeline uses "
            f"{tuple(current.shape[1:])}; encode it with the same pipeline (or pass prompt= instead). A pipeline "
            "that keeps only a prompt's own tokens (Qwen-Image) needs a switched prompt of as many tokens."
        )
    new = new.expand(n, *new.shape[1:]) if new.shape[0] == 1 else new
    if new.shape[0] != n:
        raise InvalidArgumentError(
            f"The switched prompt's embedding has batch {new.shape[0]}; expected 1 or {n}."
        )
    if cfg:
        uncond_first = family is None or family.cfg_uncond_first
        uncond = current[:n] if uncond_first else current[n:]  # (B, ...)
        new = new.to(current.dtype)
        return torch.cat([uncond, new] if uncond_first else [new, uncond])  # (2B, ...) in the family's layout
    return new.to(current.dtype).clone()


class Steering:
    """The steering options of one ``with`` block, applied as a subscriber of the pipeline's attachment.

    Validated on construction; checked against each run (its length, CFG) at the run's first denoiser call,
    before any step.
    """

    def __init__(
        self,
        pipe: Any,
        *,
        edit_latents: LatentEdit | None = None,
        switch_prompt: PromptSwitch | None = None,
        guidance: GuidanceSchedule | None = None,
        stop_at: int | None = None,
        stop_returns: str = "latents",
    ) -> None:
        if stop_at is not None and (not isinstance(stop_at, int) or isinstance(stop_at, bool) or stop_at < 1):
            raise InvalidArgumentError(f"stop_at must be an int ≥ 1, got {stop_at!r}.")
        if stop_at is not None:
            detect_family(pipe).require(
                "stop_at",
                "stop_at",
                why=f"the loop of {type(pipe).__name__} never reads the interrupt flag, so every step would run",
                hint="Stop it yourself with num_inference_steps.",
            )
        if stop_returns not in ("latents", "x0"):
            raise InvalidArgumentError(f"stop_returns must be 'latents' or 'x0', got {stop_returns!r}.")
        if edit_latents is not None and not callable(edit_latents):
            raise InvalidArgumentError("edit_latents must be a function (step, latents) -> latents.")
        if switch_prompt is not None and not isinstance(switch_prompt, PromptSwitch):
            raise InvalidArgumentError(
                "switch_prompt must be a sdexplore.record.steering.PromptSwitch(at_step=..., prompt=...)."
            )
        if switch_prompt is not None:
            switch_prompt.check_for(detect_family(pipe))
        if guidance is not None and detect_family(pipe).denoiser_args.per_row:
            raise InvalidArgumentError(
                f"Guidance schedules are not available on {detect_family(pipe).label}: its denoiser returns a list "
                "of per-row predictions, which sdexplore does not rescale. Call it with a fixed guidance_scale."
            )
        if guidance is not None and not callable(guidance):
            try:
                scales = [float(g) for g in guidance]
            except (TypeError, ValueError) as e:
                raise InvalidArgumentError(
                    "guidance must be a list of scales (one per step) or a callable (step, num_steps) -> scale."
                ) from e
            if not all(math.isfinite(g) and g >= 0 for g in scales):
                raise InvalidArgumentError(
                    f"guidance scales must be finite numbers ≥ 0, got {list(guidance)!r}."
                )
        self.pipe = pipe
        self._attach: attach | None = None
        self.edit_latents = edit_latents
        self.switch_prompt = switch_prompt
        self.guidance = guidance
        self.stop_at = stop_at
        self.stop_returns = stop_returns
        self.attachment: Attachment | None = None
        self.subscriber = Subscriber(
            kind="steering",
            order=0,  # edits happen before recorders read
            run_start=self._run_start,
            denoiser_pre=self._denoiser_pre,
            denoiser_post=self._denoiser_post if guidance is not None else None,
            step=self._step,
        )
        self._switch_cache: tuple[Any, Any] | None = None
        self._checked = False

    def __enter__(self) -> Steering:
        if self._attach is not None:
            raise RecorderStateError("This Steering is already active; leave its `with` block first.")
        self._attach = attach(self.pipe, self.subscriber)
        self.attachment = self._attach.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._attach is not None:
            ctx, self._attach = self._attach, None
            self.attachment = None
            ctx.__exit__(*exc)

    @property
    def active(self) -> bool:
        """Whether any option is set (an empty Steering need not subscribe)."""
        return any(
            x is not None for x in (self.edit_latents, self.switch_prompt, self.guidance, self.stop_at)
        )

    def _run_start(self, run: Run) -> None:
        self._switch_cache = None
        self._checked = False

    def _check(self, run: Run) -> None:
        self._checked = True
        n = run.num_steps
        if self.stop_at is not None and self.stop_at > n:
            raise InvalidArgumentError(
                f"stop_at={self.stop_at} is beyond this run's {n} steps; choose 1..{n}."
            )
        if self.switch_prompt is not None and self.switch_prompt.at_step >= n:
            raise InvalidArgumentError(
                f"PromptSwitch.at_step={self.switch_prompt.at_step} is beyond this run's {n} steps."
            )
        if self.guidance is not None:
            assert self.attachment is not None
            fam = self.attachment.family
            if not fam.cfg_batch and run.cfg:
                two_calls = (
                    "CFG: guidance_scale > 1"
                    if fam.cfg_flag
                    else "true CFG: true_cfg_scale > 1 and a negative prompt"
                )
                raise InvalidArgumentError(
                    f"A guidance schedule on {fam.label} steers a distilled guidance input, not classifier-free "
                    f"guidance run as two denoiser calls per step ({two_calls}, as this call does): call the "
                    "pipeline without it to use a schedule."
                )
            if not fam.cfg_batch and not run.distilled:
                raise InvalidArgumentError(
                    f"This {fam.label} transformer takes no guidance input (a schnell-shaped model, "
                    "guidance_embeds=False) and the call runs no true CFG: there is no guidance to schedule."
                )
            if fam.cfg_batch and not run.cfg:
                raise InvalidArgumentError(
                    "A guidance schedule needs classifier-free guidance: call the pipeline with guidance_scale > 1."
                )
            check_guidance_schedule(self.guidance, n)

    def _denoiser_pre(self, run: Run, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self._checked:
            self._check(run)
        assert self.attachment is not None
        spec = self.attachment.family.denoiser_args
        changed = None
        if self.guidance is not None and run.distilled and not run.cfg:  # Flux.1-dev: the input (B,) itself
            target = guidance_at(self.guidance, run.steps_done, run.num_steps)
            run.step_guidance = target
            current = spec.get("guidance", args, kwargs)
            args, kwargs = changed = spec.replace("guidance", args, kwargs, torch.full_like(current, target))
        sw = self.switch_prompt
        if sw is None or run.steps_done < sw.at_step:
            return changed
        if not self.attachment.family.cfg_batch and run.step_calls > 0:
            return changed  # Flux's true CFG: the step's second call is the negative prompt's
        return self._switch(run, args, kwargs, sw)

    def _switch(self, run: Run, args: tuple, kwargs: dict, sw: PromptSwitch) -> tuple[tuple, dict]:
        assert self.attachment is not None
        fam, pipe = self.attachment.family, self.attachment.pipe
        spec = fam.denoiser_args
        cfg = run.cfg and fam.cfg_batch  # a CFG batch whose conditional half is replaced
        text = spec.get("text", args, kwargs)
        if self._switch_cache is None:
            options = {k: run.arguments[k] for k in fam.encode_options if k in run.arguments}
            self._switch_cache = encode_switch(pipe, fam, sw, text.device, text.dtype, options)
        embeds, pooled = self._switch_cache
        args, kwargs = spec.replace("text", args, kwargs, replace_conditional(text, embeds, cfg, fam))
        current_pooled = spec.get("pooled", args, kwargs)
        if pooled is not None and current_pooled is not None:
            args, kwargs = spec.replace(
                "pooled", args, kwargs, replace_conditional(current_pooled, pooled, cfg, fam)
            )
        return args, kwargs

    def _denoiser_post(self, run: Run, output: torch.Tensor) -> torch.Tensor | None:
        assert self.attachment is not None
        fam = self.attachment.family
        if not run.cfg or self.guidance is None or not fam.cfg_batch:
            return None
        target = guidance_at(self.guidance, run.steps_done, run.num_steps)
        run.step_guidance = target
        u, c = fam.cfg_halves(output)  # (B, C, h, w) each
        return fam.join_cfg(u, rescale_conditional(u, c, run.guidance_scale, target))

    def _step(self, step: Step) -> torch.Tensor | None:
        new = None
        if self.edit_latents is not None:
            new = self.edit_latents(step.index, step.prev_sample)
            if not isinstance(new, torch.Tensor) or new.shape != step.prev_sample.shape:
                raise InvalidArgumentError(
                    f"edit_latents must return a tensor of shape {tuple(step.prev_sample.shape)} (the latents it was "
                    "given)."
                )
        if self.stop_at is not None and step.index + 1 == self.stop_at:
            if self.stop_returns == "x0":
                new = step.x0.to(step.prev_sample.dtype)
            assert self.attachment is not None
            self.attachment.request_stop()
            step.stop = True
        return new
