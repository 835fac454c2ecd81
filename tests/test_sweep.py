"""sdexplore.sweep: prompt files, planning, atomic resumable item folders, settings refusal, interrupts, report."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdexplore
from sdexplore.errors import InvalidArgumentError
from sdexplore.sweeps import PromptRow, plan_items, read_prompts, sweep, sweep_report
from sdexplore.sweeps import folder as fs

PROMPTS = [
    "a big red circle at the top left on a blue background",
    "a small green square at the right on a white background",
    "a big yellow triangle at the bottom on a black background",
]
STEPS = 2  # the tests check the machinery, not the pictures


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder/items`` → its SHA-256 (a manifest's without its timing, ``run``)."""
    out = {}
    for p in sorted((folder / "items").rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "manifest.json":
                manifest = json.loads(data)
                del manifest["run"]  # seconds, process, host
                data = json.dumps(manifest, sort_keys=True).encode()
            out[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


# ---------------------------------------------------------------- prompt files


def test_text_csv_and_jsonl_prompt_files(tmp_path):
    text = read_prompts(_write(tmp_path, "p.txt", "# a comment\n\na red circle\n  a blue square  \n"))
    assert [(r.prompt, r.line, r.seed) for r in text] == [
        ("a red circle", 3, None),
        ("a blue square", 4, None),
    ]
    csv_rows = read_prompts(
        _write(tmp_path, "p.csv", 'prompt,seed,negative,words\na red circle,7,,circle;red\n"a, b",,blurry,\n')
    )
    assert (
        csv_rows[0].seed == 7
        and csv_rows[0].words == ("circle", "red")
        and csv_rows[0].negative_prompt is None
    )
    assert (
        csv_rows[1].prompt == "a, b" and csv_rows[1].negative_prompt == "blurry" and csv_rows[1].words is None
    )
    jsonl = read_prompts(
        _write(
            tmp_path,
            "p.jsonl",
            '{"prompt": "a red circle", "seed": 3, "words": ["red circle"]}\n\n{"prompt": "x"}\n',
        )
    )
    assert (jsonl[0].seed, jsonl[0].words, jsonl[1].line) == (3, ("red circle",), 3)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("empty.txt", "\n# only a comment\n", "holds no prompts"),
        ("empty.csv", "", "holds no prompts"),
        (
            "bad.csv",
            "text,seed\na red circle,1\n",
            "line 1: the CSV header ['text', 'seed'] has unknown column 'text'",
        ),
        ("noprompt.csv", "seed\n1\n", "no 'prompt' column"),
        ("cells.csv", "prompt,seed\na red circle,1,2\n", "line 2: 3 cells for 2 columns"),
        ("seed.csv", "prompt,seed\na,\nb,minus one\n", "line 3: the seed is 'minus one'"),
        (
            "bad.jsonl",
            '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",\n',
            "bad.jsonl line 3: not valid JSON",
        ),
        ("list.jsonl", '["a red circle"]\n', "line 1: a JSON list, not an object"),
        ("key.jsonl", '{"prompt": "a", "sed": 1}\n', "line 1: unknown key 'sed'"),
        ("words.jsonl", '{"prompt": "a", "words": "circle"}\n', "line 1: \"words\" is 'circle'"),
    ],
)
def test_bad_prompt_files_name_the_line(tmp_path, name, text, expected):
    with pytest.raises(InvalidArgumentError) as info:
        read_prompts(_write(tmp_path, name, text))
    assert str(info.value).startswith(str(tmp_path / name)) and expected in str(info.value)


def test_plan_order_seeds_and_digest():
    rows = PromptRow
    items = plan_items(
        [rows("p0", 1), rows("p1", 2, seed=9), rows("p2", 3, words=("x",))], seeds=[4, 5], words=["w"]
    )
    assert [(i.index, i.prompt, i.seed, i.words) for i in items] == [
        (0, "p0", 4, ("w",)),
        (1, "p0", 5, ("w",)),
        (2, "p1", 9, ("w",)),
        (3, "p2", 4, ("x",)),
        (4, "p2", 5, ("x",)),
    ]
    assert len({i.key for i in items}) == 5
    with pytest.raises(InvalidArgumentError, match="repeat a seed"):
        plan_items([rows("p", 1)], seeds=[1, 1])


# ---------------------------------------------------------------- one sweep, its files and its index


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A 6-item sweep (3 prompts × 2 seeds) on the embedded model, 2 steps, everything kept."""
    out = tmp_path_factory.mktemp("sweep") / "run"
    result = sweep(PROMPTS, out, seeds=[0, 1], steps=STEPS, progress=False)
    return out, result


def test_every_item_is_written_with_a_checked_manifest_and_indexed(swept):
    out, result = swept
    assert (result.items, result.done, result.made) == (6, 6, 6)
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["item"] for r in rows] == list(range(6)) and {r["status"] for r in rows} == {"done"}
    assert [(r["prompt"], r["seed"]) for r in rows] == [(p, s) for p in PROMPTS for s in (0, 1)]
    for row in rows:
        folder = out / "items" / row["name"]
        manifest = json.loads((folder / "manifest.json").read_text())
        assert set(manifest["files"]) == {"image.png", "maps.safetensors", "steps.json", "scene.json"}
        for name, digest in manifest["files"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
        assert (
            0.0 <= row["iou"] <= 1.0 and row["maps"]["circle" if "circle" in row["prompt"] else "background"]
        )
        steps = json.loads((folder / "steps.json").read_text())
        assert len(steps) == STEPS and steps[0]["x0_change"] is None and steps[1]["x0_change"] > 0
    settings = json.loads((out / "sweep.json").read_text())
    assert settings["settings"]["steps"] == STEPS and settings["versions"]["diffusers"]
    assert not (out / fs.LOCK).exists()


def test_an_item_is_what_a_plain_call_makes_and_what_the_scorer_reads(swept):
    """The item's image equals the plain pipeline call with its seed; its scene.json is the scorer's reading."""
    from sdexplore.embedded import scenes

    out, _ = swept
    pipe = sdexplore.load_pipeline()
    plain = pipe(
        PROMPTS[1],
        num_inference_steps=STEPS,
        guidance_scale=sdexplore.EMBEDDED_GUIDANCE_SCALE,
        generator=torch.Generator().manual_seed(1),
    ).images[0]
    stored = np.asarray(Image.open(out / "items" / "000003" / "image.png"))
    np.testing.assert_array_equal(stored, np.asarray(plain))
    scene = json.loads((out / "items" / "000003" / "scene.json").read_text())
    reading = scenes.read_scene(stored)
    assert scene["read"] == reading.as_params().prompt()
    assert scene["shape"] == (reading.shape == "square")
    from safetensors.torch import load_file

    maps = load_file(out / "items" / "000003" / "maps.safetensors")
    assert set(maps) == {"a", "small", "green", "square", "at", "the", "right", "on", "white", "background"}
    side = 64 // pipe.vae_scale_factor  # the maps are at latent resolution
    assert all(m.shape == (side, side) for m in maps.values())


def test_index_reads_with_pandas(swept):
    pd = pytest.importorskip("pandas")
    frame = pd.read_json(swept[0] / "index.jsonl", lines=True)
    assert len(frame) == 6 and set(frame["status"]) == {"done"}


def test_report_tables_and_figures(swept, tmp_path):
    out, _ = swept
    report = sweep_report(out, tmp_path / "report")
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert report.summary["done"] == 6
    assert report.summary["scene"]["parts"]["shape"]["accuracy"] == pytest.approx(
        np.mean([r["shape"] for r in rows])
    )
    assert report.summary["scene"]["iou"]["mean"] == pytest.approx(np.mean([r["iou"] for r in rows]))
    assert report.summary["words"]["circle"]["n"] == 2 and report.summary["words"]["a"]["n"] == 6
    assert set(report.figures) == {"word_maps", "iou", "scene_parts", "slowest"}
    for path in report.figures.values():
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(path).size[0] > 300
    assert "| shape |" in (tmp_path / "report" / "summary.md").read_text()


# ---------------------------------------------------------------- resume, corruption, refusal, interrupts


@pytest.fixture
def copy_of(swept, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(swept[0], out)
    return out


def test_a_rerun_skips_done_items_and_redoes_corrupt_or_partial_ones(copy_of):
    out = copy_of
    before = _tree(out)
    image = out / "items" / "000001" / "image.png"
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF  # one flipped byte in the image
    image.write_bytes(bytes(data))
    (out / "items" / "000004" / "manifest.json").unlink()  # a folder without its manifest: partial
    (out / "items" / ".tmp-000005-dead").mkdir()  # what a kill -9 leaves
    result = sweep(PROMPTS, out, seeds=[0, 1], steps=STEPS, progress=False)
    assert (result.made, result.done) == (2, 6)
    assert _tree(out) == before  # redone items are byte-identical; nothing else was touched
    assert not list((out / "items").glob(".*"))
    assert sweep(PROMPTS, out, seeds=[0, 1], steps=STEPS, progress=False).made == 0


def test_other_settings_are_refused_before_anything_loads(copy_of, tmp_path):
    before = _tree(copy_of)
    with pytest.raises(InvalidArgumentError, match=r"other settings \(steps: 3 now, 2 there\)"):
        sweep(PROMPTS, copy_of, seeds=[0, 1], steps=3, progress=False)
    with pytest.raises(InvalidArgumentError, match="plan:"):
        sweep(PROMPTS[:2], copy_of, seeds=[0, 1], steps=STEPS, progress=False)
    assert _tree(copy_of) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InvalidArgumentError, match="not a sweep folder"):
        sweep(PROMPTS, tmp_path / "other", steps=STEPS, progress=False)


def test_words_not_in_a_prompt_are_refused_before_generating(tmp_path):
    rows = [
        PromptRow("a red circle", 1, words=("circle",)),
        PromptRow("a blue square", 2, words=("hexagon",)),
    ]
    with pytest.raises(InvalidArgumentError, match="item 1 .*'hexagon'"):
        sweep(rows, tmp_path / "w", steps=STEPS, progress=False)
    assert not (tmp_path / "w" / "items").exists()


def test_sigterm_stops_at_once_and_a_rerun_finishes_every_item_once(tmp_path, monkeypatch):
    out = tmp_path / "run"
    previous = signal.getsignal(signal.SIGTERM)

    def kill_after_second(item):
        if item.index == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(KeyboardInterrupt):
        sweep(PROMPTS, out, seeds=[0, 1], steps=STEPS, progress=False, on_item=kill_after_second)
    assert signal.getsignal(signal.SIGTERM) is previous
    assert sorted(p.name for p in (out / "items").iterdir()) == ["000000", "000001"]
    assert not (out / fs.LOCK).exists()

    # killed while writing item 3's files: its temporary folder goes, the item is redone later
    real_fsync, calls = os.fsync, []

    def interrupted_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_fsync(fd)

    monkeypatch.setattr(fs.os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        sweep(PROMPTS, out, seeds=[0, 1], steps=STEPS, progress=False)
    monkeypatch.setattr(fs.os, "fsync", real_fsync)
    assert sorted(p.name for p in (out / "items").iterdir()) == ["000000", "000001"]

    result = sweep(PROMPTS, out, seeds=[0, 1], steps=STEPS, progress=False)
    assert (result.made, result.done) == (4, 6)
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [r["item"] for r in rows] == list(range(6)) and all(r["status"] == "done" for r in rows)


def test_a_live_sweep_holds_the_folder(copy_of):
    (copy_of / fs.LOCK).write_text(f"{os.getppid()} {__import__('socket').gethostname()}\n")
    with pytest.raises(InvalidArgumentError, match="another sweep"):
        sweep(PROMPTS, copy_of, seeds=[0, 1], steps=STEPS, progress=False)
    (copy_of / fs.LOCK).write_text(f"999999999 {__import__('socket').gethostname()}\n")  # a dead one
    assert sweep(PROMPTS, copy_of, seeds=[0, 1], steps=STEPS, progress=False).made == 0


# ---------------------------------------------------------------- command line


def test_command_line_sweep_and_report(tmp_path, capsys):
    from sdexplore.cli import main

    prompts = _write(tmp_path, "p.csv", f"prompt,seed,words\n{PROMPTS[0]},5,circle;blue background\n")
    out = tmp_path / "cli"
    assert (
        main(
            [
                "sweep",
                str(prompts),
                "--out",
                str(out),
                "--steps",
                str(STEPS),
                "--keep",
                "maps",
                "--no-progress",
            ]
        )
        == 0
    )
    manifest = json.loads((out / "items" / "000000" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"maps.safetensors", "scene.json"} and manifest["item"]["seed"] == 5
    assert set(manifest["row"]["maps"]) == {"circle", "blue background"}
    assert main(["sweep-report", str(out)]) == 0
    assert "1 of 1 items done" in capsys.readouterr().out
    bad = _write(tmp_path, "bad.jsonl", '{"prompt": "a"}\n{oops}\n')
    assert main(["sweep", str(bad), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl line 2: not valid JSON" in err and err.count("\n") == 1
    assert main(["sweep", str(prompts), "--out", str(tmp_path / "y"), "--keep", "pictures"]) == 1
    assert "'pictures' is not something an item keeps" in capsys.readouterr().err


def test_an_unwritable_out_is_one_sentence_and_exit_2_before_loading(tmp_path, capsys, monkeypatch):
    """`sweep --out` into a place it cannot write ended in a bare errno and exit 1 (the other commands: exit 2 and
    a sentence); the API raises InvalidArgumentError before the model loads."""
    import sdexplore.sweeps.run as run_module
    from sdexplore.cli import main

    monkeypatch.setattr(run_module, "_load", lambda *a, **k: pytest.fail("the model loaded"))
    prompts = _write(tmp_path, "p.txt", PROMPTS[0] + "\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    outs = [blocker / "sweep"] + ([Path("/proc/sdexplore-sweep")] if Path("/proc/self").exists() else [])
    for out in outs:
        with pytest.raises(InvalidArgumentError, match=f"cannot write into {out}: .*; choose another --out"):
            sweep([PROMPTS[0]], out, steps=STEPS, progress=False)
        assert main(["sweep", str(prompts), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"sdexplore: error: cannot write into {out}: ") and err.count("\n") == 1, err
        assert "Errno" not in err and err.rstrip().endswith("choose another --out")
    assert main(["sweep-report", str(tmp_path), "--out", str(blocker / "report")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "p.txt"]  # no probe left
