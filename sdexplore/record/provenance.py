"""Read a pipeline call's provenance as it starts: the model, the scheduler, the seed(s), the prompts.

Recorders keep it with their results (:mod:`sdexplore.results.provenance` says what each field means), so a saved
result or page says what made it without the caller repeating it. Everything is read from the pipeline's config
and the call's own arguments on the host: no device work, no change to the call (a generator's state is read,
never advanced).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

#: The package's own model folders (sdexplore/models/<name>/): a pipeline loaded from one is named by its folder.
_EMBEDDED_MODELS = (Path(__file__).resolve().parent.parent / "models").resolve()


def model_name(pipe: Any) -> str | None:
    """The model a pipeline was loaded from: an embedded model's name (``"tiny-shapes"``), else its hub id or
    folder (``pipe.config._name_or_path``); None for a pipeline built in code."""
    path = getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not path:
        return None
    path = str(path)
    try:
        folder = Path(path).resolve()
    except (OSError, RuntimeError):
        return path
    return folder.name if folder.parent == _EMBEDDED_MODELS and folder.is_dir() else path


def _fresh(gen: torch.Generator) -> bool:
    """Whether ``gen`` is still at its seed's start (nothing drawn since ``manual_seed``): its state against a new
    generator's of the same seed. Host reads only (a CUDA generator's state is its seed and offset)."""
    try:
        new = torch.Generator(device=gen.device)
        new.manual_seed(gen.initial_seed())
        return torch.equal(new.get_state(), gen.get_state())
    except (RuntimeError, TypeError):  # a device whose generators cannot be compared: assume fresh
        return True


def seeds(generator: Any) -> tuple[int | list[int] | None, bool]:
    """(seed, used): ``generator.initial_seed()`` (a list for a list of generators; None without a torch
    generator), and whether some generator had drawn numbers already (then its seed alone does not replay it)."""
    if isinstance(generator, torch.Generator):
        return int(generator.initial_seed()), not _fresh(generator)
    if (
        isinstance(generator, (list, tuple))
        and generator
        and all(isinstance(g, torch.Generator) for g in generator)
    ):
        return [int(g.initial_seed()) for g in generator], not all(_fresh(g) for g in generator)
    return None, False


def _text(value: Any) -> str | list[str] | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return None  # prompt embeddings, or nothing


def call_provenance(
    pipe: Any, arguments: dict[str, Any], scheduler: Any, *, skip: Collection[str] = ()
) -> dict[str, Any]:
    """The provenance of one pipeline call (``arguments``: the call's arguments by name, as a
    :class:`~sdexplore.record.attach.Run` holds them), without the fields named in ``skip``. ``seed`` is always
    present (None: no generator); ``generator_used`` and ``latents_given`` only where true."""
    seed, used = seeds(arguments.get("generator"))
    prov: dict[str, Any] = {
        "model": model_name(pipe),
        "scheduler": type(scheduler).__name__ if scheduler is not None else None,
        "prompt": _text(arguments.get("prompt")),
        "negative_prompt": _text(arguments.get("negative_prompt")),
    }
    prov = {k: v for k, v in prov.items() if v is not None and k not in skip}
    prov["seed"] = seed
    if used:
        prov["generator_used"] = True
    if arguments.get("latents") is not None:
        prov["latents_given"] = True
    return prov
