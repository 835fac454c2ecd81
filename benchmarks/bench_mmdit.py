"""MMDiT families (SD3, Flux): full observation (steps with previews + joint-attention maps) against the plain call.

CPU (the acceptance of issue 17): the tiny SD3 and Flux fixtures, 64×64, one thread, paired ABBA rounds of a plain
call and an observed one (``sdexplore.observe(pipe, steps=True, attention=True)``), process CPU time; the ratio
observed / plain per pair, median and 95% interval. Target ≤ 1.15×.

GPU (when one is available): SD3.5-medium-shaped and Flux.1-schnell-shaped transformers with random weights from
the real configs, bf16, 1024², the denoising loop only (``output_type="latent"``, prompt embeddings of the real
shapes passed in). Targets: steps with previews ≤ 1.02×, joint-attention maps ≤ 1.05×, ≤ 200 MiB extra.
``--dry`` runs the GPU code path on the CPU with tiny shapes.

    python benchmarks/bench_mmdit.py                 # CPU, ≈ 2 min
    python benchmarks/bench_mmdit.py --gpu [--dry]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _paired import median_interval, process_clock, run_pairs  # noqa: E402

import sdexplore  # noqa: E402
from sdexplore.fixtures import tiny_pipeline  # noqa: E402

PROMPT = "a big red circle at the top left on a blue background"
CPU_TARGET = 1.15
GPU_TARGETS = {"steps": 1.02, "attention": 1.05, "both": 1.05}
GPU_TARGET_EXTRA_MIB = 200.0
VARIANTS: dict[str, dict[str, Any]] = {
    "steps": {"steps": True},
    "attention": {"steps": False, "attention": True},
    "both": {"steps": True, "attention": True},
}


def _call(pipe: Any, family: str, steps: int, size: int, **extra: Any) -> Callable[[], Any]:
    kw: dict[str, Any] = dict(
        num_inference_steps=steps, height=size, width=size, output_type="latent", **extra
    )
    if family == "flux":
        kw.setdefault("max_sequence_length", 64)

    def call() -> Any:
        with torch.no_grad():
            return pipe(generator=torch.Generator("cpu").manual_seed(0), **kw)

    return call


def _observed(pipe: Any, call: Callable[[], Any], options: dict[str, Any]) -> Callable[[], Any]:
    def run() -> Any:
        with sdexplore.observe(pipe, **options):
            return call()

    return run


def cpu_ratios(pairs: int = 12, steps: int = 8) -> dict[str, Any]:
    """Observed / plain process-CPU-time ratio per family and variant on the tiny fixtures (one thread)."""
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for family in ("sd3", "flux"):
        pipe = tiny_pipeline(family)
        call = _call(pipe, family, steps, 64, prompt=PROMPT)
        plain = process_clock(call)
        variants = {name: process_clock(_observed(pipe, call, opts)) for name, opts in VARIANTS.items()}
        series = run_pairs(plain, variants, pairs=pairs, warmup=2)
        out[family] = {
            name: {
                "ratio": median_interval(s.ratios()).__dict__,
                "plain_s": median_interval([p["time"] for p in s.plain]).median,
            }
            for name, s in series.items()
        }
    return out


def format_cpu(r: dict[str, Any]) -> str:
    lines = [
        "| family | variant | observed / plain (median, 95% interval) | plain call | verdict (≤ 1.15×) |",
        "|---|---|---|---|---|",
    ]
    for family, rows in r.items():
        for name, row in rows.items():
            q = row["ratio"]
            verdict = (
                "met" if q["hi"] <= CPU_TARGET else ("median met" if q["median"] <= CPU_TARGET else "missed")
            )
            lines.append(
                f"| {family} | {name} | {q['median']:.3f} [{q['lo']:.3f}, {q['hi']:.3f}] (n={q['n']}) | "
                f"{row['plain_s'] * 1000:.1f} ms | {verdict} |"
            )
    return "\n".join(lines)


# ---- GPU ---------------------------------------------------------------------------------------------------------
def _gpu_pipeline(family: str, dry: bool) -> tuple[Any, dict[str, Any]]:
    """A pipeline whose transformer has the real model's shape (random weights), bf16 on CUDA, and call kwargs
    with prompt embeddings of the real shapes (so the text encoders, whose size does not matter here, stay tiny)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    device, dtype = ("cpu", torch.float32) if dry else ("cuda", torch.bfloat16)
    pipe = tiny_pipeline(family)
    if family == "sd3":  # stabilityai/stable-diffusion-3.5-medium transformer/config.json
        cfg = dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=384,
            qk_norm="rms_norm",
            dual_attention_layers=tuple(range(13)),
        )
        if dry:
            cfg.update(
                num_layers=2,
                num_attention_heads=2,
                attention_head_dim=8,
                caption_projection_dim=16,
                dual_attention_layers=(0,),
                joint_attention_dim=pipe.transformer.config.joint_attention_dim,
                pooled_projection_dim=pipe.transformer.config.pooled_projection_dim,
            )
        pipe.transformer = SD3Transformer2DModel(**cfg)
        text_len, width, pooled = 77 + 256, cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
    else:  # black-forest-labs/FLUX.1-schnell transformer/config.json
        cfg = dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=False,
            axes_dims_rope=(16, 56, 56),
        )
        if dry:
            cfg.update(
                num_layers=1,
                num_single_layers=1,
                num_attention_heads=2,
                attention_head_dim=16,
                axes_dims_rope=(4, 6, 6),
                joint_attention_dim=pipe.transformer.config.joint_attention_dim,
                pooled_projection_dim=pipe.transformer.config.pooled_projection_dim,
            )
        pipe.transformer = FluxTransformer2DModel(**cfg)
        text_len, width, pooled = 256, cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
    pipe.to(device, dtype)
    g = torch.Generator("cpu").manual_seed(0)
    kw: dict[str, Any] = dict(
        prompt_embeds=torch.randn(1, text_len, width, generator=g).to(device, dtype),
        pooled_prompt_embeds=torch.randn(1, pooled, generator=g).to(device, dtype),
    )
    if family == "sd3":
        kw.update(
            negative_prompt_embeds=torch.randn(1, text_len, width, generator=g).to(device, dtype),
            negative_pooled_prompt_embeds=torch.randn(1, pooled, generator=g).to(device, dtype),
            guidance_scale=5.0,
        )
    else:
        kw.update(guidance_scale=0.0, max_sequence_length=text_len)
    return pipe, kw


def gpu_ratios(dry: bool = False, pairs: int = 10, steps: int = 8) -> dict[str, Any]:
    """Observed / plain wall-time ratios (synchronised) and peak-memory extra per family and variant."""
    size = 64 if dry else 1024
    cuda = not dry
    out: dict[str, Any] = {}
    for family in ("sd3", "flux"):
        pipe, kw = _gpu_pipeline(family, dry)
        call = _call(pipe, family, 2 if dry else steps, size, **kw)

        def timed(fn: Callable[[], Any]) -> Callable[[], dict[str, float]]:
            def run() -> dict[str, float]:
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
                return {"time": time.perf_counter() - t0, "mib": mib}

            return run

        variants = {name: timed(_observed(pipe, call, opts)) for name, opts in VARIANTS.items()}
        series = run_pairs(timed(call), variants, pairs=2 if dry else pairs, warmup=1)
        out[family] = {
            name: {
                "ratio": median_interval(s.ratios()).__dict__,
                "extra_mib": max(s.differences("mib")),
                "plain_s": median_interval([p["time"] for p in s.plain]).median,
            }
            for name, s in series.items()
        }
        del pipe
        if cuda:
            torch.cuda.empty_cache()
    return out


def format_gpu(r: dict[str, Any]) -> str:
    lines = [
        "| family | variant | observed / plain | target | extra peak MiB (≤ 200) |",
        "|---|---|---|---|---|",
    ]
    for family, rows in r.items():
        for name, row in rows.items():
            q = row["ratio"]
            lines.append(
                f"| {family} | {name} | {q['median']:.3f} [{q['lo']:.3f}, {q['hi']:.3f}] | ≤ {GPU_TARGETS[name]} | "
                f"{row['extra_mib']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument(
        "--dry", action="store_true", help="with --gpu: the GPU code path on the CPU, tiny shapes"
    )
    ap.add_argument("--pairs", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.gpu:
        r = gpu_ratios(dry=args.dry, pairs=args.pairs or 10)
        print(format_gpu(r))
    else:
        r = cpu_ratios(pairs=args.pairs or 12)
        print(format_cpu(r))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
