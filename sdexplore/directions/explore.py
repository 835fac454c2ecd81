"""Walking along a direction (frames at strengths −s…s, a :class:`~sdexplore.results.Walk`) and naming it.

Naming reads what changes when the direction is applied: the words whose cross-attention maps move most (any
model), and on the embedded models the scene reading (colour, place, kind, size, background).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import InvalidArgumentError, SelectionError, WordNotFoundError
from ..results.directions import DirectionData
from ..results.walk import Walk
from .apply import check_family, check_strength

#: What the scene reading names: attribute → how a change is seen between two readings.
SCENE_ATTRIBUTES = ("colour", "place", "kind", "size", "background")
_SIZE_PX = (
    3.0  # sqrt(area) change in pixels that counts as a size change (small ≈ 9 px, big ≈ 15 px at 64×64)
)


def _generator(pipe: Any, seed: int) -> torch.Generator:
    device = check_family(pipe).get_denoiser(pipe).device
    return torch.Generator("cpu" if device.type == "mps" else device).manual_seed(seed)


def render(
    pipe: Any,
    direction: DirectionData,
    prompts: list[str],
    seeds: list[int],
    strength: float,
    steps: Sequence[int] | None = None,
    **call: Any,
) -> list[np.ndarray]:
    """Images (H, W, 3) uint8 of ``prompts`` (each with its seed, one batch) with ``direction`` at ``strength``."""
    from . import apply

    gens = [_generator(pipe, s) for s in seeds]
    with apply(pipe, [(direction, strength)], steps=steps):
        out = pipe(prompt=list(prompts), generator=gens, output_type="np", **call).images
    return [np.clip(np.round(im * 255), 0, 255).astype(np.uint8) for im in out]


def walk(
    pipe: Any,
    direction: DirectionData,
    prompt: str,
    *,
    strength: float = 1.0,
    frames: int = 9,
    seed: int = 0,
    steps: Sequence[int] | None = None,
    **call: Any,
) -> Walk:
    """Frames of ``prompt`` from ``seed`` at strengths evenly spaced from −``strength`` to +``strength``.

    The middle frame (odd ``frames``) is the plain image. Returned as a :class:`~sdexplore.results.Walk`
    (its two keyframes are the ends), so ``save_gif``, ``save_mp4``, ``save_grid`` and ``save`` work as for any
    walk; ``settings["strengths"]`` lists each frame's strength.
    """
    check_family(pipe)
    strength = check_strength(strength)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise InvalidArgumentError(f"frames must be an int ≥ 2, got {frames!r}.")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidArgumentError("prompt must be a non-empty prompt string.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InvalidArgumentError(f"seed must be an int ≥ 0, got {seed!r}.")
    strengths = np.linspace(-strength, strength, frames).tolist()
    images = [render(pipe, direction, [prompt], [seed], s, steps, **call)[0] for s in strengths]
    fam = check_family(pipe)
    return Walk(
        images=np.stack(images),  # (frames, H, W, 3)
        prompts=[prompt, prompt],
        seeds=[seed, seed],
        segments=[0] * frames,
        ts=[i / (frames - 1) for i in range(frames)],
        keyframe_frames=[0, frames - 1],
        settings={
            "family": fam.name,
            "height": int(images[0].shape[0]),
            "width": int(images[0].shape[1]),
            "direction": repr(direction),
            "strengths": strengths,
            **{k: v for k, v in call.items() if isinstance(v, (int, float, str))},
        },
    )


def scene_changes(before: np.ndarray, after: np.ndarray) -> dict[str, bool]:
    """Which scene attributes differ between two images of the embedded world (read by the scene reader)."""
    from ..embedded.scenes import read_scene

    a, b = read_scene(before), read_scene(after)
    return {
        "colour": a.colour != b.colour,
        "place": a.place != b.place,
        "kind": a.shape != b.shape,
        "size": abs(a.size_px - b.size_px) > _SIZE_PX,
        "background": a.background != b.background,
    }


def name(
    pipe: Any,
    direction: DirectionData,
    prompts: str | Sequence[str],
    *,
    seeds: Sequence[int] = (0, 1),
    strength: float = 1.0,
    scene: bool | None = None,
    attention: bool = True,
    top: int = 3,
    **call: Any,
) -> dict[str, Any]:
    """What the direction changes, read at ±``strength`` against the plain images of ``prompts`` × ``seeds``.

    Returns ``{"scene": {attribute: fraction changed}, "label": the attribute changed most (or None),
    "words": [(word, change), ...]}``: ``scene`` (default: on the embedded models, which the scene reader knows)
    reads colour, place, kind, size and background; ``attention`` ranks the prompt's words by how much their
    cross-attention maps (UNet families) move, the ``top`` first (mean absolute change of the word's map,
    normalised by the map's mean).
    """
    fam = check_family(pipe)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InvalidArgumentError("prompts must be a prompt or a non-empty list of prompts.")
    strength = check_strength(strength)
    if scene is None:
        path = str(getattr(getattr(pipe, "config", None), "_name_or_path", "") or "")
        scene = "tiny-shapes" in path
    flat_p = [p for p in prompts for _ in seeds]
    flat_s = [s for _ in prompts for s in seeds]
    result: dict[str, Any] = {"scene": None, "label": None, "words": []}
    if scene:
        plain = render(pipe, direction, flat_p, flat_s, 0.0, **call)
        counts = dict.fromkeys(SCENE_ATTRIBUTES, 0)
        total = 0
        for s in (strength, -strength):
            for a, b in zip(plain, render(pipe, direction, flat_p, flat_s, s, **call), strict=True):
                total += 1
                for k, v in scene_changes(a, b).items():
                    counts[k] += int(v)
        fractions = {k: v / total for k, v in counts.items()}
        result["scene"] = fractions
        best = max(fractions, key=lambda k: fractions[k])
        result["label"] = best if fractions[best] > 0 else None
    if attention and fam.denoiser == "unet":
        result["words"] = _moving_words(pipe, direction, flat_p, flat_s, strength, top, call)
    return result


def _moving_words(
    pipe: Any,
    direction: DirectionData,
    prompts: list[str],
    seeds: list[int],
    strength: float,
    top: int,
    call: dict,
) -> list[tuple[str, float]]:
    from ..record.observe import observe
    from . import apply

    def maps(s: float) -> Any:
        with observe(pipe, steps=False, attention=True) as obs, apply(pipe, [(direction, s)]):
            pipe(prompt=prompts, generator=[_generator(pipe, x) for x in seeds], output_type="latent", **call)
        return obs.attention

    base, moved = maps(0.0), maps(strength)
    change: dict[str, list[float]] = {}
    for i in range(base.num_images):
        for word in dict.fromkeys(base.token_lists[i].words):
            try:
                a = base.word(word, index=i)
                b = moved.word(word, index=i)
            except (WordNotFoundError, SelectionError):  # a word the token list cannot pick alone: skip it
                continue
            a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            change.setdefault(word, []).append(float(np.abs(b - a).mean() / max(np.abs(a).mean(), 1e-12)))
    ranked = sorted(((w, float(np.mean(v))) for w, v in change.items()), key=lambda x: -x[1])
    return ranked[:top]
