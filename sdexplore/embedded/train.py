"""Train the embedded tiny-shapes model: a text-to-image latent diffusion model of standard diffusers parts.

Phase 1 trains the VAE (AutoencoderKL, 64×64×3 ↔ 16×16×4) on rendered scenes until the time budget of the
phase is spent and validation PSNR ≥ 28 dB (or 1.5× its budget passed), then sets ``scaling_factor`` = 1/std of
the latents and fits the latent→RGB preview factors. Phase 2 trains the UNet and the CLIP text encoder jointly,
VAE frozen: v-prediction with zero terminal SNR, 10% caption dropout to "" for classifier-free guidance, warmup +
cosine learning rate, an EMA of the weights (the EMA is what ships). Scenes are rendered on the training device
from sampled parameters (:mod:`.data`), so no data set is stored.

The whole run has one time budget (:attr:`TrainConfig.minutes`); each phase calibrates its speed over its first
steps and then fixes its step count, so the schedule is a function of the step alone. Checkpoints go to
``run_dir``; ``resume`` continues from there. Runs unchanged on a GPU (``device="cuda"``, bf16 autocast).
:func:`train` is the whole run; ``scripts/train_embedded.py`` is its command line.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from ..errors import ModelNotAvailableError
from . import scenes
from .architecture import (
    PREDICTION,
    SCHEDULE,
    build_text_encoder,
    build_unet,
    build_vae,
    n_params,
)
from .config import TrainConfig
from .data import autocast, latent_pool, render, tokenised_prompts, validation_images
from .evaluate import vae_psnr
from .folder import flatten, save_pipeline
from .losses import diffusion_loss, reconstruction_loss, sample_timesteps

PSNR_TARGET = 28.0
#: The earlier run's record kept as ``earlier`` in a fine-tune's training.json (the model card's history).
_KEPT_HISTORY = (
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


class Run:
    """Everything a checkpoint holds: models, optimisers, EMA, step counters, RNG states, the log."""

    def __init__(self, config: TrainConfig, device: torch.device, unet_config: dict | None = None):
        self.config = config
        self.device = device
        torch.manual_seed(config.seed)
        self.vae = build_vae().to(device)
        # A fine-tune or a resumed run keeps the architecture it started with (an older model's UNet may differ
        # from build_unet()'s); a new run builds build_unet().
        unet = UNet2DConditionModel.from_config(unet_config) if unet_config else build_unet()
        self.unet = unet.to(device)
        self.text_encoder = build_text_encoder().to(device)
        self.phase = "vae"
        self.step = 0
        self.total_steps: int | None = None
        self.scene_gen = torch.Generator().manual_seed(config.seed)
        self.noise_gen = torch.Generator(device=device).manual_seed(config.seed + 1)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(
            self.params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0, fused=fused
        )
        self.ema = [p.detach().clone() for p in self.params]
        self.info: dict = {"log": [], "seconds": {"vae": 0.0, "unet": 0.0}}
        self.latent_rgb: dict | None = None

    def state(self) -> dict:
        """The checkpoint's contents (what :meth:`load` reads back)."""
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
        """Write the checkpoint through a temporary file (a crash mid-write keeps the previous one)."""
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
            self.info["earlier"] = {k: prev[k] for k in _KEPT_HISTORY if k in prev}
            self.info["vae_machine"] = prev.get("vae_machine")

    def vae_from_pipeline(self, folder: Path) -> None:
        """Skip phase 1: take the frozen VAE, its preview factors and its record from a saved pipeline folder
        (e.g. a ``vae_only`` run) and train a new UNet and text encoder from scratch on its latents."""
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

    @property
    def checkpoint(self) -> Path:
        """Where this run's checkpoint goes."""
        return Path(self.config.run_dir) / "checkpoint.pt"


def optimizer_step(run: Any, loss: torch.Tensor, ema: float) -> torch.Tensor:
    """One optimiser step on ``loss`` (gradients clipped to norm 1), the EMA of the trained weights moved towards
    them, ``run.step`` advanced (``run`` has ``opt``, ``params``, ``ema``, ``step``). Returns the gradient norm as a
    tensor: no host sync."""
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, 1.0)
    run.opt.step()
    decay = min(ema, (1 + run.step) / (10 + run.step))
    with torch.no_grad():
        torch._foreach_lerp_(run.ema, [p.detach() for p in run.params], 1 - decay)
    run.step += 1
    return grad_norm


def log(run: Run, **fields) -> None:
    """Print one JSON line and keep it in the run's log (the last 200 are kept)."""
    fields = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in fields.items()}
    print(json.dumps(fields), flush=True)
    run.info["log"] = (run.info["log"] + [fields])[-200:]


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup then cosine decay to 5% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------
# Phase 1: the VAE


def train_vae(run: Run, budget_s: float, deadline: float) -> None:
    """Phase 1: reconstruction MSE + 1e-6 × KL (SD's ratio: KL summed per image over pixels summed per image).

    With ``vae_shape_weight`` W the reconstruction term is (L1 + MSE) weighted 1 + W on the shape and a 2-pixel
    ring around it: plain MSE rounds the corners of 10-pixel squares and triangles, and the scorer (and a
    viewer) tells the kinds apart by exactly those corners."""
    config, vae = run.config, run.vae
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
            psnr = vae_psnr(vae)
            if psnr >= PSNR_TARGET or spent > 1.5 * budget_s or time.time() > deadline:
                break
            run.total_steps = run.step + max(20, run.step // 10)  # short extension at the low learning rate
            log(run, phase="vae", psnr=psnr, extended_to=run.total_steps)
        for group in run.vae_opt.param_groups:
            group["lr"] = config.vae_lr * lr_factor(run.step, total, warmup=50)
        images, coverage, _ = render(config.vae_batch, run.scene_gen, run.device)
        with autocast(run.device):
            posterior = vae.encode(images).latent_dist
            z = posterior.sample(generator=run.noise_gen)
            recon = vae.decode(z).sample.float()
        kl = posterior.kl().float().mean() / images[0].numel()
        loss = reconstruction_loss(recon, images, coverage, config.vae_shape_weight) + 1e-6 * kl
        run.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        run.vae_opt.step()
        run.step += 1
        if run.step % config.log_every == 0:
            rec = F.mse_loss(recon.detach(), images).item()  # plain MSE for the log, whatever the loss
            log(run, phase="vae", step=run.step, loss=loss.item(), psnr_batch=10 * math.log10(4 / rec))
        if time.time() - last_ckpt > config.ckpt_every:
            run.info["seconds"]["vae"] = spent0 + time.time() - start
            run.save(run.checkpoint)
            last_ckpt = time.time()
    run.info["seconds"]["vae"] = spent0 + time.time() - start
    run.info["vae_steps"] = run.step
    run.info["vae_psnr"] = psnr
    run.info["vae_shape_weight"] = config.vae_shape_weight
    run.info["vae_batch"] = config.vae_batch
    log(run, phase="vae", done=True, steps=run.step, psnr=psnr, seconds=run.info["seconds"]["vae"])
    vae.eval().requires_grad_(False)
    set_scaling_factor(run)
    run.phase, run.step, run.total_steps = "unet", 0, None
    run.save(run.checkpoint)


@torch.no_grad()
def set_scaling_factor(run: Run) -> None:
    """``scaling_factor`` = 1 / std of posterior samples on 512 validation scenes (SD's recipe; 0.18215 there)."""
    run.vae.register_to_config(scaling_factor=1.0)
    images = validation_images(512, seed=7, device=run.device)
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
    images = validation_images(n, seed=11, device=device)
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


def train_unet(run: Run, deadline: float, prompt_ids: torch.Tensor, empty_ids: torch.Tensor) -> None:
    """Phase 2: v-prediction MSE (timesteps from :func:`~.losses.sample_timesteps`; weighted towards the shape
    by ``shape_weight``), ``caption_dropout`` of captions dropped to ""; EMA of the weights.

    ``prompt_ids`` (11664, 77) and ``empty_ids`` (77,) come from :func:`~.data.tokenised_prompts`. The step
    count is fixed from the speed of steps 10..max(40, warmup): during the warmup the learning rate does not
    depend on it, and the longer window keeps a briefly busy machine from shortening the whole run."""
    config, device = run.config, run.device
    noise_sched = DDPMScheduler(**SCHEDULE)
    alphas = noise_sched.alphas_cumprod.to(device)
    run.unet.train()
    run.text_encoder.train()
    pool = None
    if config.latent_pool:
        pool = latent_pool(run.vae, config.latent_pool, run.scene_gen, device)
        log(run, phase="unet", latent_pool=config.latent_pool)
    start, last_ckpt, spent0 = time.time(), time.time(), run.info["seconds"]["unet"]
    smooth = None
    first_step, t_first = run.step, None
    calibrate = max(first_step + 40, config.warmup)
    # at least one step, even past the deadline: a loaded machine never exports an untrained phase 2
    while time.time() < deadline or run.step == first_step:
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
            group["lr"] = config.lr * lr_factor(run.step, total, warmup=config.warmup)
        if pool is not None:  # cached posteriors: no VAE encoder in the step (the CPU's largest cost)
            n_pool = pool[0].shape[0]  # drawn on the device: a host→device copy each step would sync the GPU
            pick = torch.randint(0, n_pool, (config.batch,), device=device, generator=run.noise_gen)
            mean, std = pool[0][pick], pool[1][pick]  # (B, 4, 16, 16) each
            eps = torch.randn(mean.shape, device=device, generator=run.noise_gen)
            latents = mean + std * eps
            prompt_index, coverage = pool[2][pick], pool[3][pick]
        else:
            images, coverage, batch = render(config.batch, run.scene_gen, device)
            with torch.no_grad(), autocast(device):
                latents = run.vae.encode(images).latent_dist.sample(generator=run.noise_gen)
            prompt_index = batch.prompt_index()
        latents = latents.float() * run.vae.config.scaling_factor  # (B, 4, 16, 16)
        ids = prompt_ids[prompt_index]  # (B, 77)
        drop = torch.rand(config.batch, device=device, generator=run.noise_gen) < config.caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None, :], ids)  # (B, 77)
        t = sample_timesteps(
            config.batch, config.high_noise, device, run.noise_gen, SCHEDULE["num_train_timesteps"]
        )  # (B,)
        noise = torch.randn(latents.shape, device=device, generator=run.noise_gen)
        a = alphas[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        with autocast(device):
            context = run.text_encoder(ids)[0]  # (B, 77, 64)
            pred = run.unet(noisy, t, context).sample
        target = a.sqrt() * noise - (1 - a).sqrt() * latents  # v
        loss = diffusion_loss(pred.float(), target, coverage, config.shape_weight)
        grad_norm = optimizer_step(run, loss, config.ema)
        # No .item() per step: a host sync each step would stop the CPU from queueing work ahead of the GPU.
        smooth = loss.detach() if smooth is None else smooth.lerp_(loss.detach(), 0.02)
        if run.step % config.log_every == 0:
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
        if time.time() - last_ckpt > config.ckpt_every:
            run.info["seconds"]["unet"] = spent0 + time.time() - start
            run.info["unet_steps"] = run.step
            run.save(run.checkpoint)
            if config.export_every:  # a snapshot of the EMA weights to look at while training goes on
                export(run, Path(config.run_dir) / "snapshot")
            last_ckpt = time.time()
    run.info["seconds"]["unet"] = spent0 + time.time() - start
    run.info["unet_steps"] = run.step
    run.info["final_loss"] = None if smooth is None else float(smooth)
    run.save(run.checkpoint)


# ----------------------------------------------------------------------------------------------------------
# Export, a quick check, the whole run


def export(run: Run, out: Path) -> StableDiffusionPipeline:
    """Write the pipeline folder (EMA weights, fp32 safetensors) with latent_rgb.json and training.json."""
    unet, text_encoder = UNet2DConditionModel.from_config(run.unet.config), build_text_encoder()
    unet.to(run.device)
    text_encoder.to(run.device)
    for p, e in zip(list(unet.parameters()) + list(text_encoder.parameters()), run.ema, strict=True):
        p.data.copy_(e)
    vae = build_vae().to(run.device)
    vae.load_state_dict(run.vae.state_dict())
    vae.eval()
    vae.register_to_config(scaling_factor=run.vae.config.scaling_factor)
    latent_rgb = run.latent_rgb or fit_latent_rgb(vae, run.device)
    run.latent_rgb = latent_rgb
    config = run.config
    info = dict(run.info)
    info.update(
        params={"unet": n_params(unet), "vae": n_params(vae), "text_encoder": n_params(text_encoder)},
        scaling_factor=vae.config.scaling_factor,
        machine=machine_name(run.device),
        batch=config.batch,
        high_noise=config.high_noise,
        shape_weight=config.shape_weight,
        latent_pool=config.latent_pool,
        command=config.recorded_command(),
        lr=config.lr,
        ema=config.ema,
        seed=config.seed,
        schedule=SCHEDULE,
        prediction_type=PREDICTION,
    )
    info["log"] = info["log"][-40:]
    records = {
        "latent_rgb.json": json.dumps(latent_rgb, indent=1) + "\n",
        "training.json": json.dumps(info, indent=1) + "\n",
    }
    return save_pipeline(
        Path(out),
        vae.float().cpu().eval(),
        text_encoder.float().cpu().eval(),
        unet.float().cpu().eval(),
        extra_files=records,
    )


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


def _check_start(config: TrainConfig) -> None:
    """The folders a run starts from hold what it reads (checked before any model is built)."""
    if config.init_from and not (Path(config.init_from) / "unet" / "config.json").is_file():
        raise ModelNotAvailableError(
            f"--init-from {config.init_from}: no unet/config.json there; pass a pipeline folder this script "
            "exported (--out of an earlier run)"
        )
    if config.vae_from:
        folder = Path(config.vae_from)
        missing = [n for n in ("vae/config.json", "training.json") if not (folder / n).is_file()]
        if missing:
            raise ModelNotAvailableError(
                f"--vae-from {config.vae_from}: no {' or '.join(missing)} there; pass a folder a --vae-only run "
                "(or any run of this script) exported"
            )


def train(config: TrainConfig) -> StableDiffusionPipeline:
    """One whole training run (phase 1 unless skipped, phase 2 unless ``vae_only``), exported to ``config.out``
    (and copied flat to ``config.flat_out``); returns the exported pipeline. Progress goes to stdout as JSON
    lines."""
    t0 = time.time()
    ckpt = Path(config.run_dir) / "checkpoint.pt"
    resuming = config.resume and ckpt.exists()
    if not resuming:
        _check_start(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    deadline = t0 + config.minutes * 60 - config.reserve_s
    state = torch.load(ckpt, map_location=device, weights_only=False) if resuming else None
    unet_config = None
    if state is not None:
        unet_config = state.get("unet_config")
    elif config.init_from:
        unet_config = UNet2DConditionModel.load_config(Path(config.init_from) / "unet")
    run = Run(config, device, unet_config)
    if state is not None:
        run.load(state)
        log(run, resumed=str(ckpt), phase=run.phase, step=run.step)
    elif config.init_from:
        run.init_from_pipeline(Path(config.init_from))
        log(run, init_from=config.init_from)
    elif config.vae_from:
        run.vae_from_pipeline(Path(config.vae_from))
        log(run, vae_from=config.vae_from)
    print(
        f"params: unet {n_params(run.unet):,} vae {n_params(run.vae):,} text {n_params(run.text_encoder):,}; "
        f"device {machine_name(device)}",
        flush=True,
    )

    if run.phase == "vae":
        train_vae(run, config.vae_minutes * 60, deadline)
    else:
        run.vae.eval().requires_grad_(False)
    if config.vae_only:
        pipe = export(run, Path(config.out))
        print(json.dumps({"exported_vae": config.out, "wall_s": round(time.time() - t0, 1)}), flush=True)
        return pipe
    prompt_ids, empty_ids = tokenised_prompts(device)  # (11664, 77), (77,)
    train_unet(run, deadline, prompt_ids, empty_ids)
    log(run, phase="unet", done=True, steps=run.step, seconds=run.info["seconds"]["unet"])

    pipe = export(run, Path(config.out))
    psnr = vae_psnr(pipe.vae.to(device))
    print(
        json.dumps({"exported": config.out, "psnr": round(psnr, 2), "wall_s": round(time.time() - t0, 1)}),
        flush=True,
    )
    if config.flat_out:
        flatten(Path(config.out), Path(config.flat_out))
    if config.eval_prompts:
        scores = quick_eval(pipe, device, config.eval_prompts)
        print(json.dumps({"quick_eval": scores, "n": config.eval_prompts}), flush=True)
    print(f"done in {time.time() - t0:.0f} s", flush=True)
    return pipe
