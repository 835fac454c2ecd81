"""TimestepScrubber: scrub (or play) through every recorded denoising step; fills in live while a run proceeds.

In a notebook it is the front end's scrubber (``sdexplore/views/web/scrubber.js``) as an anywidget: every step's
pictures travel to the browser once, in the page payload, so scrubbing never waits on the kernel.

Watching a run live costs the run little: the step listener only copies the new record and queues it. A worker
thread of the scrubber's own draws at most ``live_fps`` of the steps a second, each quickly encoded, and sends the
view those drawn so far. Once the run is over (in a notebook, when the cell ends; elsewhere at the last step) it
draws and encodes every step as a replay would (the final payload is a replay's, byte for byte) and sends them
all. Setting a widget's trait from another thread is what ipywidgets' "Asynchronous widgets" guide does:
ipykernel hands every IOPub message, whatever thread sends it, to its own IO thread.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...results.trace import StepRecord, Trace
from ...schedule_math import flow_sigma_from_sigma
from .. import payload as _payload
from ..render import as_uint8_image, channel_tiles, frame_row, spread, trace_preview
from ._base import SliderExplorer, new_figure
from ._web import web_view

PANELS: dict[str, str] = {
    "noisy": "noisy latents",
    "x0": "predicted x0",
    "noise": "noise prediction",
    "latents": "latent channels",
}


def _draft_image(image: np.ndarray) -> dict[str, Any]:
    """A live view's picture, encoded quickly (PNG, fastest compression) rather than smallest."""
    arr = as_uint8_image(image)  # (H, W, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return {"mime": "image/png", "data": _payload.b64(buf.getvalue()), "shape": [arr.shape[0], arr.shape[1]]}


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

    The pictures are drawn and encoded on a worker thread, off the denoising loop; :meth:`wait` returns once the
    view holds every step received (reading :attr:`value` or :meth:`image_bytes` in the same cell as the run
    may need it first).

    Args:
        source: a :class:`~sdexplore.results.trace.Trace`, an ``Observation`` (its latest run) or a ``StepRecorder``;
            ``None`` for an empty scrubber filled by :meth:`on_step`.
        image: which image of the batch to show.
        rgb_factors: ``(factors (C, 3), bias (3,))`` for the latent → RGB preview (default: the preview the
            trace was recorded with, see :func:`sdexplore.views.render.trace_preview`).
        size: kept for compatibility; the view enlarges each panel by a whole factor to at least 192 pixels.
        live_fps: while filling in live, send the steps to the view at most this often (the first and the last
            step of a run are always sent). ``None``: after every step.
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
        live_fps: float | None = 4.0,
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
        self._copies: dict[
            int, StepRecord
        ] = {}  # live: step position → the copy of its record the worker reads
        self._drafts: dict[int, dict[str, Any]] = {}  # live: the steps drawn during the run, quickly encoded
        self._arrays: dict[int, dict[str, np.ndarray | None]] = {}  # step position → the figure's pictures
        self._sent = 0  # steps the view holds
        self._last_live = 0.0
        self.pushes = 0  # payloads sent to the view (live updates are throttled by live_fps)
        # live: one worker thread encodes the queued steps in order and updates the view; the lock guards the
        # shared state (the trace shown, the encoded blocks, what the view holds) between it and on_step
        self._lock = threading.RLock()
        self._worker: ThreadPoolExecutor | None = None
        self._last_job: Future | None = None
        self._failure: BaseException | None = None
        self._cell_hook: Any = None  # the post_run_cell callback that completes the view, while registered
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
        self._copies = {}
        self._drafts = {}
        self._arrays = {}

    def _preview(self, rec: StepRecord, of: str) -> np.ndarray:
        return trace_preview(self._trace, rec, of, image=self.image, factors=self._rgb)  # (h, w, 3)

    def _step_trace(self, trace: Trace, record: StepRecord) -> Trace:
        """``trace`` cut to the one step ``record`` (its meta forced to ``rgb_factors`` when given)."""
        meta = dict(trace.meta)
        if self._rgb is not None:
            meta.pop(
                "latent_preview", None
            )  # given factors mean the linear preview, as trace_preview(factors=)
            meta["latent_rgb"] = {
                "factors": torch.as_tensor(self._rgb[0]).float().tolist(),
                "bias": torch.as_tensor(self._rgb[1]).float().tolist(),
            }
        return dataclasses.replace(trace, steps=[record], meta=meta)

    def _encode(self, trace: Trace, record: StepRecord, *, draft: bool = False) -> dict[str, Any]:
        """The payload's steps block of the one step ``record`` of ``trace``: its pictures drawn and encoded
        (``draft``: as a quick PNG, for the live view during a run)."""
        block = _payload.steps_block(
            self._step_trace(trace, record),
            index=self.image,
            channels=True,
            encode=_draft_image if draft else _payload.encode_image,
        )
        if block is None:
            raise ValueError(
                "This trace holds nothing the scrubber can show: record latents, x0 or previews "
                "(sdexplore.observe's default quantities)."
            )
        return block

    def _block(self, i: int) -> dict[str, Any]:
        """Step ``i``'s entries of the payload's steps block, encoded once."""
        block = self._blocks.get(i)
        if block is None:
            record = self._copies.get(i) or self._records[i]
            block = self._blocks[i] = self._encode(self._trace, record)
        return block

    def payload(self) -> dict[str, Any]:
        """The page payload of the recorded steps so far (:mod:`sdexplore.views.payload`'s ``steps`` block):
        what the view shows once a run is in."""
        return self._assemble([self._block(i) for i in range(len(self._records))])

    def _assemble(self, blocks: list[dict[str, Any]]) -> dict[str, Any]:
        """The page payload of these steps' blocks, in order."""
        trace = self._trace
        n = len(blocks)
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
        it sits on the last one. The step's tensors are copied here; the scrubber's worker thread draws and
        encodes its pictures, so the denoising loop does not wait for them.
        """
        if self._failure is not None:  # the worker could not draw an earlier step: say so in the run
            failure, self._failure = self._failure, None
            raise failure
        if trace is not self._trace:
            with self._lock:  # not while the worker updates the view
                self._reset(trace)
                self._sent = 0
        self._records.append(record)  # the worker reads its copy, never this list
        if self._widget is None:
            return
        i = len(self._records) - 1
        final = bool(
            trace.stopped_at is not None or (trace.num_steps and record.index >= trace.num_steps - 1)
        )
        # a copy of the step's tensors: the worker never reads a tensor the caller may still write
        copy = dataclasses.replace(
            record,
            **{
                f.name: v.clone()
                for f in dataclasses.fields(record)
                if isinstance(v := getattr(record, f.name), torch.Tensor)
            },
        )
        self._copies[i] = copy
        now = time.perf_counter()
        due = self.live_fps is None or i == 0 or now - self._last_live >= 1.0 / self.live_fps
        if not (due or final):
            return  # drawn after the run: the worker is not woken for it
        self._last_live = now
        # in a notebook, the replay-quality encoding of every step waits for the cell's end (the run's tail,
        # e.g. the VAE decode, does not share the interpreter with it); the last step is drawn quickly first
        complete = final and not self._complete_after_cell()
        self._submit(self._live_step, trace, i, copy, complete)

    def _submit(self, job: Any, *args: Any) -> None:
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdexplore-scrubber")
        self._last_job = self._worker.submit(job, *args)

    def _complete_after_cell(self) -> bool:
        """Have the worker complete the view when the running IPython cell ends (``post_run_cell``); False
        outside IPython."""
        try:
            from IPython import get_ipython
        except ImportError:  # pragma: no cover - IPython comes with ipywidgets
            return False
        shell = get_ipython()
        if shell is None:
            return False
        if self._cell_hook is None:

            def cell_done(*_: Any) -> None:
                shell.events.unregister("post_run_cell", cell_done)
                self._cell_hook = None
                self._submit(self._complete)

            shell.events.register("post_run_cell", cell_done)
            self._cell_hook = cell_done
        return True

    def _live_step(self, trace: Trace, i: int, record: StepRecord, complete: bool) -> None:
        """The worker's part of a live step the view is due (at most ``live_fps`` a second, and the first):
        draw it quickly and send the steps drawn so far; ``complete`` (the run is over): encode every step as a
        replay would and send them all instead."""
        try:
            with self._lock:
                if trace is not self._trace:  # a newer run started meanwhile: this step is not shown
                    return
                if complete:  # every step, as a replay would draw them
                    self._complete()
                    return
                self._drafts[i] = self._encode(trace, record, draft=True)
                shown = sorted({*self._blocks, *self._drafts})  # the steps drawn so far, in order
                self._push([self._blocks.get(j) or self._drafts[j] for j in shown])
        except Exception as e:  # raised by the next on_step or wait(), on the caller's thread
            self._failure = e

    def _complete(self) -> None:
        """Encode every step received as a replay would and send them all (the drafts are dropped)."""
        with self._lock:
            if self._widget is None or not self._records:
                return
            if self._drafts or self._sent < len(self._records):
                self._push([self._block(i) for i in range(len(self._records))])
                self._drafts.clear()

    def wait(self, timeout: float | None = None) -> None:
        """Return once the view holds every step received so far, as a replay of them would show them.

        After an interrupted run (no last step), this draws the steps the live view skipped. Raises what the
        worker met drawing a step (a trace with nothing to show), or ``TimeoutError`` after ``timeout`` seconds.
        """
        self._settle(timeout)
        self._complete()

    def _settle(self, timeout: float | None = None) -> None:
        """Wait for the worker's queued steps; raise what it met drawing one."""
        job = self._last_job
        if job is not None:
            job.result(timeout)
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def _push(self, blocks: list[dict[str, Any]]) -> None:
        """Send these steps' blocks to the view; the slider follows the newest while it sits on the last sent."""
        with self._lock:
            n = len(blocks)
            at = self._view.step
            following = at is None or self._sent == 0 or at >= self._sent - 1
            with self._view.hold_sync():
                self._view.payload = self._assemble(blocks)
                if following and n:
                    self._view.step = n - 1
            self._sent = n
            self.pushes += 1

    # ---- widget -----------------------------------------------------------------------------------------
    @property
    def value(self) -> int:
        """Step shown (the slider's position, as the view last reported it, once the live worker has handled
        every step received); builds the widget first."""
        self.widget  # noqa: B018 - build the widget first
        self._settle()
        return int(self._view.step or 0)

    @value.setter
    def value(self, i: int) -> None:
        self.widget  # noqa: B018 - build the widget first
        self._view.step = int(i)

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
        self.wait()  # a live run's last steps may still be on the worker
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
