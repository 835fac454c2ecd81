"""AttentionExplorer: a word's attention heat map (UNet cross-attention, MMDiT joint attention) over the image, by
step range and layer, and a step × word grid."""

from __future__ import annotations

import html
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from ...errors import InvalidArgumentError
from ...heatmaps import normalize, resize
from .. import payload as _payload
from ..render import (
    HEAT_CMAP,
    HEAT_OPACITY,
    as_uint8_image,
    clip_frames,
    first_content_word,
    frame_row,
    heat_overlay,
    spread,
    step_groups,
)
from ._base import Explorer, data_uri, jpeg_bytes, new_figure
from ._web import web_view

ALL_LAYERS = "all layers"
#: How the static figure names a relation other than image→text (the page says the same above its maps).
_DIRECTIONS = {
    "text->image": "text → image: where each word's queries look in the image",
    "image->image": "image → image: where each recorded query point looks in the image",
}


#: Words the explorer does not open on: articles, prepositions, conjunctions and the like, whose maps spread
#: thinly or copy their neighbours. A small deliberate list, not a linguistic one; any word can still be picked.
def _as_maps(source: Any) -> Any:
    """AttentionMaps from AttentionMaps or an Observation (``.attention``)."""
    if hasattr(source, "aggregate") and hasattr(source, "word"):
        return source
    maps = getattr(source, "attention", None)
    if maps is None:
        raise TypeError(
            "AttentionExplorer takes AttentionMaps or an Observation recorded with "
            "sdexplore.observe(pipe, attention=True)."
        )
    return maps


class _LRU(OrderedDict):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get_or(self, key: Any, make: Any) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        if len(self) > self.size:
            self.popitem(last=False)
        return value


class AttentionExplorer(Explorer):
    """Pick a word, a step range and a layer group; see its attention heat map over the image.

    Works on every family's maps: UNet cross-attention and SD3's / Flux's joint attention (on SD3 a word's
    map sums its CLIP and its T5 positions). Controls: one button per word of the prompt; a step-range slider
    (needs the recorder's per-step maps); a layer menu (all layers, a UNet block or Flux's double- and
    single-stream blocks, a resolution, or one layer); the heat map's opacity; and a
    *step × word* grid that shows how each word's map forms over the run. Each map is shown min-max
    normalised (its shape, not its strength). Maps and composited images are cached, so moving a control
    costs a few milliseconds and never runs the pipeline.

    Args:
        source: :class:`~sdexplore.results.attention_maps.AttentionMaps` or an ``Observation`` with attention.
        image: the generated image (PIL, array or tensor) to draw the maps over; ``None`` shows maps alone. For a
            video's maps (Wan: per latent frame) the clip's frames (N, H, W, 3), a pipeline's ``.frames[0]``: each
            latent frame's map is drawn over the last pixel frame it holds (:func:`~sdexplore.views.render.clip_frames`);
            one picture is shown under every frame.
        words: the words offered (default: every distinct word of the prompt); the explorer opens on the first
            that is not a stop word (:data:`sdexplore.views.render.STOP_WORDS`) or punctuation.
        batch_index: which image of the batch.
        size: displayed side of the main image in pixels.
        cmap: matplotlib colour map of the heat maps (default: the one the CLI and plots use).
        static: force the static figure (True) or the widget (False); default: detect a widget frontend.
        mask: an inpainting mask whose outline is drawn over every map (default: the Observation's ``mask``).
    """

    _web_name = "attention"  # its front end: sdexplore/views/web/attention.js

    def __init__(
        self,
        source: Any,
        image: Any = None,
        *,
        words: Sequence[str] | None = None,
        batch_index: int = 0,
        size: int = 320,
        cmap: str = HEAT_CMAP,
        static: bool | None = None,
        mask: Any = None,
    ) -> None:
        super().__init__(static=static)
        # the constructor's options, kept when a new result replaces this one (an upload control)
        self._options = dict(words=words, batch_index=batch_index, size=size, cmap=cmap, static=static)
        self.maps = _as_maps(source)
        #: An inpainting mask whose outline is drawn on every overlay (default: the Observation's own).
        self.mask = mask if mask is not None else getattr(source, "mask", None)
        self.batch_index = batch_index
        #: A video's latent frames F (every map is per frame), None for an image's maps.
        self.frames: int | None = getattr(self.maps, "frames", None)
        # a video: the picture under each latent frame, (H, W, 3) uint8 each
        self._clip = clip_frames(image, self.frames) if image is not None and self.frames else None
        self.image = self._clip[0] if self._clip else as_uint8_image(image) if image is not None else None
        self.size = size
        self.cmap = cmap
        #: What the maps hold (``maps.relation``): image→text and text→image maps are per word, image→image maps
        #: per recorded query point (offered as :attr:`words`, labelled as the page labels them).
        self.relation: str = getattr(self.maps, "relation", "image->text")
        self._queries: dict[str, int] = {}
        if self.relation == "image->image":
            labels = [q["label"] for q in _payload._queries(self.maps.query_masks)]
            self._queries = {label: i for i, label in enumerate(labels)}
        prompt_words = list(self._queries) or list(dict.fromkeys(self.maps.token_lists[batch_index].words))
        self.words = list(words) if words is not None else prompt_words
        # maps recorded without the prompt's text (prompt_embeds=...) have no words: offer key positions
        self._positions: dict[str, int] = {}
        if not self.words:
            T = int(self.maps.aggregate.shape[1])
            self._positions = {f"#{i}": i for i in range(1, min(T, 17))}
            self.words = list(self._positions)
        self.num_steps = int(self.maps.num_steps)
        self.has_steps = self.maps.steps is not None and self.num_steps > 0
        self.layer_groups = self._layer_groups()
        self._heat_cache = _LRU(512)
        self._png_cache = _LRU(256)
        self.last_update_ms = 0.0
        # state (mirrored by the widget)
        self._word = first_content_word(self.words)  # "circle"'s or "red"'s map, not "a"'s
        self.step_range: tuple[int, int] = (0, max(self.num_steps - 1, 0))
        self.layer = ALL_LAYERS
        self.opacity = HEAT_OPACITY

    # ---- data -------------------------------------------------------------------------------------------
    def _layer_groups(self) -> dict[str, list[str]]:
        """Menu label → layer names: all, per UNet block or MMDiT block kind, per resolution, then each layer."""
        names = self.maps.layer_names
        groups: dict[str, list[str]] = {ALL_LAYERS: []}
        kinds = [(b, b.replace("_", " ")) for b in ("down_blocks", "mid_block", "up_blocks")]
        # Flux: double-stream blocks (own text and image weights), then single-stream blocks (one sequence);
        # SD3 has joint blocks only, so no group beside "all layers"
        kinds += [
            ("transformer_blocks.", "double-stream blocks"),
            ("single_transformer_blocks.", "single-stream blocks"),
        ]
        for prefix, label in kinds:
            hit = [n for n in names if n.startswith(prefix)]
            if hit and len(hit) < len(names):
                groups[f"{label} ({len(hit)})"] = hit
        by_res: dict[tuple[int, int], list[str]] = {}
        for n in names:
            by_res.setdefault(tuple(self.maps.layers[n].shape[-2:]), []).append(n)
        if len(by_res) > 1:
            for (h, w), hit in sorted(by_res.items(), key=lambda kv: -kv[0][0]):
                groups[f"{h}×{w} maps ({len(hit)})"] = hit
        for n in names:
            groups[n.removesuffix(".processor")] = [n]
        return groups

    def _steps_selected(self, step_range: tuple[int, int]) -> range | None:
        lo, hi = step_range
        if not self.has_steps or (lo, hi) == (0, self.num_steps - 1):
            return None
        return range(lo, hi + 1)

    def heat(
        self, word: str, step_range: tuple[int, int] | None = None, layer: str = ALL_LAYERS
    ) -> torch.Tensor:
        """The min-max normalised map (h, w) of ``word`` for a step range (inclusive) and a layer-menu entry; a
        video's (F, h, w), each frame normalised on its own."""
        step_range = tuple(step_range) if step_range is not None else (0, max(self.num_steps - 1, 0))
        key = (word, step_range, layer)
        return self._heat_cache.get_or(key, lambda: self._compute_heat(word, step_range, layer))

    def _compute_heat(self, word: str, step_range: tuple[int, int], layer: str) -> torch.Tensor:
        m, b = self.maps, self.batch_index
        steps = self._steps_selected(step_range)
        names = self.layer_groups.get(layer, [])
        if word in self._queries:  # image→image: a recorded query point's map

            def one(**kw: Any) -> torch.Tensor:
                return m.query(self._queries[word], index=b, **kw)
        elif word in self._positions:  # unlabelled maps: a key position

            def one(**kw: Any) -> torch.Tensor:
                return m.token(self._positions[word], index=b, **kw)
        else:

            def one(**kw: Any) -> torch.Tensor:
                return m.word(word, index=b, **kw)

        if not names:  # all layers
            out = one(step=steps)
        else:
            if steps is not None and m.probs is None:
                steps = (
                    None  # per step *and* layer needs keep_probs=True: fall back to all steps (noted in UI)
                )
            per = [one(step=steps, layer=n) for n in names]
            out = per[0] if len(per) == 1 else torch.stack([resize(p, m.latent_size) for p in per]).mean(0)
        return normalize(out.float(), "minmax")

    def _needs_probs_note(self) -> str:
        steps = self._steps_selected(self.step_range)
        if self.layer != ALL_LAYERS and steps is not None and self.maps.probs is None:
            return (
                "<small>step range ignored for a single layer group: per-step maps per layer need "
                "<code>attention=dict(keep_probs=True)</code></small>"
            )
        if not self.has_steps:
            return "<small>per-step maps were not recorded: the step range is fixed to the whole run</small>"
        return ""

    def overlay_png(
        self,
        word: str,
        step_range: tuple[int, int] | None = None,
        layer: str = ALL_LAYERS,
        opacity: float = HEAT_OPACITY,
        size: int | None = None,
        frame: int | None = None,
    ) -> bytes:
        """JPEG bytes of the heat map of ``word`` over the image (cached); a video's at latent frame ``frame``
        (default: the one the view shows, else the first) over its own picture."""
        size = size or self.size
        step_range = tuple(step_range) if step_range is not None else (0, max(self.num_steps - 1, 0))
        frame = self._frame(frame)
        key = (word, step_range, layer, round(float(opacity), 3), size, frame)
        return self._png_cache.get_or(
            key, lambda: jpeg_bytes(self._overlay(word, step_range, layer, opacity, size, frame))
        )

    def _frame(self, frame: int | None) -> int | None:
        """The latent frame shown: ``frame``, else the view's, else 0 (None for an image's maps)."""
        if self.frames is None:
            return None
        if frame is None:
            frame = getattr(getattr(self, "_view", None), "frame", None) or 0
        if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < self.frames:
            raise InvalidArgumentError(
                f"frame={frame!r} is not a frame of these maps: pass an int in 0..{self.frames - 1}."
            )
        return frame

    def _overlay(
        self,
        word: str,
        step_range: tuple[int, int],
        layer: str,
        opacity: float,
        size: int | None,
        frame: int | None,
    ) -> Any:
        """``word``'s map over the picture, (H, W, 3) uint8: an image's, or a video's latent frame ``frame``."""
        heat = self.heat(word, step_range, layer)  # (h, w); a video's (F, h, w)
        picture = self.image
        if frame is not None:
            heat = heat[frame]  # (h, w)
            picture = self._clip[frame] if self._clip else None
        return heat_overlay(picture, heat, opacity=opacity, cmap=self.cmap, size=size, mask=self.mask)

    def step_bins(self, n_bins: int = 5) -> list[tuple[int, int]]:
        """Split the selected step range into up to ``n_bins`` consecutive (inclusive) ranges."""
        lo, hi = self.step_range
        if not self.has_steps:
            return [(0, max(self.num_steps - 1, 0))]
        return [(g[0], g[-1]) for g in step_groups(hi - lo + 1, n_bins, start=lo)]

    def _step_label(self, r: tuple[int, int]) -> str:
        ts = self.maps.timesteps
        if not len(ts):
            return "all steps"
        a, b = r
        return f"steps {a + 1}–{b + 1}<br><small>t {float(ts[a]):.0f}→{float(ts[b]):.0f}</small>"

    # ---- widget -----------------------------------------------------------------------------------------
    def payload(self) -> dict[str, Any]:
        """The page payload the view shows (:mod:`sdexplore.views.payload`): every word's maps, aggregated,
        per step and per layer, quantised, and the image under them."""
        m, b = self.maps, self.batch_index
        att = _payload.attention_block(m, index=b)
        if self._queries:  # image→image: the view offers the payload's queries, labelled as self.words
            att["default_word"] = self._word
        elif self._positions:  # unlabelled maps: the view labels key positions itself
            att["words"] = []
        else:
            offered = set(self.words)
            att["words"] = [w for w in att["words"] if w["word"] in offered]
            att["default_word"] = self._word
        frames = self.frames
        if self._clip:  # a video: each latent frame's own picture
            picture = [_payload.encode_image(p) for p in self._clip]
        else:
            picture = _payload._pictures(self.image, frames) if self.image is not None else None
        prov = _payload.provenance(family=m.family, prompt=m.token_lists[b].prompt)
        out = _payload._base("observation", prov, self.cmap)
        out["image"] = picture
        if frames is not None:
            out["frames"] = {"count": int(frames)}
        out["attention"] = att
        return out

    def _view_label(self, word: str) -> str:
        """The view's label of ``word``: the word itself, or for a key position ``#i`` the view's ``#i token``."""
        if word in self._positions:
            i = self._positions[word]
            return f"#{i} {self.maps.token_lists[self.batch_index].tokens[i]}"
        return word

    @property
    def word(self) -> str:
        """The word shown: the view's (synced when the user picks one), else the one the explorer opened on."""
        view = getattr(self, "_view", None)
        if view is not None and view.word is not None:
            for w in self.words:
                if self._view_label(w) == view.word:
                    return w
        return self._word

    @word.setter
    def word(self, word: str) -> None:
        self._word = word
        view = getattr(self, "_view", None)
        if view is not None:
            view.word = self._view_label(word)

    def _build(self) -> Any:
        self._view = web_view("attention", self.payload(), word=self._view_label(self._word), frame=0)
        return self._view

    def grid_html(self, cell: int = 112) -> str:
        """The step × word grid as an HTML table of images (rows: step bins, columns: words)."""
        head = "".join(f"<th>{html.escape(wd)}</th>" for wd in self.words)
        rows = []
        for r in self.step_bins():
            cells = "".join(
                f'<td><img src="{data_uri(self.overlay_png(wd, r, self.layer, self.opacity, size=cell), "jpeg")}" '
                f'width="{cell}" height="{cell}"/></td>'
                for wd in self.words
            )
            rows.append(f'<tr><th style="text-align:right">{self._step_label(r)}</th>{cells}</tr>')
        return f'<table class="sdx-grid"><tr><th></th>{head}</tr>{"".join(rows)}</table>'

    @property
    def displayed_png(self) -> bytes:
        """The overlay (JPEG) of the current selection (the view's word, :attr:`step_range`, :attr:`layer`,
        :attr:`opacity`) as the Python views draw it; the view paints the same map in the browser."""
        self.widget  # noqa: B018 - build the widget first
        return self.overlay_png(self.word, self.step_range, self.layer, self.opacity)

    def select(
        self,
        word: str | None = None,
        step_range: tuple[int, int] | None = None,
        layer: str | None = None,
        opacity: float | None = None,
    ) -> None:
        """Set the selection programmatically: ``word`` moves the view (a synced trait); the step range, layer
        and opacity are those of :attr:`displayed_png`, :meth:`overlay_png` and the static figure (the view has
        its own controls for them)."""
        if word is not None:
            if word not in self.words:
                raise InvalidArgumentError(f"{word!r} is not offered; choose one of {', '.join(self.words)}.")
            self.word = word
        if step_range is not None:
            self.step_range = (int(step_range[0]), int(step_range[1]))
        if layer is not None:
            if layer not in self.layer_groups:
                raise InvalidArgumentError(
                    f"{layer!r} is not a layer entry; choose one of {list(self.layer_groups)}."
                )
            self.layer = layer
        if opacity is not None:
            self.opacity = float(opacity)

    # ---- static -----------------------------------------------------------------------------------------
    def figure(self, n_bins: int = 4, max_words: int = 8, max_frames: int = 6) -> Any:
        """Static figure: a step × word grid of heat maps over the image (plus the whole-run row). A video's
        maps: each cell is the word's map per latent frame, each over its own frame, side by side (up to
        ``max_frames`` frames spread over the clip)."""
        words = self.words[:max_words]
        bins = self.step_bins(n_bins) if self.has_steps else []
        rows = [*bins, (0, max(self.num_steps - 1, 0))]
        if self.frames is not None:
            return self._video_figure(words, rows, spread(self.frames, max_frames))
        fig = new_figure(1.7 * len(words) + 0.6, 1.7 * len(rows))
        axes = fig.subplots(len(rows), len(words), squeeze=False)
        for r, rng in enumerate(rows):
            for c, wd in enumerate(words):
                ax = axes[r][c]
                ax.imshow(
                    heat_overlay(
                        self.image,
                        self.heat(wd, rng, self.layer),
                        opacity=self.opacity,
                        cmap=self.cmap,
                        size=128,
                        mask=self.mask,
                    )
                )
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(wd, fontsize=9)
                if c == 0:
                    label = "all steps" if r == len(rows) - 1 else f"steps {rng[0] + 1}–{rng[1] + 1}"
                    ax.set_ylabel(label, fontsize=8)
        if self.relation != "image->text":
            fig.suptitle(_DIRECTIONS.get(self.relation, self.relation), fontsize=8)
        return fig

    def _video_figure(self, words: list[str], rows: list[tuple[int, int]], frames: list[int]) -> Any:
        """The step × word grid of a video's maps: each cell the word's map at ``frames``, left to right."""
        cell = 1.1 * len(frames)
        fig = new_figure(cell * len(words) + 0.6, 1.3 * len(rows) + 0.4)
        axes = fig.subplots(len(rows), len(words), squeeze=False)
        for r, rng in enumerate(rows):
            for c, wd in enumerate(words):
                ax = axes[r][c]
                strip = [self._overlay(wd, rng, self.layer, self.opacity, 96, f) for f in frames]
                ax.imshow(frame_row(strip, pad=2))  # (H, n·W + gaps, 3)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(wd, fontsize=9)
                if c == 0:
                    label = "all steps" if r == len(rows) - 1 else f"steps {rng[0] + 1}–{rng[1] + 1}"
                    ax.set_ylabel(label, fontsize=8)
        shown = ", ".join(str(f + 1) for f in frames)
        fig.suptitle(f"latent frames {shown} of {self.frames}, left to right", fontsize=8)
        return fig

    def __repr__(self) -> str:
        return f"AttentionExplorer(words={self.words}, steps={self.num_steps}, layers={len(self.maps.layer_names)})"
