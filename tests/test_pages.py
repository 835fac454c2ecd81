"""Self-contained pages (sdexplore.views.pages / payload) without a browser: the payload's round trip, sizes,
provenance, the colour map, the checksum, the atomic write and the errors raised before any work.

The pages in a real browser: tests/test_pages_browser.py.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import sdexplore
from sdexplore.errors import InvalidArgumentError, NotRecordedError, ResultFileError
from sdexplore.results import Observation
from sdexplore.views import pages
from sdexplore.views import payload as pl

PROMPT = "a big red circle at the top left on a blue background"
MB = 1_000_000


@pytest.fixture(scope="module")
def embedded():
    """The embedded model's default observation (50 steps, steps + attention) and its image."""
    pipe = sdexplore.load_pipeline()
    with sdexplore.observe(pipe, attention=True) as obs:
        image = pipe(PROMPT, generator=torch.Generator().manual_seed(0)).images[0]
    return pipe, obs, image


@pytest.fixture(scope="module")
def a_walk(embedded):
    pipe = embedded[0]
    return sdexplore.walk(
        pipe,
        [PROMPT, "a big yellow square at the bottom right on a purple background"],
        seeds=[0, 1],
        frames=5,
        num_inference_steps=4,
        progress=False,
    )


# ---------------------------------------------------------------------------------------------- encoding
def test_quantised_maps_read_back_within_half_a_level_of_each_map():
    g = torch.Generator().manual_seed(0)
    maps = (
        torch.rand(6, 5, 7, 9, generator=g) * torch.linspace(1e-4, 3.0, 5)[None, :, None, None]
    )  # (S, T, h, w)
    for delta in (None, 0, 1):
        block = pl.quantize_maps(maps, delta=delta)
        back = pl.dequantize_maps(block)
        assert back.shape == (6, 5, 7, 9) and block["shape"] == [6, 5, 7, 9]
        span = (maps.amax((2, 3)) - maps.amin((2, 3))).numpy()[..., None, None]  # each map's own range
        assert np.all(np.abs(back - maps.numpy()) <= span / 510 * 1.001 + 1e-7)
        # each map's own min and max are exact (weak maps keep their shape, not a shared scale's few levels)
        np.testing.assert_allclose(back.min((2, 3)), maps.amin((2, 3)).numpy(), rtol=1e-6)
        np.testing.assert_allclose(back.max((2, 3)), maps.amax((2, 3)).numpy(), rtol=1e-6)


def test_per_step_maps_stored_as_step_differences_are_smaller(embedded):
    steps = embedded[1].attention.steps[:, 0]  # (S, T, h, w)
    plain, delta = pl.quantize_maps(steps), pl.quantize_maps(steps, delta=0)
    assert len(delta["data"]) < 0.7 * len(plain["data"])
    np.testing.assert_array_equal(pl.dequantize_maps(delta), pl.dequantize_maps(plain))


def test_images_are_lossless_and_the_smaller_of_png_and_webp():
    rng = np.random.default_rng(0)
    smooth = np.repeat(np.repeat(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), 8, 0), 8, 1)  # (64, 64, 3)
    for arr in (smooth, rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)):
        img = pl.encode_image(arr)
        np.testing.assert_array_equal(pl.decode_image(img), arr)
        assert img["shape"] == list(arr.shape[:2]) and img["mime"] in ("image/png", "image/webp")
        sizes = {}
        for fmt, kw in (("PNG", {"optimize": True}), ("WEBP", {"lossless": True, "quality": 100})):
            import io

            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format=fmt, **kw)
            sizes[f"image/{fmt.lower()}"] = len(buf.getvalue())
        assert len(pl.b64(b"x" * min(sizes.values()))) == len(img["data"])


def test_colour_map_is_matplotlibs_heat_map_colours():
    from matplotlib import colormaps

    from sdexplore.views.render import HEAT_CMAP

    entry = pl.colormap_entry()
    lut = np.frombuffer(__import__("base64").b64decode(entry["lut"]), np.uint8).reshape(256, 3)
    want = (colormaps[HEAT_CMAP](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    assert entry["name"] == HEAT_CMAP
    np.testing.assert_array_equal(lut, want)
    assert len({tuple(c) for c in lut}) > 200  # a real colour map, not one colour


def test_fnv1a32_known_values():
    # the reference values of FNV-1a 32 (the page's core.js computes the same)
    assert pages.fnv1a32("") == "811c9dc5"
    assert pages.fnv1a32("a") == "e40c292c"
    assert pages.fnv1a32("foobar") == "bf9cf968"


# ---------------------------------------------------------------------------------------------- the JS bundle
def test_modules_bundle_into_one_script_without_imports():
    for name in pages.EXPLORERS:
        src = pages.module_source(name)
        assert src.count("export default") == 1 and "import " not in src.replace("important", "")
        assert (
            re.search(r"^export (function|const|class|async)", src, re.M) is None
        )  # core's names stay private
        head = pages.web_file(f"{name}.js").split("import", 1)[0]
        assert "Model traits read" in head and "payload" in head  # the traits each module reads, documented
    script = pages._page_script(list(pages.EXPLORERS))
    assert "export " not in script and "import {" not in script


def test_unknown_explorer_is_refused():
    with pytest.raises(InvalidArgumentError, match="scrubber"):
        pages.module_source("nope")


# ---------------------------------------------------------------------------------------------- observation pages
def test_observation_page_round_trip_size_and_provenance(embedded, tmp_path):
    _, obs, image = embedded
    path = obs.save_html(tmp_path / "run.html", image=image, model="tiny-shapes", seed=0)
    assert path == tmp_path / "run.html"
    size = path.stat().st_size
    assert size <= 1 * MB, f"the embedded model's page is {size / MB:.2f} MB, over its 1 MB budget"
    text = path.read_text(encoding="utf-8")
    urls = set(re.findall(r"https?://[^\s\"')]+", text)) - {
        "http://www.w3.org/2000/svg"
    }  # a name, not a fetch
    assert not urls  # nothing to fetch: no CDN, no network
    p = pages.read_payload(path)
    assert p["format"] == "sdexplore.page" and p["kind"] == "observation"
    prov = p["provenance"]
    assert prov["model"] == "tiny-shapes" and prov["seed"] == 0 and prov["prompt"] == PROMPT
    assert prov["family"] == "sd1" and prov["scheduler"] == obs.steps.scheduler
    assert prov["sdexplore"] == sdexplore.__version__ and re.match(r"\d{4}-\d\d-\d\d", prov["date"])
    assert prov["steps"] == 50 and prov["size"] == [64, 64]
    np.testing.assert_array_equal(pl.decode_image(p["image"]), np.asarray(image))

    steps = p["steps"]
    trace = obs.steps
    assert steps["count"] == len(trace) == 50 and steps["index"] == trace.indices
    assert steps["alpha_bar"] == pytest.approx([s.alpha_bar for s in trace])
    keys = [panel["key"] for panel in steps["panels"]]
    assert keys == ["noisy", "x0"]
    from sdexplore.views.render import trace_preview

    x0 = next(panel for panel in steps["panels"] if panel["key"] == "x0")
    for i in (0, 25, 49):
        np.testing.assert_array_equal(pl.decode_image(x0["images"][i]), trace_preview(trace, i, "x0"))

    att, maps = p["attention"], obs.attention
    assert att["tokens"] == maps.tokens and len(att["tokens"]) == 77
    circle = next(w for w in att["words"] if w["word"] == "circle")
    assert circle["positions"] == maps.token_lists[0].positions("circle")
    a_twice = next(w for w in att["words"] if w["word"] == "a")
    assert len(a_twice["positions"]) == 2  # every occurrence, as AttentionMaps.word sums them
    assert att["default_word"] == "big"
    agg = pl.dequantize_maps(att["aggregate"])
    span = float(maps.aggregate[0].amax() - maps.aggregate[0].amin())
    assert np.abs(agg - maps.aggregate[0].numpy()).max() <= span / 500
    per_step = pl.dequantize_maps(att["steps"])
    assert per_step.shape == tuple(maps.steps[:, 0].shape)
    assert np.abs(per_step - maps.steps[:, 0].numpy()).max() <= float(maps.steps.amax()) / 500
    assert [layer["name"] for layer in att["layers"]] == maps.layer_names


def test_payload_is_strict_json_even_with_an_infinite_sigma(embedded):
    _, obs, _ = embedded
    trace = obs.steps
    first = trace.steps[0]
    keep = first.sigma
    first.sigma = math.inf  # a flow model's first step: σ = s / (1 − s) with s = 1
    try:
        p = pl.observation_payload(Observation(runs=[trace]))
    finally:
        first.sigma = keep
    json.dumps(p, allow_nan=False)
    assert p["steps"]["sigma"][0] is None and "attention" not in p


def test_a_changed_payload_fails_its_checksum(embedded, tmp_path):
    _, obs, image = embedded
    path = obs.save_html(tmp_path / "run.html", image=image)
    text = path.read_text(encoding="utf-8")
    i = text.index('"kind":"observation"')
    bad = text[:i] + '"kind":"observatioN"' + text[i + len('"kind":"observation"') :]
    with pytest.raises(ResultFileError, match="changed"):
        pages.read_payload(bad)
    with pytest.raises(ResultFileError, match="no payload"):
        pages.read_payload("<html></html>")


def test_prompt_text_cannot_close_the_script_element(embedded, tmp_path):
    _, obs, image = embedded
    path = obs.save_html(tmp_path / "x.html", image=image, prompt="</script><script>alert(1)</script>")
    text = path.read_text(encoding="utf-8")
    assert "alert(1)</script>" not in text.split('id="sdx-payload"', 1)[1].split("</script>", 1)[0]
    assert pages.read_payload(path)["provenance"]["prompt"] == "</script><script>alert(1)</script>"


def test_page_is_written_atomically(embedded, tmp_path, monkeypatch):
    _, obs, image = embedded
    path = tmp_path / "run.html"
    path.write_text("the old page")
    from sdexplore import _files

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(_files.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        obs.save_html(path, image=image)
    assert path.read_text() == "the old page"  # the old file is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.html"]  # no temporary file left
    monkeypatch.undo()
    obs.save_html(path, image=image)
    assert pages.read_payload(path)["kind"] == "observation"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.html"]


@pytest.mark.parametrize(
    "bad, match",
    [
        ("run.png", r"\.html"),
        ("missing/run.html", "does not exist"),
        (None, "not a file path"),
        (3, "not a file path"),
    ],
)
def test_bad_paths_are_refused_before_any_work(embedded, tmp_path, monkeypatch, bad, match):
    _, obs, _ = embedded

    def no_work(*a, **k):
        raise AssertionError("the payload was built before the path was checked")

    monkeypatch.setattr(pl, "observation_payload", no_work)
    monkeypatch.setattr(pl, "walk_payload", no_work)
    target = tmp_path / bad if isinstance(bad, str) else bad
    with pytest.raises(InvalidArgumentError, match=match):
        obs.save_html(target)
    folder = tmp_path / "a.html"
    folder.mkdir()
    with pytest.raises(InvalidArgumentError, match="folder"):
        obs.save_html(folder)


def test_empty_results_are_refused(tmp_path, embedded):
    with pytest.raises(NotRecordedError, match="recorded nothing"):
        Observation().save_html(tmp_path / "x.html")
    with pytest.raises(InvalidArgumentError, match="index"):
        embedded[1].save_html(tmp_path / "x.html", index=3)
    # steps recorded without any picture-able quantity, and no attention: nothing to show
    trace = embedded[1].steps
    bare = sdexplore.Trace(
        steps=[sdexplore.StepRecord(index=0, timestep=1.0, sigma=1.0, alpha_bar=0.5, guidance_scale=7.5)],
        family=trace.family,
        num_steps=1,
    )
    with pytest.raises(NotRecordedError, match="nothing a page can show"):
        Observation(runs=[bare]).save_html(tmp_path / "x.html")
    assert not (tmp_path / "x.html").exists()


def test_channels_add_the_channel_panels(embedded):
    _, obs, _ = embedded
    p = pl.observation_payload(obs, channels=True, layers=False)
    assert [panel["key"] for panel in p["steps"]["panels"]] == ["noisy", "x0", "noise", "latents"]
    assert p["attention"]["layers"] == []


# ---------------------------------------------------------------------------------------------- walk pages
def test_walk_page_round_trip(a_walk, tmp_path):
    path = a_walk.save_html(tmp_path / "walk.html", fps=8, model="tiny-shapes")
    p = pages.read_payload(path)
    w = p["walk"]
    assert p["kind"] == "walk" and w["count"] == len(a_walk) == 5 and w["fps"] == 8
    for i in range(len(a_walk)):
        np.testing.assert_array_equal(pl.decode_image(w["images"][i]), a_walk.images[i])
    assert w["keyframes"] == a_walk.keyframe_frames and w["seeds"] == [0, 1]
    assert len(w["distances"]) == 4 and 0 <= w["smoothness"] <= 1
    assert "keyframe" in w["labels"][0] and PROMPT in w["labels"][0]
    assert p["provenance"]["seed"] == [0, 1] and p["provenance"]["model"] == "tiny-shapes"
    assert 'data-explorer="walk"' in path.read_text() and 'data-explorer="interpolation"' in path.read_text()


def test_walk_page_errors(a_walk, tmp_path):
    with pytest.raises(InvalidArgumentError, match="fps"):
        a_walk.save_html(tmp_path / "w.html", fps=0)
    with pytest.raises(InvalidArgumentError, match=r"\.html"):
        a_walk.save_html(tmp_path / "w.gif")
    empty = sdexplore.Walk(
        images=np.zeros((0, 8, 8, 3), np.uint8),
        prompts=["a", "b"],
        seeds=[0, 1],
        segments=[],
        ts=[],
        keyframe_frames=[],
    )
    with pytest.raises(NotRecordedError, match="no frames"):
        empty.save_html(tmp_path / "w.html")
    assert not any(Path(tmp_path).iterdir()) or os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- video
def test_a_video_observation_carries_a_frames_axis(tmp_path):
    """Wan (tiny fixture): the payload's maps lead with the latent frames, each step's panels and the image hold
    one picture per latent frame (the video's pixel frames sampled at them)."""
    from sdexplore.fixtures import tiny_pipeline

    pipe = tiny_pipeline("wan")
    kw = dict(
        num_frames=5, height=64, width=64, num_inference_steps=2, max_sequence_length=32, output_type="np"
    )
    with sdexplore.observe(pipe, attention=True) as obs:
        video = pipe(
            prompt="a red circle moving right", generator=torch.Generator().manual_seed(0), **kw
        ).frames[0]
    F = obs.steps.frames
    assert F == obs.attention.frames == 2 and video.shape[0] == 5
    p = pages.read_payload(obs.save_html(tmp_path / "video.html", image=video))
    assert p["frames"] == {"count": F}
    assert [pl.decode_image(im).tolist() for im in p["image"]] == [
        pl.decode_image(pl.encode_image(video[i])).tolist() for i in (0, 4)
    ]  # latent frame f over pixel frame round(f · (N − 1) / (F − 1))
    for panel in p["steps"]["panels"]:
        assert all(len(step) == F for step in panel["images"])
    from sdexplore.views.render import trace_preview

    x0 = next(panel for panel in p["steps"]["panels"] if panel["key"] == "x0")
    np.testing.assert_array_equal(
        pl.decode_image(x0["images"][1][1]), trace_preview(pl.frame_trace(obs.steps, 1), 1, "x0")
    )
    maps, att = obs.attention, p["attention"]
    T = maps.aggregate.shape[1]
    assert att["aggregate"]["shape"][:2] == [F, T]
    np.testing.assert_allclose(
        pl.dequantize_maps(att["aggregate"]), maps.aggregate[0].movedim(1, 0).numpy(), atol=1e-3
    )  # (F, T, H, W)
    assert att["steps"]["shape"][:3] == [F, 2, T] and att["steps"]["delta"] == 1
    np.testing.assert_allclose(
        pl.dequantize_maps(att["steps"]), maps.steps[:, 0].permute(2, 0, 1, 3, 4).numpy(), atol=1e-3
    )  # (F, S, T, h, w)
    assert all(layer["maps"]["shape"][:2] == [F, T] for layer in att["layers"])


# ---------------------------------------------------------------------------------------------- edit pages
@pytest.fixture(scope="module")
def an_edit(embedded):
    return sdexplore.edit(
        embedded[0],
        PROMPT,
        PROMPT.replace("red", "green"),
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(0),
    )


def test_edit_page_round_trip(an_edit, tmp_path):
    path = pages.save_edit(an_edit, tmp_path / "edit.html", model="tiny-shapes", seed=0)
    p = pages.read_payload(path)
    e = p["edit"]
    src, out = an_edit.images()
    np.testing.assert_array_equal(pl.decode_image(e["source"]), src)
    np.testing.assert_array_equal(pl.decode_image(e["edited"]), out)
    np.testing.assert_array_equal(pl.decode_image(e["difference"]), an_edit.difference())
    assert e["default_word"] == "green" and e["source_prompt"] == PROMPT
    words = [w["word"] for w in e["words"]]
    assert words == list(dict.fromkeys(an_edit.edited_maps.token_lists[0].words))
    assert [w["word"] for w in e["words"] if w["changed"]] == ["green"]
    before, after = pl.dequantize_maps(e["before"]), pl.dequantize_maps(e["after"])
    k = words.index("green")
    want_before, want_after = an_edit.word_maps("green")
    top = float(max(want_before.max(), want_after.max()))
    assert np.abs(before[k] - want_before.numpy()).max() <= top / 500
    assert np.abs(after[k] - want_after.numpy()).max() <= top / 500
    assert p["provenance"]["seed"] == 0 and "→" in p["provenance"]["prompt"]
    from matplotlib import colormaps

    lut = np.frombuffer(__import__("base64").b64decode(e["diff_colormap"]["lut"]), np.uint8).reshape(256, 3)
    from sdexplore.views.widgets.edit import DIFF_CMAP

    assert pl.DIFF_CMAP == DIFF_CMAP  # the notebook explorer's diverging map
    want = (colormaps[DIFF_CMAP](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(lut, want)


def test_edit_page_errors(an_edit, tmp_path, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("the payload was built before the arguments were checked")

    monkeypatch.setattr(pl, "edit_payload", no_work)
    with pytest.raises(InvalidArgumentError, match=r"\.html"):
        pages.save_edit(an_edit, tmp_path / "edit.png")
    with pytest.raises(InvalidArgumentError, match="index"):
        pages.save_edit(an_edit, tmp_path / "edit.html", index=2)
    assert not (tmp_path / "edit.html").exists()


def test_walks_compared_on_one_page(a_walk, tmp_path):
    flipped = sdexplore.Walk(
        images=a_walk.images[::-1].copy(),
        prompts=a_walk.prompts,
        seeds=a_walk.seeds,
        segments=a_walk.segments,
        ts=a_walk.ts,
        keyframe_frames=a_walk.keyframe_frames,
    )
    p = pages.read_payload(pages.save_walks({"forward": a_walk, "back": flipped}, tmp_path / "w.html"))
    compare = p["walk"]["compare"]
    assert [c["name"] for c in compare] == ["forward", "back"]
    np.testing.assert_array_equal(pl.decode_image(compare[1]["images"][0]), a_walk.images[-1])
    assert compare[1]["distances"] == pytest.approx(compare[0]["distances"][::-1])
    with pytest.raises(InvalidArgumentError, match="one frame count"):
        pages.save_walks(
            {"a": a_walk, "b": sdexplore.Walk(**{**vars(flipped), "images": flipped.images[:3]})},
            tmp_path / "x.html",
        )
    with pytest.raises(InvalidArgumentError, match="dict"):
        pages.save_walks([a_walk], tmp_path / "x.html")
