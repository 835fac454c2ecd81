"""Pure schedule math: noise levels and the predicted clean latent x0 from a model output, for any scheduler."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

#: diffusers' name for what a flow-matching model predicts: the velocity v = ε − x0.
FLOW_PREDICTION = "flow_prediction"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", FLOW_PREDICTION)


@dataclass(frozen=True)
class NoiseLevel:
    """The noise level of one model evaluation, in both conventions.

    ``alpha_bar`` is the variance-preserving signal fraction (DDPM's ᾱ_t); ``sigma`` the
    variance-exploding noise scale (Karras et al. 2022): ``sigma² = (1 − ᾱ) / ᾱ``.

    **Flow matching** (SD3, Flux; Lipman et al. 2023, Esser et al. 2024) noises as ``x_t = (1 − s) x0 + s ε`` with
    the scheduler's own ``s`` in [0, 1] (after shifting; timesteps are ``s · 1000``), kept in ``flow_sigma``.
    The same noise level in the conventions above: ``x_t / (1 − s) = x0 + s / (1 − s) · ε``, so
    ``sigma = s / (1 − s)`` (``inf`` at ``s = 1``, the first step, as in a zero-terminal-SNR schedule) and
    ``alpha_bar = (1 − s)² / ((1 − s)² + s²)``, the VP signal fraction with the same signal-to-noise ratio
    ``(1 − s)² / s²``. So ``sigma² = (1 − ᾱ) / ᾱ`` holds for every family and a flow model's steps plot on the
    same σ and ᾱ axes as a DDPM model's.
    """

    alpha_bar: float  # ᾱ_t in [0, 1]
    sigma: float  # sqrt((1 − ᾱ_t) / ᾱ_t), ≥ 0 (inf at ᾱ = 0)
    source: str  # "alphas_cumprod" (DDIM/DDPM/PNDM...), "sigmas" (Euler, Heun, DPM-Solver...) or "flow"
    flow_sigma: float | None = None  # flow matching only: the scheduler's s (x_t = (1 − s) x0 + s ε)


def sigma_from_alpha_bar(alpha_bar: float) -> float:
    """VE noise scale from the VP signal fraction: σ = sqrt((1 − ᾱ) / ᾱ); ``inf`` at ᾱ = 0 (pure noise, as the
    first step of a zero-terminal-SNR schedule)."""
    if alpha_bar <= 0.0:
        return math.inf
    return math.sqrt(max(1.0 - alpha_bar, 0.0) / alpha_bar)


def alpha_bar_from_sigma(sigma: float) -> float:
    """VP signal fraction from the VE noise scale: ᾱ = 1 / (1 + σ²) (0 for σ = inf)."""
    return 0.0 if math.isinf(sigma) else 1.0 / (1.0 + sigma * sigma)


def flow_sigma_from_sigma(sigma: float) -> float:
    """A flow-matching model's own ``s`` (x_t = (1 − s)·x0 + s·ε) from its VE noise scale σ = s / (1 − s):
    s = σ / (1 + σ), 1 for σ = inf (pure noise). The inverse of :func:`flow_level`'s ``sigma``."""
    return 1.0 if math.isinf(sigma) else sigma / (1.0 + sigma)


def flow_level(flow_sigma: float) -> NoiseLevel:
    """The :class:`NoiseLevel` of a flow-matching evaluation at the scheduler's ``s`` (see NoiseLevel)."""
    s = float(flow_sigma)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"A flow-matching sigma must be in [0, 1], got {s}.")
    signal, noise = (1.0 - s) ** 2, s * s
    alpha_bar = 1.0 if s == 0.0 else signal / (signal + noise)
    sigma = math.inf if s == 1.0 else s / (1.0 - s)
    return NoiseLevel(alpha_bar, sigma, "flow", s)


def x0_from_flow(
    model_output: torch.Tensor, sample: torch.Tensor, flow_sigma: float | torch.Tensor
) -> torch.Tensor:
    """Predicted clean latent of a flow-matching model (rectified flow, Liu et al. 2022; Esser et al. 2024).

    With ``x_t = (1 − s) x0 + s ε`` and the model predicting the velocity ``v = ε − x0``,
    ``x_t − s · v = (1 − s) x0 + s ε − s ε + s x0 = x0``. ``sample`` is the model's input ``x_t`` (flow
    schedulers feed the latents unscaled), ``flow_sigma`` the scheduler's ``s`` of that evaluation (or one per
    sample, shaped to broadcast, as in training).
    """
    return sample - flow_sigma * model_output


def dynamic_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The resolution-dependent time shift of Flux (Esser et al. 2024, §5.3.2; diffusers' ``calculate_shift``).

    ``mu`` grows linearly with the number of image tokens, from ``base_shift`` at ``base_seq_len`` to
    ``max_shift`` at ``max_seq_len``; a scheduler with ``use_dynamic_shifting`` then shifts each ``s`` to
    ``e^mu s / (1 + (e^mu − 1) s)``, so bigger images spend more steps at high noise. Defaults are FLUX.1-dev's
    scheduler config; ``image_seq_len`` counts packed tokens, (h/2)·(w/2) for an h×w latent.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def is_flow_matching(scheduler: Any) -> bool:
    """True for flow-matching schedulers: diffusers' ``FlowMatch*`` classes, and multistep solvers configured
    for flow (DPM-Solver, UniPC with ``use_flow_sigmas=True`` or ``prediction_type="flow_prediction"``)."""
    config = getattr(scheduler, "config", None)
    return (
        type(scheduler).__name__.startswith("FlowMatch")
        or bool(getattr(config, "use_flow_sigmas", False))
        or getattr(config, "prediction_type", None) == FLOW_PREDICTION
    )


def x0_from_prediction(
    model_output: torch.Tensor, model_input: torch.Tensor, alpha_bar: float, prediction_type: str
) -> torch.Tensor:
    """Predicted clean latent x0 from one model evaluation (Ho et al. 2020; Salimans & Ho 2022 for v).

    ``model_input`` is what the UNet saw, in variance-preserving form ``x_t = sqrt(ᾱ) x0 + sqrt(1 − ᾱ) ε``:
    the latents themselves for DDIM/DDPM/PNDM/DPM-Solver/UniPC, the *scaled* model input
    ``latents / sqrt(σ² + 1)`` for Euler-type schedulers. Then

    - epsilon: ``x0 = (x_t − sqrt(1 − ᾱ) ε) / sqrt(ᾱ)``
    - v_prediction: ``x0 = sqrt(ᾱ) x_t − sqrt(1 − ᾱ) v``
    - sample: ``x0 = model_output``

    At ᾱ = 0 (the first step of a zero-terminal-SNR schedule, Lin et al. 2024) only v- and sample-prediction
    define x0; epsilon-prediction raises a clear error there (the scheduler itself would divide by zero).
    """
    if prediction_type == "sample":
        return model_output
    if prediction_type == FLOW_PREDICTION:
        raise ValueError(
            "A flow-matching prediction needs the scheduler's flow sigma, not alpha_bar: use x0_from_flow(model_output, "
            "sample, flow_sigma)."
        )
    if not 0.0 <= alpha_bar <= 1.0:
        raise ValueError(f"alpha_bar must be in [0, 1], got {alpha_bar}.")
    if alpha_bar == 0.0 and prediction_type == "epsilon":
        raise ValueError(
            "x0 is undefined for an epsilon-prediction model at alpha_bar = 0 (zero terminal SNR); zero-terminal-SNR "
            "schedules need a v-prediction model (rescale_betas_zero_snr=True with prediction_type='v_prediction')."
        )
    a = math.sqrt(alpha_bar)
    s = math.sqrt(max(1.0 - alpha_bar, 0.0))
    if prediction_type == "epsilon":
        return (model_input - s * model_output) / a
    if prediction_type == "v_prediction":
        return a * model_input - s * model_output
    raise ValueError(f"Unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")


def uses_sigmas(scheduler: Any) -> bool:
    """True for sigma-based schedulers (Euler, Heun, LMS, KDPM2, DPM-Solver, UniPC, ...), which index
    ``scheduler.sigmas`` by ``scheduler.step_index``; False for ᾱ-indexed ones (DDIM, DDPM, PNDM)."""
    return getattr(scheduler, "sigmas", None) is not None and hasattr(scheduler, "step_index")


def noise_level(scheduler: Any, timestep: Any, step_index: int | None = None) -> NoiseLevel:
    """Noise level of the model evaluation at ``timestep`` (and, for sigma schedulers, ``step_index``).

    For sigma-based schedulers pass the step index that evaluation used (read ``scheduler.step_index``
    before ``step``, or ``step_index - 1`` after it); ᾱ-indexed schedulers use ``alphas_cumprod[timestep]``.
    Flow-matching schedulers give a ``"flow"`` level (see :class:`NoiseLevel`); without a step index their
    ``s`` is ``timestep / num_train_timesteps``.
    """
    if is_flow_matching(scheduler):
        if step_index is not None:
            return flow_level(float(scheduler.sigmas[step_index]))
        return flow_level(float(timestep) / float(scheduler.config.num_train_timesteps))
    if uses_sigmas(scheduler) and step_index is not None:
        sigma = float(scheduler.sigmas[step_index])
        return NoiseLevel(alpha_bar_from_sigma(sigma), sigma, "sigmas")
    acp = getattr(scheduler, "alphas_cumprod", None)
    if acp is None:
        raise ValueError(
            f"{type(scheduler).__name__} has neither sigmas nor alphas_cumprod; sdexplore cannot compute its "
            "noise level. Use a DDIM, PNDM, Euler, DPM-Solver or UniPC scheduler."
        )
    t = int(round(float(timestep)))
    t = min(max(t, 0), len(acp) - 1)
    ab = float(acp[t])
    return NoiseLevel(ab, sigma_from_alpha_bar(ab), "alphas_cumprod")


def prediction_type(scheduler: Any) -> str:
    """The scheduler's configured prediction type ("epsilon", "v_prediction" or "sample"), or
    ``"flow_prediction"`` for a flow-matching scheduler (whose ``FlowMatch*`` configs name none)."""
    if is_flow_matching(scheduler):
        return FLOW_PREDICTION
    return str(getattr(scheduler.config, "prediction_type", "epsilon"))


def vp_model_input(latents: torch.Tensor, level: NoiseLevel, scheduler: Any) -> torch.Tensor:
    """Best guess of the variance-preserving model input when the UNet input itself was not seen.

    Euler-type schedulers keep latents in VE form (``init_noise_sigma > 1``) and scale them by
    ``1 / sqrt(σ² + 1)`` before the UNet; the others feed the latents unchanged.
    """
    if level.source == "sigmas" and float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0:
        return latents * math.sqrt(level.alpha_bar)
    return latents
