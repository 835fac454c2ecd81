"""The package's layers import downwards only (docs/architecture.md): checked on the source, import by import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sdexplore

ROOT = Path(sdexplore.__file__).parent

# layer -> the sdexplore modules (top-level names) it may import; a module name or a package name
PURE_MATH = {"schedule_math", "preview", "interpolate", "heatmaps", "smoothness"}
LEAVES = {"errors", "_files", "_checks", "_signals", "_quiet", "_images"}
EXPORT = {"export"}  # frames → GIF/MP4/PNG files: imports only the leaves
# the family records themselves (families.py): plain facts over leaves and pure math, so a result loader can check a file's
# channels and map kind against its family without loading a model
RECORDS = {"families"}
RESULTS = {"results"} | EXPORT | PURE_MATH | LEAVES | RECORDS
FAMILIES = {"families", "tokenizer", "data", "masks"} | RESULTS
RECORD = {"record", "decoding", "fixtures"} | FAMILIES
VIEWS = {"widgets", "plots", "cli", "cli_output", "render", "tour"}


def _sdexplore_imports(source: str, package: tuple[str, ...]) -> set[str]:
    """Top-level sdexplore module names a source imports (relative or absolute), e.g. {"errors", "results"};
    ``package`` is the file's package inside sdexplore (``()`` at the top, ``("record",)`` in record/)."""
    tree = ast.parse(source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                parts = base + (node.module.split(".") if node.module else [])
                if not parts:  # "from . import x" at the top: the names are modules
                    found.update(alias.name for alias in node.names)
                    continue
                found.add(parts[0])
            elif node.module and node.module.split(".")[0] == "sdexplore":
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "sdexplore" and len(parts) > 1:
                    found.add(parts[1])
    return found


def _modules(*names: str) -> list[Path]:
    paths = []
    for name in names:
        p = ROOT / name
        paths += sorted(p.rglob("*.py")) if p.is_dir() else [p.with_suffix(".py")]
    return paths


@pytest.mark.parametrize(
    ("modules", "allowed"),
    [
        (sorted(PURE_MATH), LEAVES),
        (sorted(EXPORT), LEAVES),
        (sorted(RECORDS), LEAVES | PURE_MATH),
        (["results"], RESULTS),
        (["families", "tokenizer", "masks"], FAMILIES),
        (["record"], RECORD),
    ],
    ids=["pure-math", "export", "family-records", "results", "families", "record"],
)
def test_a_layer_imports_only_the_layers_below_it(modules, allowed) -> None:
    bad = []
    for path in _modules(*modules):
        own = path.relative_to(ROOT).parts[0].removesuffix(".py")
        extra = _sdexplore_imports(path.read_text(), path.relative_to(ROOT).parts[:-1]) - allowed - {own}
        if extra:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(extra)}")
    assert not bad, "\n".join(bad)


def test_views_read_results_and_never_the_attachment() -> None:
    """Widgets, plots, the command line and render draw from result objects; none reaches into record.attach."""
    bad = []
    for path in _modules(*sorted(VIEWS)):
        text = path.read_text()
        if "attach" in text and ("record.attach" in text or "from .attach" in text):
            bad.append(str(path.relative_to(ROOT)))
    assert not bad, bad


def test_the_import_checker_sees_relative_absolute_and_lazy_imports() -> None:
    source = "from ..widgets import x\nimport sdexplore.cli\nfrom . import attach\ndef f():\n    from ..plots import y\n"
    assert _sdexplore_imports(source, ("record",)) == {"widgets", "cli", "record", "plots"}
    assert _sdexplore_imports("from . import errors\nfrom .results import Trace\n", ()) == {
        "errors",
        "results",
    }
