"""Per-step previews, pure tensor math: linear latent → RGB (essentially free), a tiny learned convolutional
preview (:class:`ConvPreview`, for VAEs whose colours no per-cell map gets right) and [-1, 1] → uint8.

Imports nothing of sdexplore; the pipeline- and VAE-bound helpers are in :mod:`sdexplore.decoding`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def latent_to_rgb(latents: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Linear latent → RGB preview (the ComfyUI "latent2rgb" method): ``rgb = latentsᵀ · factors + bias``.

    ``latents`` (B, C, h, w), ``factors`` (C, 3), ``bias`` (3,) → (B, h, w, 3) float in [-1, 1] (clamped),
    on the latents' device. One preview pixel per latent cell (1/8 of the image side).
    """
    if latents.ndim != 4 or latents.shape[1] != factors.shape[0]:
        raise ValueError(
            f"latent_to_rgb expects latents (B, {factors.shape[0]}, h, w); got {tuple(latents.shape)}."
        )
    f = factors.to(device=latents.device, dtype=latents.dtype)
    b = bias.to(device=latents.device, dtype=latents.dtype)
    rgb = torch.einsum("bchw,cr->bhwr", latents, f) + b  # (B, h, w, 3)
    return rgb.clamp(-1.0, 1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (any layout) → uint8 in [0, 255], same layout."""
    return ((images.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def uint8_factors(factors: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(127.5 · factors, 127.5 · (bias + 1) + 0.5)`` as float32: factors that map latents straight to
    [0, 255] plus one half, so that truncating to uint8 rounds to the nearest level."""
    return factors.float() * 127.5, (bias.float() + 1.0) * 127.5 + 0.5


def latent_to_uint8(
    latents: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor, *, scaled: bool = False
) -> torch.Tensor:
    """The linear preview as a picture: ``latents`` (B, C, h, w) → (B, h, w, 3) uint8, on the latents' device.

    Equals ``to_uint8(latent_to_rgb(latents, factors, bias))`` up to float rounding (one level, rarely), in three
    kernels instead of a dozen: this is the preview sdexplore records and shows everywhere. Pass factors from
    :func:`uint8_factors` with ``scaled=True`` to skip rescaling them on every call.
    """
    if latents.ndim != 4 or latents.shape[1] != factors.shape[0]:
        raise ValueError(
            f"latent_to_uint8 expects latents (B, {factors.shape[0]}, h, w); got {tuple(latents.shape)}."
        )
    if not scaled:
        factors, bias = uint8_factors(factors, bias)
    b, c, h, w = latents.shape
    x = latents if latents.dtype == torch.float32 else latents.float()
    x = x.permute(0, 2, 3, 1).reshape(-1, c)  # (B·h·w, C)
    if factors.device != x.device:
        factors, bias = factors.to(x.device), bias.to(x.device)
    rgb = torch.addmm(bias, x, factors)  # (B·h·w, 3) = 127.5 (rgb + 1) + 0.5
    return rgb.clamp_(0.0, 255.0).to(torch.uint8).view(b, h, w, 3)  # (B, h, w, 3): truncation rounds (+0.5)


# ---------------------------------------------------------------------------------------- convolutional preview
@dataclass(frozen=True)
class PreviewConv:
    """One layer of a :class:`ConvPreview`: a ``k×k`` convolution (replicate padding, same size out); with
    ``with_mean`` its input is first widened by the image's mean of each channel, broadcast to every cell."""

    weight: torch.Tensor  # (O, I, k, k), k odd; I = the input's channels, doubled with with_mean
    bias: torch.Tensor  # (O,)
    with_mean: bool = False


@dataclass(frozen=True)
class ConvPreview:
    """A tiny learned convolutional latent → RGB preview: TAESD's idea (a small decoder fitted to the VAE's
    decode) at about a thousand parameters, one output pixel per latent cell.

    A cell's decoded colour can depend on more than that cell's latent, which no per-cell linear map sees (the
    embedded VAE, whose decoder has a self-attention block, previews green as black and purple as red through
    its factors): a 3×3 neighbourhood and the image's mean features do. The network is ``x = latents ·
    input_scale + input_shift`` (per channel), then each layer in turn (:class:`PreviewConv`) with SiLU between
    layers, clamped to [-1, 1]. Weights are plain tensors, read from and written to JSON (:meth:`from_dict`,
    :meth:`to_dict`), never pickle.
    """

    input_scale: torch.Tensor  # (C,) latents · input_scale + input_shift: the network's normalised input
    input_shift: torch.Tensor  # (C,)
    layers: tuple[PreviewConv, ...]  # the last gives 3 channels (R, G, B in [-1, 1])

    @property
    def channels(self) -> int:
        """Latent channels the preview reads."""
        return int(self.input_scale.shape[0])

    def to(self, device: torch.device | str) -> ConvPreview:
        """The same preview, float32 on ``device``."""
        move = lambda t: t.to(device=device, dtype=torch.float32)  # noqa: E731
        return ConvPreview(
            move(self.input_scale),
            move(self.input_shift),
            tuple(PreviewConv(move(c.weight), move(c.bias), c.with_mean) for c in self.layers),
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (nested lists), as stored in a model folder's ``latent_preview.json`` and a trace's meta."""
        return {
            "kind": "conv",
            "activation": "silu",
            "input_scale": self.input_scale.tolist(),
            "input_shift": self.input_shift.tolist(),
            "layers": [
                {"weight": c.weight.tolist(), "bias": c.bias.tolist(), "with_mean": c.with_mean}
                for c in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> ConvPreview:
        """Read :meth:`to_dict`'s form, checking every shape; ``ValueError`` names the first wrong field."""
        if (
            not isinstance(data, dict)
            or data.get("kind") != "conv"
            or data.get("activation", "silu") != "silu"
        ):
            raise ValueError("is not a convolutional preview ({'kind': 'conv', 'activation': 'silu', ...})")
        scale, shift = _tensor(data, "input_scale", 1), _tensor(data, "input_shift", 1)
        if scale.shape != shift.shape or scale.shape[0] < 1:
            raise ValueError(f"input_scale {tuple(scale.shape)} and input_shift {tuple(shift.shape)} differ")
        raw = data.get("layers")
        if not isinstance(raw, list) or not raw:
            raise ValueError("layers must be a non-empty list of {'weight', 'bias', 'with_mean'}")
        layers, width = [], scale.shape[0]
        for i, layer in enumerate(raw):
            if not isinstance(layer, dict) or not isinstance(layer.get("with_mean", False), bool):
                raise ValueError(
                    f"layers[{i}] is not an object with 'weight', 'bias' and a boolean 'with_mean'"
                )
            w, b = _tensor(layer, "weight", 4, f"layers[{i}]."), _tensor(layer, "bias", 1, f"layers[{i}].")
            with_mean = layer.get("with_mean", False)
            wide = 2 * width if with_mean else width
            o, c, kh, kw = w.shape
            if c != wide or kh != kw or kh % 2 == 0 or b.shape[0] != o:
                raise ValueError(
                    f"layers[{i}] has weight {tuple(w.shape)} and bias {tuple(b.shape)}; expected weight "
                    f"(out, {wide}, k, k) with k odd and bias (out,)"
                )
            layers.append(PreviewConv(w, b, with_mean))
            width = o
        if width != 3:
            raise ValueError(f"the last layer gives {width} channels; a preview gives 3 (R, G, B)")
        return cls(scale, shift, tuple(layers))


def _tensor(data: dict, key: str, ndim: int, prefix: str = "") -> torch.Tensor:
    """``data[key]`` as a float32 tensor of ``ndim`` dimensions, all finite, or a ``ValueError`` naming it."""
    try:
        t = torch.tensor(data[key], dtype=torch.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{prefix}{key} is missing or not a rectangular list of numbers") from e
    if t.ndim != ndim or not torch.isfinite(t).all():
        raise ValueError(
            f"{prefix}{key} must be a {ndim}-D list of finite numbers, got shape {tuple(t.shape)}"
        )
    return t


def conv_preview_rgb(latents: torch.Tensor, net: ConvPreview) -> torch.Tensor:
    """The convolutional preview: ``latents`` (B, C, h, w) → (B, 3, h, w) float in [-1, 1], on the latents' device
    (``net`` is moved there if it is not; keep a moved copy, :meth:`ConvPreview.to`, for per-step use)."""
    if latents.ndim != 4 or latents.shape[1] != net.channels:
        raise ValueError(
            f"conv_preview_rgb expects latents (B, {net.channels}, h, w); got {tuple(latents.shape)}."
        )
    if net.input_scale.device != latents.device:
        net = net.to(latents.device)
    x = latents.float() * net.input_scale[:, None, None] + net.input_shift[:, None, None]  # (B, C, h, w)
    for i, conv in enumerate(net.layers):
        if i:
            x = F.silu(x)
        if conv.with_mean:
            x = torch.cat(
                [x, x.mean((2, 3), keepdim=True).expand_as(x)], 1
            )  # (B, 2I, h, w): cell, image mean
        pad = conv.weight.shape[-1] // 2
        if pad:
            x = F.pad(x, (pad, pad, pad, pad), mode="replicate")  # (B, I, h + 2p, w + 2p)
        x = F.conv2d(x, conv.weight, conv.bias)  # (B, O, h, w)
    return x.clamp(-1.0, 1.0)


def conv_preview_to_uint8(latents: torch.Tensor, net: ConvPreview) -> torch.Tensor:
    """The convolutional preview as a picture: ``latents`` (B, C, h, w) → (B, h, w, 3) uint8, the layout and
    rounding of :func:`latent_to_uint8`."""
    rgb = conv_preview_rgb(latents, net)  # (B, 3, h, w)
    levels = (rgb + 1.0).mul_(127.5).add_(0.5).clamp_(0.0, 255.0)  # + 0.5: truncation rounds
    return levels.permute(0, 2, 3, 1).to(torch.uint8, memory_format=torch.contiguous_format)  # (B, h, w, 3)


# ------------------------------------------------------------------------------------------- fitted linear factors
def preview_swatches(size: int, cell: int) -> torch.Tensor:
    """A small fixed set of synthetic colour pictures (B, 3, size, size) in [-1, 1] to fit linear preview factors
    on: solid colours (the RGB cube's corners, greys, a few mixtures), gradients crossing two channels, and grids
    of colour patches two latent cells wide (``cell`` pixels per latent cell). Deterministic: the patches' colours
    come from a fixed seed, never from the global random state."""
    solids = [
        (-1, -1, -1), (1, 1, 1), (0, 0, 0), (1, -1, -1), (-1, 1, -1), (-1, -1, 1), (-1, 1, 1), (1, -1, 1),
        (1, 1, -1), (1, 0, -1), (-0.5, 0.5, 0), (0.5, -0.5, 0.5),
    ]  # fmt: skip
    pics = [torch.tensor(c, dtype=torch.float32).view(3, 1, 1).expand(3, size, size) for c in solids]
    ramp = torch.linspace(-1.0, 1.0, size)
    across, down = ramp.view(1, size).expand(size, size), ramp.view(size, 1).expand(size, size)
    for a, b in ((0, 1), (1, 2), (2, 0)):  # channel a left → right, b top → bottom, the third at -1 and at +1
        for rest in (-1.0, 1.0):
            pic = torch.full((3, size, size), rest)
            pic[a], pic[b] = across, down
            pics.append(pic)
    gen = torch.Generator().manual_seed(0)
    side = max(1, size // (2 * cell))  # patches per side, each 2×2 latent cells
    for _ in range(8):
        colours = torch.rand(3, side, side, generator=gen) * 2 - 1  # (3, side, side)
        pic = F.interpolate(colours[None], size=(size, size), mode="nearest")[0]  # (3, size, size)
        pics.append(pic)
    return torch.stack(pics)  # (B, 3, size, size)


def fit_linear_preview(
    latents: torch.Tensor, images: torch.Tensor, *, ridge: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares latent → RGB factors: ``latents`` (B, C, h, w) against ``images`` (B, 3, H, W) in [-1, 1]
    average-pooled to the latent grid. Returns ``(factors (C, 3), bias (3,))`` float32 on the CPU, for
    :func:`latent_to_rgb`. A small ridge (relative to the latents' mean square; the bias is not shrunk) keeps
    the solution finite where channels are collinear."""
    b, c, h, w = latents.shape
    small = F.adaptive_avg_pool2d(images.double().cpu(), (h, w))  # (B, 3, h, w)
    x = latents.double().cpu().permute(0, 2, 3, 1).reshape(-1, c)  # (B·h·w, C)
    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (B·h·w, C + 1): the bias column
    y = small.permute(0, 2, 3, 1).reshape(-1, 3)  # (B·h·w, 3)
    scale = float(x[:, :c].pow(2).mean()) or 1.0
    penalty = torch.zeros(c + 1, c + 1, dtype=torch.float64)
    penalty[:c, :c] = torch.eye(c, dtype=torch.float64) * (ridge * scale * x.shape[0]) ** 0.5  # (C+1, C+1)
    x = torch.cat([x, penalty])  # (B·h·w + C + 1, C + 1)
    y = torch.cat([y, torch.zeros(c + 1, 3, dtype=torch.float64)])  # (B·h·w + C + 1, 3)
    sol = torch.linalg.lstsq(x, y).solution  # (C + 1, 3)
    return sol[:c].float(), sol[c].float()
