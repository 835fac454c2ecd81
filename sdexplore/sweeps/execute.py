"""One sweep batch through the pipeline under ``sdexplore.observe``: image, word maps, step summaries, scene."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .plan import SweepItem

IMAGE = "image.png"
MAPS = "maps.safetensors"
STEPS = "steps.json"
SCENE = "scene.json"


def run_batch(
    pipe: Any, items: Sequence[SweepItem], call_kwargs: dict[str, Any], keep: Sequence[str], scene: bool
) -> list[tuple[dict[str, bytes], dict[str, Any]]]:
    """Generate ``items`` in one pipeline call (seed each from its own CPU generator) and return, per item, its
    files (name → bytes) and its index figures. Observation never changes the image.

    ``scene``: the embedded model's world: read each image back with the scene scorer and measure the shape
    word's attention IoU exactly as the model card does (:mod:`sdexplore.embedded.evaluate`).
    """
    from ..record.observe import observe

    want_maps = "maps" in keep or scene
    want_steps = "trace-summary" in keep
    kwargs = dict(call_kwargs)
    kwargs["prompt"] = [it.prompt for it in items]
    kwargs["generator"] = [torch.Generator().manual_seed(it.seed) for it in items]
    kwargs["output_type"] = "np"
    if any(it.negative_prompt for it in items):
        kwargs["negative_prompt"] = [it.negative_prompt or "" for it in items]
    maps = trace = None
    if want_maps or want_steps:
        with observe(
            pipe,
            steps={"quantities": ("x0", "noise_norm")} if want_steps else False,
            attention={"step_resolution": None} if want_maps else False,
        ) as obs:
            images = pipe(**kwargs).images  # (n, H, W, 3) float in [0, 1]
        maps = obs.attention if want_maps else None
        trace = obs.steps if want_steps else None
    else:
        images = pipe(**kwargs).images
    images = (np.asarray(images) * 255).round().astype(np.uint8)  # as diffusers' numpy_to_pil
    scenes = _scene_figures(pipe, items, images, maps) if scene else [None] * len(items)
    out = []
    for i, item in enumerate(items):
        files: dict[str, bytes] = {}
        row: dict[str, Any] = {}
        if "images" in keep:
            files[IMAGE] = _png(images[i])
        if maps is not None and "maps" in keep:
            word_maps = maps.word_maps(list(item.words) if item.words else None, index=i)  # word → (h, w)
            files[MAPS] = _safetensors(word_maps, item)
            row["maps"] = {w: _map_stats(m) for w, m in word_maps.items()}
        if trace is not None:
            summary = _step_summary(trace, i)
            files[STEPS] = (json.dumps(summary, indent=1) + "\n").encode()
            row["final_x0_change"] = summary[-1]["x0_change"] if summary else None
        if scenes[i] is not None:
            files[SCENE] = (json.dumps(scenes[i], indent=1, sort_keys=True) + "\n").encode()
            row.update(
                {k: scenes[i][k] for k in ("colour", "background", "shape", "place", "all", "read", "iou")}
            )
        out.append((files, row))
    return out


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _safetensors(word_maps: dict[str, torch.Tensor], item: SweepItem) -> bytes:
    from safetensors.torch import save

    tensors = {w: m.float().contiguous().cpu() for w, m in word_maps.items()}
    # one metadata key: safetensors writes several in hash order, which differs between processes
    meta = json.dumps(
        {"format": "sdexplore.sweep.word_maps", "prompt": item.prompt, "seed": item.seed}, sort_keys=True
    )
    return save(tensors, metadata={"sdexplore": meta})


def _map_stats(m: torch.Tensor) -> dict[str, float]:
    """Raw attention mass (mean over pixels), peak, and area: the fraction of pixels above half-way between the
    map's minimum and maximum (how spread out the word's attention is)."""
    m = m.float()
    lo, hi = float(m.min()), float(m.max())
    area = float(((m - lo) / (hi - lo) > 0.5).float().mean()) if hi > lo else 1.0
    return {"mass": float(m.mean()), "peak": hi, "area": area}


def _step_summary(trace: Any, i: int) -> list[dict[str, Any]]:
    """Per step of image ``i``: timestep, noise level, CFG scale, RMS of the guided model output, RMS of x0's
    change since the previous step (how much the predicted image still moves)."""
    out, previous = [], None
    for record in trace:
        x0 = record.x0[i].float()  # (C, h, w)
        change = None if previous is None else float((x0 - previous).pow(2).mean().sqrt())
        previous = x0
        out.append(
            {
                "step": record.index,
                "timestep": record.timestep,
                "sigma": record.sigma if math.isfinite(record.sigma) else None,
                "guidance_scale": record.guidance_scale,
                "noise_norm": float(record.noise_norm[i]),
                "x0_rms": float(x0.pow(2).mean().sqrt()),
                "x0_change": change,
            }
        )
    return out


def _scene_figures(
    pipe: Any, items: Sequence[SweepItem], images: np.ndarray, maps: Any
) -> list[dict[str, Any] | None]:
    """The scene scorer's reading and score and the shape word's IoU (None for prompts outside the world)."""
    from ..embedded import scenes
    from ..embedded.evaluate import attention_iou, shape_token_index, shape_word_maps

    parsed = []
    for item in items:
        try:
            parsed.append(scenes.parse_prompt(item.prompt))
        except ValueError:
            parsed.append(None)
    token_index = [
        shape_token_index(pipe, it.prompt) if p else 0 for it, p in zip(items, parsed, strict=True)
    ]
    shape_maps = shape_word_maps(maps, token_index).cpu().numpy()  # (n, H, W)
    out: list[dict[str, Any] | None] = []
    for i, params in enumerate(parsed):
        if params is None:
            out.append(None)
            continue
        reading = scenes.read_scene(images[i])
        score = scenes.score_image(images[i], params)
        out.append(
            {
                **score,
                "all": all(v for v in score.values() if v is not None),
                "read": reading.as_params().prompt(),
                "reading": {
                    "colour": reading.colour,
                    "background": reading.background,
                    "shape": reading.shape,
                    "place": reading.place,
                    "size_px": reading.size_px,
                    "fill_ratio": reading.fill_ratio,
                },
                "shape_word": params.shape,
                "iou": attention_iou(shape_maps[i], reading.mask),
            }
        )
    return out
