"""Heat-map math: resize keeps per-pixel distributions, normalisations, Otsu/mean thresholds, IoU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdexplore.heatmaps import iou, mean_iou, normalize, otsu_threshold, resize, threshold, upsample


def test_resize_keeps_token_distributions():
    torch.manual_seed(0)
    maps = torch.rand(2, 77, 4, 6)
    maps = maps / maps.sum(1, keepdim=True)  # (B, T, h, w): a distribution over tokens per pixel
    for size in [(8, 12), (3, 2), (16, 16), (4, 6)]:
        out = resize(maps, size)
        assert out.shape == (2, 77, *size)
        assert torch.allclose(out.sum(1), torch.ones(()), atol=1e-5)
    assert resize(maps, (4, 6)) is maps


def test_upsample_is_bilinear_and_int_means_square():
    m = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    up = upsample(m, 4)
    assert up.shape == (4, 4)
    assert torch.allclose(up[0], torch.tensor([0.0, 0.25, 0.75, 1.0]))


def test_normalize_modes():
    m = torch.tensor([[[1.0, 3.0], [2.0, 2.0]], [[5.0, 5.0], [5.0, 5.0]]])
    mm = normalize(m, "minmax")
    assert mm[0].min() == 0 and mm[0].max() == 1
    assert torch.equal(mm[1], torch.zeros(2, 2))  # a constant map carries no shape
    assert torch.allclose(normalize(m, "sum").sum((-2, -1)), torch.ones(2))
    assert torch.equal(normalize(m, "mass"), m)
    with pytest.raises(ValueError, match="minmax"):
        normalize(m, "zscore")


def test_thresholds_find_a_blob():
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    truth = ((yy - 10) ** 2 + (xx - 20) ** 2) < 36
    noisy = truth.float() * 0.8 + 0.1 + 0.05 * torch.rand(32, 32, generator=torch.Generator().manual_seed(0))
    t = otsu_threshold(noisy)
    assert 0.2 < t < 0.85
    assert iou(threshold(noisy, "otsu"), truth) > 0.95
    assert iou(threshold(noisy, "mean"), truth) > 0.95
    assert iou(threshold(noisy, 0.5), truth) > 0.95
    batch = threshold(torch.stack([noisy, noisy.flip(-1)]))
    assert batch.shape == (2, 32, 32) and iou(batch[1], truth.flip(-1)) > 0.95


def test_iou_and_mean_iou():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b[1:3] = True  # 8 pixels, 4 shared
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, a) == 1.0 and iou(~a & a, ~a & a) == 1.0
    assert mean_iou([a, a], [b, a]) == pytest.approx((1 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="shape"):
        iou(a, np.zeros((2, 2), bool))
