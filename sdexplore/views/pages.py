"""Self-contained HTML pages of results: the kernel-free explorers with their data inlined, one file, no network.

A page holds the CSS, the JavaScript modules of ``sdexplore/views/web/`` (``core.js`` once, then each explorer)
and the payload of :mod:`sdexplore.views.payload` as JSON with its FNV-1a checksum, so a page damaged after it
was written shows an error instead of a blank. It opens from ``file://``; a page's "model" serves each explorer's
anywidget traits (``payload``, ``step``, ``word``, ``frame``) from the payload.

:func:`module_source` gives one explorer as a self-contained ES module (``core.js`` inlined), the form anywidget
takes as ``_esm``.
"""

from __future__ import annotations

import html
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from .._files import write_text_atomic
from ..errors import InvalidArgumentError, NotRecordedError, ResultFileError
from . import payload as _payload

#: The explorers (one JavaScript module each, in sdexplore/views/web/).
EXPLORERS = ("scrubber", "attention", "walk", "interpolation", "edit", "directions")
_IMPORT_CORE = re.compile(r"import\s*\{[^}]*\}\s*from\s*\"\./core\.js\";\s*")
_EXPORT = re.compile(r"^export (?=(async )?function |const |class |let )", re.M)
_PAYLOAD_ID = "sdx-payload"


# ---------------------------------------------------------------------------------------------- JavaScript
def web_file(name: str) -> str:
    """The text of a file of ``sdexplore/views/web/`` (``core.js``, ``scrubber.js``, ``explorer.css`` …)."""
    return resources.files("sdexplore.views").joinpath("web", name).read_text(encoding="utf-8")


def _explorer_body(name: str) -> str:
    if name not in EXPLORERS:
        raise InvalidArgumentError(f"{name!r} is not an explorer; choose one of {', '.join(EXPLORERS)}.")
    src = web_file(f"{name}.js")
    body, n = _IMPORT_CORE.subn("", src, count=1)
    if n != 1 or src.count("export default") != 1:
        raise RuntimeError(f"web/{name}.js must import from ./core.js once and end with one export default")
    return body


def module_source(name: str) -> str:
    """One explorer as a self-contained ES module (``core.js`` inlined, ``export default {render}`` kept): what
    anywidget takes as ``_esm``. ``name``: one of :data:`EXPLORERS`."""
    core = _EXPORT.sub("", web_file("core.js"))
    return f"{core}\n// ---- {name}.js\n{_explorer_body(name)}"


def _page_script(names: list[str]) -> str:
    """core.js once, each explorer in its own scope, and the code that mounts them on the page's payload."""
    parts = [_EXPORT.sub("", web_file("core.js"))]
    for name in names:
        body = _explorer_body(name).replace("export default", "return", 1)
        parts.append(f"// ---- {name}.js\nconst explorer_{name} = (() => {{\n{body}\n}})();")
    table = ", ".join(f"{n}: explorer_{n}" for n in names)
    parts.append(
        f"""// ---- the page: check the payload, give each explorer a model that serves it
const EXPLORERS = {{ {table} }};
function pageModel(state) {{
  const listeners = {{}};
  return {{
    get: (name) => state[name],
    set(name, value) {{
      state[name] = value;
      for (const f of listeners["change:" + name] || []) f({{ new: value }});
    }},
    on(event, f) {{ (listeners[event] ||= []).push(f); }},
    off(event, f) {{ listeners[event] = (listeners[event] || []).filter((g) => g !== f); }},
    save_changes() {{}},
  }};
}}
async function mount() {{
  const node = document.getElementById("{_PAYLOAD_ID}");
  const root = document.getElementById("sdx-root");
  let payload;
  try {{
    payload = parsePayload(node.textContent, node.dataset.checksum);
  }} catch (e) {{
    errorBox(root, e.message);
    return {{ error: e.message }};
  }}
  const models = {{}};
  for (const el of document.querySelectorAll("[data-explorer]")) {{
    const name = el.dataset.explorer;
    models[name] = pageModel({{ payload }});
    await EXPLORERS[name].render({{ model: models[name], el }});
  }}
  return {{ payload, models }};
}}
window.sdexplore = {{ ready: mount() }};
// shown in an <iframe> (the docs site): tell the page around it this page's height, now and when it changes
if (window.parent !== window) {{
  const height = () => Math.ceil(document.body.getBoundingClientRect().bottom) + 16; // the content, not the frame
  const tell = () => window.parent.postMessage({{ sdexploreHeight: height() }}, "*");
  window.sdexplore.ready.then(tell);
  new ResizeObserver(tell).observe(document.body);
}}
"""
    )
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- pages
def fnv1a32(text: str) -> str:
    """FNV-1a (32 bit) of ``text``'s bytes as 8 hex digits: the page's checksum (``core.js`` computes the same)."""
    h = 0x811C9DC5
    for b in text.encode("utf-8"):
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return f"{h:08x}"


def _payload_text(payload: dict[str, Any]) -> str:
    # ASCII JSON with every "<" escaped: nothing in it can close the <script> element it sits in
    return json.dumps(payload, ensure_ascii=True, separators=(",", ":"), allow_nan=False).replace(
        "<", "\\u003c"
    )


def page_html(payload: dict[str, Any], explorers: list[str], *, title: str | None = None) -> str:
    """The HTML text of a self-contained page showing ``explorers`` (names of :data:`EXPLORERS`) on ``payload``."""
    for name in explorers:
        _explorer_body(name)  # refuses an unknown name
    text = _payload_text(payload)
    prov = payload.get("provenance", {})
    title = title or f"sdexplore · {prov.get('prompt') or payload.get('kind', 'result')}"
    relation = (payload.get("attention") or {}).get("relation", "image->text")
    headings = {
        "scrubber": "Steps",
        "attention": {
            "text->image": "Attention per word (text → image)",
            "image->image": "Self-attention per query point",
        }.get(relation, "Attention per word"),
        "walk": "Walk",
        "interpolation": "Frames",
        "edit": "The edit",
        "directions": "Directions",
    }
    facts = [
        (k, prov[k])
        for k in (
            "model",
            "family",
            "scheduler",
            "seed",
            "steps",
            "guidance_scale",
            "size",
            "sdexplore",
            "date",
        )
        if prov.get(k) is not None
    ]
    fact_html = " · ".join(
        f"{html.escape(k.replace('_', ' '))} <code>{html.escape(_show(k, v))}</code>" for k, v in facts
    )
    prompt = prov.get("prompt")
    sections = "\n".join(
        f'<h2>{headings[n]}</h2>\n<div class="sdx-mount" data-explorer="{n}"></div>' for n in explorers
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="sdexplore {html.escape(str(prov.get("sdexplore", "")))}">
<title>{html.escape(title)}</title>
<style>
{web_file("explorer.css")}
</style>
</head>
<body class="sdx-page">
<h1>{html.escape(prompt) if prompt else "sdexplore"}</h1>
<div class="sdx-provenance">{fact_html}</div>
<div id="sdx-root">
{sections}
</div>
<script type="application/json" id="{_PAYLOAD_ID}" data-checksum="{fnv1a32(text)}">{text}</script>
<script type="module">
{_page_script(explorers)}
</script>
</body>
</html>
"""


def _show(key: str, v: Any) -> str:
    if isinstance(v, list):
        return "×".join(map(str, v)) if key == "size" else ", ".join(map(str, v))
    return str(v)


def read_payload(source: str | Path) -> dict[str, Any]:
    """The payload of a page written by :func:`write_page` (a path or the HTML text), its checksum checked.

    A page without a payload, or one whose payload was changed, raises :class:`~sdexplore.errors.ResultFileError`.
    """
    text = Path(source).read_text(encoding="utf-8") if isinstance(source, Path) else source
    m = re.search(
        rf'<script type="application/json" id="{_PAYLOAD_ID}" data-checksum="([0-9a-f]{{8}})">(.*?)</script>',
        text,
        re.S,
    )
    if m is None:
        raise ResultFileError("This is not an sdexplore page: it holds no payload.")
    checksum, body = m.groups()
    if fnv1a32(body) != checksum:
        raise ResultFileError(
            f"The page's payload was changed after it was written (checksum {fnv1a32(body)}, expected {checksum})."
        )
    return json.loads(body)


def check_page_path(path: Any) -> Path:
    """``path`` as a Path to an ``.html`` file in an existing folder, or InvalidArgumentError saying what to give."""
    if not isinstance(path, str | os.PathLike):
        raise InvalidArgumentError(f"path={path!r} is not a file path: pass a str or Path ending in .html.")
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise InvalidArgumentError(f"{path} does not end in .html: a page is an HTML file, e.g. 'run.html'.")
    if path.is_dir():
        raise InvalidArgumentError(f"{path} is a folder: pass a file path such as {path / 'run.html'}.")
    if not path.parent.is_dir():
        raise InvalidArgumentError(
            f"The folder {path.parent} does not exist: create it first, or pick another path."
        )
    return path


def write_page(
    path: Path, payload: dict[str, Any], explorers: list[str], *, title: str | None = None
) -> Path:
    """Write the page atomically (a temporary file beside it, then a rename); returns ``path``."""
    write_text_atomic(path, page_html(payload, explorers, title=title))
    return path


# ---------------------------------------------------------------------------------------------- entry points
def save_observation(obs: Any, path: Any, **options: Any) -> Path:
    """What :meth:`sdexplore.results.Observation.save_html` does (see there)."""
    path = check_page_path(path)
    title = options.pop("title", None)
    index = options.get("index", 0)
    maps = obs.attention
    if not obs.runs and maps is None:
        raise NotRecordedError(
            "This Observation recorded nothing: call the pipeline inside `with sdexplore.observe(pipe, "
            "attention=True) as obs:` before saving a page."
        )
    n = (
        maps.num_images
        if maps is not None
        else obs.runs[-1][0].latents.shape[0]
        if obs.runs and len(obs.runs[-1]) and obs.runs[-1][0].latents is not None
        else 1
    )
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise InvalidArgumentError(f"index={index!r}: this Observation holds images 0..{n - 1}.")
    payload = _payload.observation_payload(obs, **options)
    explorers = [n for n, key in (("scrubber", "steps"), ("attention", "attention")) if key in payload]
    if not explorers:
        raise NotRecordedError(
            "This Observation has nothing a page can show: its steps hold no latents, x0 or previews and no "
            "attention was recorded. Record with observe(pipe, attention=True) (the default step quantities)."
        )
    return write_page(path, payload, explorers, title=title)


def save_walk(walk: Any, path: Any, **options: Any) -> Path:
    """What :meth:`sdexplore.results.Walk.save_html` does (see there)."""
    path = check_page_path(path)
    title = options.pop("title", None)
    if len(walk) < 1:
        raise NotRecordedError("This Walk has no frames: render one with sdexplore.walk(...) first.")
    fps = options.get("fps", 12)
    if isinstance(fps, bool) or not isinstance(fps, int | float) or not 0 < fps <= 60:
        raise InvalidArgumentError(f"fps={fps!r}: pass a number of frames per second in (0, 60].")
    return write_page(path, _payload.walk_payload(walk, **options), ["walk", "interpolation"], title=title)


def save_walks(walks: Any, path: Any, **options: Any) -> Path:
    """One page comparing several walks of one frame count on one slider (``{"lerp": w1, "slerp": w2}``), each
    with its consecutive-frame distances and smoothness; ``options`` as :meth:`Walk.save_html`."""
    path = check_page_path(path)
    title = options.pop("title", None)
    if not isinstance(walks, dict) or not walks:
        raise InvalidArgumentError(
            "walks must be a dict name → Walk with at least one walk, e.g. {'lerp': w}."
        )
    counts = {name: len(w) for name, w in walks.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise InvalidArgumentError(
            f"The walks must have one frame count (≥ 1) to share a slider; they have {counts}."
        )
    return write_page(path, _payload.walks_payload(walks, **options), ["interpolation"], title=title)


def save_edit(edit: Any, path: Any, **options: Any) -> Path:
    """One self-contained page of an :class:`~sdexplore.results.edit.Edit` (source | edited | difference, and a word's
    map before and after on one scale); ``options``: ``index``, ``words``, ``model``, ``seed``, ``title``. A bad
    path raises InvalidArgumentError before any work; a bad ``index`` too (the Edit's own check)."""
    path = check_page_path(path)
    title = options.pop("title", None)
    edit.images(options.get("index", 0))  # InvalidArgumentError for an index the edit does not hold
    return write_page(path, _payload.edit_payload(edit, **options), ["edit"], title=title)
