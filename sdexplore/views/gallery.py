"""A sweep's gallery: one self-contained HTML page of every finished item's picture, filtered by prompt, seed and
word (the word's attention map over the picture, where the sweep kept maps), offline.

The page follows :mod:`sdexplore.views.pages`: ``core.js`` inlined for decoding and colouring, the payload as
checksummed JSON (``kind: "gallery"``, read back by :func:`sdexplore.views.pages.read_payload`), no network::

    {"format": "sdexplore.page", "version": 1, "kind": "gallery", "provenance": {...}, "colormap": {...},
     "image": null,
     "gallery": {"folder": name, "planned": N, "words": [every word with a map, first-seen order],
                 "figures": [names of the per-item figures shown, e.g. "iou", "read"],
                 "items": [{"item", "prompt", "seed", "negative_prompt", "image": IMAGE | null,
                            "maps": {word: MAPS [h, w]}, "figures": {name: value}}]}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from . import pages
from . import payload as _payload

#: Per-item figures of a sweep's index shown under each picture, where present (the embedded model's scene
#: scorer: the shape word's attention IoU and whether the picture reads as its prompt).
FIGURES = ("iou", "read", "all", "final_x0_change")


def _done_items(folder: Path) -> tuple[list[dict[str, Any]], int]:
    """Every item of the sweep in ``folder`` whose files are complete and verified (its manifest's checksums),
    in plan order, and how many items the sweep planned."""
    from ..sweeps import folder as fs
    from ..sweeps.plan import SweepItem

    root = folder / fs.ITEMS
    rows = []
    for manifest in sorted(root.glob(f"[0-9]*/{fs.MANIFEST}")) if root.is_dir() else []:
        try:
            spec = json.loads(manifest.read_text())["item"]
            item = SweepItem(**{**spec, "words": tuple(spec["words"]) if spec["words"] else None})
        except (OSError, ValueError, KeyError, TypeError):
            continue
        rows.extend(r for r in fs.index_rows(folder, [item]) if r["status"] == "done")
    planned = len(rows)
    index = folder / fs.INDEX
    if index.is_file():
        try:
            planned = max(planned, len(fs.read_index(index)))
        except (OSError, ValueError, InvalidArgumentError):
            pass
    return rows, planned


def gallery_payload(folder: str | Path, *, cmap: str | None = None) -> dict[str, Any]:
    """The gallery page's payload of the sweep in ``folder`` (an ``sdexplore sweep --out``): each finished
    item's picture, its word maps (quantised) and its figures, with the sweep's settings as provenance."""
    from safetensors import safe_open

    from ..sweeps import folder as fs
    from ..sweeps.execute import IMAGE, MAPS

    folder = Path(folder).expanduser()
    settings_path = folder / fs.SETTINGS
    if not settings_path.is_file():
        raise InvalidArgumentError(
            f"{folder} is not a sweep folder (no {fs.SETTINGS}); pass the --out of `sdexplore sweep`."
        )
    settings = json.loads(settings_path.read_text()).get("settings", {})
    rows, planned = _done_items(folder)
    items, words, figures = [], {}, {}
    for row in rows:
        where = folder / fs.ITEMS / row["name"]
        entry: dict[str, Any] = {
            "item": int(row["item"]),
            "prompt": row["prompt"],
            "seed": int(row["seed"]),
            "negative_prompt": row.get("negative_prompt"),
            "image": None,
            "maps": {},
            "figures": {},
        }
        if IMAGE in row["files"]:
            from PIL import Image

            with Image.open(where / IMAGE) as im:
                entry["image"] = _payload.encode_image(im.convert("RGB"))
        if MAPS in row["files"]:
            with safe_open(str(where / MAPS), framework="pt") as f:  # word → (h, w) aggregated map
                for word in f.keys():  # noqa: SIM118 - safe_open is no mapping
                    entry["maps"][word] = _payload.quantize_maps(f.get_tensor(word))
                    words.setdefault(word, None)
        for name in FIGURES:
            if row.get(name) is not None:
                entry["figures"][name] = row[name]
                figures.setdefault(name, None)
        items.append(entry)
    size = next((it["image"]["shape"] for it in items if it["image"] is not None), None)
    prov = _payload.provenance(
        model=settings.get("model") or "embedded",
        scheduler=settings.get("scheduler"),
        steps=settings.get("steps"),
        guidance_scale=settings.get("guidance_scale"),
        size=size,
        prompt=f"sweep {folder.name}: {len(items)} of {planned} items",
    )
    out = _payload._base("gallery", prov, cmap)
    out["image"] = None
    out["gallery"] = {
        "folder": folder.name,
        "planned": planned,
        "words": list(words),
        "figures": list(figures),
        "items": items,
    }
    return out


# The gallery's front end (after core.js): filters, then one card per item; a word's map is coloured over the
# item's picture exactly as the attention explorer colours it (min-max over the map, the payload's colour map).
_GALLERY_JS = """
// ---- the gallery
async function gallery(root, payload) {
  const g = payload.gallery;
  if (!g) throw new PayloadError("This page's payload holds no gallery.");
  const lut = colourTable(payload);
  const cards = await Promise.all(
    g.items.map(async (it, i) => {
      const bitmap = it.image ? await loadImage(it.image, `items[${i}].image`) : null;
      const maps = {};
      for (const [w, block] of Object.entries(it.maps)) maps[w] = await loadMaps(block, `items[${i}].maps[${w}]`);
      const [H, W] = bitmap ? displaySize(bitmap.height, bitmap.width, 160) : displaySize(64, 64, 160);
      const cv = canvas(H, W, "sdx-gallery-image", false);
      const figs = Object.entries(it.figures).map(([k, v]) => `${k} ${typeof v === "number" ? Number(v.toPrecision(3)) : v}`);
      const caption = h("figcaption", {},
        h("div", { class: "sdx-gallery-prompt", text: it.prompt }),
        h("div", { class: "sdx-note", text: [`seed ${it.seed}`, ...figs].join(" · ") }));
      const box = h("figure", { class: "sdx-panel sdx-gallery-card", "data-item": it.item }, cv, caption);
      let base = null;
      if (bitmap) {
        const off = canvas(H, W).getContext("2d");
        off.imageSmoothingEnabled = false;
        off.drawImage(bitmap, 0, 0, W, H);
        base = off.getImageData(0, 0, W, H);
      }
      return { it, cv, box, maps, base, H, W };
    }),
  );
  const state = { prompt: "", seed: "", word: "", opacity: 0.5 };
  const select = (cls, label, none, values) => {
    const s = h("select", { class: cls }, h("option", { value: "", text: none }), values.map((v) => h("option", { value: String(v), text: String(v) })));
    return { s, box: h("label", { class: "sdx-control" }, h("span", { class: "sdx-label", text: label }), s) };
  };
  const prompts = [...new Set(g.items.map((it) => it.prompt))];
  const seeds = [...new Set(g.items.map((it) => it.seed))].sort((a, b) => a - b);
  const byPrompt = select("sdx-filter-prompt", "prompt", "every prompt", prompts);
  const bySeed = select("sdx-filter-seed", "seed", "every seed", seeds);
  const byWord = select("sdx-filter-word", "word map", "none (the pictures)", g.words);
  const opacity = slider("opacity", 0, 1, state.opacity, (v) => { state.opacity = v; paint(); }, "sdx-opacity", 0.05);
  const count = h("div", { class: "sdx-info sdx-gallery-count" });
  const grid = h("div", { class: "sdx-panels sdx-gallery" }, cards.map((c) => c.box));
  function paint() {
    let shown = 0;
    for (const c of cards) {
      const visible =
        (!state.prompt || c.it.prompt === state.prompt) &&
        (!state.seed || String(c.it.seed) === state.seed) &&
        (!state.word || state.word in c.maps);
      c.box.style.display = visible ? "" : "none";
      if (!visible) continue;
      shown += 1;
      const ctx = c.cv.getContext("2d");
      if (state.word) {
        const m = c.maps[state.word];
        const heat = resize(m.addTo(new Float32Array(m.h * m.w), 0), m.h, m.w, c.H, c.W);
        const out = ctx.createImageData(c.W, c.H);
        paintHeat(out, heat, lut, c.base, state.opacity);
        ctx.putImageData(out, 0, 0);
      } else if (c.base) {
        ctx.putImageData(c.base, 0, 0);
      }
    }
    count.textContent =
      `${shown} of ${g.items.length} pictures` + (g.planned > g.items.length ? ` (${g.planned} planned)` : "") +
      (state.word ? ` · the attention map of “${state.word}”` : "");
  }
  for (const [sel, key] of [[byPrompt.s, "prompt"], [bySeed.s, "seed"], [byWord.s, "word"]]) {
    sel.addEventListener("change", () => { state[key] = sel.value; paint(); });
  }
  const controls = [byPrompt.box, bySeed.box];
  if (g.words.length) controls.push(byWord.box, opacity.box);
  root.replaceChildren(h("div", { class: "sdx-explorer sdx-gallery-view" }, h("div", { class: "sdx-controls" }, controls), count, grid));
  paint();
  return { cards, state, paint };
}
async function mount() {
  const node = document.getElementById("sdx-payload");
  const root = document.getElementById("sdx-root");
  try {
    const payload = parsePayload(node.textContent, node.dataset.checksum);
    return { payload, view: await gallery(root, payload) };
  } catch (e) {
    errorBox(root, e.message);
    return { error: e.message };
  }
}
window.sdexplore = { ready: mount() };
"""


def gallery_html(payload: dict[str, Any], *, title: str | None = None) -> str:
    """The HTML text of the gallery page of ``payload`` (:func:`gallery_payload`)."""
    html = pages.page_html(payload, [], title=title)
    script = pages._EXPORT.sub("", pages.web_file("core.js")) + _GALLERY_JS
    start = html.index('<script type="module">')
    end = html.index("</script>", start)
    return html[:start] + f'<script type="module">\n{script}\n' + html[end:]


def save_gallery(folder: str | Path, path: str | Path, *, title: str | None = None) -> Path:
    """Write the gallery page of the sweep in ``folder`` to ``path`` (``.html``, atomically); returns the path."""
    path = pages.check_page_path(path)
    payload = gallery_payload(folder)
    from .._files import write_text_atomic

    write_text_atomic(path, gallery_html(payload, title=title or f"sdexplore sweep · {Path(folder).name}"))
    return path
