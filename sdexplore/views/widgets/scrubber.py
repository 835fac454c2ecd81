"""TimestepScrubber: scrub (or play) through every recorded denoising step; fills in live while a run proceeds.

In a notebook it is the front end's scrubber (``sdexplore/views/web/scrubber.js``) as an anywidget: every step's
pictures travel to the browser once, in the page payload, so scrubbing never waits on the kernel.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from typing import Any

import numpy as np
import torch

from ...results.trace import StepRecord, Trace
from ...schedule_math import flow_sigma_from_sigma
from .. import payload as _payload
from ..render import channel_tiles, frame_row, spread, trace_preview
from ._base import SliderExplorer, new_figure
from ._web import web_view

PANELS: dict[str, str] = {
    "noisy": "noisy latents",
    "x0": "predicted x0",
    "noise": "noise prediction",
    "latents": "latent channels",
}


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
    schedulers, whose latents are x0 + σ·ε), the predicted clean image x0 (its preview, learned or linear), the
    VAE decode when it was recorded, the noise prediction and the latent channels, with the timestep, the noise
    level (σ, √ᾱ) and the guidance scale. In a notebook the view is the front end's scrubber (an anywidget): every
    step's pictures are encoded once and held by the browser, so moving the slider never waits on the kernel,
    and the view keeps working after the kernel stops. :attr:`value` (the synced ``step``) follows the slider
    when it is let go; setting it moves the view.

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
        rgb_factors: ``(factors (C, 3), bias (3,))`` for the latent → RGB preview (default: the preview the
            trace was recorded with, see :func:`sdexplore.views.render.trace_preview`).
        size: kept for compatibility; the view enlarges each panel by a whole factor to at least 192 pixels.
        live_fps: while filling in live, send the steps to the view at most this often (the last step of a run
            is always sent), so a fast GPU run is not slowed by updating the view every step. ``None``: every step.
        static: force the static figure (True) or the widget (False); default: detect a widget frontend.
    """

    _position = "step"
    _web_name = "scrubber"  # its front end: sdexplore/views/web/scrubber.js

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
        self._blocks: dict[int, dict[str, Any]] = {}  # step position → its encoded payload entries
        self._arrays: dict[int, dict[str, np.ndarray | None]] = {}  # step position → the figure's pictures
        self._sent = 0  # steps the view holds
        self._last_live = 0.0
        self.pushes = 0  # payloads sent to the view (live updates are throttled by live_fps)
        trace = _as_trace(source)
        if trace is not None:
            self._reset(trace)
            self._records = list(trace.steps)

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
        self._blocks = {}
        self._arrays = {}

    def _preview(self, rec: StepRecord, of: str) -> np.ndarray:
        return trace_preview(self._trace, rec, of, image=self.image, factors=self._rgb)  # (h, w, 3)

    def _step_trace(self, i: int) -> Trace:
        """The trace cut to step ``i`` alone (its meta forced to ``rgb_factors`` when given)."""
        meta = dict(self._trace.meta)
        if self._rgb is not None:
            meta.pop(
                "latent_preview", None
            )  # given factors mean the linear preview, as trace_preview(factors=)
            meta["latent_rgb"] = {
                "factors": torch.as_tensor(self._rgb[0]).float().tolist(),
                "bias": torch.as_tensor(self._rgb[1]).float().tolist(),
            }
        return dataclasses.replace(self._trace, steps=[self._records[i]], meta=meta)

    def _block(self, i: int) -> dict[str, Any]:
        """Step ``i``'s entries of the payload's steps block, encoded once."""
        if i not in self._blocks:
            block = _payload.steps_block(self._step_trace(i), index=self.image, channels=True)
            if block is None:
                raise ValueError(
                    "This trace holds nothing the scrubber can show: record latents, x0 or previews "
                    "(sdexplore.observe's default quantities)."
                )
            self._blocks[i] = block
        return self._blocks[i]

    def payload(self) -> dict[str, Any]:
        """The page payload of the recorded steps so far (:mod:`sdexplore.views.payload`'s ``steps`` block):
        what the view shows."""
        trace = self._trace
        n = len(self._records)
        blocks = [self._block(i) for i in range(n)]
        steps: dict[str, Any] = {"count": n, "total": int(trace.num_steps or n) if trace else n}
        if blocks:
            first = blocks[0]
            for key in ("index", "timestep", "sigma", "alpha_bar", "guidance", "x0_source"):
                steps[key] = [b[key][0] for b in blocks]
            steps["flow_sigma"] = (
                None if first["flow_sigma"] is None else [b["flow_sigma"][0] for b in blocks]
            )
            steps["size"] = first["size"]
            steps["panels"] = [
                {
                    "key": p["key"],
                    "title": p["title"],
                    "images": [
                        next(q for q in b["panels"] if q["key"] == p["key"])["images"][0] for b in blocks
                    ],
                }
                for p in first["panels"]
            ]
        meta = trace.meta if trace else {}
        prov = _payload.provenance(
            model=meta.get("model"),
            seed=meta.get("seed"),
            prompt=meta.get("prompt"),  # what the command line (or the caller) noted in the trace
            family=trace.family if trace else None,
            scheduler=trace.scheduler if trace else None,
            steps=int(trace.num_steps) if trace and trace.num_steps else None,
            guidance_scale=float(trace.guidance_scale)
            if trace and trace.guidance_scale is not None
            else None,
        )
        out = _payload._base("observation", prov, None)
        out["image"] = None
        if trace is not None and trace.frames is not None:
            out["frames"] = {"count": int(trace.frames)}
        if n:
            out["steps"] = steps
        return out

    # ---- live listener ----------------------------------------------------------------------------------
    def on_step(self, record: StepRecord, trace: Trace) -> None:
        """Step listener for ``StepRecorder(on_step=...)`` / ``observe(..., on_step=...)``: add one step live.

        A record from a new trace (a new pipeline call) starts over. The slider follows the newest step while
        it sits on the last one.
        """
        if trace is not self._trace:
            self._reset(trace)
            self._sent = 0
        self._records.append(record)
        if self._widget is None:
            return
        n = len(self._records)
        now = time.perf_counter()
        final = trace.stopped_at is not None or (trace.num_steps and record.index >= trace.num_steps - 1)
        if self.live_fps is None or final or n == 1 or now - self._last_live >= 1.0 / self.live_fps:
            self._last_live = now
            self._push()

    def _push(self) -> None:
        """Send the steps so far to the view; the slider follows the newest while it sits on the last sent."""
        n = len(self._records)
        at = self._view.step
        following = at is None or self._sent == 0 or at >= self._sent - 1
        with self._view.hold_sync():
            self._view.payload = self.payload()
            if following and n:
                self._view.step = n - 1
        self._sent = n
        self.pushes += 1

    # ---- widget -----------------------------------------------------------------------------------------
    def _build(self) -> Any:
        n = len(self._records)
        self._view = web_view("scrubber", self.payload(), step=max(n - 1, 0), frame=0)
        self._sent = n
        self.pushes = 1
        return self._view

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

    def image_bytes(self, panel: str = "x0") -> bytes:
        """The encoded picture (PNG or WebP) the view shows in ``panel`` at its current step: one of
        ``"noisy"``, ``"x0"``, ``"decoded"`` (when recorded), ``"noise"``, ``"latents"``."""
        self.widget  # noqa: B018 - build the widget first
        panels = {p["key"]: p for p in self._view.payload.get("steps", {}).get("panels", [])}
        if panel not in panels:
            raise KeyError(f"no {panel!r} panel; this view shows {', '.join(panels) or 'nothing yet'}")
        image = panels[panel]["images"][self.value]
        if isinstance(image, list):  # a video: one picture per frame
            image = image[self._view.frame or 0]
        return base64.b64decode(image["data"])

    # ---- static -----------------------------------------------------------------------------------------
    def _figure_arrays(self, i: int) -> dict[str, np.ndarray | None]:
        """Step ``i``'s pictures for the figure, per panel of :data:`PANELS` (None where not recorded)."""
        if i not in self._arrays:
            rec, b = self._records[i], self.image
            arrays: dict[str, np.ndarray | None] = dict.fromkeys(PANELS)
            if rec.latents is not None:
                arrays["noisy"] = self._preview(rec, "latents")  # a video's: its frames' strip
                arrays["latents"] = _tiles(rec.latents[b])
            if rec.decoded is not None:
                arrays["x0"] = _strip(rec.decoded[b])
            elif rec.x0 is not None:
                arrays["x0"] = self._preview(rec, "x0")
            elif rec.preview is not None:
                arrays["x0"] = _strip(rec.preview[b])
            if rec.noise_pred is not None:
                arrays["noise"] = _tiles(rec.noise_pred[b])
            self._arrays[i] = arrays
        return self._arrays[i]

    def figure(self, columns: int = 6) -> Any:
        """Static figure: rows = the four panels, columns = ``columns`` steps spread over the run. A video's
        trace: each panel is the step's frames side by side (a frame strip), one row per step and panel, the
        steps top to bottom."""
        picks = spread(len(self._records), columns)
        if picks and self._trace is not None and self._trace.frames is not None:
            return self._video_figure(picks)
        fig = new_figure(1.8 * max(len(picks), 1), 1.9 * len(PANELS))
        if not picks:
            ax = fig.add_subplot()
            ax.text(0.5, 0.5, "no steps recorded yet", ha="center", va="center")
            ax.axis("off")
            return fig
        axes = fig.subplots(len(PANELS), len(picks), squeeze=False)
        for c, i in enumerate(picks):
            arrays, rec = self._figure_arrays(i), self._records[i]
            for r, (key, title) in enumerate(PANELS.items()):
                ax = axes[r][c]
                a = arrays[key]
                if a is not None:
                    ax.imshow(a, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"step {rec.index + 1}\nt={rec.timestep:.0f}", fontsize=8)
                if c == 0:
                    ax.set_ylabel(title.replace(" (", "\n("), fontsize=8)
        return fig

    def _video_figure(self, picks: list[int]) -> Any:
        """The figure of a video's trace: for each picked step, a row per recorded panel, its frame strip."""
        F = int(self._trace.frames)
        rows = [(i, key, a) for i in picks for key, a in self._figure_arrays(i).items() if a is not None]
        width = min(1.6 * F + 1.0, 16.0)
        h, w = rows[0][2].shape[:2]
        fig = new_figure(width, len(rows) * ((width - 1.0) * h / w + 0.25))
        axes = fig.subplots(len(rows), 1, squeeze=False)
        for r, (i, key, a) in enumerate(rows):
            ax, rec = axes[r][0], self._records[i]
            ax.imshow(a, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(f"step {rec.index + 1}\n{PANELS[key]}", fontsize=7)
            if r == 0:
                ax.set_title(f"frames 1–{F} left to right (latent frames)", fontsize=8)
        return fig

    def __repr__(self) -> str:
        return f"TimestepScrubber({self.num_steps} steps)"


def _strip(pictures: torch.Tensor) -> np.ndarray:
    """One image's pictures: (h, w, 3) as they are, a video's (F, h, w, 3) side by side (h, F·w, 3)."""
    a = pictures.cpu().numpy()
    return frame_row(list(a)) if a.ndim == 4 else a


def _tiles(tensor: torch.Tensor) -> np.ndarray:
    """A latent-shaped (C, h, w) as channel tiles; a video's (C, F, h, w) one tile grid per frame, side by side,
    on one colour scale."""
    if tensor.ndim == 3:
        return channel_tiles(tensor)
    x = tensor.detach().float().cpu()  # (C, F, h, w)
    scale = float(x.abs().flatten().quantile(0.99)) or 1.0
    return frame_row([channel_tiles(x[:, f], scale=scale) for f in range(x.shape[1])], pad=3)
