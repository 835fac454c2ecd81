"""Fit the embedded models' latent → RGB preview factors (``latent_rgb.json`` in each model folder).

The linear preview (:func:`sdexplore.preview.latent_to_uint8`) stands in for a VAE decode, so it is fitted to
what the VAE decodes, on what the preview is shown: latents of training-split scenes (never the held-out
``validation_scenes(216, seed=1234)``) encoded by the VAE, and, for both embedded models, the final latents and
the x0 predictions every ``--x0-every`` steps of their own runs. The target of each latent cell is the decoded
image average-pooled to latent size (4×4 pixels). Both models share one VAE, so one map is fitted in the VAE's
own latent space ``z`` and written per model in its sampling space (tiny-shapes: ``z · scale``; tiny-shapes-mmdit:
``(z − shift) · scale``, the shift going into the bias).

Two choices make the shape's colour right, which a plain least-squares fit (the one ``train_embedded.py``
wrote) does not: the world's colours sit on the edges of the RGB cube, and the preview clamps to [-1, 1], so a
prediction past a bound on the target's side is not an error (:func:`clamp_aware_lstsq`, up to ``--margin``
past it); and shape pixels weigh ``1 + --shape-weight`` times a background pixel, so small shapes count.

    python scripts/fit_latent_rgb.py            # seeded, one thread, about five minutes; prints the fit
    python scripts/fit_latent_rgb.py --write    # and writes it into both model folders

Finding (2026-12-06, benchmarks/RESULTS.md "Linear preview colours"): no 4×3 + bias map, fitted this way or even
on the held-out scenes themselves, previews every colour word right (green's latent cells sit beside black's,
red's beside yellow's); the shipped factors were kept. The colour of a cell is not a function of that cell's
latent alone here, so a right preview needs a small spatial decoder (e.g. an AutoencoderTiny), not new factors.
Both model folders now carry one, ``latent_preview.json``, fitted on the same samples by ``scripts/fit_preview.py``
(61/64 and 47/48 own colour on the held-out runs); the factors stay for the views that ask for a linear preview.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

#: Both embedded models: (name for ``load_pipeline``, number of generated training scenes by default).
MODELS = (("tiny-shapes", 64), ("tiny-shapes-mmdit", 32))


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of the training-split scenes and their noise")
    p.add_argument("--encoded", type=int, default=256, help="rendered training scenes encoded by the VAE")
    p.add_argument("--generated", type=int, nargs=2, default=[n for _, n in MODELS], metavar=("UNET", "MMDIT"),
                   help="generated training scenes per model (tiny-shapes, tiny-shapes-mmdit)")  # fmt: skip
    p.add_argument("--x0-every", type=int, default=5, help="keep the x0 prediction of every k-th step")
    p.add_argument("--shape-weight", type=float, default=8.0, help="extra weight of a shape pixel")
    p.add_argument("--margin", type=float, default=0.5, help="free overshoot past a bound, [-1, 1] units")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--write", action="store_true", help="write the fit into both model folders' latent_rgb.json"
    )
    return p


def clamp_aware_lstsq(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, margin: float, iters: int = 30
) -> torch.Tensor:
    """Weighted least squares ``y ≈ [x, 1] · W`` (x (N, C), y (N, 3) in [-1, 1], weight (N,)) → W (C+1, 3), where
    a prediction past ±1 on the side of a target at that bound costs nothing up to ``margin`` beyond it (the
    preview clamps there): iteratively refitted with such targets moved onto the prediction."""
    xb = torch.cat([x, torch.ones_like(x[:, :1])], dim=1).double()  # (N, C+1)
    y, sw = y.double(), weight.double().sqrt()[:, None]  # (N, 3), (N, 1)
    target = y
    for _ in range(iters):
        w = torch.linalg.lstsq(xb * sw, target * sw).solution  # (C+1, 3)
        pred = xb @ w
        high, low = (y >= 0.999) & (pred > y), (y <= -0.999) & (pred < y)
        target = torch.where(high, pred.clamp(max=1 + margin), y)
        target = torch.where(low, pred.clamp(min=-1 - margin), target)
    return w


@torch.no_grad()
def decoded_small(vae, z: torch.Tensor) -> torch.Tensor:
    """VAE latents ``z`` (B, C, h, w) → the decoded image average-pooled to (B, 3, h, w), in [-1, 1]."""
    out = []
    for start in range(0, len(z), 64):
        image = vae.decode(z[start : start + 64]).sample.clamp(-1, 1)  # (b, 3, H, W)
        out.append(F.avg_pool2d(image, image.shape[-1] // z.shape[-1]))  # (b, 3, h, w)
    return torch.cat(out)


@torch.no_grad()
def encoded_samples(vae, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rendered training scenes → VAE latents z (n, C, h, w) and shape coverage at latent size (n, h, w)."""
    from sdexplore.embedded import scenes

    batch = scenes.sample_scenes(n, torch.Generator().manual_seed(seed))
    images, coverage = scenes.render_batch(batch)  # (n, 3, 64, 64), (n, 1, 64, 64)
    z = torch.cat([vae.encode(images[i : i + 64]).latent_dist.mode() for i in range(0, n, 64)])
    return z, F.adaptive_avg_pool2d(coverage, z.shape[-1])[:, 0]


@torch.no_grad()
def generated_samples(pipe, n: int, seed: int, x0_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` training-split prompts generated with the model's recommended steps and CFG: the final latents and
    the x0 predictions every ``x0_every`` steps, as VAE latents z (n·k, C, h, w), and each one's shape coverage
    at latent size (n·k, h, w), read from the final image by the world's scorer."""
    import numpy as np

    from sdexplore.decoding import decode_with
    from sdexplore.embedded import scenes
    from sdexplore.embedded.evaluate import recommended
    from sdexplore.record.steps import StepRecorder

    steps, guidance = recommended(pipe)
    prompts = scenes.sample_scenes(n, torch.Generator().manual_seed(seed + 1)).prompts()
    scale, shift = pipe.vae.config.scaling_factor, getattr(pipe.vae.config, "shift_factor", None) or 0.0
    zs, covers = [], []
    for start in range(0, n, 16):
        chunk = prompts[start : start + 16]
        gens = [torch.Generator().manual_seed(seed + 1000 + start + i) for i in range(len(chunk))]
        with StepRecorder(pipe, quantities=("x0",), every=x0_every, dtype=torch.float32) as rec:
            final = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                         output_type="latent").images  # fmt: skip
        latents = torch.stack([final, *(r.x0 for r in rec.trace)], 1)  # (b, 1+k, C, h, w), sampling space
        masks = []
        for image in decode_with(pipe.vae, final).numpy():  # (H, W, 3) uint8 each
            mask = torch.from_numpy(scenes.read_scene(image).mask.astype(np.float32))  # (H, W)
            masks.append(F.adaptive_avg_pool2d(mask[None, None], final.shape[-1])[0, 0])  # (h, w)
        k = latents.shape[1]
        zs.append(latents.flatten(0, 1).float() / scale + shift)  # (b·k, C, h, w)
        covers.append(torch.stack(masks).repeat_interleave(k, 0))  # (b·k, h, w)
    return torch.cat(zs), torch.cat(covers)


def sampling_space(fit: torch.Tensor, vae_config) -> dict:
    """A fit ``rgb ≈ z·G + c`` in VAE space → the model's ``{"factors", "bias"}`` for sampling-space latents
    ``(z − shift)·scale``: factors = G / scale, bias = c + shift·ΣG (per colour)."""
    scale, shift = vae_config.scaling_factor, getattr(vae_config, "shift_factor", None) or 0.0
    g, c = fit[:-1], fit[-1]  # (C, 3), (3,)
    return {
        "factors": [[round(v, 5) for v in row] for row in (g / scale).tolist()],
        "bias": [round(v, 5) for v in (c + shift * g.sum(0)).tolist()],
    }


def training_samples(args: argparse.Namespace) -> tuple[dict, object, torch.Tensor, torch.Tensor]:
    """Both embedded pipelines, their shared VAE, and the training-split samples: latents (N, C, h, w) of encoded
    scenes and of generated runs' final latents and x0 predictions, with each cell's shape coverage (N, h, w)."""
    import sdexplore

    pipes = {name: sdexplore.load_pipeline(name) for name, _ in MODELS}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    vae = pipes["tiny-shapes"].vae  # the MMDiT's VAE has the same weights (checked below)
    other = pipes["tiny-shapes-mmdit"].vae.state_dict()
    if any(not torch.equal(v, other[k]) for k, v in vae.state_dict().items()):
        sys.exit("The two embedded models' VAEs differ: fit each model on its own samples.")
    z, cover = encoded_samples(vae, args.encoded, args.seed)
    zs, covers = [z], [cover]
    for (name, _), n in zip(MODELS, args.generated, strict=True):
        z, cover = generated_samples(pipes[name], n, args.seed, args.x0_every)
        zs.append(z)
        covers.append(cover)
    z, cover = torch.cat(zs), torch.cat(covers)  # (N, C, h, w), (N, h, w)
    return pipes, vae, z, cover


def main(argv: list[str] | None = None) -> dict:
    """Collect the training samples, fit, print the result and (with ``--write``) write both folders."""
    from sdexplore.embedded.model import MODELS_DIR

    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    pipes, vae, z, cover = training_samples(args)
    target = decoded_small(vae, z)  # (N, 3, h, w)
    x = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (N·h·w, C)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)  # (N·h·w, 3)
    weight = 1 + args.shape_weight * cover.reshape(-1)  # (N·h·w,)
    fit = clamp_aware_lstsq(x, y, weight, args.margin)
    pred = (torch.cat([x, torch.ones_like(x[:, :1])], 1).double() @ fit).clamp(-1, 1)
    rmse = (pred - y.double()).pow(2).mean().sqrt().item()
    command = "python scripts/fit_latent_rgb.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {}
    for name, pipe in pipes.items():
        record = {
            **sampling_space(fit, pipe.vae.config),
            "rmse": round(rmse, 5),
            "fitted_by": command.strip(),
        }
        result[name] = record
        if args.write:
            (MODELS_DIR / name / "latent_rgb.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({"samples": len(z), "rmse": round(rmse, 4), "wall_s": round(time.time() - t0, 1),
                      "written": args.write}), flush=True)  # fmt: skip
    return result


if __name__ == "__main__":
    main()
