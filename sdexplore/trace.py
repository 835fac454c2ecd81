"""Trace and StepRecord (the recorded steps of a run): re-exported from :mod:`sdexplore.results.trace`."""

from __future__ import annotations

from .results.trace import TENSOR_FIELDS, StepRecord, Trace

__all__ = ["TENSOR_FIELDS", "StepRecord", "Trace"]
