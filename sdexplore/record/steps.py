"""StepRecorder: record every denoising step of a user's own, unchanged diffusers call.

The recorder patches nothing: it subscribes to the pipeline's attachment (:mod:`sdexplore.record.attach`), which
hands it each scheduler step (latents in and out, the guided prediction, x0) and the raw denoiser output (the CFG
batch). Steering options given to it are applied by a separate :class:`~sdexplore.record.steering.Steering`
subscriber of the same attachment.

One *step* is one ``scheduler.step`` call, i.e. one iteration of the pipeline's loop: for second-order schedulers
(Heun, KDPM2) that is one model evaluation, so a run has ``len(pipe.scheduler.timesteps)`` steps. PNDM's warm-up
evaluations are steps too. If the denoiser runs more than once before a step, the last call wins.

No step synchronises with the device: timesteps and noise levels come from host copies of the schedule made once
per run, and on CUDA (without a live ``on_step`` listener) records are staged on the device and moved to the host
in one go when the run ends.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from ..decoding import decode_with
from ..errors import InvalidArgumentError, RecorderStateError
from ..families import detect_family, latent_preview, latent_rgb, vae_scale_factor
from ..preview import ConvPreview, conv_preview_to_uint8, latent_to_uint8, uint8_factors
from ..results.trace import TENSOR_FIELDS, StepRecord, Trace
from ..schedule_math import prediction_type
from .attach import Attachment, Run, Step, Subscriber, attach
from .provenance import call_provenance
from .steering import Steering

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
_STEERING_OPTIONS = ("edit_latents", "switch_prompt", "guidance", "stop_at", "stop_returns")

StepListener = Callable[[StepRecord, Trace], None]


def _validate_quantities(quantities: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(quantities, str):
        if quantities == "all":
            return tuple(q for q in TENSOR_FIELDS if q != "decoded")
        quantities = (quantities,)
    qs = tuple(quantities)
    bad = [q for q in qs if q not in TENSOR_FIELDS]
    if bad:
        raise InvalidArgumentError(
            f"Unknown quantity {bad[0]!r}; choose from {', '.join(TENSOR_FIELDS)} (or 'all')."
        )
    return qs


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgumentError(f"{name} must be an int ≥ 1, got {value!r}.")


@dataclass(frozen=True)
class StepConfig:
    """What a :class:`StepRecorder` keeps, and where. Validated on construction."""

    quantities: tuple[str, ...] = DEFAULT_QUANTITIES  # see sdexplore.results.trace.TENSOR_FIELDS, or "all"
    every: int = 1  # keep one step in `every` (the last step is always kept)
    dtype: torch.dtype = (
        torch.float16
    )  # storage dtype of latent-shaped tensors (half the memory, ~1e-3 relative)
    device: torch.device = torch.device("cpu")  # where records are stored
    max_bytes: int | None = (
        DEFAULT_MAX_BYTES  # memory bound of one run's trace, checked before its first step
    )
    preview_of: str = (
        "x0"  # "x0" (the predicted clean image) or "latents" (the noisy latents entering a step)
    )
    tiny_vae: Any = None  # an AutoencoderTiny that decodes x0 into `decoded` every `decode_every` steps
    decode_every: int | None = None  # decode x0 every k-th recorded step (tiny_vae, else the pipeline's VAE)
    on_step: StepListener | None = field(default=None, compare=False)  # live listener (record, trace) -> None

    def __post_init__(self) -> None:
        qs = _validate_quantities(self.quantities)
        _positive_int("every", self.every)
        _positive_int("decode_every", self.decode_every, allow_none=True)
        if self.preview_of not in ("x0", "latents"):
            raise InvalidArgumentError(f"preview_of must be 'x0' or 'latents', got {self.preview_of!r}.")
        if self.max_bytes is not None and (
            not isinstance(self.max_bytes, int) or isinstance(self.max_bytes, bool) or self.max_bytes <= 0
        ):
            raise InvalidArgumentError(
                f"max_bytes must be a positive int (or None for no bound), got {self.max_bytes!r}."
            )
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise InvalidArgumentError(
                f"dtype must be a floating torch.dtype (e.g. torch.float16), got {self.dtype!r}."
            )
        if self.on_step is not None and not callable(self.on_step):
            raise InvalidArgumentError("on_step must be a function (record, trace) -> None.")
        decode_every = self.decode_every
        if self.tiny_vae is not None and decode_every is None:
            decode_every = 1
        if decode_every is not None and "decoded" not in qs:
            qs = (*qs, "decoded")
        if "decoded" in qs and decode_every is None:
            raise InvalidArgumentError(
                "'decoded' needs a decoder: pass tiny_vae=AutoencoderTiny(...) or decode_every=k."
            )
        object.__setattr__(self, "quantities", qs)
        object.__setattr__(self, "decode_every", decode_every)
        try:
            object.__setattr__(self, "device", torch.device(self.device))
        except (RuntimeError, TypeError) as e:
            raise InvalidArgumentError(
                f"device must be a torch device such as 'cpu' or 'cuda', got {self.device!r}."
            ) from e


_CONFIG_OPTIONS = tuple(f.name for f in fields(StepConfig))


class StepRecorder:
    """Context manager that records every denoising step of the pipeline calls made inside it.

    >>> with StepRecorder(pipe) as rec:
    ...     image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    >>> rec.trace[10].x0, rec.trace[-1].preview

    Args:
        pipe: a pipeline of a supported family: SD 1.x/2.x, SDXL, SD3, Flux.1 (see :mod:`sdexplore.families`);
            Flux's packed latents are recorded unpacked, (B, 16, h, w), like every other family's.
        config: a :class:`StepConfig`; or give its fields as keywords (``quantities``, ``every``, ``dtype``,
            ``device``, ``max_bytes``, ``preview_of``, ``tiny_vae``, ``decode_every``, ``on_step``). On CUDA,
            without ``on_step``, records are staged on the GPU and moved in one go when the run ends.
        edit_latents, switch_prompt, guidance, stop_at, stop_returns: steering, see :mod:`sdexplore.record.steering`
            (applied by a :class:`~sdexplore.record.steering.Steering` beside the recorder).
    """

    def __init__(self, pipe: Any, config: StepConfig | None = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(_CONFIG_OPTIONS) - set(_STEERING_OPTIONS))
        if unknown:
            raise InvalidArgumentError(
                f"StepRecorder got unexpected option(s) {unknown}; allowed: "
                f"{sorted(_CONFIG_OPTIONS + _STEERING_OPTIONS)}."
            )
        config_opts = {k: v for k, v in options.items() if k in _CONFIG_OPTIONS}
        if config is not None and config_opts:
            raise InvalidArgumentError(f"Pass either config= or the options {sorted(config_opts)}, not both.")
        self.family = detect_family(pipe)
        self.family.get_denoiser(pipe)  # a clear error now if the pipeline has none
        if getattr(pipe, "scheduler", None) is None:
            raise RecorderStateError(f"{type(pipe).__name__} has no scheduler: there are no steps to record.")
        self.pipe = pipe
        self.config = config or StepConfig(**config_opts)
        if self.family.video and "decoded" in self.config.quantities:
            raise InvalidArgumentError(
                f"'decoded' (a VAE decode of every recorded step) is not available for {self.family.label} videos: "
                "its causal video VAE decodes whole clips. Record 'preview' (every frame, by the latent → RGB "
                "factors) and see trace.frame_strip(step)."
            )
        self.steering = Steering(pipe, **{k: v for k, v in options.items() if k in _STEERING_OPTIONS})
        self.traces: list[Trace] = []
        self.subscriber = Subscriber(
            kind="steps",
            run_start=self._run_start,
            run_end=self._run_end,
            denoiser_pre=self._denoiser_pre,
            step=self._step,
        )
        self._attach: attach | None = None
        self._factors, self._bias = latent_rgb(pipe)
        # kept in each trace, so a saved trace previews with the factors it was recorded with
        self._rgb_meta = {"factors": self._factors.tolist(), "bias": self._bias.tolist()}
        # a model folder's learned convolutional preview, where it has one (then every preview uses it)
        self._net = latent_preview(pipe)
        self._net_meta = None if self._net is None else self._net.to_dict()
        self._reset_run_state()

    # options read as attributes, as before the config existed
    def __getattr__(self, name: str) -> Any:
        if name in _CONFIG_OPTIONS:
            return getattr(self.__dict__["config"], name)
        if name in _STEERING_OPTIONS:
            return getattr(self.__dict__["steering"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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
        """Upper bound of the bytes one run's trace holds, for latents of ``latent_shape`` (B, C, h, w), or
        (B, C, F, h, w) for a video's F latent frames (every frame previewed and decoded)."""
        cfg = self.config
        b, _, *cells = latent_shape  # cells: (h, w) or (F, h, w)
        h, w = cells[-2:]
        frames = math.prod(cells[:-2])  # 1 for an image
        numel = math.prod(latent_shape)
        el = torch.empty((), dtype=cfg.dtype).element_size()
        per_step = sum(numel * el for q in _LATENT_SHAPED if q in cfg.quantities)
        if "preview" in cfg.quantities:
            per_step += b * frames * h * w * 3
        if "noise_norm" in cfg.quantities:
            per_step += b * 4
        kept = math.ceil(num_steps / cfg.every) + 1
        total = per_step * kept + numel * el  # + final_latents
        if "decoded" in cfg.quantities and cfg.decode_every:
            scale = 8  # every SD VAE (and TAESD) upsamples latents 8×
            total += (math.ceil(kept / cfg.decode_every) + 1) * b * frames * (h * scale) * (w * scale) * 3
        return total

    # ---- context manager ----------------------------------------------------------------------------------
    def __enter__(self) -> StepRecorder:
        if self._attach is not None:
            raise RecorderStateError("This StepRecorder is already active; leave its `with` block first.")
        ctx = attach(self.pipe, self.subscriber, self.family)
        ctx.__enter__()
        self._attach = ctx
        try:
            if self.steering.active:
                self.steering.__enter__()
        except BaseException:
            self._attach = None
            ctx.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        ctx, self._attach = self._attach, None
        try:
            if self.steering.active:
                self.steering.__exit__(*exc)
        finally:
            if ctx is not None:
                ctx.__exit__(*exc)
            self._finish_run()

    @property
    def attachment(self) -> Attachment | None:
        """The pipeline's attachment while the recorder is active."""
        return None if self._attach is None else self._attach.attachment

    # ---- run bookkeeping ----------------------------------------------------------------------------------
    def _reset_run_state(self) -> None:
        self._checked = False
        self._staged = False
        self._factors_dev: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._net_dev: dict[torch.device, ConvPreview] = {}

    def _run_start(self, run: Run) -> None:
        self._finish_run()
        self._reset_run_state()
        sched = run.scheduler
        trace = Trace(
            family=self.family.name,
            scheduler=type(sched).__name__,
            prediction_type=prediction_type(sched),  # "flow_prediction" for flow matching (SD3)
            num_steps=0 if getattr(sched, "timesteps", None) is None else len(sched.timesteps),
            every=self.config.every,
            guidance_scale=float(getattr(self.pipe, "_guidance_scale", None) or 1.0),  # Qwen-Image's is None
        )
        # each trace its own, free to edit (lists of floats: copying the lists is a deep copy, at a tenth of the cost)
        rgb = self._rgb_meta
        trace.meta["latent_rgb"] = {
            "factors": [list(row) for row in rgb["factors"]],
            "bias": list(rgb["bias"]),
        }
        if self._net_meta is not None:
            trace.meta["latent_preview"] = copy.deepcopy(self._net_meta)
        # model, seed, prompts (the scheduler, steps and guidance are the trace's own fields); the size follows
        trace.meta["provenance"] = call_provenance(self.pipe, run.arguments, sched, skip=("scheduler",))
        trace.mask = (
            run.mask
        )  # an inpainting call's mask (M, H, W), checked against its image at the run's start
        self.traces.append(trace)

    def _run_end(self, run: Run, error: BaseException | None) -> None:
        self._finish_run()

    def _finish_run(self) -> None:
        if self._staged and self.traces:
            self.traces[-1].to(self.config.device)
        self._staged = False

    def _denoiser_pre(self, run: Run, args: tuple, kwargs: dict) -> None:
        """Before the first denoiser call of a run: fill the trace's run fields and check the memory bound."""
        if self._checked:
            return None
        self._checked = True
        cfg = self.config
        trace = self.trace
        trace.num_steps = run.num_steps
        trace.guidance_scale = run.guidance_scale
        # Euler-type schedulers keep latents in variance-exploding form (x0 + σ ε): previews scale them by sqrt(ᾱ)
        trace.meta["ve_latents"] = run.ve_latents
        # img2img / inpainting with strength < 1 run the tail of the schedule: step i is schedule step begin + i
        trace.meta.update(schedule_begin=run.schedule_begin, schedule_length=len(run.timesteps))
        sample = self.family.denoiser_args.get("sample", args, kwargs)
        b = sample.shape[0] // 2 if run.cfg and self.family.cfg_batch else sample.shape[0]
        shape = (b, *sample.shape[1:])
        if (
            len(shape) == 4 and shape[1] > self.family.latent_channels
        ):  # inpainting UNet: latents ‖ mask ‖ image
            shape = (b, self.family.latent_channels, *shape[2:])
        if (
            run.latent_grid is not None
        ):  # Flux's packed tokens (B, h/2 · w/2, C·4) are recorded as (B, C, h, w)
            shape = (b, sample.shape[-1] // self.family.latent_packing**2, *run.latent_grid)
        est = self.estimate_bytes(shape, run.num_steps)
        if cfg.max_bytes is not None and est > cfg.max_bytes:
            raise InvalidArgumentError(
                f"Recording this run would need about {est / 2**20:.1f} MiB (latents {tuple(shape)} × {run.num_steps} "
                f"steps × {len(cfg.quantities)} quantities {cfg.quantities}, every={cfg.every}, {cfg.dtype}), over "
                f"max_bytes={cfg.max_bytes / 2**20:.1f} MiB. Record fewer quantities, pass every=k, "
                "dtype=torch.float16, or raise max_bytes."
            )
        trace.meta.update(latent_shape=list(shape), estimated_bytes=est)
        try:
            scale = vae_scale_factor(self.pipe)
        except AttributeError:  # a pipeline without a VAE: no pixel size to tell
            scale = None
        if scale is not None:
            trace.meta.setdefault("provenance", {})["size"] = [int(shape[-2]) * scale, int(shape[-1]) * scale]
        return None

    def _store(self, t: torch.Tensor, dtype: torch.dtype | None = None, fresh: bool = False) -> torch.Tensor:
        """A copy of ``t`` for the trace (``fresh``: ``t`` is already a new tensor of the recorder's own, so it is
        kept as it is when device and dtype match)."""
        dev = self.config.device
        dtype = dtype or self.config.dtype
        if t.device.type == "cuda" and dev.type == "cpu" and self.config.on_step is None:
            self._staged = True  # stay on the GPU until the run ends: no step waits for a transfer
            dev = t.device
        if fresh and t.dtype == dtype and t.device == dev and not t.requires_grad:
            # already the recorder's own, where it belongs: what .to() would return, without the call
            return t
        return t.detach().to(device=dev, dtype=dtype, copy=not fresh)

    def _preview_factors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # cached per device: a host → GPU copy every step would wait for the GPU each time
        pair = self._factors_dev.get(device)
        if pair is None:
            f, b = uint8_factors(self._factors, self._bias)
            pair = self._factors_dev[device] = (f.to(device), b.to(device))
        return pair

    # ---- a step -------------------------------------------------------------------------------------------
    def _step(self, step: Step) -> None:
        cfg = self.config
        trace = self.trace
        i = step.index
        last = step.last or step.stop
        if step.stop:
            trace.stopped_at = i
        if i % cfg.every == 0 or last:
            rec = self._record(step)
            trace.steps.append(rec)
            if cfg.on_step is not None:
                cfg.on_step(rec, trace)
        if last:
            trace.final_latents = self._store(step.prev_sample)
        return None

    def _plan(self) -> tuple[tuple[str, ...], bool]:
        """What every step records, worked out once per config: the latent-shaped quantities kept (in
        ``_LATENT_SHAPED`` order) and whether x0 is needed."""
        cfg = self.config
        plan = self.__dict__.get("_plan_of")
        if plan is None or plan[0] is not cfg:
            qs = cfg.quantities
            need_x0 = "x0" in qs or "decoded" in qs or ("preview" in qs and cfg.preview_of == "x0")
            plan = self._plan_of = (cfg, tuple(q for q in _LATENT_SHAPED if q in qs), need_x0)
        return plan[1], plan[2]

    def _record(self, step: Step) -> StepRecord:
        qs = self.config.quantities
        latent_qs, need_x0 = self._plan()
        run = step.run
        sample = step.sample  # (B, C, h, w)
        b = sample.shape[0]
        x0 = step.x0 if need_x0 else None
        rec = StepRecord(
            index=step.index,
            timestep=step.timestep,
            sigma=step.level.sigma,
            alpha_bar=step.level.alpha_bar,
            guidance_scale=step.guidance_scale,
            x0_source=step.x0_source,
        )
        out = run.denoiser_out  # (2B|B, C, h, w) raw, before any guidance edit
        sources: dict[str, torch.Tensor | None] = {
            "latents": sample,
            "latents_out": step.prev_sample,
            "noise_pred": step.model_output,
            "x0": x0,
        }
        if out is not None and out.shape[0] == 2 * b:
            sources["noise_uncond"], sources["noise_cond"] = self.family.cfg_halves(out)  # (B, C, h, w) each
        elif out is not None:
            sources["noise_cond"] = out
        kept = [q for q in latent_qs if sources.get(q) is not None]
        if kept:
            # one copy for all of them: (k, B, C, h, w) → a view per quantity (k kernels fewer each step)
            block = self._store(torch.stack([sources[q] for q in kept]), fresh=True)
            for q, view in zip(kept, block.unbind(0), strict=True):
                setattr(rec, q, view)
        if "noise_norm" in qs:
            mo = step.model_output
            norm = torch.linalg.vector_norm(mo, dim=tuple(range(1, mo.ndim)), dtype=torch.float32).mul_(
                1.0 / math.sqrt(mo.numel() // mo.shape[0])  # one row's size, without indexing a row out
            )  # (B,) root mean square (over frames too, for a video)
            rec.noise_norm = self._store(norm, torch.float32, fresh=True)
        if "preview" in qs:
            if self.config.preview_of == "x0":
                src = x0
            elif run.ve_latents:
                src = sample * math.sqrt(step.level.alpha_bar)  # VE → VP form, the scale the factors expect
            else:
                src = sample
            assert src is not None
            frames = (
                src.shape[2] if src.ndim == 5 else None
            )  # a video's (B, C, F, h, w): every frame previewed
            if frames is not None and self._net is not None:
                src = src.movedim(2, 1).flatten(0, 1)  # (B·F, C, h, w)
            elif frames is not None:
                # (B·F, C, h, w) laid out channels-last: one copy, which the linear preview's (B·F·h·w, C) rows
                # then view (the same rows, so the same values, as flattening the frames and copying again)
                nb, nc, nf, nh, nw = src.shape
                rows = src.permute(0, 2, 3, 4, 1).contiguous()  # (B, F, h, w, C)
                src = rows.view(nb * nf, nh, nw, nc).permute(0, 3, 1, 2)  # (B·F, C, h, w), a view
            if self._net is not None:
                net = self._net_dev.get(src.device)
                if net is None:  # cached per device, as the factors are
                    net = self._net_dev[src.device] = self._net.to(src.device)
                rgb = conv_preview_to_uint8(src, net)  # (B, h, w, 3)
            else:
                factors, bias = self._preview_factors(src.device)
                rgb = latent_to_uint8(src, factors, bias, scaled=True)  # (B, h, w, 3)
            if frames is not None:
                rgb = rgb.unflatten(0, (-1, frames))  # (B, F, h, w, 3)
            rec.preview = self._store(rgb, torch.uint8, fresh=True)
        every = self.config.decode_every
        if "decoded" in qs and every and x0 is not None and len(self.trace.steps) % every == 0:
            vae = self.config.tiny_vae if self.config.tiny_vae is not None else self.pipe.vae
            rec.decoded = self._store(decode_with(vae, x0), torch.uint8)
        return rec


def steer(pipe: Any, **steering: Any) -> StepRecorder:
    """Steer the pipeline calls inside a ``with`` block without recording tensors.

    Takes the steering options of :class:`StepRecorder` (``edit_latents``, ``switch_prompt``, ``guidance``,
    ``stop_at``, ``stop_returns``); see :mod:`sdexplore.record.steering`. Step scalars are still kept in ``.trace``.
    """
    allowed = {*_STEERING_OPTIONS, "on_step"}
    bad = sorted(set(steering) - allowed)
    if bad:
        raise InvalidArgumentError(f"steer() got unexpected option(s) {bad}; allowed: {sorted(allowed)}.")
    return StepRecorder(pipe, quantities=(), **steering)
