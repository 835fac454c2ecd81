"""Where the embedded model lives and how it is called: its folder, guidance scale and number of steps.

The model's files ship in ``sdexplore/models/tiny-shapes/`` (a later embedded model sits beside it in
``sdexplore/models/<name>/``). This module imports nothing heavy: :mod:`sdexplore.loading` and the command line
read it at start-up.
"""

from __future__ import annotations

from pathlib import Path

#: Folder of the package's model folders, one per embedded model.
MODELS_DIR = Path(__file__).parent.parent / "models"
#: Folder of the embedded default model shipped inside the package (a plain diffusers pipeline folder).
EMBEDDED_MODEL_DIR = MODELS_DIR / "tiny-shapes"
#: The embedded model's recommended classifier-free guidance scale (at diffusers' default 7.5 it draws the wrong
#: kind of shape more often; chosen by ``scripts/eval_embedded.py --tune-guidance``, see its MODEL_CARD.md). The
#: command line uses it for the embedded model when ``--guidance`` is not given; pass ``guidance_scale=`` in your
#: own calls.
EMBEDDED_GUIDANCE_SCALE = 3.0
#: Sampling steps of the saved DDIM scheduler the model card's numbers are measured with.
EMBEDDED_STEPS = 25
#: Folder of the embedded MMDiT model (a ``StableDiffusion3Pipeline`` without T5, flow matching), beside
#: tiny-shapes: ``sdexplore.load_pipeline(MMDIT_MODEL_DIR)``.
MMDIT_MODEL_DIR = MODELS_DIR / "tiny-shapes-mmdit"
#: The MMDiT model's recommended guidance scale and steps of its saved flow-matching Euler scheduler. The scale
#: is the best on the tuning set (``scripts/eval_embedded.py --tune-guidance``, 54 prompts drawn apart from the
#: held-out set), shape read right (2026-12-01): 1.5 → 0.926, 2 → 0.852, 2.5 → 0.833, 3 → 0.907, 4 → 0.833,
#: 5 → 0.778, 6 → 0.685; colour, place, background 1.0 throughout. 1.5 and 3 differ by one prompt, within the
#: set's noise, so the scale nearer the previous recommendation (4) was taken.
MMDIT_GUIDANCE_SCALE = 3.0
MMDIT_STEPS = 20
#: diffusers' default guidance scale for Stable Diffusion pipelines, reported beside the recommended one.
SD_GUIDANCE_SCALE = 7.5


def embedded_model_available() -> bool:
    """True when the trained embedded model ships with this installation."""
    return (EMBEDDED_MODEL_DIR / "model_index.json").is_file()
