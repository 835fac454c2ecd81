"""The explorers in a real browser: JupyterLab on 127.0.0.1, driven by Playwright with the system's Chromium.

Runs a small notebook that shows all four explorers on the embedded model (and the scrubber and attention explorer
on the tiny Flux fixture, an MMDiT family) as anywidget views of the front end (sdexplore/views/web/), checks they
rendered (no "Loading widget", no error), then moves each one's control and checks that the canvas changed. Every
frame the page sends on the kernel's websocket is counted: dragging a slider sends none (the picture comes from
the browser's own data), letting it go sends the one state update that tells Python where it stopped, and a
position set in Python moves the view. Then the kernel is shut down and the views still respond. Screenshots of
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
    "scrub = TimestepScrubber(obs)\nscrub",
    "att = AttentionExplorer(obs, image)\natt",
    "interp = InterpolationExplorer(w)\ninterp",
    "player = WalkPlayer(w)\nplayer",
    """\
from sdexplore.editing import edit
from sdexplore.views.widgets import EditExplorer
swap = edit(pipe, "a big red circle on a blue background", "a big green circle on a blue background",
            num_inference_steps=6, generator=torch.Generator().manual_seed(0))
ed = EditExplorer(swap)
ed""",
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

# the page-side digest of a canvas's pixels, so "changed" means new pixels
CANVAS_DIGEST_JS = "(c) => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; " + (
    "let h = 2166136261; for (let i = 0; i < d.length; i++) { h ^= d[i]; h = Math.imul(h, 16777619) >>> 0; } "
    "return h; }"
)
# run code in the notebook's kernel (not a cell: the notebook stays as it is) and return what it printed
KERNEL_RUN_JS = """async (code) => {
  const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
  let out = "";
  const f = k.requestExecute({ code, store_history: false });
  f.onIOPub = (m) => { if (m.header.msg_type === "stream") out += m.content.text; };
  await f.done;
  return out;
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


class KernelTraffic:
    """Every frame the page sends on a kernel websocket (JupyterLab's kernel channels), as text."""

    def __init__(self, page) -> None:
        # sync Playwright delivers these events while one of its calls runs: wait with page.wait_for_timeout
        self.sent: list[str] = []
        page.on("websocket", self._socket)

    def _socket(self, ws) -> None:
        if "/api/kernels/" in ws.url:
            ws.on("framesent", self._frame)

    def _frame(self, payload) -> None:
        self.sent.append(payload if isinstance(payload, str) else payload.decode("latin-1"))

    def since(self, n: int) -> list[str]:
        return self.sent[n:]


def _drag(page, slider, fractions) -> None:
    """Press the mouse on a range input's thumb at its current end and move it to each fraction of its width,
    without letting go."""
    box = slider.bounding_box()
    y = box["y"] + box["height"] / 2
    value, lo, hi = (float(slider.evaluate(f"(e) => e.{k}")) for k in ("value", "min", "max"))
    start = box["x"] + 8 + (box["width"] - 16) * (value - lo) / max(hi - lo, 1)
    page.mouse.move(start, y)
    page.mouse.down()
    for f in fractions:
        page.mouse.move(box["x"] + 8 + (box["width"] - 16) * f, y, steps=4)


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
            traffic = KernelTraffic(page)
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

            scrubber = page.locator(".sdx-view-scrubber:not(.sdx-mmdit)")
            attention = page.locator(".sdx-view-attention:not(.sdx-mmdit)")
            flux_scrubber = page.locator(".sdx-view-scrubber.sdx-mmdit")
            flux_attention = page.locator(".sdx-view-attention.sdx-mmdit")
            interp = page.locator(".sdx-view-interpolation")
            player = page.locator(".sdx-view-walk")
            editor = page.locator(".sdx-view-edit")
            canvases = {
                "scrubber": (scrubber, "canvas.sdx-panel-x0"),
                "attention": (attention, "canvas.sdx-attention-image"),
                "interpolation": (interp, "canvas.sdx-interp-image"),
                "walk_player": (player, "canvas.sdx-walk-image"),
                "edit": (editor, "canvas.sdx-edit-after"),
                "flux_scrubber": (flux_scrubber, "canvas.sdx-panel-x0"),
                "flux_attention": (flux_attention, "canvas.sdx-attention-image"),
            }
            for explorer, canvas in canvases.values():
                expect(explorer.locator(canvas)).to_be_visible()  # the front end rendered (no error box)
            body = page.locator(".jp-Notebook")
            expect(body).not_to_contain_text("Loading widget")
            expect(body).not_to_contain_text("Error displaying widget")
            expect(body).not_to_contain_text("Traceback")
            expect(body.locator(".sdx-error")).to_have_count(0)
            page.wait_for_function(KERNEL_IDLE_JS, timeout=PATIENCE_S * 1000)
            assert any("execute_request" in f for f in traffic.sent), "the kernel's traffic is not being seen"
            for name, (explorer, _) in canvases.items():
                explorer.scroll_into_view_if_needed()
                explorer.screenshot(path=str(shots / f"{name}.png"))

            def digest(explorer, canvas):
                return explorer.locator(canvas).first.evaluate(CANVAS_DIGEST_JS)

            def changes(explorer, canvas, act):
                """act() changes the canvas's pixels (waits for the repaint)."""
                before = digest(explorer, canvas)
                act()
                deadline = time.time() + PATIENCE_S
                while digest(explorer, canvas) == before:
                    if time.time() > deadline:
                        pytest.fail(f"{canvas} did not change after moving the control")
                    time.sleep(0.05)

            def keys(explorer, selector, key, times=1):
                explorer.locator(selector).first.focus()
                for _ in range(times):
                    page.keyboard.press(key)

            # TimestepScrubber: drag the step slider back; the pictures change with nothing sent to the kernel
            x0 = "canvas.sdx-panel-x0"
            scrubber.scroll_into_view_if_needed()
            slider = scrubber.locator("input.sdx-step-slider")
            sent = len(traffic.sent)
            changes(scrubber, x0, lambda: _drag(page, slider, [0.7, 0.5, 0.4]))
            page.wait_for_timeout(
                500
            )  # time for any message a move might cause (and Playwright's events pumped)
            assert traffic.since(sent) == [], "moving the slider sent a message to the kernel"
            shown = int(slider.input_value())
            assert shown < 7
            expect(scrubber).to_contain_text(f"step {shown + 1} / 8")
            page.mouse.up()  # let go: one state update tells Python where it stopped
            deadline = time.time() + PATIENCE_S
            while not any("comm_msg" in f for f in traffic.since(sent)):
                assert time.time() < deadline, "letting the slider go sent no state update"
                page.wait_for_timeout(100)  # sync Playwright delivers websocket events inside its own calls
            told = [f for f in traffic.since(sent) if "comm_msg" in f]
            assert (
                len(told) == 1
                and '"step"' in told[0]
                and "execute_request" not in "".join(traffic.since(sent))
            )
            assert page.evaluate(KERNEL_RUN_JS, "print(scrub.value)").strip() == str(shown)
            # ... and a position set in Python moves the view
            changes(scrubber, x0, lambda: page.evaluate(KERNEL_RUN_JS, "scrub.value = 1"))
            expect(scrubber).to_contain_text("step 2 / 8")
            assert slider.input_value() == "1"

            # AttentionExplorer: another word (synced to Python), then the opacity slider
            image = "canvas.sdx-attention-image"
            changes(
                attention,
                image,
                lambda: attention.locator(".sdx-word-buttons button", has_text="circle").click(),
            )
            deadline = time.time() + PATIENCE_S
            while page.evaluate(KERNEL_RUN_JS, "print(att.word)").strip() != "circle":
                assert time.time() < deadline, "the word picked in the view never reached Python"
                time.sleep(0.2)
            changes(attention, image, lambda: keys(attention, "input.sdx-opacity", "ArrowLeft", 2))

            # InterpolationExplorer and WalkPlayer: frame sliders
            changes(
                interp,
                "canvas.sdx-interp-image",
                lambda: keys(interp, "input.sdx-frame-slider", "ArrowRight", 2),
            )
            changes(
                player,
                "canvas.sdx-walk-image",
                lambda: keys(player, "input.sdx-walk-slider", "ArrowRight", 2),
            )

            # EditExplorer: another word's maps before and after (synced to Python)
            word = editor.locator("select.sdx-edit-word")
            changes(editor, "canvas.sdx-edit-after", lambda: word.select_option(label="circle"))
            deadline = time.time() + PATIENCE_S
            while page.evaluate(KERNEL_RUN_JS, "print(ed.word)").strip() != "circle":
                assert time.time() < deadline, "the word picked in the edit view never reached Python"
                page.wait_for_timeout(200)

            # the same explorers on Flux (tiny fixture): a step back, another word (T5 pieces merged)
            changes(flux_scrubber, x0, lambda: keys(flux_scrubber, "input.sdx-step-slider", "ArrowLeft"))
            expect(flux_scrubber).to_contain_text("step 3 / 4")
            changes(
                flux_attention,
                image,
                lambda: flux_attention.locator(".sdx-word-buttons button", has_text="circle").click(),
            )
            for name, (explorer, _) in canvases.items():
                explorer.scroll_into_view_if_needed()
                explorer.screenshot(path=str(shots / f"{name}_after.png"))

            # the kernel goes; every view still responds (its data is in the browser)
            req = urllib.request.Request(f"{url}/api/kernels?token={token}")
            with urllib.request.urlopen(req, timeout=10) as r:
                kernels = json.loads(r.read())
            assert kernels, "no kernel ran the notebook"
            for k in kernels:
                req = urllib.request.Request(f"{url}/api/kernels/{k['id']}?token={token}", method="DELETE")
                urllib.request.urlopen(req, timeout=30)
            with urllib.request.urlopen(f"{url}/api/kernels?token={token}", timeout=10) as r:
                assert json.loads(r.read()) == []
            time.sleep(1)
            scrubber.scroll_into_view_if_needed()
            changes(scrubber, x0, lambda: keys(scrubber, "input.sdx-step-slider", "ArrowRight", 3))
            expect(scrubber).to_contain_text("step 5 / 8")
            changes(
                attention,
                image,
                lambda: attention.locator(".sdx-word-buttons button", has_text="red").click(),
            )
            changes(
                interp, "canvas.sdx-interp-image", lambda: keys(interp, "input.sdx-frame-slider", "ArrowLeft")
            )
            changes(
                player, "canvas.sdx-walk-image", lambda: keys(player, "input.sdx-walk-slider", "ArrowLeft")
            )
            changes(editor, "canvas.sdx-edit-after", lambda: word.select_option(label="big"))
            expect(body.locator(".sdx-error")).to_have_count(0)
            scrubber.screenshot(path=str(shots / "scrubber_without_kernel.png"))
        finally:
            browser.close()
