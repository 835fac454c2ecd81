"""schedule_math: x0 from a model output equals the scheduler's own pred_original_sample, for every scheduler kind."""

from __future__ import annotations

import diffusers
import pytest
import torch

from sdexplore.schedule_math import (
    alpha_bar_from_sigma,
    noise_level,
    sigma_from_alpha_bar,
    uses_sigmas,
    x0_from_prediction,
)

SD_SCHEDULE = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
)
RETURNING_X0 = [
    "DDIMScheduler",
    "DDPMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
]


#: Every scheduler with every prediction type it implements (diffusers' EulerAncestralDiscreteScheduler raises
#: NotImplementedError for "sample", so that pair is not a case).
PREDICTION_CASES = [
    (name, pred)
    for name in RETURNING_X0
    for pred in ("epsilon", "v_prediction", "sample")
    if not (pred == "sample" and name == "EulerAncestralDiscreteScheduler")
]


@pytest.mark.parametrize(("name", "pred"), PREDICTION_CASES)
def test_computed_x0_equals_scheduler_pred_original_sample(name: str, pred: str) -> None:
    extra = {"clip_sample": False} if name in ("DDIMScheduler", "DDPMScheduler") else {}
    sched = getattr(diffusers, name)(**SD_SCHEDULE, prediction_type=pred, **extra)
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g) * float(sched.init_noise_sigma)
    for t in sched.timesteps:
        model_input = sched.scale_model_input(sample, t)  # what the UNet would see
        out = torch.randn(2, 4, 8, 8, generator=g)
        kw = {"generator": torch.Generator().manual_seed(1)} if "Ancestral" in name or "DDPM" in name else {}
        res = sched.step(out, t, sample, return_dict=True, **kw)
        idx = sched.step_index - 1 if uses_sigmas(sched) else None
        level = noise_level(sched, t, idx)
        x0 = x0_from_prediction(out, model_input, level.alpha_bar, pred)
        torch.testing.assert_close(x0, res.pred_original_sample, rtol=1e-4, atol=1e-4)
        sample = res.prev_sample


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_x0_inverts_the_forward_process(pred: str) -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    for ab in (0.999, 0.5, 0.01):
        a, s = ab**0.5, (1 - ab) ** 0.5
        xt = a * x0 + s * eps
        out = eps if pred == "epsilon" else a * eps - s * x0  # v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x0
        torch.testing.assert_close(x0_from_prediction(out, xt, ab, pred), x0, rtol=1e-4, atol=1e-4)


def test_sigma_alpha_bar_round_trip_and_levels_monotone() -> None:
    for s in (0.03, 1.0, 14.6):
        assert abs(sigma_from_alpha_bar(alpha_bar_from_sigma(s)) - s) < 1e-9 * max(1.0, s)
    ddim = diffusers.DDIMScheduler(**SD_SCHEDULE)
    ddim.set_timesteps(10)
    sigmas = [noise_level(ddim, t).sigma for t in ddim.timesteps]
    assert sigmas == sorted(sigmas, reverse=True) and sigmas[0] > 5 > 0.1 > sigmas[-1]
    euler = diffusers.EulerDiscreteScheduler(**SD_SCHEDULE)
    euler.set_timesteps(10)
    lv = noise_level(euler, euler.timesteps[0], 0)
    assert lv.source == "sigmas" and lv.sigma == pytest.approx(float(euler.sigmas[0]))


def test_bad_inputs_are_clear() -> None:
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="prediction_type"):
        x0_from_prediction(x, x, 0.5, "flow")
    with pytest.raises(ValueError, match="alpha_bar"):
        x0_from_prediction(x, x, 1.5, "epsilon")
    with pytest.raises(ValueError, match="zero terminal SNR"):
        x0_from_prediction(x, x, 0.0, "epsilon")


def test_zero_terminal_snr_first_step_is_defined_for_v_prediction() -> None:
    assert sigma_from_alpha_bar(0.0) == float("inf") and alpha_bar_from_sigma(float("inf")) == 0.0
    v = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(x0_from_prediction(v, torch.randn(1, 4, 2, 2), 0.0, "v_prediction"), -v)


def test_flow_sigma_from_sigma_inverts_flow_levels_sigma() -> None:
    from sdexplore.schedule_math import flow_level, flow_sigma_from_sigma

    for s in (0.0, 0.05, 0.3, 0.5, 0.9, 0.999, 1.0):
        assert flow_sigma_from_sigma(flow_level(s).sigma) == pytest.approx(s, abs=1e-12)
    assert flow_sigma_from_sigma(1.0) == 0.5  # σ_VE = 1: equal signal and noise, s = 1/2
