"""transformers' torchvision-fallback note is silenced, narrowly: loading the embedded model prints nothing on
stderr, and every other message on the same logger still gets through."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from sdexplore._quiet import TRANSFORMERS_IMPORT_LOGGER, TorchvisionFallbackFilter

NOTE = (
    "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` for "
    "backward compatibility. Install torchvision to use the default backend, or import `CLIPImageProcessorPil` "
    "directly to silence this warning."
)


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord(TRANSFORMERS_IMPORT_LOGGER, logging.WARNING, __file__, 1, message, None, None)


def test_the_filter_drops_only_the_fallback_note():
    f = TorchvisionFallbackFilter()
    assert not f.filter(_record(NOTE))
    assert not f.filter(_record(NOTE.replace("CLIPImageProcessor", "SiglipImageProcessor")))
    for other in (
        "Could not load PIL fallback CLIPImageProcessorPil: boom",
        "`Foo` requires torchvision >= 0.27",
        "LANCZOS resample requires torchvision >= 0.27 and processing on CPU",
        "something else entirely " + NOTE,
    ):
        assert f.filter(_record(other)), other
    assert any(
        isinstance(x, TorchvisionFallbackFilter)
        for x in logging.getLogger(TRANSFORMERS_IMPORT_LOGGER).filters
    )


@pytest.mark.slow
def test_loading_the_embedded_model_writes_nothing_on_stderr():
    """What a notebook's first cell does: without the filter transformers logs two notes here (CLIP, Siglip)."""
    script = (
        "import sdexplore as sdx, logging; "
        "sdx.load_pipeline(); "
        f"logging.getLogger({TRANSFORMERS_IMPORT_LOGGER!r}).warning('still heard')"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "requires torchvision" not in run.stderr
    assert run.stderr.strip().endswith("still heard")  # the logger itself is not muted
