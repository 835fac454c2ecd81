"""Cross-attention maps per token: a recorder that captures them cheaply and the plain-data result."""

from .maps import AttentionMaps
from .recorder import AttentionRecorder
from .tokens import TokenList

__all__ = ["AttentionMaps", "AttentionRecorder", "TokenList"]
