"""TimestepScrubber: scrub (or play) through every recorded denoising step; fills in live while a run proceeds."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...results.trace import StepRecord, Trace
from ...schedule_math import flow_sigma_from_sigma
from ..render import channel_tiles, spread, trace_preview
from ._base import (
    WIDGET_MIN_SIDE,
    SliderExplorer,
    new_figure,
    png_bytes,
    style_widget,
    svg_curves,
)

PANELS: dict[str, str] = {
    "noisy": "noisy latents",
    "x0": "predicted x0",
    "noise": "noise prediction",
    "latents": "latent channels",
}


@dataclass
class _Frame:
    """One step, ready to show: uint8 arrays per panel and their PNG bytes."""

    record: StepRecord
    arrays: dict[str, np.ndarray | None]  # panel → (h, w, 3) uint8 or None when not recorded
    pngs: dict[str, bytes]  # panel → PNG bytes (a blank placeholder when not recorded)


def _as_trace(source: Any) -> Trace | None:
    """A Trace from a Trace, an Observation (``.runs``) or a StepRecorder (``.traces``); None when empty."""
    if source is None:
        return None
    if isinstance(source, Trace):
        return source
    runs = getattr(source, "runs", None)
    if runs is None:
        runs = getattr(source, "traces", None)
    if isinstance(runs, list):
        return runs[-1] if runs else None
    raise TypeError(
        f"TimestepScrubber takes a Trace, an Observation (sdexplore.observe) or a StepRecorder, not "
        f"{type(source).__name__}."
    )


class TimestepScrubber(SliderExplorer):
    """A slider over the recorded steps of one run, with play/pause.

    Shows, side by side, the noisy latents as a colour preview (scaled by √ᾱ first for Euler-type
    schedulers, whose latents are x0 + σ·ε), the predicted clean image x0 (the VAE decode when recorded,
    else its recorded preview, learned or linear), the noise prediction and the latent channels, with the
    timestep, the noise level (σ, √ᾱ) and the guidance scale. Every image is encoded once when its step
    arrives, so moving the slider only swaps bytes: it never runs the pipeline.

    Live use: create it empty, show it, and pass :meth:`on_step` as the recorder's listener; each step
    appears as it is computed and the slider follows the newest step (unless you moved it back)::

        scrubber = TimestepScrubber()
        scrubber.show()
        with sdexplore.observe(pipe, on_step=scrubber.on_step):
            pipe(prompt)

    Args:
        source: a :class:`~sdexplore.results.trace.Trace`, an ``Observation`` (its latest run) or a ``StepRecorder``;
            ``None`` for an empty scrubber filled by :meth:`on_step`.
        image: which image of the batch to show.
        rgb_factors: ``(factors (C, 3), bias (3,))`` for the latent → RGB preview (default: the factors the
            trace was recorded with, ``meta["latent_rgb"]``, see :func:`sdexplore.views.render.trace_preview`).
        size: displayed side of each panel in pixels.
        live_fps: while filling in live, redraw at most this often (the newest step; the last step of a run
            is always drawn), so a fast GPU run is not slowed by encoding every step. ``None``: every step.
        static: force the static figure (True) or the widget (False); default: detect a widget frontend.
    """

    def __init__(
        self,
        source: Any = None,
        *,
        image: int = 0,
        rgb_factors: tuple[torch.Tensor, torch.Tensor] | None = None,
        size: int = 192,
        live_fps: float | None = 12.0,
        static: bool | None = None,
    ) -> None:
        super().__init__(static=static)
        # kept for replace() / with_upload(): a new result is shown with the same options
        self._options = dict(
            image=image, rgb_factors=rgb_factors, size=size, live_fps=live_fps, static=static
        )
        self.image = image
        self.size = size
        self._rgb = rgb_factors
        self._trace: Trace | None = None
        self.live_fps = live_fps
        self._records: list[StepRecord] = []
        self._cache: dict[int, _Frame] = {}  # step position → prepared images (filled eagerly or on demand)
        self._following = True  # the slider tracks the newest step while the user leaves it there
        self._last_live = 0.0
        self._blank = png_bytes(np.full((8, 8, 3), 235, np.uint8), min_side=8)
        self.last_update_ms = 0.0  # kernel-side time of the latest slider update (see benchmarks)
        trace = _as_trace(source)
        if trace is not None:
            self._reset(trace)
            from tqdm.auto import tqdm

            for i, rec in enumerate(
                tqdm(trace.steps, desc="preparing steps", leave=False, disable=len(trace) < 40)
            ):
                self._records.append(rec)
                self._cache[i] = self._prepare(rec)

    # ---- data -------------------------------------------------------------------------------------------
    @property
    def trace(self) -> Trace | None:
        """The trace being shown (live while a run proceeds)."""
        return self._trace

    @property
    def num_steps(self) -> int:
        """Steps available to scrub."""
        return len(self._records)

    def _reset(self, trace: Trace) -> None:
        self._trace = trace
        self._records = []
        self._cache = {}
        self._following = True

    def _preview(self, rec: StepRecord, of: str) -> np.ndarray:
        return trace_preview(self._trace, rec, of, image=self.image, factors=self._rgb)  # (h, w, 3)

    def _prepare(self, rec: StepRecord) -> _Frame:
        b = self.image
        arrays: dict[str, np.ndarray | None] = dict.fromkeys(PANELS)
        if rec.latents is not None:
            arrays["noisy"] = self._preview(rec, "latents")
            arrays["latents"] = channel_tiles(rec.latents[b])
        if rec.decoded is not None:
            arrays["x0"] = rec.decoded[b].numpy()
        elif rec.x0 is not None:
            arrays["x0"] = self._preview(rec, "x0")
        elif rec.preview is not None:
            arrays["x0"] = rec.preview[b].numpy()
        if rec.noise_pred is not None:
            arrays["noise"] = channel_tiles(rec.noise_pred[b])
        pngs = {
            k: (png_bytes(a, min_side=WIDGET_MIN_SIDE) if a is not None else self._blank)
            for k, a in arrays.items()
        }
        return _Frame(rec, arrays, pngs)

    def _frame(self, i: int) -> _Frame:
        if i not in self._cache:
            self._cache[i] = self._prepare(self._records[i])
        return self._cache[i]

    # ---- live listener ----------------------------------------------------------------------------------
    def on_step(self, record: StepRecord, trace: Trace) -> None:
        """Step listener for ``StepRecorder(on_step=...)`` / ``observe(..., on_step=...)``: add one step live.

        A record from a new trace (a new pipeline call) starts over. The slider follows the newest step while
        it sits on the last one.
        """
        if trace is not self._trace:
            self._reset(trace)
        self._records.append(record)
        if self._widget is None:
            return
        n = len(self._records)
        with self._slider.hold_trait_notifications():
            self._slider.max = n - 1
            self._play.max = n - 1
            self._slider.disabled = self._play.disabled = False
        if not self._following:
            self._info.value = self._info_html(self._slider.value)
            return
        now = time.perf_counter()
        final = trace.stopped_at is not None or (trace.num_steps and record.index >= trace.num_steps - 1)
        if self.live_fps is None or final or n == 1 or now - self._last_live >= 1.0 / self.live_fps:
            self._last_live = now
            if self._slider.value == n - 1:
                self._show(n - 1)
            else:
                self._slider.value = n - 1  # triggers _show

    # ---- widget -----------------------------------------------------------------------------------------
    def _build(self) -> Any:
        import ipywidgets as w

        n = len(self._records)
        px = f"{self.size}px"
        self._images: dict[str, Any] = {}
        columns = []
        for key, title in PANELS.items():
            img = w.Image(value=self._blank, format="png", layout=w.Layout(width=px, height=px))
            img.add_class(f"sdx-panel-{key}")
            img.add_class("sdx-pixelated")
            self._images[key] = img
            columns.append(
                w.VBox(
                    [w.HTML(f"<b>{html.escape(title)}</b>"), img],
                    layout=w.Layout(width=f"{self.size + 8}px", margin="0 8px 0 0"),
                )
            )
        self._slider = w.IntSlider(
            value=max(n - 1, 0) if n else 0,
            min=0,
            max=max(n - 1, 0),
            description="step",
            readout=False,  # the caption says "step i / N", 1-based
            continuous_update=True,
            disabled=n == 0,
            layout=w.Layout(width="420px"),
        )
        self._slider.add_class("sdx-step-slider")
        self._play = w.Play(value=self._slider.value, min=0, max=max(n - 1, 0), interval=150, disabled=n == 0)
        w.jslink((self._play, "value"), (self._slider, "value"))
        self._info = w.HTML()
        self._curve = w.HTML()
        self._slider.observe(self._on_slider, names="value")
        box = w.VBox(
            [
                style_widget(),
                w.HBox([self._play, self._slider]),
                self._info,
                w.HBox(columns),
                self._curve,
            ]
        )
        box.add_class("sdx-timestep-scrubber")
        if n:
            self._show(self._slider.value)
        else:
            self._info.value = "<i>waiting for the first step…</i>"
        return box

    def _info_html(self, i: int) -> str:
        r = self._records[i]
        total = (
            self._trace.num_steps if self._trace is not None and self._trace.num_steps else len(self._records)
        )
        noise = float(np.sqrt(max(0.0, 1.0 - r.alpha_bar)))
        src = {"scheduler": "from the scheduler", "computed": "computed from the model output"}.get(
            r.x0_source, ""
        )
        flow = self._trace is not None and self._trace.prediction_type == "flow_prediction"
        if flow:  # x_t = (1 − s) x0 + s ε: the scheduler's own s (σ_VE = s / (1 − s))
            s_flow = flow_sigma_from_sigma(r.sigma)
            level = f"flow σ = {s_flow:.3f} (x_t = (1 − σ) x0 + σ ε)"
        else:
            level = f"signal √ᾱ = {np.sqrt(r.alpha_bar):.3f} · noise √(1−ᾱ) = {noise:.3f} · σ = {r.sigma:.3g}"
        return (
            f"<b>step {r.index + 1} / {total}</b> · timestep t = {r.timestep:.0f} · {level} · "
            f"guidance {r.guidance_scale:g}" + (f" · <small>x0 {src}</small>" if src else "")
        )

    def _on_slider(self, change: Any) -> None:
        self._following = change["new"] == len(self._records) - 1
        self._show(change["new"])

    def _show(self, i: int) -> None:
        t0 = time.perf_counter()
        if not 0 <= i < len(self._records):
            return
        frame = self._frame(i)
        for key, img in self._images.items():
            img.value = frame.pngs[key]
        self._info.value = self._info_html(i)
        ab = [r.alpha_bar for r in self._records]
        self._curve.value = svg_curves(
            [
                ("signal √ᾱ", np.sqrt(ab).tolist(), "#1f77b4"),
                ("noise √(1−ᾱ)", np.sqrt(1 - np.asarray(ab)).tolist(), "#d62728"),
            ],
            marker=i,
            xlabel="recorded step",
            width=4 * self.size,
        )
        self.last_update_ms = (time.perf_counter() - t0) * 1000

    def image_bytes(self, panel: str = "x0") -> bytes:
        """PNG bytes currently displayed in ``panel`` (one of ``"noisy"``, ``"x0"``, ``"noise"``, ``"latents"``)."""
        self.widget  # noqa: B018 - build the widget first
        return bytes(self._images[panel].value)

    # ---- static -----------------------------------------------------------------------------------------
    def figure(self, columns: int = 6) -> Any:
        """Static figure: rows = the four panels, columns = ``columns`` steps spread over the run."""
        picks = spread(len(self._records), columns)
        fig = new_figure(1.8 * max(len(picks), 1), 1.9 * len(PANELS))
        if not picks:
            ax = fig.add_subplot()
            ax.text(0.5, 0.5, "no steps recorded yet", ha="center", va="center")
            ax.axis("off")
            return fig
        axes = fig.subplots(len(PANELS), len(picks), squeeze=False)
        for c, i in enumerate(picks):
            f = self._frame(i)
            for r, (key, title) in enumerate(PANELS.items()):
                ax = axes[r][c]
                a = f.arrays[key]
                if a is not None:
                    ax.imshow(a, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"step {f.record.index + 1}\nt={f.record.timestep:.0f}", fontsize=8)
                if c == 0:
                    ax.set_ylabel(title.replace(" (", "\n("), fontsize=8)
        return fig

    def __repr__(self) -> str:
        return f"TimestepScrubber({self.num_steps} steps)"
