"""Train the embedded tiny-shapes model: a text-to-image latent diffusion model of standard diffusers parts.

Phase 1 trains the VAE (AutoencoderKL, 64×64×3 ↔ 16×16×4) on rendered scenes until the time budget of the
phase is spent and validation PSNR ≥ 28 dB (or 1.5× its budget passed), then sets ``scaling_factor`` = 1/std of
the latents and fits the latent→RGB preview factors. Phase 2 trains the UNet and the CLIP text encoder jointly,
VAE frozen: v-prediction with zero terminal SNR, 10% caption dropout to "" for classifier-free guidance, warmup + cosine learning
rate, an EMA of the weights (the EMA is what ships). Scenes are rendered on the training device from sampled
parameters (:mod:`sdexplore.scenes`), so no data set is stored.

The whole run has one time budget (``--minutes``); each phase calibrates its speed over its first steps and then
fixes its step count, so the schedule is a function of the step alone. Checkpoints go to ``--run-dir``;
``--resume`` continues from there. Runs unchanged on a GPU (``--device cuda``, bf16 autocast).

    python scripts/train_embedded.py --minutes 2 --device cpu --out runs/tiny --run-dir runs/ckpt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel

from sdexplore import scenes
from sdexplore.tokenizer import clip_tokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "sdexplore" / "models" / "tiny-shapes"

#: Noise schedule: SD's scaled_linear betas rescaled to zero terminal SNR, with v-prediction and "trailing"
#: timesteps (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"). SD's own
#: schedule ends at alpha_bar_T = 0.0047, which on a 16×16 latent leaves enough signal for the initial noise,
#: not the prompt, to pick where the shape goes; and epsilon prediction gives the high-noise steps, where the
#: layout is decided, almost no gradient. An eps-prediction, linear-beta run (1.16M samples) placed 10%.
SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    rescale_betas_zero_snr=True,
)
PREDICTION = "v_prediction"
PSNR_TARGET = 28.0


# ----------------------------------------------------------------------------------------------------------
# The model: standard diffusers/transformers parts, small


def build_vae() -> AutoencoderKL:
    """AutoencoderKL 64×64×3 ↔ 16×16×4 (two downsamplings), ~0.54M parameters."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(24, 48, 48),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=scenes.IMAGE_SIZE,
    )


def build_unet() -> UNet2DConditionModel:
    """UNet2DConditionModel on 16×16×4 latents, two levels (16×16 with 48 channels, 8×8 with 80) with
    cross-attention at both and in the mid block, ~1.8M parameters; the mid block's self-attention sees the
    whole 8×8 map, and zero padding tells each position where it is.

    Two levels, not three: at 64×64 every layer's cost on a CPU is mostly per-call overhead, so the number of
    blocks sets the speed (2 threads, batch 2: three levels (32, 64, 80) ~40 ms a call, these two ~27 ms)."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2,
        block_out_channels=(48, 80),
        layers_per_block=1,
        cross_attention_dim=64,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads
        norm_num_groups=16,
    )


def build_text_encoder() -> CLIPTextModel:
    """CLIPTextModel, hidden 64, 3 layers, 4 heads, the full 49,408-token CLIP vocabulary (SD 1.x ids)."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=64,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def build_scheduler() -> DDIMScheduler:
    """The saved default sampler: DDIM (eta 0), trailing timesteps so the first step is t = 999 (pure noise)."""
    return DDIMScheduler(
        **SCHEDULE,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="trailing",
        prediction_type=PREDICTION,
    )


def n_params(module: torch.nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------------------
# Training state, checkpoints


class Run:
    """Everything a checkpoint holds: models, optimisers, EMA, step counters, RNG states, the log."""

    def __init__(self, args: argparse.Namespace, device: torch.device, unet_config: dict | None = None):
        self.args = args
        self.device = device
        torch.manual_seed(args.seed)
        self.vae = build_vae().to(device)
        # A fine-tune or a resumed run keeps the architecture it started with (an older model's UNet may differ
        # from build_unet()'s); a new run builds build_unet().
        unet = UNet2DConditionModel.from_config(unet_config) if unet_config else build_unet()
        self.unet = unet.to(device)
        self.text_encoder = build_text_encoder().to(device)
        self.phase = "vae"
        self.step = 0
        self.total_steps: int | None = None
        self.scene_gen = torch.Generator().manual_seed(args.seed)
        self.noise_gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(
            self.params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0, fused=fused
        )
        self.ema = [p.detach().clone() for p in self.params]
        self.info: dict = {"log": [], "seconds": {"vae": 0.0, "unet": 0.0}}
        self.latent_rgb: dict | None = None

    def state(self) -> dict:
        return {
            "vae": self.vae.state_dict(),
            "unet": self.unet.state_dict(),
            "text_encoder": self.text_encoder.state_dict(),
            "vae_opt": self.vae_opt.state_dict(),
            "opt": self.opt.state_dict(),
            "ema": [e.cpu() for e in self.ema],
            "unet_config": dict(self.unet.config),
            "phase": self.phase,
            "step": self.step,
            "total_steps": self.total_steps,
            "scaling_factor": self.vae.config.scaling_factor,
            "scene_gen": self.scene_gen.get_state(),
            "noise_gen": self.noise_gen.get_state(),
            "info": self.info,
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)

    def load(self, state: dict) -> None:
        """Continue from a checkpoint's :meth:`state` (as ``torch.load`` read it)."""
        self.vae.load_state_dict(state["vae"])
        self.unet.load_state_dict(state["unet"])
        self.text_encoder.load_state_dict(state["text_encoder"])
        self.vae_opt.load_state_dict(state["vae_opt"])
        self.opt.load_state_dict(state["opt"])
        for e, saved in zip(self.ema, state["ema"], strict=True):
            e.copy_(saved.to(self.device))
        self.phase, self.step, self.total_steps = state["phase"], state["step"], state["total_steps"]
        self.vae.register_to_config(scaling_factor=state["scaling_factor"])
        self.scene_gen.set_state(state["scene_gen"])
        self.noise_gen.set_state(state["noise_gen"].to(self.noise_gen.get_state().device))
        self.info = state["info"]

    def init_from_pipeline(self, folder: Path) -> None:
        """Start phase 2 from a saved pipeline folder (its weights, fresh optimiser): a later fine-tune."""
        self.unet.load_state_dict(UNet2DConditionModel.from_pretrained(folder / "unet").state_dict())
        self.text_encoder.load_state_dict(CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict())
        for e, p in zip(self.ema, self.params, strict=True):
            e.copy_(p.detach())
        info = folder / "training.json"
        prev = json.loads(info.read_text()) if info.exists() else None
        self._adopt_vae(folder, prev)
        if prev:  # keep the earlier run's record; this run's phase 2 is counted on top
            keep = (
                "machine",
                "seconds",
                "unet_steps",
                "batch",
                "lr",
                "high_noise",
                "shape_weight",
                "latent_pool",
                "command",
                "vae_steps",
                "vae_psnr",
                "vae_batch",
                "vae_machine",
                "vae_command",
                "ema",
                "earlier",
            )
            self.info["earlier"] = {k: prev[k] for k in keep if k in prev}
            self.info["vae_machine"] = prev.get("vae_machine")

    def vae_from_pipeline(self, folder: Path) -> None:
        """Skip phase 1: take the frozen VAE, its preview factors and its record from a saved pipeline folder
        (e.g. a ``--vae-only`` run) and train a new UNet and text encoder from scratch on its latents."""
        prev = json.loads((folder / "training.json").read_text())
        self._adopt_vae(folder, prev)
        self.info["vae_machine"] = prev.get("vae_machine") or prev.get("machine")
        self.info["vae_command"] = prev.get("vae_command") or prev.get("command")

    def _adopt_vae(self, folder: Path, prev: dict | None) -> None:
        """Take ``folder``'s VAE (frozen from here on), its preview factors (which hold for it) and, from its
        record ``prev``, the VAE's numbers; phase 2 starts next."""
        self.vae = AutoencoderKL.from_pretrained(folder / "vae").to(self.device)
        if prev:
            self.info["seconds"]["vae"] = prev["seconds"]["vae"]
            for key in ("vae_steps", "vae_psnr", "vae_batch"):
                self.info[key] = prev.get(key)
            self.info["vae_shape_weight"] = prev.get("vae_shape_weight", 0.0)
        if (folder / "latent_rgb.json").exists():
            self.latent_rgb = json.loads((folder / "latent_rgb.json").read_text())
        self.phase, self.step, self.total_steps = "unet", 0, None


def log(run: Run, **fields) -> None:
    """Print one JSON line and keep it in the run's log (the last 200 are kept)."""
    fields = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in fields.items()}
    print(json.dumps(fields), flush=True)
    run.info["log"] = (run.info["log"] + [fields])[-200:]


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU (fp32 there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------
# Phase 1: the VAE


def render(run: Run, n: int) -> tuple[torch.Tensor, torch.Tensor, scenes.SceneBatch]:
    """Sample ``n`` training scenes (CPU generator, so a seed means the same scenes anywhere) and draw them on
    the training device: images (n, 3, 64, 64) in [-1, 1] and shape coverage (n, 1, 64, 64) in [0, 1]."""
    batch = scenes.sample_scenes(n, run.scene_gen, device=run.device)
    images, coverage = scenes.render_batch(batch)
    return images, coverage, batch


def shape_weight_map(coverage: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-latent-pixel loss weight: 1 on the background, 1 + ``weight`` on the shape and a one-latent-pixel
    ring around it (where circle, square and triangle differ), normalised to mean 1 per image.

    ``coverage`` (B, 1, 64, 64), or already at latent resolution (B, 1, 16, 16) as the latent pool keeps it,
    → (B, 1, 16, 16). Plain MSE spends almost all of its gradient on the large,
    easy background; the kind of a 10-pixel shape is a few latent pixels at its edge.
    """
    small = F.adaptive_avg_pool2d(coverage.float(), 16)  # (B, 1, 16, 16); 4×4 means at 64×64
    near = F.max_pool2d(small, 3, stride=1, padding=1)  # (B, 1, 16, 16): dilated by one latent pixel
    w = 1 + weight * near
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


def diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, coverage: torch.Tensor, shape_weight: float
) -> torch.Tensor:
    """Phase 2's loss: MSE of the v-prediction, or with ``shape_weight`` > 0 weighted by
    :func:`shape_weight_map`. ``pred``/``target`` (B, 4, 16, 16), ``coverage`` (B, 1, 64, 64) or (B, 1, 16, 16)."""
    if not shape_weight:
        return F.mse_loss(pred, target)
    err = (pred - target).pow(2)  # (B, 4, 16, 16)
    return (err * shape_weight_map(coverage, shape_weight)).mean()


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, device: torch.device, n: int = 256) -> float:
    """PSNR (dB, images in [-1, 1] → peak-to-peak 2) of posterior-mean reconstructions of validation scenes."""
    images, _ = scenes.render_batch(_to(scenes.validation_scenes(n, seed=99), device))
    with autocast(device):
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.float()
    mse = F.mse_loss(recon.clamp(-1, 1), images).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def _to(batch: scenes.SceneBatch, device: torch.device) -> scenes.SceneBatch:
    return scenes.SceneBatch(**{k: getattr(batch, k).to(device) for k in batch.__dataclass_fields__})


def reconstruction_loss(
    recon: torch.Tensor, images: torch.Tensor, coverage: torch.Tensor, shape_weight: float
) -> torch.Tensor:
    """Phase 1's reconstruction term: MSE, or with ``shape_weight`` > 0, L1 + MSE weighted 1 + ``shape_weight``
    on the shape and a 2-pixel ring around it. Images (B, 3, 64, 64), coverage (B, 1, 64, 64)."""
    if not shape_weight:
        return F.mse_loss(recon, images)
    near = F.max_pool2d(coverage.float(), 5, stride=1, padding=2)  # (B, 1, 64, 64): shape + 2-px ring
    err = recon - images
    return ((1 + shape_weight * near) * (err.abs() + err**2)).mean()


def train_vae(run: Run, budget_s: float, deadline: float) -> None:
    """Phase 1: reconstruction MSE + 1e-6 × KL (SD's ratio: KL summed per image over pixels summed per image).

    With ``--vae-shape-weight W`` the reconstruction term is (L1 + MSE) weighted 1 + W on the shape and a 2-pixel
    ring around it: plain MSE rounds the corners of 10-pixel squares and triangles, and the scorer (and a
    viewer) tells the kinds apart by exactly those corners."""
    args, vae = run.args, run.vae
    vae.train()
    start, last_ckpt, psnr = time.time(), time.time(), 0.0
    spent0 = run.info["seconds"]["vae"]
    first_step, t_first = run.step, None
    while True:
        spent = spent0 + time.time() - start
        if run.step == first_step + 10:  # time steps 10..30, past the first (slow, warming-up) ones
            t_first = time.time()
        if run.total_steps is None and run.step == first_step + 30:
            per_step = (time.time() - t_first) / 20
            run.total_steps = run.step + max(10, int((budget_s - spent) / per_step))
            log(run, phase="vae", calibrated_steps=run.total_steps, s_per_step=per_step)
        if run.total_steps is None and spent > budget_s:  # too slow to calibrate (a loaded CPU)
            run.total_steps = run.step
        total = run.total_steps or 10**9
        if run.step >= total or time.time() > deadline:
            psnr = vae_psnr(vae, run.device)
            if psnr >= PSNR_TARGET or spent > 1.5 * budget_s or time.time() > deadline:
                break
            run.total_steps = run.step + max(20, run.step // 10)  # short extension at the low learning rate
            log(run, phase="vae", psnr=psnr, extended_to=run.total_steps)
        for group in run.vae_opt.param_groups:
            group["lr"] = args.vae_lr * lr_factor(run.step, total, warmup=50)
        images, coverage, _ = render(run, args.vae_batch)
        with autocast(run.device):
            posterior = vae.encode(images).latent_dist
            z = posterior.sample(generator=run.noise_gen)
            recon = vae.decode(z).sample.float()
        kl = posterior.kl().float().mean() / images[0].numel()
        loss = reconstruction_loss(recon, images, coverage, args.vae_shape_weight) + 1e-6 * kl
        run.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        run.vae_opt.step()
        run.step += 1
        if run.step % args.log_every == 0:
            rec = F.mse_loss(recon.detach(), images).item()  # plain MSE for the log, whatever the loss
            log(run, phase="vae", step=run.step, loss=loss.item(), psnr_batch=10 * math.log10(4 / rec))
        if time.time() - last_ckpt > args.ckpt_every:
            run.info["seconds"]["vae"] = spent0 + time.time() - start
            run.save(Path(args.run_dir) / "checkpoint.pt")
            last_ckpt = time.time()
    run.info["seconds"]["vae"] = spent0 + time.time() - start
    run.info["vae_steps"] = run.step
    run.info["vae_psnr"] = psnr
    run.info["vae_shape_weight"] = args.vae_shape_weight
    run.info["vae_batch"] = args.vae_batch
    log(run, phase="vae", done=True, steps=run.step, psnr=psnr, seconds=run.info["seconds"]["vae"])
    vae.eval().requires_grad_(False)
    set_scaling_factor(run)
    run.phase, run.step, run.total_steps = "unet", 0, None
    run.save(Path(args.run_dir) / "checkpoint.pt")


@torch.no_grad()
def set_scaling_factor(run: Run) -> None:
    """``scaling_factor`` = 1 / std of posterior samples on 512 validation scenes (SD's recipe; 0.18215 there)."""
    run.vae.register_to_config(scaling_factor=1.0)
    images, _ = scenes.render_batch(_to(scenes.validation_scenes(512, seed=7), run.device))
    z = run.vae.encode(images.float()).latent_dist.mode()  # (512, 4, 16, 16)
    factor = 1.0 / z.float().std().item()
    run.vae.register_to_config(scaling_factor=factor)
    log(run, phase="vae", scaling_factor=factor, latent_mean=z.mean().item())


@torch.no_grad()
def fit_latent_rgb(vae: AutoencoderKL, device: torch.device, n: int = 512) -> dict:
    """Least-squares latent→RGB preview: (scaled latent, 4×4-average-pooled image) pairs → 4×3 factors + bias.

    Rows of ``factors`` are latent channels, columns R, G, B; preview = latent·factors + bias ≈ image in [-1, 1]
    at latent resolution. Latents are the scaled ones the UNet sees (posterior mean × scaling_factor).
    """
    images, _ = scenes.render_batch(_to(scenes.validation_scenes(n, seed=11), device))
    latents = vae.encode(images).latent_dist.mode() * vae.config.scaling_factor  # (n, 4, 16, 16)
    small = F.avg_pool2d(images, scenes.IMAGE_SIZE // latents.shape[-1])  # (n, 3, 16, 16)
    x = latents.permute(0, 2, 3, 1).reshape(-1, 4).double()  # (n*256, 4)
    x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (n*256, 5)
    y = small.permute(0, 2, 3, 1).reshape(-1, 3).double()  # (n*256, 3)
    w = torch.linalg.lstsq(x.cpu(), y.cpu()).solution  # (5, 3)
    rmse = (x.cpu() @ w - y.cpu()).pow(2).mean().sqrt().item()
    return {
        "factors": [[round(v, 5) for v in row] for row in w[:4].tolist()],
        "bias": [round(v, 5) for v in w[4].tolist()],
        "rmse": round(rmse, 5),
    }


# ----------------------------------------------------------------------------------------------------------
# Phase 2: UNet + text encoder


@torch.no_grad()
def latent_pool(run: Run, n: int, chunk: int = 256) -> tuple[torch.Tensor, ...]:
    """Render ``n`` training scenes once and keep their VAE posteriors: (mean, std, prompt index, coverage at
    latent resolution for :func:`shape_weight_map`).

    Phase 2 then samples minibatches from the pool (drawing a fresh posterior sample each time) instead of
    running the frozen VAE encoder every step; on a 2-core CPU that removes about a fifth of a step's time.
    """
    means, stds, index, covers = [], [], [], []
    for start in range(0, n, chunk):
        images, coverage, batch = render(run, min(chunk, n - start))
        dist = run.vae.encode(images).latent_dist
        means.append(dist.mean.float())  # (b, 4, 16, 16)
        stds.append(dist.std.float())  # (b, 4, 16, 16)
        index.append(batch.prompt_index())
        covers.append(F.adaptive_avg_pool2d(coverage, 16))  # (b, 1, 16, 16): a 16th of the memory
    log(run, phase="unet", latent_pool=n)
    return torch.cat(means), torch.cat(stds), torch.cat(index), torch.cat(covers)


def sample_timesteps(
    n: int, high_noise: float, device: torch.device, generator: torch.Generator
) -> torch.Tensor:
    """Training timesteps: uniform over 0..999, except a ``high_noise`` fraction drawn from the upper half.

    The layout of a scene (where the shape goes, which colour and kind it is) is decided in the first, noisiest
    sampling steps; small budgets (a CPU) learn place faster when those steps get more of the batch.
    """
    T = SCHEDULE["num_train_timesteps"]
    t = torch.randint(0, T, (n,), device=device, generator=generator)
    if high_noise > 0:
        upper = torch.randint(T // 2, T, (n,), device=device, generator=generator)
        pick = torch.rand(n, device=device, generator=generator) < high_noise
        t = torch.where(pick, upper, t)
    return t


def train_unet(run: Run, deadline: float, prompt_ids: torch.Tensor, empty_ids: torch.Tensor) -> None:
    """Phase 2: v-prediction MSE (timesteps from :func:`sample_timesteps`; weighted towards the shape by
    ``--shape-weight``), 10% of captions dropped to ""; EMA of the weights.

    The step count is fixed from the speed of steps 10..max(40, warmup): during the warmup the learning rate
    does not depend on it, and the longer window keeps a briefly busy machine from shortening the whole run."""
    args, device = run.args, run.device
    noise_sched = DDPMScheduler(**SCHEDULE)
    alphas = noise_sched.alphas_cumprod.to(device)
    run.unet.train()
    run.text_encoder.train()
    pool = latent_pool(run, args.latent_pool) if args.latent_pool else None
    start, last_ckpt, spent0 = time.time(), time.time(), run.info["seconds"]["unet"]
    smooth = None
    first_step, t_first = run.step, None
    calibrate = max(first_step + 40, args.warmup)
    while time.time() < deadline:
        if run.step == first_step + 10:  # time steps 10..calibrate, past the first (slow, warming-up) ones
            t_first = time.time()
        if run.total_steps is None and run.step == calibrate:
            per_step = (time.time() - t_first) / (calibrate - first_step - 10)
            run.total_steps = run.step + max(10, int((deadline - time.time()) / per_step * 0.97))
            log(run, phase="unet", calibrated_steps=run.total_steps, s_per_step=per_step)
        total = run.total_steps or 10**9
        if run.step >= total:
            break
        for group in run.opt.param_groups:
            group["lr"] = args.lr * lr_factor(run.step, total, warmup=args.warmup)
        if pool is not None:  # cached posteriors: no VAE encoder in the step (the CPU's largest cost)
            n_pool = pool[0].shape[0]  # drawn on the device: a host→device copy each step would sync the GPU
            pick = torch.randint(0, n_pool, (args.batch,), device=device, generator=run.noise_gen)
            mean, std = pool[0][pick], pool[1][pick]  # (B, 4, 16, 16) each
            eps = torch.randn(mean.shape, device=device, generator=run.noise_gen)
            latents = mean + std * eps
            prompt_index, coverage = pool[2][pick], pool[3][pick]
        else:
            images, coverage, batch = render(run, args.batch)
            with torch.no_grad(), autocast(device):
                latents = run.vae.encode(images).latent_dist.sample(generator=run.noise_gen)
            prompt_index = batch.prompt_index()
        latents = latents.float() * run.vae.config.scaling_factor  # (B, 4, 16, 16)
        ids = prompt_ids[prompt_index]  # (B, 77)
        drop = torch.rand(args.batch, device=device, generator=run.noise_gen) < args.caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None, :], ids)  # (B, 77)
        t = sample_timesteps(args.batch, args.high_noise, device, run.noise_gen)  # (B,)
        noise = torch.randn(latents.shape, device=device, generator=run.noise_gen)
        a = alphas[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with autocast(device):
            context = run.text_encoder(ids)[0]  # (B, 77, 64)
            pred = run.unet(noisy, t, context).sample
        target = a.sqrt() * noise - (1 - a).sqrt() * latents  # v
        loss = diffusion_loss(pred.float(), target, coverage, args.shape_weight)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(run.params, 1.0)
        run.opt.step()
        decay = min(args.ema, (1 + run.step) / (10 + run.step))
        with torch.no_grad():
            torch._foreach_lerp_(run.ema, [p.detach() for p in run.params], 1 - decay)
        run.step += 1
        # No .item() per step: a host sync each step would stop the CPU from queueing work ahead of the GPU.
        smooth = loss.detach() if smooth is None else smooth.lerp_(loss.detach(), 0.02)
        if run.step % args.log_every == 0:
            if not torch.isfinite(smooth):
                raise FloatingPointError(f"non-finite loss at step {run.step}; lower --lr or resume earlier")
            log(
                run,
                phase="unet",
                step=run.step,
                loss=float(smooth),
                grad=float(grad_norm),
                lr=run.opt.param_groups[0]["lr"],
                s=round(time.time() - start, 1),
            )
        if time.time() - last_ckpt > args.ckpt_every:
            run.info["seconds"]["unet"] = spent0 + time.time() - start
            run.info["unet_steps"] = run.step
            run.save(Path(args.run_dir) / "checkpoint.pt")
            if args.export_every:  # a snapshot of the EMA weights to look at while training goes on
                export(run, Path(args.run_dir) / "snapshot")
            last_ckpt = time.time()
    run.info["seconds"]["unet"] = spent0 + time.time() - start
    run.info["unet_steps"] = run.step
    run.info["final_loss"] = None if smooth is None else float(smooth)
    run.save(Path(args.run_dir) / "checkpoint.pt")


# ----------------------------------------------------------------------------------------------------------
# Export and a quick check


def save_pipeline(
    out: Path, vae: AutoencoderKL, text_encoder: CLIPTextModel, unet: UNet2DConditionModel
) -> StableDiffusionPipeline:
    """Assemble the shipped pipeline from its trained parts and write it to ``out`` (replacing what is there)."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    write_slow_tokenizer_files(out / "tokenizer")
    return pipe


def export(run: Run, out: Path) -> StableDiffusionPipeline:
    """Write the pipeline folder (EMA weights, fp32 safetensors), latent_rgb.json and training.json."""
    unet, text_encoder = UNet2DConditionModel.from_config(run.unet.config), build_text_encoder()
    unet.to(run.device)
    text_encoder.to(run.device)
    for p, e in zip(list(unet.parameters()) + list(text_encoder.parameters()), run.ema, strict=True):
        p.data.copy_(e)
    vae = build_vae().to(run.device)
    vae.load_state_dict(run.vae.state_dict())
    vae.register_to_config(scaling_factor=run.vae.config.scaling_factor)
    pipe = save_pipeline(
        out, vae.float().cpu().eval(), text_encoder.float().cpu().eval(), unet.float().cpu().eval()
    )
    latent_rgb = run.latent_rgb or fit_latent_rgb(vae.to(run.device), run.device)
    run.latent_rgb = latent_rgb
    (out / "latent_rgb.json").write_text(json.dumps(latent_rgb, indent=1) + "\n")
    info = dict(run.info)
    info.update(
        params={"unet": n_params(unet), "vae": n_params(vae), "text_encoder": n_params(text_encoder)},
        scaling_factor=vae.config.scaling_factor,
        machine=machine_name(run.device),
        batch=run.args.batch,
        high_noise=run.args.high_noise,
        shape_weight=run.args.shape_weight,
        latent_pool=run.args.latent_pool,
        command="python scripts/train_embedded.py " + " ".join(run.args.argv),
        lr=run.args.lr,
        ema=run.args.ema,
        seed=run.args.seed,
        schedule=SCHEDULE,
        prediction_type=PREDICTION,
    )
    info["log"] = info["log"][-40:]
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    return pipe


def write_slow_tokenizer_files(folder: Path) -> None:
    """Add vocab.json and merges.txt beside tokenizer.json: transformers 4 builds its slow ``CLIPTokenizer``
    from them (transformers 5 saves only tokenizer.json)."""
    from sdexplore.tokenizer import _vocab_and_merges

    vocab, merges = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


#: A pipeline folder's files as a flat folder (a device run sends back plain files at most two folders down).
FLAT_FILES = {
    "unet.safetensors": "unet/diffusion_pytorch_model.safetensors",
    "vae.safetensors": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder.safetensors": "text_encoder/model.safetensors",
    "vae_config.json": "vae/config.json",
    "unet_config.json": "unet/config.json",
    "training.json": "training.json",
    "latent_rgb.json": "latent_rgb.json",
}


def flatten(out: Path, flat: Path) -> None:
    """Copy the exported pipeline folder ``out``'s weights and records into the flat folder ``flat``
    (``--flat-out``, e.g. a device run's ``$OUT``); :func:`assemble` rebuilds the folder from them."""
    flat.mkdir(parents=True, exist_ok=True)
    for name, rel in FLAT_FILES.items():
        shutil.copy(out / rel, flat / name)


def assemble(flat: Path, out: Path) -> None:
    """Build the pipeline folder from a flat copy of a GPU run's files (what a device run can send back:
    unet/vae/text_encoder ``.safetensors``, the VAE's and UNet's ``config.json``, ``training.json``,
    ``latent_rgb.json``)."""
    from safetensors.torch import load_file

    unet_config = flat / "unet_config.json"
    if not unet_config.exists():  # flat copies from before 2026-11-26 lack it (and hold a three-level UNet)
        raise FileNotFoundError(
            f"{unet_config} is missing: copy the UNet's config.json of the run that wrote these files there"
        )
    unet = UNet2DConditionModel.from_config(json.loads(unet_config.read_text()))
    vae, text_encoder = build_vae(), build_text_encoder()
    vae.load_state_dict(load_file(flat / "vae.safetensors"))
    unet.load_state_dict(load_file(flat / "unet.safetensors"))
    text_encoder.load_state_dict(load_file(flat / "text_encoder.safetensors"))
    vae.register_to_config(
        scaling_factor=json.loads((flat / "vae_config.json").read_text())["scaling_factor"]
    )
    save_pipeline(out, vae, text_encoder, unet)
    for name in ("training.json", "latent_rgb.json"):
        shutil.copy(flat / name, out / name)


def machine_name(device: torch.device) -> str:
    """A short description of where this ran (GPU name, or CPU core count)."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {platform.machine()}), torch {torch.__version__}"


@torch.no_grad()
def quick_eval(pipe: StableDiffusionPipeline, device: torch.device, n: int) -> dict:
    """Generate ``n`` validation prompts (25 DDIM steps, CFG 7.5, seed i for prompt i) and score them."""
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = scenes.validation_prompts()[:n]
    images = []
    for i in range(0, n, 64):
        chunk = prompts[i : i + 64]
        gens = [torch.Generator(device=device).manual_seed(i + j) for j in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=25, guidance_scale=7.5, generator=gens, output_type="np")
        images += [(im * 255).round().astype("uint8") for im in out.images]
    return scenes.score_images(images, prompts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=6.0, help="whole run's time budget (both phases)")
    parser.add_argument("--vae-minutes", type=float, default=1.25, help="phase 1's share of the budget")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="pipeline folder to write")
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "embedded"), help="checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from --run-dir/checkpoint.pt")
    parser.add_argument("--init-from", default=None, help="start phase 2 from a saved pipeline folder")
    parser.add_argument(
        "--vae-from", default=None, help="skip phase 1: this pipeline folder's VAE; new UNet and text encoder"
    )
    parser.add_argument(
        "--vae-only", action="store_true", help="stop after phase 1 and export (the VAE for --vae-from)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-batch", type=int, default=64)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument(
        "--vae-shape-weight",
        type=float,
        default=0.0,
        help="phase 1: extra (L1 + MSE) weight on the shape and a 2-px ring (0: plain MSE)",
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument(
        "--latent-pool",
        type=int,
        default=0,
        help="phase 2: encode this many scenes once and sample from them",
    )
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument(
        "--shape-weight",
        type=float,
        default=0.0,
        help="phase 2: extra loss weight on the shape and its edge (0: plain MSE)",
    )
    parser.add_argument(
        "--high-noise",
        type=float,
        default=0.0,
        help="phase 2: fraction of timesteps drawn from the noisier half (where layout is decided)",
    )
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--ckpt-every", type=float, default=60.0, help="seconds between checkpoints")
    parser.add_argument("--export-every", action="store_true", help="export a snapshot at each checkpoint")
    parser.add_argument("--reserve-s", type=float, default=25.0, help="seconds kept for export and eval")
    parser.add_argument(
        "--eval-prompts", type=int, default=0, help="score this many validation prompts at the end"
    )
    parser.add_argument(
        "--flat-out",
        default=None,
        help="also copy the exported weights and records here, flat (a device's $OUT)",
    )
    parser.add_argument("--assemble-from", default=None, help="only build --out from a GPU run's flat files")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in training.json as the run's command
    if args.vae_from and args.init_from:
        parser.error(
            "--vae-from trains a new UNet on a saved VAE, --init-from fine-tunes a saved model: pick one"
        )
    if args.vae_only and (args.vae_from or args.init_from):
        parser.error("--vae-only trains phase 1, which --vae-from and --init-from skip: drop one of them")
    if args.assemble_from:
        assemble(Path(args.assemble_from), Path(args.out))
        return

    t0 = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    deadline = t0 + args.minutes * 60 - args.reserve_s
    ckpt = Path(args.run_dir) / "checkpoint.pt"
    state = (
        torch.load(ckpt, map_location=device, weights_only=False) if args.resume and ckpt.exists() else None
    )
    unet_config = None
    if state is not None:
        unet_config = state.get("unet_config")
    elif args.init_from:
        unet_config = UNet2DConditionModel.load_config(Path(args.init_from) / "unet")
    run = Run(args, device, unet_config)
    if state is not None:
        run.load(state)
        log(run, resumed=str(ckpt), phase=run.phase, step=run.step)
    elif args.init_from:
        run.init_from_pipeline(Path(args.init_from))
        log(run, init_from=args.init_from)
    elif args.vae_from:
        run.vae_from_pipeline(Path(args.vae_from))
        log(run, vae_from=args.vae_from)
    print(
        f"params: unet {n_params(run.unet):,} vae {n_params(run.vae):,} text {n_params(run.text_encoder):,}; "
        f"device {machine_name(device)}",
        flush=True,
    )

    if run.phase == "vae":
        train_vae(run, args.vae_minutes * 60, deadline)
    else:
        run.vae.eval().requires_grad_(False)
    if args.vae_only:
        export(run, Path(args.out))
        print(json.dumps({"exported_vae": args.out, "wall_s": round(time.time() - t0, 1)}), flush=True)
        return
    tokenizer = clip_tokenizer()
    table = scenes.prompt_table()
    prompt_ids = tokenizer(table, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    prompt_ids = prompt_ids.input_ids.to(device)  # (11664, 77)
    empty_ids = (
        tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0].to(device)
    )
    train_unet(run, deadline, prompt_ids, empty_ids)
    log(run, phase="unet", done=True, steps=run.step, seconds=run.info["seconds"]["unet"])

    pipe = export(run, Path(args.out))
    psnr = vae_psnr(pipe.vae.to(device), device)
    print(
        json.dumps({"exported": args.out, "psnr": round(psnr, 2), "wall_s": round(time.time() - t0, 1)}),
        flush=True,
    )
    if args.flat_out:
        flatten(Path(args.out), Path(args.flat_out))
    if args.eval_prompts:
        scores = quick_eval(pipe, device, args.eval_prompts)
        print(json.dumps({"quick_eval": scores, "n": args.eval_prompts}), flush=True)
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
