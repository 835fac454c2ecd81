"""Flux.1 (dev and schnell shapes): the family record, the tiny fixture, packed flow-matching steps, restore."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gen
from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

import sdexplore as sdx
from sdexplore.families import FLUX, latent_rgb
from sdexplore.fixtures import tiny_pipeline

P = "a red circle on a blue background"
KW = dict(num_inference_steps=4, height=64, width=64, output_type="np")


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
