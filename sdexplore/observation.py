"""observe(pipe, steps=..., attention=...) and its result: imported from here, defined in record/ and results/."""

from __future__ import annotations

from .record.observe import observe
from .results.observation import Observation

__all__ = ["Observation", "observe"]
