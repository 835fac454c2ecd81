"""Result files: atomic text writes, and safetensors writes with the permissions of an ordinary ``open(path, "w")``."""

from __future__ import annotations

import contextlib
import os
import secrets
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


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to a uniquely named temporary file beside ``path``, flush it to disk, then rename
    it over ``path``: readers see the old file or the new one, never part of one, and two writers never share
    a temporary file. The temporary file is removed on any failure, Ctrl-C included."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
