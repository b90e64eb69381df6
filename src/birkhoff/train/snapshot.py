"""In-memory snapshots of a rank's training state on the host, for rolling back a loss spike.

A snapshot holds this rank's own shards (a DTensor's local part, never the full tensor) of
every parameter and buffer of its model parts (router biases included) and every optimizer
state tensor, copied to host memory (pinned when the device is an accelerator, so the copy
overlaps), and the step it was taken after. Restoring copies them back in place: the
parameters keep their identity, so the optimizers, FSDP and DDP hooks stay valid. It costs
host memory equal to the rank's parameters, buffers and optimizer state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    local = local_part(tensor).detach()
    if local.device.type == "cpu":
        return local.clone()
    host = torch.empty(local.shape, dtype=local.dtype, layout=local.layout, pin_memory=True)
    return host.copy_(local, non_blocking=True)


def _copy_back(target: torch.Tensor, saved: torch.Tensor) -> None:
    local = local_part(target)
    if local.is_sparse or saved.is_sparse:  # never state, but say so rather than corrupt it
        raise TypeError("a snapshot holds dense tensors only")
    local.copy_(saved, non_blocking=True)


@dataclass
class HostSnapshot:
    """The state after `step` steps: per model part its named tensors, per optimizer the
    state of each of its parameters (None where the optimizer held none yet)."""

    step: int
    modules: list[dict[str, torch.Tensor]]
    optimizers: list[list[dict[str, Any] | None]]

    @property
    def nbytes(self) -> int:
        tensors = [t for module in self.modules for t in module.values()]
        tensors += [
            v
            for states in self.optimizers
            for state in states
            if state
            for v in state.values()
            if isinstance(v, torch.Tensor)
        ]
        return sum(t.numel() * t.element_size() for t in tensors)


def _module_tensors(part: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(part.named_parameters())
    named.update(part.named_buffers())
    return named


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


@torch.no_grad()
def take_snapshot(
    step: int, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]
) -> HostSnapshot:
    modules = [{k: _to_host(v) for k, v in _module_tensors(part).items()} for part in parts]
    states: list[list[dict[str, Any] | None]] = []
    for optimizer in optimizers:
        per_param: list[dict[str, Any] | None] = []
        for param in _params(optimizer):
            state = optimizer.state.get(param)
            if not state:
                per_param.append(None)
                continue
            per_param.append(
                {k: _to_host(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            )
        states.append(per_param)
    if any(t.is_pinned() for m in modules for t in m.values()):
        torch.accelerator.synchronize()  # the pinned copies are complete before anything moves
    return HostSnapshot(step, modules, states)


@torch.no_grad()
def restore_snapshot(
    snapshot: HostSnapshot, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]
) -> None:
    """Put the snapshot's values back into the same parts and optimizers, in place."""
    for part, saved in zip(parts, snapshot.modules, strict=True):
        current = _module_tensors(part)
        if current.keys() != saved.keys():
            raise ValueError("the snapshot was taken of other model parts")
        for name, tensor in current.items():
            _copy_back(tensor, saved[name])
    for optimizer, saved_states in zip(optimizers, snapshot.optimizers, strict=True):
        for param, saved in zip(_params(optimizer), saved_states, strict=True):
            if saved is None:
                optimizer.state.pop(param, None)  # it had taken no step then
                continue
            state = optimizer.state[param]
            if set(state) != set(saved):  # state only grows, and newer snapshots are dropped
                raise ValueError("the snapshot's optimizer state has other entries")
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    _copy_back(state[key], value)
                else:
                    state[key] = value
    if any(t.is_pinned() for m in snapshot.modules for t in m.values()):
        torch.accelerator.synchronize()
