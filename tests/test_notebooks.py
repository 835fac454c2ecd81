"""The tutorial notebooks run top to bottom on the embedded model, and are committed without outputs.

Each tutorial is executed once per test run, by the documentation build (``docs_build`` in conftest.py: nbclient,
this venv's python3 kernel, two kernels at a time, explorers as static figures); these tests read the executed
copies it leaves in ``docs/generated/tutorials``. The explorers as live widgets are checked in a real browser by
tests/test_browser.py and widget by widget in tests/test_widgets.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

# The dev extras (pip install -e ".[dev]"): a missing one is an import error, not a skipped tutorial.
import ipykernel  # noqa: F401  (the notebooks' kernel)
import ipywidgets  # noqa: F401  (the notebooks' explorers)
import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("0*.ipynb"))
#: A top-level line that makes an explorer (the cell then displays it: a static figure in the executed copy).
EXPLORER = re.compile(
    r"^(\w+ = )?(TimestepScrubber|AttentionExplorer|InterpolationExplorer|WalkPlayer|EditExplorer|DirectionExplorer)\("
)
#: Notebook → explorers it must display.
EXPLORERS = {
    "02_step_by_step.ipynb": 2,  # TimestepScrubber after the run, and the live one
    "03_attention.ipynb": 1,
    "04_interpolation.ipynb": 3,
    "05_latent_walks.ipynb": 3,
    "06_your_own_image.ipynb": 2,  # TimestepScrubber with its upload control, AttentionExplorer
    "07_edit_by_attention.ipynb": 1,  # EditExplorer
    "08_directions.ipynb": 1,  # DirectionExplorer
}
#: Notebook → lines its UNet-versus-MMDiT section prints: both embedded models ran, from the same noise.
SIDE_BY_SIDE = {
    "02_step_by_step.ipynb": (
        "UNet: tiny-shapes, UNet2DConditionModel",
        "MMDiT: tiny-shapes-mmdit, SD3Transformer2DModel",
        "same VAE weights: True; same starting noise: True",
    ),
    "03_attention.ipynb": (
        "UNet · cross",
        "MMDiT · joint",
        "MMDiT · text",
        "MMDiT · output",
        "the three MMDiT runs drew the same images: True",
        "shape-word IoU",
    ),
}


def committed_text(path: Path) -> str:
    """The notebook as git holds it for the next commit (its staged blob: ``git show :./NAME``), so a user's own
    run in JupyterLab, which autosaves outputs into the working tree, never fails the suite. Outside a git
    checkout, or for a file git does not track, the file itself."""
    try:
        proc = subprocess.run(
            ["git", "show", f":./{path.name}"], cwd=path.parent, capture_output=True, text=True, check=False
        )
    except OSError:  # no git on this machine
        proc = None
    if proc is not None and proc.returncode == 0:
        return proc.stdout
    return path.read_text(encoding="utf-8")


def output_problems(text: str, name: str) -> list[str]:
    """What a committed tutorial must not hold: outputs or execution counts (one message per cell)."""
    nb = nbformat.reads(text, as_version=4)
    return [
        f"{name}: cell {c.get('id', i)} keeps outputs; clear them before committing (Edit > Clear Outputs of "
        "All Cells, then save)"
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]


def test_there_are_eight_tutorials_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_tour.ipynb",
        "02_step_by_step.ipynb",
        "03_attention.ipynb",
        "04_interpolation.ipynb",
        "05_latent_walks.ipynb",
        "06_your_own_image.ipynb",
        "07_edit_by_attention.ipynb",
        "08_directions.ipynb",
    ]
    for path in NOTEBOOKS:
        text = committed_text(path)
        assert not output_problems(text, path.name), output_problems(text, path.name)[0]
        nb = nbformat.reads(text, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), path.name
        assert code[0].source.startswith("MODEL = None"), f"{path.name}: the first code cell sets MODEL"
        assert "stable-diffusion" in code[0].source


def test_outputs_saved_by_a_users_run_pass_and_committed_outputs_fail(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
        )

    path = tmp_path / "01_x.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")])
    nbformat.write(nb, path)
    assert output_problems(committed_text(path), path.name) == []  # not a git checkout: the file itself
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="1\n")]
    nb.cells[0].execution_count = 1
    nbformat.write(nb, path)
    assert output_problems(committed_text(path), path.name)  # ... which now has outputs
    git("init", "-q")
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(1)")]), path)
    git("add", path.name)
    git("commit", "-q", "-m", "clean")
    nbformat.write(nb, path)  # JupyterLab autosaves the run's outputs
    assert output_problems(committed_text(path), path.name) == []
    git("add", path.name)  # about to be committed with them
    assert "keeps outputs" in output_problems(committed_text(path), path.name)[0]
    git("commit", "-q", "-m", "outputs")
    assert output_problems(committed_text(path), path.name)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, executed_tutorials):
    nb = nbformat.read(executed_tutorials / "tutorials" / path.name, as_version=4)
    source = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.source for c in code] == [c.source for c in source.cells if c.cell_type == "code"], (
        f"{path.name}: the executed copy is not of this notebook's code"
    )
    assert all(c.execution_count is not None for c in code if c.source.strip()), f"{path.name}: not all ran"
    outputs = [o for c in code for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    assert any("image/png" in o.get("data", {}) for o in outputs), "the tutorial shows figures"
    shown = [
        c.id
        for c in code
        if any(EXPLORER.match(line) for line in c.source.splitlines())
        and any(m.startswith("image/") for o in c.outputs for m in o.get("data", {}))
    ]
    assert len(shown) >= EXPLORERS.get(path.name, 0), f"{path.name}: an explorer cell shows nothing"
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for line in SIDE_BY_SIDE.get(path.name, ()):
        assert line in printed, f"{path.name}: the UNet-versus-MMDiT section did not print {line!r}"
    if path.name == "05_latent_walks.ipynb":
        written = executed_tutorials / ".outputs"
        assert (written / "tour.gif").stat().st_size > 0 and (written / "tour.mp4").stat().st_size > 0


@pytest.mark.slow
def test_the_tutorials_leave_no_temporary_folders(executed_tutorials):
    """The kernels ran with their own TMPDIR; notebook 3's sweep once left an ``sdexplore-sweep-*`` folder there
    on every run. The build lists whatever is left."""
    import json

    left = json.loads((executed_tutorials / ".outputs" / "temp_left_behind.json").read_text())
    assert left == [], f"the tutorials left these in the temporary folder: {left}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_a_fresh_run_prints_nothing_on_stderr_before_the_model_loads(path, executed_tutorials):
    """A newcomer's first cells show no pink warnings (transformers' torchvision-fallback notes were the case),
    and no cell shows that note at all."""
    nb = nbformat.read(executed_tutorials / "tutorials" / path.name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    first_load = next((i for i, c in enumerate(code) if "load_pipeline(" in c.source), 0)
    for i, cell in enumerate(code):
        stderr = "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stderr")
        assert "requires torchvision" not in stderr, f"{path.name} cell {i}: {stderr[:200]}"
        if i <= first_load:
            assert not stderr.strip(), f"{path.name} cell {i} printed on stderr: {stderr[:300]}"
