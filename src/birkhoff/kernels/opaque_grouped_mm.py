"""F.grouped_mm as one opaque operator for compiled code in dtypes other than bfloat16.

The eager CPU kernel multiplies float32 (and float64) groups, but the shape function that
dynamo and inductor trace with accepts only bfloat16, so a compiled float32 MoE block fails to
trace. Wrapped in a custom operator, the compiler sees only the output shape below and calls
the eager kernel; its backward is two more grouped GEMMs (the ones autograd runs eagerly)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("birkhoff::grouped_mm", mutates_args=())
def opaque_grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(M, K) x (G, K, N) -> (M, N), rows grouped by `offsets` (the groups' cumulative ends);
    or (K, M) x (M, N) -> (G, K, N), one product per group of the shared M."""
    return F.grouped_mm(a, b, offs=offsets)


@opaque_grouped_mm.register_fake
def _output_like(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offsets.shape[0], a.shape[0], b.shape[-1])


def _keep_inputs(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    a, b, offsets = ctx.saved_tensors
    if b.dim() != 3:
        raise NotImplementedError("birkhoff::grouped_mm differentiates (M, K) x (G, K, N) only")
    grad = grad.contiguous()
    grad_a = opaque_grouped_mm(grad, b.transpose(-2, -1), offsets)
    grad_b = opaque_grouped_mm(a.t(), grad, offsets)
    return grad_a, grad_b, None


opaque_grouped_mm.register_autograd(_grouped_backward, setup_context=_keep_inputs)
