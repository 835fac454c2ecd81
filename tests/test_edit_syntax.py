"""sdexplore.edit's prompt syntax (compel's parser): weights and swaps become attention edits on plain words.

"(red)1.5" / "red++" reweight the word's cross-attention in the edited image (Prompt-to-Prompt reweighting, the
same as reweight={"red": 1.5}, bit for bit); "red.swap(blue)" is the source/target pair of a word swap; the
maps of both branches are labelled with the plain words; bad syntax is refused before any work.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import assert_restored, gen, pipeline_state

import sdexplore as sdx
from sdexplore.editing import parse_syntax
from sdexplore.errors import InvalidArgumentError, WordNotFoundError
from sdexplore.fixtures import tiny_pipeline

pytest.importorskip("compel")

P = "a big red circle on a blue background"
Q = "a big blue circle on a blue background"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd1")


def _latents(pipe) -> torch.Tensor:
    den = pipe.unet
    return torch.randn(
        (1, den.config.in_channels, den.config.sample_size, den.config.sample_size), generator=gen(0)
    )


def _a(image) -> np.ndarray:
    return np.asarray(image)


@pytest.mark.parametrize(
    ("prompt", "plain", "target", "weights"),
    [
        ("a big (red)1.5 circle on a blue background", P, None, {"red": 1.5}),
        ("a big red++ circle on a blue background", P, None, {"red": pytest.approx(1.21)}),
        ("a big red-- circle on a blue background", P, None, {"red": pytest.approx(0.81)}),
        ("a (big red)0 circle on a blue background", P, None, {"big red": 0.0}),
        ("a big red.swap(blue) circle on a blue background", P, Q, {}),
        ("a big (red).swap((blue)2) circle on a blue background", P, Q, {"blue": 2.0}),
        ('a big "red".swap("dark blue") circle', "a big red circle", "a big dark blue circle", {}),
        ("a big (red)1.0 circle on a blue background", P, None, {}),
    ],
)
def test_the_syntax_becomes_plain_prompts_and_word_weights(prompt, plain, target, weights) -> None:
    assert parse_syntax(prompt) == (plain, target, weights)


def test_a_weight_is_an_attention_reweight_bit_for_bit_and_the_maps_say_the_plain_word(pipe) -> None:
    x = _latents(pipe)
    res = sdx.edit(pipe, "a big (red)1.5 circle on a blue background", latents=x, num_inference_steps=4)
    ref = sdx.edit(pipe, P, reweight={"red": 1.5}, latents=x, num_inference_steps=4)
    assert np.array_equal(_a(res.edited), _a(ref.edited)) and np.array_equal(_a(res.source), _a(ref.source))
    assert not np.array_equal(_a(res.edited), _a(res.source))
    assert res.source_prompt == res.edited_prompt == P and res.settings["reweight"] == {"red": 1.5}
    assert (
        res.settings["syntax"] == "a big (red)1.5 circle on a blue background"
        and ref.settings["syntax"] is None
    )
    assert res.edited_maps.token_lists[0].words == [
        "a",
        "big",
        "red",
        "circle",
        "on",
        "a",
        "blue",
        "background",
    ]
    assert float(res.edited_maps.word("red").sum()) > float(res.source_maps.word("red").sum())
    # a weight of 1 is no edit at all: the edited image is the source bit for bit
    same = sdx.edit(pipe, "a big (red)1.0 circle on a blue background", latents=x, num_inference_steps=4)
    assert np.array_equal(_a(same.edited), _a(same.source)) and np.array_equal(
        _a(same.source), _a(ref.source)
    )


def test_a_swap_is_the_word_swap_of_its_two_prompts(pipe) -> None:
    x = _latents(pipe)
    res = sdx.edit(pipe, "a big red.swap(blue) circle on a blue background", latents=x, num_inference_steps=4)
    ref = sdx.edit(pipe, P, Q, latents=x, num_inference_steps=4)
    assert (res.source_prompt, res.edited_prompt, res.settings["mode"]) == (P, Q, "replace")
    assert np.array_equal(_a(res.edited), _a(ref.edited))
    assert "blue" in res.edited_maps.token_lists[0].words and "red" in res.source_maps.token_lists[0].words
    # a swap to more words is a refinement
    longer = sdx.edit(pipe, 'a big red.swap("dark red") circle', latents=x, num_inference_steps=2)
    assert longer.settings["mode"] == "refine" and longer.edited_prompt == "a big dark red circle"


@pytest.mark.parametrize(
    ("prompt", "kwargs", "error", "match"),
    [
        (
            '("a red circle", "a blue square").blend(1)',
            {},
            InvalidArgumentError,
            "mismatched",
        ),  # compel's words
        ('("a red circle", "a blue square").blend(1, 1)', {}, InvalidArgumentError, "blend"),
        ('("a red circle", "a blue square").and()', {}, InvalidArgumentError, "conjunction"),
        ("a big red.swap(blue, t_start=0.5) circle", {}, InvalidArgumentError, "cross_replace"),
        (
            "a big red.swap(blue) circle",
            {"target": "a big green circle"},
            InvalidArgumentError,
            "one of them",
        ),
        ("a big (red)" + "9" * 400 + " circle", {}, InvalidArgumentError, "finite"),  # an infinite weight
        ("a big (red)1.5 circle", {"reweight": {"circle": float("nan")}}, InvalidArgumentError, "finite"),
        ("a big (red)1.5 circle", {"reweight": {"circle": -1.0}}, InvalidArgumentError, "finite"),
        ("a big (red)1.5 circle", {"reweight": {"square": 2.0}}, WordNotFoundError, "square"),
    ],
)
def test_bad_syntax_and_weights_are_refused_before_any_work(pipe, prompt, kwargs, error, match) -> None:
    before = pipeline_state(pipe)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(error, match=match):
            sdx.edit(pipe, prompt, generator=gen(0), num_inference_steps=2, **kwargs)
    finally:
        hook.remove()
    assert not calls
    assert_restored(pipe, before)


def test_without_compel_syntax_is_refused_naming_the_extra_and_plain_prompts_still_work(
    pipe, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "compel", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "compel.prompt_parser", None)
    with pytest.raises(InvalidArgumentError, match=r"sdexplore\[edit\]"):
        sdx.edit(pipe, "a big (red)1.5 circle", num_inference_steps=2)
    res = sdx.edit(
        pipe, "a big red circle, on a blue background.", reweight={"red": 2.0}, num_inference_steps=2
    )
    assert res.settings["syntax"] is None and res.source_prompt == "a big red circle, on a blue background."
