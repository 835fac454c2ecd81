"""``python -m sdexplore``: the same as the ``sdexplore`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
