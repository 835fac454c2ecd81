"""The explorers' notebook view: an anywidget running the front end's JavaScript module, fed the page payload.

The module is the one a self-contained page inlines (:func:`sdexplore.views.pages.module_source`, from
``sdexplore/views/web/``), and the data is the page's payload (:mod:`sdexplore.views.payload`), held by the
browser: moving a control repaints there and never waits on the kernel, and the view keeps working after the
kernel stops. The view tells the kernel where a control came to rest (one state message when a slider is let go
or a button clicked, none while it moves), so ``widget.step`` / ``word`` / ``frame`` follow the user; setting
them from Python moves the view.
"""

from __future__ import annotations

import re
from typing import Any

from ..pages import EXPLORERS, module_source, web_file

#: The CSS class each explorer's view carries (stable selectors for tests and styling), beside ``sdx-view``.
VIEW_CLASSES = {name: f"sdx-view-{name}" for name in EXPLORERS}

# Wraps the explorer's model: its writes stay in the browser until a control is let go ("change" on a range
# input, fired when the pointer is released, or once per key press) or a button is clicked; then one
# save_changes() sends them. A closed comm (the kernel gone) is ignored: the view does not need it.
_NOTEBOOK_GLUE = """
// ---- notebook (anywidget): tell the kernel where a control came to rest, never while it moves
function restingModel(model, el) {
  let pending = false;
  const flush = () => {
    if (!pending) return;
    pending = false;
    try {
      const sent = model.save_changes();
      if (sent && typeof sent.catch === "function") sent.catch(() => {});
    } catch (_) {
      // the kernel is gone: the view works without it
    }
  };
  el.addEventListener("change", flush);
  el.addEventListener("click", flush);
  return {
    get: (name) => model.get(name),
    set: (name, value) => model.set(name, value),
    on: (event, f) => model.on(event, f),
    off: (event, f) => model.off(event, f),
    save_changes() {
      pending = true;
    },
  };
}
// the notebook's own shortcuts (arrow keys move between cells) must not take the keys of the view's controls
function ownKeys(el) {
  el.addEventListener("keydown", (e) => {
    if (e.target instanceof Element && e.target.matches("input, select, textarea")) e.stopPropagation();
  });
}
export default {
  render({ model, el }) {
    ownKeys(el);
    return explorer.render({ model: restingModel(model, el), el });
  },
};
"""

_ESM_CACHE: dict[str, str] = {}
_CLASSES: dict[str, type] = {}


def widget_esm(name: str) -> str:
    """The ES module an explorer's notebook view runs: :func:`~sdexplore.views.pages.module_source` (the very
    text a page inlines) with its default export wrapped so control positions reach the kernel at rest."""
    if name not in _ESM_CACHE:
        source, n = re.subn(
            r"^export default\b", "const explorer =", module_source(name), count=1, flags=re.M
        )
        if n != 1:
            raise RuntimeError(f"web/{name}.js must end with one `export default {{ render }}`")
        _ESM_CACHE[name] = source + _NOTEBOOK_GLUE
    return _ESM_CACHE[name]


def _require_anywidget() -> Any:
    try:
        import anywidget
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The interactive explorers need anywidget and ipywidgets 8: pip install 'sdexplore[notebooks]'. "
            "Without them, use explorer.figure() for a static matplotlib figure, or save_html() for a page."
        ) from e
    return anywidget


def view_class(name: str) -> type:
    """The anywidget class of explorer ``name`` (one of :data:`~sdexplore.views.pages.EXPLORERS`), made once."""
    if name not in _CLASSES:
        if name not in EXPLORERS:
            raise ValueError(f"{name!r} is not an explorer; choose one of {', '.join(EXPLORERS)}")
        anywidget = _require_anywidget()
        import traitlets as t

        _CLASSES[name] = type(
            f"{name.capitalize()}View",
            (anywidget.AnyWidget,),
            {
                "__module__": __name__,
                "__doc__": f"The {name} explorer's notebook view (sdexplore/views/web/{name}.js).",
                "_esm": widget_esm(name),
                "_css": web_file("explorer.css"),
                # the page payload (sdexplore.views.payload), read by the browser only
                "payload": t.Dict().tag(sync=True),
                # the controls' positions, both ways (None: the view's own default)
                "step": t.Int(None, allow_none=True).tag(sync=True),
                "word": t.Unicode(None, allow_none=True).tag(sync=True),
                "frame": t.Int(None, allow_none=True).tag(sync=True),
                "fps": t.Float(None, allow_none=True).tag(sync=True),
            },
        )
    return _CLASSES[name]


def web_view(name: str, payload: dict[str, Any], **state: Any) -> Any:
    """A notebook view of explorer ``name`` over ``payload``, its controls at ``state`` (step, word, frame,
    fps), with the explorer's CSS class (:data:`VIEW_CLASSES`)."""
    view = view_class(name)(payload=payload, **state)
    view.add_class("sdx-view")
    view.add_class(VIEW_CLASSES[name])
    return view
