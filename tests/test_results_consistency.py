"""Cross-field consistency of saved results: a header that contradicts its tensors (or itself) fails to load even
when it is re-sealed, i.e. its checksums recomputed after the edit with the format's own ``seal``, so only the
loaders' cross-field checks can catch it. Every result here is a genuine one, recorded from the tiny fixture
pipelines (and the embedded MMDiT, whose 4-channel latents are SD3-family), and each untampered file loads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sdexplore as sdx
from sdexplore.errors import ResultFileError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.results import AttentionMaps, Observation, Trace, Walk
from sdexplore.results import fileformat as ff
from sdexplore.results.inversion import Inversion

TRACE_KEY, MAPS_KEY, WALK_KEY, INV_KEY = (
    "sdexplore.trace",
    "sdexplore.AttentionMaps",
    "sdexplore.Walk",
    "sdexplore.inversion",
)


def _call(pipe, prompt: str = "a red circle"):
    return pipe(
        prompt, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    )


def record(family: str, **attention) -> Observation:
    """One observed CFG call of a tiny fixture pipeline: its steps and its attention maps (negative ones too)."""
    pipe = tiny_pipeline(family)
    with sdx.observe(pipe, steps=True, attention={"negative": True, **attention}) as obs:
        _call(pipe)
    return obs


@pytest.fixture(scope="module")
def sd1_obs() -> Observation:
    return record("sd1")


@pytest.fixture(scope="module")
def sd3_obs() -> Observation:
    return record("sd3")


# ---------------------------------------------------------------- re-sealing (the format's own checksum writer)


def reseal(path: Path, key: str, edit) -> None:
    """Edit a saved file's header and seal it again: every checksum is right, only the content is wrong."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = json.loads(f.metadata()[key])
    header = ff.seal(edit(header), tensors)
    save_file(tensors, str(path), metadata={key: json.dumps(header)})
    side = Path(str(path) + ".json")
    if side.is_file():  # a walk's sidecar carries the same header
        side.write_text(json.dumps(header, indent=1))


def reseal_part(folder: Path, name: str, key: str, edit) -> None:
    """Re-seal one file of a saved Observation and point its index at the new header checksum."""
    reseal(folder / f"{name}.safetensors", key, edit)
    with safe_open(str(folder / f"{name}.safetensors"), framework="pt") as f:
        new_sum = ff.header_sum(json.loads(f.metadata()[key]))
    index = json.loads((folder / "observation.json").read_text())
    index[name][ff.HEADER_SUM] = new_sum
    (folder / "observation.json").write_text(json.dumps(index))


def setting(key: str, value, group: str | None = None):
    def edit(h):
        (h[group] if group else h)[key] = value
        return h

    return edit


def fails(load, path, *fields: str) -> str:
    with pytest.raises(ResultFileError) as e:
        load(path)
    message = str(e.value)
    assert str(path) in message
    for field in fields:
        assert field in message, message
    return message


# ---------------------------------------------------------------- attention maps


def test_genuine_maps_of_every_kind_load(sd1_obs, sd3_obs, tmp_path):
    """The untampered files load: UNet cross-attention, and SD3's joint maps (whose pixels sum below 1)."""
    for name, maps in (("sd1", sd1_obs.attention), ("sd3", sd3_obs.attention)):
        back = AttentionMaps.load(maps.save(tmp_path / f"{name}.safetensors"))
        assert (back.family, back.kind) == (maps.family, maps.kind)
        assert torch.equal(back.aggregate, maps.aggregate)
    assert (sd1_obs.attention.kind, sd3_obs.attention.kind) == ("cross", "joint")


@pytest.mark.parametrize("kind", ["text", "output"])
def test_genuine_mmdit_maps_of_the_other_kinds_load(tmp_path, kind):
    maps = record("sd3", kind=kind).attention
    back = AttentionMaps.load(maps.save(tmp_path / "m.safetensors"))
    assert back.kind == kind


def test_sd3_maps_relabelled_cross_fail_naming_kind_and_family(sd3_obs, tmp_path):
    path = sd3_obs.attention.save(tmp_path / "m.safetensors")
    reseal(path, MAPS_KEY, setting("kind", "cross", "maps"))
    message = fails(AttentionMaps.load, path, "maps.kind", "'cross'", "maps.family", "'sd3'")
    assert "checksum" not in message


def test_unet_maps_relabelled_joint_fail(sd1_obs, tmp_path):
    path = sd1_obs.attention.save(tmp_path / "m.safetensors")
    reseal(path, MAPS_KEY, setting("kind", "joint", "maps"))
    fails(AttentionMaps.load, path, "maps.kind", "'joint'", "'sd1'")


def test_joint_maps_relabelled_as_unet_maps_fail_on_their_mass(sd3_obs, tmp_path):
    """Family and kind both changed (sd3/joint → sd1/cross): the maps themselves do not sum to 1 per pixel."""
    path = sd3_obs.attention.save(tmp_path / "m.safetensors")

    def edit(h):
        h["maps"].update(family="sd1", kind="cross")
        h["maps"]["negative"].update(family="sd1", kind="cross")
        return h

    reseal(path, MAPS_KEY, edit)
    fails(AttentionMaps.load, path, "maps.kind", "sum to 1")


def test_negative_maps_of_another_family_fail(sd1_obs, tmp_path):
    assert sd1_obs.attention.negative is not None
    path = sd1_obs.attention.save(tmp_path / "m.safetensors")

    def edit(h):
        h["maps"]["negative"]["family"] = "sd2"
        return h

    reseal(path, MAPS_KEY, edit)
    fails(AttentionMaps.load, path, "maps.negative.family")


def test_an_unknown_family_fails(sd1_obs, tmp_path):
    path = sd1_obs.attention.save(tmp_path / "m.safetensors")
    reseal(path, MAPS_KEY, setting("family", "sd9", "maps"))
    fails(AttentionMaps.load, path, "maps.family", "'sd9'")


def test_a_layer_at_a_resolution_the_latent_cannot_have_fails(sd1_obs, tmp_path):
    """Per-layer maps one column wider than any whole downsampling of the latent size gives."""
    maps = sd1_obs.attention
    name = maps.layer_names[0]
    maps2 = AttentionMaps(**{**maps.__dict__, "negative": None})
    maps2.layers = {**maps.layers, name: torch.nn.functional.pad(maps.layers[name], (0, 1))}  # (B, T, h, w+1)
    maps2.layer_heads = maps2.probs = None
    path = maps2.save(tmp_path / "m.safetensors")
    fails(AttentionMaps.load, path, f"tensor 'layers/{name}'", "maps.latent_size")


# ---------------------------------------------------------------- traces


def test_genuine_traces_load(sd1_obs, sd3_obs, tmp_path):
    for name, trace in (("sd1", sd1_obs.steps), ("sd3", sd3_obs.steps)):
        back = Trace.load(trace.save(tmp_path / f"{name}.safetensors"))
        assert back.family == trace.family and len(back) == len(trace)
    assert sd3_obs.steps[0].latents.shape[1] == 16


def test_a_16_channel_trace_labelled_sd1_fails_naming_family(sd3_obs, tmp_path):
    path = sd3_obs.steps.save(tmp_path / "t.safetensors")
    reseal(path, TRACE_KEY, setting("family", "sd1"))
    message = fails(Trace.load, path, "family", "'sd1'", "16 channels")
    assert "checksum" not in message


def test_a_trace_whose_steps_outrun_num_steps_fails(sd1_obs, tmp_path):
    path = sd1_obs.steps.save(tmp_path / "t.safetensors")
    reseal(path, TRACE_KEY, setting("num_steps", 1))
    fails(Trace.load, path, "num_steps", "steps[1].index")


def test_a_trace_stopped_before_its_last_step_fails(sd1_obs, tmp_path):
    path = sd1_obs.steps.save(tmp_path / "t.safetensors")
    reseal(path, TRACE_KEY, setting("stopped_at", 0))
    fails(Trace.load, path, "stopped_at")


def test_a_trace_whose_schedule_begin_disagrees_fails(sd1_obs, tmp_path):
    assert sd1_obs.steps.meta["schedule_begin"] == 0
    path = sd1_obs.steps.save(tmp_path / "t.safetensors")
    reseal(path, TRACE_KEY, setting("schedule_begin", 1, "meta"))
    fails(Trace.load, path, "meta.schedule_begin")


def test_latent_rgb_factors_of_another_family_fail_without_latents(tmp_path):
    """Only previews recorded: the factors' rows (16, SD3's) say the channels, which sd1 cannot have."""
    pipe = tiny_pipeline("sd3")
    with sdx.observe(pipe, quantities=("preview",)) as obs:
        _call(pipe)
    trace = obs.steps
    trace.final_latents = None  # no latent tensor left to count the channels of
    assert len(trace.meta["latent_rgb"]["factors"]) == 16 and trace.quantities() == ("preview",)
    path = trace.save(tmp_path / "t.safetensors")
    Trace.load(path)
    reseal(path, TRACE_KEY, setting("family", "sd2"))
    fails(Trace.load, path, "family", "meta.latent_rgb.factors")


def test_the_embedded_mmdit_4_channel_sd3_trace_loads(tmp_path):
    """A family's record gives the most channels, not the only count: the embedded MMDiT is SD3 with 4."""
    pipe = sdx.load_pipeline("tiny-shapes-mmdit", device="cpu")
    with sdx.observe(pipe, attention=True) as obs:
        pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert obs.steps.family == "sd3" and obs.steps[0].latents.shape[1] == 4
    back = Observation.load(obs.save(tmp_path / "obs"))
    assert back.steps.family == "sd3" and back.attention.kind == "joint"


# ---------------------------------------------------------------- observations (steps and maps of one call)


def test_an_observation_whose_steps_and_maps_disagree_fails(sd1_obs, tmp_path):
    folder = sd1_obs.save(tmp_path / "obs")
    Observation.load(folder)
    reseal_part(folder, "steps", TRACE_KEY, setting("family", "sd2"))  # a valid trace on its own
    Trace.load(folder / "steps.safetensors")
    fails(Observation.load, folder, "steps / attention", "'sd2'", "'sd1'")


# ---------------------------------------------------------------- inversions


@pytest.fixture(scope="module")
def inversion() -> Inversion:
    from sdexplore.embedded.scenes import render_scene

    picture = render_scene("a big red circle at the top left on a blue background", seed=3)[0]  # (64, 64, 3)
    return sdx.invert(tiny_pipeline("sd1"), picture, "a red circle", steps=2, iterations=0)


def test_a_genuine_inversion_loads_and_its_psnr_is_recomputable(inversion, tmp_path):
    from sdexplore.inversion import psnr

    back = Inversion.load(inversion.save(tmp_path / "i.safetensors"))
    assert back.psnr == inversion.psnr == psnr(back.reconstruction, back.image)
    assert math.isfinite(back.psnr)


def test_an_inversion_with_a_made_up_psnr_fails(inversion, tmp_path):
    path = inversion.save(tmp_path / "i.safetensors")
    reseal(path, INV_KEY, setting("psnr", 99.0))
    message = fails(Inversion.load, path, "psnr", "99 dB")
    assert "checksum" not in message


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (setting("steps", 3, "settings"), "settings.steps"),
        (setting("family", "sd3", "settings"), "method"),  # SD3 inverts with 'flow', not 'ddim'
        (setting("method", "negative-prompt"), "settings.negative_prompt"),
        (setting("negative_prompt", "blurry", "settings"), "settings.negative_prompt"),
    ],
)
def test_inversion_fields_that_disagree_fail(inversion, tmp_path, edit, field):
    path = inversion.save(tmp_path / "i.safetensors")
    reseal(path, INV_KEY, edit)
    fails(Inversion.load, path, field)


def test_an_sd3_inversion_relabelled_sd1_fails_on_its_channels(tmp_path):
    from sdexplore.embedded.scenes import render_scene

    picture = render_scene("a big red circle at the top left on a blue background", seed=3)[0]
    inv = sdx.invert(tiny_pipeline("sd3"), picture, "a red circle", steps=2, iterations=0)
    path = inv.save(tmp_path / "i.safetensors")
    Inversion.load(path)
    reseal(path, INV_KEY, lambda h: {**h, "method": "ddim", "settings": {**h["settings"], "family": "sd1"}})
    fails(Inversion.load, path, "settings.family", "16 channels")


# ---------------------------------------------------------------- walks


@pytest.fixture(scope="module")
def genuine_walk() -> Walk:
    return sdx.walk(
        tiny_pipeline("sd1"),
        ["a red circle", "a blue square", "a green circle"],
        seeds=[0, 1, 2],
        frames=5,
        num_inference_steps=2,
        height=64,
        width=48,
        progress=False,
    )


def test_a_genuine_walk_loads(genuine_walk, tmp_path):
    back = Walk.load(genuine_walk.save(tmp_path / "w.safetensors"))
    assert back.keyframe_frames == genuine_walk.keyframe_frames == [0, 2, 4]


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (setting("keyframe_frames", [0, 1, 4]), "keyframe_frames[1]"),  # frame 1 is between keyframes
        (setting("keyframe_frames", [1, 2, 4]), "keyframe_frames[0]"),
        (setting("ts", [0.0, 0.5, 0.0, 0.75, 0.5]), "ts[4]"),  # t goes back inside segment 1
        (
            setting("loop", True, "settings"),
            None,
        ),  # loop true is consistent with a path that never loops back
        (lambda h: {**h, "segments": [0, 0, 1, 1, 2], "ts": [0.0, 0.5, 0.0, 0.5, 0.0]}, "settings.loop"),
        (setting("height", 48, "settings"), "settings.height"),
        (setting("width", 64, "settings"), "settings.width"),
        (setting("family", "sd5", "settings"), "settings.family"),
    ],
)
def test_walk_fields_that_disagree_fail(genuine_walk, tmp_path, edit, field):
    path = genuine_walk.save(tmp_path / "w.safetensors")
    reseal(path, WALK_KEY, edit)
    if field is None:
        Walk.load(path)
        return
    message = fails(Walk.load, path, field)
    assert "checksum" not in message and "not saved together" not in message


def test_a_refined_walk_still_loads(genuine_walk, tmp_path):
    """refine() inserts frames between the keyframes; the path checks hold for its output as for walk()'s."""
    from sdexplore.walks import refine

    refined = refine(tiny_pipeline("sd1"), genuine_walk, 2, progress=False)
    assert len(refined) == 7
    back = Walk.load(refined.save(tmp_path / "w.safetensors"))
    assert back.keyframe_frames == refined.keyframe_frames
    assert np.array_equal(back.images, refined.images)
