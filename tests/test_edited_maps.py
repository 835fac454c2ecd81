"""Maps recorded under an attention control say so (``AttentionMaps.edited``), and save and load like any maps.

A reweighted word's pixels no longer sum to 1 over the keys, which the loader's mass check would refuse; the
flag tells it the maps were edited. Maps recorded without a control, or with a control that changed nothing
(zero strength), are not flagged, and their mass is still checked.
"""

from __future__ import annotations

import pytest
import torch
from conftest import gen

import sdexplore as sdx
from sdexplore.errors import ResultFileError
from sdexplore.fixtures import tiny_pipeline

P = "a big red circle on a blue background"
RUN = dict(num_inference_steps=3, output_type="np")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd1")


def _maps(pipe, weight: float | None):
    control = None if weight is None else sdx.Reweight({"circle": weight})
    with sdx.observe(pipe, steps=False, attention=True, control=control) as obs:
        pipe(P, generator=gen(0), **RUN)
    return obs.attention


def test_maps_recorded_under_an_ablation_are_flagged_and_load_back(pipe, tmp_path) -> None:
    maps = _maps(pipe, 0.0)
    mass = maps.aggregate.double().sum(1)  # (B, H, W)
    assert maps.edited and float(mass.max()) < 0.999  # the ablated word's share is gone
    loaded = sdx.AttentionMaps.load(maps.save(tmp_path / "ablated.safetensors"))
    assert loaded.edited and torch.equal(loaded.aggregate, maps.aggregate)
    assert float(loaded.word("circle").abs().max()) == 0.0


@pytest.mark.parametrize("weight", [None, 1.0])
def test_plain_and_zero_strength_maps_are_not_flagged_and_keep_the_mass_check(pipe, weight) -> None:
    maps = _maps(pipe, weight)
    assert not maps.edited
    tensors, header = maps.to_state()
    sdx.AttentionMaps.from_state(tensors, header)  # as recorded: loads
    halved = {**tensors, "aggregate": tensors["aggregate"] * 0.5}  # half of each pixel's mass gone
    with pytest.raises(ResultFileError, match="sums to"):
        sdx.AttentionMaps.from_state(halved, header)
    header["maps"]["edited"] = True  # the flag is what lets a reweighted mass load
    assert sdx.AttentionMaps.from_state(halved, header).edited
