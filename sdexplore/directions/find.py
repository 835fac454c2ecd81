"""Finding directions: difference of means over prompt pairs (text or inner space), PCA of inner activations.

- **Pairs, text space**: the mean over pairs of ``encode(second) − encode(first)``, per token, and of the pooled
  vectors where the family has one. Applied at strength 1 to a pair's first prompt (one pair) it gives exactly
  the second prompt's embedding.
- **Pairs, inner space** (Asyrp's h-space, Kwon et al. ICLR 2023): each prompt of each pair is generated from
  each seed, the image-stream output of one attention layer is averaged over the chosen steps, per half of the
  CFG batch, and the direction is the mean over pairs and seeds of (second − first): (2, HW, C).
- **PCA** (unsupervised h-space directions, Haas et al. 2023): the layer's conditional output, averaged over
  the chosen steps, for every (prompt, seed); principal components of those vectors, each scaled to one standard
  deviation (strength 1 = one σ along the component), with its share of the variance.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InvalidArgumentError
from ..families import Family
from ..record.attach import AttentionTap, Run, Subscriber, attach
from .apply import StreamTap, check_family, check_layer_free, check_steps


def default_layer(pipe: Any, family: Family) -> str:
    """The inner layer a direction is found at by default: the UNet's mid-block self-attention (its bottleneck,
    Asyrp's h-space); an MMDiT's middle joint block's attention (its image stream)."""
    den = family.get_denoiser(pipe)
    if family.denoiser == "unet":
        names = [n for n, m in den.named_modules() if n.startswith("mid_block.") and n.endswith(".attn1")]
        if not names:
            raise InvalidArgumentError(
                "This UNet's mid block has no attention layer; give layer= (a self-attention module name)."
            )
        return names[-1]
    blocks = getattr(den, "transformer_blocks", None)
    if not blocks:
        raise InvalidArgumentError(
            "This transformer has no joint blocks; give layer= (an attention module name)."
        )
    return f"transformer_blocks.{len(blocks) // 2}.attn"


def check_layer(pipe: Any, family: Family, layer: Any) -> str:
    """``layer`` names an attention module of the denoiser (None: :func:`default_layer`)."""
    if layer is None:
        return default_layer(pipe, family)
    den = family.get_denoiser(pipe)
    try:
        module = den.get_submodule(layer) if isinstance(layer, str) else None
    except AttributeError:
        module = None
    if module is None or not hasattr(module, "set_processor"):
        raise InvalidArgumentError(
            f"layer={layer!r} is not an attention module of the {family.denoiser}; give a module name such as "
            f"{default_layer(pipe, family)!r}."
        )
    return layer


def check_pairs(pairs: Any) -> list[tuple[str, str]]:
    """A non-empty list of (first, second) prompt pairs; not every pair the same prompt twice."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or len(pairs) == 0:
        raise InvalidArgumentError(
            "pairs must be a non-empty list of (prompt, prompt) pairs, e.g. [('a red circle', 'a blue circle')]."
        )
    out = []
    for i, p in enumerate(pairs):
        if (
            isinstance(p, str)
            or not isinstance(p, Sequence)
            or len(p) != 2
            or not all(isinstance(x, str) and x.strip() for x in p)
        ):
            raise InvalidArgumentError(
                f"pairs[{i}] is {p!r}: each pair must be two non-empty prompts (first, second); the direction "
                "moves the first onto the second."
            )
        out.append((p[0], p[1]))
    if all(a == b for a, b in out):
        raise InvalidArgumentError("Every pair is the same prompt twice: there is no difference to find.")
    return out


def check_seeds(seeds: Any) -> list[int]:
    """An int or a non-empty list of ints ≥ 0."""
    if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (
        isinstance(seeds, str)
        or not isinstance(seeds, Sequence)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in seeds)
    ):
        raise InvalidArgumentError(f"seeds must be an int or a non-empty list of ints ≥ 0, got {seeds!r}.")
    return [int(s) for s in seeds]


def _device(pipe: Any, family: Family) -> torch.device:
    return family.get_denoiser(pipe).device


def encode(
    pipe: Any, family: Family, prompts: list[str], **options: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditional prompt embeddings (N, T, D) and pooled ones (N, P) or None, from the pipeline's encoder."""
    enc = family.encode_prompt(
        pipe, prompts, device=_device(pipe, family), do_classifier_free_guidance=False, **options
    )
    return (
        enc.embeds.detach().float().cpu(),
        None if enc.pooled is None else enc.pooled.detach().float().cpu(),
    )


class _Capture:
    """Subscriber that keeps the layer's image-stream output, averaged over the chosen steps, per image row."""

    def __init__(self, pipe: Any, family: Family, layer: str, steps: list[int] | None) -> None:
        self.family, self.layer, self.steps = family, layer, steps
        self.run: Run | None = None
        self.sums: torch.Tensor | None = None  # (2B, HW, C) this run's per-row sum over chosen steps
        self.count = 0
        self.num_steps = 0
        self.cfg = False
        self.sub = Subscriber(
            kind="direction-capture",
            run_start=self._start,
            attention=AttentionTap({f"{layer}.processor": lambda original: StreamTap(original, self._edit)}),
        )
        self.attachment: Any = None

    def _start(self, run: Run) -> None:
        self.run, self.sums, self.count = run, None, 0

    def _edit(self, image: torch.Tensor) -> None:
        run = self.run
        if run is None or not run.started:
            return None
        step = run.calls - 1
        self.num_steps, self.cfg = run.num_steps, run.cfg
        if self.steps is not None and step not in self.steps:
            return None
        x = image.detach().float().cpu()  # (N, HW, C)
        self.sums = x.clone() if self.sums is None else self.sums + x
        self.count += 1
        return None

    def halves(self) -> torch.Tensor:
        """(B, 2, HW, C): each image's mean output over the chosen steps, (uncond, cond); without CFG both cond."""
        if self.sums is None or self.count == 0:
            raise InvalidArgumentError(
                f"No step of the run was among steps={self.steps}: choose steps below the run's {self.num_steps}."
            )
        mean = self.sums / self.count  # (N, HW, C)
        if self.cfg:
            u, c = self.family.cfg_halves(mean)  # (B, HW, C) each
        else:
            u = c = mean
        return torch.stack([u, c], dim=1)  # (B, 2, HW, C)


def generate_inner(
    pipe: Any,
    family: Family,
    prompts: list[str],
    seeds: list[int],
    layer: str,
    steps: list[int] | None,
    call: dict[str, Any],
    batch_size: int,
) -> tuple[torch.Tensor, int]:
    """(len(prompts), 2, HW, C) mean inner outputs for each prompt with its seed (prompts and seeds aligned), and the
    run's number of steps."""
    check_layer_free(pipe, layer)
    cap = _Capture(pipe, family, layer, steps)
    out = []
    device = _device(pipe, family)
    gen_device = "cpu" if device.type == "mps" else device
    with attach(pipe, cap.sub, family):
        for i in range(0, len(prompts), batch_size):
            chunk, chunk_seeds = prompts[i : i + batch_size], seeds[i : i + batch_size]
            gens = [torch.Generator(gen_device).manual_seed(s) for s in chunk_seeds]
            pipe(prompt=chunk, generator=gens, output_type="latent", **call)
            out.append(cap.halves())
    return torch.cat(out), cap.num_steps


def _check_steps_fit(steps: list[int] | None, num_inference_steps: Any) -> None:
    """Steps beyond the run's length are refused before anything is generated (when the length is given)."""
    if steps is not None and isinstance(num_inference_steps, int) and max(steps) >= num_inference_steps:
        raise InvalidArgumentError(
            f"steps={steps} reach beyond the run's {num_inference_steps} steps: choose steps in "
            f"0..{num_inference_steps - 1}."
        )


def _call_options(num_inference_steps: Any, guidance_scale: Any, height: Any, width: Any) -> dict[str, Any]:
    call = {
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "height": height,
        "width": width,
    }
    return {k: v for k, v in call.items() if v is not None}


def from_pairs(
    pipe: Any,
    pairs: Sequence[tuple[str, str]],
    space: str = "text",
    *,
    seeds: int | Sequence[int] = (0, 1),
    layer: str | None = None,
    steps: Sequence[int] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
    label: str | None = None,
) -> Any:
    """A direction from prompt pairs: the mean of (second − first), in ``space`` "text" or "inner".

    ``pairs`` is a list of (first, second) prompts; at strength 1 the direction moves a pair's first prompt onto
    its second (text space: exactly, for one pair). Text space needs no generation. Inner space generates
    every prompt from every seed (``seeds``; ``num_inference_steps``, ``guidance_scale``, ``height``, ``width`` as
    the pipeline's call takes them) and averages the output of ``layer`` (default :func:`default_layer`) over
    ``steps`` (default every step), separately for the two halves of the CFG batch. The inner direction is tied to
    that image size. Bad input raises :class:`~sdexplore.errors.InvalidArgumentError` before any work.
    """
    from . import Direction

    family = check_family(pipe)
    if space not in ("text", "inner"):
        raise InvalidArgumentError(f"space must be 'text' or 'inner', got {space!r}.")
    pairs = check_pairs(pairs)
    steps = check_steps(steps)
    if (
        batch_size is None
        or isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise InvalidArgumentError(f"batch_size must be an int ≥ 1, got {batch_size!r}.")
    firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
    if space == "text":
        if layer is not None:
            raise InvalidArgumentError(
                "layer= is for inner directions (space='inner'); a text direction has none."
            )
        ea, pa = encode(pipe, family, firsts)
        eb, pb = encode(pipe, family, seconds)
        return Direction(
            space="text",
            method="pairs",
            family=family.name,
            embeds=(eb - ea).mean(0),  # (T, D)
            pooled=None if pa is None or pb is None else (pb - pa).mean(0),  # (P,)
            steps=steps,
            pairs=pairs,
            label=label,
        )
    seeds = check_seeds(seeds)
    layer = check_layer(pipe, family, layer)
    _check_steps_fit(steps, num_inference_steps)
    call = _call_options(num_inference_steps, guidance_scale, height, width)
    n = len(pairs)
    flat_seeds = [s for s in seeds for _ in range(n)]  # (seeds × pairs) rows, aligned in both runs
    acts_a, num_steps = generate_inner(
        pipe, family, firsts * len(seeds), flat_seeds, layer, steps, call, batch_size
    )
    acts_b, _ = generate_inner(pipe, family, seconds * len(seeds), flat_seeds, layer, steps, call, batch_size)
    if steps is not None and max(steps) >= num_steps:
        raise InvalidArgumentError(f"steps={steps} reach beyond the run's {num_steps} steps.")
    return Direction(
        space="inner",
        method="pairs",
        family=family.name,
        shift=(acts_b - acts_a).mean(0),  # (2, HW, C)
        layer=layer,
        steps=steps,
        num_steps=num_steps,
        pairs=pairs,
        seeds=seeds,
        label=label,
        settings=call,
    )


def pca(
    pipe: Any,
    prompts: str | Sequence[str],
    *,
    seeds: int | Sequence[int] = tuple(range(16)),
    components: int = 5,
    layer: str | None = None,
    steps: Sequence[int] | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 8,
) -> list[Any]:
    """Unsupervised inner directions: the top ``components`` principal components of the layer's conditional
    output over every (prompt, seed), averaged over ``steps``.

    Each direction is one standard deviation along its component (the same shift for both CFG halves) and carries
    its share of the total variance (``variance_explained``); they come sorted by it, largest first.
    """
    from . import Direction

    family = check_family(pipe)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise InvalidArgumentError("prompts must be a prompt or a non-empty list of non-empty prompts.")
    seeds = check_seeds(seeds)
    steps = check_steps(steps)
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise InvalidArgumentError(f"components must be an int ≥ 1, got {components!r}.")
    samples = len(prompts) * len(seeds)
    if samples < components + 1:
        raise InvalidArgumentError(
            f"{components} components need at least {components + 1} (prompt, seed) samples; there are {samples}: "
            "give more seeds."
        )
    layer = check_layer(pipe, family, layer)
    _check_steps_fit(steps, num_inference_steps)
    call = _call_options(num_inference_steps, guidance_scale, height, width)
    flat_prompts = [p for _ in seeds for p in prompts]
    flat_seeds = [s for s in seeds for _ in prompts]
    acts, num_steps = generate_inner(pipe, family, flat_prompts, flat_seeds, layer, steps, call, batch_size)
    x = acts[:, 1].reshape(samples, -1).double()  # (N, HW·C) conditional outputs
    x = x - x.mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)  # s (K,), vh (K, HW·C)
    var = s.square() / max(samples - 1, 1)  # (K,) variance along each component
    total = float(var.sum())
    shape = acts.shape[2:]  # (HW, C)
    out = []
    for k in range(min(components, vh.shape[0])):
        vec = (vh[k] * var[k].sqrt()).float().reshape(shape)  # (HW, C): one σ along component k
        out.append(
            Direction(
                space="inner",
                method="pca",
                family=family.name,
                shift=torch.stack([vec, vec]),  # (2, HW, C)
                layer=layer,
                steps=steps,
                num_steps=num_steps,
                seeds=seeds,
                variance_explained=float(var[k]) / total if total > 0 else 0.0,
                settings={**call, "prompts": prompts, "component": k},
            )
        )
    return out
