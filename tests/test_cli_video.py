"""``sdexplore steps`` and ``sdexplore attention`` on a video model (the Wan fixture, saved and loaded by path):
the clip and its frames, a frame strip per step, one heat map per latent frame, the trace and the maps files; and
``--frames``, the clip length (the fixture's 5 frames here; the pipeline's 81 by default), checked before any step.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import sdexplore as sdx
from sdexplore.fixtures import fixture_call_defaults, tiny_pipeline

P = "a red circle on a blue background"
BASE = [
    "--no-progress",
    "--device",
    "cpu",
    "--dtype",
    "float32",
    "--steps",
    "2",
    "--height",
    "64",
    "--width",
    "64",
    "--frames",
    str(fixture_call_defaults("wan")["num_frames"]),  # 5: two latent frames (81 by default, 6x the time)
]


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("wan") / "wan"
    tiny_pipeline("wan").save_pretrained(path)
    return str(path)


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_steps_writes_the_clip_and_a_frame_strip_per_step(wan_folder, tmp_path, capsys) -> None:
    from sdexplore.cli import main

    out = tmp_path / "steps"
    assert main(["steps", P, "--model", wan_folder, *BASE, "--out", str(out)]) == 0, capsys.readouterr().err
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert {"video.gif", "frames.png", "steps_preview.png", "denoising.gif", "trace.safetensors"} <= names
    assert "steps_x0.png" not in names and "image.png" not in names
    trace = sdx.Trace.load(out / "trace.safetensors")
    assert trace.frames == 2 and len(trace) == 2  # the fixture's 5 frames → 2 latent frames, two steps
    clip = Image.open(out / "video.gif")
    assert clip.n_frames == 5 and clip.size == (64, 64)
    assert _png(out / "frames.png").shape == (64, 5 * 64, 3)
    from sdexplore.cli._common import TILE

    rows = _png(out / "steps_preview.png")  # a row per step: the frame strip, each latent frame a tile wide
    assert rows.shape[1] == TILE * trace.frames and rows.shape[0] >= len(trace) * TILE
    gif = Image.open(out / "denoising.gif")
    assert gif.n_frames == 2 and gif.size[0] == 2 * gif.size[1]  # each frame a row of both latent frames


def test_steps_refuses_decoded_x0_on_a_video_before_any_step(wan_folder, tmp_path, capsys) -> None:
    from sdexplore.cli import main

    out = tmp_path / "steps"
    rc = main(["steps", P, "--model", wan_folder, *BASE, "--preview", "decode", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--preview decode is not available for Wan 2.x" in err and "Traceback" not in err
    assert not out.exists()


def test_attention_writes_a_heat_map_per_latent_frame(wan_folder, tmp_path, capsys) -> None:
    from sdexplore.cli import main

    out = tmp_path / "att"
    rc = main(["attention", P, "--model", wan_folder, *BASE, "--words", "circle", "blue", "--out", str(out)])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    names = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert {"frames.png", "attention_circle.png", "attention_blue.png", "attention_grid.png"} <= names
    assert "attention.safetensors" in names and "image.png" not in names
    maps = sdx.AttentionMaps.load(out / "attention.safetensors")
    assert maps.frames == 2 and maps.word("circle").shape[0] == 2
    circle = _png(out / "attention_circle.png")
    assert circle.shape[1] == 2 * circle.shape[0]  # the two latent frames side by side, each square
    left, right = circle[:, : circle.shape[0]], circle[:, circle.shape[0] :]
    assert not np.array_equal(left, right)  # each frame its own map over its own clip frame
    assert "of latent frame" in printed.out


def test_frames_reach_the_call_only_when_given() -> None:
    from sdexplore.cli import build_parser
    from sdexplore.cli._common import _call_kwargs

    for command in ("steps", "attention"):
        args = build_parser().parse_args([command, P, "--model", "some/wan"])
        assert "num_frames" not in _call_kwargs(args)  # the pipeline's own default (Wan: 81)
        args = build_parser().parse_args([command, P, "--model", "some/wan", "--frames", "9"])
        assert _call_kwargs(args)["num_frames"] == 9


@pytest.mark.parametrize("model", [None, "tiny-shapes-mmdit"])
def test_frames_on_the_embedded_models_are_refused_before_loading(
    model, tmp_path, capsys, monkeypatch
) -> None:
    from sdexplore.cli import _common, main

    monkeypatch.setattr(_common, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "steps"
    rc = main(["steps", P, *(["--model", model] if model else []), "--frames", "5", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--frames sets a video model's clip length" in err and "makes pictures" in err, err
    assert "Traceback" not in err and not out.exists()


def test_a_clip_length_the_vae_does_not_take_is_refused_before_any_step(wan_folder, tmp_path, capsys) -> None:
    from sdexplore.cli import main

    out = tmp_path / "att"
    base = [a if a != "5" else "6" for a in BASE]  # --frames 6: the VAE takes 1 + 4k
    rc = main(["attention", P, "--model", wan_folder, *base, "--out", str(out)])
    err = capsys.readouterr().err
    assert (
        rc == 2 and "--frames 6: Wan 2.x's video VAE takes 1 + 4k frames" in err and "pass 5 or 9" in err
    ), err
    assert "Traceback" not in err and not out.exists()


def test_frames_on_an_image_model_folder_are_refused_before_any_step(tmp_path, capsys) -> None:
    from sdexplore.cli import main

    folder = tmp_path / "sd1"
    tiny_pipeline("sd1").save_pretrained(folder)
    out = tmp_path / "steps"
    rc = main(["steps", P, "--model", str(folder), *BASE, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "Stable Diffusion 1.x makes pictures: leave it out" in err and not out.exists(), err
