"""Exceptions sdexplore raises; each message says what to do."""

from __future__ import annotations


class SdexploreError(Exception):
    """Base class of every sdexplore error."""


class UnsupportedPipelineError(SdexploreError, TypeError):
    """The pipeline's class or structure is not one sdexplore can observe."""


class ModelNotAvailableError(SdexploreError, OSError):
    """A model could not be found locally and cannot be downloaded (offline, missing path, not cached)."""


class UnsafeCheckpointError(SdexploreError, ValueError):
    """A pickle-based checkpoint was refused (it can run arbitrary code when loaded)."""


class DeviceDtypeError(SdexploreError, ValueError):
    """The requested device/dtype combination cannot run (e.g. float16 on the CPU)."""


class RecorderStateError(SdexploreError, RuntimeError):
    """A recorder was entered twice on one pipeline or used outside its ``with`` block."""


class InterpolationError(SdexploreError, ValueError):
    """Keyframes or interpolation inputs cannot be interpolated (too few, mismatched, degenerate)."""


class WordNotFoundError(SdexploreError, LookupError):
    """A word or token asked of a result is not in the prompt (the message lists the prompt's words)."""


class ResultFileError(SdexploreError, ValueError):
    """A saved result file is truncated, corrupt, or not the kind of result being loaded."""


class NotRecordedError(SdexploreError, ValueError):
    """A view asked for a quantity a result did not record (the message says how to record it)."""


class TrainingConfigError(SdexploreError, ValueError):
    """A training run's settings contradict each other or are out of range (checked before anything runs)."""


class SelectionError(SdexploreError, IndexError, KeyError):
    """A step, image, layer or token position asked of a result does not exist (the message lists what does).

    An ``IndexError`` and a ``KeyError`` too, as the plain lookups it replaces were.
    """

    __str__ = Exception.__str__  # KeyError's __str__ would quote the message


class InvalidArgumentError(SdexploreError, ValueError, TypeError):
    """An argument's type or value is not one sdexplore accepts (the message names it and what is accepted)."""


class ExportError(SdexploreError, ValueError, OSError):
    """A frame, grid, GIF or video file cannot be written (bad fps or extension, encoder failure); names the file."""


class SweepAbortedError(SdexploreError, RuntimeError):
    """Another process of a sweep stopped before the work began (its error is in the message)."""


class MemoryBudgetError(SdexploreError, MemoryError):
    """A recording would not fit its ``max_bytes`` budget or the memory the machine has free; raised before the
    denoising loop, naming the options that bound it."""
