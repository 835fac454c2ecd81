"""EditExplorer: an attention edit side by side (source | edited | difference) and, for a word, its attention map
before the edit and after, on one colour scale."""

from __future__ import annotations

import html
import time
from typing import Any

import numpy as np
import torch

from ...errors import InvalidArgumentError
from ..render import HEAT_CMAP, HEAT_OPACITY, first_content_word, heat_overlay
from ._base import Explorer, jpeg_bytes, new_figure, png_bytes, style_widget

#: Colour map of the map difference (after − before): blue where the word lost attention, red where it gained.
DIFF_CMAP = "RdBu_r"


class EditExplorer(Explorer):
    """What an attention edit changed: the source and edited images and their difference, and a word's map before
    and after the edit.

    The word menu offers the edited prompt's words and opens on the first word the edit changed (a swapped or
    reweighted word; else the first content word, as :class:`AttentionExplorer` does). For the chosen word it shows
    the source's map at that word's place (:meth:`sdexplore.Edit.word_maps`: the swapped-out word in a swap) over
    the source image, the edited image's map over the edited image, both on one colour scale from 0 (raw attention
    mass, so an ablated word's map after is the bottom of the scale everywhere), and after − before. Nothing is
    recomputed: every picture is read from the :class:`~sdexplore.Edit`.

    Args:
        edit: what :func:`sdexplore.edit` returned (or :meth:`sdexplore.Edit.load` read).
        index: which image of each branch (with several prompts or images per prompt).
        words: the words offered (default: every distinct word of the edited prompt).
        size: displayed side of each panel in pixels.
        cmap: colour map of the heat maps (default: the one the CLI and plots use).
        static: force the static figure (True) or the widget (False); default: detect a widget frontend.
    """

    def __init__(
        self,
        edit: Any,
        *,
        index: int = 0,
        words: list[str] | None = None,
        size: int = 256,
        cmap: str = HEAT_CMAP,
        static: bool | None = None,
    ) -> None:
        super().__init__(static=static)
        self._options = dict(index=index, words=words, size=size, cmap=cmap, static=static)
        if not (hasattr(edit, "images") and hasattr(edit, "word_maps")):
            raise TypeError("EditExplorer takes what sdexplore.edit returns (an sdexplore.Edit).")
        self.edit = edit
        self.index = index
        self.source, self.edited = edit.images(index)  # each (H, W, 3) uint8; checks the index
        self.difference = edit.difference(index)  # (H, W, 3) uint8
        self.size = size
        self.cmap = cmap
        self.has_maps = edit.source_maps is not None and edit.edited_maps is not None
        self.changed = edit.changed_words(index)
        if self.has_maps:
            prompt_words = list(dict.fromkeys(edit.edited_maps.token_lists[index].words))
        else:
            prompt_words = list(dict.fromkeys(edit.prompts(index)[1].split()))
        self.words = list(words) if words is not None else prompt_words
        if not self.words:
            raise InvalidArgumentError("EditExplorer needs at least one word to offer: pass words=[...].")
        changed = [w for w in self.changed if w in self.words]
        self.word = first_content_word(changed + self.words)  # the edit's own word first: "green", not "a"
        self.opacity = HEAT_OPACITY
        self._cache: dict[Any, Any] = {}
        self.last_update_ms = 0.0

    # ---- data -------------------------------------------------------------------------------------------
    def maps(self, word: str) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(before, after) raw maps (h, w) of ``word`` (:meth:`sdexplore.Edit.word_maps`), cached."""
        key = ("maps", word)
        if key not in self._cache:
            self._cache[key] = self.edit.word_maps(word, index=self.index)
        return self._cache[key]

    def panels(self, word: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(before, after, after − before) of ``word`` as (H, W, 3) uint8 pictures at the panel size: the two maps
        over their images on one scale [0, the larger peak], the difference on the same scale, ± that peak."""
        key = ("panels", word, round(self.opacity, 3))
        if key in self._cache:
            return self._cache[key]
        before, after = self.maps(word)
        zero = torch.zeros_like(after)
        b = zero if before is None else before.float()
        top = max(float(after.max()), float(b.max())) or 1.0
        side = self.size
        left = heat_overlay(self.source, b, opacity=self.opacity if before is not None else 0.0, cmap=self.cmap,
                            size=side, vmin=0.0, vmax=top)  # fmt: skip
        right = heat_overlay(
            self.edited, after, opacity=self.opacity, cmap=self.cmap, size=side, vmin=0.0, vmax=top
        )
        change = (after.float() - b).numpy()  # (h, w)
        # on the maps' own scale (±top): a change of a few percent of the peak looks faint, as it is
        delta = heat_overlay(None, change, cmap=DIFF_CMAP, size=left.shape[0], vmin=-top, vmax=top)
        self._cache[key] = out = (left, right, delta)
        return out

    def caption(self, word: str) -> str:
        """One line: the word's mean attention mass before and after (what the colour scale cannot say)."""
        before, after = self.maps(word)
        was = "— (not in the source)" if before is None else f"{float(before.mean()):.4f}"
        edited = " (edited)" if word in self.changed else ""
        return f"“{word}”{edited}: mean attention mass before {was}, after {float(after.mean()):.4f}"

    # ---- widget -----------------------------------------------------------------------------------------
    def _build(self) -> Any:
        import ipywidgets as w

        src, out = self.edit.prompts(self.index)

        def panel(image: np.ndarray, title: str, cls: str) -> tuple[Any, Any]:
            img = w.Image(value=png_bytes(image), format="png", layout=w.Layout(width=f"{self.size}px"))
            img.add_class(cls)
            img.add_class("sdx-pixelated")
            return img, w.VBox([w.HTML(f"<b>{html.escape(title)}</b>"), img])

        _, a = panel(self.source, "source", "sdx-edit-source")
        _, b = panel(self.edited, "edited", "sdx-edit-edited")
        _, c = panel(self.difference, "|edited − source|", "sdx-edit-difference")
        self._word = w.Dropdown(options=self.words, value=self.word, description="word",
                                disabled=not self.has_maps)  # fmt: skip
        self._word.add_class("sdx-edit-word")
        self._opacity = w.FloatSlider(value=self.opacity, min=0.0, max=1.0, step=0.05, description="opacity")
        self._before = w.Image(value=b"", format="jpeg", layout=w.Layout(width=f"{self.size}px"))
        self._after = w.Image(value=b"", format="jpeg", layout=w.Layout(width=f"{self.size}px"))
        self._delta = w.Image(value=b"", format="jpeg", layout=w.Layout(width=f"{self.size}px"))
        self._before.add_class("sdx-edit-before")
        self._after.add_class("sdx-edit-after")
        self._caption = w.HTML()
        self._caption.add_class("sdx-edit-caption")
        for ctl in (self._word, self._opacity):
            ctl.observe(self._on_change, names="value")
        maps = w.HBox(
            [
                w.VBox([w.HTML("<b>map before</b> (source)"), self._before]),
                w.VBox([w.HTML("<b>map after</b> (edited)"), self._after]),
                w.VBox([w.HTML("<b>after − before</b> (red: gained)"), self._delta]),
            ]
        )
        rows = [
            style_widget(),
            w.HTML(f"<code>{html.escape(src)}</code> → <code>{html.escape(out)}</code>"),
            w.HBox([a, b, c]),
        ]
        if self.has_maps:
            rows += [w.HBox([self._word, self._opacity]), self._caption, maps]
        else:
            rows.append(w.HTML("<small>this edit kept no attention maps (attention=False)</small>"))
        box = w.VBox(rows)
        box.add_class("sdx-edit-explorer")
        if self.has_maps:
            self._render()
        return box

    def _on_change(self, _change: Any = None) -> None:
        self.word = self._word.value
        self.opacity = float(self._opacity.value)
        self._render()

    def _render(self) -> None:
        t0 = time.perf_counter()
        before, after, delta = self.panels(self.word)
        self._before.value = jpeg_bytes(before)
        self._after.value = jpeg_bytes(after)
        self._delta.value = jpeg_bytes(delta)
        self._caption.value = html.escape(self.caption(self.word))
        self.last_update_ms = (time.perf_counter() - t0) * 1000

    def select(self, word: str | None = None, opacity: float | None = None) -> None:
        """Set controls programmatically (as if the user moved them)."""
        self.widget  # noqa: B018 - build the widget first
        if word is not None:
            self._word.value = word
        if opacity is not None:
            self._opacity.value = opacity

    # ---- static -----------------------------------------------------------------------------------------
    def figure(self, max_words: int = 3) -> Any:
        """Static figure: source | edited | difference, then before | after | after − before for the edit's words
        (the changed words, else the current word), up to ``max_words`` rows."""
        words = [w for w in self.changed if w in self.words] or [self.word]
        words = words[:max_words] if self.has_maps else []
        fig = new_figure(7.2, 2.5 * (1 + len(words)))
        axes = fig.subplots(1 + len(words), 3, squeeze=False)
        src, out = self.edit.prompts(self.index)
        for ax, im, title in zip(
            axes[0], (self.source, self.edited, self.difference), ("source", "edited", "|edited − source|"),
            strict=True,
        ):  # fmt: skip
            ax.imshow(im, interpolation="nearest")
            ax.set_title(title, fontsize=9)
        for r, word in enumerate(words, start=1):
            for ax, im, title in zip(
                axes[r],
                self.panels(word),
                (f"“{word}” before", f"“{word}” after", "after − before"),
                strict=True,
            ):
                ax.imshow(im)
                ax.set_title(title, fontsize=9)
        for ax in axes.flat:
            ax.set_xticks([])
            ax.set_yticks([])
        fig.suptitle(f"{src!r} → {out!r}", fontsize=9)
        return fig

    def __repr__(self) -> str:
        return f"EditExplorer(words={self.words}, word={self.word!r}, changed={self.changed})"
