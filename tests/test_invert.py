"""sdexplore.invert: the inversion is diffusers' DDIM inverse step where that fits, each step's inverse solves the
generation step, the reconstruction is an observed pipe call, the pipeline is restored, bad input is refused early,
and on the embedded model a rendered scene comes back within 2 dB of the VAE's own round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_restored, pipeline_state

from sdexplore.embedded.scenes import render_scene
from sdexplore.errors import InvalidArgumentError, ResultFileError, UnsupportedPipelineError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.inversion import Inversion, _ddim_steps, invert, psnr

PROMPT = "a big red circle at the top left on a blue background"


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return render_scene(PROMPT, seed=3)[0]  # (64, 64, 3) uint8


def test_ddim_step_is_diffusers_inverse_scheduler(picture):
    """ε-prediction, no fixed-point passes: the trace is diffusers' own DDIMInverseScheduler loop, step by step."""
    from diffusers import DDIMInverseScheduler

    from sdexplore.images import encode_image

    pipe = tiny_pipeline("sd1")
    inv = invert(pipe, picture, "a red circle", steps=3, iterations=0)
    inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(3)
    emb = pipe.encode_prompt("a red circle", "cpu", 1, False)[0]
    x = encode_image(pipe, picture)
    for k, t in enumerate(inverse.timesteps):
        eps = pipe.unet(x, t, encoder_hidden_states=emb).sample
        x = inverse.step(eps, t, x).prev_sample
        torch.testing.assert_close(inv.trace[k + 1 : k + 2], x.float(), rtol=1e-4, atol=1e-4)
    assert inv.timesteps == [float(t) for t in reversed(inverse.timesteps.tolist())]


@pytest.mark.parametrize("family", ["sd2", "sdxl", "sd3", "flux", "flux2"])
def test_fixed_point_solves_each_generation_step(family, picture):
    """With fixed-point passes, one generation step from trace[k+1] lands on trace[k] (v-prediction, SDXL's
    extra conditioning, SD3's flow step, Flux.1's packed tokens and resolution-shifted schedule with its distilled
    guidance input, Flux.2's batch-norm latents): the reconstruction retraces the inversion."""
    pipe = tiny_pipeline(family)
    size = dict(height=64, width=64) if family.startswith("flux") else {}
    # Flux.1's second σ is 0.61 (its resolution shift): the fixed point needs more passes (8: 24.7 dB; 20: 55 dB)
    inv = invert(pipe, picture, "a red circle", steps=2, iterations=20 if family == "flux" else 8, **size)
    flow = family in ("sd3", "flux", "flux2")
    assert inv.trace.shape[0] == 3 and inv.method == ("flow" if flow else "ddim")
    torch.testing.assert_close(inv.latents, inv.trace[-1:])
    # a random-weight model regenerates its own inversion: the reconstruction is near the VAE round trip
    assert inv.psnr > inv.vae_psnr - 3.0, (inv.psnr, inv.vae_psnr)
    if flow:  # closer: the pipeline's own call regenerates the VAE round trip itself (a wrong schedule or
        # velocity call, e.g. the unshifted σ of Flux or the unnormalised Flux.2 latents, falls far below)
        from sdexplore.decoding import decode_with
        from sdexplore.flowedit import encode_picture

        round_trip = decode_with(pipe.vae, encode_picture(pipe, inv.image))[0].numpy()
        assert psnr(inv.reconstruction, round_trip) > 35.0, psnr(inv.reconstruction, round_trip)


def test_reconstruction_is_an_observed_call_and_the_pipeline_is_restored(picture):
    import sdexplore as sdx

    pipe = tiny_pipeline("sd1")
    pipe.scheduler = __import__("diffusers").EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe("warm-up", num_inference_steps=1, output_type="latent")  # a first call sets diffusers' own fields
    before = pipeline_state(pipe)
    for per_call in ("_guidance_scale", "_num_timesteps"):  # diffusers' own, set anew by every call
        before["pipe_vars"].pop(per_call)
    config = pipe.config
    with sdx.observe(pipe, steps=True, attention=True) as obs:
        inv = invert(pipe, picture, "a red circle", steps=3, guidance=2.0, method="negative-prompt")
    assert_restored(pipe, before)
    assert pipe.config is config  # the swap for the reconstruction never touched the pipeline's config
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # DDIM only for the reconstruction
    assert len(obs.steps) == 3  # one run: the reconstruction; the inversion's own calls are not recorded
    torch.testing.assert_close(
        obs.steps[0].latents[-1:].float(), inv.latents, rtol=0, atol=2e-3
    )  # stored in half
    assert "circle" in obs.attention.words
    assert (
        inv.settings["negative_prompt"] == "a red circle"
        and inv.pipe_kwargs()["negative_prompt"] == "a red circle"
    )


def test_bad_input_is_refused_before_any_work(picture, monkeypatch):
    pipe = tiny_pipeline("sd1")
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: pytest.fail("work started"))
    cases = [
        ({"method": "null"}, "choose one of"),
        ({"method": "flow"}, "does not fit"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"guidance": float("nan")}, "finite"),
        ({"guidance": -1.0}, "negative"),
        ({"iterations": -1}, "iterations"),
        ({"height": 60}, "positive multiple of 8"),  # the tiny SD1's VAE factor is 8
        ({"height": 0}, "positive multiple of 8"),
        ({"width": -64}, "positive multiple of 8"),
        ({"height": 64.0}, "positive multiple of 8"),
        ({"width": True}, "positive multiple of 8"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InvalidArgumentError, match=match):
            invert(pipe, picture, "a red circle", **kwargs)
    with pytest.raises(InvalidArgumentError, match="prompt must be a string"):
        invert(pipe, picture, ["a red circle"])
    with pytest.raises(InvalidArgumentError, match="not an image file"):
        invert(pipe, b"junk", "a red circle")
    with pytest.raises(UnsupportedPipelineError):
        invert(object(), picture)
    sd3 = tiny_pipeline("sd3")
    with pytest.raises(InvalidArgumentError, match="use method='flow'"):
        invert(sd3, picture, method="ddim")
    monkeypatch.setattr(sd3.vae, "encode", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(
        InvalidArgumentError, match=r"multiple of 16 \(the VAE's factor 8 × the transformer's 2×2"
    ):
        invert(sd3, picture, height=72)  # a multiple of the VAE's 8, not of 8 × the 2×2 patch
    with pytest.raises(InvalidArgumentError, match="limit of 256 pixels"):  # pos_embed_max_size 16 × 2 × 8
        invert(sd3, picture, width=272)
    flux = tiny_pipeline("flux")
    with pytest.raises(InvalidArgumentError, match="use method='flow'"):
        invert(flux, picture, method="negative-prompt", height=64, width=64)
    with pytest.raises(UnsupportedPipelineError, match="method='flow' or another"):
        invert(flux, picture, method="null-text", height=64, width=64)


def test_save_load_round_trip(tmp_path, picture):
    inv = invert(tiny_pipeline("sd1"), picture, "a red circle", steps=2)
    path = inv.save(tmp_path / "inv.safetensors")
    back = Inversion.load(path)
    torch.testing.assert_close(back.trace, inv.trace)
    np.testing.assert_array_equal(back.reconstruction, inv.reconstruction)
    assert (back.psnr, back.method, back.settings, back.timesteps) == (
        inv.psnr,
        "ddim",
        inv.settings,
        inv.timesteps,
    )
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # a flipped byte in the tensors
    path.write_bytes(bytes(data))
    with pytest.raises(ResultFileError):
        Inversion.load(path)


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    assert psnr(a, a) == float("inf")
    assert psnr(a, b) == pytest.approx(10 * np.log10(48))


@pytest.fixture(scope="module")
def embedded():
    import sdexplore as sdx

    return sdx.load_pipeline()


def test_embedded_inverts_at_a_non_default_size(embedded, picture, monkeypatch):
    """At 48×80 (the model's default is 64×64) the picture is encoded at that size and the inversion completes
    and reconstructs at it (before the fix the encoder read it at 64×64 and the PSNR failed to broadcast).
    Measured at 10 steps: 27.2 dB, the VAE's own round trip 27.1 dB."""
    inv = invert(embedded, picture, PROMPT, steps=10, height=48, width=80)
    assert inv.image.shape == inv.reconstruction.shape == (48, 80, 3)
    assert tuple(inv.latents.shape) == (1, 4, 12, 20)  # the VAE's factor is 4
    assert inv.psnr >= inv.vae_psnr - 2.0, (inv.psnr, inv.vae_psnr)
    # 60 is a multiple of the VAE's 4 but diffusers' SD pipeline takes multiples of 8: refused before any work
    monkeypatch.setattr(embedded.vae, "encode", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(InvalidArgumentError, match="positive multiple of 8 .*VAE's factor 4"):
        invert(embedded, picture, PROMPT, height=60)


def test_zero_terminal_snr_first_step_has_no_signal(embedded):
    """The embedded scheduler's first timestep has ᾱ = 0 (trailing spacing, zero terminal SNR): the step the
    fixed-point solve is for."""
    times, coeffs, empty = _ddim_steps(embedded.scheduler, 25)
    assert times[0] == 999 and empty == [True] + [False] * 24
    assert coeffs[0][0] > 0.99 and coeffs[0][1] < 0  # v-form: A = √(1 − ᾱ_s), B = −√ᾱ_s, not singular


@pytest.mark.slow
def test_embedded_reconstruction_within_2_db_of_the_vae(embedded):
    """Bars from benchmarks/bench_invert.py (RESULTS.md, "Inversion"): at CFG 1 with the default settings (25 steps,
    2 fixed-point passes) the reconstruction is within 2 dB of the VAE's round trip (measured here: 1.04 dB; mean
    over 12 held-out scenes 1.06 dB); negative-prompt inversion keeps it at CFG 3 while plain DDIM drops by far more
    (mean 15 dB below the VAE)."""
    prompt = "a big green square at the right on a yellow background"
    scene = render_scene(prompt, seed=11)[0]
    faithful = invert(embedded, scene, prompt)
    assert faithful.settings["iterations"] == 2 and faithful.settings["steps"] == 25
    assert faithful.psnr >= faithful.vae_psnr - 2.0, faithful
    npi = invert(embedded, scene, prompt, guidance=3.0, method="negative-prompt")
    assert abs(npi.psnr - faithful.psnr) < 0.5
    plain = invert(embedded, scene, prompt, guidance=3.0)
    assert plain.psnr < faithful.psnr - 5.0


SAME = "a big red circle at the left on a blue background"  # rendered twice: the jitter moves the circle a little


@pytest.fixture(scope="module")
def inverted_pair(embedded):
    """Two renders of one prompt (seeds 5 and 9), each inverted at 12 steps under observe (attention)."""
    import sdexplore as sdx

    out = []
    for seed in (5, 9):
        picture, coverage, _ = render_scene(SAME, seed=seed)
        with sdx.observe(embedded, steps=False, attention=True) as obs:
            inv = invert(embedded, picture, SAME, steps=12)
        out.append((inv, obs.attention, coverage))
    return out


def test_embedded_shape_word_attention_on_an_inverted_scene(embedded, inverted_pair):
    """The shape word's map on the reconstruction pass sits on the scene's true mask: IoU >= 0.45 (the issue's bar;
    measured 0.59 and 0.70 here at 12 steps; 48 held-out scenes at 25 steps: mean 0.50, big shapes 0.70, see
    RESULTS.md)."""
    from sdexplore.embedded.evaluate import attention_iou, shape_token_index, shape_word_maps

    for inv, maps, coverage in inverted_pair:
        amap = shape_word_maps(maps, [shape_token_index(embedded, SAME)])[0].numpy()  # (64, 64)
        assert attention_iou(amap, coverage > 0.5) >= 0.45
        assert inv.psnr >= inv.vae_psnr - 3.0  # 12 steps: measured gaps 2.39 and 1.93 dB


def test_embedded_walk_between_two_inverted_scenes(embedded, inverted_pair):
    """Endpoints within 1 dB of their reconstructions (measured: equal) and no jump: two renders of one prompt, so
    the walk only moves the circle; its steps are even (measured 1 - Gini 0.94, largest step 1.13x the mean).
    (Between scenes of different places or colours the model's discrete world jumps, in a prompt walk as much.)"""
    from sdexplore.inversion import psnr
    from sdexplore.walks import walk

    (a, _, _), (b, _, _) = inverted_pair
    w = walk(embedded, [a, b], frames=5, progress=False)
    assert (
        abs(psnr(w.images[0], a.image) - a.psnr) <= 1.0 and abs(psnr(w.images[-1], b.image) - b.psnr) <= 1.0
    )
    report = w.smoothness()
    assert report.smoothness >= 0.85 and report.max <= 1.5 * report.mean, report
