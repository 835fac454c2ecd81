"""Memory of attention capture, worked out before the denoising loop: what the maps will take, a plan that fits
``max_bytes``, and the check against the memory the machine has free.

The stored maps of one call are (float32 unless said; B rows captured, T keys, S denoiser calls):

- the aggregate, ``B × T × H × W`` at the latent size ``(H, W)``, and the timesteps (``S``);
- per layer, its mean map ``B × T × h × w`` at the layer's own grid (``× (1 + heads)`` with ``per_head``), and with
  ``keep_probs`` every probability ``S × B × heads × hw × T`` in the denoiser's dtype;
- the per-step maps ``S × B × T × hs × ws`` at the step resolution, whatever the number of layers.

Other relations (:mod:`sdexplore.record.relations`) fill the same terms: image→image maps have the ``Q`` selected
queries in place of the ``T`` keys (and ``extra_bytes`` counts their (Q, H, W) query masks); text→image maps are
laid out as image→text; text→text maps are ``(1, T)`` rows, the grids and the "latent" ``(1, T)``. With ``heads=``,
``heads`` counts the selected heads.

A video's maps carry its ``F`` frames before ``(h, w)`` (``plan(frames=F)``): every term but the timesteps is ``F``
times an image's. So the maps grow as image tokens × text tokens × layers, and the per-step maps as steps: the growth laws of
``docs/architecture.md`` and ``tests/test_attention_budget.py``. A layer's grid is read off the denoiser's
structure before any call (UNet: the down/up samplers before its block; MMDiT: the patch size), so a plan needs
no trial step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from ..errors import MemoryBudgetError

FLOAT = 4  # bytes of a float32 map value


def layer_scales(denoiser: torch.nn.Module, names: list[str], patch: int) -> dict[str, int]:
    """Downsampling factor of each attention layer's query grid against the latent (1 = latent resolution).

    UNet layers: 2 to the number of downsamplers met before the layer's block (down blocks), at the bottom
    (mid block), or that many minus the upsamplers met before it (up blocks). Layers of any other module (MMDiT
    blocks) work on the ``patch``-sized patches of the latent. Module paths are processor names without
    ``.processor``.
    """
    downs = list(getattr(denoiser, "down_blocks", []) or [])
    ups = list(getattr(denoiser, "up_blocks", []) or [])
    before_down, k = [], 0
    for block in downs:
        before_down.append(k)
        k += 1 if getattr(block, "downsamplers", None) else 0
    bottom = k
    before_up, j = [], bottom
    for block in ups:
        before_up.append(j)
        j -= 1 if getattr(block, "upsamplers", None) else 0
    out = {}
    for name in names:
        parts = name.split(".")
        if parts[0] == "down_blocks" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < len(downs):
            out[name] = 2 ** before_down[int(parts[1])]
        elif parts[0] == "mid_block" and downs:
            out[name] = 2**bottom
        elif parts[0] == "up_blocks" and len(parts) > 1 and parts[1].isdigit() and int(parts[1]) < len(ups):
            out[name] = 2 ** max(before_up[int(parts[1])], 0)
        else:
            out[name] = max(int(patch), 1)
    return out


def grid(latent: tuple[int, int], scale: int) -> tuple[int, int]:
    """A layer's query grid: the latent size divided by ``scale``, rounded up as stride-2 convolutions do."""
    return math.ceil(latent[0] / scale), math.ceil(latent[1] / scale)


@dataclass
class Plan:
    """What one call's attention capture will store, and what :func:`plan` kept to fit a budget."""

    layers: list[str]  # module paths kept, in the model's order
    dropped: list[str]  # module paths left out to fit max_bytes
    step_size: tuple[int, int] | None  # per-step maps' (hs, ws); None: no per-step maps this call
    step_size_asked: tuple[int, int] | None  # what step_resolution asked for
    fixed_bytes: int  # aggregate and timesteps
    layer_bytes: dict[str, int] = field(default_factory=dict)  # every candidate layer's stored bytes
    step_bytes: int = 0  # per-step maps at step_size

    @property
    def nbytes(self) -> int:
        """Bytes of every map tensor the call will store (the result's ``AttentionMaps.nbytes``)."""
        return self.fixed_bytes + self.step_bytes + sum(self.layer_bytes[n] for n in self.layers)

    @property
    def reduced(self) -> bool:
        """Whether the budget left anything out (layers, or per-step maps' resolution)."""
        return bool(self.dropped) or self.step_size != self.step_size_asked


def plan(
    *,
    names: list[str],
    grids: dict[str, tuple[int, int]],
    heads: dict[str, int],
    latent: tuple[int, int],
    rows: int,
    keys: int,
    calls: int,
    halves: int = 1,
    frames: int = 1,
    step_size: tuple[int, int] | None,
    per_head: bool,
    keep_probs: bool,
    probs_itemsize: int,
    max_bytes: int | None,
    extra_bytes: int = 0,
) -> Plan:
    """The capture of one call, reduced to ``max_bytes`` if given.

    ``frames``: a video's frames along the denoiser's tokens (its maps are (..., F, h, w)); 1 for an image.
    A recording that fits is left whole. Otherwise, in this order: the per-step maps are halved in resolution while they take more than half of
    what the aggregate leaves (down to 1×1; dropped if even that is too much), then layers are kept from the
    cheapest (coarsest grid) up, ties in the model's order, while they fit. Raises
    :class:`~sdexplore.errors.MemoryBudgetError` when the aggregate and the cheapest layer alone exceed it.
    """
    H, W = latent
    # each half keeps its timesteps; extra_bytes: what the maps hold beside maps (image→image's query masks)
    fixed = rows * keys * frames * H * W * FLOAT + halves * calls * FLOAT + extra_bytes
    costs = {}
    for n in names:
        h, w = grids[n]
        h *= frames  # a video's F maps of h × w per layer cost as one map F·h tall
        per = rows * keys * h * w * FLOAT * (1 + (heads[n] if per_head else 0))
        if keep_probs:
            per += calls * rows * heads[n] * h * w * keys * probs_itemsize
        costs[n] = per

    def step_cost(size: tuple[int, int] | None) -> int:
        return 0 if size is None else calls * rows * keys * frames * size[0] * size[1] * FLOAT

    if max_bytes is None or fixed + step_cost(step_size) + sum(costs.values()) <= max_bytes:
        return Plan(list(names), [], step_size, step_size, fixed, costs, step_cost(step_size))
    cheapest = min(costs.values(), default=0)
    if fixed + cheapest > max_bytes:
        raise MemoryBudgetError(
            f"max_bytes={max_bytes:,} is below the smallest recording of this call: {fixed + cheapest:,} bytes "
            f"(the {rows} image(s) × {keys} keys × {H}×{W} aggregate map, and one layer). Raise max_bytes, or "
            "record fewer images or a smaller size."
        )
    size = step_size
    room = max_bytes - fixed - cheapest  # what the per-step maps may take and leave one layer in
    everything = sum(costs.values())
    while (
        size is not None
        and size != (1, 1)
        and step_cost(size) > room / 2
        and fixed + step_cost(size) + everything > max_bytes
    ):
        size = (max(1, size[0] // 2), max(1, size[1] // 2))
    if size is not None and step_cost(size) > room:
        size = None
    left = max_bytes - fixed - step_cost(size)
    kept: set[str] = set()
    for n in sorted(names, key=lambda n: (costs[n], names.index(n))):
        if costs[n] <= left:
            kept.add(n)
            left -= costs[n]
    order = [n for n in names if n in kept]
    return Plan(order, [n for n in names if n not in kept], size, step_size, fixed, costs, step_cost(size))


def available_bytes(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (CUDA: the allocator's free memory; CPU: MemAvailable), or None
    where the platform does not say."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):  # pragma: no cover - a CUDA build without a driver
            return None
    override = os.environ.get("SDEXPLORE_AVAILABLE_BYTES")  # for tests and for capping a shared machine
    if override:
        try:
            return int(override)
        except ValueError:
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil  # not a dependency: used where it is installed (macOS, Windows)

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def check_fits(p: Plan, device: torch.device, max_bytes: int | None) -> None:
    """Refuse a capture that cannot fit the machine, before the denoising loop, naming the options that bound it.

    The running sums live on the denoiser's device until the maps are read, then a copy is made on the host:
    on the CPU that is twice the stored bytes at the end of the call.
    """
    need = p.nbytes * (2 if device.type == "cpu" else 1)
    free = available_bytes(device)
    if free is None or need <= free:
        return
    where = "on the CPU" if device.type == "cpu" else f"on {device}"
    hint = (
        "lower max_bytes"
        if max_bytes is not None
        else f"pass attention={{'max_bytes': {free // 4:,}}} (observe) or AttentionRecorder(max_bytes=...)"
    )
    raise MemoryBudgetError(
        f"Recording these attention maps would take about {need / 2**20:,.0f} MiB {where}, but only "
        f"{free / 2**20:,.0f} MiB is free. To bound it: {hint}; drop keep_probs or per_head; keep fewer layers "
        "(layers=, scales=) or a smaller step_resolution. Nothing has run yet."
    )
