"""Arguments every entry point checks before any work (sdexplore._checks): seeds, image sizes (and the embedded
MMDiT's 64-pixel limit), img2img/inpainting strength, 16-bit pictures and float masks."""

from __future__ import annotations

import numpy as np
import pytest

import sdexplore as sdx
from sdexplore._checks import MAX_SEED, check_seed, check_strength
from sdexplore.errors import InterpolationError, InvalidArgumentError
from sdexplore.walks import walk

FAST = dict(num_inference_steps=2, progress=False)
BAD_SEEDS = [2**70, 2**64, -1, 1.0, True, "3", None]


def _no_work(monkeypatch, pipe) -> None:
    """Any text encoding or denoiser call fails the test: the check must come first."""
    for name in ("text_encoder", "unet"):
        monkeypatch.setattr(getattr(pipe, name), "forward", lambda *a, **k: pytest.fail("work started"))


@pytest.mark.parametrize("seed", BAD_SEEDS)
def test_check_seed_refuses_what_manual_seed_cannot_take(seed):
    with pytest.raises(InvalidArgumentError, match=r"from 0 to 2\*\*64 - 1"):
        check_seed(seed)


def test_check_seed_takes_the_whole_range():
    import torch

    assert check_seed(0) == 0 and check_seed(np.int64(7)) == 7 and check_seed(MAX_SEED) == MAX_SEED
    torch.Generator().manual_seed(check_seed(MAX_SEED))  # the largest one is accepted by torch as itself


@pytest.mark.parametrize("seed", [2**70, -1, True])
def test_walk_refuses_a_bad_seed_before_any_work(sd1_pipe, monkeypatch, seed):
    _no_work(monkeypatch, sd1_pipe)
    with pytest.raises(InterpolationError, match=r"seeds\[1\]=.*from 0 to 2\*\*64 - 1"):
        walk(sd1_pipe, ["a red circle", "a blue square"], seeds=[0, seed], frames=2, **FAST)
    with pytest.raises(InterpolationError, match=r"seeds=.*from 0 to 2\*\*64 - 1"):
        walk(sd1_pipe, ["a red circle", "a blue square"], seeds=seed, frames=2, **FAST)


def test_walk_takes_the_largest_seed(sd1_pipe):
    w = walk(sd1_pipe, ["a red circle", "a blue square"], seeds=[0, MAX_SEED], frames=2, **FAST)
    assert w.seeds == [0, MAX_SEED]


@pytest.mark.parametrize("seed", [2**70, -1, True, 0.5])
def test_generate_refuses_a_bad_seed_before_any_work(sd1_pipe, monkeypatch, seed):
    _no_work(monkeypatch, sd1_pipe)
    with pytest.raises(InvalidArgumentError, match=r"seed=.*from 0 to 2\*\*64 - 1"):
        sdx.generate(sd1_pipe, "a red circle", seed=seed, num_inference_steps=2)


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, float("nan"), float("inf"), True, "0.5", None])
def test_check_strength_refuses(value):
    with pytest.raises(InvalidArgumentError, match="strength"):
        check_strength(value)


def test_check_strength_takes_the_open_closed_interval():
    assert (
        check_strength(1) == 1.0 and check_strength(1e-3) == 1e-3 and check_strength(np.float32(0.5)) == 0.5
    )
