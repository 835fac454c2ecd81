"""Fit the embedded models' learned convolutional preview (``latent_preview.json`` in each model folder).

No per-cell linear latent → RGB map previews the embedded VAE's colours right (benchmarks/RESULTS.md "Linear
preview colours on held-out scenes": a cell's decoded colour depends on its neighbours). A 3×3 neighbourhood
does, with the image's mean features: this fits :class:`sdexplore.preview.ConvPreview`, conv 3×3 (4 → H) + SiLU,
then [features, their image mean] → conv 1×1 (2H → H) + SiLU → conv 1×1 (H → 3), TAESD's idea at about 1,200
parameters (H = 16), to the same pairs ``scripts/fit_latent_rgb.py`` fits its factors to: training-split
scenes only (never the held-out ``validation_scenes(216, seed=1234)``) encoded by the VAE, and both embedded
models' final latents and x0 predictions every ``--x0-every`` steps; the target of a latent cell is the decoded
image average-pooled to latent size. Shape pixels weigh ``1 + --shape-weight`` times a background pixel, and a
prediction past ±1 on the side of a target at that bound costs nothing (the preview clamps there).

Both models share one VAE, so one network is fitted on VAE latents ``z`` standardised per channel, and written
per model with the input affine of its sampling space (tiny-shapes ``x = z·scale``; tiny-shapes-mmdit
``x = (z − shift)·scale``): ``input_scale = 1 / (scale·std)``, ``input_shift = (shift − mean) / std``.

    python scripts/fit_preview.py             # seeded, one thread, a few minutes; prints the fit
    python scripts/fit_preview.py --evaluate  # and the held-out numbers of RESULTS.md (generates 64 + 48 scenes)
    python scripts/fit_preview.py --write     # and writes latent_preview.json into both model folders
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_latent_rgb import MODELS, decoded_small, training_samples  # noqa: E402

#: Held-out prompts per model: the first n of ``validation_prompts(216, 1234)``, image i with seed i.
HELD_OUT = {"tiny-shapes": 64, "tiny-shapes-mmdit": 48}


def build_parser() -> argparse.ArgumentParser:
    """The command line of :func:`main`."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0, help="seed of the training-split scenes, noise and fit")
    p.add_argument("--encoded", type=int, default=256, help="rendered training scenes encoded by the VAE")
    p.add_argument("--generated", type=int, nargs=2, default=[n for _, n in MODELS], metavar=("UNET", "MMDIT"),
                   help="generated training scenes per model (tiny-shapes, tiny-shapes-mmdit)")  # fmt: skip
    p.add_argument("--x0-every", type=int, default=5, help="keep the x0 prediction of every k-th step")
    p.add_argument("--hidden", type=int, default=16, help="channels of the hidden layer")
    p.add_argument("--iters", type=int, default=3000, help="Adam steps (batches of 256 latents)")
    p.add_argument("--shape-weight", type=float, default=8.0, help="extra weight of a shape pixel")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--evaluate", action="store_true", help="measure on the held-out scenes (a few minutes)")
    p.add_argument("--write", action="store_true", help="write latent_preview.json into both model folders")
    return p


def fit(z: torch.Tensor, target: torch.Tensor, cover: torch.Tensor, args: argparse.Namespace) -> dict:
    """Train the preview network on VAE latents ``z`` (N, C, h, w) → ``target`` (N, 3, h, w) in [-1, 1],
    cells weighted by shape ``cover`` (N, h, w). Returns the weights and the standardisation (mean, std per
    channel) as tensors."""
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    mean, std = z.mean((0, 2, 3)), z.std((0, 2, 3))  # (C,), (C,)
    x = (z - mean[:, None, None]) / std[:, None, None]  # (N, C, h, w)
    first = torch.nn.Conv2d(z.shape[1], args.hidden, 3, padding=1, padding_mode="replicate")
    middle = torch.nn.Conv2d(2 * args.hidden, args.hidden, 1)  # input: features and their image mean
    last = torch.nn.Conv2d(args.hidden, 3, 1)

    def net(x: torch.Tensor) -> torch.Tensor:  # the forward of sdexplore.preview.conv_preview_rgb, unclamped
        h = F.silu(first(x))  # (B, H, h, w)
        h = torch.cat([h, h.mean((2, 3), keepdim=True).expand_as(h)], 1)  # (B, 2H, h, w)
        return last(F.silu(middle(h)))  # (B, 3, h, w)

    params = [p for m in (first, middle, last) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.iters)
    weight = (1 + args.shape_weight * cover)[:, None]  # (N, 1, h, w)
    for _ in range(args.iters):
        idx = torch.randint(0, len(z), (256,), generator=gen)
        pred, y = net(x[idx]), target[idx]  # (256, 3, h, w) each
        free = ((y >= 0.999) & (pred > y)) | (
            (y <= -0.999) & (pred < y)
        )  # past the clamp on the target's side
        loss = (weight[idx] * torch.where(free, 0.0, pred - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return {
        "mean": mean,
        "std": std,
        "layers": [(m.weight.detach().clone(), m.bias.detach().clone()) for m in (first, middle, last)],
    }


def model_preview(trained: dict, vae_config):
    """The fitted network as the model's :class:`~sdexplore.preview.ConvPreview` on sampling-space latents
    ``x = (z − shift)·scale``: ``(x·input_scale + input_shift) = (z − mean) / std``."""
    from sdexplore.preview import ConvPreview, PreviewConv

    scale, shift = vae_config.scaling_factor, getattr(vae_config, "shift_factor", None) or 0.0
    mean, std = trained["mean"], trained["std"]
    round5 = lambda t: torch.tensor(t.tolist()).mul(1e5).round().div(1e5)  # noqa: E731 - readable JSON
    return ConvPreview(
        round5(1.0 / (scale * std)),
        round5((shift - mean) / std),
        tuple(PreviewConv(round5(w), round5(b), i == 1) for i, (w, b) in enumerate(trained["layers"])),
    )


@torch.no_grad()
def evaluate(pipe, previews: dict, n: int) -> dict:
    """The first ``n`` held-out prompts (seed i each, recommended steps and CFG), for each of ``previews`` (name →
    a ConvPreview, or linear ``(factors, bias)``): the preview of the final latents and of the second half's x0 against the VAE
    decode pooled to latent size: MAE per channel in 0..255 levels, and "own colour" hits: shapes whose mean
    preview colour over the latent cells half or more inside the decoded shape's mask is nearest, among the
    world's 8 colours, to the prompt's colour word."""
    import numpy as np

    from sdexplore.decoding import decode_with
    from sdexplore.embedded import scenes
    from sdexplore.embedded.evaluate import recommended
    from sdexplore.preview import conv_preview_to_uint8, latent_to_uint8
    from sdexplore.record.steps import StepRecorder

    def show(preview, latents: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) → (B, h, w, 3) float levels
        if isinstance(preview, tuple):
            return latent_to_uint8(latents, *preview).float()
        return conv_preview_to_uint8(latents, preview).float()

    steps, guidance = recommended(pipe)
    prompts = scenes.validation_prompts(216, 1234)[:n]
    scale, shift = pipe.vae.config.scaling_factor, getattr(pipe.vae.config, "shift_factor", None) or 0.0
    palette = torch.tensor(list(scenes.COLOURS.values()), dtype=torch.float32)  # (8, 3)
    names = list(scenes.COLOURS)
    out = {k: {"final": [], "x0": [], "hits": 0, "wrong": []} for k in previews}
    for start in range(0, n, 16):
        chunk = prompts[start : start + 16]
        gens = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        with StepRecorder(pipe, quantities=("x0",), dtype=torch.float32) as rec:
            final = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                         output_type="latent").images  # fmt: skip
        decoded = decode_with(pipe.vae, final)  # (b, H, W, 3) uint8
        small = F.avg_pool2d(decoded.permute(0, 3, 1, 2).float(), decoded.shape[1] // final.shape[-1])
        x0 = torch.stack([r.x0 for r in rec.trace[len(rec.trace) // 2 :]], 1).flatten(0, 1)  # (b·k, C, h, w)
        x0_target = (decoded_small(pipe.vae, x0 / scale + shift) + 1) * 127.5  # (b·k, 3, h, w)
        insides = []
        for image in decoded.numpy():
            mask = torch.from_numpy(scenes.read_scene(image).mask.astype(np.float32))  # (H, W)
            insides.append(F.adaptive_avg_pool2d(mask[None, None], final.shape[-1])[0, 0] > 0.5)  # (h, w)
        for name, preview in previews.items():
            o, final_preview = out[name], show(preview, final)  # (b, h, w, 3)
            o["final"].append((final_preview - small.permute(0, 2, 3, 1)).abs().flatten(0, 2))  # (b·h·w, 3)
            o["x0"].append((show(preview, x0) - x0_target.permute(0, 2, 3, 1)).abs().flatten(0, 2))
            for i, inside in enumerate(insides):
                word, nearest = scenes.parse_prompt(chunk[i]).colour, "none"
                if inside.any():
                    mean = final_preview[i][inside].mean(0)  # (3,)
                    nearest = names[int(((palette - mean) ** 2).sum(1).argmin())]
                o["hits"] += nearest == word
                if nearest != word:
                    o["wrong"].append(f"{word}->{nearest}")
    return {
        name: {
            "final_mae": [round(v, 1) for v in torch.cat(o["final"]).mean(0).tolist()],
            "x0_mae": [round(v, 1) for v in torch.cat(o["x0"]).mean(0).tolist()],
            "own_colour": f"{o['hits']}/{n}",
            "wrong": o["wrong"],
        }
        for name, o in out.items()
    }


def _rounded(value):
    """Nested lists of float32 values already rounded to 5 decimals, written as those decimals (they read back
    to the same float32 values) instead of float32's binary noise."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return round(value, 5) if isinstance(value, float) else value


def main(argv: list[str] | None = None) -> dict:
    """Collect the training samples, fit, print the result; ``--evaluate`` measures, ``--write`` writes."""
    from sdexplore.embedded.model import MODELS_DIR
    from sdexplore.families import latent_rgb

    args = build_parser().parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    pipes, vae, z, cover = training_samples(args)
    trained = fit(z, decoded_small(vae, z), cover, args)
    command = "python scripts/fit_preview.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report: dict = {"samples": len(z), "fit_s": round(time.time() - t0, 1)}
    for name, pipe in pipes.items():
        preview = model_preview(trained, pipe.vae.config)
        if args.write:
            record = {**_rounded(preview.to_dict()), "fitted_by": command.strip()}
            (MODELS_DIR / name / "latent_preview.json").write_text(json.dumps(record) + "\n")
        if args.evaluate:
            report[name] = evaluate(pipe, {"linear": latent_rgb(pipe), "conv": preview}, HELD_OUT[name])
    report["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=1), flush=True)
    return report


if __name__ == "__main__":
    main()
