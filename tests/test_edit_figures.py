"""Issue 29's editing figures that are met, held on both embedded models with a 3-prompt subset of the benchmark's
held-out EVAL prompts (one circle, one square, one triangle; benchmarks/bench_edit_figures.py measures all 12).

Each test asserts the property with a margin and against the naive baseline where the issue asks for one; the
figures themselves (and those missed) are in the benchmark's output and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_edit_figures as bench  # noqa: E402

PROMPTS = bench.EVAL[::4]  # a circle, a square, a triangle: each kind swap once
MODELS = ["unet", "mmdit"]


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    return request.param, bench.load(request.param)


def test_the_subset_is_held_out_and_covers_each_kind() -> None:
    from sdexplore.embedded import scenes

    assert {scenes.parse_prompt(p).shape for p in PROMPTS} == set(bench.KIND_SWAPS)
    assert set(bench.EVAL) <= set(scenes.validation_prompts()) and not set(bench.EVAL) & set(bench.TUNING)


@pytest.mark.slow
def test_a_colour_swap_reads_as_the_new_colour_and_keeps_place_and_background(model) -> None:
    name, pipe = model
    rows = bench.colour_swaps(pipe, name, PROMPTS, naive=False)
    assert all(r["colour"] and r["place_kept"] and r["background_kept"] for r in rows), rows


@pytest.mark.slow
def test_a_kind_swap_keeps_place_colour_and_background(model) -> None:
    name, pipe = model
    rows = bench.kind_swaps(pipe, name, PROMPTS, naive=False)
    assert all(r["place_kept"] and r["colour_kept"] and r["background_kept"] for r in rows), rows


@pytest.mark.slow
def test_ablating_the_background_word_leaves_the_shapes_mask(model) -> None:
    name, pipe = model
    rows = bench.ablations(pipe, name, PROMPTS, "background", variants=("attention",), naive=False)
    assert np.mean([r["attention_iou"] for r in rows]) >= 0.92, rows  # issue 29's bar: 0.9
