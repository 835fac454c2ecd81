"""Signals as interrupts: SIGTERM (``kill``, a job scheduler's pre-emption) is handled as Ctrl-C, so every
``finally`` and ``except KeyboardInterrupt`` runs (temporary outputs removed, locks released, pipelines restored);
and a critical section (a rename pair) can hold both signals back until it ends. One place for the command line
and the sweep. Handlers are installed only from the main thread (elsewhere these are no-ops)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block SIGTERM raises ``KeyboardInterrupt`` as Ctrl-C does; the previous handler is restored
    after. Nesting is fine (each level restores what it found)."""
    if not _main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block ends, then raise ``KeyboardInterrupt`` if either came (a
    rename pair must not be cut in half)."""
    if not _main_thread():
        yield
        return
    pending: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = [signal.signal(s, lambda signum, frame: pending.append(signum)) for s in signals]
    try:
        yield
    finally:
        for s, handler in zip(signals, previous, strict=True):
            signal.signal(s, handler)
        if pending:
            raise KeyboardInterrupt(f"signal {pending[0]}")
