"""AttentionMaps (cross-attention heat maps per token as plain data): re-exported from :mod:`sdexplore.results`."""

from __future__ import annotations

from ..results.attention_maps import AttentionMaps, StepSelector

__all__ = ["AttentionMaps", "StepSelector"]
