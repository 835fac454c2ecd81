"""Walks: endpoints equal plain calls, batch-size invariance, errors, save/load, smoothness, refinement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import gen
from diffusers import EulerAncestralDiscreteScheduler

from sdexplore.errors import InterpolationError, ResultFileError
from sdexplore.fixtures import MMDIT_FIXTURE_FAMILIES, tiny_pipeline
from sdexplore.interpolate import slerp
from sdexplore.record.tokens import default_max_sequence_length
from sdexplore.smoothness import frame_distances, gini, insertion_plan, smoothness_report
from sdexplore.text import encode_prompt
from sdexplore.walks import CPU_MAX_BATCH, Walk, auto_batch_size, refine, walk

PROMPTS = ["a red circle", "a blue square"]
FAST = dict(num_inference_steps=3, progress=False)
MODEL_DIR = Path(__file__).resolve().parents[1] / "sdexplore" / "models" / "tiny-shapes"


def _plain(pipe, prompt, seed, **kw):
    """A plain pipeline call, as uint8 frames (the walk's storage)."""
    out = pipe(prompt, generator=gen(seed), output_type="np", num_inference_steps=3, **kw).images[0]
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def _close(x: np.ndarray, y: np.ndarray) -> bool:
    """Equal up to one uint8 level (fp32 rounding across batch shapes); wrong noise/conditioning is far off."""
    return int(np.abs(x.astype(int) - y.astype(int)).max()) <= 1


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_endpoints_equal_plain_calls_and_batch_size_does_not_matter(family, request):
    pipe = request.getfixturevalue(f"{family}_pipe")
    w1 = walk(pipe, PROMPTS, seeds=[0, 1], frames=3, batch_size=1, **FAST)
    w3 = walk(pipe, PROMPTS, seeds=[0, 1], frames=3, batch_size=2, **FAST)
    assert w1.images.shape == (3, 64, 64, 3) and w1.images.dtype == np.uint8
    assert _close(w1.images, w3.images)
    # guidance left unset: the pipeline's own default (SDXL 5.0, SD 7.5), as in the plain call
    assert _close(w1.images[0], _plain(pipe, PROMPTS[0], 0))
    assert _close(w1.images[-1], _plain(pipe, PROMPTS[1], 1))
    assert not _close(w1.images[1], w1.images[0]) and not _close(w1.images[1], w1.images[-1])
    assert w1.keyframe_frames == [0, 2] and w1.settings["family"] == family


def test_stochastic_scheduler_endpoints_and_batch_invariance(sd1_pipe):
    sd1_pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(sd1_pipe.scheduler.config)
    a = walk(sd1_pipe, "a red circle", seeds=[4, 5], frames=3, batch_size=3, guidance_scale=3.0, **FAST)
    b = walk(sd1_pipe, "a red circle", seeds=[4, 5], frames=3, batch_size=1, guidance_scale=3.0, **FAST)
    assert a.settings["scheduler"] == "EulerAncestralDiscreteScheduler"
    assert _close(a.images, b.images)
    assert _close(a.images[0], _plain(sd1_pipe, "a red circle", 4, guidance_scale=3.0))
    assert _close(a.images[-1], _plain(sd1_pipe, "a red circle", 5, guidance_scale=3.0))


def test_pass_through_arguments_and_negative_prompt(sd1_pipe):
    w = walk(sd1_pipe, PROMPTS, seeds=2, frames=2, negative_prompt="blurry", height=48, width=64, **FAST)
    assert w.images.shape == (2, 48, 64, 3)
    ref = _plain(sd1_pipe, PROMPTS[1], 2, negative_prompt="blurry", height=48, width=64)
    assert _close(w.images[1], ref)


def test_encoded_prompt_keyframes(sd1_pipe):
    a = encode_prompt(sd1_pipe, PROMPTS[0])
    w = walk(sd1_pipe, [a, PROMPTS[1]], seeds=0, frames=2, **FAST)
    assert w.prompts == [PROMPTS[0], PROMPTS[1]]
    assert _close(w.images[0], _plain(sd1_pipe, PROMPTS[0], 0))


def test_walk_restores_progress_bar_config(sd1_pipe):
    sd1_pipe.set_progress_bar_config(disable=False, leave=False)
    walk(sd1_pipe, PROMPTS, frames=2, **FAST)
    assert sd1_pipe._progress_bar_config == {"disable": False, "leave": False}


def test_walk_errors(sd1_pipe, sdxl_pipe):
    with pytest.raises(InterpolationError, match="at least 2 keyframes"):
        walk(sd1_pipe, "a red circle", seeds=0, frames=4, **FAST)
    with pytest.raises(InterpolationError, match="frames must be at least 2"):
        walk(sd1_pipe, PROMPTS, frames=1, **FAST)
    with pytest.raises(InterpolationError, match="keyframes"):
        walk(sd1_pipe, PROMPTS, seeds=[0, 1, 2], frames=4, **FAST)
    with pytest.raises(InterpolationError, match="sdxl"):
        walk(sd1_pipe, [encode_prompt(sdxl_pipe, "x"), "y"], frames=3, **FAST)
    enc = encode_prompt(sd1_pipe, "x")
    enc.prompt_embeds = enc.prompt_embeds[:, :20]  # (1, 20, 32): a different token count
    with pytest.raises(InterpolationError, match="shapes"):
        walk(sd1_pipe, [enc, "y"], frames=3, **FAST)
    with pytest.raises(InterpolationError, match="latents"):
        walk(sd1_pipe, PROMPTS, frames=3, latents=torch.zeros(1), **FAST)


def test_auto_batch_size_on_cpu_is_capped_and_evened(sd1_pipe):
    assert auto_batch_size(sd1_pipe, 3) == 3
    assert auto_batch_size(sd1_pipe, 9) == 3  # cap 4 → three batches of 3, not 4 + 4 + 1
    assert auto_batch_size(sd1_pipe, 100) <= CPU_MAX_BATCH


def test_loop_and_seed_walk(sd1_pipe):
    w = walk(sd1_pipe, "a red circle", seeds=[0, 1], frames=4, loop=True, **FAST)
    assert w.keyframe_frames == [0, 2] and w.settings["loop"]
    assert _close(w.images[2], _plain(sd1_pipe, "a red circle", 1))
    assert not _close(w.images[3], w.images[0])  # the loop closes without a duplicate frame


def test_save_load_round_trip_and_bad_files(sd1_pipe, tmp_path):
    w = walk(sd1_pipe, PROMPTS, seeds=[0, 1], frames=3, **FAST)
    path = w.save(tmp_path / "walk.safetensors")
    back = Walk.load(path)
    assert np.array_equal(back.images, w.images)
    assert (back.prompts, back.seeds, back.ts, back.settings) == (w.prompts, w.seeds, w.ts, w.settings)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "cut.safetensors.json").write_text((tmp_path / "walk.safetensors.json").read_text())
    with pytest.raises(ResultFileError, match="not a readable"):
        Walk.load(tmp_path / "cut.safetensors")
    short = Walk(w.images[:2], w.prompts, w.seeds, w.segments, w.ts, w.keyframe_frames, w.settings)
    short.save(tmp_path / "short.safetensors")
    (tmp_path / "short.safetensors.json").write_text((tmp_path / "walk.safetensors.json").read_text())
    with pytest.raises(ResultFileError, match="does not match"):
        Walk.load(tmp_path / "short.safetensors")
    with pytest.raises(ResultFileError, match="Need both"):
        Walk.load(tmp_path / "missing.safetensors")


def test_smoothness_metrics_on_synthetic_frames():
    ramp = np.stack([np.full((8, 8, 3), v, np.float32) for v in np.linspace(0, 1, 6)])
    even = smoothness_report(ramp)
    np.testing.assert_allclose(even.distances, 0.2, atol=1e-6)
    assert even.smoothness == pytest.approx(1.0)
    jumpy = np.stack([np.full((8, 8, 3), v, np.float32) for v in (0, 0.05, 0.1, 0.9, 0.95, 1.0)])
    rep = smoothness_report(jumpy, top=1)
    assert rep.jumps == [2] and rep.max == pytest.approx(0.8, abs=1e-6)
    assert rep.smoothness < 0.5
    assert "2→3" in str(rep)
    assert frame_distances(jumpy, "lowres").shape == (5,)
    assert gini(np.array([0, 0, 0, 1.0])) == pytest.approx(0.75)
    assert insertion_plan(np.array([1.0, 4.0, 1.0]), 3) == [0, 3, 0]
    with pytest.raises(ValueError, match="metric"):
        frame_distances(jumpy, "lpips")  # type: ignore[arg-type]


def test_refine_inserts_frames_where_the_walk_jumps(sd1_pipe):
    w2 = walk(sd1_pipe, PROMPTS, seeds=[0, 1], frames=2, **FAST)
    w3 = walk(sd1_pipe, PROMPTS, seeds=[0, 1], frames=3, **FAST)
    r = refine(sd1_pipe, w2, 1, progress=False)
    assert len(r) == 3 and r.ts == [0.0, 0.5, 1.0] and r.keyframe_frames == [0, 2]
    assert _close(r.images, w3.images)  # the inserted frame is the walk's own midpoint
    assert r.smoothness().max < w2.smoothness().max


def test_walk_with_observe_keeps_per_frame_summaries_and_restores(sd1_pipe):
    procs = dict(sd1_pipe.unet.attn_processors)
    step = sd1_pipe.scheduler.step
    plain = walk(sd1_pipe, PROMPTS, seeds=[0, 1], frames=3, batch_size=2, **FAST)
    seen = walk(
        sd1_pipe,
        PROMPTS,
        seeds=[0, 1],
        frames=3,
        batch_size=2,
        observe={"steps": True, "attention": True},
        **FAST,
    )
    assert _close(seen.images, plain.images)  # observation never changes the result
    assert len(seen.summaries) == 3
    assert len(seen.summaries[0]["timesteps"]) == 3 and len(seen.summaries[0]["attention_mass"]) == 77
    assert seen.summaries[0]["noise_norm"] != seen.summaries[2]["noise_norm"]  # per frame, not per batch
    after = sd1_pipe.unet.attn_processors
    assert all(after[k] is v for k, v in procs.items())
    assert sd1_pipe.scheduler.step == step


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


@pytest.mark.slow
def test_red_to_blue_walk_changes_colour_monotonically():
    """On the embedded model, a walk from a red to a blue circle turns the circle from red to blue.

    Measured on the central 6×6 pixels, inside a big circle at the center whatever its jitter (radius ≥ 7.8 px,
    shift ≤ 1.5 px). Measured (tiny-shapes of 2026-11-26 after its second CPU fine-tune, seeds 0–3): keyframes
    read red and blue, R − B falls from about +250 to −255, Spearman ρ = −0.98 (ties at −255) for every seed.
    """
    from diffusers import StableDiffusionPipeline

    from sdexplore.embedded.scenes import COLOURS

    pipe = StableDiffusionPipeline.from_pretrained(str(MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a big {c} circle at the center on a white background" for c in ("red", "blue")]
    w = walk(pipe, prompts, seeds=0, frames=9, num_inference_steps=20, progress=False)
    centres = [frame[29:35, 29:35].reshape(-1, 3).astype(float) for frame in w.images]  # (36, 3) each

    def name(pixels: np.ndarray) -> str:
        median = np.median(pixels, axis=0)
        return min(COLOURS, key=lambda c: float(np.linalg.norm(np.array(COLOURS[c], float) - median)))

    assert (name(centres[0]), name(centres[-1])) == ("red", "blue")
    red_minus_blue = np.array([c[:, 0].mean() - c[:, 2].mean() for c in centres])
    rho = _spearman(np.arange(len(w)), red_minus_blue)
    assert rho <= -0.9, f"R−B over frames {np.round(red_minus_blue, 1)} (Spearman {rho:.2f})"


# ---- the MMDiT families (SD3, Flux): T5 sequence and pooled CLIP vector slerped, Flux's latents packed ---------
@pytest.mark.parametrize("family", MMDIT_FIXTURE_FAMILIES)
def test_mmdit_walk_endpoints_equal_plain_calls_and_batch_size_does_not_matter(family):
    pipe = tiny_pipeline(family)
    size = dict(height=64, width=64)
    w1 = walk(pipe, PROMPTS, seeds=[0, 1], frames=3, batch_size=1, **size, **FAST)
    w2 = walk(pipe, PROMPTS, seeds=[0, 1], frames=3, batch_size=2, **size, **FAST)
    assert w1.images.shape == (3, 64, 64, 3) and w1.settings["family"] == family
    assert w1.settings["max_sequence_length"] == default_max_sequence_length(pipe)
    assert _close(w1.images, w2.images)
    assert _close(w1.images[0], _plain(pipe, PROMPTS[0], 0, **size))
    assert _close(w1.images[-1], _plain(pipe, PROMPTS[1], 1, **size))
    assert not _close(w1.images[1], w1.images[0]) and not _close(w1.images[1], w1.images[-1])


def test_sd3_walk_keeps_the_calls_max_sequence_length_and_interpolates_t5_and_pooled():
    pipe = tiny_pipeline("sd3")
    a, b = (encode_prompt(pipe, p, max_sequence_length=32) for p in PROMPTS)
    assert a.prompt_embeds.shape[1] == 77 + 32 and a.pooled_prompt_embeds is not None
    mid = a.combine([b], lambda x, y: slerp(x, y, 0.5))
    for name in ("prompt_embeds", "pooled_prompt_embeds"):  # both move: T5's positions and the pooled vector
        x, y, m = getattr(a, name), getattr(b, name), getattr(mid, name)
        assert not torch.equal(m, x) and not torch.equal(m, y)
    t5 = slice(77, None)
    assert torch.allclose(
        mid.prompt_embeds[:, t5], slerp(a.prompt_embeds[:, t5], b.prompt_embeds[:, t5], 0.5)
    )
    w = walk(pipe, PROMPTS, seeds=0, frames=2, max_sequence_length=32, **FAST)
    assert w.settings["max_sequence_length"] == 32
    assert _close(w.images[1], _plain(pipe, PROMPTS[1], 0, max_sequence_length=32))


def test_sd3_walk_saves_loads_and_refines_with_its_t5_length(tmp_path):
    pipe = tiny_pipeline("sd3")
    w = walk(pipe, PROMPTS, seeds=0, frames=2, max_sequence_length=32, **FAST)
    back = Walk.load(w.save(tmp_path / "walk.safetensors"))
    assert back.settings == w.settings and np.array_equal(back.images, w.images)
    finer = refine(pipe, back, 1, progress=False)
    assert len(finer) == 3 and np.array_equal(finer.images[[0, 2]], w.images)
    three = walk(pipe, PROMPTS, seeds=0, frames=3, max_sequence_length=32, **FAST)
    assert _close(finer.images[1], three.images[1])  # the midpoint, encoded at the walk's T5 length


# ---- image keyframes: a picture inverted (sdexplore.invert), then walked like a prompt keyframe -------------------
@pytest.fixture(scope="module")
def pictures() -> list[np.ndarray]:
    from sdexplore.embedded.scenes import render_scene

    return [
        render_scene(p, seed=3)[0] for p in ("a big red circle at the left", "a small blue square at the top")
    ]  # (64, 64, 3) each


def test_inverted_keyframes_reconstruct_their_pictures_and_the_pipeline_is_restored(sd1_pipe, pictures):
    """An Inversion keyframe's frame is its reconstruction (the inverted noise and its prompt, with the inversion's
    DDIM scheduler, steps and CFG); the pipeline keeps its own scheduler object."""
    from sdexplore.inversion import invert

    scheduler = sd1_pipe.scheduler  # PNDM: the walk swaps in DDIM for the image keyframes and puts it back
    a, b = (invert(sd1_pipe, pic, p, steps=3, iterations=1) for pic, p in zip(pictures, PROMPTS, strict=True))
    w = walk(sd1_pipe, [a, b], frames=3, batch_size=2, progress=False)
    assert sd1_pipe.scheduler is scheduler
    assert w.settings["scheduler"] == "DDIMScheduler" and w.settings["image_keyframes"] == [0, 1]
    assert (w.settings["num_inference_steps"], w.settings["guidance_scale"]) == (3, 1.0)  # the inversions'
    assert w.prompts == PROMPTS
    assert _close(w.images[0], a.reconstruction) and _close(w.images[-1], b.reconstruction)
    assert not _close(w.images[1], w.images[0]) and not _close(w.images[1], w.images[-1])
    with pytest.raises(InterpolationError, match="image keyframes"):
        refine(sd1_pipe, w, 1, progress=False)


def test_inverted_keyframes_on_sd3_walk_with_its_flow_scheduler(pictures):
    """SD3: flow inversion keyframes, walked with the pipeline's own flow-matching Euler scheduler."""
    from sdexplore.inversion import invert

    pipe = tiny_pipeline("sd3")
    a, b = (invert(pipe, pic, p, steps=2, iterations=1) for pic, p in zip(pictures, PROMPTS, strict=True))
    w = walk(pipe, [a, b], frames=3, progress=False)
    assert w.settings["scheduler"] == "FlowMatchEulerDiscreteScheduler" and a.method == "flow"
    assert _close(w.images[0], a.reconstruction) and _close(w.images[-1], b.reconstruction)
    assert not _close(w.images[1], w.images[0])


def test_images_argument_inverts_with_the_keyframes_prompt(sd1_pipe, pictures):
    """images=[picture, None]: the picture is inverted with keyframe 0's prompt at the walk's steps and CFG
    (negative-prompt inversion above CFG 1, so the endpoint still reconstructs it); keyframe 1 is prompt + seed."""
    from sdexplore.inversion import invert

    w = walk(
        sd1_pipe, PROMPTS, seeds=[0, 1], images=[pictures[0], None], frames=2, guidance_scale=3.0, **FAST
    )
    inv = invert(sd1_pipe, pictures[0], PROMPTS[0], steps=3, guidance=3.0, method="negative-prompt")
    assert w.settings["image_keyframes"] == [0]
    assert _close(w.images[0], inv.reconstruction)
    with _ddim(sd1_pipe):  # the seed keyframe: a plain call with the walk's (DDIM) scheduler
        assert _close(w.images[1], _plain(sd1_pipe, PROMPTS[1], 1, guidance_scale=3.0))


def _ddim(pipe):
    from sdexplore.inversion import _ddim_scheduler, _scheduler

    return _scheduler(pipe, _ddim_scheduler(pipe))


def test_image_keyframe_errors_come_before_any_work(sd1_pipe, pictures, monkeypatch):
    from sdexplore.errors import InvalidArgumentError
    from sdexplore.inversion import invert

    a = invert(sd1_pipe, pictures[0], PROMPTS[0], steps=3, iterations=0)
    b = invert(sd1_pipe, pictures[1], PROMPTS[1], steps=2, iterations=0)
    monkeypatch.setattr(sd1_pipe.vae, "encode", lambda *x, **k: pytest.fail("work started"))
    monkeypatch.setattr(sd1_pipe.unet, "forward", lambda *x, **k: pytest.fail("work started"))
    with pytest.raises(InterpolationError, match="num_inference_steps=2"):
        walk(sd1_pipe, [a, b], frames=3, progress=False)
    with pytest.raises(InterpolationError, match="num_inference_steps"):
        walk(sd1_pipe, [a, "a blue square"], seeds=[0, 1], frames=3, num_inference_steps=5, progress=False)
    with pytest.raises(InterpolationError, match="no negative_prompt"):
        walk(sd1_pipe, [a, "a blue square"], frames=3, negative_prompt="blurry", progress=False)
    with pytest.raises(InterpolationError, match="one per keyframe"):
        walk(sd1_pipe, PROMPTS, images=[pictures[0]], frames=3, progress=False)
    with pytest.raises(InvalidArgumentError, match="not an image file"):
        walk(sd1_pipe, PROMPTS, images=[b"junk", None], frames=3, progress=False)
    with pytest.raises(InterpolationError, match="inverted with a sd3"):
        walk(sd1_pipe, [invert(tiny_pipeline("sd3"), pictures[0], steps=1, iterations=0), "x"], frames=2)
    with pytest.raises(InterpolationError, match="not accepted"):
        walk(sd1_pipe, [a, 3], frames=2, progress=False)


def test_mmdit_walk_sizes_are_multiples_of_the_transformer_patch() -> None:
    flux = tiny_pipeline("flux")  # 8-pixel VAE cells in 2x2 patches: FluxPipeline would round 72 down to 64
    with pytest.raises(InterpolationError, match="multiple of 16"):
        walk(flux, ["a red circle", "a blue square"], height=72, width=64, frames=2)
