"""The embedded model's little world: drawing, masks, the prompt grammar and the scorer (no model needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdexplore.embedded import scenes
from sdexplore.embedded.scenes import COLOURS, PLACES, SHAPES, SceneParams


def _cell(mask: np.ndarray) -> str:
    """The 3×3 grid cell of a mask's centroid."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask > 0.5)
    row, col = int(3 * (ys.mean() + 0.5) / h), int(3 * (xs.mean() + 0.5) / w)
    return PLACES[3 * row + col]


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("shape", SHAPES)
def test_mask_centroid_falls_in_the_named_cell(shape, place):
    for seed in range(3):
        for size in ("small", "big"):
            image, mask, params = scenes.render_scene(
                SceneParams(shape, "red", place, size, "blue"), seed=seed
            )
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            assert mask.shape == (64, 64) and 0 <= mask.min() and mask.max() <= 1
            assert _cell(mask) == place
            assert params == SceneParams(shape, "red", place, size, "blue")


def test_colours_are_right_inside_and_outside_the_shape():
    image, mask, _ = scenes.render_scene("a big yellow square at the center on a purple background")
    assert (image[mask == 1] == COLOURS["yellow"]).all()
    assert (image[mask == 0] == COLOURS["purple"]).all()
    edge = (mask > 0) & (mask < 1)
    assert edge.any(), "edges are anti-aliased"
    # An edge pixel mixes the two colours by its coverage.
    y, x = np.argwhere(edge)[0]
    expected = np.array(COLOURS["purple"]) + mask[y, x] * (np.array(COLOURS["yellow"]) - COLOURS["purple"])
    assert np.abs(image[y, x] - expected).max() <= 1


def test_shapes_have_their_fill_ratio_and_sizes_differ():
    areas = {}
    for shape, ratio in (("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)):
        for size in ("small", "big"):
            _, mask, _ = scenes.render_scene(
                SceneParams(shape, "white", "center", size, "black"), jitter=False
            )
            ys, xs = np.nonzero(mask > 0.5)
            bbox = (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
            assert abs((mask > 0.5).sum() / bbox - ratio) < 0.12, (shape, size)
            areas[shape, size] = mask.sum()
    for shape in SHAPES:
        assert areas[shape, "big"] > 2 * areas[shape, "small"]


def test_jitter_moves_and_resizes_a_little():
    masks = [
        scenes.render_scene("a big red circle at the center on a blue background", seed=s)[1]
        for s in range(8)
    ]
    centroids = [np.array(np.nonzero(m > 0.5)).mean(1) for m in masks]
    assert max(np.abs(c - centroids[0]).max() for c in centroids) > 0.3
    assert max(np.abs(c - 31.5).max() for c in centroids) <= 2.0
    assert np.ptp([m.sum() for m in masks]) > 5


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        (
            "a big red circle at the top left on a blue background",
            SceneParams("circle", "red", "top left", "big", "blue"),
        ),
        ("a red circle at the top left", SceneParams("circle", "red", "top left")),
        ("an orange square in the center", SceneParams("square", "orange", "center")),
        (
            "a small white triangle in the bottom right on a black background",
            SceneParams("triangle", "white", "bottom right", "small", "black"),
        ),
        (
            "A Large Green Square in the Centre on an Orange Background.",
            SceneParams("square", "green", "center", "big", "orange"),
        ),
        (
            "a purple triangle on the left with a yellow background",
            SceneParams("triangle", "purple", "left", None, "yellow"),
        ),
        ("a blue circle at the middle", SceneParams("circle", "blue", "center")),
    ],
)
def test_prompt_variants_parse(prompt, expected):
    assert scenes.parse_prompt(prompt) == expected


@pytest.mark.parametrize(
    "prompt",
    [
        "a photo of a cat",
        "a big red hexagon at the top",
        "a big red circle",  # no place
        "a big red circle at the top on a red background",  # shape and background of one colour
        "a big pink circle at the top",
    ],
)
def test_prompts_outside_the_world_are_refused(prompt):
    with pytest.raises(ValueError):
        scenes.parse_prompt(prompt)


def test_format_and_parse_round_trip_over_the_prompt_table():
    table = scenes.prompt_table()
    assert len(table) == 3 * 3 * 8 * 9 * 9 * 2
    checked = 0
    for prompt in table[::7]:
        try:
            params = scenes.parse_prompt(prompt)
        except ValueError:  # the table's impossible rows: shape and background of one colour
            assert any(prompt.count(f" {c} ") + prompt.endswith(f"{c} background") >= 2 for c in COLOURS)
            continue
        assert scenes.format_prompt(params, "in" if " in the " in prompt else "at") == prompt
        checked += 1
    assert checked > 1400
    assert any(p.startswith("an orange") for p in table)
    assert not any(" a orange" in p or p.startswith("a orange") for p in table)


def test_sampled_batches_index_the_prompt_table_and_are_deterministic():
    table = scenes.prompt_table()
    a = scenes.sample_scenes(300, torch.Generator().manual_seed(5))
    b = scenes.sample_scenes(300, torch.Generator().manual_seed(5))
    assert a.prompts() == b.prompts()
    assert [table[i] for i in a.prompt_index().tolist()] == a.prompts()
    assert bool((a.background != a.colour).all())
    # Balanced: every place and shape is drawn, none more than twice as often as another.
    for values, n in ((a.place, len(PLACES)), (a.shape, len(SHAPES))):
        counts = torch.bincount(values, minlength=n)
        assert counts.min() > 0 and counts.max() < 2 * counts.min()
    # Both variants of the optional parts appear.
    prompts = a.prompts()
    assert any("background" not in p for p in prompts) and any(" in the " in p for p in prompts)


def test_render_batch_matches_render_scene():
    batch = scenes.validation_scenes(6)
    images, coverage = scenes.render_batch(batch)
    assert images.shape == (6, 3, 64, 64) and coverage.shape == (6, 1, 64, 64)
    assert images.min() >= -1 and images.max() <= 1
    params = batch.params(0)
    image, mask, _ = scenes.render_scene(params, jitter=False)
    # Same scene without jitter differs from the jittered one only near the edge.
    assert (np.abs(mask - coverage[0, 0].numpy()) > 0.99).sum() < 0.5 * mask.sum()


def test_validation_set_is_fixed_and_balanced():
    prompts = scenes.validation_prompts()
    assert prompts == scenes.validation_prompts()
    assert len(prompts) == 216
    parsed = [scenes.parse_prompt(p) for p in prompts]
    pairs = {(p.shape, p.place) for p in parsed}
    assert len(pairs) == 27
    assert all(p.size and p.background for p in parsed)


def test_scorer_reads_ground_truth_perfectly():
    batch = scenes.validation_scenes(216)
    images, coverage = scenes.render_batch(batch)
    prompts = batch.prompts()
    scores = scenes.score_images(list(images), prompts)
    assert scores == {"colour": 1.0, "background": 1.0, "shape": 1.0, "place": 1.0, "all": 1.0}
    # The reading's mask is the shape.
    reading = scenes.read_scene(images[0])
    truth = coverage[0, 0].numpy() > 0.5
    assert (reading.mask & truth).sum() / (reading.mask | truth).sum() > 0.9


def test_scorer_accepts_uint8_float_and_chw_and_catches_mistakes():
    image, _, _ = scenes.render_scene("a big green triangle at the bottom left on a white background")
    as_float = torch.from_numpy(image).float().permute(2, 0, 1) / 127.5 - 1  # (3, H, W) in [-1, 1]
    for img in (image, as_float, as_float.permute(1, 2, 0).numpy()):
        assert scenes.read_scene(img).as_params() == SceneParams(
            "triangle", "green", "bottom left", None, "white"
        )
    wrong = scenes.score_image(image, "a big blue circle at the top right on a black background")
    assert wrong == {"colour": False, "background": False, "shape": False, "place": False}
    assert scenes.score_image(image, "a green triangle at the bottom left")["background"] is None
    blank = np.full((64, 64, 3), 255, dtype=np.uint8)
    assert scenes.read_scene(blank).shape == "none"


def test_grid_place_splits_the_image_in_thirds_and_clamps_the_far_edge():
    assert scenes.grid_place(0, 0, 64, 64) == "top left"
    assert scenes.grid_place(32, 32, 64, 64) == "center"
    assert scenes.grid_place(21.3, 42.7, 64, 64) == "bottom left"  # just past the 2/3 line
    assert scenes.grid_place(64, 0, 64, 64) == "top right"  # the right edge itself stays on the grid
    assert scenes.grid_place(10, 20, 30, 30) == "bottom"  # any image size


def test_scene_batch_to_moves_every_tensor_and_keeps_the_scenes():
    batch = scenes.validation_scenes(5)
    moved = batch.to("meta")
    assert all(getattr(moved, k).device.type == "meta" for k in batch.__dataclass_fields__)
    back = batch.to("cpu")
    assert back.prompts() == batch.prompts() and back is not batch


def test_sdx_scenes_is_the_embedded_scenes_module():
    """``sdx.scenes`` reaches the world at its home, :mod:`sdexplore.embedded.scenes` (no re-export module)."""
    import sdexplore

    assert sdexplore.scenes is scenes
    assert not (Path(sdexplore.__file__).parent / "scenes.py").exists()


def test_the_embedded_model_s_constants_keep_their_old_homes():
    import sdexplore
    from sdexplore import loading
    from sdexplore.embedded import model

    for name in ("EMBEDDED_MODEL_DIR", "EMBEDDED_GUIDANCE_SCALE", "embedded_model_available"):
        assert getattr(loading, name) is getattr(model, name) is getattr(sdexplore, name), name
    assert model.EMBEDDED_MODEL_DIR.parent == model.MODELS_DIR
    assert model.embedded_model_available() == (model.EMBEDDED_MODEL_DIR / "model_index.json").is_file()


def test_importing_the_embedded_package_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, sdexplore.embedded, sdexplore.embedded.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]
