"""Inversion on the embedded model: reconstruction PSNR of held-out rendered scenes vs the VAE round trip, per
method and CFG scale, and inversion time as a ratio to one generation with the same steps (CPU)."""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--iterations", type=int, nargs="+", default=[0, 2, 4])
    args = parser.parse_args()

    import sdexplore as sdx
    from sdexplore.inversion import invert
    from sdexplore.scenes import render_scene, validation_prompts

    torch.set_num_threads(2)
    pipe = sdx.load_pipeline()
    prompts = validation_prompts()[:: max(1, 216 // args.scenes)][: args.scenes]
    rows = []
    for i, prompt in enumerate(prompts):
        picture = render_scene(prompt, seed=100 + i)[0]
        for k in args.iterations:
            for method, g in (("ddim", 1.0), ("ddim", 3.0), ("negative-prompt", 3.0)):
                t0 = time.perf_counter()
                inv = invert(pipe, picture, prompt, steps=args.steps, iterations=k, guidance=g, method=method)
                seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                pipe(prompt, num_inference_steps=args.steps, guidance_scale=g, output_type="np")
                generation = time.perf_counter() - t0
                rows.append(
                    dict(
                        scene=i,
                        iterations=k,
                        method=method,
                        guidance=g,
                        psnr=inv.psnr,
                        vae=inv.vae_psnr,
                        ratio=seconds / generation,
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
    print("summary (mean over scenes): iterations, method, guidance, PSNR, VAE PSNR, gap, time ratio")
    for k in args.iterations:
        for method, g in (("ddim", 1.0), ("ddim", 3.0), ("negative-prompt", 3.0)):
            sel = [r for r in rows if r["iterations"] == k and r["method"] == method and r["guidance"] == g]
            p, v = (statistics.mean(r[x] for r in sel) for x in ("psnr", "vae"))
            print(
                k,
                method,
                g,
                round(p, 2),
                round(v, 2),
                round(v - p, 2),
                round(float(np.median([r["ratio"] for r in sel])), 2),
                flush=True,
            )


if __name__ == "__main__":
    main()
