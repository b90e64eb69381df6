"""What a rank holds, counted tensor by tensor: the local shards of parameters, gradients,
optimizer state and buffers, each storage once (tied weights, views). Peak process memory
(resident set on CPU, allocator peak on an accelerator) can be measured from a mark."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

CATEGORIES = ("params", "grads", "optimizer", "buffers")
_STATUS = Path("/proc/self/status")


def held_bytes(
    modules: Iterable[nn.Module], optimizers: Iterable[torch.optim.Optimizer] = ()
) -> dict[str, int]:
    """Bytes of this rank's tensors by category (see CATEGORIES); a storage shared between
    tensors counts once, in the first category that holds it."""
    seen: set[tuple[str, int]] = set()
    totals = dict.fromkeys(CATEGORIES, 0)

    def add(category: str, tensor: torch.Tensor | None) -> None:
        if tensor is None or not torch.is_tensor(tensor) or tensor.is_meta:
            return
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storage = local.untyped_storage()
        key = (str(local.device), storage.data_ptr())
        if storage.nbytes() and key not in seen:
            seen.add(key)
            totals[category] += storage.nbytes()

    modules = list(modules)
    for module in modules:
        for param in module.parameters():
            add("params", param)
    for module in modules:
        for param in module.parameters():
            add("grads", param.grad)
        for buffer in module.buffers():
            add("buffers", buffer)
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                add("optimizer", value)
    return totals


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak measurement; False where this platform cannot (then the peak is the
    process's since it started)."""
    if device.type != "cpu":
        torch.accelerator.reset_peak_memory_stats(device)
        return True
    try:  # Linux: writing 5 to clear_refs resets the resident-set high-water mark (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def resident_mib(peak: bool) -> float:
    """This process's resident set now, or its high-water mark (Linux), in MiB."""
    field = "VmHWM" if peak else "VmRSS"
    found = re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text())
    if found is None:
        raise RuntimeError(f"{_STATUS} has no {field} line")
    return int(found.group(1)) / 1024
