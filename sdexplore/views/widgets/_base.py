"""Shared pieces of the explorers: image → PNG bytes, channel tiles, SVG curves, frontend detection, static fallback.

Pictures themselves (heat-map overlays, colour maps, trace previews) come from :mod:`sdexplore.views.render`.
"""

from __future__ import annotations

import base64
import html
import io
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image

from ...errors import InvalidArgumentError
from ..render import as_uint8_image, upscale

#: Environment variable that forces the static (matplotlib) fallback everywhere: ``SDEXPLORE_STATIC=1``.
STATIC_ENV = "SDEXPLORE_STATIC"
#: Environment variable naming a folder: a static explorer that has a front end also writes its self-contained
#: page there and shows it in an ``<iframe>`` (the docs build: the tutorials' pages embed live explorers). The
#: folder must sit beside the rendered notebook (the frame's address is ``FOLDER_NAME/PAGE``).
EMBED_ENV = "SDEXPLORE_EMBED_PAGES"
#: The payload block each front end needs (an explorer without it is not embedded).
_EMBED_NEEDS = {
    "scrubber": "steps",
    "attention": "attention",
    "interpolation": "walk",
    "walk": "walk",
    "edit": "edit",
    "directions": "directions",
}
#: A page's height in the frame before it reports its own (pages post their height to the frame's parent).
_EMBED_HEIGHT = {
    "scrubber": 560,
    "attention": 640,
    "interpolation": 560,
    "walk": 460,
    "edit": 720,
    "directions": 360,
}
# the page around the frames: each frame takes the height its page reports
_EMBED_SCRIPT = """<script>
window.addEventListener("message", (e) => {
  const height = e.data && e.data.sdexploreHeight;
  if (!height) return;
  for (const f of document.querySelectorAll("iframe.sdx-embed")) {
    if (f.contentWindow === e.source) f.style.height = Math.ceil(height) + 4 + "px";
  }
});
</script>"""
#: Smallest side an image is shown at in a figure; smaller images (8×8 latents) are upscaled with
#: nearest-neighbour so each latent cell stays a crisp square.
MIN_DISPLAY_SIDE = 192
#: Smallest side of the PNGs sent to a widget. The browser scales them to the panel size with
#: ``image-rendering: pixelated`` (see :data:`PIXELATED_CSS`), so small PNGs stay crisp and encode in ~0.1 ms.
WIDGET_MIN_SIDE = 64
#: Crisp (nearest-neighbour) scaling in the browser for images with the ``sdx-pixelated`` class.
PIXELATED_CSS = "<style>.sdx-pixelated, .sdx-pixelated img { image-rendering: pixelated; }</style>"


# ---------------------------------------------------------------------------------------- frontend detection
def has_widget_frontend() -> bool:
    """True when widgets can render: running in a Jupyter kernel with anywidget and ipywidgets installed.

    False in a plain Python script or a terminal IPython (no kernel), when either is missing, or when the
    environment variable ``SDEXPLORE_STATIC=1`` asks for static figures (e.g. before exporting a notebook to
    HTML or PDF). Executing a notebook with nbclient/nbconvert *does* run a kernel: widgets are created and,
    with ``store_widget_state=True``, saved into the notebook.
    """
    if os.environ.get(STATIC_ENV, "").strip().lower() in ("1", "true", "yes"):
        return False
    try:
        import anywidget  # noqa: F401
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _require_ipywidgets() -> Any:
    try:
        import ipywidgets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The interactive explorers need ipywidgets 8: pip install 'sdexplore[notebooks]'. "
            "Without it, use explorer.figure() for a static matplotlib figure."
        ) from e
    return ipywidgets


# ---------------------------------------------------------------------------------------- images
def style_widget() -> Any:
    """An invisible ``ipywidgets.HTML`` carrying :data:`PIXELATED_CSS` (add it to an explorer's box)."""
    import ipywidgets as w

    return w.HTML(PIXELATED_CSS, layout=w.Layout(height="0px", margin="0px", overflow="hidden"))


def png_bytes(image: Any, *, min_side: int = MIN_DISPLAY_SIDE) -> bytes:
    """Encode an image as PNG for an ``ipywidgets.Image`` (fast: compression level 1; small images upscaled)."""
    arr = upscale(as_uint8_image(image), min_side)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def jpeg_bytes(image: Any, *, quality: int = 90) -> bytes:
    """Encode an image as JPEG: ~5× faster than PNG for photo-like content such as heat-map overlays."""
    buf = io.BytesIO()
    Image.fromarray(as_uint8_image(image)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def data_uri(data: bytes, fmt: str = "png") -> str:
    """A ``data:image/...;base64,...`` URI for an HTML ``<img>``."""
    return f"data:image/{fmt};base64," + base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------------------- SVG curves
def svg_curves(
    curves: Sequence[tuple[str, Sequence[float], str]],
    *,
    marker: float | None = None,
    width: int = 360,
    height: int = 120,
    xlabel: str = "",
    highlight: Sequence[int] = (),
) -> str:
    """A small line chart as inline SVG (cheap to regenerate on every slider move: no figure, no PNG).

    ``curves``: (label, values, colour) each; all share the x axis 0..n-1 and the y range. ``marker``: x of a
    vertical line (the current position). ``highlight``: x indices of points drawn as red dots (e.g. jumps).
    """
    left, right, top, bottom = 40, 8, 8, 22
    pw, ph = width - left - right, height - top - bottom
    ys = [float(v) for _, vals, _ in curves for v in vals]
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    n = max((len(v) for _, v, _ in curves), default=1)

    def px(i: float) -> float:
        return left + (pw * i / max(n - 1, 1))

    def py(y: float) -> float:
        return top + ph * (1 - (y - lo) / (hi - lo))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'style="font: 10px sans-serif; background: white">',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>',
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">{hi:.3g}</text>',
        f'<text x="{left - 4}" y="{top + ph}" text-anchor="end">{lo:.3g}</text>',
        f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">{html.escape(xlabel)}</text>',
    ]
    for k, (label, vals, colour) in enumerate(curves):
        pts = " ".join(f"{px(i):.1f},{py(float(v)):.1f}" for i, v in enumerate(vals))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        parts.append(
            f'<text x="{left + 4}" y="{top + 10 + 11 * k}" fill="{colour}">{html.escape(label)}</text>'
        )
        for i in highlight:
            if 0 <= i < len(vals):
                parts.append(f'<circle cx="{px(i):.1f}" cy="{py(float(vals[i])):.1f}" r="3" fill="#d62728"/>')
    if marker is not None:
        x = px(marker)
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph}" stroke="#333" stroke-dasharray="3,2"/>'
        )
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------- explorer base
class Explorer:
    """Base of the explorers: a lazily built ipywidgets view plus a static matplotlib fallback.

    In a Jupyter kernel with ipywidgets, displaying an explorer shows its widget; elsewhere (a plain script,
    ``SDEXPLORE_STATIC=1``, ``static=True``) it shows :meth:`figure`, a matplotlib figure. No explorer ever
    runs a pipeline: it only reads the result object it was given.
    """

    def __init__(self, *, static: bool | None = None) -> None:
        self.static = (not has_widget_frontend()) if static is None else bool(static)
        self._widget: Any = None
        self._upload: ImageUpload | None = None
        self._upload_box: Any = None  # the box holding the explorer's own view, under an upload control

    # -- a starting image of the user's own ----------------------------------------------------------------
    def with_upload(
        self, run: Callable[[Image.Image], Any], *, size: int | tuple[int, int] | None = None
    ) -> Explorer:
        """Put an upload control (``ipywidgets.FileUpload``) above this explorer; returns the explorer.

        The picture a user uploads is read with :func:`sdexplore.images.load_image` (each resize or mode
        conversion shown as a note; a file that is not an image gets its one message, nothing runs) at ``size``
        (``(height, width)``; default: the picture's own, rounded to a multiple of 8), then handed to
        ``run(image)``: your code, which runs the pipeline (an inversion, an img2img call under
        ``sdexplore.observe``) and returns what this explorer's constructor takes — one result, or a tuple of its
        positional arguments (``(observation, image)`` for an ``AttentionExplorer``). The explorer then shows it.
        The explorer itself still never runs a pipeline.
        """
        if not callable(run):
            raise InvalidArgumentError(
                "with_upload(run) takes a function image -> result (what the explorer shows)."
            )
        if getattr(self, "_options", None) is None:
            raise InvalidArgumentError(
                f"{type(self).__name__} cannot take a new result yet: explorers with an upload control keep "
                "their constructor's options in self._options."
            )

        def show(image: Image.Image) -> Any:
            result = run(image)
            self.replace(*(result if isinstance(result, tuple) else (result,)))
            return result

        self._upload = ImageUpload(show, size=size)
        return self

    def replace(self, *args: Any) -> None:
        """Show a new result (the constructor's positional arguments), keeping every option; the widget, if
        built, is rebuilt in place."""
        options = getattr(self, "_options", None)
        if options is None:
            raise InvalidArgumentError(f"{type(self).__name__} cannot take a new result (no self._options).")
        keep = (self._widget, self._upload, self._upload_box, self.static)
        type(self).__init__(self, *args, **options)
        self._widget, self._upload, self._upload_box, self.static = keep
        if self._upload_box is not None:
            self._upload_box.children = (self._build(),)

    # -- to implement --------------------------------------------------------------------------------------
    def _build(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def figure(self) -> Any:  # pragma: no cover - abstract
        """A static matplotlib ``Figure`` summarising what the widget shows."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------------------
    @property
    def widget(self) -> Any:
        """The ipywidgets view (built on first access; needs ipywidgets 8)."""
        if self._widget is None:
            w = _require_ipywidgets()
            view = self._build()
            if self._upload is None:
                self._widget = view
            else:
                self._upload_box = w.VBox([view])
                self._widget = w.VBox([self._upload.widget, self._upload_box])
                self._widget.add_class("sdx-upload-explorer")
        return self._widget

    def show(self) -> Any:
        """Display the explorer: the widget in Jupyter, else the static figure (returned, for ``savefig``)."""
        if not self.static:
            from IPython.display import display

            display(self.widget)
            return self.widget
        fig = self.figure()
        try:
            from IPython import get_ipython

            if get_ipython() is not None:
                from IPython.display import Image as IPyImage
                from IPython.display import display

                display(IPyImage(data=figure_png(fig)))
        except ImportError:  # pragma: no cover
            pass
        return fig

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        if not self.static:
            return self.widget._repr_mimebundle_(include=include, exclude=exclude)
        png = base64.b64encode(figure_png(self.figure())).decode("ascii")
        bundle = {"image/png": png, "text/plain": repr(self)}
        embedded = self.embed_page(png) if os.environ.get(EMBED_ENV) else None
        if embedded is not None:
            bundle["text/html"] = embedded
        return bundle

    def embed_page(self, png: str | None = None, folder: str | os.PathLike | None = None) -> str | None:
        """Write this explorer's self-contained page into ``folder`` (default: ``$SDEXPLORE_EMBED_PAGES``) and
        return the HTML that shows it live in an ``<iframe>`` (with ``png``, base64 of the static figure, under a
        "static figure" disclosure); None for an explorer without a front end or with nothing to show yet. The
        page's name is a digest of its text, so equal explorers share one file."""
        name = getattr(self, "_web_name", None)
        folder = folder if folder is not None else os.environ.get(EMBED_ENV)
        if name is None or not folder:
            return None
        import hashlib
        from pathlib import Path

        from ..._files import write_text_atomic
        from ..pages import page_html

        payload = self.payload()
        if not payload.get(_EMBED_NEEDS.get(name, name)):
            return None  # nothing to explore yet (a live scrubber shown before its run): the figure says so
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        text = page_html(payload, [name], title=f"sdexplore · {type(self).__name__}")
        page = folder / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.html"
        if not page.exists():
            write_text_atomic(page, text)
        what = html.escape(type(self).__name__)
        figure = (
            f'<details class="sdx-embed-static"><summary>static figure</summary>'
            f'<img src="data:image/png;base64,{png}" alt="{what} (static figure)"></details>'
            if png
            else ""
        )
        return (
            f'<iframe class="sdx-embed" src="{html.escape(folder.name)}/{html.escape(page.name)}" '
            f'title="{what}: a live explorer, running in your browser" '
            f'style="width: 100%; height: {_EMBED_HEIGHT.get(name, 600)}px; border: 1px solid #ddd"></iframe>'
            f"{figure}{_EMBED_SCRIPT}"
        )


class ImageUpload:
    """An upload control for a picture of the user's own: ``ipywidgets.FileUpload`` and a status line.

    Each upload is read with :func:`sdexplore.images.load_image` (at ``size``, ``(height, width)`` or one side;
    default the picture's own size rounded to a multiple of 8); its notes (resized, converted from RGBA, ...) and
    any error (not an image) are shown in the status line, and a readable picture is handed to ``on_image``.
    :meth:`receive` does the same with bytes, without a frontend.
    """

    def __init__(
        self,
        on_image: Callable[[Image.Image], Any],
        *,
        size: int | tuple[int, int] | None = None,
        description: str = "Your image",
    ) -> None:
        self.on_image = on_image
        self.size = size
        self.description = description
        self.status = ""  # the latest status line, as text
        self.image: Image.Image | None = None  # the latest picture read
        self._widget: Any = None

    @property
    def widget(self) -> Any:
        """The control: an upload button and a status line (built on first access)."""
        if self._widget is None:
            w = _require_ipywidgets()
            self._button = w.FileUpload(accept="image/*", multiple=False, description=self.description)
            self._button.add_class("sdx-upload")
            self._status = w.HTML("")
            self._button.observe(self._on_value, names="value")
            self._widget = w.HBox([self._button, self._status])
        return self._widget

    def _on_value(self, change: dict[str, Any]) -> None:
        files = change["new"]
        if files:
            f = files[0]
            self.receive(f["content"], f.get("name", "upload"))

    def _say(self, text: str) -> None:
        self.status = text
        if self._widget is not None:
            self._status.value = html.escape(text)

    def receive(self, data: bytes | memoryview, name: str = "upload") -> Any:
        """Read the bytes of an uploaded file and hand the picture on; returns ``on_image``'s result, or None
        when the file is not a picture (the status line says why)."""
        from ...images import load_image  # lazily: the explorers import without the image module's needs

        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always")
            try:
                image = load_image(bytes(data), self.size)
            except InvalidArgumentError as e:
                self._say(f"{name}: {e}")
                return None
        said = "; ".join(str(n.message) for n in notes if issubclass(n.category, UserWarning))
        self.image = image
        self._say(f"{name}: {image.height}×{image.width}, working…" + (f" ({said})" if said else ""))
        result = self.on_image(image)
        self._say(f"{name}: {image.height}×{image.width}" + (f" ({said})" if said else ""))
        return result


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """Render a matplotlib figure to PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` outside pyplot (no global state, no backend needed)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


class SliderExplorer(Explorer):
    """An explorer driven by one main slider: steps or frames. Its notebook view (``self._view``, an anywidget
    made in ``_build``) holds the slider's position in the synced trait named by ``_position``."""

    _position = "frame"

    @property
    def value(self) -> int:
        """Index shown (the main slider's position, as the view last reported it); builds the widget first."""
        self.widget  # noqa: B018 - build the widget first
        return int(getattr(self._view, self._position) or 0)

    @value.setter
    def value(self, i: int) -> None:
        self.widget  # noqa: B018 - build the widget first
        setattr(self._view, self._position, int(i))
