"""Shared test fixtures: tiny random-weight pipelines of each family (fresh per test, built in ~0.3 s)."""

from __future__ import annotations

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
