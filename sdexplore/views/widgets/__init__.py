"""Jupyter explorers over sdexplore's plain-data results, with a static matplotlib fallback.

Every explorer takes a result object (a Trace / Observation, AttentionMaps, an Edit, a Walk or frames), never a
pipeline: moving a control only shows what was already computed. In a Jupyter kernel an explorer displays
as a widget; in a plain script, with ``static=True``, or with ``SDEXPLORE_STATIC=1`` it displays (and
``.figure()`` returns) a matplotlib figure instead.

TimestepScrubber, AttentionExplorer, InterpolationExplorer, WalkPlayer, EditExplorer and DirectionExplorer are
anywidget views of the front end the self-contained pages use (``sdexplore/views/web/``, see
:mod:`sdexplore.views.pages`): their data lives in the browser, so a control never waits on the kernel and the
view outlives it.
"""

from __future__ import annotations

from ._base import Explorer, ImageUpload, has_widget_frontend
from .attention import AttentionExplorer
from .directions import DirectionExplorer
from .edit import EditExplorer
from .interpolation import InterpolationExplorer
from .player import WalkPlayer
from .scrubber import TimestepScrubber

__all__ = [
    "AttentionExplorer",
    "DirectionExplorer",
    "EditExplorer",
    "Explorer",
    "ImageUpload",
    "InterpolationExplorer",
    "TimestepScrubber",
    "WalkPlayer",
    "has_widget_frontend",
]
