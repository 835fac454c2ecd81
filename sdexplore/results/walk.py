"""Walk: the frames of a rendered prompt/seed walk and where each lies on the keyframe path, saved as a file pair."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..smoothness import Metric, SmoothnessReport, smoothness_report
from . import fileformat as ff

_FORMAT = "sdexplore.Walk"
_KEYS = frozenset(
    {
        "format",
        "version",
        "frames",
        "prompts",
        "seeds",
        "segments",
        "ts",
        "keyframe_frames",
        "settings",
        "summaries",
        ff.TABLE,
        ff.HEADER_SUM,
    }
)
#: Settings walk() records, with the check each gets when a saved walk is read back (refine() uses them).
_SETTINGS: dict[str, Any] = {
    "family": lambda c, v, f: c.str(v, f),
    "num_inference_steps": lambda c, v, f: c.int(v, f, lo=1),
    "guidance_scale": lambda c, v, f: c.number(v, f),
    "height": lambda c, v, f: c.int(v, f, lo=1),
    "width": lambda c, v, f: c.int(v, f, lo=1),
    "spacing": lambda c, v, f: c.str(v, f, choices=("even", "ease")),
    "loop": lambda c, v, f: c.bool(v, f),
    "batch_size": lambda c, v, f: c.int(v, f, lo=1),
    "scheduler": lambda c, v, f: c.str(v, f),
    "generator_device": lambda c, v, f: c.str(v, f),
    "refined": lambda c, v, f: c.int(v, f, lo=0),
    "max_sequence_length": lambda c, v, f: c.int(v, f, lo=1, hi=512),  # SD3, Flux: T5's length
    "negative_prompt": lambda c, v, f: (
        v
        if v is None or isinstance(v, str)
        else [None if x is None else c.str(x, f"{f}[{i}]") for i, x in enumerate(c.list(v, f))]
    ),
}


@dataclass
class Walk:
    """A rendered walk: frames as uint8 arrays plus where each frame lies on the keyframe path."""

    images: np.ndarray  # (frames, H, W, 3) uint8
    prompts: list[str | None]  # keyframe prompts (None for a keyframe given as an EncodedPrompt)
    seeds: list[int]  # keyframe seeds
    segments: list[int]  # per frame: keyframe index its segment starts at
    ts: list[float]  # per frame: position in the segment (0 = that keyframe, 1 = the next)
    keyframe_frames: list[int]  # frame index of each keyframe
    settings: dict[str, Any] = field(
        default_factory=dict
    )  # steps, guidance, size, spacing, loop, family, ...
    summaries: list[Any] | None = None  # per-frame recorder summaries when walk(..., observe=...) was used

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    @property
    def pil_images(self) -> list[Image.Image]:
        """Every frame as a PIL image."""
        return [Image.fromarray(f) for f in self.images]

    def smoothness(self, metric: Metric = "pixel", *, top: int = 3) -> SmoothnessReport:
        """Consecutive-frame distances, 1 − Gini and largest jumps (see :mod:`sdexplore.smoothness`)."""
        return smoothness_report(self.images, metric, top=top)

    def save_gif(self, path: str | Path, *, fps: float = 12, rubber: bool = False) -> Path:
        """Animated GIF (``rubber``: forward then back)."""
        from ..views import export

        return export.save_gif(self.images, path, fps=fps, rubber=rubber)

    def save_mp4(self, path: str | Path, *, fps: float = 12, rubber: bool = False) -> Path:
        """H.264 MP4 (``rubber``: forward then back)."""
        from ..views import export

        return export.save_mp4(self.images, path, fps=fps, rubber=rubber)

    def save_frames(self, folder: str | Path) -> list[Path]:
        """One PNG per frame."""
        from ..views import export

        return export.save_frames(self.images, folder)

    def save_grid(self, path: str | Path, *, cols: int | None = None) -> Path:
        """All frames tiled into one PNG."""
        from ..views import export

        return export.save_grid(self.images, path, cols=cols)

    def save_html(
        self,
        path: str | Path,
        *,
        fps: float = 12,
        quality: int | None = None,
        model: str | None = None,
        title: str | None = None,
    ) -> Path:
        """One self-contained HTML page that plays this walk and scrubs its frames with their smoothness curve,
        with no kernel and no network (it opens from ``file://``); written atomically. Returns the path.

        ``fps``: the playback speed it opens with; ``quality``: store frames as lossy WebP of that quality
        (default lossless PNG or WebP, whichever is smaller); ``model``: the model's name for the page's
        provenance (the walk's prompts, seeds, family, scheduler and sdexplore's version are always written).
        A path that is not an ``.html`` file in an existing folder raises
        :class:`~sdexplore.errors.InvalidArgumentError` before any work.
        """
        from ..views import pages  # the views layer, imported only when a page is asked for

        return pages.save_walk(self, path, fps=fps, quality=quality, model=model, title=title)

    # ---- save / load --------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Save as ``path`` (safetensors: the frames) + ``path.json`` (everything else). Never pickle.

        Both files carry the same header (with the frames' checksum); they are written as one: temporaries
        first, then both renamed, so a failure leaves neither new file behind.
        """
        path = Path(path)
        images = torch.from_numpy(np.require(self.images, requirements=["C", "W"]))  # (frames, H, W, 3)
        header = ff.seal(
            {
                "format": _FORMAT,
                "version": ff.VERSION,
                "frames": len(self),
                "prompts": self.prompts,
                "seeds": self.seeds,
                "segments": self.segments,
                "ts": self.ts,
                "keyframe_frames": self.keyframe_frames,
                "settings": self.settings,
                "summaries": self.summaries,
            },
            {"images": images},
        )
        ff.write_files(
            {
                path: ff.safetensors_writer({"images": images}, _FORMAT, header),
                _sidecar(path): ff.text_writer(json.dumps(header, indent=1)),
            }
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Walk:
        """Load a walk written by :meth:`save`: every field, the frames' shape, dtype and checksum are checked,
        and the two files must belong together. Any failure raises :class:`~sdexplore.errors.ResultFileError`.
        """
        path = Path(path)
        meta_path = _sidecar(path)
        if not path.is_file() or not meta_path.is_file():
            from ..errors import ResultFileError

            raise ResultFileError(f"Need both {path} and {meta_path} (written by Walk.save).")
        rf = ff.read_result(path, _FORMAT, "Walk")
        result = _parse(rf.check, rf.header, rf.tensors)
        side = ff.Checker(str(meta_path))
        header = side.kind(ff.read_json(meta_path, "Walk"), _FORMAT, "Walk")
        for key in sorted(set(header) | set(rf.header), key=lambda k: (k in (ff.TABLE, ff.HEADER_SUM), k)):
            if _dump(header.get(key)) != _dump(rf.header.get(key)):
                side.fail(f"field {key!r}", f"does not match {path}: the pair was not saved together")
        rf.verify_checksums()
        return result


def _check_path(
    c: ff.Checker, segments: list[int], ts: list[float], keys: list[int], settings: dict[str, Any]
) -> None:
    """The frames' path positions agree with the keyframes (see :func:`sdexplore.interpolate.keyframe_schedule`).

    Each keyframe's frame is that keyframe exactly: at the start of its own segment (t = 0), or, for a path's
    last keyframe, at the end of the segment before it (t = 1). Within a segment t never goes back, and only a
    loop has a segment from the last keyframe back to the first.
    """
    for i in range(1, len(ts)):
        if segments[i] == segments[i - 1] and ts[i] < ts[i - 1]:
            c.fail(f"ts[{i}]", f"is {ts[i]}, before the frame before it in the same segment ({ts[i - 1]})")
    n = len(keys)
    if keys[0] != 0:
        c.fail("keyframe_frames[0]", f"is {keys[0]}, but a walk starts at its first keyframe (frame 0)")
    for i, k in enumerate(keys):
        at = (segments[k], ts[k])
        if at != (i, 0.0) and not (i > 0 and at == (i - 1, 1.0)):
            c.fail(
                f"keyframe_frames[{i}]",
                f"is frame {k}, which lies at segments[{k}] = {at[0]}, ts[{k}] = {at[1]}, not on keyframe {i}",
            )
    if settings.get("loop") is False and segments[-1] > n - 2:
        c.fail(
            "settings.loop",
            f"is false, but segments[{len(segments) - 1}] = {segments[-1]} leaves the last keyframe (only a loop "
            "returns to the first)",
        )


def _sidecar(path: Path) -> Path:
    return Path(str(path) + ".json")


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _parse(c: ff.Checker, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Walk:
    """A Walk from its checked header and frames; fields must agree with each other and with the frames."""
    unknown = sorted(set(header) - _KEYS)
    if unknown:
        c.fail(f"field {unknown[0]!r}", "is not a field of a saved Walk")
    ff.require_tensors(c, tensors, {"images"})
    frames = c.int(c.get(header, "frames", "frames"), "frames", lo=1)
    images = tensors["images"]
    if images.dim() != 4 or images.shape[0] != frames:
        c.fail(
            "frames",
            f"is {frames}, but the file holds frames of shape {tuple(images.shape)}: it does not match",
        )
    ff.check_tensor(c, "images", images, (frames, None, None, 3), dtype=torch.uint8)  # (frames, H, W, 3)
    prompts = c.list(c.get(header, "prompts", "prompts"), "prompts")
    if len(prompts) < 2:
        c.fail("prompts", f"has {len(prompts)} keyframe(s); a walk has at least 2")
    for i, p in enumerate(prompts):
        if p is not None:
            c.str(p, f"prompts[{i}]")
    n = len(prompts)
    seeds = [
        c.int(s, f"seeds[{i}]")
        for i, s in enumerate(c.list(c.get(header, "seeds", "seeds"), "seeds", length=n))
    ]
    segments = [
        c.int(s, f"segments[{i}]", lo=0, hi=n - 1)
        for i, s in enumerate(c.list(c.get(header, "segments", "segments"), "segments", length=frames))
    ]
    for i in range(1, frames):
        if segments[i] < segments[i - 1]:
            c.fail(f"segments[{i}]", f"is {segments[i]}, before the frame before it ({segments[i - 1]})")
    ts = [
        c.number(t, f"ts[{i}]", lo=0.0, hi=1.0)
        for i, t in enumerate(c.list(c.get(header, "ts", "ts"), "ts", length=frames))
    ]
    keys = [
        c.int(k, f"keyframe_frames[{i}]", lo=0, hi=frames - 1)
        for i, k in enumerate(
            c.list(c.get(header, "keyframe_frames", "keyframe_frames"), "keyframe_frames", length=n)
        )
    ]
    for i in range(1, n):
        if keys[i] <= keys[i - 1]:
            c.fail(f"keyframe_frames[{i}]", f"is {keys[i]}, not after the keyframe before it ({keys[i - 1]})")
    settings = c.dict(c.get(header, "settings", "settings"), "settings")
    for key, check in _SETTINGS.items():
        if key in settings:
            check(c, settings[key], f"settings.{key}")
    summaries = c.get(header, "summaries", "summaries")
    if summaries is not None:
        c.list(summaries, "summaries", length=frames)
    _check_path(c, segments, ts, keys, settings)
    for i, key in ((1, "height"), (2, "width")):
        if key in settings and settings[key] != images.shape[i]:
            c.fail(
                f"settings.{key}",
                f"is {settings[key]}, but tensor 'images' holds frames of {images.shape[1]}×{images.shape[2]} pixels",
            )
    if "family" in settings:
        ff.family_of(c, settings["family"], "settings.family")
    return Walk(
        images=images.numpy(),
        prompts=prompts,
        seeds=seeds,
        segments=segments,
        ts=ts,
        keyframe_frames=keys,
        settings=settings,
        summaries=summaries,
    )
