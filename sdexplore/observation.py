"""observe(pipe, steps=..., attention=...): one context manager around the user's own call, all recorders."""

from __future__ import annotations

from .results.observation import Observation

__all__ = ["Observation", "observe"]

# observe() lives with the recorders; imported last, after Observation (its module imports this one lazily)
from .record.observe import observe  # noqa: E402
