"""Steering inputs checked where they are given: a prompt switch by embeddings brings the pooled vector its family
takes (before any run), and a guidance schedule's every value is a finite number ≥ 0 (checked when produced)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_restored, gen, pipeline_state

import sdexplore as sdx
from sdexplore.errors import InvalidArgumentError
from sdexplore.families import detect_family
from sdexplore.fixtures import tiny_pipeline
from sdexplore.record.steering import PromptSwitch, guidance_at
from sdexplore.record.steps import StepRecorder, steer

P, Q = "a red circle", "a blue square"
KW = dict(num_inference_steps=4, height=64, width=64, output_type="np")
T5_KW = dict(max_sequence_length=24)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_a_switch_by_embeddings_without_the_pooled_vector_is_refused_before_the_run(family: str) -> None:
    pipe = tiny_pipeline(family)
    opts = T5_KW if family != "sdxl" else {}
    enc = sdx.encode_prompt(pipe, Q, **opts)
    before = pipeline_state(pipe)
    switch = PromptSwitch(at_step=1, prompt_embeds=enc.prompt_embeds)
    with pytest.raises(InvalidArgumentError, match="also needs pooled_prompt_embeds="):
        StepRecorder(pipe, switch_prompt=switch)
    with pytest.raises(InvalidArgumentError, match="also needs pooled_prompt_embeds="):
        sdx.observe(pipe, steps=True, switch_prompt=switch)
    assert_restored(pipe, before)  # nothing was attached


@pytest.mark.parametrize("family", ["sd1", "flux2"])
def test_a_pooled_vector_is_refused_where_the_family_takes_none(family: str) -> None:
    pipe = tiny_pipeline(family)
    embeds = torch.zeros(1, 77, 32)
    with pytest.raises(InvalidArgumentError, match="takes no pooled text vector"):
        steer(
            pipe, switch_prompt=PromptSwitch(1, prompt_embeds=embeds, pooled_prompt_embeds=torch.zeros(1, 8))
        )


def test_switch_arguments_are_checked_on_their_own() -> None:
    with pytest.raises(InvalidArgumentError, match="goes with prompt_embeds="):
        PromptSwitch(1, prompt=Q, pooled_prompt_embeds=torch.zeros(1, 8))
    with pytest.raises(InvalidArgumentError, match="must be a tensor"):
        PromptSwitch(1, prompt_embeds=[[0.0]])
    with pytest.raises(InvalidArgumentError, match="prompt string"):
        PromptSwitch(1, prompt=3)


def test_sdxl_switch_by_embeddings_with_the_pooled_vector_equals_the_prompt_switch() -> None:
    pipe = tiny_pipeline("sdxl")

    def run(switch):
        with StepRecorder(pipe, quantities="all", dtype=torch.float32, switch_prompt=switch) as rec:
            pipe(P, generator=gen(0), **KW)
        return rec.trace[-1].latents_out

    enc = sdx.encode_prompt(pipe, Q)
    by_prompt = run(PromptSwitch(1, prompt=Q))
    by_embeds = run(
        PromptSwitch(1, prompt_embeds=enc.prompt_embeds, pooled_prompt_embeds=enc.pooled_prompt_embeds)
    )
    torch.testing.assert_close(by_embeds, by_prompt)
    # keeping the original pooled vector is possible, on purpose: pass it
    old = sdx.encode_prompt(pipe, P)
    mixed = run(
        PromptSwitch(1, prompt_embeds=enc.prompt_embeds, pooled_prompt_embeds=old.pooled_prompt_embeds)
    )
    assert not torch.allclose(mixed, by_prompt)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, "3", None, torch.tensor(math.nan)], ids=repr)
def test_a_schedule_value_that_is_no_scale_stops_the_run_naming_the_step(sd1_pipe, bad) -> None:
    before = pipeline_state(sd1_pipe)

    def schedule(step, n):
        return bad if step == 2 else 5.0

    with pytest.raises(InvalidArgumentError, match=r"at step 2 of 4") as err:
        with steer(sd1_pipe, guidance=schedule):
            sd1_pipe(P, generator=gen(0), **KW)
    assert repr(float(bad) if isinstance(bad, torch.Tensor) else bad) in str(err.value)
    assert_restored(sd1_pipe, before)
    with steer(sd1_pipe, guidance=lambda i, n: torch.tensor(7.5)) as rec:  # a one-element tensor is a number
        sd1_pipe(P, generator=gen(0), **KW)
    assert rec.trace.guidance_scales.tolist() == [7.5] * 4


def test_a_nan_distilled_guidance_is_refused_on_flux_dev() -> None:
    pipe = tiny_pipeline("flux")
    pipe(P, generator=gen(0), **KW, **T5_KW)  # a first call sets the scheduler's own per-call state
    before = pipeline_state(pipe)
    with pytest.raises(InvalidArgumentError, match=r"gave nan at step 1 of 4"):
        with steer(pipe, guidance=lambda i, n: math.nan if i == 1 else 3.5):
            pipe(P, generator=gen(0), **KW, **T5_KW)
    pipe._current_timestep = (
        None  # the pipeline's own per-step attribute (a plain call that raises leaves it)
    )
    assert_restored(pipe, before)
    assert detect_family(pipe).name == "flux"


def test_list_schedules_refuse_negative_scales_up_front(sd1_pipe) -> None:
    with pytest.raises(InvalidArgumentError, match="finite numbers ≥ 0"):
        steer(sd1_pipe, guidance=[5.0, -1.0, 5.0, 5.0])
    assert guidance_at([0.0, 2.0], 1, 2) == 2.0
    assert guidance_at(lambda i, n: np.float32(1.5), 0, 1) == 1.5
