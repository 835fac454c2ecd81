"""scripts/train_embedded.py end to end in seconds: a fine-tune, a checkpoint, a loadable diffusers folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import load_script

from sdexplore.loading import EMBEDDED_MODEL_DIR


@pytest.mark.slow
def test_a_short_fine_tune_exports_a_loadable_pipeline_that_keeps_its_history(tmp_path):
    """``--init-from`` the shipped model (the VAE phase is skipped), a 15-second budget: UNet steps, a checkpoint,
    a diffusers folder that plain ``from_pretrained`` loads and runs, and training.json with this run's command
    and the shipped model's record as ``earlier``."""
    from diffusers import StableDiffusionPipeline

    train = load_script("train_embedded")
    shipped = EMBEDDED_MODEL_DIR
    threads = torch.get_num_threads()  # --threads sets torch's thread count; restored below
    out, run_dir = tmp_path / "model", tmp_path / "ckpt"
    argv = ["--device", "cpu", "--threads", "1", "--init-from", str(shipped), "--minutes", "0.25", "--batch", "4",
            "--out", str(out), "--run-dir", str(run_dir), "--reserve-s", "2", "--log-every", "5",
            "--high-noise", "0.5"]  # fmt: skip
    try:
        train.main(argv)
    finally:
        torch.set_num_threads(threads)

    assert (run_dir / "checkpoint.pt").is_file()
    info = json.loads((out / "training.json").read_text())
    assert info["unet_steps"] > 0 and info["batch"] == 4 and info["high_noise"] == 0.5
    # main()'s own argv, not sys.argv (pytest's)
    assert info["command"] == "python scripts/train_embedded.py " + " ".join(argv)
    before = json.loads((shipped / "training.json").read_text())
    assert info["earlier"]["unet_steps"] == before["unet_steps"]  # the model card's history goes on
    assert json.loads((out / "latent_rgb.json").read_text()) == json.loads(
        (shipped / "latent_rgb.json").read_text()
    )

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.vae.config.scaling_factor == pytest.approx(info["scaling_factor"])
    image = pipe("a big red circle at the top left", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_sample_timesteps_draws_the_asked_share_from_the_noisier_half():
    train = load_script("train_embedded")
    gen = torch.Generator().manual_seed(0)
    uniform = train.sample_timesteps(20_000, 0.0, torch.device("cpu"), gen)
    skewed = train.sample_timesteps(20_000, 0.5, torch.device("cpu"), gen)
    assert uniform.min() >= 0 and uniform.max() <= 999
    assert abs(float((uniform >= 500).float().mean()) - 0.5) < 0.02
    assert (
        abs(float((skewed >= 500).float().mean()) - 0.75) < 0.02
    )  # half from the upper half + half of the rest
