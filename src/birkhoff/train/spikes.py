"""What a step does when its loss or gradient norm is bad: skip it, and after repeated loss
spikes roll back to a snapshot and go on with later data (DeepSeek-V4 §4.2.3; PaLM §5.1 did
the rollback by hand). Decisions are taken from values already agreed over the ranks, so every
rank takes the same one."""

from __future__ import annotations

import math
import sys
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from birkhoff.checkpoint.manager import complete_checkpoints, read_meta
from birkhoff.train.expert_balance import balance_experts
from birkhoff.train.failures import TrainingError
from birkhoff.train.snapshot import HostSnapshot, local_part, restore_snapshot, take_snapshot
from birkhoff.train.stability_config import FaultConfig, SpikeConfig

if TYPE_CHECKING:
    from birkhoff.train.trainer import Trainer


def _parameters(trainer: Trainer) -> list[torch.Tensor]:
    return [p for part in trainer.model_parts for p in part.parameters()]


def exceeds(history: deque[float], value: float, sigmas: float | None) -> bool:
    """`value` above mean + sigmas * std (population) of a full window of `history`."""
    if sigmas is None or len(history) < (history.maxlen or 0):
        return False
    mean = sum(history) / len(history)
    std = math.sqrt(sum((x - mean) ** 2 for x in history) / len(history))
    return value > mean + sigmas * std


class StepGuard:
    """Skips bad steps, keeps host snapshots and rolls back; its counters go to the metrics."""

    def __init__(self, spike: SpikeConfig, fault: FaultConfig, on_bad_step: str, max_bad: int):
        self.cfg, self.fault = spike, fault
        self.on_bad_step, self.max_bad = on_bad_step, max_bad
        self.losses: deque[float] = deque(maxlen=spike.window)
        self.grad_norms: deque[float] = deque(maxlen=spike.window)
        self.recent_spikes: deque[int] = deque()  # attempt numbers of the spikes in the window
        self.snapshots: deque[HostSnapshot] = deque(maxlen=spike.snapshots_kept)
        self.attempts = 0  # steps tried, skipped ones included
        self.bad_steps = self.consecutive_bad = self.spikes = self.rollbacks = 0
        self.last_restored: int | None = None  # the step of the last rollback's snapshot
        self.samples_at: dict[int, int] = {}  # a snapshot's step -> the loader's position
        self.fault_attempt: int | None = None  # the attempt train.fault hits

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    # What a resumed run needs to judge its next steps as the run that went on would: the
    # windows, the spikes in them, the counters. Snapshots live in host memory and are not
    # saved: a resumed run takes its first at the step it resumes from.
    COUNTERS = ("attempts", "bad_steps", "consecutive_bad", "spikes", "rollbacks", "last_restored")

    def state_dict(self) -> dict[str, Any]:
        """The same on every rank (decisions come from agreed values)."""
        windows = {"losses": list(self.losses), "grad_norms": list(self.grad_norms),
                   "recent_spikes": list(self.recent_spikes)}  # fmt: skip
        return {**windows, **{name: getattr(self, name) for name in self.COUNTERS}}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """A checkpoint written before the guard was saved (None) starts with empty windows."""
        if state is None:
            return
        self.losses.extend(state["losses"])  # maxlen: a smaller window keeps the newest
        self.grad_norms.extend(state["grad_norms"])
        self.recent_spikes.extend(state["recent_spikes"])
        for name in self.COUNTERS:
            setattr(self, name, state[name])

    def verdict(self, loss: float, grad_norm: float) -> str | None:
        """Why this step must not be applied, or None."""
        self.attempts += 1
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "not finite"
        if not self.enabled:
            return None
        if exceeds(self.losses, loss, self.cfg.loss_sigmas):
            return "a loss spike"
        if exceeds(self.grad_norms, grad_norm, self.cfg.grad_norm_sigmas):
            return "a gradient-norm spike"
        return None

    def applied(self, trainer: Trainer, loss: float, grad_norm: float) -> dict[str, Any]:
        """After an applied step: the history, a snapshot when one is due, the metrics."""
        self.consecutive_bad = 0
        if not self.enabled:
            return {}
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        if self.cfg.snapshot_every and trainer.step % self.cfg.snapshot_every == 0:
            self.take(trainer)
        return {"spikes": self.spikes, "rollbacks": self.rollbacks}

    def take(self, trainer: Trainer) -> None:
        taken = self.snapshots and self.snapshots[-1].step == trainer.step
        if self.enabled and self.cfg.snapshot_every and not taken:
            snapshot = take_snapshot(trainer.step, trainer.model_parts, trainer.optimizers)
            self.snapshots.append(snapshot)
            kept = {s.step for s in self.snapshots}
            self.samples_at = {k: v for k, v in self.samples_at.items() if k in kept}
            self.samples_at[trainer.step] = _samples_drawn(trainer)

    def scale_gradients(self, trainer: Trainer) -> None:
        """train.fault.gradient_scale: the raw gradients of step `step`, before clipping.
        The fault belongs to the first attempt at that step (once per process: a rollback
        or a skip does not repeat it)."""
        if self.fault.step == trainer.step + 1 and self.fault_attempt is None:
            self.fault_attempt = self.attempts + 1  # the attempt `verdict` is about to judge
        if self.fault_attempt != self.attempts + 1 or self.fault.gradient_scale == 1.0:
            return
        with torch.no_grad():
            for param in _parameters(trainer):
                if param.grad is not None:
                    param.grad.mul_(self.fault.gradient_scale)
        self._say(trainer, f"gradients of step {trainer.step + 1} scaled by "
                           f"{self.fault.gradient_scale}")  # fmt: skip

    @contextmanager
    def scaled_update(self, trainer: Trainer) -> Iterator[None]:
        """train.fault.update_scale: the parameters move update_scale times the optimizers'
        step (AdamW and Muon normalise a gradient's scale away, so a large update is how a
        loss spike is forced)."""
        if self.fault_attempt != self.attempts:
            yield
            return
        scale = self.fault.update_scale
        params = _parameters(trainer) if scale != 1 else []
        before = [local_part(p).detach().clone() for p in params]
        yield
        if before:
            with torch.no_grad():
                for param, old in zip(params, before, strict=True):
                    local = local_part(param)
                    local.copy_(old + scale * (local - old))
            self._say(trainer, f"the update of step {trainer.step + 1} scaled by {scale}")

    @staticmethod
    def _say(trainer: Trainer, what: str) -> None:
        if trainer.ctx.is_main:
            print(f"birkhoff: train.fault: {what}", flush=True)

    def skip(self, trainer: Trainer, why: str, loss: float, grad_norm: float) -> dict[str, Any]:
        """Nothing is updated (parameters, optimizer moments, LR schedule, router biases),
        the batch stays consumed, the step is not counted. The run fails on a non-finite
        step with on_bad_step=fail or after max_bad_steps in a row; repeated spikes roll back."""
        for optimizer in trainer.optimizers:
            optimizer.zero_grad(set_to_none=True)
        balance_experts(trainer.model_parts, trainer.ctx, trainer.routed_per_layer, apply=False)
        record: dict[str, Any] = {"step": trainer.step, "skipped": 1, "loss": loss,
                                  "grad_norm": grad_norm}  # fmt: skip
        what = f"loss {loss}, gradient norm {grad_norm}"
        if why == "not finite":
            self.bad_steps += 1
            self.consecutive_bad += 1
            record["bad_steps"] = self.bad_steps
            self._fail_if_hopeless(trainer.step, what)
        if self.enabled:
            self.spikes += 1
            self.recent_spikes.append(self.attempts)
            while self.recent_spikes[0] <= self.attempts - self.cfg.window:
                self.recent_spikes.popleft()
            record["spikes"] = self.spikes
        if trainer.ctx.is_main:
            print(f"birkhoff: skipped a step after step {trainer.step}: {why} ({what})",
                  flush=True)  # fmt: skip
        if self.enabled and len(self.recent_spikes) >= self.cfg.max_skips:
            record.update(self.roll_back(trainer))
        return record

    def _fail_if_hopeless(self, step: int, what: str) -> None:
        if self.on_bad_step == "fail" or self.consecutive_bad >= self.max_bad:
            times = "" if self.on_bad_step == "fail" else f"{self.consecutive_bad} in a row, "
            raise TrainingError(
                f"the step after step {step} was not finite ({what}; {times}"
                f"train.on_bad_step={self.on_bad_step}, train.max_bad_steps={self.max_bad})"
                "; lower optim.lr or check the data, and resume from the last checkpoint"
            )

    def roll_back(self, trainer: Trainer) -> dict[str, Any]:
        """Back to the newest snapshot (not the one the last rollback went to, if spikes came
        back before a newer one was taken: it may hold the cause), else the newest checkpoint;
        the loader keeps its position, so the data since the snapshot is not trained on."""
        from_step = trainer.step
        if self.snapshots and self.snapshots[-1].step == self.last_restored:
            self.snapshots.pop()
        if self.snapshots:
            snapshot = self.snapshots[-1]
            restore_snapshot(snapshot, trainer.model_parts, trainer.optimizers)
            target, source = snapshot.step, "a host snapshot"
            drawn_then = self.samples_at[target]
        else:
            target, drawn_then = self._checkpoint_rollback(trainer)
            source = "a checkpoint"
        batches = (_samples_drawn(trainer) - drawn_then) // trainer.layout.global_batch_size
        trainer.step = target
        trainer.state.restore_schedule(target)
        if trainer.checkpoints is not None:
            trainer.checkpoints.set_aside_after(target)
        self.last_restored, self.rollbacks = target, self.rollbacks + 1
        self.recent_spikes.clear()
        self.consecutive_bad = 0
        if trainer.ctx.is_main:
            print(f"birkhoff: {self.cfg.max_skips} spikes within {self.cfg.window} steps: "
                  f"rolled back from step {from_step} to {source} of step {target}; the "
                  f"next batches follow the spikes' data", file=sys.stderr, flush=True)  # fmt: skip
        trainer.routing.spike_rollback(trainer.step)
        return {"rollbacks": self.rollbacks, "rolled_back_to": target,
                "rollback_skipped_batches": batches}  # fmt: skip

    def _checkpoint_rollback(self, trainer: Trainer) -> tuple[int, int]:
        """Load the newest checkpoint but the one the last rollback went to; its step and
        the loader's position it was saved at."""
        manager = trainer.checkpoints
        if manager:  # a checkpoint still being written (async) is the newest one once done
            manager.completed(wait=True)
        found = complete_checkpoints(manager.root) if manager else []
        older = [p for p in found if int(read_meta(p)["step"]) != self.last_restored]
        if not older:
            raise TrainingError(
                f"{self.cfg.max_skips} spikes within {self.cfg.window} steps after step "
                f"{trainer.step} and nothing to roll back to (no host snapshot, no checkpoint "
                "but the one already tried); set train.spike.snapshot_every or checkpoint.every"
            )
        meta = manager.load(older[-1], trainer.state)
        return int(meta["step"]), int(manager.rank_states(older[-1])[0]["loader"]["samples"])


def _samples_drawn(trainer: Trainer) -> int:
    """Global samples the loader has handed to training (look-ahead batches not counted)."""
    return int(trainer.routing.loader_state(trainer.loader)["samples"])
