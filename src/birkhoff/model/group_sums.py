"""Sums over a process group of what each process computed in part, for parallelism applied
from outside. Tensor parallelism of V4 attention splits the heads (it sets `head_group`): the
heads share one KV entry, and the lightning indexer and its target sum over heads, so the shared
inputs' gradients and those sums need every process's heads. Sequence parallelism sums MoE
sequence statistics over the sequence's parts. With no group each op is the identity."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _Shared(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the group (every process read the
    same tensor for its part)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _Summed(torch.autograd.Function):
    """Forward sums every process's part; backward is the identity (what consumes the total is
    computed identically on every process)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        total = x.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def shared_over(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`x`, read by every process of the group; its gradient summed over them."""
    return x if group is None else _Shared.apply(x, group)


def summed_over(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This process's part of a sum -> the sum over the group."""
    return x if group is None else _Summed.apply(x, group)
