// attention.js: a word's attention map over the image (sdexplore.AttentionExplorer without a kernel). One chip per
// word of the prompt (a word's map sums its tokens', every occurrence) or, with "tokens", one per key position;
// a step range where per-step maps were recorded; a layer menu (all layers, each resolution, each layer) where
// per-layer maps were kept; the heat map's opacity. Each map is min-max normalised over the image (its shape,
// not its strength) and coloured with the payload's matplotlib colour map, as the Python views draw it.
// The maps' relation (payload.attention.relation) is named above them: image→text (where the image attends to the
// word), text→image (where the word's queries look in the image: the same chips), or image→image (a menu of the
// recorded query points instead of the words, the chosen point marked on its map over the image).
//
// Model traits read (anywidget names; a page's model serves them from its embedded payload):
//   payload  object  the page payload (sdexplore.views.pages.observation_payload); needs payload.attention
//   word     string  optional: the word to open on (default: payload.attention.default_word); written back
//   frame    int     optional, with payload.frames: the video frame to open on; written back
// Listens to change:payload (rebuilds) and change:word (selects that word).
import {
  atFrame,
  canvas,
  colourTable,
  displaySize,
  h,
  loadImage,
  loadMaps,
  mountExplorer,
  paintHeat,
  payloadOf,
  resize,
  slider,
  tell,
} from "./core.js";

const ALL = "all layers";

async function build(model, el) {
  const payload = payloadOf(model);
  const att = payload.attention;
  if (!att) throw new Error("This result has no attention maps (record them with observe(pipe, attention=True)).");
  const lut = colourTable(payload);
  const F = payload.frames ? payload.frames.count : 0;
  const lead = F ? 1 : 0; // a frames axis leads every block when present
  const aggregate = await loadMaps(att.aggregate, "attention.aggregate");
  const perStep = att.steps ? await loadMaps(att.steps, "attention.steps") : null;
  const layers = await Promise.all(
    (att.layers || []).map(async (l) => ({ name: l.name, maps: await loadMaps(l.maps, `attention.layers[${l.name}]`) })),
  );
  const images = payload.image
    ? Array.isArray(payload.image)
      ? await Promise.all(payload.image.map((im, j) => loadImage(im, `image[${j}]`)))
      : await loadImage(payload.image, "image")
    : null;
  const [LH, LW] = [aggregate.h, aggregate.w];
  const first = atFrame(images, 0);
  const [DH, DW] = first ? displaySize(first.height, first.width, 320) : displaySize(LH, LW, 256);
  const S = perStep ? perStep.shape[lead] : 0;

  // the menu of layers: all, each resolution (when there are several), each layer
  const groups = new Map([[ALL, []]]);
  const byRes = new Map();
  for (const l of layers) {
    const key = `${l.maps.h}×${l.maps.w} maps`;
    if (!byRes.has(key)) byRes.set(key, []);
    byRes.get(key).push(l);
  }
  if (byRes.size > 1) for (const [k, ls] of byRes) groups.set(`${k} (${ls.length})`, ls);
  for (const l of layers) groups.set(l.name, [l]);

  const relation = att.relation || "image->text";
  const queries = relation === "image->image" && att.queries
    ? att.queries.map((q, i) => ({ word: q.label, positions: [i], point: q.point }))
    : null; // image→image: axis 1 of every map is the selected queries
  const words = queries
    || (att.words.length ? att.words : att.tokens.map((t, i) => ({ word: `#${i} ${t}`, positions: [i] })));
  const tokens = queries || att.tokens.map((t, i) => ({ word: `${i}: ${t}`, positions: [i] }));
  const state = {
    mode: "words",
    word: null,
    positions: null,
    from: 0,
    to: Math.max(S - 1, 0),
    layer: ALL,
    opacity: att.opacity ?? 0.5,
    frame: F && Number.isInteger(model.get("frame")) ? Math.max(0, Math.min(F - 1, model.get("frame"))) : 0,
  };
  const pick = (label) => words.find((w) => w.word === label) || tokens.find((w) => w.word === label);
  const start = pick(model.get("word")) || pick(att.default_word) || words[0];
  state.word = start.word;
  state.positions = start.positions;

  // the image under the maps, at the display size (nearest neighbour), per frame
  const bases = [];
  const baseOf = (f) => {
    if (!images) return null;
    if (!bases[f]) {
      const off = canvas(DH, DW).getContext("2d");
      off.imageSmoothingEnabled = false;
      off.drawImage(atFrame(images, f), 0, 0, DW, DH);
      bases[f] = off.getImageData(0, 0, DW, DH);
    }
    return bases[f];
  };

  const cv = canvas(DH, DW, "sdx-attention-image", false);
  const ctx = cv.getContext("2d");
  const out = ctx.createImageData(DW, DH);
  const big = new Float32Array(DH * DW);
  const caption = h("div", { class: "sdx-caption" });
  const note = h("div", { class: "sdx-note" });

  // the map (h, w) of the selected positions, steps and layers, and its size
  function lowRes() {
    const ps = state.positions;
    const pre = F ? [state.frame] : [];
    const group = groups.get(state.layer);
    const ranged = perStep && (state.from > 0 || state.to < S - 1);
    if (!group.length) {
      if (ranged) {
        const m = new Float32Array(perStep.h * perStep.w);
        const n = state.to - state.from + 1;
        for (let s = state.from; s <= state.to; s++) {
          for (const p of ps) perStep.addTo(m, perStep.index(...pre, s, p), 1 / n);
        }
        return [m, perStep.h, perStep.w];
      }
      const m = new Float32Array(LH * LW);
      for (const p of ps) aggregate.addTo(m, aggregate.index(...pre, p));
      return [m, LH, LW];
    }
    // one layer at its own size; several: each brought to the latent size, then averaged
    const per = group.map((l) => {
      const m = new Float32Array(l.maps.h * l.maps.w);
      for (const p of ps) l.maps.addTo(m, l.maps.index(...pre, p));
      return [m, l.maps.h, l.maps.w];
    });
    if (per.length === 1) return per[0];
    const mean = new Float32Array(LH * LW);
    const tmp = new Float32Array(LH * LW);
    for (const [m, mh, mw] of per) {
      resize(m, mh, mw, LH, LW, tmp);
      for (let i = 0; i < mean.length; i++) mean[i] += tmp[i] / per.length;
    }
    return [mean, LH, LW];
  }

  function stepLabel() {
    if (!perStep) return "all steps";
    const ts = att.timesteps || [];
    const t = ts.length ? ` (t ${Math.round(ts[state.from])}→${Math.round(ts[state.to])})` : "";
    return state.from === 0 && state.to === S - 1 ? `all ${S} steps` : `steps ${state.from + 1}–${state.to + 1}${t}`;
  }

  function paint() {
    const [m, mh, mw] = lowRes();
    resize(m, mh, mw, DH, DW, big);
    paintHeat(out, big, lut, baseOf(state.frame), state.opacity);
    ctx.putImageData(out, 0, 0);
    const at = queries && pick(state.word);
    if (at) markPoint(at.point);
    caption.textContent =
      (queries ? state.word : `“${state.word}”`) + ` · ${stepLabel()} · ${state.layer}` +
      (F ? ` · frame ${state.frame + 1} / ${F}` : "");
    const ranged = perStep && (state.from > 0 || state.to < S - 1);
    note.textContent =
      state.layer !== ALL && ranged
        ? "The step range applies to all layers only: per-step maps per layer are not kept."
        : !perStep
          ? "Per-step maps were not recorded: the maps average the whole run."
          : "";
  }

  // the query point of an image→image map: a ring, white over black so it shows on any colour
  function markPoint([y, x]) {
    const [cy, cx, r] = [y * DH, x * DW, Math.max(4, Math.round(Math.min(DH, DW) / 40))];
    for (const [colour, width] of [["#000", 4], ["#fff", 2]]) {
      ctx.beginPath();
      ctx.arc(cx, cy, r, 0, 2 * Math.PI);
      ctx.strokeStyle = colour;
      ctx.lineWidth = width;
      ctx.stroke();
    }
  }

  // ---- controls
  const direction = h("div", {
    class: "sdx-relation",
    style: "margin: 4px 0; font-size: 12px; color: #555",
    "data-relation": relation,
    text: {
      "image->text": "image → text: how much each pixel of the image attends to the word",
      "text->image": "text → image: where the word's queries look in the image",
      "image->image": "image → image: where the marked point's query looks in the image",
    }[relation] || relation,
  });
  const chips = h("div", { class: "sdx-chips sdx-word-buttons" });
  function fillChips() {
    const list = state.mode === "words" ? words : tokens;
    chips.replaceChildren(
      ...list.map((w) =>
        h("button", {
          type: "button",
          class: `sdx-chip${w.word === state.word ? " sdx-active" : ""}`,
          text: state.mode === "words" ? w.word : w.word.replace(/^\d+: /, ""),
          title: `key position${w.positions.length > 1 ? "s" : ""} ${w.positions.join(", ")}`,
          "data-word": w.word,
          onclick: () => select(w),
        }),
      ),
    );
  }
  function select(w) {
    state.word = w.word;
    state.positions = w.positions;
    for (const b of chips.children) b.classList.toggle("sdx-active", b.dataset.word === w.word);
    if (queryMenu) queryMenu.value = w.word;
    paint();
    tell(model, "word", w.word);
  }
  const modeBox = h("select", { class: "sdx-token-mode" }, h("option", { value: "words", text: "words" }), h("option", { value: "tokens", text: "every token" }));
  modeBox.addEventListener("change", () => {
    state.mode = modeBox.value;
    fillChips();
  });
  let rows;
  let queryMenu = null;
  if (queries) {
    // image→image: one menu of the recorded queries, in the recorder's order
    const menu = h("select", { class: "sdx-query" }, queries.map((q) => h("option", { value: q.word, text: q.word })));
    menu.value = state.word;
    menu.addEventListener("change", () => select(pick(menu.value)));
    queryMenu = menu;
    const label = h("label", { class: "sdx-control" }, h("span", { class: "sdx-label", text: "query" }), menu);
    rows = [direction, h("div", { class: "sdx-controls" }, label)];
  } else {
    rows = [direction, h("div", { class: "sdx-controls" }, modeBox, chips)];
  }
  const row2 = [];
  if (perStep) {
    const a = slider("from step", 0, S - 1, state.from, (v) => {
      state.from = v;
      if (state.to < v) b.input.value = state.to = v;
      paint();
    }, "sdx-step-from");
    const b = slider("to step", 0, S - 1, state.to, (v) => {
      state.to = v;
      if (state.from > v) a.input.value = state.from = v;
      paint();
    }, "sdx-step-to");
    row2.push(a.box, b.box);
  }
  if (groups.size > 1) {
    const menu = h("select", { class: "sdx-layer" }, [...groups.keys()].map((k) => h("option", { value: k, text: k })));
    menu.addEventListener("change", () => {
      state.layer = menu.value;
      paint();
    });
    row2.push(h("label", { class: "sdx-control" }, h("span", { class: "sdx-label", text: "layers" }), menu));
  }
  if (images) {
    row2.push(
      slider("opacity", 0, 1, state.opacity, (v) => {
        state.opacity = v;
        paint();
      }, "sdx-opacity", 0.05).box,
    );
  }
  if (F) {
    row2.push(
      slider("frame", 0, F - 1, state.frame, (v) => {
        state.frame = v;
        paint();
        tell(model, "frame", v);
      }, "sdx-frame-slider").box,
    );
  }
  if (row2.length) rows.push(h("div", { class: "sdx-controls" }, row2));
  fillChips();
  const root = h("div", { class: "sdx-explorer sdx-attention" }, rows, caption, cv, note);
  el.replaceChildren(root);
  paint();
  return {
    root,
    selectWord(label) {
      const w = pick(label);
      if (w && w.word !== state.word) select(w);
    },
  };
}

export default {
  render: ({ model, el }) => mountExplorer(model, el, build, { word: (view, word) => view.selectWord(word) }),
};
