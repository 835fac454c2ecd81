"""FlowEdit (Kulikov et al., 2025, "FlowEdit: Inversion-Free Text-Based Editing Using Pre-Trained Flow Models"):
edit a picture with a flow-matching model (SD3, Flux.1, Flux.2) without inverting it.

The paper builds a direct ODE path from the source picture to the edit. On the model's own schedule
t_T > … > t_1 > t_0 = 0 (σ, shifted as the pipeline shifts it), for the steps i with n_min < i ≤ n_max counted
from the clean end (the first ``steps − n_max`` noisiest steps are skipped):

    z_src_t = (1 − t_i)·x_src + t_i·ε                        (fresh noise ε for each of n_avg draws)
    z_tar_t = z_edit + z_src_t − x_src
    V_Δ     = mean over the draws of v(z_tar_t, target; g_tar) − v(z_src_t, source; g_src)
    z_edit ← z_edit + (t_{i−1} − t_i)·V_Δ                    (z_edit starts at x_src)

with v the model's velocity under classifier-free guidance per branch (``source_guidance`` g_src and
``target_guidance`` g_tar; Flux.1-dev and Flux.2's guidance-distilled transformers take the scale as an input
instead). For the last ``n_min`` steps the noised edit z_tar is sampled by the plain Euler ODE under the target
prompt. With n_min = 0 the result is z_edit: a target equal to the source (and g_tar = g_src) gives V_Δ = 0 at
every step, so the picture's latents come back unchanged, bit for bit.

Parameters (the paper's defaults scaled to ``steps``: SD3 50 steps n_max 33, g_src 3.5, g_tar 13.5; Flux 28 steps
n_max 24, g_src 1.5, g_tar 5.5; n_min 0, n_avg 1): ``n_max`` how many of the clean-end steps are edited (more:
a stronger edit that keeps less of the picture), ``n_min`` how many of them are plain sampling instead,
``n_avg`` noise draws averaged per step, ``source_guidance``/``target_guidance``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

from .errors import InvalidArgumentError, UnsupportedPipelineError
from .families import Family, detect_family, vae_scale_factor

#: The flow-matching families FlowEdit runs on.
FLOWEDIT_FAMILIES = ("sd3", "flux", "flux2")
_OUTSIDE_WARNING = "The observed denoiser ran outside a call"
#: The paper's settings per family: (steps, n_max, source guidance, target guidance).
PAPER_DEFAULTS = {"sd3": (50, 33, 3.5, 13.5), "flux": (28, 24, 1.5, 5.5), "flux2": (28, 24, 1.5, 5.5)}


def check_flow_family(pipe: Any, what: str = "FlowEdit") -> Family:
    """The pipeline's family if it is a flow-matching one FlowEdit and flow inversion run on, else
    :class:`UnsupportedPipelineError` naming them."""
    return detect_family(pipe).require(
        "flowedit",
        what,
        why="it needs a flow-matching model",
        hint="Edit a picture there with sdexplore.edit(pipe, source, target, image=picture) (null-text inversion, "
        "then Prompt-to-Prompt).",
    )


# ---------------------------------------------------------------- the schedule, as the pipeline makes it


def flow_schedule(pipe: Any, steps: int, height: int, width: int) -> tuple[list[float], list[float]]:
    """``(timesteps, sigmas)`` of a ``steps``-step call of ``pipe`` at ``height`` × ``width``, computed as the
    family's pipeline computes them (SD3: the scheduler's own; Flux.1: diffusers' ``calculate_shift`` of the image
    sequence length; Flux.2: its ``compute_empirical_mu``). ``sigmas`` has ``steps + 1`` entries, the last 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    fam = detect_family(pipe)
    current = pipe.scheduler
    if type(current) is not FlowMatchEulerDiscreteScheduler:
        raise UnsupportedPipelineError(
            f"Flow inversion and FlowEdit need the pipeline's FlowMatchEulerDiscreteScheduler, not "
            f"{type(current).__name__}: sdexplore.set_scheduler(pipe, 'FlowMatchEulerDiscreteScheduler')."
        )
    if current.config.get("stochastic_sampling", False):
        raise UnsupportedPipelineError(
            "This scheduler samples stochastically: flow inversion and FlowEdit need the deterministic Euler ODE."
        )
    work = FlowMatchEulerDiscreteScheduler.from_config(current.config)
    f = vae_scale_factor(pipe)
    seq = (height // (f * 2)) * (width // (f * 2))  # image tokens: 2×2 patches (SD3's patch, Flux's packing)
    cfg = work.config
    if fam.name == "sd3":
        mu = None
        if cfg.use_dynamic_shifting:  # StableDiffusion3Pipeline's rule
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            mu = calculate_shift(
                seq, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
            )
        work.set_timesteps(steps, **({} if mu is None else {"mu": mu}))
    else:
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if fam.name == "flux":
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            mu = calculate_shift(
                seq,
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.15),
            )
        else:
            from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

            mu = compute_empirical_mu(image_seq_len=seq, num_steps=steps)
        work.set_timesteps(sigmas=sigmas, mu=mu)
    return [float(t) for t in work.timesteps.tolist()], work.sigmas.double().tolist()


# ---------------------------------------------------------------- the model's velocity, conditioned on a prompt


def distilled_guidance(pipe: Any) -> bool:
    """Whether the transformer takes the guidance scale as an input (Flux.1-dev, Flux.2-dev) instead of CFG."""
    return bool(detect_family(pipe).get_denoiser(pipe).config.get("guidance_embeds", False))


def velocity_model(pipe: Any, prompt: str, guidance: float, height: int, width: int) -> Any:
    """``v(x, t)``: the denoiser's velocity at sampling-space latents ``x`` (B, C, h, w) and timestep ``t`` (the
    scheduler's, σ·1000), called as the family's pipeline calls it, returned as float64 (B, C, h, w).

    ``guidance`` > 1 runs classifier-free guidance against the empty prompt (SD3; Flux.2 [klein] unless
    distilled; Flux.1 without a guidance input), or is the guidance input of a guidance-distilled transformer.
    """
    from .text import encode_prompt

    fam = detect_family(pipe)
    den = fam.get_denoiser(pipe)
    param = next(den.parameters())
    dev, dtype = param.device, param.dtype
    distilled = distilled_guidance(pipe)
    cfg = guidance > 1 and not distilled and not getattr(pipe.config, "is_distilled", False)
    enc = encode_prompt(pipe, prompt, height=height, width=width)
    texts = [enc.prompt_embeds]
    pooled = [enc.pooled_prompt_embeds]
    if cfg:
        if fam.name == "sd3":
            texts.insert(0, enc.negative_prompt_embeds)
            pooled.insert(0, enc.negative_pooled_prompt_embeds)
        else:  # the Flux pipelines' empty negative
            empty = encode_prompt(pipe, "", height=height, width=width)
            texts.insert(0, empty.prompt_embeds)
            pooled.insert(0, empty.pooled_prompt_embeds)
    texts = [t.to(dev, dtype) for t in texts]  # each (1, tokens, D)
    pooled = [None if p is None else p.to(dev, dtype) for p in pooled]

    def one(x: torch.Tensor, t: float, text: torch.Tensor, pool: torch.Tensor | None) -> torch.Tensor:
        b = x.shape[0]
        text, pool = text.expand(b, -1, -1), None if pool is None else pool.expand(b, -1)
        if fam.name == "sd3":
            return den(
                hidden_states=x,
                timestep=torch.full((b,), t, device=dev, dtype=dtype),
                encoder_hidden_states=text,
                pooled_projections=pool,
                return_dict=False,
            )[0]
        h, w = x.shape[-2:]
        tokens = fam.pack_latents(x)  # (B, h/2 · w/2, 4C)
        g = torch.full((b,), float(guidance), device=dev, dtype=torch.float32) if distilled else None
        if fam.name == "flux":
            kw = dict(
                pooled_projections=pool,
                txt_ids=torch.zeros(text.shape[1], 3, device=dev, dtype=dtype),  # (tokens, 3)
                img_ids=pipe._prepare_latent_image_ids(b, h // 2, w // 2, dev, dtype),  # (N, 3)
            )
        else:
            kw = dict(
                txt_ids=pipe._prepare_text_ids(text).to(dev),  # (B, tokens, 4)
                img_ids=pipe._prepare_latent_ids(x[:, :1, ::2, ::2]).to(dev),  # (B, N, 4)
            )
        out = den(
            hidden_states=tokens,
            timestep=torch.full((b,), t / 1000, device=dev, dtype=dtype),
            guidance=g,
            encoder_hidden_states=text,
            return_dict=False,
            **kw,
        )[0]  # (B, N, 4C)
        return fam.unpack_latents(out[:, : tokens.shape[1]], (h, w))  # (B, C, h, w)

    @torch.no_grad()
    def model(x: torch.Tensor, t: float) -> torch.Tensor:
        x = x.to(dev, dtype)
        c = one(x, t, texts[-1], pooled[-1]).double()
        if not cfg:
            return c
        u = one(x, t, texts[0], pooled[0]).double()
        return u + guidance * (c - u)

    return model


# ---------------------------------------------------------------- pictures in and out of the sampling space


@torch.no_grad()
def encode_picture(pipe: Any, picture: np.ndarray) -> torch.Tensor:
    """The sampling-space latents (1, C, h, w) of a picture (H, W, 3) uint8 at its own size: the VAE posterior's
    mean, shifted and scaled (SD3, Flux.1), or normalised by the VAE's batch-norm statistics over 2×2 patches as
    ``Flux2KleinPipeline`` does (Flux.2): :func:`sdexplore.images.encode_image`."""
    from .images import encode_image

    h, w = picture.shape[:2]
    return encode_image(pipe, picture, height=h, width=w)


def pipe_latents(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Sampling-space latents (B, C, h, w) in the layout ``pipe(latents=...)`` takes: as they are (SD3), packed
    tokens (B, h/2 · w/2, 4C) (Flux.1), 2×2-patchified (B, 4C, h/2, w/2) (Flux.2)."""
    fam = detect_family(pipe)
    if fam.name == "flux":
        return fam.pack_latents(latents)
    if fam.name == "flux2":
        b, c, h, w = latents.shape
        x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (B, C, dy, dx, h/2, w/2)
        return x.reshape(b, c * 4, h // 2, w // 2)  # (B, 4C, h/2, w/2)
    return latents


# ---------------------------------------------------------------- FlowEdit


def _count(name: str, value: Any, lo: int, hi: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgumentError(f"{name}={value!r}: give a whole number from {lo} to {hi} ({hint}).")
    return value


def _scale(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise InvalidArgumentError(f"{name}={value!r}: give a finite guidance scale ≥ 0 (1.0 turns CFG off).")
    return float(value)


def check_flowedit(
    pipe: Any,
    steps: Any,
    n_max: Any,
    n_min: Any,
    n_avg: Any,
    source_guidance: Any,
    target_guidance: Any,
) -> tuple[Family, int, int, int, int, float, float]:
    """FlowEdit's settings, defaults filled in (the paper's, scaled to ``steps``), or InvalidArgumentError /
    UnsupportedPipelineError before any work."""
    fam = check_flow_family(pipe)
    paper_steps, paper_max, g_src, g_tar = PAPER_DEFAULTS[fam.name]
    steps = _count("num_inference_steps", paper_steps if steps is None else steps, 1, 1000, "e.g. 28")
    if n_max is None:
        n_max = max(1, round(steps * paper_max / paper_steps))
    n_max = _count("n_max", n_max, 1, steps, f"the edited steps, at most num_inference_steps={steps}")
    n_min = _count("n_min", 0 if n_min is None else n_min, 0, steps, "the plain sampling steps at the end")
    if n_min > n_max:
        raise InvalidArgumentError(
            f"n_min={n_min} > n_max={n_max}: FlowEdit edits the steps between n_min and n_max (counted from the "
            "clean end); give n_min ≤ n_max."
        )
    n_avg = _count("n_avg", 1 if n_avg is None else n_avg, 1, 1000, "noise draws averaged per step, e.g. 1")
    src = _scale("source_guidance", g_src if source_guidance is None else source_guidance)
    tar = _scale("target_guidance", g_tar if target_guidance is None else target_guidance)
    return fam, steps, n_max, n_min, n_avg, src, tar


@torch.no_grad()
def flowedit_latents(
    source_model: Any,
    target_model: Any,
    x_src: torch.Tensor,
    timesteps: list[float],
    sigmas: list[float],
    *,
    n_max: int,
    n_min: int = 0,
    n_avg: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FlowEdit's loop (the module docstring) on sampling-space latents ``x_src`` (1, C, h, w): returns the edited
    latents (1, C, h, w) float64. ``source_model``/``target_model`` are ``v(x, t)`` (:func:`velocity_model`);
    the noise ε is drawn from ``generator`` on the CPU (reproducible across devices)."""
    steps = len(timesteps)
    x_src = x_src.double()
    z_edit = x_src.clone()
    z_tar = None

    def noise() -> torch.Tensor:
        eps = torch.randn(x_src.shape, generator=generator, dtype=torch.float32)  # (1, C, h, w)
        return eps.to(x_src.device, torch.float64)

    for i, t in enumerate(timesteps):
        left = steps - i  # steps left, counting this one
        if left > n_max:
            continue
        s, s_next = sigmas[i], sigmas[i + 1]
        if left > n_min:
            delta = torch.zeros_like(x_src)
            for _ in range(n_avg):
                z_src_t = (1 - s) * x_src + s * noise()
                z_tar_t = z_edit + z_src_t - x_src
                delta += (target_model(z_tar_t, t) - source_model(z_src_t, t)) / n_avg
            z_edit = z_edit + (s_next - s) * delta
        else:  # the last n_min steps: plain Euler sampling of the noised edit under the target prompt
            if left == n_min:
                z_src_t = (1 - s) * x_src + s * noise()
                z_tar = z_edit + z_src_t - x_src
            z_tar = z_tar + (s_next - s) * target_model(z_tar, t)
    return z_edit if n_min == 0 else z_tar


def flowedit(
    pipe: Any,
    image: Any,
    source_prompt: str,
    target_prompt: str,
    *,
    num_inference_steps: int | None = None,
    n_max: int | None = None,
    n_min: int | None = None,
    n_avg: int | None = None,
    source_guidance: float | None = None,
    target_guidance: float | None = None,
    generator: torch.Generator | None = None,
    height: int | None = None,
    width: int | None = None,
) -> Any:
    """Edit ``image`` from ``source_prompt`` (its description) to ``target_prompt`` with FlowEdit, no inversion.

    SD3, Flux.1 and Flux.2 (:data:`FLOWEDIT_FAMILIES`). ``image`` is anything
    :func:`sdexplore.images.load_image` reads, at ``height`` × ``width`` (default the model's size).
    ``num_inference_steps``, ``n_max``, ``n_min``, ``n_avg``, ``source_guidance``, ``target_guidance``: the
    module docstring (None: the paper's, scaled to the steps). ``generator`` draws FlowEdit's noise: the same
    seed gives the same edit. Usually called through ``sdexplore.edit(pipe, source, target, image=picture,
    method="flowedit")``.

    Returns an :class:`~sdexplore.results.edit.Edit`: ``source`` is the picture's VAE round trip, ``edited`` the
    FlowEdit result; ``source_maps``/``edited_maps`` are None (FlowEdit records no attention maps; observe a
    plain call for those). ``settings["method"]`` is ``"flowedit"``, with the parameters used.
    Raises InvalidArgumentError / UnsupportedPipelineError before any work.
    """
    from ._checks import check_size
    from .decoding import decode_with
    from .images import pipeline_image
    from .results.edit import Edit

    fam, steps, n_max, n_min, n_avg, g_src, g_tar = check_flowedit(
        pipe, num_inference_steps, n_max, n_min, n_avg, source_guidance, target_guidance
    )
    for name, p in (("source_prompt", source_prompt), ("target_prompt", target_prompt)):
        if not isinstance(p, str):
            raise InvalidArgumentError(
                f"{name}={p!r}: FlowEdit edits one picture; give one prompt (a string)."
            )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InvalidArgumentError(
            f"generator={generator!r}: give one torch.Generator (FlowEdit draws its noise from it)."
        )
    check_size(pipe, height, width)
    picture = np.asarray(pipeline_image(pipe, image, height=height, width=width), dtype=np.uint8)  # (H, W, 3)
    h, w = picture.shape[:2]
    timesteps, sigmas = flow_schedule(pipe, steps, h, w)
    x_src = encode_picture(pipe, picture)  # (1, C, h/f, w/f)
    src = velocity_model(pipe, source_prompt, g_src, h, w)
    tar = velocity_model(pipe, target_prompt, g_tar, h, w)
    with (
        warnings.catch_warnings()
    ):  # an enclosing observe's note that these denoiser calls are not a pipeline call
        warnings.filterwarnings("ignore", message=_OUTSIDE_WARNING)
        edited = flowedit_latents(
            src, tar, x_src, timesteps, sigmas, n_max=n_max, n_min=n_min, n_avg=n_avg, generator=generator
        )
    dtype = x_src.dtype
    round_trip = decode_with(pipe.vae, x_src)[0].cpu().numpy()  # (H, W, 3) uint8
    out = decode_with(pipe.vae, edited.to(dtype))[0].cpu().numpy()
    from PIL import Image

    settings = dict(
        method="flowedit",
        family=fam.name,
        num_inference_steps=steps,
        n_max=n_max,
        n_min=n_min,
        n_avg=n_avg,
        source_guidance=g_src,
        target_guidance=g_tar,
        distilled_guidance=distilled_guidance(pipe),
        cross_replace=None,
        self_replace=None,
        num_images_per_prompt=1,
    )
    return Edit(
        source=Image.fromarray(round_trip),
        edited=Image.fromarray(out),
        source_prompt=source_prompt,
        edited_prompt=target_prompt,
        settings=settings,
    )
