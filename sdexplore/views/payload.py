"""The data of a kernel-free explorer: an Observation, a Walk or an Edit as one JSON-able payload.

The JavaScript explorers (``sdexplore/views/web/*.js``) read it in a notebook (anywidget's ``payload`` trait)
and in a self-contained page (embedded, see :mod:`sdexplore.views.pages`). Pictures travel as PNG or lossless
WebP (whichever is smaller), maps as uint8 arrays with each map's own (min, max), deflated; the colour map as the
256 colours matplotlib gives the Python views. Format (version 1)::

    {"format": "sdexplore.page", "version": 1, "kind": "observation" | "walk" | "edit" | "directions",
     "provenance": {model, family, scheduler, seed, prompt, negative_prompt, steps, guidance_scale,
                    size: [H, W], sdexplore, date},
     "colormap": {"name": "jet", "lut": b64(256 × RGB uint8)},
     "image": IMAGE | [IMAGE per frame] | null,          # the picture the maps are drawn over
     "frames": {"count": F, "fps": f} (optional: a video's time axis; every per-frame item then has F entries,
               and every map block a leading F axis),
     "steps": {"count": S, "total": num_steps, "index": [S], "timestep": [S], "sigma": [S] (null = ∞),
               "alpha_bar": [S], "guidance": [S], "x0_source": [S], "flow_sigma": [S] | null,
               "size": [h, w], "panels": [{"key", "title", "images": [IMAGE per step]}]} | absent,
     "attention": {"kind", "family", "edited", "tokens": [T], "kinds": [T],
                   "relation": "image->text" | "text->image" | "image->image",
                   "words": [{"word", "positions": [...]}], "default_word", "opacity", "timesteps": [S],
                   "queries": [{"label", "point": [y, x] (fractions of the picture), "cells"}] (image->image
                              only: axis T of every map block is then the queries, and words are []),
                   "aggregate": MAPS [T, H, W], "steps": MAPS [S, T, h, w] | null,
                   "layers": [{"name", "maps": MAPS [T, h, w]}]} | absent,
     "walk": {...} | absent, "edit": {...} | absent, "directions": {...} | absent (directions_payload)}
    IMAGE = {"mime": "image/png" | "image/webp", "data": b64, "shape": [H, W]}
    MAPS  = {"shape": [..., h, w], "codec": "deflate", "data": b64(zlib(uint8 codes)),
             "delta": axis (optional: codes stored as differences along that leading axis, mod 256),
             "lo": b64(float32 per map), "hi": b64(float32 per map)}     # value = lo + q / 255 · (hi − lo)
"""

from __future__ import annotations

import base64
import datetime
import io
import math
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from .._images import as_uint8_image
from ..results import provenance as _recorded

FORMAT = "sdexplore.page"
#: The colour map of an edit's map difference (after − before), as EditExplorer draws it: blue lost, red gained.
DIFF_CMAP = "RdBu_r"
VERSION = 1
_PANEL_TITLES = {
    "noisy": "noisy latents",
    "x0": "predicted x0",
    "decoded": "image (VAE decode)",
    "noise": "noise prediction",
    "latents": "latent channels",
}


# ---------------------------------------------------------------------------------------------- encoding
def b64(data: bytes) -> str:
    """Base64 text of ``data``."""
    return base64.b64encode(data).decode("ascii")


def encode_image(image: Any, *, quality: int | None = None) -> dict[str, Any]:
    """One picture → ``{"mime", "data", "shape"}``: lossless PNG or lossless WebP, whichever is smaller
    (``quality``: a lossy WebP of that quality instead, for large frames)."""
    arr = as_uint8_image(image)  # (H, W, 3)
    pil = Image.fromarray(arr)
    candidates = []
    if quality is None:
        buf = io.BytesIO()
        pil.save(buf, format="PNG", optimize=True)
        candidates.append(("image/png", buf.getvalue()))
    buf = io.BytesIO()
    if quality is None:
        pil.save(buf, format="WEBP", lossless=True, quality=100, method=4)
    else:
        pil.save(buf, format="WEBP", quality=int(quality), method=4)
    candidates.append(("image/webp", buf.getvalue()))
    mime, data = min(candidates, key=lambda c: len(c[1]))
    return {"mime": mime, "data": b64(data), "shape": [int(arr.shape[0]), int(arr.shape[1])]}


def decode_image(image: dict[str, Any]) -> np.ndarray:
    """The (H, W, 3) uint8 pixels of an :func:`encode_image` entry (tests, round trips)."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image["data"]))).convert("RGB"))


def quantize_maps(maps: Any, *, delta: int | None = None) -> dict[str, Any]:
    """Maps ``(..., h, w)`` → a MAPS block: each map as uint8 over its own (min, max), deflated.

    The largest error of a value read back is (max − min) / 510 of its map. ``delta``: a leading axis along
    which neighbouring maps look alike (the steps of per-step maps): the codes are stored as differences from
    the previous map along it (mod 256), which deflate packs 2× tighter; the page sums them back.
    """
    x = (
        maps.detach().float().cpu().numpy()
        if isinstance(maps, torch.Tensor)
        else np.asarray(maps, np.float32)
    )
    if x.ndim < 2:
        raise ValueError(f"maps are (..., h, w), got shape {x.shape}")
    if delta is not None and not 0 <= delta < x.ndim - 2:
        raise ValueError(f"delta={delta} is not a leading axis of maps shaped {x.shape}")
    shape = [int(s) for s in x.shape]
    flat = np.nan_to_num(x.reshape(-1, shape[-2] * shape[-1]).astype(np.float32))  # (maps, h·w)
    lo = flat.min(axis=1) if flat.size else np.zeros(0, np.float32)
    hi = flat.max(axis=1) if flat.size else np.zeros(0, np.float32)
    span = np.maximum(hi - lo, 1e-30)[:, None]
    q = np.clip(np.rint((flat - lo[:, None]) / span * 255.0), 0, 255).astype(np.uint8).reshape(shape)
    block: dict[str, Any] = {"shape": shape, "codec": "deflate"}
    if delta is not None:
        q = np.diff(q, axis=delta, prepend=np.zeros_like(q.take([0], axis=delta)))  # uint8: mod 256
        block["delta"] = delta
    block["data"] = b64(zlib.compress(np.ascontiguousarray(q).tobytes(), 9))
    block["lo"] = b64(lo.astype("<f4").tobytes())
    block["hi"] = b64(hi.astype("<f4").tobytes())
    return block


def dequantize_maps(block: dict[str, Any]) -> np.ndarray:
    """The float32 maps of a MAPS block, shaped as saved (what the page computes from it)."""
    shape = block["shape"]
    raw = base64.b64decode(block["data"])
    q = np.frombuffer(zlib.decompress(raw) if block.get("codec") == "deflate" else raw, np.uint8).reshape(
        shape
    )
    if block.get("delta") is not None:
        q = np.cumsum(q, axis=block["delta"], dtype=np.uint8)  # wraps mod 256, undoing the differences
    lo = np.frombuffer(base64.b64decode(block["lo"]), "<f4")
    hi = np.frombuffer(base64.b64decode(block["hi"]), "<f4")
    flat = q.reshape(len(lo), -1).astype(np.float32)  # (maps, h·w)
    return (lo[:, None] + flat / 255.0 * (hi - lo)[:, None]).reshape(shape)


def colormap_entry(cmap: str | None = None) -> dict[str, str]:
    """``{"name", "lut"}``: the 256 RGB colours of ``cmap`` (default: the heat maps' own) exactly as
    :func:`sdexplore.views.render.colorize` colours values 0/255 … 255/255."""
    from .render import HEAT_CMAP, colorize

    name = cmap or HEAT_CMAP
    lut = colorize(np.linspace(0.0, 1.0, 256, dtype=np.float32)[None], name)[0]  # (256, 3) uint8
    return {"name": name, "lut": b64(np.ascontiguousarray(lut, np.uint8).tobytes())}


def _finite(x: float) -> float | None:
    """JSON has no ∞ or NaN: those travel as null."""
    x = float(x)
    return x if math.isfinite(x) else None


def provenance(**fields: Any) -> dict[str, Any]:
    """The provenance block: the given fields (None dropped), sdexplore's version and today's date (UTC)."""
    from .. import __version__

    out = {k: v for k, v in fields.items() if v is not None}
    out["sdexplore"] = __version__
    out["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return out


def _base(kind: str, prov: dict[str, Any], cmap: str | None) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "provenance": prov,
        "colormap": colormap_entry(cmap),
    }


# ---------------------------------------------------------------------------------------------- observation
def frame_trace(trace: Any, frame: int) -> Any:
    """The trace of one frame of a video's trace: every latent-shaped tensor (B, C, F, h, w) → (B, C, h, w) and
    every picture (B, F, h, w, 3) → (B, h, w, 3) at ``frame`` (views, no copies), the rest shared."""
    from dataclasses import replace

    def one(t: Any, axis: int) -> Any:
        return t.select(axis, frame) if t is not None and t.ndim == 5 else t

    steps = []
    for rec in trace.steps:
        kw = {k: one(t, 2) for k, t in rec._tensors().items() if k not in ("preview", "decoded")}
        kw.update({k: one(getattr(rec, k), 1) for k in ("preview", "decoded")})
        steps.append(replace(rec, **kw))
    return replace(trace, steps=steps, final_latents=one(trace.final_latents, 2))


def steps_block(
    trace: Any,
    *,
    index: int = 0,
    channels: bool = False,
    encode: Callable[[np.ndarray], dict[str, Any]] = encode_image,
) -> dict[str, Any] | None:
    """The scrubber's data of a Trace: per recorded step its numbers and its panels (None if no panel can be
    drawn: nothing latent-shaped or pictured was recorded). ``encode``: picture → IMAGE entry (a live view
    passes a quicker one than :func:`encode_image`)."""
    from ..schedule_math import flow_sigma_from_sigma
    from .render import trace_preview

    recs = list(trace.steps)
    if not recs:
        return None
    first = recs[0]
    keys = []
    if first.latents is not None:
        keys.append("noisy")
    if first.x0 is not None or first.preview is not None:
        keys.append("x0")
    if first.decoded is not None:
        keys.append("decoded")
    if channels and first.noise_pred is not None:
        keys.append("noise")
    if channels and first.latents is not None:
        keys.append("latents")
    if not keys:
        return None
    if channels:
        from .render import channel_tiles

    def picture(trace: Any, rec: Any, pos: int, key: str) -> np.ndarray:
        if key == "noisy":
            return trace_preview(trace, pos, "latents", image=index)
        if key == "x0":
            return (
                trace_preview(trace, pos, "x0", image=index)
                if rec.x0 is not None
                else rec.preview[index].numpy()
            )
        if key == "decoded":
            return rec.decoded[index].numpy()
        if key == "noise":
            return channel_tiles(rec.noise_pred[index])
        return channel_tiles(rec.latents[index])

    F = trace.frames  # a video's latent frames: every panel holds F pictures per step
    views = [trace] if F is None else [frame_trace(trace, f) for f in range(F)]
    panels = []
    size = None
    for key in keys:
        images: list[Any] = []
        for pos in range(len(recs)):
            per = []
            for view in views:
                arr = picture(view, view.steps[pos], pos, key)
                size = size or [int(arr.shape[0]), int(arr.shape[1])]
                per.append(encode(arr))
            images.append(per if F is not None else per[0])
        panels.append({"key": key, "title": _PANEL_TITLES[key], "images": images})
    flow = trace.prediction_type == "flow_prediction"
    return {
        "count": len(recs),
        "total": int(trace.num_steps or len(recs)),
        "index": [int(r.index) for r in recs],
        "timestep": [float(r.timestep) for r in recs],
        "sigma": [_finite(r.sigma) for r in recs],
        "alpha_bar": [float(r.alpha_bar) for r in recs],
        "guidance": [float(r.guidance_scale) for r in recs],
        "x0_source": [r.x0_source for r in recs],
        "flow_sigma": [float(flow_sigma_from_sigma(r.sigma)) for r in recs] if flow else None,
        "size": size,
        "panels": panels,
    }


def attention_block(
    maps: Any, *, index: int = 0, steps: bool = True, layers: bool = True, opacity: float | None = None
) -> dict[str, Any]:
    """The attention explorer's data of AttentionMaps (image ``index``): every key position's maps,
    aggregated, per step (where recorded) and per layer (where kept), quantised. ``relation`` says what the maps
    are: image→text (a text key's map over the image queries), text→image (a text query's map over the image
    keys: the same per-word layout) or image→image (``queries``: each selected query point's map over the image
    keys, in the place of the words)."""
    from .render import HEAT_OPACITY, first_content_word

    video = getattr(maps, "frames", None)

    def lead(t: torch.Tensor, axis: int) -> torch.Tensor:
        """A video's maps carry their frames F at ``axis`` (before h, w): the page wants F first."""
        return t if video is None else t.movedim(axis, 0)

    tl = maps.token_lists[index]
    # each distinct word with every key position AttentionMaps.word() sums for it (all occurrences, all segments)
    words = [{"word": w, "positions": sorted(set(tl.positions(w)))} for w in dict.fromkeys(tl.words)]
    relation = getattr(maps, "relation", "image->text")
    queries = _queries(maps.query_masks) if relation == "image->image" else None
    if queries is not None:
        words = []  # the maps' axis 1 is the selected queries, not the prompt's tokens
    block = {
        "kind": maps.kind,
        "relation": relation,
        "family": maps.family,
        "edited": bool(maps.edited),
        "tokens": list(tl.tokens),
        "kinds": list(tl.kinds),
        "words": words,
        "default_word": first_content_word([w["word"] for w in words]) if words else None,
        "opacity": float(HEAT_OPACITY if opacity is None else opacity),
        "timesteps": [float(t) for t in maps.timesteps],
        "aggregate": quantize_maps(lead(maps.aggregate[index], 1)),  # (T, H, W) or a video's (F, T, H, W)
        "steps": quantize_maps(lead(maps.steps[:, index], 2), delta=0 if video is None else 1)
        if steps and maps.steps is not None
        else None,  # (S, T, h, w) or (F, S, T, h, w): codes as differences between steps
        "layers": [{"name": n, "maps": quantize_maps(lead(t[index], 1))} for n, t in maps.layers.items()]
        if layers
        else [],  # each (T, h, w) or (F, T, h, w)
    }
    if queries is not None:
        block["queries"] = queries
    return block


def _queries(masks: torch.Tensor) -> list[dict[str, Any]]:
    """image→image: each selected query (``query_masks`` (Q, H, W), weights summing to 1) as the page marks it: its
    centre as fractions of the picture, its cell count, and a label (a point's cell, or a mask's size)."""
    Q, H, W = masks.shape
    ys = (torch.arange(H, dtype=torch.float32) + 0.5)[:, None]  # (H, 1) cell centres
    xs = (torch.arange(W, dtype=torch.float32) + 0.5)[None, :]  # (1, W)
    out = []
    for i in range(Q):
        m = masks[i].float()
        total = float(m.sum()) or 1.0
        cy, cx = float((m * ys).sum()) / total, float((m * xs).sum()) / total  # latent cells
        cells = int((m > 0).sum())
        label = (
            f"query {i}: cell ({int(cy)}, {int(cx)})"
            if cells == 1
            else f"query {i}: mask of {cells} cells around ({cy - 0.5:.1f}, {cx - 0.5:.1f})"
        )
        out.append({"label": label, "point": [cy / H, cx / W], "cells": cells})
    return out


def observation_payload(
    obs: Any,
    *,
    image: Any = None,
    index: int = 0,
    channels: bool = False,
    layers: bool = True,
    cmap: str | None = None,
    model: str | None = None,
    seed: int | None = None,
    prompt: str | None = None,
    negative_prompt: str | None = None,
) -> dict[str, Any]:
    """The payload of an :class:`~sdexplore.results.Observation`: its latest run's steps (if recorded), its
    attention maps (if recorded) and the picture to draw them over (``image``; default the last step's VAE
    decode, else its x0 preview). The provenance is what the recording kept of the call (the model, scheduler,
    seed, prompts, steps, guidance and size of image ``index``: :mod:`sdexplore.results.provenance`); ``model``,
    ``seed``, ``prompt`` and ``negative_prompt`` given here override it (files saved before provenance was kept
    have none)."""
    trace = obs.runs[-1] if obs.runs else None
    maps = obs.attention
    steps = steps_block(trace, index=index, channels=channels) if trace is not None else None
    # image→text, text→image and image→image maps are each a map over the picture; text→text rows are not
    per_word = maps is not None and getattr(maps, "relation", "image->text") != "text->text"
    att = attention_block(maps, index=index, layers=layers) if per_word else None
    frames = (trace.frames if trace is not None else None) or (
        getattr(maps, "frames", None) if per_word else None
    )
    if image is None and trace is not None and len(trace) and trace.frames is not None:
        last = frame_trace(trace, 0)[-1]
        if last.decoded is not None:
            image = trace[-1].decoded[index]  # (F, H, W, 3)
        elif last.x0 is not None:
            from .render import trace_preview

            image = [trace_preview(frame_trace(trace, f), -1, "x0", image=index) for f in range(trace.frames)]
        elif last.preview is not None:
            image = trace[-1].preview[index]  # (F, h, w, 3)
    elif image is None and trace is not None and len(trace):
        last = trace[-1]
        if last.decoded is not None:
            image = last.decoded[index]
        elif last.x0 is not None or last.preview is not None:
            from .render import trace_preview

            image = (
                trace_preview(trace, -1, "x0", image=index) if last.x0 is not None else last.preview[index]
            )
    picture = _pictures(image, frames) if image is not None else None
    if prompt is None and maps is not None:
        prompt = maps.token_lists[index].prompt
    rec = recorded_provenance(trace, maps, index)
    prov = provenance(
        model=model if model is not None else rec.get("model"),
        family=(trace.family if trace is not None else None) or (maps.family if maps is not None else None),
        scheduler=(trace.scheduler if trace is not None else None) or rec.get("scheduler"),
        seed=seed if seed is not None else rec.get("seed"),
        prompt=prompt if prompt is not None else rec.get("prompt"),
        negative_prompt=negative_prompt if negative_prompt is not None else rec.get("negative_prompt"),
        steps=int(trace.num_steps) if trace is not None and trace.num_steps else rec.get("steps"),
        guidance_scale=float(trace.guidance_scale) if trace is not None else rec.get("guidance_scale"),
        size=rec.get("size")
        or ((picture[0] if isinstance(picture, list) else picture)["shape"] if picture is not None else None),
    )
    out = _base("observation", prov, cmap)
    out["image"] = picture
    if frames is not None:
        out["frames"] = {"count": int(frames)}
    if steps is not None:
        out["steps"] = steps
    if att is not None:
        out["attention"] = att
    return out


def recorded_provenance(trace: Any, maps: Any, index: int = 0) -> dict[str, Any]:
    """What a recording kept of its call (``Trace.meta["provenance"]`` over ``AttentionMaps.provenance``), for
    image ``index``: its prompt, negative prompt and seed (``"unseeded"`` without a generator); {} where nothing
    was kept (files saved before provenance)."""
    kept = {**(getattr(maps, "provenance", None) or {})}
    if trace is not None:
        kept.update(trace.meta.get("provenance") or {})
    if not kept:
        return {}
    images = maps.num_images if maps is not None else _batch_size(trace)
    return _recorded.of_image(kept, index, images)


def _batch_size(trace: Any) -> int:
    """Images in a trace's batch: the leading axis of any of its tensors (1 when it holds none)."""
    for rec in trace:
        for t in rec._tensors().values():
            return int(t.shape[0])
    return 1 if trace.final_latents is None else int(trace.final_latents.shape[0])


def _pictures(image: Any, frames: int | None) -> Any:
    """The picture the maps are drawn over: one image, or for a video (``frames`` latent frames) one per frame.

    A video given as its N pixel frames (N, H, W, 3) is sampled at the latent frames (N = 4·(F − 1) + 1 for Wan:
    latent frame f sits over pixel frame round(f·(N − 1)/(F − 1))); a single image is shown under every frame."""
    if frames is None:
        return encode_image(image)
    arr = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image)
    if isinstance(image, list) or arr.ndim == 4 and arr.shape[0] > 1:
        seq = list(image) if isinstance(image, list) else list(arr)  # N pixel frames
        picks = [round(f * (len(seq) - 1) / max(frames - 1, 1)) for f in range(frames)]
        return [encode_image(seq[i]) for i in picks]
    one = encode_image(image)
    return [one] * frames


# ---------------------------------------------------------------------------------------------- walk
def _frame_label(walk: Any, i: int) -> str:
    segments, ts = list(walk.segments or []), list(walk.ts or [])
    n = len(walk)
    if not segments or not ts:
        return f"frame {i + 1} / {n}"
    k = len(walk.seeds)
    a, b = segments[i], (segments[i] + 1) % k

    def key(j: int) -> str:
        p = walk.prompts[j] if j < len(walk.prompts) else None
        return f"“{p}” (seed {walk.seeds[j]})" if p is not None else f"keyframe {j} (seed {walk.seeds[j]})"

    mark = " · keyframe" if i in walk.keyframe_frames else ""
    return f"frame {i + 1} / {n}: {key(a)} → {key(b)}, t = {ts[i]:.2f}{mark}"


def walk_payload(
    walk: Any,
    *,
    fps: float = 12,
    quality: int | None = None,
    model: str | None = None,
    cmap: str | None = None,
) -> dict[str, Any]:
    """The payload of a :class:`~sdexplore.results.Walk`: every frame, where it lies between the keyframes, and
    the consecutive-frame distances (pixel metric) with the walk's smoothness."""
    from ..smoothness import smoothness_report

    frames = np.asarray(walk.images)
    settings = dict(getattr(walk, "settings", {}) or {})
    report = smoothness_report(frames, "pixel") if len(frames) > 1 else None
    prompts = [p for p in walk.prompts if p is not None]
    prov = provenance(
        model=model,
        family=settings.get("family"),
        scheduler=settings.get("scheduler"),
        seed=list(walk.seeds),
        prompt=" → ".join(prompts) if prompts else None,
        steps=settings.get("num_inference_steps"),
        guidance_scale=settings.get("guidance_scale"),
        size=[int(frames.shape[1]), int(frames.shape[2])],
    )
    out = _base("walk", prov, cmap)
    out["image"] = None
    out["walk"] = {
        "count": len(frames),
        "fps": float(fps),
        "prompts": list(walk.prompts),
        "seeds": [int(s) for s in walk.seeds],
        "keyframes": [int(k) for k in walk.keyframe_frames],
        "labels": [_frame_label(walk, i) for i in range(len(frames))],
        "images": [encode_image(f, quality=quality) for f in frames],
        "distances": [float(d) for d in report.distances] if report is not None else [],
        "smoothness": _finite(report.smoothness) if report is not None else None,
        "jumps": [int(j) for j in report.jumps] if report is not None else [],
    }
    return out


def walks_payload(walks: dict[str, Any], **options: Any) -> dict[str, Any]:
    """Several walks of one frame count, compared on one slider (the interpolation explorer): the first walk's
    payload with ``walk.compare`` = ``[{"name", "images", "distances", "smoothness"}]`` for every walk."""
    names = list(walks)
    first = walk_payload(walks[names[0]], **options)
    compare = []
    for name in names:
        p = first if name == names[0] else walk_payload(walks[name], **options)
        w = p["walk"]
        compare.append(
            {"name": name, "images": w["images"], "distances": w["distances"], "smoothness": w["smoothness"]}
        )
    first["walk"]["compare"] = compare
    return first


# ---------------------------------------------------------------------------------------------- edit
def edit_payload(
    edit: Any,
    *,
    index: int = 0,
    words: list[str] | None = None,
    model: str | None = None,
    seed: int | None = None,
    cmap: str | None = None,
) -> dict[str, Any]:
    """The payload of an :class:`~sdexplore.results.edit.Edit`: the source, edited and difference pictures, and
    for each offered word (default: every distinct word of the edited prompt) its map before and after the edit
    (:meth:`~sdexplore.results.edit.Edit.word_maps`: raw mass, compared on one scale)."""
    from .render import HEAT_OPACITY, first_content_word

    src, out = edit.images(index)  # (H, W, 3) each; checks the index
    src_prompt, out_prompt = edit.prompts(index)
    changed = edit.changed_words(index)
    block: dict[str, Any] = {
        "source_prompt": src_prompt,
        "edited_prompt": out_prompt,
        "source": encode_image(src),
        "edited": encode_image(out),
        "difference": encode_image(edit.difference(index)),
        "opacity": float(HEAT_OPACITY),
        "diff_colormap": colormap_entry(DIFF_CMAP),
        "before": None,
        "after": None,
        "words": [],
        "default_word": None,
    }
    if edit.source_maps is not None and edit.edited_maps is not None:
        offered = (
            list(words)
            if words is not None
            else list(dict.fromkeys(edit.edited_maps.token_lists[index].words))
        )
        befores, afters, entries = [], [], []
        for word in offered:
            before, after = edit.word_maps(
                word, index=index
            )  # (h, w) each, raw mass; before None: not in the source
            afters.append(after.float())
            befores.append(torch.zeros_like(after, dtype=torch.float32) if before is None else before.float())
            entries.append({"word": word, "changed": word in changed, "has_before": before is not None})
        block["before"] = quantize_maps(torch.stack(befores))  # (W, h, w)
        block["after"] = quantize_maps(torch.stack(afters))  # (W, h, w)
        block["words"] = entries
        block["default_word"] = first_content_word([w for w in changed if w in offered] + offered)
    settings = dict(getattr(edit, "settings", {}) or {})
    # the edited branch's maps keep the call's provenance; sdexplore.edit drew the latents from that generator
    # itself, so its seed stands alone
    kept = getattr(edit.edited_maps, "provenance", None) or {}
    rec = _recorded.of_image(kept, index, edit.num_images)
    if seed is None:
        seed = settings.get("seed", _recorded.seed_of_image(kept, index, edit.num_images, notes=False))
    prov = provenance(
        model=model if model is not None else rec.get("model"),
        family=edit.edited_maps.family if edit.edited_maps is not None else settings.get("family"),
        scheduler=settings.get("scheduler") or rec.get("scheduler"),
        seed=seed,
        prompt=f"{src_prompt} → {out_prompt}",
        steps=settings.get("num_inference_steps", rec.get("steps")),
        guidance_scale=settings.get("guidance_scale", rec.get("guidance_scale")),
        size=[int(src.shape[0]), int(src.shape[1])],
    )
    payload = _base("edit", prov, cmap)
    payload["image"] = None
    payload["edit"] = block
    return payload


# ---------------------------------------------------------------------------------------------- directions
def directions_payload(
    frames: dict[str, Any], strengths: dict[str, list[float]], *, quality: int | None = None
) -> dict[str, Any]:
    """The payload of the direction explorer: per direction (``frames[name]``, (N, H, W, 3) pictures rendered at
    ``strengths[name]``, e.g. by ``Direction.walk``) its pictures and strengths, opening at the strength nearest 0.
    Format: ``"directions": {"count": D, "rows": [{"name", "strengths": [N], "start", "images": [IMAGE] * N}]}``."""
    rows = []
    for name, fr in frames.items():
        s = [float(x) for x in strengths[name]]
        if len(s) != len(fr):
            raise ValueError(f"direction {name!r}: {len(fr)} frames but {len(s)} strengths")
        rows.append(
            {
                "name": str(name),
                "strengths": s,
                "start": int(np.argmin(np.abs(s))),
                "images": [encode_image(f, quality=quality) for f in fr],
            }
        )
    first = np.asarray(next(iter(frames.values())))
    out = _base("directions", provenance(size=[int(first.shape[1]), int(first.shape[2])]), None)
    out["image"] = None
    out["directions"] = {"count": len(rows), "rows": rows}
    return out
