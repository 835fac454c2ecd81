"""Text on SD3: encode_prompt gives what the pipeline itself uses; inspect_prompt shows the CLIP part."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gen

import sdexplore as sdx
from sdexplore.fixtures import tiny_pipeline


@pytest.fixture
def sd3_pipe():
    return tiny_pipeline("sd3")


def test_encode_prompt_reproduces_the_pipelines_own_conditioning(sd3_pipe) -> None:
    enc = sdx.encode_prompt(sd3_pipe, "a big red circle", "a blue square")
    assert enc.family == "sd3" and enc.pooled_prompt_embeds is not None
    assert enc.add_time_ids is None  # size conditioning is SDXL's, not SD3's
    kw = dict(num_inference_steps=3, output_type="np")
    ref = sd3_pipe("a big red circle", negative_prompt="a blue square", generator=gen(0), **kw).images
    out = sd3_pipe(**enc.pipe_kwargs(), generator=gen(0), **kw).images
    assert np.array_equal(out, ref)


def test_inspect_prompt_labels_the_clip_part_of_the_joint_sequence(sd3_pipe) -> None:
    info = sdx.inspect_prompt(sd3_pipe, "a big red circle")
    assert len(info.tokens) == 77 and info.tokens[1:5] == ["a</w>", "big</w>", "red</w>", "circle</w>"]
    widths = [sd3_pipe.text_encoder.config.hidden_size, sd3_pipe.text_encoder_2.config.hidden_size]
    enc = sdx.encode_prompt(sd3_pipe, "a big red circle")
    assert enc.prompt_embeds.shape[1] > 77  # T5's tokens follow CLIP's 77
    assert torch.equal(info.embeds, enc.prompt_embeds[0, :77, : sum(widths)].float())
    assert info.encoder_norms.shape == (2, 77)
    assert (
        sdx.text.default_size(sd3_pipe)
        == (sd3_pipe.transformer.config.sample_size * sd3_pipe.vae_scale_factor,) * 2
    )
