"""The embedded MMDiT model (tiny-shapes-mmdit): its parts, its flow-matching training run and its folder.

A plain ``StableDiffusion3Pipeline`` folder with ``text_encoder_3=None`` (SD3 then puts zeros where T5's
sequence goes). SD3 rather than Flux: SD3's pipeline runs on two small CLIP encoders and no T5 (Flux needs a
T5 encoder for its whole text sequence and a CLIP only for the pooled vector), so the model reuses the real
CLIP tokenizer and tiny-shapes' trained text encoder, and the T5 slot costs no weights. The VAE is tiny-shapes'
4-channel one (the SD3 pipeline reads the channel count from ``transformer.config.in_channels``, so 4 latent
channels work unchanged) with ``shift_factor`` set to its latent mean.

Training (phase 2 only: the VAE is frozen) is rectified flow: x_s = (1 − s)·x0 + s·ε, target v = ε − x0,
s from a logit-normal shifted by the run's ``--flow-shift`` (:data:`SHIFT` by default), the transformer called
with timestep 1000·s as the pipeline calls it; the text encoders train jointly; an EMA ships. The text side is
exactly what the pipeline builds at inference: both CLIPs' penultimate hidden states concatenated and zero-padded
to the joint width, then :data:`MAX_SEQUENCE_LENGTH` zero T5 tokens, and the pooled projections concatenated.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ..errors import ModelNotAvailableError
from ..schedule_math import x0_from_flow
from . import scenes
from .architecture import n_params
from .config import TrainConfig
from .data import latent_pool, tokenised_prompts
from .losses import (
    attention_localisation_loss,
    diffusion_loss,
    flow_matching_pair,
    pixel_loss,
    sample_flow_sigmas,
)
from .model import EMBEDDED_MODEL_DIR, MMDIT_MODEL_DIR

#: Default shift of the flow-matching sigmas (SD3's ``FlowMatchEulerDiscreteScheduler(shift=...)``), used in
#: training too (``--flow-shift``). SD3 uses 3.0 on 128×128 latents; a 16×16 latent needs less to reach the
#: noise levels where the layout is set.
SHIFT = 2.0
#: Logit-normal training sigmas (SD3's mean 0, std 1), then shifted by the run's ``--flow-shift``.
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0
#: The zero T5 tokens the pipeline appends without T5 (its default ``max_sequence_length``); trained with.
MAX_SEQUENCE_LENGTH = 256
CLIP_LENGTH = 77
#: Hidden width of the second CLIP (SD3's CLIP-G slot): small, its 49,408-token embedding is most of its size.
TEXT2_HIDDEN = 16
TEXT1_HIDDEN = 64  # tiny-shapes' text encoder


def build_transformer(
    width: int = 96, layers: int = 4, head_dim: int = 16, patch: int = 2
) -> SD3Transformer2DModel:
    """SD3Transformer2DModel on 16×16×4 latents with ``patch``×``patch`` patches (1: 256 image tokens, so the
    joint-attention maps have the latent's resolution), ``layers`` joint blocks of ``width // head_dim`` heads.

    ``pos_embed_max_size`` (16 latent cells in patches) is also the largest image it can draw: 64 pixels per side
    with tiny-shapes' 4× VAE. sdexplore's entry points check it before any work (``sdexplore._checks.size_limit``
    reads it from the config); a plain pipeline call above it fails in the transformer's first forward."""
    joint = TEXT1_HIDDEN + TEXT2_HIDDEN
    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=patch,
        in_channels=4,
        out_channels=4,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=width // head_dim,
        joint_attention_dim=joint,  # CLIP-1 ‖ CLIP-2 hidden widths (SD3 pads them to T5's width: equal here)
        caption_projection_dim=width,
        pooled_projection_dim=joint,  # CLIP-1 ‖ CLIP-2 pooled projections
        pos_embed_max_size=16 // patch,
    )


def ignore_pooled(transformer: SD3Transformer2DModel) -> None:
    """Make ``transformer`` ignore its ``pooled_projections`` for good: the pooled projection's input weights
    are zeroed and frozen, so its output is a constant (its biases) and the prompt reaches the image only
    through joint attention. The folder stays a plain SD3 one: the pipeline still passes a pooled vector."""
    weight = transformer.time_text_embed.text_embedder.linear_1.weight
    with torch.no_grad():
        weight.zero_()
    weight.requires_grad_(False)


def build_text_encoder_2() -> CLIPTextModelWithProjection:
    """The second CLIP (SD3's CLIP-G slot): hidden 16, 2 layers, 2 heads, the full 49,408-token vocabulary."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT2_HIDDEN,
        intermediate_size=4 * TEXT2_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_LENGTH,
        projection_dim=TEXT2_HIDDEN,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config)


def text_encoder_1_from(folder: Path = EMBEDDED_MODEL_DIR) -> CLIPTextModelWithProjection:
    """The first CLIP, started from tiny-shapes' trained text encoder (it knows the world's words already) with
    a new projection for the pooled vector."""
    base = CLIPTextModel.from_pretrained(folder / "text_encoder")
    config = CLIPTextConfig(**{**base.config.to_dict(), "architectures": ["CLIPTextModelWithProjection"]})
    model = CLIPTextModelWithProjection(config)
    try:
        model.text_model.load_state_dict(base.state_dict())
    except RuntimeError as error:
        raise ModelNotAvailableError(
            f"{folder}/text_encoder does not fit a CLIPTextModelWithProjection: {error}"
        ) from error
    return model


def build_scheduler(shift: float = SHIFT) -> FlowMatchEulerDiscreteScheduler:
    """The saved sampler: flow-matching Euler with the run's ``shift`` (SD3's scheduler)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def load_vae(folder: Path = EMBEDDED_MODEL_DIR) -> AutoencoderKL:
    """tiny-shapes' VAE, frozen; ``shift_factor`` is set by :func:`set_shift` (SD3's pipeline needs one)."""
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def set_shift(vae: AutoencoderKL, n: int = 512) -> None:
    """SD3's latent normalisation: shift_factor = mean of the posterior modes, scaling_factor = 1/their std."""
    from .data import validation_images

    images = validation_images(n, seed=7)
    z = vae.encode(images).latent_dist.mode()  # (n, 4, 16, 16)
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / z.std().item())


def encode_text(
    te1: CLIPTextModelWithProjection, te2: CLIPTextModelWithProjection, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``StableDiffusion3Pipeline.encode_prompt`` builds without T5 from token ids (B, 77): the joint
    sequence (B, 77 + 256, 80) and the pooled vector (B, 80)."""
    out1 = te1(ids, output_hidden_states=True)
    out2 = te2(ids, output_hidden_states=True)
    clip = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (B, 77, 80)
    t5 = clip.new_zeros(clip.shape[0], MAX_SEQUENCE_LENGTH, clip.shape[-1])  # (B, 256, 80)
    pooled = torch.cat([out1.text_embeds, out2.text_embeds], dim=-1)  # (B, 80)
    return torch.cat([clip, t5], dim=1), pooled


class CollapsedZerosProcessor:
    """Training-time joint attention over a context whose last token stands for ``copies`` identical zero-T5
    tokens: the same output as the pipeline's ``JointAttnProcessor2_0`` over all copies, at the cost of one.

    Without T5 the pipeline appends :data:`MAX_SEQUENCE_LENGTH` zero rows; SD3 gives text tokens no position,
    so they stay identical through every block, and in a softmax N identical keys and values are one key whose
    logit is raised by log N. Training with one such token and that bias is exact and cuts the context stream
    from 333 tokens to 78."""

    def __init__(self, copies: int, keep_text_probs: int = 0):
        self.log_copies = float(torch.log(torch.tensor(float(copies))))
        #: with ``keep_text_probs`` = k > 0, each call also appends the first k images' query probabilities on
        #: the text keys, (k, heads, N_img, L_ctx), here (an explicit softmax of those rows beside SDPA: all B
        #: would triple a CPU step's time); the training loop clears it
        self.keep = keep_text_probs
        self.text_probs: list[torch.Tensor] | None = [] if keep_text_probs else None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)  # (B, heads, L, d)

        q, k, v = (
            split(attn.to_q(hidden_states)),
            split(attn.to_k(hidden_states)),
            split(attn.to_v(hidden_states)),
        )
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        cq = split(attn.add_q_proj(encoder_hidden_states))
        ck = split(attn.add_k_proj(encoder_hidden_states))
        cv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)  # (B, heads, L, d)
        bias = torch.zeros(
            1, k.shape[2], dtype=q.dtype, device=q.device
        )  # (1, L): the keys' log-multiplicity
        bias[0, -1] = self.log_copies
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        if self.text_probs is not None:  # the same softmax for the first images' image queries, kept
            kq, kk = q[: self.keep, :, :n_img], k[: self.keep]  # (k, heads, N_img, d), (k, heads, L, d)
            logits = (kq @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias  # (k, heads, N_img, L)
            self.text_probs.append(logits.softmax(dim=-1)[..., n_img:])  # (k, heads, N_img, L_ctx)
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1])  # (B, L, heads·d)
        img, ctx = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](img)), ctx


def shape_token_ids(device: torch.device) -> torch.Tensor:
    """The CLIP token ids of the world's shape words (one token each), (3,) on ``device``."""
    from ..tokenizer import clip_tokenizer
    from .scenes import SHAPES

    tokenizer = clip_tokenizer()
    ids = [tokenizer(word, add_special_tokens=False).input_ids for word in SHAPES]
    if any(len(i) != 1 for i in ids):
        raise ModelNotAvailableError(f"a shape word of {SHAPES} is not one CLIP token: {ids}")
    return torch.tensor([i[0] for i in ids], device=device)


def encode_text_collapsed(
    te1: CLIPTextModelWithProjection, te2: CLIPTextModelWithProjection, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_text` with the zero-T5 block as one row (B, 77 + 1, 80), for :class:`CollapsedZerosProcessor`."""
    out1 = te1(ids, output_hidden_states=True)
    out2 = te2(ids, output_hidden_states=True)
    clip = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (B, 77, 80)
    pooled = torch.cat([out1.text_embeds, out2.text_embeds], dim=-1)  # (B, 80)
    return torch.cat([clip, clip.new_zeros(clip.shape[0], 1, clip.shape[-1])], dim=1), pooled


class MMDiTRun:
    """Everything a checkpoint of an MMDiT run holds: models, optimiser, EMA, counters, RNG states, the log."""

    def __init__(self, config: TrainConfig, device: torch.device):
        self.config = config
        self.device = device
        torch.manual_seed(config.seed)
        source = Path(config.vae_from) if config.vae_from else EMBEDDED_MODEL_DIR
        # frozen: it encodes the latent pool and decodes for --pixel-weight, never trains
        self.vae = load_vae(source).to(device).requires_grad_(False)
        set_shift(self.vae)
        self.transformer = build_transformer(patch=config.patch).to(device)
        if config.no_pooled:
            ignore_pooled(self.transformer)
        self.te1 = text_encoder_1_from(source).to(device)
        self.te2 = build_text_encoder_2().to(device)
        self.step, self.total_steps = 0, None
        self.scene_gen = torch.Generator().manual_seed(config.seed)
        self.noise_gen = torch.Generator(device=device).manual_seed(config.seed + 1)
        self.params = [*self.transformer.parameters(), *self.te1.parameters(), *self.te2.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.ema = [p.detach().clone() for p in self.params]
        self.info: dict = {"log": [], "seconds": {"transformer": 0.0}, "vae_from": str(source)}

    @property
    def checkpoint(self) -> Path:
        """Where this run's checkpoint goes."""
        return Path(self.config.run_dir) / "checkpoint.pt"

    def save(self) -> None:
        """Write the checkpoint through a temporary file (a crash mid-write keeps the previous one)."""
        path = self.checkpoint
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "transformer": self.transformer.state_dict(),
            "te1": self.te1.state_dict(),
            "te2": self.te2.state_dict(),
            "opt": self.opt.state_dict(),
            "ema": [e.cpu() for e in self.ema],
            "step": self.step,
            "total_steps": self.total_steps,
            "scene_gen": self.scene_gen.get_state(),
            "noise_gen": self.noise_gen.get_state(),
            "info": self.info,
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load(self, state: dict) -> None:
        """Continue from a checkpoint."""
        self.transformer.load_state_dict(state["transformer"])
        self.te1.load_state_dict(state["te1"])
        self.te2.load_state_dict(state["te2"])
        self.opt.load_state_dict(state["opt"])
        for e, saved in zip(self.ema, state["ema"], strict=True):
            e.copy_(saved.to(self.device))
        self.step, self.total_steps = state["step"], state["total_steps"]
        self.scene_gen.set_state(state["scene_gen"])
        self.noise_gen.set_state(state["noise_gen"])
        self.info = state["info"]


def _log(run: MMDiTRun, **fields) -> None:
    fields = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in fields.items()}
    print(json.dumps(fields), flush=True)
    run.info["log"] = (run.info["log"] + [fields])[-200:]


def _pick_weights(prompt_index: torch.Tensor, square_boost: float) -> torch.Tensor | None:
    """Sampling weights over the latent pool (n,): ``square_boost`` for scenes of squares, 1 for the others;
    None when ``square_boost`` is 1 (uniform: the run draws its batches as runs without the flag did)."""
    if square_boost == 1:
        return None
    is_square = scenes.shape_of_prompt_index(prompt_index) == scenes.SHAPES.index("square")  # (n,)
    return torch.where(is_square, square_boost, 1.0).float()


def _pixel_term(
    vae: AutoencoderKL,
    noisy: torch.Tensor,
    pred: torch.Tensor,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    coverage: torch.Tensor,
    shape_weight: float,
) -> torch.Tensor:
    """The pixel loss of ``--pixel-weight``: the least noisy quarter of the batch has its x0 prediction
    (x_s − s·v) decoded by the frozen VAE and compared with the decoded training latent, weighted on the
    shape's edge (:func:`~.losses.pixel_loss`). The kind of a shape is settled in those last, least noisy steps.
    ``noisy``/``pred``/``x0`` (B, 4, 16, 16), ``sigmas`` (B,), ``coverage`` (B, 1, 16, 16)."""
    k = max(1, noisy.shape[0] // 4)
    low = sigmas.argsort()[:k]  # (k,) the least noisy images
    x0_hat = x0_from_flow(pred[low], noisy[low], sigmas[low].view(-1, 1, 1, 1))  # (k, 4, 16, 16)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    decoded = vae.decode(x0_hat / scale + shift).sample  # (k, 3, 64, 64)
    with torch.no_grad():
        target = vae.decode(x0[low] / scale + shift).sample  # (k, 3, 64, 64)
    return pixel_loss(decoded, target, coverage[low], shape_weight)


def train_mmdit(config: TrainConfig) -> StableDiffusion3Pipeline:
    """One MMDiT training run (resumable from ``run_dir``), exported to ``config.out``; returns the pipeline.

    The step count is fixed after 40 steps from their speed and the time left (as the UNet run does); a resumed
    run keeps it, so ``--resume`` with a fresh ``--minutes`` continues the same schedule."""
    from .train import lr_factor, machine_name, optimizer_step

    t0 = time.time()
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    deadline = t0 + config.minutes * 60 - config.reserve_s
    run = MMDiTRun(config, device)
    if config.resume and run.checkpoint.exists():
        run.load(torch.load(run.checkpoint, map_location=device, weights_only=False))
        _log(run, resumed=str(run.checkpoint), step=run.step, total=run.total_steps)
    print(
        f"params: transformer {n_params(run.transformer):,} text {n_params(run.te1):,} + {n_params(run.te2):,}"
        f" vae {n_params(run.vae):,}; device {machine_name(device)}",
        flush=True,
    )
    if run.total_steps is None and config.steps:
        run.total_steps = config.steps
    prompt_ids, empty_ids = tokenised_prompts(device)  # (11664, 77), (77,)
    pool_file = Path(config.run_dir) / "latent_pool.pt"
    if run.step and pool_file.exists():  # a resumed run trains on the same scenes
        pool = torch.load(pool_file, map_location=device)
    else:
        pool = latent_pool(run.vae, config.latent_pool or 16384, run.scene_gen, device)
        pool_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(pool, pool_file.with_suffix(".tmp"))
        os.replace(pool_file.with_suffix(".tmp"), pool_file)
    shift, scale = run.vae.config.shift_factor, run.vae.config.scaling_factor
    for module in (run.transformer, run.te1, run.te2):
        module.train()
    kept = max(1, config.batch // 4) if config.attention_weight > 0 else 0  # images the attention loss reads
    processor = CollapsedZerosProcessor(MAX_SEQUENCE_LENGTH, keep_text_probs=kept)
    run.transformer.set_attn_processor(processor)
    shape_ids = shape_token_ids(device)  # (3,)
    pick_weights = _pick_weights(pool[2], config.square_boost)  # (n,) or None: uniform
    start, last_ckpt, spent0 = time.time(), time.time(), run.info["seconds"]["transformer"]
    first_step, t_first, smooth = run.step, None, None
    calibrate = max(first_step + 40, config.warmup)
    while time.time() < deadline:
        if run.step == first_step + 10:
            t_first = time.time()
        if run.total_steps is None and run.step == calibrate:
            per_step = (time.time() - t_first) / (calibrate - first_step - 10)
            run.total_steps = run.step + max(10, int((deadline - time.time()) / per_step * 0.97))
            _log(run, calibrated_steps=run.total_steps, s_per_step=per_step)
        total = run.total_steps or 10**9
        if run.step >= total:
            break
        for group in run.opt.param_groups:
            group["lr"] = config.lr * lr_factor(run.step, total, warmup=config.warmup)
        if pick_weights is None:
            pick = torch.randint(0, pool[0].shape[0], (config.batch,), device=device, generator=run.noise_gen)
        else:
            pick = torch.multinomial(pick_weights, config.batch, replacement=True, generator=run.noise_gen)
        mean, std = pool[0][pick], pool[1][pick]  # (B, 4, 16, 16) each
        z = mean + std * torch.randn(mean.shape, device=device, generator=run.noise_gen)
        x0 = (z - shift) * scale  # (B, 4, 16, 16): what the pipeline's latents are
        ids = prompt_ids[pool[2][pick]]  # (B, 77)
        drop = torch.rand(config.batch, device=device, generator=run.noise_gen) < config.caption_dropout
        ids = torch.where(drop[:, None], empty_ids[None, :], ids)  # (B, 77)
        sigmas = sample_flow_sigmas(
            config.batch, config.flow_shift, LOGIT_MEAN, LOGIT_STD, device, run.noise_gen
        )  # (B,)
        noise = torch.randn(x0.shape, device=device, generator=run.noise_gen)
        noisy, target = flow_matching_pair(x0, noise, sigmas)
        context, pooled = encode_text_collapsed(run.te1, run.te2, ids)  # (B, 78, 80), (B, 80)
        pred = run.transformer(
            hidden_states=noisy,
            encoder_hidden_states=context,
            pooled_projections=pooled,
            timestep=sigmas * 1000,
        ).sample
        coverage = pool[3][pick]  # (B, 1, 16, 16)
        loss = diffusion_loss(pred, target, coverage, config.shape_weight)
        if config.pixel_weight > 0:
            loss = loss + config.pixel_weight * _pixel_term(
                run.vae, noisy, pred, x0, sigmas, coverage, config.shape_weight
            )
        if processor.text_probs is not None:
            named = torch.isin(ids[:kept], shape_ids)  # (k, 77): where the caption names its shape
            word_index = torch.where(named.any(dim=1), named.int().argmax(dim=1), -1)  # (k,)
            loss = loss + config.attention_weight * attention_localisation_loss(
                processor.text_probs, word_index, coverage[:kept]
            )
            processor.text_probs.clear()
        grad_norm = optimizer_step(run, loss, config.ema)
        smooth = loss.detach() if smooth is None else smooth.lerp_(loss.detach(), 0.02)
        if run.step % config.log_every == 0:
            if not torch.isfinite(smooth):
                raise FloatingPointError(f"non-finite loss at step {run.step}; lower --lr or resume earlier")
            _log(
                run,
                step=run.step,
                loss=float(smooth),
                grad=float(grad_norm),
                lr=run.opt.param_groups[0]["lr"],
                s=round(time.time() - start, 1),
            )
        if time.time() - last_ckpt > config.ckpt_every:
            run.info["seconds"]["transformer"] = spent0 + time.time() - start
            run.info["steps"] = run.step
            run.save()
            if config.export_every:
                export_mmdit(run, Path(config.run_dir) / "snapshot")
            last_ckpt = time.time()
    run.info["seconds"]["transformer"] = spent0 + time.time() - start
    run.info["steps"] = run.step
    run.info["final_loss"] = None if smooth is None else float(smooth)
    run.save()
    if run.total_steps is not None and run.step < run.total_steps:  # stopped by --minutes: resumable
        snapshot = Path(config.run_dir) / "snapshot"
        pipe = export_mmdit(run, snapshot)
        print(
            json.dumps(
                {
                    "stopped_at": run.step,
                    "of": run.total_steps,
                    "snapshot": str(snapshot),
                    "resume": "the same command with --resume",
                }
            ),
            flush=True,
        )
        return pipe
    pipe = export_mmdit(run, Path(config.out))
    print(json.dumps({"exported": config.out, "wall_s": round(time.time() - t0, 1)}), flush=True)
    return pipe


def export_mmdit(run: MMDiTRun, out: Path) -> StableDiffusion3Pipeline:
    """Write the pipeline folder (EMA weights, fp32 safetensors) with training.json and latent_rgb.json."""
    from .train import fit_latent_rgb, machine_name

    transformer = SD3Transformer2DModel.from_config(run.transformer.config)
    te1 = CLIPTextModelWithProjection(run.te1.config)
    te2 = CLIPTextModelWithProjection(run.te2.config)
    params = [*transformer.parameters(), *te1.parameters(), *te2.parameters()]
    for p, e in zip(params, run.ema, strict=True):
        p.data.copy_(e.cpu())
    vae = load_vae(Path(run.info["vae_from"]))
    vae.register_to_config(
        shift_factor=run.vae.config.shift_factor, scaling_factor=run.vae.config.scaling_factor
    )
    latent_rgb = fit_latent_rgb(
        vae, torch.device("cpu")
    )  # on (z·scale) latents; the shift goes into the bias
    c = run.config
    info = dict(run.info)
    info.update(
        params={
            "transformer": n_params(transformer),
            "vae": n_params(vae),
            "text_encoder": n_params(te1),
            "text_encoder_2": n_params(te2),
        },
        machine=machine_name(run.device),
        batch=c.batch,
        lr=c.lr,
        ema=c.ema,
        seed=c.seed,
        shape_weight=c.shape_weight,
        latent_pool=c.latent_pool or 16384,
        command=c.recorded_command(),
        shift=c.flow_shift,
        patch=c.patch,
        pooled=not c.no_pooled,
        attention_weight=c.attention_weight,
        square_boost=c.square_boost,
        pixel_weight=c.pixel_weight,
        logit_normal=[LOGIT_MEAN, LOGIT_STD],
        objective="rectified flow: x_s = (1-s) x0 + s e, v = e - x0",
    )
    info["log"] = info["log"][-40:]
    records = {
        "training.json": json.dumps(info, indent=1) + "\n",
        "latent_rgb.json": json.dumps(_shifted_latent_rgb(latent_rgb, vae), indent=1) + "\n",
    }
    return save_mmdit_pipeline(
        Path(out), vae, te1, te2, transformer.eval(), extra_files=records, shift=c.flow_shift
    )


def _shifted_latent_rgb(fit: dict, vae: AutoencoderKL) -> dict:
    """:func:`~.train.fit_latent_rgb` fits RGB ≈ (z·scale)·F + b; SD3's latents are (z − shift)·scale, so the
    bias becomes b + shift·scale·ΣF (per colour)."""
    offset = vae.config.shift_factor * vae.config.scaling_factor
    bias = [b + offset * sum(row[c] for row in fit["factors"]) for c, b in enumerate(fit["bias"])]
    return {**fit, "bias": [round(v, 5) for v in bias]}


def save_mmdit_pipeline(
    out: Path,
    vae: AutoencoderKL,
    te1: CLIPTextModelWithProjection,
    te2: CLIPTextModelWithProjection,
    transformer: SD3Transformer2DModel,
    extra_files: dict[str, str] | None = None,
    shift: float = SHIFT,
) -> StableDiffusion3Pipeline:
    """Assemble the ``StableDiffusion3Pipeline`` (no T5) and write it to ``out`` through a temporary folder
    beside it, replacing what is there. ``shift`` is the saved sampler's (the run's ``--flow-shift``)."""
    from ..tokenizer import clip_tokenizer
    from .folder import write_pipeline_folder

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=build_scheduler(shift),
        vae=vae,
        text_encoder=te1.eval(),
        tokenizer=clip_tokenizer(),
        text_encoder_2=te2.eval(),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    return write_pipeline_folder(pipe, out, ("tokenizer", "tokenizer_2"), extra_files)


def default_out() -> Path:
    """Where an MMDiT run writes when ``--out`` is not given."""
    return MMDIT_MODEL_DIR


__all__ = [
    "SHIFT",
    "MAX_SEQUENCE_LENGTH",
    "build_transformer",
    "ignore_pooled",
    "build_text_encoder_2",
    "text_encoder_1_from",
    "build_scheduler",
    "encode_text",
    "train_mmdit",
    "export_mmdit",
    "save_mmdit_pipeline",
]
