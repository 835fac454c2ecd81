"""sdexplore.directions.jacobian (Park et al. 2023): the top right-singular vectors of ∂h/∂x_t at a step, checked
against a dense Jacobian on the tiny fixtures; applied as a move of x_t (strength 0: the plain image, bit for bit)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_restored, gen, pipeline_state

from sdexplore import directions as D
from sdexplore.errors import InvalidArgumentError, ResultFileError, UnsupportedPipelineError
from sdexplore.families import detect_family
from sdexplore.fixtures import tiny_pipeline
from sdexplore.results.directions import DirectionData

PROMPT = "a red circle at the left"
KW = {"num_inference_steps": 4, "guidance_scale": 3.0}
STEP = 2


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def sd3():
    return tiny_pipeline("sd3")


@pytest.fixture(scope="module")
def found(sd1):
    return D.jacobian(sd1, PROMPT, step=STEP, k=3, iterations=30, **KW)


def _denoiser_inputs(pipe, step: int, seed: int = 0, **apply_kw):
    """The denoiser's (args, kwargs) at call ``step`` of a plain run (or one with a direction applied)."""
    den = detect_family(pipe).get_denoiser(pipe)
    calls = []
    hook = den.register_forward_pre_hook(
        lambda m, a, kw: calls.append((a, dict(kw))) if len(calls) <= step else None, with_kwargs=True
    )
    try:
        if apply_kw:
            with apply_kw["direction"].apply(pipe, apply_kw["strength"]):
                pipe(PROMPT, generator=gen(seed), output_type="latent", **KW)
        else:
            pipe(PROMPT, generator=gen(seed), output_type="latent", **KW)
    finally:
        hook.remove()
    return calls[step]


def _dense_jacobian(pipe, layer: str, step: int) -> torch.Tensor:
    """J (m, n) of the layer's conditional image-stream output with respect to the conditional row of the
    denoiser's input, by reverse mode over every output (an independent route from the JVP/VJP iteration)."""
    fam = detect_family(pipe)
    den, spec = fam.get_denoiser(pipe), fam.denoiser_args
    args, kwargs = _denoiser_inputs(pipe, step)
    rows = spec.get("sample", args, kwargs).shape[0]
    assert rows == 2  # CFG: the unconditional half first on SD1 and SD3

    def cond(v):
        if isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == rows:
            return v[1:]
        return v

    args, kwargs = tuple(cond(a) for a in args), {k: cond(v) for k, v in kwargs.items()}
    x = spec.get("sample", args, kwargs)  # (1, C, h, w)
    module = den.get_submodule(layer)
    box = []
    hook = module.register_forward_hook(
        lambda m, a, out: box.append(out[0] if isinstance(out, tuple) else out)
    )

    def g(x):
        box.clear()
        a, kw = spec.replace("sample", args, kwargs, x)
        den(*a, **kw)
        return box[0]

    try:
        jac = torch.autograd.functional.jacobian(g, x)  # (1, HW, C, 1, C_lat, h, w)
    finally:
        hook.remove()
    return jac.reshape(box[0].numel(), x.numel())  # (m, n)


# ---- what is found ---------------------------------------------------------------------------------------
def test_vectors_are_orthonormal_and_singular_values_sorted(found) -> None:
    assert len(found) == 3
    for i, d in enumerate(found):
        assert d.space == "latent" and d.method == "jacobian" and d.steps == [STEP] and d.num_steps == 4
        assert d.settings["component"] == i and d.shift.shape == (4, 8, 8)
    vecs = torch.stack([d.shift.reshape(-1) / d.settings["step_size"] for d in found]).double()  # (k, n)
    torch.testing.assert_close(vecs @ vecs.T, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    sigma = [d.settings["singular_value"] for d in found]
    assert sigma == sorted(sigma, reverse=True) and sigma[-1] > 0
    assert found[0].settings["singular_values"] == sigma
    assert sum(d.variance_explained for d in found) == pytest.approx(1.0)
    assert found[0].variance_explained > found[1].variance_explained


@pytest.mark.parametrize("family", ["sd1", "sd3"])
def test_singular_values_and_vectors_match_a_dense_jacobians_svd(request, family) -> None:
    pipe = request.getfixturevalue(family)
    ds = D.jacobian(pipe, PROMPT, step=STEP, k=3, iterations=40, **KW)
    jac = _dense_jacobian(pipe, ds[0].layer, STEP).double()
    _, s, vh = torch.linalg.svd(jac, full_matrices=False)
    found = torch.tensor([d.settings["singular_value"] for d in ds], dtype=torch.float64)
    torch.testing.assert_close(found, s[:3], rtol=1e-4, atol=0)
    # the same axes, up to sign (the tiny MMDiT's spectrum is nearly flat, 0.114, 0.112, 0.111, 0.109, ...: the
    # oversampled block still separates them)
    vecs = torch.stack([d.shift.reshape(-1).double() / d.settings["step_size"] for d in ds])  # (3, n)
    assert (vecs @ vh[:3].T).diagonal().abs().min() > 0.999


def test_the_same_seed_finds_the_same_vectors(sd1, found) -> None:
    again = D.jacobian(sd1, PROMPT, step=STEP, k=3, iterations=30, **KW)
    for a, b in zip(found, again, strict=True):
        torch.testing.assert_close(a.shift, b.shift, atol=1e-5, rtol=0)


# ---- applying ----------------------------------------------------------------------------------------------
def test_strength_zero_is_the_plain_image_bit_for_bit(sd1, found) -> None:
    before = pipeline_state(sd1)
    plain = sd1(PROMPT, generator=gen(3), output_type="np", **KW).images[0]
    with found[0].apply(sd1, strength=0.0):
        zero = sd1(PROMPT, generator=gen(3), output_type="np", **KW).images[0]
    with found[0].apply(sd1, strength=2.0):
        moved = sd1(PROMPT, generator=gen(3), output_type="np", **KW).images[0]
    assert (zero == plain).all()
    assert not (moved == plain).all()
    assert_restored(sd1, before)


def test_strength_moves_x_t_at_its_step_by_strength_times_shift(sd1, found) -> None:
    d = found[1]
    spec = detect_family(sd1).denoiser_args

    def sample(step, **kw):
        return spec.get("sample", *_denoiser_inputs(sd1, step, **kw))

    plain = sample(STEP)
    diff = (
        sample(STEP, direction=d, strength=-1.5) - plain
    )  # (2, C, h, w): both CFG halves see the same x_t (DDIM: unscaled)
    torch.testing.assert_close(diff, (-1.5 * d.shift).expand_as(diff), atol=1e-5, rtol=0)
    assert torch.equal(
        sample(STEP - 1, direction=d, strength=-1.5), sample(STEP - 1)
    )  # earlier steps untouched
    # strength 1 moves x_t by a tenth of its norm
    assert float(d.shift.norm()) == pytest.approx(0.1 * float(plain[1].norm()), rel=1e-4)


def test_a_latent_direction_saves_and_loads(tmp_path, sd1, found) -> None:
    path = found[0].save(tmp_path / "jac.safetensors")
    back = D.load(path)
    assert back.space == "latent" and back.method == "jacobian" and back.layer == found[0].layer
    assert torch.equal(back.shift, found[0].shift) and back.steps == [STEP]
    assert back.settings["singular_values"] == found[0].settings["singular_values"]
    plain = sd1(PROMPT, generator=gen(1), output_type="np", **KW).images[0]
    with found[0].apply(sd1, 1.0):
        a = sd1(PROMPT, generator=gen(1), output_type="np", **KW).images[0]
    with back.apply(sd1, 1.0):
        b = sd1(PROMPT, generator=gen(1), output_type="np", **KW).images[0]
    assert (a == b).all() and not (a == plain).all()


def test_a_latent_file_with_a_wrong_shape_is_refused_naming_the_field(tmp_path, found) -> None:
    flat = DirectionData(**{**found[0].__dict__, "shift": found[0].shift.reshape(4, -1)})  # (C, h·w): no grid
    path = flat.save(tmp_path / "flat.safetensors")
    with pytest.raises(ResultFileError, match="shift"):
        D.load(path)


def test_a_walk_along_a_latent_direction_has_the_plain_image_in_the_middle(sd1, found) -> None:
    walk = found[0].walk(sd1, PROMPT, strength=2.0, frames=3, seed=0, **KW)
    plain = sd1(PROMPT, generator=gen(0), output_type="np", **KW).images[0]
    frames = walk.images  # (3, H, W, 3) uint8
    assert walk.settings["strengths"] == [-2.0, 0.0, 2.0]
    assert np.abs(frames[1].astype(np.float32) / 255.0 - plain).max() <= 1 / 255 + 1e-6  # the plain image
    assert not np.array_equal(frames[0], frames[2])


def test_a_latent_direction_cannot_act_at_step_zero(sd1, found) -> None:
    with pytest.raises(InvalidArgumentError, match="step 0"):
        found[0].apply(sd1, 1.0, steps=[0, 1])


# ---- bad input: the library's own errors, before any work ---------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"step": 0},
        {"step": -1},
        {"step": 4, **KW},
        {"step": 50},  # the pipeline's default run has 50 steps
        {"step": 1.5},
        {"step": 1, "k": 0},
        {"step": 1, "k": 2.0},
        {"step": 1, "iterations": 0},
        {"step": 1, "seed": -1},
        {"step": 1, "layer": "no.such.layer"},
        {"step": 1, "prompt": ""},
        {"step": 1, "prompt": ["a", "b"]},
    ],
)
def test_bad_input_is_refused_before_any_denoiser_call(sd1, kw) -> None:
    kw = dict(kw)
    prompt = kw.pop("prompt", PROMPT)
    calls = []
    hook = sd1.unet.register_forward_pre_hook(lambda *a: calls.append(1))  # counts denoiser calls
    try:
        with pytest.raises(InvalidArgumentError):
            D.jacobian(sd1, prompt, **kw)
    finally:
        hook.remove()
    assert calls == []


def test_an_unsupported_family_is_refused() -> None:
    flux = tiny_pipeline("flux")
    calls = []
    hook = flux.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(UnsupportedPipelineError, match="Stable Diffusion 1.x.*Stable Diffusion 3"):
            D.jacobian(flux, PROMPT, step=1)
    finally:
        hook.remove()
    assert calls == []
