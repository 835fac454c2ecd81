"""Inversion of a real picture into the starting noise that regenerates it: DDIM, negative-prompt, flow ODE.

Every sampler sdexplore inverts takes one *linear* step per timestep, ``x_next = A·x + B·m(x, t)`` with ``m`` the
model's output (ε, v or x0 for DDIM with η = 0, from ``DDIMScheduler.step``'s own formulas; v for the flow-matching
Euler step, ``x_next = x + (σ_next − σ)·v``). Inverting a step solves ``x = (x_next − B·m(x, t)) / A``:

- **DDIM inversion** (Song et al. 2021; Mokady et al. 2023's "DDIM inversion") evaluates the model at the known
  ``x_next`` instead of the unknown ``x`` (one denoiser call per step). For ε-prediction this is exactly
  diffusers' ``DDIMInverseScheduler.step`` (tested); for v-prediction it reads v with the model's own timestep
  (``DDIMInverseScheduler`` reads it with the previous step's ᾱ). ``iterations=k`` adds k fixed-point passes per
  step, ``x ← (x_next − B·m(x, t)) / A`` (Pan et al. 2023, "AIDI"; Garibi et al. 2024, "ReNoise").
- **Zero terminal SNR** (the embedded model: ``rescale_betas_zero_snr``, trailing spacing, v-prediction): the
  first generation step sits at ᾱ = 0, where the latents carry no signal and DDIM's ε-form of the step is singular
  (A = √(ᾱ_t/ᾱ_s) = 0). In the v-form it is not (A = √(1 − ᾱ_s), B = −√ᾱ_s): the step's x0 is the model's guess
  from pure noise, so the one-shot approximation would throw the picture away there. That step is therefore always
  solved by fixed-point iteration (at least :data:`NO_SIGNAL_ITERATIONS` passes), which finds the noise whose
  first step lands exactly on the inverted latents, so a plain ``pipe(latents=...)`` regenerates the picture.
  The same holds at σ = 1 for flow matching (SD3).
- **Negative-prompt inversion** (Miyake et al. 2023): invert as above (conditional prediction only), then
  regenerate with the prompt as its own negative prompt: classifier-free guidance ``u + g·(c − u)`` with ``u = c``
  is ``c`` at any scale, so the reconstruction follows the inverted path with CFG on (the attention maps are those
  of a CFG run, at no extra cost, unlike null-text inversion's per-step optimisation).
- **Null-text inversion** (Mokady et al. 2023, UNet families): the DDIM inversion above (CFG 1) is the pivot;
  then, step by step in generation order from the pivot's noise, the unconditional text embedding ∅_i is
  optimised (Adam, ``inner_steps`` iterations, stopped early once the mean squared error is below
  :data:`NULL_TEXT_TOLERANCE`) so that the CFG step ``A·x + B·(u(∅_i) + g·(c − u(∅_i)))`` from the current latent
  lands on the pivot's next latent; ∅_i starts from ∅_{i−1} (the empty prompt's embedding at step 0), and the
  current latent moves on with the optimised ∅_i. The reconstruction then gives the denoiser ∅_i as the
  unconditional half at step i (:func:`applied`): faithful under CFG with the true unconditional branch, so
  Prompt-to-Prompt edits of the picture keep what they do not target.
- **Flow inversion** (SD3, Flux.1, Flux.2): the Euler ODE run backwards on the pipeline's own (shifted) σ
  schedule, computed as the family's pipeline computes it (:func:`sdexplore.flowedit.flow_schedule`: Flux's
  resolution-dependent shift included), with the velocity called as the pipeline calls it (Flux's packed tokens
  and position ids; a guidance-distilled transformer gets ``guidance`` as its input, as the reconstruction's
  ``guidance_scale``).

The reconstruction is an ordinary ``pipe(...)`` call inside :func:`applied` (for the UNet families with a DDIM
scheduler built from the pipeline's config, swapped in for the call and restored after; null-text's embeddings
given by a subscriber of the pipeline's attachment, no patching of its own), so ``sdexplore.observe`` around
:func:`invert` records its steps and attention maps like any call's. The inversion's own denoiser calls are not
a pipeline call and are not recorded.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._checks import check_size
from .embedded.model import EMBEDDED_GUIDANCE_SCALE, EMBEDDED_MODEL_DIR
from .errors import InvalidArgumentError, UnsupportedPipelineError
from .families import Family, detect_family
from .images import ImageLike, encode_image, pipeline_image
from .results.inversion import METHODS, Inversion, psnr

__all__ = [
    "DEFAULT_ITERATIONS",
    "METHODS",
    "NO_SIGNAL_ITERATIONS",
    "NULL_TEXT_FAMILIES",
    "NULL_TEXT_LR",
    "NULL_TEXT_TOLERANCE",
    "Inversion",
    "applied",
    "invert",
    "psnr",
]

#: Fixed-point passes always given to a step that starts from no signal (ᾱ = 0 or σ = 1).
NO_SIGNAL_ITERATIONS = 6
#: Default number of steps (the embedded model's own).
DEFAULT_STEPS = 25
#: Default fixed-point passes per step. Measured on the embedded model (benchmarks/RESULTS.md, "Inversion"): at
#: CFG 1 and 25 steps the reconstruction is 4.3 dB below the VAE's round trip with 0 passes and within 2 dB (the
#: issue's bar) with 2, for about twice the time of 0 passes (≈ 4–5 generations instead of ≈ 2.3).
DEFAULT_ITERATIONS = 2
_OUTSIDE_WARNING = "The observed denoiser ran outside a call"
#: Null-text inversion's early stop: a step's optimisation ends once the mean squared error between the CFG
#: step's result and the pivot's next latent is below this (Mokady et al.'s ε = 1e-5).
NULL_TEXT_TOLERANCE = 1e-5
#: The families whose CFG batch has a text-conditioned unconditional half for null-text inversion to optimise.
NULL_TEXT_FAMILIES = ("sd1", "sd2", "sdxl")
#: The flow-matching families, inverted with the flow ODE (method="flow").
FLOW_FAMILIES = ("sd3", "flux", "flux2")
#: The guidance scale null-text inversion uses when none is given on a non-embedded model (the paper's).
NULL_TEXT_GUIDANCE = 7.5
#: Null-text's Adam learning rate (the paper's). Measured on the embedded model (6 held-out scenes, 25 steps × 10
#: iterations, CFG 3): 1e-1 brings reconstructions within 1 dB of the VAE's round trip (1e-2: 7 dB below), but
#: its embeddings then carry the picture's colours, and Prompt-to-Prompt colour swaps of the inverted scene read
#: white or black instead of the target; at 1e-2 they read as the target (8 of 8 swaps on 3 scenes; 3e-2: 4 of 8).
NULL_TEXT_LR = 1e-2


# ---------------------------------------------------------------- schedules as linear steps


def _ddim_scheduler(pipe: Any) -> Any:
    """The DDIM scheduler the reconstruction runs with: the pipeline's own if it is one (η = 0, no clipping or
    thresholding, which would make the step non-linear), else one built from its config."""
    from diffusers import DDIMScheduler

    current = pipe.scheduler
    if type(current) is DDIMScheduler and not current.config.clip_sample and not current.config.thresholding:
        return current
    return DDIMScheduler.from_config(current.config, clip_sample=False, thresholding=False)


def _ddim_steps(scheduler: Any, steps: int) -> tuple[list[float], list[tuple[float, float]], list[bool]]:
    """Timesteps, linear coefficients (A, B) of ``DDIMScheduler.step`` (η = 0) and "no signal" per step."""
    from diffusers import DDIMScheduler

    work = DDIMScheduler.from_config(scheduler.config)
    work.set_timesteps(steps)
    alphas = work.alphas_cumprod.double()
    final = float(work.final_alpha_cumprod)
    kind = work.config.prediction_type
    times, coeffs, empty = [], [], []
    for t in work.timesteps.tolist():
        prev = t - work.config.num_train_timesteps // steps  # DDIMScheduler.step's own previous timestep
        a_t = float(alphas[t])
        a_s = float(alphas[prev]) if prev >= 0 else final
        st, ss, nt, ns = math.sqrt(a_t), math.sqrt(a_s), math.sqrt(1 - a_t), math.sqrt(1 - a_s)
        if kind == "v_prediction":  # x0 = √ᾱ·x − √(1−ᾱ)·v, ε = √ᾱ·v + √(1−ᾱ)·x
            coeffs.append((ss * st + ns * nt, ns * st - ss * nt))
        elif kind == "epsilon":  # x0 = (x − √(1−ᾱ)·ε)/√ᾱ
            if a_t == 0:
                raise UnsupportedPipelineError(
                    "This scheduler has zero terminal SNR with ε-prediction: DDIM's step is undefined at ᾱ = 0. "
                    "Use the model's own v-prediction scheduler config."
                )
            coeffs.append((ss / st, ns - ss * nt / st))
        elif kind == "sample":  # x0 = m, ε = (x − √ᾱ·m)/√(1−ᾱ)
            coeffs.append((ns / nt, ss - ns * st / nt))
        else:
            raise UnsupportedPipelineError(f"Cannot invert a scheduler with prediction_type={kind!r}.")
        times.append(float(t))
        empty.append(a_t == 0.0)
    return times, coeffs, empty


def _flow_steps(
    pipe: Any, steps: int, height: int, width: int
) -> tuple[list[float], list[tuple[float, float]], list[bool]]:
    """Timesteps, linear coefficients (1, σ_next − σ) of the flow-matching Euler step, "no signal" (σ = 1), on the
    schedule the pipeline's own call at ``height`` × ``width`` uses."""
    from .flowedit import flow_schedule

    times, sigmas = flow_schedule(pipe, steps, height, width)  # sigmas: (steps + 1,), last 0
    coeffs = [(1.0, sigmas[i + 1] - sigmas[i]) for i in range(steps)]
    return times, coeffs, [s >= 1.0 for s in sigmas[:steps]]


# ---------------------------------------------------------------- the model, conditioned on the prompt


def _conditional_model(
    pipe: Any, fam: Family, prompt: str, height: int, width: int, guidance: float = 1.0
) -> Any:
    """``m(x, t)``: the denoiser's conditional output, called as the family's pipeline calls it."""
    from .text import encode_prompt

    if fam.name in FLOW_FAMILIES:  # the conditional velocity (a distilled transformer's guidance input aside)
        from .flowedit import distilled_guidance, velocity_model

        return velocity_model(pipe, prompt, guidance if distilled_guidance(pipe) else 1.0, height, width)
    enc = encode_prompt(pipe, prompt, height=height, width=width)
    denoiser = fam.get_denoiser(pipe)
    param = next(denoiser.parameters())
    embeds = enc.prompt_embeds.to(param.device, param.dtype)
    pooled = (
        None if enc.pooled_prompt_embeds is None else enc.pooled_prompt_embeds.to(param.device, param.dtype)
    )

    def model(x: torch.Tensor, t: float) -> torch.Tensor:
        sample = x.to(param.device, param.dtype)
        timestep = torch.tensor(int(t), device=param.device)
        extra = {}
        if fam.name == "sdxl":
            extra["added_cond_kwargs"] = {
                "text_embeds": pooled,
                "time_ids": enc.add_time_ids.to(param.device, param.dtype),
            }
        out = denoiser(sample, timestep, encoder_hidden_states=embeds, return_dict=False, **extra)[0]
        return out.double()

    return model


# ---------------------------------------------------------------- the pipeline for the reconstruction


@contextlib.contextmanager
def _scheduler(pipe: Any, scheduler: Any) -> Iterator[None]:
    """``pipe.scheduler`` is ``scheduler`` inside the block and exactly the old object after it."""
    old = pipe.scheduler
    if scheduler is old:
        yield
        return
    # through __dict__: DiffusionPipeline.__setattr__ would also rewrite (and replace) the pipeline's config
    pipe.__dict__["scheduler"] = scheduler
    try:
        yield
    finally:
        pipe.__dict__["scheduler"] = old


def _check(
    pipe: Any,
    prompt: Any,
    steps: Any,
    method: Any,
    guidance: Any,
    iterations: Any,
    height: Any = None,
    width: Any = None,
    inner_steps: Any = 10,
    lr: Any = NULL_TEXT_LR,
) -> tuple[Family, str, int, float, int, float]:
    fam = detect_family(pipe)
    if method == "null-text":
        fam.require(
            "null-text",
            "null-text inversion (method='null-text')",
            why=f"it optimises the unconditional half of a UNet's CFG batch (SD 1.x, SD 2.x and SDXL have it, "
            f"{fam.label} does not)",
            hint=f"Invert {fam.label} with "
            f"{'method=' + repr('flow') + ' or ' if fam.name in FLOW_FAMILIES else ''}another family's pipeline.",
        )
    fam.require("invert", "sdexplore.invert")
    if method == "negative-prompt" and fam.name in ("flux", "flux2"):
        raise InvalidArgumentError(
            f"method='negative-prompt' needs a CFG batch with a negative prompt under guidance_scale, which "
            f"{fam.label}'s pipeline does not run that way: use method='flow'."
        )
    if not isinstance(prompt, str):
        raise InvalidArgumentError(f'prompt must be a string ("" for none), got {type(prompt).__name__}.')
    ode = "flow" if fam.name in FLOW_FAMILIES else "ddim"
    if method is None:
        method = ode
    if method not in METHODS:
        raise InvalidArgumentError(f"method={method!r}: choose one of {', '.join(map(repr, METHODS))}.")
    if method in ("ddim", "flow") and method != ode:
        raise InvalidArgumentError(
            f"method={method!r} does not fit {fam.label}, whose sampler is {'flow matching' if ode == 'flow' else 'DDIM'}:"
            f" use method={ode!r} (or 'negative-prompt')."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise InvalidArgumentError(f"steps={steps!r}: give a whole number of steps from 1 to 1000, e.g. 25.")
    if guidance is None:
        guidance = (
            (EMBEDDED_GUIDANCE_SCALE if _embedded(pipe) else NULL_TEXT_GUIDANCE)
            if method == "null-text"
            else 1.0
        )
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise InvalidArgumentError(
            f"guidance={guidance!r}: give a finite classifier-free guidance scale, e.g. 1.0."
        )
    if guidance < 0:
        raise InvalidArgumentError(
            f"guidance={guidance!r} is negative: give a scale ≥ 0 (1.0 turns CFG off)."
        )
    if method == "null-text" and guidance <= 1:
        raise InvalidArgumentError(
            f"guidance={guidance!r}: null-text inversion optimises the unconditional branch of CFG, which a scale "
            "≤ 1 does not run; give a scale > 1 (e.g. the model's own), or use method='ddim' at CFG 1."
        )
    if isinstance(iterations, bool) or not isinstance(iterations, int) or not 0 <= iterations <= 100:
        raise InvalidArgumentError(
            f"iterations={iterations!r}: give fixed-point passes per step from 0 to 100."
        )
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or not 0 <= inner_steps <= 1000:
        raise InvalidArgumentError(
            f"inner_steps={inner_steps!r}: give null-text optimisation iterations per step from 0 to 1000 (e.g. "
            "10; 0 keeps the empty prompt's embedding, plain DDIM inversion reconstructed under CFG)."
        )
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise InvalidArgumentError(
            f"lr={lr!r}: give null-text inversion's Adam learning rate as a finite number > 0, e.g. 1e-2."
        )
    check_size(pipe, height, width)  # before the picture is read: a size the model cannot draw fails here
    return fam, ode, steps, float(guidance), iterations, float(lr)


def _embedded(pipe: Any) -> bool:
    """Whether ``pipe`` was loaded from the embedded UNet model's folder."""
    path = str(getattr(pipe.config, "_name_or_path", "") or "")
    return bool(path) and Path(path).resolve() == Path(EMBEDDED_MODEL_DIR).resolve()


# ---------------------------------------------------------------- null-text inversion


def _null_text(
    pipe: Any,
    fam: Family,
    prompt: str,
    height: int,
    width: int,
    scheduler: Any,
    trace: list[torch.Tensor],
    times: list[float],
    coeffs: list[tuple[float, float]],
    guidance: float,
    inner_steps: int,
    lr: float,
) -> tuple[torch.Tensor, list[int]]:
    """Per-step unconditional embeddings (steps, tokens, D) that make the CFG run retrace the pivot ``trace``
    (rows in inversion order: ``trace[steps - i]`` is where generation step ``i`` starts), and the Adam
    iterations each step took. The denoiser's weights get no gradients (``torch.autograd.grad`` on ∅ only)."""
    from .text import encode_prompt

    enc = encode_prompt(pipe, prompt, height=height, width=width)
    denoiser = fam.get_denoiser(pipe)
    param = next(denoiser.parameters())
    dev, dtype = param.device, param.dtype
    cond = enc.prompt_embeds.to(dev, dtype)  # (1, tokens, D)
    null = enc.negative_prompt_embeds.to(dev, torch.float32)  # (1, tokens, D): ∅ before any optimisation

    def extra(uncond: bool) -> dict[str, Any]:
        if fam.name != "sdxl":
            return {}
        pooled = enc.negative_pooled_prompt_embeds if uncond else enc.pooled_prompt_embeds
        return {
            "added_cond_kwargs": {
                "text_embeds": pooled.to(dev, dtype),
                "time_ids": enc.add_time_ids.to(dev, dtype),
            }
        }

    def model(x: torch.Tensor, t: float, text: torch.Tensor, uncond: bool) -> torch.Tensor:
        timestep = torch.tensor(int(t), device=dev)
        return denoiser(x, timestep, encoder_hidden_states=text, return_dict=False, **extra(uncond))[0]

    steps = len(times)
    work = type(scheduler).from_config(scheduler.config)
    work.set_timesteps(steps)  # the reconstruction's own step moves the latent on, as the pipeline will
    x = trace[steps].to(dev, dtype)
    embeds, used = [], []
    for i in range(steps):
        a, b = coeffs[i]
        t = times[i]
        target = trace[steps - i - 1].to(dev, torch.float32)
        with torch.no_grad():
            c = model(x, t, cond, False).float()
        null = null.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([null], lr=lr)
        j = 0
        for j in range(1, inner_steps + 1):  # noqa: B007 - j is the count used
            with torch.enable_grad():
                u = model(x, t, null.to(dtype), True).float()
                landed = a * x.float() + b * (u + guidance * (c - u))
                loss = torch.nn.functional.mse_loss(landed, target)
                (grad,) = torch.autograd.grad(loss, [null])
            null.grad = grad
            opt.step()
            if loss.item() < NULL_TEXT_TOLERANCE:
                break
        used.append(j)
        null = null.detach()
        with torch.no_grad():
            u = model(x, t, null.to(dtype), True)
            x = work.step(u + guidance * (c.to(u.dtype) - u), work.timesteps[i], x).prev_sample
        embeds.append(null[0].cpu())
    return torch.stack(embeds), used  # (steps, tokens, D)


# ---------------------------------------------------------------- the reconstruction's pipeline


@contextlib.contextmanager
def _applied(pipe: Any, fam: Family, scheduler: Any, null_embeds: torch.Tensor | None) -> Iterator[None]:
    """``pipe`` with ``scheduler`` and (null-text) a subscriber that puts ``null_embeds[i]`` in the unconditional
    half of denoiser call ``i``'s text input; restored exactly after the block, also on an exception."""
    if null_embeds is None:
        with _scheduler(pipe, scheduler):
            yield
        return
    from .record.attach import Run, Subscriber, attach

    def denoiser_pre(run: Run, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        spec = fam.denoiser_args
        text = spec.get("text", args, kwargs)  # (2B, tokens, D): (uncond, cond) halves in the family's order
        if not run.cfg:
            raise InvalidArgumentError(
                "A null-text inversion regenerates under classifier-free guidance: call the pipeline with "
                "guidance_scale > 1 (inversion.pipe_kwargs() gives the inversion's own)."
            )
        i = run.calls  # one denoiser call per step (DDIM)
        if run.num_steps != null_embeds.shape[0] or i >= null_embeds.shape[0]:
            raise InvalidArgumentError(
                f"This null-text inversion has {null_embeds.shape[0]} steps but the call runs {run.num_steps}: "
                "call the pipeline with num_inference_steps from inversion.pipe_kwargs()."
            )
        if tuple(text.shape[1:]) != tuple(null_embeds.shape[1:]):
            raise InvalidArgumentError(
                f"The inversion's unconditional embeddings are {tuple(null_embeds.shape[1:])} per step but this "
                f"pipeline's text input is {tuple(text.shape[1:])}: apply an inversion to the pipeline it came from."
            )
        n = text.shape[0] // 2
        null = null_embeds[i].to(text.device, text.dtype).expand(n, *text.shape[1:])  # (B, tokens, D)
        halves = [null, text[n:]] if fam.cfg_uncond_first else [text[:n], null]
        return spec.replace("text", args, kwargs, torch.cat(halves))  # (2B, tokens, D)

    sub = Subscriber(kind="null-text", order=0, denoiser_pre=denoiser_pre)
    with _scheduler(pipe, scheduler), attach(pipe, sub, fam):
        yield


def applied(pipe: Any, inversion: Inversion) -> contextlib.AbstractContextManager[None]:
    """Context manager: ``pipe`` set up to regenerate ``inversion``: ``pipe(**inversion.pipe_kwargs())`` inside it
    reconstructs the picture.

    ::

        inv = sdexplore.invert(pipe, picture, "a red circle ...", method="null-text")
        with sdexplore.observe(pipe, attention=True) as obs, sdexplore.inversion.applied(pipe, inv):
            image = pipe(**inv.pipe_kwargs()).images[0]

    The UNet families' reconstruction runs with the inversion's DDIM scheduler (swapped in for the block); a
    null-text inversion's per-step unconditional embeddings replace the unconditional half of the CFG batch's
    text input at each step (every image of a batch gets them: an edit's source and target branches alike)
    through a subscriber of the pipeline's attachment, so ``sdexplore.observe`` records the run as any call.
    The pipeline is exactly as before after the block, also on an exception.
    """
    if not isinstance(inversion, Inversion):
        raise InvalidArgumentError(
            f"applied(pipe, inversion) takes an Inversion (from sdexplore.invert), got {type(inversion).__name__}."
        )
    fam = detect_family(pipe)
    made = inversion.settings.get("family")
    if made is not None and made != fam.name:
        raise InvalidArgumentError(
            f"This inversion was made with a {made!r} pipeline, not {fam.label}: apply it to the pipeline it came from."
        )
    if inversion.null_embeds is not None and fam.name not in NULL_TEXT_FAMILIES:
        raise UnsupportedPipelineError(
            f"A null-text inversion regenerates on SD 1.x, SD 2.x or SDXL, not {fam.label}."
        )
    scheduler = pipe.scheduler if fam.name in FLOW_FAMILIES else _ddim_scheduler(pipe)
    return _applied(pipe, fam, scheduler, inversion.null_embeds)


@torch.no_grad()
def invert(
    pipe: Any,
    image: ImageLike,
    prompt: str = "",
    *,
    steps: int = DEFAULT_STEPS,
    method: str | None = None,
    guidance: float | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    inner_steps: int = 10,
    lr: float = NULL_TEXT_LR,
    height: int | None = None,
    width: int | None = None,
) -> Inversion:
    """Turn a real picture into the starting noise that regenerates it with ``pipe`` and ``prompt``.

    ``image``: a PIL image, an array, a tensor, bytes or a path (:func:`sdexplore.images.load_image`), resized to
    ``height`` × ``width`` (default: the model's size) with a note; a size the model cannot draw (not a positive
    multiple of its VAE factor × patch, or above an SD3 transformer's limit) is refused before any work. ``method``: ``"ddim"`` (the UNet families'
    default), ``"flow"`` (the default of SD3, Flux.1 and Flux.2; for a guidance-distilled Flux transformer ``guidance`` is
    its guidance input, in the inversion and the reconstruction alike), ``"negative-prompt"`` (faithful under CFG: the reconstruction uses the
    prompt as its negative) or ``"null-text"`` (SD 1.x/2.x/XL: per-step unconditional embeddings optimised so
    that the CFG run retraces the DDIM inversion; the one to edit a picture by attention under CFG).
    ``guidance``: the reconstruction's CFG scale (default 1.0; null-text: the embedded model's own,
    ``sdexplore.EMBEDDED_GUIDANCE_SCALE``, on the embedded model, else 7.5, and it must be > 1).
    ``iterations``: fixed-point passes per step on top of the one-call approximation (default
    :data:`DEFAULT_ITERATIONS`, the fewest that bring the embedded model within 2 dB of its VAE's round trip; 0 is
    plain DDIM inversion, about half the time; the no-signal first step of zero-terminal-SNR and flow models always
    gets :data:`NO_SIGNAL_ITERATIONS`). ``inner_steps`` and ``lr``: null-text's Adam iterations per step (stopped
    early below :data:`NULL_TEXT_TOLERANCE`; 0 gives exactly the DDIM inversion reconstructed at ``guidance``) and
    learning rate (:data:`NULL_TEXT_LR`, the paper's: a larger one reconstructs closer but edits worse).
    Null-text costs about 18 generations on the embedded model's CPU at 25 steps × 10 iterations. The module docstring gives the maths.

    The reconstruction is a plain ``pipe(...)`` call inside :func:`applied`, recorded by an enclosing
    ``sdexplore.observe`` like any call. Returns an :class:`~sdexplore.results.inversion.Inversion` (latents,
    trace, reconstruction, PSNR, settings; null-text: the per-step embeddings).
    """
    fam, ode, steps, guidance, iterations, lr = _check(
        pipe, prompt, steps, method, guidance, iterations, height, width, inner_steps, lr
    )
    method = ode if method is None else method
    picture = np.asarray(pipeline_image(pipe, image, height=height, width=width), dtype=np.uint8)  # (H, W, 3)
    h, w = picture.shape[:2]
    if ode == "ddim":
        recon_scheduler = _ddim_scheduler(pipe)
        times, coeffs, empty = _ddim_steps(recon_scheduler, steps)
    else:
        recon_scheduler = pipe.scheduler
        times, coeffs, empty = _flow_steps(pipe, steps, h, w)

    from .decoding import decode_with
    from .flowedit import encode_picture, pipe_latents

    # (1, C, h/f, w/f), the VAE posterior mean in the sampling space (Flux.2: its batch-norm normalisation)
    z0 = encode_picture(pipe, picture) if ode == "flow" else encode_image(pipe, picture, height=h, width=w)
    vae_round_trip = decode_with(pipe.vae, z0)[0].cpu().numpy()  # (H, W, 3) uint8
    model = _conditional_model(pipe, fam, prompt, h, w, guidance)

    x = z0.double()
    trace = [x.float().cpu()]
    null_embeds, used = None, None
    with (
        warnings.catch_warnings()
    ):  # an enclosing observe's note that this denoiser call is not a pipeline call
        warnings.filterwarnings("ignore", message=_OUTSIDE_WARNING)
        for i in reversed(
            range(steps)
        ):  # the generation's step i takes trace[steps - i] to trace[steps - i - 1]
            a, b = coeffs[i]
            x_next = x
            x = (x_next - b * model(x_next, times[i])) / a
            for _ in range(max(iterations, NO_SIGNAL_ITERATIONS) if empty[i] else iterations):
                x = (x_next - b * model(x, times[i])) / a
            trace.append(x.float().cpu())
        latents = x.to(next(fam.get_denoiser(pipe).parameters()).dtype)
        if method == "null-text":
            null_embeds, used = _null_text(
                pipe, fam, prompt, h, w, recon_scheduler, trace, times, coeffs, guidance, inner_steps, lr
            )

    negative = prompt if method == "negative-prompt" else None
    call: dict[str, Any] = {
        "prompt": prompt,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "height": h,
        "width": w,
        "latents": pipe_latents(pipe, latents),  # Flux.1: packed tokens; Flux.2: 2×2 patches
        "output_type": "np",
    }
    if negative is not None:
        call["negative_prompt"] = negative
    with _applied(pipe, fam, recon_scheduler, null_embeds):
        out = pipe(**call).images[0]  # (H, W, 3) float in [0, 1]
    reconstruction = (np.asarray(out, dtype=np.float64) * 255 + 0.5).clip(0, 255).astype(np.uint8)
    settings: dict[str, Any] = {
        "steps": steps,
        "guidance": guidance,
        "iterations": iterations,
        "no_signal_iterations": NO_SIGNAL_ITERATIONS if any(empty) else 0,
        "negative_prompt": negative,
        "scheduler": type(recon_scheduler).__name__,
        "family": fam.name,
    }
    if method == "null-text":
        settings.update(inner_steps=inner_steps, lr=lr, tolerance=NULL_TEXT_TOLERANCE, inner_steps_used=used)
    return Inversion(
        latents=latents.float().cpu(),
        trace=torch.cat(trace),  # (steps + 1, C, h, w)
        timesteps=times,
        image=picture,
        reconstruction=reconstruction,
        psnr=psnr(reconstruction, picture),
        vae_psnr=psnr(vae_round_trip, picture),
        method=method,
        prompt=prompt,
        settings=settings,
        null_embeds=null_embeds,
    )
