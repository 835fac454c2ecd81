"""One conversion every layer may use: a PIL image, array or tensor as an (H, W, 3) uint8 array (a leaf module).

Views draw with it (``render`` re-exports it) and results store images with it (``results/edit.py``), so the
results layer does not import a view to read a picture.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["as_uint8_image"]


def as_uint8_image(image: Any) -> np.ndarray:
    """A PIL image, array or tensor → (H, W, 3) uint8.

    Takes (H, W, 3|4), (H, W), (3, H, W) or a batch of one (1, …); uint8, or float in [0, 1] (clipped).
    """
    if isinstance(image, Image.Image):
        return np.ascontiguousarray(np.asarray(image.convert("RGB")))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().float().numpy() if image.dtype != torch.uint8 else image.cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]  # (1, …) → one image
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) → (H, W, C)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]  # (H, W, 1) → (H, W)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)  # (H, W) → (H, W, 3)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"Expected an image shaped (H, W, 3) or (3, H, W), got {arr.shape}.")
    return np.ascontiguousarray(arr[..., :3])
