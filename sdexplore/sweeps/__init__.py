"""Sweeps at dataset scale: prompts × seeds with observation on, sharded with accelerate, resumable, reported."""

from __future__ import annotations

from .plan import DEFAULT_KEEP, KEEP, SweepItem, plan_items
from .prompts import PromptRow, read_prompts
from .report import SweepReport, sweep_report
from .run import SweepResult, sweep

__all__ = [
    "DEFAULT_KEEP",
    "KEEP",
    "PromptRow",
    "SweepItem",
    "SweepReport",
    "SweepResult",
    "plan_items",
    "read_prompts",
    "sweep",
    "sweep_report",
]
