"""Trace and StepRecord: the plain-data result of recording a denoising run, with safetensors + JSON save/load."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from ..errors import InvalidArgumentError, NotRecordedError, SelectionError
from ..preview import ConvPreview
from . import fileformat as ff
from . import provenance as _provenance

#: Tensor quantities a step can hold, with their shapes (B = images in the batch). A video's (Wan's) tensors carry
#: its F latent frames after the channels: latents (B, C, F, h, w), previews (B, F, h, w, 3) (see Trace.frames).
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
    # (M, H, W) float32 in [0, 1]: an inpainting call's mask at its own pixel size (1 = repainted), else None
    mask: torch.Tensor | None = None
    # "ve_latents": latents in variance-exploding form (Euler-type schedulers); "latent_rgb": {"factors": C×3,
    # "bias": 3}, the latent → RGB preview factors the previews were made with; "latent_preview": the learned
    # convolutional preview (ConvPreview.to_dict()) the previews were made with instead, where the model folder
    # carries one (the embedded models); "schedule_begin" and
    # "schedule_length": where the run's loop starts in the scheduler's whole schedule (img2img, strength < 1);
    # "provenance": the call's model, seed, prompts and image size (sdexplore.results.provenance; absent in files
    # saved before it was kept)
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
    def schedule_indices(self) -> list[int]:
        """Position of each record in the scheduler's whole schedule: its run step index plus
        ``meta["schedule_begin"]`` (img2img and inpainting with ``strength < 1`` run only the schedule's tail)."""
        begin = int(self.meta.get("schedule_begin", 0))
        return [begin + s.index for s in self.steps]

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

    @property
    def frames(self) -> int | None:
        """Latent frames ``F`` of a video's trace, whose latent-shaped tensors are (B, C, F, h, w) and previews
        (B, F, h, w, 3); ``None`` for an image's trace (no frame axis anywhere)."""
        for s in self.steps:
            for k, t in s._tensors().items():
                if k in _LATENT_LIKE:
                    return int(t.shape[2]) if t.ndim == 5 else None
                if k in ("preview", "decoded"):
                    return int(t.shape[1]) if t.ndim == 5 else None
        final = self.final_latents
        return None if final is None or final.ndim != 5 else int(final.shape[2])

    def frame_strip(
        self, step: int, *, index: int = 0, quantity: str = "preview", scale: int = 1
    ) -> PIL.Image.Image:
        """The frames of recorded step ``step`` side by side, one row (F·w pixels wide): image ``index``'s
        ``quantity`` ("preview" or "decoded"), each pixel ``scale``× larger (nearest neighbour). An image's trace
        gives its one picture. A row per step, top to bottom, shows a video denoising."""
        if quantity not in ("preview", "decoded"):
            raise InvalidArgumentError(f"quantity={quantity!r}: a frame strip shows 'preview' or 'decoded'.")
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise InvalidArgumentError(
                f"scale={scale!r}: pass a whole number ≥ 1 of screen pixels per pixel."
            )
        rec = self[step]
        pics = getattr(rec, quantity)
        if pics is None:
            raise NotRecordedError(
                f"Step {step} has no {quantity!r}: record it with StepRecorder(quantities=(..., {quantity!r}))."
            )
        n = pics.shape[0]
        if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
            raise SelectionError(f"index={index!r} is not an image of this trace: pass an int in 0..{n - 1}.")
        frames = pics[index] if pics.ndim == 5 else pics[index][None]  # (F, h, w, 3)
        row = frames.permute(1, 0, 2, 3).flatten(1, 2)  # (h, F·w, 3): the frames left to right
        if scale > 1:
            row = row.repeat_interleave(scale, 0).repeat_interleave(scale, 1)  # (h·s, F·w·s, 3)
        return PIL.Image.fromarray(row.cpu().numpy())

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
        if self.mask is not None:
            tensors["mask"] = self.mask.detach().cpu().float().contiguous()
        header = {
            "format": _FORMAT,
            "version": ff.VERSION,
            "family": self.family,
            "scheduler": self.scheduler,
            "prediction_type": self.prediction_type,
            "num_steps": self.num_steps,
            "every": self.every,
            "guidance_scale": self.guidance_scale,
            "stopped_at": self.stopped_at,
            "final_latents": self.final_latents is not None,
            "mask": self.mask is not None,
            "meta": self.meta,
            "steps": [{**s._scalars(), "tensors": sorted(s._tensors())} for s in self.steps],
        }
        return tensors, header

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], header: Any, source: str = "") -> Trace:
        """Rebuild a trace from :meth:`to_state` output; every field and tensor is checked.

        Any mismatch raises :class:`ResultFileError` naming ``source`` and the field.
        """
        check = ff.Checker(source or "this trace")
        return cls._parse(check, check.kind(header, _FORMAT, "Trace"), tensors)

    @classmethod
    def _parse(cls, c: ff.Checker, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Trace:
        unknown = sorted(set(header) - _HEADER_KEYS)
        if unknown:
            c.fail(f"field {unknown[0]!r}", "is not a field of a saved Trace")
        has_final = c.bool(c.get(header, "final_latents", "final_latents"), "final_latents")
        has_mask = c.bool(header.get("mask", False), "mask")  # absent in files saved before masks were kept
        steps = [
            _parse_step(c, i, sh) for i, sh in enumerate(c.list(c.get(header, "steps", "steps"), "steps"))
        ]
        for i in range(1, len(steps)):
            before, now = steps[i - 1][0].index, steps[i][0].index
            if now <= before:
                c.fail(f"steps[{i}].index", f"is {now}, not after the step before it ({before})")
        names = {f"step{i}.{k}" for i, (_, ks) in enumerate(steps) for k in ks}
        ff.require_tensors(
            c,
            tensors,
            names | ({"final_latents"} if has_final else set()) | ({"mask"} if has_mask else set()),
        )
        dims = _Dims(c)
        records = []
        for i, (rec, ks) in enumerate(steps):
            for k in ks:
                name = f"step{i}.{k}"
                dims.tensor(k, name, tensors[name])
                setattr(rec, k, tensors[name])
            records.append(rec)
        final = tensors["final_latents"] if has_final else None
        if final is not None:
            dims.tensor("final_latents", "final_latents", final)
        mask = tensors["mask"] if has_mask else None
        if mask is not None:
            ff.check_tensor(c, "mask", mask, (None, None, None), dtype=torch.float32)  # (M, H, W)
        stopped = c.get(header, "stopped_at", "stopped_at")
        trace = cls(
            steps=records,
            family=c.str(c.get(header, "family", "family"), "family"),
            scheduler=c.str(c.get(header, "scheduler", "scheduler"), "scheduler"),
            prediction_type=c.str(c.get(header, "prediction_type", "prediction_type"), "prediction_type"),
            num_steps=c.int(c.get(header, "num_steps", "num_steps"), "num_steps", lo=0),
            every=c.int(c.get(header, "every", "every"), "every", lo=1),
            guidance_scale=c.number(c.get(header, "guidance_scale", "guidance_scale"), "guidance_scale"),
            stopped_at=None if stopped is None else c.int(stopped, "stopped_at", lo=0),
            final_latents=final,
            mask=mask,
            meta=_parse_meta(c, c.get(header, "meta", "meta"), dims.sizes.get("C")),
        )
        _check_consistency(c, trace, dims.sizes)
        return trace

    def save(self, path: str | Path) -> Path:
        """Write the trace to one ``.safetensors`` file (tensors + a JSON header with their checksums), atomically."""
        tensors, header = self.to_state()
        return ff.save_result(Path(path), _FORMAT, header, tensors)

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace written by :meth:`save`; every field, shape, dtype and checksum is checked.

        A truncated, corrupt, edited or foreign file raises :class:`ResultFileError` naming the file and field.
        """
        rf = ff.read_result(path, _FORMAT, "Trace")
        trace = cls._parse(rf.check, rf.header, rf.tensors)
        rf.verify_checksums()
        return trace


_HEADER_KEYS = frozenset(
    {
        "format",
        "version",
        "family",
        "scheduler",
        "prediction_type",
        "num_steps",
        "every",
        "guidance_scale",
        "stopped_at",
        "final_latents",
        "mask",
        "meta",
        "steps",
        ff.TABLE,
        ff.HEADER_SUM,
    }
)
_STEP_KEYS = frozenset(f.name for f in fields(StepRecord) if f.name not in TENSOR_FIELDS) | {"tensors"}
_X0_SOURCES = ("scheduler", "computed", "none")
_LATENT_LIKE = frozenset(
    {"latents", "latents_out", "noise_uncond", "noise_cond", "noise_pred", "x0", "final_latents"}
)


def _parse_step(c: ff.Checker, i: int, value: Any) -> tuple[StepRecord, list[str]]:
    """One header step → a StepRecord without tensors, and the names of its tensors."""
    f = f"steps[{i}]"
    sh = c.dict(value, f)
    unknown = sorted(set(sh) - _STEP_KEYS)
    if unknown:
        c.fail(f"{f}.{unknown[0]}", "is not a field of a step record")
    names = c.list(c.get(sh, "tensors", f"{f}.tensors"), f"{f}.tensors")
    for j, k in enumerate(names):
        c.str(k, f"{f}.tensors[{j}]", choices=TENSOR_FIELDS)
    if len(set(names)) != len(names):
        c.fail(f"{f}.tensors", f"lists a quantity twice: {names}")
    rec = StepRecord(
        index=c.int(c.get(sh, "index", f"{f}.index"), f"{f}.index", lo=0),
        timestep=c.number(c.get(sh, "timestep", f"{f}.timestep"), f"{f}.timestep"),
        sigma=c.number(c.get(sh, "sigma", f"{f}.sigma"), f"{f}.sigma", finite=False, lo=0.0),
        alpha_bar=c.number(c.get(sh, "alpha_bar", f"{f}.alpha_bar"), f"{f}.alpha_bar", lo=0.0, hi=1.0),
        guidance_scale=c.number(c.get(sh, "guidance_scale", f"{f}.guidance_scale"), f"{f}.guidance_scale"),
        x0_source=c.str(c.get(sh, "x0_source", f"{f}.x0_source"), f"{f}.x0_source", choices=_X0_SOURCES),
    )
    return rec, list(names)


def _parse_meta(c: ff.Checker, value: Any, channels: int | None) -> dict[str, Any]:
    """The free-form ``meta`` dict, with the keys sdexplore reads back checked."""
    meta = c.dict(value, "meta")
    if "ve_latents" in meta:
        c.bool(meta["ve_latents"], "meta.ve_latents")
    for key in ("schedule_begin", "schedule_length"):
        if key in meta:
            c.int(meta[key], f"meta.{key}", lo=0)
    rgb = meta.get("latent_rgb")
    if rgb is not None:
        rgb = c.dict(rgb, "meta.latent_rgb")
        rows = c.list(
            c.get(rgb, "factors", "meta.latent_rgb.factors"), "meta.latent_rgb.factors", length=channels
        )
        for r, row in enumerate(rows):
            for j, v in enumerate(c.list(row, f"meta.latent_rgb.factors[{r}]", length=3)):
                c.number(v, f"meta.latent_rgb.factors[{r}][{j}]")
        for j, v in enumerate(
            c.list(c.get(rgb, "bias", "meta.latent_rgb.bias"), "meta.latent_rgb.bias", length=3)
        ):
            c.number(v, f"meta.latent_rgb.bias[{j}]")
    if "provenance" in meta:
        _provenance.check(c, meta["provenance"], "meta.provenance")
    if "latent_preview" in meta:
        try:
            net = ConvPreview.from_dict(meta["latent_preview"])
        except ValueError as e:
            c.fail("meta.latent_preview", f"is not a readable preview network ({e})")
        if channels is not None and net.channels != channels:
            c.fail(
                "meta.latent_preview.input_scale",
                f"has {net.channels} channels, which does not match the latents' {channels}",
            )
    return meta


def _check_consistency(c: ff.Checker, trace: Trace, sizes: dict[str, int]) -> None:
    """The header's family, step counts and schedule agree with each other and with the tensors (no model)."""
    fam = ff.family_of(c, trace.family, "family")
    if fam is not None and "rank" in sizes and fam.video != ("F" in sizes):
        have = "(B, C, F, h, w) video tensors" if "F" in sizes else "(B, C, h, w) image tensors"
        c.fail(
            "family",
            f"is {trace.family!r} ({fam.label}), whose latents {'are' if fam.video else 'are not'} "
            f"video latents, but the trace holds {have}",
        )
    if "C" in sizes:
        ff.check_channels(c, fam, "family", sizes["C"], "every latent tensor (B, C, h, w)")
    rgb = trace.meta.get("latent_rgb")
    if (
        rgb is not None and "C" not in sizes
    ):  # with latents, _parse_meta matched the factors to their channels
        ff.check_channels(c, fam, "family", len(rgb["factors"]), "meta.latent_rgb.factors")
    net = trace.meta.get("latent_preview")
    if net is not None and "C" not in sizes:
        channels = len(net["input_scale"])
        ff.check_channels(c, fam, "family", channels, "meta.latent_preview.input_scale")
    if "H" in sizes and "h" in sizes:
        ff.check_scale(
            c, "tensor 'step*.decoded'", (sizes["h"], sizes["w"]), (sizes["H"], sizes["W"]), "the latents"
        )
    n, indices = trace.num_steps, trace.indices
    if n and indices and indices[-1] >= n:
        c.fail(
            f"steps[{len(indices) - 1}].index / num_steps",
            f"is step {indices[-1]}, but the run had num_steps = {n} steps (0..{n - 1})",
        )
    if trace.stopped_at is not None:
        if n and trace.stopped_at >= n:
            c.fail("stopped_at / num_steps", f"is {trace.stopped_at}, after the run's last step ({n - 1})")
        if indices and indices[-1] > trace.stopped_at:
            c.fail(
                "stopped_at",
                f"is {trace.stopped_at}, but step {indices[-1]} was recorded after it (steps[{len(indices) - 1}].index)",
            )
    begin, length = trace.meta.get("schedule_begin"), trace.meta.get("schedule_length")
    if n and begin is not None and length is not None and begin != max(length - n, 0):
        c.fail(
            "meta.schedule_begin",
            f"is {begin}, but a run of num_steps = {n} over a schedule of meta.schedule_length = {length} steps "
            f"begins at {max(length - n, 0)} (the schedule's tail)",
        )


class _Dims:
    """Sizes shared by every tensor of a trace: B images, C channels, (h, w) latents, (H, W) decoded images."""

    def __init__(self, c: ff.Checker) -> None:
        self.c = c
        self.sizes: dict[str, int] = {}

    def _agree(self, name: str, t: torch.Tensor, dims: str) -> None:
        video = "F" in dims  # a video's tensors all carry the frame axis, an image's none
        if dims != "B" and self.sizes.setdefault("rank", int(video)) != int(video):
            self.c.fail(
                f"tensor {name!r}",
                f"has shape {tuple(t.shape)}, but the trace's other tensors {'do not carry' if video else 'carry'} "
                "a frame axis (video tensors are (B, C, F, h, w), previews (B, F, h, w, 3))",
            )
        for d, size in zip(dims, t.shape, strict=True):
            if d == "_":  # a size no other tensor shares (the 3 colour channels)
                continue
            if self.sizes.setdefault(d, int(size)) != size:
                self.c.fail(
                    f"tensor {name!r}",
                    f"has shape {tuple(t.shape)}, which disagrees with the trace's other tensors "
                    f"({d} = {self.sizes[d]} elsewhere)",
                )

    def tensor(self, quantity: str, name: str, t: torch.Tensor) -> None:
        """Check one tensor's rank, dtype and sizes against the others."""
        if quantity in _LATENT_LIKE:
            video = t.ndim == 5
            f = (None,) if video else ()  # a video's frame axis
            ff.check_tensor(self.c, name, t, (None, None, *f, None, None), floating=True)  # (B, C[, F], h, w)
            self._agree(name, t, "BCFhw" if video else "BChw")
        elif quantity in ("preview", "decoded"):
            video = t.ndim == 5
            f = (None,) if video else ()
            ff.check_tensor(
                self.c, name, t, (None, *f, None, None, 3), dtype=torch.uint8
            )  # (B[, F], h, w, 3)
            small = "hw" if quantity == "preview" else "HW"
            self._agree(name, t, f"BF{small}_" if video else f"B{small}_")
        else:  # noise_norm
            ff.check_tensor(self.c, name, t, (None,), dtype=torch.float32)  # (B,)
            self._agree(name, t, "B")
