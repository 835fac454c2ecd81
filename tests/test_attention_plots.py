"""Attention plots draw real, varied heat maps from recorded maps (Agg backend, no display), on UNet and MMDiT maps."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from conftest import gen

from sdexplore.fixtures import tiny_pipeline
from sdexplore.record.attention import AttentionRecorder
from sdexplore.views.plots.attention import plot_step_grid, plot_word, plot_words
from sdexplore.views.render import heat_overlay

matplotlib.use("Agg")


@pytest.fixture(scope="module", params=["sd1", "sd3", "flux"])
def recorded(request):
    """Maps and image of one 4-step 64×96 run: SD1's cross-attention, SD3's and Flux's joint attention."""
    pipe = tiny_pipeline(request.param)
    extra = {} if request.param == "sd1" else {"max_sequence_length": 32}  # a short T5 window: fast
    with AttentionRecorder(pipe) as rec:
        img = pipe(
            "a big red circle", num_inference_steps=4, height=64, width=96, generator=gen(0), **extra
        ).images[0]
    return rec.maps, img


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _heat_layer(ax):
    return np.asarray(ax.get_images()[-1].get_array())


def test_plot_word_overlays_a_varied_map(recorded):
    maps, img = recorded
    ax = plot_word(maps, "circle", image=img)
    assert len(ax.get_images()) == 1  # one picture: the heat map blended over the image
    shown = _heat_layer(ax)
    assert shown.shape == (64, 96, 3) and shown.dtype == np.uint8
    # the same blend as the CLI's and the widgets' overlays
    assert np.array_equal(shown, heat_overlay(np.asarray(img), maps.word("circle")))
    assert shown.std() > 5  # not one flat colour
    alone = _heat_layer(plot_word(maps, "circle"))  # no image: the coloured map, at the image's size
    assert alone.shape == (64, 96, 3) and alone.std() > 5
    mass = _heat_layer(plot_word(maps, "circle", image=img, normalize="mass"))
    assert not np.array_equal(mass, shown)  # zero, not the map's minimum, at the bottom of the colour map
    with pytest.raises(ValueError, match="opacity"):
        plot_word(maps, "circle", image=img, alpha=1.5)


def test_plot_words_row_and_step_grid(recorded, tmp_path):
    maps, img = recorded
    fig = plot_words(maps, image=img)
    assert [a.get_title() for a in fig.axes] == ["image", "a", "big", "red", "circle"]
    assert not np.allclose(_heat_layer(fig.axes[2]), _heat_layer(fig.axes[4]))  # words differ
    fig.savefig(tmp_path / "words.png")
    grid = plot_step_grid(
        maps, ["red", "circle"], image=torch.from_numpy(np.array(img)).permute(2, 0, 1) / 255
    )
    assert len(grid.axes) == 4 * 2  # 4 steps (all of them) × 2 words
    assert not np.allclose(_heat_layer(grid.axes[0]), _heat_layer(grid.axes[-2]))  # step 0 vs last, "red"
    grid.savefig(tmp_path / "grid.png")


def test_plot_words_refuses_a_picture_given_as_the_words(recorded):
    from PIL import Image

    from sdexplore.errors import InvalidArgumentError

    maps, image = recorded
    with pytest.raises(InvalidArgumentError, match="image="):
        plot_words(maps, Image.fromarray(np.asarray(image)))
    fig = plot_words(maps, "circle")  # one word as a plain string
    assert len(fig.axes) == 1
