"""What the `sdexplore steps` / `attention` commands cost over a plain pipeline call (model already loaded)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from _timing import interleaved, rows_vs

from sdexplore.cli import build_parser
from sdexplore.cli.attention import write_attention
from sdexplore.cli.steps import write_steps

PROMPT = "a big red circle at the top left on a blue background"


def _args(command: str, *extra: str, steps: int) -> Any:
    return build_parser().parse_args([command, PROMPT, "--steps", str(steps), "--no-progress", *extra])


def benchmark(pipe: Any, *, device: str, repeats: int, gpu: bool) -> list[dict]:
    """Rows: plain call, `steps` (VAE-decoded x0 each step), `steps --preview linear`, `attention` (all words).

    Each variant is the command's whole work after loading: the observed call plus writing its files
    (PNG strips, GIF, trace / overlays, grid, maps). CPU: the embedded model at 64×64, 25 steps, CFG.
    GPU: the SD-1.5-shaped pipeline, fp16, 512², 50 steps.
    """
    steps = 50 if gpu else 25
    size = 512 if gpu else None
    pipe.set_progress_bar_config(disable=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cli_"))
    sized = ["--height", str(size), "--width", str(size)] if size else []
    decode = _args("steps", *sized, steps=steps)
    linear = _args("steps", "--preview", "linear", *sized, steps=steps)
    attention = _args("attention", *sized, steps=steps)
    step_files = {
        "image": tmp / "image.png",
        "x0": tmp / "steps_x0.png",
        "preview": tmp / "steps_preview.png",
        "gif": tmp / "denoising.gif",
        "trace": tmp / "trace.safetensors",
    }
    linear_files = {k: v for k, v in step_files.items() if k != "x0"}
    words = list(dict.fromkeys(PROMPT.split()))
    fixed = {"image": tmp / "a.png", "grid": tmp / "grid.png", "maps": tmp / "maps.safetensors"}
    word_files = {w: tmp / f"att_{i}.png" for i, w in enumerate(words)}

    def plain() -> None:
        kwargs = {"height": size, "width": size} if size else {}
        pipe(PROMPT, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0), **kwargs)

    runs = {
        "plain": plain,
        "cli steps (x0 decoded every step)": lambda: write_steps(pipe, decode, step_files),
        "cli steps --preview linear": lambda: write_steps(pipe, linear, linear_files),
        f"cli attention ({len(words)} words)": lambda: write_attention(pipe, attention, fixed, word_files),
    }
    return rows_vs(interleaved(runs, repeats=repeats, device=device), "plain", "cli")
