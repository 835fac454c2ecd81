"""WalkPlayer: play a rendered walk frame by frame, at any speed, and export it to GIF or MP4."""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import export
from ..render import spread, upscale
from ._base import SliderExplorer, new_figure, style_widget
from .interpolation import encode_frame, frame_label, frames_of


class WalkPlayer(SliderExplorer):
    """Play a :class:`~sdexplore.walks.Walk` (or any ``(N, H, W, 3)`` frames) and export it.

    Play/pause and a frame slider (linked in the browser, so playback needs no kernel round trip to start),
    a speed slider in frames per second, and an export row: file name, GIF or MP4, "rubber band" (forward
    then back, for a seamless loop of a non-looping walk). Frames are encoded once up front.

    Args:
        walk: a Walk, a frames array, or a list of images.
        fps: initial playback speed (also the export speed).
        size: displayed side in pixels.
        static: force the static figure (True) or the widget (False); default: detect a widget frontend.
    """

    def __init__(self, walk: Any, *, fps: float = 12, size: int = 256, static: bool | None = None) -> None:
        super().__init__(static=static)
        self.walk = walk
        self.frames = frames_of(walk)
        if len(self.frames) < 1:
            raise ValueError("WalkPlayer needs at least one frame.")
        self.fps = float(fps)
        self.size = size
        from tqdm.auto import tqdm

        self._encoded = [
            encode_frame(f, size)
            for f in tqdm(self.frames, desc="encoding frames", leave=False, disable=len(self.frames) < 64)
        ]
        self.last_update_ms = 0.0

    def export(self, path: str | Path, *, fps: float | None = None, rubber: bool = False) -> Path:
        """Write the walk to ``path``: ``.gif`` or ``.mp4`` (by suffix). Returns the path."""
        path = Path(path)
        fps = fps or self.fps
        suffix = path.suffix.lower()
        if suffix == ".gif":
            return export.save_gif(self.frames, path, fps=fps, rubber=rubber)
        if suffix == ".mp4":
            return export.save_mp4(self.frames, path, fps=fps, rubber=rubber)
        raise ValueError(f"Export to .gif or .mp4, not {path.name!r}.")

    # ---- widget -----------------------------------------------------------------------------------------
    def _build(self) -> Any:
        import ipywidgets as w

        n = len(self.frames)
        data, fmt = self._encoded[0]
        self._img = w.Image(
            value=data, format=fmt, layout=w.Layout(width=f"{self.size}px", height=f"{self.size}px")
        )
        self._img.add_class("sdx-walk-image")
        self._img.add_class("sdx-pixelated")
        self._slider = w.IntSlider(
            value=0,
            min=0,
            max=n - 1,
            description="frame",
            readout=False,  # the caption says "frame i/N", 1-based
            continuous_update=True,
            layout=w.Layout(width="360px"),
        )
        self._slider.add_class("sdx-walk-slider")
        self._play = w.Play(value=0, min=0, max=n - 1, interval=int(1000 / self.fps), repeat=True)
        self._play.add_class("sdx-walk-play")
        w.jslink((self._play, "value"), (self._slider, "value"))
        self._speed = w.FloatSlider(
            value=self.fps,
            min=1,
            max=30,
            step=1,
            description="fps",
            continuous_update=False,
            layout=w.Layout(width="260px"),
        )
        self._speed.observe(self._on_speed, names="value")
        self._info = w.HTML()
        default = "walk.gif"
        self._name = w.Text(value=default, description="file", layout=w.Layout(width="260px"))
        self._rubber = w.Checkbox(value=False, description="forward then back", indent=False)
        self._button = w.Button(description="export", icon="download", button_style="primary")
        self._button.add_class("sdx-walk-export")
        self._status = w.HTML()
        self._button.on_click(self._on_export)
        self._slider.observe(lambda ch: self._show(ch["new"]), names="value")
        box = w.VBox(
            [
                style_widget(),
                w.HBox([self._play, self._slider, self._speed]),
                self._info,
                self._img,
                w.HBox([self._name, self._rubber, self._button]),
                self._status,
            ]
        )
        box.add_class("sdx-walk-player")
        self._show(0)
        return box

    def _on_speed(self, change: Any) -> None:
        self.fps = float(change["new"])
        self._play.interval = int(1000 / self.fps)

    def _on_export(self, _button: Any = None) -> None:
        self._button.disabled = True
        self._status.value = "<i>exporting…</i>"
        try:
            path = self.export(self._name.value, rubber=self._rubber.value)
            kb = path.stat().st_size / 1024
            self._status.value = f"saved <code>{html.escape(str(path))}</code> ({kb:,.0f} KiB)"
        except Exception as e:  # shown in the widget: a bad file name must not kill the view
            self._status.value = f'<span style="color:#c00">export failed: {html.escape(str(e))}</span>'
        finally:
            self._button.disabled = False

    def _show(self, i: int) -> None:
        t0 = time.perf_counter()
        self._img.value = self._encoded[i][0]
        self._info.value = frame_label(self.walk, i, len(self.frames))
        self.last_update_ms = (time.perf_counter() - t0) * 1000

    @property
    def displayed(self) -> bytes:
        """Bytes of the frame currently shown."""
        self.widget  # noqa: B018
        return bytes(self._img.value)

    # ---- static -----------------------------------------------------------------------------------------
    def figure(self, count: int = 8) -> Any:
        """Static figure: ``count`` frames spread over the walk, keyframes marked."""
        picks = spread(len(self.frames), count)
        keys = set(getattr(self.walk, "keyframe_frames", []) or [])
        fig = new_figure(1.6 * len(picks), 1.9)
        axes = np.atleast_1d(fig.subplots(1, len(picks)))
        for ax, i in zip(axes, picks, strict=True):
            ax.imshow(upscale(self.frames[i], 64), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"frame {i + 1}" + (" ★" if i in keys else ""), fontsize=8)
        return fig

    def __repr__(self) -> str:
        return f"WalkPlayer({len(self.frames)} frames, {self.fps:g} fps)"
