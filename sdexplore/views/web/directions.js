// directions.js: move along each direction with its own strength slider (sdexplore DirectionExplorer without a
// kernel): one row per direction, its frames rendered beforehand at strengths −s…s (Direction.walk).
//
// Model traits read (anywidget names; a page's model serves them from its embedded payload):
//   payload  object  the page payload (sdexplore.views.payload.directions_payload); needs payload.directions
// Listens to change:payload (rebuilds).
import { canvas, displaySize, drawBitmap, h, loadImage, mountExplorer, payloadOf, slider } from "./core.js";

const signed = (s) => (s >= 0 ? "+" : "−") + Math.abs(s).toFixed(2);

async function build(model, el) {
  const payload = payloadOf(model);
  const block = payload.directions;
  if (!block || !block.rows || !block.rows.length) throw new Error("This result has no directions to explore.");
  const rows = await Promise.all(
    block.rows.map(async (row, r) => {
      const bitmaps = await Promise.all(
        row.images.map((im, i) => loadImage(im, `directions.rows[${r}].images[${i}]`)),
      );
      const [H, W] = displaySize(bitmaps[0].height, bitmaps[0].width, 192);
      const cv = canvas(H, W, "sdx-direction-image");
      const info = h("span", { class: "sdx-info sdx-direction-strength" });
      const show = (i) => {
        drawBitmap(cv, bitmaps[i]);
        info.textContent = `strength ${signed(row.strengths[i])}`;
      };
      const start = Math.max(0, Math.min(row.images.length - 1, row.start || 0));
      const control = slider("strength", 0, row.images.length - 1, start, show, "sdx-direction-slider");
      show(start);
      return h(
        "div",
        { class: "sdx-direction", "data-direction": row.name },
        h("b", { text: row.name }),
        h("div", { class: "sdx-controls" }, control.box, info),
        cv,
      );
    }),
  );
  const root = h("div", { class: "sdx-explorer sdx-direction-explorer" }, h("div", { class: "sdx-directions" }, rows));
  el.replaceChildren(root);
}

export default {
  render: ({ model, el }) => mountExplorer(model, el, build),
};
