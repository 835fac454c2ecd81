"""Results as plain data: Trace, AttentionMaps, Walk, Observation, Edit, saved in one checksummed file format.

Nothing here imports a recorder or a pipeline: results load and display without diffusers.
"""

from __future__ import annotations

from .attention_maps import AttentionMaps
from .edit import Edit
from .observation import Observation
from .tokens import TokenList
from .trace import TENSOR_FIELDS, StepRecord, Trace
from .walk import Walk

__all__ = [
    "TENSOR_FIELDS",
    "AttentionMaps",
    "Edit",
    "Observation",
    "StepRecord",
    "TokenList",
    "Trace",
    "Walk",
]
