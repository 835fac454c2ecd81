"""`sdexplore edit`: its files (both images, their difference, the changed words' maps before and after at a
viewable size, a loadable Edit), and every convention of the other commands: the output folder with its manifest,
one run at a time, --force replacing only sdexplore's files, Ctrl-C and SIGTERM leaving nothing, bad input as one
line and exit 2 before the model loads, and `--help` loading no torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdexplore.cli import main
from sdexplore.cli._common import HEAT_MIN_SIDE
from sdexplore.cli.output import MANIFEST
from sdexplore.results import Edit

SOURCE = "a big red circle at the top left on a blue background"
TARGET = "a big green circle at the top left on a blue background"
FAST = ("--steps", "2", "--no-progress")


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("sdexplore: note:")]


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_a_colour_swap_writes_both_images_their_difference_the_maps_and_a_loadable_edit(capsys, tmp_path):
    from sdexplore.embedded.scenes import read_scene

    out = tmp_path / "edit"
    rc, stdout, err = run(capsys, "edit", SOURCE, TARGET, "--out", out, "--no-progress")
    assert rc == 0, err
    names = ["source.png", "edited.png", "difference.png", "attention_green_before.png",
             "attention_green_after.png", "edit.safetensors"]  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, MANIFEST])
    assert [ln.removeprefix("wrote ") for ln in stdout.splitlines()[: len(names)]] == [
        str(out / n) for n in names
    ]
    assert "green: mean attention mass before" in stdout and "pixels changed:" in stdout
    res = Edit.load(out / "edit.safetensors")
    source, edited = png(out / "source.png"), png(out / "edited.png")
    assert np.array_equal(source, res.images()[0]) and np.array_equal(edited, res.images()[1])
    assert np.array_equal(png(out / "difference.png"), np.abs(edited.astype(int) - source.astype(int)))
    assert res.settings["seed"] == 0 and res.settings["cross_replace"] == 0.8
    # the edit means what it says on the embedded model: the circle turns green, in the same place
    seen, was = read_scene(edited), read_scene(source)
    assert (seen.colour, seen.place, seen.background) == ("green", was.place, was.background)
    for name in ("attention_green_before.png", "attention_green_after.png"):
        h, w = png(out / name).shape[:2]
        assert min(h, w) >= HEAT_MIN_SIDE and h % source.shape[0] == 0 and w % source.shape[1] == 0


def test_an_ablation_writes_the_zero_map_after(capsys, tmp_path):
    out = tmp_path / "ablate"
    rc, stdout, _ = run(capsys, "edit", SOURCE, "--reweight", "circle=0", *FAST, "--out", out)
    assert rc == 0
    res = Edit.load(out / "edit.safetensors")
    assert res.source_prompt == res.edited_prompt == SOURCE and res.settings["reweight"] == {"circle": 0.0}
    assert (
        float(res.edited_maps.word("circle").abs().max()) == 0.0 < float(res.source_maps.word("circle").max())
    )
    assert "circle: mean attention mass before" in stdout and "after 0.0000" in stdout
    from sdexplore.views.render import heat_overlay

    # one colour scale for the pair, from 0: the zero map after is the colour map's bottom everywhere
    zero = heat_overlay(png(out / "edited.png"), np.zeros((8, 8)), size=HEAT_MIN_SIDE, vmin=0.0, vmax=1.0)
    assert np.array_equal(png(out / "attention_circle_after.png"), zero)
    assert not np.array_equal(png(out / "attention_circle_before.png"), zero)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["edit", SOURCE], "nothing to edit"),
        (["edit", " "], "prompt is empty"),
        (["edit", SOURCE, " "], "prompt is empty"),
        (["edit", SOURCE, "--reweight", "circle"], "WORD=FACTOR"),
        (["edit", SOURCE, "--reweight", "circle=nan"], "WORD=FACTOR"),
        (["edit", SOURCE, "--reweight", "circle=-1"], "WORD=FACTOR"),
        (["edit", SOURCE, "--reweight", "=2"], "WORD=FACTOR"),
        (["edit", SOURCE, "--reweight", "dog=2"], "'dog' is not a word of the prompt"),
        (["edit", SOURCE, TARGET, "--reweight", "red=2"], "'red' is not a word of the prompt"),
        (["edit", SOURCE, "--reweight", "red=2", "red=3"], "twice"),
        (["edit", SOURCE, "a big green circle"], "same number of words"),
        (["edit", SOURCE, TARGET, "--cross-replace", "1.5"], "--cross-replace"),
        (["edit", SOURCE, TARGET, "--self-replace", "-0.1"], "--self-replace"),
        (["edit", SOURCE, TARGET, "--seed", "-1"], "--seed"),
        (["edit", SOURCE, TARGET, "--guidance", "inf"], "--guidance"),
        (["edit", SOURCE, TARGET, "--height", "60"], "multiple of 8"),
        (["edit", SOURCE, TARGET, "--model", "./no/such/model"], "No such file or folder"),
        (["edit", SOURCE, TARGET, "--out", "run\0x"], "--out"),
    ],
)
def test_each_bad_input_is_one_line_and_exit_2_before_the_model_loads(
    capsys, tmp_path, monkeypatch, no_model, argv, needle
):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, *argv)
    lines = error_lines(err)
    assert (rc, len(lines)) == (2, 1), err
    assert lines[0].startswith("sdexplore: error: ") and needle in lines[0], lines[0]
    assert not no_model, "the model was loaded before the bad input was found"
    assert list(tmp_path.iterdir()) == []  # nothing written, no lock


def test_the_output_is_exclusive_and_force_replaces_only_sdexplores_files(capsys, tmp_path, monkeypatch):
    out = tmp_path / "edit"
    assert run(capsys, "edit", SOURCE, TARGET, *FAST, "--out", out)[0] == 0
    rc, _, err = run(capsys, "edit", SOURCE, TARGET, *FAST, "--out", out)  # exists: refused without --force
    assert rc == 2 and "--force" in err
    assert run(capsys, "edit", SOURCE, "--reweight", "red=2", *FAST, "--out", out, "--force")[0] == 0
    assert sorted(p.name for p in out.glob("attention_*.png")) == [
        "attention_red_after.png",
        "attention_red_before.png",
    ]  # no stale maps of the swap's "green"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "source.png").write_text("keep me")  # a user's file with an output's name, no manifest
    rc, _, err = run(capsys, "edit", SOURCE, TARGET, *FAST, "--out", mine, "--force")
    assert rc == 2 and MANIFEST in err and (mine / "source.png").read_text() == "keep me"


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_an_interrupt_while_writing_leaves_nothing(capsys, tmp_path, monkeypatch, how):
    out = tmp_path / "edit"

    def stop(self, path):
        Path(path).write_bytes(b"half")  # a half-written result
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)  # main() turns SIGTERM into Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(Edit, "save", stop)
    rc, stdout, err = run(capsys, "edit", SOURCE, TARGET, *FAST, "--out", out)
    assert rc == 130 and "wrote" not in stdout
    assert error_lines(err) == [f"sdexplore: interrupted; nothing was written ({out} is as it was)"]
    assert list(tmp_path.iterdir()) == []  # no files, no temporary folder, no lock


def test_edit_help_and_bad_arguments_load_no_torch():
    code = (
        "import contextlib, io, sys\n"
        "import sdexplore.cli as c\n"
        "for argv in (['edit', '--help'], ['edit'], ['edit', 'a', '--reweight', 'x']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        c.main(argv)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_the_seed_decides_the_source_as_a_plain_call_does(capsys, tmp_path):
    """The source image is the plain image of SOURCE with --seed: what `pipe(SOURCE, generator=seed)` gives."""
    from sdexplore.loading import EMBEDDED_GUIDANCE_SCALE, load_pipeline

    out = tmp_path / "edit"
    assert run(capsys, "edit", SOURCE, TARGET, *FAST, "--seed", "7", "--out", out)[0] == 0
    pipe = load_pipeline()
    plain = pipe(SOURCE, num_inference_steps=2, guidance_scale=EMBEDDED_GUIDANCE_SCALE,
                 generator=torch.Generator("cpu").manual_seed(7)).images[0]  # fmt: skip
    assert np.abs(png(out / "source.png").astype(int) - np.asarray(plain).astype(int)).max() <= 2


def test_flowedit_on_a_model_that_cannot_is_one_line_and_exit_2_with_nothing_written(capsys, tmp_path):
    """FlowEdit needs a flow-matching model: the embedded UNet loads, then is refused before any step (bad input,
    not a crash), naming the families that can."""
    from sdexplore.embedded.scenes import render_scene

    picture = tmp_path / "scene.png"
    Image.fromarray(render_scene(SOURCE, jitter=False)[0]).save(picture)
    out = tmp_path / "edit"
    rc, stdout, err = run(
        capsys, "edit", SOURCE, TARGET, "--image", picture, "--method", "flowedit", *FAST, "--out", out
    )
    lines = error_lines(err)
    assert (rc, len(lines)) == (2, 1) and "cannot use FlowEdit: it needs a flow-matching model" in lines[0], (
        err
    )
    assert "The families that can: Stable Diffusion 3 / 3.5, Flux.1 and Flux.2." in lines[0]
    assert "wrote" not in stdout and not out.exists()


def test_your_own_picture_is_inverted_and_edited_and_its_reconstruction_is_the_source(capsys, tmp_path):
    from sdexplore.embedded.scenes import render_scene

    picture = tmp_path / "scene.png"
    Image.fromarray(render_scene(SOURCE, jitter=False)[0]).save(picture)
    out = tmp_path / "mine"
    rc, stdout, err = run(capsys, "edit", SOURCE, TARGET, "--image", picture, "--steps", "4", "--no-progress",
                          "--out", out)  # fmt: skip
    assert rc == 0, err
    res = Edit.load(out / "edit.safetensors")
    assert res.settings["image"] == str(picture)
    source = png(out / "source.png").astype(float)
    original = png(picture).astype(float)
    psnr = 10 * np.log10(255.0**2 / np.mean((source - original) ** 2))
    assert psnr > 25  # the source branch is the picture's null-text reconstruction, not a new sample


@pytest.mark.parametrize(
    "argv, message",
    [
        (("--method", "flowedit"), "--method flowedit edits a picture: give it with --image"),
        (("--method", "inversion"), "--method inversion edits a picture"),
        (("--image", "scene.png", "--method", "flowedit", "--guidance", "3"), "--guidance does not apply"),
        (("--image", "scene.png", "--method", "flowedit", "--reweight", "red=2"), "leave --reweight out"),
        (("--image", "missing.png"), "does not exist"),
        (("--image", "scene.png", "--negative", "blurry"), "--negative cannot be used with --image"),
    ],
)
def test_picture_options_are_checked_before_the_model_loads(capsys, tmp_path, no_model, argv, message):
    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "scene.png")
    argv = tuple(str(tmp_path / a) if a.endswith(".png") else a for a in argv)
    rc, _, err = run(capsys, "edit", SOURCE, TARGET, *argv, "--out", tmp_path / "o")
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1 and message in lines[0], err
    assert no_model == [] and not (tmp_path / "o").exists()
