"""The attachment layer: one owner of every change to a pipeline, one run per top-level call, exact restore."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_restored, gen, pipeline_state

import sdexplore as sdx
from sdexplore.errors import RecorderStateError
from sdexplore.record.attach import attachment_of
from sdexplore.record.steering import PromptSwitch

P = "a big red circle on a blue background"
Q = "a small green square on a white background"
RUN = dict(num_inference_steps=6, output_type="np")


def test_prompt_switch_keeps_every_step_of_attention_labelled_with_the_calls_prompt(sd1_pipe) -> None:
    """Was: the switch's own encode_prompt started a new attention run, leaving 2 of 6 steps, relabelled."""
    switch = PromptSwitch(at_step=3, prompt=Q)
    with sdx.observe(sd1_pipe, steps=True, attention=True, switch_prompt=switch) as obs:
        sd1_pipe(P, generator=gen(0), **RUN)
    assert len(obs.steps) == 6
    maps = obs.attention
    assert maps.num_steps == 6
    assert torch.equal(maps.timesteps, obs.steps.timesteps)
    assert maps.word("circle").shape == maps.aggregate.shape[-2:]
    # the same run given as prompt_embeds= (no prompt for the pipeline to encode) gives the same maps
    pe, ne = sd1_pipe.encode_prompt(P, "cpu", 1, True)
    with sdx.observe(sd1_pipe, steps=True, attention=True, switch_prompt=switch) as obs2:
        sd1_pipe(prompt_embeds=pe, negative_prompt_embeds=ne, generator=gen(0), **RUN)
    assert obs2.attention.num_steps == 6
    assert torch.allclose(obs2.attention.aggregate, maps.aggregate, atol=1e-6)


def test_encode_prompt_and_inspect_prompt_after_the_call_leave_the_maps(sd1_pipe) -> None:
    """Was: any encode_prompt call in the block wiped the maps (obs.attention None after the block)."""
    with sdx.observe(sd1_pipe, steps=True, attention=True) as obs:
        sd1_pipe(P, generator=gen(0), **RUN)
        during = obs.attention.aggregate.clone()
        sd1_pipe.encode_prompt(Q, "cpu", 1, True)
        sdx.inspect_prompt(sd1_pipe, Q)
        sdx.encode_prompt(sd1_pipe, Q)
    assert obs.attention is not None and torch.equal(obs.attention.aggregate, during)
    assert obs.attention.word("circle").max() > 0
    assert len(obs.runs) == 1


def test_scheduler_swapped_inside_the_block_is_observed(sd1_pipe) -> None:
    """Was: only the scheduler present at __enter__ was wrapped: 0 steps, the old name, no error."""
    before = pipeline_state(sd1_pipe)
    with sdx.observe(sd1_pipe) as obs:
        sdx.set_scheduler(sd1_pipe, "EulerDiscreteScheduler")
        new = sd1_pipe.scheduler
        sd1_pipe(P, generator=gen(0), **RUN)
    assert obs.steps.scheduler == "EulerDiscreteScheduler"
    assert len(obs.steps) == 6 and obs.steps.meta["ve_latents"] is True
    assert "step" not in vars(new) and "step" not in vars(before["sched"])


def test_scales_with_no_layer_is_an_error_that_names_the_scales_there_are(sd1_pipe) -> None:
    """Was: obs.attention was None and the reason was swallowed."""
    before = pipeline_state(sd1_pipe)
    with pytest.raises(RecorderStateError, match=r"scales=\[8\].*at scales 2"):
        with sdx.observe(sd1_pipe, steps=False, attention={"scales": [8]}):
            sd1_pipe(P, generator=gen(0), **RUN)
    assert_restored(sd1_pipe, before)


def test_each_top_level_call_is_one_run_and_nested_calls_are_not(sd1_pipe) -> None:
    seen = []

    def callback(pipe, i, t, kwargs):
        if i == 1 and not seen:  # a pipeline call made inside the run: not a run of its own
            seen.append(pipe("nested", num_inference_steps=2, output_type="np").images)
        return kwargs

    with sdx.observe(sd1_pipe, steps=True, attention=True) as obs:
        sd1_pipe(P, generator=gen(0), callback_on_step_end=callback, **RUN)
        sd1_pipe(Q, generator=gen(1), num_inference_steps=4, output_type="np")
    assert seen, "the callback ran the nested call"
    assert [len(r) for r in obs.runs] == [6, 4]
    assert obs.attention.num_steps == 4 and obs.attention.word("square").max() > 0


def test_images_under_observation_equal_a_plain_call(any_pipe) -> None:
    ref = any_pipe(P, generator=gen(0), **RUN).images
    with sdx.observe(any_pipe, steps=True, attention={"per_head": True, "negative": True}) as obs:
        out = any_pipe(P, generator=gen(0), **RUN).images
    assert np.array_equal(out, ref)
    assert len(obs.steps) == 6
    negative = obs.attention.negative  # the unconditional half: the empty negative prompt's own maps
    assert [tl.prompt for tl in negative.token_lists] == [""]
    assert negative.aggregate.shape == obs.attention.aggregate.shape  # (images, tokens, h, w)
    assert not torch.equal(negative.aggregate, obs.attention.aggregate)


@pytest.mark.parametrize("fault", [RuntimeError, KeyboardInterrupt])
def test_restored_exactly_after_a_fault_mid_run(sd1_pipe, fault) -> None:
    before = pipeline_state(sd1_pipe)

    def explode(pipe, i, t, kwargs):
        if i == 2:
            raise fault("stop here")
        return kwargs

    with pytest.raises(fault):
        with sdx.observe(sd1_pipe, steps=True, attention=True, guidance=[5.0] * 6) as obs:
            sd1_pipe(P, generator=gen(0), callback_on_step_end=explode, **RUN)
    assert_restored(sd1_pipe, before)
    assert len(obs.steps) == 3  # what was recorded before the fault is kept
    assert obs.attention is not None and obs.attention.num_steps == 3


def test_recorders_share_one_attachment_and_the_last_out_restores(sd1_pipe) -> None:
    before = pipeline_state(sd1_pipe)
    steps = sdx.StepRecorder(sd1_pipe)
    att = sdx.AttentionRecorder(sd1_pipe)
    steps.__enter__()
    att.__enter__()
    assert len(sd1_pipe.unet._forward_hooks) == 1 and len(sd1_pipe.unet._forward_pre_hooks) == 1
    sd1_pipe(P, generator=gen(0), **RUN)
    steps.__exit__(None, None, None)  # left in the "wrong" order: the attachment stays for the other
    assert attachment_of(sd1_pipe) is not None and len(sd1_pipe.unet._forward_hooks) == 1
    sd1_pipe(Q, generator=gen(0), **RUN)
    att.__exit__(None, None, None)
    assert_restored(sd1_pipe, before)
    assert len(steps.traces) == 1 and att.maps.word("square").max() > 0


def test_a_second_pipeline_object_on_the_same_unet_is_refused_without_harmful_advice(sd1_pipe) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    twin = StableDiffusionImg2ImgPipeline(**sd1_pipe.components)
    with sdx.observe(sd1_pipe, attention=True):
        with pytest.raises(RecorderStateError) as info:
            with sdx.observe(twin, attention=True):
                pass
    assert "another pipeline object" in str(info.value)
    assert "set_default_attn_processor" not in str(info.value)  # it would strip the active recorder


def test_the_denoiser_and_its_arguments_come_from_the_family_record(sd1_pipe) -> None:
    """A record naming another denoiser attribute is all the attachment needs (as a transformer family will)."""
    from dataclasses import replace

    from sdexplore.families import SD1
    from sdexplore.record.attach import Subscriber, attach

    sd1_pipe.denoiser_alias = sd1_pipe.unet  # the same module under another name
    fam = replace(SD1, denoiser="denoiser_alias")
    seen = []
    sub = Subscriber(
        kind="probe", denoiser_pre=lambda run, a, k: seen.append(fam.denoiser_args.get("text", a, k))
    )
    with attach(sd1_pipe, sub, fam):
        sd1_pipe(P, generator=gen(0), num_inference_steps=2, output_type="np")
    assert len(seen) == 2 and seen[0].shape == (2, 77, sd1_pipe.unet.config.cross_attention_dim)


_COUNTED = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


def _host_reads(monkeypatch, pipe, steps: int, observed: bool) -> int:
    """Calls of device→host reads on tensors during one call of ``steps`` steps."""
    count = [0]
    originals = {name: getattr(torch.Tensor, name) for name in _COUNTED}

    def counting(name):
        fn = originals[name]

        def wrapper(self, *a, **k):
            count[0] += 1
            return fn(self, *a, **k)

        return wrapper

    kw = dict(generator=gen(0), num_inference_steps=steps, output_type="latent")
    if observed:
        with sdx.observe(pipe, steps=True, attention=True):
            with monkeypatch.context() as m:
                for name in _COUNTED:
                    m.setattr(torch.Tensor, name, counting(name))
                pipe(P, **kw)
                n = count[0]
    else:
        with monkeypatch.context() as m:
            for name in _COUNTED:
                m.setattr(torch.Tensor, name, counting(name))
            pipe(P, **kw)
            n = count[0]
    return n


def test_recording_reads_nothing_from_the_device_per_step(monkeypatch, sd1_pipe) -> None:
    """Recorded minus plain host reads is a per-run constant: zero per step (steps and attention together)."""
    extra = {
        n: _host_reads(monkeypatch, sd1_pipe, n, True) - _host_reads(monkeypatch, sd1_pipe, n, False)
        for n in (3, 7)
    }
    assert extra[3] == extra[7], f"extra host reads grow with the steps: {extra}"
    assert extra[3] <= 8  # the schedule copy and the result build, once per run


def test_only_the_attachment_patches_pipelines() -> None:
    """Hooks, processor swaps, scheduler wrappers and class swaps appear in record/attach.py alone."""
    root = Path(sdx.__file__).parent
    pattern = re.compile(
        r"register_forward(_pre)?_hook|set_attn_processor\(|\.__class__ = |__dict__\[\"encode_prompt\"\]|"
        r"sched\w*\.step = |setattr\(sched"
    )
    offenders = []
    for path in root.rglob("*.py"):
        # the attachment; and the MMDiT training, which swaps processors on the transformer it trains (its own
        # model, never a user's pipeline)
        if path.relative_to(root).as_posix() in ("record/attach.py", "embedded/mmdit.py"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every": 0},
        {"quantities": "noise"},
        {"dtype": torch.int8},
        {"device": "tpu"},
        {"max_bytes": -1},
        {"stop_at": 0},
        {"preview_of": "pixels"},
        {"switch_prompt": "a blue square"},
        {"guidance": [float("nan")] * 6},
        {"on_step": 3},
        {"no_such_option": 1},
        {"steps": "yes"},
        {"attention": {"step_resolution": 0}},
        {"attention": {"scales": [3]}},
        {"attention": {"layers": "nowhere"}},
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_bad_observe_options_are_the_librarys_own_error_before_any_change(sd1_pipe, kwargs) -> None:
    from sdexplore.errors import InvalidArgumentError

    before = pipeline_state(sd1_pipe)
    kwargs = {"attention": True, **kwargs} if "attention" in kwargs else kwargs
    with pytest.raises(InvalidArgumentError):
        sdx.observe(sd1_pipe, **kwargs)
    assert_restored(sd1_pipe, before)


def test_attention_batches_of_any_size_give_the_same_maps(monkeypatch, sd1_pipe) -> None:
    """Probabilities computed per layer call (queue of 1 byte), per step (1-step batches) or per run: same maps."""
    from sdexplore.record import attention as rec

    def record():
        with sdx.observe(sd1_pipe, steps=False, attention={"per_head": True, "keep_probs": True}) as obs:
            sd1_pipe(P, generator=gen(0), **RUN)
        return obs.attention

    whole = record()
    monkeypatch.setattr(rec, "PROBS_BYTES_CPU", 1)  # one step per batch
    per_step = record()
    monkeypatch.setattr(rec, "QUEUE_BYTES", 1)  # flushed at every layer call, mid-step
    per_call = record()
    for other in (per_step, per_call):
        assert torch.allclose(other.aggregate, whole.aggregate, atol=1e-6)
        assert torch.allclose(other.steps, whole.steps, atol=1e-6)
        assert other.layer_names == whole.layer_names
        for name in whole.layer_names:
            assert torch.allclose(other.layer_heads[name], whole.layer_heads[name], atol=1e-6)
            assert torch.allclose(other.probs[name].float(), whole.probs[name].float(), atol=1e-6)
