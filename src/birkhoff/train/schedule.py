"""Learning-rate multipliers per optimizer step (for torch's LambdaLR)."""

from __future__ import annotations

import math
from collections.abc import Callable

from birkhoff.train.config import OptimConfig


def wsd_decay_steps(cfg: OptimConfig, total_steps: int) -> int:
    return max(1, round(cfg.decay_fraction * total_steps))


def decay_start(cfg: OptimConfig, total_steps: int) -> int | None:
    """The first step whose LR is below the peak after warmup: cosine decays from the end of
    warmup, wsd from its last `decay_fraction` of steps; a constant LR never decays."""
    if cfg.schedule == "cosine":
        return cfg.warmup_steps
    if cfg.schedule == "wsd":
        return total_steps - wsd_decay_steps(cfg, total_steps)
    return None


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """step -> factor on cfg.lr for steps 0..total_steps-1: a linear warmup reaching 1 at step
    warmup-1, then the schedule's shape, which ends exactly at min_lr_ratio on the last step."""
    floor = cfg.min_lr_ratio
    last = total_steps - 1

    def cosine(step: int) -> float:
        progress = min(1.0, (step - cfg.warmup_steps + 1) / max(1, last - cfg.warmup_steps + 1))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def wsd(step: int) -> float:
        decay_steps = wsd_decay_steps(cfg, total_steps)
        into_decay = step - (total_steps - decay_steps) + 1
        return 1.0 - (1 - floor) * min(1.0, max(0, into_decay) / decay_steps)

    shapes = {"cosine": cosine, "wsd": wsd, "constant": lambda step: 1.0}
    shape = shapes[cfg.schedule]

    def multiplier(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return shape(step)

    return multiplier
