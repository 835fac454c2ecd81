"""Saved directions on the command line: `sdexplore direction` makes one, `--direction FILE[:S]` applies it in
`steps`, `attention` and `walk`; bad input is one line and exit 2 before the model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdexplore import directions
from sdexplore.cli import main
from sdexplore.embedded.scenes import read_scene
from sdexplore.loading import EMBEDDED_GUIDANCE_SCALE, load_pipeline
from sdexplore.results.directions import DirectionData
from sdexplore.results.trace import Trace

RED, BLUE = (
    "a big red circle at the left on a white background",
    "a big blue circle at the left on a white background",
)
PROMPT = "a big red square at the top on a white background"
STEPS = 8  # few steps: the property (CLI == Python API, bit for bit) holds at any count


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """main(argv) in-process → (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("sdexplore: note:")]


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A red → blue text direction made by the command."""
    out = tmp_path_factory.mktemp("dir") / "red-to-blue.safetensors"
    assert main(["direction", RED, BLUE, "--out", str(out), "--no-progress"]) == 0
    return out


def api_image(pipe, d, strength: float) -> np.ndarray:
    """The Python API's image for PROMPT at the CLI's defaults (seed 0, the embedded model's guidance)."""
    with d.apply(pipe, strength=strength):
        return plain_call(pipe)


def plain_call(pipe) -> np.ndarray:
    """The user's own diffusers call (seed 0 on a CPU generator, as the CLI draws it) → (H, W, 3) uint8."""
    generator = torch.Generator("cpu").manual_seed(0)
    out = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=EMBEDDED_GUIDANCE_SCALE, generator=generator)
    return np.asarray(out.images[0].convert("RGB"))


def test_command_makes_the_python_apis_direction(made, pipe):
    d = directions.load(made)
    ref = directions.from_pairs(pipe, [(RED, BLUE)], "text")
    assert d.space == "text" and d.family == "sd1" and d.pairs == [(RED, BLUE)]
    assert d.settings["model"] == "embedded"
    assert torch.equal(d.embeds, ref.embeds)


def test_steps_with_direction_is_the_python_apis_image_and_records_it(made, pipe, tmp_path, capsys):
    rc, out, err = run(
        capsys, "steps", PROMPT, "--steps", STEPS, "--direction", f"{made}:1.5", "--preview", "linear",
        "--out", tmp_path / "on", "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    steered = png(tmp_path / "on" / "image.png")
    assert np.array_equal(steered, api_image(pipe, directions.load(made), 1.5))
    rc, _, err = run(
        capsys,
        "steps",
        PROMPT,
        "--steps",
        STEPS,
        "--preview",
        "linear",
        "--out",
        tmp_path / "off",
        "--no-progress",
    )
    assert rc == 0, err
    plain = png(tmp_path / "off" / "image.png")
    # the scene reader sees the red square turned blue, at the same place on the same background
    before, after = read_scene(plain), read_scene(steered)
    assert (before.colour, after.colour) == ("red", "blue")
    assert (after.place, after.background) == (before.place, before.background) == ("top", "white")
    meta = Trace.load(tmp_path / "on" / "trace.safetensors").meta["directions"]
    assert [(m["file"], m["strength"], m["space"], m["family"]) for m in meta] == [
        (str(made), 1.5, "text", "sd1")
    ]
    assert json.loads((tmp_path / "on" / "directions.json").read_text()) == meta
    assert "directions.json" in out and not (tmp_path / "off" / "directions.json").exists()


def test_strength_zero_is_the_plain_image_bit_for_bit(made, tmp_path, capsys):
    for name, extra in (("plain", []), ("zero", ["--direction", f"{made}:0"])):
        rc, _, err = run(
            capsys, "attention", PROMPT, "--words", "square", "--steps", STEPS, *extra, "--out", tmp_path / name,
            "--no-progress",
        )  # fmt: skip
        assert rc == 0, err
    assert np.array_equal(png(tmp_path / "zero" / "image.png"), png(tmp_path / "plain" / "image.png"))
    record = json.loads((tmp_path / "zero" / "directions.json").read_text())
    assert record[0]["strength"] == 0.0 and len(record[0]["sha256"]) == 64


def test_several_directions_add_up_as_in_the_api(made, pipe, tmp_path, capsys):
    """Two --direction options apply together in one run, as ``directions.apply(pipe, [(d, 1), (d, -0.5)])``."""
    rc, _, err = run(
        capsys, "steps", PROMPT, "--steps", STEPS, "--direction", made, "--direction", f"{made}:-0.5",
        "--preview", "linear", "--out", tmp_path / "both", "--no-progress",
    )  # fmt: skip
    assert rc == 0, err
    d = directions.load(made)
    with directions.apply(pipe, [(d, 1.0), (d, -0.5)]):
        expected = plain_call(pipe)
    assert np.array_equal(png(tmp_path / "both" / "image.png"), expected)


def _damaged(made: Path, tmp_path: Path) -> Path:
    data = bytearray(made.read_bytes())
    data[-5] ^= 0xFF  # a tensor byte: the checksum no longer matches
    bad = tmp_path / "damaged.safetensors"
    bad.write_bytes(bytes(data))
    return bad


@pytest.fixture(scope="module")
def trace_file(pipe, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another kind of result file: a saved trace."""
    from sdexplore.generation import generate

    _, obs = generate(pipe, PROMPT, seed=0, num_inference_steps=2)
    return obs.steps.save(tmp_path_factory.mktemp("trace") / "trace.safetensors")


@pytest.mark.parametrize(
    "case",
    ["missing", "damaged", "trace", "nan", "inf", "empty", "image"],
)
def test_bad_direction_is_one_line_before_the_model_loads(case, made, trace_file, tmp_path, capsys, no_model):
    path = {
        "missing": tmp_path / "nope.safetensors",
        "damaged": _damaged(made, tmp_path) if case == "damaged" else None,
        "trace": trace_file,
    }.get(case, made)
    spec = {"nan": f"{made}:nan", "inf": f"{made}:inf", "empty": ":1"}.get(case, str(path))
    picture = tmp_path / "picture.png"
    Image.new("RGB", (64, 64), "white").save(picture)
    for command in ("steps", "attention", "walk"):
        walk = command == "walk"
        argv = [command, PROMPT, *(["a blue square"] if walk else []), "--direction", spec]
        if case == "image":  # a picture is inverted: a direction there would steer the inversion too
            argv += ["--image", str(picture), *(["-"] if walk else [])]
        argv += ["--out", str(tmp_path / ("o.gif" if walk else "o"))]
        rc, _, err = run(capsys, *argv)
        lines = error_lines(err)
        assert rc == 2 and len(lines) == 1 and "direction" in lines[0], (command, err)
        assert not no_model and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv, says",
    [
        (["direction", RED, " "], "empty"),
        (["direction", RED, RED], "same prompt"),
        (["direction", RED, BLUE, "--out", "d.png"], ".safetensors"),
        (["direction", RED, BLUE, "--seeds", "3"], "--space inner"),
        (["direction", RED, BLUE, "--space", "inner", "--height", "60"], "multiple of 8"),
        (["direction", RED, BLUE, "--space", "sideways"], "invalid choice"),
        (["direction", RED, BLUE, "--pair", "a red square"], "--pair"),
        (["direction", RED, BLUE, "--label", ""], "--label"),
    ],
)
def test_bad_direction_command_input_is_one_line_before_the_model_loads(
    argv, says, tmp_path, capsys, no_model, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    rc, _, err = run(capsys, *argv)
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1 and says in lines[0], err
    assert not no_model and not list(tmp_path.iterdir())


@pytest.mark.parametrize("made_for", ["family", "model"])
def test_direction_of_another_family_or_model_is_refused_once_loaded(made_for, made, tmp_path, capsys):
    d = directions.load(made)
    if made_for == "family":
        d = DirectionData(space="text", method="pairs", family="sd3", embeds=torch.zeros(4, 8))
    else:
        d.settings["model"] = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    path = d.save(tmp_path / "other.safetensors")
    rc, _, err = run(
        capsys, "steps", PROMPT, "--steps", "2", "--direction", path, "--out", tmp_path / "o", "--no-progress"
    )
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1, err
    assert ("sd3" in lines[0]) if made_for == "family" else ("stable-diffusion-v1-5" in lines[0])
    assert not (tmp_path / "o").exists()


def test_direction_of_another_shape_is_refused_as_bad_input(tmp_path, capsys):
    """A direction the file cannot tell apart (same family, no model recorded) but of another size: refused
    with one line once the run sees its shape, nothing written."""
    d = DirectionData(space="text", method="pairs", family="sd1", embeds=torch.zeros(5, 3))
    path = d.save(tmp_path / "odd.safetensors")
    rc, _, err = run(
        capsys, "steps", PROMPT, "--steps", "2", "--direction", path, "--out", tmp_path / "o", "--no-progress"
    )
    lines = error_lines(err)
    assert rc == 2 and len(lines) == 1 and "(5, 3)" in lines[0], err
    assert not (tmp_path / "o").exists()


def test_inner_direction_from_the_command_applies_in_walk(pipe, tmp_path, capsys):
    out = tmp_path / "inner.safetensors"
    rc, _, err = run(
        capsys,
        "direction",
        RED,
        BLUE,
        "--space",
        "inner",
        "--seeds",
        "0",
        "--steps",
        "4",
        "--out",
        out,
        "--no-progress",
    )
    assert rc == 0, err
    d = directions.load(out)
    assert d.space == "inner" and d.seeds == [0] and d.settings["model"] == "embedded"
    for name, spec in (("plain", []), ("on", ["--direction", f"{out}:2"])):
        rc, _, err = run(
            capsys, "walk", PROMPT, "--seeds", "0", "1", "--frames", "2", "--steps", "4", *spec,
            "--out", tmp_path / f"{name}.gif", "--no-progress",
        )  # fmt: skip
        assert rc == 0, err
    assert (tmp_path / "on.gif").read_bytes() != (tmp_path / "plain.gif").read_bytes()


def test_help_and_bad_direction_options_load_no_torch():
    code = (
        "import contextlib, io, sys\n"
        "import sdexplore.cli as c\n"
        "for argv in (['direction', '--help'], ['steps', '--help'], ['steps', 'a', '--direction', 'x:nan'], "
        "['direction', 'a', 'b', '--space', 'up']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        c.main(argv)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
