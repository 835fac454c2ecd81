"""The attachment: the one owner of every change sdexplore makes to a pipeline, and the one definition of a run.

Everything that records or steers a pipeline (steps, attention maps, steering, live listeners) subscribes to an
:class:`Attachment` with callables; nothing else patches anything. The attachment makes these changes, each with
its undo, and undoes them once, in reverse order, when the last subscriber leaves — on success, on an exception,
on ``KeyboardInterrupt``:

- the pipeline *instance* is given a subclass of its own class whose ``__call__`` marks the run boundary (the class
  itself is never modified, other instances are untouched, ``type(pipe).__name__`` is unchanged);
- a forward pre-hook and a forward hook on the family's denoiser (``pipe.unet``; SD3's and Flux's
  ``pipe.transformer``);
- during a run only: wrappers on the *instance* ``step`` of whatever scheduler the pipeline holds when the run
  starts (so ``set_scheduler`` inside a ``with`` block is observed), removed when the run ends;
- the attention-processor swap on the layers an attention subscriber asks for (all other layers keep their exact
  processor objects);
- ``pipe._interrupt`` when a subscriber asks to stop early (diffusers resets it at the next call anyway).

Latents are handed to subscribers as (B, C, h, w) for every family: Flux's scheduler steps 2×2-packed tokens
(B, h/2 · w/2, 64), which the attachment unpacks for the :class:`Step` (and packs back where a subscriber returns new
latents). Families without a CFG batch (Flux) run classifier-free guidance, where at all, as two denoiser calls per
step (the prompt's, then the negative prompt's); the attachment joins their outputs into the usual (uncond, cond)
batch for the step's subscribers.

A *run* is one top-level pipeline call: it begins when ``pipe(...)`` is entered and ends when it returns or
raises. Calls the pipeline makes inside itself (``encode_prompt``, a nested ``pipe(...)`` from a callback) and
sdexplore's own ``encode_prompt`` calls never start a run. Denoiser calls outside a run are not observed.

One attachment per denoiser: two pipeline objects built from the same components share a UNet, and only one of
them can be observed at a time (a clear :class:`~sdexplore.errors.RecorderStateError` otherwise).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InvalidArgumentError, RecorderStateError
from ..families import Family, detect_family, signature_of
from ..masks import check_inpaint_inputs
from ..schedule_math import (
    FLOW_PREDICTION,
    NoiseLevel,
    alpha_bar_from_sigma,
    flow_level,
    is_flow_matching,
    prediction_type,
    sigma_from_alpha_bar,
    uses_sigmas,
    x0_from_flow,
    x0_from_prediction,
)

_BY_DENOISER: dict[int, Attachment] = {}  # id(denoiser) -> its attachment
_BY_PIPE: dict[int, Attachment] = {}  # id(pipe) -> its attachment
_OBSERVED_CLASSES: dict[type, type] = {}  # pipeline class -> its observed subclass (made once per class)


# ---- what subscribers receive --------------------------------------------------------------------------------
@dataclass
class Run:
    """One top-level pipeline call, as subscribers see it.

    ``arguments`` are the call's arguments bound to the pipeline's ``__call__`` signature (``prompt``,
    ``negative_prompt``, ``num_images_per_prompt``, ...; defaults not filled in). The schedule fields are read
    once, at the first denoiser call, so that no step has to synchronise with the device to label itself.
    """

    index: int  # 0 for the first run of this attachment
    arguments: dict[str, Any]
    scheduler: Any  # the scheduler instance this run uses
    num_steps: int = 0  # length of the pipeline's loop (img2img: the tail of the schedule)
    steps_done: int = 0  # scheduler steps completed so far (counted only while a subscriber hears steps)
    calls: int = 0  # denoiser calls completed so far (one per step of the pipeline's loop)
    cfg: bool = False  # classifier-free guidance on (the denoiser batch is 2B: uncond, cond; Flux: two calls)
    distilled: bool = False  # the denoiser takes the guidance scale as an input (Flux.1-dev)
    prediction_type: str = "epsilon"
    ve_latents: bool = False  # Euler-type: latents are x0 + σ·ε (init_noise_sigma > 1)
    flow: bool = False  # flow matching: latents are (1 − s)·x0 + s·ε, the model predicts v = ε − x0
    train_timesteps: int = 1000  # the scheduler's num_train_timesteps (flow: timestep = s · this)
    timesteps: list[float] = field(default_factory=list)  # the whole schedule, host floats
    schedule_begin: int = 0  # index of this run's first step in ``timesteps``
    sigmas: list[float] | None = None  # sigma schedulers: host copy of scheduler.sigmas
    alphas_cumprod: list[float] | None = None  # ᾱ-indexed schedulers: host copy
    latent_grid: tuple[int, int] | None = None  # (h, w) latent cells; packed families only (Flux)
    denoiser_in: torch.Tensor | None = None  # (2B|B, C, h, w) the latest denoiser sample input (Flux: packed)
    # (2B|B, C, h, w) the latest raw denoiser output (before edits); at a step, Flux's unpacked, its two true-CFG
    # calls joined (uncond, cond)
    denoiser_out: torch.Tensor | None = None
    step_calls: int = (
        0  # denoiser calls since the last scheduler step (Flux's true CFG: 0 prompt, 1 negative)
    )
    call_outputs: list[torch.Tensor] = field(default_factory=list)  # without a CFG batch: this step's outputs
    guidance_scale: float = (
        1.0  # the pipeline's own scale (read at the first denoiser call; Flux: see _fill_schedule)
    )
    step_guidance: float | None = None  # this step's effective scale where a guidance schedule changed it
    started: bool = False  # the first denoiser call has been seen (schedule fields are filled)
    mask: torch.Tensor | None = None  # (M, H, W) an inpainting call's mask in [0, 1] (1 = repainted), CPU
    attention_edited: bool = False  # a control changed some cross-attention probabilities in this run
    text_tokens: int = (
        0  # the latest denoiser call's text tokens (Flux: the head of a single-stream sequence)
    )

    def timestep(self, i: int, given: Any) -> float:
        """Step ``i``'s timestep as a float, from the host copy of the schedule (no device sync)."""
        j = self.schedule_begin + i
        if 0 <= j < len(self.timesteps):
            return self.timesteps[j]
        return float(given)  # a schedule the run could not read up front: one sync, only then

    def level(self, t: float, step_index: int | None) -> NoiseLevel:
        """Noise level of the evaluation at timestep ``t`` (sigma schedulers: at ``step_index``), from host copies."""
        if self.flow:  # the scheduler's own s where it indexes sigmas, else s = t / num_train_timesteps
            if self.sigmas is not None and step_index is not None and 0 <= step_index < len(self.sigmas):
                return flow_level(self.sigmas[step_index])
            return flow_level(min(max(t / self.train_timesteps, 0.0), 1.0))
        if self.sigmas is not None and step_index is not None and 0 <= step_index < len(self.sigmas):
            sigma = self.sigmas[step_index]
            return NoiseLevel(alpha_bar_from_sigma(sigma), sigma, "sigmas")
        acp = self.alphas_cumprod
        if acp is None:
            raise RecorderStateError(
                f"{type(self.scheduler).__name__} has neither sigmas nor alphas_cumprod; sdexplore cannot compute its "
                "noise level. Use a DDIM, PNDM, Euler, DPM-Solver or UniPC scheduler."
            )
        ab = acp[min(max(int(round(t)), 0), len(acp) - 1)]
        return NoiseLevel(ab, sigma_from_alpha_bar(ab), "alphas_cumprod")


@dataclass
class Step:
    """One ``scheduler.step`` call of a run (one iteration of the pipeline's loop).

    ``prev_sample`` is what the next step starts from; a steering subscriber may replace it with
    :meth:`Attachment`'s return protocol (its ``step`` callable returns a new tensor), and later subscribers see
    the replacement. ``x0`` is computed on first use and shared by every subscriber.
    """

    run: Run
    index: int
    timestep: float
    model_output: torch.Tensor  # (B, C, h, w) the guided prediction the scheduler received (unpacked)
    sample: torch.Tensor  # (B, C, h, w) latents entering the step
    prev_sample: torch.Tensor  # (B, C, h, w) latents leaving the step (after any edit)
    pred_original_sample: torch.Tensor | None  # (B, C, h, w) the scheduler's own x0, where it returns one
    level: NoiseLevel
    last: bool  # the last step of the run (its final latents follow)
    guidance_scale: float = 1.0  # effective CFG scale of this step (1.0 without CFG)
    stop: bool = False  # set by a steering subscriber that ends the run after this step
    _x0: torch.Tensor | None = None
    _x0_source: str = "none"

    @property
    def x0(self) -> torch.Tensor:
        """Predicted clean latent (B, C, h, w): the scheduler's own where it returns one, else computed."""
        if self._x0 is None:
            if self.pred_original_sample is not None:
                self._x0, self._x0_source = self.pred_original_sample, "scheduler"
            else:
                self._x0, self._x0_source = self._compute_x0(), "computed"
        return self._x0

    @property
    def x0_source(self) -> str:
        """ "scheduler", "computed", or "none" while x0 has not been asked for."""
        return self._x0_source

    def _compute_x0(self) -> torch.Tensor:
        if self.run.prediction_type == FLOW_PREDICTION:  # x0 = x_t − s·v, x_t the step's (unscaled) input
            assert self.level.flow_sigma is not None
            return x0_from_flow(
                self.model_output, self.sample.to(self.model_output.dtype), self.level.flow_sigma
            )
        b = self.sample.shape[0]
        vp = self.run.denoiser_in
        if vp is not None and vp.shape[0] in (b, 2 * b) and vp.shape[1:] == self.sample.shape[1:]:
            vp = vp[:b]  # (B, C, h, w): both CFG halves saw the same input
        elif self.level.source == "sigmas" and self.run.ve_latents:
            vp = self.sample * math.sqrt(self.level.alpha_bar)  # VE → VP form
        else:
            vp = self.sample
        return x0_from_prediction(
            self.model_output, vp.to(self.model_output.dtype), self.level.alpha_bar, self.run.prediction_type
        )


@dataclass
class Subscriber:
    """What one recorder or steering object wants to hear. Every callable is optional.

    - ``run_start(run)`` / ``run_end(run, error)``: a top-level call began / ended (``error`` is the exception
      or None);
    - ``denoiser_pre(run, args, kwargs) -> (args, kwargs) | None``: before each denoiser call; return new
      arguments to change its inputs (a prompt switch);
    - ``denoiser_post(run, output) -> output | None``: after it, with its raw output tensor (2B|B, C, h, w);
      return a new tensor to change what the pipeline gets (a guidance schedule);
    - ``step(step) -> tensor | None``: after each scheduler step; return new latents to continue from;
    - ``attention``: an :class:`AttentionTap` to capture attention probabilities on chosen layers;
    - ``control``: a :class:`ControlTap` to change attention probabilities on chosen layers (a capture on the
      same layer then records the changed probabilities, whichever subscriber came first).

    ``kind`` ("steps", "attention", "steering", "listener", "control") is unique per attachment; ``order`` sorts
    subscribers (steering 0 edits before recorders 10 read).
    """

    kind: str
    order: int = 10
    run_start: Callable[[Run], None] | None = None
    run_end: Callable[[Run, BaseException | None], None] | None = None
    denoiser_pre: Callable[[Run, tuple, dict], tuple[tuple, dict] | None] | None = None
    denoiser_post: Callable[[Run, torch.Tensor], torch.Tensor | None] | None = None
    step: Callable[[Step], torch.Tensor | None] | None = None
    attention: AttentionTap | None = None
    control: ControlTap | None = None


@dataclass
class AttentionTap:
    """Attention capture on named layers: ``processors`` maps a processor name to a function
    ``original processor -> capturing processor``; the attachment swaps them in and restores the originals."""

    processors: dict[str, Callable[[Any], Any]]


@dataclass
class AttentionCall:
    """One call of an attention layer a control may edit, as the control sees it."""

    run: Run
    layer: str  # module name, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    cross: bool  # cross-attention (text keys) or self-attention (image keys)
    step: int  # index of the denoiser call in the run (one per step for first-order samplers), from 0
    queries: int  # HW: the layer's query count
    rows: int  # N: rows of the denoiser batch
    cond: slice  # the conditional rows (every row without CFG)
    uncond: bool = False  # a family without a CFG batch (Flux): this is true CFG's negative-prompt call
    probs: bool = True  # some active control reads or edits the probabilities (False: only injections act)
    # the rows whose probabilities some active control reads or edits (every row unless each such control
    # declares fewer): a processor may leave the other rows of ``probs`` zero
    prob_rows: slice = field(default_factory=lambda: slice(None))


@dataclass
class ControlTap:
    """Attention edits on named layers (module names of cross- and self-attention layers).

    ``active(call)`` says whether the control changes this call: where no control does, the layer runs its
    original processor (bitwise the plain output), so a control at zero strength must answer False.
    ``edit(call, probs)`` changes the float32 probabilities ``probs`` (N, heads, HW, T) in place and returns the
    batch rows it changed; the others keep the original output. ``inject(call)`` (joint attention only, SD3 and
    Flux) returns (target row, source row) pairs: the target rows' image-token keys and values are the source
    rows' in this call (Stable Flow's attention injection); None or an empty list injects nothing. ``rows(call)``
    names the batch rows whose probabilities the control reads or edits (None: every row); where every active
    reader names the same rows, a joint layer forms only those (and those a recorder files), the others are zero.
    """

    layers: list[str]
    active: Callable[[AttentionCall], bool]
    edit: Callable[[AttentionCall, torch.Tensor], Any]
    inject: Callable[[AttentionCall], Any] | None = None
    # whether the control reads or edits the probabilities at a call it is active at (None: always); where no
    # active control does, a joint layer skips forming them (an injection alone needs only the kernel)
    probs: Callable[[AttentionCall], bool] | None = None
    # the batch rows whose probabilities the control reads or edits at a call it is active at (None: every row);
    # a processor need not form the others (they are zero in ``probs``)
    rows: Callable[[AttentionCall], slice | None] | None = None


@dataclass
class _Slot:
    """One attention layer the attachment changed: its original processor and who uses it."""

    module: Any
    original: Any
    capture: Any = None  # a recorder's capturing processor
    controls: list[ControlTap] = field(default_factory=list)
    controlled: Any = None  # the ControlledAttnProcessor made for this layer (once)


# ---- the attachment ------------------------------------------------------------------------------------------
class Attachment:
    """All of sdexplore's changes to one pipeline, shared by its subscribers. Use :func:`attach`."""

    def __init__(self, pipe: Any, family: Family) -> None:
        self.pipe = pipe
        self.family = family
        self.denoiser = family.get_denoiser(pipe)
        self.subscribers: list[Subscriber] = []
        self.run: Run | None = None  # the run in progress
        self.runs = 0  # runs started so far
        self._undo: list[tuple[str, Callable[[], None]]] = []  # (what, how to undo it), in the order made
        self._scheduler_undo: list[Callable[[], None]] = []
        self._interrupt_set = False
        self._depth = 0  # nesting of pipeline calls (only depth 1 is a run)
        self._signature: inspect.Signature | None = None
        self._warned_outside = False
        self._slots: dict[str, _Slot] = {}  # module name -> an attention layer whose processor was changed

    # ---- subscribing ---------------------------------------------------------------------------------------
    def check_free(self, kind: str) -> None:
        """Raise :class:`RecorderStateError` if a subscriber of ``kind`` is already attached."""
        if any(s.kind == kind for s in self.subscribers):
            raise RecorderStateError(
                f"A {kind} recorder is already active on this pipeline (already attached by an enclosing `with` "
                "block): leave the first block before entering another (use one sdexplore.observe(...) with all "
                "the options you need)."
            )

    def subscribe(self, sub: Subscriber) -> None:
        """Add a subscriber; refuse a second of the same kind (one steps recorder per pipeline, ...)."""
        self.check_free(sub.kind)
        if self.run is not None:
            raise RecorderStateError("Cannot start recording in the middle of a pipeline call.")
        if sub.attention is not None:
            self._swap_processors(sub)
        if sub.control is not None:
            try:
                self._add_control(sub)
            except BaseException:
                self._undo_tagged(f"processors:{sub.kind}")
                self._undo_tagged(f"controls:{sub.kind}")
                raise
        self.subscribers.append(sub)
        self.subscribers.sort(key=lambda s: s.order)

    def unsubscribe(self, sub: Subscriber) -> None:
        """Remove a subscriber (undoing its processor swap); the last one out detaches everything."""
        if sub in self.subscribers:
            self.subscribers.remove(sub)
        if sub.attention is not None:
            self._undo_tagged(f"processors:{sub.kind}")
        if sub.control is not None:
            self._undo_tagged(f"controls:{sub.kind}")
        if not self.subscribers:
            self.detach()

    # ---- making and undoing changes ------------------------------------------------------------------------
    def _attach(self) -> None:
        pipe, den = self.pipe, self.denoiser
        original = type(pipe)
        pipe.__class__ = _observed_class(original)
        self._undo.append(("class", lambda: setattr(pipe, "__class__", original)))
        pre = den.register_forward_pre_hook(self._denoiser_pre, with_kwargs=True)
        self._undo.append(("pre-hook", pre.remove))
        post = den.register_forward_hook(self._denoiser_post, with_kwargs=True)
        self._undo.append(("hook", post.remove))

    def detach(self) -> None:
        """Undo every change, once, in reverse order (also what the last ``unsubscribe`` does)."""
        try:
            self._unwrap_scheduler()
            while self._undo:
                _, undo = self._undo.pop()
                undo()
            if self._interrupt_set:
                self.pipe._interrupt = False
                self._interrupt_set = False
        finally:
            if _BY_DENOISER.get(id(self.denoiser)) is self:
                del _BY_DENOISER[id(self.denoiser)]
            if _BY_PIPE.get(id(self.pipe)) is self:
                del _BY_PIPE[id(self.pipe)]

    def _undo_tagged(self, tag: str) -> None:
        for i in range(len(self._undo) - 1, -1, -1):
            if self._undo[i][0] == tag:
                self._undo.pop(i)[1]()

    def _slot(self, name: str) -> _Slot:
        module_name = name.removesuffix(".processor")
        slot = self._slots.get(module_name)
        if slot is None:
            module = self.denoiser.get_submodule(module_name)
            slot = self._slots[module_name] = _Slot(module, module.processor)
        return slot

    def _install(self, name: str) -> None:
        """Give a layer the processor its users need: a controlled one while a control edits it (the capture
        inside it), else the capture, else its very own original object; a slot nobody uses is forgotten."""
        slot = self._slots[name]
        if slot.controls:
            if slot.controlled is None:
                from .processor import controlled_processor  # lazily: only controls need it

                slot.controlled = controlled_processor(
                    name,
                    slot.original,
                    self._control_call,
                    self._control_edit,
                    self._control_inject,
                    self._text_tokens,
                )
            slot.controlled.capture = slot.capture
            proc = slot.controlled
        else:
            proc = slot.capture if slot.capture is not None else slot.original
        if slot.module.processor is not proc:
            slot.module.set_processor(proc)
        if slot.capture is None and not slot.controls:
            del self._slots[name]

    def _swap_processors(self, sub: Subscriber) -> None:
        """Give the named attention layers their capturing processors, module by module (the other layers are
        not touched at all); undone by putting the very same original objects back. A layer a control edits
        keeps its controlled processor, which records through the capture."""
        assert sub.attention is not None
        done: list[str] = []
        try:
            for name, make in sub.attention.processors.items():
                slot = self._slot(name)
                slot.capture = make(slot.original)
                done.append(name.removesuffix(".processor"))
                self._install(done[-1])
        finally:

            def undo() -> None:
                for module_name in reversed(done):
                    self._slots[module_name].capture = None
                    self._install(module_name)

            self._undo.append((f"processors:{sub.kind}", undo))

    def _add_control(self, sub: Subscriber) -> None:
        """Put a controlled processor on the layers a control edits (self-attention layers only while such a
        control is subscribed); undone by the same original objects coming back."""
        tap = sub.control
        assert tap is not None
        done: list[str] = []
        try:
            for name in dict.fromkeys(tap.layers):
                slot = self._slot(name)
                slot.controls.append(tap)
                done.append(name.removesuffix(".processor"))
                self._install(done[-1])
        finally:

            def undo() -> None:
                for module_name in reversed(done):
                    self._slots[module_name].controls.remove(tap)
                    self._install(module_name)

            self._undo.append((f"controls:{sub.kind}", undo))

    def _control_call(self, name: str, cross: bool, queries: int, rows: int) -> AttentionCall | None:
        """The call a controlled layer is making, if some control edits it (else None: the original runs)."""
        run = self.run
        if run is None or not run.started:
            return None
        cond = self.family.cfg_rows(rows)[1] if run.cfg and self.family.cfg_batch else slice(None)
        index, uncond = run.calls - 1, False
        if run.cfg and not self.family.cfg_batch:  # Flux's true CFG: the prompt's call, then the negative's
            index, second = divmod(index, 2)
            uncond = second == 1
        call = AttentionCall(run, name, cross, index, queries, rows, cond, uncond)
        active = [tap for tap in self._slots[name].controls if tap.active(call)]
        if not active:
            return None
        readers = [tap for tap in active if tap.probs is None or tap.probs(call)]
        call.probs = bool(readers)
        spans = [None if tap.rows is None else tap.rows(call) for tap in readers]
        if spans and all(span is not None and span == spans[0] for span in spans):
            call.prob_rows = spans[0]  # every reader reads the same rows: the others need not be formed
        return call

    def _text_tokens(self) -> int:
        """Text tokens of the denoiser call in progress (0 outside a run)."""
        return 0 if self.run is None else self.run.text_tokens

    def _control_inject(self, call: AttentionCall) -> list[tuple[int, int]]:
        """Every active control's (target row, source row) image key and value injections for this call."""
        pairs: dict[int, int] = {}
        for tap in self._slots[call.layer].controls:
            if tap.inject is not None and tap.active(call):
                pairs.update((int(t), int(s)) for t, s in tap.inject(call) or ())
        return sorted(pairs.items())

    def _control_edit(self, call: AttentionCall, probs: torch.Tensor) -> list[int]:
        """Every active control edits the probabilities (N, heads, HW, T) in turn; the rows any changed."""
        changed: set[int] = set()
        for tap in self._slots[call.layer].controls:
            if tap.active(call):
                changed.update(int(r) for r in tap.edit(call, probs))
        if changed and call.cross:
            call.run.attention_edited = True  # the recorded maps are no longer one softmax per pixel
        return sorted(changed)

    def _wrap_scheduler(self, sched: Any) -> None:
        had = "step" in vars(sched)
        previous = vars(sched).get("step")
        original = sched.step

        @functools.wraps(original)
        def step(
            model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            result = original(model_output, timestep, sample, *args, **kwargs)
            return self._after_step(model_output, timestep, sample, result)

        sched.step = step

        def undo() -> None:
            if vars(sched).get("step") is step:
                if had:
                    sched.step = previous
                else:
                    del sched.step

        self._scheduler_undo.append(undo)

    def _unwrap_scheduler(self) -> None:
        while self._scheduler_undo:
            self._scheduler_undo.pop()()

    def request_stop(self) -> None:
        """Skip the rest of this run's steps (diffusers' ``pipe._interrupt``); the final latents still decode."""
        self.pipe._interrupt = True
        self._interrupt_set = True

    # ---- the run boundary ----------------------------------------------------------------------------------
    def _call(self, call: Callable[..., Any], pipe: Any, args: tuple, kwargs: dict) -> Any:
        """A pipeline call: the outermost one is a run."""
        if self._depth > 0:  # a pipeline call made inside a run (e.g. from a callback): not observed
            self._depth += 1
            run, self.run = self.run, None
            warned, self._warned_outside = self._warned_outside, True
            try:
                return call(pipe, *args, **kwargs)
            finally:
                self._depth -= 1
                self.run, self._warned_outside = run, warned
        self._depth = 1
        error: BaseException | None = None
        try:
            self._start_run(args, kwargs)
            return call(pipe, *args, **kwargs)
        except BaseException as e:
            error = e
            raise
        finally:
            self._depth = 0
            self._end_run(error)

    def _bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        if self._signature is None:  # worked out once per pipeline class, not per attachment
            self._signature = signature_of(self.pipe.__class__.__mro__[1].__call__)
        try:
            return dict(self._signature.bind_partial(self.pipe, *args, **kwargs).arguments)
        except TypeError:
            return dict(kwargs)

    def _start_run(self, args: tuple, kwargs: dict) -> None:
        arguments = self._bind(args, kwargs)
        arguments.pop("self", None)
        mask = check_inpaint_inputs(
            arguments, self.pipe
        )  # a mask, strength or size that cannot run fails first
        sched = self.pipe.scheduler
        self.run = Run(index=self.runs, arguments=arguments, scheduler=sched, mask=mask)
        self.runs += 1
        if any(sub.step is not None for sub in self.subscribers):  # attention alone never needs the scheduler
            self._wrap_scheduler(sched)
        for sub in self.subscribers:
            if sub.run_start is not None:
                sub.run_start(self.run)

    def _end_run(self, error: BaseException | None) -> None:
        run, self.run = self.run, None
        try:
            self._unwrap_scheduler()
        finally:
            if run is not None:
                first: BaseException | None = None
                for sub in self.subscribers:
                    if sub.run_end is None:
                        continue
                    try:
                        sub.run_end(run, error)
                    except Exception as e:  # every subscriber closes its run; the first failure is raised
                        first = first or e
                if first is not None and error is None:
                    raise first

    def _fill_schedule(self, run: Run, sample: torch.Tensor, args: tuple, kwargs: dict) -> None:
        """At the first denoiser call of a run: read the schedule (and a packed family's latent grid) to the host
        once (the run's only syncs)."""
        run.started = True
        pipe, sched = self.pipe, run.scheduler
        ts = getattr(sched, "timesteps", None)
        run.timesteps = [] if ts is None else torch.as_tensor(ts).detach().float().cpu().tolist()
        run.num_steps = int(getattr(pipe, "_num_timesteps", 0) or 0) or len(run.timesteps)
        run.schedule_begin = max(
            len(run.timesteps) - run.num_steps, 0
        )  # img2img loops over the schedule's tail
        run.prediction_type = prediction_type(sched)
        run.flow = is_flow_matching(sched)
        run.train_timesteps = int(getattr(sched.config, "num_train_timesteps", 1000) or 1000)
        run.ve_latents = not run.flow and float(getattr(sched, "init_noise_sigma", 1.0)) > 1.0
        if uses_sigmas(sched):
            run.sigmas = torch.as_tensor(sched.sigmas).detach().float().cpu().tolist()
        acp = getattr(sched, "alphas_cumprod", None)
        if acp is not None:
            run.alphas_cumprod = torch.as_tensor(acp).detach().double().cpu().tolist()
        fam = self.family
        if fam.latent_packing > 1:
            run.latent_grid = fam.latent_grid(sample, args, kwargs)
        run.guidance_scale = fam.guidance_scale_of(pipe, run.arguments)
        if fam.cfg_batch:
            # PixArt-Σ decides CFG in a local variable: Family.batch_cfg reads the call's guidance_scale there
            run.cfg = fam.batch_cfg(pipe, run.arguments) and sample.shape[0] % 2 == 0
            return
        # Flux: "true CFG" is two calls per step at true_cfg_scale; guidance_scale is the distilled guidance
        # (dev: a denoiser input), which schnell ignores (its step scale is then 1, as without CFG). Flux.2 [klein]:
        # two calls per step at guidance_scale itself, where the pipeline says so (do_classifier_free_guidance)
        run.cfg = fam.true_cfg(run.arguments, pipe)
        run.distilled = fam.denoiser_args.get("guidance", args, kwargs) is not None
        if run.cfg:
            if fam.cfg_flag is None:
                run.guidance_scale = fam.true_cfg_scale(pipe, run.arguments)  # Qwen-Image's default is 4
        elif not run.distilled:
            run.guidance_scale = 1.0

    # ---- hooks ---------------------------------------------------------------------------------------------
    def _outside(self) -> bool:
        if self.run is not None:
            return False
        if not self._warned_outside:
            self._warned_outside = True
            warnings.warn(
                "The observed denoiser ran outside a call of the observed pipeline object (another pipeline "
                "sharing its components?): such calls are not recorded. Observe the pipeline you call.",
                stacklevel=3,
            )
        return True

    def _denoiser_pre(self, module: Any, args: tuple, kwargs: dict) -> Any:
        if self._outside():
            return None
        run = self.run
        assert run is not None
        sample = self.family.denoiser_args.get("sample", args, kwargs)
        if not run.started:
            self._fill_schedule(run, sample, args, kwargs)
        changed = False
        for sub in self.subscribers:
            if sub.denoiser_pre is not None:
                new = sub.denoiser_pre(run, args, kwargs)
                if new is not None:
                    args, kwargs = new
                    changed = True
        run.denoiser_in = sample
        context = self.family.denoiser_args.get("text", args, kwargs)
        run.text_tokens = 0 if context is None else int(context.shape[1])
        run.calls += 1
        run.step_calls += 1
        return (args, kwargs) if changed else None

    def _denoiser_post(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        run = self.run
        if run is None:
            return None
        is_tuple = isinstance(output, tuple)
        out = output[0] if is_tuple else output.sample  # (2B|B, C, h, w); Flux: (B, h/2 · w/2, 64)
        run.denoiser_out = self.family.prediction(out)  # PixArt: the ε half of its (ε ‖ variance) output
        if not self.family.cfg_batch:
            run.call_outputs.append(out)
        new = out
        for sub in self.subscribers:
            if sub.denoiser_post is not None:
                edited = sub.denoiser_post(run, new)
                if edited is not None:
                    new = edited
        if new is out:
            return None
        return (new, *output[1:]) if is_tuple else type(output)(sample=new)

    def _after_step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, result: Any
    ) -> Any:
        run = self.run
        if run is None or not run.started:
            return result
        is_tuple = isinstance(result, tuple)
        packed_prev = result[0] if is_tuple else result.prev_sample  # (B, C, h, w); Flux: (B, h/2 · w/2, 64)
        if is_tuple:
            pred_x0 = result[1] if len(result) > 1 else None
        else:
            pred_x0 = getattr(result, "pred_original_sample", None)
        fam = self.family
        outs, run.call_outputs = run.call_outputs, []
        if (
            run.cfg and not fam.cfg_batch and len(outs) == 2
        ):  # true CFG: the prompt's call, then the negative's
            run.denoiser_out = fam.join_cfg(
                outs[1], outs[0]
            )  # (2B, ...) in the family's (uncond, cond) layout
        prev = packed_prev
        if run.latent_grid is not None:  # packed tokens → (B, C, h, w) latents for every subscriber
            grid = run.latent_grid
            packed_out = model_output
            model_output, sample, prev, pred_x0 = _unpack_together(
                fam, grid, model_output, sample, prev, pred_x0
            )
            if run.denoiser_out is packed_out:  # no CFG: the scheduler stepped with the raw output itself
                run.denoiser_out = model_output
            elif run.denoiser_out is not None:
                run.denoiser_out = fam.unpack_latents(run.denoiser_out, grid)
        i = run.steps_done
        t = run.timestep(i, timestep)
        sched = run.scheduler
        idx = getattr(sched, "step_index", None) if run.sigmas is not None else None
        step = Step(
            run=run,
            index=i,
            timestep=t,
            model_output=model_output,
            sample=sample,
            prev_sample=prev,
            pred_original_sample=pred_x0,
            level=run.level(t, None if idx is None else idx - 1),
            last=i == run.num_steps - 1,
            guidance_scale=(run.guidance_scale if run.step_guidance is None else run.step_guidance)
            if run.cfg or run.distilled
            else 1.0,
        )
        for sub in self.subscribers:
            if sub.step is not None:
                new = sub.step(step)
                if new is not None:
                    if not isinstance(new, torch.Tensor) or new.shape != prev.shape:
                        raise InvalidArgumentError(
                            f"A step edit must return a tensor of shape {tuple(prev.shape)} (the latents it was given)."
                        )
                    step.prev_sample = new
        run.steps_done += 1
        run.step_calls = 0
        run.denoiser_in = run.denoiser_out = run.step_guidance = None
        if step.prev_sample is prev:
            return result
        new = step.prev_sample
        if run.latent_grid is not None:
            new = fam.pack_latents(new)  # (B, h/2 · w/2, 64): what the pipeline's loop continues from
        if is_tuple:
            return (new, *result[1:])
        result.prev_sample = new
        return result


def _unpack_together(
    fam: Family, grid: tuple[int, int], *tokens: torch.Tensor | None
) -> tuple[torch.Tensor | None, ...]:
    """Packed tokens (B, h/p · w/p, C·p²) as latents (B, C, h, w), each its own rows of one unpacked block where
    they share shape, dtype and device (one copy in place of one per tensor: the same values); None stays None."""
    present = [t for t in tokens if t is not None]
    first = present[0]
    if len(present) > 1 and all(
        t.shape == first.shape and t.dtype == first.dtype and t.device == first.device for t in present
    ):
        block = fam.unpack_latents(torch.cat(present), grid)  # (k·B, C, h, w)
        parts = iter(block.split(first.shape[0]))  # k × (B, C, h, w), each contiguous
        return tuple(None if t is None else next(parts) for t in tokens)
    return tuple(None if t is None else fam.unpack_latents(t, grid) for t in tokens)


def _observed_class(cls: type) -> type:
    """A subclass of ``cls`` whose ``__call__`` hands top-level calls to the instance's attachment (made once)."""
    sub = _OBSERVED_CLASSES.get(cls)
    if sub is not None:
        return sub
    base_call = cls.__call__

    @functools.wraps(base_call)
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        att = _BY_PIPE.get(id(self))
        if att is None:
            return base_call(self, *args, **kwargs)
        return att._call(base_call, self, args, kwargs)

    sub = type(
        cls.__name__,
        (cls,),
        {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__},
    )
    _OBSERVED_CLASSES[cls] = sub
    return sub


class attach:  # noqa: N801 - used like a function: `with attach(pipe, sub) as att:`
    """Context manager: subscribe ``sub`` to ``pipe``'s attachment, creating it (and making every change) if
    needed; on exit unsubscribe, and the last subscriber out restores the pipeline exactly."""

    def __init__(self, pipe: Any, sub: Subscriber, family: Family | None = None) -> None:
        self.pipe = pipe
        self.sub = sub
        self.family = family or detect_family(pipe)
        self.attachment: Attachment | None = None

    def __enter__(self) -> Attachment:
        att = _BY_PIPE.get(id(self.pipe))
        created = att is None
        if created:
            check_attachable(self.pipe, self.family)
            den = self.family.get_denoiser(self.pipe)
            att = Attachment(self.pipe, self.family)
            _BY_PIPE[id(self.pipe)] = att
            _BY_DENOISER[id(den)] = att
        assert att is not None
        try:
            if created:
                att._attach()
            att.subscribe(self.sub)
        except BaseException:
            if created:
                att.detach()
            raise
        self.attachment = att
        return att

    def __exit__(self, *exc: Any) -> None:
        if self.attachment is not None:
            att, self.attachment = self.attachment, None
            att.unsubscribe(self.sub)


def check_attachable(pipe: Any, family: Family) -> None:
    """Raise :class:`RecorderStateError` if ``pipe``'s denoiser is observed through another pipeline object."""
    other = _BY_DENOISER.get(id(family.get_denoiser(pipe)))
    if other is not None and other.pipe is not pipe:
        raise RecorderStateError(
            f"A recorder is already active on this pipeline's {family.denoiser}, through another pipeline object "
            f"({type(other.pipe).__name__}) built from the same components. Leave that `with` block first: one "
            "pipeline object per denoiser can be observed at a time."
        )


def attachment_of(pipe: Any) -> Attachment | None:
    """The pipeline's attachment while something observes it, else None."""
    return _BY_PIPE.get(id(pipe))


@contextlib.contextmanager
def module_hooks(
    pipe: Any,
    *,
    pre: dict[str, Callable[..., Any]] | None = None,
    post: dict[str, Callable[..., Any]] | None = None,
) -> Iterator[None]:
    """Forward pre-hooks (``pre``) and forward hooks (``post``) on modules of ``pipe`` for the ``with`` block.

    Besides the subscribers' taps, this is the one way sdexplore hooks a module (a block bypassed to find vital
    layers, a text encoder's attention mask for causal ablation). Keys are module paths from the pipeline, its
    component then the path inside it: ``"transformer.transformer_blocks.0"``, ``"text_encoder"``. Hooks are
    registered with ``with_kwargs=True`` (``pre``: ``fn(module, args, kwargs) -> (args, kwargs) | None``; ``post``:
    ``fn(module, args, kwargs, output) -> output | None``). Every path is resolved before any hook is placed, and
    every hook is removed on exit, also after an exception or KeyboardInterrupt.
    """

    def module(path: str) -> torch.nn.Module:
        component, _, inner = path.partition(".")
        found = getattr(pipe, component, None)
        if not isinstance(found, torch.nn.Module):
            raise InvalidArgumentError(f"{path!r}: the pipeline has no module {component!r}.")
        try:
            return found.get_submodule(inner) if inner else found
        except AttributeError as e:
            raise InvalidArgumentError(f"{path!r}: {component} has no submodule {inner!r}.") from e

    targets = [(module(p), fn, True) for p, fn in (pre or {}).items()]
    targets += [(module(p), fn, False) for p, fn in (post or {}).items()]
    handles = []
    try:
        for mod, fn, before in targets:
            register = mod.register_forward_pre_hook if before else mod.register_forward_hook
            handles.append(register(fn, with_kwargs=True))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()
