"""DirectionExplorer: a strength slider per direction, over frames rendered beforehand (a walk along each direction).

In a notebook it is the front end's direction explorer (``sdexplore/views/web/directions.js``) as an anywidget:
every frame travels to the browser once, in the page payload, so moving a slider never waits on the kernel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import InvalidArgumentError
from .. import payload as _payload
from ._base import Explorer, new_figure
from ._web import web_view
from .interpolation import frames_of


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
    walk per direction, at strengths −s…s), and a slider picks the frame. In a notebook the view is the front
    end's (an anywidget holding every frame), so a slider never waits on the kernel. The static figure is the grid
    of every direction (rows) at every strength (columns).

    Args:
        walks: ``{name: walk}`` (or a list of walks, named by their direction) made by ``Direction.walk``.
        size: kept for compatibility; the view enlarges each picture by a whole factor to at least 192 pixels.
        static: force the static figure (True) or the widget (False); default: detect a widget frontend.
    """

    _web_name = "directions"  # its front end: sdexplore/views/web/directions.js

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
        self._payload_cache: dict[str, Any] | None = None

    def frame(self, name: str, strength: float) -> np.ndarray:
        """The frame of direction ``name`` nearest ``strength`` (H, W, 3) uint8."""
        i = int(np.argmin([abs(s - strength) for s in self.strengths[name]]))
        return self.frames[name][i]

    # ---- widget -----------------------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        """The page payload (:func:`sdexplore.views.payload.directions_payload`): what the view shows."""
        if self._payload_cache is None:
            self._payload_cache = _payload.directions_payload(self.frames, self.strengths)
        return self._payload_cache

    def _build(self) -> Any:
        self._view = web_view("directions", self.payload())
        return self._view

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
