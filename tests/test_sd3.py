"""SD3 / SD3.5: the family record, the tiny fixture and its offline T5 tokenizer, flow-matching steps, restore."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_restored, gen, pipeline_state
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
)

import sdexplore as sdx
from sdexplore.decoding import decode_with
from sdexplore.families import SD3, latent_rgb
from sdexplore.fixtures import tiny_pipeline
from sdexplore.preview import latent_to_rgb, to_uint8
from sdexplore.schedule_math import flow_level, is_flow_matching, noise_level, prediction_type, x0_from_flow
from sdexplore.tokenizer import t5_tokenizer

P = "a red circle on a blue background"
KW = dict(num_inference_steps=4, height=64, width=64, output_type="np")


@pytest.fixture
def sd3_pipe():
    return tiny_pipeline("sd3")


# ---- the family record ---------------------------------------------------------------------------------------
def test_sd3_record_and_detection(sd3_pipe) -> None:
    fam = sdx.detect_family(sd3_pipe)
    assert fam is SD3 and fam.get_denoiser(sd3_pipe) is sd3_pipe.transformer
    for cls in (StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline):
        assert sdx.detect_family(cls(**sd3_pipe.components)) is SD3
    assert (
        fam.latent_channels
        == sd3_pipe.vae.config.latent_channels
        == sd3_pipe.transformer.config.in_channels
        == 16
    )
    assert [n for n, _ in fam.present_tokenizers(sd3_pipe)] == ["tokenizer", "tokenizer_2", "tokenizer_3"]
    no_t5 = tiny_pipeline("sd3", t5=False)
    assert sdx.detect_family(no_t5) is SD3 and no_t5.text_encoder_3 is None
    assert [n for n, _ in fam.present_tokenizers(no_t5)] == ["tokenizer", "tokenizer_2"]
    # ComfyUI's published SD3 factors (comfy/latent_formats.py, class SD3): spot values and the bias
    factors, bias = latent_rgb(sd3_pipe)
    assert factors.shape == (16, 3)
    assert factors[0].tolist() == pytest.approx([-0.0922, -0.0175, 0.0749])
    assert factors[15].tolist() == pytest.approx([-0.1448, -0.1463, -0.1189])
    assert bias.tolist() == pytest.approx([0.2394, 0.2135, 0.1925])


def test_denoiser_args_read_and_replace_sd3_forward_arguments() -> None:
    spec = SD3.denoiser_args
    args, kwargs = ("x",), {"encoder_hidden_states": "text", "pooled_projections": "pool", "timestep": "t"}
    assert [spec.get(w, args, kwargs) for w in ("sample", "text", "pooled", "timestep")] == [
        "x",
        "text",
        "pool",
        "t",
    ]
    positional = ("x", "text", "pool", "t")  # SD3Transformer2DModel.forward's order
    assert [spec.get(w, positional, {}) for w in ("sample", "text", "pooled", "timestep")] == list(positional)
    new_args, new_kwargs = spec.replace("pooled", args, kwargs, "other")
    assert new_kwargs["pooled_projections"] == "other" and kwargs["pooled_projections"] == "pool"
    assert spec.replace("pooled", positional, {}, "other")[0] == ("x", "text", "other", "t")


def test_encode_prompt_reads_the_four_tuple(sd3_pipe) -> None:
    enc = SD3.encode_prompt(sd3_pipe, P, device="cpu", negative_prompt="blurry")
    ref = sd3_pipe.encode_prompt(P, None, None, device="cpu", negative_prompt="blurry")
    for got, want in zip((enc.embeds, enc.negative, enc.pooled, enc.negative_pooled), ref, strict=True):
        assert torch.equal(got, want)
    assert enc.embeds.shape == (1, 77 + 256, 64) and enc.pooled.shape == (1, 64)  # CLIP 77 ‖ T5 256 tokens
    assert not torch.equal(enc.pooled, enc.negative_pooled)
    short = SD3.encode_prompt(sd3_pipe, P, device="cpu", max_sequence_length=32, clip_skip=None)
    assert short.embeds.shape == (1, 77 + 32, 64)
    assert torch.equal(short.embeds[:, :77], enc.embeds[:, :77])  # CLIP part unchanged, T5 part shorter
    no_t5 = SD3.encode_prompt(tiny_pipeline("sd3", t5=False), P, device="cpu")
    assert no_t5.embeds[:, 77:].abs().max() == 0  # SD3 puts zeros where T5 would be
    assert no_t5.embeds[:, :77].abs().max() > 0


# ---- the fixture and its T5 tokenizer ------------------------------------------------------------------------
def test_t5_tokenizer_splits_words_into_pieces_with_t5_special_tokens() -> None:
    tok = t5_tokenizer()
    ids = tok(P).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces == ["▁a", "▁red", "▁cir", "cle", "▁on", "▁a", "▁blue", "▁back", "ground", "</s>"]
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.decode(ids, skip_special_tokens=True) == P
    padded = tok("a cat", padding="max_length", max_length=6, truncation=True).input_ids
    assert padded == [tok.convert_tokens_to_ids("▁a"), tok.convert_tokens_to_ids("▁cat"), 1, 0, 0, 0]
    assert tok.unk_token_id not in tok("Angkor Wat, 1113 AD: a photo!").input_ids  # every ASCII character


def test_sd3_fixture_is_deterministic_independent_and_flow_matching() -> None:
    pipe = tiny_pipeline("sd3")
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    assert pipe.vae.config.shift_factor == 0.0609 and pipe.vae.config.scaling_factor == 1.5305
    a = pipe(P, generator=gen(0), **KW).images
    b = tiny_pipeline("sd3")(P, generator=gen(0), **KW).images
    c = pipe(P, generator=gen(1), **KW).images
    assert a.shape == (1, 64, 64, 3) and np.array_equal(a, b) and np.abs(a - c).max() > 1e-3
    no_t5 = tiny_pipeline("sd3", t5=False)
    assert no_t5(P, generator=gen(0), **KW).images.shape == (1, 64, 64, 3)
    assert tiny_pipeline("sd3").transformer is not pipe.transformer
    with pytest.raises(ValueError, match="flow-matching"):
        tiny_pipeline("sd3", prediction_type="epsilon")
    with pytest.raises(ValueError, match="sd3 fixture only"):
        tiny_pipeline("sd1", t5=False)


# ---- schedule math for flow matching -------------------------------------------------------------------------
def test_flow_level_convention() -> None:
    for s in (0.25, 0.5, 0.9):
        lvl = flow_level(s)
        assert lvl.source == "flow" and lvl.flow_sigma == s
        assert lvl.sigma == pytest.approx(s / (1 - s))  # x_t / (1 − s) = x0 + s/(1 − s) ε
        assert lvl.sigma**2 == pytest.approx((1 - lvl.alpha_bar) / lvl.alpha_bar)  # the VP/VE identity holds
        assert lvl.alpha_bar / (1 - lvl.alpha_bar) == pytest.approx((1 - s) ** 2 / s**2)  # same SNR
    assert flow_level(1.0).sigma == math.inf and flow_level(1.0).alpha_bar == 0.0
    assert flow_level(0.0).sigma == 0.0 and flow_level(0.0).alpha_bar == 1.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        flow_level(1.5)


def test_x0_from_flow_equals_the_schedulers_own_x0() -> None:
    """Two independent references: FlowMatchHeun's first-order `denoised`, DPM-Solver's flow conversion."""
    torch.manual_seed(0)
    x, v = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    heun = FlowMatchHeunDiscreteScheduler(shift=3.0)
    heun.set_timesteps(5)
    sigma = float(heun.sigmas[0])
    prev = heun.step(v, heun.timesteps[0], x, return_dict=False)[0]  # x + (x − x0)/σ · (σ_next − σ)
    x0 = x0_from_flow(v, x, noise_level(heun, heun.timesteps[0], 0).flow_sigma)
    torch.testing.assert_close(prev, x + (x - x0) / sigma * (float(heun.sigmas[1]) - sigma))
    dpm = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    dpm.set_timesteps(5)
    dpm._step_index = 1
    assert is_flow_matching(dpm) and prediction_type(dpm) == "flow_prediction"
    lvl = noise_level(dpm, dpm.timesteps[1], 1)
    torch.testing.assert_close(x0_from_flow(v, x, lvl.flow_sigma), dpm.convert_model_output(v, sample=x))
    assert prediction_type(heun) == "flow_prediction" and not is_flow_matching(tiny_pipeline("sd1").scheduler)


# ---- steps ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheduler", [FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler])
def test_steps_on_flow_schedulers_change_nothing_and_compute_x0(sd3_pipe, scheduler) -> None:
    sd3_pipe.scheduler = scheduler.from_config(sd3_pipe.scheduler.config)
    ref = sd3_pipe(P, generator=gen(0), guidance_scale=5.0, **KW).images
    with sdx.observe(sd3_pipe, steps={"quantities": "all", "dtype": torch.float32}) as obs:
        out = sd3_pipe(P, generator=gen(0), guidance_scale=5.0, **KW).images
    assert np.array_equal(out, ref)  # bitwise
    tr = obs.steps
    # the schedule, computed independently: the pipeline calls set_timesteps(4) on this config
    sched = scheduler.from_config(sd3_pipe.scheduler.config)
    sched.set_timesteps(4)
    evals = sched.sigmas[
        :-1
    ].tolist()  # the σ of each model evaluation (Heun: interleaved, 2 per step but 1st)
    assert len(tr) == len(sched.timesteps) == len(evals) and tr.prediction_type == "flow_prediction"
    assert tr.steps[0].sigma == math.inf and tr.steps[0].alpha_bar == 0.0  # s = 1: pure noise
    for rec, s, t in zip(tr.steps, evals, sched.timesteps.tolist(), strict=True):
        assert rec.x0_source == "computed" and rec.timestep == pytest.approx(t) == pytest.approx(1000 * s)
        assert rec.alpha_bar == pytest.approx((1 - s) ** 2 / ((1 - s) ** 2 + s**2))
        # CFG halves of the velocity: the guided prediction is u + g (c − u)
        torch.testing.assert_close(
            rec.noise_pred, rec.noise_uncond + 5.0 * (rec.noise_cond - rec.noise_uncond)
        )
        assert not torch.allclose(rec.noise_uncond, rec.noise_cond)
        torch.testing.assert_close(rec.x0, rec.latents - s * rec.noise_pred)  # x0 = x_t − σ·v
    if scheduler is FlowMatchEulerDiscreteScheduler:
        for rec, s, s_next in zip(tr.steps, evals, sched.sigmas[1:].tolist(), strict=True):
            torch.testing.assert_close(rec.latents_out, rec.latents + (s_next - s) * rec.noise_pred)
        torch.testing.assert_close(tr.final_latents, tr.steps[-1].x0)  # the last Euler step lands on x0


def test_previews_use_the_sd3_factors_and_decoding_undoes_the_shift(sd3_pipe, tmp_path) -> None:
    with sdx.observe(sd3_pipe, steps={"quantities": "all", "dtype": torch.float32}) as obs:
        image = sd3_pipe(P, generator=gen(0), **KW).images
    tr = obs.steps
    factors, bias = latent_rgb(sd3_pipe)
    for rec in tr.steps:
        want = to_uint8(latent_to_rgb(rec.x0, factors, bias))  # (1, 8, 8, 3)
        assert (rec.preview.int() - want.int()).abs().max() <= 1
        assert rec.preview.float().std() > 5  # a picture, not one grey
    from PIL import Image

    Image.fromarray(tr.steps[-1].preview[0].numpy()).resize((64, 64), Image.NEAREST).save(
        tmp_path / "preview.png"
    )
    # decode_with must add SD3's shift_factor back, as the pipeline does: its image equals the pipeline's own
    decoded = decode_with(sd3_pipe.vae, tr.final_latents)  # (1, 64, 64, 3) uint8
    assert np.abs(decoded.numpy().astype(int) - np.round(image * 255).astype(int)).max() <= 1


# ---- describe, load, restore ---------------------------------------------------------------------------------
def test_describe_sd3(sd3_pipe) -> None:
    d = sdx.describe(sd3_pipe, steps=10)
    names = {c.name for c in d.components}
    assert {
        "transformer",
        "vae",
        "text_encoder_3",
        "tokenizer_3",
        "scheduler",
    } <= names and "unet" not in names
    tr = next(c for c in d.components if c.name == "transformer")
    assert tr.parameters == sum(p.numel() for p in sd3_pipe.transformer.parameters())
    assert d.family == "sd3" and d.latent_shape == (16, 8, 8) and d.image_size == (64, 64)
    assert d.compression == 12.0 and d.prediction_type == "flow_prediction"
    assert len(d.timesteps) == 10 and d.timesteps[0] == 1000 and "SD3Transformer2DModel" in str(d)
    assert sdx.describe(tiny_pipeline("sd3", t5=False), steps=4).latent_shape == (16, 8, 8)


def test_load_pipeline_loads_a_saved_sd3_folder(sd3_pipe, tmp_path) -> None:
    sd3_pipe.save_pretrained(tmp_path / "sd3")
    pipe = sdx.load_pipeline(tmp_path / "sd3", device="cpu")
    assert sdx.detect_family(pipe) is SD3
    assert pipe.tokenizer_3.convert_ids_to_tokens(pipe.tokenizer_3("circle").input_ids) == [
        "▁cir",
        "cle",
        "</s>",
    ]


@pytest.mark.parametrize("fault", [None, RuntimeError, KeyboardInterrupt])
def test_restored_exactly_after_success_exception_and_interrupt(sd3_pipe, fault) -> None:
    sd3_pipe(P, generator=gen(0), **KW)  # diffusers' own first-call attributes exist before the snapshot
    before = pipeline_state(sd3_pipe)

    def explode(pipe, i, t, kwargs):
        if fault is not None and i == 2:
            raise fault("stop here")
        return kwargs

    def run():
        with sdx.observe(sd3_pipe, steps=True, guidance=[4.0] * 4, edit_latents=lambda i, x: x) as obs:
            assert type(sd3_pipe) is not before["cls"] and sd3_pipe.transformer._forward_hooks  # attached
            sd3_pipe(P, generator=gen(0), callback_on_step_end=explode, **KW)
        return obs

    if fault is None:
        obs = run()
        assert len(obs.steps) == 4
    else:
        with pytest.raises(fault):
            run()
    assert_restored(sd3_pipe, before)
    ref = tiny_pipeline("sd3")(P, generator=gen(0), **KW).images
    assert np.array_equal(sd3_pipe(P, generator=gen(0), **KW).images, ref)  # and it runs as before
