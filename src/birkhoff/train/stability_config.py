"""The `train.spike`, `train.anticipatory` and `train.fault` recipe sections: loss-spike
handling, Anticipatory Routing (DeepSeek-V4 §4.2.3) and the fault injection that tests them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from birkhoff.errors import require, require_choice

ANTICIPATORY_MODES = ("off", "always", "spike")


@dataclass
class SpikeConfig:
    """A spike: a step whose loss is above the mean plus `loss_sigmas` standard deviations of
    the last `window` applied steps' losses (or whose gradient norm is, with
    `grad_norm_sigmas`), or one that is not finite. Its update is skipped (data consumed).
    `max_skips` spikes within `window` steps roll the run back to the newest host snapshot
    (taken every `snapshot_every` steps, `snapshots_kept` of them; 0: the newest checkpoint)
    and go on with the data after the spike, so the window that caused it is never trained."""

    enabled: bool = False
    window: int = 50
    loss_sigmas: float | None = 6.0
    grad_norm_sigmas: float | None = None
    max_skips: int = 3
    snapshot_every: int = 50
    snapshots_kept: int = 2

    def validate(self, prefix: str = "train.spike") -> None:
        require(self.window >= 2, f"{prefix}.window", self.window, "must be >= 2 steps")
        for name in ("loss_sigmas", "grad_norm_sigmas"):
            value = getattr(self, name)
            require(value is None or value > 0, f"{prefix}.{name}", value,
                    "must be > 0, or null to not test this quantity")  # fmt: skip
        require(self.max_skips >= 1, f"{prefix}.max_skips", self.max_skips, "must be >= 1")
        require(self.snapshot_every >= 0, f"{prefix}.snapshot_every", self.snapshot_every,
                "must be >= 0 (0: roll back to the newest checkpoint)")  # fmt: skip
        require(self.snapshots_kept >= 1, f"{prefix}.snapshots_kept", self.snapshots_kept,
                "must be >= 1")  # fmt: skip


@dataclass
class AnticipatoryConfig:
    """Anticipatory Routing: the experts of step t are chosen by the parameters of step
    t - `lookahead` (a no-grad forward over step t's batch at that step); the gate values
    come from the current parameters. `mode`: off, always, or spike (switched on by a spike
    rollback for `steps` steps, then off)."""

    mode: str = "off"
    lookahead: int = 1
    steps: int = 100

    def validate(self, prefix: str = "train.anticipatory") -> None:
        require_choice(f"{prefix}.mode", self.mode, ANTICIPATORY_MODES)
        require(self.lookahead >= 1, f"{prefix}.lookahead", self.lookahead, "must be >= 1 step")
        require(self.steps >= 1, f"{prefix}.steps", self.steps, "must be >= 1 step")


@dataclass
class FaultConfig:
    """Fault injection for testing recovery, at step `step` (null: none): its raw gradients
    times `gradient_scale` (before clipping: a gradient-norm spike) and its parameter update
    times `update_scale` (a loss spike; AdamW and Muon normalise a gradient's scale away)."""

    step: int | None = None
    gradient_scale: float = 1.0
    update_scale: float = 1.0

    def validate(self, prefix: str = "train.fault") -> None:
        require(self.step is None or self.step >= 1, f"{prefix}.step", self.step,
                "must be null or a step >= 1")  # fmt: skip
        for name in ("gradient_scale", "update_scale"):
            value = getattr(self, name)
            require(math.isfinite(value), f"{prefix}.{name}", value, "must be a finite number")
