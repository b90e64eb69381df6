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
        if local.is_sparse:  # a row-sparse gradient: its row ids and values
            for part in (local._indices(), local._values()):
                add(category, part)
            return
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


class AllocatedPeak:
    """How far the bytes held by the allocator rise above their level at `start()` (or at
    entry), at most, until the `with` block ends: what an accelerator's allocator reports as
    its peak. On CPU, which keeps no such statistic, it is read from the profiler's
    allocation events, each carrying the running total of what was allocated while it
    profiled; memory allocated before it started and freed afterwards is not seen as freed,
    so run a step before `start()` (memory left from earlier work is then freed, and seen).
    `peak_bytes` is set on exit."""

    _MARK = "birkhoff.allocated_peak.start"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self._profiler: torch.profiler.profile | None = None
        self._start = 0

    def __enter__(self) -> AllocatedPeak:
        if self.device.type == "cpu":
            self._profiler = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            )
            self._profiler.__enter__()
        else:
            self.start()
        return self

    def start(self) -> None:
        """Measure from here on."""
        if self._profiler is not None:
            with torch.profiler.record_function(self._MARK):
                pass
            return
        torch.accelerator.synchronize(self.device)
        torch.accelerator.reset_peak_memory_stats(self.device)
        self._start = torch.accelerator.memory_allocated(self.device)

    def __exit__(self, *exc) -> None:
        if self._profiler is None:
            torch.accelerator.synchronize(self.device)
            self.peak_bytes = torch.accelerator.max_memory_allocated(self.device) - self._start
            return
        self._profiler.__exit__(*exc)
        tree = self._profiler.profiler.kineto_results.experimental_event_tree()
        marks = [n.start_time_ns for n in _nodes(tree) if n.name == self._MARK]
        since = max(marks, default=0)
        events = sorted(_allocations(tree), key=lambda e: e.start_time_ns)
        before = [e for e in events if e.start_time_ns < since]
        after = [e for e in events if e.start_time_ns >= since]
        if not after:
            return
        if before:
            level = before[-1].extra_fields.total_allocated
        else:
            level = after[0].extra_fields.total_allocated - after[0].extra_fields.alloc_size
        self.peak_bytes = max(e.extra_fields.total_allocated for e in after) - level


def _nodes(roots: list) -> list:
    found, stack = [], list(roots)
    while stack:
        node = stack.pop()
        found.append(node)
        stack.extend(node.children)
    return found


def _allocations(roots: list) -> list:
    """The profiler's CPU allocation events anywhere in its event tree."""
    from torch._C._profiler import _EventType

    return [
        n
        for n in _nodes(roots)
        if n.tag == _EventType.Allocation and n.extra_fields.device.type == "cpu"
    ]
