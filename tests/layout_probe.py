"""What one training step of a layout costs a rank, measured for `birkhoff plan`'s validation
(parallel_worker.py runs it on every layout): the bytes of each collective by kind and mesh
dimension, the tensors the rank holds by kind once backward is complete, Muon's Newton-Schulz
runs, and how far its resident set grows over the step; and on a step of its own (the
profiler that reads the CPU allocator's events holds memory of its own), the most the
allocator's bytes rise above what the rank holds when the step starts."""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable

import torch

from birkhoff.parallel.comm_counter import CollectiveBytes, mesh_dims
from birkhoff.parallel.memory import AllocatedPeak, held_bytes, reset_peak_memory, resident_mib
from birkhoff.parallel.planning.launches import run_kind


def start_peak_measurement() -> float:
    """Reset the resident-set peak where the kernel allows it (test_model_share skips where
    it does not) and return the resident MiB now. Freed heap goes back to the system first:
    memory an earlier measurement freed would otherwise be reused without the resident set
    growing."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    reset_peak_memory(torch.device("cpu"))
    return resident_mib(peak=False)


def probe_step(trainer) -> dict:
    """Train one step of `trainer` while measuring it (see the module docstring)."""
    during: dict[str, int] = {}
    hook = lambda t: during.update(held_bytes(t.model_parts, t.optimizers))  # noqa: E731
    trainer.after_backward.append(hook)
    mesh = trainer.ctx.mesh
    before = start_peak_measurement()
    runs = {"matrix": 0, "stack": 0}  # Muon's Newton-Schulz runs on this rank
    for optimizer in trainer.optimizers:
        if hasattr(optimizer, "orthogonalise"):
            optimizer.orthogonalise = _counting(optimizer.orthogonalise, runs)
    with CollectiveBytes(mesh_dims(mesh) if mesh is not None else {}) as counted:
        record = trainer.train_step()
    for optimizer in trainer.optimizers:
        vars(optimizer).pop("orthogonalise", None)
    growth = resident_mib(peak=True) - before
    trainer.after_backward.remove(hook)
    return {
        "record": record,
        "comm": {f"{kind}@{dim}": size for (kind, dim), size in counted.bytes.items()},
        "calls": {f"{kind}@{dim}": n for (kind, dim), n in counted.calls.items()},
        "held_after_backward": during,
        "held_at_rest": held_bytes(trainer.model_parts, trainer.optimizers),
        "peak_growth_mib": growth,
        "newton_schulz_runs": runs,
    }


def _counting(orthogonalise: Callable, runs: dict[str, int]) -> Callable:
    def counted(matrices: torch.Tensor, rms: float) -> torch.Tensor:
        runs[run_kind(matrices[..., 0, 0].numel())] += 1
        return orthogonalise(matrices, rms)

    return counted


def measuring_allocated_peak(trainer, warm_step: Callable[[], None]) -> dict:
    """Run `warm_step` (a step: what it frees of earlier work becomes known to the profiler)
    and then one more step of `trainer`, measuring the allocator's peak over that one (see
    the module docstring)."""
    gc.collect()
    with AllocatedPeak(trainer.device) as allocated:
        warm_step()
        at_start = held_bytes(trainer.model_parts, trainer.optimizers)
        allocated.start()
        trainer.train_step()
    return {"held_at_start": at_start, "allocated_peak_growth": allocated.peak_bytes}
