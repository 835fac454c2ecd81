"""sdexplore: look inside Stable Diffusion — every denoising step, cross-attention per token, walks between prompts.

The public surface is deliberate and small; everything else lives in private or topic modules.
"""

from __future__ import annotations

from .describe import PipelineDescription, describe
from .errors import (
    DeviceDtypeError,
    ModelNotAvailableError,
    RecorderStateError,
    SdexploreError,
    UnsafeCheckpointError,
    UnsupportedPipelineError,
)
from .families import FAMILIES, Family, detect_family
from .loading import EMBEDDED_MODEL_DIR, embedded_model_available, load_pipeline, set_scheduler
from .tokenizer import clip_tokenizer

__version__ = "0.1.0"

__all__ = [
    "EMBEDDED_MODEL_DIR",
    "FAMILIES",
    "DeviceDtypeError",
    "Family",
    "ModelNotAvailableError",
    "PipelineDescription",
    "RecorderStateError",
    "SdexploreError",
    "UnsafeCheckpointError",
    "UnsupportedPipelineError",
    "clip_tokenizer",
    "describe",
    "detect_family",
    "embedded_model_available",
    "load_pipeline",
    "set_scheduler",
]
