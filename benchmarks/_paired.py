"""Paired A/B measurement: plain vs recorded calls in ABBA order, with a distribution-free interval on the median."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Summary:
    """Median of ``n`` paired values and an order-statistic interval around it.

    ``coverage`` is the exact confidence of ``[lo, hi]`` for the population median (binomial, no
    distribution assumed); it is below the requested level only when ``n`` is too small (``n < 6`` for 95%).
    """

    median: float
    lo: float
    hi: float
    coverage: float
    n: int

    def scaled(self, factor: float) -> Summary:
        """The same summary with every value multiplied by ``factor`` (> 0): a change of units."""
        return Summary(self.median * factor, self.lo * factor, self.hi * factor, self.coverage, self.n)

    @property
    def half_width(self) -> float:
        """Half the interval's width: the precision of the median."""
        return (self.hi - self.lo) / 2


def median_interval(values: list[float], level: float = 0.95) -> Summary:
    """Median and the order-statistic confidence interval ``[x_(j), x_(n+1-j)]`` for the population median.

    ``j`` is the largest rank with P(j ≤ Binomial(n, ½) ≤ n − j) ≥ ``level`` (the sign-test interval, e.g. ranks
    6 and 15 of 20 at 95.9%). With too few values for ``level`` the interval is the full range.
    """
    if not values:
        raise ValueError("median_interval needs at least one value; run at least one pair.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    xs = sorted(values)
    n = len(xs)
    mid = n // 2
    median = xs[mid] if n % 2 else (xs[mid - 1] + xs[mid]) / 2

    def coverage(j: int) -> float:  # P(j ≤ K ≤ n − j), K ~ Binomial(n, ½); j is a 1-based rank
        return sum(math.comb(n, k) for k in range(j, n - j + 1)) / 2**n

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= level:
        j += 1
    return Summary(median, xs[j - 1], xs[n - j], coverage(j), n)


def abba(pair_index: int) -> tuple[str, str]:
    """Which call runs first in pair ``pair_index``: AB, BA, AB, BA... (so the sequence reads A B B A A B B A).

    Alternating cancels a linear drift (warming caches, a neighbour's load ramping up) to first order.
    """
    return ("A", "B") if pair_index % 2 == 0 else ("B", "A")


@dataclass
class PairedSeries:
    """The paired measurements of one variant against the plain call: one entry per pair."""

    name: str
    plain: list[dict[str, float]] = field(
        default_factory=list
    )  # each: what the plain call's measure returned
    variant: list[dict[str, float]] = field(default_factory=list)
    orders: list[str] = field(default_factory=list)  # "AB" (plain first) or "BA"

    def differences(self, key: str = "time") -> list[float]:
        """Per pair: variant minus plain."""
        return [v[key] - p[key] for p, v in zip(self.plain, self.variant, strict=True)]

    def ratios(self, key: str = "time") -> list[float]:
        """Per pair: variant divided by plain."""
        return [v[key] / p[key] for p, v in zip(self.plain, self.variant, strict=True)]


def run_pairs(
    plain: Callable[[], dict[str, float]],
    variants: dict[str, Callable[[], dict[str, float]]],
    *,
    pairs: int,
    warmup: int = 1,
    keep_going: Callable[[dict[str, PairedSeries]], bool] | None = None,
    min_pairs: int | None = None,
) -> dict[str, PairedSeries]:
    """Run ``pairs`` rounds; in each round, every variant is paired with its own plain call in ABBA order.

    ``plain`` and each variant run one call and return their measurements (e.g. ``{"time": s}``). Variants are
    visited round-robin, so a slow drift of the machine spreads over all of them. With ``keep_going``, rounds
    continue past ``min_pairs`` only while it returns True (and never past ``pairs``): the caller stops when the
    intervals are narrow enough or its time budget is spent. A ``gc.collect()`` before each call starts every call
    from a similar heap.
    """
    if pairs < 1:
        raise ValueError(f"pairs must be ≥ 1, got {pairs}.")
    for _ in range(warmup):
        plain()
        for fn in variants.values():
            fn()
    series = {name: PairedSeries(name) for name in variants}
    gc.collect()
    gc.freeze()  # what the warm-up left (modules, caches) is never rescanned: each collection below stays short
    try:
        _pairs(plain, variants, series, pairs, keep_going, min_pairs)
    finally:
        gc.unfreeze()
    return series


def _pairs(
    plain: Callable[[], dict[str, float]],
    variants: dict[str, Callable[[], dict[str, float]]],
    series: dict[str, PairedSeries],
    pairs: int,
    keep_going: Callable[[dict[str, PairedSeries]], bool] | None,
    min_pairs: int | None,
) -> None:
    for i in range(pairs):
        if keep_going is not None and i >= (min_pairs or 0) and i % 2 == 0 and not keep_going(series):
            break  # stop only after a BA pair, so AB and BA stay balanced
        order = abba(i)
        for name, fn in variants.items():
            got: dict[str, dict[str, float]] = {}
            for who in order:
                gc.collect()
                got[who] = plain() if who == "A" else fn()
            s = series[name]
            s.plain.append(got["A"])
            s.variant.append(got["B"])
            s.orders.append("".join(order))


def process_clock(call: Callable[[], Any]) -> Callable[[], dict[str, float]]:
    """Wrap ``call`` so it returns the process CPU seconds it took (``time.process_time``: all threads, this
    process only, so other processes' load shows up far less than in wall time)."""

    def measure() -> dict[str, float]:
        t0 = time.process_time()
        call()
        return {"time": time.process_time() - t0}

    return measure
