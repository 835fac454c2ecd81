"""Image input (sdexplore.images): every accepted kind gives the same RGB pixels; conversions and resizes give one
note; each kind of bad input gives one clear error of sdexplore's own."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sdexplore.embedded.scenes import render_scene
from sdexplore.errors import InvalidArgumentError, SdexploreError
from sdexplore.images import ImageNote, encode_image, image_array, load_image, pipeline_image


@pytest.fixture(scope="module")
def scene() -> np.ndarray:
    image, _, _ = render_scene("a big red circle at the top left on a blue background", seed=0)
    return image  # (64, 64, 3) uint8


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(array)
    (im.convert(mode) if mode else im).save(buf, format="PNG")
    return buf.getvalue()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImageNote)  # an unexpected note fails the test
        return fn(*args, **kwargs)


def test_every_kind_gives_the_same_pixels(scene, tmp_path):
    path = tmp_path / "scene.png"
    path.write_bytes(_png(scene))
    tensor = torch.from_numpy(scene).permute(2, 0, 1).float() / 127.5 - 1  # (3, H, W) in [-1, 1]
    kinds = [
        scene,
        scene.astype(np.float32) / 255,
        Image.fromarray(scene),
        tensor,
        tensor[None],
        _png(scene),
        memoryview(_png(scene)),
        str(path),
        path,
    ]
    for kind in kinds:
        out = _quiet(image_array, kind)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, scene, err_msg=type(kind).__name__)
    assert _quiet(load_image, scene).mode == "RGB"


def test_modes_are_converted_with_a_note(scene):
    grey = np.asarray(Image.fromarray(scene).convert("L"))
    with pytest.warns(ImageNote, match="greyscale"):
        out = image_array(_png(scene, "L"))
    np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))

    rgba = np.concatenate([scene, np.full((64, 64, 1), 255, np.uint8)], axis=2)
    rgba[:32, :, 3] = 0  # top half transparent
    with pytest.warns(ImageNote, match="white"):
        out = image_array(rgba)
    assert (out[:32] == 255).all()  # composited on white
    np.testing.assert_array_equal(out[32:], scene[32:])

    with pytest.warns(ImageNote, match="palette"):
        assert image_array(_png(scene, "P")).shape == (64, 64, 3)

    values = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16  # 0..65520, 16-bit
    with pytest.warns(ImageNote, match="high bit depth"):
        out = image_array(Image.fromarray(values))
    expected = np.round(values / 65535 * 255).astype(np.uint8)  # scaled, not clipped at 255
    np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))


def test_sizes_are_resized_with_a_note(scene):
    with pytest.warns(ImageNote, match=r"70×90 .*resized to 64×88"):
        assert image_array(np.zeros((70, 90, 3), np.uint8)).shape == (64, 88, 3)  # rounded down to 8
    with pytest.warns(ImageNote, match=r"resized to 32×32$"):
        small = image_array(scene, 32)
    assert small.shape == (32, 32, 3)
    # the aspect ratio is kept: a wide picture is scaled to cover and centre-cropped, never stretched
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, 48:80] = 255  # a white bar in the middle third
    with pytest.warns(ImageNote, match="centre-cropped"):
        out = image_array(wide, 64)
    assert out.shape == (64, 64, 3)
    assert out[:, 20:44].min() > 200 and out[:, :12].max() < 30  # the bar fills the centre, as wide as before
    assert _quiet(image_array, scene, (64, 64)).shape == (64, 64, 3)  # the right size: no note


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (b"not an image at all", "not an image file"),
        (b"", "empty"),
        ("", "path is empty"),
        (np.zeros((3, 64, 64), np.uint8), "channels-first"),
        (np.zeros((64, 64, 2), np.uint8), "has shape"),
        (np.full((8, 8, 3), 2.0, np.float32), r"in \[0, 1\]"),
        (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
        (np.full((8, 8, 3), 300, np.int32), "0..255"),
        (np.zeros((8, 8, 3), np.complex64), "dtype"),
        (torch.full((3, 8, 8), 3.0), r"\[-1, 1\]"),
        (torch.zeros((2, 3, 8, 8)), "one image"),
        (torch.zeros((3, 8, 8), dtype=torch.uint8), "float tensor"),
        (12, "type int"),
        ([np.zeros((8, 8, 3), np.uint8)], "type list"),
    ],
)
def test_bad_input_is_one_clear_error(bad, match):
    with pytest.raises(InvalidArgumentError, match=match) as info:
        load_image(bad)
    assert isinstance(info.value, SdexploreError)


def test_bad_files_and_sizes(tmp_path, scene):
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(InvalidArgumentError, match="folder"):
        load_image(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InvalidArgumentError, match="not an image file"):
        load_image(text)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_png(scene)[:200])
    with pytest.raises(InvalidArgumentError, match="could not be read|not an image"):
        load_image(truncated)
    for size, match in [
        ((60, 64), "multiples of 8"),
        (0, "positive"),
        ("64", "height, width"),
        (True, "height"),
    ]:
        with pytest.raises(InvalidArgumentError, match=match):
            load_image(scene, size)


def test_pipeline_image_and_latents(scene):
    from sdexplore.fixtures import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    factor = pipe.vae_scale_factor
    pic = _quiet(pipeline_image, pipe, scene, height=64, width=64)
    assert pic.size == (64, 64)
    latents = encode_image(pipe, scene, height=64, width=64)
    assert latents.shape == (1, pipe.vae.config.latent_channels, 64 // factor, 64 // factor)
    # the posterior mean, scaled: deterministic and equal to the pipeline's own arithmetic
    pixels = torch.from_numpy(scene).permute(2, 0, 1)[None].float() / 127.5 - 1
    expected = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
