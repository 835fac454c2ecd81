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
