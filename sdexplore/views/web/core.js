// core.js: what every sdexplore explorer shares. Decodes the payload that sdexplore.views.pages writes
// (base64 → bytes → typed arrays, deflated map blocks, PNG/WebP images), colours maps with the matplotlib colour
// map embedded in the payload, draws on canvases, and shows an error box instead of a blank.
//
// Loaded as an ES module; pages.py inlines it once into a page (its `export` keywords dropped) and prepends it to
// each explorer's module for anywidget. No network, no dependency: DecompressionStream, createImageBitmap and
// canvas only.

export const PAYLOAD_FORMAT = "sdexplore.page";
export const PAYLOAD_VERSION = 1;

// ---------------------------------------------------------------------------------------------- checksum
// FNV-1a (32 bit) over the payload text's bytes (the text is ASCII: pages.py writes JSON with ensure_ascii).
// pages.fnv1a32 computes the same number in Python. It detects damage, it is no signature.
export function fnv1a32(text) {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i) & 0xff;
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h.toString(16).padStart(8, "0");
}

export class PayloadError extends Error {}

// The payload from a page's <script type="application/json"> text, checked: its checksum, its JSON, its format.
export function parsePayload(text, checksum) {
  if (checksum) {
    const got = fnv1a32(text);
    if (got !== checksum) {
      throw new PayloadError(
        `This page's data is damaged (checksum ${got}, expected ${checksum}): it was changed or cut off after ` +
          "sdexplore wrote it. Save the page again with save_html().",
      );
    }
  }
  let payload;
  try {
    payload = JSON.parse(text);
  } catch (e) {
    throw new PayloadError(`This page's data is not readable JSON (${e.message}). Save the page again.`);
  }
  return checkPayload(payload);
}

export function checkPayload(payload) {
  if (!payload || payload.format !== PAYLOAD_FORMAT) {
    throw new PayloadError("This is not an sdexplore page payload (no format 'sdexplore.page').");
  }
  if (payload.version > PAYLOAD_VERSION) {
    throw new PayloadError(
      `This payload is version ${payload.version}; this page reads version ${PAYLOAD_VERSION}. Update sdexplore.`,
    );
  }
  return payload;
}

// ---------------------------------------------------------------------------------------------- bytes
export function b64bytes(s) {
  const bin = atob(s);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

export async function inflate(bytes) {
  // zlib-wrapped deflate, as Python's zlib.compress writes it
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function float32s(s, n, what) {
  const bytes = b64bytes(s);
  if (bytes.length !== 4 * n) throw new PayloadError(`${what}: ${bytes.length / 4} values, expected ${n}`);
  return new Float32Array(bytes.buffer, bytes.byteOffset, n); // little-endian, as numpy writes '<f4'
}

// A block of maps: shape [...lead, h, w], one uint8 map per lead index with its own (lo, hi):
// value = lo + q / 255 · (hi − lo). Returns {shape, h, w, count, map(i) → Float32Array(h·w)}.
export async function loadMaps(block, what = "maps") {
  if (!block || !Array.isArray(block.shape) || block.shape.length < 2) {
    throw new PayloadError(`${what}: not a block of maps (no shape)`);
  }
  const shape = block.shape;
  const h = shape[shape.length - 2];
  const w = shape[shape.length - 1];
  const count = shape.slice(0, -2).reduce((a, b) => a * b, 1);
  let q;
  try {
    q = b64bytes(block.data);
    if (block.codec === "deflate") q = await inflate(q);
  } catch (e) {
    throw new PayloadError(`${what}: the map data does not decode (${e.message || e})`);
  }
  if (q.length !== count * h * w) {
    throw new PayloadError(`${what}: ${q.length} values, expected ${count * h * w} for shape [${shape}]`);
  }
  if (block.delta !== undefined && block.delta !== null) {
    // codes stored as differences along axis `delta` (mod 256): sum them back
    const k = block.delta;
    const n = shape[k];
    const inner = shape.slice(k + 1).reduce((a, b) => a * b, 1);
    const outer = shape.slice(0, k).reduce((a, b) => a * b, 1);
    for (let o = 0; o < outer; o++) {
      for (let i = 1; i < n; i++) {
        const at = (o * n + i) * inner;
        const before = at - inner;
        for (let j = 0; j < inner; j++) q[at + j] = (q[at + j] + q[before + j]) & 255;
      }
    }
  }
  const lo = float32s(block.lo, count, `${what}.lo`);
  const hi = float32s(block.hi, count, `${what}.hi`);
  const hw = h * w;
  return {
    shape,
    h,
    w,
    count,
    // the flat index of a map from its lead indices (row-major)
    index(...idx) {
      let k = 0;
      for (let d = 0; d < idx.length; d++) k = k * shape[d] + idx[d];
      return k;
    },
    // add scale · map k into out (Float32Array(h·w))
    addTo(out, k, scale = 1) {
      const a = lo[k];
      const s = (scale * (hi[k] - lo[k])) / 255;
      const off = k * hw;
      for (let i = 0; i < hw; i++) out[i] += scale * a + s * q[off + i];
      return out;
    },
  };
}

// One image of the payload ({mime, data}) → ImageBitmap. Decoded from bytes, so a canvas it is drawn on stays
// readable (getImageData) even on file:// pages.
export async function loadImage(image, what = "image") {
  if (!image || typeof image.data !== "string") throw new PayloadError(`${what}: no image data`);
  try {
    return await createImageBitmap(new Blob([b64bytes(image.data)], { type: image.mime }));
  } catch (e) {
    throw new PayloadError(`${what}: the ${image.mime} image does not decode (${e.message || e})`);
  }
}

// An image or, with a frames axis, a list of images (one per frame): the one of `frame`.
export function atFrame(x, frame) {
  return Array.isArray(x) ? x[Math.min(frame, x.length - 1)] : x;
}

// ---------------------------------------------------------------------------------------------- colour
// The payload's colour map: 256 RGB entries (base64 of 768 bytes) computed from matplotlib when it was saved.
export function colourTable(payload, entry) {
  const lut = b64bytes((entry || payload.colormap).lut);
  if (lut.length !== 768) throw new PayloadError(`colormap: ${lut.length} bytes, expected 768`);
  return lut;
}

// Bilinear resampling tables for (h, w) → (H, W), align_corners = False (torch's F.interpolate, which
// sdexplore.heatmaps.resize uses when it enlarges a map).
const _tables = new Map();
function axisTable(n, N) {
  const i0 = new Int32Array(N);
  const i1 = new Int32Array(N);
  const t = new Float32Array(N);
  const scale = n / N;
  for (let x = 0; x < N; x++) {
    let s = (x + 0.5) * scale - 0.5;
    if (s < 0) s = 0;
    let a = Math.floor(s);
    if (a > n - 1) a = n - 1;
    i0[x] = a;
    i1[x] = Math.min(a + 1, n - 1);
    t[x] = s - a;
  }
  return { i0, i1, t };
}
export function resize(src, h, w, H, W, out) {
  const key = `${h},${w},${H},${W}`;
  let tab = _tables.get(key);
  if (!tab) _tables.set(key, (tab = { y: axisTable(h, H), x: axisTable(w, W) }));
  out = out || new Float32Array(H * W);
  const { y, x } = tab;
  for (let r = 0; r < H; r++) {
    const r0 = y.i0[r] * w;
    const r1 = y.i1[r] * w;
    const ty = y.t[r];
    const o = r * W;
    for (let c = 0; c < W; c++) {
      const c0 = x.i0[c];
      const c1 = x.i1[c];
      const tx = x.t[c];
      const top = src[r0 + c0] + (src[r0 + c1] - src[r0 + c0]) * tx;
      const bot = src[r1 + c0] + (src[r1 + c1] - src[r1 + c0]) * tx;
      out[o + c] = top + (bot - top) * ty;
    }
  }
  return out;
}

// Colour a map (min-max over its own values, as sdexplore.views.render.heat_overlay does) into `image`
// (an ImageData of the same size), blended over `base` (ImageData or null) with `opacity`.
// `range` ({lo, hi}): fixed ends of the colour map instead (heat_overlay's vmin / vmax).
export function paintHeat(image, heat, lut, base, opacity, range) {
  let lo = Infinity;
  let hi = -Infinity;
  if (range) {
    ({ lo, hi } = range);
  } else {
    for (let i = 0; i < heat.length; i++) {
      const v = heat[i];
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
  }
  const k = 255 / Math.max(hi - lo, 1e-12);
  const d = image.data;
  const b = base ? base.data : null;
  const a = base ? opacity : 1;
  for (let i = 0, p = 0; i < heat.length; i++, p += 4) {
    let j = ((heat[i] - lo) * k + 0.5) | 0;
    j = j < 0 ? 0 : j > 255 ? 255 : j;
    const l = 3 * j;
    if (b) {
      d[p] = b[p] + a * (lut[l] - b[p]);
      d[p + 1] = b[p + 1] + a * (lut[l + 1] - b[p + 1]);
      d[p + 2] = b[p + 2] + a * (lut[l + 2] - b[p + 2]);
    } else {
      d[p] = lut[l];
      d[p + 1] = lut[l + 1];
      d[p + 2] = lut[l + 2];
    }
    d[p + 3] = 255;
  }
  return { lo, hi };
}

// The display size of an (h, w) picture: enlarged by the whole factor that brings its short side to `min`
// (nearest neighbour, as sdexplore.views.render.upscale), never shrunk.
export function displaySize(h, w, min) {
  const k = Math.max(1, Math.ceil(min / Math.min(h, w)));
  return [h * k, w * k];
}

// ---------------------------------------------------------------------------------------------- DOM
export function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c);
  return e;
}

export function canvas(H, W, cls, pixelated = true) {
  const c = h("canvas", { class: `sdx-canvas ${cls || ""}`, width: W, height: H });
  if (pixelated) c.classList.add("sdx-pixelated");
  return c;
}

// Draw a bitmap onto a canvas filling it (nearest neighbour: each latent cell a crisp square).
export function drawBitmap(cv, bitmap) {
  const ctx = cv.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.clearRect(0, 0, cv.width, cv.height);
  if (bitmap) ctx.drawImage(bitmap, 0, 0, cv.width, cv.height);
}

// A range input with a label; onInput(value) on every move.
export function slider(label, min, max, value, onInput, cls, step = 1) {
  const input = h("input", { type: "range", min, max, step, value, class: `sdx-slider ${cls || ""}` });
  input.addEventListener("input", () => onInput(Number(input.value)));
  const box = h("label", { class: "sdx-control" }, h("span", { class: "sdx-label", text: label }), input);
  return { box, input };
}

// A play/pause button that calls tick() every 1000/fps ms while playing.
export function player(tick, fps = 8) {
  let timer = null;
  const button = h("button", { class: "sdx-play", type: "button", title: "play / pause", text: "▶" });
  const stop = () => {
    if (timer) clearInterval(timer);
    timer = null;
    button.textContent = "▶";
  };
  const start = () => {
    stop();
    timer = setInterval(() => {
      if (tick() === false) stop();
    }, 1000 / state.fps);
    button.textContent = "⏸";
  };
  const state = {
    button,
    fps,
    stop,
    start,
    get playing() {
      return timer !== null;
    },
    setFps(f) {
      state.fps = f;
      if (timer) start();
    },
  };
  button.addEventListener("click", () => (timer ? stop() : start()));
  return state;
}

// A small line chart (SVG): curves [{label, values, colour}], a movable marker. Returns {svg, mark(i)}.
export function lineChart(curves, { width = 420, height = 110, xlabel = "", highlight = [] } = {}) {
  const NS = "http://www.w3.org/2000/svg";
  const L = 40, R = 8, T = 8, B = 22;
  const pw = width - L - R;
  const ph = height - T - B;
  const ys = curves.flatMap((c) => c.values).filter((v) => Number.isFinite(v));
  let lo = ys.length ? Math.min(...ys) : 0;
  let hi = ys.length ? Math.max(...ys) : 1;
  if (hi - lo < 1e-12) [lo, hi] = [lo - 0.5, hi + 0.5];
  const n = Math.max(1, ...curves.map((c) => c.values.length));
  const px = (i) => L + (pw * i) / Math.max(n - 1, 1);
  const py = (y) => T + ph * (1 - (y - lo) / (hi - lo));
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("class", "sdx-chart");
  const add = (tag, attrs, text) => {
    const e = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  add("rect", { x: L, y: T, width: pw, height: ph, fill: "none", stroke: "#ccc" });
  const fmt = (v) => (v !== 0 && Math.abs(v) < 1e-2 ? v.toExponential(1) : String(Number(v.toPrecision(3))));
  add("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, fmt(hi));
  add("text", { x: L - 4, y: T + ph, "text-anchor": "end" }, fmt(lo));
  add("text", { x: L + pw / 2, y: height - 4, "text-anchor": "middle" }, xlabel);
  curves.forEach((c, k) => {
    const pts = c.values.map((v, i) => `${px(i).toFixed(1)},${py(v).toFixed(1)}`).join(" ");
    add("polyline", { points: pts, fill: "none", stroke: c.colour, "stroke-width": 1.5 });
    add("text", { x: L + 4, y: T + 10 + 11 * k, fill: c.colour }, c.label);
    for (const i of highlight) {
      if (i >= 0 && i < c.values.length) add("circle", { cx: px(i), cy: py(c.values[i]), r: 3, fill: "#d62728" });
    }
  });
  const marker = add("line", { x1: L, y1: T, x2: L, y2: T + ph, stroke: "#333", "stroke-dasharray": "3,2" });
  return {
    svg,
    mark(i) {
      const x = px(i).toFixed(1);
      marker.setAttribute("x1", x);
      marker.setAttribute("x2", x);
    },
  };
}

// ---------------------------------------------------------------------------------------------- errors
export function errorBox(el, message) {
  const box = h(
    "div",
    { class: "sdx-error", role: "alert" },
    h("b", { text: "sdexplore could not show this view. " }),
    h("span", { text: String(message) }),
  );
  el.replaceChildren(box);
  return box;
}

// Run an explorer's render, turning any failure into the error box (never a blank view).
export async function guard(el, fn) {
  try {
    return await fn();
  } catch (e) {
    console.error(e);
    errorBox(el, e instanceof PayloadError ? e.message : `${e.name || "Error"}: ${e.message || e}`);
    return undefined;
  }
}

/**
 * The anywidget render of an explorer: build its view, rebuild it on a new payload, and hand each trait in
 * `traits` (name → (view, value) => void) to the view when Python sets it. Returns the teardown that undoes all of
 * it and stops the view's player if it has one.
 */
export async function mountExplorer(model, el, build, traits = {}) {
  let view = await guard(el, () => build(model, el));
  const stop = () => view && view.stop && view.stop();
  const handlers = Object.entries(traits).map(([name, set]) => [
    `change:${name}`,
    () => view && set(view, model.get(name)),
  ]);
  handlers.push([
    "change:payload",
    async () => {
      stop();
      view = await guard(el, () => build(model, el));
    },
  ]);
  for (const [event, handler] of handlers) model.on(event, handler);
  return () => {
    stop();
    for (const [event, handler] of handlers) model.off(event, handler);
  };
}

// The payload a model holds (anywidget: the `payload` trait; a page: its embedded payload), checked.
export function payloadOf(model) {
  const p = model.get("payload");
  if (typeof p === "string") return parsePayload(p, model.get("checksum"));
  return checkPayload(p);
}

// Tell the model a control moved (anywidget syncs it back to Python; a page's model keeps it).
export function tell(model, name, value) {
  try {
    model.set(name, value);
    if (model.save_changes) model.save_changes();
  } catch (_) {
    // a read-only model: nothing to tell
  }
}

export function provenanceLine(p) {
  const v = p.provenance || {};
  const parts = [];
  if (v.model) parts.push(`model ${v.model}`);
  if (v.family) parts.push(v.family);
  if (v.scheduler) parts.push(v.scheduler);
  if (v.seed !== undefined && v.seed !== null) parts.push(`seed ${v.seed}`);
  if (v.sdexplore) parts.push(`sdexplore ${v.sdexplore}`);
  if (v.date) parts.push(v.date);
  return parts.join(" · ");
}
