"""One training run's settings: :class:`TrainConfig`, the fields behind ``scripts/train_embedded.py``'s flags."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..errors import TrainingConfigError
from .model import EMBEDDED_MODEL_DIR, MMDIT_MODEL_DIR

#: The script whose flags :meth:`TrainConfig.to_argv` writes (recorded in ``training.json`` as the run's command).
SCRIPT = "python scripts/train_embedded.py"
#: Settings only an MMDiT run has (a UNet run refuses them when they differ from their defaults).
_MMDIT_ONLY = ("patch", "flow_shift", "no_pooled", "attention_weight", "square_boost", "pixel_weight")


@dataclass
class TrainConfig:
    """Settings of one run of :func:`sdexplore.embedded.train.train`; field ``vae_minutes`` is the flag
    ``--vae-minutes`` and so on. Contradictions and out-of-range values raise
    :class:`~sdexplore.errors.TrainingConfigError` when the config is made, before anything runs."""

    model: str = "unet"  # "unet": tiny-shapes (SD 1.x); "mmdit": tiny-shapes-mmdit (SD3, flow matching)
    minutes: float = 6.0  # the whole run's time budget (both phases)
    steps: int = 0  # --model mmdit: the run's step count (0: fixed from the speed of the first steps)
    #: --model mmdit: the transformer's patch side in latent pixels (2: 8×8 tokens; 1: one token per latent
    #: pixel, as the shipped model, whose training.json records its flags)
    patch: int = 2
    #: --model mmdit: shift of the training sigmas and of the saved flow-matching sampler
    flow_shift: float = 2.0
    #: --model mmdit: the transformer ignores the pooled text vector (its projection's input weights are zero and
    #: frozen), so the prompt reaches the image only through joint attention
    no_pooled: bool = False
    #: --model mmdit: weight of an auxiliary loss pulling the shape word's joint-attention map onto the drawn
    #: shape (KL of the shape's coverage to the map; 0: flow matching alone)
    attention_weight: float = 0.0
    #: --model mmdit: scenes of squares (the hardest kind to draw) are picked from the latent pool this many times
    #: as often as the others (1: as the pool has them)
    square_boost: float = 1.0
    #: --model mmdit: weight of a pixel loss on the decoded x0 prediction of the batch's least noisy quarter,
    #: weighted on the shape and its edge as the latent loss is (0: latent loss alone)
    pixel_weight: float = 0.0
    vae_minutes: float = 1.25  # phase 1's share of the budget
    device: str = "cpu"  # where to train ("cuda": bf16 autocast)
    out: str = str(EMBEDDED_MODEL_DIR)  # pipeline folder to write
    run_dir: str = "runs/embedded"  # checkpoints (checkpoint.pt, and snapshot/ with export_every)
    resume: bool = False  # continue from run_dir/checkpoint.pt
    init_from: str | None = None  # start phase 2 from a saved pipeline folder (a fine-tune; keeps its UNet)
    vae_from: str | None = None  # skip phase 1: this folder's frozen VAE; new UNet and text encoder
    vae_only: bool = False  # stop after phase 1 and export (the VAE for a later vae_from)
    seed: int = 0
    vae_batch: int = 64
    vae_lr: float = 2e-3
    vae_shape_weight: float = 0.0  # phase 1: extra (L1 + MSE) weight on the shape and a 2-px ring (0: MSE)
    batch: int = 256  # phase 2
    lr: float = 1e-3  # phase 2's peak learning rate
    warmup: int = 100  # phase 2's linear warmup steps
    ema: float = 0.999  # decay of the EMA of the UNet and text-encoder weights (the EMA ships)
    latent_pool: int = 0  # phase 2: encode this many scenes once and sample from them (0: encode every step)
    caption_dropout: float = 0.1  # fraction of captions replaced by "" (for classifier-free guidance)
    shape_weight: float = 0.0  # phase 2: extra loss weight on the shape and its edge (0: plain MSE)
    high_noise: float = 0.0  # phase 2: fraction of timesteps drawn from the noisier half (t ≥ 500)
    threads: int = 0  # CPU threads (0: torch's default)
    log_every: int = 50  # steps between log lines
    ckpt_every: float = 60.0  # seconds between checkpoints
    export_every: bool = False  # export a snapshot of the EMA weights at each checkpoint
    reserve_s: float = 25.0  # seconds of the budget kept for export and evaluation
    eval_prompts: int = 0  # score this many validation prompts at the end (0: none)
    flat_out: str | None = None  # also copy the exported weights and records here, flat (a device's $OUT)
    #: recorded in training.json as the run's command; None records :meth:`to_argv` as a script command.
    command: str | None = None

    def __post_init__(self) -> None:
        if self.model not in ("unet", "mmdit"):
            raise TrainingConfigError(f"--model is 'unet' or 'mmdit', not {self.model!r}")
        if self.model == "mmdit" and (self.init_from or self.vae_only):
            raise TrainingConfigError(
                "--model mmdit trains only the transformer and text encoders on a saved VAE (--vae-from, "
                "tiny-shapes' by default): drop --init-from/--vae-only"
            )
        if self.model == "mmdit" and self.out == str(EMBEDDED_MODEL_DIR):
            self.out = str(MMDIT_MODEL_DIR)  # never over tiny-shapes
        if self.vae_from and self.init_from:
            raise TrainingConfigError(
                "--vae-from trains a new UNet on a saved VAE, --init-from fine-tunes a saved model: pick one"
            )
        if self.vae_only and (self.vae_from or self.init_from):
            raise TrainingConfigError(
                "--vae-only trains phase 1, which --vae-from and --init-from skip: drop one of them"
            )
        mmdit_only = [
            f.name for f in fields(self) if f.name in _MMDIT_ONLY and getattr(self, f.name) != f.default
        ]
        if self.model == "unet" and mmdit_only:
            flags = " and ".join(_flag(name) for name in mmdit_only)
            verb = "set" if len(mmdit_only) > 1 else "sets"
            raise TrainingConfigError(f"{flags} {verb} the MMDiT: add --model mmdit or drop them")
        for name in ("flow_shift", "attention_weight", "square_boost", "pixel_weight"):
            if not math.isfinite(getattr(self, name)):
                raise TrainingConfigError(
                    f"{_flag(name)} must be a finite number, not {getattr(self, name)!r}"
                )
        if self.patch not in (1, 2, 4):
            raise TrainingConfigError(
                f"--patch is 1, 2 or 4 (it divides the 16×16 latent), not {self.patch!r}"
            )
        positive = (
            "minutes",
            "flow_shift",
            "square_boost",
            "vae_batch",
            "vae_lr",
            "batch",
            "lr",
            "log_every",
            "ckpt_every",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise TrainingConfigError(f"{_flag(name)} must be > 0, not {getattr(self, name)!r}")
        at_least_zero = (
            "steps",
            "vae_minutes",
            "vae_shape_weight",
            "warmup",
            "latent_pool",
            "shape_weight",
            "attention_weight",
            "pixel_weight",
        )
        for name in at_least_zero + ("threads", "reserve_s", "eval_prompts"):
            if getattr(self, name) < 0:
                raise TrainingConfigError(f"{_flag(name)} must be ≥ 0, not {getattr(self, name)!r}")
        for name in ("caption_dropout", "high_noise", "ema"):
            if not 0 <= getattr(self, name) <= 1:
                raise TrainingConfigError(
                    f"{_flag(name)} is a fraction in [0, 1], not {getattr(self, name)!r}"
                )

    def to_argv(self) -> list[str]:
        """The training script's flags for every setting that differs from its default (``command`` aside)."""
        argv: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "command" or value == f.default:
                continue
            argv += [_flag(f.name)] if isinstance(value, bool) else [_flag(f.name), str(value)]
        return argv

    def recorded_command(self) -> str:
        """What ``training.json`` records as this run's command: ``command``, or the equivalent script call."""
        return self.command or " ".join([SCRIPT, *self.to_argv()])


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
