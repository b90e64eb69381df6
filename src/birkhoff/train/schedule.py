"""Learning-rate multipliers per optimizer step (for torch's LambdaLR)."""

from __future__ import annotations

import math
from collections.abc import Callable

from birkhoff.train.config import OptimConfig


def lr_multiplier(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """step -> factor on cfg.lr: linear warmup from 1/warmup, then the configured shape."""
    floor = cfg.min_lr_ratio

    def warmup(step: int) -> float | None:
        return (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else None

    def cosine(step: int) -> float:
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def wsd(step: int) -> float:
        decay_steps = max(1, round(cfg.decay_fraction * total_steps))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        return 1.0 - (1 - floor) * min(1.0, (step - decay_start + 1) / decay_steps)

    shapes = {"cosine": cosine, "wsd": wsd, "constant": lambda step: 1.0}
    shape = shapes[cfg.schedule]

    def multiplier(step: int) -> float:
        ramp = warmup(step)
        return ramp if ramp is not None else shape(step)

    return multiplier
