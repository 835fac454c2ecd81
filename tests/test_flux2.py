"""Flux.2 [klein]: the family record, the offline Qwen tokenizer and tiny fixture, packed 128-channel flow-matching
steps with CFG as two transformer calls, token labels of the chat-templated prompt, steering, restore."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_restored, gen, pipeline_state
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Pipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

import sdexplore as sdx
from sdexplore.decoding import decode_with
from sdexplore.errors import UnsupportedPipelineError, WordNotFoundError
from sdexplore.families import FLUX2, latent_rgb
from sdexplore.fixtures import qwen_tokenizer, tiny_pipeline
from sdexplore.preview import latent_to_rgb, to_uint8
from sdexplore.record.steering import PromptSwitch
from sdexplore.record.steps import StepRecorder
from sdexplore.record.tokens import sequence_tokens

P, Q = "a red circle on a blue background", "a green square"
# a short Qwen sequence keeps the tests fast (the pipeline's default is 512 positions)
KW = dict(num_inference_steps=4, height=64, width=64, output_type="np", max_sequence_length=32)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("flux2")


def _unpack_as_diffusers(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Packed tokens (B, h/2 · w/2, 128) → (B, 32, h, w) with diffusers' own Flux.2 functions (no batch norm)."""
    ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(tokens.shape[0], 1, h // 2, w // 2))
    return Flux2KleinPipeline._unpatchify_latents(Flux2KleinPipeline._unpack_latents_with_ids(tokens, ids))


# ---- the family record ---------------------------------------------------------------------------------------
def test_flux2_record_detection_and_comfyui_factors(pipe) -> None:
    fam = sdx.detect_family(pipe)
    assert fam is FLUX2 and fam.get_denoiser(pipe) is pipe.transformer
    assert sdx.detect_family(Flux2Pipeline(**pipe.components)) is FLUX2  # the same transformer and VAE
    # 32 VAE channels, 2×2-patchified into the transformer's 128 input channels
    assert fam.latent_channels == pipe.vae.config.latent_channels == 32
    assert pipe.transformer.config.in_channels == fam.latent_channels * fam.latent_packing**2 == 128
    assert not fam.cfg_batch and not fam.pooled_text_embeds and not fam.has_distilled_guidance(pipe)
    factors, bias = latent_rgb(pipe)  # ComfyUI's class Flux2: 32 rows, spot values and the bias
    assert factors.shape == (32, 3)
    assert factors[3].tolist() == pytest.approx([0.2144, 0.3009, 0.3652])
    assert factors[31].tolist() == pytest.approx([-0.0111, -0.0460, -0.0614])
    assert bias.tolist() == pytest.approx([-0.0329, -0.0718, -0.0851])


def test_packing_is_diffusers_patchify_then_pack() -> None:
    x = torch.randn(2, 32, 6, 10)  # not square: 3×5 tokens
    packed = FLUX2.pack_latents(x)
    want = Flux2KleinPipeline._pack_latents(Flux2KleinPipeline._patchify_latents(x))  # (2, 15, 128)
    assert torch.equal(packed, want)
    assert torch.equal(FLUX2.unpack_latents(packed, (6, 10)), x)
    assert torch.equal(_unpack_as_diffusers(packed, 6, 10), x)


def test_denoiser_args_follow_flux2_forward() -> None:
    spec = FLUX2.denoiser_args
    positional = ("x", "text", "t", "img", "txt", "g")  # Flux2Transformer2DModel.forward's order
    got = [spec.get(w, positional, {}) for w in ("sample", "text", "timestep", "positions", "guidance")]
    assert got == ["x", "text", "t", "img", "g"] and spec.get("pooled", positional, {}) is None
    assert spec.replace("text", positional, {}, "new")[0][1] == "new"


def test_encode_prompt_reads_the_qwen_stack(pipe) -> None:
    enc = FLUX2.encode_prompt(pipe, P, device="cpu", max_sequence_length=32)
    embeds, text_ids = pipe.encode_prompt(P, device="cpu", max_sequence_length=32)
    assert torch.equal(enc.embeds, embeds) and enc.embeds.shape == (1, 32, 48)  # 3 layers × 16 features
    assert text_ids.shape == (1, 32, 4) and enc.pooled is None and enc.negative is None  # ids are not pooled
    with pytest.raises(ValueError, match="clip_skip"):
        FLUX2.encode_prompt(pipe, P, device="cpu", clip_skip=1)


# ---- the offline tokenizer and the fixture -------------------------------------------------------------------
def test_qwen_tokenizer_splits_words_renders_qwen3s_template_and_encodes_anything() -> None:
    tok = qwen_tokenizer()
    pieces = tok.convert_ids_to_tokens(tok(P).input_ids)
    assert pieces == ["a", "Ġred", "Ġcir", "cle", "Ġon", "Ġa", "Ġblue", "Ġback", "ground"]
    text = tok.apply_chat_template(
        [{"role": "user", "content": "a cat"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert (
        tok.pad_token == "<|endoftext|>"
        and tok.convert_ids_to_tokens(tok(text).input_ids)[0] == "<|im_start|>"
    )
    odd = "Zürich 42 — ok?"  # byte-level: no unknown token, decodes back exactly
    assert tok.decode(tok(odd).input_ids) == odd


def test_flux2_fixture_is_deterministic_independent_and_flow_matching(pipe) -> None:
    other = tiny_pipeline("flux2")
    assert (
        isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
        and pipe.scheduler.config.use_dynamic_shifting
    )
    assert other.transformer is not pipe.transformer and not pipe.config.is_distilled
    assert pipe.vae.bn.running_var.std() > 0.1 and pipe.vae.bn.running_mean.abs().max() > 0.1  # not 0 / 1
    assert len(pipe.text_encoder.model.layers) == 27  # hidden states 9, 18, 27 exist
    a = pipe(prompt=P, generator=gen(0), **KW).images
    b = other(prompt=P, generator=gen(0), **KW).images
    c = pipe(prompt=P, generator=gen(1), **KW).images
    assert a.shape == (1, 64, 64, 3) and np.array_equal(a, b) and np.abs(a - c).max() > 1e-3
    with pytest.raises(ValueError, match="flow-matching"):
        tiny_pipeline("flux2", prediction_type="epsilon")
    with pytest.raises(ValueError, match="T5"):
        tiny_pipeline("flux2", t5=False)


# ---- token labels --------------------------------------------------------------------------------------------
def test_sequence_tokens_label_the_chat_templated_prompt_the_encoder_sees(pipe) -> None:
    seen = []
    h = pipe.text_encoder.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"][0].tolist()), with_kwargs=True
    )
    try:
        embeds, _ = pipe.encode_prompt(P, device="cpu", max_sequence_length=32)
    finally:
        h.remove()
    tl = sequence_tokens(pipe, P, max_sequence_length=32)
    assert tl.ids == seen[0] and len(tl.ids) == embeds.shape[1]  # one label per position the transformer sees
    assert tl.kinds[:3] == ["bos"] * 3 and tl.pieces[:2] == ["<|im_start|>", "user"]  # the template's head
    assert tl.words == ["a", "red", "circle", "on", "a", "blue", "background"]
    circle = tl.positions("circle")
    assert [tl.pieces[i] for i in circle] == ["Ġcir", "cle"]  # two pieces merged into one word
    assert "assistant" in tl.pieces and tl.kinds[-1] == "pad"
    for word in ("user", "assistant", "think"):  # the template is not the prompt
        with pytest.raises(WordNotFoundError):
            tl.positions(word)
    assert len(sequence_tokens(pipe, P).ids) == 512  # the pipeline's default length
    short = sequence_tokens(pipe, P, max_sequence_length=10)
    assert short.truncated == ["Ġback", "ground"] and short.words[-1] == "blue"
    with pytest.raises(UnsupportedPipelineError, match="Flux2KleinPipeline"):
        sequence_tokens(Flux2Pipeline(**pipe.components), P)


def test_inspect_prompt_lists_the_qwen_sequence_the_transformer_sees(pipe) -> None:
    info = sdx.inspect_prompt(pipe, P, max_sequence_length=32)
    embeds = FLUX2.encode_prompt(pipe, P, device="cpu", max_sequence_length=32).embeds[0]  # (32, 3·D)
    labels = sequence_tokens(pipe, P, max_sequence_length=32)
    assert info.ids == labels.ids and info.tokens == labels.pieces and info.family == "flux2"
    torch.testing.assert_close(info.embeds, embeds)
    assert info.encoders == ("text_encoder",) and info.encoder_norms.shape == (1, 32)
    torch.testing.assert_close(info.encoder_norms[0], embeds.norm(dim=-1))
    assert info.pooled is None and info.n_words == 9  # 7 words; "circle" and "background" are two pieces each
    assert info.labels.positions("circle") == labels.positions("circle")
    assert "Ġcir" in info.table() and "qwen" in info.side_by_side()
    cmp = sdx.compare_prompts(pipe, P, Q, max_sequence_length=32)
    assert cmp.pooled is None and cmp.per_token.shape == (32,)
    with pytest.raises(UnsupportedPipelineError, match="Flux2KleinPipeline"):
        sdx.inspect_prompt(Flux2Pipeline(**pipe.components), P)


# ---- steps ---------------------------------------------------------------------------------------------------
def _expected_sigmas(steps: int, tokens: int) -> list[float]:
    """The σ of each model evaluation, computed here as Flux2KleinPipeline computes it: sigmas linspace(1, 1/n, n)
    shifted exponentially by its empirical mu (which depends on the token count and the number of steps)."""
    mu = compute_empirical_mu(tokens, steps)
    s = np.linspace(1.0, 1 / steps, steps)
    return (math.exp(mu) / (math.exp(mu) + (1 / s - 1))).tolist()


def test_steps_change_nothing_record_both_cfg_calls_and_compute_x0_with_the_shift(pipe) -> None:
    kw = dict(KW, width=80)  # an 8×10 latent: 4×5 packed tokens, not square
    ref = pipe(prompt=P, generator=gen(0), **kw).images
    seen = []
    with sdx.observe(pipe, steps={"quantities": "all", "dtype": torch.float32}) as obs:
        out = pipe(
            prompt=P,
            generator=gen(0),
            callback_on_step_end=lambda p, i, t, k: seen.append(k["latents"]) or k,
            **kw,
        ).images
    assert np.array_equal(out, ref)  # bitwise
    tr = obs.steps
    assert len(tr) == 4 and tr.family == "flux2" and tr.prediction_type == "flow_prediction"
    assert tr.guidance_scales.tolist() == [4.0] * 4  # Klein's default guidance_scale: CFG as two calls
    for rec, s, packed in zip(tr.steps, _expected_sigmas(4, 20), seen, strict=True):
        assert rec.latents.shape == rec.x0.shape == rec.noise_pred.shape == (1, 32, 8, 10)  # unpacked
        assert rec.timestep == pytest.approx(1000 * s, rel=1e-5) and rec.x0_source == "computed"
        torch.testing.assert_close(rec.x0, rec.latents - s * rec.noise_pred)  # x0 = x_t − σ·v, σ shifted
        torch.testing.assert_close(
            rec.noise_pred, rec.noise_uncond + 4.0 * (rec.noise_cond - rec.noise_uncond)
        )
        assert not torch.allclose(rec.noise_uncond, rec.noise_cond)
        assert torch.equal(rec.latents_out, _unpack_as_diffusers(packed, 8, 10))  # the pipeline's own latents
        want = to_uint8(latent_to_rgb(rec.x0, *latent_rgb(pipe)))  # previews: ComfyUI's factors on x0
        assert (rec.preview.int() - want.int()).abs().max() <= 1 and rec.preview.shape == (1, 8, 10, 3)
    torch.testing.assert_close(tr.final_latents, tr.steps[-1].x0)  # the last Euler step (σ → 0) lands on x0
    decoded = decode_with(pipe.vae, tr.final_latents)  # batch-norm statistics undone as the pipeline does
    assert np.abs(decoded.numpy().astype(int) - np.round(out * 255).astype(int)).max() <= 1


def test_without_cfg_one_call_per_step(pipe) -> None:
    calls = []
    h = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        with sdx.observe(pipe, steps={"quantities": "all"}) as obs:
            pipe(prompt=P, generator=gen(0), guidance_scale=1.0, **KW)
    finally:
        h.remove()
    assert len(calls) == 4 and obs.steps.guidance_scales.tolist() == [1.0] * 4
    assert all(r.noise_uncond is None for r in obs.steps.steps)


# ---- steering ------------------------------------------------------------------------------------------------
def test_prompt_switch_replaces_only_the_prompts_call_and_stop_at_k(pipe) -> None:
    texts = []
    with StepRecorder(pipe, quantities="all", dtype=torch.float32, switch_prompt=PromptSwitch(2, Q)):
        # registered after sdexplore's pre-hook: it sees what the steering handed on
        h = pipe.transformer.register_forward_pre_hook(
            lambda m, a, kw: texts.append(kw["encoder_hidden_states"].clone()), with_kwargs=True
        )
        try:
            pipe(prompt=P, generator=gen(0), **KW)
        finally:
            h.remove()
    old, new, empty = (
        FLUX2.encode_prompt(pipe, t, device="cpu", max_sequence_length=32).embeds for t in (P, Q, "")
    )
    assert len(texts) == 8  # two calls per step: the prompt's, then the empty negative's
    for i in range(4):
        torch.testing.assert_close(texts[2 * i], new if i >= 2 else old)
        torch.testing.assert_close(texts[2 * i + 1], empty)  # the negative call is left alone
    with StepRecorder(pipe, quantities="all", dtype=torch.float32) as full:
        pipe(prompt=P, generator=gen(0), **KW)
    with StepRecorder(pipe, quantities="all", dtype=torch.float32, stop_at=2) as rec:
        pipe(prompt=P, generator=gen(0), **KW)
    assert len(rec.trace) == 2 and pipe._interrupt is False
    torch.testing.assert_close(rec.trace.final_latents, full.trace[1].latents_out)
    with pytest.raises(ValueError, match="guidance"):  # Klein's CFG has no distilled input to schedule
        with StepRecorder(pipe, guidance=[2.0] * 4):
            pipe(prompt=P, generator=gen(0), **KW)


@pytest.mark.parametrize("fault", [None, RuntimeError, KeyboardInterrupt])
def test_restored_exactly_after_success_exception_and_interrupt(fault) -> None:
    pipe = tiny_pipeline("flux2")
    kw = dict(KW, num_inference_steps=3)
    ref = pipe(
        prompt=P, generator=gen(0), **kw
    ).images  # diffusers' first-call attributes exist before the snapshot
    before = pipeline_state(pipe)

    def explode(p, i, t, kwargs):
        if fault is not None and i == 2:
            raise fault("stop here")
        return kwargs

    def run():
        with sdx.observe(
            pipe, steps=True, edit_latents=lambda i, x: x, switch_prompt=PromptSwitch(1, Q)
        ) as obs:
            assert type(pipe) is not before["cls"] and pipe.transformer._forward_hooks  # attached
            pipe(prompt=P, generator=gen(0), callback_on_step_end=explode, **kw)
        return obs

    if fault is None:
        assert len(run().steps) == 3
    else:
        with pytest.raises(fault):
            run()
        pipe._current_timestep = (
            None  # the pipeline's own per-step attribute (a plain call that raises leaves it)
        )
    assert_restored(pipe, before)
    assert np.array_equal(pipe(prompt=P, generator=gen(0), **kw).images, ref)  # and it runs as before


def test_load_pipeline_loads_a_saved_flux2_folder(pipe, tmp_path) -> None:
    pipe.save_pretrained(tmp_path / "flux2")
    loaded = sdx.load_pipeline(tmp_path / "flux2", device="cpu")
    assert type(loaded) is Flux2KleinPipeline and sdx.detect_family(loaded) is FLUX2
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.tokenizer("a circle").input_ids) == [
        "a",
        "Ġcir",
        "cle",
    ]
    assert (
        sequence_tokens(loaded, P, max_sequence_length=32).ids
        == sequence_tokens(pipe, P, max_sequence_length=32).ids
    )


def test_flux2pipeline_shares_the_record_steps_with_its_distilled_guidance_input(pipe) -> None:
    # Flux2Pipeline's Mistral-3 encoder cannot be built offline; with prompt_embeds it needs none, and its
    # transformer, VAE and latent layout are Klein's
    embeds = FLUX2.encode_prompt(pipe, P, device="cpu", max_sequence_length=32).embeds
    parts = {k: v for k, v in pipe.components.items() if k not in ("text_encoder", "tokenizer")}
    dev = Flux2Pipeline(text_encoder=None, tokenizer=None, **parts)
    dev.set_progress_bar_config(disable=True)
    kw = dict(KW, prompt_embeds=embeds, guidance_scale=2.5, num_inference_steps=3)
    del kw["max_sequence_length"]
    ref = dev(generator=gen(0), **kw).images
    with sdx.observe(dev, steps={"quantities": "all", "dtype": torch.float32}) as obs:
        out = dev(generator=gen(0), **kw).images
    assert np.array_equal(out, ref) and obs.steps.family == "flux2"
    assert obs.steps.guidance_scales.tolist() == [2.5] * 3  # the guidance input, one call per step
    assert obs.steps[0].latents.shape == (1, 32, 8, 8) and obs.steps[0].noise_uncond is None
