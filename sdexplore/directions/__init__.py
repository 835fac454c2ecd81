"""Semantic directions: find them (prompt pairs, PCA, the Jacobian's singular vectors), apply them with a strength, walk along them, name them.

```python
import sdexplore as sdx
from sdexplore import directions

pipe = sdx.load_pipeline()
d = directions.from_pairs(pipe, [("a red circle at the left", "a blue circle at the left")], space="text")
with d.apply(pipe, strength=1.0):
    image = pipe("a red square at the top").images[0]        # the square turns blue
d.save("red-to-blue.safetensors"); d = directions.load("red-to-blue.safetensors")
```

Methods and their papers are in ``docs/directions.md``; :mod:`.find` finds, :mod:`.apply` applies (one
``direction`` subscriber of the attachment), :mod:`.explore` walks and names.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError
from ..results.directions import DirectionData
from .apply import SUPPORTED, DirectionSteering, check_steps, check_strength


class Direction(DirectionData):
    """A found direction (plain data, :class:`~sdexplore.results.directions.DirectionData`) that applies itself."""

    def apply(
        self, pipe: Any, strength: float = 1.0, steps: Sequence[int] | None = None
    ) -> DirectionSteering:
        """Context manager: every ``pipe(...)`` call inside adds ``strength`` × this direction during ``steps``
        (default: the steps it was found at, else every step). Strength 0 gives the plain image bit for bit;
        1.0 is the found shift at its own size. Checked before anything changes."""
        return apply(pipe, [(self, strength)], steps=steps)

    def walk(self, pipe: Any, prompt: str, **kwargs: Any) -> Any:
        """Frames at strengths −s…s for one prompt and seed, as a :class:`~sdexplore.results.Walk` (see
        :func:`sdexplore.directions.walk`)."""
        from .explore import walk

        return walk(pipe, self, prompt, **kwargs)

    def scaled(self, factor: float) -> Direction:
        """The same direction, ``factor`` times as long (e.g. −1 for the opposite one)."""
        factor = check_strength(factor, "factor")
        parts = {
            n: None if (t := getattr(self, n)) is None else t * factor for n in ("embeds", "pooled", "shift")
        }
        return _rebuild(self, **parts)

    @classmethod
    def load(cls, path: str | Path) -> Direction:
        """Load a saved direction (checksums, fields and shapes checked)."""
        return _rebuild(DirectionData.load(path))


def _rebuild(d: DirectionData, **changes: Any) -> Direction:
    fields = {k: getattr(d, k) for k in DirectionData.__dataclass_fields__}
    fields.update(changes)
    return Direction(**fields)


def load(path: str | Path) -> Direction:
    """Read a direction written by :meth:`Direction.save` (a checksummed result file)."""
    return Direction.load(path)


def apply(
    pipe: Any,
    directions: Sequence[tuple[DirectionData, float]],
    *,
    steps: Sequence[int] | None = None,
) -> DirectionSteering:
    """Context manager applying several directions at once, each with its strength: ``[(d1, 0.5), (d2, -1.0)]``.

    ``steps`` (default: each direction's own steps, else every step) limits when they act."""
    if isinstance(directions, DirectionData):
        directions = [(directions, 1.0)]
    chosen = check_steps(steps)
    items = []
    for i, item in enumerate(directions):
        if not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], DirectionData):
            raise InvalidArgumentError(f"directions[{i}] must be a (Direction, strength) pair, got {item!r}.")
        d, s = item
        items.append((d, check_strength(s), chosen if steps is not None else d.steps))
    return DirectionSteering(pipe, items)


from .explore import name, walk  # noqa: E402
from .find import default_layer, from_pairs, pca  # noqa: E402
from .jacobian import jacobian  # noqa: E402

__all__ = [
    "SUPPORTED",
    "Direction",
    "DirectionSteering",
    "apply",
    "default_layer",
    "from_pairs",
    "jacobian",
    "load",
    "name",
    "pca",
    "walk",
]
