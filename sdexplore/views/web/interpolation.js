// interpolation.js: scrub through frames interpolated between prompts and seeds (sdexplore.InterpolationExplorer
// without a kernel): one walk, or several of one frame count side by side on one slider (payload.walk.compare),
// with the distance between consecutive frames (largest jumps as red dots), a marker at the frame, and each
// walk's smoothness (1 − Gini of the distances: 1 = perfectly even steps).
//
// Model traits read (anywidget names; a page's model serves them from its embedded payload):
//   payload  object  the page payload (payload.walk_payload or walks_payload); needs payload.walk
//   frame    int     optional: the frame to open on (default 0); written back as the user moves
// Listens to change:payload (rebuilds) and change:frame (moves the slider).
import {
  canvas,
  displaySize,
  drawBitmap,
  h,
  lineChart,
  loadImage,
  mountExplorer,
  payloadOf,
  slider,
  tell,
} from "./core.js";

const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"];

async function build(model, el) {
  const payload = payloadOf(model);
  const walk = payload.walk;
  if (!walk || !walk.count) throw new Error("This result has no walk frames to scrub.");
  const N = walk.count;
  const walks = walk.compare || [
    { name: "walk", images: walk.images, distances: walk.distances, smoothness: walk.smoothness },
  ];
  const loaded = await Promise.all(
    walks.map(async (w) => ({
      ...w,
      bitmaps: await Promise.all(w.images.map((im, i) => loadImage(im, `${w.name}.images[${i}]`))),
    })),
  );
  const [H, W] = displaySize(loaded[0].bitmaps[0].height, loaded[0].bitmaps[0].width, 256);
  const panels = loaded.map((w) => {
    const cv = canvas(H, W, "sdx-interp-image");
    return { w, cv, box: h("figure", { class: "sdx-panel" }, h("figcaption", { text: w.name }), cv) };
  });
  const smooth = (s) => (s === null || s === undefined ? "n/a" : s.toFixed(2));
  const chart = lineChart(
    loaded.map((w, k) => ({
      label: `${w.name}: 1−Gini ${smooth(w.smoothness)}`,
      values: w.distances,
      colour: COLOURS[k % COLOURS.length],
    })),
    { xlabel: "distance from frame i to i+1", width: Math.max(420, panels.length * (W + 12)), highlight: loaded.length === 1 ? walk.jumps : [] },
  );
  const info = h("div", { class: "sdx-info" });
  let frame = Number.isInteger(model.get("frame")) ? Math.max(0, Math.min(N - 1, model.get("frame"))) : 0;
  function show(i) {
    frame = i;
    for (const p of panels) drawBitmap(p.cv, p.w.bitmaps[i]);
    info.textContent = walk.labels[i];
    chart.mark(Math.min(i, Math.max(N - 2, 0)));
  }
  const frameSlider = slider("frame", 0, N - 1, frame, (v) => {
    show(v);
    tell(model, "frame", v);
  }, "sdx-frame-slider");
  const root = h(
    "div",
    { class: "sdx-explorer sdx-interpolation-explorer" },
    h("div", { class: "sdx-controls" }, frameSlider.box),
    info,
    h("div", { class: "sdx-panels" }, panels.map((p) => p.box)),
    chart.svg,
  );
  el.replaceChildren(root);
  show(frame);
  return {
    setFrame(v) {
      if (Number.isInteger(v) && v >= 0 && v < N && v !== frame) {
        frameSlider.input.value = v;
        show(v);
      }
    },
  };
}

export default {
  render: ({ model, el }) => mountExplorer(model, el, build, { frame: (view, frame) => view.setFrame(frame) }),
};
