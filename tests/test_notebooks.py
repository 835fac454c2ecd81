"""The tutorial notebooks run top to bottom on the embedded model (nbclient, this venv's python3 kernel)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The dev extras (pip install -e ".[dev]"): a missing one is an import error, not a skipped tutorial.
import ipykernel  # noqa: F401  (the notebooks' kernel)
import ipywidgets  # noqa: F401  (the notebooks' explorers)
import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("0*.ipynb"))
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
#: Notebook → explorer classes it must display as live widgets.
EXPLORERS = {
    "02_step_by_step.ipynb": 2,  # TimestepScrubber after the run, and the live one
    "03_attention.ipynb": 1,
    "04_interpolation.ipynb": 3,
    "05_latent_walks.ipynb": 3,
    "06_your_own_image.ipynb": 2,  # TimestepScrubber with its upload control, AttentionExplorer
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


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """A ``python3`` kernel spec that runs *this* interpreter, first on JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (sdexplore tests)",
                "language": "python",
            }
        )
    )
    return {
        "JUPYTER_PATH": os.pathsep.join([str(root), os.environ.get("JUPYTER_PATH", "")]).rstrip(os.pathsep)
    }


def test_there_are_six_tutorials_committed_without_outputs():
    assert [p.name for p in NOTEBOOKS] == [
        "01_tour.ipynb",
        "02_step_by_step.ipynb",
        "03_attention.ipynb",
        "04_interpolation.ipynb",
        "05_latent_walks.ipynb",
        "06_your_own_image.ipynb",
    ]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), (
            f"{path.name}: clear its outputs"
        )
        assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), path.name
        assert code[0].source.startswith("MODEL = None"), f"{path.name}: the first code cell sets MODEL"
        assert "stable-diffusion" in code[0].source


@pytest.fixture(scope="module")
def executed(kernel_env, tmp_path_factory):
    """Every tutorial executed, two kernels at a time (each kernel single-threaded: two cores, two kernels).

    Returns ``{name: (notebook, error or None)}`` and the folder notebook 5 writes its animations to.
    """
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path_factory.mktemp("sdexplore_out")
    env = {
        **kernel_env,
        "SDEXPLORE_OUT": str(out),  # notebook 5 writes its animations here
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        # one BLAS/OpenMP thread per kernel: on a shared CI box, spinning thread pools slow a tiny model 20×
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }

    def run(path: Path):
        nb = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(
            nb,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
            store_widget_state=True,
        )
        try:
            client.execute()
        except Exception as exc:  # reported by the notebook's own test
            return nb, exc
        return nb, None

    with pytest.MonkeyPatch.context() as mp, ThreadPoolExecutor(max_workers=2) as pool:
        for k, v in env.items():  # kernels inherit this process's environment
            mp.setenv(k, v)
        mp.delenv("SDEXPLORE_STATIC", raising=False)
        results = dict(zip([p.name for p in NOTEBOOKS], pool.map(run, NOTEBOOKS), strict=True))
    return results, out


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, executed):
    results, tmp_path = executed
    nb, error = results[path.name]
    if error is not None:
        raise error
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    assert any("image/png" in o.get("data", {}) for o in outputs), "the tutorial shows figures"
    views = [o.data[WIDGET_VIEW]["model_id"] for o in outputs if WIDGET_VIEW in o.get("data", {})]
    explorer_views = [v for v in views if _is_explorer(nb, v)]
    assert len(explorer_views) >= EXPLORERS.get(path.name, 0), (
        f"{path.name}: explorers must display as widgets"
    )
    if explorer_views:
        state = nb.metadata["widgets"][WIDGET_STATE]["state"]
        assert all(v in state for v in explorer_views), (
            "widget state is stored, so the saved notebook renders"
        )
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    for line in SIDE_BY_SIDE.get(path.name, ()):
        assert line in printed, f"{path.name}: the UNet-versus-MMDiT section did not print {line!r}"
    if path.name == "05_latent_walks.ipynb":
        assert (tmp_path / "tour.gif").stat().st_size > 0 and (tmp_path / "tour.mp4").stat().st_size > 0


def _is_explorer(nb, model_id: str) -> bool:
    """Is this widget view one of sdexplore's explorers (a VBox with an ``sdx-...`` class)?"""
    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE, {}).get("state", {})
    classes = state.get(model_id, {}).get("state", {}).get("_dom_classes", [])
    return any(c.startswith("sdx-") for c in classes)
