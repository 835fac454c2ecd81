"""Applying directions: one ``direction`` subscriber of the pipeline's attachment adds strength × shift.

- a **text** direction changes the denoiser's text input before each chosen step (``denoiser_pre``): the
  conditional rows of the prompt embedding (and of the pooled embedding) get ``strength · embeds``; the
  unconditional (negative) half is kept, as a prompt switch keeps it;
- an **inner** direction changes the image-stream output of one attention layer (the UNet's mid-block
  self-attention; an MMDiT block's joint attention) during the chosen steps: the attachment puts a processor on
  that layer (its :class:`AttentionTap`) that calls the layer's very own processor and adds ``strength · shift``
  to each half of the CFG batch;
- a **latent** direction (a Jacobian direction) moves the latents x_t at the start of each chosen step: the
  attachment's ``step`` hook adds ``strength · shift`` to every image's latents leaving the step before (so a
  latent direction cannot act at step 0, whose x_t is the seed's noise).

A strength of 0 (or a step outside the chosen ones) changes nothing: the inputs and outputs are the very tensors
of a plain run, so the image is bit for bit the plain image.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import InvalidArgumentError, RecorderStateError
from ..families import Family, detect_family
from ..record.attach import Attachment, AttentionTap, Run, Step, Subscriber, attach, attachment_of

if TYPE_CHECKING:
    from ..results.directions import DirectionData

#: Families whose directions sdexplore finds and applies (one denoiser call per step, a CFG batch).
SUPPORTED = ("sd1", "sd2", "sdxl", "sd3")


def check_family(pipe: Any) -> Family:
    """The pipeline's family, or :class:`~sdexplore.errors.UnsupportedPipelineError` naming the families directions
    work on (:meth:`Family.require`)."""
    return detect_family(pipe).require(
        "directions", "Directions", why="its classifier-free guidance is not one batch"
    )


def check_strength(strength: Any, what: str = "strength") -> float:
    """A finite real number, else InvalidArgumentError (a NaN strength would turn the image into NaN)."""
    if isinstance(strength, torch.Tensor) and strength.numel() == 1:
        strength = strength.item()
    if (
        isinstance(strength, bool)
        or not isinstance(strength, numbers.Real)
        or not math.isfinite(float(strength))
    ):
        raise InvalidArgumentError(
            f"{what} must be a finite number (1.0: the direction's own size, 0: the plain image), got {strength!r}."
        )
    return float(strength)


def check_steps(steps: Any) -> list[int] | None:
    """None (every step) or a non-empty list of step indices ≥ 0."""
    if steps is None:
        return None
    if isinstance(steps, range):
        steps = list(steps)
    if (
        not isinstance(steps, Sequence)
        or isinstance(steps, str)
        or not steps
        or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in steps)
    ):
        raise InvalidArgumentError(
            f"steps must be None (every step) or a non-empty list of step indices ≥ 0, got {steps!r}."
        )
    return sorted({int(s) for s in steps})


class StreamTap:
    """A layer's own processor, then ``edit(output)`` on its image-stream output (N, HW, C).

    ``edit`` returns a new tensor, or None to keep the very output of the original processor. SD3's joint
    processor returns (image, text): only the image part is handed over."""

    def __init__(self, original: Any, edit: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        self.original = original
        self.edit = edit

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        image = out[0] if isinstance(out, tuple) else out  # (N, HW, C)
        new = self.edit(image)
        if new is None:
            return out
        return (new, *out[1:]) if isinstance(out, tuple) else new


def check_layer_free(pipe: Any, layer: str) -> None:
    """Refuse a layer whose processor another subscriber already replaced (the two would overwrite each other)."""
    att = attachment_of(pipe)
    slot = None if att is None else att._slots.get(layer)
    if slot is not None and (slot.capture is not None or slot.controls):
        raise RecorderStateError(
            f"{layer} is already recorded or controlled by an enclosing `with` block; an inner direction there "
            "would replace that processor. Apply the direction outside that block, or find it at another layer "
            "(layer=...)."
        )


class DirectionSteering:
    """Context manager: apply directions, each with its strength and steps, to every run of ``pipe`` inside it."""

    def __init__(
        self,
        pipe: Any,
        directions: Sequence[tuple[DirectionData, float, list[int] | None]],
    ) -> None:
        fam = check_family(pipe)
        for d, _, _ in directions:
            if d.family != fam.name:
                raise InvalidArgumentError(
                    f"This direction was found on a {d.family} model, the pipeline is {fam.label}: a direction "
                    "fits only the model it was found on. Find it again with this pipeline."
                )
            if d.space == "text" and d.pooled is not None and not fam.pooled_text_embeds:
                raise InvalidArgumentError(
                    f"{fam.label} takes no pooled text vector, but the direction has one."
                )
        self.pipe, self.family = pipe, fam
        # zero strengths are dropped: they must leave the run untouched
        self.text = [(d, s, st) for d, s, st in directions if d.space == "text" and s != 0.0]
        self.inner: dict[str, list[tuple[DirectionData, float, list[int] | None]]] = {}
        for d, s, st in directions:
            if d.space == "inner" and s != 0.0:
                assert d.layer is not None
                self.inner.setdefault(d.layer, []).append((d, s, st))
        self.latent = [(d, s, st) for d, s, st in directions if d.space == "latent" and s != 0.0]
        for d, _, st in self.latent:
            if 0 in (st if st is not None else [0]):
                raise InvalidArgumentError(
                    "A latent direction moves x_t at the start of a step, after the step before: it cannot act at "
                    "step 0 (the seed's noise) nor at every step. Give steps ≥ 1 (its own: "
                    f"{d.steps})."
                )
        self._attach: attach | None = None
        self.attachment: Attachment | None = None
        self._cache: dict[tuple[int, str, Any, Any], torch.Tensor] = {}

    def __enter__(self) -> DirectionSteering:
        if self._attach is not None:
            raise RecorderStateError("These directions are already applied; leave their `with` block first.")
        for layer in self.inner:
            check_layer_free(self.pipe, layer)
        tap = None
        if self.inner:
            tap = AttentionTap({f"{layer}.processor": self._factory(layer) for layer in self.inner})
        sub = Subscriber(
            kind="direction",
            order=0,  # before recorders read the inputs
            denoiser_pre=self._denoiser_pre if self.text else None,
            attention=tap,
            step=self._move_latents if self.latent else None,
        )
        if sub.denoiser_pre is None and tap is None and sub.step is None:
            sub.run_start = lambda run: None  # every strength is 0: subscribe and change nothing
        self._attach = attach(self.pipe, sub, self.family)
        self.attachment = self._attach.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._attach is not None:
            ctx, self._attach = self._attach, None
            self.attachment = None
            ctx.__exit__(*exc)

    def _as(self, d: DirectionData, name: str, like: torch.Tensor) -> torch.Tensor:
        key = (id(d), name, like.device, like.dtype)
        t = self._cache.get(key)
        if t is None:
            t = self._cache[key] = getattr(d, name).to(like.device, like.dtype)
        return t

    def _step(self, run: Run, during: bool) -> int:
        # the index of the step being denoised (one denoiser call per step on the supported families);
        # before the call (denoiser_pre) the attachment has not counted it yet
        return run.calls if not during else run.calls - 1

    def _cond_rows(self, run: Run, rows: int) -> tuple[slice, slice | None]:
        if run.cfg:
            u, c = self.family.cfg_rows(rows)
            return c, u
        return slice(None), None

    def _denoiser_pre(self, run: Run, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        step = self._step(run, during=False)
        active = [(d, s) for d, s, st in self.text if st is None or step in st]
        if not active:
            return None
        spec = self.family.denoiser_args
        text = spec.get("text", args, kwargs)  # (2B|B, T, D)
        cond, _ = self._cond_rows(run, text.shape[0])
        new = text.clone()
        for d, s in active:
            delta = self._as(d, "embeds", text)  # (T, D)
            if delta.shape != text.shape[1:]:
                raise InvalidArgumentError(
                    f"The text direction's shift is {tuple(delta.shape)} per prompt but this run's prompt embedding "
                    f"is {tuple(text.shape[1:])}: find the direction with the same pipeline and text settings "
                    "(max_sequence_length)."
                )
            new[cond] += s * delta
        args, kwargs = spec.replace("text", args, kwargs, new)
        pooled = spec.get("pooled", args, kwargs)  # (2B|B, P)
        with_pooled = [(d, s) for d, s in active if d.pooled is not None]
        if pooled is not None and with_pooled:
            new_pooled = pooled.clone()
            for d, s in with_pooled:
                new_pooled[cond] += s * self._as(d, "pooled", pooled)
            args, kwargs = spec.replace("pooled", args, kwargs, new_pooled)
        return args, kwargs

    def _move_latents(self, step: Step) -> torch.Tensor | None:
        # this step's output is x_t of step index + 1
        active = [(d, s) for d, s, st in self.latent if st is not None and step.index + 1 in st]
        if not active:
            return None
        prev = step.prev_sample  # (B, C, h, w)
        new = prev.clone()
        for d, s in active:
            shift = self._as(d, "shift", prev)  # (C, h, w)
            if shift.shape != prev.shape[1:]:
                raise InvalidArgumentError(
                    f"The latent direction is {tuple(shift.shape)} (channels, height, width) but this run's latents "
                    f"are {tuple(prev.shape[1:])}: apply it at the image size it was found at (height=, width=)."
                )
            new += s * shift
        return new

    def _factory(self, layer: str) -> Callable[[Any], StreamTap]:
        entries = self.inner[layer]

        def edit(image: torch.Tensor) -> torch.Tensor | None:
            att = self.attachment
            run = None if att is None else att.run
            if run is None or not run.started:
                return None
            step = self._step(run, during=True)
            active = [(d, s) for d, s, st in entries if st is None or step in st]
            if not active:
                return None
            new = image.clone()
            cond, uncond = self._cond_rows(run, image.shape[0])
            for d, s in active:
                shift = self._as(d, "shift", image)  # (2, HW, C): uncond, cond
                if shift.shape[1:] != image.shape[1:]:
                    raise InvalidArgumentError(
                        f"The inner direction at {layer} is {tuple(shift.shape[1:])} (positions, channels) but this "
                        f"run's layer output is {tuple(image.shape[1:])}: apply it at the image size it was found "
                        "at (height=, width=)."
                    )
                new[cond] += s * shift[1]
                if uncond is not None:
                    new[uncond] += s * shift[0]
            return new

        return lambda original: StreamTap(original, edit)
