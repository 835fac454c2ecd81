"""Vital layers of an MMDiT (Avrahami et al., CVPR 2025, "Stable Flow: Vital Layers for Training-Free Image
Editing"): which transformer blocks the picture depends on, found by measurement, and editing by injection there.

A block is *bypassed* when it returns its input (the residual stream skips it: image and text streams leave it as
they came in). :func:`vital_layers` generates a set of prompts and seeds plainly, then once with each candidate
block bypassed, and scores each block by how much the picture changed. Stable Flow scores with DINOv2 similarity;
no Hub here, so the score is the mean absolute pixel difference (0..1 of the range) against the plain picture,
with the mean PSNR beside it and, on the embedded models' scene world, the fraction of pictures whose read scene
(colour, background, kind, place) changed. Blocks scoring above ``threshold`` are vital. Candidates are every
block with text-image attention: SD3's joint blocks, Flux.1's and Flux.2's double- and single-stream blocks.

The bypass is a forward hook on each bypassed block, removed in a ``finally``: the pipeline is left exactly as it
was found (the same modules, no hook left), also after an exception.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InvalidArgumentError, RecorderStateError, UnsupportedPipelineError
from .families import detect_family
from .record.attach import module_hooks

#: Default vital threshold on the mean absolute pixel difference (a fraction of the 0..255 range).
DEFAULT_THRESHOLD = 0.05
_MMDIT_HELP = "vital layers are measured on MMDiT families: SD3 and Flux.1/Flux.2 (sd3, flux, flux2)"


def candidate_blocks(pipe: Any) -> list[str]:
    """Module names of the denoiser's transformer blocks that hold text-image attention, in the order they run
    (SD3: ``transformer_blocks.i``; Flux.1/Flux.2: ``transformer_blocks.i`` then ``single_transformer_blocks.i``).

    Raises :class:`UnsupportedPipelineError` for a family without such blocks (the UNet families)."""
    from .record.joint import joint_attention_layers

    family = detect_family(pipe)
    if family.denoiser != "transformer":
        raise UnsupportedPipelineError(
            f"{family.label} has no joint-attention transformer blocks: {_MMDIT_HELP}. Its UNet's layers are "
            "not bypassable blocks of one residual stream."
        )
    den = family.get_denoiser(pipe)
    blocks = []
    for name, _layout in joint_attention_layers(den):
        block = name.removesuffix(".processor").rpartition(".")[0]  # "transformer_blocks.0.attn" → its block
        if block and block not in blocks:
            blocks.append(block)
    if not blocks:
        raise UnsupportedPipelineError(
            f"{family.label}'s denoiser has no joint-attention blocks: {_MMDIT_HELP}."
        )
    return blocks


def _bypass_hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Replace a block's output by its input: ``(encoder_hidden_states, hidden_states)`` for SD3's and Flux's
    double-stream blocks and Flux.1's single-stream blocks, ``hidden_states`` for Flux.2's single-stream blocks."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    if isinstance(output, torch.Tensor):
        if output.shape != hidden.shape:
            raise RecorderStateError(
                f"Cannot bypass {type(module).__name__}: its output {tuple(output.shape)} is not shaped like its "
                f"input {tuple(hidden.shape)}."
            )
        return hidden
    if not isinstance(output, tuple) or len(output) != 2:
        raise RecorderStateError(
            f"Cannot bypass {type(module).__name__}: it returns {type(output).__name__}, not "
            "(encoder_hidden_states, hidden_states)."
        )
    context = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
    out_context, out_hidden = output
    if out_hidden.shape != hidden.shape or (
        out_context is not None and (context is None or out_context.shape != context.shape)
    ):
        raise RecorderStateError(
            f"Cannot bypass {type(module).__name__}: its outputs are not shaped like its inputs."
        )
    return (None if out_context is None else context, hidden)  # SD3's last block drops the context: keep that


@contextmanager
def bypassed(pipe: Any, blocks: Sequence[str]) -> Iterator[None]:
    """Inside the block, the named transformer blocks (see :func:`candidate_blocks`) return their input.

    One forward hook per block, removed on exit (success, exception or KeyboardInterrupt): the pipeline is left
    as it was found. ``blocks=[]`` changes nothing."""
    names = _check_blocks(pipe, blocks)
    denoiser = detect_family(pipe).denoiser
    with module_hooks(pipe, post={f"{denoiser}.{name}": _bypass_hook for name in names}):
        yield


def _check_blocks(pipe: Any, blocks: Any) -> list[str]:
    candidates = candidate_blocks(pipe)
    if isinstance(blocks, str) or not isinstance(blocks, Sequence):
        raise InvalidArgumentError(f"blocks={blocks!r}: pass a list of block names, e.g. {candidates[:2]}.")
    unknown = [b for b in blocks if b not in candidates]
    if unknown:
        raise InvalidArgumentError(
            f"{unknown} are not joint-attention blocks of this {detect_family(pipe).label} denoiser; its blocks "
            f"are {candidates}."
        )
    return list(dict.fromkeys(blocks))


@dataclass
class VitalLayers:
    """What :func:`vital_layers` measured: one score per candidate block, the vital ones, the settings."""

    blocks: list[str]  # every candidate block, in the order the denoiser runs them
    scores: list[
        float
    ]  # per block: mean |bypassed − plain| over pixels, channels and images, 0..1 of the range
    psnr: list[
        float
    ]  # per block: PSNR (dB) of the pictures' mean squared error against the plain ones (inf: identical)
    scene_changed: (
        list[float] | None
    )  # per block: fraction of pictures whose read scene changed (read_scenes=True)
    threshold: float  # a block is vital when its score is above this
    settings: dict[str, Any] = field(default_factory=dict)  # prompts, seeds and the call's arguments

    @property
    def ranking(self) -> list[str]:
        """Every block, the most vital first (ties in the denoiser's order)."""
        order = sorted(range(len(self.blocks)), key=lambda i: (-self.scores[i], i))
        return [self.blocks[i] for i in order]

    @property
    def vital(self) -> list[str]:
        """The vital blocks (score above the threshold), in the denoiser's order."""
        return [b for b, s in zip(self.blocks, self.scores, strict=True) if s > self.threshold]

    @property
    def non_vital(self) -> list[str]:
        """The other blocks, in the denoiser's order."""
        vital = set(self.vital)
        return [b for b in self.blocks if b not in vital]

    def least_vital(self, k: int) -> list[str]:
        """The ``k`` blocks whose bypass changed the pictures least (in the denoiser's order)."""
        chosen = set(self.ranking[len(self.blocks) - k :]) if k > 0 else set()
        return [b for b in self.blocks if b in chosen]

    def score(self, block: str) -> float:
        """The score of one block (InvalidArgumentError for a name not measured)."""
        if block not in self.blocks:
            raise InvalidArgumentError(f"{block!r} was not measured; the blocks are {self.blocks}.")
        return self.scores[self.blocks.index(block)]

    def table(self) -> str:
        """A plain-text table of the ranking: block, score, PSNR, scene changed, vital."""
        lines = [f"{'block':32s} {'|Δ| (0-1)':>10s} {'PSNR dB':>8s} {'scene Δ':>8s}  vital"]
        for b in self.ranking:
            i = self.blocks.index(b)
            scene = "" if self.scene_changed is None else f"{self.scene_changed[i]:.2f}"
            lines.append(
                f"{b:32s} {self.scores[i]:10.4f} {self.psnr[i]:8.2f} {scene:>8s}  "
                f"{'yes' if self.scores[i] > self.threshold else ''}"
            )
        return "\n".join(lines)


def _psnr(images: list[np.ndarray], plain: list[np.ndarray]) -> float:
    """PSNR (dB) of the pictures' pooled mean squared error against the plain ones (inf: all identical)."""
    mse = float(
        np.mean(
            [
                np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
                for a, b in zip(images, plain, strict=True)
            ]
        )
    )
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _scene_key(image: np.ndarray) -> tuple[str, str, str, str]:
    from .embedded.scenes import read_scene

    r = read_scene(image)
    return (r.colour, r.background, r.shape, r.place)


_FORBIDDEN = ("prompt", "prompt_embeds", "latents", "generator", "output_type", "num_images_per_prompt")


def _generate(pipe: Any, prompts: list[str], seeds: list[int], batch: int, call: dict) -> list[np.ndarray]:
    """Every (seed, prompt) picture as uint8 (H, W, 3), seeds outer; each picture's noise from its own seed."""
    jobs = [(p, s) for s in seeds for p in prompts]
    images: list[np.ndarray] = []
    for start in range(0, len(jobs), batch):
        part = jobs[start : start + batch]
        gens = [torch.Generator().manual_seed(s) for _, s in part]
        out = pipe(prompt=[p for p, _ in part], generator=gens, **call)
        images += [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in out.images]
    return images


def vital_layers(
    pipe: Any,
    prompts: str | Sequence[str],
    *,
    seeds: Sequence[int] = (0, 1),
    threshold: float = DEFAULT_THRESHOLD,
    blocks: Sequence[str] | None = None,
    read_scenes: bool = False,
    batch_size: int | None = None,
    **call: Any,
) -> VitalLayers:
    """Find the vital blocks of an MMDiT by bypassing each block in turn (Stable Flow, Avrahami et al. 2025).

    ::

        vl = sdexplore.vital_layers(pipe, ["a big red circle at the top left on a blue background", ...],
                                    seeds=[0, 1], num_inference_steps=20, guidance_scale=3.0)
        vl.ranking, vl.vital, print(vl.table())

    Every prompt is generated with every seed (each picture's noise from ``torch.Generator().manual_seed(seed)``),
    plainly and then with each block of ``blocks`` (default: every candidate, :func:`candidate_blocks`) bypassed.
    A block's score is the mean absolute difference of its bypassed pictures from the plain ones (uint8 pixels,
    as a fraction of 255); it is vital above ``threshold``. ``read_scenes=True`` (the embedded models' world) also
    reads each picture with :func:`sdexplore.embedded.scenes.read_scene` and counts the pictures whose colour, background,
    kind or place changed. ``batch_size`` pictures go through the pipeline at once (default: all). Other
    keywords go to every pipeline call (``num_inference_steps``, ``guidance_scale``, ``height``, ``width``...).

    Raises, before any generation: :class:`UnsupportedPipelineError` for a family without joint-attention blocks
    (the UNet families; SD3, Flux.1 and Flux.2 have them); :class:`InvalidArgumentError` for no prompts, no
    seeds, a negative or non-finite threshold, an unknown block, or a keyword this function sets itself.
    """
    candidates = candidate_blocks(pipe)
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise InvalidArgumentError(
            f"prompts={prompts!r}: pass one or more prompts (non-empty strings) to generate with and without "
            "each block."
        )
    if (
        isinstance(seeds, (str, bytes))
        or not isinstance(seeds, Sequence)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
    ):
        raise InvalidArgumentError(f"seeds={seeds!r}: pass one or more seeds (ints ≥ 0), e.g. [0, 1].")
    try:
        thr = float(threshold)
    except (TypeError, ValueError):
        thr = math.nan
    if isinstance(threshold, bool) or not math.isfinite(thr) or thr < 0:
        raise InvalidArgumentError(
            f"threshold={threshold!r}: pass a number ≥ 0 (the mean absolute pixel change, as a fraction of the "
            f"range, above which a block is vital; default {DEFAULT_THRESHOLD})."
        )
    chosen = candidates if blocks is None else _check_blocks(pipe, blocks)
    if not chosen:
        raise InvalidArgumentError("blocks=[]: pass at least one block to measure (or None for every block).")
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise InvalidArgumentError(f"batch_size={batch_size!r}: pass a positive int or None (all at once).")
    for key in _FORBIDDEN:
        if key in call:
            raise InvalidArgumentError(
                f"vital_layers() sets {key}= itself (the prompts, one generator per picture from the seeds, "
                "PIL pictures): drop it."
            )
    prompts, seeds = list(prompts), list(seeds)
    batch = batch_size or len(prompts) * len(seeds)

    plain = _generate(pipe, prompts, seeds, batch, call)
    plain_scenes = [_scene_key(im) for im in plain] if read_scenes else None
    scores, psnrs, changed = [], [], []
    for block in chosen:
        with bypassed(pipe, [block]):
            images = _generate(pipe, prompts, seeds, batch, call)
        diffs = [
            float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) / 255.0
            for a, b in zip(images, plain, strict=True)
        ]
        scores.append(float(np.mean(diffs)))
        psnrs.append(_psnr(images, plain))
        if plain_scenes is not None:
            keys = [_scene_key(im) for im in images]
            changed.append(float(np.mean([k != p for k, p in zip(keys, plain_scenes, strict=True)])))
    settings = dict(
        prompts=prompts,
        seeds=seeds,
        family=detect_family(pipe).name,
        measure="mean absolute pixel difference (0-1) of the bypassed picture against the plain one",
        **{k: v for k, v in call.items() if isinstance(v, (int, float, str, bool))},
    )
    return VitalLayers(
        blocks=list(chosen),
        scores=scores,
        psnr=psnrs,
        scene_changed=changed if read_scenes else None,
        threshold=thr,
        settings=settings,
    )


# ---- editing by injection at the vital blocks (Stable Flow) -----------------------------------------------------
def injection_layers(pipe: Any, inject: Any) -> list[str]:
    """The joint-attention module names :class:`~sdexplore.record.control.Inject` takes for ``inject``:

    a :class:`VitalLayers` (its vital blocks), ``"all"`` (every candidate block), ``"none"`` (no block: the plain
    batch), or a list of block names of :func:`candidate_blocks`. Raises :class:`InvalidArgumentError` otherwise,
    and for a :class:`VitalLayers` measured on blocks this denoiser has not."""
    from .record.joint import joint_attention_layers

    candidates = candidate_blocks(pipe)
    if isinstance(inject, VitalLayers):
        missing = [b for b in inject.blocks if b not in candidates]
        if missing:
            raise InvalidArgumentError(
                f"These vital layers were measured on blocks this denoiser has not ({missing}): measure them on "
                "this pipeline with sdexplore.vital.vital_layers(pipe, prompts)."
            )
        blocks = inject.vital
    elif inject == "all":
        blocks = candidates
    elif inject == "none":
        blocks = []
    elif inject == "vital":
        raise InvalidArgumentError(
            "inject='vital' needs the measurement: vl = sdexplore.vital.vital_layers(pipe, prompts, ...), then "
            "inject=vl (vital layers are a property of the model, measured on it, not assumed)."
        )
    else:
        blocks = _check_blocks(pipe, inject)
    den = detect_family(pipe).get_denoiser(pipe)
    layers = [n.removesuffix(".processor") for n, _ in joint_attention_layers(den)]
    return [layer for layer in layers if layer.rpartition(".")[0] in set(blocks)]  # the blocks' attention


def edit(
    pipe: Any,
    prompt: str | Sequence[str],
    target: str | Sequence[str],
    *,
    inject: Any = "all",
    steps: Sequence[float] = (0.0, 1.0),
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    latents: torch.Tensor | None = None,
    attention: bool = False,
    **call: Any,
) -> Any:
    """Stable Flow's edit: ``prompt`` and ``target`` in one batch from the same noise, the target's image keys and
    values replaced by the source's in the attention of the ``inject`` blocks, at every step of ``steps``.

    ::

        vl = sdexplore.vital.vital_layers(pipe, prompts, seeds=[0, 1], num_inference_steps=20)
        res = sdexplore.vital.edit(pipe, "a big red circle ...", "a big red square ...", inject=vl,
                                   generator=torch.Generator().manual_seed(0), num_inference_steps=20)
        res.source, res.edited

    ``inject``: a :class:`VitalLayers` (inject at its vital blocks, as the paper does), ``"all"``, ``"none"`` (the
    naive baseline: the target regenerated from the same noise) or a list of block names. ``generator`` is one
    generator per source prompt (a single one for one prompt): each source image is the plain image of its prompt
    with that generator, and its target starts from the very same noise (the generator's state is copied).
    ``latents`` gives the sources' initial latents as the pipeline takes them instead. ``attention=True`` records
    both branches' maps. Other keywords go to the pipeline (``num_inference_steps``, ``guidance_scale``,
    ``height``, ``width``, ...). Returns an :class:`~sdexplore.results.edit.Edit` whose ``settings`` record
    ``method="inject"`` and the injected blocks.

    Raises before any work: :class:`UnsupportedPipelineError` for a family without joint-attention blocks;
    :class:`InvalidArgumentError` for prompts and targets that do not pair up, a generator count other than the
    prompts', both ``generator`` and ``latents``, a step fraction outside [0, 1], or an unknown block.
    """
    from .record.control import Control, Inject
    from .results.edit import Edit, take_images

    layers = injection_layers(pipe, inject)
    sources = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, Sequence) else []
    targets = [target] if isinstance(target, str) else list(target) if isinstance(target, Sequence) else []
    if not sources or not all(isinstance(p, str) and p for p in sources + targets):
        raise InvalidArgumentError(f"prompt={prompt!r}, target={target!r}: pass prompts (non-empty strings).")
    if len(targets) != len(sources):
        raise InvalidArgumentError(
            f"{len(sources)} source prompt(s) but {len(targets)} target prompt(s): pass one target per source."
        )
    for forbidden in ("prompt_embeds", "output_type", "num_images_per_prompt", "callback_on_step_end"):
        if forbidden in call:
            raise InvalidArgumentError(
                f"vital.edit() does not take {forbidden}=: it edits one image per prompt, from the prompts' text, "
                "and returns PIL images. Use `with sdexplore.Control(pipe, Inject(...))` around your own call."
            )
    if generator is not None and latents is not None:
        raise InvalidArgumentError("Pass generator= or latents= (the sources' initial latents), not both.")
    gens = None
    if generator is not None:
        gens = [generator] if isinstance(generator, torch.Generator) else list(generator)
        if len(gens) != len(sources) or not all(isinstance(g, torch.Generator) for g in gens):
            raise InvalidArgumentError(
                f"generator: pass one torch.Generator per source prompt ({len(sources)}), got {generator!r}."
            )
        copies = []
        for g in gens:
            c = torch.Generator(device=g.device)
            c.set_state(g.get_state())  # the target's noise is the source's
            copies.append(c)
        gens = gens + copies
    both = None
    if latents is not None:
        if not isinstance(latents, torch.Tensor) or latents.shape[0] != len(sources):
            raise InvalidArgumentError(
                f"latents: pass one tensor with one row per source prompt ({len(sources)}), as the pipeline takes "
                "its latents."
            )
        both = torch.cat([latents, latents])  # (2B, ...): the same noise for source and target
    control = Control(pipe, Inject(layers, steps=steps))  # checks the family and the steps before any work

    recorder = None
    if attention:
        from .record.attention import AttentionRecorder

        recorder = AttentionRecorder(pipe)
    kw = dict(call)
    if gens is not None:
        kw["generator"] = gens
    if both is not None:
        kw["latents"] = both
    maps = None
    with control:
        if recorder is not None:
            with recorder:
                out = pipe(prompt=sources + targets, **kw)
            maps = recorder.maps
        else:
            out = pipe(prompt=sources + targets, **kw)
    images = list(out.images)
    n = len(sources)
    one = isinstance(prompt, str)
    blocks = sorted({layer.rpartition(".")[0] for layer in layers}, key=candidate_blocks(pipe).index)
    settings = dict(
        method="inject",
        inject=blocks,
        steps=[float(s) for s in steps],
        num_images_per_prompt=1,
        **{k: v for k, v in call.items() if isinstance(v, (int, float, str))},
    )
    return Edit(
        source=images[0] if one else images[:n],
        edited=images[n] if one else images[n:],
        source_prompt=prompt if one else sources,
        edited_prompt=targets[0] if one else targets,
        source_maps=None if maps is None else take_images(maps, slice(0, n)),
        edited_maps=None if maps is None else take_images(maps, slice(n, 2 * n)),
        settings=settings,
    )
