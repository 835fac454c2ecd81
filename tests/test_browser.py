"""The explorers in a real browser: JupyterLab on 127.0.0.1, driven by Playwright with the system's Chromium.

Runs a small notebook that shows all four explorers on the embedded model (and the scrubber and attention explorer
on the tiny Flux fixture, an MMDiT family), checks they rendered (no "Loading widget", no error), then moves each
one's control and checks that the displayed image changed. Screenshots of
the rendered explorers go to ``$SDEXPLORE_SCREENSHOTS`` (default: the test's temp folder).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import load_script

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
# the flags FACTS.md found to work here; one list, shared with the docs screenshots
CHROMIUM_ARGS = load_script("docs_screenshots").CHROMIUM_ARGS
KERNEL_NAME = "python3"
#: How long any wait here may last before the test gives up (starting JupyterLab, a kernel, a cell, an image
#: redraw). Generous on purpose: these bound a hang, never a speed, and a loaded 2-core CI box is slow.
PATIENCE_S = 300

NOTEBOOK_CELLS = [
    """\
import numpy as np, torch
from sdexplore.loading import load_pipeline
from sdexplore.record.observe import observe
from sdexplore.walks import walk
from sdexplore.views.widgets import AttentionExplorer, InterpolationExplorer, TimestepScrubber, WalkPlayer
torch.set_num_threads(1)
pipe = load_pipeline()
PROMPT = "a big red circle at the top left on a blue background"
with observe(pipe, attention=True) as obs:
    image = pipe(PROMPT, num_inference_steps=8, generator=torch.Generator().manual_seed(0)).images[0]
w = walk(pipe, [PROMPT, "a big yellow square at the bottom right on a purple background"], seeds=[0, 1],
         frames=5, num_inference_steps=4, progress=False)""",
    "TimestepScrubber(obs)",
    "AttentionExplorer(obs, image)",
    "InterpolationExplorer(w)",
    "WalkPlayer(w)",
    """\
from sdexplore.fixtures import tiny_pipeline
flux = tiny_pipeline("flux")  # an MMDiT family: joint-attention maps, packed latents
with observe(flux, attention=True) as obs_flux:
    image_flux = flux(PROMPT, num_inference_steps=4, height=64, width=64, max_sequence_length=32,
                      generator=torch.Generator().manual_seed(0)).images[0]""",
    'flux_scrubber = TimestepScrubber(obs_flux)\nflux_scrubber.widget.add_class("sdx-mmdit")\nflux_scrubber',
    'flux_attention = AttentionExplorer(obs_flux, image_flux)\nflux_attention.widget.add_class("sdx-mmdit")\nflux_attention',
]

KERNEL_IDLE_JS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.status === 'idle';
}"""
RUN_STARTED_JS = """() => [...document.querySelectorAll('.jp-InputPrompt')].some(p => /\\[(\\*|\\d+)\\]/.test(p.textContent))"""

# the page-side digest of an <img>: fetch its (blob) URL and hash the bytes, so "changed" means new pixels
IMG_DIGEST_JS = """async (img) => {
  const buf = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
  let h = 2166136261;
  for (const b of buf) { h ^= b; h = Math.imul(h, 16777619) >>> 0; }
  return buf.length + ':' + h;
}"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except (urllib.error.URLError, OSError):
        return 0


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 with a python3 kernel spec for this interpreter; yields (url, token, root)."""
    if CHROMIUM is None:
        pytest.skip(
            "environment: no Chromium on this machine (apt-get install -y chromium); the browser test needs it"
        )
    pytest.importorskip(
        "jupyterlab", reason="environment: jupyterlab (the notebooks extra, not a dev one) is not installed"
    )
    # Dev extras (pip install -e ".[dev]"): a missing one is an error, not a skip.
    import ipywidgets  # noqa: F401  (the explorers in the notebook)
    import nbformat
    import playwright.sync_api  # noqa: F401  (the test drives Chromium with it)

    base = tmp_path_factory.mktemp("lab")
    root = base / "work"
    root.mkdir()
    env = dict(os.environ)
    for var in (
        "JUPYTER_CONFIG_DIR",
        "JUPYTER_RUNTIME_DIR",
        "JUPYTERLAB_SETTINGS_DIR",
        "JUPYTERLAB_WORKSPACES_DIR",
        "IPYTHONDIR",
        "MPLCONFIGDIR",
    ):
        (base / var.lower()).mkdir()
        env[var] = str(base / var.lower())
    spec = base / "data" / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (ipykernel)",
                "language": "python",
            }
        )
    )
    env["JUPYTER_PATH"] = os.pathsep.join(filter(None, [str(base / "data"), os.environ.get("JUPYTER_PATH")]))
    env.pop("SDEXPLORE_STATIC", None)
    # no "get notified about Jupyter news?" pop-up over the screenshots (and no network fetch for it)
    news = base / "jupyterlab_settings_dir" / "@jupyterlab" / "apputils-extension"
    news.mkdir(parents=True)
    (news / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    # one BLAS/OpenMP thread per kernel: on a shared CI box, spinning thread pools slow a tiny model 20×
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in NOTEBOOK_CELLS])
    nb.metadata["kernelspec"] = {
        "name": KERNEL_NAME,
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
    }
    nbformat.write(nb, root / "explorers.ipynb")

    port, token = _free_port(), "sdexplore-test"
    log = open(base / "lab.log", "w")  # noqa: SIM115 - closed in the finaliser below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={token}",
            "--LabApp.expose_app_in_browser=True",
            f"--ServerApp.root_dir={root}",
            "--allow-root",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=root,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + PATIENCE_S
        while _get(f"{url}/api/status?token={token}") != 200:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"JupyterLab did not start; log:\n{(base / 'lab.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, token, root
    finally:
        try:
            req = urllib.request.Request(f"{url}/api/shutdown?token={token}", method="POST")
            urllib.request.urlopen(req, timeout=5)
            proc.wait(timeout=20)
        except Exception:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def test_explorers_render_and_respond_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, token, _ = lab
    shots = Path(os.environ.get("SDEXPLORE_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    expect.set_options(timeout=PATIENCE_S * 1000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(f"{url}/lab/tree/explorers.ipynb?token={token}")
            # wait for the kernel to be picked (else Run All opens a kernel dialog), then run everything
            expect(page.locator(".jp-NotebookPanel-toolbar .jp-KernelName")).to_contain_text("Python 3")
            page.wait_for_function(KERNEL_IDLE_JS, timeout=PATIENCE_S * 1000)
            page.locator(".jp-Notebook .jp-Cell").first.click()
            for _attempt in range(3):
                page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
                try:  # a prompt turns to [*] or [1] once the run has really started
                    page.wait_for_function(RUN_STARTED_JS, timeout=30_000)
                    break
                except Exception:
                    continue

            scrubber = page.locator(".sdx-timestep-scrubber:not(.sdx-mmdit)")
            attention = page.locator(".sdx-attention-explorer:not(.sdx-mmdit)")
            flux_scrubber = page.locator(".sdx-timestep-scrubber.sdx-mmdit")
            flux_attention = page.locator(".sdx-attention-explorer.sdx-mmdit")
            interp = page.locator(".sdx-interpolation-explorer")
            player = page.locator(".sdx-walk-player")
            for explorer in (scrubber, attention, interp, player, flux_scrubber, flux_attention):
                expect(explorer).to_be_visible()
            body = page.locator(".jp-Notebook")
            expect(body).not_to_contain_text("Loading widget")
            expect(body).not_to_contain_text("Error displaying widget")
            expect(body).not_to_contain_text("Traceback")
            for name, explorer in (
                ("scrubber", scrubber),
                ("attention", attention),
                ("interpolation", interp),
                ("walk_player", player),
                ("flux_scrubber", flux_scrubber),
                ("flux_attention", flux_attention),
            ):
                explorer.scroll_into_view_if_needed()
                explorer.screenshot(path=str(shots / f"{name}.png"))

            def digest(img):
                return img.evaluate(IMG_DIGEST_JS)

            def wait_changed(img, before):
                deadline = time.time() + PATIENCE_S
                while time.time() < deadline:
                    now = digest(img)
                    if now != before:
                        return now
                    time.sleep(0.2)
                pytest.fail("the displayed image did not change after moving the control")

            # TimestepScrubber: starts on the last step; step back with the keyboard on the slider handle
            x0 = scrubber.locator("img.sdx-panel-x0")
            before = digest(x0)
            scrubber.locator(".sdx-step-slider .noUi-handle").focus()
            for _ in range(4):
                page.keyboard.press("ArrowLeft")
            wait_changed(x0, before)
            expect(scrubber).to_contain_text("step 4 / 8")

            # AttentionExplorer: another word, then the opacity slider
            img = attention.locator("img.sdx-attention-image")
            before = digest(img)
            attention.locator(".sdx-word-buttons button", has_text="circle").click()
            before = wait_changed(img, before)
            attention.locator(".sdx-opacity .noUi-handle").focus()
            page.keyboard.press("ArrowLeft")
            wait_changed(img, before)
            attention.get_by_role("button", name="step × word grid").click()
            grid = attention.locator(".sdx-attention-grid img")
            expect(grid.first).to_be_visible()
            assert grid.count() >= 2 * 11  # step bins × the prompt's 11 distinct words
            attention.screenshot(path=str(shots / "attention_grid.png"))

            # InterpolationExplorer and WalkPlayer: frame sliders
            for explorer, selector, slider in (
                (interp, "img.sdx-interp-image", ".sdx-frame-slider"),
                (player, "img.sdx-walk-image", ".sdx-walk-slider"),
            ):
                img = explorer.locator(selector)
                before = digest(img)
                explorer.locator(f"{slider} .noUi-handle").focus()
                page.keyboard.press("ArrowRight")
                page.keyboard.press("ArrowRight")
                wait_changed(img, before)
            scrubber.scroll_into_view_if_needed()
            scrubber.screenshot(path=str(shots / "scrubber_after.png"))

            # the same explorers on Flux (tiny fixture): a step back, another word (T5 pieces merged)
            x0 = flux_scrubber.locator("img.sdx-panel-x0")
            before = digest(x0)
            flux_scrubber.locator(".sdx-step-slider .noUi-handle").focus()
            page.keyboard.press("ArrowLeft")
            wait_changed(x0, before)
            expect(flux_scrubber).to_contain_text("step 3 / 4")
            img = flux_attention.locator("img.sdx-attention-image")
            before = digest(img)
            flux_attention.locator(".sdx-word-buttons button", has_text="circle").click()
            wait_changed(img, before)
            flux_attention.screenshot(path=str(shots / "flux_attention_after.png"))
        finally:
            browser.close()
