"""Trace and StepRecord: the plain-data result of recording a denoising run, with safetensors + JSON save/load."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ._files import as_ordinary_file
from .errors import ResultFileError

#: Tensor quantities a step can hold, with their shapes (B = images in the batch).
TENSOR_FIELDS: tuple[str, ...] = (
    "latents",  # (B, C, h, w) latents entering the step
    "latents_out",  # (B, C, h, w) latents leaving the step (the scheduler's prev_sample, after edits)
    "noise_uncond",  # (B, C, h, w) unconditional model output (CFG only)
    "noise_cond",  # (B, C, h, w) conditional model output (the whole output without CFG)
    "noise_pred",  # (B, C, h, w) guided model output, as given to scheduler.step
    "x0",  # (B, C, h, w) predicted clean latent
    "preview",  # (B, h, w, 3) uint8 linear latent → RGB preview
    "decoded",  # (B, H, W, 3) uint8 VAE / tiny-autoencoder decode
    "noise_norm",  # (B,) float32 RMS of the guided model output
)
_FORMAT = "sdexplore.trace"
_VERSION = 1


@dataclass
class StepRecord:
    """Everything recorded about one denoising step (one ``scheduler.step`` call).

    Tensors are ``None`` where that quantity was not recorded (see ``StepRecorder(quantities=...)``).
    """

    index: int  # step index in the run (0-based loop index; with every=k only multiples of k are kept)
    timestep: float  # the timestep given to the UNet and the scheduler
    sigma: float  # VE noise scale of this evaluation: sqrt((1 - alpha_bar) / alpha_bar)
    alpha_bar: float  # VP signal fraction of this evaluation
    guidance_scale: float  # effective CFG scale at this step (after any guidance schedule)
    x0_source: str = "none"  # "scheduler" (its pred_original_sample), "computed" (schedule_math) or "none"
    latents: torch.Tensor | None = None
    latents_out: torch.Tensor | None = None
    noise_uncond: torch.Tensor | None = None
    noise_cond: torch.Tensor | None = None
    noise_pred: torch.Tensor | None = None
    x0: torch.Tensor | None = None
    preview: torch.Tensor | None = None
    decoded: torch.Tensor | None = None
    noise_norm: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held by this record's tensors."""
        return sum(t.numel() * t.element_size() for t in self._tensors().values())

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in TENSOR_FIELDS if getattr(self, k) is not None}

    def _scalars(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in TENSOR_FIELDS}

    def to(self, device: str | torch.device) -> StepRecord:
        """Move every tensor to ``device`` in place (returns self)."""
        for k, t in self._tensors().items():
            setattr(self, k, t.to(device))
        return self


@dataclass
class Trace:
    """The recorded steps of one pipeline call: a sequence of :class:`StepRecord`.

    ``trace[i]`` is the i-th *recorded* step (negative indices count from the end; with ``every=k`` it is
    run step ``i * k``: use :meth:`at_step` to look up by run step index). Iterable, ``len``-able.
    """

    steps: list[StepRecord] = field(default_factory=list)
    family: str = ""  # "sd1", "sd2", "sdxl"
    scheduler: str = ""  # scheduler class name
    prediction_type: str = "epsilon"
    num_steps: int = 0  # scheduler loop length of the run (len(scheduler.timesteps))
    every: int = 1  # one record every `every` steps
    guidance_scale: float = 1.0  # the pipeline's CFG scale
    stopped_at: int | None = None  # the step the run was stopped after (steering), if any
    final_latents: torch.Tensor | None = None  # (B, C, h, w) latents after the last step (what gets decoded)
    # "ve_latents": latents in variance-exploding form (Euler-type schedulers); "latent_rgb": {"factors": C×3,
    # "bias": 3}, the latent → RGB preview factors the previews were made with
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[StepRecord]:
        return iter(self.steps)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return self.steps[i]
        n = len(self.steps)
        if not isinstance(i, int):
            raise TypeError(f"Trace indices must be int or slice, not {type(i).__name__}.")
        if not -n <= i < n:
            raise IndexError(
                f"Step {i} is out of range: this trace holds {n} recorded steps (indices 0..{n - 1} or -{n}..-1)."
                if n
                else "This trace is empty: no step was recorded (was the pipeline called inside the `with` block?)."
            )
        return self.steps[i]

    def at_step(self, index: int) -> StepRecord:
        """The record of run step ``index`` (raises a clear error if that step was not recorded)."""
        for s in self.steps:
            if s.index == index:
                return s
        kept = [s.index for s in self.steps]
        raise IndexError(
            f"Run step {index} was not recorded; recorded steps: {kept[:8]}{' ...' if len(kept) > 8 else ''} "
            f"(every={self.every})."
        )

    @property
    def indices(self) -> list[int]:
        """Run step index of each record."""
        return [s.index for s in self.steps]

    @property
    def timesteps(self) -> torch.Tensor:
        """(S,) timesteps of the recorded steps."""
        return torch.tensor([s.timestep for s in self.steps], dtype=torch.float32)

    @property
    def sigmas(self) -> torch.Tensor:
        """(S,) VE noise scale per recorded step."""
        return torch.tensor([s.sigma for s in self.steps], dtype=torch.float32)

    @property
    def alpha_bars(self) -> torch.Tensor:
        """(S,) VP signal fraction per recorded step."""
        return torch.tensor([s.alpha_bar for s in self.steps], dtype=torch.float32)

    @property
    def guidance_scales(self) -> torch.Tensor:
        """(S,) effective CFG scale per recorded step."""
        return torch.tensor([s.guidance_scale for s in self.steps], dtype=torch.float32)

    @property
    def nbytes(self) -> int:
        """Bytes held by every recorded tensor (the quantity the memory bound limits)."""
        extra = (
            0
            if self.final_latents is None
            else self.final_latents.numel() * self.final_latents.element_size()
        )
        return sum(s.nbytes for s in self.steps) + extra

    def stack(self, quantity: str) -> torch.Tensor:
        """Stack one quantity over the recorded steps: (S, ...) e.g. ``stack("x0")`` → (S, B, C, h, w)."""
        if quantity not in TENSOR_FIELDS:
            raise ValueError(f"Unknown quantity {quantity!r}; choose one of {', '.join(TENSOR_FIELDS)}.")
        ts = [getattr(s, quantity) for s in self.steps]
        if not ts or any(t is None for t in ts):
            raise ValueError(
                f"{quantity!r} was not recorded at every step of this trace; record it with "
                f"StepRecorder(quantities=(..., {quantity!r}))."
            )
        return torch.stack(ts)

    def quantities(self) -> tuple[str, ...]:
        """Names of the tensor quantities present in the first record."""
        return tuple(self.steps[0]._tensors()) if self.steps else ()

    def to(self, device: str | torch.device) -> Trace:
        """Move every tensor to ``device`` in place (returns self)."""
        for s in self.steps:
            s.to(device)
        if self.final_latents is not None:
            self.final_latents = self.final_latents.to(device)
        return self

    # ---- save / load -------------------------------------------------------------------------------------
    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors by name, JSON-able header): the form saved to disk, reusable inside larger files."""
        tensors: dict[str, torch.Tensor] = {}
        for i, s in enumerate(self.steps):
            for k, t in s._tensors().items():
                tensors[f"step{i}.{k}"] = t.detach().cpu().contiguous()
        if self.final_latents is not None:
            tensors["final_latents"] = self.final_latents.detach().cpu().contiguous()
        header = {
            "format": _FORMAT,
            "version": _VERSION,
            "family": self.family,
            "scheduler": self.scheduler,
            "prediction_type": self.prediction_type,
            "num_steps": self.num_steps,
            "every": self.every,
            "guidance_scale": self.guidance_scale,
            "stopped_at": self.stopped_at,
            "meta": self.meta,
            "steps": [{**s._scalars(), "tensors": sorted(s._tensors())} for s in self.steps],
        }
        return tensors, header

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], header: dict[str, Any], source: str = "") -> Trace:
        """Rebuild a trace from :meth:`to_state` output; a mismatch raises :class:`ResultFileError`."""
        if header.get("format") != _FORMAT:
            raise ResultFileError(
                f"{source or 'This file'} is not a saved sdexplore Trace (format={header.get('format')!r})."
            )
        if header.get("version", 0) > _VERSION:
            raise ResultFileError(
                f"{source} was written by a newer sdexplore (trace version {header['version']}); upgrade sdexplore."
            )
        try:
            return cls._from_state(tensors, header, source)
        except (KeyError, TypeError) as e:
            raise ResultFileError(f"{source or 'This file'} has a mismatched trace header ({e!r}).") from e

    @classmethod
    def _from_state(cls, tensors: dict[str, torch.Tensor], header: dict[str, Any], source: str) -> Trace:
        steps = []
        for i, sh in enumerate(header["steps"]):
            sh = dict(sh)
            names = sh.pop("tensors")
            rec = StepRecord(**sh)
            for k in names:
                key = f"step{i}.{k}"
                if key not in tensors:
                    raise ResultFileError(
                        f"{source} is missing tensor {key!r}: the file is truncated or mismatched."
                    )
                setattr(rec, k, tensors[key])
            steps.append(rec)
        meta_keys = (
            "family",
            "scheduler",
            "prediction_type",
            "num_steps",
            "every",
            "guidance_scale",
            "stopped_at",
        )
        return cls(
            steps=steps,
            final_latents=tensors.get("final_latents"),
            meta=header.get("meta", {}),
            **{k: header[k] for k in meta_keys},
        )

    def save(self, path: str | Path) -> Path:
        """Write the trace to one ``.safetensors`` file (tensors + a JSON header in its metadata)."""
        from safetensors.torch import save_file

        path = Path(path)
        tensors, header = self.to_state()
        save_file(tensors, str(path), metadata={_FORMAT: json.dumps(header)})
        return as_ordinary_file(path)

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace written by :meth:`save`; a truncated or foreign file raises :class:`ResultFileError`."""
        tensors, header = read_safetensors(path, _FORMAT)
        return cls.from_state(tensors, header, source=str(path))


def read_safetensors(path: str | Path, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a safetensors file and the JSON header stored under metadata ``key``, with clear errors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ResultFileError(f"No such file: {path}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        raise ResultFileError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {e}"
        ) from e
    if key not in meta:
        raise ResultFileError(
            f"{path} has no {key!r} header: it was not written by sdexplore's {key.split('.')[-1]} save."
        )
    try:
        header = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise ResultFileError(f"{path}: its {key!r} header is not valid JSON ({e}).") from e
    return tensors, header
