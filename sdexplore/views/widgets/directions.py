"""DirectionExplorer: a strength slider per direction, over frames rendered beforehand (a walk along each direction)."""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from ...errors import InvalidArgumentError
from ._base import Explorer, new_figure, style_widget
from .interpolation import encode_frame, frames_of


def _strengths(walk: Any, n: int) -> list[float]:
    strengths = getattr(walk, "settings", {}).get("strengths")
    if strengths is None or len(strengths) != n:
        raise InvalidArgumentError(
            "DirectionExplorer takes walks made by Direction.walk (their settings list each frame's strength)."
        )
    return [float(s) for s in strengths]


class DirectionExplorer(Explorer):
    """Move along each direction with its own strength slider and see the image at that strength.

    Nothing is computed here: each direction's frames come from :meth:`sdexplore.directions.Direction.walk` (one
    walk per direction, at strengths −s…s), and a slider picks the frame. The static figure is the grid of every
    direction (rows) at every strength (columns).

    Args:
        walks: ``{name: walk}`` (or a list of walks, named by their direction) made by ``Direction.walk``.
        size: displayed side of each image in pixels.
        static: force the static figure (True) or the widget (False); default: detect a widget frontend.
    """

    def __init__(self, walks: Any, *, size: int = 192, static: bool | None = None) -> None:
        super().__init__(static=static)
        self._options = dict(size=size, static=static)
        if not isinstance(walks, dict):
            walks = {
                str(getattr(w, "settings", {}).get("direction", f"direction {i}")): w
                for i, w in enumerate(walks)
            }
        if not walks:
            raise InvalidArgumentError("DirectionExplorer needs at least one walk (from Direction.walk).")
        self.names = list(walks)
        self.frames = {k: frames_of(w) for k, w in walks.items()}  # name → (N, H, W, 3) uint8
        self.strengths = {k: _strengths(w, len(self.frames[k])) for k, w in walks.items()}
        self.size = size
        self._encoded = {k: [encode_frame(f, size) for f in fr] for k, fr in self.frames.items()}

    def frame(self, name: str, strength: float) -> np.ndarray:
        """The frame of direction ``name`` nearest ``strength`` (H, W, 3) uint8."""
        i = int(np.argmin([abs(s - strength) for s in self.strengths[name]]))
        return self.frames[name][i]

    # ---- widget -----------------------------------------------------------------------------------------
    def _build(self) -> Any:
        import ipywidgets as w

        rows = []
        self._sliders: dict[str, Any] = {}
        for name in self.names:
            strengths = self.strengths[name]
            middle = int(np.argmin([abs(s) for s in strengths]))
            data, fmt = self._encoded[name][middle]
            img = w.Image(
                value=data, format=fmt, layout=w.Layout(width=f"{self.size}px", height=f"{self.size}px")
            )
            img.add_class("sdx-direction-image")
            img.add_class("sdx-pixelated")
            slider = w.SelectionSlider(
                options=[(f"{s:+.2f}", i) for i, s in enumerate(strengths)],
                value=middle,
                description="strength",
                continuous_update=True,
                layout=w.Layout(width="360px"),
            )
            slider.add_class("sdx-direction-slider")

            def on_change(change: dict, name: str = name, img: Any = img) -> None:
                data, fmt = self._encoded[name][int(change["new"])]
                img.format, img.value = fmt, data

            slider.observe(on_change, names="value")
            self._sliders[name] = slider
            title = w.HTML(f"<b>{html.escape(name)}</b>")
            rows.append(w.VBox([title, slider, img]))
        box = w.HBox([style_widget(), *rows])
        box.add_class("sdx-direction-explorer")
        return box

    def figure(self) -> Any:
        """Every direction (rows) at every strength (columns)."""
        cols = max(len(s) for s in self.strengths.values())
        fig = new_figure(1.4 * cols, 1.5 * len(self.names))
        axes = fig.subplots(len(self.names), cols, squeeze=False)
        for r, name in enumerate(self.names):
            for c in range(cols):
                ax = axes[r][c]
                ax.set_axis_off()
                if c < len(self.frames[name]):
                    ax.imshow(self.frames[name][c], interpolation="nearest")
                    ax.set_title(f"{self.strengths[name][c]:+.2f}", fontsize=8)
            axes[r][0].text(
                -0.1, 0.5, name, transform=axes[r][0].transAxes, ha="right", va="center", fontsize=9
            )
        return fig

    def __repr__(self) -> str:
        return f"DirectionExplorer({', '.join(self.names)})"
