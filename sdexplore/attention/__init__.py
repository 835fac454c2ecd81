"""Cross-attention maps per token: the recorder that captures them cheaply and the plain-data result.

The recorder lives in :mod:`sdexplore.record.attention`, the result in :mod:`sdexplore.results.attention_maps`;
both are importable from here. ``AttentionRecorder`` loads on first use (the recording code imports this package's
token helpers).
"""

from typing import Any

from ..results.attention_maps import AttentionMaps
from ..results.tokens import TokenList

__all__ = ["AttentionMaps", "AttentionRecorder", "TokenList"]


def __getattr__(name: str) -> Any:
    if name == "AttentionRecorder":
        from ..record.attention import AttentionRecorder

        return AttentionRecorder
    raise AttributeError(f"module 'sdexplore.attention' has no attribute {name!r}")
