"""Jacobian directions (Park et al., NeurIPS 2023, "Understanding the Latent Space of Diffusion Models through the
Lens of Riemannian Geometry"): the top right-singular vectors of J = ∂h/∂x_t at one denoising step.

``h`` is the image-stream output of one attention layer (the same layer ``space="inner"`` uses: the UNet's
mid-block self-attention, an MMDiT's middle joint block) for the prompt's conditional row, and ``x_t`` the latents
the denoiser gets at step ``step`` of the prompt's run from the seed's noise. The vectors are the directions in
which a small move of ``x_t`` changes ``h`` most (the pullback metric's leading axes). They are found by subspace
iteration on JᵀJ, one Jacobian-vector product (``torch.func.jvp``) and one vector-Jacobian product
(``torch.func.vjp``) per vector and iteration, then a Rayleigh–Ritz step (the SVD of J·V) gives the singular
values and the final order. The denoiser runs only up to the layer: the rest of the network is skipped.

A Jacobian direction is a move of the latents (``space="latent"``): applied at strength s it adds
``s · shift`` to x_t at its step, where ``shift`` is the unit singular vector times ``step_size`` (a tenth of
the norm of that x_t, kept in ``settings``), so strength 1 moves x_t by 10 % of its length; the rest of the run
denoises from there, as in the paper's edits.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any

import torch

from ..errors import InvalidArgumentError
from ..families import Family
from ..record.attach import Run, Subscriber, attach, module_hooks
from .apply import check_family
from .find import _call_options, _device, check_layer

#: strength 1 moves x_t by this share of its own norm
STEP_SIZE = 0.1
#: extra vectors iterated beside the k asked for (they speed up convergence where σ_k and σ_k+1 are close)
OVERSAMPLE = 2


class _Stop(Exception):
    """Raised inside the pipeline (or the denoiser) once what is needed has been seen."""


def _default_steps(pipe: Any) -> int | None:
    try:
        default = inspect.signature(type(pipe).__call__).parameters["num_inference_steps"].default
    except (KeyError, TypeError, ValueError):
        return None
    return default if isinstance(default, int) else None


def _check_int(value: Any, name: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise InvalidArgumentError(f"{name} must be an int ≥ {lo}, got {value!r}.")
    return int(value)


def _rows(value: Any, rows: int, cond: slice) -> Any:
    """``value`` with every tensor that has one row per batch row cut to the conditional rows (dicts too)."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows:
        return value[cond]
    if isinstance(value, dict):
        return {k: _rows(v, rows, cond) for k, v in value.items()}
    return value


class _StepInputs:
    """Subscriber: keep the denoiser's inputs at step ``step`` of the run, then stop the run."""

    def __init__(self, family: Family, step: int) -> None:
        self.family, self.step = family, step
        self.args: tuple | None = None
        self.kwargs: dict | None = None
        self.cfg = False
        self.num_steps = 0
        self.sub = Subscriber(kind="direction-jacobian", denoiser_pre=self._pre)

    def _pre(self, run: Run, args: tuple, kwargs: dict) -> None:
        self.num_steps = run.num_steps
        if run.calls != self.step:  # before the call the attachment has not counted it yet
            return None
        self.args, self.kwargs, self.cfg = args, kwargs, run.cfg
        raise _Stop


def _layer_map(
    pipe: Any, family: Family, layer: str, args: tuple, kwargs: dict, cfg: bool
) -> tuple[Any, torch.Tensor]:
    """``(f, x)``: f maps the conditional row's denoiser input x (1, C, h, w) to the layer's image-stream output
    (1, HW, C') of that row; the denoiser stops at the layer."""
    spec = family.denoiser_args
    den = family.get_denoiser(pipe)
    sample = spec.get("sample", args, kwargs)  # (2B|B, C, h, w)
    rows = sample.shape[0]
    cond = family.cfg_rows(rows)[1] if cfg else slice(None)
    args = tuple(_rows(a, rows, cond) for a in args)
    kwargs = {k: _rows(v, rows, cond) for k, v in kwargs.items()}
    x = spec.get("sample", args, kwargs).detach()  # (1, C, h, w)
    box: list[torch.Tensor] = []

    def hook(_m: Any, _args: Any, _kwargs: Any, out: Any) -> None:
        box.append(out[0] if isinstance(out, tuple) else out)  # (1, HW, C'): SD3's (image, text) → image
        raise _Stop

    def f(x: torch.Tensor) -> torch.Tensor:
        a, kw = spec.replace("sample", args, kwargs, x)
        with module_hooks(pipe, post={f"{family.denoiser}.{layer}": hook}):
            try:
                den(*a, **kw)
            except _Stop:
                pass
        return box.pop()

    return f, x


def _top_singular(
    f: Any, x: torch.Tensor, k: int, iterations: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k right-singular vectors (n, k) and singular values (k,) of J = ∂f/∂x by subspace iteration (a block of
    k + OVERSAMPLE vectors, the top k of its Rayleigh–Ritz step kept)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n = x.numel()
    shape, dtype = x.shape, x.dtype
    b = min(n, k + OVERSAMPLE)  # block size

    # SDPA's fused CPU/GPU kernels have no forward-mode derivative; the math kernel is the same attention
    with sdpa_kernel(SDPBackend.MATH):
        _, vjp_fn = torch.func.vjp(f, x)

        like: list[torch.Tensor] = []  # the layer output (1, HW, C'), for the VJP's shape and dtype

        def jv(v: torch.Tensor) -> torch.Tensor:  # (n,) → (m,)
            out, t = torch.func.jvp(f, (x,), (v.reshape(shape).to(dtype),))
            like[:] = [out.detach()]
            return t.detach().reshape(-1).float()

        def jtu(u: torch.Tensor) -> torch.Tensor:  # (m,) → (n,)
            (g,) = vjp_fn(u.reshape(like[0].shape).to(like[0].dtype))
            return g.detach().reshape(-1).float()

        v = torch.randn(n, b, generator=generator, dtype=torch.float32).to(x.device)  # (n, b)
        v, _ = torch.linalg.qr(v)
        for _ in range(iterations):
            cols = [jtu(jv(v[:, i])) for i in range(b)]
            v, _ = torch.linalg.qr(torch.stack(cols, 1))  # (n, b) JᵀJ·V, orthonormalised
        y = torch.stack([jv(v[:, i]) for i in range(b)], 1)  # (m, b) J·V
    _, s, zh = torch.linalg.svd(y.double(), full_matrices=False)  # Rayleigh–Ritz: J·V = U S Zᵀ
    vecs = (v.double() @ zh[:k].T).float()  # (n, k) sorted by singular value
    # a sign convention, so the same run gives the same vectors: the largest entry is positive
    idx = vecs.abs().argmax(0)
    vecs = vecs * torch.sign(vecs[idx, torch.arange(k)])
    return vecs, s[:k].float()


def jacobian(
    pipe: Any,
    prompt: str,
    *,
    step: int,
    k: int = 5,
    iterations: int = 10,
    seed: int = 0,
    layer: str | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
) -> list[Any]:
    """Unsupervised latent directions (Park et al. 2023): the top ``k`` right-singular vectors of the Jacobian of
    ``layer``'s output (default: the inner layer of ``space="inner"``) with respect to x_t, at step ``step`` of
    ``prompt``'s run from ``seed``'s noise.

    ``step`` counts from 0 and must be ≥ 1 (x_t at step 0 is the seed's noise itself, which a direction cannot move
    from inside the run). ``iterations`` rounds of subspace iteration (each ``k + 2`` JVPs and VJPs). Each
    direction moves x_t at ``step`` (``space="latent"``, ``steps=[step]``): strength 1 is the unit singular vector
    times a tenth of that x_t's norm. Its singular value is ``settings["singular_value"]`` (all k in
    ``settings["singular_values"]``), and ``variance_explained`` is its σ² over the sum of the k σ². Sorted by
    singular value, largest first. Bad input raises :class:`~sdexplore.errors.InvalidArgumentError` before any work.
    """
    from . import Direction

    family = check_family(pipe)
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidArgumentError(f"prompt must be one non-empty prompt, got {prompt!r}.")
    step = _check_int(step, "step", 0)
    if step < 1:
        raise InvalidArgumentError(
            "step must be ≥ 1: x_t at step 0 is the seed's noise itself, which a direction applied inside the run "
            "cannot move (choose step=1 or later)."
        )
    k = _check_int(k, "k", 1)
    iterations = _check_int(iterations, "iterations", 1)
    seed = _check_int(seed, "seed", 0)
    layer = check_layer(pipe, family, layer)
    total = num_inference_steps if num_inference_steps is not None else _default_steps(pipe)
    if num_inference_steps is not None:
        _check_int(num_inference_steps, "num_inference_steps", 1)
    if isinstance(total, int) and step >= total:
        raise InvalidArgumentError(
            f"step={step} is beyond the run's {total} steps: choose a step in 1..{total - 1}."
        )
    call = _call_options(num_inference_steps, guidance_scale, height, width)

    cap = _StepInputs(family, step)
    device = _device(pipe, family)
    gen = torch.Generator("cpu" if device.type == "mps" else device).manual_seed(seed)
    with attach(pipe, cap.sub, family):
        try:
            pipe(prompt=prompt, generator=gen, output_type="latent", **call)
        except _Stop:
            pass
    if cap.args is None or cap.kwargs is None:
        raise InvalidArgumentError(
            f"step={step} is beyond the run's {cap.num_steps} steps: choose a step in 1..{cap.num_steps - 1}."
        )
    f, x = _layer_map(pipe, family, layer, cap.args, cap.kwargs, cap.cfg)
    n = x.numel()
    if k > n:
        raise InvalidArgumentError(f"k={k} exceeds the latents' {n} dimensions.")
    vecs, sigma = _top_singular(f, x, k, iterations, torch.Generator().manual_seed(seed))
    step_size = STEP_SIZE * float(x.double().norm())
    shares = sigma.double().square() / float(sigma.double().square().sum().clamp_min(1e-30))
    out = []
    for i in range(k):
        out.append(
            Direction(
                space="latent",
                method="jacobian",
                family=family.name,
                shift=(vecs[:, i] * step_size).reshape(x.shape[1:]).cpu(),  # (C, h, w)
                layer=layer,
                steps=[step],
                num_steps=cap.num_steps,
                seeds=[seed],
                variance_explained=float(shares[i]),
                settings={
                    **call,
                    "prompts": [prompt],
                    "component": i,
                    "singular_value": float(sigma[i]),
                    "singular_values": [float(s) for s in sigma],
                    "step_size": step_size,
                    "iterations": iterations,
                },
            )
        )
    return out
