"""The component tour of a pipeline, as data and as a readable table (tokenizers, encoders, UNet or transformer,
VAE, scheduler)."""

from __future__ import annotations

import html
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .families import detect_family, vae_scale_factor
from .schedule_math import prediction_type

_ROLES = {
    "tokenizer": "splits the prompt into CLIP tokens",
    "tokenizer_2": "second tokenizer (OpenCLIP bigG)",
    "tokenizer_3": "splits the prompt into T5 sentencepiece pieces",
    "text_encoder": "turns tokens into one embedding per token",
    "text_encoder_2": "second text encoder; also gives the pooled embedding",
    "text_encoder_3": "T5 encoder: the long, detailed text sequence",
    "unet": "predicts the noise in the latents, conditioned on the text",
    "transformer": "MMDiT: predicts the flow (noise minus image) from image and text tokens attending jointly",
    "vae": "encodes pixels to latents and decodes latents back to pixels",
    "scheduler": "decides the noise levels and how each step updates the latents",
    "safety_checker": "flags possibly unsafe images",
    "feature_extractor": "prepares images for the safety checker",
    "image_encoder": "encodes reference images (IP-Adapter)",
}


@dataclass
class Component:
    """One pipeline component: its role, class, size and placement."""

    name: str
    cls: str
    role: str
    parameters: int | None  # None for components without weights (tokenizer, scheduler)
    dtype: str | None
    device: str | None


@dataclass
class PipelineDescription:
    """What :func:`describe` returns: components, family, latent arithmetic and schedule."""

    family: str
    family_label: str
    components: list[Component]
    image_size: tuple[int, int]  # (height, width) in pixels, the model's native size
    latent_shape: tuple[int, int, int]  # (channels, height, width) of one latent
    compression: float  # pixel numbers per latent number
    scheduler: str
    prediction_type: str
    num_train_timesteps: int
    timesteps: list[int] = field(default_factory=list)  # for `steps` inference steps

    @property
    def total_parameters(self) -> int:
        """All weights of the pipeline together."""
        return sum(c.parameters or 0 for c in self.components)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-serialisable)."""
        return asdict(self)

    def _rows(self) -> list[tuple[str, str, str, str, str, str]]:
        rows = []
        for c in self.components:
            params = f"{c.parameters / 1e6:,.2f} M" if c.parameters is not None else "–"
            rows.append((c.name, c.cls, params, c.dtype or "–", c.device or "–", c.role))
        return rows

    def _summary(self) -> list[str]:
        h, w = self.image_size
        ch, lh, lw = self.latent_shape
        return [
            f"Family: {self.family_label} ({self.family}); {self.total_parameters / 1e6:,.1f} M parameters in all",
            f"Pixels → latents: {h}×{w}×3 = {h * w * 3:,} numbers → {lh}×{lw}×{ch} = {lh * lw * ch:,} "
            f"numbers ({self.compression:g}× fewer)",
            f"Scheduler: {self.scheduler}, {self.prediction_type} prediction, {self.num_train_timesteps} training "
            f"timesteps; {len(self.timesteps)} inference steps: {_short(self.timesteps)}",
        ]

    def __str__(self) -> str:
        header = ("component", "class", "params", "dtype", "device", "role")
        rows = [header, *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(r)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([*self._summary(), "", *lines])

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{x}</th>" for x in ("component", "class", "params", "dtype", "device", "role"))
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in r) + "</tr>" for r in self._rows()
        )
        summary = "".join(f"<li>{html.escape(s)}</li>" for s in self._summary())
        return f"<ul>{summary}</ul><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _short(ts: list[int]) -> str:
    return ", ".join(map(str, ts)) if len(ts) <= 8 else f"{ts[0]}, {ts[1]}, {ts[2]}, …, {ts[-2]}, {ts[-1]}"


def _component(name: str, obj: Any) -> Component:
    params = dtype = device = None
    if isinstance(obj, torch.nn.Module):
        params = sum(p.numel() for p in obj.parameters())
        first = next(obj.parameters(), None)
        if first is not None:
            dtype, device = str(first.dtype).removeprefix("torch."), str(first.device)
    return Component(name, type(obj).__name__, _ROLES.get(name, ""), params, dtype, device)


def describe(
    pipe: Any, *, steps: int = 50, height: int | None = None, width: int | None = None
) -> PipelineDescription:
    """Describe a pipeline: each component with class, parameter count, dtype and device; the family; the
    latent shape arithmetic; the scheduler and its timesteps for ``steps`` inference steps.

    Printing the result gives a table; in Jupyter it renders as HTML. The scheduler is not modified
    (its timesteps are computed on a copy).
    """
    fam = detect_family(pipe)
    comps = [_component(n, obj) for n, obj in pipe.components.items() if obj is not None]
    factor = vae_scale_factor(pipe)
    default = int(fam.get_denoiser(pipe).config.sample_size) * factor  # latent cells of the native size
    h, w = height or default, width or default
    if h % factor or w % factor:
        raise ValueError(
            f"height and width must be multiples of {factor} (the VAE's downsampling), got {h}×{w}."
        )
    ch = int(pipe.vae.config.latent_channels)
    latent = (ch, h // factor, w // factor)
    sched_copy = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched_copy.set_timesteps(steps)
    cfg = pipe.scheduler.config
    return PipelineDescription(
        family=fam.name,
        family_label=fam.label,
        components=comps,
        image_size=(h, w),
        latent_shape=latent,
        compression=(h * w * 3) / (latent[0] * latent[1] * latent[2]),
        scheduler=type(pipe.scheduler).__name__,
        prediction_type=prediction_type(pipe.scheduler),  # "flow_prediction" for flow matching (SD3)
        num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
        timesteps=[int(t) for t in sched_copy.timesteps],
    )
