"""AttentionRecorder: now in :mod:`sdexplore.record.attention` (imported from here too)."""

from ..record.attention import AttentionRecorder, LayerFilter

__all__ = ["AttentionRecorder", "LayerFilter"]
