"""Inversion: a real picture turned into the starting noise that regenerates it, as plain data (save/load)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import fileformat as ff

_FORMAT = "sdexplore.inversion"
METHODS = ("ddim", "negative-prompt", "flow", "null-text")
#: How far a saved ``psnr`` may be from the one recomputed from the saved images (dB): the same float64 sum in
#: another order; a tampered value is off by whole decibels.
PSNR_TOLERANCE = 1e-6


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio (dB) of two uint8 images of one shape (peak 255; ∞ when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@dataclass
class Inversion:
    """What :func:`sdexplore.invert` returns.

    ``latents`` (1, C, h, w) is the starting noise: ``pipe(**inversion.pipe_kwargs())`` regenerates the picture
    (with the DDIM scheduler for the UNet families, the pipeline's flow-matching Euler scheduler for SD3).
    ``trace`` (steps + 1, C, h, w) holds the latents of the inversion from the clean image latents (row 0) to the
    starting noise (row ``steps``); ``timesteps`` are the generation's, in generation order (so ``trace[steps - i]``
    is where step ``i`` of the reconstruction should start). ``image`` is the picture as inverted (resized to the
    pipeline's size), ``reconstruction`` the regenerated one, both (H, W, 3) uint8; ``psnr`` compares them (dB) and
    ``vae_psnr`` is the VAE's own round trip of the picture, the ceiling any inversion can reach.

    ``null_embeds`` (steps, tokens, D), null-text inversion only (else None): the optimised unconditional text
    embedding of each generation step, in generation order. The reconstruction must give the denoiser row ``i``
    as the unconditional half of step ``i`` (``with sdexplore.inversion.applied(pipe, inversion):
    pipe(**inversion.pipe_kwargs())``); a plain call would use the empty prompt's instead.
    """

    latents: torch.Tensor
    trace: torch.Tensor
    timesteps: list[float]
    image: np.ndarray
    reconstruction: np.ndarray
    psnr: float
    vae_psnr: float
    method: str
    prompt: str
    settings: dict[str, Any] = field(default_factory=dict)
    null_embeds: torch.Tensor | None = None

    def pipe_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``pipe(...)`` that regenerate the picture: prompt, negative prompt (negative-prompt
        inversion: the prompt itself), steps, guidance, size and ``latents``. Call the pipeline inside
        ``sdexplore.inversion.applied(pipe, inversion)``, which also gives the call the inversion's scheduler and
        (null-text) the per-step unconditional embeddings. ``latents`` are (1, C, h, w) in sampling space: Flux.1
        and Flux.2 pipelines take them packed, as ``sdexplore.flowedit.pipe_latents(pipe, inv.latents)`` gives
        them (``edit(image=inv)`` does this itself)."""
        s = self.settings
        kw: dict[str, Any] = {
            "prompt": self.prompt,
            "num_inference_steps": int(s["steps"]),
            "guidance_scale": float(s["guidance"]),
            "height": int(self.image.shape[0]),
            "width": int(self.image.shape[1]),
            "latents": self.latents,
        }
        if s.get("negative_prompt") is not None:
            kw["negative_prompt"] = s["negative_prompt"]
        return kw

    def __repr__(self) -> str:
        h, w = self.image.shape[:2]
        return (
            f"Inversion(method={self.method!r}, {self.settings.get('steps')} steps, guidance "
            f"{self.settings.get('guidance')}, {h}×{w}, PSNR {self.psnr:.2f} dB (VAE round trip {self.vae_psnr:.2f} dB))"
        )

    # ---- save / load --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save as one safetensors file with a checksummed JSON header (the results' file format; never pickle)."""
        tensors = {
            "latents": self.latents.detach().cpu().float().contiguous(),
            "trace": self.trace.detach().cpu().float().contiguous(),
            "image": torch.from_numpy(np.require(self.image, np.uint8, ["C", "W"])),  # writable for torch
            "reconstruction": torch.from_numpy(np.require(self.reconstruction, np.uint8, ["C", "W"])),
        }
        if self.null_embeds is not None:
            tensors["null_embeds"] = self.null_embeds.detach().cpu().float().contiguous()
        header = {
            "format": _FORMAT,
            "version": ff.VERSION,
            "method": self.method,
            "prompt": self.prompt,
            "timesteps": [float(t) for t in self.timesteps],
            "psnr": float(self.psnr),
            "vae_psnr": float(self.vae_psnr),
            "settings": self.settings,
        }
        return ff.save_result(Path(path), _FORMAT, header, tensors)

    @classmethod
    def load(cls, path: str | Path) -> Inversion:
        """Load an inversion written by :meth:`save`; any damage raises :class:`~sdexplore.errors.ResultFileError`."""
        rf = ff.read_result(path, _FORMAT, "Inversion")
        check, header, tensors = rf.check, rf.header, rf.tensors
        method = check.str(check.get(header, "method", "method"), "method", choices=METHODS)
        names = ("latents", "trace", "image", "reconstruction")
        # null-text's per-step embeddings; files written before null-text inversion have none and still load
        ff.require_tensors(check, tensors, (*names, "null_embeds") if method == "null-text" else names)
        prompt = check.str(check.get(header, "prompt", "prompt"), "prompt")
        timesteps = check.list(check.get(header, "timesteps", "timesteps"), "timesteps")
        timesteps = [check.number(t, f"timesteps[{i}]") for i, t in enumerate(timesteps)]
        psnr = check.number(check.get(header, "psnr", "psnr"), "psnr", finite=False)
        vae_psnr = check.number(check.get(header, "vae_psnr", "vae_psnr"), "vae_psnr", finite=False)
        settings = check.dict(check.get(header, "settings", "settings"), "settings")
        trace, latents = tensors["trace"], tensors["latents"]
        if trace.ndim != 4 or trace.shape[0] != len(timesteps) + 1:
            check.fail(
                "tensor 'trace'", f"has shape {list(trace.shape)}, expected ({len(timesteps) + 1}, C, h, w)"
            )
        if latents.ndim != 4 or latents.shape[0] != 1 or tuple(latents.shape[1:]) != tuple(trace.shape[1:]):
            check.fail("tensor 'latents'", f"has shape {list(latents.shape)}, expected (1, *trace.shape[1:])")
        image, recon = tensors["image"], tensors["reconstruction"]
        for name, t in (("image", image), ("reconstruction", recon)):
            if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[-1] != 3 or t.shape != image.shape:
                check.fail(
                    f"tensor {name!r}", f"has shape {list(t.shape)} {t.dtype}, expected (H, W, 3) uint8"
                )
        null = tensors.get("null_embeds")  # (steps, tokens, D)
        if null is not None and (
            null.ndim != 3 or null.shape[0] != len(timesteps) or not null.is_floating_point()
        ):
            check.fail(
                "tensor 'null_embeds'",
                f"has shape {list(null.shape)} {null.dtype}, expected ({len(timesteps)}, tokens, D) float (one "
                "embedding per step)",
            )
        _check_consistency(check, method, prompt, timesteps, psnr, settings, latents, trace, image, recon)
        rf.verify_checksums()
        return cls(
            latents=latents,
            trace=trace,
            timesteps=timesteps,
            image=image.numpy(),
            reconstruction=recon.numpy(),
            psnr=psnr,
            vae_psnr=vae_psnr,
            method=method,
            prompt=prompt,
            settings=settings,
            null_embeds=null,
        )


def _check_consistency(
    c: ff.Checker,
    method: str,
    prompt: str,
    timesteps: list[float],
    saved_psnr: float,
    settings: dict[str, Any],
    latents: torch.Tensor,
    trace: torch.Tensor,
    image: torch.Tensor,
    recon: torch.Tensor,
) -> None:
    """The header's numbers and labels agree with each other and with the saved tensors (no model needed)."""
    again = psnr(recon.numpy(), image.numpy())
    if not (saved_psnr == again or abs(saved_psnr - again) <= PSNR_TOLERANCE):
        c.fail(
            "psnr",
            f"is {saved_psnr:.6g} dB, but the saved image and reconstruction give {again:.6g} dB",
        )
    C, h, w = trace.shape[1:]
    ff.check_scale(c, "tensor 'image'", (h, w), tuple(image.shape[:2]), "the latents")
    # latents is the trace's last row in the denoiser's dtype (fp16/bf16 on a GPU: rounded, 2^-9 relative)
    if not torch.allclose(latents[0], trace[-1], rtol=1e-2, atol=1e-5):
        c.fail("tensor 'latents'", "is not the last row of tensor 'trace' (the inversion's end)")
    if "steps" in settings:
        steps = c.int(settings["steps"], "settings.steps", lo=1)
        if steps != len(timesteps):
            c.fail("settings.steps / timesteps", f"is {steps} steps, but timesteps lists {len(timesteps)}")
    if "negative_prompt" in settings:
        want = prompt if method == "negative-prompt" else None
        if settings["negative_prompt"] != want:
            c.fail(
                "settings.negative_prompt",
                f"is {settings['negative_prompt']!r}, but method {method!r} with prompt {prompt!r} regenerates "
                f"with negative prompt {want!r}",
            )
    if "family" in settings:
        fam = ff.family_of(c, c.str(settings["family"], "settings.family"), "settings.family")
        ff.check_channels(c, fam, "settings.family", int(C), "tensor 'trace' (steps + 1, C, h, w)")
        if fam is not None and method != "negative-prompt":
            ode = "ddim" if fam.denoiser == "unet" else "flow"
            if method != ode and not (method == "null-text" and ode == "ddim"):
                c.fail(
                    "method",
                    f"is {method!r}, but settings.family is {fam.name!r} ({fam.label}), whose sampler inverts "
                    f"with {ode!r}",
                )
