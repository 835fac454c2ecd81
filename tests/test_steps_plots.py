"""Previews (latent → RGB) and the step plots: right shapes, real content, clear errors."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from conftest import gen

from sdexplore.families import SD1, SDXL
from sdexplore.preview import latent_to_rgb, to_uint8
from sdexplore.record.steps import StepRecorder

matplotlib.use("Agg")


def test_latent_to_rgb_is_the_published_linear_map() -> None:
    f = torch.tensor(SDXL.latent_rgb_factors)
    b = torch.tensor(SDXL.latent_rgb_bias)
    lat = torch.zeros(2, 4, 3, 5)
    lat[1, 2, 1, 4] = 1.0  # one unit of channel 2 at (1, 4) of image 1
    rgb = latent_to_rgb(lat, f, b)
    assert rgb.shape == (2, 3, 5, 3)
    torch.testing.assert_close(rgb[0, 0, 0], b)
    torch.testing.assert_close(rgb[1, 1, 4], f[2] + b)
    assert latent_to_rgb(lat * 100, f, b).abs().max() <= 1.0
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        latent_to_rgb(torch.zeros(1, 3, 2, 2), torch.tensor(SD1.latent_rgb_factors), b)


def test_step_plots_draw_real_content(sd1_pipe, tmp_path) -> None:
    import matplotlib.pyplot as plt

    from sdexplore.views.plots.steps import (
        plot_latent_channels,
        plot_noise_levels,
        plot_noise_norms,
        plot_steps,
    )

    with StepRecorder(sd1_pipe, quantities="all") as rec:
        sd1_pipe("a red circle", generator=gen(0), num_inference_steps=5, height=64, width=64)
    tr = rec.trace
    figs = [
        plot_steps(tr, ("preview", "latents", "x0"), steps=4),
        plot_latent_channels(tr, 0),
        plot_noise_levels(tr).figure,
        plot_noise_norms(tr).figure,
    ]
    for k, fig in enumerate(figs):
        path = tmp_path / f"fig{k}.png"
        fig.savefig(path, dpi=50)
        pixels = plt.imread(path)[..., :3]
        assert pixels.std() > 0.05, f"figure {k} is (nearly) one colour"
        plt.close(fig)
    assert len(figs[0].axes) == 12
    with pytest.raises(ValueError, match="not recorded"):
        plot_steps(tr, ("decoded",))
    with pytest.raises(ValueError, match="Cannot draw 'pixels'"):
        plot_steps(tr, ("pixels",))


def test_step_plots_preview_with_the_traces_own_factors(sd1_pipe) -> None:
    """A trace recorded with factors unlike its family's (as a model folder's latent_rgb.json gives): the
    plotted x0 and latents follow trace.meta["latent_rgb"], not the family table."""
    import numpy as np

    from sdexplore.views.plots.steps import plot_steps, step_image

    with StepRecorder(sd1_pipe, quantities=("latents", "x0", "preview")) as rec:
        sd1_pipe("a red circle", generator=gen(0), num_inference_steps=3, height=64, width=64)
    tr = rec.trace
    spread = float(tr.stack("x0").float().std())  # the random model's x0 is large: keep previews unsaturated
    factors = torch.tensor([[0.5, -0.2, 0.1], [0.1, 0.6, -0.3], [-0.4, 0.2, 0.5], [0.2, 0.1, -0.2]]) / (
        3 * spread
    )
    bias = torch.tensor([0.05, -0.1, 0.02])
    tr.meta["latent_rgb"] = {"factors": factors.tolist(), "bias": bias.tolist()}
    for q in ("x0", "latents"):
        expected = to_uint8(latent_to_rgb(getattr(tr[1], q)[:1].float(), factors, bias))[0].numpy()
        family = to_uint8(
            latent_to_rgb(getattr(tr[1], q)[:1].float(), torch.tensor(SD1.latent_rgb_factors), torch.zeros(3))
        )[0].numpy()
        assert not np.array_equal(expected, family)
        assert np.array_equal(step_image(tr, 1, q), expected), q
    fig = plot_steps(tr, ("x0",), steps=[1])
    assert np.array_equal(np.asarray(fig.axes[0].get_images()[0].get_array()), step_image(tr, 1, "x0"))
