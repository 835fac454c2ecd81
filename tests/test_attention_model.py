"""On the embedded trained model: the shape word's attention map sits on the generated shape (mean IoU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdexplore
from sdexplore.heatmaps import iou, threshold, upsample
from sdexplore.record.attention import AttentionRecorder

pytestmark = pytest.mark.slow

# Big shapes at varied places, every shape and several colours: the masks are large enough to score.
PROMPTS = [
    "a big red circle at the top left on a blue background",
    "a big yellow square at the bottom right on a purple background",
    "a big green triangle at the center on a white background",
    "a big blue circle at the bottom left on a yellow background",
    "a big white square at the top right on a black background",
    "a big orange triangle at the top left on a blue background",
    "a big purple circle at the right on a green background",
    "a big black square at the left on a white background",
]
# Bars from what the embedded model reached (tiny-shapes as retrained on 2026-11-26: shape-weighted VAE, two-level
# UNet; 25 DDIM steps, CFG 7.5, Otsu thresholds): aggregate map 0.613 (mismatched image pairs 0.014); down-block
# layers alone 0.674. (Earlier checkpoints, newest first: 0.444 / 0.022 / 0.370 after a shape-weighted CPU
# fine-tune; 0.512 / 0.014 / 0.546 for one that drew every kind of shape as a round blob; 0.419 / 0.034 / 0.442;
# the first, undertrained one: 0.264 / 0.122 / 0.367.) Re-measure if the model is retrained.
MIN_MIOU = 0.55
MIN_MIOU_DOWN = 0.60
MIN_MARGIN = 0.50  # over the mismatched pairs


def test_shape_word_map_overlaps_generated_shape():
    from sdexplore.embedded.scenes import parse_prompt, read_scene

    pipe = sdexplore.load_pipeline(device="cpu")
    prompts = [p for p in PROMPTS if _parses(parse_prompt, p)]
    assert len(prompts) >= 6, "the scene grammar rejected most fixed prompts; update PROMPTS"
    gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    with AttentionRecorder(pipe) as rec:
        images = pipe(
            prompts, generator=gens, num_inference_steps=25, output_type="np"
        ).images  # (B, H, W, 3)
    maps = rec.maps
    masks, preds, downs = [], [], []
    for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
        mask = read_scene((np.asarray(image) * 255).round().astype(np.uint8)).mask
        if not mask.any():
            continue  # the model drew no readable shape: nothing to overlap
        word = parse_prompt(prompt).shape
        heat = upsample(maps.word(word, index=i), mask.shape)
        down = upsample(maps.word(word, index=i, layer="down_blocks"), mask.shape)
        masks.append(mask)
        preds.append(threshold(heat, "otsu").numpy())
        downs.append(threshold(down, "otsu").numpy())
    assert len(masks) >= len(prompts) - 2, "the model drew too few readable shapes to score attention"
    matched = float(np.mean([iou(p, m) for p, m in zip(preds, masks, strict=True)]))
    shuffled = float(np.mean([iou(p, m) for p, m in zip(preds, masks[1:] + masks[:1], strict=True)]))
    down = float(np.mean([iou(p, m) for p, m in zip(downs, masks, strict=True)]))
    print(f"shape-word mIoU {matched:.3f} (mismatched pairs: {shuffled:.3f}; down blocks {down:.3f})")
    assert matched >= MIN_MIOU
    assert down >= MIN_MIOU_DOWN
    assert matched > shuffled + MIN_MARGIN  # the map follows *this* image's shape, not a fixed blob


def _parses(parse, prompt: str) -> bool:
    try:
        parse(prompt)
    except Exception:
        return False
    return True
