"""Which device a rank computes on: `auto` prefers npu (torch_npu), then cuda, then cpu."""

from __future__ import annotations

import importlib.util
import resource
from pathlib import Path

import torch

from birkhoff.parallel.memory import resident_mib

DEVICES = ("auto", "cpu", "cuda", "npu")
COLLECTIVE_BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers the npu device with torch)

    return torch.npu.is_available()


def resolve_device(name: str, local_rank: int) -> torch.device:
    """The torch.device for `name` on this rank; asking for a missing accelerator is an error."""
    if name == "auto":
        name = "npu" if npu_available() else "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("backend.device=cuda but no CUDA device is visible; use auto or cpu")
    if name == "npu" and not npu_available():
        raise RuntimeError("backend.device=npu but torch_npu or an Ascend device is missing")
    device = torch.device(name, local_rank)
    torch.accelerator.set_device_index(local_rank)
    return device


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process since it started or since `memory.reset_peak_memory`: the
    allocator's peak on an accelerator, else the resident set's high-water mark (Linux's
    VmHWM; elsewhere the rusage maximum, which cannot be reset)."""
    if device.type == "cpu":
        if Path("/proc/self/status").is_file():
            return resident_mib(peak=True)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return torch.accelerator.max_memory_allocated(device) / 2**20
