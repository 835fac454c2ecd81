"""Load a pipeline the right way: embedded model by default, safetensors only, sensible device and dtype."""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

# The embedded model's folder, guidance scale and availability live in embedded/model.py; re-exported here.
from .embedded.model import (  # noqa: F401
    EMBEDDED_GUIDANCE_SCALE,
    EMBEDDED_MODEL_DIR,
    MMDIT_MODEL_DIR,
    embedded_model_available,
)
from .errors import (
    DeviceDtypeError,
    InvalidArgumentError,
    ModelNotAvailableError,
    SdexploreError,
    UnsafeCheckpointError,
    UnsupportedPipelineError,
)
from .families import FAMILIES, detect_family

#: The embedded models by name: ``load_pipeline("tiny-shapes-mmdit")``.
EMBEDDED_MODELS = {"tiny-shapes": EMBEDDED_MODEL_DIR, "tiny-shapes-mmdit": MMDIT_MODEL_DIR}

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


_DEVICE_HELP = "use 'auto', 'cpu', 'cuda', 'cuda:N' (N: a GPU index), 'mps' or 'xpu'"
_DTYPE_HELP = "use 'auto', float32, float16 or bfloat16 (a name such as 'float16' or a torch.dtype)"


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve ``"auto"`` to cuda, then mps, then cpu; validate an explicit device (``"cuda:1"``, ``" CUDA "``...).

    Anything torch cannot run a pipeline on here (an unknown type such as ``"tpu"``, a GPU index past the last
    GPU, an accelerator torch does not see) raises :class:`~sdexplore.errors.DeviceDtypeError`.
    """
    if isinstance(device, torch.device):
        text = str(device)
    elif isinstance(device, str):
        text = device.strip().lower()
    else:
        raise DeviceDtypeError(f"device must be a string or a torch.device, not {device!r}: {_DEVICE_HELP}.")
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    match = re.fullmatch(r"(cpu|cuda|mps|xpu)(?::(\d+))?", text)
    if match is None:
        raise DeviceDtypeError(f"Unknown device {device!r}: {_DEVICE_HELP}.")
    kind, index = match.group(1), None if match.group(2) is None else int(match.group(2))
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceDtypeError(
                f"device={device!r} was requested but torch sees no CUDA GPU. Use device='auto' or 'cpu', or "
                "install a CUDA build of torch (see the README)."
            )
        count = torch.cuda.device_count()
        if index is not None and index >= count:
            raise DeviceDtypeError(
                f"device={device!r} was requested but torch sees {count} GPU(s): use 'cuda:0'"
                + (f" to 'cuda:{count - 1}'" if count > 1 else "")
                + ", or 'cuda' for the current one."
            )
    elif kind == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceDtypeError(
                f"device={device!r} was requested but MPS is not available. Use 'auto' or 'cpu'."
            )
        if index not in (None, 0):
            raise DeviceDtypeError(f"There is one MPS device: use 'mps', not {device!r}.")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise DeviceDtypeError(
            f"device={device!r} was requested but torch sees no Intel XPU. Use 'auto' or 'cpu'."
        )
    elif kind == "cpu" and index not in (None, 0):
        raise DeviceDtypeError(f"There is one CPU device: use 'cpu', not {device!r}.")
    return torch.device(kind if index is None else f"{kind}:{index}")


def pick_dtype(dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """Resolve ``"auto"``: float16 on cuda/mps, float32 on the CPU. Only float32, float16 and bfloat16 are
    accepted (names are case-insensitive, ``"torch.float16"`` works); float16 on the CPU is refused clearly."""
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as error:
        raise DeviceDtypeError(f"Unknown device {device!r}: {_DEVICE_HELP}.") from error
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return torch.float16 if dev.type in ("cuda", "mps") else torch.float32
        if name not in _DTYPES:
            raise DeviceDtypeError(f"Unknown dtype {dtype!r}: {_DTYPE_HELP}.")
        dtype = _DTYPES[name]
    if not isinstance(dtype, torch.dtype):
        raise DeviceDtypeError(f"dtype must be a string or a torch.dtype, not {dtype!r}: {_DTYPE_HELP}.")
    if dtype not in _DTYPES.values():
        raise DeviceDtypeError(f"A pipeline cannot run in {dtype}: {_DTYPE_HELP}.")
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


def _read_model_index(folder: Path) -> dict[str, Any]:
    """``folder/model_index.json`` as a dict naming the pipeline class, else one clear error naming the file."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelNotAvailableError(
            f"{folder} is not a diffusers pipeline folder (no model_index.json). Pass a folder saved with "
            "pipe.save_pretrained(...), a single .safetensors checkpoint, or a hub id like "
            "'stable-diffusion-v1-5/stable-diffusion-v1-5'."
        )
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelNotAvailableError(
            f"{index} is not valid JSON ({error}). Download the model again, or save it again with "
            "pipe.save_pretrained(...)."
        ) from error
    if not isinstance(data, dict) or not isinstance(data.get("_class_name"), str):
        raise ModelNotAvailableError(
            f'{index} has no "_class_name" naming the pipeline class: it is not a diffusers model index. Download '
            "the model again, or save it again with pipe.save_pretrained(...)."
        )
    return data


def _check_pipeline_folder(folder: Path, overridden: Any = ()) -> None:
    """Before any weights load: a readable index of a supported class, a subfolder for every component it lists
    (except those passed in ``overridden``), and every ``.safetensors`` file whole."""
    data = _read_model_index(folder)
    cls = data["_class_name"]
    if cls not in _SUPPORTED_CLASSES:
        raise UnsupportedPipelineError(
            f"{folder} holds a {cls}; sdexplore supports {', '.join(_SUPPORTED_CLASSES)}."
        )
    for name, spec in data.items():
        listed = isinstance(spec, list) and len(spec) == 2 and all(spec)
        if name.startswith("_") or not listed or name in overridden:
            continue
        if not (folder / name).is_dir():
            raise ModelNotAvailableError(
                f"{folder / 'model_index.json'} lists the component {name!r} ({spec[1]}), but there is no "
                f"{name}/ folder beside it. Download the model again, or save it again with pipe.save_pretrained(...)."
            )
    for weights in sorted(folder.rglob("*.safetensors")):
        _safetensors_keys(weights)


def _safetensors_keys(path: Path) -> list[str]:
    """The tensor names of a ``.safetensors`` file, from its header alone (no tensor is read). A file that is not
    one, or was cut short, raises :class:`~sdexplore.errors.ModelNotAvailableError` naming it."""

    def unreadable(why: str) -> ModelNotAvailableError:
        return ModelNotAvailableError(
            f"{path} is not a readable .safetensors file ({why}). Download or export it again."
        )

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)  # little-endian u64: the JSON header's length
        if len(head) < 8:
            raise unreadable("it is empty" if size == 0 else f"only {size} bytes")
        n = int.from_bytes(head, "little")
        if n > size - 8 or n > 100_000_000:
            raise unreadable("its header length does not fit the file: not safetensors, or truncated")
        try:
            header = json.loads(f.read(n))
        except ValueError as error:
            raise unreadable(f"its header is not JSON: {error}") from error
    if not isinstance(header, dict):
        raise unreadable("its header is not a table of tensors")
    keys, end = [], 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(entry["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as error:
            raise unreadable(f"tensor {key!r} has no valid data_offsets") from error
        keys.append(key)
    if end > size - 8 - n:
        raise unreadable(
            f"truncated: its header describes {end:,} bytes of tensors, the file holds {size - 8 - n:,}"
        )
    return keys


def _single_file_class(path: Path) -> Any:
    """The pipeline class of a single-file checkpoint, from its tensor names; anything that is not an SD 1.x, 2.x
    or SDXL checkpoint in the original layout is refused here, before diffusers looks for configs on the hub."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    keys = _safetensors_keys(path)
    if any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        is_xl = any(k.startswith("conditioner.embedders.1") for k in keys)
        return StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    accepted = (
        "sdexplore loads SD 1.x, SD 2.x and SDXL single-file checkpoints (UNet under 'model.diffusion_model.'), "
        "diffusers pipeline folders and hub ids"
    )
    if any(".joint_blocks." in k for k in keys):
        raise UnsupportedPipelineError(f"{path.name} is an SD3 checkpoint; {accepted}.")
    if any(k.split(".")[0] in ("double_blocks", "single_blocks") or ".double_blocks." in k for k in keys):
        raise UnsupportedPipelineError(f"{path.name} is a Flux checkpoint; {accepted}.")
    if any(k.startswith(("down_blocks.", "conv_in.", "encoder.down_blocks.", "text_model.")) for k in keys):
        raise UnsupportedPipelineError(
            f"{path.name} holds the weights of one diffusers component, not a whole model: pass the pipeline "
            f"folder it belongs to (the one with model_index.json). {accepted[0].upper()}{accepted[1:]}."
        )
    sample = ", ".join(repr(k) for k in keys[:3]) or "none"
    raise UnsupportedPipelineError(
        f"{path.name} is not a Stable Diffusion checkpoint ({len(keys)} tensors, e.g. {sample}); {accepted}."
    )


def _from_single_file(cls: Any, path: Path, load_kwargs: dict[str, Any]) -> Any:
    """``cls.from_single_file`` with any failure reported as one error naming the file."""
    try:
        return cls.from_single_file(str(path), **load_kwargs)
    except SdexploreError:
        raise
    except Exception as error:  # diffusers raises many kinds here (OSError, IndexError, hub errors)
        msg = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ModelNotAvailableError(
            f"Could not build a {cls.__name__} from {path}. diffusers reads the original model's configuration "
            "from the Hugging Face Hub (once, then cached): check the network or HF_HUB_OFFLINE, or load a "
            f"diffusers pipeline folder instead. Underlying error: {type(error).__name__}: {msg}"
        ) from error


def _check_model_argument(model: Any) -> None:
    if model is None or isinstance(model, os.PathLike):
        return
    if isinstance(model, str):
        if not model.strip():
            raise InvalidArgumentError(
                "model is an empty string: pass None for the embedded model, a hub id, a folder or a .safetensors file."
            )
        return
    if hasattr(model, "scheduler") and (hasattr(model, "unet") or hasattr(model, "transformer")):
        raise InvalidArgumentError(
            f"model is already a loaded {type(model).__name__}: use it directly (load_pipeline takes a hub id, "
            "a folder or a .safetensors file)."
        )
    raise InvalidArgumentError(
        f"model must be None (the embedded model), a hub id, a folder or a .safetensors file path, not "
        f"{type(model).__name__} {model!r:.60}."
    )


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
            ``"stable-diffusion-v1-5/stable-diffusion-v1-5"``; an embedded model's name (``"tiny-shapes"``,
            ``"tiny-shapes-mmdit"``: the SD3-style MMDiT one); a local diffusers folder; or a single
            ``.safetensors`` checkpoint file. Pickle checkpoints (``.bin``, ``.ckpt``, ``.pt``) are refused
            unless ``allow_pickle=True`` (they can run arbitrary code when loaded).
        device: ``"auto"`` (cuda, then mps, then cpu) or ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``,
            ``"xpu"``; anything else raises :class:`~sdexplore.errors.DeviceDtypeError`.
        dtype: ``"auto"`` (float16 on cuda/mps, float32 on the CPU), float32, float16 or bfloat16. float16 on
            the CPU, or any other dtype, raises one clear :class:`~sdexplore.errors.DeviceDtypeError`.
        safety_checker: keep the safety checker and feature extractor when the model has them.
        allow_pickle: opt in to loading pickle-based weights.
        scheduler: optional scheduler class name from diffusers (e.g. ``"EulerDiscreteScheduler"``), checked
            against the model's scheduler config before loading (:func:`check_scheduler_name`).
        progress_bar: show diffusers' per-call progress bar (denoising steps).
        **kwargs: passed to ``from_pretrained`` / ``from_single_file``.

    Every argument, the model folder's index and the header of every ``.safetensors`` file are checked before
    any weights load; each problem is one sdexplore error naming the file or value and what is accepted.

    Returns:
        A diffusers pipeline of a supported family (see :mod:`sdexplore.families`).
    """
    _check_model_argument(model)
    for flag, value in (
        ("safety_checker", safety_checker),
        ("allow_pickle", allow_pickle),
        ("progress_bar", progress_bar),
    ):
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{flag} must be True or False, not {value!r}.")
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    if scheduler is not None:  # checked against the model's own scheduler config before any weights load
        scheduler = check_scheduler_name(scheduler, model)
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
        if name in EMBEDDED_MODELS and not path.exists():  # an embedded model by its name
            path = EMBEDDED_MODELS[name]
            if not (path / "model_index.json").is_file():
                raise ModelNotAvailableError(
                    f"The embedded model {name!r} is not in this installation ({path})."
                )
        if path.exists():
            if path.is_dir():
                pipe = _from_folder(path, load_kwargs, allow_pickle)
            elif path.suffix == ".safetensors":
                pipe = _from_single_file(_single_file_class(path), path, load_kwargs)
            elif path.suffix in PICKLE_SUFFIXES:
                if not allow_pickle:
                    raise UnsafeCheckpointError(
                        f"{path.name} is a pickle checkpoint, which can run arbitrary code when loaded. Convert it "
                        "to .safetensors, or pass allow_pickle=True if you trust its source."
                    )
                pipe = _from_single_file(_single_file_class_from_name(path), path, load_kwargs)
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
    from safetensors import SafetensorError

    _check_pipeline_folder(folder, overridden=load_kwargs)
    index = _read_model_index(folder)
    for name in (
        "text_encoder_3",
        "tokenizer_3",
    ):  # SD3 saved without T5: diffusers wants them passed as None
        if index.get(name) == [None, None] and name not in load_kwargs:
            load_kwargs = {**load_kwargs, name: None}
    has_safetensors = any(folder.rglob("*.safetensors"))
    if not has_safetensors and not allow_pickle:
        raise UnsafeCheckpointError(
            f"{folder} has no .safetensors weights, only pickle files, which can run arbitrary code when loaded. "
            "Convert them, or pass allow_pickle=True if you trust the source."
        )
    try:
        return DiffusionPipeline.from_pretrained(str(folder), use_safetensors=has_safetensors, **load_kwargs)
    except (OSError, ValueError, KeyError, SafetensorError) as error:
        msg = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ModelNotAvailableError(
            f"Could not load the pipeline in {folder}: {msg}. Download the model again, or save it again with "
            "pipe.save_pretrained(...)."
        ) from error


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


#: Schedulers for distilled SD models (LCM, TCD LoRAs): they drive any DDPM-type model although diffusers does
#: not list them among its compatible schedulers.
_DISTILLED_SCHEDULERS = frozenset({"LCMScheduler", "TCDScheduler"})


def _known_schedulers() -> list[str]:
    import diffusers

    return sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and not n.startswith("_"))


def _compatible_schedulers(current: str) -> set[str] | None:
    """Scheduler class names that can replace ``current`` on the same model (same training objective: DDPM-type
    noise schedules or flow matching); ``None`` when ``current`` is not a diffusers scheduler."""
    import diffusers
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers

    cls = getattr(diffusers, current, None)
    if cls is None or type(cls).__name__ == "DummyObject":
        return None
    allowed = {current, *getattr(cls, "_compatibles", [])}
    if current in {e.name for e in KarrasDiffusionSchedulers} | _DISTILLED_SCHEDULERS:
        allowed |= {e.name for e in KarrasDiffusionSchedulers} | _DISTILLED_SCHEDULERS
    return allowed


def _checked_scheduler_name(name: Any) -> str:
    """``name`` if it is a diffusers scheduler class that can be built here, else InvalidArgumentError."""
    import diffusers

    if not isinstance(name, str) or not name.strip():
        raise InvalidArgumentError(
            f"scheduler must be a diffusers scheduler class name such as 'EulerDiscreteScheduler', not {name!r}."
        )
    name = name.strip()
    known = _known_schedulers()
    if name not in known:
        close = [k for k in known if k.lower() == name.lower()] or difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InvalidArgumentError(f"Unknown scheduler {name!r}.{hint} Known: {', '.join(known)}.")
    cls = getattr(diffusers, name)
    if (
        type(cls).__name__ == "DummyObject"
    ):  # diffusers' placeholder for a class whose extra packages are missing
        missing = [b for b in getattr(cls, "_backends", []) if b != "torch"]
        raise InvalidArgumentError(
            f"{name} needs the package(s) {', '.join(missing)}: pip install {' '.join(missing)}."
        )
    return name


def _model_scheduler_class(model: str | os.PathLike[str] | None) -> str | None:
    """The scheduler class a model loads with, read from its files without loading anything (the embedded
    model, a local folder, a hub model already in the cache, a single checkpoint); ``None`` when unknown here."""
    if model is None:
        if not embedded_model_available():
            return "DDIMScheduler"  # the tiny stand-in pipeline's
        config: Path | None = EMBEDDED_MODEL_DIR / "scheduler" / "scheduler_config.json"
    else:
        name = os.fspath(model)
        name = MOVED_MODEL_IDS.get(name, name)
        path = Path(name).expanduser()
        if path.is_file():
            return "PNDMScheduler"  # diffusers gives single SD checkpoints their pipeline's default (SDXL: Euler)
        if path.is_dir():
            config = path / "scheduler" / "scheduler_config.json"
        elif _looks_like_path(name):
            return None
        else:
            from huggingface_hub import try_to_load_from_cache

            try:
                cached = try_to_load_from_cache(name, "scheduler/scheduler_config.json")
            except Exception:  # an id the hub client refuses: loading reports it
                return None
            config = Path(cached) if isinstance(cached, str) else None
    if config is None or not config.is_file():
        return None
    try:
        cls = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (ValueError, OSError, AttributeError):
        return None  # loading reports the broken file
    return cls if isinstance(cls, str) else None


def _refuse_incompatible(name: str, current: str, where: str) -> None:
    allowed = _compatible_schedulers(current)
    if allowed is not None and name not in allowed:
        raise InvalidArgumentError(
            f"{name} cannot drive {where}, whose scheduler is {current} (a different kind of noise schedule). "
            f"Use one of: {', '.join(sorted(allowed))}."
        )


def check_scheduler_name(name: str, model: str | os.PathLike[str] | None = None) -> str:
    """Check a scheduler class name against a model before loading it; returns the name.

    Reads only the model's scheduler config (``model`` as :func:`load_pipeline` takes it: ``None`` for the
    embedded model, a folder, a cached hub id or a single checkpoint). An unknown name, one whose extra
    packages are missing, or one that cannot drive the model (``FlowMatchEulerDiscreteScheduler`` on a
    DDPM-type UNet model) raises :class:`~sdexplore.errors.InvalidArgumentError` listing what is accepted. A hub
    model not yet downloaded is checked by name only (the pipeline is checked again once loaded).
    """
    _check_model_argument(model)
    name = _checked_scheduler_name(name)
    current = _model_scheduler_class(model)
    if current is not None:
        _refuse_incompatible(name, current, "the embedded model" if model is None else f"{os.fspath(model)}")
    return name


def set_scheduler(pipe: Any, name: str, **config: Any) -> Any:
    """Replace ``pipe.scheduler`` by the diffusers scheduler class ``name``, built from the current config with
    ``config`` overrides; returns the new scheduler.

    The name, its compatibility with the model and every option are checked first: on any
    :class:`~sdexplore.errors.InvalidArgumentError` the pipeline keeps its scheduler.
    """
    import diffusers

    current = getattr(pipe, "scheduler", None)
    if current is None or not hasattr(current, "config"):
        raise UnsupportedPipelineError(f"{type(pipe).__name__} has no diffusers scheduler to replace.")
    name = _checked_scheduler_name(name)
    _refuse_incompatible(name, type(current).__name__, f"this {type(pipe).__name__}")
    cls = getattr(diffusers, name)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(config) - set(params) - {"self"})
        if unknown:
            options = ", ".join(p for p in params if p != "self")
            raise InvalidArgumentError(
                f"{name} has no option {', '.join(unknown)}; its options are: {options}."
            )
    try:
        scheduler = cls.from_config(current.config, **config)
    except (ValueError, TypeError, KeyError, NotImplementedError) as error:
        raise InvalidArgumentError(f"{name} cannot be built with {config}: {error}") from error
    pipe.scheduler = scheduler
    return scheduler
