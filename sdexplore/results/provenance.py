"""Provenance: what made a recorded result (model, scheduler, seed, prompt, settings), kept with it.

:mod:`sdexplore.record.provenance` reads it from a pipeline call as the call starts; a :class:`~.trace.Trace` keeps it
in ``meta["provenance"]`` and :class:`~.attention_maps.AttentionMaps` in ``provenance`` (each without the fields
it already holds: a trace's scheduler, steps and guidance scale; the maps' prompt, in their token lists). Files
saved before provenance was kept have none: every field is optional, and a missing one means "not recorded".
"""

from __future__ import annotations

from typing import Any

from . import fileformat as ff

#: The fields a provenance dict may hold, with what each means.
FIELDS: dict[str, str] = {
    "model": "the model: an embedded model's name, a hub id or a folder (absent: a pipeline built in code)",
    "scheduler": "the scheduler's class name",
    "seed": "initial_seed() of the call's torch.Generator; a list for a list of generators; null: no generator",
    "generator_used": "true: a generator had drawn numbers before the call, so its seed alone does not replay it",
    "latents_given": "true: the call was given its starting latents (latents=)",
    "prompt": "the call's prompt, or its list of prompts",
    "negative_prompt": "the call's negative prompt, or its list",
    "steps": "the number of denoising steps the call ran",
    "guidance_scale": "the call's classifier-free guidance scale",
    "size": "[H, W]: the generated image's size in pixels",
}


def check(c: ff.Checker, value: Any, field: str) -> dict[str, Any]:
    """A saved provenance dict, every field of :data:`FIELDS` type-checked (ResultFileError naming the field)."""
    prov = c.dict(value, field)
    unknown = sorted(set(prov) - set(FIELDS))
    if unknown:
        c.fail(f"{field}.{unknown[0]}", "is not a field of a provenance record")
    for key in ("model", "scheduler"):
        if prov.get(key) is not None:
            c.str(prov[key], f"{field}.{key}")
    seed = prov.get("seed")
    for i, s in enumerate(seed if isinstance(seed, list) else [] if seed is None else [seed]):
        c.int(s, f"{field}.seed" + (f"[{i}]" if isinstance(seed, list) else ""), lo=0)
    for key in ("generator_used", "latents_given"):
        if key in prov:
            c.bool(prov[key], f"{field}.{key}")
    for key in ("prompt", "negative_prompt"):
        text = prov.get(key)
        if isinstance(text, list):
            for i, p in enumerate(text):
                c.str(p, f"{field}.{key}[{i}]")
        elif text is not None:
            c.str(text, f"{field}.{key}")
    if "steps" in prov:
        c.int(prov["steps"], f"{field}.steps", lo=0)
    if "guidance_scale" in prov:
        c.number(prov["guidance_scale"], f"{field}.guidance_scale")
    if "size" in prov:
        for i, v in enumerate(c.list(prov["size"], f"{field}.size", length=2)):
            c.int(v, f"{field}.size[{i}]", lo=1)
    return prov


def _of_image(value: Any, index: int, images: int) -> Any:
    """A per-prompt (or per-image) list's entry for image ``index`` of ``images``; anything else as it is."""
    if not isinstance(value, list):
        return value
    if value and images % len(value) == 0 and 0 <= index < images:
        return value[index // (images // len(value))]  # each prompt repeated num_images_per_prompt times
    return value


def seed_of_image(
    prov: dict[str, Any], index: int, images: int, *, notes: bool = True
) -> int | str | list[int] | None:
    """What a page says of image ``index``'s seed: its generator's seed (one of a list of generators' seeds),
    ``"unseeded"`` (no generator), ``"latents given"`` (no generator, starting latents passed), with a note where
    the seed alone does not replay the call; None where no seed was recorded (files from before provenance).
    ``notes=False``: the seed alone, None without one (for a caller that drew the latents from that generator
    itself, as :func:`sdexplore.edit` does)."""
    if "seed" not in prov:
        return None
    seed = _of_image(prov["seed"], index, images)
    if not notes:
        return seed
    if seed is None:
        return "latents given" if prov.get("latents_given") else "unseeded"
    if prov.get("latents_given"):
        return f"{seed} (latents given)"
    if prov.get("generator_used"):
        return f"{seed} (generator used before the call)"
    return seed


def of_image(prov: dict[str, Any], index: int, images: int) -> dict[str, Any]:
    """The provenance of image ``index`` of a call that made ``images`` images: the prompt and negative prompt of
    its prompt, its seed as :func:`seed_of_image` tells it; the other fields as recorded."""
    out = {k: v for k, v in prov.items() if k not in ("generator_used", "latents_given")}
    for key in ("prompt", "negative_prompt"):
        if key in out:
            out[key] = _of_image(out[key], index, images)
    if "seed" in prov:
        out["seed"] = seed_of_image(prov, index, images)
    return out


def take_images(prov: dict[str, Any], rows: slice, images: int) -> dict[str, Any]:
    """The provenance of images ``rows`` of a call's ``images``: per-image seeds and per-prompt prompts sliced
    with them (a per-prompt list that ``rows`` would cut inside a prompt's images is dropped: unknown)."""
    start, stop, step = rows.indices(images)
    out = dict(prov)
    for key in ("seed", "prompt", "negative_prompt"):
        value = prov.get(key)
        if not isinstance(value, list) or not value:
            continue
        per, rest = divmod(images, len(value))  # images per entry
        if rest == 0 and step == 1 and start % per == 0 and stop % per == 0:
            out[key] = value[start // per : stop // per]
        else:
            out.pop(key)
    return out
