"""The `sdexplore` command: each command's files (count, size, frames, loadable results) and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdexplore.cli import main
from sdexplore.cli._common import HEAT_MIN_SIDE, SCHEDULER_ALIASES, TILE, resolve_scheduler
from sdexplore.cli.output import MANIFEST
from sdexplore.loading import EMBEDDED_GUIDANCE_SCALE, load_pipeline
from sdexplore.results.attention_maps import AttentionMaps
from sdexplore.results.trace import Trace
from sdexplore.views.export import image_grid, read_frames

PROMPT = "a big red circle at the top left on a blue background"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(argv) in-process → (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err: str) -> list[str]:
    """stderr without notes and progress bars: what the user sees as the error."""
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("sdexplore: note:")]


def size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file."""
    with Image.open(path) as im:
        return im.size


def strip_size(n: int, tile_wh: tuple[int, int], cols: int = 10) -> tuple[int, int]:
    """(width, height) of the strip the command lays out: n tiles of tile_wh, `cols` per row, 2 px gaps."""
    grid = image_grid(np.zeros((n, tile_wh[1], tile_wh[0], 3), np.uint8), cols=min(cols, n))
    return grid.shape[1], grid.shape[0]


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SDXL pipeline saved with save_pretrained, to pass as --model."""
    from sdexplore.fixtures import tiny_pipeline

    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    tiny_pipeline("sdxl").save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- describe


def test_describe_prints_the_component_table_and_prompt_tokens(capsys):
    rc, out, _ = run(capsys, "describe", "--steps", "7", "--prompt", "a big red circle")
    assert rc == 0
    for part in ("unet", "UNet2DConditionModel", "vae", "text_encoder", "scheduler", "7 inference steps"):
        assert part in out
    assert "circle</w>" in out  # the prompt's tokens


@pytest.mark.slow
def test_describe_json_of_a_saved_sdxl_folder(capsys, sdxl_folder):
    rc, out, _ = run(capsys, "describe", sdxl_folder, "--json", "--steps", "5", "--no-progress")
    assert rc == 0
    data = json.loads(out)
    assert data["family"] == "sdxl"
    assert len(data["timesteps"]) == 5
    assert {"text_encoder_2", "tokenizer_2", "unet"} <= {c["name"] for c in data["components"]}


# ---------------------------------------------------------------- steps


def test_steps_writes_image_strips_gif_and_trace(capsys, tmp_path):
    out = tmp_path / "run"
    rc, stdout, _ = run(capsys, "steps", "a red circle", "--steps", "4", "--seed", "3", "--height", "64",
                        "--width", "48", "--out", out, "--no-progress")  # fmt: skip
    assert rc == 0
    files = ["image.png", "steps_x0.png", "steps_preview.png", "denoising.gif", "trace.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*files, MANIFEST])
    assert all(str(out / f) in stdout for f in files)  # says where it wrote
    assert size(out / "image.png") == (48, 64)
    tile = (TILE * 48 // 64, TILE)  # longer side TILE, aspect ratio kept
    assert size(out / "steps_x0.png") == strip_size(4, tile)
    assert size(out / "steps_preview.png") == strip_size(4, tile)
    gif = read_frames(out / "denoising.gif")
    assert gif.shape == (4, 64, 48, 3)  # one frame per step, at the image's size

    trace = Trace.load(out / "trace.safetensors")
    assert len(trace) == 4 and trace.num_steps == 4
    assert trace.meta["prompt"] == "a red circle" and trace.meta["seed"] == 3
    pipe = load_pipeline()
    f = pipe.vae_scale_factor
    assert tuple(trace[0].x0.shape) == (1, 4, 64 // f, 48 // f)  # x0 of every step, at latent size

    # the seed, steps and size reach the pipeline, and no --guidance means the embedded model's recommended
    # scale (not diffusers' 7.5): the image is that plain call's, pixel for pixel
    assert trace.guidance_scale == EMBEDDED_GUIDANCE_SCALE != 7.5
    plain = pipe("a red circle", num_inference_steps=4, height=64, width=48,
                 guidance_scale=EMBEDDED_GUIDANCE_SCALE,
                 generator=torch.Generator("cpu").manual_seed(3)).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(plain), np.asarray(Image.open(out / "image.png").convert("RGB")))


def test_steps_never_overwrites_without_force(capsys, tmp_path):
    out = tmp_path / "run"
    assert run(capsys, "steps", "a red circle", "--steps", "2", "--preview", "linear", "--out", out)[0] == 0
    before = (out / "image.png").stat().st_mtime_ns
    rc, _, err = run(capsys, "steps", "a blue square", "--steps", "2", "--preview", "linear", "--out", out)
    assert rc != 0
    assert error_lines(err) == [error_lines(err)[0]] and "--force" in err and "already exists" in err
    assert (out / "image.png").stat().st_mtime_ns == before
    rc, _, _ = run(capsys, "steps", "a blue square", "--steps", "3", "--preview", "linear", "--out", out,
                   "--force", "--no-progress")  # fmt: skip
    assert rc == 0
    assert Trace.load(out / "trace.safetensors").meta["prompt"] == "a blue square"


def test_steps_linear_preview_with_another_scheduler(capsys, tmp_path):
    out = tmp_path / "lin"
    rc, _, _ = run(capsys, "steps", "a green square", "--steps", "5", "--scheduler", "euler", "--preview",
                   "linear", "--guidance", "3", "--out", out, "--no-progress")  # fmt: skip
    assert rc == 0
    assert not (out / "steps_x0.png").exists()  # no VAE decode per step
    trace = Trace.load(out / "trace.safetensors")
    assert trace.scheduler == "EulerDiscreteScheduler" and len(trace) == 5
    assert trace.guidance_scale == 3.0
    w, h = size(out / "image.png")
    assert read_frames(out / "denoising.gif").shape == (5, h, w, 3)


@pytest.mark.slow
def test_steps_on_a_saved_sdxl_folder(capsys, tmp_path, sdxl_folder):
    out = tmp_path / "xl"
    rc, _, _ = run(
        capsys, "steps", PROMPT, "--model", sdxl_folder, "--steps", "3", "--out", out, "--no-progress"
    )
    assert rc == 0
    trace = Trace.load(out / "trace.safetensors")
    assert trace.family == "sdxl" and len(trace) == 3
    w, h = size(out / "image.png")
    assert read_frames(out / "denoising.gif").shape == (3, h, w, 3)


def test_steps_on_a_zero_terminal_snr_v_prediction_model(sd2_pipe, tmp_path):
    from diffusers import DDIMScheduler

    from sdexplore.cli import build_parser
    from sdexplore.cli.steps import write_steps

    sd2_pipe.scheduler = DDIMScheduler.from_config(
        sd2_pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )
    args = build_parser().parse_args(["steps", "a red circle", "--steps", "3"])
    names = {
        "image": "image.png",
        "x0": "x0.png",
        "preview": "p.png",
        "gif": "d.gif",
        "trace": "t.safetensors",
    }
    write_steps(sd2_pipe, args, {k: tmp_path / v for k, v in names.items()})
    assert len(Trace.load(tmp_path / "t.safetensors")) == 3


def test_x0_decoding_upcasts_a_float16_vae_that_asks_for_it_and_puts_it_back(sd1_pipe):
    import copy

    from sdexplore.cli.steps import decode_x0
    from sdexplore.decoding import decode_with
    from sdexplore.generation import generate

    _, obs = generate(sd1_pipe, "a red circle", seed=0, num_inference_steps=2)
    reference = copy.deepcopy(sd1_pipe.vae)  # float32
    sd1_pipe.vae.to(torch.float16)
    sd1_pipe.vae.register_to_config(force_upcast=True)  # as SDXL's VAE config says
    decoded = decode_x0(sd1_pipe, obs.steps, progress=False)
    assert sd1_pipe.vae.dtype == torch.float16  # restored
    assert len(decoded) == 2 and decoded[0].shape == (64, 64, 3) and decoded[0].dtype == np.uint8
    reference.load_state_dict({k: v.float() for k, v in sd1_pipe.vae.state_dict().items()})  # same weights
    assert np.array_equal(
        decoded[1], decode_with(reference, obs.steps[1].x0)[0].numpy()
    )  # decoded in float32


# ---------------------------------------------------------------- attention


def test_attention_writes_an_overlay_per_word_a_grid_and_the_maps(capsys, tmp_path):
    out = tmp_path / "att"
    rc, stdout, _ = run(capsys, "attention", "a big red circle on a blue background", "--steps", "4", "--out",
                        out, "--no-progress")  # fmt: skip
    assert rc == 0
    words = ["a", "big", "red", "circle", "on", "blue", "background"]  # "a" twice in the prompt, one file
    overlays = sorted(p.name for p in out.glob("attention_*.png") if p.name != "attention_grid.png")
    assert overlays == sorted(f"attention_{w}.png" for w in words)
    image_size = size(out / "image.png")
    k = -(-HEAT_MIN_SIDE // min(image_size))  # a 64x64 image's maps were 64x64 PNGs: now viewable
    assert min(image_size) * k >= 256
    assert all(size(out / name) == (image_size[0] * k, image_size[1] * k) for name in overlays)
    maps = AttentionMaps.load(out / "attention.safetensors")
    assert list(dict.fromkeys(maps.words)) == words and maps.num_steps == 4
    assert maps.image_size == image_size[::-1]
    tile_w, tile_h = TILE * image_size[0] // max(image_size), TILE * image_size[1] // max(image_size)
    assert size(out / "attention_grid.png") == (
        84 + 7 * (tile_w + 2) - 2,
        18 + 4 * (tile_h + 2) - 2,
    )  # 7 words, 4 steps
    assert "circle: mean attention mass" in stdout
    overlay = np.asarray(Image.open(out / "attention_circle.png"))
    assert overlay.std() > 5  # not one flat colour


def test_attention_selected_words_including_a_phrase(capsys, tmp_path):
    out = tmp_path / "att"
    rc, _, _ = run(capsys, "attention", "a big red circle on a blue background", "--words", "circle",
                   "blue background", "--steps", "2", "--rows", "2", "--out", out, "--no-progress")  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "image.png",
            "attention_circle.png",
            "attention_blue_background.png",
            "attention_grid.png",
            "attention.safetensors",
            MANIFEST,
        ]  # fmt: skip
    )


@pytest.mark.slow
def test_attention_on_a_saved_sdxl_folder(capsys, tmp_path, sdxl_folder):
    out = tmp_path / "xl"
    rc, _, _ = run(capsys, "attention", PROMPT, "--model", sdxl_folder, "--words", "circle", "--steps", "2",
                   "--out", out, "--no-progress")  # fmt: skip
    assert rc == 0
    maps = AttentionMaps.load(out / "attention.safetensors")
    assert maps.family == "sdxl"
    k = -(-HEAT_MIN_SIDE // min(size(out / "image.png")))  # whole upscale to a viewable short side
    assert size(out / "attention_circle.png") == tuple(k * v for v in size(out / "image.png"))


# ---------------------------------------------------------------- walk


def test_walk_writes_a_gif_with_one_frame_per_frame_and_prints_smoothness(capsys, tmp_path):
    out = tmp_path / "walk.gif"
    rc, stdout, _ = run(capsys, "walk", "a red circle", "a blue square", "--seeds", "0", "1", "--frames", "5",
                        "--steps", "3", "--out", out, "--no-progress")  # fmt: skip
    assert rc == 0
    frames = read_frames(out)
    assert frames.shape[0] == 5
    assert f"wrote {out}" in stdout
    assert "smoothness (1 − Gini)" in stdout and "5 frames" in stdout


@pytest.mark.slow
def test_walk_circular_mp4(capsys, tmp_path):
    out = tmp_path / "loop.mp4"
    rc, stdout, _ = run(capsys, "walk", "a small green square", "--seeds", "0", "1", "2", "--frames", "6",
                        "--circular", "--steps", "2", "--out", out, "--no-progress")  # fmt: skip
    assert rc == 0
    assert read_frames(out).shape[0] == 6
    assert "6 frames" in stdout


# ---------------------------------------------------------------- SD3 and Flux folders


@pytest.fixture(scope="module", params=["sd3", "flux"])
def mmdit_folder(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """(family, folder) of a tiny random SD3 or Flux.1 pipeline saved with save_pretrained (T5 tokenizer too)."""
    from sdexplore.fixtures import tiny_pipeline

    folder = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}"
    tiny_pipeline(request.param).save_pretrained(folder)
    return request.param, folder


@pytest.mark.slow
def test_every_command_on_a_saved_mmdit_folder(capsys, tmp_path, mmdit_folder):
    """describe, steps, attention and walk work unchanged on SD3 and Flux: the same files as on the UNets."""
    family, folder = mmdit_folder
    size_args = ("--height", "64", "--width", "96", "--no-progress")
    rc, out, _ = run(capsys, "describe", folder, "--json", "--steps", "3", "--height", "64", "--width", "96")
    assert rc == 0
    data = json.loads(out)
    assert data["family"] == family and data["latent_shape"] == [16, 8, 12] and len(data["timesteps"]) == 3
    assert "transformer" in {c["name"] for c in data["components"]}
    assert ("double-stream" if family == "flux" else "joint (MMDiT)") in data["blocks"][0]
    rc, out, _ = run(
        capsys, "describe", folder, "--prompt", "a big red circle", "--height", "64", "--width", "64"
    )
    assert (
        rc == 0 and "▁cir" in out and "2 single-stream blocks" in out
        if family == "flux"
        else "circle</w>" in out
    )

    steps = tmp_path / "steps"
    rc, _, _ = run(capsys, "steps", "a red circle", "--model", folder, "--steps", "2", "--seed", "3", "--out",
                   steps, *size_args)  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in steps.iterdir()) == sorted(
        ["image.png", "steps_x0.png", "steps_preview.png", "denoising.gif", "trace.safetensors", MANIFEST]
    )
    trace = Trace.load(steps / "trace.safetensors")
    assert trace.family == family and len(trace) == 2 and trace.meta["seed"] == 3
    assert tuple(trace[0].x0.shape) == (1, 16, 8, 12)  # x0 unpacked to the latent grid on Flux too
    assert size(steps / "image.png") == (96, 64) and read_frames(steps / "denoising.gif").shape == (
        2,
        64,
        96,
        3,
    )

    att = tmp_path / "att"
    rc, stdout, _ = run(capsys, "attention", "a big red circle", "--model", folder, "--steps", "2", "--out", att,
                        *size_args)  # fmt: skip
    assert rc == 0
    maps = AttentionMaps.load(att / "attention.safetensors")
    assert maps.family == family and maps.kind == "joint" and maps.num_steps == 2
    assert maps.words == ["a", "big", "red", "circle"]  # T5's "▁cir" "cle" merged
    assert sorted(p.name for p in att.glob("attention_*.png")) == sorted(
        f"attention_{w}.png" for w in ["a", "big", "red", "circle", "grid"]
    )
    assert size(att / "image.png") == (96, 64)
    assert size(att / "attention_circle.png") == (
        384,
        256,
    )  # upscaled x4: the short side reaches HEAT_MIN_SIDE
    assert "circle: mean attention mass" in stdout
    assert np.asarray(Image.open(att / "attention_circle.png")).std() > 5  # not one flat colour

    walk_out = tmp_path / "walk.gif"
    rc, stdout, _ = run(capsys, "walk", "a red circle", "a blue square", "--model", folder, "--seeds", "0", "1",
                        "--frames", "3", "--steps", "2", "--out", walk_out, *size_args)  # fmt: skip
    assert rc == 0 and read_frames(walk_out).shape == (3, 64, 96, 3) and "3 frames" in stdout

    rc, _, err = run(
        capsys, "steps", "a red circle", "--model", folder, "--height", "72", "--out", tmp_path / "o"
    )
    assert rc != 0 and len(error_lines(err)) == 1 and "--height must be a multiple of 16" in err
    assert not (tmp_path / "o").exists()  # refused once the model is known, before generating


@pytest.mark.parametrize("family", ["sd1", "sd3", "flux"])
def test_sizes_and_negative_are_checked_once_the_model_is_known(family):
    """SD3 and Flux work in 2x2 patches of 8x8 VAE blocks: sizes in multiples of 16 (FluxPipeline would round
    72 down to 64 silently); Flux.1 has no CFG batch, so a negative prompt it would ignore is refused."""
    from sdexplore.cli import build_parser
    from sdexplore.cli._common import _check_for_model
    from sdexplore.cli.output import InputError
    from sdexplore.fixtures import tiny_pipeline

    pipe = tiny_pipeline(family)
    ok = build_parser().parse_args(
        ["steps", "a red circle", "--height", "48", "--width", "64", "--negative", "x"]
    )
    odd = build_parser().parse_args(["steps", "a red circle", "--height", "64", "--width", "72"])
    if family == "sd1":
        _check_for_model(ok, pipe)
        _check_for_model(odd, pipe)  # multiples of 8 suffice for a UNet
        return
    label = {"sd3": "Stable Diffusion 3 / 3.5", "flux": "Flux.1"}[family]
    with pytest.raises(InputError, match=rf"--width must be a multiple of 16 for {label} .*, got 72"):
        _check_for_model(odd, pipe)
    if family == "flux":
        with pytest.raises(InputError, match="--negative is not used by Flux.1"):
            _check_for_model(ok, pipe)
    else:
        _check_for_model(ok, pipe)  # SD3's CFG batch uses the negative prompt


def test_a_size_above_the_embedded_mmdits_limit_is_refused_once_the_model_is_known():
    """tiny-shapes-mmdit draws at most 64 px per side (pos_embed_max_size): --height 128 is one sentence naming
    the limit before generating, not diffusers' error after the prompt is encoded."""
    import sdexplore as sdx
    from sdexplore.cli import build_parser
    from sdexplore.cli._common import _check_for_model
    from sdexplore.cli.output import InputError

    pipe = sdx.load_pipeline("tiny-shapes-mmdit")
    _check_for_model(build_parser().parse_args(["steps", "a red circle", "--height", "64"]), pipe)
    big = build_parser().parse_args(["steps", "a red circle", "--height", "128"])
    with pytest.raises(InputError, match="height=128 is above this model's limit of 64 pixels"):
        _check_for_model(big, pipe)


# ---------------------------------------------------------------- bad input: one line, non-zero exit


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["steps", "   "], "prompt is empty"),
        (["walk", "a red circle", ""], "prompt is empty"),
        (["steps", "a red circle", "--scheduler", "warp-drive"], "unknown scheduler 'warp-drive'"),
        (["steps", "a red circle", "--model", "./no/such/model"], "No such file or folder"),
        (["describe", "./no/such/model"], "No such file or folder"),
        (["attention", "a big red circle", "--words", "dog"], "'dog' is not a word of the prompt"),
        (["walk", "a red circle"], "2 keyframes"),
        (["walk", "a", "b", "--out", "walk.avi"], ".gif or .mp4"),
        (["walk", "a", "b", "c", "--seeds", "0", "1"], "one per keyframe"),
        (["steps", "a red circle", "--height", "60"], "multiple of 8"),
        (["steps", "a red circle", "--steps", "0"], "--steps: must be a whole number from 1"),
        (["steps", "a red circle", "--dtype", "float16", "--device", "cpu"], "float16"),
        (["steps", "a red circle", "--bogus"], "sdexplore steps --help"),
        (["invert", "no-such.png", "a red circle"], "does not exist"),
        (["invert", "no-such.png", " "], "prompt is empty"),
        (["steps", "a red circle", "--image", "no-such.png"], "does not exist"),
        (
            ["attention", "a red circle", "--image", "x.png", "--scheduler", "ddim"],
            "cannot be used with --image",
        ),
        (["walk", "a", "b", "--image", "-"], "1 --image for 2 keyframes"),
        (["edit", "a red circle"], "nothing to edit"),
        (["edit", "a red circle", "--reweight", "dog=0"], "'dog' is not a word of the prompt"),
        ([], "choose a command"),
    ],
)
def test_bad_input_is_one_line_and_a_nonzero_exit(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    rc, stdout, err = run(capsys, *argv)
    assert rc != 0
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("sdexplore: error: ") and needle in lines[0]
    assert "Traceback" not in err and not list(tmp_path.iterdir())  # nothing written


def test_unwritable_output_folder_is_refused_before_any_work(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cases = [(["steps", "a red circle", "--out", blocker / "run"], blocker / "run"),
             (["walk", "a", "b", "--out", blocker / "w.gif"], blocker)]  # fmt: skip
    for argv, folder in cases:
        rc, _, err = run(capsys, *argv)
        assert rc != 0
        assert error_lines(err) == [
            f"sdexplore: error: cannot write into {folder}: {blocker} is a file, not a folder; choose another --out"
        ]
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        rc, _, err = run(capsys, "steps", "a red circle", "--out", locked / "run")
        assert rc != 0 and "not writable" in err


def test_debug_shows_the_traceback(capsys, tmp_path):
    broken = tmp_path / "broken"  # passes every check before loading (a pipeline folder), fails to load
    broken.mkdir()
    (broken / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
    )
    rc, _, err = run(capsys, "steps", "a red circle", "--model", broken, "--out", tmp_path / "o", "--debug")
    assert rc == 1 and "Traceback" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # a failed run leaves no output, no lock


def test_scheduler_aliases_resolve_to_diffusers_classes():
    import diffusers

    for alias, cls in SCHEDULER_ALIASES.items():
        assert resolve_scheduler(alias.upper()) == cls and hasattr(diffusers, cls)
    assert resolve_scheduler("UniPCMultistepScheduler") == "UniPCMultistepScheduler"
    assert resolve_scheduler(None) is None


@pytest.mark.parametrize(
    "command", [None, "describe", "steps", "attention", "walk", "invert", "edit", "direction"]
)
def test_help_of_every_command_has_examples(capsys, command):
    rc, out, _ = run(capsys, *([command] if command else []), "--help")
    assert rc == 0 and "examples:" in out and "usage: sdexplore" in out


def test_help_lists_each_command_once(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0
    for command in (
        "describe",
        "steps",
        "attention",
        "walk",
        "invert",
        "edit",
        "direction",
        "sweep",
        "sweep-report",
    ):
        listed = [ln for ln in out.splitlines() if ln.split()[:1] == [command]]  # "  steps   generate one..."
        assert len(listed) == 1, (command, listed)


def test_help_and_bad_arguments_load_no_torch_or_diffusers():
    """`sdexplore --help` took ~13 s on a busy machine: the parser imported sdexplore.inversion (torch). The
    parser and argument errors must not load torch, diffusers or transformers."""
    from sdexplore.cli._common import INVERT_ITERATIONS
    from sdexplore.inversion import DEFAULT_ITERATIONS

    assert INVERT_ITERATIONS == DEFAULT_ITERATIONS  # the help's default, written out to spare the import
    code = (
        "import contextlib, io, sys\n"
        "import sdexplore.cli as c\n"
        "for argv in (['--help'], ['steps', '--help'], ['invert', '--help'], ['edit', '--help'], ['steps'], "
        "['walk', 'a', '--seed', 'x'], ['edit', 'a', '--seed', '-1'], []):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        c.main(argv)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sdexplore", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "usage: sdexplore" in done.stdout
    imported = {ln.split("|")[-1].strip() for ln in done.stderr.splitlines() if ln.startswith("import time:")}
    assert not imported & {"torch", "diffusers", "transformers"}


@pytest.mark.slow
def test_installed_console_script_help():
    script = Path(sys.executable).parent / "sdexplore"
    if not script.exists():
        pytest.skip(
            f"environment: sdexplore is not pip-installed for {sys.executable}, so it has no console script "
            "(pip install -e .)"
        )
    done = subprocess.run([str(script), "steps", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "denoising.gif" in done.stdout and "examples:" in done.stdout


# ---------------------------------------------------------------- the trained embedded model


def test_trained_model_steps_and_attention_mean_something(capsys, tmp_path):
    from sdexplore.embedded.scenes import read_scene

    out = tmp_path / "att"
    rc, _, _ = run(capsys, "attention", PROMPT, "--words", "circle", "--out", out, "--no-progress")
    assert rc == 0
    image = np.asarray(Image.open(out / "image.png").convert("RGB"))
    seen = read_scene(image)
    assert seen.mask.any(), "the trained model drew no shape for a scene prompt"
    heat = AttentionMaps.load(out / "attention.safetensors").word("circle", normalize="minmax")  # (h, w)
    from sdexplore.heatmaps import upsample

    heat = upsample(heat[None], image.shape[:2])[0].numpy()  # (H, W)
    assert heat[seen.mask].mean() > heat[~seen.mask].mean()  # the "circle" map sits on the circle


# ---------------------------------------------------------------- your own picture: invert and --image


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Rendered scenes as picture files (one at 96x96, resized with a note), a text file named .png."""
    from sdexplore.embedded.scenes import render_scene

    folder = tmp_path_factory.mktemp("pictures")
    files = {"red": folder / "red.png", "green": folder / "green.png", "junk": folder / "junk.png"}
    Image.fromarray(render_scene(PROMPT, seed=3)[0]).save(files["red"])
    green = render_scene("a small green square at the bottom right on a white background", seed=4)[0]
    Image.fromarray(green).resize((96, 96)).save(files["green"])
    files["junk"].write_text("not a picture")
    return files


def test_invert_writes_the_reconstruction_its_psnr_and_the_inversion(capsys, tmp_path, scene_files):
    from sdexplore.inversion import Inversion, psnr

    out = tmp_path / "inv"
    rc, stdout, _ = run(
        capsys, "invert", scene_files["red"], PROMPT, "--steps", "4", "--out", out, "--no-progress"
    )
    assert rc == 0
    names = ["image.png", "reconstruction.png", "inversion.json", "inversion.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, MANIFEST])
    summary = json.loads((out / "inversion.json").read_text())
    inv = Inversion.load(out / "inversion.safetensors")
    recon = np.asarray(Image.open(out / "reconstruction.png").convert("RGB"))
    picture = np.asarray(Image.open(out / "image.png").convert("RGB"))
    assert np.array_equal(recon, inv.reconstruction) and np.array_equal(picture, inv.image)
    assert summary["psnr_db"] == pytest.approx(psnr(recon, picture), abs=1e-3)
    assert summary["vae_round_trip_psnr_db"] == pytest.approx(inv.vae_psnr, abs=1e-3)
    assert (summary["method"], summary["steps"], summary["guidance"]) == ("ddim", 4, 1.0)
    assert f"PSNR {inv.psnr:.2f} dB" in stdout
    # above CFG 1 the default is negative-prompt inversion; a resized picture gets a note
    rc, _, err = run(capsys, "invert", scene_files["green"], "a small green square at the bottom right on a white "
                     "background", "--steps", "2", "--guidance", "3", "--out", tmp_path / "g", "--no-progress")  # fmt: skip
    assert rc == 0 and "sdexplore: note: image 'green.png' is 96×96 (height×width): resized to 64×64" in err
    assert json.loads((tmp_path / "g" / "inversion.json").read_text())["method"] == "negative-prompt"


def test_a_file_that_is_not_a_picture_is_one_error_before_loading(capsys, tmp_path, scene_files, monkeypatch):
    import sdexplore.cli._common as cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
    for argv in (["invert", scene_files["junk"], PROMPT], ["attention", PROMPT, "--image", scene_files["junk"]],
                 ["walk", "a", "b", "--image", scene_files["red"], scene_files["junk"]]):  # fmt: skip
        rc, _, err = run(capsys, *argv, "--out", tmp_path / ("o.gif" if argv[0] == "walk" else "o"))
        assert rc == 2 and error_lines(err) == [
            f"sdexplore: error: {str(scene_files['junk'])!r} is not an image file PIL can read: give a PNG, JPEG, "
            "WebP, BMP, "
            "GIF or TIFF picture"
        ]
        assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_attention_and_steps_on_a_pictures_reconstruction(capsys, tmp_path, scene_files):
    """--image: the maps and steps are those of the reconstruction pass, whose image is invert()'s reconstruction
    (negative-prompt inversion at the embedded model's CFG scale)."""
    from sdexplore.inversion import invert

    rc, _, err = run(capsys, "attention", PROMPT, "--image", scene_files["red"], "--words", "circle", "--steps", "3",
                     "--out", tmp_path / "att", "--no-progress")  # fmt: skip
    assert rc == 0 and "reconstruction of" in err
    pipe = load_pipeline()
    inv = invert(
        pipe, scene_files["red"], PROMPT, steps=3, guidance=EMBEDDED_GUIDANCE_SCALE, method="negative-prompt"
    )
    image = np.asarray(Image.open(tmp_path / "att" / "image.png").convert("RGB"))
    assert np.array_equal(image, inv.reconstruction)
    maps = AttentionMaps.load(tmp_path / "att" / "attention.safetensors")
    assert maps.num_steps == 3 and "circle" in maps.words
    rc, _, _ = run(capsys, "steps", PROMPT, "--image", scene_files["red"], "--steps", "3", "--preview", "linear",
                   "--out", tmp_path / "st", "--no-progress")  # fmt: skip
    trace = Trace.load(tmp_path / "st" / "trace.safetensors")
    assert rc == 0 and len(trace) == 3 and trace.meta["image"] == str(scene_files["red"])
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "st" / "image.png").convert("RGB")), inv.reconstruction
    )


def test_walk_between_two_pictures(capsys, tmp_path, scene_files):
    out = tmp_path / "w.gif"
    prompts = [PROMPT, "a small green square at the bottom right on a white background"]
    rc, stdout, err = run(capsys, "walk", *prompts, "--image", scene_files["red"], "-", "--seeds", "0", "1",
                          "--frames", "3", "--steps", "3", "--out", out, "--no-progress")  # fmt: skip
    assert rc == 0 and read_frames(out).shape == (3, 64, 64, 3) and "smoothness" in stdout
