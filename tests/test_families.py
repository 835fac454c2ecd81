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


# ---- PixArt-Σ: the record's methods for a DiT with learned variance and a local CFG flag ------------------------
@pytest.fixture(scope="module")
def pixart():
    from sdexplore.fixtures import tiny_pipeline

    return tiny_pipeline("pixart-sigma")


def test_pixart_record_reads_its_pipeline(pixart):
    from sdexplore.families import PIXART_SIGMA

    fam = detect_family(pixart)
    assert fam is PIXART_SIGMA and fam.get_denoiser(pixart) is pixart.transformer
    cross = fam.cross_attention_layers(pixart.transformer)  # DiT blocks: attn2 is the text cross-attention
    assert cross == [f"transformer_blocks.{i}.attn2.processor" for i in range(2)]
    enc = fam.encode_prompt(pixart, "a red circle", device="cpu", max_sequence_length=32)
    embeds, mask, negative, _ = pixart.encode_prompt("a red circle", device="cpu", max_sequence_length=32)
    assert torch.equal(enc.embeds, embeds) and torch.equal(enc.negative, negative) and enc.pooled is None
    assert mask.shape == (1, 32) and enc.embeds.shape == (
        1,
        32,
        64,
    )  # the mask is not mistaken for a negative


def test_pixart_prediction_is_the_epsilon_half_and_cfg_follows_guidance_scale(pixart):
    from sdexplore.families import PIXART_SIGMA, SD1

    out = torch.randn(2, 8, 8, 8)  # (2B, ε ‖ variance, h, w)
    assert torch.equal(PIXART_SIGMA.prediction(out), out.chunk(2, dim=1)[0])  # as the pipeline splits it
    assert SD1.prediction(out) is out and PIXART_SIGMA.prediction(out[:, :4]).shape == (2, 4, 8, 8)
    # PixArtSigmaPipeline has no do_classifier_free_guidance property: the call's guidance_scale (default 4.5)
    assert not hasattr(type(pixart), "do_classifier_free_guidance")
    assert PIXART_SIGMA.batch_cfg(pixart, {}) and PIXART_SIGMA.guidance_scale_of(pixart, {}) == 4.5
    assert not PIXART_SIGMA.batch_cfg(pixart, {"guidance_scale": 1.0})
    assert PIXART_SIGMA.guidance_scale_of(pixart, {"guidance_scale": 2.0}) == 2.0


def test_capabilities_are_named_and_checked():
    from sdexplore.errors import InvalidArgumentError
    from sdexplore.families import CAPABILITIES, FAMILIES

    assert all(f.capabilities <= set(CAPABILITIES) and f.can("steps") for f in FAMILIES.values())
    assert FAMILIES["sd1"].can("null-text") and not FAMILIES["flux"].can("null-text")
    with pytest.raises(InvalidArgumentError, match="Unknown capability 'fly'"):
        FAMILIES["sd1"].can("fly")


def test_sana_record_encodes_without_clip_skip_and_reads_the_dc_ae_scale():
    from sdexplore.errors import InvalidArgumentError
    from sdexplore.families import SANA
    from sdexplore.fixtures import gemma_tokenizer, tiny_pipeline

    pipe = tiny_pipeline("sana")
    assert detect_family(pipe) is SANA and vae_scale_factor(pipe) == 8  # the DC-AE has no block_out_channels
    enc = SANA.encode_prompt(pipe, "a red circle", device="cpu", max_sequence_length=16)
    embeds, mask, negative, _ = pipe.encode_prompt("a red circle", device="cpu", max_sequence_length=16)
    assert torch.equal(enc.embeds, embeds) and torch.equal(enc.negative, negative) and mask.shape == (1, 16)
    with pytest.raises(InvalidArgumentError, match="clip_skip"):
        SANA.encode_prompt(pipe, "a red circle", device="cpu", clip_skip=1)
    # Sana's cross-attention is softmax (its processor reproducible); its self-attention is linear (not captured)
    cross = SANA.cross_attention_layers(pipe.transformer)
    assert cross == [f"transformer_blocks.{i}.attn2.processor" for i in range(2)]
    tok = gemma_tokenizer()
    ids = tok("a red circle, Zürich").input_ids
    assert ids[0] == tok.bos_token_id == 2 and tok.convert_ids_to_tokens(ids)[1:4] == ["a", "▁red", "▁circle"]
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle, Zürich"  # byte fallback: no <unk>
