"""Arguments every entry point checks before any work (sdexplore._checks): seeds, image sizes (and the embedded
MMDiT's 64-pixel limit), img2img/inpainting strength, 16-bit pictures and float masks."""

from __future__ import annotations

import numpy as np
import pytest

import sdexplore as sdx
from sdexplore._checks import MAX_SEED, check_seed, check_strength, size_limit
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


# ------------------------------------------------------------------ image sizes: the embedded MMDiT's limit
@pytest.fixture(scope="module")
def mmdit():
    return sdx.load_pipeline("tiny-shapes-mmdit")


def _no_mmdit_work(monkeypatch, pipe) -> None:
    for name in ("text_encoder", "text_encoder_2", "transformer", "vae"):
        monkeypatch.setattr(getattr(pipe, name), "forward", lambda *a, **k: pytest.fail("work started"))
    monkeypatch.setattr(pipe.vae, "encode", lambda *a, **k: pytest.fail("work started"))


def test_the_embedded_mmdit_draws_at_most_64_pixels_per_side(mmdit):
    """pos_embed_max_size 16 × 1×1 patches × the VAE's factor 4; diffusers itself finds out only in the first
    transformer call, after the prompt is encoded (the raw error the checks replace)."""
    from sdexplore.fixtures import tiny_pipeline

    assert size_limit(mmdit) == 64
    assert size_limit(tiny_pipeline("sd3")) == 256  # 16 × 2×2 patches × 8
    assert size_limit(tiny_pipeline("sd1")) is None and size_limit(tiny_pipeline("flux")) is None
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        mmdit("a red circle", height=80, width=64, num_inference_steps=1, output_type="latent")


@pytest.mark.parametrize("entry", ["generate", "walk", "invert", "run start", "run start (picture)"])
def test_a_size_above_the_mmdit_limit_is_refused_before_any_work(mmdit, monkeypatch, entry):
    from PIL import Image

    from sdexplore.masks import check_inpaint_inputs

    _no_mmdit_work(monkeypatch, mmdit)
    limit = "above this model's limit of 64 pixels per side"
    if entry == "generate":
        with pytest.raises(InvalidArgumentError, match=f"height=80 is {limit}"):
            sdx.generate(mmdit, "a red circle", height=80, num_inference_steps=2)
    elif entry == "walk":
        with pytest.raises(InterpolationError, match=f"width=128 is {limit}"):
            walk(mmdit, ["a red circle", "a blue square"], seeds=[0, 1], width=128, frames=2, **FAST)
    elif entry == "invert":
        with pytest.raises(InvalidArgumentError, match=f"height=96 is {limit}"):
            sdx.invert(mmdit, np.zeros((64, 64, 3), np.uint8), "a red circle", height=96, width=64)
    elif entry == "run start":  # what the attachment checks when an observed call begins
        with pytest.raises(InvalidArgumentError, match=f"width=68 is {limit}"):
            check_inpaint_inputs({"prompt": "a red circle", "height": 64, "width": 68}, mmdit)
    else:  # img2img without a size: the picture's own, rounded down to the VAE's factor as diffusers does
        picture = Image.new("RGB", (66, 80))
        with pytest.raises(InvalidArgumentError, match=rf"height=80 \(the picture's\) is {limit}"):
            check_inpaint_inputs({"image": picture, "strength": 0.5}, mmdit)
        assert check_inpaint_inputs({"image": Image.new("RGB", (67, 67)), "strength": 0.5}, mmdit) is None


def test_the_mmdit_draws_below_its_limit(mmdit):
    images, obs = sdx.generate(
        mmdit, "a red circle", height=48, width=64, seed=0, num_inference_steps=2, output_type="np"
    )
    assert images.shape == (1, 48, 64, 3) and obs.steps.num_steps == 2


def test_an_observed_call_above_the_mmdit_limit_is_refused_when_the_run_begins(mmdit, monkeypatch):
    """The attachment passes the pipeline to the run-start checks, so the user's own ``pipe(height=80)`` inside
    ``observe`` gets the library's sentence, not diffusers' error after the prompt is encoded."""
    _no_mmdit_work(monkeypatch, mmdit)  # any encoder, transformer or VAE call fails the test
    cls = type(mmdit)
    with sdx.observe(mmdit, steps=True):
        with pytest.raises(InvalidArgumentError, match="limit of 64 pixels"):
            mmdit("a red circle", height=80, width=64, num_inference_steps=1, output_type="latent")
    assert type(mmdit) is cls  # restored after the refused run
