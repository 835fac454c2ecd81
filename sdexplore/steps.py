"""StepRecorder, StepConfig, steer: the step recorder, now in :mod:`sdexplore.record.steps` (imported from here too)."""

from .record.steps import (
    DEFAULT_MAX_BYTES,
    DEFAULT_QUANTITIES,
    StepConfig,
    StepListener,
    StepRecorder,
    steer,
)

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_QUANTITIES", "StepConfig", "StepListener", "StepRecorder", "steer"]
