"""Flux.1 (dev and schnell shapes): the family record, the tiny fixture, packed flow-matching steps, restore."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_restored, gen, pipeline_state
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

import sdexplore as sdx
from sdexplore.decoding import decode_with
from sdexplore.families import FLUX, latent_rgb
from sdexplore.fixtures import tiny_pipeline
from sdexplore.preview import latent_to_rgb, to_uint8
from sdexplore.record.steps import StepRecorder
from sdexplore.schedule_math import dynamic_shift_mu

P = "a red circle on a blue background"
# a short T5 sequence keeps the tests fast (Flux's default, 512 tokens, is checked in the encode_prompt test)
KW = dict(num_inference_steps=4, height=64, width=64, output_type="np", max_sequence_length=32)


@pytest.fixture(scope="module")
def flux_pipe():
    return tiny_pipeline("flux")


# ---- the family record ---------------------------------------------------------------------------------------
def test_flux_record_and_detection(flux_pipe) -> None:
    fam = sdx.detect_family(flux_pipe)
    assert fam is FLUX and fam.get_denoiser(flux_pipe) is flux_pipe.transformer
    for cls in (FluxImg2ImgPipeline, FluxInpaintPipeline):
        assert sdx.detect_family(cls(**flux_pipe.components)) is FLUX
    # 16 latent channels, packed 2×2 into the transformer's 64 input channels
    assert fam.latent_channels == flux_pipe.vae.config.latent_channels == 16
    assert flux_pipe.transformer.config.in_channels == fam.latent_channels * fam.latent_packing**2 == 64
    assert [n for n, _ in fam.present_tokenizers(flux_pipe)] == ["tokenizer", "tokenizer_2"]
    assert not fam.cfg_batch and fam.has_distilled_guidance(flux_pipe)
    assert not fam.has_distilled_guidance(tiny_pipeline("flux", variant="schnell"))
    # ComfyUI's published Flux factors (comfy/latent_formats.py, class Flux): spot values and the bias
    factors, bias = latent_rgb(flux_pipe)
    assert factors.shape == (16, 3)
    assert factors[0].tolist() == pytest.approx([-0.0346, 0.0244, 0.0681])
    assert factors[15].tolist() == pytest.approx([-0.1262, -0.0982, -0.0778])
    assert bias.tolist() == pytest.approx([-0.0329, -0.0718, -0.0851])


def test_pack_and_unpack_are_diffusers_own() -> None:
    x = torch.randn(2, 16, 6, 10)
    packed = FLUX.pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))  # (2, 15, 64)
    assert torch.equal(FLUX.unpack_latents(packed, (6, 10)), x)
    assert torch.equal(FLUX.unpack_latents(packed, (6, 10)), FluxPipeline._unpack_latents(packed, 48, 80, 8))
    with pytest.raises(ValueError, match="do not fit"):
        FLUX.unpack_latents(packed, (6, 8))


def test_denoiser_args_read_and_replace_flux_forward_arguments() -> None:
    spec = FLUX.denoiser_args
    kwargs = dict(
        hidden_states="x", timestep="t", guidance="g", pooled_projections="pool", encoder_hidden_states="text",
        img_ids="ids",
    )  # fmt: skip
    got = [spec.get(w, (), kwargs) for w in ("sample", "timestep", "text", "pooled", "guidance", "positions")]
    assert got == ["x", "t", "text", "pool", "g", "ids"]
    positional = ("x", "text", "pool", "t", "ids", "txt", "g")  # FluxTransformer2DModel.forward's order
    assert [spec.get(w, positional, {}) for w in ("sample", "text", "pooled", "timestep", "guidance")] == [
        "x", "text", "pool", "t", "g",
    ]  # fmt: skip
    assert spec.replace("guidance", (), kwargs, "h")[1]["guidance"] == "h" and kwargs["guidance"] == "g"
    assert sdx.detect_family(tiny_pipeline("sd1")).denoiser_args.get("guidance", (), kwargs) is None


def test_encode_prompt_reads_the_flux_tuple(flux_pipe) -> None:
    enc = FLUX.encode_prompt(flux_pipe, P, device="cpu", max_sequence_length=32)
    embeds, pooled, _ = flux_pipe.encode_prompt(P, None, device="cpu", max_sequence_length=32)
    assert torch.equal(enc.embeds, embeds) and torch.equal(enc.pooled, pooled)
    assert enc.embeds.shape == (1, 32, 64) and enc.pooled.shape == (1, 32)  # T5 sequence, CLIP pooled
    assert enc.negative is None and enc.negative_pooled is None  # no CFG batch: no negative unless given
    neg = FLUX.encode_prompt(flux_pipe, P, device="cpu", negative_prompt="blurry", max_sequence_length=32)
    want = flux_pipe.encode_prompt("blurry", None, device="cpu", max_sequence_length=32)
    assert torch.equal(neg.negative, want[0]) and torch.equal(neg.negative_pooled, want[1])
    assert FLUX.encode_prompt(flux_pipe, P, device="cpu").embeds.shape == (
        1,
        512,
        64,
    )  # Flux's default length
    with pytest.raises(ValueError, match="clip_skip"):
        FLUX.encode_prompt(flux_pipe, P, device="cpu", clip_skip=1)


# ---- the fixture ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_flux_fixture_is_deterministic_independent_and_flow_matching(variant) -> None:
    pipe = tiny_pipeline("flux", variant=variant)
    sched = pipe.scheduler
    assert isinstance(sched, FlowMatchEulerDiscreteScheduler)
    assert sched.config.use_dynamic_shifting is (variant == "dev")
    assert pipe.vae.config.shift_factor == 0.1159 and pipe.vae.config.scaling_factor == 0.3611
    assert pipe.transformer.config.guidance_embeds is (variant == "dev")
    assert len(pipe.transformer.transformer_blocks) == len(pipe.transformer.single_transformer_blocks) == 2
    a = pipe(P, generator=gen(0), **KW).images
    b = tiny_pipeline("flux", variant=variant)(P, generator=gen(0), **KW).images
    c = pipe(P, generator=gen(1), **KW).images
    assert a.shape == (1, 64, 64, 3) and np.array_equal(a, b) and np.abs(a - c).max() > 1e-3
    assert tiny_pipeline("flux", variant=variant).transformer is not pipe.transformer


def test_flux_fixture_refuses_options_of_other_families() -> None:
    with pytest.raises(ValueError, match="flow-matching"):
        tiny_pipeline("flux", prediction_type="epsilon")
    with pytest.raises(ValueError, match="T5"):
        tiny_pipeline("flux", t5=False)
    with pytest.raises(ValueError, match="variant"):
        tiny_pipeline("sd3", variant="dev")
    with pytest.raises(ValueError, match="variant"):
        tiny_pipeline("flux", variant="pro")


# ---- steps ---------------------------------------------------------------------------------------------------
def _flow_dpm() -> DPMSolverMultistepScheduler:
    # DPM-Solver++ in flow mode; FluxPipeline always passes mu, which DPM-Solver takes as flow_shift = e^mu
    return DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        use_dynamic_shifting=True,
        time_shift_type="exponential",
        flow_shift=3.0,  # replaced by e^mu at each call
    )


def _expected_sigmas(sched, steps: int, h: int, w: int) -> list[float]:
    """The σ of each model evaluation, computed here as FluxPipeline computes it: sigmas linspace(1, 1/n, n) and
    the resolution shift mu, linear in the packed token count between (256, 0.5) and (4096, 1.15)."""
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * ((h // 2) * (w // 2) - 256)
    if isinstance(sched, FlowMatchEulerDiscreteScheduler):
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
        if sched.config.use_dynamic_shifting:  # e^mu s / (1 + (e^mu − 1) s)
            s = np.linspace(1.0, 1 / steps, steps)
            want = math.exp(mu) * s / (1 + (math.exp(mu) - 1) * s)
            assert sched.sigmas[:-1].tolist() == pytest.approx(want.tolist(), rel=1e-5)
    else:
        sched.set_timesteps(steps, mu=mu)
        assert sched.config.flow_shift == pytest.approx(math.exp(mu))
    return sched.sigmas[:-1].tolist()


@pytest.mark.parametrize(
    "variant, scheduler",
    [("dev", "euler"), ("dev", "dpm"), ("schnell", "euler")],
    ids=["dev-euler", "dev-dpm", "schnell"],
)
def test_steps_are_unpacked_change_nothing_and_compute_x0_with_dynamic_shifting(variant, scheduler) -> None:
    pipe = tiny_pipeline("flux", variant=variant)
    if scheduler == "dpm":
        pipe.scheduler = _flow_dpm()
    kw = dict(KW, width=80)  # a 8×10 latent: 4×5 packed tokens, not square
    ref = pipe(P, generator=gen(0), **kw).images
    with sdx.observe(pipe, steps={"quantities": "all", "dtype": torch.float32}) as obs:
        out = pipe(P, generator=gen(0), **kw).images
    assert np.array_equal(out, ref)  # bitwise
    tr = obs.steps
    fresh = _flow_dpm() if scheduler == "dpm" else tiny_pipeline("flux", variant=variant).scheduler
    evals = _expected_sigmas(fresh, 4, 8, 10)
    assert len(tr) == 4 and tr.prediction_type == "flow_prediction" and tr.family == "flux"
    assert (
        tr.guidance_scales.tolist() == [3.5 if variant == "dev" else 1.0] * 4
    )  # dev: the pipeline's default
    for rec, s, t in zip(tr.steps, evals, fresh.timesteps.tolist(), strict=True):
        assert rec.latents.shape == rec.x0.shape == rec.noise_pred.shape == (1, 16, 8, 10)  # unpacked
        assert rec.preview.shape == (1, 8, 10, 3) and rec.x0_source == "computed"
        assert rec.timestep == pytest.approx(t) == pytest.approx(1000 * s, abs=1)  # DPM: integer timesteps
        torch.testing.assert_close(rec.x0, rec.latents - s * rec.noise_pred)  # x0 = x_t − σ·v, σ shifted
        assert torch.equal(rec.noise_cond, rec.noise_pred) and rec.noise_uncond is None  # no CFG batch
    if scheduler == "euler":
        for rec, nxt in zip(tr.steps, tr.steps[1:], strict=False):
            assert torch.equal(rec.latents_out, nxt.latents)
        torch.testing.assert_close(
            tr.final_latents, tr.steps[-1].x0
        )  # the last Euler step (σ → 0) lands on x0
    # the recorded latents are the pipeline's own, unpacked exactly as FluxPipeline unpacks them
    seen = []
    pipe.scheduler = fresh
    pipe(P, generator=gen(0), callback_on_step_end=lambda p, i, t, k: seen.append(k["latents"]) or k, **kw)
    for rec, packed in zip(tr.steps, seen, strict=True):
        assert torch.equal(rec.latents_out, FluxPipeline._unpack_latents(packed, 64, 80, 8))


def test_true_cfg_records_both_calls_as_the_cfg_halves(flux_pipe) -> None:
    call = dict(negative_prompt="blurry", true_cfg_scale=4.0, **KW)
    ref = flux_pipe(P, generator=gen(0), **call).images
    with sdx.observe(flux_pipe, steps={"quantities": "all", "dtype": torch.float32}) as obs:
        out = flux_pipe(P, generator=gen(0), **call).images
    assert np.array_equal(out, ref)
    for rec in obs.steps.steps:  # the guided prediction is u + s (c − u), u the negative prompt's call
        torch.testing.assert_close(
            rec.noise_pred, rec.noise_uncond + 4.0 * (rec.noise_cond - rec.noise_uncond)
        )
        assert not torch.allclose(rec.noise_uncond, rec.noise_cond) and rec.guidance_scale == 4.0


def test_previews_use_the_flux_factors_and_decoding_undoes_the_shift(flux_pipe) -> None:
    with sdx.observe(flux_pipe, steps={"quantities": "all", "dtype": torch.float32}) as obs:
        image = flux_pipe(P, generator=gen(0), **KW).images
    factors, bias = latent_rgb(flux_pipe)
    for rec in obs.steps.steps:
        want = to_uint8(latent_to_rgb(rec.x0, factors, bias))  # (1, 8, 8, 3)
        assert (rec.preview.int() - want.int()).abs().max() <= 1
        assert rec.preview.float().std() > 5  # a picture, not one grey
    # decode_with must add Flux's shift_factor back, as the pipeline does: its image equals the pipeline's own
    decoded = decode_with(flux_pipe.vae, obs.steps.final_latents)  # (1, 64, 64, 3) uint8
    assert np.abs(decoded.numpy().astype(int) - np.round(image * 255).astype(int)).max() <= 1


def test_memory_bound_and_vae_decodes_use_the_unpacked_latents(flux_pipe) -> None:
    calls = []
    h = flux_pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"latents \(1, 16, 8, 8\)"):  # refused before the first step
            with StepRecorder(flux_pipe, max_bytes=10_000):
                flux_pipe(P, generator=gen(0), **dict(KW, num_inference_steps=50))
    finally:
        h.remove()
    assert calls == []  # refused in the first transformer call's pre-hook: the transformer never ran
    ref = flux_pipe(P, generator=gen(0), **KW).images
    with StepRecorder(flux_pipe, decode_every=2, quantities=("x0",)) as rec:
        out = flux_pipe(P, generator=gen(0), **KW).images
    assert np.array_equal(out, ref) and rec.trace.meta["latent_shape"] == [1, 16, 8, 8]
    decoded = [r.decoded for r in rec.trace.steps if r.decoded is not None]
    assert len(decoded) == 2 and decoded[0].shape == (1, 64, 64, 3) and decoded[0].dtype == torch.uint8
    want = decode_with(flux_pipe.vae, rec.trace.steps[2].x0.float())
    assert (decoded[1].int() - want.int()).abs().max() <= 2  # x0 stored in float16


def test_img2img_steps_follow_the_tail_of_the_schedule(flux_pipe) -> None:
    pipe = FluxImg2ImgPipeline(**flux_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64)
    call = dict(image=image, strength=0.5, **KW)
    ref = pipe(P, generator=gen(0), **call).images
    with sdx.observe(pipe, steps={"quantities": "all", "dtype": torch.float32}) as obs:
        out = pipe(P, generator=gen(0), **call).images
    assert np.array_equal(out, ref)
    tr = obs.steps
    assert len(tr) == 2 and tr.steps[0].latents.shape == (1, 16, 8, 8)
    assert [r.timestep for r in tr.steps] == pytest.approx(pipe.scheduler.timesteps[-2:].tolist())


# ---- describe, load, restore ---------------------------------------------------------------------------------
def test_describe_flux(flux_pipe) -> None:
    d = sdx.describe(flux_pipe, steps=4, height=64, width=64)
    names = {c.name for c in d.components}
    assert {
        "transformer",
        "vae",
        "text_encoder_2",
        "tokenizer_2",
        "scheduler",
    } <= names and "unet" not in names
    assert d.family == "flux" and d.latent_shape == (16, 8, 8) and d.prediction_type == "flow_prediction"
    flux_pipe(P, num_inference_steps=4, height=64, width=64, max_sequence_length=8, output_type="latent")
    assert d.timesteps == [int(t) for t in flux_pipe.scheduler.timesteps]  # the pipeline's own, shifted by mu
    assert "2 double-stream (MMDiT) blocks" in str(d) and "2 single-stream blocks" in str(d)
    assert sdx.describe(flux_pipe, steps=4).image_size == (1024, 1024)  # FluxPipeline's default size
    for tokens in (16, 256, 1000, 4096):  # the resolution shift is diffusers' calculate_shift
        assert dynamic_shift_mu(tokens) == pytest.approx(calculate_shift(tokens))


def test_load_pipeline_loads_a_saved_flux_folder(flux_pipe, tmp_path) -> None:
    flux_pipe.save_pretrained(tmp_path / "flux")
    pipe = sdx.load_pipeline(tmp_path / "flux", device="cpu")
    assert sdx.detect_family(pipe) is FLUX and pipe.transformer.config.guidance_embeds
    assert pipe.tokenizer_2.convert_ids_to_tokens(pipe.tokenizer_2("circle").input_ids) == [
        "▁cir",
        "cle",
        "</s>",
    ]


@pytest.mark.parametrize("fault", [None, RuntimeError, KeyboardInterrupt])
def test_restored_exactly_after_success_exception_and_interrupt(fault) -> None:
    pipe = tiny_pipeline("flux")
    kw = KW
    pipe(P, generator=gen(0), **kw)  # diffusers' own first-call attributes exist before the snapshot
    before = pipeline_state(pipe)

    def explode(p, i, t, kwargs):
        if fault is not None and i == 2:
            raise fault("stop here")
        return kwargs

    def run():
        with sdx.observe(pipe, steps=True, guidance=[4.0] * 4, edit_latents=lambda i, x: x) as obs:
            assert type(pipe) is not before["cls"] and pipe.transformer._forward_hooks  # attached
            pipe(P, generator=gen(0), callback_on_step_end=explode, **kw)
        return obs

    if fault is None:
        assert len(run().steps) == 4
    else:
        with pytest.raises(fault):
            run()
        # FluxPipeline's own attribute, set at each step and reset only when a call returns (a plain call that
        # raises leaves it too): step 2's timestep
        assert torch.equal(pipe._current_timestep, pipe.scheduler.timesteps[2])
        pipe._current_timestep = None
    assert_restored(pipe, before)
    ref = tiny_pipeline("flux")(P, generator=gen(0), **kw).images
    assert np.array_equal(pipe(P, generator=gen(0), **kw).images, ref)  # and it runs as before
