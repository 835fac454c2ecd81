"""generate(pipe, prompt, ...): run the pipeline once under observe() and return images with the Observation."""

from __future__ import annotations

from typing import Any

import torch

from ._checks import check_seed, check_size
from .errors import InvalidArgumentError
from .families import detect_family
from .record.observe import observe
from .results.observation import Observation


def generate(
    pipe: Any,
    prompt: str | list[str],
    *,
    steps: bool | dict = True,
    attention: bool | dict = False,
    seed: int | None = None,
    **pipe_kwargs: Any,
) -> tuple[Any, Observation]:
    """Call ``pipe(prompt, **pipe_kwargs)`` inside :func:`sdexplore.observe` and return ``(images, obs)``.

    ``images`` is exactly the pipeline output's ``.images`` — a list of PIL images by default (one per
    prompt × ``num_images_per_prompt``; use ``images[0]`` for a single prompt), a numpy array for
    ``output_type="np"``; a video pipeline's ``.frames`` (Wan: one clip of frames per prompt). ``obs`` is the
    :class:`~sdexplore.results.observation.Observation` (``obs.steps``, ``obs.attention``). ``seed`` (a whole
    number from 0 to 2**64 − 1, checked before any work) is a shortcut for
    ``generator=torch.Generator("cpu").manual_seed(seed)`` (a CPU generator gives the same image on every
    device); ``steps`` / ``attention`` take the same values as in :func:`sdexplore.observe`. The prompt is passed
    by keyword (Flux.2 [klein]'s first argument is a reference image). The family's call defaults
    (``Family.call_defaults``: PixArt-Σ and Sana without resolution binning, whose aspect-ratio tables start at
    256 pixels, and without caption cleaning) apply unless given. Every other keyword goes to the pipeline
    unchanged; ``height`` / ``width`` are checked first (:func:`sdexplore._checks.check_size`: multiples the
    pipeline takes, at most an SD3 transformer's limit, 64 pixels for ``tiny-shapes-mmdit``).
    """
    check_size(
        pipe, pipe_kwargs.get("height"), pipe_kwargs.get("width")
    )  # a size it cannot draw: before work
    if seed is not None:
        if "generator" in pipe_kwargs:
            raise InvalidArgumentError("Pass either seed= or generator=, not both.")
        pipe_kwargs["generator"] = torch.Generator("cpu").manual_seed(check_seed(seed))
    pipe_kwargs = {**dict(detect_family(pipe).call_defaults), **pipe_kwargs}
    with observe(pipe, steps=steps, attention=attention) as obs:
        out = pipe(prompt=prompt, **pipe_kwargs)
    return (out.frames if hasattr(out, "frames") else out.images), obs
