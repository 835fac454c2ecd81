"""WalkPlayer: play a rendered walk frame by frame, at any speed, and export it to GIF or MP4."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import numpy as np

from .. import export
from .. import payload as _payload
from ..render import spread, upscale
from ._base import SliderExplorer, new_figure
from ._web import web_view
from .interpolation import as_walk, frames_of


class WalkPlayer(SliderExplorer):
    """Play a :class:`~sdexplore.walks.Walk` (or any ``(N, H, W, 3)`` frames) and export it.

    Play/pause, a frame slider and a speed slider in frames per second: the front end's walk player
    (``sdexplore/views/web/walk.js``) as an anywidget, the frames held by the browser, so playing and scrubbing
    never wait on the kernel. Below it an export row (the kernel writes the file): file name, GIF or MP4,
    "rubber band" (forward then back, for a seamless loop of a non-looping walk). :attr:`value` is the view's
    synced ``frame``; :attr:`fps` follows its speed slider.

    Args:
        walk: a Walk, a frames array, or a list of images.
        fps: initial playback speed (also the export speed).
        size: displayed side in pixels.
        static: force the static figure (True) or the widget (False); default: detect a widget frontend.
    """

    _web_name = "walk"  # its front end: sdexplore/views/web/walk.js

    def __init__(self, walk: Any, *, fps: float = 12, size: int = 256, static: bool | None = None) -> None:
        super().__init__(static=static)
        self.walk = walk
        self.frames = frames_of(walk)
        if len(self.frames) < 1:
            raise ValueError("WalkPlayer needs at least one frame.")
        self.fps = float(fps)
        self.size = size

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
    def payload(self) -> dict[str, Any]:
        """The page payload the view shows (:func:`sdexplore.views.payload.walk_payload`)."""
        return _payload.walk_payload(as_walk(self.walk, self.frames), fps=self.fps)

    def _build(self) -> Any:
        import ipywidgets as w

        self._view = web_view("walk", self.payload(), frame=0, fps=self.fps)
        self._view.observe(self._on_speed, names="fps")
        default = "walk.gif"
        self._name = w.Text(value=default, description="file", layout=w.Layout(width="260px"))
        self._rubber = w.Checkbox(value=False, description="forward then back", indent=False)
        self._button = w.Button(description="export", icon="download", button_style="primary")
        self._button.add_class("sdx-walk-export")
        self._status = w.HTML()
        self._button.on_click(self._on_export)
        # the player runs in the browser; exporting writes a file, so it is the kernel's (ipywidgets)
        box = w.VBox([self._view, w.HBox([self._name, self._rubber, self._button]), self._status])
        box.add_class("sdx-walk-player-box")
        return box

    def _on_speed(self, change: Any) -> None:
        if change["new"]:
            self.fps = float(change["new"])

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

    @property
    def displayed(self) -> bytes:
        """The encoded frame (PNG or WebP) the view shows at its frame."""
        self.widget  # noqa: B018
        return base64.b64decode(self._view.payload["walk"]["images"][self.value]["data"])

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
