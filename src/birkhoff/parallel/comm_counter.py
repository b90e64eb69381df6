"""Counting the bytes a rank's collectives move, by kind and by mesh dimension: a dispatch mode
that sees every c10d and functional collective below DTensor, FSDP2, DDP and autograd (the
measurement `birkhoff plan` is checked against).

Payload per call: the gathered tensor of an all-gather, the input of a reduce-scatter or an
all-to-all, the tensor of an all-reduce, a broadcast, a send or a receive, the shard a scatter
delivers."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.utils._python_dispatch import TorchDispatchMode

_C10D = torch.ops.c10d
_FUNCTIONAL = torch.ops._c10d_functional

# op packet -> (kind, index of the tensor(s) counted, index of the group argument)
_OPS = {
    _C10D._allgather_base_: ("all_gather", 0, 2),
    _C10D.allgather_into_tensor_coalesced_: ("all_gather", 0, 2),
    _C10D._reduce_scatter_base_: ("reduce_scatter", 1, 2),
    _C10D.reduce_scatter_tensor_coalesced_: ("reduce_scatter", 1, 2),
    _C10D.allreduce_: ("all_reduce", 0, 1),
    _C10D.allreduce_coalesced_: ("all_reduce", 0, 1),
    _C10D.alltoall_base_: ("all_to_all", 1, 2),
    _C10D.broadcast_: ("broadcast", 0, 1),
    _C10D.scatter_: ("scatter", 0, 2),
    _C10D.send: ("send_recv", 0, 1),
    _C10D.recv_: ("send_recv", 0, 1),
    _FUNCTIONAL.all_reduce: ("all_reduce", 0, 2),
    _FUNCTIONAL.all_gather_into_tensor: ("all_gather", 0, 2),
    _FUNCTIONAL.reduce_scatter_tensor: ("reduce_scatter", 0, 3),
    _FUNCTIONAL.all_to_all_single: ("all_to_all", 0, 3),
}


def _bytes(value) -> int:
    tensors = value if isinstance(value, list | tuple) else [value]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class CollectiveBytes(TorchDispatchMode):
    """`with CollectiveBytes(dims) as counted:` ... then counted.bytes[(kind, dim)]; `dims`
    maps a group's global ranks to the mesh dimension it spans (mesh_dims). A collective over
    one rank moves nothing and is not counted; a group no dimension spans counts as "other"."""

    def __init__(self, dims: dict[tuple[int, ...], str]) -> None:
        super().__init__()
        self.dims = dims
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = _OPS.get(getattr(func, "overloadpacket", None))
        if found is not None:
            kind, tensor_index, group_index = found
            ranks = _ranks(args[group_index])
            if len(ranks) > 1:
                size = _bytes(args[tensor_index])
                if func.overloadpacket is _FUNCTIONAL.all_gather_into_tensor:
                    size *= args[1]  # the input times the group size
                key = (kind, self.dims.get(ranks, "other"))
                self.bytes[key] += size
                self.calls[key] += 1
        return func(*args, **kwargs)


def _ranks(group) -> tuple[int, ...]:
    """Global ranks of a collective's group: a functional op's name, or c10d's boxed one."""
    if isinstance(group, str):
        group = c10d._resolve_process_group(group)
    elif not isinstance(group, dist.ProcessGroup):
        group = dist.ProcessGroup.unbox(group)
    return tuple(dist.get_process_group_ranks(group))


def mesh_dims(mesh) -> dict[tuple[int, ...], str]:
    """This rank's groups of `mesh` by their global ranks -> the dimension name (the first
    of equal ones in the mesh's order, then the flattened dp_shard, dp, edp, dp_shard_tp)."""
    dims: dict[tuple[int, ...], str] = {}
    names = [*(mesh.mesh_dim_names or ()), "dp_shard", "dp", "edp", "dp_shard_tp"]
    for name in names:
        try:
            group = mesh[name].get_group()
        except (KeyError, RuntimeError, ValueError):
            continue
        dims.setdefault(tuple(dist.get_process_group_ranks(group)), name)
    return dims
