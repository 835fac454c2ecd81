"""Build the documentation site offline: generate its pages, execute the tutorials, then ``mkdocs build --strict``.

``python scripts/build_docs.py [--site-dir site]`` (``make docs``). Generated pages go to ``docs/generated/``
(git-ignored, replaced whole at each build): the README's quick start, the CLI reference, the API reference, the
two embedded models' cards, the benchmark results, the eight tutorials executed on the embedded model and the
gallery. The tutorials' explorers run static (``SDEXPLORE_STATIC=1``), and each one that has a front end also
writes its self-contained page into ``tutorials/explorers/`` (:data:`EXPLORER_PAGES`), which the tutorial's page
shows live in an ``<iframe>``: a reader scrubs the steps and picks words with no kernel and no network.

``--reuse`` skips the work when ``docs/generated/.build.json`` says the pages and ``--site-dir`` were built from
inputs with the same digests (:func:`inputs_digest`: the sources, docs, notebooks' code cells, scripts and the
installed versions of the tools); when only ``docs/*.md`` or ``mkdocs.yml`` changed, only ``mkdocs build`` runs.
The test suite builds the site this way once per run into ``build/site`` (``tests/conftest.py``); the docs and
notebook tests read that one build.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GENERATED = DOCS / "generated"
NOTEBOOKS = ROOT / "notebooks"
MODEL_DIR = ROOT / "sdexplore" / "models" / "tiny-shapes"
MMDIT_MODEL_DIR = ROOT / "sdexplore" / "models" / "tiny-shapes-mmdit"
#: README sections shown on the quick-start page, in this order.
README_SECTIONS = ("Two commands", "Quick start", "Loading models")
#: Environment of the notebook kernels and the gallery: offline, static explorers, one thread each (two
#: kernels share two cores; spinning OpenMP pools made the tiny model 10-30x slower on a shared box).
RUN_ENV = {
    "SDEXPLORE_STATIC": "1",
    "HF_HUB_OFFLINE": "1",
    "MPLBACKEND": "module://matplotlib_inline.backend_inline",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TQDM_DISABLE": "1",  # no progress bars in the pages
    "TRANSFORMERS_VERBOSITY": "error",  # no "torchvision not installed" notes in the pages
    "NO_MKDOCS_2_WARNING": "1",  # mkdocs-material's banner about its successor
}


#: What the generated pages are made from (files, or every file below a folder): a change here regenerates them
#: (executes the tutorials again) under ``--reuse``.
PAGE_INPUTS = ("README.md", "pyproject.toml", "benchmarks/RESULTS.md", "notebooks", "scripts", "sdexplore")
#: What the site is made from besides the generated pages: a change here only reruns ``mkdocs build``.
SITE_INPUTS = ("mkdocs.yml", "docs")
#: Installed tools whose versions change the pages (rendering, or what the executed tutorials print and draw).
SITE_PACKAGES = (
    "mkdocs",
    "mkdocs-material",
    "mkdocs-jupyter",
    "mkdocstrings",
    "mkdocstrings-python",
    "griffe",
    "nbconvert",
    "nbclient",
    "ipykernel",
    "torch",
    "diffusers",
    "transformers",
    "numpy",
    "matplotlib",
    "pillow",
)
#: Longest one notebook cell may run: a guard against a hung kernel, not a speed bound (a loaded 2-core CI box
#: runs the slowest tutorial in minutes; CI's own limit, 90 minutes, bounds the whole run).
CELL_TIMEOUT_S = 1800
#: The build's record, in ``docs/generated/`` (a dot file: mkdocs leaves it out of the site).
STAMP = ".build.json"
#: Files written by the executed tutorials (notebook 5's animations), in ``docs/generated/`` (left out of the site).
TUTORIAL_OUTPUTS = ".outputs"
#: The explorers' self-contained pages the executed tutorials write (``SDEXPLORE_EMBED_PAGES``), beside the
#: tutorials in ``docs/generated/tutorials/``: each tutorial page's ``<iframe>`` shows one (copied into the site).
EXPLORER_PAGES = "explorers"
#: In TUTORIAL_OUTPUTS: the names the tutorials' kernels left in their temporary folder (should be none).
TEMP_LEFT = "temp_left_behind.json"


class DocsBuildError(RuntimeError):
    """A step of the documentation build failed; the message names the step and what to look at."""


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------- reuse
def _skipped(rel: Path) -> bool:
    """Paths under the inputs that are outputs or caches, not inputs."""
    parts = rel.parts
    return (
        "__pycache__" in parts
        or ".ipynb_checkpoints" in parts
        or rel.suffix == ".pyc"
        or (
            parts[0] == "docs"
            and len(parts) > 1
            and (parts[1] == "generated" or parts[1].startswith(".generated"))
        )
        or (parts[0] == "notebooks" and len(parts) > 1 and parts[1] == "outputs")
    )


def _notebook_code(path: Path) -> bytes:
    """What of a notebook the build depends on: each cell's type and source (outputs and metadata left out, so
    running a tutorial in JupyterLab, which saves its outputs, does not make the site stale)."""
    try:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return json.dumps(
            [(c.get("cell_type"), "".join(c.get("source", ""))) for c in cells], ensure_ascii=False
        ).encode()
    except (ValueError, KeyError, TypeError):
        return path.read_bytes()  # not a notebook nbformat could read: the build will say so


def _digest_files(root: Path, name: str) -> str:
    """SHA-256 over the paths and contents of ``root/name`` (a file, or every file below a folder)."""
    h = hashlib.sha256()
    top = root / name
    files = sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else [top]
    for path in files:
        rel = path.relative_to(root)
        if not path.is_file() or _skipped(rel):
            continue
        data = _notebook_code(path) if path.suffix == ".ipynb" else path.read_bytes()
        h.update(f"{rel.as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def inputs_digest(root: Path = ROOT) -> dict[str, str]:
    """What the last build is compared with under ``--reuse``: ``{"pages": ..., "site": ...}``, SHA-256 digests.

    ``pages`` covers :data:`PAGE_INPUTS` below ``root`` (for notebooks only the cells' sources), this
    interpreter and the versions of :data:`SITE_PACKAGES`; ``site`` covers that and :data:`SITE_INPUTS`.
    """
    tools = [sys.version]
    for package in SITE_PACKAGES:
        try:
            tools.append(f"{package}={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            tools.append(f"{package}=-")
    pages = hashlib.sha256("\0".join(tools + [_digest_files(root, n) for n in PAGE_INPUTS]).encode())
    site = hashlib.sha256(
        "\0".join([pages.hexdigest()] + [_digest_files(root, n) for n in SITE_INPUTS]).encode()
    )
    return {"pages": pages.hexdigest(), "site": site.hexdigest()}


def read_stamp(generated: Path = GENERATED) -> dict:
    """The last build's record (:func:`inputs_digest`'s digests, ``site_dir``: None until mkdocs succeeded,
    ``strict``), or {} when there is none."""
    try:
        stamp = json.loads((generated / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def pages_current(digest: dict[str, str], generated: Path = GENERATED) -> bool:
    """Were the pages in ``generated`` (the executed tutorials among them) made from inputs with ``digest``?"""
    return read_stamp(generated).get("pages") == digest["pages"]


def site_current(site_dir: Path, digest: dict[str, str], generated: Path = GENERATED) -> bool:
    """Was the site in ``site_dir`` built, with warnings as errors, from inputs with ``digest``?"""
    stamp = read_stamp(generated)
    return (
        stamp.get("site") == digest["site"]
        and stamp.get("pages") == digest["pages"]
        and stamp.get("site_dir") == str(Path(site_dir).resolve())
        and stamp.get("strict") is True
        and (Path(site_dir) / "index.html").is_file()
    )


def write_stamp(
    digest: dict[str, str],
    site_dir: Path | None,
    seconds: dict[str, float],
    *,
    strict: bool = False,
    generated: Path = GENERATED,
) -> None:
    """Record in ``generated`` what the pages (and the site in ``site_dir``, unless None) were built from."""
    record = {
        **digest,
        "site_dir": None if site_dir is None else str(Path(site_dir).resolve()),
        "strict": strict,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
    }
    write_text(generated / STAMP, json.dumps(record, indent=1) + "\n")


# ---------------------------------------------------------------------------------------- pages from files
def readme_sections(readme: str, titles: tuple[str, ...] = README_SECTIONS) -> str:
    """The README's ``## <title>`` sections (each up to the next ``## ``), in the order of ``titles``."""
    found = {}
    for block in re.split(r"(?m)^(?=## )", readme):
        first = block.splitlines()[0] if block else ""
        if first.startswith("## "):
            found[first[3:].strip()] = block.rstrip() + "\n"
    missing = [t for t in titles if t not in found]
    if missing:
        raise DocsBuildError(
            f"README.md has no section {missing[0]!r}: update README_SECTIONS in {__file__}."
        )
    return "\n".join(found[t] for t in titles)


def quickstart_page() -> str:
    """The quick-start page: the README's intro paragraph and its setup, quick-start and loading sections."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    intro = readme.split("\n## ", 1)[0].split("\n", 1)[1].strip()  # after the "# sdexplore" title
    body = readme_sections(readme)
    return (
        "# Quick start\n\n"
        "*From the project's `README.md`, copied at every build.*\n\n" + intro + "\n\n" + body
    )


def copied_page(source: Path, note: str) -> str:
    """A Markdown file from elsewhere in the repository, with a line saying where it comes from."""
    text = source.read_text(encoding="utf-8")
    title, _, rest = text.partition("\n")
    return f"{title}\n\n*{note}*\n{rest}"


def api_page() -> str:
    """One mkdocstrings entry per name in ``sdexplore.__all__``, grouped as the package groups them."""
    import sdexplore

    groups: dict[str, list[str]] = {}
    for name in sdexplore.__all__:
        module = sdexplore._EXPORTS.get(name, "")  # the defining module, as the package's lazy loader has it
        if name == "__version__":
            group = "Package"
        elif module == "errors":
            group = "Errors"
        elif module in ("editing", "record.control", "results.edit"):
            group = "Editing by attention"
        elif module.startswith(("record", "results", "generation")):
            group = "Recording and results"
        elif module in ("text", "interpolate", "walks", "smoothness"):
            group = "Prompts, interpolation and walks"
        elif module in ("inversion", "images", "masks"):
            group = "Your own images"
        elif module.startswith("sweeps"):
            group = "Sweeps"
        else:
            group = "Loading, families and the tour"
        groups.setdefault(group, []).append(name)
    order = [
        "Loading, families and the tour",
        "Recording and results",
        "Editing by attention",
        "Prompts, interpolation and walks",
        "Your own images",
        "Sweeps",
        "Errors",
        "Package",
    ]
    lines = [
        "# API reference",
        "",
        "Every public name of `sdexplore` (its `__all__`), generated from the docstrings by mkdocstrings at each "
        "build. Topic modules (`sdexplore.views.widgets`, `sdexplore.views.plots`, `sdexplore.embedded.scenes`, ...) hold the rest; "
        "the [architecture page](../architecture.md) explains how the pieces fit.",
        "",
    ]
    for group in order:
        names = groups.pop(group, [])
        if names:
            lines += [f"## {group}", ""]
            lines += [f"::: sdexplore.{n}\n" for n in names]
    if groups:
        raise DocsBuildError(f"API groups without a place on the page: {sorted(groups)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- executed pages
def _kernel_spec(root: Path) -> Path:
    """A ``python3`` kernel spec that runs *this* interpreter (the project's venv), in ``root``."""
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3 (sdexplore docs)", "language": "python"})
    )
    return root


_SIBLING_NOTEBOOK = re.compile(r"\]\((\d\d_\w+)\.ipynb(#[^)]*)?\)")  # a link to another tutorial


def _show_gif(output: dict) -> None:
    """Give an ``image/gif`` output (``IPython.display.Image`` of a GIF) an HTML view of the same bytes.

    nbconvert's HTML templates render PNG, JPEG and SVG but not GIF; without this the walk animations would be
    missing from the pages.
    """
    data = output.get("data", {})
    if "image/gif" in data and "text/html" not in data:
        gif = "".join(data["image/gif"]).replace("\n", "")  # base64
        data["text/html"] = f'<img src="data:image/gif;base64,{gif}" alt="animation">'


def execute_notebook(path: Path, out: Path) -> float:
    """Execute ``path`` top to bottom (cwd ``notebooks/``) and write the executed copy to ``out``; seconds."""
    import nbclient
    import nbformat

    t0 = time.perf_counter()
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        raise DocsBuildError(f"{path.name} failed while building the docs:\n{e}") from None
    nb.metadata.pop("widgets", None)  # static build: no widget state to keep
    for cell in nb.cells:
        if cell.cell_type == "markdown":  # "next: [..](02_step_by_step.ipynb)" -> that tutorial's page
            cell.source = _SIBLING_NOTEBOOK.sub(r"](\1.html\2)", cell.source)  # use_directory_urls: false
        for output in cell.get("outputs", []):
            _show_gif(output)
    write_text(out, nbformat.writes(nb))
    return time.perf_counter() - t0


def run_gallery(out: Path) -> float:
    """Draw the gallery (``scripts/docs_gallery.py``) in its own process; seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "docs_gallery.py"), str(out)],
        env={**os.environ, **RUN_ENV},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise DocsBuildError(f"scripts/docs_gallery.py failed:\n{proc.stderr[-4000:]}")
    return time.perf_counter() - t0


#: The parts of MathJax 2 (shipped by the jupyter-server-mathjax package) the tutorials' formulas need: the
#: TeX input, the HTML-CSS output with its STIX-Web fonts (what nbconvert's page template configures), 6 MB.
MATHJAX_PARTS = (
    "MathJax.js",
    "config",
    "extensions",
    "jax/input",
    "jax/element",
    "jax/output/HTML-CSS",
    "fonts",
)


def copy_mathjax(target: Path) -> None:
    """Copy MathJax into ``target`` so the tutorial pages typeset their formulas offline (no CDN)."""
    try:
        import jupyter_server_mathjax
    except ImportError:
        raise DocsBuildError(
            "The tutorials' formulas need MathJax from jupyter-server-mathjax: pip install -e '.[docs]'."
        ) from None
    static = Path(jupyter_server_mathjax.__file__).parent / "static"
    for part in MATHJAX_PARTS:
        source = static / part
        if source.is_dir():
            shutil.copytree(source, target / part)
        else:
            (target / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / part)
    write_text(target / "config" / "sdexplore.js", MATHJAX_CONFIG)


#: Loaded after MathJax's own configuration (``?config=...,sdexplore``): only the STIX-Web fonts ship with
#: jupyter-server-mathjax, so HTML-CSS must not look for its default TeX fonts (they 404 and glyphs misalign).
MATHJAX_CONFIG = """MathJax.Hub.Config({
  "HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null}
});
MathJax.Ajax.loadComplete("[MathJax]/config/sdexplore.js");
"""


def generate(target: Path, *, workers: int = 2) -> dict[str, float]:
    """Write every generated page into ``target`` (a fresh folder); returns seconds per executed page."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import docs_cli_reference

    write_text(target / "quickstart.md", quickstart_page())
    write_text(target / "cli_reference.md", docs_cli_reference.render())
    write_text(target / "api.md", api_page())
    write_text(
        target / "model_card.md",
        copied_page(
            MODEL_DIR / "MODEL_CARD.md",
            "The embedded model's card: sdexplore/models/tiny-shapes/MODEL_CARD.md.",
        ),
    )
    shutil.copyfile(MODEL_DIR / "sample_grid.png", target / "sample_grid.png")
    # the MMDiT's card in a folder of its own: both cards show a sample_grid.png beside them
    write_text(
        target / "mmdit" / "model_card.md",
        copied_page(
            MMDIT_MODEL_DIR / "MODEL_CARD.md",
            "The embedded MMDiT model's card: sdexplore/models/tiny-shapes-mmdit/MODEL_CARD.md.",
        ),
    )
    shutil.copyfile(MMDIT_MODEL_DIR / "sample_grid.png", target / "mmdit" / "sample_grid.png")
    copy_mathjax(target / "mathjax")
    write_text(
        target / "benchmarks.md",
        copied_page(
            ROOT / "benchmarks" / "RESULTS.md", "From benchmarks/RESULTS.md; `make bench` measures it."
        ),
    )

    notebooks = sorted(NOTEBOOKS.glob("0*.ipynb"))
    if not notebooks:
        raise DocsBuildError(f"No tutorial notebooks (0*.ipynb) in {NOTEBOOKS}.")
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="sdexplore-docs-") as tmp:
        env = {
            **RUN_ENV,
            "JUPYTER_PATH": os.pathsep.join(
                filter(None, [str(_kernel_spec(Path(tmp) / "jupyter")), os.environ.get("JUPYTER_PATH")])
            ),
            # notebook 5 writes its animations here; the notebook test checks them (mkdocs skips dot folders)
            "SDEXPLORE_OUT": str(target / TUTORIAL_OUTPUTS),
            # each explorer's live page, beside the tutorial pages that frame it
            "SDEXPLORE_EMBED_PAGES": str(target / "tutorials" / EXPLORER_PAGES),
            # the kernels' own temporary folder: whatever a tutorial leaves there is listed for the notebook test
            "TMPDIR": str(Path(tmp) / "kernel_tmp"),
        }
        (Path(tmp) / "kernel_tmp").mkdir()
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # kernels inherit this process's environment
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                jobs = {}
                # the walk tutorials (04, 05: ~25 s each on one core) first, so the two workers finish together
                for nb in reversed(notebooks):
                    jobs[nb.stem] = pool.submit(execute_notebook, nb, target / "tutorials" / nb.name)
                jobs["gallery"] = pool.submit(run_gallery, target / "gallery")
                failed = []
                for name, job in jobs.items():
                    try:
                        seconds[name] = job.result()
                    except DocsBuildError as e:  # wait for every notebook: one report names all that failed
                        failed.append(str(e))
                if failed:
                    raise DocsBuildError("\n\n".join(failed))
            left = sorted(p.name for p in (Path(tmp) / "kernel_tmp").iterdir())
            write_text(target / TUTORIAL_OUTPUTS / TEMP_LEFT, json.dumps(left) + "\n")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return seconds


def build(site_dir: Path, *, strict: bool = True, reuse: bool = False) -> dict[str, float]:
    """Generate the pages into ``docs/generated`` (replaced whole) and build the site into ``site_dir``.

    With ``reuse``, a part built from inputs of the same digest is kept: nothing is done when the site in
    ``site_dir`` is current, only ``mkdocs build`` when the generated pages are. Returns seconds per step
    (empty when everything was reused).
    """
    site_dir = Path(site_dir).resolve()
    digest = inputs_digest()  # read before the build: a source changed meanwhile makes the next run rebuild
    if reuse and strict and site_current(site_dir, digest):
        return {}
    seconds: dict[str, float] = {}
    if not (reuse and pages_current(digest)):
        t0 = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=".generated-", dir=DOCS))
        try:
            seconds = generate(staging)
            old = DOCS / ".generated-old"
            if GENERATED.exists():
                shutil.rmtree(old, ignore_errors=True)
                GENERATED.rename(old)
                shutil.rmtree(old)
            staging.rename(GENERATED)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        seconds["generate"] = time.perf_counter() - t0
        write_stamp(digest, None, seconds)  # the pages are current; the site is not built yet
    t0 = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "mkdocs",
        "build",
        "--config-file",
        str(ROOT / "mkdocs.yml"),
        "--site-dir",
        str(site_dir),
    ]
    if strict:
        cmd.append("--strict")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **RUN_ENV})
    if proc.returncode != 0:
        raise DocsBuildError(f"mkdocs build failed (warnings are errors):\n{proc.stderr[-6000:]}")
    seconds["mkdocs"] = time.perf_counter() - t0
    write_stamp(digest, site_dir, seconds, strict=strict)
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``make docs``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--site-dir", type=Path, default=ROOT / "site", help="where to write the site (default site/)"
    )
    parser.add_argument("--no-strict", action="store_true", help="do not treat mkdocs warnings as errors")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep what was built from the same inputs (docs/generated/.build.json records their digest)",
    )
    args = parser.parse_args(argv)
    try:
        seconds = build(args.site_dir.resolve(), strict=not args.no_strict, reuse=args.reuse)
    except DocsBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not seconds:
        print("docs up to date in", args.site_dir, "(built from the same inputs; reused)")
        return 0
    print("docs built in", args.site_dir, "|", ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
