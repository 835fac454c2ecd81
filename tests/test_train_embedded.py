"""Training the embedded model (sdexplore.embedded; scripts/train_embedded.py is its command line): end to end
in seconds (a fine-tune, a checkpoint, a loadable diffusers folder), the losses, the settings, the scripts' flags."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

from sdexplore.embedded import losses
from sdexplore.embedded.config import TrainConfig
from sdexplore.embedded.model import EMBEDDED_MODEL_DIR
from sdexplore.errors import ModelNotAvailableError, TrainingConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_short_fine_tune_exports_a_loadable_pipeline_that_keeps_its_history(tmp_path):
    """``--init-from`` the shipped model (the VAE phase is skipped), a 15-second budget: UNet steps, a checkpoint,
    a diffusers folder that plain ``from_pretrained`` loads and runs, and training.json with this run's command
    and the shipped model's record as ``earlier``."""
    from diffusers import StableDiffusionPipeline

    train = load_script("train_embedded")
    shipped = EMBEDDED_MODEL_DIR
    threads = torch.get_num_threads()  # --threads sets torch's thread count; restored below
    out, run_dir, flat = tmp_path / "model", tmp_path / "ckpt", tmp_path / "flat"
    argv = ["--device", "cpu", "--threads", "1", "--init-from", str(shipped), "--minutes", "0.25", "--batch", "4",
            "--out", str(out), "--run-dir", str(run_dir), "--reserve-s", "2", "--log-every", "5",
            "--high-noise", "0.5", "--flat-out", str(flat)]  # fmt: skip
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

    # What a device run sends back (flat files, no folders) rebuilds the same pipeline here.
    from sdexplore.embedded.folder import FLAT_FILES

    assert sorted(p.name for p in flat.iterdir()) == sorted(FLAT_FILES)
    train.main(["--assemble-from", str(flat), "--out", str(tmp_path / "assembled")])
    again = StableDiffusionPipeline.from_pretrained(tmp_path / "assembled", local_files_only=True)
    again.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert again.vae.config.scaling_factor == pipe.vae.config.scaling_factor
    assert json.loads((tmp_path / "assembled" / "training.json").read_text()) == info


@pytest.mark.slow
def test_vae_only_then_vae_from_trains_a_new_unet_on_that_vae_and_fine_tunes_keep_their_architecture(
    tmp_path,
):
    """The two-call recipe of a retrain: ``--vae-only`` exports phase 1; ``--vae-from`` takes that VAE (bit for
    bit, with its preview factors and record) and trains a new UNet of ``build_unet()``'s architecture; a later
    ``--init-from`` a folder whose UNet differs from ``build_unet()`` keeps that folder's architecture."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    train = load_script("train_embedded")
    threads = torch.get_num_threads()
    vae_dir, new_dir, odd_dir, tuned = (tmp_path / n for n in ("vae", "new", "odd", "tuned"))
    common = ["--device", "cpu", "--threads", "1", "--reserve-s", "1", "--log-every", "5", "--batch", "4"]
    vae_argv = common + ["--vae-only", "--minutes", "0.1", "--vae-minutes", "0.05", "--vae-batch", "8",
                         "--vae-shape-weight", "10", "--out", str(vae_dir), "--run-dir", str(tmp_path / "c0")]  # fmt: skip
    new_argv = common + ["--vae-from", str(vae_dir), "--minutes", "0.12", "--out", str(new_dir),
                         "--run-dir", str(tmp_path / "c1")]  # fmt: skip
    try:
        train.main(vae_argv)
        train.main(new_argv)
        # a budget already spent before phase 2 starts (a loaded machine) still trains and exports one step
        late = tmp_path / "late"
        train.main(common + ["--vae-from", str(vae_dir), "--minutes", "0.0001", "--out", str(late),
                             "--run-dir", str(tmp_path / "c3")])  # fmt: skip
        assert json.loads((late / "training.json").read_text())["unet_steps"] == 1
        first = StableDiffusionPipeline.from_pretrained(new_dir, local_files_only=True)
        first_vae, first_channels = first.vae.state_dict(), tuple(first.unet.config.block_out_channels)
        # A folder whose UNet is not build_unet()'s (as an older shipped model's was): three levels, 8 channels.
        odd = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 8, 8),
                                   down_block_types=("CrossAttnDownBlock2D",) * 3, layers_per_block=1,
                                   up_block_types=("CrossAttnUpBlock2D",) * 3, cross_attention_dim=64,
                                   attention_head_dim=2, norm_num_groups=4)  # fmt: skip
        first.register_modules(unet=odd)
        first.save_pretrained(odd_dir)
        for name in ("training.json", "latent_rgb.json"):
            (odd_dir / name).write_text((new_dir / name).read_text())
        train.main(common + ["--init-from", str(odd_dir), "--minutes", "0.1", "--out", str(tuned),
                             "--run-dir", str(tmp_path / "c2")])  # fmt: skip
    finally:
        torch.set_num_threads(threads)

    vae_info = json.loads((vae_dir / "training.json").read_text())
    info = json.loads((new_dir / "training.json").read_text())
    assert info["vae_command"] == "python scripts/train_embedded.py " + " ".join(vae_argv)
    assert info["command"] == "python scripts/train_embedded.py " + " ".join(new_argv)
    assert (info["vae_steps"], info["vae_batch"], info["vae_shape_weight"]) == (
        vae_info["vae_steps"],
        8,
        10.0,
    )
    assert "earlier" not in info and info["unet_steps"] > 0
    assert json.loads((new_dir / "latent_rgb.json").read_text()) == json.loads(
        (vae_dir / "latent_rgb.json").read_text()
    )
    source = StableDiffusionPipeline.from_pretrained(vae_dir, local_files_only=True).vae.state_dict()
    assert all(torch.equal(source[k], v) for k, v in first_vae.items())  # frozen, bit for bit
    from sdexplore.embedded.architecture import build_unet

    assert first_channels == tuple(build_unet().config.block_out_channels)

    kept = UNet2DConditionModel.from_pretrained(tuned / "unet")
    assert tuple(kept.config.block_out_channels) == (8, 8, 8)
    assert json.loads((tuned / "training.json").read_text())["earlier"]["unet_steps"] == info["unet_steps"]


def test_sample_timesteps_draws_the_asked_share_from_the_noisier_half():
    gen = torch.Generator().manual_seed(0)
    uniform = losses.sample_timesteps(20_000, 0.0, torch.device("cpu"), gen)
    skewed = losses.sample_timesteps(20_000, 0.5, torch.device("cpu"), gen)
    assert uniform.min() >= 0 and uniform.max() <= 999
    assert abs(float((uniform >= 500).float().mean()) - 0.5) < 0.02
    assert (
        abs(float((skewed >= 500).float().mean()) - 0.75) < 0.02
    )  # half from the upper half + half of the rest


def _one_scene(shape: str = "square", size: str = "small"):
    from sdexplore.embedded import scenes

    batch = scenes.validation_scenes(216, seed=3)
    hit = (batch.shape == scenes.SHAPES.index(shape)) & (batch.size == scenes.SIZES.index(size))
    pick = torch.nonzero(hit)[:1, 0]  # (1,): the first such scene
    one = scenes.SceneBatch(**{k: getattr(batch, k)[pick] for k in batch.__dataclass_fields__})
    return scenes.render_batch(one)  # (1, 3, 64, 64), (1, 1, 64, 64)


def test_shape_weight_map_puts_the_weight_on_the_shape_and_keeps_the_mean():
    """The UNet loss weight at latent resolution: mean 1 per image, 1 + w times heavier on the shape and its
    edge than on the far background; w = 0 is plain MSE."""
    _, coverage = _one_scene()
    w = losses.shape_weight_map(coverage, 10.0)
    assert w.shape == (1, 1, 16, 16)
    assert float(w.mean()) == pytest.approx(1.0, abs=1e-5)
    on_shape = torch.nn.functional.avg_pool2d(coverage, 4) > 0.5  # (1, 1, 16, 16)
    assert on_shape.any() and (w[on_shape] / w.min()).min() == pytest.approx(11.0, rel=1e-4)
    assert torch.allclose(losses.shape_weight_map(coverage, 0.0), torch.ones(1, 1, 16, 16))


def test_reconstruction_loss_charges_a_missing_corner_more_with_the_shape_weight():
    """The same 16-pixel error costs the same as MSE on the background and on the shape with weight 0; with
    weight 10 the error on the shape's corner costs several times more than on the background."""
    images, coverage = _one_scene("square", "big")
    ys, xs = torch.nonzero(coverage[0, 0] > 0.99, as_tuple=True)
    y0, x0 = int(ys.min()), int(xs.min())  # the square's top-left corner
    corner, background = images.clone(), images.clone()
    corner[:, :, y0 : y0 + 4, x0 : x0 + 4] += 0.5
    background[:, :, 0:4, 0:4] += 0.5  # a scene corner: far from any shape placed on the 3×3 grid
    assert coverage[0, 0, 0:6, 0:6].max() == 0
    plain = [losses.reconstruction_loss(x, images, coverage, 0.0) for x in (corner, background)]
    assert plain[0] == pytest.approx(float(plain[1]))
    weighted = [losses.reconstruction_loss(x, images, coverage, 10.0) for x in (corner, background)]
    assert weighted[0] / weighted[1] == pytest.approx(11.0, rel=1e-5)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--vae-from", "a", "--init-from", "b"], "pick one"),
        (["--vae-only", "--init-from", "b"], "drop one of them"),
        (["--vae-only", "--vae-from", "a"], "drop one of them"),
    ],
)
def test_conflicting_starting_points_are_refused_before_anything_runs(argv, says, capsys, tmp_path):
    train = load_script("train_embedded")
    with pytest.raises(SystemExit):
        train.main(argv + ["--out", str(tmp_path / "out"), "--run-dir", str(tmp_path / "ckpt")])
    assert says in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "ckpt").exists()


def test_diffusion_loss_is_mse_without_weight_and_charges_the_shape_more_with_it():
    coverage = torch.zeros(1, 1, 16, 16)
    coverage[..., 2:4, 2:4] = 1.0  # a 2×2-latent-pixel shape in a corner
    target = torch.zeros(1, 4, 16, 16)
    on_shape, off_shape = target.clone(), target.clone()
    on_shape[..., 3, 3] = 1.0  # the same error, once on the shape ...
    off_shape[..., 12, 12] = 1.0  # ... once far from it
    assert losses.diffusion_loss(on_shape, target, coverage, 0.0) == torch.nn.functional.mse_loss(
        on_shape, target
    )
    assert losses.diffusion_loss(on_shape, target, coverage, 0.0) == losses.diffusion_loss(
        off_shape, target, coverage, 0.0
    )
    ratio = losses.diffusion_loss(on_shape, target, coverage, 10.0) / losses.diffusion_loss(
        off_shape, target, coverage, 10.0
    )
    assert ratio == pytest.approx(11.0)


#: The flags each script had before its code moved to sdexplore.embedded (every one must keep working).
SCRIPT_FLAGS = {
    "train_embedded": {"--minutes", "--vae-minutes", "--device", "--out", "--run-dir", "--resume", "--init-from",
                       "--vae-from", "--vae-only", "--seed", "--vae-batch", "--vae-lr", "--vae-shape-weight",
                       "--batch", "--lr", "--warmup", "--ema", "--latent-pool", "--caption-dropout",
                       "--shape-weight", "--high-noise", "--threads", "--log-every", "--ckpt-every",
                       "--export-every", "--reserve-s", "--eval-prompts", "--flat-out", "--assemble-from"},
    "eval_embedded": {"--model", "--subset", "--no-write", "--timing-threads", "--tune-guidance", "--device",
                      "--scales"},
    "diagnose_layout": {"--template", "--seeds", "--out"},
}  # fmt: skip


@pytest.mark.parametrize("script", sorted(SCRIPT_FLAGS))
def test_each_script_runs_as_a_command_and_offers_its_old_flags(script):
    """``python scripts/<name>.py --help`` in a fresh process (the thin wrapper imports the library on its
    own), listing every flag the script had."""
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"{script}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    offered = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", out.stdout)) - {"--help"}
    assert SCRIPT_FLAGS[script] <= offered, SCRIPT_FLAGS[script] - offered


def test_train_config_round_trips_through_the_script_s_flags():
    """Every TrainConfig field is a flag with the same default; to_argv writes the flags that give it back."""
    parser = load_script("train_embedded").build_parser()
    defaults = vars(parser.parse_args([]))
    defaults.pop("assemble_from")
    defaults.pop(
        "run_dir"
    )  # the script's default is the repository's runs/embedded, the library's cwd-relative
    assert defaults == {k: v for k, v in vars(TrainConfig()).items() if k not in ("command", "run_dir")}
    config = TrainConfig(minutes=0.5, device="cuda", vae_only=True, latent_pool=4096, high_noise=0.25,
                         flat_out="/tmp/flat", run_dir="runs/x")  # fmt: skip
    args = vars(parser.parse_args(config.to_argv()))
    args.pop("assemble_from")
    assert TrainConfig(**args) == config
    assert config.recorded_command() == "python scripts/train_embedded.py " + " ".join(config.to_argv())
    assert TrainConfig(command="mine").recorded_command() == "mine"


@pytest.mark.parametrize(
    "settings, says",
    [
        (dict(batch=0), "--batch must be > 0"),
        (dict(minutes=-1.0), "--minutes must be > 0"),
        (dict(high_noise=1.5), "--high-noise is a fraction"),
        (dict(shape_weight=-2.0), "--shape-weight must be ≥ 0"),
        (dict(vae_from="a", init_from="b"), "pick one"),
    ],
)
def test_train_config_refuses_bad_settings_with_the_flag_to_fix(settings, says):
    with pytest.raises(TrainingConfigError, match=re.escape(says)):
        TrainConfig(**settings)


def test_a_missing_starting_folder_is_refused_before_anything_runs(tmp_path):
    from sdexplore.embedded.train import train

    run_dir = tmp_path / "ckpt"
    for settings, says in ((dict(init_from=str(tmp_path / "nope")), "--init-from"),
                           (dict(vae_from=str(tmp_path)), "--vae-from")):  # fmt: skip
        with pytest.raises(ModelNotAvailableError, match=says):
            train(TrainConfig(out=str(tmp_path / "out"), run_dir=str(run_dir), **settings))
    assert not run_dir.exists() and not (tmp_path / "out").exists()


def test_assemble_names_the_missing_flat_files_and_writes_nothing(tmp_path):
    from sdexplore.embedded.folder import assemble

    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "training.json").write_text("{}")
    with pytest.raises(ModelNotAvailableError, match="unet_config.json"):
        assemble(flat, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_folder_write_leaves_the_previous_model_in_place(tmp_path, monkeypatch):
    """save_pipeline writes beside the destination and swaps: a crash mid-write keeps the old folder whole."""
    from sdexplore.embedded import folder
    from sdexplore.embedded.architecture import build_text_encoder, build_unet, build_vae

    out = tmp_path / "model"
    out.mkdir()
    (out / "model_index.json").write_text('{"old": true}')

    def crash(_folder):
        raise OSError("disk full")

    monkeypatch.setattr(folder, "write_slow_tokenizer_files", crash)
    with pytest.raises(OSError, match="disk full"):
        folder.save_pipeline(out, build_vae(), build_text_encoder(), build_unet(), {"training.json": "{}"})
    assert sorted(p.name for p in out.iterdir()) == ["model_index.json"]
    assert json.loads((out / "model_index.json").read_text()) == {"old": True}


def test_the_card_writer_reproduces_the_shipped_card_from_its_numbers():
    """sdexplore.embedded.card, given the shipped eval.json and training.json, writes the shipped MODEL_CARD.md
    (the speed line's machine facts, core count and torch version, masked: they are this machine's)."""
    from sdexplore.embedded.card import model_card

    shipped = (EMBEDDED_MODEL_DIR / "MODEL_CARD.md").read_text()
    written = model_card(EMBEDDED_MODEL_DIR, json.loads((EMBEDDED_MODEL_DIR / "eval.json").read_text()))

    def mask(text: str) -> str:
        return re.sub(r"of a \d+-core machine, torch \S+;", "of a N-core machine, torch V;", text)

    assert mask(written) == mask(shipped)
