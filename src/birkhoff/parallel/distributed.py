"""The process group of a rank, read from the environment torchrun's launcher sets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from birkhoff.parallel.device import COLLECTIVE_BACKENDS


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    mesh: DeviceMesh | None  # None in a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh.get_local_rank("dp_replicate")

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks (a copy; unchanged in one process)."""
        if self.mesh is None:
            return value.clone()
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.mesh.get_group("dp_replicate"))
        return value

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over data-parallel ranks."""
        if self.mesh is None:
            return value
        return self.all_reduce_sum(value) / self.mesh.get_group("dp_replicate").size()


def env_rank() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables; (0, 0, 1) outside torchrun."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


@contextmanager
def distributed(device: torch.device) -> Iterator[DistributedContext]:
    """Join the process group for the duration of a run and leave it cleanly afterwards."""
    rank, local_rank, world_size = env_rank()
    if world_size == 1:
        yield DistributedContext(rank, local_rank, world_size, None)
        return
    dist.init_process_group(COLLECTIVE_BACKENDS[device.type])
    try:
        mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp_replicate",))
        yield DistributedContext(rank, local_rank, world_size, mesh)
    finally:
        dist.destroy_process_group()
