"""Expert parallelism: each rank of the `ep` group owns E / ep routed experts.

The MoE layer routes and sorts its tokens by expert as in one process; this wrapper around its
GroupedExperts then sends every token to the rank owning its expert (`all_to_all_single` with
split sizes, so uneven loads work on gloo, nccl and hccl), runs the local experts as one
grouped GEMM, and sends the results back in the original order. Shared experts never leave
the rank. The expert weights become DTensors sharded on dim 0 (the expert dim) over `ep`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_module, distribute_tensor

from birkhoff.model.moe import GroupedExperts


class _Dispatch:
    """What the combine step needs from the dispatch step of the same forward call."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.received: list[int] = []
        self.order = torch.empty(0, dtype=torch.long)


def _exchange_counts(counts: torch.Tensor, group: dist.ProcessGroup, ep: int) -> torch.Tensor:
    """(ep, E_local) tokens every source rank sends to each of this rank's experts."""
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    return received.view(ep, -1)


def _expert_major_order(received: torch.Tensor) -> torch.Tensor:
    """Indices turning (source rank, local expert)-ordered rows into expert-major rows (source
    order kept inside each expert, as one process would have them)."""
    ep, local_experts = received.shape
    segment = torch.arange(ep * local_experts, device=received.device)
    source, expert = segment // local_experts, segment % local_experts
    per_row = torch.repeat_interleave(expert * ep + source, received.flatten())
    return torch.argsort(per_row, stable=True)


def _dispatch(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
    x, counts = inputs
    group, ep = mesh.get_group(), mesh.size()
    received = _exchange_counts(counts, group, ep)
    state = module._ep_dispatch
    state.sent = counts.view(ep, -1).sum(1).tolist()
    state.received = received.sum(1).tolist()
    tokens = all_to_all_single_autograd(x.contiguous(), state.received, state.sent, group)
    state.order = _expert_major_order(received)
    return tokens[state.order], received.sum(0)


def _combine(module: nn.Module, output: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    state = module._ep_dispatch
    by_source = torch.empty_like(output).index_copy(0, state.order, output)
    return all_to_all_single_autograd(by_source, state.sent, state.received, mesh.get_group())


def _shard_experts(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    if not isinstance(module, GroupedExperts):
        return
    for param_name, param in list(module.named_parameters(recurse=False)):
        sharded = nn.Parameter(distribute_tensor(param.data, mesh, [Shard(0)]))
        module.register_parameter(param_name, sharded)


def apply_expert_parallel(experts: GroupedExperts, ep_mesh: DeviceMesh) -> None:
    """Shard `experts` over `ep_mesh` and route its inputs through the all-to-all."""
    experts._ep_dispatch = _Dispatch()
    distribute_module(experts, ep_mesh, _shard_experts, _dispatch, _combine)
