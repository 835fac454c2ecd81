"""AttentionMaps: cross-attention heat maps per token and word (aggregated, per step, per layer) as plain data."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import as_ordinary_file
from ..errors import ResultFileError
from ..heatmaps import Normalization, normalize, resize
from .tokens import TokenList

StepSelector = int | range | slice | Sequence[int] | None

_FORMAT = "sdexplore.AttentionMaps"
_VERSION = 1


@dataclass
class AttentionMaps:
    """Cross-attention maps of one pipeline call, reduced as it ran.

    Values are raw attention mass: for each latent pixel (a query), the probability it gives each of the
    ``T`` key positions (77 tokens), averaged over heads, the captured layers and the denoising steps. At
    every pixel the maps of all ``T`` positions sum to 1; a word's map is the sum of its tokens' maps.
    Use :func:`sdexplore.heatmaps.normalize` (or ``normalize=`` on :meth:`word`) for per-map min-max display.

    Batch ``index`` follows the pipeline's output order (each prompt repeated ``num_images_per_prompt``
    times). ``steps`` has one entry per UNet call (one per denoising step for DDIM, PNDM, Euler, DPM-Solver;
    Heun and KDPM2 evaluate the UNet twice per step).
    """

    aggregate: torch.Tensor  # (B, T, H, W) float32: mean over steps, layers, heads at latent resolution
    timesteps: torch.Tensor  # (S,) float32: the timestep of each UNet call
    layers: dict[str, torch.Tensor]  # layer name → (B, T, h, w): mean over steps and heads, native resolution
    token_lists: list[TokenList]  # one per image: labels of the T key positions
    latent_size: tuple[int, int]  # (H, W) of the latents
    vae_scale: int = 8  # pixels per latent cell
    steps: torch.Tensor | None = None  # (S, B, T, h, w) float32: per-step mean over layers and heads
    layer_heads: dict[str, torch.Tensor] | None = None  # name → (B, heads, T, h, w): per_head=True
    probs: dict[str, torch.Tensor] | None = None  # name → (S, B, heads, h*w, T): keep_probs=True
    negative: AttentionMaps | None = (
        None  # the same maps for the negative (unconditional) prompt, negative=True
    )
    skipped_layers: list[str] = field(default_factory=list)  # cross-attention layers left uncaptured
    family: str = ""  # "sd1", "sd2", "sdxl"

    # ---- labels -------------------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        """Number of images (conditional rows of the batch)."""
        return int(self.aggregate.shape[0])

    @property
    def num_steps(self) -> int:
        """Number of recorded UNet calls."""
        return int(self.timesteps.shape[0])

    @property
    def layer_names(self) -> list[str]:
        """Names of the captured cross-attention layers (``unet`` module paths)."""
        return list(self.layers)

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the generated image in pixels."""
        return (self.latent_size[0] * self.vae_scale, self.latent_size[1] * self.vae_scale)

    @property
    def tokens(self) -> list[str]:
        """Tokens of image 0, one per key position: BOS, prompt tokens, EOS and padding all visible."""
        return self.token_lists[0].tokens

    @property
    def words(self) -> list[str]:
        """Words of image 0's prompt (sub-word tokens merged)."""
        return self.token_lists[0].words

    @property
    def truncated(self) -> list[str]:
        """Tokens of image 0's prompt cut off beyond 77 positions (they have no map)."""
        return self.token_lists[0].truncated

    # ---- maps ---------------------------------------------------------------------------------------------
    def word(
        self,
        word: str,
        *,
        step: StepSelector = None,
        layer: str | None = None,
        index: int = 0,
        occurrence: int | None = None,
        normalize: Normalization = "mass",
    ) -> torch.Tensor:
        """Heat map ``(h, w)`` of a word (or space-separated words) of image ``index``'s prompt.

        ``step=None`` averages every step; an int, range, slice or list picks steps (mean over them) from the
        per-step maps at their small resolution. ``layer`` (a layer name or a substring such as ``"up_blocks"``)
        restricts to matching layers at their native resolution (several matches: upsampled to the latent
        size and averaged). ``step`` and ``layer`` together need ``keep_probs=True``. A word that occurs
        several times sums all occurrences unless ``occurrence`` picks one. ``normalize``: see
        :func:`sdexplore.heatmaps.normalize` (default raw mass).
        """
        positions = self._tokens_of(index).positions(word, occurrence)
        return self._map(positions, step=step, layer=layer, index=index, norm=normalize)

    def token(
        self,
        position: int,
        *,
        step: StepSelector = None,
        layer: str | None = None,
        index: int = 0,
        normalize: Normalization = "mass",
    ) -> torch.Tensor:
        """Heat map ``(h, w)`` of one key position (0 = BOS; see :attr:`tokens`); options as :meth:`word`."""
        T = int(self.aggregate.shape[1])
        if not -T <= position < T:
            raise IndexError(
                f"Token position {position} out of range: there are {T} key positions (see .tokens)."
            )
        return self._map([position % T], step=step, layer=layer, index=index, norm=normalize)

    def word_maps(
        self, words: Sequence[str] | None = None, *, index: int = 0, normalize: Normalization = "mass"
    ) -> dict[str, torch.Tensor]:
        """Aggregated map of each word (default: every word of the prompt), in prompt order."""
        words = list(words) if words is not None else list(dict.fromkeys(self._tokens_of(index).words))
        return {w: self.word(w, index=index, normalize=normalize) for w in words}

    def to_numpy(self, words: Sequence[str] | None = None, *, index: int = 0) -> dict[str, np.ndarray]:
        """:meth:`word_maps` as numpy arrays."""
        return {w: m.numpy() for w, m in self.word_maps(words, index=index).items()}

    def _tokens_of(self, index: int) -> TokenList:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index={index} out of range: the call produced {self.num_images} image(s).")
        return self.token_lists[index]

    def _step_indices(self, step: StepSelector) -> list[int]:
        S = self.num_steps
        if isinstance(step, int):
            if not -S <= step < S:
                raise IndexError(f"step={step} out of range: {S} steps were recorded.")
            return [step % S]
        if isinstance(step, slice):
            idx = list(range(S))[step]
        else:
            idx = [int(i) for i in step]  # type: ignore[union-attr]
        bad = [i for i in idx if not -S <= i < S]
        if bad or not idx:
            raise IndexError(f"step={step!r} selects no valid step: {S} steps were recorded.")
        return [i % S for i in idx]

    def _match_layers(self, layer: str) -> list[str]:
        names = [n for n in self.layers if n == layer] or [n for n in self.layers if layer in n]
        if not names:
            raise KeyError(f"No captured layer matches {layer!r}. Captured layers: {self.layer_names}")
        return names

    def _map(
        self, positions: list[int], *, step: StepSelector, layer: str | None, index: int, norm: Normalization
    ) -> torch.Tensor:
        self._tokens_of(index)
        if layer is None and step is None:
            out = self.aggregate[index, positions].sum(0)  # (H, W)
        elif layer is None:
            if self.steps is None:
                raise ValueError(
                    "Per-step maps were not recorded (step_resolution=None); record with step_resolution=16."
                )
            idx = self._step_indices(step)
            out = self.steps[idx, index][:, positions].sum(1).mean(0)  # (h, w)
        else:
            names = self._match_layers(layer)
            if step is None:
                per = [self.layers[n][index, positions].sum(0) for n in names]  # each (h_l, w_l)
            else:
                if self.probs is None:
                    raise ValueError(
                        "Maps per step *and* layer need every probability tensor: record with keep_probs=True "
                        "(costly), or ask for step= or layer= alone."
                    )
                idx = self._step_indices(step)
                per = []
                for n in names:
                    p = self.probs[n][idx, index].float().mean(1)  # (S', HW, T): mean over heads
                    h, w = self.layers[n].shape[-2:]
                    per.append(p[..., positions].sum(-1).mean(0).reshape(h, w))  # (h, w)
            if len(per) == 1:
                out = per[0]
            else:
                out = torch.stack([resize(m, self.latent_size) for m in per]).mean(0)  # (H, W)
        return normalize(out, norm)

    # ---- save / load --------------------------------------------------------------------------------------
    def _tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        t = {f"{prefix}aggregate": self.aggregate, f"{prefix}timesteps": self.timesteps}
        if self.steps is not None:
            t[f"{prefix}steps"] = self.steps
        for group in ("layers", "layer_heads", "probs"):
            for name, v in (getattr(self, group) or {}).items():
                t[f"{prefix}{group}/{name}"] = v
        if self.negative is not None:
            t.update(self.negative._tensors(prefix + "negative/"))
        return {k: v.detach().cpu().contiguous() for k, v in t.items()}

    def _meta(self) -> dict[str, Any]:
        return {
            "token_lists": [tl.to_json() for tl in self.token_lists],
            "latent_size": list(self.latent_size),
            "vae_scale": self.vae_scale,
            "layer_names": self.layer_names,
            "has_layer_heads": self.layer_heads is not None,
            "has_probs": self.probs is not None,
            "skipped_layers": self.skipped_layers,
            "family": self.family,
            "negative": self.negative._meta() if self.negative is not None else None,
        }

    def save(self, path: str | Path) -> Path:
        """Write to one ``.safetensors`` file (tensors; labels and sizes as JSON in its header). Returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = (
                path.with_suffix(path.suffix + ".safetensors")
                if path.suffix
                else path.with_suffix(".safetensors")
            )
        header = {"format": _FORMAT, "version": str(_VERSION), "meta": json.dumps(self._meta())}
        save_file(self._tensors(), str(path), metadata=header)
        return as_ordinary_file(path)

    @classmethod
    def load(cls, path: str | Path) -> AttentionMaps:
        """Read a file written by :meth:`save`; a truncated, corrupt or foreign file raises ResultFileError."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ResultFileError(f"No AttentionMaps file at {str(path)!r}.")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
            raise ResultFileError(
                f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {exc}. Save it again."
            ) from exc
        if header.get("format") != _FORMAT:
            raise ResultFileError(
                f"{str(path)!r} holds {header.get('format') or 'no sdexplore result'}, not AttentionMaps."
            )
        if int(header.get("version", -1)) > _VERSION:
            raise ResultFileError(
                f"{str(path)!r} was written by a newer sdexplore; upgrade sdexplore to read it."
            )
        try:
            return cls._from_parts(json.loads(header["meta"]), tensors, "")
        except (KeyError, ValueError, IndexError) as exc:
            raise ResultFileError(
                f"{str(path)!r} is incomplete or inconsistent ({exc}); save it again."
            ) from exc

    @classmethod
    def _from_parts(
        cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str
    ) -> AttentionMaps:
        names = meta["layer_names"]

        def group(g: str, present: bool) -> dict[str, torch.Tensor] | None:
            return {n: tensors[f"{prefix}{g}/{n}"] for n in names} if present else None

        maps = cls(
            aggregate=tensors[f"{prefix}aggregate"],
            timesteps=tensors[f"{prefix}timesteps"],
            layers=group("layers", True) or {},
            token_lists=[TokenList.from_json(d) for d in meta["token_lists"]],
            latent_size=(int(meta["latent_size"][0]), int(meta["latent_size"][1])),
            vae_scale=int(meta["vae_scale"]),
            steps=tensors.get(f"{prefix}steps"),
            layer_heads=group("layer_heads", meta["has_layer_heads"]),
            probs=group("probs", meta["has_probs"]),
            negative=cls._from_parts(meta["negative"], tensors, prefix + "negative/")
            if meta["negative"]
            else None,
            skipped_layers=list(meta["skipped_layers"]),
            family=str(meta["family"]),
        )
        maps._check()
        return maps

    def _check(self) -> None:
        B, T, H, W = self.aggregate.shape
        if (H, W) != tuple(self.latent_size) or len(self.token_lists) != B:
            raise ValueError(f"aggregate {tuple(self.aggregate.shape)} does not match labels/latent size")
        if any(len(tl.ids) != T for tl in self.token_lists):
            raise ValueError("token labels do not match the number of key positions")
        if self.steps is not None and self.steps.shape[:3] != (self.num_steps, B, T):
            raise ValueError(f"steps {tuple(self.steps.shape)} do not match {self.num_steps} timesteps")
