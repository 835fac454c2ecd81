"""Self-contained pages: their size, and the time from a slider's input to the new frame painted, in Chromium.

Budgets (issue 32): the embedded model's observation page ≤ 1 MB; a 50-step SD-1.5-shaped observation with
previews and every token's maps ≤ 5 MB; slider input → painted ≤ 16 ms (one display frame at 60 Hz).

The SD-1.5-shaped observation is *synthesised with the exact shapes* (running SD-1.5-shaped weights for 50 steps
at 512² is minutes per step on this CPU): a 512² image; 50 steps of (1, 4, 64, 64) latents and x0 (their
previews are what the page stores); 77 tokens; the aggregate at 64²; per-step maps at 16² (the recorder's default
``step_resolution``); the 16 cross-attention layers at SD-1.5's resolutions (64² ×5, 32² ×5, 16² ×5, 8² ×1). Maps
are softmaxes over the 77 tokens of smooth random logits that drift over the steps, plus per-pixel noise, so that
they compress no better than recorded maps do; the embedded model's page is a real recording.

Latency: Playwright opens each page from file:// (every other request aborted); for each control, at a random
phase of the display frame, the input's value is set, an ``input`` event dispatched (the explorer paints its canvas
synchronously), and the time to the next ``requestAnimationFrame`` callback (the frame that shows it) is taken with
``performance.now()``; median of ``--moves`` (≥ 50) moves. The handler's own time (dispatch → return) is reported
beside it. ``--kernel`` measures two scrubbers inside JupyterLab: a small ipywidgets one defined in the benchmark's
notebook (an IntSlider and an Image whose observer sets that step's PNG from the kernel, as the explorers did
before the anywidget views: arrow key on the slider → the kernel's new PNG decoded → next frame), and the anywidget
TimestepScrubber (input → painted, as above).

    python benchmarks/bench_pages.py                 # sizes + latency, a table
    python benchmarks/bench_pages.py --kernel        # also both scrubbers in JupyterLab (starts JupyterLab)
    python benchmarks/run.py --only pages            # the same rows in run.py's table
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MB = 1_000_000
BUDGET_EMBEDDED = 1 * MB
BUDGET_SD15 = 5 * MB
BUDGET_MS = 16.0
PROMPT = "a big red circle at the top left on a blue background"
#: SD-1.5's 16 cross-attention layers and their map sides at 512² (down ×6, mid ×1, up ×9).
SD15_LAYERS = (
    [
        (f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2", 64 >> b)
        for b in range(3)
        for a in range(2)
    ]
    + [("mid_block.attentions.0.transformer_blocks.0.attn2", 8)]
    + [
        (f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2", 8 << b)
        for b in range(1, 4)
        for a in range(3)
    ]
)

# input → the next animation frame, at a random phase of the display frame; median of n moves
LATENCY_JS = """async ([selector, n]) => {
  const input = document.querySelector(selector);
  const lo = Number(input.min), hi = Number(input.max), step = Number(input.step || 1);
  const values = Math.round((hi - lo) / step) + 1;
  const frame = () => new Promise((r) => requestAnimationFrame(r));
  const wait = (ms) => new Promise((r) => setTimeout(r, ms));
  const total = [], handler = [];
  let v = Number(input.value);
  for (let i = 0; i < n; i++) {
    await frame();
    await wait(Math.random() * 16);
    v = lo + (((Math.round((v - lo) / step) + 1 + (i % 3)) % values) * step);
    input.value = v;
    const t0 = performance.now();
    input.dispatchEvent(new Event("input", { bubbles: true }));
    const t1 = performance.now();
    await frame();
    total.push(performance.now() - t0);
    handler.push(t1 - t0);
  }
  const med = (a) => a.slice().sort((x, y) => x - y)[Math.floor(a.length / 2)];
  return { total: med(total), handler: med(handler), n };
}"""


# ---------------------------------------------------------------------------------------------- observations
def embedded_observation() -> tuple[Any, Any]:
    """The embedded model's default recording (50 steps, steps + attention) and its image."""
    import sdexplore

    pipe = sdexplore.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with sdexplore.observe(pipe, attention=True) as obs:
        image = pipe(PROMPT, generator=torch.Generator().manual_seed(0)).images[0]
    return obs, image


def _smooth(g: torch.Generator, n: int, side: int, coarse: int = 4) -> torch.Tensor:
    """(n, side, side) smooth random fields: coarse × coarse noise, bicubically enlarged."""
    x = torch.randn(n, 1, coarse, coarse, generator=g)
    return torch.nn.functional.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)[:, 0]


def _softmax_maps(g: torch.Generator, logits: torch.Tensor, side: int, noise: float) -> torch.Tensor:
    """(T, side, side) maps that sum to 1 over the tokens: smooth logits at ``side``, plus per-pixel noise."""
    up = torch.nn.functional.interpolate(
        logits[None], size=(side, side), mode="bilinear", align_corners=False
    )[0]
    up = up + noise * torch.randn(up.shape, generator=g)
    return torch.softmax(3.0 * up, dim=0)  # (T, side, side)


def sd15_observation(steps: int = 50, tokens: int = 77) -> tuple[Any, np.ndarray]:
    """A synthetic observation with SD-1.5's exact shapes (see the module's docstring) and its 512² image."""
    from sdexplore.results import AttentionMaps, Observation, StepRecord, Trace
    from sdexplore.results.tokens import TokenList

    g = torch.Generator().manual_seed(0)
    # latents: x_t = √ᾱ x0 + √(1 − ᾱ) ε along SD's scaled-linear schedule, x0 a smooth random latent
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    abar = torch.cumprod(1 - betas, 0)
    ts = torch.linspace(999, 0, steps).round().long()
    x0 = _smooth(g, 4, 64, 8)[None]  # (1, 4, 64, 64)
    eps = torch.randn(1, 4, 64, 64, generator=g)
    records = []
    for i, t in enumerate(ts):
        a = float(abar[t])
        guess = x0 + (1 - a) ** 0.5 * 0.5 * torch.randn(1, 4, 64, 64, generator=g)  # x0 predictions sharpen
        records.append(
            StepRecord(
                index=i,
                timestep=float(t),
                sigma=((1 - a) / a) ** 0.5,
                alpha_bar=a,
                guidance_scale=7.5,
                x0_source="scheduler",
                latents=a**0.5 * x0 + (1 - a) ** 0.5 * eps,
                x0=guess,
            )
        )
    trace = Trace(steps=records, family="sd1", scheduler="DDIMScheduler", num_steps=steps, guidance_scale=7.5)
    # maps: smooth logits per token drifting from one field to another over the steps
    start, end = _smooth(g, tokens, 8), _smooth(g, tokens, 8)  # (T, 8, 8) logits
    per_step = torch.stack(
        [_softmax_maps(g, start + (end - start) * s / max(steps - 1, 1), 16, 0.3) for s in range(steps)]
    )  # (S, T, 16, 16)
    mid = (start + end) / 2
    layers = {name: _softmax_maps(g, mid, side, 0.3)[None] for name, side in SD15_LAYERS}  # each (1, T, s, s)
    aggregate = torch.stack(
        [torch.nn.functional.interpolate(m, size=(64, 64), mode="bilinear")[0] for m in layers.values()]
    ).mean(0)[None]  # (1, T, 64, 64)
    words = PROMPT.split()
    pieces = ["<|startoftext|>"] + [f"{w}</w>" for w in words] + ["<|endoftext|>"] * (tokens - len(words) - 1)
    kinds = ["bos"] + ["text"] * len(words) + ["eos"] + ["pad"] * (tokens - len(words) - 2)
    maps = AttentionMaps(
        aggregate=aggregate,
        timesteps=ts.float(),
        layers=layers,
        token_lists=[TokenList(list(range(tokens)), pieces, kinds, [], PROMPT)],
        latent_size=(64, 64),
        steps=per_step[:, None],  # (S, 1, T, 16, 16)
        family="sd1",
    )
    # the image: the final x0's colours at 512², with fine texture (a photo does not compress to nothing)
    from sdexplore.views.render import trace_preview

    small = trace_preview(trace, steps - 1, "x0")  # (64, 64, 3)
    big = np.asarray(
        torch.nn.functional.interpolate(
            torch.from_numpy(small).permute(2, 0, 1)[None].float(), size=(512, 512), mode="bicubic"
        )[0].permute(1, 2, 0)
    )
    texture = np.random.default_rng(0).normal(0, 6, big.shape)
    image = np.clip(big + texture, 0, 255).astype(np.uint8)  # (512, 512, 3)
    return Observation(runs=[trace], _attention=maps), image


# ---------------------------------------------------------------------------------------------- measuring
def _payload_parts(path: Path) -> dict[str, int]:
    """Bytes of the page's main parts (JSON text of each payload key)."""
    from sdexplore.views.pages import read_payload

    p = read_payload(path)
    parts = {k: len(json.dumps(v)) for k, v in p.items() if k in ("steps", "attention", "image", "walk")}
    att = p.get("attention") or {}
    for k in ("aggregate", "steps"):
        if att.get(k):
            parts[f"attention.{k}"] = len(json.dumps(att[k]))
    if att.get("layers"):
        parts["attention.layers"] = len(json.dumps(att["layers"]))
    return parts


def _offline(route: Any, seen: list[str]) -> None:
    """Let file:// requests through; abort and count every other."""
    if route.request.url.startswith("file://"):
        route.continue_()
    else:
        seen.append(route.request.url)
        route.abort()


def latency(paths: dict[str, Path], moves: int) -> list[dict[str, Any]]:
    """Median input → painted ms of each slider of each page, in headless Chromium."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import load_script
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    args = load_script("docs_screenshots").CHROMIUM_ARGS
    controls = {
        "observation": [
            ("scrubber step", ".sdx-step-slider"),
            ("attention step range", ".sdx-step-from"),
            ("attention opacity", ".sdx-opacity"),
        ],
        "walk": [("walk frame", ".sdx-walk-slider"), ("interpolation frame", ".sdx-frame-slider")],
    }
    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=args, headless=True)
        try:
            for label, path in paths.items():
                page = browser.new_page(viewport={"width": 1300, "height": 1400})
                outside: list[str] = []
                page.route("**/*", lambda r, seen=outside: _offline(r, seen))
                page.goto(path.as_uri())
                state = page.evaluate(
                    "async () => { const r = await window.sdexplore.ready; return r.error || 'ok'; }"
                )
                if state != "ok":
                    raise RuntimeError(f"{path} did not open: {state}")
                kind = "walk" if "walk" in label else "observation"
                for name, selector in controls[kind]:
                    r = page.evaluate(LATENCY_JS, [selector, moves])
                    rows.append(
                        {
                            "page": label,
                            "control": name,
                            "ms": r["total"],
                            "handler_ms": r["handler"],
                            "moves": r["n"],
                        }
                    )
                if outside:
                    raise RuntimeError(f"{path} asked the network for {outside[:3]}")
                page.close()
        finally:
            browser.close()
    return rows


# the kernel baseline's notebook: a small ipywidgets scrubber (an IntSlider and an Image whose observer sets that
# step's PNG from the kernel, as the explorers did before the anywidget views), then the anywidget TimestepScrubber
KERNEL_CELLS = [
    "import torch\nfrom sdexplore import load_pipeline, observe\nfrom sdexplore.views.widgets import TimestepScrubber\n"
    "torch.set_num_threads(1)\npipe = load_pipeline()\n"
    f"with observe(pipe, attention=True) as obs:\n    pipe({PROMPT!r}, generator=torch.Generator().manual_seed(0))",
    "import io\nimport ipywidgets as w\nfrom PIL import Image\nfrom sdexplore.views.render import trace_preview\n\n\n"
    "def png(i):  # step i's x0 preview, enlarged to at least 64 px, as the ipywidgets scrubber sent it\n"
    "    a = trace_preview(obs.steps, i, 'x0')  # (h, w, 3)\n"
    "    k = max(1, -(-64 // a.shape[0]))\n"
    "    buf = io.BytesIO()\n"
    "    Image.fromarray(a.repeat(k, 0).repeat(k, 1)).save(buf, format='PNG')\n"
    "    return buf.getvalue()\n\n\n"
    "pngs = [png(i) for i in range(len(obs.steps))]  # encoded once: a move only sends bytes\n"
    "slider = w.IntSlider(value=len(pngs) // 2, min=0, max=len(pngs) - 1)\n"
    "slider.add_class('sdx-bench-slider')\n"
    "img = w.Image(value=pngs[slider.value], format='png')\n"
    "img.add_class('sdx-bench-img')\n"
    "slider.observe(lambda change: setattr(img, 'value', pngs[change['new']]), names='value')\n"
    "w.VBox([slider, img])",
    "TimestepScrubber(obs)",
]

# arrow key on the ipywidgets slider → the kernel sets the Image's PNG → decoded → the next frame; median of n
KERNEL_JS = """async ([n]) => {
  const handle = document.querySelector('.sdx-bench-slider .noUi-handle');
  const img = document.querySelector('img.sdx-bench-img');
  const frame = () => new Promise((r) => requestAnimationFrame(r));
  const times = [];
  let lost = 0;
  for (let i = 0; i < n; i++) {
    await frame();
    await new Promise((r) => setTimeout(r, Math.random() * 16));
    const before = img.src;
    const changed = new Promise((resolve) => {
      const obs = new MutationObserver(() => { if (img.src !== before) { obs.disconnect(); resolve(true); } });
      obs.observe(img, { attributes: true, attributeFilter: ['src'] });
      setTimeout(() => { obs.disconnect(); resolve(false); }, 5000);
    });
    const key = i % 2 ? 'ArrowRight' : 'ArrowLeft';
    const t0 = performance.now();
    handle.dispatchEvent(new KeyboardEvent('keydown', { key, bubbles: true }));
    if (!(await changed)) { lost++; continue; }
    await img.decode();
    await frame();
    times.push(performance.now() - t0);
  }
  times.sort((a, b) => a - b);
  return { total: times[Math.floor(times.length / 2)], n: times.length, lost };
}"""


def kernel_latency(moves: int) -> list[dict[str, Any]]:
    """Two scrubbers in JupyterLab: a small ipywidgets one whose every move is a kernel round trip (arrow key on
    the slider → the kernel sets the step's PNG → decoded → the next frame), and the anywidget TimestepScrubber
    (input → painted, as the pages are measured: it paints in the browser). Needs jupyterlab (the notebooks
    extra)."""
    import nbformat

    sys.path.insert(0, str(ROOT / "tests"))
    import test_browser as tb  # the JupyterLab fixture's setup, reused
    from playwright.sync_api import sync_playwright

    gen = tb.lab.__wrapped__(_Factory())
    url, token, root = next(gen)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in KERNEL_CELLS])
    nb.metadata["kernelspec"] = {
        "name": tb.KERNEL_NAME,
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nbformat.write(nb, root / "kernel_bench.ipynb")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=tb.CHROMIUM, args=tb.CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1500, "height": 1400})
            page.goto(f"{url}/lab/tree/kernel_bench.ipynb?token={token}")
            page.locator(".jp-NotebookPanel-toolbar .jp-KernelName").filter(has_text="Python 3").wait_for(
                timeout=300_000
            )
            page.wait_for_function(tb.KERNEL_IDLE_JS, timeout=300_000)
            page.locator(".jp-Notebook .jp-Cell").first.click()
            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.locator("img.sdx-bench-img").wait_for(timeout=300_000)
            page.locator(".sdx-view-scrubber .sdx-step-slider").wait_for(timeout=300_000)
            page.wait_for_function(tb.KERNEL_IDLE_JS, timeout=300_000)
            time.sleep(2)
            ipy = page.evaluate(KERNEL_JS, [moves])
            any_ = page.evaluate(LATENCY_JS, [".sdx-view-scrubber .sdx-step-slider", moves])
            browser.close()
    finally:
        gen.close()
    return [
        {
            "page": "JupyterLab: ipywidgets slider + Image (kernel round trip)",
            "control": "scrubber step",
            "ms": ipy["total"],
            "handler_ms": float("nan"),
            "moves": ipy["n"],
            "lost": ipy["lost"],
        },
        {
            "page": "JupyterLab: anywidget TimestepScrubber",
            "control": "scrubber step",
            "ms": any_["total"],
            "handler_ms": any_["handler"],
            "moves": any_["n"],
        },
    ]


class _Factory:
    """The tmp_path_factory the JupyterLab fixture asks for."""

    def mktemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"sdx-bench-{name}-"))


def measure(moves: int = 60, kernel: bool = False, out: Path | None = None) -> dict[str, Any]:
    """Build both pages (and a walk page), measure their sizes and each slider's latency."""
    import sdexplore

    out = out or Path(tempfile.mkdtemp(prefix="sdx-pages-"))
    obs, image = embedded_observation()
    t0 = time.perf_counter()
    embedded = obs.save_html(out / "embedded.html", image=image, model="tiny-shapes (embedded)", seed=0)
    embedded_s = time.perf_counter() - t0
    big, big_image = sd15_observation()
    t0 = time.perf_counter()
    sd15 = big.save_html(out / "sd15_shaped.html", image=big_image, model="SD-1.5-shaped (synthetic)", seed=0)
    sd15_s = time.perf_counter() - t0
    pipe = sdexplore.load_pipeline()
    w = sdexplore.walk(
        pipe,
        [PROMPT, "a big yellow square at the bottom right on a purple background"],
        seeds=[0, 1],
        frames=24,
        num_inference_steps=10,
        progress=False,
    )
    walk_page = w.save_html(out / "walk.html")
    sizes = [
        {
            "page": "embedded model, 50 steps (recorded)",
            "bytes": embedded.stat().st_size,
            "budget": BUDGET_EMBEDDED,
            "write_s": embedded_s,
            "parts": _payload_parts(embedded),
        },
        {
            "page": "SD-1.5-shaped, 50 steps, 77 tokens (synthesised shapes)",
            "bytes": sd15.stat().st_size,
            "budget": BUDGET_SD15,
            "write_s": sd15_s,
            "parts": _payload_parts(sd15),
        },
        {
            "page": "embedded walk, 24 frames",
            "bytes": walk_page.stat().st_size,
            "budget": None,
            "write_s": float("nan"),
            "parts": _payload_parts(walk_page),
        },
    ]
    lat = latency({"embedded": embedded, "sd15-shaped": sd15, "walk": walk_page}, moves)
    if kernel:
        lat += kernel_latency(moves)
    return {"sizes": sizes, "latency": lat, "folder": str(out)}


def print_table(r: dict[str, Any]) -> None:
    print("\npage sizes (budget: embedded ≤ 1 MB, SD-1.5-shaped ≤ 5 MB)")
    print(f"{'page':58s} {'MB':>7s} {'budget':>7s} {'ok':>4s} {'write s':>8s}")
    for s in r["sizes"]:
        b = s["budget"]
        ok = "" if b is None else ("yes" if s["bytes"] <= b else "NO")
        print(
            f"{s['page']:58s} {s['bytes'] / MB:7.3f} {'' if b is None else f'{b / MB:.0f}':>7s} {ok:>4s} {s['write_s']:8.2f}"
        )
        print("    " + ", ".join(f"{k} {v / MB:.3f} MB" for k, v in s["parts"].items()))
    print(f"\ninput → painted, median of the moves (budget ≤ {BUDGET_MS:.0f} ms)")
    print(f"{'page':44s} {'control':22s} {'ms':>7s} {'handler':>8s} {'moves':>6s} {'ok':>4s}")
    for x in r["latency"]:
        ok = "yes" if x["ms"] <= BUDGET_MS else "NO"
        lost = f"  ({x['lost']} moves got no new picture in 5 s)" if x.get("lost") else ""
        print(
            f"{x['page']:44s} {x['control']:22s} {x['ms']:7.2f} {x['handler_ms']:8.2f} {x['moves']:6d} {ok:>4s}"
            + lost
        )
    print(f"\npages in {r['folder']}")


def benchmark(pipe: Any, *, device: str, repeats: int, gpu: bool) -> list[dict]:
    """run.py's rows: page sizes (``ratio`` = share of the budget) and latencies (``ratio`` = share of 16 ms)."""
    r = measure(moves=50)
    rows = []
    for s in r["sizes"]:
        rows.append(
            {
                "group": "pages",
                "name": f"size MB: {s['page']}",
                "seconds": float("nan"),
                "ms": float("nan"),
                "ratio": s["bytes"] / s["budget"] if s["budget"] else float("nan"),
                "peak_mib": s["bytes"] / 2**20,
                "extra_mib": 0.0,
            }
        )
    for x in r["latency"]:
        rows.append(
            {
                "group": "pages",
                "name": f"input→painted: {x['page']} {x['control']}",
                "seconds": x["ms"] / 1000,
                "ms": x["ms"],
                "ratio": x["ms"] / BUDGET_MS,
                "peak_mib": 0.0,
                "extra_mib": 0.0,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--moves", type=int, default=60, help="slider moves per control (median; ≥ 50)")
    ap.add_argument(
        "--kernel",
        action="store_true",
        help="also measure a kernel round-trip ipywidgets scrubber and the anywidget one in JupyterLab",
    )
    ap.add_argument("--out", type=Path, default=None, help="folder for the pages (default: a temporary one)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.moves < 50:
        ap.error(f"--moves must be ≥ 50 (a median of at least 50 moves), got {args.moves}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    r = measure(args.moves, args.kernel, args.out)
    print_table(r)
    if args.json:
        args.json.write_text(json.dumps(r, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
