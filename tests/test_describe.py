"""describe(): the component tour works on every family and its arithmetic is right."""

import pytest

from sdexplore import describe


def test_describe_every_family(any_pipe):
    d = describe(any_pipe, steps=10)
    names = {c.name for c in d.components}
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= names
    unet = next(c for c in d.components if c.name == "unet")
    assert unet.parameters == sum(p.numel() for p in any_pipe.unet.parameters())
    assert unet.dtype == "float32" and unet.device == "cpu"
    assert d.latent_shape == (4, 8, 8) and d.image_size == (64, 64)
    assert d.compression == 48.0
    assert len(d.timesteps) == 10 and d.timesteps == sorted(d.timesteps, reverse=True)
    text = str(d)
    assert "48× fewer" in text and "UNet2DConditionModel" in text
    assert "<table>" in d._repr_html_()
    if d.family == "sdxl":
        assert "text_encoder_2" in names


def test_describe_leaves_scheduler_untouched(sd1_pipe):
    before = None if sd1_pipe.scheduler.num_inference_steps is None else list(sd1_pipe.scheduler.timesteps)
    describe(sd1_pipe, steps=7)
    assert sd1_pipe.scheduler.num_inference_steps is None or list(sd1_pipe.scheduler.timesteps) == before


def test_describe_non_square_and_bad_size(sd1_pipe):
    d = describe(sd1_pipe, height=64, width=96)
    assert d.latent_shape == (4, 8, 12)
    with pytest.raises(ValueError, match="multiples of 8"):
        describe(sd1_pipe, height=60, width=64)
