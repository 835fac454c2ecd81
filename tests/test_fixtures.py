"""Tiny fixtures: deterministic, independent, the right structure."""

import numpy as np
import pytest
import torch

from sdexplore.fixtures import fixture_call_defaults, tiny_pipeline


def _run(pipe, seed):
    return pipe(
        "a red circle", num_inference_steps=3, height=64, width=64, output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images  # fmt: skip


def test_same_seed_identical_different_seed_differs(any_pipe):
    a, b, c = _run(any_pipe, 0), _run(any_pipe, 0), _run(any_pipe, 1)
    assert a.shape == (1, 64, 64, 3)
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_fixtures_are_independent_copies():
    p1, p2 = tiny_pipeline("sd1"), tiny_pipeline("sd1")
    assert p1.unet is not p2.unet
    with torch.no_grad():
        next(p1.unet.parameters()).add_(1.0)
    assert not torch.equal(next(p1.unet.parameters()), next(p2.unet.parameters()))
    assert torch.equal(next(tiny_pipeline("sd1").unet.parameters()), next(p2.unet.parameters()))


def test_sd2_is_v_prediction_and_bad_family():
    assert tiny_pipeline("sd2").scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="sd1"):
        tiny_pipeline("flux3")  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["pixart-sigma", "chroma", "sana"])
def test_new_family_fixtures_are_deterministic_independent_and_fixed(family):

    kw = dict(
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        max_sequence_length=16,
        **fixture_call_defaults(family),
    )
    a, b = tiny_pipeline(family), tiny_pipeline(family)
    assert a.transformer is not b.transformer
    x = a(prompt="a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    y = b(prompt="a red circle", generator=torch.Generator().manual_seed(0), **kw).images
    z = a(prompt="a red circle", generator=torch.Generator().manual_seed(1), **kw).images
    assert x.shape == (1, 64, 64, 3) and np.array_equal(x, y) and np.abs(x - z).max() > 1e-3
    with pytest.raises(ValueError, match="fixed"):
        tiny_pipeline(family, prediction_type="epsilon")
