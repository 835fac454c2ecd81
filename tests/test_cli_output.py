"""The `sdexplore` command's output is a transaction (whole or nothing, one run at a time, no stale files) and
every input is checked before the model loads: one line and exit 2, never a traceback."""

from __future__ import annotations

import math
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ModelLoaded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdexplore.cli._common as cli_common
import sdexplore.cli.output as cli_output
import sdexplore.cli.steps as cli_steps
from sdexplore.cli import main
from sdexplore.results.trace import Trace

FAST = ("--steps", "2", "--preview", "linear", "--no-progress")


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """main(argv) in-process → (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_lines(err: str) -> list[str]:
    """stderr without notes and progress bars: what the user sees as the error."""
    return [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("sdexplore: note:")]


def beside(folder: Path) -> list[str]:
    """Names in a folder: the output plus anything a run left beside it (lock, temporary, set-aside)."""
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- exclusive


def test_a_second_run_into_the_same_out_is_refused_while_the_first_writes(capsys, tmp_path, monkeypatch):
    out = tmp_path / "shared"
    started, release = threading.Event(), threading.Event()
    real = cli_steps.write_steps

    def slow_write(pipe, args, files, **kw):
        started.set()
        assert release.wait(60)
        real(pipe, args, files, **kw)

    monkeypatch.setattr(cli_steps, "write_steps", slow_write)
    first: list[int] = []
    worker = threading.Thread(
        target=lambda: first.append(main(["steps", "a red circle", *FAST, "--out", str(out)]))
    )
    worker.start()
    try:
        assert started.wait(120)
        rc, stdout, err = run(capsys, "steps", "a blue square", *FAST, "--out", out, "--force")
    finally:
        release.set()
        worker.join(120)
    assert rc == 2 and "wrote" not in stdout
    lines = error_lines(err)
    assert len(lines) == 1 and "another sdexplore run" in lines[0] and str(out) in lines[0], err
    assert first == [0]
    assert Trace.load(out / "trace.safetensors").meta["prompt"] == "a red circle"  # the first run's files
    assert beside(tmp_path) == ["shared"]  # no lock, no temporary folder left


def test_a_live_lock_refuses_and_a_dead_runs_lock_is_taken_over(capsys, tmp_path, no_model):
    out = tmp_path / "run"
    lock = cli_output._lock_path(out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(f"{sleeper.pid} {os.uname().nodename}\n")
        rc, _, err = run(capsys, "steps", "a red circle", "--out", out)
        assert rc == 2 and error_lines(err) == [error_lines(err)[0]] and f"pid {sleeper.pid}" in err
        assert not no_model  # refused before loading
        assert lock.read_text().startswith(str(sleeper.pid))  # someone else's lock is left alone
    finally:
        sleeper.kill()
        sleeper.wait()
    # the sleeper is dead now: its lock is stale, and so are the leftovers of a run killed mid-write
    leftover = tmp_path / (cli_output._side_name(out, "tmp-") + "abcd1234")
    leftover.mkdir()
    (leftover / "image.png").write_bytes(b"half")
    rc, _, _ = run(capsys, "steps", "a red circle", "--out", out)
    assert rc == 1 and len(no_model) == 1  # took the lock and reached the (fake) model load
    assert beside(tmp_path) == []  # the dead lock, the leftover and this run's temporary folder: all gone


# ---------------------------------------------------------------- atomic: Ctrl-C and failures leave nothing


def _interrupt_after_partial_write(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """Make the writer named ``target`` write a few bytes and then be interrupted (Ctrl-C mid-write)."""
    import sdexplore.views.export as export

    def partial(images, path, **kwargs):
        Path(path).write_bytes(b"")  # as ffmpeg leaves a 0-byte .mp4
        raise KeyboardInterrupt

    monkeypatch.setattr(export, target, partial)


def test_ctrl_c_while_writing_leaves_nothing_and_the_next_run_needs_no_force(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupt_after_partial_write(monkeypatch, "save_gif")  # the GIF comes after image.png and the strip
    rc, stdout, err = run(capsys, "steps", "a red circle", *FAST, "--out", out)
    assert rc == 130 and "wrote" not in stdout
    assert error_lines(err) == ["sdexplore: interrupted; nothing was written (" + str(out) + " is as it was)"]
    assert beside(tmp_path) == []  # no image.png, no temporary folder, no lock
    monkeypatch.undo()
    assert run(capsys, "steps", "a red circle", *FAST, "--out", out)[0] == 0  # no --force needed


def test_ctrl_c_during_a_forced_run_keeps_the_old_output(capsys, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run(capsys, "steps", "a red circle", *FAST, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _interrupt_after_partial_write(monkeypatch, "save_gif")
    rc, _, _ = run(capsys, "steps", "a blue square", *FAST, "--out", out, "--force")
    assert rc == 130
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert beside(tmp_path) == ["run"]


def test_ctrl_c_during_a_walk_leaves_no_empty_mp4(capsys, tmp_path, monkeypatch):
    out = tmp_path / "walk.mp4"
    _interrupt_after_partial_write(monkeypatch, "save_mp4")
    rc, _, _ = run(capsys, "walk", "a red circle", "a blue square", "--frames", "2", "--steps", "1", "--out", out,
                   "--no-progress")  # fmt: skip
    assert rc == 130 and beside(tmp_path) == []


def test_sigterm_mid_write_is_handled_as_ctrl_c(capsys, tmp_path):
    """SIGTERM (kill, a job scheduler) used to kill the run where it stood: temporary folder and lock left, exit
    -15. Now it is Ctrl-C: exit 130, the old output as it was, nothing beside it."""
    import json
    import signal
    import time

    out, marker = tmp_path / "run", tmp_path / "marker" / "writing"
    marker.parent.mkdir()
    assert run(capsys, "steps", "a red circle", *FAST, "--out", out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = ["steps", "a blue square", *FAST, "--out", str(out), "--force"]
    code = (
        "import pathlib, sys, time\n"
        "import sdexplore.cli as cli, sdexplore.views.export as export\n"
        "def stuck(images, path, **kw):  # the GIF half written, then the run is stopped there\n"
        "    pathlib.Path(path).write_bytes(b'GIF89a')\n"
        f"    pathlib.Path({str(marker)!r}).write_text('writing')\n"
        "    time.sleep(300)\n"
        "export.save_gif = stuck\n"
        f"sys.exit(cli.main({json.dumps(argv)}))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached its GIF"
            time.sleep(0.05)
        assert len(beside(tmp_path)) == 4  # run, marker, this run's lock and temporary folder
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert f"interrupted; nothing was written ({out} is as it was)" in stderr and "wrote" not in stdout
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert beside(tmp_path) == ["marker", "run"]  # no lock, no temporary folder


# ---------------------------------------------------------------- --force replaces the whole output


def test_force_leaves_no_stale_files_of_the_older_run(capsys, tmp_path):
    out = tmp_path / "run"
    assert run(capsys, "steps", "a red circle", "--steps", "2", "--out", out, "--no-progress")[0] == 0
    assert (out / "steps_x0.png").exists()
    assert run(capsys, "steps", "a red circle", *FAST, "--out", out, "--force")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["image.png", "steps_preview.png", "denoising.gif", "trace.safetensors", cli_output.MANIFEST]
    )  # no steps_x0.png from the first run
    assert beside(tmp_path) == ["run"]

    att = tmp_path / "att"
    argv = (
        "attention",
        "a big red circle on a blue background",
        "--steps",
        "1",
        "--no-progress",
        "--out",
        att,
    )
    assert run(capsys, *argv, "--words", "circle", "blue")[0] == 0
    assert run(capsys, *argv, "--words", "red", "--force")[0] == 0
    assert sorted(p.name for p in att.glob("attention_*.png")) == ["attention_grid.png", "attention_red.png"]


def test_outputs_have_ordinary_permissions(capsys, tmp_path):
    out = tmp_path / "run"
    assert run(capsys, "steps", "a red circle", *FAST, "--out", out)[0] == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's private 0700


def test_force_never_deletes_a_users_file_that_has_an_outputs_name(capsys, tmp_path, no_model):
    """--force replaces only what the folder's manifest lists: a user's trace.docx or image.png, in a folder with no
    manifest or beside sdexplore's own files, stays (the old name patterns matched them)."""
    for names in (["trace.docx"], ["image.png", "attention_notes.png"], ["attention.txt"]):
        mine = tmp_path / "mine"
        mine.mkdir()
        for name in names:
            (mine / name).write_text("keep me")
        rc, _, err = run(capsys, "steps", "a red circle", "--out", mine, "--force")
        assert rc == 2 and len(error_lines(err)) == 1 and cli_output.MANIFEST in err, err
        assert {p.name: p.read_text() for p in mine.iterdir()} == dict.fromkeys(names, "keep me")
        assert beside(tmp_path) == ["mine"]
        for name in names:
            (mine / name).unlink()
        mine.rmdir()
    assert not no_model  # refused before loading


def test_force_replaces_sdexplores_own_output_only_while_its_manifest_holds(capsys, tmp_path, monkeypatch):
    import json

    out = tmp_path / "run"
    assert run(capsys, "steps", "a red circle", *FAST, "--out", out)[0] == 0
    manifest = json.loads((out / cli_output.MANIFEST).read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in out.iterdir() if p.name != cli_output.MANIFEST)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    (out / "trace.docx").write_text("my notes")  # a user's file with an output's name, beside sdexplore's
    rc, _, err = run(capsys, "steps", "a blue square", *FAST, "--out", out, "--force")
    assert rc == 2 and "trace.docx" in err and (out / "trace.docx").read_text() == "my notes"
    (out / "trace.docx").unlink()

    (out / "image.png").write_bytes(b"my own picture")  # an output the user has since changed
    rc, _, err = run(capsys, "steps", "a blue square", *FAST, "--out", out, "--force")
    assert rc == 2 and "image.png, changed since sdexplore wrote it" in err
    (out / "image.png").write_bytes(before["image.png"])

    real = cli_steps.write_steps

    def user_adds_a_file_meanwhile(pipe, args, files, **kw):
        (out / "notes.txt").write_text("written during the run")
        real(pipe, args, files, **kw)

    monkeypatch.setattr(cli_steps, "write_steps", user_adds_a_file_meanwhile)
    rc, stdout, err = run(capsys, "steps", "a blue square", *FAST, "--out", out, "--force")
    assert rc == 2 and "notes.txt" in err and "wrote" not in stdout
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == {**before, "notes.txt": b"written during the run"}  # old output whole, the file kept
    assert beside(tmp_path) == ["run"]
    (out / "notes.txt").unlink()
    monkeypatch.undo()

    assert run(capsys, "steps", "a blue square", *FAST, "--out", out, "--force")[0] == 0
    assert Trace.load(out / "trace.safetensors").meta["prompt"] == "a blue square"


def test_force_never_replaces_a_folder_holding_other_files(capsys, tmp_path, monkeypatch, no_model):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    rc, _, err = run(capsys, "steps", "a red circle", "--out", mine, "--force")
    assert rc == 2 and "notes.txt" in err and (mine / "notes.txt").read_text() == "keep me"
    monkeypatch.chdir(mine)
    rc, _, err = run(capsys, "steps", "a red circle", "--out", ".", "--force")
    assert rc == 2 and "current folder" in err
    assert not no_model


# ---------------------------------------------------------------- every check before the model loads


def _proc_case() -> list[str]:
    return ["steps", "a red circle", "--out", "/proc/sdexplore-out"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (_proc_case(), "cannot write into /proc/sdexplore-out"),
        (["walk", "a", "b", "--out", "/proc/w.gif"], "cannot write into /proc"),
        (["steps", "a red circle", "--seed", "1e23"], "--seed"),
        (["steps", "a red circle", "--seed", str(10**23)], "--seed"),
        (["steps", "a red circle", "--seed", "-1"], "--seed"),
        (["walk", "a", "--seeds", "0", str(2**64)], "--seeds"),
        (["steps", "a red circle", "--scheduler", "FlowMatchEulerDiscreteScheduler"], "FlowMatchEuler"),
        (["steps", "a red circle", "--scheduler", "DDIMInverseScheduler"], "DDIMInverseScheduler"),
        (["walk", *"abcdefghij", "--frames", "5"], "10 keyframes"),
        (["walk", "a", "b", "c", "--frames", "2", "--circular"], "in a loop"),
        (["steps", "a red circle", "--guidance", "nan"], "--guidance"),
        (["steps", "a red circle", "--guidance", "inf"], "--guidance"),
        (["steps", "a red circle", "--guidance", "-3"], "--guidance"),
        (["steps", "a red circle", "--fps", "nan"], "--fps"),
        (["walk", "a", "b", "--fps", "-inf"], "--fps"),
        (["walk", "a", "b", "--fps", "1e400"], "--fps"),
        (["walk", "a", "b", "--fps", "0.001"], "--fps 0.001: A GIF cannot play"),  # after the walk, before
        (["walk", "a", "b", "--fps", "0.0001", "--out", "w.mp4"], "--fps 0.0001: A video cannot play"),
        (["steps", "a red circle", "--fps", "0.001"], "--fps 0.001"),
        (["steps", "a red circle", "--steps", "5000"], "--steps"),
        (["steps", "a red circle", "--height", str(2**40)], "--height"),
        (["walk", "a", "b", "--frames", str(10**12)], "--frames"),
        (["steps", "a red circle", "--device", "banana"], "banana"),
        (["steps", "a red circle", "--dtype", "float16", "--device", "cpu"], "float16"),
        (["steps", "a red circle", "--model", "./no/such/model"], "No such file or folder"),
        (["attention", "a big red circle", "--words", "dog"], "'dog' is not a word of the prompt"),
        (["steps", "a red circle", "--out", "run\0x"], "--out"),
    ],
)
def test_each_bad_input_is_refused_before_the_model_loads(
    capsys, tmp_path, monkeypatch, no_model, argv, needle
):
    if "/proc" in " ".join(argv) and not Path("/proc/self").exists():
        pytest.skip("environment: this system has no /proc")
    monkeypatch.chdir(tmp_path)
    rc, stdout, err = run(capsys, *argv)
    lines = error_lines(err)
    assert (rc, len(lines)) == (2, 1), err
    assert lines[0].startswith("sdexplore: error: ") and needle in lines[0], lines[0]
    assert not no_model, "the model was loaded before the bad input was found"
    assert beside(tmp_path) == []  # nothing written, no lock


def test_a_read_only_folder_is_refused_even_for_root(capsys, tmp_path, no_model):
    if not Path("/proc/self").exists():
        pytest.skip("environment: this system has no /proc (the one place root cannot write)")
    rc, _, err = run(capsys, "attention", "a red circle", "--out", "/proc/self/att")
    assert rc == 2 and len(error_lines(err)) == 1 and not no_model


# ---------------------------------------------------------------- property: exit 0 or 2, one line, no traceback

_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "1e23", "0x10", "", " ", "1_000", "٣", "3.5", "-0"]),
)
_words = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["a red circle", "circle", "", " ", "\t", "--force", "-", "é", "🙂", "a\nb", "x" * 300]),
)
_paths = st.one_of(
    st.sampled_from(
        [
            "out",
            "out.gif",
            "o.mp4",
            ".",
            "..",
            "/",
            "/proc/x",
            "/proc/x.gif",
            "a/b/c",
            "~",
            "x" * 300,
            "out.avi",
            "nested/w.gif",
            "image.png",
        ]
    ),  # fmt: skip
    st.text(min_size=1, max_size=20).filter(lambda s: "\0" not in s),
)
_options = {
    "steps": ["--steps", "--seed", "--guidance", "--height", "--width", "--fps"],
    "attention": ["--steps", "--seed", "--guidance", "--height", "--width", "--rows"],
    "walk": ["--steps", "--seeds", "--guidance", "--height", "--width", "--fps", "--frames", "--batch-size"],
    "describe": ["--steps", "--height", "--width"],
}


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    command = draw(st.sampled_from(sorted(_options)))
    argv = [command]
    if command == "walk":
        argv += draw(st.lists(_words, min_size=1, max_size=4))
    elif command != "describe":
        argv.append(draw(_words))
    for option in draw(st.lists(st.sampled_from(_options[command]), max_size=4, unique=True)):
        argv += [option, draw(_numbers)]
    if command != "describe":
        if draw(st.booleans()):
            argv += ["--out", draw(_paths)]
        if draw(st.booleans()):
            argv += ["--scheduler", draw(st.sampled_from(["euler", "dpm++", "LCMScheduler", "FlowMatchEulerDiscreteScheduler", "Scheduler", "x"]))]  # fmt: skip
        if command == "attention" and draw(st.booleans()):
            argv += ["--words", *draw(st.lists(_words, min_size=1, max_size=3))]
        argv += draw(
            st.lists(st.sampled_from(["--force", "--circular", "--no-progress"]), max_size=2, unique=True)
        )
    return argv


def _sane(option: str, text: str) -> bool:
    """An oracle independent of the command's code: may this value reach a model load at all?"""
    try:
        value = int(text) if option not in ("--guidance", "--fps") else float(text)
    except ValueError:
        return False
    if option in ("--seed", "--seeds"):
        return 0 <= value < 2**64
    if option == "--guidance":
        return math.isfinite(value) and 0 <= value <= 100
    if option == "--fps":
        return math.isfinite(value) and 0 < value <= 240
    if option in ("--height", "--width"):
        return 8 <= value <= 8192 and value % 8 == 0
    return (2 if option == "--frames" else 1) <= value <= 10_000


def _numbers_given(argv: list[str]) -> list[tuple[str, str]]:
    """(option, value) for every numeric option on a command line (each value of --seeds)."""
    pairs, option = [], None
    for arg in argv:
        if arg.startswith("--"):
            option = arg if arg in _NUMERIC else None
        elif option is not None:
            pairs.append((option, arg))
            if option != "--seeds":
                option = None
    return pairs


_NUMERIC = {o for options in _options.values() for o in options}


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(argv=command_lines())
def test_any_command_line_ends_in_one_line_exit_2_or_reaches_the_model(argv, tmp_path_factory):
    """Random values (nan, inf, huge, negative, odd text and paths): the outcome is exit 2 with exactly one line on
    stderr and nothing written, or every check passes, only sane numbers reach the (faked) model load, the lock is
    held there, and the failure of that load leaves no lock or temporary output behind."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    folder = tmp_path_factory.mktemp("prop")
    calls: list[list[Path]] = []

    def fake_load(*args: object, **kwargs: object) -> None:
        calls.append(list(folder.rglob("*.sdexplore-lock")))
        raise ModelLoaded

    real, cwd = cli_common._load, os.getcwd()
    cli_common._load = fake_load
    os.chdir(folder)
    err, out = io.StringIO(), io.StringIO()
    try:
        with redirect_stderr(err), redirect_stdout(out):
            rc = main(argv)
    finally:
        cli_common._load, _ = real, os.chdir(cwd)
    text = err.getvalue()
    assert "Traceback" not in text, text
    if calls:  # every check passed: the failure is the fake load's, reported as a failed run (1)
        assert rc == 1, (argv, rc, text)
        insane = [(o, v) for o, v in _numbers_given(argv) if not _sane(o, v)]
        assert not insane, f"{insane} reached the model load: {argv}"
        out_arg = argv[argv.index("--out") + 1] if "--out" in argv else "default"
        if argv[0] != "describe" and not out_arg.startswith(("/", "~")):
            assert calls[0], f"the model loads before the output's lock is taken: {argv}"
    else:
        assert rc in (0, 2), (argv, rc, text)
        if rc == 2:
            assert len(error_lines(text)) == 1 and text.startswith("sdexplore: error: "), (argv, text)
    assert not [p for p in folder.rglob("*") if ".sdexplore-" in p.name], argv  # no lock, temp or probe left
    if rc == 2:
        assert not any(p.is_file() for p in folder.rglob("*")), argv  # bad input writes nothing
