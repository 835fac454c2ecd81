// walk.js: play a rendered walk frame by frame (sdexplore.WalkPlayer without a kernel): play/pause, a frame slider,
// a speed slider, and where each frame lies between the keyframes (prompt, seed, t).
//
// Model traits read (anywidget names; a page's model serves them from its embedded payload):
//   payload  object  the page payload (sdexplore.views.pages / payload.walk_payload); needs payload.walk
//   frame    int     optional: the frame to open on (default 0); written back as the user moves
//   fps      number  optional: the playback speed (default payload.walk.fps); written back as the user moves
// Listens to change:payload (rebuilds) and change:frame (moves the slider).
import {
  canvas,
  displaySize,
  drawBitmap,
  h,
  loadImage,
  mountExplorer,
  payloadOf,
  player,
  slider,
  tell,
} from "./core.js";

async function build(model, el) {
  const payload = payloadOf(model);
  const walk = payload.walk;
  if (!walk || !walk.count) throw new Error("This result has no walk frames to play.");
  const N = walk.count;
  const bitmaps = await Promise.all(walk.images.map((im, i) => loadImage(im, `walk.images[${i}]`)));
  const [H, W] = displaySize(bitmaps[0].height, bitmaps[0].width, 256);
  const cv = canvas(H, W, "sdx-walk-image");
  const info = h("div", { class: "sdx-info" });
  let frame = Number.isInteger(model.get("frame")) ? Math.max(0, Math.min(N - 1, model.get("frame"))) : 0;

  function show(i) {
    frame = i;
    drawBitmap(cv, bitmaps[i]);
    info.textContent = walk.labels[i];
  }
  const frameSlider = slider("frame", 0, N - 1, frame, (v) => {
    show(v);
    tell(model, "frame", v);
  }, "sdx-walk-slider");
  const play = player(() => {
    const next = (frame + 1) % N;
    frameSlider.input.value = next;
    show(next);
    tell(model, "frame", next);
  }, model.get("fps") || walk.fps || 12);
  const speed = slider("fps", 1, 30, Math.round(play.fps), (v) => {
    play.setFps(v);
    tell(model, "fps", v);
  }, "sdx-fps");
  const root = h(
    "div",
    { class: "sdx-explorer sdx-walk-player" },
    h("div", { class: "sdx-controls" }, play.button, frameSlider.box, speed.box),
    info,
    cv,
  );
  el.replaceChildren(root);
  show(frame);
  return {
    stop: play.stop,
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
