"""Shared test fixtures: tiny random-weight pipelines of each family (fresh per test, built in ~0.3 s), and the
documentation site with the executed tutorials, built once per run for the docs and notebook tests."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from filelock import FileLock

from sdexplore.fixtures import tiny_pipeline

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
#: Where the suite builds the documentation site (git-ignored). The executed tutorials land in
#: docs/generated/tutorials, as ``make docs`` leaves them.
SITE_DIR = ROOT / "build" / "site"


class ModelLoaded(Exception):
    """Raised by the ``no_model`` fake loader: every check the CLI makes before loading a model has passed."""


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Replace the CLI's model load by a recorder that stops the command: what reached it passed every check."""
    from sdexplore.cli import _common as cli  # where the commands find the model loader

    calls: list[tuple] = []

    def fake_load(*args: object, **kwargs: object) -> None:
        calls.append(args)
        raise ModelLoaded

    monkeypatch.setattr(cli, "_load", fake_load)
    return calls


@pytest.fixture
def sd1_pipe():
    return tiny_pipeline("sd1")


@pytest.fixture
def sd2_pipe():
    return tiny_pipeline("sd2")


@pytest.fixture
def sdxl_pipe():
    return tiny_pipeline("sdxl")


@pytest.fixture(params=["sd1", "sd2", "sdxl"])
def any_pipe(request):
    """Each fixture family in turn."""
    return tiny_pipeline(request.param)


def gen(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator."""
    return torch.Generator("cpu").manual_seed(seed)


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module, loaded once (registered in sys.modules before it runs: its dataclasses look
    their module up there)."""
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def pipeline_state(pipe) -> dict:
    """Everything sdexplore may change on a pipeline, by identity (the denoiser is the family record's)."""
    from sdexplore.families import detect_family

    den = detect_family(pipe).get_denoiser(pipe)
    return dict(
        cls=type(pipe),
        procs=dict(den.attn_processors),
        pre=dict(den._forward_pre_hooks),
        post=dict(den._forward_hooks),
        sched=pipe.scheduler,
        sched_vars=dict(vars(pipe.scheduler)),
        pipe_vars={k: v for k, v in vars(pipe).items() if k != "_interrupt"},
    )


def assert_restored(pipe, before: dict) -> None:
    """``pipe`` is exactly as ``pipeline_state`` saw it, and nothing of sdexplore is attached."""
    from sdexplore.record.attach import attachment_of

    now = pipeline_state(pipe)
    assert now["cls"] is before["cls"] and now["sched"] is before["sched"]
    assert now["procs"].keys() == before["procs"].keys()
    assert all(now["procs"][k] is v for k, v in before["procs"].items())
    assert now["pre"] == before["pre"] == {} and now["post"] == before["post"] == {}
    assert now["sched_vars"].keys() == before["sched_vars"].keys() and "step" not in vars(pipe.scheduler)
    per_call = {"_current_timestep", "_joint_attention_kwargs"}  # FluxPipeline sets new ones in every call
    assert all(now["pipe_vars"][k] is v for k, v in before["pipe_vars"].items() if k not in per_call)
    for k in per_call & before["pipe_vars"].keys():
        a, b = now["pipe_vars"][k], before["pipe_vars"][k]
        assert type(a) is type(b) and (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), k
    added = (
        now["pipe_vars"].keys() - before["pipe_vars"].keys()
    )  # a first call sets diffusers' _guidance_scale...
    assert all(k.startswith("_") and not callable(now["pipe_vars"][k]) for k in added), added
    assert getattr(pipe, "_interrupt", False) is False and attachment_of(pipe) is None


# ---------------------------------------------------------------------------------------- the docs build
@pytest.fixture(scope="session")
def docs_build() -> dict:
    """``scripts/build_docs.py --site-dir build/site --reuse``, once per test session.

    It executes every tutorial once (static explorers), draws the gallery and runs ``mkdocs build --strict``;
    a site built from the same inputs (same digest) is reused, one built from other inputs never is. No
    timeout: the build takes minutes on a loaded 2-core box, and CI's own limit bounds the run. Returns the
    digests of the inputs before the build, its return code and its output.
    """
    build_docs = load_script("build_docs")
    with site_lock():  # pytest-xdist: the first worker builds, the others wait and reuse its site
        digest = build_docs.inputs_digest()
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "build_docs.py"), "--site-dir", str(SITE_DIR), "--reuse"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    return {"digest": digest, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}


def site_lock() -> FileLock:
    """The lock every build of ``build/site`` in the suite holds: with several pytest-xdist workers each runs the
    session fixtures, so one builds the site while the others wait, then find it current and reuse it."""
    SITE_DIR.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(SITE_DIR.parent / "site.lock"))


@pytest.fixture(scope="session")
def docs_site(docs_build) -> Path:
    """The built site (``build/site``); the tests that use it fail with the build's message if it failed."""
    assert docs_build["returncode"] == 0, (
        f"the docs build failed (mkdocs --strict):\n{docs_build['stderr'][-6000:]}"
    )
    return SITE_DIR


@pytest.fixture(scope="session")
def executed_tutorials(docs_build) -> Path:
    """``docs/generated``, holding ``tutorials/*.ipynb`` (each tutorial as the docs build executed it) and
    ``.outputs/`` (the files they wrote). Available when the build's execution step succeeded, even if
    ``mkdocs build`` then failed."""
    build_docs = load_script("build_docs")
    if docs_build["returncode"] != 0 and not build_docs.pages_current(docs_build["digest"]):
        pytest.fail(f"the tutorials did not execute in the docs build:\n{docs_build['stderr'][-6000:]}")
    return build_docs.GENERATED
