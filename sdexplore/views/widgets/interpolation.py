"""InterpolationExplorer: a slider through precomputed frames between prompts (and seeds), with the smoothness curve.

In a notebook it is the front end's interpolation explorer (``sdexplore/views/web/interpolation.js``) as an
anywidget: the frames travel to the browser once, in the page payload.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...results.walk import Walk
from ...smoothness import Metric, smoothness_report
from .. import payload as _payload
from ..render import as_uint8_image, spread, upscale
from ._base import WIDGET_MIN_SIDE, SliderExplorer, jpeg_bytes, new_figure, png_bytes, svg_curves
from ._web import web_view

_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b")


def frames_of(source: Any) -> np.ndarray:
    """(N, H, W, 3) uint8 frames from a Walk (``.images``), an array, or a list of images."""
    images = getattr(source, "images", source)
    if isinstance(images, np.ndarray) and images.ndim == 4:
        arr = images if images.dtype == np.uint8 else (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
        return np.ascontiguousarray(arr[..., :3])
    return np.stack([as_uint8_image(im) for im in images])  # (N, H, W, 3)


def as_walk(source: Any, frames: np.ndarray | None = None) -> Walk:
    """``source`` as a :class:`~sdexplore.results.Walk`: itself when it is one, else its frames with no keyframes."""
    if isinstance(source, Walk):
        return source
    frames = frames_of(source) if frames is None else frames
    return Walk(images=frames, prompts=[], seeds=[], segments=[], ts=[], keyframe_frames=[])


def encode_frame(frame: np.ndarray, size: int) -> tuple[bytes, str]:
    """(bytes, format) of one frame for an ``ipywidgets.Image``: PNG for small frames (crisp), JPEG for large."""
    if max(frame.shape[:2]) <= 256:
        return png_bytes(frame, min_side=min(size, WIDGET_MIN_SIDE)), "png"
    return jpeg_bytes(frame, quality=92), "jpeg"


def frame_label(walk: Any, i: int, total: int | None = None) -> str:
    """Where frame ``i`` of a Walk lies: between which keyframes (prompt, seed) and how far."""
    segments, ts = getattr(walk, "segments", None), getattr(walk, "ts", None)
    if not segments or not ts:
        return f"frame {i + 1}" + (f"/{total}" if total else "")
    prompts, seeds = list(walk.prompts), list(walk.seeds)
    k = len(seeds)
    a, b = segments[i], (segments[i] + 1) % k

    def key(j: int) -> str:
        p = prompts[j] if j < len(prompts) else None
        s = seeds[j] if j < len(seeds) else "?"
        return f"“{html.escape(str(p))}” (seed {s})" if p is not None else f"keyframe {j} (seed {s})"

    mark = " · <b>keyframe</b>" if i in walk.keyframe_frames else ""
    return f"frame {i + 1}/{len(ts)}: {key(a)} → {key(b)}, t = {ts[i]:.2f}{mark}"


class InterpolationExplorer(SliderExplorer):
    """Scrub through frames interpolated between prompts and/or seeds, and see how smooth the path is.

    Give one walk (a :class:`~sdexplore.walks.Walk` or an ``(N, H, W, 3)`` array) or several to compare side
    by side on one slider, e.g. ``{"lerp": frames_lerp, "slerp": frames_slerp}``. Below the frames, the
    distance between consecutive frames (one curve per walk, largest jumps as red dots) with a marker at the
    current frame, and each walk's smoothness (1 − Gini of the distances: 1 = perfectly even steps).
    Frames are encoded once and held by the browser: the slider never waits on the kernel. :attr:`value` (the
    view's synced ``frame``) follows the slider when it is let go; setting it moves the view.

    Args:
        source: a Walk, a frames array, or a mapping name → Walk/array (all with the same frame count).
        metric: distance for the smoothness curve, ``"pixel"`` or ``"lowres"`` (see :mod:`sdexplore.smoothness`).
        size: displayed side of each frame in pixels.
        static: force the static figure (True) or the widget (False); default: detect a widget frontend.
    """

    _web_name = "interpolation"  # its front end: sdexplore/views/web/interpolation.js

    def __init__(
        self, source: Any, *, metric: Metric = "pixel", size: int = 256, static: bool | None = None
    ) -> None:
        super().__init__(static=static)
        items = source.items() if isinstance(source, Mapping) else [("frames", source)]
        self.sources = {str(k): v for k, v in items}
        self.frames = {k: frames_of(v) for k, v in self.sources.items()}
        counts = {k: len(f) for k, f in self.frames.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"Walks compared on one slider need the same number of frames, got {counts}.")
        self.num_frames = next(iter(counts.values()))
        if self.num_frames < 2:
            raise ValueError("An interpolation needs at least 2 frames.")
        self.size = size
        self.reports = {k: smoothness_report(f, metric) for k, f in self.frames.items()}

    def _label(self, i: int) -> str:
        walk = next(iter(self.sources.values()))
        return frame_label(walk, i, self.num_frames)

    def smoothness_svg(self, i: int | None = None) -> str:
        """The consecutive-frame distance curves as inline SVG, with a marker at frame ``i``."""
        curves = [
            (f"{k}: 1−Gini {r.smoothness:.2f}", r.distances.tolist(), _COLOURS[n % len(_COLOURS)])
            for n, (k, r) in enumerate(self.reports.items())
        ]
        jumps = next(iter(self.reports.values())).jumps if len(self.reports) == 1 else ()
        marker = None if i is None else min(max(i - 0.5, 0.0), self.num_frames - 2)
        return svg_curves(
            curves,
            marker=marker,
            xlabel="distance from frame i to i+1",
            highlight=jumps,
            width=max(360, self.size * len(self.frames)),
            height=130,
        )

    # ---- widget -----------------------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        """The page payload the view shows (:func:`sdexplore.views.payload.walks_payload`): every walk's frames,
        and the distance curves and smoothness of :attr:`reports` (this explorer's ``metric``)."""
        walks = {k: as_walk(v, self.frames[k]) for k, v in self.sources.items()}
        out = _payload.walks_payload(walks)
        for entry in out["walk"]["compare"]:
            rep = self.reports[entry["name"]]
            entry["distances"] = [float(d) for d in rep.distances]
            entry["smoothness"] = _payload._finite(rep.smoothness)
        first = next(iter(self.reports.values()))
        out["walk"].update(
            distances=[float(d) for d in first.distances],
            smoothness=_payload._finite(first.smoothness),
            jumps=[int(j) for j in first.jumps],
        )
        return out

    def _build(self) -> Any:
        self._view = web_view("interpolation", self.payload(), frame=0)
        return self._view

    def displayed(self, name: str | None = None) -> bytes:
        """The encoded frame (PNG or WebP) the view shows for walk ``name`` (default: the first) at its frame."""
        self.widget  # noqa: B018
        compare = self._view.payload["walk"]["compare"]
        entry = compare[0] if name is None else next(c for c in compare if c["name"] == name)
        return base64.b64decode(entry["images"][self.value]["data"])

    # ---- static -----------------------------------------------------------------------------------------
    def figure(self, count: int = 8) -> Any:
        """Static figure: a strip of ``count`` frames per walk and the smoothness curves."""
        picks = spread(self.num_frames, count)
        rows = len(self.frames)
        fig = new_figure(1.5 * len(picks), 1.6 * rows + 2.0)
        grid = fig.add_gridspec(rows + 1, len(picks), height_ratios=[1] * rows + [1.2])
        for r, (k, f) in enumerate(self.frames.items()):
            for c, i in enumerate(picks):
                ax = fig.add_subplot(grid[r, c])
                ax.imshow(upscale(f[i], 64), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"frame {i + 1}", fontsize=8)
                if c == 0 and rows > 1:
                    ax.set_ylabel(k, fontsize=9)
        ax = fig.add_subplot(grid[rows, :])
        for n, (k, rep) in enumerate(self.reports.items()):
            ax.plot(
                np.arange(len(rep.distances)) + 0.5,
                rep.distances,
                color=_COLOURS[n % len(_COLOURS)],
                label=f"{k}: smoothness (1−Gini) {rep.smoothness:.2f}",
            )
            ax.scatter(np.asarray(rep.jumps) + 0.5, rep.distances[rep.jumps], color="#d62728", zorder=3, s=12)
        ax.set_xlabel("between frame i and i+1")
        ax.set_ylabel(f"{next(iter(self.reports.values())).metric} distance")
        ax.legend(fontsize=8)
        return fig

    def __repr__(self) -> str:
        return f"InterpolationExplorer({list(self.frames)}, {self.num_frames} frames)"
