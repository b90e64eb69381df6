"""F.grouped_mm as opaque operators for compiled code in dtypes other than bfloat16.

The eager CPU kernel multiplies float32 (and float64) groups, but the shape function that
dynamo and inductor trace with accepts only bfloat16, so a compiled float32 MoE block fails to
trace. Wrapped in custom operators, the compiler sees only the output shapes below and calls
the eager kernel; the backward is the two grouped GEMMs autograd runs eagerly."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("birkhoff::grouped_mm", mutates_args=())
def opaque_grouped_mm(
    x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """(M, K) x (G, K, N) -> (M, N): rows grouped by `offsets` (the groups' cumulative ends),
    each group times its own matrix."""
    return F.grouped_mm(x, weights, offs=offsets)


@opaque_grouped_mm.register_fake
def _rows_out(x: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weights.shape[-1])


@torch.library.custom_op("birkhoff::grouped_mm_weight_grad", mutates_args=())
def _weight_grad(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(M, K), (M, N) -> (G, K, N): each group's x rows transposed times its gradient rows."""
    return F.grouped_mm(x.t(), grad, offs=offsets)


@_weight_grad.register_fake
def _per_group(x: torch.Tensor, grad: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return x.new_empty(offsets.shape[0], x.shape[1], grad.shape[1])


def _keep_inputs(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    x, weights, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_x = opaque_grouped_mm(grad, weights.transpose(-2, -1), offsets)
    return grad_x, _weight_grad(x, grad, offsets), None


opaque_grouped_mm.register_autograd(_backward, setup_context=_keep_inputs)
