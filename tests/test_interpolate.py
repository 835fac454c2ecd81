"""Interpolation math: slerp properties, norm-keeping noise paths, circles, keyframe schedules, arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from sdexplore.errors import InterpolationError
from sdexplore.interpolate import (
    add_direction,
    circular,
    ease,
    interpolate_path,
    keyframe_schedule,
    lerp,
    noise_slerp,
    slerp,
)


def _angle(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x.double(), y.double()
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    return torch.arccos(cos.clamp(-1, 1))


def _pair(shape=(1, 77, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_slerp_endpoints_are_exact():
    a, b = _pair()
    assert torch.equal(slerp(a, b, 0.0), a)
    assert torch.equal(slerp(a, b, 1.0), b)
    path = slerp(a, b, [0.0, 0.5, 1.0])
    assert path.shape == (3, *a.shape)
    assert torch.equal(path[0], a) and torch.equal(path[2], b)


def test_slerp_constant_angular_speed_per_token():
    a, b = _pair()
    theta = _angle(a, b)  # (1, 77)
    ts = torch.linspace(0, 1, 9)
    path = slerp(a, b, ts)  # (9, 1, 77, 32)
    for t, x in zip(ts, path, strict=True):
        torch.testing.assert_close(_angle(a, x), t.double() * theta, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_angle(x, b), (1 - t.double()) * theta, atol=1e-5, rtol=1e-5)


def test_slerp_preserves_equal_norms_and_lerps_unequal_ones():
    a, b = _pair()
    b = b / b.norm(dim=-1, keepdim=True) * a.norm(dim=-1, keepdim=True)  # equal norms per token
    for t in (0.1, 0.5, 0.9):
        torch.testing.assert_close(slerp(a, b, t).norm(dim=-1), a.norm(dim=-1), rtol=1e-5, atol=1e-5)
    c = 3 * b
    mid = slerp(a, c, 0.5).norm(dim=-1)
    torch.testing.assert_close(mid, 0.5 * a.norm(dim=-1) + 0.5 * c.norm(dim=-1), rtol=1e-5, atol=1e-5)
    # plain lerp shrinks the norm of two non-parallel vectors: slerp must not
    assert (lerp(a, b, 0.5).norm(dim=-1) < a.norm(dim=-1) * 0.99).all()


def test_slerp_and_lerp_agree_for_nearly_parallel_inputs_without_nan():
    a, _ = _pair()
    tiny = 1e-6 * torch.randn(a.shape, generator=torch.Generator().manual_seed(3))
    for b in (a.clone(), a + tiny, a * 1.5):
        for t in (0.25, 0.5, 0.75):
            s = slerp(a, b, t)
            assert torch.isfinite(s).all()
            torch.testing.assert_close(s, lerp(a, b, t), atol=1e-5, rtol=1e-5)


def test_slerp_antipodal_raises_and_zero_norm_falls_back_to_lerp():
    a, b = _pair()
    with pytest.raises(InterpolationError, match="opposite"):
        slerp(a, -a, 0.5)
    zero = torch.zeros_like(a)
    torch.testing.assert_close(slerp(zero, b, 0.3), 0.3 * b)  # documented fallback
    assert torch.equal(slerp(zero, zero, 0.5), zero)  # e.g. SDXL's zeroed negative embeddings


def test_mismatched_shapes_raise():
    a, _ = _pair()
    with pytest.raises(InterpolationError, match="shape"):
        slerp(a, a[:, :10], 0.5)
    with pytest.raises(InterpolationError):
        lerp(a, a[0], 0.5)
    with pytest.raises(InterpolationError):
        noise_slerp(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 9), 0.5)


def test_noise_slerp_keeps_the_expected_norm_and_lerp_does_not():
    a, b = _pair((1, 4, 64, 64), seed=1)
    d = a.numel()
    ts = torch.linspace(0, 1, 11)
    norms = noise_slerp(a, b, ts).flatten(1).norm(dim=1)  # (11, d) → (11,)
    assert ((norms / math.sqrt(d) - 1).abs() < 0.01).all()
    mid_lerp = lerp(a, b, 0.5).norm() / math.sqrt(d)
    assert 0.65 < mid_lerp < 0.75  # ≈ 1/√2: the 29% loss a walk must avoid
    assert torch.equal(noise_slerp(a, b, 0.0), a) and torch.equal(noise_slerp(a, b, 1.0), b)


def test_circular_walk_passes_keyframes_and_loops_seamlessly():
    a, b = _pair((1, 4, 32, 32), seed=2)
    assert torch.equal(circular(a, b, 0.0), a)
    assert torch.equal(circular(a, b, 1.0), a)  # loops back exactly
    torch.testing.assert_close(circular(a, b, 0.25), b, atol=1e-6, rtol=0)
    d = a.numel()
    norms = circular(a, b, torch.arange(16) / 16).flatten(1).norm(dim=1)
    assert ((norms / math.sqrt(d) - 1).abs() < 0.03).all()


def test_add_direction_is_embedding_arithmetic():
    a, b = _pair()
    torch.testing.assert_close(add_direction(a, a, b), b)
    x = torch.randn_like(a)
    torch.testing.assert_close(add_direction(x, a, b, scale=0.5) - x, 0.5 * (b - a))
    with pytest.raises(InterpolationError):
        add_direction(x, a[:, :5], b)


def test_keyframe_schedule_places_every_keyframe_on_a_frame():
    s = keyframe_schedule(3, 9)
    assert len(s) == 9 and s.keyframe_frames == [0, 4, 8]
    for k, f in enumerate(s.keyframe_frames[:-1]):
        assert (s.segments[f], s.ts[f]) == (k, 0.0)
    assert (s.segments[-1], s.ts[-1]) == (1, 1.0)
    steps = [s.ts[i + 1] - s.ts[i] for i in range(3)]
    assert all(abs(x - 0.25) < 1e-12 for x in steps)  # even spacing inside a segment


def test_eased_spacing_is_slow_at_keyframes():
    s = keyframe_schedule(2, 11, spacing="ease")
    steps = [s.ts[i + 1] - s.ts[i] for i in range(10)]
    assert steps[0] < steps[5] and steps[-1] < steps[5]
    assert s.ts[0] == 0.0 and s.ts[-1] == 1.0
    assert ease(0.5, "ease") == pytest.approx(0.5)


def test_loop_schedule_returns_to_the_start_without_repeating_it():
    s = keyframe_schedule(2, 8, loop=True)
    assert s.keyframe_frames == [0, 4]
    assert s.segments[-1] == 1 and 0 < s.ts[-1] < 1  # heading back to keyframe 0, not on it
    kf = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    path = interpolate_path(kf, s)
    assert torch.equal(path[0], kf[0]) and torch.equal(path[4], kf[1])
    assert not torch.equal(path[-1], kf[0])


@pytest.mark.parametrize(
    ("keys", "frames", "kwargs", "match"),
    [(1, 10, {}, "at least 2 keyframes"), (2, 1, {}, "at least 2 frames"), (5, 3, {}, "cannot hold")],
)
def test_schedule_errors(keys, frames, kwargs, match):
    with pytest.raises(InterpolationError, match=match):
        keyframe_schedule(keys, frames, **kwargs)
    with pytest.raises(InterpolationError, match="spacing"):
        keyframe_schedule(2, 4, spacing="bouncy")  # type: ignore[arg-type]


def test_interpolate_path_checks_keyframes():
    s = keyframe_schedule(2, 5)
    with pytest.raises(InterpolationError, match="different shapes"):
        interpolate_path([torch.zeros(3), torch.zeros(4)], s)
    with pytest.raises(InterpolationError, match="method"):
        interpolate_path([torch.ones(3), torch.ones(3)], s, method="cubic")  # type: ignore[arg-type]
    a, b = _pair((4, 8, 8))
    path = interpolate_path([a, b], s, method="noise")
    assert path.shape == (5, 4, 8, 8)
    torch.testing.assert_close(path[2], noise_slerp(a, b, 0.5))
