"""The public surface: every exported name resolves, and importing sdexplore stays light."""

import subprocess
import sys

import sdexplore


def test_every_public_name_resolves():
    """Each exported name resolves to the object of that name (a wrong lazy-import entry gives another one)."""
    constants = {"EMBEDDED_MODEL_DIR", "EMBEDDED_GUIDANCE_SCALE", "FAMILIES", "__version__"}
    for name in sdexplore.__all__:
        obj = getattr(sdexplore, name)
        if name not in constants:
            assert callable(obj) and obj.__name__ == name, name
            assert obj.__module__.startswith("sdexplore."), (name, obj.__module__)
        if name.endswith("Error"):
            assert issubclass(obj, sdexplore.SdexploreError) and issubclass(obj, Exception), name
    assert (sdexplore.EMBEDDED_MODEL_DIR / "model_index.json").is_file()
    assert sdexplore.EMBEDDED_GUIDANCE_SCALE > 1.0  # a scale that turns classifier-free guidance on
    assert set(sdexplore.FAMILIES) == {
        "sd1",
        "sd2",
        "sdxl",
        "sd3",
        "flux",
        "flux2",
        "pixart-sigma",
        "chroma",
        "sana",
        "wan",
        "z-image",
        "qwen-image",
    }
    assert all(isinstance(f, sdexplore.Family) for f in sdexplore.FAMILIES.values())
    assert {"invert", "Inversion"} <= set(sdexplore.__all__) and callable(sdexplore.images.load_image)
    scrubber = sdexplore.widgets.TimestepScrubber  # sdx.widgets: the explorers, in sdexplore.views.widgets
    assert isinstance(scrubber, type) and scrubber.__module__.startswith("sdexplore.views.widgets")


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


def test_sweep_is_the_function_and_sweeps_its_package():
    """``sdexplore.sweep(...)`` is the function (the package is ``sdexplore.sweeps``, so the names never clash)."""
    import sdexplore.sweeps

    assert (
        sdexplore.sweep is sdexplore.sweeps.sweep and sdexplore.sweep_report is sdexplore.sweeps.sweep_report
    )
