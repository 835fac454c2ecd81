"""Shared test fixtures: tiny random-weight pipelines of each family (fresh per test, built in ~0.3 s)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from sdexplore.fixtures import tiny_pipeline

torch.set_num_threads(1)


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
