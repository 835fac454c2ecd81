"""Edit: what :func:`sdexplore.edit` returns, as plain data (the two images and the maps of both runs)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .attention_maps import AttentionMaps


@dataclass
class Edit:
    """The source and the edited images of one attention edit, with the attention that made each.

    ``source`` and ``edited`` are PIL images (lists when the call made several images per branch), generated in
    one batched call from the same initial latents. ``source_maps`` / ``edited_maps`` are the cross-attention maps
    of each branch (:class:`AttentionMaps`; the edited ones are the probabilities after the edit), or None when
    maps were not recorded. ``settings`` records the edit (prompts, controls, steps, guidance).
    """

    source: Any
    edited: Any
    source_prompt: str | list[str]
    edited_prompt: str | list[str]
    source_maps: AttentionMaps | None = None
    edited_maps: AttentionMaps | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def take_images(maps: AttentionMaps, rows: slice) -> AttentionMaps:
    """The maps of images ``rows`` of a batch (every per-image field sliced; views of the same tensors)."""

    def per(d: dict | None, lead: int = 0) -> dict | None:
        if d is None:
            return None
        return {k: (v[rows] if lead == 0 else v[:, rows]) for k, v in d.items()}

    return replace(
        maps,
        aggregate=maps.aggregate[rows],
        layers=per(maps.layers),  # type: ignore[arg-type]
        token_lists=maps.token_lists[rows],
        steps=None if maps.steps is None else maps.steps[:, rows],
        layer_heads=per(maps.layer_heads),
        probs=per(maps.probs, 1),
        negative=None if maps.negative is None else take_images(maps.negative, rows),
        concept_aggregate=None if maps.concept_aggregate is None else maps.concept_aggregate[rows],
        concept_layers=per(maps.concept_layers),
        concept_steps=None if maps.concept_steps is None else maps.concept_steps[:, rows],
    )
