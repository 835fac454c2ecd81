"""FlowEdit (Kulikov et al. 2025) through ``sdexplore.edit(..., method="flowedit")``: a target equal to the source
gives the picture's latents back exactly (V_Δ = 0 at every step); on the embedded tiny-shapes-mmdit a colour edit
of a rendered scene reads as the target and keeps the background; on the random SD3, Flux.1 and Flux.2 fixtures
it runs, is reproducible with the same generator and saves; bad input is refused before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdexplore as sdx
from sdexplore.embedded.scenes import read_scene, render_scene
from sdexplore.errors import InvalidArgumentError, UnsupportedPipelineError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.flowedit import (
    encode_picture,
    flow_schedule,
    flowedit_latents,
    velocity_model,
)
from sdexplore.results.edit import Edit

PROMPT = "a big red circle at the top left on a blue background"
SMALL = dict(num_inference_steps=4, height=64, width=64)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return render_scene(PROMPT, seed=3)[0]  # (64, 64, 3) uint8


@pytest.fixture(scope="module")
def fixtures() -> dict:
    return {f: tiny_pipeline(f) for f in ("sd3", "flux", "flux2")}


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2"])
def test_a_target_equal_to_the_source_returns_the_pictures_latents_exactly(family, fixtures, picture):
    """V_Δ = v(z_tar, p) − v(z_src, p) with z_tar = z_src while z_edit = x_src: zero at every step, so the latents
    come back bit for bit (a wrong z_tar, a sign error or a missing x_src term breaks it)."""
    pipe = fixtures[family]
    x = encode_picture(pipe, picture)  # (1, C, 8, 8)
    times, sigmas = flow_schedule(pipe, 6, 64, 64)
    v = velocity_model(pipe, "a red circle", 2.0, 64, 64)
    out = flowedit_latents(v, v, x, times, sigmas, n_max=6, n_avg=2, generator=gen())
    assert torch.equal(out.to(x.dtype), x)
    # through edit(): the edited picture is the source's VAE round trip, bit for bit
    res = sdx.edit(
        pipe, "a red circle", "a red circle", image=picture, method="flowedit", generator=gen(),
        source_guidance=2.0, target_guidance=2.0, **SMALL,
    )  # fmt: skip
    assert np.array_equal(np.asarray(res.edited), np.asarray(res.source))
    # another target moves the latents; so does the same prompt under another guidance (V_Δ ≠ 0)
    w = velocity_model(pipe, "a blue square", 2.0, 64, 64)
    assert not torch.equal(flowedit_latents(v, w, x, times, sigmas, n_max=6, generator=gen()).to(x.dtype), x)


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2"])
def test_flowedit_runs_on_each_flow_family_and_is_reproducible(family, fixtures, picture, tmp_path):
    pipe = fixtures[family]
    run = dict(image=picture, method="flowedit", **SMALL)
    a = sdx.edit(pipe, "a red circle", "a blue square", generator=gen(1), **run)
    b = sdx.edit(pipe, "a red circle", "a blue square", generator=gen(1), **run)
    c = sdx.edit(pipe, "a red circle", "a blue square", generator=gen(2), **run)
    assert isinstance(a, Edit) and a.source_maps is None and a.edited_maps is None
    assert np.array_equal(np.asarray(a.edited), np.asarray(b.edited))
    assert not np.array_equal(np.asarray(a.edited), np.asarray(c.edited))  # the noise is the generator's
    assert not np.array_equal(np.asarray(a.edited), np.asarray(a.source))
    s = a.settings
    assert (s["method"], s["family"], s["num_inference_steps"], s["n_min"], s["n_avg"]) == (
        "flowedit", family, 4, 0, 1,
    )  # fmt: skip
    assert 1 <= s["n_max"] <= 4
    back = Edit.load(a.save(tmp_path / "flowedit.safetensors"))
    assert np.array_equal(np.asarray(back.edited), np.asarray(a.edited)) and back.settings == a.settings


def test_n_min_samples_the_last_steps_and_n_max_skips_the_first(fixtures, picture):
    """n_min > 0 ends with plain sampling (another result); n_max = 1 edits only the last step (closer to the
    picture than n_max = 4)."""
    pipe = fixtures["sd3"]
    run = dict(image=picture, method="flowedit", **SMALL)
    full = sdx.edit(pipe, "a red circle", "a blue square", generator=gen(), n_max=4, **run)
    tail = sdx.edit(pipe, "a red circle", "a blue square", generator=gen(), n_max=4, n_min=2, **run)
    one = sdx.edit(pipe, "a red circle", "a blue square", generator=gen(), n_max=1, **run)
    assert not np.array_equal(np.asarray(full.edited), np.asarray(tail.edited))
    src = np.asarray(full.source, np.float64)
    assert np.abs(np.asarray(one.edited) - src).mean() < np.abs(np.asarray(full.edited) - src).mean()


def test_bad_input_is_refused_before_any_work(fixtures, picture, monkeypatch):
    pipe = fixtures["sd3"]
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: pytest.fail("work started"))
    run = dict(image=picture, method="flowedit")
    cases = [
        (dict(n_min=3, n_max=2), "n_min=3 > n_max=2"),
        (dict(n_avg=0), "n_avg=0"),
        (dict(n_avg=1.5), "n_avg=1.5"),
        (dict(n_max=0), "n_max=0"),
        (dict(n_max=30, num_inference_steps=10), "n_max=30"),
        (dict(n_min=-1), "n_min=-1"),
        (dict(source_guidance=float("nan")), "source_guidance"),
        (dict(target_guidance=-1.0), "target_guidance"),
        (dict(num_inference_steps=0), "num_inference_steps=0"),
        (dict(guidance_scale=3.0), "source_guidance= and target_guidance="),
        (dict(reweight={"circle": 0.0}), "reweight: not taken"),
        (dict(latents=torch.zeros(1, 16, 8, 8)), "latents: not taken"),
        (dict(num_images_per_prompt=2), "num_images_per_prompt"),
        (dict(negative_prompt="x"), "negative_prompt"),
        (dict(height=72), "multiple of 16"),
        (dict(generator=[gen()]), "one torch.Generator"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InvalidArgumentError, match=match):
            sdx.edit(pipe, "a red circle", "a blue circle", **{**run, **kwargs})
    with pytest.raises(InvalidArgumentError, match="needs a target prompt"):
        sdx.edit(pipe, "a red circle", **run)
    with pytest.raises(InvalidArgumentError, match="pass image=picture"):
        sdx.edit(pipe, "a red circle", "a blue circle", method="flowedit")
    with pytest.raises(InvalidArgumentError, match="one plain source prompt"):
        sdx.edit(pipe, ["a red circle"], ["a blue circle"], **run)
    with pytest.raises(InvalidArgumentError, match="not an image file"):
        sdx.edit(pipe, "a red circle", "a blue circle", image=b"junk", method="flowedit")
    with pytest.raises(InvalidArgumentError, match="method='fast'"):
        sdx.edit(pipe, "a red circle", "a blue circle", image=picture, method="fast")
    with pytest.raises(InvalidArgumentError, match="pass method='flowedit' with them"):
        sdx.edit(pipe, "a red circle", "a blue circle", n_max=3)
    unet = tiny_pipeline("sd1")
    with pytest.raises(UnsupportedPipelineError, match=r"Stable Diffusion 3 / 3\.5, Flux\.1 and Flux\.2\."):
        sdx.edit(unet, "a red circle", "a blue circle", **run)


@pytest.fixture(scope="module")
def mmdit():
    torch.set_num_threads(1)
    return sdx.load_pipeline("tiny-shapes-mmdit")


def _psnr_outside(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    d = (a.astype(np.float64) - b.astype(np.float64))[~mask]
    return float(10 * np.log10(255.0**2 / max(float((d**2).mean()), 1e-10)))


def test_embedded_mmdit_colour_edit_reads_as_the_target_and_keeps_the_background(mmdit, picture):
    """Red → blue circle on a rendered scene (yellow background, the paper's settings scaled to 20 steps): the
    edit reads blue, in place, and the background outside both shapes stays ≥ 25 dB (measured 32.6 dB with the
    paper's guidance 3.5 / 13.5; 6 held-out scenes in benchmarks/bench_flowedit.py)."""
    prompt = "a big red circle at the top left on a yellow background"
    scene = render_scene(prompt, seed=4)[0]
    res = sdx.edit(
        mmdit, prompt, prompt.replace("red circle", "blue circle"), image=scene, method="flowedit",
        generator=gen(), num_inference_steps=20,
    )  # fmt: skip
    source, edited = read_scene(scene), read_scene(np.asarray(res.edited))
    assert (edited.colour, edited.shape, edited.place, edited.background) == (
        "blue", source.shape, source.place, source.background,
    ), edited  # fmt: skip
    assert _psnr_outside(np.asarray(res.edited), scene, source.mask | edited.mask) >= 25.0


@pytest.mark.parametrize("family", ["sd3", "flux", "flux2"])
def test_the_schedule_is_the_one_the_pipelines_own_call_uses(family, fixtures):
    """Flux.1's and Flux.2's σ depend on the image's token count (their own shift rules): flow_schedule gives
    exactly the σ a plain call at that size ends up with."""
    pipe = fixtures[family]
    for size in (64, 128):
        pipe(prompt="a red circle", num_inference_steps=5, height=size, width=size, output_type="latent")
        times, sigmas = flow_schedule(pipe, 5, size, size)
        assert sigmas == pipe.scheduler.sigmas.double().tolist()
        assert times == [float(t) for t in pipe.scheduler.timesteps.tolist()]


def test_inside_observe_flowedit_warns_of_nothing_and_the_pipeline_is_restored(fixtures, picture):
    """FlowEdit's velocity calls are no pipeline call: an enclosing observe records nothing and says nothing."""
    import warnings

    from conftest import assert_restored, pipeline_state

    pipe = fixtures["flux"]
    before = pipeline_state(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with sdx.observe(pipe, steps=True) as obs:
            sdx.edit(pipe, "a red circle", "a blue circle", image=picture, method="flowedit", **SMALL)
    assert len(obs.runs) == 0
    assert_restored(pipe, before)
