"""Family detection and family records on every fixture."""

import pytest
import torch

from sdexplore import UnsupportedPipelineError, detect_family
from sdexplore.families import latent_rgb, vae_scale_factor


@pytest.mark.parametrize("fam", ["sd1", "sd2", "sdxl"])
def test_detect_each_fixture(fam):
    from sdexplore.fixtures import tiny_pipeline

    pipe = tiny_pipeline(fam)
    f = detect_family(pipe)
    assert f.name == fam
    assert len(f.text_encoders) == len(f.tokenizers) == (2 if fam == "sdxl" else 1)
    # The named encoders, in concat order, are the ones whose hidden states the UNet's cross-attention reads.
    widths = [getattr(pipe, n).config.hidden_size for n in f.text_encoders]
    assert sum(widths) == pipe.unet.config.cross_attention_dim
    assert all(getattr(pipe, n).model_max_length == 77 for n in f.tokenizers)
    cross = f.cross_attention_layers(pipe.unet)
    assert cross and all(n.endswith("attn2.processor") for n in cross)
    assert len(cross) * 2 == len(pipe.unet.attn_processors)  # every transformer block: attn1 + attn2
    assert vae_scale_factor(pipe) == 8


def test_latent_rgb_defaults_shape(sd1_pipe, sdxl_pipe):
    f1, b1 = latent_rgb(sd1_pipe)
    fx, bx = latent_rgb(sdxl_pipe)
    assert f1.shape == (4, 3) and b1.shape == (3,)
    assert not torch.equal(f1, fx) and bx.abs().sum() > 0


def test_unsupported_pipeline_names_supported_classes():
    class Flux2LikePipeline:
        pass

    with pytest.raises(UnsupportedPipelineError, match="StableDiffusionPipeline.*FluxPipeline"):
        detect_family(Flux2LikePipeline())
