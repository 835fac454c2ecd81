"""The component tour of a pipeline, as data and as a readable table (tokenizers, encoders, UNet or transformer,
VAE, scheduler)."""

from __future__ import annotations

import html
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .families import CAPABILITIES, detect_family, vae_scale_factor
from .inversion import DEFAULT_STEPS
from .schedule_math import FLOW_PREDICTION, dynamic_shift_mu, prediction_type

_ROLES = {
    "tokenizer": "splits the prompt into CLIP tokens",
    "tokenizer_2": "second tokenizer, for text_encoder_2",
    "tokenizer_3": "splits the prompt into T5 sentencepiece pieces",
    "text_encoder": "turns tokens into one embedding per token",
    "text_encoder_2": "second text encoder; also gives the pooled embedding",
    "text_encoder_3": "T5 encoder: the long, detailed text sequence",
    "unet": "reads the noisy latents and the text; predicts {target}",
    "transformer": "MMDiT: image and text tokens attend jointly; predicts {target}",
    "transformer:cross": "DiT: the {tokens} tokens attend to each other, then to the text tokens (cross-attention); "
    "predicts {target}",
    "transformer:single": "single-stream DiT: image and caption tokens in one sequence, one set of weights; "
    "predicts {target}",
    "image_encoder": "encodes reference images (IP-Adapter)",
    "vae": "encodes pixels to latents and decodes latents back to pixels",
    "scheduler": "decides the noise levels and how each step updates the latents",
    "safety_checker": "flags possibly unsafe images",
    "feature_extractor": "prepares images for the safety checker",
}
# Where a family's components play other roles than the names above say
_FAMILY_ROLES = {
    "flux": {
        "text_encoder": "CLIP-L: only its pooled embedding is used (the transformer's pooled_projections)",
        "tokenizer_2": "splits the prompt into T5 sentencepiece pieces",
        "text_encoder_2": "T5 encoder: the text sequence the transformer attends to",
        "transformer": "MMDiT: 2×2-packed image tokens and text tokens attend jointly; predicts {target}",
    },
    "flux2": {
        "tokenizer": "splits the chat-templated prompt into byte-level BPE tokens",
        "text_encoder": "Qwen3 language model: three of its layers' hidden states, stacked, are the text sequence",
        "transformer": "MMDiT: 2×2-packed 128-channel image tokens and text tokens attend jointly; "
        "predicts {target}",
        "vae": "encodes pixels to 32-channel latents (normalised by its batch-norm statistics) and back",
    },
}
#: What the denoiser's output is, by the scheduler's ``prediction_type`` (read from its config, never assumed):
#: x_t = α·x0 + σ·ε for the UNet families, x_t = (1 − s)·x0 + s·ε for flow matching.
PREDICTS = {
    "epsilon": "the noise ε",
    "v_prediction": "v = α·ε − σ·x0, a mix of noise and image",
    "sample": "the clean latents x0",
    FLOW_PREDICTION: "the flow v = ε − x0, noise minus image",
}


def predicts(prediction_type: str, negated: bool = False) -> str:
    """What a denoiser trained for ``prediction_type`` outputs, in words (the type itself when unknown); ``negated``:
    the denoiser outputs the negative, which its pipeline negates before the scheduler's step (Z-Image)."""
    if negated and prediction_type == FLOW_PREDICTION:
        return "x0 − ε, image minus noise (the pipeline negates it into the flow v = ε − x0)"
    if negated:
        return f"the negative of {PREDICTS.get(prediction_type, repr(prediction_type))} (the pipeline negates it)"
    return PREDICTS.get(prediction_type, f"its {prediction_type!r} target")


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
    blocks: list[str] = field(
        default_factory=list
    )  # a transformer denoiser's block structure, one line per kind
    #: What sdexplore can do with this family (``Family.capabilities``, in :data:`~sdexplore.families.CAPABILITIES`
    #: order); everything else is refused with an error naming the families that can.
    capabilities: list[str] = field(default_factory=list)
    frames: tuple[int, int] | None = None  # a video family: (frames, latent frames) of a default call
    negated_output: bool = False  # the denoiser outputs the negative of prediction_type's target (Z-Image)

    @property
    def missing(self) -> list[str]:
        """The capabilities this family lacks (each refused with one clear error)."""
        return [c for c in CAPABILITIES if c not in self.capabilities]

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
        f, lf = self.frames or (1, 1)
        video, latent_video = (f"{f} frames × ", f"{lf} × ") if self.frames else ("", "")
        return [
            f"Family: {self.family_label} ({self.family}); {self.total_parameters / 1e6:,.1f} M parameters in all",
            f"sdexplore can: {', '.join(self.capabilities) or 'nothing'}"
            + (f"; refuses with a clear error: {', '.join(self.missing)}" if self.missing else ""),
            f"Pixels → latents: {video}{h}×{w}×3 = {f * h * w * 3:,} numbers → {latent_video}{lh}×{lw}×{ch} = "
            f"{lf * lh * lw * ch:,} numbers ({self.compression:g}× fewer)",
            f"Scheduler: {self.scheduler}, {self.num_train_timesteps} training timesteps; "
            f"{len(self.timesteps)} inference steps: {_short(self.timesteps)}",
            f"Prediction type {self.prediction_type}: the denoiser predicts "
            f"{predicts(self.prediction_type, self.negated_output)}",
            *self.blocks,
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


def _component(
    name: str,
    obj: Any,
    family: str = "",
    target: str = "",
    pipe: Any = None,
    den: Any = None,
    video: bool = False,
) -> Component:
    params = dtype = device = None
    if isinstance(obj, torch.nn.Module):
        params = sum(p.numel() for p in obj.parameters())
        first = next(obj.parameters(), None)
        if first is not None:
            dtype, device = str(first.dtype).removeprefix("torch."), str(first.device)
    role = _FAMILY_ROLES.get(family, {}).get(name) or _role(name, obj, pipe, den, video)
    return Component(name, type(obj).__name__, role.format(target=target), params, dtype, device)


def _role(name: str, obj: Any, pipe: Any, den: Any, video: bool = False) -> str:
    """A component's role, read from the component where its name alone does not say (which tokens a tokenizer
    makes, whether a transformer attends jointly or through cross-attention)."""
    if name.startswith("tokenizer") and pipe is not None and hasattr(obj, "convert_ids_to_tokens"):
        from .record.tokens import word_marker

        marker = word_marker(obj)[0]
        kind = {"</w>": "CLIP BPE tokens", "▁": "sentencepiece pieces", "Ġ": "byte-level BPE tokens"}
        encoder = getattr(pipe, "text_encoder" + name.removeprefix("tokenizer"), None)
        reader = f" for {type(encoder).__name__}" if encoder is not None else ""
        return f"splits the prompt into {kind.get(marker, 'tokens')}{reader}"
    if name == "transformer" and den is not None and _cross_attention(den):
        return _ROLES["transformer:cross"].replace("{tokens}", "video" if video else "image")
    if name == "transformer" and den is not None and _single_stream(den):
        return _ROLES["transformer:single"]
    return _ROLES.get(name, "")


def _cross_attention(den: Any) -> list[str]:
    """Names of a transformer's text cross-attention layers (``attn2``: PixArt, Sana, Wan); none for an MMDiT."""
    return [n for n, m in den.named_modules() if n.rpartition(".")[2] == "attn2" and hasattr(m, "processor")]


def _single_stream(den: Any) -> bool:
    """A transformer whose main layers run image and text tokens as one sequence with one set of weights (Z-Image's
    ``layers``, after per-stream refiners), with no double-stream or cross-attention blocks."""
    return (
        len(getattr(den, "layers", ())) > 0
        and not hasattr(den, "transformer_blocks")
        and not hasattr(den, "down_blocks")
        and not _cross_attention(den)
    )


def describe(
    pipe: Any, *, steps: int = DEFAULT_STEPS, height: int | None = None, width: int | None = None
) -> PipelineDescription:
    """Describe a pipeline: each component with class, parameter count, dtype and device; the family; the
    latent shape arithmetic; the scheduler and its timesteps for ``steps`` inference steps (default: the
    package's own step count, 25, as every command uses).

    Every statement is read from the pipeline: what the denoiser predicts from the scheduler's
    ``prediction_type`` (noise, v, x0 or flow), sizes from the configs, block counts from the module tree.
    Printing the result gives a table; in Jupyter it renders as HTML. The scheduler is not modified
    (its timesteps are computed on a copy).
    """
    fam = detect_family(pipe)
    target = predicts(prediction_type(pipe.scheduler), fam.negated_output)
    den = fam.get_denoiser(pipe)
    comps = [
        _component(n, obj, fam.name, target, pipe, den, fam.video)
        for n, obj in pipe.components.items()
        if obj is not None
    ]
    factor = vae_scale_factor(pipe)
    # latent cells of the native size: the denoiser's sample_size; Flux's transformer has none, its pipeline
    # a default_sample_size (128: 1024 pixels); Z-Image's neither, its record the call's 1024 pixels
    cells = getattr(den.config, "sample_size", None) or getattr(pipe, "default_sample_size", None)
    default = fam.native_size or int(cells or 64) * factor
    h, w = height or default, width or default
    call = inspect.signature(type(pipe).__call__).parameters
    frames = None
    if fam.video and "num_frames" in call:  # a video family (Wan): its call's own size and frame count
        h = height or int(call["height"].default or default)
        w = width or int(call["width"].default or default)
        f = int(call["num_frames"].default)
        temporal = int(getattr(pipe, "vae_scale_factor_temporal", 1) or 1)
        frames = (
            f,
            (f - 1) // temporal + 1,
        )  # the causal video VAE keeps the first frame, then 1 in `temporal`
    if h % factor or w % factor:
        raise ValueError(
            f"height and width must be multiples of {factor} (the VAE's downsampling), got {h}×{w}."
        )
    ch = fam.latent_channels  # the record's: Qwen-Image's (Wan-style) VAE calls it z_dim
    latent = (ch, h // factor, w // factor)
    sched_copy = type(pipe.scheduler).from_config(pipe.scheduler.config)
    cfg = pipe.scheduler.config
    if cfg.get("use_dynamic_shifting", False) and fam.name == "flux2":  # Flux.2: mu from tokens and steps
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        p = fam.latent_packing
        mu = compute_empirical_mu((latent[1] // p) * (latent[2] // p), steps)
        sched_copy.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
    elif cfg.get("use_dynamic_shifting", False):  # Flux: the shift follows the image's token count
        p = fam.latent_packing
        mu = dynamic_shift_mu(
            (latent[1] // p) * (latent[2] // p),
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        if fam.latent_packing > 1:  # as FluxPipeline calls it: sigmas linspace(1, 1/n, n), shifted by mu
            sched_copy.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), mu=mu)
        else:  # SD3's pipeline: the scheduler's own sigmas, shifted by mu
            sched_copy.set_timesteps(steps, mu=mu)
    else:
        sched_copy.set_timesteps(steps)
    return PipelineDescription(
        family=fam.name,
        family_label=fam.label,
        components=comps,
        image_size=(h, w),
        latent_shape=latent,
        compression=((frames or (1,))[0] * h * w * 3)
        / ((frames or (1, 1))[1] * latent[0] * latent[1] * latent[2]),
        scheduler=type(pipe.scheduler).__name__,
        prediction_type=prediction_type(pipe.scheduler),  # "flow_prediction" for flow matching (SD3)
        num_train_timesteps=int(cfg.get("num_train_timesteps", 1000)),
        timesteps=[int(t) for t in sched_copy.timesteps],
        blocks=_blocks(den, fam.video),
        capabilities=[c for c in CAPABILITIES if fam.can(c)],
        frames=frames,
        negated_output=fam.negated_output,
    )


def _blocks(den: Any, video: bool = False) -> list[str]:
    """The block structure of a transformer denoiser (MMDiT or cross-attention DiT; empty for a UNet), read from its
    module tree."""
    cfg = den.config
    heads, dim = getattr(cfg, "num_attention_heads", None), getattr(cfg, "attention_head_dim", None)
    width = f"{heads} heads × {dim} = {heads * dim} channels" if heads and dim else ""
    lines = []
    joint = len(getattr(den, "transformer_blocks", ()))
    single = len(getattr(den, "single_transformer_blocks", ()))
    if joint and single:  # Flux
        lines.append(
            f"Transformer: {joint} double-stream (MMDiT) blocks — text and image tokens keep their own weights and "
            f"attend jointly — then {single} single-stream blocks on the one concatenated sequence; {width}"
        )
    elif joint and hasattr(den, "pos_embed") and hasattr(den, "context_embedder"):  # SD3
        lines.append(
            f"Transformer: {joint} joint (MMDiT) blocks — text and image tokens keep their own weights and attend "
            f"jointly; {width}"
        )
    elif not hasattr(den, "down_blocks") and (cross := _cross_attention(den)):  # PixArt-Σ, Sana, Wan
        modules = dict(den.named_modules())
        first = modules.get(cross[0].rpartition(".")[0] + ".attn1")
        linear = first is not None and "Linear" in type(getattr(first, "processor", None)).__name__
        kind = "linear (softmax-free: no attention maps) self-attention" if linear else "self-attention"
        lines.append(
            f"Transformer: {len(cross)} blocks of {kind} over the {'video' if video else 'image'}"
            f" tokens, then cross-attention to the text tokens (its softmax gives the maps); {width}"
        )
    elif _single_stream(den):  # Z-Image
        heads, dim = getattr(cfg, "n_heads", None), getattr(cfg, "dim", None)
        width = f"{heads} heads × {dim // heads} = {dim} channels" if heads and dim else width
        refiners = [
            f"{len(getattr(den, a))} {what} refiner layer{'s' if len(getattr(den, a)) != 1 else ''}"
            for a, what in (("noise_refiner", "image"), ("context_refiner", "caption"))
            if len(getattr(den, a, ()))
        ]
        first = f"{' and '.join(refiners)} (each stream alone), then " if refiners else ""
        lines.append(
            f"Transformer: {first}{len(den.layers)} single-stream layers on one sequence of image and caption "
            f"tokens (one set of weights, no separate text stream); {width}"
        )
    return lines
