"""Edit: what :func:`sdexplore.edit` returns, as plain data (the two images and the maps of both runs), saved in
the results' one checksummed file format."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidArgumentError, WordNotFoundError
from . import attention_maps as _maps
from . import fileformat as ff
from . import provenance as _provenance
from .attention_maps import AttentionMaps

_FORMAT = "sdexplore.edit"
_BRANCHES = ("source", "edited")


@dataclass
class Edit:
    """The source and the edited images of one attention edit, with the attention that made each.

    ``source`` and ``edited`` are PIL images (lists when the call made several images per branch), generated in
    one batched call from the same initial latents. ``source_maps`` / ``edited_maps`` are the cross-attention maps
    of each branch (:class:`AttentionMaps`; the edited ones are the probabilities after the edit), or None when
    maps were not recorded. ``settings`` records the edit (prompts, controls, steps, guidance).
    """

    source: Any
    edited: Any
    source_prompt: str | list[str]
    edited_prompt: str | list[str]
    source_maps: AttentionMaps | None = None
    edited_maps: AttentionMaps | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    # ---- views --------------------------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        """Images per branch."""
        return len(_image_list(self.source))

    def images(self, index: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(source, edited) of image ``index``, each (H, W, 3) uint8."""
        src, out = _image_list(self.source), _image_list(self.edited)
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(src):
            raise InvalidArgumentError(f"index={index!r}: this edit holds images 0..{len(src) - 1}.")
        return _uint8(src[index]), _uint8(out[index])

    def difference(self, index: int = 0) -> np.ndarray:
        """|edited − source| of image ``index`` per channel, (H, W, 3) uint8: black where the edit changed nothing."""
        a, b = self.images(index)
        return np.abs(b.astype(np.int16) - a.astype(np.int16)).astype(np.uint8)  # (H, W, 3)

    def prompts(self, index: int = 0) -> tuple[str, str]:
        """(source prompt, edited prompt) of image ``index``."""
        self.images(index)  # checks the index
        src, out = _as_list(self.source_prompt), _as_list(self.edited_prompt)
        per = max(1, self.num_images // len(src))  # num_images_per_prompt
        return src[index // per], out[index // per]

    def changed_words(self, index: int = 0) -> list[str]:
        """The words the edit changed in image ``index``: the edited prompt's words that differ from the source's
        at the same place (a word swap), then the reweighted or masked words, each once, in that order."""
        src, out = (p.split() for p in self.prompts(index))
        words = [b for a, b in zip(src, out, strict=False) if a != b] + out[len(src) :]
        words += [str(w) for w in self.settings.get("reweight") or {}]
        words += [str(w) for w in self.settings.get("masks") or []]
        return list(dict.fromkeys(words))

    def word_maps(self, word: str, index: int = 0) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(before, after): the attention map (h, w) of ``word`` of the edited prompt in the edited image, and the
        map that stood in its place in the source image (raw mass, one scale: compare them directly).

        Before is the source's map at the same key positions where the two prompts align word for word (a word
        swap: the swapped-out word; a reweight: the same word), else the source's map of the same word where the
        source prompt has it, else None (a word the source does not have). Raises NotRecordedError when the edit
        kept no maps, WordNotFoundError for a word not in the edited prompt.
        """
        if self.source_maps is None or self.edited_maps is None:
            from ..errors import NotRecordedError

            raise NotRecordedError(
                "This edit kept no attention maps: call sdexplore.edit(..., attention=True) (the default) outside "
                "an observe(attention=True) block, or read that block's maps."
            )
        self.images(index)  # checks the index
        after = self.edited_maps.word(word, index=index)  # (h, w); WordNotFoundError for a non-word
        src, out = self.source_maps.token_lists[index], self.edited_maps.token_lists[index]
        if [len(p) for _, p in src.word_spans()] == [len(p) for _, p in out.word_spans()]:
            before = sum(self.source_maps.token(p, index=index) for p in out.positions(word))  # (h, w)
            return before, after  # type: ignore[return-value]
        try:
            return self.source_maps.word(word, index=index), after
        except WordNotFoundError:
            return None, after

    def __repr__(self) -> str:
        src, out = self.prompts(0)
        h, w = self.images(0)[0].shape[:2]
        maps = "with maps" if self.source_maps is not None else "no maps"
        return f"Edit({src!r} → {out!r}, {self.num_images} image(s) per branch, {h}×{w}, {maps})"

    def save_html(
        self,
        path: str | Path,
        *,
        index: int = 0,
        words: list[str] | None = None,
        model: str | None = None,
        seed: int | None = None,
        title: str | None = None,
    ) -> Path:
        """One self-contained HTML page of this edit, opening from ``file://`` with no network: source | edited |
        difference, and each word's map before and after the edit on one scale (after − before in a diverging
        colour map). Written atomically; returns the path.

        ``index``: which image of each branch; ``words``: the words offered (default: every distinct word of the
        edited prompt); ``model``, ``seed``: the provenance the page shows, by default what the edit's maps kept
        of the call (the model, scheduler and seed; an edit without maps, such as FlowEdit's, keeps none);
        ``title``: the page's title. A bad path or ``index`` raises
        :class:`~sdexplore.errors.InvalidArgumentError` before any work.
        """
        from ..views import pages  # the views layer, imported only when a page is asked for

        return pages.save_edit(self, path, index=index, words=words, model=model, seed=seed, title=title)

    # ---- save / load --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save as one safetensors file with a checksummed JSON header (the results' file format; never pickle).

        Both branches' images as (N, H, W, 3) uint8 tensors, the maps of both branches as :class:`AttentionMaps`
        saves them (under ``source_maps/`` and ``edited_maps/``). Written atomically; returns the path.
        """
        tensors: dict[str, torch.Tensor] = {}
        header: dict[str, Any] = {
            "format": _FORMAT,
            "version": ff.VERSION,
            "source_prompt": self.source_prompt,
            "edited_prompt": self.edited_prompt,
            "settings": self.settings,
        }
        for name in _BRANCHES:
            images = np.stack([_uint8(im) for im in _image_list(getattr(self, name))])  # (N, H, W, 3)
            tensors[name] = torch.from_numpy(np.ascontiguousarray(images))
            maps = getattr(self, f"{name}_maps")
            header[f"{name}_maps"] = None if maps is None else maps._meta()
            if maps is not None:
                # clones: the two branches' maps are views of one batch (safetensors refuses shared storage)
                tensors.update({k: v.clone() for k, v in maps._tensors(f"{name}_maps/").items()})
        return ff.save_result(Path(path), _FORMAT, header, tensors)

    @classmethod
    def load(cls, path: str | Path) -> Edit:
        """Load an edit written by :meth:`save`; every field, shape and checksum is checked, and the fields against
        each other (both branches' images alike, maps of one call, settings that fit the prompts). Any damage
        raises :class:`~sdexplore.errors.ResultFileError` naming the field."""
        rf = ff.read_result(path, _FORMAT, "Edit")
        check, header, tensors = rf.check, rf.header, rf.tensors
        unknown = sorted(
            set(header)
            - {
                "format",
                "version",
                "source_prompt",
                "edited_prompt",
                "settings",
                "source_maps",
                "edited_maps",
            }
            - {ff.TABLE, ff.HEADER_SUM}
        )
        if unknown:
            check.fail(f"field {unknown[0]!r}", "is not a field of a saved Edit")
        prompts = {n: _prompt_field(check, header, f"{n}_prompt") for n in _BRANCHES}
        settings = check.dict(check.get(header, "settings", "settings"), "settings")
        metas = {n: check.get(header, f"{n}_maps", f"{n}_maps") for n in _BRANCHES}
        names = set(_BRANCHES)
        for n, meta in metas.items():
            if meta is not None:
                names.update(f"{n}_maps/{t}" for t in _maps._tensor_names(check, meta, "", f"{n}_maps"))
        ff.require_tensors(check, tensors, names)
        images = {}
        for n in _BRANCHES:
            images[n] = tensors[n]
            ff.check_tensor(check, n, images[n], (None, None, None, 3), dtype=torch.uint8)  # (N, H, W, 3)
        if images["edited"].shape != images["source"].shape:
            check.fail(
                "tensor 'edited'",
                f"has shape {list(images['edited'].shape)}, but tensor 'source' has {list(images['source'].shape)}"
                " (both branches come from one call: same count, same size)",
            )
        maps: dict[str, AttentionMaps | None] = {}
        for n, meta in metas.items():
            if meta is None:
                maps[n] = None
                continue
            prefix = f"{n}_maps/"
            sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            state = {"format": _maps._FORMAT, "version": ff.VERSION, "maps": meta}
            reweighted = n == "edited" and bool(settings.get("reweight") or settings.get("masks"))
            aggregate = sub.get("aggregate")
            if reweighted and isinstance(aggregate, torch.Tensor) and aggregate.dim() == 4:
                # a reweight scales probabilities after the softmax: a pixel's mass over the keys is no longer 1
                # (0.94..0.98 with one word ablated). AttentionMaps checks a softmax's mass, so it is shown the
                # maps renormalised, and the saved mass is checked against the weights here instead.
                _check_reweighted_mass(check, aggregate, settings)
                mass = aggregate.double().sum(1, keepdim=True)  # (B, 1, H, W)
                unit = torch.where(mass > 0, aggregate / mass.clamp_min(1e-30), 1.0 / aggregate.shape[1])
                sub = {**sub, "aggregate": unit.to(aggregate.dtype)}  # (B, T, H, W), each pixel sums to 1
            m = AttentionMaps.from_state(sub, state, f"{check.source} ({n}_maps)")
            maps[n] = replace(m, aggregate=aggregate) if reweighted else m
        _check_consistency(check, prompts, settings, images, maps)
        rf.verify_checksums()
        n_img = int(images["source"].shape[0])
        out = {
            n: [Image.fromarray(im) for im in images[n].numpy()]
            for n in _BRANCHES  # (H, W, 3) each
        }
        return cls(
            source=out["source"][0] if n_img == 1 else out["source"],
            edited=out["edited"][0] if n_img == 1 else out["edited"],
            source_prompt=prompts["source"],
            edited_prompt=prompts["edited"],
            source_maps=maps["source"],
            edited_maps=maps["edited"],
            settings=settings,
        )


def _as_list(prompt: str | list[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


def _image_list(images: Any) -> list[Any]:
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _uint8(image: Any) -> np.ndarray:
    from .._images import as_uint8_image

    return as_uint8_image(image)


def _prompt_field(c: ff.Checker, header: dict[str, Any], key: str) -> str | list[str]:
    value = c.get(header, key, key)
    if isinstance(value, list):
        c.list(value, key)
        if not value:
            c.fail(key, "is an empty list, expected a prompt or a list of prompts")
        return [c.str(p, f"{key}[{i}]") for i, p in enumerate(value)]
    return c.str(value, key)


#: How far a reweighted pixel's mass may stray beyond its weights' range (GPU recorders average fp16 probabilities).
_MASS_TOLERANCE = 0.05


def _check_reweighted_mass(c: ff.Checker, aggregate: torch.Tensor, settings: dict[str, Any]) -> None:
    """Reweighted probabilities sum, at each pixel, to a weighted mean of the factors and 1 (the words left as they
    were): within [min, max] of those, or within [0, max] where masks move attention (their weights vary by pixel).
    """
    factors = [1.0]
    weights = settings.get("reweight") or {}
    if isinstance(weights, dict):
        factors += [
            float(v) for v in weights.values() if isinstance(v, (int, float)) and not isinstance(v, bool)
        ]
    lo, hi = min(factors), max(factors)
    if settings.get("masks"):
        lo, hi = 0.0, math.inf  # a mask moves a word's attention: its weight varies by pixel
    mass = aggregate.double().sum(1)  # (B, H, W)
    if aggregate.numel() and not (
        float(mass.min()) >= lo - _MASS_TOLERANCE and float(mass.max()) <= hi * (1 + _MASS_TOLERANCE)
    ):
        c.fail(
            "tensor 'edited_maps/aggregate'",
            f"sums over the key positions to {float(mass.min()):.3g}..{float(mass.max()):.3g} at its pixels, "
            f"outside what settings.reweight's factors allow ({lo:g}..{hi:g})",
        )


def _fraction(c: ff.Checker, value: Any, field: str) -> float | None:
    return None if value is None else c.number(value, field, lo=0.0, hi=1.0)


def _check_consistency(
    c: ff.Checker,
    prompts: dict[str, str | list[str]],
    settings: dict[str, Any],
    images: dict[str, torch.Tensor],
    maps: dict[str, AttentionMaps | None],
) -> None:
    """Prompts, settings, images and maps of a saved edit agree with each other (no model needed)."""
    src, out = prompts["source"], prompts["edited"]
    if isinstance(src, str) != isinstance(out, str) or len(_as_list(src)) != len(_as_list(out)):
        c.fail("edited_prompt", f"is {out!r}, which is not one target per source prompt {src!r}")
    n_img = int(images["source"].shape[0])
    per = 1
    if "num_images_per_prompt" in settings:
        per = c.int(settings["num_images_per_prompt"], "settings.num_images_per_prompt", lo=1)
        if n_img != per * len(_as_list(src)):
            c.fail(
                "settings.num_images_per_prompt",
                f"is {per}, so {len(_as_list(src))} prompt(s) make {per * len(_as_list(src))} image(s) per "
                f"branch, but tensor 'source' holds {n_img}",
            )
    swap = [_fraction(c, settings.get(k), f"settings.{k}") for k in ("cross_replace", "self_replace")]
    if (swap[0] is None) != (swap[1] is None):
        c.fail(
            "settings.cross_replace / settings.self_replace",
            "are set one without the other (a word swap sets both)",
        )
    reweight = c.dict(settings.get("reweight") or {}, "settings.reweight")
    for w, v in reweight.items():
        c.number(v, f"settings.reweight[{w!r}]", lo=0.0)
    masks = [
        c.str(m, f"settings.masks[{i}]")
        for i, m in enumerate(c.list(settings.get("masks") or [], "settings.masks"))
    ]
    if swap[0] is None and settings.get("method") not in ("flowedit", "inject"):
        # FlowEdit edits by velocity, Inject by the image stream's keys and values: neither is a word swap
        if out != src:
            c.fail(
                "settings.cross_replace",
                f"is null (no word swap), but the edited prompt {out!r} differs from the source {src!r}",
            )
        if not reweight and not masks and not settings.get("syntax"):  # "(red)1.0" is an edit (of strength 0)
            c.fail("settings", "records no edit (no word swap, no reweight, no masks, no prompt syntax)")
    if "steps" in settings:
        span = c.list(settings["steps"], "settings.steps", length=2)
        a, b = (c.number(v, f"settings.steps[{i}]", lo=0.0, hi=1.0) for i, v in enumerate(span))
        if a > b:
            c.fail("settings.steps", f"is [{a}, {b}]: its start is after its end")
    for key in ("num_inference_steps",):
        if key in settings:
            c.int(settings[key], f"settings.{key}", lo=1)
    if "guidance_scale" in settings and not math.isfinite(
        c.number(settings["guidance_scale"], "settings.guidance_scale")
    ):
        c.fail("settings.guidance_scale", "is not finite")

    a, b = maps["source"], maps["edited"]
    if (a is None) != (b is None):
        c.fail(
            "source_maps / edited_maps", "are saved one without the other (one call records both branches)"
        )
    if a is None or b is None:
        return
    H, W = images["source"].shape[1:3]
    for n, m in (("source_maps", a), ("edited_maps", b)):
        if m.num_images != n_img:
            c.fail(n, f"hold {m.num_images} image(s), but each branch has {n_img}")
        if tuple(m.image_size) != (H, W):
            c.fail(
                f"{n}.latent_size",
                f"is {list(m.latent_size)} (× {m.vae_scale}: {m.image_size[0]}×{m.image_size[1]} pixels), but the "
                f"images are {H}×{W}",
            )
    if (a.family, a.kind) != (b.family, b.kind):
        c.fail(
            "edited_maps.family / edited_maps.kind",
            f"are {b.family!r} / {b.kind!r}, but the source maps' are {a.family!r} / {a.kind!r} (one call records both)",
        )
    if a.timesteps.shape != b.timesteps.shape or not torch.equal(a.timesteps, b.timesteps):
        c.fail("tensor 'edited_maps/timesteps'", "differs from the source maps' (one call has one schedule)")
    for n, m, ps in (("source_maps", a, _as_list(src)), ("edited_maps", b, _as_list(out))):
        for i, tl in enumerate(m.token_lists):
            want = ps[i // per] if i // per < len(ps) else None
            if tl.prompt is not None and tl.prompt != want:
                c.fail(
                    f"{n}.token_lists[{i}].prompt", f"is {tl.prompt!r}, but image {i}'s prompt is {want!r}"
                )
    for w in list(reweight) + masks:
        for i, tl in enumerate(b.token_lists):
            try:
                tl.positions(w)
            except WordNotFoundError:
                c.fail(
                    f"settings.reweight / settings.masks ({w!r})",
                    f"names a word not in edited image {i}'s prompt",
                )


def take_images(maps: AttentionMaps, rows: slice) -> AttentionMaps:
    """The maps of images ``rows`` of a batch (every per-image field sliced; views of the same tensors)."""

    def per(d: dict | None, lead: int = 0) -> dict | None:
        if d is None:
            return None
        return {k: (v[rows] if lead == 0 else v[:, rows]) for k, v in d.items()}

    return replace(
        maps,
        aggregate=maps.aggregate[rows],
        layers=per(maps.layers),  # type: ignore[arg-type]
        token_lists=maps.token_lists[rows],
        steps=None if maps.steps is None else maps.steps[:, rows],
        layer_heads=per(maps.layer_heads),
        probs=per(maps.probs, 1),
        negative=None if maps.negative is None else take_images(maps.negative, rows),
        concept_aggregate=None if maps.concept_aggregate is None else maps.concept_aggregate[rows],
        concept_layers=per(maps.concept_layers),
        concept_steps=None if maps.concept_steps is None else maps.concept_steps[:, rows],
        provenance=_provenance.take_images(maps.provenance, rows, maps.num_images),
    )
