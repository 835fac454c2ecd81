"""Steering (prompt switch, guidance schedule, latent edits, early stop): now in :mod:`sdexplore.record.steering`."""

from .record.steering import (
    GuidanceSchedule,
    LatentEdit,
    PromptSwitch,
    Steering,
    check_guidance_schedule,
    encode_switch,
    guidance_at,
    replace_conditional,
    rescale_conditional,
)

__all__ = [
    "GuidanceSchedule",
    "LatentEdit",
    "PromptSwitch",
    "Steering",
    "check_guidance_schedule",
    "encode_switch",
    "guidance_at",
    "replace_conditional",
    "rescale_conditional",
]
