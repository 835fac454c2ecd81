"""sdexplore.directions: find, apply, save, walk and name directions (fast properties on tiny and embedded models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_restored, gen, pipeline_state

import sdexplore as sdx
from sdexplore import directions as D
from sdexplore.errors import (
    InvalidArgumentError,
    RecorderStateError,
    ResultFileError,
    UnsupportedPipelineError,
)
from sdexplore.fixtures import tiny_pipeline

PAIR = ("a red circle at the left", "a blue circle at the left")
KW = {"num_inference_steps": 4, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def sd1():
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def sd3():
    return tiny_pipeline("sd3")


def _image(pipe, prompt, seed=0, **kw):
    return pipe(prompt, generator=gen(seed), output_type="np", **{**KW, **kw}).images[0]


# ---- bad input: the library's own errors, before any work ---------------------------------------------------
@pytest.mark.parametrize(
    ("pairs", "space", "kw"),
    [
        ([], "text", {}),
        ("a red circle", "text", {}),
        ([("a red circle",)], "text", {}),
        ([("a red circle", 3)], "text", {}),
        ([("a red circle", "")], "text", {}),
        ([("a red circle", "a red circle")], "text", {}),
        ([PAIR], "pixels", {}),
        ([PAIR], "text", {"layer": "mid_block"}),
        ([PAIR], "inner", {"layer": "no.such.layer"}),
        ([PAIR], "inner", {"seeds": []}),
        ([PAIR], "inner", {"steps": [-1]}),
        ([PAIR], "inner", {"steps": [0, 4], "num_inference_steps": 4}),
    ],
)
def test_bad_pairs_are_refused_before_any_run(sd1, pairs, space, kw) -> None:
    calls = []
    hook = sd1.unet.register_forward_pre_hook(lambda *a: calls.append(1))  # counts denoiser calls
    try:
        with pytest.raises(InvalidArgumentError):
            D.from_pairs(sd1, pairs, space=space, **kw)
    finally:
        hook.remove()
    assert calls == []


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), "1", None, True])
def test_a_strength_that_is_not_a_finite_number_is_refused(sd1, strength) -> None:
    d = D.from_pairs(sd1, [PAIR])
    before = pipeline_state(sd1)
    with pytest.raises(InvalidArgumentError, match="finite number"):
        d.apply(sd1, strength=strength)
    assert_restored(sd1, before)


def test_an_unsupported_family_is_refused_naming_those_that_work() -> None:
    flux = tiny_pipeline("flux")
    with pytest.raises(UnsupportedPipelineError, match="Stable Diffusion 3"):
        D.from_pairs(flux, [PAIR])


def test_a_direction_from_another_family_is_refused(sd1, sd3) -> None:
    d = D.from_pairs(sd1, [PAIR])
    with pytest.raises(InvalidArgumentError, match="found on a sd1 model"):
        d.apply(sd3)


# ---- strength 0 is the plain image bit for bit; strength 1 moves a pair's first prompt onto its second -----------
@pytest.mark.parametrize("family", ["sd1", "sd3"])
@pytest.mark.parametrize("space", ["text", "inner"])
def test_zero_strength_is_the_plain_image_bit_for_bit_and_the_pipeline_is_restored(
    family, space, sd1, sd3
) -> None:
    pipe = {"sd1": sd1, "sd3": sd3}[family]
    d = D.from_pairs(pipe, [PAIR], space=space, seeds=[0], **(KW if space == "inner" else {}))
    plain = _image(pipe, "a red square at the top")
    before = pipeline_state(pipe)
    with d.apply(pipe, strength=0.0):
        zero = _image(pipe, "a red square at the top")
    assert_restored(pipe, before)
    assert np.array_equal(plain, zero)
    with d.apply(pipe, strength=0.5):
        half = _image(pipe, "a red square at the top")
    assert not np.array_equal(plain, half)  # a non-zero strength does change the image


@pytest.mark.parametrize("family", ["sd1", "sd3"])
def test_text_strength_one_moves_a_pairs_first_prompt_onto_its_second(family, sd1, sd3) -> None:
    pipe = {"sd1": sd1, "sd3": sd3}[family]
    d = D.from_pairs(pipe, [PAIR])
    if family == "sd3":
        assert d.pooled is not None  # SD3 takes a pooled text vector: it moves too
    with d.apply(pipe, strength=1.0):
        moved = _image(pipe, PAIR[0])
    target = _image(pipe, PAIR[1])
    other = _image(pipe, PAIR[0])
    assert np.abs(moved - target).max() < 1e-4 < np.abs(other - target).max()


def test_inner_strength_one_shifts_the_layer_by_the_difference_of_means(sd1) -> None:
    """Applied to the first prompt at the seed and steps it was found at, the layer's mean output over the
    chosen steps moves by exactly the found shift at its first step (later steps see other inputs)."""
    d = D.from_pairs(sd1, [PAIR], space="inner", seeds=[0], steps=[0], **KW)
    fam = sdx.families.detect_family(sd1)
    a, _ = D.find.generate_inner(sd1, fam, [PAIR[0]], [0], d.layer, [0], KW, 1)
    b, _ = D.find.generate_inner(sd1, fam, [PAIR[1]], [0], d.layer, [0], KW, 1)
    assert torch.allclose(d.shift, (b - a)[0])
    assert d.steps == [0] and d.num_steps == KW["num_inference_steps"]


# ---- save / load ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["text", "inner"])
def test_a_saved_direction_loads_back_equal_and_damage_is_refused(sd3, tmp_path, space) -> None:
    d = D.from_pairs(sd3, [PAIR], space=space, seeds=[0], **(KW if space == "inner" else {}), label="colour")
    path = d.save(tmp_path / "d.safetensors")
    e = D.load(path)
    assert isinstance(e, D.Direction) and (e.space, e.family, e.label, e.pairs) == (
        space,
        "sd3",
        "colour",
        [PAIR],
    )
    for name in ("embeds", "pooled", "shift"):
        a, b = getattr(d, name), getattr(e, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    with e.apply(sd3, strength=1.0):
        x = _image(sd3, PAIR[0])
    with d.apply(sd3, strength=1.0):
        y = _image(sd3, PAIR[0])
    assert np.array_equal(x, y)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0xFF  # a flipped byte in the last tensor
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(raw))
    with pytest.raises(ResultFileError):
        D.load(bad)
    with pytest.raises(ResultFileError):
        D.load(tmp_path / "missing.safetensors")


# ---- several directions, nesting, other subscribers --------------------------------------------------------------
def test_two_directions_at_once_add_and_a_second_block_is_refused(sd1) -> None:
    d = D.from_pairs(sd1, [PAIR])
    with D.apply(sd1, [(d, 0.5), (d, 0.5)]):
        both = _image(sd1, PAIR[0])
    with d.apply(sd1, strength=1.0):
        one = _image(sd1, PAIR[0])
        with pytest.raises(RecorderStateError), d.apply(sd1, strength=1.0):
            pass
    assert np.abs(both - one).max() < 1e-4


def test_steps_limit_when_a_direction_acts(sd1) -> None:
    d = D.from_pairs(sd1, [PAIR])
    with sdx.observe(sd1) as plain_obs:
        _image(sd1, PAIR[0])
    with sdx.observe(sd1) as obs, d.apply(sd1, strength=1.0, steps=[2, 3]):
        _image(sd1, PAIR[0])
    for i in range(2):  # steps before 2 are the plain run's, bit for bit
        assert torch.equal(obs.steps[i].x0, plain_obs.steps[i].x0)
    assert not torch.equal(obs.steps[2].x0, plain_obs.steps[2].x0)


def test_pca_gives_sorted_components_with_their_variance(sd1) -> None:
    comps = D.pca(
        sd1, ["a red circle at the left", "a blue square at the top"], seeds=[0, 1, 2], components=3, **KW
    )
    ve = [c.variance_explained for c in comps]
    assert len(comps) == 3 and ve == sorted(ve, reverse=True) and 0 < sum(ve) <= 1 + 1e-9
    shifts = torch.stack([c.shift[1].flatten() for c in comps])  # (3, HW·C)
    gram = (shifts / shifts.norm(dim=1, keepdim=True)) @ (shifts / shifts.norm(dim=1, keepdim=True)).T
    assert torch.allclose(gram, torch.eye(3), atol=1e-4)  # orthogonal components
    with pytest.raises(InvalidArgumentError, match="samples"):
        D.pca(sd1, "a red circle at the left", seeds=[0], components=3)


def test_walk_goes_from_minus_s_to_s_through_the_plain_image_and_exports(sd1, tmp_path) -> None:
    d = D.from_pairs(sd1, [PAIR])
    w = d.walk(sd1, "a red square at the top", strength=2.0, frames=3, **KW)
    assert w.settings["strengths"] == [-2.0, 0.0, 2.0] and len(w) == 3
    plain = (np.clip(np.round(_image(sd1, "a red square at the top") * 255), 0, 255)).astype(np.uint8)
    assert np.array_equal(w.images[1], plain)
    w.save_grid(tmp_path / "grid.png")
    again = type(w).load(w.save(tmp_path / "w.safetensors"))
    assert np.array_equal(again.images, w.images)


def test_the_inner_layer_is_refused_while_a_recorder_holds_it(sd3) -> None:
    d = D.from_pairs(sd3, [PAIR], space="inner", seeds=[0], **KW)
    with (
        sdx.observe(sd3, steps=False, attention=True),
        pytest.raises(RecorderStateError, match="already recorded"),
    ):
        d.apply(sd3).__enter__()


def test_the_explorer_shows_each_directions_frame_at_its_strength(sd1) -> None:
    from sdexplore.views.widgets.directions import DirectionExplorer

    d = D.from_pairs(sd1, [PAIR])
    walks = {"colour": d.walk(sd1, "a red square at the top", frames=3, **KW)}
    ex = DirectionExplorer(walks, static=False)
    ex.widget  # noqa: B018 - build it
    assert ex.widget.payload["directions"]["rows"][0]["name"] == "colour"
    assert np.array_equal(ex.frame("colour", 1.0), walks["colour"].images[2])
    fig = DirectionExplorer(walks, static=True).figure()
    assert len(fig.axes) == 3
    with pytest.raises(InvalidArgumentError):
        DirectionExplorer({})
