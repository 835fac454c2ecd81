"""The capturing attention processor: now in :mod:`sdexplore.record.processor` (imported from here too)."""

from ..record.processor import (
    REPRODUCIBLE_PROCESSORS,
    CapturingAttnProcessor,
    Gate,
    Sink,
    attention_probs,
    is_reproducible,
)

__all__ = [
    "REPRODUCIBLE_PROCESSORS",
    "CapturingAttnProcessor",
    "Gate",
    "Sink",
    "attention_probs",
    "is_reproducible",
]
