"""StepRecorder: record (and steer) every denoising step of a user's own, unchanged diffusers call.

Mechanism (public extension points only, all removed on exit):

- a forward pre-hook and a forward hook on ``pipe.unet`` see the UNet input (the scaled latents), the text
  conditioning, and the raw output — the CFG batch with the unconditional half first;
- the scheduler *instance*'s ``step`` and ``set_timesteps`` are wrapped (never the class): ``step`` sees the
  guided model output, the timestep, the latents in and ``prev_sample`` / ``pred_original_sample`` out;
  ``set_timesteps`` marks the start of a new run.

One *step* is one ``scheduler.step`` call, i.e. one iteration of the pipeline's loop: for second-order
schedulers (Heun, KDPM2) that is one model evaluation, so a run has ``len(pipe.scheduler.timesteps)`` steps.
PNDM's warm-up evaluations are steps too. If the UNet runs more than once before a step, the last call wins.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .errors import RecorderStateError, UnsupportedPipelineError
from .families import detect_family, latent_rgb
from .decoding import decode_with
from .preview import latent_to_rgb, to_uint8
from .schedule_math import (
    NoiseLevel,
    noise_level,
    prediction_type,
    uses_sigmas,
    vp_model_input,
    x0_from_prediction,
)
from .steering import (
    GuidanceSchedule,
    LatentEdit,
    PromptSwitch,
    check_guidance_schedule,
    encode_switch,
    guidance_at,
    replace_conditional,
    rescale_conditional,
)
from .trace import TENSOR_FIELDS, StepRecord, Trace

#: Quantities recorded by default: everything but ``latents_out`` (= the next step's ``latents``) and ``decoded``.
DEFAULT_QUANTITIES: tuple[str, ...] = (
    "latents",
    "noise_uncond",
    "noise_cond",
    "noise_pred",
    "x0",
    "preview",
    "noise_norm",
)
#: Default memory bound of one run's trace (bytes); a run that would exceed it raises before its first step.
DEFAULT_MAX_BYTES = 1 << 30
_LATENT_SHAPED = ("latents", "latents_out", "noise_uncond", "noise_cond", "noise_pred", "x0")

_ACTIVE: dict[
    int, StepRecorder
] = {}  # keyed by id(pipe.unet): pipelines built from shared components share it

StepListener = Callable[[StepRecord, Trace], None]


def _validate_quantities(quantities: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(quantities, str):
        if quantities == "all":
            return tuple(q for q in TENSOR_FIELDS if q != "decoded")
        quantities = (quantities,)
    qs = tuple(quantities)
    bad = [q for q in qs if q not in TENSOR_FIELDS]
    if bad:
        raise ValueError(f"Unknown quantity {bad[0]!r}; choose from {', '.join(TENSOR_FIELDS)} (or 'all').")
    return qs


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int ≥ 1, got {value!r}.")


class StepRecorder:
    """Context manager that records every denoising step of the pipeline calls made inside it.

    >>> with StepRecorder(pipe) as rec:
    ...     image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    >>> rec.trace[10].x0, rec.trace[-1].preview

    Args:
        pipe: a StableDiffusion(XL) pipeline (see :mod:`sdexplore.families`).
        quantities: tensor quantities to keep (see :data:`sdexplore.trace.TENSOR_FIELDS`), or "all".
        every: keep one step in ``every`` (the last step is always kept).
        dtype: storage dtype of latent-shaped tensors (default float16: half the memory, ~1e-3 relative).
        device: where records are stored (default "cpu"). On CUDA, without ``on_step``, records are staged on
            the GPU and moved in one go when the run ends, so no step waits for a transfer.
        max_bytes: memory bound of one run's trace. The recorder estimates the run's footprint from the latent
            shape × steps × quantities before its first step and raises if it would exceed this.
        preview_of: "x0" (default: the predicted clean image) or "latents" (the noisy latents entering a step).
        tiny_vae: an ``AutoencoderTiny`` to decode x0 into ``decoded`` every ``decode_every`` steps.
        decode_every: decode x0 every k-th recorded step (with ``tiny_vae``, else the pipeline's full VAE).
        on_step: listener ``(record, trace) -> None`` called after each recorded step (live views).
        edit_latents, switch_prompt, guidance, stop_at, stop_returns: steering, see :mod:`sdexplore.steering`.
    """

    def __init__(
        self,
        pipe: Any,
        *,
        quantities: Iterable[str] | str = DEFAULT_QUANTITIES,
        every: int = 1,
        dtype: torch.dtype = torch.float16,
        device: str | torch.device = "cpu",
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        preview_of: str = "x0",
        tiny_vae: Any = None,
        decode_every: int | None = None,
        on_step: StepListener | None = None,
        edit_latents: LatentEdit | None = None,
        switch_prompt: PromptSwitch | None = None,
        guidance: GuidanceSchedule | None = None,
        stop_at: int | None = None,
        stop_returns: str = "latents",
    ) -> None:
        self.family = detect_family(pipe)
        if getattr(pipe, "unet", None) is None or getattr(pipe, "scheduler", None) is None:
            raise UnsupportedPipelineError(
                f"{type(pipe).__name__} has no unet/scheduler: StepRecorder observes UNet-based SD pipelines."
            )
        self.pipe = pipe
        self.quantities = _validate_quantities(quantities)
        _positive_int("every", every)
        _positive_int("decode_every", decode_every, allow_none=True)
        if stop_at is not None:
            _positive_int("stop_at", stop_at)
        if preview_of not in ("x0", "latents"):
            raise ValueError(f"preview_of must be 'x0' or 'latents', got {preview_of!r}.")
        if stop_returns not in ("latents", "x0"):
            raise ValueError(f"stop_returns must be 'latents' or 'x0', got {stop_returns!r}.")
        if edit_latents is not None and not callable(edit_latents):
            raise ValueError("edit_latents must be a function (step, latents) -> latents.")
        if switch_prompt is not None and not isinstance(switch_prompt, PromptSwitch):
            raise ValueError(
                "switch_prompt must be a sdexplore.steering.PromptSwitch(at_step=..., prompt=...)."
            )
        if max_bytes is not None and max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive (or None for no bound), got {max_bytes!r}.")
        if tiny_vae is not None and decode_every is None:
            decode_every = 1
        if decode_every is not None and "decoded" not in self.quantities:
            self.quantities = (*self.quantities, "decoded")
        if "decoded" in self.quantities and decode_every is None:
            raise ValueError(
                "'decoded' needs a decoder: pass tiny_vae=AutoencoderTiny(...) or decode_every=k."
            )
        self.every = every
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_bytes = max_bytes
        self.preview_of = preview_of
        self.tiny_vae = tiny_vae
        self.decode_every = decode_every
        self.on_step = on_step
        self.edit_latents = edit_latents
        self.switch_prompt = switch_prompt
        self.guidance = guidance
        self.stop_at = stop_at
        self.stop_returns = stop_returns
        self.traces: list[Trace] = []
        self._entered = False
        self._handles: list[Any] = []
        self._wrapped: dict[str, Any] = {}
        self._scheduler: Any = None
        self._set_interrupt = False
        self._reset_run_state()
        self._factors, self._bias = latent_rgb(pipe)
        # kept in each trace, so a saved trace previews with the factors it was recorded with
        self._rgb_meta = {"factors": self._factors.tolist(), "bias": self._bias.tolist()}

    # ---- public results ------------------------------------------------------------------------------------
    @property
    def trace(self) -> Trace:
        """The trace of the latest pipeline call (live while it runs)."""
        if not self.traces:
            raise RecorderStateError(
                "No pipeline call was recorded: call the pipeline inside the `with StepRecorder(pipe)` block."
            )
        return self.traces[-1]

    def estimate_bytes(self, latent_shape: tuple[int, ...], num_steps: int) -> int:
        """Upper bound of the bytes one run's trace holds, for latents of ``latent_shape`` (B, C, h, w)."""
        b, _, h, w = latent_shape
        numel = math.prod(latent_shape)
        per_step = 0
        el = torch.empty((), dtype=self.dtype).element_size()
        per_step += sum(numel * el for q in _LATENT_SHAPED if q in self.quantities)
        if "preview" in self.quantities:
            per_step += b * h * w * 3
        if "noise_norm" in self.quantities:
            per_step += b * 4
        kept = math.ceil(num_steps / self.every) + 1
        total = per_step * kept + numel * el  # + final_latents
        if "decoded" in self.quantities and self.decode_every:
            scale = 8  # every SD VAE (and TAESD) upsamples latents 8×
            total += (math.ceil(kept / self.decode_every) + 1) * b * (h * scale) * (w * scale) * 3
        return total

    # ---- context manager ----------------------------------------------------------------------------------
    def __enter__(self) -> StepRecorder:
        key = id(self.pipe.unet)
        if self._entered or key in _ACTIVE:
            raise RecorderStateError(
                "A StepRecorder is already active on this pipeline: leave the first `with` block before entering "
                "another (use one sdexplore.observe(...) with all the options you need)."
            )
        _ACTIVE[key] = self
        self._entered = True
        try:
            self._attach()
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._detach()

    def _attach(self) -> None:
        unet = self.pipe.unet
        sched = self.pipe.scheduler
        self._scheduler = sched
        self._handles.append(unet.register_forward_pre_hook(self._unet_pre_hook, with_kwargs=True))
        self._handles.append(unet.register_forward_hook(self._unet_hook, with_kwargs=True))
        for name, make in (("step", self._make_step), ("set_timesteps", self._make_set_timesteps)):
            self._wrapped[name] = vars(sched).get(name, _MISSING)
            setattr(sched, name, make(getattr(sched, name)))

    def _detach(self) -> None:
        try:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            sched = self._scheduler
            for name, prev in self._wrapped.items():
                if prev is _MISSING:
                    vars(sched).pop(name, None)
                else:
                    setattr(sched, name, prev)
            self._wrapped.clear()
            if self._set_interrupt:
                self.pipe._interrupt = False
                self._set_interrupt = False
            self._finish_run()
        finally:
            if _ACTIVE.get(id(self.pipe.unet)) is self:
                _ACTIVE.pop(id(self.pipe.unet))
            self._entered = False

    # ---- run bookkeeping ----------------------------------------------------------------------------------
    def _reset_run_state(self) -> None:
        self._step = 0  # steps completed in the current run
        self._unet_in: torch.Tensor | None = None  # (2B|B, C, h, w) last UNet input
        self._unet_out: torch.Tensor | None = None  # (2B|B, C, h, w) last UNet output (before guidance edits)
        self._checked = False
        self._ts_cpu: torch.Tensor | None = None
        self._ts_begin = 0
        self._switch_cache: tuple[Any, Any] | None = None
        self._staged = False

    def _new_run(self) -> Trace:
        self._finish_run()
        self._reset_run_state()
        sched = self._scheduler
        trace = Trace(
            family=self.family.name,
            scheduler=type(sched).__name__,
            prediction_type=prediction_type(sched),
            num_steps=0 if getattr(sched, "timesteps", None) is None else len(sched.timesteps),
            every=self.every,
            guidance_scale=float(getattr(self.pipe, "_guidance_scale", 1.0)),
        )
        # Euler-type schedulers keep latents in variance-exploding form (x0 + σ ε): previews scale them by sqrt(ᾱ)
        trace.meta["ve_latents"] = float(getattr(sched, "init_noise_sigma", 1.0)) > 1.0
        trace.meta["latent_rgb"] = copy.deepcopy(self._rgb_meta)  # each trace its own, free to edit
        self.traces.append(trace)
        return trace

    def _finish_run(self) -> None:
        if self._staged and self.traces:
            self.traces[-1].to(self.device)
        self._staged = False

    def _store(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dev = self._stage_device(t)
        return t.detach().to(device=dev, dtype=dtype or self.dtype, copy=True)

    def _stage_device(self, t: torch.Tensor) -> torch.device:
        if t.device.type == "cuda" and self.device.type == "cpu" and self.on_step is None:
            self._staged = True
            return t.device
        return self.device

    def _preview_factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # cached per device: a host → GPU copy every step would wait for the GPU each time
        if self._factors.device != device:
            self._factors, self._bias = self._factors.to(device), self._bias.to(device)
        return self._factors, self._bias

    def _cfg(self) -> bool:
        return bool(getattr(self.pipe, "do_classifier_free_guidance", False))

    def _check_run(self, sample: torch.Tensor) -> None:
        """Before the first UNet call of a run: validate steering against the run and the memory bound."""
        self._checked = True
        trace = self.trace
        # the pipeline's own loop length (img2img runs only the last `strength` part of the schedule)
        n = (
            int(getattr(self.pipe, "_num_timesteps", 0) or 0)
            or trace.num_steps
            or len(self._scheduler.timesteps)
        )
        trace.num_steps = n
        ts = getattr(self._scheduler, "timesteps", None)
        self._ts_cpu = None if ts is None else torch.as_tensor(ts).detach().float().cpu()  # one sync per run
        self._ts_begin = 0 if ts is None else len(ts) - n  # img2img loops over the tail of the schedule
        trace.guidance_scale = float(getattr(self.pipe, "_guidance_scale", trace.guidance_scale))
        b = sample.shape[0] // 2 if self._cfg() else sample.shape[0]
        shape = (b, *sample.shape[1:])
        if self.stop_at is not None and self.stop_at > n:
            raise ValueError(f"stop_at={self.stop_at} is beyond this run's {n} steps; choose 1..{n}.")
        if self.switch_prompt is not None and self.switch_prompt.at_step >= n:
            raise ValueError(
                f"PromptSwitch.at_step={self.switch_prompt.at_step} is beyond this run's {n} steps."
            )
        if self.guidance is not None:
            if not self._cfg():
                raise ValueError(
                    "A guidance schedule needs classifier-free guidance: call the pipeline with guidance_scale > 1."
                )
            check_guidance_schedule(self.guidance, n)
        if self.max_bytes is not None:
            est = self.estimate_bytes(shape, n)
            if est > self.max_bytes:
                raise ValueError(
                    f"Recording this run would need about {est / 2**20:.1f} MiB (latents {tuple(shape)} × {n} steps × "
                    f"{len(self.quantities)} quantities {self.quantities}, every={self.every}, {self.dtype}), over "
                    f"max_bytes={self.max_bytes / 2**20:.1f} MiB. Record fewer quantities, pass every=k, "
                    "dtype=torch.float16, or raise max_bytes."
                )
        trace.meta.update(latent_shape=list(shape), estimated_bytes=self.estimate_bytes(shape, n))

    # ---- UNet hooks -----------------------------------------------------------------------------------------
    def _unet_pre_hook(self, module: Any, args: tuple, kwargs: dict) -> Any:
        if not self.traces:
            self._new_run()
        sample = args[0] if args else kwargs["sample"]
        if not self._checked:
            self._check_run(sample)
        sw = self.switch_prompt
        if sw is None or self._step < sw.at_step:
            return None
        cfg = self._cfg()
        in_kwargs = "encoder_hidden_states" in kwargs
        ehs = kwargs["encoder_hidden_states"] if in_kwargs else args[2]
        if self._switch_cache is None:
            self._switch_cache = encode_switch(self.pipe, sw, ehs.device, ehs.dtype)
        embeds, pooled = self._switch_cache
        new_ehs = replace_conditional(ehs, embeds, cfg)
        kwargs = dict(kwargs)
        if in_kwargs:
            kwargs["encoder_hidden_states"] = new_ehs
        else:
            args = (*args[:2], new_ehs, *args[3:])
        added = kwargs.get("added_cond_kwargs")
        if pooled is not None and added and "text_embeds" in added:
            kwargs["added_cond_kwargs"] = {
                **added,
                "text_embeds": replace_conditional(added["text_embeds"], pooled, cfg),
            }
        return args, kwargs

    def _unet_hook(self, module: Any, args: tuple, kwargs: dict, output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output.sample  # (2B|B, C, h, w)
        self._unet_in = args[0] if args else kwargs["sample"]
        self._unet_out = out
        if self.guidance is None or not self._cfg():
            return None
        base = float(self.pipe._guidance_scale)
        target = guidance_at(self.guidance, self._step, self.trace.num_steps)
        u, c = out.chunk(2)  # (B, C, h, w) each, uncond first
        new = torch.cat([u, rescale_conditional(u, c, base, target)])
        if isinstance(output, tuple):
            return (new, *output[1:])
        return type(output)(sample=new)

    # ---- scheduler wrappers ---------------------------------------------------------------------------------
    def _make_set_timesteps(self, orig: Callable) -> Callable:
        @functools.wraps(orig)
        def set_timesteps(*args: Any, **kwargs: Any) -> Any:
            result = orig(*args, **kwargs)
            self._new_run()
            return result

        return set_timesteps

    def _make_step(self, orig: Callable) -> Callable:
        @functools.wraps(orig)
        def step(
            model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            result = orig(model_output, timestep, sample, *args, **kwargs)
            return self._after_step(model_output, timestep, sample, result)

        return step

    def _after_step(
        self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, result: Any
    ) -> Any:
        if not self.traces:
            self._new_run()
        trace = self.trace
        i = self._step
        n = trace.num_steps
        is_tuple = isinstance(result, tuple)
        prev = result[0] if is_tuple else result.prev_sample  # (B, C, h, w)
        pred_x0 = (
            (result[1] if len(result) > 1 else None)
            if is_tuple
            else getattr(result, "pred_original_sample", None)
        )
        last = i == n - 1 or (self.stop_at is not None and i + 1 == self.stop_at)
        keep = i % self.every == 0 or last
        qs = self.quantities if keep else ()
        need_x0 = bool({"x0", "decoded"} & set(qs)) or ("preview" in qs and self.preview_of == "x0")
        need_x0 = need_x0 or (
            self.stop_returns == "x0" and self.stop_at is not None and i + 1 == self.stop_at
        )
        t = self._timestep_value(timestep, i)
        level = self._level(t)
        x0, x0_source = None, "none"
        if need_x0:
            if pred_x0 is not None:
                x0, x0_source = pred_x0, "scheduler"
            else:
                x0, x0_source = self._compute_x0(model_output, sample, level), "computed"

        new_prev = prev
        if self.edit_latents is not None:
            new_prev = self.edit_latents(i, prev)
            if not isinstance(new_prev, torch.Tensor) or new_prev.shape != prev.shape:
                raise ValueError(
                    f"edit_latents must return a tensor of shape {tuple(prev.shape)} (the latents it was given)."
                )
        if self.stop_at is not None and i + 1 == self.stop_at:
            if self.stop_returns == "x0":
                new_prev = x0.to(prev.dtype)
            self.pipe._interrupt = True
            self._set_interrupt = True
            trace.stopped_at = i
        if new_prev is not prev:
            if is_tuple:
                result = (new_prev, *result[1:])
            else:
                result.prev_sample = new_prev

        if keep:
            rec = self._record(i, t, level, model_output, sample, new_prev, x0, x0_source, qs)
            trace.steps.append(rec)
            if self.on_step is not None:
                self.on_step(rec, trace)
        if last:
            trace.final_latents = self._store(new_prev)
        self._step += 1
        self._unet_in = self._unet_out = None
        if last:
            self._finish_run()
        return result

    def _timestep_value(self, timestep: Any, i: int) -> float:
        """The step's timestep as a float, read from a CPU copy of the schedule when ``timestep`` lives on an
        accelerator (``float()`` on a CUDA tensor would make every step wait for the GPU)."""
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu" and self._ts_cpu is not None:
            j = self._ts_begin + i
            if 0 <= j < len(self._ts_cpu):
                return float(self._ts_cpu[j])
        return float(timestep)

    def _level(self, timestep: float) -> NoiseLevel:
        sched = self._scheduler
        idx = getattr(sched, "step_index", None) if uses_sigmas(sched) else None
        return noise_level(sched, timestep, None if idx is None else idx - 1)

    def _compute_x0(
        self, model_output: torch.Tensor, sample: torch.Tensor, level: NoiseLevel
    ) -> torch.Tensor:
        b = sample.shape[0]
        unet_in = self._unet_in
        if unet_in is not None and unet_in.shape[0] in (b, 2 * b) and unet_in.shape[1:] == sample.shape[1:]:
            vp = unet_in[:b]  # (B, C, h, w): both CFG halves see the same input
        else:
            vp = vp_model_input(sample, level, self._scheduler)
        return x0_from_prediction(
            model_output, vp.to(model_output.dtype), level.alpha_bar, prediction_type(self._scheduler)
        )

    def _record(
        self,
        i: int,
        timestep: Any,
        level: NoiseLevel,
        model_output: torch.Tensor,
        sample: torch.Tensor,
        latents_out: torch.Tensor,
        x0: torch.Tensor | None,
        x0_source: str,
        qs: tuple[str, ...],
    ) -> StepRecord:
        b = sample.shape[0]
        g = float(getattr(self.pipe, "_guidance_scale", 1.0))
        cfg = self._cfg()
        if self.guidance is not None and cfg:
            g = guidance_at(self.guidance, i, self.trace.num_steps)
        rec = StepRecord(
            index=i,
            timestep=timestep,
            sigma=level.sigma,
            alpha_bar=level.alpha_bar,
            guidance_scale=g if cfg else 1.0,
            x0_source=x0_source,
        )
        out = self._unet_out
        if "latents" in qs:
            rec.latents = self._store(sample)
        if "latents_out" in qs:
            rec.latents_out = self._store(latents_out)
        if "noise_pred" in qs:
            rec.noise_pred = self._store(model_output)
        if out is not None and out.shape[0] == 2 * b:
            if "noise_uncond" in qs:
                rec.noise_uncond = self._store(out[:b])
            if "noise_cond" in qs:
                rec.noise_cond = self._store(out[b:])
        elif out is not None and "noise_cond" in qs:
            rec.noise_cond = self._store(out)
        if "x0" in qs and x0 is not None:
            rec.x0 = self._store(x0)
        if "noise_norm" in qs:
            rec.noise_norm = self._store(
                model_output.float().pow(2).mean(dim=(1, 2, 3)).sqrt(), torch.float32
            )
        if "preview" in qs:
            src = x0 if self.preview_of == "x0" else sample
            if self.preview_of == "latents" and self.trace.meta.get("ve_latents"):
                src = sample * math.sqrt(
                    level.alpha_bar
                )  # VE → VP form, the scale the preview factors expect
            factors, bias = self._preview_factors(src.device)
            rgb = to_uint8(latent_to_rgb(src.float(), factors, bias))  # (B, h, w, 3)
            rec.preview = self._store(rgb, torch.uint8)
        if (
            "decoded" in qs
            and self.decode_every
            and x0 is not None
            and (len(self.trace.steps) % self.decode_every == 0)
        ):
            vae = self.tiny_vae if self.tiny_vae is not None else self.pipe.vae
            rec.decoded = self._store(decode_with(vae, x0), torch.uint8)
        return rec


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def steer(pipe: Any, **steering: Any) -> StepRecorder:
    """Steer the pipeline calls inside a ``with`` block without recording tensors.

    Takes the steering options of :class:`StepRecorder` (``edit_latents``, ``switch_prompt``, ``guidance``,
    ``stop_at``, ``stop_returns``); see :mod:`sdexplore.steering`. Step scalars are still kept in ``.trace``.
    """
    allowed = {"edit_latents", "switch_prompt", "guidance", "stop_at", "stop_returns", "on_step"}
    bad = sorted(set(steering) - allowed)
    if bad:
        raise TypeError(f"steer() got unexpected option(s) {bad}; allowed: {sorted(allowed)}.")
    return StepRecorder(pipe, quantities=(), **steering)
