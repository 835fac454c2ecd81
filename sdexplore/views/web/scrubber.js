// scrubber.js: the steps of one run (sdexplore.TimestepScrubber without a kernel). A slider and a play button
// over the recorded steps; per step, the panels the payload carries (noisy latents preview, predicted x0 preview,
// the VAE decode when it was recorded), the step's timestep, noise level and guidance, and the signal / noise
// curves with a marker at the step.
//
// Model traits read (anywidget names; a page's model serves them from its embedded payload):
//   payload  object  the page payload (sdexplore.views.pages.observation_payload); needs payload.steps
//   step     int     optional: the recorded step to open on (default: the last); written back as the user moves
//   frame    int     optional, with payload.frames: the video frame to open on; written back likewise
// Listens to change:payload (rebuilds) and change:step (moves the slider).
import {
  atFrame,
  canvas,
  displaySize,
  drawBitmap,
  h,
  lineChart,
  loadImage,
  mountExplorer,
  payloadOf,
  player,
  slider,
  tell,
} from "./core.js";

async function build(model, el) {
  const payload = payloadOf(model);
  const steps = payload.steps;
  if (!steps || !steps.count) throw new Error("This result has no recorded steps to scrub.");
  const S = steps.count;
  const F = payload.frames ? payload.frames.count : 0;
  // every panel image decoded once, up front: moving the slider only draws a bitmap
  const panels = await Promise.all(
    steps.panels.map(async (p) => ({
      ...p,
      bitmaps: await Promise.all(
        p.images.map((img, i) =>
          Array.isArray(img)
            ? Promise.all(img.map((f, j) => loadImage(f, `steps.${p.key}[${i}][${j}]`)))
            : loadImage(img, `steps.${p.key}[${i}]`),
        ),
      ),
    })),
  );
  const [H, W] = displaySize(steps.size[0], steps.size[1], 192);
  let step = Number.isInteger(model.get("step")) ? model.get("step") : S - 1;
  step = Math.max(0, Math.min(S - 1, step));
  let frame = F && Number.isInteger(model.get("frame")) ? Math.max(0, Math.min(F - 1, model.get("frame"))) : 0;

  const columns = panels.map((p) => {
    const cv = canvas(H, W, `sdx-panel-${p.key}`);
    return { p, cv, box: h("figure", { class: "sdx-panel" }, h("figcaption", { text: p.title }), cv) };
  });
  const info = h("div", { class: "sdx-info" });
  const total = steps.total || S;
  const sa = steps.alpha_bar.map((a) => Math.sqrt(a));
  // a flow model mixes x_t = (1 − σ) x0 + σ ε: its curves are those two weights, not √ᾱ and √(1−ᾱ)
  const curves = steps.flow_sigma
    ? [
        { label: "signal 1−σ", values: steps.flow_sigma.map((s) => 1 - s), colour: "#1f77b4" },
        { label: "noise σ", values: steps.flow_sigma, colour: "#d62728" },
      ]
    : [
        { label: "signal √ᾱ", values: sa, colour: "#1f77b4" },
        { label: "noise √(1−ᾱ)", values: steps.alpha_bar.map((a) => Math.sqrt(1 - a)), colour: "#d62728" },
      ];
  const chart = lineChart(
    curves,
    { xlabel: "recorded step", width: Math.max(360, columns.length * (W + 12)) },
  );

  function infoText(i) {
    const t = steps.timestep[i];
    const g = steps.guidance[i];
    let level;
    if (steps.flow_sigma) {
      level = `flow σ = ${steps.flow_sigma[i].toFixed(3)} (x_t = (1 − σ) x0 + σ ε)`;
    } else {
      const s = steps.sigma[i];
      const sig = s === null ? "∞" : Number(s).toPrecision(3);
      level = `signal √ᾱ = ${sa[i].toFixed(3)} · noise √(1−ᾱ) = ${Math.sqrt(1 - steps.alpha_bar[i]).toFixed(3)} · σ = ${sig}`;
    }
    const src = { scheduler: "x0 from the scheduler", computed: "x0 computed from the model output" }[
      steps.x0_source[i]
    ];
    return (
      `step ${steps.index[i] + 1} / ${total} · timestep t = ${Math.round(t)} · ${level} · guidance ${g}` +
      (src ? ` · ${src}` : "") +
      (F ? ` · frame ${frame + 1} / ${F}` : "")
    );
  }

  function show(i) {
    step = i;
    for (const c of columns) drawBitmap(c.cv, atFrame(c.p.bitmaps[i], frame));
    info.textContent = infoText(i);
    chart.mark(i);
  }

  const stepSlider = slider("step", 0, S - 1, step, (v) => {
    show(v);
    tell(model, "step", v);
  }, "sdx-step-slider");
  const play = player(() => {
    const next = (step + 1) % S;
    stepSlider.input.value = next;
    show(next);
    tell(model, "step", next);
  }, 8);
  const controls = [play.button, stepSlider.box];
  let frameSlider = null;
  if (F) {
    frameSlider = slider("frame", 0, F - 1, frame, (v) => {
      frame = v;
      show(step);
      tell(model, "frame", v);
    }, "sdx-frame-slider");
    controls.push(frameSlider.box);
  }
  const root = h(
    "div",
    { class: "sdx-explorer sdx-scrubber" },
    h("div", { class: "sdx-controls" }, controls),
    info,
    h("div", { class: "sdx-panels" }, columns.map((c) => c.box)),
    chart.svg,
  );
  el.replaceChildren(root);
  show(step);
  return {
    root,
    show,
    stop: play.stop,
    setStep(v) {
      if (Number.isInteger(v) && v >= 0 && v < S && v !== step) {
        stepSlider.input.value = v;
        show(v);
      }
    },
  };
}

export default {
  render: ({ model, el }) => mountExplorer(model, el, build, { step: (view, step) => view.setStep(step) }),
};
