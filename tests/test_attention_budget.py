"""Attention capture's memory: the plan made before the loop is the bytes stored, max_bytes bounds them, growth laws."""

from __future__ import annotations

import warnings

import pytest
import torch

import sdexplore
from sdexplore.errors import InvalidArgumentError, MemoryBudgetError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.record.attention import AttentionRecorder
from sdexplore.record.budget import grid, layer_scales

PROMPT = "a big red circle at the top left, blue background"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def call(pipe, family: str, steps: int = 3, size: int = 64, **kw):
    args = dict(num_inference_steps=steps, generator=gen(), height=size, width=size, output_type="pt")
    if family == "flux2":
        return pipe(prompt=PROMPT, **args, **kw).images
    if family == "wan":  # a video: 5 frames (2 latent frames) unless asked, its output .frames
        return pipe(prompt=PROMPT, **{"num_frames": 5, **args, "max_sequence_length": 32, **kw}).frames
    return pipe(PROMPT, **args, **kw).images


def record(pipe, family: str, steps: int = 3, size: int = 64, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with AttentionRecorder(pipe, **options) as rec:
            image = call(pipe, family, steps, size)
    return rec, image, [w for w in caught if "max_bytes" in str(w.message)]


@pytest.fixture(scope="module")
def pipes():
    return {}


def pipe_of(pipes, family: str):
    if family not in pipes:
        pipes[family] = tiny_pipeline(family)
    return pipes[family]


@pytest.mark.parametrize(
    "family, options",
    [
        ("sd1", {}),
        ("sd1", {"per_head": True, "keep_probs": True, "negative": True}),
        ("sdxl", {"step_resolution": (3, 5)}),
        ("sd3", {}),
        ("sd3", {"per_head": True, "keep_probs": True}),
        ("flux", {"step_resolution": None}),
        ("flux2", {}),
        ("wan", {}),
        ("wan", {"per_head": True, "keep_probs": True, "step_resolution": (3, 5)}),
    ],
)
def test_the_plan_made_before_the_loop_is_the_bytes_stored(pipes, family, options):
    """The estimate needs no trial step and is exact: a wrong grid, head count or key count breaks it."""
    rec, _, _ = record(pipe_of(pipes, family), family, **options)
    assert rec.budget is not None and not rec.budget.reduced
    assert rec.budget.nbytes == rec.maps.nbytes > 0


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3", "flux", "wan"])
@pytest.mark.parametrize("fraction", [1.0, 0.6, 0.3])
def test_max_bytes_bounds_the_maps_and_only_selects(pipes, family, fraction):
    pipe = pipe_of(pipes, family)
    full, image, _ = record(pipe, family)
    limit = int(full.maps.nbytes * fraction)
    rec, bounded_image, caught = record(pipe, family, max_bytes=limit)
    maps = rec.maps
    assert maps.nbytes <= limit
    assert torch.equal(bounded_image, image)  # observation never changes the image
    if fraction == 1.0:  # a recording that fits is left whole, without a warning
        assert not caught and not rec.budget.reduced
        assert maps.layer_names == full.maps.layer_names
        assert torch.equal(maps.steps, full.maps.steps)
    else:
        assert rec.budget.reduced and len(caught) == 1
        assert set(maps.layer_names) | set(rec.budget.dropped) == set(full.maps.layer_names)
    for name in maps.layer_names:  # the layers kept hold what the unbounded recording holds (batched alike
        # only when the same layers are captured, so to rounding)
        torch.testing.assert_close(maps.layers[name], full.maps.layers[name], rtol=1e-5, atol=1e-7)


def test_the_budget_keeps_the_coarsest_layers_first():
    pipe = sdexplore.load_pipeline()  # the embedded UNet: layers at 16×16 and 8×8 (the fixture's are all 4×4)
    full, _, _ = record(pipe, "sd1", step_resolution=None)
    sizes = {n: m.shape[-2] * m.shape[-1] for n, m in full.maps.layers.items()}
    coarse = min(sizes.values())
    rec, _, _ = record(pipe, "sd1", step_resolution=None, max_bytes=full.maps.nbytes - 1)
    dropped = rec.budget.dropped
    assert coarse < max(sizes.values())
    assert dropped and all(sizes[n] > coarse for n in dropped)
    assert all(sizes[n] <= min(sizes[d] for d in dropped) for n in rec.maps.layer_names)


def test_a_budget_below_the_smallest_recording_stops_before_the_first_step():
    pipe = tiny_pipeline("sd1")
    calls = []
    handle = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    processors = dict(pipe.unet.attn_processors)
    try:
        with pytest.raises(MemoryBudgetError, match="max_bytes=1,000 is below"):
            with AttentionRecorder(pipe, max_bytes=1000):
                call(pipe, "sd1")
    finally:
        handle.remove()
    assert calls == []  # the denoiser never ran
    assert all(pipe.unet.attn_processors[n] is p for n, p in processors.items())


def test_a_recording_larger_than_free_memory_is_refused_naming_the_option(monkeypatch):
    pipe = tiny_pipeline("sd1")
    monkeypatch.setenv("SDEXPLORE_AVAILABLE_BYTES", "400000")
    with pytest.raises(MemoryBudgetError, match="max_bytes") as err:
        with sdexplore.observe(pipe, steps=False, attention={"keep_probs": True}):
            call(pipe, "sd1")
    assert "Nothing has run yet" in str(err.value)
    # within the machine's memory once bounded (twice the maps on the CPU: sums and the host copy)
    with pytest.warns(UserWarning, match="recording 1 of 4 attention layers"):
        with sdexplore.observe(pipe, steps=False, attention={"keep_probs": True, "max_bytes": 190000}) as obs:
            call(pipe, "sd1")
    assert obs.attention.nbytes <= 190000


@pytest.mark.parametrize("bad", [0, -5, True, 1.5, "300MB", float("nan")])
def test_max_bytes_must_be_a_positive_whole_number(bad):
    with pytest.raises(InvalidArgumentError, match="max_bytes"):
        AttentionRecorder(tiny_pipeline("sd1"), max_bytes=bad)


def test_layer_scales_follow_the_unets_samplers():
    """SDXL-like layouts: a down block without attention, and the last blocks without samplers."""
    unet = tiny_pipeline("sdxl").unet
    names = [n.removesuffix(".processor") for n in unet.attn_processors if n.endswith("attn2.processor")]
    scales = layer_scales(unet, names, 1)
    pipe = tiny_pipeline("sdxl")
    with AttentionRecorder(pipe, step_resolution=None) as rec:
        call(pipe, "sdxl")
    latent = rec.maps.latent_size
    for name, m in rec.maps.layers.items():
        assert grid(latent, scales[name]) == tuple(m.shape[-2:]), name


# ---- growth laws: what the stored maps grow with ----------------------------------------------------------------
def test_growth_law_of_attention_capture_in_image_tokens_and_layers():
    """Stored bytes = fixed (aggregate) + per-step maps + layers' maps; the layers' part grows as image tokens ×
    layers (× text tokens, fixed at 77 for CLIP), the aggregate as image tokens."""
    pipe = tiny_pipeline("sd1")
    layer_part, recs = {}, {}
    for size in (64, 128):
        rec, _, _ = recs[size] = record(pipe, "sd1", size=size, step_resolution=None)
        maps = rec.maps
        layer_part[size] = sum(m.numel() * 4 for m in maps.layers.values())
        assert maps.nbytes == layer_part[size] + maps.aggregate.numel() * 4 + maps.timesteps.numel() * 4
    assert layer_part[128] == 4 * layer_part[64]  # exponent 1 in image tokens (4× the pixels)
    rec = recs[64][0]
    names = rec.maps.layer_names
    per_layer = []
    for k in (1, 2, 4):
        with AttentionRecorder(pipe, step_resolution=None, layers=names[:k]) as r:
            call(pipe, "sd1")
        per_layer.append(sum(m.numel() for m in r.maps.layers.values()))
    sizes = [rec.maps.layers[n].numel() for n in names[:4]]
    assert per_layer == [sum(sizes[:1]), sum(sizes[:2]), sum(sizes[:4])]  # exponent 1 in layers


def test_growth_law_of_attention_capture_in_text_tokens():
    pipe = tiny_pipeline("flux")
    sizes = []
    for length in (32, 64):
        with AttentionRecorder(pipe, step_resolution=None) as rec:
            call(pipe, "flux", max_sequence_length=length)
        maps = rec.maps
        sizes.append(maps.nbytes - maps.timesteps.numel() * 4)
    assert int(rec.maps.aggregate.shape[1]) == 64  # Flux's text keys are T5's tokens alone (CLIP is pooled)
    assert sizes[1] == 2 * sizes[0]  # exponent 1 in text tokens


def test_growth_law_of_step_recording_in_steps():
    """Doubling the steps doubles the per-step maps and the trace, and nothing else."""
    pipe = tiny_pipeline("sd1")
    out = {}
    for steps in (3, 6):
        with sdexplore.observe(pipe, steps=True, attention=True) as obs:
            call(pipe, "sd1", steps=steps)
        maps = obs.attention
        fixed = maps.nbytes - maps.steps.numel() * 4 - maps.timesteps.numel() * 4
        trace = obs.runs[0]
        final = trace.final_latents.numel() * trace.final_latents.element_size()
        out[steps] = (fixed, maps.steps.numel(), trace.nbytes - final)  # the trace's steps part
    assert out[6][0] == out[3][0]  # layers and aggregate: unchanged
    assert out[6][1] == 2 * out[3][1]
    assert out[6][2] == 2 * out[3][2]


def test_growth_law_of_attention_capture_in_frames():
    """A video's maps grow as its frames: every stored map (aggregate, layers, per-step, per head, probabilities)
    carries the F axis, the timesteps do not; the plan counts it exactly."""
    pipe = tiny_pipeline("wan")
    sizes = {}
    for frames in (5, 9):  # 2 and 3 latent frames (the VAE's 4× in time, the first frame alone)
        with AttentionRecorder(pipe, per_head=True, keep_probs=True) as rec:
            call(pipe, "wan", num_frames=frames)
        maps = rec.maps
        assert rec.budget.nbytes == maps.nbytes
        assert maps.aggregate.shape[2] == maps.frames == (frames - 1) // 4 + 1
        sizes[maps.frames] = maps.nbytes - maps.timesteps.numel() * 4
    assert 2 * sizes[3] == 3 * sizes[2]  # exponent 1 in frames
