"""The process group of a rank, read from the environment torchrun's launcher sets, and the one
DeviceMesh every parallel dimension is cut from."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from birkhoff.parallel.device import COLLECTIVE_BACKENDS

# Outer to inner: pipeline stages talk least, tensor-parallel ranks most (keep them adjacent).
# Expert parallelism is the inner part of dp_shard.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "tp")
MESH_ORDER = ("pp", "dp_replicate", "dp_shard", "tp")  # as printed: dp_shard includes ep
FLATTENED = {
    "dp_shard": ("dp_shard_mod_ep", "ep"),
    "dp": ("dp_replicate", "dp_shard_mod_ep", "ep"),
    "edp": ("dp_replicate", "dp_shard_mod_ep"),
    # Muon's owner group of a matrix FSDP and tp both shard (parallel/muon_exchange.py): made
    # here, where every rank takes part, not when a pipeline stage's optimizer first needs it
    "dp_shard_tp": ("dp_shard_mod_ep", "ep", "tp"),
}


# Every multi-rank run warned once per rank that slicing a flattened dim (dp, edp) from the
# root mesh "will be deprecated"; torch 2.13 supports it and has no public replacement that
# FSDP2's mesh argument takes yet.
warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")


def build_mesh(degrees: dict[str, int], device_type: str) -> DeviceMesh:
    """The world mesh with named dims MESH_DIMS plus the flattened dp_shard, dp (all
    data-parallel ranks), edp (the data-parallel ranks of one expert shard) and dp_shard_tp."""
    sizes = {
        "pp": degrees["pp"],
        "dp_replicate": degrees["dp_replicate"],
        "dp_shard_mod_ep": degrees["dp_shard"] // degrees["ep"],
        "ep": degrees["ep"],
        "tp": degrees["tp"],
    }
    mesh = init_device_mesh(
        device_type, tuple(sizes[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS
    )
    for name, dims in FLATTENED.items():
        mesh[dims]._flatten(name)
    return mesh


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    local_rank: int
    world_size: int
    mesh: DeviceMesh | None  # None in a single process
    degrees: dict[str, int] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # collectives
    # How long a collective may wait for the other ranks; groups made later pass it on.
    collective_timeout: timedelta | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def size(self, dim: str) -> int:
        return 1 if self.mesh is None else self.mesh[dim].size()

    def local_rank_in(self, dim: str) -> int:
        return 0 if self.mesh is None else self.mesh[dim].get_local_rank()

    def group(self, dim: str) -> dist.ProcessGroup | None:
        return None if self.mesh is None else self.mesh[dim].get_group()

    @property
    def dp_rank(self) -> int:
        return self.local_rank_in("dp")

    @property
    def dp_size(self) -> int:
        return self.size("dp")

    def all_reduce_sum(self, value: torch.Tensor, dim: str = "dp") -> torch.Tensor:
        """Sum over the ranks of mesh dimension `dim` (a copy on this rank's device)."""
        value = value.to(self.device, copy=True)
        if self.mesh is not None and self.size(dim) > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.group(dim))
        return value

    def all_reduce_mean(self, value: torch.Tensor, dim: str = "dp") -> torch.Tensor:
        """Mean over the ranks of mesh dimension `dim`."""
        return self.all_reduce_sum(value, dim) / self.size(dim)

    def all_reduce_max(self, value: torch.Tensor, dim: str | None) -> torch.Tensor:
        """Max over mesh dimension `dim`, or over every rank when `dim` is None."""
        value = value.to(self.device, copy=True)
        if self.mesh is not None and (dim is None or self.size(dim) > 1):
            group = None if dim is None else self.group(dim)
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
        return value


def describe_layout(ctx: DistributedContext) -> str:
    """One line: the degree of every mesh dimension and how data parallelism is done."""
    if ctx.mesh is None:
        return "1 rank"
    degrees = " x ".join(f"{name}={ctx.degrees[name]}" for name in MESH_ORDER)
    return f"{degrees} (ep={ctx.degrees['ep']} inside dp_shard) on {ctx.world_size} ranks"


def env_rank() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's variables; (0, 0, 1) outside torchrun."""
    return (
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("LOCAL_RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )


@contextmanager
def distributed(
    device: torch.device, degrees: dict[str, int], collective_timeout_s: float | None = None
) -> Iterator[DistributedContext]:
    """Join the process group for the duration of a run and leave it cleanly afterwards.
    `collective_timeout_s` (launch.collective_timeout_s): how long any collective of any group
    may wait before it fails; None keeps torch's defaults (NCCL 10 min, others 30 min)."""
    rank, local_rank, world_size = env_rank()
    if world_size == 1:
        yield DistributedContext(rank, local_rank, world_size, None, degrees, device)
        return
    timeout = None if collective_timeout_s is None else timedelta(seconds=collective_timeout_s)
    store = _attempt_store(world_size)  # with a store, rank and size are given explicitly
    dist.init_process_group(
        COLLECTIVE_BACKENDS[device.type],
        store=store,
        rank=rank if store is not None else -1,
        world_size=world_size if store is not None else -1,
        timeout=timeout,
    )
    try:
        mesh = build_mesh(degrees, device.type)
        if timeout is not None:
            _set_mesh_timeouts(mesh, timeout)
        yield DistributedContext(rank, local_rank, world_size, mesh, degrees, device, timeout)
    finally:
        dist.destroy_process_group()


def _attempt_store(world_size: int) -> dist.Store | None:
    """The store a rank meets its peers through. Under torchrun's agent every attempt of an
    elastic job uses the agent's one store without a per-attempt prefix, so a restarted rank
    would read the addresses its dead predecessors published and fail to connect; the keys of
    each attempt get a prefix of their own. None: torch's env:// rendezvous."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"birkhoff/attempt-{attempt}", client)


def _set_mesh_timeouts(mesh: DeviceMesh, timeout: timedelta) -> None:
    """DeviceMesh builds its groups with torch's default timeout, not the world group's; set
    it on each (torchtitan does the same, with the same private function)."""
    groups = {mesh[name].get_group() for name in (*MESH_DIMS, *FLATTENED)}
    for group in groups:
        dist.distributed_c10d._set_pg_timeout(timeout, group)
