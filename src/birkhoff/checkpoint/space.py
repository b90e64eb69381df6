"""Disk space around a save: how much a checkpoint needs, whether it fits, and what a failed
write (disk full, quota, I/O error) is reported as."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from birkhoff.checkpoint.errors import CheckpointError

# Errors of the storage rather than of the program: the run can go on without this save.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


class SaveFailed(CheckpointError):
    """A checkpoint could not be written for lack of space or a storage error; its partial
    directory was removed. Training may go on (a periodic save) or must stop (the final)."""

    def __init__(self, step: int, message: str) -> None:
        self.step = step
        super().__init__(message)


def local_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of this rank's part of `tensors` (a DTensor's local shard)."""
    total = 0
    for tensor in tensors.values():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def free_bytes(root: Path) -> int:
    """Free bytes on the file system that holds `root` (or its nearest existing parent)."""
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def storage_error(err: BaseException) -> OSError | None:
    """The storage OSError behind `err` (DCP wraps each rank's failure), if there is one."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [err]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in STORAGE_ERRNOS:
            return current
        if isinstance(current, CheckpointException):  # per rank: (exception, traceback)
            for failure in current.failures.values():
                pending += [f for f in _as_tuple(failure) if isinstance(f, BaseException)]
        pending += [current.__cause__, current.__context__]
    return None


def _as_tuple(value: object) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def describe_failure(step: int, cause: OSError, staging: Path, needed: int) -> str:
    """One line: what failed, where, how much space it needed and how much is free."""
    reason = cause.strerror or errno.errorcode.get(cause.errno or 0, str(cause))
    return (
        f"checkpoint of step {step} could not be written to {staging.parent}: {reason} "
        f"(needs about {_mib(needed)}, {_mib(free_bytes(staging.parent))} free); its partial "
        "directory was removed"
    )


def space_warning(step: int, root: Path, needed: int) -> str | None:
    """A warning when the next checkpoint will not fit (with 10% to spare), else None."""
    free = free_bytes(root)
    if free >= needed * 1.1:
        return None
    return (
        f"checkpoint of step {step} needs about {_mib(needed)} but {root} has "
        f"{_mib(free)} free; free space or lower checkpoint.keep_last"
    )


def _mib(count: int) -> str:
    return f"{count / 2**20:.1f} MiB"
