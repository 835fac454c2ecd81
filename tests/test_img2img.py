"""img2img and inpainting pipelines under observe: images unchanged, partial schedules labelled, the mask kept."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_restored, gen, pipeline_state
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    UNet2DConditionModel,
)
from PIL import Image

import sdexplore as sdx
from sdexplore.errors import InvalidArgumentError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.masks import load_mask, mask_array
from sdexplore.views.render import draw_mask_outline, heat_overlay, mask_outline

PROMPT = "a red circle"
CLASSES = {
    "sd1-img2img": ("sd1", StableDiffusionImg2ImgPipeline),
    "sd1-inpaint": ("sd1", StableDiffusionInpaintPipeline),
    "sdxl-img2img": ("sdxl", StableDiffusionXLImg2ImgPipeline),
    "sdxl-inpaint": ("sdxl", StableDiffusionXLInpaintPipeline),
    "sd3-img2img": ("sd3", StableDiffusion3Img2ImgPipeline),
    "sd3-inpaint": ("sd3", StableDiffusion3InpaintPipeline),
}


@pytest.fixture(scope="module")
def bases() -> dict:
    return {fam: tiny_pipeline(fam) for fam in ("sd1", "sdxl", "sd3")}


def _picture() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))


def _mask(size: tuple[int, int] = (64, 64)) -> Image.Image:
    m = Image.new("L", (size[1], size[0]), 0)
    m.paste(255, (16, 24, 48, 56))  # left, top, right, bottom
    return m


def _build(bases: dict, name: str):
    fam, cls = CLASSES[name]
    pipe = cls(**bases[fam].components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, strength: float = 0.5, steps: int = 4, **extra):
    kw = dict(prompt=PROMPT, image=_picture(), strength=strength, num_inference_steps=steps, output_type="np")
    if "Inpaint" in type(pipe).__name__:
        kw.update(mask_image=_mask(), height=64, width=64)
    kw.update(extra)
    return pipe(**kw, generator=gen(0)).images


@pytest.mark.parametrize("name", list(CLASSES))
def test_observed_img2img_and_inpainting_equal_a_plain_call_and_label_the_schedule_tail(bases, name) -> None:
    pipe = _build(bases, name)
    plain = _call(pipe)
    before = pipeline_state(pipe)
    with sdx.observe(pipe, steps=True, attention=not name.startswith("sd3")) as obs:
        seen = _call(pipe)
    assert_restored(pipe, before)
    np.testing.assert_array_equal(seen, plain)  # bitwise: observation never changes the image
    trace = obs.steps
    schedule = pipe.scheduler.timesteps.float().tolist()
    # strength 0.5 of 4 steps: the loop runs the schedule's last 2 steps, and the records say which
    assert trace.num_steps == 2 and trace.indices == [0, 1]
    assert trace.meta["schedule_begin"] == 2 and trace.meta["schedule_length"] == 4
    assert trace.schedule_indices == [2, 3]
    assert trace.timesteps.tolist() == pytest.approx(schedule[2:])
    if not name.startswith("sd3"):  # DDIM: the noise level is ᾱ at the step's own timestep
        acp = pipe.scheduler.alphas_cumprod
        assert [s.alpha_bar for s in trace] == pytest.approx([float(acp[int(t)]) for t in schedule[2:]])
        assert obs.attention.num_steps == 2
        assert obs.attention.timesteps.tolist() == pytest.approx(schedule[2:])
    if "inpaint" in name:
        assert obs.mask is not None and tuple(obs.mask.shape) == (1, 64, 64)
        np.testing.assert_array_equal(obs.mask[0].numpy(), np.asarray(_mask()) / 255.0)
    else:
        assert obs.mask is None


def test_euler_partial_schedule_reads_the_sigmas_of_the_tail(bases) -> None:
    pipe = _build(bases, "sd1-img2img")
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    plain = _call(pipe, strength=0.6, steps=5)
    with sdx.observe(pipe) as obs:
        seen = _call(pipe, strength=0.6, steps=5)
    np.testing.assert_array_equal(seen, plain)
    sigmas = pipe.scheduler.sigmas.tolist()  # 5 steps + the final 0
    trace = obs.steps
    assert trace.num_steps == 3 and trace.meta["schedule_begin"] == 2
    assert [s.sigma for s in trace] == pytest.approx(sigmas[2:5], rel=1e-5)
    assert trace.timesteps.tolist() == pytest.approx(pipe.scheduler.timesteps[2:].tolist())


def test_steering_stops_an_img2img_run_and_the_trace_says_where(bases) -> None:
    pipe = _build(bases, "sdxl-img2img")
    with sdx.observe(pipe, stop_at=1) as obs:  # stop after the first step of the tail
        _call(pipe, strength=0.75)
    assert obs.steps.stopped_at == 0 and obs.steps.indices == [0]
    assert obs.steps.schedule_indices == [1]  # strength 0.75 of 4: the tail begins at step 1


def test_a_nine_channel_inpainting_unet_is_observed_and_recorded_as_latents(bases) -> None:
    base = bases["sd1"]
    config = dict(base.unet.config)
    config["in_channels"] = 9  # latents ‖ mask ‖ masked-image latents, as SD inpainting checkpoints
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval()
    pipe = StableDiffusionInpaintPipeline(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    plain = _call(pipe, strength=1.0, steps=2)
    with sdx.observe(pipe, steps=True, attention=True, quantities="all") as obs:
        seen = _call(pipe, strength=1.0, steps=2)
    np.testing.assert_array_equal(seen, plain)
    assert obs.steps.meta["latent_shape"] == [1, 4, 8, 8]  # the latents, not the UNet's 9-channel input
    assert tuple(obs.steps[0].x0.shape) == (1, 4, 8, 8)
    assert obs.attention.word("circle").shape == (8, 8)


# ---------------------------------------------------------------------------------------- the mask
def test_a_mask_that_does_not_fit_its_image_fails_before_any_work(bases) -> None:
    pipe = _build(bases, "sd1-inpaint")
    before = pipeline_state(pipe)
    calls = []
    handle = pipe.text_encoder.register_forward_pre_hook(lambda *a: calls.append(1))  # not even the prompt
    try:
        with sdx.observe(pipe) as obs:
            with pytest.raises(InvalidArgumentError, match=r"mask is 48×64 .* image is 64×64"):
                _call(pipe, mask_image=_mask((48, 64)))
            colour = Image.new("RGB", (64, 64), (255, 0, 0))
            with pytest.raises(InvalidArgumentError, match="colour"):
                _call(pipe, mask_image=colour)
            transparent = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
            with pytest.raises(InvalidArgumentError, match="transparent"):
                _call(pipe, mask_image=transparent)
        assert calls == [] and obs.runs == []  # refused before the pipeline did anything
    finally:
        handle.remove()
    assert_restored(pipe, before)


def _refused_before_any_work(pipe, match: str, **extra) -> None:
    """An observed call with ``extra`` fails with InvalidArgumentError matching ``match`` before the prompt is even
    encoded, and records no run."""
    calls = []
    handle = pipe.text_encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with sdx.observe(pipe) as obs:
            with pytest.raises(InvalidArgumentError, match=match):
                _call(pipe, **extra)
        assert calls == [] and obs.runs == []
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["sd1-img2img", "sd1-inpaint", "sd3-img2img"])
@pytest.mark.parametrize(
    ("strength", "match"),
    [
        (0.0, r"outside \(0, 1\]"),  # diffusers: "cannot reshape tensor of 0 elements"
        (0, r"outside \(0, 1\]"),
        (float("nan"), "give a number above 0"),  # diffusers: "cannot convert float NaN to integer"
        (1.5, r"outside \(0, 1\]"),
        (-0.25, r"outside \(0, 1\]"),
        ("0.5", "give a number above 0"),  # diffusers: "'<' not supported between 'str' and 'int'"
        (True, "give a number above 0"),
    ],
)
def test_a_bad_strength_fails_before_any_work(bases, name, strength, match) -> None:
    _refused_before_any_work(_build(bases, name), f"strength={strength!r}.*{match}", strength=strength)


def _sixteen_bit() -> np.ndarray:
    return np.asarray(_picture(), dtype=np.uint16) * 257  # (64, 64, 3): the 8-bit picture, 16-bit


@pytest.mark.parametrize("name", ["sd1-img2img", "sd1-inpaint"])
@pytest.mark.parametrize(
    ("image", "match"),
    [
        (lambda: Image.fromarray(_sixteen_bit()[..., 0]), r"high bit depth picture \(PIL mode I;16\)"),
        (lambda: Image.fromarray(_sixteen_bit()[..., 0].astype(np.int32)), r"PIL mode I\)"),
        (lambda: Image.fromarray(_sixteen_bit()[..., 0].astype(np.float32) / 65535), r"PIL mode F\)"),
        (
            _sixteen_bit,
            "dtype uint16",
        ),  # diffusers: "upsample_nearest2d_channels_last not implemented for UInt16"
        (lambda: [_picture(), Image.fromarray(_sixteen_bit()[..., 0])], r"image\[1\] is a high bit depth"),
    ],
)
def test_a_sixteen_bit_picture_fails_before_any_work_and_load_image_converts_it(bases, name, image, match):
    _refused_before_any_work(_build(bases, name), f"{match}.*load_image", image=image())
    with pytest.warns(sdx.images.ImageNote, match="16-bit"):
        converted = sdx.images.load_image(_sixteen_bit())  # what the message says to pass instead
    np.testing.assert_array_equal(np.asarray(converted), np.asarray(_picture()))  # scaled back exactly


def test_a_float_or_sixteen_bit_mask_is_read_as_diffusers_reads_it_or_refused(bases) -> None:
    from diffusers.image_processor import VaeImageProcessor

    # diffusers' inpainting mask processor: convert("L"), / 255 (then binarized at 0.5)
    reader = VaeImageProcessor(
        vae_scale_factor=8, do_normalize=False, do_binarize=False, do_convert_grayscale=True
    )
    box = np.asarray(_mask(), dtype=np.float32)  # (64, 64) 0 or 255
    grey = box.copy()
    grey[:8] = 100.4  # a grey band, rounded by convert("L")
    for read in (
        Image.fromarray(box),
        Image.fromarray(grey),
        Image.fromarray(box.astype(np.int32)),
    ):
        used = reader.preprocess(read, height=64, width=64)[0, 0].numpy()  # (64, 64) in [0, 1]
        np.testing.assert_allclose(mask_array(read)[0], used, atol=1e-6)
    pipe = _build(bases, "sd1-inpaint")
    with sdx.observe(pipe) as obs:
        _call(pipe, mask_image=Image.fromarray(box))
    np.testing.assert_array_equal(obs.mask[0].numpy(), box / 255.0)
    # a float mask in [0, 1]: diffusers' convert("L") makes it black (nothing repainted); refused
    unit = Image.fromarray(box / 255.0)
    assert reader.preprocess(unit, height=64, width=64).max() < 0.01  # what diffusers would have used
    _refused_before_any_work(pipe, r"mode F with values in \[0, 1\].*repaint nothing", mask_image=unit)
    # a 16-bit mask: convert("L") clips it at 255; refused
    wide = Image.fromarray((box / 255.0 * 65535).astype(np.uint16))
    _refused_before_any_work(pipe, r"mode I;16 with values in \[0, 65535\].*clips", mask_image=wide)


def test_load_mask_reads_grey_masks_and_refuses_the_rest(tmp_path) -> None:
    grey_rgb = _mask().convert("RGB")  # a grey picture saved as RGB is still a mask
    np.testing.assert_array_equal(np.asarray(load_mask(grey_rgb, _picture())), np.asarray(_mask()))
    assert mask_array(np.asarray(_mask())).shape == (1, 64, 64)
    assert mask_array(torch.ones(2, 1, 8, 8)).shape == (2, 8, 8)
    with pytest.raises(InvalidArgumentError, match="must match"):
        load_mask(_mask((64, 48)), (64, 64))
    with pytest.raises(InvalidArgumentError, match="outside"):
        mask_array(np.full((8, 8), 2.0))
    with pytest.raises(InvalidArgumentError, match="shape"):
        mask_array(np.zeros((8, 8, 3)))
    junk = tmp_path / "mask.png"
    junk.write_bytes(b"not a png")
    with pytest.raises(InvalidArgumentError, match="not an image"):
        load_mask(junk)
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        load_mask(tmp_path / "missing.png")


def test_the_mask_is_saved_with_the_observation_and_drawn_around_the_maps(bases, tmp_path) -> None:
    pipe = _build(bases, "sd1-inpaint")
    with sdx.observe(pipe, steps=True, attention=True) as obs:
        image = _call(pipe)[0]
    back = sdx.Observation.load(obs.save(tmp_path / "obs"))
    assert back.mask is not None and torch.equal(back.mask, obs.mask)
    heat = obs.attention.word("circle")
    plain = heat_overlay(image, heat)
    framed = heat_overlay(image, heat, mask=back.mask)
    line = mask_outline(back.mask, (64, 64))
    # the outline is the mask's border: inside the repainted box, on its edge, nowhere else
    box = np.zeros((64, 64), bool)
    box[24:56, 16:48] = True
    assert line.any() and not (line & ~box).any() and not line[28:52, 20:44].any()
    assert (framed[line] == 255).all() and np.array_equal(framed[~line], plain[~line])
    assert np.array_equal(draw_mask_outline(plain, back.mask), framed)


def test_attention_views_draw_the_inpainting_mask_and_take_a_new_upload(bases) -> None:
    from sdexplore.views.plots.attention import word_overlay
    from sdexplore.views.render import mask_outline
    from sdexplore.views.widgets import AttentionExplorer

    pipe = _build(bases, "sd1-inpaint")
    with sdx.observe(pipe, steps=True, attention=True) as obs:
        image = _call(pipe, strength=1.0)[0]
    edge = mask_outline(obs.mask, (64, 64))  # (64, 64) bool: the mask's border
    assert edge.any() and not edge.all()
    with_mask = word_overlay(obs.attention, "circle", image=image, mask=obs.mask)
    without = word_overlay(obs.attention, "circle", image=image)
    changed = (with_mask != without).any(-1)  # (64, 64): pixels the outline touched
    assert changed.any() and not changed[~edge].any()  # exactly on the border, nowhere else
    explorer = AttentionExplorer(obs, image, static=True)
    assert explorer.mask is obs.mask  # taken from the observation
    assert explorer.overlay_png("circle") != AttentionExplorer(obs.attention, image, static=True).overlay_png(
        "circle"
    )
    # an upload control hands a new result to the explorer, which keeps its options
    explorer = AttentionExplorer(obs, image, size=96, static=True)
    explorer.with_upload(lambda picture: (obs.attention, picture))
    explorer.replace(obs.attention, image)
    assert explorer.size == 96 and explorer.mask is None  # AttentionMaps carry no mask
