"""The public surface: every exported name resolves, and importing sdexplore stays light."""

import subprocess
import sys

import sdexplore


def test_every_public_name_resolves():
    for name in sdexplore.__all__:
        assert getattr(sdexplore, name) is not None, name
    assert callable(sdexplore.observe) and callable(sdexplore.walk) and callable(sdexplore.load_pipeline)
    assert sdexplore.widgets.TimestepScrubber is not None


def test_import_does_not_load_diffusers():
    code = "import sys, sdexplore; print('diffusers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_unknown_attribute_is_an_attribute_error():
    try:
        sdexplore.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")
