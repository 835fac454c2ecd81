"""A semantic direction as plain data (what :mod:`sdexplore.directions` finds), saved in the results' file format.

A direction is a shift in one space of one model family:

- ``space="text"``: a per-token shift of the conditional prompt embedding ``embeds`` (T, D) and, on families with a
  pooled text vector (SDXL, SD3, Flux), of the pooled embedding ``pooled`` (P,);
- ``space="inner"``: a shift of the image stream at one attention layer of the denoiser (``layer``, a module
  name), ``shift`` (2, HW, C): row 0 for the unconditional half of a CFG batch, row 1 for the conditional half;
- ``space="latent"``: a move of the latents x_t at the start of ``steps`` (a Jacobian direction, Park et al.
  2023), ``shift`` (C, h, w); ``layer`` names the attention layer whose output it changes most.

Nothing here needs a pipeline: a saved direction loads and describes itself without diffusers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import fileformat as ff

_FORMAT = "sdexplore.direction"
SPACES = ("text", "inner", "latent")
METHODS = ("pairs", "pca", "jacobian")
_FIELDS = {
    "format",
    "version",
    "space",
    "method",
    "family",
    "layer",
    "steps",
    "num_steps",
    "pairs",
    "seeds",
    "variance_explained",
    "label",
    "settings",
}


@dataclass
class DirectionData:
    """A found direction: its tensors and how it was found (see the module docstring for the spaces)."""

    space: str  # "text" | "inner" | "latent"
    method: str  # "pairs" (difference of means) | "pca" | "jacobian"
    family: str  # the family name it was found on ("sd1", "sd3", ...): a direction only fits its own model
    embeds: torch.Tensor | None = None  # text: (T, D) shift of the conditional prompt embedding
    pooled: torch.Tensor | None = None  # text: (P,) shift of the pooled embedding (families that have one)
    shift: torch.Tensor | None = None  # inner: (2, HW, C) shift of the layer's image stream (uncond, cond);
    # latent: (C, h, w) move of x_t
    layer: str | None = (
        None  # inner: the attention module whose image-stream output is shifted (latent: measured)
    )
    steps: list[int] | None = None  # the steps it was averaged over (and applied at by default); None: all
    num_steps: int = 0  # inner: steps of the runs it was found from (0 for text)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # the (from, to) prompt pairs (method "pairs")
    seeds: list[int] = field(default_factory=list)  # the seeds of the runs it was found from (inner)
    variance_explained: float | None = None  # pca / jacobian: the component's share of the variance
    label: str | None = None  # a name ("colour", "place", ...), from naming or given by the user
    settings: dict[str, Any] = field(default_factory=dict)  # guidance, size, prompts, ... of the finding runs

    def __post_init__(self) -> None:
        if self.space not in SPACES or self.method not in METHODS:
            raise ValueError(f"space must be one of {SPACES} and method one of {METHODS}")

    def __repr__(self) -> str:
        where = {
            "inner": f"at {self.layer}",
            "latent": f"on x_t at step {self.steps}, seen at {self.layer}",
        }.get(self.space, "on the prompt embedding")
        tail = f", {len(self.pairs)} pairs" if self.pairs else ""
        if self.variance_explained is not None:
            tail += f", {self.variance_explained:.1%} of the variance"
        name = f"{self.label!r}, " if self.label else ""
        return f"{type(self).__name__}({name}{self.space} {where}, {self.method} on {self.family}{tail})"

    @property
    def norm(self) -> float:
        """Size of the shift (Frobenius norm over every tensor it holds)."""
        parts = [t for t in (self.embeds, self.pooled, self.shift) if t is not None]
        return math.sqrt(sum(float(t.double().square().sum()) for t in parts))

    # ---- save / load --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save as one safetensors file with a checksummed JSON header (the results' file format; never pickle).

        Written atomically; returns the path. :func:`sdexplore.directions.load` reads it back."""
        tensors = {
            name: t.detach().cpu().contiguous()
            for name in ("embeds", "pooled", "shift")
            if (t := getattr(self, name)) is not None
        }
        header = {
            "format": _FORMAT,
            "version": ff.VERSION,
            "space": self.space,
            "method": self.method,
            "family": self.family,
            "layer": self.layer,
            "steps": self.steps,
            "num_steps": self.num_steps,
            "pairs": [list(p) for p in self.pairs],
            "seeds": list(self.seeds),
            "variance_explained": self.variance_explained,
            "label": self.label,
            "settings": self.settings,
        }
        return ff.save_result(Path(path), _FORMAT, header, tensors)

    @classmethod
    def load(cls, path: str | Path) -> DirectionData:
        """Load a direction written by :meth:`save`; every field, shape and checksum is checked (damage raises
        :class:`~sdexplore.errors.ResultFileError` naming the field)."""
        rf = ff.read_result(path, _FORMAT, "direction")
        check, header, tensors = rf.check, rf.header, rf.tensors
        unknown = sorted(set(header) - _FIELDS - {ff.TABLE, ff.HEADER_SUM})
        if unknown:
            check.fail(f"field {unknown[0]!r}", "is not a field of a saved direction")
        space = check.str(check.get(header, "space", "space"), "space", choices=SPACES)
        method = check.str(check.get(header, "method", "method"), "method", choices=METHODS)
        family = check.str(check.get(header, "family", "family"), "family")
        ff.family_of(check, family, "family")
        layer = header.get("layer")
        if space == "inner":
            layer = check.str(layer, "layer")
            ff.require_tensors(check, tensors, {"shift"})
            ff.check_tensor(check, "shift", tensors["shift"], (2, None, None), floating=True)  # (2, HW, C)
        elif space == "latent":
            layer = check.str(layer, "layer")
            ff.require_tensors(check, tensors, {"shift"})
            ff.check_tensor(check, "shift", tensors["shift"], (None, None, None), floating=True)  # (C, h, w)
        else:
            if layer is not None:
                check.fail("layer", "must be null for a text direction")
            names = {"embeds"} | ({"pooled"} if "pooled" in tensors else set())
            ff.require_tensors(check, tensors, names)
            ff.check_tensor(check, "embeds", tensors["embeds"], (None, None), floating=True)  # (T, D)
            if "pooled" in tensors:
                ff.check_tensor(check, "pooled", tensors["pooled"], (None,), floating=True)  # (P,)
        for name, t in tensors.items():
            if not bool(torch.isfinite(t).all()):
                check.fail(f"tensor {name!r}", "holds NaN or infinite values")
        steps = header.get("steps")
        if steps is not None:
            steps = [check.int(s, f"steps[{i}]", lo=0) for i, s in enumerate(check.list(steps, "steps"))]
        num_steps = check.int(check.get(header, "num_steps", "num_steps"), "num_steps", lo=0)
        pairs = []
        for i, p in enumerate(check.list(check.get(header, "pairs", "pairs"), "pairs")):
            a, b = check.list(p, f"pairs[{i}]", length=2)
            pairs.append((check.str(a, f"pairs[{i}][0]"), check.str(b, f"pairs[{i}][1]")))
        seeds = [
            check.int(s, f"seeds[{i}]") for i, s in enumerate(check.list(header.get("seeds", []), "seeds"))
        ]
        ve = header.get("variance_explained")
        if ve is not None:
            ve = check.number(ve, "variance_explained")
        label = header.get("label")
        if label is not None:
            label = check.str(label, "label")
        settings = check.dict(check.get(header, "settings", "settings"), "settings")
        rf.verify_checksums()
        return cls(
            space=space,
            method=method,
            family=family,
            embeds=tensors.get("embeds"),
            pooled=tensors.get("pooled"),
            shift=tensors.get("shift"),
            layer=layer,
            steps=steps,
            num_steps=num_steps,
            pairs=pairs,
            seeds=seeds,
            variance_explained=ve,
            label=label,
            settings=settings,
        )
