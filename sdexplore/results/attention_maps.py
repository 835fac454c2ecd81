"""AttentionMaps: cross-attention heat maps per token and word (aggregated, per step, per layer) as plain data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import heatmaps as _heatmaps
from ..errors import SelectionError, WordNotFoundError
from ..heatmaps import Normalization, normalize, resize
from . import fileformat as ff
from . import provenance as _provenance
from .tokens import TokenList, segments_from_json

StepSelector = int | range | slice | Sequence[int] | None

_FORMAT = "sdexplore.AttentionMaps"


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

    A video's maps (Wan) carry its ``frames`` F before the two spatial axes: aggregate (B, T, F, H, W), layers
    (B, T, F, h, w), steps (S, B, T, F, hs, ws), layer_heads (B, heads, T, F, h, w), probs (S, B, heads, F·h·w, T)
    (queries frame by frame); :meth:`word` gives (F, h, w), or one frame's (h, w) with ``frame=``. An image's
    maps have no F axis and ``frames`` is None.
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
    family: str = ""  # "sd1", "sd2", "sdxl", "sd3", "flux"
    #: What the values are: ``"cross"`` (UNet cross-attention softmax over the T text keys), ``"joint"`` (MMDiT:
    #: the text block of the joint softmax over text *and* image keys, so a pixel's T values sum to less than 1),
    #: ``"text"`` (MMDiT scores, softmax over the text keys only) or ``"output"`` (ConceptAttention's
    #: attention-output maps, softmax over the prompt's word tokens). See :mod:`sdexplore.record.joint`.
    kind: str = "cross"
    #: True when an attention control (:class:`sdexplore.Reweight`, ...) changed the probabilities these maps
    #: record: a reweighted word's pixels no longer sum to 1 over the keys, so the loader checks only that the
    #: maps are not negative.
    edited: bool = False
    #: Words recorded although not in the prompt (``AttentionRecorder(concepts=...)``); see :meth:`concept`.
    concepts: list[str] = field(default_factory=list)
    concept_aggregate: torch.Tensor | None = None  # (B, C, H, W) float32, like aggregate, one map per concept
    concept_layers: dict[str, torch.Tensor] | None = None  # name → (B, C, h, w)
    concept_steps: torch.Tensor | None = None  # (S, B, C, hs, ws)
    #: A video's frames F along the denoiser's tokens (latent frames / its time patch; Wan: the latent frames):
    #: every map has an F axis before (h, w). None for an image (no F axis).
    frames: int | None = None
    #: Which block of the attention the maps hold, ``"queries->keys"`` (:mod:`sdexplore.record.relations`):
    #: ``"image->text"`` (per-token maps: axis 1 the text keys, the map the image queries); ``"image->image"``
    #: (axis 1 the selected query points or masks, the map the image keys: UNet self-attention, MMDiT joint
    #: attention's image block); ``"text->image"`` (axis 1 the text queries, the map the image keys);
    #: ``"text->text"`` (axis 1 the text queries, each map a (1, T) row over the text keys).
    relation: str = "image->text"
    #: image→image: the selected queries as weights on the latent grid, (Q, H, W) float32, each summing to 1 (a
    #: point: one cell; a mask: its pixels equally); :meth:`query` reads query ``i``'s map. None otherwise.
    query_masks: torch.Tensor | None = None
    #: What made the maps: the call's model, scheduler, seed, negative prompt, steps and guidance scale
    #: (:mod:`sdexplore.results.provenance`; the prompt is in ``token_lists``). Empty where not recorded (files
    #: saved before it was kept, the ``negative`` maps, whose call is their parent's).
    provenance: dict[str, Any] = field(default_factory=dict)

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
    def nbytes(self) -> int:
        """Bytes of every map tensor held (aggregate, layers, per-step, per-head, probabilities, concepts and the
        negative half's): what ``AttentionRecorder(max_bytes=...)`` bounds."""
        total = 0
        for value in (
            self.aggregate,
            self.timesteps,
            self.steps,
            self.concept_aggregate,
            self.concept_steps,
            self.query_masks,
            *self.layers.values(),
            *(self.layer_heads or {}).values(),
            *(self.probs or {}).values(),
            *(self.concept_layers or {}).values(),
        ):
            if value is not None:
                total += value.numel() * value.element_size()
        return total + (self.negative.nbytes if self.negative is not None else 0)

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
        frame: int | None = None,
    ) -> torch.Tensor:
        """Heat map ``(h, w)`` of a word (or space-separated words) of image ``index``'s prompt; a video's
        ``(F, h, w)``, or frame ``frame``'s ``(h, w)``.

        ``step=None`` averages every step; an int, range, slice or list picks steps (mean over them) from the
        per-step maps at their small resolution. ``layer`` (a layer name or a substring such as ``"up_blocks"``)
        restricts to matching layers at their native resolution (several matches: upsampled to the latent
        size and averaged). ``step`` and ``layer`` together need ``keep_probs=True``. A word that occurs
        several times sums all occurrences unless ``occurrence`` picks one. ``normalize``: see
        :func:`sdexplore.heatmaps.normalize` (default raw mass; ``"minmax"`` and ``"sum"`` act frame by frame).
        """
        if self.relation == "image->image":
            raise SelectionError(
                "These are image→image maps, one per selected query point, not per word: use .query(i)."
            )
        positions = self._tokens_of(index).positions(word, occurrence)  # WordNotFoundError for a non-word
        out = self._map(positions, step=step, layer=layer, index=index, norm=normalize)
        return self._frame_of(out, frame)

    def token(
        self,
        position: int,
        *,
        step: StepSelector = None,
        layer: str | None = None,
        index: int = 0,
        normalize: Normalization = "mass",
        frame: int | None = None,
    ) -> torch.Tensor:
        """Heat map ``(h, w)`` of one key position (0 = BOS; see :attr:`tokens`); options as :meth:`word`."""
        T = int(self.aggregate.shape[1])
        if isinstance(position, bool) or not isinstance(position, int) or not -T <= position < T:
            raise SelectionError(
                f"Token position {position!r} is not a key position: pass an int in 0..{T - 1} (or -{T}..-1); "
                f"see .tokens for what each holds, or use .word() for a word."
            )
        out = self._map([position % T], step=step, layer=layer, index=index, norm=normalize)
        return self._frame_of(out, frame)

    def query(
        self,
        query: int,
        *,
        step: StepSelector = None,
        layer: str | None = None,
        index: int = 0,
        normalize: Normalization = "mass",
    ) -> torch.Tensor:
        """image→image: the map ``(h, w)`` over the image keys of selected query ``query`` (its position in the
        recorder's ``queries=``; :attr:`query_masks` holds each); ``step``, ``layer``, ``index`` and ``normalize``
        as in :meth:`word`."""
        if self.relation != "image->image" or self.query_masks is None:
            raise SelectionError(
                f"query() reads image→image maps; these are {self.relation} maps: use .word() or .token()."
            )
        Q = int(self.query_masks.shape[0])
        if isinstance(query, bool) or not isinstance(query, int) or not -Q <= query < Q:
            raise SelectionError(
                f"query={query!r} is not a recorded query: pass an int in 0..{Q - 1} ({Q} were selected)."
            )
        return self._map([query % Q], step=step, layer=layer, index=index, norm=normalize)

    def concept(
        self,
        concept: str,
        *,
        step: StepSelector = None,
        layer: str | None = None,
        index: int = 0,
        normalize: Normalization = "mass",
    ) -> torch.Tensor:
        """Heat map ``(h, w)`` of a word that was *not* in the prompt (one of :attr:`concepts`).

        The same queries of the same run, scored against the concept's own keys (the concept encoded alone by
        the pipeline's text encoder, through each layer's key projection): each pixel's probability mass on
        the concept's words when they are offered as keys beside the prompt's. The image is unchanged.
        Comparable in scale with :meth:`word` maps of the prompt's words. ``step``, ``layer``, ``index`` and
        ``normalize`` as in :meth:`word` (``step`` and ``layer`` not together).
        """
        if self.concept_aggregate is None or concept not in self.concepts:
            recorded = f"recorded concepts: {self.concepts}" if self.concepts else "no concepts were recorded"
            raise WordNotFoundError(
                f"{concept!r} is not a recorded concept ({recorded}); record it with "
                f"AttentionRecorder(pipe, concepts=[{concept!r}]), or use .word() for the prompt's own words."
            )
        self._tokens_of(index)
        c = self.concepts.index(concept)
        if layer is None and step is None:
            out = self.concept_aggregate[index, c]  # (H, W)
        elif layer is None:
            if self.concept_steps is None:
                raise ValueError(
                    "Per-step maps were not recorded (step_resolution=None); record with step_resolution=16."
                )
            out = self.concept_steps[self._step_indices(step), index, c].mean(0)  # (hs, ws)
        elif step is None:
            assert self.concept_layers is not None
            per = [self.concept_layers[n][index, c] for n in self._match_layers(layer)]  # each (h_l, w_l)
            out = per[0] if len(per) == 1 else torch.stack([resize(m, self.latent_size) for m in per]).mean(0)
        else:
            raise ValueError("Concept maps are kept per step or per layer, not both: pass step= or layer=.")
        return _heatmaps.normalize(out, normalize)

    def word_maps(
        self, words: Sequence[str] | None = None, *, index: int = 0, normalize: Normalization = "mass"
    ) -> dict[str, torch.Tensor]:
        """Aggregated map of each word (default: every word of the prompt), in prompt order."""
        if isinstance(words, str):
            raise WordNotFoundError(
                f"words={words!r} is one string: pass a list of words, e.g. [{words!r}], or None for every word."
            )
        words = list(words) if words is not None else list(dict.fromkeys(self._tokens_of(index).words))
        return {w: self.word(w, index=index, normalize=normalize) for w in words}

    def to_numpy(self, words: Sequence[str] | None = None, *, index: int = 0) -> dict[str, np.ndarray]:
        """:meth:`word_maps` as numpy arrays."""
        return {w: m.numpy() for w, m in self.word_maps(words, index=index).items()}

    def _frame_of(self, maps: torch.Tensor, frame: int | None) -> torch.Tensor:
        """``maps`` (F, h, w) of a video, or its frame ``frame`` (h, w); an image's maps as they are."""
        if frame is None:
            return maps
        F = self.frames
        if F is None:
            raise SelectionError(
                f"frame={frame!r}: these are an image's maps, with no frames; leave frame= out."
            )
        if isinstance(frame, bool) or not isinstance(frame, int) or not -F <= frame < F:
            raise SelectionError(
                f"frame={frame!r} is not a frame of these maps: pass an int in 0..{F - 1} ({F} latent frames), or "
                "None for all of them."
            )
        return maps[frame]  # (h, w)

    def _tokens_of(self, index: int) -> TokenList:
        n = self.num_images
        if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
            raise SelectionError(
                f"index={index!r} is not an image of this call: pass an int in 0..{n - 1} ({n} image(s))."
            )
        return self.token_lists[index]

    def _step_indices(self, step: StepSelector) -> list[int]:
        S = self.num_steps
        accepted = f"pass an int in 0..{S - 1}, a range, a slice or a list of ints ({S} steps were recorded)"
        if (
            isinstance(step, bool)
            or not isinstance(step, int | slice | range | Sequence)
            or isinstance(step, str)
        ):
            raise SelectionError(f"step={step!r} is not a step selector: {accepted}.")
        if isinstance(step, int):
            if not -S <= step < S:
                raise SelectionError(f"step={step} is out of range: {accepted}.")
            return [step % S]
        idx = list(range(S))[step] if isinstance(step, slice) else list(step)
        bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, int) or not -S <= i < S]
        if bad or not idx:
            raise SelectionError(
                f"step={step!r} selects no valid step{f' ({bad[0]!r})' if bad else ''}: {accepted}."
            )
        return [i % S for i in idx]

    def _match_layers(self, layer: str) -> list[str]:
        if not isinstance(layer, str):
            raise SelectionError(
                f"layer={layer!r} is not a layer name: pass a name or a part of one. Captured layers: {self.layer_names}"
            )
        names = [n for n in self.layers if n == layer] or [n for n in self.layers if layer in n]
        if not names:
            raise SelectionError(f"No captured layer matches {layer!r}. Captured layers: {self.layer_names}")
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
                    grid = self.layers[n].shape[2:]  # (h, w), or a video's (F, h, w)
                    per.append(p[..., positions].sum(-1).mean(0).reshape(grid))  # (h, w) or (F, h, w)
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
        if self.concept_aggregate is not None:
            t[f"{prefix}concepts/aggregate"] = self.concept_aggregate
            if self.concept_steps is not None:
                t[f"{prefix}concepts/steps"] = self.concept_steps
            for name, v in (self.concept_layers or {}).items():
                t[f"{prefix}concepts/layers/{name}"] = v
        if self.query_masks is not None:
            t[f"{prefix}query_masks"] = self.query_masks
        if self.negative is not None:
            t.update(self.negative._tensors(prefix + "negative/"))
        return {k: v.detach().cpu().contiguous() for k, v in t.items()}

    def _meta(self) -> dict[str, Any]:
        return (
            {
                "token_lists": [tl.to_json() for tl in self.token_lists],
                "latent_size": list(self.latent_size),
                "vae_scale": self.vae_scale,
                "layer_names": self.layer_names,
                "has_steps": self.steps is not None,
                "has_layer_heads": self.layer_heads is not None,
                "has_probs": self.probs is not None,
                "skipped_layers": self.skipped_layers,
                "family": self.family,
                "kind": self.kind,
                "edited": self.edited,
                "concepts": list(self.concepts),
                "negative": self.negative._meta() if self.negative is not None else None,
            **({"provenance": self.provenance} if self.provenance else {}),  # absent when not recorded
            }
            | ({} if self.frames is None else {"frames": self.frames})
            | (  # an image's files carry no frames key
                {} if self.relation == "image->text" else {"relation": self.relation}
            )
        )  # nor image→text maps (and files from before relations) a relation

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors by name, JSON-able header): the form saved to disk."""
        return self._tensors(), {"format": _FORMAT, "version": ff.VERSION, "maps": self._meta()}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], header: Any, source: str = "") -> AttentionMaps:
        """Rebuild maps from :meth:`to_state` output; any mismatch raises ResultFileError naming the field."""
        check = ff.Checker(source or "these attention maps")
        header = check.kind(header, _FORMAT, "AttentionMaps")
        unknown = sorted(set(header) - {"format", "version", "maps", ff.TABLE, ff.HEADER_SUM})
        if unknown:
            check.fail(f"field {unknown[0]!r}", "is not a field of saved AttentionMaps")
        meta = check.get(header, "maps", "maps")
        ff.require_tensors(check, tensors, _tensor_names(check, meta, "", "maps"))
        return _build(check, meta, tensors, "", "maps")

    def save(self, path: str | Path) -> Path:
        """Write to one ``.safetensors`` file (tensors; labels, sizes and checksums as JSON in its header).

        Written atomically; returns the path (``.safetensors`` is appended when missing).
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            path = (
                path.with_suffix(path.suffix + ".safetensors")
                if path.suffix
                else path.with_suffix(".safetensors")
            )
        tensors, header = self.to_state()
        return ff.save_result(path, _FORMAT, header, tensors)

    @classmethod
    def load(cls, path: str | Path) -> AttentionMaps:
        """Read a file written by :meth:`save`; every field, shape, dtype and checksum is checked.

        A truncated, corrupt, edited or foreign file raises :class:`~sdexplore.errors.ResultFileError`.
        """
        rf = ff.read_result(path, _FORMAT, "AttentionMaps")
        maps = cls.from_state(rf.tensors, rf.header, str(rf.path))
        rf.verify_checksums()
        return maps


_META_KEYS = frozenset(
    {
        "token_lists",
        "latent_size",
        "vae_scale",
        "layer_names",
        "has_steps",
        "has_layer_heads",
        "has_probs",
        "skipped_layers",
        "family",
        "kind",
        "edited",
        "concepts",
        "negative",
        "frames",
        "relation",
        "provenance",
    }
)
_TOKEN_KEYS = frozenset({"ids", "pieces", "kinds", "truncated", "prompt", "segments"})
_KINDS = ("bos", "text", "eos", "pad")
#: Kinds of attention maps (:attr:`AttentionMaps.kind`).
MAP_KINDS = ("cross", "joint", "text", "output")
#: Relations a recording keeps (:attr:`AttentionMaps.relation`; :mod:`sdexplore.record.relations`).
RELATIONS = ("image->text", "image->image", "text->image", "text->text")
#: Relations whose queries are text tokens: MMDiT joint attention only (cross-attention has no text queries).
TEXT_QUERIES = ("text->image", "text->text")


def _tensor_names(c: ff.Checker, meta: Any, prefix: str, field: str) -> list[str]:
    """Names of the tensors a ``maps`` header describes (negative maps included)."""
    meta = c.dict(meta, field)
    unknown = sorted(set(meta) - _META_KEYS)
    if unknown:
        c.fail(f"{field}.{unknown[0]}", "is not a field of saved AttentionMaps")
    layers = c.list(c.get(meta, "layer_names", f"{field}.layer_names"), f"{field}.layer_names")
    for i, n in enumerate(layers):
        c.str(n, f"{field}.layer_names[{i}]")
    if len(set(layers)) != len(layers):
        c.fail(f"{field}.layer_names", "names a layer twice")
    names = [f"{prefix}aggregate", f"{prefix}timesteps"]
    if c.bool(c.get(meta, "has_steps", f"{field}.has_steps"), f"{field}.has_steps"):
        names.append(f"{prefix}steps")
    names += [f"{prefix}layers/{n}" for n in layers]
    for group in ("layer_heads", "probs"):
        if c.bool(c.get(meta, f"has_{group}", f"{field}.has_{group}"), f"{field}.has_{group}"):
            names += [f"{prefix}{group}/{n}" for n in layers]
    if meta.get("relation") == "image->image":
        names.append(f"{prefix}query_masks")
    concepts = c.list(meta.get("concepts", []), f"{field}.concepts")
    if concepts:
        names.append(f"{prefix}concepts/aggregate")
        if meta["has_steps"]:
            names.append(f"{prefix}concepts/steps")
        names += [f"{prefix}concepts/layers/{n}" for n in layers]
    negative = c.get(meta, "negative", f"{field}.negative")
    if negative is not None:
        if prefix:
            c.fail(f"{field}.negative", "is set inside negative maps (only one level is saved)")
        names += _tensor_names(c, negative, "negative/", f"{field}.negative")
    return names


def _build(
    c: ff.Checker, meta: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str, field: str
) -> AttentionMaps:
    """AttentionMaps from a checked ``maps`` header and its tensors, every shape and dtype checked."""
    frames = meta.get("frames")  # files of images (and from before videos) carry none
    if frames is not None:
        frames = c.int(frames, f"{field}.frames", lo=1)
    f = () if frames is None else (frames,)  # a video's frame axis, before (h, w) in every map
    # files from before relations: image→text
    relation = c.str(meta.get("relation", "image->text"), f"{field}.relation", choices=RELATIONS)
    B, T, *_, H, W = ff.check_tensor(
        c, f"{prefix}aggregate", tensors[f"{prefix}aggregate"], (None, None, *f, None, None), floating=True
    )  # (B, T[, F], H, W)
    (S,) = ff.check_tensor(c, f"{prefix}timesteps", tensors[f"{prefix}timesteps"], (None,), floating=True)
    size = c.list(c.get(meta, "latent_size", f"{field}.latent_size"), f"{field}.latent_size", length=2)
    latent_size = (
        c.int(size[0], f"{field}.latent_size[0]", lo=1),
        c.int(size[1], f"{field}.latent_size[1]", lo=1),
    )
    if latent_size != (H, W):
        c.fail(f"{field}.latent_size", f"is {list(latent_size)}, but the aggregate maps are {H}×{W}")
    steps = None
    if meta["has_steps"]:
        steps = tensors[f"{prefix}steps"]
        ff.check_tensor(
            c, f"{prefix}steps", steps, (S, B, T, *f, None, None), floating=True
        )  # (S, B, T[, F], h, w)
    layers: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] | None = {} if meta["has_layer_heads"] else None
    probs: dict[str, torch.Tensor] | None = {} if meta["has_probs"] else None
    for n in meta["layer_names"]:
        t = layers[n] = tensors[f"{prefix}layers/{n}"]
        *_, h, w = ff.check_tensor(
            c, f"{prefix}layers/{n}", t, (B, T, *f, None, None), floating=True
        )  # (B, T[, F], h, w)
        nh = None
        if heads is not None:
            t = heads[n] = tensors[f"{prefix}layer_heads/{n}"]
            nh = ff.check_tensor(c, f"{prefix}layer_heads/{n}", t, (B, None, T, *f, h, w), floating=True)[1]
        if probs is not None:
            t = probs[n] = tensors[f"{prefix}probs/{n}"]
            ff.check_tensor(
                c, f"{prefix}probs/{n}", t, (S, B, nh, (frames or 1) * h * w, T), floating=True
            )  # (S, B, heads, [F·]hw, T)
    query_masks = None
    if (
        relation == "image->image"
    ):  # axis 1 holds the selected queries, each with its weights on the latent grid
        query_masks = tensors[f"{prefix}query_masks"]
        ff.check_tensor(c, f"{prefix}query_masks", query_masks, (T, H, W), floating=True)  # (Q, H, W)
    token_lists = [
        _token_list(c, d, None if relation == "image->image" else T, f"{field}.token_lists[{i}]")
        for i, d in enumerate(
            c.list(c.get(meta, "token_lists", f"{field}.token_lists"), f"{field}.token_lists", length=B)
        )
    ]
    skipped = c.list(c.get(meta, "skipped_layers", f"{field}.skipped_layers"), f"{field}.skipped_layers")
    for i, n in enumerate(skipped):
        c.str(n, f"{field}.skipped_layers[{i}]")
    concepts = [c.str(v, f"{field}.concepts[{i}]") for i, v in enumerate(meta.get("concepts", []))]
    concept_parts: dict[str, Any] = {}
    if concepts:
        C = len(concepts)
        agg = tensors[f"{prefix}concepts/aggregate"]
        ff.check_tensor(c, f"{prefix}concepts/aggregate", agg, (B, C, *f, H, W), floating=True)
        cl = {}
        for n in meta["layer_names"]:
            cl[n] = tensors[f"{prefix}concepts/layers/{n}"]
            ff.check_tensor(
                c, f"{prefix}concepts/layers/{n}", cl[n], (B, C, *layers[n].shape[2:]), floating=True
            )
        cs = None
        if steps is not None:
            cs = tensors[f"{prefix}concepts/steps"]
            ff.check_tensor(c, f"{prefix}concepts/steps", cs, (S, B, C, *steps.shape[3:]), floating=True)
        concept_parts = dict(concepts=concepts, concept_aggregate=agg, concept_layers=cl, concept_steps=cs)
    family = c.str(c.get(meta, "family", f"{field}.family"), f"{field}.family")
    kind = c.str(
        meta.get("kind", "cross"), f"{field}.kind", choices=MAP_KINDS
    )  # files from before kinds: cross
    edited = c.bool(meta.get("edited", False), f"{field}.edited")  # files from before controls: False
    # files from before provenance carry none
    provenance = _provenance.check(c, meta.get("provenance", {}), f"{field}.provenance")
    _check_consistency(
        c, field, prefix, family, kind, tensors[f"{prefix}aggregate"], layers, edited, frames, relation
    )
    negative = None
    if meta["negative"] is not None:
        negative = _build(c, meta["negative"], tensors, "negative/", f"{field}.negative")
        if negative.aggregate.shape != tensors[f"{prefix}aggregate"].shape or negative.num_steps != S:
            c.fail(f"{field}.negative", "does not match the conditional maps' images, tokens, size or steps")
        if (negative.family, negative.kind) != (family, kind):
            c.fail(
                f"{field}.negative.family / {field}.negative.kind",
                f"are {negative.family!r} / {negative.kind!r}, but the conditional maps' are {family!r} / {kind!r} "
                "(one run records both)",
            )
    return AttentionMaps(
        aggregate=tensors[f"{prefix}aggregate"],
        timesteps=tensors[f"{prefix}timesteps"],
        layers=layers,
        token_lists=token_lists,
        latent_size=latent_size,
        vae_scale=c.int(c.get(meta, "vae_scale", f"{field}.vae_scale"), f"{field}.vae_scale", lo=1),
        steps=steps,
        layer_heads=heads,
        probs=probs,
        negative=negative,
        skipped_layers=list(skipped),
        family=family,
        kind=kind,
        edited=edited,
        frames=frames,
        relation=relation,
        query_masks=query_masks,
        provenance=provenance,
        **concept_parts,
    )


#: How far a pixel's aggregated mass over the T key positions may stray from what its kind promises (1 for
#: "cross" and "text", at most 1 for "joint" and "output"): recorders average fp16/bf16 probabilities on GPUs.
_MASS_TOLERANCE = 0.05


def _check_consistency(
    c: ff.Checker,
    field: str,
    prefix: str,
    family: str,
    kind: str,
    aggregate: torch.Tensor,
    layers: dict[str, torch.Tensor],
    edited: bool = False,
    frames: int | None = None,
    relation: str = "image->text",
) -> None:
    """The header's family, kind and latent size agree with each other and with the maps (no model needed)."""
    fam = ff.family_of(c, family, f"{field}.family")
    if relation != "image->text":  # each query's map over the keys: its share of a softmax, at most 1
        if relation in TEXT_QUERIES and fam is not None and (fam.denoiser == "unet" or fam.cross_attention):
            c.fail(
                f"{field}.relation",
                f"is {relation!r}, but {fam.label} attends to text by cross-attention, which has no text queries",
            )
        for n, t in layers.items():
            mass = t.double().flatten(-2).sum(-1)  # (B, Q): each query's mass over the layer's keys
            if mass.numel() and (float(mass.max()) > 1 + _MASS_TOLERANCE or float(mass.min()) < 0):
                c.fail(
                    f"tensor '{prefix}layers/{n}'",
                    f"holds {relation} maps whose mass per query is {float(mass.min()):.3g}.."
                    f"{float(mass.max()):.3g}, but a query's probabilities over keys sum to at most 1",
                )
        return
    if fam is not None and fam.video != (frames is not None):
        c.fail(
            f"{field}.frames",
            f"is {frames!r}, but {field}.family is {family!r} ({fam.label}), "
            + (
                "a video family: its maps have frames"
                if fam.video
                else "an image family: its maps have no frames"
            ),
        )
    if fam is not None:
        cross = fam.denoiser == "unet" or fam.cross_attention  # text through attn2 (PixArt-Σ, Sana, Wan)
        kinds = ("cross",) if cross else tuple(k for k in MAP_KINDS if k != "cross")
        if kind not in kinds:
            c.fail(
                f"{field}.kind",
                f"is {kind!r}, but {field}.family is {family!r} ({fam.label}), whose attention maps are "
                f"{' or '.join(map(repr, kinds))}",
            )
    H, W = aggregate.shape[-2:]
    for n, t in layers.items():
        h, w = t.shape[-2:]
        if not any(
            h in (H // f, -(-H // f)) and w in (W // f, -(-W // f)) for f in range(1, max(H, W) + 1)
        ):  # a UNet halves odd sizes upwards, a transformer's patches downwards
            c.fail(
                f"tensor '{prefix}layers/{n}'",
                f"has {h}×{w} maps, which are not the {H}×{W} latent ({field}.latent_size) downsampled by one "
                "whole factor",
            )
    if aggregate.numel():
        mass = aggregate.double().sum(1)  # (B, H, W): each pixel's mass over the T key positions
        lo, hi = float(mass.min()), float(mass.max())
        exact = kind in ("cross", "text")  # a softmax over the saved keys; joint: image keys share it
        if edited:  # a control scaled some words: only the sign is promised
            if lo < 0:
                c.fail(f"tensor '{prefix}aggregate'", f"has negative attention ({lo:.3g}) in edited maps")
        elif not (hi <= 1 + _MASS_TOLERANCE and (lo >= 1 - _MASS_TOLERANCE or not exact)) or lo < 0:
            want = "1 (a softmax over the saved keys)" if exact else "at most 1"
            c.fail(
                f"{field}.kind",
                f"is {kind!r}, so each pixel's maps over the key positions sum to {want}, but tensor "
                f"'{prefix}aggregate' sums to {lo:.3g}..{hi:.3g}",
            )


def _token_list(c: ff.Checker, value: Any, T: int | None, field: str) -> TokenList:
    """One image's token labels: ids, pieces and kinds for each of the ``T`` key positions."""
    d = c.dict(value, field)
    unknown = sorted(set(d) - _TOKEN_KEYS)
    if unknown:
        c.fail(f"{field}.{unknown[0]}", "is not a field of a token list")
    ids = [
        c.int(v, f"{field}.ids[{i}]")
        for i, v in enumerate(c.list(c.get(d, "ids", f"{field}.ids"), f"{field}.ids", length=T))
    ]
    pieces = [
        c.str(v, f"{field}.pieces[{i}]")
        for i, v in enumerate(c.list(c.get(d, "pieces", f"{field}.pieces"), f"{field}.pieces", length=T))
    ]
    kinds = [
        c.str(v, f"{field}.kinds[{i}]", choices=_KINDS)
        for i, v in enumerate(c.list(c.get(d, "kinds", f"{field}.kinds"), f"{field}.kinds", length=T))
    ]
    truncated = [
        c.str(v, f"{field}.truncated[{i}]")
        for i, v in enumerate(c.list(c.get(d, "truncated", f"{field}.truncated"), f"{field}.truncated"))
    ]
    prompt = c.get(d, "prompt", f"{field}.prompt")
    return TokenList(
        ids,
        pieces,
        kinds,
        truncated,
        None if prompt is None else c.str(prompt, f"{field}.prompt"),
        segments_from_json(c, d.get("segments", []), T, f"{field}.segments"),  # SD3/Flux: CLIP and T5 parts
    )
