"""The embedded tiny-shapes model: its little world, where it lives, and the code that trains and evaluates it.

Importing this package loads only :mod:`.model` (no torch); the other modules load on import:

- :mod:`.scenes`: the world (prompt grammar, renderer, scorer), torch only.
- :mod:`.model`: where the shipped model lives and how it is called (``EMBEDDED_MODEL_DIR``, guidance, steps).
- :mod:`.config`: :class:`~.config.TrainConfig`, one training run's settings (the training script's flags).
- :mod:`.architecture`: builders of the model's diffusers/transformers parts and its noise schedule.
- :mod:`.data`: training data rendered on the device, the latent pool, the tokenised prompt table.
- :mod:`.losses`: the VAE's and the UNet's losses, training timesteps.
- :mod:`.train`: the two-phase training run, its checkpoints and export.
- :mod:`.folder`: the pipeline folder: writing it, flat copies for device runs, reassembly.
- :mod:`.evaluate`: held-out scores, attention IoU, PSNR, speed; :mod:`.card` writes ``MODEL_CARD.md``.
- :mod:`.layout`: when a model decides where the shape goes (decoded x0 per step).

``scripts/train_embedded.py``, ``scripts/eval_embedded.py`` and ``scripts/diagnose_layout.py`` are thin
command lines over these.
"""

from __future__ import annotations

from .model import EMBEDDED_GUIDANCE_SCALE, EMBEDDED_MODEL_DIR, EMBEDDED_STEPS, embedded_model_available

__all__ = ["EMBEDDED_GUIDANCE_SCALE", "EMBEDDED_MODEL_DIR", "EMBEDDED_STEPS", "embedded_model_available"]
