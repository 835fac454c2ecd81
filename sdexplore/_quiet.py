"""One narrow logging filter: transformers' "requires torchvision (not installed); falling back to ...Pil" notes.

sdexplore does not depend on torchvision (PyPI's build fails to import beside the CPU torch it installs), so
transformers falls back to its PIL image processors, which is what the package wants. transformers 5 logs one
warning per processor class on the first access (diffusers touches ``CLIPImageProcessor`` and
``SiglipImageProcessor`` when its pipelines load), and in a notebook those show as stderr on the first cell.
This filter drops exactly those records; every other transformers message passes. Installing it needs only the
standard library (no transformers import), so ``import sdexplore`` can do it before anything loads.
"""

from __future__ import annotations

import logging
import re

#: The logger transformers' lazy module uses for the fallback note (``transformers.utils.import_utils``).
TRANSFORMERS_IMPORT_LOGGER = "transformers.utils.import_utils"
#: The note, as transformers 5 writes it: "`CLIPImageProcessor` requires torchvision (not installed); falling back
#: to `CLIPImageProcessorPil` ...".
_FALLBACK = re.compile(
    r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+Pil`"
)


class TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' PIL-fallback note for image processors when torchvision is missing."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return _FALLBACK.match(message) is None


def silence_torchvision_fallback() -> None:
    """Install :class:`TorchvisionFallbackFilter` on transformers' import logger (once; idempotent)."""
    logger = logging.getLogger(TRANSFORMERS_IMPORT_LOGGER)
    if not any(isinstance(f, TorchvisionFallbackFilter) for f in logger.filters):
        logger.addFilter(TorchvisionFallbackFilter())


silence_torchvision_fallback()
