"""EditExplorer: an attention edit side by side (source | edited | difference) and, for a word, its attention map
before the edit and after, on one colour scale."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...errors import InvalidArgumentError
from .. import payload as _payload
from ..render import HEAT_CMAP, HEAT_OPACITY, first_content_word, heat_overlay
from ._base import Explorer, new_figure
from ._web import web_view

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
    recomputed: every picture is read from the :class:`~sdexplore.Edit`. In a notebook the view is the front end's
    edit explorer (``sdexplore/views/web/edit.js``) as an anywidget over the edit's page payload: picking a word
    never waits on the kernel; :attr:`word` is synced both ways.

    Args:
        edit: what :func:`sdexplore.edit` returned (or :meth:`sdexplore.Edit.load` read).
        index: which image of each branch (with several prompts or images per prompt).
        words: the words offered (default: every distinct word of the edited prompt).
        size: displayed side of each panel in pixels.
        cmap: colour map of the heat maps (default: the one the CLI and plots use).
        static: force the static figure (True) or the widget (False); default: detect a widget frontend.
    """

    _web_name = "edit"  # its front end: sdexplore/views/web/edit.js

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
        self._word = first_content_word(changed + self.words)  # the edit's own word first: "green", not "a"
        self.opacity = HEAT_OPACITY
        self._cache: dict[Any, Any] = {}

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
    def payload(self) -> dict[str, Any]:
        """The page payload the view shows (:func:`sdexplore.views.payload.edit_payload`): the three pictures and
        each offered word's maps before and after, quantised."""
        return _payload.edit_payload(self.edit, index=self.index, words=self.words, cmap=self.cmap)

    @property
    def word(self) -> str:
        """The word shown: the view's (synced when the user picks one), else the one the explorer opened on."""
        view = getattr(self, "_view", None)
        if view is not None and view.word in self.words:
            return view.word
        return self._word

    @word.setter
    def word(self, word: str) -> None:
        self._word = word
        view = getattr(self, "_view", None)
        if view is not None:
            view.word = word

    def _build(self) -> Any:
        self._view = web_view("edit", self.payload(), word=self._word)
        return self._view

    def select(self, word: str | None = None, opacity: float | None = None) -> None:
        """Set the selection programmatically: ``word`` moves the view (a synced trait); ``opacity`` is that of
        :meth:`panels` and the static figure (the view has its own slider)."""
        if word is not None:
            if word not in self.words:
                raise InvalidArgumentError(f"{word!r} is not offered; choose one of {', '.join(self.words)}.")
            self.word = word
        if opacity is not None:
            self.opacity = float(opacity)

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
