"""Train the embedded tiny-shapes model: a text-to-image latent diffusion model of standard diffusers parts.

Phase 1 trains the VAE (AutoencoderKL, 64×64×3 ↔ 16×16×4) on rendered scenes until the time budget of the
phase is spent and validation PSNR ≥ 28 dB (or 1.5× its budget passed), then sets ``scaling_factor`` = 1/std of
the latents and fits the latent→RGB preview factors. Phase 2 trains the UNet and the CLIP text encoder jointly,
VAE frozen: v-prediction with zero terminal SNR, 10% caption dropout to "" for classifier-free guidance, warmup + cosine learning
rate, an EMA of the weights (the EMA is what ships). Scenes are rendered on the training device from sampled
parameters (:mod:`sdexplore.embedded.scenes`), so no data set is stored.

The whole run has one time budget (``--minutes``); each phase calibrates its speed over its first steps and then
fixes its step count, so the schedule is a function of the step alone. Checkpoints go to ``--run-dir``;
``--resume`` continues from there. Runs unchanged on a GPU (``--device cuda``, bf16 autocast).
The code is :mod:`sdexplore.embedded.train`; this is its command line.

    python scripts/train_embedded.py --minutes 2 --device cpu --out runs/tiny --run-dir runs/ckpt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdexplore.embedded.config import TrainConfig
from sdexplore.errors import TrainingConfigError

REPO = Path(__file__).resolve().parents[1]
DEFAULT = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    """The command line: one flag per :class:`TrainConfig` field, plus ``--assemble-from``."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--model",
        choices=("unet", "mmdit"),
        default=DEFAULT.model,
        help="unet: tiny-shapes (SD 1.x); mmdit: tiny-shapes-mmdit (SD3 pipeline, flow matching, on tiny-shapes' VAE)",
    )
    add(
        "--steps",
        type=int,
        default=DEFAULT.steps,
        help="--model mmdit: the run's step count, whatever the machine's speed (0: fixed from the first steps' "
        "speed and --minutes); with --resume a run stopped by --minutes goes on to it",
    )
    add(
        "--patch",
        type=int,
        default=DEFAULT.patch,
        help="--model mmdit: patch side in latent pixels (2: 8×8 tokens; 1: a token per latent pixel, 16×16 maps)",
    )
    add(
        "--flow-shift",
        type=float,
        default=DEFAULT.flow_shift,
        help="--model mmdit: shift of the training noise levels and of the saved sampler (SD3's shift)",
    )
    add(
        "--no-pooled",
        action="store_true",
        help="--model mmdit: the transformer ignores the pooled text vector (the prompt reaches the image only "
        "through joint attention)",
    )
    add(
        "--attention-weight",
        type=float,
        default=DEFAULT.attention_weight,
        help="--model mmdit: weight of an auxiliary loss pulling the shape word's joint-attention map onto the "
        "drawn shape (0: flow matching alone)",
    )
    add(
        "--square-boost",
        type=float,
        default=DEFAULT.square_boost,
        help="--model mmdit: pick scenes of squares (the hardest kind) this many times as often as the others",
    )
    add(
        "--pixel-weight",
        type=float,
        default=DEFAULT.pixel_weight,
        help="--model mmdit: weight of a pixel loss on the decoded x0 prediction of the least noisy quarter of "
        "each batch, weighted on the shape's edge (0: latent loss alone)",
    )
    add("--minutes", type=float, default=DEFAULT.minutes, help="whole run's time budget (both phases)")
    add("--vae-minutes", type=float, default=DEFAULT.vae_minutes, help="phase 1's share of the budget")
    add("--device", default=DEFAULT.device)
    add("--out", default=DEFAULT.out, help="pipeline folder to write")
    add("--run-dir", default=str(REPO / "runs" / "embedded"), help="checkpoints")
    add("--resume", action="store_true", help="continue from --run-dir/checkpoint.pt")
    add("--init-from", default=None, help="start phase 2 from a saved pipeline folder")
    add(
        "--vae-from", default=None, help="skip phase 1: this pipeline folder's VAE; new UNet and text encoder"
    )
    add("--vae-only", action="store_true", help="stop after phase 1 and export (the VAE for --vae-from)")
    add("--seed", type=int, default=DEFAULT.seed)
    add("--vae-batch", type=int, default=DEFAULT.vae_batch)
    add("--vae-lr", type=float, default=DEFAULT.vae_lr)
    add(
        "--vae-shape-weight",
        type=float,
        default=DEFAULT.vae_shape_weight,
        help="phase 1: extra (L1 + MSE) weight on the shape and a 2-px ring (0: plain MSE)",
    )
    add("--batch", type=int, default=DEFAULT.batch)
    add("--lr", type=float, default=DEFAULT.lr)
    add("--warmup", type=int, default=DEFAULT.warmup)
    add("--ema", type=float, default=DEFAULT.ema)
    add(
        "--latent-pool",
        type=int,
        default=DEFAULT.latent_pool,
        help="phase 2: encode this many scenes once and sample from them",
    )
    add("--caption-dropout", type=float, default=DEFAULT.caption_dropout)
    add(
        "--shape-weight",
        type=float,
        default=DEFAULT.shape_weight,
        help="phase 2: extra loss weight on the shape and its edge (0: plain MSE)",
    )
    add(
        "--high-noise",
        type=float,
        default=DEFAULT.high_noise,
        help="phase 2: fraction of timesteps drawn from the noisier half (where layout is decided)",
    )
    add("--threads", type=int, default=DEFAULT.threads, help="CPU threads (0: torch's default)")
    add("--log-every", type=int, default=DEFAULT.log_every)
    add("--ckpt-every", type=float, default=DEFAULT.ckpt_every, help="seconds between checkpoints")
    add("--export-every", action="store_true", help="export a snapshot at each checkpoint")
    add("--reserve-s", type=float, default=DEFAULT.reserve_s, help="seconds kept for export and eval")
    add(
        "--eval-prompts",
        type=int,
        default=DEFAULT.eval_prompts,
        help="score this many validation prompts at the end",
    )
    add(
        "--flat-out",
        default=None,
        help="also copy the exported weights and records here, flat (a device's $OUT)",
    )
    add("--assemble-from", default=None, help="only build --out from a GPU run's flat files")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    assemble_from = args.pop("assemble_from")
    command = " ".join(["python scripts/train_embedded.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        config = TrainConfig(**args, command=command)  # checks the flags before anything runs
    except TrainingConfigError as error:
        parser.error(str(error))
    if assemble_from:
        from sdexplore.embedded.folder import assemble

        assemble(Path(assemble_from), Path(config.out))
        return
    if config.model == "mmdit":
        from sdexplore.embedded.mmdit import train_mmdit

        train_mmdit(config)
        return
    from sdexplore.embedded.train import train

    train(config)


if __name__ == "__main__":
    sys.exit(main())
