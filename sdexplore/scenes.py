"""The embedded model's little world, at its old address: :mod:`sdexplore.embedded.scenes` is the module."""

from __future__ import annotations

from .embedded.scenes import *  # noqa: F403
from .embedded.scenes import __all__  # noqa: F401
