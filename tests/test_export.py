"""Export: PNG frames, grids, GIF and MP4 read back with imageio; walk plots."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdexplore.views.export import (
    as_uint8_frames,
    image_grid,
    read_frames,
    rubber_band,
    save_frames,
    save_gif,
    save_grid,
    save_mp4,
)
from sdexplore.walks import Walk


def _frames(n=5, h=32, w=48):
    """Frames that differ clearly from each other (a moving bar), so no encoder merges them."""
    out = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, :, i * (w // n) : (i + 1) * (w // n)] = (255, 40 * i, 0)
        out[i, : h // 4] = (0, 0, 35 * i)
    return out


def _walk(frames):
    n = len(frames)
    ts = list(np.linspace(0, 1, n))
    return Walk(frames, ["a", "b"], [0, 1], [0] * n, ts, [0, n - 1], {})


def test_rubber_band_goes_forward_then_back_without_repeats():
    f = np.arange(4)[:, None, None, None] * np.ones((4, 1, 1, 3), np.uint8)
    assert rubber_band(f)[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 2, 1]
    assert len(rubber_band(f[:2])) == 2


def test_as_uint8_accepts_floats_pil_and_walks():
    f = _frames()
    np.testing.assert_array_equal(as_uint8_frames(f.astype(np.float32) / 255), f)
    np.testing.assert_array_equal(as_uint8_frames([Image.fromarray(x) for x in f]), f)
    np.testing.assert_array_equal(as_uint8_frames(_walk(f)), f)
    with pytest.raises(ValueError, match="N, H, W, 3"):
        as_uint8_frames(np.zeros((2, 8, 8), np.uint8))


def test_png_frames_and_grid(tmp_path):
    f = _frames()
    paths = save_frames(f, tmp_path / "frames")
    assert [p.name for p in paths][:2] == ["frame_0000.png", "frame_0001.png"] and len(paths) == 5
    np.testing.assert_array_equal(np.asarray(Image.open(paths[3])), f[3])
    grid = image_grid(f, cols=3, pad=2)
    assert grid.shape == (2 * 32 + 2, 3 * 48 + 4, 3)
    np.testing.assert_array_equal(grid[34:66, 50:98], f[4])  # row 1, column 1
    assert Image.open(save_grid(f, tmp_path / "grid.png", cols=3)).size == (3 * 48 + 4, 66)


@pytest.mark.parametrize("rubber", [False, True])
def test_gif_reads_back_with_size_and_frame_count(tmp_path, rubber):
    f = _frames()
    path = save_gif(f, tmp_path / "walk.gif", fps=10, rubber=rubber)
    back = read_frames(path)
    assert back.shape == ((8 if rubber else 5), 32, 48, 3)
    assert np.abs(back[2].astype(int) - f[2]).mean() < 8  # palette quantisation only


@pytest.mark.parametrize(("h", "w"), [(32, 48), (33, 47)])
def test_mp4_reads_back_with_size_and_frame_count(tmp_path, h, w):
    f = _frames(6, h, w)
    path = save_mp4(f, tmp_path / "walk.mp4", fps=8)
    back = read_frames(path)
    assert back.shape == (6, h + h % 2, w + w % 2, 3)  # odd sides padded by one pixel for yuv420p
    assert np.abs(back[3, :h, :w].astype(int) - f[3]).mean() < 20  # lossy, but the same picture
    assert len(read_frames(save_mp4(f, tmp_path / "rb.mp4", rubber=True))) == 10


def test_walk_export_methods(tmp_path):
    w = _walk(_frames())
    assert read_frames(w.save_gif(tmp_path / "w.gif")).shape[0] == 5
    assert read_frames(w.save_mp4(tmp_path / "w.mp4", rubber=True)).shape[0] == 8
    assert len(w.save_frames(tmp_path / "f")) == 5
    assert w.save_grid(tmp_path / "g.png").is_file()
    assert w[1].size == (48, 32) and len(w.pil_images) == 5


def test_walk_plots(tmp_path):
    from sdexplore.views.plots.walks import plot_frame_strip, plot_smoothness

    w = _walk(_frames(7))
    strip = plot_frame_strip(w, count=4)
    titles = [ax.get_title() for ax in strip.axes]
    assert titles[0].startswith("0: a") and titles[-1].startswith("6: b")  # keyframes always shown
    strip.savefig(tmp_path / "strip.png")
    curve = plot_smoothness(w)
    bars = curve.axes[0].patches
    assert len(bars) == 6
    assert len({b.get_facecolor() for b in bars}) == 2  # the largest jumps coloured apart from the rest
    curve.savefig(tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_write_text_atomic_replaces_whole_and_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    import os

    from sdexplore._files import write_text_atomic

    target = tmp_path / "eval.json"
    write_text_atomic(target, "first\n")
    write_text_atomic(target, "second ✓\n")
    assert target.read_text(encoding="utf-8") == "second ✓\n"
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left beside it

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(target, "third\n")
    assert target.read_text(encoding="utf-8") == "second ✓\n"  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_fps_and_loop_the_encoders_cannot_hold_are_refused_before_encoding(tmp_path, monkeypatch):
    """A GIF frame time is 16 bits of 1/100 s (Pillow merges identical frames into one), and ffmpeg's rate rounds
    to 0 below 1/1000: such fps raised OverflowError after the whole walk was rendered; now InvalidArgumentError
    up front, and the bound the message names is itself accepted."""
    import re

    import sdexplore.views.export as export
    from sdexplore.errors import ExportError, InvalidArgumentError

    still = np.repeat(_frames(1), 16, axis=0)  # 16 identical frames: one merged frame in the GIF
    with pytest.raises(InvalidArgumentError, match="16 identical frames") as refused:
        save_gif(still, tmp_path / "still.gif", fps=0.01)  # a frame may last 100 s, not 16 merged ones
    assert isinstance(refused.value, ExportError)  # older callers catching ExportError still do
    assert not list(tmp_path.iterdir())
    with pytest.raises(InvalidArgumentError, match="16 identical frames"):
        export.check_fps(0.001, gif=True, frames=16)  # the same, before any frame exists
    with pytest.raises(InvalidArgumentError, match="a frame can last 655.35 s"):
        save_gif(_frames(3), tmp_path / "slow.gif", fps=0.001)
    bound = float(re.search(r"fps >= ([0-9.e-]+)", str(refused.value)).group(1))
    assert len(read_frames(save_gif(still, tmp_path / "still.gif", fps=bound))) == 1
    assert (
        len(read_frames(save_gif(_frames(3), tmp_path / "slow.gif", fps=0.002))) == 3
    )  # distinct: per frame

    monkeypatch.setattr(export, "_encode", lambda *a: pytest.fail("ffmpeg ran"))
    with pytest.raises(InvalidArgumentError, match="fps >= 0.001"):
        save_mp4(_frames(2), tmp_path / "w.mp4", fps=0.0001)
    for bad in (65536, -1, 2.5):
        with pytest.raises(InvalidArgumentError, match="loop"):
            save_gif(_frames(2), tmp_path / "w.gif", loop=bad)
    with pytest.raises(InvalidArgumentError, match="quality"):
        save_mp4(_frames(2), tmp_path / "w.mp4", quality=11)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slow.gif", "still.gif"]
