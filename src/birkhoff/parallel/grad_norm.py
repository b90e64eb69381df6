"""Gradient-norm clipping that is correct whatever the parameters are sharded over.

Parameters live on different meshes (FSDP's dp ranks, dp x tp, the expert ranks, or none),
so the norm is taken per mesh (DTensor reduces over that mesh only, never over replicas),
the squares summed, and summed again over pipeline stages, which hold disjoint layers.
Row-sparse gradients (Engram tables under optim.engram_update=sparse) are plain tensors,
whole on every rank that holds them."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from birkhoff.parallel.distributed import DistributedContext


def grads_by_mesh(params: Iterable[nn.Parameter]) -> list[list[torch.Tensor]]:
    """The dense gradients, grouped by the mesh they are sharded over (None: plain tensors)."""
    groups: dict[object, list[torch.Tensor]] = defaultdict(list)
    for param in params:
        grad = param.grad
        if grad is not None and not grad.is_sparse:
            groups[grad.device_mesh if isinstance(grad, DTensor) else None].append(grad)
    return list(groups.values())


def sparse_grads(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    """The row-sparse gradients, coalesced (each row once)."""
    grads = []
    for param in params:
        if param.grad is not None and param.grad.is_sparse:
            param.grad = param.grad.coalesce()
            grads.append(param.grad)
    return grads


def total_grad_norm(params: Iterable[nn.Parameter], ctx: DistributedContext) -> torch.Tensor:
    """The 2-norm of all gradients of the whole model (a float32 scalar on every rank)."""
    params = list(params)
    squares = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for grads in grads_by_mesh(params):
        # float64 accumulation: a float32 norm of millions of elements drifts by ~1e-5, which
        # would make the clipping depend on how the gradients are sharded.
        norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
        norm = torch.linalg.vector_norm(torch.stack(norms))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares = squares + norm.to(squares.device) ** 2
    for grad in sparse_grads(params):
        norm = torch.linalg.vector_norm(grad.values(), dtype=torch.float64)
        squares = squares + norm.to(squares.device) ** 2
    return ctx.all_reduce_sum(squares, "pp").sqrt().float()


@torch.no_grad()
def clip_grad_norm(
    params: list[nn.Parameter], max_norm: float, ctx: DistributedContext
) -> torch.Tensor:
    """Scale gradients so their global norm is at most `max_norm`; returns the norm before."""
    norm = total_grad_norm(params, ctx)
    scale = min(1.0, max_norm / (norm.item() + 1e-6))
    if scale < 1.0:
        for grads in grads_by_mesh(params):
            torch._foreach_mul_(grads, scale)
        for grad in sparse_grads(params):
            grad.mul_(scale)
    return norm
