"""StepRecorder: observation never changes the image, x0 is right, the pipeline is always restored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gen

from sdexplore.errors import RecorderStateError, UnsupportedPipelineError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.loading import set_scheduler
from sdexplore.record.steps import DEFAULT_MAX_BYTES, StepRecorder

KW = dict(num_inference_steps=3, height=64, width=64, output_type="np")
SCHEDULERS = [
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
]


def plain(pipe, prompt="a red circle", seed=0, **kw):
    return pipe(prompt, generator=gen(seed), **{**KW, **kw}).images


def pipeline_state(pipe):
    """Everything a recorder may touch, by identity."""
    return (
        {k: id(v) for k, v in pipe.unet.attn_processors.items()},
        len(pipe.unet._forward_hooks),
        len(pipe.unet._forward_pre_hooks),
        sorted(vars(pipe.scheduler)),
    )


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_recording_never_changes_the_image_and_x0_is_right(family: str, scheduler: str) -> None:
    pipe = tiny_pipeline(family)
    if scheduler != "DDIMScheduler":  # PNDM as SD 1.5 ships it: PLMS only, no Runge-Kutta warm-up
        set_scheduler(pipe, scheduler, **({"skip_prk_steps": True} if scheduler == "PNDMScheduler" else {}))
    ref = plain(pipe)
    before = pipeline_state(pipe)
    with StepRecorder(pipe, quantities="all", dtype=torch.float32) as rec:
        out = plain(pipe)
    assert np.abs(out - ref).max() <= 1e-6
    assert pipeline_state(pipe) == before
    tr = rec.trace
    assert len(tr) == tr.num_steps == len(pipe.scheduler.timesteps)
    assert all(s.x0 is not None and torch.isfinite(s.x0).all() for s in tr)
    # x0 of the last step is (almost) the final latents: exactly for schedulers ending at sigma 0, within
    # sqrt(1 - alpha_bar_0) * |eps| for DDIM/PNDM, whose last step stops at alpha_bar_0 = 0.99915.
    ends_at_zero = hasattr(pipe.scheduler, "sigmas") and float(pipe.scheduler.sigmas[-1]) == 0
    tol = 1e-4 if ends_at_zero else 0.15
    assert (tr[-1].x0 - tr.final_latents).abs().max() <= tol
    assert (tr[-1].x0 - tr.final_latents).abs().max() < (tr[0].x0 - tr.final_latents).abs().max()
    # the guided prediction is the pipeline's own u + g (c - u)
    s = tr[1]
    torch.testing.assert_close(
        s.noise_pred,
        s.noise_uncond + s.guidance_scale * (s.noise_cond - s.noise_uncond),
        atol=1e-5,
        rtol=1e-5,
    )


def test_default_recording_on_sd1(sd1_pipe) -> None:
    ref = plain(sd1_pipe)
    with StepRecorder(sd1_pipe) as rec:
        out = plain(sd1_pipe)
    assert np.abs(out - ref).max() <= 1e-6
    tr = rec.trace
    assert len(tr) == 3 and tr[-1] is tr[2] and tr.family == "sd1"
    s = tr[0]
    assert (
        s.latents.dtype == torch.float16
        and s.latents.device.type == "cpu"
        and s.latents.shape == (1, 4, 8, 8)
    )
    assert s.preview.dtype == torch.uint8 and s.preview.shape == (1, 8, 8, 3) and s.preview.float().std() > 1
    assert s.latents_out is None and s.decoded is None
    assert tr.sigmas[0] > tr.sigmas[-1] and tr.timesteps[0] > tr.timesteps[-1]
    assert tr.stack("x0").shape == (3, 1, 4, 8, 8)
    assert tr.nbytes <= tr.meta["estimated_bytes"]


def test_restored_after_exception_and_keyboard_interrupt_in_user_callback(sd1_pipe) -> None:
    ref = plain(sd1_pipe)
    before = pipeline_state(sd1_pipe)

    def boom(pipe, i, t, kw):
        raise RuntimeError("user bug")

    def ctrl_c(pipe, i, t, kw):
        if i == 1:
            raise KeyboardInterrupt
        return kw

    for cb, exc in ((boom, RuntimeError), (ctrl_c, KeyboardInterrupt)):
        with pytest.raises(exc):
            with StepRecorder(sd1_pipe):
                plain(sd1_pipe, callback_on_step_end=cb)
        assert pipeline_state(sd1_pipe) == before
        assert "step" not in vars(sd1_pipe.scheduler) and "set_timesteps" not in vars(sd1_pipe.scheduler)
    assert np.abs(plain(sd1_pipe) - ref).max() == 0
    with StepRecorder(sd1_pipe):  # and it can be entered again
        pass


def test_user_callback_still_runs_and_its_edits_apply(sd1_pipe) -> None:
    seen = []

    def cb(pipe, i, t, kw):
        seen.append(i)
        return {"latents": kw["latents"] * 0.5} if i == 1 else kw

    ref = plain(sd1_pipe, callback_on_step_end=cb)
    seen.clear()
    with StepRecorder(sd1_pipe, quantities="all", dtype=torch.float32) as rec:
        out = plain(sd1_pipe, callback_on_step_end=cb)
    assert seen == [0, 1, 2] and np.abs(out - ref).max() <= 1e-6
    # the callback's edit (after step 1) is what step 2 received
    torch.testing.assert_close(rec.trace[2].latents, rec.trace[1].latents_out * 0.5)


def test_entering_twice_is_a_clear_error(sd1_pipe) -> None:
    with StepRecorder(sd1_pipe):
        with pytest.raises(RecorderStateError, match="already active"):
            with StepRecorder(sd1_pipe):
                pass
        assert len(sd1_pipe.unet._forward_hooks) == 1
        # another pipeline object over the same UNet and scheduler is the same pipeline for a recorder
        from diffusers import StableDiffusionImg2ImgPipeline

        twin = StableDiffusionImg2ImgPipeline(**sd1_pipe.components)
        with pytest.raises(RecorderStateError, match="already active"):
            with StepRecorder(twin):
                pass
    assert len(sd1_pipe.unet._forward_hooks) == 0


def test_bad_inputs_give_clear_errors(sd1_pipe) -> None:
    with pytest.raises(ValueError, match="every"):
        StepRecorder(sd1_pipe, every=0)
    with pytest.raises(ValueError, match="every"):
        StepRecorder(sd1_pipe, every=-2)
    with pytest.raises(ValueError, match="Unknown quantity 'noise'"):
        StepRecorder(sd1_pipe, quantities=("latents", "noise"))
    with pytest.raises(ValueError, match="stop_at"):
        StepRecorder(sd1_pipe, stop_at=0)
    with pytest.raises(UnsupportedPipelineError, match="Supported pipeline classes"):
        StepRecorder(object())
    with StepRecorder(sd1_pipe, stop_at=9) as rec:
        with pytest.raises(ValueError, match="beyond this run's 3 steps"):
            plain(sd1_pipe)
    with pytest.raises(RecorderStateError, match="inside the `with"):
        _ = StepRecorder(sd1_pipe).trace
    with StepRecorder(sd1_pipe) as rec:
        plain(sd1_pipe)
    with pytest.raises(IndexError, match="3 recorded steps"):
        rec.trace[3]
    assert rec.trace[-3].index == 0
    with pytest.raises(IndexError, match="not recorded"):
        rec.trace.at_step(7)


def test_every_k_keeps_multiples_and_the_last_step_and_listener_runs_live(sd1_pipe) -> None:
    live = []
    with StepRecorder(sd1_pipe, every=2, on_step=lambda rec, tr: live.append((rec.index, len(tr)))) as rec:
        plain(sd1_pipe, num_inference_steps=5)
    assert rec.trace.indices == [0, 2, 4] and live == [(0, 1), (2, 2), (4, 3)]
    with StepRecorder(sd1_pipe, every=2) as rec:
        plain(sd1_pipe, num_inference_steps=4)
    assert rec.trace.indices == [0, 2, 3]


def test_each_call_in_the_block_is_its_own_trace(sd1_pipe) -> None:
    with StepRecorder(sd1_pipe) as rec:
        plain(sd1_pipe, num_inference_steps=2)
        plain(sd1_pipe, num_inference_steps=3)
    assert [len(t) for t in rec.traces] == [2, 3] and rec.trace is rec.traces[-1]


def test_memory_estimate_refuses_a_run_over_the_bound_before_it_starts(sd1_pipe) -> None:
    calls = []
    h = sd1_pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    with StepRecorder(sd1_pipe, max_bytes=10_000) as rec:
        with pytest.raises(ValueError, match=r"MiB .*every=k"):
            plain(sd1_pipe, num_inference_steps=50)
    h.remove()
    assert calls == []
    assert rec.estimate_bytes((1, 4, 8, 8), 50) > 10_000


@pytest.mark.slow
def test_thousand_step_run_stays_within_its_documented_bound(sd1_pipe) -> None:
    set_scheduler(
        sd1_pipe, "DDIMScheduler", steps_offset=0
    )  # offset 1 would index timestep 1000 at 1000 steps
    with StepRecorder(sd1_pipe) as rec:
        sd1_pipe(
            "a red circle",
            generator=gen(0),
            num_inference_steps=1000,
            guidance_scale=1.0,
            output_type="latent",
        )
    tr = rec.trace
    assert len(tr) == 1000
    bound = rec.estimate_bytes((1, 4, 8, 8), 1000)
    assert tr.nbytes <= bound <= DEFAULT_MAX_BYTES
    assert tr.nbytes > 0.8 * bound  # the estimate is honest, not a wild over-count


def test_decoded_previews_with_tiny_vae_and_full_vae(sd1_pipe) -> None:
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    taesd = AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
    ).eval()
    ref = plain(sd1_pipe)
    with StepRecorder(sd1_pipe, tiny_vae=taesd) as rec:
        out = plain(sd1_pipe)
    assert np.abs(out - ref).max() <= 1e-6
    assert all(s.decoded.shape == (1, 64, 64, 3) and s.decoded.dtype == torch.uint8 for s in rec.trace)
    with StepRecorder(sd1_pipe, decode_every=2, quantities=("x0",)) as rec:
        out = plain(sd1_pipe)
    assert np.abs(out - ref).max() <= 1e-6
    assert [s.decoded is not None for s in rec.trace] == [True, False, True]
    # the last step's full-VAE decode of x0 is close to the final image (x0 ≈ final latents)
    final = torch.from_numpy(out[0] * 255)
    assert (rec.trace[-1].decoded[0].float() - final).abs().mean() < 10


@pytest.mark.parametrize("scheduler", ["HeunDiscreteScheduler", "KDPM2DiscreteScheduler"])
def test_second_order_schedulers_record_one_step_per_model_evaluation(sd1_pipe, scheduler: str) -> None:
    set_scheduler(sd1_pipe, scheduler)
    ref = plain(sd1_pipe)
    with StepRecorder(sd1_pipe, dtype=torch.float32) as rec:
        out = plain(sd1_pipe)
    assert np.abs(out - ref).max() <= 1e-6
    tr = rec.trace
    assert len(tr) == len(sd1_pipe.scheduler.timesteps) == 2 * 3 - 1
    assert all(s.x0_source == "scheduler" for s in tr)
    assert (tr[-1].x0 - tr.final_latents).abs().max() <= 1e-4


def test_img2img_records_only_the_steps_it_runs(sd1_pipe) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**sd1_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    init = torch.rand(1, 3, 64, 64)
    kw = dict(image=init, strength=0.5, num_inference_steps=6, output_type="np")
    ref = pipe("a red circle", generator=gen(0), **kw).images
    with StepRecorder(pipe, dtype=torch.float32) as rec:
        out = pipe("a red circle", generator=gen(0), **kw).images
    assert np.abs(out - ref).max() <= 1e-6
    assert len(rec.trace) == rec.trace.num_steps == 3
    final = rec.trace.final_latents / pipe.vae.config.scaling_factor  # (1, 4, 8, 8)
    with torch.no_grad():  # the recorded final latents decode to the pipeline's own output
        decoded = pipe.vae.decode(final).sample  # (1, 3, 64, 64)
    assert np.abs(pipe.image_processor.postprocess(decoded, output_type="np") - out).max() <= 1e-6
    # timesteps are read from a host copy of the schedule made once per run (no per-step sync): its tail
    assert rec.trace.timesteps.tolist() == pipe.scheduler.timesteps[-3:].float().tolist()


@pytest.mark.parametrize(
    "scheduler", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "PNDMScheduler"]
)
def test_computed_x0_for_sample_and_v_prediction_models(scheduler: str) -> None:
    for pred in ("v_prediction",) if scheduler == "PNDMScheduler" else ("sample", "v_prediction"):
        pipe = tiny_pipeline("sd1", prediction_type=pred)
        set_scheduler(pipe, scheduler, **({"skip_prk_steps": True} if scheduler == "PNDMScheduler" else {}))
        with StepRecorder(pipe, quantities="all", dtype=torch.float32) as rec:
            plain(pipe)
        tr = rec.trace
        assert all(s.x0_source == "computed" for s in tr)
        if pred == "sample":  # the model predicts x0 itself
            assert all(torch.equal(s.x0, s.noise_pred) for s in tr)
        tol = 0.15 if scheduler == "PNDMScheduler" else 1e-4
        assert (tr[-1].x0 - tr.final_latents).abs().max() <= tol


def test_zero_terminal_snr_v_prediction_schedule(sd2_pipe, tmp_path) -> None:
    set_scheduler(sd2_pipe, "DDIMScheduler", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    ref = plain(sd2_pipe)
    with StepRecorder(sd2_pipe, dtype=torch.float32) as rec:
        out = plain(sd2_pipe)
    assert np.abs(out - ref).max() <= 1e-6
    tr = rec.trace
    assert tr[0].alpha_bar == 0.0 and tr[0].sigma == float("inf")
    assert all(torch.isfinite(s.x0).all() for s in tr)
    torch.testing.assert_close(tr[0].x0, -tr[0].noise_pred)  # at alpha_bar = 0, x0 = -v
    tr.save(tmp_path / "t.safetensors")
    assert type(tr).load(tmp_path / "t.safetensors")[0].sigma == float("inf")
