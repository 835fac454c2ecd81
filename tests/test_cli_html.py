"""``--html PAGE``: steps, attention and walk write their run as one self-contained page beside their usual output,
and ``sweep-report --html`` writes the sweep's gallery. The page is checked before the model loads (a name ending
in .html, outside --out, not there unless --force), written atomically, and its payload is the run's (checksum
verified, provenance, the steps / maps / frames it recorded)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdexplore.cli import main
from sdexplore.views import pages
from sdexplore.views import payload as pl

PROMPT = "a big red circle at the top left on a blue background"


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """main(argv) in-process → (exit code, stdout, stderr)."""
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def test_steps_html_writes_the_runs_page_beside_its_folder(capsys, tmp_path):
    out, page = tmp_path / "run", tmp_path / "run.html"
    rc, stdout, _ = run(capsys, "steps", PROMPT, "--steps", "3", "--seed", "5", "--out", out, "--html", page,
                        "--no-progress")  # fmt: skip
    assert rc == 0 and f"wrote {page}" in stdout
    payload = pages.read_payload(page)  # the checksum verifies
    prov = payload["provenance"]
    assert (prov["model"], prov["seed"], prov["prompt"], prov["steps"]) == ("tiny-shapes", 5, PROMPT, 3)
    steps = payload["steps"]
    assert steps["count"] == 3 and {p["key"] for p in steps["panels"]} >= {"noisy", "x0"}
    image = np.asarray(Image.open(out / "image.png").convert("RGB"))
    assert np.array_equal(pl.decode_image(payload["image"]), image)  # the run's own picture
    assert "page" not in {p.name for p in out.iterdir()} and not list(tmp_path.glob(".run.html*"))


def test_attention_html_holds_every_words_maps_and_the_steps(capsys, tmp_path):
    out, page = tmp_path / "att", tmp_path / "att.html"
    rc, _, _ = run(capsys, "attention", PROMPT, "--steps", "3", "--out", out, "--html", page, "--no-progress")
    assert rc == 0
    payload = pages.read_payload(page)
    words = [w["word"] for w in payload["attention"]["words"]]
    assert "circle" in words and payload["attention"]["default_word"] == "big"
    assert payload["steps"]["count"] == 3  # recorded for the page's step slider
    from sdexplore.results.attention_maps import AttentionMaps

    maps = AttentionMaps.load(out / "attention.safetensors")
    agg = pl.dequantize_maps(payload["attention"]["aggregate"])  # (T, H, W)
    circle = next(w for w in payload["attention"]["words"] if w["word"] == "circle")
    want = maps.word("circle").numpy()
    assert np.abs(agg[circle["positions"]].sum(0) - want).max() <= 1e-2 * want.max()


def test_walk_html_writes_the_walks_frames(capsys, tmp_path):
    gif, page = tmp_path / "w.gif", tmp_path / "w.html"
    rc, stdout, _ = run(capsys, "walk", "a red circle", "a blue square", "--frames", "4", "--steps", "2",
                        "--out", gif, "--html", page, "--no-progress")  # fmt: skip
    assert rc == 0 and f"wrote {page}" in stdout and gif.is_file()
    walk = pages.read_payload(page)["walk"]
    assert (
        walk["count"] == 4
        and walk["prompts"] == ["a red circle", "a blue square"]
        and walk["seeds"] == [0, 0]
    )
    from sdexplore.views.export import read_frames

    frames = read_frames(gif)
    first = pl.decode_image(walk["images"][0]).astype(
        int
    )  # lossless; the GIF's first frame is palette-quantised
    assert np.abs(first - frames[0].astype(int)).mean() < 6
    assert np.abs(first - frames[-1].astype(int)).mean() > 30  # ... and not just any frame of the walk


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["steps", PROMPT, "--out", "{tmp}/a", "--html", "{tmp}/a.txt"], "does not end in .html"),
        (["steps", PROMPT, "--out", "{tmp}/a", "--html", "{tmp}/a/page.html"], "inside --out"),
        (
            ["attention", PROMPT, "--out", "{tmp}/a", "--html", "{tmp}/old.html"],
            "already exists; pass --force",
        ),
        (["walk", "a", "b", "--out", "{tmp}/w.gif", "--html", "{tmp}/old.html"], "choose another --html"),
        (["steps", PROMPT, "--out", "{tmp}/a", "--html", "{tmp}/folder.html"], "is a folder"),
    ],
)
def test_a_bad_page_path_is_refused_before_the_model_loads(capsys, tmp_path, monkeypatch, argv, needle):
    import sdexplore.cli._common as cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "old.html").write_text("mine")
    (tmp_path / "folder.html").mkdir()
    rc, _, err = run(capsys, *(a.format(tmp=tmp_path) for a in argv))
    assert rc == 2 and needle in err, err
    assert (tmp_path / "old.html").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.html", "old.html"]  # nothing else written


def test_force_replaces_a_page_and_only_then(capsys, tmp_path):
    page = tmp_path / "p.html"
    page.write_text("mine")
    argv = ["steps", "a red circle", "--steps", "2", "--preview", "linear", "--html", page, "--no-progress"]
    rc, _, err = run(capsys, *argv, "--out", tmp_path / "a")
    assert rc == 2 and page.read_text() == "mine"
    rc, _, _ = run(capsys, *argv, "--out", tmp_path / "b", "--force")
    assert rc == 0 and pages.read_payload(page)["provenance"]["prompt"] == "a red circle"


@pytest.fixture(scope="module")
def sweep_folder(tmp_path_factory):
    """A finished 2 prompts × 2 seeds sweep of the embedded model (3 steps)."""
    from sdexplore.sweeps.run import sweep

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sweep") / "sw"
    sweep([PROMPT, "a small green square at the bottom right on a white background"], out, seeds=[0, 1],
          steps=3, progress=False)  # fmt: skip
    return out


def test_sweep_report_html_writes_the_gallery(capsys, tmp_path, sweep_folder):
    page = tmp_path / "gallery.html"
    rc, stdout, _ = run(capsys, "sweep-report", sweep_folder, "--out", tmp_path / "report", "--html", page)
    assert rc == 0 and f"wrote {page}" in stdout
    gallery = pages.read_payload(page)["gallery"]
    assert [(it["prompt"][:7], it["seed"]) for it in gallery["items"]] == [
        ("a big r", 0), ("a big r", 1), ("a small", 0), ("a small", 1)
    ]  # fmt: skip
    assert {"circle", "square", "green"} <= set(gallery["words"]) and gallery["planned"] == 4
    rc, _, err = run(capsys, "sweep-report", sweep_folder, "--out", tmp_path / "report", "--html", page)
    assert rc == 2 and "--force" in err
    rc, _, err = run(capsys, "sweep-report", sweep_folder, "--html", tmp_path / "g.png")
    assert rc == 2 and "does not end in .html" in err


def test_sweep_html_writes_the_gallery_when_the_sweep_is_done(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a big red circle at the top left on a blue background\na small green square\n")
    page = tmp_path / "sw.html"
    page.write_text("mine")
    argv = ["sweep", prompts, "--seeds", "0", "1", "--steps", "2", "--out", tmp_path / "sw", "--html", page]
    rc, _, err = run(capsys, *argv, "--no-progress")
    assert rc == 2 and "--force" in err and not (tmp_path / "sw").exists()  # refused before any item
    rc, stdout, _ = run(capsys, *argv, "--no-progress", "--force")
    assert rc == 0 and f"wrote {page}" in stdout
    gallery = pages.read_payload(page)["gallery"]
    assert len(gallery["items"]) == gallery["planned"] == 4 and "square" in gallery["words"]
