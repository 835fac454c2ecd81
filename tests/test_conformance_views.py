"""The conformance suite, continued: the explorers and the command line on every fixture family.

For each family of ``ALL_FIXTURE_FAMILIES`` the explorers (the timestep scrubber, the attention explorer) build on
the family's own observation in static mode and draw pictures that are not one flat colour; and each CLI command
either runs on the family (the fixture saved with ``save_pretrained`` and loaded back by path, offline, as a user's
folder is) or refuses with one clear line naming what the family lacks. One observation and one saved folder per
family per module.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import gen
from test_conformance import P, call_kwargs, pipe_of

import sdexplore as sdx
from sdexplore.families import FAMILIES
from sdexplore.fixtures import ALL_FIXTURE_FAMILIES, fixture_call_defaults

#: Known gaps, (check, family) → what is missing and where (a strict xfail each, removed by the fix).
PENDING: dict[tuple[str, str], str] = {}  # (check, family) → what the family still lacks (strict xfails)


def _params(check: str) -> list:
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=PENDING[check, n]))
        if (check, n) in PENDING
        else n
        for n in ALL_FIXTURE_FAMILIES
    ]


_OBS: dict[str, tuple[object, np.ndarray]] = {}


def observed(name: str) -> tuple[object, np.ndarray]:
    """One observed run of family ``name`` (steps with x0, attention where it can) and its pictures."""
    if name not in _OBS:
        pipe = pipe_of(name)
        attention = FAMILIES[name].can("attention")
        with sdx.observe(pipe, steps=True, attention=attention) as obs:
            out = pipe(prompt=P, generator=gen(0), **call_kwargs(name))
        pictures = out.frames if hasattr(out, "frames") else out.images
        _OBS[name] = (obs, np.asarray(pictures))
    return _OBS[name]


def _pictures(fig) -> list[np.ndarray]:
    """The arrays of every image drawn on a figure's axes (the panels, not the text around them)."""
    return [np.asarray(im.get_array(), dtype=np.float64) for ax in fig.axes for im in ax.get_images()]


def _not_flat(a: np.ndarray) -> bool:
    return bool(np.nanmax(a) - np.nanmin(a) > 1e-6)


# ---- explorers ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params("scrubber"))
def test_the_timestep_scrubber_draws_the_familys_steps(name) -> None:
    from sdexplore.views.widgets import TimestepScrubber

    obs, _ = observed(name)
    scrub = TimestepScrubber(obs, static=True)
    assert scrub.static and scrub.num_steps == len(obs.steps) > 0
    fig = scrub.figure(columns=2)
    pictures = _pictures(fig)
    assert pictures, "the scrubber drew no pictures"
    assert all(_not_flat(p) for p in pictures), "a panel is one flat colour"


@pytest.mark.parametrize("name", _params("attention-explorer"))
def test_the_attention_explorer_draws_the_familys_maps(name) -> None:
    from sdexplore.views.widgets import AttentionExplorer

    if not FAMILIES[name].can("attention"):
        pytest.skip(f"{name} has no attention maps (refused in test_conformance)")
    obs, pictures = observed(name)
    image = pictures[0] if pictures.ndim == 4 else pictures[0, 0]  # (H, W, 3); a video's first frame
    ex = AttentionExplorer(obs, (image * 255).astype(np.uint8), static=True)
    assert ex.static and "circle" in ex.words
    fig = ex.figure(n_bins=2, max_words=3)
    drawn = _pictures(fig)
    assert drawn and all(_not_flat(p) for p in drawn), "a heat map or picture is one flat colour"


# ---- the command line ----------------------------------------------------------------------------------------
#: command → the capability it needs (None: every family), and its arguments after the model (64 px, 2 steps).
COMMANDS: dict[str, tuple[str | None, list[str]]] = {
    "describe": (None, ["--steps", "2", "--height", "64", "--width", "64"]),
    "steps": ("steps", [P, "--steps", "2", "--height", "64", "--width", "64", "--out", "{out}"]),
    "attention": ("attention", [P, "--steps", "2", "--height", "64", "--width", "64", "--out", "{out}"]),
    "walk": ("walks", [P, "--seeds", "0", "1", "--frames", "2", "--steps", "2", "--height", "64", "--width",
                       "64", "--out", "{out}.gif"]),
    "invert": ("invert", ["{picture}", P, "--steps", "2", "--height", "64", "--width", "64", "--out", "{out}"]),
    "edit": ("controls", [P, "--reweight", "circle=0.5", "--steps", "2", "--height", "64", "--width", "64",
                          "--out", "{out}"]),
}  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory, monkeypatch_module):
    """family → the fixture saved with save_pretrained, loaded by path at most once per module (later commands
    get the same pipeline: the CLI's loading is what the first command checks)."""
    from sdexplore import loading

    root = tmp_path_factory.mktemp("families")
    folders: dict[str, str] = {}
    loaded: dict[str, object] = {}
    real = loading.load_pipeline

    def load_once(model=None, *args, **kwargs):
        if model in loaded:
            return loaded[model]
        pipe = loaded[model] = real(model, *args, **kwargs)
        return pipe

    monkeypatch_module.setattr(loading, "load_pipeline", load_once)

    def folder(name: str) -> str:
        if name not in folders:
            path = root / name
            pipe_of(name).save_pretrained(path)
            folders[name] = str(path)
        return folders[name]

    return folder


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> str:
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    img = np.zeros((64, 64, 3), np.uint8)
    img[...] = (40, 60, 200)
    img[(y - 32) ** 2 + (x - 24) ** 2 < 200] = (220, 30, 30)
    path = tmp_path_factory.mktemp("picture") / "circle.png"
    Image.fromarray(img).save(path)
    return str(path)


def _cli_params() -> list:
    return [
        pytest.param(n, c, marks=pytest.mark.xfail(strict=True, reason=PENDING[f"cli-{c}", n]))
        if (f"cli-{c}", n) in PENDING
        else pytest.param(n, c)
        for n in ALL_FIXTURE_FAMILIES
        for c in COMMANDS
    ]


@pytest.mark.parametrize(("name", "command"), _cli_params())
def test_each_command_runs_on_the_family_or_refuses_in_one_line(
    name, command, saved, picture, tmp_path, capsys
) -> None:
    from sdexplore.cli import main

    capability, args = COMMANDS[command]
    fam = FAMILIES[name]
    # a video family runs steps and attention too (the clip, frame strips, per-frame maps)
    runs = capability is None or fam.can(capability)
    argv = [command, "--model", saved(name), "--no-progress", "--device", "cpu", "--dtype", "float32"]
    argv += [a.format(out=tmp_path / "out", picture=picture) for a in args]
    # a video family: the fixture's short clip (the pipeline's default, 81 frames, takes 6x as long)
    if fam.video and command in ("steps", "attention"):
        argv += ["--frames", str(fixture_call_defaults(name)["num_frames"])]
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    if runs:
        assert rc == 0, err
        assert not errors, err
    else:
        assert rc in (1, 2), f"{command} on {name} did not refuse: {err}"
        assert len(errors) == 1 and errors[0].startswith("sdexplore: error: "), err
        assert "Traceback" not in err and "--debug for the traceback" not in err, err  # an expected refusal
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.gif").exists()  # nothing half-written


@pytest.mark.parametrize("name", ALL_FIXTURE_FAMILIES)
def test_a_negative_prompt_is_refused_exactly_where_the_pipeline_would_not_use_it(name) -> None:
    """--negative is checked once the model is loaded: taken where a negative prompt changes the pictures, refused
    in one sentence where the pipeline takes none (Flux.2 [klein]) or would ignore it (Flux.1 without true CFG)."""
    import argparse
    import inspect

    from sdexplore.cli._common import _check_for_model
    from sdexplore.cli.output import InputError

    pipe, kw = pipe_of(name), call_kwargs(name)
    args = argparse.Namespace(negative="a green square", command="edit")  # a command Wan is not refused for
    if "negative_prompt" in inspect.signature(type(pipe).__call__).parameters:
        out = pipe(prompt=P, generator=gen(0), **kw)
        plain = out.frames if hasattr(out, "frames") else out.images
        out = pipe(prompt=P, negative_prompt=args.negative, generator=gen(0), **kw)
        used = not np.array_equal(plain, out.frames if hasattr(out, "frames") else out.images)
    else:
        used = False
    if used:
        _check_for_model(args, pipe)  # no error
    else:
        with pytest.raises(InputError, match="--negative is not"):
            _check_for_model(args, pipe)
