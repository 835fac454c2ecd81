"""sdexplore.generate on the families whose pipelines differ from SD's call: Flux.2 [klein] (its first argument is
a reference image, so the prompt goes by keyword), PixArt-Σ and Sana (their record's call defaults: no resolution
binning at small sizes), Wan (a video: the output's frames). The pictures equal a plain call's, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import gen
from test_conformance import P, call_kwargs, pipe_of

import sdexplore as sdx
from sdexplore.families import FAMILIES


@pytest.mark.parametrize("name", ["flux2", "pixart-sigma", "sana", "wan"])
def test_generate_gives_the_plain_calls_pictures(name) -> None:
    pipe = pipe_of(name)
    out = pipe(prompt=P, generator=gen(0), **call_kwargs(name))
    want = out.frames if hasattr(out, "frames") else out.images
    kw = {k: v for k, v in call_kwargs(name).items() if k not in dict(FAMILIES[name].call_defaults)}
    pictures, obs = sdx.generate(pipe, P, seed=0, **kw)  # the call defaults come from the record
    assert np.array_equal(pictures, want)
    assert len(obs.steps) == kw["num_inference_steps"]
