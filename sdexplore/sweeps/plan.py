"""Sweep items (prompt × seed), fixed batches, and their deterministic split over accelerate's processes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InvalidArgumentError
from .prompts import MAX_SEED, PromptRow

#: What an item may keep: the image (PNG), its word maps (safetensors), per-step summaries (JSON).
KEEP = ("images", "maps", "trace-summary")
DEFAULT_KEEP = KEEP


@dataclass(frozen=True)
class SweepItem:
    """One image of a sweep: a prompt with its seed, negative prompt and the words whose maps are kept."""

    index: int  # position in the plan (row-major: prompt rows, then seeds)
    prompt: str
    seed: int
    negative_prompt: str | None = None
    words: tuple[str, ...] | None = None  # None: every word of the prompt

    @property
    def name(self) -> str:
        """The item's folder name under ``items/`` (zero-padded index)."""
        return f"{self.index:06d}"

    def spec(self) -> dict[str, Any]:
        """What defines the item's outputs (JSON-ready)."""
        d = asdict(self)
        d["words"] = list(self.words) if self.words is not None else None
        return d

    @property
    def key(self) -> str:
        """SHA-256 of :meth:`spec`: ties an item's files to the plan that asked for them."""
        return hashlib.sha256(json.dumps(self.spec(), sort_keys=True).encode()).hexdigest()


def plan_items(
    rows: Sequence[PromptRow], seeds: Sequence[int] = (0,), words: Sequence[str] | None = None
) -> list[SweepItem]:
    """Every (prompt row, seed) pair in file order: a row's own seed replaces ``seeds``; its own words replace
    ``words``. The order, and so each item's index and folder, depends only on the file and the arguments."""
    seeds = list(seeds)
    if not seeds:
        raise InvalidArgumentError("seeds is empty: pass at least one seed (e.g. --seeds 0)")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED]
    if bad:
        raise InvalidArgumentError(f"seed {bad[0]!r} is not a whole number from 0 to 2**64 - 1")
    if len(set(seeds)) != len(seeds):
        raise InvalidArgumentError(
            f"seeds {seeds} repeat a seed: each (prompt, seed) image would be made twice"
        )
    if isinstance(words, str):
        raise InvalidArgumentError(f"words={words!r} is one string: pass a list of words, e.g. [{words!r}]")
    shared = tuple(words) if words else None
    items = []
    for row in rows:
        for seed in [row.seed] if row.seed is not None else seeds:
            items.append(
                SweepItem(
                    len(items), row.prompt, seed, row.negative_prompt, row.words if row.words else shared
                )
            )
    return items


def plan_digest(items: Sequence[SweepItem]) -> str:
    """SHA-256 over every item's key, in order: two plans are the same sweep exactly when this matches."""
    h = hashlib.sha256()
    for item in items:
        h.update(item.key.encode())
    return h.hexdigest()


def batches(items: Sequence[SweepItem], batch_size: int) -> list[list[SweepItem]]:
    """Consecutive groups of ``batch_size`` items. A batch is one pipeline call, fixed by the plan alone, so
    an item's image is the same whatever the number of processes (batched arithmetic can round differently)."""
    return [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def shard(work: Sequence[Any], state: Any) -> list[Any]:
    """This process's part of ``work``: accelerate's ``split_between_processes`` (contiguous, in order, the
    first processes taking one more when it does not divide), so the split depends only on the list and the
    number of processes."""
    with state.split_between_processes(list(work)) as mine:
        return list(mine)
