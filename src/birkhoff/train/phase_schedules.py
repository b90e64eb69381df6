"""What changes with the phase of training, as DeepSeek-V3 and V4 run it: the MTP loss weight
drops (0.3 -> 0.1) when the learning rate starts to decay, and the routers' aux-loss-free bias
stops moving for the last fraction of the steps (V3: the last 500B of 14.8T tokens). Both are
functions of the step alone, so a resumed run picks them up where it stopped."""

from __future__ import annotations

from torch import nn

from birkhoff.train.config import OptimConfig, TrainConfig
from birkhoff.train.schedule import decay_start


class PhaseSchedules:
    def __init__(
        self, train: TrainConfig, optim: OptimConfig, mtp_loss_weight: float, mtp: bool
    ) -> None:
        self.mtp = mtp
        self.start_weight = mtp_loss_weight
        self.decayed_weight = train.mtp_loss_weight_at_decay
        self.decay_start = decay_start(optim, train.steps)
        self.bias_stop = train.steps - round(train.router_bias_freeze_fraction * train.steps)
        self.freezes = self.bias_stop < train.steps

    def mtp_loss_weight(self, step: int) -> float:
        """The weight for step `step` (0-based): the model's until the LR decays."""
        decaying = self.decay_start is not None and step >= self.decay_start
        if decaying and self.decayed_weight is not None:
            return self.decayed_weight
        return self.start_weight

    def updates_router_biases(self, step: int) -> bool:
        return step < self.bias_stop

    def apply(self, parts: list[nn.Module], step: int) -> None:
        """Set the MTP weight of step `step` on every model part that computes the loss."""
        for part in parts:
            part.mtp_loss_weight = self.mtp_loss_weight(step)

    def metrics(self, step: int) -> dict[str, float]:
        """What step `step` ran with, where it can change during the run."""
        found = {"mtp_loss_weight": self.mtp_loss_weight(step)} if self.mtp else {}
        if self.freezes:
            found["router_biases_moving"] = float(self.updates_router_biases(step))
        return found
