"""sdexplore.edit on the embedded tiny-shapes UNet: edits mean what they say, on held-out scene prompts.

A colour swap (Prompt-to-Prompt replace) keeps the shape where it was better than regenerating the target prompt
with the same seed, and reads as the target colour; ablating the shape word leaves its recorded map at zero.
Measured limit: on this model the shape word holds ~5% of the attention on the shape (the causal text encoder
spreads the prompt into every later token), so ablating it alone barely shrinks the shape. The same spread gives
the shape word's map a floor near half its peak everywhere, so Prompt-to-Prompt's local-blend threshold (0.3 of
the peak) keeps every latent: there the blend is the unblended edit, bit for bit; at 0.7 its mask covers the
shape and the background is the source's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sdexplore as sdx
from sdexplore.embedded import scenes
from sdexplore.embedded.model import EMBEDDED_GUIDANCE_SCALE, EMBEDDED_STEPS
from sdexplore.record.control import Control, LocalBlend, WordSwap

KW = dict(num_inference_steps=EMBEDDED_STEPS, guidance_scale=EMBEDDED_GUIDANCE_SCALE)
PROMPTS = scenes.validation_prompts()[4:10]  # held out from training


@pytest.fixture(scope="module")
def pipe():
    return sdx.load_pipeline()


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _target(prompt: str) -> tuple[str, str]:
    """The prompt with its shape's colour swapped for one that is neither the shape's nor the background's."""
    p = scenes.parse_prompt(prompt)
    colour = next(c for c in ("blue", "red", "green", "yellow") if c not in (p.colour, p.background))
    return prompt.replace(f" {p.colour} {p.shape}", f" {colour} {p.shape}"), colour


@pytest.mark.slow
def test_a_colour_swap_keeps_the_shape_better_than_regenerating_and_reads_as_the_new_colour(pipe) -> None:
    edit_iou, naive_iou = [], []
    for i, prompt in enumerate(PROMPTS):
        target, colour = _target(prompt)
        res = sdx.edit(
            pipe, prompt, target, generator=torch.Generator().manual_seed(i), attention=False, **KW
        )
        naive = pipe(target, generator=torch.Generator().manual_seed(i), **KW).images[0]
        source, edited = scenes.read_scene(np.asarray(res.source)), scenes.read_scene(np.asarray(res.edited))
        assert edited.colour == colour, (prompt, target, edited)
        assert edited.place == source.place and edited.background == source.background
        edit_iou.append(_iou(source.mask, edited.mask))
        naive_iou.append(_iou(source.mask, scenes.read_scene(np.asarray(naive)).mask))
    # measured here: 0.892 against 0.858 (12 other held-out prompts: 0.888 against 0.870)
    assert np.mean(edit_iou) > np.mean(naive_iou) + 0.02, (edit_iou, naive_iou)


@pytest.mark.slow
def test_ablating_the_shape_word_zeroes_its_map_and_keeps_the_rest_of_the_scene(pipe) -> None:
    prompt = PROMPTS[0]
    shape = scenes.parse_prompt(prompt).shape
    res = sdx.edit(pipe, prompt, reweight={shape: 0.0}, generator=torch.Generator().manual_seed(0), **KW)
    assert float(res.edited_maps.word(shape).abs().max()) == 0.0 < float(res.source_maps.word(shape).max())
    assert not np.array_equal(np.asarray(res.source), np.asarray(res.edited))
    source, edited = scenes.read_scene(np.asarray(res.source)), scenes.read_scene(np.asarray(res.edited))
    # the measured limit (module docstring): the shape stays, its area within a few percent
    assert edited.background == source.background and edited.place == source.place
    assert abs(1 - edited.mask.sum() / source.mask.sum()) < 0.2


@pytest.mark.slow
def test_a_local_blend_of_the_shape_word_masks_the_shape_and_at_p2ps_threshold_keeps_everything(pipe) -> None:
    prompt = PROMPTS[1]
    target, colour = _target(prompt)
    shape = scenes.parse_prompt(prompt).shape
    run = dict(generator=torch.Generator().manual_seed(1), attention=False, **KW)
    plain = sdx.edit(pipe, prompt, target, **run)
    run["generator"] = torch.Generator().manual_seed(1)
    blended = sdx.edit(pipe, prompt, target, blend=[shape], **run)  # threshold 0.3: the measured limit
    assert np.array_equal(np.asarray(blended.edited), np.asarray(plain.edited))
    small = 0
    for i, prompt in enumerate(PROMPTS):
        target, colour = _target(prompt)
        blend = LocalBlend([scenes.parse_prompt(prompt).shape], threshold=0.7)
        with Control(pipe, WordSwap(0.8, 0.4), blend):
            out = pipe([prompt, target], generator=torch.Generator().manual_seed(i), **KW).images
        source, edited = scenes.read_scene(np.asarray(out[0])), scenes.read_scene(np.asarray(out[1]))
        mask = (
            F.interpolate(blend.masks[None].float(), size=source.mask.shape, mode="nearest")[0, 0].numpy() > 0
        )
        assert mask[source.mask].all() and mask[edited.mask].all(), prompt  # the shapes lie inside the mask
        assert edited.colour == colour and edited.background == source.background, (prompt, edited)
        small += mask.mean() < 0.5
    assert small >= 3  # measured: the mask is 16-18% of the image on 4 of 6 prompts (60-95% on the others)


@pytest.mark.slow
def test_a_refinement_adding_a_size_word_makes_the_shape_that_size_and_keeps_the_scene(pipe) -> None:
    ratios = []
    for i, prompt in enumerate(scenes.validation_prompts()[36:40]):  # held out; "big" said or not
        p = scenes.parse_prompt(prompt)
        source = scenes.format_prompt(scenes.SceneParams(p.shape, p.colour, p.place, None, p.background))
        target = scenes.format_prompt(scenes.SceneParams(p.shape, p.colour, p.place, "small", p.background))
        res = sdx.edit(
            pipe, source, target, generator=torch.Generator().manual_seed(i), attention=False, **KW
        )
        assert res.settings["mode"] == "refine"
        s, e = scenes.read_scene(np.asarray(res.source)), scenes.read_scene(np.asarray(res.edited))
        assert (e.place, e.shape) == (s.place, s.shape), (source, target, s, e)
        if (
            s.size_px > 12
        ):  # the source came out big (no size said: the model picks one); else nothing to shrink
            ratios.append(e.size_px / s.size_px)
    # measured here (12 held-out prompts): to "small" 0.59 of the source's side (regenerating: 0.58), to "big"
    # 1.13 (1.18); colour, background, place and shape read the same on 9/12 (regenerating: 7/12)
    assert len(ratios) >= 2 and max(ratios) < 0.75, ratios
