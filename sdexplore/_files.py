"""Result files: safetensors writes with the permissions of an ordinary ``open(path, "w")``."""

from __future__ import annotations

import os
from pathlib import Path


def as_ordinary_file(path: str | Path) -> Path:
    """Give a freshly written file the mode a plain ``open(path, "w")`` would (0666 minus the umask).

    safetensors writes through a private temporary file, so its output is 0600: readable by its owner only,
    which surprises users sharing results on a lab server.
    """
    path = Path(path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path
