"""Load a pipeline the right way: embedded model by default, safetensors only, sensible device and dtype."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# The embedded model's folder, guidance scale and availability live in embedded/model.py; re-exported here.
from .embedded.model import EMBEDDED_GUIDANCE_SCALE, EMBEDDED_MODEL_DIR, embedded_model_available  # noqa: F401
from .errors import DeviceDtypeError, ModelNotAvailableError, UnsafeCheckpointError, UnsupportedPipelineError
from .families import FAMILIES, detect_family

#: Hub ids that moved; the old id resolves to the maintained one with a one-line note.
MOVED_MODEL_IDS = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "CompVis/stable-diffusion-v1-4": "CompVis/stable-diffusion-v1-4",
}

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_SUPPORTED_CLASSES = sorted({c for f in FAMILIES.values() for c in f.pipeline_classes})

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' per-component loading bars (noise for a local load; hub downloads
    keep huggingface_hub's own bars), restoring their state after."""
    import diffusers.utils.logging as d_logging
    import transformers.utils.logging as t_logging

    before = [(m, m.is_progress_bar_enabled()) for m in (d_logging, t_logging)]
    for m, _ in before:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, enabled in before:
            (m.enable_progress_bar if enabled else m.disable_progress_bar)()


class ModelIdNote(UserWarning):
    """A one-line note that a model id was resolved to another one."""


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve ``"auto"`` to cuda, then mps, then cpu; validate an explicit device."""
    if str(device) != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise DeviceDtypeError(
                "device='cuda' was requested but torch sees no CUDA GPU. Use device='auto' or 'cpu', or install "
                "a CUDA build of torch (see the README)."
            )
        if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceDtypeError(
                "device='mps' was requested but MPS is not available. Use device='auto' or 'cpu'."
            )
        return dev
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """Resolve ``"auto"``: float16 on cuda/mps, float32 on the CPU. float16 on the CPU is refused clearly."""
    dev = torch.device(device)
    if isinstance(dtype, str) and dtype != "auto":
        if dtype not in _DTYPES:
            raise DeviceDtypeError(
                f"Unknown dtype {dtype!r}; use 'auto', 'float32', 'float16' or 'bfloat16'."
            )
        dtype = _DTYPES[dtype]
    if dtype == "auto":
        return torch.float16 if dev.type in ("cuda", "mps") else torch.float32
    if not isinstance(dtype, torch.dtype):
        raise DeviceDtypeError(
            f"dtype must be 'auto', a name like 'float16', or a torch.dtype, not {dtype!r}."
        )
    if dtype == torch.float16 and dev.type == "cpu":
        raise DeviceDtypeError(
            "float16 pipelines cannot run on the CPU (many CPU kernels have no half-precision version). "
            "Use dtype='auto' (float32 on the CPU), or device='cuda'/'mps' for float16."
        )
    return dtype


def _dtype_keyword() -> str:
    """diffusers ≥ 0.42 takes ``dtype=`` (``torch_dtype=`` warns there); older releases only ``torch_dtype=``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def _looks_like_path(model: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else with separators or a weight suffix is a path."""
    return (
        model.startswith((".", "/", "~"))
        or model.count("/") > 1
        or "\\" in model
        or model.endswith((".safetensors",) + PICKLE_SUFFIXES)
    )


def _check_pipeline_folder(folder: Path) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelNotAvailableError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json). Pass a folder saved with "
            "pipe.save_pretrained(...), a single .safetensors checkpoint, or a hub id like "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5'."
        )
    cls = json.loads(index.read_text()).get("_class_name", "?")
    if cls not in _SUPPORTED_CLASSES:
        raise UnsupportedPipelineError(
            f"{folder} holds a {cls}; sdexplore supports {', '.join(_SUPPORTED_CLASSES)}."
        )


def _single_file_class(path: Path) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = f.keys()
        is_xl = any(k.startswith("conditioner.embedders.1") for k in keys)
    return StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline


def load_pipeline(
    model: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    safety_checker: bool = True,
    allow_pickle: bool = False,
    scheduler: str | None = None,
    progress_bar: bool = False,
    **kwargs: Any,
) -> Any:
    """Load a Stable Diffusion pipeline ready to explore.

    Args:
        model: ``None`` for the embedded default model (offline, CPU-friendly); a hub id such as
            ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``; a local diffusers folder; or a single
            ``.safetensors`` checkpoint file. Pickle checkpoints (``.bin``, ``.ckpt``, ``.pt``) are refused
            unless ``allow_pickle=True`` (they can run arbitrary code when loaded).
        device: ``"auto"`` (cuda, then mps, then cpu) or an explicit device.
        dtype: ``"auto"`` (float16 on cuda/mps, float32 on the CPU) or an explicit dtype. float16 on the CPU
            raises one clear :class:`~sdexplore.errors.DeviceDtypeError`.
        safety_checker: keep the safety checker and feature extractor when the model has them.
        allow_pickle: opt in to loading pickle-based weights.
        scheduler: optional scheduler class name from diffusers (e.g. ``"EulerDiscreteScheduler"``).
        progress_bar: show diffusers' per-call progress bar (denoising steps).
        **kwargs: passed to ``from_pretrained`` / ``from_single_file``.

    Returns:
        A diffusers pipeline of a supported family (see :mod:`sdexplore.families`).
    """
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    load_kwargs: dict[str, Any] = {_dtype_keyword(): dt, **kwargs}
    if not safety_checker:
        load_kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    with _quiet_loading():
        pipe = _load(model, load_kwargs, dt, allow_pickle)
    detect_family(pipe)  # raises UnsupportedPipelineError for anything else
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=not progress_bar)
    if pipe.device != dev:
        pipe = pipe.to(dev)
    return pipe


def _load(
    model: str | os.PathLike[str] | None, load_kwargs: dict[str, Any], dt: torch.dtype, allow_pickle: bool
) -> Any:
    if model is None:
        if embedded_model_available():
            pipe = _from_folder(EMBEDDED_MODEL_DIR, load_kwargs, allow_pickle)
        else:  # the structural stand-in until the trained model ships
            from .fixtures import tiny_pipeline

            pipe = tiny_pipeline("sd1")
            if dt != torch.float32:
                pipe = pipe.to(dtype=dt)
    else:
        name = os.fspath(model)
        if name in MOVED_MODEL_IDS and MOVED_MODEL_IDS[name] != name:
            warnings.warn(
                f"{name} was removed from the hub; using its maintained mirror {MOVED_MODEL_IDS[name]}.",
                ModelIdNote,
                stacklevel=2,
            )
            name = MOVED_MODEL_IDS[name]
        path = Path(name).expanduser()
        if path.exists():
            if path.is_dir():
                pipe = _from_folder(path, load_kwargs, allow_pickle)
            elif path.suffix == ".safetensors":
                pipe = _single_file_class(path).from_single_file(str(path), **load_kwargs)
            elif path.suffix in PICKLE_SUFFIXES:
                if not allow_pickle:
                    raise UnsafeCheckpointError(
                        f"{path.name} is a pickle checkpoint, which can run arbitrary code when loaded. Convert it "
                        "to .safetensors, or pass allow_pickle=True if you trust its source."
                    )
                pipe = _single_file_class_from_name(path).from_single_file(str(path), **load_kwargs)
            else:
                raise ModelNotAvailableError(
                    f"{path} is a file sdexplore cannot load: pass a .safetensors checkpoint or a diffusers folder."
                )
        elif _looks_like_path(name):
            raise ModelNotAvailableError(
                f"No such file or folder: {path}. Check the path, or pass a hub id like "
                "'stable-diffusion-v1-5/stable-diffusion-v1-5'."
            )
        else:
            pipe = _from_hub(name, load_kwargs, allow_pickle)
    return pipe


def _single_file_class_from_name(path: Path) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if "xl" in path.name.lower() else StableDiffusionPipeline


def _from_folder(folder: Path, load_kwargs: dict[str, Any], allow_pickle: bool) -> Any:
    from diffusers import DiffusionPipeline

    _check_pipeline_folder(folder)
    has_safetensors = any(folder.rglob("*.safetensors"))
    if not has_safetensors and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{folder} has no .safetensors weights, only pickle files, which can run arbitrary code when loaded. "
            "Convert them, or pass allow_pickle=True if you trust the source."
        )
    return DiffusionPipeline.from_pretrained(str(folder), use_safetensors=has_safetensors, **load_kwargs)


def _from_hub(model_id: str, load_kwargs: dict[str, Any], allow_pickle: bool) -> Any:
    from diffusers import DiffusionPipeline
    from huggingface_hub import constants

    use_st = None if allow_pickle else True
    try:  # cache first: no network round trip when the model is already here
        return DiffusionPipeline.from_pretrained(
            model_id, use_safetensors=use_st, local_files_only=True, **load_kwargs
        )
    except (OSError, ValueError) as cached_error:
        offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        if offline:
            raise ModelNotAvailableError(
                f"{model_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. Download it once "
                f"with network access (huggingface-cli download {model_id}), or unset HF_HUB_OFFLINE."
            ) from cached_error
    try:
        return DiffusionPipeline.from_pretrained(model_id, use_safetensors=use_st, **load_kwargs)
    except (OSError, ValueError) as error:
        msg = str(error)
        if "safetensors" in msg.lower() and use_st:
            raise UnsafeCheckpointError(
                f"{model_id} has no .safetensors weights. Pass allow_pickle=True if you trust its source."
            ) from error
        raise ModelNotAvailableError(
            f"Could not load {model_id}: it is not cached locally and the Hugging Face Hub could not be reached "
            f"or has no such model. Check the id, your network, and (for gated models) `huggingface-cli login`; "
            f"or load the embedded model with load_pipeline(). Underlying error: {msg.splitlines()[0][:200]}"
        ) from error


def set_scheduler(pipe: Any, name: str, **config: Any) -> Any:
    """Replace ``pipe.scheduler`` by the diffusers scheduler class ``name``, built from the current config."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))
        raise ValueError(f"Unknown scheduler {name!r}. Known: {', '.join(known)}.")
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **config)
    return pipe.scheduler
