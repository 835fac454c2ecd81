"""The package's layers import downwards only (docs/architecture.md): checked on the source, import by import.

Also checked here: no module only re-exports names from another (each name is imported from where it is defined),
and the module-level imports form no cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import sdexplore

ROOT = Path(sdexplore.__file__).parent

# layer -> the sdexplore modules (top-level names) it may import; a module name or a package name
PURE_MATH = {"schedule_math", "preview", "interpolate", "heatmaps", "smoothness"}
# "": the package top itself (``from .. import __version__``), which loads nothing on import
LEAVES = {"", "errors", "_files", "_checks", "_signals", "_quiet", "_images"}
# the family records themselves (families.py): plain facts over leaves and pure math, so a result loader can check a file's
# channels and map kind against its family without loading a model
RECORDS = {"families"}
RESULTS = {"results"} | PURE_MATH | LEAVES | RECORDS
FAMILIES = {"families", "tokenizer", "data", "masks"} | RESULTS
RECORD = {"record", "decoding", "fixtures"} | FAMILIES
# the views layer and the command line: they may import anything below them
VIEWS = {"views", "cli"}
# the file writers a result may call lazily (Walk.save_gif, Observation.save_html, Walk.save_html): the only views
# anything below the views layer imports, and only inside a function
LAZY_VIEWS = {"views.export", "views.pages"}
# the writers, with the page's payload builder; what they may import: leaves, pure math, results, each other and
# the shared picture code (views.render, which imports nothing of views) -- no widget, plot, recorder or CLI
WRITERS = LAZY_VIEWS | {"views.payload"}
WRITERS_MAY_IMPORT = LEAVES | PURE_MATH | RESULTS | WRITERS | {"views.render"}


@dataclass(frozen=True)
class Imported:
    """One sdexplore module an import statement names: ``module`` dotted inside sdexplore (``"views.export"``);
    ``lazy``: inside a function (runs on call, not on import); ``typing``: under ``if TYPE_CHECKING``."""

    module: str
    lazy: bool = False
    typing: bool = False

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def _is_module(dotted: str, root: Path) -> bool:
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(source: str, package: tuple[str, ...], root: Path | None = ROOT) -> list[Imported]:
    """Every sdexplore module a source imports (relative or absolute), dotted inside sdexplore; ``package`` is the
    file's package inside sdexplore (``()`` at the top, ``("record",)`` in record/). ``from X import a`` names
    ``X.a`` where that is a module under ``root`` (``None``: never), else ``X``."""
    tree = ast.parse(source)
    found: list[Imported] = []

    def visit(node: ast.AST, lazy: bool, typing: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy = True
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                visit(child, lazy, True)
            for child in node.orelse:
                visit(child, lazy, typing)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = list(package[: len(package) - node.level + 1])
                parts += node.module.split(".") if node.module else []
            elif node.module and node.module.split(".")[0] == "sdexplore":
                parts = node.module.split(".")[1:]
            else:
                parts = None
            if parts is not None:
                for alias in node.names:
                    full = ".".join([*parts, alias.name])
                    if (not parts and root is None) or (root is not None and _is_module(full, root)):
                        found.append(Imported(full, lazy, typing))  # "from . import errors": a module
                    else:  # a name of a module or package ("" for the package top: __version__)
                        found.append(Imported(".".join(parts), lazy, typing))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "sdexplore" and len(parts) > 1:
                    found.append(Imported(".".join(parts[1:]), lazy, typing))
        for child in ast.iter_child_nodes(node):
            visit(child, lazy, typing)

    visit(tree, False, False)
    return found


def _sdexplore_imports(source: str, package: tuple[str, ...]) -> set[str]:
    """Top-level sdexplore module names a source imports, lazily or not, e.g. {"errors", "results"}."""
    return {imp.top for imp in _imports(source, package)}


def _package(path: Path) -> tuple[str, ...]:
    return path.relative_to(ROOT).parts[:-1]


def _modules(*names: str) -> list[Path]:
    paths = []
    for name in names:
        p = ROOT.joinpath(*name.split("."))
        if p.is_dir():
            paths += sorted(p.rglob("*.py"))
        elif p.with_suffix(".py").is_file():
            paths.append(p.with_suffix(".py"))
    return paths


def _all_modules() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.py") if "__pycache__" not in p.parts)


def _dotted(path: Path) -> str:
    """sdexplore/views/render.py -> "views.render"; sdexplore/views/__init__.py -> "views"."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@pytest.mark.parametrize(
    ("modules", "allowed"),
    [
        (sorted(PURE_MATH), LEAVES),
        (sorted(RECORDS), LEAVES | PURE_MATH),
        (["results"], RESULTS),
        (["families", "tokenizer", "masks"], FAMILIES),
        (["record"], RECORD),
    ],
    ids=["pure-math", "family-records", "results", "families", "record"],
)
def test_a_layer_imports_only_the_layers_below_it(modules, allowed) -> None:
    """Module-level and lazy imports alike; the lazy file writers of the results are the next test's matter."""
    bad = []
    for path in _modules(*modules):
        own = path.relative_to(ROOT).parts[0].removesuffix(".py")
        for imp in _imports(path.read_text(), _package(path)):
            if imp.top in allowed | {own} or (imp.lazy and imp.module in LAZY_VIEWS):
                continue
            bad.append(f"{path.relative_to(ROOT)} imports {imp.module}")
    assert not bad, "\n".join(bad)


def test_nothing_below_the_views_imports_views_or_the_cli_but_the_lazy_file_writers() -> None:
    """views/** and cli/** may import anything below them; nothing below imports them, except a function-local
    import of views.export or views.pages in results/ (the result classes' save_gif, save_html)."""
    bad = []
    for path in _all_modules():
        rel = path.relative_to(ROOT)
        if (
            rel.parts[0] in VIEWS or rel.as_posix() == "__main__.py"
        ):  # __main__: `python -m sdexplore` runs the CLI
            continue
        for imp in _imports(path.read_text(), _package(path)):
            if imp.top not in VIEWS:
                continue
            if rel.parts[0] == "results" and imp.lazy and imp.module in LAZY_VIEWS:
                continue
            bad.append(f"{rel} imports {imp.module}{' (lazily)' if imp.lazy else ''}")
    assert not bad, "\n".join(bad)


def test_the_file_writers_import_only_leaves_pure_math_and_results() -> None:
    """views/export.py and views/pages.py (with its payload builder), which results/ may call, import only leaves,
    pure math, results and views.render -- lazily or not; and views.render imports nothing else of views."""
    bad = []
    for dotted in sorted(WRITERS):
        for path in _modules(dotted):
            for imp in _imports(path.read_text(), _package(path)):
                if imp.top != "views" and imp.top in WRITERS_MAY_IMPORT or imp.module in WRITERS_MAY_IMPORT:
                    continue
                bad.append(f"{path.relative_to(ROOT)} imports {imp.module}")
    for path in _modules("views.render"):
        bad += [
            f"views/render.py imports {i.module}"
            for i in _imports(path.read_text(), _package(path))
            if i.top in VIEWS
        ]
    assert _modules("views.export"), "views/export.py is gone: update LAZY_VIEWS"
    assert not bad, "\n".join(bad)


def test_views_read_results_and_never_the_attachment() -> None:
    """Everything in views/ (render, plots, widgets, export, pages) and the command line draw from result objects;
    none reaches into record.attach."""
    paths = _modules(*sorted(VIEWS))
    assert {p.relative_to(ROOT).parts[0] for p in paths} == VIEWS
    bad = []
    for path in paths:
        text = path.read_text()
        names = {imp.module for imp in _imports(text, _package(path))}
        if "record.attach" in names or "record.attach" in text or "from .attach" in text:
            bad.append(str(path.relative_to(ROOT)))
    assert not bad, bad


# ---------------------------------------------------------------------------------------- no re-export modules


def _only_reexports(source: str) -> bool:
    """True when a module is nothing but a docstring, imports and ``__all__`` (and at least one import)."""
    body = ast.parse(source).body
    imports = 0
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imports += isinstance(node, ast.Import) or node.module != "__future__"
        elif (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            continue  # the docstring
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if not all(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                return False
        else:
            return False
    return imports > 0


def test_no_module_only_re_exports_another() -> None:
    """Import each name from the module that defines it: a module of imports and ``__all__`` alone (an old address
    kept alive) is refused. Package ``__init__.py`` files are exempt: gathering a package's names is their job."""
    bad = [
        str(p.relative_to(ROOT))
        for p in _all_modules()
        if p.name != "__init__.py" and _only_reexports(p.read_text())
    ]
    assert not bad, f"re-export-only modules (import from the defining module instead): {bad}"


def test_the_re_export_check_tells_a_re_export_from_a_module_with_code() -> None:
    assert _only_reexports(
        '"""Old address."""\n\nfrom .record.steps import StepRecorder\n\n__all__ = ["StepRecorder"]\n'
    )
    assert _only_reexports(
        "from __future__ import annotations\n\nfrom .embedded.scenes import *  # noqa: F403\n"
    )
    assert not _only_reexports('"""Nothing."""\n')
    assert not _only_reexports("from .x import y\n\n\ndef f():\n    return y\n")
    assert not _only_reexports("from .x import y\n\nLIMIT = 3\n")


# ---------------------------------------------------------------------------------------- no import cycle


def _graph(sources: dict[str, str], root: Path | None) -> dict[str, set[str]]:
    """module -> the sdexplore modules its module-level imports load (not lazy ones, not TYPE_CHECKING ones).
    ``sources``: dotted module (``"views.render"``, a package as ``"views"``) -> its source."""
    graph: dict[str, set[str]] = {}
    for name, source in sources.items():
        is_package = root is not None and (root.joinpath(*name.split(".")) / "__init__.py").is_file()
        package = tuple(name.split(".")) if is_package else tuple(name.split(".")[:-1])
        targets = set()
        for imp in _imports(source, tuple(p for p in package if p), root):
            if imp.lazy or imp.typing:
                continue
            module = imp.module
            while module and module not in sources:  # a name from a package (its __init__)
                module = module.rpartition(".")[0]
            if module and module != name:
                targets.add(module)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_module_level_imports_form_no_cycle() -> None:
    """A cycle works only by import order (and breaks when someone imports the other end first): none allowed.
    Function-local imports are left out: they run after both modules have loaded."""
    sources = {_dotted(p): p.read_text() for p in _all_modules()}
    graph = _graph(sources, ROOT)
    assert graph["views.widgets"] and graph["cli"], (
        "the graph misses imports"
    )  # the checker sees edges at all
    cycles = _cycles(graph)
    assert not cycles, f"import cycles among module-level imports: {cycles}"


def test_the_cycle_check_finds_a_small_cycle() -> None:
    sources = {
        "a": "from .b import x\n",
        "b": "from . import c\n",
        "c": "import sdexplore.a\n",
        "d": "from .a import y\n\ndef f():\n    from .d import z\n",
    }
    graph = _graph(sources, None)
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    sources["c"] = "def later():\n    import sdexplore.a\n"  # made lazy: no cycle
    assert _cycles(_graph(sources, None)) == []


def test_the_import_checker_sees_relative_absolute_and_lazy_imports(tmp_path) -> None:
    source = "from ..widgets import x\nimport sdexplore.cli\nfrom . import attach\ndef f():\n    from ..plots import y\n"
    assert _sdexplore_imports(source, ("record",)) == {"widgets", "cli", "record", "plots"}
    assert _sdexplore_imports("from . import errors\nfrom .results import Trace\n", ()) == {
        "errors",
        "results",
    }
    (tmp_path / "views").mkdir()
    for name in ("__init__", "export", "pages"):
        (tmp_path / "views" / f"{name}.py").touch()
    source = "from ..views import export\ndef f():\n    from ..views import pages, x\n"
    found = _imports(source, ("results",), tmp_path)
    assert found == [
        Imported("views.export"),
        Imported("views.pages", lazy=True),
        Imported("views", lazy=True),
    ]
    typed = _imports(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .results import Trace\n", ()
    )
    assert typed == [Imported("results", typing=True)]
