"""Prompt, seed and image walks: keyframes → per-frame conditioning and noise, rendered in batches through the pipeline."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ._checks import check_seed, check_size
from .errors import InterpolationError
from .families import detect_family, vae_scale_factor
from .interpolate import KeyframeSchedule, Spacing, keyframe_schedule, noise_slerp, slerp
from .record.tokens import resolve_max_sequence_length
from .results.inversion import Inversion
from .results.walk import Walk
from .smoothness import Metric, insertion_plan, smoothness_report
from .text import EncodedPrompt, default_size, encode_prompt, stack_prompts

#: Batch size the CPU heuristic never exceeds: measured on a shared 2-core CPU (SD 1.x fixture, 64², 25 steps,
#: 8 frames), batch 4 was fastest in both rounds (26 s vs 40–51 s at batch 8, 54–66 s at 2, 146–303 s one by one).
CPU_MAX_BATCH = 4
#: GPU batch cap: on an H200, SD-1.5 at 512² gives 5.0 images/s at batch 4 and 5.8 at batch 8; beyond 16
#: nothing is gained and the last partial batch wastes more.
CUDA_MAX_BATCH = 16
#: Measured peak-memory slope of SD-1.5 fp16 at 512², CFG, VAE decode included (MiB per extra image, FACTS).
_MIB_PER_IMAGE_SD15_512 = 640.0
#: Pipeline arguments a walk sets per frame; passing them to walk() is an error, not a silent override.
_RESERVED = frozenset(
    {
        "prompt",
        "prompt_2",
        "prompt_3",
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
        "latents",
        "generator",
        "output_type",
        "num_images_per_prompt",
    }
)


# ---------------------------------------------------------------- keyframes


@dataclass
class _Keyframes:
    """Encoded prompts and initial noises of the keyframes, on the pipeline's device."""

    encoded: list[EncodedPrompt]
    noises: list[torch.Tensor]  # each (1, C, h, w), unscaled N(0, I) exactly as the pipeline would draw it
    # (Flux: before its 2×2 packing; the pipeline is given the packed tokens)
    seeds: list[int]
    loop: bool


def _broadcast(name: str, values: list[Any], n: int) -> list[Any]:
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise InterpolationError(
            f"{name} has {len(values)} entries but there are {n} keyframes: give one, or one per keyframe."
        )
    return values


def _seed_noise(
    pipe: Any, seed: int, shape: tuple[int, ...], dtype: torch.dtype, gen_device: torch.device
) -> torch.Tensor:
    """The pipeline's own initial draw for ``seed``: ``randn_tensor(shape, generator=Generator(gen_device).manual_seed(seed))``.

    Unscaled: the pipeline's ``prepare_latents`` multiplies the ``latents`` it is given by the scheduler's
    ``init_noise_sigma``, exactly as it does with its own draw.
    """
    g = torch.Generator(gen_device).manual_seed(int(seed))
    return randn_tensor(shape, generator=g, device=pipe._execution_device, dtype=dtype)


def _keyframes(
    pipe: Any,
    prompts: Any,
    seeds: Any,
    negative_prompt: Any,
    *,
    height: int,
    width: int,
    loop: bool,
    gen_device: torch.device,
    max_sequence_length: int | None = None,
) -> _Keyframes:
    fam = detect_family(pipe)
    prompts_l = [prompts] if isinstance(prompts, str | EncodedPrompt | Inversion) else list(prompts)
    seeds_l = [seeds] if isinstance(seeds, int) else list(seeds)
    if not prompts_l or not seeds_l:
        raise InterpolationError("walk needs at least one prompt and one seed.")
    n = max(len(prompts_l), len(seeds_l))
    if n < 2:
        raise InterpolationError(
            "A walk needs at least 2 keyframes: give 2+ prompts, 2+ seeds, or both (e.g. seeds=[0, 1])."
        )
    prompts_l = _broadcast("prompts", prompts_l, n)
    seeds_l = [int(s) for s in _broadcast("seeds", seeds_l, n)]
    negs = _broadcast(
        "negative_prompt", [negative_prompt] if not isinstance(negative_prompt, list) else negative_prompt, n
    )
    cache: dict[tuple[str, str | None], EncodedPrompt] = {}
    encoded = []
    for p, neg in zip(prompts_l, negs, strict=True):
        if isinstance(
            p, Inversion
        ):  # its prompt, and its own negative (negative-prompt inversion: the prompt)
            p, neg = p.prompt, p.settings.get("negative_prompt")
        if isinstance(p, EncodedPrompt):
            if p.family != fam.name:
                raise InterpolationError(
                    f"Keyframe encoded for {p.family} but the pipeline is {fam.name}: encode it with this pipeline."
                )
            encoded.append(p)
            continue
        if (p, neg) not in cache:
            cache[(p, neg)] = encode_prompt(
                pipe, p, neg, height=height, width=width, max_sequence_length=max_sequence_length
            )
        encoded.append(cache[(p, neg)])
    shapes = {tuple(e.prompt_embeds.shape) for e in encoded}
    if len(shapes) > 1:
        raise InterpolationError(
            f"Keyframe embeddings have different shapes {sorted(shapes)}; they must match."
        )
    # (1, C, h, w) as the pipeline's prepare_latents draws it; Flux's in_channels count packed 2×2 patches
    packing = fam.latent_packing
    cells = vae_scale_factor(pipe) * packing
    shape = (
        1,
        fam.get_denoiser(pipe).config.in_channels // packing**2,
        packing * (height // cells),
        packing * (width // cells),
    )
    dtype = encoded[0].prompt_embeds.dtype
    noises = [
        _inverted_noise(p, shape, dtype, pipe._execution_device)
        if isinstance(p, Inversion)
        else _seed_noise(pipe, s, shape, dtype, gen_device)
        for p, s in zip(prompts_l, seeds_l, strict=True)
    ]
    return _Keyframes(encoded, noises, seeds_l, loop)


def _inverted_noise(
    inv: Inversion, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """An image keyframe's noise: the inversion's starting latents (1, C, h, w), unscaled like a seed's draw
    (the DDIM and flow-matching schedulers an inversion regenerates with have ``init_noise_sigma`` 1)."""
    if tuple(inv.latents.shape) != shape:
        raise InterpolationError(
            f"An image keyframe was inverted to latents of shape {tuple(inv.latents.shape)} but the walk draws "
            f"{shape}: invert it at the walk's height and width."
        )
    return inv.latents.to(device=device, dtype=dtype)


def _frame_inputs(
    keys: _Keyframes, positions: Sequence[tuple[int, float]]
) -> tuple[EncodedPrompt, torch.Tensor]:
    """Conditioning (batch of frames) and unscaled initial noise ``(frames, C, h, w)`` at ``(segment, t)`` positions."""
    n = len(keys.encoded)
    conds, noises = [], []
    for seg, t in positions:
        a, b = keys.encoded[seg], keys.encoded[(seg + 1) % n]
        conds.append(a.combine([b], lambda x, y, t=t: slerp(x, y, t), text=None))  # per-token slerp
        noises.append(noise_slerp(keys.noises[seg], keys.noises[(seg + 1) % n], t))  # (1, C, h, w)
    return stack_prompts(conds), torch.cat(noises)  # (frames, C, h, w)


def _frame_generator(
    keys: _Keyframes, seg: int, t: float, noise: torch.Tensor, gen_device: torch.device
) -> Any:
    """Generator for a frame's later random draws (stochastic schedulers): the nearer keyframe's seed, advanced."""
    k = seg if t < 0.5 else (seg + 1) % len(keys.seeds)
    g = torch.Generator(gen_device).manual_seed(keys.seeds[k])
    # advance past the initial noise, as a plain call does before the denoising loop
    randn_tensor(tuple(noise.shape), generator=g, device=noise.device, dtype=noise.dtype)
    return g


# ---------------------------------------------------------------- image keyframes


def _image_settings(
    pipe: Any,
    keyframes: list[Any],
    negative_prompt: Any,
    steps: int | None,
    guidance: float | None,
    height: Any,
    width: Any,
) -> tuple[int | None, float | None, int | None, int | None]:
    """Steps, guidance and size every :class:`Inversion` keyframe was made with (they must agree with each other
    and with what the walk is given: an inversion regenerates its picture only with its own settings); an
    Inversion keyframe takes its own negative prompt, so the walk must give it none."""
    fam = detect_family(pipe).name
    negs = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt] * len(keyframes)
    got: dict[str, Any] = {
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "height": height,
        "width": width,
    }
    for i, inv in enumerate(keyframes):
        if not isinstance(inv, Inversion):
            continue
        if inv.method == "null-text":  # its per-step embeddings exist only inside inversion.applied
            raise InterpolationError(
                f"Keyframe {i} is a null-text inversion, which regenerates its picture only inside "
                "sdexplore.inversion.applied(pipe, inv); walk from a 'ddim' or 'negative-prompt' inversion."
            )
        if inv.settings.get("family") != fam:
            raise InterpolationError(
                f"Keyframe {i} was inverted with a {inv.settings.get('family')} pipeline but this one is {fam}: "
                "invert the picture with this pipeline."
            )
        if i < len(negs) and negs[i] is not None:
            raise InterpolationError(
                f"Keyframe {i} is an inverted picture, which regenerates with its own negative prompt "
                f"({inv.settings.get('negative_prompt')!r}): give it no negative_prompt (None in the list)."
            )
        own = {
            "num_inference_steps": int(inv.settings["steps"]),
            "guidance_scale": float(inv.settings["guidance"]),
            "height": int(inv.image.shape[0]),
            "width": int(inv.image.shape[1]),
        }
        for name, value in own.items():
            if got[name] is None:
                got[name] = value
            elif float(got[name]) != float(value):
                raise InterpolationError(
                    f"Keyframe {i} was inverted with {name}={value} but the walk has {name}={got[name]}: an "
                    "inversion regenerates its picture only with its own settings. Leave the walk's "
                    f"{name} unset, or invert every picture with the same {name}."
                )
    return got["num_inference_steps"], got["guidance_scale"], got["height"], got["width"]


def _check_images(images: Any, n_keys: int, prompts: list[Any], negatives: list[Any]) -> list[Any]:
    """``images=``: None, or one entry per keyframe (a picture, or None for a prompt keyframe), each picture
    read now (:func:`sdexplore.images.load_image`), so a bad file is refused before any work."""
    from .images import load_image

    if images is None:
        return [None] * n_keys
    if isinstance(images, str | bytes) or not isinstance(images, Sequence):
        raise InterpolationError(
            "images= takes a list with one entry per keyframe: a picture (PIL image, array, path) or None."
        )
    if len(images) != n_keys:
        raise InterpolationError(
            f"images has {len(images)} entries but there are {n_keys} keyframes: give one per keyframe "
            "(None where the keyframe is a prompt and a seed)."
        )
    out = []
    for i, (image, prompt, neg) in enumerate(zip(images, prompts, negatives, strict=True)):
        if image is None:
            out.append(None)
            continue
        if not isinstance(prompt, str):
            raise InterpolationError(
                f"Keyframe {i} has an image, so its prompt must be text (the image is inverted with it), not "
                f"{type(prompt).__name__}."
            )
        if neg is not None:
            raise InterpolationError(
                f"Keyframe {i} is an image, inverted by negative-prompt inversion under CFG (its prompt is its "
                "own negative): give it no negative_prompt (None in the list)."
            )
        out.append(load_image(image))
    return out


def _invert_images(
    pipe: Any, prompts: list[Any], pictures: list[Any], steps: int, guidance: float, height: int, width: int
) -> list[Any]:
    """Each keyframe with a picture becomes its :class:`Inversion` (the family's ODE inversion at CFG ≤ 1,
    negative-prompt inversion above, so the endpoint reconstructs the picture with CFG on too)."""
    from .inversion import invert

    out = list(prompts)
    for i, picture in enumerate(pictures):
        if picture is not None:
            method = "negative-prompt" if guidance > 1 else None
            out[i] = invert(
                pipe,
                picture,
                prompts[i],
                steps=steps,
                guidance=guidance,
                method=method,
                height=height,
                width=width,
            )
    return out


def _inversion_scheduler(pipe: Any, keyframes: list[Any]) -> contextlib.AbstractContextManager[Any]:
    """The scheduler image keyframes regenerate with (UNets: DDIM from the pipeline's config, swapped in for the
    walk and restored after; SD3: its own flow-matching Euler), or the pipeline's as set when there are none."""
    if not any(isinstance(k, Inversion) for k in keyframes):
        return contextlib.nullcontext()
    from .inversion import _ddim_scheduler, _scheduler

    if detect_family(pipe).name == "sd3":
        return contextlib.nullcontext()
    return _scheduler(pipe, _ddim_scheduler(pipe))


# ---------------------------------------------------------------- batch size


def _per_frame_mib(pipe: Any, height: int, width: int, guidance: bool) -> float:
    """Rough peak-memory cost of one more frame in a batch, scaled from the SD-1.5 fp16 512² measurement.

    A UNet scales by its first block's width (SD 1.5: 320); a transformer (SD3, Flux) by its parameter count
    against SD 1.5's UNet (860M): an estimate, not measured for transformers.
    """
    denoiser = detect_family(pipe).get_denoiser(pipe)
    dtype_bytes = torch.finfo(denoiser.dtype).bits / 8
    blocks = getattr(denoiser.config, "block_out_channels", None)
    if blocks:
        width_factor = blocks[0] / 320
    else:
        width_factor = sum(p.numel() for p in denoiser.parameters()) / 860e6
    cfg = 1.0 if guidance else 0.5
    return (
        _MIB_PER_IMAGE_SD15_512
        * (height * width / 512**2)
        * (dtype_bytes / 2)
        * max(width_factor, 0.05)
        * cfg
    )


def auto_batch_size(
    pipe: Any, frames: int, *, height: int | None = None, width: int | None = None, guidance: bool = True
) -> int:
    """A batch size for ``frames`` frames on this pipeline's device.

    CUDA: as many frames as fit in 80% of the free memory at the estimated per-frame cost, at most
    :data:`CUDA_MAX_BATCH`. CPU: :data:`CPU_MAX_BATCH` (measured). The result is then evened out so the last
    batch is not nearly empty (24 frames at a cap of 16 → 2 batches of 12).
    """
    if height is None or width is None:
        height, width = default_size(pipe)
    device = pipe._execution_device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        fit = int(0.8 * free / 2**20 // _per_frame_mib(pipe, height, width, guidance))
        cap = max(1, min(CUDA_MAX_BATCH, fit))
    else:
        cap = CPU_MAX_BATCH
    cap = max(1, min(cap, frames))
    n_batches = math.ceil(frames / cap)
    return math.ceil(frames / n_batches)


# ---------------------------------------------------------------- rendering


def _call_default(pipe: Any, name: str, fallback: Any) -> Any:
    """The default of ``pipe.__call__``'s ``name`` argument (SDXL's guidance is 5.0, SD's 7.5)."""
    param = inspect.signature(pipe.__call__).parameters.get(name)
    return fallback if param is None or param.default is inspect.Parameter.empty else param.default


def _observe_fn() -> Callable[..., Any]:
    from .record.observe import observe  # lazy: a walk without observe= never loads the recorders

    return observe


def default_summary(obs: Any, index: int) -> dict[str, Any]:
    """Small JSON-able summary of frame ``index`` of a batched :class:`~sdexplore.results.observation.Observation`.

    Steps: the timesteps and, where recorded, the per-step RMS of the guided noise prediction. Attention: the
    mean attention mass of each of the 77 key positions over the image. Pass ``summarize=`` to keep more (e.g.
    ``lambda obs, i: obs.attention.aggregate[i]``), knowing that it is kept for every frame.
    """
    out: dict[str, Any] = {}
    runs = getattr(obs, "runs", None)
    if runs:
        trace = runs[-1]
        out["timesteps"] = trace.timesteps.tolist()
        if "noise_norm" in trace.quantities():
            out["noise_norm"] = trace.stack("noise_norm")[:, index].float().tolist()  # (S, B) → (S,)
    attention = getattr(obs, "attention", None)
    if attention is not None:
        out["attention_mass"] = attention.aggregate[index].mean(dim=(-2, -1)).tolist()  # (T, H, W) → (T,)
    return out


def _render(
    pipe: Any,
    keys: _Keyframes,
    positions: Sequence[tuple[int, float]],
    *,
    batch_size: int,
    gen_device: torch.device,
    call_kwargs: dict[str, Any],
    observe: dict[str, Any] | None,
    summarize: Callable[[Any, int], Any],
    progress: bool,
) -> tuple[np.ndarray, list[Any] | None]:
    """Render frames at ``positions`` in batches; returns ``(images (N, H, W, 3) uint8, summaries or None)``."""
    fam = detect_family(pipe)
    images: list[np.ndarray] = []
    summaries: list[Any] | None = [] if observe is not None else None
    observe_fn = _observe_fn() if observe is not None else None
    had_config = hasattr(pipe, "_progress_bar_config")
    saved_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)  # one walk-level bar instead of one per batch
    try:
        with tqdm(total=len(positions), desc="walk", unit="frame", disable=not progress) as bar:
            for start in range(0, len(positions), batch_size):
                chunk = positions[start : start + batch_size]
                cond, noise = _frame_inputs(keys, chunk)
                gens = [_frame_generator(keys, s, t, noise[:1], gen_device) for s, t in chunk]
                kwargs = dict(
                    call_kwargs,
                    **cond.pipe_kwargs(),
                    latents=fam.pack_latents(
                        noise
                    ),  # Flux: (B, hw/4, 4C) tokens, as its prepare_latents packs them
                    generator=gens,
                    output_type="np",
                )
                if observe_fn is not None:
                    with observe_fn(pipe, **observe) as obs:
                        out = pipe(**kwargs)
                    summaries.extend(summarize(obs, i) for i in range(len(chunk)))  # type: ignore[union-attr]
                    del obs
                else:
                    out = pipe(**kwargs)
                frames = np.asarray(out.images)  # (B, H, W, 3) float in [0, 1]
                images.append((np.clip(frames, 0, 1) * 255).round().astype(np.uint8))
                bar.update(len(chunk))
    finally:
        if had_config:
            pipe._progress_bar_config = saved_config
        else:
            del pipe._progress_bar_config
    return np.concatenate(images), summaries


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _check_count(name: str, value: Any, lo: int, *, optional: bool = True) -> None:
    """``value`` is an int ≥ ``lo`` (or None where ``optional``), else InterpolationError naming it."""
    if (value is None and optional) or (_is_int(value) and value >= lo):
        return
    default = ", or None for the default" if optional else ""
    raise InterpolationError(f"{name} must be at least {lo} (an int{default}), got {value!r}.")


def _check_walk_args(pipe: Any, **a: Any) -> None:
    """Every walk() argument checked before anything is encoded or rendered (InterpolationError naming it)."""
    fam = detect_family(pipe)
    fam.require(
        "walks",
        "sdexplore.walk",
        why="its prompt embeddings come with masks or templates the walk does not interpolate",
    )
    _check_count("frames", a["frames"], 2, optional=False)
    _check_count("batch_size", a["batch_size"], 1)
    _check_count("num_inference_steps", a["num_inference_steps"], 1)
    g = a["guidance_scale"]
    if g is not None and (isinstance(g, bool) or not isinstance(g, Real) or not math.isfinite(float(g))):
        raise InterpolationError(
            f"guidance_scale={g!r} is not accepted: pass a finite number (e.g. 7.5), or None for the default."
        )
    check_size(pipe, a["height"], a["width"], error=InterpolationError)
    if a["spacing"] not in ("even", "ease"):
        raise InterpolationError(f"spacing={a['spacing']!r} is not accepted: pass 'even' or 'ease'.")
    if not isinstance(a["loop"], bool):
        raise InterpolationError(f"loop={a['loop']!r} is not accepted: pass True or False.")
    prompts = a["prompts"]
    items = [prompts] if isinstance(prompts, str | EncodedPrompt | Inversion) else prompts
    if not isinstance(items, Sequence) or not all(
        isinstance(p, str | EncodedPrompt | Inversion) for p in items
    ):
        raise InterpolationError(
            f"prompts={prompts!r} is not accepted: pass a prompt, an EncodedPrompt, an Inversion (a picture "
            "inverted with sdexplore.invert) or a list of them."
        )
    seeds = a["seeds"]
    seed_list = [seeds] if isinstance(seeds, Integral) else seeds  # a bool too: check_seed names it
    if isinstance(seeds, str) or not isinstance(seed_list, Sequence):
        raise InterpolationError(f"seeds={seeds!r} is not accepted: pass an int or a list of ints.")
    for i, seed in enumerate(seed_list):  # each a seed torch takes: 0 <= seed < 2**64, no bools
        check_seed(seed, "seeds" if seed_list is not seeds else f"seeds[{i}]", error=InterpolationError)
    neg = a["negative_prompt"]
    negs = neg if isinstance(neg, list) else [neg]
    if not all(n is None or isinstance(n, str) for n in negs):
        raise InterpolationError(
            f"negative_prompt={neg!r} is not accepted: pass None, a string, or a list of strings (or None)."
        )
    if a["observe"] is not None and not isinstance(a["observe"], dict):
        raise InterpolationError(
            f"observe={a['observe']!r} is not accepted: pass a dict of sdexplore.observe options, e.g. "
            "dict(steps=True), or None."
        )
    if not callable(a["summarize"]):
        raise InterpolationError(
            f"summarize={a['summarize']!r} is not accepted: pass a function (obs, i) -> summary."
        )
    if a["generator_device"] is not None:
        try:
            torch.device(a["generator_device"])
        except (RuntimeError, TypeError) as e:
            raise InterpolationError(
                f"generator_device={a['generator_device']!r} is not accepted: pass a device such as 'cpu' or "
                f"'cuda', or None for the pipeline's device ({e})."
            ) from e


def walk(
    pipe: Any,
    prompts: str | EncodedPrompt | Inversion | Sequence[str | EncodedPrompt | Inversion],
    seeds: int | Sequence[int] = 0,
    frames: int = 16,
    *,
    images: Sequence[Any] | None = None,
    batch_size: int | None = None,
    negative_prompt: str | list[str | None] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    spacing: Spacing = "even",
    loop: bool = False,
    generator_device: str | torch.device | None = None,
    observe: dict[str, Any] | None = None,
    summarize: Callable[[Any, int], Any] = default_summary,
    progress: bool = True,
    **pipe_kwargs: Any,
) -> Walk:
    """Walk between keyframes (prompts, seeds or both) and render ``frames`` images in batches.

    Keyframe ``i`` is ``(prompts[i], seeds[i])``; a single prompt or seed is shared by all keyframes. Prompt
    embeddings (SD3: CLIP's and T5's positions alike; Flux: T5's) and the pooled ones (SDXL, SD3, Flux: CLIP's
    pooled vector) are slerped per token, the initial noise is slerped as one vector
    (keeping its norm), and each keyframe lands exactly on a frame, equal to ``pipe(prompt,
    generator=torch.Generator(generator_device).manual_seed(seed))`` (``generator_device`` defaults to the
    pipeline's device). Frames do not depend on ``batch_size`` (default: :func:`auto_batch_size`).
    ``num_inference_steps``, ``guidance_scale``, ``height``, ``width`` default to the pipeline's own defaults.
    ``spacing="ease"`` slows down near keyframes; ``loop=True`` returns to the first keyframe seamlessly.
    ``observe``: keyword arguments for ``sdexplore.observe`` to record every frame; only ``summarize(obs, i)`` of
    each frame is kept (bounded memory). Other keyword arguments go to the pipeline; its scheduler is used as set.

    **Image keyframes.** A keyframe may be a picture: an :class:`~sdexplore.results.inversion.Inversion` in
    ``prompts`` (from :func:`sdexplore.invert`), or ``images=[picture or None, ...]`` (one entry per keyframe;
    each picture is inverted with its keyframe's prompt at the walk's steps and guidance: DDIM/flow inversion at
    CFG ≤ 1, negative-prompt inversion above). Its noise is the inverted latents and its conditioning its
    prompt, so its frame reconstructs the picture (``inversion.reconstruction``, up to batch rounding). The walk
    then renders with the inversion's scheduler (DDIM for the UNet families, swapped in and restored) and the
    inversions' steps, guidance and size, which must agree with each other and with any the walk is given.
    """
    _check_walk_args(
        pipe,
        prompts=prompts,
        seeds=seeds,
        frames=frames,
        batch_size=batch_size,
        negative_prompt=negative_prompt,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
        spacing=spacing,
        loop=loop,
        generator_device=generator_device,
        observe=observe,
        summarize=summarize,
    )
    clash = sorted(_RESERVED & set(pipe_kwargs))
    if clash:
        raise InterpolationError(
            f"walk sets {', '.join(clash)} itself (per frame); give keyframes as prompts= and seeds= instead."
        )
    keyframes = [prompts] if isinstance(prompts, str | EncodedPrompt | Inversion) else list(prompts)
    pictures: list[Any] = []
    if images is not None:  # read every picture now: a bad file is refused before any work
        n_keys = max(len(keyframes), 1 if _is_int(seeds) else len(seeds))
        keyframes = _broadcast("prompts", keyframes, n_keys)
        negs = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt]
        pictures = _check_images(images, n_keys, keyframes, _broadcast("negative_prompt", negs, n_keys))
    num_inference_steps, guidance_scale, height, width = _image_settings(
        pipe, keyframes, negative_prompt, num_inference_steps, guidance_scale, height, width
    )
    if height is None or width is None:
        dh, dw = default_size(pipe)
        height, width = height or dh, width or dw
    num_inference_steps = num_inference_steps or _call_default(pipe, "num_inference_steps", 50)
    guidance_scale = _call_default(pipe, "guidance_scale", 7.5) if guidance_scale is None else guidance_scale
    gen_device = torch.device(generator_device) if generator_device is not None else pipe._execution_device
    max_sequence_length = resolve_max_sequence_length(pipe, pipe_kwargs.get("max_sequence_length"))
    if any(p is not None for p in pictures):
        keyframes = _invert_images(
            pipe, keyframes, pictures, num_inference_steps, float(guidance_scale), height, width
        )
    image_keys = [i for i, k in enumerate(keyframes) if isinstance(k, Inversion)]
    keys = _keyframes(
        pipe,
        keyframes,
        seeds,
        negative_prompt,
        height=height,
        width=width,
        loop=loop,
        gen_device=gen_device,
        max_sequence_length=max_sequence_length,
    )
    schedule: KeyframeSchedule = keyframe_schedule(len(keys.seeds), frames, spacing=spacing, loop=loop)
    if batch_size is None:
        batch_size = auto_batch_size(pipe, frames, height=height, width=width, guidance=guidance_scale > 1)
    call_kwargs = dict(
        pipe_kwargs,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        height=height,
        width=width,
    )
    positions = list(zip(schedule.segments, schedule.ts, strict=True))
    with _inversion_scheduler(pipe, keyframes):
        scheduler_name = type(pipe.scheduler).__name__
        frame_images, summaries = _render(
            pipe,
            keys,
            positions,
            batch_size=batch_size,
            gen_device=gen_device,
            call_kwargs=call_kwargs,
            observe=observe,
            summarize=summarize,
            progress=progress,
        )
    settings = {
        "family": detect_family(pipe).name,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
        "spacing": spacing,
        "loop": loop,
        "batch_size": batch_size,
        "scheduler": scheduler_name,
        "negative_prompt": negative_prompt,
        "generator_device": str(gen_device),
    }
    if image_keys:  # keyframes whose noise is an inverted picture's (refine cannot re-create them from seeds)
        settings["image_keyframes"] = image_keys
    if max_sequence_length is not None:  # SD3, Flux: T5's length, for refine to encode the keyframes alike
        settings["max_sequence_length"] = max_sequence_length
    return Walk(
        images=frame_images,
        prompts=[e.prompt for e in keys.encoded],
        seeds=keys.seeds,
        segments=schedule.segments,
        ts=schedule.ts,
        keyframe_frames=schedule.keyframe_frames,
        settings=settings,
        summaries=summaries,
    )


def refine(
    pipe: Any,
    result: Walk,
    extra: int,
    *,
    metric: Metric = "pixel",
    batch_size: int | None = None,
    progress: bool = True,
) -> Walk:
    """Insert ``extra`` frames where the walk jumps most (adaptive refinement), re-rendered with the same settings.

    Each largest step (after greedy splitting, :func:`~sdexplore.smoothness.insertion_plan`) gets frames at evenly
    spaced positions between its two frames' path positions. Keyframes given as text only (prompts not None).
    Returns a new :class:`Walk`; existing frames are reused, not re-rendered.
    """
    _check_count("extra", extra, 0, optional=False)
    _check_count("batch_size", batch_size, 1)
    if any(p is None for p in result.prompts):
        raise InterpolationError("refine needs text keyframes; this walk had EncodedPrompt keyframes.")
    if result.settings.get("image_keyframes"):
        raise InterpolationError(
            "refine re-creates keyframes from their prompts and seeds, and this walk has image keyframes (inverted "
            "pictures): run walk again with more frames instead."
        )
    s = result.settings
    gen_device = torch.device(s["generator_device"])
    keys = _keyframes(
        pipe,
        result.prompts,
        result.seeds,
        s["negative_prompt"],
        height=s["height"],
        width=s["width"],
        loop=s["loop"],
        gen_device=gen_device,
        max_sequence_length=s.get("max_sequence_length"),
    )
    counts = insertion_plan(smoothness_report(result.images, metric).distances, extra)
    n_keys = len(result.prompts)
    new_pos: list[tuple[int, float]] = []
    after: list[int] = []  # index of the original frame each new frame follows
    for i, m in enumerate(counts):
        (s0, t0), (s1, t1) = (result.segments[i], result.ts[i]), (result.segments[i + 1], result.ts[i + 1])
        if s1 != s0:  # next frame starts a new segment: measure it as t = 1 of this one
            t1 = 1.0 if t1 == 0.0 and (s1 == (s0 + 1) % n_keys) else t1
            s1 = s0
        for j in range(1, m + 1):
            new_pos.append((s0, t0 + (t1 - t0) * j / (m + 1)))
            after.append(i)
    if not new_pos:
        return result
    call_kwargs = {
        **({"max_sequence_length": s["max_sequence_length"]} if "max_sequence_length" in s else {}),
        "num_inference_steps": s["num_inference_steps"],
        "guidance_scale": s["guidance_scale"],
        "height": s["height"],
        "width": s["width"],
    }
    bs = batch_size or auto_batch_size(pipe, len(new_pos), height=s["height"], width=s["width"])
    images, _ = _render(
        pipe,
        keys,
        new_pos,
        batch_size=bs,
        gen_device=gen_device,
        call_kwargs=call_kwargs,
        observe=None,
        summarize=default_summary,
        progress=progress,
    )
    order: list[tuple[float, int, int]] = [
        (i, 0, i) for i in range(len(result))
    ]  # (sort key, new?, source index)
    order += [(a + (k + 1) / (len(new_pos) + 2) * 1e-3 + 0.5, 1, k) for k, a in enumerate(after)]
    order.sort()
    all_images = [result.images[src] if new == 0 else images[src] for _, new, src in order]
    segs = [result.segments[src] if new == 0 else new_pos[src][0] for _, new, src in order]
    ts = [result.ts[src] if new == 0 else new_pos[src][1] for _, new, src in order]
    key_frames = [k for k, (_, new, src) in enumerate(order) if new == 0 and src in result.keyframe_frames]
    return Walk(
        images=np.stack(all_images),
        prompts=result.prompts,
        seeds=result.seeds,
        segments=segs,
        ts=ts,
        keyframe_frames=key_frames,
        settings=dict(s, refined=s.get("refined", 0) + len(new_pos)),
        summaries=None,
    )
