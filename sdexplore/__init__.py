"""sdexplore: look inside Stable Diffusion — every denoising step, cross-attention per token, walks between prompts.

The public surface is deliberate and small. Names are imported lazily (PEP 562), so ``import sdexplore`` and
``sdexplore --help`` stay fast; torch and diffusers load on first use. Topic modules hold the rest:
``sdx.widgets`` and ``sdx.plots`` (in :mod:`sdexplore.views`), ``sdx.scenes`` (:mod:`sdexplore.embedded.scenes`),
``sdx.interpolate``, ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from . import _quiet  # noqa: F401  (drops transformers' torchvision-fallback notes; standard library only)

#: The version of this sdexplore install (PEP 440).
__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # loading, families, the component tour
    "load_pipeline": "loading",
    "set_scheduler": "loading",
    "embedded_model_available": "loading",
    "EMBEDDED_MODEL_DIR": "loading",
    "EMBEDDED_GUIDANCE_SCALE": "loading",
    "describe": "tour",
    "PipelineDescription": "tour",
    "Family": "families",
    "FAMILIES": "families",
    "detect_family": "families",
    "clip_tokenizer": "tokenizer",
    # recording and steering
    "observe": "record.observe",
    "Observation": "results",
    "generate": "generation",
    "StepRecorder": "record.steps",
    "Trace": "results",
    "StepRecord": "results",
    "PromptSwitch": "record.steering",
    "AttentionRecorder": "record.attention",
    "AttentionMaps": "results",
    # attention control (editing by the attention maps)
    "edit": "editing",
    "vital_layers": "vital",
    "VitalLayers": "vital",
    "Edit": "results.edit",
    "Control": "record.control",
    "LocalBlend": "record.control",
    "Refine": "record.control",
    "Inject": "record.control",
    "Reweight": "record.control",
    "WordSwap": "record.control",
    # text, interpolation, walks
    "encode_prompt": "text",
    "inspect_prompt": "text",
    "compare_prompts": "text",
    "EncodedPrompt": "text",
    "lerp": "interpolate",
    "slerp": "interpolate",
    "noise_slerp": "interpolate",
    "walk": "walks",
    "Walk": "results",
    "smoothness_report": "smoothness",
    # real pictures
    "invert": "inversion",
    "Inversion": "inversion",
    # sweeps at dataset scale
    "sweep": "sweeps",
    "sweep_report": "sweeps",
    # errors
    "SdexploreError": "errors",
    "UnsupportedPipelineError": "errors",
    "ModelNotAvailableError": "errors",
    "UnsafeCheckpointError": "errors",
    "DeviceDtypeError": "errors",
    "RecorderStateError": "errors",
    "WordNotFoundError": "errors",
    "ResultFileError": "errors",
    "InterpolationError": "errors",
    "InvalidArgumentError": "errors",
    "ExportError": "errors",
    "MemoryBudgetError": "errors",
}
# topic module reachable as an attribute (``sdx.widgets``) -> where it lives
_SUBMODULES: dict[str, str] = {
    "widgets": "views.widgets",
    "plots": "views.plots",
    "scenes": "embedded.scenes",
    "interpolate": "interpolate",
    "heatmaps": "heatmaps",
    "export": "views.export",
    "images": "images",
    "families": "families",
    "fixtures": "fixtures",
    "text": "text",
    "record": "record",
    "results": "results",
    "embedded": "embedded",
    "render": "views.render",
    "decoding": "decoding",
    "sweeps": "sweeps",
    "vital": "vital",
    "directions": "directions",
}

__all__ = [
    "AttentionMaps",
    "AttentionRecorder",
    "Control",
    "DeviceDtypeError",
    "EMBEDDED_MODEL_DIR",
    "EMBEDDED_GUIDANCE_SCALE",
    "Edit",
    "EncodedPrompt",
    "ExportError",
    "FAMILIES",
    "Family",
    "InterpolationError",
    "InvalidArgumentError",
    "Inject",
    "Inversion",
    "LocalBlend",
    "MemoryBudgetError",
    "ModelNotAvailableError",
    "Observation",
    "PipelineDescription",
    "PromptSwitch",
    "RecorderStateError",
    "Refine",
    "ResultFileError",
    "Reweight",
    "SdexploreError",
    "StepRecord",
    "StepRecorder",
    "Trace",
    "UnsafeCheckpointError",
    "UnsupportedPipelineError",
    "VitalLayers",
    "Walk",
    "WordNotFoundError",
    "WordSwap",
    "__version__",
    "clip_tokenizer",
    "compare_prompts",
    "describe",
    "detect_family",
    "edit",
    "embedded_model_available",
    "encode_prompt",
    "generate",
    "inspect_prompt",
    "invert",
    "lerp",
    "load_pipeline",
    "noise_slerp",
    "observe",
    "set_scheduler",
    "slerp",
    "smoothness_report",
    "sweep",
    "sweep_report",
    "vital_layers",
    "walk",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    raise AttributeError(f"module 'sdexplore' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


if TYPE_CHECKING:  # static view of the lazy names for type checkers and IDEs
    from .editing import edit
    from .errors import (
        DeviceDtypeError,
        ExportError,
        InterpolationError,
        InvalidArgumentError,
        MemoryBudgetError,
        ModelNotAvailableError,
        RecorderStateError,
        ResultFileError,
        SdexploreError,
        UnsafeCheckpointError,
        UnsupportedPipelineError,
        WordNotFoundError,
    )
    from .families import FAMILIES, Family, detect_family
    from .generation import generate
    from .interpolate import lerp, noise_slerp, slerp
    from .inversion import Inversion, invert
    from .loading import (
        EMBEDDED_GUIDANCE_SCALE,
        EMBEDDED_MODEL_DIR,
        embedded_model_available,
        load_pipeline,
        set_scheduler,
    )
    from .record.attention import AttentionRecorder
    from .record.control import Control, Inject, LocalBlend, Refine, Reweight, WordSwap
    from .record.observe import observe
    from .record.steering import PromptSwitch
    from .record.steps import StepRecorder
    from .results import AttentionMaps, Observation, StepRecord, Trace, Walk
    from .results.edit import Edit
    from .smoothness import smoothness_report
    from .sweeps import sweep, sweep_report
    from .text import EncodedPrompt, compare_prompts, encode_prompt, inspect_prompt
    from .tokenizer import clip_tokenizer
    from .tour import PipelineDescription, describe
    from .vital import VitalLayers, vital_layers
    from .walks import walk
