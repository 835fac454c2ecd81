"""The shipped tiny-shapes model: a plain diffusers folder, offline, deterministic, and it draws its world."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from safetensors import safe_open

from sdexplore import scenes

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "sdexplore" / "models" / "tiny-shapes"
#: The bars the embedded model was specified to meet on the held-out prompts (MODEL_CARD.md's "bar" column,
#: the same since the first card): fractions right per part, the shape word's mean attention IoU, VAE PSNR in
#: dB. Fixed numbers, never derived from what the card measured.
BARS = {"colour": 0.90, "background": 0.90, "shape": 0.80, "place": 0.75, "attention_iou": 0.45, "psnr": 28.0}


def _eval_module():
    return load_script("eval_embedded")


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def subset16(pipe):
    """The first 16 held-out prompts, generated and scored as the eval script does."""
    return _eval_module().evaluate(pipe, scenes.validation_prompts()[:16])


def test_folder_is_a_diffusers_pipeline_without_safety_checker():
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (MODEL / part).is_dir(), part
    assert index["safety_checker"] == [None, None]
    assert (MODEL / "MODEL_CARD.md").exists() and (MODEL / "sample_grid.png").exists()


def test_weights_are_fp32_safetensors_and_small():
    files = sorted(MODEL.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"unet", "vae", "text_encoder"}
    assert not list(MODEL.rglob("*.bin"))
    total = sum(f.stat().st_size for f in files)
    assert total <= 25e6, f"{total / 1e6:.1f} MB"
    for f in files:
        with safe_open(f, "pt") as handle:
            for key in handle.keys():
                assert handle.get_slice(key).get_dtype() == "F32", (f, key)


def test_shipped_tokenizer_has_sd15_ids():
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77 and tok.pad_token == "<|endoftext|>"


def test_loads_offline_and_same_seed_gives_same_image(pipe, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionPipeline

    again = StableDiffusionPipeline.from_pretrained(str(MODEL))  # plain call, no hub
    assert again.unet.dtype == torch.float32 and again.text_encoder.dtype == torch.float32
    prompt = "a big red circle at the top left on a blue background"
    kwargs = dict(num_inference_steps=10, output_type="np")
    a = pipe(prompt, generator=torch.Generator().manual_seed(3), **kwargs).images[0]
    b = pipe(prompt, generator=torch.Generator().manual_seed(3), **kwargs).images[0]
    c = pipe(prompt, generator=torch.Generator().manual_seed(4), **kwargs).images[0]
    assert a.shape == (64, 64, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_vae_reconstructs_scenes_above_28_db(pipe):
    images, _ = scenes.render_batch(scenes.validation_scenes(32, seed=5))
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    psnr = 10 * math.log10(4 / torch.mean((recon - images) ** 2).item())
    assert psnr >= BARS["psnr"], psnr


def test_latent_rgb_factors_preview_the_image(pipe):
    data = json.loads((MODEL / "latent_rgb.json").read_text())
    factors, bias = torch.tensor(data["factors"]), torch.tensor(data["bias"])
    assert factors.shape == (4, 3) and bias.shape == (3,)
    images, _ = scenes.render_batch(scenes.validation_scenes(16, seed=6))
    with torch.no_grad():
        latents = (
            pipe.vae.encode(images).latent_dist.mode() * pipe.vae.config.scaling_factor
        )  # (16, 4, 16, 16)
    preview = torch.einsum("bchw,cr->brhw", latents, factors) + bias.view(1, 3, 1, 1)  # (16, 3, 16, 16)
    target = torch.nn.functional.avg_pool2d(images, 4)  # (16, 3, 16, 16)
    rmse = (preview - target).pow(2).mean().sqrt().item()
    # A linear map of 4 latent channels to colour is coarse for this VAE (its latents are not linear in
    # colour); the test holds it to the fit recorded beside it and to beating a flat grey preview.
    assert rmse <= data["rmse"] + 0.05, rmse
    assert rmse < 0.8 * (target - target.mean()).pow(2).mean().sqrt().item()


@pytest.mark.slow
def test_held_out_prompts_reach_the_bars(subset16):
    """16 held-out prompts (seed i for prompt i): every part reaches its bar, and the shape word's attention
    map its IoU bar. The bars are BARS, never the card's measured numbers."""
    # The 16 prompts and their seeds are fixed, so on one machine this score is deterministic: a regression
    # check on a fixed sample, not a fresh random draw each run. As an estimate of the 216-prompt score it is
    # coarse (one prompt is 6.25 points; the binomial standard error at the card's shape 84.3% is 9 points,
    # and a fresh random 16 would fall under 80% about 24% of the time), which is why the sample is fixed and
    # the full set is scripts/eval_embedded.py's job. Reaching the bar on 16 prompts means at least 15/16 for
    # colour and background, 13/16 for shape, 12/16 for place. The card's first-16 numbers (shape 14/16,
    # IoU 0.483) sit one prompt / 0.03 above the bars, so float drift across CPUs flipping one borderline
    # image still passes; a model that fell below a bar does not.
    scores = subset16.scores
    for part in ("colour", "background", "shape", "place"):
        assert scores[part] >= BARS[part], (part, scores[part], BARS[part])
    assert subset16.attention_iou >= BARS["attention_iou"], subset16.attention_iou


def test_eval_script_reports_against_the_same_bars():
    """The card's bar column comes from scripts/eval_embedded.py: it must print these bars, not lower ones."""
    assert _eval_module().BARS == BARS


@pytest.mark.slow
def test_model_card_numbers_are_reproduced(subset16):
    """The eval script's 16-prompt numbers equal the card's (to one prompt, for float drift across CPUs)."""
    card = json.loads((MODEL / "eval.json").read_text())["subset16"]
    for part, value in card["scores"].items():
        assert abs(subset16.scores[part] - value) <= 1 / 16 + 1e-9, part
    assert abs(subset16.attention_iou - card["attention_iou"]) < 0.03
    text = (MODEL / "MODEL_CARD.md").read_text()
    assert f"place {100 * card['scores']['place']:.1f}%" in text


def test_vae_ceiling_on_the_card_is_this_vae_s(pipe):
    """The card's ceiling (the scorer on VAE reconstructions of the held-out scenes) is this VAE's: recomputed,
    it matches to one scene in 216 (float drift across CPUs); the scorer itself reads the true scenes 100%."""
    result = json.loads((MODEL / "eval.json").read_text())
    ceiling = _eval_module().vae_ceiling(pipe)
    for part, value in result["vae_ceiling"].items():
        assert abs(ceiling[part] - value) <= 1 / 216 + 1e-9, (part, ceiling[part], value)
    batch = scenes.validation_scenes()
    truth, _ = scenes.render_batch(batch)
    assert scenes.score_images(list(truth), batch.prompts())["all"] == 1.0


@pytest.mark.slow
def test_shape_word_attention_sits_on_the_shape(subset16):
    """The recorded map is a real signal: the shape covers 2-7% of the image, so a map unrelated to it, half
    of whose area passes the threshold, could not reach an IoU of 0.15 on average."""
    ious = [row["iou"] for row in subset16.rows]
    assert np.mean(ious) > 0.15


@pytest.mark.parametrize("place", scenes.PLACES)
def test_layout_probe_finds_a_rendered_shape_in_its_cell(place):
    """The layout probe's reading (centroid of the departure from the background) on ground truth."""
    image, _, _ = scenes.render_scene(f"a small red square at the {place} on a white background", seed=3)
    assert load_script("diagnose_layout")._departure_place(image.astype(np.float32)) == place


def test_layout_probe_on_the_model_agrees_with_its_final_images(pipe):
    """x0 at the last step is (almost) the final latent: the probe reads the same places in both; the grid
    shows the chosen steps and the final image for the 9 places."""
    right, grid = load_script("diagnose_layout").layout_probe(
        pipe, "a big red circle at the {place} on a white background", seeds=1, steps=4
    )
    assert len(right) == 5 and all(0.0 <= r <= 1.0 for r in right)
    assert right[-2] == right[-1]
    assert grid.shape == (3 * 64, 9 * 64, 3) and grid.dtype == np.uint8  # x0 at steps 0 and 2, final image
    assert grid.std() > 5  # not a blank picture
