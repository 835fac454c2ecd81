// edit.js: what an attention edit changed (sdexplore.EditExplorer without a kernel): the source and edited images
// and their difference; for a word, its attention map before the edit (over the source) and after (over the edited
// image) on one colour scale from 0 to the larger peak (raw attention mass: an ablated word's map after is the
// bottom of the scale), and after − before on a diverging scale (red: gained, blue: lost).
//
// Model traits read (anywidget names; a page's model serves them from its embedded payload):
//   payload  object  the page payload (sdexplore.views.payload.edit_payload); needs payload.edit
//   word     string  optional: the word to open on (default: payload.edit.default_word); written back
// Listens to change:payload (rebuilds) and change:word (selects that word).
import {
  canvas,
  colourTable,
  displaySize,
  drawBitmap,
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

async function build(model, el) {
  const payload = payloadOf(model);
  const edit = payload.edit;
  if (!edit) throw new Error("This result is not an attention edit.");
  const lut = colourTable(payload);
  const diffLut = colourTable(payload, edit.diff_colormap);
  const [source, edited, difference] = await Promise.all(
    ["source", "edited", "difference"].map((k) => loadImage(edit[k], `edit.${k}`)),
  );
  const [DH, DW] = displaySize(source.height, source.width, 256);
  const pictures = [
    ["source", source],
    ["edited", edited],
    ["|edited − source|", difference],
  ].map(([title, bitmap]) => {
    const cv = canvas(DH, DW, `sdx-edit-${title.startsWith("|") ? "difference" : title}`);
    drawBitmap(cv, bitmap);
    return h("figure", { class: "sdx-panel" }, h("figcaption", { text: title }), cv);
  });
  const rows = [
    h("div", { class: "sdx-info" }, h("code", { text: edit.source_prompt }), " → ", h("code", { text: edit.edited_prompt })),
    h("div", { class: "sdx-panels" }, pictures),
  ];
  let view = { selectWord() {} };
  if (edit.after) {
    const before = await loadMaps(edit.before, "edit.before");
    const after = await loadMaps(edit.after, "edit.after");
    const words = edit.words;
    const baseOf = (bitmap) => {
      const ctx = canvas(DH, DW).getContext("2d");
      ctx.imageSmoothingEnabled = false;
      ctx.drawImage(bitmap, 0, 0, DW, DH);
      return ctx.getImageData(0, 0, DW, DH);
    };
    const bases = [baseOf(source), baseOf(edited)];
    const panels = ["sdx-edit-before", "sdx-edit-after", "sdx-edit-delta"].map((cls) => canvas(DH, DW, cls, false));
    const titles = ["map before (source)", "map after (edited)", "after − before (red: gained)"];
    const images = panels.map((cv) => cv.getContext("2d").createImageData(DW, DH));
    const big = [new Float32Array(DH * DW), new Float32Array(DH * DW), new Float32Array(DH * DW)];
    const caption = h("div", { class: "sdx-caption sdx-edit-caption" });
    const state = { k: 0, opacity: edit.opacity ?? 0.5 };
    const find = (w) => words.findIndex((x) => x.word === w);
    state.k = Math.max(0, find(model.get("word")) >= 0 ? find(model.get("word")) : find(edit.default_word));

    function paint() {
      const k = state.k;
      const w = words[k];
      const hw = before.h * before.w;
      const b = w.has_before ? before.addTo(new Float32Array(hw), k) : new Float32Array(hw);
      const a = after.addTo(new Float32Array(after.h * after.w), k);
      let top = 0;
      for (let i = 0; i < hw; i++) top = Math.max(top, a[i], b[i]);
      top = top || 1;
      const d = a.map((v, i) => v - b[i]);
      resize(b, before.h, before.w, DH, DW, big[0]);
      resize(a, after.h, after.w, DH, DW, big[1]);
      resize(d, after.h, after.w, DH, DW, big[2]);
      paintHeat(images[0], big[0], lut, bases[0], w.has_before ? state.opacity : 0, { lo: 0, hi: top });
      paintHeat(images[1], big[1], lut, bases[1], state.opacity, { lo: 0, hi: top });
      paintHeat(images[2], big[2], diffLut, null, 1, { lo: -top, hi: top });
      panels.forEach((cv, i) => cv.getContext("2d").putImageData(images[i], 0, 0));
      const mean = (m) => m.reduce((s, v) => s + v, 0) / m.length;
      caption.textContent =
        `“${w.word}”${w.changed ? " (edited)" : ""}: mean attention mass before ` +
        `${w.has_before ? mean(b).toFixed(4) : "— (not in the source)"}, after ${mean(a).toFixed(4)}`;
    }
    const menu = h(
      "select",
      { class: "sdx-edit-word" },
      words.map((w, i) => h("option", { value: i, text: w.word + (w.changed ? " (edited)" : "") })),
    );
    menu.value = String(state.k);
    menu.addEventListener("change", () => {
      state.k = Number(menu.value);
      paint();
      tell(model, "word", words[state.k].word);
    });
    const opacity = slider("opacity", 0, 1, state.opacity, (v) => {
      state.opacity = v;
      paint();
    }, "sdx-opacity", 0.05);
    rows.push(
      h("div", { class: "sdx-controls" }, h("label", { class: "sdx-control" }, h("span", { class: "sdx-label", text: "word" }), menu), opacity.box),
      caption,
      h("div", { class: "sdx-panels" }, panels.map((cv, i) => h("figure", { class: "sdx-panel" }, h("figcaption", { text: titles[i] }), cv))),
    );
    paint();
    view = {
      selectWord(word) {
        const k = find(word);
        if (k >= 0 && k !== state.k) {
          state.k = k;
          menu.value = String(k);
          paint();
        }
      },
    };
  } else {
    rows.push(h("div", { class: "sdx-note", text: "This edit kept no attention maps (attention=False)." }));
  }
  el.replaceChildren(h("div", { class: "sdx-explorer sdx-edit-explorer" }, rows));
  return view;
}

export default {
  render: ({ model, el }) => mountExplorer(model, el, build, { word: (view, word) => view.selectWord(word) }),
};
