"""describe(): the component tour works on every family (UNet and MMDiT) and its arithmetic is right."""

import html

import pytest
import torch

from sdexplore import describe
from sdexplore.fixtures import tiny_pipeline


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
    assert d.blocks == [] and "Transformer:" not in text  # a UNet has no MMDiT block structure
    if d.family == "sdxl":
        assert "text_encoder_2" in names


# family → (text encoders and tokenizers it has, the block-structure phrases describe() must show)
MMDIT = {
    "sd3": (
        {"text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer_3"},
        ["2 joint (MMDiT) blocks", "4 heads × 8 = 32 channels"],
    ),
    "flux": (
        {"text_encoder", "text_encoder_2", "tokenizer_2"},
        ["2 double-stream (MMDiT) blocks", "2 single-stream blocks", "4 heads × 8 = 32 channels"],
    ),
}


@pytest.mark.parametrize("family", list(MMDIT))
def test_describe_mmdit_families_shows_the_block_structure(family):
    pipe = tiny_pipeline(family)
    d = describe(pipe, steps=10, height=64, width=64)  # Flux's own default is 1024²
    names = {c.name for c in d.components}
    encoders, phrases = MMDIT[family]
    assert {"transformer", "vae", "tokenizer", "scheduler"} | encoders <= names and "unet" not in names
    transformer = next(c for c in d.components if c.name == "transformer")
    assert transformer.parameters == sum(p.numel() for p in pipe.transformer.parameters())
    assert transformer.dtype == "float32" and transformer.device == "cpu"
    assert d.family == family and d.latent_shape == (16, 8, 8) and d.image_size == (64, 64)
    assert d.compression == 12.0 and d.prediction_type == "flow_prediction"
    assert len(d.timesteps) == 10 and d.timesteps == sorted(d.timesteps, reverse=True)
    assert len(d.blocks) == 1 and all(p in d.blocks[0] for p in phrases)
    text, page = str(d), d._repr_html_()
    assert "12× fewer" in text and type(pipe.transformer).__name__ in text
    assert d.blocks[0] in text and html.escape(d.blocks[0]) in page  # in the printed table and in Jupyter's
    assert describe(pipe, steps=2, height=64, width=96).latent_shape == (16, 8, 12)
    # the block counts are read from the model, not assumed: one joint block fewer shows one fewer
    pipe.transformer.transformer_blocks = torch.nn.ModuleList(list(pipe.transformer.transformer_blocks)[:1])
    assert phrases[0].replace("2", "1", 1) in describe(pipe, steps=2, height=64, width=64).blocks[0]


def test_describe_leaves_scheduler_untouched(sd1_pipe):
    before = None if sd1_pipe.scheduler.num_inference_steps is None else list(sd1_pipe.scheduler.timesteps)
    describe(sd1_pipe, steps=7)
    assert sd1_pipe.scheduler.num_inference_steps is None or list(sd1_pipe.scheduler.timesteps) == before


def test_describe_non_square_and_bad_size(sd1_pipe):
    d = describe(sd1_pipe, height=64, width=96)
    assert d.latent_shape == (4, 8, 12)
    with pytest.raises(ValueError, match="multiples of 8"):
        describe(sd1_pipe, height=60, width=64)


# ---------------------------------------------------------------- every statement read from the pipeline
@pytest.mark.parametrize(
    ("model", "expected_type"), [("tiny-shapes", "v_prediction"), ("tiny-shapes-mmdit", "flow_prediction")]
)
def test_describe_embedded_models_says_what_their_configs_say(model, expected_type):
    """The embedded UNet is v-prediction (not "predicts the noise"); the default step count is the commands'."""
    from sdexplore import inversion
    from sdexplore.cli import _common as cli
    from sdexplore.loading import load_pipeline
    from sdexplore.schedule_math import prediction_type
    from sdexplore.tour import predicts

    pipe = load_pipeline(model)
    d = describe(pipe)
    assert d.prediction_type == prediction_type(pipe.scheduler) == expected_type
    assert len(d.timesteps) == cli.DEFAULT_STEPS == inversion.DEFAULT_STEPS  # not diffusers' 50
    text = str(d)
    assert f"{cli.DEFAULT_STEPS} inference steps" in text and "50 inference steps" not in text
    assert f"predicts {predicts(expected_type)}" in text and "predicts the noise" not in text
    denoiser = next(c for c in d.components if c.name in ("unet", "transformer"))
    assert predicts(expected_type) in denoiser.role
    assert f"{pipe.scheduler.config.num_train_timesteps} training timesteps" in text


def test_describe_follows_the_scheduler_config_prediction_type(sd1_pipe):
    """Changing only the scheduler's prediction_type changes what describe() says the UNet predicts."""
    from sdexplore.tour import PREDICTS

    said = {}
    for kind in ("epsilon", "v_prediction", "sample"):
        sd1_pipe.scheduler = type(sd1_pipe.scheduler).from_config(
            sd1_pipe.scheduler.config, prediction_type=kind
        )
        d = describe(sd1_pipe, steps=3)
        unet = next(c for c in d.components if c.name == "unet")
        assert d.prediction_type == kind and PREDICTS[kind] in unet.role and PREDICTS[kind] in str(d)
        said[kind] = unet.role
    assert len(set(said.values())) == 3
    assert "noise" in said["epsilon"].split("predicts")[1] and "x0" in said["sample"].split("predicts")[1]
