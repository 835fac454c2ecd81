"""The documentation site builds offline with warnings as errors, and its pages hold what they promise.

One build per test session (``scripts/build_docs.py --reuse``, what ``make docs`` runs, into ``build/site``; see
``docs_build`` in conftest.py): the tutorials executed on the embedded model, the gallery drawn, ``mkdocs build
--strict``. A few minutes on 2 cores, so the build's tests are slow; tests/test_notebooks.py reads the same
executed tutorials.
"""

from __future__ import annotations

import html
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import build_docs  # noqa: E402
import griffe_comment_docstrings  # noqa: E402
from conftest import site_lock  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))
#: A top-level statement that draws: a matplotlib figure, a plotting helper, an explorer (static figure on the
#: site), an image. Function definitions (and their indented bodies) are not drawing.
DRAWS = re.compile(
    r"plt\.(subplots|figure|show)\(|\b(show_row|overlay_row|plot_\w+)\(|"
    r"\b(TimestepScrubber|AttentionExplorer|InterpolationExplorer|WalkPlayer|EditExplorer)\(|\bShowImage\(|^player$"
)


class Page(HTMLParser):
    """The parts of one HTML page the checks read: images, links, ids, and the text per notebook cell."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.error_outputs = 0  # stderr / error output areas
        self.cell_images: dict[str, int] = {}  # notebook cell id -> images in its output
        self._cell: str | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
            if a["id"].startswith("cell-id="):
                self._cell = a["id"][len("cell-id=") :]
                self.cell_images.setdefault(self._cell, 0)
        if a.get("data-mime-type") == "application/vnd.jupyter.stderr" or "jp-OutputArea-error" in (
            a.get("class") or ""
        ):
            self.error_outputs += 1
        if tag == "img" and a.get("src"):
            self.images.append(a["src"])
            if self._cell is not None:
                self.cell_images[self._cell] += 1
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])
        if tag == "link" and a.get("href"):
            self.links.append(a["href"])
        if tag == "script" and a.get("src"):
            self.links.append(a["src"])


def _text(markup: str) -> str:
    """Visible text of some HTML, whitespace collapsed."""
    markup = re.sub(r"(?s)<(script|style)\b.*?</\1>", " ", markup)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", markup)).split())


def _squash(text: str) -> str:
    """Text without whitespace or Markdown emphasis marks: compares source snippets with highlighted HTML."""
    return re.sub(r"[\s`*]", "", text)


# ---------------------------------------------------------------------------------------- fast checks
def test_readme_sections_are_found_in_order_and_a_missing_one_is_named():
    readme = "# x\n\nintro\n\n## A\n\na text\n\n## B\n\nb text\n\n## C\nc\n"
    assert build_docs.readme_sections(readme, ("B", "A")) == "## B\n\nb text\n\n## A\n\na text\n"
    with pytest.raises(build_docs.DocsBuildError, match="'Quick start'"):
        build_docs.readme_sections(readme, ("A", "Quick start"))
    real = (ROOT / "README.md").read_text()
    assert "sdx.observe(pipe" in build_docs.readme_sections(real)  # the sections the site shows exist


def test_comment_docstrings_and_rest_roles():
    lines = ["x = 1", "#: The folder.", "#: Second line.", "FOLDER = 2", "", "Y = 3"]
    assert griffe_comment_docstrings.comment_docstring(lines, 4) == "The folder.\nSecond line."
    assert griffe_comment_docstrings.comment_docstring(lines, 6) is None
    md = griffe_comment_docstrings.markdown_from_rest(
        "See :func:`~sdexplore.record.observe.observe` and :class:`Trace`.\n\n::\n\n    code()\n"
    )
    assert md == "See `observe` and `Trace`.\n\n\n    code()\n"  # the "::" line is gone, the code block stays


def test_pages_workflow_is_valid_yaml_and_runs_the_build_ci_runs():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "docs.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` key as True
    assert "push" in triggers and "workflow_dispatch" in triggers
    steps = workflow["jobs"]["build"]["steps"]
    assert [s["run"] for s in steps if "run" in s] == ["make docs"]
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "site"
    assert any(
        s.get("uses", "").startswith("actions/deploy-pages") for s in workflow["jobs"]["deploy"]["steps"]
    )
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"(?m)^docs: setup\n\t(.+)$", makefile)
    assert recipe and "scripts/build_docs.py" in recipe.group(1)  # the script this file's build runs
    assert re.search(r'pip install --quiet -e "\.\[[^]]*\bdocs\b', makefile), (
        "make test installs the docs extra"
    )


def test_every_command_of_the_cli_is_in_the_docs_command_lists():
    import docs_cli_reference

    from sdexplore.cli import build_parser

    commands = list(docs_cli_reference._subcommands(build_parser()))  # what the parser registers
    assert {"describe", "steps", "invert", "sweep"} <= set(commands)
    guide = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    examples = guide.split("```bash\n", 1)[1].split("```", 1)[0]  # the guide's opening list of commands
    headings = [ln for ln in guide.splitlines() if ln.startswith("## ")]
    home = next(ln for ln in (ROOT / "docs" / "index.md").read_text().splitlines() if "(cli.md)" in ln)
    for name in commands:
        word = rf"sdexplore {re.escape(name)}(?![\w-])"
        assert re.search(rf"(?m)^{word}", examples), f"docs/cli.md: no `sdexplore {name}` example at the top"
        assert any(re.search(word, h) for h in headings), f"docs/cli.md: no section for `sdexplore {name}`"
        assert re.search(rf"`(sdexplore )?{re.escape(name)}`", home), f"docs/index.md: `{name}` not listed"


def _mini_project(root: Path) -> Path:
    """The inputs of a site, in miniature: a README, a notebook, a docs page, a module, the config."""
    for rel, text in {
        "README.md": "# x\n",
        "mkdocs.yml": "site_name: x\n",
        "docs/index.md": "# Home\n",
        "sdexplore/a.py": "A = 1\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    (root / "notebooks").mkdir()
    nbformat.write(nb, root / "notebooks" / "01_x.ipynb")
    return root


def test_the_inputs_digest_follows_the_sources_and_not_outputs(tmp_path):
    root = _mini_project(tmp_path)
    first = build_docs.inputs_digest(root)

    def digest_after(rel: str, text: str) -> dict[str, str]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
        return build_docs.inputs_digest(root)

    # what a build writes, caches, and a notebook's saved outputs (JupyterLab autosaves them) change nothing
    assert digest_after("docs/generated/api.md", "# API\n") == first
    assert digest_after("sdexplore/__pycache__/a.cpython-311.pyc", "x") == first
    nb = nbformat.read(root / "notebooks" / "01_x.ipynb", as_version=4)
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[0].execution_count = 1
    nbformat.write(nb, root / "notebooks" / "01_x.ipynb")
    assert build_docs.inputs_digest(root) == first
    # a docs page or the config: the site is stale, the generated pages (executed tutorials) are not
    page = digest_after("docs/index.md", "# Home, edited\n")
    assert page["pages"] == first["pages"] and page["site"] != first["site"]
    # a notebook's code or the package: both are stale
    nb.cells[0].source = "print(2)"
    nbformat.write(nb, root / "notebooks" / "01_x.ipynb")
    code = build_docs.inputs_digest(root)
    assert code["pages"] != page["pages"] and code["site"] != page["site"]
    assert digest_after("sdexplore/a.py", "A = 2\n")["pages"] != code["pages"]


def test_a_build_is_reused_only_for_the_same_inputs_site_folder_and_strictness(tmp_path):
    generated, site_dir = tmp_path / "generated", tmp_path / "site"
    digest = {"pages": "p1", "site": "s1"}
    assert not build_docs.pages_current(digest, generated)  # nothing built yet
    build_docs.write_stamp(digest, None, {}, generated=generated)  # pages generated, mkdocs not (yet) run
    assert build_docs.pages_current(digest, generated)
    assert not build_docs.site_current(site_dir, digest, generated)
    site_dir.mkdir()
    (site_dir / "index.html").write_text("<html></html>")
    build_docs.write_stamp(digest, site_dir, {"mkdocs": 1.0}, strict=True, generated=generated)
    assert build_docs.site_current(site_dir, digest, generated)
    assert not build_docs.site_current(tmp_path / "elsewhere", digest, generated)
    assert not build_docs.site_current(site_dir, {"pages": "p1", "site": "s2"}, generated)  # docs edited
    assert build_docs.pages_current({"pages": "p1", "site": "s2"}, generated)  # ... the tutorials stand
    assert not build_docs.pages_current({"pages": "p2", "site": "s1"}, generated)  # code edited
    build_docs.write_stamp(digest, site_dir, {}, strict=False, generated=generated)
    assert not build_docs.site_current(site_dir, digest, generated)  # a --no-strict build is not reused
    build_docs.write_stamp(digest, site_dir, {}, strict=True, generated=generated)
    (site_dir / "index.html").unlink()
    assert not build_docs.site_current(site_dir, digest, generated)  # the site was removed


# ---------------------------------------------------------------------------------------- the built site
@pytest.fixture
def site(docs_site) -> Path:
    """The site built once per test session by scripts/build_docs.py (the ``make docs`` command) into build/site
    (``docs_site`` in conftest.py: reused while its inputs are unchanged)."""
    return docs_site


@pytest.mark.slow
def test_the_suite_builds_the_site_once_and_a_second_build_reuses_it(site, docs_build):
    assert build_docs.site_current(site, docs_build["digest"]), "the suite's site is its inputs' build"
    if build_docs.inputs_digest() != docs_build["digest"]:
        pytest.skip("a source changed during this test run: a second build would rightly rebuild")
    with site_lock():
        again = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "build_docs.py"), "--site-dir", str(site), "--reuse"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    assert again.returncode == 0 and "up to date" in again.stdout, again.stderr[-3000:]


def _page(site: Path, rel: str) -> Page:
    return Page((site / f"{rel}.html").read_text(encoding="utf-8"))


def _html_pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if p.name != "404.html")


@pytest.mark.slow
def test_every_page_of_the_nav_is_built(site):
    for rel in [
        "index",
        "generated/quickstart",
        "generated/gallery/gallery",
        "generated/cli_reference",
        "generated/api",
        "generated/model_card",
        "generated/mmdit/model_card",
        "generated/benchmarks",
        "architecture",
        "notebooks",
        "cli",
        "editing",
        "embedded_model",
        *[f"generated/tutorials/{p.stem}" for p in NOTEBOOKS],
    ]:
        assert (site / f"{rel}.html").is_file(), f"{rel} was not built"
    quick = _squash(_text((site / "generated/quickstart.html").read_text()))
    assert _squash("sdx.observe(pipe, steps=True, attention=True)") in quick
    cli = _text((site / "generated/cli_reference.html").read_text())
    for command in ("describe", "steps", "attention", "walk"):
        assert f"usage: sdexplore {command}" in cli
    for rel in ("generated/model_card", "generated/mmdit/model_card"):
        card = _page(site, rel)
        grids = [src for src in card.images if src.endswith("sample_grid.png")]
        assert grids and all((site / rel).parent.joinpath(src).resolve().is_file() for src in grids), (
            rel,
            card.images,
        )
    mmdit_card = _text((site / "generated/mmdit/model_card.html").read_text())
    assert "tiny-shapes-mmdit" in mmdit_card and "What was tried" in mmdit_card


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_tutorial_page_shows_a_figure_for_every_plotting_cell(site, notebook):
    page = _page(site, f"generated/tutorials/{notebook.stem}")
    source = nbformat.read(notebook, as_version=4)
    drawing = []
    for cell in source.cells:
        if cell.cell_type != "code":
            continue
        top_level = [
            ln for ln in cell.source.splitlines() if ln and not ln[0].isspace() and not ln.startswith("def ")
        ]
        if any(DRAWS.search(ln) for ln in top_level):
            drawing.append(cell.id)
    assert len(drawing) >= 3, f"{notebook.name}: the figure check found too few plotting cells"
    missing = [cid for cid in drawing if page.cell_images.get(cid, 0) == 0]
    assert not missing, f"{notebook.name}: cells {missing} draw, but their page shows no image"
    executed = nbformat.read(ROOT / "docs/generated/tutorials" / notebook.name, as_version=4)
    pictures = sum(
        1
        for c in executed.cells
        if c.cell_type == "code"
        for o in c.outputs
        if any(m.startswith("image/") for m in o.get("data", {}))
    )
    assert len(page.images) == pictures >= len(drawing), f"{notebook.name}: an output picture was dropped"
    for src in page.images:  # each picture is a real embedded image, not an empty tag
        assert src.startswith("data:image/") and len(src) > 2000, src[:80]


@pytest.mark.slow
def test_no_page_shows_an_error_output_or_a_traceback(site):
    for path in [*_html_pages(site), *(ROOT / "docs/generated/tutorials").glob("*.ipynb")]:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".ipynb":
            nb = nbformat.reads(text, as_version=4)
            outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
            assert not [o for o in outputs if o.output_type == "error"], path.name
            assert not [o for o in outputs if o.get("name") == "stderr"], f"{path.name}: stderr on the page"
            continue
        assert Page(text).error_outputs == 0, f"{path.relative_to(site)} shows an error or stderr output"
        assert "Traceback (most recent call last)" not in _text(text), path.relative_to(site)


@pytest.mark.slow
def test_every_public_name_has_a_reference_entry_with_its_docstring(site):
    import griffe

    import sdexplore

    markup = (site / "generated/api.html").read_text(encoding="utf-8")
    loader = griffe.GriffeLoader(
        search_paths=[str(ROOT)],
        extensions=griffe.load_extensions(griffe_comment_docstrings.CommentDocstrings),
    )
    package = loader.load("sdexplore")
    entries = re.split(r'(?=<h3 id="sdexplore\.)', markup)
    sections = {m.group(1): e for e in entries if (m := re.match(r'<h3 id="sdexplore\.(\w+)"', e))}
    assert len(sdexplore.__all__) >= 40
    for name in sdexplore.__all__:
        assert name in sections, f"sdexplore.{name} has no entry in the API reference"
        obj = package[name]
        doc = (obj.final_target if obj.is_alias else obj).docstring
        assert doc is not None and doc.value.strip(), f"sdexplore.{name} has no docstring"
        first = griffe_comment_docstrings.markdown_from_rest(doc.value).strip().splitlines()[0]
        words = first.split()[:8]  # the docstring's first words, as rendered (markup aside)
        assert _squash(" ".join(words)) in _squash(_text(sections[name])), (
            f"sdexplore.{name}: docstring not shown"
        )


@pytest.mark.slow
def test_internal_links_and_images_resolve(site):
    checked = 0
    for path in _html_pages(site):
        page = Page(path.read_text(encoding="utf-8"))
        for ref in [*page.links, *page.images]:
            parts = urlsplit(ref)
            if parts.scheme or ref.startswith(("//", "data:")) or not (parts.path or parts.fragment):
                continue
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            # a file, never a folder: from disk (file://) a folder link opens a directory listing
            assert target.is_file() and site in target.parents, f"{path.relative_to(site)}: {ref} is broken"
            if parts.fragment and target.suffix == ".html":
                ids = page.ids if target == path else Page(target.read_text(encoding="utf-8")).ids
                assert unquote(parts.fragment) in ids, (
                    f"{path.relative_to(site)}: no #{parts.fragment} in {ref}"
                )
            checked += 1
    assert checked > 200  # nav, tables of contents, cross-links: the check saw the site's links


@pytest.mark.slow
def test_gallery_shows_its_pictures_large_with_captions(site):
    from PIL import Image

    markup = (site / "generated/gallery/gallery.html").read_text(encoding="utf-8")
    page = Page(markup)
    names = [Path(src).name for src in page.images if not src.startswith("data:")]
    assert names == ["denoising.png", "attention_words.png", "walk.gif"]
    folder = site / "generated/gallery"
    for name in names:
        with Image.open(folder / name) as im:
            frames = getattr(im, "n_frames", 1)
            assert im.width >= 800 if name.endswith(".png") else im.width >= 256, (name, im.size)
            if name.endswith(".gif"):
                assert frames >= 12, "the walk GIF is an animation"
    for name in names:  # a caption paragraph directly under each picture
        assert re.search(rf'<img[^>]*src="[^"]*{re.escape(name)}"[^>]*>\s*</p>\s*<p><em>', markup), name


class NavLinks(HTMLParser):
    """The ``href`` of every link in a Material page's navigation (``a.md-nav__link``)."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "a" and "md-nav__link" in (a.get("class") or "").split() and a.get("href"):
            self.hrefs.append(a["href"])


@pytest.mark.slow
def test_the_site_works_opened_from_disk(site):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["use_directory_urls"] is False
    # every navigation link of every page leads to an .html file of the site (from disk, a link to a folder
    # opens a directory listing, not the page)
    nav_files = set()
    for path in _html_pages(site):
        for href in NavLinks(path.read_text(encoding="utf-8")).hrefs:
            parts = urlsplit(href)
            if not parts.path:  # "#section" on the same page
                continue
            target = (path.parent / unquote(parts.path)).resolve()
            assert parts.path.endswith(".html") and target.is_file(), f"{path.relative_to(site)}: nav {href}"
            nav_files.add(target)
    assert len(nav_files) >= 20  # the whole nav was seen
    # search without a server: the offline plugin inlines the index into a script
    index = site / "search" / "search_index.js"
    assert index.is_file() and index.read_text(encoding="utf-8").startswith("var __index = {")
    assert '"location":"generated/api.html' in index.read_text(encoding="utf-8").replace(" ", "")
    # and nothing is fetched from the network to run it: every script a page loads is a file of the site
    for path in _html_pages(site):
        for ref in Page(path.read_text(encoding="utf-8")).links:
            if ref.endswith(".js") or ".js?" in ref:
                assert not urlsplit(ref).scheme and not ref.startswith("//"), (
                    f"{path.relative_to(site)}: {ref}"
                )
